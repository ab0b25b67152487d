//! One Redis connection per calling thread.
//!
//! A `ConnectionManager`'s connection is driven by a task on the runtime
//! of the thread that opened it. Shared by the HTTP server's workers (one
//! runtime per thread), every command from another worker was handed to
//! that thread and waited for it to be scheduled (two cross-thread
//! wake-ups per command), and stalled whenever that worker was busy — or
//! for good, when the runtime that opened it was no longer polled. Each
//! thread that calls opens its own connection on first use (one per HTTP
//! worker, plus the few other threads that settle quotas or publish). A
//! thread started after another ended may be given the ended thread's
//! connection, whose driver stopped with that thread's runtime: the
//! manager reconnects on the caller's runtime after the first failure
//! (the quota store then sends its command once more).

use std::time::Duration;

use redis::aio::ConnectionManager;
use thread_local::ThreadLocal;
use tokio::sync::OnceCell;

pub(crate) struct PerThreadConnection {
    client: redis::Client,
    conns: ThreadLocal<OnceCell<ConnectionManager>>,
}

/// Why no connection could be had.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error("connecting to Redis timed out")]
    TimedOut,
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
}

impl PerThreadConnection {
    pub(crate) fn new(client: redis::Client) -> Self {
        Self {
            client,
            conns: ThreadLocal::new(),
        }
    }

    /// The calling thread's connection, opened (within `timeout`) on its
    /// first use.
    pub(crate) async fn get(&self, timeout: Duration) -> Result<ConnectionManager, ConnectError> {
        let cell = self.conns.get_or_default();
        let conn = tokio::time::timeout(
            timeout,
            cell.get_or_try_init(|| async { self.client.get_connection_manager().await }),
        )
        .await
        .map_err(|_| ConnectError::TimedOut)??;
        Ok(conn.clone())
    }
}
