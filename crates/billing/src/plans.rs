//! Plans, subscriptions and usage quotas.
//!
//! A call is admitted only after it has **reserved** its worst case in the
//! user's usage counter for the period (one request, the tokens it may use,
//! their cost), in one conditional update that fails when the quota would
//! be exceeded. When the call ends the reservation is **reconciled** with
//! what it really used. So however many calls run at once, the counter can
//! only pass the quota by what estimates missed — the prompt tokens of the
//! calls that were running, at most one request's worth each (documented
//! in docs/billing.md).

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The plan of users without a subscription.
pub const FREE_PLAN: &str = "free";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// `free`, `pro`, `team`, or an administrator's own.
    pub id: String,
    pub name: String,
    /// Per period, in the smallest unit of `currency`.
    pub price_cents: i64,
    pub currency: String,
    /// The Stripe Price this plan is sold as.
    pub stripe_price_id: Option<String>,
    /// Quotas per period; `None` is unlimited.
    pub max_requests: Option<i64>,
    pub max_tokens: Option<i64>,
    pub max_cost_usd: Option<f64>,
    /// Most ideas per batch request.
    pub max_batch: i32,
    /// Registry keys or `provider/*`; empty allows every model.
    pub allowed_models: Vec<String>,
    pub training_allowed: bool,
    /// Unfinished training jobs a user may have at once.
    pub max_training_jobs: i32,
    pub active: bool,
}

impl Plan {
    /// Whether no quota caps the plan's usage (requests, tokens and cost
    /// unlimited): its calls need no reservation, only counting.
    pub fn is_uncapped(&self) -> bool {
        self.max_requests.is_none() && self.max_tokens.is_none() && self.max_cost_usd.is_none()
    }

    /// Whether the plan may call the model `key` (`provider/model`).
    pub fn allows_model(&self, key: &str) -> bool {
        if self.allowed_models.is_empty() {
            return true;
        }
        let provider = key.split_once('/').map_or(key, |(p, _)| p);
        self.allowed_models
            .iter()
            .any(|m| m == key || m.strip_suffix("/*") == Some(provider))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscriptionStatus {
    Active,
    PastDue,
    Canceled,
}

impl SubscriptionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SubscriptionStatus::Active => "active",
            SubscriptionStatus::PastDue => "past_due",
            SubscriptionStatus::Canceled => "canceled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" | "trialing" => Some(Self::Active),
            "past_due" | "unpaid" | "incomplete" => Some(Self::PastDue),
            "canceled" | "incomplete_expired" => Some(Self::Canceled),
            _ => None,
        }
    }
}

/// A user's subscription. Users without one are on [`FREE_PLAN`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Subscription {
    pub user_id: Uuid,
    pub plan_id: String,
    pub status: SubscriptionStatus,
    /// Ends at the end of the current period instead of renewing.
    pub cancel_at_period_end: bool,
    pub stripe_customer_id: Option<String>,
    pub stripe_subscription_id: Option<String>,
    /// Milliseconds since the epoch.
    pub current_period_end: Option<i64>,
    pub updated_at: i64,
    /// The `created` time (s) of the last Stripe event applied, so that an
    /// older event delivered late never overwrites a newer state.
    pub stripe_event_at: Option<i64>,
}

/// The user's usage in one period.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Usage {
    pub requests: i64,
    pub tokens: i64,
    pub cost_usd: f64,
}

/// A worst case held against the quota until the call ends.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Reservation {
    pub user_id: Uuid,
    /// The period it counts in (ms since the epoch of its start).
    pub period_start: i64,
    pub tokens: i64,
    pub cost_usd: f64,
}

/// Which quota refused a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaKind {
    Requests,
    Tokens,
    Cost,
}

#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    #[error("the {kind:?} quota of the {plan} plan is used up for this period")]
    QuotaExceeded {
        plan: String,
        kind: QuotaKind,
        /// When the period ends (ms since the epoch).
        resets_at: i64,
    },
    #[error("the {plan} plan does not include the model {model}")]
    ModelNotInPlan { plan: String, model: String },
    #[error("no such plan: {0}")]
    UnknownPlan(String),
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Other(String),
}

/// The plan a subscription gives now: its own while it is active or past
/// due (and not cancelled past its period end), else free.
pub fn plan_id_in_force(sub: Option<&Subscription>, now_ms: i64) -> &str {
    sub.filter(|s| {
        s.status != SubscriptionStatus::Canceled
            && !(s.cancel_at_period_end && s.current_period_end.is_some_and(|end| now_ms >= end))
    })
    .map_or(FREE_PLAN, |s| s.plan_id.as_str())
}

/// The plan in force for a user now ([`plan_id_in_force`]; a plan that no
/// longer exists falls back to free), with their subscription.
pub fn plan_in_force(
    billing: &dyn BillingRepository,
    user_id: Uuid,
    now_ms: i64,
) -> Result<(Plan, Option<Subscription>), BillingError> {
    let sub = billing.subscription(user_id)?;
    let id = plan_id_in_force(sub.as_ref(), now_ms);
    let plan = match billing.plan(id)? {
        Some(p) => p,
        None => billing
            .plan(FREE_PLAN)?
            .ok_or_else(|| BillingError::UnknownPlan(FREE_PLAN.into()))?,
    };
    Ok((plan, sub))
}

/// The calendar month (UTC) containing `now_ms`: `(start, end)` in ms.
pub fn month_of(now_ms: i64) -> (i64, i64) {
    let days = now_ms.div_euclid(86_400_000);
    let (y, m, _) = civil_from_days(days);
    let start = days_from_civil(y, m, 1) * 86_400_000;
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    (start, days_from_civil(ny, nm, 1) * 86_400_000)
}

// Howard Hinnant's civil-date algorithms (proleptic Gregorian, UTC).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// One line of a user's billing history: a plan change, an invoice paid or
/// failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BillingEvent {
    pub id: Uuid,
    pub user_id: Uuid,
    /// `plan_changed`, `cancellation_requested`, `invoice_paid`, `invoice_payment_failed`.
    pub kind: String,
    pub description: String,
    pub amount_cents: Option<i64>,
    pub currency: Option<String>,
    /// The payment provider's id (an invoice), when there is one.
    pub external_id: Option<String>,
    pub created_at: i64,
}

/// Storage of plans, subscriptions and usage. Blocking.
pub trait BillingRepository: Send + Sync + 'static {
    fn plans(&self) -> Result<Vec<Plan>, BillingError>;
    fn plan(&self, id: &str) -> Result<Option<Plan>, BillingError>;
    /// Creates or replaces a plan.
    fn upsert_plan(&self, plan: &Plan, now: i64) -> Result<(), BillingError>;
    fn subscription(&self, user_id: Uuid) -> Result<Option<Subscription>, BillingError>;
    fn upsert_subscription(&self, sub: &Subscription) -> Result<(), BillingError>;
    fn usage(&self, user_id: Uuid, period_start: i64) -> Result<Usage, BillingError>;
    /// Atomically adds one request, `tokens` and `cost` to the period's
    /// counter if the result stays within `plan`'s quotas; otherwise
    /// changes nothing and says which quota refused.
    fn reserve(
        &self,
        user_id: Uuid,
        period_start: i64,
        plan: &Plan,
        tokens: i64,
        cost_usd: f64,
    ) -> Result<Result<(), QuotaKind>, BillingError>;
    /// Adds a history line; one with an `external_id` already recorded is
    /// ignored (`Ok(false)`).
    fn record_event(&self, event: &BillingEvent) -> Result<bool, BillingError>;
    /// Whether a Stripe event id was already processed.
    fn stripe_event_seen(&self, id: &str) -> Result<bool, BillingError>;
    /// Marks a Stripe event processed (`Ok(false)` if it already was).
    fn mark_stripe_event(
        &self,
        id: &str,
        kind: &str,
        created: i64,
        now: i64,
    ) -> Result<bool, BillingError>;
    fn subscription_by_customer(
        &self,
        customer_id: &str,
    ) -> Result<Option<Subscription>, BillingError>;
    fn plan_by_stripe_price(&self, price_id: &str) -> Result<Option<Plan>, BillingError>;
    /// The user's billing history, newest first.
    fn events(
        &self,
        user_id: Uuid,
        page: muse_core::PageRequest,
    ) -> Result<muse_core::Page<BillingEvent>, BillingError>;
    /// Replaces a reservation by what the call really used.
    fn reconcile(
        &self,
        reservation: &Reservation,
        used_tokens: i64,
        used_cost_usd: f64,
    ) -> Result<(), BillingError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_are_calendar_months_in_utc() {
        // 2026-11-23T06:00:00Z
        let (s, e) = month_of(1_795_413_600_000);
        assert_eq!(s, 1_793_491_200_000); // 2026-11-01
        assert_eq!(e, 1_796_083_200_000); // 2026-12-01
        let (s, e) = month_of(1_798_675_200_000); // 2026-12-31
        assert_eq!((s, e), (1_796_083_200_000, 1_798_761_600_000)); // → 2027-01-01
    }

    #[test]
    fn model_allow_lists() {
        let mut p = Plan {
            id: "free".into(),
            name: "Free".into(),
            price_cents: 0,
            currency: "usd".into(),
            stripe_price_id: None,
            max_requests: Some(10),
            max_tokens: None,
            max_cost_usd: None,
            max_batch: 3,
            allowed_models: vec![],
            training_allowed: false,
            max_training_jobs: 0,
            active: true,
        };
        assert!(p.allows_model("openai/gpt-4o"));
        p.allowed_models = vec!["local/*".into(), "openai/gpt-4o-mini".into()];
        assert!(p.allows_model("local/org/tiny"));
        assert!(p.allows_model("openai/gpt-4o-mini"));
        assert!(!p.allows_model("openai/gpt-4o"));
    }
}
