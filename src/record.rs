//! The durable record of one VM: what a restarted manager needs to find
//! the VM's QEMU again, prove it is the same process, and control it. The
//! actors write it atomically; this module only shapes and checks it.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::attestation::document::AttestationState;
use crate::config::Config;
use crate::qemu::{command_line, LaunchSpec, VmPaths};

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
    /// What the command was made from: the settings in force when the VM
    /// was created and the request's part. The command a restart runs is
    /// made again from these, never taken from the record as it stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch: Option<LaunchFacts>,
    /// When the VM was created, as milliseconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_ms: Option<u64>,
    /// Restarts supervision has carried out so far.
    #[serde(default)]
    pub restarts: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchFacts {
    pub settings: BTreeMap<String, String>,
    pub aa_kbs_params: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_data: Option<String>,
}

impl LaunchFacts {
    pub fn new(config: &Config, aa_kbs_params: &str, host_data: Option<&str>) -> LaunchFacts {
        LaunchFacts {
            settings: config
                .values()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            aa_kbs_params: aa_kbs_params.to_string(),
            host_data: host_data.map(str::to_string),
        }
    }
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
    #[error("record of {0}: {1}")]
    Tampered(String, String),
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
        // A plain name right inside the VM's own folder: `<dir>/..` has the
        // right parent but names the folder above.
        let inside = |p: &Path| {
            p.parent() == Some(dir.as_path())
                && matches!(p.components().next_back(), Some(Component::Normal(_)))
        };
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
        let argv = record.rebuilt_argv()?;
        if argv != record.argv {
            return Err(RecordError::Tampered(
                folder.to_string(),
                "its command does not follow from its launch facts".into(),
            ));
        }
        Ok(record)
    }

    /// The command made again from the record's launch facts.
    pub fn rebuilt_argv(&self) -> Result<Vec<String>, RecordError> {
        let tampered = |why: String| RecordError::Tampered(self.id.clone(), why);
        let facts = self
            .launch
            .as_ref()
            .ok_or_else(|| tampered("no launch facts (written by an older manager)".into()))?;
        let config = Config::from_values(&facts.settings)
            .map_err(|e| tampered(format!("its settings: {e}")))?;
        let paths = VmPaths::new(&config, &self.id);
        if paths != self.paths {
            return Err(tampered("its paths do not follow from its settings".into()));
        }
        Ok(command_line(
            &config,
            &LaunchSpec {
                id: &self.id,
                port: self.port,
                paths: &paths,
                aa_kbs_params: &facts.aa_kbs_params,
                host_data: facts.host_data.as_deref(),
            },
        ))
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
        let (mut r, state) = record_as_written();
        r.argv = r.rebuilt_argv().expect("facts make a command");
        (r, state)
    }

    fn record_as_written() -> (VmRecord, PathBuf) {
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
                launch: Some(LaunchFacts::new(&config, "", None)),
                created_ms: Some(1_699_999_000_000),
                restarts: 0,
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
        let facts = shared.launch.as_mut().expect("facts");
        facts
            .settings
            .insert("MANAGER_QEMU_CERTS_MOUNT".into(), "/srv/certs".into());
        shared.paths.certs_dir = PathBuf::from("/srv/certs").join(ID);
        shared.argv = shared.rebuilt_argv().expect("command");
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
    fn a_command_that_does_not_follow_from_the_facts_is_refused() {
        let (r, state) = record();
        let mut evil = r.clone();
        evil.argv.push("-drive".into());
        evil.argv.push("file=/dev/sda".into());
        assert!(matches!(
            VmRecord::parse(&evil.to_json(), &state, ID, &[]),
            Err(RecordError::Tampered(..))
        ));
        let mut evil = r.clone();
        evil.launch
            .as_mut()
            .expect("facts")
            .settings
            .insert("MANAGER_QEMU_BIN_PATH".into(), "/tmp/evil".into());
        assert!(matches!(
            VmRecord::parse(&evil.to_json(), &state, ID, &[]),
            Err(RecordError::Tampered(..))
        ));
        let mut legacy = r.clone();
        legacy.launch = None;
        assert!(matches!(
            VmRecord::parse(&legacy.to_json(), &state, ID, &[]),
            Err(RecordError::Tampered(..))
        ));
    }

    #[test]
    fn a_path_that_climbs_out_of_the_folder_is_refused() {
        let (r, state) = record();
        let mut evil = r.clone();
        evil.paths.qemu_log = r.paths.dir.join("..");
        assert!(matches!(
            VmRecord::parse(&evil.to_json(), &state, ID, &[]),
            Err(RecordError::Misplaced(..))
        ));
        let mut evil = r.clone();
        evil.paths.console_log = r.paths.dir.join(".");
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
