//! End-to-end: the real daemon, a real gRPC client over a real socket, real
//! QEMU booting the development guest under TCG.

mod common;

use std::time::Duration;

use cocos_core::proto::{CreateReq, CvmInfoReq, RemoveReq};
use common::*;
use tonic::Code;

const AGENT_BOOT_LIMIT: Duration = Duration::from_secs(180);

fn request() -> CreateReq {
    CreateReq {
        agent_log_level: "debug".into(),
        agent_cvm_server_ca_cert: b"-----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----\n"
            .to_vec(),
        agent_cvm_client_key: b"-----BEGIN PRIVATE KEY-----\nKEY\n-----END PRIVATE KEY-----\n"
            .to_vec(),
        agent_cvm_client_cert: b"-----BEGIN CERTIFICATE-----\nCERT\n-----END CERTIFICATE-----\n"
            .to_vec(),
        agent_cvm_server_url: "cvms.example:7001".into(),
        agent_cvm_ca_url: "https://ca.example".into(),
        ttl: String::new(),
        agent_certs_token: "token-123".into(),
        aws_access_key_id: "AKIAEXAMPLE".into(),
        aws_secret_access_key: "s3cr3t".into(),
        aws_endpoint_url: "https://s3.example".into(),
        aws_region: "eu-west-1".into(),
        aa_kbs_params: "cc_kbc::http://kbs.example:8080".into(),
    }
}

async fn agent(port: u16) {
    tokio::task::spawn_blocking(move || wait_agent(port, AGENT_BOOT_LIMIT))
        .await
        .expect("join")
        .unwrap_or_else(|e| panic!("{e}"));
}

async fn get(port: u16, path: &'static str) -> (u16, String) {
    tokio::task::spawn_blocking(move || http_get(port, path))
        .await
        .expect("join")
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_boot_query_remove() {
    // A single port, so the next create proves the port came back.
    let range = free_port_range(1);
    let manager = Manager::start_with(Manager::dev_env(range), range);
    let mut client = manager.client().await;

    let created = client
        .create_vm(request())
        .await
        .expect("CreateVm")
        .into_inner();
    let port: u16 = created.forwarded_port.parse().expect("decimal port");
    assert_eq!(port, range.0);
    let id = created.cvm_id.clone();
    assert_eq!(
        uuid::Uuid::parse_str(&id).expect("uuid").get_version_num(),
        4
    );

    let pids = pids_matching(&id);
    assert_eq!(pids.len(), 1, "one QEMU for the VM");
    let pid = pids[0];

    agent(port).await;
    let (status, env) = get(port, "/env").await;
    assert_eq!(status, 200);
    assert_eq!(
        env,
        format!(
            "AGENT_LOG_LEVEL=debug\nAGENT_CVM_GRPC_URL=cvms.example:7001\nAGENT_CVM_ID={id}\n\
             AGENT_CERTS_TOKEN=token-123\nAGENT_CVM_CA_URL=https://ca.example\n\
             AGENT_CVM_GRPC_CLIENT_CERT=/etc/certs/cert.pem\nAGENT_CVM_GRPC_CLIENT_KEY=/etc/certs/key.pem\n\
             AGENT_CVM_GRPC_SERVER_CA_CERTS=/etc/certs/ca.pem\nAWS_ACCESS_KEY_ID=AKIAEXAMPLE\n\
             AWS_SECRET_ACCESS_KEY=s3cr3t\nAWS_ENDPOINT_URL=https://s3.example\nAWS_REGION=eu-west-1\n"
        )
    );
    let (status, certs) = get(port, "/certs").await;
    assert_eq!(status, 200);
    let mut names: Vec<&str> = certs.lines().collect();
    names.sort();
    assert_eq!(names, ["ca.pem", "cert.pem", "key.pem"]);

    // The key is a secret on the host too.
    let key = manager.vms_dir().join(&id).join("certs/key.pem");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&key).expect("key.pem").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    let info = client
        .cvm_info(CvmInfoReq { id: id.clone() })
        .await
        .expect("CVMInfo")
        .into_inner();
    assert_eq!(info.id, id);
    assert_eq!(info.cpu_num, 1);
    assert_eq!(info.cpu_type, "max");
    assert_eq!(
        info.kernel_cmd,
        "console=ttyS0 quiet agent.aa_kbc_params=cc_kbc::http://kbs.example:8080"
    );

    client
        .remove_vm(RemoveReq { cvm_id: id.clone() })
        .await
        .expect("RemoveVm");
    assert!(
        !process_exists(pid),
        "QEMU {pid} still exists after RemoveVm (zombie: {})",
        is_zombie(pid)
    );
    assert!(
        !manager.vms_dir().join(&id).exists(),
        "VM folder left behind"
    );
    assert!(port_is_free(port), "forwarded port still bound");
    let err = client
        .cvm_info(CvmInfoReq { id: id.clone() })
        .await
        .expect_err("gone");
    assert_eq!(err.code(), Code::NotFound);

    // The only port of the range is free again for the next VM.
    let again = client
        .create_vm(request())
        .await
        .expect("second CreateVm")
        .into_inner();
    assert_eq!(again.forwarded_port, port.to_string());
    client
        .remove_vm(RemoveReq {
            cvm_id: again.cvm_id,
        })
        .await
        .expect("RemoveVm");
    assert!(manager.vm_folders().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_get_distinct_reachable_ports() {
    let manager = Manager::start(&[]);
    let client = manager.client().await;
    let creates = (0..3).map(|_| {
        let mut c = client.clone();
        async move { c.create_vm(request()).await }
    });
    let results = futures_join_all(creates).await;
    let mut ports = Vec::new();
    let mut ids = Vec::new();
    for r in results {
        let r = r.expect("CreateVm").into_inner();
        ports.push(r.forwarded_port.parse::<u16>().expect("port"));
        ids.push(r.cvm_id);
    }
    let mut distinct = ports.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "ports handed out twice: {ports:?}");
    for port in &ports {
        assert!((manager.range.0..=manager.range.1).contains(port));
    }
    for port in &ports {
        agent(*port).await;
    }
    let removes = ids.iter().map(|id| {
        let mut c = client.clone();
        let id = id.clone();
        async move { c.remove_vm(RemoveReq { cvm_id: id }).await }
    });
    for r in futures_join_all(removes).await {
        r.expect("RemoveVm");
    }
    assert!(manager.vm_folders().is_empty());
    assert!(qemu_pids_under(manager.state_dir.path()).is_empty());
    for port in ports {
        assert!(port_is_free(port));
    }
}

/// CreateVm fails with FAILED_PRECONDITION and the reason names `needle`.
async fn assert_start_fails(client: &mut Client, needle: &str) {
    let err = client
        .create_vm(request())
        .await
        .expect_err("the start must fail");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(
        err.message().contains(needle),
        "the reason must name {needle}: {}",
        err.message()
    );
}

async fn futures_join_all<F: std::future::Future>(
    futures: impl IntoIterator<Item = F>,
) -> Vec<F::Output> {
    let handles: Vec<_> = futures.into_iter().collect();
    let mut out = Vec::new();
    // Poll all at once: start them on the runtime, then collect in order.
    let mut pinned: Vec<_> = handles.into_iter().map(Box::pin).collect();
    let mut done: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, fut) in pinned.iter_mut().enumerate() {
            if done[i].is_none() {
                match fut.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => done[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    for v in done {
        out.extend(v);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_ids_are_not_found() {
    let manager = Manager::start(&[]);
    let mut client = manager.client().await;
    for id in ["", "nope", "e71cdcf5-21c0-4e1d-9471-ac6b4389d5f3"] {
        let err = client
            .remove_vm(RemoveReq { cvm_id: id.into() })
            .await
            .expect_err("unknown");
        assert_eq!(err.code(), Code::NotFound, "{id}: {err}");
        let err = client
            .cvm_info(CvmInfoReq { id: id.into() })
            .await
            .expect_err("unknown");
        assert_eq!(err.code(), Code::NotFound, "{id}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_create_nothing() {
    let manager = Manager::start(&[]);
    let mut client = manager.client().await;
    let cases: Vec<(&str, CreateReq)> = vec![
        (
            "ttl",
            CreateReq {
                ttl: "ten minutes".into(),
                ..request()
            },
        ),
        (
            "ttl",
            CreateReq {
                ttl: "-5s".into(),
                ..request()
            },
        ),
        (
            "agent_log_level",
            CreateReq {
                agent_log_level: "info\nAGENT_EVIL=1".into(),
                ..request()
            },
        ),
        (
            "agent_certs_token",
            CreateReq {
                agent_certs_token: "a\0b".into(),
                ..request()
            },
        ),
        (
            "aa_kbs_params",
            CreateReq {
                aa_kbs_params: "x init=/bin/sh".into(),
                ..request()
            },
        ),
    ];
    for (field, req) in cases {
        let err = client.create_vm(req).await.expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err}");
        assert!(err.message().contains(field), "{field}: {}", err.message());
    }
    assert!(manager.vm_folders().is_empty());
    assert!(qemu_pids_under(manager.state_dir.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_expiry_removes_the_vm() {
    let manager = Manager::start(&[("MANAGER_STOP_POWERDOWN_TIMEOUT", "1s")]);
    let mut client = manager.client().await;
    let created = client
        .create_vm(CreateReq {
            ttl: "2s".into(),
            ..request()
        })
        .await
        .expect("CreateVm")
        .into_inner();
    let id = created.cvm_id.clone();
    let port: u16 = created.forwarded_port.parse().expect("port");
    let pid = pids_matching(&id)[0];
    client
        .cvm_info(CvmInfoReq { id: id.clone() })
        .await
        .expect("exists before the TTL");
    let dir = manager.vms_dir().join(&id);
    assert!(
        eventually(Duration::from_secs(30), || !process_exists(pid)
            && !dir.exists())
        .await,
        "TTL did not remove the VM:\n{}",
        manager.log()
    );
    let err = client.cvm_info(CvmInfoReq { id }).await.expect_err("gone");
    assert_eq!(err.code(), Code::NotFound);
    assert!(port_is_free(port));
    assert!(manager.log().contains("TTL expired"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_limit_holds_under_concurrency() {
    let manager = Manager::start(&[("MANAGER_MAX_VMS", "2")]);
    let client = manager.client().await;
    let creates = (0..4).map(|_| {
        let mut c = client.clone();
        async move { c.create_vm(request()).await }
    });
    let results = futures_join_all(creates).await;
    let ok: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    let refused: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(ok.len(), 2, "{results:?}");
    assert_eq!(refused.len(), 2);
    for err in refused {
        assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    }
    assert_eq!(manager.vm_folders().len(), 2);
    let mut client = client;
    for created in ok {
        client
            .remove_vm(RemoveReq {
                cvm_id: created.get_ref().cvm_id.clone(),
            })
            .await
            .expect("RemoveVm");
    }
    // With the slots free again a create succeeds.
    let created = client
        .create_vm(request())
        .await
        .expect("CreateVm after removes")
        .into_inner();
    client
        .remove_vm(RemoveReq {
            cvm_id: created.cvm_id,
        })
        .await
        .expect("RemoveVm");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_that_cannot_start_leaves_nothing() {
    let manager = Manager::start(&[("MANAGER_QEMU_DISK_IMG_KERNEL_FILE", "/nonexistent/bzImage")]);
    let mut client = manager.client().await;
    assert_start_fails(&mut client, "/nonexistent/bzImage").await;
    assert!(
        manager.vm_folders().is_empty(),
        "{:?}",
        manager.vm_folders()
    );
    assert!(qemu_pids_under(manager.state_dir.path()).is_empty());
    for port in manager.range.0..=manager.range.1 {
        assert!(port_is_free(port));
    }
    let warned = "MANAGER_QEMU_DISK_IMG_KERNEL_FILE /nonexistent/bzImage does not exist";
    assert!(
        manager.log().contains(warned),
        "the operator is warned at start"
    );

    // A QEMU binary that does not exist at all.
    let mut manager = manager;
    manager.stop_with(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(30));
    manager
        .env
        .insert("MANAGER_QEMU_BIN_PATH".into(), "/nonexistent/qemu".into());
    manager.spawn();
    let mut client = manager.client().await;
    assert_start_fails(&mut client, "/nonexistent/qemu").await;
    assert!(manager.vm_folders().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_forwarded_port_is_skipped() {
    let range = free_port_range(2);
    let manager = Manager::start_with(Manager::dev_env(range), range);
    // Another process holds the first port of the range.
    let _holder = std::net::TcpListener::bind(("0.0.0.0", range.0)).expect("hold port");
    let mut client = manager.client().await;
    let created = client
        .create_vm(request())
        .await
        .expect("CreateVm")
        .into_inner();
    assert_eq!(created.forwarded_port, range.1.to_string());
    // The range has no other free port.
    let err = client.create_vm(request()).await.expect_err("no port left");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    client
        .remove_vm(RemoveReq {
            cvm_id: created.cvm_id,
        })
        .await
        .expect("RemoveVm");
    assert!(manager.vm_folders().is_empty());
}

fn qemu_img(args: &[&str]) -> String {
    let out = std::process::Command::new(require_tool("qemu-img"))
        .args(args)
        .output()
        .expect("run qemu-img");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_mode_gives_each_vm_its_own_grown_copy() {
    let images = tempfile::tempdir().expect("dir");
    let source = images.path().join("enc_os.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        &source.to_string_lossy(),
        "64M",
    ]);
    let source_text = source.to_string_lossy().into_owned();
    let manager = Manager::start(&[
        ("MANAGER_QEMU_ENABLE_DISK", "true"),
        ("MANAGER_QEMU_SRC_DISK_FILE", &source_text),
    ]);
    let mut client = manager.client().await;
    let (id, _) = create(&mut client).await;
    let disk = manager.vms_dir().join(&id).join("disk.qcow2");
    let info: serde_json::Value = serde_json::from_str(&qemu_img(&[
        "info",
        "-U",
        "--output=json",
        &disk.to_string_lossy(),
    ]))
    .expect("json");
    assert_eq!(
        info["virtual-size"],
        serde_json::json!((64u64 << 20) + (1u64 << 30))
    );
    assert_eq!(info["format"], "qcow2");
    let pid = pids_matching(&id)[0];
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.contains(&format!(
        "-drive file={},if=none,id=disk0,format=qcow2",
        disk.display()
    )));
    assert!(!cmdline.contains("-kernel"));
    client
        .remove_vm(RemoveReq { cvm_id: id })
        .await
        .expect("RemoveVm");
    assert!(!disk.exists(), "the VM's disk goes with it");
    assert!(source.exists(), "the source image stays");

    // A missing source image fails the create with qemu-img's own words.
    drop(client);
    let mut manager = manager;
    manager.stop_with(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(30));
    manager.env.insert(
        "MANAGER_QEMU_SRC_DISK_FILE".into(),
        "/nonexistent/enc_os.qcow2".into(),
    );
    manager.spawn();
    let mut client = manager.client().await;
    assert_start_fails(&mut client, "/nonexistent/enc_os.qcow2").await;
    assert!(manager.vm_folders().is_empty());
}
