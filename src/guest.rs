//! What a create request hands to the guest: the `environment` file of the
//! env share and the certificate files of the certs share, after checking
//! that no value can inject a line, an argument or a kernel parameter.

use std::time::Duration;

use crate::duration::parse_go_duration;
use crate::proto::CreateReq;

/// Largest certificate or key accepted in a request.
pub const MAX_CERT_BYTES: usize = 1 << 20;
/// Largest text field accepted in a request.
pub const MAX_FIELD_BYTES: usize = 8 << 10;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct FieldError {
    pub field: &'static str,
    pub reason: String,
}

fn field_error(field: &'static str, reason: impl Into<String>) -> FieldError {
    FieldError {
        field,
        reason: reason.into(),
    }
}

/// A file for the certs share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFile {
    pub name: &'static str,
    pub content: Vec<u8>,
    /// Secrets are written 0600.
    pub secret: bool,
}

/// A create request that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidatedCreate {
    pub ttl: Option<Duration>,
    pub aa_kbs_params: String,
    pub certs: Vec<CertFile>,
    req: CreateReq,
}

impl ValidatedCreate {
    /// The content of the env share's `environment` file for VM `id`.
    pub fn environment_file(&self, id: &str) -> String {
        let r = &self.req;
        let mut lines: Vec<(&str, &str)> = vec![
            ("AGENT_LOG_LEVEL", &r.agent_log_level),
            ("AGENT_CVM_GRPC_URL", &r.agent_cvm_server_url),
            ("AGENT_CVM_ID", id),
            ("AGENT_CERTS_TOKEN", &r.agent_certs_token),
            ("AGENT_CVM_CA_URL", &r.agent_cvm_ca_url),
        ];
        if !r.agent_cvm_client_cert.is_empty() {
            lines.push(("AGENT_CVM_GRPC_CLIENT_CERT", "/etc/certs/cert.pem"));
        }
        if !r.agent_cvm_client_key.is_empty() {
            lines.push(("AGENT_CVM_GRPC_CLIENT_KEY", "/etc/certs/key.pem"));
        }
        if !r.agent_cvm_server_ca_cert.is_empty() {
            lines.push(("AGENT_CVM_GRPC_SERVER_CA_CERTS", "/etc/certs/ca.pem"));
        }
        for (key, value) in [
            ("AWS_ACCESS_KEY_ID", &r.aws_access_key_id),
            ("AWS_SECRET_ACCESS_KEY", &r.aws_secret_access_key),
            ("AWS_ENDPOINT_URL", &r.aws_endpoint_url),
            ("AWS_REGION", &r.aws_region),
        ] {
            if !value.is_empty() {
                lines.push((key, value));
            }
        }
        lines
            .into_iter()
            .map(|(k, v)| format!("{k}={v}\n"))
            .collect()
    }
}

fn check_text(field: &'static str, value: &str) -> Result<(), FieldError> {
    if value.len() > MAX_FIELD_BYTES {
        return Err(field_error(
            field,
            format!("longer than {MAX_FIELD_BYTES} bytes"),
        ));
    }
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(field_error(
            field,
            format!("contains the control character {c:?}; newlines and NUL could inject lines into the guest's environment"),
        ));
    }
    Ok(())
}

/// Checks every field of a create request; nothing is made before this passes.
pub fn validate_create(req: &CreateReq) -> Result<ValidatedCreate, FieldError> {
    for (field, value) in [
        ("agent_log_level", &req.agent_log_level),
        ("agent_cvm_server_url", &req.agent_cvm_server_url),
        ("agent_cvm_ca_url", &req.agent_cvm_ca_url),
        ("ttl", &req.ttl),
        ("agent_certs_token", &req.agent_certs_token),
        ("aws_access_key_id", &req.aws_access_key_id),
        ("aws_secret_access_key", &req.aws_secret_access_key),
        ("aws_endpoint_url", &req.aws_endpoint_url),
        ("aws_region", &req.aws_region),
        ("aa_kbs_params", &req.aa_kbs_params),
    ] {
        check_text(field, value)?;
    }
    // Appended to the kernel command line: one parameter, no way to add more.
    if req
        .aa_kbs_params
        .chars()
        .any(|c| c.is_whitespace() || c == '"' || c == '\'')
    {
        return Err(field_error(
            "aa_kbs_params",
            "must not contain spaces or quotes: it becomes a single kernel parameter",
        ));
    }
    for (field, value) in [
        ("agent_cvm_server_ca_cert", &req.agent_cvm_server_ca_cert),
        ("agent_cvm_client_key", &req.agent_cvm_client_key),
        ("agent_cvm_client_cert", &req.agent_cvm_client_cert),
    ] {
        if value.len() > MAX_CERT_BYTES {
            return Err(field_error(
                field,
                format!("larger than {MAX_CERT_BYTES} bytes"),
            ));
        }
    }
    let ttl = if req.ttl.is_empty() {
        None
    } else {
        let ttl = parse_go_duration(&req.ttl).map_err(|e| field_error("ttl", e.to_string()))?;
        if ttl.is_zero() {
            return Err(field_error(
                "ttl",
                "must be positive (leave it empty for no TTL)",
            ));
        }
        Some(ttl)
    };
    let mut certs = Vec::new();
    for (name, content, secret) in [
        ("cert.pem", &req.agent_cvm_client_cert, false),
        ("key.pem", &req.agent_cvm_client_key, true),
        ("ca.pem", &req.agent_cvm_server_ca_cert, false),
    ] {
        if !content.is_empty() {
            certs.push(CertFile {
                name,
                content: content.clone(),
                secret,
            });
        }
    }
    Ok(ValidatedCreate {
        ttl,
        aa_kbs_params: req.aa_kbs_params.clone(),
        certs,
        req: req.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full_request() -> CreateReq {
        CreateReq {
            agent_log_level: "debug".into(),
            agent_cvm_server_ca_cert: b"CA".to_vec(),
            agent_cvm_client_key: b"KEY".to_vec(),
            agent_cvm_client_cert: b"CERT".to_vec(),
            agent_cvm_server_url: "cvms.example:7001".into(),
            agent_cvm_ca_url: "https://ca.example".into(),
            ttl: "1h30m".into(),
            agent_certs_token: "tok".into(),
            aws_access_key_id: "AKIA".into(),
            aws_secret_access_key: "secret".into(),
            aws_endpoint_url: "https://s3.example".into(),
            aws_region: "eu-west-1".into(),
            aa_kbs_params: "provider:kbs::http://kbs:8080".into(),
        }
    }

    #[test]
    fn full_environment_file() {
        let v = validate_create(&full_request()).expect("valid");
        assert_eq!(
            v.environment_file("id-1"),
            "AGENT_LOG_LEVEL=debug\n\
             AGENT_CVM_GRPC_URL=cvms.example:7001\n\
             AGENT_CVM_ID=id-1\n\
             AGENT_CERTS_TOKEN=tok\n\
             AGENT_CVM_CA_URL=https://ca.example\n\
             AGENT_CVM_GRPC_CLIENT_CERT=/etc/certs/cert.pem\n\
             AGENT_CVM_GRPC_CLIENT_KEY=/etc/certs/key.pem\n\
             AGENT_CVM_GRPC_SERVER_CA_CERTS=/etc/certs/ca.pem\n\
             AWS_ACCESS_KEY_ID=AKIA\n\
             AWS_SECRET_ACCESS_KEY=secret\n\
             AWS_ENDPOINT_URL=https://s3.example\n\
             AWS_REGION=eu-west-1\n"
        );
        assert_eq!(v.ttl, Some(Duration::from_secs(5400)));
        let names: Vec<_> = v.certs.iter().map(|c| (c.name, c.secret)).collect();
        assert_eq!(
            names,
            [("cert.pem", false), ("key.pem", true), ("ca.pem", false)]
        );
    }

    #[test]
    fn minimal_environment_file() {
        let v = validate_create(&CreateReq::default()).expect("valid");
        assert_eq!(
            v.environment_file("x"),
            "AGENT_LOG_LEVEL=\nAGENT_CVM_GRPC_URL=\nAGENT_CVM_ID=x\nAGENT_CERTS_TOKEN=\nAGENT_CVM_CA_URL=\n"
        );
        assert_eq!(v.ttl, None);
        assert!(v.certs.is_empty());
    }

    #[test]
    fn refuses_injection() {
        type Mutation = Box<dyn Fn(&mut CreateReq)>;
        let cases: Vec<(&str, Mutation)> = vec![
            (
                "agent_log_level",
                Box::new(|r| r.agent_log_level = "info\nEVIL=1".into()),
            ),
            (
                "agent_cvm_server_url",
                Box::new(|r| r.agent_cvm_server_url = "a\rb".into()),
            ),
            (
                "agent_certs_token",
                Box::new(|r| r.agent_certs_token = "a\0b".into()),
            ),
            ("aws_region", Box::new(|r| r.aws_region = "x\ny".into())),
            (
                "aa_kbs_params",
                Box::new(|r| r.aa_kbs_params = "a init=/bin/sh".into()),
            ),
            (
                "aa_kbs_params",
                Box::new(|r| r.aa_kbs_params = "a\"b".into()),
            ),
            ("ttl", Box::new(|r| r.ttl = "abc".into())),
            ("ttl", Box::new(|r| r.ttl = "-5s".into())),
            ("ttl", Box::new(|r| r.ttl = "0s".into())),
            (
                "agent_cvm_client_key",
                Box::new(|r| r.agent_cvm_client_key = vec![0; MAX_CERT_BYTES + 1]),
            ),
            (
                "agent_cvm_ca_url",
                Box::new(|r| r.agent_cvm_ca_url = "x".repeat(MAX_FIELD_BYTES + 1)),
            ),
        ];
        for (field, mutate) in cases {
            let mut req = full_request();
            mutate(&mut req);
            let err = validate_create(&req).expect_err(field);
            assert_eq!(err.field, field);
        }
    }

    #[test]
    fn binary_certificates_are_kept_as_sent() {
        let req = CreateReq {
            agent_cvm_client_key: vec![0, 10, 13, 255],
            ..Default::default()
        };
        let v = validate_create(&req).expect("binary content is fine in a file");
        assert_eq!(v.certs[0].content, vec![0, 10, 13, 255]);
    }
}
