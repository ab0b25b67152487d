//! `/api/v1/subscription`: the caller's plan, usage against its quotas,
//! and billing history. Without a payment provider configured (the Stripe
//! integration is not built yet), upgrades are made by an administrator
//! (`POST /api/v1/admin/users/{id}/plan`) and the upgrade endpoint says so.

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use muse_billing::{month_of, BillingEvent, Plan, Subscription, SubscriptionStatus, Usage};
use muse_core::PageRequest;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::rfc3339;
use crate::error::{ApiError, ErrorBody};
use crate::extract::CurrentUser;
use crate::quota::{plan_of, store_error};
use crate::state::AppState;

pub fn config(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/api/v1/subscription")
            .service(web::resource("/info").get(info))
            .service(web::resource("/plans").get(plans))
            .service(web::resource("/usage").get(usage))
            .service(web::resource("/upgrade/{plan_id}").post(upgrade))
            .service(web::resource("/cancel").post(cancel))
            .service(web::resource("/billing/history").get(history)),
    );
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PlanView {
    pub id: String,
    pub name: String,
    /// Per month, in cents of `currency`.
    pub price_cents: i64,
    pub currency: String,
    /// Per month; null is unlimited.
    pub max_requests: Option<i64>,
    pub max_tokens: Option<i64>,
    pub max_cost_usd: Option<f64>,
    pub max_batch: i32,
    /// Registry keys or `provider/*`; empty allows every model.
    pub allowed_models: Vec<String>,
    pub training_allowed: bool,
}

impl From<Plan> for PlanView {
    fn from(p: Plan) -> Self {
        Self {
            id: p.id,
            name: p.name,
            price_cents: p.price_cents,
            currency: p.currency,
            max_requests: p.max_requests,
            max_tokens: p.max_tokens,
            max_cost_usd: p.max_cost_usd,
            max_batch: p.max_batch,
            allowed_models: p.allowed_models,
            training_allowed: p.training_allowed,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SubscriptionView {
    /// `active`, `past_due` or `canceled`.
    pub status: String,
    pub plan_id: String,
    /// Ends at the end of the period instead of renewing.
    pub cancel_at_period_end: bool,
    pub current_period_end: Option<String>,
}

impl From<&Subscription> for SubscriptionView {
    fn from(s: &Subscription) -> Self {
        Self {
            status: s.status.as_str().into(),
            plan_id: s.plan_id.clone(),
            cancel_at_period_end: s.cancel_at_period_end,
            current_period_end: s.current_period_end.map(rfc3339),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UsageView {
    pub period_start: String,
    pub period_end: String,
    pub requests: i64,
    pub tokens: i64,
    pub cost_usd: f64,
    /// The plan's quotas (null: unlimited).
    pub max_requests: Option<i64>,
    pub max_tokens: Option<i64>,
    pub max_cost_usd: Option<f64>,
}

fn usage_view(u: Usage, plan: &Plan, start: i64, end: i64) -> UsageView {
    UsageView {
        period_start: rfc3339(start),
        period_end: rfc3339(end),
        requests: u.requests,
        tokens: u.tokens,
        cost_usd: u.cost_usd,
        max_requests: plan.max_requests,
        max_tokens: plan.max_tokens,
        max_cost_usd: plan.max_cost_usd,
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InfoView {
    pub plan: PlanView,
    /// Null on the free plan without a subscription.
    pub subscription: Option<SubscriptionView>,
    pub usage: UsageView,
    /// Whether upgrades can be paid here; when false an administrator changes plans.
    pub payments_enabled: bool,
}

async fn load(
    state: &AppState,
    user_id: Uuid,
) -> Result<(Plan, Option<Subscription>, Usage, i64, i64), ApiError> {
    let billing = state.billing.clone();
    let now = muse_core::Clock::now_ms(&muse_core::SystemClock);
    let (start, end) = month_of(now);
    let (plan, sub, usage) = actix_web::web::block(move || {
        let (plan, sub) = plan_of(&billing, user_id, now)?;
        let usage = billing.usage(user_id, start)?;
        Ok::<_, muse_billing::BillingError>((plan, sub, usage))
    })
    .await?
    .map_err(store_error)?;
    Ok((plan, sub, usage, start, end))
}

/// Your plan, subscription and usage this period.
#[utoipa::path(get, path = "/api/v1/subscription/info", tag = "subscription", security(("bearer" = [])),
    responses((status = 200, body = InfoView), (status = 401, body = ErrorBody)))]
pub async fn info(
    state: web::Data<AppState>,
    user: CurrentUser,
) -> Result<web::Json<InfoView>, ApiError> {
    let (plan, sub, usage, start, end) = load(&state, user.0.user.id).await?;
    Ok(web::Json(InfoView {
        usage: usage_view(usage, &plan, start, end),
        plan: plan.into(),
        subscription: sub.as_ref().map(SubscriptionView::from),
        payments_enabled: false,
    }))
}

/// Your usage this period (calendar month, UTC) against your plan's quotas.
#[utoipa::path(get, path = "/api/v1/subscription/usage", tag = "subscription", security(("bearer" = [])),
    responses((status = 200, body = UsageView), (status = 401, body = ErrorBody)))]
pub async fn usage(
    state: web::Data<AppState>,
    user: CurrentUser,
) -> Result<web::Json<UsageView>, ApiError> {
    let (plan, _, usage, start, end) = load(&state, user.0.user.id).await?;
    Ok(web::Json(usage_view(usage, &plan, start, end)))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PlanList {
    pub items: Vec<PlanView>,
}

/// The plans on offer.
#[utoipa::path(get, path = "/api/v1/subscription/plans", tag = "subscription",
    responses((status = 200, body = PlanList)))]
pub async fn plans(state: web::Data<AppState>) -> Result<web::Json<PlanList>, ApiError> {
    let billing = state.billing.clone();
    let plans = actix_web::web::block(move || billing.plans())
        .await?
        .map_err(store_error)?;
    Ok(web::Json(PlanList {
        items: plans
            .into_iter()
            .filter(|p| p.active)
            .map(PlanView::from)
            .collect(),
    }))
}

/// Starts a paid upgrade. Paying is not available on this server yet (no
/// payment provider is configured): the answer is 409
/// `payments_not_configured`, and an administrator changes plans.
#[utoipa::path(post, path = "/api/v1/subscription/upgrade/{plan_id}", tag = "subscription", security(("bearer" = [])),
    params(("plan_id" = String, Path, description = "e.g. pro")),
    responses((status = 404, description = "no such plan", body = ErrorBody), (status = 409, description = "payments_not_configured", body = ErrorBody)))]
pub async fn upgrade(
    state: web::Data<AppState>,
    _user: CurrentUser,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let (billing, id) = (state.billing.clone(), path.into_inner());
    let plan = actix_web::web::block(move || billing.plan(&id))
        .await?
        .map_err(store_error)?
        .filter(|p| p.active)
        .ok_or_else(|| ApiError::not_found("no such plan"))?;
    Err(ApiError::new(
        StatusCode::CONFLICT,
        "payments_not_configured",
        format!(
            "this server takes no payments: ask an administrator to move you to the {} plan",
            plan.name
        ),
    ))
}

/// Cancels your subscription at the end of the current period (you keep
/// the plan until then). Recorded in your billing history.
#[utoipa::path(post, path = "/api/v1/subscription/cancel", tag = "subscription", security(("bearer" = [])),
    responses((status = 200, body = SubscriptionView), (status = 409, description = "no_subscription", body = ErrorBody)))]
pub async fn cancel(
    state: web::Data<AppState>,
    user: CurrentUser,
) -> Result<web::Json<SubscriptionView>, ApiError> {
    let (billing, uid) = (state.billing.clone(), user.0.user.id);
    let now = muse_core::Clock::now_ms(&muse_core::SystemClock);
    let sub = actix_web::web::block(move || {
        let Some(mut sub) = billing
            .subscription(uid)?
            .filter(|s| s.status != SubscriptionStatus::Canceled)
        else {
            return Ok(None);
        };
        sub.cancel_at_period_end = true;
        sub.current_period_end = sub.current_period_end.or(Some(month_of(now).1));
        sub.updated_at = now;
        billing.upsert_subscription(&sub)?;
        billing.record_event(&BillingEvent {
            id: Uuid::now_v7(),
            user_id: uid,
            kind: "cancellation_requested".into(),
            description: format!("the {} plan ends at the end of the period", sub.plan_id),
            amount_cents: None,
            currency: None,
            external_id: None,
            created_at: now,
        })?;
        Ok::<_, muse_billing::BillingError>(Some(sub))
    })
    .await?
    .map_err(store_error)?;
    sub.map(|s| web::Json(SubscriptionView::from(&s)))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                "no_subscription",
                "you are on the free plan: there is nothing to cancel",
            )
        })
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct HistoryQuery {
    pub page: Option<u32>,
    pub per_page: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BillingEventView {
    pub id: Uuid,
    /// `plan_changed`, `cancellation_requested`, `invoice_paid`, `invoice_payment_failed`.
    pub kind: String,
    pub description: String,
    pub amount_cents: Option<i64>,
    pub currency: Option<String>,
    pub created_at: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BillingHistory {
    pub items: Vec<BillingEventView>,
    pub page: u32,
    pub per_page: u32,
    pub total: u64,
}

/// Your billing history, newest first.
#[utoipa::path(get, path = "/api/v1/subscription/billing/history", tag = "subscription", security(("bearer" = [])), params(HistoryQuery),
    responses((status = 200, body = BillingHistory), (status = 401, body = ErrorBody)))]
pub async fn history(
    state: web::Data<AppState>,
    user: CurrentUser,
    query: web::Query<HistoryQuery>,
) -> Result<web::Json<BillingHistory>, ApiError> {
    let (billing, uid) = (state.billing.clone(), user.0.user.id);
    let page = PageRequest::new(query.page, query.per_page);
    let p = actix_web::web::block(move || billing.events(uid, page))
        .await?
        .map_err(store_error)?;
    Ok(web::Json(BillingHistory {
        page: p.page,
        per_page: p.per_page,
        total: p.total,
        items: p
            .items
            .into_iter()
            .map(|e| BillingEventView {
                id: e.id,
                kind: e.kind,
                description: e.description,
                amount_cents: e.amount_cents,
                currency: e.currency,
                created_at: rfc3339(e.created_at),
            })
            .collect(),
    }))
}
