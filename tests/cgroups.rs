//! End-to-end: per-VM cgroups (README: Per-VM cgroups). Each VM's QEMU and
//! swtpm live in `<manager's cgroup>/cocos-vm-<id>` in the cpu, memory and
//! pids controllers with the limits its configuration gives; the group goes
//! with the VM, is found again after a manager restart, and a limit too
//! small for QEMU fails the create and leaves nothing.
//!
//! The tests read the cgroup file system themselves (the manager's cgroup
//! from `/proc/<pid>/cgroup`, the mounts from `/proc/self/mountinfo`), so
//! they check what the kernel has, not what the manager believes. They need
//! the cpu, memory and pids controllers writable (cgroup v1 on the
//! development machine and CI; cgroup v2 with delegation works the same).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cocos_core::proto::{CreateReq, CvmInfoReq, RemoveReq};
use common::*;
use nix::sys::signal::Signal;
use tonic::Code;

const MIB: u64 = 1 << 20;
const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

/// Controller → the directory VMs' groups are made in, below the cgroup of
/// process `pid` (the manager).
fn group_parents(pid: i32) -> BTreeMap<String, PathBuf> {
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("/proc/<pid>/cgroup");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let mut parents = BTreeMap::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = left.split_whitespace().collect();
        let right: Vec<&str> = right.split_whitespace().collect();
        let (root, point) = (fields[3], fields[4]);
        match right[0] {
            "cgroup" => {
                let options: Vec<&str> = right[2].split(',').collect();
                for controller in CONTROLLERS.iter().chain(["cpuacct"].iter()) {
                    if !options.contains(controller) {
                        continue;
                    }
                    let path = own
                        .lines()
                        .find_map(|l| {
                            let mut parts = l.splitn(3, ':');
                            let _ = parts.next();
                            let list = parts.next()?;
                            let path = parts.next()?;
                            list.split(',').any(|c| c == *controller).then_some(path)
                        })
                        .expect("the manager's cgroup for the controller");
                    let rel = path
                        .strip_prefix(root.trim_end_matches('/'))
                        .unwrap_or(path)
                        .trim_matches('/');
                    parents.insert(controller.to_string(), Path::new(point).join(rel));
                }
            }
            "cgroup2" if point == "/sys/fs/cgroup" => {
                let path = own
                    .lines()
                    .find_map(|l| l.strip_prefix("0::"))
                    .expect("unified cgroup");
                let path = path.trim_matches('/');
                let base = match path.rsplit_once('/') {
                    Some((parent, "manager")) => parent,
                    _ if path == "manager" => "",
                    _ => path,
                };
                for controller in CONTROLLERS {
                    parents.insert(controller.to_string(), Path::new(point).join(base));
                }
            }
            _ => {}
        }
    }
    for controller in CONTROLLERS {
        assert!(
            parents.contains_key(controller),
            "these tests need the {controller} cgroup controller (found {parents:?})"
        );
    }
    parents
}

/// Controller → the VM's group directory.
fn groups(parents: &BTreeMap<String, PathBuf>, id: &str) -> BTreeMap<String, PathBuf> {
    parents
        .iter()
        .map(|(c, dir)| (c.clone(), dir.join(format!("cocos-vm-{id}"))))
        .collect()
}

fn v2(dir: &Path) -> bool {
    dir.join("cgroup.controllers").exists()
}

fn read(path: PathBuf) -> String {
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_string()
}

fn procs(dir: &Path) -> Vec<i32> {
    read(dir.join("cgroup.procs"))
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

struct Expected {
    memory: u64,
    cpu_quota: u64,
    pids: u64,
}

fn assert_limits(groups: &BTreeMap<String, PathBuf>, want: &Expected) {
    let memory = &groups["memory"];
    let cpu = &groups["cpu"];
    let pids = &groups["pids"];
    if v2(memory) {
        assert_eq!(read(memory.join("memory.max")), want.memory.to_string());
        assert_eq!(
            read(cpu.join("cpu.max")),
            format!("{} 100000", want.cpu_quota)
        );
    } else {
        assert_eq!(
            read(memory.join("memory.limit_in_bytes")),
            want.memory.to_string()
        );
        assert_eq!(
            read(cpu.join("cpu.cfs_quota_us")),
            want.cpu_quota.to_string()
        );
        assert_eq!(read(cpu.join("cpu.cfs_period_us")), "100000");
    }
    assert_eq!(read(pids.join("pids.max")), want.pids.to_string());
}

/// Every one of `pids` is in the group in each controller.
fn assert_members(groups: &BTreeMap<String, PathBuf>, pids: &[i32]) {
    for (controller, dir) in groups {
        let members = procs(dir);
        for pid in pids {
            assert!(
                members.contains(pid),
                "process {pid} is not in the VM's {controller} group {}: {members:?}",
                dir.display()
            );
        }
    }
}

async fn gone(groups: &BTreeMap<String, PathBuf>) -> bool {
    eventually(Duration::from_secs(10), || {
        groups.values().all(|d| !d.exists())
    })
    .await
}

async fn metrics(manager: &Manager) -> String {
    let port = manager.http_port;
    let (status, body) = tokio::task::spawn_blocking(move || http_get(port, "/metrics"))
        .await
        .expect("join")
        .expect("GET /metrics");
    assert_eq!(status, 200);
    body
}

/// The value of a series for VM `id` in the metrics text.
fn series(text: &str, name: &str, id: &str) -> Option<f64> {
    let prefix = format!("{name}{{vm=\"{id}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.parse().ok())
}

fn swtpm_of(manager: &Manager, id: &str) -> Vec<i32> {
    swtpm_pids_matching(&manager.vms_dir().join(id).to_string_lossy())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_runs_in_its_own_cgroup_with_limits_from_its_configuration() {
    // The development profile: 512M of guest memory, one vCPU, a swtpm.
    let manager = Manager::start(&[]);
    let parents = group_parents(manager.pid());
    let mut client = manager.client().await;
    let (id, port) = create(&mut client).await;
    let groups = groups(&parents, &id);

    // 512 MiB + 256 MiB + 2 % of 512 MiB (10.24 MiB), rounded up to a MiB;
    // MANAGER_QEMU_SMP_COUNT = 1 core; 1024 pids.
    assert_limits(
        &groups,
        &Expected {
            memory: 779 * MIB,
            cpu_quota: 100_000,
            pids: 1024,
        },
    );
    let qemu = qemu_pid(&id).await;
    let swtpm = swtpm_of(&manager, &id);
    assert_eq!(swtpm.len(), 1, "one swtpm for the VM");
    assert_members(&groups, &[qemu, swtpm[0]]);
    if let Some(acct) = groups.get("cpuacct") {
        assert_members(
            &BTreeMap::from([("cpuacct".to_string(), acct.clone())]),
            &[qemu],
        );
    }

    // The guest boots within its limits, and its use is reported.
    agent_ok(port).await;
    let text = metrics(&manager).await;
    let memory = series(&text, "cocos_manager_vm_memory_bytes", &id)
        .unwrap_or_else(|| panic!("no memory series for {id}:\n{text}"));
    assert!(
        memory > 32.0 * MIB as f64 && memory <= (779 * MIB) as f64,
        "memory {memory}"
    );
    let cpu = series(&text, "cocos_manager_vm_cpu_seconds_total", &id)
        .unwrap_or_else(|| panic!("no CPU series for {id}:\n{text}"));
    assert!(cpu > 0.0, "cpu {cpu}");
    info(&mut client, &id).await;
    assert!(
        eventually(Duration::from_secs(5), || manager.log().lines().any(|l| {
            l.contains("CVMInfo")
                && l.contains(&id)
                && l.contains("memory ")
                && l.contains(" bytes, cpu ")
        }))
        .await,
        "no CVMInfo log line with the VM's use:\n{}",
        manager.log()
    );

    client
        .remove_vm(RemoveReq { cvm_id: id.clone() })
        .await
        .expect("RemoveVm");
    assert!(
        gone(&groups).await,
        "the VM's cgroup outlived it: {groups:?}"
    );
    let text = metrics(&manager).await;
    assert!(
        series(&text, "cocos_manager_vm_memory_bytes", &id).is_none(),
        "{text}"
    );
    assert_nothing_left(&manager).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_cgroup_is_found_again_after_a_manager_restart_and_goes_with_the_vm() {
    let mut manager = Manager::start(&[
        ("MANAGER_CGROUP_MEMORY_OVERHEAD", "128M"),
        ("MANAGER_CGROUP_MEMORY_OVERHEAD_PERCENT", "0"),
        ("MANAGER_CGROUP_CPUS", "1.5"),
        ("MANAGER_CGROUP_PIDS_MAX", "300"),
    ]);
    let parents = group_parents(manager.pid());
    let mut client = manager.client().await;
    let (id, port) = create(&mut client).await;
    let groups = groups(&parents, &id);
    let limits = Expected {
        memory: 640 * MIB,
        cpu_quota: 150_000,
        pids: 300,
    };
    assert_limits(&groups, &limits);
    let qemu = qemu_pid(&id).await;
    let swtpm = swtpm_of(&manager, &id);
    assert_members(&groups, &[qemu, swtpm[0]]);

    manager.stop_with(Signal::SIGKILL, Duration::from_secs(10));
    assert!(process_exists(qemu), "the VM must outlive the manager");
    // A group left by a VM that is gone (no process in it, no VM of the
    // manager's) is removed at start.
    let stale = groups_of_new_id(&parents);
    let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
    for dir in stale.values() {
        std::fs::create_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        std::fs::File::open(dir)
            .and_then(|f| f.set_modified(two_hours_ago))
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    }
    // An empty group made moments ago may be another manager's, about to
    // take its QEMU: left alone.
    let fresh = groups_of_new_id(&parents);
    for dir in fresh.values() {
        std::fs::create_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    }
    manager.spawn();
    let mut client = manager.client().await;
    info(&mut client, &id).await;
    assert!(
        manager.log().lines().any(|l| l.contains("re-adopted VM")
            && l.contains(&id)
            && l.contains("cgroup=\"found\"")),
        "the VM's cgroup was not found again:\n{}",
        manager.log()
    );
    assert!(
        gone(&stale).await,
        "a gone VM's cgroup was left: {stale:?}\n{}",
        manager.log()
    );
    assert!(
        fresh.values().all(|dir| dir.exists()),
        "a group made moments ago was removed: {fresh:?}"
    );
    for dir in fresh.values() {
        std::fs::remove_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    }
    assert_limits(&groups, &limits);
    assert_members(&groups, &[qemu, swtpm[0]]);
    // Still reported after the restart.
    let text = metrics(&manager).await;
    assert!(
        series(&text, "cocos_manager_vm_memory_bytes", &id).is_some(),
        "{text}"
    );
    agent_ok(port).await;

    client
        .remove_vm(RemoveReq { cvm_id: id.clone() })
        .await
        .expect("RemoveVm");
    assert!(
        gone(&groups).await,
        "the VM's cgroup outlived it: {groups:?}"
    );
    assert_nothing_left(&manager).await;
}

fn groups_of_new_id(parents: &BTreeMap<String, PathBuf>) -> BTreeMap<String, PathBuf> {
    groups(parents, &uuid::Uuid::new_v4().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_limit_below_qemus_own_footprint_fails_the_create_and_leaves_nothing() {
    // QEMU alone needs more than 16 MiB within its first few hundred
    // milliseconds (the guest's 512M come on top), so the kernel's OOM
    // killer ends it before it answers on its control socket.
    let manager = Manager::start(&[("MANAGER_CGROUP_MEMORY_LIMIT", "16M")]);
    let parents = group_parents(manager.pid());
    let mut client = manager.client().await;
    let err = client
        .create_vm(CreateReq::default())
        .await
        .expect_err("a create whose QEMU cannot fit its memory limit");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let message = err.message();
    assert!(
        message.contains("memory limit (16 MiB") && message.contains("OOM killer"),
        "the error does not say why: {message}"
    );
    assert!(message.contains("MANAGER_CGROUP_MEMORY_LIMIT"), "{message}");
    // Its group was made (the log names the VM) and is gone again.
    let log = manager.log();
    let id = log
        .lines()
        .find(|l| l.contains("VM cgroup made"))
        .and_then(|l| l.split("vm=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no cgroup was made:\n{log}"))
        .to_string();
    let groups = groups(&parents, &id);
    assert!(
        gone(&groups).await,
        "a failed VM's cgroup was left: {groups:?}"
    );
    assert_nothing_left(&manager).await;
    let text = metrics(&manager).await;
    assert!(
        series(&text, "cocos_manager_vm_memory_bytes", &id).is_none(),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_gone_while_the_manager_was_down_has_its_cgroup_removed_at_start() {
    // The stand-in (no real guest): its "QEMU" is in a group like any other.
    let range = free_port_range(2);
    let mut manager = start_on_stand_in(range, &[]);
    let parents = group_parents(manager.pid());
    let mut client = manager.client().await;
    let (id, _) = create(&mut client).await;
    let groups = groups(&parents, &id);
    let pid = qemu_pid(&id).await;
    assert_members(&groups, &[pid]);
    manager.stop_with(Signal::SIGKILL, Duration::from_secs(10));
    kill9(pid);
    assert!(eventually(Duration::from_secs(10), || !process_exists(pid)).await);
    manager.spawn();
    let mut client = manager.client().await;
    let err = client
        .cvm_info(CvmInfoReq { id: id.clone() })
        .await
        .expect_err("the VM is gone");
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        gone(&groups).await,
        "a gone VM's cgroup was left: {groups:?}"
    );
    assert_nothing_left(&manager).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_cgroups_off_a_vm_gets_no_group() {
    let range = free_port_range(2);
    let manager = start_on_stand_in(range, &[("MANAGER_CGROUPS", "off")]);
    let parents = group_parents(manager.pid());
    let mut client = manager.client().await;
    let (id, _) = create(&mut client).await;
    qemu_pid(&id).await;
    let groups = groups(&parents, &id);
    assert!(groups.values().all(|d| !d.exists()), "{groups:?}");
    assert!(manager.log().contains("per-VM cgroups are off"));
    let text = metrics(&manager).await;
    assert!(
        series(&text, "cocos_manager_vm_memory_bytes", &id).is_none(),
        "{text}"
    );
    client
        .remove_vm(RemoveReq { cvm_id: id.clone() })
        .await
        .expect("RemoveVm");
    assert_nothing_left(&manager).await;
}
