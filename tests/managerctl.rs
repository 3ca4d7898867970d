//! `managerctl` end to end: the real binary against a real daemon (the
//! stand-in QEMU, and once the development guest), its JSON parsed, its exit
//! codes and one-line errors checked.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
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

    // Unknown id: NOT_FOUND, 3, for each command that takes an id.
    for command in ["info", "remove", "policy"] {
        let run = ctl(&manager, &[command, "no-such-vm"]);
        assert_eq!(run.code, 3, "{command}: {} {}", run.stdout, run.stderr);
        assert!(run.stdout.is_empty());
        let line = run.error_line();
        assert!(
            line.starts_with(&format!(
                "managerctl: {command} no-such-vm failed: NOT_FOUND: "
            )),
            "{line}"
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

fn openssl(dir: &Path, args: &[&str]) {
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

/// A CA, a server certificate for localhost and a client certificate (P-256).
fn make_pki(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=test-ca"];
    ca.extend_from_slice(&ec);
    ca.extend_from_slice(&["-keyout", "ca.key", "-out", "ca.pem"]);
    openssl(dir, &ca);
    for (name, cn) in [("server", "localhost"), ("client", "cocos-cli")] {
        let (key, csr, ext, pem) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.ext"),
            format!("{name}.pem"),
        );
        let subject = format!("/CN={cn}");
        let mut req = vec!["req", "-subj", &subject];
        req.extend_from_slice(&ec);
        req.extend_from_slice(&["-keyout", &key, "-out", &csr]);
        openssl(dir, &req);
        std::fs::write(dir.join(&ext), format!("subjectAltName=DNS:{cn}\n")).expect("ext");
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &ext,
                "-out",
                &pem,
            ],
        );
    }
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
    assert!(run.json()["kernel_cmd"]
        .as_str()
        .unwrap_or_default()
        .contains("console=ttyS0"));
    let run = ctl(&manager, &["remove", &id]);
    assert_eq!(run.code, 0, "remove: {}", run.stderr);
    assert!(
        manager.vm_folders().is_empty(),
        "{:?}",
        manager.vm_folders()
    );
}
