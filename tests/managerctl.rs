//! `managerctl` end to end: the real binary against a real daemon (the
//! stand-in QEMU, and once the development guest), its JSON parsed, its exit
//! codes and one-line errors checked. `events` and `logs -f` run as child
//! processes whose output is read line by line with bounded waits.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// The client built next to the daemon (target/<profile>/managerctl).
fn managerctl_binary() -> PathBuf {
    let path = manager_binary().with_file_name("managerctl");
    assert!(
        path.exists(),
        "{} is missing: cargo build --release --workspace",
        path.display()
    );
    path
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {:?}", self.stdout))
    }

    /// The failure line: exactly one line on stderr.
    fn error_line(&self) -> &str {
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "expected one error line: {:?}", self.stderr);
        lines[0]
    }
}

/// Runs managerctl with `env` as its only MANAGER_GRPC_* settings.
fn ctl_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(managerctl_binary());
    cmd.args(args).stdin(Stdio::null());
    for var in [
        "MANAGER_GRPC_URL",
        "MANAGER_GRPC_TIMEOUT",
        "MANAGER_GRPC_CLIENT_CERT",
        "MANAGER_GRPC_CLIENT_KEY",
        "MANAGER_GRPC_SERVER_CA_CERTS",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run managerctl");
    Run {
        code: out.status.code().expect("managerctl exited, not killed"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs managerctl against `manager` (address given as a flag).
fn ctl(manager: &Manager, args: &[&str]) -> Run {
    let url = format!("127.0.0.1:{}", manager.grpc_port);
    let mut all = vec!["--grpc-url", url.as_str()];
    all.extend_from_slice(args);
    ctl_env(&all, &[])
}

/// A managerctl that keeps running (`events`, `logs -f`): its stdout lines
/// arrive on a channel, its stderr is collected; killed if a test fails
/// before it ends.
struct Follower {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
    /// Every line read so far, in order.
    seen: Vec<String>,
}

impl Follower {
    fn start(manager: &Manager, args: &[&str]) -> Follower {
        let url = format!("127.0.0.1:{}", manager.grpc_port);
        let mut cmd = Command::new(managerctl_binary());
        cmd.arg("--grpc-url")
            .arg(&url)
            .args(args)
            .env_remove("MANAGER_GRPC_URL")
            .env_remove("MANAGER_GRPC_TIMEOUT")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start managerctl");
        let stdout = child.stdout.take().expect("stdout");
        let mut err = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = err.read_to_string(&mut text);
            if let Ok(mut s) = sink.lock() {
                s.push_str(&text);
            }
        });
        Follower {
            child,
            lines,
            stderr,
            seen: Vec::new(),
        }
    }

    /// Reads lines until one satisfies `found`, within `limit`; returns it.
    fn wait_for(
        &mut self,
        limit: Duration,
        what: &str,
        mut found: impl FnMut(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if found(&line) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "managerctl {}: no line {what} within {limit:?}; lines: {:#?}\nstderr: {}",
                    self.args(),
                    self.seen,
                    self.stderr()
                ),
            }
        }
    }

    /// Waits for the next JSON line satisfying `found`.
    fn wait_json(
        &mut self,
        limit: Duration,
        what: &str,
        mut found: impl FnMut(&Value) -> bool,
    ) -> Value {
        let line = self.wait_for(limit, what, |line| {
            let value: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}"));
            found(&value)
        });
        serde_json::from_str(&line).expect("JSON line")
    }

    fn args(&self) -> String {
        format!("(pid {})", self.child.id())
    }

    fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn interrupt(&self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
    }

    /// Its exit status within `limit`; the lines it printed until then are
    /// added to `seen`.
    fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                // The reader thread ends at EOF: collect what it still has.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
                    self.seen.push(line);
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "managerctl {} still running after {limit:?}; lines: {:#?}",
                self.args(),
                self.seen
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}")))
        .collect()
}

/// Creates a VM with managerctl; returns its id and port.
fn ctl_create(manager: &Manager, extra: &[&str]) -> (String, u16) {
    let mut args = vec!["-o", "json", "create"];
    args.extend_from_slice(extra);
    let run = ctl(manager, &args);
    assert_eq!(run.code, 0, "create: {}", run.stderr);
    let created = run.json();
    let id = created["id"].as_str().expect("id").to_string();
    let port = created["port"].as_u64().expect("port") as u16;
    (id, port)
}

/// The VMs of `list -o json`, by id.
fn listed(manager: &Manager) -> std::collections::BTreeMap<String, Value> {
    let run = ctl(manager, &["list", "-o", "json"]);
    assert_eq!(run.code, 0, "list: {}", run.stderr);
    let doc = run.json();
    doc["vms"]
        .as_array()
        .unwrap_or_else(|| panic!("no vms array: {doc}"))
        .iter()
        .map(|vm| (vm["id"].as_str().expect("id").to_string(), vm.clone()))
        .collect()
}

const AWS_SECRET: &str = "aws-secret-7f3e9c1d5b";
const CERTS_TOKEN: &str = "certs-token-4a8b2c6d0e";
const KEY_BODY: &str = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7";

fn key_file(dir: &Path) -> PathBuf {
    let path = dir.join("agent-key.pem");
    std::fs::write(
        &path,
        format!("-----BEGIN PRIVATE KEY-----\n{KEY_BODY}\n-----END PRIVATE KEY-----\n"),
    )
    .expect("key file");
    path
}

fn assert_no_secret(run: &Run) {
    for secret in [AWS_SECRET, CERTS_TOKEN, KEY_BODY] {
        assert!(
            !run.stdout.contains(secret) && !run.stderr.contains(secret),
            "a secret was printed: stdout {:?} stderr {:?}",
            run.stdout,
            run.stderr
        );
    }
}

#[test]
fn create_wait_info_policy_remove_on_the_stand_in() {
    let range = free_port_range(4);
    let manager = start_on_stand_in(range, &[]);
    let files = tempfile::tempdir().expect("dir");
    let key = key_file(files.path());
    let crt = files.path().join("agent-cert.pem");
    std::fs::write(&crt, "client certificate\n").expect("cert");
    let ca = files.path().join("server-ca.pem");
    std::fs::write(&ca, "server ca\n").expect("ca");
    let (key, crt, ca) = (
        key.to_string_lossy().into_owned(),
        crt.to_string_lossy().into_owned(),
        ca.to_string_lossy().into_owned(),
    );

    // create --wait, every create-vm flag, JSON out.
    let started = Instant::now();
    let run = ctl(
        &manager,
        &[
            "create",
            "--wait",
            "--wait-timeout",
            "60s",
            "--server-url",
            "cvms.example:7001",
            "--server-ca",
            &ca,
            "--client-key",
            &key,
            "--client-crt",
            &crt,
            "--ca-url",
            "https://ca.example",
            "--log-level",
            "debug",
            "--ttl",
            "1h",
            "--aws-access-key-id",
            "AKIATEST",
            "--aws-secret-access-key",
            AWS_SECRET,
            "--aws-endpoint-url",
            "https://s3.example",
            "--aws-region",
            "eu-west-1",
            "--aa-kbs-params",
            "provider:kbs::http://kbs:8080",
            "--certs-token",
            CERTS_TOKEN,
            "--output",
            "json",
        ],
    );
    assert_eq!(run.code, 0, "create: {}", run.stderr);
    assert_no_secret(&run);
    assert!(
        run.stderr.is_empty(),
        "no progress on a non-terminal: {:?}",
        run.stderr
    );
    let created = run.json();
    let id = created["id"].as_str().expect("id").to_string();
    let port = created["port"].as_u64().expect("port") as u16;
    assert!((range.0..=range.1).contains(&port), "{created}");
    assert_eq!(created["host"], "127.0.0.1");
    assert_eq!(created["agent_ready"], true);
    assert!(started.elapsed() < Duration::from_secs(60));
    // The agent answers, and the flags reached the VM as the Cocos CLI's do.
    let (status, body) = http_get(port, "/health").expect("health");
    assert_eq!((status, body.trim()), (200, "ok"));
    let (_, env) = http_get(port, "/env").expect("env share");
    for line in [
        "AGENT_LOG_LEVEL=debug",
        "AGENT_CVM_GRPC_URL=cvms.example:7001",
        &format!("AGENT_CVM_ID={id}"),
        &format!("AGENT_CERTS_TOKEN={CERTS_TOKEN}"),
        "AGENT_CVM_CA_URL=https://ca.example",
        "AGENT_CVM_GRPC_CLIENT_KEY=/etc/certs/key.pem",
        "AWS_ACCESS_KEY_ID=AKIATEST",
        &format!("AWS_SECRET_ACCESS_KEY={AWS_SECRET}"),
        "AWS_ENDPOINT_URL=https://s3.example",
        "AWS_REGION=eu-west-1",
    ] {
        assert!(env.lines().any(|l| l == line), "{line:?} not in {env:?}");
    }
    let (_, certs) = http_get(port, "/certs").expect("certs share");
    assert_eq!(certs.trim(), "ca.pem\ncert.pem\nkey.pem");

    // info: JSON and table.
    let run = ctl(&manager, &["info", &id, "-o", "json"]);
    assert_eq!(run.code, 0, "info: {}", run.stderr);
    let info = run.json();
    assert_eq!(info["id"], id.as_str());
    assert_eq!(info["cpu_num"], 1, "{info}");
    assert_eq!(info["cpu_type"], "max", "{info}");
    assert!(info["kernel_cmd"].is_string() && info["ovmf_version"].is_string());
    let run = ctl(&manager, &["info", &id]);
    assert_eq!(run.code, 0, "info: {}", run.stderr);
    assert!(
        run.stdout
            .lines()
            .any(|l| l.starts_with("ID") && l.ends_with(&id)),
        "{}",
        run.stdout
    );
    assert!(run
        .stdout
        .lines()
        .any(|l| l.starts_with("CPU TYPE") && l.ends_with("max")));

    // policy of a VM without SEV-SNP: FAILED_PRECONDITION, exit 1, one line.
    let run = ctl(&manager, &["policy", &id, "-o", "json"]);
    assert_eq!(run.code, 1, "policy: {} {}", run.stdout, run.stderr);
    assert!(run.stdout.is_empty());
    let line = run.error_line();
    assert!(
        line.starts_with(&format!(
            "managerctl: policy {id} failed: FAILED_PRECONDITION: "
        )),
        "{line}"
    );

    // remove: JSON, then the VM is gone.
    let run = ctl(&manager, &["remove", &id, "-o", "json"]);
    assert_eq!(run.code, 0, "remove: {}", run.stderr);
    assert_eq!(run.json(), serde_json::json!({ "id": id, "removed": true }));
    let run = ctl(&manager, &["info", &id]);
    assert_eq!(run.code, 3, "info after remove: {}", run.stderr);
    assert!(
        run.error_line().contains("failed: NOT_FOUND: "),
        "{}",
        run.stderr
    );
    assert!(
        manager.vm_folders().is_empty(),
        "{:?}",
        manager.vm_folders()
    );
    assert!(port_is_free(port), "port {port} still bound after remove");
}

#[test]
fn errors_name_the_code_and_exit_with_the_documented_code() {
    let manager = start_on_stand_in(free_port_range(2), &[]);

    // Unknown id: NOT_FOUND, 3, for each command that takes an id, with a
    // message naming the id.
    for command in ["info", "remove", "policy", "logs", "events"] {
        let run = ctl(&manager, &[command, "no-such-vm"]);
        assert_eq!(run.code, 3, "{command}: {} {}", run.stdout, run.stderr);
        assert!(run.stdout.is_empty());
        let line = run.error_line();
        assert!(
            line.starts_with(&format!(
                "managerctl: {command} no-such-vm failed: NOT_FOUND: "
            )) && line.matches("no-such-vm").count() >= 2,
            "{line}"
        );
    }
    for args in [
        &["logs", "-f", "no-such-vm"][..],
        &["-o", "json", "info", "no-such-vm"],
    ] {
        let run = ctl(&manager, args);
        assert_eq!(run.code, 3, "{args:?}: {} {}", run.stdout, run.stderr);
        assert!(run.stdout.is_empty());
        assert!(
            run.error_line().contains(" failed: NOT_FOUND: "),
            "{}",
            run.stderr
        );
    }

    // A field the manager refuses: INVALID_ARGUMENT, 4, naming the field; the
    // secrets of that request are not in the message.
    let files = tempfile::tempdir().expect("dir");
    let key = key_file(files.path());
    let run = ctl(
        &manager,
        &[
            "create",
            "--ttl",
            "forever",
            "--client-key",
            &key.to_string_lossy(),
            "--aws-secret-access-key",
            AWS_SECRET,
            "--certs-token",
            CERTS_TOKEN,
            "-o",
            "json",
        ],
    );
    assert_eq!(run.code, 4, "{} {}", run.stdout, run.stderr);
    let line = run.error_line();
    assert!(
        line.starts_with("managerctl: create failed: INVALID_ARGUMENT: ") && line.contains("ttl"),
        "{line}"
    );
    assert_no_secret(&run);
    assert!(manager.vm_folders().is_empty());

    // Usage errors: 2 (a missing id, an unreadable file, a bad timeout).
    assert_eq!(ctl(&manager, &["info"]).code, 2);
    assert_eq!(ctl(&manager, &["frobnicate"]).code, 2);
    let run = ctl(
        &manager,
        &["create", "--client-key", "/nonexistent/key.pem"],
    );
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.error_line()
            .contains("--client-key /nonexistent/key.pem"),
        "{}",
        run.stderr
    );
    let run = ctl(&manager, &["--grpc-timeout", "soon", "info", "x"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.error_line().contains("--grpc-timeout"),
        "{}",
        run.stderr
    );
    assert!(manager.vm_folders().is_empty());
}

#[test]
fn a_manager_that_is_not_running_is_unavailable() {
    let url = format!("127.0.0.1:{}", free_port());
    let run = ctl_env(&["info", "some-id"], &[("MANAGER_GRPC_URL", &url)]);
    assert_eq!(run.code, 5, "{} {}", run.stdout, run.stderr);
    let line = run.error_line();
    assert!(
        line.starts_with("managerctl: info some-id failed: UNAVAILABLE: ")
            && line.contains(&url)
            && line.contains("Connection refused"),
        "{line}"
    );
    let run = ctl_env(&["--grpc-url", &url, "create", "--wait"], &[]);
    assert_eq!(run.code, 5, "{}", run.stderr);
    assert!(run.stdout.is_empty());
    // The operator's commands too, following ones included (they do not
    // wait for a manager to appear).
    for args in [
        &["list"][..],
        &["-o", "json", "list"],
        &["logs", "some-id"],
        &["logs", "-f", "some-id"],
        &["events"],
        &["-o", "json", "events", "some-id"],
    ] {
        let run = ctl_env(args, &[("MANAGER_GRPC_URL", &url)]);
        assert_eq!(run.code, 5, "{args:?}: {} {}", run.stdout, run.stderr);
        assert!(run.stdout.is_empty(), "{args:?}: {}", run.stdout);
        let line = run.error_line();
        assert!(
            line.contains(" failed: UNAVAILABLE: ") && line.contains("is cocos-manager running"),
            "{args:?}: {line}"
        );
    }
}

#[test]
fn a_manager_that_never_answers_is_a_deadline() {
    // Accepts connections (the kernel does) but never speaks.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
    let url = format!("127.0.0.1:{}", silent.local_addr().expect("addr").port());
    let started = Instant::now();
    let run = ctl_env(
        &["info", "x"],
        &[("MANAGER_GRPC_URL", &url), ("MANAGER_GRPC_TIMEOUT", "2s")],
    );
    assert_eq!(run.code, 6, "{} {}", run.stdout, run.stderr);
    assert!(
        run.error_line().contains("failed: DEADLINE_EXCEEDED: "),
        "{}",
        run.stderr
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn environment_variables_configure_the_connection() {
    let manager = start_on_stand_in(free_port_range(2), &[]);
    let url = format!("127.0.0.1:{}", manager.grpc_port);
    let env = [
        ("MANAGER_GRPC_URL", url.as_str()),
        ("MANAGER_GRPC_TIMEOUT", "30s"),
    ];

    let run = ctl_env(&["create", "--output", "json"], &env);
    assert_eq!(run.code, 0, "create: {}", run.stderr);
    let created = run.json();
    let id = created["id"].as_str().expect("id").to_string();
    assert!(created.get("agent_ready").is_none(), "no --wait: {created}");
    let run = ctl_env(&["info", &id, "-o", "json"], &env);
    assert_eq!(run.code, 0, "info: {}", run.stderr);
    assert_eq!(run.json()["id"], id.as_str());

    // Empty variables count as unset (as in the Cocos CLI); a flag beats its
    // variable.
    let dead = format!("127.0.0.1:{}", free_port());
    let run = ctl_env(
        &["--grpc-url", &url, "info", &id],
        &[
            ("MANAGER_GRPC_URL", dead.as_str()),
            ("MANAGER_GRPC_TIMEOUT", ""),
            ("MANAGER_GRPC_CLIENT_CERT", ""),
            ("MANAGER_GRPC_CLIENT_KEY", ""),
            ("MANAGER_GRPC_SERVER_CA_CERTS", ""),
        ],
    );
    assert_eq!(run.code, 0, "flag over variable: {}", run.stderr);
    let run = ctl_env(&["info", &id], &[("MANAGER_GRPC_URL", dead.as_str())]);
    assert_eq!(run.code, 5, "{}", run.stderr);
    let run = ctl_env(
        &["info", &id],
        &[("MANAGER_GRPC_URL", &url), ("MANAGER_GRPC_TIMEOUT", "60")],
    );
    assert_eq!(run.code, 2, "a timeout without a unit: {}", run.stderr);
    assert!(
        run.error_line().contains("MANAGER_GRPC_TIMEOUT"),
        "{}",
        run.stderr
    );

    let run = ctl_env(&["remove", &id], &env);
    assert_eq!(run.code, 0, "remove: {}", run.stderr);
    assert_eq!(run.stdout.trim(), format!("removed VM {id}"));
}

/// A CA, a server certificate for localhost and a client certificate (P-256).
fn make_pki(dir: &Path) {
    make_ca(dir, "ca", false);
    issue(dir, "ca", "server", "localhost", false);
    issue(dir, "ca", "client", "cocos-cli", false);
}

#[test]
fn mutual_tls_from_the_cocos_variables() {
    let pki = tempfile::tempdir().expect("dir");
    make_pki(pki.path());
    let p = |f: &str| pki.path().join(f).to_string_lossy().into_owned();
    let manager = start_on_stand_in(
        free_port_range(2),
        &[
            ("MANAGER_GRPC_SERVER_CERT", &p("server.pem")),
            ("MANAGER_GRPC_SERVER_KEY", &p("server.key")),
            ("MANAGER_GRPC_CLIENT_CA_CERTS", &p("ca.pem")),
        ],
    );
    let url = format!("localhost:{}", manager.grpc_port);
    let (ca, cert, key) = (p("ca.pem"), p("client.pem"), p("client.key"));
    let env = [
        ("MANAGER_GRPC_URL", url.as_str()),
        ("MANAGER_GRPC_SERVER_CA_CERTS", ca.as_str()),
        ("MANAGER_GRPC_CLIENT_CERT", cert.as_str()),
        ("MANAGER_GRPC_CLIENT_KEY", key.as_str()),
    ];
    // Through TLS the manager answers: NOT_FOUND for an id it does not know.
    let run = ctl_env(&["info", "no-such-vm"], &env);
    assert_eq!(run.code, 3, "{}", run.stderr);
    let run = ctl_env(
        &["create", "--wait", "--wait-timeout", "60s", "-o", "json"],
        &env,
    );
    assert_eq!(run.code, 0, "create over TLS: {}", run.stderr);
    let created = run.json();
    assert_eq!(created["host"], "localhost");
    assert_eq!(created["agent_ready"], true);
    let id = created["id"].as_str().expect("id");
    assert_eq!(ctl_env(&["remove", id], &env).code, 0);

    // Plaintext to a TLS port, or TLS without the client certificate the
    // manager requires: not a usable connection.
    let run = ctl_env(&["info", "x"], &env[..1]);
    assert_ne!(run.code, 0);
    assert_ne!(run.code, 3, "{}", run.stderr);
    let run = ctl_env(&["info", "x"], &env[..2]);
    assert!(matches!(run.code, 1 | 5), "{} {}", run.code, run.stderr);
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    // A client key without the server's CA is a usage error.
    let run = ctl_env(&["info", "x"], &[env[0], env[2], env[3]]);
    assert_eq!(run.code, 2, "{}", run.stderr);
}

#[test]
fn wait_timeout_keeps_the_vm_and_says_how_to_remove_it() {
    let manager = start_on_stand_in(free_port_range(2), &[]);
    // The forwarded port listens on 127.0.0.1 only: nothing answers on
    // 127.0.0.2, so the wait runs out.
    let started = Instant::now();
    let run = ctl(
        &manager,
        &[
            "create",
            "--wait",
            "--wait-timeout",
            "2s",
            "--wait-host",
            "127.0.0.2",
            "-o",
            "json",
        ],
    );
    assert_eq!(run.code, 6, "{} {}", run.stdout, run.stderr);
    assert!(started.elapsed() < Duration::from_secs(20));
    let created = run.json();
    assert_eq!(created["agent_ready"], false);
    let id = created["id"].as_str().expect("id").to_string();
    let line = run.error_line();
    assert!(
        line.starts_with("managerctl: create failed: DEADLINE_EXCEEDED: ")
            && line.contains(&format!("managerctl remove {id}")),
        "{line}"
    );
    assert_eq!(ctl(&manager, &["remove", &id]).code, 0);
    assert!(manager.vm_folders().is_empty());
}

#[test]
fn create_wait_with_the_development_guest() {
    let manager = Manager::start(&[]);
    let started = Instant::now();
    let run = ctl(
        &manager,
        &[
            "create",
            "--wait",
            "--wait-timeout",
            "180s",
            "--ttl",
            "10m",
            "-o",
            "json",
        ],
    );
    assert_eq!(
        run.code,
        0,
        "create --wait: {}\n{}",
        run.stderr,
        manager.log()
    );
    let created = run.json();
    assert_eq!(created["agent_ready"], true);
    let port = created["port"].as_u64().expect("port") as u16;
    let id = created["id"].as_str().expect("id").to_string();
    eprintln!(
        "dev guest: agent ready {:?} after create",
        started.elapsed()
    );
    // Ready means ready: the guest's agent answers right away.
    let (status, body) = http_get(port, "/health").expect("health");
    assert_eq!((status, body.trim()), (200, "ok"));
    let run = ctl(&manager, &["info", &id, "-o", "json"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let info = run.json();
    assert!(info["kernel_cmd"]
        .as_str()
        .unwrap_or_default()
        .contains("console=ttyS0"));
    assert!(
        info["command_line"][0]
            .as_str()
            .is_some_and(|p| p.ends_with("qemu-system-x86_64")),
        "{info}"
    );
    // list shows it running, with QEMU's pid.
    let vms = listed(&manager);
    let vm = &vms[id.as_str()];
    assert_eq!(vm["state"], "running", "{vm}");
    assert_eq!(vm["port"].as_u64(), Some(u64::from(port)), "{vm}");
    let pid = vm["pid"].as_i64().unwrap_or_else(|| panic!("pid: {vm}")) as i32;
    assert!(process_exists(pid), "{vm}");
    // logs: the guest's boot lines from its serial console, its init
    // starting through to its agent listening.
    let run = ctl(&manager, &["logs", &id]);
    assert_eq!(run.code, 0, "logs: {}", run.stderr);
    let boot = [
        "dev-guest: init started (kernel",
        "dev-guest: agent listening on",
    ];
    let at: Vec<usize> = boot
        .iter()
        .map(|line| {
            run.stdout
                .find(line)
                .unwrap_or_else(|| panic!("no {line:?} in the console log: {}", run.stdout))
        })
        .collect();
    assert!(at[0] < at[1], "boot lines out of order: {}", run.stdout);
    // logs -f: the boot lines, then a new one (the remove presses the ACPI
    // power button, and the guest says so), then the stream ends with 0.
    let mut follower = Follower::start(&manager, &["logs", "-f", &id]);
    follower.wait_for(Duration::from_secs(30), "the agent's boot line", |l| {
        l.contains("dev-guest: agent listening on")
    });
    let remover = {
        let (url, id) = (format!("127.0.0.1:{}", manager.grpc_port), id.clone());
        std::thread::spawn(move || ctl_env(&["--grpc-url", &url, "remove", &id], &[]))
    };
    follower.wait_for(Duration::from_secs(60), "the power button line", |l| {
        l.contains("ACPI power button pressed")
    });
    let run = remover.join().expect("remove thread");
    assert_eq!(run.code, 0, "remove: {}", run.stderr);
    let status = follower.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "{status:?}: {}", follower.stderr());
    assert!(
        manager.vm_folders().is_empty(),
        "{:?}",
        manager.vm_folders()
    );
}

#[test]
fn list_info_and_events_on_the_stand_in() {
    let manager = start_on_stand_in(free_port_range(4), &[]);
    let limit = Duration::from_secs(30);

    // A watcher of every VM, JSON lines: no VM yet, so the snapshot is just
    // the SYNCED marker.
    let mut all = Follower::start(&manager, &["-o", "json", "events"]);
    let synced = all.wait_json(limit, "synced", |e| e["kind"] == "synced");
    assert!(synced["id"].is_null() && synced["vm"].is_null(), "{synced}");
    assert!(
        all.seen.len() == 1,
        "nothing before SYNCED without VMs: {:#?}",
        all.seen
    );

    let (a, port_a) = ctl_create(&manager, &["--ttl", "1h"]);
    let (b, port_b) = ctl_create(&manager, &[]);

    // list, JSON: both running, with QEMU's pid and the forwarded port.
    let vms = listed(&manager);
    assert_eq!(vms.len(), 2, "{vms:?}");
    for (id, port) in [(&a, port_a), (&b, port_b)] {
        let vm = &vms[id.as_str()];
        assert_eq!(vm["state"], "running", "{vm}");
        let pid = vm["pid"].as_i64().unwrap_or_else(|| panic!("pid: {vm}")) as i32;
        assert_eq!(pids_matching(id), [pid], "the pid is the VM's QEMU: {vm}");
        assert_eq!(vm["port"].as_u64(), Some(u64::from(port)), "{vm}");
        assert_eq!(vm["tee"], "none", "{vm}");
        assert_eq!(vm["vtpm"], false, "{vm}");
        assert_eq!(vm["restarts"], 0, "{vm}");
        assert!(vm["last_exit"].is_null(), "{vm}");
        assert!(
            vm["created_unix_ms"].as_u64().is_some_and(|t| t > 0),
            "{vm}"
        );
    }
    let ttl_left = vms[a.as_str()]["ttl_left_ms"].as_u64().expect("TTL left");
    assert!((3_000_000..=3_600_000).contains(&ttl_left), "{ttl_left}");
    assert!(vms[b.as_str()]["ttl_left_ms"].is_null());

    // list, table: a header and a row per VM.
    let run = ctl(&manager, &["list"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", run.stdout);
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        [
            "ID", "STATE", "PID", "PORT", "TEE", "VTPM", "RESTARTS", "UPTIME", "TTL", "LEFT",
            "LAST", "EXIT"
        ]
    );
    let row_a = lines
        .iter()
        .find(|l| l.starts_with(a.as_str()))
        .unwrap_or_else(|| panic!("no row for {a}: {}", run.stdout));
    let cells: Vec<&str> = row_a.split_whitespace().collect();
    assert_eq!(cells[1], "running", "{row_a}");
    assert_eq!(cells[3], port_a.to_string(), "{row_a}");
    assert_eq!(cells[4..7], ["none", "no", "0"], "{row_a}");

    // info via GetVm, JSON: the VM, its launch configuration and QEMU's
    // command line.
    let run = ctl(&manager, &["info", &a, "-o", "json"]);
    assert_eq!(run.code, 0, "info: {}", run.stderr);
    let info = run.json();
    assert_eq!(info["api"], "operator", "{info}");
    assert_eq!(info["id"], a.as_str());
    assert_eq!(info["state"], "running");
    assert_eq!(info["port"].as_u64(), Some(u64::from(port_a)));
    assert_eq!(info["pid"], vms[a.as_str()]["pid"]);
    assert_eq!(info["launch"]["cpu_num"], 1, "{info}");
    assert_eq!(info["launch"]["cpu_type"], "max", "{info}");
    assert_eq!(info["cpu_type"], "max", "the CVMInfo keys stay: {info}");
    assert!(info["launch"]["settings"].is_object(), "{info}");
    let command_line: Vec<&str> = info["command_line"]
        .as_array()
        .unwrap_or_else(|| panic!("command_line: {info}"))
        .iter()
        .map(|w| w.as_str().expect("a word"))
        .collect();
    assert!(
        command_line[0].ends_with("qemu-stand-in"),
        "{command_line:?}"
    );
    assert!(
        command_line
            .windows(2)
            .any(|w| w[0] == "-name" && w[1].contains(a.as_str())),
        "{command_line:?}"
    );
    let forward = format!("{port_a}-");
    assert!(
        command_line.iter().any(|w| w.contains(&forward)),
        "the forwarded port is on the command line: {command_line:?}"
    );

    // info, table.
    let run = ctl(&manager, &["info", &a]);
    assert_eq!(run.code, 0, "info: {}", run.stderr);
    let row = |label: &str| {
        run.stdout
            .lines()
            .find(|l| l.starts_with(label))
            .unwrap_or_else(|| panic!("no {label} in {}", run.stdout))
            .to_string()
    };
    assert!(row("STATE").ends_with("running"));
    assert!(row("PORT").ends_with(&port_a.to_string()));
    assert!(row("CPU TYPE").ends_with("max"));
    assert!(row("COMMAND LINE").contains("qemu-stand-in"));
    assert!(row("SETTINGS").contains("--settings lists them"));
    let run = ctl(&manager, &["info", "--settings", &a]);
    assert_eq!(run.code, 0, "info --settings: {}", run.stderr);
    assert!(
        run.stdout
            .lines()
            .any(|l| l.trim() == "MANAGER_QEMU_VTPM=none"),
        "{}",
        run.stdout
    );

    // A watcher of VM b alone, in table mode: it opens with b's current
    // state and the SYNCED line.
    let mut one = Follower::start(&manager, &["events", &b]);
    let current = one.wait_for(limit, "current", |l| l.contains(" current "));
    assert!(
        current.contains(b.as_str()) && current.contains("state=running"),
        "{current}"
    );
    one.wait_for(limit, "synced", |l| l.contains(" synced "));

    // The first watcher saw each create: created, then running.
    for id in [&a, &b] {
        let created = all.wait_json(limit, "created", |e| {
            e["kind"] == "created" && e["id"] == id.as_str()
        });
        let running = all.wait_json(limit, "running", |e| {
            e["kind"] == "running" && e["id"] == id.as_str()
        });
        assert!(
            created["sequence"].as_u64() < running["sequence"].as_u64(),
            "{created} {running}"
        );
        assert_eq!(running["vm"]["state"], "running", "{running}");
        assert!(
            running["vm"]["pid"].as_i64().is_some_and(|p| p > 0),
            "{running}"
        );
    }

    // Removing a: the all-VMs watcher sees it removed, the watcher of b
    // does not.
    assert_eq!(ctl(&manager, &["remove", &a]).code, 0);
    let removed = all.wait_json(limit, "removed", |e| {
        e["kind"] == "removed" && e["id"] == a.as_str()
    });
    assert!(
        removed["time"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{removed}"
    );
    assert_eq!(listed(&manager).keys().collect::<Vec<_>>(), [&b]);
    assert_eq!(ctl(&manager, &["remove", &b]).code, 0);
    let line = one.wait_for(limit, "removed", |l| l.contains(" removed "));
    assert!(line.contains(b.as_str()), "{line}");
    // The watch of one VM ends with its removal: exit 0 without Ctrl-C.
    let status = one.wait_exit(limit);
    assert_eq!(status.code(), Some(0), "{status:?}: {}", one.stderr());
    assert!(one.stderr().is_empty(), "{}", one.stderr());
    assert!(
        one.seen.iter().all(|l| !l.contains(a.as_str())),
        "events of a reached the watcher of b: {:#?}",
        one.seen
    );
    all.wait_json(limit, "removed b", |e| {
        e["kind"] == "removed" && e["id"] == b.as_str()
    });
    assert!(listed(&manager).is_empty());
    let run = ctl(&manager, &["list"]);
    assert_eq!(
        run.stdout.lines().count(),
        1,
        "just the header: {}",
        run.stdout
    );

    // Ctrl-C ends the watcher of all VMs: exit 0, nothing on stderr.
    all.interrupt();
    let status = all.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{status:?}: {}", all.stderr());
    assert!(all.stderr().is_empty(), "{}", all.stderr());
    // Every JSON line of the first watcher parses, in sequence order.
    let sequences: Vec<u64> = json_lines(&all.seen.join("\n"))
        .iter()
        .filter(|e| e["kind"] != "synced" && e["kind"] != "lagged")
        .map(|e| e["sequence"].as_u64().expect("sequence"))
        .collect();
    assert!(sequences.windows(2).all(|w| w[0] < w[1]), "{sequences:?}");
}

#[test]
fn logs_tail_and_follow_until_the_vm_is_removed() {
    // The stand-in writes a boot log, then a few console lines a second.
    let manager = start_on_stand_in(free_port_range(4), &[("STAND_IN_CONSOLE_SPAM", "300")]);
    let (id, _) = ctl_create(&manager, &[]);

    // The console log: the boot lines reach it (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(30);
    let log = loop {
        let run = ctl(&manager, &["logs", &id]);
        assert_eq!(run.code, 0, "logs: {}", run.stderr);
        if run.stdout.contains("qemu-stand-in: booting VM") && run.stdout.contains("console line") {
            break run.stdout;
        }
        assert!(Instant::now() < deadline, "no boot log: {:?}", run.stdout);
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(log.contains(&format!("cocos-{id}")), "{log}");

    // --tail N: exactly the last N lines.
    let run = ctl(&manager, &["logs", &id, "--tail", "2"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.stdout.lines().count(), 2, "{:?}", run.stdout);
    // JSON: one object per line.
    let run = ctl(&manager, &["-o", "json", "logs", &id, "--tail", "3"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let lines = json_lines(&run.stdout);
    assert_eq!(lines.len(), 3, "{:?}", run.stdout);
    for line in &lines {
        assert_eq!(line["source"], "console", "{line}");
        assert!(
            line["line"].as_str().is_some_and(|l| !l.contains('\n')),
            "{line}"
        );
    }
    // QEMU's own log (the stand-in writes little or nothing there).
    let run = ctl(&manager, &["logs", "--qemu", &id]);
    assert_eq!(run.code, 0, "{}", run.stderr);

    // -f follows new lines, and ends with 0 when the VM is removed.
    let mut follower = Follower::start(&manager, &["logs", "-f", "--tail", "0", &id]);
    let first = follower.wait_for(Duration::from_secs(30), "new console line", |l| {
        l.contains("console line")
    });
    let number = |line: &str| -> u64 {
        line.split("console line")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no line number in {line:?}"))
    };
    let n = number(&first);
    follower.wait_for(Duration::from_secs(30), "a later console line", |l| {
        l.contains("console line") && number(l) > n
    });
    assert_eq!(ctl(&manager, &["remove", &id]).code, 0);
    let status = follower.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{status:?}: {}", follower.stderr());
    assert!(follower.stderr().is_empty(), "{}", follower.stderr());
    assert_eq!(ctl(&manager, &["logs", &id]).code, 3);

    // Ctrl-C ends a following logs with 0 too.
    let (other, _) = ctl_create(&manager, &[]);
    let mut follower = Follower::start(&manager, &["-o", "json", "logs", "--follow", &other]);
    let line = follower.wait_json(Duration::from_secs(30), "a console line", |l| {
        l["line"]
            .as_str()
            .is_some_and(|t| t.contains("qemu-stand-in"))
    });
    assert_eq!(line["source"], "console");
    follower.interrupt();
    let status = follower.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{status:?}: {}", follower.stderr());
    assert!(follower.stderr().is_empty(), "{}", follower.stderr());
    assert_eq!(ctl(&manager, &["remove", &other]).code, 0);
}
