//! The OpenAI-compatible API: `POST /v1/chat/completions` (whole or
//! streamed as SSE) and `GET /v1/models`, over every model in the registry,
//! so the official OpenAI SDKs work against Muse unchanged (base URL
//! `…/v1`, API key = a Muse API key or access token). Every call is
//! recorded as an execution, failures and cancellations included.

use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use actix_web::web::Bytes;
use actix_web::{web, HttpResponse};
use futures_util::StreamExt;
use muse_inference::{
    FinishReason, GenerateRequest, InferenceError, Message, Role, StreamEvent, Usage,
};
use muse_prompts::{Execution, ExecutionSource, ExecutionStatus};
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::error::{ApiError, ErrorBody};
use crate::extract::CurrentUser;
use crate::state::AppState;

pub fn config(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/v1")
            .service(web::resource("/models").get(list_models))
            .service(web::resource("/chat/completions").post(chat_completions)),
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

fn transcript(messages: &[Message]) -> String {
    let mut out = String::new();
    for m in messages {
        let role = match m.role {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        };
        out.push_str(role);
        out.push_str(": ");
        out.push_str(&m.content);
        out.push('\n');
        if out.len() > 100_000 {
            out.truncate(out.floor_char_boundary(100_000));
            break;
        }
    }
    out
}

/// What is known about a call when it ends.
struct Outcome {
    output: String,
    usage: Usage,
    cost: Option<f64>,
    ttft: Option<Duration>,
    status: ExecutionStatus,
    error: Option<String>,
}

/// Records the execution on the blocking pool; a failure to record is
/// logged (the caller already has their answer).
fn record(
    state: &AppState,
    id: Uuid,
    user_id: Uuid,
    key: &str,
    request: &GenerateRequest,
    started: Instant,
    outcome: Outcome,
) {
    let (provider, model) = key.split_once('/').unwrap_or(("unknown", key));
    // Called exactly once per execution: the end of what the handler counted in.
    metrics::gauge!("active_executions").decrement(1.0);
    let labels = [
        ("source", ExecutionSource::OpenaiApi.as_str().to_string()),
        ("provider", provider.to_string()),
        ("model", model.to_string()),
    ];
    metrics::counter!(
        "prompt_executions_total",
        &[
            labels[0].clone(),
            labels[1].clone(),
            labels[2].clone(),
            ("status", outcome.status.as_str().to_string())
        ]
    )
    .increment(1);
    metrics::histogram!("prompt_execution_duration_seconds", &labels)
        .record(started.elapsed().as_secs_f64());
    let execution = Execution {
        id,
        user_id,
        source: ExecutionSource::OpenaiApi,
        prompt_id: None,
        prompt_version: None,
        provider: provider.to_string(),
        model: model.to_string(),
        variables: None,
        rendered_prompt: Some(transcript(&request.messages)),
        output: Some(outcome.output),
        prompt_tokens: outcome.usage.prompt_tokens,
        completion_tokens: outcome.usage.completion_tokens,
        cost_usd: outcome.cost,
        duration_ms: started.elapsed().as_millis() as i64,
        ttft_ms: outcome.ttft.map(|d| d.as_millis() as i64),
        status: outcome.status,
        error: outcome.error,
        created_at: muse_core::Clock::now_ms(&muse_core::SystemClock),
    };
    let repo = state.executions.clone();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = repo.record(&execution) {
            tracing::error!(error = %e, execution_id = %execution.id, "could not record an execution");
        }
    });
}

fn failed(error: &InferenceError) -> Outcome {
    Outcome {
        output: String::new(),
        usage: Usage::default(),
        cost: None,
        ttft: None,
        status: if matches!(error, InferenceError::Cancelled) {
            ExecutionStatus::Cancelled
        } else {
            ExecutionStatus::Failed
        },
        error: Some(error.to_string()),
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
    metrics::gauge!("active_executions").increment(1.0);
    let key = body.model.clone();
    let user_id = user.0.user.id;
    let id = Uuid::now_v7();
    let created = muse_core::Clock::now_secs(&muse_core::SystemClock);
    let started = Instant::now();
    let completion_id = format!("chatcmpl-{}", id.simple());

    if !body.stream.unwrap_or(false) {
        return match state.models.complete(&key, &request).await {
            Ok(priced) => {
                let c = priced.completion;
                let usage = c.summary.usage;
                let response = json!({
                    "id": completion_id, "object": "chat.completion", "created": created, "model": key,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text}, "finish_reason": finish(&c.summary.finish_reason), "logprobs": null}],
                    "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens, "total_tokens": usage.total()},
                });
                let outcome = Outcome {
                    output: c.text,
                    usage,
                    cost: priced.cost,
                    ttft: c.summary.timing.time_to_first_token,
                    status: ExecutionStatus::Succeeded,
                    error: None,
                };
                record(&state, id, user_id, &key, &request, started, outcome);
                Ok(HttpResponse::Ok()
                    .insert_header(("x-muse-execution-id", id.to_string()))
                    .json(response))
            }
            Err(e) => {
                record(&state, id, user_id, &key, &request, started, failed(&e));
                Err(e.into())
            }
        };
    }

    let include_usage = body
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let upstream = match state.models.stream(&key, &request).await {
        Ok(s) => s,
        Err(e) => {
            record(&state, id, user_id, &key, &request, started, failed(&e));
            return Err(e.into());
        }
    };
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
    struct Recorder {
        state: web::Data<AppState>,
        request: GenerateRequest,
        key: String,
        id: Uuid,
        user_id: Uuid,
        started: Instant,
        text: String,
        first: Option<Duration>,
        done: bool,
    }
    impl Drop for Recorder {
        fn drop(&mut self) {
            if !self.done {
                // The client went away before the end: the upstream work was
                // dropped with the stream; the partial answer is kept.
                let outcome = Outcome {
                    output: std::mem::take(&mut self.text),
                    usage: Usage::default(),
                    cost: None,
                    ttft: self.first,
                    status: ExecutionStatus::Cancelled,
                    error: Some("the client disconnected".into()),
                };
                record(
                    &self.state,
                    self.id,
                    self.user_id,
                    &self.key,
                    &self.request,
                    self.started,
                    outcome,
                );
            }
        }
    }
    let mut rec = Recorder {
        state: state.clone(),
        request,
        key: key.clone(),
        id,
        user_id,
        started,
        text: String::new(),
        first: None,
        done: false,
    };
    let head = futures_util::stream::once({
        let b = chunk(
            json!({"role": "assistant", "content": ""}),
            Value::Null,
            Value::Null,
            &key,
            &completion_id,
        );
        async move { Ok::<_, actix_web::Error>(b) }
    });
    let model = key.clone();
    let cid = completion_id.clone();
    let body_stream = upstream.map(move |event| {
        let bytes = match event {
            Ok(StreamEvent::Delta(text)) => {
                rec.first.get_or_insert_with(|| rec.started.elapsed());
                rec.text.push_str(&text);
                chunk(json!({"content": text}), Value::Null, Value::Null, &model, &cid)
            }
            Ok(StreamEvent::Done(summary)) => {
                rec.done = true;
                let usage = summary.usage;
                let cost = rec.state.models.cost(&rec.key, &usage);
                let outcome = Outcome { output: std::mem::take(&mut rec.text), usage, cost, ttft: rec.first, status: ExecutionStatus::Succeeded, error: None };
                record(&rec.state, rec.id, rec.user_id, &rec.key, &rec.request, rec.started, outcome);
                let mut out = chunk(json!({}), json!(finish(&summary.finish_reason)), Value::Null, &model, &cid).to_vec();
                if include_usage {
                    out.extend_from_slice(&chunk(Value::Null, Value::Null, json!({"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens, "total_tokens": usage.total()}), &model, &cid));
                }
                out.extend_from_slice(b"data: [DONE]\n\n");
                Bytes::from(out)
            }
            Err(e) => {
                rec.done = true;
                let mut outcome = failed(&e);
                outcome.output = std::mem::take(&mut rec.text);
                record(&rec.state, rec.id, rec.user_id, &rec.key, &rec.request, rec.started, outcome);
                let api = ApiError::from(e);
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
pub async fn list_models(state: web::Data<AppState>, _user: CurrentUser) -> HttpResponse {
    let data: Vec<Value> = state
        .models
        .list()
        .into_iter()
        .map(|m| json!({"id": m.key, "object": "model", "created": 0, "owned_by": m.provider}))
        .collect();
    HttpResponse::Ok().json(json!({"object": "list", "data": data}))
}
