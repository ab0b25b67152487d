//! `/`, `/health`, `/api/v1/info`, `/metrics`.

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use serde::Serialize;
use serde_json::{json, Value};
use utoipa::ToSchema;

use crate::state::AppState;

pub fn config(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/").get(root))
        .service(web::resource("/health").get(health))
        .service(web::resource("/health/live").get(live))
        .service(web::resource("/health/ready").get(ready))
        .service(web::resource("/api/v1/info").get(info))
        .service(web::resource("/metrics").get(metrics));
}

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, Serialize, ToSchema)]
pub struct AppInfo {
    pub name: &'static str,
    pub version: &'static str,
    pub description: &'static str,
    pub docs: &'static str,
    pub redoc: &'static str,
    pub openapi: &'static str,
    pub health: &'static str,
}

/// What this server is and where its documentation lives.
#[utoipa::path(get, path = "/", tag = "system", responses((status = 200, body = AppInfo)))]
pub async fn root() -> web::Json<AppInfo> {
    web::Json(AppInfo {
        name: "Muse",
        version: VERSION,
        description: "Self-hostable AI backend: accounts, prompt library, ideas, streaming, subscriptions, fine-tuning",
        docs: "/docs/",
        redoc: "/redoc",
        openapi: "/openapi.json",
        health: "/health",
    })
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HealthReport {
    /// `ok`, or `unavailable` when a required dependency is down (then 503).
    pub status: &'static str,
    pub version: &'static str,
    pub uptime_secs: u64,
    /// `database` (required), `providers` (configured model providers; not
    /// called, so a provider outage never fails the health check) and
    /// `loaded_models` (local models in memory).
    #[schema(value_type = Object)]
    pub checks: Value,
}

/// Liveness and readiness: 200 when the database answers, 503 otherwise.
#[utoipa::path(get, path = "/health", tag = "system",
    responses((status = 200, body = HealthReport), (status = 503, description = "the database is down", body = HealthReport)))]
pub async fn health(state: web::Data<AppState>) -> HttpResponse {
    let db = state.db.clone();
    let backend = db.backend().name();
    let started = std::time::Instant::now();
    let result = web::block(move || db.ping()).await;
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    let (ok, db_check) = match result {
        Ok(Ok(())) => (
            true,
            json!({"status": "ok", "backend": backend, "latency_ms": latency_ms}),
        ),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "health check: database unavailable");
            (
                false,
                json!({"status": "unavailable", "backend": backend, "error": "the database did not answer"}),
            )
        }
        Err(e) => {
            tracing::error!(error = %e, "health check task failed");
            (
                false,
                json!({"status": "unavailable", "backend": backend, "error": "health check failed"}),
            )
        }
    };
    let report = HealthReport {
        status: if ok { "ok" } else { "unavailable" },
        version: VERSION,
        uptime_secs: state.started.elapsed().as_secs(),
        checks: json!({
            "database": db_check,
            "providers": providers(&state),
            "loaded_models": state.models.list().into_iter().filter(|m| m.kind == muse_inference::ModelKind::Local && m.loaded)
                .map(|m| json!({"key": m.key, "memory_bytes": m.memory_bytes})).collect::<Vec<_>>(),
        }),
    };
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    HttpResponse::build(status)
        .insert_header(("cache-control", "no-store"))
        .json(report)
}

/// Liveness: the process answers (for orchestrators: restart it if not).
#[utoipa::path(get, path = "/health/live", tag = "system",
    responses((status = 200, description = "`{\"status\": \"ok\"}`")))]
pub async fn live() -> HttpResponse {
    HttpResponse::Ok()
        .insert_header(("cache-control", "no-store"))
        .json(json!({"status": "ok"}))
}

/// Readiness: the database answers, every migration is applied and the
/// server is not draining (SIGTERM). 503 with `Retry-After` otherwise, so
/// load balancers send requests elsewhere.
#[utoipa::path(get, path = "/health/ready", tag = "system",
    responses((status = 200, description = "`{status: \"ready\", checks}`"), (status = 503, description = "`{status: \"not_ready\", checks}`")))]
pub async fn ready(state: web::Data<AppState>) -> HttpResponse {
    let draining = state.draining.load(std::sync::atomic::Ordering::SeqCst);
    let db = state.db.clone();
    let checked = web::block(move || db.pending_migrations()).await;
    let (database, migrations) = match checked {
        Ok(Ok(0)) => ("ok", json!("applied")),
        Ok(Ok(n)) => ("ok", json!({"pending": n})),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: database unavailable");
            ("unavailable", Value::Null)
        }
        Err(_) => ("unavailable", Value::Null),
    };
    let ok = !draining && database == "ok" && migrations == json!("applied");
    let body = json!({
        "status": if ok { "ready" } else { "not_ready" },
        "checks": {"database": database, "migrations": migrations, "draining": draining},
    });
    let mut res = if ok {
        HttpResponse::Ok()
    } else {
        let mut r = HttpResponse::ServiceUnavailable();
        r.insert_header(("retry-after", "5"));
        r
    };
    res.insert_header(("cache-control", "no-store")).json(body)
}

fn providers(state: &AppState) -> serde_json::Map<String, Value> {
    let mut map: serde_json::Map<String, Value> = state
        .models
        .provider_ids()
        .into_iter()
        .map(|id| {
            let status = if id == "local" {
                "available"
            } else {
                "configured"
            };
            (id, json!({ "status": status }))
        })
        .collect();
    if let Some(reason) = &state.local_unavailable {
        map.insert(
            "local".into(),
            json!({"status": "unavailable", "reason": reason}),
        );
    }
    map
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ApiInfo {
    pub name: &'static str,
    pub version: &'static str,
    pub api_version: &'static str,
    pub environment: &'static str,
    pub database: &'static str,
    /// `smtp` or `outbox`.
    pub mail: &'static str,
    pub access_token_ttl_secs: i64,
    pub password_min_length: usize,
    pub password_max_length: usize,
}

/// Public facts about this deployment that clients may adapt to.
#[utoipa::path(get, path = "/api/v1/info", tag = "system", responses((status = 200, body = ApiInfo)))]
pub async fn info(state: web::Data<AppState>) -> web::Json<ApiInfo> {
    web::Json(ApiInfo {
        name: "Muse",
        version: VERSION,
        api_version: "v1",
        environment: state.config.env.as_str(),
        database: state.db.backend().name(),
        mail: state.mail_transport,
        access_token_ttl_secs: state.config.access_token_ttl_secs,
        password_min_length: muse_auth::validate::PASSWORD_MIN_CHARS,
        password_max_length: muse_auth::validate::PASSWORD_MAX_CHARS,
    })
}

/// Prometheus text exposition.
#[utoipa::path(get, path = "/metrics", tag = "system",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    // Read at scrape time: training jobs by state, local models in memory.
    for m in state.models.list() {
        if m.kind == muse_inference::ModelKind::Local {
            metrics::gauge!("local_model_memory_bytes", "model" => m.key.clone())
                .set(m.memory_bytes.unwrap_or(0) as f64);
        }
    }
    let jobs = state.training.jobs.clone();
    if let Ok(Ok(counts)) = web::block(move || jobs.count_by_state()).await {
        // Every state, zeros included (dashboards need the series).
        for job_state in muse_training::JobState::ALL {
            let n = counts
                .iter()
                .find(|(s, _)| *s == job_state)
                .map_or(0, |(_, n)| *n);
            metrics::gauge!("training_jobs", "state" => job_state.as_str()).set(n as f64);
        }
    }
    let handle = state.metrics.clone();
    let body = web::block(move || crate::telemetry::render_metrics(&handle))
        .await
        .unwrap_or_default();
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(body)
}
