//! Typed prompt templates (the heart of the prompt library), usable on
//! their own: a [`Template`] with `{variable}` placeholders and a
//! [`VariablesSchema`] (JSON Schema) that validates the variables, reports
//! every error with its JSON path, and fills in defaults.
//!
//! ```
//! use muse_prompts::{PromptSpec, Template, VariablesSchema};
//! use serde_json::json;
//! let spec = PromptSpec::new(
//!     "Write a {tone} haiku about {topic}. Answer as JSON: {{\"haiku\": \"…\"}}",
//!     json!({"type": "object", "required": ["topic"], "properties": {
//!         "topic": {"type": "string", "maxLength": 200},
//!         "tone": {"type": "string", "default": "calm"}}}),
//! ).unwrap();
//! let rendered = spec.render(&json!({"topic": "the sea"})).unwrap();
//! assert_eq!(rendered.text, "Write a calm haiku about the sea. Answer as JSON: {\"haiku\": \"…\"}");
//! ```
//!
//! The stored library ([`library`]: specialties, sub-specialties, versioned
//! expert prompts and their permissions), executions ([`execution`]) and
//! idea generation ([`ideas`]) are storage-agnostic: they define plain types
//! and repository traits that `muse-persistence` implements.

pub mod cached;
pub mod execution;
pub mod ideas;
pub mod library;
pub mod record;
mod schema;
mod template;

pub use cached::CachedLibrary;
pub use execution::{
    Execution, ExecutionFilter, ExecutionRepository, ExecutionScope, ExecutionSource,
    ExecutionStatus, ExecutionStoreError, ModelUsage,
};
pub use ideas::{Idea, IdeaFilter, IdeaPlan, IdeaRepository, IdeaRequest, IdeaStoreError};
pub use library::{
    DeleteOutcome, ExpertPrompt, FieldError, Library, LibraryError, LibraryRepository, ListFilter,
    ParentFilter, PromptContent, PromptInput, PromptVersion, Specialty, SpecialtyInput, Viewer,
};
pub use record::{CallRecord, CallStore, RecordError, UsageDelta};
pub use schema::{SchemaError, VariableError, VariablesSchema, MAX_VARIABLES_BYTES};
pub use template::{Template, TemplateError};

use serde_json::Value;

/// A template and the schema of its variables, checked together: every
/// placeholder must be declared in the schema's `properties`.
#[derive(Debug, Clone)]
pub struct PromptSpec {
    template: Template,
    schema: VariablesSchema,
}

/// Why a prompt definition was refused.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error("placeholders not declared in variables_schema.properties: {}", .0.join(", "))]
    Undeclared(Vec<String>),
}

/// Compiled specs of stored prompt versions. Versions never change once
/// written, so an entry never goes stale; the cache is bounded (it is
/// emptied when full). Compiling a JSON Schema costs far more than
/// validating against it.
#[derive(Debug, Default)]
pub struct SpecCache {
    map: std::sync::Mutex<std::collections::HashMap<(uuid::Uuid, i32), std::sync::Arc<PromptSpec>>>,
}

/// Entries kept before [`SpecCache`] starts over.
pub const SPEC_CACHE_CAPACITY: usize = 4096;

impl SpecCache {
    /// The compiled spec of `(prompt_id, version)`, compiling `template`
    /// and `schema` on a miss.
    pub fn get_or_compile(
        &self,
        prompt_id: uuid::Uuid,
        version: i32,
        template: &str,
        schema: &Value,
    ) -> Result<std::sync::Arc<PromptSpec>, SpecError> {
        if let Some(spec) = self
            .map
            .lock()
            .ok()
            .and_then(|m| m.get(&(prompt_id, version)).cloned())
        {
            return Ok(spec);
        }
        let spec = std::sync::Arc::new(PromptSpec::new(template, schema.clone())?);
        if let Ok(mut m) = self.map.lock() {
            if m.len() >= SPEC_CACHE_CAPACITY {
                m.clear();
            }
            m.insert((prompt_id, version), spec.clone());
        }
        Ok(spec)
    }
}

/// A rendered prompt and the variables it used (defaults filled in).
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub text: String,
    pub variables: Value,
}

/// Why rendering failed.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("the variables do not match the schema")]
    Invalid(Vec<VariableError>),
}

impl PromptSpec {
    pub fn new(template: &str, variables_schema: Value) -> Result<Self, SpecError> {
        let template = Template::parse(template)?;
        let schema = VariablesSchema::new(variables_schema)?;
        let undeclared: Vec<String> = template
            .placeholders()
            .filter(|p| !schema.declares(p))
            .map(str::to_string)
            .collect();
        if !undeclared.is_empty() {
            return Err(SpecError::Undeclared(undeclared));
        }
        Ok(Self { template, schema })
    }

    pub fn template(&self) -> &Template {
        &self.template
    }

    pub fn schema(&self) -> &VariablesSchema {
        &self.schema
    }

    /// Validates (all errors), fills defaults, renders.
    pub fn render(&self, variables: &Value) -> Result<Rendered, RenderError> {
        let variables = self
            .schema
            .validate(variables)
            .map_err(RenderError::Invalid)?;
        let text = self
            .template
            .render(&variables)
            .map_err(|missing| RenderError::Invalid(vec![VariableError::missing(&missing)]))?;
        Ok(Rendered { text, variables })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn undeclared_placeholders_are_refused() {
        let err = PromptSpec::new(
            "{a} and {b}",
            json!({"type": "object", "properties": {"a": {"type": "string"}}}),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "placeholders not declared in variables_schema.properties: b"
        );
    }

    #[test]
    fn optional_variables_without_default_must_still_be_given_when_used() {
        let spec = PromptSpec::new(
            "Hi {name}",
            json!({"type": "object", "properties": {"name": {"type": "string"}}}),
        )
        .unwrap();
        match spec.render(&json!({})) {
            Err(RenderError::Invalid(errors)) => assert_eq!(errors[0].path, "/name"),
            other => panic!("{other:?}"),
        }
        assert_eq!(spec.render(&json!({"name": "Ada"})).unwrap().text, "Hi Ada");
    }
}
