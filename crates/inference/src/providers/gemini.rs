//! Google Gemini API, native: `models/{model}:generateContent` and
//! `:streamGenerateContent?alt=sse`, key in the `x-goog-api-key` header
//! (never in the URL), `usageMetadata` for usage.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use muse_core::Secret;
use serde_json::{json, Value};

use super::{check_model_name, drive, send, HttpClient, Step, StreamParser, Timeouts};
use crate::error::{retry_after, InferenceError};
use crate::sse::{events, SseEvent};
use crate::types::*;

pub const DEFAULT_BASE_URL: &str = "https://generativelanguage.googleapis.com";

#[derive(Debug, Clone)]
pub struct GeminiConfig {
    pub api_key: Secret<String>,
    /// Without a trailing slash; `/v1beta/models/…` is appended.
    pub base_url: String,
    pub timeouts: Timeouts,
}

impl GeminiConfig {
    pub fn new(api_key: impl Into<String>) -> Self {
        Self {
            api_key: Secret::new(api_key.into()),
            base_url: DEFAULT_BASE_URL.to_string(),
            timeouts: Timeouts::default(),
        }
    }
}

pub struct GeminiProvider {
    client: HttpClient,
    config: GeminiConfig,
}

fn body(request: &GenerateRequest) -> Value {
    let contents: Vec<Value> = if request.uses_tools() {
        tool_contents(&request.messages)
    } else {
        request
            .messages
            .iter()
            .filter(|m| m.role != Role::System)
            .map(|m| {
                let role = if m.role == Role::Assistant {
                    "model"
                } else {
                    "user"
                };
                json!({"role": role, "parts": [{"text": m.content}]})
            })
            .collect()
    };
    let mut config = serde_json::Map::new();
    if let Some(t) = request.temperature {
        config.insert("temperature".into(), super::f32_json(t));
    }
    if let Some(p) = request.top_p {
        config.insert("topP".into(), super::f32_json(p));
    }
    if let Some(m) = request.max_tokens {
        config.insert("maxOutputTokens".into(), json!(m));
    }
    if !request.stop.is_empty() {
        config.insert("stopSequences".into(), json!(request.stop));
    }
    if let Some(s) = request.seed {
        config.insert("seed".into(), json!(s));
    }
    if let Some(v) = request.presence_penalty {
        config.insert("presencePenalty".into(), super::f32_json(v));
    }
    if let Some(v) = request.frequency_penalty {
        config.insert("frequencyPenalty".into(), super::f32_json(v));
    }
    if let Some(k) = request.top_k {
        config.insert("topK".into(), json!(k));
    }
    match &request.response_format {
        None => {}
        Some(ResponseFormat::JsonObject) => {
            config.insert("responseMimeType".into(), json!("application/json"));
        }
        Some(ResponseFormat::JsonSchema { schema, .. }) => {
            config.insert("responseMimeType".into(), json!("application/json"));
            config.insert("responseJsonSchema".into(), schema.clone());
        }
    }
    let mut body = json!({"contents": contents});
    if !config.is_empty() {
        body["generationConfig"] = Value::Object(config);
    }
    if let Some(system) = request.system_prompt() {
        body["systemInstruction"] = json!({"parts": [{"text": system}]});
    }
    if !request.tools.is_empty() {
        let declarations: Vec<Value> = request
            .tools
            .iter()
            .map(|t| {
                let mut f = json!({"name": t.name});
                if let Some(d) = &t.description {
                    f["description"] = json!(d);
                }
                if let Some(p) = &t.parameters {
                    f["parameters"] = p.clone();
                }
                f
            })
            .collect();
        body["tools"] = json!([{"functionDeclarations": declarations}]);
        let config = match &request.tool_choice {
            None | Some(ToolChoice::Auto) => json!({"mode": "AUTO"}),
            Some(ToolChoice::None) => json!({"mode": "NONE"}),
            Some(ToolChoice::Required) => json!({"mode": "ANY"}),
            Some(ToolChoice::Function(name)) => {
                json!({"mode": "ANY", "allowedFunctionNames": [name]})
            }
        };
        body["toolConfig"] = json!({"functionCallingConfig": config});
    }
    body
}

/// `{"error": {"code", "message", "status", "details"}}`.
fn map_error(status: u16, headers: &reqwest::header::HeaderMap, body: &str) -> InferenceError {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let err = if v.is_array() {
        &v[0]["error"]
    } else {
        &v["error"]
    };
    let kind = err["status"].as_str().unwrap_or_default();
    let message = err["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| format!("HTTP {status}"));
    let lower = message.to_lowercase();
    match (status, kind) {
        (429, _) | (_, "RESOURCE_EXHAUSTED") => {
            // Retry-After, or the RetryInfo detail ("retryDelay": "7s").
            let from_body = err["details"].as_array().and_then(|d| {
                d.iter()
                    .find_map(|x| x["retryDelay"].as_str())
                    .and_then(|s| s.trim_end_matches('s').parse::<f64>().ok())
            });
            let retry = retry_after(headers).or(from_body
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(Duration::from_secs_f64));
            InferenceError::RateLimited {
                retry_after: retry,
                message,
            }
        }
        (401 | 403, _) | (_, "UNAUTHENTICATED" | "PERMISSION_DENIED") => {
            InferenceError::Auth(message)
        }
        // A bad key is a 400 INVALID_ARGUMENT whose detail says API_KEY_INVALID.
        (400, _) if body.contains("API_KEY_INVALID") || lower.contains("api key not valid") => {
            InferenceError::Auth(message)
        }
        (404, _) | (_, "NOT_FOUND") => InferenceError::ModelNotFound(message),
        (400, _)
            if lower.contains("token")
                && (lower.contains("exceed") || lower.contains("too long")) =>
        {
            InferenceError::ContextTooLong(message)
        }
        (400 | 413 | 422, _) => InferenceError::BadRequest(message),
        (s, _) => InferenceError::Upstream {
            status: Some(s),
            message,
        },
    }
}

fn finish(reason: Option<&str>) -> Option<FinishReason> {
    reason.map(|r| match r {
        "STOP" => FinishReason::Stop,
        "MAX_TOKENS" => FinishReason::Length,
        "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" => {
            FinishReason::ContentFilter
        }
        other => FinishReason::Other(other.to_lowercase()),
    })
}

fn usage(v: &Value) -> Option<Usage> {
    let u = v.get("usageMetadata")?;
    Some(Usage {
        prompt_tokens: u["promptTokenCount"].as_u64().unwrap_or(0) as u32,
        completion_tokens: u["candidatesTokenCount"].as_u64().unwrap_or(0) as u32,
    })
}

fn text_of(v: &Value) -> String {
    v["candidates"][0]["content"]["parts"]
        .as_array()
        .map(|parts| parts.iter().filter_map(|p| p["text"].as_str()).collect())
        .unwrap_or_default()
}

impl GeminiProvider {
    pub fn new(config: GeminiConfig) -> Result<Self, InferenceError> {
        Ok(Self {
            client: HttpClient::new(&config.timeouts)?,
            config,
        })
    }

    async fn send(
        &self,
        request: &GenerateRequest,
        stream: bool,
    ) -> Result<reqwest::Response, InferenceError> {
        check_model_name(&request.model)?;

        if request.prompt.is_some() {
            return Err(InferenceError::BadRequest(format!(
                "{} models take chats only: raw text completion (/v1/completions) is served by local models and OpenAI-protocol servers; use /v1/chat/completions",
                "Gemini"
            )));
        }
        super::refuse_logprobs_and_bias(request, "Gemini's generateContent")?;
        let action = if stream {
            "streamGenerateContent?alt=sse"
        } else {
            "generateContent"
        };
        let url = format!(
            "{}/v1beta/models/{}:{action}",
            self.config.base_url, request.model
        );
        let builder = self
            .client
            .get()
            .post(url)
            .header("x-goog-api-key", self.config.api_key.expose())
            .json(&body(request));
        send(builder, stream, &self.config.timeouts, map_error).await
    }
}

#[async_trait]
impl LlmProvider for GeminiProvider {
    fn id(&self) -> &str {
        "gemini"
    }

    async fn complete(&self, request: &GenerateRequest) -> Result<Completion, InferenceError> {
        let started = Instant::now();
        let response = self.send(request, false).await?;
        let v: Value = response
            .json()
            .await
            .map_err(|e| InferenceError::from_reqwest(&e))?;
        if v["candidates"].as_array().is_none_or(|c| c.is_empty()) {
            let reason = v["promptFeedback"]["blockReason"]
                .as_str()
                .unwrap_or("no candidates");
            return Err(InferenceError::BadRequest(format!(
                "the prompt was refused: {reason}"
            )));
        }
        let total = started.elapsed();
        let tool_calls: Vec<ToolCall> = function_calls(&v, 0)
            .into_iter()
            .map(|d| ToolCall {
                id: d.id.unwrap_or_default(),
                name: d.name.unwrap_or_default(),
                arguments: d.arguments,
            })
            .collect();
        let mut finish_reason =
            finish(v["candidates"][0]["finishReason"].as_str()).unwrap_or(FinishReason::Stop);
        if !tool_calls.is_empty() && finish_reason == FinishReason::Stop {
            finish_reason = FinishReason::ToolCalls;
        }
        Ok(Completion {
            tool_calls,
            logprobs: Vec::new(),
            text: text_of(&v),
            summary: Summary {
                model: v["modelVersion"]
                    .as_str()
                    .unwrap_or(&request.model)
                    .to_string(),
                usage: usage(&v).unwrap_or_default(),
                finish_reason,
                timing: Timing {
                    time_to_first_token: Some(total),
                    total,
                },
            },
        })
    }

    /// `POST /v1beta/models/{model}:batchEmbedContents`
    /// (https://ai.google.dev/api/embeddings). Gemini reports no token
    /// counts for embeddings: usage is estimated at 4 characters a token.
    async fn embed(&self, request: &EmbedRequest) -> Result<Embeddings, InferenceError> {
        check_model_name(&request.model)?;
        let requests: Vec<Value> = request
            .inputs
            .iter()
            .map(|text| {
                let mut r = json!({"model": format!("models/{}", request.model), "content": {"parts": [{"text": text}]}});
                if let Some(d) = request.dimensions {
                    r["outputDimensionality"] = json!(d);
                }
                r
            })
            .collect();
        let url = format!(
            "{}/v1beta/models/{}:batchEmbedContents",
            self.config.base_url, request.model
        );
        let builder = self
            .client
            .get()
            .post(url)
            .header("x-goog-api-key", self.config.api_key.expose())
            .json(&json!({"requests": requests}));
        let response = send(builder, false, &self.config.timeouts, map_error).await?;
        let v: Value = response
            .json()
            .await
            .map_err(|e| InferenceError::from_reqwest(&e))?;
        let vectors: Vec<Vec<f32>> = v["embeddings"]
            .as_array()
            .ok_or_else(|| InferenceError::Protocol("no embeddings in the response".into()))?
            .iter()
            .map(|e| super::f32_vector(&e["values"]))
            .collect();
        super::check_embedding_count(vectors.len(), request.inputs.len())?;
        let chars: usize = request.inputs.iter().map(|t| t.chars().count()).sum();
        Ok(Embeddings {
            model: request.model.clone(),
            vectors,
            usage: Usage {
                prompt_tokens: u32::try_from(chars.div_ceil(4)).unwrap_or(u32::MAX),
                completion_tokens: 0,
            },
        })
    }

    async fn stream(&self, request: &GenerateRequest) -> Result<CompletionStream, InferenceError> {
        let started = Instant::now();
        let response = self.send(request, true).await?;
        let parser = Parser {
            model: request.model.clone(),
            usage: Usage::default(),
            finish: None,
            calls: 0,
        };
        Ok(drive(
            events(response).boxed(),
            parser,
            started,
            self.config.timeouts,
        ))
    }
}

/// Gemini streams `GenerateContentResponse` chunks and simply ends: the
/// stream is complete when a chunk carried a `finishReason`.
struct Parser {
    model: String,
    usage: Usage,
    finish: Option<FinishReason>,
    /// Function calls seen so far (they arrive whole, one index each).
    calls: u32,
}

impl StreamParser for Parser {
    type Event = SseEvent;

    fn event(&mut self, event: SseEvent) -> Result<Step, InferenceError> {
        if event.data.trim().is_empty() {
            return Ok(Step::Skip);
        }
        let v: Value = serde_json::from_str(&event.data)
            .map_err(|e| InferenceError::Protocol(format!("malformed stream chunk: {e}")))?;
        if v.get("error").is_some() {
            return Err(map_error(
                v["error"]["code"].as_u64().unwrap_or(500) as u16,
                &Default::default(),
                &event.data,
            ));
        }
        if let Some(u) = usage(&v) {
            self.usage = u;
        }
        if let Some(m) = v["modelVersion"].as_str() {
            self.model = m.to_string();
        }
        if let Some(f) = finish(v["candidates"][0]["finishReason"].as_str()) {
            self.finish = Some(f);
        }
        let calls = function_calls(&v, self.calls);
        if calls.is_empty() {
            return Ok(Step::Delta(text_of(&v)));
        }
        self.calls += u32::try_from(calls.len()).unwrap_or(0);
        let mut events = Vec::with_capacity(calls.len() + 1);
        let text = text_of(&v);
        if !text.is_empty() {
            events.push(StreamEvent::Delta(text));
        }
        events.extend(calls.into_iter().map(StreamEvent::ToolCall));
        Ok(Step::Events(events))
    }

    fn end(&mut self) -> Result<Step, InferenceError> {
        match self.finish.take() {
            // Gemini ends a function call with STOP; OpenAI's callers expect tool_calls.
            Some(FinishReason::Stop) if self.calls > 0 => Ok(Step::Done {
                model: self.model.clone(),
                usage: self.usage,
                finish_reason: FinishReason::ToolCalls,
            }),
            Some(finish_reason) => Ok(Step::Done {
                model: self.model.clone(),
                usage: self.usage,
                finish_reason,
            }),
            None => Err(InferenceError::Protocol(
                "the stream was cut before a finishReason".into(),
            )),
        }
    }
}

/// The `functionCall` parts of a response, numbered from `first`. Gemini
/// gives no call ids (newer models may send `id`): Muse names them
/// `call_<n>` so that results can be matched back.
fn function_calls(v: &Value, first: u32) -> Vec<ToolCallDelta> {
    v["candidates"][0]["content"]["parts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p.get("functionCall"))
        .enumerate()
        .map(|(i, c)| {
            let index = first + u32::try_from(i).unwrap_or(0);
            ToolCallDelta {
                index,
                id: Some(
                    c["id"]
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| format!("call_{index}")),
                ),
                name: c["name"].as_str().map(str::to_string),
                arguments: if c["args"].is_null() {
                    "{}".into()
                } else {
                    c["args"].to_string()
                },
            }
        })
        .collect()
}

/// Messages with tool calls as the Gemini API takes them
/// (https://ai.google.dev/gemini-api/docs/function-calling): an assistant
/// turn's calls become `functionCall` parts of a `model` turn, a tool
/// result a `functionResponse` part (named after the call it answers,
/// found by its id) of a `user` turn; consecutive turns of one role merge.
fn tool_contents(messages: &[Message]) -> Vec<Value> {
    let names: std::collections::HashMap<&str, &str> = messages
        .iter()
        .flat_map(|m| m.tool_calls.iter())
        .map(|c| (c.id.as_str(), c.name.as_str()))
        .collect();
    let turns = messages
        .iter()
        .filter(|m| m.role != Role::System)
        .map(|m| match m.role {
            Role::Assistant => {
                let mut parts = Vec::new();
                if !m.content.is_empty() {
                    parts.push(json!({"text": m.content}));
                }
                for c in &m.tool_calls {
                    let args: Value = serde_json::from_str(&c.arguments)
                        .ok()
                        .filter(Value::is_object)
                        .unwrap_or_else(|| json!({}));
                    parts.push(json!({"functionCall": {"name": c.name, "args": args}}));
                }
                ("model", parts)
            }
            Role::Tool => {
                let name = m
                    .tool_call_id
                    .as_deref()
                    .and_then(|id| names.get(id))
                    .copied()
                    .unwrap_or_default();
                let response: Value = serde_json::from_str(&m.content)
                    .ok()
                    .filter(Value::is_object)
                    .unwrap_or_else(|| json!({"content": m.content}));
                (
                    "user",
                    vec![json!({"functionResponse": {"name": name, "response": response}})],
                )
            }
            _ => ("user", vec![json!({"text": m.content})]),
        });
    super::merge_turns(turns, "parts")
}
