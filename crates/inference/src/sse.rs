//! Server-Sent Events over a reqwest response.

use eventsource_stream::Eventsource;
use futures::{Stream, StreamExt};

use crate::error::{strip_url, InferenceError};

/// One SSE event: its `event:` name (empty when absent) and `data:`.
pub(crate) struct SseEvent {
    pub event: String,
    pub data: String,
}

pub(crate) fn events(
    response: reqwest::Response,
) -> impl Stream<Item = Result<SseEvent, InferenceError>> + Send {
    response
        .bytes_stream()
        .eventsource()
        .map(|item| match item {
            Ok(e) => Ok(SseEvent {
                event: e.event,
                data: e.data,
            }),
            Err(e) => Err(InferenceError::Protocol(format!(
                "broken event stream: {}",
                strip_url(&e.to_string())
            ))),
        })
}
