//! Plans and subscriptions kept in memory for a short while, so that a
//! model call learns its caller's plan without reading the database.
//! Every write through this repository clears what it could make stale at
//! once; a change made by another process is seen within the TTL.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use uuid::Uuid;

use crate::plans::{
    BillingError, BillingEvent, BillingRepository, Plan, QuotaKind, Reservation, Subscription,
    Usage,
};

type Stamped<T> = (T, i64);

/// A [`BillingRepository`] whose `plan` and `subscription` answers are
/// cached for `ttl_ms`.
pub struct CachedBilling {
    inner: Arc<dyn BillingRepository>,
    ttl_ms: i64,
    clock: Arc<dyn muse_core::Clock>,
    plans: RwLock<HashMap<String, Stamped<Option<Plan>>>>,
    subscriptions: RwLock<HashMap<Uuid, Stamped<Option<Subscription>>>>,
}

/// Most cached subscriptions before the cache starts over.
const MAX_ENTRIES: usize = 100_000;

impl CachedBilling {
    pub fn new(
        inner: Arc<dyn BillingRepository>,
        ttl_ms: i64,
        clock: Arc<dyn muse_core::Clock>,
    ) -> Self {
        Self {
            inner,
            ttl_ms,
            clock,
            plans: RwLock::default(),
            subscriptions: RwLock::default(),
        }
    }

    fn fresh<T: Clone>(&self, entry: Option<&Stamped<T>>) -> Option<T> {
        let (value, at) = entry?;
        (self.clock.now_ms() - at < self.ttl_ms).then(|| value.clone())
    }

    /// The cached plan `id`, without reading storage (`None`: not cached).
    pub fn peek_plan(&self, id: &str) -> Option<Option<Plan>> {
        self.fresh(self.plans.read().ok()?.get(id))
    }

    /// The cached subscription of `user_id`, without reading storage.
    pub fn peek_subscription(&self, user_id: Uuid) -> Option<Option<Subscription>> {
        self.fresh(self.subscriptions.read().ok()?.get(&user_id))
    }

    fn forget_plans(&self) {
        if let Ok(mut p) = self.plans.write() {
            p.clear();
        }
    }

    fn forget_subscription(&self, user_id: Uuid) {
        if let Ok(mut s) = self.subscriptions.write() {
            s.remove(&user_id);
        }
    }
}

impl BillingRepository for CachedBilling {
    fn plans(&self) -> Result<Vec<Plan>, BillingError> {
        self.inner.plans()
    }

    fn plan(&self, id: &str) -> Result<Option<Plan>, BillingError> {
        if self.ttl_ms > 0 {
            if let Some(p) = self.peek_plan(id) {
                return Ok(p);
            }
        }
        let p = self.inner.plan(id)?;
        if self.ttl_ms > 0 {
            if let Ok(mut plans) = self.plans.write() {
                plans.insert(id.to_string(), (p.clone(), self.clock.now_ms()));
            }
        }
        Ok(p)
    }

    fn upsert_plan(&self, plan: &Plan, now: i64) -> Result<(), BillingError> {
        let r = self.inner.upsert_plan(plan, now);
        self.forget_plans();
        r
    }

    fn subscription(&self, user_id: Uuid) -> Result<Option<Subscription>, BillingError> {
        if self.ttl_ms > 0 {
            if let Some(s) = self.peek_subscription(user_id) {
                return Ok(s);
            }
        }
        let s = self.inner.subscription(user_id)?;
        if self.ttl_ms > 0 {
            if let Ok(mut subs) = self.subscriptions.write() {
                if subs.len() >= MAX_ENTRIES {
                    subs.clear();
                }
                subs.insert(user_id, (s.clone(), self.clock.now_ms()));
            }
        }
        Ok(s)
    }

    fn upsert_subscription(&self, sub: &Subscription) -> Result<(), BillingError> {
        let r = self.inner.upsert_subscription(sub);
        self.forget_subscription(sub.user_id);
        r
    }

    fn usage(&self, user_id: Uuid, period_start: i64) -> Result<Usage, BillingError> {
        self.inner.usage(user_id, period_start)
    }

    fn reserve(
        &self,
        user_id: Uuid,
        period_start: i64,
        plan: &Plan,
        tokens: i64,
        cost_usd: f64,
    ) -> Result<Result<(), QuotaKind>, BillingError> {
        self.inner
            .reserve(user_id, period_start, plan, tokens, cost_usd)
    }

    fn record_event(&self, event: &BillingEvent) -> Result<bool, BillingError> {
        self.inner.record_event(event)
    }

    fn stripe_event_seen(&self, id: &str) -> Result<bool, BillingError> {
        self.inner.stripe_event_seen(id)
    }

    fn mark_stripe_event(
        &self,
        id: &str,
        kind: &str,
        created: i64,
        now: i64,
    ) -> Result<bool, BillingError> {
        self.inner.mark_stripe_event(id, kind, created, now)
    }

    fn subscription_by_customer(
        &self,
        customer_id: &str,
    ) -> Result<Option<Subscription>, BillingError> {
        self.inner.subscription_by_customer(customer_id)
    }

    fn plan_by_stripe_price(&self, price_id: &str) -> Result<Option<Plan>, BillingError> {
        self.inner.plan_by_stripe_price(price_id)
    }

    fn events(
        &self,
        user_id: Uuid,
        page: muse_core::PageRequest,
    ) -> Result<muse_core::Page<BillingEvent>, BillingError> {
        self.inner.events(user_id, page)
    }

    fn reconcile(
        &self,
        reservation: &Reservation,
        used_tokens: i64,
        used_cost_usd: f64,
    ) -> Result<(), BillingError> {
        self.inner
            .reconcile(reservation, used_tokens, used_cost_usd)
    }
}
