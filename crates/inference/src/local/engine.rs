//! One loaded model and its KV-cache decode loop. Blocking: run it on its
//! own thread (see `LocalProvider`).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::f16;
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor, TensorElementType, ValueType};
use serde_json::Value;
use tokenizers::Tokenizer;

use super::guide::Guide;
use super::resolve::onnx_file;
use super::runtime::environment;
use super::sampling::{Sampler, SamplingParams};
use super::template::{special_tokens, ChatInput, ChatTemplate, ChatTemplates, TemplateError};
use super::tools::ToolFormat;
use crate::error::InferenceError;
use crate::types::FinishReason;

/// KV-cache geometry, read from the model's own `past_key_values.*` inputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvLayout {
    pub layers: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub fp16: bool,
    pub has_position_ids: bool,
}

#[derive(Debug, Clone)]
pub struct DecodeParams {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
}

/// What the per-token callback wants next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepControl {
    Continue,
    Stop,
    /// The consumer went away: stop and report cancellation.
    Cancel,
}

fn ort_err(context: &str) -> impl Fn(ort::Error) -> InferenceError + '_ {
    move |e| InferenceError::Upstream {
        status: None,
        message: format!("{context}: {e}"),
    }
}

pub struct LocalModel {
    session: Session,
    tokenizer: std::sync::Arc<Tokenizer>,
    layout: KvLayout,
    /// `past_key_values.{i}.{key,value}` in layer order, key before value.
    past_names: Vec<String>,
    eos_ids: Vec<u32>,
    /// Compiled chat templates by name (`default`, `tool_use`, …); a
    /// template that does not compile keeps its error for chat requests.
    templates: BTreeMap<String, Result<ChatTemplate, TemplateError>>,
    context_length: Option<usize>,
    generation: GenerationDefaults,
    weight_bytes: u64,
    dir: PathBuf,
    name: String,
    /// How the template used with tools takes them: `None` when it does
    /// not mention `tools`, `Some(None)` when it does in a format Muse
    /// cannot read back.
    tools: Option<Option<ToolFormat>>,
    /// Each token's text (for guided decoding), computed on first use.
    token_texts: Option<Vec<Option<String>>>,
}

/// What `generation_config.json` asks for when a request does not say.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationDefaults {
    /// `do_sample`: false (transformers' default) means greedy.
    pub do_sample: bool,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub repetition_penalty: Option<f32>,
    pub max_new_tokens: Option<usize>,
    /// Prompt and answer together (transformers' `max_length`).
    pub max_length: Option<usize>,
}

impl GenerationDefaults {
    /// Reads `generation_config.json` (absent: transformers' defaults).
    pub fn from_value(v: &Value) -> Self {
        let f = |k: &str| v[k].as_f64().map(|x| x as f32);
        let u = |k: &str| v[k].as_u64().map(|x| x as usize);
        Self {
            do_sample: v["do_sample"].as_bool().unwrap_or(false),
            temperature: f("temperature"),
            top_p: f("top_p"),
            top_k: u("top_k"),
            repetition_penalty: f("repetition_penalty"),
            max_new_tokens: u("max_new_tokens"),
            max_length: u("max_length"),
        }
    }

    /// Sampling settings for a request: what it gives, else what the model's
    /// generation config says (greedy unless `do_sample`; transformers'
    /// `top_k` of 50 when sampling with none set).
    pub fn sampling(
        &self,
        temperature: Option<f32>,
        top_p: Option<f32>,
        top_k: Option<u32>,
        repetition_penalty: Option<f32>,
        seed: Option<u64>,
    ) -> SamplingParams {
        let given = temperature.is_some() || top_p.is_some() || top_k.is_some();
        let (t, p, k) = if given || !self.do_sample {
            (
                temperature.unwrap_or(if given { 1.0 } else { 0.0 }),
                top_p,
                top_k.map(|k| k as usize),
            )
        } else {
            (
                self.temperature.unwrap_or(1.0),
                self.top_p.filter(|p| *p < 1.0),
                Some(self.top_k.unwrap_or(50)).filter(|k| *k > 0),
            )
        };
        SamplingParams {
            temperature: t,
            top_k: k,
            top_p: p,
            repetition_penalty: repetition_penalty
                .or(self.repetition_penalty)
                .unwrap_or(1.0),
            seed,
            ..SamplingParams::default()
        }
    }

    /// New tokens when a request gives no `max_tokens`.
    pub fn max_new_tokens(&self, prompt_len: usize, fallback: usize) -> usize {
        self.max_new_tokens
            .or_else(|| self.max_length.map(|m| m.saturating_sub(prompt_len).max(1)))
            .unwrap_or(fallback)
    }
}

impl std::fmt::Debug for LocalModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalModel")
            .field("dir", &self.dir)
            .field("layout", &self.layout)
            .finish()
    }
}

use super::read_json;

use super::template::token_string;

impl LocalModel {
    /// Loads the ONNX model and tokenizer of a snapshot directory (errors
    /// name the directory's last component).
    pub fn load(dir: &Path, threads: usize) -> Result<Self, InferenceError> {
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("model")
            .to_string();
        Self::load_named(dir, &name, threads)
    }

    /// Loads the ONNX model and tokenizer of a snapshot directory. Errors
    /// name the model as `name`, never the server's paths (those go to the
    /// log).
    pub fn load_named(dir: &Path, name: &str, threads: usize) -> Result<Self, InferenceError> {
        Self::load_inner(dir, name, threads).map_err(|e| {
            tracing::error!(model = name, dir = %dir.display(), error = %e, "cannot load a local model");
            let dir_text = dir.display().to_string();
            let scrub = |m: String| m.replace(&dir_text, name);
            match e {
                InferenceError::NotConfigured(m) => InferenceError::NotConfigured(scrub(m)),
                InferenceError::BrokenModel(m) => InferenceError::BrokenModel(scrub(m)),
                InferenceError::Upstream { status, message } => {
                    InferenceError::BrokenModel(scrub(format!("{message} (status {status:?})")))
                }
                other => other,
            }
        })
    }

    fn load_inner(dir: &Path, name: &str, threads: usize) -> Result<Self, InferenceError> {
        let env = environment()?;
        let model_path = onnx_file(dir)?;
        let tokenizer = Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| {
            InferenceError::BrokenModel(format!("the tokenizer.json of {name} cannot be read: {e}"))
        })?;
        let session = Session::builder(env)
            .map_err(ort_err("session"))?
            .with_intra_threads(threads.max(1))
            .map_err(|e| InferenceError::NotConfigured(format!("session options: {e}")))?
            .with_inter_threads(1)
            .map_err(|e| InferenceError::NotConfigured(format!("session options: {e}")))?
            .commit_from_file(&model_path)
            .map_err(|e| {
                let file = model_path
                    .strip_prefix(dir)
                    .unwrap_or(&model_path)
                    .display()
                    .to_string();
                InferenceError::BrokenModel(format!(
                    "ONNX Runtime cannot load {file} of {name}: {e}"
                ))
            })?;

        let mut past: Vec<(usize, bool, String, ValueType)> = Vec::new();
        let mut has_position_ids = false;
        for input in session.inputs() {
            let name = input.name().to_string();
            if name == "position_ids" {
                has_position_ids = true;
            }
            if let Some(rest) = name.strip_prefix("past_key_values.") {
                let (layer, kind) = rest.split_once('.').ok_or_else(|| {
                    InferenceError::NotConfigured(format!("unexpected input {name}"))
                })?;
                let layer: usize = layer.parse().map_err(|_| {
                    InferenceError::NotConfigured(format!("unexpected input {name}"))
                })?;
                past.push((layer, kind == "value", name, input.dtype().clone()));
            }
        }
        for required in ["input_ids", "attention_mask"] {
            if !session.inputs().iter().any(|i| i.name() == required) {
                return Err(InferenceError::BrokenModel(format!(
                    "{name} has no {required} input: not a causal LM export"
                )));
            }
        }
        if past.is_empty() {
            return Err(InferenceError::BrokenModel(format!(
                "{name} has no past_key_values inputs: export it with a KV cache (e.g. optimum `--task text-generation-with-past`)"
            )));
        }
        past.sort_by_key(|(layer, is_value, _, _)| (*layer, *is_value));
        let (heads, head_dim, fp16) = match &past[0].3 {
            ValueType::Tensor { ty, shape, .. }
                if shape.len() == 4 && shape[1] > 0 && shape[3] > 0 =>
            {
                let fp16 = match ty {
                    TensorElementType::Float16 => true,
                    TensorElementType::Float32 => false,
                    other => {
                        return Err(InferenceError::NotConfigured(format!(
                            "unsupported KV-cache type {other:?}"
                        )))
                    }
                };
                (shape[1] as usize, shape[3] as usize, fp16)
            }
            other => {
                return Err(InferenceError::NotConfigured(format!(
                    "cannot read the KV-cache layout from {other:?}"
                )))
            }
        };
        let layers = past.len() / 2;
        let layout = KvLayout {
            layers,
            heads,
            head_dim,
            fp16,
            has_position_ids,
        };

        let tcfg = read_json(&dir.join("tokenizer_config.json"));
        let cfg = read_json(&dir.join("config.json"));
        let gen_cfg = read_json(&dir.join("generation_config.json"));
        let eos = token_string(&tcfg["eos_token"]).unwrap_or_default();
        // Stop ids as transformers takes them: generation_config.json's
        // `eos_token_id` (a number or a list), else config.json's plus the
        // tokenizer's EOS token.
        let ids_of = |v: &Value| -> Vec<u32> {
            match v {
                Value::Number(n) => n.as_u64().map(|v| v as u32).into_iter().collect(),
                Value::Array(a) => a
                    .iter()
                    .filter_map(|v| v.as_u64())
                    .map(|v| v as u32)
                    .collect(),
                _ => Vec::new(),
            }
        };
        let mut eos_ids = ids_of(&gen_cfg["eos_token_id"]);
        if eos_ids.is_empty() {
            eos_ids = ids_of(&cfg["eos_token_id"]);
            eos_ids.extend(tokenizer.token_to_id(&eos));
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        let context_length = ["max_position_embeddings", "n_positions", "n_ctx"]
            .iter()
            .find_map(|k| cfg[*k].as_u64())
            .or_else(|| {
                tcfg["model_max_length"]
                    .as_u64()
                    .filter(|v| *v < 10_000_000)
            })
            .map(|v| v as usize);
        let special = special_tokens(dir);
        let sources = ChatTemplates::from_dir(dir);
        let tools = sources
            .pick(true)
            .filter(|source| source.contains("tools"))
            .map(ToolFormat::of_template);
        let templates = sources
            .templates
            .into_iter()
            .map(|(tname, source)| {
                let compiled = ChatTemplate::new(&source, special.clone()).map_err(|e| {
                    TemplateError::Broken(format!("{name}'s chat template {tname:?}: {e}"))
                });
                if let Err(e) = &compiled {
                    tracing::warn!(model = name, error = %e, "a chat template does not compile");
                }
                (tname, compiled)
            })
            .collect();
        let weight_bytes = std::fs::read_dir(model_path.parent().unwrap_or(dir))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_str().is_some_and(|n| n.contains(".onnx")))
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0);
        Ok(Self {
            session,
            tokenizer: std::sync::Arc::new(tokenizer),
            layout,
            past_names: past.into_iter().map(|(_, _, n, _)| n).collect(),
            eos_ids,
            templates,
            context_length,
            generation: GenerationDefaults::from_value(&gen_cfg),
            weight_bytes,
            dir: dir.to_path_buf(),
            name: name.to_string(),
            tools,
            token_texts: None,
        })
    }

    /// How the model's chat template takes tools: `Err` says why a request
    /// with tools cannot be served.
    pub fn tool_format(&self) -> Result<ToolFormat, String> {
        match self.tools {
            None => Err(format!(
                "{}'s chat template does not take tools",
                self.name
            )),
            Some(None) => Err(format!(
                "{}'s chat template takes tools in a format Muse cannot read back (it reads Hermes <tool_call>, Llama 3 JSON and Mistral [TOOL_CALLS] calls)",
                self.name
            )),
            Some(Some(f)) => Ok(f),
        }
    }

    /// Each token's text as it reads inside an answer (decoded after a
    /// neighbour, so SentencePiece's leading space is kept); `None` for
    /// tokens that write nothing or only part of a character.
    fn token_texts(&mut self) -> &[Option<String>] {
        if self.token_texts.is_none() {
            let vocab = self.tokenizer.get_vocab_size(true);
            let anchor = self.tokenizer.token_to_id("a");
            let base = anchor
                .and_then(|a| self.tokenizer.decode(&[a], true).ok())
                .unwrap_or_default();
            let texts = (0..vocab as u32)
                .map(|id| {
                    let text = match anchor {
                        Some(a) => {
                            let both = self.tokenizer.decode(&[a, id], true).ok()?;
                            both.strip_prefix(base.as_str())?.to_string()
                        }
                        None => self.tokenizer.decode(&[id], true).ok()?,
                    };
                    (!text.is_empty() && !text.contains('\u{FFFD}')).then_some(text)
                })
                .collect();
            self.token_texts = Some(texts);
        }
        self.token_texts.as_deref().unwrap_or(&[])
    }

    /// The vocabulary's size (ids at or above it are not tokens).
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    pub fn tokenizer(&self) -> &std::sync::Arc<Tokenizer> {
        &self.tokenizer
    }

    pub fn context_length(&self) -> Option<usize> {
        self.context_length
    }

    /// Bytes of the model files (weights): the bulk of its memory.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The model's generation defaults (`generation_config.json`).
    pub fn generation(&self) -> &GenerationDefaults {
        &self.generation
    }

    /// Whether the model has a chat template.
    pub fn has_chat_template(&self) -> bool {
        !self.templates.is_empty()
    }

    /// Tokenizes a raw prompt the way `tokenizer(prompt)` does: the
    /// tokenizer's own rule for special tokens (Llama's adds BOS, GPT-2's
    /// adds nothing).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, InferenceError> {
        self.encode_with(text, true)
    }

    /// Tokenizes a rendered chat the way `apply_chat_template(tokenize=True)`
    /// does: no special tokens added (the template wrote them).
    pub fn encode_chat(&self, text: &str) -> Result<Vec<u32>, InferenceError> {
        self.encode_with(text, false)
    }

    fn encode_with(&self, text: &str, special: bool) -> Result<Vec<u32>, InferenceError> {
        self.tokenizer
            .encode(text, special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| InferenceError::BadRequest(format!("cannot tokenize the prompt: {e}")))
    }

    /// The prompt for a chat, through the model's chat template (the
    /// `tool_use` one when tools are given and there is one); without a
    /// template, the messages' contents one per line. Refusals by the template are the caller's (400), a broken
    /// template the model's (503).
    pub fn render_chat(&self, input: &ChatInput) -> Result<String, InferenceError> {
        if self.templates.is_empty() {
            return Ok(input
                .messages
                .iter()
                .map(|m| match &m["content"] {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    other => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join("\n"));
        }
        let with_tools = input.tools.is_some();
        let pick = if with_tools && self.templates.contains_key("tool_use") {
            self.templates.get("tool_use")
        } else {
            self.templates.get("default").or_else(|| {
                (self.templates.len() == 1)
                    .then(|| self.templates.values().next())
                    .flatten()
            })
        };
        let Some(template) = pick else {
            return Err(InferenceError::BrokenModel(format!(
                "{} has several chat templates ({}) and no default",
                self.name,
                self.templates
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        };
        match template {
            Err(e) => Err(InferenceError::BrokenModel(e.to_string())),
            Ok(t) => t.render(input).map_err(|e| match e {
                TemplateError::Refused(m) => InferenceError::BadRequest(format!(
                    "{}'s chat template refused the conversation: {m}",
                    self.name
                )),
                TemplateError::Broken(m) => {
                    InferenceError::BrokenModel(format!("{}: {m}", self.name))
                }
            }),
        }
    }

    fn empty_past(&self) -> Result<Vec<DynValue>, InferenceError> {
        let shape = [1usize, self.layout.heads, 0, self.layout.head_dim];
        (0..self.past_names.len())
            .map(|_| {
                if self.layout.fp16 {
                    Tensor::<f16>::from_array((shape, Vec::<f16>::new())).map(|t| t.into_dyn())
                } else {
                    Tensor::<f32>::from_array((shape, Vec::<f32>::new())).map(|t| t.into_dyn())
                }
                .map_err(ort_err("empty KV cache"))
            })
            .collect()
    }

    /// One forward pass: returns the logits of the last position and the
    /// new KV cache.
    fn step(
        &mut self,
        ids: &[u32],
        past: Vec<DynValue>,
        past_len: usize,
    ) -> Result<(Vec<f32>, Vec<DynValue>), InferenceError> {
        let t = ids.len();
        let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> =
            Vec::with_capacity(3 + past.len());
        let input_ids = Tensor::from_array((
            [1usize, t],
            ids.iter().map(|&i| i64::from(i)).collect::<Vec<i64>>(),
        ))
        .map_err(ort_err("input_ids"))?;
        let mask = Tensor::from_array(([1usize, past_len + t], vec![1i64; past_len + t]))
            .map_err(ort_err("attention_mask"))?;
        inputs.push(("input_ids".into(), input_ids.into()));
        inputs.push(("attention_mask".into(), mask.into()));
        if self.layout.has_position_ids {
            let pos = Tensor::from_array((
                [1usize, t],
                (past_len..past_len + t)
                    .map(|p| p as i64)
                    .collect::<Vec<i64>>(),
            ))
            .map_err(ort_err("position_ids"))?;
            inputs.push(("position_ids".into(), pos.into()));
        }
        for (name, value) in self.past_names.iter().zip(past) {
            inputs.push((Cow::Owned(name.clone()), value.into()));
        }
        let outputs = self.session.run(inputs).map_err(ort_err("inference"))?;
        let mut logits = None;
        let mut presents: Vec<Option<DynValue>> =
            (0..self.past_names.len()).map(|_| None).collect();
        for (name, value) in outputs {
            if name == "logits" {
                let last = if self.layout.fp16 {
                    let (shape, data) = value
                        .try_extract_tensor::<f16>()
                        .map_err(ort_err("logits"))?;
                    let vocab = *shape.last().unwrap_or(&0) as usize;
                    data[data.len().saturating_sub(vocab)..]
                        .iter()
                        .map(|x| x.to_f32())
                        .collect::<Vec<f32>>()
                } else {
                    let (shape, data) = value
                        .try_extract_tensor::<f32>()
                        .map_err(ort_err("logits"))?;
                    let vocab = *shape.last().unwrap_or(&0) as usize;
                    data[data.len().saturating_sub(vocab)..].to_vec()
                };
                logits = Some(last);
            } else if let Some(rest) = name.strip_prefix("present") {
                let past_name =
                    format!("past_key_values{}", rest.trim_start_matches("_key_values"));
                if let Some(i) = self.past_names.iter().position(|n| *n == past_name) {
                    presents[i] = Some(value);
                }
            }
        }
        let logits = logits
            .ok_or_else(|| InferenceError::Protocol("the model returned no logits".into()))?;
        let presents = presents
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                InferenceError::Protocol("the model did not return every present.* output".into())
            })?;
        Ok((logits, presents))
    }

    /// Starts a generation: checks the prompt and runs it through the
    /// model once. Continue with [`LocalModel::advance`].
    pub fn start(
        &mut self,
        prompt: &[u32],
        params: &DecodeParams,
    ) -> Result<Decoding, InferenceError> {
        self.start_guided(prompt, params, None)
    }

    /// [`LocalModel::start`], with the answer held to `guide`'s shape.
    pub fn start_guided(
        &mut self,
        prompt: &[u32],
        params: &DecodeParams,
        guide: Option<Guide>,
    ) -> Result<Decoding, InferenceError> {
        if prompt.is_empty() {
            return Err(InferenceError::BadRequest("the prompt is empty".into()));
        }
        if let Some(ctx) = self.context_length {
            if prompt.len() >= ctx {
                return Err(InferenceError::ContextTooLong(format!(
                    "{} prompt tokens, the model takes {ctx}",
                    prompt.len()
                )));
            }
        }
        let past = self.empty_past()?;
        let (logits, past) = self.step(prompt, past, 0)?;
        Ok(Decoding {
            history: prompt.to_vec(),
            out: Vec::new(),
            past,
            logits,
            sampler: Sampler::new(params.sampling.clone()),
            max_new_tokens: params.max_new_tokens,
            finished: None,
            guide,
            logprobs: None,
            last_logprob: None,
        })
    }

    /// Produces the next token of `d` (running one cached step for it), or
    /// `None` once the generation has finished (see [`Decoding::finish_reason`]).
    pub fn advance(&mut self, d: &mut Decoding) -> Result<Option<u32>, InferenceError> {
        if d.finished.is_some() {
            return Ok(None);
        }
        if d.out.len() >= d.max_new_tokens {
            d.finished = Some(FinishReason::Length);
            return Ok(None);
        }
        if !d.out.is_empty() {
            // Feed the previous token: the cache then covers the whole history.
            let last = d.history[d.history.len() - 1];
            let past = std::mem::take(&mut d.past);
            let (logits, past) = self.step(&[last], past, d.history.len() - 1)?;
            d.logits = logits;
            d.past = past;
        }
        if d.guide.as_ref().is_some_and(Guide::is_complete) {
            d.finished = Some(FinishReason::Stop);
            return Ok(None);
        }
        // Log-probabilities of the model's own distribution (before
        // penalties, biases, temperature and the guide), as vLLM reports them.
        let raw = d.logprobs.map(|top| (top, d.logits.clone()));
        let next = match d.guide.take() {
            None => d.sampler.sample(&mut d.logits, &d.history, &d.out),
            Some(guide) => {
                let (next, guide) = self.guided_pick(d, guide)?;
                d.guide = Some(guide);
                next
            }
        };
        if self.eos_ids.contains(&next) {
            d.finished = Some(FinishReason::Stop);
            return Ok(None);
        }
        d.last_logprob = raw.map(|(top, logits)| token_logprob(&logits, next, top));
        d.out.push(next);
        d.history.push(next);
        if self.context_length.is_some_and(|c| d.history.len() >= c) {
            d.finished = Some(FinishReason::Length);
        }
        Ok(Some(next))
    }

    /// Picks a token whose text keeps the answer on the guide's shape:
    /// the sampler's choice is checked and, if it leaves the shape, banned
    /// and chosen again (the same as sampling from the allowed tokens);
    /// after a few refusals every token is checked at once.
    fn guided_pick(
        &mut self,
        d: &mut Decoding,
        guide: Guide,
    ) -> Result<(u32, Guide), InferenceError> {
        const TRIES: usize = 8;
        d.sampler.adjust(&mut d.logits, &d.history, &d.out);
        let name = self.name.clone();
        let texts = self.token_texts();
        let allowed = |id: u32| -> Option<Guide> {
            texts
                .get(id as usize)
                .and_then(|t| t.as_deref())
                .and_then(|t| guide.after(t))
        };
        let stuck =
            || InferenceError::Protocol(format!("no token of {name} continues the required shape"));
        for _ in 0..TRIES {
            let id = d.sampler.choose(&d.logits);
            if !d.logits.get(id as usize).is_some_and(|l| l.is_finite()) {
                return Err(stuck());
            }
            if let Some(next) = allowed(id) {
                return Ok((id, next));
            }
            d.logits[id as usize] = f32::NEG_INFINITY;
        }
        for (id, l) in d.logits.iter_mut().enumerate() {
            if l.is_finite() && allowed(id as u32).is_none() {
                *l = f32::NEG_INFINITY;
            }
        }
        let id = d.sampler.choose(&d.logits);
        match allowed(id) {
            Some(next) if d.logits.get(id as usize).is_some_and(|l| l.is_finite()) => {
                Ok((id, next))
            }
            _ => Err(stuck()),
        }
    }

    /// Generates up to `max_new_tokens` after `prompt`, calling `on_token`
    /// with each new id (the prompt is run once; each step then feeds one
    /// token with the cache). Ends at EOS, `max_new_tokens`, the context
    /// length, or when `on_token` says so.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        params: &DecodeParams,
        mut on_token: impl FnMut(u32) -> StepControl,
    ) -> Result<(Vec<u32>, FinishReason), InferenceError> {
        let mut d = self.start(prompt, params)?;
        while let Some(token) = self.advance(&mut d)? {
            match on_token(token) {
                StepControl::Continue => {}
                StepControl::Stop => return Ok((d.out, FinishReason::Stop)),
                StepControl::Cancel => return Err(InferenceError::Cancelled),
            }
        }
        let finish = d.finish_reason().unwrap_or(FinishReason::Length);
        Ok((d.out, finish))
    }
}

/// One generation in progress: its tokens, KV cache, next-token logits and
/// sampler. Several can be advanced in turn on one model.
pub struct Decoding {
    history: Vec<u32>,
    out: Vec<u32>,
    past: Vec<DynValue>,
    logits: Vec<f32>,
    sampler: Sampler,
    max_new_tokens: usize,
    finished: Option<FinishReason>,
    /// The shape the answer must take (JSON mode, a required tool call).
    guide: Option<Guide>,
    /// Log-probabilities asked for, with this many alternatives.
    logprobs: Option<usize>,
    last_logprob: Option<TokenLogprobIds>,
}

/// A generated token's log-probability and the likeliest alternatives
/// (token ids, likeliest first).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobIds {
    pub id: u32,
    pub logprob: f64,
    pub top: Vec<(u32, f64)>,
}

/// `log_softmax(logits)[id]` and the `top` largest entries.
fn token_logprob(logits: &[f32], id: u32, top: usize) -> TokenLogprobIds {
    let max = logits
        .iter()
        .copied()
        .filter(|l| l.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits
        .iter()
        .filter(|l| l.is_finite())
        .map(|&l| f64::from(l - max).exp())
        .sum();
    let lse = f64::from(max) + sum.ln();
    // OpenAI writes -9999.0 for a token that cannot come (JSON has no -inf).
    let lp = |i: usize| {
        logits
            .get(i)
            .map_or(-9999.0, |&l| (f64::from(l) - lse).max(-9999.0))
    };
    let mut best: Vec<usize> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, l) in logits.iter().enumerate() {
            if best.len() < top || best.last().is_some_and(|&b| *l > logits[b]) {
                let at = best.partition_point(|&b| logits[b] >= *l);
                best.insert(at, i);
                best.truncate(top);
            }
        }
    }
    TokenLogprobIds {
        id,
        logprob: lp(id as usize),
        top: best.into_iter().map(|i| (i as u32, lp(i))).collect(),
    }
}

impl Decoding {
    /// Asks for log-probabilities of the tokens to come, with `top`
    /// alternatives each.
    pub fn with_logprobs(mut self, top: usize) -> Self {
        self.logprobs = Some(top);
        self
    }

    /// The log-probability of the token [`LocalModel::advance`] just gave.
    pub fn take_logprob(&mut self) -> Option<TokenLogprobIds> {
        self.last_logprob.take()
    }

    /// The tokens generated so far.
    pub fn tokens(&self) -> &[u32] {
        &self.out
    }

    pub fn prompt_len(&self) -> usize {
        self.history.len() - self.out.len()
    }

    /// Why it ended, once it has.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finished.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_probabilities_are_the_log_softmax_with_the_likeliest_first() {
        let logits = [1.0f32, 3.0, 2.0, f32::NEG_INFINITY];
        let t = token_logprob(&logits, 2, 2);
        let z: f64 = [1.0f64, 3.0, 2.0].iter().map(|x| x.exp()).sum();
        assert!((t.logprob - (2.0 - z.ln())).abs() < 1e-6, "{t:?}");
        assert_eq!(t.top.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [1, 2]);
        assert!((t.top[0].1 - (3.0 - z.ln())).abs() < 1e-6);
        let probs: f64 = [0u32, 1, 2]
            .iter()
            .map(|&i| token_logprob(&logits, i, 0).logprob.exp())
            .sum();
        assert!((probs - 1.0).abs() < 1e-9);
    }

    #[test]
    fn generation_config_defaults_apply_only_when_the_request_says_nothing() {
        let greedy = GenerationDefaults::from_value(&serde_json::json!({"eos_token_id": [1, 2]}));
        let s = greedy.sampling(None, None, None, None, None);
        assert_eq!(
            (s.temperature, s.top_k, s.top_p),
            (0.0, None, None),
            "transformers' default is greedy"
        );

        let sampled = GenerationDefaults::from_value(&serde_json::json!({
            "do_sample": true, "temperature": 0.6, "top_p": 0.9, "repetition_penalty": 1.1, "max_length": 100
        }));
        let s = sampled.sampling(None, None, None, None, Some(7));
        assert_eq!(
            (
                s.temperature,
                s.top_p,
                s.top_k,
                s.repetition_penalty,
                s.seed
            ),
            (0.6, Some(0.9), Some(50), 1.1, Some(7)),
            "the model's sampling settings, with transformers' top_k of 50"
        );
        let s = sampled.sampling(Some(0.0), None, None, None, None);
        assert_eq!(
            (s.temperature, s.top_p, s.top_k),
            (0.0, None, None),
            "the request wins"
        );
        assert_eq!(
            sampled.max_new_tokens(30, 256),
            70,
            "max_length counts the prompt"
        );
        assert_eq!(greedy.max_new_tokens(30, 256), 256);
        let capped = GenerationDefaults::from_value(
            &serde_json::json!({"max_new_tokens": 12, "max_length": 100}),
        );
        assert_eq!(capped.max_new_tokens(30, 256), 12);
    }
}
