//! Starting QEMU for a VM: the first boot (files, port, command line) and
//! each later launch of the same command. A launch succeeds only when the
//! process lives, QMP answers with a running VM and the forwarded port is
//! bound; when it fails, no process is left behind.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use actix::prelude::*;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};

use cocos_core::attestation::document::{AttestationState, DocumentInputs};
use cocos_core::config::Config;
use cocos_core::guest::ValidatedCreate;
use cocos_core::qemu::{command_line, shell_quote, LaunchSpec, VmPaths};
use cocos_core::record::LaunchFacts;
use nix::sys::signal::Signal;
use tokio::sync::watch;
use tracing::{debug, error, info, info_span, warn, Instrument, Span};

use super::files::{self, VmUser};
use super::qmp::{Qmp, QmpEvent};
use super::Services;
use crate::attest::attestation_state;
use crate::error::ApiError;
use crate::ports::{Release, Reserve};
use crate::process::{pidfd_signal, ExitStatus, Identity};
use crate::reaper::{ChildExited, Spawn, SpawnAs};
use crate::telemetry::{record_error, SPAN_TARGET};

/// How many ports a first boot tries when QEMU reports the forwarded port
/// taken (another process bound it after our probe).
const PORT_TRIES: usize = 3;

/// The `-tpmdev` value of a VM with a software TPM (see `cocos_core::qemu`).
const QEMU_TPMDEV: &str = "emulator,id=tpm0,chardev=chrtpm";

/// The last exits of a VM's processes (QEMU, its swtpm, helper tools),
/// newest last; a few suffice, since each is looked for right after it.
pub type ExitBook = Vec<(i32, ExitStatus)>;
pub const EXIT_BOOK_LEN: usize = 16;
pub type ExitWatch = watch::Receiver<ExitBook>;

pub fn exit_of(book: &ExitBook, pid: i32) -> Option<ExitStatus> {
    book.iter().rev().find(|(p, _)| *p == pid).map(|(_, s)| *s)
}

/// Waits until the process `pid` has ended, at most `limit`.
pub async fn wait_exit(
    exit: &mut ExitWatch,
    pid: i32,
    limit: Option<Duration>,
) -> Option<ExitStatus> {
    let wait = exit.wait_for(|book| exit_of(book, pid).is_some());
    let result = match limit {
        Some(limit) => tokio::time::timeout(limit, wait).await.ok()?,
        None => wait.await,
    };
    result.ok().and_then(|book| exit_of(&book, pid))
}

/// Ends a helper process (the VM's swtpm): SIGTERM, then SIGKILL after
/// `grace`; returns once it has exited, or after a bounded wait.
pub async fn end_process(exit: &mut ExitWatch, helper: &Helper, grace: Duration) {
    if wait_exit(exit, helper.pid, Some(Duration::ZERO))
        .await
        .is_some()
    {
        return;
    }
    for (signal, limit) in [(Signal::SIGTERM, grace), (Signal::SIGKILL, grace)] {
        if let Err(e) = pidfd_signal(&helper.pidfd, signal) {
            debug!(pid = helper.pid, error = %e, "cannot signal helper (gone already?)");
        }
        if wait_exit(exit, helper.pid, Some(limit)).await.is_some() {
            return;
        }
    }
    error!(
        pid = helper.pid,
        "helper process did not exit after SIGKILL"
    );
}

/// A process a VM needs besides QEMU (its swtpm).
#[derive(Clone)]
pub struct Helper {
    pub pid: i32,
    pub pidfd: Arc<OwnedFd>,
    pub identity: Identity,
}

pub struct Launched {
    pub port: u16,
    pub argv: Vec<String>,
    pub pid: i32,
    pub pidfd: Arc<OwnedFd>,
    pub identity: Identity,
    pub qmp: Option<Qmp>,
    pub swtpm: Option<Helper>,
}

/// A first boot's result: the launch and the attestation state it was
/// measured for.
pub struct FirstBoot {
    pub launched: Launched,
    pub attestation: AttestationState,
    /// What the command was made from, for the VM's record.
    pub launch: LaunchFacts,
}

pub struct LaunchError {
    pub error: ApiError,
    retry_on_other_port: bool,
}

impl LaunchError {
    fn fatal(error: ApiError) -> LaunchError {
        LaunchError {
            error,
            retry_on_other_port: false,
        }
    }
}

pub struct Launcher {
    pub id: String,
    pub config: Arc<Config>,
    pub doc_inputs: Arc<DocumentInputs>,
    pub paths: VmPaths,
    pub services: Services,
    pub notify: Recipient<ChildExited>,
    pub events: Recipient<QmpEvent>,
    pub exit: ExitWatch,
}

enum Readiness {
    Exited(ExitStatus),
    Failed(String),
}

impl Launcher {
    /// Measures the launch, makes the VM's files, reserves a port and
    /// launches. On error the port is released; the caller removes the files.
    /// Its steps are spans below `vm.boot`, a child of `parent` (the
    /// create's request).
    pub async fn first_boot(
        self,
        create: ValidatedCreate,
        parent: Span,
    ) -> Result<FirstBoot, ApiError> {
        let span = info_span!(
            target: SPAN_TARGET,
            parent: &parent,
            "vm.boot",
            vm = %self.id,
            port = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            otel.status_description = tracing::field::Empty,
        );
        let result = self.boot_steps(create).instrument(span.clone()).await;
        match &result {
            Ok(first) => {
                // Integers as i64: OpenTelemetry has no unsigned ones.
                span.record("port", i64::from(first.launched.port));
            }
            Err(e) => record_error(&span, e),
        }
        result
    }

    async fn boot_steps(mut self, create: ValidatedCreate) -> Result<FirstBoot, ApiError> {
        // Before anything is made: a launch we cannot attest is refused, and
        // so is one whose QEMU user does not exist.
        let attestation = self
            .attestation(&create)
            .instrument(step_span("vm.attestation", &self.id))
            .await?;
        let plan = crate::process::qemu_drop_plan(&self.config)
            .map_err(|e| ApiError::FailedPrecondition(e.to_string()))?;
        // File work runs off the actor thread.
        let (config, paths, id, request) = (
            self.config.clone(),
            self.paths.clone(),
            self.id.clone(),
            create.clone(),
        );
        let files_span = step_span("vm.files", &self.id);
        let prepared = tokio::task::spawn_blocking(move || {
            files::prepare(&config, &paths, &id, &request, plan.as_ref())
        })
        .instrument(files_span.clone())
        .await
        .map_err(|e| ApiError::Internal(format!("file preparation did not finish: {e}")))
        .and_then(|made| made.map_err(|e| e.to_api("cannot prepare the VM's files")));
        failed_step(&files_span, prepared)?;
        if self.config.qemu_enable_disk {
            let span = step_span("vm.disk", &self.id);
            let made = self.prepare_disk().instrument(span.clone()).await;
            failed_step(&span, made)?;
        }
        if attestation.vtpm {
            let span = step_span("vm.tpm_setup", &self.id);
            let made = self.prepare_tpm().instrument(span.clone()).await;
            failed_step(&span, made)?;
        }
        let mut port = self.reserve_port().await?;
        let mut tries = 1;
        loop {
            let spec = LaunchSpec {
                id: &self.id,
                port,
                paths: &self.paths,
                aa_kbs_params: &create.aa_kbs_params,
                host_data: attestation.host_data.as_deref(),
            };
            let argv = command_line(&self.config, &spec);
            let error = match self.launch(argv, port).await {
                Ok(launched) => {
                    let launch = LaunchFacts::new(
                        &self.config,
                        &create.aa_kbs_params,
                        attestation.host_data.as_deref(),
                    );
                    return Ok(FirstBoot {
                        launched,
                        attestation,
                        launch,
                    });
                }
                Err(e) if e.retry_on_other_port && tries < PORT_TRIES => e.error,
                Err(e) => {
                    self.services.ports.do_send(Release(port));
                    return Err(e.error);
                }
            };
            warn!(vm = %self.id, port, "forwarded port was taken by another process; trying another");
            // The taken port stays reserved until the next one is, so the
            // pool cannot hand it straight back.
            let next = self.reserve_port().await;
            self.services.ports.do_send(Release(port));
            port = next.map_err(|_| error)?;
            tries += 1;
        }
    }

    /// The VM's attestation state, computed before anything is made.
    async fn attestation(&self, create: &ValidatedCreate) -> Result<AttestationState, ApiError> {
        attestation_state(
            &self.config,
            &self.doc_inputs,
            &self.services.measurer,
            create,
            &self.id,
        )
        .await
    }

    /// The VM's TPM state with its endorsement key, made once; restarts of
    /// the VM keep it, so the key stays the same.
    async fn prepare_tpm(&mut self) -> Result<(), ApiError> {
        let user = self.user()?;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&self.paths.tpm_dir)
            .and_then(|()| {
                // swtpm_setup and swtpm write it as QEMU's user.
                files::own_dir(
                    &self.paths.tpm_dir,
                    cocos_core::privilege::Item::TpmDir,
                    user.as_ref(),
                )
            })
            .map_err(|e| {
                files::storage_error(
                    &format!("cannot create {}", self.paths.tpm_dir.display()),
                    &e,
                )
            })?;
        let setup = self
            .config
            .swtpm_setup_bin_path
            .to_string_lossy()
            .into_owned();
        let dir = self.paths.tpm_dir.to_string_lossy().into_owned();
        self.run_tool(
            &[
                &setup,
                "--tpm2",
                "--tpmstate",
                &dir,
                "--createek",
                "--not-overwrite",
            ],
            Vec::new(),
        )
        .await
    }

    /// Who the VM's processes run as (`None`: as the manager).
    fn user(&self) -> Result<Option<VmUser>, ApiError> {
        files::vm_user(&self.config, &self.paths)
    }

    /// Starts the VM's swtpm and waits for its control socket, at most
    /// `MANAGER_START_TIMEOUT`. On failure nothing is left running.
    async fn start_swtpm(&mut self, user: Option<&VmUser>) -> Result<Helper, ApiError> {
        let socket = &self.paths.swtpm_socket;
        let _ = std::fs::remove_file(socket);
        let argv = vec![
            self.config.swtpm_bin_path.to_string_lossy().into_owned(),
            "socket".into(),
            "--tpm2".into(),
            "--tpmstate".into(),
            format!("dir={}", self.paths.tpm_dir.to_string_lossy()),
            "--ctrl".into(),
            format!("type=unixio,path={}", socket.to_string_lossy()),
            "--log".into(),
            format!("file={}", self.paths.swtpm_log.to_string_lossy()),
            // Ends with its QEMU: it goes when QEMU closes the connection.
            "--terminate".into(),
        ];
        let output = self.open_qemu_log()?;
        let spawned = self
            .services
            .reaper
            .send(SpawnAs {
                spawn: Spawn {
                    argv: argv.clone(),
                    output,
                    notify: self.notify.clone(),
                },
                user: user.map(|u| u.plan.clone()),
                fds: Vec::new(),
            })
            .await?
            .map_err(|e| ApiError::StartFailed(format!("cannot start {}: {e}", argv[0])))?;
        let pid = spawned.pid;
        let pidfd = Arc::new(spawned.pidfd);
        let identity = spawned.identity;
        let deadline = tokio::time::Instant::now() + self.config.start_timeout;
        let mut delay = Duration::from_millis(1);
        // Into the VM's cgroup at once (README: Per-VM cgroups).
        let attached = crate::cgroups::attach(&self.id, pid);
        let failure = loop {
            if let Err(e) = &attached {
                break e.clone();
            }
            if let Some(status) = wait_exit(&mut self.exit, pid, Some(Duration::ZERO)).await {
                let line = files::last_error_line(&self.paths.qemu_log).unwrap_or_default();
                break format!("swtpm exited at start ({status}): {line}");
            }
            if std::os::unix::net::UnixStream::connect(socket).is_ok() {
                // The connection we just closed does not end it: --terminate
                // acts only after a client has initialised the TPM.
                match identity {
                    Some(identity) => {
                        return Ok(Helper {
                            pid,
                            pidfd,
                            identity,
                        })
                    }
                    None => break "swtpm vanished from /proc while starting".to_string(),
                }
            }
            if tokio::time::Instant::now() >= deadline {
                break format!(
                    "swtpm did not open its socket within {:?}",
                    self.config.start_timeout
                );
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(50));
        };
        let helper = Helper {
            pid,
            pidfd,
            identity: identity.unwrap_or_default(),
        };
        end_process(&mut self.exit, &helper, Duration::from_secs(5)).await;
        Err(ApiError::StartFailed(failure))
    }

    /// The VM's own writable disk: a copy of the source image, grown by
    /// 1 GiB, in its own folder under MANAGER_DISK_DIR (persistent storage),
    /// linked from the VM folder; it goes with the VM. qemu-img runs as
    /// QEMU's user and gets the source image as an open descriptor (the
    /// operator's file need not be readable by that user).
    async fn prepare_disk(&mut self) -> Result<(), ApiError> {
        let user = self.user()?;
        let image = files::prepare_disk(&self.config, &self.paths, &self.id, user.as_ref())
            .map_err(|e| e.to_api("cannot prepare the VM's disk"))?;
        let format = self.config.qemu_disk_format.to_string();
        let source = std::fs::File::open(&self.config.qemu_src_disk_file).map_err(|e| {
            files::storage_error(
                &format!(
                    "cannot open MANAGER_QEMU_SRC_DISK_FILE {}",
                    self.config.qemu_src_disk_file.display()
                ),
                &e,
            )
        })?;
        let disk = image.to_string_lossy().into_owned();
        let from = format!("/dev/fd/{}", crate::reaper::FIRST_PASSED_FD);
        let convert = ["qemu-img", "convert", "-O", &format, &from, &disk];
        self.run_tool(&convert, vec![source.into()]).await?;
        self.run_tool(
            &["qemu-img", "resize", "-f", &format, &disk, "+1G"],
            Vec::new(),
        )
        .await
    }

    /// QEMU's and the helper tools' output, appended to the VM's QEMU log.
    fn open_qemu_log(&self) -> Result<std::fs::File, ApiError> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            // The manager's own file: never through a link.
            .custom_flags(libc::O_NOFOLLOW)
            .open(&self.paths.qemu_log)
            .map_err(|e| {
                files::storage_error(
                    &format!("cannot open {}", self.paths.qemu_log.display()),
                    &e,
                )
            })
    }

    /// Runs a helper program through the reaper, as QEMU's user, and waits
    /// for it; its output goes to the VM's QEMU log. `fds` are its
    /// descriptors 3, 4, ….
    async fn run_tool(&mut self, argv: &[&str], fds: Vec<OwnedFd>) -> Result<(), ApiError> {
        let user = self.user()?;
        let output = self.open_qemu_log()?;
        let spawned = self
            .services
            .reaper
            .send(SpawnAs {
                spawn: Spawn {
                    argv: argv.iter().map(|a| a.to_string()).collect(),
                    output,
                    notify: self.notify.clone(),
                },
                user: user.map(|u| u.plan),
                fds,
            })
            .await?
            .map_err(|e| ApiError::StartFailed(format!("cannot run {}: {e}", argv.join(" "))))?;
        let limit = Duration::from_secs(600);
        match wait_exit(&mut self.exit, spawned.pid, Some(limit)).await {
            Some(ExitStatus::Exited(0)) => Ok(()),
            Some(status) => {
                let line = files::last_error_line(&self.paths.qemu_log).unwrap_or_default();
                Err(ApiError::StartFailed(format!(
                    "{} failed ({status}): {line}",
                    argv.join(" ")
                )))
            }
            None => {
                let _ = pidfd_signal(&spawned.pidfd, Signal::SIGKILL);
                let limit = self.config.stop_kill_timeout;
                if wait_exit(&mut self.exit, spawned.pid, Some(limit))
                    .await
                    .is_none()
                {
                    error!(vm = %self.id, pid = spawned.pid, "helper did not exit after SIGKILL");
                }
                Err(ApiError::StartFailed(format!(
                    "{} took longer than {limit:?}",
                    argv.join(" ")
                )))
            }
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

    /// Starts the VM's swtpm (when it has a vTPM), then `argv`, and waits
    /// until the VM is up. On failure no process is left.
    pub async fn launch(&mut self, argv: Vec<String>, port: u16) -> Result<Launched, LaunchError> {
        let user = self.user().map_err(LaunchError::fatal)?;
        // QEMU and swtpm create their sockets in the VM folder: it is open
        // to them while they start, and closed (and swept) once they are up
        // or gone.
        if let Some(user) = &user {
            files::open_window(&self.paths, user).map_err(|e| {
                LaunchError::fatal(files::storage_error(
                    &format!("cannot open {} to QEMU", self.paths.dir.display()),
                    &e,
                ))
            })?;
        }
        let span = info_span!(
            target: SPAN_TARGET,
            "vm.launch",
            vm = %self.id,
            port = i64::from(port),
            otel.status_code = tracing::field::Empty,
            otel.status_description = tracing::field::Empty,
        );
        let result = self
            .launch_as(argv, port, user.as_ref())
            .instrument(span.clone())
            .await;
        if let Err(e) = &result {
            record_error(&span, &e.error);
        }
        if let Some(user) = &user {
            match files::close_window(&self.paths, user) {
                Ok(removed) if removed.is_empty() => {}
                Ok(removed) => {
                    warn!(vm = %self.id, ?removed, "removed what QEMU or swtpm made in the VM folder besides their sockets")
                }
                Err(e) => {
                    error!(vm = %self.id, error = %e, "cannot close the VM folder to QEMU")
                }
            }
        }
        result
    }

    async fn launch_as(
        &mut self,
        argv: Vec<String>,
        port: u16,
        user: Option<&VmUser>,
    ) -> Result<Launched, LaunchError> {
        // The VM's cgroup, made once with its limits and kept across its
        // restarts; its processes are moved in as they are spawned.
        let (config, id) = (self.config.clone(), self.id.clone());
        tokio::task::spawn_blocking(move || crate::cgroups::prepare(&config, &id))
            .await
            .map_err(|e| format!("cgroup set-up did not finish: {e}"))
            .and_then(|made| made)
            .map_err(|e| LaunchError::fatal(ApiError::StartFailed(e)))?;
        // The command decides, not today's configuration: a VM keeps the
        // devices it was created with across restarts and reloads.
        let swtpm = if argv.iter().any(|a| a == QEMU_TPMDEV) {
            let span = step_span("vm.swtpm", &self.id);
            let started = self.start_swtpm(user).instrument(span.clone()).await;
            Some(failed_step(&span, started).map_err(LaunchError::fatal)?)
        } else {
            None
        };
        let result = self.launch_qemu(argv, port, user).await;
        match result {
            Ok(mut launched) => {
                launched.swtpm = swtpm;
                Ok(launched)
            }
            Err(e) => {
                if let Some(helper) = &swtpm {
                    end_process(&mut self.exit, helper, Duration::from_secs(5)).await;
                }
                Err(e)
            }
        }
    }

    async fn launch_qemu(
        &mut self,
        argv: Vec<String>,
        port: u16,
        user: Option<&VmUser>,
    ) -> Result<Launched, LaunchError> {
        let begun = std::time::Instant::now();
        let fatal = LaunchError::fatal;
        let quoted = shell_quote(&argv);
        info!(vm = %self.id, port, command = %quoted, "starting QEMU");
        // QEMU holds its stderr open for its whole life, so its log is capped
        // at each launch: a full one is moved to qemu.log.1.
        if std::fs::metadata(&self.paths.qemu_log)
            .is_ok_and(|m| m.len() >= self.config.vm_log_max_size.0)
        {
            let mut old = self.paths.qemu_log.clone().into_os_string();
            old.push(".1");
            let _ = std::fs::rename(&self.paths.qemu_log, old);
        }
        let mut log = self.open_qemu_log().map_err(fatal)?;
        let stamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let _ = writeln!(log, "--- {stamp} starting: {quoted}");
        // A socket left by an earlier run must not be mistaken for this one.
        let _ = std::fs::remove_file(&self.paths.qmp_socket);
        let spawn_span = info_span!(
            target: SPAN_TARGET,
            "vm.spawn",
            vm = %self.id,
            pid = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            otel.status_description = tracing::field::Empty,
        );
        let spawned = self
            .services
            .reaper
            .send(SpawnAs {
                spawn: Spawn {
                    argv: argv.clone(),
                    output: log,
                    notify: self.notify.clone(),
                },
                user: user.map(|u| u.plan.clone()),
                fds: Vec::new(),
            })
            .instrument(spawn_span.clone())
            .await
            .map_err(ApiError::from)
            .and_then(|spawned| {
                spawned.map_err(|e| {
                    ApiError::StartFailed(format!(
                        "cannot start {}: {e}",
                        argv.first().map(String::as_str).unwrap_or("QEMU")
                    ))
                })
            });
        let spawned = failed_step(&spawn_span, spawned).map_err(fatal)?;
        spawn_span.record("pid", spawned.pid);
        drop(spawn_span);
        let pid = spawned.pid;
        let pidfd = Arc::new(spawned.pidfd);
        let identity = spawned.identity;
        let spawned_at = begun.elapsed();
        // Into the VM's cgroup right after the spawn, before QMP answers:
        // the rest of QEMU's start-up and the guest's memory are charged there.
        let ready_span = step_span("vm.qmp_ready", &self.id);
        let ready = match crate::cgroups::attach(&self.id, pid) {
            Ok(()) => {
                self.wait_ready(pid, port)
                    .instrument(ready_span.clone())
                    .await
            }
            Err(e) => Err(Readiness::Failed(e)),
        };
        match &ready {
            Ok(_) => {}
            Err(Readiness::Exited(status)) => {
                record_error(&ready_span, &format!("QEMU exited at start ({status})"))
            }
            Err(Readiness::Failed(reason)) => record_error(&ready_span, reason),
        }
        drop(ready_span);
        debug!(vm = %self.id, spawn = ?spawned_at, ready = ?begun.elapsed(), "launch timing");
        match (ready, identity) {
            (Ok(qmp), Some(identity)) => Ok(Launched {
                port,
                argv,
                pid,
                pidfd,
                identity,
                qmp: Some(qmp),
                swtpm: None,
            }),
            (Err(Readiness::Exited(status)), _) => {
                let line = files::last_error_line(&self.paths.qemu_log).unwrap_or_default();
                // Killed by the kernel for its cgroup's memory limit: that is the cause.
                let killed = status == ExitStatus::Signaled(Signal::SIGKILL as i32);
                let line = crate::cgroups::oom_note(&self.id, killed).unwrap_or(line);
                Err(LaunchError {
                    retry_on_other_port: line.contains("host forwarding rule"),
                    error: ApiError::StartFailed(format!(
                        "QEMU exited at start ({status}): {line}"
                    )),
                })
            }
            (ready, _) => {
                let reason = match ready {
                    Err(Readiness::Failed(reason)) => reason,
                    _ => "QEMU vanished from /proc while starting".to_string(),
                };
                // Not ours to keep: kill it and wait until it is reaped.
                if let Err(e) = pidfd_signal(&pidfd, Signal::SIGKILL) {
                    error!(vm = %self.id, pid, error = %e, "cannot kill QEMU");
                }
                let status =
                    wait_exit(&mut self.exit, pid, Some(self.config.stop_kill_timeout)).await;
                debug!(vm = %self.id, ?status, "failed QEMU reaped");
                Err(fatal(ApiError::StartFailed(reason)))
            }
        }
    }

    /// QEMU is up when its process lives, its control socket answers with a
    /// running VM, and the forwarded port is bound.
    async fn wait_ready(&mut self, pid: i32, port: u16) -> Result<Qmp, Readiness> {
        let deadline = tokio::time::Instant::now() + self.config.start_timeout;
        let mut exit = self.exit.clone();
        let exited = |status: Option<ExitStatus>| match status {
            Some(status) => Readiness::Exited(status),
            None => Readiness::Failed("lost track of QEMU".into()),
        };
        // QEMU creates its control socket within milliseconds of starting;
        // try often at first, then back off for a slow one.
        let connect = async {
            let mut tries: u32 = 0;
            loop {
                match Qmp::connect(&self.paths.qmp_socket, self.events.clone()).await {
                    Ok(qmp) => return qmp,
                    Err(e) => {
                        debug!(vm = %self.id, error = %e, "control socket not ready");
                        let delay = match tries {
                            0..=19 => Duration::from_millis(1),
                            20..=39 => Duration::from_millis(5),
                            _ => Duration::from_millis(50),
                        };
                        tries = tries.saturating_add(1);
                        tokio::time::sleep(delay).await;
                    }
                }
            }
        };
        let qmp = tokio::select! {
            qmp = connect => qmp,
            status = wait_exit(&mut exit, pid, None) => return Err(exited(status)),
            _ = tokio::time::sleep_until(deadline) => {
                return Err(Readiness::Failed(format!(
                    "QEMU did not answer on its control socket within {:?}",
                    self.config.start_timeout
                )));
            }
        };
        let status = tokio::select! {
            status = qmp.status() => status,
            status = wait_exit(&mut exit, pid, None) => return Err(exited(status)),
            _ = tokio::time::sleep_until(deadline) => {
                return Err(Readiness::Failed(format!(
                    "QEMU did not report its state within {:?}",
                    self.config.start_timeout
                )));
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
        if TcpListener::bind((self.config.forward_bind_addr(), port)).is_ok() {
            return Err(Readiness::Failed(format!(
                "QEMU is running but did not bind the forwarded port {port}"
            )));
        }
        Ok(qmp)
    }
}

/// The span of one step of a VM's launch, a child of the current one.
fn step_span(name: &'static str, vm: &str) -> Span {
    // One call site per name would be needed for a name of its own in
    // `tracing`; the OpenTelemetry name is the field instead.
    info_span!(
        target: SPAN_TARGET,
        "vm.step",
        otel.name = name,
        vm = %vm,
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
    )
}

/// `result`, recorded on the step's span when it failed.
fn failed_step<T>(span: &Span, result: Result<T, ApiError>) -> Result<T, ApiError> {
    if let Err(e) = &result {
        record_error(span, e);
    }
    result
}
