//! The prompt library: specialties → sub-specialties → expert prompts,
//! with owners, publication, permissions and versions.
//!
//! Who may do what (enforced by [`Library`], documented in docs/prompts.md):
//! - anyone signed in reads what is published, and their own unpublished
//!   items; administrators read everything;
//! - the owner of an item and administrators edit and delete it; others get
//!   [`LibraryError::Forbidden`] for a published item and
//!   [`LibraryError::NotFound`] for an unpublished one (its existence is
//!   not revealed);
//! - anyone may add a sub-specialty under a specialty they can read, and a
//!   prompt under a sub-specialty they can read; the new item is theirs.
//!   Built-in items (no owner) are edited by administrators only.
//!
//! Sub-specialties are specialties with a parent: one [`Specialty`] type,
//! `parent_id` set for sub-specialties (one level deep).

use std::sync::Arc;

use muse_core::{Clock, Page, PageRequest};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::{PromptSpec, SpecError};

/// Longest name or title, in characters.
pub const MAX_NAME_CHARS: usize = 200;
/// Longest description, in characters.
pub const MAX_DESCRIPTION_CHARS: usize = 4_000;
/// Longest template, in characters.
pub const MAX_TEMPLATE_CHARS: usize = 100_000;
/// Largest variables schema, in bytes of JSON.
pub const MAX_SCHEMA_BYTES: usize = 64 * 1024;
/// Longest expected output, in characters.
pub const MAX_EXPECTED_OUTPUT_CHARS: usize = 20_000;
/// Most tags per prompt, and the longest tag in characters.
pub const MAX_TAGS: usize = 20;
pub const MAX_TAG_CHARS: usize = 50;

/// Who is asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Viewer {
    pub user_id: Uuid,
    pub is_admin: bool,
}

impl Viewer {
    fn can_read(&self, owner: Option<Uuid>, published: bool) -> bool {
        published || self.is_admin || owner == Some(self.user_id)
    }

    fn can_edit(&self, owner: Option<Uuid>) -> bool {
        self.is_admin || owner == Some(self.user_id)
    }
}

/// A specialty (`parent_id` is `None`) or a sub-specialty (`parent_id` is
/// its specialty).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Specialty {
    pub id: Uuid,
    pub parent_id: Option<Uuid>,
    /// `None` for built-in items.
    pub owner_id: Option<Uuid>,
    pub name: String,
    pub description: String,
    pub published: bool,
    pub created_at: i64,
    pub updated_at: i64,
    /// An icon shown next to the name (an `http(s)` URL), as Rubi Studio's
    /// specialties have.
    pub icon_url: Option<String>,
}

/// The versioned content of an expert prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptContent {
    pub title: String,
    pub description: String,
    pub template: String,
    pub variables_schema: Value,
    pub expected_output: Option<String>,
    pub tags: Vec<String>,
}

/// An expert prompt at its current version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpertPrompt {
    pub id: Uuid,
    pub sub_specialty_id: Uuid,
    pub owner_id: Option<Uuid>,
    pub published: bool,
    /// The current version (1 for a new prompt).
    pub version: i32,
    pub content: PromptContent,
    pub created_at: i64,
    pub updated_at: i64,
}

/// One version of an expert prompt; versions never change once written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptVersion {
    pub prompt_id: Uuid,
    pub version: i32,
    pub content: PromptContent,
    pub created_by: Option<Uuid>,
    pub created_at: i64,
}

/// Which items to list; `None` fields do not filter.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ListFilter {
    /// Where the items hang.
    pub parent: ParentFilter,
    /// Case-insensitive substring of the name or title.
    pub q: Option<String>,
    /// Prompts only: carries this tag.
    pub tag: Option<String>,
    /// Only items owned by this user.
    pub owner_id: Option<Uuid>,
}

/// Which parent listed items have.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ParentFilter {
    #[default]
    Any,
    /// Specialties only: items without a parent (top-level specialties).
    None,
    /// Specialties only: items with some parent (sub-specialties).
    Some,
    /// Items under this parent (sub-specialties of a specialty, prompts of
    /// a sub-specialty).
    Of(Uuid),
}

/// A new specialty, sub-specialty or the fields of a patch.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct SpecialtyInput {
    pub name: Option<String>,
    pub description: Option<String>,
    pub published: Option<bool>,
    /// An `http(s)` URL; on edit, an empty string clears it.
    pub icon_url: Option<String>,
}

/// Most characters of an icon URL.
pub const MAX_ICON_URL_CHARS: usize = 2048;

/// An icon URL: empty (none), or an absolute `http(s)` URL of at most
/// [`MAX_ICON_URL_CHARS`] characters without spaces or control characters.
fn check_icon_url(errors: &mut Vec<FieldError>, raw: &str) -> Option<String> {
    let url = raw.trim();
    if url.is_empty() {
        return None;
    }
    let scheme_ok = ["https://", "http://"].iter().any(|p| {
        url.len() > p.len() && url.as_bytes()[..p.len()].eq_ignore_ascii_case(p.as_bytes())
    });
    if !scheme_ok
        || url.chars().count() > MAX_ICON_URL_CHARS
        || url.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        errors.push(field(
            "icon_url",
            format!("must be an http(s) URL of at most {MAX_ICON_URL_CHARS} characters"),
        ));
        return None;
    }
    Some(url.to_string())
}

/// A new expert prompt, or a patch (`None` keeps the current value).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct PromptInput {
    pub sub_specialty_id: Option<Uuid>,
    pub title: Option<String>,
    pub description: Option<String>,
    pub template: Option<String>,
    pub variables_schema: Option<Value>,
    /// `Some(None)` clears it in a patch.
    pub expected_output: Option<Option<String>>,
    pub tags: Option<Vec<String>>,
    pub published: Option<bool>,
}

/// One invalid field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum LibraryError {
    #[error("no such {0}")]
    NotFound(&'static str),
    #[error("{0}")]
    Forbidden(String),
    #[error("invalid input")]
    Invalid(Vec<FieldError>),
    #[error("{0}")]
    Conflict(String),
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Other(String),
}

/// What a delete found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteOutcome {
    Deleted,
    NotFound,
    /// The item still has children; nothing was deleted.
    HasChildren,
}

/// Storage of the library. Reads are unscoped: [`Library`] applies the
/// permissions, except in lists, which take the viewer so that a page
/// holds only readable items.
pub trait LibraryRepository: Send + Sync + 'static {
    fn insert_specialty(&self, s: &Specialty) -> Result<(), LibraryError>;
    fn specialty(&self, id: Uuid) -> Result<Option<Specialty>, LibraryError>;
    fn update_specialty(&self, s: &Specialty) -> Result<(), LibraryError>;
    fn delete_specialty(&self, id: Uuid) -> Result<DeleteOutcome, LibraryError>;
    fn list_specialties(
        &self,
        viewer: Viewer,
        filter: &ListFilter,
        page: PageRequest,
    ) -> Result<Page<Specialty>, LibraryError>;

    /// Inserts the prompt and its version 1.
    fn insert_prompt(&self, p: &ExpertPrompt, created_by: Option<Uuid>)
        -> Result<(), LibraryError>;
    fn prompt(&self, id: Uuid) -> Result<Option<ExpertPrompt>, LibraryError>;
    /// Writes `p` (its metadata, and its content as version `p.version` when
    /// `new_version`), only if the stored current version is
    /// `expected_version`; [`LibraryError::Conflict`] otherwise.
    fn update_prompt(
        &self,
        p: &ExpertPrompt,
        expected_version: i32,
        new_version: Option<&PromptVersion>,
    ) -> Result<(), LibraryError>;
    fn delete_prompt(&self, id: Uuid) -> Result<DeleteOutcome, LibraryError>;
    fn list_prompts(
        &self,
        viewer: Viewer,
        filter: &ListFilter,
        page: PageRequest,
    ) -> Result<Page<ExpertPrompt>, LibraryError>;
    /// Versions of a prompt, newest first.
    fn prompt_versions(
        &self,
        id: Uuid,
        page: PageRequest,
    ) -> Result<Page<PromptVersion>, LibraryError>;
    fn prompt_version(&self, id: Uuid, version: i32)
        -> Result<Option<PromptVersion>, LibraryError>;
}

/// The library's rules over a [`LibraryRepository`]. Every call blocks.
#[derive(Clone)]
pub struct Library {
    repo: Arc<dyn LibraryRepository>,
    clock: Arc<dyn Clock>,
}

fn field(field: &str, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.to_string(),
        message: message.into(),
    }
}

fn check_text(
    errors: &mut Vec<FieldError>,
    name: &str,
    value: &str,
    min: usize,
    max: usize,
) -> String {
    let trimmed = value.trim();
    let n = trimmed.chars().count();
    if n < min {
        errors.push(field(name, format!("{name} must not be empty")));
    } else if n > max {
        errors.push(field(
            name,
            format!("{name} must be at most {max} characters (got {n})"),
        ));
    }
    if trimmed
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t' && c != '\r')
    {
        errors.push(field(
            name,
            format!("{name} must not contain control characters"),
        ));
    }
    trimmed.to_string()
}

/// Lower-cased, trimmed, de-duplicated tags of letters, digits, `-` and spaces.
fn check_tags(errors: &mut Vec<FieldError>, tags: &[String]) -> Vec<String> {
    if tags.len() > MAX_TAGS {
        errors.push(field("tags", format!("at most {MAX_TAGS} tags")));
    }
    let mut out: Vec<String> = Vec::new();
    for (i, t) in tags.iter().enumerate() {
        let t = t.trim().to_lowercase();
        let n = t.chars().count();
        if n == 0 || n > MAX_TAG_CHARS {
            errors.push(field(
                &format!("tags[{i}]"),
                format!("a tag has 1 to {MAX_TAG_CHARS} characters"),
            ));
        } else if !t
            .chars()
            .all(|c| c.is_alphanumeric() || c == '-' || c == ' ')
        {
            errors.push(field(
                &format!("tags[{i}]"),
                "a tag holds letters, digits, '-' and spaces only",
            ));
        } else if !out.contains(&t) {
            out.push(t);
        }
    }
    out
}

/// Checks prompt content: lengths, the schema, and that every placeholder
/// is declared in it.
pub fn validate_content(content: &PromptContent) -> Result<PromptContent, Vec<FieldError>> {
    let mut errors = Vec::new();
    let title = check_text(&mut errors, "title", &content.title, 1, MAX_NAME_CHARS);
    let description = check_text(
        &mut errors,
        "description",
        &content.description,
        0,
        MAX_DESCRIPTION_CHARS,
    );
    if content.template.chars().count() > MAX_TEMPLATE_CHARS {
        errors.push(field(
            "template",
            format!("template must be at most {MAX_TEMPLATE_CHARS} characters"),
        ));
    } else if content.template.trim().is_empty() {
        errors.push(field("template", "template must not be empty"));
    }
    let schema_size = serde_json::to_vec(&content.variables_schema)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if schema_size > MAX_SCHEMA_BYTES {
        errors.push(field(
            "variables_schema",
            format!("variables_schema must be at most {MAX_SCHEMA_BYTES} bytes of JSON"),
        ));
    } else if errors.iter().all(|e| e.field != "template") {
        match PromptSpec::new(&content.template, content.variables_schema.clone()) {
            Ok(_) => {}
            Err(SpecError::Template(e)) => errors.push(field("template", e.to_string())),
            Err(e @ SpecError::Schema(_)) => errors.push(field("variables_schema", e.to_string())),
            Err(e @ SpecError::Undeclared(_)) => {
                errors.push(field("variables_schema", e.to_string()))
            }
        }
    }
    let expected_output = content.expected_output.as_ref().map(|e| {
        check_text(
            &mut errors,
            "expected_output",
            e,
            0,
            MAX_EXPECTED_OUTPUT_CHARS,
        )
    });
    let tags = check_tags(&mut errors, &content.tags);
    if errors.is_empty() {
        Ok(PromptContent {
            title,
            description,
            template: content.template.clone(),
            variables_schema: content.variables_schema.clone(),
            expected_output: expected_output.filter(|e| !e.is_empty()),
            tags,
        })
    } else {
        Err(errors)
    }
}

impl Library {
    pub fn new(repo: Arc<dyn LibraryRepository>, clock: Arc<dyn Clock>) -> Self {
        Self { repo, clock }
    }

    fn readable_specialty(
        &self,
        viewer: Viewer,
        id: Uuid,
        what: &'static str,
    ) -> Result<Specialty, LibraryError> {
        match self.repo.specialty(id)? {
            Some(s) if viewer.can_read(s.owner_id, s.published) => Ok(s),
            _ => Err(LibraryError::NotFound(what)),
        }
    }

    fn editable<T>(
        viewer: Viewer,
        item: T,
        owner: Option<Uuid>,
        what: &str,
    ) -> Result<T, LibraryError> {
        if viewer.can_edit(owner) {
            Ok(item)
        } else {
            Err(LibraryError::Forbidden(format!(
                "only the owner of this {what} or an administrator may change it"
            )))
        }
    }

    // ----- specialties and sub-specialties -------------------------------

    /// Creates a specialty (`parent_id` `None`) or a sub-specialty of a
    /// readable specialty.
    pub fn create_specialty(
        &self,
        viewer: Viewer,
        parent_id: Option<Uuid>,
        input: &SpecialtyInput,
    ) -> Result<Specialty, LibraryError> {
        let mut errors = Vec::new();
        let name = check_text(
            &mut errors,
            "name",
            input.name.as_deref().unwrap_or(""),
            1,
            MAX_NAME_CHARS,
        );
        let description = check_text(
            &mut errors,
            "description",
            input.description.as_deref().unwrap_or(""),
            0,
            MAX_DESCRIPTION_CHARS,
        );
        let icon_url = check_icon_url(&mut errors, input.icon_url.as_deref().unwrap_or(""));
        if !errors.is_empty() {
            return Err(LibraryError::Invalid(errors));
        }
        if let Some(parent) = parent_id {
            let p = self.readable_specialty(viewer, parent, "specialty")?;
            if p.parent_id.is_some() {
                return Err(LibraryError::Invalid(vec![field(
                    "specialty_id",
                    "a sub-specialty belongs to a specialty, not to another sub-specialty",
                )]));
            }
        }
        let now = self.clock.now_ms();
        let s = Specialty {
            id: Uuid::now_v7(),
            parent_id,
            owner_id: Some(viewer.user_id),
            name,
            description,
            published: input.published.unwrap_or(false),
            created_at: now,
            updated_at: now,
            icon_url,
        };
        self.repo.insert_specialty(&s)?;
        Ok(s)
    }

    /// A readable specialty (`sub` false) or sub-specialty (`sub` true).
    pub fn specialty(
        &self,
        viewer: Viewer,
        id: Uuid,
        sub: bool,
    ) -> Result<Specialty, LibraryError> {
        let what = if sub { "sub-specialty" } else { "specialty" };
        let s = self.readable_specialty(viewer, id, what)?;
        if s.parent_id.is_some() != sub {
            return Err(LibraryError::NotFound(what));
        }
        Ok(s)
    }

    pub fn update_specialty(
        &self,
        viewer: Viewer,
        id: Uuid,
        sub: bool,
        patch: &SpecialtyInput,
    ) -> Result<Specialty, LibraryError> {
        let what = if sub { "sub-specialty" } else { "specialty" };
        let current = self.specialty(viewer, id, sub)?;
        let owner = current.owner_id;
        let mut s = Self::editable(viewer, current, owner, what)?;
        let mut errors = Vec::new();
        if let Some(name) = &patch.name {
            s.name = check_text(&mut errors, "name", name, 1, MAX_NAME_CHARS);
        }
        if let Some(d) = &patch.description {
            s.description = check_text(&mut errors, "description", d, 0, MAX_DESCRIPTION_CHARS);
        }
        if let Some(icon) = &patch.icon_url {
            s.icon_url = check_icon_url(&mut errors, icon);
        }
        if !errors.is_empty() {
            return Err(LibraryError::Invalid(errors));
        }
        if let Some(p) = patch.published {
            s.published = p;
        }
        s.updated_at = self.clock.now_ms();
        self.repo.update_specialty(&s)?;
        Ok(s)
    }

    /// Deletes an empty specialty or sub-specialty ([`LibraryError::Conflict`]
    /// while it holds sub-specialties or prompts).
    pub fn delete_specialty(
        &self,
        viewer: Viewer,
        id: Uuid,
        sub: bool,
    ) -> Result<(), LibraryError> {
        let what = if sub { "sub-specialty" } else { "specialty" };
        let current = self.specialty(viewer, id, sub)?;
        let owner = current.owner_id;
        Self::editable(viewer, current, owner, what)?;
        match self.repo.delete_specialty(id)? {
            DeleteOutcome::Deleted => Ok(()),
            DeleteOutcome::NotFound => Err(LibraryError::NotFound(what)),
            DeleteOutcome::HasChildren => Err(LibraryError::Conflict(format!(
                "this {what} is not empty: delete or move what it holds first"
            ))),
        }
    }

    /// Readable specialties (`sub` false: top level; true: sub-specialties,
    /// of `filter.parent_id` when given).
    pub fn list_specialties(
        &self,
        viewer: Viewer,
        sub: bool,
        mut filter: ListFilter,
        page: PageRequest,
    ) -> Result<Page<Specialty>, LibraryError> {
        filter.parent = match (sub, filter.parent) {
            (false, _) => ParentFilter::None,
            (true, ParentFilter::Of(parent)) => {
                self.specialty(viewer, parent, false)?;
                ParentFilter::Of(parent)
            }
            (true, _) => ParentFilter::Some,
        };
        self.repo.list_specialties(viewer, &filter, page)
    }

    // ----- expert prompts -------------------------------------------------

    fn content_from(input: &PromptInput, base: Option<&PromptContent>) -> PromptContent {
        PromptContent {
            title: input
                .title
                .clone()
                .or_else(|| base.map(|b| b.title.clone()))
                .unwrap_or_default(),
            description: input
                .description
                .clone()
                .or_else(|| base.map(|b| b.description.clone()))
                .unwrap_or_default(),
            template: input
                .template
                .clone()
                .or_else(|| base.map(|b| b.template.clone()))
                .unwrap_or_default(),
            variables_schema: input
                .variables_schema
                .clone()
                .or_else(|| base.map(|b| b.variables_schema.clone()))
                .unwrap_or(Value::Null),
            expected_output: match &input.expected_output {
                Some(v) => v.clone(),
                None => base.and_then(|b| b.expected_output.clone()),
            },
            tags: input
                .tags
                .clone()
                .or_else(|| base.map(|b| b.tags.clone()))
                .unwrap_or_default(),
        }
    }

    fn prompt_parent(&self, viewer: Viewer, id: Option<Uuid>) -> Result<Uuid, LibraryError> {
        let Some(id) = id else {
            return Err(LibraryError::Invalid(vec![field(
                "sub_specialty_id",
                "sub_specialty_id is required",
            )]));
        };
        match self.repo.specialty(id)? {
            Some(s) if viewer.can_read(s.owner_id, s.published) && s.parent_id.is_some() => Ok(id),
            _ => Err(LibraryError::Invalid(vec![field(
                "sub_specialty_id",
                "no such sub-specialty",
            )])),
        }
    }

    pub fn create_prompt(
        &self,
        viewer: Viewer,
        input: &PromptInput,
    ) -> Result<ExpertPrompt, LibraryError> {
        let content = validate_content(&Self::content_from(input, None));
        let parent = self.prompt_parent(viewer, input.sub_specialty_id);
        let content = match (content, parent) {
            (Ok(c), Ok(_)) => c,
            (Err(mut errors), Err(LibraryError::Invalid(more))) => {
                errors.extend(more);
                return Err(LibraryError::Invalid(errors));
            }
            (Err(errors), _) => return Err(LibraryError::Invalid(errors)),
            (Ok(_), Err(e)) => return Err(e),
        };
        let now = self.clock.now_ms();
        let p = ExpertPrompt {
            id: Uuid::now_v7(),
            sub_specialty_id: input.sub_specialty_id.unwrap_or_default(),
            owner_id: Some(viewer.user_id),
            published: input.published.unwrap_or(false),
            version: 1,
            content,
            created_at: now,
            updated_at: now,
        };
        self.repo.insert_prompt(&p, Some(viewer.user_id))?;
        Ok(p)
    }

    /// A readable prompt at its current version.
    pub fn prompt(&self, viewer: Viewer, id: Uuid) -> Result<ExpertPrompt, LibraryError> {
        Self::readable(viewer, self.repo.prompt(id)?)
    }

    /// `prompt` (as storage or a cache gave it) if `viewer` may read it:
    /// the rule of [`Library::prompt`], for a prompt found elsewhere
    /// ([`crate::CachedLibrary::peek`]).
    pub fn readable(
        viewer: Viewer,
        prompt: Option<ExpertPrompt>,
    ) -> Result<ExpertPrompt, LibraryError> {
        match prompt {
            Some(p) if viewer.can_read(p.owner_id, p.published) => Ok(p),
            _ => Err(LibraryError::NotFound("expert prompt")),
        }
    }

    /// Applies a patch. A change to the content (title, description,
    /// template, schema, expected output, tags) creates a new version;
    /// publication and the sub-specialty are not versioned.
    pub fn update_prompt(
        &self,
        viewer: Viewer,
        id: Uuid,
        patch: &PromptInput,
    ) -> Result<ExpertPrompt, LibraryError> {
        let current = self.prompt(viewer, id)?;
        let owner = current.owner_id;
        let current = Self::editable(viewer, current, owner, "expert prompt")?;
        let content = validate_content(&Self::content_from(patch, Some(&current.content)))
            .map_err(LibraryError::Invalid)?;
        let mut next = current.clone();
        if patch.sub_specialty_id.is_some() {
            next.sub_specialty_id = self.prompt_parent(viewer, patch.sub_specialty_id)?;
        }
        if let Some(p) = patch.published {
            next.published = p;
        }
        let now = self.clock.now_ms();
        next.updated_at = now;
        let changed = content != current.content;
        let version = if changed {
            next.version = current.version + 1;
            next.content = content;
            Some(PromptVersion {
                prompt_id: id,
                version: next.version,
                content: next.content.clone(),
                created_by: Some(viewer.user_id),
                created_at: now,
            })
        } else {
            None
        };
        self.repo
            .update_prompt(&next, current.version, version.as_ref())?;
        Ok(next)
    }

    /// Deletes a prompt and its versions. Executions that used it keep
    /// their record (prompt id, version, rendered text).
    pub fn delete_prompt(&self, viewer: Viewer, id: Uuid) -> Result<(), LibraryError> {
        let current = self.prompt(viewer, id)?;
        let owner = current.owner_id;
        Self::editable(viewer, current, owner, "expert prompt")?;
        match self.repo.delete_prompt(id)? {
            DeleteOutcome::Deleted => Ok(()),
            _ => Err(LibraryError::NotFound("expert prompt")),
        }
    }

    pub fn list_prompts(
        &self,
        viewer: Viewer,
        mut filter: ListFilter,
        page: PageRequest,
    ) -> Result<Page<ExpertPrompt>, LibraryError> {
        filter.parent = match filter.parent {
            ParentFilter::Of(parent) => {
                self.specialty(viewer, parent, true)?;
                ParentFilter::Of(parent)
            }
            _ => ParentFilter::Any,
        };
        self.repo.list_prompts(viewer, &filter, page)
    }

    pub fn prompt_versions(
        &self,
        viewer: Viewer,
        id: Uuid,
        page: PageRequest,
    ) -> Result<Page<PromptVersion>, LibraryError> {
        self.prompt(viewer, id)?;
        self.repo.prompt_versions(id, page)
    }

    /// One version of a readable prompt.
    pub fn prompt_version(
        &self,
        viewer: Viewer,
        id: Uuid,
        version: i32,
    ) -> Result<PromptVersion, LibraryError> {
        self.prompt(viewer, id)?;
        self.repo
            .prompt_version(id, version)?
            .ok_or(LibraryError::NotFound("prompt version"))
    }
}
