//! Starting and stopping the HTTP server.

use std::net::TcpListener;

use actix_web::dev::ServerHandle;
use actix_web::{web, HttpServer};
use muse_persistence::Database;

use crate::app::{bootstrap_admin, build_app, build_state, StartError};
use crate::config::Config;

/// Opens the database (clear error when unreachable or the URL is
/// unknown) and applies pending migrations.
pub fn open_database(config: &Config) -> Result<Database, StartError> {
    let db = Database::connect(config.database_url.expose(), config.database_pool_size)?;
    let applied = db.run_migrations()?;
    tracing::info!(backend = db.backend().name(), applied, "database ready");
    Ok(db)
}

/// A running server: its address and a handle to stop it.
pub struct Running {
    pub addr: std::net::SocketAddr,
    /// The in-process training workers (stopped after the server).
    pub training: crate::training::Workers,
    pub training_wait: std::time::Duration,
    pub handle: ServerHandle,
    pub server: actix_web::dev::Server,
    /// Its record writer and quota settlements drained after the server stops.
    pub gateway: muse_gateway::Gateway,
    /// Set on SIGTERM (readiness answers 503).
    pub draining: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pub shutdown_delay: std::time::Duration,
    /// `SHUTDOWN_GRACE_SECS`.
    pub grace: std::time::Duration,
    /// See [`muse_gateway::Gateway::stream_cut`].
    pub cut_streams: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
}

/// Prepares everything and binds `listener`; the returned server must be
/// awaited (or spawned) to serve. Stops gracefully on SIGTERM/SIGINT
/// (in-flight requests get up to 30 s).
pub async fn start(config: Config, listener: TcpListener) -> Result<Running, StartError> {
    let workers = config.workers;
    let state = web::block(move || -> Result<_, StartError> {
        // Refuse a weak production secret before touching the database.
        config.resolve_jwt_secret()?;
        let db = open_database(&config)?;
        let state = build_state(config, db)?;
        bootstrap_admin(&state)?;
        Ok(state)
    })
    .await
    .map_err(|e| StartError::Admin(e.to_string()))??;
    let addr = listener.local_addr()?;
    relay_events(&state);
    state.flags.clone().spawn_refresh();
    let training = crate::training::start(&state);
    let training_wait = crate::training::shutdown_wait(&state.training.config);
    let gateway = state.gateway.clone();
    let draining = state.draining.clone();
    let cut_streams = state.gateway.stream_cut().clone();
    let grace = state.config.shutdown_grace_secs;
    let shutdown_delay = std::time::Duration::from_millis(state.config.shutdown_delay_ms);
    let server = HttpServer::new(move || build_app(state.clone()))
        .workers(workers)
        // Streamed tokens (SSE, WebSocket) are small writes: send each at
        // once instead of waiting for the previous one to be acknowledged.
        .tcp_nodelay(true)
        .shutdown_timeout(grace)
        // SIGTERM/SIGINT are handled by `serve`: readiness first, then stop.
        .disable_signals()
        .listen(listener)?
        .run();
    Ok(Running {
        addr,
        training,
        training_wait,
        handle: server.handle(),
        server,
        gateway,
        draining,
        shutdown_delay,
        grace: std::time::Duration::from_secs(grace),
        cut_streams,
    })
}

/// The Redis channel revocations travel on between replicas.
const REVOKED_CHANNEL: &str = "muse:revoked";
/// The Redis channel training-job changes are announced on.
pub const JOBS_CHANNEL: &str = "muse:jobs";
/// The Redis channel feature-flag, plan, subscription and prompt changes
/// travel on (`flags`, `plans`, `subscription:<user id>`, `prompt:<id>`,
/// `prompts`).
const CHANGES_CHANNEL: &str = "muse:changes";

/// Announces every job change written through this process on Redis.
pub fn relay_job_changes(
    events: &std::sync::Arc<muse_persistence::RedisEvents>,
    signals: &crate::training::JobSignals,
) {
    let (events, runtime) = (events.clone(), tokio::runtime::Handle::current());
    signals.on_change(std::sync::Arc::new(move |job_id| {
        let events = events.clone();
        runtime.spawn(async move {
            if let Err(e) = events.publish(JOBS_CHANNEL, &job_id.to_string()).await {
                metrics::counter!("events_publish_failures_total").increment(1);
                tracing::debug!(error = %e, %job_id, "could not announce a job change; other processes poll");
            }
        });
    }));
}

/// With `REDIS_URL`, every revocation made here (logout, key deletion,
/// suspension, role change, …) is published, and those published by other
/// replicas drop the user's cached callers here at once; so do feature-flag
/// changes (reloaded at once), plan and subscription changes (dropped from
/// the cache at once) and training-job changes. While Redis is down the
/// `events_channel_up` gauge is 0, a warning is logged, and other replicas'
/// changes arrive within `AUTH_CACHE_TTL_MS`, `FEATURE_FLAGS_REFRESH_SECS`
/// and `TRAINING_PROGRESS_POLL_MS` instead.
fn relay_events(state: &crate::state::AppState) {
    let Some(url) = &state.config.rate_limits.redis_url else {
        return;
    };
    let events = match muse_persistence::RedisEvents::new(url.expose()) {
        Ok(e) => std::sync::Arc::new(e),
        Err(e) => {
            tracing::warn!(error = %e, "revocations will not be relayed between replicas");
            return;
        }
    };
    let runtime = tokio::runtime::Handle::current();
    let publisher = events.clone();
    state.auth.on_revoke(std::sync::Arc::new(move |user_id| {
        let publisher = publisher.clone();
        runtime.spawn(async move {
            if let Err(e) = publisher
                .publish(REVOKED_CHANNEL, &user_id.to_string())
                .await
            {
                metrics::counter!("events_publish_failures_total").increment(1);
                tracing::warn!(error = %e, %user_id, "could not relay a revocation; other replicas see it within AUTH_CACHE_TTL_MS");
            }
        });
    }));
    relay_changes(&events, state);
    // Training jobs: a change written here is announced; one announced by
    // another process (a replica, a `muse worker`) wakes this relay.
    relay_job_changes(&events, &state.training.signals);
    let (jobs_events, signals) = (events.clone(), state.training.signals.clone());
    actix_web::rt::spawn(async move {
        jobs_events
            .subscribe(
                JOBS_CHANNEL,
                |_| signals.local.notify_one(),
                |up| {
                    signals
                        .channel_up
                        .store(up, std::sync::atomic::Ordering::SeqCst);
                    if !up {
                        tracing::warn!("the Redis event channel is down: training progress from other processes is polled (TRAINING_PROGRESS_POLL_MS)");
                    }
                },
            )
            .await;
    });
    let auth = state.auth.clone();
    actix_web::rt::spawn(async move {
        events
            .subscribe(
                REVOKED_CHANNEL,
                |payload| {
                    if let Ok(user_id) = uuid::Uuid::parse_str(&payload) {
                        auth.principal_cache().forget_user(user_id);
                    }
                },
                |up| {
                    // Open WebSockets rely on the relay instead of checking
                    // their caller again every AUTH_CACHE_TTL_MS.
                    auth.principal_cache().set_relayed(up);
                    metrics::gauge!("events_channel_up").set(if up { 1.0 } else { 0.0 });
                    if up {
                        tracing::info!("revocations from other replicas arrive over Redis");
                    } else {
                        tracing::warn!("the Redis event channel is down: other replicas' revocations arrive within AUTH_CACHE_TTL_MS");
                    }
                },
            )
            .await;
    });
}

/// Feature flags, plans, subscriptions and prompts written here are announced on
/// [`CHANGES_CHANNEL`]; those announced by other replicas are applied here.
fn relay_changes(
    events: &std::sync::Arc<muse_persistence::RedisEvents>,
    state: &crate::state::AppState,
) {
    let runtime = tokio::runtime::Handle::current();
    let announce = {
        let events = events.clone();
        move |payload: String| {
            let events = events.clone();
            runtime.spawn(async move {
                if let Err(e) = events.publish(CHANGES_CHANNEL, &payload).await {
                    metrics::counter!("events_publish_failures_total").increment(1);
                    tracing::warn!(error = %e, change = %payload, "could not announce a change; other replicas see it within their refresh interval or cache TTL");
                }
            });
        }
    };
    let flags_announce = announce.clone();
    state
        .flags
        .on_change(std::sync::Arc::new(move || flags_announce("flags".into())));
    let billing_announce = announce.clone();
    state
        .billing_cache
        .on_change(std::sync::Arc::new(move |change| {
            billing_announce(change.to_payload())
        }));
    state.prompt_cache.on_change(std::sync::Arc::new(move |id| {
        announce(id.map_or_else(|| "prompts".to_string(), |id| format!("prompt:{id}")))
    }));
    let (events, flags, billing, prompts) = (
        events.clone(),
        state.flags.clone(),
        state.billing_cache.clone(),
        state.prompt_cache.clone(),
    );
    actix_web::rt::spawn(async move {
        events
            .subscribe(
                CHANGES_CHANNEL,
                |payload| {
                    if payload == "flags" {
                        let flags = flags.clone();
                        tokio::task::spawn_blocking(move || {
                            if let Err(e) = flags.reload() {
                                tracing::warn!(error = %e, "could not reload the feature flags another replica changed");
                            }
                        });
                    } else if payload == "prompts" {
                        prompts.forget(None);
                    } else if let Some(id) = payload
                        .strip_prefix("prompt:")
                        .and_then(|id| uuid::Uuid::parse_str(id).ok())
                    {
                        prompts.forget(Some(id));
                    } else if let Some(change) = muse_billing::BillingChange::from_payload(&payload) {
                        billing.forget(change);
                    }
                },
                |_| {},
            )
            .await;
    });
}

/// SIGTERM or SIGINT (Ctrl-C).
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// `muse serve`: binds `HOST:PORT` and serves until stopped.
pub async fn serve(config: Config) -> Result<(), StartError> {
    let bind = config.bind_addr();
    let listener = TcpListener::bind(&bind).map_err(|e| {
        StartError::Io(std::io::Error::new(
            e.kind(),
            format!("cannot listen on {bind}: {e}"),
        ))
    })?;
    let running = start(config, listener).await?;
    tracing::info!(addr = %running.addr, "Muse is listening; docs at http://{}/docs/", running.addr);
    // On SIGTERM or SIGINT: report not ready, wait SHUTDOWN_DELAY_MS for
    // load balancers to notice, then stop accepting connections and give
    // in-flight requests and streams SHUTDOWN_GRACE_SECS.
    let (handle, draining, delay, grace, cut_streams) = (
        running.handle.clone(),
        running.draining.clone(),
        running.shutdown_delay,
        running.grace,
        running.cut_streams.clone(),
    );
    actix_web::rt::spawn(async move {
        stop_signal().await;
        draining.store(true, std::sync::atomic::Ordering::SeqCst);
        tracing::info!(
            delay_ms = delay.as_millis() as u64,
            "stopping: not ready any more"
        );
        actix_web::rt::time::sleep(delay).await;
        // Streams still open just before the grace period ends get an
        // error event and end cleanly (actix would cut them mid-frame).
        actix_web::rt::spawn(async move {
            let margin = std::time::Duration::from_millis(500).min(grace / 2);
            actix_web::rt::time::sleep(grace.saturating_sub(margin)).await;
            tracing::warn!("grace period nearly spent: ending the streams still open");
            cut_streams.send_replace(true);
        });
        handle.stop(true).await;
    });
    running.server.await?;
    running.training.shutdown(running.training_wait).await;
    // Every answered call's record is written before the process exits.
    let writer = running.gateway.writer().clone();
    let left = web::block(move || writer.drain(std::time::Duration::from_secs(30)))
        .await
        .unwrap_or(usize::MAX);
    if left > 0 {
        tracing::error!(left, "executions still unwritten at exit");
    }
    if let Err(e) = running.gateway.flush_quota_counts().await {
        tracing::warn!(error = %e, "could not send the last quota settlements to the shared store");
    }
    tracing::info!("server stopped");
    Ok(())
}
