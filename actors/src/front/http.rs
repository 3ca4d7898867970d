//! The Cocos-compatible HTTP endpoint: `GET /health` and `GET /metrics`.

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
    let scrape = crate::metrics::Scrape::new(&vms, ports.in_use.len(), ports.range.len());
    // Off the API thread: the cgroup collector reads files.
    match tokio::task::spawn_blocking(move || crate::metrics::render(scrape)).await {
        Ok(Ok(text)) => {
            ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response()
        }
        Ok(Err(e)) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the metrics: {e}\n"),
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the metrics did not finish: {e}\n"),
        )
            .into_response(),
    }
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
