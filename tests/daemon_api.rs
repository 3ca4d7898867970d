//! The daemon's surface besides VM lifecycles: health, reflection, the HTTP
//! endpoint, configuration errors at start, --print-qemu-cmd, and noticing a
//! QEMU that dies on its own.

mod common;

use std::process::Command;

use cocos_core::proto::AttestationPolicyReq;
use common::*;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_and_reflection() {
    let manager = Manager::start(&[]);
    let url = format!("http://127.0.0.1:{}", manager.grpc_port);
    let channel = tonic::transport::Endpoint::from_shared(url)
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "manager".into(),
        })
        .await
        .expect("health check")
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .expect("reflection")
        .into_inner();
    let response = responses
        .message()
        .await
        .expect("stream")
        .expect("one response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"manager.ManagerService"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");

    let mut client = manager.client().await;
    let err = client
        .attestation_policy(AttestationPolicyReq { id: "x".into() })
        .await
        .expect_err("no such VM");
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_health_endpoint() {
    let manager = Manager::start(&[("MANAGER_INSTANCE_ID", "host-42")]);
    let port = manager.http_port;
    let (head, body) = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        write!(s, "GET /health HTTP/1.0\r\n\r\n").expect("write");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("read");
        let (head, body) = text.split_once("\r\n\r\n").expect("response");
        (head.to_string(), body.to_string())
    })
    .await
    .expect("join");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/health+json"),
        "{head}"
    );
    let json: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(json["status"], "pass");
    assert_eq!(json["instance_id"], "host-42");
    assert_eq!(json["description"], "manager service");
    assert!(json["version"].is_string());

    let status = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        write!(s, "POST /health HTTP/1.0\r\nContent-Length: 0\r\n\r\n").expect("write");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("read");
        text
    })
    .await
    .expect("join");
    assert!(status.contains(" 405 "), "{status}");

    let (code, metrics) = tokio::task::spawn_blocking(move || http_get(port, "/metrics"))
        .await
        .expect("join")
        .expect("metrics");
    assert_eq!(code, 200);
    assert!(
        metrics.contains("cocos_manager_vms{state=\"running\"} 0"),
        "{metrics}"
    );
}

#[test]
fn bad_configuration_is_refused_at_start() {
    let stderr = refused_at_start(&[("MANAGER_QEMU_SMP_COUNT", "lots")]);
    assert!(
        stderr.contains("MANAGER_QEMU_SMP_COUNT") && stderr.contains("lots"),
        "{stderr}"
    );

    let out = Command::new(manager_binary())
        .env_clear()
        .args(["--config", "/nonexistent/manager.toml"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/manager.toml"));
}

#[test]
fn print_qemu_cmd_shows_the_configured_command() {
    let out = Command::new(manager_binary())
        .current_dir(repo_root())
        .env_clear()
        .env("MANAGER_QEMU_TYPO", "1")
        .args(["--config", "config/dev.toml", "--print-qemu-cmd"])
        .output()
        .expect("run");
    assert!(out.status.success());
    let cmd = String::from_utf8_lossy(&out.stdout);
    assert!(
        cmd.starts_with(
            "qemu-system-x86_64 -machine q35 -cpu max -smp 1,maxcpus=64 -m 512M,slots=5,maxmem=30G"
        ),
        "{cmd}"
    );
    assert!(!cmd.contains("-enable-kvm"));
    assert!(cmd.contains("hostfwd=tcp:127.0.0.1:7020-:7002"), "{cmd}");
    assert!(cmd.contains("-append 'console=ttyS0 quiet'"), "{cmd}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("MANAGER_QEMU_TYPO"),
        "unknown variable must be warned about: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_manager_on_the_same_state_dir_is_refused() {
    let manager = Manager::start(&[]);
    let out = Command::new(manager_binary())
        .current_dir(repo_root())
        .env_clear()
        .args(["--config", "config/dev.toml"])
        .env("MANAGER_STATE_DIR", manager.state_dir.path().join("state"))
        .env("MANAGER_GRPC_PORT", free_port().to_string())
        .env("MANAGER_HTTP_PORT", free_port().to_string())
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("another cocos-manager is using MANAGER_STATE_DIR"),
        "{stderr}"
    );
    // The first one is unaffected.
    let mut client = manager.client().await;
    let (id, _) = create(&mut client).await;
    client
        .remove_vm(cocos_core::proto::RemoveReq { cvm_id: id })
        .await
        .expect("RemoveVm");
}
