//! Model pulls started by administrators (`POST /api/v1/admin/models/pull`):
//! one background download per model, its progress in memory for
//! `GET /api/v1/admin/models/pulls`, in the logs and in
//! `model_download_progress_ratio{model,file}`; on success the model is
//! offered at once as `local/{model}`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use utoipa::ToSchema;

use muse_inference::local::download::{ensure_model_variant, DownloadProgress, HubConfig};

/// Where one pull stands.
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq)]
pub struct PullStatus {
    /// `org/name`.
    pub model: String,
    pub variant: Option<String>,
    /// `running`, `succeeded` or `failed`.
    pub state: String,
    /// The file being downloaded.
    pub file: Option<String>,
    pub done_bytes: u64,
    pub total_bytes: u64,
    /// The registry key, once it succeeded.
    pub key: Option<String>,
    pub error: Option<String>,
    /// Unix seconds.
    pub started_at: i64,
    pub finished_at: Option<i64>,
}

/// The pulls of this process (a restart forgets finished ones).
#[derive(Debug, Default, Clone)]
pub struct Pulls {
    inner: Arc<Mutex<BTreeMap<String, PullStatus>>>,
}

fn now() -> i64 {
    muse_core::Clock::now_secs(&muse_core::SystemClock)
}

impl Pulls {
    pub fn list(&self) -> Vec<PullStatus> {
        self.inner
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    fn update(&self, model: &str, f: impl FnOnce(&mut PullStatus)) {
        if let Ok(mut m) = self.inner.lock() {
            if let Some(s) = m.get_mut(model) {
                f(s);
            }
        }
    }

    /// Starts pulling `model`; `None` when a pull of it is already running.
    pub fn start(
        &self,
        models: Arc<muse_inference::ModelRegistry>,
        cache_dir: std::path::PathBuf,
        hub: HubConfig,
        model: String,
        variant: Option<String>,
    ) -> Option<PullStatus> {
        let status = PullStatus {
            model: model.clone(),
            variant: variant.clone(),
            state: "running".into(),
            file: None,
            done_bytes: 0,
            total_bytes: 0,
            key: None,
            error: None,
            started_at: now(),
            finished_at: None,
        };
        {
            let mut m = self.inner.lock().ok()?;
            if m.get(&model).is_some_and(|s| s.state == "running") {
                return None;
            }
            m.insert(model.clone(), status.clone());
        }
        let pulls = self.clone();
        tokio::spawn(async move {
            let progress = {
                let pulls = pulls.clone();
                move |p: DownloadProgress| {
                    muse_inference::local::download::report(&p);
                    pulls.update(&p.model, |s| {
                        s.file = Some(p.file.clone());
                        s.done_bytes = p.done_bytes;
                        s.total_bytes = p.total_bytes;
                    });
                }
            };
            let result =
                ensure_model_variant(&cache_dir, &model, &hub, variant.as_deref(), progress).await;
            // Registering reads the snapshot's files: off the async workers.
            let outcome = match result {
                Ok(_) => {
                    let (models, name) = (models.clone(), model.clone());
                    tokio::task::spawn_blocking(move || models.register_cached(&name))
                        .await
                        .unwrap_or_else(|e| {
                            Err(muse_inference::InferenceError::NotConfigured(format!(
                                "registering the model failed: {e}"
                            )))
                        })
                }
                Err(e) => Err(e),
            };
            match &outcome {
                Ok(key) => tracing::info!(model = %model, key = %key, "model pulled"),
                Err(e) => tracing::warn!(model = %model, error = %e, "model pull failed"),
            }
            pulls.update(&model, |s| {
                s.finished_at = Some(now());
                match outcome {
                    Ok(key) => {
                        s.state = "succeeded".into();
                        s.key = Some(key);
                    }
                    Err(e) => {
                        s.state = "failed".into();
                        s.error = Some(e.to_string());
                    }
                }
            });
        });
        Some(status)
    }
}
