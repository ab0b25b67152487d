//! OpenAI and any OpenAI-compatible server (vLLM, Ollama, LM Studio, …)
//! through async-openai, with a configurable base URL. Streams ask for
//! usage (`stream_options.include_usage`).

use std::time::Instant;

use async_openai::config::OpenAIConfig as ClientConfig;
use async_openai::error::OpenAIError;
use async_openai::middleware::HttpRequestFactory;
use async_openai::types::chat::{
    ChatCompletionRequestAssistantMessage, ChatCompletionRequestMessage,
    ChatCompletionRequestSystemMessage, ChatCompletionRequestUserMessage,
    ChatCompletionStreamOptions, CreateChatCompletionRequest, CreateChatCompletionStreamResponse,
    FinishReason as OpenAiFinish, StopConfiguration,
};
use async_openai::Client;
use async_trait::async_trait;
use futures::StreamExt;
use muse_core::Secret;

use super::{check_model_name, drive, f32_json, send, HttpClient, Step, StreamParser, Timeouts};
use crate::error::InferenceError;
use crate::types::*;

pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";

tokio::task_local! {
    /// The `Retry-After` of the last 429 seen by this task's request.
    static RETRY_AFTER: std::cell::Cell<Option<std::time::Duration>>;
}

#[derive(Debug, Clone)]
pub struct OpenAiConfig {
    /// `openai`, or the operator's name for a compatible server (`vllm`, `ollama`, …).
    pub id: String,
    pub api_key: Secret<String>,
    /// Up to and including `/v1`.
    pub base_url: String,
    /// OpenAI itself wants `max_completion_tokens`; most compatible servers
    /// only know `max_tokens`.
    pub use_max_completion_tokens: bool,
    pub timeouts: Timeouts,
}

impl OpenAiConfig {
    /// The OpenAI API.
    pub fn openai(api_key: impl Into<String>) -> Self {
        Self {
            id: "openai".into(),
            api_key: Secret::new(api_key.into()),
            base_url: DEFAULT_BASE_URL.into(),
            use_max_completion_tokens: true,
            timeouts: Timeouts::default(),
        }
    }

    /// An OpenAI-compatible server at `base_url` (e.g. `http://localhost:8000/v1`).
    pub fn compatible(
        id: impl Into<String>,
        base_url: impl Into<String>,
        api_key: impl Into<String>,
    ) -> Self {
        Self {
            id: id.into(),
            api_key: Secret::new(api_key.into()),
            base_url: base_url.into(),
            use_max_completion_tokens: false,
            timeouts: Timeouts::default(),
        }
    }
}

pub struct OpenAiProvider {
    client: Client<ClientConfig>,
    /// Streams are read with this client directly: async-openai's stream
    /// reader forwards events through an unbounded channel from a spawned
    /// task, which would read a whole answer into memory however slowly the
    /// caller consumes it. Reading the body as the caller polls keeps
    /// backpressure end to end.
    http: HttpClient,
    config: OpenAiConfig,
}

impl OpenAiProvider {
    pub fn new(config: OpenAiConfig) -> Result<Self, InferenceError> {
        let client_config = ClientConfig::new()
            .with_api_base(config.base_url.trim_end_matches('/'))
            .with_api_key(config.api_key.expose().clone());
        // Our own transport instead of async-openai's default one: no hidden
        // retries (retrying is `Retrying`'s job, with one policy for every
        // provider), and the `Retry-After` of a 429 is kept for it.
        let http = HttpClient::new(&config.timeouts)?;
        let stream_http = http.clone();
        let transport = tower::service_fn(move |factory: HttpRequestFactory| {
            let http = http.clone();
            async move {
                let request = factory.build().await?;
                let response = http
                    .get()
                    .execute(request)
                    .await
                    .map_err(OpenAIError::Reqwest)?;
                if response.status().as_u16() == 429 {
                    let wait = crate::error::retry_after(response.headers());
                    let _ = RETRY_AFTER.try_with(|cell| cell.set(wait));
                }
                Ok::<_, OpenAIError>(response)
            }
        });
        let client = Client::with_config(client_config).with_http_service(transport);
        Ok(Self {
            client,
            http: stream_http,
            config,
        })
    }

    // `seed` and `max_tokens` are deprecated by OpenAI but are what
    // compatible servers (vLLM, Ollama, …) understand.
    #[allow(deprecated)]
    fn request(
        &self,
        request: &GenerateRequest,
        stream: bool,
    ) -> Result<CreateChatCompletionRequest, InferenceError> {
        check_model_name(&request.model)?;
        let messages = request
            .messages
            .iter()
            .map(|m| match m.role {
                Role::System => ChatCompletionRequestMessage::System(
                    ChatCompletionRequestSystemMessage::from(m.content.as_str()),
                ),
                Role::User => ChatCompletionRequestMessage::User(
                    ChatCompletionRequestUserMessage::from(m.content.as_str()),
                ),
                Role::Assistant => ChatCompletionRequestMessage::Assistant(
                    ChatCompletionRequestAssistantMessage::from(m.content.as_str()),
                ),
                // Conversations with tool calls take the JSON path
                // (`tools_body`); a stray tool result is a user turn here.
                Role::Tool => ChatCompletionRequestMessage::User(
                    ChatCompletionRequestUserMessage::from(m.content.as_str()),
                ),
            })
            .collect();
        let mut req = CreateChatCompletionRequest {
            model: request.model.clone(),
            messages,
            temperature: request.temperature,
            top_p: request.top_p,
            seed: request.seed.map(|s| s as i64),
            stop: (!request.stop.is_empty())
                .then(|| StopConfiguration::StringArray(request.stop.clone())),
            presence_penalty: request.presence_penalty,
            frequency_penalty: request.frequency_penalty,
            ..Default::default()
        };
        if self.config.use_max_completion_tokens {
            req.max_completion_tokens = request.max_tokens;
        } else {
            req.max_tokens = request.max_tokens;
        }
        if stream {
            req.stream = Some(true);
            req.stream_options = Some(ChatCompletionStreamOptions {
                include_usage: Some(true),
                include_obfuscation: None,
            });
        }
        Ok(req)
    }
}

/// `logit_bias` as OpenAI writes it: token ids as keys, biases as written.
fn logit_bias_json(request: &GenerateRequest) -> serde_json::Value {
    request
        .logit_bias
        .iter()
        .map(|(id, bias)| {
            // Whole biases (the usual -100, 100) stay integers.
            let v = if bias.fract() == 0.0 {
                serde_json::Value::from(*bias as i64)
            } else {
                f32_json(*bias)
            };
            (id.to_string(), v)
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// An error status of the OpenAI API → a typed error.
fn map_status(
    status: u16,
    message: String,
    code: &str,
    retry_after: Option<std::time::Duration>,
) -> InferenceError {
    match status {
        429 => InferenceError::RateLimited {
            retry_after,
            message,
        },
        401 | 403 => InferenceError::Auth(message),
        404 => InferenceError::ModelNotFound(message),
        400 | 413 | 422
            if code == "context_length_exceeded" || message.contains("maximum context length") =>
        {
            InferenceError::ContextTooLong(message)
        }
        400 | 413 | 422 => InferenceError::BadRequest(message),
        s => InferenceError::Upstream {
            status: Some(s),
            message,
        },
    }
}

/// An error response read by our own client (streams):
/// `{"error": {"message", "code"}}`.
fn map_http_error(status: u16, headers: &reqwest::header::HeaderMap, body: &str) -> InferenceError {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    let message = v["error"]["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| format!("HTTP {status}"));
    let code = v["error"]["code"].as_str().unwrap_or_default();
    map_status(status, message, code, crate::error::retry_after(headers))
}

/// async-openai errors → typed errors. Call it inside a `RETRY_AFTER` scope.
fn map_error(e: OpenAIError) -> InferenceError {
    match e {
        OpenAIError::ApiError(api) => map_status(
            api.status_code.as_u16(),
            api.api_error.message.clone(),
            api.api_error.code.as_deref().unwrap_or_default(),
            RETRY_AFTER.try_with(|cell| cell.get()).ok().flatten(),
        ),
        OpenAIError::Reqwest(e) => InferenceError::from_reqwest(&e),
        OpenAIError::JSONDeserialize(e, _) => {
            InferenceError::Protocol(format!("unreadable response: {e}"))
        }
        OpenAIError::StreamError(e) => {
            InferenceError::Protocol(format!("broken event stream: {e}"))
        }
        OpenAIError::InvalidArgument(m) => InferenceError::BadRequest(m),
        other => InferenceError::Upstream {
            status: None,
            message: other.to_string(),
        },
    }
}

fn finish(reason: Option<OpenAiFinish>) -> FinishReason {
    match reason {
        Some(OpenAiFinish::Stop) | None => FinishReason::Stop,
        Some(OpenAiFinish::Length) => FinishReason::Length,
        Some(OpenAiFinish::ContentFilter) => FinishReason::ContentFilter,
        Some(OpenAiFinish::ToolCalls) => FinishReason::ToolCalls,
        Some(OpenAiFinish::FunctionCall) => FinishReason::Other("function_call".into()),
    }
}

#[async_trait]
impl LlmProvider for OpenAiProvider {
    fn id(&self) -> &str {
        &self.config.id
    }

    async fn complete(&self, request: &GenerateRequest) -> Result<Completion, InferenceError> {
        if request.prompt.is_some() {
            return self.complete_text(request).await;
        }
        self.complete_json(request).await
    }

    /// `POST /embeddings` (https://platform.openai.com/docs/api-reference/embeddings).
    async fn embed(&self, request: &EmbedRequest) -> Result<Embeddings, InferenceError> {
        check_model_name(&request.model)?;
        let mut body = serde_json::json!({"model": request.model, "input": request.inputs, "encoding_format": "float"});
        if let Some(d) = request.dimensions {
            body["dimensions"] = d.into();
        }
        let builder = self
            .http
            .get()
            .post(format!(
                "{}/embeddings",
                self.config.base_url.trim_end_matches('/')
            ))
            .bearer_auth(self.config.api_key.expose())
            .json(&body);
        let response = send(builder, false, &self.config.timeouts, map_http_error).await?;
        let v: serde_json::Value = response
            .json()
            .await
            .map_err(|e| InferenceError::Protocol(format!("unreadable response: {e}")))?;
        let mut data: Vec<(u64, Vec<f32>)> = v["data"]
            .as_array()
            .ok_or_else(|| InferenceError::Protocol("no data in the embeddings response".into()))?
            .iter()
            .map(|d| {
                (
                    d["index"].as_u64().unwrap_or(0),
                    super::f32_vector(&d["embedding"]),
                )
            })
            .collect();
        data.sort_by_key(|(i, _)| *i);
        super::check_embedding_count(data.len(), request.inputs.len())?;
        Ok(Embeddings {
            model: v["model"].as_str().unwrap_or(&request.model).to_string(),
            vectors: data.into_iter().map(|(_, v)| v).collect(),
            usage: Usage {
                prompt_tokens: u32::try_from(v["usage"]["prompt_tokens"].as_u64().unwrap_or(0))
                    .unwrap_or(u32::MAX),
                completion_tokens: 0,
            },
        })
    }

    async fn stream(&self, request: &GenerateRequest) -> Result<CompletionStream, InferenceError> {
        if request.prompt.is_some() {
            return self.stream_text(request).await;
        }
        let started = Instant::now();
        let body = self.json_body(request, true)?;
        let builder = self
            .http
            .get()
            .post(format!(
                "{}/chat/completions",
                self.config.base_url.trim_end_matches('/')
            ))
            .bearer_auth(self.config.api_key.expose())
            .json(&body);
        let response = send(builder, true, &self.config.timeouts, map_http_error).await?;
        // Read as the caller polls; the stream ends at `data: [DONE]`.
        let events = data_events(response)
            .map(|e| e.and_then(|ev| parse_chunk(&ev.data)))
            .boxed();
        let parser = Parser {
            model: request.model.clone(),
            usage: None,
            finish: None,
        };
        Ok(drive(events, parser, started, self.config.timeouts))
    }
}

/// The `data:` events of an OpenAI-protocol stream, read as the caller
/// polls, up to `data: [DONE]` (empty and keep-alive events skipped).
fn data_events(
    response: reqwest::Response,
) -> impl futures::Stream<Item = Result<crate::sse::SseEvent, InferenceError>> + Send {
    crate::sse::events(response)
        .take_while(|e| {
            let more = !matches!(e, Ok(ev) if ev.data.trim() == "[DONE]");
            async move { more }
        })
        .filter(|e| {
            let keep = !matches!(e, Ok(ev) if ev.data.trim().is_empty() || ev.event == "keepalive");
            async move { keep }
        })
}

/// The end of an OpenAI-protocol stream: done when a finish reason came
/// (usage zero when the server ignored `include_usage`), else cut.
fn done_or_cut(
    model: &str,
    usage: Option<Usage>,
    finish: Option<FinishReason>,
) -> Result<Step, InferenceError> {
    match finish {
        Some(finish_reason) => Ok(Step::Done {
            model: model.to_string(),
            usage: usage.unwrap_or_default(),
            finish_reason,
        }),
        None => Err(InferenceError::Protocol(
            "the stream was cut before a finish reason".into(),
        )),
    }
}

/// One `chat.completion.chunk`, or the error object some servers send
/// mid-stream.
fn parse_chunk(data: &str) -> Result<CreateChatCompletionStreamResponse, InferenceError> {
    serde_json::from_str(data).map_err(|e| {
        let v: serde_json::Value = serde_json::from_str(data).unwrap_or_default();
        match v["error"]["message"].as_str() {
            Some(message) => InferenceError::Upstream {
                status: None,
                message: message.to_string(),
            },
            None => InferenceError::Protocol(format!("unreadable stream chunk: {e}")),
        }
    })
}

struct Parser {
    model: String,
    usage: Option<Usage>,
    finish: Option<FinishReason>,
}

impl StreamParser for Parser {
    type Event = CreateChatCompletionStreamResponse;

    fn event(&mut self, chunk: CreateChatCompletionStreamResponse) -> Result<Step, InferenceError> {
        if !chunk.model.is_empty() {
            self.model = chunk.model.clone();
        }
        if let Some(u) = chunk.usage {
            self.usage = Some(Usage {
                prompt_tokens: u.prompt_tokens,
                completion_tokens: u.completion_tokens,
            });
        }
        let mut text = String::new();
        let mut calls = Vec::new();
        let mut logprobs = Vec::new();
        for choice in chunk.choices {
            if let Some(t) = choice.delta.content {
                text.push_str(&t);
            }
            let as_written = |x: f32| x.to_string().parse::<f64>().unwrap_or(f64::from(x));
            for l in choice
                .logprobs
                .and_then(|l| l.content)
                .into_iter()
                .flatten()
            {
                logprobs.push(TokenLogprob {
                    token: l.token,
                    logprob: as_written(l.logprob),
                    bytes: l.bytes,
                    top_logprobs: l
                        .top_logprobs
                        .into_iter()
                        .map(|t| TopLogprob {
                            token: t.token,
                            logprob: as_written(t.logprob),
                            bytes: t.bytes,
                        })
                        .collect(),
                });
            }
            for c in choice.delta.tool_calls.into_iter().flatten() {
                let function = c.function;
                calls.push(ToolCallDelta {
                    index: c.index,
                    id: c.id,
                    name: function.as_ref().and_then(|f| f.name.clone()),
                    arguments: function.and_then(|f| f.arguments).unwrap_or_default(),
                });
            }
            if choice.finish_reason.is_some() {
                self.finish = Some(finish(choice.finish_reason));
            }
        }
        if calls.is_empty() && logprobs.is_empty() {
            return Ok(Step::Delta(text));
        }
        let mut events = Vec::with_capacity(calls.len() + 2);
        if !text.is_empty() {
            events.push(StreamEvent::Delta(text));
        }
        events.extend(calls.into_iter().map(StreamEvent::ToolCall));
        if !logprobs.is_empty() {
            events.push(StreamEvent::Logprobs(logprobs));
        }
        Ok(Step::Events(events))
    }

    /// The stream ends at `data: [DONE]`. Without a finish
    /// reason the stream was cut; without usage (servers that ignore
    /// `include_usage`) the usage is reported as zero.
    fn end(&mut self) -> Result<Step, InferenceError> {
        done_or_cut(&self.model, self.usage, self.finish.take())
    }
}

/// The legacy text completion API (`POST /completions`), for raw prompts:
/// OpenAI's instruct models and every OpenAI-compatible server (vLLM,
/// llama.cpp, Ollama, …) take it.
impl OpenAiProvider {
    fn text_body(
        &self,
        request: &GenerateRequest,
        stream: bool,
    ) -> Result<serde_json::Value, InferenceError> {
        check_model_name(&request.model)?;
        let mut body = serde_json::json!({
            "model": request.model,
            "prompt": request.prompt.clone().unwrap_or_default(),
        });
        let fields: [(&str, serde_json::Value); 7] = [
            (
                "presence_penalty",
                request.presence_penalty.map(f32_json).unwrap_or_default(),
            ),
            (
                "frequency_penalty",
                request.frequency_penalty.map(f32_json).unwrap_or_default(),
            ),
            ("max_tokens", request.max_tokens.into()),
            (
                "temperature",
                request.temperature.map(f32_json).unwrap_or_default(),
            ),
            ("top_p", request.top_p.map(f32_json).unwrap_or_default()),
            ("seed", request.seed.into()),
            (
                "stop",
                if request.stop.is_empty() {
                    serde_json::Value::Null
                } else {
                    request.stop.clone().into()
                },
            ),
        ];
        for (k, v) in fields {
            if !v.is_null() {
                body[k] = v;
            }
        }
        if !request.logit_bias.is_empty() {
            body["logit_bias"] = logit_bias_json(request);
        }
        if stream {
            body["stream"] = true.into();
            body["stream_options"] = serde_json::json!({"include_usage": true});
        }
        Ok(body)
    }

    fn text_url(&self) -> String {
        format!("{}/completions", self.config.base_url.trim_end_matches('/'))
    }

    async fn complete_text(&self, request: &GenerateRequest) -> Result<Completion, InferenceError> {
        let started = Instant::now();
        let builder = self
            .http
            .get()
            .post(self.text_url())
            .bearer_auth(self.config.api_key.expose())
            .json(&self.text_body(request, false)?);
        let response = send(builder, false, &self.config.timeouts, map_http_error).await?;
        let v: serde_json::Value = response
            .json()
            .await
            .map_err(|e| InferenceError::Protocol(format!("unreadable response: {e}")))?;
        let choice = v["choices"]
            .get(0)
            .ok_or_else(|| InferenceError::Protocol("no choices in the response".into()))?;
        let total = started.elapsed();
        Ok(Completion {
            text: choice["text"].as_str().unwrap_or_default().to_string(),
            tool_calls: Vec::new(),
            logprobs: Vec::new(),
            summary: Summary {
                model: v["model"].as_str().unwrap_or(&request.model).to_string(),
                usage: text_usage(&v["usage"]).unwrap_or_default(),
                finish_reason: text_finish(choice["finish_reason"].as_str()),
                timing: Timing {
                    time_to_first_token: Some(total),
                    total,
                },
            },
        })
    }

    async fn stream_text(
        &self,
        request: &GenerateRequest,
    ) -> Result<CompletionStream, InferenceError> {
        let started = Instant::now();
        let builder = self
            .http
            .get()
            .post(self.text_url())
            .bearer_auth(self.config.api_key.expose())
            .json(&self.text_body(request, true)?);
        let response = send(builder, true, &self.config.timeouts, map_http_error).await?;
        let events = data_events(response)
            .map(|e| {
                e.and_then(|ev| {
                    let v: serde_json::Value = serde_json::from_str(&ev.data).map_err(|e| {
                        InferenceError::Protocol(format!("unreadable stream chunk: {e}"))
                    })?;
                    match v["error"]["message"].as_str() {
                        Some(m) => Err(InferenceError::Upstream {
                            status: None,
                            message: m.to_string(),
                        }),
                        None => Ok(v),
                    }
                })
            })
            .boxed();
        let parser = TextParser {
            model: request.model.clone(),
            usage: None,
            finish: None,
        };
        Ok(drive(events, parser, started, self.config.timeouts))
    }
}

fn text_usage(v: &serde_json::Value) -> Option<Usage> {
    Some(Usage {
        prompt_tokens: u32::try_from(v["prompt_tokens"].as_u64()?).unwrap_or(u32::MAX),
        completion_tokens: u32::try_from(v["completion_tokens"].as_u64()?).unwrap_or(u32::MAX),
    })
}

fn text_finish(reason: Option<&str>) -> FinishReason {
    match reason {
        Some("length") => FinishReason::Length,
        Some("content_filter") => FinishReason::ContentFilter,
        Some("stop") | None => FinishReason::Stop,
        Some(other) => FinishReason::Other(other.to_string()),
    }
}

/// `text_completion` chunks: `choices[].text` deltas, a finish reason, and
/// usage in the last chunk when the server honours `include_usage`.
struct TextParser {
    model: String,
    usage: Option<Usage>,
    finish: Option<FinishReason>,
}

impl StreamParser for TextParser {
    type Event = serde_json::Value;

    fn event(&mut self, v: serde_json::Value) -> Result<Step, InferenceError> {
        if let Some(m) = v["model"].as_str().filter(|m| !m.is_empty()) {
            self.model = m.to_string();
        }
        if let Some(u) = text_usage(&v["usage"]) {
            self.usage = Some(u);
        }
        let mut text = String::new();
        for choice in v["choices"].as_array().into_iter().flatten() {
            text.push_str(choice["text"].as_str().unwrap_or_default());
            if let Some(r) = choice["finish_reason"].as_str() {
                self.finish = Some(text_finish(Some(r)));
            }
        }
        Ok(Step::Delta(text))
    }

    fn end(&mut self) -> Result<Step, InferenceError> {
        done_or_cut(&self.model, self.usage, self.finish.take())
    }
}

/// Tool calling and structured outputs over the OpenAI protocol: the request is written as JSON
/// (tools, tool_choice, parallel_tool_calls, assistant `tool_calls` and
/// `tool` messages exactly as OpenAI's reference shows them) and the answer
/// read as JSON, so whatever the server sends back reaches the caller.
impl OpenAiProvider {
    /// The request as JSON: async-openai's typed request, with the floats
    /// written as given (0.3, not 0.30000001192092896) and the members its
    /// types do not carry here (tool messages, tools, structured output).
    fn json_body(
        &self,
        request: &GenerateRequest,
        stream: bool,
    ) -> Result<serde_json::Value, InferenceError> {
        let mut body = serde_json::to_value(self.request(request, stream)?)
            .map_err(|e| InferenceError::Protocol(format!("request: {e}")))?;
        for (key, value) in [
            ("temperature", request.temperature),
            ("top_p", request.top_p),
            ("presence_penalty", request.presence_penalty),
            ("frequency_penalty", request.frequency_penalty),
        ] {
            if let Some(v) = value {
                body[key] = f32_json(v);
            }
        }
        body["messages"] = request.messages.iter().map(openai_message).collect();
        if let Some(top) = request.logprobs {
            body["logprobs"] = true.into();
            if top > 0 {
                body["top_logprobs"] = top.into();
            }
        }
        if !request.logit_bias.is_empty() {
            body["logit_bias"] = logit_bias_json(request);
        }
        if !request.tools.is_empty() {
            body["tools"] = request
                .tools
                .iter()
                .map(|t| {
                    let mut f = serde_json::json!({"name": t.name});
                    if let Some(d) = &t.description {
                        f["description"] = d.clone().into();
                    }
                    if let Some(p) = &t.parameters {
                        f["parameters"] = p.clone();
                    }
                    if let Some(strict) = t.strict {
                        f["strict"] = strict.into();
                    }
                    serde_json::json!({"type": "function", "function": f})
                })
                .collect();
        }
        if let Some(choice) = &request.tool_choice {
            body["tool_choice"] = match choice {
                ToolChoice::Auto => "auto".into(),
                ToolChoice::None => "none".into(),
                ToolChoice::Required => "required".into(),
                ToolChoice::Function(name) => {
                    serde_json::json!({"type": "function", "function": {"name": name}})
                }
            };
        }
        if let Some(p) = request.parallel_tool_calls {
            body["parallel_tool_calls"] = p.into();
        }
        match &request.response_format {
            None => {}
            Some(ResponseFormat::JsonObject) => {
                body["response_format"] = serde_json::json!({"type": "json_object"});
            }
            Some(ResponseFormat::JsonSchema {
                name,
                schema,
                strict,
            }) => {
                body["response_format"] = serde_json::json!({"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": strict}});
            }
        }
        Ok(body)
    }

    /// A whole chat completion through async-openai's client (its
    /// bring-your-own-types call, so that the JSON sent is exactly ours).
    async fn complete_json(&self, request: &GenerateRequest) -> Result<Completion, InferenceError> {
        let started = Instant::now();
        let body = self.json_body(request, false)?;
        let call = async {
            self.client
                .chat()
                .create_byot::<serde_json::Value, serde_json::Value>(body)
                .await
                .map_err(map_error)
        };
        let v = tokio::time::timeout(
            self.config.timeouts.request,
            RETRY_AFTER.scope(Default::default(), call),
        )
        .await
        .map_err(|_| InferenceError::Timeout)??;
        let choice = v["choices"]
            .get(0)
            .ok_or_else(|| InferenceError::Protocol("no choices in the response".into()))?;
        let message = &choice["message"];
        let tool_calls = message["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| ToolCall {
                id: c["id"].as_str().unwrap_or_default().to_string(),
                name: c["function"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                arguments: c["function"]["arguments"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            })
            .collect();
        let finish_reason = match choice["finish_reason"].as_str() {
            Some("tool_calls") | Some("function_call") => FinishReason::ToolCalls,
            other => text_finish(other),
        };
        let total = started.elapsed();
        Ok(Completion {
            text: message["content"].as_str().unwrap_or_default().to_string(),
            tool_calls,
            logprobs: serde_json::from_value(choice["logprobs"]["content"].clone())
                .unwrap_or_default(),
            summary: Summary {
                model: v["model"].as_str().unwrap_or(&request.model).to_string(),
                usage: text_usage(&v["usage"]).unwrap_or_default(),
                finish_reason,
                timing: Timing {
                    time_to_first_token: Some(total),
                    total,
                },
            },
        })
    }
}

/// One message as OpenAI's Chat Completions API writes it.
fn openai_message(m: &Message) -> serde_json::Value {
    match m.role {
        Role::System => serde_json::json!({"role": "system", "content": m.content}),
        Role::User => serde_json::json!({"role": "user", "content": m.content}),
        Role::Tool => {
            serde_json::json!({"role": "tool", "tool_call_id": m.tool_call_id, "content": m.content})
        }
        Role::Assistant => {
            let mut v = serde_json::json!({"role": "assistant", "content": m.content});
            if !m.tool_calls.is_empty() {
                if m.content.is_empty() {
                    v["content"] = serde_json::Value::Null;
                }
                v["tool_calls"] = m
                    .tool_calls
                    .iter()
                    .map(|c| serde_json::json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
                    .collect();
            }
            v
        }
    }
}
