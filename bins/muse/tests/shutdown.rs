//! A stream still open when a stopping server's grace period runs out ends
//! with an error event (`server_shutting_down`) and, on `/v1`, `[DONE]` —
//! not a connection cut mid-frame — and the process exits.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr
)]

use std::process::Command;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

mod common;
use common::free_port;

/// An OpenAI-protocol upstream whose streams send a token every 200 ms
/// for a minute.
async fn slow_upstream() -> String {
    use actix_web::web::Bytes;
    use actix_web::{web, App, HttpResponse, HttpServer};
    let srv = HttpServer::new(|| {
        App::new().route(
            "/v1/chat/completions",
            web::post().to(|| async {
                let stream = futures_util::stream::iter(0..300).then(|i| async move {
                    if i > 0 {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    let chunk = json!({"id": "s", "object": "chat.completion.chunk", "created": 1, "model": "slow",
                        "choices": [{"index": 0, "delta": {"content": format!("t{i} ")}, "finish_reason": null, "logprobs": null}]});
                    Ok::<_, actix_web::Error>(Bytes::from(format!("data: {chunk}\n\n")))
                });
                HttpResponse::Ok().content_type("text/event-stream").streaming(stream)
            }),
        )
    })
    .workers(1)
    .bind(("127.0.0.1", 0))
    .unwrap();
    let addr = srv.addrs()[0];
    actix_web::rt::spawn(srv.run());
    format!("http://{addr}/v1")
}

#[actix_web::test]
async fn streams_open_at_the_grace_deadline_end_with_an_error_event() {
    let dir = std::env::temp_dir().join(format!("muse-shutdown-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let up = slow_upstream().await;
    let port = free_port();
    let log = dir.join("serve.log");
    let mut cmd = common::serve_command(port, &dir.join("data"), &log);
    let mut child = common::with_upstream(&mut cmd, &up, "slow")
        .env("SHUTDOWN_GRACE_SECS", "2")
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    common::until_ready(&client, &base, 200, Duration::from_secs(60), &log).await;
    let token = common::login(&client, &base, common::ADMIN_EMAIL, common::ADMIN_PASSWORD).await;
    let res = client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&token)
        .json(&json!({"model": "up/slow", "stream": true, "messages": [{"role": "user", "content": "go on"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    let mut body = res.bytes_stream();
    // Tokens are flowing.
    let mut seen = String::new();
    while !seen.contains("t0") {
        let chunk = body.next().await.unwrap().unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }

    let stopped = Instant::now();
    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let mut rest = Vec::new();
    while let Some(chunk) = body.next().await {
        rest.extend_from_slice(&chunk.expect("the stream ends cleanly, not cut"));
    }
    let rest = String::from_utf8_lossy(&rest);
    let cut_after = stopped.elapsed();
    assert!(
        rest.trim_end().ends_with("data: [DONE]"),
        "no [DONE] at the end: {}",
        &rest[rest.len().saturating_sub(400)..]
    );
    let last = rest
        .trim_end()
        .trim_end_matches("data: [DONE]")
        .trim_end()
        .rsplit("data: ")
        .next()
        .unwrap()
        .to_string();
    let last: Value = serde_json::from_str(&last).unwrap_or_else(|_| panic!("{last}"));
    assert_eq!(last["error"]["code"], "server_shutting_down", "{last}");
    assert!(
        cut_after >= Duration::from_millis(1000),
        "streams run until just before the 2 s grace period ends: {cut_after:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(Instant::now() < deadline, "muse did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("stream ended with server_shutting_down {cut_after:?} after SIGTERM");
    let _ = std::fs::remove_dir_all(&dir);
}
