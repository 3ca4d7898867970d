//! Failures, their exit codes and their one-line messages. Secrets given on
//! the command line never reach a message: [`Redactor`] removes them.

use std::fmt;

use tonic::Code;

pub const EXIT_OTHER: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_NOT_FOUND: u8 = 3;
pub const EXIT_INVALID_ARGUMENT: u8 = 4;
pub const EXIT_UNAVAILABLE: u8 = 5;
pub const EXIT_DEADLINE: u8 = 6;

/// Why a command failed: the gRPC code (or `None` for a usage error) and a
/// message that fits on one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub code: Option<Code>,
    pub message: String,
}

impl Failure {
    pub fn usage(message: impl Into<String>) -> Failure {
        Failure {
            code: None,
            message: message.into(),
        }
    }

    pub fn grpc(code: Code, message: impl Into<String>) -> Failure {
        Failure {
            code: Some(code),
            message: message.into(),
        }
    }

    /// A status the manager (or tonic) answered.
    pub fn from_status(status: &tonic::Status) -> Failure {
        let code = status.code();
        // tonic reports its own client-side timeout as CANCELLED.
        if code == Code::Cancelled && status.message().contains("Timeout expired") {
            return Failure::grpc(Code::DeadlineExceeded, status.message());
        }
        let message = if status.message().is_empty() {
            code.description().to_string()
        } else {
            status.message().to_string()
        };
        Failure::grpc(code, message)
    }

    pub fn exit_code(&self) -> u8 {
        match self.code {
            None => EXIT_USAGE,
            Some(code) => exit_code(code),
        }
    }
}

/// The exit code of a gRPC code.
pub fn exit_code(code: Code) -> u8 {
    match code {
        Code::Ok => 0,
        Code::NotFound => EXIT_NOT_FOUND,
        Code::InvalidArgument | Code::OutOfRange => EXIT_INVALID_ARGUMENT,
        Code::Unavailable => EXIT_UNAVAILABLE,
        Code::DeadlineExceeded => EXIT_DEADLINE,
        _ => EXIT_OTHER,
    }
}

/// The canonical name of a gRPC code, as grpcurl and grpc-go print it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.code {
            None => write!(f, "usage: {}", one_line(&self.message)),
            Some(code) => write!(f, "{}: {}", code_name(code), one_line(&self.message)),
        }
    }
}

/// `text` on one line: line breaks and other control characters become spaces.
pub fn one_line(text: &str) -> String {
    let mapped: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    mapped.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Removes secret values (a private key's contents, tokens, the AWS secret)
/// from any text before it is printed.
#[derive(Debug, Default)]
pub struct Redactor {
    secrets: Vec<String>,
}

pub const REDACTED: &str = "[redacted]";

impl Redactor {
    pub fn add(&mut self, secret: &str) {
        if !secret.is_empty() {
            self.secrets.push(secret.to_string());
        }
        // A PEM key may come back quoted line by line: each line of its body
        // is a secret too (the armour lines are not).
        if secret.contains('\n') {
            for line in secret.lines().map(str::trim) {
                if line.len() >= 8 && !line.starts_with("-----") {
                    self.secrets.push(line.to_string());
                }
            }
        }
        // Longest first, so a part never leaves the rest of a longer secret.
        self.secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        self.secrets.dedup();
    }

    pub fn clean(&self, text: &str) -> String {
        let mut out = text.to_string();
        for secret in &self.secrets {
            if out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), REDACTED);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_the_documented_ones() {
        assert_eq!(exit_code(Code::NotFound), 3);
        assert_eq!(exit_code(Code::InvalidArgument), 4);
        assert_eq!(exit_code(Code::OutOfRange), 4);
        assert_eq!(exit_code(Code::Unavailable), 5);
        assert_eq!(exit_code(Code::DeadlineExceeded), 6);
        assert_eq!(exit_code(Code::FailedPrecondition), 1);
        assert_eq!(exit_code(Code::Internal), 1);
        assert_eq!(Failure::usage("x").exit_code(), 2);
    }

    #[test]
    fn tonic_client_timeout_is_a_deadline() {
        let f = Failure::from_status(&tonic::Status::cancelled("Timeout expired"));
        assert_eq!(f.code, Some(Code::DeadlineExceeded));
        assert_eq!(f.exit_code(), 6);
    }

    #[test]
    fn messages_are_one_line_and_name_the_code() {
        let f = Failure::grpc(Code::NotFound, "no VM\nwith id\tx ");
        assert_eq!(f.to_string(), "NOT_FOUND: no VM with id x");
        assert_eq!(Failure::usage("bad").to_string(), "usage: bad");
    }

    #[test]
    fn secrets_are_redacted_whole_and_by_line() {
        let mut r = Redactor::default();
        r.add("");
        r.add("s3cr3t-aws-key");
        r.add("-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nabc\n-----END PRIVATE KEY-----\n");
        assert_eq!(
            r.clean("field s3cr3t-aws-key and MIIEvQIBADANBgkqhkiG9w0BAQEFAASC"),
            "field [redacted] and [redacted]"
        );
        assert_eq!(
            r.clean("-----BEGIN PRIVATE KEY-----"),
            "-----BEGIN PRIVATE KEY-----"
        );
    }
}
