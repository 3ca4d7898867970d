//! What a create request hands to the guest: the `environment` file of the
//! env share and the certificate files of the certs share, after checking
//! that no value can inject a line, an argument or a kernel parameter.

use std::fmt;
use std::time::Duration;

use crate::duration::{format_go_duration, parse_go_duration, DurationError};
use crate::proto::{AttestationPolicyReq, CreateReq, CvmInfoReq, RemoveReq};
use crate::server_proto;

/// Largest certificate or key accepted in a request.
pub const MAX_CERT_BYTES: usize = 1 << 20;
/// Largest text field accepted in a request.
pub const MAX_FIELD_BYTES: usize = 8 << 10;
/// Largest VM id accepted in a request (ids are UUIDs, 36 bytes); a longer
/// one is refused rather than looked up and echoed in the answer.
pub const MAX_ID_BYTES: usize = 256;
/// The longest TTL a create may ask for: 10 years. Anything longer is
/// refused, so a deadline computed from it can never overflow a clock.
pub const MAX_TTL: Duration = Duration::from_secs(87_600 * 3_600);
/// Longest part of a refused value quoted back in an error message.
const QUOTE_MAX_CHARS: usize = 64;

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

/// A file for the certs share. Its `Debug` shows the name and size, never
/// the content.
#[derive(Clone, PartialEq, Eq)]
pub struct CertFile {
    pub name: &'static str,
    pub content: Vec<u8>,
    /// Secrets are written 0600.
    pub secret: bool,
}

impl fmt::Debug for CertFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertFile")
            .field("name", &self.name)
            .field("content", &Hidden::bytes(&self.content))
            .field("secret", &self.secret)
            .finish()
    }
}

/// A create request that passed every check. Its `Debug` hides every
/// secret (see [`Redacted`]).
#[derive(Clone, PartialEq, Eq)]
pub struct ValidatedCreate {
    pub ttl: Option<Duration>,
    pub aa_kbs_params: String,
    pub certs: Vec<CertFile>,
    req: CreateReq,
}

impl fmt::Debug for ValidatedCreate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ValidatedCreate")
            .field("ttl", &self.ttl)
            .field("aa_kbs_params", &self.aa_kbs_params)
            .field("certs", &self.certs)
            .field("req", &Redacted(&self.req))
            .finish()
    }
}

/// The fields of a `CreateReq` that carry a key, a token or a secret. Their
/// values never appear in a log line, an error message or `Debug` output.
pub const SECRET_FIELDS: [&str; 4] = [
    "agent_cvm_client_key",
    "agent_certs_token",
    "aws_access_key_id",
    "aws_secret_access_key",
];

/// Whether `field` of a `CreateReq` carries a secret.
pub fn is_secret_field(field: &str) -> bool {
    SECRET_FIELDS.contains(&field)
}

/// A value shown in `Debug` output without its content.
enum Hidden {
    /// A secret: only whether it is set.
    Secret(bool),
    /// Bytes that are not secret but not worth printing: their size.
    Bytes(usize),
}

impl Hidden {
    fn secret(value: &[u8]) -> Hidden {
        Hidden::Secret(!value.is_empty())
    }

    fn bytes(value: &[u8]) -> Hidden {
        Hidden::Bytes(value.len())
    }
}

impl fmt::Debug for Hidden {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hidden::Secret(true) => f.write_str("<redacted>"),
            Hidden::Secret(false) => f.write_str("<empty>"),
            Hidden::Bytes(n) => write!(f, "<{n} bytes>"),
        }
    }
}

/// `Debug` of a create request with every secret field (see
/// [`SECRET_FIELDS`]) shown as `<redacted>` (or `<empty>`) and the
/// certificates by size. The generated wire types derive a `Debug` that
/// prints everything: the daemon never formats them, only this.
pub struct Redacted<'a>(pub &'a CreateReq);

impl fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.0;
        f.debug_struct("CreateReq")
            .field("agent_log_level", &r.agent_log_level)
            .field(
                "agent_cvm_server_ca_cert",
                &Hidden::bytes(&r.agent_cvm_server_ca_cert),
            )
            .field(
                "agent_cvm_client_key",
                &Hidden::secret(&r.agent_cvm_client_key),
            )
            .field(
                "agent_cvm_client_cert",
                &Hidden::bytes(&r.agent_cvm_client_cert),
            )
            .field("agent_cvm_server_url", &r.agent_cvm_server_url)
            .field("agent_cvm_ca_url", &r.agent_cvm_ca_url)
            .field("ttl", &r.ttl)
            .field(
                "agent_certs_token",
                &Hidden::secret(r.agent_certs_token.as_bytes()),
            )
            .field(
                "aws_access_key_id",
                &Hidden::secret(r.aws_access_key_id.as_bytes()),
            )
            .field(
                "aws_secret_access_key",
                &Hidden::secret(r.aws_secret_access_key.as_bytes()),
            )
            .field("aws_endpoint_url", &r.aws_endpoint_url)
            .field("aws_region", &r.aws_region)
            .field("aa_kbs_params", &r.aa_kbs_params)
            .finish()
    }
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
        // Not even one character of a secret is quoted.
        let which = if is_secret_field(field) {
            "a control character (not shown: the field is secret)".to_string()
        } else {
            format!("the control character {c:?}")
        };
        return Err(field_error(
            field,
            format!("contains {which}; newlines and NUL could inject lines into the guest's environment"),
        ));
    }
    Ok(())
}

/// `value` quoted for an error message, cut short if long (the message goes
/// back to the client in a header).
fn quote(value: &str) -> String {
    if value.chars().count() <= QUOTE_MAX_CHARS {
        format!("{value:?}")
    } else {
        let head: String = value.chars().take(QUOTE_MAX_CHARS).collect();
        format!("{head:?}… ({} bytes)", value.len())
    }
}

/// A create's TTL: a positive Go duration of at most [`MAX_TTL`].
pub fn parse_ttl(text: &str) -> Result<Duration, FieldError> {
    let max = format_go_duration(MAX_TTL);
    let ttl = parse_go_duration(text).map_err(|e| {
        let reason = match e {
            DurationError::Empty => "is empty".to_string(),
            DurationError::Invalid(_) => format!(
                "{} is not a duration: expected numbers with units (ns, us, ms, s, m, h), e.g. 90s or 1h30m",
                quote(text)
            ),
            DurationError::Negative(_) => format!("{} is negative", quote(text)),
            DurationError::Overflow(_) => format!(
                "{} is too large: the longest TTL is {max} (10 years)",
                quote(text)
            ),
        };
        field_error("ttl", reason)
    })?;
    if ttl.is_zero() {
        return Err(field_error(
            "ttl",
            "must be positive (leave it empty for no TTL)",
        ));
    }
    if ttl > MAX_TTL {
        return Err(field_error(
            "ttl",
            format!(
                "{} is longer than the longest TTL, {max} (10 years)",
                format_go_duration(ttl)
            ),
        ));
    }
    Ok(ttl)
}

/// A string field of a request as the client sent it: bytes that must be
/// UTF-8 (protobuf requires it of `string` fields, and the server checks it
/// itself, see `proto/manager_server.proto`).
pub fn utf8_field(field: &'static str, bytes: Vec<u8>) -> Result<String, FieldError> {
    String::from_utf8(bytes).map_err(|e| {
        field_error(
            field,
            format!(
                "is not valid UTF-8 (bad byte at offset {}); string fields must be UTF-8",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

/// A VM id field: UTF-8 and at most [`MAX_ID_BYTES`].
fn id_field(field: &'static str, bytes: Vec<u8>) -> Result<String, FieldError> {
    if bytes.len() > MAX_ID_BYTES {
        return Err(field_error(
            field,
            format!("longer than {MAX_ID_BYTES} bytes; a VM id is a UUID"),
        ));
    }
    utf8_field(field, bytes)
}

/// A `CreateReq` read off the wire, as the public type, once every string
/// field is known to be UTF-8. The content checks are [`validate_create`]'s.
pub fn create_from_wire(raw: server_proto::CreateReq) -> Result<CreateReq, FieldError> {
    Ok(CreateReq {
        agent_log_level: utf8_field("agent_log_level", raw.agent_log_level)?,
        agent_cvm_server_ca_cert: raw.agent_cvm_server_ca_cert,
        agent_cvm_client_key: raw.agent_cvm_client_key,
        agent_cvm_client_cert: raw.agent_cvm_client_cert,
        agent_cvm_server_url: utf8_field("agent_cvm_server_url", raw.agent_cvm_server_url)?,
        agent_cvm_ca_url: utf8_field("agent_cvm_ca_url", raw.agent_cvm_ca_url)?,
        ttl: utf8_field("ttl", raw.ttl)?,
        agent_certs_token: utf8_field("agent_certs_token", raw.agent_certs_token)?,
        aws_access_key_id: utf8_field("aws_access_key_id", raw.aws_access_key_id)?,
        aws_secret_access_key: utf8_field("aws_secret_access_key", raw.aws_secret_access_key)?,
        aws_endpoint_url: utf8_field("aws_endpoint_url", raw.aws_endpoint_url)?,
        aws_region: utf8_field("aws_region", raw.aws_region)?,
        aa_kbs_params: utf8_field("aa_kbs_params", raw.aa_kbs_params)?,
    })
}

/// A `RemoveReq` read off the wire, as the public type.
pub fn remove_from_wire(raw: server_proto::RemoveReq) -> Result<RemoveReq, FieldError> {
    Ok(RemoveReq {
        cvm_id: id_field("cvm_id", raw.cvm_id)?,
    })
}

/// A `CVMInfoReq` read off the wire, as the public type.
pub fn cvm_info_from_wire(raw: server_proto::CvmInfoReq) -> Result<CvmInfoReq, FieldError> {
    Ok(CvmInfoReq {
        id: id_field("id", raw.id)?,
    })
}

/// An `AttestationPolicyReq` read off the wire, as the public type.
pub fn attestation_policy_from_wire(
    raw: server_proto::AttestationPolicyReq,
) -> Result<AttestationPolicyReq, FieldError> {
    Ok(AttestationPolicyReq {
        id: id_field("id", raw.id)?,
    })
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
        Some(parse_ttl(&req.ttl)?)
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
    fn ttl_bounds() {
        assert_eq!(parse_ttl("87600h"), Ok(MAX_TTL));
        assert_eq!(parse_ttl("1ns"), Ok(Duration::from_nanos(1)));
        for (ttl, needle) in [
            (
                "87600h0m0.000000001s",
                "longer than the longest TTL, 87600h0m0s",
            ),
            ("87601h", "longer than the longest TTL"),
            ("2562047h47m16.854775807s", "longer than the longest TTL"),
            (
                "94522879700260684295381835.999999999999h",
                "too large: the longest TTL is 87600h0m0s",
            ),
            ("2562048h", "too large"),
            ("0s", "must be positive"),
            ("-1h", "negative"),
            ("1y", "not a duration"),
        ] {
            let err = parse_ttl(ttl).expect_err(ttl);
            assert_eq!(err.field, "ttl");
            assert!(err.reason.contains(needle), "{ttl}: {}", err.reason);
        }
        let long = format!("{}h", "9".repeat(5000));
        let err = validate_create(&CreateReq {
            ttl: long,
            ..Default::default()
        })
        .expect_err("overflow");
        assert!(
            err.to_string().len() < 300,
            "the value is not echoed whole: {err}"
        );
    }

    fn wire_of(req: &CreateReq) -> server_proto::CreateReq {
        use prost::Message;
        server_proto::CreateReq::decode(req.encode_to_vec().as_slice()).expect("same wire")
    }

    #[test]
    fn the_server_reading_decodes_what_public_clients_send() {
        use prost::Message;
        let mut req = full_request();
        req.agent_log_level = "débug ✓".into();
        assert_eq!(create_from_wire(wire_of(&req)), Ok(req.clone()));
        assert_eq!(
            create_from_wire(wire_of(&CreateReq::default())),
            Ok(CreateReq::default())
        );
        let remove = RemoveReq {
            cvm_id: "e71cdcf5-21c0-4e1d-9471-ac6b4389d5f3".into(),
        };
        let raw = server_proto::RemoveReq::decode(remove.encode_to_vec().as_slice()).expect("wire");
        assert_eq!(remove_from_wire(raw), Ok(remove));
        let info = CvmInfoReq { id: "x".into() };
        let raw = server_proto::CvmInfoReq::decode(info.encode_to_vec().as_slice()).expect("wire");
        assert_eq!(cvm_info_from_wire(raw), Ok(info));
        let policy = AttestationPolicyReq { id: "y".into() };
        let raw = server_proto::AttestationPolicyReq::decode(policy.encode_to_vec().as_slice())
            .expect("wire");
        assert_eq!(attestation_policy_from_wire(raw), Ok(policy));
    }

    #[test]
    fn invalid_utf8_names_the_field() {
        let bad = || vec![b'o', b'k', 0xff, 0xfe];
        type Poke = fn(&mut server_proto::CreateReq, Vec<u8>);
        let fields: [(&str, Poke); 10] = [
            ("agent_log_level", |r, v| r.agent_log_level = v),
            ("agent_cvm_server_url", |r, v| r.agent_cvm_server_url = v),
            ("agent_cvm_ca_url", |r, v| r.agent_cvm_ca_url = v),
            ("ttl", |r, v| r.ttl = v),
            ("agent_certs_token", |r, v| r.agent_certs_token = v),
            ("aws_access_key_id", |r, v| r.aws_access_key_id = v),
            ("aws_secret_access_key", |r, v| r.aws_secret_access_key = v),
            ("aws_endpoint_url", |r, v| r.aws_endpoint_url = v),
            ("aws_region", |r, v| r.aws_region = v),
            ("aa_kbs_params", |r, v| r.aa_kbs_params = v),
        ];
        for (field, poke) in fields {
            let mut raw = wire_of(&full_request());
            poke(&mut raw, bad());
            let err = create_from_wire(raw).expect_err(field);
            assert_eq!(err.field, field);
            assert!(
                err.reason.contains("UTF-8") && err.reason.contains("offset 2"),
                "{err}"
            );
        }
        // Bytes fields carry anything.
        let mut raw = wire_of(&full_request());
        raw.agent_cvm_client_key = bad();
        assert!(create_from_wire(raw).is_ok());

        let err = remove_from_wire(server_proto::RemoveReq { cvm_id: bad() }).expect_err("utf8");
        assert_eq!(err.field, "cvm_id");
        let err = cvm_info_from_wire(server_proto::CvmInfoReq { id: bad() }).expect_err("utf8");
        assert_eq!(err.field, "id");
        let err = attestation_policy_from_wire(server_proto::AttestationPolicyReq { id: bad() })
            .expect_err("utf8");
        assert_eq!(err.field, "id");
        let err = cvm_info_from_wire(server_proto::CvmInfoReq {
            id: vec![b'a'; MAX_ID_BYTES + 1],
        })
        .expect_err("long id");
        assert!(err.reason.contains("longer than"), "{err}");
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

    /// A request with a unique, recognisable value in each secret field.
    fn planted() -> (CreateReq, [&'static str; 4]) {
        let secrets = [
            "PLANTED-client-key-7f3a",
            "PLANTED-certs-token-91bc",
            "PLANTED-access-key-id-05de",
            "PLANTED-secret-access-key-c4e8",
        ];
        let req = CreateReq {
            agent_cvm_client_key: secrets[0].as_bytes().to_vec(),
            agent_certs_token: secrets[1].into(),
            aws_access_key_id: secrets[2].into(),
            aws_secret_access_key: secrets[3].into(),
            ..full_request()
        };
        (req, secrets)
    }

    #[test]
    fn debug_output_hides_every_secret() {
        let (req, secrets) = planted();
        let v = validate_create(&req).expect("valid");
        for shown in [
            format!("{v:?}"),
            format!("{v:#?}"),
            format!("{:?}", Redacted(&req)),
            format!("{:?}", v.certs),
        ] {
            for secret in secrets {
                assert!(!shown.contains(secret), "{secret} shown in {shown}");
            }
            assert!(
                shown.contains("<redacted>") || shown.contains("bytes>"),
                "{shown}"
            );
        }
        let shown = format!("{:?}", Redacted(&req));
        assert!(shown.contains("aws_region: \"eu-west-1\""), "{shown}");
        assert!(
            shown.contains("agent_cvm_client_cert: <4 bytes>"),
            "{shown}"
        );
        let empty = format!("{:?}", Redacted(&CreateReq::default()));
        assert!(empty.contains("agent_certs_token: <empty>"), "{empty}");
    }

    #[test]
    fn errors_about_secret_fields_quote_nothing_of_them() {
        type Poke = fn(&mut CreateReq, String);
        let fields: [(&str, Poke); 3] = [
            ("agent_certs_token", |r, v| r.agent_certs_token = v),
            ("aws_access_key_id", |r, v| r.aws_access_key_id = v),
            ("aws_secret_access_key", |r, v| r.aws_secret_access_key = v),
        ];
        for (field, poke) in fields {
            for value in [
                "PLANTED-secret\u{7}with-bell".to_string(),
                format!("PLANTED-secret{}", "x".repeat(MAX_FIELD_BYTES)),
            ] {
                let mut req = full_request();
                poke(&mut req, value);
                let err = validate_create(&req).expect_err(field);
                assert_eq!(err.field, field);
                let text = err.to_string();
                assert!(!text.contains("PLANTED"), "{text}");
                assert!(!text.contains("\\u{7}"), "{text}");
            }
        }
        let mut req = full_request();
        req.agent_cvm_client_key = [b"PLANTED".as_slice(), &[0; MAX_CERT_BYTES]].concat();
        let err = validate_create(&req).expect_err("too large");
        assert!(!err.to_string().contains("PLANTED"), "{err}");
        // A field that is not secret still names the character.
        let mut req = full_request();
        req.aws_region = "eu\u{7}".into();
        let err = validate_create(&req).expect_err("bell");
        assert!(err.to_string().contains("'\\u{7}'"), "{err}");
        for secret in SECRET_FIELDS {
            assert!(is_secret_field(secret));
        }
        assert!(!is_secret_field("aws_region"));
    }
}
