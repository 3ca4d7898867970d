//! The attestation policy document `AttestationPolicy` answers: what a VM's
//! hardware report (and vTPM quote) must say. Shaped as the original's
//! (go-sev-guest `check.Config` fields, `pcr_values`, `root_of_trust`), built
//! from the operator's base document (platform facts we cannot compute: chip
//! id, TCB floors, product) overridden by what we computed for that very
//! launch. Also the checks of the two operator files that feed it.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// The SNP guest policy QEMU launches with when none is given (0x30000: SMT
/// allowed, reserved bit 17 set), as the original reports it.
pub const SNP_GUEST_POLICY: u64 = 196_608;
/// The VM privilege level reports come from under COCONUT-SVSM (IGVM): the
/// guest OS runs at VMPL2 there, as the original reports it.
pub const VMPL_WITH_SVSM: u32 = 2;
/// Without SVSM (OVMF direct boot) the guest OS itself runs at VMPL0 and
/// requests its reports there.
pub const VMPL_WITHOUT_SVSM: u32 = 0;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocumentError {
    #[error("{what} is not valid JSON: {detail}")]
    Json { what: String, detail: String },
    #[error("{what}: {detail}")]
    Shape { what: String, detail: String },
}

/// How a VM was launched, as far as attestation is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LaunchKind {
    /// No confidential computing: nothing to attest.
    Plain,
    /// SEV-SNP, OVMF with `-bios` and measured kernel hashes.
    SevSnpOvmf,
    /// SEV-SNP, an IGVM file (COCONUT-SVSM).
    SevSnpIgvm,
    Tdx,
}

impl LaunchKind {
    pub fn is_sev_snp(self) -> bool {
        matches!(self, LaunchKind::SevSnpOvmf | LaunchKind::SevSnpIgvm)
    }
}

/// A VM's attestation state, fixed when it is created and kept in its
/// record: the computed facts and the document answered for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttestationState {
    pub launch: LaunchKind,
    /// SEV-SNP launch digest, 48 bytes, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measurement: Option<String>,
    /// SEV-SNP host data on the command line, 32 bytes, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_data: Option<String>,
    /// Whether the host-data value is the per-VM digest (else the operator's).
    #[serde(default)]
    pub host_data_per_vm: bool,
    /// A host-side software TPM is attached.
    #[serde(default)]
    pub vtpm: bool,
    /// The JSON document answered by `AttestationPolicy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document: Option<String>,
    /// Why there is no document (answered as FAILED_PRECONDITION).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

const BANKS: &[(&str, usize)] = &[("sha1", 20), ("sha256", 32), ("sha384", 48), ("sha512", 64)];

/// Checks the text of the `MANAGER_PCR_VALUES` file and returns its
/// `pcr_values` section: bank → decimal PCR index (0–23) → hex digest of
/// the bank's length. The file may be that object itself or a document with
/// a `pcr_values` member (the shape the original's file has).
pub fn parse_pcr_values(text: &str, what: &str) -> Result<Value, DocumentError> {
    let value: Value = serde_json::from_str(text).map_err(|e| DocumentError::Json {
        what: what.to_string(),
        detail: e.to_string(),
    })?;
    let shape = |detail: String| DocumentError::Shape {
        what: what.to_string(),
        detail,
    };
    let section = match value.get("pcr_values") {
        Some(inner) => inner.clone(),
        None => value,
    };
    let Value::Object(banks) = &section else {
        return Err(shape(
            "must be an object of banks (sha1, sha256, sha384, sha512)".into(),
        ));
    };
    if banks.is_empty() {
        return Err(shape("holds no PCR bank".into()));
    }
    for (bank, pcrs) in banks {
        let Some((_, len)) = BANKS.iter().find(|(name, _)| name == bank) else {
            return Err(shape(format!(
                "unknown bank {bank:?} (expected sha1, sha256, sha384 or sha512)"
            )));
        };
        let Value::Object(pcrs) = pcrs else {
            return Err(shape(format!(
                "bank {bank} must map PCR indexes to hex digests"
            )));
        };
        for (index, digest) in pcrs {
            match index.parse::<u8>() {
                Ok(i) if i <= 23 && i.to_string() == *index => {}
                _ => {
                    return Err(shape(format!(
                        "bank {bank}: {index:?} is not a PCR index from 0 to 23"
                    )))
                }
            }
            let Some(hex) = digest.as_str() else {
                return Err(shape(format!(
                    "bank {bank}, PCR {index}: the digest must be a hex string"
                )));
            };
            if hex.len() != len * 2 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(shape(format!(
                    "bank {bank}, PCR {index}: {hex:?} is not {len} bytes of hex"
                )));
            }
        }
    }
    Ok(section)
}

/// Checks an operator's base document (`MANAGER_ATTESTATION_BASE_POLICY`,
/// or the output of `MANAGER_ATTESTATION_POLICY_BINARY`): a JSON object
/// whose `policy` and `root_of_trust`, where present, are objects.
pub fn parse_base_document(text: &str, what: &str) -> Result<Value, DocumentError> {
    let value: Value = serde_json::from_str(text).map_err(|e| DocumentError::Json {
        what: what.to_string(),
        detail: e.to_string(),
    })?;
    let shape = |detail: &str| DocumentError::Shape {
        what: what.to_string(),
        detail: detail.to_string(),
    };
    let Value::Object(map) = &value else {
        return Err(shape("must be a JSON object"));
    };
    for key in ["policy", "root_of_trust", "pcr_values"] {
        if map.get(key).is_some_and(|v| !v.is_object()) {
            return Err(shape(&format!("{key} must be an object")));
        }
    }
    Ok(value)
}

/// What the platform itself says (SEV firmware through `/dev/sev`), each
/// field only when known. Written into `policy`, over the base document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlatformFacts {
    pub chip_id: Option<Vec<u8>>,
    pub minimum_tcb: Option<u64>,
    pub minimum_launch_tcb: Option<u64>,
    pub minimum_build: Option<u32>,
    pub minimum_version: Option<String>,
}

impl PlatformFacts {
    pub fn is_empty(&self) -> bool {
        *self == PlatformFacts::default()
    }
}

/// Everything the document is made from besides the VM's own state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DocumentInputs {
    pub base: Option<Value>,
    pub platform: PlatformFacts,
    pub pcr_values: Option<Value>,
}

fn object(value: &mut Value) -> &mut Map<String, Value> {
    if !value.is_object() {
        *value = Value::Object(Map::new());
    }
    match value {
        Value::Object(map) => map,
        _ => unreachable!("just made an object"),
    }
}

/// The document for a VM in `state`, or why there is none (the reason is
/// answered as FAILED_PRECONDITION).
pub fn build(state: &AttestationState, inputs: &DocumentInputs) -> Result<Value, String> {
    match state.launch {
        LaunchKind::Plain => Err(
            "this VM was launched without SEV-SNP or TDX, so it has no launch measurement to attest"
                .to_string(),
        ),
        LaunchKind::Tdx => {
            let Some(base) = &inputs.base else {
                return Err("TDX: no policy document is configured (MANAGER_ATTESTATION_BASE_POLICY); the manager computes no TDX measurement and never invents one".to_string());
            };
            let mut doc = base.clone();
            if let Some(pcrs) = &inputs.pcr_values {
                object(&mut doc).insert("pcr_values".into(), pcrs.clone());
            }
            Ok(doc)
        }
        LaunchKind::SevSnpOvmf | LaunchKind::SevSnpIgvm => {
            let Some(measurement) = &state.measurement else {
                return Err("this VM has no launch measurement".to_string());
            };
            let mut doc = inputs.base.clone().unwrap_or_else(|| json!({}));
            let root = object(&mut doc);
            let policy = object(root.entry("policy").or_insert_with(|| json!({})));
            policy.insert("measurement".into(), json!(measurement));
            if let Some(host_data) = &state.host_data {
                policy.insert("host_data".into(), json!(host_data));
            }
            policy.insert("policy".into(), json!(SNP_GUEST_POLICY));
            let vmpl = if state.launch == LaunchKind::SevSnpIgvm {
                VMPL_WITH_SVSM
            } else {
                VMPL_WITHOUT_SVSM
            };
            policy.insert("vmpl".into(), json!(vmpl));
            let facts = &inputs.platform;
            if let Some(chip_id) = &facts.chip_id {
                policy.insert("chip_id".into(), json!(b64(chip_id)));
            }
            if let Some(tcb) = facts.minimum_tcb {
                policy.insert("minimum_tcb".into(), json!(tcb));
            }
            if let Some(tcb) = facts.minimum_launch_tcb {
                policy.insert("minimum_launch_tcb".into(), json!(tcb));
            }
            if let Some(build) = facts.minimum_build {
                policy.insert("minimum_build".into(), json!(build));
            }
            if let Some(version) = &facts.minimum_version {
                policy.insert("minimum_version".into(), json!(version));
            }
            if let Some(pcrs) = &inputs.pcr_values {
                root.insert("pcr_values".into(), pcrs.clone());
            }
            Ok(doc)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snp_state(launch: LaunchKind) -> AttestationState {
        AttestationState {
            launch,
            measurement: Some(b64(&[7u8; 48])),
            host_data: Some(b64(&[9u8; 32])),
            host_data_per_vm: true,
            vtpm: false,
            document: None,
            unavailable: None,
        }
    }

    #[test]
    fn pcr_values_accepts_both_shapes() {
        let hex32 = "ab".repeat(32);
        let bare = format!(r#"{{"sha256": {{"0": "{hex32}", "9": "{hex32}"}}}}"#);
        let wrapped = format!(r#"{{"pcr_values": {bare}}}"#);
        let a = parse_pcr_values(&bare, "f").expect("bare");
        let b = parse_pcr_values(&wrapped, "f").expect("wrapped");
        assert_eq!(a, b);
        assert_eq!(a["sha256"]["9"], json!(hex32));
    }

    #[test]
    fn pcr_values_refuses_what_a_verifier_could_not_use() {
        let hex32 = "ab".repeat(32);
        for (text, needle) in [
            ("not json", "not valid JSON"),
            ("[]", "object of banks"),
            ("{}", "no PCR bank"),
            (r#"{"md5": {}}"#, "unknown bank"),
            (r#"{"sha256": []}"#, "map PCR indexes"),
            (&format!(r#"{{"sha256": {{"24": "{hex32}"}}}}"#), "0 to 23"),
            (&format!(r#"{{"sha256": {{"01": "{hex32}"}}}}"#), "0 to 23"),
            (r#"{"sha256": {"0": "abcd"}}"#, "32 bytes of hex"),
            (r#"{"sha384": {"0": 5}}"#, "hex string"),
            (&format!(r#"{{"sha384": {{"0": "{hex32}"}}}}"#), "48 bytes"),
        ] {
            let err = parse_pcr_values(text, "MANAGER_PCR_VALUES x.json")
                .expect_err(text)
                .to_string();
            assert!(err.contains(needle), "{text}: {err}");
            assert!(err.starts_with("MANAGER_PCR_VALUES x.json"), "{err}");
        }
    }

    #[test]
    fn base_document_must_be_an_object_with_object_sections() {
        assert!(parse_base_document(r#"{"policy": {"chip_id": "x"}}"#, "b").is_ok());
        assert!(parse_base_document("[1]", "b").is_err());
        assert!(parse_base_document(r#"{"policy": 1}"#, "b").is_err());
        assert!(parse_base_document("{", "b").is_err());
    }

    #[test]
    fn snp_document_has_ours_over_the_base() {
        let base = json!({
            "policy": {"measurement": "old", "host_data": "old", "policy": 1, "vmpl": 3,
                        "chip_id": "base-chip", "product": {"name": 1}},
            "root_of_trust": {"product": "Milan", "check_crl": true},
            "pcr_values": {"sha256": {"0": "old"}}
        });
        let pcrs = json!({"sha256": {"0": "ab".repeat(32)}});
        let inputs = DocumentInputs {
            base: Some(base),
            platform: PlatformFacts::default(),
            pcr_values: Some(pcrs.clone()),
        };
        let doc = build(&snp_state(LaunchKind::SevSnpIgvm), &inputs).expect("doc");
        assert_eq!(doc["policy"]["measurement"], json!(b64(&[7u8; 48])));
        assert_eq!(doc["policy"]["host_data"], json!(b64(&[9u8; 32])));
        assert_eq!(doc["policy"]["policy"], json!(196608));
        assert_eq!(doc["policy"]["vmpl"], json!(2));
        assert_eq!(doc["policy"]["chip_id"], json!("base-chip"));
        assert_eq!(doc["policy"]["product"], json!({"name": 1}));
        assert_eq!(doc["root_of_trust"]["product"], json!("Milan"));
        assert_eq!(doc["pcr_values"], pcrs);
    }

    #[test]
    fn ovmf_direct_boot_reports_from_vmpl0() {
        let doc = build(
            &snp_state(LaunchKind::SevSnpOvmf),
            &DocumentInputs::default(),
        )
        .expect("doc");
        assert_eq!(doc["policy"]["vmpl"], json!(0));
        assert!(doc.get("pcr_values").is_none());
        assert!(doc["policy"].get("chip_id").is_none());
    }

    #[test]
    fn platform_facts_win_over_the_base() {
        let inputs = DocumentInputs {
            base: Some(json!({"policy": {"chip_id": "base", "minimum_tcb": 1}})),
            platform: PlatformFacts {
                chip_id: Some(vec![1; 64]),
                minimum_tcb: Some(99),
                minimum_launch_tcb: Some(98),
                minimum_build: Some(7),
                minimum_version: Some("1.55".into()),
            },
            pcr_values: None,
        };
        let doc = build(&snp_state(LaunchKind::SevSnpOvmf), &inputs).expect("doc");
        assert_eq!(doc["policy"]["chip_id"], json!(b64(&[1; 64])));
        assert_eq!(doc["policy"]["minimum_tcb"], json!(99));
        assert_eq!(doc["policy"]["minimum_launch_tcb"], json!(98));
        assert_eq!(doc["policy"]["minimum_build"], json!(7));
        assert_eq!(doc["policy"]["minimum_version"], json!("1.55"));
    }

    #[test]
    fn plain_and_tdx_without_base_have_no_document() {
        let plain = AttestationState {
            launch: LaunchKind::Plain,
            measurement: None,
            host_data: None,
            host_data_per_vm: false,
            vtpm: false,
            document: None,
            unavailable: None,
        };
        let err = build(&plain, &DocumentInputs::default()).expect_err("plain");
        assert!(err.contains("no launch measurement"), "{err}");
        let tdx = AttestationState {
            launch: LaunchKind::Tdx,
            ..plain
        };
        let err = build(&tdx, &DocumentInputs::default()).expect_err("tdx");
        assert!(err.contains("MANAGER_ATTESTATION_BASE_POLICY"), "{err}");
        let inputs = DocumentInputs {
            base: Some(json!({"policy": {"mr_td": "operator"}})),
            platform: PlatformFacts::default(),
            pcr_values: Some(json!({"sha384": {}})),
        };
        let doc = build(&tdx, &inputs).expect("tdx with base");
        assert_eq!(doc["policy"]["mr_td"], json!("operator"));
        assert_eq!(doc["pcr_values"], json!({"sha384": {}}));
        assert!(doc["policy"].get("measurement").is_none());
    }
}
