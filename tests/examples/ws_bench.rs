//! WebSocket start-up under a burst (run by `just bench`).
//!
//! Starts an OpenAI-protocol upstream that streams 20 tokens 50 ms apart,
//! then the release `muse` on it; opens 10 sockets for each of 100 users,
//! and starts 1,000 generations spread evenly over 0.25 s (one `generate`
//! message per socket). Reports the first token's latency from each
//! message's scheduled send time (p50/p99/max), the errors, the time until
//! every generation is done, that every one has its execution recorded,
//! and the server's RSS idle (sockets open) and after the load.
//!
//! `cargo run --release -p muse-tests --example ws_bench -- target/release/muse [USERS] [SOCKETS_PER_USER] [BURST_MS]`
//! (`BENCH_DATABASE_URL=postgres://…` for PostgreSQL).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::panic
)]

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use actix_web::web::Bytes;
use actix_web::{web, App, HttpResponse, HttpServer};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};

#[path = "support/muse.rs"]
mod support;
use support::{database_url, lift_free_plan, post, start_muse};

const TOKENS: usize = 20;
const TOKEN_INTERVAL: Duration = Duration::from_millis(50);

async fn chat() -> HttpResponse {
    let chunk = |delta: Value, finish: Value, usage: Value| {
        let choices = if delta.is_null() {
            json!([])
        } else {
            json!([{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}])
        };
        Bytes::from(format!(
            "data: {}\n\n",
            json!({"id": "w", "object": "chat.completion.chunk", "created": 1, "model": "bench", "choices": choices, "usage": usage})
        ))
    };
    let mut frames: Vec<Bytes> = (0..TOKENS)
        .map(|i| {
            chunk(
                json!({"content": format!("t{i} ")}),
                Value::Null,
                Value::Null,
            )
        })
        .collect();
    frames.push(chunk(json!({}), json!("stop"), Value::Null));
    frames.push(chunk(
        Value::Null,
        Value::Null,
        json!({"prompt_tokens": 10, "completion_tokens": TOKENS, "total_tokens": 10 + TOKENS}),
    ));
    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
    let stream =
        futures_util::stream::iter(frames.into_iter().enumerate()).then(|(i, f)| async move {
            if i > 0 && i < TOKENS {
                tokio::time::sleep(TOKEN_INTERVAL).await;
            }
            Ok::<_, actix_web::Error>(f)
        });
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .streaming(stream)
}

fn start_upstream() -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let srv =
                HttpServer::new(|| App::new().route("/v1/chat/completions", web::post().to(chat)))
                    .workers(1)
                    .bind(("127.0.0.1", 0))
                    .unwrap();
            tx.send(srv.addrs()[0]).unwrap();
            srv.run().await.unwrap();
        });
    });
    format!("http://{}", rx.recv().unwrap())
}

/// The resident set of `pid`, in MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

type Ws = actix_codec::Framed<awc::BoxedSocket, awc::ws::Codec>;

/// What one socket saw of its generation.
#[derive(Default)]
struct Outcome {
    first_token: Option<Duration>,
    done: Option<Duration>,
    error: Option<String>,
}

#[actix_web::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bin = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "target/release/muse".into());
    let users: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(100);
    let per_user: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(10);
    let burst = Duration::from_millis(args.get(4).and_then(|s| s.parse().ok()).unwrap_or(250));
    let upstream = start_upstream();
    let dir = tempfile::tempdir().unwrap();
    let db = database_url(dir.path());
    // Cheap passwords: 100 logins are set-up, not what is measured.
    let muse = start_muse(&bin, &upstream, &db, &[("BCRYPT_COST", "4")]).await;
    let base = muse.base.clone();
    let client = reqwest::Client::new();

    // Lift the free plan's quotas: the bench's calls are not what is limited.
    lift_free_plan(&client, &base).await;
    let mut tokens = Vec::new();
    for u in 0..users {
        let (email, password) = (format!("ws{u}@example.com"), "ws bench passphrase 2026");
        post(
            &client,
            &format!("{base}/api/v1/auth/register"),
            "",
            json!({"email": email, "username": format!("ws{u}"), "password": password}),
        )
        .await;
        let login = post(
            &client,
            &format!("{base}/api/v1/auth/login"),
            "",
            json!({"email": email, "password": password}),
        )
        .await;
        tokens.push(login["access_token"].as_str().unwrap().to_string());
    }

    // Every socket open and ready before the burst.
    let ws_base = base.replace("http://", "ws://");
    let mut sockets: Vec<Ws> = Vec::new();
    for (u, token) in tokens.iter().enumerate() {
        for s in 0..per_user {
            let (_, mut ws) = awc::Client::new()
                .ws(format!("{ws_base}/ws/u{u}s{s}"))
                .bearer_auth(token)
                .connect()
                .await
                .unwrap();
            match ws.next().await {
                Some(Ok(awc::ws::Frame::Text(_))) => {}
                other => panic!("no ready message: {other:?}"),
            }
            sockets.push(ws);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_rss = rss_mib(muse.child.id());

    let n = sockets.len();
    let outcomes: Rc<RefCell<Vec<Outcome>>> =
        Rc::new(RefCell::new((0..n).map(|_| Outcome::default()).collect()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, mut ws) in sockets.into_iter().enumerate() {
        let outcomes = outcomes.clone();
        // Evenly over the burst; latency counts from this scheduled time.
        let at = started + burst.mul_f64(i as f64 / n as f64);
        tasks.push(actix_web::rt::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            let msg = json!({"type": "generate", "id": format!("g{i}"), "model": "up/bench", "prompt": "go", "max_tokens": 64});
            if let Err(e) = ws.send(awc::ws::Message::Text(msg.to_string().into())).await {
                outcomes.borrow_mut()[i].error = Some(format!("send: {e}"));
                return;
            }
            loop {
                let frame = tokio::time::timeout(Duration::from_secs(30), ws.next()).await;
                let Ok(Some(Ok(frame))) = frame else {
                    outcomes.borrow_mut()[i].error = Some("the socket ended or went silent".into());
                    return;
                };
                match frame {
                    awc::ws::Frame::Text(b) => {
                        let v: Value = serde_json::from_slice(&b).unwrap_or_default();
                        let mut o = outcomes.borrow_mut();
                        match v["type"].as_str() {
                            Some("token") if o[i].first_token.is_none() => {
                                o[i].first_token = Some(at.elapsed());
                            }
                            Some("done") => {
                                o[i].done = Some(started.elapsed());
                                return;
                            }
                            Some("error") => {
                                o[i].error = Some(v["error"]["code"].to_string());
                                return;
                            }
                            _ => {}
                        }
                    }
                    awc::ws::Frame::Ping(p) => {
                        let _ = ws.send(awc::ws::Message::Pong(p)).await;
                    }
                    _ => {}
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let load_rss = rss_mib(muse.child.id());
    let outcomes = std::mem::take(&mut *outcomes.borrow_mut());
    let mut first: Vec<Duration> = outcomes.iter().filter_map(|o| o.first_token).collect();
    first.sort_unstable();
    let errors: Vec<&String> = outcomes.iter().filter_map(|o| o.error.as_ref()).collect();
    let all_done = outcomes
        .iter()
        .filter_map(|o| o.done)
        .max()
        .unwrap_or_default();

    // Every generation has its execution.
    let mut recorded = 0;
    for token in &tokens {
        let page: Value = client
            .get(format!("{base}/api/v1/executions/history?per_page=1"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        recorded += page["total"].as_u64().unwrap_or(0);
    }

    println!(
        "| WebSocket burst: {n} generations ({users} users × {per_user} sockets) over {} ms, {TOKENS} tokens {} ms apart | value |",
        burst.as_millis(),
        TOKEN_INTERVAL.as_millis()
    );
    println!("|---|---:|");
    println!(
        "| first token p50 ms (from the scheduled send) | {:.1} |",
        percentile(&first, 0.5)
    );
    println!("| first token p99 ms | {:.1} |", percentile(&first, 0.99));
    println!("| first token max ms | {:.1} |", percentile(&first, 1.0));
    println!(
        "| every generation done after s | {:.2} |",
        all_done.as_secs_f64()
    );
    println!("| errors | {} |", errors.len());
    println!("| executions recorded | {recorded} of {n} |");
    println!("| server RSS, {n} sockets open, idle (MiB) | {idle_rss:.1} |");
    println!("| server RSS after the burst (MiB) | {load_rss:.1} |");
    if let Some(e) = errors.first() {
        println!("\nfirst error: {e}");
    }
}
