//! Where the manager is and how to talk to it: the address, TLS and the
//! request bound, from flags or the Cocos CLI's environment variables.

use std::future::Future;
use std::time::Duration;

use cocos_core::duration::{format_go_duration, parse_go_duration};
use cocos_core::operator_proto::operator_client::OperatorClient;
use cocos_core::proto::manager_service_client::ManagerServiceClient;
use tonic::codegen::http::Uri;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;

use crate::args::Connection;
use crate::failure::Failure;

pub const DEFAULT_URL: &str = "localhost:7001";
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

pub type Client = ManagerServiceClient<Channel>;
pub type Operator = OperatorClient<Channel>;

/// Largest answer accepted (a long console tail comes in many messages;
/// this bounds one).
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// HTTP/2 PINGs on a following stream (`logs -f`, `events`), so a manager
/// that vanished without closing the connection (its host gone) ends the
/// stream instead of leaving it open for ever. Only there: the Cocos
/// manager (grpc-go) refuses clients that ping more often than every 5
/// minutes, and the other commands are bounded anyway.
const FOLLOW_PING_INTERVAL: Duration = Duration::from_secs(30);
const FOLLOW_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// A resolved connection: URI with its scheme, the bare host (for the agent's
/// forwarded port), the TLS settings and the bound of each request.
pub struct Target {
    pub uri: String,
    pub host: String,
    pub tls: Option<ClientTlsConfig>,
    pub timeout: Duration,
}

/// An unset or empty value is none, as the Cocos CLI reads its variables.
fn given(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

fn read_file(what: &str, path: &str) -> Result<Vec<u8>, Failure> {
    std::fs::read(path).map_err(|e| Failure::usage(format!("{what} {path}: cannot read it: {e}")))
}

/// The request bound: a positive Go duration.
pub fn parse_timeout(what: &str, text: &str) -> Result<Duration, Failure> {
    match parse_go_duration(text) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err(Failure::usage(format!(
            "{what} {text:?}: must be more than 0"
        ))),
        Err(e) => Err(Failure::usage(format!(
            "{what} {text:?}: not a Go duration such as 60s or 1m30s ({e})"
        ))),
    }
}

/// The URI to dial and its bare host. `url` is `host:port` (the Cocos
/// CLI's form) or `http://` / `https://host:port`.
pub fn normalize_url(url: &str, tls: bool) -> Result<(String, String), Failure> {
    let with_scheme = match url.split_once("://") {
        Some(("http", _)) if tls => {
            return Err(Failure::usage(format!(
            "--grpc-url {url:?} is http:// but a server CA is set (TLS): use https:// or host:port"
        )))
        }
        Some(("https", _)) if !tls => {
            return Err(Failure::usage(format!(
                "--grpc-url {url:?} is https:// but no server CA is set: give \
                 --grpc-server-ca-certs (MANAGER_GRPC_SERVER_CA_CERTS)"
            )))
        }
        Some(("http" | "https", _)) => url.to_string(),
        Some((scheme, _)) => {
            return Err(Failure::usage(format!(
                "--grpc-url {url:?}: scheme {scheme:?} is neither http nor https"
            )))
        }
        None if tls => format!("https://{url}"),
        None => format!("http://{url}"),
    };
    let uri: Uri = with_scheme
        .parse()
        .map_err(|e| Failure::usage(format!("--grpc-url {url:?}: not an address: {e}")))?;
    let host = uri
        .host()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| Failure::usage(format!("--grpc-url {url:?}: no host")))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    Ok((with_scheme, host))
}

impl Target {
    pub fn resolve(conn: &Connection) -> Result<Target, Failure> {
        let timeout = match given(&conn.grpc_timeout) {
            Some(t) => parse_timeout("--grpc-timeout (MANAGER_GRPC_TIMEOUT)", t)?,
            None => DEFAULT_TIMEOUT,
        };
        let ca = given(&conn.grpc_server_ca_certs);
        let cert = given(&conn.grpc_client_cert);
        let key = given(&conn.grpc_client_key);
        let tls = match (ca, cert, key) {
            (None, None, None) => None,
            (None, _, _) => {
                return Err(Failure::usage(
                    "a client certificate or key is set (MANAGER_GRPC_CLIENT_CERT/KEY) but no \
                     server CA (--grpc-server-ca-certs, MANAGER_GRPC_SERVER_CA_CERTS): mutual \
                     TLS needs the CA of the manager's certificate",
                ))
            }
            (Some(_), Some(_), None) | (Some(_), None, Some(_)) => {
                return Err(Failure::usage(
                    "mutual TLS needs both --grpc-client-cert and --grpc-client-key \
                     (MANAGER_GRPC_CLIENT_CERT, MANAGER_GRPC_CLIENT_KEY)",
                ))
            }
            (Some(ca), cert, key) => {
                let ca = read_file("--grpc-server-ca-certs", ca)?;
                let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
                if let (Some(cert), Some(key)) = (cert, key) {
                    let cert = read_file("--grpc-client-cert", cert)?;
                    let key = read_file("--grpc-client-key", key)?;
                    tls = tls.identity(Identity::from_pem(cert, key));
                }
                Some(tls)
            }
        };
        let url = given(&conn.grpc_url).unwrap_or(DEFAULT_URL);
        let (uri, host) = normalize_url(url, tls.is_some())?;
        Ok(Target {
            uri,
            host,
            tls,
            timeout,
        })
    }

    /// A `manager.ManagerService` client, connected within the request bound.
    pub async fn connect(&self) -> Result<Client, Failure> {
        Ok(self.manager_client(self.channel(false).await?))
    }

    pub fn manager_client(&self, channel: Channel) -> Client {
        ManagerServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE)
    }

    /// A `cocos.manager.v1.Operator` client.
    pub fn operator_client(&self, channel: Channel) -> Operator {
        OperatorClient::new(channel).max_decoding_message_size(MAX_MESSAGE)
    }

    /// Connects (TCP, and the TLS handshake) within the request bound;
    /// `follow` for a stream that stays open (PINGs detect a vanished
    /// manager).
    pub async fn channel(&self, follow: bool) -> Result<Channel, Failure> {
        let mut endpoint = Endpoint::from_shared(self.uri.clone())
            .map_err(|e| Failure::usage(format!("--grpc-url {:?}: {e}", self.uri)))?
            .connect_timeout(self.timeout)
            .tcp_nodelay(true);
        if follow {
            endpoint = endpoint
                .http2_keep_alive_interval(FOLLOW_PING_INTERVAL)
                .keep_alive_timeout(FOLLOW_PING_TIMEOUT)
                .keep_alive_while_idle(false);
        }
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone()).map_err(|e| {
                Failure::grpc(
                    Code::Unavailable,
                    format!("TLS settings for {}: {}", self.uri, error_chain(&e)),
                )
            })?;
        }
        match tokio::time::timeout(self.timeout, endpoint.connect()).await {
            Err(_) => Err(Failure::grpc(
                Code::DeadlineExceeded,
                format!(
                    "no connection to the manager at {} within {} (--grpc-timeout, MANAGER_GRPC_TIMEOUT)",
                    self.uri,
                    format_go_duration(self.timeout)
                ),
            )),
            Ok(Err(e)) => Err(connect_failure(&self.uri, &e)),
            Ok(Ok(channel)) => Ok(channel),
        }
    }

    /// A request carrying the bound as its gRPC deadline.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.timeout);
        request
    }

    /// The failure for an operator RPC the manager does not serve: a Cocos
    /// manager has only `manager.ManagerService`.
    pub fn no_operator_service(&self, command: &str) -> Failure {
        Failure::grpc(
            Code::Unimplemented,
            format!(
                "the manager at {} does not offer the operator's service \
                 (cocos.manager.v1.Operator; a Cocos manager has only manager.ManagerService), \
                 which `{command}` needs",
                self.uri
            ),
        )
    }

    /// Waits for an answer within the bound: the manager answers
    /// DEADLINE_EXCEEDED itself at the deadline, this is the client's own
    /// guard for a manager that does not answer at all.
    pub async fn call<T>(
        &self,
        answer: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, Failure> {
        // A little beyond the deadline, so the manager's own answer (which
        // names its bound) arrives first when it answers at all.
        let guard = self.timeout + Duration::from_millis(500);
        match tokio::time::timeout(guard, answer).await {
            Err(_) => Err(Failure::grpc(
                Code::DeadlineExceeded,
                format!(
                    "no answer from the manager at {} within {} (--grpc-timeout, MANAGER_GRPC_TIMEOUT)",
                    self.uri,
                    format_go_duration(self.timeout)
                ),
            )),
            Ok(Err(status)) => Err(Failure::from_status(&status)),
            Ok(Ok(response)) => Ok(response.into_inner()),
        }
    }
}

/// An error and its sources, without repeats, on one line.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(error);
    while let Some(e) = next {
        let text = e.to_string();
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

fn connect_failure(uri: &str, error: &tonic::transport::Error) -> Failure {
    let mut refused = false;
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            refused |= io.kind() == std::io::ErrorKind::ConnectionRefused;
        }
        next = e.source();
    }
    let hint = if refused {
        " (is cocos-manager running, and on this address?)"
    } else {
        ""
    };
    Failure::grpc(
        Code::Unavailable,
        format!(
            "cannot connect to the manager at {uri}: {}{hint}",
            error_chain(error)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(url: &str) -> Connection {
        Connection {
            grpc_url: Some(url.into()),
            grpc_timeout: None,
            grpc_server_ca_certs: None,
            grpc_client_cert: None,
            grpc_client_key: None,
        }
    }

    #[test]
    fn cocos_style_addresses_get_a_scheme() {
        assert_eq!(
            normalize_url("localhost:7001", false).unwrap(),
            ("http://localhost:7001".into(), "localhost".into())
        );
        assert_eq!(
            normalize_url("10.0.0.1:7001", true).unwrap(),
            ("https://10.0.0.1:7001".into(), "10.0.0.1".into())
        );
        assert_eq!(normalize_url("http://[::1]:7001", false).unwrap().1, "::1");
        assert!(normalize_url("https://h:1", false).is_err());
        assert!(normalize_url("http://h:1", true).is_err());
        assert!(normalize_url("ftp://h:1", false).is_err());
    }

    #[test]
    fn empty_values_are_unset() {
        let mut c = conn("");
        c.grpc_timeout = Some(String::new());
        c.grpc_client_cert = Some(String::new());
        let t = Target::resolve(&c).unwrap();
        assert_eq!(t.uri, "http://localhost:7001");
        assert_eq!(t.timeout, DEFAULT_TIMEOUT);
        assert!(t.tls.is_none());
    }

    #[test]
    fn timeouts_are_go_durations() {
        assert_eq!(
            parse_timeout("t", "1m30s").unwrap(),
            Duration::from_secs(90)
        );
        assert!(parse_timeout("t", "0s").is_err());
        assert!(parse_timeout("t", "60").is_err());
        assert_eq!(parse_timeout("t", "soon").unwrap_err().exit_code(), 2);
    }

    #[test]
    fn client_identity_needs_a_ca_and_both_halves() {
        let mut c = conn("h:1");
        c.grpc_client_cert = Some("/c.pem".into());
        assert_eq!(Target::resolve(&c).err().unwrap().exit_code(), 2);
        c.grpc_server_ca_certs = Some("/ca.pem".into());
        assert_eq!(Target::resolve(&c).err().unwrap().exit_code(), 2);
    }
}
