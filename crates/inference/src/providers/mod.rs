//! The remote providers and what they share: timeouts and the streaming
//! driver that turns protocol events into [`StreamEvent`]s.

pub mod anthropic;
pub mod gemini;
pub mod openai;

use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};

use crate::error::InferenceError;
use crate::types::*;

/// Time limits of one provider.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    /// Whole non-streamed call.
    pub request: Duration,
    /// From sending a streamed request to its first token.
    pub first_token: Duration,
    /// Between two events of a stream.
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(10),
            request: Duration::from_secs(120),
            first_token: Duration::from_secs(60),
            idle: Duration::from_secs(60),
        }
    }
}

fn build_client(connect: Duration) -> Result<reqwest::Client, InferenceError> {
    reqwest::Client::builder()
        .connect_timeout(connect)
        .build()
        .map_err(|e| InferenceError::NotConfigured(format!("HTTP client: {e}")))
}

/// A provider's HTTP client: one per calling thread, each with its own
/// connection pool.
///
/// A pooled connection is driven by a task on the runtime of the thread
/// that opened it. Shared between the server's workers (one runtime per
/// thread), a call on one worker that took a connection opened by another
/// hands its request to that other thread and waits for it to be scheduled
/// to write and read the socket: two cross-thread wake-ups per call, and a
/// call slowed whenever the other worker is busy or descheduled. With a
/// client per thread, a call's connection lives on its own thread.
///
/// Building a client takes about 2 ms (its TLS settings), too long for an
/// HTTP worker's first call: one per CPU (the default number of workers)
/// is built with the provider, and a thread takes one of those; only
/// threads beyond them build their own.
#[derive(Clone)]
pub(crate) struct HttpClient {
    per_thread: std::sync::Arc<thread_local::ThreadLocal<reqwest::Client>>,
    /// Built with the provider, each waiting for the thread that takes it.
    spare: std::sync::Arc<std::sync::Mutex<Vec<reqwest::Client>>>,
    /// Built with the provider (so a client that cannot be built is an
    /// error then), and used by threads whose own client could not be built.
    first: reqwest::Client,
    connect: Duration,
}

impl HttpClient {
    pub(crate) fn new(timeouts: &Timeouts) -> Result<Self, InferenceError> {
        let cpus = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
        let spare = (0..cpus)
            .map(|_| build_client(timeouts.connect))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            per_thread: std::sync::Arc::default(),
            spare: std::sync::Arc::new(std::sync::Mutex::new(spare)),
            first: build_client(timeouts.connect)?,
            connect: timeouts.connect,
        })
    }

    /// The calling thread's client.
    pub(crate) fn get(&self) -> &reqwest::Client {
        self.per_thread.get_or(|| {
            let spare = self
                .spare
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .pop();
            spare.unwrap_or_else(|| {
                build_client(self.connect).unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "sharing the first HTTP client on this thread");
                    self.first.clone()
                })
            })
        })
    }
}

/// An `f32` as the decimal it was written as: 0.3, not
/// 0.30000001192092896 (what `f64::from(0.3f32)` prints).
/// Refuses, by name, what `api` has no equivalent of: log-probabilities
/// and token biases (Anthropic's Messages API, Gemini's generateContent).
pub(crate) fn refuse_logprobs_and_bias(
    request: &crate::types::GenerateRequest,
    api: &str,
) -> Result<(), crate::error::InferenceError> {
    let refused = if request.logprobs.is_some() {
        "logprobs"
    } else if !request.logit_bias.is_empty() {
        "logit_bias"
    } else {
        return Ok(());
    };
    Err(crate::error::InferenceError::Unsupported {
        param: refused.into(),
        message: format!("{refused} is not served through {api}: leave it out for these models"),
    })
}

pub(crate) fn f32_json(x: f32) -> serde_json::Value {
    x.to_string()
        .parse::<f64>()
        .map(serde_json::Value::from)
        .unwrap_or_default()
}

/// Turns as the Anthropic and Gemini APIs want them: consecutive turns of
/// one role merged into one (their blocks or parts in order), each written
/// as `{"role": role, <key>: [...]}`.
pub(crate) fn merge_turns<'a>(
    turns: impl Iterator<Item = (&'a str, Vec<serde_json::Value>)>,
    key: &str,
) -> Vec<serde_json::Value> {
    let mut out: Vec<(&str, Vec<serde_json::Value>)> = Vec::new();
    for (role, mut items) in turns {
        match out.last_mut() {
            Some((last, prev)) if *last == role => prev.append(&mut items),
            _ => out.push((role, items)),
        }
    }
    out.into_iter()
        .map(|(role, items)| serde_json::json!({"role": role, key: items}))
        .collect()
}

/// A JSON array of numbers as an `f32` vector (embeddings).
pub(crate) fn f32_vector(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_f64())
                .map(|x| x as f32)
                .collect()
        })
        .unwrap_or_default()
}

/// Embeddings must come back one per input.
pub(crate) fn check_embedding_count(got: usize, inputs: usize) -> Result<(), InferenceError> {
    if got == inputs {
        Ok(())
    } else {
        Err(InferenceError::Protocol(format!(
            "{got} embeddings for {inputs} inputs"
        )))
    }
}

/// Model names go into URL paths: allow only what real names use.
pub(crate) fn check_model_name(model: &str) -> Result<(), InferenceError> {
    let ok = !model.is_empty()
        && model.len() <= 200
        && model
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/' | '@'))
        && !model.contains("..");
    if ok {
        Ok(())
    } else {
        Err(InferenceError::BadRequest(format!(
            "invalid model name {model:?}"
        )))
    }
}

/// What a protocol parser makes of one event.
pub(crate) enum Step {
    Skip,
    Delta(String),
    /// Several events from one protocol event (text and tool-call
    /// fragments of one chunk), yielded in order.
    Events(Vec<StreamEvent>),
    Done {
        model: String,
        usage: Usage,
        finish_reason: FinishReason,
    },
}

/// A protocol's streaming state machine.
pub(crate) trait StreamParser: Send + 'static {
    type Event: Send;
    fn event(&mut self, event: Self::Event) -> Result<Step, InferenceError>;
    /// The transport ended. Protocols with an explicit end event answer an
    /// error here (the stream was cut).
    fn end(&mut self) -> Result<Step, InferenceError>;
}

struct Drive<S, P> {
    events: S,
    parser: P,
    started: Instant,
    first_token: Option<Duration>,
    timeouts: Timeouts,
    finished: bool,
    /// Events parsed but not yet yielded.
    queued: std::collections::VecDeque<StreamEvent>,
}

/// Runs `parser` over `events` with the first-token and idle timeouts, and
/// fills in the timing of the final event. Dropping the result drops the
/// transport (closing the connection).
pub(crate) fn drive<S, P>(
    events: S,
    parser: P,
    started: Instant,
    timeouts: Timeouts,
) -> CompletionStream
where
    S: Stream<Item = Result<P::Event, InferenceError>> + Send + Unpin + 'static,
    P: StreamParser,
{
    let state = Drive {
        events,
        parser,
        started,
        first_token: None,
        timeouts,
        finished: false,
        queued: Default::default(),
    };
    futures::stream::unfold(state, |mut st| async move {
        if let Some(e) = st.queued.pop_front() {
            return Some((Ok(e), st));
        }
        if st.finished {
            return None;
        }
        loop {
            let limit = if st.first_token.is_none() {
                st.timeouts.first_token.saturating_sub(st.started.elapsed())
            } else {
                st.timeouts.idle
            };
            let step = match tokio::time::timeout(limit, st.events.next()).await {
                Err(_) => Err(InferenceError::Timeout),
                Ok(None) => st.parser.end(),
                Ok(Some(Err(e))) => Err(e),
                Ok(Some(Ok(ev))) => st.parser.event(ev),
            };
            match step {
                Ok(Step::Skip) => continue,
                Ok(Step::Delta(text)) if text.is_empty() => continue,
                Ok(Step::Delta(text)) => {
                    st.first_token.get_or_insert_with(|| st.started.elapsed());
                    return Some((Ok(StreamEvent::Delta(text)), st));
                }
                Ok(Step::Events(events)) if !events.is_empty() => {
                    st.first_token.get_or_insert_with(|| st.started.elapsed());
                    // One event per poll; the rest wait in order.
                    st.queued.extend(events);
                    let first = st.queued.pop_front()?;
                    return Some((Ok(first), st));
                }
                Ok(Step::Events(_)) => continue,
                Ok(Step::Done {
                    model,
                    usage,
                    finish_reason,
                }) => {
                    st.finished = true;
                    let timing = Timing {
                        time_to_first_token: st.first_token,
                        total: st.started.elapsed(),
                    };
                    return Some((
                        Ok(StreamEvent::Done(Summary {
                            model,
                            usage,
                            finish_reason,
                            timing,
                        })),
                        st,
                    ));
                }
                Err(e) => {
                    st.finished = true;
                    return Some((Err(e), st));
                }
            }
        }
    })
    .boxed()
}

/// Sends a provider request with the right time limit (the whole call, or
/// the wait for the response head of a stream) and turns an error status
/// into a typed error with the provider's own `map_error`.
pub(crate) async fn send(
    builder: reqwest::RequestBuilder,
    stream: bool,
    timeouts: &Timeouts,
    map_error: fn(u16, &reqwest::header::HeaderMap, &str) -> InferenceError,
) -> Result<reqwest::Response, InferenceError> {
    let response = if stream {
        tokio::time::timeout(
            timeouts.first_token,
            builder.header("accept", "text/event-stream").send(),
        )
        .await
        .map_err(|_| InferenceError::Timeout)?
    } else {
        builder.timeout(timeouts.request).send().await
    }
    .map_err(|e| InferenceError::from_reqwest(&e))?;
    if response.status().is_success() {
        return Ok(response);
    }
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body: String = response
        .text()
        .await
        .unwrap_or_default()
        .chars()
        .take(2000)
        .collect();
    Err(map_error(status, &headers, &body))
}

/// Collects a stream into one completion (used by tests and callers that
/// want both shapes from one code path).
pub async fn collect(mut stream: CompletionStream) -> Result<Completion, InferenceError> {
    let mut text = String::new();
    let mut calls = ToolCallCollector::default();
    let mut logprobs = Vec::new();
    while let Some(event) = stream.next().await {
        match event? {
            StreamEvent::Delta(t) => text.push_str(&t),
            StreamEvent::ToolCall(d) => calls.push(&d),
            StreamEvent::Logprobs(l) => logprobs.extend(l),
            StreamEvent::Done(summary) => {
                return Ok(Completion {
                    text,
                    tool_calls: calls.finish(),
                    logprobs,
                    summary,
                })
            }
        }
    }
    Err(InferenceError::Protocol(
        "the stream ended without a final event".into(),
    ))
}

#[cfg(test)]
mod f32_tests {
    #[test]
    fn floats_keep_their_decimal_form() {
        assert_eq!(super::f32_json(0.3).to_string(), "0.3");
        assert_eq!(super::f32_json(1.0).to_string(), "1.0");
        assert_eq!(super::f32_json(0.95).to_string(), "0.95");
    }
}
