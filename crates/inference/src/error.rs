//! Typed provider errors. Messages never contain API keys.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InferenceError {
    #[error("the provider refused the request: {0}")]
    BadRequest(String),
    #[error("the provider refused the credentials: {0}")]
    Auth(String),
    #[error("rate limited by the provider{}", retry_after.map(|d| format!(" (retry after {} s)", d.as_secs_f32())).unwrap_or_default())]
    RateLimited {
        retry_after: Option<Duration>,
        message: String,
    },
    #[error("the prompt is longer than the model's context: {0}")]
    ContextTooLong(String),
    #[error("unknown model: {0}")]
    ModelNotFound(String),
    #[error("the provider did not answer in time")]
    Timeout,
    #[error("provider error{}: {message}", status.map(|s| format!(" (HTTP {s})")).unwrap_or_default())]
    Upstream {
        status: Option<u16>,
        message: String,
    },
    #[error("cannot reach the provider: {0}")]
    Connection(String),
    #[error("the provider sent something unexpected: {0}")]
    Protocol(String),
    #[error("cancelled")]
    Cancelled,
    #[error("not configured: {0}")]
    NotConfigured(String),
    /// The provider or model cannot serve a request field (`param`).
    #[error("{message}")]
    Unsupported { param: String, message: String },
    /// A local model's files are broken (an ONNX file that does not load, a
    /// chat template that does not parse): the operator's to fix.
    #[error("the model cannot be served: {0}")]
    BrokenModel(String),
    /// The caller's side stopped the call (a server shutting down cuts
    /// the streams its grace period could not finish).
    #[error("the answer was interrupted: {0}")]
    Interrupted(String),
}

impl InferenceError {
    /// Worth trying again (later, or elsewhere): rate limits, timeouts,
    /// 5xx, dropped connections, broken streams.
    pub fn is_retryable(&self) -> bool {
        match self {
            InferenceError::RateLimited { .. }
            | InferenceError::Timeout
            | InferenceError::Connection(_)
            | InferenceError::Protocol(_) => true,
            InferenceError::Upstream { status, .. } => status.is_none_or(|s| s >= 500),
            _ => false,
        }
    }

    /// Worth trying on another model of a fallback chain.
    pub fn allows_fallback(&self) -> bool {
        self.is_retryable()
            || matches!(
                self,
                InferenceError::ModelNotFound(_)
                    | InferenceError::NotConfigured(_)
                    | InferenceError::BrokenModel(_)
            )
    }

    pub fn from_reqwest(e: &reqwest::Error) -> Self {
        if e.is_timeout() {
            InferenceError::Timeout
        } else if e.is_connect() {
            InferenceError::Connection(strip_url(&e.to_string()))
        } else if e.is_decode() || e.is_body() {
            InferenceError::Protocol(strip_url(&e.to_string()))
        } else {
            InferenceError::Connection(strip_url(&e.to_string()))
        }
    }
}

/// reqwest errors print the URL, and Gemini URLs may carry `key=`: drop
/// query strings from messages.
pub(crate) fn strip_url(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut in_query = false;
    for c in message.chars() {
        if c == '?' {
            in_query = true;
            continue;
        }
        if in_query && (c == ')' || c.is_whitespace()) {
            in_query = false;
        }
        if !in_query {
            out.push(c);
        }
    }
    out
}

/// Parses `Retry-After` (seconds; HTTP dates are treated as absent).
pub(crate) fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    v.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(|s| Duration::from_secs_f64(s.min(3600.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryability() {
        assert!(InferenceError::Upstream {
            status: Some(503),
            message: String::new()
        }
        .is_retryable());
        assert!(!InferenceError::Upstream {
            status: Some(418),
            message: String::new()
        }
        .is_retryable());
        assert!(InferenceError::RateLimited {
            retry_after: None,
            message: String::new()
        }
        .is_retryable());
        assert!(!InferenceError::Auth(String::new()).is_retryable());
        assert!(!InferenceError::ContextTooLong(String::new()).allows_fallback());
        assert!(InferenceError::ModelNotFound(String::new()).allows_fallback());
    }

    #[test]
    fn urls_lose_their_query() {
        assert_eq!(
            strip_url("error sending request for url (http://h/v1beta/models/m:generateContent?key=SECRET)"),
            "error sending request for url (http://h/v1beta/models/m:generateContent)"
        );
    }
}
