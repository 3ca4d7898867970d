//! Fail-fast, with the stand-in QEMU (a test double): a panic in any actor
//! or thread of the daemon, and an essential actor that stops, end the
//! manager with a non-zero status after logging the cause; the VM started
//! before keeps running, and the next manager (the normal binary, same state
//! directory) re-adopts it and can remove it with nothing left. A supervisor
//! that hangs stops the systemd watchdog pings.
//!
//! The faults are provoked through the test hooks (`actors/src/testhooks.rs`),
//! compiled only into `target/<profile>/cocos-manager-test-hooks`: a copy of
//! the daemon built with the cargo feature `test-hooks` (the README's test
//! command and `.ci/run` build it). The hook named by `COCOS_TEST_HOOK` fires
//! on SIGUSR1.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use cocos_core::proto::{CvmInfoReq, CvmInfoRes, RemoveReq};
use common::*;
use nix::sys::signal::Signal;

/// The exit status after a panic (actors/src/failfast.rs).
const PANIC_EXIT: i32 = 101;
/// The exit status after an essential actor stopped.
const ACTOR_STOPPED_EXIT: i32 = 70;

/// The daemon built with the test hooks, next to the normal one.
fn hooks_binary() -> PathBuf {
    let path = manager_binary().with_file_name("cocos-manager-test-hooks");
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build --release --workspace --features \
         cocos-manager/test-hooks && cp target/release/cocos-manager \
         target/release/cocos-manager-test-hooks`, then rebuild the normal binary \
         (`cargo build --release --workspace`); the README's test command does both",
        path.display()
    );
    // `cargo test` rebuilds the normal binary, never this copy: a source
    // changed since it was made would test old code against new.
    let built = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .expect("mtime");
    let root = repo_root();
    if let Some(newer) = [root.join("actors/src"), root.join("src")]
        .iter()
        .flat_map(|dir| sources(dir))
        .find(|file| {
            std::fs::metadata(file)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t > built)
        })
    {
        panic!(
            "{} is older than {}: rebuild it (the README's test command does)",
            path.display(),
            newer.display()
        );
    }
    path
}

/// The `.rs` files under `dir`.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

/// A manager whose VMs run the stand-in, started from the test-hook build
/// with `COCOS_TEST_HOOK=hook`. `Manager::spawn` starts the normal binary on
/// the same state directory afterwards.
fn start_hooked(hook: &str, extra: &[(&str, &str)]) -> Manager {
    let range = free_port_range(4);
    let mut env = Manager::dev_env(range);
    let mut set = |k: &str, v: &str| {
        env.insert(k.to_string(), v.to_string());
    };
    set("MANAGER_QEMU_BIN_PATH", &stand_in().to_string_lossy());
    set("MANAGER_QEMU_VTPM", "none");
    set("COCOS_TEST_HOOK", hook);
    for (k, v) in extra {
        set(k, v);
    }
    let state_dir = tempfile::Builder::new()
        .prefix("cocos-t")
        .tempdir_in("/tmp")
        .expect("temp dir");
    let log_path = state_dir.path().join("manager.log");
    let mut manager = Manager {
        child: None,
        state_dir,
        grpc_port: free_port(),
        http_port: free_port(),
        range,
        log_path,
        env,
        config_file: repo_root().join("config/dev.toml"),
    };
    spawn_binary(&mut manager, &hooks_binary());
    manager
}

/// `Manager::spawn` with another binary.
fn spawn_binary(manager: &mut Manager, binary: &Path) {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&manager.log_path)
        .expect("manager log");
    let mut cmd = Command::new(binary);
    cmd.arg("--config")
        .arg(&manager.config_file)
        .current_dir(repo_root())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("MANAGER_STATE_DIR", manager.state_dir.path().join("state"))
        .env("MANAGER_GRPC_HOST", "127.0.0.1")
        .env("MANAGER_GRPC_PORT", manager.grpc_port.to_string())
        .env("MANAGER_HTTP_HOST", "127.0.0.1")
        .env("MANAGER_HTTP_PORT", manager.http_port.to_string())
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
    for (k, v) in &manager.env {
        cmd.env(k, v);
    }
    manager.child = Some(cmd.spawn().expect("start cocos-manager-test-hooks"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some(Ok(Some(status))) = manager.child.as_mut().map(|c| c.try_wait()) {
            panic!("the manager exited at start ({status}):\n{}", manager.log());
        }
        if std::net::TcpStream::connect(("127.0.0.1", manager.grpc_port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the manager did not listen in time:\n{}", manager.log());
}

fn signal(manager: &Manager, signal: Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(manager.pid()), signal).expect("signal");
}

/// Waits for the manager to exit on its own; its status.
async fn exited(manager: &mut Manager, limit: Duration) -> ExitStatus {
    let mut status = None;
    let child = manager.child.as_mut().expect("a running manager");
    eventually(limit, || {
        status = child.try_wait().expect("wait");
        status.is_some()
    })
    .await;
    let Some(status) = status else {
        panic!(
            "the manager did not exit within {limit:?}:\n{}",
            manager.log()
        );
    };
    manager.child = None;
    status
}

/// The whole check for one fault: a VM runs, the hook fires, the manager
/// exits with `code` and logs `expected`; the VM survives, and the normal
/// binary re-adopts it, removes it and leaves nothing.
async fn fault_ends_the_daemon_and_the_vm_survives(hook: &str, code: i32, expected: &[&str]) {
    let mut manager = start_hooked(hook, &[]);
    let mut client = manager.client().await;
    let (id, _port) = create(&mut client).await;
    let qemu = qemu_pid(&id).await;

    signal(&manager, Signal::SIGUSR1);
    let status = exited(&mut manager, Duration::from_secs(20)).await;
    let log = manager.log();
    assert_eq!(
        status.code(),
        Some(code),
        "{hook}: exit status {status}:\n{log}"
    );
    for text in expected {
        assert!(log.contains(text), "{hook}: {text:?} not logged:\n{log}");
    }
    assert!(
        process_exists(qemu) && !is_zombie(qemu),
        "{hook}: the VM must keep running"
    );

    manager.env.remove("COCOS_TEST_HOOK");
    manager.spawn();
    let mut client = manager.client().await;
    let vm = readopted(&manager, &mut client, &id).await;
    assert_eq!(vm.id, id, "re-adopted under its id");
    assert_eq!(pids_matching(&id), vec![qemu], "the same QEMU, re-adopted");
    client
        .remove_vm(RemoveReq { cvm_id: id })
        .await
        .expect("RemoveVm of the re-adopted VM");
    assert_nothing_left(&manager).await;
    let status = manager
        .stop_with(Signal::SIGTERM, Duration::from_secs(15))
        .expect("exits on SIGTERM");
    assert!(
        status.success(),
        "an orderly end is not a failure: {status}\n{}",
        manager.log()
    );
}

/// CVMInfo of a VM the new manager must have re-adopted.
async fn readopted(manager: &Manager, client: &mut Client, id: &str) -> CvmInfoRes {
    match client.cvm_info(CvmInfoReq { id: id.to_string() }).await {
        Ok(info) => info.into_inner(),
        Err(e) => panic!("{id} not re-adopted ({e}):\n{}", manager.log()),
    }
}

async fn panic_in(hook: &str, message: &str) {
    fault_ends_the_daemon_and_the_vm_survives(
        hook,
        PANIC_EXIT,
        &[
            &format!("panic: {message}"),
            "testhooks.rs:",
            "VMs keep running",
        ],
    )
    .await;
}

async fn stop_of(hook: &str, actor: &str) {
    fault_ends_the_daemon_and_the_vm_survives(
        hook,
        ACTOR_STOPPED_EXIT,
        &[&format!("essential actor {actor} stopped")],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_supervisor_ends_the_daemon() {
    panic_in("panic:supervisor", "test hook: panic in Supervisor").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_zombie_reaper_ends_the_daemon() {
    panic_in("panic:reaper", "test hook: panic in ZombieReaper").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_port_allocator_ends_the_daemon() {
    panic_in("panic:ports", "test hook: panic in PortAllocator").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_measurer_thread_ends_the_daemon() {
    panic_in("panic:measurer", "test hook: panic in Measurer").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_a_cvm_actor_ends_the_daemon() {
    panic_in("panic:cvm", "test hook: panic in CvmActor").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_a_task_of_the_front_runtime_ends_the_daemon() {
    panic_in(
        "panic:task",
        "test hook: panic in a tokio task of the front's runtime",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_on_the_blocking_pool_ends_the_daemon() {
    panic_in(
        "panic:blocking",
        "test hook: panic on tokio's blocking pool",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_on_a_plain_thread_ends_the_daemon() {
    panic_in("panic:thread", "test hook: panic on a plain thread").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_log_writer_ends_the_daemon_and_is_still_logged() {
    // That thread cannot log through itself: the line goes to stderr directly.
    fault_ends_the_daemon_and_the_vm_survives(
        "panic:log-writer",
        PANIC_EXIT,
        &[
            "panic in thread 'cocos-log-writer'",
            "test hook: panic in the log writer",
            "testhooks.rs:",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_supervisor_ends_the_daemon() {
    stop_of("stop:supervisor", "Supervisor").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_zombie_reaper_ends_the_daemon() {
    stop_of("stop:reaper", "ZombieReaper").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_port_allocator_ends_the_daemon() {
    stop_of("stop:ports", "PortAllocator").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_measurer_ends_the_daemon() {
    stop_of("stop:measurer", "Measurer").await;
}

/// The datagrams that arrive on `socket` until `until` holds or `limit`
/// passes; `until` sees everything received so far.
fn receive(
    socket: &UnixDatagram,
    limit: Duration,
    mut until: impl FnMut(&[String]) -> bool,
) -> Vec<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline && !until(&got) {
        if let Ok(n) = socket.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    got
}

fn pings(messages: &[String]) -> usize {
    messages
        .iter()
        .filter(|m| m.lines().any(|l| l == "WATCHDOG=1"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wedged_supervisor_stops_the_watchdog_pings() {
    const WATCHDOG: Duration = Duration::from_millis(400);
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("notify socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    let usec = WATCHDOG.as_micros().to_string();
    let path_text = path.to_string_lossy().into_owned();
    let mut manager = start_hooked(
        "wedge:supervisor",
        &[("NOTIFY_SOCKET", &path_text), ("WATCHDOG_USEC", &usec)],
    );
    let mut client = manager.client().await;
    let (id, _) = create(&mut client).await;
    let qemu = qemu_pid(&id).await;

    // Pings come, again and again, every WATCHDOG/2.
    let got = receive(&socket, Duration::from_secs(15), |got| pings(got) >= 5);
    assert!(
        pings(&got) >= 5,
        "fewer than 5 WATCHDOG=1 in 15 s: {got:?}\n{}",
        manager.log()
    );
    assert!(got.iter().any(|m| m == "READY=1"), "{got:?}");

    signal(&manager, Signal::SIGUSR1);
    let wedged = || {
        manager
            .log()
            .contains("the supervisor stops handling messages")
    };
    assert!(
        eventually(Duration::from_secs(10), wedged).await,
        "{}",
        manager.log()
    );
    // A round trip finished just before the wedge may still ping once; then
    // none for two whole watchdog intervals (systemd would have fired).
    receive(&socket, WATCHDOG / 2, |_| false);
    let after = receive(&socket, WATCHDOG * 2, |got| pings(got) > 0);
    assert_eq!(
        pings(&after),
        0,
        "pings went on with a wedged supervisor: {after:?}\n{}",
        manager.log()
    );
    // The loop itself runs on: it is the round trip that fails.
    let missed = || {
        manager
            .log()
            .contains("the supervisor did not answer a ping in time")
    };
    assert!(
        eventually(Duration::from_secs(10), missed).await,
        "{}",
        manager.log()
    );

    // What systemd does next: kill it, start a new manager, which re-adopts.
    manager.stop_with(Signal::SIGKILL, Duration::from_secs(10));
    assert!(
        process_exists(qemu) && !is_zombie(qemu),
        "the VM keeps running"
    );
    for k in ["COCOS_TEST_HOOK", "NOTIFY_SOCKET", "WATCHDOG_USEC"] {
        manager.env.remove(k);
    }
    manager.spawn();
    let mut client = manager.client().await;
    readopted(&manager, &mut client, &id).await;
    assert_eq!(pids_matching(&id), vec![qemu]);
    client
        .remove_vm(RemoveReq { cvm_id: id })
        .await
        .expect("RemoveVm");
    assert_nothing_left(&manager).await;
}

#[test]
fn only_the_test_hook_build_has_the_hooks() {
    let version = |bin: &Path| {
        let out = Command::new(bin).arg("--version").output().expect("run");
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let normal = version(&manager_binary());
    assert!(
        !normal.contains("test hooks"),
        "target/<profile>/cocos-manager was built with the test-hooks feature: {normal}"
    );
    let hooked = version(&hooks_binary());
    assert!(hooked.contains("(test hooks)"), "{hooked}");
}

#[test]
fn qemu_through_sudo_is_refused_at_start_naming_the_alternative() {
    let state = tempfile::tempdir().expect("dir");
    let mut cmd = Command::new(manager_binary());
    cmd.arg("--config")
        .arg(repo_root().join("config/dev.toml"))
        .current_dir(repo_root())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("MANAGER_STATE_DIR", state.path().join("state"))
        .env("MANAGER_QEMU_USE_SUDO", "true");
    let out = cmd.output().expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    for text in [
        "MANAGER_QEMU_USE_SUDO",
        "not supported",
        "run the manager as root",
        "MANAGER_QEMU_USER",
    ] {
        assert!(stderr.contains(text), "{text:?} missing: {stderr}");
    }
    assert!(
        !state.path().join("state/vms").exists(),
        "nothing is started"
    );
}
