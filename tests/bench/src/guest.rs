//! `guest`: the manager's overhead on a real boot. Each round times
//! (a) CreateVm through the manager until the guest agent answers, and
//! (b) the very same QEMU command line run by hand until the agent answers;
//! the two alternate so that drift and noise hit both alike.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cocos_core::guest::validate_create;
use cocos_core::proto::{CreateReq, RemoveReq};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::daemon::{self, Client, Daemon, DaemonSpec, Paths, Workspace};
use crate::stats::{median, ms, round3};
use crate::{procfs, shell, BenchResult};

/// The VM id `--print-qemu-cmd` uses.
pub(crate) const PLACEHOLDER_ID: &str = "00000000-0000-4000-8000-000000000000";
const POLL_EVERY: Duration = Duration::from_millis(50);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(250);
const READ_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct GuestOpts {
    pub rounds: usize,
    pub qemu_bin: PathBuf,
    /// Holds bzImage and rootfs.cpio.gz.
    pub guest_dir: PathBuf,
    pub agent_timeout: Duration,
    pub start_timeout: Duration,
    pub rpc_timeout: Duration,
    pub keep: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct Round {
    /// CreateVm sent → agent answered `ok`.
    pub managed: Duration,
    /// CreateVm sent → CreateVm answered.
    pub create: Duration,
    pub remove: Duration,
    /// QEMU spawned by hand → agent answered `ok`.
    pub hand: Duration,
    /// Which ran first.
    pub managed_first: bool,
}

impl Round {
    fn overhead_ms(&self) -> f64 {
        ms(self.managed) - ms(self.hand)
    }
}

#[derive(Debug, Default)]
pub struct GuestReport {
    pub rounds_wanted: usize,
    pub qemu_bin: String,
    pub argv_len: Option<usize>,
    pub rounds: Vec<Round>,
    pub failures: Vec<String>,
}

impl GuestReport {
    fn medians(&self) -> (Option<f64>, Option<f64>, Option<f64>, Option<f64>) {
        let of = |f: fn(&Round) -> f64| median(&self.rounds.iter().map(f).collect::<Vec<_>>());
        (
            of(|r| ms(r.managed)),
            of(|r| ms(r.hand)),
            of(Round::overhead_ms),
            of(|r| ms(r.create)),
        )
    }

    pub fn print(&self) {
        let opt = |v: Option<f64>| v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.0} ms"));
        println!("== cocos-manager guest benchmark (real QEMU, dev guest, no KVM) ==");
        println!(
            "QEMU: {}; rounds: {}/{}",
            self.qemu_bin,
            self.rounds.len(),
            self.rounds_wanted
        );
        println!(
            "{:>5}  {:>13}  {:>10}  {:>10}  {:>12}  {:>11}  first",
            "round", "(a) manager", "create", "remove", "(b) by hand", "a - b"
        );
        for (i, r) in self.rounds.iter().enumerate() {
            println!(
                "{:>5}  {:>10.0} ms  {:>7.0} ms  {:>7.0} ms  {:>9.0} ms  {:>8.0} ms  {}",
                i + 1,
                ms(r.managed),
                ms(r.create),
                ms(r.remove),
                ms(r.hand),
                r.overhead_ms(),
                if r.managed_first { "a" } else { "b" }
            );
        }
        let (managed, hand, overhead, create) = self.medians();
        println!(
            "median: (a) {} (CreateVm answered after {}), (b) {}, overhead (a - b) {}",
            opt(managed),
            opt(create),
            opt(hand),
            opt(overhead)
        );
        crate::stats::print_verdict(&self.failures);
    }

    pub fn json(&self) -> serde_json::Value {
        let (managed, hand, overhead, create) = self.medians();
        let rounds: Vec<_> = self
            .rounds
            .iter()
            .map(|r| {
                json!({
                    "managed_ms": round3(ms(r.managed)),
                    "create_ms": round3(ms(r.create)),
                    "remove_ms": round3(ms(r.remove)),
                    "hand_ms": round3(ms(r.hand)),
                    "overhead_ms": round3(r.overhead_ms()),
                    "first": if r.managed_first { "managed" } else { "hand" },
                })
            })
            .collect();
        json!({
            "bench": "guest",
            "ok": self.failures.is_empty(),
            "qemu_bin": self.qemu_bin,
            "rounds_wanted": self.rounds_wanted,
            "rounds": rounds,
            "median": {
                "managed_ms": managed.map(round3),
                "hand_ms": hand.map(round3),
                "overhead_ms": overhead.map(round3),
                "create_ms": create.map(round3),
            },
            "failures": self.failures,
        })
    }
}

pub async fn run(opts: &GuestOpts, paths: &Paths) -> GuestReport {
    let mut report = GuestReport {
        rounds_wanted: opts.rounds,
        qemu_bin: opts.qemu_bin.display().to_string(),
        ..GuestReport::default()
    };
    let ws = match Workspace::create(opts.keep) {
        Ok(ws) => ws,
        Err(e) => {
            report.failures.push(format!("aborted: {e}"));
            return report;
        }
    };
    if let Err(e) = rounds(opts, paths, &ws, &mut report).await {
        report.failures.push(format!("aborted: {e}"));
    }
    report
}

async fn rounds(
    opts: &GuestOpts,
    paths: &Paths,
    ws: &Workspace,
    report: &mut GuestReport,
) -> BenchResult<()> {
    let kernel = opts.guest_dir.join("bzImage");
    let rootfs = opts.guest_dir.join("rootfs.cpio.gz");
    for file in [&kernel, &rootfs] {
        if !file.is_file() {
            return Err(format!(
                "{} is missing: run packaging/dev-guest/build.sh",
                file.display()
            )
            .into());
        }
    }
    let range = daemon::free_port_range(4)?;
    let mut spec = DaemonSpec::new(paths, ws)?;
    spec.set("MANAGER_QEMU_BIN_PATH", opts.qemu_bin.to_string_lossy());
    spec.set(
        "MANAGER_QEMU_HOST_FWD_RANGE",
        format!("{}-{}", range.0, range.1),
    );
    spec.set("MANAGER_QEMU_ENABLE_KVM", "false");
    // The baseline runs QEMU alone: no swtpm on either side.
    spec.set("MANAGER_QEMU_VTPM", "none");
    spec.set(
        "MANAGER_QEMU_DISK_IMG_KERNEL_FILE",
        kernel.to_string_lossy(),
    );
    spec.set(
        "MANAGER_QEMU_DISK_IMG_ROOTFS_FILE",
        rootfs.to_string_lossy(),
    );
    spec.set("MANAGER_STOP_POWERDOWN_TIMEOUT", "2s");

    // The by-hand runs get their own state directory (same length), so the
    // manager never sees their folder.
    let hand_state = ws.path().join("hand");
    let hand_port = daemon::free_port()?;
    let argv = print_qemu_cmd(&spec, &hand_state, hand_port)?;
    report.argv_len = Some(argv.len());
    let hand_dir = hand_state.join("vms").join(PLACEHOLDER_ID);
    let ovmf_vars_template = spec
        .env
        .get("MANAGER_QEMU_OVMF_VARS_FILE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/share/OVMF/OVMF_VARS.fd"));

    eprintln!(
        "starting cocos-manager (state {})",
        ws.state_dir().display()
    );
    let mut manager = Daemon::spawn(&spec)?;
    manager.wait_serving(opts.start_timeout).await?;
    let mut client = daemon::connect(spec.grpc_port).await?;

    for round in 0..opts.rounds {
        let managed_first = round % 2 == 0;
        let mut managed = None;
        let mut hand = None;
        for step in 0..2 {
            if (step == 0) == managed_first {
                eprintln!("round {}: (a) through the manager", round + 1);
                managed = Some(via_manager(&mut client, opts).await?);
            } else {
                eprintln!("round {}: (b) by hand on port {hand_port}", round + 1);
                let vm = HandVm::prepare(&hand_dir, &ovmf_vars_template)?;
                hand = Some(vm.run(&argv, paths, hand_port, opts.agent_timeout).await?);
            }
        }
        if let (Some((managed, create, remove)), Some(hand)) = (managed, hand) {
            report.rounds.push(Round {
                managed,
                create,
                remove,
                hand,
                managed_first,
            });
        }
    }
    drop(client);

    let status = manager.terminate(Duration::from_secs(30)).await?;
    if !status.success() {
        report
            .failures
            .push(format!("cocos-manager exited with {status} after SIGTERM"));
    }
    for vms in [ws.state_dir().join("vms"), hand_state.join("vms")] {
        let folders = fs::read_dir(&vms).map(|d| d.count()).unwrap_or(0);
        if folders > 0 {
            report
                .failures
                .push(format!("{folders} VM folders left in {}", vms.display()));
        }
    }
    let left = ws.processes();
    if !left.is_empty() {
        report
            .failures
            .push(format!("VM processes left running: {left:?}"));
    }
    Ok(())
}

/// The manager's own QEMU command line for the placeholder VM, split.
pub(crate) fn print_qemu_cmd(
    spec: &DaemonSpec,
    state_dir: &Path,
    port: u16,
) -> BenchResult<Vec<String>> {
    let output = spec
        .command()
        .arg("--print-qemu-cmd")
        .env("MANAGER_STATE_DIR", state_dir)
        .env("MANAGER_QEMU_HOST_FWD_AGENT", port.to_string())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", spec.paths.manager_bin.display()))?;
    if !output.status.success() {
        return Err(format!(
            "cocos-manager --print-qemu-cmd failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )
        .into());
    }
    let text = String::from_utf8(output.stdout)
        .map_err(|e| format!("--print-qemu-cmd printed non-UTF-8: {e}"))?;
    let argv = shell::split(text.trim())?;
    let dir = state_dir.join("vms").join(PLACEHOLDER_ID);
    if !argv.iter().any(|a| a.contains(&*dir.to_string_lossy())) {
        return Err(format!(
            "--print-qemu-cmd does not mention {}: {text}",
            dir.display()
        )
        .into());
    }
    if !argv.iter().any(|a| a.contains(&format!(":{port}-:"))) {
        return Err(format!("--print-qemu-cmd does not forward port {port}: {text}").into());
    }
    Ok(argv)
}

/// (a): CreateVm, wait for the agent, RemoveVm. Returns (create → agent ok,
/// create → CreateVm answer, RemoveVm latency).
async fn via_manager(
    client: &mut Client,
    opts: &GuestOpts,
) -> BenchResult<(Duration, Duration, Duration)> {
    let req = CreateReq {
        agent_log_level: "info".to_string(),
        ..CreateReq::default()
    };
    let t0 = Instant::now();
    let res = tokio::time::timeout(opts.rpc_timeout, client.create_vm(req))
        .await
        .map_err(|_| "CreateVm: no answer in time")?
        .map_err(|s| format!("CreateVm failed: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    let create = t0.elapsed();
    let port: u16 = res
        .forwarded_port
        .parse()
        .map_err(|e| format!("bad forwarded_port {:?}: {e}", res.forwarded_port))?;
    let waited = wait_agent(port, t0, opts.agent_timeout, || Ok(())).await;
    let t1 = Instant::now();
    let removed = tokio::time::timeout(
        opts.rpc_timeout,
        client.remove_vm(RemoveReq {
            cvm_id: res.cvm_id.clone(),
        }),
    )
    .await;
    let remove = t1.elapsed();
    let managed = waited?;
    removed
        .map_err(|_| "RemoveVm: no answer in time")?
        .map_err(|s| {
            format!(
                "RemoveVm {} failed: {:?}: {}",
                res.cvm_id,
                s.code(),
                s.message()
            )
        })?;
    Ok((managed, create, remove))
}

/// Polls `GET /health` every 50 ms until the agent answers `ok`; returns the
/// time since `t0`. `alive` is checked between probes.
async fn wait_agent(
    port: u16,
    t0: Instant,
    limit: Duration,
    mut alive: impl FnMut() -> BenchResult<()>,
) -> BenchResult<Duration> {
    let deadline = t0 + limit;
    loop {
        if health_ok(port).await {
            return Ok(t0.elapsed());
        }
        alive()?;
        if Instant::now() >= deadline {
            return Err(format!("the agent on port {port} did not answer within {limit:?}").into());
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// One probe. The forwarded port accepts TCP at once (QEMU's user network
/// holds it); only the agent itself answers `ok`.
async fn health_ok(port: u16) -> bool {
    let probe = async {
        let mut stream =
            tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(("127.0.0.1", port)))
                .await
                .ok()?
                .ok()?;
        let request = b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n";
        let mut response = Vec::new();
        tokio::time::timeout(READ_TIMEOUT, async {
            stream.write_all(request).await?;
            stream.read_to_end(&mut response).await
        })
        .await
        .ok()?
        .ok()?;
        Some(response)
    };
    probe.await.is_some_and(|r| is_ok_response(&r))
}

fn is_ok_response(response: &[u8]) -> bool {
    let text = String::from_utf8_lossy(response);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    let status = head.split_whitespace().nth(1);
    status == Some("200") && body.trim() == "ok"
}

/// (b): the placeholder VM's folder and its QEMU, run by hand. Dropping it
/// kills QEMU and removes the folder.
struct HandVm {
    dir: PathBuf,
    child: Option<Child>,
}

impl HandVm {
    /// What the manager makes before starting QEMU: the folder, the shares
    /// (the environment file as the manager writes it) and the vars copy.
    fn prepare(dir: &Path, ovmf_vars_template: &Path) -> BenchResult<HandVm> {
        let _ = fs::remove_dir_all(dir);
        let mkdir = |path: &Path| -> io::Result<()> {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(path)
        };
        let vm = HandVm {
            dir: dir.to_path_buf(),
            child: None,
        };
        mkdir(&dir.join("certs"))?;
        mkdir(&dir.join("env"))?;
        let req = CreateReq {
            agent_log_level: "info".to_string(),
            ..CreateReq::default()
        };
        let create = validate_create(&req).map_err(|e| e.to_string())?;
        fs::write(
            dir.join("env").join("environment"),
            create.environment_file(PLACEHOLDER_ID),
        )?;
        fs::copy(ovmf_vars_template, dir.join("OVMF_VARS.fd"))
            .map_err(|e| format!("cannot copy {}: {e}", ovmf_vars_template.display()))?;
        Ok(vm)
    }

    /// Spawns `argv` (as the manager would: own process group, output to
    /// qemu.log) and times it until the agent answers; then stops it.
    async fn run(
        mut self,
        argv: &[String],
        paths: &Paths,
        port: u16,
        limit: Duration,
    ) -> BenchResult<Duration> {
        let (program, args) = argv.split_first().ok_or("empty QEMU command line")?;
        let log_path = self.dir.join("qemu.log");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let t0 = Instant::now();
        let child = Command::new(program)
            .args(args)
            .current_dir(&paths.repo_root)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start {program}: {e}"))?;
        self.child = Some(child);
        let took = wait_agent(port, t0, limit, || self.check_alive(&log_path)).await?;
        self.stop().await?;
        Ok(took)
    }

    fn check_alive(&mut self, log_path: &Path) -> BenchResult<()> {
        if let Some(child) = self.child.as_mut() {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                let log = fs::read_to_string(log_path).unwrap_or_default();
                return Err(
                    format!("QEMU run by hand exited early ({status}): {}", log.trim()).into(),
                );
            }
        }
        Ok(())
    }

    /// SIGTERM, wait (SIGKILL after 10 s).
    async fn stop(&mut self) -> BenchResult<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        procfs::signal(child.id(), libc::SIGTERM)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        child.kill()?;
        child.wait()?;
        Err("QEMU run by hand ignored SIGTERM for 10 s; killed".into())
    }
}

impl Drop for HandVm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::is_ok_response;

    #[test]
    fn only_200_ok_counts() {
        assert!(is_ok_response(
            b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"
        ));
        assert!(is_ok_response(b"HTTP/1.1 200 OK\r\n\r\nok\n"));
        assert!(!is_ok_response(
            b"HTTP/1.1 503 Service Unavailable\r\n\r\nok"
        ));
        assert!(!is_ok_response(b"HTTP/1.1 200 OK\r\n\r\nstarting"));
        assert!(!is_ok_response(b""));
    }
}
