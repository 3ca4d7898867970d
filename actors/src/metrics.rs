//! The manager's Prometheus metrics (`GET /metrics`, README: Metrics).
//!
//! Why this module exists: an operator watches a fleet of managers from
//! Prometheus, not from logs. The seed asks for creation and deletion
//! success rates, QEMU process health and zombie detection; this is the one
//! place those numbers are kept and written out, so every counter has one
//! owner, one name and one help text, and the exposition is produced by a
//! maintained library (`prometheus-client`) in the Prometheus text format
//! rather than by hand.
//!
//! What feeds it:
//! - the front counts its answers ([`counted`]) and times every gRPC
//!   request of every service on the port ([`GrpcMetricsLayer`]);
//! - the supervisor hands it every lifecycle event ([`vm_event`]), the same
//!   events `WatchEvents` shows: restarts, QEMU exits by cause,
//!   re-adoptions, create-to-running latency, and (from a bounded
//!   background probe of the guest agent) create-to-agent-ready latency;
//! - the reaper counts what it reaps ([`reaped`]);
//! - at scrape time, VMs by state and the port pool come from the actors
//!   ([`Scrape`]), and the front's connection counters and the VMs' cgroup
//!   use are read by collectors.
//!
//! Nothing here blocks an actor: recording is an atomic add or a short
//! lock, the agent probe runs on its own task, and [`render`] (which reads
//! cgroup files) is called off the API thread.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{LazyLock, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use cocos_core::agent::exchange;
use cocos_core::cgroup::Usage;
use cocos_core::events::{EventKind, ExitCause, VmState, VmView};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    prometheus_text, DescriptorEncoder, EncodeLabelSet, EncodeMetric,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use prost::Message as _;
use tokio::sync::oneshot;
use tracing::debug;

use crate::front::STATS;

/// `Content-Type` of `GET /metrics`: the Prometheus text format 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Request latency buckets, seconds: 1 ms to 2 min (a create waits for QEMU
/// and can take up to `MANAGER_GRPC_TIMEOUT`, 60 s by default).
const RPC_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// Create-to-running buckets, seconds: QEMU up (the stand-in in
/// milliseconds, a real launch in seconds, `MANAGER_START_TIMEOUT` 30 s).
const RUNNING_BUCKETS: [f64; 13] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
];
/// Create-to-agent-ready buckets, seconds: a guest boot (tens of seconds
/// under TCG) up to the probe's bound.
const AGENT_BUCKETS: [f64; 12] = [
    0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 180.0, 300.0, 600.0,
];

/// How long after a VM's first Running its agent is probed at most.
pub const AGENT_PROBE_LIMIT: Duration = Duration::from_secs(600);
/// Pause between two probes of one agent during the first minute (a boot
/// takes seconds to tens of seconds; the time recorded is late by at most
/// one pause)…
const AGENT_PROBE_PAUSE: Duration = Duration::from_millis(500);
/// …and after it, so agents that never answer cost little.
const AGENT_PROBE_SLOW_PAUSE: Duration = Duration::from_secs(5);
const AGENT_PROBE_FAST_FOR: Duration = Duration::from_secs(60);
/// Bound of one probe (connect, send, read the status line).
const AGENT_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabel {
    cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    service: String,
    method: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every metric the manager records as things happen.
struct Metrics {
    registry: Registry,
    creates: Family<ResultLabel, Counter>,
    removes: Family<ResultLabel, Counter>,
    policies: Family<ResultLabel, Counter>,
    restarts: Counter,
    exits: Family<CauseLabel, Counter>,
    readoptions: Counter,
    reaped: Family<KindLabel, Counter>,
    rpc_seconds: HistogramFamily<RpcLabels>,
    create_to_running: Histogram,
    create_to_agent_ready: Histogram,
}

fn rpc_histogram() -> Histogram {
    Histogram::new(RPC_BUCKETS)
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut registry = Registry::default();
    let creates = Family::<ResultLabel, Counter>::default();
    registry.register(
        "cocos_manager_vm_creates",
        "CreateVm requests answered, by result: ok, or the gRPC status code in lower case \
         (invalid_argument, resource_exhausted, failed_precondition, deadline_exceeded, …; \
         cancelled when the client went away first)",
        creates.clone(),
    );
    let removes = Family::<ResultLabel, Counter>::default();
    registry.register(
        "cocos_manager_vm_removes",
        "RemoveVm requests answered, by result: ok, or the gRPC status code in lower case \
         (not_found, invalid_argument, deadline_exceeded, …)",
        removes.clone(),
    );
    let policies = Family::<ResultLabel, Counter>::default();
    registry.register(
        "cocos_manager_attestation_policy_requests",
        "AttestationPolicy requests answered, by result: ok, or the gRPC status code in lower \
         case (not_found, failed_precondition, …)",
        policies.clone(),
    );
    let restarts = Counter::default();
    registry.register(
        "cocos_manager_vm_restarts",
        "Restarts supervision scheduled after a VM's QEMU ended (all VMs; events name the VM)",
        restarts.clone(),
    );
    let exits = Family::<CauseLabel, Counter>::default();
    registry.register(
        "cocos_manager_qemu_exits",
        "QEMU processes that ended, by cause: requested (the manager stopped it), \
         guest_shutdown, guest_panic, crash (a signal, a non-zero exit, an unknown end)",
        exits.clone(),
    );
    let readoptions = Counter::default();
    registry.register(
        "cocos_manager_vm_readoptions",
        "VMs a previous manager left running that this manager took over at start",
        readoptions.clone(),
    );
    let reaped = Family::<KindLabel, Counter>::default();
    registry.register(
        "cocos_manager_zombies_reaped",
        "Exited processes the manager reaped (each was a zombie until then), by kind: child \
         (a process the manager started: QEMU, swtpm, helpers) or orphan (a process nobody \
         started or claimed, re-parented to the manager as child subreaper, e.g. one a QEMU \
         left behind; it would otherwise stay a zombie)",
        reaped.clone(),
    );
    let rpc_seconds: HistogramFamily<RpcLabels> =
        Family::new_with_constructor(rpc_histogram as fn() -> Histogram);
    registry.register(
        "cocos_manager_grpc_request_duration_seconds",
        "Time the gRPC port took to answer a request, by service and method (every service on \
         the port; unknown paths as service=\"unknown\"); for a server-streaming method, the \
         time until its stream started",
        rpc_seconds.clone(),
    );
    let create_to_running = Histogram::new(RUNNING_BUCKETS);
    registry.register(
        "cocos_manager_vm_create_to_running_seconds",
        "Time from a VM's admission (its created event) to its first running event: QEMU up, \
         answering on QMP, the forwarded port bound, the record written",
        create_to_running.clone(),
    );
    let create_to_agent_ready = Histogram::new(AGENT_BUCKETS);
    registry.register(
        "cocos_manager_vm_create_to_agent_ready_seconds",
        "Time from a VM's admission to the first 2xx answer of its guest agent to GET /health \
         on the forwarded port (probed every 0.5 s in the first minute after it runs, every 5 s \
         after, for at most 10 minutes)",
        create_to_agent_ready.clone(),
    );
    registry.register_collector(Box::new(FrontCollector));
    registry.register_collector(Box::new(CgroupCollector));
    // Known label values start at 0, so a rate is defined before the
    // first event (the guards returned are only read locks).
    for family in [&creates, &removes, &policies] {
        drop(family.get_or_create(&ResultLabel { result: "ok" }));
    }
    for cause in ExitCause::ALL {
        drop(exits.get_or_create(&CauseLabel {
            cause: cause.as_str(),
        }));
    }
    for kind in ["child", "orphan"] {
        drop(reaped.get_or_create(&KindLabel { kind }));
    }
    Metrics {
        registry,
        creates,
        removes,
        policies,
        restarts,
        exits,
        readoptions,
        reaped,
        rpc_seconds,
        create_to_running,
        create_to_agent_ready,
    }
});

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------- answers

/// The lower-case name of a gRPC status code, as the `result` labels use it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// Requests whose answers are counted by result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answered {
    CreateVm,
    RemoveVm,
    AttestationPolicy,
}

impl Answered {
    fn family(self) -> &'static Family<ResultLabel, Counter> {
        match self {
            Answered::CreateVm => &METRICS.creates,
            Answered::RemoveVm => &METRICS.removes,
            Answered::AttestationPolicy => &METRICS.policies,
        }
    }
}

/// A request on its way to its answer; counted `cancelled` if it is
/// dropped first (the client cancelled or went away).
struct PendingAnswer {
    what: Answered,
    settled: bool,
}

impl PendingAnswer {
    fn settle(&mut self, result: &'static str) {
        self.settled = true;
        self.what
            .family()
            .get_or_create(&ResultLabel { result })
            .inc();
    }
}

impl Drop for PendingAnswer {
    fn drop(&mut self) {
        if !self.settled {
            self.settle("cancelled");
        }
    }
}

/// Runs a handler and counts its answer by result.
pub async fn counted<T>(
    what: Answered,
    answer: impl Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    let mut pending = PendingAnswer {
        what,
        settled: false,
    };
    let result = answer.await;
    pending.settle(match &result {
        Ok(_) => "ok",
        Err(status) => code_name(status.code()),
    });
    result
}

// ---------------------------------------------------------------- reaper

/// The reaper reaped a process: `claimed` when someone started it and
/// waited for it, otherwise an orphan.
pub fn reaped(claimed: bool) {
    let kind = if claimed { "child" } else { "orphan" };
    METRICS.reaped.get_or_create(&KindLabel { kind }).inc();
}

// ---------------------------------------------------------------- events

/// A VM between its created event and the end of its agent probe.
struct Tracked {
    created: Instant,
    running: bool,
    /// Dropped to stop the agent probe.
    _probe: Option<oneshot::Sender<()>>,
}

/// VMs created by this manager whose first running event, or agent, is
/// still awaited. Bounded by the VMs listed: entries go at removal, at
/// failure, and when the probe ends.
static TRACKED: LazyLock<Mutex<HashMap<String, Tracked>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// Where VMs' forwarded ports are reached from this host.
static AGENT_HOST: Mutex<IpAddr> = Mutex::new(IpAddr::V4(Ipv4Addr::LOCALHOST));

/// The address VMs' forwarded ports bind to (`MANAGER_QEMU_HOST_FWD_BIND`):
/// the agent probe connects there, or to loopback when they bind to all.
pub fn set_agent_host(bind: IpAddr) {
    let host = if bind.is_unspecified() {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        bind
    };
    *lock(&AGENT_HOST) = host;
}

/// Records one lifecycle event of a VM (called by the supervisor for every
/// event it publishes, after the VM's view is updated).
pub fn vm_event(view: &VmView, kind: &EventKind) {
    let metrics = &*METRICS;
    match kind {
        EventKind::Created => {
            lock(&TRACKED).insert(
                view.id.clone(),
                Tracked {
                    created: Instant::now(),
                    running: false,
                    _probe: None,
                },
            );
        }
        EventKind::Running => first_running(view),
        EventKind::Restarting { .. } => {
            metrics.restarts.inc();
        }
        EventKind::Exited(exit) => {
            metrics
                .exits
                .get_or_create(&CauseLabel {
                    cause: exit.cause.as_str(),
                })
                .inc();
        }
        EventKind::Readopted => {
            metrics.readoptions.inc();
        }
        // Its agent will not come: stop the probe.
        EventKind::Failed { .. } | EventKind::Removed => {
            lock(&TRACKED).remove(&view.id);
        }
        EventKind::Stopping { .. } | EventKind::TtlExpired => {}
    }
}

/// The first running event of a VM this manager created: its
/// create-to-running time, then a probe of its agent.
fn first_running(view: &VmView) {
    let mut tracked = lock(&TRACKED);
    let Some(entry) = tracked.get_mut(&view.id) else {
        return;
    };
    if entry.running {
        return;
    }
    entry.running = true;
    let created = entry.created;
    METRICS
        .create_to_running
        .observe(created.elapsed().as_secs_f64());
    let runtime = tokio::runtime::Handle::try_current();
    match (view.facts.port, runtime) {
        (Some(port), Ok(runtime)) => {
            let (stop, stopped) = oneshot::channel();
            entry._probe = Some(stop);
            let host = *lock(&AGENT_HOST);
            runtime.spawn(probe_agent(view.id.clone(), created, host, port, stopped));
        }
        _ => {
            tracked.remove(&view.id);
        }
    }
}

/// Polls the agent of VM `id` until it answers 2xx, the VM is removed or
/// fails (`stopped` resolves), or [`AGENT_PROBE_LIMIT`] passes.
async fn probe_agent(
    id: String,
    created: Instant,
    host: IpAddr,
    port: u16,
    stopped: oneshot::Receiver<()>,
) {
    let started = Instant::now();
    let polling = async {
        loop {
            match probe(host, port).await {
                Ok(code) if (200..300).contains(&code) => return,
                Ok(code) => debug!(vm = %id, code, "agent not ready"),
                Err(reason) => debug!(vm = %id, %reason, "agent not ready"),
            }
            let pause = if started.elapsed() < AGENT_PROBE_FAST_FOR {
                AGENT_PROBE_PAUSE
            } else {
                AGENT_PROBE_SLOW_PAUSE
            };
            tokio::time::sleep(pause).await;
        }
    };
    let ready = tokio::select! {
        answered = tokio::time::timeout(AGENT_PROBE_LIMIT, polling) => answered.is_ok(),
        _ = stopped => false,
    };
    if ready {
        let seconds = created.elapsed().as_secs_f64();
        METRICS.create_to_agent_ready.observe(seconds);
        debug!(vm = %id, seconds, "agent ready");
    } else {
        debug!(vm = %id, "agent probe ended without an answer");
    }
    lock(&TRACKED).remove(&id);
}

/// One `GET /health` to the agent: its HTTP status, or why there was none.
async fn probe(host: IpAddr, port: u16) -> Result<u16, String> {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        exchange(&mut stream, &host.to_string(), port).await
    };
    tokio::time::timeout(AGENT_PROBE_TIMEOUT, attempt)
        .await
        .unwrap_or_else(|_| Err("no answer in time".into()))
}

// ---------------------------------------------------------------- gRPC latency

/// Every method of every service the gRPC port serves, by request path
/// (`/package.Service/Method`), from the services' descriptor sets (the
/// same ones reflection serves). A path not in here is labelled
/// `unknown`, so what clients send cannot grow the label set.
static KNOWN_RPCS: LazyLock<HashMap<String, RpcLabels>> = LazyLock::new(|| {
    let sets: [&[u8]; 5] = [
        cocos_core::proto::FILE_DESCRIPTOR_SET,
        cocos_core::operator_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ];
    let mut known = HashMap::new();
    for bytes in sets {
        let Ok(set) = prost_types::FileDescriptorSet::decode(bytes) else {
            continue;
        };
        for file in set.file {
            let package = file.package().to_string();
            for service in &file.service {
                let name = if package.is_empty() {
                    service.name().to_string()
                } else {
                    format!("{package}.{}", service.name())
                };
                for method in &service.method {
                    known.insert(
                        format!("/{name}/{}", method.name()),
                        RpcLabels {
                            service: name.clone(),
                            method: method.name().to_string(),
                        },
                    );
                }
            }
        }
    }
    known
});

fn rpc_labels(path: &str) -> RpcLabels {
    KNOWN_RPCS.get(path).cloned().unwrap_or_else(|| RpcLabels {
        service: "unknown".into(),
        method: "unknown".into(),
    })
}

/// Observes a request's time when dropped: when its answer is ready, or
/// when the request is abandoned (the client cancelled).
struct RpcTimer {
    labels: RpcLabels,
    start: Instant,
}

impl Drop for RpcTimer {
    fn drop(&mut self) {
        METRICS
            .rpc_seconds
            .get_or_create(&self.labels)
            .observe(self.start.elapsed().as_secs_f64());
    }
}

/// A tower layer for the tonic server: times every request on the gRPC
/// port, of every service, by its path.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcMetricsLayer;

impl<S> tower_layer::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> GrpcMetrics<S> {
        GrpcMetrics { inner }
    }
}

#[derive(Debug, Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
}

impl<S, B> tower_service::Service<http::Request<B>> for GrpcMetrics<S>
where
    S: tower_service::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let timer = RpcTimer {
            labels: rpc_labels(request.uri().path()),
            start: Instant::now(),
        };
        let answer = self.inner.call(request);
        Box::pin(async move {
            let result = answer.await;
            drop(timer);
            result
        })
    }
}

// ---------------------------------------------------------------- scrape

/// What the actors say at scrape time: VMs by state and the port pool.
#[derive(Debug)]
pub struct Scrape {
    states: Vec<(VmState, u64)>,
    ports_in_use: u64,
    ports_total: u64,
}

impl Scrape {
    pub fn new(vms: &[VmView], ports_in_use: usize, ports_total: usize) -> Scrape {
        let states = VmState::ALL
            .iter()
            .map(|state| {
                let count = vms.iter().filter(|v| v.facts.state == *state).count();
                (*state, count as u64)
            })
            .collect();
        Scrape {
            states,
            ports_in_use: ports_in_use as u64,
            ports_total: ports_total as u64,
        }
    }
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, MetricType::Counter)?)
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "cocos_manager_vms",
            "VMs known to the manager, by state (failed VMs stay listed until removed or \
             MANAGER_FAILED_VM_RETENTION passes).",
            None,
            MetricType::Gauge,
        )?;
        for (state, count) in &self.states {
            let labels = [("state", state.as_str())];
            ConstGauge::new(*count).encode(family.encode_family(&labels)?)?;
        }
        gauge(
            &mut encoder,
            "cocos_manager_ports_in_use",
            "Host ports reserved for VMs.",
            self.ports_in_use,
        )?;
        gauge(
            &mut encoder,
            "cocos_manager_ports_total",
            "Host ports in MANAGER_QEMU_HOST_FWD_RANGE.",
            self.ports_total,
        )
    }
}

/// The gRPC front's connection and deadline counters.
#[derive(Debug)]
struct FrontCollector;

impl Collector for FrontCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let read = |value: &std::sync::atomic::AtomicU64| value.load(Ordering::Relaxed);
        gauge(
            &mut encoder,
            "cocos_manager_grpc_connections",
            "gRPC connections open.",
            read(&STATS.connections),
        )?;
        gauge(
            &mut encoder,
            "cocos_manager_grpc_connections_max",
            "MANAGER_GRPC_MAX_CONNECTIONS.",
            read(&STATS.max_connections),
        )?;
        counter(
            &mut encoder,
            "cocos_manager_grpc_connections_refused",
            "gRPC connections closed at once because MANAGER_GRPC_MAX_CONNECTIONS were open.",
            read(&STATS.refused),
        )?;
        counter(
            &mut encoder,
            "cocos_manager_grpc_connections_silent",
            "gRPC connections closed because they sent nothing in time.",
            read(&STATS.silent),
        )?;
        counter(
            &mut encoder,
            "cocos_manager_grpc_deadline_exceeded",
            "Requests answered DEADLINE_EXCEEDED (MANAGER_GRPC_TIMEOUT or the client's deadline).",
            read(&STATS.deadline_exceeded),
        )
    }
}

/// Each VM's use of its cgroup (README: Per-VM cgroups), read at scrape
/// time. Blocking: reads cgroup files.
#[derive(Debug)]
struct CgroupCollector;

impl Collector for CgroupCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        encode_usage(&mut encoder, &crate::cgroups::usages())
    }
}

/// `cocos_manager_vm_memory_bytes` and `cocos_manager_vm_cpu_seconds_total`,
/// one series per VM (label `vm`, its id) and value the cgroup reported.
fn encode_usage(
    encoder: &mut DescriptorEncoder,
    usage: &[(String, Usage)],
) -> Result<(), std::fmt::Error> {
    let mut memory = encoder.encode_descriptor(
        "cocos_manager_vm_memory_bytes",
        "Memory charged to the VM's cgroup (QEMU and its swtpm).",
        None,
        MetricType::Gauge,
    )?;
    for (id, u) in usage {
        if let Some(bytes) = u.memory_bytes {
            let labels = [("vm", id.as_str())];
            ConstGauge::new(bytes).encode(memory.encode_family(&labels)?)?;
        }
    }
    let mut cpu = encoder.encode_descriptor(
        "cocos_manager_vm_cpu_seconds",
        "CPU time used by the VM's cgroup (QEMU and its swtpm).",
        None,
        MetricType::Counter,
    )?;
    for (id, u) in usage {
        if let Some(seconds) = u.cpu_seconds {
            let labels = [("vm", id.as_str())];
            ConstCounter::new(seconds).encode(cpu.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

/// The whole `/metrics` text: the scrape-time values, then every recorded
/// metric. Blocking (the cgroup collector reads files): call it off the
/// API thread.
pub fn render(scrape: Scrape) -> Result<String, std::fmt::Error> {
    let mut now = Registry::default();
    now.register_collector(Box::new(scrape));
    let mut text = String::new();
    prometheus_text::encode(&mut text, &now)?;
    prometheus_text::encode(&mut text, &METRICS.registry)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cocos_core::attestation::document::LaunchKind;
    use cocos_core::events::{Exit, ExitCode, VmFacts};
    use std::collections::BTreeMap;
    use std::time::SystemTime;

    fn view(id: &str, state: VmState) -> VmView {
        VmView {
            id: id.into(),
            tee: LaunchKind::Plain,
            vtpm: false,
            created: SystemTime::now(),
            readopted: false,
            facts: VmFacts {
                state,
                ..VmFacts::starting()
            },
        }
    }

    /// The value of one sample line (`name{labels}` as written).
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn code_names_are_snake_case() {
        assert_eq!(code_name(tonic::Code::Ok), "ok");
        assert_eq!(code_name(tonic::Code::InvalidArgument), "invalid_argument");
        assert_eq!(
            code_name(tonic::Code::ResourceExhausted),
            "resource_exhausted"
        );
        assert_eq!(code_name(tonic::Code::NotFound), "not_found");
        for code in 0..=16 {
            let name = code_name(tonic::Code::from_i32(code));
            assert!(
                name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{name}"
            );
        }
    }

    #[test]
    fn every_served_method_is_known_and_nothing_else() {
        let labels = rpc_labels("/manager.ManagerService/CreateVm");
        assert_eq!(
            (labels.service.as_str(), labels.method.as_str()),
            ("manager.ManagerService", "CreateVm")
        );
        for path in [
            "/manager.ManagerService/RemoveVm",
            "/manager.ManagerService/CVMInfo",
            "/manager.ManagerService/AttestationPolicy",
            "/cocos.manager.v1.Operator/ListVms",
            "/cocos.manager.v1.Operator/WatchEvents",
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            assert_ne!(rpc_labels(path).service, "unknown", "{path}");
        }
        for path in ["/manager.ManagerService/Nope", "/x.Y/Z", "/", "garbage"] {
            let labels = rpc_labels(path);
            assert_eq!(
                (labels.service.as_str(), labels.method.as_str()),
                ("unknown", "unknown"),
                "{path}"
            );
        }
    }

    #[test]
    fn the_text_is_prometheus_text_with_one_help_and_type_per_family() {
        let vms = [
            view("a", VmState::Running),
            view("b", VmState::Running),
            view("c", VmState::Failed),
        ];
        let text = render(Scrape::new(&vms, 2, 101)).expect("render");
        assert!(!text.contains("# EOF"), "{text}");
        assert!(!text.contains("# UNIT"), "{text}");
        let mut helps = BTreeMap::new();
        let mut types = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap_or_default();
                *helps.entry(name.to_string()).or_insert(0) += 1;
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap_or_default();
                *types.entry(name.to_string()).or_insert(0) += 1;
            } else {
                let name = line
                    .split(['{', ' '])
                    .next()
                    .unwrap_or_default()
                    .to_string();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| {
                        name.strip_suffix(s)
                            .filter(|f| types.contains_key(*f))
                            .map(str::to_string)
                    })
                    .unwrap_or(name);
                assert!(types.contains_key(&family), "no TYPE before {line:?}");
            }
        }
        assert_eq!(helps, types);
        assert!(helps.values().all(|n| *n == 1), "{helps:?}");
        assert_eq!(
            sample(&text, "cocos_manager_vms{state=\"running\"}"),
            Some(2.0)
        );
        assert_eq!(
            sample(&text, "cocos_manager_vms{state=\"failed\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "cocos_manager_vms{state=\"starting\"}"),
            Some(0.0)
        );
        assert_eq!(sample(&text, "cocos_manager_ports_in_use"), Some(2.0));
        assert_eq!(sample(&text, "cocos_manager_ports_total"), Some(101.0));
        assert!(text.contains("# TYPE cocos_manager_grpc_connections_refused_total counter\n"));
        assert!(text.contains("# TYPE cocos_manager_vm_creates_total counter\n"));
        assert!(text.contains("# TYPE cocos_manager_vm_cpu_seconds_total counter\n"));
        assert!(text.contains("# TYPE cocos_manager_vm_create_to_running_seconds histogram\n"));
        assert!(text.contains("cocos_manager_qemu_exits_total{cause=\"guest_panic\"} "));
        assert!(text.contains("cocos_manager_zombies_reaped_total{kind=\"orphan\"} "));
    }

    #[derive(Debug)]
    struct FixedUsage(Vec<(String, Usage)>);

    impl Collector for FixedUsage {
        fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            encode_usage(&mut encoder, &self.0)
        }
    }

    #[test]
    fn cgroup_use_is_one_series_per_vm_and_value() {
        let usage = vec![
            (
                "a".to_string(),
                Usage {
                    memory_bytes: Some(1024),
                    cpu_seconds: Some(1.5),
                    pids: Some(3),
                },
            ),
            (
                "b\"".to_string(),
                Usage {
                    memory_bytes: None,
                    cpu_seconds: Some(0.25),
                    pids: None,
                },
            ),
        ];
        let mut registry = Registry::default();
        registry.register_collector(Box::new(FixedUsage(usage)));
        let mut text = String::new();
        prometheus_text::encode(&mut text, &registry).expect("encode");
        assert!(
            text.contains("# TYPE cocos_manager_vm_memory_bytes gauge\n"),
            "{text}"
        );
        assert!(
            text.contains("cocos_manager_vm_memory_bytes{vm=\"a\"} 1024\n"),
            "{text}"
        );
        assert!(
            !text.contains("cocos_manager_vm_memory_bytes{vm=\"b"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE cocos_manager_vm_cpu_seconds_total counter\n"),
            "{text}"
        );
        assert_eq!(
            sample(&text, "cocos_manager_vm_cpu_seconds_total{vm=\"a\"}"),
            Some(1.5)
        );
        assert_eq!(
            sample(&text, "cocos_manager_vm_cpu_seconds_total{vm=\"b\\\"\"}"),
            Some(0.25),
            "{text}"
        );
    }

    /// The only test that feeds events: the counters are process-wide.
    #[test]
    fn events_are_counted() {
        let before = render(Scrape::new(&[], 0, 0)).expect("render");
        let id = "metrics-unit-test-vm";
        let mut vm = view(id, VmState::Starting);
        vm_event(&vm, &EventKind::Created);
        vm.facts.state = VmState::Running;
        vm_event(&vm, &EventKind::Running);
        vm_event(
            &vm,
            &EventKind::Exited(Exit {
                code: ExitCode::Signal(9),
                status: "killed by SIGKILL".into(),
                cause: ExitCause::Crash,
            }),
        );
        vm_event(
            &vm,
            &EventKind::Restarting {
                attempt: 1,
                after: Duration::from_secs(1),
            },
        );
        // A restart's running event is not a create's.
        vm_event(&vm, &EventKind::Running);
        vm_event(&vm, &EventKind::Readopted);
        vm_event(&vm, &EventKind::Removed);
        reaped(false);
        let after = render(Scrape::new(&[], 0, 0)).expect("render");
        let delta = |series: &str| {
            sample(&after, series).unwrap_or(-1.0) - sample(&before, series).unwrap_or(0.0)
        };
        assert_eq!(delta("cocos_manager_vm_restarts_total"), 1.0);
        assert_eq!(
            delta("cocos_manager_qemu_exits_total{cause=\"crash\"}"),
            1.0
        );
        assert_eq!(
            delta("cocos_manager_qemu_exits_total{cause=\"requested\"}"),
            0.0
        );
        assert_eq!(delta("cocos_manager_vm_readoptions_total"), 1.0);
        assert_eq!(
            delta("cocos_manager_vm_create_to_running_seconds_count"),
            1.0
        );
        assert_eq!(
            delta("cocos_manager_zombies_reaped_total{kind=\"orphan\"}"),
            1.0
        );
        // No runtime here, so no probe: nothing is left tracked.
        assert!(!lock(&TRACKED).contains_key(id));
    }

    #[tokio::test]
    async fn answers_are_counted_by_code_and_dropped_ones_as_cancelled() {
        let series = |result: &str| {
            format!("cocos_manager_attestation_policy_requests_total{{result=\"{result}\"}}")
        };
        let read = |result: &str| {
            let text = render(Scrape::new(&[], 0, 0)).expect("render");
            sample(&text, &series(result)).unwrap_or(0.0)
        };
        let (ok, not_found, cancelled) = (read("ok"), read("not_found"), read("cancelled"));
        let _ = counted(Answered::AttestationPolicy, async { Ok(()) }).await;
        let _ = counted::<()>(Answered::AttestationPolicy, async {
            Err(tonic::Status::not_found("no VM"))
        })
        .await;
        let never = counted::<()>(Answered::AttestationPolicy, std::future::pending());
        let _ = tokio::time::timeout(Duration::from_millis(10), never).await;
        assert_eq!(read("ok") - ok, 1.0);
        assert_eq!(read("not_found") - not_found, 1.0);
        assert_eq!(read("cancelled") - cancelled, 1.0);
    }
}
