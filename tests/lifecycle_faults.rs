//! Faults a real QEMU cannot be made to show on demand, with the stand-in
//! QEMU (a test double) and its fault modes: a QEMU that ignores power-down,
//! ignores SIGTERM, is stopped with SIGSTOP, starts slower than the
//! readiness bound, reports a guest panic or crashes during create; a remove
//! during create; a record that cannot be written; a full or read-only state
//! directory; processes no record accounts for; signals while creates are in
//! flight. Each ends within its bound, with the right status, and leaves
//! nothing behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cocos_core::proto::{CreateReq, RemoveReq};
use common::*;
use nix::sys::signal::Signal;
use tonic::Code;

/// A stop budget of 5 s: power-down 1 s, quit 1 s, SIGTERM 1 s, SIGKILL 2 s.
const FAST_STOP: [(&str, &str); 4] = [
    ("MANAGER_STOP_POWERDOWN_TIMEOUT", "1s"),
    ("MANAGER_STOP_QUIT_TIMEOUT", "1s"),
    ("MANAGER_STOP_TERM_TIMEOUT", "1s"),
    ("MANAGER_STOP_KILL_TIMEOUT", "2s"),
];
/// The budget plus room for a loaded 2-core machine: a remove that takes
/// longer than this is hung, not slow.
const STOP_BOUND: Duration = Duration::from_secs(20);

fn manager(extra: &[(&str, &str)]) -> Manager {
    let mut env: Vec<(&str, &str)> = FAST_STOP.to_vec();
    env.extend_from_slice(extra);
    start_on_stand_in(free_port_range(8), &env)
}

async fn remove_within_bound(client: &mut Client, id: &str) -> Result<(), tonic::Status> {
    tokio::time::timeout(
        STOP_BOUND,
        client.remove_vm(RemoveReq {
            cvm_id: id.to_string(),
        }),
    )
    .await
    .unwrap_or_else(|_| panic!("RemoveVm of {id} did not finish within {STOP_BOUND:?}"))
    .map(|_| ())
}

fn signal(pid: i32, signal: Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_that_ignores_power_down_is_asked_to_quit() {
    let manager = manager(&[("STAND_IN_IGNORE_POWERDOWN", "1")]);
    let mut client = manager.client().await;
    let (id, _) = create(&mut client).await;
    remove_within_bound(&mut client, &id)
        .await
        .expect("RemoveVm");
    assert!(
        manager.log().contains("Stopping(Quit)"),
        "{}",
        manager.log()
    );
    assert_nothing_left(&manager).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_that_ignores_sigterm_is_killed() {
    let manager = start_on_stand_in(
        free_port_range(4),
        &[
            ("STAND_IN_IGNORE_SIGTERM", "1"),
            // No QMP stages: straight to the signals.
            ("MANAGER_STOP_POWERDOWN_TIMEOUT", "0s"),
            ("MANAGER_STOP_QUIT_TIMEOUT", "0s"),
            ("MANAGER_STOP_TERM_TIMEOUT", "1s"),
            ("MANAGER_STOP_KILL_TIMEOUT", "2s"),
        ],
    );
    let mut client = manager.client().await;
    let (id, _) = create(&mut client).await;
    let pid = qemu_pid(&id).await;
    remove_within_bound(&mut client, &id)
        .await
        .expect("RemoveVm");
    let log = manager.log();
    assert!(
        log.contains("signal=\"SIGTERM\"") && log.contains("signal=\"SIGKILL\""),
        "{log}"
    );
    assert!(!process_exists(pid));
    assert_nothing_left(&manager).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_qemu_is_killed_within_the_stop_budget() {
    let manager = manager(&[]);
    let mut client = manager.client().await;
    let (id, _) = create(&mut client).await;
    let pid = qemu_pid(&id).await;
    // Hung: its control socket no longer answers, signals other than
    // SIGKILL stay pending.
    signal(pid, Signal::SIGSTOP);
    remove_within_bound(&mut client, &id)
        .await
        .expect("RemoveVm");
    assert!(
        manager.log().contains("signal=\"SIGKILL\""),
        "{}",
        manager.log()
    );
    assert!(!process_exists(pid));
    assert_nothing_left(&manager).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_slower_than_the_readiness_bound_fails_the_create() {
    let manager = manager(&[
        ("STAND_IN_START_DELAY", "30s"),
        ("MANAGER_START_TIMEOUT", "1s"),
    ]);
    let mut client = manager.client().await;
    let err = tokio::time::timeout(STOP_BOUND, client.create_vm(CreateReq::default()))
        .await
        .expect("CreateVm ends within its bound")
        .expect_err("too slow");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("within 1s"), "{}", err.message());
    assert_nothing_left(&manager).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_during_create_fails_it() {
    let manager = manager(&[
        ("STAND_IN_START_DELAY", "1s"),
        ("STAND_IN_CRASH_AFTER", "100ms"),
    ]);
    let mut client = manager.client().await;
    let err = client
        .create_vm(CreateReq::default())
        .await
        .expect_err("QEMU crashed while starting");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(
        err.message().contains("exited at start"),
        "{}",
        err.message()
    );
    assert_nothing_left(&manager).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_panic_restarts_the_vm() {
    let manager = manager(&[
        ("STAND_IN_PANIC_AFTER", "300ms"),
        ("MANAGER_RESTART_BACKOFF_INITIAL", "100ms"),
        ("MANAGER_RESTART_MAX_RESTARTS", "50"),
    ]);
    let mut client = manager.client().await;
    let (id, _) = create(&mut client).await;
    let first = qemu_pid(&id).await;
    let restarted = || {
        let log = manager.log();
        log.contains("guest panicked") && log.contains("VM restarted")
    };
    assert!(
        eventually(Duration::from_secs(20), restarted).await,
        "{}",
        manager.log()
    );
    assert!(!process_exists(first) || is_zombie(first));
    // It may be up or waiting to restart: a remove works in either phase.
    remove_within_bound(&mut client, &id)
        .await
        .expect("RemoveVm");
    assert_nothing_left(&manager).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_during_create_stops_the_vm_once_it_is_up() {
    let manager = manager(&[("STAND_IN_START_DELAY", "2s")]);
    let mut client = manager.client().await;
    let mut creator = client.clone();
    let create = tokio::spawn(async move { creator.create_vm(CreateReq::default()).await });
    assert!(
        eventually(Duration::from_secs(10), || manager.vm_folders().len() == 1).await,
        "the create never began"
    );
    let id = manager.vm_folders().remove(0);
    remove_within_bound(&mut client, &id)
        .await
        .expect("RemoveVm");
    let created = create
        .await
        .expect("join")
        .expect("the create itself succeeded");
    assert_eq!(created.into_inner().cvm_id, id);
    assert_nothing_left(&manager).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_cannot_be_written_stops_the_qemu_and_fails_the_create() {
    let manager = manager(&[("STAND_IN_START_DELAY", "2s")]);
    let mut client = manager.client().await;
    let mut creator = client.clone();
    let create = tokio::spawn(async move { creator.create_vm(CreateReq::default()).await });
    assert!(eventually(Duration::from_secs(10), || manager.vm_folders().len() == 1).await);
    let id = manager.vm_folders().remove(0);
    // The record is written through record.json.tmp: make that impossible.
    std::fs::create_dir(manager.vms_dir().join(&id).join("record.json.tmp")).expect("mkdir");
    let err = create.await.expect("join").expect_err("no record, no VM");
    assert!(
        err.message().contains("cannot write the VM record"),
        "{err}"
    );
    assert!(pids_matching(&id).is_empty(), "its QEMU was stopped");
    let err = client
        .cvm_info(cocos_core::proto::CvmInfoReq { id: id.clone() })
        .await
        .expect_err("not listed");
    assert_eq!(err.code(), Code::NotFound);
    assert_nothing_left(&manager).await;
}

fn mount(args: &[&str], target: &Path) {
    let out = Command::new(require_tool("mount"))
        .args(args)
        .arg(target)
        .output()
        .expect("run mount");
    assert!(
        out.status.success(),
        "this test mounts file systems (needs root): mount {args:?} {}: {}",
        target.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A bind mount of a folder onto itself, made read-only; undone when dropped.
struct ReadOnly(PathBuf);

impl ReadOnly {
    fn make(dir: &Path) -> ReadOnly {
        mount(&["--bind", &dir.display().to_string()], dir);
        let guard = ReadOnly(dir.to_path_buf());
        mount(&["-o", "remount,bind,ro"], dir);
        guard
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::Builder::new()
            .prefix("cocos-fs")
            .tempdir_in("/tmp")
            .expect("dir");
        mount(
            &["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"],
            dir.path(),
        );
        Tmpfs { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("state")
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

fn manager_on(state: &Path, extra: &[(&str, &str)]) -> Manager {
    let state = state.display().to_string();
    let mut env: Vec<(&str, &str)> = vec![("MANAGER_STATE_DIR", &state)];
    env.extend_from_slice(extra);
    manager(&env)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_state_directory_is_resource_exhausted_and_loses_nothing() {
    // Room for the lock file and folders, not for a 128 KiB firmware vars copy.
    let fs = Tmpfs::mount("96k");
    let manager = manager_on(&fs.path(), &[]);
    let mut client = manager.client().await;
    let err = client
        .create_vm(CreateReq::default())
        .await
        .expect_err("disk full");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(err.message().contains("No space left"), "{}", err.message());
    let left: Vec<_> = std::fs::read_dir(fs.path().join("vms"))
        .expect("vms")
        .flatten()
        .collect();
    assert!(left.is_empty(), "{left:?}");
    drop(manager);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_state_directory_is_a_failed_precondition() {
    let manager = manager(&[]);
    let mut client = manager.client().await;
    let read_only = ReadOnly::make(&manager.vms_dir());
    let err = client
        .create_vm(CreateReq::default())
        .await
        .expect_err("read-only");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("Read-only"), "{}", err.message());
    drop(read_only);
    assert_nothing_left(&manager).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_no_record_accounts_for_are_killed_at_start() {
    let mut manager = manager(&[]);
    let mut client = manager.client().await;
    let (kept, kept_port) = create(&mut client).await;
    let (lost, _) = create(&mut client).await;
    let (restarted, restarted_port) = create(&mut client).await;
    let kept_pid = qemu_pid(&kept).await;
    let lost_pid = qemu_pid(&lost).await;
    let restarted_pid = qemu_pid(&restarted).await;
    manager.stop_with(Signal::SIGKILL, Duration::from_secs(10));

    // A create cut short: the folder has no record, its QEMU runs.
    std::fs::remove_file(manager.vms_dir().join(&lost).join("record.json")).expect("rm");
    // A restart the manager spawned but never recorded: the recorded
    // QEMU is gone, another one with the same command runs.
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(manager.vms_dir().join(&restarted).join("record.json")).expect("record"),
    )
    .expect("json");
    let argv: Vec<String> = serde_json::from_value(record["argv"].clone()).expect("argv");
    kill9(restarted_pid);
    assert!(eventually(Duration::from_secs(10), || port_is_free(restarted_port)).await);
    let mut unrecorded = Command::new(&argv[0])
        .args(&argv[1..])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn the unrecorded QEMU");
    let unrecorded_pid = unrecorded.id() as i32;
    assert!(eventually(Duration::from_secs(10), || !port_is_free(restarted_port)).await);

    manager.spawn();
    let mut client = manager.client().await;
    assert_eq!(
        pids_matching(&kept),
        vec![kept_pid],
        "the recorded VM is kept"
    );
    assert!(
        eventually(Duration::from_secs(10), || {
            !process_exists(lost_pid) || is_zombie(lost_pid)
        })
        .await,
        "the QEMU of an unfinished create is killed"
    );
    let status = tokio::task::spawn_blocking(move || unrecorded.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(
        !status.success(),
        "the unrecorded QEMU was killed: {status}"
    );
    assert!(!process_exists(unrecorded_pid));
    assert!(port_is_free(restarted_port));
    for id in [&lost, &restarted] {
        assert!(
            !manager.vms_dir().join(id).exists(),
            "{id}'s folder is removed"
        );
    }
    assert!(!port_is_free(kept_port));
    remove_within_bound(&mut client, &kept)
        .await
        .expect("RemoveVm");
    assert_nothing_left(&manager).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_and_sigterm_while_creates_are_in_flight() {
    let mut manager = manager(&[("STAND_IN_START_DELAY", "1s"), ("MANAGER_MAX_VMS", "10")]);
    let client = manager.client().await;
    let creates = |n: usize| {
        (0..n)
            .map(|_| {
                let mut c = client.clone();
                tokio::spawn(async move { c.create_vm(CreateReq::default()).await })
            })
            .collect::<Vec<_>>()
    };
    let first = creates(3);
    assert!(eventually(Duration::from_secs(10), || manager.vm_folders().len() == 3).await);
    signal(manager.pid(), Signal::SIGHUP);
    let mut ids = Vec::new();
    for task in first {
        let created = task
            .await
            .expect("join")
            .expect("a reload does not fail a create");
        ids.push(created.into_inner().cvm_id);
    }
    let second = creates(2);
    assert!(
        eventually(Duration::from_secs(10), || manager.vm_folders().len() == 5).await,
        "{}",
        manager.log()
    );
    let status = manager
        .stop_with(Signal::SIGTERM, Duration::from_secs(30))
        .expect("the manager ends on SIGTERM");
    assert!(status.success(), "{status}");
    for task in second {
        // Finished before the manager went (its VM runs on), or refused.
        match task.await.expect("join") {
            Ok(created) => ids.push(created.into_inner().cvm_id),
            Err(e) => assert!(
                matches!(
                    e.code(),
                    Code::Unavailable | Code::Cancelled | Code::Unknown
                ),
                "{e}"
            ),
        }
    }
    // The next manager finds exactly the VMs whose create succeeded.
    manager.spawn();
    let mut client = manager.client().await;
    let mut folders = manager.vm_folders();
    folders.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(folders, expected, "{}", manager.log());
    for id in &ids {
        remove_within_bound(&mut client, id)
            .await
            .expect("RemoveVm");
    }
    assert_nothing_left(&manager).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stop_vms_stops_every_vm() {
    let mut manager = manager(&[("MANAGER_SHUTDOWN_STOP_VMS", "true")]);
    let mut client = manager.client().await;
    let mut pids = Vec::new();
    for _ in 0..3 {
        let (id, _) = create(&mut client).await;
        pids.push(qemu_pid(&id).await);
    }
    let status = manager
        .stop_with(Signal::SIGTERM, Duration::from_secs(30))
        .expect("the manager ends");
    assert!(status.success(), "{status}");
    for pid in pids {
        assert!(!process_exists(pid) || is_zombie(pid), "QEMU {pid} left");
    }
    assert!(
        manager.vm_folders().is_empty(),
        "{:?}",
        manager.vm_folders()
    );
    for port in manager.range.0..=manager.range.1 {
        assert!(port_is_free(port), "port {port}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_vm_counts_toward_the_limit_until_pruned() {
    let manager = manager(&[
        ("MANAGER_MAX_VMS", "1"),
        ("MANAGER_RESTART_MAX_RESTARTS", "1"),
        ("MANAGER_RESTART_BACKOFF_INITIAL", "50ms"),
        ("MANAGER_FAILED_VM_RETENTION", "3s"),
        // Every start of this VM dies soon after it is up.
        ("STAND_IN_CRASH_AFTER", "300ms"),
    ]);
    let mut client = manager.client().await;
    let (id, _) = create(&mut client).await;
    let failed = || manager.log().contains("VM failed: restart budget spent");
    assert!(
        eventually(Duration::from_secs(20), failed).await,
        "{}",
        manager.log()
    );
    // Listed, and counted: no room for another VM.
    info(&mut client, &id).await;
    let err = client
        .create_vm(CreateReq::default())
        .await
        .expect_err("the failed VM still counts");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    // Pruned after the retention time: gone from the list, room again.
    let pruned = || manager.log().contains("failed VM forgotten");
    assert!(
        eventually(Duration::from_secs(20), pruned).await,
        "{}",
        manager.log()
    );
    let err = client
        .cvm_info(cocos_core::proto::CvmInfoReq { id })
        .await
        .expect_err("pruned");
    assert_eq!(err.code(), Code::NotFound);
    assert_nothing_left(&manager).await;
}
