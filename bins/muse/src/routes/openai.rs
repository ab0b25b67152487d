//! The OpenAI-compatible API: `POST /v1/chat/completions` (whole or
//! streamed as SSE), `POST /v1/completions` (the legacy text completion:
//! a raw prompt, no chat template) and `GET /v1/models`, over every model in the registry,
//! so the official OpenAI SDKs work against Muse unchanged (base URL
//! `…/v1`, API key = a Muse API key or access token). Every call is
//! recorded as an execution, failures and cancellations included.

use actix_web::http::StatusCode;
use actix_web::web::Bytes;
use actix_web::{web, HttpResponse};
use futures_util::StreamExt;
use muse_inference::{FinishReason, GenerateRequest, Message, Role};
use muse_prompts::ExecutionSource;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;

use crate::error::{ApiError, ErrorBody};
use crate::extract::CurrentUser;
use crate::state::AppState;
use muse_gateway::{Run, RunEvent};

pub fn config(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/v1")
            .wrap(actix_web::middleware::from_fn(openai_errors))
            .service(web::resource("/models").get(list_models))
            .service(web::resource("/models/{id:.*}").get(get_model))
            .service(web::resource("/chat/completions").post(chat_completions))
            .service(web::resource("/completions").post(completions))
            .service(web::resource("/embeddings").post(embeddings)),
    );
}

/// Most messages per request.
pub const MAX_MESSAGES: usize = 256;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct ContentPart {
    /// `text`; other part types (`image_url`, `input_audio`, `file`) are
    /// refused by name.
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub extra: serde_json::Map<String, Value>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum ContentField {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct FunctionCallField {
    pub name: String,
    /// The arguments as JSON text.
    pub arguments: String,
}

/// A tool call of an assistant message (OpenAI's `tool_calls[]`).
#[derive(Debug, Deserialize, ToSchema)]
pub struct ToolCallField {
    pub id: String,
    /// `function`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub function: FunctionCallField,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct FunctionField {
    pub name: String,
    pub description: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub parameters: Option<Value>,
    pub strict: Option<bool>,
}

/// A tool the model may call (`{"type": "function", "function": {…}}`).
#[derive(Debug, Deserialize, ToSchema)]
pub struct ToolField {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionField,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct ChatMessage {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    pub role: String,
    pub content: Option<ContentField>,
    /// The calls an assistant message made.
    pub tool_calls: Option<Vec<ToolCallField>>,
    /// The call a `tool` message answers.
    pub tool_call_id: Option<String>,
    /// Any other member (`name`, `refusal`, `audio`, `function_call`):
    /// refused by name, never dropped.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub extra: serde_json::Map<String, Value>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
    /// Ignored: Muse's chunks carry no obfuscation padding.
    pub include_obfuscation: Option<bool>,
}

/// OpenAI's Chat Completions request. Every field of OpenAI's reference is
/// either honoured, ignored by a documented rule (`user`, `metadata`,
/// `store`, `service_tier`, `prompt_cache_key`, `safety_identifier`), or
/// refused with 400 `unsupported_parameter` naming it; so is any field the
/// reference does not have. See docs/openai.md.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ChatRequest {
    /// A registry key (`openai/gpt-4o-mini`, `local/org/name`), an alias
    /// (`MODEL_ALIASES`), or a bare model name that one provider offers.
    pub model: String,
    pub messages: Vec<ChatMessage>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub stop: Option<StopField>,
    pub seed: Option<u64>,
    /// -2 to 2: honoured by local models, OpenAI-protocol servers and
    /// Gemini; refused by Anthropic.
    pub presence_penalty: Option<f32>,
    /// -2 to 2: as `presence_penalty`.
    pub frequency_penalty: Option<f32>,
    /// Extension: honoured by local models, Anthropic and Gemini.
    pub top_k: Option<u32>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// Only 1.
    pub n: Option<u32>,
    /// Log-probabilities of the answer's tokens: OpenAI-protocol
    /// providers and local models; Anthropic and Gemini refuse it.
    pub logprobs: Option<bool>,
    /// 0 to 20 likeliest alternatives per token (needs `logprobs: true`).
    pub top_logprobs: Option<u32>,
    /// Token id → bias (-100 to 100), added to the logits before
    /// sampling: forwarded to OpenAI-protocol servers, applied by local
    /// models; Anthropic and Gemini refuse it.
    #[schema(value_type = Option<Object>)]
    pub logit_bias: Option<Value>,
    /// `{"type": "text"}`, `{"type": "json_object"}` or
    /// `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`;
    /// the answer is checked against it before it is returned.
    #[schema(value_type = Option<Object>)]
    pub response_format: Option<Value>,
    /// Functions the model may call: served by OpenAI-protocol providers;
    /// the others answer 400 `unsupported_parameter` (`tools`).
    pub tools: Option<Vec<ToolField>>,
    /// `auto`, `none`, `required` or `{"type": "function", "function": {"name"}}`.
    #[schema(value_type = Option<serde_json::Value>)]
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    /// Fields of OpenAI's reference Muse does not serve yet (tools,
    /// structured outputs, log-probabilities, …) and fields that are not in
    /// the reference: refused by name.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub extra: serde_json::Map<String, Value>,
}

/// Most choices (`n`) in one answer.
pub const MAX_CHOICES: u32 = 8;

/// Fields of the reference that change nothing in Muse's answer: accepted
/// and ignored (documented in docs/openai.md).
const IGNORED_FIELDS: [&str; 6] = [
    "user",
    "metadata",
    "store",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
];

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
        message,
    )
}

/// A validation error about one field (`param` in OpenAI's error shape).
fn invalid_param(param: &str, message: impl Into<String>) -> ApiError {
    invalid(message).with_details(json!({ "param": param }))
}

/// A field Muse does not serve: 400 `unsupported_parameter` naming it.
fn unsupported(param: &str, why: &str) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "unsupported_parameter",
        format!("{param} is not supported: {why}"),
    )
    .with_details(json!({ "param": param }))
}

/// Values of reference fields that mean "off": accepted as absent.
fn is_off(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::String(s) => s.is_empty() || s == "none" || s == "auto",
        _ => false,
    }
}

fn check_extra(extra: &serde_json::Map<String, Value>) -> Result<(), ApiError> {
    for (name, value) in extra {
        if IGNORED_FIELDS.contains(&name.as_str()) {
            continue;
        }
        let why = match name.as_str() {
            "functions" if is_off(value) => continue,
            "function_call" if !extra.contains_key("functions") => continue,
            "functions" | "function_call" => {
                "the deprecated functions API is not served: use tools"
            }
            "modalities" if value == &json!(["text"]) => continue,
            "audio" | "modalities" => "only text answers are served",
            "prediction" if value.is_null() => continue,
            "prediction" => "predicted outputs are not used",
            "reasoning_effort" | "verbosity" if value.is_null() => continue,
            "reasoning_effort" | "verbosity" => "it cannot be passed to the providers yet",
            "web_search_options" => "web search is not available",
            _ => "it is not a field of OpenAI's Chat Completions API",
        };
        return Err(unsupported(name, why));
    }
    Ok(())
}

fn to_request(body: &ChatRequest) -> Result<GenerateRequest, ApiError> {
    check_extra(&body.extra)?;
    if body.n.is_some_and(|n| n == 0 || n > MAX_CHOICES) {
        return Err(invalid_param(
            "n",
            format!("n must be between 1 and {MAX_CHOICES}"),
        ));
    }
    if body.top_logprobs.is_some_and(|t| t > MAX_TOP_LOGPROBS) {
        return Err(invalid_param(
            "top_logprobs",
            format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}"),
        ));
    }
    if body.top_logprobs.is_some_and(|t| t > 0) && body.logprobs != Some(true) {
        return Err(invalid_param(
            "top_logprobs",
            "top_logprobs needs logprobs: true",
        ));
    }
    let response_format = match &body.response_format {
        None | Some(Value::Null) => None,
        Some(rf) => match rf["type"].as_str() {
            Some("text") => None,
            Some("json_object") => Some(muse_inference::ResponseFormat::JsonObject),
            Some("json_schema") => {
                let spec = &rf["json_schema"];
                let name = spec["name"].as_str().unwrap_or("response").to_string();
                let schema = spec["schema"].clone();
                if !schema.is_object() {
                    return Err(invalid_param(
                        "response_format.json_schema.schema",
                        "json_schema needs a schema (a JSON Schema object)",
                    ));
                }
                if let Err(e) = jsonschema::validator_for(&schema) {
                    return Err(invalid_param(
                        "response_format.json_schema.schema",
                        format!("the schema does not compile: {e}"),
                    ));
                }
                Some(muse_inference::ResponseFormat::JsonSchema {
                    name,
                    schema,
                    strict: spec["strict"].as_bool().unwrap_or(false),
                })
            }
            _ => {
                return Err(invalid_param(
                    "response_format.type",
                    "response_format.type must be text, json_object or json_schema",
                ))
            }
        },
    };
    if body.messages.is_empty() || body.messages.len() > MAX_MESSAGES {
        return Err(invalid_param(
            "messages",
            format!("messages must hold 1 to {MAX_MESSAGES} messages"),
        ));
    }
    let mut messages = Vec::with_capacity(body.messages.len());
    for (i, m) in body.messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" => Role::Tool,
            "function" => {
                return Err(unsupported(
                    &format!("messages[{i}].role"),
                    "the deprecated functions API is not served: use tools",
                ))
            }
            other => {
                return Err(invalid_param(
                    &format!("messages[{i}].role"),
                    format!(
                    "messages[{i}].role {other:?} is not one of system, developer, user, assistant"
                ),
                ))
            }
        };
        if let Some((name, _)) = m.extra.iter().find(|(_, v)| !v.is_null()) {
            return Err(unsupported(
                &format!("messages[{i}].{name}"),
                "only role and content are served",
            ));
        }
        let content = match &m.content {
            None => String::new(),
            Some(ContentField::Text(t)) => t.clone(),
            Some(ContentField::Parts(parts)) => {
                let mut texts = Vec::with_capacity(parts.len());
                for (j, p) in parts.iter().enumerate() {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => texts.push(t.as_str()),
                        ("text", None) => {
                            return Err(invalid_param(
                                &format!("messages[{i}].content[{j}].text"),
                                format!("messages[{i}].content[{j}] has no text"),
                            ))
                        }
                        (kind, _) => {
                            return Err(unsupported(
                                &format!("messages[{i}].content[{j}]"),
                                &format!("{kind} parts are not supported by {}", body.model),
                            ))
                        }
                    }
                }
                // As OpenAI-compatible servers join text parts.
                texts.join("\n")
            }
        };
        let mut message = Message::new(role, content);
        if role == Role::Tool {
            match &m.tool_call_id {
                Some(id) if !id.is_empty() => message.tool_call_id = Some(id.clone()),
                _ => {
                    return Err(invalid_param(
                        &format!("messages[{i}].tool_call_id"),
                        format!("messages[{i}] is a tool result without its tool_call_id"),
                    ))
                }
            }
        } else if m.tool_call_id.is_some() {
            return Err(invalid_param(
                &format!("messages[{i}].tool_call_id"),
                "only tool messages carry a tool_call_id",
            ));
        }
        if let Some(calls) = &m.tool_calls {
            if role != Role::Assistant {
                return Err(invalid_param(
                    &format!("messages[{i}].tool_calls"),
                    "only assistant messages carry tool_calls",
                ));
            }
            message.tool_calls = calls
                .iter()
                .map(|c| muse_inference::ToolCall {
                    id: c.id.clone(),
                    name: c.function.name.clone(),
                    arguments: c.function.arguments.clone(),
                })
                .collect();
        }
        messages.push(message);
    }
    let tools = match &body.tools {
        None => Vec::new(),
        Some(tools) => {
            let mut out = Vec::with_capacity(tools.len());
            for (i, t) in tools.iter().enumerate() {
                if t.kind != "function" {
                    return Err(unsupported(
                        &format!("tools[{i}].type"),
                        "only function tools are served",
                    ));
                }
                let name = &t.function.name;
                if name.is_empty()
                    || name.len() > 64
                    || !name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                {
                    return Err(invalid_param(
                        &format!("tools[{i}].function.name"),
                        format!("tool name {name:?} must be 1 to 64 letters, digits, _ or -"),
                    ));
                }
                out.push(muse_inference::Tool {
                    name: name.clone(),
                    description: t.function.description.clone(),
                    parameters: t.function.parameters.clone(),
                    strict: t.function.strict,
                });
            }
            out
        }
    };
    let tool_choice = match &body.tool_choice {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s == "auto" => Some(muse_inference::ToolChoice::Auto),
        Some(Value::String(s)) if s == "none" => Some(muse_inference::ToolChoice::None),
        Some(Value::String(s)) if s == "required" => Some(muse_inference::ToolChoice::Required),
        Some(v) => match v["function"]["name"].as_str() {
            Some(name) if v["type"] == "function" && tools.iter().any(|t| t.name == name) => {
                Some(muse_inference::ToolChoice::Function(name.to_string()))
            }
            _ => {
                return Err(invalid_param(
                    "tool_choice",
                    "tool_choice must be auto, none, required, or {\"type\": \"function\", \"function\": {\"name\"}} naming one of the tools",
                ))
            }
        },
    };
    if tools.is_empty()
        && matches!(
            tool_choice,
            Some(muse_inference::ToolChoice::Required | muse_inference::ToolChoice::Function(_))
        )
    {
        return Err(invalid_param(
            "tool_choice",
            "tool_choice asks for a tool but no tools are given",
        ));
    }
    if let Some(t) = body.temperature.filter(|t| !(0.0..=2.0).contains(t)) {
        return Err(invalid_param(
            "temperature",
            format!("temperature must be between 0 and 2, got {t}"),
        ));
    }
    if let Some(p) = body.top_p.filter(|p| !(0.0..=1.0).contains(p)) {
        return Err(invalid_param(
            "top_p",
            format!("top_p must be between 0 and 1, got {p}"),
        ));
    }
    for (name, v) in [
        ("presence_penalty", body.presence_penalty),
        ("frequency_penalty", body.frequency_penalty),
    ] {
        if let Some(v) = v.filter(|v| !(-2.0..=2.0).contains(v)) {
            return Err(invalid_param(
                name,
                format!("{name} must be between -2 and 2, got {v}"),
            ));
        }
    }
    let max_tokens = body.max_completion_tokens.or(body.max_tokens);
    if max_tokens == Some(0) || max_tokens.is_some_and(|m| m > 128_000) {
        return Err(invalid_param(
            "max_tokens",
            "max_tokens must be between 1 and 128000",
        ));
    }
    let stop = match &body.stop {
        None => Vec::new(),
        Some(StopField::One(s)) => vec![s.clone()],
        Some(StopField::Many(v)) => v.clone(),
    };
    if stop.len() > 4 {
        return Err(invalid_param("stop", "at most 4 stop sequences"));
    }
    let mut req = GenerateRequest::new(body.model.clone(), messages);
    req.temperature = body.temperature;
    req.top_p = body.top_p;
    req.max_tokens = max_tokens;
    req.stop = stop;
    req.seed = body.seed;
    req.top_k = body.top_k;
    req.presence_penalty = body.presence_penalty.filter(|v| *v != 0.0);
    req.frequency_penalty = body.frequency_penalty.filter(|v| *v != 0.0);
    req.logit_bias = logit_bias(body.logit_bias.as_ref())?;
    if body.logprobs == Some(true) {
        req.logprobs = Some(body.top_logprobs.unwrap_or(0));
    }
    if !tools.is_empty() {
        req.tool_choice = tool_choice;
        req.parallel_tool_calls = body.parallel_tool_calls;
    }
    req.tools = tools;
    req.response_format = response_format;
    Ok(req)
}

/// Most alternatives per token in `top_logprobs` (OpenAI's limit).
const MAX_TOP_LOGPROBS: u32 = 20;

/// A choice's `logprobs` object (null when not asked for).
fn logprobs_value(asked: bool, content: &[muse_inference::TokenLogprob]) -> Value {
    if asked {
        json!({"content": content, "refusal": null})
    } else {
        Value::Null
    }
}

/// Most entries in `logit_bias` (OpenAI's own limit).
const MAX_LOGIT_BIAS: usize = 300;

/// `logit_bias`: token ids (as strings) to biases between -100 and 100.
fn logit_bias(value: Option<&Value>) -> Result<std::collections::BTreeMap<u32, f32>, ApiError> {
    let map = match value {
        None | Some(Value::Null) => return Ok(Default::default()),
        Some(Value::Object(m)) => m,
        Some(_) => {
            return Err(invalid_param(
                "logit_bias",
                "logit_bias must be an object of token ids to biases",
            ))
        }
    };
    if map.len() > MAX_LOGIT_BIAS {
        return Err(invalid_param(
            "logit_bias",
            format!("logit_bias takes at most {MAX_LOGIT_BIAS} tokens"),
        ));
    }
    map.iter()
        .map(|(k, v)| {
            let id: u32 = k.parse().map_err(|_| {
                invalid_param(
                    "logit_bias",
                    format!("logit_bias key {k:?} is not a token id"),
                )
            })?;
            match v.as_f64() {
                Some(b) if (-100.0..=100.0).contains(&b) => Ok((id, b as f32)),
                _ => Err(invalid_param(
                    "logit_bias",
                    format!("logit_bias[{k}] must be a number between -100 and 100"),
                )),
            }
        })
        .collect()
}

fn finish(reason: &FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::ContentFilter => "content_filter",
        FinishReason::ToolCalls => "tool_calls",
        FinishReason::Other(_) => "stop",
    }
}

/// Chat completion, OpenAI-compatible (`stream: true` for SSE).
#[utoipa::path(post, path = "/v1/chat/completions", tag = "openai", security(("bearer" = [])), request_body = ChatRequest,
    responses(
        (status = 200, description = "`chat.completion`, or `text/event-stream` of `chat.completion.chunk` ending with `data: [DONE]`"),
        (status = 400, description = "OpenAI's error shape: validation_failed, unsupported_parameter (with `param`), invalid_model_request", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, description = "model_not_found", body = ErrorBody),
        (status = 429, description = "provider_rate_limited", body = ErrorBody),
        (status = 502, description = "provider errors", body = ErrorBody),
    ))]
pub async fn chat_completions(
    state: web::Data<AppState>,
    user: CurrentUser,
    body: web::Json<ChatRequest>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let mut request = to_request(&body)?;
    let chain = resolve_chain(&state, &body.model)?;
    let key = chain[0].clone();
    request.model = key.clone();
    let request_format = request.response_format.clone();
    let asked_logprobs = request.logprobs.is_some();
    super::library::provider_gate(&state, &user.0, &key)?;
    if body.stream.unwrap_or(false) {
        state
            .flags
            .check(muse_billing::flags::known::STREAMING, &user.0)?;
    }
    let created = muse_core::Clock::now_secs(&muse_core::SystemClock);
    let choices = body.n.unwrap_or(1);
    let stream = body.stream.unwrap_or(false);
    let include_usage = body
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    if choices > 1 && stream {
        // Admitted one by one (each against the quota), opened together.
        let runs = admit_choices(&state, &user, &key, &request, choices).await?;
        let opened = futures_util::future::join_all(runs.into_iter().map(|run| async move {
            let id = run.id;
            run.stream()
                .await
                .map(|events| (id, Box::pin(events) as RunStream))
        }))
        .await;
        let mut streams = Vec::with_capacity(opened.len());
        for o in opened {
            streams.push(o.map_err(|f| ApiError::from(f.error).for_execution(f.execution.id))?);
        }
        return Ok(stream_choices(
            streams,
            key,
            created,
            request_format,
            include_usage,
        ));
    }
    if choices > 1 {
        return several_choices(
            &state,
            &user,
            &key,
            request,
            choices,
            created,
            request_format,
        )
        .await;
    }
    let (key, opened) = open_chain(&state, &user, &chain, request, stream).await?;
    let format = request_format.clone();
    if let Opened::Whole(done) = opened {
        let e = &done.execution;
        let id = e.id;
        let completion_id = format!("chatcmpl-{}", id.simple());
        if let Some(format) = &format {
            if done.tool_calls.is_empty() {
                if let Err(why) = format.check(e.output.as_deref().unwrap_or_default()) {
                    return Err(invalid_output(&why, id));
                }
            }
        }
        let response = json!({
            "id": completion_id, "object": "chat.completion", "created": created, "model": key,
            "choices": [{"index": 0, "message": assistant_message(e.output.as_deref().unwrap_or_default(), &done.tool_calls), "finish_reason": finish(&done.finish_reason), "logprobs": logprobs_value(asked_logprobs, &done.logprobs)}],
            "usage": usage_of(e),
        });
        return Ok(HttpResponse::Ok()
            .insert_header(("x-muse-execution-id", id.to_string()))
            .json(response));
    }

    let Opened::Stream(events, id) = opened else {
        return Err(ApiError::internal(
            "chat",
            "a whole answer reached the stream path",
        ));
    };
    Ok(stream_choices(
        vec![(id, events)],
        key,
        created,
        format,
        include_usage,
    ))
}

/// A streamed answer of one call per choice: each call's events become
/// chunks of its `index` as they come; after every choice has finished,
/// the usage (summed, when asked for) and `[DONE]`. A failed choice ends
/// the stream with the error (the other calls are cancelled).
fn stream_choices(
    streams: Vec<(uuid::Uuid, RunStream)>,
    model: String,
    created: i64,
    format: Option<muse_inference::ResponseFormat>,
    include_usage: bool,
) -> HttpResponse {
    let ids: Vec<String> = streams.iter().map(|(id, _)| id.to_string()).collect();
    let completion_id = format!(
        "chatcmpl-{}",
        streams
            .first()
            .map(|(id, _)| id.simple().to_string())
            .unwrap_or_default()
    );
    let n = streams.len();
    let chunk = move |index: usize,
                      delta: Value,
                      finish: Value,
                      usage: Value,
                      model: &str,
                      id: &str|
          -> Bytes {
        let choices = if delta.is_null() && finish.is_null() {
            json!([])
        } else {
            json!([{"index": index, "delta": delta, "finish_reason": finish, "logprobs": null}])
        };
        Bytes::from(format!(
            "data: {}\n\n",
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices, "usage": usage})
        ))
    };
    let head: Vec<u8> = (0..n)
        .flat_map(|i| {
            chunk(
                i,
                json!({"role": "assistant", "content": ""}),
                Value::Null,
                Value::Null,
                &model,
                &completion_id,
            )
            .to_vec()
        })
        .collect();
    let head =
        futures_util::stream::once(async move { Ok::<_, actix_web::Error>(Bytes::from(head)) });
    let merged = futures_util::stream::select_all(
        streams
            .into_iter()
            .enumerate()
            .map(|(i, (_, events))| events.map(move |ev| (i, ev)).boxed_local()),
    );
    // Choices still running, and the usage so far.
    let state = (n, 0u64, 0u64, false);
    let body_stream = merged.scan(state, move |st, (index, event)| {
        let (remaining, prompt, completion, ended) = st;
        if *ended {
            return futures_util::future::ready(None);
        }
        let bytes = match event {
            RunEvent::Token(text) => chunk(
                index,
                json!({"content": text}),
                Value::Null,
                Value::Null,
                &model,
                &completion_id,
            ),
            // Log-probabilities in a chunk of their own, under the choice.
            RunEvent::Logprobs(l) => Bytes::from(format!(
                "data: {}\n\n",
                json!({"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [{"index": index, "delta": {}, "finish_reason": null, "logprobs": logprobs_value(true, &l)}], "usage": null})
            )),
            RunEvent::ToolCall(d) => {
                let mut call = json!({"index": d.index, "function": {"arguments": d.arguments}});
                if let Some(id) = d.id {
                    call["id"] = id.into();
                    call["type"] = "function".into();
                }
                if let Some(name) = d.name {
                    call["function"]["name"] = name.into();
                }
                chunk(
                    index,
                    json!({"tool_calls": [call]}),
                    Value::Null,
                    Value::Null,
                    &model,
                    &completion_id,
                )
            }
            RunEvent::Done(done) => {
                let e = &done.execution;
                if let (Some(format), true) = (&format, done.tool_calls.is_empty()) {
                    if let Err(why) = format.check(e.output.as_deref().unwrap_or_default()) {
                        *ended = true;
                        return futures_util::future::ready(Some(Ok::<_, actix_web::Error>(
                            error_frame(&invalid_output(&why, e.id)),
                        )));
                    }
                }
                *prompt += u64::from(e.prompt_tokens);
                *completion += u64::from(e.completion_tokens);
                *remaining -= 1;
                let mut out = chunk(
                    index,
                    json!({}),
                    json!(finish(&done.finish_reason)),
                    Value::Null,
                    &model,
                    &completion_id,
                )
                .to_vec();
                if *remaining == 0 {
                    if include_usage {
                        out.extend_from_slice(&chunk(
                            index,
                            Value::Null,
                            Value::Null,
                            json!({"prompt_tokens": *prompt, "completion_tokens": *completion, "total_tokens": *prompt + *completion}),
                            &model,
                            &completion_id,
                        ));
                    }
                    out.extend_from_slice(b"data: [DONE]\n\n");
                    *ended = true;
                }
                Bytes::from(out)
            }
            RunEvent::Failed(failed) => {
                *ended = true;
                error_frame(&ApiError::from(failed.error).for_execution(failed.execution.id))
            }
        };
        futures_util::future::ready(Some(Ok::<_, actix_web::Error>(bytes)))
    });
    let mut res = HttpResponse::Ok();
    res.content_type("text/event-stream")
        .insert_header(("cache-control", "no-cache"))
        .insert_header(("x-muse-execution-id", ids.join(",")));
    res.streaming(head.chain(body_stream))
}

/// The events of one streamed call.
type RunStream = std::pin::Pin<Box<dyn futures_util::Stream<Item = RunEvent>>>;

/// One call per choice, each admitted against the quota in turn (a
/// refusal stops there: the calls admitted before it are dropped, recorded
/// as cancelled with nothing spent).
async fn admit_choices(
    state: &web::Data<AppState>,
    user: &CurrentUser,
    key: &str,
    request: &GenerateRequest,
    n: u32,
) -> Result<Vec<Run>, ApiError> {
    let mut runs = Vec::with_capacity(n as usize);
    for _ in 0..n {
        runs.push(
            Run::new(
                &state.gateway,
                user.0.user.id,
                ExecutionSource::OpenaiApi,
                key,
                request.clone(),
            )
            .admit()
            .await?,
        );
    }
    Ok(runs)
}

/// `n` > 1: as many independent calls, run together (each admitted against
/// the quota and recorded), answered as one `chat.completion` whose choices
/// are in order; usage is their sum, `x-muse-execution-id` lists them all.
async fn several_choices(
    state: &web::Data<AppState>,
    user: &CurrentUser,
    key: &str,
    request: GenerateRequest,
    n: u32,
    created: i64,
    format: Option<muse_inference::ResponseFormat>,
) -> Result<HttpResponse, ApiError> {
    let asked_logprobs = request.logprobs.is_some();
    let runs = admit_choices(state, user, key, &request, n).await?;
    let ids: Vec<String> = runs.iter().map(|r| r.id.to_string()).collect();
    let first = runs[0].id;
    let results = futures_util::future::join_all(runs.into_iter().map(Run::complete)).await;
    let (mut prompt_tokens, mut completion_tokens) = (0u64, 0u64);
    let mut choices = Vec::with_capacity(results.len());
    for (index, result) in results.into_iter().enumerate() {
        let done = result.map_err(|f| ApiError::from(f.error).for_execution(f.execution.id))?;
        let e = &done.execution;
        if let (Some(format), true) = (&format, done.tool_calls.is_empty()) {
            if let Err(why) = format.check(e.output.as_deref().unwrap_or_default()) {
                return Err(invalid_output(&why, e.id));
            }
        }
        prompt_tokens += u64::from(e.prompt_tokens);
        completion_tokens += u64::from(e.completion_tokens);
        choices.push(json!({"index": index, "message": assistant_message(e.output.as_deref().unwrap_or_default(), &done.tool_calls), "finish_reason": finish(&done.finish_reason), "logprobs": logprobs_value(asked_logprobs, &done.logprobs)}));
    }
    Ok(HttpResponse::Ok()
        .insert_header(("x-muse-execution-id", ids.join(",")))
        .json(json!({
            "id": format!("chatcmpl-{}", first.simple()), "object": "chat.completion", "created": created, "model": key,
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens},
        })))
}

/// OpenAI's `usage` object for a recorded call.
fn usage_of(e: &muse_prompts::Execution) -> Value {
    json!({"prompt_tokens": e.prompt_tokens, "completion_tokens": e.completion_tokens, "total_tokens": e.prompt_tokens + e.completion_tokens})
}

/// The last frames of a stream that failed: the error in OpenAI's shape,
/// then `[DONE]`.
fn error_frame(api: &ApiError) -> Bytes {
    let body = openai_error(api.status, api.code, &api.message, api.details.as_deref());
    Bytes::from(format!(
        "data: {}\n\ndata: [DONE]\n\n",
        serde_json::to_string(&body).unwrap_or_default()
    ))
}

/// The head of an SSE answer (its execution id in `x-muse-execution-id`).
fn event_stream(id: uuid::Uuid) -> actix_web::HttpResponseBuilder {
    let mut res = HttpResponse::Ok();
    res.content_type("text/event-stream")
        .insert_header(("cache-control", "no-cache"))
        .insert_header(("x-muse-execution-id", id.to_string()));
    res
}

/// A structured answer that does not match its `response_format`: the
/// provider did not keep the promise (502), the execution id to look it up.
fn invalid_output(why: &str, execution_id: uuid::Uuid) -> ApiError {
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "invalid_structured_output",
        format!("the model's answer breaks the requested response_format: {why}"),
    )
    .with_details(json!({"param": "response_format"}))
    .for_execution(execution_id)
}

/// The assistant message of an answer, with its tool calls as OpenAI
/// writes them (`content` is null when the model only called tools).
fn assistant_message(text: &str, calls: &[muse_inference::ToolCall]) -> Value {
    if calls.is_empty() {
        return json!({"role": "assistant", "content": text});
    }
    let calls: Vec<Value> = calls
        .iter()
        .map(|c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
        .collect();
    json!({"role": "assistant", "content": if text.is_empty() { Value::Null } else { json!(text) }, "tool_calls": calls})
}

/// A call opened on one model of a chain: its whole answer, or its stream
/// (already past its first event) and execution id.
enum Opened {
    Whole(Box<muse_gateway::Finished>),
    Stream(
        std::pin::Pin<Box<dyn futures_util::Stream<Item = RunEvent>>>,
        uuid::Uuid,
    ),
}

/// Runs the call on the first model of `chain` that answers: a group
/// alias's models are tried in order while the failure is one another
/// model can help with (unavailable, rate limited, broken…); a stream
/// falls back only before its first token. Every attempt is admitted and
/// recorded on its own. Returns the key that answered.
async fn open_chain(
    state: &web::Data<AppState>,
    user: &CurrentUser,
    chain: &[String],
    request: GenerateRequest,
    stream: bool,
) -> Result<(String, Opened), ApiError> {
    for (i, key) in chain.iter().enumerate() {
        let last = i + 1 == chain.len();
        if i > 0 {
            // A provider switched off by a flag is skipped, unless it is the last hope.
            if let Err(e) = super::library::provider_gate(state, &user.0, key) {
                if last {
                    return Err(e);
                }
                continue;
            }
        }
        let mut req = request.clone();
        req.model = key.clone();
        let run = Run::new(
            &state.gateway,
            user.0.user.id,
            ExecutionSource::OpenaiApi,
            key,
            req,
        )
        .admit()
        .await?;
        let id = run.id;
        let outcome = if stream {
            run.stream()
                .await
                .map(|events| Opened::Stream(Box::pin(events), id))
        } else {
            run.complete()
                .await
                .map(|done| Opened::Whole(Box::new(done)))
        };
        match outcome {
            Ok(opened) => return Ok((key.clone(), opened)),
            Err(f) if !last && f.error.allows_fallback() => {
                tracing::warn!(model = %key, error = %f.error, "falling back to the next model of the alias");
            }
            Err(f) => return Err(ApiError::from(f.error).for_execution(f.execution.id)),
        }
    }
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        "model_not_found",
        "the alias names no model",
    ))
}

/// The keys a request's model name means (a group alias's fallback chain,
/// else one key); an unknown name is passed on as it is, to fail as
/// `model_not_found` and be recorded.
fn resolve_chain(state: &AppState, name: &str) -> Result<Vec<String>, ApiError> {
    match state.models.chain(name) {
        Ok(keys) => Ok(keys),
        Err(muse_inference::InferenceError::ModelNotFound(_)) => Ok(vec![name.to_string()]),
        Err(e) => Err(e.into()),
    }
}

/// The registry key `name` means (key, alias, or bare name). An unknown
/// name is passed on as it is, so that the call fails with
/// `model_not_found` and is recorded like any failed call.
fn resolve_model(state: &AppState, name: &str) -> Result<String, ApiError> {
    match state.models.resolve(name) {
        Ok(key) => Ok(key),
        Err(muse_inference::InferenceError::ModelNotFound(_)) => Ok(name.to_string()),
        Err(e) => Err(e.into()),
    }
}

/// A model in OpenAI's format; `created` is when this server started.
fn model_object(state: &AppState, id: &str, owned_by: &str) -> Value {
    let now = muse_core::Clock::now_secs(&muse_core::SystemClock);
    let created = now.saturating_sub(i64::try_from(state.started.elapsed().as_secs()).unwrap_or(0));
    json!({"id": id, "object": "model", "created": created, "owned_by": owned_by})
}

/// Every model in the registry, and the aliases, in the OpenAI list format.
#[utoipa::path(get, path = "/v1/models", tag = "openai", security(("bearer" = [])),
    responses((status = 200, description = "`{object: \"list\", data: [{id, object: \"model\", created, owned_by}]}`"), (status = 401, body = ErrorBody)))]
pub async fn list_models(state: web::Data<AppState>, user: CurrentUser) -> HttpResponse {
    let models = state.models.list();
    let mut data: Vec<Value> = models
        .iter()
        .filter(|m| state.training.visible(&m.key, user.0.user.id))
        .map(|m| model_object(&state, &m.key, &m.provider))
        .collect();
    for (alias, target) in state.models.aliases() {
        if let Some(m) = target
            .first()
            .and_then(|t| models.iter().find(|m| &m.key == t))
        {
            data.push(model_object(&state, alias, &m.provider));
        }
    }
    HttpResponse::Ok().json(json!({"object": "list", "data": data}))
}

/// One model, by registry key (slashes allowed, `%2F`-encoded or not), alias
/// or bare name (`models.retrieve` in the SDKs).
#[utoipa::path(get, path = "/v1/models/{id}", tag = "openai", security(("bearer" = [])),
    params(("id" = String, Path, description = "e.g. `openai/gpt-4o-mini`, `gpt-4o-mini`, `local/org/name`")),
    responses((status = 200, description = "`{id, object: \"model\", created, owned_by}`"), (status = 401, body = ErrorBody), (status = 404, description = "model_not_found", body = ErrorBody)))]
pub async fn get_model(
    state: web::Data<AppState>,
    user: CurrentUser,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner().replace("%2F", "/").replace("%2f", "/");
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!("{id} is not in the model registry"),
        )
        .with_details(json!({"param": "model"}))
    };
    let key = state.models.resolve(&id).map_err(|_| not_found())?;
    if !state.training.visible(&key, user.0.user.id) {
        return Err(not_found());
    }
    let model = state.models.get(&key).ok_or_else(not_found)?;
    Ok(HttpResponse::Ok().json(model_object(&state, &id, &model.provider)))
}

/// OpenAI's error object, the body of every error on `/v1/*`.
#[derive(Debug, Serialize, ToSchema)]
pub struct OpenAiErrorBody {
    pub error: OpenAiErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OpenAiErrorDetail {
    /// Human-readable explanation.
    pub message: String,
    /// OpenAI's error class: `invalid_request_error`, `authentication_error`,
    /// `permission_error`, `insufficient_quota`, `rate_limit_error`,
    /// `server_error` or `api_error`.
    #[serde(rename = "type")]
    #[schema(rename = "type")]
    pub kind: &'static str,
    /// The request field at fault, when there is one.
    pub param: Option<String>,
    /// Muse's stable code (docs/errors.md).
    pub code: String,
    /// Muse's structured details (quota, plan, execution id, …); OpenAI
    /// clients ignore members they do not know.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub details: Option<Value>,
}

/// OpenAI's error object: `{"error": {"message", "type", "param", "code"}}`.
pub fn openai_error(
    status: StatusCode,
    code: &str,
    message: &str,
    details: Option<&Value>,
) -> OpenAiErrorBody {
    let kind = match status.as_u16() {
        401 => "authentication_error",
        402 => "insufficient_quota",
        403 => "permission_error",
        429 => "rate_limit_error",
        500 => "server_error",
        s if s >= 500 => "api_error",
        _ => "invalid_request_error",
    };
    let param = details.and_then(|d| {
        d["param"]
            .as_str()
            .or_else(|| d["fields"][0]["field"].as_str())
            .map(str::to_string)
    });
    OpenAiErrorBody {
        error: OpenAiErrorDetail {
            message: message.to_string(),
            kind,
            param,
            code: code.to_string(),
            details: details.filter(|d| !d.is_null()).cloned(),
        },
    }
}

/// On `/v1/*`, errors take OpenAI's shape (what the SDKs parse into
/// `e.type`, `e.param`, `e.code`), and validation errors are 400 as
/// OpenAI's are; headers (`Retry-After`, `WWW-Authenticate`, …) are kept.
async fn openai_errors(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody + 'static>,
) -> Result<actix_web::dev::ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    let res = next.call(req).await?;
    let status = res.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return Ok(res.map_into_boxed_body());
    }
    let (req, res) = res.into_parts();
    let headers = res.headers().clone();
    let bytes = actix_web::body::to_bytes(res.into_body())
        .await
        .unwrap_or_default();
    let muse: Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let code = muse["error"]["code"].as_str().unwrap_or("error");
    let message = muse["error"]["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_string());
    let status = if status == StatusCode::UNPROCESSABLE_ENTITY {
        StatusCode::BAD_REQUEST
    } else {
        status
    };
    let body = openai_error(status, code, &message, muse["error"].get("details"));
    let mut out = HttpResponse::build(status).json(body);
    for (name, value) in headers.iter() {
        if name != actix_web::http::header::CONTENT_TYPE
            && name != actix_web::http::header::CONTENT_LENGTH
        {
            out.headers_mut().append(name.clone(), value.clone());
        }
    }
    Ok(actix_web::dev::ServiceResponse::new(req, out))
}

/// Most prompts in one `/v1/completions` request.
pub const MAX_PROMPTS: usize = 16;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum PromptField {
    One(String),
    Many(Vec<String>),
}

/// OpenAI's legacy text completion request. `echo`, `logprobs`, `suffix`,
/// `n` > 1 and `best_of` > 1 are refused with 400 `unsupported_parameter`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct CompletionRequest {
    /// A registry key of a local model or an OpenAI-protocol model.
    pub model: String,
    /// A string, or an array of strings (one choice each; not streamed).
    pub prompt: PromptField,
    /// Defaults to 16, as OpenAI's does.
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub stop: Option<StopField>,
    pub seed: Option<u64>,
    /// Extension: honoured by local models.
    pub top_k: Option<u32>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub echo: Option<bool>,
    pub logprobs: Option<u32>,
    pub suffix: Option<String>,
    pub n: Option<u32>,
    pub best_of: Option<u32>,
    /// -2 to 2, as in chat completions.
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    /// As in chat completions.
    #[schema(value_type = Option<Object>)]
    pub logit_bias: Option<Value>,
    /// Ignored (it changes nothing in the answer).
    pub user: Option<String>,
    /// Any other field: refused by name.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub extra: serde_json::Map<String, Value>,
}

fn completion_requests(body: &CompletionRequest) -> Result<Vec<GenerateRequest>, ApiError> {
    if let Some(name) = body.extra.keys().next() {
        return Err(unsupported(
            name,
            "it is not a field of OpenAI's Completions API",
        ));
    }
    for (name, v) in [
        ("presence_penalty", body.presence_penalty),
        ("frequency_penalty", body.frequency_penalty),
    ] {
        if let Some(v) = v.filter(|v| !(-2.0..=2.0).contains(v)) {
            return Err(invalid_param(
                name,
                format!("{name} must be between -2 and 2, got {v}"),
            ));
        }
    }
    if body.echo == Some(true) {
        return Err(unsupported("echo", "the answer never repeats the prompt"));
    }
    if body.logprobs.is_some() {
        return Err(unsupported(
            "logprobs",
            "log-probabilities are not returned",
        ));
    }
    if body.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(unsupported(
            "suffix",
            "insertion (fill-in-the-middle) is not available",
        ));
    }
    if body.n.is_some_and(|n| n != 1) {
        return Err(unsupported(
            "n",
            "one choice per prompt; send several prompts instead",
        ));
    }
    if body.best_of.is_some_and(|n| n != 1) {
        return Err(unsupported("best_of", "one choice per prompt"));
    }
    let prompts: Vec<String> = match &body.prompt {
        PromptField::One(p) => vec![p.clone()],
        PromptField::Many(v) => v.clone(),
    };
    if prompts.is_empty() || prompts.len() > MAX_PROMPTS {
        return Err(invalid(format!(
            "prompt must hold 1 to {MAX_PROMPTS} strings"
        )));
    }
    if body.stream.unwrap_or(false) && prompts.len() > 1 {
        return Err(unsupported(
            "prompt",
            "a streamed completion takes one prompt",
        ));
    }
    if let Some(t) = body.temperature.filter(|t| !(0.0..=2.0).contains(t)) {
        return Err(invalid(format!(
            "temperature must be between 0 and 2, got {t}"
        )));
    }
    if let Some(p) = body.top_p.filter(|p| !(0.0..=1.0).contains(p)) {
        return Err(invalid(format!("top_p must be between 0 and 1, got {p}")));
    }
    let max_tokens = body.max_tokens.unwrap_or(16);
    if max_tokens == 0 || max_tokens > 128_000 {
        return Err(invalid("max_tokens must be between 1 and 128000"));
    }
    let stop = match &body.stop {
        None => Vec::new(),
        Some(StopField::One(s)) => vec![s.clone()],
        Some(StopField::Many(v)) => v.clone(),
    };
    if stop.len() > 4 {
        return Err(invalid("at most 4 stop sequences"));
    }
    let bias = logit_bias(body.logit_bias.as_ref())?;
    Ok(prompts
        .into_iter()
        .map(|p| {
            let mut req = GenerateRequest::completion(body.model.clone(), p);
            req.temperature = body.temperature;
            req.top_p = body.top_p;
            req.max_tokens = Some(max_tokens);
            req.stop = stop.clone();
            req.seed = body.seed;
            req.top_k = body.top_k;
            req.presence_penalty = body.presence_penalty.filter(|v| *v != 0.0);
            req.frequency_penalty = body.frequency_penalty.filter(|v| *v != 0.0);
            req.logit_bias = bias.clone();
            req
        })
        .collect())
}

/// Text completion, OpenAI's legacy API (`stream: true` for SSE): the
/// model continues the prompt as it is, with no chat template. Local
/// models and OpenAI-protocol servers; Anthropic and Gemini refuse it.
#[utoipa::path(post, path = "/v1/completions", tag = "openai", security(("bearer" = [])), request_body = CompletionRequest,
    responses(
        (status = 200, description = "`text_completion`, or `text/event-stream` of `text_completion` chunks ending with `data: [DONE]`"),
        (status = 400, description = "OpenAI's error shape: validation_failed, unsupported_parameter (with `param`), invalid_model_request (e.g. a chat-only provider)", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, description = "model_not_found", body = ErrorBody),
        (status = 429, description = "provider_rate_limited", body = ErrorBody),
        (status = 502, description = "provider errors", body = ErrorBody),
    ))]
pub async fn completions(
    state: web::Data<AppState>,
    user: CurrentUser,
    body: web::Json<CompletionRequest>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let key = resolve_model(&state, &body.model)?;
    let requests = completion_requests(&body)?
        .into_iter()
        .map(|mut r| {
            r.model = key.clone();
            r
        })
        .collect::<Vec<_>>();
    super::library::provider_gate(&state, &user.0, &key)?;
    let stream = body.stream.unwrap_or(false);
    if stream {
        state
            .flags
            .check(muse_billing::flags::known::STREAMING, &user.0)?;
    }
    let created = muse_core::Clock::now_secs(&muse_core::SystemClock);

    if !stream {
        let mut choices = Vec::with_capacity(requests.len());
        let (mut prompt_tokens, mut completion_tokens) = (0u64, 0u64);
        let mut ids = Vec::with_capacity(requests.len());
        for (index, request) in requests.into_iter().enumerate() {
            let run = Run::new(
                &state.gateway,
                user.0.user.id,
                ExecutionSource::OpenaiApi,
                &key,
                request,
            )
            .admit()
            .await?;
            ids.push(run.id.to_string());
            let done = run
                .complete()
                .await
                .map_err(|f| ApiError::from(f.error).for_execution(f.execution.id))?;
            let e = &done.execution;
            prompt_tokens += u64::from(e.prompt_tokens);
            completion_tokens += u64::from(e.completion_tokens);
            choices.push(json!({"text": e.output, "index": index, "logprobs": null, "finish_reason": finish(&done.finish_reason)}));
        }
        let id = ids.first().cloned().unwrap_or_default();
        let response = json!({
            "id": format!("cmpl-{}", id.replace('-', "")), "object": "text_completion", "created": created, "model": key,
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens},
        });
        return Ok(HttpResponse::Ok()
            .insert_header(("x-muse-execution-id", ids.join(",")))
            .json(response));
    }

    let Some(request) = requests.into_iter().next() else {
        return Err(invalid("prompt must hold 1 string when streamed"));
    };
    let include_usage = body
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let run = Run::new(
        &state.gateway,
        user.0.user.id,
        ExecutionSource::OpenaiApi,
        &key,
        request,
    )
    .admit()
    .await?;
    let id = run.id;
    let completion_id = format!("cmpl-{}", id.simple());
    let events = run
        .stream()
        .await
        .map_err(|f| ApiError::from(f.error).for_execution(f.execution.id))?;
    let chunk = move |text: &str, finish: Value, usage: Value, model: &str, id: &str| -> Bytes {
        let choices = if usage.is_null() {
            json!([{"text": text, "index": 0, "logprobs": null, "finish_reason": finish}])
        } else {
            json!([])
        };
        Bytes::from(format!(
            "data: {}\n\n",
            json!({"id": id, "object": "text_completion", "created": created, "model": model, "choices": choices, "usage": usage})
        ))
    };
    let (model, cid) = (key.clone(), completion_id.clone());
    let body_stream = events.map(move |event| {
        let bytes = match event {
            RunEvent::Token(text) => chunk(&text, Value::Null, Value::Null, &model, &cid),
            // Text completions offer no tools nor log-probabilities.
            RunEvent::ToolCall(_) | RunEvent::Logprobs(_) => Bytes::new(),
            RunEvent::Done(done) => {
                let e = &done.execution;
                let mut out = chunk(
                    "",
                    json!(finish(&done.finish_reason)),
                    Value::Null,
                    &model,
                    &cid,
                )
                .to_vec();
                if include_usage {
                    out.extend_from_slice(&chunk("", Value::Null, usage_of(e), &model, &cid));
                }
                out.extend_from_slice(b"data: [DONE]\n\n");
                Bytes::from(out)
            }
            RunEvent::Failed(failed) => error_frame(&ApiError::from(failed.error)),
        };
        Ok::<_, actix_web::Error>(bytes)
    });
    Ok(event_stream(id).streaming(body_stream))
}

/// Most inputs in one `/v1/embeddings` request.
pub const MAX_EMBEDDING_INPUTS: usize = 256;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum EmbeddingInput {
    One(String),
    Many(Vec<String>),
    /// Token arrays: refused (Muse embeds text).
    #[schema(value_type = Object)]
    Tokens(Value),
}

/// OpenAI's embeddings request.
#[derive(Debug, Deserialize, ToSchema)]
pub struct EmbeddingRequest {
    /// A registry key, alias or bare name of an embedding model.
    pub model: String,
    pub input: EmbeddingInput,
    /// Shorter vectors (OpenAI's `text-embedding-3-*`, Gemini's
    /// `outputDimensionality`).
    pub dimensions: Option<u32>,
    /// `float` (default) or `base64` (little-endian f32, as OpenAI sends).
    pub encoding_format: Option<String>,
    /// Ignored (it changes nothing in the answer).
    pub user: Option<String>,
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub extra: serde_json::Map<String, Value>,
}

/// Embeddings, OpenAI-compatible: OpenAI and compatible servers
/// (`/embeddings`) and Gemini (`batchEmbedContents`); recorded, priced and
/// quota-checked like any call.
#[utoipa::path(post, path = "/v1/embeddings", tag = "openai", security(("bearer" = [])), request_body = EmbeddingRequest,
    responses(
        (status = 200, description = "`{object: \"list\", data: [{object: \"embedding\", index, embedding}], model, usage}`"),
        (status = 400, description = "validation or unsupported_parameter (a provider without embeddings)", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, description = "model_not_found", body = ErrorBody),
        (status = 502, description = "provider errors", body = ErrorBody),
    ))]
pub async fn embeddings(
    state: web::Data<AppState>,
    user: CurrentUser,
    body: web::Json<EmbeddingRequest>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    if let Some(name) = body.extra.keys().next() {
        return Err(unsupported(
            name,
            "it is not a field of OpenAI's Embeddings API",
        ));
    }
    let inputs = match body.input {
        EmbeddingInput::One(s) => vec![s],
        EmbeddingInput::Many(v) => v,
        EmbeddingInput::Tokens(_) => {
            return Err(unsupported(
                "input",
                "token arrays are not embedded: send text",
            ))
        }
    };
    if inputs.is_empty() || inputs.len() > MAX_EMBEDDING_INPUTS {
        return Err(invalid_param(
            "input",
            format!("input must hold 1 to {MAX_EMBEDDING_INPUTS} strings"),
        ));
    }
    if let Some(i) = inputs.iter().position(String::is_empty) {
        return Err(invalid_param(
            &format!("input[{i}]"),
            "inputs may not be empty",
        ));
    }
    let base64 = match body.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(invalid_param(
                "encoding_format",
                format!("encoding_format must be float or base64, not {other:?}"),
            ))
        }
    };
    if body.dimensions == Some(0) {
        return Err(invalid_param("dimensions", "dimensions must be at least 1"));
    }
    let key = resolve_model(&state, &body.model)?;
    super::library::provider_gate(&state, &user.0, &key)?;
    let mut request = GenerateRequest::completion(key.clone(), inputs.join("\n"));
    request.max_tokens = Some(1);
    let run = Run::new(
        &state.gateway,
        user.0.user.id,
        ExecutionSource::OpenaiApi,
        &key,
        request,
    )
    .admit()
    .await?;
    let id = run.id;
    let (embeddings, _) = run
        .embed(inputs, body.dimensions)
        .await
        .map_err(|f| ApiError::from(f.error).for_execution(f.execution.id))?;
    let data: Vec<Value> = embeddings
        .vectors
        .iter()
        .enumerate()
        .map(|(index, v)| {
            let embedding = if base64 {
                use base64::Engine;
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    let tokens = embeddings.usage.prompt_tokens;
    Ok(HttpResponse::Ok()
        .insert_header(("x-muse-execution-id", id.to_string()))
        .json(json!({"object": "list", "data": data, "model": key, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})))
}
