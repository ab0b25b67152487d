//! Requests, responses and stream events shared by every provider.

use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

use crate::error::InferenceError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn system(content: impl Into<String>) -> Self {
        Self {
            role: Role::System,
            content: content.into(),
        }
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: Role::User,
            content: content.into(),
        }
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self {
            role: Role::Assistant,
            content: content.into(),
        }
    }
}

/// One chat/completion request. `model` is the provider's own model name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    pub model: String,
    pub messages: Vec<Message>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub stop: Vec<String>,
    pub seed: Option<u64>,
    /// Sample among the k likeliest tokens (local, Anthropic, Gemini;
    /// the OpenAI API has no such parameter and ignores it).
    #[serde(default)]
    pub top_k: Option<u32>,
    /// > 1 discourages repeating tokens (local models only).
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    /// A raw text completion (OpenAI's legacy `/v1/completions`): the model
    /// continues this text as it is, with no chat template, and `messages`
    /// is ignored. Local models and OpenAI-protocol servers take it; the
    /// other providers refuse it.
    #[serde(default)]
    pub prompt: Option<String>,
    /// OpenAI's presence penalty (-2..2): subtracted once from the logit of
    /// every token already present. Local models, OpenAI-protocol servers
    /// and Gemini; Anthropic refuses it.
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    /// OpenAI's frequency penalty (-2..2): subtracted per occurrence.
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
}

impl GenerateRequest {
    pub fn new(model: impl Into<String>, messages: Vec<Message>) -> Self {
        Self {
            model: model.into(),
            messages,
            temperature: None,
            top_p: None,
            max_tokens: None,
            stop: Vec::new(),
            seed: None,
            top_k: None,
            repetition_penalty: None,
            prompt: None,
            presence_penalty: None,
            frequency_penalty: None,
        }
    }

    /// A raw text completion of `prompt`.
    pub fn completion(model: impl Into<String>, prompt: impl Into<String>) -> Self {
        let mut r = Self::new(model, Vec::new());
        r.prompt = Some(prompt.into());
        r
    }

    /// Whole prompt text (for providers and tests that need a flat view).
    pub fn system_prompt(&self) -> Option<String> {
        let parts: Vec<&str> = self
            .messages
            .iter()
            .filter(|m| m.role == Role::System)
            .map(|m| m.content.as_str())
            .collect();
        (!parts.is_empty()).then(|| parts.join("\n\n"))
    }
}

/// Tokens consumed by one call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

impl Usage {
    pub fn total(&self) -> u32 {
        self.prompt_tokens + self.completion_tokens
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// Natural end or a stop sequence.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// Refused by the provider's safety filter.
    ContentFilter,
    /// Anything else the provider said, verbatim.
    Other(String),
}

/// Timing of one call, measured by Muse.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timing {
    pub time_to_first_token: Option<Duration>,
    pub total: Duration,
}

/// How a call ended (the final event of a stream, or part of a completion).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub model: String,
    pub usage: Usage,
    pub finish_reason: FinishReason,
    pub timing: Timing,
}

/// A whole (non-streamed) answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Completion {
    pub text: String,
    pub summary: Summary,
}

/// One event of a streamed answer. A successful stream is zero or more
/// `Delta`s followed by exactly one `Done`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamEvent {
    Delta(String),
    Done(Summary),
}

/// A streamed answer. Dropping it cancels the work upstream (the HTTP
/// connection is closed).
pub type CompletionStream = BoxStream<'static, Result<StreamEvent, InferenceError>>;

/// A source of completions.
#[async_trait]
pub trait LlmProvider: Send + Sync + 'static {
    /// Stable provider id: `openai`, `anthropic`, `gemini`, `test`, …
    fn id(&self) -> &str;

    async fn complete(&self, request: &GenerateRequest) -> Result<Completion, InferenceError>;

    async fn stream(&self, request: &GenerateRequest) -> Result<CompletionStream, InferenceError>;
}

/// A shared provider is a provider (so `Retrying::new(arc.clone(), …)` works).
#[async_trait]
impl LlmProvider for std::sync::Arc<dyn LlmProvider> {
    fn id(&self) -> &str {
        (**self).id()
    }

    async fn complete(&self, request: &GenerateRequest) -> Result<Completion, InferenceError> {
        (**self).complete(request).await
    }

    async fn stream(&self, request: &GenerateRequest) -> Result<CompletionStream, InferenceError> {
        (**self).stream(request).await
    }
}
