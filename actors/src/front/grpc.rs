//! `manager.ManagerService` over tonic, plus `grpc.health.v1.Health` and
//! server reflection on the same port.

use std::future::Future;

use actix::Addr;
use cocos_core::config::Config;
use cocos_core::guest::validate_create;
use cocos_core::proto::manager_service_server::{ManagerService, ManagerServiceServer};
use cocos_core::proto::{
    AttestationPolicyReq, AttestationPolicyRes, CreateReq, CreateRes, CvmInfoReq, CvmInfoRes,
    RemoveReq, FILE_DESCRIPTOR_SET,
};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use tonic_health::ServingStatus;
use tracing::{info, warn};

use crate::error::ApiError;
use crate::supervisor::{AttestationPolicy, CreateVm, RemoveVm, Supervisor, VmInfo};

/// The name health checks ask about.
pub const HEALTH_SERVICE: &str = "manager";

pub struct ManagerApi {
    supervisor: Addr<Supervisor>,
}

fn mailbox(e: actix::MailboxError) -> Status {
    Status::from(ApiError::from(e))
}

#[tonic::async_trait]
impl ManagerService for ManagerApi {
    async fn create_vm(&self, request: Request<CreateReq>) -> Result<Response<CreateRes>, Status> {
        let validated = validate_create(request.get_ref()).map_err(|e| {
            warn!(error = %e, "CreateVm refused");
            Status::invalid_argument(e.to_string())
        })?;
        let created = self
            .supervisor
            .send(CreateVm(validated))
            .await
            .map_err(mailbox)?
            .map_err(Status::from)?;
        Ok(Response::new(created))
    }

    async fn remove_vm(&self, request: Request<RemoveReq>) -> Result<Response<()>, Status> {
        let id = request.into_inner().cvm_id;
        self.supervisor
            .send(RemoveVm(id))
            .await
            .map_err(mailbox)?
            .map_err(Status::from)?;
        Ok(Response::new(()))
    }

    async fn cvm_info(&self, request: Request<CvmInfoReq>) -> Result<Response<CvmInfoRes>, Status> {
        let id = request.into_inner().id;
        let info = self
            .supervisor
            .send(VmInfo(id))
            .await
            .map_err(mailbox)?
            .map_err(Status::from)?;
        Ok(Response::new(info))
    }

    async fn attestation_policy(
        &self,
        request: Request<AttestationPolicyReq>,
    ) -> Result<Response<AttestationPolicyRes>, Status> {
        let id = request.into_inner().id;
        let document = self
            .supervisor
            .send(AttestationPolicy(id.clone()))
            .await
            .map_err(mailbox)?
            .map_err(Status::from)?;
        Ok(Response::new(AttestationPolicyRes {
            info: document.into_bytes(),
            id,
        }))
    }
}

fn read_pem(what: &str, path: &std::path::Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
}

/// The TLS settings the configuration asks for, if any.
fn tls_config(config: &Config) -> Result<Option<ServerTlsConfig>, String> {
    if config.grpc_server_cert.as_os_str().is_empty() {
        return Ok(None);
    }
    let cert = read_pem("MANAGER_GRPC_SERVER_CERT", &config.grpc_server_cert)?;
    let key = read_pem("MANAGER_GRPC_SERVER_KEY", &config.grpc_server_key)?;
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
    if !config.grpc_client_ca_certs.as_os_str().is_empty() {
        let ca = read_pem("MANAGER_GRPC_CLIENT_CA_CERTS", &config.grpc_client_ca_certs)?;
        tls = tls.client_ca_root(Certificate::from_pem(ca));
    }
    Ok(Some(tls))
}

/// A bound gRPC server, ready to serve.
pub struct GrpcServer {
    listener: tokio::net::TcpListener,
    tls: Option<ServerTlsConfig>,
    supervisor: Addr<Supervisor>,
    pub health: HealthReporter,
    health_service: HealthServer<HealthService>,
}

impl GrpcServer {
    pub async fn bind(config: &Config, supervisor: Addr<Supervisor>) -> Result<GrpcServer, String> {
        let tls = tls_config(config)?;
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
            health,
            health_service,
        })
    }

    /// Serves until `shutdown` completes, then finishes requests in flight.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), String> {
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| format!("reflection: {e}"))?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .map_err(|e| format!("reflection: {e}"))?;
        self.health
            .set_service_status(HEALTH_SERVICE, ServingStatus::Serving)
            .await;
        self.health
            .set_service_status("", ServingStatus::Serving)
            .await;
        let mut builder = Server::builder();
        let secure = self.tls.is_some();
        if let Some(tls) = self.tls {
            builder = builder.tls_config(tls).map_err(|e| format!("TLS: {e}"))?;
        }
        info!(addr = ?self.listener.local_addr().ok(), tls = secure, "gRPC API serving");
        let api = ManagerApi {
            supervisor: self.supervisor,
        };
        builder
            .add_service(ManagerServiceServer::new(api))
            .add_service(self.health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(self.listener),
                shutdown,
            )
            .await
            .map_err(|e| format!("gRPC server: {e}"))
    }
}
