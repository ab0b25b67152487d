//! [`OpenAiTrainer`]: OpenAI's fine-tuning API (and servers that speak it)
//! through async-openai — upload the file, create the job, poll it and its
//! events, cancel it. A job whose worker died is resumed by polling the
//! provider's job again.

use std::collections::HashSet;
use std::time::Duration;

use async_openai::config::OpenAIConfig;
use async_openai::traits::RequestOptionsBuilder;
use async_openai::types::files::{CreateFileRequest, FileInput, FilePurpose};
use async_openai::types::InputSource;
use async_openai::Client;
use async_trait::async_trait;
use serde_json::{json, Map, Value};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch};

use crate::job::Progress;
use crate::trainer::*;

/// Polls that may fail in a row (network, 5xx) before the job fails.
const MAX_POLL_FAILURES: u32 = 10;

/// USD per million training tokens, by model prefix (OpenAI's published
/// prices; the longest matching prefix wins).
const TRAINING_PRICES: [(&str, f64); 7] = [
    ("gpt-4o-mini", 3.0),
    ("gpt-4o", 25.0),
    ("gpt-4.1-nano", 1.5),
    ("gpt-4.1-mini", 5.0),
    ("gpt-4.1", 25.0),
    ("gpt-3.5-turbo", 8.0),
    ("davinci-002", 6.0),
];

#[derive(Debug, Clone)]
pub struct OpenAiTrainerConfig {
    /// The registry provider the trained models are served by (`openai`,
    /// or a compatible server's name); also this trainer's id.
    pub provider: String,
    pub base_url: String,
    pub api_key: String,
    pub poll_interval: Duration,
    /// Whether OpenAI's training prices apply (not for compatible servers).
    pub openai_prices: bool,
}

pub struct OpenAiTrainer {
    config: OpenAiTrainerConfig,
    client: Client<OpenAIConfig>,
}

impl OpenAiTrainer {
    pub fn new(config: OpenAiTrainerConfig) -> Self {
        let client = Client::with_config(
            OpenAIConfig::new()
                .with_api_base(config.base_url.trim_end_matches('/'))
                .with_api_key(config.api_key.clone()),
        );
        Self { config, client }
    }

    /// The provider's model name: `openai/gpt-4o-mini` → `gpt-4o-mini`.
    fn model_name<'a>(&self, base_model: &'a str) -> &'a str {
        base_model
            .strip_prefix(self.config.provider.as_str())
            .and_then(|m| m.strip_prefix('/'))
            .unwrap_or(base_model)
    }

    async fn start(&self, request: &TrainRequest, log: &mut Log) -> Result<String, TrainError> {
        let file = self
            .client
            .files()
            .create(CreateFileRequest {
                file: FileInput {
                    source: InputSource::Path {
                        path: request.dataset_path.clone(),
                    },
                },
                purpose: FilePurpose::FineTune,
                expires_after: None,
            })
            .await
            .map_err(|e| TrainError::Trainer(format!("uploading the dataset: {e}")))?;
        log.line(&format!("uploaded the dataset as {}", file.id))
            .await;
        let hp = request
            .hyperparameters
            .as_object()
            .cloned()
            .unwrap_or_default();
        let mut method_hp = Map::new();
        for k in ["n_epochs", "batch_size", "learning_rate_multiplier"] {
            if let Some(v) = hp.get(k) {
                method_hp.insert(k.to_string(), v.clone());
            }
        }
        let mut body = json!({
            "model": self.model_name(&request.base_model),
            "training_file": file.id,
            "method": {"type": "supervised", "supervised": {"hyperparameters": method_hp}},
            "metadata": {"muse_job_id": request.job_id.to_string()},
        });
        if let Some(seed) = hp.get("seed") {
            body["seed"] = seed.clone();
        }
        if let Some(s) = &request.suffix {
            body["suffix"] = json!(s);
        }
        let job: Value = self
            .client
            .fine_tuning()
            .create_byot(body)
            .await
            .map_err(|e| TrainError::Failed(format!("the provider refused the job: {e}")))?;
        let id = job["id"]
            .as_str()
            .ok_or_else(|| TrainError::Trainer("the provider's job has no id".into()))?
            .to_string();
        log.line(&format!("created fine-tuning job {id}")).await;
        Ok(id)
    }

    /// New events, oldest first, as progress.
    async fn events(
        &self,
        id: &str,
        seen: &mut HashSet<String>,
        log: &mut Log,
    ) -> Result<Vec<Progress>, async_openai::error::OpenAIError> {
        let page: Value = self
            .client
            .fine_tuning()
            .query(&[("limit", "100")])?
            .list_events_byot(id)
            .await?;
        let mut out = Vec::new();
        let events = page["data"].as_array().cloned().unwrap_or_default();
        // Newest first on the wire.
        for e in events.into_iter().rev() {
            let Some(eid) = e["id"].as_str() else {
                continue;
            };
            if !seen.insert(eid.to_string()) {
                continue;
            }
            let message = e["message"].as_str().map(str::to_string);
            if let Some(m) = &message {
                log.line(m).await;
            }
            let data = e["data"].as_object().cloned().unwrap_or_default();
            let mut metrics = data.clone();
            metrics.remove("step");
            metrics.remove("total_steps");
            out.push(Progress {
                step: data.get("step").and_then(Value::as_u64),
                total_steps: data.get("total_steps").and_then(Value::as_u64),
                epoch: None,
                metrics,
                message,
            });
        }
        Ok(out)
    }
}

/// Provider events and Muse's notes, appended to the job log.
struct Log(Option<tokio::fs::File>);

impl Log {
    async fn line(&mut self, text: &str) {
        if let Some(f) = &mut self.0 {
            let _ = f.write_all(format!("{text}\n").as_bytes()).await;
        }
    }
}

#[async_trait]
impl Trainer for OpenAiTrainer {
    fn id(&self) -> &str {
        &self.config.provider
    }

    fn description(&self) -> String {
        format!(
            "fine-tuning API of {} ({}); the result is served as {}/ft:…",
            self.config.provider, self.config.base_url, self.config.provider
        )
    }

    fn parameters(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec {
                name: "n_epochs",
                kind: "integer|\"auto\"",
                min: Some(1.0),
                max: Some(50.0),
                description: "passes over the dataset",
            },
            ParamSpec {
                name: "batch_size",
                kind: "integer|\"auto\"",
                min: Some(1.0),
                max: Some(256.0),
                description: "rows per step",
            },
            ParamSpec {
                name: "learning_rate_multiplier",
                kind: "number|\"auto\"",
                min: Some(0.0),
                max: Some(10.0),
                description: "scales the provider's learning rate",
            },
            ParamSpec {
                name: "seed",
                kind: "integer",
                min: Some(0.0),
                max: Some(2_147_483_647.0),
                description: "reproducibility",
            },
        ]
    }

    fn validate(
        &self,
        base_model: &str,
        hyperparameters: &Value,
    ) -> Result<Value, Vec<ParamIssue>> {
        let mut issues = Vec::new();
        let name = self.model_name(base_model);
        if name.is_empty()
            || name.len() > 200
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
        {
            issues.push(ParamIssue::new(
                "base_model",
                format!(
                    "must be a model of {} (letters, digits, - _ . :), e.g. {}/gpt-4o-mini-2024-07-18",
                    self.config.provider, self.config.provider
                ),
            ));
        }
        let out = check_params(hyperparameters, &self.parameters(), &mut issues);
        if issues.is_empty() {
            Ok(Value::Object(out))
        } else {
            Err(issues)
        }
    }

    fn can_resume(&self) -> bool {
        true
    }

    fn price_per_million_tokens(&self, base_model: &str) -> Option<f64> {
        if !self.config.openai_prices {
            return None;
        }
        let name = self.model_name(base_model);
        TRAINING_PRICES
            .iter()
            .filter(|(prefix, _)| name.starts_with(prefix))
            .max_by_key(|(prefix, _)| prefix.len())
            .map(|(_, p)| *p)
    }

    /// `"auto"` is counted as 3 epochs (the provider decides).
    fn epochs(&self, hyperparameters: &Value) -> u64 {
        hyperparameters["n_epochs"].as_u64().unwrap_or(3)
    }

    async fn train(
        &self,
        request: TrainRequest,
        events: mpsc::Sender<TrainerEvent>,
        mut cancel: watch::Receiver<bool>,
    ) -> Result<TrainedModel, TrainError> {
        let mut log = Log(tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&request.log_path)
            .await
            .ok());
        let id = match &request.provider_job_id {
            Some(id) => {
                log.line(&format!("resuming: polling fine-tuning job {id} again"))
                    .await;
                id.clone()
            }
            None => {
                if *cancel.borrow() {
                    return Err(TrainError::Cancelled);
                }
                let id = self.start(&request, &mut log).await?;
                let _ = events.send(TrainerEvent::ProviderJob(id.clone())).await;
                id
            }
        };
        let mut seen = HashSet::new();
        let mut failures = 0u32;
        let mut cancel_sent = false;
        loop {
            if *cancel.borrow() && !cancel_sent {
                cancel_sent = true;
                log.line("muse: cancelling at the provider").await;
                if let Err(e) = self
                    .client
                    .fine_tuning()
                    .cancel_byot::<_, Value>(id.as_str())
                    .await
                {
                    log.line(&format!("muse: the cancel call failed: {e}"))
                        .await;
                }
            }
            let polled: Result<Value, _> =
                self.client.fine_tuning().retrieve_byot(id.as_str()).await;
            let job = match polled {
                Ok(job) => {
                    failures = 0;
                    job
                }
                Err(e) => {
                    failures += 1;
                    log.line(&format!("muse: polling failed ({failures}): {e}"))
                        .await;
                    if failures >= MAX_POLL_FAILURES {
                        return Err(TrainError::Trainer(format!(
                            "the provider could not be polled {MAX_POLL_FAILURES} times in a row: {e}"
                        )));
                    }
                    Value::Null
                }
            };
            if !job.is_null() {
                match self.events(&id, &mut seen, &mut log).await {
                    Ok(progress) => {
                        for p in progress {
                            let _ = events.try_send(TrainerEvent::Progress(p));
                        }
                    }
                    Err(e) => log.line(&format!("muse: reading events failed: {e}")).await,
                }
                match job["status"].as_str().unwrap_or_default() {
                    "succeeded" => {
                        let model = job["fine_tuned_model"].as_str().ok_or_else(|| {
                            TrainError::Trainer(
                                "the job succeeded without a fine_tuned_model".into(),
                            )
                        })?;
                        log.line(&format!("succeeded: {model}")).await;
                        return Ok(TrainedModel::Remote {
                            provider: self.config.provider.clone(),
                            model: model.to_string(),
                        });
                    }
                    "failed" => {
                        let reason = job["error"]["message"]
                            .as_str()
                            .unwrap_or("the provider gave no reason");
                        log.line(&format!("failed: {reason}")).await;
                        return Err(TrainError::Failed(format!(
                            "the provider failed the job: {reason}"
                        )));
                    }
                    "cancelled" => return Err(TrainError::Cancelled),
                    _ => {}
                }
            }
            let wait = tokio::time::sleep(self.config.poll_interval);
            tokio::select! {
                () = wait => {}
                _ = cancel.changed(), if !cancel_sent => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trainer() -> OpenAiTrainer {
        OpenAiTrainer::new(OpenAiTrainerConfig {
            provider: "openai".into(),
            base_url: "http://127.0.0.1:9/v1".into(),
            api_key: "sk-test".into(),
            poll_interval: Duration::from_millis(10),
            openai_prices: true,
        })
    }

    #[test]
    fn prices_and_parameters() {
        let t = trainer();
        assert_eq!(
            t.price_per_million_tokens("openai/gpt-4o-mini-2024-07-18"),
            Some(3.0)
        );
        assert_eq!(t.price_per_million_tokens("gpt-4o-2024-08-06"), Some(25.0));
        assert_eq!(t.price_per_million_tokens("llama-3"), None);
        assert_eq!(
            t.validate(
                "openai/gpt-4o-mini",
                &json!({"n_epochs": "auto", "seed": 7})
            )
            .unwrap(),
            json!({"n_epochs": "auto", "seed": 7})
        );
        let e = t
            .validate("bad model!", &json!({"batch_size": 0}))
            .unwrap_err();
        assert_eq!(e.len(), 2);
        assert_eq!(t.epochs(&json!({"n_epochs": "auto"})), 3);
    }
}
