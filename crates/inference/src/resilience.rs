//! Retries with exponential backoff and jitter, and fallback chains.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use rand::Rng;

use crate::error::InferenceError;
use crate::types::*;

/// When and how long to wait before trying again.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub max_retries: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// A `Retry-After` longer than this is not waited for: the error is returned.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 3,
            base_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(8),
            max_retry_after: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    pub fn none() -> Self {
        Self {
            max_retries: 0,
            ..Self::default()
        }
    }

    /// The wait before retry number `attempt` (1-based) after `error`, or
    /// `None` when it should not be retried.
    pub fn delay(&self, attempt: u32, error: &InferenceError) -> Option<Duration> {
        if attempt > self.max_retries || !error.is_retryable() {
            return None;
        }
        if let InferenceError::RateLimited {
            retry_after: Some(d),
            ..
        } = error
        {
            return (*d <= self.max_retry_after).then_some(*d);
        }
        let exp = self
            .base_delay
            .saturating_mul(2u32.saturating_pow(attempt - 1))
            .min(self.max_delay);
        // Full jitter in [exp/2, exp].
        let half = exp / 2;
        let jitter = rand::thread_rng().gen_range(0..=half.as_millis().max(1) as u64);
        Some(half + Duration::from_millis(jitter))
    }
}

/// A provider wrapper that retries failed calls. A stream is retried only
/// until its first token: after that, an error is passed to the caller.
pub struct Retrying<P> {
    inner: P,
    policy: RetryPolicy,
}

impl<P: LlmProvider> Retrying<P> {
    pub fn new(inner: P, policy: RetryPolicy) -> Self {
        Self { inner, policy }
    }
}

/// Runs `call` until it succeeds or `policy` says stop, calling
/// `on_error` after every failed attempt. Shared by [`Retrying`] and the
/// model registry.
pub(crate) async fn with_retries<T, F, Fut>(
    policy: &RetryPolicy,
    provider: &str,
    mut call: F,
    mut on_error: impl FnMut(&InferenceError),
) -> Result<T, InferenceError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, InferenceError>>,
{
    let mut attempt = 0;
    loop {
        match call().await {
            Ok(v) => return Ok(v),
            Err(e) => {
                attempt += 1;
                on_error(&e);
                let Some(wait) = policy.delay(attempt, &e) else {
                    return Err(e);
                };
                tracing::warn!(provider, attempt, wait_ms = wait.as_millis() as u64, error = %e, "retrying");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Waits for a stream's first event: an error before it is returned as the
/// call's error (so it can be retried or fall back); after it, the stream
/// is handed over whole.
pub(crate) async fn first_event(
    stream: Result<CompletionStream, InferenceError>,
) -> Result<CompletionStream, InferenceError> {
    let mut stream = stream?;
    match stream.next().await {
        Some(Ok(first)) => Ok(futures::stream::once(async { Ok(first) })
            .chain(stream)
            .boxed()),
        Some(Err(e)) => Err(e),
        None => Err(InferenceError::Protocol(
            "the stream ended before any event".into(),
        )),
    }
}

#[async_trait]
impl<P: LlmProvider> LlmProvider for Retrying<P> {
    fn id(&self) -> &str {
        self.inner.id()
    }

    async fn complete(&self, request: &GenerateRequest) -> Result<Completion, InferenceError> {
        with_retries(
            &self.policy,
            self.inner.id(),
            || self.inner.complete(request),
            |_| {},
        )
        .await
    }

    async fn stream(&self, request: &GenerateRequest) -> Result<CompletionStream, InferenceError> {
        with_retries(
            &self.policy,
            self.inner.id(),
            || async { first_event(self.inner.stream(request).await).await },
            |_| {},
        )
        .await
    }
}

/// Tries each (provider, model) in order until one answers. Errors that
/// another model cannot fix (bad request, auth, context too long) stop the
/// chain. A stream falls back only before its first event.
pub struct Fallback {
    chain: Vec<(Arc<dyn LlmProvider>, String)>,
}

impl Fallback {
    pub fn new(chain: Vec<(Arc<dyn LlmProvider>, String)>) -> Self {
        Self { chain }
    }

    pub async fn complete(
        &self,
        request: &GenerateRequest,
    ) -> Result<(String, Completion), InferenceError> {
        let mut last = InferenceError::NotConfigured("empty fallback chain".into());
        for (provider, model) in &self.chain {
            let req = GenerateRequest {
                model: model.clone(),
                ..request.clone()
            };
            match provider.complete(&req).await {
                Ok(c) => return Ok((provider.id().to_string(), c)),
                Err(e) if e.allows_fallback() => {
                    tracing::warn!(provider = provider.id(), model = %model, error = %e, "falling back");
                    last = e;
                }
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    pub async fn stream(
        &self,
        request: &GenerateRequest,
    ) -> Result<(String, CompletionStream), InferenceError> {
        let mut last = InferenceError::NotConfigured("empty fallback chain".into());
        for (provider, model) in &self.chain {
            let req = GenerateRequest {
                model: model.clone(),
                ..request.clone()
            };
            match first_event(provider.stream(&req).await).await {
                Ok(s) => return Ok((provider.id().to_string(), s)),
                Err(e) if e.allows_fallback() => {
                    tracing::warn!(provider = provider.id(), model = %model, error = %e, "falling back");
                    last = e;
                }
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }
}
