//! [`LocalProvider`]: local models behind the [`LlmProvider`] trait. Each
//! loaded model has its own worker thread (ONNX Runtime never runs on the
//! async executor) fed by a bounded FIFO queue: requests are served in
//! arrival order, one at a time per model. Dropping a stream cancels its
//! decode at the next token.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use futures::StreamExt;
use tokio::sync::mpsc;

use super::engine::{DecodeParams, LocalModel};
use super::guide::Guide;
use super::resolve::{cached_models, resolve_model};
use super::template::{message_values, tool_values, ChatInput};
use super::text::{Detokenizer, StopFilter};
use super::tools::{CallIds, ToolFormat, ToolStream};
use crate::error::InferenceError;
use crate::types::*;

#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// A Hugging Face cache (`models--org--name/…`).
    pub cache_dir: PathBuf,
    /// ONNX Runtime intra-op threads per model.
    pub threads: usize,
    /// Requests waiting per model before new ones are refused.
    pub max_queue: usize,
    /// Generations advanced together (round robin) per model.
    pub max_active: usize,
    /// `max_tokens` when the request has none.
    pub default_max_tokens: usize,
    /// Models to offer even before they are in the cache (downloaded on load).
    pub extra_models: Vec<String>,
    pub hub: super::download::HubConfig,
}

/// A loaded model, as reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedModel {
    pub model: String,
    pub weight_bytes: u64,
    pub context_length: Option<usize>,
}

struct Job {
    request: GenerateRequest,
    /// `false` for whole answers: the text is handed over once, at the end
    /// (one wake-up of the caller instead of one per token).
    streaming: bool,
    events: mpsc::Sender<Result<StreamEvent, InferenceError>>,
    started: Instant,
}

struct Worker {
    queue: SyncSender<Job>,
    info: LoadedModel,
}

type Workers = Arc<Mutex<BTreeMap<String, Arc<Worker>>>>;
/// Models served from a directory of their own (trained models), by name.
type Dirs = Arc<std::sync::RwLock<BTreeMap<String, PathBuf>>>;

type Embedders = Arc<Mutex<BTreeMap<String, Arc<Mutex<super::embed::LocalEmbedder>>>>>;

pub struct LocalProvider {
    config: LocalConfig,
    workers: Workers,
    dirs: Dirs,
    /// Sentence-embedding models, loaded on first use.
    embedders: Embedders,
}

impl LocalProvider {
    pub fn new(config: LocalConfig) -> Self {
        Self {
            config,
            workers: Arc::default(),
            dirs: Arc::default(),
            embedders: Arc::default(),
        }
    }

    /// Models present in the cache, the configured ones (which are
    /// downloaded when loaded), and the added directories, sorted.
    pub fn available(&self) -> Vec<String> {
        let mut all = cached_models(&self.config.cache_dir);
        all.extend(self.config.extra_models.iter().cloned());
        if let Ok(dirs) = self.dirs.read() {
            all.extend(dirs.keys().cloned());
        }
        all.sort();
        all.dedup();
        all
    }

    /// Cached models that cannot be served, with the reason (listed so an
    /// operator sees why, instead of the model vanishing).
    pub fn unservable(&self) -> Vec<(String, String)> {
        super::resolve::scan_cache(&self.config.cache_dir)
            .into_iter()
            .filter_map(|m| m.problem.map(|p| (m.id, p)))
            .collect()
    }

    /// Serves the ONNX causal-LM export in `dir` (model.onnx, tokenizer.json,
    /// config.json) as `name`; loaded on first use like any local model.
    pub fn add_dir(&self, name: &str, dir: PathBuf) -> Result<(), InferenceError> {
        if !dir.join("model.onnx").is_file() || !dir.join("tokenizer.json").is_file() {
            return Err(InferenceError::ModelNotFound(format!(
                "{} has no model.onnx and tokenizer.json",
                dir.display()
            )));
        }
        self.dirs
            .write()
            .map_err(|_| InferenceError::NotConfigured("model table poisoned".into()))?
            .insert(name.to_string(), dir);
        Ok(())
    }

    /// The directory of a local model on disk (cache snapshot or added).
    pub fn model_dir(&self, model: &str) -> Option<PathBuf> {
        match self.dirs.read().ok().and_then(|d| d.get(model).cloned()) {
            Some(d) => Some(d),
            None => resolve_model(&self.config.cache_dir, model).ok(),
        }
    }

    /// The `tokenizer.json` of a local model, where there is one on disk.
    pub fn tokenizer_path(&self, model: &str) -> Option<PathBuf> {
        Some(self.model_dir(model)?.join("tokenizer.json")).filter(|p| p.is_file())
    }

    pub fn loaded(&self) -> Vec<LoadedModel> {
        self.workers
            .lock()
            .map(|w| w.values().map(|w| w.info.clone()).collect())
            .unwrap_or_default()
    }

    pub fn is_loaded(&self, model: &str) -> bool {
        self.workers
            .lock()
            .map(|w| w.contains_key(model))
            .unwrap_or(false)
    }

    /// Loads a model and starts its worker thread. Blocking (reads and
    /// initialises the model): call it from a blocking pool.
    pub fn load_blocking(&self, model: &str) -> Result<LoadedModel, InferenceError> {
        load(&self.config, &self.workers, &self.dirs, model).map(|w| w.info.clone())
    }

    /// Unloads a model: its thread ends after the request it is serving;
    /// queued requests still complete. `false` if it was not loaded.
    pub fn unload(&self, model: &str) -> bool {
        self.workers
            .lock()
            .map(|mut w| w.remove(model).is_some())
            .unwrap_or(false)
    }

    /// The model's worker; a model in the cache is loaded on first use
    /// (on the blocking pool).
    async fn worker(&self, model: &str) -> Result<Arc<Worker>, InferenceError> {
        if let Some(w) = self.workers.lock().ok().and_then(|w| w.get(model).cloned()) {
            return Ok(w);
        }
        let (config, workers, dirs, model) = (
            self.config.clone(),
            self.workers.clone(),
            self.dirs.clone(),
            model.to_string(),
        );
        tokio::task::spawn_blocking(move || load(&config, &workers, &dirs, &model))
            .await
            .map_err(|e| InferenceError::NotConfigured(format!("model loading failed: {e}")))?
    }
}

fn load(
    config: &LocalConfig,
    workers: &Workers,
    dirs: &Dirs,
    model: &str,
) -> Result<Arc<Worker>, InferenceError> {
    // One load at a time: a second caller waits and then finds the model.
    static LOADING: Mutex<()> = Mutex::new(());
    let _guard = LOADING
        .lock()
        .map_err(|_| InferenceError::NotConfigured("model loader poisoned".into()))?;
    if let Some(w) = workers.lock().ok().and_then(|w| w.get(model).cloned()) {
        return Ok(w);
    }
    let own_dir = dirs.read().ok().and_then(|d| d.get(model).cloned());
    let dir = match own_dir.map_or_else(|| resolve_model(&config.cache_dir, model), Ok) {
        Ok(dir) => dir,
        Err(InferenceError::ModelNotFound(_)) if config.extra_models.iter().any(|m| m == model) => {
            download(config, model)?
        }
        Err(e) => return Err(e),
    };
    if super::embed::is_embedding_model(&dir) {
        return Err(InferenceError::Unsupported {
            param: "model".into(),
            message: format!("{model} is a sentence-embedding model: use /v1/embeddings"),
        });
    }
    if let Some(problem) = super::resolve::servable_problem(&dir) {
        return Err(InferenceError::BrokenModel(format!(
            "{model} cannot be served: {problem}"
        )));
    }
    let engine = LocalModel::load_named(&dir, model, config.threads)?;
    let info = LoadedModel {
        model: model.to_string(),
        weight_bytes: engine.weight_bytes(),
        context_length: engine.context_length(),
    };
    let (tx, rx) = sync_channel::<Job>(config.max_queue.max(1));
    let default_max = config.default_max_tokens;
    let max_active = config.max_active.max(1);
    let name = model.to_string();
    std::thread::Builder::new()
        .name(format!("muse-model-{}", model.replace('/', "-")))
        .spawn(move || {
            worker_loop(engine, rx, default_max, max_active);
            tracing::info!(model = %name, "model unloaded");
        })
        .map_err(|e| InferenceError::NotConfigured(format!("cannot start a model thread: {e}")))?;
    let worker = Arc::new(Worker {
        queue: tx,
        info: info.clone(),
    });
    workers
        .lock()
        .map_err(|_| InferenceError::NotConfigured("model table poisoned".into()))?
        .insert(model.to_string(), worker.clone());
    tracing::info!(model, weight_bytes = info.weight_bytes, "model loaded");
    Ok(worker)
}

/// Downloads a configured model into the cache (blocking thread).
fn download(config: &LocalConfig, model: &str) -> Result<PathBuf, InferenceError> {
    let fut = super::download::ensure_model(&config.cache_dir, model, &config.hub, |p| {
        super::download::report(&p)
    });
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => handle.block_on(fut),
        Err(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| InferenceError::NotConfigured(format!("runtime for the download: {e}")))?
            .block_on(fut),
    }
}

/// A generation being served by a model thread.
struct Active {
    events: mpsc::Sender<Result<StreamEvent, InferenceError>>,
    model: String,
    decoding: super::engine::Decoding,
    detok: Detokenizer,
    stops: StopFilter,
    started: Instant,
    first_token: Option<std::time::Duration>,
    /// Events the consumer has not taken yet (its channel was full).
    pending: std::collections::VecDeque<Result<StreamEvent, InferenceError>>,
    streaming: bool,
    /// Text of a whole (not streamed) answer, handed over at the end.
    held: String,
    done: bool,
    /// Tool calling: the calls are read from the text as it comes.
    tools: Option<ToolCalls>,
}

/// What an answer that may call tools needs at its end.
struct ToolCalls {
    stream: ToolStream,
    names: Vec<String>,
    parallel: bool,
}

impl Active {
    /// Generated text, through the tool-call reader when there is one.
    fn text(&mut self, text: String) {
        let text = match &mut self.tools {
            Some(t) => t.stream.push(&text),
            None => text,
        };
        if !text.is_empty() {
            self.queue(Ok(StreamEvent::Delta(text)));
        }
    }

    fn queue(&mut self, event: Result<StreamEvent, InferenceError>) {
        if let Ok(StreamEvent::Delta(text)) = &event {
            self.first_token
                .get_or_insert_with(|| self.started.elapsed());
            if !self.streaming {
                self.held.push_str(text);
                return;
            }
        }
        if matches!(event, Ok(StreamEvent::Done(_))) && !self.held.is_empty() {
            let text = std::mem::take(&mut self.held);
            self.pending.push_back(Ok(StreamEvent::Delta(text)));
        }
        self.pending.push_back(event);
    }

    /// Hands queued events to the consumer without blocking the thread.
    fn flush(&mut self) {
        while let Some(event) = self.pending.pop_front() {
            match self.events.try_send(event) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(event)) => {
                    self.pending.push_front(event);
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.pending.clear();
                    self.done = true;
                    return;
                }
            }
        }
    }

    fn finish(&mut self, mut reason: FinishReason, stopped: bool) {
        if !stopped {
            let (tail, _) = self.stops.push(&self.detok.finish());
            let rest = format!("{tail}{}", self.stops.flush());
            if !rest.is_empty() {
                self.text(rest);
            }
        }
        if let Some(tools) = self.tools.take() {
            let (text, mut calls) = tools.stream.finish(&tools.names, &mut CallIds::new());
            if !tools.parallel {
                calls.truncate(1);
            }
            if !text.is_empty() {
                self.queue(Ok(StreamEvent::Delta(text)));
            }
            if !calls.is_empty() {
                reason = FinishReason::ToolCalls;
            }
            for (index, call) in calls.into_iter().enumerate() {
                self.queue(Ok(StreamEvent::ToolCall(ToolCallDelta {
                    index: index as u32,
                    id: Some(call.id),
                    name: Some(call.name),
                    arguments: call.arguments,
                })));
            }
        }
        let summary = Summary {
            model: self.model.clone(),
            usage: Usage {
                prompt_tokens: self.decoding.prompt_len() as u32,
                completion_tokens: self.decoding.tokens().len() as u32,
            },
            finish_reason: reason,
            timing: Timing {
                time_to_first_token: self.first_token,
                total: self.started.elapsed(),
            },
        };
        self.queue(Ok(StreamEvent::Done(summary)));
        self.done = true;
    }
}

/// `logit_bias` checked against the model's vocabulary.
fn logit_bias(
    engine: &LocalModel,
    request: &GenerateRequest,
) -> Result<Vec<(u32, f32)>, InferenceError> {
    let vocab = engine.vocab_size();
    request
        .logit_bias
        .iter()
        .map(|(&id, &bias)| {
            if (id as usize) < vocab {
                Ok((id, bias))
            } else {
                Err(InferenceError::BadRequest(format!(
                    "logit_bias: token {id} is not in {}'s vocabulary of {vocab} tokens",
                    request.model
                )))
            }
        })
        .collect()
}

/// The shape the answer is held to (JSON mode, a required tool call) and
/// the tool-call reader, as the request and the model's template say.
fn shape(
    engine: &LocalModel,
    request: &GenerateRequest,
) -> Result<(Option<Guide>, Option<ToolCalls>), InferenceError> {
    let unsupported = |param: &str, message: String| InferenceError::Unsupported {
        param: param.into(),
        message,
    };
    if !request.uses_tools() {
        let guide = request
            .response_format
            .as_ref()
            .map(|_| Guide::json_object());
        return Ok((guide, None));
    }
    if request.prompt.is_some() {
        return Err(unsupported(
            "tools",
            "a raw completion takes no tools".into(),
        ));
    }
    if request.response_format.is_some() {
        return Err(unsupported(
            "response_format",
            format!(
                "structured output together with tools is not served on the local model {}",
                request.model
            ),
        ));
    }
    let format: ToolFormat = engine.tool_format().map_err(|m| unsupported("tools", m))?;
    let names: Vec<String> = request.tools.iter().map(|t| t.name.clone()).collect();
    let reader = |names: Vec<String>| ToolCalls {
        stream: ToolStream::new(format),
        names,
        parallel: request.parallel_tool_calls.unwrap_or(true),
    };
    Ok(match &request.tool_choice {
        _ if names.is_empty() => (None, None),
        Some(ToolChoice::None) => (None, None),
        None | Some(ToolChoice::Auto) => (None, Some(reader(names))),
        Some(ToolChoice::Required) => (Some(format.required_call(&names)), Some(reader(names))),
        Some(ToolChoice::Function(name)) => {
            let only = vec![name.clone()];
            (Some(format.required_call(&only)), Some(reader(only)))
        }
    })
}

fn start_job(engine: &mut LocalModel, job: Job, default_max: usize) -> Option<Active> {
    let Job {
        request,
        streaming,
        events,
        started,
    } = job;
    if events.is_closed() {
        return None;
    }
    let begun = (|| {
        let (guide, tools) = shape(engine, &request)?;
        let ids = match &request.prompt {
            Some(prompt) => engine.encode(prompt)?,
            None => {
                let input = ChatInput {
                    messages: message_values(&request.messages),
                    add_generation_prompt: true,
                    tools: (!request.tools.is_empty()).then(|| tool_values(&request.tools)),
                    ..Default::default()
                };
                let prompt = engine.render_chat(&input)?;
                engine.encode_chat(&prompt)?
            }
        };
        let gen = engine.generation();
        let params = DecodeParams {
            max_new_tokens: request
                .max_tokens
                .map(|m| m as usize)
                .unwrap_or_else(|| gen.max_new_tokens(ids.len(), default_max)),
            sampling: super::sampling::SamplingParams {
                presence_penalty: request.presence_penalty.unwrap_or(0.0),
                frequency_penalty: request.frequency_penalty.unwrap_or(0.0),
                ..gen.sampling(
                    request.temperature,
                    request.top_p,
                    request.top_k,
                    request.repetition_penalty,
                    request.seed,
                )
            },
        };
        let params = DecodeParams {
            sampling: super::sampling::SamplingParams {
                logit_bias: logit_bias(engine, &request)?,
                ..params.sampling
            },
            ..params
        };
        let mut decoding = engine.start_guided(&ids, &params, guide)?;
        if let Some(top) = request.logprobs {
            decoding = decoding.with_logprobs(top as usize);
        }
        Ok((decoding, tools))
    })();
    match begun {
        Ok((decoding, tools)) => Some(Active {
            tools,
            events,
            model: request.model.clone(),
            decoding,
            detok: Detokenizer::new(engine.tokenizer().clone()),
            stops: StopFilter::new(&request.stop),
            started,
            first_token: None,
            pending: Default::default(),
            streaming,
            held: String::new(),
            done: false,
        }),
        Err(e) => {
            let _ = events.try_send(Err(e));
            None
        }
    }
}

/// The model thread: admits up to `max_active` generations and advances
/// them one token each in turn (round robin), so a long answer does not
/// hold a short one back. A consumer that does not read is skipped (its
/// events wait, bounded) instead of blocking the others; one that went away
/// is dropped at once.
fn worker_loop(
    mut engine: LocalModel,
    rx: std::sync::mpsc::Receiver<Job>,
    default_max: usize,
    max_active: usize,
) {
    let mut active: Vec<Active> = Vec::new();
    let mut open = true;
    loop {
        while open && active.len() < max_active {
            let job = if active.is_empty() {
                match rx.recv() {
                    Ok(job) => job,
                    Err(_) => return,
                }
            } else {
                match rx.try_recv() {
                    Ok(job) => job,
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            };
            if let Some(a) = start_job(&mut engine, job, default_max) {
                active.push(a);
            }
        }
        if active.is_empty() {
            if open {
                continue;
            }
            return;
        }
        let mut progressed = false;
        for a in active.iter_mut() {
            a.flush();
            if a.done || !a.pending.is_empty() || a.events.is_closed() {
                continue;
            }
            progressed = true;
            match engine.advance(&mut a.decoding) {
                Ok(Some(token)) => {
                    if let Some(lp) = a.decoding.take_logprob() {
                        let text =
                            |id: u32| engine.tokenizer().decode(&[id], false).unwrap_or_default();
                        let token = |id: u32| {
                            let t = text(id);
                            let bytes = t.as_bytes().to_vec();
                            (t, Some(bytes))
                        };
                        let (t, bytes) = token(lp.id);
                        let entry = TokenLogprob {
                            token: t,
                            logprob: lp.logprob,
                            bytes,
                            top_logprobs: lp
                                .top
                                .iter()
                                .map(|&(id, logprob)| {
                                    let (token, bytes) = token(id);
                                    TopLogprob {
                                        token,
                                        logprob,
                                        bytes,
                                    }
                                })
                                .collect(),
                        };
                        a.queue(Ok(StreamEvent::Logprobs(vec![entry])));
                    }
                    let delta = a.detok.push(token);
                    let (text, hit) = a.stops.push(&delta);
                    if !text.is_empty() {
                        a.text(text);
                    }
                    if hit {
                        a.finish(FinishReason::Stop, true);
                    }
                }
                Ok(None) => {
                    let reason = a.decoding.finish_reason().unwrap_or(FinishReason::Length);
                    a.finish(reason, false);
                }
                Err(e) => {
                    a.queue(Err(e));
                    a.done = true;
                }
            }
            a.flush();
        }
        active.retain(|a| !(a.events.is_closed() || (a.done && a.pending.is_empty())));
        if !progressed && !active.is_empty() {
            // Everyone is waiting for their consumer.
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

#[async_trait]
impl LlmProvider for LocalProvider {
    fn id(&self) -> &str {
        "local"
    }

    async fn complete(&self, request: &GenerateRequest) -> Result<Completion, InferenceError> {
        crate::providers::collect(self.submit(request, false).await?).await
    }

    async fn stream(&self, request: &GenerateRequest) -> Result<CompletionStream, InferenceError> {
        self.submit(request, true).await
    }

    /// Sentence embeddings from a local encoder export (mean/CLS/max
    /// pooling and normalisation as its sentence-transformers files say).
    async fn embed(&self, request: &EmbedRequest) -> Result<Embeddings, InferenceError> {
        if request.dimensions.is_some() {
            return Err(InferenceError::Unsupported {
                param: "dimensions".into(),
                message: format!("{} gives vectors of its own size", request.model),
            });
        }
        let (embedders, threads, request) =
            (self.embedders.clone(), self.config.threads, request.clone());
        let (cache_dir, dirs) = (self.config.cache_dir.clone(), self.dirs.clone());
        // Finding the model reads the cache: on the blocking pool too.
        tokio::task::spawn_blocking(move || {
            let own = dirs.read().ok().and_then(|d| d.get(&request.model).cloned());
            let dir = match own {
                Some(d) => d,
                None => resolve_model(&cache_dir, &request.model).map_err(|_| {
                    InferenceError::ModelNotFound(format!(
                        "{} is not in the local model cache",
                        request.model
                    ))
                })?,
            };
            if !super::embed::is_embedding_model(&dir) {
                return Err(InferenceError::Unsupported {
                    param: "model".into(),
                    message: format!(
                        "{} is not a sentence-embedding model (no modules.json or 1_Pooling/config.json)",
                        request.model
                    ),
                });
            }
            let embedder = {
                let mut map = embedders
                    .lock()
                    .map_err(|_| InferenceError::NotConfigured("embedder table poisoned".into()))?;
                match map.get(&request.model) {
                    Some(e) => e.clone(),
                    None => {
                        let e = Arc::new(Mutex::new(super::embed::LocalEmbedder::load(
                            &dir,
                            &request.model,
                            threads,
                        )?));
                        map.insert(request.model.clone(), e.clone());
                        e
                    }
                }
            };
            let mut embedder = embedder
                .lock()
                .map_err(|_| InferenceError::NotConfigured("embedder poisoned".into()))?;
            let (vectors, tokens) = embedder.embed(&request.inputs)?;
            Ok(Embeddings {
                model: request.model.clone(),
                vectors,
                usage: Usage {
                    prompt_tokens: tokens,
                    completion_tokens: 0,
                },
            })
        })
        .await
        .map_err(|e| InferenceError::NotConfigured(format!("embedding failed to run: {e}")))?
    }
}

impl LocalProvider {
    /// Queues a generation on the model's thread.
    async fn submit(
        &self,
        request: &GenerateRequest,
        streaming: bool,
    ) -> Result<CompletionStream, InferenceError> {
        let worker = self.worker(&request.model).await?;
        let (tx, rx) = mpsc::channel(64);
        let job = Job {
            request: request.clone(),
            streaming,
            events: tx,
            started: Instant::now(),
        };
        match worker.queue.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(InferenceError::RateLimited {
                    retry_after: None,
                    message: format!("{} is busy: its queue is full", request.model),
                })
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(InferenceError::NotConfigured(format!(
                    "{} was unloaded",
                    request.model
                )))
            }
        }
        Ok(tokio_stream_from(rx))
    }
}

fn tokio_stream_from(
    mut rx: mpsc::Receiver<Result<StreamEvent, InferenceError>>,
) -> CompletionStream {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}
