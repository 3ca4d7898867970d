//! Facts about the host the configuration depends on.

use std::path::Path;

use cocos_core::config::{Config, HostCaps};

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
    problems
}
