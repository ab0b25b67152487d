//! Local causal LMs on ONNX Runtime: model resolution from a Hugging Face
//! cache, a KV-cache decode loop with sampling, streaming detokenisation,
//! chat templates, and a worker thread per loaded model.

pub mod download;
pub mod embed;
pub mod engine;
pub mod guide;
pub mod provider;
pub mod resolve;
pub mod runtime;
pub mod sampling;
pub mod template;
pub mod text;
pub mod tools;

pub use engine::{DecodeParams, Decoding, KvLayout, LocalModel, StepControl};
pub use provider::{LoadedModel, LocalConfig, LocalProvider};
pub use resolve::resolve_model;
pub use runtime::ensure_runtime;

/// A JSON file of a model directory; `Null` when absent or unreadable
/// (every such file is optional).
pub(crate) fn read_json(path: &std::path::Path) -> serde_json::Value {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// Counts tokens with a model's own tokenizer (dataset reports).
pub struct TokenCounter {
    tokenizer: tokenizers::Tokenizer,
}

impl TokenCounter {
    /// Reads a `tokenizer.json` (blocking).
    pub fn from_file(path: &std::path::Path) -> Result<Self, crate::InferenceError> {
        tokenizers::Tokenizer::from_file(path)
            .map(|tokenizer| Self { tokenizer })
            .map_err(|e| {
                crate::InferenceError::NotConfigured(format!("cannot read {}: {e}", path.display()))
            })
    }

    /// Tokens of `text` (without special tokens); 0 if it cannot be encoded.
    pub fn count(&self, text: &str) -> u64 {
        self.tokenizer
            .encode(text, false)
            .map(|e| e.len() as u64)
            .unwrap_or(0)
    }
}
