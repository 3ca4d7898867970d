//! The stand-in (a test double for qemu-system-x86_64) run as the manager
//! runs it: the manager's argv, then QMP, the agent's HTTP, the console and
//! each injected fault, checked from outside. Every instance is killed and
//! reaped, even when a test fails.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_qemu-stand-in");

/// A VM folder (removed on drop) with the files QEMU would open.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Dir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "stand-in-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("certs")).unwrap();
        std::fs::create_dir_all(dir.join("env")).unwrap();
        for name in ["OVMF_CODE.fd", "OVMF_VARS.fd", "bzImage", "rootfs.cpio.gz"] {
            std::fs::write(dir.join(name), "x").unwrap();
        }
        for name in ["key.pem", "cert.pem", "ca.pem"] {
            std::fs::write(dir.join("certs").join(name), "pem").unwrap();
        }
        std::fs::write(dir.join("env/environment"), "A=1\nB=two, three\n").unwrap();
        Dir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// The argv cocos-manager gives QEMU (TeeMode none, kernel boot).
    fn argv(&self, port: u16) -> Vec<String> {
        let d = self.0.display();
        let id = "7f3c";
        [
            "-machine", "q35", "-cpu", "max", "-smp", "1,maxcpus=64",
            "-m", "512M,slots=5,maxmem=30G",
            "-drive", &format!("if=pflash,format=raw,unit=0,file={d}/OVMF_CODE.fd,readonly=on"),
            "-drive", &format!("if=pflash,format=raw,unit=1,file={d}/OVMF_VARS.fd"),
            "-netdev", &format!("user,id=vmnic-{id},hostfwd=tcp:127.0.0.1:{port}-:7002"),
            "-device", &format!("virtio-net-pci,disable-legacy=on,iommu_platform=true,netdev=vmnic-{id},addr=0x2,romfile="),
            "-kernel", &format!("{d}/bzImage"), "-append", "console=ttyS0 quiet",
            "-initrd", &format!("{d}/rootfs.cpio.gz"),
            "-nographic", "-monitor", "pty",
            "-fsdev", &format!("local,id=cert_fs,path={d}/certs,security_model=mapped,readonly=on"),
            "-device", "virtio-9p-pci,fsdev=cert_fs,mount_tag=certs_share",
            "-fsdev", &format!("local,id=env_fs,path={d}/env,security_model=mapped,readonly=on"),
            "-device", "virtio-9p-pci,fsdev=env_fs,mount_tag=env_share",
            "-name", &format!("cocos-{id}"),
            "-chardev", &format!("socket,id=qmp,path={d}/qmp.sock,server=on,wait=off"),
            "-mon", "chardev=qmp,mode=control",
            "-chardev", &format!("socket,id=console,path={d}/console.sock,server=on,wait=off"),
            "-serial", "chardev:console",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running stand-in; killed and reaped on drop.
struct Vm {
    child: Child,
    port: u16,
    dir: Dir,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn spawn(dir: &Dir, port: u16, env: &[(&str, &str)]) -> Child {
    let mut command = Command::new(BIN);
    command
        .args(dir.argv(port))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("STAND_IN_") {
            command.env_remove(k);
        }
    }
    command.envs(env.iter().copied());
    command.spawn().unwrap()
}

/// Starts one and waits for its QMP greeting; retries on another port if a
/// parallel test took the one picked (as the manager does).
fn start(env: &[(&str, &str)]) -> (Vm, Qmp) {
    for _ in 0..5 {
        let dir = Dir::new();
        let port = free_port();
        let mut vm = Vm {
            child: spawn(&dir, port, env),
            port,
            dir,
        };
        match Qmp::connect(&vm.dir.path("qmp.sock"), &mut vm.child) {
            Ok(qmp) => return (vm, qmp),
            Err(stderr) if stderr.contains("host forwarding rule") => continue,
            Err(stderr) => panic!("the stand-in did not start: {stderr}"),
        }
    }
    panic!("no free port after 5 tries");
}

fn output(vm: &mut Vm) -> (ExitStatus, String, String) {
    let status = wait(&mut vm.child, Duration::from_secs(3)).expect("exit within 3 s");
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut s) = vm.child.stdout.take() {
        s.read_to_string(&mut out).unwrap();
    }
    if let Some(mut s) = vm.child.stderr.take() {
        s.read_to_string(&mut err).unwrap();
    }
    (status, out, err)
}

fn wait(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

fn signal(child: &Child, signo: i32) {
    // SAFETY: kill(2) on our own child, which is not reaped yet.
    assert_eq!(unsafe { libc::kill(child.id() as i32, signo) }, 0);
}

struct Qmp {
    write: UnixStream,
    read: BufReader<UnixStream>,
    greeting: Value,
}

impl Qmp {
    /// Connects once the socket is there; Err(stderr) if the process ends.
    fn connect(path: &Path, child: &mut Child) -> Result<Qmp, String> {
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(stream) = UnixStream::connect(path) {
                stream
                    .set_read_timeout(Some(Duration::from_secs(3)))
                    .unwrap();
                let mut qmp = Qmp {
                    write: stream.try_clone().unwrap(),
                    read: BufReader::new(stream),
                    greeting: Value::Null,
                };
                qmp.greeting = qmp.line().expect("greeting");
                return Ok(qmp);
            }
            if child.try_wait().unwrap().is_some() {
                let mut err = String::new();
                if let Some(mut s) = child.stderr.take() {
                    s.read_to_string(&mut err).unwrap();
                }
                return Err(err);
            }
            assert!(Instant::now() < until, "no QMP socket within 5 s");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn line(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.read.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(serde_json::from_str(&line).unwrap()),
        }
    }

    fn send(&mut self, command: Value) -> Value {
        self.write
            .write_all(format!("{command}\n").as_bytes())
            .unwrap();
        self.line().expect("reply")
    }

    fn negotiate(&mut self) {
        assert_eq!(
            self.send(json!({"execute": "qmp_capabilities"})),
            json!({"return": {}})
        );
    }
}

fn http(port: u16, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: vm\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.to_string(), body.to_string())
}

#[test]
fn boots_answers_and_powers_down_over_qmp() {
    let (mut vm, mut qmp) = start(&[]);
    assert_eq!(
        qmp.greeting["QMP"]["version"]["qemu"],
        json!({"micro": 0, "minor": 2, "major": 7})
    );
    let early = qmp.send(json!({"execute": "query-status"}));
    assert_eq!(
        early["error"],
        json!({"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"})
    );
    assert_eq!(
        qmp.send(json!({"execute": "qmp_capabilities", "id": "neg"})),
        json!({"return": {}, "id": "neg"})
    );
    assert_eq!(
        qmp.send(json!({"execute": "query-status", "id": 2})),
        json!({"return": {"status": "running", "singlestep": false, "running": true}, "id": 2})
    );
    assert_eq!(
        qmp.send(json!({"execute": "migrate"}))["error"],
        json!({"class": "CommandNotFound", "desc": "The command migrate has not been found"})
    );

    let (head, body) = http(vm.port, "/health");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(head.contains("Content-Length: 2\r\n") && head.contains("Connection: close"));
    assert_eq!(body, "ok");
    assert_eq!(http(vm.port, "/env").1, "A=1\nB=two, three\n");
    assert_eq!(http(vm.port, "/certs").1, "ca.pem\ncert.pem\nkey.pem");
    assert!(http(vm.port, "/nope").0.starts_with("HTTP/1.1 404"));

    let mut console = UnixStream::connect(vm.dir.path("console.sock")).unwrap();
    console
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut boot = Vec::new();
    while !String::from_utf8_lossy(&boot).contains("agent listening on 7002\r\n") {
        let mut buf = [0u8; 1024];
        let n = console.read(&mut buf).unwrap();
        assert!(n > 0, "console closed");
        boot.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&boot).contains("qemu-stand-in: booting VM cocos-7f3c\r\n"));

    assert_eq!(
        qmp.send(json!({"execute": "system_powerdown", "id": 3})),
        json!({"return": {}, "id": 3})
    );
    assert_eq!(qmp.line().unwrap()["event"], "POWERDOWN");
    let shutdown = qmp.line().unwrap();
    assert_eq!(shutdown["event"], "SHUTDOWN");
    assert_eq!(
        shutdown["data"],
        json!({"guest": true, "reason": "guest-shutdown"})
    );
    assert!(shutdown["timestamp"]["microseconds"].is_u64());
    let (status, out, _) = output(&mut vm);
    assert_eq!(status.code(), Some(0));
    assert_eq!(
        out,
        "char device redirected to /dev/pts/0 (label compat_monitor0)\n"
    );
    assert!(!vm.dir.path("qmp.sock").exists());
}

#[test]
fn a_new_qmp_client_is_served_after_the_last_one_left_then_quit() {
    let (mut vm, mut qmp) = start(&[]);
    qmp.negotiate();
    drop(qmp);
    let mut qmp = Qmp::connect(&vm.dir.path("qmp.sock"), &mut vm.child).unwrap();
    qmp.negotiate();
    assert_eq!(qmp.send(json!({"execute": "quit"})), json!({"return": {}}));
    let shutdown = qmp.line().unwrap();
    assert_eq!(
        shutdown["data"],
        json!({"guest": false, "reason": "host-qmp-quit"})
    );
    assert_eq!(output(&mut vm).0.code(), Some(0));
}

#[test]
fn poweroff_over_http_is_a_guest_shutdown() {
    let (mut vm, mut qmp) = start(&[]);
    qmp.negotiate();
    assert_eq!(http(vm.port, "/poweroff").1, "powering off");
    let shutdown = qmp.line().unwrap();
    assert_eq!(shutdown["event"], "SHUTDOWN");
    assert_eq!(
        shutdown["data"],
        json!({"guest": true, "reason": "guest-shutdown"})
    );
    assert_eq!(output(&mut vm).0.code(), Some(0));
}

#[test]
fn sigterm_ends_it_like_qemu() {
    let (mut vm, mut qmp) = start(&[]);
    qmp.negotiate();
    signal(&vm.child, libc::SIGTERM);
    assert_eq!(qmp.line().unwrap()["data"]["reason"], "host-signal");
    let (status, _, err) = output(&mut vm);
    assert_eq!(status.code(), Some(0));
    let expected = format!(
        "qemu-system-x86_64: terminating on signal 15 from pid {} (",
        std::process::id()
    );
    assert!(err.starts_with(&expected), "{err}");
}

#[test]
fn a_taken_port_is_a_host_forwarding_error() {
    let dir = Dir::new();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut vm = Vm {
        child: spawn(&dir, port, &[]),
        port,
        dir,
    };
    let (status, _, err) = output(&mut vm);
    assert_eq!(status.code(), Some(1));
    assert_eq!(
        err,
        format!(
            "qemu-system-x86_64: -netdev user,id=vmnic-7f3c,hostfwd=tcp:127.0.0.1:{port}-:7002: \
             Could not set up host forwarding rule 'tcp:127.0.0.1:{port}-:7002'\n"
        )
    );
    assert!(!vm.dir.path("qmp.sock").exists());
}

#[test]
fn a_missing_kernel_or_firmware_fails_at_start() {
    let dir = Dir::new();
    std::fs::remove_file(dir.path("bzImage")).unwrap();
    let kernel = dir.path("bzImage");
    let mut vm = Vm {
        child: spawn(&dir, free_port(), &[]),
        port: 0,
        dir,
    };
    let (status, _, err) = output(&mut vm);
    assert_eq!(status.code(), Some(1));
    assert_eq!(
        err,
        format!(
            "qemu-system-x86_64: could not load kernel '{}': No such file or directory\n",
            kernel.display()
        )
    );

    let dir = Dir::new();
    std::fs::remove_file(dir.path("OVMF_VARS.fd")).unwrap();
    let mut vm = Vm {
        child: spawn(&dir, free_port(), &[]),
        port: 0,
        dir,
    };
    let (status, _, err) = output(&mut vm);
    assert_eq!(status.code(), Some(1));
    assert!(
        err.contains("OVMF_VARS.fd': No such file or directory"),
        "{err}"
    );
}

#[test]
fn fail_at_start_prints_the_message_and_binds_nothing() {
    let dir = Dir::new();
    let port = free_port();
    let mut vm = Vm {
        child: spawn(
            &dir,
            port,
            &[("STAND_IN_FAIL_AT_START", "failed to initialize kvm")],
        ),
        port,
        dir,
    };
    let (status, _, err) = output(&mut vm);
    assert_eq!(status.code(), Some(1));
    assert_eq!(err, "qemu-system-x86_64: failed to initialize kvm\n");
    assert!(!vm.dir.path("qmp.sock").exists());
}

#[test]
fn crash_after_dies_abnormally_without_shutdown() {
    let (mut vm, mut qmp) = start(&[("STAND_IN_CRASH_AFTER", "200ms")]);
    qmp.negotiate();
    assert_eq!(qmp.line(), None, "no event before the crash");
    let (status, _, _) = output(&mut vm);
    assert_eq!(status.signal(), Some(libc::SIGABRT));

    let (mut vm, _qmp) = start(&[
        ("STAND_IN_CRASH_AFTER", "100ms"),
        ("STAND_IN_CRASH_SIGNAL", "KILL"),
    ]);
    assert_eq!(output(&mut vm).0.signal(), Some(libc::SIGKILL));

    let (mut vm, mut qmp) = start(&[
        ("STAND_IN_CRASH_AFTER", "100ms"),
        ("STAND_IN_CRASH_PROBABILITY", "0"),
    ]);
    std::thread::sleep(Duration::from_millis(250));
    assert!(
        vm.child.try_wait().unwrap().is_none(),
        "probability 0 crashed"
    );
    qmp.negotiate();
}

#[test]
fn an_ignored_powerdown_leaves_it_running() {
    let (mut vm, mut qmp) = start(&[("STAND_IN_IGNORE_POWERDOWN", "1")]);
    qmp.negotiate();
    assert_eq!(
        qmp.send(json!({"execute": "system_powerdown"})),
        json!({"return": {}})
    );
    assert_eq!(qmp.line().unwrap()["event"], "POWERDOWN");
    std::thread::sleep(Duration::from_millis(250));
    assert!(vm.child.try_wait().unwrap().is_none());
    assert_eq!(
        qmp.send(json!({"execute": "query-status"}))["return"]["status"],
        "running"
    );
}

#[test]
fn start_delay_and_ignored_sigterm() {
    let started = Instant::now();
    let (mut vm, _qmp) = start(&[
        ("STAND_IN_START_DELAY", "300ms"),
        ("STAND_IN_IGNORE_SIGTERM", "1"),
    ]);
    assert!(started.elapsed() >= Duration::from_millis(300));
    signal(&vm.child, libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        vm.child.try_wait().unwrap().is_none(),
        "SIGTERM was not ignored"
    );
    signal(&vm.child, libc::SIGKILL);
    assert_eq!(output(&mut vm).0.signal(), Some(libc::SIGKILL));
}

#[test]
fn console_spam_writes_about_the_rate_asked() {
    let (vm, _qmp) = start(&[("STAND_IN_CONSOLE_SPAM", "20000")]);
    let mut console = UnixStream::connect(vm.dir.path("console.sock")).unwrap();
    console
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let started = Instant::now();
    let mut total = 0;
    let mut buf = [0u8; 65536];
    while started.elapsed() < Duration::from_millis(1000) {
        if let Ok(n) = console.read(&mut buf) {
            total += n;
        }
    }
    // 20 kB in a second, give or take a tick and the boot lines.
    assert!((15_000..26_000).contains(&total), "{total} bytes");
}

#[test]
fn help_and_version_say_it_is_a_test_double() {
    let help = Command::new(BIN).arg("--help").output().unwrap();
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("TEST DOUBLE"));
    let version = Command::new(BIN).arg("-version").output().unwrap();
    assert!(String::from_utf8_lossy(&version.stdout)
        .starts_with("QEMU emulator version 7.2.0 (qemu-stand-in test double)\n"));
}
