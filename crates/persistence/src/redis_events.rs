//! Events between replicas over Redis pub/sub (revocations today): a
//! message published by one replica reaches every other one at once. While
//! Redis is down, publishing fails (logged) and subscribers reconnect with
//! backoff; what the events carried falls back to each consumer's own
//! bound (the principal cache's TTL).

use std::time::Duration;

use futures_util::StreamExt;

/// Publishes and subscribes on one Redis server.
pub struct RedisEvents {
    client: redis::Client,
    conn: crate::redis_conn::PerThreadConnection,
}

impl RedisEvents {
    /// Checks the URL; connects on first use.
    pub fn new(url: &str) -> Result<Self, String> {
        let client = redis::Client::open(url).map_err(|e| format!("bad REDIS_URL: {e}"))?;
        Ok(Self {
            conn: crate::redis_conn::PerThreadConnection::new(client.clone()),
            client,
        })
    }

    /// Sends `payload` to every subscriber of `channel` (on every replica).
    pub async fn publish(&self, channel: &str, payload: &str) -> Result<(), String> {
        let mut conn = self
            .conn
            .get(Duration::from_millis(500))
            .await
            .map_err(|e| e.to_string())?;
        tokio::time::timeout(
            Duration::from_millis(500),
            redis::cmd("PUBLISH")
                .arg(channel)
                .arg(payload)
                .query_async::<i64>(&mut conn),
        )
        .await
        .map_err(|_| "publishing to Redis timed out".to_string())?
        .map(|_| ())
        .map_err(|e| e.to_string())
    }

    /// Calls `on_message` with each payload published on `channel`, for as
    /// long as the process lives: reconnects (1 s, then up to 10 s apart)
    /// whenever the connection drops, and calls `on_state(true|false)` as
    /// the subscription comes up or goes down.
    pub async fn subscribe(
        &self,
        channel: &str,
        on_message: impl Fn(String),
        on_state: impl Fn(bool),
    ) {
        let mut backoff = Duration::from_secs(1);
        loop {
            match self.client.get_async_pubsub().await {
                Ok(mut pubsub) => match pubsub.subscribe(channel).await {
                    Ok(()) => {
                        backoff = Duration::from_secs(1);
                        on_state(true);
                        let mut messages = pubsub.on_message();
                        while let Some(msg) = messages.next().await {
                            if let Ok(payload) = msg.get_payload::<String>() {
                                on_message(payload);
                            }
                        }
                        on_state(false);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, channel, "cannot subscribe to Redis");
                        on_state(false);
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, channel, "Redis is unreachable; events between replicas wait for it");
                    on_state(false);
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }
}
