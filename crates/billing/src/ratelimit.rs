//! GCRA rate limiting per IP and per user, per route class.
//!
//! A [`Quota`] of `count` requests per `period` admits a burst of `count`
//! at once and then one request every `period / count`. GCRA keeps one
//! number per key, the theoretical arrival time (TAT) of the next request,
//! so a check is one atomic read-modify-write: exact, with no windows
//! resetting at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use muse_core::Clock;
use serde::Serialize;
use uuid::Uuid;

/// `count` requests per `period_ms` (the burst is `count`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Quota {
    pub count: u32,
    pub period_ms: u64,
}

impl Quota {
    /// Parses `N/sec`, `N/min`, `N/hour` (also `s`, `m`, `h`). `off` or `0`
    /// is `None` (no limit).
    pub fn parse(s: &str) -> Result<Option<Self>, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("off") || s == "0" {
            return Ok(None);
        }
        let (n, unit) = s
            .split_once('/')
            .ok_or_else(|| format!("expected N/sec, N/min or N/hour (or off), got {s:?}"))?;
        let count: u32 = n
            .trim()
            .parse()
            .map_err(|_| format!("{n:?} is not a whole number"))?;
        let period_ms = match unit.trim() {
            "s" | "sec" | "second" => 1_000,
            "m" | "min" | "minute" => 60_000,
            "h" | "hour" => 3_600_000,
            other => return Err(format!("unknown period {other:?} (sec, min, hour)")),
        };
        if count == 0 {
            return Ok(None);
        }
        Ok(Some(Self { count, period_ms }))
    }

    /// Microseconds between requests at the sustained rate.
    pub fn interval_us(&self) -> i64 {
        (self.period_ms as i64 * 1_000 / i64::from(self.count)).max(1)
    }
}

impl std::fmt::Display for Quota {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.period_ms {
            1_000 => write!(f, "{}/sec", self.count),
            60_000 => write!(f, "{}/min", self.count),
            3_600_000 => write!(f, "{}/hour", self.count),
            p => write!(f, "{}/{}ms", self.count, p),
        }
    }
}

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub allowed: bool,
    /// The burst size (`RateLimit-Limit`).
    pub limit: u32,
    /// Requests left in the burst right now (`RateLimit-Remaining`).
    pub remaining: u32,
    /// Milliseconds until the burst is whole again (`RateLimit-Reset`).
    pub reset_ms: i64,
    /// When refused: milliseconds until one request is admitted (`Retry-After`).
    pub retry_after_ms: i64,
}

/// One GCRA step: the decision and the new TAT to store (when allowed).
/// Times are microseconds.
pub fn gcra(tat: Option<i64>, now_us: i64, quota: Quota) -> (Decision, Option<i64>) {
    let interval = quota.interval_us();
    let window = interval * i64::from(quota.count);
    let tat = tat.unwrap_or(now_us).max(now_us);
    let new_tat = tat + interval;
    let ahead = new_tat - now_us;
    if ahead > window {
        let d = Decision {
            allowed: false,
            limit: quota.count,
            remaining: 0,
            reset_ms: (tat - now_us + 999) / 1_000,
            retry_after_ms: (ahead - window + 999) / 1_000,
        };
        return (d, None);
    }
    let remaining = u32::try_from((window - ahead) / interval).unwrap_or(0);
    let d = Decision {
        allowed: true,
        limit: quota.count,
        remaining,
        reset_ms: (ahead + 999) / 1_000,
        retry_after_ms: 0,
    };
    (d, Some(new_tat))
}

#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error("rate-limit store unavailable: {0}")]
    Unavailable(String),
}

/// Where the TATs live. `hit` must be atomic per key.
#[async_trait]
pub trait RateLimitStore: Send + Sync + 'static {
    /// `memory` or `redis`.
    fn name(&self) -> &'static str;
    /// Applies one request to `key` under `quota`.
    async fn hit(&self, key: &str, quota: Quota) -> Result<Decision, LimitError>;
    /// What `hit` would decide now, without counting anything.
    async fn peek(&self, key: &str, quota: Quota) -> Result<Decision, LimitError>;
    /// Forgets `keys` (their limits start afresh) and their refusal counts;
    /// returns how many were limited or known.
    async fn reset(&self, keys: &[String]) -> Result<u64, LimitError>;
    /// Counts one refusal of `key` (for the admin statistics).
    async fn record_refusal(&self, key: &str) -> Result<(), LimitError>;
    /// The most refused keys, most first.
    async fn top_refused(&self, n: usize) -> Result<Vec<(String, u64)>, LimitError>;
}

/// Limits in this process's memory (one replica).
pub struct MemoryStore {
    clock: Arc<dyn Clock>,
    state: Mutex<MemoryState>,
}

#[derive(Default)]
struct MemoryState {
    tats: HashMap<String, i64>,
    refused: HashMap<String, u64>,
    hits_since_sweep: u32,
}

impl MemoryStore {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            clock,
            state: Mutex::default(),
        }
    }
}

#[async_trait]
impl RateLimitStore for MemoryStore {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn hit(&self, key: &str, quota: Quota) -> Result<Decision, LimitError> {
        let now = self.clock.now_ms() * 1_000;
        let mut st = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Keys whose TAT has passed hold no state: drop them now and then.
        st.hits_since_sweep += 1;
        if st.hits_since_sweep >= 10_000 {
            st.hits_since_sweep = 0;
            st.tats.retain(|_, tat| *tat > now);
        }
        let (decision, new_tat) = gcra(st.tats.get(key).copied(), now, quota);
        if let Some(t) = new_tat {
            st.tats.insert(key.to_string(), t);
        }
        Ok(decision)
    }

    async fn peek(&self, key: &str, quota: Quota) -> Result<Decision, LimitError> {
        let now = self.clock.now_ms() * 1_000;
        let st = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(gcra(st.tats.get(key).copied(), now, quota).0)
    }

    async fn reset(&self, keys: &[String]) -> Result<u64, LimitError> {
        let mut st = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut n = 0;
        for k in keys {
            let known = st.tats.remove(k).is_some();
            let refused = st.refused.remove(k).is_some();
            n += u64::from(known || refused);
        }
        Ok(n)
    }

    async fn record_refusal(&self, key: &str) -> Result<(), LimitError> {
        let mut st = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if st.refused.len() < 100_000 || st.refused.contains_key(key) {
            *st.refused.entry(key.to_string()).or_default() += 1;
        }
        Ok(())
    }

    async fn top_refused(&self, n: usize) -> Result<Vec<(String, u64)>, LimitError> {
        let st = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut v: Vec<(String, u64)> = st.refused.iter().map(|(k, c)| (k.clone(), *c)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v.truncate(n);
        Ok(v)
    }
}

/// Groups of routes limited together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteClass {
    /// Sign-in, registration, token refresh, password reset.
    Auth,
    /// Model calls: generation, prompt execution, the OpenAI API, streams.
    Generation,
    /// Other reads.
    Reads,
    /// Other writes.
    Writes,
}

impl RouteClass {
    pub const ALL: [RouteClass; 4] = [
        RouteClass::Auth,
        RouteClass::Generation,
        RouteClass::Reads,
        RouteClass::Writes,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RouteClass::Auth => "auth",
            RouteClass::Generation => "generation",
            RouteClass::Reads => "reads",
            RouteClass::Writes => "writes",
        }
    }
}

/// Who is limited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    Ip(String),
    User(Uuid),
}

impl Subject {
    /// The store key of this subject for `class`: `ip:1.2.3.4:auth`,
    /// `user:<uuid>:generation`.
    pub fn key(&self, class: RouteClass) -> String {
        match self {
            Subject::Ip(ip) => format!("ip:{ip}:{}", class.as_str()),
            Subject::User(id) => format!("user:{id}:{}", class.as_str()),
        }
    }

    /// Every key of this subject (one per class), for unblocking.
    pub fn keys(&self) -> Vec<String> {
        RouteClass::ALL.iter().map(|c| self.key(*c)).collect()
    }
}

/// Per-class quotas per IP and per user, over a store.
pub struct RateLimiter {
    store: Arc<dyn RateLimitStore>,
    per_ip: HashMap<RouteClass, Quota>,
    per_user: HashMap<RouteClass, Quota>,
    /// When the store fails: admit (`true`) or refuse.
    fail_open: bool,
}

/// A refusal: the decision, or the store being down with `fail_open` off.
#[derive(Debug)]
pub enum Refusal {
    Limited { key: String, decision: Decision },
    StoreDown(LimitError),
}

impl RateLimiter {
    pub fn new(
        store: Arc<dyn RateLimitStore>,
        per_ip: HashMap<RouteClass, Quota>,
        per_user: HashMap<RouteClass, Quota>,
        fail_open: bool,
    ) -> Self {
        Self {
            store,
            per_ip,
            per_user,
            fail_open,
        }
    }

    pub fn store(&self) -> &Arc<dyn RateLimitStore> {
        &self.store
    }

    pub fn fail_open(&self) -> bool {
        self.fail_open
    }

    /// The quota of `subject`'s kind for `class`, if limited.
    pub fn quota(&self, class: RouteClass, subject: &Subject) -> Option<Quota> {
        match subject {
            Subject::Ip(_) => self.per_ip.get(&class).copied(),
            Subject::User(_) => self.per_user.get(&class).copied(),
        }
    }

    /// Refuses (with the wait) when `key` has no room left under `quota`,
    /// without counting anything; a store failure follows the fail mode.
    pub async fn peek(&self, key: &str, quota: Quota) -> Result<(), Refusal> {
        match self.store.peek(key, quota).await {
            Ok(d) if d.allowed => Ok(()),
            Ok(decision) => Err(Refusal::Limited {
                key: key.to_string(),
                decision,
            }),
            Err(_) if self.fail_open => Ok(()),
            Err(e) => Err(Refusal::StoreDown(e)),
        }
    }

    /// Counts one event against `key` (e.g. a failed login); failures are logged.
    pub async fn charge(&self, key: &str, quota: Quota) {
        if let Err(e) = self.store.hit(key, quota).await {
            tracing::warn!(error = %e, "could not count against a rate limit");
        }
    }

    /// Counts one request of `subject` in `class`. `Ok(None)`: not limited
    /// (no quota, or the store is down and the limiter fails open).
    pub async fn check(
        &self,
        class: RouteClass,
        subject: &Subject,
    ) -> Result<Option<Decision>, Refusal> {
        let Some(quota) = self.quota(class, subject) else {
            return Ok(None);
        };
        let key = subject.key(class);
        match self.store.hit(&key, quota).await {
            Ok(d) if d.allowed => Ok(Some(d)),
            Ok(decision) => {
                if let Err(e) = self.store.record_refusal(&key).await {
                    tracing::warn!(error = %e, "could not count a rate-limit refusal");
                }
                Err(Refusal::Limited { key, decision })
            }
            Err(e) if self.fail_open => {
                tracing::warn!(error = %e, store = self.store.name(), "rate-limit store unavailable: admitting the request (RATE_LIMIT_FAILURE=open)");
                Ok(None)
            }
            Err(e) => {
                tracing::error!(error = %e, store = self.store.name(), "rate-limit store unavailable: refusing the request (RATE_LIMIT_FAILURE=closed)");
                Err(Refusal::StoreDown(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use muse_core::FixedClock;

    fn q(count: u32, period_ms: u64) -> Quota {
        Quota { count, period_ms }
    }

    #[test]
    fn quotas_parse() {
        assert_eq!(Quota::parse("60/min").unwrap(), Some(q(60, 60_000)));
        assert_eq!(Quota::parse(" 5 / sec ").unwrap(), Some(q(5, 1_000)));
        assert_eq!(Quota::parse("off").unwrap(), None);
        assert!(Quota::parse("5 per minute").is_err());
        assert!(Quota::parse("x/min").is_err());
        assert!(Quota::parse("5/week").is_err());
    }

    #[test]
    fn gcra_admits_the_burst_then_the_sustained_rate_exactly() {
        let quota = q(3, 3_000); // burst 3, then one per second
        let mut tat = None;
        let now = 1_000_000_000;
        for expected_remaining in [2, 1, 0] {
            let (d, t) = gcra(tat, now, quota);
            assert!(d.allowed);
            assert_eq!(d.remaining, expected_remaining);
            tat = t;
        }
        let (d, t) = gcra(tat, now, quota);
        assert!(!d.allowed && t.is_none());
        assert_eq!(d.retry_after_ms, 1_000);
        assert_eq!(d.reset_ms, 3_000);
        // 999 ms later: still refused; at 1 s: one more.
        assert!(!gcra(tat, now + 999_000, quota).0.allowed);
        let (d, t) = gcra(tat, now + 1_000_000, quota);
        assert!(d.allowed && d.remaining == 0);
        tat = t;
        // After a long pause the whole burst is back.
        let (d, _) = gcra(tat, now + 60_000_000, quota);
        assert_eq!(d.remaining, 2);
    }

    #[tokio::test]
    async fn the_limiter_counts_per_subject_and_class_and_unblocks() {
        let clock = Arc::new(FixedClock::new(1_000));
        let store = Arc::new(MemoryStore::new(clock.clone()));
        let per_ip = HashMap::from([(RouteClass::Auth, q(2, 60_000))]);
        let per_user = HashMap::from([(RouteClass::Generation, q(1, 1_000))]);
        let limiter = RateLimiter::new(store.clone(), per_ip, per_user, true);
        let a = Subject::Ip("10.0.0.1".into());
        let b = Subject::Ip("10.0.0.2".into());
        assert!(limiter.check(RouteClass::Auth, &a).await.is_ok());
        assert!(limiter.check(RouteClass::Auth, &a).await.is_ok());
        match limiter.check(RouteClass::Auth, &a).await {
            Err(Refusal::Limited { key, decision }) => {
                assert_eq!(key, "ip:10.0.0.1:auth");
                assert_eq!(decision.retry_after_ms, 30_000);
            }
            other => panic!("{other:?}"),
        }
        assert!(
            limiter.check(RouteClass::Auth, &b).await.is_ok(),
            "another IP is served"
        );
        assert_eq!(
            limiter.check(RouteClass::Reads, &a).await.unwrap(),
            None,
            "no quota"
        );
        let u = Subject::User(Uuid::nil());
        assert!(limiter.check(RouteClass::Generation, &u).await.is_ok());
        assert!(limiter.check(RouteClass::Generation, &u).await.is_err());
        clock.advance_ms(1_000);
        assert!(limiter.check(RouteClass::Generation, &u).await.is_ok());
        let top = store.top_refused(10).await.unwrap();
        assert_eq!(top[0], ("ip:10.0.0.1:auth".to_string(), 1));
        assert_eq!(store.reset(&a.keys()).await.unwrap(), 1);
        assert!(
            limiter.check(RouteClass::Auth, &a).await.is_ok(),
            "unblocked"
        );
        assert!(store
            .top_refused(10)
            .await
            .unwrap()
            .iter()
            .all(|(k, _)| !k.starts_with("ip:10.0.0.1")));
    }
}
