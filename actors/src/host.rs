//! Facts about the host the configuration depends on.

use std::net::IpAddr;

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

/// The address forwarded ports bind to, or None for all addresses.
pub fn forward_bind(config: &Config) -> Option<IpAddr> {
    config.qemu_host_fwd_bind.as_str().parse().ok()
}
