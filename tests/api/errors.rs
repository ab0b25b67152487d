//! Every kind of bad input answers with the documented JSON error shape.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::*;

async fn raw(
    app: &TestApp,
    method: Method,
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> Resp {
    let mut req = app
        .client
        .request(method, format!("{}{}", app.base, path))
        .body(body);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    TestApp::read(req.send().await.unwrap()).await
}

#[actix_web::test]
async fn bad_input_gets_the_json_error_shape() {
    let app = TestApp::spawn_with(&[("MAX_BODY_BYTES", "4096")]).await;
    let json = Some("application/json");
    type Case<'a> = (Method, &'a str, Option<&'a str>, Vec<u8>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            Method::POST,
            "/api/v1/auth/login",
            json,
            b"{not json".to_vec(),
            400,
            "malformed_json",
        ),
        (
            Method::POST,
            "/api/v1/auth/login",
            json,
            b"".to_vec(),
            400,
            "malformed_json",
        ),
        (
            Method::POST,
            "/api/v1/auth/login",
            json,
            br#"{"email": 42, "password": "x"}"#.to_vec(),
            422,
            "invalid_body",
        ),
        (
            Method::POST,
            "/api/v1/auth/login",
            json,
            br#"{"email": "a@example.com"}"#.to_vec(),
            422,
            "invalid_body",
        ),
        (
            Method::POST,
            "/api/v1/auth/login",
            json,
            b"[1,2,3]".to_vec(),
            422,
            "invalid_body",
        ),
        (
            Method::POST,
            "/api/v1/auth/login",
            Some("text/plain"),
            br#"{"email":"a","password":"b"}"#.to_vec(),
            415,
            "unsupported_media_type",
        ),
        (
            Method::POST,
            "/api/v1/auth/login",
            None,
            br#"{"email":"a","password":"b"}"#.to_vec(),
            415,
            "unsupported_media_type",
        ),
        (
            Method::POST,
            "/api/v1/auth/register",
            json,
            vec![b' '; 5000],
            413,
            "payload_too_large",
        ),
        (
            Method::GET,
            "/api/v1/nothing-here",
            None,
            vec![],
            404,
            "not_found",
        ),
        (
            Method::GET,
            "/api/v1/auth/login",
            None,
            vec![],
            405,
            "method_not_allowed",
        ),
        (
            Method::DELETE,
            "/health",
            None,
            vec![],
            405,
            "method_not_allowed",
        ),
        (
            Method::POST,
            "/api/v1/auth/verify-email/",
            json,
            b"{}".to_vec(),
            404,
            "not_found",
        ),
    ];
    for (method, path, ct, body, status, code) in cases {
        let label = format!("{method} {path} {ct:?}");
        let r = raw(&app, method, path, ct, body).await;
        assert_eq!(r.status.as_u16(), status, "{label}: {}", r.text);
        assert_eq!(r.error_code(), code, "{label}");
        assert!(
            r.headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/json"),
            "{label}"
        );
    }
}

#[actix_web::test]
async fn hostile_strings_are_handled() {
    let app = TestApp::spawn().await;
    let nasty = [
        "\u{0}\u{1}\u{7f}",
        "'; DROP TABLE users; --",
        "<script>alert(1)</script>@example.com",
        "ünïcødé@exämple.com",
        &"a".repeat(10_000),
    ];
    for s in nasty {
        let r = app.register(s, s, s).await;
        assert!(r.status.is_client_error(), "{s:?}: {}", r.text);
        r.error_code();
        let r = app.login(s, s).await;
        // NUL is refused by name before any lookup (PostgreSQL cannot compare it).
        let expected = if s.contains('\0') {
            StatusCode::UNPROCESSABLE_ENTITY
        } else {
            StatusCode::UNAUTHORIZED
        };
        assert_eq!(r.status, expected, "{s:?}");
        let r = app
            .call(
                Method::POST,
                &format!("/api/v1/auth/verify-email/{}", urlencode(s)),
                None,
                None,
            )
            .await;
        assert!(r.status.is_client_error(), "{s:?}");
        r.error_code();
    }
    // The server is still fine.
    assert_eq!(app.get("/health", None).await.status, StatusCode::OK);
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// NUL in a query filter is the caller's mistake on every database (400
/// naming the parameter): PostgreSQL cannot hold it, SQLite could; and
/// lone-surrogate escapes and very long filters are answered, not 500.
#[actix_web::test]
async fn text_filters_behave_the_same_on_every_database() {
    let app = TestApp::spawn_with(&[
        ("ADMIN_EMAIL", "root@example.com"),
        ("ADMIN_PASSWORD", "an admin passphrase"),
    ])
    .await;
    let user = access(&app.user("filterer").await);
    let admin = root_token(&app).await;
    let long = "a".repeat(5_000);
    let cases: [(&str, &str, &str); 9] = [
        ("/api/v1/ai/ideas/history", "category", "user"),
        ("/api/v1/expert-prompts", "q", "user"),
        ("/api/v1/specialties", "q", "user"),
        ("/api/v1/sub-specialties", "q", "user"),
        ("/api/v1/executions/history", "model", "user"),
        ("/api/v1/executions/history", "provider", "user"),
        ("/api/v1/admin/users", "q", "admin"),
        ("/api/v1/admin/audit", "event", "admin"),
        ("/api/v1/ai/ideas/history", "q", "user"),
    ];
    for (path, param, who) in cases {
        let token = if who == "admin" { &admin } else { &user };
        let r = app.get(&format!("{path}?{param}=a%00b"), Some(token)).await;
        assert_eq!(
            (
                r.status,
                r.error_code(),
                r.body["error"]["details"]["param"].as_str()
            ),
            (
                StatusCode::BAD_REQUEST,
                "invalid_query_parameter",
                Some(param)
            ),
            "{path}?{param}: {}",
            r.text
        );
        for value in ["%ED%A0%80", long.as_str(), "%F0%9F%92%A1"] {
            let r = app
                .get(&format!("{path}?{param}={value}"), Some(token))
                .await;
            assert!(
                r.status == StatusCode::OK || r.status == StatusCode::BAD_REQUEST,
                "{path}?{param}={}: {} {}",
                &value[..value.len().min(12)],
                r.status,
                r.text
            );
            if r.status == StatusCode::BAD_REQUEST {
                r.error_code();
            }
        }
    }
}

/// NUL in the text of Muse's own resources is refused by name before any
/// database sees it (PostgreSQL cannot hold it), in bodies and in paths.
#[actix_web::test]
async fn nul_in_stored_text_is_refused_by_name_on_every_database() {
    let app = TestApp::spawn_with(&[
        ("ADMIN_EMAIL", "root@example.com"),
        ("ADMIN_PASSWORD", "an admin passphrase"),
    ])
    .await;
    let user = access(&app.user("nulls").await);
    let admin = root_token(&app).await;
    let cases = [
        (
            Method::POST,
            "/api/v1/admin/feature-flags",
            &admin,
            json!({"key": "batch_generation", "enabled": true, "description": "a\u{0}b"}),
            "description",
        ),
        (
            Method::PUT,
            "/api/v1/admin/plans/free",
            &admin,
            json!({"name": "Fr\u{0}ee", "price_cents": 0, "max_requests": 3, "max_tokens": 100000, "max_batch": 2}),
            "name",
        ),
        (
            Method::POST,
            "/api/v1/specialties",
            &user,
            json!({"name": "x", "tags": ["ok", "n\u{0}"]}),
            "tags[1]",
        ),
    ];
    for (method, path, token, body, field) in cases {
        let r = app.call(method, path, Some(token), Some(body)).await;
        assert_eq!(
            (r.status, r.error_code()),
            (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
            "{path}: {}",
            r.text
        );
        assert_eq!(
            r.body["error"]["details"]["fields"][0]["field"], field,
            "{path}: {}",
            r.text
        );
    }
    for (method, path) in [
        (Method::PUT, "/api/v1/admin/plans/a%00b"),
        (Method::POST, "/api/v1/subscription/upgrade/a%00b"),
    ] {
        let r = app.call(method, path, Some(&admin), Some(json!({}))).await;
        assert_eq!(
            (r.status, r.error_code()),
            (StatusCode::BAD_REQUEST, "invalid_path_parameter"),
            "{path}: {}",
            r.text
        );
    }
    // A model call takes NUL: it reaches the model (and the record keeps it as U+FFFD).
    assert_eq!(app.get("/health", None).await.status, StatusCode::OK);
}

/// Issue 13 items 4 and 7: every error a client can cause is JSON with a
/// documented code; role checks come before the body; messages do not
/// name Rust types; registration refuses unknown fields like every other
/// endpoint; internationalised email domains are stored in one form.
#[actix_web::test]
async fn errors_are_json_roles_come_first_and_bodies_are_strict() {
    let app = TestApp::spawn_with(&[("CORS_ORIGINS", "https://app.example.com")]).await;
    let user = access(&app.user("plain").await);

    // A non-admin is refused for the role, whatever the body says.
    for (method, path, body) in [
        (
            Method::POST,
            "/api/v1/admin/feature-flags",
            Some(json!({"bogus": 1})),
        ),
        (
            Method::PUT,
            "/api/v1/admin/plans/free",
            Some(json!("not an object")),
        ),
        (Method::POST, "/api/v1/admin/models/pull", None),
    ] {
        let r = app.call(method, path, Some(&user), body).await;
        assert_eq!(
            (r.status, r.error_code()),
            (StatusCode::FORBIDDEN, "forbidden"),
            "{path}: {}",
            r.text
        );
    }

    // Registration refuses unknown fields; messages name no Rust type.
    let r = app
        .post(
            "/api/v1/auth/register",
            None,
            json!({"email": "z@example.com", "username": "zed", "password": "a long passphrase", "nickname": "z"}),
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"),
        "{}",
        r.text
    );
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("nickname"),
        "{}",
        r.text
    );
    let r = app.post("/api/v1/auth/login", None, json!("ada")).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
    let message = r.body["error"]["message"].as_str().unwrap();
    assert!(
        !message.contains("LoginRequest") && !message.contains("struct"),
        "{message}"
    );

    // A refused CORS preflight is JSON with its own code.
    let res = app
        .client
        .request(Method::OPTIONS, format!("{}/api/v1/auth/me", app.base))
        .header("Origin", "https://evil.example.com")
        .header("Access-Control-Request-Method", "GET")
        .send()
        .await
        .unwrap();
    let r = TestApp::read(res).await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::BAD_REQUEST, "cors_refused"),
        "{}",
        r.text
    );

    // Internationalised domains: one canonical (IDNA ASCII) form, so a
    // look-alike shows as what it is and the same address cannot register twice.
    let r = app
        .register("ana@bücher.example", "ana", "a long passphrase")
        .await;
    assert!(r.status.is_success(), "{}", r.text);
    let r = app
        .register("ANA@BÜCHER.EXAMPLE", "ana2", "a long passphrase")
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.text);
    let r = app
        .register("ana@xn--bcher-kva.example", "ana3", "a long passphrase")
        .await;
    assert_eq!(
        r.status,
        StatusCode::CONFLICT,
        "the same domain: {}",
        r.text
    );
    let login = app.login("Ana@Bücher.example", "a long passphrase").await;
    assert_eq!(login.status, StatusCode::OK, "{}", login.text);
    let me = app.get("/api/v1/auth/me", Some(&access(&login.body))).await;
    assert_eq!(me.body["email"], "ana@xn--bcher-kva.example");
}
