//! The SEV-SNP launch digest of an OVMF + direct-kernel-boot launch.
//!
//! Why this exists: a relying party checks the `measurement` field of a VM's
//! SNP attestation report against the policy `AttestationPolicy` answers.
//! The original manager measured a global IGVM file with an external tool
//! and ignored what it had actually launched. Here the manager computes,
//! from the very inputs it hands QEMU (`-bios` OVMF, `-kernel`, `-initrd`,
//! `-append`, `-smp`, `-cpu`, `sev-snp-guest,…,kernel-hashes=on`), the 48
//! bytes the AMD secure processor will report, so that a report from any
//! other firmware, kernel, initrd or command line fails the check.
//!
//! The digest is computed with the `sev` crate, which matches the reference
//! tool `sev-snp-measure` byte for byte (QEMU as VMM, guest features 0x1 =
//! SNPActive, the tool's default), with three guards around it:
//!
//! - The firmware is parsed here first, with bounds checks, the way the crate
//!   and QEMU parse it (OVMF's footer GUID table, the `ASEV` SEV metadata,
//!   the SEV-ES reset block, the kernel-hashes table). The crate indexes the
//!   file unchecked and would panic on a truncated or foreign image; here
//!   that is a typed error naming the file, and a firmware that cannot
//!   measure a kernel (Debian's plain `OVMF_CODE.fd`) is reported as such.
//! - The crate trims the kernel command line before hashing it; QEMU and
//!   `sev-snp-measure` hash it verbatim (plus a NUL). A command line with
//!   leading or trailing whitespace is therefore measured by the short
//!   composition in the private `verbatim` module (the crate's VMSA pages,
//!   the same page records), which the tests check against both the crate
//!   and the tool.
//! - The CPU model is accepted only under its exact QEMU name: the vCPUs'
//!   initial state, and so the digest, holds that model's CPUID signature.
//!
//! Reading the files is the only I/O; callers run this off their actor
//! threads and cache the firmware part with [`ovmf_hash`].

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use sev::error::MeasurementError;
use sev::measurement::snp::{snp_calc_launch_digest, SnpMeasurementArgs};
use sev::measurement::vcpu_types::CpuType;
use sev::measurement::vmsa::{GuestFeatures, VMMType};

/// Why a launch digest could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum SnpError {
    /// The `-cpu` value is not a QEMU AMD EPYC model with a known signature.
    #[error(
        "unsupported QEMU CPU model {model:?} for an SEV-SNP launch digest: the digest holds \
         the vCPUs' CPUID signature, known only for these models (names case-sensitive, as \
         QEMU spells them): {}",
        supported_cpu_models().collect::<Vec<_>>().join(", ")
    )]
    UnknownCpuModel { model: String },
    /// The `-cpu` value overrides a part of the CPUID signature.
    #[error(
        "QEMU CPU {value:?} sets {option:?}, which changes the vCPUs' CPUID signature held in \
         the SEV-SNP launch digest; use the plain model name"
    )]
    CpuSignatureOverride { value: String, option: String },
    /// The inputs cannot describe a QEMU launch.
    #[error("invalid SEV-SNP launch inputs: {0}")]
    InvalidInputs(&'static str),
    /// The firmware file could not be read.
    #[error("cannot read the firmware {}: {source}", path.display())]
    FirmwareUnreadable { path: PathBuf, source: io::Error },
    /// The firmware is not an SEV-capable OVMF image.
    #[error("firmware {} cannot be measured for SEV-SNP: {reason}", path.display())]
    FirmwareInvalid { path: PathBuf, reason: String },
    /// A kernel is booted directly, but the firmware has nowhere for QEMU to
    /// put its hashes.
    #[error(
        "firmware {} has no SEV kernel-hashes table ({reason}), so QEMU cannot bind a directly \
         booted kernel, initrd and command line into the SEV-SNP launch digest: use an AmdSev \
         build of OVMF (Debian package ovmf-amdsev, file OVMF.amdsev.fd) or an IGVM file",
        path.display()
    )]
    NoKernelHashes { path: PathBuf, reason: &'static str },
    /// The kernel file could not be read.
    #[error("cannot read the kernel {}: {source}", path.display())]
    KernelUnreadable { path: PathBuf, source: io::Error },
    /// The initrd file could not be read.
    #[error("cannot read the initrd {}: {source}", path.display())]
    InitrdUnreadable { path: PathBuf, source: io::Error },
    /// The `sev` crate failed.
    #[error("measuring the SEV-SNP launch of firmware {} failed: {source}", path.display())]
    Measurement {
        path: PathBuf,
        source: MeasurementError,
    },
}

/// What QEMU is given for one SEV-SNP launch with OVMF and a direct kernel boot.
#[derive(Debug, Clone, Copy)]
pub struct SnpInputs<'a> {
    /// The `-bios` image.
    pub ovmf: &'a Path,
    /// `-kernel`; `None` boots the firmware alone.
    pub kernel: Option<&'a Path>,
    /// `-initrd` (only with a kernel).
    pub initrd: Option<&'a Path>,
    /// `-append` (only with a kernel), exactly as passed to QEMU.
    pub cmdline: Option<&'a str>,
    /// `-smp` (number of vCPUs at launch).
    pub vcpus: u32,
    /// The QEMU `-cpu` value, e.g. "EPYC", "EPYC-v4", "EPYC-Milan", "EPYC-Genoa".
    pub cpu_model: &'a str,
}

/// QEMU's AMD EPYC models, spelled as QEMU spells them, and the `sev` crate's
/// type for each (which carries its CPUID family/model/stepping).
const CPU_MODELS: &[(&str, CpuType)] = &[
    ("EPYC", CpuType::Epyc),
    ("EPYC-v1", CpuType::EpycV1),
    ("EPYC-v2", CpuType::EpycV2),
    ("EPYC-IBPB", CpuType::EpycIBPB),
    ("EPYC-v3", CpuType::EpycV3),
    ("EPYC-v4", CpuType::EpycV4),
    ("EPYC-Rome", CpuType::EpycRome),
    ("EPYC-Rome-v1", CpuType::EpycRomeV1),
    ("EPYC-Rome-v2", CpuType::EpycRomeV2),
    ("EPYC-Rome-v3", CpuType::EpycRomeV3),
    ("EPYC-Milan", CpuType::EpycMilan),
    ("EPYC-Milan-v1", CpuType::EpycMilanV1),
    ("EPYC-Milan-v2", CpuType::EpycMilanV2),
    ("EPYC-Genoa", CpuType::EpycGenoa),
    ("EPYC-Genoa-v1", CpuType::EpycGenoaV1),
    ("EPYC-Turin", CpuType::EpycTurin),
    ("EPYC-Turin-v1", CpuType::EpycTurinV1),
    ("EPYC-Turin-v2", CpuType::EpycTurinV2),
];

/// The QEMU `-cpu` model names [`cpu_type`] accepts.
pub fn supported_cpu_models() -> impl Iterator<Item = &'static str> {
    CPU_MODELS.iter().map(|(name, _)| *name)
}

/// Largest vCPU count accepted (QEMU's q35 limit); each vCPU adds a VMSA page.
const MAX_VCPUS: u32 = 4096;

/// The `sev` crate's CPU type for a QEMU `-cpu` value: a model name, exactly
/// as QEMU spells it, optionally followed by `,option…` feature flags. Names
/// QEMU resolves from the host ("host", "max") and options that override the
/// family, model or stepping are refused, since the digest holds the
/// vCPUs' CPUID signature.
pub fn cpu_type(qemu_cpu: &str) -> Result<CpuType, SnpError> {
    let mut parts = qemu_cpu.split(',');
    let model = parts.next().unwrap_or_default();
    let Some(&(_, cpu)) = CPU_MODELS.iter().find(|(name, _)| *name == model) else {
        return Err(SnpError::UnknownCpuModel {
            model: qemu_cpu.to_string(),
        });
    };
    for option in parts {
        let key = option.trim_start_matches(['+', '-']);
        let key = key.split_once('=').map_or(key, |(k, _)| k);
        if matches!(key, "family" | "model" | "stepping") {
            return Err(SnpError::CpuSignatureOverride {
                value: qemu_cpu.to_string(),
                option: option.to_string(),
            });
        }
    }
    Ok(cpu)
}

/// SHA-384 launch digest of the OVMF image alone (its pages as QEMU loads
/// them below 4 GiB), to cache and pass to [`launch_digest`].
pub fn ovmf_hash(ovmf: &Path) -> Result<[u8; 48], SnpError> {
    let _ = read_firmware(ovmf)?;
    let digest = sev::measurement::snp::calc_snp_ovmf_hash(ovmf.to_path_buf())
        .map_err(|source| measurement_error(ovmf, source))?;
    digest_bytes(ovmf, digest)
}

/// The 48-byte SNP launch digest QEMU and the AMD firmware will produce for
/// this launch. `ovmf_hash`, when given, is the value of [`ovmf_hash()`] for
/// the same file (it skips rehashing the image; a stale value gives a wrong
/// digest).
pub fn launch_digest(
    inputs: &SnpInputs<'_>,
    ovmf_hash: Option<&[u8; 48]>,
) -> Result<[u8; 48], SnpError> {
    let cpu = cpu_type(inputs.cpu_model)?;
    check_inputs(inputs)?;
    let firmware = read_firmware(inputs.ovmf)?;
    let hash_table_gpa = check_measurable(&firmware, inputs)?;
    if let Some(kernel) = inputs.kernel {
        probe(kernel).map_err(|source| SnpError::KernelUnreadable {
            path: kernel.to_path_buf(),
            source,
        })?;
    }
    if let Some(initrd) = inputs.initrd {
        probe(initrd).map_err(|source| SnpError::InitrdUnreadable {
            path: initrd.to_path_buf(),
            source,
        })?;
    }
    match inputs.cmdline {
        Some(cmdline) if cmdline.trim() != cmdline => {
            verbatim::launch_digest(&firmware, hash_table_gpa, inputs, ovmf_hash, cpu)
        }
        _ => with_sev_crate(inputs, ovmf_hash, cpu),
    }
}

/// The digest by `sev::measurement::snp::snp_calc_launch_digest`, for inputs
/// already checked. The crate reads the files again: they are the files QEMU
/// is about to be given, and are not expected to change in between.
fn with_sev_crate(
    inputs: &SnpInputs<'_>,
    ovmf_hash: Option<&[u8; 48]>,
    cpu: CpuType,
) -> Result<[u8; 48], SnpError> {
    let ovmf_hash_hex = ovmf_hash.map(|hash| hex(hash));
    let args = SnpMeasurementArgs {
        vcpus: inputs.vcpus,
        vcpu_type: cpu,
        ovmf_file: inputs.ovmf.to_path_buf(),
        // 0x1: SNPActive only, as QEMU sets it and sev-snp-measure assumes
        // by default (`--guest-features 0x1`).
        guest_features: GuestFeatures::default(),
        kernel_file: inputs.kernel.map(Path::to_path_buf),
        initrd_file: inputs.initrd.map(Path::to_path_buf),
        append: inputs.cmdline,
        ovmf_hash_str: ovmf_hash_hex.as_deref(),
        vmm_type: Some(VMMType::QEMU),
    };
    let digest =
        snp_calc_launch_digest(args).map_err(|source| measurement_error(inputs.ovmf, source))?;
    digest_bytes(inputs.ovmf, digest)
}

fn measurement_error(path: &Path, source: MeasurementError) -> SnpError {
    SnpError::Measurement {
        path: path.to_path_buf(),
        source,
    }
}

fn digest_bytes(
    path: &Path,
    digest: sev::measurement::snp::SnpLaunchDigest,
) -> Result<[u8; 48], SnpError> {
    let bytes: Vec<u8> = digest
        .try_into()
        .map_err(|source| measurement_error(path, source))?;
    <[u8; 48]>::try_from(bytes.as_slice())
        .map_err(|source| measurement_error(path, MeasurementError::FromSliceError(source)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Refuses what QEMU itself would refuse.
fn check_inputs(inputs: &SnpInputs<'_>) -> Result<(), SnpError> {
    if inputs.vcpus == 0 {
        return Err(SnpError::InvalidInputs("a launch needs at least one vCPU"));
    }
    if inputs.vcpus > MAX_VCPUS {
        return Err(SnpError::InvalidInputs(
            "more than 4096 vCPUs (QEMU's limit for q35)",
        ));
    }
    if inputs.kernel.is_none() && inputs.initrd.is_some() {
        return Err(SnpError::InvalidInputs(
            "an initrd without a kernel (QEMU takes -initrd only with -kernel)",
        ));
    }
    if inputs.kernel.is_none() && inputs.cmdline.is_some() {
        return Err(SnpError::InvalidInputs(
            "a kernel command line without a kernel (QEMU takes -append only with -kernel)",
        ));
    }
    if inputs.cmdline.is_some_and(|c| c.contains('\0')) {
        return Err(SnpError::InvalidInputs(
            "the kernel command line contains a NUL byte",
        ));
    }
    Ok(())
}

/// Opens a file and reads one byte, so that a missing file, a directory or
/// an unreadable file is reported as the caller's input, not as a failure
/// inside the measurement.
fn probe(path: &Path) -> io::Result<()> {
    let mut file = File::open(path)?;
    let mut byte = [0u8; 1];
    file.read(&mut byte).map(|_| ())
}

// ---------------------------------------------------------------------------
// The firmware, parsed as the `sev` crate, sev-snp-measure and QEMU parse it.

const PAGE: usize = 4096;
const FOUR_GIB: u64 = 1 << 32;
/// An OVMF GUID-table entry header: `u16` size, then the GUID.
const ENTRY_HEADER: usize = 18;
/// The table's last entry (its footer) ends this many bytes before the end.
const TABLE_END_FROM_IMAGE_END: usize = 32;
/// `PaddedSevHashTable`: the table QEMU writes (168 bytes), padded to 16.
const HASH_TABLE_LEN: usize = 176;

/// A GUID in the little-endian byte order UEFI stores it in.
const fn guid(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> [u8; 16] {
    let a = d1.to_le_bytes();
    let b = d2.to_le_bytes();
    let c = d3.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4], d4[5],
        d4[6], d4[7],
    ]
}

/// 96b582de-1fb2-45f7-baea-a366c55a082d
const OVMF_TABLE_FOOTER_GUID: [u8; 16] = guid(
    0x96b5_82de,
    0x1fb2,
    0x45f7,
    [0xba, 0xea, 0xa3, 0x66, 0xc5, 0x5a, 0x08, 0x2d],
);
/// 7255371f-3a3b-4b04-927b-1da6efa8d454: the kernel-hashes table (GPA, size).
const SEV_HASH_TABLE_RV_GUID: [u8; 16] = guid(
    0x7255_371f,
    0x3a3b,
    0x4b04,
    [0x92, 0x7b, 0x1d, 0xa6, 0xef, 0xa8, 0xd4, 0x54],
);
/// 00f771de-1a7e-4fcb-890e-68c77e2fb44e: the APs' reset EIP under SEV-ES/SNP.
const SEV_ES_RESET_BLOCK_GUID: [u8; 16] = guid(
    0x00f7_71de,
    0x1a7e,
    0x4fcb,
    [0x89, 0x0e, 0x68, 0xc7, 0x7e, 0x2f, 0xb4, 0x4e],
);
/// dc886566-984a-4798-a75e-5585a7bf67cc: offset from the end of the `ASEV` header.
const OVMF_SEV_METADATA_GUID: [u8; 16] = guid(
    0xdc88_6566,
    0x984a,
    0x4798,
    [0xa7, 0x5e, 0x55, 0x85, 0xa7, 0xbf, 0x67, 0xcc],
);

/// OVMF SEV metadata section types (edk2 `OvmfSevMetadata.asm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SectionKind {
    SnpSecMem = 1,
    SnpSecrets = 2,
    Cpuid = 3,
    SvsmCaa = 4,
    SnpKernelHashes = 0x10,
}

#[derive(Debug, Clone, Copy)]
struct Section {
    gpa: u32,
    size: u32,
    kind: SectionKind,
}

/// A parsed, bounds-checked firmware image.
struct Firmware {
    data: Vec<u8>,
    sections: Vec<Section>,
    reset_eip: u32,
    /// The kernel-hashes table entry's data, if the GUID table has one.
    hash_table_entry: Option<Vec<u8>>,
}

impl Firmware {
    /// Where QEMU maps the image: ending at 4 GiB.
    fn gpa(&self) -> u64 {
        FOUR_GIB - self.data.len() as u64
    }

    /// The kernel-hashes table's GPA and size, or why there is none.
    fn kernel_hashes(&self) -> Result<(u32, u32), KernelHashesProblem> {
        if !self
            .sections
            .iter()
            .any(|s| s.kind == SectionKind::SnpKernelHashes)
        {
            return Err(KernelHashesProblem::Missing(
                "its SEV metadata has no SNP_KERNEL_HASHES section",
            ));
        }
        let Some(entry) = &self.hash_table_entry else {
            return Err(KernelHashesProblem::Missing(
                "its GUID table has no SEV hash table entry (7255371f-3a3b-4b04-927b-1da6efa8d454)",
            ));
        };
        let (Some(gpa), Some(size)) = (le_u32(entry, 0), le_u32(entry, 4)) else {
            return Err(KernelHashesProblem::Invalid(format!(
                "the SEV hash table entry holds {} bytes, not a GPA and a size",
                entry.len()
            )));
        };
        if gpa == 0 {
            return Err(KernelHashesProblem::Missing(
                "its SEV hash table entry gives address 0",
            ));
        }
        Ok((gpa, size))
    }
}

enum KernelHashesProblem {
    Missing(&'static str),
    Invalid(String),
}

fn le_u16(bytes: &[u8], at: usize) -> Option<u16> {
    let b = bytes.get(at..at.checked_add(2)?)?;
    Some(u16::from_le_bytes([b[0], b[1]]))
}

fn le_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn read_firmware(path: &Path) -> Result<Firmware, SnpError> {
    let data = std::fs::read(path).map_err(|source| SnpError::FirmwareUnreadable {
        path: path.to_path_buf(),
        source,
    })?;
    parse_firmware(data).map_err(|reason| SnpError::FirmwareInvalid {
        path: path.to_path_buf(),
        reason,
    })
}

/// GUID-table entries: each GUID with its data.
type GuidTable<'a> = Vec<([u8; 16], &'a [u8])>;

/// The GUID table ending 32 bytes before the end of the image, walked
/// backwards from its footer entry; each entry is `data ‖ u16 size ‖ GUID`.
/// Returned in walking order (a GUID seen again replaces the earlier one,
/// as in the `sev` crate and sev-snp-measure).
fn guid_table(data: &[u8]) -> Result<GuidTable<'_>, String> {
    let footer_at = data
        .len()
        .checked_sub(TABLE_END_FROM_IMAGE_END + ENTRY_HEADER)
        .ok_or_else(|| format!("{} bytes is too short for an OVMF image", data.len()))?;
    let footer_size = le_u16(data, footer_at).unwrap_or_default() as usize;
    if data[footer_at + 2..footer_at + ENTRY_HEADER] != OVMF_TABLE_FOOTER_GUID {
        return Err(
            "no OVMF GUID table footer (96b582de-1fb2-45f7-baea-a366c55a082d) \
                    50 bytes before its end: not an OVMF image"
                .to_string(),
        );
    }
    let table_len = footer_size
        .checked_sub(ENTRY_HEADER)
        .ok_or_else(|| format!("OVMF GUID table footer gives size {footer_size}"))?;
    let start = footer_at
        .checked_sub(table_len)
        .ok_or_else(|| format!("OVMF GUID table of {table_len} bytes overruns the image"))?;
    let table = &data[start..footer_at];
    let mut entries = Vec::new();
    let mut end = table.len();
    while end >= ENTRY_HEADER {
        let size = le_u16(table, end - ENTRY_HEADER).unwrap_or_default() as usize;
        if size < ENTRY_HEADER || size > end {
            return Err(format!(
                "OVMF GUID table entry of size {size} at {} bytes into the table is malformed",
                end - ENTRY_HEADER
            ));
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&table[end - 16..end]);
        entries.push((id, &table[end - size..end - ENTRY_HEADER]));
        end -= size;
    }
    Ok(entries)
}

fn parse_firmware(data: Vec<u8>) -> Result<Firmware, String> {
    if data.is_empty() || data.len() % PAGE != 0 || data.len() as u64 > FOUR_GIB {
        return Err(format!(
            "its size, {} bytes, is not a whole number of 4 KiB pages up to 4 GiB",
            data.len()
        ));
    }
    let table = guid_table(&data)?;
    let find = |id: &[u8; 16]| {
        table
            .iter()
            .rev()
            .find(|(entry_id, _)| entry_id == id)
            .map(|(_, entry)| *entry)
    };

    let metadata = find(&OVMF_SEV_METADATA_GUID).ok_or(
        "no SEV metadata entry (dc886566-984a-4798-a75e-5585a7bf67cc) in its GUID table: \
         not an SEV build of OVMF",
    )?;
    let from_end = le_u32(metadata, 0).ok_or("the SEV metadata entry is shorter than 4 bytes")?;
    let header_at = data
        .len()
        .checked_sub(from_end as usize)
        .ok_or_else(|| format!("SEV metadata offset {from_end:#x} lies before the image"))?;
    let header = data
        .get(header_at..header_at + 16)
        .ok_or_else(|| format!("SEV metadata header at offset {header_at:#x} is cut off"))?;
    if &header[0..4] != b"ASEV" {
        return Err(format!(
            "no \"ASEV\" SEV metadata signature at offset {header_at:#x}"
        ));
    }
    let (size, version, count) = (
        le_u32(header, 4).unwrap_or_default() as usize,
        le_u32(header, 8).unwrap_or_default(),
        le_u32(header, 12).unwrap_or_default() as usize,
    );
    if version != 1 {
        return Err(format!("SEV metadata version {version}, not 1"));
    }
    let items = size
        .checked_sub(16)
        .and_then(|len| data.get(header_at + 16..header_at + 16 + len))
        .ok_or_else(|| format!("SEV metadata of {size} bytes does not fit the image"))?;
    if count.checked_mul(12).is_none_or(|len| len > items.len()) {
        return Err(format!(
            "SEV metadata of {size} bytes cannot hold {count} sections"
        ));
    }
    let mut sections = Vec::with_capacity(count);
    for item in items.chunks_exact(12).take(count) {
        let (gpa, size, kind) = (
            le_u32(item, 0).unwrap_or_default(),
            le_u32(item, 4).unwrap_or_default(),
            le_u32(item, 8).unwrap_or_default(),
        );
        let kind = match kind {
            1 => SectionKind::SnpSecMem,
            2 => SectionKind::SnpSecrets,
            3 => SectionKind::Cpuid,
            4 => SectionKind::SvsmCaa,
            0x10 => SectionKind::SnpKernelHashes,
            other => {
                return Err(format!(
                    "SEV metadata section at GPA {gpa:#x} has unknown type {other:#x}"
                ))
            }
        };
        sections.push(Section { gpa, size, kind });
    }

    let reset = find(&SEV_ES_RESET_BLOCK_GUID)
        .ok_or("no SEV-ES reset block (00f771de-1a7e-4fcb-890e-68c77e2fb44e) in its GUID table")?;
    let reset_eip = le_u32(reset, 0).ok_or("the SEV-ES reset block is shorter than 4 bytes")?;
    let hash_table_entry = find(&SEV_HASH_TABLE_RV_GUID).map(<[u8]>::to_vec);
    Ok(Firmware {
        data,
        sections,
        reset_eip,
        hash_table_entry,
    })
}

/// Everything the measurement will rely on, checked so that neither the
/// crate nor [`verbatim`] fails (or panics) half-way. With a kernel, returns
/// the GPA of the kernel-hashes table.
fn check_measurable(firmware: &Firmware, inputs: &SnpInputs<'_>) -> Result<Option<u32>, SnpError> {
    let invalid = |reason: String| SnpError::FirmwareInvalid {
        path: inputs.ovmf.to_path_buf(),
        reason,
    };
    let with_kernel = inputs.kernel.is_some();
    for section in &firmware.sections {
        let zero_filled = match section.kind {
            SectionKind::SnpSecMem | SectionKind::SvsmCaa => true,
            SectionKind::SnpKernelHashes => !with_kernel,
            SectionKind::SnpSecrets | SectionKind::Cpuid => false,
        };
        if zero_filled && section.size as usize % PAGE != 0 {
            return Err(invalid(format!(
                "SEV metadata section {:?} at GPA {:#x} has size {:#x}, not whole pages",
                section.kind, section.gpa, section.size
            )));
        }
    }
    if inputs.vcpus > 1 && firmware.reset_eip == 0 {
        return Err(invalid(
            "its SEV-ES reset block gives no entry point for the other vCPUs".to_string(),
        ));
    }
    if !with_kernel {
        return Ok(None);
    }
    let (table_gpa, table_size) = firmware.kernel_hashes().map_err(|problem| match problem {
        KernelHashesProblem::Missing(reason) => SnpError::NoKernelHashes {
            path: inputs.ovmf.to_path_buf(),
            reason,
        },
        KernelHashesProblem::Invalid(reason) => invalid(reason),
    })?;
    if (table_size as usize) < HASH_TABLE_LEN {
        return Err(invalid(format!(
            "its SEV hash table area has {table_size} bytes, fewer than the {HASH_TABLE_LEN} \
             QEMU writes"
        )));
    }
    if table_gpa as usize % PAGE + HASH_TABLE_LEN > PAGE {
        return Err(invalid(format!(
            "its SEV hash table at GPA {table_gpa:#x} crosses a page boundary"
        )));
    }
    for section in &firmware.sections {
        if section.kind == SectionKind::SnpKernelHashes && section.size as usize != PAGE {
            return Err(invalid(format!(
                "its SNP_KERNEL_HASHES section has {:#x} bytes, not one page",
                section.size
            )));
        }
    }
    Ok(Some(table_gpa))
}

/// The launch digest composed here, for command lines the `sev` crate would
/// trim: the same page records in the same order as
/// `snp_calc_launch_digest`, the crate's VMSA pages, and the kernel hashes
/// table built as QEMU builds it from the command line as given.
mod verbatim {
    use std::io;
    use std::path::Path;

    use sev::launch::PageType;
    use sev::measurement::vcpu_types::CpuType;
    use sev::measurement::vmsa::{GuestFeatures, VMMType, VMSA};
    use sha2::{Digest, Sha256, Sha384};

    use super::{
        guid, measurement_error, Firmware, SectionKind, SnpError, SnpInputs, HASH_TABLE_LEN, PAGE,
    };

    /// Where the RMP records VMSA pages: (u64)-1, page-aligned, bits above 51 clear.
    const VMSA_GPA: u64 = 0xFFFF_FFFF_F000;

    /// 9438d606-4f22-4cc9-b479-a793d411fd21
    const HASH_TABLE_HEADER_GUID: [u8; 16] = guid(
        0x9438_d606,
        0x4f22,
        0x4cc9,
        [0xb4, 0x79, 0xa7, 0x93, 0xd4, 0x11, 0xfd, 0x21],
    );
    /// 97d02dd8-bd20-4c94-aa78-e7714d36ab2a
    const CMDLINE_GUID: [u8; 16] = guid(
        0x97d0_2dd8,
        0xbd20,
        0x4c94,
        [0xaa, 0x78, 0xe7, 0x71, 0x4d, 0x36, 0xab, 0x2a],
    );
    /// 44baf731-3a2f-4bd7-9af1-41e29169781d
    const INITRD_GUID: [u8; 16] = guid(
        0x44ba_f731,
        0x3a2f,
        0x4bd7,
        [0x9a, 0xf1, 0x41, 0xe2, 0x91, 0x69, 0x78, 0x1d],
    );
    /// 4de79437-abd2-427f-b835-d5b172d2045b
    const KERNEL_GUID: [u8; 16] = guid(
        0x4de7_9437,
        0xabd2,
        0x427f,
        [0xb8, 0x35, 0xd5, 0xb1, 0x72, 0xd2, 0x04, 0x5b],
    );

    /// The guest context's running launch digest (SNP firmware ABI,
    /// SNP_LAUNCH_UPDATE: a SHA-384 over the previous digest and a
    /// PAGE_INFO record per page).
    struct Gctx([u8; 48]);

    impl Gctx {
        fn update(&mut self, page_type: PageType, gpa: u64, contents: &[u8; 48]) {
            let mut info = [0u8; 0x70];
            info[..48].copy_from_slice(&self.0);
            info[48..96].copy_from_slice(contents);
            info[96..98].copy_from_slice(&0x70u16.to_le_bytes());
            info[98] = page_type as u8;
            // is_imi, vmpl3/2/1 permissions, reserved: zero.
            info[104..112].copy_from_slice(&gpa.to_le_bytes());
            self.0 = Sha384::digest(info).into();
        }

        fn normal_pages(&mut self, gpa: u64, data: &[u8]) {
            for (i, page) in data.chunks_exact(PAGE).enumerate() {
                let hash: [u8; 48] = Sha384::digest(page).into();
                self.update(PageType::Normal, gpa + (i * PAGE) as u64, &hash);
            }
        }

        fn zero_pages(&mut self, gpa: u64, size: u32) {
            for offset in (0..u64::from(size)).step_by(PAGE) {
                self.update(PageType::Zero, gpa + offset, &[0; 48]);
            }
        }
    }

    fn file_sha256(path: &Path) -> io::Result<[u8; 32]> {
        let mut hash = Sha256::new();
        io::copy(&mut std::fs::File::open(path)?, &mut hash)?;
        Ok(hash.finalize().into())
    }

    /// The page QEMU fills in the kernel-hashes section: zeros, with the
    /// padded hash table at the table's offset in the page.
    fn hashes_page(
        offset: usize,
        cmdline: &[u8; 32],
        initrd: &[u8; 32],
        kernel: &[u8; 32],
    ) -> Vec<u8> {
        let mut table = Vec::with_capacity(HASH_TABLE_LEN);
        table.extend_from_slice(&HASH_TABLE_HEADER_GUID);
        table.extend_from_slice(&168u16.to_le_bytes());
        for (id, hash) in [
            (CMDLINE_GUID, cmdline),
            (INITRD_GUID, initrd),
            (KERNEL_GUID, kernel),
        ] {
            table.extend_from_slice(&id);
            table.extend_from_slice(&50u16.to_le_bytes());
            table.extend_from_slice(hash);
        }
        table.resize(HASH_TABLE_LEN, 0);
        let mut page = vec![0u8; PAGE];
        page[offset..offset + HASH_TABLE_LEN].copy_from_slice(&table);
        page
    }

    /// Inputs already checked by `check_inputs` and `check_measurable`;
    /// `hash_table_gpa` is what the latter returned (`Some` with a kernel).
    pub(super) fn launch_digest(
        firmware: &Firmware,
        hash_table_gpa: Option<u32>,
        inputs: &SnpInputs<'_>,
        ovmf_hash: Option<&[u8; 48]>,
        cpu: CpuType,
    ) -> Result<[u8; 48], SnpError> {
        let hashes = match inputs.kernel.zip(hash_table_gpa) {
            Some((kernel, table_gpa)) => {
                let kernel_hash =
                    file_sha256(kernel).map_err(|source| SnpError::KernelUnreadable {
                        path: kernel.to_path_buf(),
                        source,
                    })?;
                let initrd_hash = match inputs.initrd {
                    Some(initrd) => {
                        file_sha256(initrd).map_err(|source| SnpError::InitrdUnreadable {
                            path: initrd.to_path_buf(),
                            source,
                        })?
                    }
                    None => Sha256::digest(b"").into(),
                };
                // QEMU hashes the command line as given, with its NUL.
                let mut cmdline = inputs.cmdline.unwrap_or_default().as_bytes().to_vec();
                cmdline.push(0);
                let cmdline_hash: [u8; 32] = Sha256::digest(&cmdline).into();
                Some(hashes_page(
                    table_gpa as usize % PAGE,
                    &cmdline_hash,
                    &initrd_hash,
                    &kernel_hash,
                ))
            }
            None => None,
        };

        let mut gctx = Gctx([0; 48]);
        match ovmf_hash {
            Some(hash) => gctx.0 = *hash,
            None => gctx.normal_pages(firmware.gpa(), &firmware.data),
        }
        for section in &firmware.sections {
            let gpa = u64::from(section.gpa);
            match section.kind {
                SectionKind::SnpSecMem | SectionKind::SvsmCaa => gctx.zero_pages(gpa, section.size),
                SectionKind::SnpSecrets => gctx.update(PageType::Secrets, gpa, &[0; 48]),
                SectionKind::Cpuid => gctx.update(PageType::Cpuid, gpa, &[0; 48]),
                SectionKind::SnpKernelHashes => match &hashes {
                    Some(page) => gctx.normal_pages(gpa, page),
                    None => gctx.zero_pages(gpa, section.size),
                },
            }
        }

        let vmsa = VMSA::new(
            u64::from(firmware.reset_eip),
            cpu,
            VMMType::QEMU,
            Some(u64::from(inputs.vcpus)),
            GuestFeatures::default(),
        );
        // The boot vCPU's page, then the same page for every other vCPU.
        let pages = vmsa
            .pages(2)
            .map_err(|source| measurement_error(inputs.ovmf, source))?;
        for i in 0..inputs.vcpus as usize {
            let Some(page) = pages.get(i.min(1)) else {
                break;
            };
            let hash: [u8; 48] = Sha384::digest(page).into();
            gctx.update(PageType::Vmsa, VMSA_GPA, &hash);
        }
        Ok(gctx.0)
    }
}

/// A synthetic OVMF-like firmware image and fake kernels for tests: the
/// daemon's end-to-end tests write these to files and point the manager at
/// them. Deterministic; the known-answer tests below depend on every byte.
#[doc(hidden)]
pub mod test_firmware {
    use super::{
        OVMF_SEV_METADATA_GUID, OVMF_TABLE_FOOTER_GUID, SEV_ES_RESET_BLOCK_GUID,
        SEV_HASH_TABLE_RV_GUID,
    };

    /// Image size: 64 KiB (QEMU takes `-bios` images in multiples of 64 KiB).
    pub const SIZE: usize = 0x1_0000;
    /// The APs' reset EIP in the SEV-ES reset block (as in edk2's OVMF).
    pub const RESET_EIP: u32 = 0x0080_b004;
    /// The SNP_KERNEL_HASHES section (one page).
    pub const KERNEL_HASHES_GPA: u32 = 0x0080_f000;
    /// The SEV hash table, inside that page but not at its start.
    pub const HASH_TABLE_GPA: u32 = 0x0080_fc00;
    /// The SEV hash table area's size.
    pub const HASH_TABLE_SIZE: u32 = 0x400;
    /// Where the `ASEV` header sits, counted back from the end of the image.
    pub const METADATA_FROM_END: usize = 0x52c;

    /// Stand-in for OVMF's reset-vector tail (never executed).
    const TAIL: [u8; 32] = [
        0xe9, 0x2a, 0xff, 0x90, 0x90, 0x90, 0x90, 0x90, 0, 0, 0, 0, b'V', b'T', b'F', 0, 0x0f,
        0x20, 0xc0, 0xa8, 0x01, 0x74, 0x05, 0xe9, 0x28, 0xff, 0xff, 0xff, 0xe9, 0x09, 0xff, 0x90,
    ];

    /// Deterministic filler bytes (xorshift64*).
    fn filler(seed: u64, len: usize) -> Vec<u8> {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
        out.truncate(len);
        out
    }

    /// The SEV metadata sections: those of edk2's OVMF for SNP, with an
    /// SNP_KERNEL_HASHES page (last, as edk2 lists it) or without.
    pub fn sections(kernel_hashes: bool) -> Vec<(u32, u32, u32)> {
        let mut sections = vec![
            (0x0080_0000, 0x9000, 1), // SNP_SEC_MEM
            (0x0080_a000, 0x3000, 1), // SNP_SEC_MEM
            (0x0080_d000, 0x1000, 2), // SNP_SECRETS
            (0x0080_e000, 0x1000, 3), // CPUID
        ];
        if kernel_hashes {
            sections.push((0x0081_0000, 0x1_0000, 1)); // SNP_SEC_MEM
            sections.push((KERNEL_HASHES_GPA, 0x1000, 0x10)); // SNP_KERNEL_HASHES
        } else {
            sections.push((0x0080_f000, 0x1_1000, 1)); // SNP_SEC_MEM
        }
        sections
    }

    /// A 64 KiB OVMF-like image: filler bytes, the `ASEV` SEV metadata, and
    /// OVMF's GUID table ending 32 bytes before the end (entries
    /// `data ‖ u16 size ‖ GUID`, laid out first to last: SEV metadata offset,
    /// SEV hash table GPA and size when `kernel_hashes`, SEV-ES reset block,
    /// then the table footer whose size covers the whole table).
    pub fn build(kernel_hashes: bool) -> Vec<u8> {
        let mut image = filler(0x0f1f_0f1f, SIZE);

        let sections = sections(kernel_hashes);
        let mut metadata = Vec::new();
        metadata.extend_from_slice(b"ASEV");
        metadata.extend_from_slice(&(16 + 12 * sections.len() as u32).to_le_bytes());
        metadata.extend_from_slice(&1u32.to_le_bytes());
        metadata.extend_from_slice(&(sections.len() as u32).to_le_bytes());
        for (gpa, size, kind) in sections {
            metadata.extend_from_slice(&gpa.to_le_bytes());
            metadata.extend_from_slice(&size.to_le_bytes());
            metadata.extend_from_slice(&kind.to_le_bytes());
        }
        let at = SIZE - METADATA_FROM_END;
        image[at..at + metadata.len()].copy_from_slice(&metadata);

        let mut table = Vec::new();
        let mut entry = |id: [u8; 16], data: &[u8]| {
            table.extend_from_slice(data);
            table.extend_from_slice(&(data.len() as u16 + 18).to_le_bytes());
            table.extend_from_slice(&id);
        };
        entry(
            OVMF_SEV_METADATA_GUID,
            &(METADATA_FROM_END as u32).to_le_bytes(),
        );
        if kernel_hashes {
            let mut area = HASH_TABLE_GPA.to_le_bytes().to_vec();
            area.extend_from_slice(&HASH_TABLE_SIZE.to_le_bytes());
            entry(SEV_HASH_TABLE_RV_GUID, &area);
        }
        entry(SEV_ES_RESET_BLOCK_GUID, &RESET_EIP.to_le_bytes());
        entry(OVMF_TABLE_FOOTER_GUID, &[]);
        let footer_size = table.len() as u16;
        let footer_size_at = table.len() - 18;
        table[footer_size_at..footer_size_at + 2].copy_from_slice(&footer_size.to_le_bytes());

        let end = SIZE - TAIL.len();
        image[end - table.len()..end].copy_from_slice(&table);
        image[end..].copy_from_slice(&TAIL);
        image
    }

    /// Deterministic bytes for a fake kernel or initrd (different per seed).
    pub fn kernel_bytes(seed: u8, len: usize) -> Vec<u8> {
        filler(0x6b65_726e_656c_0000 | u64::from(seed), len)
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    use super::*;

    // The reference inputs. `cargo test -p cocos-manager-core --release --lib
    // attestation::snp::tests::write_reference_inputs -- --ignored` with
    // SNP_REFERENCE_DIR=<dir> writes them (the same bytes every test uses):
    //   fw-hashes.bin = test_firmware::build(true)    (64 KiB, with kernel hashes)
    //   fw-plain.bin  = test_firmware::build(false)   (64 KiB, without)
    //   kernel.bin    = test_firmware::kernel_bytes(1, 123_457)
    //   initrd.bin    = test_firmware::kernel_bytes(2, 234_568)
    // and the digests below are sev-snp-measure 0.0.13's output on them, run
    // in that directory.
    const FW_HASHES: &str = "fw-hashes.bin";
    const FW_PLAIN: &str = "fw-plain.bin";
    const KERNEL: &str = "kernel.bin";
    const INITRD: &str = "initrd.bin";
    const KERNEL_LEN: usize = 123_457;
    const INITRD_LEN: usize = 234_568;

    const CMDLINE: &str = "console=ttyS0 root=/dev/vda rw";
    const CMDLINE_KBC_1: &str =
        "console=ttyS0 root=/dev/vda rw agent.aa_kbc_params=cc_kbc::http://192.0.2.1:8080";
    const CMDLINE_KBC_2: &str =
        "console=ttyS0 root=/dev/vda rw agent.aa_kbc_params=cc_kbc::http://192.0.2.2:8080";
    /// Leading and trailing blanks: hashed verbatim by QEMU and the tool.
    const CMDLINE_PADDED: &str = " console=ttyS0 root=/dev/vda rw ";
    /// What `qemu::kernel_cmdline` gives for an empty configured command line.
    const CMDLINE_KBC_ONLY: &str = " agent.aa_kbc_params=cc_kbc::http://192.0.2.1:8080";

    #[derive(Debug, Clone, Copy)]
    struct Kat {
        firmware: &'static str,
        vcpus: u32,
        cpu: &'static str,
        kernel: bool,
        initrd: bool,
        cmdline: Option<&'static str>,
        digest: &'static str,
    }

    const KATS: &[Kat] = &[
        // sev-snp-measure --mode snp --vcpus 1 --vcpu-type EPYC-v4 --ovmf fw-hashes.bin --kernel kernel.bin --initrd initrd.bin --append 'console=ttyS0 root=/dev/vda rw' --output-format hex
        Kat { firmware: FW_HASHES, vcpus: 1, cpu: "EPYC-v4", kernel: true, initrd: true, cmdline: Some(CMDLINE), digest: "acaacb149a2060e98bd523316bd9333e08046f746289145ba69adf46b773e95b7fe7e106e0852d392f8ee980051a234d" },
        // sev-snp-measure --mode snp --vcpus 2 --vcpu-type EPYC-v4 --ovmf fw-hashes.bin --kernel kernel.bin --initrd initrd.bin --append 'console=ttyS0 root=/dev/vda rw' --output-format hex
        Kat { firmware: FW_HASHES, vcpus: 2, cpu: "EPYC-v4", kernel: true, initrd: true, cmdline: Some(CMDLINE), digest: "e99f8ba3a5326269ee01526ac06c660a61486a16d74499bb02d76cafbabe98fed6bd351ef2c0af78d5050fed2eaf2566" },
        // sev-snp-measure --mode snp --vcpus 4 --vcpu-type EPYC-v4 --ovmf fw-hashes.bin --kernel kernel.bin --initrd initrd.bin --append 'console=ttyS0 root=/dev/vda rw' --output-format hex
        Kat { firmware: FW_HASHES, vcpus: 4, cpu: "EPYC-v4", kernel: true, initrd: true, cmdline: Some(CMDLINE), digest: "574f63dd6f2b3968056728c4d00358a8e81beae8c44e8f088311ad0f3e55c81cc9af8349a9a9047df8b141e1814c0632" },
        // sev-snp-measure --mode snp --vcpus 16 --vcpu-type EPYC-v4 --ovmf fw-hashes.bin --kernel kernel.bin --initrd initrd.bin --append 'console=ttyS0 root=/dev/vda rw' --output-format hex
        Kat { firmware: FW_HASHES, vcpus: 16, cpu: "EPYC-v4", kernel: true, initrd: true, cmdline: Some(CMDLINE), digest: "b587b535d85bfc8b654be68f8ba872e2480091a443145ef24e70fa0549f19e04b30ce8d3266a65322af9d3a9fe8eab61" },
        // sev-snp-measure --mode snp --vcpus 4 --vcpu-type EPYC --ovmf fw-hashes.bin --kernel kernel.bin --initrd initrd.bin --append 'console=ttyS0 root=/dev/vda rw' --output-format hex
        Kat { firmware: FW_HASHES, vcpus: 4, cpu: "EPYC", kernel: true, initrd: true, cmdline: Some(CMDLINE), digest: "574f63dd6f2b3968056728c4d00358a8e81beae8c44e8f088311ad0f3e55c81cc9af8349a9a9047df8b141e1814c0632" },
        // sev-snp-measure --mode snp --vcpus 4 --vcpu-type EPYC-Milan --ovmf fw-hashes.bin --kernel kernel.bin --initrd initrd.bin --append 'console=ttyS0 root=/dev/vda rw' --output-format hex
        Kat { firmware: FW_HASHES, vcpus: 4, cpu: "EPYC-Milan", kernel: true, initrd: true, cmdline: Some(CMDLINE), digest: "4e5e1e77fd7e92660efbd5f2735a06980a27311722d61a84bcf2531901ab086d6be2841b6a039abaae9ffcb9c5de372e" },
        // sev-snp-measure --mode snp --vcpus 4 --vcpu-type EPYC-Genoa --ovmf fw-hashes.bin --kernel kernel.bin --initrd initrd.bin --append 'console=ttyS0 root=/dev/vda rw' --output-format hex
        Kat { firmware: FW_HASHES, vcpus: 4, cpu: "EPYC-Genoa", kernel: true, initrd: true, cmdline: Some(CMDLINE), digest: "b95567146be6d96940e8b270561897afccacb6763d19c078aa72aba7ce72c3c811eb66622d21ccfeb57c4254e8c69438" },
        // sev-snp-measure --mode snp --vcpus 4 --vcpu-type EPYC-Rome --ovmf fw-hashes.bin --kernel kernel.bin --initrd initrd.bin --append 'console=ttyS0 root=/dev/vda rw' --output-format hex
        Kat { firmware: FW_HASHES, vcpus: 4, cpu: "EPYC-Rome", kernel: true, initrd: true, cmdline: Some(CMDLINE), digest: "d47aecde16c29e81ea7d0cf8753fb198e9dff9ab604d896c29d4b82cc0db82ce5a4c9c2e7d5509aa47e06c1dd78caef4" },
        // sev-snp-measure --mode snp --vcpus 4 --vcpu-type EPYC-Turin --ovmf fw-hashes.bin --kernel kernel.bin --initrd initrd.bin --append 'console=ttyS0 root=/dev/vda rw' --output-format hex
        Kat { firmware: FW_HASHES, vcpus: 4, cpu: "EPYC-Turin", kernel: true, initrd: true, cmdline: Some(CMDLINE), digest: "98a90a0ee669bd754a15ff1bd1b188c5c8c3e012f354ae0932e1a17d357d2e276ae86d7cb608d8b7d8fb50631964fd6b" },
        // sev-snp-measure --mode snp --vcpus 4 --vcpu-type EPYC-v4 --ovmf fw-hashes.bin --kernel kernel.bin --append 'console=ttyS0 root=/dev/vda rw' --output-format hex
        Kat { firmware: FW_HASHES, vcpus: 4, cpu: "EPYC-v4", kernel: true, initrd: false, cmdline: Some(CMDLINE), digest: "6b43fbcb7294e3f0d37fdbb11452551f6f83ec63a8141f4c6a0f821820ca86d61d0852113ccfbd04b176c1597870b3c5" },
        // sev-snp-measure --mode snp --vcpus 2 --vcpu-type EPYC-Milan --ovmf fw-hashes.bin --kernel kernel.bin --append 'console=ttyS0 root=/dev/vda rw agent.aa_kbc_params=cc_kbc::http://192.0.2.1:8080' --output-format hex
        Kat { firmware: FW_HASHES, vcpus: 2, cpu: "EPYC-Milan", kernel: true, initrd: false, cmdline: Some(CMDLINE_KBC_1), digest: "6124297e4a4d1c3c08bce489cc3eda952356dbf4df288f3ecb729b76c6081092733646cdbbe89106422a9bf1f67d8f36" },
        // sev-snp-measure --mode snp --vcpus 4 --vcpu-type EPYC-v4 --ovmf fw-hashes.bin --kernel kernel.bin --output-format hex
        Kat { firmware: FW_HASHES, vcpus: 4, cpu: "EPYC-v4", kernel: true, initrd: false, cmdline: None, digest: "75587ae2f0c50bd14ccd28bba3bbad06d68ed203c5c3ba9d3d944759147715db24b7dbf6fd8c866eca1cb3fb7830dbe3" },
        // sev-snp-measure --mode snp --vcpus 4 --vcpu-type EPYC-v4 --ovmf fw-hashes.bin --kernel kernel.bin --initrd initrd.bin --append 'console=ttyS0 root=/dev/vda rw agent.aa_kbc_params=cc_kbc::http://192.0.2.1:8080' --output-format hex
        Kat { firmware: FW_HASHES, vcpus: 4, cpu: "EPYC-v4", kernel: true, initrd: true, cmdline: Some(CMDLINE_KBC_1), digest: "c4d378d5cdb77cf48f0f465f53285066b9ddbccd3713f3f6b751e4a8d8508298ace2306c9c157e3216f1948112e2c96a" },
        // sev-snp-measure --mode snp --vcpus 4 --vcpu-type EPYC-v4 --ovmf fw-hashes.bin --kernel kernel.bin --initrd initrd.bin --append 'console=ttyS0 root=/dev/vda rw agent.aa_kbc_params=cc_kbc::http://192.0.2.2:8080' --output-format hex
        Kat { firmware: FW_HASHES, vcpus: 4, cpu: "EPYC-v4", kernel: true, initrd: true, cmdline: Some(CMDLINE_KBC_2), digest: "29830019f34c136b393c5d937e11f9e4ef484580336bac5d4a97c08e6936eef8aaa1e4446fc1259970f3c93f8fd07de1" },
        // sev-snp-measure --mode snp --vcpus 4 --vcpu-type EPYC-v4 --ovmf fw-hashes.bin --kernel kernel.bin --initrd initrd.bin --append ' console=ttyS0 root=/dev/vda rw ' --output-format hex
        Kat { firmware: FW_HASHES, vcpus: 4, cpu: "EPYC-v4", kernel: true, initrd: true, cmdline: Some(CMDLINE_PADDED), digest: "c911c186e23a7dc7bd497ed964f715b037b73a91c096568d581a82049303a0bb483a604aa86bd33892fc2c2917f17722" },
        // sev-snp-measure --mode snp --vcpus 4 --vcpu-type EPYC-v4 --ovmf fw-hashes.bin --kernel kernel.bin --initrd initrd.bin --append ' agent.aa_kbc_params=cc_kbc::http://192.0.2.1:8080' --output-format hex
        Kat {
            firmware: FW_HASHES,
            vcpus: 4,
            cpu: "EPYC-v4",
            kernel: true,
            initrd: true,
            cmdline: Some(CMDLINE_KBC_ONLY),
            digest: "a186505cae5e56bbe202a9750864fe4c7f207139b225012639a53cf1eb87c7381bb6f1bb96cb1d6046240e94838188e2",
        },
        // sev-snp-measure --mode snp --vcpus 4 --vcpu-type EPYC-v4 --ovmf fw-hashes.bin --output-format hex
        Kat { firmware: FW_HASHES, vcpus: 4, cpu: "EPYC-v4", kernel: false, initrd: false, cmdline: None, digest: "71013eb9b0f1aa512689bc9ffe79a597844ad7b7785fcf3d786ee83c6527282d39f015090492959b466d34c01d737b80" },
        // sev-snp-measure --mode snp --vcpus 1 --vcpu-type EPYC-Milan --ovmf fw-hashes.bin --output-format hex
        Kat { firmware: FW_HASHES, vcpus: 1, cpu: "EPYC-Milan", kernel: false, initrd: false, cmdline: None, digest: "9cd8fdc9f01d2caf79ab81f5352a4a7923c3b2785db81e26641688b2b53681a1e6f9a4cf08406709cdda183a285e3ab8" },
        // sev-snp-measure --mode snp --vcpus 4 --vcpu-type EPYC-v4 --ovmf fw-plain.bin --output-format hex
        Kat { firmware: FW_PLAIN, vcpus: 4, cpu: "EPYC-v4", kernel: false, initrd: false, cmdline: None, digest: "755d6c75ba4bdfcf6880e66b3ee2639adfe768de14faf7fd7e3486e6aa06b2aead3b104e5f9568eedfff113f7caad345" },
        // sev-snp-measure --mode snp --vcpus 16 --vcpu-type EPYC-Genoa --ovmf fw-plain.bin --output-format hex
        Kat { firmware: FW_PLAIN, vcpus: 16, cpu: "EPYC-Genoa", kernel: false, initrd: false, cmdline: None, digest: "1d9e5b6d2b8345209a602e0faaa8b8e2720c622bc8e3f8967eefb1ba73e9d5b4f06133834783da169f4dc2e1b8b796dc" },
    ];

    /// sev-snp-measure --mode snp:ovmf-hash --ovmf fw-hashes.bin
    const OVMF_HASH_FW_HASHES: &str = "9406a151ac64d6c612293b6f05ed8a4c8cc4ad51e9edaf4c1834442ba1417dab4248da72de416f06aabab71dc65804dc";

    fn write_inputs(dir: &Path) {
        let files = [
            (FW_HASHES, test_firmware::build(true)),
            (FW_PLAIN, test_firmware::build(false)),
            (KERNEL, test_firmware::kernel_bytes(1, KERNEL_LEN)),
            (INITRD, test_firmware::kernel_bytes(2, INITRD_LEN)),
        ];
        for (name, bytes) in files {
            std::fs::write(dir.join(name), bytes).expect("write a reference input");
        }
    }

    fn inputs_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        write_inputs(dir.path());
        dir
    }

    /// Writes the reference inputs to $SNP_REFERENCE_DIR, for running
    /// sev-snp-measure on them.
    #[test]
    #[ignore = "writes the reference inputs for sev-snp-measure; set SNP_REFERENCE_DIR"]
    fn write_reference_inputs() {
        let dir = std::env::var_os("SNP_REFERENCE_DIR").expect("set SNP_REFERENCE_DIR");
        std::fs::create_dir_all(&dir).expect("create SNP_REFERENCE_DIR");
        write_inputs(Path::new(&dir));
    }

    struct Paths {
        ovmf: PathBuf,
        kernel: PathBuf,
        initrd: PathBuf,
    }

    fn paths(dir: &Path, firmware: &str) -> Paths {
        Paths {
            ovmf: dir.join(firmware),
            kernel: dir.join(KERNEL),
            initrd: dir.join(INITRD),
        }
    }

    fn inputs<'a>(
        p: &'a Paths,
        vcpus: u32,
        cpu_model: &'a str,
        kernel: bool,
        initrd: bool,
        cmdline: Option<&'a str>,
    ) -> SnpInputs<'a> {
        SnpInputs {
            ovmf: &p.ovmf,
            kernel: kernel.then_some(p.kernel.as_path()),
            initrd: initrd.then_some(p.initrd.as_path()),
            cmdline,
            vcpus,
            cpu_model,
        }
    }

    impl Kat {
        fn inputs<'a>(&self, p: &'a Paths) -> SnpInputs<'a> {
            inputs(
                p,
                self.vcpus,
                self.cpu,
                self.kernel,
                self.initrd,
                self.cmdline,
            )
        }

        /// The sev-snp-measure arguments of the comment above the entry.
        fn reference_args(&self) -> Vec<String> {
            let mut args: Vec<String> = ["--mode", "snp", "--vcpus"].map(String::from).to_vec();
            args.push(self.vcpus.to_string());
            args.extend(["--vcpu-type", self.cpu, "--ovmf", self.firmware].map(String::from));
            if self.kernel {
                args.extend(["--kernel", KERNEL].map(String::from));
            }
            if self.initrd {
                args.extend(["--initrd", INITRD].map(String::from));
            }
            if let Some(cmdline) = self.cmdline {
                args.extend(["--append", cmdline].map(String::from));
            }
            args.extend(["--output-format", "hex"].map(String::from));
            args
        }
    }

    /// Whether sev-snp-measure can be run here (`python3 -m sevsnpmeasure.cli`).
    fn reference_tool_available() -> bool {
        Command::new("python3")
            .args(["-c", "import sevsnpmeasure"])
            .output()
            .is_ok_and(|out| out.status.success())
    }

    fn run_reference(dir: &Path, args: &[String]) -> String {
        let out = Command::new("python3")
            .args(["-m", "sevsnpmeasure.cli"])
            .args(args)
            .current_dir(dir)
            .output()
            .expect("run sev-snp-measure");
        assert!(
            out.status.success(),
            "sev-snp-measure {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn digest_of(dir: &Path, kat: &Kat) -> Result<[u8; 48], SnpError> {
        let p = paths(dir, kat.firmware);
        launch_digest(&kat.inputs(&p), None)
    }

    #[test]
    fn known_answers_match_sev_snp_measure() {
        let dir = inputs_dir();
        for kat in KATS {
            let digest = digest_of(dir.path(), kat).unwrap_or_else(|e| panic!("{kat:?}: {e}"));
            assert_eq!(hex(&digest), kat.digest, "{kat:?}");
        }
    }

    /// The crate's composition and the verbatim one agree with the reference
    /// on every input, except that the crate trims a padded command line.
    #[test]
    fn both_compositions_agree_with_the_reference() {
        let dir = inputs_dir();
        for kat in KATS {
            let p = paths(dir.path(), kat.firmware);
            let inputs = kat.inputs(&p);
            let cpu = cpu_type(kat.cpu).expect("known model");
            let firmware = read_firmware(&p.ovmf).expect("firmware");
            let table = check_measurable(&firmware, &inputs).expect("measurable");
            let own =
                verbatim::launch_digest(&firmware, table, &inputs, None, cpu).expect("verbatim");
            assert_eq!(hex(&own), kat.digest, "verbatim: {kat:?}");
            let by_crate = with_sev_crate(&inputs, None, cpu).expect("sev crate");
            if kat.cmdline.is_some_and(|c| c.trim() != c) {
                assert_ne!(hex(&by_crate), kat.digest, "the crate trims: {kat:?}");
            } else {
                assert_eq!(hex(&by_crate), kat.digest, "sev crate: {kat:?}");
            }
        }
    }

    #[test]
    fn ovmf_hash_matches_the_reference_and_stands_in_for_the_image() {
        let dir = inputs_dir();
        let hash = ovmf_hash(&dir.path().join(FW_HASHES)).expect("ovmf hash");
        assert_eq!(hex(&hash), OVMF_HASH_FW_HASHES);
        for kat in KATS.iter().filter(|k| k.firmware == FW_HASHES) {
            let p = paths(dir.path(), kat.firmware);
            let digest = launch_digest(&kat.inputs(&p), Some(&hash)).expect("digest");
            assert_eq!(hex(&digest), kat.digest, "{kat:?}");
        }
        // A different seed changes the digest: the hash is really used.
        let p = paths(dir.path(), FW_HASHES);
        let digest = launch_digest(&KATS[0].inputs(&p), Some(&[7; 48])).expect("digest");
        assert_ne!(hex(&digest), KATS[0].digest);
    }

    #[test]
    fn aa_kbc_params_suffix_changes_the_digest() {
        let dir = inputs_dir();
        let p = paths(dir.path(), FW_HASHES);
        let digest = |cmdline| {
            launch_digest(&inputs(&p, 4, "EPYC-v4", true, true, Some(cmdline)), None)
                .expect("digest")
        };
        let (plain, kbc_1, kbc_2) = (
            digest(CMDLINE),
            digest(CMDLINE_KBC_1),
            digest(CMDLINE_KBC_2),
        );
        assert_ne!(kbc_1, kbc_2);
        assert_ne!(plain, kbc_1);
        assert_ne!(plain, kbc_2);
    }

    #[test]
    fn padded_command_line_is_hashed_verbatim() {
        let dir = inputs_dir();
        let p = paths(dir.path(), FW_HASHES);
        let digest = |cmdline| {
            launch_digest(&inputs(&p, 4, "EPYC-v4", true, true, Some(cmdline)), None)
                .expect("digest")
        };
        assert_ne!(digest(CMDLINE_PADDED), digest(CMDLINE));
        assert_ne!(digest("console=ttyS0\n"), digest("console=ttyS0"));
    }

    #[test]
    fn empty_command_line_is_no_command_line() {
        // QEMU without -append hashes "" plus its NUL; so does the tool
        // for `--append ''` and for no --append.
        let dir = inputs_dir();
        let p = paths(dir.path(), FW_HASHES);
        let none = launch_digest(&inputs(&p, 4, "EPYC-v4", true, false, None), None);
        let empty = launch_digest(&inputs(&p, 4, "EPYC-v4", true, false, Some("")), None);
        assert_eq!(none.expect("digest"), empty.expect("digest"));
    }

    #[test]
    fn firmware_without_kernel_hashes_refuses_a_kernel() {
        let dir = inputs_dir();
        let p = paths(dir.path(), FW_PLAIN);
        let err = launch_digest(&inputs(&p, 4, "EPYC-v4", true, true, Some(CMDLINE)), None)
            .expect_err("no kernel-hashes table");
        assert!(
            matches!(&err, SnpError::NoKernelHashes { path, .. } if *path == p.ovmf),
            "{err:?}"
        );
        let message = err.to_string();
        for part in [
            p.ovmf.display().to_string().as_str(),
            "no SEV kernel-hashes table",
            "SNP_KERNEL_HASHES",
            "ovmf-amdsev",
            "OVMF.amdsev.fd",
            "IGVM",
        ] {
            assert!(message.contains(part), "{message:?} lacks {part:?}");
        }

        // A kernel-hashes section whose table address is 0 (as in Debian's
        // OVMF_CODE.fd) is no table either.
        let mut image = test_firmware::build(true);
        let at = image
            .windows(16)
            .position(|w| w == SEV_HASH_TABLE_RV_GUID)
            .expect("hash table entry");
        image[at - 10..at - 6].fill(0);
        let ovmf = dir.path().join("fw-zero-table.bin");
        std::fs::write(&ovmf, image).expect("write");
        let p = Paths { ovmf, ..p };
        let err = launch_digest(&inputs(&p, 4, "EPYC-v4", true, false, None), None)
            .expect_err("table at address 0");
        assert!(matches!(err, SnpError::NoKernelHashes { .. }), "{err:?}");
        assert!(err.to_string().contains("address 0"), "{err}");
        // Firmware alone is still fine.
        launch_digest(&inputs(&p, 4, "EPYC-v4", false, false, None), None).expect("digest");
    }

    #[test]
    fn unknown_cpu_models_are_refused() {
        for model in [
            "max",
            "host",
            "",
            "epyc-v4",
            "EPYC-v9",
            "qemu64",
            "EPYC-Milan-v3",
            " EPYC",
        ] {
            let err = cpu_type(model).expect_err(model);
            assert!(
                matches!(&err, SnpError::UnknownCpuModel { model: m } if m == model),
                "{err:?}"
            );
        }
        let message = cpu_type("max").expect_err("max").to_string();
        for part in [
            "\"max\"",
            "EPYC, ",
            "EPYC-v4",
            "EPYC-Milan",
            "EPYC-Genoa",
            "EPYC-Turin-v2",
        ] {
            assert!(message.contains(part), "{message:?} lacks {part:?}");
        }

        let dir = inputs_dir();
        let p = paths(dir.path(), FW_HASHES);
        let err =
            launch_digest(&inputs(&p, 4, "max", true, true, Some(CMDLINE)), None).expect_err("max");
        assert!(matches!(err, SnpError::UnknownCpuModel { .. }), "{err:?}");
    }

    #[test]
    fn cpu_type_maps_every_supported_name() {
        let epyc = 0x0080_0f12; // family 23, model 1, stepping 2
        let rome = 0x0083_0f10; // family 23, model 49, stepping 0
        let milan = 0x00a0_0f11; // family 25, model 1, stepping 1
        let genoa = 0x00a1_0f10; // family 25, model 17, stepping 0
        let turin = 0x00b0_0f00; // family 26, model 0, stepping 0
        let expected = [
            ("EPYC", CpuType::Epyc, epyc),
            ("EPYC-v1", CpuType::EpycV1, epyc),
            ("EPYC-v2", CpuType::EpycV2, epyc),
            ("EPYC-IBPB", CpuType::EpycIBPB, epyc),
            ("EPYC-v3", CpuType::EpycV3, epyc),
            ("EPYC-v4", CpuType::EpycV4, epyc),
            ("EPYC-Rome", CpuType::EpycRome, rome),
            ("EPYC-Rome-v1", CpuType::EpycRomeV1, rome),
            ("EPYC-Rome-v2", CpuType::EpycRomeV2, rome),
            ("EPYC-Rome-v3", CpuType::EpycRomeV3, rome),
            ("EPYC-Milan", CpuType::EpycMilan, milan),
            ("EPYC-Milan-v1", CpuType::EpycMilanV1, milan),
            ("EPYC-Milan-v2", CpuType::EpycMilanV2, milan),
            ("EPYC-Genoa", CpuType::EpycGenoa, genoa),
            ("EPYC-Genoa-v1", CpuType::EpycGenoaV1, genoa),
            ("EPYC-Turin", CpuType::EpycTurin, turin),
            ("EPYC-Turin-v1", CpuType::EpycTurinV1, turin),
            ("EPYC-Turin-v2", CpuType::EpycTurinV2, turin),
        ];
        assert_eq!(
            supported_cpu_models().collect::<Vec<_>>(),
            expected.iter().map(|(name, ..)| *name).collect::<Vec<_>>()
        );
        for (name, cpu, sig) in expected {
            let got = cpu_type(name).expect(name);
            assert_eq!(got, cpu, "{name}");
            assert_eq!(got.to_string(), name, "the crate spells it as QEMU does");
            assert_eq!(got.sig(), sig, "{name}");
            let by_crate = CpuType::try_from(name).expect("the crate knows it");
            assert_eq!(by_crate, cpu, "{name}");
        }
    }

    #[test]
    fn cpu_options_are_accepted_unless_they_change_the_signature() {
        for value in [
            "EPYC-v4,+avx2,-svm",
            "EPYC-Milan,check,enforce",
            "EPYC,model-id=x",
        ] {
            assert!(cpu_type(value).is_ok(), "{value}");
        }
        assert_eq!(
            cpu_type("EPYC-Genoa,+x2apic").ok(),
            Some(CpuType::EpycGenoa)
        );
        for (value, option) in [
            ("EPYC-v4,model=2", "model=2"),
            ("EPYC-Milan,+avx,family=26", "family=26"),
            ("EPYC,stepping=3", "stepping=3"),
        ] {
            let err = cpu_type(value).expect_err(value);
            assert!(
                matches!(&err, SnpError::CpuSignatureOverride { value: v, option: o }
                    if v == value && o == option),
                "{err:?}"
            );
            assert!(err.to_string().contains(option), "{err}");
        }
    }

    /// Debian's OVMF_CODE.fd (package ovmf): SEV metadata, no kernel hashes.
    #[test]
    fn debian_ovmf_code_matches_the_reference_and_refuses_a_kernel() {
        let ovmf = Path::new("/usr/share/OVMF/OVMF_CODE.fd");
        if !ovmf.exists() {
            eprintln!(
                "skipped: {} is absent (Debian package ovmf)",
                ovmf.display()
            );
            return;
        }
        let firmware_only = SnpInputs {
            ovmf,
            kernel: None,
            initrd: None,
            cmdline: None,
            vcpus: 4,
            cpu_model: "EPYC-v4",
        };
        let digest = launch_digest(&firmware_only, None).expect("firmware-only digest");
        let hash = ovmf_hash(ovmf).expect("ovmf hash");
        assert_eq!(
            launch_digest(&firmware_only, Some(&hash)).ok(),
            Some(digest)
        );
        if reference_tool_available() {
            let args = [
                "--mode",
                "snp",
                "--vcpus",
                "4",
                "--vcpu-type",
                "EPYC-v4",
                "--ovmf",
                "/usr/share/OVMF/OVMF_CODE.fd",
                "--output-format",
                "hex",
            ]
            .map(String::from);
            assert_eq!(hex(&digest), run_reference(Path::new("/"), &args));
        } else {
            eprintln!("skipped the comparison: python3 cannot import sevsnpmeasure (pip install sev-snp-measure)");
        }

        let dir = inputs_dir();
        let kernel = dir.path().join(KERNEL);
        let with_kernel = SnpInputs {
            kernel: Some(&kernel),
            cmdline: Some(CMDLINE),
            ..firmware_only
        };
        let err = launch_digest(&with_kernel, None).expect_err("no kernel hashes");
        assert!(
            matches!(&err, SnpError::NoKernelHashes { path, .. } if path == ovmf),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("/usr/share/OVMF/OVMF_CODE.fd"),
            "{err}"
        );
    }

    /// Re-runs every known-answer command: if the generator changed, the
    /// constants (not the code) need regenerating.
    #[test]
    fn reference_tool_reproduces_the_known_answers() {
        if !reference_tool_available() {
            eprintln!("skipped: python3 cannot import sevsnpmeasure (pip install sev-snp-measure)");
            return;
        }
        let dir = inputs_dir();
        for kat in KATS {
            assert_eq!(
                run_reference(dir.path(), &kat.reference_args()),
                kat.digest,
                "{kat:?}"
            );
        }
        let args = ["--mode", "snp:ovmf-hash", "--ovmf", FW_HASHES].map(String::from);
        assert_eq!(run_reference(dir.path(), &args), OVMF_HASH_FW_HASHES);
    }

    #[test]
    fn unreadable_inputs_are_named() {
        let dir = inputs_dir();
        let missing = dir.path().join("missing.bin");

        let p = Paths {
            ovmf: missing.clone(),
            ..paths(dir.path(), FW_HASHES)
        };
        let err = launch_digest(&inputs(&p, 1, "EPYC", false, false, None), None)
            .expect_err("missing firmware");
        assert!(
            matches!(err, SnpError::FirmwareUnreadable { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("missing.bin"), "{err}");
        let err = ovmf_hash(&missing).expect_err("missing firmware");
        assert!(
            matches!(err, SnpError::FirmwareUnreadable { .. }),
            "{err:?}"
        );

        for cmdline in [CMDLINE, CMDLINE_PADDED] {
            let p = Paths {
                kernel: missing.clone(),
                ..paths(dir.path(), FW_HASHES)
            };
            let err = launch_digest(&inputs(&p, 1, "EPYC", true, true, Some(cmdline)), None)
                .expect_err("missing kernel");
            assert!(
                matches!(&err, SnpError::KernelUnreadable { path, .. } if *path == missing),
                "{err:?}"
            );
            assert!(err.to_string().contains("kernel") && err.to_string().contains("missing.bin"));

            let p = Paths {
                initrd: dir.path().to_path_buf(),
                ..paths(dir.path(), FW_HASHES)
            };
            let err = launch_digest(&inputs(&p, 1, "EPYC", true, true, Some(cmdline)), None)
                .expect_err("a directory as initrd");
            assert!(matches!(err, SnpError::InitrdUnreadable { .. }), "{err:?}");
            assert!(err.to_string().contains("initrd"), "{err}");
        }
    }

    #[test]
    fn malformed_firmware_is_an_error_not_a_panic() {
        let dir = inputs_dir();
        let mut bad_signature = test_firmware::build(true);
        let at = test_firmware::SIZE - test_firmware::METADATA_FROM_END;
        bad_signature[at..at + 4].copy_from_slice(b"NOPE");
        let cases: [(&str, Vec<u8>, &str); 6] = [
            ("empty", Vec::new(), "4 KiB pages"),
            ("short", vec![0; 100], "4 KiB pages"),
            ("one page", vec![0; 4096], "not an OVMF image"),
            (
                "random",
                test_firmware::kernel_bytes(9, 0x1_0000),
                "not an OVMF image",
            ),
            (
                "truncated",
                test_firmware::build(true)[..0xf000].to_vec(),
                "not an OVMF image",
            ),
            ("no ASEV", bad_signature, "ASEV"),
        ];
        for (name, image, cause) in cases {
            let ovmf = dir.path().join(format!("{name}.fd"));
            std::fs::write(&ovmf, image).expect("write");
            let p = Paths {
                ovmf: ovmf.clone(),
                ..paths(dir.path(), FW_HASHES)
            };
            let err = launch_digest(&inputs(&p, 2, "EPYC-v4", true, true, Some(CMDLINE)), None)
                .expect_err(name);
            assert!(
                matches!(&err, SnpError::FirmwareInvalid { path, .. } if *path == ovmf),
                "{name}: {err:?}"
            );
            let message = err.to_string();
            assert!(
                message.contains(cause) && message.contains(name),
                "{name}: {message}"
            );
            assert!(ovmf_hash(&ovmf).is_err(), "{name}");
        }
    }

    /// Single-byte corruptions of the image's structures (SEV metadata, GUID
    /// table) give a digest or a typed error, never a panic; whatever the
    /// checks let through, the crate measures without error and the
    /// verbatim composition agrees with it.
    #[test]
    fn corrupted_firmware_never_panics() {
        let dir = inputs_dir();
        let original = test_firmware::build(true);
        let ovmf = dir.path().join("corrupt.fd");
        let p = Paths {
            ovmf: ovmf.clone(),
            ..paths(dir.path(), FW_HASHES)
        };
        let metadata = original.len() - test_firmware::METADATA_FROM_END;
        let table = original.len() - 32 - (4 + 18) - (8 + 18) - (4 + 18) - 18;
        let mut corruptions = Vec::new();
        for at in (metadata..metadata + 16).chain(table..original.len()) {
            corruptions.extend([(at, 0x01), (at, 0x10), (at, 0xff)]);
        }
        // Section entries get small flips only: a size near 4 GiB is valid,
        // just a million zero pages to measure.
        for at in metadata + 16..metadata + 16 + 6 * 12 {
            corruptions.extend([(at, 0x01), (at, 0x10)]);
        }

        let mut outcomes = (0, 0);
        for (at, flip) in corruptions {
            let mut image = original.clone();
            image[at] ^= flip;
            std::fs::write(&ovmf, &image).expect("write");
            let what = format!("byte {at:#x} ^ {flip:#x}");
            let plain = inputs(&p, 2, "EPYC-v4", true, true, Some(CMDLINE));
            match launch_digest(&plain, None) {
                Ok(digest) => {
                    outcomes.0 += 1;
                    let firmware = read_firmware(&ovmf).expect(&what);
                    let table = check_measurable(&firmware, &plain).expect(&what);
                    let own =
                        verbatim::launch_digest(&firmware, table, &plain, None, CpuType::EpycV4);
                    assert_eq!(own.ok(), Some(digest), "{what}");
                }
                Err(err @ SnpError::Measurement { .. }) => panic!("{what}: {err}"),
                Err(_) => outcomes.1 += 1,
            }
            let padded = inputs(&p, 2, "EPYC-v4", true, true, Some(CMDLINE_PADDED));
            let _ = launch_digest(&padded, None);
            let _ = ovmf_hash(&ovmf);
        }
        assert!(outcomes.0 > 0 && outcomes.1 > 0, "{outcomes:?}");
    }

    #[test]
    fn invalid_inputs_are_refused() {
        let dir = inputs_dir();
        let p = paths(dir.path(), FW_HASHES);
        for (inputs, cause) in [
            (
                inputs(&p, 0, "EPYC", true, false, None),
                "at least one vCPU",
            ),
            (inputs(&p, 4097, "EPYC", true, false, None), "4096"),
            (
                inputs(&p, 1, "EPYC", false, true, None),
                "initrd without a kernel",
            ),
            (
                inputs(&p, 1, "EPYC", false, false, Some("x")),
                "command line without a kernel",
            ),
            (inputs(&p, 1, "EPYC", true, false, Some("a\0b")), "NUL"),
        ] {
            let err = launch_digest(&inputs, None).expect_err(cause);
            assert!(matches!(err, SnpError::InvalidInputs(_)), "{err:?}");
            assert!(err.to_string().contains(cause), "{err}");
        }
    }

    #[test]
    fn synthetic_firmware_parses_alike_here_and_in_the_sev_crate() {
        use sev::measurement::ovmf::{SectionType, OVMF};

        let dir = inputs_dir();
        for kernel_hashes in [true, false] {
            let image = test_firmware::build(kernel_hashes);
            assert_eq!(image, test_firmware::build(kernel_hashes), "deterministic");
            assert_eq!(image.len(), test_firmware::SIZE);
            assert_eq!(image.len() % 0x1_0000, 0, "QEMU's -bios granularity");

            let path = dir
                .path()
                .join(if kernel_hashes { FW_HASHES } else { FW_PLAIN });
            let ours = read_firmware(&path).expect("parses here");
            let theirs = OVMF::new(path.clone()).expect("parses in the crate");
            let expected = test_firmware::sections(kernel_hashes);
            assert_eq!(ours.sections.len(), expected.len());
            assert_eq!(theirs.metadata_items().len(), expected.len());
            for ((section, item), (gpa, size, kind)) in ours
                .sections
                .iter()
                .zip(theirs.metadata_items())
                .zip(expected)
            {
                assert_eq!(
                    (section.gpa, section.size, section.kind as u32),
                    (gpa, size, kind)
                );
                assert_eq!((item.gpa, item.size), (gpa, size));
            }
            assert_eq!(ours.reset_eip, test_firmware::RESET_EIP);
            assert_eq!(
                theirs.sev_es_reset_eip().ok(),
                Some(test_firmware::RESET_EIP)
            );
            assert_eq!(ours.gpa(), theirs.gpa());
            assert_eq!(
                theirs.has_metadata_section(SectionType::SnpKernelHashes),
                kernel_hashes
            );
            assert_eq!(theirs.is_sev_hashes_table_supported(), kernel_hashes);
            if kernel_hashes {
                assert_eq!(
                    ours.kernel_hashes().ok(),
                    Some((
                        test_firmware::HASH_TABLE_GPA,
                        test_firmware::HASH_TABLE_SIZE
                    ))
                );
                assert_eq!(
                    theirs.sev_hashes_table_gpa().ok(),
                    Some(u64::from(test_firmware::HASH_TABLE_GPA))
                );
            } else {
                assert!(ours.kernel_hashes().is_err());
            }
        }
    }

    #[test]
    fn guids_match_their_text() {
        for (text, bytes) in [
            (
                "96b582de-1fb2-45f7-baea-a366c55a082d",
                OVMF_TABLE_FOOTER_GUID,
            ),
            (
                "7255371f-3a3b-4b04-927b-1da6efa8d454",
                SEV_HASH_TABLE_RV_GUID,
            ),
            (
                "00f771de-1a7e-4fcb-890e-68c77e2fb44e",
                SEV_ES_RESET_BLOCK_GUID,
            ),
            (
                "dc886566-984a-4798-a75e-5585a7bf67cc",
                OVMF_SEV_METADATA_GUID,
            ),
        ] {
            let uuid = uuid::Uuid::parse_str(text).expect("uuid");
            assert_eq!(uuid.to_bytes_le(), bytes, "{text}");
        }
    }

    #[test]
    fn errors_cross_threads() {
        fn send_sync<T: Send + Sync + 'static>() {}
        send_sync::<SnpError>();
    }

    #[test]
    fn fake_kernels_are_deterministic_and_seeded() {
        let a = test_firmware::kernel_bytes(1, 1000);
        assert_eq!(a, test_firmware::kernel_bytes(1, 1000));
        assert_eq!(a.len(), 1000);
        assert_ne!(a, test_firmware::kernel_bytes(2, 1000));
        assert_eq!(&test_firmware::kernel_bytes(1, 10_000)[..1000], &a[..]);
        assert!(test_firmware::kernel_bytes(3, 0).is_empty());
    }
}
