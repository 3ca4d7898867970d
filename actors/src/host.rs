//! Facts about the host the configuration depends on.

use std::path::Path;

use cocos_core::config::{Config, HostCaps};
use cocos_core::privilege::DropPlan;

fn reads_yes(path: &str) -> bool {
    std::fs::read_to_string(path)
        .map(|s| matches!(s.trim(), "Y" | "y" | "1"))
        .unwrap_or(false)
}

/// SEV-SNP and TDX as the original detects them: the CPU flag and the KVM
/// module parameter must both say yes.
pub fn detect() -> HostCaps {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let has_flag = |flag: &str| {
        cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|w| w == flag))
    };
    HostCaps {
        sev_snp: has_flag("sev_snp") && reads_yes("/sys/module/kvm_amd/parameters/sev_snp"),
        tdx: has_flag("tdx_host_platform") && reads_yes("/sys/module/kvm_intel/parameters/tdx"),
    }
}

/// What would make every VM fail to start, checked once at start so the
/// operator hears of it before the first create does. Warnings only: files
/// may still appear later.
pub fn preflight(config: &Config) -> Vec<String> {
    use cocos_core::config::TeeMode;
    let mut problems = Vec::new();
    let mut need = |what: &str, path: &Path| {
        if !path.as_os_str().is_empty() && !path.exists() {
            problems.push(format!(
                "{what} {} does not exist; VMs will not start",
                path.display()
            ));
        }
    };
    if !config.qemu_enable_disk {
        need(
            "MANAGER_QEMU_DISK_IMG_KERNEL_FILE",
            &config.qemu_disk_img_kernel_file,
        );
        need(
            "MANAGER_QEMU_DISK_IMG_ROOTFS_FILE",
            &config.qemu_disk_img_rootfs_file,
        );
    } else {
        need("MANAGER_QEMU_SRC_DISK_FILE", &config.qemu_src_disk_file);
    }
    match config.tee_mode() {
        TeeMode::None => {
            need("MANAGER_QEMU_OVMF_CODE_FILE", &config.qemu_ovmf_code_file);
            need("MANAGER_QEMU_OVMF_VARS_FILE", &config.qemu_ovmf_vars_file);
        }
        TeeMode::SevSnpIgvm => need("MANAGER_QEMU_IGVM_FILE", &config.qemu_igvm_file),
        TeeMode::SevSnpOvmf => need("MANAGER_QEMU_OVMF_CODE_FILE", &config.qemu_ovmf_code_file),
        TeeMode::Tdx => need("MANAGER_QEMU_OVMF_FILE", &config.qemu_ovmf_file),
    }
    if config.qemu_enable_kvm {
        need(
            "/dev/kvm (MANAGER_QEMU_ENABLE_KVM is true)",
            Path::new("/dev/kvm"),
        );
    }
    let bin = &config.qemu_bin_path;
    let found = if bin.components().count() > 1 {
        bin.exists()
    } else {
        std::env::var_os("PATH")
            .map(|path| std::env::split_paths(&path).any(|dir| dir.join(bin).is_file()))
            .unwrap_or(false)
    };
    if !found {
        problems.push(format!(
            "MANAGER_QEMU_BIN_PATH {} is not found; VMs will not start",
            bin.display()
        ));
    }
    problems.extend(runtime_storage(config));
    match crate::process::qemu_drop_plan(config) {
        Err(e) => problems.push(format!("{e}; VMs will not start")),
        Ok(Some(plan)) => problems.extend(unprivileged(config, &plan)),
        Ok(None) => {}
    }
    problems
}

/// Refuses a QEMU user that cannot be used: one that does not exist, or any
/// user when the manager is not root. Checked at start (a configuration
/// error) and on each reload (the reload is refused).
pub fn check_qemu_user(config: &Config) -> Result<(), String> {
    crate::process::qemu_drop_plan(config)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// tmpfs and ramfs: what keeps a VM's key and env file off persistent storage.
const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;

/// Whether `dir` lies on tmpfs or ramfs; None when it cannot be told.
pub fn in_memory(dir: &Path) -> Option<bool> {
    let stat = nix::sys::statfs::statfs(dir).ok()?;
    let magic = stat.filesystem_type().0 as i64;
    Some(magic == TMPFS_MAGIC || magic == RAMFS_MAGIC)
}

/// The directories that hold the VMs' keys and env files should be in
/// memory, like /run: a warning for each that is not.
fn runtime_storage(config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    for (what, dir) in [
        ("MANAGER_STATE_DIR", config.state_dir.as_path()),
        (
            "MANAGER_QEMU_CERTS_MOUNT",
            config.qemu_certs_mount.as_path(),
        ),
        ("MANAGER_QEMU_ENV_MOUNT", config.qemu_env_mount.as_path()),
    ] {
        if dir.as_os_str().is_empty() {
            continue;
        }
        // The directory itself, or the nearest one above it that exists.
        let Some(existing) = dir.ancestors().find(|d| d.exists()) else {
            continue;
        };
        if in_memory(existing) == Some(false) {
            problems.push(format!(
                "{what} {} is not on tmpfs: the VMs' private keys and env files will be written to persistent storage (they are overwritten before removal, but a copy may stay); use a directory under /run (systemd: RuntimeDirectory=)",
                dir.display()
            ));
        }
    }
    problems
}

/// What QEMU's user must be able to reach, checked once at start.
fn unprivileged(config: &Config, plan: &DropPlan) -> Vec<String> {
    use cocos_core::config::TeeMode;
    use cocos_core::privilege::{READ, WRITE};
    let mut problems = Vec::new();
    let user = &config.qemu_user;
    let mut reads = |what: &str, path: &Path| {
        if path.as_os_str().is_empty() || !path.exists() {
            return;
        }
        if let Err(blocked) = reachable_by(plan, path, READ) {
            problems.push(format!(
                "{what} {}: MANAGER_QEMU_USER {user} cannot read it ({blocked}); VMs will not start",
                path.display()
            ));
        }
    };
    if !config.qemu_enable_disk {
        reads(
            "MANAGER_QEMU_DISK_IMG_KERNEL_FILE",
            &config.qemu_disk_img_kernel_file,
        );
        reads(
            "MANAGER_QEMU_DISK_IMG_ROOTFS_FILE",
            &config.qemu_disk_img_rootfs_file,
        );
    }
    match config.tee_mode() {
        TeeMode::None | TeeMode::SevSnpOvmf => {
            reads("MANAGER_QEMU_OVMF_CODE_FILE", &config.qemu_ovmf_code_file)
        }
        TeeMode::SevSnpIgvm => reads("MANAGER_QEMU_IGVM_FILE", &config.qemu_igvm_file),
        TeeMode::Tdx => reads("MANAGER_QEMU_OVMF_FILE", &config.qemu_ovmf_file),
    }
    let mut devices = Vec::new();
    if config.qemu_enable_kvm {
        devices.push("/dev/kvm");
    }
    if config.tee_mode() != TeeMode::None && config.tee_mode() != TeeMode::Tdx {
        devices.push("/dev/sev");
    }
    for device in devices {
        let path = Path::new(device);
        if !path.exists() {
            continue;
        }
        if let Err(blocked) = reachable_by(plan, path, READ | WRITE) {
            problems.push(format!(
                "{device}: MANAGER_QEMU_USER {user} cannot open it ({blocked}); add the user to the device's group (e.g. usermod -aG kvm {user})"
            ));
        }
    }
    // One QEMU could trace another (they share the user) unless Yama says no.
    let scope = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    if scope.unwrap_or(0) == 0 {
        problems.push(format!(
            "kernel.yama.ptrace_scope is {}: every VM's QEMU runs as {user}, so without Yama one QEMU could trace another; set kernel.yama.ptrace_scope=1 or higher",
            scope.map_or_else(|| "absent".to_string(), |s| s.to_string())
        ));
    }
    problems
}

/// Whether `plan`'s process may do `want` on `path` (by the mode bits),
/// with search permission on every directory above it; Err names what
/// stops it.
pub fn reachable_by(plan: &DropPlan, path: &Path, want: u32) -> Result<(), String> {
    use cocos_core::privilege::SEARCH;
    use std::os::unix::fs::MetadataExt;
    let path = std::fs::canonicalize(path).map_err(|e| e.to_string())?;
    let dirs: Vec<&Path> = path.ancestors().skip(1).collect();
    for dir in dirs.into_iter().rev() {
        let meta = std::fs::metadata(dir).map_err(|e| e.to_string())?;
        if !plan.permits(meta.mode(), meta.uid(), meta.gid(), SEARCH) {
            return Err(format!(
                "{} is mode {:o}",
                dir.display(),
                meta.mode() & 0o7777
            ));
        }
    }
    let meta = std::fs::metadata(&path).map_err(|e| e.to_string())?;
    if !plan.permits(meta.mode(), meta.uid(), meta.gid(), want) {
        return Err(format!(
            "{} is mode {:o}, uid {}, gid {}",
            path.display(),
            meta.mode() & 0o7777,
            meta.uid(),
            meta.gid()
        ));
    }
    Ok(())
}
