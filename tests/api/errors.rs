//! Every kind of bad input answers with the documented JSON error shape.

use reqwest::{Method, StatusCode};

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
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{s:?}");
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
