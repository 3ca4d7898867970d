//! `cocos-manager-bench`: starts its own `cocos-manager`, drives it over
//! real gRPC and reports latency, throughput, memory, CPU, re-adoption time
//! (`scale`, on the stand-in QEMU) or the manager's overhead on a real boot
//! (`guest`). Prints a human-readable report, then one JSON line.

mod daemon;
mod guest;
mod pool;
mod procfs;
mod scale;
mod shell;
mod stats;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use daemon::Paths;

pub type BenchError = Box<dyn std::error::Error + Send + Sync>;
pub type BenchResult<T> = Result<T, BenchError>;

const USAGE: &str = "\
Usage: cocos-manager-bench <scale|guest> [OPTIONS]

Starts its own cocos-manager (private state directory under /tmp, private
ports), drives it over gRPC, prints a report and then one JSON line with
every figure. Exits 1 on any correctness failure (a failed request, a VM
missing after re-adoption, leftovers), 2 on a usage error. Nothing it
started outlives it.

Subcommands:
  scale   N VMs on the stand-in QEMU, created by C concurrent clients:
          CreateVm latency and rate, daemon RSS with 0 and N VMs, idle CPU
          with N VMs, re-adoption after SIGKILL, RemoveVm latency, leftovers.
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
                       [scale: <bench binary dir>/qemu-stand-in; guest: qemu-system-x86_64]
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

guest options:
  -r, --rounds R       rounds of (a) and (b)           [3]
  --guest-dir DIR      holds bzImage and rootfs.cpio.gz [<repo>/target/dev-guest]
  --agent-timeout S    longest wait for the agent, seconds [180]

Examples:
  cargo run --release -p cocos-manager-bench -- scale -n 1000 -c 32
  cargo run --release -p cocos-manager-bench -- guest -r 3";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bench {
    Scale,
    Guest,
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
    vms: usize,
    clients: usize,
    idle_window: Duration,
    rounds: usize,
    guest_dir: Option<PathBuf>,
    agent_timeout: Duration,
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
        vms: 1000,
        clients: 32,
        idle_window: Duration::from_secs(10),
        rounds: 3,
        guest_dir: None,
        agent_timeout: Duration::from_secs(180),
    };
    let mut scale_only = Vec::new();
    let mut guest_only = Vec::new();
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
            "scale" | "guest" if bench.is_none() => {
                bench = Some(if flag == "scale" {
                    Bench::Scale
                } else {
                    Bench::Guest
                });
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
                args.vms = parse_count(&flag, &value()?)?;
                scale_only.push(flag);
            }
            "-c" | "--clients" => {
                args.clients = parse_count(&flag, &value()?)?;
                scale_only.push(flag);
            }
            "--idle-window" => {
                args.idle_window = parse_secs(&flag, &value()?)?;
                scale_only.push(flag);
            }
            "-r" | "--rounds" => {
                args.rounds = parse_count(&flag, &value()?)?;
                guest_only.push(flag);
            }
            "--guest-dir" => {
                args.guest_dir = Some(value()?.into());
                guest_only.push(flag);
            }
            "--agent-timeout" => {
                args.agent_timeout = parse_secs(&flag, &value()?)?;
                guest_only.push(flag);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    args.bench = bench.ok_or("name a benchmark: scale or guest")?;
    let wrong = match args.bench {
        Bench::Scale => guest_only.first().map(|f| (f, "guest")),
        Bench::Guest => scale_only.first().map(|f| (f, "scale")),
    };
    if let Some((flag, only)) = wrong {
        return Err(format!("{flag} is an option of `{only}` only"));
    }
    if args.vms > usize::from(u16::MAX) {
        return Err(format!("--vms {} is more than there are ports", args.vms));
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
    Guest(guest::GuestReport),
}

impl Report {
    fn ok(&self) -> bool {
        match self {
            Report::Scale(r) => r.failures.is_empty(),
            Report::Guest(r) => r.failures.is_empty(),
        }
    }

    fn print(&self) {
        match self {
            Report::Scale(r) => r.print(),
            Report::Guest(r) => r.print(),
        }
    }

    fn json(&self) -> serde_json::Value {
        match self {
            Report::Scale(r) => r.json(),
            Report::Guest(r) => r.json(),
        }
    }
}

async fn run(args: &Args, paths: &Paths) -> BenchResult<Report> {
    match args.bench {
        Bench::Scale => {
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
            let opts = scale::ScaleOpts {
                vms: args.vms,
                clients: args.clients,
                idle_window: args.idle_window,
                qemu_bin,
                start_timeout: args.start_timeout,
                rpc_timeout: args.rpc_timeout,
                keep: args.keep,
            };
            Ok(Report::Scale(Box::new(scale::run(&opts, paths).await)))
        }
        Bench::Guest => {
            let opts = guest::GuestOpts {
                rounds: args.rounds,
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
            (args.bench, args.vms, args.clients),
            (Bench::Scale, 1000, 32)
        );
        let args = parse("scale -n 3 -c 2 --idle-window=2.5 --json")
            .expect("ok")
            .expect("args");
        assert_eq!((args.vms, args.clients), (3, 2));
        assert_eq!(args.idle_window, Duration::from_millis(2500));
        assert!(args.json_only);
        let args = parse("--keep guest -r 1").expect("ok").expect("args");
        assert_eq!(
            (args.bench, args.rounds, args.keep),
            (Bench::Guest, 1, true)
        );
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
        assert!(parse("scale --help").expect("ok").is_none());
    }
}
