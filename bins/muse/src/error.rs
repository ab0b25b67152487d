//! One error type for every HTTP answer that is not a success, and the one
//! table that maps domain errors to a status and a stable code.
//!
//! Shape: `{"error": {"code": "...", "message": "...", "details": ...}}`.

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::error::{JsonPayloadError, PathError, QueryPayloadError};
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::middleware::Next;
use actix_web::{HttpRequest, HttpResponse, ResponseError};
use muse_auth::{AuthError, RepoError};
use serde::Serialize;
use serde_json::{json, Value};
use utoipa::ToSchema;

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code (see docs/errors.md).
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
    /// Extra structured information (e.g. per-field problems).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    pub details: Option<Value>,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Boxed: keeps `Result<_, ApiError>` small.
    pub details: Option<Box<Value>>,
    pub retry_after: Option<u64>,
    /// Sent as `RateLimit-*` headers (429 from the rate limiter).
    pub rate_limit: Option<Box<muse_billing::Decision>>,
    /// The recorded execution this error ended (`x-muse-execution-id`).
    pub execution_id: Option<uuid::Uuid>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: None,
            retry_after: None,
            rate_limit: None,
            execution_id: None,
        }
    }

    /// Names the execution this error ended: `x-muse-execution-id` and
    /// `details.execution_id`, so that a failed call can be looked up.
    pub fn for_execution(mut self, id: uuid::Uuid) -> Self {
        let mut details = self.details.take().map_or_else(|| json!({}), |d| *d);
        if let Some(o) = details.as_object_mut() {
            o.insert("execution_id".into(), json!(id));
        }
        self.details = Some(Box::new(details));
        self.execution_id = Some(id);
        self
    }

    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(Box::new(details));
        self
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// A failure the caller cannot fix. Logged in full; the answer says nothing
    /// about internals.
    pub fn internal(context: &str, error: impl std::fmt::Display) -> Self {
        tracing::error!(error = %error, "{context}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "an unexpected error occurred",
        )
    }

    pub fn unavailable(context: &str, error: impl std::fmt::Display) -> Self {
        tracing::error!(error = %error, "{context}");
        Self {
            retry_after: Some(5),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "database_unavailable",
                "the database is unavailable (down, or locked by another process); retry later",
            )
        }
    }

    fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message.clone(),
                details: self.details.as_deref().cloned(),
            },
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut res = HttpResponse::build(self.status);
        if let Some(secs) = self.retry_after {
            res.insert_header((header::RETRY_AFTER, secs.to_string()));
        }
        if let Some(id) = self.execution_id {
            res.insert_header(("x-muse-execution-id", id.to_string()));
        }
        if let Some(d) = &self.rate_limit {
            for h in crate::limits::headers(d) {
                res.insert_header(h);
            }
        }
        if self.status == StatusCode::UNAUTHORIZED {
            res.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
        }
        res.json(self.body())
    }
}

/// The table: every accounts error, its status and its code.
impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        use StatusCode as S;
        let msg = e.to_string();
        match e {
            AuthError::Validation(fields) => {
                ApiError::new(S::UNPROCESSABLE_ENTITY, "validation_failed", msg)
                    .with_details(json!({ "fields": fields }))
            }
            AuthError::EmailTaken => ApiError::new(S::CONFLICT, "email_taken", msg),
            AuthError::UsernameTaken => ApiError::new(S::CONFLICT, "username_taken", msg),
            AuthError::InvalidCredentials => {
                ApiError::new(S::UNAUTHORIZED, "invalid_credentials", msg)
            }
            AuthError::Unauthenticated => ApiError::new(S::UNAUTHORIZED, "unauthorized", msg),
            AuthError::TokenExpired => ApiError::new(S::UNAUTHORIZED, "token_expired", msg),
            AuthError::InvalidRefreshToken => {
                ApiError::new(S::UNAUTHORIZED, "invalid_refresh_token", msg)
            }
            AuthError::InvalidEmailToken => ApiError::new(S::BAD_REQUEST, "invalid_token", msg),
            AuthError::Suspended => ApiError::new(S::FORBIDDEN, "account_suspended", msg),
            AuthError::Throttled { retry_after_secs } => ApiError {
                retry_after: Some(retry_after_secs),
                ..ApiError::new(S::TOO_MANY_REQUESTS, "too_many_attempts", msg)
                    .with_details(json!({ "retry_after_secs": retry_after_secs }))
            },
            AuthError::SessionRequired => ApiError::new(S::BAD_REQUEST, "session_required", msg),
            AuthError::ApiKeyNotFound => ApiError::new(S::NOT_FOUND, "not_found", msg),
            AuthError::UserNotFound => ApiError::new(S::NOT_FOUND, "not_found", msg),
            AuthError::Refused(_) => ApiError::new(S::CONFLICT, "conflict", msg),
            AuthError::TooManyApiKeys(_) => ApiError::new(S::CONFLICT, "api_key_limit", msg),
            AuthError::Repository(RepoError::Unavailable(e)) => {
                ApiError::unavailable("database unavailable", e)
            }
            AuthError::Repository(e) => ApiError::internal("repository error", e),
            AuthError::Internal(e) => ApiError::internal("internal error", e),
        }
    }
}

/// The table for model errors. Provider credential or protocol problems are
/// the operator's, not the caller's: 502, with no upstream detail leaked
/// beyond the provider's own message.
impl From<muse_inference::InferenceError> for ApiError {
    fn from(e: muse_inference::InferenceError) -> Self {
        use muse_inference::InferenceError as E;
        use StatusCode as S;
        let msg = e.to_string();
        match e {
            E::BadRequest(_) => ApiError::new(S::BAD_REQUEST, "invalid_model_request", msg),
            E::ContextTooLong(_) => ApiError::new(S::BAD_REQUEST, "context_too_long", msg),
            E::ModelNotFound(_) => ApiError::new(S::NOT_FOUND, "model_not_found", msg),
            E::RateLimited { retry_after, .. } => ApiError {
                retry_after: retry_after.map(|d| d.as_secs().max(1)),
                ..ApiError::new(S::TOO_MANY_REQUESTS, "provider_rate_limited", msg)
            },
            E::Auth(_) => {
                tracing::error!(error = %msg, "a model provider refused Muse's credentials");
                ApiError::new(
                    S::BAD_GATEWAY,
                    "provider_auth_failed",
                    "the model provider refused this server's credentials",
                )
            }
            E::Timeout => ApiError::new(S::GATEWAY_TIMEOUT, "provider_timeout", msg),
            E::Upstream { .. } => ApiError::new(S::BAD_GATEWAY, "provider_error", msg),
            E::Connection(_) => ApiError::new(S::BAD_GATEWAY, "provider_unreachable", msg),
            E::Protocol(_) => ApiError::new(S::BAD_GATEWAY, "provider_protocol_error", msg),
            E::Cancelled => ApiError::new(S::BAD_REQUEST, "cancelled", msg),
            E::NotConfigured(_) => ApiError::new(S::SERVICE_UNAVAILABLE, "not_configured", msg),
            E::BrokenModel(_) => ApiError::new(S::SERVICE_UNAVAILABLE, "model_unavailable", msg),
            E::Interrupted(_) => ApiError {
                retry_after: Some(1),
                ..ApiError::new(S::SERVICE_UNAVAILABLE, "server_shutting_down", msg)
            },
            E::Unsupported { param, .. } => {
                ApiError::new(S::BAD_REQUEST, "unsupported_parameter", msg)
                    .with_details(json!({ "param": param }))
            }
        }
    }
}

/// The table for the prompt library.
impl From<muse_prompts::LibraryError> for ApiError {
    fn from(e: muse_prompts::LibraryError) -> Self {
        use muse_prompts::LibraryError as E;
        use StatusCode as S;
        let msg = e.to_string();
        match e {
            E::NotFound(_) => ApiError::new(S::NOT_FOUND, "not_found", msg),
            E::Forbidden(_) => ApiError::new(S::FORBIDDEN, "forbidden", msg),
            E::Invalid(fields) => ApiError::new(
                S::UNPROCESSABLE_ENTITY,
                "validation_failed",
                "some fields are invalid",
            )
            .with_details(json!({ "fields": fields })),
            E::Conflict(_) => ApiError::new(S::CONFLICT, "conflict", msg),
            E::Unavailable(m) => ApiError::unavailable("library store", m),
            E::Other(m) => ApiError::internal("library store", m),
        }
    }
}

impl From<muse_prompts::IdeaStoreError> for ApiError {
    fn from(e: muse_prompts::IdeaStoreError) -> Self {
        match e {
            muse_prompts::IdeaStoreError::Unavailable(m) => ApiError::unavailable("ideas store", m),
            muse_prompts::IdeaStoreError::Other(m) => ApiError::internal("ideas store", m),
        }
    }
}

impl From<actix_web::error::BlockingError> for ApiError {
    fn from(e: actix_web::error::BlockingError) -> Self {
        ApiError::internal("blocking task failed", e)
    }
}

/// `JsonConfig::error_handler`: malformed JSON is 400, well-formed JSON of
/// the wrong shape 422, a wrong content type 415, too large 413.
/// A serde message without Rust's type names (`expected struct
/// LoginRequest` → `expected a JSON object`).
fn without_type_names(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find("struct ").or_else(|| rest.find("enum ")) {
        let (kind, len) = if rest[at..].starts_with("struct ") {
            ("a JSON object", "struct ".len())
        } else {
            ("one of the documented values", "enum ".len())
        };
        let name_end = rest[at + len..]
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .map_or(rest.len(), |e| at + len + e);
        if name_end == at + len {
            // Not followed by a name: keep the word.
            out.push_str(&rest[..at + len]);
            rest = &rest[at + len..];
            continue;
        }
        out.push_str(&rest[..at]);
        out.push_str(kind);
        rest = &rest[name_end..];
    }
    out.push_str(rest);
    out
}

pub fn json_error(err: JsonPayloadError, _req: &HttpRequest) -> actix_web::Error {
    let api = match &err {
        JsonPayloadError::ContentType => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "expected a JSON body with Content-Type: application/json",
        ),
        JsonPayloadError::Overflow { limit }
        | JsonPayloadError::OverflowKnownLength { limit, .. } => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body is larger than the limit of {limit} bytes"),
        ),
        JsonPayloadError::Deserialize(e) if e.is_data() => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            format!(
                "the JSON body does not match the expected shape: {}",
                without_type_names(&e.to_string())
            ),
        ),
        JsonPayloadError::Deserialize(e) => {
            ApiError::bad_request("malformed_json", format!("the body is not valid JSON: {e}"))
        }
        other => ApiError::bad_request("invalid_body", format!("could not read the body: {other}")),
    };
    api.into()
}

pub fn path_error(err: PathError, _req: &HttpRequest) -> actix_web::Error {
    ApiError::bad_request(
        "invalid_path_parameter",
        format!("invalid path parameter: {err}"),
    )
    .into()
}

pub fn query_error(err: QueryPayloadError, _req: &HttpRequest) -> actix_web::Error {
    ApiError::bad_request(
        "invalid_query_parameter",
        format!("invalid query parameter: {err}"),
    )
    .into()
}

/// Default service: unknown routes.
pub async fn not_found(req: HttpRequest) -> HttpResponse {
    ApiError::not_found(format!("no route for {} {}", req.method(), req.path())).error_response()
}

fn code_for_status(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "bad_request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        408 => "request_timeout",
        411 => "length_required",
        413 => "payload_too_large",
        414 => "uri_too_long",
        415 => "unsupported_media_type",
        422 => "unprocessable_entity",
        429 => "too_many_requests",
        503 => "service_unavailable",
        s if s >= 500 => "internal_error",
        _ => "error",
    }
}

/// Middleware: any error response that is not already JSON (actix's own
/// 405, 413, CORS refusals, …) is rewritten into the documented shape, so
/// a client never sees a bare text body.
pub async fn json_errors(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let res = match next.call(req).await {
        Ok(res) => res,
        Err(e) => {
            // An inner middleware failed before producing a response: keep
            // the error, but make sure what it renders is the JSON shape.
            let rendered = e.error_response();
            if is_json(rendered.headers()) {
                return Err(e);
            }
            let status = rendered.status();
            let body = match e.as_error::<actix_cors::CorsError>() {
                // A preflight or request from an origin CORS does not allow.
                Some(cors) => {
                    ApiError::new(status, "cors_refused", cors.to_string()).error_response()
                }
                None => shaped(
                    status,
                    status.canonical_reason().unwrap_or("error").to_string(),
                ),
            };
            return Err(actix_web::error::InternalError::from_response(e.to_string(), body).into());
        }
    };
    let status = res.status();
    if !(status.is_client_error() || status.is_server_error()) || is_json(res.headers()) {
        return Ok(res.map_into_boxed_body());
    }
    let (req, old) = res.into_parts();
    let preflight = req.method() == actix_web::http::Method::OPTIONS
        && req.headers().contains_key(header::ORIGIN)
        && status == StatusCode::BAD_REQUEST;
    if preflight {
        // actix-cors answers a refused preflight in plain text: keep its
        // reason (origin, method or header not allowed) under its own code.
        let reason = actix_web::body::to_bytes_limited(old.into_body(), 4096)
            .await
            .ok()
            .and_then(Result::ok)
            .map(|b| String::from_utf8_lossy(&b).trim().to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "CORS refused this request".to_string());
        let new = ApiError::new(status, "cors_refused", reason).error_response();
        return Ok(ServiceResponse::new(req, new));
    }
    let message = match status.as_u16() {
        405 => format!("{} is not allowed on {}", req.method(), req.path()),
        _ => status.canonical_reason().unwrap_or("error").to_string(),
    };
    let mut new = shaped(status, message);
    for (name, value) in old.headers() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            new.headers_mut().append(name.clone(), value.clone());
        }
    }
    Ok(ServiceResponse::new(req, new))
}

fn is_json(headers: &header::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.starts_with("application/json") || v.starts_with("application/problem+json")
        })
}

fn shaped(status: StatusCode, message: String) -> HttpResponse {
    let mut res = HttpResponse::build(status).json(ErrorBody {
        error: ErrorDetail {
            code: code_for_status(status).to_string(),
            message,
            details: None,
        },
    });
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

#[cfg(test)]
mod tests {
    use super::without_type_names;

    #[test]
    fn serde_messages_lose_rust_type_names() {
        assert_eq!(
            without_type_names(
                "invalid type: string \"x\", expected struct LoginRequest at line 1 column 3"
            ),
            "invalid type: string \"x\", expected a JSON object at line 1 column 3"
        );
        assert_eq!(
            without_type_names("unknown variant `x`, expected enum Role"),
            "unknown variant `x`, expected one of the documented values"
        );
        assert_eq!(
            without_type_names(
                "unknown field `nickname`, expected one of `email`, `username`, `password`"
            ),
            "unknown field `nickname`, expected one of `email`, `username`, `password`"
        );
    }
}
