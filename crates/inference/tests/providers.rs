//! Each provider against a local server on 127.0.0.1 that speaks its wire
//! protocol (JSON and SSE), including its failure modes. The scenario is
//! chosen by the model name:
//!
//! | model | the server… |
//! |---|---|
//! | `ok` | answers "Hello, world!" in four deltas, usage 12/4 |
//! | `rate-limited-once` | 429 with `Retry-After: 1` once, then `ok` |
//! | `rate-limited-long` | always 429 with `Retry-After: 120` |
//! | `error-once` | 500 once, then `ok` |
//! | `always-500` | always 500 |
//! | `slow-first-byte` | waits 3 s before answering |
//! | `cut-stream` | streams two deltas, then closes without the end event |
//! | `malformed` | streams a chunk that is not JSON |
//! | `malformed-once` | like `malformed` once, then `ok` |
//! | `too-long` | 400, context length exceeded |
//! | `missing` | 404 unknown model |
//! | `endless` | streams a delta every 50 ms until the client goes away |
//!
//! Any other API key than `test-key` gets 401.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::web::{self, Bytes};
use actix_web::{App, HttpRequest, HttpResponse, HttpServer};
use futures::StreamExt;
use muse_inference::providers::anthropic::{AnthropicConfig, AnthropicProvider};
use muse_inference::providers::gemini::{GeminiConfig, GeminiProvider};
use muse_inference::providers::openai::{OpenAiConfig, OpenAiProvider};
use muse_inference::providers::{collect, Timeouts};
use muse_inference::*;
use serde_json::{json, Value};

const KEY: &str = "test-key";
const DELTAS: [&str; 4] = ["Hel", "lo, ", "wor", "ld!"];

#[derive(Default)]
struct Recorder {
    calls: Mutex<HashMap<String, u32>>,
    last_body: Mutex<Value>,
    last_headers: Mutex<HashMap<String, String>>,
    last_uri: Mutex<String>,
    cancelled: Arc<AtomicBool>,
}

impl Recorder {
    fn hit(&self, model: &str, req: &HttpRequest, body: &Value) -> u32 {
        *self.last_body.lock().unwrap() = body.clone();
        *self.last_uri.lock().unwrap() = req.uri().to_string();
        *self.last_headers.lock().unwrap() = req
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_string()))
            .collect();
        let mut calls = self.calls.lock().unwrap();
        let n = calls.entry(model.to_string()).or_default();
        *n += 1;
        *n
    }

    fn calls(&self, model: &str) -> u32 {
        self.calls.lock().unwrap().get(model).copied().unwrap_or(0)
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Proto {
    OpenAi,
    Anthropic,
    Gemini,
}

/// Sets a flag when dropped: tells the test that the server stopped
/// streaming because the client went away.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn error_body(proto: Proto, status: u16, message: &str) -> Value {
    match proto {
        Proto::OpenAi => {
            let code = if message.contains("context") {
                json!("context_length_exceeded")
            } else {
                Value::Null
            };
            json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": code}})
        }
        Proto::Anthropic => {
            let kind = match status {
                429 => "rate_limit_error",
                401 => "authentication_error",
                404 => "not_found_error",
                400 => "invalid_request_error",
                _ => "api_error",
            };
            json!({"type": "error", "error": {"type": kind, "message": message}})
        }
        Proto::Gemini => {
            let kind = match status {
                429 => "RESOURCE_EXHAUSTED",
                401 => "UNAUTHENTICATED",
                404 => "NOT_FOUND",
                400 => "INVALID_ARGUMENT",
                _ => "INTERNAL",
            };
            json!({"error": {"code": status, "message": message, "status": kind}})
        }
    }
}

fn error(proto: Proto, status: u16, message: &str, retry_after: Option<&str>) -> HttpResponse {
    let mut res = HttpResponse::build(actix_web::http::StatusCode::from_u16(status).unwrap());
    if let Some(r) = retry_after {
        res.insert_header(("retry-after", r));
    }
    res.json(error_body(proto, status, message))
}

fn full_answer(proto: Proto, model: &str) -> Value {
    let text = DELTAS.concat();
    match proto {
        Proto::OpenAi => json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop", "logprobs": null}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16}
        }),
        Proto::Anthropic => json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": 12, "output_tokens": 4}
        }),
        Proto::Gemini => json!({
            "candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": 12, "candidatesTokenCount": 4, "totalTokenCount": 16},
            "modelVersion": model
        }),
    }
}

/// SSE frames of a streamed answer: `deltas` text deltas, then (if
/// `complete`) the protocol's end.
fn frames(proto: Proto, model: &str, deltas: &[&str], complete: bool) -> Vec<String> {
    let mut out = Vec::new();
    match proto {
        Proto::OpenAi => {
            let chunk = |content: Value, finish: Value, usage: Value| {
                let choices = if content.is_null() && finish.is_null() {
                    json!([])
                } else {
                    json!([{"index": 0, "delta": {"content": content}, "finish_reason": finish, "logprobs": null}])
                };
                format!(
                    "data: {}\n\n",
                    json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": model, "choices": choices, "usage": usage})
                )
            };
            out.push(chunk(json!(""), Value::Null, Value::Null));
            for d in deltas {
                out.push(chunk(json!(d), Value::Null, Value::Null));
            }
            if complete {
                out.push(chunk(Value::Null, json!("stop"), Value::Null));
                out.push(chunk(
                    Value::Null,
                    Value::Null,
                    json!({"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16}),
                ));
                out.push("data: [DONE]\n\n".into());
            }
        }
        Proto::Anthropic => {
            let ev = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
            out.push(ev("message_start", json!({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "model": model, "content": [], "usage": {"input_tokens": 12, "output_tokens": 1}}})));
            out.push(ev("content_block_start", json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})));
            out.push(ev("ping", json!({"type": "ping"})));
            for d in deltas {
                out.push(ev("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": d}})));
            }
            if complete {
                out.push(ev(
                    "content_block_stop",
                    json!({"type": "content_block_stop", "index": 0}),
                ));
                out.push(ev("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 4}})));
                out.push(ev("message_stop", json!({"type": "message_stop"})));
            }
        }
        Proto::Gemini => {
            let n = deltas.len();
            for (i, d) in deltas.iter().enumerate() {
                let last = complete && i + 1 == n;
                let mut cand =
                    json!({"content": {"role": "model", "parts": [{"text": d}]}, "index": 0});
                if last {
                    cand["finishReason"] = json!("STOP");
                }
                let chunk = json!({"candidates": [cand], "usageMetadata": {"promptTokenCount": 12, "candidatesTokenCount": i + 1, "totalTokenCount": 13 + i}, "modelVersion": model});
                out.push(format!("data: {chunk}\n\n"));
            }
        }
    }
    out
}

fn sse(frames: Vec<String>, delay: Duration, guard: Option<DropFlag>) -> HttpResponse {
    let stream = futures::stream::iter(frames).then(move |f| {
        let _keep = &guard;
        async move {
            tokio::time::sleep(delay).await;
            Ok::<_, actix_web::Error>(Bytes::from(f))
        }
    });
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .streaming(stream)
}

async fn scenario(
    proto: Proto,
    rec: &Recorder,
    req: &HttpRequest,
    model: &str,
    body: &Value,
    stream: bool,
) -> HttpResponse {
    let n = rec.hit(model, req, body);
    let key = match proto {
        Proto::OpenAi => req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim_start_matches("Bearer ").to_string()),
        Proto::Anthropic => req
            .headers()
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        Proto::Gemini => req
            .headers()
            .get("x-goog-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    };
    if key.as_deref() != Some(KEY) {
        if proto == Proto::Gemini {
            // What the Gemini API answers for a bad key: 400 INVALID_ARGUMENT
            // with an ErrorInfo detail (https://ai.google.dev/gemini-api/docs/troubleshooting).
            return HttpResponse::BadRequest().json(json!({"error": {
                "code": 400,
                "message": "API key not valid. Please pass a valid API key.",
                "status": "INVALID_ARGUMENT",
                "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                             "domain": "googleapis.com", "metadata": {"service": "generativelanguage.googleapis.com"}}]
            }}));
        }
        return error(proto, 401, "invalid api key", None);
    }
    match model {
        "rate-limited-once" if n == 1 => return error(proto, 429, "slow down", Some("1")),
        "rate-limited-long" => return error(proto, 429, "slow down", Some("120")),
        "error-once" if n == 1 => return error(proto, 500, "boom", None),
        "always-500" => return error(proto, 500, "boom", None),
        "too-long" => {
            return error(
                proto,
                400,
                "prompt is too long: maximum context length exceeded (tokens)",
                None,
            )
        }
        "missing" => return error(proto, 404, "model not found", None),
        "slow-first-byte" => tokio::time::sleep(Duration::from_secs(3)).await,
        _ => {}
    }
    if !stream {
        return HttpResponse::Ok().json(full_answer(proto, model));
    }
    match model {
        "cut-stream" => sse(
            frames(proto, model, &DELTAS[..2], false),
            Duration::from_millis(5),
            None,
        ),
        "malformed" => sse(vec!["data: {not json\n\n".into()], Duration::ZERO, None),
        "malformed-once" if n == 1 => sse(vec!["data: {not json\n\n".into()], Duration::ZERO, None),
        "endless" => {
            let many: Vec<&str> = std::iter::repeat_n("x", 400).collect();
            sse(
                frames(proto, model, &many, true),
                Duration::from_millis(50),
                Some(DropFlag(rec.cancelled.clone())),
            )
        }
        _ => sse(
            frames(proto, model, &DELTAS, true),
            Duration::from_millis(5),
            None,
        ),
    }
}

async fn openai(
    rec: web::Data<Recorder>,
    req: HttpRequest,
    body: web::Json<Value>,
) -> HttpResponse {
    let model = body["model"].as_str().unwrap_or_default().to_string();
    let stream = body["stream"].as_bool().unwrap_or(false);
    scenario(Proto::OpenAi, &rec, &req, &model, &body, stream).await
}

async fn anthropic(
    rec: web::Data<Recorder>,
    req: HttpRequest,
    body: web::Json<Value>,
) -> HttpResponse {
    let model = body["model"].as_str().unwrap_or_default().to_string();
    let stream = body["stream"].as_bool().unwrap_or(false);
    scenario(Proto::Anthropic, &rec, &req, &model, &body, stream).await
}

async fn gemini(
    rec: web::Data<Recorder>,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Json<Value>,
) -> HttpResponse {
    let (model, action) = path.split_once(':').unwrap_or((&path, ""));
    let stream = action == "streamGenerateContent";
    scenario(Proto::Gemini, &rec, &req, model, &body, stream).await
}

struct Server {
    base: String,
    rec: web::Data<Recorder>,
}

async fn server() -> Server {
    let rec = web::Data::new(Recorder::default());
    let data = rec.clone();
    let srv = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .route("/v1/chat/completions", web::post().to(openai))
            .route("/v1/messages", web::post().to(anthropic))
            .route("/v1beta/models/{model_action}", web::post().to(gemini))
    })
    .workers(1)
    .bind(("127.0.0.1", 0))
    .unwrap();
    let addr = srv.addrs()[0];
    actix_web::rt::spawn(srv.run());
    Server {
        base: format!("http://{addr}"),
        rec,
    }
}

fn timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(2),
        request: Duration::from_millis(1500),
        first_token: Duration::from_millis(1500),
        idle: Duration::from_secs(2),
    }
}

fn providers(base: &str, key: &str) -> Vec<Arc<dyn LlmProvider>> {
    let mut o = OpenAiConfig::compatible("vllm", format!("{base}/v1"), key);
    o.timeouts = timeouts();
    let mut a = AnthropicConfig::new(key);
    a.base_url = base.to_string();
    a.timeouts = timeouts();
    let mut g = GeminiConfig::new(key);
    g.base_url = base.to_string();
    g.timeouts = timeouts();
    vec![
        Arc::new(OpenAiProvider::new(o).unwrap()),
        Arc::new(AnthropicProvider::new(a).unwrap()),
        Arc::new(GeminiProvider::new(g).unwrap()),
    ]
}

fn request(model: &str) -> GenerateRequest {
    let mut r = GenerateRequest::new(
        model,
        vec![Message::system("Be brief."), Message::user("Say hello")],
    );
    r.max_tokens = Some(16);
    r.temperature = Some(0.2);
    r.stop = vec!["###".into()];
    r.top_k = Some(40);
    r
}

/// A server runs one runtime per worker thread. A call must not depend on
/// the thread that opened the connection it reuses: here that thread's
/// runtime is left unpolled after its call (as a busy or descheduled
/// worker's is), and a call from a second thread still completes at once
/// instead of waiting for it (each thread has its own connections).
#[actix_web::test]
async fn a_call_does_not_wait_for_the_thread_that_opened_its_connection() {
    let srv = server().await;
    for p in providers(&srv.base, KEY) {
        let (opened, wait_opened) = std::sync::mpsc::channel();
        let (release, wait_release) = std::sync::mpsc::channel::<()>();
        let first = p.clone();
        let idle = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let done = rt.block_on(first.complete(&request("ok"))).map(|c| c.text);
            opened.send(done).unwrap();
            // The runtime (and the connection it drives) stays, unpolled.
            wait_release.recv().ok();
        });
        let second = p.clone();
        let other = tokio::task::spawn_blocking(move || {
            let first = wait_opened.recv().unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let started = Instant::now();
            let done = rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(3), second.complete(&request("ok"))).await
            });
            (first, done, started.elapsed())
        })
        .await
        .unwrap();
        release.send(()).unwrap();
        idle.join().unwrap();
        let (first, done, took) = other;
        assert_eq!(first.unwrap(), "Hello, world!", "{}", p.id());
        let text = done
            .unwrap_or_else(|_| panic!("{}: the call waited for the idle thread", p.id()))
            .unwrap_or_else(|e| panic!("{}: {e} after {took:?}", p.id()))
            .text;
        assert_eq!(text, "Hello, world!", "{}", p.id());
    }
}

#[actix_web::test]
async fn complete_and_stream_with_usage_on_every_protocol() {
    let srv = server().await;
    for p in providers(&srv.base, KEY) {
        let c = p
            .complete(&request("ok"))
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", p.id()));
        assert_eq!(c.text, "Hello, world!", "{}", p.id());
        assert_eq!(
            c.summary.usage,
            Usage {
                prompt_tokens: 12,
                completion_tokens: 4
            },
            "{}",
            p.id()
        );
        assert_eq!(c.summary.finish_reason, FinishReason::Stop);

        let mut s = p.stream(&request("ok")).await.unwrap();
        let mut deltas = Vec::new();
        let mut done = None;
        while let Some(ev) = s.next().await {
            match ev.unwrap_or_else(|e| panic!("{}: {e}", p.id())) {
                StreamEvent::Delta(t) => deltas.push(t),
                StreamEvent::Done(sum) => done = Some(sum),
                StreamEvent::ToolCall(c) => panic!("{}: no tools were offered: {c:?}", p.id()),
                StreamEvent::Logprobs(l) => panic!("{}: not asked for: {l:?}", p.id()),
            }
        }
        assert_eq!(deltas, DELTAS, "{} streams token by token", p.id());
        let done = done.expect("final event");
        assert_eq!(
            done.usage,
            Usage {
                prompt_tokens: 12,
                completion_tokens: 4
            },
            "{} streamed usage",
            p.id()
        );
        assert!(
            done.timing.time_to_first_token.is_some()
                && done.timing.total >= done.timing.time_to_first_token.unwrap()
        );
    }
}

#[actix_web::test]
async fn requests_follow_each_wire_protocol() {
    let srv = server().await;
    let ps = providers(&srv.base, KEY);
    let (openai, anthropic, gemini) = (&ps[0], &ps[1], &ps[2]);

    collect(openai.stream(&request("ok")).await.unwrap())
        .await
        .unwrap();
    let body = srv.rec.last_body.lock().unwrap().clone();
    assert_eq!(body["stream_options"]["include_usage"], true);
    assert_eq!(
        body["messages"][0],
        json!({"role": "system", "content": "Be brief."})
    );
    assert_eq!(body["max_tokens"], 16, "compatible servers get max_tokens");
    assert_eq!(body["stop"], json!(["###"]));
    assert_eq!(
        srv.rec.last_headers.lock().unwrap()["authorization"],
        format!("Bearer {KEY}")
    );

    anthropic.complete(&request("ok")).await.unwrap();
    let body = srv.rec.last_body.lock().unwrap().clone();
    assert_eq!(body["system"], "Be brief.");
    assert_eq!(
        body["messages"],
        json!([{"role": "user", "content": "Say hello"}])
    );
    assert_eq!(body["max_tokens"], 16);
    assert_eq!(body["stop_sequences"], json!(["###"]));
    assert_eq!(body["top_k"], 40);
    assert_eq!(
        body["temperature"],
        json!(0.2),
        "0.2 as written, not 0.20000000298023224"
    );
    assert_eq!(
        srv.rec.last_headers.lock().unwrap()["anthropic-version"],
        "2023-06-01"
    );

    gemini.complete(&request("ok")).await.unwrap();
    let body = srv.rec.last_body.lock().unwrap().clone();
    assert_eq!(body["systemInstruction"]["parts"][0]["text"], "Be brief.");
    assert_eq!(
        body["contents"],
        json!([{"role": "user", "parts": [{"text": "Say hello"}]}])
    );
    assert_eq!(body["generationConfig"]["maxOutputTokens"], 16);
    assert_eq!(body["generationConfig"]["stopSequences"], json!(["###"]));
    assert_eq!(body["generationConfig"]["topK"], 40);
    assert_eq!(body["generationConfig"]["temperature"], json!(0.2));
    let uri = srv.rec.last_uri.lock().unwrap().clone();
    assert_eq!(uri, "/v1beta/models/ok:generateContent");
    collect(gemini.stream(&request("ok")).await.unwrap())
        .await
        .unwrap();
    assert_eq!(
        srv.rec.last_uri.lock().unwrap().as_str(),
        "/v1beta/models/ok:streamGenerateContent?alt=sse"
    );
    assert!(
        !srv.rec.last_uri.lock().unwrap().contains(KEY),
        "the key never goes in the URL"
    );
}

#[actix_web::test]
async fn failures_are_typed() {
    let srv = server().await;
    for p in providers(&srv.base, KEY) {
        let id = p.id().to_string();
        let err = |m: &str| {
            let p = p.clone();
            let m = m.to_string();
            async move { p.complete(&request(&m)).await.unwrap_err() }
        };
        assert!(
            matches!(err("too-long").await, InferenceError::ContextTooLong(_)),
            "{id}"
        );
        assert!(
            matches!(err("missing").await, InferenceError::ModelNotFound(_)),
            "{id}"
        );
        assert!(
            matches!(
                err("always-500").await,
                InferenceError::Upstream {
                    status: Some(500),
                    ..
                }
            ),
            "{id}"
        );
        assert!(
            matches!(err("slow-first-byte").await, InferenceError::Timeout),
            "{id}"
        );
        match err("rate-limited-long").await {
            InferenceError::RateLimited { retry_after, .. } => {
                assert_eq!(
                    retry_after,
                    Some(Duration::from_secs(120)),
                    "{id} reads Retry-After"
                );
            }
            other => panic!("{id}: {other:?}"),
        }
        let stream_err = match p.stream(&request("slow-first-byte")).await {
            Err(e) => e,
            Ok(s) => collect(s).await.unwrap_err(),
        };
        assert!(
            matches!(stream_err, InferenceError::Timeout),
            "{id}: {stream_err:?}"
        );
        let cut = collect(p.stream(&request("cut-stream")).await.unwrap())
            .await
            .unwrap_err();
        assert!(matches!(cut, InferenceError::Protocol(_)), "{id}: {cut:?}");
        let bad = collect(p.stream(&request("malformed")).await.unwrap())
            .await
            .unwrap_err();
        assert!(matches!(bad, InferenceError::Protocol(_)), "{id}: {bad:?}");
    }
    for p in providers(&srv.base, "wrong-key") {
        let e = p.complete(&request("ok")).await.unwrap_err();
        assert!(matches!(e, InferenceError::Auth(_)), "{}: {e:?}", p.id());
        assert!(
            !e.to_string().contains("wrong-key"),
            "keys never appear in errors"
        );
    }
    for p in providers(&srv.base, KEY) {
        let e = p.complete(&request("../../etc")).await.unwrap_err();
        assert!(matches!(e, InferenceError::BadRequest(_)), "{}", p.id());
    }
}

#[actix_web::test]
async fn retries_honour_retry_after_and_never_follow_the_first_token() {
    let policy = RetryPolicy {
        max_retries: 3,
        base_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(50),
        max_retry_after: Duration::from_secs(30),
    };
    for i in 0..3 {
        let srv = server().await;
        let p = providers(&srv.base, KEY).remove(i);
        let id = p.id().to_string();
        let r = Retrying::new(p, policy.clone());
        // 429 once: waits Retry-After (1 s) then succeeds.
        let started = Instant::now();
        let c = r.complete(&request("rate-limited-once")).await.unwrap();
        assert_eq!(c.text, "Hello, world!");
        assert!(
            started.elapsed() >= Duration::from_millis(950),
            "{id} waited {:?}",
            started.elapsed()
        );
        assert_eq!(srv.rec.calls("rate-limited-once"), 2, "{id}");
        // Retry-After beyond the policy's limit: no waiting, the error comes back.
        let started = Instant::now();
        let before = srv.rec.calls("rate-limited-long");
        assert!(matches!(
            r.complete(&request("rate-limited-long")).await,
            Err(InferenceError::RateLimited { .. })
        ));
        assert!(started.elapsed() < Duration::from_millis(900));
        assert_eq!(srv.rec.calls("rate-limited-long"), before + 1);
        // 5xx: retried; a streamed 5xx before any token too.
        let before = srv.rec.calls("always-500");
        assert!(r.complete(&request("always-500")).await.is_err());
        assert_eq!(
            srv.rec.calls("always-500"),
            before + 4,
            "{id}: 1 try + 3 retries"
        );
        // Not retryable: once.
        let before = srv.rec.calls("too-long");
        assert!(r.complete(&request("too-long")).await.is_err());
        assert_eq!(srv.rec.calls("too-long"), before + 1);
        // A stream that breaks before its first token is retried...
        let before = srv.rec.calls("malformed-once");
        let c = collect(r.stream(&request("malformed-once")).await.unwrap())
            .await
            .unwrap();
        assert_eq!(c.text, "Hello, world!", "{id}");
        assert_eq!(
            srv.rec.calls("malformed-once"),
            before + 2,
            "{id}: one broken stream, one retry"
        );
        // ...but one cut after tokens were sent is not.
        let before = srv.rec.calls("cut-stream");
        let mut s = r.stream(&request("cut-stream")).await.unwrap();
        let mut got = String::new();
        let mut failed = false;
        while let Some(ev) = s.next().await {
            match ev {
                Ok(StreamEvent::Delta(t)) => got.push_str(&t),
                Ok(StreamEvent::Done(_)) => panic!("{id}: a cut stream cannot finish"),
                Ok(StreamEvent::ToolCall(_) | StreamEvent::Logprobs(_)) => {
                    panic!("{id}: no tools nor log-probabilities were asked for")
                }
                Err(_) => failed = true,
            }
        }
        assert!(failed && got == "Hello, ", "{id}: {got:?}");
        assert_eq!(
            srv.rec.calls("cut-stream"),
            before + 1,
            "{id}: no retry after the first token"
        );
    }
}

#[actix_web::test]
async fn dropping_a_stream_stops_the_upstream_work() {
    for i in 0..3 {
        let srv = server().await;
        let p = providers(&srv.base, KEY).remove(i);
        let mut s = p.stream(&request("endless")).await.unwrap();
        let first = s.next().await.unwrap().unwrap();
        assert!(matches!(first, StreamEvent::Delta(_)));
        drop(s);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !srv.rec.cancelled.load(Ordering::SeqCst) {
            assert!(
                Instant::now() < deadline,
                "{}: the server kept streaming",
                p.id()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[actix_web::test]
async fn fallback_moves_on_only_when_another_model_can_help() {
    let srv = server().await;
    let ps = providers(&srv.base, KEY);
    let chain = Fallback::new(vec![
        (ps[1].clone(), "always-500".into()),
        (ps[2].clone(), "missing".into()),
        (ps[0].clone(), "ok".into()),
    ]);
    let (provider, c) = chain.complete(&request("ignored")).await.unwrap();
    assert_eq!(
        (provider.as_str(), c.text.as_str()),
        ("vllm", "Hello, world!")
    );
    let (provider, s) = chain.stream(&request("ignored")).await.unwrap();
    assert_eq!(provider, "vllm");
    assert_eq!(collect(s).await.unwrap().text, "Hello, world!");
    let stop = Fallback::new(vec![
        (ps[1].clone(), "too-long".into()),
        (ps[0].clone(), "ok".into()),
    ]);
    assert!(matches!(
        stop.complete(&request("x")).await,
        Err(InferenceError::ContextTooLong(_))
    ));
}

#[tokio::test]
async fn echo_provider_is_deterministic_and_scriptable() {
    use muse_inference::testing::EchoProvider;
    let p = EchoProvider::new();
    let mut r = GenerateRequest::new("m", vec![Message::user("one two three")]);
    let a = p.complete(&r).await.unwrap();
    let b = collect(p.stream(&r).await.unwrap()).await.unwrap();
    assert_eq!(a.text, "echo: one two three");
    assert_eq!(a.text, b.text);
    assert_eq!(
        a.summary.usage,
        Usage {
            prompt_tokens: 3,
            completion_tokens: 4
        }
    );
    r.max_tokens = Some(2);
    let c = p.complete(&r).await.unwrap();
    assert_eq!(
        (c.text.as_str(), &c.summary.finish_reason),
        ("echo: one", &FinishReason::Length)
    );

    let flaky = EchoProvider::failing_with(vec![
        InferenceError::Timeout,
        InferenceError::Upstream {
            status: Some(503),
            message: "x".into(),
        },
    ]);
    let policy = RetryPolicy {
        max_retries: 2,
        base_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(2),
        ..RetryPolicy::default()
    };
    let r2 = Retrying::new(flaky, policy);
    assert_eq!(r2.complete(&r).await.unwrap().text, "echo: one");
}

#[test]
fn cost_of_a_call_from_the_price_table() {
    let t = PriceTable::builtin();
    let usage = Usage {
        prompt_tokens: 12,
        completion_tokens: 4,
    };
    let cost = t
        .cost("anthropic", "claude-3-5-haiku-latest", &usage)
        .unwrap();
    assert!((cost - (12.0 * 0.8 + 4.0 * 4.0) / 1e6).abs() < 1e-12);
    assert_eq!(t.cost("vllm", "ok", &usage), None);
}

#[test]
fn registry_resolves_keys_prices_calls_and_records_metrics() {
    use muse_inference::testing::EchoProvider;
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::with_local_recorder(&recorder, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut prices = PriceTable::builtin();
            prices.insert(
                "test",
                "echo",
                Price {
                    input_per_million: 1.0,
                    output_per_million: 2.0,
                    context_length: Some(4096),
                },
            );
            let mut reg = ModelRegistry::new(prices, RetryPolicy::none());
            reg.add_provider(
                Arc::new(EchoProvider::new()),
                &["echo".to_string(), "unpriced".to_string()],
            );
            assert_eq!(reg.provider_ids(), vec!["test"]);
            let list = reg.list();
            assert_eq!(
                list.iter().map(|m| m.key.as_str()).collect::<Vec<_>>(),
                ["test/echo", "test/unpriced"]
            );
            assert_eq!(list[0].context_length, Some(4096));
            assert!(list[1].price.is_none());

            let req = GenerateRequest::new("ignored", vec![Message::user("a b c")]);
            let out = reg.complete("test/echo", &req).await.unwrap();
            assert_eq!(out.completion.text, "echo: a b c");
            assert_eq!(
                out.completion.summary.model, "echo",
                "the key's model is what the provider sees"
            );
            assert!((out.cost.unwrap() - (3.0 * 1.0 + 4.0 * 2.0) / 1e6).abs() < 1e-12);
            assert_eq!(
                reg.complete("test/unpriced", &req).await.unwrap().cost,
                None
            );
            assert!(matches!(
                reg.complete("test/nope", &req).await,
                Err(InferenceError::ModelNotFound(_))
            ));
            let streamed = collect(reg.stream("test/echo", &req).await.unwrap())
                .await
                .unwrap();
            assert_eq!(streamed.text, "echo: a b c");
        });
    });
    let text = handle.render();
    assert!(
        text.contains(r#"llm_tokens_used_total{provider="test",model="echo",kind="prompt"} 6"#),
        "{text}"
    );
    assert!(
        text.contains(r#"llm_tokens_used_total{provider="test",model="echo",kind="completion"} 8"#),
        "{text}"
    );
    assert!(
        text.contains(r#"llm_cost_total_usd{provider="test",model="echo"} 0.000022"#),
        "{text}"
    );
    assert!(text.contains("llm_time_to_first_token_seconds"), "{text}");
}
