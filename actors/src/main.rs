//! `cocos-manager`: launches, watches and tears down confidential VMs with
//! QEMU on request over gRPC.
//!
//! Actors and the direction of their dependencies:
//! front (gRPC, HTTP) → `Supervisor` → `CvmActor` per VM → pure core
//! (`cocos_core`), with `PortAllocator` and `ZombieReaper` serving the VMs.

mod attest;
mod cgroups;
mod cvm;
mod error;
mod failfast;
mod front;
mod host;
mod metrics;
mod notify;
mod ports;
mod process;
mod reaper;
mod records;
mod signals;
mod spawn;
mod supervisor;
mod telemetry;
#[cfg(feature = "test-hooks")]
mod testhooks;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use actix::prelude::*;
use cocos_core::attestation::document::AttestationState;
use cocos_core::attestation::hostdata;
use cocos_core::config::TeeMode;
use cocos_core::config::{self, Config, ConfigInputs, Loaded};
use cocos_core::guest::{validate_create, ValidatedCreate};
use cocos_core::proto::CreateReq;
use cocos_core::qemu::{
    command_line, host_data as qemu_host_data, shell_quote, LaunchSpec, VmPaths,
};
use std::time::Duration;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::attest::Measurer;
use crate::ports::{PortAllocator, SetRange};
use crate::reaper::ZombieReaper;
use crate::signals::SignalPipe;
use crate::supervisor::{Ping, Readopt, Shutdown, Supervisor, UpdateConfig};
use crate::telemetry::Telemetry;

const USAGE: &str = "\
Usage: cocos-manager [--config FILE] [--print-qemu-cmd | --print-attestation-policy | --print-default-config]

  --config FILE           read settings from a TOML file (environment variables win)
  --print-qemu-cmd        print the QEMU command line the configuration gives, and exit
  --print-attestation-policy  print the attestation policy document a VM created now
                          with an empty request would get (JSON), and exit; starts nothing
  --print-default-config  print the full default configuration file, and exit
  --print-config-reference  print the settings as a Markdown table, and exit
  --help, --version

Every setting is also an environment variable (MANAGER_*); see config/cocos-manager.toml.
SIGHUP reloads the file and the environment the manager started with.";

enum Mode {
    Run,
    PrintQemuCmd,
    PrintAttestationPolicy,
    PrintDefaultConfig,
    PrintConfigReference,
}

struct Args {
    config_file: Option<PathBuf>,
    mode: Mode,
}

fn parse_args() -> Result<Option<Args>, String> {
    let mut args = Args {
        config_file: None,
        mode: Mode::Run,
    };
    let mut iter = std::env::args().skip(1);
    while let Some(arg) = iter.next() {
        match arg.as_str() {
            "--config" | "-c" => {
                let file = iter.next().ok_or("--config needs a file")?;
                args.config_file = Some(PathBuf::from(file));
            }
            s if s.starts_with("--config=") => {
                args.config_file = Some(PathBuf::from(&s["--config=".len()..]));
            }
            "--print-qemu-cmd" => args.mode = Mode::PrintQemuCmd,
            "--print-attestation-policy" => args.mode = Mode::PrintAttestationPolicy,
            "--print-default-config" => args.mode = Mode::PrintDefaultConfig,
            "--print-config-reference" => args.mode = Mode::PrintConfigReference,
            "--help" | "-h" => {
                println!("{USAGE}");
                return Ok(None);
            }
            "--version" | "-V" => {
                println!("cocos-manager {}{BUILD_NOTE}", env!("CARGO_PKG_VERSION"));
                return Ok(None);
            }
            other => return Err(format!("unknown argument {other:?}\n\n{USAGE}")),
        }
    }
    Ok(Some(args))
}

/// Said by `--version` of a build with the test hooks, which tests check
/// for (and for its absence in the normal build).
#[cfg(feature = "test-hooks")]
const BUILD_NOTE: &str = " (test hooks)";
#[cfg(not(feature = "test-hooks"))]
const BUILD_NOTE: &str = "";

/// Everything a (re)load reads: the file named at start and the environment
/// the process started with.
struct ConfigSource {
    file: Option<PathBuf>,
    env: BTreeMap<String, String>,
}

impl ConfigSource {
    fn load(&self) -> Result<Loaded, String> {
        let text = match &self.file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?,
            ),
            None => None,
        };
        let file_name = self.file.as_ref().map(|p| p.display().to_string());
        let cwd = std::env::current_dir()
            .map_err(|e| format!("cannot read the working directory: {e}"))?;
        let inputs = ConfigInputs {
            file_name: file_name.as_deref(),
            file_text: text.as_deref(),
            env: self.env.clone(),
            host: host::detect(),
            cwd,
        };
        let loaded = config::load(&inputs).map_err(|e| e.to_string())?;
        refuse_unsupported(&loaded.config)?;
        Ok(loaded)
    }
}

/// Settings the configuration accepts but this daemon cannot honour; refused
/// at start and on reload.
fn refuse_unsupported(config: &Config) -> Result<(), String> {
    if config.qemu_use_sudo {
        return Err(
            "invalid MANAGER_QEMU_USE_SUDO (file key `qemu.use_sudo`) = \"true\": not supported: \
             the manager would watch and signal `sudo` instead of QEMU, so stops, restarts and \
             re-adoption would miss the VM. Set it to false and run the manager as root (as the \
             systemd unit does); QEMU then runs as the unprivileged MANAGER_QEMU_USER"
                .into(),
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(Some(args)) => args,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cocos-manager: {e}");
            return ExitCode::from(2);
        }
    };
    match args.mode {
        Mode::PrintDefaultConfig => {
            print!("{}", config::render_default_file());
            return ExitCode::SUCCESS;
        }
        Mode::PrintConfigReference => {
            print!("{}", config::render_reference_table());
            return ExitCode::SUCCESS;
        }
        _ => {}
    }
    let source = ConfigSource {
        file: args.config_file,
        env: std::env::vars().collect(),
    };
    let loaded = match source.load() {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("cocos-manager: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Mode::PrintQemuCmd = args.mode {
        for warning in &loaded.warnings {
            eprintln!("cocos-manager: warning: {warning}");
        }
        let id = EXAMPLE_ID;
        let paths = VmPaths::new(&loaded.config, id);
        let per_vm = hostdata::for_vm(&empty_request(), id);
        let host_data = qemu_host_data(&loaded.config, &per_vm);
        let argv = command_line(
            &loaded.config,
            &LaunchSpec {
                id,
                port: loaded.config.qemu_host_fwd_agent,
                paths: &paths,
                aa_kbs_params: "",
                host_data: match loaded.config.tee_mode() {
                    TeeMode::SevSnpOvmf | TeeMode::SevSnpIgvm => host_data.as_deref(),
                    _ => None,
                },
            },
        );
        println!("{}", shell_quote(&argv));
        return ExitCode::SUCCESS;
    }
    if let Mode::PrintAttestationPolicy = args.mode {
        for warning in &loaded.warnings {
            eprintln!("cocos-manager: warning: {warning}");
        }
        let system = actix::System::new();
        return system.block_on(print_attestation_policy(loaded.config));
    }

    // Refused before anything starts, like a bad setting.
    if let Err(e) = front::tls::check_plaintext(&loaded.config) {
        eprintln!("cocos-manager: configuration error: {e}");
        return ExitCode::from(2);
    }
    // Logs and traces, before any runtime exists (see telemetry).
    let (telemetry, log_guard) = telemetry::init(&loaded.config);
    // A panic on any thread is logged and ends the process (fail-fast).
    failfast::install(log_guard);
    for warning in &loaded.warnings {
        warn!("{warning}");
    }
    let system = actix::System::new();
    let code = system.block_on(async {
        let code = run(source, loaded.config, &telemetry).await;
        // Whatever `run` returned, the actors stopping now is expected.
        failfast::disarm();
        code
    });
    drop(system);
    // The spans still queued, within a bound.
    telemetry.shutdown();
    failfast::flush_log();
    code
}

async fn run(source: ConfigSource, config: Config, telemetry: &Telemetry) -> ExitCode {
    let config = Arc::new(config);
    info!(
        version = env!("CARGO_PKG_VERSION"),
        tee = ?config.tee_mode(),
        state_dir = %config.state_dir.display(),
        ports = %config.port_range(),
        "cocos-manager starting"
    );
    if let Err(e) = std::fs::create_dir_all(config.state_dir.join("vms")) {
        error!(state_dir = %config.state_dir.display(), error = %e, "cannot create MANAGER_STATE_DIR");
        return ExitCode::FAILURE;
    }
    // Two managers on one state directory would both claim its VMs.
    let _state_lock = match lock_state_dir(&config) {
        Ok(lock) => lock,
        Err(e) => {
            error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    for problem in host::preflight(&config) {
        warn!("{problem}");
    }
    let bind = config.forward_bind_addr();
    metrics::set_agent_host(bind);
    // Its own thread: fork/exec and waitpid never run where requests are
    // served.
    let reaper =
        ZombieReaper::start_in_arbiter(&Arbiter::new().handle(), |_| ZombieReaper::default());
    // A round trip: the reaper has installed its SIGCHLD handler before any
    // path below can return.
    if let Err(e) = reaper.send(crate::reaper::WatchedCount).await {
        error!(error = %e, "the zombie reaper did not start");
        return ExitCode::FAILURE;
    }
    let ports = PortAllocator::new(config.port_range(), bind).start();
    let measurer = SyncArbiter::start(1, Measurer::default);
    // From here an essential actor that stops ends the process.
    failfast::arm();
    let doc_inputs = match attest::load_inputs(&config, &reaper).await {
        Ok(loaded) => {
            for warning in &loaded.warnings {
                warn!("{warning}");
            }
            Arc::new(loaded.inputs)
        }
        Err(e) => {
            error!("configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    // After the attestation files, so their errors are reported first.
    if let Err(e) = host::check_qemu_user(&config) {
        error!("configuration error: {e}");
        return ExitCode::from(2);
    }
    #[cfg(feature = "test-hooks")]
    let hook_measurer = measurer.clone();
    let supervisor = Supervisor::new(
        config.clone(),
        doc_inputs,
        ports.clone(),
        reaper.clone(),
        measurer,
    )
    .start();
    // A control plane that hangs without panicking: the pings (each after a
    // round trip through the supervisor's mailbox, on the runtime that also
    // serves the API) stop, and systemd's watchdog ends the process.
    if let Some(interval) = notify::watchdog_interval() {
        let supervisor = supervisor.clone();
        actix::spawn(notify::watchdog(interval, move || supervisor.send(Ping)));
    }
    #[cfg(feature = "test-hooks")]
    if let Err(e) = testhooks::install(testhooks::Targets {
        supervisor: supervisor.clone(),
        reaper: reaper.clone(),
        ports: ports.clone(),
        measurer: hook_measurer,
    }) {
        error!("{e}");
        return ExitCode::from(2);
    }
    cgroups::find_host(config.clone()).await;
    // Requests are served only once the VMs left running are ours again.
    match supervisor.send(Readopt).await {
        Ok(count) => info!(count, "VMs re-adopted"),
        Err(e) => error!(error = %e, "re-adoption failed"),
    }
    // Per-VM cgroups of VMs gone while no manager ran: removed.
    cgroups::start(config.clone()).await;

    // The gRPC front on threads of its own: decoding, encoding and the
    // per-request layers do not queue behind the actors on this thread.
    let front_runtime = match FrontRuntime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            error!(error = %e, "cannot start the gRPC front's threads");
            return ExitCode::FAILURE;
        }
    };
    let bound = front_runtime
        .handle()
        .spawn({
            let config = config.clone();
            let supervisor = supervisor.clone();
            async move { front::grpc::GrpcServer::bind(&config, supervisor).await }
        })
        .await;
    let grpc = match bound {
        Ok(Ok(server)) => server,
        Ok(Err(e)) => {
            error!("{e}");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            error!(error = %e, "binding the gRPC port did not finish");
            return ExitCode::FAILURE;
        }
    };
    let http_listener = match front::http::bind(&config).await {
        Ok(listener) => listener,
        Err(e) => {
            error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let wait_stop = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let health = grpc.health.clone();
    let grpc_tls = grpc.tls_reloader();
    let grpc_task = front_runtime.handle().spawn(grpc.serve(stop_rx.clone()));
    let http_task = tokio::spawn({
        let config = config.clone();
        let supervisor = supervisor.clone();
        let ports = ports.clone();
        let shutdown = wait_stop(stop_rx.clone());
        async move { front::http::serve(http_listener, &config, supervisor, ports, shutdown).await }
    });

    let signals = (
        SignalPipe::register(signal_hook::consts::SIGTERM),
        SignalPipe::register(signal_hook::consts::SIGINT),
        SignalPipe::register(signal_hook::consts::SIGHUP),
    );
    let (mut term, mut int, mut hup) = match signals {
        (Ok(a), Ok(b), Ok(c)) => (a, b, c),
        _ => {
            error!("cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    notify::notify("READY=1");
    let mut current = config;
    let mut grpc_task = grpc_task;
    let reason = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = hup.recv() => {
                notify::notify("RELOADING=1");
                current = reload(&source, current, telemetry, &supervisor, &ports, &reaper).await;
                // The TLS files named by the configuration in force, read again.
                grpc_tls.reload(&current);
                notify::notify("READY=1");
            }
            result = &mut grpc_task => {
                failfast::disarm();
                error!(?result, "gRPC server ended");
                let _ = stop_tx.send(true);
                supervisor.send(Shutdown { stop_vms: false }).await.ok();
                return ExitCode::FAILURE;
            }
        }
    };
    // An orderly end: actors stopping from here on is expected.
    failfast::disarm();
    info!(
        signal = reason,
        "shutting down: no new requests, finishing those in flight"
    );
    health
        .set_service_status(
            front::grpc::HEALTH_SERVICE,
            tonic_health::ServingStatus::NotServing,
        )
        .await;
    let _ = stop_tx.send(true);
    // Requests in flight finish and open streams end at once; a client that
    // does not take part in the connection's orderly close (it never reads)
    // cannot hold the manager longer than this.
    for (name, task) in [("gRPC", grpc_task), ("HTTP", http_task)] {
        let abort = task.abort_handle();
        if tokio::time::timeout(FRONT_CLOSE_GRACE, task).await.is_err() {
            warn!(
                server = name,
                grace = ?FRONT_CLOSE_GRACE,
                "connections still open after the grace period; closing them"
            );
            abort.abort();
        }
    }
    let stop_vms = current.shutdown_stop_vms;
    if let Err(e) = supervisor.send(Shutdown { stop_vms }).await {
        error!(error = %e, "supervisor unavailable at shutdown");
    }
    info!("cocos-manager stopped");
    System::current().stop();
    ExitCode::SUCCESS
}

/// Threads of the gRPC front.
const FRONT_THREADS: usize = 2;

/// The gRPC front's own runtime; shut down without blocking when dropped
/// (the daemon's main task is async, where a runtime may not block).
struct FrontRuntime(Option<tokio::runtime::Runtime>);

impl FrontRuntime {
    fn new() -> std::io::Result<FrontRuntime> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(FRONT_THREADS)
            .thread_name("grpc-front")
            .enable_all()
            .build()
            .map(|runtime| FrontRuntime(Some(runtime)))
    }

    fn handle(&self) -> tokio::runtime::Handle {
        match &self.0 {
            Some(runtime) => runtime.handle().clone(),
            // Only `drop` takes it.
            None => tokio::runtime::Handle::current(),
        }
    }
}

impl Drop for FrontRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// How long the gRPC and HTTP servers may take to close their
/// connections at shutdown.
const FRONT_CLOSE_GRACE: Duration = Duration::from_secs(10);

/// An exclusive lock on `<state_dir>/manager.lock`, held for the life of the
/// process; the kernel drops it however the process ends.
fn lock_state_dir(config: &Config) -> Result<nix::fcntl::Flock<std::fs::File>, String> {
    let path = config.state_dir.join("manager.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |(_, errno)| {
            format!(
                "another cocos-manager is using MANAGER_STATE_DIR {} ({errno})",
                config.state_dir.display()
            )
        },
    )
}

/// SIGHUP: the new configuration replaces the old only if all of it is
/// valid, the attestation files it names included.
async fn reload(
    source: &ConfigSource,
    current: Arc<Config>,
    telemetry: &Telemetry,
    supervisor: &Addr<Supervisor>,
    ports: &Addr<PortAllocator>,
    reaper: &Addr<ZombieReaper>,
) -> Arc<Config> {
    info!("SIGHUP: reloading configuration");
    let loaded = match source.load() {
        Ok(loaded) => loaded,
        Err(e) => {
            error!(error = %e, "reload refused; the previous configuration stays in force");
            return current;
        }
    };
    for warning in &loaded.warnings {
        warn!("{warning}");
    }
    let mut new = loaded.config;
    // Listening sockets and the state directory are bound at start; a new
    // value would split the VMs between two directories.
    for (name, old, value) in new.changes_from(&current) {
        if matches!(
            name,
            "MANAGER_GRPC_HOST"
                | "MANAGER_GRPC_PORT"
                | "MANAGER_HTTP_HOST"
                | "MANAGER_HTTP_PORT"
                | "MANAGER_STATE_DIR"
                | "MANAGER_LOG_FORMAT"
                | "COCOS_JAEGER_URL"
                | "COCOS_JAEGER_TRACE_RATIO"
        ) {
            warn!(setting = name, old = %old, new = %value, "this setting takes effect only after a restart");
        }
    }
    new.grpc_host.clone_from(&current.grpc_host);
    new.grpc_port = current.grpc_port;
    new.http_host.clone_from(&current.http_host);
    new.http_port = current.http_port;
    new.state_dir.clone_from(&current.state_dir);
    // The log format and the trace exporter are set up once, at start.
    new.log_format = current.log_format;
    new.jaeger_url.clone_from(&current.jaeger_url);
    new.jaeger_trace_ratio = current.jaeger_trace_ratio;
    if let Err(e) = host::check_qemu_user(&new) {
        error!(error = %e, "reload refused; the previous configuration stays in force");
        return current;
    }
    let new = Arc::new(new);
    // The files named may have changed even when their names did not.
    let doc_inputs = match attest::load_inputs(&new, reaper).await {
        Ok(loaded) => {
            for warning in &loaded.warnings {
                warn!("{warning}");
            }
            Arc::new(loaded.inputs)
        }
        Err(e) => {
            error!(error = %e, "reload refused; the previous configuration stays in force");
            return current;
        }
    };
    let changes = new.changes_from(&current);
    if changes.is_empty() {
        info!("reload: no setting changed; attestation files read again");
        supervisor.do_send(UpdateConfig(current.clone(), doc_inputs));
        return current;
    }
    for (name, old, value) in &changes {
        info!(setting = name, old = %old, new = %value, "reload: setting changed");
    }
    if let Err(e) = telemetry.set_level(new.log_level) {
        error!(error = %e, "cannot change the log level");
    }
    ports.do_send(SetRange {
        range: new.port_range(),
        bind: new.forward_bind_addr(),
    });
    metrics::set_agent_host(new.forward_bind_addr());
    supervisor.do_send(UpdateConfig(new.clone(), doc_inputs));
    new
}

/// The id `--print-*` use for the VM they describe.
const EXAMPLE_ID: &str = "00000000-0000-4000-8000-000000000000";

fn empty_request() -> ValidatedCreate {
    match validate_create(&CreateReq::default()) {
        Ok(create) => create,
        Err(e) => unreachable!("an empty request is valid: {e}"),
    }
}

/// `--print-attestation-policy`: the document a VM created now with an
/// empty request would get. Measures and reads files; starts no VM.
async fn print_attestation_policy(config: Config) -> ExitCode {
    let config = Arc::new(config);
    // Its own thread: fork/exec and waitpid never run where requests are
    // served.
    let reaper =
        ZombieReaper::start_in_arbiter(&Arbiter::new().handle(), |_| ZombieReaper::default());
    // A round trip: the reaper has installed its SIGCHLD handler before any
    // path below can return.
    if let Err(e) = reaper.send(crate::reaper::WatchedCount).await {
        error!(error = %e, "the zombie reaper did not start");
        return ExitCode::FAILURE;
    }
    let measurer = SyncArbiter::start(1, Measurer::default);
    let loaded = match attest::load_inputs(&config, &reaper).await {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("cocos-manager: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    for warning in &loaded.warnings {
        eprintln!("cocos-manager: warning: {warning}");
    }
    let state = attest::attestation_state(
        &config,
        &loaded.inputs,
        &measurer,
        &empty_request(),
        EXAMPLE_ID,
    )
    .await;
    let code = match state {
        Ok(AttestationState {
            document: Some(document),
            ..
        }) => {
            let pretty = serde_json::from_str::<serde_json::Value>(&document)
                .and_then(|v| serde_json::to_string_pretty(&v))
                .unwrap_or(document);
            println!("{pretty}");
            ExitCode::SUCCESS
        }
        Ok(state) => {
            eprintln!(
                "cocos-manager: no attestation policy: {}",
                state.unavailable.unwrap_or_default()
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("cocos-manager: {e}");
            ExitCode::FAILURE
        }
    };
    System::current().stop();
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_through_sudo_is_refused_naming_the_alternative() {
        let mut config = Config::defaults();
        assert!(refuse_unsupported(&config).is_ok());
        config.qemu_use_sudo = true;
        let Err(message) = refuse_unsupported(&config) else {
            panic!("MANAGER_QEMU_USE_SUDO=true must be refused");
        };
        assert!(message.contains("MANAGER_QEMU_USE_SUDO"), "{message}");
        assert!(message.contains("run the manager as root"), "{message}");
        assert!(message.contains("MANAGER_QEMU_USER"), "{message}");
    }
}
