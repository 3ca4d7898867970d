//! The SEV-SNP launch digest of an IGVM file, as QEMU and the AMD firmware
//! will produce it when QEMU launches that file (`-object igvm-cfg,file=...`,
//! COCONUT-SVSM with OVMF and the vTPM inside).
//!
//! In IGVM mode the manager promises a relying party a launch measurement.
//! The original asked coconut-svsm's `igvmmeasure` tool for it; that tool
//! measures only the first page of a parameter area, and so gives a digest no
//! real launch can have once an area spans several pages. Here the digest is
//! computed from the file's bytes with the `igvm` crate
//! (`igvm::measurement::generate_snp_measurement`), fed the file's SEV-SNP
//! directives in the order in which QEMU hands them to KVM.
//!
//! # How this follows QEMU (read against qemu `backends/igvm.c` and `target/i386/sev.c`)
//!
//! - **Parameter areas: every page is measured.** `qigvm_directive_parameter_insert`
//!   calls the confidential-guest `set_guest_state(gpa, region, size,
//!   CGS_PAGE_TYPE_UNMEASURED)` with the whole area; `cgs_set_guest_state` turns
//!   it into `snp_launch_update_data(..., KVM_SEV_SNP_PAGE_TYPE_UNMEASURED)`, and
//!   KVM's `SNP_LAUNCH_UPDATE` gives the firmware one 4 KiB page at a time, each
//!   chained into the digest as an UNMEASURED page at its own GPA. The crate
//!   does the same (`measurement/snp.rs`: `(gpa..gpa + size).step_by(4096)`).
//!   `igvmmeasure` (`tools/igvmmeasure/src/igvm_measure.rs`, `do_measure`)
//!   measures one 4 KiB page per `ParameterInsert`, which matches QEMU only for
//!   one-page areas.
//! - **Zero pages are NORMAL pages of zeros.** A page without file data becomes
//!   `CGS_PAGE_TYPE_ZERO` (`qigvm_type_to_cgs_type`), which `cgs_set_guest_state`
//!   sends through `launch_update_data`, i.e. `KVM_SEV_SNP_PAGE_TYPE_NORMAL`
//!   over a zeroed page. The crate measures it the same way (as does
//!   `igvmmeasure` without `--native-zero`); the firmware's ZERO page type is
//!   never used. Short data is zero-padded to the page by both.
//! - **Order.** QEMU gathers consecutive page-data directives into a region and
//!   submits the region only when the next page directive does not continue it,
//!   or at the end of the file (`qigvm_process_mem_page`), while a
//!   `ParameterInsert` is submitted at once. A run of pages followed by a
//!   parameter insert is therefore measured *after* the insert. VMSAs are not
//!   submitted with the pages at all: KVM measures them at `SNP_LAUNCH_FINISH`,
//!   after every page, at its fixed GPA `0xFFFFFFFFF000` (QEMU refuses a VP
//!   context at any other GPA, `check_vmsa_supported`). This module reorders
//!   the directives accordingly before handing them to the crate, which itself
//!   measures in file order.
//! - **Filtering.** The platform is the file's SEV-SNP `SupportedPlatform`
//!   header; its compatibility mask selects the directives, as QEMU's
//!   `qigvm_supported_platform_compat_mask` does when SNP is enabled.
//! - **Refused rather than guessed:** page data flagged *shared* (QEMU ignores
//!   the flag and measures the page, the crate skips it) and VP contexts at a
//!   GPA other than KVM's. 2 MiB pages, which the crate would measure as a
//!   single 4 KiB page, are split into the 512 4 KiB pages KVM measures.
//!
//! What the file alone cannot tell:
//! - The digest measures the file's VMSA bytes. KVM measures a VMSA it builds
//!   from the register state QEMU passes on; QEMU refuses a VMSA holding state
//!   it cannot pass, and COCONUT's `igvmbuilder` writes VMSAs it accepts.
//! - The digest counts the VMSAs the file carries (COCONUT-SVSM: one, the boot
//!   vCPU). A KVM that also measures a VMSA for every further vCPU (COCONUT's
//!   2024 host kernel did unless the VM was initialised for an SVSM) makes the
//!   launch measurement depend on the vCPU count; not checked here against
//!   upstream KVM.

use igvm::measurement::{generate_snp_measurement, MeasurementError};
use igvm::{IgvmDirectiveHeader, IgvmFile, IgvmPlatformHeader, IsolationType};
use igvm_defs::{IgvmPlatformType, PAGE_SIZE_4K};

/// The guest-physical address at which KVM measures (and QEMU requires) the
/// initial VMSA of an SEV-SNP guest.
pub const KVM_VMSA_GPA: u64 = 0xFFFF_FFFF_F000;

/// 4 KiB pages in a 2 MiB page.
const PAGES_PER_2MB: u64 = 512;

/// Why the launch digest of an IGVM file could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum IgvmError {
    /// The bytes are not an IGVM file, or a malformed one.
    #[error("not a valid IGVM file: {0}")]
    Parse(#[source] igvm::Error),
    /// The file declares no SEV-SNP platform, so it cannot be launched as an
    /// SEV-SNP guest.
    #[error("the IGVM file declares no SEV-SNP platform (it declares: {declared})")]
    NoSnpPlatform {
        /// The platform types the file does declare.
        declared: String,
    },
    /// The `igvm` crate could not measure the file's SEV-SNP directives.
    #[error("measuring the IGVM file's SEV-SNP directives failed: {0}")]
    Measurement(#[source] MeasurementError),
    /// The file holds something QEMU/KVM would refuse or measure differently
    /// from the `igvm` crate; no digest is better than a wrong one.
    #[error("the IGVM file cannot be measured as QEMU/KVM would launch it: {0}")]
    Unsupported(String),
    /// The `igvm` crate panicked on the file (a malformed file it does not
    /// reject cleanly).
    #[error("the igvm crate panicked on the IGVM file: {0}")]
    Panicked(String),
}

/// The 48-byte SEV-SNP launch digest QEMU + the AMD firmware will produce when
/// launching this IGVM file. Pure: works on the bytes.
pub fn snp_launch_digest(igvm: &[u8]) -> Result<[u8; 48], IgvmError> {
    std::panic::catch_unwind(|| measure(igvm))
        .unwrap_or_else(|payload| Err(IgvmError::Panicked(panic_message(payload.as_ref()))))
}

fn measure(igvm: &[u8]) -> Result<[u8; 48], IgvmError> {
    let file =
        IgvmFile::new_from_binary(igvm, Some(IsolationType::Snp)).map_err(IgvmError::Parse)?;
    let mask = snp_compatibility_mask(file.platforms())?;
    let directives = qemu_order(file.directives(), mask)?;
    generate_snp_measurement(file.initializations(), &directives, mask)
        .map_err(IgvmError::Measurement)
}

/// The compatibility mask of the file's SEV-SNP platform header.
fn snp_compatibility_mask(platforms: &[IgvmPlatformHeader]) -> Result<u32, IgvmError> {
    let snp = platforms.iter().find_map(|platform| match platform {
        IgvmPlatformHeader::SupportedPlatform(info)
            if info.platform_type == IgvmPlatformType::SEV_SNP =>
        {
            Some(info.compatibility_mask)
        }
        _ => None,
    });
    snp.ok_or_else(|| {
        let declared: Vec<String> = platforms
            .iter()
            .map(|platform| match platform {
                IgvmPlatformHeader::SupportedPlatform(info) => format!("{:?}", info.platform_type),
            })
            .collect();
        IgvmError::NoSnpPlatform {
            declared: if declared.is_empty() {
                "none".to_string()
            } else {
                declared.join(", ")
            },
        }
    })
}

/// The directives that apply to the SEV-SNP platform `mask`, in the order in
/// which QEMU submits them for measurement (see the module comment): a run of
/// page data goes after the non-page directives that follow it, up to the
/// next page-data directive; VP contexts (VMSAs) go last, by vCPU index.
fn qemu_order(
    directives: &[IgvmDirectiveHeader],
    mask: u32,
) -> Result<Vec<IgvmDirectiveHeader>, IgvmError> {
    let mut ordered = Vec::with_capacity(directives.len());
    let mut pending_pages: Vec<IgvmDirectiveHeader> = Vec::new();
    // Whether a directive was handled since the pending pages were gathered;
    // QEMU then submits them before the next page starts a new region.
    let mut run_interrupted = false;
    let mut vmsas: Vec<(u16, IgvmDirectiveHeader)> = Vec::new();

    for directive in directives {
        if directive
            .compatibility_mask()
            .is_some_and(|directive_mask| directive_mask & mask == 0)
        {
            continue;
        }
        match directive {
            IgvmDirectiveHeader::PageData {
                gpa,
                compatibility_mask,
                flags,
                data_type,
                data,
            } => {
                if flags.shared() {
                    return Err(IgvmError::Unsupported(format!(
                        "page data at GPA {gpa:#x} is flagged shared: QEMU measures such a page, \
                         the igvm crate does not"
                    )));
                }
                if run_interrupted {
                    ordered.append(&mut pending_pages);
                    run_interrupted = false;
                }
                if flags.is_2mb_page() {
                    // QEMU loads a 2 MiB region; KVM measures it 4 KiB at a time.
                    for index in 0..PAGES_PER_2MB {
                        let page_gpa = index
                            .checked_mul(PAGE_SIZE_4K)
                            .and_then(|offset| gpa.checked_add(offset))
                            .ok_or_else(|| {
                                IgvmError::Unsupported(format!(
                                    "2 MiB page at GPA {gpa:#x} runs past the address space"
                                ))
                            })?;
                        pending_pages.push(IgvmDirectiveHeader::PageData {
                            gpa: page_gpa,
                            compatibility_mask: *compatibility_mask,
                            flags: flags.with_is_2mb_page(false),
                            data_type: *data_type,
                            // The file carries at most 4 KiB of data for a page.
                            data: if index == 0 { data.clone() } else { Vec::new() },
                        });
                    }
                } else {
                    pending_pages.push(directive.clone());
                }
            }
            IgvmDirectiveHeader::SnpVpContext { gpa, vp_index, .. } => {
                if *gpa != KVM_VMSA_GPA {
                    return Err(IgvmError::Unsupported(format!(
                        "the VMSA of vCPU {vp_index} is at GPA {gpa:#x}; KVM measures it at \
                         {KVM_VMSA_GPA:#x} and QEMU refuses any other GPA"
                    )));
                }
                vmsas.push((*vp_index, directive.clone()));
            }
            _ => {
                ordered.push(directive.clone());
                if !pending_pages.is_empty() {
                    run_interrupted = true;
                }
            }
        }
    }
    ordered.append(&mut pending_pages);
    vmsas.sort_by_key(|(vp_index, _)| *vp_index);
    ordered.extend(vmsas.into_iter().map(|(_, vmsa)| vmsa));
    Ok(ordered)
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|message| (*message).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_string())
}

/// A small, deterministic SEV-SNP IGVM file built with the `igvm` crate's own
/// types, for tests here and for the daemon's end-to-end tests (which write it
/// to a file and point the manager at it).
///
/// It holds an SEV-SNP platform (and a native one, whose only page must not be
/// measured), a guest policy, a memory-map parameter area of a chosen number of
/// pages and a one-page vCPU-count parameter area (both inserted, unmeasured),
/// a full page of data, a short page of data, a zero page, an unmeasured page,
/// and the boot vCPU's VMSA at [`KVM_VMSA_GPA`].
#[doc(hidden)]
pub mod test_igvm {
    use super::KVM_VMSA_GPA;
    use igvm::snp_defs::{
        SevEventInjectInfo, SevFeatures, SevSelector, SevVirtualInterruptControl, SevVmsa,
        SevXmmRegister,
    };
    use igvm::{
        IgvmDirectiveHeader, IgvmFile, IgvmInitializationHeader, IgvmPlatformHeader, IgvmRevision,
    };
    use igvm_defs::{
        IgvmPageDataFlags, IgvmPageDataType, IgvmPlatformType, IGVM_NATIVE_PLATFORM_VERSION,
        IGVM_SEV_SNP_PLATFORM_VERSION, IGVM_VHS_PARAMETER, IGVM_VHS_PARAMETER_INSERT,
        IGVM_VHS_SUPPORTED_PLATFORM, PAGE_SIZE_4K,
    };

    /// Compatibility mask of the SEV-SNP platform.
    pub const SNP_MASK: u32 = 0x1;
    /// Compatibility mask of the native platform.
    pub const NATIVE_MASK: u32 = 0x2;
    /// The SNP guest policy in the initialization header (SMT allowed + bit 17).
    pub const POLICY: u64 = 0x3_0000;

    /// Parameter area holding the memory map; its size is chosen by the caller.
    pub const MEMORY_MAP_AREA: u32 = 0;
    /// Where the memory-map area is inserted.
    pub const MEMORY_MAP_GPA: u64 = 0x1_0000;
    /// Parameter area holding the vCPU count; one page.
    pub const VP_COUNT_AREA: u32 = 1;
    /// Where the vCPU-count area is inserted.
    pub const VP_COUNT_GPA: u64 = 0x9000;
    /// The most pages the memory-map area may have (it must end below
    /// [`DATA_GPA`]).
    pub const MAX_PARAMETER_AREA_PAGES: u64 = (DATA_GPA - MEMORY_MAP_GPA) / PAGE_SIZE_4K;

    /// A full page of data: `page_pattern(DATA_SEED, 4096)`.
    pub const DATA_GPA: u64 = 0x10_0000;
    /// Seed of the full data page.
    pub const DATA_SEED: u8 = 1;
    /// A short page of data (zero-padded to the page by the loader).
    pub const SHORT_DATA_GPA: u64 = 0x10_1000;
    /// Seed of the short data page.
    pub const SHORT_DATA_SEED: u8 = 2;
    /// Length of the short data page's data.
    pub const SHORT_DATA_LEN: usize = 100;
    /// A page without data: zeros.
    pub const ZERO_GPA: u64 = 0x10_2000;
    /// A page with data, flagged unmeasured.
    pub const UNMEASURED_GPA: u64 = 0x10_3000;
    /// Seed of the unmeasured page's data.
    pub const UNMEASURED_SEED: u8 = 3;
    /// A page for the native platform only: not part of the SNP launch.
    pub const NATIVE_ONLY_GPA: u64 = 0x10_4000;
    /// Seed of the native-only page's data.
    pub const NATIVE_ONLY_SEED: u8 = 4;

    /// The order of the directives in the file.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Layout {
        /// Parameter areas and their inserts, then the pages, then the VMSA
        /// (as COCONUT's `igvmbuilder` writes its files).
        ParametersFirst,
        /// The pages, then the parameter areas and their inserts, then the VMSA
        /// (QEMU measures the inserts before the pages).
        PagesFirst,
    }

    /// Deterministic page data: byte `i` is `(7 * i + seed) mod 256`.
    pub fn page_pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i.wrapping_mul(7).wrapping_add(usize::from(seed)) % 256) as u8)
            .collect()
    }

    /// The file, parameter areas first, with a memory-map parameter area of
    /// `parameter_area_pages` pages (1 to [`MAX_PARAMETER_AREA_PAGES`]).
    pub fn build(parameter_area_pages: u64) -> Vec<u8> {
        build_with(parameter_area_pages, Layout::ParametersFirst)
    }

    /// The file in the given layout; see [`build`].
    pub fn build_with(parameter_area_pages: u64, layout: Layout) -> Vec<u8> {
        assert!(
            (1..=MAX_PARAMETER_AREA_PAGES).contains(&parameter_area_pages),
            "parameter_area_pages must be 1..={MAX_PARAMETER_AREA_PAGES}"
        );
        let platforms = vec![
            IgvmPlatformHeader::SupportedPlatform(IGVM_VHS_SUPPORTED_PLATFORM {
                compatibility_mask: SNP_MASK,
                highest_vtl: 0,
                platform_type: IgvmPlatformType::SEV_SNP,
                platform_version: IGVM_SEV_SNP_PLATFORM_VERSION,
                shared_gpa_boundary: 0,
            }),
            IgvmPlatformHeader::SupportedPlatform(IGVM_VHS_SUPPORTED_PLATFORM {
                compatibility_mask: NATIVE_MASK,
                highest_vtl: 0,
                platform_type: IgvmPlatformType::NATIVE,
                platform_version: IGVM_NATIVE_PLATFORM_VERSION,
                shared_gpa_boundary: 0,
            }),
        ];
        let initializations = vec![IgvmInitializationHeader::GuestPolicy {
            policy: POLICY,
            compatibility_mask: SNP_MASK,
        }];

        let parameters = vec![
            IgvmDirectiveHeader::ParameterArea {
                number_of_bytes: parameter_area_pages * PAGE_SIZE_4K,
                parameter_area_index: MEMORY_MAP_AREA,
                initial_data: Vec::new(),
            },
            IgvmDirectiveHeader::ParameterArea {
                number_of_bytes: PAGE_SIZE_4K,
                parameter_area_index: VP_COUNT_AREA,
                initial_data: Vec::new(),
            },
            IgvmDirectiveHeader::MemoryMap(IGVM_VHS_PARAMETER {
                parameter_area_index: MEMORY_MAP_AREA,
                byte_offset: 0,
            }),
            IgvmDirectiveHeader::VpCount(IGVM_VHS_PARAMETER {
                parameter_area_index: VP_COUNT_AREA,
                byte_offset: 0,
            }),
            IgvmDirectiveHeader::ParameterInsert(IGVM_VHS_PARAMETER_INSERT {
                gpa: VP_COUNT_GPA,
                compatibility_mask: SNP_MASK,
                parameter_area_index: VP_COUNT_AREA,
            }),
            IgvmDirectiveHeader::ParameterInsert(IGVM_VHS_PARAMETER_INSERT {
                gpa: MEMORY_MAP_GPA,
                compatibility_mask: SNP_MASK,
                parameter_area_index: MEMORY_MAP_AREA,
            }),
        ];

        let page = |gpa: u64, mask: u32, flags: IgvmPageDataFlags, data: Vec<u8>| {
            IgvmDirectiveHeader::PageData {
                gpa,
                compatibility_mask: mask,
                flags,
                data_type: IgvmPageDataType::NORMAL,
                data,
            }
        };
        let normal = IgvmPageDataFlags::new();
        let page_len = PAGE_SIZE_4K as usize;
        let pages = vec![
            page(
                DATA_GPA,
                SNP_MASK,
                normal,
                page_pattern(DATA_SEED, page_len),
            ),
            page(
                SHORT_DATA_GPA,
                SNP_MASK,
                normal,
                page_pattern(SHORT_DATA_SEED, SHORT_DATA_LEN),
            ),
            page(ZERO_GPA, SNP_MASK, normal, Vec::new()),
            page(
                UNMEASURED_GPA,
                SNP_MASK,
                IgvmPageDataFlags::new().with_unmeasured(true),
                page_pattern(UNMEASURED_SEED, page_len),
            ),
            page(
                NATIVE_ONLY_GPA,
                NATIVE_MASK,
                normal,
                page_pattern(NATIVE_ONLY_SEED, page_len),
            ),
        ];

        let vp_context = IgvmDirectiveHeader::SnpVpContext {
            gpa: KVM_VMSA_GPA,
            compatibility_mask: SNP_MASK,
            vp_index: 0,
            vmsa: vmsa(),
        };

        let mut directives = Vec::new();
        match layout {
            Layout::ParametersFirst => {
                directives.extend(parameters);
                directives.extend(pages);
            }
            Layout::PagesFirst => {
                directives.extend(pages);
                directives.extend(parameters);
            }
        }
        directives.push(vp_context);

        let file = IgvmFile::new(IgvmRevision::V1, platforms, initializations, directives)
            .expect("the test IGVM file is valid by construction");
        let mut bytes = Vec::new();
        file.serialize(&mut bytes)
            .expect("the test IGVM file serializes");
        bytes
    }

    const fn selector(selector: u16, attrib: u16, limit: u32, base: u64) -> SevSelector {
        SevSelector {
            selector,
            attrib,
            limit,
            base,
        }
    }

    /// The boot vCPU's VMSA: the x86 reset state (real mode, `CS:IP` =
    /// `F000:FFF0`) with SEV-SNP active, as QEMU/KVM accept it.
    pub fn vmsa() -> Box<SevVmsa> {
        let data = selector(0, 0x93, 0xffff, 0);
        let zero_xmm = SevXmmRegister { low: 0, high: 0 };
        Box::new(SevVmsa {
            es: data,
            cs: selector(0xf000, 0x9b, 0xffff, 0xffff_0000),
            ss: data,
            ds: data,
            fs: data,
            gs: data,
            gdtr: selector(0, 0, 0xffff, 0),
            ldtr: selector(0, 0x82, 0xffff, 0),
            idtr: selector(0, 0, 0xffff, 0),
            tr: selector(0, 0x8b, 0xffff, 0),
            pl0_ssp: 0,
            pl1_ssp: 0,
            pl2_ssp: 0,
            pl3_ssp: 0,
            u_cet: 0,
            vmsa_reserved1: [0; 2],
            vmpl: 0,
            cpl: 0,
            vmsa_reserved2: 0,
            efer: 0x1000,
            vmsa_reserved3: [0; 26],
            xss: 0,
            cr4: 0x40,
            cr3: 0,
            cr0: 0x30,
            dr7: 0x400,
            dr6: 0xffff_0ff0,
            rflags: 0x2,
            rip: 0xfff0,
            dr0: 0,
            dr1: 0,
            dr2: 0,
            dr3: 0,
            dr0_addr_mask: 0,
            dr1_addr_mask: 0,
            dr2_addr_mask: 0,
            dr3_addr_mask: 0,
            vmsa_reserved4: [0; 3],
            rsp: 0,
            s_cet: 0,
            ssp: 0,
            interrupt_ssp_table_addr: 0,
            rax: 0,
            star: 0,
            lstar: 0,
            cstar: 0,
            sfmask: 0,
            kernel_gs_base: 0,
            sysenter_cs: 0,
            sysenter_esp: 0,
            sysenter_eip: 0,
            cr2: 0,
            vmsa_reserved5: [0; 4],
            pat: 0x0007_0406_0007_0406,
            dbgctl: 0,
            last_branch_from_ip: 0,
            last_branch_to_ip: 0,
            last_excp_from_ip: 0,
            last_excp_to_ip: 0,
            vmsa_reserved6: [0; 9],
            spec_ctrl: 0,
            vmsa_reserved7: [0; 8],
            rcx: 0,
            rdx: 0,
            rbx: 0,
            vmsa_reserved8: 0,
            rbp: 0,
            rsi: 0,
            rdi: 0,
            r8: 0,
            r9: 0,
            r10: 0,
            r11: 0,
            r12: 0,
            r13: 0,
            r14: 0,
            r15: 0,
            vmsa_reserved9: [0; 2],
            exit_info1: 0,
            exit_info2: 0,
            exit_int_info: 0,
            next_rip: 0,
            sev_features: SevFeatures::new().with_snp(true),
            v_intr_cntrl: SevVirtualInterruptControl(0),
            guest_error_code: 0,
            virtual_tom: 0,
            tlb_id: 0,
            pcpu_id: 0,
            event_inject: SevEventInjectInfo(0),
            xcr0: 0x1,
            xsave_valid_bitmap: [0; 16],
            x87dp: 0,
            mxcsr: 0x1f80,
            x87_ftw: 0,
            x87_fsw: 0,
            x87_fcw: 0x37f,
            x87_op: 0,
            x87_ds: 0,
            x87_cs: 0,
            x87_rip: 0,
            x87_registers1: [0; 32],
            x87_registers2: [0; 32],
            x87_registers3: [0; 16],
            xmm_registers: [zero_xmm; 16],
            ymm_registers: [zero_xmm; 16],
            vmsa_padding: [0; 2448],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::test_igvm::{self, Layout};
    use super::*;
    use igvm::{IgvmInitializationHeader, IgvmRevision};
    use igvm_defs::{
        IgvmPageDataFlags, IgvmPageDataType, IGVM_SEV_SNP_PLATFORM_VERSION,
        IGVM_TDX_PLATFORM_VERSION, IGVM_VHS_SUPPORTED_PLATFORM,
        IGVM_VSM_ISOLATION_PLATFORM_VERSION,
    };
    use sha2::{Digest, Sha384};

    // ---- An independent reference: the SNP_LAUNCH_UPDATE page-info chain ----
    //
    // AMD SEV-SNP firmware ABI, PAGE_INFO: DIGEST_CUR[48] ‖ CONTENTS[48] ‖
    // LENGTH u16 (0x70) ‖ PAGE_TYPE u8 ‖ IMI_PAGE u8 ‖ VMPL3/2/1 perms u8×3 ‖
    // reserved u8 ‖ GPA u64, little-endian; the new digest is its SHA-384.

    const PAGE_NORMAL: u8 = 1;
    const PAGE_VMSA: u8 = 2;
    const PAGE_UNMEASURED: u8 = 4;
    const PAGE: usize = 4096;

    struct Chain([u8; 48]);

    impl Chain {
        fn new() -> Self {
            Chain([0; 48])
        }

        fn update(&mut self, page_type: u8, gpa: u64, contents: [u8; 48]) {
            let mut info = Vec::with_capacity(0x70);
            info.extend_from_slice(&self.0);
            info.extend_from_slice(&contents);
            info.extend_from_slice(&0x70u16.to_le_bytes());
            info.push(page_type);
            info.push(0); // IMI_PAGE
            info.extend_from_slice(&[0, 0, 0]); // VMPL3, VMPL2, VMPL1 permissions
            info.push(0); // reserved
            info.extend_from_slice(&gpa.to_le_bytes());
            assert_eq!(info.len(), 0x70);
            self.0 = Sha384::digest(&info).into();
        }

        /// A NORMAL page: CONTENTS is the SHA-384 of the page, zero-padded.
        fn normal(&mut self, gpa: u64, data: &[u8]) {
            let mut page = data.to_vec();
            page.resize(PAGE, 0);
            self.update(PAGE_NORMAL, gpa, Sha384::digest(&page).into());
        }

        fn unmeasured(&mut self, gpa: u64) {
            self.update(PAGE_UNMEASURED, gpa, [0; 48]);
        }

        fn vmsa(&mut self, gpa: u64, page: &[u8]) {
            self.update(PAGE_VMSA, gpa, Sha384::digest(page).into());
        }
    }

    /// The builder's VMSA as bytes, laid out from the AMD64 APM's VMSA table
    /// (vol. 2, "VMSA layout, state save area for SEV-ES"), not from the crate.
    fn reference_vmsa_page() -> Vec<u8> {
        let mut page = vec![0u8; PAGE];
        let mut put = |offset: usize, bytes: &[u8]| {
            page[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        let mut segment = |offset: usize, selector: u16, attrib: u16, limit: u32, base: u64| {
            put(offset, &selector.to_le_bytes());
            put(offset + 2, &attrib.to_le_bytes());
            put(offset + 4, &limit.to_le_bytes());
            put(offset + 8, &base.to_le_bytes());
        };
        segment(0x00, 0, 0x93, 0xffff, 0); // ES
        segment(0x10, 0xf000, 0x9b, 0xffff, 0xffff_0000); // CS
        segment(0x20, 0, 0x93, 0xffff, 0); // SS
        segment(0x30, 0, 0x93, 0xffff, 0); // DS
        segment(0x40, 0, 0x93, 0xffff, 0); // FS
        segment(0x50, 0, 0x93, 0xffff, 0); // GS
        segment(0x60, 0, 0, 0xffff, 0); // GDTR
        segment(0x70, 0, 0x82, 0xffff, 0); // LDTR
        segment(0x80, 0, 0, 0xffff, 0); // IDTR
        segment(0x90, 0, 0x8b, 0xffff, 0); // TR
        let mut put = |offset: usize, bytes: &[u8]| {
            page[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        put(0xd0, &0x1000u64.to_le_bytes()); // EFER
        put(0x148, &0x40u64.to_le_bytes()); // CR4
        put(0x158, &0x30u64.to_le_bytes()); // CR0
        put(0x160, &0x400u64.to_le_bytes()); // DR7
        put(0x168, &0xffff_0ff0u64.to_le_bytes()); // DR6
        put(0x170, &0x2u64.to_le_bytes()); // RFLAGS
        put(0x178, &0xfff0u64.to_le_bytes()); // RIP
        put(0x268, &0x0007_0406_0007_0406u64.to_le_bytes()); // G_PAT
        put(0x3b0, &0x1u64.to_le_bytes()); // SEV_FEATURES: SNP active
        put(0x3e8, &0x1u64.to_le_bytes()); // XCR0
        put(0x408, &0x1f80u32.to_le_bytes()); // MXCSR
        put(0x410, &0x37fu16.to_le_bytes()); // X87_FCW
        page
    }

    /// How the reference measures the memory-map parameter area.
    #[derive(Clone, Copy)]
    enum AreaPages {
        /// Every page, as QEMU/KVM do.
        All,
        /// Only the first, as coconut-svsm's igvmmeasure does.
        FirstOnly,
    }

    /// The launch digest of `test_igvm::build_with(pages, _)`, from the list of
    /// what the builder puts in, in QEMU's order: the parameter inserts (in
    /// file order), then the SNP pages, then the VMSA. (With
    /// `Layout::PagesFirst` QEMU still measures the inserts first.)
    fn reference_digest(parameter_area_pages: u64, area: AreaPages) -> [u8; 48] {
        let mut chain = Chain::new();
        chain.unmeasured(test_igvm::VP_COUNT_GPA);
        let measured_pages = match area {
            AreaPages::All => parameter_area_pages,
            AreaPages::FirstOnly => 1,
        };
        for page in 0..measured_pages {
            chain.unmeasured(test_igvm::MEMORY_MAP_GPA + page * 4096);
        }
        measure_pages(&mut chain);
        chain.vmsa(KVM_VMSA_GPA, &reference_vmsa_page());
        chain.0
    }

    /// The SNP pages of the builder, in file order; the native-only page is
    /// not among them.
    fn measure_pages(chain: &mut Chain) {
        chain.normal(
            test_igvm::DATA_GPA,
            &test_igvm::page_pattern(test_igvm::DATA_SEED, PAGE),
        );
        chain.normal(
            test_igvm::SHORT_DATA_GPA,
            &test_igvm::page_pattern(test_igvm::SHORT_DATA_SEED, test_igvm::SHORT_DATA_LEN),
        );
        chain.normal(test_igvm::ZERO_GPA, &[]); // QEMU: ZERO -> NORMAL page of zeros
        chain.unmeasured(test_igvm::UNMEASURED_GPA);
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|byte| format!("{byte:02x}")).collect()
    }

    // ---- Pinned known answers ----
    //
    // Produced by `reference_digest` above (the page-info chain written here
    // from the AMD ABI, over the builder's own list of pages), and checked
    // independently with this Python 3 script (hashlib only), which printed
    // the same three values for 1 and 3 pages (all) and 3 pages (first only):
    //
    //   python3 - <<'EOF'
    //   import hashlib, struct
    //   def chain(d, t, gpa, c): return hashlib.sha384(d + c + struct.pack('<HBBBBBBQ', 0x70, t, 0, 0, 0, 0, 0, gpa)).digest()
    //   pat = lambda s, n: bytes((7 * i + s) % 256 for i in range(n))
    //   h = lambda b: hashlib.sha384(b.ljust(4096, b'\0')).digest()
    //   v = bytearray(4096)
    //   def seg(o, s, a, l, b): v[o:o + 16] = struct.pack('<HHIQ', s, a, l, b)
    //   for o in (0x00, 0x20, 0x30, 0x40, 0x50): seg(o, 0, 0x93, 0xffff, 0)
    //   seg(0x10, 0xf000, 0x9b, 0xffff, 0xffff0000); seg(0x60, 0, 0, 0xffff, 0)
    //   seg(0x70, 0, 0x82, 0xffff, 0); seg(0x80, 0, 0, 0xffff, 0); seg(0x90, 0, 0x8b, 0xffff, 0)
    //   for o, x in ((0xd0, 0x1000), (0x148, 0x40), (0x158, 0x30), (0x160, 0x400), (0x168, 0xffff0ff0),
    //                (0x170, 2), (0x178, 0xfff0), (0x268, 0x0007040600070406), (0x3b0, 1), (0x3e8, 1)):
    //       v[o:o + 8] = struct.pack('<Q', x)
    //   v[0x408:0x40c] = struct.pack('<I', 0x1f80); v[0x410:0x412] = struct.pack('<H', 0x37f)
    //   def digest(n):
    //       d = bytes(48); z = bytes(48)
    //       d = chain(d, 4, 0x9000, z)
    //       for p in range(n): d = chain(d, 4, 0x10000 + p * 4096, z)
    //       d = chain(d, 1, 0x100000, h(pat(1, 4096))); d = chain(d, 1, 0x101000, h(pat(2, 100)))
    //       d = chain(d, 1, 0x102000, h(b'')); d = chain(d, 4, 0x103000, z)
    //       return chain(d, 2, 0xfffffffff000, hashlib.sha384(bytes(v)).digest()).hex()
    //   print(digest(1)); print(digest(3))
    //   EOF
    //
    // (igvmmeasure's first-page-only value for the 3-page file is `digest(1)`.)
    const DIGEST_1_PAGE: &str =
        "23935affa356ee0424e8f33028e6b3d87f34973814c7e7073f9458fa5f910d702940a9358b3da77a0f554c8c5b54f880";
    const DIGEST_3_PAGES: &str =
        "351c4e066ec36179a4f25002501c336a18af386b7e9c1b24b168cb5fa5a58892a92e75756e1e2f022e7679e3a53cb8f0";

    #[test]
    fn digest_matches_the_independent_reference() {
        for pages in [1, 2, 3, 8] {
            let digest = snp_launch_digest(&test_igvm::build(pages)).expect("digest");
            assert_eq!(
                hex(&digest),
                hex(&reference_digest(pages, AreaPages::All)),
                "{pages} parameter-area pages"
            );
        }
    }

    #[test]
    fn digest_matches_the_pinned_known_answers() {
        let one = snp_launch_digest(&test_igvm::build(1)).expect("digest");
        let three = snp_launch_digest(&test_igvm::build(3)).expect("digest");
        assert_eq!(hex(&one), DIGEST_1_PAGE);
        assert_eq!(hex(&three), DIGEST_3_PAGES);
    }

    #[test]
    fn every_page_of_a_multi_page_parameter_area_is_measured() {
        let one = snp_launch_digest(&test_igvm::build(1)).expect("digest");
        let three = snp_launch_digest(&test_igvm::build(3)).expect("digest");
        assert_ne!(one, three, "the area's size must change the digest");
        assert_eq!(three, reference_digest(3, AreaPages::All));

        // What igvmmeasure would say for the 3-page file: only the first page
        // of the area measured. QEMU does not launch that.
        let first_page_only = reference_digest(3, AreaPages::FirstOnly);
        assert_ne!(three, first_page_only);
        assert_eq!(one, first_page_only);
    }

    #[test]
    fn parameter_inserts_after_pages_are_measured_before_them_as_qemu_does() {
        let pages_first =
            snp_launch_digest(&test_igvm::build_with(3, Layout::PagesFirst)).expect("digest");
        assert_eq!(pages_first, reference_digest(3, AreaPages::All));

        // File order (pages, then inserts) would give another digest.
        let mut chain = Chain::new();
        measure_pages(&mut chain);
        chain.unmeasured(test_igvm::VP_COUNT_GPA);
        for page in 0..3 {
            chain.unmeasured(test_igvm::MEMORY_MAP_GPA + page * 4096);
        }
        chain.vmsa(KVM_VMSA_GPA, &reference_vmsa_page());
        assert_ne!(pages_first, chain.0);
    }

    #[test]
    fn the_builder_is_deterministic() {
        assert_eq!(test_igvm::build(2), test_igvm::build(2));
        assert_ne!(test_igvm::build(1), test_igvm::build(2));
    }

    #[test]
    fn garbage_is_a_parse_error() {
        for bytes in [&b""[..], b"not an IGVM file at all", &[0xffu8; 4096][..]] {
            let error = snp_launch_digest(bytes).expect_err("garbage");
            assert!(matches!(error, IgvmError::Parse(_)), "{error:?}");
            assert!(error.to_string().contains("not a valid IGVM file"));
        }
        // A real file, truncated.
        let file = test_igvm::build(1);
        let error = snp_launch_digest(&file[..file.len() - 1]).expect_err("truncated");
        assert!(matches!(error, IgvmError::Parse(_)), "{error:?}");
    }

    fn serialize(
        platforms: Vec<IgvmPlatformHeader>,
        initializations: Vec<IgvmInitializationHeader>,
        directives: Vec<IgvmDirectiveHeader>,
    ) -> Vec<u8> {
        let file = IgvmFile::new(IgvmRevision::V1, platforms, initializations, directives)
            .expect("valid file");
        let mut bytes = Vec::new();
        file.serialize(&mut bytes).expect("serialize");
        bytes
    }

    fn platform(platform_type: IgvmPlatformType, version: u16) -> IgvmPlatformHeader {
        IgvmPlatformHeader::SupportedPlatform(IGVM_VHS_SUPPORTED_PLATFORM {
            compatibility_mask: 1,
            highest_vtl: 0,
            platform_type,
            platform_version: version,
            shared_gpa_boundary: 0,
        })
    }

    fn data_page(gpa: u64, flags: IgvmPageDataFlags, data: Vec<u8>) -> IgvmDirectiveHeader {
        IgvmDirectiveHeader::PageData {
            gpa,
            compatibility_mask: 1,
            flags,
            data_type: IgvmPageDataType::NORMAL,
            data,
        }
    }

    fn snp_policy() -> Vec<IgvmInitializationHeader> {
        vec![IgvmInitializationHeader::GuestPolicy {
            policy: test_igvm::POLICY,
            compatibility_mask: 1,
        }]
    }

    #[test]
    fn a_file_without_an_snp_platform_is_refused() {
        for (platform_type, version) in [
            (
                IgvmPlatformType::VSM_ISOLATION,
                IGVM_VSM_ISOLATION_PLATFORM_VERSION,
            ),
            (IgvmPlatformType::TDX, IGVM_TDX_PLATFORM_VERSION),
        ] {
            let bytes = serialize(
                vec![platform(platform_type, version)],
                Vec::new(),
                vec![data_page(0x1000, IgvmPageDataFlags::new(), vec![1; 16])],
            );
            let error = snp_launch_digest(&bytes).expect_err("no SNP platform");
            assert!(
                matches!(error, IgvmError::NoSnpPlatform { .. }),
                "{error:?}"
            );
            assert!(error.to_string().contains("no SEV-SNP platform"), "{error}");
        }
    }

    #[test]
    fn an_snp_file_without_a_guest_policy_is_a_measurement_error() {
        let bytes = serialize(
            vec![platform(
                IgvmPlatformType::SEV_SNP,
                IGVM_SEV_SNP_PLATFORM_VERSION,
            )],
            Vec::new(),
            vec![data_page(0x1000, IgvmPageDataFlags::new(), vec![1; 16])],
        );
        let error = snp_launch_digest(&bytes).expect_err("no policy");
        assert!(matches!(error, IgvmError::Measurement(_)), "{error:?}");
    }

    #[test]
    fn a_vmsa_away_from_kvms_gpa_is_refused() {
        let bytes = serialize(
            vec![platform(
                IgvmPlatformType::SEV_SNP,
                IGVM_SEV_SNP_PLATFORM_VERSION,
            )],
            snp_policy(),
            vec![IgvmDirectiveHeader::SnpVpContext {
                gpa: 0x8000,
                compatibility_mask: 1,
                vp_index: 0,
                vmsa: test_igvm::vmsa(),
            }],
        );
        let error = snp_launch_digest(&bytes).expect_err("VMSA GPA");
        assert!(matches!(error, IgvmError::Unsupported(_)), "{error:?}");
    }

    #[test]
    fn a_shared_page_is_refused() {
        let bytes = serialize(
            vec![platform(
                IgvmPlatformType::SEV_SNP,
                IGVM_SEV_SNP_PLATFORM_VERSION,
            )],
            snp_policy(),
            vec![data_page(
                0x1000,
                IgvmPageDataFlags::new().with_shared(true),
                vec![1; 16],
            )],
        );
        let error = snp_launch_digest(&bytes).expect_err("shared page");
        assert!(matches!(error, IgvmError::Unsupported(_)), "{error:?}");
    }

    #[test]
    fn a_2mb_page_is_measured_as_512_pages() {
        let data = test_igvm::page_pattern(9, 64);
        let bytes = serialize(
            vec![platform(
                IgvmPlatformType::SEV_SNP,
                IGVM_SEV_SNP_PLATFORM_VERSION,
            )],
            snp_policy(),
            vec![data_page(
                0x20_0000,
                IgvmPageDataFlags::new().with_is_2mb_page(true),
                data.clone(),
            )],
        );
        let mut chain = Chain::new();
        chain.normal(0x20_0000, &data);
        for page in 1..512u64 {
            chain.normal(0x20_0000 + page * 4096, &[]);
        }
        assert_eq!(snp_launch_digest(&bytes).expect("digest"), chain.0);
    }
}
