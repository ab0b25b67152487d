//! Plans and quotas end to end: usage counted and reconciled, the quota
//! refusing with the documented error, exactly the quota under 100
//! concurrent requests, admin plan changes, cancellation, history.

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::*;
use crate::upstream::app_with_upstream;

fn chat() -> serde_json::Value {
    json!({"model": "up/ok", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16})
}

#[actix_web::test]
async fn a_free_user_hits_the_quota_and_an_admin_upgrades_them() {
    let (app, _up) = app_with_upstream(&[
        ("ADMIN_EMAIL", "root@example.com"),
        ("ADMIN_PASSWORD", "an admin passphrase"),
    ])
    .await;
    let admin = root_token(&app).await;
    let token = access(&app.user("gina").await);
    let gina = app.get("/api/v1/auth/me", Some(&token)).await.body["id"]
        .as_str()
        .unwrap()
        .to_string();

    let plans = app.get("/api/v1/subscription/plans", None).await;
    assert_eq!(
        plans.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["id"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["free", "pro", "team"]
    );
    let info = app.get("/api/v1/subscription/info", Some(&token)).await;
    assert_eq!(
        (
            info.body["plan"]["id"].as_str(),
            info.body["usage"]["requests"].as_i64()
        ),
        (Some("free"), Some(0))
    );
    assert!(info.body["subscription"].is_null());

    // The admin makes the free plan tiny.
    let r = app
        .call(reqwest::Method::PUT, "/api/v1/admin/plans/free", Some(&admin), Some(json!({"name": "Free", "price_cents": 0, "max_requests": 3, "max_tokens": 100000, "max_batch": 2})))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = app
        .call(
            reqwest::Method::PUT,
            "/api/v1/admin/plans/free",
            Some(&token),
            Some(json!({"name": "x", "price_cents": 0})),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    for _ in 0..3 {
        assert_eq!(
            app.post("/v1/chat/completions", Some(&token), chat())
                .await
                .status,
            StatusCode::OK
        );
    }
    let r = app.post("/v1/chat/completions", Some(&token), chat()).await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::PAYMENT_REQUIRED, "quota_exceeded")
    );
    assert_eq!(
        (
            r.body["error"]["details"]["quota"].as_str(),
            r.body["error"]["details"]["plan"].as_str()
        ),
        (Some("requests"), Some("free"))
    );
    assert!(r.body["error"]["details"]["resets_at"]
        .as_str()
        .unwrap()
        .ends_with("-01T00:00:00.000Z"));
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry > 0 && retry <= 31 * 86_400);
    // Every path is gated: execute-prompt and ideas too.
    let r = app
        .post(
            "/api/v1/ai/generate",
            Some(&token),
            json!({"prompt": "x", "model": "up/ok"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
    // Usage was reconciled with the real tokens (12 + 4 per call).
    let u = app.get("/api/v1/subscription/usage", Some(&token)).await;
    assert_eq!(
        (
            u.body["requests"].as_i64(),
            u.body["tokens"].as_i64(),
            u.body["max_requests"].as_i64()
        ),
        (Some(3), Some(48), Some(3))
    );
    // The plan's batch size.
    let r = app
        .post(
            "/api/v1/ai/generate/batch",
            Some(&token),
            json!({"items": [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}]}),
        )
        .await;
    assert_eq!(
        (r.status, r.body["error"]["details"]["max_batch"].as_i64()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some(2))
    );

    // No payment provider: upgrading says so; an admin moves the user.
    let r = app
        .post("/api/v1/subscription/upgrade/pro", Some(&token), json!({}))
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::CONFLICT, "payments_not_configured")
    );
    let r = app
        .post("/api/v1/subscription/upgrade/gold", Some(&token), json!({}))
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = app
        .post("/api/v1/subscription/cancel", Some(&token), json!({}))
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::CONFLICT, "no_subscription")
    );
    let r = app
        .post(
            &format!("/api/v1/admin/users/{gina}/plan"),
            Some(&admin),
            json!({"plan_id": "pro"}),
        )
        .await;
    assert_eq!(
        (r.status, r.body["plan_id"].as_str()),
        (StatusCode::OK, Some("pro")),
        "{}",
        r.text
    );
    assert_eq!(
        app.post("/v1/chat/completions", Some(&token), chat())
            .await
            .status,
        StatusCode::OK
    );
    let info = app.get("/api/v1/subscription/info", Some(&token)).await;
    assert_eq!(
        (
            info.body["plan"]["id"].as_str(),
            info.body["subscription"]["status"].as_str()
        ),
        (Some("pro"), Some("active"))
    );
    assert_eq!(
        info.body["usage"]["requests"], 4,
        "the period's usage carries over"
    );

    // Plans can restrict models.
    app.call(
        reqwest::Method::PUT,
        "/api/v1/admin/plans/pro",
        Some(&admin),
        Some(json!({"name": "Pro", "price_cents": 1900, "allowed_models": ["local/*"]})),
    )
    .await;
    let r = app.post("/v1/chat/completions", Some(&token), chat()).await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::FORBIDDEN, "model_not_in_plan")
    );

    // Cancelling keeps the plan until the period ends.
    let r = app
        .post("/api/v1/subscription/cancel", Some(&token), json!({}))
        .await;
    assert_eq!(
        (r.status, r.body["cancel_at_period_end"].as_bool()),
        (StatusCode::OK, Some(true))
    );
    assert_eq!(
        app.get("/api/v1/subscription/info", Some(&token))
            .await
            .body["plan"]["id"],
        "pro"
    );
    let h = app
        .get("/api/v1/subscription/billing/history", Some(&token))
        .await;
    let kinds: Vec<&str> = h.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["cancellation_requested", "plan_changed"]);
    let a = app
        .get("/api/v1/admin/audit?event=plan.", Some(&admin))
        .await;
    let events: Vec<&str> = a.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        events,
        ["plan.edited", "plan.changed", "plan.edited"],
        "{}",
        a.text
    );
}

#[actix_web::test]
async fn a_hundred_concurrent_requests_never_pass_the_quota() {
    let (app, _up) = app_with_upstream(&[
        ("ADMIN_EMAIL", "root@example.com"),
        ("ADMIN_PASSWORD", "an admin passphrase"),
    ])
    .await;
    ten_requests_a_month(&app).await;
    let token = access(&app.user("hank").await);
    assert_eq!(hundred_calls_over([&app, &app], &token).await, (10, 90));
    let u = app.get("/api/v1/subscription/usage", Some(&token)).await;
    assert_eq!(u.body["requests"], 10);
}

/// An unpriced model cannot escape a cost quota: a vendor's model missing
/// from the catalogue is refused on plans with one, or counted at
/// UNPRICED_MODEL_PRICE when the operator sets it (which also prices
/// OpenAI-compatible servers, free otherwise).
#[actix_web::test]
async fn unpriced_models_do_not_escape_cost_quotas() {
    let vendor = vendor_server().await;
    for fallback in [None, Some("10000,10000")] {
        let mut env = vec![
            ("ADMIN_EMAIL", "root@example.com"),
            ("ADMIN_PASSWORD", "an admin passphrase"),
            ("OPENAI_API_KEY", "sk-test"),
            ("OPENAI_BASE_URL", vendor.as_str()),
            ("OPENAI_MODELS", "gpt-4o-mini,gpt-9-preview"),
        ];
        if let Some(f) = fallback {
            env.push(("UNPRICED_MODEL_PRICE", f));
        }
        let (app, _up) = app_with_upstream(&env).await;
        let admin = root_token(&app).await;
        let token = access(&app.user("costly").await);
        let unpriced = json!({"model": "openai/gpt-9-preview", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16});
        let priced = json!({"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16});
        // Without a cost quota, the unpriced vendor model is served.
        let r = app
            .call(
                reqwest::Method::PUT,
                "/api/v1/admin/plans/free",
                Some(&admin),
                Some(json!({"name": "Free", "price_cents": 0})),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let r = app
            .post("/v1/chat/completions", Some(&token), unpriced.clone())
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let r = app
            .call(
                reqwest::Method::PUT,
                "/api/v1/admin/plans/free",
                Some(&admin),
                Some(json!({"name": "Free", "price_cents": 0, "max_cost_usd": 1.0})),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let r = app
            .post("/v1/chat/completions", Some(&token), priced.clone())
            .await;
        assert_eq!(r.status, StatusCode::OK, "a priced model: {}", r.text);
        match fallback {
            None => {
                let r = app
                    .post("/v1/chat/completions", Some(&token), unpriced.clone())
                    .await;
                assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
                assert_eq!(r.body["error"]["code"], "model_unpriced", "{}", r.text);
                // A self-hosted OpenAI-compatible server costs nothing per token.
                let r = app.post("/v1/chat/completions", Some(&token), chat()).await;
                assert_eq!(r.status, StatusCode::OK, "{}", r.text);
            }
            Some(_) => {
                // 12 + 4 tokens at $10,000 per million: $0.16 a call, on
                // the compatible server too, until the $1 quota is spent.
                let r = app.post("/v1/chat/completions", Some(&token), chat()).await;
                assert_eq!(r.status, StatusCode::OK, "{}", r.text);
                let id = r.headers["x-muse-execution-id"]
                    .to_str()
                    .unwrap()
                    .to_string();
                let e = app
                    .get(&format!("/api/v1/executions/{id}"), Some(&token))
                    .await;
                assert!(
                    (e.body["cost"].as_f64().unwrap() - 0.16).abs() < 1e-9,
                    "{}",
                    e.text
                );
                let mut refused = None;
                for n in 0..10 {
                    let r = app.post("/v1/chat/completions", Some(&token), chat()).await;
                    if r.status != StatusCode::OK {
                        refused = Some((n, r));
                        break;
                    }
                }
                let (n, r) = refused.expect("the cost quota ends it");
                assert!(n <= 6, "{n} calls");
                assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED, "{}", r.text);
                assert_eq!(r.body["error"]["details"]["quota"], "cost", "{}", r.text);
            }
        }
    }
}

/// An OpenAI-protocol server standing for OpenAI itself: every model
/// answers "ok" (3 prompt + 1 completion tokens).
async fn vendor_server() -> String {
    use actix_web::{web, App, HttpResponse, HttpServer};
    let srv = HttpServer::new(|| {
        App::new().route(
            "/chat/completions",
            web::post().to(|body: web::Json<serde_json::Value>| async move {
                HttpResponse::Ok().json(json!({
                    "id": "v-1", "object": "chat.completion", "created": 1, "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop", "logprobs": null}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
                }))
            }),
        )
    })
    .workers(1)
    .bind(("127.0.0.1", 0))
    .unwrap();
    let addr = srv.addrs()[0];
    actix_web::rt::spawn(srv.run());
    format!("http://{addr}")
}

/// `MODEL_PRICES` (the settings file's `[model_prices]` table) prices calls,
/// over `MODEL_PRICES_FILE`.
#[actix_web::test]
async fn inline_model_prices_price_calls() {
    let file = std::env::temp_dir().join(format!(
        "muse-prices-{}.json",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::write(
        &file,
        r#"{"up/ok": {"input_per_million": 9, "output_per_million": 9}}"#,
    )
    .unwrap();
    let file_path = file.display().to_string();
    let (app, _up) = app_with_upstream(&[
        ("MODEL_PRICES_FILE", file_path.as_str()),
        (
            "MODEL_PRICES",
            r#"{"up/ok": {"input_per_million": 1000, "output_per_million": 2000}}"#,
        ),
    ])
    .await;
    let token = access(&app.user("priced").await);
    let r = app
        .post(
            "/v1/chat/completions",
            Some(&token),
            json!({"model": "up/ok", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let (prompt, completion) = (
        r.body["usage"]["prompt_tokens"].as_f64().unwrap(),
        r.body["usage"]["completion_tokens"].as_f64().unwrap(),
    );
    let history = app.get("/api/v1/executions/history", Some(&token)).await;
    let cost = history.body["items"][0]["cost"].as_f64().unwrap();
    assert!(
        (cost - (prompt + 2.0 * completion) / 1000.0).abs() < 1e-9,
        "{cost} for {prompt} + {completion} tokens at $1 and $2 per thousand"
    );
    let _ = std::fs::remove_file(file);
}

/// The admin (ADMIN_EMAIL root@example.com) gives the free plan a quota of
/// 10 requests a month.
async fn ten_requests_a_month(app: &crate::helpers::TestApp) {
    let admin = root_token(app).await;
    let r = app
        .call(
            reqwest::Method::PUT,
            "/api/v1/admin/plans/free",
            Some(&admin),
            Some(json!({"name": "Free", "price_cents": 0, "max_requests": 10})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
}

/// 100 concurrent calls against a quota of 10 through two replicas.
async fn hundred_calls_over(apps: [&crate::helpers::TestApp; 2], token: &str) -> (usize, usize) {
    let calls = (0..100).map(|i| {
        let app = apps[i % 2];
        let (client, url, token) = (
            app.client.clone(),
            format!("{}/v1/chat/completions", app.base),
            token.to_string(),
        );
        async move {
            client
                .post(url)
                .bearer_auth(token)
                .json(&chat())
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    let statuses = futures_util::future::join_all(calls).await;
    (
        statuses.iter().filter(|s| **s == StatusCode::OK).count(),
        statuses
            .iter()
            .filter(|s| **s == StatusCode::PAYMENT_REQUIRED)
            .count(),
    )
}

/// Two replicas on one database counting quotas on one Redis
/// (`QUOTA_STORE=redis`, `TEST_REDIS_URL`): 100 concurrent calls spread
/// over both admit exactly the quota, and the usage table gets exactly
/// what was admitted.
#[actix_web::test]
async fn a_hundred_concurrent_requests_over_two_replicas_never_pass_the_quota() {
    let Ok(redis) = std::env::var("TEST_REDIS_URL") else {
        eprintln!("skipping: TEST_REDIS_URL is not set");
        return;
    };
    let shared = [
        ("ADMIN_EMAIL", "root@example.com"),
        ("ADMIN_PASSWORD", "an admin passphrase"),
        ("REDIS_URL", redis.as_str()),
        ("QUOTA_STORE", "redis"),
    ];
    let (a, up) = app_with_upstream(&shared).await;
    let b = crate::upstream::another_replica(&a, &up, &shared).await;
    ten_requests_a_month(&a).await;
    let token = access(&a.user("ivy").await);
    assert_eq!(hundred_calls_over([&a, &b], &token).await, (10, 90));
    // The usage table gets the admitted calls by group commit.
    let u = b.get("/api/v1/subscription/usage", Some(&token)).await;
    assert_eq!(u.body["requests"], 10, "{}", u.text);
}

/// `QUOTA_STORE=redis` with Redis unreachable: calls are reserved in the
/// database instead — still served, still exact.
#[actix_web::test]
async fn quotas_hold_in_the_database_while_redis_is_unreachable() {
    let (app, _up) = app_with_upstream(&[
        ("ADMIN_EMAIL", "root@example.com"),
        ("ADMIN_PASSWORD", "an admin passphrase"),
        ("REDIS_URL", "redis://127.0.0.1:1"),
        ("QUOTA_STORE", "redis"),
    ])
    .await;
    ten_requests_a_month(&app).await;
    let token = access(&app.user("jade").await);
    assert_eq!(hundred_calls_over([&app, &app], &token).await, (10, 90));
    let u = app.get("/api/v1/subscription/usage", Some(&token)).await;
    assert_eq!(u.body["requests"], 10, "{}", u.text);
}
