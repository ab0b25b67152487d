//! One [`LlmProvider`] trait over remote model APIs (OpenAI and any
//! OpenAI-compatible server, Anthropic, Google Gemini) and local ONNX
//! models (`local`: chat templates rendered as Hugging Face does, a
//! KV-cache decode loop), with typed errors, retries with backoff, fallback
//! chains, a price table, a model registry, and tool calling.
//!
//! ```no_run
//! # async fn demo() -> Result<(), muse_inference::InferenceError> {
//! use futures::StreamExt;
//! use muse_inference::{GenerateRequest, LlmProvider, Message, StreamEvent};
//! let provider = muse_inference::providers::anthropic::AnthropicProvider::new(
//!     muse_inference::providers::anthropic::AnthropicConfig::new("sk-ant-…"),
//! )?;
//! let request = GenerateRequest::new("claude-3-5-haiku-latest", vec![Message::user("Hi!")]);
//! let mut stream = provider.stream(&request).await?;
//! while let Some(event) = stream.next().await {
//!     match event? {
//!         StreamEvent::Delta(text) => print!("{text}"),
//!         StreamEvent::ToolCall(call) => print!("[{:?}({})]", call.name, call.arguments),
//!         StreamEvent::Logprobs(_) => {}
//!         StreamEvent::Done(summary) => println!("\n{:?}", summary.usage),
//!     }
//! }
//! # Ok(()) }
//! ```

pub mod error;
pub mod local;
pub mod pricing;
pub mod providers;
pub mod registry;
pub mod resilience;
mod sse;
pub mod testing;
pub mod types;

pub use error::InferenceError;
pub use pricing::{Price, PriceTable};
pub use registry::{ModelInfo, ModelKind, ModelRegistry, PricedCompletion};
pub use resilience::{Fallback, RetryPolicy, Retrying};
pub use types::*;
