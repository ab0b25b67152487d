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

#[async_trait]
impl<P: LlmProvider> LlmProvider for Retrying<P> {
    fn id(&self) -> &str {
        self.inner.id()
    }

    async fn complete(&self, request: &GenerateRequest) -> Result<Completion, InferenceError> {
        let mut attempt = 0;
        loop {
            match self.inner.complete(request).await {
                Ok(c) => return Ok(c),
                Err(e) => {
                    attempt += 1;
                    let Some(wait) = self.policy.delay(attempt, &e) else {
                        return Err(e);
                    };
                    tracing::warn!(provider = self.inner.id(), attempt, wait_ms = wait.as_millis() as u64, error = %e, "retrying");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    async fn stream(&self, request: &GenerateRequest) -> Result<CompletionStream, InferenceError> {
        let mut attempt = 0;
        loop {
            let error = match self.inner.stream(request).await {
                Ok(mut stream) => match stream.next().await {
                    // Nothing was sent to the caller yet: still safe to retry.
                    Some(Err(e)) => e,
                    Some(Ok(first)) => {
                        return Ok(futures::stream::once(async { Ok(first) })
                            .chain(stream)
                            .boxed());
                    }
                    None => InferenceError::Protocol("the stream ended before any event".into()),
                },
                Err(e) => e,
            };
            attempt += 1;
            let Some(wait) = self.policy.delay(attempt, &error) else {
                return Err(error);
            };
            tracing::warn!(provider = self.inner.id(), attempt, wait_ms = wait.as_millis() as u64, error = %error, "retrying stream");
            tokio::time::sleep(wait).await;
        }
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
            let error = match provider.stream(&req).await {
                Ok(mut s) => match s.next().await {
                    Some(Ok(first)) => {
                        let s = futures::stream::once(async { Ok(first) }).chain(s).boxed();
                        return Ok((provider.id().to_string(), s));
                    }
                    Some(Err(e)) => e,
                    None => InferenceError::Protocol("the stream ended before any event".into()),
                },
                Err(e) => e,
            };
            if !error.allows_fallback() {
                return Err(error);
            }
            tracing::warn!(provider = provider.id(), model = %model, error = %error, "falling back");
            last = error;
        }
        Err(last)
    }
}
