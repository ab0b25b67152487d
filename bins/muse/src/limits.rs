//! Rate limiting in the shell: which class a route belongs to, the per-IP
//! middleware (before authentication), the per-user check (in the
//! authentication extractor), and 429 answers with `Retry-After` and
//! `RateLimit-*` headers. The algorithm and stores are `muse-billing`'s
//! (memory) and `muse-persistence`'s (Redis). See docs/rate-limits.md.

use std::sync::Arc;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::middleware::Next;
use actix_web::{web, HttpMessage};
use muse_billing::{
    Decision, MemoryStore, RateLimitStore, RateLimiter, Refusal, RouteClass, Subject,
};
use uuid::Uuid;

use crate::config::RateLimitConfig;
use crate::error::ApiError;
use crate::state::AppState;

/// The limiter the configuration asks for (`None` when disabled).
pub fn build(
    config: &RateLimitConfig,
) -> Result<Option<Arc<RateLimiter>>, muse_billing::LimitError> {
    if !config.enabled {
        return Ok(None);
    }
    let store: Arc<dyn RateLimitStore> = match &config.redis_url {
        Some(url) => Arc::new(muse_persistence::RedisRateLimitStore::new(url.expose())?),
        None => Arc::new(MemoryStore::new(Arc::new(muse_core::SystemClock))),
    };
    tracing::info!(
        store = store.name(),
        fail_open = config.fail_open,
        "rate limiting on"
    );
    Ok(Some(Arc::new(RateLimiter::new(
        store,
        config.per_ip.clone(),
        config.per_user.clone(),
        config.fail_open,
    ))))
}

/// The class of a request; `None` for routes that are never limited
/// (health, metrics, docs).
pub fn classify(method: &Method, path: &str) -> Option<RouteClass> {
    const EXEMPT: &[&str] = &[
        "/",
        "/health",
        "/health/live",
        "/health/ready",
        "/metrics",
        "/openapi.json",
        "/api/v1/info",
    ];
    if EXEMPT.contains(&path) || path.starts_with("/docs") || path.starts_with("/redoc") {
        return None;
    }
    const AUTH: &[&str] = &[
        "/api/v1/auth/login",
        "/api/v1/auth/register",
        "/api/v1/auth/refresh",
        "/api/v1/auth/forgot-password",
        "/api/v1/auth/reset-password",
        "/api/v1/auth/resend-verification",
    ];
    if AUTH.contains(&path) || path.starts_with("/api/v1/auth/verify-email/") {
        return Some(RouteClass::Auth);
    }
    let generation = path == "/v1/chat/completions"
        || path.starts_with("/api/v1/execute-prompt/")
        || path.starts_with("/api/v1/ai/generate")
        || path == "/api/v1/ai/stream/generate"
        || path.starts_with("/ws/");
    if generation {
        return Some(RouteClass::Generation);
    }
    if method == Method::GET || method == Method::HEAD || method == Method::OPTIONS {
        Some(RouteClass::Reads)
    } else {
        Some(RouteClass::Writes)
    }
}

fn refusal_error(refusal: Refusal, class: RouteClass, scope: &'static str) -> ApiError {
    match refusal {
        Refusal::Limited { decision, .. } => {
            metrics::counter!("rate_limit_refusals_total", "class" => class.as_str(), "scope" => scope)
                .increment(1);
            let retry = u64::try_from((decision.retry_after_ms + 999) / 1000)
                .unwrap_or(1)
                .max(1);
            ApiError {
                retry_after: Some(retry),
                rate_limit: Some(Box::new(decision)),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    format!(
                        "too many {} requests from this {scope}; retry in {retry} s",
                        class.as_str()
                    ),
                )
                .with_details(serde_json::json!({"class": class.as_str(), "scope": scope, "retry_after_secs": retry, "limit": decision.limit}))
            }
        }
        Refusal::StoreDown(_) => {
            metrics::counter!("rate_limit_store_errors_total").increment(1);
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "rate_limiter_unavailable",
                "the rate limiter is unavailable; retry shortly",
            )
        }
    }
}

/// `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset` (seconds).
pub fn headers(d: &Decision) -> [(HeaderName, HeaderValue); 3] {
    let reset = u64::try_from((d.reset_ms + 999) / 1000).unwrap_or(0);
    [
        (
            HeaderName::from_static("ratelimit-limit"),
            HeaderValue::from(d.limit),
        ),
        (
            HeaderName::from_static("ratelimit-remaining"),
            HeaderValue::from(d.remaining),
        ),
        (
            HeaderName::from_static("ratelimit-reset"),
            HeaderValue::from(reset),
        ),
    ]
}

/// Middleware: the per-IP limit of the request's class.
pub async fn per_ip(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let state = req.app_data::<web::Data<AppState>>().cloned();
    let limiter = state.as_ref().and_then(|s| s.limiter.clone());
    let class = classify(req.method(), req.path());
    let (Some(limiter), Some(class), Some(state)) = (limiter, class, state) else {
        return next.call(req).await;
    };
    let ctx = crate::extract::request_context(req.request(), state.config.trust_proxy_headers);
    let Some(ip) = ctx.ip else {
        return next.call(req).await;
    };
    let decision = match limiter.check(class, &Subject::Ip(ip)).await {
        Ok(d) => d,
        Err(refusal) => return Err(refusal_error(refusal, class, "ip").into()),
    };
    req.extensions_mut().insert(class);
    let mut res = next.call(req).await?;
    if let Some(d) = decision {
        for (name, value) in headers(&d) {
            if !res.headers().contains_key(&name) {
                res.headers_mut().insert(name, value);
            }
        }
    }
    Ok(res)
}

/// The per-user limit of the request's class, once the caller is known.
pub async fn per_user(
    state: &AppState,
    method: &Method,
    path: &str,
    user_id: Uuid,
) -> Result<(), ApiError> {
    let (Some(limiter), Some(class)) = (state.limiter.as_ref(), classify(method, path)) else {
        return Ok(());
    };
    limiter
        .check(class, &Subject::User(user_id))
        .await
        .map(|_| ())
        .map_err(|r| refusal_error(r, class, "user"))
}

/// Failed-login throttling on the rate limiter: per account and per IP,
/// `LOGIN_MAX_FAILURES_PER_ACCOUNT` / `_PER_IP` failures at once, then one
/// more per `LOGIN_FAILURE_WINDOW_SECS / max` (GCRA). Only failures count.
pub struct LoginThrottle {
    limiter: Arc<RateLimiter>,
    keys: Vec<(String, muse_billing::Quota)>,
}

/// `None` when the rate limiter is off (the accounts service's own
/// throttle applies then).
pub fn login_throttle(state: &AppState, email: &str, ip: Option<&str>) -> Option<LoginThrottle> {
    let limiter = state.limiter.clone()?;
    let c = &state.config;
    let window_ms = u64::try_from(c.login_failure_window_secs.max(1)).unwrap_or(900) * 1000;
    let quota = |count: u32| muse_billing::Quota {
        count,
        period_ms: window_ms,
    };
    let mut keys = Vec::new();
    if c.login_max_failures_per_account > 0 {
        if let Ok(e) = muse_auth::validate::normalize_email(email) {
            keys.push((
                format!("login:account:{e}"),
                quota(c.login_max_failures_per_account),
            ));
        }
    }
    if let (Some(ip), true) = (ip, c.login_max_failures_per_ip > 0) {
        keys.push((format!("login:ip:{ip}"), quota(c.login_max_failures_per_ip)));
    }
    Some(LoginThrottle { limiter, keys })
}

impl LoginThrottle {
    /// `429 too_many_attempts` while any key has no room left.
    pub async fn check(&self) -> Result<(), ApiError> {
        for (key, quota) in &self.keys {
            match self.limiter.peek(key, *quota).await {
                Ok(()) => {}
                Err(Refusal::Limited { decision, .. }) => {
                    metrics::counter!("rate_limit_refusals_total", "class" => "login", "scope" => if key.starts_with("login:ip:") { "ip" } else { "account" })
                        .increment(1);
                    let secs = u64::try_from((decision.retry_after_ms + 999) / 1000)
                        .unwrap_or(1)
                        .max(1);
                    return Err(muse_auth::AuthError::Throttled {
                        retry_after_secs: secs,
                    }
                    .into());
                }
                Err(r @ Refusal::StoreDown(_)) => {
                    return Err(refusal_error(r, RouteClass::Auth, "ip"))
                }
            }
        }
        Ok(())
    }

    /// Counts one failed login against every key.
    pub async fn charge(&self) {
        for (key, quota) in &self.keys {
            self.limiter.charge(key, *quota).await;
        }
    }
}
