//! Logs, request ids and Prometheus metrics.

use std::sync::OnceLock;
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::HttpMessage;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Installs the global subscriber: `RUST_LOG` filter (default `info`),
/// text or JSON lines on stderr (colours only when stderr is a terminal).
/// Safe to call twice (the second is a no-op, and returns `None`).
///
/// Lines are written by a thread of their own ([`tracing_appender`]'s
/// non-blocking writer): a request's log line costs a copy into a queue,
/// not a `write` system call on the HTTP worker — one that waits whenever
/// the file or pipe behind stderr does (a busy disk, a slow log reader).
/// No line is dropped: when [`LOG_QUEUE_LINES`] lines are already
/// waiting, the logging thread waits too. Keep the returned guard for the
/// process's life: dropping it writes out what is still queued.
pub fn init_tracing(format: LogFormat) -> Option<tracing_appender::non_blocking::WorkerGuard> {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .lossy(false)
        .thread_name("muse-log")
        .finish(std::io::stderr());
    let installed = match format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(writer),
            )
            .try_init(),
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(writer),
            )
            .try_init(),
    };
    installed.ok().map(|()| guard)
}

/// Log lines queued for the log thread before a logging thread waits.
pub const LOG_QUEUE_LINES: usize = 65_536;

/// How often histogram samples are folded into their buckets and
/// summaries (see [`metrics_handle`]).
pub const METRICS_UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// The process-wide Prometheus recorder (installed on first use).
///
/// The recorder keeps every histogram sample (request durations, batch
/// sizes, …) in a list until its "upkeep" folds them into the buckets and
/// quantiles `/metrics` shows; only a scrape or an explicit upkeep does
/// that. Without a Prometheus scraping the server, the lists would grow
/// for as long as it serves (tens of bytes per request), so a thread of
/// its own (`muse-metrics`) runs the upkeep every
/// [`METRICS_UPKEEP_EVERY`].
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("duration_seconds".to_string()),
                    &[
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                        5.0, 10.0, 30.0, 60.0,
                    ],
                )
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let handle = match builder.install_recorder() {
                Ok(h) => {
                    keep_up(h.clone(), METRICS_UPKEEP_EVERY);
                    h
                }
                // Another recorder is installed (an embedding program's):
                // keep serving our own, unregistered (nothing records
                // into it, nothing to keep up).
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            };
            describe_metrics();
            handle
        })
        .clone()
}

/// Runs the recorder's upkeep every `every`, on a thread of its own, for
/// the life of the process (the recorder is process-wide).
fn keep_up(handle: PrometheusHandle, every: std::time::Duration) {
    let started = std::thread::Builder::new()
        .name("muse-metrics".into())
        .spawn(move || loop {
            std::thread::sleep(every);
            handle.run_upkeep();
        });
    if let Err(e) = started {
        // Scrapes still fold the samples; only their memory waits longer.
        tracing::warn!(error = %e, "cannot start the metrics upkeep thread");
    }
}

fn describe_metrics() {
    metrics::describe_counter!(
        "http_requests_total",
        "HTTP requests by method, route template and status"
    );
    metrics::describe_histogram!(
        "http_request_duration_seconds",
        metrics::Unit::Seconds,
        "HTTP request latency by method, route template and status"
    );
    metrics::describe_gauge!("http_requests_in_flight", "HTTP requests being served");
}

/// Renders the metrics text, refreshing process metrics first.
pub fn render_metrics(handle: &PrometheusHandle) -> String {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    let collector = COLLECTOR.get_or_init(|| {
        let c = metrics_process::Collector::default();
        c.describe();
        c
    });
    collector.collect();
    handle.render()
}

/// A request id to use: the caller's `X-Request-Id` when it is short and
/// plain, otherwise a new UUID.
fn request_id(req: &ServiceRequest) -> String {
    req.headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        })
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// The id of the current request, stored in its extensions.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Middleware (outermost): request id on the span, the response and every
/// log line; one log line per request; HTTP metrics by route template.
pub async fn observe(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let id = request_id(&req);
    req.extensions_mut().insert(RequestId(id.clone()));
    let method = req.method().to_string();
    // The raw path can carry secrets (`/verify-email/{token}`): logs get the
    // route template, and the raw path only when no route matched.
    let raw_path: String = req.path().chars().take(256).collect();
    let span = tracing::info_span!("request", request_id = %id, method = %method);
    let start = Instant::now();
    metrics::gauge!("http_requests_in_flight").increment(1.0);
    let result = next.call(req).instrument(span.clone()).await;
    metrics::gauge!("http_requests_in_flight").decrement(1.0);
    let elapsed = start.elapsed();
    let mut res = match result {
        Ok(res) => res,
        Err(e) => {
            let status = e.as_response_error().status_code().as_u16();
            record(method, "<error>".to_string(), status, elapsed.as_secs_f64());
            span.in_scope(|| tracing::warn!(status, error = %e, "request failed in middleware"));
            return Err(e);
        }
    };
    let pattern = res.request().match_pattern();
    let route = pattern.clone().unwrap_or_else(|| "<unmatched>".to_string());
    record(
        method,
        route.clone(),
        res.status().as_u16(),
        elapsed.as_secs_f64(),
    );
    if let Ok(v) = HeaderValue::from_str(&id) {
        res.headers_mut()
            .insert(HeaderName::from_static(REQUEST_ID_HEADER), v);
    }
    let path = pattern.is_none().then_some(raw_path.as_str());
    span.in_scope(|| {
        tracing::info!(
            route = %route,
            path,
            status = res.status().as_u16(),
            latency_ms = elapsed.as_secs_f64() * 1000.0,
            "request finished"
        );
    });
    Ok(res)
}

fn record(method: String, route: String, status: u16, secs: f64) {
    // Only the methods HTTP defines: anything else a client sends is
    // `OTHER`, so that it cannot mint series.
    let method = match method.as_str() {
        "GET" | "HEAD" | "POST" | "PUT" | "PATCH" | "DELETE" | "OPTIONS" | "CONNECT" | "TRACE" => {
            method
        }
        _ => "OTHER".to_string(),
    };
    let labels = [
        ("method", method),
        ("route", route),
        ("status", status.to_string()),
    ];
    metrics::counter!("http_requests_total", &labels).increment(1);
    metrics::histogram!("http_request_duration_seconds", &labels).record(secs);
}
