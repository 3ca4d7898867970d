//! Server TLS and mutual TLS on the gRPC port, with certificates made by
//! openssl for the test.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use cocos_core::proto::manager_service_client::ManagerServiceClient;
use cocos_core::proto::CvmInfoReq;
use common::*;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::Code;

/// A CA, a server certificate for localhost and a client certificate.
fn make_pki(dir: &Path) {
    make_ca(dir, "ca", true);
    issue(dir, "ca", "server", "localhost", true);
    issue(dir, "ca", "client", "cocos-cli", true);
}

async fn connect(
    port: u16,
    tls: ClientTlsConfig,
) -> Result<ManagerServiceClient<Channel>, tonic::transport::Error> {
    let channel = Channel::from_shared(format!("https://localhost:{port}"))
        .expect("url")
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(ManagerServiceClient::new(channel))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admits_only_clients_with_a_certificate() {
    let pki = tempfile::tempdir().expect("dir");
    make_pki(pki.path());
    let p = |f: &str| pki.path().join(f).to_string_lossy().into_owned();
    let manager = Manager::start(&[
        ("MANAGER_GRPC_SERVER_CERT", &p("server.pem")),
        ("MANAGER_GRPC_SERVER_KEY", &p("server.key")),
        ("MANAGER_GRPC_CLIENT_CA_CERTS", &p("ca.pem")),
    ]);
    let read = |f: &str| std::fs::read(pki.path().join(f)).expect("pem");
    let ca = Certificate::from_pem(read("ca.pem"));

    let with_cert = ClientTlsConfig::new()
        .ca_certificate(ca.clone())
        .domain_name("localhost")
        .identity(Identity::from_pem(read("client.pem"), read("client.key")));
    let mut client = connect(manager.grpc_port, with_cert)
        .await
        .expect("mTLS connection");
    let err = client
        .cvm_info(CvmInfoReq { id: "x".into() })
        .await
        .expect_err("unknown id");
    assert_eq!(
        err.code(),
        Code::NotFound,
        "the API answers over mTLS: {err}"
    );

    let without_cert = ClientTlsConfig::new()
        .ca_certificate(ca)
        .domain_name("localhost");
    let refused = match connect(manager.grpc_port, without_cert).await {
        Err(_) => true,
        Ok(mut c) => c
            .cvm_info(CvmInfoReq { id: "x".into() })
            .await
            .is_err_and(|e| e.code() != Code::NotFound),
    };
    assert!(refused, "a client without a certificate must be refused");

    // Plaintext is refused too.
    let plain =
        ManagerServiceClient::connect(format!("http://127.0.0.1:{}", manager.grpc_port)).await;
    let refused = match plain {
        Err(_) => true,
        Ok(mut c) => c
            .cvm_info(CvmInfoReq { id: "x".into() })
            .await
            .is_err_and(|e| e.code() != Code::NotFound),
    };
    assert!(refused, "plaintext must be refused when TLS is on");
}

/// Two CAs, `a` and `b`, each with a server certificate for localhost
/// (`server-a`, `server-b`) and a client certificate (`client-a`,
/// `client-b`). A client that trusts only one CA tells which server
/// certificate it was given.
fn make_two_pkis(dir: &Path) {
    for ca in ["a", "b"] {
        make_ca(dir, ca, false);
        issue(dir, ca, &format!("server-{ca}"), "localhost", false);
        issue(dir, ca, &format!("client-{ca}"), "cocos-cli", false);
    }
}

/// Puts `from` in place of `to` the way rotation tools do: a new file
/// renamed over the old one.
fn install(dir: &Path, from: &str, to: &str) {
    let staged = dir.join(format!("{to}.new"));
    std::fs::copy(dir.join(from), &staged).expect("copy");
    std::fs::rename(&staged, dir.join(to)).expect("rename");
}

/// SIGHUP, then waits until the log has one more line containing `needle`.
async fn sighup_and_wait(manager: &Manager, needle: &str) {
    let before = manager.log().matches(needle).count();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(manager.pid()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("SIGHUP");
    let seen = eventually(Duration::from_secs(15), || {
        manager.log().matches(needle).count() > before
    })
    .await;
    assert!(seen, "no new {needle:?} after SIGHUP:\n{}", manager.log());
}

/// Two PKIs in `dir` (see `make_two_pkis`), CA a's server certificate
/// installed as the live one (`live.pem`, `live.key`).
fn install_two_pkis(dir: &Path) {
    make_two_pkis(dir);
    install(dir, "server-a.pem", "live.pem");
    install(dir, "server-a.key", "live.key");
}

/// A manager serving the live certificate in `dir`, with `extra` settings.
fn start_on_server_a(dir: &Path, extra: &[(&str, &str)]) -> Manager {
    let live = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let (cert, key) = (live("live.pem"), live("live.key"));
    let mut env = vec![
        ("MANAGER_GRPC_SERVER_CERT", cert.as_str()),
        ("MANAGER_GRPC_SERVER_KEY", key.as_str()),
    ];
    env.extend_from_slice(extra);
    Manager::start(&env)
}

/// The SHA-256 of a PEM certificate's DER, as the manager logs it.
fn fingerprint(pem: &Path) -> String {
    let out = Command::new(require_tool("openssl"))
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(pem)
        .output()
        .expect("openssl");
    let text = String::from_utf8_lossy(&out.stdout);
    let (_, hex) = text.trim().split_once('=').expect("fingerprint line");
    hex.replace(':', "").to_lowercase()
}

fn trusting(dir: &Path, ca: &str) -> ClientTlsConfig {
    let pem = std::fs::read(dir.join(format!("{ca}.pem"))).expect("ca");
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pem))
        .domain_name("localhost")
}

fn with_identity(tls: ClientTlsConfig, dir: &Path, name: &str) -> ClientTlsConfig {
    let read = |ext: &str| std::fs::read(dir.join(format!("{name}.{ext}"))).expect("pem");
    tls.identity(Identity::from_pem(read("pem"), read("key")))
}

/// The API answers on this connection (an unknown id is NOT_FOUND).
async fn answers(client: &mut ManagerServiceClient<Channel>) -> Result<(), tonic::Status> {
    match client.cvm_info(CvmInfoReq { id: "x".into() }).await {
        Err(e) if e.code() == Code::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(_) => Err(tonic::Status::internal("an unknown id was found")),
    }
}

/// Connecting with `tls` fails, at the handshake or at the first request.
async fn is_refused(port: u16, tls: ClientTlsConfig) -> bool {
    match connect(port, tls).await {
        Err(_) => true,
        Ok(mut client) => answers(&mut client).await.is_err(),
    }
}

const RELOADED: &str = "TLS reloaded";
const REFUSED: &str = "TLS reload refused";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_the_server_certificate_and_open_connections_keep_working() {
    let pki = tempfile::tempdir().expect("dir");
    let dir = pki.path();
    install_two_pkis(dir);
    let manager = start_on_server_a(dir, &[]);
    let port = manager.grpc_port;
    let mut opened_before = connect(port, trusting(dir, "a"))
        .await
        .expect("the first certificate, from CA a");
    answers(&mut opened_before).await.expect("API over TLS");
    assert!(
        manager
            .log()
            .contains(&fingerprint(&dir.join("server-a.pem"))),
        "the serving line names the certificate:\n{}",
        manager.log()
    );

    install(dir, "server-b.pem", "live.pem");
    install(dir, "server-b.key", "live.key");
    sighup_and_wait(&manager, RELOADED).await;
    let log = manager.log();
    let reloaded = log.lines().rfind(|l| l.contains(RELOADED)).expect("line");
    assert!(
        reloaded.contains(&fingerprint(&dir.join("server-b.pem"))),
        "the reload names the new certificate: {reloaded}"
    );

    // A new client gets the new certificate: CA b vouches for it, CA a no
    // longer does.
    let mut opened_after = connect(port, trusting(dir, "b"))
        .await
        .expect("a new client gets the new certificate");
    answers(&mut opened_after)
        .await
        .expect("API with the new certificate");
    assert!(
        is_refused(port, trusting(dir, "a")).await,
        "a new client still got the old certificate"
    );
    // The listener stayed, and the connection opened before the rotation
    // still works (a reconnect would fail: it trusts only CA a).
    answers(&mut opened_before)
        .await
        .expect("a connection opened before the rotation keeps working");
    assert!(!manager.log().contains(REFUSED), "{}", manager.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_new_key_or_certificate_keeps_the_old_ones() {
    let pki = tempfile::tempdir().expect("dir");
    let dir = pki.path();
    install_two_pkis(dir);
    let manager = start_on_server_a(dir, &[]);
    let port = manager.grpc_port;

    let still_the_old_certificate = |why: &'static str| {
        let dir = dir.to_path_buf();
        async move {
            let mut client = connect(port, trusting(&dir, "a"))
                .await
                .unwrap_or_else(|e| panic!("{why}: the old certificate must still serve: {e}"));
            answers(&mut client).await.expect(why);
            assert!(
                is_refused(port, trusting(&dir, "b")).await,
                "{why}: the new certificate must not serve"
            );
        }
    };
    let last_refusal = |manager: &Manager| {
        manager
            .log()
            .lines()
            .rfind(|l| l.contains(REFUSED))
            .map(str::to_string)
            .unwrap_or_default()
    };

    // The new certificate with a key that is not its own.
    install(dir, "server-b.pem", "live.pem");
    sighup_and_wait(&manager, REFUSED).await;
    let line = last_refusal(&manager);
    assert!(
        line.contains("MANAGER_GRPC_SERVER_KEY") && line.contains("does not match"),
        "the log says why: {line}"
    );
    still_the_old_certificate("key of another certificate").await;

    // A key file that holds no key (the certificate copied over it).
    install(dir, "server-b.pem", "live.key");
    sighup_and_wait(&manager, REFUSED).await;
    let line = last_refusal(&manager);
    assert!(line.contains("no private key"), "the log says why: {line}");
    still_the_old_certificate("no key").await;

    // A truncated key file; the message quotes nothing of the key.
    let key = std::fs::read_to_string(dir.join("server-b.key")).expect("key");
    let half = &key[..key.len() / 2];
    std::fs::write(dir.join("live.key"), half).expect("write");
    sighup_and_wait(&manager, REFUSED).await;
    let line = last_refusal(&manager);
    assert!(line.contains("no END line"), "the log says why: {line}");
    let body_line = half.lines().nth(1).expect("a base64 line");
    assert!(
        !manager.log().contains(body_line),
        "key material in the log"
    );
    still_the_old_certificate("truncated key").await;

    // A key file that cannot be read.
    std::fs::remove_file(dir.join("live.key")).expect("remove");
    sighup_and_wait(&manager, REFUSED).await;
    let line = last_refusal(&manager);
    assert!(
        line.contains("cannot read MANAGER_GRPC_SERVER_KEY") && line.contains("live.key"),
        "the log says why: {line}"
    );
    still_the_old_certificate("unreadable key").await;

    // A certificate file that is not a certificate.
    install(dir, "server-b.key", "live.key");
    std::fs::write(dir.join("live.pem"), "not a certificate\n").expect("write");
    sighup_and_wait(&manager, REFUSED).await;
    let line = last_refusal(&manager);
    assert!(
        line.contains("MANAGER_GRPC_SERVER_CERT") && line.contains("no certificate"),
        "the log says why: {line}"
    );
    still_the_old_certificate("no certificate").await;

    // Mended: the next SIGHUP takes the new pair.
    install(dir, "server-b.pem", "live.pem");
    sighup_and_wait(&manager, RELOADED).await;
    let mut client = connect(port, trusting(dir, "b"))
        .await
        .expect("the mended pair serves");
    answers(&mut client).await.expect("API with the new pair");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_still_requires_a_client_certificate_after_a_rotation() {
    let pki = tempfile::tempdir().expect("dir");
    let dir = pki.path();
    install_two_pkis(dir);
    install(dir, "a.pem", "clients.pem");
    let clients = dir.join("clients.pem").to_string_lossy().into_owned();
    let manager = start_on_server_a(dir, &[("MANAGER_GRPC_CLIENT_CA_CERTS", &clients)]);
    let port = manager.grpc_port;
    let mut client = connect(port, with_identity(trusting(dir, "a"), dir, "client-a"))
        .await
        .expect("mTLS with client a");
    answers(&mut client).await.expect("API over mTLS");
    assert!(
        is_refused(port, trusting(dir, "a")).await,
        "no client certificate, before the rotation"
    );

    // New server certificate and new client CA.
    install(dir, "server-b.pem", "live.pem");
    install(dir, "server-b.key", "live.key");
    install(dir, "b.pem", "clients.pem");
    sighup_and_wait(&manager, RELOADED).await;
    let log = manager.log();
    let reloaded = log.lines().rfind(|l| l.contains(RELOADED)).expect("line");
    assert!(reloaded.contains("mutual_tls=true"), "{reloaded}");

    let mut client = connect(port, with_identity(trusting(dir, "b"), dir, "client-b"))
        .await
        .expect("mTLS with a client of the new CA");
    answers(&mut client)
        .await
        .expect("API over mTLS after the rotation");
    assert!(
        is_refused(port, trusting(dir, "b")).await,
        "a client without a certificate must still be refused after the rotation"
    );
    assert!(
        is_refused(port, with_identity(trusting(dir, "b"), dir, "client-a")).await,
        "a client of the old CA must be refused after the rotation"
    );
    let plain = ManagerServiceClient::connect(format!("http://127.0.0.1:{port}")).await;
    let refused = match plain {
        Err(_) => true,
        Ok(mut c) => answers(&mut c).await.is_err(),
    };
    assert!(refused, "plaintext must be refused when TLS is on");
}
