//! `/api/v1/admin`: administrator-only routes (the role is checked by the
//! `AdminUser` extractor on every one; a plain user gets 403).
//! Rate limits for now; users, statistics, feature flags and the audit
//! log are the rest of the billing/admin issue.

use std::collections::BTreeMap;

use actix_web::http::StatusCode;
use actix_web::web;
use muse_billing::{RouteClass, Subject};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::error::{ApiError, ErrorBody};
use crate::extract::{AdminUser, ClientContext};
use crate::state::AppState;

pub fn config(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/api/v1/admin")
            .service(web::resource("/rate-limits/stats").get(rate_limit_stats))
            .service(web::resource("/rate-limits/unblock").post(unblock)),
    );
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RefusedKey {
    /// `ip:<address>:<class>` or `user:<id>:<class>`.
    pub key: String,
    /// Requests refused since the key was last unblocked.
    pub refused: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RateLimitStats {
    pub enabled: bool,
    /// `memory` or `redis`.
    pub store: Option<String>,
    /// What happens when the store does not answer: admit (`true`) or refuse.
    pub fail_open: bool,
    /// Class → quota, e.g. `{"auth": "30/min"}`.
    pub per_ip: BTreeMap<String, String>,
    pub per_user: BTreeMap<String, String>,
    /// The most refused keys, most first.
    pub top: Vec<RefusedKey>,
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct StatsQuery {
    /// How many keys (1–100, default 20).
    pub limit: Option<usize>,
}

fn limiter_error(e: muse_billing::LimitError) -> ApiError {
    ApiError::unavailable("rate-limit store", e)
}

/// The configured limits and the most limited keys.
#[utoipa::path(get, path = "/api/v1/admin/rate-limits/stats", tag = "admin", security(("bearer" = [])), params(StatsQuery),
    responses((status = 200, body = RateLimitStats), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn rate_limit_stats(
    state: web::Data<AppState>,
    _admin: AdminUser,
    query: web::Query<StatsQuery>,
) -> Result<web::Json<RateLimitStats>, ApiError> {
    let n = query.limit.unwrap_or(20).clamp(1, 100);
    let cfg = &state.config.rate_limits;
    let quotas = |subject: &Subject| -> BTreeMap<String, String> {
        match &state.limiter {
            None => BTreeMap::new(),
            Some(l) => RouteClass::ALL
                .iter()
                .filter_map(|c| {
                    l.quota(*c, subject)
                        .map(|q| (c.as_str().to_string(), q.to_string()))
                })
                .collect(),
        }
    };
    let top = match &state.limiter {
        None => Vec::new(),
        Some(l) => l
            .store()
            .top_refused(n)
            .await
            .map_err(limiter_error)?
            .into_iter()
            .map(|(key, refused)| RefusedKey { key, refused })
            .collect(),
    };
    Ok(web::Json(RateLimitStats {
        enabled: state.limiter.is_some(),
        store: state.limiter.as_ref().map(|l| l.store().name().to_string()),
        fail_open: cfg.fail_open,
        per_ip: quotas(&Subject::Ip(String::new())),
        per_user: quotas(&Subject::User(Uuid::nil())),
        top,
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UnblockBody {
    /// One key as listed by the stats (`ip:…:auth`).
    pub key: Option<String>,
    /// Every class of this address.
    pub ip: Option<String>,
    /// Every class of this user.
    pub user_id: Option<Uuid>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UnblockResponse {
    /// Keys that were limited or counted and are now forgotten.
    pub cleared: u64,
    pub keys: Vec<String>,
}

/// Lifts the limits of a key, an IP or a user at once (audited).
#[utoipa::path(post, path = "/api/v1/admin/rate-limits/unblock", tag = "admin", security(("bearer" = [])), request_body = UnblockBody,
    responses((status = 200, body = UnblockResponse), (status = 403, body = ErrorBody), (status = 409, description = "rate_limiting_disabled", body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn unblock(
    state: web::Data<AppState>,
    admin: AdminUser,
    ctx: ClientContext,
    body: web::Json<UnblockBody>,
) -> Result<web::Json<UnblockResponse>, ApiError> {
    let Some(limiter) = &state.limiter else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "rate_limiting_disabled",
            "rate limiting is off (RATE_LIMIT_ENABLED=false)",
        ));
    };
    let b = body.into_inner();
    let keys = match (b.key, b.ip, b.user_id) {
        (Some(k), None, None) if (1..=300).contains(&k.len()) => vec![k],
        (None, Some(ip), None) if (1..=100).contains(&ip.len()) => {
            Subject::Ip(ip.trim().to_string()).keys()
        }
        (None, None, Some(id)) => Subject::User(id).keys(),
        _ => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation_failed",
                "give exactly one of key, ip, user_id",
            ))
        }
    };
    let cleared = limiter.store().reset(&keys).await.map_err(limiter_error)?;
    let (auth, actor, detail) = (
        state.auth.clone(),
        admin.0.user.id,
        json!({"keys": keys, "cleared": cleared}),
    );
    let ctx = ctx.0;
    let _ = web::block(move || {
        auth.audit(
            Some(actor),
            "rate_limit.unblocked",
            None,
            &ctx,
            Some(detail),
        );
    })
    .await;
    Ok(web::Json(UnblockResponse { cleared, keys }))
}
