//! Rate limiting end to end: per IP and per user, 429 with `Retry-After`
//! and `RateLimit-*`, the admin statistics and unblocking, two processes
//! sharing Redis, and Redis being down (fail open or closed).

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::*;

async fn login_from(app: &TestApp, ip: &str, n: usize) -> reqwest::Response {
    app.client
        .post(format!("{}/api/v1/auth/login", app.base))
        .header("x-forwarded-for", ip)
        .json(&json!({"email": format!("nobody{n}@example.com"), "password": "wrong password 123"}))
        .send()
        .await
        .unwrap()
}

#[actix_web::test]
async fn a_flood_from_one_ip_is_limited_while_another_ip_is_served() {
    let app = TestApp::spawn_with(&[
        ("RATE_LIMIT_ENABLED", "true"),
        ("TRUST_PROXY_HEADERS", "true"),
        ("RATE_LIMIT_AUTH_PER_IP", "3/min"),
        ("ADMIN_EMAIL", "root@example.com"),
        ("ADMIN_PASSWORD", "an admin passphrase"),
    ])
    .await;
    for n in 0..3 {
        let r = login_from(&app, "10.0.0.1", n).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(r.headers()["ratelimit-limit"], "3");
        assert_eq!(
            r.headers()["ratelimit-remaining"],
            (2 - n).to_string().as_str()
        );
    }
    let r = login_from(&app, "10.0.0.1", 9).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((19..=20).contains(&retry), "{retry}");
    assert_eq!(r.headers()["ratelimit-remaining"], "0");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    assert_eq!(
        (
            body["error"]["details"]["class"].as_str(),
            body["error"]["details"]["scope"].as_str()
        ),
        (Some("auth"), Some("ip"))
    );
    // Another address is served; health and metrics are never limited.
    assert_eq!(
        login_from(&app, "10.0.0.2", 0).await.status(),
        StatusCode::UNAUTHORIZED
    );
    for _ in 0..5 {
        let h = app
            .client
            .get(format!("{}/health", app.base))
            .header("x-forwarded-for", "10.0.0.1")
            .send()
            .await
            .unwrap();
        assert_eq!(h.status(), StatusCode::OK);
    }

    // The admin sees the limited key and lifts it; users may not.
    let admin = root_token(&app).await;
    let user = access(&app.user("plain").await);
    let stats = app
        .get("/api/v1/admin/rate-limits/stats", Some(&admin))
        .await;
    assert_eq!(stats.status, StatusCode::OK, "{}", stats.text);
    assert_eq!(
        (
            stats.body["store"].as_str(),
            stats.body["per_ip"]["auth"].as_str()
        ),
        (Some("memory"), Some("3/min"))
    );
    assert_eq!(
        stats.body["top"][0],
        json!({"key": "ip:10.0.0.1:auth", "refused": 1})
    );
    let r = app
        .get("/api/v1/admin/rate-limits/stats", Some(&user))
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::FORBIDDEN, "forbidden")
    );
    let r = app
        .post(
            "/api/v1/admin/rate-limits/unblock",
            Some(&user),
            json!({"ip": "10.0.0.1"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = app
        .post(
            "/api/v1/admin/rate-limits/unblock",
            Some(&admin),
            json!({"ip": "10.0.0.1", "key": "x"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let r = app
        .post(
            "/api/v1/admin/rate-limits/unblock",
            Some(&admin),
            json!({"ip": "10.0.0.1"}),
        )
        .await;
    assert_eq!(
        (r.status, r.body["cleared"].as_u64()),
        (StatusCode::OK, Some(1)),
        "{}",
        r.text
    );
    assert_eq!(
        login_from(&app, "10.0.0.1", 10).await.status(),
        StatusCode::UNAUTHORIZED
    );
    // The unblock is in the audit log, with its actor.
    let db = muse_persistence::Database::connect(app.config.database_url.expose(), 1).unwrap();
    use muse_auth::AuthRepository;
    let audit = muse_persistence::DieselAuthRepository::new(db)
        .list_audit(
            &muse_auth::AuditFilter::default(),
            muse_core::PageRequest::new(None, Some(100)),
        )
        .unwrap();
    assert!(audit.items.iter().any(|e| e.event == "rate_limit.unblocked"
        && e.detail
            .as_ref()
            .is_some_and(|d| d["keys"][0] == "ip:10.0.0.1:auth")));
}

#[actix_web::test]
async fn each_user_has_a_limit_of_their_own() {
    let app = TestApp::spawn_with(&[
        ("RATE_LIMIT_ENABLED", "true"),
        ("RATE_LIMIT_GENERATION_PER_USER", "2/min"),
    ])
    .await;
    let a = access(&app.user("alpha").await);
    let b = access(&app.user("bravo").await);
    for _ in 0..2 {
        let r = app.post("/api/v1/ai/generate", Some(&a), json!({})).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
    }
    let r = app.post("/api/v1/ai/generate", Some(&a), json!({})).await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::TOO_MANY_REQUESTS, "rate_limited")
    );
    assert_eq!(r.body["error"]["details"]["scope"], "user");
    assert!(r.headers.get("retry-after").is_some());
    // Reads are another class; another user has their own budget.
    assert_eq!(
        app.get("/api/v1/ai/ideas/history", Some(&a)).await.status,
        StatusCode::OK
    );
    let r = app.post("/api/v1/ai/generate", Some(&b), json!({})).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
}

#[actix_web::test]
async fn two_processes_sharing_redis_enforce_one_limit() {
    let Ok(redis) = std::env::var("TEST_REDIS_URL") else {
        assert!(
            std::env::var("CI").is_err(),
            "TEST_REDIS_URL must be set in CI"
        );
        return;
    };
    let vars = [
        ("RATE_LIMIT_ENABLED", "true"),
        ("TRUST_PROXY_HEADERS", "true"),
        ("RATE_LIMIT_AUTH_PER_IP", "4/min"),
        ("REDIS_URL", redis.as_str()),
    ];
    let one = TestApp::spawn_with(&vars).await;
    let two = TestApp::spawn_with(&vars).await;
    let ip = format!("10.9.{}.{}", rand_octet(), rand_octet());
    let mut admitted = 0;
    for n in 0..10 {
        let app = if n % 2 == 0 { &one } else { &two };
        if login_from(app, &ip, n).await.status() != StatusCode::TOO_MANY_REQUESTS {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 4, "one limit across both processes");
}

fn rand_octet() -> u8 {
    (uuid::Uuid::new_v4().as_u128() % 250) as u8 + 1
}

#[actix_web::test]
async fn an_unreachable_redis_fails_open_or_closed_as_configured() {
    for (mode, expected) in [
        ("open", StatusCode::OK),
        ("closed", StatusCode::SERVICE_UNAVAILABLE),
    ] {
        let app = TestApp::spawn_with(&[
            ("RATE_LIMIT_ENABLED", "true"),
            ("REDIS_URL", "redis://127.0.0.1:1"),
            ("RATE_LIMIT_FAILURE", mode),
        ])
        .await;
        let r = app.get("/api/v1/ai/models", None).await;
        let status = if r.status == StatusCode::UNAUTHORIZED {
            StatusCode::OK
        } else {
            r.status
        };
        assert_eq!(status, expected, "{mode}: {}", r.text);
        if expected != StatusCode::OK {
            assert_eq!(r.error_code(), "rate_limiter_unavailable");
        }
    }
}

#[actix_web::test]
async fn failed_logins_are_throttled_by_the_rate_limiter() {
    let app = TestApp::spawn_with(&[
        ("RATE_LIMIT_ENABLED", "true"),
        ("TRUST_PROXY_HEADERS", "true"),
        ("LOGIN_MAX_FAILURES_PER_ACCOUNT", "3"),
        ("LOGIN_FAILURE_WINDOW_SECS", "900"),
    ])
    .await;
    app.user("jill").await;
    app.user("kate").await;
    let attempt = |email: &'static str, password: &'static str, ip: &'static str| {
        let (client, url) = (
            app.client.clone(),
            format!("{}/api/v1/auth/login", app.base),
        );
        async move {
            client
                .post(url)
                .header("x-forwarded-for", ip)
                .json(&json!({"email": email, "password": password}))
                .send()
                .await
                .unwrap()
        }
    };
    for _ in 0..3 {
        assert_eq!(
            attempt("jill@example.com", "wrong password 1", "10.1.0.1")
                .await
                .status(),
            StatusCode::UNAUTHORIZED
        );
    }
    // Refused before checking the password, even the right one.
    let r = attempt("jill@example.com", PASSWORD, "10.1.0.2").await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (299..=301).contains(&retry),
        "one more attempt per 900/3 s: {retry}"
    );
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_attempts");
    // Successful logins do not count; another account is unaffected.
    for _ in 0..5 {
        assert_eq!(
            attempt("kate@example.com", PASSWORD, "10.1.0.3")
                .await
                .status(),
            StatusCode::OK
        );
    }
}
