//! The [`Trainer`] trait: something that turns a dataset and a base model
//! into a new model — a provider's fine-tuning API or an external program.

use std::path::PathBuf;

use async_trait::async_trait;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use crate::dataset::DatasetFormat;
use crate::job::Progress;

/// One problem with a hyper-parameter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ParamIssue {
    /// The parameter (`n_epochs`, …), or `base_model`.
    pub field: String,
    pub message: String,
}

impl ParamIssue {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A hyper-parameter a trainer accepts (shown by `GET /api/v1/train/trainers`
/// and checked by [`check_params`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ParamSpec {
    pub name: &'static str,
    /// `integer`, `number`, `integer|"auto"` or `number|"auto"`.
    pub kind: &'static str,
    /// Integers: inclusive; numbers: exclusive below, inclusive above.
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub description: &'static str,
}

/// What a trainer is told about the job it runs.
#[derive(Debug, Clone)]
pub struct TrainRequest {
    pub job_id: Uuid,
    pub dataset_path: PathBuf,
    pub format: DatasetFormat,
    pub base_model: String,
    /// The base model's files, when it is a local model on this machine.
    pub base_model_dir: Option<PathBuf>,
    /// As returned by [`Trainer::validate`].
    pub hyperparameters: Value,
    pub suffix: Option<String>,
    /// A directory of the job's own (the model goes under it).
    pub output_dir: PathBuf,
    /// The job's log file (stderr of programs, provider events).
    pub log_path: PathBuf,
    /// Set when the job is resumed after its worker was lost.
    pub provider_job_id: Option<String>,
}

/// What a trainer reports while it runs.
#[derive(Debug, Clone, PartialEq)]
pub enum TrainerEvent {
    Progress(Progress),
    /// The provider's own job id: stored, so a restart can resume.
    ProviderJob(String),
}

/// The trained model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrainedModel {
    /// A model served by a remote provider (`openai`, `ft:gpt-4o-mini:…`).
    Remote { provider: String, model: String },
    /// An ONNX causal-LM directory to serve locally, under `name`.
    Local { name: String, dir: PathBuf },
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The job was stopped (at the trainer).
    #[error("cancelled")]
    Cancelled,
    #[error("the time limit of {0} s was reached")]
    TimedOut(u64),
    /// The trainer reports the training failed (the provider's or the
    /// program's reason).
    #[error("{0}")]
    Failed(String),
    /// The trainer could not be reached or misbehaved.
    #[error("trainer error: {0}")]
    Trainer(String),
}

/// A way to train. Implementations must stop promptly (and make the
/// provider or program stop) when `cancel` turns true.
#[async_trait]
pub trait Trainer: Send + Sync + 'static {
    /// Stable id users pass as `trainer` (`openai`, `external`).
    fn id(&self) -> &str;
    fn description(&self) -> String;
    fn parameters(&self) -> Vec<ParamSpec>;
    /// Checks the base model and hyper-parameters; returns every problem,
    /// or the hyper-parameters as they will be used.
    fn validate(&self, base_model: &str, hyperparameters: &Value)
        -> Result<Value, Vec<ParamIssue>>;
    /// Whether a job whose worker died can be picked up again
    /// (with `provider_job_id`).
    fn can_resume(&self) -> bool;
    /// USD per million training tokens for `base_model`, where published.
    fn price_per_million_tokens(&self, base_model: &str) -> Option<f64>;
    /// Epochs the cost estimate assumes for these hyper-parameters.
    fn epochs(&self, hyperparameters: &Value) -> u64;
    /// Trains. Progress goes to `events` (dropped events are fine: a
    /// trainer never waits on a slow reader).
    async fn train(
        &self,
        request: TrainRequest,
        events: mpsc::Sender<TrainerEvent>,
        cancel: watch::Receiver<bool>,
    ) -> Result<TrainedModel, TrainError>;
}

/// Checks `hyperparameters` against a trainer's declared parameters (each
/// problem's field is `hyperparameters.<name>`, as docs/training.md says):
/// an object (or null) of known names, integers within `[min, max]`,
/// numbers within `(min, max]`, `"auto"` where the kind allows it. Pushes
/// every problem; returns the accepted values.
pub fn check_params(
    hyperparameters: &Value,
    specs: &[ParamSpec],
    issues: &mut Vec<ParamIssue>,
) -> serde_json::Map<String, Value> {
    let mut out = serde_json::Map::new();
    let hp = match hyperparameters {
        Value::Object(m) => m,
        Value::Null => return out,
        _ => {
            issues.push(ParamIssue::new(
                "hyperparameters",
                "must be an object of parameters",
            ));
            return out;
        }
    };
    let known: Vec<&str> = specs.iter().map(|s| s.name).collect();
    for k in hp.keys() {
        if !known.contains(&k.as_str()) {
            issues.push(ParamIssue::new(
                format!("hyperparameters.{k}"),
                format!("unknown parameter; this trainer takes {}", known.join(", ")),
            ));
        }
    }
    for spec in specs {
        let Some(v) = hp.get(spec.name) else { continue };
        let auto_ok = spec.kind.ends_with("|\"auto\"");
        let (min, max) = (spec.min.unwrap_or(f64::MIN), spec.max.unwrap_or(f64::MAX));
        let ok = if auto_ok && v.as_str() == Some("auto") {
            true
        } else if spec.kind.starts_with("integer") {
            v.as_i64()
                .is_some_and(|n| n as f64 >= min && n as f64 <= max)
        } else {
            v.as_f64().is_some_and(|n| n > min && n <= max)
        };
        if ok {
            out.insert(spec.name.to_string(), v.clone());
        } else {
            let (what, range) = if spec.kind.starts_with("integer") {
                ("an integer", format!("from {min} to {max}"))
            } else {
                ("a number", format!("above {min} and at most {max}"))
            };
            let auto = if auto_ok { " or \"auto\"" } else { "" };
            issues.push(ParamIssue::new(
                format!("hyperparameters.{}", spec.name),
                format!("must be {what} {range}{auto}"),
            ));
        }
    }
    out
}
