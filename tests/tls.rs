//! Server TLS and mutual TLS on the gRPC port, with certificates made by
//! openssl for the test.

mod common;

use std::path::Path;
use std::process::Command;

use cocos_core::proto::manager_service_client::ManagerServiceClient;
use cocos_core::proto::CvmInfoReq;
use common::*;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::Code;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new(require_tool("openssl"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for localhost and a client certificate.
fn make_pki(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
    );
    for (name, cn) in [("server", "localhost"), ("client", "cocos-cli")] {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={cn}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ],
        );
        let ext = format!("{name}.ext");
        std::fs::write(dir.join(&ext), format!("subjectAltName=DNS:{cn}\n")).expect("ext");
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &ext,
                "-out",
                &format!("{name}.pem"),
            ],
        );
    }
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
