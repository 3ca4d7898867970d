//! `cocos-manager-bench`: starts its own `cocos-manager`, drives it over
//! real gRPC and reports latency, throughput, memory, CPU, re-adoption time
//! (`scale`, on the stand-in QEMU), the control plane's latency under load
//! (`latency`), the create rate as a ratio to spawning the stand-ins without
//! the manager (`spawn-ratio`) or the manager's overhead on a real boot
//! (`guest`). Prints a human-readable report, then one JSON line.

mod daemon;
mod guest;
mod latency;
mod pool;
mod procfs;
mod rpc;
mod scale;
mod shell;
mod spawn_ratio;
mod stats;
mod summary;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use daemon::Paths;

pub type BenchError = Box<dyn std::error::Error + Send + Sync>;
pub type BenchResult<T> = Result<T, BenchError>;

const USAGE: &str = "\
Usage: cocos-manager-bench <scale|latency|spawn-ratio|guest> [OPTIONS]

Starts its own cocos-manager (private state directory under /tmp, private
ports), drives it over gRPC, prints a report and then one JSON line with
every figure. Exits 1 on any correctness failure (a failed request, a VM
missing after re-adoption, leftovers), 2 on a usage error. Nothing it
started outlives it.

Subcommands:
  scale   N VMs on the stand-in QEMU, created by C concurrent clients:
          CreateVm latency and rate, daemon RSS with 0 and N VMs, idle CPU
          with N VMs, re-adoption after SIGKILL, RemoveVm latency, leftovers.
  latency CVMInfo p50/p99 of an existing VM, asked by a prober on its own
          connection at a fixed pace, on the idle manager (the baseline) and
          (a) while C clients create and remove VMs as fast as they can,
          (b) while one guest writes its serial console at --console-spam
          bytes/s (stand-in QEMU); reports loaded/idle ratios. Each scenario
          starts its own manager and alternates R idle and R loaded windows.
  spawn-ratio
          N CreateVm by C clients through the manager (m), against the bench
          spawning the same N stand-ins itself with the manager's command
          line, C at a time, each waited for as the manager does (QMP
          running, port bound) (b); R rounds, alternating which goes first.
          Reports the create rate as a ratio to (b): wall(b) / wall(m).
  guest   Real QEMU and the dev guest (no KVM): per round, (a) CreateVm until
          the agent answers GET /health, then RemoveVm, and (b) the command
          line of `cocos-manager --print-qemu-cmd` run by hand until the
          agent answers; (a) and (b) alternate. Reports the overhead a - b.

Common options:
  --manager PATH       cocos-manager binary   [<bench binary dir>/cocos-manager]
  --config FILE        manager configuration  [<repo>/config/dev.toml]
  --repo DIR           repository root, the manager's working directory
                       [the workspace this bench was built from]
  --qemu PATH          QEMU binary for the VMs
                       [scale, latency, spawn-ratio: <bench binary dir>/qemu-stand-in;
                        guest: qemu-system-x86_64]
  --start-timeout S    longest wait for the manager to serve, seconds   [300]
  --rpc-timeout S      longest wait for one gRPC request, seconds      [120]
  --json               print only the JSON line
  --keep               keep the workspace (state, logs) under /tmp
                       (BENCH_WORKSPACE_ROOT=/dev/shm puts it on tmpfs instead)
  -h, --help

scale options:
  -n, --vms N          VMs to create                   [1000]
  -c, --clients C      concurrent gRPC clients         [32]
  --idle-window S      idle CPU window, seconds        [10]

latency options:
  -c, --clients C      clients creating and removing   [32]
  -r, --rounds R       idle/loaded window pairs        [5]
  --window S           length of each probe window, s  [2]
  --probe-interval S   one CVMInfo per interval, s     [0.01]
  --console-spam B     console bytes/s of the flooding guest [50000000]

spawn-ratio options:
  -n, --vms N          VMs per round, each way         [200]
  -c, --clients C      at a time, each way             [32]
  -r, --rounds R       rounds of (m) and (b)           [5]

guest options:
  -r, --rounds R       rounds of (a) and (b)           [3]
  --guest-dir DIR      holds bzImage and rootfs.cpio.gz [<repo>/target/dev-guest]
  --agent-timeout S    longest wait for the agent, seconds [180]

Examples:
  cargo run --release -p cocos-manager-bench -- scale -n 1000 -c 32
  cargo run --release -p cocos-manager-bench -- latency -c 32 -r 5
  cargo run --release -p cocos-manager-bench -- spawn-ratio -n 200 -c 32 -r 5
  cargo run --release -p cocos-manager-bench -- guest -r 3";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bench {
    Scale,
    Latency,
    SpawnRatio,
    Guest,
}

impl Bench {
    fn name(self) -> &'static str {
        match self {
            Bench::Scale => "scale",
            Bench::Latency => "latency",
            Bench::SpawnRatio => "spawn-ratio",
            Bench::Guest => "guest",
        }
    }

    fn from_name(name: &str) -> Option<Bench> {
        [
            Bench::Scale,
            Bench::Latency,
            Bench::SpawnRatio,
            Bench::Guest,
        ]
        .into_iter()
        .find(|b| b.name() == name)
    }
}

#[derive(Debug)]
struct Args {
    bench: Bench,
    manager: Option<PathBuf>,
    config: Option<PathBuf>,
    repo: Option<PathBuf>,
    qemu: Option<PathBuf>,
    start_timeout: Duration,
    rpc_timeout: Duration,
    json_only: bool,
    keep: bool,
    /// `None`: the benchmark's default (scale 1000, spawn-ratio 200).
    vms: Option<usize>,
    clients: usize,
    idle_window: Duration,
    /// `None`: the benchmark's default (guest 3, others 5).
    rounds: Option<usize>,
    guest_dir: Option<PathBuf>,
    agent_timeout: Duration,
    window: Duration,
    probe_interval: Duration,
    console_spam: u64,
}

impl Args {
    fn vms(&self) -> usize {
        self.vms.unwrap_or(match self.bench {
            Bench::SpawnRatio => 200,
            _ => 1000,
        })
    }

    fn rounds(&self) -> usize {
        self.rounds.unwrap_or(match self.bench {
            Bench::Guest => 3,
            _ => 5,
        })
    }
}

fn parse_count(flag: &str, value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!(
            "{flag} needs a positive whole number, not {value:?}"
        )),
    }
}

fn parse_secs(flag: &str, value: &str) -> Result<Duration, String> {
    match value.parse::<f64>() {
        Ok(s) if s.is_finite() && s > 0.0 && s < 1e9 => Ok(Duration::from_secs_f64(s)),
        _ => Err(format!(
            "{flag} needs a positive number of seconds, not {value:?}"
        )),
    }
}

/// `None` for --help.
fn parse_args(argv: impl IntoIterator<Item = String>) -> Result<Option<Args>, String> {
    let mut bench = None;
    let mut args = Args {
        bench: Bench::Scale,
        manager: None,
        config: None,
        repo: None,
        qemu: None,
        start_timeout: Duration::from_secs(300),
        rpc_timeout: Duration::from_secs(120),
        json_only: false,
        keep: false,
        vms: None,
        clients: 32,
        idle_window: Duration::from_secs(10),
        rounds: None,
        guest_dir: None,
        agent_timeout: Duration::from_secs(180),
        window: Duration::from_secs(2),
        probe_interval: Duration::from_millis(10),
        console_spam: 50_000_000,
    };
    // Each benchmark-specific flag given, with the benchmarks it belongs to.
    let mut specific: Vec<(String, &[Bench])> = Vec::new();
    const SCALE_RATIO: &[Bench] = &[Bench::Scale, Bench::SpawnRatio];
    const CLIENTS: &[Bench] = &[Bench::Scale, Bench::Latency, Bench::SpawnRatio];
    const ROUNDS: &[Bench] = &[Bench::Guest, Bench::SpawnRatio, Bench::Latency];
    let mut iter = argv.into_iter();
    while let Some(arg) = iter.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = || -> Result<String, String> {
            match &inline {
                Some(v) => Ok(v.clone()),
                None => iter.next().ok_or(format!("{flag} needs a value")),
            }
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            name if bench.is_none() && Bench::from_name(name).is_some() => {
                bench = Bench::from_name(name);
            }
            "--manager" => args.manager = Some(value()?.into()),
            "--config" => args.config = Some(value()?.into()),
            "--repo" => args.repo = Some(value()?.into()),
            "--qemu" => args.qemu = Some(value()?.into()),
            "--start-timeout" => args.start_timeout = parse_secs(&flag, &value()?)?,
            "--rpc-timeout" => args.rpc_timeout = parse_secs(&flag, &value()?)?,
            "--json" => args.json_only = true,
            "--keep" => args.keep = true,
            "-n" | "--vms" => {
                args.vms = Some(parse_count(&flag, &value()?)?);
                specific.push((flag, SCALE_RATIO));
            }
            "-c" | "--clients" => {
                args.clients = parse_count(&flag, &value()?)?;
                specific.push((flag, CLIENTS));
            }
            "--idle-window" => {
                args.idle_window = parse_secs(&flag, &value()?)?;
                specific.push((flag, &[Bench::Scale]));
            }
            "--window" => {
                args.window = parse_secs(&flag, &value()?)?;
                specific.push((flag, &[Bench::Latency]));
            }
            "--probe-interval" => {
                args.probe_interval = parse_secs(&flag, &value()?)?;
                specific.push((flag, &[Bench::Latency]));
            }
            "--console-spam" => {
                args.console_spam = parse_count(&flag, &value()?)? as u64;
                specific.push((flag, &[Bench::Latency]));
            }
            "-r" | "--rounds" => {
                args.rounds = Some(parse_count(&flag, &value()?)?);
                specific.push((flag, ROUNDS));
            }
            "--guest-dir" => {
                args.guest_dir = Some(value()?.into());
                specific.push((flag, &[Bench::Guest]));
            }
            "--agent-timeout" => {
                args.agent_timeout = parse_secs(&flag, &value()?)?;
                specific.push((flag, &[Bench::Guest]));
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    args.bench = bench.ok_or("name a benchmark: scale, latency, spawn-ratio or guest")?;
    if let Some((flag, of)) = specific.iter().find(|(_, of)| !of.contains(&args.bench)) {
        let names: Vec<String> = of.iter().map(|b| format!("`{}`", b.name())).collect();
        return Err(format!(
            "{flag} is an option of {} only",
            names.join(" and ")
        ));
    }
    let port_limit = match args.bench {
        // The baseline takes as many ports again.
        Bench::SpawnRatio => usize::from(u16::MAX) / 2,
        _ => usize::from(u16::MAX),
    };
    if args.vms() > port_limit {
        return Err(format!("--vms {} is more than there are ports", args.vms()));
    }
    if args.bench == Bench::Latency && args.clients > 1000 {
        return Err(format!("--clients {} is more than 1000", args.clients));
    }
    Ok(Some(args))
}

/// Defaults: the manager and the stand-in next to this binary, the
/// repository this crate lives in.
fn resolve_paths(args: &Args) -> BenchResult<Paths> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let bin_dir = exe
        .parent()
        .ok_or("this binary has no parent directory")?
        .to_path_buf();
    let repo_root = match &args.repo {
        Some(dir) => dir.clone(),
        None => {
            let built_from = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
            if built_from.join("config").is_dir() {
                built_from
            } else {
                std::env::current_dir()?
            }
        }
    };
    let repo_root = repo_root
        .canonicalize()
        .map_err(|e| format!("repository root {}: {e}", repo_root.display()))?;
    let manager_bin = args
        .manager
        .clone()
        .unwrap_or_else(|| bin_dir.join("cocos-manager"));
    if !manager_bin.is_file() {
        return Err(format!(
            "{} is missing: cargo build --release -p cocos-manager",
            manager_bin.display()
        )
        .into());
    }
    let config_file = args
        .config
        .clone()
        .unwrap_or_else(|| repo_root.join("config/dev.toml"));
    let config_file = config_file
        .canonicalize()
        .map_err(|e| format!("configuration {}: {e}", config_file.display()))?;
    Ok(Paths {
        repo_root,
        manager_bin,
        config_file,
        bin_dir,
    })
}

/// The report of either benchmark.
enum Report {
    Scale(Box<scale::ScaleReport>),
    Latency(Box<latency::LatencyReport>),
    SpawnRatio(Box<spawn_ratio::RatioReport>),
    Guest(guest::GuestReport),
}

impl Report {
    fn ok(&self) -> bool {
        match self {
            Report::Scale(r) => r.failures.is_empty(),
            Report::Latency(r) => r.failures.is_empty(),
            Report::SpawnRatio(r) => r.failures.is_empty(),
            Report::Guest(r) => r.failures.is_empty(),
        }
    }

    fn print(&self) {
        match self {
            Report::Scale(r) => r.print(),
            Report::Latency(r) => r.print(),
            Report::SpawnRatio(r) => r.print(),
            Report::Guest(r) => r.print(),
        }
    }

    fn json(&self) -> serde_json::Value {
        match self {
            Report::Scale(r) => r.json(),
            Report::Latency(r) => r.json(),
            Report::SpawnRatio(r) => r.json(),
            Report::Guest(r) => r.json(),
        }
    }
}

/// The stand-in QEMU: --qemu, or next to this binary.
fn stand_in(args: &Args, paths: &Paths) -> BenchResult<PathBuf> {
    let qemu_bin = args
        .qemu
        .clone()
        .unwrap_or_else(|| paths.bin_dir.join("qemu-stand-in"));
    if qemu_bin.components().count() > 1 && !qemu_bin.is_file() {
        return Err(format!(
            "{} is missing: cargo build --release -p qemu-stand-in",
            qemu_bin.display()
        )
        .into());
    }
    Ok(qemu_bin)
}

async fn run(args: &Args, paths: &Paths) -> BenchResult<Report> {
    match args.bench {
        Bench::Scale => {
            let qemu_bin = stand_in(args, paths)?;
            let opts = scale::ScaleOpts {
                vms: args.vms(),
                clients: args.clients,
                idle_window: args.idle_window,
                qemu_bin,
                start_timeout: args.start_timeout,
                rpc_timeout: args.rpc_timeout,
                keep: args.keep,
            };
            Ok(Report::Scale(Box::new(scale::run(&opts, paths).await)))
        }
        Bench::Latency => {
            let opts = latency::LatencyOpts {
                clients: args.clients,
                rounds: args.rounds(),
                window: args.window,
                probe_interval: args.probe_interval,
                console_spam: args.console_spam,
                qemu_bin: stand_in(args, paths)?,
                start_timeout: args.start_timeout,
                rpc_timeout: args.rpc_timeout,
                keep: args.keep,
            };
            Ok(Report::Latency(Box::new(latency::run(&opts, paths).await)))
        }
        Bench::SpawnRatio => {
            let opts = spawn_ratio::RatioOpts {
                vms: args.vms(),
                clients: args.clients,
                rounds: args.rounds(),
                qemu_bin: stand_in(args, paths)?,
                start_timeout: args.start_timeout,
                rpc_timeout: args.rpc_timeout,
                keep: args.keep,
            };
            Ok(Report::SpawnRatio(Box::new(
                spawn_ratio::run(&opts, paths).await,
            )))
        }
        Bench::Guest => {
            let opts = guest::GuestOpts {
                rounds: args.rounds(),
                qemu_bin: args
                    .qemu
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64")),
                guest_dir: args
                    .guest_dir
                    .clone()
                    .unwrap_or_else(|| paths.repo_root.join("target/dev-guest")),
                agent_timeout: args.agent_timeout,
                start_timeout: args.start_timeout,
                rpc_timeout: args.rpc_timeout,
                keep: args.keep,
            };
            Ok(Report::Guest(guest::run(&opts, paths).await))
        }
    }
}

/// Resolves on SIGINT or SIGTERM with the signal's name. Dropping the
/// running benchmark then runs its guards: the manager is killed and every
/// VM it started too.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        },
        _ => std::future::pending().await,
    }
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("cocos-manager-bench: {e}\n(see cocos-manager-bench --help)");
            return ExitCode::from(2);
        }
    };
    let paths = match resolve_paths(&args) {
        Ok(paths) => paths,
        Err(e) => {
            eprintln!("cocos-manager-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cocos-manager-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        tokio::select! {
            report = run(&args, &paths) => report,
            signal = interrupted() => Err(format!("interrupted by {signal}; cleaned up").into()),
        }
    });
    drop(runtime);
    match outcome {
        Ok(report) => {
            if !args.json_only {
                report.print();
            }
            println!("{}", report.json());
            if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("cocos-manager-bench: {e}");
            let json = serde_json::json!({ "ok": false, "failures": [e.to_string()] });
            println!("{json}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<Option<Args>, String> {
        parse_args(line.split_whitespace().map(String::from))
    }

    #[test]
    fn defaults_and_flags() {
        let args = parse("scale").expect("ok").expect("args");
        assert_eq!(
            (args.bench, args.vms(), args.clients),
            (Bench::Scale, 1000, 32)
        );
        let args = parse("scale -n 3 -c 2 --idle-window=2.5 --json")
            .expect("ok")
            .expect("args");
        assert_eq!((args.vms(), args.clients), (3, 2));
        assert_eq!(args.idle_window, Duration::from_millis(2500));
        assert!(args.json_only);
        let args = parse("--keep guest -r 1").expect("ok").expect("args");
        assert_eq!(
            (args.bench, args.rounds(), args.keep),
            (Bench::Guest, 1, true)
        );
    }

    #[test]
    fn latency_and_spawn_ratio() {
        let args = parse("latency").expect("ok").expect("args");
        assert_eq!(args.bench, Bench::Latency);
        assert_eq!((args.clients, args.rounds()), (32, 5));
        assert_eq!(
            (args.window, args.probe_interval, args.console_spam),
            (
                Duration::from_secs(2),
                Duration::from_millis(10),
                50_000_000
            )
        );
        let args = parse("latency -c 8 -r 2 --window 3 --probe-interval=0.005 --console-spam 1000")
            .expect("ok")
            .expect("args");
        assert_eq!((args.clients, args.rounds()), (8, 2));
        assert_eq!(
            (args.window, args.probe_interval, args.console_spam),
            (Duration::from_secs(3), Duration::from_millis(5), 1000)
        );
        let args = parse("spawn-ratio").expect("ok").expect("args");
        assert_eq!(
            (args.bench, args.vms(), args.clients, args.rounds()),
            (Bench::SpawnRatio, 200, 32, 5)
        );
        let args = parse("spawn-ratio -n 50 -c 4 -r 1")
            .expect("ok")
            .expect("args");
        assert_eq!((args.vms(), args.clients, args.rounds()), (50, 4, 1));
    }

    #[test]
    fn bad_usage() {
        assert!(parse("").is_err());
        assert!(parse("scale -n").is_err());
        assert!(parse("scale -n 0").is_err());
        assert!(parse("scale -n x").is_err());
        assert!(parse("scale -r 2").is_err());
        assert!(parse("guest -c 2").is_err());
        assert!(parse("scale --frobnicate").is_err());
        assert!(parse("scale guest").is_err());
        assert!(parse("latency -n 5").is_err());
        assert!(parse("scale --window 2").is_err());
        assert!(parse("spawn-ratio --console-spam 5").is_err());
        assert!(parse("spawn-ratio -n 40000").is_err());
        assert!(parse("latency --probe-interval 0").is_err());
        assert!(parse("scale --help").expect("ok").is_none());
    }
}
