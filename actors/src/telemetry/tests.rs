use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, Mutex};

use opentelemetry::trace::{SpanId, SpanKind, Status, TraceId};
use opentelemetry::Value;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tower::{Layer as _, Service as _};
use tracing_subscriber::layer::SubscriberExt;

use super::*;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

#[test]
fn journal_stream_names_a_device_and_inode() {
    assert_eq!(parse_journal_stream("8:12345"), Some((8, 12345)));
    assert_eq!(parse_journal_stream(" 64769:7\n"), Some((64769, 7)));
    for bad in ["", "8", "8:", ":1", "a:1", "8:1:2", "-1:5"] {
        assert_eq!(parse_journal_stream(bad), None, "{bad:?}");
    }
}

#[test]
fn journal_only_when_the_stream_is_stderr_itself() {
    assert!(is_journal(Some("8:12345"), Some((8, 12345))));
    // Inherited by a process whose stderr goes elsewhere.
    assert!(!is_journal(Some("8:12345"), Some((8, 999))));
    assert!(!is_journal(Some("9:12345"), Some((8, 12345))));
    assert!(!is_journal(None, Some((8, 12345))));
    assert!(!is_journal(Some("garbage"), Some((8, 12345))));
    assert!(!is_journal(Some("8:12345"), None));
}

#[test]
fn grpc_paths_give_service_and_method() {
    assert_eq!(
        rpc_names("/manager.ManagerService/CreateVm"),
        ("manager.ManagerService", "CreateVm")
    );
    assert_eq!(
        rpc_names("/cocos.manager.v1.Operator/ListVms"),
        ("cocos.manager.v1.Operator", "ListVms")
    );
    assert_eq!(rpc_names("/"), ("", ""));
    assert_eq!(rpc_names("/odd"), ("odd", ""));
    assert_eq!(rpc_names("/a/b/c"), ("a/b/c", ""));
    let long = format!("/{}/M", "s".repeat(500));
    let (service, method) = rpc_names(&long);
    assert_eq!((service.len(), method), (MAX_RPC_NAME, ""));
    // Cut at a character boundary.
    let wide = format!("/{}", "é".repeat(150));
    assert!(rpc_names(&wide).0.len() <= MAX_RPC_NAME);
}

#[test]
fn grpc_status_from_headers() {
    let mut headers = http::HeaderMap::new();
    assert_eq!(grpc_status(&headers), None);
    headers.insert("grpc-status", http::HeaderValue::from_static("5"));
    assert_eq!(grpc_status(&headers), Some(5));
    headers.insert("grpc-status", http::HeaderValue::from_static("x"));
    assert_eq!(grpc_status(&headers), None);
    assert_eq!(grpc_code_name(4), "DEADLINE_EXCEEDED");
    assert!(is_server_error(13) && is_server_error(4));
    assert!(!is_server_error(0) && !is_server_error(5) && !is_server_error(3));
}

fn headers(pairs: &[(&'static str, &str)]) -> http::HeaderMap {
    let mut map = http::HeaderMap::new();
    for (name, value) in pairs {
        map.insert(*name, http::HeaderValue::from_str(value).expect("header"));
    }
    map
}

#[test]
fn traceparent_is_continued() {
    let traceparent = format!("00-{TRACE}-{PARENT}-01");
    let cx = remote_context(&headers(&[
        ("traceparent", &traceparent),
        ("tracestate", "vendor=abc,other=1"),
    ]))
    .expect("a valid traceparent");
    let span = cx.span();
    let remote = span.span_context();
    assert_eq!(remote.trace_id(), TraceId::from_hex(TRACE).expect("hex"));
    assert_eq!(remote.span_id(), SpanId::from_hex(PARENT).expect("hex"));
    assert!(remote.is_sampled() && remote.is_remote());
    assert_eq!(remote.trace_state().get("vendor"), Some("abc"));
}

#[test]
fn a_bad_or_missing_traceparent_starts_a_new_trace() {
    assert!(remote_context(&http::HeaderMap::new()).is_none());
    for bad in [
        "garbage".to_string(),
        // All-zero trace id and span id are invalid.
        format!("00-{}-{PARENT}-01", "0".repeat(32)),
        format!("00-{TRACE}-{}-01", "0".repeat(16)),
        // Version ff is forbidden.
        format!("ff-{TRACE}-{PARENT}-01"),
        format!("00-{TRACE}-{PARENT}"),
    ] {
        assert!(
            remote_context(&headers(&[("traceparent", &bad)])).is_none(),
            "{bad:?}"
        );
    }
}

/// A log sink for the tests.
#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn the_log_filter_keeps_trace_spans_and_exporter_noise_out() {
    let sink = Sink::default();
    let writer = sink.clone();
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_filter(log_filter(LogLevel::Debug));
    let subscriber = tracing_subscriber::registry().with(layer);
    tracing::subscriber::with_default(subscriber, || {
        let _rpc =
            tracing::info_span!(target: SPAN_TARGET, "rpc", marker = "in-trace-span").entered();
        tracing::debug!("line of ours");
        tracing::trace!("too fine");
        tracing::warn!(target: "opentelemetry_sdk", "sdk internal");
        tracing::warn!(target: "opentelemetry-otlp", "otlp internal");
        tracing::debug!(target: "reqwest::connect", "exporter connecting");
        tracing::debug!(target: "h2::server", "server frame");
    });
    let text =
        String::from_utf8_lossy(&sink.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
    assert!(text.contains("line of ours"), "{text}");
    // The server's own HTTP/2 library still logs at debug.
    assert!(text.contains("server frame"), "{text}");
    for absent in [
        "too fine",
        "in-trace-span",
        "sdk internal",
        "otlp internal",
        "exporter connecting",
    ] {
        assert!(!text.contains(absent), "{absent:?} in {text}");
    }
}

// ------------------------------------------------- spans through the layer

/// Spans, as the collector would get them.
#[derive(Debug, Clone, Default)]
struct Collected(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Collected {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(batch);
        Ok(())
    }
}

impl Collected {
    fn spans(&self) -> Vec<SpanData> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Runs `f` with the daemon's OpenTelemetry layer installed (exporting at
/// once), and returns what was exported.
fn traced(f: impl FnOnce()) -> Vec<SpanData> {
    let collected = Collected::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(collected.clone())
        .build();
    let subscriber = tracing_subscriber::registry().with(vec![otel_layer(&provider)]);
    tracing::subscriber::with_default(subscriber, f);
    let _ = provider.shutdown();
    collected.spans()
}

/// Polls a future that must be ready at once (the test services never
/// wait), without an executor: the span processor runs its own.
fn now<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let mut cx = TaskContext::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut cx) {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("the test future was not ready"),
    }
}

/// A response body of given frames.
struct Frames(VecDeque<http_body::Frame<&'static [u8]>>);

impl http_body::Body for Frames {
    type Data = &'static [u8];
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Poll::Ready(self.0.pop_front().map(Ok))
    }
}

/// An answer with a message and the status in its trailers.
fn answer(code: &'static str) -> http::Response<Frames> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static(code));
    http::Response::new(Frames(VecDeque::from([
        http_body::Frame::data(&b"\0\0\0\0\0"[..]),
        http_body::Frame::trailers(trailers),
    ])))
}

/// A trailers-only answer (an error before any message).
fn refusal(code: &'static str) -> http::Response<Frames> {
    let mut response = http::Response::new(Frames(VecDeque::new()));
    response
        .headers_mut()
        .insert("grpc-status", http::HeaderValue::from_static(code));
    response
}

fn request(path: &str, traceparent: Option<&str>) -> http::Request<()> {
    let mut builder = http::Request::builder().uri(format!("http://localhost{path}"));
    if let Some(tp) = traceparent {
        builder = builder
            .header("traceparent", tp)
            .header("tracestate", "vendor=abc");
    }
    builder.body(()).expect("request")
}

/// Sends one request through the layer to a service answering with
/// `respond`, and reads the whole answer unless `drop_early`.
fn through_layer(
    req: http::Request<()>,
    respond: fn() -> http::Response<Frames>,
    drop_early: bool,
) {
    let inner = tower::service_fn(move |_req: http::Request<()>| async move {
        // Work done for the request happens inside its span.
        let _child = tracing::info_span!(target: SPAN_TARGET, "child step").entered();
        Ok::<_, Infallible>(respond())
    });
    let mut service = RpcSpanLayer.layer(inner);
    let response = now(service.call(req)).expect("answer");
    let mut body = response.into_body();
    if drop_early {
        return;
    }
    let mut cx = TaskContext::from_waker(std::task::Waker::noop());
    while let Poll::Ready(Some(_)) = http_body::Body::poll_frame(Pin::new(&mut body), &mut cx) {}
}

fn attribute(span: &SpanData, key: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.clone())
}

fn named<'a>(spans: &'a [SpanData], name: &str) -> &'a SpanData {
    spans
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no span {name:?} in {spans:#?}"))
}

#[test]
fn an_rpc_span_continues_the_callers_trace() {
    let traceparent = format!("00-{TRACE}-{PARENT}-01");
    let spans = traced(|| {
        through_layer(
            request("/manager.ManagerService/CreateVm", Some(&traceparent)),
            || answer("0"),
            false,
        )
    });
    let rpc = named(&spans, "manager.ManagerService/CreateVm");
    assert_eq!(
        rpc.span_context.trace_id(),
        TraceId::from_hex(TRACE).expect("hex")
    );
    assert_eq!(rpc.parent_span_id, SpanId::from_hex(PARENT).expect("hex"));
    assert!(rpc.parent_span_is_remote);
    assert_eq!(rpc.span_context.trace_state().get("vendor"), Some("abc"));
    assert_eq!(rpc.span_kind, SpanKind::Server);
    assert_eq!(attribute(rpc, "rpc.system"), Some(Value::from("grpc")));
    assert_eq!(
        attribute(rpc, "rpc.service"),
        Some(Value::from("manager.ManagerService"))
    );
    assert_eq!(attribute(rpc, "rpc.method"), Some(Value::from("CreateVm")));
    assert_eq!(attribute(rpc, "rpc.grpc.status_code"), Some(Value::I64(0)));
    assert_eq!(rpc.status, Status::Unset);
    // What the handler does is a child of the request's span.
    let child = named(&spans, "child step");
    assert_eq!(child.parent_span_id, rpc.span_context.span_id());
    assert_eq!(child.span_context.trace_id(), rpc.span_context.trace_id());
}

#[test]
fn an_rpc_without_traceparent_starts_a_trace() {
    let spans = traced(|| {
        through_layer(
            request("/grpc.health.v1.Health/Check", None),
            || answer("0"),
            false,
        )
    });
    let rpc = named(&spans, "grpc.health.v1.Health/Check");
    assert_eq!(rpc.parent_span_id, SpanId::INVALID);
    assert_ne!(rpc.span_context.trace_id(), TraceId::INVALID);
}

#[test]
fn a_server_error_marks_the_span_failed_a_client_error_does_not() {
    let spans = traced(|| {
        through_layer(request("/m.S/Internal", None), || refusal("13"), false);
        through_layer(request("/m.S/Missing", None), || refusal("5"), false);
        through_layer(request("/m.S/Late", None), || answer("4"), false);
    });
    let internal = named(&spans, "m.S/Internal");
    assert_eq!(
        attribute(internal, "rpc.grpc.status_code"),
        Some(Value::I64(13))
    );
    assert!(
        matches!(&internal.status, Status::Error { description } if description == "INTERNAL"),
        "{:?}",
        internal.status
    );
    let missing = named(&spans, "m.S/Missing");
    assert_eq!(
        attribute(missing, "rpc.grpc.status_code"),
        Some(Value::I64(5))
    );
    assert_eq!(missing.status, Status::Unset);
    let late = named(&spans, "m.S/Late");
    assert!(matches!(late.status, Status::Error { .. }), "{late:?}");
}

#[test]
fn an_answer_not_sent_to_its_end_is_cancelled() {
    let spans = traced(|| through_layer(request("/m.S/Gone", None), || answer("0"), true));
    let gone = named(&spans, "m.S/Gone");
    assert_eq!(attribute(gone, "rpc.grpc.status_code"), Some(Value::I64(1)));
}

#[test]
fn no_request_content_reaches_a_span() {
    // Metadata other than the trace context is never recorded.
    let spans = traced(|| {
        let mut req = request("/manager.ManagerService/CreateVm", None);
        req.headers_mut().insert(
            "authorization",
            http::HeaderValue::from_static("Bearer very-secret"),
        );
        through_layer(req, || answer("0"), false)
    });
    let text = format!("{spans:?}");
    assert!(!text.contains("very-secret"), "{text}");
}

#[test]
fn a_dead_collector_is_warned_about_once() {
    let exporter = ReportingExporter::new(Collected::default(), "http://x/v1/traces".into());
    assert!(exporter.warn_now(), "the first failure warns");
    assert!(!exporter.warn_now(), "later failures do not");
    assert!(!exporter.warn_now());
    // It recovers, then fails again soon: still no second warning.
    exporter.failing.store(false, Ordering::SeqCst);
    assert!(!exporter.warn_now());
    // Long after the last warning, a new outage is warned about.
    exporter.failing.store(false, Ordering::SeqCst);
    *exporter
        .last_warning
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = Instant::now().checked_sub(WARN_INTERVAL);
    assert!(exporter.warn_now());
}

#[test]
fn only_our_spans_become_opentelemetry_spans() {
    let spans = traced(|| {
        // What a library (h2, the exporter's HTTP client) would make.
        let _library = tracing::info_span!("library span").entered();
        let _other = tracing::info_span!(target: "h2::proto", "connection").entered();
        let _ours = tracing::info_span!(target: SPAN_TARGET, "ours").entered();
    });
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_ref()).collect();
    assert_eq!(names, ["ours"]);
}

#[test]
fn a_stop_stage_records_whether_it_ran_out_once() {
    use cocos_core::lifecycle::StopStage;
    let spans = traced(|| {
        StopStageSpan::new("vm-1", StopStage::PowerDown, Duration::from_secs(10)).ran_out();
        drop(StopStageSpan::new(
            "vm-1",
            StopStage::Quit,
            Duration::from_secs(5),
        ));
    });
    let powerdown = named(&spans, "vm.stop.powerdown");
    let quit = named(&spans, "vm.stop.quit");
    assert_eq!(attribute(powerdown, "timed_out"), Some(Value::Bool(true)));
    assert_eq!(attribute(quit, "timed_out"), Some(Value::Bool(false)));
    assert_eq!(attribute(quit, "budget_ms"), Some(Value::I64(5000)));
    assert_eq!(attribute(quit, "vm"), Some(Value::from("vm-1")));
    for span in [powerdown, quit] {
        let count = span
            .attributes
            .iter()
            .filter(|kv| kv.key.as_str() == "timed_out")
            .count();
        assert_eq!(count, 1, "{span:?}");
    }
}
