//! Building the application: state, then the one `App` that `main` and the
//! tests both serve.

use std::sync::Arc;
use std::time::Instant;

use actix_cors::Cors;
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::middleware::from_fn;
use actix_web::{http, web, App};
use muse_auth::{AuthConfig, AuthService, JwtKeys, Mailer, ThrottleConfig};
use muse_core::SystemClock;
use muse_persistence::{Database, DieselAuthRepository};

use crate::config::Config;
use crate::error::{self, ApiError};
use crate::mail::{OutboxMailer, SmtpMailer};
use crate::state::AppState;
use crate::{openapi, routes, telemetry};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("database: {0}")]
    Database(#[from] muse_persistence::DbError),
    #[error("mail: {0}")]
    Mail(#[from] muse_auth::MailError),
    #[error("model providers: {0}")]
    Inference(#[from] muse_inference::InferenceError),
    #[error("admin bootstrap: {0}")]
    Admin(String),
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
}

/// Wires the services over an opened database. Blocking (reads the JWT
/// secret file): call it before the server starts.
pub fn build_state(config: Config, db: Database) -> Result<AppState, StartError> {
    let secret = config.resolve_jwt_secret()?;
    let (mailer, mail_transport): (Arc<dyn Mailer>, &'static str) = match &config.smtp_url {
        Some(url) => (Arc::new(SmtpMailer::new(url, &config.mail_from)?), "smtp"),
        None => (
            Arc::new(OutboxMailer::new(config.outbox_dir(), &config.mail_from)),
            "outbox",
        ),
    };
    let auth_config = AuthConfig {
        access_ttl_secs: config.access_token_ttl_secs,
        refresh_ttl_secs: config.refresh_token_ttl_secs,
        bcrypt_cost: config.bcrypt_cost,
        // With the rate limiter on, failed logins are throttled by it
        // (crate::limits::login_throttle) instead of by counting audit rows.
        throttle: if config.rate_limits.enabled {
            ThrottleConfig {
                max_per_account: 0,
                max_per_ip: 0,
                window_secs: config.login_failure_window_secs,
            }
        } else {
            ThrottleConfig {
                max_per_account: config.login_max_failures_per_account,
                max_per_ip: config.login_max_failures_per_ip,
                window_secs: config.login_failure_window_secs,
            }
        },
        public_url: config.public_url.clone(),
        principal_cache_ttl_ms: config.auth_cache_ttl_ms,
        ..AuthConfig::default()
    };
    let auth = AuthService::new(
        Arc::new(DieselAuthRepository::new(db.clone())),
        mailer,
        Arc::new(SystemClock),
        JwtKeys::new(&secret, &config.jwt_issuer, &config.jwt_audience),
        auth_config,
    );
    let (models, local_unavailable) = crate::inference::build_registry(&config.llm)?;
    let training = Arc::new(crate::training::Training::new(&config, &db).map_err(|e| {
        StartError::Config(crate::config::ConfigError::Invalid {
            var: "TRAINING_EXTERNAL_COMMAND".into(),
            message: e,
        })
    })?);
    training.register_all(&models);
    let library_repo = Arc::new(muse_persistence::DieselLibraryRepository::new(db.clone()));
    // Prompts cached as long as plans are (writes through this process clear
    // them at once, other replicas' arrive over Redis or within the TTL): an
    // idea or an execution reads its prompt from memory.
    let prompt_cache = Arc::new(muse_prompts::CachedLibrary::new(
        library_repo.clone(),
        std::time::Duration::from_millis(u64::try_from(config.auth_cache_ttl_ms).unwrap_or(0)),
    ));
    // Plans and subscriptions cached as long as callers are (writes through
    // this process clear them at once).
    let billing_cache = Arc::new(muse_billing::CachedBilling::new(
        Arc::new(muse_persistence::DieselBillingRepository::new(db.clone())),
        config.auth_cache_ttl_ms,
        Arc::new(SystemClock),
    ));
    let billing: Arc<dyn muse_billing::BillingRepository> = billing_cache.clone();
    let quota = match (config.quota_store, &config.rate_limits.redis_url) {
        (crate::config::QuotaStore::Memory, _) => {
            muse_gateway::QuotaCounting::Memory(muse_billing::QuotaLedger::new())
        }
        (crate::config::QuotaStore::Redis, Some(url)) => {
            muse_gateway::QuotaCounting::Shared(Arc::new(
                muse_persistence::RedisQuotaStore::new(url.expose()).map_err(|e| {
                    StartError::Config(crate::config::ConfigError::Invalid {
                        var: "REDIS_URL".into(),
                        message: e.to_string(),
                    })
                })?,
            ))
        }
        _ => muse_gateway::QuotaCounting::Database,
    };
    tracing::info!(quota_store = ?config.quota_store, "quota reservations");
    let payments: Option<Arc<dyn muse_billing::PaymentGateway>> = match &config.stripe {
        None => None,
        Some(s) => Some(Arc::new(
            muse_billing::StripeGateway::new(s.secret_key.expose(), &s.api_base).map_err(|e| {
                StartError::Config(crate::config::ConfigError::Invalid {
                    var: "STRIPE_SECRET_KEY".into(),
                    message: e.to_string(),
                })
            })?,
        )),
    };
    let flags = Arc::new(crate::flags::Flags::new(
        Arc::new(muse_persistence::DieselFlagRepository::new(db.clone())),
        std::time::Duration::from_secs(config.feature_flags_refresh_secs.max(1)),
    ));
    let limiter = crate::limits::build(&config.rate_limits).map_err(|e| {
        StartError::Config(crate::config::ConfigError::Invalid {
            var: "REDIS_URL".into(),
            message: e.to_string(),
        })
    })?;
    let writer = muse_gateway::Writer::start_with(
        Arc::new(muse_persistence::DieselCallStore::new(db.clone())),
        config.execution_writes.into(),
        muse_gateway::BatchWindow {
            wait: std::time::Duration::from_micros(config.execution_batch_window_us),
            ..Default::default()
        },
    )?;
    let models = Arc::new(models);
    let visible_to = training.clone();
    let gateway = muse_gateway::Gateway::new(
        models.clone(),
        billing_cache.clone(),
        quota,
        writer,
        muse_gateway::GatewayOptions {
            unpriced_price: config.llm.unpriced_price,
            visibility: Some(Box::new(move |key, user| visible_to.visible(key, user))),
        },
    );
    Ok(AppState {
        gateway,
        executions: Arc::new(muse_persistence::DieselExecutionRepository::new(db.clone())),
        library: muse_prompts::Library::new(prompt_cache.clone(), Arc::new(SystemClock)),
        prompt_cache,
        ideas: library_repo,
        specs: Arc::default(),
        hub: crate::ws::Hub::default(),
        training,
        models,
        local_unavailable,
        pulls: crate::pulls::Pulls::default(),
        config: Arc::new(config),
        db,
        auth: Arc::new(auth),
        metrics: telemetry::metrics_handle(),
        limiter,
        flags,
        billing,
        billing_cache,
        draining: Arc::default(),
        payments,
        started: Instant::now(),
        mail_transport,
    })
}

fn cors(origins: &[String], env: crate::config::Environment) -> Cors {
    let base = Cors::default()
        .allowed_methods(vec!["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
        .allowed_headers(vec![
            http::header::AUTHORIZATION,
            http::header::CONTENT_TYPE,
            http::header::ACCEPT,
        ])
        .expose_headers(vec![
            "x-request-id",
            "retry-after",
            "x-muse-execution-id",
            "ratelimit-limit",
            "ratelimit-remaining",
            "ratelimit-reset",
        ])
        .max_age(3600);
    if origins.iter().any(|o| o == "*") {
        return base.allow_any_origin();
    }
    if origins.is_empty() && env == crate::config::Environment::Development {
        // A local front end on any port works without configuration in
        // development (as Creative Muse's did); production keeps the list.
        return base.allowed_origin_fn(|origin, _| {
            origin.to_str().is_ok_and(|o| {
                [
                    "http://localhost",
                    "http://127.0.0.1",
                    "https://localhost",
                    "https://127.0.0.1",
                ]
                .iter()
                .any(|host| {
                    o == *host
                        || o.strip_prefix(host)
                            .and_then(|rest| rest.strip_prefix(':'))
                            .is_some_and(|port| {
                                !port.is_empty() && port.chars().all(|c| c.is_ascii_digit())
                            })
                })
            })
        });
    }
    origins.iter().fold(base, |c, o| c.allowed_origin(o))
}

/// The query parameter whose value (or name) holds a NUL character
/// (`%00`), if any. PostgreSQL refuses NUL in text; SQLite would take it.
/// Refusing it here makes every filter behave the same on both.
fn nul_query_parameter(query: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        pair.contains("%00").then(|| {
            let name = pair.split_once('=').map_or(pair, |(k, _)| k);
            name.replace("%00", "")
        })
    })
}

/// 400 `invalid_path_parameter` / `invalid_query_parameter` for a path or
/// a query parameter holding NUL.
async fn refuse_nul_queries(
    req: ServiceRequest,
    next: actix_web::middleware::Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    if req.uri().path().contains("%00") {
        let error = ApiError::bad_request(
            "invalid_path_parameter",
            "a path parameter must not contain NUL characters",
        );
        return Ok(req.error_response(error).map_into_boxed_body());
    }
    if let Some(name) = nul_query_parameter(req.query_string()) {
        let error = ApiError::bad_request(
            "invalid_query_parameter",
            format!("the query parameter {name} must not contain NUL characters"),
        )
        .with_details(serde_json::json!({ "param": name }));
        return Ok(req.error_response(error).map_into_boxed_body());
    }
    Ok(next.call(req).await?.map_into_boxed_body())
}

/// Where a JSON body holds a string with a NUL character: the field's
/// path (`a.b[2].c`; a key holding NUL is named by its parent).
fn nul_field(v: &serde_json::Value, path: &str) -> Option<String> {
    use serde_json::Value;
    match v {
        Value::String(s) if s.contains('\0') => Some(path.to_string()),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, x)| nul_field(x, &format!("{path}[{i}]"))),
        Value::Object(map) => map.iter().find_map(|(k, x)| {
            if k.contains('\0') {
                return Some(path.to_string());
            }
            let at = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            nul_field(x, &at)
        }),
        _ => None,
    }
}

/// Model calls take NUL in their text (it reaches the model, and the
/// record keeps it as U+FFFD); Muse's own resources do not.
fn takes_nul(path: &str) -> bool {
    path.starts_with("/v1/")
        || path.starts_with("/api/v1/ai/generate")
        || path.starts_with("/api/v1/ai/stream/")
        || path.starts_with("/api/v1/execute-prompt/")
}

/// 422 `validation_failed` naming the field when a JSON body for one of
/// Muse's own resources holds a NUL character: PostgreSQL cannot store
/// it, so no database gets it. Only bodies whose bytes hold `\u0000` are
/// parsed here; the others pass untouched.
async fn refuse_nul_in_bodies(
    mut req: ServiceRequest,
    next: actix_web::middleware::Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    let json = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json || takes_nul(req.path()) {
        return Ok(next.call(req).await?.map_into_boxed_body());
    }
    let body = req.extract::<web::Bytes>().await?;
    if body.windows(6).any(|w| w == b"\\u0000") {
        if let Ok(value) = serde_json::from_slice::<serde_json::Value>(&body) {
            if let Some(field) = nul_field(&value, "") {
                let error = ApiError::new(
                    http::StatusCode::UNPROCESSABLE_ENTITY,
                    "validation_failed",
                    "some fields are invalid",
                )
                .with_details(serde_json::json!({"fields": [{"field": field, "message": "must not contain NUL characters"}]}));
                return Ok(req.error_response(error).map_into_boxed_body());
            }
        }
    }
    req.set_payload(actix_web::dev::Payload::from(body));
    Ok(next.call(req).await?.map_into_boxed_body())
}

/// Responses that carry tokens or keys: never cached.
const NO_STORE_PATHS: [&str; 4] = [
    "/api/v1/auth/login",
    "/api/v1/auth/refresh",
    "/api/v1/auth/api-keys",
    "/api/v1/ai/stream/ticket",
];

/// `X-Content-Type-Options: nosniff` on every response; HTML pages may not
/// be framed (`X-Frame-Options: DENY`, `frame-ancestors 'none'`); answers
/// carrying tokens or keys are `Cache-Control: no-store`. `HEAD` is
/// answered wherever `GET` is: the `GET` runs and its body is dropped.
async fn security_headers(
    mut req: ServiceRequest,
    next: actix_web::middleware::Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    use actix_web::http::header::{self, HeaderValue};
    let head = req.method() == http::Method::HEAD;
    if head {
        req.head_mut().method = http::Method::GET;
    }
    let no_store = req.method() == http::Method::POST && NO_STORE_PATHS.contains(&req.path());
    let mut res = next.call(req).await?.map_into_boxed_body();
    let headers = res.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    let html = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/html"));
    if html {
        headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        if !headers.contains_key(header::CONTENT_SECURITY_POLICY) {
            headers.insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static("frame-ancestors 'none'"),
            );
        }
    }
    if no_store {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    }
    if head {
        res = res.map_body(|_, _| actix_web::body::BoxBody::new(()));
    }
    Ok(res)
}

/// The application: every route and middleware. Middlewares, outermost
/// first: observe (request id, logs, metrics) → JSON error shape → CORS.
pub fn build_app(
    state: AppState,
) -> App<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    let limit = state.config.max_body_bytes;
    let cors = cors(&state.config.cors_origins, state.config.env);
    App::new()
        .app_data(web::Data::new(state))
        .app_data(
            web::JsonConfig::default()
                .limit(limit)
                .error_handler(error::json_error),
        )
        .app_data(web::PayloadConfig::default().limit(limit))
        .app_data(web::PathConfig::default().error_handler(error::path_error))
        .app_data(web::QueryConfig::default().error_handler(error::query_error))
        .wrap(from_fn(refuse_nul_in_bodies))
        .wrap(from_fn(refuse_nul_queries))
        .wrap(from_fn(crate::limits::per_ip))
        .wrap(cors)
        .wrap(from_fn(error::json_errors))
        .wrap(from_fn(security_headers))
        .wrap(from_fn(telemetry::observe))
        .configure(routes::system::config)
        .configure(routes::auth::config)
        .configure(routes::ai::config)
        .configure(routes::openai::config)
        .configure(routes::executions::config)
        .configure(routes::library::config)
        .configure(routes::admin::config)
        .configure(routes::subscription::config)
        .configure(routes::train::config)
        .configure(crate::ws::config)
        .configure(routes::pages::config)
        .configure(openapi::config)
        .default_service(web::to(error::not_found))
}

/// Creates the first admin from `ADMIN_EMAIL`/`ADMIN_PASSWORD` when no
/// account has that email yet. Blocking.
pub fn bootstrap_admin(state: &AppState) -> Result<(), StartError> {
    let (Some(email), Some(password)) = (&state.config.admin_email, &state.config.admin_password)
    else {
        return Ok(());
    };
    let repo = state.auth.repository();
    let normalized = email.trim().to_lowercase();
    match repo.user_by_email(&normalized) {
        Ok(Some(_)) => {
            tracing::info!("ADMIN_EMAIL already has an account; not creating an admin");
            Ok(())
        }
        Ok(None) => {
            match state
                .auth
                .create_admin(email, &state.config.admin_username, password.expose())
            {
                Ok(user) => {
                    tracing::info!(user_id = %user.id, "created the first admin from ADMIN_EMAIL");
                    Ok(())
                }
                // Replicas started together race to create the same admin:
                // the one that loses finds the account made by the winner.
                Err(
                    e @ (muse_auth::AuthError::EmailTaken | muse_auth::AuthError::UsernameTaken),
                ) => match repo.user_by_email(&normalized) {
                    Ok(Some(_)) => {
                        tracing::info!(
                            "ADMIN_EMAIL was created by another process; not creating an admin"
                        );
                        Ok(())
                    }
                    _ => Err(StartError::Admin(describe(e))),
                },
                Err(e) => Err(StartError::Admin(describe(e))),
            }
        }
        Err(e) => Err(StartError::Admin(e.to_string())),
    }
}

/// A readable one-line description of an accounts error (for the CLI).
pub fn describe(e: muse_auth::AuthError) -> String {
    match e {
        muse_auth::AuthError::Validation(fields) => fields
            .iter()
            .map(|f| format!("{}: {}", f.field, f.message))
            .collect::<Vec<_>>()
            .join("; "),
        other => ApiError::from(other).message,
    }
}
