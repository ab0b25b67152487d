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
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa::ToSchema;

use crate::error::{ApiError, ErrorBody};
use crate::extract::CurrentUser;
use crate::runs::{Run, RunEvent};
use crate::state::AppState;

pub fn config(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/v1")
            .service(web::resource("/models").get(list_models))
            .service(web::resource("/chat/completions").post(chat_completions))
            .service(web::resource("/completions").post(completions)),
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
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum ContentField {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct ChatMessage {
    /// `system`, `developer`, `user` or `assistant`.
    pub role: String,
    pub content: ContentField,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// The OpenAI chat request (the fields Muse uses; others are ignored).
#[derive(Debug, Deserialize, ToSchema)]
pub struct ChatRequest {
    /// A registry key, e.g. `openai/gpt-4o-mini` or `local/org/name`.
    pub model: String,
    pub messages: Vec<ChatMessage>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub stop: Option<StopField>,
    pub seed: Option<u64>,
    /// Extension: honoured by local models, Anthropic and Gemini.
    pub top_k: Option<u32>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
        message,
    )
}

fn to_request(body: &ChatRequest) -> Result<GenerateRequest, ApiError> {
    if body.messages.is_empty() || body.messages.len() > MAX_MESSAGES {
        return Err(invalid(format!(
            "messages must hold 1 to {MAX_MESSAGES} messages"
        )));
    }
    let mut messages = Vec::with_capacity(body.messages.len());
    for (i, m) in body.messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            other => return Err(invalid(format!("messages[{i}].role {other:?} is not supported (system, developer, user, assistant)"))),
        };
        let content = match &m.content {
            ContentField::Text(t) => t.clone(),
            ContentField::Parts(parts) => {
                let mut text = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => text.push_str(t),
                        (kind, _) => return Err(invalid(format!("messages[{i}].content[{j}]: only text parts are supported, not {kind:?}"))),
                    }
                }
                text
            }
        };
        messages.push(Message { role, content });
    }
    if let Some(t) = body.temperature.filter(|t| !(0.0..=2.0).contains(t)) {
        return Err(invalid(format!(
            "temperature must be between 0 and 2, got {t}"
        )));
    }
    if let Some(p) = body.top_p.filter(|p| !(0.0..=1.0).contains(p)) {
        return Err(invalid(format!("top_p must be between 0 and 1, got {p}")));
    }
    let max_tokens = body.max_completion_tokens.or(body.max_tokens);
    if max_tokens == Some(0) || max_tokens.is_some_and(|m| m > 128_000) {
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
    let mut req = GenerateRequest::new(body.model.clone(), messages);
    req.temperature = body.temperature;
    req.top_p = body.top_p;
    req.max_tokens = max_tokens;
    req.stop = stop;
    req.seed = body.seed;
    req.top_k = body.top_k;
    Ok(req)
}

fn finish(reason: &FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::ContentFilter => "content_filter",
        FinishReason::Other(_) => "stop",
    }
}

/// Chat completion, OpenAI-compatible (`stream: true` for SSE).
#[utoipa::path(post, path = "/v1/chat/completions", tag = "openai", security(("bearer" = [])), request_body = ChatRequest,
    responses(
        (status = 200, description = "`chat.completion`, or `text/event-stream` of `chat.completion.chunk` ending with `data: [DONE]`"),
        (status = 401, body = ErrorBody),
        (status = 404, description = "model_not_found", body = ErrorBody),
        (status = 422, description = "validation_failed", body = ErrorBody),
        (status = 429, description = "provider_rate_limited", body = ErrorBody),
        (status = 502, description = "provider errors", body = ErrorBody),
    ))]
pub async fn chat_completions(
    state: web::Data<AppState>,
    user: CurrentUser,
    body: web::Json<ChatRequest>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let request = to_request(&body)?;
    let key = body.model.clone();
    super::library::provider_gate(&state, &user.0, &key)?;
    if body.stream.unwrap_or(false) {
        state
            .flags
            .check(muse_billing::flags::known::STREAMING, &user.0)?;
    }
    let created = muse_core::Clock::now_secs(&muse_core::SystemClock);
    let run = Run::new(
        &state,
        user.0.user.id,
        ExecutionSource::OpenaiApi,
        &key,
        request,
    )
    .admit()
    .await?;
    let id = run.id;
    let completion_id = format!("chatcmpl-{}", id.simple());

    if !body.stream.unwrap_or(false) {
        let done = run.complete().await.map_err(|f| ApiError::from(f.error))?;
        let e = &done.execution;
        let response = json!({
            "id": completion_id, "object": "chat.completion", "created": created, "model": key,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": e.output}, "finish_reason": finish(&done.finish_reason), "logprobs": null}],
            "usage": {"prompt_tokens": e.prompt_tokens, "completion_tokens": e.completion_tokens, "total_tokens": e.prompt_tokens + e.completion_tokens},
        });
        return Ok(HttpResponse::Ok()
            .insert_header(("x-muse-execution-id", id.to_string()))
            .json(response));
    }

    let include_usage = body
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let events = run.stream().await.map_err(|f| ApiError::from(f.error))?;
    let chunk = move |delta: Value, finish: Value, usage: Value, model: &str, id: &str| -> Bytes {
        let choices = if delta.is_null() && finish.is_null() {
            json!([])
        } else {
            json!([{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}])
        };
        Bytes::from(format!(
            "data: {}\n\n",
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices, "usage": usage})
        ))
    };
    let head = chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
        Value::Null,
        &key,
        &completion_id,
    );
    let head = futures_util::stream::once(async move { Ok::<_, actix_web::Error>(head) });
    let (model, cid) = (key.clone(), completion_id.clone());
    let body_stream = events.map(move |event| {
        let bytes = match event {
            RunEvent::Token(text) => chunk(json!({"content": text}), Value::Null, Value::Null, &model, &cid),
            RunEvent::Done(done) => {
                let e = &done.execution;
                let mut out = chunk(json!({}), json!(finish(&done.finish_reason)), Value::Null, &model, &cid).to_vec();
                if include_usage {
                    out.extend_from_slice(&chunk(Value::Null, Value::Null, json!({"prompt_tokens": e.prompt_tokens, "completion_tokens": e.completion_tokens, "total_tokens": e.prompt_tokens + e.completion_tokens}), &model, &cid));
                }
                out.extend_from_slice(b"data: [DONE]\n\n");
                Bytes::from(out)
            }
            RunEvent::Failed(failed) => {
                let api = ApiError::from(failed.error);
                Bytes::from(format!("data: {}\n\ndata: [DONE]\n\n", json!({"error": {"code": api.code, "message": api.message}})))
            }
        };
        Ok::<_, actix_web::Error>(bytes)
    });
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("cache-control", "no-cache"))
        .insert_header(("x-muse-execution-id", id.to_string()))
        .streaming(head.chain(body_stream)))
}

/// Every model in the registry, in the OpenAI list format.
#[utoipa::path(get, path = "/v1/models", tag = "openai", security(("bearer" = [])),
    responses((status = 200, description = "`{object: \"list\", data: [{id, object: \"model\", created, owned_by}]}`"), (status = 401, body = ErrorBody)))]
pub async fn list_models(state: web::Data<AppState>, user: CurrentUser) -> HttpResponse {
    let data: Vec<Value> = state
        .models
        .list()
        .into_iter()
        .filter(|m| state.training.visible(&m.key, user.0.user.id))
        .map(|m| json!({"id": m.key, "object": "model", "created": 0, "owned_by": m.provider}))
        .collect();
    HttpResponse::Ok().json(json!({"object": "list", "data": data}))
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
}

fn unsupported(param: &str, why: &str) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "unsupported_parameter",
        format!("{param} is not supported: {why}"),
    )
    .with_details(json!({ "param": param }))
}

fn completion_requests(body: &CompletionRequest) -> Result<Vec<GenerateRequest>, ApiError> {
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
        (status = 400, description = "unsupported_parameter, invalid_model_request (e.g. a chat-only provider)", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, description = "model_not_found", body = ErrorBody),
        (status = 422, description = "validation_failed", body = ErrorBody),
        (status = 429, description = "provider_rate_limited", body = ErrorBody),
        (status = 502, description = "provider errors", body = ErrorBody),
    ))]
pub async fn completions(
    state: web::Data<AppState>,
    user: CurrentUser,
    body: web::Json<CompletionRequest>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let requests = completion_requests(&body)?;
    let key = body.model.clone();
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
                &state,
                user.0.user.id,
                ExecutionSource::OpenaiApi,
                &key,
                request,
            )
            .admit()
            .await?;
            ids.push(run.id.to_string());
            let done = run.complete().await.map_err(|f| ApiError::from(f.error))?;
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
        &state,
        user.0.user.id,
        ExecutionSource::OpenaiApi,
        &key,
        request,
    )
    .admit()
    .await?;
    let id = run.id;
    let completion_id = format!("cmpl-{}", id.simple());
    let events = run.stream().await.map_err(|f| ApiError::from(f.error))?;
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
            RunEvent::Done(done) => {
                let e = &done.execution;
                let mut out = chunk("", json!(finish(&done.finish_reason)), Value::Null, &model, &cid).to_vec();
                if include_usage {
                    out.extend_from_slice(&chunk("", Value::Null, json!({"prompt_tokens": e.prompt_tokens, "completion_tokens": e.completion_tokens, "total_tokens": e.prompt_tokens + e.completion_tokens}), &model, &cid));
                }
                out.extend_from_slice(b"data: [DONE]\n\n");
                Bytes::from(out)
            }
            RunEvent::Failed(failed) => {
                let api = ApiError::from(failed.error);
                Bytes::from(format!("data: {}\n\ndata: [DONE]\n\n", json!({"error": {"code": api.code, "message": api.message}})))
            }
        };
        Ok::<_, actix_web::Error>(bytes)
    });
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("cache-control", "no-cache"))
        .insert_header(("x-muse-execution-id", id.to_string()))
        .streaming(body_stream))
}
