//! Changes to the shared quota counters that need not hold up a call — a
//! reservation settled (its estimate replaced by what the call used), a
//! call no quota capped counted whole — merged per period and sent off
//! the calls' path: one script run for everything that changed while the
//! previous run was on its way, at most one run every [`GAP`]. Under load
//! the shared store sees a few hundred small writes a second instead of
//! one per call.
//!
//! A run that fails is not retried (logged): a lost settlement leaves the
//! estimate counted (the safe side); a lost count of an uncapped call
//! leaves the shared counter short of the usage table until the period's
//! counters are loaded again, which matters only if the plan gains a
//! quota within that period.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use muse_billing::{BillingError, SharedQuota, Usage, UsageChange};
use tokio::sync::Notify;
use uuid::Uuid;

/// Least time between two runs.
pub(crate) const GAP: Duration = Duration::from_millis(5);

pub(crate) struct Tally {
    shared: Arc<dyn SharedQuota>,
    pending: Mutex<HashMap<(Uuid, i64), Usage>>,
    wake: Notify,
    task: OnceLock<()>,
    /// Held while changes are on their way: a flush returns once what was
    /// queued before it has reached the store.
    sending: tokio::sync::Mutex<()>,
}

impl Tally {
    pub(crate) fn new(shared: Arc<dyn SharedQuota>) -> Arc<Self> {
        Arc::new(Self {
            shared,
            pending: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            task: OnceLock::new(),
            sending: tokio::sync::Mutex::new(()),
        })
    }

    /// Queues `change` (merged with the period's queued changes). The
    /// sending task starts with the first change made on a runtime.
    pub(crate) fn push(self: &Arc<Self>, change: UsageChange) {
        if let Ok(mut pending) = self.pending.lock() {
            let u = pending
                .entry((change.user_id, change.period_start))
                .or_default();
            u.requests += change.usage.requests;
            u.tokens += change.usage.tokens;
            u.cost_usd += change.usage.cost_usd;
        }
        if self.task.get().is_none() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                self.task.get_or_init(|| {
                    rt.spawn(self.clone().run());
                });
            }
        }
        self.wake.notify_one();
    }

    fn take(&self) -> Vec<UsageChange> {
        let Ok(mut pending) = self.pending.lock() else {
            return Vec::new();
        };
        pending
            .drain()
            .filter(|(_, u)| *u != Usage::default())
            .map(|((user_id, period_start), usage)| UsageChange {
                user_id,
                period_start,
                usage,
            })
            .collect()
    }

    /// Sends what is queued now (after what is already on its way);
    /// returns how many periods changed.
    pub(crate) async fn flush(&self) -> Result<usize, BillingError> {
        let _sending = self.sending.lock().await;
        let changes = self.take();
        if !changes.is_empty() {
            self.shared.add(&changes).await?;
        }
        Ok(changes.len())
    }

    async fn run(self: Arc<Self>) {
        loop {
            self.wake.notified().await;
            loop {
                match self.flush().await {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => {
                        metrics::counter!("quota_store_settle_failures_total").increment(1);
                        tracing::warn!(error = %e, "could not settle quota reservations on the shared store");
                    }
                }
                tokio::time::sleep(GAP).await;
            }
        }
    }
}
