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
use cocos_core::guest::ValidatedCreate;
use cocos_core::record::{LaunchInfo, ProcessRecord, VmRecord, RECORD_VERSION};
use cocos_core::restart::{Decision, ExitKind, RestartPolicy, RestartTracker};
use nix::sys::signal::Signal;
use tokio::sync::{oneshot, watch};
use tracing::{debug, error, info, warn};

pub use self::console::RotatingLog;
use self::launch::{
    end_process, exit_of, wait_exit, ExitBook, ExitWatch, FirstBoot, Helper, Launched, Launcher,
    EXIT_BOOK_LEN,
};
use self::qmp::{Qmp, QmpEvent};
use crate::attest::Measurer;
use crate::error::ApiError;
use crate::ports::{PortAllocator, Release, ReserveExact};
use crate::process::{identify, pidfd_exited, pidfd_open, pidfd_signal, ExitStatus, Identity};
use crate::reaper::{ChildExited, ZombieReaper};
use crate::records;

/// The life of a VM, as the API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    Starting,
    Running,
    Restarting,
    Stopping,
    Stopped,
    Failed,
}

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

/// The actors a VM needs.
#[derive(Clone)]
pub struct Services {
    pub ports: Addr<PortAllocator>,
    pub reaper: Addr<ZombieReaper>,
    pub measurer: Addr<Measurer>,
    pub supervisor: Recipient<VmGone>,
}

/// Start the VM; answers when QEMU is really up, or with why it is not.
#[derive(Message)]
#[rtype(result = "Result<Booted, ApiError>")]
pub struct Boot(pub ValidatedCreate);

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
    pub reason: &'static str,
}

struct Process {
    pid: i32,
    pidfd: Arc<OwnedFd>,
    identity: Identity,
}

pub struct CvmActor {
    id: String,
    config: Arc<Config>,
    policy: RestartPolicy,
    paths: cocos_core::qemu::VmPaths,
    services: Services,
    info: LaunchInfo,
    doc_inputs: Arc<DocumentInputs>,
    attestation: Option<AttestationState>,
    state: VmState,
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
    tracker: RestartTracker,
    epoch: Instant,
    launching: bool,
    stop_waiters: Vec<oneshot::Sender<Result<(), ApiError>>>,
    stop_requested: Option<&'static str>,
    ttl_deadline: Option<SystemTime>,
    ttl_timer: Option<SpawnHandle>,
    restart_timer: Option<SpawnHandle>,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
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
        CvmActor {
            policy: config.restart(),
            id,
            config,
            paths,
            services,
            info,
            doc_inputs,
            attestation: None,
            state: VmState::Starting,
            port: None,
            argv: Vec::new(),
            process: None,
            swtpm: None,
            exit: watch::channel(Vec::new()).0,
            qmp: None,
            shutdown_reason: None,
            tracker: RestartTracker::new(),
            epoch: Instant::now(),
            launching: false,
            stop_waiters: Vec::new(),
            stop_requested: None,
            ttl_deadline: None,
            ttl_timer: None,
            restart_timer: None,
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
        actor.paths = record.paths.clone();
        actor.argv = record.argv.clone();
        actor.ttl_deadline = record
            .ttl_deadline_ms
            .map(|ms| UNIX_EPOCH + Duration::from_millis(ms));
        actor
    }

    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    fn set_state(&mut self, state: VmState) {
        if self.state != state {
            info!(vm = %self.id, from = ?self.state, to = ?state, "VM state");
            self.state = state;
        }
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

    fn save_record(&self) {
        let (Some(process), Some(port)) = (&self.process, self.port) else {
            return;
        };
        let record = VmRecord {
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
        };
        if let Err(e) = records::write(&record) {
            error!(vm = %self.id, error = %e, "cannot write the VM record; a restarted manager will not find this VM");
        }
    }

    /// Ends the VM's swtpm (QEMU is gone already), then releases
    /// everything.
    fn finish(&mut self, ctx: &mut Context<Self>, final_state: VmState, keep_listed: bool) {
        let Some(helper) = self.swtpm.take() else {
            self.release_everything(ctx, final_state, keep_listed);
            return;
        };
        let mut exit = self.exit.subscribe();
        let grace = self.config.stop_term_timeout;
        ctx.spawn(
            async move { end_process(&mut exit, &helper, grace).await }
                .into_actor(self)
                .map(move |(), act, ctx| act.release_everything(ctx, final_state, keep_listed)),
        );
    }

    /// Removes the folder and returns the port: the last step on every path,
    /// taken only once no process of this VM is left.
    fn release_everything(
        &mut self,
        ctx: &mut Context<Self>,
        final_state: VmState,
        keep_listed: bool,
    ) {
        if let Err(e) = files::remove(&self.paths) {
            error!(vm = %self.id, error = %e, "could not remove the VM's files");
        }
        if let Some(port) = self.port.take() {
            self.services.ports.do_send(Release(port));
        }
        self.qmp = None;
        self.process = None;
        for timer in [self.ttl_timer.take(), self.restart_timer.take()]
            .into_iter()
            .flatten()
        {
            ctx.cancel_future(timer);
        }
        self.set_state(final_state);
        self.services.supervisor.do_send(VmGone {
            id: self.id.clone(),
            state: final_state,
            keep_listed,
        });
        for waiter in self.stop_waiters.drain(..) {
            let _ = waiter.send(Ok(()));
        }
        ctx.stop();
    }

    fn take_launched(&mut self, ctx: &mut Context<Self>, launched: Launched) {
        self.port = Some(launched.port);
        self.argv = launched.argv;
        self.qmp = launched.qmp;
        self.swtpm = launched.swtpm;
        self.shutdown_reason = None;
        self.process = Some(Process {
            pid: launched.pid,
            pidfd: launched.pidfd,
            identity: launched.identity,
        });
        self.on_running(ctx);
    }

    /// The process is up and ours: record it, log its console, arm its TTL.
    fn on_running(&mut self, ctx: &mut Context<Self>) {
        self.launching = false;
        self.set_state(VmState::Running);
        self.tracker.started(self.now());
        self.save_record();
        match RotatingLog::open(
            &self.paths.console_log,
            self.config.vm_log_max_size.0,
            self.config.vm_log_files,
        ) {
            Ok(log) => {
                actix::spawn(console::pump(self.paths.console_socket.clone(), log));
            }
            Err(e) => warn!(vm = %self.id, error = %e, "cannot open the console log"),
        }
        if let (Some(deadline), None) = (self.ttl_deadline, &self.ttl_timer) {
            let left = deadline
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            self.ttl_timer = Some(ctx.run_later(left, |act, ctx| {
                info!(vm = %act.id, "TTL expired");
                act.ttl_timer = None;
                act.request_stop(ctx, "TTL expired");
            }));
        }
        // An exit that raced the end of the start, or a stop asked for meanwhile.
        let pid = self.process.as_ref().map(|p| p.pid);
        let exited = pid.and_then(|pid| exit_of(&self.exit.borrow(), pid));
        match exited {
            Some(status) => self.on_exit(ctx, status),
            None => {
                if let Some(reason) = self.stop_requested.take() {
                    self.begin_stop(ctx, reason);
                }
            }
        }
    }

    fn exit_kind(&self, status: ExitStatus) -> ExitKind {
        match (self.shutdown_reason.as_deref(), status) {
            (Some("guest-shutdown"), _) => ExitKind::Normal,
            (None, ExitStatus::Exited(0)) => ExitKind::Normal,
            _ => ExitKind::Abnormal,
        }
    }

    /// The VM's process ended without being asked to: restart or give up as
    /// the supervision policy says.
    fn on_exit(&mut self, ctx: &mut Context<Self>, status: ExitStatus) {
        let kind = self.exit_kind(status);
        let last_line = files::last_error_line(&self.paths.qemu_log).unwrap_or_default();
        warn!(vm = %self.id, %status, ?kind, qemu_said = %last_line, "QEMU exited on its own");
        self.after_end(ctx, kind);
    }

    fn after_end(&mut self, ctx: &mut Context<Self>, kind: ExitKind) {
        self.process = None;
        self.qmp = None;
        self.launching = false;
        if let Some(reason) = self.stop_requested.take() {
            info!(vm = %self.id, reason, "VM ended while a stop was pending");
            self.finish(ctx, VmState::Stopped, false);
            return;
        }
        match self.tracker.on_exit(&self.policy, kind, self.now()) {
            Decision::Restart { after, attempt } => {
                warn!(vm = %self.id, attempt, after = ?after, "restarting VM");
                self.set_state(VmState::Restarting);
                self.restart_timer = Some(ctx.run_later(after, |act, ctx| {
                    act.restart_timer = None;
                    act.restart(ctx);
                }));
            }
            Decision::Stop => {
                info!(vm = %self.id, policy = %self.policy.restart, "VM ended and is not restarted");
                self.finish(ctx, VmState::Stopped, false);
            }
            Decision::GiveUp { reason } => {
                error!(vm = %self.id, %reason, "VM failed: restart budget spent; its port and files are released");
                self.finish(ctx, VmState::Failed, true);
            }
        }
    }

    fn restart(&mut self, ctx: &mut Context<Self>) {
        let Some(port) = self.port else {
            self.finish(ctx, VmState::Failed, true);
            return;
        };
        self.launching = true;
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
                    info!(vm = %act.id, port = launched.port, "VM restarted");
                    act.take_launched(ctx, launched);
                }
                Err(e) => {
                    warn!(vm = %act.id, error = %e.error, "restart failed");
                    act.after_end(ctx, ExitKind::Abnormal);
                }
            }),
        );
    }

    fn request_stop(&mut self, ctx: &mut Context<Self>, reason: &'static str) {
        match self.state {
            VmState::Running => self.begin_stop(ctx, reason),
            VmState::Restarting if !self.launching => {
                info!(vm = %self.id, reason, "stopping VM while it waits to restart");
                self.finish(ctx, VmState::Stopped, false);
            }
            VmState::Starting | VmState::Restarting => {
                self.stop_requested.get_or_insert(reason);
            }
            VmState::Stopping => {}
            VmState::Stopped | VmState::Failed => {
                for waiter in self.stop_waiters.drain(..) {
                    let _ = waiter.send(Ok(()));
                }
            }
        }
    }

    fn begin_stop(&mut self, ctx: &mut Context<Self>, reason: &'static str) {
        info!(vm = %self.id, reason, "stopping VM");
        self.set_state(VmState::Stopping);
        if let Some(timer) = self.ttl_timer.take() {
            ctx.cancel_future(timer);
        }
        let Some(process) = self.process.as_ref() else {
            self.finish(ctx, VmState::Stopped, false);
            return;
        };
        let job = StopJob {
            id: self.id.clone(),
            pid: process.pid,
            pidfd: process.pidfd.clone(),
            qmp: self.qmp.clone(),
            exit: self.exit.subscribe(),
            config: self.config.clone(),
        };
        ctx.spawn(job.run().into_actor(self).map(|result, act, ctx| match result {
            Ok(status) => {
                info!(vm = %act.id, %status, "VM stopped");
                act.finish(ctx, VmState::Stopped, false);
            }
            Err((e, mut exit, pid)) => {
                error!(vm = %act.id, error = %e, "VM did not stop; its files stay until it exits");
                for waiter in act.stop_waiters.drain(..) {
                    let _ = waiter.send(Err(e.clone()));
                }
                ctx.spawn(
                    async move { wait_exit(&mut exit, pid, None).await }
                        .into_actor(act)
                        .map(|_, act, ctx| act.finish(ctx, VmState::Stopped, false)),
                );
            }
        }));
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

impl Actor for CvmActor {
    type Context = Context<Self>;

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        debug!(vm = %self.id, state = ?self.state, "VM actor stopped");
    }
}

impl Handler<Boot> for CvmActor {
    type Result = ResponseActFuture<Self, Result<Booted, ApiError>>;

    fn handle(&mut self, msg: Boot, ctx: &mut Self::Context) -> Self::Result {
        let create = msg.0;
        self.ttl_deadline = create.ttl.map(|ttl| SystemTime::now() + ttl);
        self.launching = true;
        let launcher = self.launcher(ctx);
        Box::pin(launcher.first_boot(create).into_actor(self).map(
            |result, act, ctx| match result {
                Ok(FirstBoot {
                    launched,
                    attestation,
                }) => {
                    let port = launched.port;
                    info!(vm = %act.id, port, vtpm = attestation.vtpm, "VM running");
                    act.attestation = Some(attestation.clone());
                    act.take_launched(ctx, launched);
                    Ok(Booted { port, attestation })
                }
                Err(e) => {
                    warn!(vm = %act.id, error = %e, "VM failed to start");
                    act.release_everything(ctx, VmState::Failed, false);
                    Err(e)
                }
            },
        ))
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
                act.process = Some(Process { pid, pidfd, identity });
                info!(vm = %act.id, pid, port, "re-adopted VM");
                act.on_running(ctx);
                Ok(port)
            }),
        )
    }
}

impl Handler<Stop> for CvmActor {
    type Result = ResponseFuture<Result<(), ApiError>>;

    fn handle(&mut self, msg: Stop, ctx: &mut Self::Context) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        self.stop_waiters.push(tx);
        self.request_stop(ctx, msg.reason);
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
        if self.swtpm.as_ref().is_some_and(|h| h.pid == msg.pid) && self.state == VmState::Running {
            warn!(vm = %self.id, pid = msg.pid, status = %msg.status, "the VM's swtpm exited; its TPM no longer answers");
        }
        let ours = self.process.as_ref().is_some_and(|p| p.pid == msg.pid);
        if self.state == VmState::Running && ours && !self.launching {
            self.on_exit(ctx, msg.status);
        }
        // Starting, restarting and stopping: the job in progress sees it.
    }
}

impl Handler<QmpEvent> for CvmActor {
    type Result = ();

    fn handle(&mut self, msg: QmpEvent, _ctx: &mut Self::Context) {
        match msg.event.as_str() {
            "GUEST_PANICKED" => {
                warn!(vm = %self.id, data = %msg.data, "guest panicked; killing QEMU so supervision restarts it");
                self.shutdown_reason = Some("guest-panic".into());
                if let Some(process) = &self.process {
                    if let Err(e) = pidfd_signal(&process.pidfd, Signal::SIGKILL) {
                        error!(vm = %self.id, error = %e, "cannot kill the panicked VM");
                    }
                }
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

struct StopJob {
    id: String,
    pid: i32,
    pidfd: Arc<OwnedFd>,
    qmp: Option<Qmp>,
    exit: ExitWatch,
    config: Arc<Config>,
}

impl StopJob {
    /// Asks the guest to power off, then QEMU to quit, then SIGTERM, then
    /// SIGKILL, each stage bounded. Done when the process has ended.
    async fn run(mut self) -> Result<ExitStatus, (ApiError, ExitWatch, i32)> {
        let pid = self.pid;
        if let Some(status) = wait_exit(&mut self.exit, pid, Some(Duration::ZERO)).await {
            return Ok(status);
        }
        if let Some(qmp) = &self.qmp {
            if !self.config.stop_powerdown_timeout.is_zero() {
                match qmp.execute("system_powerdown", None).await {
                    Ok(_) => {
                        if let Some(s) = wait_exit(
                            &mut self.exit,
                            pid,
                            Some(self.config.stop_powerdown_timeout),
                        )
                        .await
                        {
                            return Ok(s);
                        }
                        info!(vm = %self.id, "guest did not power off in time; asking QEMU to quit");
                    }
                    Err(e) => debug!(vm = %self.id, error = %e, "system_powerdown failed"),
                }
            }
            if let Err(e) = qmp.execute("quit", None).await {
                debug!(vm = %self.id, error = %e, "quit failed");
            }
            if let Some(s) =
                wait_exit(&mut self.exit, pid, Some(self.config.stop_quit_timeout)).await
            {
                return Ok(s);
            }
        }
        for (signal, limit) in [
            (Signal::SIGTERM, self.config.stop_term_timeout),
            (Signal::SIGKILL, self.config.stop_kill_timeout),
        ] {
            warn!(vm = %self.id, pid, signal = signal.as_str(), "sending signal to QEMU");
            if let Err(e) = pidfd_signal(&self.pidfd, signal) {
                error!(vm = %self.id, error = %e, "cannot signal QEMU");
            }
            if let Some(s) = wait_exit(&mut self.exit, pid, Some(limit)).await {
                return Ok(s);
            }
        }
        Err((
            ApiError::Internal(format!(
                "QEMU (pid {pid}) did not exit after SIGKILL; its files are removed once it does"
            )),
            self.exit,
            pid,
        ))
    }
}
