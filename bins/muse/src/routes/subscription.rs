//! `/api/v1/subscription`: the caller's plan, usage against its quotas,
//! billing history, and Stripe: upgrades through Checkout, cancellation at
//! period end, and the webhook that applies Stripe's events. Without
//! `STRIPE_SECRET_KEY`, upgrades are made by an administrator
//! (`POST /api/v1/admin/users/{id}/plan`) and the endpoints say so.

use actix_web::http::StatusCode;
use actix_web::web;
use muse_billing::{month_of, BillingEvent, Plan, Subscription, SubscriptionStatus, Usage};
use serde::Serialize;
use utoipa::ToSchema;
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
            .service(web::resource("/billing/history").get(history))
            .service(web::resource("/webhook").post(webhook)),
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
    /// Unfinished training jobs at once.
    pub max_training_jobs: i32,
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
            max_training_jobs: p.max_training_jobs,
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
        let (plan, sub) = plan_of(&*billing, user_id, now)?;
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
        payments_enabled: state.payments.is_some(),
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

#[derive(Debug, Serialize, ToSchema)]
pub struct CheckoutView {
    /// Send the user here to pay; the plan changes when Stripe confirms.
    pub checkout_url: String,
    pub session_id: String,
}

fn payment_error(e: muse_billing::PaymentError) -> ApiError {
    match e {
        muse_billing::PaymentError::Refused(m) => {
            ApiError::new(StatusCode::BAD_GATEWAY, "payment_provider_refused", m)
        }
        muse_billing::PaymentError::Unavailable(m) => {
            ApiError::new(StatusCode::BAD_GATEWAY, "payment_provider_unavailable", m)
        }
    }
}

fn no_payments(what: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "payments_not_configured",
        format!("this server takes no payments (no STRIPE_SECRET_KEY): {what}"),
    )
}

/// Starts an upgrade: a Stripe Checkout session for the plan's price (the
/// plan changes when Stripe's webhook confirms the payment). Without
/// payments configured: 409 `payments_not_configured`.
#[utoipa::path(post, path = "/api/v1/subscription/upgrade/{plan_id}", tag = "subscription", security(("bearer" = [])),
    params(("plan_id" = String, Path, description = "e.g. pro")),
    responses((status = 200, body = CheckoutView), (status = 404, description = "no such plan", body = ErrorBody),
        (status = 409, description = "payments_not_configured, plan_not_purchasable", body = ErrorBody),
        (status = 502, description = "payment_provider_refused, payment_provider_unavailable", body = ErrorBody)))]
pub async fn upgrade(
    state: web::Data<AppState>,
    user: CurrentUser,
    path: web::Path<String>,
) -> Result<web::Json<CheckoutView>, ApiError> {
    let (billing, id) = (state.billing.clone(), path.into_inner());
    let uid = user.0.user.id;
    let (plan, sub) = actix_web::web::block(move || {
        Ok::<_, muse_billing::BillingError>((billing.plan(&id)?, billing.subscription(uid)?))
    })
    .await?
    .map_err(store_error)?;
    let plan = plan
        .filter(|p| p.active)
        .ok_or_else(|| ApiError::not_found("no such plan"))?;
    let Some(payments) = state.payments.clone() else {
        return Err(no_payments(&format!(
            "ask an administrator to move you to the {} plan",
            plan.name
        )));
    };
    let Some(price) = plan.stripe_price_id.clone() else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "plan_not_purchasable",
            format!("the {} plan has no Stripe price", plan.name),
        ));
    };
    let customer = match sub.as_ref().and_then(|s| s.stripe_customer_id.clone()) {
        Some(c) => c,
        None => {
            let c = payments
                .create_customer(uid, &user.0.user.email)
                .await
                .map_err(payment_error)?;
            // Remember the customer on the user's (free) subscription row.
            let now = muse_core::Clock::now_ms(&muse_core::SystemClock);
            let row = match sub.clone() {
                Some(s) => Subscription {
                    stripe_customer_id: Some(c.clone()),
                    updated_at: now,
                    ..s
                },
                None => Subscription {
                    user_id: uid,
                    plan_id: muse_billing::FREE_PLAN.into(),
                    status: SubscriptionStatus::Active,
                    cancel_at_period_end: false,
                    stripe_customer_id: Some(c.clone()),
                    stripe_subscription_id: None,
                    current_period_end: None,
                    updated_at: now,
                    stripe_event_at: None,
                },
            };
            let billing = state.billing.clone();
            actix_web::web::block(move || billing.upsert_subscription(&row))
                .await?
                .map_err(store_error)?;
            c
        }
    };
    let base = &state.config.public_url;
    let session = payments
        .create_checkout(
            &customer,
            &price,
            uid,
            &plan.id,
            &format!("{base}/?checkout=success"),
            &format!("{base}/?checkout=cancelled"),
        )
        .await
        .map_err(payment_error)?;
    Ok(web::Json(CheckoutView {
        checkout_url: session.url,
        session_id: session.id,
    }))
}

/// Cancels your subscription at the end of the current period (you keep
/// the plan until then). Recorded in your billing history.
#[utoipa::path(post, path = "/api/v1/subscription/cancel", tag = "subscription", security(("bearer" = [])),
    responses((status = 200, body = SubscriptionView), (status = 409, description = "no_subscription", body = ErrorBody)))]
pub async fn cancel(
    state: web::Data<AppState>,
    user: CurrentUser,
    ctx: crate::extract::ClientContext,
) -> Result<web::Json<SubscriptionView>, ApiError> {
    let (billing, uid) = (state.billing.clone(), user.0.user.id);
    // A Stripe subscription is cancelled at Stripe first (its webhook confirms).
    let current = {
        let billing = billing.clone();
        actix_web::web::block(move || billing.subscription(uid))
            .await?
            .map_err(store_error)?
    };
    if let (Some(payments), Some(stripe_id)) = (
        state.payments.as_ref(),
        current
            .as_ref()
            .and_then(|s| s.stripe_subscription_id.clone()),
    ) {
        payments
            .cancel_at_period_end(&stripe_id)
            .await
            .map_err(payment_error)?;
    }
    let now = muse_core::Clock::now_ms(&muse_core::SystemClock);
    let sub = actix_web::web::block(move || {
        let Some(mut sub) = billing.subscription(uid)?.filter(|s| {
            s.status != SubscriptionStatus::Canceled && s.plan_id != muse_billing::FREE_PLAN
        }) else {
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
    if let Some(s) = &sub {
        crate::audit::record(
            &state,
            Some(uid),
            muse_auth::audit::SUBSCRIPTION_CHANGED,
            Some(uid.to_string()),
            ctx.0,
            serde_json::json!({"by": "user", "change": "cancel_at_period_end", "plan": s.plan_id}),
        )
        .await;
    }
    sub.map(|s| web::Json(SubscriptionView::from(&s)))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                "no_subscription",
                "you are on the free plan: there is nothing to cancel",
            )
        })
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
#[utoipa::path(get, path = "/api/v1/subscription/billing/history", tag = "subscription", security(("bearer" = [])), params(super::PageQuery),
    responses((status = 200, body = BillingHistory), (status = 401, body = ErrorBody)))]
pub async fn history(
    state: web::Data<AppState>,
    user: CurrentUser,
    query: web::Query<super::PageQuery>,
) -> Result<web::Json<BillingHistory>, ApiError> {
    let (billing, uid) = (state.billing.clone(), user.0.user.id);
    let page = query.request();
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

// ----- Stripe webhook ---------------------------------------------------

#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookAck {
    pub received: bool,
    /// This event id had been processed before; nothing changed.
    pub duplicate: bool,
}

fn bad_event(message: &str) -> ApiError {
    ApiError::bad_request("invalid_event", message.to_string())
}

/// Stripe's events: the `Stripe-Signature` header is verified over the raw
/// body (HMAC-SHA256, every `v1`, 300 s tolerance) before anything is read;
/// each event id is applied once, and an event older than the last one
/// applied to a subscription does not overwrite it. Handles
/// `checkout.session.completed`, `customer.subscription.created|updated|deleted`,
/// `invoice.paid`, `invoice.payment_failed`; others are acknowledged.
#[utoipa::path(post, path = "/api/v1/subscription/webhook", tag = "subscription",
    request_body(content = String, content_type = "application/json", description = "a Stripe event, exactly as Stripe sent it"),
    responses((status = 200, body = WebhookAck), (status = 400, description = "invalid_signature, invalid_event", body = ErrorBody),
        (status = 409, description = "payments_not_configured", body = ErrorBody)))]
pub async fn webhook(
    state: web::Data<AppState>,
    req: actix_web::HttpRequest,
    body: web::Bytes,
) -> Result<web::Json<WebhookAck>, ApiError> {
    let Some(secret) = state
        .config
        .stripe
        .as_ref()
        .and_then(|s| s.webhook_secret.clone())
    else {
        return Err(no_payments(
            "no STRIPE_WEBHOOK_SECRET to verify events with",
        ));
    };
    let header = req
        .headers()
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let now = muse_core::Clock::now_secs(&muse_core::SystemClock);
    if let Err(e) = muse_billing::stripe::verify_signature(&body, header, secret.expose(), now) {
        metrics::counter!("stripe_webhooks_total", "outcome" => "bad_signature").increment(1);
        tracing::warn!(error = %e, "refused a Stripe webhook");
        return Err(ApiError::bad_request("invalid_signature", e.to_string()));
    }
    let event: serde_json::Value =
        serde_json::from_slice(&body).map_err(|_| bad_event("the body is not JSON"))?;
    let id = event["id"]
        .as_str()
        .ok_or_else(|| bad_event("no event id"))?
        .to_string();
    let kind = event["type"]
        .as_str()
        .ok_or_else(|| bad_event("no event type"))?
        .to_string();
    let created = event["created"].as_i64().unwrap_or(now);
    let object = event["data"]["object"].clone();
    let (billing, auth) = (state.billing.clone(), state.auth.clone());
    let outcome = actix_web::web::block(move || {
        // Every change a Stripe event makes is audited, by "stripe".
        let audit = |uid: Uuid, change: &str, description: &str| {
            auth.audit(
                None,
                muse_auth::audit::SUBSCRIPTION_CHANGED,
                Some(&uid.to_string()),
                &muse_auth::RequestContext::default(),
                Some(serde_json::json!({"by": "stripe", "change": change, "description": description, "stripe_event": id})),
            );
        };
        apply_event(&billing, &id, &kind, created, &object, &audit)
    })
    .await?;
    let duplicate = match outcome {
        Ok(d) => d,
        Err(e) => {
            metrics::counter!("stripe_webhooks_total", "outcome" => "error").increment(1);
            // 5xx: Stripe retries later; nothing was marked processed.
            return Err(store_error(e));
        }
    };
    metrics::counter!("stripe_webhooks_total", "outcome" => if duplicate { "duplicate" } else { "applied" })
        .increment(1);
    Ok(web::Json(WebhookAck {
        received: true,
        duplicate,
    }))
}

/// Applies one event; `Ok(true)` when it had been applied before.
fn apply_event(
    billing: &std::sync::Arc<dyn muse_billing::BillingRepository>,
    id: &str,
    kind: &str,
    created: i64,
    o: &serde_json::Value,
    audit: &dyn Fn(Uuid, &str, &str),
) -> Result<bool, muse_billing::BillingError> {
    if billing.stripe_event_seen(id)? {
        return Ok(true);
    }
    let now = muse_core::Clock::now_ms(&muse_core::SystemClock);
    let customer = o["customer"].as_str();
    let user_of = |meta_user: Option<&str>| -> Result<Option<(Uuid, Option<Subscription>)>, muse_billing::BillingError> {
        if let Some(uid) = meta_user.and_then(|u| Uuid::parse_str(u).ok()) {
            return Ok(Some((uid, billing.subscription(uid)?)));
        }
        match customer {
            Some(c) => Ok(billing.subscription_by_customer(c)?.map(|s| (s.user_id, Some(s)))),
            None => Ok(None),
        }
    };
    let history = |uid: Uuid, kind: &str, description: String, amount: Option<i64>| {
        audit(uid, kind, &description);
        billing.record_event(&BillingEvent {
            id: Uuid::now_v7(),
            user_id: uid,
            kind: kind.into(),
            description,
            amount_cents: amount,
            currency: o["currency"].as_str().map(str::to_string),
            external_id: Some(id.to_string()),
            created_at: now,
        })
    };
    match kind {
        "checkout.session.completed" => {
            if let Some((uid, before)) = user_of(o["client_reference_id"].as_str())? {
                let plan_id = o["metadata"]["plan_id"]
                    .as_str()
                    .unwrap_or(muse_billing::FREE_PLAN);
                if billing.plan(plan_id)?.is_some()
                    && before
                        .as_ref()
                        .is_none_or(|s| s.stripe_event_at.is_none_or(|t| t <= created))
                {
                    let from = before.as_ref().map_or("free".into(), |s| s.plan_id.clone());
                    billing.upsert_subscription(&Subscription {
                        user_id: uid,
                        plan_id: plan_id.into(),
                        status: SubscriptionStatus::Active,
                        cancel_at_period_end: false,
                        stripe_customer_id: customer
                            .map(str::to_string)
                            .or(before.as_ref().and_then(|s| s.stripe_customer_id.clone())),
                        stripe_subscription_id: o["subscription"].as_str().map(str::to_string),
                        current_period_end: before.as_ref().and_then(|s| s.current_period_end),
                        updated_at: now,
                        stripe_event_at: Some(created),
                    })?;
                    history(
                        uid,
                        "plan_changed",
                        format!("{from} → {plan_id} (Stripe checkout)"),
                        o["amount_total"].as_i64(),
                    )?;
                }
            }
        }
        "customer.subscription.created"
        | "customer.subscription.updated"
        | "customer.subscription.deleted" => {
            if let Some((uid, before)) = user_of(o["metadata"]["user_id"].as_str())? {
                let newer = before
                    .as_ref()
                    .is_none_or(|s| s.stripe_event_at.is_none_or(|t| t <= created));
                if newer {
                    let price = o["items"]["data"][0]["price"]["id"].as_str();
                    let plan = match price {
                        Some(p) => billing.plan_by_stripe_price(p)?.map(|p| p.id),
                        None => None,
                    }
                    .or_else(|| o["metadata"]["plan_id"].as_str().map(str::to_string))
                    .or_else(|| before.as_ref().map(|s| s.plan_id.clone()))
                    .unwrap_or_else(|| muse_billing::FREE_PLAN.into());
                    let status = if kind.ends_with("deleted") {
                        SubscriptionStatus::Canceled
                    } else {
                        o["status"]
                            .as_str()
                            .and_then(SubscriptionStatus::parse)
                            .unwrap_or(SubscriptionStatus::Active)
                    };
                    let period_end = o["current_period_end"]
                        .as_i64()
                        .or_else(|| o["items"]["data"][0]["current_period_end"].as_i64())
                        .map(|s| s * 1000);
                    billing.upsert_subscription(&Subscription {
                        user_id: uid,
                        plan_id: plan.clone(),
                        status,
                        cancel_at_period_end: o["cancel_at_period_end"].as_bool().unwrap_or(false),
                        stripe_customer_id: customer
                            .map(str::to_string)
                            .or(before.as_ref().and_then(|s| s.stripe_customer_id.clone())),
                        stripe_subscription_id: o["id"].as_str().map(str::to_string),
                        current_period_end: period_end,
                        updated_at: now,
                        stripe_event_at: Some(created),
                    })?;
                    if kind.ends_with("deleted") {
                        history(
                            uid,
                            "subscription_ended",
                            format!("the {plan} subscription ended"),
                            None,
                        )?;
                    }
                }
            }
        }
        "invoice.paid" | "invoice.payment_failed" => {
            if let Some((uid, before)) =
                user_of(o["subscription_details"]["metadata"]["user_id"].as_str())?
            {
                let paid = kind == "invoice.paid";
                let amount = if paid {
                    o["amount_paid"].as_i64()
                } else {
                    o["amount_due"].as_i64()
                };
                let invoice = o["id"].as_str().unwrap_or("an invoice");
                history(
                    uid,
                    if paid {
                        "invoice_paid"
                    } else {
                        "invoice_payment_failed"
                    },
                    if paid {
                        format!("invoice {invoice} paid")
                    } else {
                        format!("payment of invoice {invoice} failed")
                    },
                    amount,
                )?;
                if let Some(sub) = before.filter(|s| s.stripe_event_at.is_none_or(|t| t <= created))
                {
                    let status = if paid {
                        SubscriptionStatus::Active
                    } else {
                        SubscriptionStatus::PastDue
                    };
                    if sub.status != SubscriptionStatus::Canceled && sub.status != status {
                        billing.upsert_subscription(&Subscription {
                            status,
                            updated_at: now,
                            stripe_event_at: Some(created),
                            ..sub
                        })?;
                    }
                }
            }
        }
        _ => {}
    }
    // Marked last: a failure above leaves the event unmarked for Stripe's retry.
    Ok(!billing.mark_stripe_event(id, kind, created, now)?)
}
