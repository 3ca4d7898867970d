//! `scale`: N VMs on the stand-in QEMU, created and removed by C concurrent
//! clients; the daemon's memory and idle CPU with N VMs; re-adoption after
//! a SIGKILL.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cocos_core::proto::{CreateReq, CvmInfoReq, RemoveReq};
use serde_json::json;

use crate::daemon::{self, Daemon, DaemonSpec, Paths, Workspace};
use crate::stats::{ms, round3, Summary};
use crate::{pool, procfs, BenchResult};

#[derive(Debug, Clone)]
pub struct ScaleOpts {
    pub vms: usize,
    pub clients: usize,
    pub idle_window: Duration,
    pub qemu_bin: PathBuf,
    /// Longest wait for the daemon to serve (start and re-adoption).
    pub start_timeout: Duration,
    /// Longest wait for one gRPC request.
    pub rpc_timeout: Duration,
    pub keep: bool,
}

/// Everything measured; `None` where the run did not get that far.
#[derive(Debug, Default)]
pub struct ScaleReport {
    pub vms: usize,
    pub clients: usize,
    pub port_range: Option<(u16, u16)>,
    pub qemu_bin: String,
    pub created: usize,
    pub create: Option<Summary>,
    pub create_wall: Option<Duration>,
    pub rss0_kib: Option<u64>,
    pub rss_n_kib: Option<u64>,
    pub hwm_n_kib: Option<u64>,
    pub idle_window: Duration,
    pub idle_cpu_pct: Option<f64>,
    /// utime + stime over the window, in clock ticks.
    pub idle_cpu_ticks: Option<u64>,
    /// The daemon's CPU time spent while the creates ran.
    pub create_cpu_ticks: Option<u64>,
    pub clock_ticks_per_sec: u64,
    pub alive_after_kill: Option<usize>,
    pub readopt: Option<Duration>,
    pub readopt_found: Option<usize>,
    pub rss_readopted_kib: Option<u64>,
    pub removed: usize,
    pub remove: Option<Summary>,
    pub remove_wall: Option<Duration>,
    pub leftover_folders: Option<usize>,
    pub leftover_processes: Option<usize>,
    pub daemon_exit: Option<String>,
    pub failures: Vec<String>,
}

impl ScaleReport {
    fn per_vm_kib(&self) -> Option<f64> {
        let (r0, rn) = (self.rss0_kib?, self.rss_n_kib?);
        (self.created > 0).then(|| (rn as f64 - r0 as f64) / self.created as f64)
    }

    fn creates_per_sec(&self) -> Option<f64> {
        let wall = self.create_wall?.as_secs_f64();
        (wall > 0.0).then(|| self.created as f64 / wall)
    }

    pub fn print(&self) {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "n/a".to_string());
        println!("== cocos-manager scale benchmark ==");
        println!(
            "VMs: {} (QEMU: {}), clients: {}, ports: {}",
            self.vms,
            self.qemu_bin,
            self.clients,
            opt(self.port_range.map(|(a, b)| format!("{a}-{b}")))
        );
        println!(
            "CreateVm: {}/{} ok; latency {}",
            self.created,
            self.vms,
            Summary::line(self.create)
        );
        println!(
            "  wall {} -> {} creates/s",
            opt(self
                .create_wall
                .map(|w| format!("{:.2} s", w.as_secs_f64()))),
            opt(self.creates_per_sec().map(|r| format!("{r:.1}")))
        );
        if let (Some(ticks), true) = (self.create_cpu_ticks, self.created > 0) {
            let ms = ticks as f64 * 1000.0 / procfs::clock_ticks_per_sec() as f64;
            println!(
                "  daemon CPU while creating: {ms:.0} ms ({:.2} ms per create)",
                ms / self.created as f64
            );
        }
        println!(
            "Daemon RSS: {} KiB with 0 VMs, {} KiB with {} VMs (peak {} KiB) -> {} KiB per VM",
            opt(self.rss0_kib.map(|v| v.to_string())),
            opt(self.rss_n_kib.map(|v| v.to_string())),
            self.created,
            opt(self.hwm_n_kib.map(|v| v.to_string())),
            opt(self.per_vm_kib().map(|v| format!("{v:.1}")))
        );
        println!(
            "Idle CPU with {} VMs over {:.1} s: {} of one core ({} clock ticks of 1/{} s)",
            self.created,
            self.idle_window.as_secs_f64(),
            opt(self.idle_cpu_pct.map(|v| format!("{v:.2} %"))),
            opt(self.idle_cpu_ticks.map(|v| v.to_string())),
            self.clock_ticks_per_sec
        );
        println!(
            "Re-adoption after SIGKILL: {} VM processes survived; serving after {}; CVMInfo found {}/{}; RSS {} KiB",
            opt(self.alive_after_kill.map(|v| v.to_string())),
            opt(self.readopt.map(|d| format!("{:.1} ms", ms(d)))),
            opt(self.readopt_found.map(|v| v.to_string())),
            self.created,
            opt(self.rss_readopted_kib.map(|v| v.to_string()))
        );
        println!(
            "RemoveVm: {}/{} ok; total {}; latency {}",
            self.removed,
            self.created,
            opt(self
                .remove_wall
                .map(|w| format!("{:.2} s", w.as_secs_f64()))),
            Summary::line(self.remove)
        );
        println!(
            "Leftovers: {} VM folders, {} VM processes; daemon exit: {}",
            opt(self.leftover_folders.map(|v| v.to_string())),
            opt(self.leftover_processes.map(|v| v.to_string())),
            opt(self.daemon_exit.clone())
        );
        crate::stats::print_verdict(&self.failures);
    }

    pub fn json(&self) -> serde_json::Value {
        let secs = |d: Option<Duration>| d.map(|d| round3(d.as_secs_f64()));
        json!({
            "bench": "scale",
            "ok": self.failures.is_empty(),
            "vms": self.vms,
            "clients": self.clients,
            "qemu_bin": self.qemu_bin,
            "port_range": self.port_range.map(|(a, b)| format!("{a}-{b}")),
            "create": {
                "ok": self.created,
                "latency": Summary::json(self.create),
                "wall_s": secs(self.create_wall),
                "per_sec": self.creates_per_sec().map(round3),
            },
            "rss": {
                "idle_kib": self.rss0_kib,
                "with_vms_kib": self.rss_n_kib,
                "peak_kib": self.hwm_n_kib,
                "per_vm_kib": self.per_vm_kib().map(round3),
                "after_readoption_kib": self.rss_readopted_kib,
            },
            "idle_cpu": {
                "window_s": round3(self.idle_window.as_secs_f64()),
                "pct_of_one_core": self.idle_cpu_pct.map(round3),
                "create_phase_cpu_ticks": self.create_cpu_ticks,
                "cpu_ticks": self.idle_cpu_ticks,
                "clock_ticks_per_s": self.clock_ticks_per_sec,
            },
            "readoption": {
                "vm_processes_after_kill": self.alive_after_kill,
                "serving_after_ms": self.readopt.map(|d| round3(ms(d))),
                "found": self.readopt_found,
                "expected": self.created,
            },
            "remove": {
                "ok": self.removed,
                "latency": Summary::json(self.remove),
                "wall_s": secs(self.remove_wall),
            },
            "leftovers": {
                "vm_folders": self.leftover_folders,
                "vm_processes": self.leftover_processes,
            },
            "daemon_exit": self.daemon_exit,
            "failures": self.failures,
        })
    }
}

pub async fn run(opts: &ScaleOpts, paths: &Paths) -> ScaleReport {
    let mut report = ScaleReport {
        vms: opts.vms,
        clients: opts.clients,
        qemu_bin: opts.qemu_bin.display().to_string(),
        idle_window: opts.idle_window,
        clock_ticks_per_sec: procfs::clock_ticks_per_sec(),
        ..ScaleReport::default()
    };
    let ws = match Workspace::create(opts.keep) {
        Ok(ws) => ws,
        Err(e) => {
            report.failures.push(format!("aborted: {e}"));
            return report;
        }
    };
    if let Err(e) = phases(opts, paths, &ws, &mut report).await {
        report.failures.push(format!("aborted: {e}"));
        eprintln!("daemon log: {}", ws.path().join("manager.log").display());
    }
    // Dropping `ws` kills whatever VM is left and removes the workspace.
    report
}

/// One line for one kind of failure: the count and the first message,
/// shortened (QEMU's error lines carry the whole command line).
fn note_errors(report: &mut ScaleReport, what: &str, errors: &[String]) {
    let Some(first) = errors.first() else {
        return;
    };
    let mut shown: String = first.chars().take(300).collect();
    if shown.len() < first.len() {
        shown.push_str(" ...");
    }
    report
        .failures
        .push(format!("{} {what} failed; first: {shown}", errors.len()));
}

async fn phases(
    opts: &ScaleOpts,
    paths: &Paths,
    ws: &Workspace,
    report: &mut ScaleReport,
) -> BenchResult<()> {
    let n = opts.vms;
    let range = daemon::free_port_range(
        u16::try_from(n).map_err(|_| format!("too many VMs for the port space: {n}"))?,
    )?;
    report.port_range = Some(range);
    let mut spec = DaemonSpec::new(paths, ws)?;
    spec.set("MANAGER_QEMU_BIN_PATH", opts.qemu_bin.to_string_lossy());
    // The stand-in has no TPM device: no swtpm per VM.
    spec.set("MANAGER_QEMU_VTPM", "none");
    spec.set(
        "MANAGER_QEMU_HOST_FWD_RANGE",
        format!("{}-{}", range.0, range.1),
    );
    spec.set("MANAGER_MAX_VMS", n.to_string());
    spec.set("MANAGER_STOP_POWERDOWN_TIMEOUT", "2s");

    eprintln!(
        "starting cocos-manager (state {})",
        ws.state_dir().display()
    );
    let mut manager = Daemon::spawn(&spec)?;
    manager.wait_serving(opts.start_timeout).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    report.rss0_kib = Some(procfs::rss_kib(manager.pid())?);

    // Create.
    eprintln!("creating {n} VMs with {} clients", opts.clients);
    let clients = pool::clients(spec.grpc_port, opts.clients).await?;
    let rpc_timeout = opts.rpc_timeout;
    let create_ticks0 = procfs::cpu_ticks(manager.pid())?;
    let (outcomes, wall) = pool::run(&clients, n, move |mut client, _| async move {
        let req = CreateReq {
            agent_log_level: "info".to_string(),
            ..CreateReq::default()
        };
        match tokio::time::timeout(rpc_timeout, client.create_vm(req)).await {
            Ok(Ok(res)) => Ok(res.into_inner()),
            Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
            Err(_) => Err(format!("no answer within {rpc_timeout:?}")),
        }
    })
    .await?;
    let mut ids = Vec::with_capacity(n);
    let mut latencies = Vec::with_capacity(n);
    let mut errors = Vec::new();
    for outcome in outcomes {
        match outcome.result {
            Ok(res) => {
                ids.push(res.cvm_id);
                latencies.push(outcome.latency);
            }
            Err(e) => errors.push(e),
        }
    }
    report.create_cpu_ticks = procfs::cpu_ticks(manager.pid())
        .ok()
        .map(|t| t.saturating_sub(create_ticks0));
    report.created = ids.len();
    report.create = Summary::of(&latencies);
    report.create_wall = Some(wall);
    note_errors(report, "CreateVm", &errors);
    let running = ws.processes().len();
    if running != ids.len() {
        report.failures.push(format!(
            "{running} VM processes run for {} created VMs",
            ids.len()
        ));
    }

    // Idle: CPU over the window, then memory.
    eprintln!(
        "measuring idle CPU over {:.1} s",
        opts.idle_window.as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ticks0 = procfs::cpu_ticks(manager.pid())?;
    let t0 = Instant::now();
    tokio::time::sleep(opts.idle_window).await;
    let ticks1 = procfs::cpu_ticks(manager.pid())?;
    let elapsed = t0.elapsed().as_secs_f64();
    let ticks = ticks1.saturating_sub(ticks0);
    let cpu_secs = ticks as f64 / report.clock_ticks_per_sec as f64;
    report.idle_cpu_ticks = Some(ticks);
    report.idle_cpu_pct = Some(cpu_secs / elapsed * 100.0);
    report.rss_n_kib = Some(procfs::rss_kib(manager.pid())?);
    report.hwm_n_kib = Some(procfs::hwm_kib(manager.pid())?);

    // Re-adoption: SIGKILL, restart on the same state, time until served.
    eprintln!("SIGKILL the daemon and restart it on the same state");
    drop(clients);
    manager.kill()?;
    report.alive_after_kill = Some(ws.processes().len());
    let t0 = Instant::now();
    let mut manager = Daemon::spawn(&spec)?;
    manager.wait_serving(opts.start_timeout).await?;
    report.readopt = Some(t0.elapsed());
    report.rss_readopted_kib = Some(procfs::rss_kib(manager.pid())?);

    let clients = pool::clients(spec.grpc_port, opts.clients).await?;
    let ids = std::sync::Arc::new(ids);
    let jobs = ids.len();
    let (outcomes, _) = pool::run(&clients, jobs, {
        let ids = ids.clone();
        move |mut client, i| {
            let id = ids[i].clone();
            async move {
                let req = CvmInfoReq { id: id.clone() };
                match tokio::time::timeout(rpc_timeout, client.cvm_info(req)).await {
                    Ok(Ok(res)) if res.get_ref().id == id => Ok(()),
                    Ok(Ok(res)) => Err(format!("asked {id}, got {}", res.get_ref().id)),
                    Ok(Err(status)) => {
                        Err(format!("{id}: {:?}: {}", status.code(), status.message()))
                    }
                    Err(_) => Err(format!("{id}: no answer within {rpc_timeout:?}")),
                }
            }
        }
    })
    .await?;
    let errors: Vec<String> = outcomes
        .into_iter()
        .filter_map(|o| o.result.err())
        .collect();
    report.readopt_found = Some(jobs - errors.len());
    note_errors(report, "CVMInfo after re-adoption", &errors);

    // Remove.
    eprintln!("removing {jobs} VMs with {} clients", opts.clients);
    let (outcomes, wall) = pool::run(&clients, jobs, {
        let ids = ids.clone();
        move |mut client, i| {
            let id = ids[i].clone();
            async move {
                let req = RemoveReq { cvm_id: id.clone() };
                match tokio::time::timeout(rpc_timeout, client.remove_vm(req)).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(status)) => {
                        Err(format!("{id}: {:?}: {}", status.code(), status.message()))
                    }
                    Err(_) => Err(format!("{id}: no answer within {rpc_timeout:?}")),
                }
            }
        }
    })
    .await?;
    let mut latencies = Vec::with_capacity(jobs);
    let mut errors = Vec::new();
    for outcome in outcomes {
        match outcome.result {
            Ok(()) => latencies.push(outcome.latency),
            Err(e) => errors.push(e),
        }
    }
    report.removed = latencies.len();
    report.remove = Summary::of(&latencies);
    report.remove_wall = Some(wall);
    note_errors(report, "RemoveVm", &errors);
    drop(clients);

    // Leftovers: a removed VM's folder and process are gone when RemoveVm
    // answers; a short grace covers slow file systems.
    let vms_dir = ws.state_dir().join("vms");
    let folders = || {
        std::fs::read_dir(&vms_dir)
            .map(|d| d.flatten().count())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while (folders() > 0 || !ws.processes().is_empty()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (left_folders, left_procs) = (folders(), ws.processes().len());
    report.leftover_folders = Some(left_folders);
    report.leftover_processes = Some(left_procs);
    if left_folders > 0 {
        report.failures.push(format!(
            "{left_folders} VM folders left in {}",
            vms_dir.display()
        ));
    }
    if left_procs > 0 {
        report
            .failures
            .push(format!("{left_procs} VM processes left running"));
    }

    let status = manager.terminate(Duration::from_secs(30)).await?;
    report.daemon_exit = Some(status.to_string());
    if !status.success() {
        report
            .failures
            .push(format!("cocos-manager exited with {status} after SIGTERM"));
    }
    Ok(())
}
