//! The gateway's hot path as a library: one model call made for a user,
//! from admission to its record, without a web framework. A shell (Muse's
//! actix-web server, or any other Rust service) authenticates the caller,
//! builds a [`muse_inference::GenerateRequest`], and hands it to a
//! [`Run`]:
//!
//! 1. [`Run::admit`] — the model must be visible to the caller and in their
//!    plan; the call's worst case is reserved against the plan's quotas
//!    ([`QuotaCounting`]: in memory, on Redis shared by every replica, or
//!    in the database);
//! 2. [`Run::complete`], [`Run::stream`] or [`Run::embed`] — the call on
//!    the [`muse_inference::ModelRegistry`];
//! 3. the record — the execution (and idea), and the quota reconciled with
//!    what the call really used, written by group commit ([`Writer`]) on
//!    any [`muse_prompts::CallStore`]; the answer waits for the commit
//!    unless [`WriteMode::Async`]. A run dropped before its end (the caller
//!    went away) is recorded as cancelled.
//!
//! ```no_run
//! # async fn demo(gateway: muse_gateway::Gateway, user: uuid::Uuid) -> Result<(), Box<dyn std::error::Error>> {
//! use muse_gateway::Run;
//! use muse_inference::{GenerateRequest, Message};
//! use muse_prompts::ExecutionSource;
//!
//! let request = GenerateRequest::new("openai/gpt-4o-mini", vec![Message::user("Say hello")]);
//! let run = Run::new(&gateway, user, ExecutionSource::OpenaiApi, "openai/gpt-4o-mini", request)
//!     .admit()
//!     .await?;
//! match run.complete().await {
//!     Ok(done) => println!("{:?} (execution {})", done.execution.output, done.execution.id),
//!     Err(failed) => println!("failed: {}", failed.error),
//! }
//! # Ok(()) }
//! ```

mod admission;
mod run;
mod tally;
mod writer;

use std::sync::Arc;

use muse_billing::{BillingRepository, CachedBilling};
use muse_inference::{ModelRegistry, Price, Usage};
use uuid::Uuid;

pub use admission::{
    estimated_prompt_tokens, AdmitError, Counted, Held, QuotaCounting,
    DEFAULT_RESERVED_COMPLETION_TOKENS,
};
pub use run::{transcript, Failed, Finished, Run, RunEvent};
pub use writer::{BatchWindow, WriteMode, Writer, Written, MAX_BATCH, QUEUE};

/// Whether a user may call a model (somebody else's trained model is
/// invisible to them).
pub type Visibility = dyn Fn(&str, Uuid) -> bool + Send + Sync;

/// What every call needs: cheap to clone.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

struct Inner {
    models: Arc<ModelRegistry>,
    /// Plans, subscriptions and usage (the cache in front of storage).
    billing: Arc<dyn BillingRepository>,
    plans: Arc<CachedBilling>,
    quota: QuotaCounting,
    /// Settlements and counts bound for the shared quota store.
    tally: Option<Arc<tally::Tally>>,
    fallbacks: admission::Fallbacks,
    writer: Writer,
    unpriced_price: Option<Price>,
    visible: Box<Visibility>,
    cut_streams: Arc<tokio::sync::watch::Sender<bool>>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("writer", &self.inner.writer)
            .finish_non_exhaustive()
    }
}

/// What a [`Gateway`] may be told besides its parts (all optional).
#[derive(Default)]
pub struct GatewayOptions {
    /// What a remote model without a known price counts at (else a
    /// vendor's model without a price is refused on plans with a cost
    /// quota).
    pub unpriced_price: Option<Price>,
    /// Which models each user may call (default: all).
    pub visibility: Option<Box<Visibility>>,
}

impl Gateway {
    /// A gateway over `models`, with plans read through `plans` (whose
    /// cache lets most calls decide without storage), quotas counted as
    /// `quota` says, and records written by `writer`.
    pub fn new(
        models: Arc<ModelRegistry>,
        plans: Arc<CachedBilling>,
        quota: QuotaCounting,
        writer: Writer,
        options: GatewayOptions,
    ) -> Self {
        let tally = match &quota {
            QuotaCounting::Shared(shared) => Some(tally::Tally::new(shared.clone())),
            _ => None,
        };
        Self {
            inner: Arc::new(Inner {
                models,
                billing: plans.clone(),
                plans,
                quota,
                tally,
                fallbacks: admission::Fallbacks::default(),
                writer,
                unpriced_price: options.unpriced_price,
                visible: options.visibility.unwrap_or_else(|| Box::new(|_, _| true)),
                cut_streams: Arc::new(tokio::sync::watch::Sender::new(false)),
            }),
        }
    }

    pub fn models(&self) -> &Arc<ModelRegistry> {
        &self.inner.models
    }

    pub fn writer(&self) -> &Writer {
        &self.inner.writer
    }

    /// Sends the quota settlements still queued for the shared store (a
    /// stopping server calls it once its last call ended). Returns how many
    /// periods' counters changed.
    pub async fn flush_quota_counts(&self) -> Result<usize, muse_billing::BillingError> {
        match &self.inner.tally {
            Some(tally) => tally.flush().await,
            None => Ok(0),
        }
    }

    /// Set to `true` to end every open stream with an error event
    /// ([`muse_inference::InferenceError::Interrupted`]): a stopping
    /// server's grace period is nearly spent.
    pub fn stream_cut(&self) -> &Arc<tokio::sync::watch::Sender<bool>> {
        &self.inner.cut_streams
    }

    /// What a call on `key` costs: the model's price; else (a remote model
    /// with no known price) the unpriced price when it is set; else
    /// unknown.
    pub fn cost_of(&self, key: &str, usage: &Usage) -> Option<f64> {
        self.inner
            .models
            .cost(key, usage)
            .or_else(|| self.inner.unpriced_price.as_ref().map(|p| p.cost(usage)))
    }

    /// Whether `key` is a vendor's model (OpenAI, Anthropic, Gemini), which
    /// is paid per token; OpenAI-compatible servers are taken as
    /// self-hosted. A key that is not in the registry is not.
    pub fn is_vendor_model(&self, key: &str) -> bool {
        self.inner
            .models
            .provider_of(key)
            .is_some_and(|p| matches!(p.as_str(), "openai" | "anthropic" | "gemini"))
    }
}
