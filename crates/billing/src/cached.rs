//! Plans and subscriptions kept in memory for a short while, so that a
//! model call learns its caller's plan without reading the database.
//! Every write through this repository clears what it could make stale at
//! once; a change made by another process is seen within the TTL, or at
//! once when it is relayed ([`CachedBilling::on_change`],
//! [`CachedBilling::forget`]).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use uuid::Uuid;

use crate::plans::{
    BillingError, BillingEvent, BillingRepository, Plan, QuotaKind, Reservation, Subscription,
    Usage,
};

type Stamped<T> = (T, i64);

/// What a write made stale: told to [`CachedBilling::on_change`]'s hook,
/// and applied from elsewhere with [`CachedBilling::forget`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BillingChange {
    /// A plan was written.
    Plans,
    /// A user's subscription was written.
    Subscription(Uuid),
}

impl BillingChange {
    /// `plans` or `subscription:<uuid>`.
    pub fn to_payload(&self) -> String {
        match self {
            BillingChange::Plans => "plans".to_string(),
            BillingChange::Subscription(id) => format!("subscription:{id}"),
        }
    }

    pub fn from_payload(payload: &str) -> Option<Self> {
        match payload.split_once(':') {
            None if payload == "plans" => Some(BillingChange::Plans),
            Some(("subscription", id)) => Uuid::parse_str(id).ok().map(BillingChange::Subscription),
            _ => None,
        }
    }
}

/// Who is told of the changes written through this process.
pub type ChangeHook = Arc<dyn Fn(BillingChange) + Send + Sync>;

/// A [`BillingRepository`] whose `plan` and `subscription` answers are
/// cached for `ttl_ms`.
pub struct CachedBilling {
    inner: Arc<dyn BillingRepository>,
    ttl_ms: i64,
    clock: Arc<dyn muse_core::Clock>,
    plans: RwLock<HashMap<String, Stamped<Option<Plan>>>>,
    subscriptions: RwLock<HashMap<Uuid, Stamped<Option<Subscription>>>>,
    on_change: RwLock<Option<ChangeHook>>,
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
            on_change: RwLock::default(),
        }
    }

    /// Registers who is told of the plans and subscriptions written here
    /// (the server relays them to other replicas).
    pub fn on_change(&self, hook: ChangeHook) {
        if let Ok(mut h) = self.on_change.write() {
            *h = Some(hook);
        }
    }

    /// Drops what `change` made stale (a change relayed from elsewhere).
    pub fn forget(&self, change: BillingChange) {
        match change {
            BillingChange::Plans => {
                if let Ok(mut p) = self.plans.write() {
                    p.clear();
                }
            }
            BillingChange::Subscription(user_id) => {
                if let Ok(mut s) = self.subscriptions.write() {
                    s.remove(&user_id);
                }
            }
        }
    }

    /// A write here: forgotten at once, and told to the hook.
    fn changed(&self, change: BillingChange) {
        self.forget(change);
        let hook = self.on_change.read().ok().and_then(|h| h.clone());
        if let Some(hook) = hook {
            hook(change);
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

    /// The plan in force for `user_id` ([`crate::plans::plan_in_force`]'s
    /// rule) from the cache alone (`None`: something is not cached).
    pub fn peek_plan_in_force(&self, user_id: Uuid, now_ms: i64) -> Option<Plan> {
        let sub = self.peek_subscription(user_id)?;
        match self.peek_plan(crate::plans::plan_id_in_force(sub.as_ref(), now_ms))? {
            Some(p) => Some(p),
            None => self.peek_plan(crate::plans::FREE_PLAN)?,
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
        self.changed(BillingChange::Plans);
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
        self.changed(BillingChange::Subscription(sub.user_id));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_travel_as_text_and_back() {
        let id = Uuid::new_v4();
        for change in [BillingChange::Plans, BillingChange::Subscription(id)] {
            assert_eq!(
                BillingChange::from_payload(&change.to_payload()),
                Some(change)
            );
        }
        for bad in [
            "",
            "plan",
            "subscription:",
            "subscription:not-a-uuid",
            "flags",
        ] {
            assert_eq!(BillingChange::from_payload(bad), None, "{bad}");
        }
    }
}
