//! Admission of one call: the model must be visible to the caller and in
//! their plan, and the call's worst case is reserved against the plan's
//! quotas — in this process ([`QuotaCounting::Memory`]), on a store every
//! replica shares ([`QuotaCounting::Shared`], Redis) or in the database
//! ([`QuotaCounting::Database`]). When everything it needs is in memory
//! (the caller's plan cached, the period's usage counted here) the
//! decision takes no database read and no blocking-pool hop.

use std::collections::HashSet;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use muse_billing::{
    month_of, plan_in_force, BillingError, Plan, QuotaKind, QuotaLedger, Reservation, SharedQuota,
    UsageChange,
};
use muse_inference::GenerateRequest;
use uuid::Uuid;

use crate::Gateway;

/// Tokens assumed for a call that sets no `max_tokens`.
pub const DEFAULT_RESERVED_COMPLETION_TOKENS: u32 = 1_024;

/// Where reservations are counted.
pub enum QuotaCounting {
    /// A conditional `UPDATE` per call: exact across replicas.
    Database,
    /// In this process: exact for one server process only.
    Memory(QuotaLedger),
    /// On a store shared by every replica (Redis): exact across replicas,
    /// no database write on the call's path. While the store cannot be
    /// reached, calls are reserved in the database instead (exact too,
    /// slower); the periods reserved there are reloaded from the database
    /// once the store is back.
    Shared(Arc<dyn SharedQuota>),
}

/// How a held reservation was counted (and so how it is reconciled).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    Database,
    Memory,
    Shared,
    /// Not reserved: no quota of the caller's plan caps it. The call is
    /// counted once it ends (in the database with its record, and on the
    /// shared store when there is one).
    Uncapped,
}

/// A reservation held by a call until it is recorded.
#[derive(Debug, Clone, Copy)]
pub struct Held {
    pub reservation: Reservation,
    pub counted: Counted,
}

/// Why a call was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    /// Not in the registry, or somebody else's trained model.
    #[error("{0} is not in the model registry")]
    ModelNotFound(String),
    #[error("the {} plan does not include this model", .plan.name)]
    NotInPlan { plan: Box<Plan> },
    /// The plan has a cost quota and the model has no price.
    #[error("the {} plan has a cost quota and {model} has no known price", .plan.name)]
    Unpriced { plan: Box<Plan>, model: String },
    #[error("a quota of the {} plan is used up", .plan.name)]
    QuotaExceeded {
        plan: Box<Plan>,
        kind: QuotaKind,
        /// When the period ends (ms since the epoch).
        resets_at_ms: i64,
    },
    /// Plans or usage could not be read.
    #[error(transparent)]
    Store(#[from] BillingError),
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

/// How long the shared store is left alone after it failed (ms): calls
/// go straight to the database meanwhile instead of each waiting for the
/// store's time limit.
const SHARED_RETRY_AFTER_MS: i64 = 1_000;

/// Periods reserved in the database while the shared store was down, and
/// until when it is taken as down.
#[derive(Default)]
pub(crate) struct Fallbacks {
    periods: Mutex<HashSet<(Uuid, i64)>>,
    down_until_ms: AtomicI64,
}

impl Fallbacks {
    fn mark(&self, user_id: Uuid, period_start: i64) {
        if let Ok(mut s) = self.periods.lock() {
            s.insert((user_id, period_start));
        }
    }

    fn contains(&self, user_id: Uuid, period_start: i64) -> bool {
        self.periods
            .lock()
            .map(|s| s.contains(&(user_id, period_start)))
            .unwrap_or(false)
    }

    fn clear(&self, user_id: Uuid, period_start: i64) {
        if let Ok(mut s) = self.periods.lock() {
            s.remove(&(user_id, period_start));
        }
    }

    fn store_down(&self, now_ms: i64) -> bool {
        now_ms < self.down_until_ms.load(Ordering::Relaxed)
    }

    fn store_failed(&self, now_ms: i64) {
        self.down_until_ms
            .store(now_ms + SHARED_RETRY_AFTER_MS, Ordering::Relaxed);
    }
}

/// Runs `f` on the blocking pool (storage reads and writes).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BillingError> + Send + 'static,
) -> Result<T, BillingError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BillingError::Unavailable(format!("storage task failed: {e}")))?
}

impl Gateway {
    /// Reserves the worst case of `request` on `key` for `user_id`.
    pub async fn reserve(
        &self,
        user_id: Uuid,
        key: &str,
        request: &GenerateRequest,
    ) -> Result<Held, AdmitError> {
        let g = &self.inner;
        if !(g.visible)(key, user_id) {
            return Err(AdmitError::ModelNotFound(key.to_string()));
        }
        let prompt_tokens = estimated_prompt_tokens(request);
        let completion = request
            .max_tokens
            .unwrap_or(DEFAULT_RESERVED_COMPLETION_TOKENS);
        let usage = muse_inference::Usage {
            prompt_tokens,
            completion_tokens: completion,
        };
        // A model with no price cannot be held to a cost quota: it is
        // counted at the unpriced price, or refused on plans that have one.
        let estimate = self.cost_of(key, &usage);
        let unpriced = estimate.is_none() && self.is_vendor_model(key);
        let cost = estimate.unwrap_or(0.0);
        let tokens = i64::from(prompt_tokens) + i64::from(completion);
        let now = muse_core::Clock::now_ms(&muse_core::SystemClock);
        let (period_start, period_end) = month_of(now);
        let check = |plan: Plan| -> Result<Plan, AdmitError> {
            if !plan.allows_model(key) {
                return Err(AdmitError::NotInPlan {
                    plan: Box::new(plan),
                });
            }
            if unpriced && plan.max_cost_usd.is_some() {
                return Err(AdmitError::Unpriced {
                    plan: Box::new(plan),
                    model: key.to_string(),
                });
            }
            Ok(plan)
        };
        let refused = |plan: Plan, kind: QuotaKind| {
            let kind_name = match kind {
                QuotaKind::Requests => "requests",
                QuotaKind::Tokens => "tokens",
                QuotaKind::Cost => "cost",
            };
            metrics::counter!("quota_denials_total", "quota" => kind_name, "plan" => plan.id.clone())
                .increment(1);
            AdmitError::QuotaExceeded {
                plan: Box::new(plan),
                kind,
                resets_at_ms: period_end,
            }
        };
        let held = |counted| Held {
            reservation: Reservation {
                user_id,
                period_start,
                tokens,
                cost_usd: cost,
            },
            counted,
        };
        let cached = g.plans.peek_plan_in_force(user_id, now);
        match &g.quota {
            QuotaCounting::Memory(ledger) => {
                let plan = match cached.filter(|_| ledger.is_loaded(user_id, period_start)) {
                    Some(plan) => plan,
                    None => {
                        let (billing, inner) = (g.billing.clone(), self.inner.clone());
                        blocking(move || {
                            let (plan, _) = plan_in_force(&*billing, user_id, now)?;
                            if let QuotaCounting::Memory(ledger) = &inner.quota {
                                if !ledger.is_loaded(user_id, period_start) {
                                    let stored = billing.usage(user_id, period_start)?;
                                    ledger.load(user_id, period_start, stored);
                                }
                            }
                            Ok(plan)
                        })
                        .await?
                    }
                };
                let plan = check(plan)?;
                match ledger.reserve(user_id, period_start, &plan, tokens, cost) {
                    Ok(_) => Ok(held(Counted::Memory)),
                    Err(kind) => Err(refused(plan, kind)),
                }
            }
            QuotaCounting::Database => {
                let billing = g.billing.clone();
                let plan = match cached {
                    Some(plan) => plan,
                    None => blocking(move || Ok(plan_in_force(&*billing, user_id, now)?.0)).await?,
                };
                let plan = check(plan)?;
                if plan.is_uncapped() {
                    return Ok(held(Counted::Uncapped));
                }
                self.reserve_in_database(&plan, user_id, period_start, tokens, cost)
                    .await?
                    .map_err(|kind| refused(plan, kind))?;
                Ok(held(Counted::Database))
            }
            QuotaCounting::Shared(shared) => {
                let plan = match cached {
                    Some(plan) => plan,
                    None => {
                        let billing = g.billing.clone();
                        blocking(move || Ok(plan_in_force(&*billing, user_id, now)?.0)).await?
                    }
                };
                let plan = check(plan)?;
                if plan.is_uncapped() {
                    // Nothing to refuse: no round trip to the store on
                    // the call's path (it is counted there when it ends).
                    return Ok(held(Counted::Uncapped));
                }
                let shared_outcome = if g.fallbacks.store_down(now) {
                    Err(BillingError::Unavailable(
                        "the quota store failed less than a second ago".into(),
                    ))
                } else {
                    self.reserve_shared(
                        &**shared,
                        &plan,
                        user_id,
                        period_start,
                        period_end,
                        tokens,
                        cost,
                    )
                    .await
                };
                match shared_outcome {
                    Ok(Ok(())) => Ok(held(Counted::Shared)),
                    Ok(Err(kind)) => Err(refused(plan, kind)),
                    Err(e) => {
                        // The shared store is down: the database counts
                        // (exactly, across replicas) until it is back.
                        metrics::counter!("quota_store_fallbacks_total").increment(1);
                        if !g.fallbacks.store_down(now) {
                            g.fallbacks.store_failed(now);
                            tracing::warn!(error = %e, "quota store unreachable; reserving in the database");
                        }
                        g.fallbacks.mark(user_id, period_start);
                        self.reserve_in_database(&plan, user_id, period_start, tokens, cost)
                            .await?
                            .map_err(|kind| refused(plan, kind))?;
                        Ok(held(Counted::Database))
                    }
                }
            }
        }
    }

    async fn reserve_in_database(
        &self,
        plan: &Plan,
        user_id: Uuid,
        period_start: i64,
        tokens: i64,
        cost: f64,
    ) -> Result<Result<(), QuotaKind>, BillingError> {
        let (billing, plan) = (self.inner.billing.clone(), plan.clone());
        blocking(move || billing.reserve(user_id, period_start, &plan, tokens, cost)).await
    }

    /// One atomic reservation on the shared store, loading the period from
    /// the database first when the store does not hold it.
    #[allow(clippy::too_many_arguments)]
    async fn reserve_shared(
        &self,
        shared: &dyn SharedQuota,
        plan: &Plan,
        user_id: Uuid,
        period_start: i64,
        period_end: i64,
        tokens: i64,
        cost: f64,
    ) -> Result<Result<(), QuotaKind>, BillingError> {
        let fallbacks = &self.inner.fallbacks;
        if fallbacks.contains(user_id, period_start) {
            // Reserved in the database while the store was down: its
            // counters are stale; reload them from the database.
            shared.forget(user_id, period_start).await?;
            fallbacks.clear(user_id, period_start);
        }
        for _ in 0..3 {
            if let Some(decision) = shared
                .reserve(user_id, period_start, plan, tokens, cost)
                .await?
            {
                return Ok(decision);
            }
            let billing = self.inner.billing.clone();
            let stored = blocking(move || billing.usage(user_id, period_start)).await?;
            shared
                .load(user_id, period_start, period_end, stored)
                .await?;
        }
        Err(BillingError::Unavailable(
            "the quota store keeps dropping the period's counters".into(),
        ))
    }

    /// Replaces a held reservation by what its call used, where it was
    /// counted in memory or on the shared store (a database reservation is
    /// corrected with the call's record). Returns the delta the usage table
    /// gets with the record.
    pub(crate) fn settle(
        &self,
        held: Held,
        used_tokens: i64,
        used_cost: f64,
    ) -> muse_prompts::UsageDelta {
        let r = held.reservation;
        match (&self.inner.quota, held.counted) {
            (QuotaCounting::Memory(ledger), Counted::Memory) => {
                ledger.reconcile(&r, used_tokens, used_cost);
            }
            (QuotaCounting::Shared(_), Counted::Shared) => {
                if let Some(tally) = &self.inner.tally {
                    tally.push(UsageChange::settling(&r, used_tokens, used_cost));
                }
            }
            (QuotaCounting::Shared(_), Counted::Uncapped) => {
                if let Some(tally) = &self.inner.tally {
                    tally.push(UsageChange {
                        user_id: r.user_id,
                        period_start: r.period_start,
                        usage: muse_billing::Usage {
                            requests: 1,
                            tokens: used_tokens,
                            cost_usd: used_cost,
                        },
                    });
                }
            }
            _ => {}
        }
        match held.counted {
            // The database holds the estimate: add the difference.
            Counted::Database => muse_prompts::UsageDelta {
                user_id: r.user_id,
                period_start: r.period_start,
                requests: 0,
                tokens: used_tokens - r.tokens,
                cost_usd: used_cost - r.cost_usd,
            },
            // Not counted there yet: the whole call.
            Counted::Memory | Counted::Shared | Counted::Uncapped => muse_prompts::UsageDelta {
                user_id: r.user_id,
                period_start: r.period_start,
                requests: 1,
                tokens: used_tokens,
                cost_usd: used_cost,
            },
        }
    }
}
