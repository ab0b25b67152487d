use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::*;

#[actix_web::test]
async fn keys_are_shown_once_work_as_bearer_and_can_be_revoked() {
    let app = TestApp::spawn().await;
    let token = access(&app.user("nia").await);
    let created = app
        .post(
            "/api/v1/auth/api-keys",
            Some(&token),
            json!({"name": "  laptop  ", "expires_in_days": 30}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    let key = created.body["key"].as_str().unwrap().to_string();
    assert!(key.starts_with("muse_sk_") && key.len() > 40);
    assert_eq!(created.body["name"], "laptop");
    assert!(key.starts_with(created.body["prefix"].as_str().unwrap()));
    assert!(created.body["expires_at"].is_string());

    // It works wherever a bearer token does, and records its last use.
    let me = app.get("/api/v1/auth/me", Some(&key)).await;
    assert_eq!(
        (me.status, me.body["username"].as_str()),
        (StatusCode::OK, Some("nia"))
    );
    let list = app.get("/api/v1/auth/api-keys", Some(&key)).await;
    assert_eq!(list.status, StatusCode::OK);
    let items = list.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert!(items[0]["last_used_at"].is_string());
    assert!(!list.text.contains(&key), "the secret is never shown again");

    // Logout needs a session, not a key.
    let r = app.post("/api/v1/auth/logout", Some(&key), json!({})).await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::BAD_REQUEST, "session_required")
    );

    let id = created.body["id"].as_str().unwrap();
    let del = app
        .call(
            Method::DELETE,
            &format!("/api/v1/auth/api-keys/{id}"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(del.status, StatusCode::NO_CONTENT, "{}", del.text);
    assert_eq!(
        app.get("/api/v1/auth/me", Some(&key)).await.status,
        StatusCode::UNAUTHORIZED
    );
    let again = app
        .call(
            Method::DELETE,
            &format!("/api/v1/auth/api-keys/{id}"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(
        (again.status, again.error_code()),
        (StatusCode::NOT_FOUND, "not_found")
    );
}

#[actix_web::test]
async fn keys_belong_to_their_owner() {
    let app = TestApp::spawn().await;
    let a = access(&app.user("ola").await);
    let b = access(&app.user("pat").await);
    let created = app
        .post("/api/v1/auth/api-keys", Some(&a), json!({"name": "a"}))
        .await;
    let id = created.body["id"].as_str().unwrap();
    let r = app
        .call(
            Method::DELETE,
            &format!("/api/v1/auth/api-keys/{id}"),
            Some(&b),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(
        app.get("/api/v1/auth/api-keys", Some(&b)).await.body["items"],
        json!([])
    );
    let key = created.body["key"].as_str().unwrap();
    assert_eq!(
        app.get("/api/v1/auth/me", Some(key)).await.body["username"],
        "ola"
    );
}

#[actix_web::test]
async fn bad_key_requests_are_4xx() {
    let app = TestApp::spawn().await;
    let token = access(&app.user("quin").await);
    for body in [
        json!({"name": ""}),
        json!({"name": "x".repeat(65)}),
        json!({"name": "ok", "expires_in_days": 0}),
        json!({"name": "ok", "expires_in_days": 99999}),
    ] {
        let r = app
            .post("/api/v1/auth/api-keys", Some(&token), body.clone())
            .await;
        assert_eq!(
            (r.status, r.error_code()),
            (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
            "{body}"
        );
    }
    let r = app
        .post(
            "/api/v1/auth/api-keys",
            Some(&token),
            json!({"name": "ok", "expires_in_days": -1}),
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_body")
    );
    let r = app
        .call(
            Method::DELETE,
            "/api/v1/auth/api-keys/not-a-uuid",
            Some(&token),
            None,
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::BAD_REQUEST, "invalid_path_parameter")
    );
    let r = app
        .get("/api/v1/auth/me", Some("muse_sk_made-up-key"))
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = app
        .post("/api/v1/auth/api-keys", None, json!({"name": "ok"}))
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[actix_web::test]
async fn expired_keys_stop_working() {
    // The expiry is moved in the database behind the server's back: seen
    // at once without the cache of callers (within AUTH_CACHE_TTL_MS with it).
    let app = TestApp::spawn_with(&[("AUTH_CACHE_TTL_MS", "0")]).await;
    let token = access(&app.user("rex").await);
    let created = app
        .post(
            "/api/v1/auth/api-keys",
            Some(&token),
            json!({"name": "short", "expires_in_days": 1}),
        )
        .await;
    let key = created.body["key"].as_str().unwrap();
    assert_eq!(
        app.get("/api/v1/auth/me", Some(key)).await.status,
        StatusCode::OK
    );
    // Move the expiry into the past directly in the database.
    use diesel::prelude::*;
    use muse_persistence::schema::api_keys;
    let db = muse_persistence::Database::connect(app.config.database_url.expose(), 1).unwrap();
    let mut conn = db.get().unwrap();
    diesel::update(api_keys::table)
        .set(api_keys::expires_at.eq(Some(1_000i64)))
        .execute(&mut *conn)
        .unwrap();
    assert_eq!(
        app.get("/api/v1/auth/me", Some(key)).await.status,
        StatusCode::UNAUTHORIZED
    );
}
