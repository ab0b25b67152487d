//! The reference deployment (docs/deploy.md), run for real: three `muse
//! serve` processes on one PostgreSQL database and one Redis, behind nginx
//! (`deploy/nginx/muse.conf` itself, on loopback ports). Run when
//! `TEST_DATABASE_URL` and `TEST_REDIS_URL` are set (as in CI; `just test`
//! installs nginx then); skipped otherwise.
//!
//! Checked through nginx: a token works on every replica; a 10-request
//! quota admits exactly 10 of 40 concurrent calls spread over the three;
//! a suspension is enforced on the next request everywhere; an SSE answer
//! streams through nginx chunk by chunk; a replica stopped with SIGTERM
//! and restarted under load costs no request.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr
)]

use std::process::{Child, Command};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use muse_persistence::testing::TestDb;
use serde_json::{json, Value};

mod common;
use common::free_port;

/// An OpenAI-protocol upstream: whole answers at once; streams of 5 chunks
/// 100 ms apart.
async fn upstream() -> String {
    use actix_web::web::Bytes;
    use actix_web::{web, App, HttpResponse, HttpServer};
    let srv = HttpServer::new(|| {
        App::new().route(
            "/v1/chat/completions",
            web::post().to(|body: web::Json<Value>| async move {
                if !body["stream"].as_bool().unwrap_or(false) {
                    return HttpResponse::Ok().json(json!({
                        "id": "r", "object": "chat.completion", "created": 1, "model": "ok",
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop", "logprobs": null}],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
                    }));
                }
                let chunk = |delta: Value, finish: Value, usage: Value| {
                    let choices = if delta.is_null() { json!([]) } else {
                        json!([{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}])
                    };
                    Bytes::from(format!("data: {}\n\n", json!({"id": "s", "object": "chat.completion.chunk", "created": 1, "model": "ok", "choices": choices, "usage": usage})))
                };
                let mut frames: Vec<Bytes> = (0..5).map(|i| chunk(json!({"content": format!("t{i} ")}), Value::Null, Value::Null)).collect();
                frames.push(chunk(json!({}), json!("stop"), Value::Null));
                frames.push(chunk(Value::Null, Value::Null, json!({"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8})));
                frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
                let stream = futures_util::stream::iter(frames.into_iter().enumerate()).then(|(i, f)| async move {
                    if i > 0 && i < 5 {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Ok::<_, actix_web::Error>(f)
                });
                HttpResponse::Ok().content_type("text/event-stream").streaming(stream)
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

use futures_util::StreamExt;

struct Replica {
    child: Child,
}

fn replica(port: u16, db: &str, redis: &str, up: &str, data: &std::path::Path) -> Replica {
    let log = data.with_file_name(format!("replica-{port}.log"));
    let mut cmd = common::serve_command(port, data, &log);
    let child = common::with_upstream(&mut cmd, up, "ok")
        .env("DATABASE_URL", db)
        .env("REDIS_URL", redis)
        .env(
            "JWT_SECRET",
            "replicas-test-secret-0123456789-abcdefghijklmnop",
        )
        .env("WORKERS", "1")
        .env("TRUST_PROXY_HEADERS", "true")
        .env("SHUTDOWN_DELAY_MS", "300")
        .env("TRAINING_WORKERS", "0")
        // Thousands of calls from one client address and one user.
        .env("RATE_LIMIT_ENABLED", "false")
        .spawn()
        .unwrap();
    Replica { child }
}

async fn wait_ready(client: &reqwest::Client, port: u16, dir: &std::path::Path) {
    let log = dir.join(format!("replica-{port}.log"));
    common::until_ready(
        client,
        &format!("http://127.0.0.1:{port}"),
        200,
        Duration::from_secs(60),
        &log,
    )
    .await;
}

fn sigterm(child: &Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

#[actix_web::test]
async fn three_replicas_behind_nginx() {
    let (Ok(pg), Ok(redis)) = (
        std::env::var("TEST_DATABASE_URL"),
        std::env::var("TEST_REDIS_URL"),
    ) else {
        eprintln!("skipping: set TEST_DATABASE_URL and TEST_REDIS_URL (as CI does)");
        return;
    };
    assert!(
        Command::new("nginx").arg("-v").output().is_ok(),
        "nginx is required with TEST_DATABASE_URL and TEST_REDIS_URL (just test installs it)"
    );
    let db = TestDb::postgres(pg.trim());
    let dir = std::env::temp_dir().join(format!("muse-replicas-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_muse"))
        .arg("migrate")
        .env_clear()
        .env("DATABASE_URL", &db.url)
        .env("MUSE_DATA_DIR", dir.join("data"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let up = upstream().await;
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut replicas: Vec<Replica> = ports
        .iter()
        .map(|p| replica(*p, &db.url, &redis, &up, &dir.join("data")))
        .collect();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    for p in &ports {
        wait_ready(&client, *p, &dir).await;
    }
    let lb_port = free_port();
    let lb = common::nginx::start(&dir, lb_port, &ports);
    let base = format!("http://127.0.0.1:{lb_port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while client
        .get(format!("{base}/health/live"))
        .send()
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "nginx did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let post = |path: &str, token: Option<&str>, body: Value| {
        let mut r = client.post(format!("{base}{path}")).json(&body);
        if let Some(t) = token {
            r = r.bearer_auth(t.to_string());
        }
        r.send()
    };
    let admin = common::login(&client, &base, common::ADMIN_EMAIL, common::ADMIN_PASSWORD).await;
    post(
        "/api/v1/auth/register",
        None,
        json!({"email": "multi@example.com", "username": "multi", "password": "a long passphrase"}),
    )
    .await
    .unwrap();
    let token = common::login(&client, &base, "multi@example.com", "a long passphrase").await;
    let user_id = client
        .get(format!("{base}/api/v1/auth/me"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();

    // A token issued through one replica works on all (round robin).
    for p in &ports {
        let r = client
            .get(format!("http://127.0.0.1:{p}/api/v1/auth/me"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "replica {p}: {}", r.status());
    }

    // A 10-request quota: exactly 10 of 40 concurrent calls, over three replicas.
    let set_plan = |limits: Value| {
        let mut body = json!({"name": "Free", "price_cents": 0});
        body.as_object_mut()
            .unwrap()
            .extend(limits.as_object().unwrap().clone());
        client
            .put(format!("{base}/api/v1/admin/plans/free"))
            .bearer_auth(&admin)
            .json(&body)
            .send()
    };
    assert!(set_plan(json!({"max_requests": 10}))
        .await
        .unwrap()
        .status()
        .is_success());
    // Plans are cached up to AUTH_CACHE_TTL_MS on the replicas that did not
    // make the change.
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    let chat =
        json!({"model": "up/ok", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
    let calls = (0..40).map(|_| {
        let (client, token, chat, url) = (
            client.clone(),
            token.clone(),
            chat.clone(),
            format!("{base}/v1/chat/completions"),
        );
        actix_web::rt::spawn(async move {
            client
                .post(url)
                .bearer_auth(token)
                .json(&chat)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    });
    let mut statuses = Vec::new();
    for c in calls.collect::<Vec<_>>() {
        statuses.push(c.await.unwrap());
    }
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 402).count();
    assert_eq!((admitted, refused), (10, 30), "{statuses:?}");
    assert!(set_plan(json!({})).await.unwrap().status().is_success());
    tokio::time::sleep(Duration::from_millis(2_200)).await;

    // A suspension applies to the next request on every replica.
    let r = post(
        &format!("/api/v1/admin/users/{user_id}/suspend"),
        Some(&admin),
        json!({}),
    )
    .await
    .unwrap();
    assert!(r.status().is_success());
    for p in &ports {
        let r = client
            .get(format!("http://127.0.0.1:{p}/api/v1/auth/me"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 403, "replica {p}");
    }
    let r = post(
        &format!("/api/v1/admin/users/{user_id}/unsuspend"),
        Some(&admin),
        json!({}),
    )
    .await
    .unwrap();
    assert!(r.status().is_success());

    // SSE through nginx: chunks arrive as the model writes them.
    let mut stream_body = chat.clone();
    stream_body["stream"] = json!(true);
    let started = Instant::now();
    let res = post("/v1/chat/completions", Some(&token), stream_body)
        .await
        .unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    let mut first = None;
    let mut text = String::new();
    let mut body = res.bytes_stream();
    while let Some(b) = body.next().await {
        let b = b.unwrap();
        if first.is_none() && String::from_utf8_lossy(&b).contains("t0") {
            first = Some(started.elapsed());
        }
        text.push_str(&String::from_utf8_lossy(&b));
    }
    let total = started.elapsed();
    let first = first.expect("the first token came through");
    assert!(
        text.contains("t4") && text.trim_end().ends_with("data: [DONE]"),
        "{text}"
    );
    assert!(
        first + Duration::from_millis(250) < total,
        "the first token ({first:?}) came long before the end ({total:?}): not buffered"
    );

    // A replica stopped with SIGTERM and restarted under load costs no request.
    let failures = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let stop_at = Instant::now() + Duration::from_secs(4);
    let loops: Vec<_> = (0..8)
        .map(|_| {
            let (client, token, chat, url, failures, done) = (
                client.clone(),
                token.clone(),
                chat.clone(),
                format!("{base}/v1/chat/completions"),
                failures.clone(),
                done.clone(),
            );
            actix_web::rt::spawn(async move {
                while Instant::now() < stop_at {
                    match client
                        .post(&url)
                        .bearer_auth(&token)
                        .json(&chat)
                        .send()
                        .await
                    {
                        Ok(r) if r.status().is_success() => {
                            done.fetch_add(1, Ordering::SeqCst);
                        }
                        other => {
                            if failures.fetch_add(1, Ordering::SeqCst) == 0 {
                                eprintln!("first failure: {:?}", other.map(|r| r.status()));
                            }
                        }
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    sigterm(&replicas[0].child);
    let _ = replicas[0].child.wait();
    replicas[0] = replica(ports[0], &db.url, &redis, &up, &dir.join("data"));
    wait_ready(&client, ports[0], &dir).await;
    for l in loops {
        l.await.unwrap();
    }
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "{} calls answered, some failed during the restart",
        done.load(Ordering::SeqCst)
    );
    assert!(done.load(Ordering::SeqCst) > 50);

    drop(lb);
    for r in &mut replicas {
        let _ = r.child.kill();
        let _ = r.child.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
}
