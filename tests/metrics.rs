//! `/metrics` end to end (README: Metrics): the real daemon on the stand-in
//! QEMU, driven over gRPC through a known sequence of creates, refusals,
//! removes, attestation-policy requests, a QEMU crash that supervision
//! restarts, orphans left by QEMU and a manager restart that re-adopts a
//! VM; then `/metrics` is read over HTTP, checked to be well-formed
//! Prometheus text (one HELP and TYPE per family, before its samples; the
//! 0.0.4 content type; no OpenMetrics `# EOF`), parsed with a Prometheus
//! text parser (`prometheus-parse`) and every count compared exactly.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use cocos_core::proto::{AttestationPolicyReq, CreateReq, RemoveReq};
use common::*;
use nix::sys::signal::Signal;
use prometheus_parse::{Sample, Scrape, Value};
use tonic::Code;

/// What one `GET /metrics` returned.
struct Metrics {
    content_type: String,
    text: String,
    scrape: Scrape,
}

/// `GET /metrics` with its headers, parsed.
fn read_metrics(port: u16) -> Result<Metrics, String> {
    let mut stream =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(5))
            .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .map_err(|e| format!("send: {e}"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|e| format!("read: {e}"))?;
    let response = String::from_utf8(response).map_err(|e| format!("not UTF-8: {e}"))?;
    let (head, text) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP response: {response:?}"))?;
    if !head.starts_with("HTTP/1.1 200 ") && !head.starts_with("HTTP/1.0 200 ") {
        return Err(format!("not 200: {head}"));
    }
    let content_type = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-type")
                .then(|| value.trim().to_string())
        })
        .unwrap_or_default();
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .map_err(|e| format!("parse: {e}"))?;
    Ok(Metrics {
        content_type,
        text: text.to_string(),
        scrape,
    })
}

/// `GET /metrics`, retried for a few seconds while the endpoint is not up
/// yet (a manager just started binds it right after the gRPC port).
async fn metrics(manager: &Manager) -> Metrics {
    let port = manager.http_port;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let read = tokio::task::spawn_blocking(move || read_metrics(port))
            .await
            .expect("join");
        match read {
            Ok(metrics) => return metrics,
            Err(e) if tokio::time::Instant::now() >= deadline => {
                panic!("GET /metrics: {e}\n{}", manager.log())
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn labels_are(sample: &Sample, labels: &[(&str, &str)]) -> bool {
    sample.labels.len() == labels.len()
        && labels.iter().all(|(k, v)| sample.labels.get(k) == Some(*v))
}

impl Metrics {
    /// The value of the counter, gauge or plain sample `name{labels}`
    /// (exactly those labels).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.scrape
            .samples
            .iter()
            .filter(|s| s.metric == name && labels_are(s, labels))
            .find_map(|s| match s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
                _ => None,
            })
    }

    /// The same, where the parser must have read it as `kind` (from its
    /// `# TYPE` line).
    fn typed(&self, name: &str, labels: &[(&str, &str)], kind: &str) -> Option<f64> {
        self.scrape
            .samples
            .iter()
            .filter(|s| s.metric == name && labels_are(s, labels))
            .find_map(|s| match (&s.value, kind) {
                (Value::Counter(v), "counter") | (Value::Gauge(v), "gauge") => Some(*v),
                _ => None,
            })
    }

    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.typed(name, labels, "counter")
            .unwrap_or_else(|| panic!("no counter {name}{labels:?} in:\n{}", self.text))
    }

    fn gauge(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.typed(name, labels, "gauge")
            .unwrap_or_else(|| panic!("no gauge {name}{labels:?} in:\n{}", self.text))
    }

    /// A histogram's count, checked against its `+Inf` bucket and its
    /// buckets' order; 0 when it has no series with those labels yet.
    fn histogram_count(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let Some(count) = self.value(&format!("{name}_count"), labels) else {
            return 0.0;
        };
        let buckets = self
            .scrape
            .samples
            .iter()
            .find_map(|s| match &s.value {
                Value::Histogram(b) if s.metric == name && labels_are(s, labels) => Some(b),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{name}{labels:?} has no buckets:\n{}", self.text));
        let inf = buckets
            .iter()
            .find(|b| b.less_than == f64::INFINITY)
            .unwrap_or_else(|| panic!("{name}{labels:?} has no +Inf bucket"));
        assert_eq!(inf.count, count, "{name}{labels:?}: +Inf bucket != _count");
        assert!(
            buckets.windows(2).all(|w| w[0].count <= w[1].count),
            "{name}{labels:?}: buckets not cumulative: {buckets:?}"
        );
        count
    }

    /// The text is Prometheus text 0.0.4: its content type, no OpenMetrics
    /// end marker, and every sample after its family's only HELP and TYPE.
    fn assert_well_formed(&self) {
        assert!(
            self.content_type.starts_with("text/plain; version=0.0.4"),
            "{}",
            self.content_type
        );
        assert!(!self.text.contains("# EOF"), "{}", self.text);
        assert!(self.text.ends_with('\n'));
        let mut helps: BTreeMap<&str, u32> = BTreeMap::new();
        let mut types: BTreeMap<&str, &str> = BTreeMap::new();
        for line in self.text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap_or_default();
                *helps.entry(name).or_default() += 1;
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut words = rest.split(' ');
                let name = words.next().unwrap_or_default();
                let kind = words.next().unwrap_or_default();
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                assert!(
                    types.insert(name, kind).is_none(),
                    "two TYPE lines for {name}"
                );
                if kind == "counter" {
                    assert!(name.ends_with("_total"), "counter {name} without _total");
                }
                continue;
            }
            assert!(!line.starts_with('#') && !line.is_empty(), "{line:?}");
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    let family = name.strip_suffix(suffix)?;
                    (types.get(family) == Some(&"histogram")).then_some(family)
                })
                .unwrap_or(name);
            assert!(
                types.contains_key(family),
                "sample before (or without) its TYPE: {line}"
            );
            assert!(
                name.starts_with("cocos_manager_"),
                "not prefixed cocos_manager_: {line}"
            );
        }
        for (name, n) in &helps {
            assert_eq!(*n, 1, "{name} has {n} HELP lines");
        }
        assert_eq!(
            helps.keys().collect::<Vec<_>>(),
            types.keys().collect::<Vec<_>>(),
            "HELP and TYPE lines name different families"
        );
    }
}

/// Polls `/metrics` until `check` holds, at most `limit`.
async fn wait_metrics(
    manager: &Manager,
    limit: Duration,
    what: &str,
    check: impl Fn(&Metrics) -> bool,
) -> Metrics {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let now = metrics(manager).await;
        if check(&now) {
            return now;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!(
                "{what}: not within {limit:?}\n{}\n{}",
                now.text,
                manager.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const CREATE: &[(&str, &str)] = &[
    ("service", "manager.ManagerService"),
    ("method", "CreateVm"),
];
const REMOVE: &[(&str, &str)] = &[
    ("service", "manager.ManagerService"),
    ("method", "RemoveVm"),
];
const POLICY: &[(&str, &str)] = &[
    ("service", "manager.ManagerService"),
    ("method", "AttestationPolicy"),
];
const LATENCY: &str = "cocos_manager_grpc_request_duration_seconds";
const TO_RUNNING: &str = "cocos_manager_vm_create_to_running_seconds";
const TO_AGENT: &str = "cocos_manager_vm_create_to_agent_ready_seconds";
const BOUND: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_known_sequence_exactly() {
    let mut manager = start_on_stand_in(
        free_port_range(4),
        &[
            ("MANAGER_MAX_VMS", "2"),
            ("MANAGER_RESTART_BACKOFF_INITIAL", "200ms"),
            ("MANAGER_RESTART_BACKOFF_MAX", "1s"),
            // Every QEMU start leaves one orphan for the manager to reap.
            ("STAND_IN_ORPHAN", "1"),
        ],
    );

    // A fresh manager: everything at zero, known label values present.
    let fresh = metrics(&manager).await;
    fresh.assert_well_formed();
    for name in [
        "cocos_manager_vm_creates_total",
        "cocos_manager_vm_removes_total",
        "cocos_manager_attestation_policy_requests_total",
    ] {
        assert_eq!(fresh.counter(name, &[("result", "ok")]), 0.0, "{name}");
    }
    for cause in ["requested", "guest_shutdown", "guest_panic", "crash"] {
        assert_eq!(
            fresh.counter("cocos_manager_qemu_exits_total", &[("cause", cause)]),
            0.0
        );
    }
    assert_eq!(fresh.counter("cocos_manager_vm_restarts_total", &[]), 0.0);
    assert_eq!(fresh.gauge("cocos_manager_ports_total", &[]), 4.0);
    assert_eq!(fresh.gauge("cocos_manager_ports_in_use", &[]), 0.0);
    assert_eq!(fresh.histogram_count(TO_RUNNING, &[]), 0.0);

    // Two creates OK, one refused for its TTL, one over MANAGER_MAX_VMS.
    let mut client = manager.client().await;
    let (a, _) = create(&mut client).await;
    let (b, _) = create(&mut client).await;
    let bad_ttl = client
        .create_vm(CreateReq {
            ttl: "soon".into(),
            ..Default::default()
        })
        .await
        .expect_err("a bad TTL is refused");
    assert_eq!(bad_ttl.code(), Code::InvalidArgument, "{bad_ttl}");
    let over = client
        .create_vm(CreateReq::default())
        .await
        .expect_err("a third VM is over MANAGER_MAX_VMS");
    assert_eq!(over.code(), Code::ResourceExhausted, "{over}");

    // A remove of an unknown id; policies of an unknown id and of a VM
    // without SEV-SNP.
    let unknown = client
        .remove_vm(RemoveReq {
            cvm_id: "no-such-vm".into(),
        })
        .await
        .expect_err("unknown id");
    assert_eq!(unknown.code(), Code::NotFound);
    let unknown = client
        .attestation_policy(AttestationPolicyReq {
            id: "no-such-vm".into(),
        })
        .await
        .expect_err("unknown id");
    assert_eq!(unknown.code(), Code::NotFound);
    let plain = client
        .attestation_policy(AttestationPolicyReq { id: a.clone() })
        .await
        .expect_err("no measurement without SEV-SNP");
    assert_eq!(plain.code(), Code::FailedPrecondition);

    // Both agents answer (the stand-in serves /health on the forwarded
    // port) before anything else happens to the VMs.
    wait_metrics(&manager, BOUND, "both agents ready", |m| {
        m.histogram_count(TO_AGENT, &[]) == 2.0
    })
    .await;

    // A's QEMU crashes; supervision restarts it.
    let first = qemu_pid(&a).await;
    kill9(first);
    wait_metrics(&manager, BOUND, "A restarted and running", |m| {
        m.counter("cocos_manager_vm_restarts_total", &[]) == 1.0
            && m.gauge("cocos_manager_vms", &[("state", "running")]) == 2.0
    })
    .await;

    // B is removed.
    client
        .remove_vm(RemoveReq { cvm_id: b.clone() })
        .await
        .expect("RemoveVm");

    // Three QEMU starts (A, B, A's restart) left three orphans; A's crash
    // and B's stop are the two children reaped.
    let m = wait_metrics(&manager, BOUND, "orphans reaped and B gone", |m| {
        m.counter("cocos_manager_zombies_reaped_total", &[("kind", "orphan")]) == 3.0
            && m.gauge("cocos_manager_vms", &[("state", "running")]) == 1.0
            && m.gauge("cocos_manager_ports_in_use", &[]) == 1.0
    })
    .await;
    m.assert_well_formed();

    let creates = |result| m.counter("cocos_manager_vm_creates_total", &[("result", result)]);
    assert_eq!(creates("ok"), 2.0);
    assert_eq!(creates("invalid_argument"), 1.0);
    assert_eq!(creates("resource_exhausted"), 1.0);
    let removes = |result| m.counter("cocos_manager_vm_removes_total", &[("result", result)]);
    assert_eq!(removes("ok"), 1.0);
    assert_eq!(removes("not_found"), 1.0);
    let policies = |result| {
        m.counter(
            "cocos_manager_attestation_policy_requests_total",
            &[("result", result)],
        )
    };
    assert_eq!(policies("ok"), 0.0);
    assert_eq!(policies("not_found"), 1.0);
    assert_eq!(policies("failed_precondition"), 1.0);
    // Nothing else was counted for them.
    for (name, total) in [
        ("cocos_manager_vm_creates_total", 4.0),
        ("cocos_manager_vm_removes_total", 2.0),
        ("cocos_manager_attestation_policy_requests_total", 2.0),
    ] {
        let sum: f64 = m
            .scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter_map(|s| match s.value {
                Value::Counter(v) => Some(v),
                _ => None,
            })
            .sum();
        assert_eq!(sum, total, "{name}");
    }

    assert_eq!(m.counter("cocos_manager_vm_restarts_total", &[]), 1.0);
    let exits = |cause| m.counter("cocos_manager_qemu_exits_total", &[("cause", cause)]);
    assert_eq!(exits("crash"), 1.0);
    assert_eq!(exits("requested"), 1.0);
    assert_eq!(exits("guest_shutdown"), 0.0);
    assert_eq!(exits("guest_panic"), 0.0);
    assert_eq!(m.counter("cocos_manager_vm_readoptions_total", &[]), 0.0);
    assert_eq!(
        m.counter("cocos_manager_zombies_reaped_total", &[("kind", "child")]),
        2.0
    );

    // One latency observation per request, per RPC; none for CVMInfo.
    assert_eq!(m.histogram_count(LATENCY, CREATE), 4.0);
    assert_eq!(m.histogram_count(LATENCY, REMOVE), 2.0);
    assert_eq!(m.histogram_count(LATENCY, POLICY), 2.0);
    assert_eq!(
        m.histogram_count(
            LATENCY,
            &[("service", "manager.ManagerService"), ("method", "CVMInfo")]
        ),
        0.0
    );
    let create_seconds = m
        .value(&format!("{LATENCY}_sum"), CREATE)
        .expect("CreateVm latency sum");
    assert!(create_seconds > 0.0, "{create_seconds}");

    // Two creates reached running once each; A's restart is not a create.
    assert_eq!(m.histogram_count(TO_RUNNING, &[]), 2.0);
    assert_eq!(m.histogram_count(TO_AGENT, &[]), 2.0);
    let to_running = m.value(&format!("{TO_RUNNING}_sum"), &[]).expect("sum");
    let to_agent = m.value(&format!("{TO_AGENT}_sum"), &[]).expect("sum");
    assert!(
        to_running > 0.0 && to_agent >= to_running,
        "{to_running} {to_agent}"
    );

    // A is left, running, holding one port.
    assert_eq!(m.gauge("cocos_manager_vms", &[("state", "running")]), 1.0);
    for state in ["starting", "restarting", "stopping", "stopped", "failed"] {
        assert_eq!(m.gauge("cocos_manager_vms", &[("state", state)]), 0.0);
    }
    assert_eq!(m.gauge("cocos_manager_ports_in_use", &[]), 1.0);
    assert_eq!(m.gauge("cocos_manager_ports_total", &[]), 4.0);
    // The metrics that were there before the registry still are.
    assert_eq!(m.gauge("cocos_manager_grpc_connections_max", &[]), 256.0);
    assert!(m.gauge("cocos_manager_grpc_connections", &[]) >= 1.0);
    for name in [
        "cocos_manager_grpc_connections_refused_total",
        "cocos_manager_grpc_connections_silent_total",
        "cocos_manager_grpc_deadline_exceeded_total",
    ] {
        assert_eq!(m.counter(name, &[]), 0.0, "{name}");
    }

    // A new manager re-adopts A: counted as a re-adoption, not a create.
    drop(client);
    assert!(
        manager
            .stop_with(Signal::SIGTERM, Duration::from_secs(30))
            .is_some_and(|s| s.success()),
        "{}",
        manager.log()
    );
    manager.spawn();
    let m = wait_metrics(&manager, BOUND, "A re-adopted", |m| {
        m.counter("cocos_manager_vm_readoptions_total", &[]) == 1.0
            && m.gauge("cocos_manager_vms", &[("state", "running")]) == 1.0
    })
    .await;
    m.assert_well_formed();
    assert_eq!(m.counter("cocos_manager_vm_readoptions_total", &[]), 1.0);
    assert_eq!(m.gauge("cocos_manager_vms", &[("state", "running")]), 1.0);
    assert_eq!(m.gauge("cocos_manager_ports_in_use", &[]), 1.0);
    assert_eq!(
        m.counter("cocos_manager_vm_creates_total", &[("result", "ok")]),
        0.0
    );
    assert_eq!(m.histogram_count(TO_RUNNING, &[]), 0.0);
    assert_eq!(m.counter("cocos_manager_vm_restarts_total", &[]), 0.0);

    let mut client = manager.client().await;
    client
        .remove_vm(RemoveReq { cvm_id: a.clone() })
        .await
        .expect("RemoveVm of the re-adopted VM");
    let m = wait_metrics(&manager, BOUND, "A gone", |m| {
        m.gauge("cocos_manager_vms", &[("state", "running")]) == 0.0
            && m.gauge("cocos_manager_ports_in_use", &[]) == 0.0
    })
    .await;
    assert_eq!(
        m.counter("cocos_manager_vm_removes_total", &[("result", "ok")]),
        1.0
    );
    assert_eq!(
        m.counter("cocos_manager_qemu_exits_total", &[("cause", "requested")]),
        1.0
    );
    // Not this manager's child: nothing of it for this manager to reap.
    assert_eq!(
        m.counter("cocos_manager_zombies_reaped_total", &[("kind", "child")]),
        0.0
    );
    assert_eq!(m.gauge("cocos_manager_vms", &[("state", "running")]), 0.0);
    assert_eq!(m.gauge("cocos_manager_ports_in_use", &[]), 0.0);
    assert_eq!(m.histogram_count(LATENCY, REMOVE), 1.0);
    assert_nothing_left(&manager).await;
}
