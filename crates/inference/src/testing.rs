//! Deterministic providers for tests of other crates (no network).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;

use crate::error::InferenceError;
use crate::types::*;

/// Answers `echo: <last user message>`, one word per stream delta. Usage
/// counts whitespace-separated words; `max_tokens` truncates (finish
/// reason `length`). Same input, same output.
#[derive(Debug, Default)]
pub struct EchoProvider {
    /// Errors to return, in order, before answering normally.
    failures: Mutex<VecDeque<InferenceError>>,
    calls: Mutex<u32>,
}

impl EchoProvider {
    pub fn new() -> Self {
        Self::default()
    }

    /// Fails the next calls with these errors, then behaves.
    pub fn failing_with(errors: Vec<InferenceError>) -> Self {
        Self {
            failures: Mutex::new(errors.into()),
            calls: Mutex::new(0),
        }
    }

    /// How many calls reached this provider.
    pub fn calls(&self) -> u32 {
        self.calls.lock().map(|c| *c).unwrap_or(0)
    }

    fn start(&self) -> Result<(), InferenceError> {
        if let Ok(mut c) = self.calls.lock() {
            *c += 1;
        }
        match self.failures.lock().ok().and_then(|mut f| f.pop_front()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn answer(request: &GenerateRequest) -> (Vec<String>, Usage, FinishReason) {
        let last = match &request.prompt {
            Some(p) => p.as_str(),
            None => request
                .messages
                .iter()
                .rev()
                .find(|m| m.role == Role::User)
                .map(|m| m.content.as_str())
                .unwrap_or_default(),
        };
        let mut words: Vec<String> = std::iter::once("echo:".to_string())
            .chain(last.split_whitespace().map(str::to_string))
            .collect();
        let mut finish = FinishReason::Stop;
        if let Some(max) = request.max_tokens {
            if words.len() > max as usize {
                words.truncate(max as usize);
                finish = FinishReason::Length;
            }
        }
        let prompt_tokens: usize = request
            .messages
            .iter()
            .map(|m| m.content.split_whitespace().count())
            .sum::<usize>()
            + request
                .prompt
                .as_deref()
                .map_or(0, |p| p.split_whitespace().count());
        let usage = Usage {
            prompt_tokens: u32::try_from(prompt_tokens).unwrap_or(u32::MAX),
            completion_tokens: u32::try_from(words.len()).unwrap_or(u32::MAX),
        };
        (words, usage, finish)
    }
}

#[async_trait]
impl LlmProvider for EchoProvider {
    fn id(&self) -> &str {
        "test"
    }

    async fn complete(&self, request: &GenerateRequest) -> Result<Completion, InferenceError> {
        let start = Instant::now();
        self.start()?;
        let (words, usage, finish_reason) = Self::answer(request);
        let elapsed = start.elapsed();
        Ok(Completion {
            logprobs: Vec::new(),
            tool_calls: Vec::new(),
            text: words.join(" "),
            summary: Summary {
                model: request.model.clone(),
                usage,
                finish_reason,
                timing: Timing {
                    time_to_first_token: Some(elapsed),
                    total: elapsed,
                },
            },
        })
    }

    async fn stream(&self, request: &GenerateRequest) -> Result<CompletionStream, InferenceError> {
        let start = Instant::now();
        self.start()?;
        let (words, usage, finish_reason) = Self::answer(request);
        let model = request.model.clone();
        let n = words.len();
        let deltas = words.into_iter().enumerate().map(move |(i, w)| {
            Ok(StreamEvent::Delta(if i + 1 < n {
                format!("{w} ")
            } else {
                w
            }))
        });
        let done = futures::stream::once(async move {
            let total = start.elapsed();
            Ok(StreamEvent::Done(Summary {
                model,
                usage,
                finish_reason,
                timing: Timing {
                    time_to_first_token: Some(total.min(Duration::from_millis(1))),
                    total,
                },
            }))
        });
        Ok(futures::stream::iter(deltas).chain(done).boxed())
    }
}
