//! The Cocos-compatible HTTP endpoint: `GET /health` and `GET /metrics`.

use std::sync::atomic::Ordering;
use std::time::Duration;

use actix::Addr;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use cocos_core::config::Config;
use cocos_core::duration::format_go_duration;
use serde_json::json;

use crate::front::STATS;
use crate::ports::{PortAllocator, Snapshot};
use crate::supervisor::{ListVms, Supervisor};

#[derive(Clone)]
struct HttpState {
    instance_id: String,
    /// `MANAGER_GRPC_TIMEOUT`: bound of every question to an actor.
    timeout: Duration,
    supervisor: Addr<Supervisor>,
    ports: Addr<PortAllocator>,
}

async fn health(State(state): State<HttpState>) -> impl IntoResponse {
    let body = json!({
        "status": "pass",
        "version": env!("CARGO_PKG_VERSION"),
        "commit": option_env!("COCOS_COMMIT").unwrap_or("unknown"),
        "description": "manager service",
        "build_time": option_env!("COCOS_BUILD_TIME").unwrap_or("unknown"),
        "instance_id": state.instance_id,
    });
    (
        [(header::CONTENT_TYPE, "application/health+json")],
        body.to_string(),
    )
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    let asked = tokio::time::timeout(
        state.timeout,
        futures::future::join(state.supervisor.send(ListVms), state.ports.send(Snapshot)),
    )
    .await;
    let (vms, ports) = match asked {
        Ok((Ok(vms), Ok(ports))) => (vms, ports),
        Ok(_) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "manager is shutting down\n".to_string(),
            )
                .into_response()
        }
        Err(_) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the manager did not answer within {} (MANAGER_GRPC_TIMEOUT)\n",
                    format_go_duration(state.timeout)
                ),
            )
                .into_response()
        }
    };
    use cocos_core::events::VmState;
    let running = vms
        .iter()
        .filter(|v| v.facts.state == VmState::Running)
        .count();
    let failed = vms
        .iter()
        .filter(|v| v.facts.state == VmState::Failed)
        .count();
    let text = format!(
        "# HELP cocos_manager_vms VMs known to the manager, by state.\n\
         # TYPE cocos_manager_vms gauge\n\
         cocos_manager_vms{{state=\"running\"}} {running}\n\
         cocos_manager_vms{{state=\"starting\"}} {}\n\
         cocos_manager_vms{{state=\"failed\"}} {failed}\n\
         # HELP cocos_manager_ports_in_use Host ports reserved for VMs.\n\
         # TYPE cocos_manager_ports_in_use gauge\n\
         cocos_manager_ports_in_use {}\n\
         # HELP cocos_manager_ports_total Host ports in MANAGER_QEMU_HOST_FWD_RANGE.\n\
         # TYPE cocos_manager_ports_total gauge\n\
         cocos_manager_ports_total {}\n\
         # HELP cocos_manager_grpc_connections gRPC connections open.\n\
         # TYPE cocos_manager_grpc_connections gauge\n\
         cocos_manager_grpc_connections {}\n\
         # HELP cocos_manager_grpc_connections_max MANAGER_GRPC_MAX_CONNECTIONS.\n\
         # TYPE cocos_manager_grpc_connections_max gauge\n\
         cocos_manager_grpc_connections_max {}\n\
         # HELP cocos_manager_grpc_connections_refused_total gRPC connections closed at once because MANAGER_GRPC_MAX_CONNECTIONS were open.\n\
         # TYPE cocos_manager_grpc_connections_refused_total counter\n\
         cocos_manager_grpc_connections_refused_total {}\n\
         # HELP cocos_manager_grpc_connections_silent_total gRPC connections closed because they sent nothing in time.\n\
         # TYPE cocos_manager_grpc_connections_silent_total counter\n\
         cocos_manager_grpc_connections_silent_total {}\n\
         # HELP cocos_manager_grpc_deadline_exceeded_total Requests answered DEADLINE_EXCEEDED (MANAGER_GRPC_TIMEOUT or the client's deadline).\n\
         # TYPE cocos_manager_grpc_deadline_exceeded_total counter\n\
         cocos_manager_grpc_deadline_exceeded_total {}\n",
        vms.len() - running - failed,
        ports.in_use.len(),
        ports.range.len(),
        STATS.connections.load(Ordering::Relaxed),
        STATS.max_connections.load(Ordering::Relaxed),
        STATS.refused.load(Ordering::Relaxed),
        STATS.silent.load(Ordering::Relaxed),
        STATS.deadline_exceeded.load(Ordering::Relaxed),
    );
    // Per-VM use, read from each VM's cgroup (README: Per-VM cgroups).
    let text = text + &crate::cgroups::metrics_text();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

pub async fn bind(config: &Config) -> Result<tokio::net::TcpListener, String> {
    tokio::net::TcpListener::bind((config.http_host.as_str(), config.http_port))
        .await
        .map_err(|e| {
            format!(
                "cannot listen on MANAGER_HTTP_HOST:MANAGER_HTTP_PORT {}:{}: {e}",
                config.http_host, config.http_port
            )
        })
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    config: &Config,
    supervisor: Addr<Supervisor>,
    ports: Addr<PortAllocator>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let state = HttpState {
        instance_id: config.instance_id.clone(),
        timeout: config.grpc_timeout,
        supervisor,
        ports,
    };
    let router = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(state);
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| format!("HTTP server: {e}"))
}
