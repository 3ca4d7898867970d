//! `spawn-ratio`: the manager's create rate as a fraction of what the host
//! can do without it. Each round times
//!
//! - the manager: N CreateVm by C clients, from the first request to the
//!   last answer (then every VM is removed, not timed), and
//! - the baseline: the bench itself spawning the same N stand-in QEMUs with
//!   the manager's command line (`--print-qemu-cmd`, each with its own
//!   folder, port and QMP socket), C at a time, each waited for as the
//!   manager waits: QMP greeting, `qmp_capabilities`, `query-status`
//!   running, forwarded port bound (then all are stopped, not timed).
//!
//! The two alternate which goes first. Ratio = baseline wall / manager wall
//! = manager creates/s ÷ baseline spawns/s (1.0: the manager costs nothing).

use std::fs::{self, OpenOptions};
use std::net::TcpListener;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::daemon::{self, Daemon, DaemonSpec, Paths, Workspace};
use crate::guest::{print_qemu_cmd, PLACEHOLDER_ID};
use crate::rpc::{self, Errors};
use crate::stats::{median, ms, round3, Summary};
use crate::summary::{self, Row, Stamp};
use crate::{pool, procfs, BenchResult};

/// Longest wait for one stand-in run by hand to answer.
const READY_LIMIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct RatioOpts {
    pub vms: usize,
    pub clients: usize,
    pub rounds: usize,
    pub qemu_bin: PathBuf,
    pub start_timeout: Duration,
    pub rpc_timeout: Duration,
    pub keep: bool,
}

#[derive(Debug, Clone)]
pub struct RatioRound {
    pub baseline_first: bool,
    /// N spawned by hand until all answered.
    pub baseline_wall: Duration,
    /// Spawn → ready, per instance.
    pub baseline_ready: Option<Summary>,
    /// N CreateVm until all answered.
    pub manager_wall: Duration,
    pub create: Option<Summary>,
    /// The daemon's CPU while creating, per create.
    pub daemon_cpu_ms_per_create: Option<f64>,
    pub remove_wall: Duration,
}

impl RatioRound {
    fn ratio(&self) -> f64 {
        self.baseline_wall.as_secs_f64() / self.manager_wall.as_secs_f64().max(1e-9)
    }
}

#[derive(Debug)]
pub struct RatioReport {
    pub opts: RatioOpts,
    pub stamp: Stamp,
    pub rounds: Vec<RatioRound>,
    pub failures: Vec<String>,
}

impl RatioReport {
    fn per_sec(&self, wall: Duration) -> f64 {
        self.opts.vms as f64 / wall.as_secs_f64().max(1e-9)
    }

    fn median_of(&self, f: impl Fn(&RatioRound) -> f64) -> Option<f64> {
        median(&self.rounds.iter().map(f).collect::<Vec<_>>())
    }

    fn medians(&self) -> (Option<f64>, Option<f64>, Option<f64>) {
        (
            self.median_of(RatioRound::ratio),
            self.median_of(|r| self.per_sec(r.manager_wall)),
            self.median_of(|r| self.per_sec(r.baseline_wall)),
        )
    }

    pub fn print(&self) {
        let o = &self.opts;
        println!("== cocos-manager spawn-ratio benchmark (stand-in QEMU) ==");
        println!(
            "{} VMs, {} at a time; rounds {}/{}; (m) CreateVm through the manager, (b) the same stand-ins spawned by the bench",
            o.vms,
            o.clients,
            self.rounds.len(),
            o.rounds
        );
        println!(
            "{:>5}  {:>12}  {:>10}  {:>12}  {:>10}  {:>6}  {:>22}  {:>22}  first",
            "round",
            "(m) wall",
            "(m) /s",
            "(b) wall",
            "(b) /s",
            "ratio",
            "CreateVm p50/p99",
            "(b) ready p50/p99"
        );
        let pair = |s: Option<Summary>| {
            s.map_or_else(
                || "n/a".to_string(),
                |s| format!("{:.1}/{:.1} ms", s.p50_ms, s.p99_ms),
            )
        };
        for (i, r) in self.rounds.iter().enumerate() {
            println!(
                "{:>5}  {:>9.0} ms  {:>10.0}  {:>9.0} ms  {:>10.0}  {:>6.2}  {:>22}  {:>22}  {}",
                i + 1,
                ms(r.manager_wall),
                self.per_sec(r.manager_wall),
                ms(r.baseline_wall),
                self.per_sec(r.baseline_wall),
                r.ratio(),
                pair(r.create),
                pair(r.baseline_ready),
                if r.baseline_first { "b" } else { "m" }
            );
        }
        let (ratio, manager, baseline) = self.medians();
        let cpu = self.median_of(|r| r.daemon_cpu_ms_per_create.unwrap_or(f64::NAN));
        println!(
            "median: ratio {} ({} creates/s vs {} spawns/s); daemon CPU {} ms per create",
            summary::fmt_ratio(ratio),
            manager.map_or_else(|| "n/a".to_string(), |v| format!("{v:.0}")),
            baseline.map_or_else(|| "n/a".to_string(), |v| format!("{v:.0}")),
            cpu.filter(|v| v.is_finite())
                .map_or_else(|| "n/a".to_string(), |v| format!("{v:.2}"))
        );
        crate::stats::print_verdict(&self.failures);
        let (lo, hi) = self
            .rounds
            .iter()
            .map(RatioRound::ratio)
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), r| {
                (lo.min(r), hi.max(r))
            });
        let spread = if self.rounds.len() > 1 {
            format!(", rounds {lo:.2}–{hi:.2}")
        } else {
            String::new()
        };
        let row = Row {
            figure: format!(
                "create rate ÷ spawning the same stand-ins without the manager ({} VMs, {} at a time)",
                o.vms, o.clients
            ),
            measured: format!(
                "**{}** (median of {}{spread}: {} creates/s vs {} spawns/s)",
                summary::fmt_ratio(ratio),
                self.rounds.len(),
                manager.map_or_else(|| "n/a".to_string(), |v| format!("{v:.0}")),
                baseline.map_or_else(|| "n/a".to_string(), |v| format!("{v:.0}")),
            ),
        };
        summary::print(&self.stamp, &[row], &self.failures);
    }

    pub fn json(&self) -> serde_json::Value {
        let o = &self.opts;
        let (ratio, manager, baseline) = self.medians();
        let rounds: Vec<_> = self
            .rounds
            .iter()
            .map(|r| {
                json!({
                    "first": if r.baseline_first { "baseline" } else { "manager" },
                    "ratio": round3(r.ratio()),
                    "manager_wall_ms": round3(ms(r.manager_wall)),
                    "manager_per_s": round3(self.per_sec(r.manager_wall)),
                    "create_latency": Summary::json(r.create),
                    "daemon_cpu_ms_per_create": r.daemon_cpu_ms_per_create.map(round3),
                    "remove_wall_ms": round3(ms(r.remove_wall)),
                    "baseline_wall_ms": round3(ms(r.baseline_wall)),
                    "baseline_per_s": round3(self.per_sec(r.baseline_wall)),
                    "baseline_ready_latency": Summary::json(r.baseline_ready),
                })
            })
            .collect();
        json!({
            "bench": "spawn-ratio",
            "ok": self.failures.is_empty(),
            "vms": o.vms,
            "clients": o.clients,
            "rounds_wanted": o.rounds,
            "qemu_bin": o.qemu_bin.display().to_string(),
            "date": self.stamp.date,
            "commit": self.stamp.commit,
            "command": self.stamp.command,
            "rounds": rounds,
            "median": {
                "ratio": ratio.map(round3),
                "manager_per_s": manager.map(round3),
                "baseline_per_s": baseline.map(round3),
            },
            "failures": self.failures,
        })
    }
}

pub async fn run(opts: &RatioOpts, paths: &Paths) -> RatioReport {
    let mut report = RatioReport {
        opts: opts.clone(),
        stamp: Stamp::now(&paths.repo_root),
        rounds: Vec::new(),
        failures: Vec::new(),
    };
    let ws = match Workspace::create(opts.keep) {
        Ok(ws) => ws,
        Err(e) => {
            report.failures.push(format!("aborted: {e}"));
            return report;
        }
    };
    if let Err(e) = rounds(opts, paths, &ws, &mut report).await {
        report
            .failures
            .push(format!("aborted: {}", summary::shorten(&e.to_string())));
        eprintln!("daemon log: {}", ws.path().join("manager.log").display());
    }
    // Dropping `ws` kills whatever is left and removes the workspace.
    report
}

/// The baseline's instances: the manager's command line with the
/// placeholder VM's id and port replaced, one folder each.
struct Baseline {
    template: Vec<String>,
    template_port: u16,
    /// `<workspace>/hand/vms`.
    vms_dir: PathBuf,
    /// One copy of the firmware variables, hard-linked into every folder.
    vars: PathBuf,
    first_port: u16,
    repo_root: PathBuf,
}

impl Baseline {
    /// Same length as a UUID, so every path is as long as the manager's.
    fn id(i: usize) -> String {
        format!("00000000-0000-4000-8000-{i:012}")
    }

    fn port(&self, i: usize) -> u16 {
        self.first_port + i as u16
    }

    fn dir(&self, i: usize) -> PathBuf {
        self.vms_dir.join(Self::id(i))
    }

    fn argv(&self, i: usize) -> Vec<String> {
        let id = Self::id(i);
        let (from, to) = (
            format!(":{}-:", self.template_port),
            format!(":{}-:", self.port(i)),
        );
        self.template
            .iter()
            .map(|a| a.replace(PLACEHOLDER_ID, &id).replace(&from, &to))
            .collect()
    }

    /// What the manager makes before it starts QEMU, minus the contents the
    /// stand-in never reads: the folder, the two shares, the vars file.
    /// Not timed.
    fn prepare(&self, n: usize) -> BenchResult<()> {
        let _ = fs::remove_dir_all(&self.vms_dir);
        for i in 0..n {
            let dir = self.dir(i);
            for sub in ["certs", "env"] {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir.join(sub))?;
            }
            fs::hard_link(&self.vars, dir.join("OVMF_VARS.fd"))
                .or_else(|_| fs::copy(&self.vars, dir.join("OVMF_VARS.fd")).map(|_| ()))?;
        }
        Ok(())
    }

    /// Spawns instance `i` as the manager does (own process group, output to
    /// the folder's qemu.log) and waits until it is up as the manager
    /// decides it. The child is handed over at once, so that it is stopped
    /// whatever happens.
    async fn start(&self, i: usize, children: &Mutex<Vec<Child>>) -> Result<(), String> {
        let argv = self.argv(i);
        let dir = self.dir(i);
        let (program, args) = argv.split_first().ok_or("empty QEMU command line")?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("qemu.log"))
            .map_err(|e| format!("qemu.log: {e}"))?;
        let qmp_path = dir.join("qmp.sock");
        let _ = fs::remove_file(&qmp_path);
        let child = Command::new(program)
            .args(args)
            .current_dir(&self.repo_root)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start {program}: {e}"))?;
        let pid = child.id();
        let slot = {
            let mut children = children.lock().map_err(|_| "poisoned")?;
            children.push(child);
            children.len() - 1
        };
        let exited = || -> Option<String> {
            let mut children = children.lock().ok()?;
            let status = children.get_mut(slot)?.try_wait().ok()??;
            Some(format!(
                "instance {i} (pid {pid}) exited at start ({status}): {}",
                fs::read_to_string(dir.join("qemu.log"))
                    .unwrap_or_default()
                    .trim()
            ))
        };
        let deadline = Instant::now() + READY_LIMIT;
        // The manager's schedule: every 1 ms, then 5 ms, then 50 ms.
        let mut tries: u32 = 0;
        let stream = loop {
            match UnixStream::connect(&qmp_path).await {
                Ok(stream) => break stream,
                Err(e) => {
                    if let Some(why) = exited() {
                        return Err(why);
                    }
                    if Instant::now() >= deadline {
                        return Err(format!("instance {i}: no QMP within {READY_LIMIT:?}: {e}"));
                    }
                    let delay = match tries {
                        0..=19 => 1,
                        20..=39 => 5,
                        _ => 50,
                    };
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                }
            }
        };
        let status = tokio::time::timeout(
            deadline.saturating_duration_since(Instant::now()),
            qmp_status(stream),
        )
        .await
        .map_err(|_| format!("instance {i}: QMP did not answer within {READY_LIMIT:?}"))?
        .map_err(|e| format!("instance {i}: QMP: {e}"))?;
        if status != "running" {
            return Err(format!("instance {i}: QMP says {status}, not running"));
        }
        if TcpListener::bind(("127.0.0.1", self.port(i))).is_ok() {
            return Err(format!("instance {i}: port {} is not bound", self.port(i)));
        }
        Ok(())
    }
}

/// Greeting, `qmp_capabilities`, `query-status`; returns the status. The
/// connection is closed afterwards (the stand-in serves the next client).
async fn qmp_status(stream: UnixStream) -> Result<String, String> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::with_capacity(1024, read).lines();
    let greeting = next_line(&mut lines).await?;
    if !greeting.contains("\"QMP\"") {
        return Err(format!("unexpected greeting {greeting}"));
    }
    let mut status = String::new();
    for command in ["qmp_capabilities", "query-status"] {
        let text = format!("{{\"execute\": \"{command}\"}}\n");
        write
            .write_all(text.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        // Events may come first; the answer is the line with `return`.
        loop {
            let line = next_line(&mut lines).await?;
            let value: serde_json::Value =
                serde_json::from_str(&line).map_err(|e| format!("bad line {line:?}: {e}"))?;
            if let Some(ret) = value.get("return") {
                status = ret["status"].as_str().unwrap_or_default().to_string();
                break;
            }
            if value.get("error").is_some() {
                return Err(format!("{command}: {line}"));
            }
        }
    }
    Ok(status)
}

async fn next_line(
    lines: &mut tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
) -> Result<String, String> {
    lines
        .next_line()
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "closed".to_string())
}

/// SIGTERM to every child, then waits (SIGKILL after 10 s); returns how
/// many had to be killed.
async fn stop_all(children: &Mutex<Vec<Child>>) -> usize {
    let mut children = match children.lock() {
        Ok(mut c) => std::mem::take(&mut *c),
        Err(_) => return 0,
    };
    for child in &children {
        let _ = procfs::signal(child.id(), libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        children.retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_)) | Err(_)));
        if children.is_empty() {
            return 0;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for child in &mut children {
        let _ = child.kill();
        let _ = child.wait();
    }
    children.len()
}

async fn rounds(
    opts: &RatioOpts,
    paths: &Paths,
    ws: &Workspace,
    report: &mut RatioReport,
) -> BenchResult<()> {
    let n = opts.vms;
    let n16 = u16::try_from(n).map_err(|_| format!("too many VMs: {n}"))?;
    let both = n16
        .checked_mul(2)
        .ok_or_else(|| format!("too many VMs for the port space: {n}"))?;
    // The first half for the manager, the second for the baseline.
    let range = daemon::free_port_range(both)?;
    let mut spec = DaemonSpec::new(paths, ws)?;
    spec.set("MANAGER_QEMU_BIN_PATH", opts.qemu_bin.to_string_lossy());
    spec.set("MANAGER_QEMU_VTPM", "none");
    spec.set(
        "MANAGER_QEMU_HOST_FWD_RANGE",
        format!("{}-{}", range.0, range.0 + n16 - 1),
    );
    spec.set("MANAGER_MAX_VMS", n.to_string());
    spec.set("MANAGER_STOP_POWERDOWN_TIMEOUT", "2s");

    let hand_state = ws.path().join("hand");
    let first_port = range.0 + n16;
    let template = print_qemu_cmd(&spec, &hand_state, first_port)?;
    let vars_template = spec
        .env
        .get("MANAGER_QEMU_OVMF_VARS_FILE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/share/OVMF/OVMF_VARS.fd"));
    fs::create_dir_all(&hand_state)?;
    let vars = hand_state.join("OVMF_VARS.fd");
    fs::copy(&vars_template, &vars)
        .map_err(|e| format!("cannot copy {}: {e}", vars_template.display()))?;
    let baseline = Arc::new(Baseline {
        template,
        template_port: first_port,
        vms_dir: hand_state.join("vms"),
        vars,
        first_port,
        repo_root: paths.repo_root.clone(),
    });

    eprintln!(
        "starting cocos-manager (state {})",
        ws.state_dir().display()
    );
    let mut manager = Daemon::spawn(&spec)?;
    manager.wait_serving(opts.start_timeout).await?;
    let clients = pool::clients(spec.grpc_port, opts.clients).await?;

    for round in 0..opts.rounds {
        let baseline_first = round % 2 == 0;
        let mut by_hand = None;
        let mut managed = None;
        for step in 0..2 {
            if (step == 0) == baseline_first {
                eprintln!(
                    "round {}: (b) {n} stand-ins spawned by the bench",
                    round + 1
                );
                by_hand = Some(run_baseline(&baseline, n, opts.clients, report).await?);
            } else {
                eprintln!("round {}: (m) {n} CreateVm through the manager", round + 1);
                managed = Some(run_manager(&clients, &manager, ws, opts, report).await?);
            }
        }
        if let (Some((baseline_wall, baseline_ready)), Some(m)) = (by_hand, managed) {
            report.rounds.push(RatioRound {
                baseline_first,
                baseline_wall,
                baseline_ready,
                manager_wall: m.wall,
                create: m.create,
                daemon_cpu_ms_per_create: m.cpu_ms_per_create,
                remove_wall: m.remove_wall,
            });
        }
        if !report.failures.is_empty() {
            break;
        }
    }
    drop(clients);
    let _ = fs::remove_dir_all(&hand_state);

    let status = manager.terminate(Duration::from_secs(30)).await?;
    if !status.success() {
        report
            .failures
            .push(format!("cocos-manager exited with {status} after SIGTERM"));
    }
    Ok(())
}

/// (b): returns the wall time and the per-instance readiness latencies.
async fn run_baseline(
    baseline: &Arc<Baseline>,
    n: usize,
    workers: usize,
    report: &mut RatioReport,
) -> BenchResult<(Duration, Option<Summary>)> {
    baseline.prepare(n)?;
    let children = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let pooled = pool::each(workers, n, {
        let (baseline, children) = (baseline.clone(), children.clone());
        move |_, i| {
            let (baseline, children) = (baseline.clone(), children.clone());
            async move { baseline.start(i, &children).await }
        }
    })
    .await;
    let killed = stop_all(&children).await;
    let _ = fs::remove_dir_all(&baseline.vms_dir);
    let (outcomes, wall) = pooled?;
    let mut errors = Errors::default();
    let mut ready = Vec::with_capacity(n);
    for o in outcomes {
        match o.result {
            Ok(()) => ready.push(o.latency),
            Err(e) => errors.push(e),
        }
    }
    report.failures.extend(errors.line("baseline spawns"));
    if killed > 0 {
        report.failures.push(format!(
            "{killed} stand-ins run by hand ignored SIGTERM for 10 s"
        ));
    }
    Ok((wall, Summary::of(&ready)))
}

struct Managed {
    wall: Duration,
    create: Option<Summary>,
    cpu_ms_per_create: Option<f64>,
    remove_wall: Duration,
}

/// (m): N CreateVm, then RemoveVm of every one and a check that nothing is
/// left.
async fn run_manager(
    clients: &[daemon::Client],
    manager: &Daemon,
    ws: &Workspace,
    opts: &RatioOpts,
    report: &mut RatioReport,
) -> BenchResult<Managed> {
    let n = opts.vms;
    let limit = opts.rpc_timeout;
    let ticks0 = procfs::cpu_ticks(manager.pid())?;
    let (outcomes, wall) = pool::run(clients, n, move |mut client, _| async move {
        rpc::create(&mut client, limit).await
    })
    .await?;
    let ticks = procfs::cpu_ticks(manager.pid())?.saturating_sub(ticks0);
    let mut ids = Vec::with_capacity(n);
    let mut latencies = Vec::with_capacity(n);
    let mut errors = Errors::default();
    for o in outcomes {
        match o.result {
            Ok(res) => {
                ids.push(res.cvm_id);
                latencies.push(o.latency);
            }
            Err(e) => errors.push(e),
        }
    }
    report.failures.extend(errors.line("CreateVm"));
    let created = ids.len();
    let ids = Arc::new(ids);
    let (outcomes, remove_wall) = pool::run(clients, created, {
        let ids = ids.clone();
        move |mut client, i| {
            let ids = ids.clone();
            async move { rpc::remove(&mut client, &ids[i], limit).await }
        }
    })
    .await?;
    let mut errors = Errors::default();
    for o in outcomes {
        if let Err(e) = o.result {
            errors.push(e);
        }
    }
    report.failures.extend(errors.line("RemoveVm"));
    let (folders, processes) = ws.wait_no_vms(Duration::from_secs(10)).await;
    if folders > 0 || processes > 0 {
        report.failures.push(format!(
            "left behind after RemoveVm: {folders} VM folders, {processes} VM processes"
        ));
    }
    let cpu_ms = ticks as f64 * 1000.0 / procfs::clock_ticks_per_sec() as f64;
    Ok(Managed {
        wall,
        create: Summary::of(&latencies),
        cpu_ms_per_create: (created > 0).then(|| cpu_ms / created as f64),
        remove_wall,
    })
}
