//! What the provider layer costs over a direct HTTP call.
//!
//! Starts a local OpenAI-protocol server on 127.0.0.1 that answers
//! `/v1/chat/completions` at once, then sends the same request at a fixed
//! rate (open loop: latency counts from the scheduled send time) three ways:
//! a direct reqwest POST parsing the JSON, `OpenAiProvider::complete`
//! (async-openai underneath), and `ModelRegistry::complete` (adds retries
//! policy, pricing and metrics). Prints p50/p99 of each.
//!
//! `cargo run --release -p muse-inference --example provider_overhead [RATE] [SECONDS]`
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::panic
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpResponse, HttpServer};
use muse_inference::providers::openai::{OpenAiConfig, OpenAiProvider};
use muse_inference::{
    GenerateRequest, LlmProvider, Message, ModelRegistry, PriceTable, RetryPolicy,
};
use serde_json::{json, Value};

async fn chat(body: web::Json<Value>) -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 1, "model": body["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "A short answer of a few words."}, "finish_reason": "stop", "logprobs": null}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 8, "total_tokens": 28}
    }))
}

fn start_server() -> String {
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

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

async fn run<F, Fut>(
    name: &str,
    rate: u32,
    seconds: u32,
    print: bool,
    call: Arc<F>,
) -> (Duration, Duration)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    // Warm up connections and code paths.
    for _ in 0..50 {
        call().await;
    }
    let total = rate * seconds;
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    let start = Instant::now();
    let mut handles = Vec::with_capacity(total as usize);
    for i in 0..total {
        let scheduled = start + interval * i;
        tokio::time::sleep_until(scheduled.into()).await;
        let call = call.clone();
        handles.push(tokio::spawn(async move {
            call().await;
            scheduled.elapsed()
        }));
    }
    let mut latencies = Vec::with_capacity(handles.len());
    for h in handles {
        latencies.push(h.await.unwrap());
    }
    latencies.sort();
    let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
    if print {
        println!(
            "| {name} | {rate} | {total} | {:.3} | {:.3} |",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3
        );
    }
    (p50, p99)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rate: u32 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(500);
    let seconds: u32 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(10);
    let base = start_server();
    let body = json!({"model": "bench", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something."}], "max_tokens": 16});

    println!("| path | req/s | requests | p50 ms | p99 ms |");
    println!("|---|---:|---:|---:|---:|");

    let client = reqwest::Client::new();
    let url = format!("{base}/v1/chat/completions");
    let direct_call = Arc::new(move || {
        let client = client.clone();
        let url = url.clone();
        let body = body.clone();
        async move {
            let r = client
                .post(&url)
                .bearer_auth("k")
                .json(&body)
                .send()
                .await
                .unwrap();
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["usage"]["completion_tokens"], 8);
        }
    });

    let request = {
        let mut r = GenerateRequest::new(
            "bench",
            vec![
                Message::system("Be brief."),
                Message::user("Say something."),
            ],
        );
        r.max_tokens = Some(16);
        r
    };
    let provider = Arc::new(
        OpenAiProvider::new(OpenAiConfig::compatible("bench", format!("{base}/v1"), "k")).unwrap(),
    );
    let req = request.clone();
    let p = provider.clone();
    let provider_call = Arc::new(move || {
        let p = p.clone();
        let req = req.clone();
        async move {
            let c = p.complete(&req).await.unwrap();
            assert_eq!(c.summary.usage.completion_tokens, 8);
        }
    });

    let mut registry = ModelRegistry::new(PriceTable::builtin(), RetryPolicy::default());
    registry.add_provider(provider, &["bench".to_string()]);
    let registry = Arc::new(registry);
    let registry_call = Arc::new(move || {
        let registry = registry.clone();
        let req = request.clone();
        async move {
            registry.complete("bench/bench", &req).await.unwrap();
        }
    });

    // Two rounds, interleaved; only the second (everything warm) is reported.
    let (mut direct, mut via_provider, mut via_registry) = Default::default();
    for round in 0..2 {
        let print = round == 1;
        direct = run(
            "direct reqwest POST + JSON parse",
            rate,
            seconds,
            print,
            direct_call.clone(),
        )
        .await;
        via_provider = run(
            "OpenAiProvider::complete",
            rate,
            seconds,
            print,
            provider_call.clone(),
        )
        .await;
        via_registry = run(
            "ModelRegistry::complete",
            rate,
            seconds,
            print,
            registry_call.clone(),
        )
        .await;
    }

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!();
    println!(
        "overhead over the direct call: provider p50 {:+.3} ms, p99 {:+.3} ms; registry p50 {:+.3} ms, p99 {:+.3} ms",
        ms(via_provider.0) - ms(direct.0),
        ms(via_provider.1) - ms(direct.1),
        ms(via_registry.0) - ms(direct.0),
        ms(via_registry.1) - ms(direct.1),
    );
}
