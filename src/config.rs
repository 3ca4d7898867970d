//! The manager's configuration: every setting of the user's document plus the
//! extras the original has and a few of ours, with built-in defaults, a TOML
//! file and the environment layered in that order, and validation that names
//! the offending variable, file key and value.
//!
//! Loading is pure: the caller reads the file and the environment and passes
//! them in, so that SIGHUP reload and tests use exactly the same path.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::duration::{format_go_duration, parse_go_duration};
use crate::ports::PortRange;
use crate::restart::{RestartPolicy, RestartType};

/// One setting's identity: its environment name, its key in the TOML file and
/// its built-in default (as text, exactly as an operator would write it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    pub env: &'static str,
    pub key: &'static str,
    pub default: &'static str,
    pub doc: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid {env} (file key `{key}`) = {value:?}: {reason}")]
    Invalid {
        env: &'static str,
        key: &'static str,
        value: String,
        reason: String,
    },
    #[error("{0}")]
    Conflict(String),
    #[error("config file {file}: {reason}")]
    File { file: String, reason: String },
    #[error("config file {file}: unknown key `{key}` (known keys are listed in config/cocos-manager.toml)")]
    UnknownFileKey { file: String, key: String },
}

/// What the host offers, detected by the caller (this crate does no I/O).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostCaps {
    pub sev_snp: bool,
    pub tdx: bool,
}

/// Everything a load needs, gathered by the caller.
#[derive(Debug, Clone, Default)]
pub struct ConfigInputs<'a> {
    /// Name of the TOML file, for messages.
    pub file_name: Option<&'a str>,
    /// Content of the TOML file, if one was given.
    pub file_text: Option<&'a str>,
    /// The process environment (only `MANAGER_*` and `COCOS_*` are looked at).
    pub env: BTreeMap<String, String>,
    pub host: HostCaps,
    /// Working directory, to make the state directory absolute.
    pub cwd: PathBuf,
}

/// A loaded configuration and the warnings the operator should see.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub warnings: Vec<String>,
}

/// Bytes available for a unix socket path (sun_path is 108 bytes, NUL included).
pub const UNIX_PATH_MAX: usize = 107;
/// The longest per-VM socket path suffix below the state directory:
/// `/vms/<36-char uuid>/console.sock`.
pub const VM_SOCKET_SUFFIX_LEN: usize = "/vms/".len() + 36 + "/console.sock".len();

/// Log levels the manager understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Trace => "trace",
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (without timestamps under systemd's journal,
    /// which adds its own).
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A QEMU size such as `2048M` or `4G`, kept as written since QEMU is the
/// one that interprets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuSize(pub String);

impl QemuSize {
    /// The size in bytes, for checks such as memory ≤ max memory.
    pub fn bytes(&self) -> u128 {
        let text = self.0.as_str();
        let (digits, suffix) = text.split_at(
            text.find(|c: char| !c.is_ascii_digit())
                .unwrap_or(text.len()),
        );
        let base: u128 = digits.parse().unwrap_or(0);
        let shift = match suffix.to_ascii_uppercase().as_str() {
            "" => 20, // QEMU's -m takes MiB when no suffix is given
            "B" => 0,
            "K" => 10,
            "M" => 20,
            "G" => 30,
            "T" => 40,
            "P" => 50,
            "E" => 60,
            _ => 0,
        };
        base << shift
    }
}

impl fmt::Display for QemuSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A byte count written with an optional K/M/G suffix (powers of 1024).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

/// A value that goes inside a comma-separated QEMU option: no commas, `=`,
/// whitespace or control characters, so a setting can never add an option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuWord(pub String);

impl fmt::Display for QemuWord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl QemuWord {
    pub fn as_str(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Parsing of one setting's text into its typed value.
trait SettingValue: Sized {
    fn parse_setting(text: &str) -> Result<Self, String>;
    fn show(&self) -> String;
}

fn no_control(text: &str) -> Result<(), String> {
    if text.chars().any(|c| c.is_control()) {
        return Err("control characters (newline, NUL, …) are not allowed".into());
    }
    Ok(())
}

impl SettingValue for String {
    fn parse_setting(text: &str) -> Result<Self, String> {
        no_control(text)?;
        Ok(text.to_string())
    }
    fn show(&self) -> String {
        self.clone()
    }
}

impl SettingValue for PathBuf {
    fn parse_setting(text: &str) -> Result<Self, String> {
        no_control(text)?;
        Ok(PathBuf::from(text))
    }
    fn show(&self) -> String {
        self.display().to_string()
    }
}

impl SettingValue for bool {
    /// Go's `strconv.ParseBool` set, plus on/off and yes/no.
    fn parse_setting(text: &str) -> Result<Self, String> {
        match text {
            "1" | "t" | "T" | "true" | "TRUE" | "True" | "on" | "yes" => Ok(true),
            "0" | "f" | "F" | "false" | "FALSE" | "False" | "off" | "no" => Ok(false),
            _ => Err("expected true or false".into()),
        }
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

impl SettingValue for u16 {
    fn parse_setting(text: &str) -> Result<Self, String> {
        text.trim()
            .parse()
            .map_err(|_| "expected a whole number from 0 to 65535".into())
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

impl SettingValue for u32 {
    fn parse_setting(text: &str) -> Result<Self, String> {
        text.trim()
            .parse()
            .map_err(|_| "expected a whole number".into())
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

impl SettingValue for f64 {
    fn parse_setting(text: &str) -> Result<Self, String> {
        let v: f64 = text
            .trim()
            .parse()
            .map_err(|_| "expected a number".to_string())?;
        if !v.is_finite() {
            return Err("expected a finite number".into());
        }
        Ok(v)
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

impl SettingValue for Duration {
    fn parse_setting(text: &str) -> Result<Self, String> {
        parse_go_duration(text.trim()).map_err(|e| e.to_string())
    }
    fn show(&self) -> String {
        format_go_duration(*self)
    }
}

impl SettingValue for LogLevel {
    fn parse_setting(text: &str) -> Result<Self, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "trace" => Ok(LogLevel::Trace),
            "debug" => Ok(LogLevel::Debug),
            "info" => Ok(LogLevel::Info),
            "warn" | "warning" => Ok(LogLevel::Warn),
            "error" => Ok(LogLevel::Error),
            _ => Err("expected one of trace, debug, info, warn, error".into()),
        }
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

impl SettingValue for LogFormat {
    fn parse_setting(text: &str) -> Result<Self, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err("expected text or json".into()),
        }
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

impl SettingValue for QemuSize {
    fn parse_setting(text: &str) -> Result<Self, String> {
        let digits = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let suffix = &text[digits..];
        let suffix_ok =
            suffix.is_empty() || (suffix.len() == 1 && "bBkKmMgGtTpPeE".contains(suffix));
        if digits == 0 || !suffix_ok {
            return Err("expected a QEMU size such as 2048M or 4G".into());
        }
        if text[..digits].parse::<u64>().is_err() {
            return Err("size is too large".into());
        }
        Ok(QemuSize(text.to_string()))
    }
    fn show(&self) -> String {
        self.0.clone()
    }
}

impl SettingValue for ByteSize {
    fn parse_setting(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let digits = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let number: u64 = text[..digits]
            .parse()
            .map_err(|_| "expected a size such as 2M or 512K".to_string())?;
        let shift = match &text[digits..] {
            "" | "B" => 0,
            "K" | "k" | "KiB" => 10,
            "M" | "m" | "MiB" => 20,
            "G" | "g" | "GiB" => 30,
            _ => return Err("expected a size such as 2M or 512K".into()),
        };
        number
            .checked_mul(1u64 << shift)
            .map(ByteSize)
            .ok_or_else(|| "size is too large".into())
    }
    fn show(&self) -> String {
        self.0.to_string()
    }
}

impl SettingValue for QemuWord {
    fn parse_setting(text: &str) -> Result<Self, String> {
        if text
            .chars()
            .any(|c| c == ',' || c == '=' || c.is_whitespace() || c.is_control())
        {
            return Err("must not contain commas, '=', spaces or control characters".into());
        }
        Ok(QemuWord(text.to_string()))
    }
    fn show(&self) -> String {
        self.0.clone()
    }
}

impl SettingValue for PortRange {
    fn parse_setting(text: &str) -> Result<Self, String> {
        if text.trim().is_empty() {
            return Ok(PortRange::EMPTY);
        }
        text.parse::<PortRange>().map_err(|e| e.to_string())
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

macro_rules! settings {
    ($( $field:ident : $ty:ty = $env:literal, $key:literal, $default:literal, $doc:literal; )*) => {
        /// The manager's whole configuration, one field per setting.
        #[derive(Debug, Clone, PartialEq)]
        pub struct Config {
            $( #[doc = $doc] pub $field: $ty, )*
        }

        /// Every setting, in the order of the user's document.
        pub const SETTINGS: &[Setting] = &[
            $( Setting { env: $env, key: $key, default: $default, doc: $doc }, )*
        ];

        impl Config {
            fn from_text(values: &BTreeMap<&'static str, String>) -> Result<Self, ConfigError> {
                Ok(Config {
                    $( $field: {
                        let text = values.get($env).map(String::as_str).unwrap_or($default);
                        <$ty as SettingValue>::parse_setting(text).map_err(|reason| ConfigError::Invalid {
                            env: $env, key: $key, value: text.to_string(), reason,
                        })?
                    }, )*
                })
            }

            /// A configuration from [`Config::values`] text, checked as a
            /// loaded one is (a VM record keeps the settings it was launched with).
            pub fn from_values(values: &BTreeMap<String, String>) -> Result<Self, ConfigError> {
                let mut known: BTreeMap<&'static str, String> = BTreeMap::new();
                for setting in SETTINGS {
                    if let Some(value) = values.get(setting.env) {
                        known.insert(setting.env, value.clone());
                    }
                }
                let config = Config::from_text(&known)?;
                config.validate()?;
                Ok(config)
            }

            /// Each setting's environment name and its value as text.
            pub fn values(&self) -> Vec<(&'static str, String)> {
                vec![ $( ($env, SettingValue::show(&self.$field)), )* ]
            }
        }
    };
}

settings! {
    // Core
    instance_id: String = "MANAGER_INSTANCE_ID", "instance_id", "", "Unique identifier for the manager service";
    grpc_host: String = "MANAGER_GRPC_HOST", "grpc.host", "localhost", "gRPC host the manager binds to";
    grpc_port: u16 = "MANAGER_GRPC_PORT", "grpc.port", "7001", "gRPC port the manager binds to";
    log_level: LogLevel = "MANAGER_LOG_LEVEL", "log_level", "info", "Logging verbosity: trace, debug, info, warn, error";
    log_format: LogFormat = "MANAGER_LOG_FORMAT", "log_format", "text", "Log line format: text (without timestamps under systemd's journal, which adds its own) or json (one object per line)";
    max_vms: u32 = "MANAGER_MAX_VMS", "max_vms", "10", "Most VMs running at once (0 = no limit)";
    state_dir: PathBuf = "MANAGER_STATE_DIR", "state_dir", "/run/cocos-manager", "Directory holding one folder per VM (firmware vars, shares, sockets, logs, keys): runtime state, on tmpfs like /run/libvirt (a warning at start when it is not)";
    http_host: String = "MANAGER_HTTP_HOST", "http.host", "localhost", "Host of the health and metrics HTTP endpoint";
    http_port: u16 = "MANAGER_HTTP_PORT", "http.port", "7003", "Port of the health and metrics HTTP endpoint";
    grpc_server_cert: PathBuf = "MANAGER_GRPC_SERVER_CERT", "grpc.server_cert", "", "Server TLS certificate (PEM); empty = plaintext";
    grpc_server_key: PathBuf = "MANAGER_GRPC_SERVER_KEY", "grpc.server_key", "", "Server TLS private key (PEM)";
    grpc_client_ca_certs: PathBuf = "MANAGER_GRPC_CLIENT_CA_CERTS", "grpc.client_ca_certs", "", "CA for client certificates; set = mutual TLS required";
    grpc_allow_plaintext: bool = "MANAGER_GRPC_ALLOW_PLAINTEXT", "grpc.allow_plaintext", "false", "Allow plaintext gRPC (MANAGER_GRPC_SERVER_CERT empty) on an address that is not loopback; without it such a start is refused";
    grpc_max_connections: u32 = "MANAGER_GRPC_MAX_CONNECTIONS", "grpc.max_connections", "256", "Most gRPC connections open at once; one more is accepted and closed at once, before any byte";
    grpc_max_streams: u32 = "MANAGER_GRPC_MAX_STREAMS", "grpc.max_streams", "128", "Most requests in flight on one gRPC connection (HTTP/2 concurrent streams); the client queues the rest";
    grpc_max_message_size: ByteSize = "MANAGER_GRPC_MAX_MESSAGE_SIZE", "grpc.max_message_size", "4M", "Largest gRPC message received or sent (a CreateReq carries up to three certificates of at most 1M each); a larger request is OUT_OF_RANGE";
    // Client-side settings (read by clients that reach the manager).
    grpc_url: String = "MANAGER_GRPC_URL", "client.grpc_url", "localhost:7001", "Client side: address of the manager";
    grpc_timeout: Duration = "MANAGER_GRPC_TIMEOUT", "client.grpc_timeout", "60s", "Bound of one gRPC request, on both sides: the server answers DEADLINE_EXCEEDED after it (or after the client's shorter grpc-timeout), and clients use it as their timeout";
    grpc_client_cert: PathBuf = "MANAGER_GRPC_CLIENT_CERT", "client.grpc_client_cert", "", "Client side: client certificate";
    grpc_client_key: PathBuf = "MANAGER_GRPC_CLIENT_KEY", "client.grpc_client_key", "", "Client side: client private key";
    grpc_server_ca_certs: PathBuf = "MANAGER_GRPC_SERVER_CA_CERTS", "client.grpc_server_ca_certs", "", "Client side: CA that signed the manager's certificate";
    // Attestation
    attestation_policy_binary: PathBuf = "MANAGER_ATTESTATION_POLICY_BINARY", "attestation.policy_binary", "../../build/attestation_policy", "The original's policy tool: if this file exists, its output (JSON on stdout) is the base document, as the original used it; the measurement and host data are always the manager's own";
    igvmmeasure_binary: PathBuf = "MANAGER_IGVMMEASURE_BINARY", "attestation.igvmmeasure_binary", "../../build/igvmmeasure", "Accepted for compatibility and unused: the manager measures IGVM files itself";
    pcr_values: PathBuf = "MANAGER_PCR_VALUES", "attestation.pcr_values", "", "Expected PCR values file (JSON: bank -> PCR index -> hex), the policy's pcr_values; checked at start and on SIGHUP";
    attestation_base_policy: PathBuf = "MANAGER_ATTESTATION_BASE_POLICY", "attestation.base_policy", "", "Operator's base policy document (JSON, same shape as the answer): platform facts such as chip_id and TCB floors; computed fields override it. Required for TDX";
    // QEMU: basics
    qemu_bin_path: PathBuf = "MANAGER_QEMU_BIN_PATH", "qemu.bin_path", "qemu-system-x86_64", "QEMU binary";
    qemu_use_sudo: bool = "MANAGER_QEMU_USE_SUDO", "qemu.use_sudo", "false", "Run QEMU through sudo";
    // QEMU: least privilege (README: Least privilege)
    qemu_user: String = "MANAGER_QEMU_USER", "qemu.user", "cocos-qemu", "User QEMU and its helpers (swtpm, swtpm_setup, qemu-img) run as: the manager drops to it between fork and exec. Empty = as the manager, the only valid value when the manager is not root";
    qemu_group: String = "MANAGER_QEMU_GROUP", "qemu.group", "cocos-qemu", "Primary group of QEMU and its helpers (empty = the user's own; ignored when MANAGER_QEMU_USER is empty); /dev/kvm and /dev/sev are reached through the user's supplementary groups (e.g. kvm)";
    qemu_vm_gid_base: u32 = "MANAGER_QEMU_VM_GID_BASE", "qemu.vm_gid_base", "1879048192", "First of 65536 group ids given one per VM: its folder's group, held only by its own processes, so one VM's QEMU cannot reach another VM's files";
    qemu_sandbox: String = "MANAGER_QEMU_SANDBOX", "qemu.sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny", "QEMU's seccomp sandbox, the -sandbox value (empty = none)";
    disk_dir: PathBuf = "MANAGER_DISK_DIR", "disk_dir", "/var/lib/cocos-manager", "Directory of the VMs' disk images (MANAGER_QEMU_ENABLE_DISK), on persistent storage: <disk_dir>/disks/<id>/disk.qcow2; relative = to the manager's working directory";
    qemu_machine: QemuWord = "MANAGER_QEMU_MACHINE", "qemu.machine", "q35", "QEMU machine type";
    qemu_cpu: QemuWord = "MANAGER_QEMU_CPU", "qemu.cpu", "EPYC", "CPU model";
    qemu_enable_kvm: bool = "MANAGER_QEMU_ENABLE_KVM", "qemu.enable_kvm", "true", "Enable KVM acceleration";
    qemu_no_graphic: bool = "MANAGER_QEMU_NO_GRAPHIC", "qemu.no_graphic", "true", "Disable graphical display";
    qemu_monitor: QemuWord = "MANAGER_QEMU_MONITOR", "qemu.monitor", "pty", "Human monitor type";
    qemu_vtpm: VtpmMode = "MANAGER_QEMU_VTPM", "qemu.vtpm", "none", "Host-side vTPM without SVSM: none, or swtpm (each VM gets its own swtpm and a TPM CRB device)";
    swtpm_bin_path: PathBuf = "MANAGER_SWTPM_BIN_PATH", "qemu.swtpm_bin_path", "swtpm", "swtpm binary (MANAGER_QEMU_VTPM=swtpm)";
    swtpm_setup_bin_path: PathBuf = "MANAGER_SWTPM_SETUP_BIN_PATH", "qemu.swtpm_setup_bin_path", "swtpm_setup", "swtpm_setup binary, makes each VM's TPM state and endorsement key";
    // QEMU: memory and CPUs
    qemu_memory_size: QemuSize = "MANAGER_QEMU_MEMORY_SIZE", "qemu.memory_size", "2048M", "Guest memory size";
    qemu_memory_slots: u32 = "MANAGER_QEMU_MEMORY_SLOTS", "qemu.memory_slots", "5", "Memory hotplug slots";
    qemu_max_memory: QemuSize = "MANAGER_QEMU_MAX_MEMORY", "qemu.max_memory", "30G", "Maximum memory size";
    qemu_smp_count: u32 = "MANAGER_QEMU_SMP_COUNT", "qemu.smp_count", "4", "Virtual CPUs";
    qemu_smp_maxcpus: u32 = "MANAGER_QEMU_SMP_MAXCPUS", "qemu.smp_maxcpus", "64", "Maximum virtual CPUs";
    // Per-VM cgroups (README: Per-VM cgroups)
    cgroups: crate::cgroup::CgroupMode = "MANAGER_CGROUPS", "cgroups.mode", "auto", "Per-VM cgroups (QEMU and its swtpm in <manager's cgroup>/cocos-vm-<id>, with memory, CPU and pids limits): auto (when the cpu, memory and pids controllers are writable; warned once otherwise) or off";
    cgroup_memory_limit: ByteSize = "MANAGER_CGROUP_MEMORY_LIMIT", "cgroups.memory_limit", "0", "Memory limit of each VM's cgroup (0 = MANAGER_QEMU_MEMORY_SIZE + MANAGER_CGROUP_MEMORY_OVERHEAD + MANAGER_CGROUP_MEMORY_OVERHEAD_PERCENT of the guest memory, rounded up to a MiB)";
    cgroup_memory_overhead: ByteSize = "MANAGER_CGROUP_MEMORY_OVERHEAD", "cgroups.memory_overhead", "256M", "Fixed part of the memory a VM's cgroup allows beyond its guest memory (QEMU itself, its swtpm)";
    cgroup_memory_overhead_percent: u32 = "MANAGER_CGROUP_MEMORY_OVERHEAD_PERCENT", "cgroups.memory_overhead_percent", "2", "Share of the guest memory, in percent, a VM's cgroup allows on top (page tables, device buffers)";
    cgroup_cpus: crate::cgroup::CgroupCpus = "MANAGER_CGROUP_CPUS", "cgroups.cpus", "0", "CPU limit of each VM's cgroup in cores, fractions allowed (0 = MANAGER_QEMU_SMP_COUNT), as a CFS quota per 100ms";
    cgroup_pids_max: u32 = "MANAGER_CGROUP_PIDS_MAX", "cgroups.pids_max", "1024", "Most processes and threads in each VM's cgroup (0 = no limit)";
    qemu_mem_id: QemuWord = "MANAGER_QEMU_MEM_ID", "qemu.mem_id", "ram1", "Memory backend id";
    // QEMU: OVMF
    qemu_ovmf_code_file: PathBuf = "MANAGER_QEMU_OVMF_CODE_FILE", "qemu.ovmf_code_file", "/usr/share/OVMF/OVMF_CODE.fd", "OVMF code file";
    qemu_ovmf_vars_file: PathBuf = "MANAGER_QEMU_OVMF_VARS_FILE", "qemu.ovmf_vars_file", "/usr/share/OVMF/OVMF_VARS.fd", "OVMF variables template (each VM gets its own copy)";
    qemu_ovmf_code_if: QemuWord = "MANAGER_QEMU_OVMF_CODE_IF", "qemu.ovmf_code_if", "pflash", "OVMF code drive interface";
    qemu_ovmf_code_format: QemuWord = "MANAGER_QEMU_OVMF_CODE_FORMAT", "qemu.ovmf_code_format", "raw", "OVMF code file format";
    qemu_ovmf_code_unit: u32 = "MANAGER_QEMU_OVMF_CODE_UNIT", "qemu.ovmf_code_unit", "0", "OVMF code unit";
    qemu_ovmf_code_readonly: QemuWord = "MANAGER_QEMU_OVMF_CODE_READONLY", "qemu.ovmf_code_readonly", "on", "OVMF code read-only";
    qemu_ovmf_vars_if: QemuWord = "MANAGER_QEMU_OVMF_VARS_IF", "qemu.ovmf_vars_if", "pflash", "OVMF variables drive interface";
    qemu_ovmf_vars_format: QemuWord = "MANAGER_QEMU_OVMF_VARS_FORMAT", "qemu.ovmf_vars_format", "raw", "OVMF variables file format";
    qemu_ovmf_vars_unit: u32 = "MANAGER_QEMU_OVMF_VARS_UNIT", "qemu.ovmf_vars_unit", "1", "OVMF variables unit";
    qemu_ovmf_version: String = "MANAGER_QEMU_OVMF_VERSION", "qemu.ovmf_version", "", "EDK2 version of the OVMF build (reported by CVMInfo)";
    // QEMU: network
    qemu_netdev_id: QemuWord = "MANAGER_QEMU_NETDEV_ID", "qemu.netdev_id", "vmnic", "Network device id prefix";
    qemu_host_fwd_agent: u16 = "MANAGER_QEMU_HOST_FWD_AGENT", "qemu.host_fwd_agent", "7020", "Host port for the agent when the range is empty (and in --print-qemu-cmd)";
    qemu_guest_fwd_agent: u16 = "MANAGER_QEMU_GUEST_FWD_AGENT", "qemu.guest_fwd_agent", "7002", "Guest port of the agent";
    qemu_host_fwd_range: PortRange = "MANAGER_QEMU_HOST_FWD_RANGE", "qemu.host_fwd_range", "6100-6200", "Host ports handed to VMs, START-END";
    qemu_host_fwd_bind: QemuWord = "MANAGER_QEMU_HOST_FWD_BIND", "qemu.host_fwd_bind", "", "Host address the forwarded ports bind to (empty = all)";
    qemu_virtio_net_pci_disable_legacy: QemuWord = "MANAGER_QEMU_VIRTIO_NET_PCI_DISABLE_LEGACY", "qemu.virtio_net_pci_disable_legacy", "on", "virtio-net disable-legacy";
    qemu_virtio_net_pci_iommu_platform: bool = "MANAGER_QEMU_VIRTIO_NET_PCI_IOMMU_PLATFORM", "qemu.virtio_net_pci_iommu_platform", "true", "virtio-net iommu_platform";
    qemu_virtio_net_pci_addr: QemuWord = "MANAGER_QEMU_VIRTIO_NET_PCI_ADDR", "qemu.virtio_net_pci_addr", "0x2", "virtio-net PCI address";
    qemu_virtio_net_pci_romfile: PathBuf = "MANAGER_QEMU_VIRTIO_NET_PCI_ROMFILE", "qemu.virtio_net_pci_romfile", "", "virtio-net ROM file";
    // QEMU: kernel, rootfs, disk
    qemu_disk_img_kernel_file: PathBuf = "MANAGER_QEMU_DISK_IMG_KERNEL_FILE", "qemu.disk_img_kernel_file", "img/bzImage", "Guest kernel";
    qemu_disk_img_rootfs_file: PathBuf = "MANAGER_QEMU_DISK_IMG_ROOTFS_FILE", "qemu.disk_img_rootfs_file", "img/rootfs.cpio.gz", "Guest initramfs";
    qemu_kernel_cmdline: String = "MANAGER_QEMU_KERNEL_CMDLINE", "qemu.kernel_cmdline", "quiet console=null", "Guest kernel command line";
    qemu_enable_disk: bool = "MANAGER_QEMU_ENABLE_DISK", "qemu.enable_disk", "false", "Give each VM a writable copy of the source disk";
    qemu_src_disk_file: PathBuf = "MANAGER_QEMU_SRC_DISK_FILE", "qemu.src_disk_file", "img/enc_os.qcow2", "Source disk image";
    qemu_disk_id: QemuWord = "MANAGER_QEMU_DISK_ID", "qemu.disk_id", "disk0", "Disk drive id";
    qemu_disk_format: QemuWord = "MANAGER_QEMU_DISK_FORMAT", "qemu.disk_format", "qcow2", "Disk format";
    qemu_disk_scsi_id: QemuWord = "MANAGER_QEMU_DISK_SCSI_ID", "qemu.disk_scsi_id", "scsi0", "virtio-scsi controller id";
    // QEMU: 9p shares
    qemu_certs_mount: PathBuf = "MANAGER_QEMU_CERTS_MOUNT", "qemu.certs_mount", "", "Base directory for per-VM certificate shares (empty = inside the VM folder)";
    qemu_env_mount: PathBuf = "MANAGER_QEMU_ENV_MOUNT", "qemu.env_mount", "", "Base directory for per-VM environment shares (empty = inside the VM folder)";
    // SEV-SNP
    qemu_enable_sev_snp: bool = "MANAGER_QEMU_ENABLE_SEV_SNP", "qemu.enable_sev_snp", "true", "Enable SEV-SNP (when neither SEV-SNP nor TDX is set, the host is detected)";
    qemu_sev_snp_id: QemuWord = "MANAGER_QEMU_SEV_SNP_ID", "qemu.sev_snp_id", "sev0", "SEV-SNP object id prefix";
    qemu_sev_snp_cbitpos: u32 = "MANAGER_QEMU_SEV_SNP_CBITPOS", "qemu.sev_snp_cbitpos", "51", "C-bit position";
    qemu_sev_snp_reduced_phys_bits: u32 = "MANAGER_QEMU_SEV_SNP_REDUCED_PHYS_BITS", "qemu.sev_snp_reduced_phys_bits", "1", "Reduced physical address bits";
    qemu_enable_host_data: bool = "MANAGER_QEMU_ENABLE_HOST_DATA", "qemu.enable_host_data", "false", "Pass SEV-SNP host data";
    qemu_host_data: String = "MANAGER_QEMU_HOST_DATA", "qemu.host_data", "", "SEV-SNP host data, base64 of 32 bytes; empty = each VM's own digest of the files it is given (README: host data)";
    // TDX
    qemu_enable_tdx: bool = "MANAGER_QEMU_ENABLE_TDX", "qemu.enable_tdx", "false", "Enable TDX";
    qemu_tdx_id: QemuWord = "MANAGER_QEMU_TDX_ID", "qemu.tdx_id", "tdx0", "TDX object id prefix";
    qemu_quote_generation_port: u32 = "MANAGER_QEMU_QUOTE_GENERATION_PORT", "qemu.quote_generation_port", "4050", "Quote Generation Service vsock port";
    qemu_ovmf_file: PathBuf = "MANAGER_QEMU_OVMF_FILE", "qemu.ovmf_file", "/usr/share/ovmf/OVMF.fd", "Combined OVMF for TDX";
    // IGVM
    qemu_igvm_id: QemuWord = "MANAGER_QEMU_IGVM_ID", "qemu.igvm_id", "igvm0", "IGVM object id";
    qemu_igvm_file: PathBuf = "MANAGER_QEMU_IGVM_FILE", "qemu.igvm_file", "/root/coconut-qemu.igvm", "IGVM file (empty = SEV-SNP boots OVMF with -bios and kernel hashes)";
    // Observability
    jaeger_url: String = "COCOS_JAEGER_URL", "jaeger.url", "http://localhost:4318", "OpenTelemetry collector (Jaeger's OTLP/HTTP receiver): traces are sent to this URL + /v1/traces; empty = no traces";
    jaeger_trace_ratio: f64 = "COCOS_JAEGER_TRACE_RATIO", "jaeger.trace_ratio", "1.0", "Share of traces sampled, 0 to 1 (an incoming traceparent's decision wins); 0 = no traces";
    eos_version: String = "MANAGER_EOS_VERSION", "eos_version", "", "EOS version of the guest image (reported by CVMInfo)";
    // Lifecycle (ours)
    start_timeout: Duration = "MANAGER_START_TIMEOUT", "lifecycle.start_timeout", "30s", "How long QEMU has to answer on its control socket after start";
    stop_powerdown_timeout: Duration = "MANAGER_STOP_POWERDOWN_TIMEOUT", "lifecycle.stop_powerdown_timeout", "10s", "Remove: wait this long for the guest to power off after an ACPI power-down";
    stop_quit_timeout: Duration = "MANAGER_STOP_QUIT_TIMEOUT", "lifecycle.stop_quit_timeout", "5s", "Remove: wait this long after QMP quit";
    stop_term_timeout: Duration = "MANAGER_STOP_TERM_TIMEOUT", "lifecycle.stop_term_timeout", "5s", "Remove: wait this long after SIGTERM before SIGKILL";
    stop_kill_timeout: Duration = "MANAGER_STOP_KILL_TIMEOUT", "lifecycle.stop_kill_timeout", "5s", "Remove: wait this long after SIGKILL before reporting an error";
    vm_log_max_size: ByteSize = "MANAGER_VM_LOG_MAX_SIZE", "lifecycle.vm_log_max_size", "2M", "Size at which a VM's console log is rotated";
    vm_log_files: u32 = "MANAGER_VM_LOG_FILES", "lifecycle.vm_log_files", "3", "Console log files kept per VM, the live one included";
    shutdown_stop_vms: bool = "MANAGER_SHUTDOWN_STOP_VMS", "lifecycle.shutdown_stop_vms", "false", "On SIGTERM/SIGINT stop every VM (false: leave them running for the next manager to re-adopt)";
    failed_vm_retention: Duration = "MANAGER_FAILED_VM_RETENTION", "lifecycle.failed_vm_retention", "1h", "A failed VM stays listed (CVMInfo answers, it counts toward MANAGER_MAX_VMS) this long, or until RemoveVm";
    // Supervision (OTP-style)
    restart_policy: RestartType = "MANAGER_RESTART_POLICY", "restart.policy", "transient", "When a crashed VM is restarted: permanent (always), transient (only after an abnormal exit), temporary (never)";
    restart_max_restarts: u32 = "MANAGER_RESTART_MAX_RESTARTS", "restart.max_restarts", "5", "Restart intensity: at most this many restarts within MANAGER_RESTART_PERIOD, then the VM is marked failed";
    restart_period: Duration = "MANAGER_RESTART_PERIOD", "restart.period", "300s", "Window of the restart intensity";
    restart_backoff_initial: Duration = "MANAGER_RESTART_BACKOFF_INITIAL", "restart.backoff_initial", "1s", "Wait before the first restart; doubled for each consecutive one";
    restart_backoff_max: Duration = "MANAGER_RESTART_BACKOFF_MAX", "restart.backoff_max", "60s", "Longest wait between restarts";
    restart_healthy_reset: Duration = "MANAGER_RESTART_HEALTHY_RESET", "restart.healthy_reset", "300s", "A VM running this long without a crash has its restart count reset";
}

impl SettingValue for RestartType {
    fn parse_setting(text: &str) -> Result<Self, String> {
        text.trim().parse()
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

/// Where a VM's TPM comes from when there is no SVSM to hold one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VtpmMode {
    None,
    /// A `swtpm` process per VM, QEMU's `tpm-crb` device on its socket.
    Swtpm,
}

impl fmt::Display for VtpmMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VtpmMode::None => "none",
            VtpmMode::Swtpm => "swtpm",
        })
    }
}

impl SettingValue for VtpmMode {
    fn parse_setting(text: &str) -> Result<Self, String> {
        match text.trim() {
            "none" | "" => Ok(VtpmMode::None),
            "swtpm" => Ok(VtpmMode::Swtpm),
            other => Err(format!("{other:?} is not one of: none, swtpm")),
        }
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

impl SettingValue for crate::cgroup::CgroupMode {
    fn parse_setting(text: &str) -> Result<Self, String> {
        text.parse()
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

impl SettingValue for crate::cgroup::CgroupCpus {
    fn parse_setting(text: &str) -> Result<Self, String> {
        text.parse()
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

/// Which confidential-computing technology VMs are launched with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TeeMode {
    None,
    /// SEV-SNP booting an IGVM file.
    SevSnpIgvm,
    /// SEV-SNP booting OVMF with `-bios` and measured kernel hashes.
    SevSnpOvmf,
    Tdx,
}

impl Config {
    pub fn tee_mode(&self) -> TeeMode {
        if self.qemu_enable_tdx {
            TeeMode::Tdx
        } else if self.qemu_enable_sev_snp {
            if self.qemu_igvm_file.as_os_str().is_empty() {
                TeeMode::SevSnpOvmf
            } else {
                TeeMode::SevSnpIgvm
            }
        } else {
            TeeMode::None
        }
    }

    /// The host ports VMs may use: the range, or the single agent port when
    /// the range is empty.
    pub fn port_range(&self) -> PortRange {
        if self.qemu_host_fwd_range.is_empty() {
            PortRange::single(self.qemu_host_fwd_agent)
        } else {
            self.qemu_host_fwd_range
        }
    }

    /// The address forwarded ports bind to: the configured one, or every
    /// address when it is empty (as QEMU's `hostfwd=tcp::PORT-…`).
    pub fn forward_bind_addr(&self) -> std::net::IpAddr {
        self.qemu_host_fwd_bind
            .as_str()
            .parse()
            .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
    }

    /// The supervision policy for VMs created with this configuration.
    pub fn restart(&self) -> RestartPolicy {
        RestartPolicy {
            restart: self.restart_policy,
            max_restarts: self.restart_max_restarts,
            period: self.restart_period,
            backoff_initial: self.restart_backoff_initial,
            backoff_max: self.restart_backoff_max,
            healthy_reset: self.restart_healthy_reset,
        }
    }

    /// Settings whose value differs, as `(env name, old, new)`.
    pub fn changes_from(&self, old: &Config) -> Vec<(&'static str, String, String)> {
        old.values()
            .into_iter()
            .zip(self.values())
            .filter(|((_, a), (_, b))| a != b)
            .map(|((env, a), (_, b))| (env, a, b))
            .collect()
    }

    /// Loads the built-in defaults only (used by tests and as a base).
    pub fn defaults() -> Config {
        match Config::from_text(&BTreeMap::new()) {
            Ok(config) => config,
            Err(e) => unreachable!("built-in defaults must parse: {e}"),
        }
    }

    fn setting(env: &str) -> &'static Setting {
        match SETTINGS.iter().find(|s| s.env == env) {
            Some(s) => s,
            None => unreachable!("unknown setting {env}"),
        }
    }

    fn invalid(
        env: &'static str,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            env,
            key: Config::setting(env).key,
            value: value.into(),
            reason: reason.into(),
        }
    }

    /// Checks that need several settings at once.
    fn validate(&self) -> Result<(), ConfigError> {
        if self.qemu_enable_sev_snp && self.qemu_enable_tdx {
            return Err(ConfigError::Conflict(
                "MANAGER_QEMU_ENABLE_SEV_SNP and MANAGER_QEMU_ENABLE_TDX are both true: a VM can use only one".into(),
            ));
        }
        if self.grpc_port == 0 {
            return Err(Config::invalid(
                "MANAGER_GRPC_PORT",
                "0",
                "must be from 1 to 65535",
            ));
        }
        if self.http_port == 0 {
            return Err(Config::invalid(
                "MANAGER_HTTP_PORT",
                "0",
                "must be from 1 to 65535",
            ));
        }
        if self.qemu_host_fwd_range.is_empty() && self.qemu_host_fwd_agent == 0 {
            return Err(Config::invalid(
                "MANAGER_QEMU_HOST_FWD_AGENT",
                "0",
                "must be from 1 to 65535 when MANAGER_QEMU_HOST_FWD_RANGE is empty",
            ));
        }
        if self.qemu_guest_fwd_agent == 0 {
            return Err(Config::invalid(
                "MANAGER_QEMU_GUEST_FWD_AGENT",
                "0",
                "must be from 1 to 65535",
            ));
        }
        if self.qemu_smp_count == 0 {
            return Err(Config::invalid(
                "MANAGER_QEMU_SMP_COUNT",
                "0",
                "must be at least 1",
            ));
        }
        if self.qemu_smp_maxcpus < self.qemu_smp_count {
            return Err(Config::invalid(
                "MANAGER_QEMU_SMP_MAXCPUS",
                self.qemu_smp_maxcpus.to_string(),
                format!(
                    "must be at least MANAGER_QEMU_SMP_COUNT ({})",
                    self.qemu_smp_count
                ),
            ));
        }
        if self.qemu_max_memory.bytes() < self.qemu_memory_size.bytes() {
            return Err(Config::invalid(
                "MANAGER_QEMU_MAX_MEMORY",
                self.qemu_max_memory.0.clone(),
                format!(
                    "must be at least MANAGER_QEMU_MEMORY_SIZE ({})",
                    self.qemu_memory_size
                ),
            ));
        }
        if self.qemu_bin_path.as_os_str().is_empty() {
            return Err(Config::invalid(
                "MANAGER_QEMU_BIN_PATH",
                "",
                "must not be empty",
            ));
        }
        if !(0.0..=1.0).contains(&self.jaeger_trace_ratio) {
            return Err(Config::invalid(
                "COCOS_JAEGER_TRACE_RATIO",
                self.jaeger_trace_ratio.to_string(),
                "must be from 0 to 1",
            ));
        }
        if let Err(reason) = check_collector_url(&self.jaeger_url) {
            return Err(Config::invalid(
                "COCOS_JAEGER_URL",
                redact_userinfo(&self.jaeger_url),
                reason,
            ));
        }
        if self.qemu_enable_host_data && !self.qemu_host_data.is_empty() {
            use base64::Engine as _;
            let decoded =
                base64::engine::general_purpose::STANDARD.decode(self.qemu_host_data.as_bytes());
            if !matches!(decoded, Ok(ref bytes) if bytes.len() == 32) {
                return Err(Config::invalid(
                    "MANAGER_QEMU_HOST_DATA",
                    self.qemu_host_data.clone(),
                    "must be empty (each VM's own digest) or the base64 encoding of exactly 32 bytes",
                ));
            }
        }
        let has_cert = !self.grpc_server_cert.as_os_str().is_empty();
        let has_key = !self.grpc_server_key.as_os_str().is_empty();
        if has_cert != has_key {
            return Err(ConfigError::Conflict(
                "MANAGER_GRPC_SERVER_CERT and MANAGER_GRPC_SERVER_KEY must be set together".into(),
            ));
        }
        if !self.grpc_client_ca_certs.as_os_str().is_empty() && !has_cert {
            return Err(ConfigError::Conflict(
                "MANAGER_GRPC_CLIENT_CA_CERTS (mutual TLS) needs MANAGER_GRPC_SERVER_CERT and MANAGER_GRPC_SERVER_KEY".into(),
            ));
        }
        if self.grpc_timeout.is_zero() {
            return Err(Config::invalid(
                "MANAGER_GRPC_TIMEOUT",
                "0s",
                "must be positive: it bounds every gRPC request",
            ));
        }
        for (env, value) in [
            ("MANAGER_GRPC_MAX_CONNECTIONS", self.grpc_max_connections),
            ("MANAGER_GRPC_MAX_STREAMS", self.grpc_max_streams),
        ] {
            if value == 0 {
                return Err(Config::invalid(env, "0", "must be at least 1"));
            }
        }
        if self.grpc_max_message_size.0 < 64 << 10 {
            return Err(Config::invalid(
                "MANAGER_GRPC_MAX_MESSAGE_SIZE",
                self.grpc_max_message_size.0.to_string(),
                "must be at least 64K",
            ));
        }
        if self.vm_log_files == 0 {
            return Err(Config::invalid(
                "MANAGER_VM_LOG_FILES",
                "0",
                "must be at least 1",
            ));
        }
        if self.vm_log_max_size.0 < 4096 {
            return Err(Config::invalid(
                "MANAGER_VM_LOG_MAX_SIZE",
                self.vm_log_max_size.0.to_string(),
                "must be at least 4K",
            ));
        }
        if self.start_timeout.is_zero() {
            return Err(Config::invalid(
                "MANAGER_START_TIMEOUT",
                "0s",
                "must be positive",
            ));
        }
        let state_dir = self.state_dir.to_string_lossy();
        if !self.state_dir.is_absolute() {
            return Err(Config::invalid(
                "MANAGER_STATE_DIR",
                state_dir,
                "must be an absolute path",
            ));
        }
        if state_dir.len() + VM_SOCKET_SUFFIX_LEN > UNIX_PATH_MAX {
            return Err(Config::invalid(
                "MANAGER_STATE_DIR",
                state_dir.clone(),
                format!(
                    "is {} bytes long; at most {} bytes leave room for the per-VM control sockets (unix socket paths are limited to 108 bytes)",
                    state_dir.len(),
                    UNIX_PATH_MAX - VM_SOCKET_SUFFIX_LEN
                ),
            ));
        }
        crate::privilege::validate(self)?;
        Ok(())
    }

    /// Where spans are exported (OTLP/HTTP: the collector's URL and
    /// `/v1/traces`), or None when traces are off: an empty
    /// `COCOS_JAEGER_URL` or a `COCOS_JAEGER_TRACE_RATIO` of 0.
    pub fn traces_endpoint(&self) -> Option<String> {
        let url = self.jaeger_url.trim();
        if url.is_empty() || self.jaeger_trace_ratio <= 0.0 {
            return None;
        }
        let base = url.trim_end_matches('/');
        if base.ends_with("/v1/traces") {
            return Some(base.to_string());
        }
        Some(format!("{base}/v1/traces"))
    }
}

/// A collector URL the exporter can use: empty (no traces), or
/// `http://` / `https://` with a host, and without user or password (a
/// secret in the URL would reach error messages; collectors that need
/// credentials take them as headers, `OTEL_EXPORTER_OTLP_HEADERS`).
fn check_collector_url(url: &str) -> Result<(), String> {
    let url = url.trim();
    if url.is_empty() {
        return Ok(());
    }
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or("expected an http:// or https:// URL (or empty for no traces)")?;
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain spaces or control characters".into());
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return Err(
            "must not carry a user or password; give credentials as headers (OTEL_EXPORTER_OTLP_HEADERS)"
                .into(),
        );
    }
    if authority.is_empty() || authority.starts_with(':') {
        return Err("has no host".into());
    }
    if rest.contains(['?', '#']) {
        return Err("must not carry a query or fragment".into());
    }
    Ok(())
}

/// `url` with whatever precedes an `@` in its authority (a user and
/// password) replaced, for messages.
fn redact_userinfo(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rfind('@') {
        Some(at) => format!("{scheme}<redacted>{}", &rest[at..]),
        None => url.to_string(),
    }
}

/// Flattens a parsed TOML file into dotted keys with their text values.
fn flatten_file(
    prefix: &str,
    table: &config::Map<String, config::Value>,
    out: &mut BTreeMap<String, Result<String, String>>,
) {
    for (name, value) in table {
        let key = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        match &value.kind {
            config::ValueKind::Table(inner) => flatten_file(&key, inner, out),
            config::ValueKind::Array(_) => {
                out.insert(key, Err("expected a single value, found an array".into()));
            }
            config::ValueKind::Nil => {}
            _ => {
                let text = value
                    .clone()
                    .into_string()
                    .map_err(|e| format!("unreadable value: {e}"));
                out.insert(key, text);
            }
        }
    }
}

fn env_prefix_is_ours(name: &str) -> bool {
    name.starts_with("MANAGER_") || name.starts_with("COCOS_")
}

/// Loads a configuration from defaults, the file and the environment, in
/// that order of precedence, then validates the whole.
pub fn load(inputs: &ConfigInputs<'_>) -> Result<Loaded, ConfigError> {
    let file_name = inputs.file_name.unwrap_or("<config>").to_string();
    let mut values: BTreeMap<&'static str, String> = BTreeMap::new();
    let mut explicit: BTreeSet<&'static str> = BTreeSet::new();
    let mut warnings = Vec::new();

    if let Some(text) = inputs.file_text {
        let parsed = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .and_then(|c| c.try_deserialize::<config::Map<String, config::Value>>())
            .map_err(|e| ConfigError::File {
                file: file_name.clone(),
                reason: e.to_string(),
            })?;
        let mut flat = BTreeMap::new();
        flatten_file("", &parsed, &mut flat);
        for (key, value) in flat {
            let setting = SETTINGS.iter().find(|s| s.key == key).ok_or_else(|| {
                ConfigError::UnknownFileKey {
                    file: file_name.clone(),
                    key: key.clone(),
                }
            })?;
            let text = value.map_err(|reason| ConfigError::Invalid {
                env: setting.env,
                key: setting.key,
                value: String::new(),
                reason,
            })?;
            values.insert(setting.env, text);
            explicit.insert(setting.env);
        }
    }

    for (name, value) in &inputs.env {
        if !env_prefix_is_ours(name) {
            continue;
        }
        match SETTINGS.iter().find(|s| s.env == name) {
            Some(setting) => {
                values.insert(setting.env, value.clone());
                explicit.insert(setting.env);
            }
            None if name.starts_with("MANAGER_") => {
                warnings.push(format!(
                    "unknown environment variable {name} is ignored (a typo? known settings are listed in config/cocos-manager.toml)"
                ));
            }
            None => {}
        }
    }

    let mut config = Config::from_text(&values)?;

    // An explicit setting always wins; a technology the operator left unset
    // follows what the host offers.
    let sev_explicit = explicit.contains("MANAGER_QEMU_ENABLE_SEV_SNP");
    let tdx_explicit = explicit.contains("MANAGER_QEMU_ENABLE_TDX");
    if !sev_explicit {
        config.qemu_enable_sev_snp =
            inputs.host.sev_snp && !(tdx_explicit && config.qemu_enable_tdx);
    }
    if !tdx_explicit {
        config.qemu_enable_tdx = inputs.host.tdx && !config.qemu_enable_sev_snp;
    }

    if config.state_dir.is_relative() {
        config.state_dir = inputs.cwd.join(&config.state_dir);
    }
    config.state_dir = normalize(&config.state_dir);

    config.validate()?;
    Ok(Loaded { config, warnings })
}

/// Removes `.` and `..` components without touching the filesystem.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// Renders the full default configuration file, every key commented with its
/// environment name: the source of `config/cocos-manager.toml`.
pub fn render_default_file() -> String {
    let mut out = String::from(
        "# Cocos manager configuration: every setting with its built-in default.\n\
         # Precedence: built-in defaults < this file < environment variables.\n\
         # Each key names the environment variable that overrides it.\n\
         # Start with: cocos-manager --config /etc/cocos-manager/cocos-manager.toml\n",
    );
    // TOML wants top-level keys before the first table.
    let mut sections: Vec<(&str, Vec<(&str, &Setting)>)> = vec![("", Vec::new())];
    for setting in SETTINGS {
        let (sec, name) = setting.key.rsplit_once('.').unwrap_or(("", setting.key));
        match sections.iter_mut().find(|(s, _)| *s == sec) {
            Some((_, items)) => items.push((name, setting)),
            None => sections.push((sec, vec![(name, setting)])),
        }
    }
    for (sec, items) in sections {
        if !sec.is_empty() {
            out.push_str(&format!("\n[{sec}]\n"));
        } else {
            out.push('\n');
        }
        for (name, setting) in items {
            out.push_str(&format!("# {} ({})\n", setting.doc, setting.env));
            // Left commented so that, unset, the host is detected.
            let detected = matches!(
                setting.env,
                "MANAGER_QEMU_ENABLE_SEV_SNP" | "MANAGER_QEMU_ENABLE_TDX"
            );
            let lead = if detected { "# " } else { "" };
            out.push_str(&format!("{lead}{name} = {}\n", toml_literal(setting)));
        }
    }
    out
}

/// The configuration reference table of the README, one row per setting.
pub fn render_reference_table() -> String {
    let mut out = String::from("| variable | file key | default | meaning |\n|---|---|---|---|\n");
    for s in SETTINGS {
        let default = if s.default.is_empty() {
            "(empty)".to_string()
        } else {
            format!("`{}`", s.default)
        };
        out.push_str(&format!(
            "| `{}` | `{}` | {default} | {} |\n",
            s.env, s.key, s.doc
        ));
    }
    out
}

fn toml_literal(setting: &Setting) -> String {
    let is_number = !setting.default.is_empty()
        && setting
            .default
            .chars()
            .all(|c| c.is_ascii_digit() || c == '.');
    // Every boolean setting defaults to true or false; no other does.
    let is_bool = matches!(setting.default, "true" | "false");
    if is_bool || (is_number && setting.env != "MANAGER_QEMU_VIRTIO_NET_PCI_ADDR") {
        setting.default.to_string()
    } else {
        format!("{:?}", setting.default)
    }
}

#[cfg(test)]
mod tests;
