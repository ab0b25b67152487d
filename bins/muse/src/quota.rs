//! Plans and quotas in the server: the HTTP answers for a call the gateway
//! did not admit (`muse_gateway::AdmitError`), and the plan a user is on
//! (see `muse_billing::plans`).

use actix_web::http::StatusCode;
use muse_billing::QuotaKind;
use muse_gateway::AdmitError;

use crate::error::ApiError;

pub use muse_billing::plan_in_force as plan_of;

pub fn store_error(e: muse_billing::BillingError) -> ApiError {
    match e {
        muse_billing::BillingError::Unavailable(m) => ApiError::unavailable("billing store", m),
        muse_billing::BillingError::UnknownPlan(p) => {
            ApiError::not_found(format!("no such plan: {p}"))
        }
        other => ApiError::internal("billing store", other),
    }
}

impl From<AdmitError> for ApiError {
    fn from(e: AdmitError) -> Self {
        match e {
            AdmitError::ModelNotFound(key) => ApiError::new(
                StatusCode::NOT_FOUND,
                "model_not_found",
                format!("{key} is not in the model registry"),
            ),
            AdmitError::NotInPlan { plan } => ApiError::new(
                StatusCode::FORBIDDEN,
                "model_not_in_plan",
                format!("the {} plan does not include this model", plan.name),
            )
            .with_details(serde_json::json!({"plan": plan.id, "allowed_models": plan.allowed_models})),
            AdmitError::Unpriced { plan, model } => ApiError::new(
                StatusCode::FORBIDDEN,
                "model_unpriced",
                format!(
                    "the {} plan has a cost quota and {model} has no known price: an administrator sets one in MODEL_PRICES_FILE, or UNPRICED_MODEL_PRICE",
                    plan.name
                ),
            )
            .with_details(serde_json::json!({"plan": plan.id, "model": model})),
            AdmitError::QuotaExceeded {
                plan,
                kind,
                resets_at_ms,
            } => {
                let kind_name = match kind {
                    QuotaKind::Requests => "requests",
                    QuotaKind::Tokens => "tokens",
                    QuotaKind::Cost => "cost",
                };
                let now = muse_core::Clock::now_ms(&muse_core::SystemClock);
                let retry = u64::try_from((resets_at_ms - now + 999) / 1000)
                    .unwrap_or(0)
                    .max(1);
                let resets_at = crate::routes::rfc3339(resets_at_ms);
                ApiError {
                    retry_after: Some(retry),
                    ..ApiError::new(
                        StatusCode::PAYMENT_REQUIRED,
                        "quota_exceeded",
                        format!(
                            "the {kind_name} quota of the {} plan is used up until {resets_at}; upgrade or wait",
                            plan.name,
                        ),
                    )
                    .with_details(serde_json::json!({
                        "quota": kind_name, "plan": plan.id, "resets_at": resets_at,
                        "limits": {"requests": plan.max_requests, "tokens": plan.max_tokens, "cost_usd": plan.max_cost_usd},
                    }))
                }
            }
            AdmitError::Store(e) => store_error(e),
        }
    }
}
