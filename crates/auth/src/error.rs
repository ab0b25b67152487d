//! Errors of the accounts domain. The HTTP shell maps each variant to a
//! status code and a stable machine-readable code.

use serde::Serialize;

use crate::repo::RepoError;

/// One problem with one input field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// The field (a JSON pointer-ish path such as `password`).
    pub field: String,
    /// Machine-readable reason, e.g. `too_short`.
    pub code: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: &str, code: &str, message: impl Into<String>) -> Self {
        Self {
            field: field.to_string(),
            code: code.to_string(),
            message: message.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("the request has invalid fields")]
    Validation(Vec<FieldError>),
    #[error("an account with this email already exists")]
    EmailTaken,
    #[error("this username is already taken")]
    UsernameTaken,
    #[error("invalid email or password")]
    InvalidCredentials,
    #[error("missing, malformed or revoked credentials")]
    Unauthenticated,
    #[error("the access token has expired")]
    TokenExpired,
    #[error("the refresh token is invalid, expired or already used")]
    InvalidRefreshToken,
    #[error("the link is invalid, expired or already used")]
    InvalidEmailToken,
    #[error("this account is suspended")]
    Suspended,
    #[error("too many failed attempts; try again in {retry_after_secs} seconds")]
    Throttled { retry_after_secs: u64 },
    #[error("this action needs a session token, not an API key")]
    SessionRequired,
    #[error("API key not found")]
    ApiKeyNotFound,
    #[error("at most {0} active API keys per user")]
    TooManyApiKeys(u64),
    #[error("no such user")]
    UserNotFound,
    /// An administrative change that would leave the service unmanageable
    /// (demoting or suspending the last admin, suspending yourself).
    #[error("{0}")]
    Refused(String),
    #[error("storage error: {0}")]
    Repository(#[from] RepoError),
    #[error("internal error: {0}")]
    Internal(String),
}
