//! The `CvmActor`: one per VM. It owns the VM's QEMU process (through a
//! pidfd), its folder (firmware vars copy, shares, logs), its port
//! reservation and its control connection, and it alone changes them.

mod console;
mod files;
mod qmp;

use std::fs::OpenOptions;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use actix::prelude::*;
use cocos_core::config::Config;
use cocos_core::guest::ValidatedCreate;
use cocos_core::qemu::{command_line, shell_quote, LaunchSpec, VmPaths};
use nix::sys::signal::Signal;
use tokio::sync::{oneshot, watch};
use tracing::{debug, error, info, warn};

pub use self::console::RotatingLog;
use self::qmp::{Qmp, QmpEvent};
use crate::error::ApiError;
use crate::ports::{PortAllocator, Release, Reserve};
use crate::process::{pidfd_signal, ExitStatus};
use crate::reaper::{ChildExited, Spawn, ZombieReaper};

/// How many times a start is retried on another port when QEMU reports the
/// forwarded port taken (someone bound it after our probe).
const PORT_RETRIES: usize = 3;

/// The life of a VM, as the API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    Starting,
    Running,
    Stopping,
    Stopped,
    Failed,
}

/// Told to the supervisor when a VM is gone for good, after its process was
/// reaped, its folder removed and its port released.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct VmGone {
    pub id: String,
    pub state: VmState,
}

/// The actors a VM needs.
#[derive(Clone)]
pub struct Services {
    pub ports: Addr<PortAllocator>,
    pub reaper: Addr<ZombieReaper>,
    pub supervisor: Recipient<VmGone>,
}

/// Start the VM; answers when QEMU is really up, or with why it is not.
#[derive(Message)]
#[rtype(result = "Result<Booted, ApiError>")]
pub struct Boot;

#[derive(Debug, Clone, Copy)]
pub struct Booted {
    pub port: u16,
}

/// Stop the VM in stages and remove everything it had.
#[derive(Message)]
#[rtype(result = "Result<(), ApiError>")]
pub struct Stop {
    pub reason: &'static str,
}

type ExitWatch = watch::Receiver<Option<(i32, ExitStatus)>>;

struct Process {
    pid: i32,
    pidfd: Arc<OwnedFd>,
}

pub struct CvmActor {
    id: String,
    config: Arc<Config>,
    create: ValidatedCreate,
    paths: VmPaths,
    services: Services,
    state: VmState,
    port: Option<u16>,
    process: Option<Process>,
    exit: watch::Sender<Option<(i32, ExitStatus)>>,
    qmp: Option<Qmp>,
    stop_waiters: Vec<oneshot::Sender<Result<(), ApiError>>>,
    stop_requested: Option<&'static str>,
    ttl_timer: Option<SpawnHandle>,
}

impl CvmActor {
    pub fn new(
        id: String,
        config: Arc<Config>,
        create: ValidatedCreate,
        services: Services,
    ) -> CvmActor {
        let paths = VmPaths::new(&config, &id);
        CvmActor {
            id,
            config,
            create,
            paths,
            services,
            state: VmState::Starting,
            port: None,
            process: None,
            exit: watch::channel(None).0,
            qmp: None,
            stop_waiters: Vec::new(),
            stop_requested: None,
            ttl_timer: None,
        }
    }

    fn set_state(&mut self, state: VmState) {
        if self.state != state {
            debug!(vm = %self.id, from = ?self.state, to = ?state, "state change");
            self.state = state;
        }
    }

    fn bind_addr(config: &Config) -> IpAddr {
        config
            .qemu_host_fwd_bind
            .as_str()
            .parse()
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    }

    /// Removes the folder and returns the port: the last step on every path,
    /// taken only once no process of this VM is left.
    fn release_everything(&mut self, ctx: &mut Context<Self>, final_state: VmState) {
        if let Err(e) = files::remove(&self.paths) {
            error!(vm = %self.id, error = %e, "could not remove the VM's files");
        }
        if let Some(port) = self.port.take() {
            self.services.ports.do_send(Release(port));
        }
        self.qmp = None;
        self.process = None;
        if let Some(timer) = self.ttl_timer.take() {
            ctx.cancel_future(timer);
        }
        self.set_state(final_state);
        self.services.supervisor.do_send(VmGone {
            id: self.id.clone(),
            state: final_state,
        });
        for waiter in self.stop_waiters.drain(..) {
            let _ = waiter.send(Ok(()));
        }
        ctx.stop();
    }

    fn begin_stop(&mut self, ctx: &mut Context<Self>, reason: &'static str) {
        if self.state != VmState::Running {
            return;
        }
        info!(vm = %self.id, reason, "stopping VM");
        self.set_state(VmState::Stopping);
        if let Some(timer) = self.ttl_timer.take() {
            ctx.cancel_future(timer);
        }
        let Some(process) = self.process.as_ref() else {
            self.release_everything(ctx, VmState::Stopped);
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
                act.release_everything(ctx, VmState::Stopped);
            }
            Err((e, mut exit, pid)) => {
                error!(vm = %act.id, error = %e, "VM did not stop; its files stay until it exits");
                for waiter in act.stop_waiters.drain(..) {
                    let _ = waiter.send(Err(e.clone()));
                }
                // Files and port are released only once the process is gone.
                ctx.spawn(
                    async move { wait_exit(&mut exit, pid, None).await }
                        .into_actor(act)
                        .map(|_, act, ctx| act.release_everything(ctx, VmState::Stopped)),
                );
            }
        }));
    }

    fn on_running(&mut self, ctx: &mut Context<Self>) {
        let console_log = RotatingLog::open(
            &self.paths.console_log,
            self.config.vm_log_max_size.0,
            self.config.vm_log_files,
        );
        match console_log {
            Ok(log) => {
                actix::spawn(console::pump(self.paths.console_socket.clone(), log));
            }
            Err(e) => warn!(vm = %self.id, error = %e, "cannot open the console log"),
        }
        if let Some(ttl) = self.create.ttl {
            self.ttl_timer = Some(ctx.run_later(ttl, |act, ctx| {
                info!(vm = %act.id, "TTL expired");
                act.ttl_timer = None;
                act.begin_stop(ctx, "TTL expired");
            }));
        }
        // A stop asked for while the VM was starting, or an exit that raced
        // the end of the start.
        let exited = matches!(*self.exit.borrow(), Some((pid, _)) if Some(pid) == self.process.as_ref().map(|p| p.pid));
        if exited {
            let status = self.exit.borrow().map(|(_, s)| s);
            if let Some(status) = status {
                self.on_unexpected_exit(ctx, status);
            }
        } else if let Some(reason) = self.stop_requested.take() {
            self.begin_stop(ctx, reason);
        }
    }

    fn on_unexpected_exit(&mut self, ctx: &mut Context<Self>, status: ExitStatus) {
        let last_line = files::last_error_line(&self.paths.qemu_log).unwrap_or_default();
        if status.success() {
            info!(vm = %self.id, %status, "QEMU exited on its own (guest powered off)");
        } else {
            warn!(vm = %self.id, %status, qemu_said = %last_line, "QEMU exited on its own");
        }
        let state = if status.success() {
            VmState::Stopped
        } else {
            VmState::Failed
        };
        self.release_everything(ctx, state);
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

    fn handle(&mut self, _: Boot, ctx: &mut Self::Context) -> Self::Result {
        let job = BootJob {
            id: self.id.clone(),
            config: self.config.clone(),
            create: self.create.clone(),
            paths: self.paths.clone(),
            services: self.services.clone(),
            notify: ctx.address().recipient(),
            events: ctx.address().recipient(),
            exit: self.exit.subscribe(),
        };
        Box::pin(job.run().into_actor(self).map(|outcome, act, ctx| {
            act.port = outcome.port;
            act.process = outcome.process;
            act.qmp = outcome.qmp;
            match outcome.result {
                Ok(()) => {
                    let port = act.port.unwrap_or_default();
                    info!(vm = %act.id, port, "VM running");
                    act.set_state(VmState::Running);
                    act.on_running(ctx);
                    Ok(Booted { port })
                }
                Err(e) => {
                    warn!(vm = %act.id, error = %e, "VM failed to start");
                    act.release_everything(ctx, VmState::Failed);
                    Err(e)
                }
            }
        }))
    }
}

impl Handler<Stop> for CvmActor {
    type Result = ResponseFuture<Result<(), ApiError>>;

    fn handle(&mut self, msg: Stop, ctx: &mut Self::Context) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        match self.state {
            VmState::Stopped | VmState::Failed => {
                let _ = tx.send(Ok(()));
            }
            VmState::Starting => {
                self.stop_waiters.push(tx);
                self.stop_requested.get_or_insert(msg.reason);
            }
            VmState::Stopping => self.stop_waiters.push(tx),
            VmState::Running => {
                self.stop_waiters.push(tx);
                self.begin_stop(ctx, msg.reason);
            }
        }
        Box::pin(async move { rx.await.unwrap_or(Ok(())) })
    }
}

impl Handler<ChildExited> for CvmActor {
    type Result = ();

    fn handle(&mut self, msg: ChildExited, ctx: &mut Self::Context) {
        self.exit.send_replace(Some((msg.pid, msg.status)));
        let ours = self.process.as_ref().is_some_and(|p| p.pid == msg.pid);
        if self.state == VmState::Running && ours {
            self.on_unexpected_exit(ctx, msg.status);
        }
        // Starting and Stopping: the job in progress sees it through `exit`.
    }
}

impl Handler<QmpEvent> for CvmActor {
    type Result = ();

    fn handle(&mut self, msg: QmpEvent, _ctx: &mut Self::Context) {
        match msg.event.as_str() {
            "GUEST_PANICKED" => warn!(vm = %self.id, data = %msg.data, "guest panicked"),
            "SHUTDOWN" => info!(vm = %self.id, data = %msg.data, "guest shutdown"),
            other => debug!(vm = %self.id, event = other, data = %msg.data, "QMP event"),
        }
    }
}

/// Waits until the process `pid` has been reaped, at most `limit`.
async fn wait_exit(exit: &mut ExitWatch, pid: i32, limit: Option<Duration>) -> Option<ExitStatus> {
    let wait = exit.wait_for(|v| matches!(v, Some((p, _)) if *p == pid));
    let result = match limit {
        Some(limit) => tokio::time::timeout(limit, wait).await.ok()?,
        None => wait.await,
    };
    result.ok().and_then(|v| v.map(|(_, status)| status))
}

struct BootOutcome {
    port: Option<u16>,
    process: Option<Process>,
    qmp: Option<Qmp>,
    result: Result<(), ApiError>,
}

struct BootJob {
    id: String,
    config: Arc<Config>,
    create: ValidatedCreate,
    paths: VmPaths,
    services: Services,
    notify: Recipient<ChildExited>,
    events: Recipient<QmpEvent>,
    exit: ExitWatch,
}

/// Why one start attempt failed, and whether another port may help.
struct AttemptError {
    error: ApiError,
    retry_on_other_port: bool,
}

impl BootJob {
    async fn run(mut self) -> BootOutcome {
        let mut outcome = BootOutcome {
            port: None,
            process: None,
            qmp: None,
            result: Ok(()),
        };
        if let Err(e) = files::prepare(&self.config, &self.paths, &self.id, &self.create) {
            outcome.result = Err(ApiError::Internal(format!(
                "cannot prepare the VM's files: {e}"
            )));
            return outcome;
        }
        let mut port = match self.reserve_port().await {
            Ok(port) => port,
            Err(e) => {
                outcome.result = Err(e);
                return outcome;
            }
        };
        let mut attempt = 1;
        loop {
            outcome.port = Some(port);
            let error = match self.attempt(port, &mut outcome).await {
                Ok(()) => return outcome,
                Err(e) if e.retry_on_other_port && attempt < PORT_RETRIES => e.error,
                Err(e) => {
                    outcome.result = Err(e.error);
                    return outcome;
                }
            };
            warn!(vm = %self.id, port, "forwarded port was taken by another process; trying another");
            // The taken port stays reserved until the next one is, so the
            // pool cannot hand it straight back.
            let next = self.reserve_port().await;
            self.services.ports.do_send(Release(port));
            outcome.port = None;
            match next {
                Ok(next) => port = next,
                Err(_) => {
                    outcome.result = Err(error);
                    return outcome;
                }
            }
            attempt += 1;
        }
    }

    async fn reserve_port(&self) -> Result<u16, ApiError> {
        self.services.ports.send(Reserve).await?.ok_or_else(|| {
            ApiError::ResourceExhausted(format!(
                "no free host port in MANAGER_QEMU_HOST_FWD_RANGE ({})",
                self.config.port_range()
            ))
        })
    }

    /// One try at starting QEMU on `port`. On failure no process is left.
    async fn attempt(&mut self, port: u16, outcome: &mut BootOutcome) -> Result<(), AttemptError> {
        let fail = |error: ApiError| AttemptError {
            error,
            retry_on_other_port: false,
        };
        let spec = LaunchSpec {
            id: &self.id,
            port,
            paths: &self.paths,
            aa_kbs_params: &self.create.aa_kbs_params,
        };
        let argv = command_line(&self.config, &spec);
        let quoted = shell_quote(&argv);
        info!(vm = %self.id, port, command = %quoted, "starting QEMU");
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.paths.qemu_log)
            .map_err(|e| {
                fail(ApiError::Internal(format!(
                    "cannot open {}: {e}",
                    self.paths.qemu_log.display()
                )))
            })?;
        let stamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let _ = writeln!(log, "--- {stamp} starting: {quoted}");
        // A socket left by an earlier attempt must not be mistaken for this one.
        let _ = std::fs::remove_file(&self.paths.qmp_socket);
        let spawned = self
            .services
            .reaper
            .send(Spawn {
                argv,
                output: log,
                notify: self.notify.clone(),
            })
            .await
            .map_err(|e| fail(e.into()))?
            .map_err(|e| {
                fail(ApiError::StartFailed(format!(
                    "cannot start {}: {e}",
                    self.config.qemu_bin_path.display()
                )))
            })?;
        let pid = spawned.pid;
        let pidfd = Arc::new(spawned.pidfd);
        outcome.process = Some(Process {
            pid,
            pidfd: pidfd.clone(),
        });

        let ready = self.wait_ready(pid, port).await;
        match ready {
            Ok(qmp) => {
                outcome.qmp = Some(qmp);
                Ok(())
            }
            Err(Readiness::Exited(status)) => {
                outcome.process = None;
                let line = files::last_error_line(&self.paths.qemu_log).unwrap_or_default();
                let retry = line.contains("host forwarding rule");
                Err(AttemptError {
                    error: ApiError::StartFailed(format!(
                        "QEMU exited at start ({status}): {line}"
                    )),
                    retry_on_other_port: retry,
                })
            }
            Err(Readiness::Failed(reason)) => {
                // Not ours to keep: kill it and wait until it is reaped.
                if let Err(e) = pidfd_signal(&pidfd, Signal::SIGKILL) {
                    error!(vm = %self.id, pid, error = %e, "cannot kill QEMU");
                }
                let status = wait_exit(&mut self.exit, pid, None).await;
                debug!(vm = %self.id, ?status, "failed QEMU reaped");
                outcome.process = None;
                Err(fail(ApiError::StartFailed(reason)))
            }
        }
    }

    /// QEMU is up when its process lives, its control socket answers with a
    /// running VM, and the forwarded port is bound.
    async fn wait_ready(&mut self, pid: i32, port: u16) -> Result<Qmp, Readiness> {
        let deadline = tokio::time::Instant::now() + self.config.start_timeout;
        let mut exit = self.exit.clone();
        let connect = async {
            let mut delay = Duration::from_millis(2);
            loop {
                match Qmp::connect(&self.paths.qmp_socket, self.events.clone()).await {
                    Ok(qmp) => return qmp,
                    Err(e) => {
                        debug!(vm = %self.id, error = %e, "control socket not ready");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_millis(50));
                    }
                }
            }
        };
        let qmp = tokio::select! {
            qmp = connect => qmp,
            status = wait_exit(&mut exit, pid, None) => {
                return Err(match status {
                    Some(status) => Readiness::Exited(status),
                    None => Readiness::Failed("lost track of QEMU".into()),
                });
            }
            _ = tokio::time::sleep_until(deadline) => {
                return Err(Readiness::Failed(format!(
                    "QEMU did not answer on its control socket within {:?}",
                    self.config.start_timeout
                )));
            }
        };
        let status = tokio::select! {
            status = qmp.status() => status,
            status = wait_exit(&mut exit, pid, None) => {
                return Err(match status {
                    Some(status) => Readiness::Exited(status),
                    None => Readiness::Failed("lost track of QEMU".into()),
                });
            }
        };
        match status {
            Ok(s) if s == "running" => {}
            Ok(s) => {
                return Err(Readiness::Failed(format!(
                    "QEMU reports the VM {s}, not running"
                )))
            }
            Err(e) => return Err(Readiness::Failed(format!("QEMU control socket: {e}"))),
        }
        if TcpListener::bind((CvmActor::bind_addr(&self.config), port)).is_ok() {
            return Err(Readiness::Failed(format!(
                "QEMU is running but did not bind the forwarded port {port}"
            )));
        }
        Ok(qmp)
    }
}

enum Readiness {
    Exited(ExitStatus),
    Failed(String),
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
    /// SIGKILL, each stage bounded. Done when the process has been reaped.
    async fn run(mut self) -> Result<ExitStatus, (ApiError, ExitWatch, i32)> {
        let pid = self.pid;
        if let Some(status) = wait_exit(&mut self.exit, pid, Some(Duration::ZERO)).await {
            return Ok(status);
        }
        if let Some(qmp) = &self.qmp {
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
