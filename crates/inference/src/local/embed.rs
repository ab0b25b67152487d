//! Local sentence embeddings: an ONNX encoder export as sentence-transformers
//! ships it (`modules.json`, `1_Pooling/config.json`), run once per text,
//! pooled (mean over the attention mask, CLS, or max) and normalised as the
//! model's own configuration says. Blocking: call it from a blocking pool.

use std::borrow::Cow;
use std::path::Path;

use ort::session::{Session, SessionInputValue};
use ort::value::Tensor;
use tokenizers::Tokenizer;

use super::resolve::onnx_file;
use super::runtime::environment;
use crate::error::InferenceError;

/// How token embeddings become one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    Mean,
    Cls,
    Max,
}

/// Whether a model directory is a sentence-embedding export.
pub fn is_embedding_model(dir: &Path) -> bool {
    dir.join("modules.json").is_file() || dir.join("1_Pooling").join("config.json").is_file()
}

pub struct LocalEmbedder {
    session: Session,
    tokenizer: Tokenizer,
    pooling: Pooling,
    normalize: bool,
    has_token_types: bool,
    max_tokens: Option<usize>,
    name: String,
}

impl std::fmt::Debug for LocalEmbedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalEmbedder")
            .field("name", &self.name)
            .field("pooling", &self.pooling)
            .field("normalize", &self.normalize)
            .finish()
    }
}

use super::read_json;

impl LocalEmbedder {
    /// Loads the encoder and tokenizer of `dir`; errors name the model as
    /// `name`, never the server's paths.
    pub fn load(dir: &Path, name: &str, threads: usize) -> Result<Self, InferenceError> {
        let broken = |what: String| InferenceError::BrokenModel(format!("{name}: {what}"));
        let env = environment()?;
        let model_path = onnx_file(dir)?;
        let tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| broken(format!("the tokenizer.json cannot be read: {e}")))?;
        let scrub = |e: String| e.replace(&dir.display().to_string(), name);
        let session = Session::builder(env)
            .map_err(|e| broken(format!("session: {}", scrub(e.to_string()))))?
            .with_intra_threads(threads.max(1))
            .map_err(|e| broken(format!("session options: {}", scrub(e.to_string()))))?
            .with_inter_threads(1)
            .map_err(|e| broken(format!("session options: {}", scrub(e.to_string()))))?
            .commit_from_file(&model_path)
            .map_err(|e| {
                broken(format!(
                    "ONNX Runtime cannot load it: {}",
                    scrub(e.to_string())
                ))
            })?;
        for required in ["input_ids", "attention_mask"] {
            if !session.inputs().iter().any(|i| i.name() == required) {
                return Err(broken(format!("the encoder has no {required} input")));
            }
        }
        let has_token_types = session
            .inputs()
            .iter()
            .any(|i| i.name() == "token_type_ids");
        let pool = read_json(&dir.join("1_Pooling").join("config.json"));
        let pooling = if pool["pooling_mode_cls_token"] == true {
            Pooling::Cls
        } else if pool["pooling_mode_max_tokens"] == true {
            Pooling::Max
        } else {
            Pooling::Mean
        };
        let normalize = read_json(&dir.join("modules.json"))
            .as_array()
            .is_some_and(|m| {
                m.iter()
                    .any(|x| x["type"].as_str().is_some_and(|t| t.ends_with("Normalize")))
            });
        let cfg = read_json(&dir.join("config.json"));
        let max_tokens = cfg["max_position_embeddings"].as_u64().map(|v| v as usize);
        Ok(Self {
            session,
            tokenizer,
            pooling,
            normalize,
            has_token_types,
            max_tokens,
            name: name.to_string(),
        })
    }

    /// One vector per text, and the tokens read.
    pub fn embed(&mut self, texts: &[String]) -> Result<(Vec<Vec<f32>>, u32), InferenceError> {
        let mut out = Vec::with_capacity(texts.len());
        let mut tokens = 0u32;
        for text in texts {
            let enc = self.tokenizer.encode(text.as_str(), true).map_err(|e| {
                InferenceError::BadRequest(format!("cannot tokenize the input: {e}"))
            })?;
            let t = enc.get_ids().len();
            if self.max_tokens.is_some_and(|m| t > m) {
                return Err(InferenceError::ContextTooLong(format!(
                    "{t} tokens, {} takes {}",
                    self.name,
                    self.max_tokens.unwrap_or(0)
                )));
            }
            tokens = tokens.saturating_add(u32::try_from(t).unwrap_or(u32::MAX));
            let as_i64 = |v: &[u32]| v.iter().map(|&x| i64::from(x)).collect::<Vec<i64>>();
            let tensor = |v: Vec<i64>| {
                Tensor::from_array(([1usize, t], v))
                    .map_err(|e| InferenceError::Protocol(format!("input tensor: {e}")))
            };
            let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = vec![
                ("input_ids".into(), tensor(as_i64(enc.get_ids()))?.into()),
                (
                    "attention_mask".into(),
                    tensor(as_i64(enc.get_attention_mask()))?.into(),
                ),
            ];
            if self.has_token_types {
                inputs.push((
                    "token_type_ids".into(),
                    tensor(as_i64(enc.get_type_ids()))?.into(),
                ));
            }
            let outputs = self
                .session
                .run(inputs)
                .map_err(|e| InferenceError::Upstream {
                    status: None,
                    message: format!("{}: inference: {e}", self.name),
                })?;
            let first = outputs.values().next().ok_or_else(|| {
                InferenceError::Protocol(format!("{} returned nothing", self.name))
            })?;
            let (shape, data) = first
                .try_extract_tensor::<f32>()
                .map_err(|e| InferenceError::Protocol(format!("{}: output: {e}", self.name)))?;
            let hidden = *shape.last().unwrap_or(&0) as usize;
            if hidden == 0 || data.len() < t * hidden {
                return Err(InferenceError::Protocol(format!(
                    "{}: unexpected output shape {shape:?}",
                    self.name
                )));
            }
            let mask = enc.get_attention_mask();
            let row = |i: usize| &data[i * hidden..(i + 1) * hidden];
            let mut v: Vec<f64> = match self.pooling {
                Pooling::Cls => row(0).iter().map(|&x| f64::from(x)).collect(),
                Pooling::Max => (0..hidden)
                    .map(|j| {
                        (0..t)
                            .filter(|&i| mask[i] > 0)
                            .map(|i| f64::from(row(i)[j]))
                            .fold(f64::NEG_INFINITY, f64::max)
                    })
                    .collect(),
                Pooling::Mean => {
                    let n = mask.iter().filter(|&&m| m > 0).count().max(1) as f64;
                    (0..hidden)
                        .map(|j| {
                            (0..t)
                                .filter(|&i| mask[i] > 0)
                                .map(|i| f64::from(row(i)[j]))
                                .sum::<f64>()
                                / n
                        })
                        .collect()
                }
            };
            if self.normalize {
                let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
                v.iter_mut().for_each(|x| *x /= norm);
            }
            out.push(v.into_iter().map(|x| x as f32).collect());
        }
        Ok((out, tokens))
    }
}
