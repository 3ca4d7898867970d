//! `latency`: how fast the control plane answers while it is busy. A prober
//! on its own connection asks `CVMInfo` of an existing VM at a fixed pace,
//! one request at a time. Its latencies on the idle manager (the baseline)
//! are compared with those on the same manager while
//!
//! (a) C clients create and remove VMs as fast as they can, and
//! (b) one guest writes its serial console as fast as it can
//!     (`STAND_IN_CONSOLE_SPAM`).
//!
//! Idle and loaded windows alternate over R rounds, so that whatever else
//! the machine does hits both alike; the samples of each kind are pooled.
//! Each scenario has its own manager, started by this run, so that (b)'s
//! QEMU wrapper does not slow (a)'s creates.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::time::MissedTickBehavior;

use crate::daemon::{self, Client, Daemon, DaemonSpec, Paths, Workspace};
use crate::rpc::{self, Errors};
use crate::stats::{median, ms, round3, Summary};
use crate::summary::{self, Row, Stamp};
use crate::{pool, procfs, BenchResult};

/// Before each window: the load starts (or the previous one drains) this
/// long before the prober, so that it measures the steady state.
const SETTLE: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct LatencyOpts {
    pub clients: usize,
    /// Rounds of (idle window, loaded window), per scenario.
    pub rounds: usize,
    /// Length of each probe window.
    pub window: Duration,
    /// The prober sends one request per interval (the next one at once if
    /// an answer comes later than that).
    pub probe_interval: Duration,
    /// Bytes per second the flooding guest writes to its console.
    pub console_spam: u64,
    pub qemu_bin: PathBuf,
    pub start_timeout: Duration,
    pub rpc_timeout: Duration,
    pub keep: bool,
}

/// The prober's samples in one window.
#[derive(Debug, Default, Clone)]
struct Probed {
    samples: Vec<Duration>,
    errors: Errors,
    /// The daemon's CPU time over the window, in clock ticks.
    daemon_ticks: u64,
    secs: f64,
}

/// The prober's samples of one scenario, pooled over its rounds.
#[derive(Debug, Default, Clone)]
pub struct Windows {
    pub idle: Vec<Duration>,
    pub loaded: Vec<Duration>,
    /// (b) only: CVMInfo of the flooding VM itself.
    pub flooder: Vec<Duration>,
    /// Per round: loaded p99 / idle p99.
    pub round_ratios: Vec<f64>,
    idle_ticks: u64,
    idle_secs: f64,
    loaded_ticks: u64,
    loaded_secs: f64,
}

impl Windows {
    fn add_round(&mut self, idle: &Probed, loaded: &Probed, flooder: Option<&Probed>) {
        let p99 = |v: &[Duration]| Summary::of(v).map(|s| s.p99_ms);
        if let Some(r) = summary::ratio(p99(&loaded.samples), p99(&idle.samples)) {
            self.round_ratios.push(r);
        }
        self.idle.extend(&idle.samples);
        self.loaded.extend(&loaded.samples);
        if let Some(flooder) = flooder {
            self.flooder.extend(&flooder.samples);
        }
        self.idle_ticks += idle.daemon_ticks;
        self.idle_secs += idle.secs;
        self.loaded_ticks += loaded.daemon_ticks;
        self.loaded_secs += loaded.secs;
    }

    fn idle(&self) -> Option<Summary> {
        Summary::of(&self.idle)
    }

    fn loaded(&self) -> Option<Summary> {
        Summary::of(&self.loaded)
    }

    fn flooder(&self) -> Option<Summary> {
        Summary::of(&self.flooder)
    }

    fn cpu_pct(ticks: u64, secs: f64) -> Option<f64> {
        (secs > 0.0).then(|| ticks as f64 / procfs::clock_ticks_per_sec() as f64 / secs * 100.0)
    }

    fn idle_cpu_pct(&self) -> Option<f64> {
        Self::cpu_pct(self.idle_ticks, self.idle_secs)
    }

    fn loaded_cpu_pct(&self) -> Option<f64> {
        Self::cpu_pct(self.loaded_ticks, self.loaded_secs)
    }

    fn p99_ratio(&self) -> Option<f64> {
        p99_ratio(self.loaded(), self.idle())
    }

    fn p50_ratio(&self) -> Option<f64> {
        summary::ratio(
            self.loaded().map(|s| s.p50_ms),
            self.idle().map(|s| s.p50_ms),
        )
    }

    /// `1.2–3.4` over the rounds.
    fn round_range(&self) -> String {
        let lo = self
            .round_ratios
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min);
        let hi = self
            .round_ratios
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        if lo.is_finite() && hi.is_finite() {
            format!("{lo:.2}–{hi:.2}")
        } else {
            "n/a".to_string()
        }
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "idle": Summary::json(self.idle()),
            "idle_daemon_cpu_pct": self.idle_cpu_pct().map(round3),
            "loaded": Summary::json(self.loaded()),
            "loaded_daemon_cpu_pct": self.loaded_cpu_pct().map(round3),
            "p99_ratio": self.p99_ratio().map(round3),
            "p50_ratio": self.p50_ratio().map(round3),
            "round_p99_ratios": self.round_ratios.iter().copied().map(round3).collect::<Vec<_>>(),
            "round_p99_ratio_median": median(&self.round_ratios).map(round3),
        })
    }
}

/// (a): CreateVm + RemoveVm in a loop.
#[derive(Debug, Default, Clone)]
pub struct CreateLoad {
    pub windows: Windows,
    pub create: Vec<Duration>,
    pub remove: Vec<Duration>,
    /// Time the load ran, summed over the rounds.
    pub load_secs: f64,
}

impl CreateLoad {
    fn creates_per_sec(&self) -> Option<f64> {
        (self.load_secs > 0.0).then(|| self.create.len() as f64 / self.load_secs)
    }
}

/// (b): one guest floods its console.
#[derive(Debug, Default, Clone)]
pub struct ConsoleLoad {
    pub windows: Windows,
    /// What the daemon wrote with write(2) during the loaded windows: the
    /// console log, next to which records and the rest are nothing.
    /// (Sockets are read and written with recv/send, which /proc/<pid>/io
    /// does not count.)
    pub daemon_written: Option<u64>,
    /// RemoveVm of the flooding VM, once per round.
    pub remove_flooder: Vec<Duration>,
}

impl ConsoleLoad {
    fn logged_bps(&self) -> Option<f64> {
        let secs = self.windows.loaded_secs;
        (secs > 0.0).then_some(self.daemon_written? as f64 / secs)
    }
}

#[derive(Debug)]
pub struct LatencyReport {
    pub opts: LatencyOpts,
    pub stamp: Stamp,
    pub create: Option<CreateLoad>,
    pub console: Option<ConsoleLoad>,
    pub failures: Vec<String>,
}

fn p99_ratio(loaded: Option<Summary>, idle: Option<Summary>) -> Option<f64> {
    summary::ratio(loaded.map(|s| s.p99_ms), idle.map(|s| s.p99_ms))
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.0} %"))
}

fn mb(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".to_string(), |v| format!("{:.1} MB/s", v / 1e6))
}

fn p99(s: Option<Summary>) -> String {
    s.map_or_else(|| "n/a".to_string(), |s| format!("{:.1} ms", s.p99_ms))
}

fn fmt_rate(r: Option<f64>) -> String {
    r.map_or_else(|| "n/a".to_string(), |r| format!("{r:.0}"))
}

impl LatencyReport {
    pub fn print(&self) {
        let o = &self.opts;
        println!("== cocos-manager latency benchmark (stand-in QEMU) ==");
        println!(
            "prober: CVMInfo of an existing VM every {:.0} ms, one at a time, on its own connection; \
             {} rounds of a {:.1} s idle window then a {:.1} s loaded one, on the same manager",
            ms(o.probe_interval),
            o.rounds,
            o.window.as_secs_f64(),
            o.window.as_secs_f64()
        );
        let ratios = |w: &Windows| {
            let rounds: Vec<String> = w.round_ratios.iter().map(|r| format!("{r:.2}")).collect();
            format!(
                "p99 {} (per round: {}), p50 {}",
                summary::fmt_ratio(w.p99_ratio()),
                rounds.join(", "),
                summary::fmt_ratio(w.p50_ratio())
            )
        };
        if let Some(a) = &self.create {
            let w = &a.windows;
            println!("(a) {} clients creating and removing VMs", o.clients);
            println!(
                "  idle:   CVMInfo {}; daemon CPU {}",
                Summary::line(w.idle()),
                pct(w.idle_cpu_pct())
            );
            println!(
                "  loaded: CVMInfo {}; daemon CPU {}",
                Summary::line(w.loaded()),
                pct(w.loaded_cpu_pct())
            );
            println!(
                "  load: {} creates ({}/s), {} removes; CreateVm {}; RemoveVm {}",
                a.create.len(),
                fmt_rate(a.creates_per_sec()),
                a.remove.len(),
                Summary::line(Summary::of(&a.create)),
                Summary::line(Summary::of(&a.remove))
            );
            println!("  loaded / idle: {}", ratios(w));
        }
        if let Some(b) = &self.console {
            let w = &b.windows;
            println!(
                "(b) one guest writing its serial console at {} B/s \
                 (a second prober asks the flooding VM; while idle, the quiet one)",
                o.console_spam
            );
            println!(
                "  idle:                 CVMInfo {}; daemon CPU {}",
                Summary::line(w.idle()),
                pct(w.idle_cpu_pct())
            );
            println!(
                "  loaded, quiet VM:     CVMInfo {}; daemon CPU {}",
                Summary::line(w.loaded()),
                pct(w.loaded_cpu_pct())
            );
            println!(
                "  loaded, flooding VM:  CVMInfo {}",
                Summary::line(w.flooder())
            );
            println!(
                "  console: the daemon logged {}; RemoveVm of the flooding VM {}",
                mb(b.logged_bps()),
                Summary::line(Summary::of(&b.remove_flooder))
            );
            println!(
                "  loaded / idle: {}; the flooding VM's p99 {}",
                ratios(w),
                summary::fmt_ratio(p99_ratio(w.flooder(), w.idle()))
            );
        }
        crate::stats::print_verdict(&self.failures);
        summary::print(&self.stamp, &self.rows(), &self.failures);
    }

    fn rows(&self) -> Vec<Row> {
        let o = &self.opts;
        let mut rows = Vec::new();
        if let Some(a) = &self.create {
            let w = &a.windows;
            rows.push(Row {
                figure: format!(
                    "`CVMInfo` p99 while {} clients create and remove VMs, loaded ÷ idle",
                    o.clients
                ),
                measured: format!(
                    "**{}** ({} vs {} idle, rounds {}; p50 ÷ {}; {} creates/s)",
                    summary::fmt_ratio(w.p99_ratio()),
                    p99(w.loaded()),
                    p99(w.idle()),
                    w.round_range(),
                    summary::fmt_ratio(w.p50_ratio()),
                    fmt_rate(a.creates_per_sec())
                ),
            });
        }
        if let Some(b) = &self.console {
            let w = &b.windows;
            rows.push(Row {
                figure: format!(
                    "`CVMInfo` p99 while one guest writes its console at {} MB/s, loaded ÷ idle",
                    round3(o.console_spam as f64 / 1e6)
                ),
                measured: format!(
                    "**{}** ({} vs {} idle, rounds {}; of the flooding VM itself {}; {} of console logged)",
                    summary::fmt_ratio(w.p99_ratio()),
                    p99(w.loaded()),
                    p99(w.idle()),
                    w.round_range(),
                    p99(w.flooder()),
                    mb(b.logged_bps())
                ),
            });
        }
        rows
    }

    pub fn json(&self) -> serde_json::Value {
        let o = &self.opts;
        let create = self.create.as_ref().map(|a| {
            let mut v = a.windows.json();
            v["creates"] = json!(a.create.len());
            v["removes"] = json!(a.remove.len());
            v["creates_per_s"] = json!(a.creates_per_sec().map(round3));
            v["create_latency"] = Summary::json(Summary::of(&a.create));
            v["remove_latency"] = Summary::json(Summary::of(&a.remove));
            v
        });
        let console = self.console.as_ref().map(|b| {
            let w = &b.windows;
            let mut v = w.json();
            v["loaded_flooder"] = Summary::json(w.flooder());
            v["p99_ratio_flooder"] = json!(p99_ratio(w.flooder(), w.idle()).map(round3));
            v["daemon_write_bytes_per_s"] = json!(b.logged_bps().map(round3));
            v["remove_flooder_latency"] = Summary::json(Summary::of(&b.remove_flooder));
            v
        });
        json!({
            "bench": "latency",
            "ok": self.failures.is_empty(),
            "clients": o.clients,
            "rounds": o.rounds,
            "window_s": round3(o.window.as_secs_f64()),
            "probe_interval_ms": round3(ms(o.probe_interval)),
            "console_spam_bytes_per_s": o.console_spam,
            "qemu_bin": o.qemu_bin.display().to_string(),
            "date": self.stamp.date,
            "commit": self.stamp.commit,
            "command": self.stamp.command,
            "create_load": create,
            "console_load": console,
            "failures": self.failures,
        })
    }
}

pub async fn run(opts: &LatencyOpts, paths: &Paths) -> LatencyReport {
    let mut report = LatencyReport {
        opts: opts.clone(),
        stamp: Stamp::now(&paths.repo_root),
        create: None,
        console: None,
        failures: Vec::new(),
    };
    for scenario in [Scenario::Create, Scenario::Console] {
        let ws = match Workspace::create(opts.keep) {
            Ok(ws) => ws,
            Err(e) => {
                report.failures.push(format!("aborted: {e}"));
                return report;
            }
        };
        let outcome = match scenario {
            Scenario::Create => create_scenario(opts, paths, &ws, &mut report).await,
            Scenario::Console => console_scenario(opts, paths, &ws, &mut report).await,
        };
        if let Err(e) = outcome {
            report.failures.push(format!(
                "{} scenario aborted: {}",
                scenario.name(),
                summary::shorten(&e.to_string())
            ));
            eprintln!("daemon log: {}", ws.path().join("manager.log").display());
        }
        // Dropping `ws` kills whatever VM is left and removes the workspace.
    }
    report
}

#[derive(Clone, Copy)]
enum Scenario {
    Create,
    Console,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Create => "create-load",
            Scenario::Console => "console-flood",
        }
    }
}

/// The settings both scenarios share; `ports` forwarded ports, as many VMs.
fn daemon_spec(
    paths: &Paths,
    ws: &Workspace,
    qemu_bin: &Path,
    ports: u16,
) -> BenchResult<DaemonSpec> {
    let range = daemon::free_port_range(ports)?;
    let mut spec = DaemonSpec::new(paths, ws)?;
    spec.set("MANAGER_QEMU_BIN_PATH", qemu_bin.to_string_lossy());
    // The stand-in has no TPM device: no swtpm per VM.
    spec.set("MANAGER_QEMU_VTPM", "none");
    spec.set(
        "MANAGER_QEMU_HOST_FWD_RANGE",
        format!("{}-{}", range.0, range.1),
    );
    spec.set("MANAGER_MAX_VMS", ports.to_string());
    spec.set("MANAGER_STOP_POWERDOWN_TIMEOUT", "2s");
    Ok(spec)
}

/// CVMInfo of `target`, one request at a time, one every interval, until
/// the window has passed.
async fn probe(mut client: Client, target: &str, opts: &LatencyOpts, daemon_pid: u32) -> Probed {
    let mut probed = Probed::default();
    let ticks0 = procfs::cpu_ticks(daemon_pid).ok();
    let t0 = Instant::now();
    let mut ticker = tokio::time::interval(opts.probe_interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    while t0.elapsed() < opts.window {
        ticker.tick().await;
        let sent = Instant::now();
        match rpc::info(&mut client, target, opts.rpc_timeout).await {
            Ok(()) => probed.samples.push(sent.elapsed()),
            Err(e) => probed.errors.push(e),
        }
    }
    probed.secs = t0.elapsed().as_secs_f64();
    if let (Some(a), Ok(b)) = (ticks0, procfs::cpu_ticks(daemon_pid)) {
        probed.daemon_ticks = b.saturating_sub(a);
    }
    probed
}

/// `f`, after `delay`.
async fn offset<T>(f: impl std::future::Future<Output = T>, delay: Duration) -> T {
    tokio::time::sleep(delay).await;
    f.await
}

/// RemoveVm of what is left, the leftover check and SIGTERM.
async fn finish(
    mut manager: Daemon,
    client: &mut Client,
    ids: &[&str],
    ws: &Workspace,
    rpc_timeout: Duration,
    failures: &mut Vec<String>,
) -> BenchResult<()> {
    for id in ids {
        if let Err(e) = rpc::remove(client, id, rpc_timeout).await {
            failures.push(e);
        }
    }
    let (folders, processes) = ws.wait_no_vms(Duration::from_secs(5)).await;
    if folders > 0 || processes > 0 {
        failures.push(format!(
            "left behind: {folders} VM folders, {processes} VM processes"
        ));
    }
    let status = manager.terminate(Duration::from_secs(30)).await?;
    if !status.success() {
        failures.push(format!("cocos-manager exited with {status} after SIGTERM"));
    }
    Ok(())
}

async fn create_scenario(
    opts: &LatencyOpts,
    paths: &Paths,
    ws: &Workspace,
    report: &mut LatencyReport,
) -> BenchResult<()> {
    // Room for every client's VM, the probed one, and ports a slow exit
    // still holds.
    let ports = u16::try_from(opts.clients * 2 + 8).map_err(|_| "too many clients")?;
    let spec = daemon_spec(paths, ws, &opts.qemu_bin, ports)?;
    eprintln!(
        "(a) starting cocos-manager (state {})",
        ws.state_dir().display()
    );
    let mut manager = Daemon::spawn(&spec)?;
    manager.wait_serving(opts.start_timeout).await?;
    let mut prober = daemon::connect(spec.grpc_port).await?;
    let probed_vm = rpc::create(&mut prober, opts.rpc_timeout).await?.cvm_id;
    let clients = pool::clients(spec.grpc_port, opts.clients).await?;

    let mut result = CreateLoad::default();
    let mut errors = [Errors::default(), Errors::default(), Errors::default()];
    for round in 1..=opts.rounds {
        eprintln!(
            "(a) round {round}/{}: idle, then {} clients creating and removing VMs",
            opts.rounds, opts.clients
        );
        tokio::time::sleep(SETTLE).await;
        let idle = probe(prober.clone(), &probed_vm, opts, manager.pid()).await;

        let stop = Arc::new(AtomicBool::new(false));
        let load_start = Instant::now();
        let tasks: Vec<_> = clients
            .iter()
            .map(|client| tokio::spawn(churn(client.clone(), stop.clone(), opts.rpc_timeout)))
            .collect();
        tokio::time::sleep(SETTLE).await;
        let loaded = probe(prober.clone(), &probed_vm, opts, manager.pid()).await;
        stop.store(true, Ordering::Relaxed);
        for task in tasks {
            let churned = task.await.map_err(|e| format!("client task failed: {e}"))?;
            result.create.extend(churned.create);
            result.remove.extend(churned.remove);
            errors[2].merge(churned.errors);
        }
        result.load_secs += load_start.elapsed().as_secs_f64();
        result.windows.add_round(&idle, &loaded, None);
        errors[0].merge(idle.errors);
        errors[1].merge(loaded.errors);
    }
    drop(clients);
    report.create = Some(result);
    let failures = &mut report.failures;
    for (errors, what) in errors
        .iter()
        .zip(["idle CVMInfo", "loaded CVMInfo", "load request"])
    {
        failures.extend(errors.line(what));
    }
    finish(
        manager,
        &mut prober,
        &[&probed_vm],
        ws,
        opts.rpc_timeout,
        failures,
    )
    .await
}

/// What one load client did.
#[derive(Debug, Default)]
struct Churned {
    create: Vec<Duration>,
    remove: Vec<Duration>,
    errors: Errors,
}

/// CreateVm, then RemoveVm of that VM, until told to stop (the current
/// pair is finished first, so nothing is left behind).
async fn churn(mut client: Client, stop: Arc<AtomicBool>, limit: Duration) -> Churned {
    let mut done = Churned::default();
    while !stop.load(Ordering::Relaxed) {
        let t0 = Instant::now();
        let id = match rpc::create(&mut client, limit).await {
            Ok(res) => {
                done.create.push(t0.elapsed());
                res.cvm_id
            }
            Err(e) => {
                done.errors.push(e);
                // Not a hot loop when the manager refuses everything.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let t1 = Instant::now();
        match rpc::remove(&mut client, &id, limit).await {
            Ok(()) => done.remove.push(t1.elapsed()),
            Err(e) => done.errors.push(e),
        }
    }
    done
}

/// `STAND_IN_CONSOLE_SPAM` as the stand-in of VM `id` got it: `None` when
/// no process is named `cocos-<id>`, `Some(None)` when it is unset.
fn spam_env(id: &str) -> Option<Option<String>> {
    procfs::pids_with_arg_containing(&format!("cocos-{id}"))
        .first()
        .map(|pid| procfs::environ_var(*pid, "STAND_IN_CONSOLE_SPAM"))
}

/// A failure unless VM `id`'s stand-in has the flood setting (`want`) or
/// has not (`!want`).
fn check_spam_env(id: &str, want: bool) -> Option<String> {
    match spam_env(id) {
        None => Some(format!("no process named cocos-{id} found")),
        Some(var) if var.is_some() != want => Some(format!(
            "VM {id}: STAND_IN_CONSOLE_SPAM is {var:?} in its stand-in's environment"
        )),
        Some(_) => None,
    }
}

/// A QEMU wrapper that execs the stand-in, with `STAND_IN_CONSOLE_SPAM`
/// set to the contents of `flag` if that file exists when the VM starts.
/// The manager hands every QEMU the same environment, so this is how one VM
/// floods while the others stay quiet. (The manager records the identity of
/// the process it spawned, which may be the shell for a moment; nothing in
/// this scenario re-adopts, so that does not matter here.)
fn write_wrapper(ws: &Workspace, stand_in: &Path, flag: &Path) -> BenchResult<PathBuf> {
    let stand_in = stand_in
        .canonicalize()
        .map_err(|e| format!("{}: {e}", stand_in.display()))?;
    let quote = |p: &Path| cocos_core::qemu::shell_quote(&[p.to_string_lossy().into_owned()]);
    let script = format!(
        "#!/bin/sh\n\
         # cocos-manager-bench latency: the stand-in QEMU; the VM started while\n\
         # the flag file exists writes its console at that many bytes per second.\n\
         if [ -s {flag} ]; then\n\
         \x20 STAND_IN_CONSOLE_SPAM=$(cat {flag})\n\
         \x20 export STAND_IN_CONSOLE_SPAM\n\
         fi\n\
         exec {stand_in} \"$@\"\n",
        flag = quote(flag),
        stand_in = quote(&stand_in),
    );
    let path = ws.path().join("qemu-console-flood");
    std::fs::write(&path, script)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

async fn console_scenario(
    opts: &LatencyOpts,
    paths: &Paths,
    ws: &Workspace,
    report: &mut LatencyReport,
) -> BenchResult<()> {
    let flag = ws.path().join("console-spam");
    let wrapper = write_wrapper(ws, &opts.qemu_bin, &flag)?;
    let spec = daemon_spec(paths, ws, &wrapper, 8)?;
    eprintln!(
        "(b) starting cocos-manager (state {})",
        ws.state_dir().display()
    );
    let mut manager = Daemon::spawn(&spec)?;
    manager.wait_serving(opts.start_timeout).await?;
    let mut prober = daemon::connect(spec.grpc_port).await?;
    // A second prober on its own connection: on the flooding VM while the
    // flood runs, on the quiet one (not counted) while idle, so that the
    // two windows differ in the flood only.
    let second = daemon::connect(spec.grpc_port).await?;
    let quiet = rpc::create(&mut prober, opts.rpc_timeout).await?.cvm_id;
    // Half an interval apart, so that the two probers do not queue behind
    // each other.
    let half = opts.probe_interval / 2;

    let mut result = ConsoleLoad {
        daemon_written: Some(0),
        ..ConsoleLoad::default()
    };
    let mut errors = [Errors::default(), Errors::default()];
    let mut failures = Vec::new();
    for round in 1..=opts.rounds {
        eprintln!(
            "(b) round {round}/{}: idle, then one guest writing {} B/s to its console",
            opts.rounds, opts.console_spam
        );
        tokio::time::sleep(SETTLE).await;
        let (idle, _) = tokio::join!(
            probe(prober.clone(), &quiet, opts, manager.pid()),
            offset(probe(second.clone(), &quiet, opts, manager.pid()), half),
        );

        std::fs::write(&flag, opts.console_spam.to_string())?;
        let flooding = rpc::create(&mut prober, opts.rpc_timeout).await;
        std::fs::remove_file(&flag)?;
        let flooder = flooding?.cvm_id;
        if round == 1 {
            failures.extend(check_spam_env(&quiet, false));
            failures.extend(check_spam_env(&flooder, true));
        }
        tokio::time::sleep(SETTLE).await;
        let written0 = procfs::io_counter(manager.pid(), "wchar");
        let (loaded, on_flooder) = tokio::join!(
            probe(prober.clone(), &quiet, opts, manager.pid()),
            offset(probe(second.clone(), &flooder, opts, manager.pid()), half),
        );
        let written1 = procfs::io_counter(manager.pid(), "wchar");
        result.daemon_written = match (result.daemon_written, written0, written1) {
            (Some(sum), Some(a), Some(b)) => Some(sum + b.saturating_sub(a)),
            _ => None,
        };
        let t0 = Instant::now();
        match rpc::remove(&mut prober, &flooder, opts.rpc_timeout).await {
            Ok(()) => result.remove_flooder.push(t0.elapsed()),
            Err(e) => failures.push(e),
        }
        result.windows.add_round(&idle, &loaded, Some(&on_flooder));
        errors[0].merge(idle.errors);
        errors[1].merge(loaded.errors);
        errors[1].merge(on_flooder.errors);
    }
    drop(second);
    let logged = result.logged_bps();
    report.console = Some(result);
    let report_failures = &mut report.failures;
    report_failures.append(&mut failures);
    // The guest writes as fast as the manager reads (which may cap it); less
    // than 10 kB/s logged means the flood never reached the manager.
    if logged.is_some_and(|bps| bps < 10_000.0) {
        report_failures.push(format!(
            "the daemon logged only {} of console (the guest was asked for {} B/s): no flood",
            mb(logged),
            opts.console_spam
        ));
    }
    for (errors, what) in errors.iter().zip(["idle CVMInfo", "loaded CVMInfo"]) {
        report_failures.extend(errors.line(what));
    }
    finish(
        manager,
        &mut prober,
        &[&quiet],
        ws,
        opts.rpc_timeout,
        report_failures,
    )
    .await
}
