//! TLS on the gRPC port, terminated here rather than by tonic so that the
//! certificate, key and client CA can be replaced while serving.
//!
//! The rustls `ServerConfig` in force sits behind a lock; every accepted
//! connection takes the one current at its handshake. SIGHUP
//! ([`TlsReloader::reload`]) reads the files again, checks the whole
//! (certificate parses, key parses and matches it, client CA parses) and
//! only then swaps it in: the listener and the connections already open are
//! untouched, and a bad new file leaves the previous configuration serving.
//!
//! Also here: the refusal of plaintext on an address that is not loopback
//! ([`check_plaintext`]).

use std::io;
use std::net::IpAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use cocos_core::config::Config;
use futures::Stream;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use sha2::{Digest, Sha256};
use tokio::task::JoinSet;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::Connected;
use tracing::{debug, error, info, warn};

use crate::front::LimitedConn;

/// Whether `host` (`MANAGER_GRPC_HOST`) names only this machine: `localhost`
/// or an address in 127.0.0.0/8 or ::1 (also IPv4-mapped).
pub fn is_loopback(host: &str) -> bool {
    let host = host.trim_end_matches('.');
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.parse::<IpAddr>()
        .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// Plaintext gRPC (no `MANAGER_GRPC_SERVER_CERT`) is refused on an address
/// that is not loopback unless `MANAGER_GRPC_ALLOW_PLAINTEXT=true`: anyone
/// who reaches the port could create and remove VMs and read their
/// requests, secrets included, off the wire.
pub fn check_plaintext(config: &Config) -> Result<(), String> {
    if !config.grpc_server_cert.as_os_str().is_empty()
        || config.grpc_allow_plaintext
        || is_loopback(&config.grpc_host)
    {
        return Ok(());
    }
    Err(format!(
        "refusing plaintext gRPC on MANAGER_GRPC_HOST={:?}, which is not a loopback address: \
         every request, with the keys and tokens it carries for the VM, would cross the network \
         in the clear, and anyone reaching the port could create and remove VMs. Set \
         MANAGER_GRPC_SERVER_CERT and MANAGER_GRPC_SERVER_KEY (TLS; MANAGER_GRPC_CLIENT_CA_CERTS \
         for mutual TLS), bind to 127.0.0.1, or set MANAGER_GRPC_ALLOW_PLAINTEXT=true to serve \
         plaintext anyway",
        config.grpc_host
    ))
}

/// The crypto provider of the whole daemon (ring).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_file(setting: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {setting} {}: {e}", path.display()))
}

/// The certificates of a PEM file; at least one.
fn read_certs(setting: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read_file(setting, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{setting} {}: not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{setting} {}: no certificate (no \"BEGIN CERTIFICATE\" block) in the file",
            path.display()
        ));
    }
    Ok(certs)
}

/// The private key of a PEM file. The error never quotes the file's
/// content.
fn read_key(setting: &str, path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = read_file(setting, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        use rustls::pki_types::pem::Error;
        let why = match e {
            Error::NoItemsFound => "no private key (PKCS#8, PKCS#1 or SEC1 PEM block) in the file",
            Error::MissingSectionEnd { .. } => "a PEM block has no END line (a truncated file?)",
            Error::IllegalSectionStart { .. } => "a malformed PEM BEGIN line",
            Error::Base64Decode(_) => "a PEM block is not valid base64",
            _ => "not a readable PEM private key",
        };
        format!("{setting} {}: {why}", path.display())
    })
}

/// Always the same certificate and key.
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// A checked TLS configuration and what the log says about it.
struct Loaded {
    config: Arc<ServerConfig>,
    /// SHA-256 of the server's (leaf) certificate, hex.
    cert_sha256: String,
    /// Client certificates required.
    mutual: bool,
}

/// Reads and checks the TLS files `config` names; `None` when TLS is off.
fn load(config: &Config) -> Result<Option<Loaded>, String> {
    if config.grpc_server_cert.as_os_str().is_empty() {
        return Ok(None);
    }
    let provider = provider();
    let chain = read_certs("MANAGER_GRPC_SERVER_CERT", &config.grpc_server_cert)?;
    let key = read_key("MANAGER_GRPC_SERVER_KEY", &config.grpc_server_key)?;
    let cert_sha256 = hex(&Sha256::digest(chain[0].as_ref()));
    let certified = CertifiedKey::from_der(chain, key, &provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => format!(
            "MANAGER_GRPC_SERVER_KEY {} does not match the certificate in \
             MANAGER_GRPC_SERVER_CERT {} (their public keys differ)",
            config.grpc_server_key.display(),
            config.grpc_server_cert.display()
        ),
        other => format!(
            "MANAGER_GRPC_SERVER_CERT {} with MANAGER_GRPC_SERVER_KEY {}: {other}",
            config.grpc_server_cert.display(),
            config.grpc_server_key.display()
        ),
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let mutual = !config.grpc_client_ca_certs.as_os_str().is_empty();
    let builder = if mutual {
        let setting = "MANAGER_GRPC_CLIENT_CA_CERTS";
        let path = &config.grpc_client_ca_certs;
        let mut roots = RootCertStore::empty();
        for cert in read_certs(setting, path)? {
            roots
                .add(cert)
                .map_err(|e| format!("{setting} {}: {e}", path.display()))?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| format!("{setting} {}: {e}", path.display()))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let mut server = builder.with_cert_resolver(Arc::new(Fixed(Arc::new(certified))));
    server.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Some(Loaded {
        config: Arc::new(server),
        cert_sha256,
        mutual,
    }))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The TLS configuration in force, shared by the acceptor and the reload.
type Current = Arc<RwLock<Arc<ServerConfig>>>;

/// The server's TLS, as bound at start.
pub(crate) struct ServerTls {
    current: Option<Current>,
    /// For the "serving" log line.
    pub cert_sha256: Option<String>,
    pub mutual: bool,
}

impl ServerTls {
    /// Reads the files `config` names; an error refuses the start.
    pub(crate) fn load(config: &Config) -> Result<ServerTls, String> {
        Ok(match load(config)? {
            None => ServerTls {
                current: None,
                cert_sha256: None,
                mutual: false,
            },
            Some(loaded) => ServerTls {
                current: Some(Arc::new(RwLock::new(loaded.config))),
                cert_sha256: Some(loaded.cert_sha256),
                mutual: loaded.mutual,
            },
        })
    }

    pub(crate) fn is_on(&self) -> bool {
        self.current.is_some()
    }

    /// The acceptor side: `None` for plaintext.
    pub(crate) fn current(&self) -> Option<Current> {
        self.current.clone()
    }

    pub(crate) fn reloader(&self) -> TlsReloader {
        TlsReloader {
            current: self.current.clone(),
        }
    }
}

/// Replaces the gRPC server's certificate, key and client CA while it
/// serves (SIGHUP). Plaintext or TLS is fixed at start.
#[derive(Clone)]
pub struct TlsReloader {
    current: Option<Current>,
}

impl TlsReloader {
    /// Reads the files `config` names again and, if all of them are good,
    /// makes them the ones new connections get. Otherwise the previous ones
    /// stay, and the log says why.
    pub fn reload(&self, config: &Config) {
        let has_cert = !config.grpc_server_cert.as_os_str().is_empty();
        let Some(current) = &self.current else {
            if has_cert {
                warn!(
                    "MANAGER_GRPC_SERVER_CERT is set, but the gRPC server started in plaintext: \
                     TLS takes effect only after a restart"
                );
            } else if let Err(e) = check_plaintext(config) {
                warn!("{e} (this takes effect at the next start; the server goes on serving)");
            }
            return;
        };
        if !has_cert {
            warn!(
                "MANAGER_GRPC_SERVER_CERT is now empty, but the gRPC server started with TLS: it \
                 keeps serving TLS with the certificate, key and client CA it has; plaintext takes \
                 effect only after a restart"
            );
            return;
        }
        match load(config) {
            Ok(Some(loaded)) => {
                match current.write() {
                    Ok(mut slot) => *slot = loaded.config,
                    Err(poisoned) => *poisoned.into_inner() = loaded.config,
                }
                info!(
                    cert = %config.grpc_server_cert.display(),
                    cert_sha256 = %loaded.cert_sha256,
                    mutual_tls = loaded.mutual,
                    "TLS reloaded: new gRPC connections get this certificate, key and client CA; \
                     open connections keep theirs"
                );
            }
            Ok(None) => {}
            Err(e) => error!(
                error = %e,
                "TLS reload refused; the previous certificate, key and client CA stay in force"
            ),
        }
    }
}

/// The accepted connections after their TLS handshake with the
/// configuration current when it began. Handshakes run side by side (a slow
/// client holds up no other), each bounded by `timeout`; a failed one is
/// logged at debug and its connection closed (its slot under the
/// connection cap freed with it). Dropping this drops the listener.
pub(crate) struct TlsIncoming<S> {
    inner: S,
    inner_done: bool,
    current: Current,
    timeout: Duration,
    handshakes: JoinSet<io::Result<TlsStream<LimitedConn>>>,
}

impl<S> TlsIncoming<S> {
    pub(crate) fn new(inner: S, current: Current, timeout: Duration) -> TlsIncoming<S> {
        TlsIncoming {
            inner,
            inner_done: false,
            current,
            timeout,
            handshakes: JoinSet::new(),
        }
    }

    fn start_handshake(&mut self, conn: LimitedConn) {
        let config = match self.current.read() {
            Ok(config) => config.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        let timeout = self.timeout;
        self.handshakes.spawn(async move {
            let peer = conn.connect_info().remote_addr();
            let result = tokio::time::timeout(timeout, TlsAcceptor::from(config).accept(conn))
                .await
                .unwrap_or_else(|_| {
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the TLS handshake did not finish within {timeout:?}"),
                    ))
                });
            if let Err(e) = &result {
                debug!(?peer, error = %e, "gRPC TLS handshake failed; connection closed");
            }
            result
        });
    }
}

impl<S> Stream for TlsIncoming<S>
where
    S: Stream<Item = io::Result<LimitedConn>> + Unpin,
{
    type Item = io::Result<TlsStream<LimitedConn>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if !self.inner_done {
                match Pin::new(&mut self.inner).poll_next(cx) {
                    Poll::Ready(Some(Ok(conn))) => {
                        self.start_handshake(conn);
                        continue;
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                    Poll::Ready(None) => self.inner_done = true,
                    Poll::Pending => {}
                }
            }
            return match self.handshakes.poll_join_next(cx) {
                Poll::Ready(Some(Ok(Ok(stream)))) => Poll::Ready(Some(Ok(stream))),
                // Logged by the handshake's task.
                Poll::Ready(Some(Ok(Err(_)))) => continue,
                Poll::Ready(Some(Err(e))) => {
                    // A panic is the fail-fast hook's; a cancelled task is
                    // only the end of the server.
                    debug!(error = %e, "gRPC TLS handshake task ended");
                    continue;
                }
                Poll::Ready(None) if self.inner_done => Poll::Ready(None),
                Poll::Ready(None) | Poll::Pending => Poll::Pending,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for host in [
            "localhost",
            "LOCALHOST",
            "localhost.",
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "[::1]",
            "::ffff:127.0.0.1",
        ] {
            assert!(is_loopback(host), "{host}");
        }
        for host in [
            "0.0.0.0",
            "::",
            "10.0.0.1",
            "192.168.1.5",
            "example.com",
            "localhost.example.com",
            "",
            "128.0.0.1",
        ] {
            assert!(!is_loopback(host), "{host}");
        }
    }

    #[test]
    fn plaintext_off_loopback_needs_the_setting() {
        let mut config = Config::defaults();
        config.grpc_host = "127.0.0.1".into();
        assert!(check_plaintext(&config).is_ok());
        config.grpc_host = "0.0.0.0".into();
        let message = check_plaintext(&config).expect_err("refused");
        for needle in [
            "MANAGER_GRPC_HOST=\"0.0.0.0\"",
            "MANAGER_GRPC_SERVER_CERT",
            "MANAGER_GRPC_ALLOW_PLAINTEXT=true",
        ] {
            assert!(message.contains(needle), "{needle}: {message}");
        }
        config.grpc_allow_plaintext = true;
        assert!(check_plaintext(&config).is_ok());
        config.grpc_allow_plaintext = false;
        config.grpc_server_cert = "/etc/cocos/server.pem".into();
        assert!(check_plaintext(&config).is_ok(), "TLS is not plaintext");
    }

    #[test]
    fn unreadable_or_wrong_files_are_named() {
        let dir = std::env::temp_dir().join(format!("cocos-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let mut config = Config::defaults();
        config.grpc_server_cert = dir.join("missing.pem");
        config.grpc_server_key = dir.join("missing.key");
        let Err(e) = load(&config) else {
            panic!("a missing file must be refused")
        };
        assert!(
            e.contains("cannot read MANAGER_GRPC_SERVER_CERT") && e.contains("missing.pem"),
            "{e}"
        );
        let cert = dir.join("empty.pem");
        std::fs::write(&cert, "nothing here\n").expect("write");
        config.grpc_server_cert = cert;
        let Err(e) = load(&config) else {
            panic!("an empty file must be refused")
        };
        assert!(e.contains("no certificate"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
