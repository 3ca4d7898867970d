//! Per-VM cgroups, the effects: each VM's QEMU and swtpm in
//! `<manager's cgroup>/cocos-vm-<id>` in the cpu, memory and pids
//! controllers (and cpuacct on cgroup v1, for CPU usage), with the limits
//! `cocos_core::cgroup::limits` computes; the group is made before the VM's
//! first process, kept across its restarts, found again by its name after
//! a manager restart and removed with the VM. cgroup v1 and v2 both go
//! through the `cgroups-rs` crate.
//!
//! Processes are moved in right after they are spawned (the reaper returns
//! the pid; fork and exec stay the reaper's), before QEMU answers on its
//! control socket: what QEMU allocated before the move (its first few MiB)
//! stays charged to the manager's cgroup, everything after (the rest of its
//! start-up, the guest's memory) to the VM's.
//!
//! The file system work is a handful of small reads and writes; callers run
//! `prepare` and `remove` (mkdir, rmdir with retries) off the actor thread.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use cgroups_rs::fs::cpu::CpuController;
use cgroups_rs::fs::hierarchies::{is_cgroup2_unified_mode, UNIFIED_MOUNTPOINT, V1, V2};
use cgroups_rs::fs::memory::MemController;
use cgroups_rs::fs::pid::PidController;
use cgroups_rs::fs::{Cgroup, Controllers, Hierarchy, MaxValue, Subsystem};
use cgroups_rs::CgroupPid;
use cocos_core::cgroup::{self as pure, CgroupMode, Limits, Usage};
use cocos_core::config::Config;
use tracing::{debug, error, info, warn};

/// What the host offers, found the first time per-VM cgroups are asked for
/// with `MANAGER_CGROUPS=auto`; `Err` says why they are not used.
static HOST: OnceLock<Result<Host, String>> = OnceLock::new();

/// The VMs whose groups this manager made (with their limits) or found
/// again (limits as found): for metrics, and so that only they get
/// processes moved in.
static GROUPS: Mutex<BTreeMap<String, Option<Limits>>> = Mutex::new(BTreeMap::new());

enum Host {
    V1 {
        hierarchy: Only,
        /// Controller → the manager's own cgroup, relative to the root of
        /// the controller's mount.
        relative: HashMap<String, String>,
        /// Controller → the directory the VMs' groups are made in.
        bases: BTreeMap<String, PathBuf>,
    },
    V2 {
        /// The VMs' groups' parent, relative to the unified mount.
        base: String,
    },
}

impl Host {
    fn version(&self) -> &'static str {
        match self {
            Host::V1 { .. } => "v1",
            Host::V2 { .. } => "v2",
        }
    }

    /// The directories the VMs' groups are made in.
    fn base_dirs(&self) -> Vec<PathBuf> {
        match self {
            Host::V1 { bases, .. } => bases.values().cloned().collect(),
            Host::V2 { base } => vec![Path::new(UNIFIED_MOUNTPOINT).join(base)],
        }
    }

    /// A VM's group (which may not exist yet).
    fn group(&self, id: &str) -> Cgroup {
        match self {
            Host::V1 {
                hierarchy,
                relative,
                ..
            } => Cgroup::load_with_relative_paths(
                Box::new(hierarchy.clone()),
                pure::group_name(id),
                relative.clone(),
            ),
            Host::V2 { base } => Cgroup::load_with_specified_controllers(
                Box::new(V2::new()),
                pure::join(base, &pure::group_name(id)),
                pure::CONTROLLERS.iter().map(|c| c.to_string()).collect(),
            ),
        }
    }
}

/// The v1 hierarchy with only the controllers the VMs' groups use (the
/// crate's own would make the group in every mounted one).
#[derive(Debug, Clone)]
struct Only(V1);

impl Only {
    fn wanted(subsystem: &Subsystem) -> bool {
        matches!(
            subsystem,
            Subsystem::Cpu(_) | Subsystem::CpuAcct(_) | Subsystem::Mem(_) | Subsystem::Pid(_)
        )
    }
}

impl Hierarchy for Only {
    fn subsystems(&self) -> Vec<Subsystem> {
        self.0
            .subsystems()
            .into_iter()
            .filter(Only::wanted)
            .collect()
    }
    fn root(&self) -> PathBuf {
        self.0.root()
    }
    fn root_control_group(&self) -> Cgroup {
        self.0.root_control_group()
    }
    fn parent_control_group(&self, path: &str) -> Cgroup {
        self.0.parent_control_group(path)
    }
    fn v2(&self) -> bool {
        false
    }
}

/// A crate error in words: what failed and the system's reason.
fn why(e: &cgroups_rs::fs::error::Error) -> String {
    match std::error::Error::source(e) {
        Some(cause) => format!("{}: {cause}", e.kind()),
        None => e.kind().to_string(),
    }
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn writable(dir: &Path) -> Result<(), String> {
    nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK)
        .map_err(|e| format!("{} is not writable: {e}", dir.display()))
}

fn detect() -> Result<Host, String> {
    let own = pure::parse_proc_cgroup(&read(Path::new("/proc/self/cgroup"))?);
    if is_cgroup2_unified_mode() {
        return detect_v2(&own);
    }
    let v1 = V1::new();
    let mut relative = HashMap::new();
    let mut bases = BTreeMap::new();
    for (name, controller) in [
        ("cpu", Controllers::Cpu),
        ("memory", Controllers::Mem),
        ("pids", Controllers::Pids),
        ("cpuacct", Controllers::CpuAcct),
    ] {
        let required = name != "cpuacct";
        let found = (|| {
            let (point, root) = v1
                .get_mount_point(controller)
                .ok_or_else(|| format!("the {name} controller is not mounted"))?;
            let path = own
                .v1
                .get(name)
                .ok_or_else(|| format!("/proc/self/cgroup names no {name} cgroup"))?;
            let rel = pure::relative_to_mount(path, &root.to_string_lossy()).ok_or_else(|| {
                format!(
                    "the manager's {name} cgroup {path} is outside its mount ({})",
                    root.display()
                )
            })?;
            let base = point.join(&rel);
            writable(&base)?;
            Ok::<_, String>((rel, base))
        })();
        match found {
            Ok((rel, base)) => {
                relative.insert(name.to_string(), rel);
                bases.insert(name.to_string(), base);
            }
            Err(e) if required => return Err(e),
            Err(e) => debug!(reason = %e, "no cpuacct controller: per-VM CPU use is not reported"),
        }
    }
    Ok(Host::V1 {
        hierarchy: Only(v1),
        relative,
        bases,
    })
}

/// cgroup v2: the VMs' groups are siblings of the manager's own leaf
/// (`manager`) in the cgroup it was given (systemd: `Delegate=yes` and
/// `DelegateSubgroup=manager`), or children of the root cgroup.
fn detect_v2(own: &pure::ProcCgroups) -> Result<Host, String> {
    let unified = own
        .unified
        .as_deref()
        .ok_or("/proc/self/cgroup names no cgroup v2 path")?;
    let base = pure::v2_base(unified).ok_or_else(|| {
        format!(
            "cgroup v2: the manager lives in {unified}, not in a leaf named {:?} of a cgroup \
             delegated to it (systemd: Delegate=yes and DelegateSubgroup={0}, systemd 254 or later)",
            pure::MANAGER_LEAF
        )
    })?;
    let base_dir = Path::new(UNIFIED_MOUNTPOINT).join(&base);
    let offered = read(&base_dir.join("cgroup.controllers"))?;
    let missing: Vec<_> = pure::CONTROLLERS
        .iter()
        .filter(|c| !offered.split_whitespace().any(|o| o == **c))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "the controllers {missing:?} are not available in {} (systemd: Delegate=yes in the unit)",
            base_dir.display()
        ));
    }
    writable(&base_dir)?;
    let subtree = base_dir.join("cgroup.subtree_control");
    let enabled = read(&subtree)?;
    if !pure::CONTROLLERS
        .iter()
        .all(|c| enabled.split_whitespace().any(|o| o == *c))
    {
        // The VMs' groups get the controllers from their parent.
        let line = pure::CONTROLLERS
            .iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(" ");
        std::fs::write(&subtree, &line)
            .map_err(|e| format!("cannot enable {line} in {}: {e}", subtree.display()))?;
    }
    Ok(Host::V2 { base })
}

/// The host's cgroups when per-VM cgroups are to be used: `None` with
/// `MANAGER_CGROUPS=off`, or (after one warning) when they cannot be.
fn host(config: &Config) -> Option<&'static Host> {
    if config.cgroups == CgroupMode::Off {
        return None;
    }
    let found = HOST.get_or_init(|| {
        let found = detect();
        match &found {
            Ok(host) => info!(
                version = host.version(),
                parents = ?host.base_dirs(),
                "per-VM cgroups: each VM's QEMU and swtpm in cocos-vm-<id> below these"
            ),
            Err(reason) => warn!(
                %reason,
                "per-VM cgroups are not used (MANAGER_CGROUPS=auto): VMs run without memory, CPU and pids limits"
            ),
        }
        found
    });
    found.as_ref().ok()
}

/// The host's cgroups if they were ever found usable in this process.
fn known_host() -> Option<&'static Host> {
    HOST.get().and_then(|h| h.as_ref().ok())
}

fn registered(id: &str) -> bool {
    GROUPS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains_key(id)
}

/// The limits this manager gave the VM's group, if it made it.
fn limits_of(id: &str) -> Option<Limits> {
    GROUPS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(id)
        .copied()
        .flatten()
}

fn register(id: &str, limits: Option<Limits>) {
    GROUPS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id.to_string(), limits);
}

fn unregister(id: &str) {
    GROUPS.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
}

/// Makes the group's directories and writes its limits.
fn make(host: &Host, id: &str, limits: &Limits) -> Result<(), String> {
    let cg = host.group(id);
    let fail = |what: &str, e: cgroups_rs::fs::error::Error| {
        format!(
            "cannot {what} of the VM's cgroup {} ({}): {}",
            pure::group_name(id),
            host.version(),
            why(&e)
        )
    };
    cg.create().map_err(|e| fail("make the directories", e))?;
    let memory: &MemController = cg.controller_of().ok_or("no memory controller")?;
    memory
        .set_limit(i64::try_from(limits.memory_bytes).unwrap_or(i64::MAX))
        .map_err(|e| fail("set the memory limit", e))?;
    let cpu: &CpuController = cg.controller_of().ok_or("no cpu controller")?;
    cpu.set_cfs_quota_and_period(
        Some(i64::try_from(limits.cpu_quota_us).unwrap_or(i64::MAX)),
        Some(limits.cpu_period_us),
    )
    .map_err(|e| fail("set the CPU quota", e))?;
    let pids: &PidController = cg.controller_of().ok_or("no pids controller")?;
    let max = limits.pids_max.map_or(MaxValue::Max, |n| {
        MaxValue::Value(i64::try_from(n).unwrap_or(i64::MAX))
    });
    pids.set_pid_max(max)
        .map_err(|e| fail("set the pids limit", e))
}

fn complete(cg: &Cgroup) -> bool {
    cg.subsystems().iter().all(|s| s.to_controller().exists())
}

/// Makes the VM's group with its limits, unless it exists already (a
/// restart keeps the group and its limits). `Ok(None)`: the VM runs
/// without a group (`MANAGER_CGROUPS=off`, or none usable). Blocking.
pub fn prepare(config: &Config, id: &str) -> Result<Option<Limits>, String> {
    let Some(host) = host(config) else {
        return Ok(None);
    };
    if registered(id) && complete(&host.group(id)) {
        debug!(vm = %id, "VM cgroup exists already; it keeps its limits");
        return Ok(limits_of(id));
    }
    let limits = limits_of(id).unwrap_or_else(|| pure::limits(config));
    // Registered first: a group half made is removed with the VM.
    register(id, Some(limits));
    make(host, id, &limits)?;
    info!(vm = %id, cgroup = %pure::group_name(id), %limits, "VM cgroup made");
    Ok(Some(limits))
}

/// Moves process `pid` (QEMU or the swtpm, just spawned) into the VM's
/// group, when the VM has one. A group found missing (an empty group may
/// be swept by another manager starting on the same cgroup) is made again
/// first. A process that is already gone is not an error here: its exit is
/// reported as usual.
pub fn attach(id: &str, pid: i32) -> Result<(), String> {
    let Some(host) = known_host().filter(|_| registered(id)) else {
        return Ok(());
    };
    let cg = host.group(id);
    let mut result = cg.add_task_by_tgid(CgroupPid::from(pid as u64));
    if result.is_err() && !complete(&cg) {
        if let Some(limits) = limits_of(id) {
            warn!(vm = %id, "the VM's cgroup went missing; making it again");
            make(host, id, &limits)?;
            result = cg.add_task_by_tgid(CgroupPid::from(pid as u64));
        }
    }
    let Err(e) = result else { return Ok(()) };
    let gone = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z')))
        .unwrap_or(true);
    if gone {
        return Ok(());
    }
    Err(format!(
        "cannot move process {pid} into the VM's cgroup {}: {}",
        pure::group_name(id),
        why(&e)
    ))
}

/// Finds a re-adopted VM's group again by its name; says what became of it.
pub fn adopt(config: &Config, id: &str) -> &'static str {
    let Some(host) = host(config) else {
        return "none";
    };
    if host.group(id).exists() {
        register(id, None);
        "found"
    } else {
        warn!(vm = %id, "the re-adopted VM has no cgroup; it runs without limits until it restarts");
        "missing"
    }
}

/// Removes the VM's group, once its processes are gone (a process still in
/// it keeps it; the kernel may also report a group busy for a moment after
/// its last process exited, so this retries for up to two seconds).
/// Blocking. Errors are logged.
pub fn remove(id: &str) {
    unregister(id);
    let Some(host) = known_host() else { return };
    let cg = host.group(id);
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        if !cg.exists() {
            return;
        }
        match cg.delete() {
            Ok(()) if !cg.exists() => {
                debug!(vm = %id, "VM cgroup removed");
                return;
            }
            Ok(()) => {}
            Err(e) if Instant::now() >= deadline => {
                let left: Vec<u64> = cg.procs().iter().map(|p| p.pid).collect();
                error!(vm = %id, cgroup = %pure::group_name(id), processes = ?left, error = %why(&e), "cannot remove the VM's cgroup");
                return;
            }
            Err(_) => {}
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn read_u64(path: PathBuf) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn controller_dir(cg: &Cgroup, wanted: fn(&Subsystem) -> bool) -> Option<PathBuf> {
    cg.subsystems()
        .iter()
        .find(|s| wanted(s))
        .map(|s| s.to_controller().path().to_path_buf())
}

/// What the VM's group has used so far; `None` when it has no group.
pub fn usage(id: &str) -> Option<Usage> {
    let host = known_host().filter(|_| registered(id))?;
    let cg = host.group(id);
    let memory = controller_dir(&cg, |s| matches!(s, Subsystem::Mem(_)));
    let pids = controller_dir(&cg, |s| matches!(s, Subsystem::Pid(_)));
    let (memory_bytes, cpu_seconds) = match host {
        Host::V1 { .. } => (
            memory.and_then(|d| read_u64(d.join("memory.usage_in_bytes"))),
            controller_dir(&cg, |s| matches!(s, Subsystem::CpuAcct(_)))
                .and_then(|d| read_u64(d.join("cpuacct.usage")))
                .map(|ns| ns as f64 / 1e9),
        ),
        Host::V2 { .. } => (
            memory
                .as_ref()
                .and_then(|d| read_u64(d.join("memory.current"))),
            memory
                .and_then(|d| std::fs::read_to_string(d.join("cpu.stat")).ok())
                .and_then(|text| pure::keyed_value(&text, "usage_usec"))
                .map(|us| us as f64 / 1e6),
        ),
    };
    Some(Usage {
        memory_bytes,
        cpu_seconds,
        pids: pids.and_then(|d| read_u64(d.join("pids.current"))),
    })
}

/// The VM's use in words, for logs.
pub fn usage_text(id: &str) -> String {
    usage(id).map_or_else(|| "no cgroup".to_string(), |u| u.to_string())
}

/// How many times the kernel's OOM killer acted in the VM's group.
pub fn oom_kills(id: &str) -> Option<u64> {
    let host = known_host().filter(|_| registered(id))?;
    let cg = host.group(id);
    let dir = controller_dir(&cg, |s| matches!(s, Subsystem::Mem(_)))?;
    let file = match host {
        Host::V1 { .. } => "memory.oom_control",
        Host::V2 { .. } => "memory.events",
    };
    pure::keyed_value(&std::fs::read_to_string(dir.join(file)).ok()?, "oom_kill")
}

/// For a QEMU killed by SIGKILL at start: why, when it was the VM's memory
/// limit (the kernel's OOM killer acted in its group).
pub fn oom_note(id: &str, killed: bool) -> Option<String> {
    if !killed || oom_kills(id).unwrap_or(0) == 0 {
        return None;
    }
    let host = known_host()?;
    let dir = controller_dir(&host.group(id), |s| matches!(s, Subsystem::Mem(_)))?;
    let limit = match host {
        Host::V1 { .. } => read_u64(dir.join("memory.limit_in_bytes")),
        Host::V2 { .. } => read_u64(dir.join("memory.max")),
    };
    let limit = limit.map_or_else(|| "?".to_string(), pure::format_bytes);
    Some(format!(
        "the VM's memory limit ({limit}, cgroup {}) was reached and the kernel's OOM killer ended QEMU; \
         raise MANAGER_CGROUP_MEMORY_LIMIT, or MANAGER_CGROUP_MEMORY_OVERHEAD when no explicit limit is set",
        pure::group_name(id)
    ))
}

/// Every VM group's use, by VM id (`/metrics`). Blocking: reads the
/// groups' files.
pub fn usages() -> Vec<(String, Usage)> {
    let ids: Vec<String> = GROUPS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .keys()
        .cloned()
        .collect();
    ids.into_iter()
        .filter_map(|id| usage(&id).map(|u| (id, u)))
        .collect()
}

/// Removes the groups of VMs that are gone: `cocos-vm-*` groups below the
/// manager's cgroup that no VM of this manager holds and no process is in
/// (after re-adoption, which waits for the processes no record accounts
/// for to die). Blocking.
fn sweep(host: &Host) {
    let mut ids = BTreeSet::new();
    let mut young = BTreeSet::new();
    for dir in host.base_dirs() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(id) = pure::id_of_group(&name) {
                // An empty group made moments ago may be another manager's
                // (one per state directory) about to move its QEMU in.
                let age = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok());
                if age.is_none_or(|age| age < SWEEP_MIN_AGE) {
                    young.insert(id.to_string());
                }
                ids.insert(id.to_string());
            }
        }
    }
    for id in ids {
        if registered(&id) || young.contains(&id) || !host.group(&id).procs().is_empty() {
            continue;
        }
        info!(vm = %id, cgroup = %pure::group_name(&id), "removing the cgroup of a VM that is gone");
        remove(&id);
    }
}

/// How old an empty VM group must be before the sweep at start removes it.
const SWEEP_MIN_AGE: std::time::Duration = std::time::Duration::from_secs(60);

/// At start, before the VMs left running are re-adopted (a VM found gone
/// then has its group removed with the rest of it): finds the host's
/// cgroups, or says once why they are not used.
pub async fn find_host(config: Arc<Config>) {
    if tokio::task::spawn_blocking(move || host(&config).is_some())
        .await
        .is_err()
    {
        error!("looking for the host's cgroups did not finish");
    }
}

/// At start, once the VMs left running are re-adopted: removes the groups
/// of VMs that are gone.
pub async fn start(config: Arc<Config>) {
    if config.cgroups == CgroupMode::Off {
        info!("per-VM cgroups are off (MANAGER_CGROUPS=off)");
        return;
    }
    let done = tokio::task::spawn_blocking(move || {
        if let Some(host) = host(&config) {
            sweep(host);
        }
    })
    .await;
    if let Err(e) = done {
        error!(error = %e, "looking for leftover VM cgroups did not finish");
    }
}
