//! `manager.ManagerService` over tonic, plus `grpc.health.v1.Health` and
//! server reflection on the same port.
//!
//! Requests are read with the server's own decoding of the wire
//! (`proto/manager_server.proto`: string fields as bytes), so a string that
//! is not UTF-8 is INVALID_ARGUMENT naming the field; reflection serves the
//! public `manager.proto`. Every request the front sends to the supervisor
//! has a deadline: `MANAGER_GRPC_TIMEOUT`, or the client's `grpc-timeout`
//! when shorter. The server has explicit limits (see [`GrpcServer::serve`]).

use std::time::Duration;

use actix::{Addr, Handler, Message};
use cocos_core::config::Config;
use cocos_core::duration::format_go_duration;
use cocos_core::guest::{
    attestation_policy_from_wire, create_from_wire, cvm_info_from_wire, remove_from_wire,
    validate_create, FieldError, Redacted,
};
use cocos_core::operator_proto::operator_server::OperatorServer;
use cocos_core::operator_proto::FILE_DESCRIPTOR_SET as OPERATOR_DESCRIPTOR_SET;
use cocos_core::proto::{AttestationPolicyRes, CreateRes, CvmInfoRes, FILE_DESCRIPTOR_SET};
use cocos_core::server_proto::manager_service_server::{ManagerService, ManagerServiceServer};
use cocos_core::server_proto::{AttestationPolicyReq, CreateReq, CvmInfoReq, RemoveReq};
use tokio::sync::{oneshot, watch};
use tonic::metadata::MetadataMap;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use tonic_health::ServingStatus;
use tracing::{debug, info, warn};

use crate::error::ApiError;
use crate::front::operator::OperatorApi;
use crate::front::tls::{ServerTls, TlsIncoming, TlsReloader};
use crate::front::{LimitedIncoming, STATS};
use crate::metrics::{self, Answered};
use crate::supervisor::{AttestationPolicy, CreateVm, RemoveVm, Supervisor, VmInfo};

/// The name health checks ask about.
pub const HEALTH_SERVICE: &str = "manager";

/// HTTP/2 PING sent to a connection idle this long…
pub const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
/// …which is closed if the PING is not answered within this.
pub const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// TCP keepalive probes start after this much idle time (the kernel's
/// interval and count apply after that).
pub const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// A new connection must send its first bytes (HTTP/2 preface or TLS
/// ClientHello) within this, or it is closed.
pub const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(10);
/// A TLS handshake must complete within this.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request header block (gRPC metadata) accepted.
pub const MAX_HEADER_LIST_SIZE: u32 = 16 << 10;

pub struct ManagerApi {
    supervisor: Addr<Supervisor>,
    /// `MANAGER_GRPC_TIMEOUT`.
    timeout: Duration,
}

/// How long one request may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Deadline {
    pub(crate) limit: Duration,
    /// The client's `grpc-timeout` was shorter than `MANAGER_GRPC_TIMEOUT`.
    from_client: bool,
}

impl Deadline {
    /// `MANAGER_GRPC_TIMEOUT`, or the client's `grpc-timeout` if shorter.
    pub(crate) fn of(metadata: &MetadataMap, server: Duration) -> Deadline {
        match client_timeout(metadata) {
            Some(client) if client < server => Deadline {
                limit: client,
                from_client: true,
            },
            _ => Deadline {
                limit: server,
                from_client: false,
            },
        }
    }

    /// The answer to a request that ran out of time; `fate` says what
    /// becomes of the work it started.
    pub(crate) fn exceeded(&self, what: &str, fate: &str) -> ApiError {
        STATS
            .deadline_exceeded
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let source = if self.from_client {
            "the client's grpc-timeout"
        } else {
            "MANAGER_GRPC_TIMEOUT"
        };
        let limit = format_go_duration(self.limit);
        warn!(request = what, %limit, source, "request deadline exceeded");
        ApiError::DeadlineExceeded(format!(
            "{what} did not finish within {limit} ({source}); {fate}"
        ))
    }
}

/// The `grpc-timeout` header a client sent (gRPC over HTTP/2: at most eight
/// digits and a unit, H M S m u n), if it is well formed.
fn client_timeout(metadata: &MetadataMap) -> Option<Duration> {
    let text = metadata.get("grpc-timeout")?.to_str().ok()?;
    let unit = text.chars().last()?;
    let digits = &text[..text.len() - unit.len_utf8()];
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let value: u64 = digits.parse().ok()?;
    Some(match unit {
        'H' => Duration::from_secs(value.checked_mul(3600)?),
        'M' => Duration::from_secs(value.checked_mul(60)?),
        'S' => Duration::from_secs(value),
        'm' => Duration::from_millis(value),
        'u' => Duration::from_micros(value),
        'n' => Duration::from_nanos(value),
        _ => return None,
    })
}

/// A request refused for one of its fields.
fn refused(what: &'static str) -> impl Fn(FieldError) -> Status {
    move |e| {
        warn!(error = %e, "{what} refused");
        Status::from(ApiError::from(e))
    }
}

/// What a request that ran out of time leaves behind.
const REMOVE_FATE: &str =
    "the removal goes on in the manager; CVMInfo answers NOT_FOUND once it is done";
pub(crate) const READ_FATE: &str = "nothing was changed";
const CREATE_FATE: &str = "the create was abandoned: it is rolled back, or, if the VM still \
     comes up, that VM is removed again, so nothing is left behind";

/// Sends `msg` to the supervisor and waits at most `deadline`. With
/// `carry_on`, the message is sent from its own task, so it is delivered
/// and carried out even when the caller gives up (deadline, or the client
/// cancelled); otherwise giving up drops it.
pub(crate) async fn ask<M, T>(
    supervisor: &Addr<Supervisor>,
    msg: M,
    deadline: Deadline,
    what: &'static str,
    fate: &'static str,
    carry_on: bool,
) -> Result<T, ApiError>
where
    M: Message<Result = Result<T, ApiError>> + Send + 'static,
    T: Send + 'static,
    Supervisor: Handler<M>,
{
    let request = supervisor.send(msg);
    if carry_on {
        let task =
            tokio::spawn(async move { request.await.map_err(ApiError::from).and_then(|r| r) });
        match tokio::time::timeout(deadline.limit, task).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => Err(ApiError::Internal(format!("{what} failed: {e}"))),
            Err(_) => Err(deadline.exceeded(what, fate)),
        }
    } else {
        match tokio::time::timeout(deadline.limit, request).await {
            Ok(result) => result.map_err(ApiError::from).and_then(|r| r),
            Err(_) => Err(deadline.exceeded(what, fate)),
        }
    }
}

type CreateResult = Result<CreateRes, ApiError>;

/// The answer of a create still on its way. If the caller gives up before
/// it arrives (its deadline passed, or the client cancelled and tonic
/// dropped the handler), whoever sees the VM's id last removes the VM: the
/// create's task when it can no longer deliver the answer, or this guard
/// when the answer arrived but was never taken. Nobody else knows that id.
struct PendingCreate {
    rx: oneshot::Receiver<CreateResult>,
    supervisor: Addr<Supervisor>,
    taken: bool,
}

impl PendingCreate {
    /// Sends the create from its own task and returns the pending answer.
    fn start(supervisor: &Addr<Supervisor>, msg: CreateVm) -> PendingCreate {
        let (tx, rx) = oneshot::channel();
        let request = supervisor.send(msg);
        let remover = supervisor.clone();
        tokio::spawn(async move {
            let result = request.await.map_err(ApiError::from).and_then(|r| r);
            if let Err(Ok(created)) = tx.send(result) {
                remove_abandoned(&remover, created).await;
            }
        });
        PendingCreate {
            rx,
            supervisor: supervisor.clone(),
            taken: false,
        }
    }

    /// The answer, or None once `limit` has passed without one; after None
    /// a late answer can no longer arrive (its VM is removed).
    async fn wait(&mut self, limit: Duration) -> Option<CreateResult> {
        let answer = match tokio::time::timeout(limit, &mut self.rx).await {
            Ok(Ok(result)) => Some(result),
            Ok(Err(_)) => Some(Err(ApiError::Internal(
                "the create ended without an answer".into(),
            ))),
            Err(_) => {
                // Closing first makes the race with a late answer exact:
                // either it is already here and is the answer, or the
                // create's task finds the channel closed.
                self.rx.close();
                self.rx.try_recv().ok()
            }
        };
        self.taken = true;
        answer
    }
}

impl Drop for PendingCreate {
    fn drop(&mut self) {
        if self.taken {
            return;
        }
        self.rx.close();
        if let Ok(Ok(created)) = self.rx.try_recv() {
            warn!(vm = %created.cvm_id, "CreateVm's client went away before the answer: removing the VM");
            self.supervisor.do_send(RemoveVm(created.cvm_id));
        }
    }
}

/// Removes a VM whose create was answered DEADLINE_EXCEEDED (or whose
/// client went away): no client knows its id.
async fn remove_abandoned(supervisor: &Addr<Supervisor>, created: CreateRes) {
    let id = created.cvm_id;
    warn!(vm = %id, "VM came up after its CreateVm was abandoned: removing it");
    match supervisor.send(RemoveVm(id.clone())).await {
        Ok(Ok(())) => info!(vm = %id, "abandoned VM removed"),
        Ok(Err(e)) => warn!(vm = %id, error = %e, "cannot remove the abandoned VM"),
        Err(e) => warn!(vm = %id, error = %e, "cannot remove the abandoned VM"),
    }
}

#[tonic::async_trait]
impl ManagerService for ManagerApi {
    async fn create_vm(&self, request: Request<CreateReq>) -> Result<Response<CreateRes>, Status> {
        let deadline = Deadline::of(request.metadata(), self.timeout);
        let req = create_from_wire(request.into_inner()).map_err(refused("CreateVm"))?;
        // Never the request itself: its derived Debug prints the secrets.
        debug!(request = ?Redacted(&req), "CreateVm");
        let validated = validate_create(&req).map_err(refused("CreateVm"))?;
        // The request's span (see telemetry) parents the launch's spans.
        let span = tracing::Span::current();
        let mut pending = PendingCreate::start(&self.supervisor, CreateVm(validated, span));
        match pending.wait(deadline.limit).await {
            Some(result) => Ok(Response::new(result?)),
            None => Err(deadline.exceeded("CreateVm", CREATE_FATE).into()),
        }
    }

    async fn remove_vm(&self, request: Request<RemoveReq>) -> Result<Response<()>, Status> {
        let deadline = Deadline::of(request.metadata(), self.timeout);
        let req = remove_from_wire(request.into_inner()).map_err(refused("RemoveVm"))?;
        let msg = RemoveVm(req.cvm_id);
        ask(
            &self.supervisor,
            msg,
            deadline,
            "RemoveVm",
            REMOVE_FATE,
            true,
        )
        .await?;
        Ok(Response::new(()))
    }

    async fn cvm_info(&self, request: Request<CvmInfoReq>) -> Result<Response<CvmInfoRes>, Status> {
        let deadline = Deadline::of(request.metadata(), self.timeout);
        let req = cvm_info_from_wire(request.into_inner()).map_err(refused("CVMInfo"))?;
        let info = ask(
            &self.supervisor,
            VmInfo(req.id),
            deadline,
            "CVMInfo",
            READ_FATE,
            false,
        )
        .await?;
        Ok(Response::new(info))
    }

    async fn attestation_policy(
        &self,
        request: Request<AttestationPolicyReq>,
    ) -> Result<Response<AttestationPolicyRes>, Status> {
        let deadline = Deadline::of(request.metadata(), self.timeout);
        let req = attestation_policy_from_wire(request.into_inner())
            .map_err(refused("AttestationPolicy"))?;
        let id = req.id;
        let msg = AttestationPolicy(id.clone());
        let document = ask(
            &self.supervisor,
            msg,
            deadline,
            "AttestationPolicy",
            READ_FATE,
            false,
        )
        .await?;
        Ok(Response::new(AttestationPolicyRes {
            info: document.into_bytes(),
            id,
        }))
    }
}

/// [`ManagerApi`] with its answers counted by result for `/metrics`
/// (`CreateVm`, `RemoveVm`, `AttestationPolicy`; README: Metrics).
struct CountedApi(ManagerApi);

#[tonic::async_trait]
impl ManagerService for CountedApi {
    async fn create_vm(&self, request: Request<CreateReq>) -> Result<Response<CreateRes>, Status> {
        metrics::counted(Answered::CreateVm, self.0.create_vm(request)).await
    }

    async fn remove_vm(&self, request: Request<RemoveReq>) -> Result<Response<()>, Status> {
        metrics::counted(Answered::RemoveVm, self.0.remove_vm(request)).await
    }

    async fn cvm_info(&self, request: Request<CvmInfoReq>) -> Result<Response<CvmInfoRes>, Status> {
        self.0.cvm_info(request).await
    }

    async fn attestation_policy(
        &self,
        request: Request<AttestationPolicyReq>,
    ) -> Result<Response<AttestationPolicyRes>, Status> {
        metrics::counted(
            Answered::AttestationPolicy,
            self.0.attestation_policy(request),
        )
        .await
    }
}

/// The limits the server enforces, from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Limits {
    /// `MANAGER_GRPC_TIMEOUT`.
    timeout: Duration,
    /// `MANAGER_GRPC_MAX_CONNECTIONS`.
    max_connections: usize,
    /// `MANAGER_GRPC_MAX_STREAMS`.
    max_streams: u32,
    /// `MANAGER_GRPC_MAX_MESSAGE_SIZE`.
    max_message_size: usize,
}

impl Limits {
    fn of(config: &Config) -> Limits {
        Limits {
            timeout: config.grpc_timeout,
            max_connections: usize::try_from(config.grpc_max_connections).unwrap_or(usize::MAX),
            max_streams: config.grpc_max_streams,
            max_message_size: usize::try_from(config.grpc_max_message_size.0).unwrap_or(usize::MAX),
        }
    }
}

/// A bound gRPC server, ready to serve.
pub struct GrpcServer {
    listener: tokio::net::TcpListener,
    tls: ServerTls,
    supervisor: Addr<Supervisor>,
    limits: Limits,
    pub health: HealthReporter,
    health_service: HealthServer<HealthService>,
}

impl GrpcServer {
    pub async fn bind(config: &Config, supervisor: Addr<Supervisor>) -> Result<GrpcServer, String> {
        let tls = ServerTls::load(config)?;
        let listener = tokio::net::TcpListener::bind((config.grpc_host.as_str(), config.grpc_port))
            .await
            .map_err(|e| {
                format!(
                    "cannot listen on MANAGER_GRPC_HOST:MANAGER_GRPC_PORT {}:{}: {e}",
                    config.grpc_host, config.grpc_port
                )
            })?;
        let health = HealthReporter::new();
        let health_service = HealthServer::new(HealthService::from_health_reporter(health.clone()));
        Ok(GrpcServer {
            listener,
            tls,
            supervisor,
            limits: Limits::of(config),
            health,
            health_service,
        })
    }

    /// What SIGHUP calls to replace the certificate, key and client CA
    /// while serving.
    pub fn tls_reloader(&self) -> TlsReloader {
        self.tls.reloader()
    }

    /// Serves until `stop` is set, then finishes requests in flight (open
    /// streams of the Operator service end at once).
    ///
    /// Limits: at most `MANAGER_GRPC_MAX_CONNECTIONS` connections (one more
    /// is closed at once), each silent for at most [`FIRST_BYTES_TIMEOUT`];
    /// `MANAGER_GRPC_MAX_STREAMS` requests in flight per connection (HTTP/2
    /// concurrent streams, and as many handled at once); messages of at most
    /// `MANAGER_GRPC_MAX_MESSAGE_SIZE` either way (a larger request is
    /// OUT_OF_RANGE, tonic's code for it); HTTP/2 keepalive PINGs and TCP
    /// keepalive so dead peers free their slot; headers of at most
    /// [`MAX_HEADER_LIST_SIZE`]; each request bounded by
    /// `MANAGER_GRPC_TIMEOUT`.
    pub async fn serve(self, stop: watch::Receiver<bool>) -> Result<(), String> {
        let streams_stop = stop.clone();
        let shutdown = async move {
            let mut stop = stop;
            let _ = stop.wait_for(|stop| *stop).await;
        };
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(OPERATOR_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| format!("reflection: {e}"))?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(OPERATOR_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .map_err(|e| format!("reflection: {e}"))?;
        self.health
            .set_service_status(HEALTH_SERVICE, ServingStatus::Serving)
            .await;
        self.health
            .set_service_status("", ServingStatus::Serving)
            .await;
        let limits = self.limits;
        let builder = Server::builder()
            .max_concurrent_streams(limits.max_streams)
            .concurrency_limit_per_connection(limits.max_streams as usize)
            .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
            .http2_max_header_list_size(MAX_HEADER_LIST_SIZE)
            // Latency of every request on the port, by service and method.
            .layer(metrics::GrpcMetricsLayer);
        let addr = self.listener.local_addr().ok();
        if !self.tls.is_on() && addr.is_some_and(|a| !a.ip().to_canonical().is_loopback()) {
            warn!(
                ?addr,
                "gRPC API serving plaintext on an address that is not loopback, as \
                 MANAGER_GRPC_ALLOW_PLAINTEXT=true allows: requests, and the keys and tokens they \
                 carry, cross the network unencrypted"
            );
        }
        info!(
            ?addr,
            tls = self.tls.is_on(),
            mutual_tls = self.tls.mutual,
            cert_sha256 = self.tls.cert_sha256.as_deref().unwrap_or(""),
            timeout = %format_go_duration(limits.timeout),
            max_connections = limits.max_connections,
            max_streams = limits.max_streams,
            max_message_size = limits.max_message_size,
            "gRPC API serving"
        );
        let operator = OperatorServer::new(OperatorApi {
            supervisor: self.supervisor.clone(),
            timeout: limits.timeout,
            stop: streams_stop,
        })
        .max_decoding_message_size(limits.max_message_size)
        .max_encoding_message_size(limits.max_message_size);
        let api = ManagerServiceServer::new(CountedApi(ManagerApi {
            supervisor: self.supervisor,
            timeout: limits.timeout,
        }))
        .max_decoding_message_size(limits.max_message_size)
        .max_encoding_message_size(limits.max_message_size);
        let incoming = TcpIncoming::from(self.listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(TCP_KEEPALIVE));
        let incoming = LimitedIncoming::new(incoming, limits.max_connections, FIRST_BYTES_TIMEOUT);
        // A span per request, on every service of the port.
        let router = builder
            .layer(crate::telemetry::RpcSpanLayer)
            .add_service(api)
            .add_service(operator)
            .add_service(self.health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);
        let served = match self.tls.current() {
            // TLS is terminated here, not by tonic, so that SIGHUP can
            // replace the certificate (see `front::tls`).
            Some(current) => {
                let incoming = TlsIncoming::new(incoming, current, TLS_HANDSHAKE_TIMEOUT);
                router
                    .serve_with_incoming_shutdown(incoming, shutdown)
                    .await
            }
            None => {
                router
                    .serve_with_incoming_shutdown(incoming, shutdown)
                    .await
            }
        };
        served.map_err(|e| format!("gRPC server: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::MetadataValue;

    fn with_timeout(value: &'static str) -> MetadataMap {
        let mut map = MetadataMap::new();
        map.insert("grpc-timeout", MetadataValue::from_static(value));
        map
    }

    #[test]
    fn client_timeouts() {
        let ms = Duration::from_millis;
        for (text, expected) in [
            ("5S", Some(Duration::from_secs(5))),
            ("250m", Some(ms(250))),
            ("2M", Some(Duration::from_secs(120))),
            ("1H", Some(Duration::from_secs(3600))),
            ("99999999H", Some(Duration::from_secs(99_999_999 * 3600))),
            ("10u", Some(Duration::from_micros(10))),
            ("7n", Some(Duration::from_nanos(7))),
            ("123456789S", None),
            ("S", None),
            ("5", None),
            ("5s", None),
            ("-5S", None),
            ("", None),
        ] {
            assert_eq!(client_timeout(&with_timeout(text)), expected, "{text:?}");
        }
        assert_eq!(client_timeout(&MetadataMap::new()), None);
    }

    #[test]
    fn the_shorter_deadline_wins() {
        let server = Duration::from_secs(60);
        assert_eq!(
            Deadline::of(&with_timeout("2S"), server),
            Deadline {
                limit: Duration::from_secs(2),
                from_client: true
            }
        );
        assert_eq!(
            Deadline::of(&with_timeout("5M"), server),
            Deadline {
                limit: server,
                from_client: false
            }
        );
        let err = Deadline::of(&MetadataMap::new(), Duration::from_secs(1))
            .exceeded("CreateVm", CREATE_FATE);
        let status = Status::from(err);
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert!(
            status
                .message()
                .starts_with("CreateVm did not finish within 1s (MANAGER_GRPC_TIMEOUT)"),
            "{}",
            status.message()
        );
    }
}
