//! Test harness: runs the real `cocos-manager` binary with a private state
//! directory and private ports, and talks to it over real sockets.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cocos_core::proto::manager_service_client::ManagerServiceClient;
use tonic::transport::Channel;

pub type Client = ManagerServiceClient<Channel>;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The daemon built next to this test binary (target/<profile>/cocos-manager).
pub fn manager_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let bin = profile_dir.join("cocos-manager");
    assert!(
        bin.exists(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        bin.display()
    );
    bin
}

/// The path of an external tool a test needs, or a failure that names it and says
/// how to get it (every tool comes from `packaging/host-tools.sh install`).
pub fn require_tool(tool: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "this test needs `{tool}`, which is not on PATH: run packaging/host-tools.sh install \
                 (it installs QEMU, qemu-img, swtpm, OVMF and the rest as one consistent set)"
            )
        })
}

/// The development guest, built by packaging/dev-guest/build.sh.
pub fn dev_guest() -> (PathBuf, PathBuf) {
    require_tool("qemu-system-x86_64");
    let dir = std::env::var_os("COCOS_DEV_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/dev-guest"));
    let kernel = dir.join("bzImage");
    let rootfs = dir.join("rootfs.cpio.gz");
    assert!(
        kernel.exists() && rootfs.exists(),
        "the development guest is missing in {}: run packaging/dev-guest/build.sh",
        dir.display()
    );
    (reachable_by_anyone(&kernel), reachable_by_anyone(&rootfs))
}

/// `path` itself when every user can reach it (each folder above it
/// searchable by others, the file readable and, if it is a program,
/// executable by them); otherwise a copy under a world-readable folder.
/// QEMU runs as an unprivileged user in the development profile, and a
/// checkout may live under a private folder (a 0700 temporary directory).
pub fn reachable_by_anyone(path: &Path) -> PathBuf {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mode = |p: &Path| std::fs::metadata(p).map(|m| m.mode()).unwrap_or(0);
    let file_mode = mode(path);
    let executable = file_mode & 0o111 != 0;
    let file_ok = file_mode & 0o004 != 0 && (!executable || file_mode & 0o001 != 0);
    let dirs_ok = path
        .ancestors()
        .skip(1)
        .filter(|d| !d.as_os_str().is_empty())
        .all(|d| mode(d) & 0o001 != 0);
    if file_ok && dirs_ok {
        return path.to_path_buf();
    }
    let shared = PathBuf::from("/tmp/cocos-test-assets");
    std::fs::create_dir_all(&shared).expect("create /tmp/cocos-test-assets");
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let meta = std::fs::metadata(path).expect("asset metadata");
    let name = format!(
        "{}-{}-{}",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        meta.len(),
        meta.mtime()
    );
    let copy = shared.join(name);
    if !copy.exists() {
        let tmp = shared.join(format!(".{}.{}", std::process::id(), meta.ino()));
        std::fs::copy(path, &tmp).expect("copy asset");
        let mode = if executable { 0o755 } else { 0o644 };
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).expect("chmod");
        std::fs::rename(&tmp, &copy).expect("rename asset");
    }
    copy
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A free block of `n` consecutive ports, away from the ephemeral range.
pub fn free_port_range(n: u16) -> (u16, u16) {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let pid_offset = (std::process::id() % 200) as u16 * 50;
    loop {
        let start = 20000 + pid_offset + NEXT.fetch_add(n + 1, Ordering::SeqCst);
        if (start..start + n).all(|p| TcpListener::bind(("0.0.0.0", p)).is_ok()) {
            return (start, start + n - 1);
        }
    }
}

pub struct Manager {
    pub child: Option<Child>,
    pub state_dir: tempfile::TempDir,
    pub grpc_port: u16,
    pub http_port: u16,
    pub range: (u16, u16),
    pub log_path: PathBuf,
    pub env: BTreeMap<String, String>,
    pub config_file: PathBuf,
}

impl Manager {
    /// The development profile (real guest, TCG) with test-sized timeouts.
    pub fn dev_env(range: (u16, u16)) -> BTreeMap<String, String> {
        let (kernel, rootfs) = dev_guest();
        let mut env = BTreeMap::new();
        let mut set = |k: &str, v: &str| {
            env.insert(k.to_string(), v.to_string());
        };
        set(
            "MANAGER_QEMU_HOST_FWD_RANGE",
            &format!("{}-{}", range.0, range.1),
        );
        set(
            "MANAGER_QEMU_DISK_IMG_KERNEL_FILE",
            &kernel.to_string_lossy(),
        );
        set(
            "MANAGER_QEMU_DISK_IMG_ROOTFS_FILE",
            &rootfs.to_string_lossy(),
        );
        set("MANAGER_STOP_POWERDOWN_TIMEOUT", "5s");
        set("MANAGER_LOG_LEVEL", "debug");
        env
    }

    pub fn start(extra_env: &[(&str, &str)]) -> Manager {
        let range = free_port_range(4);
        let mut env = Manager::dev_env(range);
        for (k, v) in extra_env {
            env.insert(k.to_string(), v.to_string());
        }
        Manager::start_with(env, range)
    }

    pub fn start_with(env: BTreeMap<String, String>, range: (u16, u16)) -> Manager {
        Manager::start_with_config(env, range, repo_root().join("config/dev.toml"))
    }

    pub fn start_with_config(
        env: BTreeMap<String, String>,
        range: (u16, u16),
        config_file: PathBuf,
    ) -> Manager {
        let state_dir = tempfile::Builder::new()
            .prefix("cocos-t")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let grpc_port = free_port();
        let http_port = free_port();
        let log_path = state_dir.path().join("manager.log");
        let mut manager = Manager {
            child: None,
            state_dir,
            grpc_port,
            http_port,
            range,
            log_path,
            env,
            config_file,
        };
        manager.spawn();
        manager
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("manager log");
        let mut cmd = Command::new(manager_binary());
        cmd.arg("--config")
            .arg(&self.config_file)
            .current_dir(repo_root())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("MANAGER_STATE_DIR", self.state_dir.path().join("state"))
            .env("MANAGER_GRPC_HOST", "127.0.0.1")
            .env("MANAGER_GRPC_PORT", self.grpc_port.to_string())
            .env("MANAGER_HTTP_HOST", "127.0.0.1")
            .env("MANAGER_HTTP_PORT", self.http_port.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("start cocos-manager"));
        self.wait_serving();
    }

    fn wait_serving(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("cocos-manager exited at start ({status}):\n{}", self.log());
                }
            }
            if TcpStream::connect(("127.0.0.1", self.grpc_port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("cocos-manager did not listen in time:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn vms_dir(&self) -> PathBuf {
        self.state_dir.path().join("state/vms")
    }

    /// Folders of VMs under the state directory.
    pub fn vm_folders(&self) -> Vec<String> {
        std::fs::read_dir(self.vms_dir())
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub async fn client(&self) -> Client {
        let url = format!("http://127.0.0.1:{}", self.grpc_port);
        ManagerServiceClient::connect(url)
            .await
            .expect("gRPC connection")
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(-1)
    }

    /// Sends a signal and waits for the manager to exit.
    pub fn stop_with(
        &mut self,
        signal: nix::sys::signal::Signal,
        limit: Duration,
    ) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal);
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop_with(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(60));
        }
        // Whatever a failed test left behind must not outlive it.
        let state = self.state_dir.path().to_string_lossy().into_owned();
        for pid in qemu_pids_under(self.state_dir.path())
            .into_iter()
            .chain(swtpm_pids_matching(&state))
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Processes whose command line (arguments joined by spaces) satisfies `keep`.
fn pids_where(keep: impl Fn(&str) -> bool) -> Vec<i32> {
    let mut pids = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            if keep(&String::from_utf8_lossy(&cmdline).replace('\0', " ")) {
                pids.push(pid);
            }
        }
    }
    pids
}

/// QEMU processes whose command line mentions `needle`.
pub fn pids_matching(needle: &str) -> Vec<i32> {
    pids_where(|cmdline| cmdline.contains(needle) && cmdline.contains("-name cocos-"))
}

pub fn qemu_pids_under(dir: &Path) -> Vec<i32> {
    pids_matching(&dir.to_string_lossy())
}

/// `swtpm` processes whose command line mentions `needle` (a VM's swtpm
/// names its state and socket in the VM folder).
pub fn swtpm_pids_matching(needle: &str) -> Vec<i32> {
    pids_where(|cmdline| {
        let is_swtpm = cmdline.starts_with("swtpm") || cmdline.contains("/swtpm ");
        is_swtpm && cmdline.contains(needle)
    })
}

/// Hex of `bytes`, lowercase.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The host-data recipe of the README, written out by the tests over a VM's
/// folder: SHA-256 over name ‖ 0 ‖ u64-le length ‖ content of each file the
/// VM was given, in byte order of the names `certs/<file>` and
/// `env/environment`.
pub fn recompute_host_data(vm_dir: &Path) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for entry in std::fs::read_dir(vm_dir.join("certs"))
        .expect("certs dir")
        .flatten()
    {
        let name = format!("certs/{}", entry.file_name().to_string_lossy());
        files.push((name, std::fs::read(entry.path()).expect("cert")));
    }
    let env = std::fs::read(vm_dir.join("env/environment")).expect("env file");
    files.push(("env/environment".into(), env));
    files.sort();
    let mut hash = Sha256::new();
    for (name, content) in files {
        hash.update(name.as_bytes());
        hash.update([0]);
        hash.update((content.len() as u64).to_le_bytes());
        hash.update(&content);
    }
    hash.finalize().to_vec()
}

/// The stand-in QEMU (a test double), built with the workspace.
pub fn stand_in() -> PathBuf {
    let path = manager_binary().with_file_name("qemu-stand-in");
    assert!(
        path.exists(),
        "{} is missing: cargo build --workspace",
        path.display()
    );
    reachable_by_anyone(&path)
}

/// A manager whose VMs run the stand-in, with `extra` settings on top.
pub fn start_on_stand_in(range: (u16, u16), extra: &[(&str, &str)]) -> Manager {
    let mut env = Manager::dev_env(range);
    env.insert(
        "MANAGER_QEMU_BIN_PATH".into(),
        stand_in().to_string_lossy().into_owned(),
    );
    // The stand-in has no TPM device to talk to a swtpm; a test that wants
    // one says so.
    env.insert("MANAGER_QEMU_VTPM".into(), "none".into());
    for (k, v) in extra {
        env.insert(k.to_string(), v.to_string());
    }
    Manager::start_with(env, range)
}

/// Whether `pid` exists at all (a zombie counts as existing).
pub fn process_exists(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

pub fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z')))
        .unwrap_or(false)
}

/// A plain HTTP/1.0 GET; returns (status, body).
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no HTTP response: {text:?}")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line: {head:?}")))?;
    Ok((status, body.to_string()))
}

/// Waits for the guest agent to answer `ok` on /health through `port`.
pub fn wait_agent(port: u16, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    let mut last = String::new();
    while Instant::now() < deadline {
        match http_get(port, "/health") {
            Ok((200, body)) if body.trim() == "ok" => return Ok(()),
            Ok(other) => last = format!("{other:?}"),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Err(format!(
        "agent on port {port} did not answer within {limit:?}; last: {last}"
    ))
}

pub fn port_is_free(port: u16) -> bool {
    TcpListener::bind(("0.0.0.0", port)).is_ok()
}

/// Zombie children of `parent`.
pub fn zombie_children(parent: i32) -> Vec<i32> {
    let mut zombies = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let Some((_, rest)) = stat.rsplit_once(") ") else {
                continue;
            };
            let mut fields = rest.split_whitespace();
            let state = fields.next().unwrap_or("");
            let ppid: i32 = fields.next().and_then(|p| p.parse().ok()).unwrap_or(0);
            if ppid == parent && state == "Z" {
                zombies.push(pid);
            }
        }
    }
    zombies
}

/// Waits (polling) until `cond` holds; false on time-out.
pub async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cond()
}

/// Waits for the guest agent through `port` without blocking the runtime.
pub async fn agent_ok(port: u16) {
    tokio::task::spawn_blocking(move || wait_agent(port, Duration::from_secs(180)))
        .await
        .expect("join")
        .unwrap_or_else(|e| panic!("{e}"));
}

/// The one QEMU of VM `id`, waiting for it to appear.
pub async fn qemu_pid(id: &str) -> i32 {
    let mut found = Vec::new();
    eventually(Duration::from_secs(30), || {
        found = pids_matching(id);
        found.len() == 1
    })
    .await;
    assert_eq!(found.len(), 1, "expected one QEMU for {id}: {found:?}");
    found[0]
}

pub fn kill9(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// Creates a VM with an empty request; returns its id and port.
pub async fn create(client: &mut Client) -> (String, u16) {
    let created = client
        .create_vm(cocos_core::proto::CreateReq::default())
        .await
        .unwrap_or_else(|e| panic!("CreateVm: {e}"))
        .into_inner();
    let port = created.forwarded_port.parse().expect("decimal port");
    (created.cvm_id, port)
}

/// CVMInfo of a VM that must exist.
pub async fn info(client: &mut Client, id: &str) -> cocos_core::proto::CvmInfoRes {
    client
        .cvm_info(cocos_core::proto::CvmInfoReq { id: id.to_string() })
        .await
        .unwrap_or_else(|e| panic!("CVMInfo {id}: {e}"))
        .into_inner()
}

/// Nothing of any VM is left: no folder, no QEMU, no bound port, no
/// reservation, no zombie.
pub async fn assert_nothing_left(manager: &Manager) {
    assert!(
        manager.vm_folders().is_empty(),
        "folders left: {:?}",
        manager.vm_folders()
    );
    let state = manager.state_dir.path().to_string_lossy().into_owned();
    assert!(
        eventually(Duration::from_secs(10), || pids_matching(&state).is_empty()).await,
        "VM processes left: {:?}",
        pids_matching(&state)
    );
    assert!(
        eventually(Duration::from_secs(10), || swtpm_pids_matching(&state)
            .is_empty())
        .await,
        "swtpm processes left: {:?}",
        swtpm_pids_matching(&state)
    );
    assert!(
        zombie_children(manager.pid()).is_empty(),
        "zombies: {:?}",
        zombie_children(manager.pid())
    );
    for port in manager.range.0..=manager.range.1 {
        assert!(port_is_free(port), "port {port} still bound");
    }
    let http = manager.http_port;
    let (_, metrics) = tokio::task::spawn_blocking(move || http_get(http, "/metrics"))
        .await
        .expect("join")
        .expect("metrics");
    assert!(
        metrics.contains("cocos_manager_ports_in_use 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cocos_manager_vms{state=\"running\"} 0"),
        "{metrics}"
    );
}

/// Runs the manager with nothing but `env` (and a state directory it never
/// gets to use), asserts it refused to start with exit code 2 (a
/// configuration error), and returns what it said on stderr.
pub fn refused_at_start(env: &[(&str, &str)]) -> String {
    let out = Command::new(manager_binary())
        .env_clear()
        .envs(env.iter().copied())
        .env("MANAGER_STATE_DIR", "/tmp/cocos-unused")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

// Test PKIs, made with the openssl tool.

/// Runs `openssl` in `dir`; fails the test with its stderr if it fails.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new(require_tool("openssl"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Arguments of `openssl req` for a new key: RSA (as most operators have)
/// or P-256 (quicker to make).
pub fn new_key(rsa: bool) -> &'static [&'static str] {
    if rsa {
        &["-newkey", "rsa:2048"]
    } else {
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    }
}

/// A self-signed CA `<name>.pem` with its key `<name>.key`.
pub fn make_ca(dir: &Path, name: &str, rsa: bool) {
    let mut args = vec!["req", "-x509"];
    args.extend_from_slice(new_key(rsa));
    let subject = format!("/CN=test-{name}");
    let (key, pem) = (format!("{name}.key"), format!("{name}.pem"));
    args.extend_from_slice(&[
        "-nodes", "-days", "2", "-subj", &subject, "-keyout", &key, "-out", &pem,
    ]);
    openssl(dir, &args);
}

/// A certificate `<name>.pem` (key `<name>.key`) for `cn`, signed by CA `ca`.
pub fn issue(dir: &Path, ca: &str, name: &str, cn: &str, rsa: bool) {
    let mut args = vec!["req"];
    args.extend_from_slice(new_key(rsa));
    let subject = format!("/CN={cn}");
    let (key, csr) = (format!("{name}.key"), format!("{name}.csr"));
    args.extend_from_slice(&["-nodes", "-subj", &subject, "-keyout", &key, "-out", &csr]);
    openssl(dir, &args);
    let ext = format!("{name}.ext");
    std::fs::write(dir.join(&ext), format!("subjectAltName=DNS:{cn}\n")).expect("ext");
    let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &format!("{name}.pem"),
        ],
    );
}
