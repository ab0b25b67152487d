//! Anthropic Messages API (`POST /v1/messages`), native: `x-api-key`,
//! `anthropic-version`, top-level `system`, SSE events `message_start` …
//! `message_stop` with usage.

use std::time::Instant;

use async_trait::async_trait;
use futures::StreamExt;
use muse_core::Secret;
use serde_json::{json, Value};

use super::{check_model_name, drive, send, HttpClient, Step, StreamParser, Timeouts};
use crate::error::{retry_after, InferenceError};
use crate::sse::{events, SseEvent};
use crate::types::*;

pub const DEFAULT_BASE_URL: &str = "https://api.anthropic.com";
pub const API_VERSION: &str = "2023-06-01";

#[derive(Debug, Clone)]
pub struct AnthropicConfig {
    pub api_key: Secret<String>,
    /// Without a trailing slash; `/v1/messages` is appended.
    pub base_url: String,
    /// `max_tokens` is mandatory for Anthropic: used when the request has none.
    pub default_max_tokens: u32,
    pub timeouts: Timeouts,
}

impl AnthropicConfig {
    pub fn new(api_key: impl Into<String>) -> Self {
        Self {
            api_key: Secret::new(api_key.into()),
            base_url: DEFAULT_BASE_URL.to_string(),
            default_max_tokens: 1024,
            timeouts: Timeouts::default(),
        }
    }
}

pub struct AnthropicProvider {
    client: HttpClient,
    config: AnthropicConfig,
}

impl AnthropicProvider {
    pub fn new(config: AnthropicConfig) -> Result<Self, InferenceError> {
        Ok(Self {
            client: HttpClient::new(&config.timeouts)?,
            config,
        })
    }

    fn body(&self, request: &GenerateRequest, stream: bool) -> Value {
        let messages = if request.uses_tools() {
            tool_messages(&request.messages)
        } else {
            request
                .messages
                .iter()
                .filter(|m| m.role != Role::System)
                .map(|m| {
                    let role = if m.role == Role::Assistant {
                        "assistant"
                    } else {
                        "user"
                    };
                    json!({"role": role, "content": m.content})
                })
                .collect()
        };
        let mut body = json!({
            "model": request.model,
            "messages": messages,
            "max_tokens": request.max_tokens.unwrap_or(self.config.default_max_tokens),
            "stream": stream,
        });
        if let Some(system) = request.system_prompt() {
            body["system"] = json!(system);
        }
        if let Some(t) = request.temperature {
            body["temperature"] = super::f32_json(t);
        }
        if let Some(p) = request.top_p {
            body["top_p"] = super::f32_json(p);
        }
        if !request.stop.is_empty() {
            body["stop_sequences"] = json!(request.stop);
        }
        if let Some(k) = request.top_k {
            body["top_k"] = json!(k);
        }
        if !request.tools.is_empty() {
            body["tools"] = request
                .tools
                .iter()
                .map(|t| {
                    let mut tool = json!({
                        "name": t.name,
                        "input_schema": t.parameters.clone().unwrap_or_else(|| json!({"type": "object"})),
                    });
                    if let Some(d) = &t.description {
                        tool["description"] = json!(d);
                    }
                    tool
                })
                .collect();
            let mut choice = match &request.tool_choice {
                None | Some(ToolChoice::Auto) => json!({"type": "auto"}),
                Some(ToolChoice::None) => json!({"type": "none"}),
                Some(ToolChoice::Required) => json!({"type": "any"}),
                Some(ToolChoice::Function(name)) => json!({"type": "tool", "name": name}),
            };
            if request.parallel_tool_calls == Some(false) && choice["type"] != "none" {
                choice["disable_parallel_tool_use"] = json!(true);
            }
            body["tool_choice"] = choice;
        }
        if let Some(format) = &request.response_format {
            // Anthropic's JSON mode: one tool whose input is the answer, forced.
            let schema = match format {
                ResponseFormat::JsonObject => json!({"type": "object"}),
                ResponseFormat::JsonSchema { schema, .. } => schema.clone(),
            };
            body["tools"] = json!([{"name": JSON_TOOL, "description": "Give the answer as this JSON object.", "input_schema": schema}]);
            body["tool_choice"] = json!({"type": "tool", "name": JSON_TOOL});
        }
        body
    }

    async fn send(
        &self,
        request: &GenerateRequest,
        stream: bool,
    ) -> Result<reqwest::Response, InferenceError> {
        check_model_name(&request.model)?;
        for (name, v) in [
            ("presence_penalty", request.presence_penalty),
            ("frequency_penalty", request.frequency_penalty),
        ] {
            if v.is_some() {
                return Err(InferenceError::Unsupported {
                    param: name.into(),
                    message: format!(
                        "{name} is not supported by Anthropic's Messages API: leave it out for Anthropic models"
                    ),
                });
            }
        }
        if request.response_format.is_some() && !request.tools.is_empty() {
            return Err(InferenceError::Unsupported {
                param: "response_format".into(),
                message: "structured output with tools is not served on Anthropic models (it uses a forced tool of its own)".into(),
            });
        }
        super::refuse_logprobs_and_bias(request, "Anthropic's Messages API")?;
        if request.seed.is_some() {
            return Err(InferenceError::Unsupported {
                param: "seed".into(),
                message: "seed is not supported by Anthropic's Messages API: leave it out for Anthropic models".into(),
            });
        }
        if request.prompt.is_some() {
            return Err(InferenceError::BadRequest(format!(
                "{} models take chats only: raw text completion (/v1/completions) is served by local models and OpenAI-protocol servers; use /v1/chat/completions",
                "Anthropic"
            )));
        }
        let builder = self
            .client
            .get()
            .post(format!("{}/v1/messages", self.config.base_url))
            .header("x-api-key", self.config.api_key.expose())
            .header("anthropic-version", API_VERSION)
            .json(&self.body(request, stream));
        send(builder, stream, &self.config.timeouts, map_error).await
    }
}

/// Anthropic error bodies: `{"type":"error","error":{"type","message"}}`.
fn map_error(status: u16, headers: &reqwest::header::HeaderMap, body: &str) -> InferenceError {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let kind = v["error"]["type"].as_str().unwrap_or_default();
    let message = v["error"]["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| format!("HTTP {status}"));
    map_kind(Some(status), kind, message, retry_after(headers))
}

fn map_kind(
    status: Option<u16>,
    kind: &str,
    message: String,
    retry: Option<std::time::Duration>,
) -> InferenceError {
    let lower = message.to_lowercase();
    match (status, kind) {
        (_, "rate_limit_error") | (Some(429), _) => InferenceError::RateLimited {
            retry_after: retry,
            message,
        },
        (_, "authentication_error" | "permission_error") | (Some(401 | 403), _) => {
            InferenceError::Auth(message)
        }
        (_, "not_found_error") | (Some(404), _) => InferenceError::ModelNotFound(message),
        (_, "invalid_request_error") | (Some(400 | 413 | 422), _)
            if lower.contains("prompt is too long")
                || (lower.contains("context") && lower.contains("exceed")) =>
        {
            InferenceError::ContextTooLong(message)
        }
        (_, "invalid_request_error" | "request_too_large") | (Some(400 | 413 | 422), _) => {
            InferenceError::BadRequest(message)
        }
        (_, "overloaded_error") => InferenceError::Upstream {
            status: status.or(Some(529)),
            message,
        },
        (s, _) => InferenceError::Upstream { status: s, message },
    }
}

fn finish(reason: Option<&str>) -> FinishReason {
    match reason {
        Some("end_turn" | "stop_sequence") | None => FinishReason::Stop,
        Some("max_tokens") => FinishReason::Length,
        Some("refusal") => FinishReason::ContentFilter,
        Some("tool_use") => FinishReason::ToolCalls,
        Some(other) => FinishReason::Other(other.to_string()),
    }
}

#[async_trait]
impl LlmProvider for AnthropicProvider {
    fn id(&self) -> &str {
        "anthropic"
    }

    async fn complete(&self, request: &GenerateRequest) -> Result<Completion, InferenceError> {
        let started = Instant::now();
        let response = self.send(request, false).await?;
        let v: Value = response
            .json()
            .await
            .map_err(|e| InferenceError::from_reqwest(&e))?;
        let content = v["content"]
            .as_array()
            .ok_or_else(|| InferenceError::Protocol("no content in the response".into()))?;
        let json_answer = request.response_format.is_some().then(|| {
            content
                .iter()
                .find(|b| b["type"] == "tool_use" && b["name"] == JSON_TOOL)
                .map(|b| b["input"].to_string())
        });
        let text: String = match json_answer {
            Some(Some(json)) => json,
            _ => content
                .iter()
                .filter(|b| b["type"] == "text")
                .filter_map(|b| b["text"].as_str())
                .collect(),
        };
        let tool_calls: Vec<ToolCall> = content
            .iter()
            .filter(|b| b["type"] == "tool_use" && b["name"] != JSON_TOOL)
            .map(|b| ToolCall {
                id: b["id"].as_str().unwrap_or_default().to_string(),
                name: b["name"].as_str().unwrap_or_default().to_string(),
                arguments: b["input"].to_string(),
            })
            .collect();
        let mut finish_reason = finish(v["stop_reason"].as_str());
        if request.response_format.is_some() && finish_reason == FinishReason::ToolCalls {
            finish_reason = FinishReason::Stop;
        }
        let usage = Usage {
            prompt_tokens: v["usage"]["input_tokens"].as_u64().unwrap_or(0) as u32,
            completion_tokens: v["usage"]["output_tokens"].as_u64().unwrap_or(0) as u32,
        };
        let total = started.elapsed();
        Ok(Completion {
            tool_calls,
            logprobs: Vec::new(),
            text,
            summary: Summary {
                model: v["model"].as_str().unwrap_or(&request.model).to_string(),
                usage,
                finish_reason,
                timing: Timing {
                    time_to_first_token: Some(total),
                    total,
                },
            },
        })
    }

    async fn stream(&self, request: &GenerateRequest) -> Result<CompletionStream, InferenceError> {
        let started = Instant::now();
        let response = self.send(request, true).await?;
        let parser = Parser {
            model: request.model.clone(),
            usage: Usage::default(),
            stop_reason: None,
            tool_blocks: Vec::new(),
            json_mode: request.response_format.is_some(),
            json_block: None,
        };
        Ok(drive(
            events(response).boxed(),
            parser,
            started,
            self.config.timeouts,
        ))
    }
}

struct Parser {
    model: String,
    usage: Usage,
    stop_reason: Option<String>,
    /// Content-block index → (tool-call index, whether input arrived) for
    /// `tool_use` blocks: OpenAI numbers tool calls, not blocks.
    tool_blocks: Vec<(u64, u32, bool)>,
    /// Structured output: the forced tool's input is the answer's text.
    json_mode: bool,
    json_block: Option<u64>,
}

impl StreamParser for Parser {
    type Event = SseEvent;

    fn event(&mut self, event: SseEvent) -> Result<Step, InferenceError> {
        if event.event == "ping" || event.data.is_empty() {
            return Ok(Step::Skip);
        }
        let v: Value = serde_json::from_str(&event.data).map_err(|e| {
            InferenceError::Protocol(format!("malformed {} event: {e}", event.event))
        })?;
        let kind = if event.event.is_empty() {
            v["type"].as_str().unwrap_or_default().to_string()
        } else {
            event.event
        };
        match kind.as_str() {
            "message_start" => {
                if let Some(m) = v["message"]["model"].as_str() {
                    self.model = m.to_string();
                }
                self.usage.prompt_tokens =
                    v["message"]["usage"]["input_tokens"].as_u64().unwrap_or(0) as u32;
                self.usage.completion_tokens =
                    v["message"]["usage"]["output_tokens"].as_u64().unwrap_or(0) as u32;
                Ok(Step::Skip)
            }
            "content_block_start"
                if self.json_mode
                    && v["content_block"]["type"] == "tool_use"
                    && v["content_block"]["name"] == JSON_TOOL =>
            {
                self.json_block = v["index"].as_u64();
                Ok(Step::Skip)
            }
            "content_block_delta"
                if self.json_block.is_some() && v["index"].as_u64() == self.json_block =>
            {
                Ok(Step::Delta(
                    v["delta"]["partial_json"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                ))
            }
            "content_block_start" if v["content_block"]["type"] == "tool_use" => {
                let block = v["index"].as_u64().unwrap_or(0);
                let index = u32::try_from(self.tool_blocks.len()).unwrap_or(u32::MAX);
                self.tool_blocks.push((block, index, false));
                Ok(Step::Events(vec![StreamEvent::ToolCall(ToolCallDelta {
                    index,
                    id: v["content_block"]["id"].as_str().map(str::to_string),
                    name: v["content_block"]["name"].as_str().map(str::to_string),
                    arguments: String::new(),
                })]))
            }
            "content_block_delta" => match v["delta"]["type"].as_str() {
                Some("text_delta") => Ok(Step::Delta(
                    v["delta"]["text"].as_str().unwrap_or_default().to_string(),
                )),
                Some("input_json_delta") => {
                    let block = v["index"].as_u64().unwrap_or(0);
                    let partial = v["delta"]["partial_json"].as_str().unwrap_or_default();
                    match self.tool_blocks.iter_mut().find(|(b, _, _)| *b == block) {
                        Some((_, index, seen)) if !partial.is_empty() => {
                            *seen = true;
                            Ok(Step::Events(vec![StreamEvent::ToolCall(ToolCallDelta {
                                index: *index,
                                id: None,
                                name: None,
                                arguments: partial.to_string(),
                            })]))
                        }
                        _ => Ok(Step::Skip),
                    }
                }
                _ => Ok(Step::Skip),
            },
            "content_block_stop" => {
                // A tool called with no input streams none: its arguments are `{}`.
                let block = v["index"].as_u64().unwrap_or(0);
                match self.tool_blocks.iter_mut().find(|(b, _, _)| *b == block) {
                    Some((_, index, seen)) if !*seen => {
                        *seen = true;
                        Ok(Step::Events(vec![StreamEvent::ToolCall(ToolCallDelta {
                            index: *index,
                            id: None,
                            name: None,
                            arguments: "{}".into(),
                        })]))
                    }
                    _ => Ok(Step::Skip),
                }
            }
            "message_delta" => {
                if let Some(r) = v["delta"]["stop_reason"].as_str() {
                    self.stop_reason = Some(r.to_string());
                }
                if let Some(n) = v["usage"]["output_tokens"].as_u64() {
                    self.usage.completion_tokens = n as u32;
                }
                if let Some(n) = v["usage"]["input_tokens"].as_u64() {
                    self.usage.prompt_tokens = n as u32;
                }
                Ok(Step::Skip)
            }
            "message_stop" => Ok(Step::Done {
                model: self.model.clone(),
                usage: self.usage,
                finish_reason: match finish(self.stop_reason.as_deref()) {
                    FinishReason::ToolCalls if self.json_mode => FinishReason::Stop,
                    other => other,
                },
            }),
            "error" => {
                let kind = v["error"]["type"].as_str().unwrap_or_default();
                let message = v["error"]["message"]
                    .as_str()
                    .unwrap_or("stream error")
                    .to_string();
                Err(map_kind(None, kind, message, None))
            }
            _ => Ok(Step::Skip),
        }
    }

    fn end(&mut self) -> Result<Step, InferenceError> {
        Err(InferenceError::Protocol(
            "the stream was cut before message_stop".into(),
        ))
    }
}

/// The forced tool that carries a structured answer (Anthropic's JSON
/// mode: https://docs.anthropic.com/en/docs/build-with-claude/tool-use#json-mode).
const JSON_TOOL: &str = "json_response";

/// Messages with tool calls as Anthropic's Messages API takes them
/// (https://docs.anthropic.com/en/docs/build-with-claude/tool-use): an
/// assistant turn's calls become `tool_use` blocks (arguments parsed into
/// `input`), tool results `tool_result` blocks in a user turn, and
/// consecutive turns of one role are merged (the API wants them to
/// alternate: several results answer one turn's several calls).
fn tool_messages(messages: &[Message]) -> Vec<Value> {
    let turns = messages.iter().filter(|m| m.role != Role::System).map(|m| {
        match m.role {
            Role::Assistant => {
                let mut blocks = Vec::new();
                if !m.content.is_empty() {
                    blocks.push(json!({"type": "text", "text": m.content}));
                }
                for c in &m.tool_calls {
                    let input: Value = serde_json::from_str(&c.arguments)
                        .ok()
                        .filter(Value::is_object)
                        .unwrap_or_else(|| json!({}));
                    blocks.push(
                        json!({"type": "tool_use", "id": c.id, "name": c.name, "input": input}),
                    );
                }
                ("assistant", blocks)
            }
            Role::Tool => (
                "user",
                vec![
                    json!({"type": "tool_result", "tool_use_id": m.tool_call_id, "content": m.content}),
                ],
            ),
            _ => ("user", vec![json!({"type": "text", "text": m.content})]),
        }
    });
    super::merge_turns(turns, "content")
}
