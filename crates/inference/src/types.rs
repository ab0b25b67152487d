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
    /// The result of a tool call (`tool_call_id` says which).
    Tool,
}

/// A function the model asked to be called. `arguments` is the JSON text
/// the model wrote (not validated: models may write invalid JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

/// A fragment of a streamed tool call, addressed by `index` as OpenAI's
/// chunks are: the first fragment of a call carries its `id` and `name`,
/// later ones pieces of `arguments`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCallDelta {
    pub index: u32,
    pub id: Option<String>,
    pub name: Option<String>,
    pub arguments: String,
}

/// A function the model may call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// JSON Schema of the arguments.
    pub parameters: Option<serde_json::Value>,
    pub strict: Option<bool>,
}

/// The shape the answer must take (OpenAI's `response_format`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResponseFormat {
    /// Any JSON object.
    JsonObject,
    /// JSON matching `schema`.
    JsonSchema {
        name: String,
        schema: serde_json::Value,
        strict: bool,
    },
}

impl ResponseFormat {
    /// Checks an answer: JSON, an object, and — with a schema — valid
    /// against it. The reason when it is not.
    pub fn check(&self, answer: &str) -> Result<(), String> {
        let value: serde_json::Value = serde_json::from_str(answer.trim())
            .map_err(|e| format!("the answer is not JSON: {e}"))?;
        match self {
            ResponseFormat::JsonObject if value.is_object() => Ok(()),
            ResponseFormat::JsonObject => Err("the answer is JSON but not an object".into()),
            ResponseFormat::JsonSchema { schema, .. } => {
                let validator = jsonschema::validator_for(schema)
                    .map_err(|e| format!("the schema does not compile: {e}"))?;
                let errors: Vec<String> = validator
                    .iter_errors(&value)
                    .take(5)
                    .map(|e| format!("{} at {}", e, e.instance_path()))
                    .collect();
                if errors.is_empty() {
                    Ok(())
                } else {
                    Err(format!(
                        "the answer does not match the schema: {}",
                        errors.join("; ")
                    ))
                }
            }
        }
    }
}

/// Whether and which tool the model must call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolChoice {
    Auto,
    None,
    Required,
    Function(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
    /// Calls an assistant message made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// The call a `Role::Tool` message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }
    /// The result of the tool call `id`.
    pub fn tool(id: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            tool_call_id: Some(id.into()),
            ..Self::new(Role::Tool, content)
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
    /// Functions the model may call (OpenAI-protocol providers so far;
    /// the others refuse them by name).
    #[serde(default)]
    pub tools: Vec<Tool>,
    #[serde(default)]
    pub tool_choice: Option<ToolChoice>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    /// Structured output: OpenAI-protocol providers, Gemini
    /// (`responseMimeType` / `responseJsonSchema`) and Anthropic (a forced
    /// tool) take it; local models refuse it by name.
    #[serde(default)]
    pub response_format: Option<ResponseFormat>,
    /// OpenAI's `logit_bias` (token id → -100..100): OpenAI-protocol
    /// providers and local models; Anthropic and Gemini refuse it.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub logit_bias: std::collections::BTreeMap<u32, f32>,
    /// Log-probabilities of the answer's tokens, each with this many
    /// likeliest alternatives (0–20): OpenAI-protocol providers and local
    /// models; Anthropic and Gemini refuse it.
    #[serde(default)]
    pub logprobs: Option<u32>,
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
            tools: Vec::new(),
            tool_choice: None,
            parallel_tool_calls: None,
            response_format: None,
            logit_bias: Default::default(),
            logprobs: None,
        }
    }

    /// Whether the request uses tool calling (tools offered, or a
    /// conversation holding tool calls or results).
    pub fn uses_tools(&self) -> bool {
        !self.tools.is_empty()
            || self
                .messages
                .iter()
                .any(|m| m.role == Role::Tool || !m.tool_calls.is_empty())
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
    /// The model called tools.
    ToolCalls,
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    pub text: String,
    #[serde(default)]
    pub tool_calls: Vec<ToolCall>,
    /// The answer's tokens with their log-probabilities (when asked for).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logprobs: Vec<TokenLogprob>,
    pub summary: Summary,
}

/// One generated token and how likely it was, as OpenAI writes it
/// (`choices[].logprobs.content[]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f64,
    /// The token's UTF-8 bytes (a token may hold part of a character).
    pub bytes: Option<Vec<u8>>,
    /// The likeliest tokens at this position, likeliest first.
    #[serde(default)]
    pub top_logprobs: Vec<TopLogprob>,
}

/// An alternative at one position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f64,
    pub bytes: Option<Vec<u8>>,
}

/// One event of a streamed answer. A successful stream is zero or more
/// `Delta`s followed by exactly one `Done`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StreamEvent {
    Delta(String),
    /// A fragment of a tool call.
    ToolCall(ToolCallDelta),
    /// Log-probabilities of the tokens since the last such event (only
    /// when the request asked for them).
    Logprobs(Vec<TokenLogprob>),
    Done(Summary),
}

/// Assembles streamed tool-call fragments into whole calls.
#[derive(Debug, Default, Clone)]
pub struct ToolCallCollector {
    calls: Vec<ToolCall>,
    indexes: Vec<u32>,
}

impl ToolCallCollector {
    pub fn push(&mut self, d: &ToolCallDelta) {
        let at = match self.indexes.iter().position(|i| *i == d.index) {
            Some(at) => at,
            None => {
                self.indexes.push(d.index);
                self.calls.push(ToolCall {
                    id: String::new(),
                    name: String::new(),
                    arguments: String::new(),
                });
                self.calls.len() - 1
            }
        };
        let call = &mut self.calls[at];
        if let Some(id) = &d.id {
            call.id.clone_from(id);
        }
        if let Some(name) = &d.name {
            call.name.push_str(name);
        }
        call.arguments.push_str(&d.arguments);
    }

    pub fn finish(self) -> Vec<ToolCall> {
        self.calls
    }
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

    /// Embeddings of `request.inputs`. Providers without an embeddings API
    /// refuse by name.
    async fn embed(&self, request: &EmbedRequest) -> Result<Embeddings, InferenceError> {
        Err(InferenceError::Unsupported {
            param: "model".into(),
            message: format!(
                "{} does not serve embeddings through {}",
                request.model,
                self.id()
            ),
        })
    }
}

/// Texts to embed (`model` is the provider's own name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmbedRequest {
    pub model: String,
    pub inputs: Vec<String>,
    /// Shorter vectors, where the model supports it.
    pub dimensions: Option<u32>,
}

/// One vector per input, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Embeddings {
    pub model: String,
    pub vectors: Vec<Vec<f32>>,
    /// Input tokens (`completion_tokens` is 0).
    pub usage: Usage,
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

    async fn embed(&self, request: &EmbedRequest) -> Result<Embeddings, InferenceError> {
        (**self).embed(request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_call_fragments_assemble_by_index() {
        let mut c = ToolCallCollector::default();
        let d = |index, id: Option<&str>, name: Option<&str>, args: &str| ToolCallDelta {
            index,
            id: id.map(str::to_string),
            name: name.map(str::to_string),
            arguments: args.to_string(),
        };
        c.push(&d(0, Some("call_a"), Some("f"), ""));
        c.push(&d(1, Some("call_b"), Some("g"), "{\"x\""));
        c.push(&d(0, None, None, "{\"y\": 1}"));
        c.push(&d(1, None, None, ": 2}"));
        assert_eq!(
            c.finish(),
            [
                ToolCall {
                    id: "call_a".into(),
                    name: "f".into(),
                    arguments: "{\"y\": 1}".into()
                },
                ToolCall {
                    id: "call_b".into(),
                    name: "g".into(),
                    arguments: "{\"x\": 2}".into()
                },
            ]
        );
        let mut r = GenerateRequest::new("m", vec![Message::user("x")]);
        assert!(!r.uses_tools());
        r.messages.push(Message::tool("call_a", "22 C"));
        assert!(
            r.uses_tools(),
            "a tool result needs a provider that takes tools"
        );
    }
}
