//! Training in the server: the trainers built from the configuration, the
//! in-process workers, the relay that pushes job changes to WebSockets
//! (and registers trained models on every replica), and who owns which
//! trained model.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use muse_core::{Clock, SystemClock};
use muse_inference::ModelRegistry;
use muse_persistence::{Database, DieselTrainingRepository};
use muse_training::{
    DatasetRepository, ExternalConfig, ExternalTrainer, JobRepository, JobState, JobStoreError,
    ModelSink, OpenAiTrainer, OpenAiTrainerConfig, Runner, TrainedModel, Trainers, TrainingJob,
    WorkerConfig,
};
use serde_json::{json, Value};
use tokio::sync::watch;
use uuid::Uuid;

use crate::config::{Config, TrainingConfig};

/// Where a trained local model lives: `<root>/models/<job id>`.
pub fn trained_model_dir(root: &Path, job_id: Uuid) -> PathBuf {
    root.join("models").join(job_id.simple().to_string())
}

/// Told of every job change written through this process (a claim,
/// progress, a state, a stop): wakes this process's progress relay at once
/// and, with Redis, the other replicas' (`muse:jobs`).
#[derive(Default)]
pub struct JobSignals {
    /// Wakes the relay of this process.
    pub local: tokio::sync::Notify,
    /// Whether other processes' changes arrive over Redis (the relay then
    /// polls only as a safety net).
    pub channel_up: std::sync::atomic::AtomicBool,
    publish: RwLock<Option<JobHook>>,
}

/// Told of a changed job (to announce it to other processes).
pub type JobHook = Arc<dyn Fn(Uuid) + Send + Sync>;

impl JobSignals {
    fn changed(&self, id: Uuid) {
        self.local.notify_one();
        let publish = self.publish.read().ok().and_then(|p| p.clone());
        if let Some(p) = publish {
            p(id);
        }
    }

    /// Registers who relays job changes to other processes.
    pub fn on_change(&self, publish: JobHook) {
        if let Ok(mut p) = self.publish.write() {
            *p = Some(publish);
        }
    }
}

/// The job store, telling [`JobSignals`] of every change written.
struct SignallingJobs {
    inner: Arc<dyn JobRepository>,
    signals: Arc<JobSignals>,
}

impl JobRepository for SignallingJobs {
    fn insert_job(&self, job: &TrainingJob) -> Result<(), JobStoreError> {
        self.inner.insert_job(job)?;
        self.signals.changed(job.id);
        Ok(())
    }
    fn job(&self, user_id: Option<Uuid>, id: Uuid) -> Result<Option<TrainingJob>, JobStoreError> {
        self.inner.job(user_id, id)
    }
    fn jobs(
        &self,
        user_id: Option<Uuid>,
        filter: &muse_training::JobFilter,
        page: muse_core::PageRequest,
    ) -> Result<muse_core::Page<TrainingJob>, JobStoreError> {
        self.inner.jobs(user_id, filter, page)
    }
    fn unfinished_jobs(&self, user_id: Uuid) -> Result<u64, JobStoreError> {
        self.inner.unfinished_jobs(user_id)
    }
    fn jobs_using_dataset(&self, dataset_id: Uuid) -> Result<u64, JobStoreError> {
        self.inner.jobs_using_dataset(dataset_id)
    }
    fn claim(
        &self,
        worker_id: &str,
        trainers: &[String],
        now: i64,
        lease_ms: i64,
    ) -> Result<Option<TrainingJob>, JobStoreError> {
        let claimed = self.inner.claim(worker_id, trainers, now, lease_ms)?;
        if let Some(j) = &claimed {
            self.signals.changed(j.id);
        }
        Ok(claimed)
    }
    fn heartbeat(
        &self,
        id: Uuid,
        worker_id: &str,
        now: i64,
        lease_ms: i64,
    ) -> Result<muse_training::Lease, JobStoreError> {
        self.inner.heartbeat(id, worker_id, now, lease_ms)
    }
    fn update_job(
        &self,
        id: Uuid,
        worker_id: &str,
        update: &muse_training::JobUpdate,
        now: i64,
    ) -> Result<bool, JobStoreError> {
        let held = self.inner.update_job(id, worker_id, update, now)?;
        if held {
            self.signals.changed(id);
        }
        Ok(held)
    }
    fn request_stop(
        &self,
        user_id: Uuid,
        id: Uuid,
        now: i64,
    ) -> Result<muse_training::StopOutcome, JobStoreError> {
        let outcome = self.inner.request_stop(user_id, id, now)?;
        self.signals.changed(id);
        Ok(outcome)
    }
    fn changed_since(&self, since: i64, limit: i64) -> Result<Vec<TrainingJob>, JobStoreError> {
        self.inner.changed_since(since, limit)
    }
    fn trained_models(&self) -> Result<Vec<TrainingJob>, JobStoreError> {
        self.inner.trained_models()
    }
    fn count_by_state(&self) -> Result<Vec<(JobState, u64)>, JobStoreError> {
        self.inner.count_by_state()
    }
}

pub struct Training {
    pub jobs: Arc<dyn JobRepository>,
    /// Told of every job change written here.
    pub signals: Arc<JobSignals>,
    pub datasets: Arc<dyn DatasetRepository>,
    pub trainers: Trainers,
    /// `<MUSE_DATA_DIR>/training`.
    pub root: PathBuf,
    pub config: TrainingConfig,
    /// Trained model key → its owner (only they may use it).
    owners: RwLock<HashMap<String, Uuid>>,
}

impl Training {
    pub fn new(config: &Config, db: &Database) -> Result<Self, String> {
        let repo = Arc::new(DieselTrainingRepository::new(db.clone()));
        let signals = Arc::new(JobSignals::default());
        Ok(Self {
            jobs: Arc::new(SignallingJobs {
                inner: repo.clone(),
                signals: signals.clone(),
            }),
            signals,
            datasets: repo,
            trainers: build_trainers(config)?,
            root: config.data_dir.join("training"),
            config: config.training.clone(),
            owners: RwLock::default(),
        })
    }

    /// The owner of a trained model, if `key` is one.
    pub fn owner_of(&self, key: &str) -> Option<Uuid> {
        self.owners.read().ok()?.get(key).copied()
    }

    /// Whether `user` may see and call the model `key`.
    pub fn visible(&self, key: &str, user: Uuid) -> bool {
        self.owner_of(key).is_none_or(|o| o == user)
    }

    /// Registers the model of a succeeded job in `models` (idempotent).
    pub fn register(&self, models: &ModelRegistry, job: &TrainingJob) {
        let Some(key) = job.result_model.as_deref() else {
            return;
        };
        if job.state != JobState::Succeeded {
            return;
        }
        if let Ok(mut o) = self.owners.write() {
            o.insert(key.to_string(), job.user_id);
        }
        if models.get(key).is_some() {
            return;
        }
        let result = match key.strip_prefix("local/") {
            Some(name) => models.register_local_dir(name, trained_model_dir(&self.root, job.id)),
            None => match key.split_once('/') {
                Some((provider, model)) => models.register_remote(provider, model),
                None => return,
            },
        };
        match result {
            Ok(_) => tracing::info!(model = key, job = %job.id, "trained model registered"),
            Err(e) => {
                tracing::warn!(model = key, job = %job.id, error = %e, "cannot serve a trained model here")
            }
        }
    }

    /// Registers every trained model found in the database (blocking).
    pub fn register_all(&self, models: &ModelRegistry) {
        match self.jobs.trained_models() {
            Ok(jobs) => jobs.iter().for_each(|j| self.register(models, j)),
            Err(e) => tracing::warn!(error = %e, "cannot list the trained models"),
        }
    }

    /// The workers, ready to spawn.
    pub fn runner(self: &Arc<Self>, models: Arc<ModelRegistry>) -> Arc<Runner> {
        Arc::new(Runner {
            jobs: self.jobs.clone(),
            datasets: self.datasets.clone(),
            trainers: self.trainers.clone(),
            sink: Arc::new(RegistrySink {
                training: self.clone(),
                models,
            }),
            clock: Arc::new(SystemClock),
            config: WorkerConfig {
                root: self.root.clone(),
                lease: Duration::from_secs(self.config.lease_secs),
                idle_poll: Duration::from_millis(self.config.poll_ms),
                progress_every: Duration::from_millis(500),
            },
        })
    }
}

/// `TRAINING_EXTERNAL_COMMAND` → `external`; the OpenAI provider →
/// `openai`; the compatible server with `TRAINING_COMPATIBLE` → its name.
fn build_trainers(config: &Config) -> Result<Trainers, String> {
    let t = &config.training;
    let mut trainers = Trainers::default();
    if let Some(command) = &t.external_command {
        trainers.add(Arc::new(ExternalTrainer::new(ExternalConfig {
            command: command.clone(),
            time_limit: Duration::from_secs(t.external_time_limit_secs),
            grace: Duration::from_secs(t.external_grace_secs),
        })?));
    }
    let poll = Duration::from_millis(t.provider_poll_ms);
    if let Some(o) = &config.llm.openai {
        trainers.add(Arc::new(OpenAiTrainer::new(OpenAiTrainerConfig {
            provider: "openai".into(),
            base_url: o
                .base_url
                .clone()
                .unwrap_or_else(|| "https://api.openai.com/v1".into()),
            api_key: o.api_key.expose().clone(),
            poll_interval: poll,
            openai_prices: true,
        })));
    }
    if let (Some(c), true) = (&config.llm.compatible, t.compatible) {
        trainers.add(Arc::new(OpenAiTrainer::new(OpenAiTrainerConfig {
            provider: c.name.clone(),
            base_url: c.base_url.clone(),
            api_key: c.api_key.expose().clone(),
            poll_interval: poll,
            openai_prices: false,
        })));
    }
    Ok(trainers)
}

/// Puts a trained model where every replica finds it, and registers it.
struct RegistrySink {
    training: Arc<Training>,
    models: Arc<ModelRegistry>,
}

impl ModelSink for RegistrySink {
    fn register(&self, job: &TrainingJob, model: &TrainedModel) -> Result<String, String> {
        let key = match model {
            TrainedModel::Remote { provider, model } => format!("{provider}/{model}"),
            TrainedModel::Local { name, dir } => {
                let target = trained_model_dir(&self.training.root, job.id);
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
                }
                if target.exists() {
                    std::fs::remove_dir_all(&target).map_err(|e| e.to_string())?;
                }
                std::fs::rename(dir, &target)
                    .map_err(|e| format!("moving the model into place: {e}"))?;
                format!("local/{name}")
            }
        };
        let done = TrainingJob {
            state: JobState::Succeeded,
            result_model: Some(key.clone()),
            ..job.clone()
        };
        self.training.register(&self.models, &done);
        Ok(key)
    }

    fn base_model_dir(&self, base_model: &str) -> Option<PathBuf> {
        let name = base_model.strip_prefix("local/")?;
        self.models.local()?.model_dir(name)
    }
}

/// A job as the API and the WebSocket show it.
pub fn job_view(j: &TrainingJob) -> Value {
    json!({
        "job_id": j.id,
        "dataset_id": j.dataset_id,
        "base_model": j.base_model,
        "trainer": j.trainer,
        "hyperparameters": j.hyperparameters,
        "suffix": j.suffix,
        "status": j.state.as_str(),
        "progress": j.progress,
        "step": j.progress.step,
        "total_steps": j.progress.total_steps,
        "fraction": j.progress.fraction(),
        "metrics": j.progress.metrics,
        "error": j.error,
        "result_model": j.result_model,
        "provider_job_id": j.provider_job_id,
        "cancel_requested": j.cancel_requested,
        "attempts": j.attempts,
        "created_at": crate::routes::rfc3339(j.created_at),
        "started_at": j.started_at.map(crate::routes::rfc3339),
        "finished_at": j.finished_at.map(crate::routes::rfc3339),
        "updated_at": crate::routes::rfc3339(j.updated_at),
    })
}

/// Running workers, and how to stop them.
pub struct Workers {
    stop: watch::Sender<bool>,
    handles: Vec<tokio::task::JoinHandle<()>>,
}

impl Workers {
    /// Stops taking jobs; a running external program is stopped (and its
    /// job failed as interrupted), a provider job is handed to the next
    /// worker. Waits up to `wait` for that.
    pub async fn shutdown(self, wait: Duration) {
        let _ = self.stop.send(true);
        let all = futures_util::future::join_all(self.handles);
        if tokio::time::timeout(wait, all).await.is_err() {
            tracing::warn!("training workers did not stop in time");
        }
    }
}

/// How long stopping may take: the program's grace period, and a margin.
pub fn shutdown_wait(config: &TrainingConfig) -> Duration {
    Duration::from_secs(config.external_grace_secs + 5)
}

/// Starts the in-process workers and the progress relay on the current
/// runtime.
pub fn start(state: &crate::state::AppState) -> Workers {
    let (stop, stopped) = watch::channel(false);
    let training = state.training.clone();
    let mut handles = Vec::new();
    if training.config.workers > 0 {
        if training.trainers.is_empty() {
            tracing::info!(
                "no trainer is configured: training jobs cannot run (see docs/training.md)"
            );
        }
        handles = training
            .runner(state.models.clone())
            .spawn(training.config.workers, stopped);
    }
    spawn_relay(state.clone());
    Workers { stop, handles }
}

/// Every `TRAINING_PROGRESS_POLL_MS`, sends the jobs that changed to their
/// owners' sockets on this replica, and registers newly trained models.
/// Reading the database (not the local workers) makes it work with
/// `muse worker` processes and across replicas.
fn spawn_relay(state: crate::state::AppState) {
    let every = Duration::from_millis(state.training.config.progress_poll_ms);
    actix_web::rt::spawn(async move {
        // Changes are read again with an overlap, and sent once per
        // (job, updated_at).
        const OVERLAP_MS: i64 = 2_000;
        let mut since = SystemClock.now_ms() - OVERLAP_MS;
        let mut sent: HashMap<Uuid, i64> = HashMap::new();
        // Polling is the safety net: with Redis relaying changes between
        // processes it runs every 5 s; without (or while it is down) every
        // TRAINING_PROGRESS_POLL_MS. Changes written here, or announced by
        // another process over Redis, wake it at once.
        let safety_net = Duration::from_secs(5).max(every);
        loop {
            let wait = if state
                .training
                .signals
                .channel_up
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                safety_net
            } else {
                every
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = state.training.signals.local.notified() => {}
            }
            let jobs = state.training.jobs.clone();
            let from = since;
            let changed =
                match tokio::task::spawn_blocking(move || jobs.changed_since(from, 500)).await {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "training progress relay: cannot read jobs");
                        continue;
                    }
                    Err(_) => continue,
                };
            let mut newest = since;
            for job in changed {
                newest = newest.max(job.updated_at);
                if sent.get(&job.id).is_some_and(|&at| at >= job.updated_at) {
                    continue;
                }
                sent.insert(job.id, job.updated_at);
                if job.state == JobState::Succeeded {
                    let (training, models, j) =
                        (state.training.clone(), state.models.clone(), job.clone());
                    let _ =
                        tokio::task::spawn_blocking(move || training.register(&models, &j)).await;
                }
                let mut message = job_view(&job);
                message["type"] = json!("training.progress");
                state.hub.publish(job.user_id, &message);
            }
            since = since.max(newest - OVERLAP_MS);
            sent.retain(|_, at| *at >= since - OVERLAP_MS);
        }
    });
}

/// `muse worker`: training workers without the HTTP server, until
/// SIGTERM or SIGINT.
pub async fn run_worker(
    config: Config,
    workers: Option<usize>,
) -> Result<(), crate::app::StartError> {
    let n = workers.unwrap_or(config.training.workers).max(1);
    let config_redis = config
        .rate_limits
        .redis_url
        .as_ref()
        .map(|u| u.expose().to_string());
    let (training, models) = actix_web::web::block(move || -> Result<_, crate::app::StartError> {
        let db = crate::server::open_database(&config)?;
        let (models, _) = crate::inference::build_registry(&config.llm)?;
        let training = Training::new(&config, &db).map_err(|e| {
            crate::app::StartError::Config(crate::config::ConfigError::Invalid {
                var: "TRAINING_EXTERNAL_COMMAND".into(),
                message: e,
            })
        })?;
        Ok((Arc::new(training), Arc::new(models)))
    })
    .await
    .map_err(|e| crate::app::StartError::Admin(e.to_string()))??;
    if training.trainers.is_empty() {
        tracing::warn!("no trainer is configured (TRAINING_EXTERNAL_COMMAND, OPENAI_API_KEY): this worker will take no job");
    }
    // With Redis, the servers' relays hear of this worker's progress at once.
    if let Some(url) = &config_redis {
        match muse_persistence::RedisEvents::new(url) {
            Ok(events) => crate::server::relay_job_changes(&Arc::new(events), &training.signals),
            Err(e) => tracing::warn!(error = %e, "job progress is not announced over Redis"),
        }
    }
    let (stop, stopped) = watch::channel(false);
    let handles = training.runner(models).spawn(n, stopped);
    tracing::info!(workers = n, trainers = ?training.trainers.ids(), "muse worker running");
    wait_for_signal().await;
    tracing::info!("stopping: no new jobs are taken");
    Workers { stop, handles }
        .shutdown(shutdown_wait(&training.config))
        .await;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
