//! Workers: take jobs from the durable queue and run them through their
//! trainer, with a lease renewed by a heartbeat.
//!
//! A worker that claims a job whose lease ran out (its previous worker
//! died) resumes it when the trainer can (the provider's job is polled
//! again), restarts it when it had not reached the trainer yet, and
//! otherwise fails it with the reason. Workers run inside the server
//! (`TRAINING_WORKERS`) or as `muse worker`; any number of them share one
//! database.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use muse_core::Clock;
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use crate::dataset::DatasetRepository;
use crate::job::*;
use crate::trainer::*;

/// Where datasets and job directories live under the training root.
pub fn dataset_path(root: &Path, id: Uuid) -> PathBuf {
    root.join("datasets").join(format!("{}.jsonl", id.simple()))
}

/// The job's own directory (its log and the program's output).
pub fn job_dir(root: &Path, id: Uuid) -> PathBuf {
    root.join("jobs").join(id.simple().to_string())
}

pub fn job_log_path(root: &Path, id: Uuid) -> PathBuf {
    job_dir(root, id).join("job.log")
}

/// The trainers a worker can run, by id.
#[derive(Clone, Default)]
pub struct Trainers(BTreeMap<String, Arc<dyn Trainer>>);

impl Trainers {
    pub fn add(&mut self, trainer: Arc<dyn Trainer>) {
        self.0.insert(trainer.id().to_string(), trainer);
    }
    pub fn get(&self, id: &str) -> Option<&Arc<dyn Trainer>> {
        self.0.get(id)
    }
    pub fn ids(&self) -> Vec<String> {
        self.0.keys().cloned().collect()
    }
    pub fn all(&self) -> impl Iterator<Item = &Arc<dyn Trainer>> {
        self.0.values()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What the host does with a trained model.
pub trait ModelSink: Send + Sync + 'static {
    /// Makes the model usable (registry) and returns its registry key.
    fn register(&self, job: &TrainingJob, model: &TrainedModel) -> Result<String, String>;
    /// The files of `base_model` when it is a local model here.
    fn base_model_dir(&self, base_model: &str) -> Option<PathBuf>;
}

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The training root (datasets/, jobs/).
    pub root: PathBuf,
    /// How long a claim holds without a heartbeat.
    pub lease: Duration,
    /// Sleep between claims when the queue is empty.
    pub idle_poll: Duration,
    /// Least time between two progress writes of one job.
    pub progress_every: Duration,
}

pub struct Runner {
    pub jobs: Arc<dyn JobRepository>,
    pub datasets: Arc<dyn DatasetRepository>,
    pub trainers: Trainers,
    pub sink: Arc<dyn ModelSink>,
    pub clock: Arc<dyn Clock>,
    pub config: WorkerConfig,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, JobStoreError> + Send + 'static,
) -> Result<T, JobStoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| JobStoreError::Other(format!("blocking task: {e}")))?
}

/// A held job: writes are refused once it is lost.
struct Held {
    job: TrainingJob,
    worker_id: String,
    lost: bool,
}

impl Runner {
    /// Starts `n` workers on the current tokio runtime; they stop taking
    /// jobs when `shutdown` turns true.
    pub fn spawn(
        self: &Arc<Self>,
        n: usize,
        shutdown: watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let process = Uuid::new_v4().simple().to_string();
        (0..n)
            .map(|i| {
                let me = self.clone();
                let id = format!("{}-{}-{i}", std::process::id(), &process[..8]);
                let shutdown = shutdown.clone();
                tokio::spawn(async move { me.work(id, shutdown).await })
            })
            .collect()
    }

    async fn work(self: Arc<Self>, worker_id: String, mut shutdown: watch::Receiver<bool>) {
        tracing::info!(worker = %worker_id, trainers = ?self.trainers.ids(), "training worker started");
        let trainers = self.trainers.ids();
        loop {
            if *shutdown.borrow() {
                break;
            }
            let (repo, wid, ids) = (self.jobs.clone(), worker_id.clone(), trainers.clone());
            let now = self.clock.now_ms();
            let lease = ms(self.config.lease);
            match blocking(move || repo.claim(&wid, &ids, now, lease)).await {
                Ok(Some(job)) => {
                    let id = job.id;
                    tracing::info!(worker = %worker_id, job = %id, state = job.state.as_str(), "claimed a training job");
                    self.run(&worker_id, job, &mut shutdown).await;
                    continue;
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "could not claim a training job"),
            }
            tokio::select! {
                () = tokio::time::sleep(self.config.idle_poll) => {}
                // A dropped sender never stops the workers.
                Ok(()) = shutdown.changed() => {}
            }
        }
        tracing::info!(worker = %worker_id, "training worker stopped");
    }

    async fn write(&self, held: &mut Held, update: JobUpdate) {
        if held.lost {
            return;
        }
        // updated_at strictly grows per job, so the progress relay can
        // tell every write apart.
        let now = self.clock.now_ms().max(held.job.updated_at + 1);
        let (repo, id, wid, u) = (
            self.jobs.clone(),
            held.job.id,
            held.worker_id.clone(),
            update.clone(),
        );
        match blocking(move || repo.update_job(id, &wid, &u, now)).await {
            Ok(true) => {
                held.job.state = update.state;
                held.job.progress = update.progress;
                held.job.provider_job_id = update.provider_job_id;
                held.job.error = update.error;
                held.job.result_model = update.result_model;
                held.job.updated_at = now;
            }
            Ok(false) => {
                tracing::warn!(job = %id, "the training job was taken by another worker");
                held.lost = true;
            }
            Err(e) => tracing::warn!(job = %id, error = %e, "could not write the training job"),
        }
    }

    fn update(job: &TrainingJob, state: JobState) -> JobUpdate {
        JobUpdate {
            state,
            progress: job.progress.clone(),
            provider_job_id: job.provider_job_id.clone(),
            error: None,
            result_model: None,
        }
    }

    async fn fail(&self, held: &mut Held, reason: String) {
        // The log keeps the whole reason; the job (which its owner reads)
        // never shows the server's paths.
        tracing::info!(job = %held.job.id, reason = %reason, "training job failed");
        let mut u = Self::update(&held.job, JobState::Failed);
        u.error = Some(without_server_paths(&reason));
        self.write(held, u).await;
    }

    /// Runs one claimed job to an end (or until it is lost).
    async fn run(
        &self,
        worker_id: &str,
        claimed: TrainingJob,
        shutdown: &mut watch::Receiver<bool>,
    ) {
        let recovering = claimed.state.is_active();
        let mut held = Held {
            job: claimed,
            worker_id: worker_id.to_string(),
            lost: false,
        };
        let Some(trainer) = self.trainers.get(&held.job.trainer).cloned() else {
            let reason = format!("the {} trainer is not configured", held.job.trainer);
            return self.fail(&mut held, reason).await;
        };
        let resumable = trainer.can_resume() && held.job.provider_job_id.is_some();
        if recovering && held.job.state == JobState::Running && !resumable {
            let reason = format!(
                "interrupted: the worker running this job stopped (crash or restart) and the {} trainer cannot resume a run; start the job again",
                trainer.id()
            );
            return self.fail(&mut held, reason).await;
        }
        if held.job.cancel_requested && !resumable {
            let u = Self::update(&held.job, JobState::Cancelled);
            return self.write(&mut held, u).await;
        }
        if recovering {
            tracing::info!(job = %held.job.id, "resuming a training job whose worker was lost");
        }

        // Validating: the dataset and the parameters, again.
        let mut u = Self::update(&held.job, JobState::Validating);
        u.progress.message = Some("checking the dataset".into());
        if !resumable {
            self.write(&mut held, u).await;
        }
        let (datasets, user, ds) = (self.datasets.clone(), held.job.user_id, held.job.dataset_id);
        let dataset = match tokio::task::spawn_blocking(move || datasets.get(user, ds)).await {
            Ok(Ok(Some(d))) => d,
            Ok(Ok(None)) => return self.fail(&mut held, "the dataset was deleted".into()).await,
            Ok(Err(e)) => {
                return self
                    .fail(&mut held, format!("reading the dataset record: {e}"))
                    .await
            }
            Err(e) => {
                return self
                    .fail(&mut held, format!("reading the dataset record: {e}"))
                    .await
            }
        };
        let path = dataset_path(&self.config.root, dataset.id);
        let Some(format) = dataset.report.format else {
            return self
                .fail(&mut held, "the dataset has no known format".into())
                .await;
        };
        if !path.is_file() {
            return self
                .fail(
                    &mut held,
                    "the dataset file is missing from the data directory".into(),
                )
                .await;
        }
        let hyperparameters =
            match trainer.validate(&held.job.base_model, &held.job.hyperparameters) {
                Ok(hp) => hp,
                Err(issues) => {
                    let text: Vec<String> = issues
                        .iter()
                        .map(|i| format!("{}: {}", i.field, i.message))
                        .collect();
                    return self
                        .fail(
                            &mut held,
                            format!("invalid parameters: {}", text.join("; ")),
                        )
                        .await;
                }
            };
        let dir = job_dir(&self.config.root, held.job.id);
        if let Err(e) = tokio::fs::create_dir_all(&dir).await {
            return self
                .fail(&mut held, format!("cannot create the job directory: {e}"))
                .await;
        }
        let mut u = Self::update(&held.job, JobState::Running);
        u.progress.message = Some(if resumable {
            "resumed".into()
        } else {
            "training".into()
        });
        self.write(&mut held, u).await;
        if held.lost {
            return;
        }

        // Looking the model up reads the disk: not on the async worker.
        let (sink, base) = (self.sink.clone(), held.job.base_model.clone());
        let base_model_dir = tokio::task::spawn_blocking(move || sink.base_model_dir(&base))
            .await
            .ok()
            .flatten();
        let request = TrainRequest {
            job_id: held.job.id,
            dataset_path: path,
            format,
            base_model: held.job.base_model.clone(),
            base_model_dir,
            hyperparameters,
            suffix: held.job.suffix.clone(),
            output_dir: dir.join("output"),
            log_path: job_log_path(&self.config.root, held.job.id),
            provider_job_id: held.job.provider_job_id.clone(),
        };
        let (cancel_tx, cancel_rx) = watch::channel(held.job.cancel_requested);
        let cancel_tx = Arc::new(cancel_tx);
        let heartbeat = self.heartbeat(held.job.id, worker_id.to_string(), cancel_tx.clone());
        let mut shutting_down = false;
        let (events_tx, mut events) = mpsc::channel(256);
        let training = trainer.train(request, events_tx, cancel_rx);
        tokio::pin!(training);
        tokio::pin!(heartbeat);
        let mut last_write = Instant::now();
        let mut pending: Option<JobUpdate> = None;
        let result = loop {
            tokio::select! {
                result = &mut training => break Some(result),
                Ok(()) = shutdown.changed(), if !shutting_down => {
                    if !*shutdown.borrow() {
                        continue;
                    }
                    shutting_down = true;
                    if trainer.can_resume() && held.job.provider_job_id.is_some() {
                        // The provider keeps training: hand the job to the
                        // next worker at once (an expired lease).
                        let (repo, id, wid, now) = (self.jobs.clone(), held.job.id, worker_id.to_string(), self.clock.now_ms());
                        let _ = blocking(move || repo.heartbeat(id, &wid, now, -1)).await;
                        tracing::info!(job = %id, "shutting down: the job is left to the next worker");
                        held.lost = true;
                        break None;
                    }
                    // A program: stop it (SIGTERM, then SIGKILL), then fail the job.
                    let _ = cancel_tx.send(true);
                }
                () = &mut heartbeat => {
                    // Another worker has it now: drop the run here (a
                    // provider job is left running for that worker).
                    held.lost = true;
                    break None;
                }
                Some(event) = events.recv() => {
                    let mut u = pending.take().unwrap_or_else(|| Self::update(&held.job, JobState::Running));
                    match event {
                        TrainerEvent::ProviderJob(id) => {
                            u.provider_job_id = Some(id);
                            self.write(&mut held, u).await;
                            last_write = Instant::now();
                            continue;
                        }
                        TrainerEvent::Progress(p) => merge(&mut u.progress, p),
                    }
                    if last_write.elapsed() >= self.config.progress_every {
                        self.write(&mut held, u).await;
                        last_write = Instant::now();
                    } else {
                        pending = Some(u);
                    }
                }
                () = tokio::time::sleep(self.config.progress_every), if pending.is_some() => {
                    if let Some(u) = pending.take() {
                        self.write(&mut held, u).await;
                        last_write = Instant::now();
                    }
                }
            }
        };
        // Progress still in the channel or held back.
        while let Ok(TrainerEvent::Progress(p)) = events.try_recv() {
            let u = pending.get_or_insert_with(|| Self::update(&held.job, JobState::Running));
            merge(&mut u.progress, p);
        }
        if let Some(u) = pending.take() {
            held.job.progress = u.progress;
        }
        let Some(result) = result.filter(|_| !held.lost) else {
            tracing::warn!(job = %held.job.id, "training job lost to another worker; not recording its end here");
            return;
        };
        match result {
            Ok(model) => {
                let (sink, job, m) = (self.sink.clone(), held.job.clone(), model.clone());
                let registered = tokio::task::spawn_blocking(move || sink.register(&job, &m))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r);
                match registered {
                    Ok(key) => {
                        tracing::info!(job = %held.job.id, model = %key, "training job succeeded");
                        let mut u = Self::update(&held.job, JobState::Succeeded);
                        u.result_model = Some(key);
                        u.progress.message = Some("done".into());
                        self.write(&mut held, u).await;
                    }
                    Err(e) => {
                        self.fail(
                            &mut held,
                            format!("the model was trained but could not be registered: {e}"),
                        )
                        .await
                    }
                }
            }
            Err(TrainError::Cancelled) if shutting_down => {
                self.fail(&mut held, format!(
                    "interrupted: the worker was shut down during training and the {} trainer cannot resume a run; start the job again",
                    trainer.id()
                ))
                .await
            }
            Err(TrainError::Cancelled) => {
                tracing::info!(job = %held.job.id, "training job cancelled");
                let mut u = Self::update(&held.job, JobState::Cancelled);
                u.progress.message = Some("stopped".into());
                self.write(&mut held, u).await;
            }
            Err(e) => self.fail(&mut held, e.to_string()).await,
        }
    }

    /// Renews the lease every third of it, and at least every second so
    /// that a stop asked for (on any replica) reaches the trainer within
    /// about a second; turns `cancel` on then. Resolves when the job is lost.
    async fn heartbeat(&self, id: Uuid, worker_id: String, cancel: Arc<watch::Sender<bool>>) {
        let every = (self.config.lease / 3)
            .min(Duration::from_secs(1))
            .max(Duration::from_millis(50));
        loop {
            tokio::time::sleep(every).await;
            let (repo, wid) = (self.jobs.clone(), worker_id.clone());
            let (now, lease) = (self.clock.now_ms(), ms(self.config.lease));
            match blocking(move || repo.heartbeat(id, &wid, now, lease)).await {
                Ok(Lease::Held { cancel: true }) => {
                    let _ = cancel.send(true);
                }
                Ok(Lease::Held { cancel: false }) => {}
                Ok(Lease::Lost) => return,
                Err(e) => tracing::warn!(job = %id, error = %e, "training heartbeat failed"),
            }
        }
    }
}

/// `reason` with every absolute path cut to its last component
/// (`/srv/muse/data/jobs/42/model` → `…/model`): what a job's owner reads
/// must not reveal how the server's disk is laid out.
pub fn without_server_paths(reason: &str) -> String {
    let mut out = String::with_capacity(reason.len());
    let mut rest = reason;
    while let Some(at) = rest.find('/') {
        let starts_token = at == 0
            || rest[..at]
                .chars()
                .last()
                .is_some_and(|c| c.is_whitespace() || "\"'`(=:".contains(c));
        let end = rest[at..]
            .find(|c: char| c.is_whitespace() || "\"'`),;".contains(c))
            .map_or(rest.len(), |e| at + e);
        let path = &rest[at..end];
        if starts_token && path.matches('/').count() >= 2 {
            out.push_str(&rest[..at]);
            let last = path.trim_end_matches('/').rsplit('/').next().unwrap_or("");
            out.push('…');
            out.push('/');
            out.push_str(last);
            rest = &rest[end..];
        } else {
            out.push_str(&rest[..at + 1]);
            rest = &rest[at + 1..];
        }
    }
    out.push_str(rest);
    out
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Newer fields win; metrics are merged key by key.
fn merge(into: &mut Progress, p: Progress) {
    into.step = p.step.or(into.step);
    into.total_steps = p.total_steps.or(into.total_steps);
    into.epoch = p.epoch.or(into.epoch);
    for (k, v) in p.metrics {
        into.metrics.insert(k, v);
    }
    if p.message.is_some() {
        into.message = p.message;
    }
}

#[cfg(test)]
mod tests {
    use super::without_server_paths;

    #[test]
    fn job_errors_show_no_server_paths() {
        assert_eq!(
            without_server_paths("the program succeeded but /srv/muse/data/jobs/0193/model has no model.onnx and tokenizer.json"),
            "the program succeeded but …/model has no model.onnx and tokenizer.json"
        );
        assert_eq!(
            without_server_paths("cannot create the job directory: Permission denied (os error 13) at \"/var/lib/muse/jobs/7\""),
            "cannot create the job directory: Permission denied (os error 13) at \"…/7\""
        );
        assert_eq!(
            without_server_paths(
                "exit status 1: python3: can't open file '/opt/train.py': [Errno 2]"
            ),
            "exit status 1: python3: can't open file '…/train.py': [Errno 2]"
        );
        assert_eq!(without_server_paths("a / b"), "a / b");
        assert_eq!(
            without_server_paths("loss went to NaN at step 3/10 (lr 1e-3/2)"),
            "loss went to NaN at step 3/10 (lr 1e-3/2)",
            "not paths"
        );
    }
}
