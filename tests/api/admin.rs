//! The admin surface: users (search, suspend, role), statistics and the
//! audit log; the role is checked on every route.

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::*;
use crate::upstream::app_with_upstream;

#[actix_web::test]
async fn an_admin_manages_users_reads_stats_and_the_audit_log() {
    let (app, _up) = app_with_upstream(&[
        ("ADMIN_EMAIL", "root@example.com"),
        ("ADMIN_PASSWORD", "an admin passphrase"),
    ])
    .await;
    let admin_login = app
        .login("root@example.com", "an admin passphrase")
        .await
        .body;
    let admin = access(&admin_login);
    let admin_id = app.get("/api/v1/auth/me", Some(&admin)).await.body["id"]
        .as_str()
        .unwrap()
        .to_string();
    let carol = access(&app.user("carol").await);
    let dave = access(&app.user("dave").await);
    let carol_id = app.get("/api/v1/auth/me", Some(&carol)).await.body["id"]
        .as_str()
        .unwrap()
        .to_string();
    let carol_key = app
        .post("/api/v1/auth/api-keys", Some(&carol), json!({"name": "k"}))
        .await
        .body["key"]
        .as_str()
        .unwrap()
        .to_string();

    // Every admin route refuses a plain user.
    for (method, path) in [
        ("GET", "/api/v1/admin/stats".to_string()),
        ("GET", "/api/v1/admin/users".to_string()),
        ("GET", "/api/v1/admin/audit".to_string()),
        ("POST", format!("/api/v1/admin/users/{carol_id}/suspend")),
        ("POST", format!("/api/v1/admin/users/{carol_id}/unsuspend")),
        ("POST", format!("/api/v1/admin/users/{carol_id}/role")),
    ] {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let r = app
            .call(m, &path, Some(&dave), Some(json!({"role": "admin"})))
            .await;
        assert_eq!(
            (r.status, r.error_code()),
            (StatusCode::FORBIDDEN, "forbidden"),
            "{path}"
        );
    }

    // Search and filters.
    let all = app
        .get("/api/v1/admin/users?per_page=2", Some(&admin))
        .await;
    assert_eq!(
        (
            all.body["total"].as_u64(),
            all.body["items"].as_array().unwrap().len()
        ),
        (Some(3), 2)
    );
    let found = app.get("/api/v1/admin/users?q=CAR", Some(&admin)).await;
    assert_eq!(
        (
            found.body["total"].as_u64(),
            found.body["items"][0]["username"].as_str()
        ),
        (Some(1), Some("carol"))
    );
    let admins = app
        .get("/api/v1/admin/users?role=admin", Some(&admin))
        .await;
    assert_eq!(admins.body["total"], 1);
    let bad = app
        .get("/api/v1/admin/users?status=gone", Some(&admin))
        .await;
    assert_eq!(
        (bad.status, bad.error_code()),
        (StatusCode::BAD_REQUEST, "invalid_query_parameter")
    );

    // Suspension takes effect at once, for tokens and API keys alike.
    assert_eq!(
        app.get("/api/v1/auth/me", Some(&carol)).await.status,
        StatusCode::OK
    );
    let r = app
        .post(
            &format!("/api/v1/admin/users/{carol_id}/suspend"),
            Some(&admin),
            json!({}),
        )
        .await;
    assert_eq!(
        (r.status, r.body["status"].as_str()),
        (StatusCode::OK, Some("suspended")),
        "{}",
        r.text
    );
    for credential in [&carol, &carol_key] {
        let r = app.get("/api/v1/auth/me", Some(credential)).await;
        assert_eq!(
            (r.status, r.error_code()),
            (StatusCode::FORBIDDEN, "account_suspended")
        );
    }
    assert_eq!(
        app.get("/api/v1/admin/users?status=suspended", Some(&admin))
            .await
            .body["total"],
        1
    );
    let r = app
        .post(
            &format!("/api/v1/admin/users/{carol_id}/unsuspend"),
            Some(&admin),
            json!({}),
        )
        .await;
    assert_eq!(r.body["status"], "active");
    assert_eq!(
        app.get("/api/v1/auth/me", Some(&carol_key)).await.status,
        StatusCode::OK
    );

    // Guards: not yourself, not the last admin; unknown users are 404.
    let r = app
        .post(
            &format!("/api/v1/admin/users/{admin_id}/suspend"),
            Some(&admin),
            json!({}),
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::CONFLICT, "conflict")
    );
    let r = app
        .post(
            &format!("/api/v1/admin/users/{admin_id}/role"),
            Some(&admin),
            json!({"role": "user"}),
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::CONFLICT, "conflict")
    );
    let r = app
        .post(
            &format!("/api/v1/admin/users/{}/suspend", uuid::Uuid::now_v7()),
            Some(&admin),
            json!({}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = app
        .post(
            &format!("/api/v1/admin/users/{carol_id}/role"),
            Some(&admin),
            json!({"role": "king"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    // Promotion gives admin routes at once; then carol can be demoted again.
    let r = app
        .post(
            &format!("/api/v1/admin/users/{carol_id}/role"),
            Some(&admin),
            json!({"role": "admin"}),
        )
        .await;
    assert_eq!(r.body["role"], "admin");
    assert_eq!(
        app.get("/api/v1/admin/users", Some(&carol)).await.status,
        StatusCode::OK
    );
    let r = app
        .post(
            &format!("/api/v1/admin/users/{carol_id}/role"),
            Some(&admin),
            json!({"role": "user"}),
        )
        .await;
    assert_eq!(r.body["role"], "user");

    // Statistics: usage by provider and model.
    for model in ["up/ok", "up/ok", "up/broken"] {
        app.post(
            "/v1/chat/completions",
            Some(&dave),
            json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    }
    let s = app.get("/api/v1/admin/stats", Some(&admin)).await;
    assert_eq!(s.status, StatusCode::OK, "{}", s.text);
    assert_eq!(
        s.body["users"],
        json!({"total": 3, "admins": 1, "suspended": 0, "active": 1})
    );
    assert_eq!(s.body["executions"], 3);
    let ok = s.body["by_model"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["model"] == "ok")
        .unwrap();
    assert_eq!(
        (
            ok["executions"].as_u64(),
            ok["succeeded"].as_u64(),
            ok["prompt_tokens"].as_u64(),
            ok["completion_tokens"].as_u64()
        ),
        (Some(2), Some(2), Some(24), Some(8))
    );
    let broken = s.body["by_model"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["model"] == "broken")
        .unwrap();
    assert_eq!(broken["failed"], 1);
    let empty = app
        .get(
            "/api/v1/admin/stats?from=2020-01-01T00:00:00Z&to=2020-02-01T00:00:00Z",
            Some(&admin),
        )
        .await;
    assert_eq!(
        (
            empty.body["executions"].as_u64(),
            empty.body["users"]["active"].as_u64()
        ),
        (Some(0), Some(0))
    );
    let r = app
        .get(
            "/api/v1/admin/stats?from=2021-01-01T00:00:00Z&to=2020-01-01T00:00:00Z",
            Some(&admin),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    // The audit log: who did what, from where; filters by event and user.
    let a = app
        .get("/api/v1/admin/audit?event=user.", Some(&admin))
        .await;
    let events: Vec<&str> = a.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        events,
        [
            "user.role_changed",
            "user.role_changed",
            "user.unsuspended",
            "user.suspended",
            "user.registered",
            "user.registered"
        ],
        "{}",
        a.text
    );
    let suspended = a.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event"] == "user.suspended")
        .unwrap();
    assert_eq!(
        (suspended["user_id"].as_str(), suspended["subject"].as_str()),
        (Some(admin_id.as_str()), Some(carol_id.as_str()))
    );
    assert_eq!(suspended["ip"], "127.0.0.1");
    let logins = app
        .get(
            &format!("/api/v1/admin/audit?event=login.succeeded&user_id={admin_id}"),
            Some(&admin),
        )
        .await;
    assert_eq!(logins.body["total"], 1);
    // No secret is ever in it.
    let everything = app
        .get("/api/v1/admin/audit?per_page=100", Some(&admin))
        .await;
    for secret in [
        carol_key.as_str(),
        "an admin passphrase",
        PASSWORD,
        admin.as_str(),
    ] {
        assert!(
            !everything.text.contains(secret),
            "a secret leaked into the audit log"
        );
    }
}

#[actix_web::test]
async fn feature_flags_gate_routes_per_user_and_reach_other_replicas_within_seconds() {
    let (app, _up) = app_with_upstream(&[
        ("ADMIN_EMAIL", "root@example.com"),
        ("ADMIN_PASSWORD", "an admin passphrase"),
        ("DEFAULT_MODEL", "up/ok"),
    ])
    .await;
    let admin = root_token(&app).await;
    let erin = access(&app.user("erin").await);
    let frank = access(&app.user("frank").await);
    let erin_id = app.get("/api/v1/auth/me", Some(&erin)).await.body["id"]
        .as_str()
        .unwrap()
        .to_string();
    let batch = json!({"items": [{"prompt": "x"}]});
    assert_eq!(
        app.post("/api/v1/ai/generate/batch", Some(&frank), batch.clone())
            .await
            .status,
        StatusCode::OK
    );

    // Off for everyone but erin.
    let r = app
        .post("/api/v1/admin/feature-flags", Some(&admin), json!({"key": "batch_generation", "enabled": true, "rollout_percent": 0, "allow_users": [erin_id], "description": "batch ideas"}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = app
        .post("/api/v1/ai/generate/batch", Some(&frank), batch.clone())
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::FORBIDDEN, "feature_disabled")
    );
    assert_eq!(r.body["error"]["details"]["flag"], "batch_generation");
    assert_eq!(
        app.post("/api/v1/ai/generate/batch", Some(&erin), batch.clone())
            .await
            .status,
        StatusCode::OK
    );

    // A provider, and streaming, switched off.
    app.post(
        "/api/v1/admin/feature-flags",
        Some(&admin),
        json!({"key": "provider.up", "enabled": false}),
    )
    .await;
    let r = app
        .post(
            "/v1/chat/completions",
            Some(&frank),
            json!({"model": "up/ok", "messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::FORBIDDEN, "feature_disabled")
    );
    let r = app
        .post("/api/v1/ai/generate", Some(&frank), json!({"prompt": "x"}))
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    app.post(
        "/api/v1/admin/feature-flags",
        Some(&admin),
        json!({"key": "provider.up", "enabled": true}),
    )
    .await;
    app.post(
        "/api/v1/admin/feature-flags",
        Some(&admin),
        json!({"key": "streaming", "enabled": false}),
    )
    .await;
    let r = app
        .client
        .get(format!("{}/api/v1/ai/stream/generate?prompt=x", app.base))
        .bearer_auth(&frank)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let ws = awc::Client::new()
        .ws(format!("{}/ws/t", app.base.replace("http://", "ws://")))
        .bearer_auth(&frank)
        .connect()
        .await;
    match ws {
        Err(awc::error::WsClientError::InvalidResponseStatus(s)) => assert_eq!(s.as_u16(), 403),
        other => panic!("{:?}", other.map(|r| r.0.status())),
    }
    // Bad flags are refused; plain users cannot touch flags.
    let r = app
        .post(
            "/api/v1/admin/feature-flags",
            Some(&admin),
            json!({"key": "Bad Key", "enabled": true}),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let r = app
        .post(
            "/api/v1/admin/feature-flags",
            Some(&frank),
            json!({"key": "streaming", "enabled": true}),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let list = app.get("/api/v1/admin/feature-flags", Some(&admin)).await;
    assert_eq!(list.body["items"].as_array().unwrap().len(), 3);
    assert!(list.body["gates"]
        .as_array()
        .unwrap()
        .iter()
        .any(|g| g == "provider.up"));

    // A second replica on the same database sees a change within seconds.
    let other = TestApp::spawn_with(&[
        ("DATABASE_URL", app.config.database_url.expose()),
        ("FEATURE_FLAGS_REFRESH_SECS", "1"),
    ])
    .await;
    let frank_there = access(&other.login("frank@example.com", PASSWORD).await.body);
    let r = other
        .client
        .get(format!("{}/api/v1/ai/stream/generate?prompt=x", other.base))
        .bearer_auth(&frank_there)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN, "loaded at start");
    app.post(
        "/api/v1/admin/feature-flags",
        Some(&admin),
        json!({"key": "batch_generation", "enabled": true}),
    )
    .await;
    let started = std::time::Instant::now();
    loop {
        let r = other
            .post(
                "/api/v1/ai/generate/batch",
                Some(&frank_there),
                json!({"items": []}),
            )
            .await;
        if r.status == StatusCode::UNPROCESSABLE_ENTITY {
            break; // past the gate (an empty batch is invalid)
        }
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "not propagated in 5 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // Every change is in the audit log.
    let a = app
        .get(
            "/api/v1/admin/audit?event=feature_flag.changed",
            Some(&admin),
        )
        .await;
    assert_eq!(a.body["total"], 5, "{}", a.text);
}

/// With Redis, a feature-flag change, a prompt edit and a plan change made
/// on one replica apply on another at once — not after
/// `FEATURE_FLAGS_REFRESH_SECS` (an hour here) or the caches' TTL (a minute
/// here).
#[actix_web::test]
async fn flag_prompt_and_plan_changes_reach_another_replica_over_redis() {
    let Ok(redis) = std::env::var("TEST_REDIS_URL") else {
        eprintln!("skipping: TEST_REDIS_URL is not set");
        return;
    };
    let shared = [
        ("REDIS_URL", redis.as_str()),
        ("FEATURE_FLAGS_REFRESH_SECS", "3600"),
        ("AUTH_CACHE_TTL_MS", "60000"),
        ("ADMIN_EMAIL", "root@example.com"),
        ("ADMIN_PASSWORD", "an admin passphrase"),
    ];
    let (a, _up_a) = app_with_upstream(&shared).await;
    let url = a.config.database_url.expose().to_string();
    let mut with_db = shared.to_vec();
    with_db.push(("DATABASE_URL", url.as_str()));
    let (b, _up_b) = app_with_upstream(&with_db).await;
    // Let both subscribe.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let admin = root_token(&a).await;
    let token = access(&a.user("relayed").await);
    let chat =
        json!({"model": "up/ok", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4});
    let call = || async {
        b.post("/v1/chat/completions", Some(&token), chat.clone())
            .await
    };
    assert_eq!(
        call().await.status,
        StatusCode::OK,
        "plan and flags cached on b"
    );

    let until = |want: &'static str| async move {
        let started = std::time::Instant::now();
        loop {
            let r = call().await;
            if r.body["error"]["code"] == want {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(5),
                "b still answers {} {}",
                r.status,
                r.text
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    let r = a
        .post(
            "/api/v1/admin/feature-flags",
            Some(&admin),
            json!({"key": "provider.up", "enabled": false}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let flag_seen = until("feature_disabled").await;
    let r = a
        .post(
            "/api/v1/admin/feature-flags",
            Some(&admin),
            json!({"key": "provider.up", "enabled": true}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let started = std::time::Instant::now();
    while call().await.status != StatusCode::OK {
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // A prompt edited on a: b executes the new version at once (its
    // prompt cache lives a minute here).
    let spec = a
        .post(
            "/api/v1/specialties",
            Some(&token),
            json!({"name": "Relay"}),
        )
        .await;
    let sub = a
        .post(
            "/api/v1/sub-specialties",
            Some(&token),
            json!({"specialty_id": spec.body["id"], "name": "Relay"}),
        )
        .await;
    let prompt = a
        .post(
            "/api/v1/expert-prompts",
            Some(&token),
            json!({"sub_specialty_id": sub.body["id"], "title": "Relay", "template": "v1 {q}",
                   "variables_schema": {"type": "object", "required": ["q"], "properties": {"q": {"type": "string"}}}}),
        )
        .await;
    assert_eq!(prompt.status, StatusCode::CREATED, "{}", prompt.text);
    let pid = prompt.body["id"].as_str().unwrap().to_string();
    let execute = || async {
        b.post(
            &format!("/api/v1/execute-prompt/{pid}"),
            Some(&token),
            json!({"variables": {"q": "x"}, "llm_provider": "up", "llm_model": "echo"}),
        )
        .await
    };
    let first = execute().await;
    assert_eq!(first.body["output"], "v1 x", "{}", first.text);
    let r = a
        .call(
            reqwest::Method::PATCH,
            &format!("/api/v1/expert-prompts/{pid}"),
            Some(&token),
            Some(json!({"template": "v2 {q}"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let started = std::time::Instant::now();
    loop {
        let r = execute().await;
        if r.body["output"] == "v2 x" {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "b still runs the old prompt: {}",
            r.text
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let prompt_seen = started.elapsed();

    // b has counted this user's calls; a plan of one request refuses the next.
    let r = a
        .call(
            reqwest::Method::PUT,
            "/api/v1/admin/plans/free",
            Some(&admin),
            Some(json!({"name": "Free", "price_cents": 0, "max_requests": 1})),
        )
        .await;
    assert!(r.status.is_success(), "{}", r.text);
    let plan_seen = until("quota_exceeded").await;
    eprintln!("on another replica: a flag change applied after {flag_seen:?}, a prompt edit after {prompt_seen:?}, a plan change after {plan_seen:?}");
    assert!(
        prompt_seen < std::time::Duration::from_secs(2),
        "{prompt_seen:?}"
    );
    assert!(
        flag_seen < std::time::Duration::from_secs(2),
        "{flag_seen:?}"
    );
    assert!(
        plan_seen < std::time::Duration::from_secs(2),
        "{plan_seen:?}"
    );
}
