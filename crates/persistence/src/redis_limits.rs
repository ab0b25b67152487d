//! [`RateLimitStore`] on Redis: limits shared by every replica. Each check
//! is one Lua script (atomic on the server, using the server's clock so
//! replicas with skewed clocks agree). Every call has a short time limit,
//! so a Redis outage costs a request at most that long before the
//! limiter's fail-open/closed rule applies.

use std::time::Duration;

use async_trait::async_trait;
use muse_billing::{Decision, LimitError, Quota, RateLimitStore};
use redis::aio::ConnectionManager;

const PREFIX: &str = "muse:rl:";
const REFUSED: &str = "muse:rl-refused";

/// GCRA: KEYS[1] the TAT key; ARGV[1] µs per request, ARGV[2] burst.
/// Returns {allowed, remaining, retry_after_us, reset_us}.
const GCRA: &str = r#"
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new_tat = tat + interval
local window = interval * burst
local ahead = new_tat - now
if ahead > window then
  return {0, 0, ahead - window, tat - now}
end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil(ahead / 1000))
return {1, math.floor((window - ahead) / interval), 0, ahead}
"#;

/// GCRA without counting: the decision `GCRA` would make now.
const PEEK: &str = r#"
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local ahead = tat + interval - now
local window = interval * burst
if ahead > window then
  return {0, 0, ahead - window, tat - now}
end
return {1, math.floor((window - ahead) / interval), 0, ahead}
"#;

pub struct RedisRateLimitStore {
    conn: crate::redis_conn::PerThreadConnection,
    script: redis::Script,
    peek_script: redis::Script,
    timeout: Duration,
}

impl RedisRateLimitStore {
    /// Checks the URL; connects on first use (so Muse starts while Redis is down).
    pub fn new(url: &str) -> Result<Self, LimitError> {
        let client = redis::Client::open(url)
            .map_err(|e| LimitError::Unavailable(format!("bad REDIS_URL: {e}")))?;
        Ok(Self {
            conn: crate::redis_conn::PerThreadConnection::new(client),
            script: redis::Script::new(GCRA),
            peek_script: redis::Script::new(PEEK),
            timeout: Duration::from_millis(500),
        })
    }

    async fn conn(&self) -> Result<ConnectionManager, LimitError> {
        self.conn
            .get(self.timeout)
            .await
            .map_err(|e| LimitError::Unavailable(e.to_string()))
    }

    async fn eval(
        &self,
        script: &redis::Script,
        key: &str,
        quota: Quota,
    ) -> Result<Decision, LimitError> {
        let mut conn = self.conn().await?;
        let mut inv = script.key(format!("{PREFIX}{key}"));
        inv.arg(quota.interval_us()).arg(quota.count);
        let (allowed, remaining, retry_us, reset_us): (i64, i64, i64, i64) =
            self.run(inv.invoke_async(&mut conn)).await?;
        Ok(Decision {
            allowed: allowed == 1,
            limit: quota.count,
            remaining: u32::try_from(remaining).unwrap_or(0),
            reset_ms: (reset_us + 999) / 1_000,
            retry_after_ms: (retry_us + 999) / 1_000,
        })
    }

    async fn run<T>(
        &self,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, LimitError> {
        tokio::time::timeout(self.timeout, f)
            .await
            .map_err(|_| LimitError::Unavailable("Redis did not answer in time".into()))?
            .map_err(|e| LimitError::Unavailable(e.to_string()))
    }
}

#[async_trait]
impl RateLimitStore for RedisRateLimitStore {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn hit(&self, key: &str, quota: Quota) -> Result<Decision, LimitError> {
        self.eval(&self.script, key, quota).await
    }

    async fn peek(&self, key: &str, quota: Quota) -> Result<Decision, LimitError> {
        self.eval(&self.peek_script, key, quota).await
    }

    async fn reset(&self, keys: &[String]) -> Result<u64, LimitError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let mut conn = self.conn().await?;
        let prefixed: Vec<String> = keys.iter().map(|k| format!("{PREFIX}{k}")).collect();
        let mut pipe = redis::pipe();
        pipe.cmd("DEL")
            .arg(&prefixed)
            .cmd("ZREM")
            .arg(REFUSED)
            .arg(keys);
        let (deleted, unrefused): (u64, u64) = self.run(pipe.query_async(&mut conn)).await?;
        Ok(deleted.max(unrefused))
    }

    async fn record_refusal(&self, key: &str) -> Result<(), LimitError> {
        let mut conn = self.conn().await?;
        let mut cmd = redis::cmd("ZINCRBY");
        cmd.arg(REFUSED).arg(1).arg(key);
        let _: f64 = self.run(cmd.query_async(&mut conn)).await?;
        Ok(())
    }

    async fn top_refused(&self, n: usize) -> Result<Vec<(String, u64)>, LimitError> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut conn = self.conn().await?;
        let mut cmd = redis::cmd("ZRANGE");
        cmd.arg(REFUSED)
            .arg(0)
            .arg(n as i64 - 1)
            .arg("REV")
            .arg("WITHSCORES");
        let v: Vec<(String, f64)> = self.run(cmd.query_async(&mut conn)).await?;
        Ok(v.into_iter().map(|(k, s)| (k, s.max(0.0) as u64)).collect())
    }
}
