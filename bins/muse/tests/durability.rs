//! No acknowledged call is ever unrecorded: `muse serve` (the real binary)
//! answers model calls at a high rate, is killed with SIGKILL in the middle,
//! and every call it answered 2xx has its execution in the database —
//! SQLite, and PostgreSQL when `TEST_DATABASE_URL` is set.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use muse_persistence::testing::TestDb;
use muse_persistence::{Database, DieselExecutionRepository};
use muse_prompts::{ExecutionRepository, ExecutionScope};
use serde_json::{json, Value};

mod common;

fn serve(db_url: &str, up: &str, port: u16, data: &std::path::Path) -> Child {
    let mut cmd = common::serve_command(port, data, &data.join("serve.log"));
    common::with_upstream(&mut cmd, up, "ok")
        .env("DATABASE_URL", db_url)
        .spawn()
        .unwrap()
}

async fn post(c: &reqwest::Client, url: String, token: Option<&str>, body: Value) -> Value {
    let mut r = c.post(url).json(&body);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    r.send().await.unwrap().json().await.unwrap()
}

#[actix_web::test]
async fn every_acknowledged_call_is_recorded_after_a_sigkill() {
    let db = TestDb::new();
    let data = tempfile_dir();
    let out = Command::new(env!("CARGO_BIN_EXE_muse"))
        .arg("migrate")
        .env_clear()
        .env("DATABASE_URL", &db.url)
        .env("MUSE_DATA_DIR", &data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let up = common::instant_upstream().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = serve(&db.url, &up, port, &data);
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while client.get(format!("{base}/health")).send().await.is_err() {
        assert!(Instant::now() < deadline, "muse serve did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // An admin lifts the free plan's quotas; a user gets an API key.
    let admin = common::login(&client, &base, common::ADMIN_EMAIL, common::ADMIN_PASSWORD).await;
    let r = client
        .put(format!("{base}/api/v1/admin/plans/free"))
        .bearer_auth(&admin)
        .json(&json!({"name": "Free", "price_cents": 0}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let _ = post(
        &client,
        format!("{base}/api/v1/auth/register"),
        None,
        json!({"email": "load@example.com", "username": "load", "password": "a long passphrase"}),
    )
    .await;
    let token = common::login(&client, &base, "load@example.com", "a long passphrase").await;
    let key = post(
        &client,
        format!("{base}/api/v1/auth/api-keys"),
        Some(&token),
        json!({"name": "load"}),
    )
    .await;
    let key = key["key"].as_str().unwrap().to_string();

    // 32 clients call as fast as they can; the server is killed mid-load.
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut clients = Vec::new();
    for _ in 0..32 {
        let (acked, key, url, client) = (
            acked.clone(),
            key.clone(),
            format!("{base}/v1/chat/completions"),
            client.clone(),
        );
        clients.push(actix_web::rt::spawn(async move {
            let body = json!({"model": "up/ok", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
            for _ in 0..100_000 {
                let Ok(res) = client.post(&url).bearer_auth(&key).json(&body).send().await else {
                    return;
                };
                if res.status().is_success() {
                    let id = res.headers()["x-muse-execution-id"].to_str().unwrap().to_string();
                    // Acknowledged only once the whole answer arrived.
                    if res.bytes().await.is_ok() {
                        acked.lock().unwrap().push(id);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    child.kill().unwrap();
    let _ = child.wait();
    for c in clients {
        let _ = c.await;
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 50,
        "only {} calls answered before the kill",
        acked.len()
    );

    let repo = DieselExecutionRepository::new(Database::connect(&db.url, 2).unwrap());
    let missing: Vec<&String> = acked
        .iter()
        .filter(|id| {
            repo.get(ExecutionScope::All, id.parse().unwrap())
                .unwrap()
                .is_none()
        })
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged calls have no execution: {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(5)]
    );
    let _ = std::fs::remove_dir_all(&data);
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir =
        std::env::temp_dir().join(format!("muse-durability-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
