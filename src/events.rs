//! What the operator's service (`cocos.manager.v1.Operator`) reports of
//! VMs: the state of each as the manager sees it, and the lifecycle events
//! that change it. Pure: the actors fill these in and the front sends them;
//! time is passed in, so each conversion is a plain unit test.
//!
//! One place turns them into wire messages, so `ListVms`, `GetVm` and the
//! events of `WatchEvents` describe a VM the same way, and metrics count
//! the same events a watcher sees.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::attestation::document::{AttestationState, LaunchKind};
use crate::config::TeeMode;
use crate::lifecycle::Phase;
use crate::operator_proto as wire;
use crate::record::{LaunchFacts, LaunchInfo};

/// The life of a VM, as the APIs report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VmState {
    Starting,
    Running,
    Restarting,
    Stopping,
    Stopped,
    Failed,
}

impl VmState {
    pub const ALL: [VmState; 6] = [
        VmState::Starting,
        VmState::Running,
        VmState::Restarting,
        VmState::Stopping,
        VmState::Stopped,
        VmState::Failed,
    ];

    /// Lower-case name, as metrics labels and JSON output use it.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Restarting => "restarting",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Failed => "failed",
        }
    }

    fn to_wire(self) -> wire::VmState {
        match self {
            VmState::Starting => wire::VmState::Starting,
            VmState::Running => wire::VmState::Running,
            VmState::Restarting => wire::VmState::Restarting,
            VmState::Stopping => wire::VmState::Stopping,
            VmState::Stopped => wire::VmState::Stopped,
            VmState::Failed => wire::VmState::Failed,
        }
    }
}

impl From<Phase> for VmState {
    fn from(phase: Phase) -> VmState {
        match phase {
            Phase::Starting => VmState::Starting,
            Phase::Running => VmState::Running,
            Phase::Backoff | Phase::Restarting => VmState::Restarting,
            Phase::Stopping(_) | Phase::Unkillable => VmState::Stopping,
            Phase::Stopped => VmState::Stopped,
            Phase::Failed => VmState::Failed,
        }
    }
}

/// How a process ended, as far as the manager could learn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCode {
    Code(i32),
    Signal(i32),
    /// Not our child (re-adopted): only its parent could learn how.
    Unknown,
}

/// Why QEMU ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExitCause {
    /// The manager stopped it (remove, TTL, shutdown, a restart's kill).
    Requested,
    /// The guest powered off (or QEMU exited 0 on its own).
    GuestShutdown,
    /// The guest reported a panic.
    GuestPanic,
    /// Anything else: a signal, a non-zero exit, an unknown end.
    Crash,
}

impl ExitCause {
    pub const ALL: [ExitCause; 4] = [
        ExitCause::Requested,
        ExitCause::GuestShutdown,
        ExitCause::GuestPanic,
        ExitCause::Crash,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ExitCause::Requested => "requested",
            ExitCause::GuestShutdown => "guest_shutdown",
            ExitCause::GuestPanic => "guest_panic",
            ExitCause::Crash => "crash",
        }
    }
}

/// One end of QEMU: its status (in words, as logs show it) and cause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    pub code: ExitCode,
    /// e.g. "exit status 1", "killed by SIGKILL".
    pub status: String,
    pub cause: ExitCause,
}

impl Exit {
    /// As `Vm.last_exit` shows it: "killed by SIGKILL (crash)".
    pub fn summary(&self) -> String {
        format!("{} ({})", self.status, self.cause.as_str())
    }
}

/// What happened to a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// Admitted; its first launch begins.
    Created,
    /// A launch (first or a restart) is up and recorded.
    Running,
    Exited(Exit),
    /// Supervision will launch it again after `after`.
    Restarting {
        attempt: u32,
        after: Duration,
    },
    /// Gave up: the first launch failed, or the restart budget is spent.
    Failed {
        reason: String,
    },
    /// A stop began (`reason` as `StopReason::as_str`).
    Stopping {
        reason: &'static str,
    },
    /// Its TTL passed; a stop follows.
    TtlExpired,
    /// Taken over from a previous manager.
    Readopted,
    /// The manager no longer lists it.
    Removed,
}

impl EventKind {
    fn to_wire(&self) -> wire::EventKind {
        match self {
            EventKind::Created => wire::EventKind::Created,
            EventKind::Running => wire::EventKind::Running,
            EventKind::Exited(_) => wire::EventKind::Exited,
            EventKind::Restarting { .. } => wire::EventKind::Restarting,
            EventKind::Failed { .. } => wire::EventKind::Failed,
            EventKind::Stopping { .. } => wire::EventKind::Stopping,
            EventKind::TtlExpired => wire::EventKind::TtlExpired,
            EventKind::Readopted => wire::EventKind::Readopted,
            EventKind::Removed => wire::EventKind::Removed,
        }
    }

    /// Lower-case name, as logs and JSON output use it.
    pub fn as_str(&self) -> &'static str {
        match self {
            EventKind::Created => "created",
            EventKind::Running => "running",
            EventKind::Exited(_) => "exited",
            EventKind::Restarting { .. } => "restarting",
            EventKind::Failed { .. } => "failed",
            EventKind::Stopping { .. } => "stopping",
            EventKind::TtlExpired => "ttl_expired",
            EventKind::Readopted => "readopted",
            EventKind::Removed => "removed",
        }
    }
}

/// What the VM's own actor knows of it, sent with each of its events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmFacts {
    pub state: VmState,
    /// QEMU's pid, while it has a process.
    pub pid: Option<i32>,
    pub port: Option<u16>,
    pub restarts: u32,
    /// When the current QEMU process started.
    pub started: Option<SystemTime>,
    pub ttl_deadline: Option<SystemTime>,
    pub last_exit: Option<Exit>,
}

impl VmFacts {
    pub fn starting() -> VmFacts {
        VmFacts {
            state: VmState::Starting,
            pid: None,
            port: None,
            restarts: 0,
            started: None,
            ttl_deadline: None,
            last_exit: None,
        }
    }
}

/// A VM as the operator's service shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmView {
    pub id: String,
    pub tee: LaunchKind,
    pub vtpm: bool,
    pub created: SystemTime,
    pub readopted: bool,
    pub facts: VmFacts,
}

/// Milliseconds since the Unix epoch (0 before it).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The launch kind VMs get under a TEE mode.
pub fn launch_kind(mode: TeeMode) -> LaunchKind {
    match mode {
        TeeMode::None => LaunchKind::Plain,
        TeeMode::SevSnpOvmf => LaunchKind::SevSnpOvmf,
        TeeMode::SevSnpIgvm => LaunchKind::SevSnpIgvm,
        TeeMode::Tdx => LaunchKind::Tdx,
    }
}

fn tee_to_wire(kind: LaunchKind) -> wire::TeeMode {
    match kind {
        LaunchKind::Plain => wire::TeeMode::None,
        LaunchKind::SevSnpOvmf => wire::TeeMode::SevSnp,
        LaunchKind::SevSnpIgvm => wire::TeeMode::SevSnpIgvm,
        LaunchKind::Tdx => wire::TeeMode::Tdx,
    }
}

impl VmView {
    /// The VM as `ListVms` and events carry it, at time `now`.
    pub fn to_wire(&self, now: SystemTime) -> wire::Vm {
        let facts = &self.facts;
        let since = |t: SystemTime| millis(now.duration_since(t).unwrap_or(Duration::ZERO));
        wire::Vm {
            id: self.id.clone(),
            state: facts.state.to_wire() as i32,
            pid: facts.pid.unwrap_or(0),
            port: u32::from(facts.port.unwrap_or(0)),
            tee: tee_to_wire(self.tee) as i32,
            vtpm: self.vtpm,
            restarts: facts.restarts,
            created_unix_ms: unix_ms(self.created),
            uptime_ms: match (facts.pid, facts.started) {
                (Some(_), Some(started)) => since(started),
                _ => 0,
            },
            ttl_left_ms: facts
                .ttl_deadline
                .map(|deadline| millis(deadline.duration_since(now).unwrap_or(Duration::ZERO))),
            last_exit: facts
                .last_exit
                .as_ref()
                .map(Exit::summary)
                .unwrap_or_default(),
            readopted: self.readopted,
        }
    }

    /// The wire event of `kind` happening to this VM (already updated) at
    /// `now`, numbered `sequence`.
    pub fn event(&self, sequence: u64, kind: &EventKind, now: SystemTime) -> wire::VmEvent {
        let mut event = wire::VmEvent {
            sequence,
            unix_ms: unix_ms(now),
            kind: kind.to_wire() as i32,
            id: self.id.clone(),
            vm: Some(self.to_wire(now)),
            ..Default::default()
        };
        match kind {
            EventKind::Exited(exit) => {
                event.detail = exit.status.clone();
                event.exit_cause = exit.cause.as_str().to_string();
                match exit.code {
                    ExitCode::Code(code) => event.exit_code = Some(code),
                    ExitCode::Signal(signal) => event.exit_signal = Some(signal),
                    ExitCode::Unknown => {}
                }
            }
            EventKind::Restarting { attempt, after } => {
                event.attempt = *attempt;
                event.delay_ms = millis(*after);
                event.detail = format!("restart attempt {attempt} in {} ms", millis(*after));
            }
            EventKind::Failed { reason } => event.detail = reason.clone(),
            EventKind::Stopping { reason } => event.detail = (*reason).to_string(),
            _ => {}
        }
        event
    }

    /// The CURRENT event that opens a watch, for snapshot `sequence`.
    pub fn current(&self, sequence: u64, now: SystemTime) -> wire::VmEvent {
        wire::VmEvent {
            sequence,
            unix_ms: unix_ms(now),
            kind: wire::EventKind::Current as i32,
            id: self.id.clone(),
            vm: Some(self.to_wire(now)),
            ..Default::default()
        }
    }
}

/// What `GetVm` says a VM was launched with. The facts are absent while a
/// VM's first launch is in progress.
pub fn launch_config(
    info: &LaunchInfo,
    facts: Option<&LaunchFacts>,
    attestation: Option<&AttestationState>,
) -> wire::LaunchConfig {
    wire::LaunchConfig {
        ovmf_version: info.ovmf_version.clone(),
        cpu_num: info.cpu_num,
        cpu_type: info.cpu_type.clone(),
        kernel_cmd: info.kernel_cmd.clone(),
        eos_version: info.eos_version.clone(),
        aa_kbs_params: facts.map(|f| f.aa_kbs_params.clone()).unwrap_or_default(),
        settings: facts
            .map(|f| f.settings.clone().into_iter().collect())
            .unwrap_or_default(),
        host_data: attestation
            .and_then(|a| a.host_data.clone())
            .unwrap_or_default(),
        measurement: attestation
            .and_then(|a| a.measurement.clone())
            .unwrap_or_default(),
    }
}

/// The SYNCED marker after a watch's CURRENT events.
pub fn synced(sequence: u64, now: SystemTime) -> wire::VmEvent {
    wire::VmEvent {
        sequence,
        unix_ms: unix_ms(now),
        kind: wire::EventKind::Synced as i32,
        ..Default::default()
    }
}

/// The LAGGED marker: `lost` events were dropped for a slow watcher.
pub fn lagged(lost: u64, now: SystemTime) -> wire::VmEvent {
    wire::VmEvent {
        unix_ms: unix_ms(now),
        kind: wire::EventKind::Lagged as i32,
        lagged: lost,
        detail: format!("this watcher fell behind and lost {lost} events"),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn view() -> VmView {
        VmView {
            id: "vm-1".into(),
            tee: LaunchKind::SevSnpOvmf,
            vtpm: true,
            created: at(1_000),
            readopted: false,
            facts: VmFacts {
                state: VmState::Running,
                pid: Some(42),
                port: Some(6100),
                restarts: 2,
                started: Some(at(1_010)),
                ttl_deadline: Some(at(1_100)),
                last_exit: Some(Exit {
                    code: ExitCode::Signal(9),
                    status: "killed by SIGKILL".into(),
                    cause: ExitCause::Crash,
                }),
            },
        }
    }

    #[test]
    fn a_running_vm_on_the_wire() {
        let vm = view().to_wire(at(1_040));
        assert_eq!(vm.state(), wire::VmState::Running);
        assert_eq!(vm.tee(), wire::TeeMode::SevSnp);
        assert_eq!((vm.pid, vm.port, vm.restarts), (42, 6100, 2));
        assert_eq!(vm.created_unix_ms, 1_000_000);
        assert_eq!(vm.uptime_ms, 30_000);
        assert_eq!(vm.ttl_left_ms, Some(60_000));
        assert_eq!(vm.last_exit, "killed by SIGKILL (crash)");
        assert!(vm.vtpm && !vm.readopted);
    }

    #[test]
    fn no_process_no_uptime_and_a_passed_ttl_is_zero() {
        let mut v = view();
        v.facts.pid = None;
        v.facts.ttl_deadline = Some(at(1_020));
        let vm = v.to_wire(at(1_040));
        assert_eq!(vm.uptime_ms, 0);
        assert_eq!(vm.ttl_left_ms, Some(0));
        v.facts.ttl_deadline = None;
        assert_eq!(v.to_wire(at(1_040)).ttl_left_ms, None);
    }

    #[test]
    fn exit_events_carry_code_or_signal_and_cause() {
        let v = view();
        let signalled = v.event(
            7,
            &EventKind::Exited(Exit {
                code: ExitCode::Signal(9),
                status: "killed by SIGKILL".into(),
                cause: ExitCause::Crash,
            }),
            at(1_050),
        );
        assert_eq!(signalled.kind(), wire::EventKind::Exited);
        assert_eq!(signalled.sequence, 7);
        assert_eq!(signalled.unix_ms, 1_050_000);
        assert_eq!(
            (signalled.exit_code, signalled.exit_signal),
            (None, Some(9))
        );
        assert_eq!(signalled.exit_cause, "crash");
        assert_eq!(signalled.detail, "killed by SIGKILL");
        let exited = v.event(
            8,
            &EventKind::Exited(Exit {
                code: ExitCode::Code(0),
                status: "exit status 0".into(),
                cause: ExitCause::GuestShutdown,
            }),
            at(1_050),
        );
        assert_eq!((exited.exit_code, exited.exit_signal), (Some(0), None));
        assert_eq!(exited.exit_cause, "guest_shutdown");
        let unknown = v.event(
            9,
            &EventKind::Exited(Exit {
                code: ExitCode::Unknown,
                status: "exit status unknown".into(),
                cause: ExitCause::Requested,
            }),
            at(1_050),
        );
        assert_eq!((unknown.exit_code, unknown.exit_signal), (None, None));
    }

    #[test]
    fn restart_failure_and_stop_details() {
        let v = view();
        let restarting = v.event(
            1,
            &EventKind::Restarting {
                attempt: 3,
                after: Duration::from_millis(2_500),
            },
            at(1_050),
        );
        assert_eq!(restarting.kind(), wire::EventKind::Restarting);
        assert_eq!((restarting.attempt, restarting.delay_ms), (3, 2_500));
        let failed = v.event(
            2,
            &EventKind::Failed {
                reason: "restart budget spent".into(),
            },
            at(1_050),
        );
        assert_eq!(failed.kind(), wire::EventKind::Failed);
        assert_eq!(failed.detail, "restart budget spent");
        let stopping = v.event(
            3,
            &EventKind::Stopping {
                reason: "TTL expired",
            },
            at(1_050),
        );
        assert_eq!(stopping.detail, "TTL expired");
        for (kind, expected) in [
            (EventKind::Created, wire::EventKind::Created),
            (EventKind::Running, wire::EventKind::Running),
            (EventKind::TtlExpired, wire::EventKind::TtlExpired),
            (EventKind::Readopted, wire::EventKind::Readopted),
            (EventKind::Removed, wire::EventKind::Removed),
        ] {
            let event = v.event(4, &kind, at(1_050));
            assert_eq!(event.kind(), expected, "{kind:?}");
            assert_eq!(event.id, "vm-1");
            assert!(event.vm.is_some());
        }
    }

    #[test]
    fn markers() {
        let current = view().current(5, at(1_050));
        assert_eq!(current.kind(), wire::EventKind::Current);
        assert_eq!(current.sequence, 5);
        let synced = synced(5, at(1_050));
        assert_eq!(synced.kind(), wire::EventKind::Synced);
        assert!(synced.id.is_empty() && synced.vm.is_none());
        let lagged = lagged(12, at(1_050));
        assert_eq!(lagged.kind(), wire::EventKind::Lagged);
        assert_eq!(lagged.lagged, 12);
    }

    #[test]
    fn states_from_phases() {
        use crate::lifecycle::StopStage;
        assert_eq!(VmState::from(Phase::Backoff), VmState::Restarting);
        assert_eq!(
            VmState::from(Phase::Stopping(StopStage::Kill)),
            VmState::Stopping
        );
        assert_eq!(VmState::from(Phase::Unkillable), VmState::Stopping);
        assert_eq!(VmState::from(Phase::Failed), VmState::Failed);
        let names: Vec<_> = VmState::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            names,
            [
                "starting",
                "running",
                "restarting",
                "stopping",
                "stopped",
                "failed"
            ]
        );
    }

    #[test]
    fn launch_config_from_info_facts_and_attestation() {
        let info = LaunchInfo {
            ovmf_version: "edk2-stable202302".into(),
            cpu_num: 4,
            cpu_type: "EPYC".into(),
            kernel_cmd: "quiet console=null".into(),
            eos_version: "1.0".into(),
        };
        let bare = launch_config(&info, None, None);
        assert_eq!(bare.cpu_num, 4);
        assert_eq!(bare.kernel_cmd, "quiet console=null");
        assert!(bare.settings.is_empty() && bare.aa_kbs_params.is_empty());
        let facts = LaunchFacts {
            settings: [("MANAGER_QEMU_SMP_COUNT".to_string(), "4".to_string())].into(),
            aa_kbs_params: "kbs:1".into(),
            host_data: None,
        };
        let attestation = AttestationState {
            launch: LaunchKind::SevSnpOvmf,
            measurement: Some("bWVhc3VyZW1lbnQ=".into()),
            host_data: Some("aG9zdA==".into()),
            host_data_per_vm: true,
            vtpm: false,
            document: None,
            unavailable: None,
        };
        let full = launch_config(&info, Some(&facts), Some(&attestation));
        assert_eq!(full.aa_kbs_params, "kbs:1");
        assert_eq!(full.settings["MANAGER_QEMU_SMP_COUNT"], "4");
        assert_eq!(full.host_data, "aG9zdA==");
        assert_eq!(full.measurement, "bWVhc3VyZW1lbnQ=");
    }

    #[test]
    fn launch_kinds_of_modes() {
        assert_eq!(launch_kind(TeeMode::None), LaunchKind::Plain);
        assert_eq!(launch_kind(TeeMode::SevSnpIgvm), LaunchKind::SevSnpIgvm);
        assert_eq!(tee_to_wire(LaunchKind::Tdx), wire::TeeMode::Tdx);
    }
}
