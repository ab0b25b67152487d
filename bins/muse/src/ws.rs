//! WebSocket `/ws/{session_id}`: generations and prompt executions token
//! by token, cancellation, and server pushes (training progress) over one
//! socket. The protocol is in docs/websocket.md; in short:
//!
//! - client → server: `{"type": "generate", "id", …idea fields}`,
//!   `{"type": "execute", "id", "prompt_id", …execute fields}`,
//!   `{"type": "cancel", "id"}`, `{"type": "ping"}`;
//! - server → client: `ready`, `started`, `token`, `done`, `cancelled`,
//!   `error`, `pong`, and pushes such as `training.progress`; every message
//!   has a `type`, and replies to a request carry its `id`.
//!
//! Authenticated at the handshake (`Authorization` header, or `?ticket=`
//! from `POST /api/v1/ai/stream/ticket` for browsers). Bad input is
//! answered with an `error` message, never by dropping the socket.
//! Outgoing messages go through a bounded queue: a slow reader slows its
//! generations down (the upstream stream is not polled) instead of making
//! the server buffer without bound.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use actix_web::{web, HttpRequest, HttpResponse};
use actix_ws::{AggregatedMessage, CloseCode, CloseReason};
use futures_util::StreamExt;
use muse_auth::Principal;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::error::ApiError;
use crate::extract::user_or_ticket;
use crate::routes::ideas::{prepare_idea, IdeaBody};
use crate::routes::library::{prepare_execution, ExecuteBody};
use crate::routes::sse;
use crate::state::AppState;
use muse_gateway::Run;

/// Largest message the protocol handles, in bytes; bigger text messages
/// get an `error` (`message_too_large`).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Largest frame read at all; bigger ones close the socket with 1009.
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;
/// Generations running at once on one socket.
pub const MAX_CONCURRENT: usize = 4;
/// Outgoing messages queued per socket before generations wait.
pub const OUTGOING_QUEUE: usize = 64;
/// Pushes (training progress) queued per socket; older ones are dropped
/// when a client does not read (progress can also be polled).
const PUSH_QUEUE: usize = 64;

pub fn config(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/ws/{session_id}").get(handshake));
}

/// One socket's push queue, by connection number.
type Sockets = Vec<(u64, mpsc::Sender<Value>)>;

/// The live sockets of each user, for server pushes.
#[derive(Clone, Default)]
pub struct Hub {
    inner: Arc<Mutex<HashMap<Uuid, Sockets>>>,
    next: Arc<AtomicU64>,
    /// Per user: the turn to check their access again from the database,
    /// so that their sockets waking together cost one read, not one each.
    rechecks: Arc<Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>>,
}

impl Hub {
    /// The user's turn to check their access again (see `still_allowed`).
    fn recheck_turn(&self, user_id: Uuid) -> Arc<tokio::sync::Mutex<()>> {
        self.rechecks
            .lock()
            .map(|mut m| m.entry(user_id).or_default().clone())
            .unwrap_or_default()
    }

    /// Forgets the user's turn once nobody else holds it.
    fn recheck_done(&self, user_id: Uuid, turn: Arc<tokio::sync::Mutex<()>>) {
        if let Ok(mut m) = self.rechecks.lock() {
            // The map's and this one: nobody waits.
            if Arc::strong_count(&turn) <= 2 {
                m.remove(&user_id);
            }
        }
    }

    fn register(&self, user_id: Uuid) -> (u64, mpsc::Receiver<Value>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(PUSH_QUEUE);
        if let Ok(mut map) = self.inner.lock() {
            map.entry(user_id).or_default().push((id, tx));
        }
        (id, rx)
    }

    fn unregister(&self, user_id: Uuid, id: u64) {
        if let Ok(mut map) = self.inner.lock() {
            if let Some(v) = map.get_mut(&user_id) {
                v.retain(|(i, _)| *i != id);
                if v.is_empty() {
                    map.remove(&user_id);
                }
            }
        }
    }

    /// Sends `message` (which must have a `type`) to every socket of
    /// `user_id` on this server; returns how many took it.
    pub fn publish(&self, user_id: Uuid, message: &Value) -> usize {
        let Ok(map) = self.inner.lock() else { return 0 };
        map.get(&user_id).map_or(0, |socks| {
            socks
                .iter()
                .filter(|(_, tx)| tx.try_send(message.clone()).is_ok())
                .count()
        })
    }

    /// Open sockets of `user_id` on this server.
    pub fn sockets(&self, user_id: Uuid) -> usize {
        self.inner
            .lock()
            .map(|m| m.get(&user_id).map_or(0, Vec::len))
            .unwrap_or(0)
    }
}

#[derive(Debug, Deserialize)]
pub struct HandshakeQuery {
    pub ticket: Option<String>,
}

fn valid_session_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Upgrades to a WebSocket once the caller is authenticated (header, or
/// `?ticket=` for browsers). The JSON message protocol is in docs/websocket.md.
#[utoipa::path(get, path = "/ws/{session_id}", tag = "websocket", security(("bearer" = [])),
    params(("session_id" = String, Path, description = "a client-chosen name for the socket: 1-64 letters, digits, '-' or '_'"),
        ("ticket" = Option<String>, Query, description = "a stream ticket (browsers)")),
    responses(
        (status = 101, description = "switching to the WebSocket protocol"),
        (status = 400, description = "invalid_path_parameter, websocket_required", body = crate::error::ErrorBody),
        (status = 401, body = crate::error::ErrorBody),
    ))]
pub async fn handshake(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
    query: web::Query<HandshakeQuery>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let session_id = path.into_inner();
    if !valid_session_id(&session_id) {
        return Err(ApiError::bad_request(
            "invalid_path_parameter",
            "session_id: 1 to 64 letters, digits, '-' or '_'",
        ));
    }
    let principal = user_or_ticket(&req, query.into_inner().ticket).await?;
    state
        .flags
        .check(muse_billing::flags::known::STREAMING, &principal)?;
    let (response, session, stream) = actix_ws::handle(&req, body).map_err(|e| {
        ApiError::bad_request(
            "websocket_required",
            format!("not a WebSocket handshake: {e}"),
        )
    })?;
    let stream = stream
        .max_frame_size(MAX_FRAME_BYTES)
        .aggregate_continuations()
        .max_continuation_size(MAX_FRAME_BYTES);
    let state = state.get_ref().clone();
    actix_web::rt::spawn(connection(state, principal, session_id, session, stream));
    Ok(response)
}

struct Job {
    task: tokio::task::JoinHandle<()>,
    execution_id: Arc<OnceLock<Uuid>>,
}

fn error_message(id: Option<&str>, code: &str, message: &str) -> Value {
    json!({"type": "error", "id": id, "error": {"code": code, "message": message}})
}

fn api_error_message(id: Option<&str>, e: ApiError) -> Value {
    json!({"type": "error", "id": id, "error": {"code": e.code, "message": e.message, "details": e.details}})
}

async fn connection(
    state: AppState,
    principal: Principal,
    session_id: String,
    session: actix_ws::Session,
    mut stream: actix_ws::AggregatedMessageStream,
) {
    let user_id = principal.user.id;
    let idle = Duration::from_secs(state.config.ws_idle_timeout_secs.max(1));
    let (out_tx, mut out_rx) = mpsc::channel::<Value>(OUTGOING_QUEUE);
    // The writer: the only task that sends text frames.
    let mut writer_session = session.clone();
    let writer = actix_web::rt::spawn(async move {
        while let Some(msg) = out_rx.recv().await {
            if writer_session.text(msg.to_string()).await.is_err() {
                break;
            }
        }
    });
    let (hub_id, mut pushes) = state.hub.register(user_id);
    metrics::gauge!("websocket_connections").increment(1.0);
    tracing::info!(%user_id, session_id, "websocket opened");
    let _ = out_tx
        .send(json!({
            "type": "ready", "session_id": session_id, "user_id": user_id,
            "limits": {"max_message_bytes": MAX_MESSAGE_BYTES, "max_concurrent": MAX_CONCURRENT, "idle_timeout_secs": idle.as_secs()},
        }))
        .await;

    let mut jobs: HashMap<String, Job> = HashMap::new();
    let mut validated = (state.auth.principal_cache().begin(), Instant::now());
    let mut last_seen = Instant::now();
    let mut heartbeat = tokio::time::interval(idle / 3);
    heartbeat.tick().await;
    let mut control = session.clone();
    let close_reason = loop {
        tokio::select! {
            msg = stream.next() => {
                last_seen = Instant::now();
                match msg {
                    None => break None,
                    Some(Err(e)) => {
                        // Protocol errors (e.g. a frame over MAX_FRAME_BYTES) end the socket.
                        let code = if matches!(e, actix_ws::ProtocolError::Overflow) { CloseCode::Size } else { CloseCode::Protocol };
                        break Some(CloseReason { code, description: Some(e.to_string()) });
                    }
                    Some(Ok(AggregatedMessage::Ping(bytes))) => {
                        if control.pong(&bytes).await.is_err() { break None; }
                    }
                    Some(Ok(AggregatedMessage::Pong(_))) => {}
                    Some(Ok(AggregatedMessage::Close(reason))) => break reason,
                    Some(Ok(AggregatedMessage::Binary(_))) => {
                        let _ = out_tx.send(error_message(None, "unsupported_message", "send JSON text messages, not binary")).await;
                    }
                    Some(Ok(AggregatedMessage::Text(text))) => {
                        // The caller may have lost access since the socket
                        // opened (logout, key deleted, suspended): checked
                        // again before anything billable starts.
                        if let Some(reason) = revoked(&state, &principal, &mut validated, &out_tx).await {
                            break Some(reason);
                        }
                        handle_text(&state, &principal, &out_tx, &mut jobs, &text).await;
                    }
                }
            }
            Some(push) = pushes.recv() => {
                let _ = out_tx.send(push).await;
            }
            _ = heartbeat.tick() => {
                // A revocation seen by this server ends running generations
                // too, without waiting for the next message.
                if state.auth.principal_cache().revoked_since(user_id, validated.0) {
                    if let Some(reason) = revoked(&state, &principal, &mut validated, &out_tx).await {
                        break Some(reason);
                    }
                }
                if last_seen.elapsed() >= idle {
                    break Some(CloseReason { code: CloseCode::Normal, description: Some("idle timeout".into()) });
                }
                if control.ping(b"muse").await.is_err() { break None; }
            }
        }
    };
    // Closing cancels what is still running (recorded as cancelled).
    for (_, job) in jobs.drain() {
        job.task.abort();
    }
    state.hub.unregister(user_id, hub_id);
    drop(out_tx);
    let _ = writer.await;
    let _ = session.close(close_reason).await;
    metrics::gauge!("websocket_connections").decrement(1.0);
    tracing::info!(%user_id, "websocket closed");
}

/// When the caller lost access: the error is sent, and the reason to close
/// the socket with is returned.
async fn revoked(
    state: &AppState,
    principal: &Principal,
    validated: &mut (u64, Instant),
    out: &mpsc::Sender<Value>,
) -> Option<CloseReason> {
    let e = still_allowed(state, principal, validated).await.err()?;
    let _ = out.send(api_error_message(None, e)).await;
    Some(CloseReason {
        code: CloseCode::Policy,
        description: Some("access revoked".into()),
    })
}

/// Whether the socket's caller still has access: checked from the
/// database when this server saw a revocation of the user since the last
/// check, when its API key expired, or when the last check is older than
/// AUTH_CACHE_TTL_MS while other replicas' revocations are not relayed
/// here (docs/auth.md).
async fn still_allowed(
    state: &AppState,
    principal: &Principal,
    validated: &mut (u64, Instant),
) -> Result<(), ApiError> {
    let cache = state.auth.principal_cache();
    let ttl = Duration::from_millis(u64::try_from(cache.ttl_ms()).unwrap_or(0));
    let (epoch, at) = *validated;
    // An API key that expired since: refused by the database check below.
    let expired = matches!(principal.method, muse_auth::AuthMethod::ApiKey { expires_at: Some(e), .. }
        if e <= muse_core::Clock::now_ms(&muse_core::SystemClock));
    // Fresh, or every revocation since this caller's last check would have
    // reached this process (Redis relay up since before it).
    if !cache.revoked_since(principal.user.id, epoch)
        && !expired
        && (at.elapsed() < ttl || cache.relayed_since(epoch))
    {
        return Ok(());
    }
    // Checked lately for another socket (or an HTTP request) with the same
    // session or key, and no revocation since: no database read. Sockets of
    // one user that wake together take turns, so that the first one's read
    // serves the others.
    let user_id = principal.user.id;
    let turn = state.hub.recheck_turn(user_id);
    let outcome = {
        let _turn = turn.lock().await;
        if state.auth.revalidated_recently(principal) {
            Ok(())
        } else {
            let begin = cache.begin();
            let (auth, p) = (state.auth.clone(), principal.clone());
            let read = web::block(move || auth.revalidate(&p)).await;
            match read {
                Ok(Ok(())) => {
                    *validated = (begin, Instant::now());
                    Ok(())
                }
                Ok(Err(e)) => Err(ApiError::from(e)),
                Err(e) => Err(ApiError::from(e)),
            }
        }
    };
    state.hub.recheck_done(user_id, turn);
    outcome
}

/// One text message from the client.
async fn handle_text(
    state: &AppState,
    principal: &Principal,
    out: &mpsc::Sender<Value>,
    jobs: &mut HashMap<String, Job>,
    text: &str,
) {
    if text.len() > MAX_MESSAGE_BYTES {
        let m = format!("messages are limited to {MAX_MESSAGE_BYTES} bytes");
        let _ = out.send(error_message(None, "message_too_large", &m)).await;
        return;
    }
    let mut fields = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => map,
        Ok(_) => {
            let _ = out
                .send(error_message(
                    None,
                    "invalid_message",
                    "a message is a JSON object with a \"type\"",
                ))
                .await;
            return;
        }
        Err(e) => {
            let _ = out
                .send(error_message(
                    None,
                    "invalid_message",
                    &format!("not valid JSON: {e}"),
                ))
                .await;
            return;
        }
    };
    let kind = fields.remove("type");
    let id = match fields.remove("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if (1..=64).contains(&s.len()) => Some(s),
        Some(_) => {
            let _ = out
                .send(error_message(
                    None,
                    "invalid_message",
                    "\"id\" is a string of 1 to 64 characters",
                ))
                .await;
            return;
        }
    };
    match kind.as_ref().and_then(Value::as_str) {
        Some("ping") => {
            let _ = out.send(json!({"type": "pong", "id": id})).await;
        }
        Some("cancel") => {
            let Some(id) = id else {
                let _ = out
                    .send(error_message(
                        None,
                        "invalid_message",
                        "cancel needs the \"id\" of a generation",
                    ))
                    .await;
                return;
            };
            match jobs.remove(&id) {
                Some(job) if !job.task.is_finished() => {
                    job.task.abort();
                    let _ = out
                        .send(json!({"type": "cancelled", "id": id, "execution_id": job.execution_id.get()}))
                        .await;
                }
                _ => {
                    let _ = out
                        .send(error_message(
                            Some(&id),
                            "not_running",
                            "no generation with this id is running",
                        ))
                        .await;
                }
            }
        }
        Some(kind @ ("generate" | "execute")) => {
            let Some(id) = id else {
                let _ = out
                    .send(error_message(
                        None,
                        "invalid_message",
                        "give each generation an \"id\" (used by cancel and in replies)",
                    ))
                    .await;
                return;
            };
            jobs.retain(|_, j| !j.task.is_finished());
            if jobs.contains_key(&id) {
                let _ = out
                    .send(error_message(
                        Some(&id),
                        "duplicate_id",
                        "a generation with this id is still running",
                    ))
                    .await;
                return;
            }
            if jobs.len() >= MAX_CONCURRENT {
                let m = format!("at most {MAX_CONCURRENT} generations run at once on one socket");
                let _ = out
                    .send(error_message(Some(&id), "too_many_generations", &m))
                    .await;
                return;
            }
            let execution_id = Arc::new(OnceLock::new());
            let task = actix_web::rt::spawn(generation(
                state.clone(),
                principal.clone(),
                out.clone(),
                id.clone(),
                kind == "execute",
                fields,
                execution_id.clone(),
            ));
            jobs.insert(id, Job { task, execution_id });
        }
        Some(other) => {
            let m = format!("unknown message type {other:?} (generate, execute, cancel, ping)");
            let _ = out
                .send(error_message(id.as_deref(), "unknown_type", &m))
                .await;
        }
        None => {
            let _ = out
                .send(error_message(
                    id.as_deref(),
                    "invalid_message",
                    "a message needs a string \"type\"",
                ))
                .await;
        }
    }
}

async fn prepare(
    state: &AppState,
    principal: &Principal,
    execute: bool,
    mut fields: Map<String, Value>,
) -> Result<Run, ApiError> {
    let bad = |e: serde_json::Error| {
        ApiError::new(
            actix_web::http::StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            format!("the message does not match the expected shape: {e}"),
        )
    };
    if execute {
        let prompt_id = fields
            .remove("prompt_id")
            .and_then(|v| v.as_str().and_then(|s| Uuid::parse_str(s).ok()))
            .ok_or_else(|| {
                ApiError::new(
                    actix_web::http::StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_body",
                    "execute needs a \"prompt_id\" (a UUID)",
                )
            })?;
        let body: ExecuteBody = serde_json::from_value(Value::Object(fields)).map_err(bad)?;
        prepare_execution(state, principal, prompt_id, body).await
    } else {
        let body: IdeaBody = serde_json::from_value(Value::Object(fields)).map_err(bad)?;
        prepare_idea(state, principal, body).await
    }
}

/// One generation: prepared, streamed to the socket, recorded. Aborting
/// the task drops the run, which cancels the upstream call and records the
/// execution as cancelled.
async fn generation(
    state: AppState,
    principal: Principal,
    out: mpsc::Sender<Value>,
    id: String,
    execute: bool,
    fields: Map<String, Value>,
    execution_id: Arc<OnceLock<Uuid>>,
) {
    let run = match prepare(&state, &principal, execute, fields).await {
        Ok(run) => run,
        Err(e) => {
            let _ = out.send(api_error_message(Some(&id), e)).await;
            return;
        }
    };
    let exec = run.id;
    let _ = execution_id.set(exec);
    let model = run.key.clone();
    if out
        .send(json!({"type": "started", "id": id, "execution_id": exec, "model": model}))
        .await
        .is_err()
    {
        return;
    }
    let mut events = match run.stream().await {
        Ok(events) => events,
        Err(failed) => {
            let mut e = ApiError::from(failed.error);
            e.details = Some(Box::new(json!({"execution_id": failed.execution.id})));
            let _ = out.send(api_error_message(Some(&id), e)).await;
            return;
        }
    };
    while let Some(event) = events.next().await {
        let (name, data) = sse::encode(event, exec);
        let mut msg = json!({"type": name, "id": id});
        if let (Value::Object(m), Value::Object(d)) = (&mut msg, data) {
            m.extend(d);
        }
        // A closed socket ends the loop; dropping `events` cancels the run.
        if out.send(msg).await.is_err() {
            return;
        }
    }
}
