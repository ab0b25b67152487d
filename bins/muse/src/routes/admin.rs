//! `/api/v1/admin`: administrator-only routes (the role is checked by the
//! `AdminUser` extractor on every one; a plain user gets 403).
//! Users (search, suspend, role), usage statistics, the audit log and rate
//! limits. Feature flags are not here yet.

use std::collections::BTreeMap;

use actix_web::http::StatusCode;
use actix_web::web;
use muse_billing::{RouteClass, Subject};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::auth::UserProfile;
use super::{bad_query, blocking, rfc3339, time};
use crate::error::{ApiError, ErrorBody};
use crate::extract::{AdminUser, ClientContext};
use crate::state::AppState;
use muse_auth::{AuditFilter, Role, UserQuery, UserStatus};
use muse_core::PageRequest;

// ----- users ------------------------------------------------------------

#[derive(Debug, Deserialize, IntoParams)]
pub struct UsersQuery {
    pub page: Option<u32>,
    pub per_page: Option<u32>,
    /// Case-insensitive text in the email or username.
    pub q: Option<String>,
    /// `user` or `admin`.
    pub role: Option<String>,
    /// `active` or `suspended`.
    pub status: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UserPage {
    pub items: Vec<UserProfile>,
    pub page: u32,
    pub per_page: u32,
    pub total: u64,
}

/// Every account, newest first, with search and filters.
#[utoipa::path(get, path = "/api/v1/admin/users", tag = "admin", security(("bearer" = [])), params(UsersQuery),
    responses((status = 200, body = UserPage), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn list_users(
    state: web::Data<AppState>,
    _admin: AdminUser,
    query: web::Query<UsersQuery>,
) -> Result<web::Json<UserPage>, ApiError> {
    let q = query.into_inner();
    let role = q
        .role
        .as_deref()
        .map(|r| {
            Role::parse(r).ok_or_else(|| bad_query(format!("role: {r:?} is not user or admin")))
        })
        .transpose()?;
    let status = q
        .status
        .as_deref()
        .map(|s| {
            UserStatus::parse(s)
                .ok_or_else(|| bad_query(format!("status: {s:?} is not active or suspended")))
        })
        .transpose()?;
    let filter = UserQuery {
        q: q.q,
        role,
        status,
    };
    let page = PageRequest::new(q.page, q.per_page);
    let auth = state.auth.clone();
    let p = blocking(move || auth.list_users(&filter, page)).await?;
    Ok(web::Json(UserPage {
        page: p.page,
        per_page: p.per_page,
        total: p.total,
        items: p.items.iter().map(UserProfile::from).collect(),
    }))
}

async fn change_status(
    state: &AppState,
    admin: AdminUser,
    ctx: ClientContext,
    target: Uuid,
    status: UserStatus,
) -> Result<web::Json<UserProfile>, ApiError> {
    let auth = state.auth.clone();
    let user = blocking(move || auth.set_status(&admin.0, target, status, &ctx.0)).await?;
    Ok(web::Json(UserProfile::from(&user)))
}

/// Suspends a user: their tokens and API keys stop working on their next
/// request. Audited. 409 for yourself or the last administrator.
#[utoipa::path(post, path = "/api/v1/admin/users/{user_id}/suspend", tag = "admin", security(("bearer" = [])),
    params(("user_id" = Uuid, Path, description = "the user")),
    responses((status = 200, body = UserProfile), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn suspend(
    state: web::Data<AppState>,
    admin: AdminUser,
    ctx: ClientContext,
    path: web::Path<Uuid>,
) -> Result<web::Json<UserProfile>, ApiError> {
    change_status(&state, admin, ctx, path.into_inner(), UserStatus::Suspended).await
}

/// Reinstates a suspended user. Audited.
#[utoipa::path(post, path = "/api/v1/admin/users/{user_id}/unsuspend", tag = "admin", security(("bearer" = [])),
    params(("user_id" = Uuid, Path, description = "the user")),
    responses((status = 200, body = UserProfile), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn unsuspend(
    state: web::Data<AppState>,
    admin: AdminUser,
    ctx: ClientContext,
    path: web::Path<Uuid>,
) -> Result<web::Json<UserProfile>, ApiError> {
    change_status(&state, admin, ctx, path.into_inner(), UserStatus::Active).await
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RoleBody {
    /// `user` or `admin`.
    pub role: String,
}

/// Changes a user's role. Audited; the last administrator cannot be demoted.
#[utoipa::path(post, path = "/api/v1/admin/users/{user_id}/role", tag = "admin", security(("bearer" = [])), request_body = RoleBody,
    params(("user_id" = Uuid, Path, description = "the user")),
    responses((status = 200, body = UserProfile), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn set_role(
    state: web::Data<AppState>,
    admin: AdminUser,
    ctx: ClientContext,
    path: web::Path<Uuid>,
    body: web::Json<RoleBody>,
) -> Result<web::Json<UserProfile>, ApiError> {
    let role = Role::parse(&body.role).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "role must be user or admin",
        )
    })?;
    let (auth, target) = (state.auth.clone(), path.into_inner());
    let user = blocking(move || auth.set_role(&admin.0, target, role, &ctx.0)).await?;
    Ok(web::Json(UserProfile::from(&user)))
}

// ----- statistics -------------------------------------------------------

#[derive(Debug, Deserialize, IntoParams)]
pub struct PeriodQuery {
    /// RFC 3339; default 30 days before `to`.
    pub from: Option<String>,
    /// RFC 3339; default now.
    pub to: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UserCounts {
    pub total: u64,
    pub admins: u64,
    pub suspended: u64,
    /// Users with at least one execution in the period.
    pub active: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelUsageView {
    pub provider: String,
    pub model: String,
    pub executions: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// USD, over executions whose price is known.
    pub cost_usd: f64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AdminStats {
    pub from: String,
    pub to: String,
    pub users: UserCounts,
    pub executions: u64,
    pub tokens: u64,
    pub cost_usd: f64,
    /// Per provider and model, most used first.
    pub by_model: Vec<ModelUsageView>,
    /// Training jobs (all time) by state: `queued`, `running`, `succeeded`, …
    #[schema(value_type = Object)]
    pub training_jobs: std::collections::BTreeMap<String, u64>,
}

/// Users, executions, tokens and cost by provider and model over a period.
#[utoipa::path(get, path = "/api/v1/admin/stats", tag = "admin", security(("bearer" = [])), params(PeriodQuery),
    responses((status = 200, body = AdminStats), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn stats(
    state: web::Data<AppState>,
    _admin: AdminUser,
    query: web::Query<PeriodQuery>,
) -> Result<web::Json<AdminStats>, ApiError> {
    let to =
        time("to", &query.to)?.unwrap_or_else(|| muse_core::Clock::now_ms(&muse_core::SystemClock));
    let from = time("from", &query.from)?.unwrap_or(to - 30 * 24 * 3600 * 1000);
    if from >= to {
        return Err(bad_query("from must be before to".into()));
    }
    let (auth, execs) = (state.auth.clone(), state.executions.clone());
    let (users, usage, active) = blocking(move || {
        let count = |q: UserQuery| {
            auth.list_users(&q, PageRequest::new(Some(1), Some(1)))
                .map(|p| p.total)
        };
        let users = (
            count(UserQuery::default())?,
            count(UserQuery {
                role: Some(Role::Admin),
                ..Default::default()
            })?,
            count(UserQuery {
                status: Some(UserStatus::Suspended),
                ..Default::default()
            })?,
        );
        let store =
            |e: muse_prompts::ExecutionStoreError| muse_auth::AuthError::Internal(e.to_string());
        let usage = execs.usage(from, to).map_err(store)?;
        let active = execs.active_users(from, to).map_err(store)?;
        Ok::<_, muse_auth::AuthError>((users, usage, active))
    })
    .await?;
    let jobs = state.training.jobs.clone();
    let training_jobs = blocking(move || jobs.count_by_state())
        .await?
        .into_iter()
        .map(|(s, n)| (s.as_str().to_string(), n))
        .collect();
    let by_model: Vec<ModelUsageView> = usage
        .into_iter()
        .map(|u| ModelUsageView {
            provider: u.provider,
            model: u.model,
            executions: u.executions,
            succeeded: u.succeeded,
            failed: u.failed,
            cancelled: u.cancelled,
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            cost_usd: u.cost_usd,
        })
        .collect();
    Ok(web::Json(AdminStats {
        from: rfc3339(from),
        to: rfc3339(to),
        users: UserCounts {
            total: users.0,
            admins: users.1,
            suspended: users.2,
            active,
        },
        executions: by_model.iter().map(|m| m.executions).sum(),
        tokens: by_model
            .iter()
            .map(|m| m.prompt_tokens + m.completion_tokens)
            .sum(),
        cost_usd: by_model.iter().map(|m| m.cost_usd).sum(),
        by_model,
        training_jobs,
    }))
}

// ----- audit log --------------------------------------------------------

#[derive(Debug, Deserialize, IntoParams)]
pub struct AuditQueryParams {
    pub page: Option<u32>,
    pub per_page: Option<u32>,
    /// The actor (or subject) user.
    pub user_id: Option<Uuid>,
    /// An event name (`user.suspended`) or a prefix ending in `.` (`login.`).
    pub event: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditView {
    pub id: Uuid,
    pub event: String,
    /// Who did it (null for anonymous events such as a failed login).
    pub user_id: Option<Uuid>,
    /// What it is about (a target user id, an email).
    pub subject: Option<String>,
    pub ip: Option<String>,
    /// Event-specific facts (null for logins, logouts, registrations).
    #[schema(value_type = Option<Object>)]
    pub detail: Option<serde_json::Value>,
    pub created_at: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditPage {
    pub items: Vec<AuditView>,
    pub page: u32,
    pub per_page: u32,
    pub total: u64,
}

/// The audit log, newest first: logins, failed logins, role changes,
/// suspensions, key creation and revocation, unblocks, … No secret is ever
/// stored in it.
#[utoipa::path(get, path = "/api/v1/admin/audit", tag = "admin", security(("bearer" = [])), params(AuditQueryParams),
    responses((status = 200, body = AuditPage), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn audit(
    state: web::Data<AppState>,
    _admin: AdminUser,
    query: web::Query<AuditQueryParams>,
) -> Result<web::Json<AuditPage>, ApiError> {
    let q = query.into_inner();
    let filter = AuditFilter {
        user_id: q.user_id,
        event: q.event.filter(|e| !e.trim().is_empty()),
        from_ms: time("from", &q.from)?,
        to_ms: time("to", &q.to)?,
    };
    let page = PageRequest::new(q.page, q.per_page);
    let auth = state.auth.clone();
    let p = blocking(move || auth.audit_log(&filter, page)).await?;
    Ok(web::Json(AuditPage {
        page: p.page,
        per_page: p.per_page,
        total: p.total,
        items: p
            .items
            .into_iter()
            .map(|e| AuditView {
                id: e.id,
                event: e.event,
                user_id: e.user_id,
                subject: e.subject,
                ip: e.ip,
                detail: e.detail,
                created_at: rfc3339(e.created_at),
            })
            .collect(),
    }))
}

/// The role is checked before anything else of the request is read: a
/// user who is not an administrator gets 403 whatever the body holds.
async fn admins_only(
    mut req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody + 'static>,
) -> Result<actix_web::dev::ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    if let Err(e) = req.extract::<AdminUser>().await {
        return Ok(req.error_response(e).map_into_boxed_body());
    }
    Ok(next.call(req).await?.map_into_boxed_body())
}

pub fn config(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/api/v1/admin")
            .wrap(actix_web::middleware::from_fn(admins_only))
            .service(web::resource("/stats").get(stats))
            .service(web::resource("/users").get(list_users))
            .service(web::resource("/users/{user_id}/suspend").post(suspend))
            .service(web::resource("/users/{user_id}/unsuspend").post(unsuspend))
            .service(web::resource("/users/{user_id}/role").post(set_role))
            .service(web::resource("/users/{user_id}/plan").post(set_plan))
            .service(web::resource("/plans/{plan_id}").put(put_plan))
            .service(web::resource("/audit").get(audit))
            .service(
                web::resource("/feature-flags")
                    .get(list_flags)
                    .post(upsert_flag),
            )
            .service(web::resource("/models/pull").post(pull_model))
            .service(web::resource("/models/pulls").get(list_pulls))
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

// ----- feature flags ----------------------------------------------------

#[derive(Debug, Serialize, ToSchema)]
pub struct FlagView {
    pub key: String,
    pub enabled: bool,
    /// 0–100, stable per user.
    pub rollout_percent: u8,
    pub allow_users: Vec<Uuid>,
    pub allow_plans: Vec<String>,
    pub description: String,
    pub updated_by: Option<Uuid>,
    pub updated_at: Option<String>,
}

impl From<muse_billing::FeatureFlag> for FlagView {
    fn from(f: muse_billing::FeatureFlag) -> Self {
        Self {
            key: f.key,
            enabled: f.enabled,
            rollout_percent: f.rollout_percent,
            allow_users: f.allow_users,
            allow_plans: f.allow_plans,
            description: f.description,
            updated_by: f.updated_by,
            updated_at: Some(rfc3339(f.updated_at)),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FlagList {
    /// Every flag written so far (a flag with no row is on).
    pub items: Vec<FlagView>,
    /// Flags that gate routes: `batch_generation`, `streaming`,
    /// `training`, and `provider.<id>` for each configured provider.
    pub gates: Vec<String>,
}

/// Every feature flag, and the flags that gate routes.
#[utoipa::path(get, path = "/api/v1/admin/feature-flags", tag = "admin", security(("bearer" = [])),
    responses((status = 200, body = FlagList), (status = 403, body = ErrorBody)))]
pub async fn list_flags(state: web::Data<AppState>, _admin: AdminUser) -> web::Json<FlagList> {
    use muse_billing::flags::known;
    let mut gates: Vec<String> = [known::BATCH_GENERATION, known::STREAMING, known::TRAINING]
        .iter()
        .map(|s| s.to_string())
        .collect();
    gates.extend(
        state
            .models
            .provider_ids()
            .into_iter()
            .map(|p| format!("{}{p}", known::PROVIDER_PREFIX)),
    );
    web::Json(FlagList {
        items: state
            .flags
            .snapshot()
            .all()
            .into_iter()
            .map(FlagView::from)
            .collect(),
        gates,
    })
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FlagBody {
    /// a-z, 0-9, `_`, `.`, `-`; e.g. `streaming`, `provider.openai`.
    pub key: String,
    pub enabled: bool,
    /// Default 100.
    pub rollout_percent: Option<u8>,
    pub allow_users: Option<Vec<Uuid>>,
    pub allow_plans: Option<Vec<String>>,
    pub description: Option<String>,
}

/// Creates or replaces a flag; every replica applies it within
/// `FEATURE_FLAGS_REFRESH_SECS` (this one at once). Audited.
#[utoipa::path(post, path = "/api/v1/admin/feature-flags", tag = "admin", security(("bearer" = [])), request_body = FlagBody,
    responses((status = 200, body = FlagView), (status = 403, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn upsert_flag(
    state: web::Data<AppState>,
    admin: AdminUser,
    ctx: ClientContext,
    body: web::Json<FlagBody>,
) -> Result<web::Json<FlagView>, ApiError> {
    let b = body.into_inner();
    let flag = muse_billing::FeatureFlag {
        key: b.key.trim().to_string(),
        enabled: b.enabled,
        rollout_percent: b.rollout_percent.unwrap_or(100),
        allow_users: b.allow_users.unwrap_or_default(),
        allow_plans: b.allow_plans.unwrap_or_default(),
        description: b.description.unwrap_or_default(),
        updated_by: Some(admin.0.user.id),
        updated_at: muse_core::Clock::now_ms(&muse_core::SystemClock),
    };
    muse_billing::flags::validate(&flag)
        .map_err(|m| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed", m))?;
    let before = state.flags.snapshot().get(&flag.key).cloned();
    let (flags, auth, f) = (state.flags.clone(), state.auth.clone(), flag.clone());
    blocking(move || {
        flags.upsert(&f).map_err(|e| match e {
            muse_billing::FlagStoreError::Unavailable(m) => {
                ApiError::unavailable("feature flags", m)
            }
            muse_billing::FlagStoreError::Other(m) => ApiError::internal("feature flags", m),
        })?;
        auth.audit(
            Some(admin.0.user.id),
            muse_auth::audit::FEATURE_FLAG_CHANGED,
            Some(&f.key),
            &ctx.0,
            Some(json!({"before": before, "after": f})),
        );
        Ok::<_, ApiError>(())
    })
    .await?;
    Ok(web::Json(flag.into()))
}

// ----- plans ------------------------------------------------------------

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanChange {
    /// e.g. `pro`; `free` ends the subscription.
    pub plan_id: String,
}

/// Moves a user to a plan at once (no payment involved): their quotas
/// change on the next call. Audited and written to their billing history.
#[utoipa::path(post, path = "/api/v1/admin/users/{user_id}/plan", tag = "admin", security(("bearer" = [])), request_body = PlanChange,
    params(("user_id" = Uuid, Path, description = "the user")),
    responses((status = 200, body = crate::routes::subscription::SubscriptionView), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn set_plan(
    state: web::Data<AppState>,
    admin: AdminUser,
    ctx: ClientContext,
    path: web::Path<Uuid>,
    body: web::Json<PlanChange>,
) -> Result<web::Json<crate::routes::subscription::SubscriptionView>, ApiError> {
    let target = path.into_inner();
    let plan_id = body.into_inner().plan_id;
    let (auth, billing) = (state.auth.clone(), state.billing.clone());
    let now = muse_core::Clock::now_ms(&muse_core::SystemClock);
    let sub = blocking(move || {
        let store = crate::quota::store_error;
        let user = auth
            .repository()
            .user_by_id(target)
            .map_err(|e| ApiError::from(muse_auth::AuthError::from(e)))?
            .ok_or_else(|| ApiError::not_found("no such user"))?;
        let plan = billing
            .plan(&plan_id)
            .map_err(store)?
            .ok_or_else(|| ApiError::not_found(format!("no such plan: {plan_id}")))?;
        let before = billing.subscription(target).map_err(store)?;
        let from = before
            .as_ref()
            .map_or("free".to_string(), |s| s.plan_id.clone());
        let sub = muse_billing::Subscription {
            user_id: target,
            plan_id: plan.id.clone(),
            status: muse_billing::SubscriptionStatus::Active,
            cancel_at_period_end: false,
            stripe_customer_id: before.as_ref().and_then(|s| s.stripe_customer_id.clone()),
            stripe_subscription_id: before
                .as_ref()
                .and_then(|s| s.stripe_subscription_id.clone()),
            current_period_end: Some(muse_billing::month_of(now).1),
            updated_at: now,
            stripe_event_at: before.as_ref().and_then(|s| s.stripe_event_at),
        };
        billing.upsert_subscription(&sub).map_err(store)?;
        billing
            .record_event(&muse_billing::BillingEvent {
                id: Uuid::now_v7(),
                user_id: target,
                kind: "plan_changed".into(),
                description: format!("{from} → {} (by an administrator)", plan.id),
                amount_cents: None,
                currency: None,
                external_id: None,
                created_at: now,
            })
            .map_err(store)?;
        auth.audit(
            Some(admin.0.user.id),
            muse_auth::audit::PLAN_CHANGED,
            Some(&target.to_string()),
            &ctx.0,
            Some(json!({"target": target, "email": user.email, "from": from, "to": plan.id})),
        );
        Ok::<_, ApiError>(sub)
    })
    .await?;
    Ok(web::Json(
        crate::routes::subscription::SubscriptionView::from(&sub),
    ))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanBody {
    pub name: String,
    pub price_cents: i64,
    pub currency: Option<String>,
    pub stripe_price_id: Option<String>,
    /// Per month; null or absent is unlimited.
    pub max_requests: Option<i64>,
    pub max_tokens: Option<i64>,
    pub max_cost_usd: Option<f64>,
    pub max_batch: Option<i32>,
    pub allowed_models: Option<Vec<String>>,
    pub training_allowed: Option<bool>,
    /// Unfinished training jobs per user at once (0–100, default 2).
    pub max_training_jobs: Option<i32>,
    pub active: Option<bool>,
}

/// Creates or replaces a plan (its quotas apply to the next call of every
/// user on it). Audited.
#[utoipa::path(put, path = "/api/v1/admin/plans/{plan_id}", tag = "admin", security(("bearer" = [])), request_body = PlanBody,
    params(("plan_id" = String, Path, description = "a-z, 0-9, '-', '_'")),
    responses((status = 200, body = crate::routes::subscription::PlanView), (status = 403, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn put_plan(
    state: web::Data<AppState>,
    admin: AdminUser,
    ctx: ClientContext,
    path: web::Path<String>,
    body: web::Json<PlanBody>,
) -> Result<web::Json<crate::routes::subscription::PlanView>, ApiError> {
    let id = path.into_inner();
    let b = body.into_inner();
    let invalid = |m: &str| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            m.to_string(),
        )
    };
    if id.is_empty()
        || id.len() > 32
        || !id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
    {
        return Err(invalid("plan_id: 1 to 32 of a-z, 0-9, '-', '_'"));
    }
    if b.name.trim().is_empty() || b.name.chars().count() > 100 {
        return Err(invalid("name: 1 to 100 characters"));
    }
    if b.price_cents < 0
        || b.max_requests.is_some_and(|v| v < 0)
        || b.max_tokens.is_some_and(|v| v < 0)
        || b.max_cost_usd.is_some_and(|v| v.is_nan() || v < 0.0)
        || b.max_batch.is_some_and(|v| !(1..=100).contains(&v))
        || b.max_training_jobs.is_some_and(|v| !(0..=100).contains(&v))
    {
        return Err(invalid(
            "prices and quotas must not be negative; max_batch is 1 to 100, max_training_jobs 0 to 100",
        ));
    }
    let plan = muse_billing::Plan {
        id: id.clone(),
        name: b.name.trim().to_string(),
        price_cents: b.price_cents,
        currency: b.currency.unwrap_or_else(|| "usd".into()).to_lowercase(),
        stripe_price_id: b.stripe_price_id,
        max_requests: b.max_requests,
        max_tokens: b.max_tokens,
        max_cost_usd: b.max_cost_usd,
        max_batch: b.max_batch.unwrap_or(10),
        allowed_models: b.allowed_models.unwrap_or_default(),
        training_allowed: b.training_allowed.unwrap_or(false),
        max_training_jobs: b.max_training_jobs.unwrap_or(2),
        active: b.active.unwrap_or(true),
    };
    let (auth, billing, p) = (state.auth.clone(), state.billing.clone(), plan.clone());
    let now = muse_core::Clock::now_ms(&muse_core::SystemClock);
    blocking(move || {
        billing
            .upsert_plan(&p, now)
            .map_err(crate::quota::store_error)?;
        auth.audit(
            Some(admin.0.user.id),
            muse_auth::audit::PLAN_EDITED,
            Some(&p.id),
            &ctx.0,
            Some(json!(p)),
        );
        Ok::<_, ApiError>(())
    })
    .await?;
    Ok(web::Json(plan.into()))
}

// ----- local model pulls --------------------------------------------------

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PullBody {
    /// A Hugging Face repo id, `org/name`.
    #[schema(example = "HuggingFaceTB/SmolLM2-135M-Instruct")]
    pub model: String,
    /// `fp32` (default), `fp16`, `int8`, `q4`, … as the repo publishes
    /// them (`onnx/model_<variant>.onnx`).
    pub variant: Option<String>,
}

fn valid_repo_id(id: &str) -> bool {
    let mut parts = id.split('/');
    let ok_part = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && !p.starts_with('.')
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    matches!((parts.next(), parts.next(), parts.next()), (Some(a), Some(b), None) if ok_part(a) && ok_part(b))
        && !id.contains("..")
}

/// Downloads one ONNX variant of a model from the Hugging Face Hub into
/// `MODEL_CACHE_DIR`, in the background (202); follow it with
/// `GET /api/v1/admin/models/pulls`. Once verified against the hub's sizes
/// and hashes, it is served as `local/{model}` at once. Audited.
#[utoipa::path(post, path = "/api/v1/admin/models/pull", tag = "admin", security(("bearer" = [])), request_body = PullBody,
    responses((status = 202, body = crate::pulls::PullStatus), (status = 403, body = ErrorBody), (status = 409, description = "a pull of this model is running", body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 503, description = "local models are disabled", body = ErrorBody)))]
pub async fn pull_model(
    state: web::Data<AppState>,
    admin: AdminUser,
    ctx: ClientContext,
    body: web::Json<PullBody>,
) -> Result<actix_web::HttpResponse, ApiError> {
    let body = body.into_inner();
    if !valid_repo_id(&body.model) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            format!(
                "model {:?} is not a Hugging Face repo id (org/name)",
                body.model
            ),
        ));
    }
    if let Some(v) = &body.variant {
        if v.is_empty() || v.len() > 24 || !v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation_failed",
                format!("variant {v:?} is not a variant name (fp32, fp16, int8, q4, …)"),
            ));
        }
    }
    if let Some(why) = &state.local_unavailable {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_configured",
            format!("local models are disabled: {why}"),
        ));
    }
    let llm = &state.config.llm;
    let hub = muse_inference::local::download::HubConfig {
        endpoint: llm.hf_endpoint.clone(),
        token: llm.hf_token.clone(),
        offline: llm.hf_offline,
    };
    let started = state.pulls.start(
        state.models.clone(),
        llm.model_cache_dir.clone(),
        hub,
        body.model.clone(),
        body.variant.clone(),
    );
    let Some(status) = started else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "pull_running",
            format!("{} is already being pulled", body.model),
        ));
    };
    let auth = state.auth.clone();
    let detail = json!({"variant": body.variant});
    blocking(move || {
        auth.audit(
            Some(admin.0.user.id),
            muse_auth::audit::MODEL_PULLED,
            Some(&body.model),
            &ctx.0,
            Some(detail),
        );
        Ok::<_, ApiError>(())
    })
    .await?;
    Ok(actix_web::HttpResponse::Accepted().json(status))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PullList {
    pub items: Vec<crate::pulls::PullStatus>,
}

/// Model pulls of this server process: running, succeeded, failed (with
/// the reason).
#[utoipa::path(get, path = "/api/v1/admin/models/pulls", tag = "admin", security(("bearer" = [])),
    responses((status = 200, body = PullList), (status = 403, body = ErrorBody)))]
pub async fn list_pulls(state: web::Data<AppState>, _admin: AdminUser) -> web::Json<PullList> {
    web::Json(PullList {
        items: state.pulls.list(),
    })
}
