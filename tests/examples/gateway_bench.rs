//! What Muse adds in front of a model server (run by `just bench`).
//!
//! Starts a local OpenAI-protocol server on 127.0.0.1 (answers at once;
//! streams 200 chunks with no delay), then the release `muse` binary as a
//! second process pointed at it (SQLite, default logging), and measures:
//!
//! 1. `POST /v1/chat/completions` at fixed rates, open loop (latency counts
//!    from the scheduled send time): directly against the model server,
//!    through Muse's OpenAI-compatible API, and through `execute-prompt`
//!    (which also validates variables and renders a template); p50/p99.
//!    Every call through Muse is authenticated (API key) and recorded.
//! 2. Streaming: the time per token of a 200-token stream read directly,
//!    through Muse's SSE (`execute-prompt/{id}/stream`) and through the
//!    WebSocket (`execute`), and what Muse adds per token.
//!
//! 3. Closed loop, 64 connections: the most requests per second, directly
//!    and through Muse.
//!
//! SQLite by default; `BENCH_DATABASE_URL=postgres://…` runs Muse on a fresh
//! PostgreSQL database on that server instead. `BENCH_REPLICAS=3` also
//! starts two more replicas on the same database and nginx in front of the
//! three (`deploy/nginx/muse.conf` itself, on loopback ports), and adds
//! rows for `/v1/chat/completions` through nginx.
//!
//! `BENCH_TRACE=DIR` writes every open-loop call's send time and latency;
//! `BENCH_MUSE_WRAPPER="strace -f …"` (or valgrind) runs Muse under a tool.
//!
//! `cargo run --release -p muse-tests --example gateway_bench -- target/release/muse [SECONDS] [RATES…]`
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::panic
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::web::Bytes;
use actix_web::{web, App, HttpResponse, HttpServer};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};

#[path = "../../bins/muse/tests/common/nginx.rs"]
mod nginx;
#[path = "support/muse.rs"]
mod support;
use support::{database_url, lift_free_plan, post, start_muse};

const STREAM_TOKENS: usize = 200;

/// When the upstream wrote each token of the current stream.
type Emitted = Arc<std::sync::Mutex<Vec<Instant>>>;

/// Pace of the streamed tokens (500 tokens/s, faster than real models).
const TOKEN_INTERVAL: Duration = Duration::from_millis(2);

async fn chat(body: web::Json<Value>, emitted: web::Data<Emitted>) -> HttpResponse {
    if !body["stream"].as_bool().unwrap_or(false) {
        return HttpResponse::Ok().json(json!({
            "id": "chatcmpl-bench", "object": "chat.completion", "created": 1, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "A short answer of a few words."}, "finish_reason": "stop", "logprobs": null}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 8, "total_tokens": 28}
        }));
    }
    let chunk = |delta: Value, finish: Value, usage: Value| {
        let choices = if delta.is_null() {
            json!([])
        } else {
            json!([{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}])
        };
        format!(
            "data: {}\n\n",
            json!({"id": "b", "object": "chat.completion.chunk", "created": 1, "model": "bench", "choices": choices, "usage": usage})
        )
    };
    let mut out = String::new();
    for i in 0..STREAM_TOKENS {
        out.push_str(&chunk(
            json!({"content": format!("tok{i} ")}),
            Value::Null,
            Value::Null,
        ));
    }
    out.push_str(&chunk(json!({}), json!("stop"), Value::Null));
    out.push_str(&chunk(
        Value::Null,
        Value::Null,
        json!({"prompt_tokens": 20, "completion_tokens": STREAM_TOKENS, "total_tokens": 20 + STREAM_TOKENS}),
    ));
    out.push_str("data: [DONE]\n\n");
    // One chunk per write, paced, as a model server produces them; the
    // time each token leaves is kept for the latency measurement.
    let frames: Vec<Bytes> = out
        .split_inclusive("\n\n")
        .map(|f| Bytes::from(f.to_string()))
        .collect();
    let emitted = emitted.get_ref().clone();
    emitted.lock().unwrap().clear();
    let stream = futures_util::stream::iter(frames.into_iter().enumerate()).then(move |(i, f)| {
        let emitted = emitted.clone();
        async move {
            if i > 0 {
                tokio::time::sleep(TOKEN_INTERVAL).await;
            }
            emitted.lock().unwrap().push(Instant::now());
            Ok::<_, actix_web::Error>(f)
        }
    });
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .streaming(stream)
}

fn start_upstream(emitted: Emitted) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let data = web::Data::new(emitted);
            let srv = HttpServer::new(move || {
                App::new()
                    .app_data(data.clone())
                    .route("/v1/chat/completions", web::post().to(chat))
            })
            .workers(1)
            .tcp_nodelay(true)
            .bind(("127.0.0.1", 0))
            .unwrap();
            tx.send(srv.addrs()[0]).unwrap();
            srv.run().await.unwrap();
        });
    });
    format!("http://{}", rx.recv().unwrap())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Open loop at `rate` for `seconds`: returns (p50, p99, errors). Sends
/// are scheduled by a thread of its own sleeping to each send time
/// (tokio's timer ticks by the millisecond, which would add up to 1 ms
/// to every latency); a late send counts its lateness (latency from the
/// scheduled time).
async fn open_loop<F, Fut>(rate: u32, seconds: u32, call: Arc<F>) -> (Duration, Duration, usize)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    for _ in 0..200 {
        call().await;
    }
    let total = rate * seconds;
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    let runtime = tokio::runtime::Handle::current();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        let start = Instant::now();
        for i in 0..total {
            let scheduled = start + interval * i;
            if let Some(wait) = scheduled.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let call = call.clone();
            let handle = runtime.spawn(async move {
                let ok = call().await;
                (scheduled.elapsed(), ok, scheduled - start)
            });
            if tx.send(handle).is_err() {
                return;
            }
        }
    });
    let mut latencies = Vec::with_capacity(total as usize);
    let mut errors = 0;
    let mut trace = String::new();
    while let Some(h) = rx.recv().await {
        let (d, ok, at) = h.await.unwrap();
        trace.push_str(&format!(
            "{:.3} {:.3}\n",
            at.as_secs_f64() * 1e3,
            d.as_secs_f64() * 1e3
        ));
        latencies.push(d);
        errors += usize::from(!ok);
    }
    // `BENCH_TRACE=DIR`: each row's calls (send time and latency, ms) in
    // DIR/trace-<row>-<rate>.txt, to see when the slow ones happen.
    if let Ok(dir) = std::env::var("BENCH_TRACE") {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        std::fs::write(format!("{dir}/trace-{n}-{rate}.txt"), trace).unwrap();
    }
    latencies.sort();
    (
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        errors,
    )
}

/// Closed loop: `connections` callers, each sending its next request as
/// soon as the last one is answered, for `seconds`: (req/s, errors).
async fn closed_loop<F, Fut>(connections: usize, seconds: u32, call: Arc<F>) -> (f64, usize)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    let end = Instant::now() + Duration::from_secs(u64::from(seconds));
    let start = Instant::now();
    let handles: Vec<_> = (0..connections)
        .map(|_| {
            let call = call.clone();
            tokio::spawn(async move {
                let (mut done, mut errors) = (0usize, 0usize);
                while Instant::now() < end {
                    if call().await {
                        done += 1;
                    } else {
                        errors += 1;
                    }
                }
                (done, errors)
            })
        })
        .collect();
    let (mut done, mut errors) = (0, 0);
    for h in handles {
        let (d, e) = h.await.unwrap();
        done += d;
        errors += e;
    }
    (done as f64 / start.elapsed().as_secs_f64(), errors)
}

fn caller(
    client: reqwest::Client,
    url: String,
    token: String,
    body: Value,
) -> Arc<impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>> + Send + Sync>
{
    Arc::new(move || {
        let (client, url, token, body) = (client.clone(), url.clone(), token.clone(), body.clone());
        Box::pin(async move {
            match client
                .post(&url)
                .bearer_auth(&token)
                .json(&body)
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => match r.bytes().await {
                    Ok(_) => true,
                    Err(e) => failed(format!("reading the answer: {}", error_kind(&e))),
                },
                Ok(r) => {
                    let status = r.status();
                    let body = r.text().await.unwrap_or_default();
                    failed(format!(
                        "HTTP {status}: {}",
                        body.chars().take(160).collect::<String>()
                    ))
                }
                Err(e) => failed(format!("sending: {}", error_kind(&e))),
            }
        }) as std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>
    })
}

/// Why calls failed, and how often (printed at the end of the run).
static FAILURES: std::sync::Mutex<std::collections::BTreeMap<String, usize>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

fn failed(why: String) -> bool {
    *FAILURES.lock().unwrap().entry(why).or_default() += 1;
    false
}

fn error_kind(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_body() || e.is_decode() {
        "broken body"
    } else {
        "connection error"
    }
}

/// Per-token delays (arrival − emission) of one stream.
fn delays(emitted: &Emitted, arrivals: &[(usize, Instant)]) -> Vec<Duration> {
    let sent = emitted.lock().unwrap().clone();
    arrivals
        .iter()
        .map(|(i, at)| at.saturating_duration_since(sent[*i]))
        .collect()
}

fn token_index(text: &str) -> usize {
    text.trim().trim_start_matches("tok").parse().unwrap()
}

/// Reads one SSE stream; returns when each token arrived. `openai`: the
/// body is OpenAI chunks, else Muse's `event: token` events.
async fn sse_once(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    body: &Value,
    openai: bool,
) -> Vec<(usize, Instant)> {
    let mut r = client
        .post(url)
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let mut buf = String::new();
    let mut arrivals = Vec::new();
    while let Some(chunk) = r.chunk().await.unwrap() {
        let now = Instant::now();
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<Value>(data) else {
                continue;
            };
            let text = if openai {
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_string)
            } else if event.starts_with("event: token") {
                v["text"].as_str().map(str::to_string)
            } else {
                None
            };
            if let Some(t) = text.filter(|t| t.starts_with("tok")) {
                arrivals.push((token_index(&t), now));
            }
        }
    }
    assert_eq!(arrivals.len(), STREAM_TOKENS);
    arrivals
}

type Ws = actix_codec::Framed<awc::BoxedSocket, awc::ws::Codec>;

async fn ws_once(ws: &mut Ws, n: usize, prompt_id: &str) -> Vec<(usize, Instant)> {
    let msg = json!({"type": "execute", "id": format!("b{n}"), "prompt_id": prompt_id, "variables": {"q": "go"}, "llm_provider": "up", "llm_model": "bench"});
    ws.send(awc::ws::Message::Text(msg.to_string().into()))
        .await
        .unwrap();
    let mut arrivals = Vec::new();
    loop {
        match ws.next().await.unwrap().unwrap() {
            awc::ws::Frame::Text(b) => {
                let now = Instant::now();
                let v: Value = serde_json::from_slice(&b).unwrap();
                match v["type"].as_str() {
                    Some("token") => arrivals.push((token_index(v["text"].as_str().unwrap()), now)),
                    Some("done") => break,
                    Some("error") => panic!("{v}"),
                    _ => {}
                }
            }
            awc::ws::Frame::Ping(p) => ws.send(awc::ws::Message::Pong(p)).await.unwrap(),
            _ => {}
        }
    }
    assert_eq!(arrivals.len(), STREAM_TOKENS);
    arrivals
}

fn summary(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    (us(percentile(&v, 0.5)), us(percentile(&v, 0.99)))
}

#[actix_web::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bin = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "target/release/muse".into());
    let seconds: u32 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(10);
    let rates: Vec<u32> = if args.len() > 3 {
        args[3..].iter().filter_map(|s| s.parse().ok()).collect()
    } else {
        vec![500, 2000]
    };
    let emitted: Emitted = Arc::default();
    let upstream = start_upstream(emitted.clone());
    let run_dir = tempfile::tempdir().unwrap();
    let db = database_url(run_dir.path());
    let muse = start_muse(&bin, &upstream, &db, &[]).await;
    let client = reqwest::Client::new();
    let base = muse.base.clone();
    // More replicas on the same database, and nginx in front of them all.
    let replicas: usize = std::env::var("BENCH_REPLICAS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let mut others = Vec::new();
    for _ in 1..replicas {
        others.push(start_muse(&bin, &upstream, &db, &[]).await);
    }
    let lb = (replicas > 1).then(|| {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let ports: Vec<u16> = std::iter::once(muse.port)
            .chain(others.iter().map(|m| m.port))
            .collect();
        let child = nginx::start(run_dir.path(), port, &ports);
        (child, format!("http://127.0.0.1:{port}"))
    });
    if let Some((_, lb_base)) = &lb {
        let started = Instant::now();
        while client
            .get(format!("{lb_base}/health/live"))
            .send()
            .await
            .is_err()
        {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "nginx did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let through_nginx = lb.as_ref().map(|(_, lb_base)| {
        (
            format!("Muse `POST /v1/chat/completions` through nginx, {replicas} replicas"),
            format!("{lb_base}/v1/chat/completions"),
        )
    });

    // A user, an API key, and a one-variable prompt.
    post(&client, &format!("{base}/api/v1/auth/register"), "", json!({"email": "bench@example.com", "username": "bench", "password": "bench passphrase 2026"})).await;
    let login = post(
        &client,
        &format!("{base}/api/v1/auth/login"),
        "",
        json!({"email": "bench@example.com", "password": "bench passphrase 2026"}),
    )
    .await;
    let jwt = login["access_token"].as_str().unwrap().to_string();
    let key = post(
        &client,
        &format!("{base}/api/v1/auth/api-keys"),
        &jwt,
        json!({"name": "bench"}),
    )
    .await["key"]
        .as_str()
        .unwrap()
        .to_string();
    // Lift the free plan's quotas: the bench's calls are not what is limited.
    lift_free_plan(&client, &base).await;
    let spec = post(
        &client,
        &format!("{base}/api/v1/specialties"),
        &key,
        json!({"name": "Bench"}),
    )
    .await;
    let sub = post(
        &client,
        &format!("{base}/api/v1/sub-specialties"),
        &key,
        json!({"specialty_id": spec["id"], "name": "Bench"}),
    )
    .await;
    let prompt = post(
        &client,
        &format!("{base}/api/v1/expert-prompts"),
        &key,
        json!({"sub_specialty_id": sub["id"], "title": "Bench", "template": "Be brief. {q}",
               "variables_schema": {"type": "object", "required": ["q"], "properties": {"q": {"type": "string", "maxLength": 100}}}}),
    )
    .await;
    let pid = prompt["id"].as_str().unwrap().to_string();

    let chat_body = json!({"model": "bench", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something."}], "max_tokens": 16});
    let mut muse_chat = chat_body.clone();
    muse_chat["model"] = json!("up/bench");
    let exec_body = json!({"variables": {"q": "Say something."}, "llm_provider": "up", "llm_model": "bench", "max_tokens": 16});

    println!("| path | req/s | requests | p50 ms | p99 ms | added p50 / p99 ms | errors |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for &rate in &rates {
        let mut runs = vec![
            (
                "model server directly".to_string(),
                format!("{upstream}/v1/chat/completions"),
                chat_body.clone(),
            ),
            (
                "Muse `POST /v1/chat/completions`".to_string(),
                format!("{base}/v1/chat/completions"),
                muse_chat.clone(),
            ),
            (
                "Muse `POST /api/v1/execute-prompt/{id}`".to_string(),
                format!("{base}/api/v1/execute-prompt/{pid}"),
                exec_body.clone(),
            ),
        ];
        if let Some((name, url)) = &through_nginx {
            runs.push((name.clone(), url.clone(), muse_chat.clone()));
        }
        // What each path adds to the model server answered directly, in
        // the same run (the first row).
        let mut direct: Option<(f64, f64)> = None;
        for (name, url, body) in runs {
            let call = caller(client.clone(), url, key.clone(), body);
            let (p50, p99, errors) = open_loop(rate, seconds, call).await;
            let (p50, p99) = (p50.as_secs_f64() * 1e3, p99.as_secs_f64() * 1e3);
            let added = match direct {
                None => {
                    direct = Some((p50, p99));
                    "—".to_string()
                }
                Some((d50, d99)) => format!("{:+.3} / {:+.3}", p50 - d50, p99 - d99),
            };
            println!(
                "| {name} | {rate} | {} | {p50:.3} | {p99:.3} | {added} | {errors} |",
                rate * seconds,
            );
        }
    }

    // Closed loop, 64 connections: the most each path answers.
    println!();
    println!(
        "| closed loop, 64 connections, {seconds} s | req/s | errors | Muse CPU per call (user + system) | Muse context switches per call |"
    );
    println!("|---|---:|---:|---:|---:|");
    let mut closed = vec![
        (
            "model server directly".to_string(),
            format!("{upstream}/v1/chat/completions"),
            chat_body.clone(),
        ),
        (
            "Muse `POST /v1/chat/completions`".to_string(),
            format!("{base}/v1/chat/completions"),
            muse_chat.clone(),
        ),
    ];
    if let Some((name, url)) = &through_nginx {
        closed.push((name.clone(), url.clone(), muse_chat.clone()));
    }
    let muse_pid = muse.child.id();
    for (i, (name, url, body)) in closed.into_iter().enumerate() {
        let call = caller(client.clone(), url, key.clone(), body);
        let cpu_before = support::cpu_seconds(muse_pid);
        let switches_before = support::context_switches(muse_pid);
        let started = Instant::now();
        let (rps, errors) = closed_loop(64, seconds, call).await;
        let calls = rps * started.elapsed().as_secs_f64();
        // The CPU the (first) Muse process spent per call answered through
        // it directly; not meaningful for the model server's row or
        // through nginx (spread over replicas).
        let (cpu, switches) = if i == 1 && calls > 0.0 {
            (
                format!(
                    "{:.0} µs",
                    (support::cpu_seconds(muse_pid) - cpu_before) / calls * 1e6
                ),
                format!(
                    "{:.2}",
                    support::context_switches(muse_pid).saturating_sub(switches_before) as f64
                        / calls
                ),
            )
        } else {
            ("—".to_string(), "—".to_string())
        };
        println!("| {name} | {rps:.0} | {errors} | {cpu} | {switches} |");
    }

    // Streaming: 20 streams of 200 tokens each per path, one at a time;
    // the delay of every token from the model server's write to the client.
    let streams = 20;
    let direct_body =
        json!({"model": "bench", "messages": [{"role": "user", "content": "go"}], "stream": true});
    let direct_url = format!("{upstream}/v1/chat/completions");
    let sse_url = format!("{base}/api/v1/execute-prompt/{pid}/stream");
    let sse_body = json!({"variables": {"q": "go"}, "llm_provider": "up", "llm_model": "bench"});
    let (_, mut ws) = awc::Client::new()
        .ws(format!("{}/ws/bench", base.replace("http://", "ws://")))
        .bearer_auth(&key)
        .connect()
        .await
        .unwrap();
    let _ready = ws.next().await;
    let (mut direct, mut sse, mut over_ws) = (Vec::new(), Vec::new(), Vec::new());
    for n in 0..(streams + 3) {
        let warm = n < 3;
        let a = sse_once(&client, &direct_url, &key, &direct_body, true).await;
        let d = delays(&emitted, &a);
        let a = sse_once(&client, &sse_url, &key, &sse_body, false).await;
        let s = delays(&emitted, &a);
        let a = ws_once(&mut ws, n, &pid).await;
        let w = delays(&emitted, &a);
        if !warm {
            direct.extend(d);
            sse.extend(s);
            over_ws.extend(w);
        }
    }
    let (d50, d99) = summary(direct);
    let (s50, s99) = summary(sse);
    let (w50, w99) = summary(over_ws);
    println!();
    println!(
        "| streamed token, model server write → client read ({} tokens, {} µs apart) | p50 µs | p99 µs | added by Muse p50 / p99 µs |",
        streams * STREAM_TOKENS,
        TOKEN_INTERVAL.as_micros()
    );
    println!("|---|---:|---:|---:|");
    println!("| model server directly (SSE) | {d50:.0} | {d99:.0} | — |");
    println!(
        "| Muse SSE (`execute-prompt/{{id}}/stream`) | {s50:.0} | {s99:.0} | {:.0} / {:.0} |",
        s50 - d50,
        s99 - d99
    );
    println!(
        "| Muse WebSocket (`execute`) | {w50:.0} | {w99:.0} | {:.0} / {:.0} |",
        w50 - d50,
        w99 - d99
    );
    let failures = FAILURES.lock().unwrap();
    if !failures.is_empty() {
        println!();
        println!("| errors (all paths) | calls |");
        println!("|---|---:|");
        for (why, n) in failures.iter() {
            println!("| {} | {n} |", why.replace('|', "/"));
        }
    }
    drop(lb);
}
