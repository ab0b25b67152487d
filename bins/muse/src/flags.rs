//! Feature flags in the server: a snapshot of every flag in memory,
//! reloaded from the database every `FEATURE_FLAGS_REFRESH_SECS` and, with
//! Redis, whenever another replica announces a change (so a change made on
//! one replica reaches the others at once, or within the refresh interval
//! while Redis is down), and the gate that routes call.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use actix_web::http::StatusCode;
use muse_auth::Principal;
use muse_billing::{FeatureFlag, FlagRepository, FlagSet, FlagStoreError};

use crate::error::ApiError;

pub struct Flags {
    repo: Arc<dyn FlagRepository>,
    set: RwLock<Arc<FlagSet>>,
    refresh: Duration,
    on_change: RwLock<Option<Arc<dyn Fn() + Send + Sync>>>,
}

impl Flags {
    /// Loads the flags (blocking). A database error leaves every flag on
    /// until the next refresh, and is logged.
    pub fn new(repo: Arc<dyn FlagRepository>, refresh: Duration) -> Self {
        let flags = Self {
            repo,
            set: RwLock::default(),
            refresh,
            on_change: RwLock::default(),
        };
        if let Err(e) = flags.reload() {
            tracing::error!(error = %e, "could not load the feature flags; all are on until the next refresh");
        }
        flags
    }

    /// Reads every flag from the database (blocking).
    pub fn reload(&self) -> Result<(), FlagStoreError> {
        let set = Arc::new(FlagSet::new(self.repo.list_flags()?));
        if let Ok(mut s) = self.set.write() {
            *s = set;
        }
        Ok(())
    }

    pub fn snapshot(&self) -> Arc<FlagSet> {
        self.set.read().map(|s| s.clone()).unwrap_or_default()
    }

    /// Writes a flag, applies it here at once and tells the hook (blocking).
    pub fn upsert(&self, flag: &FeatureFlag) -> Result<(), FlagStoreError> {
        self.repo.upsert_flag(flag)?;
        let reloaded = self.reload();
        let hook = self.on_change.read().ok().and_then(|h| h.clone());
        if let Some(hook) = hook {
            hook();
        }
        reloaded
    }

    /// Registers who is told of the flags written here (the server relays
    /// them to other replicas, which reload at once).
    pub fn on_change(&self, hook: Arc<dyn Fn() + Send + Sync>) {
        if let Ok(mut h) = self.on_change.write() {
            *h = Some(hook);
        }
    }

    /// `403 feature_disabled` unless `principal` gets `key`.
    pub fn check(&self, key: &str, principal: &Principal) -> Result<(), ApiError> {
        if self.snapshot().allows(key, principal.user.id, None) {
            return Ok(());
        }
        metrics::counter!("feature_flag_denials_total", "flag" => key.to_string()).increment(1);
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "feature_disabled",
            format!("this feature ({key}) is not enabled for your account"),
        )
        .with_details(serde_json::json!({ "flag": key })))
    }

    /// Reloads in the background every `refresh` (on the blocking pool).
    pub fn spawn_refresh(self: Arc<Self>) {
        actix_web::rt::spawn(async move {
            let mut tick = tokio::time::interval(self.refresh);
            tick.tick().await;
            loop {
                tick.tick().await;
                let me = self.clone();
                match tokio::task::spawn_blocking(move || me.reload()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "could not refresh the feature flags"),
                    Err(e) => tracing::warn!(error = %e, "feature flag refresh task failed"),
                }
            }
        });
    }
}
