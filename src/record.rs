//! The durable record of one VM: what a restarted manager needs to find
//! the VM's QEMU again, prove it is the same process, and control it. The
//! actors write it atomically; this module only shapes and checks it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::attestation::document::AttestationState;
use crate::qemu::VmPaths;

pub const RECORD_VERSION: u32 = 1;
pub const RECORD_FILE: &str = "record.json";

/// What CVMInfo reports, fixed at launch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchInfo {
    pub ovmf_version: String,
    pub cpu_num: i32,
    pub cpu_type: String,
    pub kernel_cmd: String,
    pub eos_version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub version: u32,
    pub id: String,
    /// The running QEMU: pid, its start time in clock ticks after boot
    /// (`/proc/<pid>/stat` field 22) and its executable. All three must match
    /// before the manager touches the process again.
    pub pid: i32,
    pub start_time: u64,
    pub exe: PathBuf,
    /// The exact command the VM runs with; a restart runs it again.
    pub argv: Vec<String>,
    pub port: u16,
    pub paths: VmPaths,
    /// When the TTL fires, as milliseconds since the Unix epoch.
    pub ttl_deadline_ms: Option<u64>,
    pub info: LaunchInfo,
    /// What the VM's attestation report must say, fixed at create.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation: Option<AttestationState>,
    /// The VM's `swtpm`, when it has one: checked like QEMU before it is
    /// touched again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swtpm: Option<ProcessRecord>,
}

/// A process the manager started, as a restarted manager proves it is the
/// same one: pid, start time (clock ticks after boot) and executable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    pub pid: i32,
    pub start_time: u64,
    pub exe: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("unreadable record: {0}")]
    Parse(String),
    #[error("record version {0} is not supported")]
    Version(u32),
    #[error("record does not belong in {0}: {1}")]
    Misplaced(String, String),
}

impl VmRecord {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// Parses a record found at `state_dir/vms/<folder>/record.json` and
    /// checks that every path in it lies where this manager puts VM files:
    /// a tampered record must not make the manager delete anything else.
    pub fn parse(
        bytes: &[u8],
        state_dir: &Path,
        folder: &str,
        mount_bases: &[&Path],
    ) -> Result<VmRecord, RecordError> {
        let record: VmRecord =
            serde_json::from_slice(bytes).map_err(|e| RecordError::Parse(e.to_string()))?;
        if record.version != RECORD_VERSION {
            return Err(RecordError::Version(record.version));
        }
        let misplaced = |why: String| RecordError::Misplaced(folder.to_string(), why);
        if uuid::Uuid::parse_str(&record.id).map(|u| u.to_string()) != Ok(record.id.clone())
            || record.id != folder
        {
            return Err(misplaced(format!(
                "id {:?} does not name the folder",
                record.id
            )));
        }
        let dir = state_dir.join("vms").join(folder);
        if record.paths.dir != dir {
            return Err(misplaced(format!("folder {}", record.paths.dir.display())));
        }
        let inside = |p: &Path| p.parent() == Some(dir.as_path());
        let share_ok = |p: &Path| {
            inside(p)
                || mount_bases
                    .iter()
                    .any(|base| !base.as_os_str().is_empty() && p == base.join(&record.id))
        };
        let p = &record.paths;
        let optional = [&p.tpm_dir, &p.swtpm_socket, &p.swtpm_log];
        for file in [
            &p.ovmf_vars,
            &p.disk,
            &p.qmp_socket,
            &p.console_socket,
            &p.console_log,
            &p.qemu_log,
        ]
        .into_iter()
        .chain(optional.into_iter().filter(|p| !p.as_os_str().is_empty()))
        {
            if !inside(file) {
                return Err(misplaced(format!("path {}", file.display())));
            }
        }
        for share in [&p.certs_dir, &p.env_dir] {
            if !share_ok(share) {
                return Err(misplaced(format!("share {}", share.display())));
            }
        }
        if record.argv.is_empty()
            || record.pid <= 1
            || record.swtpm.as_ref().is_some_and(|s| s.pid <= 1)
        {
            return Err(RecordError::Parse("no command or pid".into()));
        }
        Ok(record)
    }
}

/// The start time of a process from the text of `/proc/<pid>/stat`.
pub fn start_time_from_stat(stat: &str) -> Option<u64> {
    // The command name may hold spaces and parentheses; fields resume after
    // the last ')'. Field 3 (state) is the first after it; starttime is 22.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const ID: &str = "e71cdcf5-21c0-4e1d-9471-ac6b4389d5f3";

    fn record() -> (VmRecord, PathBuf) {
        let config = Config::defaults();
        let paths = VmPaths::new(&config, ID);
        (
            VmRecord {
                version: RECORD_VERSION,
                id: ID.into(),
                pid: 4242,
                start_time: 123456,
                exe: "/usr/bin/qemu-system-x86_64".into(),
                argv: vec!["qemu-system-x86_64".into(), "-nographic".into()],
                port: 6100,
                paths,
                ttl_deadline_ms: Some(1_700_000_000_000),
                info: LaunchInfo {
                    ovmf_version: "edk2-stable202302".into(),
                    cpu_num: 4,
                    cpu_type: "EPYC".into(),
                    kernel_cmd: "quiet console=null".into(),
                    eos_version: String::new(),
                },
                attestation: None,
                swtpm: None,
            },
            config.state_dir,
        )
    }

    #[test]
    fn round_trips() {
        let (r, state) = record();
        let parsed = VmRecord::parse(&r.to_json(), &state, ID, &[]).expect("valid record");
        assert_eq!(parsed, r);
    }

    #[test]
    fn refuses_garbage_and_other_versions() {
        let (r, state) = record();
        assert!(matches!(
            VmRecord::parse(b"{not json", &state, ID, &[]),
            Err(RecordError::Parse(_))
        ));
        assert!(matches!(
            VmRecord::parse(b"", &state, ID, &[]),
            Err(RecordError::Parse(_))
        ));
        let mut v2 = r.clone();
        v2.version = 2;
        assert_eq!(
            VmRecord::parse(&v2.to_json(), &state, ID, &[]),
            Err(RecordError::Version(2))
        );
    }

    #[test]
    fn refuses_paths_outside_the_vm_folder() {
        let (r, state) = record();
        let mut evil = r.clone();
        evil.paths.certs_dir = "/etc".into();
        assert!(matches!(
            VmRecord::parse(&evil.to_json(), &state, ID, &[]),
            Err(RecordError::Misplaced(..))
        ));
        let mut evil = r.clone();
        evil.paths.dir = "/".into();
        assert!(matches!(
            VmRecord::parse(&evil.to_json(), &state, ID, &[]),
            Err(RecordError::Misplaced(..))
        ));
        // A record copied into another VM's folder.
        let other = "0f0f0f0f-21c0-4e1d-9471-ac6b4389d5f3";
        assert!(matches!(
            VmRecord::parse(&r.to_json(), &state, other, &[]),
            Err(RecordError::Misplaced(..))
        ));
        // Shares under a configured mount base are fine.
        let mut shared = r.clone();
        shared.paths.certs_dir = PathBuf::from("/srv/certs").join(ID);
        let base = PathBuf::from("/srv/certs");
        assert!(VmRecord::parse(&shared.to_json(), &state, ID, &[base.as_path()]).is_ok());
    }

    #[test]
    fn keeps_attestation_and_swtpm_and_reads_records_without_them() {
        use crate::attestation::document::LaunchKind;
        let (mut r, state) = record();
        r.attestation = Some(AttestationState {
            launch: LaunchKind::SevSnpOvmf,
            measurement: Some("bWVhc3VyZW1lbnQ=".into()),
            host_data: None,
            host_data_per_vm: false,
            vtpm: true,
            document: Some("{}".into()),
            unavailable: None,
        });
        r.swtpm = Some(ProcessRecord {
            pid: 4243,
            start_time: 123455,
            exe: "/usr/bin/swtpm".into(),
        });
        let parsed = VmRecord::parse(&r.to_json(), &state, ID, &[]).expect("valid record");
        assert_eq!(parsed, r);
        // A record written before these fields existed.
        let mut old: serde_json::Value = serde_json::from_slice(&r.to_json()).expect("json");
        for key in ["attestation", "swtpm"] {
            old.as_object_mut().expect("object").remove(key);
        }
        for key in ["tpm_dir", "swtpm_socket", "swtpm_log"] {
            old["paths"].as_object_mut().expect("paths").remove(key);
        }
        let parsed = VmRecord::parse(old.to_string().as_bytes(), &state, ID, &[]).expect("old");
        assert_eq!(parsed.attestation, None);
        let mut evil = r.clone();
        evil.paths.tpm_dir = "/etc".into();
        assert!(matches!(
            VmRecord::parse(&evil.to_json(), &state, ID, &[]),
            Err(RecordError::Misplaced(..))
        ));
    }

    #[test]
    fn reads_start_time() {
        let stat = "4242 (qemu-system-x86) S 1 4242 4242 0 -1 4194560 5000 0 0 0 100 50 0 0 20 0 3 0 987654 1000000 300 18446744073709551615";
        assert_eq!(start_time_from_stat(stat), Some(987654));
        let tricky = "77 (a) b) (c) R 1 77 77 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 42 0 0";
        assert_eq!(start_time_from_stat(tricky), Some(42));
        assert_eq!(start_time_from_stat("garbage"), None);
    }
}
