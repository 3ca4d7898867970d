//! Starting, probing and stopping the real `cocos-manager`, in a private
//! workspace under /tmp that is cleaned up whatever happens.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::net::TcpListener;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use cocos_core::proto::manager_service_client::ManagerServiceClient;
use cocos_core::proto::CvmInfoReq;
use tonic::transport::{Channel, Endpoint};

use crate::procfs;
use crate::BenchResult;

pub type Client = ManagerServiceClient<Channel>;

/// Where the programs and files the bench uses live.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The repository root: the daemon's working directory.
    pub repo_root: PathBuf,
    pub manager_bin: PathBuf,
    pub config_file: PathBuf,
    /// The directory of the bench binary (target/<profile>), where the
    /// stand-in QEMU is looked for.
    pub bin_dir: PathBuf,
}

/// A private directory `/tmp/cocos-bench-<pid>-<n>` holding the state
/// directories and logs. On drop, every process with an argument inside it
/// (VMs left behind by a failure) is SIGKILLed and the directory removed.
pub struct Workspace {
    base: PathBuf,
    keep: bool,
}

impl Workspace {
    pub fn create(keep: bool) -> BenchResult<Workspace> {
        let pid = std::process::id();
        // BENCH_WORKSPACE_ROOT=/dev/shm puts the state directory on tmpfs, to
        // measure the manager without the filesystem's inode allocator.
        let root = std::env::var_os("BENCH_WORKSPACE_ROOT").unwrap_or_else(|| "/tmp".into());
        let root = PathBuf::from(root);
        for n in 0..1000 {
            let base = root.join(format!("cocos-bench-{pid}-{n}"));
            match std::fs::DirBuilder::new().mode(0o700).create(&base) {
                Ok(()) => return Ok(Workspace { base, keep }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(format!("cannot create {}: {e}", base.display()).into()),
            }
        }
        Err(format!("cannot find a free workspace name under {}", root.display()).into())
    }

    pub fn path(&self) -> &Path {
        &self.base
    }

    /// The manager's `MANAGER_STATE_DIR` (short: sockets live below it).
    pub fn state_dir(&self) -> PathBuf {
        self.base.join("state")
    }

    /// Processes that mention this workspace in their arguments.
    pub fn processes(&self) -> Vec<u32> {
        procfs::pids_with_arg_containing(&self.needle())
    }

    /// SIGKILLs every process mentioning this workspace; returns the count.
    pub fn kill_leftovers(&self) -> usize {
        procfs::kill_all_with_arg(&self.needle())
    }

    /// Waits up to `grace` until the manager's state holds no VM folder and
    /// no VM process runs; returns what is left: (folders, processes).
    pub async fn wait_no_vms(&self, grace: Duration) -> (usize, usize) {
        let vms_dir = self.state_dir().join("vms");
        let folders = || {
            std::fs::read_dir(&vms_dir)
                .map(|d| d.flatten().count())
                .unwrap_or(0)
        };
        let deadline = Instant::now() + grace;
        while (folders() > 0 || !self.processes().is_empty()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (folders(), self.processes().len())
    }

    fn needle(&self) -> String {
        // The trailing slash keeps /tmp/cocos-bench-1-1 from matching -11.
        format!("{}/", self.base.display())
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        let killed = self.kill_leftovers();
        if killed > 0 {
            eprintln!("cleanup: killed {killed} leftover process(es)");
            std::thread::sleep(Duration::from_millis(200));
        }
        if self.keep {
            eprintln!("workspace kept: {}", self.base.display());
        } else if let Err(e) = std::fs::remove_dir_all(&self.base) {
            eprintln!("cleanup: cannot remove {}: {e}", self.base.display());
        }
    }
}

/// A TCP port nobody listens on right now (from the ephemeral range).
pub fn free_port() -> BenchResult<u16> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| format!("cannot find a free port: {e}"))?;
    Ok(listener.local_addr()?.port())
}

fn port_is_free(port: u16) -> bool {
    TcpListener::bind(("0.0.0.0", port)).is_ok()
}

/// `n` consecutive free ports below the ephemeral range (32768..), so that
/// the clients' own connections never take one of them.
pub fn free_port_range(n: u16) -> BenchResult<(u16, u16)> {
    const FIRST: u32 = 20000;
    const LAST: u32 = 32767;
    let n = u32::from(n.max(1));
    let mut start = FIRST;
    while start + n - 1 <= LAST {
        match (start..start + n).find(|port| !port_is_free(*port as u16)) {
            Some(taken) => start = taken + 1,
            None => return Ok((start as u16, (start + n - 1) as u16)),
        }
    }
    Err(format!("no {n} consecutive free ports in {FIRST}-{LAST}").into())
}

/// How to start one manager; the same spec restarts it on the same state.
#[derive(Debug, Clone)]
pub struct DaemonSpec {
    pub paths: Paths,
    pub grpc_port: u16,
    /// Every `MANAGER_*` variable the daemon gets (the environment is
    /// otherwise cleared, but for PATH).
    pub env: BTreeMap<String, String>,
    pub log_path: PathBuf,
}

impl DaemonSpec {
    /// The settings every run needs: private state, private ports, quiet logs.
    pub fn new(paths: &Paths, ws: &Workspace) -> BenchResult<DaemonSpec> {
        let grpc_port = free_port()?;
        let http_port = free_port()?;
        let mut env = BTreeMap::new();
        let state_dir = ws.state_dir().to_string_lossy().into_owned();
        for (key, value) in [
            ("MANAGER_STATE_DIR", state_dir.as_str()),
            ("MANAGER_GRPC_HOST", "127.0.0.1"),
            ("MANAGER_GRPC_PORT", &grpc_port.to_string()),
            ("MANAGER_HTTP_HOST", "127.0.0.1"),
            ("MANAGER_HTTP_PORT", &http_port.to_string()),
            ("MANAGER_LOG_LEVEL", "warn"),
        ] {
            env.insert(key.to_string(), value.to_string());
        }
        // The operator's own MANAGER_* settings win (e.g. a log level for profiling).
        env.extend(std::env::vars().filter(|(k, _)| k.starts_with("MANAGER_")));
        Ok(DaemonSpec {
            paths: paths.clone(),
            grpc_port,
            env,
            log_path: ws.path().join("manager.log"),
        })
    }

    pub fn set(&mut self, key: &str, value: impl Into<String>) {
        self.env.insert(key.to_string(), value.into());
    }

    /// The manager binary with this configuration, not yet started.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.paths.manager_bin);
        cmd.arg("--config")
            .arg(&self.paths.config_file)
            .current_dir(&self.paths.repo_root)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(&self.env)
            .stdin(Stdio::null())
            // Its own process group: a Ctrl-C meant for the bench must not
            // reach the manager (the bench's guards stop it and its VMs).
            .process_group(0);
        cmd
    }
}

/// A running manager. Dropping it SIGKILLs it (VMs stay; the workspace
/// guard removes them).
pub struct Daemon {
    child: Option<Child>,
    pid: u32,
    grpc_port: u16,
    log_path: PathBuf,
}

impl Daemon {
    pub fn spawn(spec: &DaemonSpec) -> BenchResult<Daemon> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log_path)
            .map_err(|e| format!("cannot open {}: {e}", spec.log_path.display()))?;
        let child = spec
            .command()
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot start {}: {e} (build it: cargo build --release -p cocos-manager)",
                    spec.paths.manager_bin.display()
                )
            })?;
        Ok(Daemon {
            pid: child.id(),
            child: Some(child),
            grpc_port: spec.grpc_port,
            log_path: spec.log_path.clone(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits until a gRPC request gets an answer from the service (the
    /// daemon serves only after re-adoption), polling every 10 ms.
    pub async fn wait_serving(&mut self, limit: Duration) -> BenchResult<()> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    return Err(format!(
                        "cocos-manager exited at start ({status}); log tail:\n{}",
                        self.log_tail(20)
                    )
                    .into());
                }
            }
            if answers(self.grpc_port).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "cocos-manager did not answer gRPC within {limit:?}; log tail:\n{}",
                    self.log_tail(20)
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) -> BenchResult<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// SIGTERM, then wait up to `limit` for the exit (SIGKILL after that).
    pub async fn terminate(&mut self, limit: Duration) -> BenchResult<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            return Err("cocos-manager is not running".into());
        };
        procfs::signal(self.pid, libc::SIGTERM)?;
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        Err(format!("cocos-manager did not exit within {limit:?} of SIGTERM; killed").into())
    }

    /// The last `n` lines of the daemon's output.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

fn endpoint(port: u16) -> BenchResult<Endpoint> {
    Ok(Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true))
}

/// One client: its own HTTP/2 connection.
pub async fn connect(port: u16) -> BenchResult<Client> {
    let channel = endpoint(port)?
        .connect()
        .await
        .map_err(|e| format!("cannot connect to cocos-manager on port {port}: {e}"))?;
    Ok(ManagerServiceClient::new(channel))
}

/// Whether the gRPC service answers a request (any answer from the
/// service counts; `NOT_FOUND` is the expected one).
async fn answers(port: u16) -> bool {
    let Ok(mut client) = connect(port).await else {
        return false;
    };
    let probe = CvmInfoReq {
        id: "bench-readiness-probe".to_string(),
    };
    match tokio::time::timeout(Duration::from_secs(5), client.cvm_info(probe)).await {
        Ok(Ok(_)) => true,
        Ok(Err(status)) => status.code() != tonic::Code::Unavailable,
        Err(_) => false,
    }
}
