//! One model call made for a user, whatever started it (the OpenAI API,
//! a prompt execution, an idea, a WebSocket message): it is run on the
//! registry and recorded as an execution exactly once — succeeded, failed,
//! or cancelled when the caller goes away before the end (the [`Run`] is
//! dropped, which also drops the upstream call or stops the local decode).
//! The metrics `active_executions`, `prompt_executions_total` and
//! `prompt_execution_duration_seconds` are kept here.

use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt};
use muse_inference::{
    CompletionStream, FinishReason, GenerateRequest, InferenceError, Message, Role, StreamEvent,
    ToolCall, ToolCallCollector, ToolCallDelta, Usage,
};
use muse_prompts::{Execution, ExecutionSource, ExecutionStatus, Idea};
use serde_json::Value;
use uuid::Uuid;

use crate::admission::{AdmitError, Held};
use crate::Gateway;

/// A call about to run. Dropping it before it ends records a cancellation.
pub struct Run {
    gateway: Gateway,
    pub id: Uuid,
    user_id: Uuid,
    source: ExecutionSource,
    pub key: String,
    request: GenerateRequest,
    prompt: Option<(Uuid, i32)>,
    variables: Option<Value>,
    rendered: String,
    idea: Option<Idea>,
    started: Instant,
    text: String,
    /// Tool calls of the answer (whole, or assembled from fragments).
    calls: ToolCallCollector,
    /// The calls once recorded (handed to [`Finished`]).
    finished_calls: Vec<ToolCall>,
    deltas: u32,
    /// The provider was called (a run dropped before that cost nothing).
    called: bool,
    first: Option<Duration>,
    finished: bool,
    /// The quota this call holds, reconciled when it is recorded.
    reservation: Option<Held>,
}

/// A call that succeeded (already recorded).
#[derive(Debug, Clone)]
pub struct Finished {
    pub execution: Execution,
    pub finish_reason: FinishReason,
    /// The functions the model asked to call.
    pub tool_calls: Vec<ToolCall>,
    /// The answer's tokens with their log-probabilities (whole answers
    /// that asked for them; streams carry them as events).
    pub logprobs: Vec<muse_inference::TokenLogprob>,
    /// The stored idea, for idea generations.
    pub idea: Option<Idea>,
}

impl Finished {
    /// The final message of a stream (SSE `done`, WebSocket `done`).
    pub fn summary(&self) -> Value {
        let e = &self.execution;
        serde_json::json!({
            "execution_id": e.id,
            "idea_id": self.idea.as_ref().map(|i| i.id),
            "prompt_id": e.prompt_id,
            "prompt_version": e.prompt_version,
            "llm_provider": e.provider,
            "llm_model": e.model,
            "usage": {"prompt_tokens": e.prompt_tokens, "completion_tokens": e.completion_tokens, "total_tokens": e.prompt_tokens + e.completion_tokens},
            "cost": e.cost_usd,
            "execution_time": e.duration_ms as f64 / 1000.0,
            "time_to_first_token": e.ttft_ms.map(|t| t as f64 / 1000.0),
            "finish_reason": match &self.finish_reason {
                FinishReason::Stop => "stop",
                FinishReason::Length => "length",
                FinishReason::ContentFilter => "content_filter",
                FinishReason::ToolCalls => "tool_calls",
                FinishReason::Other(_) => "other",
            },
        })
    }
}

/// A call that failed (already recorded).
#[derive(Debug)]
pub struct Failed {
    pub execution: Execution,
    pub error: InferenceError,
}

/// What a streamed run yields: tokens, then exactly one `Done` or `Failed`.
#[derive(Debug)]
pub enum RunEvent {
    Token(String),
    /// A fragment of a tool call (only when the request offered tools).
    ToolCall(ToolCallDelta),
    /// Log-probabilities of the latest tokens (only when asked for).
    Logprobs(Vec<muse_inference::TokenLogprob>),
    Done(Box<Finished>),
    Failed(Box<Failed>),
}

/// The messages as one text, for the record of chat calls (capped at 100 kB).
pub fn transcript(messages: &[Message]) -> String {
    let mut out = String::new();
    for m in messages {
        let role = match m.role {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        };
        out.push_str(role);
        out.push_str(": ");
        out.push_str(&m.content);
        for c in &m.tool_calls {
            out.push_str(&format!(" [call {} {}({})]", c.id, c.name, c.arguments));
        }
        out.push('\n');
        if out.len() > 100_000 {
            out.truncate(out.floor_char_boundary(100_000));
            break;
        }
    }
    out
}

impl Run {
    pub fn new(
        gateway: &Gateway,
        user_id: Uuid,
        source: ExecutionSource,
        key: &str,
        request: GenerateRequest,
    ) -> Self {
        metrics::gauge!("active_executions").increment(1.0);
        let rendered = match &request.prompt {
            Some(p) if p.len() > 100_000 => p[..p.floor_char_boundary(100_000)].to_string(),
            Some(p) => p.clone(),
            None => transcript(&request.messages),
        };
        Self {
            gateway: gateway.clone(),
            id: Uuid::now_v7(),
            user_id,
            source,
            key: key.to_string(),
            request,
            prompt: None,
            variables: None,
            rendered,
            idea: None,
            started: Instant::now(),
            text: String::new(),
            calls: ToolCallCollector::default(),
            finished_calls: Vec::new(),
            deltas: 0,
            called: false,
            first: None,
            finished: false,
            reservation: None,
        }
    }

    /// Reserves this call's worst case against the user's plan quotas; on
    /// refusal the run is dropped unrecorded (nothing was called) and the
    /// reason returned.
    pub async fn admit(mut self) -> Result<Self, AdmitError> {
        match self
            .gateway
            .reserve(self.user_id, &self.key, &self.request)
            .await
        {
            Ok(r) => {
                self.reservation = Some(r);
                Ok(self)
            }
            Err(e) => {
                self.finished = true;
                metrics::gauge!("active_executions").decrement(1.0);
                Err(e)
            }
        }
    }

    /// Records the prompt, its version and the variables used.
    pub fn with_prompt(mut self, prompt_id: Uuid, version: i32, variables: Value) -> Self {
        self.prompt = Some((prompt_id, version));
        self.variables = Some(variables);
        self
    }

    /// Stores `idea` (its `content` set to the output) when the call succeeds.
    pub fn with_idea(mut self, idea: Idea) -> Self {
        self.idea = Some(idea);
        self
    }

    /// The prompt's tokens, estimated as the quota does (4 characters a
    /// token).
    fn prompt_estimate(&self) -> u32 {
        crate::admission::estimated_prompt_tokens(&self.request)
    }

    fn provider_model(&self) -> (String, String) {
        match self.key.split_once('/') {
            Some((p, m)) => (p.to_string(), m.to_string()),
            None => ("unknown".to_string(), self.key.clone()),
        }
    }

    /// Builds the execution, counts it in the metrics, and queues it (and
    /// the idea, on success, and the quota's reconciliation) for the
    /// writer. The returned handle says when the rows are written (`None`
    /// with [`crate::WriteMode::Async`]); a write failure is logged.
    fn record(
        &mut self,
        status: ExecutionStatus,
        usage: Usage,
        cost: Option<f64>,
        error: Option<String>,
    ) -> (Execution, Option<Idea>, Option<crate::writer::Written>) {
        self.finished = true;
        metrics::gauge!("active_executions").decrement(1.0);
        let (provider, model) = self.provider_model();
        let elapsed = self.started.elapsed();
        let source = self.source.as_str();
        // Label values only from the registry: a name a caller made up
        // (model_not_found) must not create a series of its own.
        let (label_provider, label_model) =
            if self.gateway.models().provider_of(&self.key).is_some() {
                (provider.clone(), model.clone())
            } else {
                ("unknown".to_string(), "unknown".to_string())
            };
        metrics::counter!("prompt_executions_total", "source" => source, "provider" => label_provider.clone(), "model" => label_model.clone(), "status" => status.as_str())
            .increment(1);
        metrics::histogram!("prompt_execution_duration_seconds", "source" => source, "provider" => label_provider, "model" => label_model)
            .record(elapsed.as_secs_f64());
        let execution = Execution {
            id: self.id,
            user_id: self.user_id,
            source: self.source,
            prompt_id: self.prompt.map(|p| p.0),
            prompt_version: self.prompt.map(|p| p.1),
            provider: provider.clone(),
            model: model.clone(),
            variables: self.variables.take(),
            rendered_prompt: Some(std::mem::take(&mut self.rendered)),
            output: Some(self.output_record()),
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            cost_usd: cost,
            duration_ms: i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX),
            ttft_ms: self
                .first
                .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
            status,
            error,
            created_at: muse_core::Clock::now_ms(&muse_core::SystemClock),
        };
        let idea = self
            .idea
            .take()
            .filter(|_| status == ExecutionStatus::Succeeded)
            .map(|mut idea| {
                idea.execution_id = execution.id;
                idea.provider = provider;
                idea.model = model;
                idea.content = execution.output.clone().unwrap_or_default();
                idea.created_at = execution.created_at;
                idea
            });
        let usage = self.reservation.take().map(|held| {
            let used = i64::from(usage.prompt_tokens) + i64::from(usage.completion_tokens);
            self.gateway.settle(held, used, cost.unwrap_or(0.0))
        });
        // Group commit (crate::writer): the answer waits for it unless
        // WriteMode::Async.
        let record = muse_prompts::CallRecord {
            execution: execution.clone(),
            idea: idea.clone(),
            usage,
        };
        let writer = self.gateway.writer();
        let written = writer.submit(record);
        let handle = match writer.mode() {
            crate::writer::WriteMode::Sync => written,
            crate::writer::WriteMode::Async => None,
        };
        (execution, idea, handle)
    }

    /// The answer as recorded: its text, then each tool call on a line of
    /// its own as OpenAI's JSON (`{"id", "type", "function"}`).
    fn output_record(&mut self) -> String {
        let mut out = std::mem::take(&mut self.text);
        for c in std::mem::take(&mut self.calls).finish() {
            if !out.is_empty() {
                out.push('\n');
            }
            out.push_str(
                &serde_json::json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}})
                    .to_string(),
            );
            self.finished_calls.push(c);
        }
        out
    }

    async fn succeed(mut self, usage: Usage, reason: FinishReason) -> Finished {
        let cost = self.gateway.cost_of(&self.key, &usage);
        let text = self.text.clone();
        let (mut execution, idea, written) =
            self.record(ExecutionStatus::Succeeded, usage, cost, None);
        if let Some(w) = written {
            let _ = w.await;
        }
        let tool_calls = std::mem::take(&mut self.finished_calls);
        if !tool_calls.is_empty() {
            // Callers answer with the text; the calls travel apart.
            execution.output = Some(text);
        }
        Finished {
            execution,
            finish_reason: reason,
            tool_calls,
            logprobs: Vec::new(),
            idea,
        }
    }

    async fn fail(mut self, error: InferenceError) -> Failed {
        let status = if matches!(error, InferenceError::Cancelled) {
            ExecutionStatus::Cancelled
        } else {
            ExecutionStatus::Failed
        };
        // Cut after output began: the provider billed the prompt and what
        // it wrote (estimated: usage comes only with a stream's end).
        let usage = Usage {
            prompt_tokens: if self.deltas > 0 {
                self.prompt_estimate()
            } else {
                0
            },
            completion_tokens: self.deltas,
        };
        let cost = (usage.total() > 0)
            .then(|| self.gateway.cost_of(&self.key, &usage))
            .flatten();
        let (execution, _, written) = self.record(status, usage, cost, Some(error.to_string()));
        if let Some(w) = written {
            let _ = w.await;
        }
        Failed { execution, error }
    }

    /// Records a call refused before it reached the model (invalid
    /// variables, say) as a failed execution.
    pub fn reject(mut self, error: &str) -> Execution {
        self.record(
            ExecutionStatus::Failed,
            Usage::default(),
            None,
            Some(error.to_string()),
        )
        .0
    }

    /// Runs an embeddings call on `inputs` (the run's request carries them
    /// as its prompt, for the quota estimate and the record). The record's
    /// output says how many vectors of which size came back.
    pub async fn embed(
        mut self,
        inputs: Vec<String>,
        dimensions: Option<u32>,
    ) -> Result<(muse_inference::Embeddings, Finished), Box<Failed>> {
        self.called = true;
        let models = self.gateway.models().clone();
        let request = muse_inference::EmbedRequest {
            model: self.key.clone(),
            inputs,
            dimensions,
        };
        match models.embed(&self.key, &request).await {
            Ok((embeddings, cost)) => {
                let dims = embeddings.vectors.first().map_or(0, Vec::len);
                self.text = format!(
                    "{} embeddings of {dims} dimensions",
                    embeddings.vectors.len()
                );
                let cost = cost.or_else(|| self.gateway.cost_of(&self.key, &embeddings.usage));
                let (execution, _, written) =
                    self.record(ExecutionStatus::Succeeded, embeddings.usage, cost, None);
                if let Some(w) = written {
                    let _ = w.await;
                }
                let finished = Finished {
                    execution,
                    finish_reason: FinishReason::Stop,
                    tool_calls: Vec::new(),
                    logprobs: Vec::new(),
                    idea: None,
                };
                Ok((embeddings, finished))
            }
            Err(e) => Err(Box::new(self.fail(e).await)),
        }
    }

    /// Runs the whole call.
    pub async fn complete(mut self) -> Result<Finished, Box<Failed>> {
        self.called = true;
        let models = self.gateway.models().clone();
        match models.complete(&self.key, &self.request).await {
            Ok(priced) => {
                let c = priced.completion;
                self.text = c.text;
                for (i, call) in c.tool_calls.into_iter().enumerate() {
                    self.calls.push(&ToolCallDelta {
                        index: u32::try_from(i).unwrap_or(u32::MAX),
                        id: Some(call.id),
                        name: Some(call.name),
                        arguments: call.arguments,
                    });
                }
                self.first = c.summary.timing.time_to_first_token;
                let mut done = self.succeed(c.summary.usage, c.summary.finish_reason).await;
                done.logprobs = c.logprobs;
                Ok(done)
            }
            Err(e) => Err(Box::new(self.fail(e).await)),
        }
    }

    /// Opens the stream (errors before the first token are returned here,
    /// recorded) and yields its events.
    pub async fn stream(mut self) -> Result<impl Stream<Item = RunEvent> + Unpin, Box<Failed>> {
        self.called = true;
        let models = self.gateway.models().clone();
        let upstream: CompletionStream = match models.stream(&self.key, &self.request).await {
            Ok(s) => s,
            Err(e) => return Err(Box::new(self.fail(e).await)),
        };
        let cut = self.gateway.stream_cut().subscribe();
        let events = futures_util::stream::unfold(Some((self, upstream, cut)), |st| async move {
            let (mut run, mut upstream, mut cut) = st?;
            let next = tokio::select! {
                next = upstream.next() => next,
                () = stream_cut(&mut cut) => Some(Err(InferenceError::Interrupted(
                    "the server is shutting down; send the request again".into(),
                ))),
            };
            match next {
                Some(Ok(StreamEvent::Delta(text))) => {
                    run.first.get_or_insert_with(|| run.started.elapsed());
                    run.deltas = run.deltas.saturating_add(1);
                    run.text.push_str(&text);
                    Some((RunEvent::Token(text), Some((run, upstream, cut))))
                }
                Some(Ok(StreamEvent::ToolCall(d))) => {
                    run.first.get_or_insert_with(|| run.started.elapsed());
                    run.calls.push(&d);
                    Some((RunEvent::ToolCall(d), Some((run, upstream, cut))))
                }
                Some(Ok(StreamEvent::Logprobs(l))) => {
                    Some((RunEvent::Logprobs(l), Some((run, upstream, cut))))
                }
                Some(Ok(StreamEvent::Done(summary))) => {
                    let done = run.succeed(summary.usage, summary.finish_reason).await;
                    Some((RunEvent::Done(Box::new(done)), None))
                }
                Some(Err(e)) => Some((RunEvent::Failed(Box::new(run.fail(e).await)), None)),
                None => {
                    let e =
                        InferenceError::Protocol("the stream ended without a final event".into());
                    Some((RunEvent::Failed(Box::new(run.fail(e).await)), None))
                }
            }
        });
        Ok(Box::pin(events))
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if !self.finished {
            // The caller went away first: the upstream call (or local decode)
            // was dropped with it; the partial answer is kept.
            // What was spent, estimated (the provider's usage comes only
            // with the end): the prompt, and a token per delta received.
            // A run dropped before its call (another choice refused, the
            // socket closed while it was prepared) spent nothing.
            let usage = Usage {
                prompt_tokens: if self.called {
                    self.prompt_estimate()
                } else {
                    0
                },
                completion_tokens: self.deltas,
            };
            let cost = self
                .called
                .then(|| self.gateway.cost_of(&self.key, &usage))
                .flatten();
            let _ = self.record(
                ExecutionStatus::Cancelled,
                usage,
                cost,
                Some("cancelled before the end (client disconnected or asked to stop)".into()),
            );
        }
    }
}

/// Resolves once streams are to be cut (never if the sender is gone).
async fn stream_cut(cut: &mut tokio::sync::watch::Receiver<bool>) {
    if cut.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}
