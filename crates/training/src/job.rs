//! Training jobs: their states, their progress, and the durable queue they
//! live in ([`JobRepository`]).
//!
//! A job is claimed by exactly one worker at a time, under a lease that the
//! worker renews (heartbeat). A job whose lease ran out — its worker died,
//! its machine went away — can be claimed again; the new worker resumes it
//! where the trainer allows it (a provider job is polled again) or fails it
//! with the reason. No job stays "running" without a live worker.

use muse_core::{Page, PageRequest};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Validating,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 6] = [
        JobState::Queued,
        JobState::Validating,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Validating => "validating",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Succeeded, failed or cancelled: nothing will change any more.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }

    /// Held by a worker (validating or running).
    pub fn is_active(self) -> bool {
        matches!(self, JobState::Validating | JobState::Running)
    }
}

/// Where a job is, as the trainer reports it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_steps: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<f64>,
    /// The trainer's numbers (`loss`, `learning_rate`, …).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub metrics: Map<String, Value>,
    /// The trainer's latest human-readable status line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl Progress {
    /// `step / total_steps`, when both are known.
    pub fn fraction(&self) -> Option<f64> {
        match (self.step, self.total_steps) {
            (Some(s), Some(t)) if t > 0 => Some((s as f64 / t as f64).min(1.0)),
            _ => None,
        }
    }
}

/// One fine-tuning job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingJob {
    pub id: Uuid,
    pub user_id: Uuid,
    pub dataset_id: Uuid,
    /// The model trained from (as the trainer names it).
    pub base_model: String,
    /// The trainer's id (`openai`, `external`, …).
    pub trainer: String,
    /// Validated by the trainer when the job was created.
    pub hyperparameters: Value,
    /// Appended to the resulting model's name.
    pub suffix: Option<String>,
    pub state: JobState,
    pub progress: Progress,
    pub error: Option<String>,
    /// The registry key of the trained model (`openai/ft:…`, `local/trained/…`).
    pub result_model: Option<String>,
    /// The provider's job id, once the provider has one (used to resume).
    pub provider_job_id: Option<String>,
    pub cancel_requested: bool,
    /// The worker holding the job, and until when (ms since the epoch).
    pub worker_id: Option<String>,
    pub lease_until: Option<i64>,
    /// How many times a worker claimed it.
    pub attempts: i32,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub updated_at: i64,
}

impl TrainingJob {
    /// A new queued job.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        user_id: Uuid,
        dataset_id: Uuid,
        base_model: String,
        trainer: String,
        hyperparameters: Value,
        suffix: Option<String>,
        now: i64,
    ) -> Self {
        Self {
            id: Uuid::now_v7(),
            user_id,
            dataset_id,
            base_model,
            trainer,
            hyperparameters,
            suffix,
            state: JobState::Queued,
            progress: Progress::default(),
            error: None,
            result_model: None,
            provider_job_id: None,
            cancel_requested: false,
            worker_id: None,
            lease_until: None,
            attempts: 0,
            created_at: now,
            started_at: None,
            finished_at: None,
            updated_at: now,
        }
    }
}

/// What a worker may write about a job it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct JobUpdate {
    pub state: JobState,
    pub progress: Progress,
    pub provider_job_id: Option<String>,
    pub error: Option<String>,
    pub result_model: Option<String>,
}

/// The answer to a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    /// Still ours; `cancel` when the owner asked to stop it.
    Held { cancel: bool },
    /// Another worker claimed it (our lease ran out) or it ended.
    Lost,
}

/// What a stop request did.
#[derive(Debug, Clone, PartialEq)]
pub enum StopOutcome {
    /// It was queued: cancelled at once.
    Cancelled(TrainingJob),
    /// It is running: its worker stops it at the trainer.
    Requested(TrainingJob),
    /// It had already ended.
    AlreadyEnded(TrainingJob),
    NotFound,
}

#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub state: Option<JobState>,
    pub dataset_id: Option<Uuid>,
}

#[derive(Debug, thiserror::Error)]
pub enum JobStoreError {
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Other(String),
}

/// The durable queue. Calls block (run them on a blocking pool). Reads
/// and stops are scoped to a user; `None` is an administrator's view.
pub trait JobRepository: Send + Sync + 'static {
    fn insert_job(&self, job: &TrainingJob) -> Result<(), JobStoreError>;
    fn job(&self, user_id: Option<Uuid>, id: Uuid) -> Result<Option<TrainingJob>, JobStoreError>;
    fn jobs(
        &self,
        user_id: Option<Uuid>,
        filter: &JobFilter,
        page: PageRequest,
    ) -> Result<Page<TrainingJob>, JobStoreError>;
    /// Queued, validating and running jobs of a user.
    fn unfinished_jobs(&self, user_id: Uuid) -> Result<u64, JobStoreError>;
    /// Unfinished jobs that use a dataset.
    fn jobs_using_dataset(&self, dataset_id: Uuid) -> Result<u64, JobStoreError>;
    /// Takes the oldest job that is queued, or active with an expired
    /// lease, for `worker_id` until `now + lease_ms`; increments
    /// `attempts`. Exactly one caller gets a given job, across processes
    /// (`FOR UPDATE SKIP LOCKED` on PostgreSQL; a guarded update on SQLite).
    /// Returns the job as it was before the claim (its state tells whether
    /// it is a recovery).
    /// Only jobs of the `trainers` this worker has are taken.
    fn claim(
        &self,
        worker_id: &str,
        trainers: &[String],
        now: i64,
        lease_ms: i64,
    ) -> Result<Option<TrainingJob>, JobStoreError>;
    /// Extends the lease when `worker_id` still holds the job.
    fn heartbeat(
        &self,
        id: Uuid,
        worker_id: &str,
        now: i64,
        lease_ms: i64,
    ) -> Result<Lease, JobStoreError>;
    /// Writes state and progress when `worker_id` still holds the job;
    /// a terminal state releases it. `false` when the job was lost.
    fn update_job(
        &self,
        id: Uuid,
        worker_id: &str,
        update: &JobUpdate,
        now: i64,
    ) -> Result<bool, JobStoreError>;
    /// A queued job is cancelled at once; an active one is flagged for its
    /// worker.
    fn request_stop(&self, user_id: Uuid, id: Uuid, now: i64)
        -> Result<StopOutcome, JobStoreError>;
    /// Jobs changed at or after `since` (ms), oldest change first, at most
    /// `limit` (to relay progress).
    fn changed_since(&self, since: i64, limit: i64) -> Result<Vec<TrainingJob>, JobStoreError>;
    /// Succeeded jobs with a model (to register the models at start).
    fn trained_models(&self) -> Result<Vec<TrainingJob>, JobStoreError>;
    /// Jobs per state (for the admin statistics).
    fn count_by_state(&self) -> Result<Vec<(JobState, u64)>, JobStoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_and_classify() {
        for s in JobState::ALL {
            assert_eq!(JobState::parse(s.as_str()), Some(s));
        }
        assert!(JobState::Cancelled.is_terminal() && !JobState::Running.is_terminal());
        assert!(JobState::Validating.is_active() && !JobState::Queued.is_active());
        let p = Progress {
            step: Some(5),
            total_steps: Some(20),
            ..Progress::default()
        };
        assert_eq!(p.fraction(), Some(0.25));
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            serde_json::json!({"step": 5, "total_steps": 20})
        );
    }
}
