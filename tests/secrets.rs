//! Secrets stay secret: a unique value planted in every request field that
//! carries a key, a token or a secret goes through a create, refused
//! creates, a create whose QEMU fails to start and a remove, with the log at
//! debug and at trace; then the daemon's whole log is searched for each
//! value, raw, base64 (any alignment, both alphabets) and hex. Also: plaintext
//! gRPC on an address that is not loopback is refused at start unless
//! `MANAGER_GRPC_ALLOW_PLAINTEXT=true`. The VMs run the stand-in QEMU (a
//! test double).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use cocos_core::proto::{CreateReq, CvmInfoReq, RemoveReq};
use common::*;
use tonic::Code;

/// The secret fields of one request, each with its own unique value.
struct Planted {
    values: Vec<(&'static str, String)>,
}

impl Planted {
    fn new() -> Planted {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let values = [
            "agent_cvm_client_key",
            "agent_certs_token",
            "aws_access_key_id",
            "aws_secret_access_key",
        ]
        .into_iter()
        .map(|field| (field, format!("planted-{field}-{tag}")))
        .collect();
        Planted { values }
    }

    fn get(&self, field: &str) -> &str {
        &self
            .values
            .iter()
            .find(|(f, _)| *f == field)
            .expect("field")
            .1
    }

    /// A full request carrying the planted secrets; the key is a PEM block
    /// around its planted value, as a real one would be.
    fn request(&self, ttl: &str) -> CreateReq {
        CreateReq {
            agent_log_level: "debug".into(),
            agent_cvm_server_ca_cert:
                b"-----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----\n".to_vec(),
            agent_cvm_client_key: format!(
                "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
                self.get("agent_cvm_client_key")
            )
            .into_bytes(),
            agent_cvm_client_cert:
                b"-----BEGIN CERTIFICATE-----\nCERT\n-----END CERTIFICATE-----\n".to_vec(),
            agent_cvm_server_url: "cvms.example:7001".into(),
            agent_cvm_ca_url: "https://ca.example".into(),
            ttl: ttl.into(),
            agent_certs_token: self.get("agent_certs_token").into(),
            aws_access_key_id: self.get("aws_access_key_id").into(),
            aws_secret_access_key: self.get("aws_secret_access_key").into(),
            aws_endpoint_url: "https://s3.example".into(),
            aws_region: "eu-west-1".into(),
            aa_kbs_params: "provider:kbs::http://kbs:8080".into(),
        }
    }

    /// Every form a value could take in a log: itself, its base64 in both
    /// alphabets at each of the three alignments it can have inside a
    /// longer encoded text (the groups that depend on neighbours cut off),
    /// and its hex.
    fn forms(&self) -> Vec<(String, &'static str)> {
        let mut forms = Vec::new();
        for (field, value) in &self.values {
            forms.push((value.clone(), *field));
            let bytes = value.as_bytes();
            for engine in [&STANDARD, &URL_SAFE, &STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
                for shift in 0..3 {
                    let mut shifted = vec![b'x'; shift];
                    shifted.extend_from_slice(bytes);
                    let encoded = engine.encode(&shifted);
                    let skip = if shift == 0 { 0 } else { 4 };
                    let stable = &encoded[skip..encoded.len() - 4];
                    forms.push((stable.to_string(), *field));
                }
            }
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            forms.push((hex.clone(), *field));
            forms.push((hex.to_uppercase(), *field));
        }
        forms
    }

    /// Fails naming each planted value (in any form) found in `text`.
    fn assert_absent(&self, text: &str, what: &str) {
        let found: Vec<_> = self
            .forms()
            .into_iter()
            .filter(|(form, _)| text.contains(form.as_str()))
            .collect();
        assert!(found.is_empty(), "secrets in {what}: {found:?}\n{text}");
    }
}

/// A status message must not carry any secret either.
fn assert_status_clean(planted: &Planted, status: &tonic::Status) {
    planted.assert_absent(status.message(), "an error message");
}

/// One manager at `level`, on the stand-in: a create with every secret, a
/// remove, and creates refused for a bad TTL, a control character in a
/// secret and an oversized secret.
async fn create_remove_and_refusals(level: &str) {
    let planted = Planted::new();
    let mut manager = start_on_stand_in(free_port_range(4), &[("MANAGER_LOG_LEVEL", level)]);
    let mut client = manager.client().await;

    let created = client
        .create_vm(planted.request("1h"))
        .await
        .unwrap_or_else(|e| panic!("CreateVm: {e}"))
        .into_inner();
    client
        .cvm_info(CvmInfoReq {
            id: created.cvm_id.clone(),
        })
        .await
        .expect("CVMInfo");
    client
        .remove_vm(RemoveReq {
            cvm_id: created.cvm_id.clone(),
        })
        .await
        .expect("RemoveVm");

    let mut refusals = vec![
        ("ttl", planted.request("not-a-ttl")),
        ("ttl", planted.request("87601h")),
    ];
    let mut bell = planted.request("1h");
    bell.agent_certs_token.push('\u{7}');
    refusals.push(("agent_certs_token", bell));
    let mut newline = planted.request("1h");
    newline.aws_secret_access_key.push('\n');
    refusals.push(("aws_secret_access_key", newline));
    let mut long = planted.request("1h");
    long.aws_access_key_id.push_str(&"k".repeat(9000));
    refusals.push(("aws_access_key_id", long));
    let mut huge = planted.request("1h");
    huge.agent_cvm_client_key.extend(vec![b'K'; (1 << 20) + 1]);
    refusals.push(("agent_cvm_client_key", huge));
    for (field, request) in refusals {
        let err = client.create_vm(request).await.expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err}");
        assert!(err.message().contains(field), "{field}: {}", err.message());
        assert_status_clean(&planted, &err);
    }
    assert!(
        eventually(Duration::from_secs(10), || manager.vm_folders().is_empty()).await,
        "VM folders left: {:?}",
        manager.vm_folders()
    );
    manager.stop_with(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(30));
    let log = manager.log();
    assert!(
        log.contains("VM running"),
        "the create is in the log:\n{log}"
    );
    assert!(log.contains("CreateVm refused"), "refusals logged:\n{log}");
    assert!(
        log.contains("<redacted>"),
        "the request is logged, redacted:\n{log}"
    );
    if level == "trace" {
        assert!(log.contains("TRACE"), "trace lines are on:\n{log}");
    }
    planted.assert_absent(&log, &format!("the daemon's log at {level}"));
}

/// One manager at `level` whose QEMU fails to start: the create fails with
/// QEMU's own message, and leaves no secret in the log.
async fn qemu_that_fails_to_start(level: &str) {
    let planted = Planted::new();
    let mut manager = start_on_stand_in(
        free_port_range(4),
        &[
            ("MANAGER_LOG_LEVEL", level),
            ("STAND_IN_FAIL_AT_START", "planted start failure"),
        ],
    );
    let mut client = manager.client().await;
    let err = client
        .create_vm(planted.request("1h"))
        .await
        .expect_err("QEMU fails to start");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(
        err.message().contains("planted start failure"),
        "{}",
        err.message()
    );
    assert_status_clean(&planted, &err);
    assert!(
        eventually(Duration::from_secs(10), || manager.vm_folders().is_empty()).await,
        "VM folders left: {:?}",
        manager.vm_folders()
    );
    manager.stop_with(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(30));
    let log = manager.log();
    assert!(
        log.contains("planted start failure"),
        "the failure is in the log:\n{log}"
    );
    planted.assert_absent(&log, &format!("the daemon's log at {level}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_secrets_never_reach_the_log_at_debug() {
    create_remove_and_refusals("debug").await;
    qemu_that_fails_to_start("debug").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_secrets_never_reach_the_log_at_trace() {
    create_remove_and_refusals("trace").await;
    qemu_that_fails_to_start("trace").await;
}

#[test]
fn the_forms_searched_for_are_found_where_they_are() {
    let planted = Planted::new();
    let value = planted.get("aws_secret_access_key");
    for text in [
        format!("x {value} y"),
        format!("AWS={}", STANDARD.encode(format!("k={value};"))),
        URL_SAFE.encode(format!("ab{value}")),
        value
            .bytes()
            .map(|b| format!("{b:02x}"))
            .collect::<String>(),
    ] {
        let found = planted
            .forms()
            .into_iter()
            .any(|(form, _)| text.contains(form.as_str()));
        assert!(found, "not recognised: {text}");
    }
}

/// The manager with `env` on top of the test settings, waited for at most
/// 30 s: its exit status and its output.
fn run_to_exit(env: &[(&str, &str)]) -> (Option<i32>, String) {
    let state = tempfile::tempdir().expect("dir");
    let log_path = state.path().join("out.log");
    let log = std::fs::File::create(&log_path).expect("log");
    let mut cmd = Command::new(manager_binary());
    cmd.current_dir(repo_root())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .args(["--config", "config/dev.toml"])
        .env("MANAGER_STATE_DIR", state.path().join("state"))
        .env("MANAGER_GRPC_PORT", free_port().to_string())
        .env("MANAGER_HTTP_HOST", "127.0.0.1")
        .env("MANAGER_HTTP_PORT", free_port().to_string())
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
    for (k, v) in Manager::dev_env(free_port_range(4)) {
        cmd.env(k, v);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("start cocos-manager");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (
        status,
        std::fs::read_to_string(&log_path).unwrap_or_default(),
    )
}

#[test]
fn plaintext_off_loopback_is_refused_at_start() {
    for host in ["0.0.0.0", "::"] {
        let (status, out) = run_to_exit(&[("MANAGER_GRPC_HOST", host)]);
        assert_eq!(status, Some(2), "{host}: must exit at once:\n{out}");
        for needle in [
            "refusing plaintext gRPC",
            &format!("MANAGER_GRPC_HOST={host:?}"),
            "MANAGER_GRPC_SERVER_CERT",
            "MANAGER_GRPC_ALLOW_PLAINTEXT=true",
        ] {
            assert!(out.contains(needle), "{host}: {needle:?} missing:\n{out}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_off_loopback_is_served_when_explicitly_allowed() {
    let manager = Manager::start(&[
        ("MANAGER_GRPC_HOST", "0.0.0.0"),
        ("MANAGER_GRPC_ALLOW_PLAINTEXT", "true"),
    ]);
    let mut client = manager.client().await;
    let err = client
        .cvm_info(CvmInfoReq { id: "x".into() })
        .await
        .expect_err("unknown id");
    assert_eq!(err.code(), Code::NotFound, "the API answers: {err}");
    let log = manager.log();
    assert!(
        log.contains("serving plaintext on an address that is not loopback"),
        "a warning says so:\n{log}"
    );
    // Loopback plaintext needs no setting: every other test runs on it.
}
