//! Plans and quotas in the server: which plan a user is on, and the
//! reservation a call makes before it starts (see `muse_billing::plans`).

use actix_web::http::StatusCode;
use muse_billing::{
    month_of, BillingRepository, Plan, QuotaKind, Reservation, Subscription, SubscriptionStatus,
    FREE_PLAN,
};
use muse_inference::GenerateRequest;
use uuid::Uuid;

use crate::error::ApiError;
use crate::state::AppState;

/// Tokens assumed for a call that sets no `max_tokens`.
pub const DEFAULT_RESERVED_COMPLETION_TOKENS: u32 = 1_024;

pub fn store_error(e: muse_billing::BillingError) -> ApiError {
    match e {
        muse_billing::BillingError::Unavailable(m) => ApiError::unavailable("billing store", m),
        muse_billing::BillingError::UnknownPlan(p) => {
            ApiError::not_found(format!("no such plan: {p}"))
        }
        other => ApiError::internal("billing store", other),
    }
}

/// The plan in force for a user now: their subscription's while it is
/// active or past due (and not cancelled past its period end), else free.
pub fn plan_of(
    billing: &dyn BillingRepository,
    user_id: Uuid,
    now_ms: i64,
) -> Result<(Plan, Option<Subscription>), muse_billing::BillingError> {
    let sub = billing.subscription(user_id)?;
    let id = plan_id_in_force(sub.as_ref(), now_ms);
    let plan = match billing.plan(id)? {
        Some(p) => p,
        None => billing
            .plan(FREE_PLAN)?
            .ok_or_else(|| muse_billing::BillingError::UnknownPlan(FREE_PLAN.into()))?,
    };
    Ok((plan, sub))
}

/// The plan a subscription gives now: its own while it is active or past
/// due (and not cancelled past its period end), else free.
fn plan_id_in_force(sub: Option<&Subscription>, now_ms: i64) -> &str {
    sub.filter(|s| {
        s.status != SubscriptionStatus::Canceled
            && !(s.cancel_at_period_end && s.current_period_end.is_some_and(|end| now_ms >= end))
    })
    .map_or(FREE_PLAN, |s| s.plan_id.as_str())
}

/// The plan in force for a user, from the cache alone (`None`: something
/// is not cached). The same rule as [`plan_of`].
fn cached_plan_of(cache: &muse_billing::CachedBilling, user_id: Uuid, now_ms: i64) -> Option<Plan> {
    let sub = cache.peek_subscription(user_id)?;
    match cache.peek_plan(plan_id_in_force(sub.as_ref(), now_ms))? {
        Some(p) => Some(p),
        None => cache.peek_plan(FREE_PLAN)?,
    }
}

/// A reservation's outcome: admitted, or refused with the plan and why
/// (`None`: the model is not in the plan).
type Decision = Result<(), (Plan, Option<Refusal>)>;

/// Why a reservation was refused (besides the model not being in the plan).
enum Refusal {
    Quota(QuotaKind),
    /// The plan has a cost quota and the model has no price.
    Unpriced,
}

/// A request's prompt tokens, estimated before any tokenizer sees it: 4
/// characters a token (the quota's worst case, and what a call cut short
/// is charged for its prompt).
pub fn estimated_prompt_tokens(request: &GenerateRequest) -> u32 {
    let chars: usize = request
        .messages
        .iter()
        .map(|m| m.content.len())
        .sum::<usize>()
        + request.prompt.as_ref().map_or(0, String::len);
    u32::try_from(chars / 4 + 1).unwrap_or(u32::MAX)
}

/// Reserves the worst case of `request` on `key` against the user's quota.
pub async fn reserve(
    state: &AppState,
    user_id: Uuid,
    key: &str,
    request: &GenerateRequest,
) -> Result<Reservation, ApiError> {
    if !state.training.visible(key, user_id) {
        // Somebody else's trained model: as if it did not exist.
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!("{key} is not in the model registry"),
        ));
    }
    let prompt_tokens = estimated_prompt_tokens(request);
    let completion = request
        .max_tokens
        .unwrap_or(DEFAULT_RESERVED_COMPLETION_TOKENS);
    let usage = muse_inference::Usage {
        prompt_tokens,
        completion_tokens: completion,
    };
    // A model with no price cannot be held to a cost quota: it is counted
    // at UNPRICED_MODEL_PRICE, or refused on plans that have one.
    let estimate = state.cost_of(key, &usage);
    let unpriced = estimate.is_none() && state.is_vendor_model(key);
    let cost = estimate.unwrap_or(0.0);
    let tokens = i64::from(prompt_tokens) + i64::from(completion);
    let model = key;
    let key = key.to_string();
    let now = muse_core::Clock::now_ms(&muse_core::SystemClock);
    let (period_start, period_end) = month_of(now);
    let ledger = state.quota_ledger.clone();
    // The decision once the plan is known; storage is read only for an
    // unloaded period or the database store.
    let decide = move |plan: Plan,
                       billing: &dyn BillingRepository|
          -> Result<Decision, muse_billing::BillingError> {
        if !plan.allows_model(&key) {
            return Ok(Err((plan, None)));
        }
        if unpriced && plan.max_cost_usd.is_some() {
            return Ok(Err((plan, Some(Refusal::Unpriced))));
        }
        let r = match &ledger {
            // In memory: the period's usage is read once, then counted here.
            Some(ledger) => {
                if !ledger.is_loaded(user_id, period_start) {
                    ledger.load(user_id, period_start, billing.usage(user_id, period_start)?);
                }
                ledger
                    .reserve(user_id, period_start, &plan, tokens, cost)
                    .map(|_| ())
            }
            None => billing.reserve(user_id, period_start, &plan, tokens, cost)?,
        };
        Ok(r.map_err(|kind| (plan, Some(Refusal::Quota(kind)))))
    };
    // Everything known in memory (the caller's plan cached, the period's
    // usage counted here): decided on this thread with that plan, no
    // database, no blocking-pool hop. Otherwise read what is missing on
    // the pool.
    let cached = cached_plan_of(&state.billing_cache, user_id, now).filter(|_| {
        state
            .quota_ledger
            .as_ref()
            .is_some_and(|l| l.is_loaded(user_id, period_start))
    });
    let outcome = match cached {
        Some(plan) => decide(plan, &*state.billing_cache),
        None => {
            let billing = state.billing.clone();
            actix_web::web::block(move || {
                let (plan, _) = plan_of(&*billing, user_id, now)?;
                decide(plan, &*billing)
            })
            .await?
        }
    }
    .map_err(store_error)?;
    match outcome {
        Ok(()) => Ok(Reservation {
            user_id,
            period_start,
            tokens,
            cost_usd: cost,
        }),
        Err((plan, None)) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "model_not_in_plan",
            format!("the {} plan does not include this model", plan.name),
        )
        .with_details(serde_json::json!({"plan": plan.id, "allowed_models": plan.allowed_models}))),
        Err((plan, Some(Refusal::Unpriced))) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "model_unpriced",
            format!(
                "the {} plan has a cost quota and {model} has no known price: an administrator sets one in MODEL_PRICES_FILE, or UNPRICED_MODEL_PRICE",
                plan.name
            ),
        )
        .with_details(serde_json::json!({"plan": plan.id, "model": model}))),
        Err((plan, Some(Refusal::Quota(kind)))) => {
            let kind_name = match kind {
                QuotaKind::Requests => "requests",
                QuotaKind::Tokens => "tokens",
                QuotaKind::Cost => "cost",
            };
            metrics::counter!("quota_denials_total", "quota" => kind_name, "plan" => plan.id.clone())
                .increment(1);
            let retry = u64::try_from((period_end - now + 999) / 1000)
                .unwrap_or(0)
                .max(1);
            Err(ApiError {
                retry_after: Some(retry),
                ..ApiError::new(
                    StatusCode::PAYMENT_REQUIRED,
                    "quota_exceeded",
                    format!(
                        "the {kind_name} quota of the {} plan is used up until {}; upgrade or wait",
                        plan.name,
                        crate::routes::rfc3339(period_end)
                    ),
                )
                .with_details(serde_json::json!({
                    "quota": kind_name, "plan": plan.id, "resets_at": crate::routes::rfc3339(period_end),
                    "limits": {"requests": plan.max_requests, "tokens": plan.max_tokens, "cost_usd": plan.max_cost_usd},
                }))
            })
        }
    }
}
