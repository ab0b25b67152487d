//! What every handler can reach.

use std::sync::Arc;
use std::time::Instant;

use metrics_exporter_prometheus::PrometheusHandle;
use muse_auth::AuthService;
use muse_inference::ModelRegistry;
use muse_persistence::Database;
use muse_prompts::{ExecutionRepository, IdeaRepository, Library};

use crate::config::Config;

#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub db: Database,
    pub auth: Arc<AuthService>,
    pub models: Arc<ModelRegistry>,
    pub executions: Arc<dyn ExecutionRepository>,
    pub library: Library,
    /// Compiled schemas of prompt versions (immutable, so never stale).
    pub specs: Arc<muse_prompts::SpecCache>,
    pub ideas: Arc<dyn IdeaRepository>,
    /// Live WebSocket sessions, to push messages (training progress) to a user.
    pub hub: crate::ws::Hub,
    /// Datasets, jobs, trainers, and who owns which trained model.
    pub training: Arc<crate::training::Training>,
    /// Model downloads started by administrators.
    pub pulls: crate::pulls::Pulls,
    /// Why local models are disabled (ONNX Runtime missing), if they are.
    pub local_unavailable: Option<String>,
    pub metrics: PrometheusHandle,
    /// `None` when rate limiting is off.
    pub limiter: Option<Arc<muse_billing::RateLimiter>>,
    pub flags: Arc<crate::flags::Flags>,
    /// Plans, subscriptions, usage: `billing_cache` behind the trait.
    pub billing: Arc<dyn muse_billing::BillingRepository>,
    /// The same repository, for reading its cache without a database read
    /// (see `muse_billing::CachedBilling`).
    pub billing_cache: Arc<muse_billing::CachedBilling>,
    /// The prompts behind `library`, kept in memory (see
    /// [`muse_prompts::CachedLibrary`]).
    pub prompt_cache: Arc<muse_prompts::CachedLibrary>,
    /// One model call end to end: admission (plan, quota), the call, its
    /// record by group commit (`muse-gateway`).
    pub gateway: muse_gateway::Gateway,
    /// `None` without `STRIPE_SECRET_KEY`: plans are changed by administrators.
    pub payments: Option<Arc<dyn muse_billing::PaymentGateway>>,
    pub started: Instant,
    /// `smtp` or `outbox`.
    pub mail_transport: &'static str,
    /// Set on SIGTERM: `/health/ready` answers 503 so that load balancers
    /// stop sending requests before the server stops.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
}
