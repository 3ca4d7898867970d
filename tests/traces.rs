//! Traces end to end: the daemon (on the stand-in QEMU) exports its spans
//! over OTLP/HTTP to a receiver in this test, which decodes them with the
//! official OpenTelemetry protobuf definitions (`opentelemetry-proto`).
//! Also: a collector that does not answer costs nothing but one warning,
//! and a sampling ratio of 0 means no exporter at all.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use cocos_core::proto::{CreateReq, CvmInfoReq, RemoveReq};
use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

/// What the test collector received.
#[derive(Clone, Default)]
struct Received {
    spans: Arc<Mutex<Vec<Span>>>,
    /// `service.name` of each resource that sent spans.
    services: Arc<Mutex<Vec<String>>>,
    /// The raw request bodies, to search for secrets.
    bodies: Arc<Mutex<Vec<Vec<u8>>>>,
    /// Requests whose content type or body was not OTLP protobuf.
    malformed: Arc<Mutex<Vec<String>>>,
}

impl Received {
    fn spans(&self) -> Vec<Span> {
        self.spans.lock().expect("lock").clone()
    }

    fn requests(&self) -> usize {
        self.bodies.lock().expect("lock").len()
    }
}

fn string_attr(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(
            |kv| match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Value::StringValue(s)) => Some(s.clone()),
                _ => None,
            },
        )
}

fn int_attr(span: &Span, key: &str) -> Option<i64> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(
            |kv| match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Value::IntValue(i)) => Some(*i),
                _ => None,
            },
        )
}

fn bool_attr(span: &Span, key: &str) -> Option<bool> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(
            |kv| match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Value::BoolValue(b)) => Some(*b),
                _ => None,
            },
        )
}

async fn collect(
    State(received): State<Received>,
    headers: HeaderMap,
    body: Bytes,
) -> ([(&'static str, &'static str); 1], Vec<u8>) {
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    received.bodies.lock().expect("lock").push(body.to_vec());
    match ExportTraceServiceRequest::decode(body.as_ref()) {
        Ok(request) if content_type == "application/x-protobuf" => {
            for resource_spans in request.resource_spans {
                let service = resource_spans
                    .resource
                    .iter()
                    .flat_map(|r| r.attributes.iter())
                    .find(|kv| kv.key == "service.name")
                    .and_then(
                        |kv| match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                            Some(Value::StringValue(s)) => Some(s.clone()),
                            _ => None,
                        },
                    )
                    .unwrap_or_default();
                received.services.lock().expect("lock").push(service);
                for scope in resource_spans.scope_spans {
                    received.spans.lock().expect("lock").extend(scope.spans);
                }
            }
        }
        Ok(_) => received
            .malformed
            .lock()
            .expect("lock")
            .push(format!("content type {content_type:?}")),
        Err(e) => received
            .malformed
            .lock()
            .expect("lock")
            .push(format!("undecodable body: {e}")),
    }
    (
        [("content-type", "application/x-protobuf")],
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
}

/// An OTLP/HTTP receiver on a free port (`POST /v1/traces`).
async fn receiver() -> (u16, Received) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the receiver");
    let port = listener.local_addr().expect("address").port();
    let received = Received::default();
    let app = axum::Router::new()
        .route("/v1/traces", axum::routing::post(collect))
        .with_state(received.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (port, received)
}

/// A random W3C trace id (32 hex digits) and parent span id (16).
fn ids() -> (String, String) {
    let trace = uuid::Uuid::new_v4().simple().to_string();
    let span = uuid::Uuid::new_v4().simple().to_string()[..16].to_string();
    (trace, span)
}

fn with_trace<T>(message: T, trace: &str, parent: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let traceparent = format!("00-{trace}-{parent}-01");
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().expect("metadata"));
    request
        .metadata_mut()
        .insert("tracestate", "cocostest=1".parse().expect("metadata"));
    request
}

/// Waits (bounded) until `pick` finds what it looks for among the spans.
async fn wait_for<T>(received: &Received, what: &str, pick: impl Fn(&[Span]) -> Option<T>) -> T {
    let mut found = None;
    let ok = eventually(Duration::from_secs(30), || {
        found = pick(&received.spans());
        found.is_some()
    })
    .await;
    assert!(
        ok,
        "{what} not exported within 30s; spans: {:#?}",
        received
            .spans()
            .iter()
            .map(|s| s.name.clone())
            .collect::<Vec<_>>()
    );
    found.expect("found")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_spans_continue_the_callers_trace_and_lifecycle_steps_follow() {
    let (port, received) = receiver().await;
    let url = format!("http://127.0.0.1:{port}");
    let manager = start_on_stand_in(
        free_port_range(4),
        &[
            ("COCOS_JAEGER_URL", &url),
            ("COCOS_JAEGER_TRACE_RATIO", "1"),
            // Export often, so the test need not wait 5s per batch.
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            // The guest ignores the ACPI power-down: the stop goes through
            // two stages, the first one running out.
            ("STAND_IN_IGNORE_POWERDOWN", "1"),
            ("MANAGER_STOP_POWERDOWN_TIMEOUT", "300ms"),
        ],
    );
    let mut client = manager.client().await;

    // A create carrying a trace context and a secret.
    let secret = format!("token-{}", uuid::Uuid::new_v4().simple());
    let (trace, parent) = ids();
    let created = client
        .create_vm(with_trace(
            CreateReq {
                agent_certs_token: secret.clone(),
                ..CreateReq::default()
            },
            &trace,
            &parent,
        ))
        .await
        .expect("CreateVm")
        .into_inner();
    let port: i64 = created.forwarded_port.parse().expect("decimal port");
    let id = created.cvm_id;

    let trace_id = hex_to_bytes(&trace);
    let parent_id = hex_to_bytes(&parent);
    let rpc = wait_for(&received, "the CreateVm span", |spans| {
        spans
            .iter()
            .find(|s| s.name == "manager.ManagerService/CreateVm" && s.trace_id == trace_id)
            .cloned()
    })
    .await;
    assert_eq!(rpc.parent_span_id, parent_id, "parent is the caller's span");
    assert_eq!(rpc.trace_state, "cocostest=1");
    assert_eq!(rpc.kind, SpanKind::Server as i32);
    assert_eq!(string_attr(&rpc, "rpc.system").as_deref(), Some("grpc"));
    assert_eq!(
        string_attr(&rpc, "rpc.service").as_deref(),
        Some("manager.ManagerService")
    );
    assert_eq!(string_attr(&rpc, "rpc.method").as_deref(), Some("CreateVm"));
    assert_eq!(int_attr(&rpc, "rpc.grpc.status_code"), Some(0));
    assert_ne!(
        rpc.status.as_ref().map(|s| s.code),
        Some(StatusCode::Error as i32)
    );

    // The launch's steps are in the same trace, below the request's span.
    let steps = wait_for(&received, "the launch steps of the create", |spans| {
        let in_trace: Vec<Span> = spans
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect();
        [
            "vm.boot",
            "vm.files",
            "vm.launch",
            "vm.spawn",
            "vm.qmp_ready",
        ]
        .iter()
        .all(|name| in_trace.iter().any(|s| s.name == *name))
        .then_some(in_trace)
    })
    .await;
    let by_id: HashMap<Vec<u8>, &Span> = steps.iter().map(|s| (s.span_id.clone(), s)).collect();
    let step = |name: &str| {
        steps
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no {name}"))
    };
    let boot = step("vm.boot");
    assert_eq!(
        boot.parent_span_id, rpc.span_id,
        "vm.boot is the request's child"
    );
    assert_eq!(int_attr(boot, "port"), Some(port));
    assert_eq!(int_attr(step("vm.launch"), "port"), Some(port));
    for name in ["vm.files", "vm.launch", "vm.spawn", "vm.qmp_ready"] {
        let span = step(name);
        assert_eq!(
            string_attr(span, "vm").as_deref(),
            Some(id.as_str()),
            "{name}"
        );
        // Its ancestors lead to the request's span.
        let mut at = span;
        let mut hops = 0;
        while at.parent_span_id != rpc.span_id {
            at = by_id
                .get(&at.parent_span_id)
                .unwrap_or_else(|| panic!("{name}: broken parent chain at {}", at.name));
            hops += 1;
            assert!(hops < 10, "{name}: parent chain too long");
        }
    }
    let spawn = step("vm.spawn");
    assert!(
        int_attr(spawn, "pid").is_some_and(|pid| pid > 0),
        "{spawn:?}"
    );
    assert!(spawn.start_time_unix_nano >= boot.start_time_unix_nano);
    assert!(spawn.end_time_unix_nano <= boot.end_time_unix_nano);

    // A read, with another trace context.
    let (trace2, parent2) = ids();
    client
        .cvm_info(with_trace(CvmInfoReq { id: id.clone() }, &trace2, &parent2))
        .await
        .expect("CVMInfo");
    let (trace2_id, parent2_id) = (hex_to_bytes(&trace2), hex_to_bytes(&parent2));
    let info = wait_for(&received, "the CVMInfo span", |spans| {
        spans
            .iter()
            .find(|s| s.name == "manager.ManagerService/CVMInfo" && s.trace_id == trace2_id)
            .cloned()
    })
    .await;
    assert_eq!(info.parent_span_id, parent2_id);
    assert_eq!(string_attr(&info, "rpc.method").as_deref(), Some("CVMInfo"));

    // An unknown VM: NOT_FOUND is the client's error, the span records the
    // code and no failure.
    let (trace3, parent3) = ids();
    let missing = client
        .cvm_info(with_trace(
            CvmInfoReq {
                id: "no-such-vm".into(),
            },
            &trace3,
            &parent3,
        ))
        .await
        .expect_err("unknown VM");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let trace3_id = hex_to_bytes(&trace3);
    let not_found = wait_for(&received, "the NOT_FOUND span", |spans| {
        spans.iter().find(|s| s.trace_id == trace3_id).cloned()
    })
    .await;
    assert_eq!(int_attr(&not_found, "rpc.grpc.status_code"), Some(5));

    // The stop's stages: the power-down runs out, QMP quit ends QEMU, the
    // VM is released.
    client
        .remove_vm(RemoveReq { cvm_id: id.clone() })
        .await
        .expect("RemoveVm");
    let stop = wait_for(&received, "the stop stages", |spans| {
        let of_vm: Vec<Span> = spans
            .iter()
            .filter(|s| string_attr(s, "vm").as_deref() == Some(id.as_str()))
            .cloned()
            .collect();
        ["vm.stop.powerdown", "vm.stop.quit", "vm.release"]
            .iter()
            .all(|name| of_vm.iter().any(|s| s.name == *name))
            .then_some(of_vm)
    })
    .await;
    let stage = |name: &str| {
        stop.iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no {name}"))
    };
    assert_eq!(
        bool_attr(stage("vm.stop.powerdown"), "timed_out"),
        Some(true)
    );
    assert_eq!(bool_attr(stage("vm.stop.quit"), "timed_out"), Some(false));
    assert_eq!(int_attr(stage("vm.stop.powerdown"), "budget_ms"), Some(300));
    // Each field once (a field recorded twice would be two attributes).
    for span in &received.spans() {
        let mut keys: Vec<&str> = span.attributes.iter().map(|kv| kv.key.as_str()).collect();
        keys.sort_unstable();
        let count = keys.len();
        keys.dedup();
        assert_eq!(keys.len(), count, "{span:?}");
    }
    assert!(
        stage("vm.stop.quit").start_time_unix_nano
            >= stage("vm.stop.powerdown").end_time_unix_nano
                - Duration::from_millis(50).as_nanos() as u64
    );

    // Every span came from this daemon, over OTLP protobuf, and no span
    // carries the request's secret.
    assert!(
        received.malformed.lock().expect("lock").is_empty(),
        "{:?}",
        received.malformed.lock().expect("lock")
    );
    assert!(received
        .services
        .lock()
        .expect("lock")
        .iter()
        .all(|s| s == "cocos-manager"));
    for body in received.bodies.lock().expect("lock").iter() {
        assert!(
            !body.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "the secret reached a span"
        );
    }
    // The log does not show the trace spans.
    let log = manager.log();
    assert!(
        !log.contains("vm.spawn") && !log.contains("otel.name"),
        "{log}"
    );
}

fn hex_to_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect()
}

/// Lines of the log that warn about the trace exporter.
fn exporter_warnings(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            [
                "trace export",
                "collector",
                "opentelemetry",
                "otlp",
                "v1/traces",
            ]
            .iter()
            .any(|word| l.contains(word))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_collector_slows_nothing_and_is_warned_about_once() {
    // A port nobody listens on: connections are refused.
    let dead = free_port();
    let url = format!("http://127.0.0.1:{dead}");
    let mut manager = start_on_stand_in(
        free_port_range(4),
        &[
            ("COCOS_JAEGER_URL", &url),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    let mut client = manager.client().await;
    // Requests answer as usual, before and after the exporter fails.
    let mut slowest = Duration::ZERO;
    let (id, _) = create(&mut client).await;
    // Requests (and so spans) until several exports have failed, then some
    // more; bounded.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut after_failures = 0;
    let mut rounds = 0;
    while after_failures < 20 {
        assert!(
            Instant::now() < deadline,
            "fewer than 3 failed exports logged within 60s:\n{}",
            manager.log()
        );
        let (trace, parent) = ids();
        let began = Instant::now();
        let answer = client
            .cvm_info(with_trace(CvmInfoReq { id: id.clone() }, &trace, &parent))
            .await
            .unwrap_or_else(|e| panic!("CVMInfo {rounds}: {e}"));
        slowest = slowest.max(began.elapsed());
        assert_eq!(answer.into_inner().id, id);
        rounds += 1;
        if manager.log().matches("trace export failed").count() >= 3 {
            after_failures += 1;
        } else {
            // Polling: the exporter fails on its own schedule.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Far below the export timeout (5s): no request waited for the exporter.
    assert!(
        slowest < Duration::from_secs(2),
        "slowest CVMInfo {slowest:?}"
    );
    client
        .remove_vm(RemoveReq { cvm_id: id })
        .await
        .expect("RemoveVm");
    // A bounded shutdown, the flush included.
    let began = Instant::now();
    let status = manager.stop_with(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        manager.log()
    );
    assert!(
        began.elapsed() < Duration::from_secs(15),
        "{:?}",
        began.elapsed()
    );
    let log = manager.log();
    let warnings = exporter_warnings(&log);
    assert_eq!(warnings.len(), 1, "{warnings:#?}\n{log}");
    assert!(
        warnings[0].contains("trace export failed"),
        "{}",
        warnings[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_exporter_at_ratio_zero_or_without_url() {
    let (port, received) = receiver().await;
    let url = format!("http://127.0.0.1:{port}");
    for extra in [
        vec![
            ("COCOS_JAEGER_URL", url.as_str()),
            ("COCOS_JAEGER_TRACE_RATIO", "0"),
        ],
        vec![("COCOS_JAEGER_URL", ""), ("COCOS_JAEGER_TRACE_RATIO", "1")],
    ] {
        let mut env = extra.clone();
        env.push(("OTEL_BSP_SCHEDULE_DELAY", "100"));
        let mut manager = start_on_stand_in(free_port_range(4), &env);
        let mut client = manager.client().await;
        let (trace, parent) = ids();
        let (id, _) = create(&mut client).await;
        client
            .cvm_info(with_trace(CvmInfoReq { id: id.clone() }, &trace, &parent))
            .await
            .expect("CVMInfo");
        client
            .remove_vm(RemoveReq { cvm_id: id })
            .await
            .expect("RemoveVm");
        // An exporter would flush at shutdown: nothing may arrive.
        let status = manager.stop_with(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(30));
        assert!(status.is_some_and(|s| s.success()), "{status:?}");
        let log = manager.log();
        assert!(log.contains("traces off"), "{extra:?}: {log}");
        assert_eq!(received.requests(), 0, "{extra:?}: spans were exported");
        assert!(exporter_warnings(&log).is_empty(), "{log}");
    }
}
