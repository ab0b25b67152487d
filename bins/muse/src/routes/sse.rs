//! Server-Sent Events for streamed runs (prompt executions and ideas),
//! readable by a browser `EventSource`:
//!
//! ```text
//! event: start    data: {"execution_id", "idea_id"?, "llm_provider", "llm_model", ...}
//! event: token    data: {"text": "..."}            (one per token)
//! event: done     data: {"execution_id", "usage", "cost", "execution_time", ...}
//! event: error    data: {"execution_id", "error": {"code", "message"}}
//! ```
//!
//! The stream ends after `done` or `error`; an `EventSource` client should
//! `close()` then, or it reconnects (and a spent stream ticket answers 401).

use actix_web::web::Bytes;
use actix_web::HttpResponse;
use futures_util::{Stream, StreamExt};
use serde_json::{json, Value};

use crate::error::ApiError;
use muse_gateway::RunEvent;

fn event(name: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

/// Encodes one run event as the JSON that SSE and WebSocket clients get:
/// `(event name, data)`.
pub fn encode(event: RunEvent, execution_id: uuid::Uuid) -> (&'static str, Value) {
    match event {
        RunEvent::Token(text) => ("token", json!({ "text": text })),
        RunEvent::ToolCall(d) => (
            "tool_call",
            json!({ "index": d.index, "id": d.id, "name": d.name, "arguments": d.arguments }),
        ),
        RunEvent::Logprobs(l) => ("logprobs", json!({ "content": l })),
        RunEvent::Done(done) => ("done", done.summary()),
        RunEvent::Failed(failed) => {
            let api = ApiError::from(failed.error);
            (
                "error",
                json!({"execution_id": execution_id, "error": {"code": api.code, "message": api.message}}),
            )
        }
    }
}

/// The streaming response: `start`, then the run's events.
pub fn respond(
    start: Value,
    execution_id: uuid::Uuid,
    events: impl Stream<Item = RunEvent> + Unpin + 'static,
) -> HttpResponse {
    let head = futures_util::stream::once({
        let b = event("start", &start);
        async move { Ok::<_, actix_web::Error>(b) }
    });
    let body = events.map(move |e| {
        let (name, data) = encode(e, execution_id);
        Ok::<_, actix_web::Error>(event(name, &data))
    });
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("cache-control", "no-cache"))
        .insert_header(("x-accel-buffering", "no"))
        .insert_header(("x-muse-execution-id", execution_id.to_string()))
        .streaming(head.chain(body))
}
