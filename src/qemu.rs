//! The QEMU command line, built exactly as the original orders it (operators
//! diff it), followed by our additions: QEMU's seccomp sandbox, a QMP
//! control socket and a console socket the manager logs from.

use std::path::{Path, PathBuf};

use crate::config::{Config, TeeMode, VtpmMode};

/// Where one VM's files live on the host.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmPaths {
    pub dir: PathBuf,
    pub ovmf_vars: PathBuf,
    pub certs_dir: PathBuf,
    pub env_dir: PathBuf,
    pub disk: PathBuf,
    pub qmp_socket: PathBuf,
    pub console_socket: PathBuf,
    pub console_log: PathBuf,
    pub qemu_log: PathBuf,
    /// The VM's software TPM: its state (endorsement key and NV, kept
    /// across restarts of the VM), its control socket and its log.
    #[serde(default)]
    pub tpm_dir: PathBuf,
    #[serde(default)]
    pub swtpm_socket: PathBuf,
    #[serde(default)]
    pub swtpm_log: PathBuf,
}

impl VmPaths {
    /// The layout of a VM folder under the state directory. The shares go
    /// under the configured mount bases when those are set.
    pub fn new(config: &Config, id: &str) -> VmPaths {
        let dir = config.state_dir.join("vms").join(id);
        let share = |base: &Path, name: &str| {
            if base.as_os_str().is_empty() {
                dir.join(name)
            } else {
                base.join(id)
            }
        };
        VmPaths {
            ovmf_vars: dir.join("OVMF_VARS.fd"),
            certs_dir: share(&config.qemu_certs_mount, "certs"),
            env_dir: share(&config.qemu_env_mount, "env"),
            disk: dir.join("disk.qcow2"),
            qmp_socket: dir.join("qmp.sock"),
            console_socket: dir.join("console.sock"),
            console_log: dir.join("console.log"),
            qemu_log: dir.join("qemu.log"),
            tpm_dir: dir.join("tpm"),
            swtpm_socket: dir.join("swtpm.sock"),
            swtpm_log: dir.join("swtpm.log"),
            dir,
        }
    }
}

/// What differs from one VM to the next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchSpec<'a> {
    pub id: &'a str,
    pub port: u16,
    pub paths: &'a VmPaths,
    /// `aa_kbs_params` of the request, already validated.
    pub aa_kbs_params: &'a str,
    /// SEV-SNP host data for this VM, base64 ([`host_data`]); `None` = none.
    pub host_data: Option<&'a str>,
}

/// The SEV-SNP host data a VM is launched with, base64: none unless
/// `MANAGER_QEMU_ENABLE_HOST_DATA`; then the operator's
/// `MANAGER_QEMU_HOST_DATA` when set, else the VM's own digest.
pub fn host_data(config: &Config, per_vm: &[u8; 32]) -> Option<String> {
    if !config.qemu_enable_host_data {
        None
    } else if !config.qemu_host_data.is_empty() {
        Some(config.qemu_host_data.clone())
    } else {
        Some(crate::attestation::document::b64(per_vm))
    }
}

/// QEMU reads `,,` as a literal comma inside an option value.
fn opt(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

/// The guest kernel command line: the configured one plus the request's
/// attestation-agent parameters.
pub fn kernel_cmdline(config: &Config, aa_kbs_params: &str) -> String {
    if aa_kbs_params.is_empty() {
        config.qemu_kernel_cmdline.clone()
    } else {
        format!(
            "{} agent.aa_kbc_params={aa_kbs_params}",
            config.qemu_kernel_cmdline
        )
    }
}

/// The whole argv, program first (`sudo` when configured).
pub fn command_line(config: &Config, spec: &LaunchSpec<'_>) -> Vec<String> {
    let mut argv: Vec<String> = Vec::with_capacity(64);
    let mut push = |items: &[&str]| argv.extend(items.iter().map(|s| s.to_string()));
    if config.qemu_use_sudo {
        push(&["sudo"]);
    }
    let bin = config.qemu_bin_path.to_string_lossy().into_owned();
    push(&[&bin]);

    let id = spec.id;
    let mode = config.tee_mode();
    let mem_id = config.qemu_mem_id.as_str();

    if config.qemu_enable_kvm {
        push(&["-enable-kvm"]);
    }
    if !config.qemu_machine.is_empty() {
        push(&["-machine", config.qemu_machine.as_str()]);
    }
    if !config.qemu_cpu.is_empty() {
        push(&["-cpu", config.qemu_cpu.as_str()]);
    }
    push(&[
        "-smp",
        &format!(
            "{},maxcpus={}",
            config.qemu_smp_count, config.qemu_smp_maxcpus
        ),
    ]);
    push(&[
        "-m",
        &format!(
            "{},slots={},maxmem={}",
            config.qemu_memory_size, config.qemu_memory_slots, config.qemu_max_memory
        ),
    ]);

    if mode == TeeMode::None {
        push(&[
            "-drive",
            &format!(
                "if={},format={},unit={},file={},readonly={}",
                config.qemu_ovmf_code_if,
                config.qemu_ovmf_code_format,
                config.qemu_ovmf_code_unit,
                opt(&config.qemu_ovmf_code_file),
                config.qemu_ovmf_code_readonly
            ),
        ]);
        push(&[
            "-drive",
            &format!(
                "if={},format={},unit={},file={}",
                config.qemu_ovmf_vars_if,
                config.qemu_ovmf_vars_format,
                config.qemu_ovmf_vars_unit,
                opt(&spec.paths.ovmf_vars)
            ),
        ]);
    }

    let netdev = format!("{}-{id}", config.qemu_netdev_id);
    push(&[
        "-netdev",
        &format!(
            "user,id={netdev},hostfwd=tcp:{}:{}-:{}",
            config.qemu_host_fwd_bind, spec.port, config.qemu_guest_fwd_agent
        ),
    ]);
    push(&[
        "-device",
        &format!(
            "virtio-net-pci,disable-legacy={},iommu_platform={},netdev={netdev},addr={},romfile={}",
            config.qemu_virtio_net_pci_disable_legacy,
            config.qemu_virtio_net_pci_iommu_platform,
            config.qemu_virtio_net_pci_addr,
            opt(&config.qemu_virtio_net_pci_romfile)
        ),
    ]);

    if config.qemu_enable_disk {
        let disk_id = config.qemu_disk_id.as_str();
        let scsi_id = config.qemu_disk_scsi_id.as_str();
        push(&[
            "-drive",
            &format!(
                "file={},if=none,id={disk_id},format={}",
                opt(&spec.paths.disk),
                config.qemu_disk_format
            ),
        ]);
        push(&[
            "-device",
            &format!("virtio-scsi-pci,id={scsi_id},disable-legacy=on,iommu_platform=true"),
        ]);
        push(&[
            "-device",
            &format!("scsi-hd,drive={disk_id},bus={scsi_id}.0"),
        ]);
    }

    let memfd = format!(
        "memory-backend-memfd,id={mem_id},size={},share=true,prealloc=false",
        config.qemu_memory_size
    );
    match mode {
        TeeMode::SevSnpIgvm | TeeMode::SevSnpOvmf => {
            let sev_id = format!("{}-{id}", config.qemu_sev_snp_id);
            let mut machine =
                format!("confidential-guest-support={sev_id},memory-backend={mem_id}");
            if mode == TeeMode::SevSnpIgvm {
                machine.push_str(&format!(",igvm-cfg={}", config.qemu_igvm_id));
            }
            push(&["-machine", &machine]);
            push(&["-object", &memfd]);
            let mut sev = format!(
                "sev-snp-guest,id={sev_id},cbitpos={},reduced-phys-bits={}",
                config.qemu_sev_snp_cbitpos, config.qemu_sev_snp_reduced_phys_bits
            );
            if mode == TeeMode::SevSnpOvmf {
                sev.push_str(",kernel-hashes=on");
            }
            if let Some(host_data) = spec.host_data {
                sev.push_str(&format!(",host-data={host_data}"));
            }
            push(&["-object", &sev]);
            if mode == TeeMode::SevSnpIgvm {
                push(&[
                    "-object",
                    &format!(
                        "igvm-cfg,id={},file={}",
                        config.qemu_igvm_id,
                        opt(&config.qemu_igvm_file)
                    ),
                ]);
            } else {
                push(&["-bios", &config.qemu_ovmf_code_file.to_string_lossy()]);
            }
        }
        TeeMode::Tdx => {
            let tdx_id = format!("{}-{id}", config.qemu_tdx_id);
            let object = serde_json::json!({
                "qom-type": "tdx-guest",
                "id": tdx_id,
                "quote-generation-socket": {
                    "type": "vsock",
                    "cid": "2",
                    "port": config.qemu_quote_generation_port.to_string(),
                },
            });
            push(&["-object", &object.to_string()]);
            push(&[
                "-machine",
                &format!("confidential-guest-support={tdx_id},memory-backend={mem_id},hpet=off"),
            ]);
            push(&["-object", &memfd]);
            push(&["-bios", &config.qemu_ovmf_file.to_string_lossy()]);
            push(&["-nodefaults"]);
        }
        TeeMode::None => {}
    }

    if !config.qemu_enable_disk {
        push(&[
            "-kernel",
            &config.qemu_disk_img_kernel_file.to_string_lossy(),
        ]);
        push(&["-append", &kernel_cmdline(config, spec.aa_kbs_params)]);
        // No initrd configured: none on the command line (nor in the
        // measured kernel hashes).
        if !config.qemu_disk_img_rootfs_file.as_os_str().is_empty() {
            push(&[
                "-initrd",
                &config.qemu_disk_img_rootfs_file.to_string_lossy(),
            ]);
        }
    }

    if config.qemu_no_graphic {
        push(&["-nographic"]);
    }
    if !config.qemu_monitor.is_empty() {
        push(&["-monitor", config.qemu_monitor.as_str()]);
    }

    for (fs_id, dir, tag) in [
        ("cert_fs", &spec.paths.certs_dir, "certs_share"),
        ("env_fs", &spec.paths.env_dir, "env_share"),
    ] {
        push(&[
            "-fsdev",
            &format!(
                "local,id={fs_id},path={},security_model=mapped,readonly=on",
                opt(dir)
            ),
        ]);
        push(&[
            "-device",
            &format!("virtio-9p-pci,fsdev={fs_id},mount_tag={tag}"),
        ]);
    }

    // Ours: QEMU's seccomp sandbox, a TPM on the VM's own swtpm, a name for
    // ps, the QMP control socket and the serial console.
    if !config.qemu_sandbox.is_empty() {
        push(&["-sandbox", config.qemu_sandbox.as_str()]);
    }
    if config.qemu_vtpm == VtpmMode::Swtpm {
        push(&[
            "-chardev",
            &format!("socket,id=chrtpm,path={}", opt(&spec.paths.swtpm_socket)),
        ]);
        push(&["-tpmdev", "emulator,id=tpm0,chardev=chrtpm"]);
        push(&["-device", "tpm-crb,tpmdev=tpm0"]);
    }
    push(&["-name", &format!("cocos-{id}")]);
    push(&[
        "-chardev",
        &format!(
            "socket,id=qmp,path={},server=on,wait=off",
            opt(&spec.paths.qmp_socket)
        ),
    ]);
    push(&["-mon", "chardev=qmp,mode=control"]);
    push(&[
        "-chardev",
        &format!(
            "socket,id=console,path={},server=on,wait=off",
            opt(&spec.paths.console_socket)
        ),
    ]);
    push(&["-serial", "chardev:console"]);
    argv
}

/// Quotes an argv for a shell, so the logged command can be re-run as is.
pub fn shell_quote(argv: &[String]) -> String {
    argv.iter()
        .map(|arg| {
            let plain = !arg.is_empty()
                && arg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@+%".contains(c));
            if plain {
                arg.clone()
            } else {
                format!("'{}'", arg.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests;
