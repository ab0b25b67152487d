//! What one finished model call leaves behind, and the store that writes
//! many of them at once (group commit: `muse-gateway`'s writer hands
//! batches to a [`CallStore`]; `muse-persistence` implements it).

use uuid::Uuid;

use crate::execution::Execution;
use crate::ideas::Idea;

/// What a call adds to its user's usage counter for a period.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UsageDelta {
    pub user_id: Uuid,
    /// The period's start (ms since the epoch).
    pub period_start: i64,
    /// 1 when the request was not already counted (its reservation was
    /// held outside the database), else 0.
    pub requests: i64,
    pub tokens: i64,
    pub cost_usd: f64,
}

/// One finished call: its execution, the idea it produced (idea
/// generations that succeeded), and what it adds to the usage counters.
#[derive(Debug, Clone)]
pub struct CallRecord {
    pub execution: Execution,
    pub idea: Option<Idea>,
    pub usage: Option<UsageDelta>,
}

/// Why a batch was not written.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The store refused what it was given (a constraint, a value it
    /// cannot hold): trying again will not help.
    #[error("refused: {0}")]
    Rejected(String),
    /// The store cannot be reached or is busy: trying again may help.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

/// Writes batches of call records, all or nothing per batch.
pub trait CallStore: Send + Sync + 'static {
    fn record_calls(&self, batch: &[CallRecord]) -> Result<(), RecordError>;

    /// Housekeeping the store wants done off its callers' path: a
    /// group-commit writer calls it after each batch's callers were
    /// answered (SQLite makes its WAL start over here when it grew too
    /// large). Nothing by default.
    fn between_batches(&self) {}
}
