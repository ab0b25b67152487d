//! What the process tests share: ports, an instant OpenAI-protocol
//! upstream, and waiting for a `muse serve` to become ready.
#![allow(dead_code, clippy::unwrap_used, clippy::panic)]

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;

/// A loopback port free at the time of the call.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An OpenAI-protocol upstream answering every chat completion at once
/// with `ok` (3 + 1 tokens); its `/v1` base URL.
pub async fn instant_upstream() -> String {
    use actix_web::{web, App, HttpResponse, HttpServer};
    let srv = HttpServer::new(|| {
        App::new().route(
            "/v1/chat/completions",
            web::post().to(|| async {
                HttpResponse::Ok().json(json!({
                    "id": "d", "object": "chat.completion", "created": 1, "model": "ok",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop", "logprobs": null}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
                }))
            }),
        )
    })
    .workers(2)
    .bind(("127.0.0.1", 0))
    .unwrap();
    let addr = srv.addrs()[0];
    actix_web::rt::spawn(srv.run());
    format!("http://{addr}/v1")
}

/// Waits until `{base}/health/ready` answers `want` (at most `within`);
/// the time it took. On failure, shows the server's log.
pub async fn until_ready(
    client: &reqwest::Client,
    base: &str,
    want: u16,
    within: Duration,
    log: &Path,
) -> Duration {
    let started = Instant::now();
    loop {
        if let Ok(r) = client.get(format!("{base}/health/ready")).send().await {
            if r.status().as_u16() == want {
                return started.elapsed();
            }
        }
        assert!(
            started.elapsed() < within,
            "{base} never answered {want} on /health/ready; its log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
