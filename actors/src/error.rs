//! Errors the API reports, each with the gRPC status an operator expects.
//!
//! `From<ApiError> for tonic::Status` below is the one place an error becomes
//! a status code; everything the front answers goes through it.

use cocos_core::guest::FieldError;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    ResourceExhausted(String),
    /// QEMU did not come up; the message carries its own reason.
    #[error("{0}")]
    StartFailed(String),
    /// The request cannot be served in the VM's or host's present state.
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Internal(String),
    #[error("{0}")]
    Unavailable(String),
    /// The request did not finish within its deadline (`MANAGER_GRPC_TIMEOUT`
    /// or the client's shorter `grpc-timeout`); the message says what became
    /// of the work it started.
    #[error("{0}")]
    DeadlineExceeded(String),
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> tonic::Status {
        match e {
            ApiError::NotFound(m) => tonic::Status::not_found(m),
            ApiError::InvalidArgument(m) => tonic::Status::invalid_argument(m),
            ApiError::ResourceExhausted(m) => tonic::Status::resource_exhausted(m),
            ApiError::StartFailed(m) => tonic::Status::failed_precondition(m),
            ApiError::FailedPrecondition(m) => tonic::Status::failed_precondition(m),
            ApiError::Internal(m) => tonic::Status::internal(m),
            ApiError::Unavailable(m) => tonic::Status::unavailable(m),
            ApiError::DeadlineExceeded(m) => tonic::Status::deadline_exceeded(m),
        }
    }
}

impl From<actix::MailboxError> for ApiError {
    fn from(e: actix::MailboxError) -> ApiError {
        ApiError::Internal(format!("internal actor unavailable: {e}"))
    }
}

/// A request field that failed its checks (bad UTF-8, a control character,
/// a bad or too long TTL, …): the client's mistake, naming the field.
impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> ApiError {
        ApiError::InvalidArgument(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn each_error_has_its_code() {
        let cases = [
            (ApiError::NotFound("m".into()), Code::NotFound),
            (ApiError::InvalidArgument("m".into()), Code::InvalidArgument),
            (
                ApiError::ResourceExhausted("m".into()),
                Code::ResourceExhausted,
            ),
            (ApiError::StartFailed("m".into()), Code::FailedPrecondition),
            (
                ApiError::FailedPrecondition("m".into()),
                Code::FailedPrecondition,
            ),
            (ApiError::Internal("m".into()), Code::Internal),
            (ApiError::Unavailable("m".into()), Code::Unavailable),
            (
                ApiError::DeadlineExceeded("m".into()),
                Code::DeadlineExceeded,
            ),
        ];
        for (error, code) in cases {
            let status = tonic::Status::from(error);
            assert_eq!(status.code(), code);
            assert_eq!(status.message(), "m");
        }
        let field = FieldError {
            field: "ttl",
            reason: "is negative".into(),
        };
        let status = tonic::Status::from(ApiError::from(field));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "invalid ttl: is negative");
    }
}
