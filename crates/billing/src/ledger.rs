//! Quota reservations in memory: the usage of each (user, period) is read
//! from storage once, then every reservation is checked and counted under
//! one lock — no database write on the request's critical path, and never
//! more admitted than the quota allows (the same worst-case rule as the
//! database's conditional `UPDATE`). What calls really used reaches
//! storage with their records (group commit).
//!
//! **One process only**: two processes with a ledger each would each admit
//! up to the quota. Deployments with several replicas count in a
//! [`SharedQuota`] (Redis, in `muse-persistence`) or in the database.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use uuid::Uuid;

use crate::plans::{BillingError, Plan, QuotaKind, Reservation, Usage};

/// Usage added to one period's counters on a [`SharedQuota`] (may be
/// negative: an estimate given back).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UsageChange {
    pub user_id: Uuid,
    pub period_start: i64,
    pub usage: Usage,
}

impl UsageChange {
    /// What replaces `r` once its call used `used_tokens` and `used_cost_usd`.
    pub fn settling(r: &Reservation, used_tokens: i64, used_cost_usd: f64) -> Self {
        Self {
            user_id: r.user_id,
            period_start: r.period_start,
            usage: Usage {
                requests: 0,
                tokens: used_tokens - r.tokens,
                cost_usd: used_cost_usd - r.cost_usd,
            },
        }
    }
}

/// Quota counters shared by every replica (Redis in `muse-persistence`):
/// the same rule as [`QuotaLedger`], each reservation one atomic step on
/// the shared store.
#[async_trait]
pub trait SharedQuota: Send + Sync + 'static {
    /// Adds one request, `tokens` and `cost_usd` to the period's counters
    /// if every quota of `plan` still holds afterwards. `Ok(None)`: the
    /// period is not loaded — read its usage from storage,
    /// [`SharedQuota::load`] it, and ask again.
    async fn reserve(
        &self,
        user_id: Uuid,
        period_start: i64,
        plan: &Plan,
        tokens: i64,
        cost_usd: f64,
    ) -> Result<Option<Result<(), QuotaKind>>, BillingError>;

    /// Starts counting a period from `stored` unless another replica did
    /// first (its count is kept). The counters expire after `period_end`.
    async fn load(
        &self,
        user_id: Uuid,
        period_start: i64,
        period_end: i64,
        stored: Usage,
    ) -> Result<(), BillingError>;

    /// Adds each change to its period's counters, in one step for the
    /// whole slice: a reservation replaced by what its call used (tokens
    /// and cost given back or added), or a call that no quota capped,
    /// counted whole. Periods not loaded are left alone: they are loaded
    /// from storage, which every call's record reaches.
    async fn add(&self, changes: &[UsageChange]) -> Result<(), BillingError>;

    /// Forgets a period's counters, so that the next reservation loads
    /// them again from storage (after reservations were counted there
    /// while this store was unreachable).
    async fn forget(&self, user_id: Uuid, period_start: i64) -> Result<(), BillingError>;
}

/// The usage counters of the periods in use.
#[derive(Debug, Default)]
pub struct QuotaLedger {
    counters: Mutex<HashMap<(Uuid, i64), Usage>>,
}

impl QuotaLedger {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `(user_id, period_start)` is loaded (else read its usage from
    /// storage and [`QuotaLedger::load`] it first).
    pub fn is_loaded(&self, user_id: Uuid, period_start: i64) -> bool {
        self.counters
            .lock()
            .map(|c| c.contains_key(&(user_id, period_start)))
            .unwrap_or(false)
    }

    /// Starts counting a period from `stored` (what storage says was used);
    /// a period already loaded keeps its own count (it is newer). Older
    /// periods of every user are dropped.
    pub fn load(&self, user_id: Uuid, period_start: i64, stored: Usage) {
        if let Ok(mut c) = self.counters.lock() {
            c.retain(|(_, p), _| *p >= period_start);
            c.entry((user_id, period_start)).or_insert(stored);
        }
    }

    /// Adds one request, `tokens` and `cost_usd` if every quota of `plan`
    /// still holds afterwards; otherwise changes nothing and says which
    /// quota refused. The period must be loaded (an unloaded one refuses
    /// nothing: it counts from zero).
    pub fn reserve(
        &self,
        user_id: Uuid,
        period_start: i64,
        plan: &Plan,
        tokens: i64,
        cost_usd: f64,
    ) -> Result<Reservation, QuotaKind> {
        let mut c = self
            .counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let u = c.entry((user_id, period_start)).or_default();
        if plan.max_requests.is_some_and(|m| u.requests >= m) {
            return Err(QuotaKind::Requests);
        }
        if plan.max_tokens.is_some_and(|m| u.tokens + tokens > m) {
            return Err(QuotaKind::Tokens);
        }
        if plan.max_cost_usd.is_some_and(|m| u.cost_usd + cost_usd > m) {
            return Err(QuotaKind::Cost);
        }
        u.requests += 1;
        u.tokens += tokens;
        u.cost_usd += cost_usd;
        Ok(Reservation {
            user_id,
            period_start,
            tokens,
            cost_usd,
        })
    }

    /// Replaces a reservation by what its call used.
    pub fn reconcile(&self, r: &Reservation, used_tokens: i64, used_cost_usd: f64) {
        if let Ok(mut c) = self.counters.lock() {
            if let Some(u) = c.get_mut(&(r.user_id, r.period_start)) {
                u.tokens += used_tokens - r.tokens;
                u.cost_usd += used_cost_usd - r.cost_usd;
            }
        }
    }

    /// The usage counted for a period, if loaded.
    pub fn usage(&self, user_id: Uuid, period_start: i64) -> Option<Usage> {
        self.counters
            .lock()
            .ok()
            .and_then(|c| c.get(&(user_id, period_start)).copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn plan(requests: Option<i64>, tokens: Option<i64>) -> Plan {
        Plan {
            id: "free".into(),
            name: "Free".into(),
            price_cents: 0,
            currency: "usd".into(),
            stripe_price_id: None,
            max_requests: requests,
            max_tokens: tokens,
            max_cost_usd: Some(1.0),
            max_batch: 3,
            allowed_models: vec![],
            training_allowed: false,
            max_training_jobs: 0,
            active: true,
        }
    }

    #[test]
    fn exactly_the_quota_is_admitted_under_concurrency() {
        let ledger = Arc::new(QuotaLedger::new());
        let user = Uuid::now_v7();
        ledger.load(
            user,
            0,
            Usage {
                requests: 2,
                tokens: 0,
                cost_usd: 0.0,
            },
        );
        let p = plan(Some(10), None);
        let admitted: usize = (0..100)
            .map(|_| {
                let (l, p) = (ledger.clone(), p.clone());
                std::thread::spawn(move || l.reserve(user, 0, &p, 5, 0.0).is_ok())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap_or(false))
            .filter(|ok| *ok)
            .count();
        assert_eq!(admitted, 8, "10 minus the 2 already used");
        assert_eq!(ledger.usage(user, 0).map(|u| u.requests), Some(10));
    }

    #[test]
    fn tokens_and_cost_are_reserved_then_reconciled() {
        let ledger = QuotaLedger::new();
        let user = Uuid::now_v7();
        ledger.load(user, 0, Usage::default());
        let p = plan(None, Some(100));
        let r = ledger.reserve(user, 0, &p, 80, 0.5).expect("within");
        assert_eq!(ledger.reserve(user, 0, &p, 30, 0.0), Err(QuotaKind::Tokens));
        ledger.reconcile(&r, 10, 0.1);
        assert!(
            ledger.reserve(user, 0, &p, 30, 0.0).is_ok(),
            "the estimate was given back"
        );
        assert_eq!(ledger.reserve(user, 0, &p, 1, 0.95), Err(QuotaKind::Cost));
        // A new period drops the old ones; a loaded period keeps its count.
        ledger.load(user, 1, Usage::default());
        assert!(!ledger.is_loaded(user, 0));
        ledger.load(
            user,
            1,
            Usage {
                requests: 99,
                tokens: 0,
                cost_usd: 0.0,
            },
        );
        assert_eq!(ledger.usage(user, 1).map(|u| u.requests), Some(0));
    }
}
