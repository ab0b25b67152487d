//! What the process tests share: ports, an instant OpenAI-protocol
//! upstream, and waiting for a `muse serve` to become ready.
#![allow(dead_code, clippy::unwrap_used, clippy::panic)]

pub mod nginx;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The admin every process test's server creates (`ADMIN_EMAIL`).
pub const ADMIN_EMAIL: &str = "root@example.com";
pub const ADMIN_PASSWORD: &str = "an admin passphrase";

/// `muse serve` on `port` with nothing from this process's environment
/// but `PATH`: `data` as `MUSE_DATA_DIR`, the test admin, a cheap bcrypt
/// cost, warnings and errors to `log`. Callers add their settings.
pub fn serve_command(port: u16, data: &Path, log: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_muse"));
    cmd.arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("MUSE_DATA_DIR", data)
        .env("PORT", port.to_string())
        .env("BCRYPT_COST", "4")
        .env("ADMIN_EMAIL", ADMIN_EMAIL)
        .env("ADMIN_PASSWORD", ADMIN_PASSWORD)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    cmd
}

/// Offers `models` of the test upstream at `up` as the `up` provider,
/// without retries.
pub fn with_upstream<'a>(cmd: &'a mut Command, up: &str, models: &str) -> &'a mut Command {
    cmd.env("OPENAI_COMPATIBLE_BASE_URL", up)
        .env("OPENAI_COMPATIBLE_NAME", "up")
        .env("OPENAI_COMPATIBLE_MODELS", models)
        .env("LLM_MAX_RETRIES", "0")
}

/// Logs in at `{base}/api/v1/auth/login`; the access token.
pub async fn login(client: &reqwest::Client, base: &str, email: &str, password: &str) -> String {
    let res = client
        .post(format!("{base}/api/v1/auth/login"))
        .json(&json!({"email": email, "password": password}))
        .send()
        .await
        .unwrap();
    let body: Value = res.json().await.unwrap();
    body["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no access token: {body}"))
        .to_string()
}

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
