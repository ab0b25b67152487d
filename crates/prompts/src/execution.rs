//! Executions: the record of every model call a user makes, failures and
//! cancellations included, and the storage port for them.

use muse_core::{Page, PageRequest};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// What started the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecutionSource {
    /// `POST /v1/chat/completions`.
    OpenaiApi,
    /// `POST /api/v1/execute-prompt/{id}`.
    Prompt,
    /// Idea generation.
    Idea,
}

impl ExecutionSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ExecutionSource::OpenaiApi => "openai_api",
            ExecutionSource::Prompt => "prompt",
            ExecutionSource::Idea => "idea",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "openai_api" => Some(Self::OpenaiApi),
            "prompt" => Some(Self::Prompt),
            "idea" => Some(Self::Idea),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecutionStatus {
    Succeeded,
    Failed,
    Cancelled,
}

impl ExecutionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ExecutionStatus::Succeeded => "succeeded",
            ExecutionStatus::Failed => "failed",
            ExecutionStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "succeeded" => Some(Self::Succeeded),
            "failed" => Some(Self::Failed),
            "cancelled" => Some(Self::Cancelled),
            _ => None,
        }
    }
}

/// One recorded call. Times are milliseconds (since the epoch for
/// `created_at`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Execution {
    pub id: Uuid,
    pub user_id: Uuid,
    pub source: ExecutionSource,
    pub prompt_id: Option<Uuid>,
    pub prompt_version: Option<i32>,
    pub provider: String,
    pub model: String,
    pub variables: Option<serde_json::Value>,
    pub rendered_prompt: Option<String>,
    pub output: Option<String>,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// USD; `None` when the model's price is unknown.
    pub cost_usd: Option<f64>,
    pub duration_ms: i64,
    pub ttft_ms: Option<i64>,
    pub status: ExecutionStatus,
    pub error: Option<String>,
    pub created_at: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum ExecutionStoreError {
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Other(String),
}

/// Which executions to list (all conditions must hold).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExecutionFilter {
    pub prompt_id: Option<Uuid>,
    pub status: Option<ExecutionStatus>,
    pub provider: Option<String>,
    pub model: Option<String>,
    /// Created at or after (ms since the epoch).
    pub from_ms: Option<i64>,
    /// Created before (ms since the epoch).
    pub to_ms: Option<i64>,
}

/// Whose executions a read may see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecutionScope {
    /// One user's own executions.
    User(Uuid),
    /// Everyone's (administrators).
    All,
}

/// Usage of one model over a period (administration statistics).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelUsage {
    pub provider: String,
    pub model: String,
    pub executions: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// USD, over the executions whose price is known.
    pub cost_usd: f64,
}

/// Storage of executions. Every read says whose executions it may see.
pub trait ExecutionRepository: Send + Sync + 'static {
    fn record(&self, execution: &Execution) -> Result<(), ExecutionStoreError>;
    fn get(
        &self,
        scope: ExecutionScope,
        id: Uuid,
    ) -> Result<Option<Execution>, ExecutionStoreError>;
    /// The executions in `scope` matching `filter`, newest first.
    fn list(
        &self,
        scope: ExecutionScope,
        filter: &ExecutionFilter,
        page: PageRequest,
    ) -> Result<Page<Execution>, ExecutionStoreError>;
    /// Usage per provider and model of executions created in `[from_ms, to_ms)`.
    fn usage(&self, from_ms: i64, to_ms: i64) -> Result<Vec<ModelUsage>, ExecutionStoreError>;
    /// Users with at least one execution created in `[from_ms, to_ms)`.
    fn active_users(&self, from_ms: i64, to_ms: i64) -> Result<u64, ExecutionStoreError>;
}
