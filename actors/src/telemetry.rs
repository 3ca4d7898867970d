//! Logs and traces: the one place the daemon's `tracing` subscriber is set
//! up. It exists so that an operator gets log lines in the form their log
//! pipeline wants (`MANAGER_LOG_FORMAT`: text, without timestamps under
//! systemd's journal, or JSON), and traces of what the manager does — a
//! span per RPC, continuing the caller's W3C `traceparent`, and a span per
//! step of a VM's life — in their OpenTelemetry collector
//! (`COCOS_JAEGER_URL`), without a collector that is down ever costing a
//! request time or the log more than one warning.
//!
//! Two layers sit on one registry, each with its own filter:
//! - the log layer (reloadable level) sees every event and the spans of
//!   libraries, never the trace spans below (their target is
//!   [`SPAN_TARGET`]), so traces do not change a log line;
//! - the OpenTelemetry layer sees only spans of [`SPAN_TARGET`]: nothing a
//!   library (the exporter's own HTTP client included) does becomes a span,
//!   so the exporter cannot feed itself.
//!
//! Spans go to a batch exporter on its own thread through a bounded queue
//! (full: spans are dropped, a request never waits), over OTLP/HTTP with
//! protobuf bodies, each export bounded by [`EXPORT_TIMEOUT`]; at shutdown
//! what is queued is flushed within [`SHUTDOWN_TIMEOUT`].

use std::fmt::Display;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use cocos_core::config::{Config, LogFormat, LogLevel};
use cocos_core::lifecycle::StopStage;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter};
use opentelemetry_sdk::Resource;
use tracing::{debug, info, warn, Span};
use tracing_appender::non_blocking::WorkerGuard;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

/// The target of every span meant for traces (and of nothing else).
pub const SPAN_TARGET: &str = "cocos::span";
/// Bound of one export (connecting, sending, the collector's answer).
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound of connecting to the collector.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound of the flush at shutdown.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// A collector that fails again after it recovered is warned about at most
/// this often.
const WARN_INTERVAL: Duration = Duration::from_secs(600);
/// Longest span name taken from a request path (a client chooses it).
const MAX_RPC_NAME: usize = 200;

/// Changes the log level while running (SIGHUP).
pub type FilterHandle = reload::Handle<EnvFilter, Registry>;

/// The subscriber's parts that live as long as the daemon.
pub struct Telemetry {
    filter: FilterHandle,
    provider: Option<SdkTracerProvider>,
}

/// What the log filter lets through at `level`: everything of ours and of
/// the libraries at that level, except the trace spans (they are for the
/// collector), OpenTelemetry's own diagnostics and the exporter's HTTP
/// client (the exporter's failures are reported once, by
/// [`ReportingExporter`]).
pub fn log_filter(level: LogLevel) -> EnvFilter {
    EnvFilter::new(format!(
        "{level},{SPAN_TARGET}=off,opentelemetry=off,reqwest=off,hyper_util::client=off"
    ))
}

/// `JOURNAL_STREAM`'s value (`<device>:<inode>`, decimal, as systemd
/// sets it for a service whose stdout or stderr is the journal).
pub fn parse_journal_stream(value: &str) -> Option<(u64, u64)> {
    let (dev, ino) = value.trim().split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

/// Whether stderr is the journal: `JOURNAL_STREAM` names stderr's own
/// device and inode. A process that merely inherited the variable (its
/// stderr redirected elsewhere) does not match, as systemd documents.
pub fn is_journal(journal_stream: Option<&str>, stderr: Option<(u64, u64)>) -> bool {
    match (journal_stream.and_then(parse_journal_stream), stderr) {
        (Some(named), Some(actual)) => named == actual,
        _ => false,
    }
}

/// Device and inode of this process's stderr.
fn stderr_identity() -> Option<(u64, u64)> {
    let stat = nix::sys::stat::fstat(std::io::stderr()).ok()?;
    Some((stat.st_dev as u64, stat.st_ino as u64))
}

/// Sets up logs and, when configured, traces. Returns the log writer's
/// guard too (dropping it flushes the log; fail-fast keeps it).
pub fn init(config: &Config) -> (Telemetry, WorkerGuard) {
    #[cfg(not(feature = "test-hooks"))]
    let stderr = std::io::stderr();
    #[cfg(feature = "test-hooks")]
    let stderr = crate::testhooks::LogWriter(std::io::stderr());
    // The writer's thread has a name the panic hook knows (see failfast).
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .thread_name(crate::failfast::LOG_WRITER_THREAD)
        .finish(stderr);
    let journal = is_journal(
        std::env::var("JOURNAL_STREAM").ok().as_deref(),
        stderr_identity(),
    );
    let (filter, handle) = reload::Layer::new(log_filter(config.log_level));
    let log_layer: Box<dyn Layer<Registry> + Send + Sync> = match config.log_format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(writer)
            .with_filter(filter)
            .boxed(),
        // The journal stamps each line itself.
        LogFormat::Text if journal => tracing_subscriber::fmt::layer()
            .without_time()
            .with_writer(writer)
            .with_target(false)
            .with_ansi(false)
            .with_filter(filter)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_target(false)
            // Colour codes only for a terminal, never in a log file.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_filter(filter)
            .boxed(),
    };
    let mut layers = vec![log_layer];
    let (provider, trace_note) = match start_traces(config) {
        Ok(Some((provider, layer))) => {
            layers.push(layer);
            (Some(provider), None)
        }
        Ok(None) => (None, None),
        Err(e) => (None, Some(e)),
    };
    tracing_subscriber::registry().with(layers).init();
    match (&provider, trace_note, config.traces_endpoint()) {
        (Some(_), _, Some(endpoint)) => info!(
            endpoint = %endpoint,
            ratio = config.jaeger_trace_ratio,
            "traces: exporting spans over OTLP/HTTP"
        ),
        (_, Some(error), _) => {
            warn!(error = %error, "traces off: the exporter could not be set up")
        }
        _ => info!("traces off (COCOS_JAEGER_URL empty or COCOS_JAEGER_TRACE_RATIO 0)"),
    }
    (
        Telemetry {
            filter: handle,
            provider,
        },
        guard,
    )
}

type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// The exporter and the OpenTelemetry layer, or None when traces are off.
/// Runs before any async runtime exists (the blocking HTTP client must not
/// be made inside one).
fn start_traces(config: &Config) -> Result<Option<(SdkTracerProvider, BoxedLayer)>, String> {
    use opentelemetry_otlp::{Protocol, RetryPolicy, WithExportConfig, WithHttpConfig};
    let Some(endpoint) = config.traces_endpoint() else {
        return Ok(None);
    };
    // The client's TLS (for an https:// collector) uses ring, as the rest
    // of the daemon; installing it fails only if a provider is installed
    // already, which is then used.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::blocking::Client::builder()
        .timeout(EXPORT_TIMEOUT)
        .connect_timeout(CONNECT_TIMEOUT)
        .build()
        .map_err(|e| format!("HTTP client: {e}"))?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(endpoint.clone())
        .with_timeout(EXPORT_TIMEOUT)
        .with_http_client(client)
        // A batch that cannot be delivered is dropped; the next one tries
        // again. A dead collector then costs the exporter's thread nothing.
        .with_retry_policy(RetryPolicy::disabled())
        .build()
        .map_err(|e| e.to_string())?;
    let exporter = ReportingExporter::new(exporter, endpoint);
    let mut resource = Resource::builder()
        .with_service_name("cocos-manager")
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ));
    if !config.instance_id.is_empty() {
        resource = resource.with_attribute(opentelemetry::KeyValue::new(
            "service.instance.id",
            config.instance_id.clone(),
        ));
    }
    // The batch processor's queue is bounded (2048 spans unless
    // OTEL_BSP_MAX_QUEUE_SIZE says otherwise): when it is full, spans are
    // dropped rather than a request waiting.
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            config.jaeger_trace_ratio,
        ))))
        .with_resource(resource.build())
        .build();
    let layer = otel_layer(&provider);
    Ok(Some((provider, layer)))
}

/// The layer that turns spans of [`SPAN_TARGET`], and nothing else, into
/// OpenTelemetry spans of `provider`.
fn otel_layer(provider: &SdkTracerProvider) -> BoxedLayer {
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("cocos-manager"))
        .with_threads(false)
        .with_location(false)
        .with_target(false)
        .with_tracked_inactivity(false)
        .with_filter(Targets::new().with_target(SPAN_TARGET, tracing::Level::TRACE))
        .boxed()
}

impl Telemetry {
    /// A new log level (SIGHUP).
    pub fn set_level(&self, level: LogLevel) -> Result<(), String> {
        self.filter
            .modify(|f| *f = log_filter(level))
            .map_err(|e| e.to_string())
    }

    /// Flushes the spans still queued, within [`SHUTDOWN_TIMEOUT`]. Blocks:
    /// called once the actors and the runtime are gone.
    pub fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        let begun = Instant::now();
        match provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
            Ok(()) => debug!(took = ?begun.elapsed(), "trace exporter shut down"),
            Err(e) => {
                debug!(error = %e, took = ?begun.elapsed(), "trace exporter did not shut down cleanly")
            }
        }
    }
}

/// The OTLP exporter, reporting a collector that does not answer once
/// (a warning), and again only after it answered in between and at most
/// every [`WARN_INTERVAL`]; every failed export is logged at debug.
#[derive(Debug)]
struct ReportingExporter<E> {
    inner: E,
    endpoint: String,
    failing: AtomicBool,
    last_warning: Mutex<Option<Instant>>,
}

impl<E> ReportingExporter<E> {
    fn new(inner: E, endpoint: String) -> Self {
        ReportingExporter {
            inner,
            endpoint,
            failing: AtomicBool::new(false),
            last_warning: Mutex::new(None),
        }
    }

    /// Whether this failure is worth a warning (false: a debug line).
    fn warn_now(&self) -> bool {
        if self.failing.swap(true, Ordering::SeqCst) {
            return false;
        }
        let mut last = self.last_warning.lock().unwrap_or_else(|e| e.into_inner());
        let due = last.is_none_or(|at| at.elapsed() >= WARN_INTERVAL);
        if due {
            *last = Some(Instant::now());
        }
        due
    }
}

impl<E: SpanExporter> SpanExporter for ReportingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len();
        let result = self.inner.export(batch).await;
        match &result {
            Ok(()) => {
                if self.failing.swap(false, Ordering::SeqCst) {
                    info!(endpoint = %self.endpoint, "trace export works again");
                }
            }
            Err(e) if self.warn_now() => warn!(
                endpoint = %self.endpoint,
                error = %e,
                "trace export failed: the collector does not answer; spans are dropped until it does \
                 (requests are not affected; said once)"
            ),
            Err(e) => debug!(endpoint = %self.endpoint, error = %e, spans, "trace export failed"),
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Marks `span` failed with `error` (an error a client may see: never a
/// secret).
pub fn record_error(span: &Span, error: &dyn Display) {
    span.record("otel.status_code", "ERROR");
    span.record("otel.status_description", error.to_string().as_str());
}

// ---------------------------------------------------------- lifecycle spans

/// The span of one stage of a VM's stop (ACPI power-down, QMP quit,
/// SIGTERM, SIGKILL): from its action until QEMU is gone (the value is
/// dropped) or the stage's budget runs out ([`StopStageSpan::ran_out`]).
pub struct StopStageSpan {
    span: Span,
    ran_out: bool,
}

impl StopStageSpan {
    pub fn new(vm: &str, stage: StopStage, budget: Duration) -> StopStageSpan {
        let name = match stage {
            StopStage::PowerDown => "vm.stop.powerdown",
            StopStage::Quit => "vm.stop.quit",
            StopStage::Term => "vm.stop.sigterm",
            StopStage::Kill => "vm.stop.sigkill",
        };
        let span = tracing::info_span!(
            target: SPAN_TARGET,
            "vm.stop_stage",
            otel.name = name,
            vm = %vm,
            // OpenTelemetry has no unsigned integers.
            budget_ms = i64::try_from(budget.as_millis()).unwrap_or(i64::MAX),
            timed_out = tracing::field::Empty,
        );
        StopStageSpan {
            span,
            ran_out: false,
        }
    }

    /// The stage's budget ran out before QEMU was gone.
    pub fn ran_out(mut self) {
        self.ran_out = true;
    }
}

impl Drop for StopStageSpan {
    fn drop(&mut self) {
        // Recorded once, at the end (a field recorded twice would be two
        // attributes).
        self.span.record("timed_out", self.ran_out);
    }
}

/// The span of a VM's release: its helpers ended, its files removed.
pub fn release_span(vm: &str) -> Span {
    tracing::info_span!(target: SPAN_TARGET, "vm.release", vm = %vm)
}

// ---------------------------------------------------------------- RPC spans

/// A request's HTTP/2 headers as OpenTelemetry's propagators read them.
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The caller's trace context from `traceparent` and `tracestate` (W3C
/// Trace Context), or None when there is no valid one.
pub fn remote_context(headers: &http::HeaderMap) -> Option<opentelemetry::Context> {
    let cx = TraceContextPropagator::new()
        .extract_with_context(&opentelemetry::Context::new(), &HeaderExtractor(headers));
    cx.span().span_context().is_valid().then_some(cx)
}

/// Service and method of a gRPC path (`/package.Service/Method`); a path
/// of another shape is the service, with no method.
pub fn rpc_names(path: &str) -> (&str, &str) {
    let path = cap(path.strip_prefix('/').unwrap_or(path), MAX_RPC_NAME);
    match path.split_once('/') {
        Some((service, method)) if !service.is_empty() && !method.contains('/') => {
            (service, method)
        }
        _ => (path, ""),
    }
}

/// At most `max` bytes of `text`, cut at a character boundary.
fn cap(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The `grpc-status` in `headers` (a trailers-only answer's headers, or
/// the trailers).
pub fn grpc_status(headers: &http::HeaderMap) -> Option<i32> {
    headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The name of a gRPC status code.
pub fn grpc_code_name(code: i32) -> &'static str {
    match code {
        0 => "OK",
        1 => "CANCELLED",
        2 => "UNKNOWN",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        6 => "ALREADY_EXISTS",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        9 => "FAILED_PRECONDITION",
        10 => "ABORTED",
        11 => "OUT_OF_RANGE",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        15 => "DATA_LOSS",
        16 => "UNAUTHENTICATED",
        _ => "UNKNOWN_CODE",
    }
}

/// Whether a server span ends in error for this code (OpenTelemetry's
/// gRPC conventions: the codes that mean the server failed; a refused or
/// unknown request is the client's, and leaves the status unset).
pub fn is_server_error(code: i32) -> bool {
    matches!(code, 2 | 4 | 12 | 13 | 14 | 15)
}

/// The span of one request, continuing the caller's trace when the request
/// carries one. Never the request's body or metadata besides the trace
/// context: a CreateReq carries keys.
fn rpc_span(path: &str, headers: &http::HeaderMap) -> Span {
    let (service, method) = rpc_names(path);
    let name = if method.is_empty() {
        service.to_string()
    } else {
        format!("{service}/{method}")
    };
    let span = tracing::info_span!(
        target: SPAN_TARGET,
        "rpc",
        otel.name = %name,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
        rpc.grpc.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
    );
    if let Some(parent) = remote_context(headers) {
        // Before the span is entered, so it starts with this parent.
        let _ = span.set_parent(parent);
    }
    span
}

/// Records the answer's gRPC status on the request's span.
fn record_status(span: &Span, code: Option<i32>) {
    match code {
        Some(code) => {
            span.record("rpc.grpc.status_code", code);
            if is_server_error(code) {
                record_error(span, &grpc_code_name(code));
            }
        }
        None => record_error(span, &"the answer ended without a gRPC status"),
    }
}

/// The tower layer that gives each request on the gRPC port its span
/// (every service served there: `ManagerService`, health, reflection and
/// any other).
#[derive(Debug, Clone, Copy, Default)]
pub struct RpcSpanLayer;

impl<S> tower::Layer<S> for RpcSpanLayer {
    type Service = RpcSpan<S>;

    fn layer(&self, inner: S) -> RpcSpan<S> {
        RpcSpan { inner }
    }
}

#[derive(Debug, Clone)]
pub struct RpcSpan<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B, ResBody> tower::Service<http::Request<B>> for RpcSpan<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    ResBody: http_body::Body + Unpin + Send + 'static,
{
    type Response = http::Response<TracedBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        use tracing::Instrument;
        let span = rpc_span(request.uri().path(), request.headers());
        let answer = span.in_scope(|| self.inner.call(request));
        Box::pin(async move {
            match answer.instrument(span.clone()).await {
                Ok(response) => {
                    // A trailers-only answer (an error, typically) carries
                    // its status in the headers: the span ends now.
                    // Otherwise it ends with the trailers of the body.
                    let span = match grpc_status(response.headers()) {
                        Some(code) => {
                            record_status(&span, Some(code));
                            None
                        }
                        None => Some(span),
                    };
                    Ok(response.map(|body| TracedBody { inner: body, span }))
                }
                Err(e) => {
                    record_error(&span, &"the request failed in transport");
                    Err(e)
                }
            }
        })
    }
}

/// An answer's body that ends the request's span when its trailers (with
/// the gRPC status) have gone out, or when it is dropped unfinished.
pub struct TracedBody<B> {
    inner: B,
    span: Option<Span>,
}

impl<B: http_body::Body + Unpin> http_body::Body for TracedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    if let Some(span) = this.span.take() {
                        record_status(&span, grpc_status(trailers));
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(span) = this.span.take() {
                    record_error(&span, &"the answer failed while being sent");
                }
            }
            Poll::Ready(None) => {
                if let Some(span) = this.span.take() {
                    record_status(&span, None);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for TracedBody<B> {
    fn drop(&mut self) {
        // Not sent to its end: the client went away (or cancelled).
        if let Some(span) = self.span.take() {
            span.record("rpc.grpc.status_code", 1);
            span.record(
                "otel.status_description",
                "CANCELLED: the answer was not sent to its end",
            );
        }
    }
}

#[cfg(test)]
mod tests;
