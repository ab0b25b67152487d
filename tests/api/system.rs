use actix_web::test as atest;
use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::*;

#[actix_web::test]
async fn root_info_and_health() {
    let app = TestApp::spawn().await;
    let root = app.get("/", None).await;
    assert_eq!(
        (root.status, root.body["name"].as_str()),
        (StatusCode::OK, Some("Muse"))
    );
    let info = app.get("/api/v1/info", None).await;
    assert_eq!(info.body["api_version"], "v1");
    assert_eq!(info.body["mail"], "outbox");
    let backend = info.body["database"].as_str().unwrap();
    assert!(backend == "sqlite" || backend == "postgres");
    let health = app.get("/health", None).await;
    assert_eq!(health.status, StatusCode::OK, "{}", health.text);
    assert_eq!(health.body["status"], "ok");
    assert_eq!(health.body["checks"]["database"]["status"], "ok");
    assert_eq!(health.body["checks"]["database"]["backend"], backend);
}

#[actix_web::test]
async fn health_is_503_when_the_database_is_down() {
    let app = TestApp::spawn().await;
    // Same configuration, but a database nobody listens to.
    let db =
        muse_persistence::Database::connect_lazy("postgres://muse:pw@127.0.0.1:1/muse", 1).unwrap();
    let state = muse_server::build_state(app.config.clone(), db).unwrap();
    let service = atest::init_service(muse_server::build_app(state)).await;
    let res = atest::call_service(
        &service,
        atest::TestRequest::get().uri("/health").to_request(),
    )
    .await;
    assert_eq!(res.status().as_u16(), 503);
    let body: serde_json::Value = atest::read_body_json(res).await;
    assert_eq!(body["status"], "unavailable");
    assert_eq!(body["checks"]["database"]["status"], "unavailable");
    assert!(
        !body.to_string().contains("pw"),
        "no connection details leak: {body}"
    );

    // A request that needs the database is a clean 503 too.
    let req = atest::TestRequest::post()
        .uri("/api/v1/auth/login")
        .set_json(serde_json::json!({"email": "a@example.com", "password": "whatever123"}))
        .to_request();
    let res = atest::call_service(&service, req).await;
    assert_eq!(res.status().as_u16(), 503);
    let body: serde_json::Value = atest::read_body_json(res).await;
    assert_eq!(body["error"]["code"], "database_unavailable");
}

#[actix_web::test]
async fn metrics_expose_requests_by_route_template() {
    let app = TestApp::spawn().await;
    let token = access(&app.user("walt").await);
    app.get("/api/v1/auth/me", Some(&token)).await;
    app.get("/api/v1/does-not-exist", None).await;
    let r = app
        .client
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .unwrap();
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = r.text().await.unwrap();
    assert!(
        text.contains(r#"http_requests_total{method="GET",route="/api/v1/auth/me",status="200"}"#),
        "{text}"
    );
    assert!(text.contains(r#"route="<unmatched>",status="404""#));
    assert!(text.contains("http_request_duration_seconds_bucket{"));
    assert!(
        text.contains("process_resident_memory_bytes")
            || text.contains("process_cpu_seconds_total"),
        "process metrics"
    );
    assert!(!text.contains(&token));
}

/// Label values come from the registry and HTTP's methods: names callers
/// make up (a random model, a custom method) do not mint series.
#[actix_web::test]
async fn callers_cannot_create_metric_series() {
    let (app, _up) = crate::upstream::app_with_upstream(&[]).await;
    let token = access(&app.user("labels").await);
    for i in 0..5 {
        let r = app
            .post(
                "/v1/chat/completions",
                Some(&token),
                serde_json::json!({"model": format!("made/up-{i}"), "messages": [{"role": "user", "content": "x"}]}),
            )
            .await;
        assert_eq!(r.status, reqwest::StatusCode::NOT_FOUND, "{}", r.text);
        let _ = app
            .client
            .request(
                reqwest::Method::from_bytes(format!("BREW{i}").as_bytes()).unwrap(),
                format!("{}/health", app.base),
            )
            .send()
            .await
            .unwrap();
    }
    let text = app
        .client
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!text.contains("up-0") && !text.contains("BREW"), "{text}");
    assert!(
        text.contains(r#"model="unknown""#) && text.contains(r#"method="OTHER""#),
        "{text}"
    );
}

#[actix_web::test]
async fn request_ids_are_returned_and_propagated() {
    let app = TestApp::spawn().await;
    let r = app
        .client
        .get(format!("{}/health", app.base))
        .send()
        .await
        .unwrap();
    let generated = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(generated.len(), 36);
    let r = app
        .client
        .get(format!("{}/nope", app.base))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "abc-123");
    let r = app
        .client
        .get(format!("{}/health", app.base))
        .header("x-request-id", "bad id with spaces")
        .send()
        .await
        .unwrap();
    assert_ne!(r.headers()["x-request-id"], "bad id with spaces");
}

#[actix_web::test]
async fn docs_are_served_offline() {
    let app = TestApp::spawn().await;
    let r = app
        .client
        .get(format!("{}/docs", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PERMANENT_REDIRECT);
    for path in [
        "/docs/",
        "/docs/swagger-ui.css",
        "/docs/swagger-ui-bundle.js",
        "/docs/swagger-initializer.js",
        "/redoc",
        "/redoc/redoc.standalone.js",
    ] {
        let r = app
            .client
            .get(format!("{}{path}", app.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        let text = r.text().await.unwrap();
        if path == "/docs/" || path == "/redoc" {
            assert!(
                !text.contains("cdn.") && !text.contains("fonts.googleapis"),
                "{path} reaches a CDN"
            );
        }
        assert!(text.len() > 200, "{path}");
    }
    let spec = app.get("/openapi.json", None).await;
    assert_eq!(spec.status, StatusCode::OK);
    assert!(spec.body["paths"]["/api/v1/auth/login"]["post"].is_object());
}

#[test]
fn openapi_snapshot_matches_docs_openapi_json() {
    use utoipa::OpenApi;
    let current =
        serde_json::to_string_pretty(&muse_server::openapi::ApiDoc::openapi()).unwrap() + "\n";
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json");
    if std::env::var("UPDATE_SNAPSHOTS").is_ok() {
        std::fs::write(&path, &current).unwrap();
    }
    let stored = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        stored == current,
        "docs/openapi.json is out of date: run `UPDATE_SNAPSHOTS=1 cargo test -p muse-tests openapi` and review the diff"
    );
}

#[actix_web::test]
async fn cors_allows_only_configured_origins() {
    let app = TestApp::spawn_with(&[("CORS_ORIGINS", "https://app.example.com")]).await;
    let r = app
        .client
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/api/v1/auth/login", app.base),
        )
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let r = app
        .client
        .get(format!("{}/health", app.base))
        .header("origin", "https://evil.example.com")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
    let r = TestApp::read(r).await;
    if r.status != StatusCode::OK {
        r.error_code();
    }
}

#[actix_web::test]
async fn security_headers_head_requests_and_local_front_ends() {
    let app = TestApp::spawn().await;
    // nosniff everywhere; HTML pages may not be framed.
    let r = app.get("/health", None).await;
    assert_eq!(r.headers["x-content-type-options"], "nosniff");
    assert!(
        r.headers.get("x-frame-options").is_none(),
        "JSON is not framed anyway"
    );
    for page in ["/docs/", "/redoc"] {
        let r = app.get(page, None).await;
        assert_eq!(r.status, StatusCode::OK, "{page}");
        assert_eq!(r.headers["x-frame-options"], "DENY", "{page}");
        assert!(
            r.headers["content-security-policy"]
                .to_str()
                .unwrap()
                .contains("frame-ancestors 'none'"),
            "{page}"
        );
    }
    // Tokens and keys are never cached.
    let login = app.user("hdr").await;
    let token = access(&login);
    let r = app
        .post(
            "/api/v1/auth/login",
            None,
            json!({"email": "hdr@example.com", "password": PASSWORD}),
        )
        .await;
    assert_eq!(r.headers["cache-control"], "no-store", "{}", r.text);
    let r = app
        .post("/api/v1/auth/api-keys", Some(&token), json!({"name": "k"}))
        .await;
    assert_eq!(r.headers["cache-control"], "no-store");
    let r = app.get("/api/v1/auth/me", Some(&token)).await;
    assert!(r
        .headers
        .get("cache-control")
        .is_none_or(|v| v != "no-store"));

    // HEAD wherever GET: the GET's status and headers, no body.
    for path in ["/health", "/docs/", "/v1/models"] {
        let res = app
            .client
            .head(format!("{}{path}", app.base))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "HEAD {path}");
        assert!(
            res.bytes().await.unwrap().is_empty(),
            "HEAD {path} has no body"
        );
    }

    // In development, a front end on localhost (any port) may call the API;
    // the response exposes the execution id header.
    let res = app
        .client
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/api/v1/auth/me", app.base),
        )
        .header("origin", "http://localhost:5173")
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "authorization")
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        "http://localhost:5173"
    );
    let res = app
        .client
        .get(format!("{}/api/v1/auth/me", app.base))
        .header("origin", "http://127.0.0.1:3000")
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let exposed = res.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    assert!(exposed.contains("x-muse-execution-id"), "{exposed}");
    let res = app
        .client
        .get(format!("{}/api/v1/auth/me", app.base))
        .header("origin", "http://localhost.evil.example")
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert!(
        res.headers().get("access-control-allow-origin").is_none(),
        "only localhost itself"
    );
}

/// Liveness and readiness for load balancers and orchestrators: live while
/// the process answers; ready while the database answers, every migration
/// is applied and the server is not draining (SIGTERM).
#[actix_web::test]
async fn liveness_and_readiness() {
    let app = TestApp::spawn().await;
    let live = app.get("/health/live", None).await;
    assert_eq!(
        (live.status, &live.body["status"]),
        (reqwest::StatusCode::OK, &serde_json::json!("ok"))
    );
    let ready = app.get("/health/ready", None).await;
    assert_eq!(ready.status, reqwest::StatusCode::OK, "{}", ready.text);
    assert_eq!(
        ready.body,
        serde_json::json!({"status": "ready", "checks": {"database": "ok", "migrations": "applied", "draining": false}})
    );
    app.draining
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let r = app
        .client
        .get(format!("{}/health/ready", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers()["retry-after"], "5");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["checks"]["draining"], true);
    // Liveness does not change while draining.
    assert_eq!(
        app.get("/health/live", None).await.status,
        reqwest::StatusCode::OK
    );
}

/// A SQLite file locked by another process: writes answer 503
/// `database_unavailable` with `Retry-After` (after the busy timeout), not
/// 500; once the lock is gone they work again.
#[actix_web::test]
async fn a_locked_database_is_a_503_with_retry_after() {
    let app = TestApp::spawn().await;
    let url = app.config.database_url.expose().to_string();
    let Some(path) = url.strip_prefix("sqlite://").map(str::to_string) else {
        return; // PostgreSQL: no file to lock (its outage is tested above)
    };
    use diesel::connection::SimpleConnection;
    use diesel::Connection;
    let mut other = diesel::SqliteConnection::establish(&path).unwrap();
    other.batch_execute("BEGIN EXCLUSIVE").unwrap();
    let r = app
        .register("locked@example.com", "locked", "a long passphrase")
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (
            reqwest::StatusCode::SERVICE_UNAVAILABLE,
            "database_unavailable"
        ),
        "{}",
        r.text
    );
    assert_eq!(r.headers["retry-after"], "5");
    other.batch_execute("ROLLBACK").unwrap();
    let r = app
        .register("locked@example.com", "locked", "a long passphrase")
        .await;
    assert!(r.status.is_success(), "{}", r.text);
}

/// The Grafana dashboard (deploy/grafana/muse.json) loads, and every
/// metric its PromQL names is one a live Muse exports.
#[actix_web::test]
async fn the_grafana_dashboard_names_only_exported_metrics() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/muse.json");
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let exprs: Vec<String> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .map(|t| t["expr"].as_str().unwrap().to_string())
        .collect();
    assert!(exprs.len() >= 15, "{exprs:?}");
    // Metric names in the expressions: identifiers followed by `{`.
    let mut named = std::collections::BTreeSet::new();
    for e in &exprs {
        let bytes: Vec<char> = e.chars().collect();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i].is_ascii_alphabetic() || bytes[i] == '_' {
                let start = i;
                while i < bytes.len()
                    && (bytes[i].is_ascii_alphanumeric() || bytes[i] == '_' || bytes[i] == ':')
                {
                    i += 1;
                }
                if bytes.get(i) == Some(&'{') {
                    named.insert(bytes[start..i].iter().collect::<String>());
                }
            } else if bytes[i] == '"' {
                // Skip label values.
                i += 1;
                while i < bytes.len() && bytes[i] != '"' {
                    i += 1;
                }
                i += 1;
            } else {
                i += 1;
            }
        }
    }
    for must in [
        "http_requests_total",
        "llm_cost_total_usd",
        "quota_denials_total",
        "training_jobs",
        "local_model_memory_bytes",
        "rate_limit_refusals_total",
        "llm_errors_total",
    ] {
        assert!(
            named.contains(must),
            "the dashboard shows {must}: {named:?}"
        );
    }

    // A live Muse that has done each of those things once.
    let cache = crate::models::test_models();
    let mut env = vec![
        ("ADMIN_EMAIL", "root@example.com"),
        ("ADMIN_PASSWORD", "an admin passphrase"),
        ("RATE_LIMIT_ENABLED", "true"),
        ("RATE_LIMIT_GENERATION_PER_USER", "3/min"),
    ];
    // A price for the test model, so that its cost is counted.
    let prices = std::env::temp_dir().join(format!(
        "muse-prices-{}.json",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::write(
        &prices,
        r#"{"up/ok": {"input_per_million": 1, "output_per_million": 2}}"#,
    )
    .unwrap();
    let prices_path = prices.display().to_string();
    env.push(("MODEL_PRICES_FILE", prices_path.as_str()));
    if let Some(c) = &cache {
        env.push(("MODEL_CACHE_DIR", c.as_str()));
    }
    let (app, _up) = crate::upstream::app_with_upstream(&env).await;
    let admin = root_token(&app).await;
    let token = access(&app.user("grafana").await);
    let chat = |model: &str| serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8});
    assert_eq!(
        app.post("/v1/chat/completions", Some(&token), chat("up/ok"))
            .await
            .status,
        reqwest::StatusCode::OK
    );
    assert_eq!(
        app.post("/v1/chat/completions", Some(&token), chat("up/broken"))
            .await
            .status
            .as_u16(),
        502
    );
    let r = app
        .call(
            reqwest::Method::PUT,
            "/api/v1/admin/plans/free",
            Some(&admin),
            Some(serde_json::json!({"name": "Free", "price_cents": 0, "max_requests": 2})),
        )
        .await;
    assert!(r.status.is_success(), "{}", r.text);
    assert_eq!(
        app.post("/v1/chat/completions", Some(&token), chat("up/ok"))
            .await
            .status
            .as_u16(),
        402
    );
    assert_eq!(
        app.post("/v1/chat/completions", Some(&token), chat("up/ok"))
            .await
            .status
            .as_u16(),
        429
    );
    let mut ws = crate::websocket::connect(&app, &admin).await;
    let _ = crate::websocket::recv(&mut ws).await;
    let text = app
        .client
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let exported: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    for name in &named {
        if name == "local_model_memory_bytes" && cache.is_none() {
            continue; // no local models here (MUSE_REQUIRE_LOCAL_MODELS makes just test provide them)
        }
        assert!(
            exported.contains(name.as_str()),
            "{name} is not in /metrics: {exported:?}"
        );
    }
}
