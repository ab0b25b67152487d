//! Local causal LMs on ONNX Runtime: model resolution from a Hugging Face
//! cache, a KV-cache decode loop with sampling, streaming detokenisation,
//! chat templates, and a worker thread per loaded model.

pub mod download;
pub mod engine;
pub mod provider;
pub mod resolve;
pub mod runtime;
pub mod sampling;
pub mod template;
pub mod text;

pub use engine::{DecodeParams, Decoding, KvLayout, LocalModel, StepControl};
pub use provider::{LoadedModel, LocalConfig, LocalProvider};
pub use resolve::resolve_model;
pub use runtime::ensure_runtime;
