//! Per-VM cgroups, the pure part: the limits a VM's cgroup gets from its
//! configuration, the group's name, where it goes below the manager's own
//! cgroup (read from `/proc/self/cgroup`), and the reading of the kernel's
//! usage files. The daemon's `cgroups` module does the file system work.
//!
//! The limits (README, "Per-VM cgroups"):
//!
//! - memory: `MANAGER_CGROUP_MEMORY_LIMIT` when set (not 0), else the guest's
//!   memory (`MANAGER_QEMU_MEMORY_SIZE`) plus `MANAGER_CGROUP_MEMORY_OVERHEAD`
//!   (256 MiB) plus `MANAGER_CGROUP_MEMORY_OVERHEAD_PERCENT` (2 %) of the
//!   guest's memory, rounded up to a whole MiB: 2048M → 2345 MiB, 512M → 779 MiB;
//! - CPU: `MANAGER_CGROUP_CPUS` cores when set (not 0), else
//!   `MANAGER_QEMU_SMP_COUNT`, as a CFS quota per 100 ms period
//!   (`cpu.cfs_quota_us`/`cpu.cfs_period_us` on cgroup v1, `cpu.max` on v2);
//! - pids: `MANAGER_CGROUP_PIDS_MAX` (1024; 0 = no limit), threads included.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::config::Config;

/// A VM's group is `<manager's cgroup>/cocos-vm-<id>` in each controller.
pub const GROUP_PREFIX: &str = "cocos-vm-";

/// On cgroup v2 the manager itself lives in this leaf below its delegated
/// cgroup (the VMs' groups are its siblings): a cgroup with processes
/// cannot hand controllers to its children. systemd's
/// `DelegateSubgroup=manager` starts it there.
pub const MANAGER_LEAF: &str = "manager";

/// The CFS period the CPU quota is expressed in, in microseconds.
pub const CPU_PERIOD_US: u64 = 100_000;

/// The kernel's smallest CFS quota (1 ms).
const MIN_CPU_QUOTA_US: u64 = 1_000;

const MIB: u64 = 1 << 20;

/// The controllers every VM's group is made in (`cpuacct` too on cgroup v1,
/// when it is mounted, for CPU usage only).
pub const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

/// `MANAGER_CGROUPS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupMode {
    /// Use per-VM cgroups when the cpu, memory and pids controllers are
    /// there and writable; warn once and go on without them otherwise.
    Auto,
    Off,
}

impl FromStr for CgroupMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim() {
            "auto" => Ok(CgroupMode::Auto),
            "off" => Ok(CgroupMode::Off),
            other => Err(format!("{other:?} is not one of: auto, off")),
        }
    }
}

impl fmt::Display for CgroupMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CgroupMode::Auto => "auto",
            CgroupMode::Off => "off",
        })
    }
}

/// `MANAGER_CGROUP_CPUS`: a number of cores (fractions allowed), or `None`
/// (written `0`) for the VM's own `MANAGER_QEMU_SMP_COUNT`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CgroupCpus(pub Option<f64>);

impl FromStr for CgroupCpus {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(CgroupCpus(None));
        }
        let cores: f64 = text.parse().map_err(|_| {
            "expected a number of cores such as 2 or 1.5 (0 = MANAGER_QEMU_SMP_COUNT)"
        })?;
        if !cores.is_finite() || cores < 0.0 {
            return Err("expected a number of cores, 0 or more".into());
        }
        if cores == 0.0 {
            return Ok(CgroupCpus(None));
        }
        if cores * (CPU_PERIOD_US as f64) < MIN_CPU_QUOTA_US as f64 {
            return Err("must be at least 0.01 (the kernel's smallest quota)".into());
        }
        if cores > 100_000.0 {
            return Err("too many cores".into());
        }
        Ok(CgroupCpus(Some(cores)))
    }
}

impl fmt::Display for CgroupCpus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => f.write_str("0"),
            Some(cores) => write!(f, "{cores}"),
        }
    }
}

/// What a VM's cgroup is limited to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `memory.limit_in_bytes` (v1) / `memory.max` (v2).
    pub memory_bytes: u64,
    /// `cpu.cfs_quota_us` (v1) / the first field of `cpu.max` (v2).
    pub cpu_quota_us: u64,
    /// `cpu.cfs_period_us` (v1) / the second field of `cpu.max` (v2).
    pub cpu_period_us: u64,
    /// `pids.max`; `None` = `max`.
    pub pids_max: Option<u64>,
}

impl Limits {
    /// The value written to `cpu.max` on cgroup v2.
    pub fn cpu_max(&self) -> String {
        format!("{} {}", self.cpu_quota_us, self.cpu_period_us)
    }

    /// The CPU limit in cores.
    pub fn cores(&self) -> f64 {
        self.cpu_quota_us as f64 / self.cpu_period_us as f64
    }
}

impl fmt::Display for Limits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "memory {}, cpu {} cores ({}/{} µs), pids {}",
            format_bytes(self.memory_bytes),
            self.cores(),
            self.cpu_quota_us,
            self.cpu_period_us,
            self.pids_max
                .map_or_else(|| "max".to_string(), |n| n.to_string())
        )
    }
}

/// Bytes as MiB when whole, else as bytes.
pub fn format_bytes(bytes: u64) -> String {
    if bytes % MIB == 0 {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{bytes} bytes")
    }
}

/// The memory limit a VM gets when none is set explicitly: its guest memory,
/// plus the fixed overhead, plus `percent` of the guest memory, rounded up to
/// a whole MiB (so it is a whole number of pages, as the kernel keeps it).
pub fn derived_memory_limit(guest_bytes: u64, overhead_bytes: u64, percent: u32) -> u64 {
    let share = (u128::from(guest_bytes) * u128::from(percent)).div_ceil(100);
    let total = u128::from(guest_bytes) + u128::from(overhead_bytes) + share;
    let rounded = total.div_ceil(u128::from(MIB)) * u128::from(MIB);
    u64::try_from(rounded).unwrap_or(u64::MAX - (MIB - 1))
}

/// The limits of a VM created with `config`.
pub fn limits(config: &Config) -> Limits {
    let memory_bytes = if config.cgroup_memory_limit.0 > 0 {
        // A whole number of 4 KiB pages, as the kernel would round it.
        config
            .cgroup_memory_limit
            .0
            .div_ceil(4096)
            .saturating_mul(4096)
    } else {
        let guest = u64::try_from(config.qemu_memory_size.bytes()).unwrap_or(u64::MAX);
        derived_memory_limit(
            guest,
            config.cgroup_memory_overhead.0,
            config.cgroup_memory_overhead_percent,
        )
    };
    let cores = config
        .cgroup_cpus
        .0
        .unwrap_or(f64::from(config.qemu_smp_count.max(1)));
    let cpu_quota_us = ((cores * CPU_PERIOD_US as f64).round() as u64).max(MIN_CPU_QUOTA_US);
    let pids_max = match config.cgroup_pids_max {
        0 => None,
        n => Some(u64::from(n)),
    };
    Limits {
        memory_bytes,
        cpu_quota_us,
        cpu_period_us: CPU_PERIOD_US,
        pids_max,
    }
}

/// The name of a VM's group.
pub fn group_name(id: &str) -> String {
    format!("{GROUP_PREFIX}{id}")
}

/// The VM id a group's name stands for, if it is a VM's group.
pub fn id_of_group(name: &str) -> Option<&str> {
    name.strip_prefix(GROUP_PREFIX)
        .filter(|id| !id.is_empty() && !id.contains('/'))
}

/// A process's cgroups, from `/proc/<pid>/cgroup`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcCgroups {
    /// cgroup v1: controller name → path (`cpu` and `cpuacct` each listed
    /// when they share a hierarchy).
    pub v1: BTreeMap<String, String>,
    /// cgroup v2: the unified hierarchy's path (`0::<path>`).
    pub unified: Option<String>,
}

pub fn parse_proc_cgroup(text: &str) -> ProcCgroups {
    let mut found = ProcCgroups::default();
    for line in text.lines() {
        // hierarchy-ID:controller-list:cgroup-path (the path may hold ':').
        let mut parts = line.splitn(3, ':');
        let (Some(hierarchy), Some(controllers), Some(path)) =
            (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if hierarchy == "0" && controllers.is_empty() {
            found.unified = Some(path.to_string());
            continue;
        }
        for controller in controllers.split(',').filter(|c| !c.is_empty()) {
            found.v1.insert(controller.to_string(), path.to_string());
        }
    }
    found
}

/// A cgroup path as seen in `/proc/self/cgroup`, made relative to the root of
/// the mount that shows the hierarchy (a container may mount only its own
/// subtree): no leading `/`, empty for the mount's root. `None` when the
/// path is outside what the mount shows.
pub fn relative_to_mount(path: &str, mount_root: &str) -> Option<String> {
    let root = mount_root.trim_end_matches('/');
    let rest = if root.is_empty() {
        path
    } else if path == root {
        ""
    } else {
        path.strip_prefix(root).filter(|r| r.starts_with('/'))?
    };
    Some(rest.trim_matches('/').to_string())
}

/// Where VMs' groups go on cgroup v2 (relative to the hierarchy's root),
/// from the manager's own unified path: beside the manager when it lives in
/// the leaf `manager` of the cgroup it was given (systemd: `Delegate=yes`
/// with `DelegateSubgroup=manager`), or in the root cgroup. `None`
/// otherwise: a cgroup that holds processes cannot hand controllers to its
/// children, and the manager does not move itself (under an older systemd
/// a restarted manager could then not be put back into its unit's cgroup).
pub fn v2_base(own: &str) -> Option<String> {
    let own = own.trim_matches('/');
    if own.is_empty() {
        return Some(String::new());
    }
    match own.rsplit_once('/') {
        Some((parent, leaf)) if leaf == MANAGER_LEAF => Some(parent.to_string()),
        None if own == MANAGER_LEAF => Some(String::new()),
        _ => None,
    }
}

/// `base/name`, for paths relative to a hierarchy's root.
pub fn join(base: &str, name: &str) -> String {
    if base.is_empty() {
        name.to_string()
    } else {
        format!("{}/{name}", base.trim_end_matches('/'))
    }
}

/// A `key value` line's value from a flat keyed file (`cpu.stat`,
/// `memory.events`, v1's `memory.oom_control`).
pub fn keyed_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        (fields.next()? == key)
            .then(|| fields.next()?.parse().ok())
            .flatten()
    })
}

/// A VM's use of its cgroup, as read from it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// `memory.usage_in_bytes` (v1) / `memory.current` (v2).
    pub memory_bytes: Option<u64>,
    /// `cpuacct.usage` (v1, ns) / `cpu.stat` `usage_usec` (v2), in seconds.
    pub cpu_seconds: Option<f64>,
    /// `pids.current`.
    pub pids: Option<u64>,
}

impl fmt::Display for Usage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unknown = || "?".to_string();
        write!(
            f,
            "memory {} bytes, cpu {} s, pids {}",
            self.memory_bytes.map_or_else(unknown, |b| b.to_string()),
            self.cpu_seconds.map_or_else(unknown, |s| format!("{s:.3}")),
            self.pids.map_or_else(unknown, |n| n.to_string()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ByteSize, QemuSize};

    fn config() -> Config {
        let mut values = BTreeMap::new();
        values.insert(
            "MANAGER_QEMU_ENABLE_SEV_SNP".to_string(),
            "false".to_string(),
        );
        Config::from_values(&values).expect("default configuration")
    }

    #[test]
    fn defaults_are_stated() {
        let c = config();
        assert_eq!(c.cgroups, CgroupMode::Auto);
        assert_eq!(c.cgroup_memory_limit, ByteSize(0));
        assert_eq!(c.cgroup_memory_overhead, ByteSize(256 * MIB));
        assert_eq!(c.cgroup_memory_overhead_percent, 2);
        assert_eq!(c.cgroup_cpus, CgroupCpus(None));
        assert_eq!(c.cgroup_pids_max, 1024);
    }

    #[test]
    fn memory_is_guest_plus_256_mib_plus_2_percent_rounded_to_mib() {
        let mut c = config();
        // Default guest: 2048M → 2048 + 256 + 40.96 → 2345 MiB.
        assert_eq!(limits(&c).memory_bytes, 2345 * MIB);
        c.qemu_memory_size = QemuSize("512M".into());
        // 512 + 256 + 10.24 → 779 MiB.
        assert_eq!(limits(&c).memory_bytes, 779 * MIB);
        c.qemu_memory_size = QemuSize("4G".into());
        // 4096 + 256 + 81.92 → 4434 MiB.
        assert_eq!(limits(&c).memory_bytes, 4434 * MIB);
        c.cgroup_memory_overhead = ByteSize(0);
        c.cgroup_memory_overhead_percent = 0;
        assert_eq!(limits(&c).memory_bytes, 4096 * MIB);
    }

    #[test]
    fn derived_memory_limit_rounds_up_and_never_overflows() {
        assert_eq!(derived_memory_limit(MIB, 0, 0), MIB);
        assert_eq!(derived_memory_limit(MIB + 1, 0, 0), 2 * MIB);
        assert_eq!(derived_memory_limit(100 * MIB, 0, 1), 101 * MIB);
        assert_eq!(derived_memory_limit(100 * MIB + 1, 0, 1), 102 * MIB);
        assert!(derived_memory_limit(u64::MAX, u64::MAX, 100) > 0);
    }

    #[test]
    fn an_explicit_memory_limit_wins_in_whole_pages() {
        let mut c = config();
        c.cgroup_memory_limit = ByteSize(64 * MIB);
        assert_eq!(limits(&c).memory_bytes, 64 * MIB);
        c.cgroup_memory_limit = ByteSize(64 * MIB + 1);
        assert_eq!(limits(&c).memory_bytes, 64 * MIB + 4096);
    }

    #[test]
    fn cpu_is_the_smp_count_or_the_override() {
        let mut c = config();
        let l = limits(&c);
        assert_eq!((l.cpu_quota_us, l.cpu_period_us), (400_000, 100_000));
        assert_eq!(l.cpu_max(), "400000 100000");
        c.qemu_smp_count = 1;
        assert_eq!(limits(&c).cpu_quota_us, 100_000);
        c.cgroup_cpus = CgroupCpus(Some(1.5));
        assert_eq!(limits(&c).cpu_quota_us, 150_000);
        assert_eq!(limits(&c).cores(), 1.5);
        c.cgroup_cpus = CgroupCpus(None);
        c.qemu_smp_count = 0;
        assert_eq!(limits(&c).cpu_quota_us, 100_000, "at least one core");
    }

    #[test]
    fn pids_zero_means_no_limit() {
        let mut c = config();
        assert_eq!(limits(&c).pids_max, Some(1024));
        c.cgroup_pids_max = 0;
        assert_eq!(limits(&c).pids_max, None);
    }

    #[test]
    fn limits_read_as_an_operator_would() {
        let mut c = config();
        c.qemu_memory_size = QemuSize("512M".into());
        c.qemu_smp_count = 1;
        assert_eq!(
            limits(&c).to_string(),
            "memory 779 MiB, cpu 1 cores (100000/100000 µs), pids 1024"
        );
    }

    #[test]
    fn settings_parse_and_refuse() {
        assert_eq!("auto".parse(), Ok(CgroupMode::Auto));
        assert_eq!(" off ".parse(), Ok(CgroupMode::Off));
        assert!("on".parse::<CgroupMode>().is_err());
        assert_eq!("0".parse(), Ok(CgroupCpus(None)));
        assert_eq!("".parse(), Ok(CgroupCpus(None)));
        assert_eq!("2".parse(), Ok(CgroupCpus(Some(2.0))));
        assert_eq!("0.5".parse(), Ok(CgroupCpus(Some(0.5))));
        for bad in ["-1", "abc", "NaN", "inf", "0.001"] {
            assert!(bad.parse::<CgroupCpus>().is_err(), "{bad}");
        }
        // The settings go through the configuration's own checks.
        let mut values = BTreeMap::new();
        values.insert(
            "MANAGER_QEMU_ENABLE_SEV_SNP".to_string(),
            "false".to_string(),
        );
        values.insert("MANAGER_CGROUPS".to_string(), "yes".to_string());
        let e = Config::from_values(&values).unwrap_err().to_string();
        assert!(e.contains("MANAGER_CGROUPS"), "{e}");
        values.insert("MANAGER_CGROUPS".to_string(), "off".to_string());
        values.insert("MANAGER_CGROUP_CPUS".to_string(), "-2".to_string());
        let e = Config::from_values(&values).unwrap_err().to_string();
        assert!(e.contains("MANAGER_CGROUP_CPUS"), "{e}");
        values.insert("MANAGER_CGROUP_CPUS".to_string(), "1.5".to_string());
        values.insert("MANAGER_CGROUP_MEMORY_LIMIT".to_string(), "64M".to_string());
        let c = Config::from_values(&values).expect("valid");
        assert_eq!(c.cgroups, CgroupMode::Off);
        assert_eq!(c.cgroup_cpus, CgroupCpus(Some(1.5)));
        assert_eq!(c.cgroup_memory_limit, ByteSize(64 * MIB));
        // And show as they were written, for a record's settings.
        let shown: BTreeMap<_, _> = c.values().into_iter().collect();
        assert_eq!(shown["MANAGER_CGROUPS"], "off");
        assert_eq!(shown["MANAGER_CGROUP_CPUS"], "1.5");
    }

    #[test]
    fn names() {
        let id = "e71cdcf5-21c0-4e1d-9471-ac6b4389d5f3";
        assert_eq!(group_name(id), format!("cocos-vm-{id}"));
        assert_eq!(id_of_group(&group_name(id)), Some(id));
        assert_eq!(id_of_group("cocos-vm-"), None);
        assert_eq!(id_of_group("manager"), None);
        assert_eq!(join("", "x"), "x");
        assert_eq!(join("a/b", "x"), "a/b/x");
    }

    #[test]
    fn proc_cgroup_v1_hybrid_and_v2() {
        let hybrid = "12:pids:/\n4:memory:/process_api/abc\n2:cpu,cpuacct:/system.slice/x.service\n1:name=systemd:/init.scope\n0::/init.scope\n";
        let p = parse_proc_cgroup(hybrid);
        assert_eq!(p.v1["memory"], "/process_api/abc");
        assert_eq!(p.v1["cpu"], "/system.slice/x.service");
        assert_eq!(p.v1["cpuacct"], "/system.slice/x.service");
        assert_eq!(p.v1["pids"], "/");
        assert_eq!(p.v1["name=systemd"], "/init.scope");
        assert_eq!(p.unified.as_deref(), Some("/init.scope"));
        let v2 = parse_proc_cgroup("0::/system.slice/cocos-manager.service\n");
        assert!(v2.v1.is_empty());
        assert_eq!(
            v2.unified.as_deref(),
            Some("/system.slice/cocos-manager.service")
        );
        // A path with ':' in it stays whole.
        let odd = parse_proc_cgroup("3:memory:/a:b/c\n");
        assert_eq!(odd.v1["memory"], "/a:b/c");
    }

    #[test]
    fn paths_relative_to_the_mount() {
        assert_eq!(relative_to_mount("/", "/").as_deref(), Some(""));
        assert_eq!(relative_to_mount("/a/b", "/").as_deref(), Some("a/b"));
        assert_eq!(
            relative_to_mount("/docker/c1/x", "/docker/c1").as_deref(),
            Some("x")
        );
        assert_eq!(
            relative_to_mount("/docker/c1", "/docker/c1").as_deref(),
            Some("")
        );
        assert_eq!(relative_to_mount("/docker/c10", "/docker/c1"), None);
        assert_eq!(relative_to_mount("/other", "/docker/c1"), None);
    }

    #[test]
    fn v2_bases() {
        // Started by systemd with DelegateSubgroup=manager: siblings of the leaf.
        assert_eq!(
            v2_base("/system.slice/cocos-manager.service/manager").as_deref(),
            Some("system.slice/cocos-manager.service")
        );
        // Started in the delegated cgroup itself (or anywhere else): none.
        assert_eq!(v2_base("/system.slice/cocos-manager.service"), None);
        assert_eq!(v2_base("/user.slice/user-0.slice/session-3.scope"), None);
        assert_eq!(v2_base("/").as_deref(), Some(""));
        assert_eq!(v2_base("/manager").as_deref(), Some(""));
        assert_eq!(v2_base("/a/managers"), None);
    }

    #[test]
    fn usage_files() {
        let cpu_stat = "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n";
        assert_eq!(keyed_value(cpu_stat, "usage_usec"), Some(2_500_000));
        assert_eq!(keyed_value(cpu_stat, "nr_periods"), None);
        let events = "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(keyed_value(events, "oom_kill"), Some(1));
        assert_eq!(keyed_value(events, "oom"), Some(1));
        let oom_control = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(keyed_value(oom_control, "oom_kill"), Some(3));
    }

    #[test]
    fn usage_in_words() {
        let usage = Usage {
            memory_bytes: Some(1024),
            cpu_seconds: Some(1.5),
            pids: Some(3),
        };
        assert_eq!(usage.to_string(), "memory 1024 bytes, cpu 1.500 s, pids 3");
        assert_eq!(
            Usage::default().to_string(),
            "memory ? bytes, cpu ? s, pids ?"
        );
    }
}
