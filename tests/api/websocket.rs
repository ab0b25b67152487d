//! The WebSocket protocol end to end (docs/websocket.md), with awc as the
//! client: handshake auth, generations and executions, cancellation that
//! stops the upstream call, errors as messages, limits, idle timeout.

use std::sync::atomic::Ordering;
use std::time::Duration;

use actix_web::web::Bytes;
use awc::ws::{Frame, Message};
use futures_util::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::*;
use crate::upstream::app_with_upstream;

type Ws = actix_codec::Framed<awc::BoxedSocket, awc::ws::Codec>;

pub(crate) async fn connect(app: &TestApp, token: &str) -> Ws {
    let ticket = app
        .post("/api/v1/ai/stream/ticket", Some(token), json!({}))
        .await;
    let t = ticket.body["ticket"].as_str().unwrap();
    let url = format!(
        "{}/ws/tab-1?ticket={t}",
        app.base.replace("http://", "ws://")
    );
    let (res, ws) = awc::Client::new().ws(url).connect().await.unwrap();
    assert_eq!(res.status().as_u16(), 101);
    ws
}

pub(crate) async fn send(ws: &mut Ws, msg: Value) {
    ws.send(Message::Text(msg.to_string().into()))
        .await
        .unwrap();
}

/// The next JSON message (pings are answered, other control frames skipped).
pub(crate) async fn recv(ws: &mut Ws) -> Value {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a message within 10 s")
            .expect("socket open")
            .unwrap();
        match frame {
            Frame::Text(b) => return serde_json::from_slice(&b).unwrap(),
            Frame::Ping(b) => ws.send(Message::Pong(b)).await.unwrap(),
            Frame::Close(reason) => {
                return json!({"type": "closed", "reason": format!("{reason:?}")})
            }
            _ => {}
        }
    }
}

/// Messages until one of `id` has a type in `until`.
pub(crate) async fn until(ws: &mut Ws, id: &str, until: &[&str]) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let m = recv(ws).await;
        let end = m["id"] == id && until.contains(&m["type"].as_str().unwrap_or_default());
        seen.push(m);
        if end {
            return seen;
        }
    }
}

#[actix_web::test]
async fn generations_stream_cancel_and_bad_input_becomes_error_messages() {
    // A price for the unpriced test models: a cancelled call's cost shows.
    let (app, up) = app_with_upstream(&[("UNPRICED_MODEL_PRICE", "1,2")]).await;
    let token = access(&app.user("socket").await);

    // The handshake needs credentials; a ticket works once.
    let anon = awc::Client::new()
        .ws(format!("{}/ws/tab", app.base.replace("http://", "ws://")))
        .connect()
        .await;
    match anon {
        Err(awc::error::WsClientError::InvalidResponseStatus(s)) => assert_eq!(s.as_u16(), 401),
        other => panic!("{:?}", other.map(|r| r.0.status())),
    }
    let mut ws = connect(&app, &token).await;
    let ready = recv(&mut ws).await;
    assert_eq!(
        (ready["type"].as_str(), ready["session_id"].as_str()),
        (Some("ready"), Some("tab-1"))
    );
    assert_eq!(ready["limits"]["max_concurrent"], 4);

    // Ping, and bad input of every kind answered in place.
    send(&mut ws, json!({"type": "ping", "id": "p1"})).await;
    assert_eq!(recv(&mut ws).await, json!({"type": "pong", "id": "p1"}));
    ws.send(Message::Text("not json".into())).await.unwrap();
    assert_eq!(recv(&mut ws).await["error"]["code"], "invalid_message");
    ws.send(Message::Binary(Bytes::from_static(b"\x00\x01")))
        .await
        .unwrap();
    assert_eq!(recv(&mut ws).await["error"]["code"], "unsupported_message");
    send(
        &mut ws,
        json!({"type": "generate", "id": "big", "prompt": "x".repeat(70_000)}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["error"]["code"], "message_too_large");
    send(&mut ws, json!({"type": "teleport", "id": "t"})).await;
    assert_eq!(recv(&mut ws).await["error"]["code"], "unknown_type");
    send(
        &mut ws,
        json!({"type": "generate", "id": "v", "creativity": 99}),
    )
    .await;
    let invalid = recv(&mut ws).await;
    assert_eq!(
        (invalid["id"].as_str(), invalid["error"]["code"].as_str()),
        (Some("v"), Some("validation_failed"))
    );
    send(&mut ws, json!({"type": "cancel", "id": "nothing"})).await;
    assert_eq!(recv(&mut ws).await["error"]["code"], "not_running");

    // A generation: started, tokens, done with usage, cost and ids.
    send(
        &mut ws,
        json!({"type": "generate", "id": "g1", "prompt": "a quiet garden", "model": "up/echo"}),
    )
    .await;
    let msgs = until(&mut ws, "g1", &["done", "error"]).await;
    assert_eq!(msgs[0]["type"], "started");
    let text: String = msgs
        .iter()
        .filter(|m| m["type"] == "token")
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert!(text.contains("Request: a quiet garden"), "{text}");
    let done = msgs.last().unwrap();
    assert_eq!(done["type"], "done", "{done}");
    assert!(done["idea_id"].is_string() && done["execution_id"].is_string());
    assert_eq!(done["usage"]["prompt_tokens"], 12);

    // Two at once; cancelling one stops its upstream stream, the other finishes.
    send(
        &mut ws,
        json!({"type": "generate", "id": "slow", "prompt": "x", "model": "up/slow"}),
    )
    .await;
    let mut tokens = 0;
    while tokens < 5 {
        let m = recv(&mut ws).await;
        if m["type"] == "token" {
            tokens += 1;
        }
    }
    send(
        &mut ws,
        json!({"type": "generate", "id": "fast", "prompt": "y", "model": "up/ok"}),
    )
    .await;
    send(&mut ws, json!({"type": "cancel", "id": "slow"})).await;
    let mut cancelled = None;
    let mut fast_done = false;
    while cancelled.is_none() || !fast_done {
        let m = recv(&mut ws).await;
        match (m["type"].as_str(), m["id"].as_str()) {
            (Some("cancelled"), Some("slow")) => cancelled = Some(m),
            (Some("done"), Some("fast")) => fast_done = true,
            (Some("done"), Some("slow")) => panic!("the cancelled generation finished"),
            _ => {}
        }
    }
    let exec_id = cancelled.unwrap()["execution_id"]
        .as_str()
        .unwrap()
        .to_string();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = up.sent.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        up.sent.load(Ordering::SeqCst),
        after,
        "the upstream stream was dropped"
    );
    assert!(after < 400);
    let exec = app
        .get(&format!("/api/v1/executions/{exec_id}"), Some(&token))
        .await;
    assert_eq!(exec.body["status"], "cancelled", "{}", exec.text);
    assert!(exec.body["output"]
        .as_str()
        .unwrap()
        .starts_with("t0 t1 t2 t3 t4"));
    // What was spent before the cancel is recorded (estimated): the prompt,
    // a token per chunk received, and their cost.
    let (p, c) = (
        exec.body["prompt_tokens"].as_u64().unwrap(),
        exec.body["completion_tokens"].as_u64().unwrap(),
    );
    assert!(p > 0 && c >= 5, "{}", exec.text);
    let cost = exec.body["cost"].as_f64().unwrap();
    assert!(
        (cost - (p as f64 + c as f64 * 2.0) / 1e6).abs() < 1e-12,
        "{}",
        exec.text
    );

    // At most 4 at once per socket; a duplicate id is refused.
    for i in 0..4 {
        send(
            &mut ws,
            json!({"type": "generate", "id": format!("s{i}"), "prompt": "x", "model": "up/slow"}),
        )
        .await;
    }
    send(
        &mut ws,
        json!({"type": "generate", "id": "s0", "prompt": "x", "model": "up/slow"}),
    )
    .await;
    send(
        &mut ws,
        json!({"type": "generate", "id": "s4", "prompt": "x", "model": "up/slow"}),
    )
    .await;
    // Every one of the four starts (its execution exists from then on:
    // what is cancelled before it starts never reached a model).
    let mut codes = Vec::new();
    let mut started = std::collections::BTreeSet::new();
    while codes.len() < 2 || started.len() < 4 {
        let m = recv(&mut ws).await;
        if m["type"] == "error" {
            codes.push(m["error"]["code"].as_str().unwrap().to_string());
        }
        if m["type"] == "started" {
            started.insert(m["id"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(codes, ["duplicate_id", "too_many_generations"]);
    send(&mut ws, json!({"type": "cancel", "id": "s0"})).await;
    until(&mut ws, "s0", &["cancelled"]).await;

    // Prompt executions too, with the variables errors as a message.
    send(&mut ws, json!({"type": "execute", "id": "e1", "prompt_id": "01930000-0000-7000-8000-000000000010", "variables": {"creativity": 11}, "llm_provider": "up", "llm_model": "echo"})).await;
    let e = until(&mut ws, "e1", &["error", "done"])
        .await
        .pop()
        .unwrap();
    assert_eq!(e["error"]["code"], "invalid_variables", "{e}");
    let mut paths: Vec<&str> = e["error"]["details"]["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["path"].as_str().unwrap())
        .collect();
    paths.sort();
    assert_eq!(paths, ["/creativity", "/prompt"]);

    // Closing the socket cancels what still runs; each is recorded.
    ws.close().await.unwrap();
    drop(ws);
    // The records are written as the generations stop: wait for them (bounded).
    let mut h = app
        .get("/api/v1/executions/history?status=cancelled", Some(&token))
        .await;
    for _ in 0..50 {
        if h.body["total"] == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        h = app
            .get("/api/v1/executions/history?status=cancelled", Some(&token))
            .await;
    }
    assert_eq!(h.body["total"], 5, "{}", h.text);
}

#[actix_web::test]
async fn an_idle_socket_is_closed() {
    let (app, _up) = app_with_upstream(&[("WS_IDLE_TIMEOUT_SECS", "1")]).await;
    let token = access(&app.user("idle").await);
    let mut ws = connect(&app, &token).await;
    assert_eq!(recv(&mut ws).await["type"], "ready");
    // Read without answering pings: the server gives up after 1 s.
    let started = std::time::Instant::now();
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
        {
            Some(Ok(Frame::Close(reason))) => break reason,
            Some(Ok(_)) => continue,
            other => panic!("{other:?}"),
        }
    };
    assert!(format!("{closed:?}").contains("idle timeout"), "{closed:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    let r = app.get("/ws/bad%20id", Some(&token)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

/// A client that stops reading slows its generation down: the server reads
/// the upstream only as fast as the socket drains (bounded queues, no
/// unbounded buffering).
#[actix_web::test]
async fn a_slow_reader_gets_backpressure_not_an_unbounded_buffer() {
    let (app, up) = app_with_upstream(&[]).await;
    let token = access(&app.user("slowreader").await);
    let mut ws = connect(&app, &token).await;
    assert_eq!(recv(&mut ws).await["type"], "ready");
    send(
        &mut ws,
        json!({"type": "generate", "id": "f", "prompt": "x", "model": "up/flood"}),
    )
    .await;
    // Read a few messages, then stop reading for a while.
    let mut tokens = 0;
    while tokens < 10 {
        if recv(&mut ws).await["type"] == "token" {
            tokens += 1;
        }
    }
    // Wait until the upstream stops being read (the buffers are full).
    let mut last = usize::MAX;
    let mut later = up.sent.load(Ordering::SeqCst);
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        last = later;
        later = up.sent.load(Ordering::SeqCst);
        if later == last {
            break;
        }
    }
    // 50 MB were on offer; only what the kernel's socket buffers and the
    // bounded queues (64 + 32 messages) hold was read from the upstream.
    assert_eq!(
        last, later,
        "the upstream is still being read without a reader"
    );
    assert!(
        later < 40_000,
        "read {later} of 50000 chunks without a reader"
    );
    // Reading again resumes the stream.
    let mut read = 0;
    while up.sent.load(Ordering::SeqCst) == later {
        recv(&mut ws).await;
        read += 1;
        assert!(read < 50_000, "the upstream never resumed");
    }
    send(&mut ws, json!({"type": "cancel", "id": "f"})).await;
    until(&mut ws, "f", &["cancelled"]).await;
}

/// An open socket stops serving a caller who lost access: its next message
/// is refused with the error and the socket closed (deleted API key,
/// suspension), so no billable generation starts after a revocation.
#[actix_web::test]
async fn an_open_socket_stops_serving_a_revoked_caller() {
    let (app, _up) = app_with_upstream(&[
        ("ADMIN_EMAIL", "root@example.com"),
        ("ADMIN_PASSWORD", "an admin passphrase"),
    ])
    .await;
    let admin = root_token(&app).await;
    let token = access(&app.user("revoked").await);
    let user_id = app.get("/api/v1/auth/me", Some(&token)).await.body["id"]
        .as_str()
        .unwrap()
        .to_string();
    let created = app
        .post("/api/v1/auth/api-keys", Some(&token), json!({"name": "ws"}))
        .await;
    let (key, key_id) = (
        created.body["key"].as_str().unwrap().to_string(),
        created.body["id"].as_str().unwrap().to_string(),
    );
    let open = |credential: String| {
        let url = format!("{}/ws/revoke", app.base.replace("http://", "ws://"));
        async move {
            let (res, mut ws) = awc::Client::new()
                .ws(url)
                .bearer_auth(credential)
                .connect()
                .await
                .unwrap();
            assert_eq!(res.status().as_u16(), 101);
            assert_eq!(recv(&mut ws).await["type"], "ready");
            ws
        }
    };

    // A deleted key.
    let mut ws = open(key.clone()).await;
    send(&mut ws, json!({"type": "ping", "id": "a"})).await;
    assert_eq!(recv(&mut ws).await["type"], "pong");
    let r = app
        .call(
            reqwest::Method::DELETE,
            &format!("/api/v1/auth/api-keys/{key_id}"),
            Some(&token),
            None,
        )
        .await;
    assert!(r.status.is_success(), "{}", r.text);
    send(&mut ws, json!({"type": "generate", "id": "g", "llm_provider": "up", "llm_model": "ok", "prompt": "x"})).await;
    let m = recv(&mut ws).await;
    assert_eq!(
        (m["type"].as_str(), m["error"]["code"].as_str()),
        (Some("error"), Some("unauthorized")),
        "{m}"
    );
    assert_eq!(recv(&mut ws).await["type"], "closed");

    // A suspension.
    let mut ws = open(token.clone()).await;
    send(&mut ws, json!({"type": "ping", "id": "b"})).await;
    assert_eq!(recv(&mut ws).await["type"], "pong");
    let r = app
        .post(
            &format!("/api/v1/admin/users/{user_id}/suspend"),
            Some(&admin),
            json!({}),
        )
        .await;
    assert!(r.status.is_success(), "{}", r.text);
    send(&mut ws, json!({"type": "ping", "id": "c"})).await;
    let m = recv(&mut ws).await;
    assert_eq!(m["error"]["code"], "account_suspended", "{m}");
    assert_eq!(recv(&mut ws).await["type"], "closed");
}

/// Two replicas sharing Redis, callers cached for a minute: a key deleted
/// on one replica stops a socket open with it on the other at its next
/// message — the revocation travels over Redis (the socket relies on that
/// relay instead of checking its caller again every AUTH_CACHE_TTL_MS).
#[actix_web::test]
async fn a_socket_on_another_replica_stops_serving_a_revoked_key() {
    let Ok(redis) = std::env::var("TEST_REDIS_URL") else {
        eprintln!("skipping: TEST_REDIS_URL is not set");
        return;
    };
    let shared = [
        ("REDIS_URL", redis.as_str()),
        ("AUTH_CACHE_TTL_MS", "60000"),
    ];
    let (a, up) = app_with_upstream(&shared).await;
    let b = crate::upstream::another_replica(&a, &up, &shared).await;
    // Let both subscribe.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let token = access(&a.user("relayed").await);
    let created = a
        .post("/api/v1/auth/api-keys", Some(&token), json!({"name": "ws"}))
        .await;
    let (key, key_id) = (
        created.body["key"].as_str().unwrap().to_string(),
        created.body["id"].as_str().unwrap().to_string(),
    );
    let (res, mut ws) = awc::Client::new()
        .ws(format!("{}/ws/relay", b.base.replace("http://", "ws://")))
        .bearer_auth(key)
        .connect()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 101);
    assert_eq!(recv(&mut ws).await["type"], "ready");
    send(&mut ws, json!({"type": "ping", "id": "a"})).await;
    assert_eq!(recv(&mut ws).await["type"], "pong");

    let r = a
        .call(
            reqwest::Method::DELETE,
            &format!("/api/v1/auth/api-keys/{key_id}"),
            Some(&token),
            None,
        )
        .await;
    assert!(r.status.is_success(), "{}", r.text);
    let started = std::time::Instant::now();
    loop {
        send(&mut ws, json!({"type": "ping", "id": "p"})).await;
        let m = recv(&mut ws).await;
        if m["type"] == "error" {
            assert_eq!(m["error"]["code"], "unauthorized", "{m}");
            assert_eq!(recv(&mut ws).await["type"], "closed");
            break;
        }
        assert_eq!(m["type"], "pong", "{m}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the other replica's socket kept serving a deleted key"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "a key deleted on one replica closed a socket on the other after {:?}",
        started.elapsed()
    );
}
