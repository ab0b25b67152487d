//! Idea generation (Creative Muse): an idea request becomes the variables
//! of one of the built-in idea prompts, which are ordinary expert prompts
//! seeded by a migration (so ideas are executions of a versioned prompt,
//! and administrators can edit them). Generated ideas are stored for their
//! author, who can rate them and mark favourites.

use muse_core::{Page, PageRequest};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::library::FieldError;

/// The built-in "Creative ideas" specialty and its "Idea generation"
/// sub-specialty (seeded by the migration `000003_prompt_library`).
pub const IDEAS_SPECIALTY_ID: Uuid = Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0001);
pub const IDEAS_SUB_SPECIALTY_ID: Uuid = Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0002);
/// The idea prompt for a free prompt (`{prompt}`, `{creativity}`).
pub const FREE_IDEA_PROMPT_ID: Uuid = Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0010);
/// The idea prompt for a category and theme (`{category}`, `{theme}`, `{creativity}`).
pub const CATEGORY_IDEA_PROMPT_ID: Uuid =
    Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0011);

/// Most ideas in one batch request.
pub const MAX_BATCH: usize = 10;
/// Longest free prompt, category or theme, in characters.
pub const MAX_IDEA_PROMPT_CHARS: usize = 4_000;
pub const MAX_CATEGORY_CHARS: usize = 100;

/// What the user asks for: a free `prompt`, or a `category` (and optional
/// `theme`); `creativity` 1–10 (default 5) sets the sampling temperature
/// unless `temperature` is given.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct IdeaRequest {
    pub prompt: Option<String>,
    pub category: Option<String>,
    pub theme: Option<String>,
    pub creativity: Option<u8>,
    pub temperature: Option<f32>,
    pub max_tokens: Option<u32>,
}

/// An idea request checked and turned into a prompt execution.
#[derive(Debug, Clone, PartialEq)]
pub struct IdeaPlan {
    pub prompt_id: Uuid,
    pub variables: Value,
    pub temperature: f32,
    pub max_tokens: u32,
    pub prompt: Option<String>,
    pub category: Option<String>,
    pub theme: Option<String>,
    pub creativity: u8,
}

/// Default `max_tokens` for an idea.
pub const DEFAULT_IDEA_MAX_TOKENS: u32 = 512;

fn err(field: &str, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.to_string(),
        message: message.into(),
    }
}

fn text(
    errors: &mut Vec<FieldError>,
    name: &str,
    v: &Option<String>,
    max: usize,
) -> Option<String> {
    let v = v.as_deref().map(str::trim).filter(|v| !v.is_empty())?;
    if v.chars().count() > max {
        errors.push(err(
            name,
            format!("{name} must be at most {max} characters"),
        ));
    }
    Some(v.to_string())
}

impl IdeaRequest {
    /// Checks the request (every error at once) and picks the idea prompt.
    pub fn plan(&self) -> Result<IdeaPlan, Vec<FieldError>> {
        let mut errors = Vec::new();
        let prompt = text(&mut errors, "prompt", &self.prompt, MAX_IDEA_PROMPT_CHARS);
        let category = text(&mut errors, "category", &self.category, MAX_CATEGORY_CHARS);
        let theme = text(&mut errors, "theme", &self.theme, MAX_CATEGORY_CHARS);
        let creativity = self.creativity.unwrap_or(5);
        if !(1..=10).contains(&creativity) {
            errors.push(err("creativity", "creativity must be between 1 and 10"));
        }
        if let Some(t) = self.temperature.filter(|t| !(0.0..=2.0).contains(t)) {
            errors.push(err(
                "temperature",
                format!("temperature must be between 0 and 2, got {t}"),
            ));
        }
        let max_tokens = self.max_tokens.unwrap_or(DEFAULT_IDEA_MAX_TOKENS);
        if !(1..=8_192).contains(&max_tokens) {
            errors.push(err("max_tokens", "max_tokens must be between 1 and 8192"));
        }
        if prompt.is_none() && category.is_none() {
            errors.push(err("prompt", "give a prompt, or a category (and a theme)"));
        }
        if prompt.is_some() && category.is_some() {
            errors.push(err(
                "category",
                "give either a prompt or a category, not both",
            ));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let (prompt_id, variables) = match (&prompt, &category) {
            (Some(p), _) => (
                FREE_IDEA_PROMPT_ID,
                json!({"prompt": p, "creativity": creativity}),
            ),
            (None, Some(c)) => {
                let mut v = json!({"category": c, "creativity": creativity});
                if let Some(t) = &theme {
                    v["theme"] = json!(t);
                }
                (CATEGORY_IDEA_PROMPT_ID, v)
            }
            (None, None) => return Err(vec![err("prompt", "give a prompt or a category")]),
        };
        Ok(IdeaPlan {
            prompt_id,
            variables,
            temperature: self
                .temperature
                .unwrap_or(0.2 + f32::from(creativity) * 0.1),
            max_tokens,
            prompt,
            category,
            theme,
            creativity,
        })
    }
}

/// A generated idea.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Idea {
    pub id: Uuid,
    pub user_id: Uuid,
    pub execution_id: Uuid,
    pub prompt: Option<String>,
    pub category: Option<String>,
    pub theme: Option<String>,
    pub creativity: u8,
    pub provider: String,
    pub model: String,
    pub content: String,
    /// 1–5, once rated.
    pub rating: Option<u8>,
    pub favorite: bool,
    pub created_at: i64,
}

/// Which ideas to list.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IdeaFilter {
    /// Exactly this rating.
    pub rating: Option<u8>,
    /// At least this rating (unrated ideas excluded).
    pub min_rating: Option<u8>,
    pub category: Option<String>,
    pub favorite: Option<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum IdeaStoreError {
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Other(String),
}

/// Storage of ideas; every call is scoped to one user.
pub trait IdeaRepository: Send + Sync + 'static {
    fn insert(&self, idea: &Idea) -> Result<(), IdeaStoreError>;
    fn get(&self, user_id: Uuid, id: Uuid) -> Result<Option<Idea>, IdeaStoreError>;
    /// The user's ideas, newest first.
    fn list(
        &self,
        user_id: Uuid,
        filter: &IdeaFilter,
        page: PageRequest,
    ) -> Result<Page<Idea>, IdeaStoreError>;
    /// Sets the rating and/or favourite flag of one of the user's ideas;
    /// `None` when the user has no such idea.
    fn update(
        &self,
        user_id: Uuid,
        id: Uuid,
        rating: Option<u8>,
        favorite: Option<bool>,
    ) -> Result<Option<Idea>, IdeaStoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_needs_a_prompt_or_a_category_and_reports_every_error() {
        let errors = IdeaRequest {
            creativity: Some(11),
            temperature: Some(3.0),
            ..Default::default()
        }
        .plan()
        .unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["creativity", "temperature", "prompt"]);
    }

    #[test]
    fn creativity_sets_the_temperature_and_picks_the_prompt() {
        let plan = IdeaRequest {
            category: Some(" games ".into()),
            theme: Some("space".into()),
            creativity: Some(10),
            ..Default::default()
        }
        .plan()
        .unwrap();
        assert_eq!(plan.prompt_id, CATEGORY_IDEA_PROMPT_ID);
        assert!((plan.temperature - 1.2).abs() < 1e-6);
        assert_eq!(
            plan.variables,
            json!({"category": "games", "theme": "space", "creativity": 10})
        );
        let free = IdeaRequest {
            prompt: Some("a bakery app".into()),
            temperature: Some(0.0),
            ..Default::default()
        }
        .plan()
        .unwrap();
        assert_eq!(free.prompt_id, FREE_IDEA_PROMPT_ID);
        assert_eq!(free.temperature, 0.0);
    }
}
