//! Builds the model registry from the configuration.

use std::sync::Arc;
use std::time::Duration;

use muse_inference::local::download::HubConfig;
use muse_inference::local::{LocalConfig, LocalProvider};
use muse_inference::providers::anthropic::{AnthropicConfig, AnthropicProvider};
use muse_inference::providers::gemini::{GeminiConfig, GeminiProvider};
use muse_inference::providers::openai::{OpenAiConfig, OpenAiProvider};
use muse_inference::providers::Timeouts;
use muse_inference::{InferenceError, ModelRegistry, PriceTable, RetryPolicy};

use crate::config::LlmConfig;

/// The registry, and why local models are unavailable (when they are).
pub fn build_registry(
    config: &LlmConfig,
) -> Result<(ModelRegistry, Option<String>), InferenceError> {
    let mut prices = PriceTable::builtin();
    if let Some(path) = &config.prices_file {
        prices = prices.with_overrides(path)?;
    }
    for (key, price) in &config.prices {
        if let Some((provider, model)) = key.split_once('/') {
            prices.insert(provider, model, *price);
        }
    }
    let retry = RetryPolicy {
        max_retries: config.max_retries,
        ..RetryPolicy::default()
    };
    let timeouts = Timeouts {
        request: Duration::from_secs(config.request_timeout_secs.max(1)),
        first_token: Duration::from_secs(config.first_token_timeout_secs.max(1)),
        ..Timeouts::default()
    };
    let mut registry = ModelRegistry::new(prices, retry);
    if let Some(c) = &config.openai {
        let mut oc = OpenAiConfig::openai(c.api_key.expose().clone());
        if let Some(url) = &c.base_url {
            oc.base_url = url.clone();
        }
        oc.timeouts = timeouts;
        registry.add_provider(Arc::new(OpenAiProvider::new(oc)?), &c.models);
    }
    if let Some(c) = &config.anthropic {
        let mut ac = AnthropicConfig::new(c.api_key.expose().clone());
        if let Some(url) = &c.base_url {
            ac.base_url = url.clone();
        }
        ac.timeouts = timeouts;
        registry.add_provider(Arc::new(AnthropicProvider::new(ac)?), &c.models);
    }
    if let Some(c) = &config.gemini {
        let mut gc = GeminiConfig::new(c.api_key.expose().clone());
        if let Some(url) = &c.base_url {
            gc.base_url = url.clone();
        }
        gc.timeouts = timeouts;
        registry.add_provider(Arc::new(GeminiProvider::new(gc)?), &c.models);
    }
    if let Some(c) = &config.compatible {
        let mut cc = OpenAiConfig::compatible(
            c.name.clone(),
            c.base_url.clone(),
            c.api_key.expose().clone(),
        );
        cc.timeouts = timeouts;
        registry.add_provider(Arc::new(OpenAiProvider::new(cc)?), &c.models);
    }
    let local_unavailable = match muse_inference::local::ensure_runtime() {
        Ok(()) => {
            let local = LocalProvider::new(LocalConfig {
                cache_dir: config.model_cache_dir.clone(),
                threads: config.local_threads.max(1),
                max_queue: config.local_queue.max(1),
                max_active: 4,
                default_max_tokens: 256,
                extra_models: config.local_models.clone(),
                hub: HubConfig {
                    endpoint: config.hf_endpoint.clone(),
                    token: config.hf_token.clone(),
                    offline: config.hf_offline,
                },
            });
            registry.add_local(Arc::new(local));
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "local models are disabled; remote providers still work");
            Some(e.to_string())
        }
    };
    registry.set_aliases(config.model_aliases.clone())?;
    Ok((registry, local_unavailable))
}
