//! Attestation effects: the `Measurer` actor, which computes SEV-SNP launch
//! digests on its own thread (hashing firmware, kernel and initrd never runs
//! on an actor or API thread) and caches them by file identity and content
//! digest; and the loading of the operator's inputs to the policy document
//! (`MANAGER_PCR_VALUES`, `MANAGER_ATTESTATION_BASE_POLICY` or the original's
//! policy binary, and the platform's chip id and TCB from `/dev/sev`).

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use cocos_core::attestation::document::{
    self, b64, parse_base_document, parse_pcr_values, AttestationState, DocumentInputs, LaunchKind,
    PlatformFacts,
};
use cocos_core::attestation::{hostdata, igvm, snp};
use cocos_core::config::{Config, TeeMode, VtpmMode};
use cocos_core::guest::ValidatedCreate;
use cocos_core::qemu::{host_data as qemu_host_data, kernel_cmdline};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;
use tracing::{debug, info};

use crate::error::ApiError;
use crate::process::ExitStatus;
use crate::reaper::{ChildExited, Spawn, ZombieReaper};

/// What makes a file the same file as before without reading it: a changed
/// file gets a new mtime/ctime (or a new inode when replaced by rename).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

fn file_id(path: &Path) -> std::io::Result<FileId> {
    let m = std::fs::metadata(path)?;
    Ok(FileId {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
    })
}

/// Everything a launch digest depends on, files by content.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct DigestKey {
    kind: LaunchKind,
    firmware: [u8; 32],
    kernel: Option<[u8; 32]>,
    initrd: Option<[u8; 32]>,
    cmdline: Option<String>,
    vcpus: u32,
    cpu: String,
}

/// Compute the launch digest of a VM about to be launched with `config`
/// and kernel command line `cmdline`. `None` when the VM is not SEV-SNP.
#[derive(Message)]
#[rtype(result = "Result<Option<[u8; 48]>, ApiError>")]
pub struct Measure {
    pub config: Arc<Config>,
    pub cmdline: String,
}

/// How many digests each cache keeps; far more than one host's distinct
/// launch configurations.
const CACHE_LIMIT: usize = 1024;

#[derive(Default)]
pub struct Measurer {
    /// File identity → SHA-256 of its content.
    contents: HashMap<FileId, [u8; 32]>,
    /// OVMF content → its SNP page digest (the firmware's part of the chain).
    ovmf_hashes: HashMap<[u8; 32], [u8; 48]>,
    digests: HashMap<DigestKey, [u8; 48]>,
    /// Computed, not served from the cache (for tests through the log).
    computed: u64,
}

impl Actor for Measurer {
    type Context = SyncContext<Self>;

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        crate::failfast::essential_stopped("Measurer");
    }
}

fn precondition(what: impl std::fmt::Display) -> ApiError {
    ApiError::FailedPrecondition(format!(
        "cannot compute the SEV-SNP launch measurement: {what}"
    ))
}

impl Measurer {
    fn content_digest(&mut self, setting: &str, path: &Path) -> Result<[u8; 32], ApiError> {
        let unreadable =
            |e: std::io::Error| precondition(format!("{setting} {}: {e}", path.display()));
        let id = file_id(path).map_err(unreadable)?;
        if let Some(digest) = self.contents.get(&id) {
            return Ok(*digest);
        }
        let mut file = std::fs::File::open(path).map_err(unreadable)?;
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = file.read(&mut buf).map_err(unreadable)?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
        }
        let digest: [u8; 32] = hash.finalize().into();
        if self.contents.len() >= CACHE_LIMIT {
            self.contents.clear();
        }
        self.contents.insert(id, digest);
        Ok(digest)
    }

    fn measure(&mut self, config: &Config, cmdline: &str) -> Result<Option<[u8; 48]>, ApiError> {
        let kind = match config.tee_mode() {
            TeeMode::SevSnpOvmf => LaunchKind::SevSnpOvmf,
            TeeMode::SevSnpIgvm => LaunchKind::SevSnpIgvm,
            TeeMode::None | TeeMode::Tdx => return Ok(None),
        };
        let key = if kind == LaunchKind::SevSnpIgvm {
            DigestKey {
                kind,
                firmware: self.content_digest("MANAGER_QEMU_IGVM_FILE", &config.qemu_igvm_file)?,
                kernel: None,
                initrd: None,
                cmdline: None,
                vcpus: 0,
                cpu: String::new(),
            }
        } else {
            // Disk mode boots from the disk: no -kernel, no kernel hashes.
            let direct = !config.qemu_enable_disk;
            let kernel = direct
                .then(|| {
                    self.content_digest(
                        "MANAGER_QEMU_DISK_IMG_KERNEL_FILE",
                        &config.qemu_disk_img_kernel_file,
                    )
                })
                .transpose()?;
            let has_initrd = !config.qemu_disk_img_rootfs_file.as_os_str().is_empty();
            let initrd = (direct && has_initrd)
                .then(|| {
                    self.content_digest(
                        "MANAGER_QEMU_DISK_IMG_ROOTFS_FILE",
                        &config.qemu_disk_img_rootfs_file,
                    )
                })
                .transpose()?;
            DigestKey {
                kind,
                firmware: self
                    .content_digest("MANAGER_QEMU_OVMF_CODE_FILE", &config.qemu_ovmf_code_file)?,
                kernel,
                initrd,
                cmdline: direct.then(|| cmdline.to_string()),
                vcpus: config.qemu_smp_count,
                cpu: config.qemu_cpu.to_string(),
            }
        };
        if let Some(digest) = self.digests.get(&key) {
            debug!("launch measurement served from the cache");
            return Ok(Some(*digest));
        }
        let digest = match kind {
            LaunchKind::SevSnpIgvm => {
                let bytes = std::fs::read(&config.qemu_igvm_file).map_err(|e| {
                    precondition(format!(
                        "MANAGER_QEMU_IGVM_FILE {}: {e}",
                        config.qemu_igvm_file.display()
                    ))
                })?;
                igvm::snp_launch_digest(&bytes).map_err(precondition)?
            }
            _ => {
                let ovmf = &config.qemu_ovmf_code_file;
                let ovmf_hash = match self.ovmf_hashes.get(&key.firmware) {
                    Some(hash) => *hash,
                    None => {
                        let hash = snp::ovmf_hash(ovmf).map_err(precondition)?;
                        if self.ovmf_hashes.len() >= CACHE_LIMIT {
                            self.ovmf_hashes.clear();
                        }
                        self.ovmf_hashes.insert(key.firmware, hash);
                        hash
                    }
                };
                let direct = key.kernel.is_some();
                let inputs = snp::SnpInputs {
                    ovmf,
                    kernel: direct.then_some(config.qemu_disk_img_kernel_file.as_path()),
                    initrd: key
                        .initrd
                        .is_some()
                        .then_some(config.qemu_disk_img_rootfs_file.as_path()),
                    cmdline: key.cmdline.as_deref(),
                    vcpus: config.qemu_smp_count,
                    cpu_model: config.qemu_cpu.as_str(),
                };
                snp::launch_digest(&inputs, Some(&ovmf_hash)).map_err(precondition)?
            }
        };
        self.computed += 1;
        info!(computed = self.computed, "launch measurement computed");
        if self.digests.len() >= CACHE_LIMIT {
            self.digests.clear();
        }
        self.digests.insert(key, digest);
        Ok(Some(digest))
    }
}

impl Handler<Measure> for Measurer {
    type Result = Result<Option<[u8; 48]>, ApiError>;

    fn handle(&mut self, msg: Measure, _ctx: &mut Self::Context) -> Self::Result {
        let cmdline = msg.cmdline;
        self.measure(&msg.config, &cmdline)
    }
}

/// Why the operator's attestation inputs cannot be used: a configuration
/// error (the start, or the reload, is refused).
#[derive(Debug, thiserror::Error)]
pub enum InputsError {
    #[error("cannot read {what}: {source}")]
    Read {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Document(#[from] cocos_core::attestation::document::DocumentError),
    #[error("MANAGER_ATTESTATION_POLICY_BINARY {binary}: {reason}")]
    PolicyBinary { binary: String, reason: String },
}

/// The document inputs, and the warnings an operator should see once.
pub struct LoadedInputs {
    pub inputs: DocumentInputs,
    pub warnings: Vec<String>,
}

/// Reads and checks the operator's attestation files and the platform's
/// facts. A bad file is an error (the caller refuses the configuration);
/// missing platform facts are a warning.
pub async fn load_inputs(
    config: &Config,
    reaper: &Addr<ZombieReaper>,
) -> Result<LoadedInputs, InputsError> {
    let mut warnings = Vec::new();
    let pcr_values = if config.pcr_values.as_os_str().is_empty() {
        None
    } else {
        let what = format!("MANAGER_PCR_VALUES {}", config.pcr_values.display());
        let text =
            std::fs::read_to_string(&config.pcr_values).map_err(|source| InputsError::Read {
                what: what.clone(),
                source,
            })?;
        Some(parse_pcr_values(&text, &what)?)
    };
    let base = if !config.attestation_base_policy.as_os_str().is_empty() {
        let what = format!(
            "MANAGER_ATTESTATION_BASE_POLICY {}",
            config.attestation_base_policy.display()
        );
        let text = std::fs::read_to_string(&config.attestation_base_policy).map_err(|source| {
            InputsError::Read {
                what: what.clone(),
                source,
            }
        })?;
        Some(parse_base_document(&text, &what)?)
    } else if config.attestation_policy_binary.is_file() {
        let what = format!(
            "the output of MANAGER_ATTESTATION_POLICY_BINARY {}",
            config.attestation_policy_binary.display()
        );
        let text = run_policy_binary(config, reaper).await?;
        Some(parse_base_document(&text, &what)?)
    } else {
        None
    };
    let platform =
        if config.tee_mode() == TeeMode::SevSnpOvmf || config.tee_mode() == TeeMode::SevSnpIgvm {
            match platform_facts() {
                Ok(facts) => facts,
                Err(e) => {
                    debug!(error = %e, "no platform facts from /dev/sev");
                    PlatformFacts::default()
                }
            }
        } else {
            PlatformFacts::default()
        };
    let snp = matches!(config.tee_mode(), TeeMode::SevSnpOvmf | TeeMode::SevSnpIgvm);
    let base_has_chip = base
        .as_ref()
        .is_some_and(|b| b.get("policy").and_then(|p| p.get("chip_id")).is_some());
    if snp && platform.is_empty() && !base_has_chip {
        warnings.push(
            "attestation policies will have no chip_id and no TCB floors: this host has no usable /dev/sev and no MANAGER_ATTESTATION_BASE_POLICY gives them".to_string(),
        );
    }
    if config.tee_mode() == TeeMode::Tdx && base.is_none() {
        warnings.push("TDX: AttestationPolicy answers FAILED_PRECONDITION until MANAGER_ATTESTATION_BASE_POLICY names the operator's policy document".to_string());
    }
    Ok(LoadedInputs {
        inputs: DocumentInputs {
            base,
            platform,
            pcr_values,
        },
        warnings,
    })
}

/// The SEV firmware's own word on this platform: chip id and TCB.
fn platform_facts() -> Result<PlatformFacts, String> {
    use sev::firmware::host::Firmware;
    if !Path::new("/dev/sev").exists() {
        return Err("no /dev/sev".into());
    }
    let mut firmware = Firmware::open().map_err(|e| format!("open /dev/sev: {e}"))?;
    let mut facts = PlatformFacts::default();
    if let Ok(id) = firmware.get_identifier() {
        facts.chip_id = Some(id.0.to_vec());
    }
    if let Ok(status) = firmware.snp_platform_status() {
        // go-sev-guest's u64 TCB: bootloader, TEE, 4 reserved bytes, SNP,
        // microcode (little-endian), the Milan/Genoa layout.
        let t = &status.reported_tcb_version;
        let tcb = u64::from_le_bytes([t.bootloader, t.tee, 0, 0, 0, 0, t.snp, t.microcode]);
        facts.minimum_tcb = Some(tcb);
        facts.minimum_launch_tcb = Some(tcb);
        facts.minimum_build = Some(status.build_id);
        facts.minimum_version = Some(format!("{}.{}", status.version.0, status.version.1));
    }
    Ok(facts)
}

struct ExitForward(Option<oneshot::Sender<ExitStatus>>);

impl Actor for ExitForward {
    type Context = Context<Self>;
}

impl Handler<ChildExited> for ExitForward {
    type Result = ();

    fn handle(&mut self, msg: ChildExited, ctx: &mut Self::Context) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(msg.status);
        }
        ctx.stop();
    }
}

/// Runs the original's `attestation_policy --policy 196608` through the
/// reaper and returns what it printed.
async fn run_policy_binary(
    config: &Config,
    reaper: &Addr<ZombieReaper>,
) -> Result<String, InputsError> {
    let binary = config.attestation_policy_binary.display().to_string();
    let failed = |reason: String| InputsError::PolicyBinary {
        binary: binary.clone(),
        reason,
    };
    let out_path: PathBuf = config.state_dir.join("attestation_policy.out");
    let output = std::fs::File::create(&out_path)
        .map_err(|e| failed(format!("cannot create {}: {e}", out_path.display())))?;
    let (tx, rx) = oneshot::channel();
    let notify = ExitForward(Some(tx)).start().recipient();
    let argv = vec![binary.clone(), "--policy".into(), "196608".into()];
    let spawned = reaper
        .send(Spawn {
            argv,
            output,
            notify,
        })
        .await
        .map_err(|e| failed(format!("reaper unavailable: {e}")))?
        .map_err(|e| failed(format!("cannot run it: {e}")))?;
    let limit = Duration::from_secs(30);
    let status = match tokio::time::timeout(limit, rx).await {
        Ok(Ok(status)) => status,
        Ok(Err(_)) => return Err(failed("lost track of it".into())),
        Err(_) => {
            let _ = crate::process::pidfd_signal(&spawned.pidfd, nix::sys::signal::Signal::SIGKILL);
            let _ = std::fs::remove_file(&out_path);
            return Err(failed(format!("took longer than {limit:?}")));
        }
    };
    let text = std::fs::read_to_string(&out_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    match status {
        ExitStatus::Exited(0) => Ok(text),
        other => Err(failed(format!(
            "failed ({other}): {}",
            text.lines().last().unwrap_or("")
        ))),
    }
}

/// A VM's attestation state: its launch digest (computed by the `Measurer`,
/// off the caller's thread), its host data and its policy document.
pub async fn attestation_state(
    config: &Arc<Config>,
    doc_inputs: &DocumentInputs,
    measurer: &Addr<Measurer>,
    create: &ValidatedCreate,
    id: &str,
) -> Result<AttestationState, ApiError> {
    let cmdline = kernel_cmdline(config, &create.aa_kbs_params);
    let measurement = measurer
        .send(Measure {
            config: config.clone(),
            cmdline,
        })
        .await??;
    let per_vm = hostdata::for_vm(create, id);
    let launch = match config.tee_mode() {
        TeeMode::None => LaunchKind::Plain,
        TeeMode::SevSnpOvmf => LaunchKind::SevSnpOvmf,
        TeeMode::SevSnpIgvm => LaunchKind::SevSnpIgvm,
        TeeMode::Tdx => LaunchKind::Tdx,
    };
    let host_data = match launch {
        LaunchKind::SevSnpOvmf | LaunchKind::SevSnpIgvm => qemu_host_data(config, &per_vm),
        _ => None,
    };
    let mut state = AttestationState {
        launch,
        measurement: measurement.map(|m| b64(&m)),
        host_data_per_vm: host_data.is_some() && config.qemu_host_data.is_empty(),
        host_data,
        vtpm: config.qemu_vtpm == VtpmMode::Swtpm,
        document: None,
        unavailable: None,
    };
    match document::build(&state, doc_inputs) {
        Ok(doc) => state.document = Some(doc.to_string()),
        Err(reason) => state.unavailable = Some(reason),
    }
    // The per-VM digest is logged for every VM (also without SEV-SNP), so
    // an operator or a test can compare it with the guest's own.
    info!(
        vm = %id,
        launch = ?state.launch,
        measurement = state.measurement.as_deref().unwrap_or("-"),
        host_data = state.host_data.as_deref().unwrap_or("-"),
        per_vm_digest = %b64(&per_vm),
        vtpm = state.vtpm,
        "attestation state"
    );
    Ok(state)
}
