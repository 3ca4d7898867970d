//! The `CvmActor`: one per VM. It owns the VM's QEMU process (through a
//! pidfd), its folder (firmware vars copy, shares, logs, record), its port
//! reservation, its control connection and its supervision state, and it
//! alone changes them.

mod console;
mod files;
mod launch;
mod qmp;

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use cocos_core::attestation::document::{AttestationState, DocumentInputs};
use cocos_core::config::Config;
use cocos_core::events::{unix_ms, EventKind, Exit, ExitCause, ExitCode, VmFacts};
use cocos_core::guest::ValidatedCreate;
use cocos_core::lifecycle::{Effect, Event, Lifecycle, Phase, StopAnswer, StopBudget, StopReason};
use cocos_core::record::{LaunchFacts, LaunchInfo, ProcessRecord, VmRecord, RECORD_VERSION};
use cocos_core::restart::ExitKind;
use nix::sys::signal::Signal;
use tokio::sync::{oneshot, watch};
use tracing::{debug, error, info, warn, Instrument};

use self::launch::{
    end_process, exit_of, ExitBook, FirstBoot, Helper, Launched, Launcher, EXIT_BOOK_LEN,
};
use self::qmp::{Qmp, QmpEvent};
use crate::attest::Measurer;
use crate::error::ApiError;
use crate::ports::{PortAllocator, Release, ReserveExact};
use crate::process::{identify, pidfd_exited, pidfd_open, pidfd_signal, ExitStatus, Identity};
use crate::reaper::{ChildExited, ZombieReaper};
use crate::records;

pub use cocos_core::events::VmState;

/// Told to the supervisor when a VM holds nothing any more: its process
/// reaped, its folder removed, its port released.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct VmGone {
    pub id: String,
    pub state: VmState,
    /// The supervisor keeps a failed VM listed (until RemoveVm) so the
    /// failure can be seen; a stopped one is forgotten.
    pub keep_listed: bool,
}

/// Told to the supervisor with each lifecycle event of a VM: what
/// happened, and the VM's facts after it. The supervisor keeps the facts
/// for `ListVms` and publishes the event to watchers.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct VmReport {
    pub id: String,
    pub kind: EventKind,
    pub facts: VmFacts,
}

/// What the VM was launched with, for `GetVm`.
#[derive(Message)]
#[rtype(result = "Described")]
pub struct Describe;

#[derive(Debug, Clone)]
pub struct Described {
    pub launch: Option<LaunchFacts>,
    pub argv: Vec<String>,
    pub attestation: Option<AttestationState>,
}

/// The actors a VM needs.
#[derive(Clone)]
pub struct Services {
    pub ports: Addr<PortAllocator>,
    pub reaper: Addr<ZombieReaper>,
    pub measurer: Addr<Measurer>,
    pub supervisor: Recipient<VmGone>,
    pub reports: Recipient<VmReport>,
}

/// Start the VM; answers when QEMU is really up, or with why it is not.
#[derive(Message)]
#[rtype(result = "Result<Booted, ApiError>")]
pub struct Boot(
    pub ValidatedCreate,
    /// The create's span: the parent of the launch's spans.
    pub tracing::Span,
);

#[derive(Debug, Clone)]
pub struct Booted {
    pub port: u16,
    pub attestation: AttestationState,
}

/// Take over a VM a previous manager started.
#[derive(Message)]
#[rtype(result = "Result<u16, ApiError>")]
pub struct Adopt(pub Box<VmRecord>);

/// Stop the VM in stages and remove everything it had.
#[derive(Message)]
#[rtype(result = "Result<(), ApiError>")]
pub struct Stop {
    pub reason: StopReason,
}

struct Process {
    pid: i32,
    pidfd: Arc<OwnedFd>,
    identity: Identity,
}

pub struct CvmActor {
    id: String,
    config: Arc<Config>,
    paths: cocos_core::qemu::VmPaths,
    services: Services,
    info: LaunchInfo,
    doc_inputs: Arc<DocumentInputs>,
    attestation: Option<AttestationState>,
    /// What the VM's command is made from (kept in its record).
    launch: Option<LaunchFacts>,
    /// Every decision about the VM's life; this actor carries them out.
    life: Lifecycle,
    port: Option<u16>,
    argv: Vec<String>,
    process: Option<Process>,
    /// The VM's software TPM, when it has one; ended after QEMU.
    swtpm: Option<Helper>,
    exit: watch::Sender<ExitBook>,
    qmp: Option<Qmp>,
    /// The reason of the last SHUTDOWN event: a guest-initiated power-off is
    /// a normal end, anything else that ends QEMU is not.
    shutdown_reason: Option<String>,
    epoch: Instant,
    stop_waiters: Vec<oneshot::Sender<Result<(), ApiError>>>,
    ttl_deadline: Option<SystemTime>,
    ttl_timer: Option<SpawnHandle>,
    restart_timer: Option<SpawnHandle>,
    stage_timer: Option<SpawnHandle>,
    /// Release has begun (helpers ending, files going); done once released.
    releasing: bool,
    released: bool,
    /// Restarts supervision carried out (kept in the record).
    restarts: u32,
    /// When the current process started (None without a process).
    started: Option<SystemTime>,
    last_exit: Option<Exit>,
    /// Why the VM failed, for its Failed event.
    failure: Option<String>,
    /// The next Running is a re-adoption.
    adopting: bool,
    /// When the VM was created (kept in its record).
    created: SystemTime,
}

impl CvmActor {
    pub fn new(
        id: String,
        config: Arc<Config>,
        info: LaunchInfo,
        doc_inputs: Arc<DocumentInputs>,
        services: Services,
    ) -> CvmActor {
        let paths = cocos_core::qemu::VmPaths::new(&config, &id);
        let budget = StopBudget {
            powerdown: config.stop_powerdown_timeout,
            quit: config.stop_quit_timeout,
            term: config.stop_term_timeout,
            kill: config.stop_kill_timeout,
        };
        CvmActor {
            life: Lifecycle::new(config.restart(), budget),
            id,
            config,
            paths,
            services,
            info,
            doc_inputs,
            attestation: None,
            launch: None,
            port: None,
            argv: Vec::new(),
            process: None,
            swtpm: None,
            exit: watch::channel(Vec::new()).0,
            qmp: None,
            shutdown_reason: None,
            epoch: Instant::now(),
            stop_waiters: Vec::new(),
            ttl_deadline: None,
            ttl_timer: None,
            restart_timer: None,
            stage_timer: None,
            releasing: false,
            released: false,
            restarts: 0,
            started: None,
            last_exit: None,
            failure: None,
            adopting: false,
            created: SystemTime::now(),
        }
    }

    /// An actor for a VM found in a record, before `Adopt` checks it.
    pub fn from_record(record: &VmRecord, config: Arc<Config>, services: Services) -> CvmActor {
        let mut actor = CvmActor::new(
            record.id.clone(),
            config,
            record.info.clone(),
            Arc::new(DocumentInputs::default()),
            services,
        );
        actor.attestation = record.attestation.clone();
        actor.launch = record.launch.clone();
        actor.paths = record.paths.clone();
        actor.argv = record.argv.clone();
        actor.restarts = record.restarts;
        if let Some(ms) = record.created_ms {
            actor.created = UNIX_EPOCH + Duration::from_millis(ms);
        }
        actor.ttl_deadline = record
            .ttl_deadline_ms
            .map(|ms| UNIX_EPOCH + Duration::from_millis(ms));
        actor
    }

    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    fn state(&self) -> VmState {
        self.life.phase().into()
    }

    fn facts(&self) -> VmFacts {
        VmFacts {
            state: self.state(),
            pid: self.process.as_ref().map(|p| p.pid),
            port: self.port,
            restarts: self.restarts,
            started: self.process.as_ref().and(self.started),
            ttl_deadline: self.ttl_deadline,
            last_exit: self.last_exit.clone(),
        }
    }

    /// Tells the supervisor (and through it, watchers and metrics) what
    /// happened to the VM.
    fn report(&self, kind: EventKind) {
        self.services.reports.do_send(VmReport {
            id: self.id.clone(),
            kind,
            facts: self.facts(),
        });
    }

    /// Feeds an event to the lifecycle and carries out what it decides.
    fn handle_event(&mut self, ctx: &mut Context<Self>, event: Event) {
        let before = self.life.phase();
        let effects = self.life.on(event, self.now());
        let after = self.life.phase();
        if before != after {
            info!(vm = %self.id, from = ?before, to = ?after, ?event, "VM phase");
        } else {
            debug!(vm = %self.id, phase = ?after, ?event, ?effects, "VM event");
        }
        for effect in effects {
            self.apply(ctx, effect);
        }
    }

    fn apply(&mut self, ctx: &mut Context<Self>, effect: Effect) {
        match effect {
            Effect::Running => self.on_running(ctx),
            Effect::KillForRestart => self.signal_qemu(Signal::SIGKILL),
            Effect::ScheduleRestart { after, attempt } => {
                warn!(vm = %self.id, attempt, after = ?after, "restarting VM");
                self.process = None;
                self.qmp = None;
                self.restarts = self.restarts.saturating_add(1);
                self.report(EventKind::Restarting { attempt, after });
                self.restart_timer = Some(ctx.run_later(after, |act, ctx| {
                    act.restart_timer = None;
                    act.handle_event(ctx, Event::RestartTimer);
                }));
            }
            Effect::Relaunch => self.relaunch(ctx),
            Effect::CancelTtl => {
                if let Some(timer) = self.ttl_timer.take() {
                    ctx.cancel_future(timer);
                }
            }
            Effect::CancelRestartTimer => {
                if let Some(timer) = self.restart_timer.take() {
                    ctx.cancel_future(timer);
                }
            }
            Effect::PowerDown => self.qmp_fire("system_powerdown"),
            Effect::Quit => self.qmp_fire("quit"),
            Effect::SigTerm => self.signal_qemu(Signal::SIGTERM),
            Effect::SigKill => self.signal_qemu(Signal::SIGKILL),
            Effect::ArmStageTimer { stage, after } => {
                if let Some(timer) = self.stage_timer.take() {
                    ctx.cancel_future(timer);
                }
                // The stage's span lives as long as its timer: it ends when
                // QEMU is gone (the timer is cancelled) or the stage runs out.
                let span = crate::telemetry::StopStageSpan::new(&self.id, stage, after);
                self.stage_timer = Some(ctx.run_later(after, move |act, ctx| {
                    span.ran_out();
                    act.stage_timer = None;
                    act.handle_event(ctx, Event::StageTimeout(stage));
                }));
            }
            Effect::Release {
                failed,
                keep_listed,
            } => {
                let state = if failed {
                    let reason = self
                        .failure
                        .clone()
                        .unwrap_or_else(|| "the VM failed".to_string());
                    self.report(EventKind::Failed { reason });
                    VmState::Failed
                } else {
                    VmState::Stopped
                };
                self.finish(ctx, state, keep_listed);
            }
            Effect::AnswerStop(StopAnswer::Stopped) => {
                // Answered once everything is released.
                if !self.releasing || self.released {
                    self.answer_waiters(Ok(()));
                }
            }
            Effect::AnswerStop(StopAnswer::Unkillable) => {
                let pid = self.process.as_ref().map(|p| p.pid).unwrap_or_default();
                error!(vm = %self.id, pid, "QEMU did not exit after SIGKILL; its files stay until it does");
                self.answer_waiters(Err(ApiError::Internal(format!(
                    "QEMU (pid {pid}) did not exit after SIGKILL within the stop budget; its files are removed once it does"
                ))));
            }
            Effect::Log(line) => info!(vm = %self.id, "{line}"),
            Effect::LogFailure(line) => {
                error!(vm = %self.id, "{line}");
                self.failure = Some(line);
            }
        }
    }

    fn answer_waiters(&mut self, result: Result<(), ApiError>) {
        for waiter in self.stop_waiters.drain(..) {
            let _ = waiter.send(result.clone());
        }
    }

    fn signal_qemu(&self, signal: Signal) {
        let Some(process) = &self.process else { return };
        warn!(vm = %self.id, pid = process.pid, signal = signal.as_str(), "sending signal to QEMU");
        if let Err(e) = pidfd_signal(&process.pidfd, signal) {
            error!(vm = %self.id, error = %e, "cannot signal QEMU");
        }
    }

    /// A QMP command that nobody waits for: the stop ladder moves on its
    /// timers, and the command itself is bounded.
    fn qmp_fire(&self, command: &'static str) {
        let Some(qmp) = self.qmp.clone() else { return };
        let id = self.id.clone();
        actix::spawn(async move {
            if let Err(e) = qmp.execute(command, None).await {
                debug!(vm = %id, command, error = %e, "QMP command failed");
            }
        });
    }

    fn launcher(&self, ctx: &mut Context<Self>) -> Launcher {
        Launcher {
            id: self.id.clone(),
            config: self.config.clone(),
            doc_inputs: self.doc_inputs.clone(),
            paths: self.paths.clone(),
            services: self.services.clone(),
            notify: ctx.address().recipient(),
            events: ctx.address().recipient(),
            exit: self.exit.subscribe(),
        }
    }

    /// The VM's record as it stands, when it has a process to record.
    fn record(&self) -> Option<VmRecord> {
        let (Some(process), Some(port)) = (&self.process, self.port) else {
            return None;
        };
        Some(VmRecord {
            version: RECORD_VERSION,
            id: self.id.clone(),
            pid: process.pid,
            start_time: process.identity.start_time,
            exe: process.identity.exe.clone(),
            argv: self.argv.clone(),
            port,
            paths: self.paths.clone(),
            ttl_deadline_ms: self.ttl_deadline.map(unix_ms),
            info: self.info.clone(),
            attestation: self.attestation.clone(),
            swtpm: self.swtpm.as_ref().map(|h| ProcessRecord {
                pid: h.pid,
                start_time: h.identity.start_time,
                exe: h.identity.exe.clone(),
            }),
            launch: self.launch.clone(),
            created_ms: Some(unix_ms(self.created)),
            restarts: self.restarts,
        })
    }

    /// Writes the VM's record off the actor thread, then calls `then` with
    /// the result. A QEMU without a record could not be found again by a
    /// restarted manager, so callers stop the VM when this fails.
    fn persist<F>(&mut self, ctx: &mut Context<Self>, then: F)
    where
        F: FnOnce(&mut Self, &mut Context<Self>, std::io::Result<()>) + 'static,
    {
        let record = self.record();
        let write = async move {
            let Some(record) = record else {
                return Ok(());
            };
            tokio::task::spawn_blocking(move || records::write(&record))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        };
        ctx.spawn(write.into_actor(self).map(move |result, act, ctx| {
            if let Err(e) = &result {
                error!(vm = %act.id, error = %e, "cannot write the VM record; stopping the VM, which a restarted manager could not find");
            }
            then(act, ctx, result)
        }));
    }

    /// Ends a launch that came up but cannot be kept (its record could not
    /// be written): SIGKILL, wait (bounded) for the exit, then the
    /// lifecycle's launch failure.
    fn abandon_launch(&mut self, ctx: &mut Context<Self>) {
        self.signal_qemu(Signal::SIGKILL);
        let Some(pid) = self.process.as_ref().map(|p| p.pid) else {
            self.handle_event(ctx, Event::LaunchFailed);
            return;
        };
        let mut exit = self.exit.subscribe();
        let limit = self.config.stop_kill_timeout;
        ctx.spawn(
            async move { launch::wait_exit(&mut exit, pid, Some(limit)).await }
                .into_actor(self)
                .map(move |status, act, ctx| {
                    if status.is_none() {
                        error!(vm = %act.id, pid, "QEMU did not exit after SIGKILL");
                    }
                    act.process = None;
                    act.qmp = None;
                    act.handle_event(ctx, Event::LaunchFailed);
                }),
        );
    }

    /// Ends the VM's swtpm (QEMU is gone already), removes the VM's files
    /// (off the actor thread), then releases the rest.
    fn finish(&mut self, ctx: &mut Context<Self>, final_state: VmState, keep_listed: bool) {
        if self.releasing {
            return;
        }
        self.releasing = true;
        for timer in [
            self.ttl_timer.take(),
            self.restart_timer.take(),
            self.stage_timer.take(),
        ]
        .into_iter()
        .flatten()
        {
            ctx.cancel_future(timer);
        }
        let helper = self.swtpm.take();
        let mut exit = self.exit.subscribe();
        let grace = self.config.stop_term_timeout;
        let paths = self.paths.clone();
        let id = self.id.clone();
        let span = crate::telemetry::release_span(&self.id);
        ctx.spawn(
            async move {
                if let Some(helper) = helper {
                    end_process(&mut exit, &helper, grace).await;
                }
                tokio::task::spawn_blocking(move || {
                    // Its processes are gone: its cgroup goes too.
                    crate::cgroups::remove(&id);
                    files::remove(&paths).map_err(|e| e.to_string())
                })
                .await
                .unwrap_or_else(|e| Err(format!("file removal did not finish: {e}")))
            }
            .instrument(span)
            .into_actor(self)
            .map(move |removed, act, ctx| {
                if let Err(e) = removed {
                    error!(vm = %act.id, error = %e, "could not remove the VM's files");
                }
                act.release_everything(ctx, final_state, keep_listed);
            }),
        );
    }

    /// Returns the port and tells the supervisor: the last step on every
    /// path, taken only once no process of this VM is left and its files
    /// are gone.
    fn release_everything(
        &mut self,
        ctx: &mut Context<Self>,
        final_state: VmState,
        keep_listed: bool,
    ) {
        if let Some(port) = self.port.take() {
            self.services.ports.do_send(Release(port));
        }
        self.qmp = None;
        self.process = None;
        self.released = true;
        info!(vm = %self.id, state = ?final_state, "VM released");
        self.services.supervisor.do_send(VmGone {
            id: self.id.clone(),
            state: final_state,
            keep_listed,
        });
        self.answer_waiters(Ok(()));
        ctx.stop();
    }

    fn take_launched(&mut self, launched: Launched) {
        self.port = Some(launched.port);
        self.argv = launched.argv;
        self.qmp = launched.qmp;
        self.swtpm = launched.swtpm;
        self.shutdown_reason = None;
        self.started = Some(SystemTime::now());
        self.process = Some(Process {
            pid: launched.pid,
            pidfd: launched.pidfd,
            identity: launched.identity,
        });
    }

    /// The process is up, ours and recorded: log its console, arm its TTL.
    fn on_running(&mut self, ctx: &mut Context<Self>) {
        if std::mem::take(&mut self.adopting) {
            self.report(EventKind::Readopted);
        } else {
            self.report(EventKind::Running);
        }
        console::start(
            self.paths.console_socket.clone(),
            self.paths.console_log.clone(),
            self.config.vm_log_max_size.0,
            self.config.vm_log_files,
        );
        if let (Some(deadline), None) = (self.ttl_deadline, &self.ttl_timer) {
            let left = deadline
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            self.ttl_timer = Some(ctx.run_later(left, |act, ctx| {
                info!(vm = %act.id, "TTL expired");
                act.ttl_timer = None;
                act.report(EventKind::TtlExpired);
                act.handle_event(ctx, Event::Ttl);
                if act.state() == VmState::Stopping {
                    act.report(EventKind::Stopping {
                        reason: StopReason::Ttl.as_str(),
                    });
                }
            }));
        }
        // An exit that raced the end of the launch.
        let pid = self.process.as_ref().map(|p| p.pid);
        let exited = pid.and_then(|pid| exit_of(&self.exit.borrow(), pid));
        if let Some(status) = exited {
            let kind = self.exit_kind(status);
            ctx.notify(Exited { status, kind });
        }
    }

    /// The one place a QEMU exit is classified.
    fn exit_kind(&self, status: ExitStatus) -> ExitKind {
        match (self.shutdown_reason.as_deref(), status) {
            (Some("guest-shutdown"), _) => ExitKind::Normal,
            (None, ExitStatus::Exited(0)) => ExitKind::Normal,
            _ => ExitKind::Abnormal,
        }
    }

    /// Why QEMU ended, for events and metrics.
    fn exit_cause(&self, kind: ExitKind) -> ExitCause {
        if self.shutdown_reason.as_deref() == Some("guest-panic") {
            return ExitCause::GuestPanic;
        }
        match (self.life.phase(), kind) {
            (Phase::Stopping(_) | Phase::Unkillable, _) => ExitCause::Requested,
            (_, ExitKind::Normal) => ExitCause::GuestShutdown,
            (_, ExitKind::Abnormal) => ExitCause::Crash,
        }
    }

    fn relaunch(&mut self, ctx: &mut Context<Self>) {
        if self.port.is_none() {
            self.handle_event(ctx, Event::LaunchFailed);
            return;
        }
        let port = self.port.unwrap_or_default();
        let argv = self.argv.clone();
        let mut launcher = self.launcher(ctx);
        // The last run's swtpm holds the TPM state's lock until it is gone.
        let old_swtpm = self.swtpm.take();
        let grace = self.config.stop_term_timeout;
        ctx.spawn(
            async move {
                if let Some(helper) = old_swtpm {
                    end_process(&mut launcher.exit, &helper, grace).await;
                }
                launcher.launch(argv, port).await
            }
            .into_actor(self)
            .map(|result, act, ctx| match result {
                Ok(launched) => {
                    let control = launched.qmp.is_some();
                    act.take_launched(launched);
                    act.persist(ctx, move |act, ctx, written| {
                        if written.is_err() {
                            act.abandon_launch(ctx);
                            return;
                        }
                        info!(vm = %act.id, port = ?act.port, "VM restarted");
                        act.handle_event(ctx, Event::Launched { control });
                    });
                }
                Err(e) => {
                    warn!(vm = %act.id, error = %e.error, "restart failed");
                    act.handle_event(ctx, Event::LaunchFailed);
                }
            }),
        );
    }

    /// Watches a process that is not our child through its pidfd.
    fn watch_adopted(&self, ctx: &mut Context<Self>, pid: i32, pidfd: Arc<OwnedFd>) {
        let addr = ctx.address();
        actix::spawn(async move {
            if pidfd_exited(pidfd).await.is_ok() {
                addr.do_send(ChildExited {
                    pid,
                    status: ExitStatus::Unknown,
                });
            }
        });
    }
}

/// QEMU ended (classified), delivered to the actor itself so an exit seen
/// while a launch finishes is handled after it.
#[derive(Message)]
#[rtype(result = "()")]
struct Exited {
    status: ExitStatus,
    kind: ExitKind,
}

impl Handler<Exited> for CvmActor {
    type Result = ();

    fn handle(&mut self, msg: Exited, ctx: &mut Self::Context) {
        let last_line = files::last_error_line(&self.paths.qemu_log).unwrap_or_default();
        if matches!(self.life.phase(), Phase::Running) {
            let oom_kills = crate::cgroups::oom_kills(&self.id);
            warn!(vm = %self.id, status = %msg.status, kind = ?msg.kind, qemu_said = %last_line, ?oom_kills, "QEMU exited on its own");
        } else {
            info!(vm = %self.id, status = %msg.status, "QEMU exited");
        }
        let code = match msg.status {
            ExitStatus::Exited(code) => ExitCode::Code(code),
            ExitStatus::Signaled(signal) => ExitCode::Signal(signal),
            ExitStatus::Unknown => ExitCode::Unknown,
        };
        let exit = Exit {
            code,
            status: msg.status.to_string(),
            cause: self.exit_cause(msg.kind),
        };
        self.last_exit = Some(exit.clone());
        self.started = None;
        self.report(EventKind::Exited(exit));
        self.handle_event(ctx, Event::Exited(msg.kind));
    }
}

impl Actor for CvmActor {
    type Context = Context<Self>;

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        debug!(vm = %self.id, state = ?self.state(), "VM actor stopped");
    }
}

impl Handler<Boot> for CvmActor {
    type Result = ResponseFuture<Result<Booted, ApiError>>;

    fn handle(&mut self, msg: Boot, ctx: &mut Self::Context) -> Self::Result {
        let Boot(create, span) = msg;
        self.ttl_deadline = create
            .ttl
            .and_then(|ttl| SystemTime::now().checked_add(ttl));
        let launcher = self.launcher(ctx);
        let (answer, answered) = oneshot::channel();
        ctx.spawn(
            launcher
                .first_boot(create, span)
                .into_actor(self)
                .map(|result, act, ctx| act.after_first_boot(ctx, result, answer)),
        );
        // Bounded: the release itself is (SIGKILL's bound, the swtpm's grace).
        let limit = self.config.stop_kill_timeout + self.config.stop_term_timeout;
        Box::pin(async move {
            let (outcome, released) = answered
                .await
                .map_err(|_| ApiError::Internal("the VM's actor ended during its create".into()))?;
            if let Some(rx) = released {
                let _ = tokio::time::timeout(limit, rx).await;
            }
            outcome
        })
    }
}

/// A create's answer, and what to wait for before giving it (a failed
/// create answers once everything it made is gone).
type BootAnswer = oneshot::Sender<(
    Result<Booted, ApiError>,
    Option<oneshot::Receiver<Result<(), ApiError>>>,
)>;

impl CvmActor {
    fn after_first_boot(
        &mut self,
        ctx: &mut Context<Self>,
        result: Result<FirstBoot, ApiError>,
        answer: BootAnswer,
    ) {
        let FirstBoot {
            launched,
            attestation,
            launch,
        } = match result {
            Ok(first) => first,
            Err(e) => {
                warn!(vm = %self.id, error = %e, "VM failed to start");
                self.failure = Some(format!("the VM failed to start: {e}"));
                self.handle_event(ctx, Event::LaunchFailed);
                let released = self.wait_released();
                let _ = answer.send((Err(e), released));
                return;
            }
        };
        let port = launched.port;
        self.attestation = Some(attestation.clone());
        self.launch = Some(launch);
        let control = launched.qmp.is_some();
        self.take_launched(launched);
        self.persist(ctx, move |act, ctx, written| match written {
            Ok(()) => {
                info!(vm = %act.id, port, vtpm = attestation.vtpm, "VM running");
                act.handle_event(ctx, Event::Launched { control });
                let _ = answer.send((Ok(Booted { port, attestation }), None));
            }
            Err(e) => {
                act.failure = Some(format!("cannot write the VM record: {e}"));
                act.abandon_launch(ctx);
                let released = act.wait_released();
                let error = files::storage_error("cannot write the VM record", &e);
                let _ = answer.send((Err(error), released));
            }
        });
    }

    /// A receiver answered once the VM's release is done (none if it is).
    fn wait_released(&mut self) -> Option<oneshot::Receiver<Result<(), ApiError>>> {
        if self.released {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        self.stop_waiters.push(tx);
        Some(rx)
    }
}

impl Handler<Adopt> for CvmActor {
    type Result = ResponseActFuture<Self, Result<u16, ApiError>>;

    fn handle(&mut self, msg: Adopt, ctx: &mut Self::Context) -> Self::Result {
        let record = msg.0;
        let pid = record.pid;
        let same = |identity: &Identity| {
            identity.start_time == record.start_time
                && identity.exe == record.exe
                && identity
                    .cmdline
                    .iter()
                    .any(|a| a == &format!("cocos-{}", record.id))
        };
        // Check, open a pidfd, check again: the pidfd then names the very
        // process we checked, whatever happens to the pid later.
        let adopted = identify(pid)
            .filter(same)
            .and_then(|_| pidfd_open(pid).ok())
            .and_then(|pidfd| identify(pid).filter(same).map(|identity| (pidfd, identity)));
        if let Some(swtpm) = &record.swtpm {
            let socket = record.paths.swtpm_socket.to_string_lossy().into_owned();
            let same = |identity: &Identity| {
                identity.start_time == swtpm.start_time
                    && identity.exe == swtpm.exe
                    && identity.cmdline.iter().any(|a| a.contains(&socket))
            };
            let adopted = identify(swtpm.pid)
                .filter(same)
                .and_then(|_| pidfd_open(swtpm.pid).ok())
                .and_then(|fd| identify(swtpm.pid).filter(same).map(|id| (fd, id)));
            match adopted {
                Some((fd, identity)) => {
                    let fd = Arc::new(fd);
                    self.watch_adopted(ctx, swtpm.pid, fd.clone());
                    self.swtpm = Some(Helper {
                        pid: swtpm.pid,
                        pidfd: fd,
                        identity,
                    });
                }
                None => {
                    warn!(vm = %self.id, pid = swtpm.pid, "the VM's swtpm is gone; its TPM no longer answers until the VM restarts")
                }
            }
        }
        let Some((pidfd, identity)) = adopted else {
            info!(vm = %self.id, pid, "the VM's QEMU is gone (or its pid belongs to another process now); cleaning up");
            self.finish(ctx, VmState::Stopped, false);
            // The lifecycle ends too (nothing is left to stop).
            let _ = self.life.on(Event::LaunchFailed, self.now());
            return Box::pin(fut::ready(Err(ApiError::NotFound(format!(
                "VM {} is gone",
                record.id
            )))));
        };
        let pidfd = Arc::new(pidfd);
        self.watch_adopted(ctx, pid, pidfd.clone());
        let ports = self.services.ports.clone();
        let port = record.port;
        let socket = record.paths.qmp_socket.clone();
        let events: Recipient<QmpEvent> = ctx.address().recipient();
        Box::pin(
            async move {
                if !ports.send(ReserveExact(port)).await.unwrap_or(false) {
                    warn!(port, "re-adopted VM's port was already reserved");
                }
                tokio::time::timeout(Duration::from_secs(5), Qmp::connect(&socket, events)).await
            }
            .into_actor(self)
            .map(move |qmp, act, ctx| {
                act.port = Some(port);
                act.qmp = match qmp {
                    Ok(Ok(qmp)) => Some(qmp),
                    Ok(Err(e)) => {
                        warn!(vm = %act.id, error = %e, "re-adopted VM's control socket does not answer; stop will use signals");
                        None
                    }
                    Err(_) => {
                        warn!(vm = %act.id, "re-adopted VM's control socket timed out; stop will use signals");
                        None
                    }
                };
                let started = crate::process::started_at(identity.start_time);
                act.process = Some(Process { pid, pidfd, identity });
                let cgroup = crate::cgroups::adopt(&act.config, &act.id);
                info!(vm = %act.id, pid, port, vtpm = act.swtpm.is_some(), cgroup, "re-adopted VM");
                let control = act.qmp.is_some();
                act.adopting = true;
                act.started = started.or(Some(SystemTime::now()));
                act.handle_event(ctx, Event::Launched { control });
                Ok(port)
            }),
        )
    }
}

impl Handler<Describe> for CvmActor {
    type Result = MessageResult<Describe>;

    fn handle(&mut self, _: Describe, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(Described {
            launch: self.launch.clone(),
            argv: self.argv.clone(),
            attestation: self.attestation.clone(),
        })
    }
}

impl Handler<Stop> for CvmActor {
    type Result = ResponseFuture<Result<(), ApiError>>;

    fn handle(&mut self, msg: Stop, ctx: &mut Self::Context) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        self.stop_waiters.push(tx);
        info!(vm = %self.id, reason = msg.reason.as_str(), "stop requested");
        let event = match msg.reason {
            StopReason::Remove => Event::Remove,
            StopReason::Ttl => Event::Ttl,
            StopReason::Shutdown => Event::Shutdown,
        };
        let before = self.state();
        self.handle_event(ctx, event);
        if before != VmState::Stopping && self.state() == VmState::Stopping {
            self.report(EventKind::Stopping {
                reason: msg.reason.as_str(),
            });
        }
        Box::pin(async move { rx.await.unwrap_or(Ok(())) })
    }
}

impl Handler<ChildExited> for CvmActor {
    type Result = ();

    fn handle(&mut self, msg: ChildExited, ctx: &mut Self::Context) {
        // A re-adopted process may be reported twice (pidfd, then reaper).
        if exit_of(&self.exit.borrow(), msg.pid).is_some() {
            return;
        }
        self.exit.send_modify(|book| {
            if book.len() >= EXIT_BOOK_LEN {
                book.remove(0);
            }
            book.push((msg.pid, msg.status));
        });
        if self.swtpm.as_ref().is_some_and(|h| h.pid == msg.pid)
            && self.life.phase() == Phase::Running
        {
            warn!(vm = %self.id, pid = msg.pid, status = %msg.status, "the VM's swtpm exited; its TPM no longer answers");
        }
        let ours = self.process.as_ref().is_some_and(|p| p.pid == msg.pid);
        // While a launch is in progress, the launch job sees the exit itself.
        let launched = matches!(
            self.life.phase(),
            Phase::Running | Phase::Stopping(_) | Phase::Unkillable
        );
        if ours && launched {
            let kind = self.exit_kind(msg.status);
            ctx.notify(Exited {
                status: msg.status,
                kind,
            });
        }
    }
}

impl Handler<QmpEvent> for CvmActor {
    type Result = ();

    fn handle(&mut self, msg: QmpEvent, ctx: &mut Self::Context) {
        match msg.event.as_str() {
            "GUEST_PANICKED" => {
                warn!(vm = %self.id, data = %msg.data, "guest panicked; killing QEMU so supervision restarts it");
                self.shutdown_reason = Some("guest-panic".into());
                self.handle_event(ctx, Event::GuestPanicked);
            }
            "SHUTDOWN" => {
                let reason = msg.data["reason"].as_str().unwrap_or("unknown").to_string();
                info!(vm = %self.id, %reason, "QEMU reports shutdown");
                self.shutdown_reason = Some(reason);
            }
            other => debug!(vm = %self.id, event = other, data = %msg.data, "QMP event"),
        }
    }
}
