use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::*;

#[actix_web::test]
async fn refresh_rotates_and_reuse_revokes_the_family() {
    let app = TestApp::spawn().await;
    let first = app.user("kim").await;
    let r1 = refresh(&first);

    let second = app
        .post("/api/v1/auth/refresh", None, json!({"refresh_token": r1}))
        .await;
    assert_eq!(second.status, StatusCode::OK, "{}", second.text);
    let r2 = refresh(&second.body);
    assert_ne!(r1, r2);
    let a2 = access(&second.body);
    assert_eq!(
        app.get("/api/v1/auth/me", Some(&a2)).await.status,
        StatusCode::OK
    );

    // Replaying r1 is theft: the whole session dies, r2 and a2 included.
    let replay = app
        .post("/api/v1/auth/refresh", None, json!({"refresh_token": r1}))
        .await;
    assert_eq!(
        (replay.status, replay.error_code()),
        (StatusCode::UNAUTHORIZED, "invalid_refresh_token")
    );
    let r = app
        .post("/api/v1/auth/refresh", None, json!({"refresh_token": r2}))
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        app.get("/api/v1/auth/me", Some(&a2)).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        app.get("/api/v1/auth/me", Some(&access(&first)))
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );

    // Other sessions of the same user are untouched.
    let other = app.login("kim@example.com", PASSWORD).await;
    assert_eq!(
        app.get("/api/v1/auth/me", Some(&access(&other.body)))
            .await
            .status,
        StatusCode::OK
    );

    let r = app
        .post(
            "/api/v1/auth/refresh",
            None,
            json!({"refresh_token": "made-up"}),
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::UNAUTHORIZED, "invalid_refresh_token")
    );
}

#[actix_web::test]
async fn logout_ends_the_access_token_and_its_refresh_family() {
    let app = TestApp::spawn().await;
    let login = app.user("lea").await;
    let other = app.login("lea@example.com", PASSWORD).await.body;
    let token = access(&login);
    let r = app
        .post("/api/v1/auth/logout", Some(&token), json!({}))
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    let r = app.get("/api/v1/auth/me", Some(&token)).await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::UNAUTHORIZED, "unauthorized")
    );
    let r = app
        .post(
            "/api/v1/auth/refresh",
            None,
            json!({"refresh_token": refresh(&login)}),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        app.post("/api/v1/auth/logout", Some(&token), json!({}))
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    // The other device stays logged in.
    assert_eq!(
        app.get("/api/v1/auth/me", Some(&access(&other)))
            .await
            .status,
        StatusCode::OK
    );
}

fn claims_of(token: &str) -> serde_json::Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
}

fn b64(v: &serde_json::Value) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

#[actix_web::test]
async fn forged_and_foreign_tokens_are_401() {
    let app = TestApp::spawn().await;
    let good = access(&app.user("max").await);
    let claims = claims_of(&good);
    for k in ["iss", "aud", "sub", "jti", "iat", "exp", "sid"] {
        assert!(claims.get(k).is_some(), "claim {k} missing");
    }
    let sign = |alg: Algorithm, claims: &serde_json::Value, secret: &str| {
        encode(
            &Header::new(alg),
            claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    };
    let with = |key: &str, value: serde_json::Value| {
        let mut c = claims.clone();
        c[key] = value;
        c
    };
    let now = chrono_now();
    let unsigned = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&claims)
    );
    let mut tampered_parts: Vec<String> = good.split('.').map(str::to_string).collect();
    tampered_parts[1] = b64(&with("sub", json!(uuid::Uuid::now_v7().to_string())));
    let cases = vec![
        ("alg none", unsigned),
        ("HS512", sign(Algorithm::HS512, &claims, JWT_SECRET)),
        ("HS384", sign(Algorithm::HS384, &claims, JWT_SECRET)),
        (
            "other key",
            sign(
                Algorithm::HS256,
                &claims,
                "another-secret-0123456789-abcdefghijkl",
            ),
        ),
        ("tampered payload", tampered_parts.join(".")),
        (
            "expired",
            sign(
                Algorithm::HS256,
                &with("exp", json!(now - 3600)),
                JWT_SECRET,
            ),
        ),
        (
            "other audience",
            sign(
                Algorithm::HS256,
                &with("aud", json!("someone-else")),
                JWT_SECRET,
            ),
        ),
        (
            "other issuer",
            sign(Algorithm::HS256, &with("iss", json!("evil")), JWT_SECRET),
        ),
        (
            "other subject",
            sign(
                Algorithm::HS256,
                &with("sub", json!(uuid::Uuid::now_v7().to_string())),
                JWT_SECRET,
            ),
        ),
        (
            "unknown session",
            sign(
                Algorithm::HS256,
                &with("sid", json!(uuid::Uuid::now_v7().to_string())),
                JWT_SECRET,
            ),
        ),
        ("garbage", "not.a.jwt".to_string()),
    ];
    for (name, token) in cases {
        let r = app.get("/api/v1/auth/me", Some(&token)).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{name}: {}", r.text);
        let code = r.error_code();
        let expected = if name == "expired" {
            "token_expired"
        } else {
            "unauthorized"
        };
        assert_eq!(code, expected, "{name}");
    }
    // Missing iat or jti: refused too.
    let mut no_jti = claims.clone();
    no_jti.as_object_mut().unwrap().remove("jti");
    assert_eq!(
        app.get(
            "/api/v1/auth/me",
            Some(&sign(Algorithm::HS256, &no_jti, JWT_SECRET))
        )
        .await
        .status,
        StatusCode::UNAUTHORIZED
    );
    // The genuine token still works, and headers are checked strictly.
    assert_eq!(
        app.get("/api/v1/auth/me", Some(&good)).await.status,
        StatusCode::OK
    );
    for header in ["", "Bearer", "Basic abc", &format!("Token {good}")] {
        let r = app
            .client
            .get(format!("{}/api/v1/auth/me", app.base))
            .header("authorization", header)
            .send()
            .await
            .unwrap();
        let r = TestApp::read(r).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{header:?}");
        r.error_code();
    }
}

fn chrono_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}
