//! [`SharedQuota`] on Redis: quota counters shared by every replica. A
//! reservation is one Lua script (checked and counted atomically on the
//! server), so any number of replicas admit together exactly what one
//! process would. Counters live in a hash per (user, period) —
//! `muse:quota:<user>:<period start>` with fields `r` (requests), `t`
//! (tokens), `c` (cost, USD) — loaded from the usage table the first time
//! a period is used, and expiring a week after the period ends. Every call
//! has a short time limit, so a Redis outage costs a request at most that
//! long before the caller falls back (see `muse-gateway`).

use std::time::Duration;

use async_trait::async_trait;
use muse_billing::{BillingError, Plan, QuotaKind, SharedQuota, Usage, UsageChange};
use redis::aio::ConnectionManager;
use uuid::Uuid;

const PREFIX: &str = "muse:quota:";
/// How long counters outlive their period (ms).
const KEEP_AFTER_PERIOD_MS: i64 = 7 * 24 * 3_600_000;

/// KEYS[1] the counters; ARGV: max requests, max tokens, max cost (each
/// -1 for none), tokens, cost. Returns -1 (not loaded), 0 (admitted and
/// counted), or the quota that refused: 1 requests, 2 tokens, 3 cost.
const RESERVE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local u = redis.call('HMGET', KEYS[1], 'r', 't', 'c')
local r, t, c = tonumber(u[1]) or 0, tonumber(u[2]) or 0, tonumber(u[3]) or 0
local mr, mt, mc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens, cost = tonumber(ARGV[4]), tonumber(ARGV[5])
if mr >= 0 and r >= mr then return 1 end
if mt >= 0 and t + tokens > mt then return 2 end
if mc >= 0 and c + cost > mc then return 3 end
redis.call('HINCRBY', KEYS[1], 'r', 1)
redis.call('HINCRBY', KEYS[1], 't', ARGV[4])
redis.call('HINCRBYFLOAT', KEYS[1], 'c', ARGV[5])
return 0
"#;

/// KEYS[1] the counters; ARGV: requests, tokens, cost, expiry (ms since
/// the epoch). Sets them only if no replica did first.
const LOAD: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'r', ARGV[1], 't', ARGV[2], 'c', ARGV[3])
redis.call('PEXPIREAT', KEYS[1], ARGV[4])
return 1
"#;

/// KEYS the counters of several periods; ARGV: requests, tokens and cost
/// to add (may be negative) for each key in turn. Periods that are not
/// loaded (or expired meanwhile) are left alone.
const ADD: &str = r#"
for i, k in ipairs(KEYS) do
  if redis.call('EXISTS', k) == 1 then
    local j = (i - 1) * 3
    if tonumber(ARGV[j + 1]) ~= 0 then redis.call('HINCRBY', k, 'r', ARGV[j + 1]) end
    redis.call('HINCRBY', k, 't', ARGV[j + 2])
    redis.call('HINCRBYFLOAT', k, 'c', ARGV[j + 3])
  end
end
return 0
"#;

/// Most periods changed by one script run (a longer slice takes several).
const ADD_CHUNK: usize = 256;

pub struct RedisQuotaStore {
    conn: crate::redis_conn::PerThreadConnection,
    reserve: redis::Script,
    load: redis::Script,
    add: redis::Script,
    timeout: Duration,
}

fn key(user_id: Uuid, period_start: i64) -> String {
    format!("{PREFIX}{user_id}:{period_start}")
}

fn unavailable(m: impl std::fmt::Display) -> BillingError {
    BillingError::Unavailable(format!("Redis quota store: {m}"))
}

impl RedisQuotaStore {
    /// Checks the URL; connects on first use (so Muse starts while Redis is down).
    pub fn new(url: &str) -> Result<Self, BillingError> {
        let client = redis::Client::open(url)
            .map_err(|e| BillingError::Unavailable(format!("bad REDIS_URL: {e}")))?;
        Ok(Self {
            conn: crate::redis_conn::PerThreadConnection::new(client),
            reserve: redis::Script::new(RESERVE),
            load: redis::Script::new(LOAD),
            add: redis::Script::new(ADD),
            timeout: Duration::from_millis(500),
        })
    }

    async fn conn(&self) -> Result<ConnectionManager, BillingError> {
        self.conn.get(self.timeout).await.map_err(unavailable)
    }

    /// Sends one command (`call` on a connection) within the time limit.
    async fn run<T, F, Fut>(&self, call: F) -> Result<T, BillingError>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let conn = self.conn().await?;
        let attempt = || async {
            tokio::time::timeout(self.timeout, call(conn.clone()))
                .await
                .map_err(|_| unavailable("no answer in time"))
        };
        match attempt().await? {
            // The connection's driver ran on a runtime that has stopped (a
            // thread that ran its own runtime before this one, or that took
            // the place of an ended thread: see `redis_conn`), or Redis
            // dropped the connection: the manager reconnects on this
            // runtime; tried once more. The command was not sent, or its
            // answer was lost: counted twice at worst.
            Err(e) if e.is_connection_dropped() || e.is_io_error() => {
                attempt().await?.map_err(unavailable)
            }
            other => other.map_err(unavailable),
        }
    }

    async fn script<T: redis::FromRedisValue>(
        &self,
        inv: &redis::ScriptInvocation<'_>,
    ) -> Result<T, BillingError> {
        self.run(|mut conn| async move { inv.invoke_async(&mut conn).await })
            .await
    }
}

/// A limit as the scripts take it (-1: none).
fn limit<T: ToString>(l: Option<T>) -> String {
    l.map_or_else(|| "-1".to_string(), |v| v.to_string())
}

#[async_trait]
impl SharedQuota for RedisQuotaStore {
    async fn reserve(
        &self,
        user_id: Uuid,
        period_start: i64,
        plan: &Plan,
        tokens: i64,
        cost_usd: f64,
    ) -> Result<Option<Result<(), QuotaKind>>, BillingError> {
        let mut inv = self.reserve.key(key(user_id, period_start));
        inv.arg(limit(plan.max_requests))
            .arg(limit(plan.max_tokens))
            .arg(limit(plan.max_cost_usd))
            .arg(tokens)
            .arg(cost_usd.to_string());
        let outcome: i64 = self.script(&inv).await?;
        Ok(match outcome {
            -1 => None,
            0 => Some(Ok(())),
            1 => Some(Err(QuotaKind::Requests)),
            2 => Some(Err(QuotaKind::Tokens)),
            _ => Some(Err(QuotaKind::Cost)),
        })
    }

    async fn load(
        &self,
        user_id: Uuid,
        period_start: i64,
        period_end: i64,
        stored: Usage,
    ) -> Result<(), BillingError> {
        let mut inv = self.load.key(key(user_id, period_start));
        inv.arg(stored.requests)
            .arg(stored.tokens)
            .arg(stored.cost_usd.to_string())
            .arg(period_end.saturating_add(KEEP_AFTER_PERIOD_MS));
        let _: i64 = self.script(&inv).await?;
        Ok(())
    }

    async fn add(&self, changes: &[UsageChange]) -> Result<(), BillingError> {
        for chunk in changes.chunks(ADD_CHUNK) {
            let mut inv = self.add.prepare_invoke();
            for c in chunk {
                inv.key(key(c.user_id, c.period_start))
                    .arg(c.usage.requests)
                    .arg(c.usage.tokens)
                    .arg(c.usage.cost_usd.to_string());
            }
            let _: i64 = self.script(&inv).await?;
        }
        Ok(())
    }

    async fn forget(&self, user_id: Uuid, period_start: i64) -> Result<(), BillingError> {
        let key = key(user_id, period_start);
        let _: i64 = self
            .run(|mut conn| {
                let key = key.clone();
                async move { redis::cmd("DEL").arg(key).query_async(&mut conn).await }
            })
            .await?;
        Ok(())
    }
}
