//! Fine-tuning for Muse, as an orchestrator: datasets validated line by
//! line as they stream in ([`DatasetValidator`]), durable jobs in a queue
//! with leases ([`JobRepository`]), workers that run them ([`Runner`])
//! through a [`Trainer`] — a provider's fine-tuning API ([`OpenAiTrainer`])
//! or the operator's own program ([`ExternalTrainer`]) — and hand the
//! trained model to the host ([`ModelSink`]).
//!
//! No HTTP and no database here: repositories are traits (diesel ones are
//! in `muse-persistence`), so the crate can be embedded elsewhere.

pub mod dataset;
pub mod external;
pub mod job;
pub mod openai;
pub mod trainer;
pub mod worker;

pub use dataset::{
    Dataset, DatasetFormat, DatasetRepository, DatasetStoreError, DatasetValidator,
    EstimateCounter, LineIssue, LineSplitter, TokenCounter, ValidationReport, MAX_REPORTED_ISSUES,
    MIN_ROWS,
};
pub use external::{local_model_name, ExternalConfig, ExternalTrainer};
pub use job::{
    JobFilter, JobRepository, JobState, JobStoreError, JobUpdate, Lease, Progress, StopOutcome,
    TrainingJob,
};
pub use openai::{OpenAiTrainer, OpenAiTrainerConfig};
pub use trainer::{
    ParamIssue, ParamSpec, TrainError, TrainRequest, TrainedModel, Trainer, TrainerEvent,
};
pub use worker::{dataset_path, job_dir, job_log_path, ModelSink, Runner, Trainers, WorkerConfig};
