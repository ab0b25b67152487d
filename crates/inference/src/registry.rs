//! The model registry: every model Muse can run, under a stable key
//! (`provider/model`), with its provider, context length and price — and
//! the one place calls go through, so every call is retried the same way,
//! priced, and counted in the metrics.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use serde::Serialize;

use crate::error::InferenceError;
use crate::pricing::{Price, PriceTable};
use crate::resilience::{first_event, with_retries, RetryPolicy};
use crate::types::*;

/// Where a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    Remote,
    Local,
}

/// What the registry says about one model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelInfo {
    /// `provider/model`, e.g. `openai/gpt-4o-mini`.
    pub key: String,
    pub provider: String,
    /// The provider's own name for the model.
    pub model: String,
    pub kind: ModelKind,
    pub context_length: Option<u32>,
    /// `None`: the price is unknown (cost is reported as unknown, not 0).
    pub price: Option<Price>,
    /// Remote models are always ready; local ones once loaded.
    pub loaded: bool,
    /// Bytes of weights in memory (loaded local models).
    pub memory_bytes: Option<u64>,
    /// Why the model cannot be served (local models whose files are
    /// incomplete); `None` when it can.
    pub unavailable: Option<String>,
}

/// A finished call with its price.
#[derive(Debug, Clone, PartialEq)]
pub struct PricedCompletion {
    pub completion: Completion,
    /// USD, `None` when the model's price is unknown.
    pub cost: Option<f64>,
}

#[derive(Clone)]
struct Entry {
    provider: Arc<dyn LlmProvider>,
    model: String,
    kind: ModelKind,
}

/// Models by key, the providers behind them, prices, and the retry policy.
pub struct ModelRegistry {
    /// Written at start, and when a trained model is registered.
    entries: RwLock<BTreeMap<String, Entry>>,
    providers: BTreeMap<String, Arc<dyn LlmProvider>>,
    prices: PriceTable,
    retry: RetryPolicy,
    local: Option<Arc<crate::local::LocalProvider>>,
    /// Local models in the cache that cannot be served, with the reason.
    unservable: RwLock<BTreeMap<String, String>>,
    /// Operator-defined names (`gpt` → `openai/gpt-4o-mini`).
    /// Operator-defined names, each for one key or a fallback chain
    /// (`fast` → `[local/a, compatible/b]`).
    aliases: BTreeMap<String, Vec<String>>,
}

impl ModelRegistry {
    pub fn new(prices: PriceTable, retry: RetryPolicy) -> Self {
        Self {
            entries: RwLock::default(),
            providers: BTreeMap::new(),
            prices,
            retry,
            local: None,
            unservable: RwLock::default(),
            aliases: BTreeMap::new(),
        }
    }

    /// Exposes `models` of `provider` as `provider.id()/model`.
    pub fn add_provider(&mut self, provider: Arc<dyn LlmProvider>, models: &[String]) {
        let id = provider.id().to_string();
        let entries = self.entries.get_mut().unwrap_or_else(|e| e.into_inner());
        for m in models {
            entries.insert(
                format!("{id}/{m}"),
                Entry {
                    provider: provider.clone(),
                    model: m.clone(),
                    kind: ModelKind::Remote,
                },
            );
        }
        self.providers.insert(id, provider);
    }

    /// Exposes every model in the local cache as `local/org/name`, priced
    /// at 0 (it runs on the operator's hardware).
    pub fn add_local(&mut self, provider: Arc<crate::local::LocalProvider>) {
        let entries = self.entries.get_mut().unwrap_or_else(|e| e.into_inner());
        let unservable: BTreeMap<String, String> = provider.unservable().into_iter().collect();
        for m in provider
            .available()
            .into_iter()
            .chain(unservable.keys().cloned())
        {
            entries.insert(
                format!("local/{m}"),
                Entry {
                    provider: provider.clone(),
                    model: m,
                    kind: ModelKind::Local,
                },
            );
        }
        self.unservable = RwLock::new(unservable);
        self.providers.insert("local".to_string(), provider.clone());
        self.local = Some(provider);
    }

    pub fn local(&self) -> Option<&Arc<crate::local::LocalProvider>> {
        self.local.as_ref()
    }

    /// Adds a model of an existing provider at run time (a fine-tuned
    /// `ft:…` model); returns its key. Registering it again is harmless.
    pub fn register_remote(&self, provider: &str, model: &str) -> Result<String, InferenceError> {
        let p = self.providers.get(provider).cloned().ok_or_else(|| {
            InferenceError::NotConfigured(format!("no provider {provider} is configured"))
        })?;
        if provider == "local" {
            return Err(InferenceError::BadRequest(
                "local models are registered from a directory".into(),
            ));
        }
        let key = format!("{provider}/{model}");
        self.write_entries()?.insert(
            key.clone(),
            Entry {
                provider: p,
                model: model.to_string(),
                kind: ModelKind::Remote,
            },
        );
        Ok(key)
    }

    /// Serves the ONNX export in `dir` as the local model `name` (a
    /// trained model); returns its key (`local/<name>`).
    pub fn register_local_dir(
        &self,
        name: &str,
        dir: std::path::PathBuf,
    ) -> Result<String, InferenceError> {
        let local = self.local.clone().ok_or_else(|| {
            InferenceError::NotConfigured("local models are disabled (no ONNX Runtime)".into())
        })?;
        local.add_dir(name, dir)?;
        let key = format!("local/{name}");
        self.write_entries()?.insert(
            key.clone(),
            Entry {
                provider: local,
                model: name.to_string(),
                kind: ModelKind::Local,
            },
        );
        Ok(key)
    }

    /// Offers a model pulled into the cache after start as `local/{model}`
    /// (or updates why it cannot be served). Returns its key.
    pub fn register_cached(&self, model: &str) -> Result<String, InferenceError> {
        let local = self.local.clone().ok_or_else(|| {
            InferenceError::NotConfigured("local models are disabled (no ONNX Runtime)".into())
        })?;
        let problem = match local.model_dir(model) {
            Some(d) => crate::local::resolve::servable_problem(&d),
            None => Some("not in the cache, or no tokenizer.json".to_string()),
        };
        if let Ok(mut u) = self.unservable.write() {
            match problem {
                Some(p) => u.insert(model.to_string(), p),
                None => u.remove(model),
            };
        }
        let key = format!("local/{model}");
        self.write_entries()?.insert(
            key.clone(),
            Entry {
                provider: local,
                model: model.to_string(),
                kind: ModelKind::Local,
            },
        );
        Ok(key)
    }

    /// Names that stand for a registry key, or for a fallback chain of
    /// keys tried in order (`MODEL_ALIASES`). An alias may not shadow a key.
    pub fn set_aliases(
        &mut self,
        aliases: BTreeMap<String, Vec<String>>,
    ) -> Result<(), InferenceError> {
        let entries = self.read_entries();
        for (alias, targets) in &aliases {
            if entries.contains_key(alias) {
                return Err(InferenceError::NotConfigured(format!(
                    "the alias {alias:?} is already a model key"
                )));
            }
            if targets.is_empty() {
                return Err(InferenceError::NotConfigured(format!(
                    "the alias {alias:?} names no model"
                )));
            }
            if let Some(t) = targets.iter().find(|t| !entries.contains_key(*t)) {
                return Err(InferenceError::NotConfigured(format!(
                    "the alias {alias:?} points at {t:?}, which is not in the registry"
                )));
            }
        }
        drop(entries);
        self.aliases = aliases;
        Ok(())
    }

    /// The aliases and the keys each stands for, in fallback order.
    pub fn aliases(&self) -> &BTreeMap<String, Vec<String>> {
        &self.aliases
    }

    /// The keys a request's model name means, in the order to try them: a
    /// fallback chain for a group alias, else the one key of [`Self::resolve`].
    pub fn chain(&self, name: &str) -> Result<Vec<String>, InferenceError> {
        match self.aliases.get(name) {
            Some(targets) if !self.read_entries().contains_key(name) => Ok(targets.clone()),
            _ => self.resolve(name).map(|k| vec![k]),
        }
    }

    /// The registry key a request's model name means: a key as it is, an
    /// alias, or a bare model name (`gpt-4o-mini`) that exactly one
    /// provider offers. Several providers offering it is an error listing
    /// them.
    pub fn resolve(&self, name: &str) -> Result<String, InferenceError> {
        let entries = self.read_entries();
        if entries.contains_key(name) {
            return Ok(name.to_string());
        }
        if let Some(first) = self.aliases.get(name).and_then(|t| t.first()) {
            return Ok(first.clone());
        }
        let matches: Vec<&String> = entries
            .iter()
            .filter(|(_, e)| e.model == name)
            .map(|(k, _)| k)
            .collect();
        match matches.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(InferenceError::ModelNotFound(format!(
                "{name} is not in the model registry"
            ))),
            several => Err(InferenceError::BadRequest(format!(
                "{name} is offered by several providers ({}): name one of them",
                several
                    .iter()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    fn write_entries(
        &self,
    ) -> Result<std::sync::RwLockWriteGuard<'_, BTreeMap<String, Entry>>, InferenceError> {
        self.entries
            .write()
            .map_err(|_| InferenceError::NotConfigured("model registry poisoned".into()))
    }

    fn read_entries(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Entry>> {
        self.entries.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Local models run on the operator's hardware: priced at 0.
    fn price_of(&self, e: &Entry) -> Option<Price> {
        match e.kind {
            ModelKind::Local => Some(Price {
                input_per_million: 0.0,
                output_per_million: 0.0,
                context_length: None,
            }),
            ModelKind::Remote => self.prices.price(e.provider.id(), &e.model),
        }
    }

    /// Loads the local model `key` (blocking). Remote models cannot be.
    pub fn load_blocking(&self, key: &str) -> Result<ModelInfo, InferenceError> {
        let entry = self.entry(key)?;
        match (&self.local, entry.kind) {
            (Some(local), ModelKind::Local) => {
                local.load_blocking(&entry.model)?;
                self.get(key)
                    .ok_or_else(|| InferenceError::ModelNotFound(key.to_string()))
            }
            _ => Err(InferenceError::BadRequest(format!(
                "{key} is a remote model: always available, never loaded"
            ))),
        }
    }

    /// Unloads the local model `key`; `false` if it was not loaded.
    pub fn unload(&self, key: &str) -> Result<bool, InferenceError> {
        let entry = self.entry(key)?;
        match (&self.local, entry.kind) {
            (Some(local), ModelKind::Local) => Ok(local.unload(&entry.model)),
            _ => Err(InferenceError::BadRequest(format!(
                "{key} is a remote model: always available, never loaded"
            ))),
        }
    }

    /// Provider ids, sorted.
    pub fn provider_ids(&self) -> Vec<String> {
        self.providers.keys().cloned().collect()
    }

    pub fn prices(&self) -> &PriceTable {
        &self.prices
    }

    pub fn list(&self) -> Vec<ModelInfo> {
        self.read_entries()
            .iter()
            .map(|(key, e)| {
                let price = self.price_of(e);
                let loaded = match (&self.local, e.kind) {
                    (Some(local), ModelKind::Local) => {
                        local.loaded().into_iter().find(|l| l.model == e.model)
                    }
                    _ => None,
                };
                ModelInfo {
                    key: key.clone(),
                    provider: e.provider.id().to_string(),
                    model: e.model.clone(),
                    kind: e.kind,
                    context_length: price.and_then(|p| p.context_length).or(loaded
                        .as_ref()
                        .and_then(|l| l.context_length.map(|c| c as u32))),
                    price: price.map(|p| Price {
                        context_length: None,
                        ..p
                    }),
                    loaded: e.kind == ModelKind::Remote || loaded.is_some(),
                    memory_bytes: loaded.map(|l| l.weight_bytes),
                    unavailable: (e.kind == ModelKind::Local)
                        .then(|| {
                            self.unservable
                                .read()
                                .ok()
                                .and_then(|u| u.get(&e.model).cloned())
                        })
                        .flatten(),
                }
            })
            .collect()
    }

    /// The id of the provider serving `key` (`openai`, a compatible
    /// server's name, `local`, …).
    pub fn provider_of(&self, key: &str) -> Option<String> {
        self.read_entries()
            .get(key)
            .map(|e| e.provider.id().to_string())
    }

    pub fn get(&self, key: &str) -> Option<ModelInfo> {
        self.list().into_iter().find(|m| m.key == key)
    }

    fn entry(&self, key: &str) -> Result<Entry, InferenceError> {
        self.read_entries().get(key).cloned().ok_or_else(|| {
            InferenceError::ModelNotFound(format!("{key} is not in the model registry"))
        })
    }

    /// Runs a whole call on the model `key` (retried per the policy),
    /// prices it and records the metrics.
    pub async fn complete(
        &self,
        key: &str,
        request: &GenerateRequest,
    ) -> Result<PricedCompletion, InferenceError> {
        let entry = self.entry(key)?;
        let req = GenerateRequest {
            model: entry.model.clone(),
            ..request.clone()
        };
        let (provider, model) = (entry.provider.id(), entry.model.as_str());
        let completion = with_retries(
            &self.retry,
            provider,
            || entry.provider.complete(&req),
            |e| record_error(provider, model, e),
        )
        .await?;
        let cost = self
            .price_of(&entry)
            .map(|p| p.cost(&completion.summary.usage));
        record_usage(entry.provider.id(), &entry.model, &completion.summary, cost);
        Ok(PricedCompletion { completion, cost })
    }

    /// Streams from the model `key`. Retried until the first event only.
    /// The final `Done` is recorded in the metrics as it passes; its cost is
    /// [`ModelRegistry::cost`] of its usage.
    pub async fn stream(
        &self,
        key: &str,
        request: &GenerateRequest,
    ) -> Result<CompletionStream, InferenceError> {
        let entry = self.entry(key)?;
        let req = GenerateRequest {
            model: entry.model.clone(),
            ..request.clone()
        };
        let opened = with_retries(
            &self.retry,
            entry.provider.id(),
            || async { first_event(entry.provider.stream(&req).await).await },
            |e| record_error(entry.provider.id(), &entry.model, e),
        )
        .await?;
        let provider = entry.provider.id().to_string();
        let model = entry.model.clone();
        // The price is fixed for the call: no need to carry the whole table.
        let price = self.price_of(&entry);
        let stream = opened.inspect(move |event| match event {
            Ok(StreamEvent::Done(summary)) => {
                let cost = price.map(|p| p.cost(&summary.usage));
                record_usage(&provider, &model, summary, cost);
            }
            Err(e) => record_error(&provider, &model, e),
            Ok(StreamEvent::Delta(_) | StreamEvent::ToolCall(_) | StreamEvent::Logprobs(_)) => {}
        });
        Ok(stream.boxed())
    }

    /// Embeddings from the model `key` (retried per the policy), priced at
    /// its input price; metrics as for calls.
    pub async fn embed(
        &self,
        key: &str,
        request: &EmbedRequest,
    ) -> Result<(Embeddings, Option<f64>), InferenceError> {
        let entry = self.entry(key)?;
        let req = EmbedRequest {
            model: entry.model.clone(),
            ..request.clone()
        };
        let (provider, model) = (entry.provider.id(), entry.model.as_str());
        let out = with_retries(
            &self.retry,
            provider,
            || entry.provider.embed(&req),
            |e| record_error(provider, model, e),
        )
        .await?;
        let cost = self.price_of(&entry).map(|p| p.cost(&out.usage));
        metrics::counter!("llm_requests_total", "provider" => provider.to_string(), "model" => model.to_string()).increment(1);
        metrics::counter!("llm_tokens_used_total", "provider" => provider.to_string(), "model" => model.to_string(), "kind" => "prompt")
            .increment(u64::from(out.usage.prompt_tokens));
        Ok((out, cost))
    }

    /// The cost of `usage` on the model `key` (USD; `None` when unknown).
    pub fn cost(&self, key: &str, usage: &Usage) -> Option<f64> {
        let entry = self.read_entries().get(key).cloned()?;
        self.price_of(&entry).map(|p| p.cost(usage))
    }
}

fn record_usage(provider: &str, model: &str, summary: &Summary, cost: Option<f64>) {
    let labels = [
        ("provider", provider.to_string()),
        ("model", model.to_string()),
    ];
    metrics::counter!("llm_requests_total", &labels).increment(1);
    metrics::counter!(
        "llm_tokens_used_total",
        &[
            ("provider", provider.to_string()),
            ("model", model.to_string()),
            ("kind", "prompt".to_string())
        ]
    )
    .increment(u64::from(summary.usage.prompt_tokens));
    metrics::counter!(
        "llm_tokens_used_total",
        &[
            ("provider", provider.to_string()),
            ("model", model.to_string()),
            ("kind", "completion".to_string())
        ]
    )
    .increment(u64::from(summary.usage.completion_tokens));
    if let Some(c) = cost {
        // Counters are integers in `metrics`: a gauge that only grows keeps
        // the exact USD amount under the seed's metric name.
        metrics::gauge!("llm_cost_total_usd", &labels).increment(c);
    }
    if let Some(ttft) = summary.timing.time_to_first_token {
        metrics::histogram!("llm_time_to_first_token_seconds", &labels).record(ttft.as_secs_f64());
    }
    let gen_time = summary
        .timing
        .total
        .saturating_sub(summary.timing.time_to_first_token.unwrap_or(Duration::ZERO));
    if summary.usage.completion_tokens > 1 && !gen_time.is_zero() {
        let rate = f64::from(summary.usage.completion_tokens - 1) / gen_time.as_secs_f64();
        metrics::histogram!("llm_tokens_per_second", &labels).record(rate);
    }
}

fn record_error(provider: &str, model: &str, error: &InferenceError) {
    let kind = match error {
        InferenceError::BadRequest(_) => "bad_request",
        InferenceError::Auth(_) => "auth",
        InferenceError::RateLimited { .. } => "rate_limited",
        InferenceError::ContextTooLong(_) => "context_too_long",
        InferenceError::ModelNotFound(_) => "model_not_found",
        InferenceError::Timeout => "timeout",
        InferenceError::Upstream { .. } => "upstream",
        InferenceError::Connection(_) => "connection",
        InferenceError::Protocol(_) => "protocol",
        InferenceError::Cancelled => "cancelled",
        InferenceError::NotConfigured(_) => "not_configured",
        InferenceError::BrokenModel(_) => "model_unavailable",
        InferenceError::Interrupted(_) => "interrupted",
        InferenceError::Unsupported { .. } => "unsupported_parameter",
    };
    metrics::counter!(
        "llm_errors_total",
        &[
            ("provider", provider.to_string()),
            ("model", model.to_string()),
            ("kind", kind.to_string())
        ]
    )
    .increment(1);
}
