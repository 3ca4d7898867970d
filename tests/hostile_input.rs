//! Hostile and broken input against the real daemon over a real socket (the
//! stand-in QEMU runs the VMs): TTLs that overflow or exceed the maximum,
//! invalid UTF-8 in every string field, an oversized message, a request
//! slower than `MANAGER_GRPC_TIMEOUT`, and more connections than allowed.
//! Also that every request type from the public generated client still
//! decodes unchanged through the server's own reading of the wire.

mod common;

use std::time::{Duration, Instant};

use cocos_core::guest::validate_create;
use cocos_core::proto::{AttestationPolicyReq, CreateReq, CvmInfoReq, RemoveReq};
use cocos_core::server_proto;
use common::*;
use prost::bytes::{Buf, BufMut};
use prost::Message;
use tokio::io::AsyncReadExt;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// Sends and receives message bodies as they are: requests are built by
/// hand or from the server-side (bytes) types, so they can carry what the
/// public client never would.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;
#[derive(Debug)]
struct RawEncoder;
#[derive(Debug)]
struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut body = vec![0; src.remaining()];
        src.copy_to_slice(&mut body);
        Ok(Some(body))
    }
}

async fn channel(manager: &Manager) -> Channel {
    Endpoint::from_shared(format!("http://127.0.0.1:{}", manager.grpc_port))
        .expect("url")
        .connect()
        .await
        .expect("gRPC connection")
}

/// One unary call of `method` with `body` as the encoded request.
async fn raw_call(
    channel: &Channel,
    method: &'static str,
    body: Vec<u8>,
) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("not ready: {e}")))?;
    grpc.unary(
        tonic::Request::new(body),
        PathAndQuery::from_static(method),
        RawCodec,
    )
    .await
    .map(tonic::Response::into_inner)
}

const CREATE: &str = "/manager.ManagerService/CreateVm";
const REMOVE: &str = "/manager.ManagerService/RemoveVm";
const INFO: &str = "/manager.ManagerService/CVMInfo";
const POLICY: &str = "/manager.ManagerService/AttestationPolicy";

/// A single length-delimited field, encoded by hand.
fn field(number: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![(number << 3) | 2];
    let mut len = value.len();
    loop {
        let byte = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
    out.extend_from_slice(value);
    out
}

const BAD_UTF8: &[u8] = b"ok\xff\xfe";

/// A value of `name` in the manager's `/metrics`.
async fn metric(manager: &Manager, name: &str) -> Option<u64> {
    let port = manager.http_port;
    let (_, text) = tokio::task::spawn_blocking(move || http_get(port, "/metrics"))
        .await
        .expect("join")
        .ok()?;
    text.lines().find_map(|line| {
        line.strip_prefix(name)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Polls `/metrics` until `name` has a value for which `cond` holds.
async fn wait_metric(manager: &Manager, name: &str, limit: Duration, cond: impl Fn(u64) -> bool) {
    let deadline = Instant::now() + limit;
    let mut last = None;
    while Instant::now() < deadline {
        last = metric(manager, name).await;
        if last.is_some_and(&cond) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{name} stayed at {last:?} for {limit:?}\n{}", manager.log());
}

/// No VM folder, no VM process, no VM in the books.
async fn wait_no_vms(manager: &Manager, limit: Duration) {
    let state = manager.state_dir.path().to_string_lossy().into_owned();
    assert!(
        eventually(limit, || manager.vm_folders().is_empty()
            && pids_matching(&state).is_empty())
        .await,
        "VMs left: folders {:?}, processes {:?}\n{}",
        manager.vm_folders(),
        pids_matching(&state),
        manager.log()
    );
    for state in ["running", "starting", "failed"] {
        wait_metric(
            manager,
            &format!("cocos_manager_vms{{state=\"{state}\"}}"),
            limit,
            |v| v == 0,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_from_the_public_client_decodes_unchanged() {
    let manager = start_on_stand_in(free_port_range(4), &[]);
    let mut client = manager.client().await;
    // Every field set, with non-ASCII text and binary certificates.
    let request = CreateReq {
        agent_log_level: "débug-✓".into(),
        agent_cvm_server_ca_cert: b"CA\x00\xff".to_vec(),
        agent_cvm_client_key: b"KEY\xfe".to_vec(),
        agent_cvm_client_cert: b"CERT".to_vec(),
        agent_cvm_server_url: "cvms.example:7001".into(),
        agent_cvm_ca_url: "https://ca.example/ü".into(),
        ttl: "1h30m".into(),
        agent_certs_token: "tök".into(),
        aws_access_key_id: "AKIA".into(),
        aws_secret_access_key: "s€cret".into(),
        aws_endpoint_url: "https://s3.example".into(),
        aws_region: "eu-west-1".into(),
        aa_kbs_params: "provider:kbs::http://kbs:8080".into(),
    };
    let created = client
        .create_vm(request.clone())
        .await
        .unwrap_or_else(|e| panic!("CreateVm: {e}\n{}", manager.log()))
        .into_inner();
    let port: u16 = created.forwarded_port.parse().expect("decimal port");
    let expected_env = validate_create(&request)
        .expect("valid")
        .environment_file(&created.cvm_id);
    let (env, certs) =
        tokio::task::spawn_blocking(move || (http_get(port, "/env"), http_get(port, "/certs")))
            .await
            .expect("join");
    assert_eq!(env.expect("GET /env"), (200, expected_env));
    assert_eq!(
        certs.expect("GET /certs"),
        (200, "ca.pem\ncert.pem\nkey.pem".to_string())
    );

    let info = info(&mut client, &created.cvm_id).await;
    assert_eq!(info.id, created.cvm_id);
    assert!(
        info.kernel_cmd.contains("provider:kbs::http://kbs:8080"),
        "{info:?}"
    );
    // The stand-in profile has no SEV-SNP or TDX: the request decodes and
    // gets its documented answer.
    let err = client
        .attestation_policy(AttestationPolicyReq {
            id: created.cvm_id.clone(),
        })
        .await
        .expect_err("no launch measurement without a TEE");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    client
        .remove_vm(RemoveReq {
            cvm_id: created.cvm_id.clone(),
        })
        .await
        .expect("RemoveVm");
    let err = client
        .cvm_info(CvmInfoReq {
            id: created.cvm_id.clone(),
        })
        .await
        .expect_err("removed");
    assert_eq!(err.code(), Code::NotFound);
    assert_nothing_left(&manager).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_in_any_string_field_is_invalid_argument() {
    let manager = start_on_stand_in(free_port_range(4), &[]);
    let channel = channel(&manager).await;

    type Poke = fn(&mut server_proto::CreateReq);
    let create_fields: [(&str, Poke); 10] = [
        ("agent_log_level", |r| r.agent_log_level = BAD_UTF8.to_vec()),
        ("agent_cvm_server_url", |r| {
            r.agent_cvm_server_url = BAD_UTF8.to_vec()
        }),
        ("agent_cvm_ca_url", |r| {
            r.agent_cvm_ca_url = BAD_UTF8.to_vec()
        }),
        ("ttl", |r| r.ttl = BAD_UTF8.to_vec()),
        ("agent_certs_token", |r| {
            r.agent_certs_token = BAD_UTF8.to_vec()
        }),
        ("aws_access_key_id", |r| {
            r.aws_access_key_id = BAD_UTF8.to_vec()
        }),
        ("aws_secret_access_key", |r| {
            r.aws_secret_access_key = BAD_UTF8.to_vec()
        }),
        ("aws_endpoint_url", |r| {
            r.aws_endpoint_url = BAD_UTF8.to_vec()
        }),
        ("aws_region", |r| r.aws_region = BAD_UTF8.to_vec()),
        ("aa_kbs_params", |r| r.aa_kbs_params = BAD_UTF8.to_vec()),
    ];
    for (name, poke) in create_fields {
        let mut req = server_proto::CreateReq {
            agent_log_level: b"info".to_vec(),
            ..Default::default()
        };
        poke(&mut req);
        let err = raw_call(&channel, CREATE, req.encode_to_vec())
            .await
            .expect_err(name);
        assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err}");
        assert!(
            err.message().starts_with(&format!("invalid {name}: "))
                && err.message().contains("UTF-8"),
            "{name}: {}",
            err.message()
        );
    }
    // The same bytes in a bytes field are a certificate's business.
    let req = server_proto::CreateReq {
        agent_cvm_client_key: BAD_UTF8.to_vec(),
        ttl: b"1h".to_vec(),
        ..Default::default()
    };
    let created = raw_call(&channel, CREATE, req.encode_to_vec())
        .await
        .unwrap_or_else(|e| panic!("a binary key is fine: {e}"));
    let created = cocos_core::proto::CreateRes::decode(created.as_slice()).expect("CreateRes");

    // The one-field requests, encoded by hand.
    for (method, name) in [(REMOVE, "cvm_id"), (INFO, "id"), (POLICY, "id")] {
        let err = raw_call(&channel, method, field(1, BAD_UTF8))
            .await
            .expect_err(method);
        assert_eq!(err.code(), Code::InvalidArgument, "{method}: {err}");
        assert!(
            err.message().starts_with(&format!("invalid {name}: "))
                && err.message().contains("UTF-8"),
            "{method}: {}",
            err.message()
        );
        // Valid UTF-8 on the same path: an unknown id.
        let err = raw_call(&channel, method, field(1, "nö".as_bytes()))
            .await
            .expect_err(method);
        assert_eq!(err.code(), Code::NotFound, "{method}: {err}");
    }
    // A string field as long as a message allows is not echoed back.
    let err = raw_call(&channel, INFO, field(1, &vec![b'a'; 1 << 20]))
        .await
        .expect_err("long id");
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().len() < 200, "{}", err.message());

    // Nothing was made by the refused requests: only the one VM exists.
    assert_eq!(manager.vm_folders(), vec![created.cvm_id.clone()]);
    raw_call(&channel, REMOVE, field(1, created.cvm_id.as_bytes()))
        .await
        .expect("RemoveVm");
    assert_nothing_left(&manager).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_overflow_and_ttl_above_the_maximum_are_refused() {
    let manager = start_on_stand_in(free_port_range(4), &[]);
    let mut client = manager.client().await;
    for (ttl, needle) in [
        (
            "94522879700260684295381835.999999999999h",
            "too large: the longest TTL is 87600h0m0s (10 years)",
        ),
        ("9223372036854775808ns", "too large"),
        (
            "2562047h47m16.854775807s",
            "longer than the longest TTL, 87600h0m0s",
        ),
        ("87600h0m0.000000001s", "longer than the longest TTL"),
        ("87601h", "longer than the longest TTL"),
    ] {
        let err = client
            .create_vm(CreateReq {
                ttl: ttl.into(),
                ..Default::default()
            })
            .await
            .expect_err(ttl);
        assert_eq!(err.code(), Code::InvalidArgument, "{ttl}: {err}");
        assert!(
            err.message().starts_with("invalid ttl: ") && err.message().contains(needle),
            "{ttl}: {}",
            err.message()
        );
    }
    assert!(
        manager.vm_folders().is_empty(),
        "{:?}",
        manager.vm_folders()
    );
    wait_metric(
        &manager,
        "cocos_manager_vms{state=\"starting\"}",
        Duration::from_secs(5),
        |v| v == 0,
    )
    .await;
    wait_metric(
        &manager,
        "cocos_manager_vms{state=\"running\"}",
        Duration::from_secs(5),
        |v| v == 0,
    )
    .await;

    // The maximum itself is a TTL like any other.
    let created = client
        .create_vm(CreateReq {
            ttl: "87600h".into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("a 10-year TTL: {e}\n{}", manager.log()))
        .into_inner();
    client
        .remove_vm(RemoveReq {
            cvm_id: created.cvm_id,
        })
        .await
        .expect("RemoveVm");
    assert_nothing_left(&manager).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_refused_and_the_largest_create_is_not() {
    let manager = start_on_stand_in(free_port_range(4), &[]);
    let mut client = manager.client().await;
    let mib = 1 << 20;
    // Three certificates of the largest size a field accepts fit the
    // default MANAGER_GRPC_MAX_MESSAGE_SIZE (4M).
    let largest = CreateReq {
        agent_cvm_server_ca_cert: vec![b'a'; mib],
        agent_cvm_client_key: vec![b'b'; mib],
        agent_cvm_client_cert: vec![b'c'; mib],
        aa_kbs_params: "x".repeat(8 << 10),
        ..Default::default()
    };
    let created = client
        .create_vm(largest)
        .await
        .unwrap_or_else(|e| panic!("the largest valid CreateReq: {e}\n{}", manager.log()))
        .into_inner();

    let oversized = CreateReq {
        agent_cvm_client_cert: vec![b'c'; 5 * mib],
        ..Default::default()
    };
    let err = client.create_vm(oversized).await.expect_err("5 MiB");
    // tonic's code for a message above the limit.
    assert_eq!(err.code(), Code::OutOfRange, "{err}");
    assert!(
        err.message().contains("too large") && err.message().contains(&(4 * mib).to_string()),
        "{}",
        err.message()
    );
    // The connection and the server are fine afterwards.
    let err = client
        .cvm_info(CvmInfoReq { id: "x".into() })
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(manager.vm_folders(), vec![created.cvm_id.clone()]);
    client
        .remove_vm(RemoveReq {
            cvm_id: created.cvm_id,
        })
        .await
        .expect("RemoveVm");
    assert_nothing_left(&manager).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_slower_than_the_timeout_is_deadline_exceeded_and_leaves_nothing() {
    // The stand-in inherits the manager's environment: each QEMU takes 3 s
    // to come up, three times MANAGER_GRPC_TIMEOUT.
    let manager = start_on_stand_in(
        free_port_range(4),
        &[
            ("MANAGER_GRPC_TIMEOUT", "1s"),
            ("STAND_IN_START_DELAY", "3s"),
            ("MANAGER_STOP_POWERDOWN_TIMEOUT", "2s"),
        ],
    );
    let mut client = manager.client().await;
    let started = Instant::now();
    let err = client
        .create_vm(CreateReq::default())
        .await
        .expect_err("slower than MANAGER_GRPC_TIMEOUT");
    let took = started.elapsed();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
    assert!(
        err.message()
            .starts_with("CreateVm did not finish within 1s (MANAGER_GRPC_TIMEOUT)"),
        "{}",
        err.message()
    );
    assert!(
        err.message().contains("nothing is left behind"),
        "{}",
        err.message()
    );
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(10),
        "answered after {took:?}"
    );
    wait_metric(
        &manager,
        "cocos_manager_grpc_deadline_exceeded_total",
        Duration::from_secs(5),
        |v| v >= 1,
    )
    .await;

    // A client whose own deadline is shorter gives up first; the server
    // sees it go away (or its grpc-timeout pass) mid-create.
    let mut request = tonic::Request::new(CreateReq::default());
    request.set_timeout(Duration::from_millis(300));
    let err = client
        .create_vm(request)
        .await
        .expect_err("client deadline");
    // tonic's client reports its own deadline as CANCELLED "Timeout expired".
    assert!(
        matches!(err.code(), Code::Cancelled | Code::DeadlineExceeded),
        "{err}"
    );

    // Both creates go on in the manager: the VMs come up (or are rolled
    // back) and are removed again, since no client knows their ids.
    wait_no_vms(&manager, Duration::from_secs(60)).await;
    assert!(
        eventually(Duration::from_secs(5), || {
            let log = manager.log();
            log.contains("VM came up after its CreateVm was abandoned")
                || log.contains("went away before the answer")
        })
        .await,
        "the abandoned VMs were never removed:\n{}",
        manager.log()
    );
    assert_nothing_left(&manager).await;

    // Requests that finish in time are unaffected.
    let err = client
        .cvm_info(CvmInfoReq { id: "x".into() })
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_are_refused_and_silent_ones_closed() {
    let manager = start_on_stand_in(free_port_range(4), &[("MANAGER_GRPC_MAX_CONNECTIONS", "3")]);
    let grpc = manager.grpc_port;
    // The harness's own readiness probe has come and gone.
    wait_metric(
        &manager,
        "cocos_manager_grpc_connections_max",
        Duration::from_secs(5),
        |v| v == 3,
    )
    .await;
    wait_metric(
        &manager,
        "cocos_manager_grpc_connections",
        Duration::from_secs(15),
        |v| v == 0,
    )
    .await;

    // Three working clients, each on its own connection, fill the cap.
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut client = cocos_core::proto::manager_service_client::ManagerServiceClient::new(
            channel(&manager).await,
        );
        let err = client
            .cvm_info(CvmInfoReq { id: "x".into() })
            .await
            .expect_err("unknown");
        assert_eq!(err.code(), Code::NotFound);
        clients.push(client);
    }
    wait_metric(
        &manager,
        "cocos_manager_grpc_connections",
        Duration::from_secs(5),
        |v| v == 3,
    )
    .await;

    // A fourth is closed at once: its request fails fast instead of waiting.
    let started = Instant::now();
    let fourth = async {
        let channel = Endpoint::from_shared(format!("http://127.0.0.1:{grpc}"))
            .map_err(|e| Status::internal(e.to_string()))?
            .connect()
            .await
            .map_err(|e| Status::unavailable(format!("connect: {e}")))?;
        cocos_core::proto::manager_service_client::ManagerServiceClient::new(channel)
            .cvm_info(CvmInfoReq { id: "x".into() })
            .await
    };
    let err = tokio::time::timeout(Duration::from_secs(10), fourth)
        .await
        .expect("the refusal is immediate")
        .expect_err("beyond the cap");
    // The connection is closed before the server's preface: not an answer
    // but a transport failure, which tonic reports as UNKNOWN, CANCELLED or
    // UNAVAILABLE depending on when it notices (grpc-go: UNAVAILABLE, "error
    // reading server preface").
    let transport_failure = std::error::Error::source(&err)
        .is_some_and(|e| e.downcast_ref::<tonic::transport::Error>().is_some());
    assert!(
        transport_failure || err.message().starts_with("connect: "),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    wait_metric(
        &manager,
        "cocos_manager_grpc_connections_refused_total",
        Duration::from_secs(5),
        |v| v >= 1,
    )
    .await;
    assert!(
        eventually(Duration::from_secs(5), || manager
            .log()
            .contains("gRPC connection refused"))
        .await,
        "{}",
        manager.log()
    );

    // The clients in place are unaffected; one leaving frees its slot.
    let err = clients[0]
        .cvm_info(CvmInfoReq { id: "y".into() })
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
    clients.pop();
    wait_metric(
        &manager,
        "cocos_manager_grpc_connections",
        Duration::from_secs(10),
        |v| v == 2,
    )
    .await;
    let mut late = cocos_core::proto::manager_service_client::ManagerServiceClient::new(
        channel(&manager).await,
    );
    let err = late
        .cvm_info(CvmInfoReq { id: "z".into() })
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
    drop(late);
    drop(clients);
    wait_metric(
        &manager,
        "cocos_manager_grpc_connections",
        Duration::from_secs(10),
        |v| v == 0,
    )
    .await;

    // Silent sockets fill the cap too, but only until they have said
    // nothing for 10 s: then the manager closes them.
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(
            tokio::net::TcpStream::connect(("127.0.0.1", grpc))
                .await
                .expect("connect"),
        );
    }
    wait_metric(
        &manager,
        "cocos_manager_grpc_connections",
        Duration::from_secs(5),
        |v| v == 3,
    )
    .await;
    let started = Instant::now();
    for stream in &mut silent {
        // The server's own HTTP/2 SETTINGS come first; then the end.
        let until_closed = async {
            let mut buf = [0u8; 256];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(40), until_closed)
            .await
            .expect("the manager closes a silent connection");
    }
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "closed too early: {:?}",
        started.elapsed()
    );
    wait_metric(
        &manager,
        "cocos_manager_grpc_connections_silent_total",
        Duration::from_secs(5),
        |v| v >= 3,
    )
    .await;
    wait_metric(
        &manager,
        "cocos_manager_grpc_connections",
        Duration::from_secs(10),
        |v| v == 0,
    )
    .await;
    let mut after = manager.client().await;
    let err = after
        .cvm_info(CvmInfoReq { id: "x".into() })
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
}
