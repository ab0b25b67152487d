//! A local server speaking the OpenAI chat-completions protocol (JSON and
//! SSE), the upstream of the end-to-end tests. Models:
//! - `ok`: answers "Hello, world!" (12 prompt + 4 completion tokens);
//! - `echo`: answers the last user message, one word per chunk;
//! - `broken`: HTTP 500;
//! - `limited`: HTTP 429 with OpenAI's rate-limit error and `retry-after`;
//! - `slow`: 400 chunks "t0 t1 …" 10 ms apart (cancellation tests);
//! - `flood`: 50,000 chunks of 1 kB, as fast as they are read
//!   (backpressure tests).
//!
//! With `logprobs: true`, answers carry `choices[].logprobs.content` as
//! OpenAI's API reference shows it (token, logprob, bytes, and
//! `top_logprobs` alternatives); in streams, in each content chunk.
//!
//! The chunks of `slow` and `flood` actually written are counted in
//! `Upstream::sent`.
//!
//! `/v1/completions` speaks OpenAI's legacy text completion as its API
//! reference shows it (https://platform.openai.com/docs/api-reference/completions):
//! `text_completion` objects with `choices[].text`, streamed as chunks of the
//! same shape, a usage chunk with `stream_options.include_usage`, then
//! `data: [DONE]`. It continues any prompt with " and then" (2 tokens) and
//! keeps the last request body in `Upstream::last_completion`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::web::{self, Bytes};
use actix_web::{App, HttpResponse, HttpServer};
use futures_util::StreamExt;
use serde_json::{json, Value};

pub struct Upstream {
    /// Base URL, ending in `/v1`.
    pub url: String,
    /// Chunks of `slow` streams written so far.
    pub sent: Arc<AtomicUsize>,
    /// The last `/v1/completions` request body.
    pub last_completion: Arc<std::sync::Mutex<Value>>,
    /// The last `/v1/chat/completions` request body.
    pub last_chat: Arc<std::sync::Mutex<Value>>,
}

/// `POST /v1/embeddings` as OpenAI's API reference shows it
/// (https://platform.openai.com/docs/api-reference/embeddings/create): a
/// `list` of `embedding` objects by `index`, `usage.prompt_tokens`. The
/// vector of a text is `[length, first char code, 0.5, …]` (`dimensions`
/// long, default 4), as floats or — `encoding_format: base64` — as
/// little-endian f32 bytes in base64, as OpenAI sends them.
async fn embeddings(body: web::Json<Value>) -> HttpResponse {
    use base64::Engine;
    let inputs: Vec<String> = match &body["input"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    };
    let dims = body["dimensions"].as_u64().unwrap_or(4) as usize;
    let base64 = body["encoding_format"] == "base64";
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let mut v = vec![
                t.len() as f32,
                t.chars().next().map_or(0.0, |c| c as u32 as f32),
            ];
            v.resize(dims, 0.5);
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    let tokens: usize = inputs.iter().map(|t| t.split_whitespace().count()).sum();
    HttpResponse::Ok().json(json!({"object": "list", "data": data, "model": body["model"], "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}))
}

/// Keeps the last chat request body, then answers as [`chat`].
async fn recorded_chat(
    body: web::Json<Value>,
    sent: web::Data<Arc<AtomicUsize>>,
    last: web::Data<LastChat>,
) -> HttpResponse {
    *last.0.lock().unwrap() = body.0.clone();
    chat(body, sent).await
}

/// The last chat request body (a type of its own for `web::Data`).
struct LastChat(Arc<std::sync::Mutex<Value>>);

async fn text_completion(
    body: web::Json<Value>,
    last: web::Data<Arc<std::sync::Mutex<Value>>>,
) -> HttpResponse {
    *last.lock().unwrap() = body.0.clone();
    let model = body["model"].as_str().unwrap_or_default().to_string();
    if model == "broken" {
        return HttpResponse::InternalServerError().json(json!({"error": {"message": "boom", "type": "server_error", "param": null, "code": null}}));
    }
    let prompt_tokens = body["prompt"]
        .as_str()
        .unwrap_or_default()
        .split_whitespace()
        .count();
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": 2, "total_tokens": prompt_tokens + 2});
    let obj = |choices: Value, usage: Value| json!({"id": "cmpl-up", "object": "text_completion", "created": 1, "model": model, "choices": choices, "usage": usage});
    if !body["stream"].as_bool().unwrap_or(false) {
        return HttpResponse::Ok().json(obj(
            json!([{"text": " and then", "index": 0, "logprobs": null, "finish_reason": "length"}]),
            usage,
        ));
    }
    let mut frames: Vec<String> = [" and", " then"]
        .iter()
        .map(|t| {
            format!(
                "data: {}\n\n",
                obj(
                    json!([{"text": t, "index": 0, "logprobs": null, "finish_reason": null}]),
                    Value::Null
                )
            )
        })
        .collect();
    frames.push(format!(
        "data: {}\n\n",
        obj(
            json!([{"text": "", "index": 0, "logprobs": null, "finish_reason": "length"}]),
            Value::Null
        )
    ));
    if body["stream_options"]["include_usage"].as_bool() == Some(true) {
        frames.push(format!("data: {}\n\n", obj(json!([]), usage)));
    }
    frames.push("data: [DONE]\n\n".into());
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .streaming(futures_util::stream::iter(
            frames
                .into_iter()
                .map(|f| Ok::<_, actix_web::Error>(Bytes::from(f))),
        ))
}

fn chunk(model: &str, delta: Value, finish: Value, usage: Value) -> String {
    let choices = if delta.is_null() {
        json!([])
    } else {
        json!([{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}])
    };
    format!(
        "data: {}\n\n",
        json!({"id": "up-1", "object": "chat.completion.chunk", "created": 1, "model": model, "choices": choices, "usage": usage})
    )
}

/// The log-probability entry of the `i`-th piece of an answer, with `top`
/// alternatives (the piece itself first).
fn logprob_of(piece: &str, i: usize, top: usize) -> Value {
    let lp = -0.25 * (i as f64 + 1.0);
    let alternatives: Vec<Value> = (0..top)
        .map(|k| {
            let token = if k == 0 {
                piece.to_string()
            } else {
                format!("alt{k}")
            };
            json!({"token": token, "logprob": lp - k as f64, "bytes": token.as_bytes()})
        })
        .collect();
    json!({"token": piece, "logprob": lp, "bytes": piece.as_bytes(), "top_logprobs": alternatives})
}

pub(crate) async fn chat(
    body: web::Json<Value>,
    sent: web::Data<Arc<AtomicUsize>>,
) -> HttpResponse {
    let model = body["model"].as_str().unwrap_or_default().to_string();
    let last_user = body["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_string();
    if model == "tools" {
        return tool_answer(&body);
    }
    if model == "json" {
        // Structured output as OpenAI documents it
        // (https://platform.openai.com/docs/guides/structured-outputs): the
        // answer is the JSON text in `content`. "break" in the prompt makes
        // it answer JSON that misses the schema.
        let answer = if last_user.contains("break") {
            json!({"title": 5}).to_string()
        } else {
            json!({"title": "Muse", "year": 2026}).to_string()
        };
        return HttpResponse::Ok().json(json!({
            "id": "up-j", "object": "chat.completion", "created": 1, "model": "json",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer, "refusal": null}, "finish_reason": "stop", "logprobs": null}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 8, "total_tokens": 18}
        }));
    }
    let (pieces, delay): (Vec<String>, u64) = match model.as_str() {
        "limited" => {
            // https://platform.openai.com/docs/guides/error-codes (429: rate limit reached)
            return HttpResponse::TooManyRequests()
                .insert_header(("retry-after", "7"))
                .json(json!({"error": {"message": "Rate limit reached for requests", "type": "requests", "param": null, "code": "rate_limit_exceeded"}}));
        }
        "broken" => {
            return HttpResponse::InternalServerError().json(json!({"error": {"message": "boom", "type": "server_error", "param": null, "code": null}}));
        }
        "echo" => (
            last_user.split_inclusive(' ').map(str::to_string).collect(),
            1,
        ),
        "slow" => ((0..400).map(|i| format!("t{i} ")).collect(), 10),
        _ => (
            ["Hel", "lo, ", "wor", "ld!"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            5,
        ),
    };
    if model == "flood" && body["stream"].as_bool().unwrap_or(false) {
        let sent = sent.get_ref().clone();
        let filler = "x".repeat(1000);
        let stream = futures_util::stream::iter(0..50_000u32).map(move |i| {
            sent.fetch_add(1, Ordering::SeqCst);
            Ok::<_, actix_web::Error>(Bytes::from(chunk(
                "flood",
                json!({"content": format!("{i}:{filler} ")}),
                Value::Null,
                Value::Null,
            )))
        });
        return HttpResponse::Ok()
            .content_type("text/event-stream")
            .streaming(stream);
    }
    let completion_tokens = if model == "ok" { 4 } else { pieces.len() };
    let usage = json!({"prompt_tokens": 12, "completion_tokens": completion_tokens, "total_tokens": 12 + completion_tokens});
    let logprobs = body["logprobs"].as_bool().unwrap_or(false);
    let top = body["top_logprobs"].as_u64().unwrap_or(0) as usize;
    if !body["stream"].as_bool().unwrap_or(false) {
        let lp = if logprobs {
            json!({"content": pieces.iter().enumerate().map(|(i, p)| logprob_of(p, i, top)).collect::<Vec<_>>(), "refusal": null})
        } else {
            Value::Null
        };
        return HttpResponse::Ok().json(json!({
            "id": "up-1", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": pieces.concat()}, "finish_reason": "stop", "logprobs": lp}],
            "usage": usage
        }));
    }
    let mut frames: Vec<String> = pieces
        .iter()
        .enumerate()
        .map(|(i, d)| {
            if logprobs {
                format!(
                    "data: {}\n\n",
                    json!({"id": "up-1", "object": "chat.completion.chunk", "created": 1, "model": model,
                           "choices": [{"index": 0, "delta": {"content": d}, "finish_reason": null, "logprobs": {"content": [logprob_of(d, i, top)], "refusal": null}}], "usage": null})
                )
            } else {
                chunk(&model, json!({"content": d}), Value::Null, Value::Null)
            }
        })
        .collect();
    frames.push(chunk(&model, json!({}), json!("stop"), Value::Null));
    frames.push(chunk(&model, Value::Null, Value::Null, usage));
    frames.push("data: [DONE]\n\n".into());
    let counted = model == "slow";
    let sent = sent.get_ref().clone();
    let stream = futures_util::stream::iter(frames).then(move |f| {
        let sent = sent.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(delay)).await;
            if counted {
                sent.fetch_add(1, Ordering::SeqCst);
            }
            Ok::<_, actix_web::Error>(Bytes::from(f))
        }
    });
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .streaming(stream)
}

/// The `tools` model, as OpenAI's function-calling guide shows the wire
/// format (https://platform.openai.com/docs/guides/function-calling): when
/// the last message is the user's and tools are offered, it calls the
/// first tool with `{"location": "Paris"}` (`finish_reason: "tool_calls"`;
/// streamed as an `id`/`name` fragment followed by argument fragments);
/// after a `tool` message it answers with the tool's result.
fn tool_answer(body: &Value) -> HttpResponse {
    let messages = body["messages"].as_array().cloned().unwrap_or_default();
    let last = messages.last().cloned().unwrap_or_default();
    let stream = body["stream"].as_bool().unwrap_or(false);
    let usage = json!({"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29});
    let name = body["tools"][0]["function"]["name"]
        .as_str()
        .map(str::to_string);
    match (last["role"].as_str(), name) {
        (Some("user"), Some(name)) => {
            let args = ["{\"loca", "tion\": \"Pa", "ris\"}"];
            if !stream {
                return HttpResponse::Ok().json(json!({
                    "id": "up-t", "object": "chat.completion", "created": 1, "model": "tools",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "refusal": null,
                        "tool_calls": [{"id": "call_abc123", "type": "function", "function": {"name": name, "arguments": args.concat()}}]},
                        "finish_reason": "tool_calls", "logprobs": null}],
                    "usage": usage
                }));
            }
            let mut frames = vec![chunk("tools", json!({"role": "assistant", "content": null,
                "tool_calls": [{"index": 0, "id": "call_abc123", "type": "function", "function": {"name": name, "arguments": ""}}]}), Value::Null, Value::Null)];
            for a in args {
                frames.push(chunk("tools", json!({"tool_calls": [{"index": 0, "function": {"arguments": a}}]}), Value::Null, Value::Null));
            }
            frames.push(chunk("tools", json!({}), json!("tool_calls"), Value::Null));
            frames.push(chunk("tools", Value::Null, Value::Null, usage));
            frames.push("data: [DONE]\n\n".into());
            HttpResponse::Ok()
                .content_type("text/event-stream")
                .streaming(futures_util::stream::iter(frames.into_iter().map(|f| Ok::<_, actix_web::Error>(Bytes::from(f)))))
        }
        (Some("tool"), _) => {
            let answer = format!("It is {} in Paris.", last["content"].as_str().unwrap_or("?"));
            if !stream {
                return HttpResponse::Ok().json(json!({
                    "id": "up-t", "object": "chat.completion", "created": 1, "model": "tools",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop", "logprobs": null}],
                    "usage": usage
                }));
            }
            let frames = vec![
                chunk("tools", json!({"role": "assistant", "content": answer}), Value::Null, Value::Null),
                chunk("tools", json!({}), json!("stop"), Value::Null),
                chunk("tools", Value::Null, Value::Null, usage),
                "data: [DONE]\n\n".to_string(),
            ];
            HttpResponse::Ok()
                .content_type("text/event-stream")
                .streaming(futures_util::stream::iter(frames.into_iter().map(|f| Ok::<_, actix_web::Error>(Bytes::from(f)))))
        }
        _ => HttpResponse::BadRequest().json(json!({"error": {"message": "the tools model needs tools and a user or tool message", "type": "invalid_request_error", "param": "tools", "code": null}})),
    }
}

pub async fn upstream() -> Upstream {
    let sent = Arc::new(AtomicUsize::new(0));
    let data = web::Data::new(sent.clone());
    let last_completion = Arc::new(std::sync::Mutex::new(Value::Null));
    let last = web::Data::new(last_completion.clone());
    let last_chat = Arc::new(std::sync::Mutex::new(Value::Null));
    let chats = web::Data::new(LastChat(last_chat.clone()));
    let srv = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .app_data(last.clone())
            .app_data(chats.clone())
            .route("/v1/chat/completions", web::post().to(recorded_chat))
            .route("/v1/completions", web::post().to(text_completion))
            .route("/v1/embeddings", web::post().to(embeddings))
    })
    .workers(1)
    .bind(("127.0.0.1", 0))
    .unwrap();
    let addr = srv.addrs()[0];
    actix_web::rt::spawn(srv.run());
    Upstream {
        url: format!("http://{addr}/v1"),
        sent,
        last_completion,
        last_chat,
    }
}

/// A second Muse on `first`'s database with the same upstream and `extra`
/// settings: another replica.
pub async fn another_replica(
    first: &crate::helpers::TestApp,
    up: &Upstream,
    extra: &[(&str, &str)],
) -> crate::helpers::TestApp {
    let url = first.config.database_url.expose().to_string();
    let mut vars = extra.to_vec();
    vars.extend([
        ("DATABASE_URL", url.as_str()),
        ("OPENAI_COMPATIBLE_BASE_URL", up.url.as_str()),
        ("OPENAI_COMPATIBLE_NAME", "up"),
        ("OPENAI_COMPATIBLE_MODELS", "ok"),
        ("LLM_MAX_RETRIES", "0"),
    ]);
    crate::helpers::TestApp::spawn_with(&vars).await
}

/// Muse started with the upstream above as the compatible server `up`
/// (models `ok`, `echo`, `broken`, `limited`, `slow`, `flood`, `tools`, `json`, `embed`; no retries).
pub async fn app_with_upstream(extra: &[(&str, &str)]) -> (crate::helpers::TestApp, Upstream) {
    let up = upstream().await;
    let mut vars: Vec<(&str, &str)> = vec![
        ("OPENAI_COMPATIBLE_BASE_URL", &up.url),
        ("OPENAI_COMPATIBLE_NAME", "up"),
        (
            "OPENAI_COMPATIBLE_MODELS",
            "ok,echo,broken,limited,slow,flood,tools,json,embed",
        ),
        ("LLM_MAX_RETRIES", "0"),
    ];
    vars.extend_from_slice(extra);
    let app = crate::helpers::TestApp::spawn_with(&vars).await;
    (app, up)
}

/// Parses a complete SSE body into `(event, data)` pairs.
pub fn sse_events(body: &str) -> Vec<(String, Value)> {
    body.split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(|block| {
            let mut name = "message".to_string();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = n.to_string();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push_str(d);
                }
            }
            (
                name,
                serde_json::from_str(&data).unwrap_or(Value::String(data)),
            )
        })
        .collect()
}
