//! The prompt library (`/api/v1/specialties`, `/api/v1/sub-specialties`,
//! `/api/v1/expert-prompts`) and prompt execution
//! (`POST /api/v1/execute-prompt/{id}`, and `/stream` for SSE).
//! Permissions are `muse_prompts::library`'s; see docs/prompts.md.

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use muse_auth::Principal;
use muse_core::PageRequest;
use muse_inference::{GenerateRequest, Message};
use muse_prompts::{
    ExecutionSource, ExpertPrompt, ListFilter, ParentFilter, PromptContent, PromptInput,
    PromptVersion, RenderError, Specialty, SpecialtyInput, Viewer,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::{blocking, rfc3339, sse};
use crate::error::{ApiError, ErrorBody};
use crate::extract::CurrentUser;
use crate::state::AppState;
use muse_gateway::Run;

pub fn config(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/api/v1/specialties")
            .service(
                web::resource("")
                    .get(list_specialties)
                    .post(create_specialty),
            )
            .service(
                web::resource("/{id}")
                    .get(get_specialty)
                    .patch(update_specialty)
                    .delete(delete_specialty),
            ),
    )
    .service(
        web::scope("/api/v1/sub-specialties")
            .service(
                web::resource("")
                    .get(list_sub_specialties)
                    .post(create_sub_specialty),
            )
            .service(
                web::resource("/{id}")
                    .get(get_sub_specialty)
                    .patch(update_sub_specialty)
                    .delete(delete_sub_specialty),
            ),
    )
    .service(
        web::scope("/api/v1/expert-prompts")
            .service(web::resource("").get(list_prompts).post(create_prompt))
            .service(
                web::resource("/{id}")
                    .get(get_prompt)
                    .patch(update_prompt)
                    .delete(delete_prompt),
            )
            .service(web::resource("/{id}/versions").get(list_versions))
            .service(web::resource("/{id}/versions/{version}").get(get_version)),
    )
    .service(
        web::scope("/api/v1/execute-prompt")
            .service(web::resource("/{id}").post(execute_prompt))
            .service(web::resource("/{id}/stream").post(execute_prompt_stream)),
    );
}

pub fn viewer(p: &Principal) -> Viewer {
    Viewer {
        user_id: p.user.id,
        is_admin: p.is_admin(),
    }
}

// ----- views ------------------------------------------------------------

#[derive(Debug, Serialize, ToSchema)]
pub struct SpecialtyView {
    pub id: Uuid,
    /// Sub-specialties only: the specialty they belong to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub specialty_id: Option<Uuid>,
    /// Null for built-in items.
    pub owner_id: Option<Uuid>,
    pub name: String,
    pub description: String,
    pub published: bool,
    /// An icon URL, or null.
    pub icon_url: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

impl From<Specialty> for SpecialtyView {
    fn from(s: Specialty) -> Self {
        Self {
            id: s.id,
            specialty_id: s.parent_id,
            owner_id: s.owner_id,
            name: s.name,
            description: s.description,
            published: s.published,
            icon_url: s.icon_url,
            created_at: rfc3339(s.created_at),
            updated_at: rfc3339(s.updated_at),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SpecialtyPage {
    pub items: Vec<SpecialtyView>,
    pub page: u32,
    pub per_page: u32,
    pub total: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ExpertPromptView {
    pub id: Uuid,
    pub sub_specialty_id: Uuid,
    pub owner_id: Option<Uuid>,
    pub published: bool,
    /// The current version; editing the content creates the next one.
    pub version: i32,
    pub title: String,
    pub description: String,
    /// `{variable}` placeholders; `{{` and `}}` for literal braces.
    pub template: String,
    #[schema(value_type = Object)]
    pub variables_schema: Value,
    pub expected_output: Option<String>,
    pub tags: Vec<String>,
    pub created_at: String,
    pub updated_at: String,
}

impl From<ExpertPrompt> for ExpertPromptView {
    fn from(p: ExpertPrompt) -> Self {
        Self {
            id: p.id,
            sub_specialty_id: p.sub_specialty_id,
            owner_id: p.owner_id,
            published: p.published,
            version: p.version,
            title: p.content.title,
            description: p.content.description,
            template: p.content.template,
            variables_schema: p.content.variables_schema,
            expected_output: p.content.expected_output,
            tags: p.content.tags,
            created_at: rfc3339(p.created_at),
            updated_at: rfc3339(p.updated_at),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ExpertPromptPage {
    pub items: Vec<ExpertPromptView>,
    pub page: u32,
    pub per_page: u32,
    pub total: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PromptVersionView {
    pub prompt_id: Uuid,
    pub version: i32,
    pub title: String,
    pub description: String,
    pub template: String,
    #[schema(value_type = Object)]
    pub variables_schema: Value,
    pub expected_output: Option<String>,
    pub tags: Vec<String>,
    pub created_by: Option<Uuid>,
    pub created_at: String,
}

impl From<PromptVersion> for PromptVersionView {
    fn from(v: PromptVersion) -> Self {
        Self {
            prompt_id: v.prompt_id,
            version: v.version,
            title: v.content.title,
            description: v.content.description,
            template: v.content.template,
            variables_schema: v.content.variables_schema,
            expected_output: v.content.expected_output,
            tags: v.content.tags,
            created_by: v.created_by,
            created_at: rfc3339(v.created_at),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PromptVersionPage {
    pub items: Vec<PromptVersionView>,
    pub page: u32,
    pub per_page: u32,
    pub total: u64,
}

// ----- requests ---------------------------------------------------------

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SpecialtyBody {
    /// 1–200 characters (required on create).
    pub name: Option<String>,
    pub description: Option<String>,
    /// Visible to every user when true (default false: only you and admins).
    pub published: Option<bool>,
    /// An `http(s)` URL of an icon (at most 2,048 characters); on edit, ""
    /// removes it.
    pub icon_url: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubSpecialtyBody {
    /// The specialty it belongs to (required on create; cannot change).
    pub specialty_id: Option<Uuid>,
    pub name: Option<String>,
    pub description: Option<String>,
    pub published: Option<bool>,
    /// As for specialties.
    pub icon_url: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExpertPromptBody {
    /// Required on create; may move the prompt on edit.
    pub sub_specialty_id: Option<Uuid>,
    pub title: Option<String>,
    pub description: Option<String>,
    pub template: Option<String>,
    /// A JSON Schema with `"type": "object"` declaring every placeholder
    /// in `properties`.
    #[schema(value_type = Option<Object>)]
    pub variables_schema: Option<Value>,
    /// An empty string clears it.
    pub expected_output: Option<String>,
    pub tags: Option<Vec<String>>,
    pub published: Option<bool>,
}

impl From<ExpertPromptBody> for PromptInput {
    fn from(b: ExpertPromptBody) -> Self {
        PromptInput {
            sub_specialty_id: b.sub_specialty_id,
            title: b.title,
            description: b.description,
            template: b.template,
            variables_schema: b.variables_schema,
            expected_output: b.expected_output.map(Some),
            tags: b.tags,
            published: b.published,
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct ListQuery {
    pub page: Option<u32>,
    pub per_page: Option<u32>,
    /// Case-insensitive text in the name (or title).
    pub q: Option<String>,
    /// Only your own items.
    pub mine: Option<bool>,
    /// Sub-specialties: those of this specialty.
    pub specialty_id: Option<Uuid>,
    /// Prompts: those of this sub-specialty.
    pub sub_specialty_id: Option<Uuid>,
    /// Prompts: those carrying this tag.
    pub tag: Option<String>,
}

impl ListQuery {
    fn split(self, user: &CurrentUser, parent: Option<Uuid>) -> (ListFilter, PageRequest) {
        let filter = ListFilter {
            parent: parent.map(ParentFilter::Of).unwrap_or_default(),
            q: self.q.filter(|q| !q.trim().is_empty()),
            tag: self.tag.filter(|t| !t.trim().is_empty()),
            owner_id: self.mine.unwrap_or(false).then_some(user.0.user.id),
        };
        (filter, PageRequest::new(self.page, self.per_page))
    }
}

// ----- specialties ------------------------------------------------------

async fn list_level(
    state: &AppState,
    user: &CurrentUser,
    sub: bool,
    query: ListQuery,
) -> Result<web::Json<SpecialtyPage>, ApiError> {
    let parent = query.specialty_id;
    let (filter, page) = query.split(user, parent);
    let (lib, v) = (state.library.clone(), viewer(&user.0));
    let p = blocking(move || lib.list_specialties(v, sub, filter, page)).await?;
    Ok(web::Json(SpecialtyPage {
        page: p.page,
        per_page: p.per_page,
        total: p.total,
        items: p.items.into_iter().map(SpecialtyView::from).collect(),
    }))
}

async fn create_level(
    state: &AppState,
    user: &CurrentUser,
    parent: Option<Uuid>,
    input: SpecialtyInput,
) -> Result<HttpResponse, ApiError> {
    let (lib, v) = (state.library.clone(), viewer(&user.0));
    let s = blocking(move || lib.create_specialty(v, parent, &input)).await?;
    Ok(HttpResponse::Created().json(SpecialtyView::from(s)))
}

async fn get_level(
    state: &AppState,
    user: &CurrentUser,
    id: Uuid,
    sub: bool,
) -> Result<web::Json<SpecialtyView>, ApiError> {
    let (lib, v) = (state.library.clone(), viewer(&user.0));
    let s = blocking(move || lib.specialty(v, id, sub)).await?;
    Ok(web::Json(s.into()))
}

async fn update_level(
    state: &AppState,
    user: &CurrentUser,
    id: Uuid,
    sub: bool,
    patch: SpecialtyInput,
) -> Result<web::Json<SpecialtyView>, ApiError> {
    let (lib, v) = (state.library.clone(), viewer(&user.0));
    let s = blocking(move || lib.update_specialty(v, id, sub, &patch)).await?;
    Ok(web::Json(s.into()))
}

async fn delete_level(
    state: &AppState,
    user: &CurrentUser,
    id: Uuid,
    sub: bool,
) -> Result<HttpResponse, ApiError> {
    let (lib, v) = (state.library.clone(), viewer(&user.0));
    blocking(move || lib.delete_specialty(v, id, sub)).await?;
    Ok(HttpResponse::NoContent().finish())
}

fn specialty_input(
    name: Option<String>,
    description: Option<String>,
    published: Option<bool>,
    icon_url: Option<String>,
) -> SpecialtyInput {
    SpecialtyInput {
        name,
        description,
        published,
        icon_url,
    }
}

/// Specialties you can read (published, yours; all for admins), by name.
#[utoipa::path(get, path = "/api/v1/specialties", tag = "library", security(("bearer" = [])), params(ListQuery),
    responses((status = 200, body = SpecialtyPage), (status = 401, body = ErrorBody)))]
pub async fn list_specialties(
    state: web::Data<AppState>,
    user: CurrentUser,
    query: web::Query<ListQuery>,
) -> Result<web::Json<SpecialtyPage>, ApiError> {
    list_level(&state, &user, false, query.into_inner()).await
}

/// Creates a specialty; you own it.
#[utoipa::path(post, path = "/api/v1/specialties", tag = "library", security(("bearer" = [])), request_body = SpecialtyBody,
    responses((status = 201, body = SpecialtyView), (status = 422, description = "validation_failed", body = ErrorBody), (status = 401, body = ErrorBody)))]
pub async fn create_specialty(
    state: web::Data<AppState>,
    user: CurrentUser,
    body: web::Json<SpecialtyBody>,
) -> Result<HttpResponse, ApiError> {
    let b = body.into_inner();
    create_level(
        &state,
        &user,
        None,
        specialty_input(b.name, b.description, b.published, b.icon_url),
    )
    .await
}

#[utoipa::path(get, path = "/api/v1/specialties/{id}", tag = "library", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "specialty id")),
    responses((status = 200, body = SpecialtyView), (status = 404, body = ErrorBody)))]
pub async fn get_specialty(
    state: web::Data<AppState>,
    user: CurrentUser,
    path: web::Path<Uuid>,
) -> Result<web::Json<SpecialtyView>, ApiError> {
    get_level(&state, &user, path.into_inner(), false).await
}

/// Edits a specialty (owner or admin).
#[utoipa::path(patch, path = "/api/v1/specialties/{id}", tag = "library", security(("bearer" = [])), request_body = SpecialtyBody,
    params(("id" = Uuid, Path, description = "specialty id")),
    responses((status = 200, body = SpecialtyView), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn update_specialty(
    state: web::Data<AppState>,
    user: CurrentUser,
    path: web::Path<Uuid>,
    body: web::Json<SpecialtyBody>,
) -> Result<web::Json<SpecialtyView>, ApiError> {
    let b = body.into_inner();
    let patch = specialty_input(b.name, b.description, b.published, b.icon_url);
    update_level(&state, &user, path.into_inner(), false, patch).await
}

/// Deletes an empty specialty (owner or admin; 409 while it has sub-specialties).
#[utoipa::path(delete, path = "/api/v1/specialties/{id}", tag = "library", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "specialty id")),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn delete_specialty(
    state: web::Data<AppState>,
    user: CurrentUser,
    path: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    delete_level(&state, &user, path.into_inner(), false).await
}

/// Sub-specialties you can read, optionally of one specialty.
#[utoipa::path(get, path = "/api/v1/sub-specialties", tag = "library", security(("bearer" = [])), params(ListQuery),
    responses((status = 200, body = SpecialtyPage), (status = 404, description = "no such specialty", body = ErrorBody)))]
pub async fn list_sub_specialties(
    state: web::Data<AppState>,
    user: CurrentUser,
    query: web::Query<ListQuery>,
) -> Result<web::Json<SpecialtyPage>, ApiError> {
    list_level(&state, &user, true, query.into_inner()).await
}

/// Creates a sub-specialty under a specialty you can read; you own it.
#[utoipa::path(post, path = "/api/v1/sub-specialties", tag = "library", security(("bearer" = [])), request_body = SubSpecialtyBody,
    responses((status = 201, body = SpecialtyView), (status = 404, description = "no such specialty", body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create_sub_specialty(
    state: web::Data<AppState>,
    user: CurrentUser,
    body: web::Json<SubSpecialtyBody>,
) -> Result<HttpResponse, ApiError> {
    let b = body.into_inner();
    let Some(parent) = b.specialty_id else {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "some fields are invalid",
        )
        .with_details(
            json!({"fields": [{"field": "specialty_id", "message": "specialty_id is required"}]}),
        ));
    };
    let input = specialty_input(b.name, b.description, b.published, b.icon_url);
    create_level(&state, &user, Some(parent), input).await
}

#[utoipa::path(get, path = "/api/v1/sub-specialties/{id}", tag = "library", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "sub-specialty id")),
    responses((status = 200, body = SpecialtyView), (status = 404, body = ErrorBody)))]
pub async fn get_sub_specialty(
    state: web::Data<AppState>,
    user: CurrentUser,
    path: web::Path<Uuid>,
) -> Result<web::Json<SpecialtyView>, ApiError> {
    get_level(&state, &user, path.into_inner(), true).await
}

/// Edits a sub-specialty (owner or admin); `specialty_id` cannot change.
#[utoipa::path(patch, path = "/api/v1/sub-specialties/{id}", tag = "library", security(("bearer" = [])), request_body = SubSpecialtyBody,
    params(("id" = Uuid, Path, description = "sub-specialty id")),
    responses((status = 200, body = SpecialtyView), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn update_sub_specialty(
    state: web::Data<AppState>,
    user: CurrentUser,
    path: web::Path<Uuid>,
    body: web::Json<SubSpecialtyBody>,
) -> Result<web::Json<SpecialtyView>, ApiError> {
    let b = body.into_inner();
    if b.specialty_id.is_some() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "some fields are invalid",
        )
        .with_details(json!({"fields": [{"field": "specialty_id", "message": "a sub-specialty cannot move to another specialty"}]})));
    }
    let patch = specialty_input(b.name, b.description, b.published, b.icon_url);
    update_level(&state, &user, path.into_inner(), true, patch).await
}

/// Deletes an empty sub-specialty (owner or admin; 409 while it has prompts).
#[utoipa::path(delete, path = "/api/v1/sub-specialties/{id}", tag = "library", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "sub-specialty id")),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn delete_sub_specialty(
    state: web::Data<AppState>,
    user: CurrentUser,
    path: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    delete_level(&state, &user, path.into_inner(), true).await
}

// ----- expert prompts ---------------------------------------------------

/// Expert prompts you can read, most recently edited first.
#[utoipa::path(get, path = "/api/v1/expert-prompts", tag = "library", security(("bearer" = [])), params(ListQuery),
    responses((status = 200, body = ExpertPromptPage), (status = 404, description = "no such sub-specialty", body = ErrorBody)))]
pub async fn list_prompts(
    state: web::Data<AppState>,
    user: CurrentUser,
    query: web::Query<ListQuery>,
) -> Result<web::Json<ExpertPromptPage>, ApiError> {
    let q = query.into_inner();
    let parent = q.sub_specialty_id;
    let (filter, page) = q.split(&user, parent);
    let (lib, v) = (state.library.clone(), viewer(&user.0));
    let p = blocking(move || lib.list_prompts(v, filter, page)).await?;
    Ok(web::Json(ExpertPromptPage {
        page: p.page,
        per_page: p.per_page,
        total: p.total,
        items: p.items.into_iter().map(ExpertPromptView::from).collect(),
    }))
}

/// Creates an expert prompt (version 1). The template is parsed, the
/// schema compiled, and every placeholder must be declared in it.
#[utoipa::path(post, path = "/api/v1/expert-prompts", tag = "library", security(("bearer" = [])), request_body = ExpertPromptBody,
    responses((status = 201, body = ExpertPromptView), (status = 422, description = "validation_failed: every bad field", body = ErrorBody)))]
pub async fn create_prompt(
    state: web::Data<AppState>,
    user: CurrentUser,
    body: web::Json<ExpertPromptBody>,
) -> Result<HttpResponse, ApiError> {
    let input = PromptInput::from(body.into_inner());
    let (lib, v) = (state.library.clone(), viewer(&user.0));
    let p = blocking(move || lib.create_prompt(v, &input)).await?;
    Ok(HttpResponse::Created().json(ExpertPromptView::from(p)))
}

#[utoipa::path(get, path = "/api/v1/expert-prompts/{id}", tag = "library", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "expert prompt id")),
    responses((status = 200, body = ExpertPromptView), (status = 404, body = ErrorBody)))]
pub async fn get_prompt(
    state: web::Data<AppState>,
    user: CurrentUser,
    path: web::Path<Uuid>,
) -> Result<web::Json<ExpertPromptView>, ApiError> {
    let (lib, v, id) = (state.library.clone(), viewer(&user.0), path.into_inner());
    let p = blocking(move || lib.prompt(v, id)).await?;
    Ok(web::Json(p.into()))
}

/// Edits a prompt (owner or admin). A content change creates a new
/// version; earlier versions stay readable. 409 if someone else edited it
/// at the same moment.
#[utoipa::path(patch, path = "/api/v1/expert-prompts/{id}", tag = "library", security(("bearer" = [])), request_body = ExpertPromptBody,
    params(("id" = Uuid, Path, description = "expert prompt id")),
    responses((status = 200, body = ExpertPromptView), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn update_prompt(
    state: web::Data<AppState>,
    user: CurrentUser,
    path: web::Path<Uuid>,
    body: web::Json<ExpertPromptBody>,
) -> Result<web::Json<ExpertPromptView>, ApiError> {
    let patch = PromptInput::from(body.into_inner());
    let (lib, v, id) = (state.library.clone(), viewer(&user.0), path.into_inner());
    let p = blocking(move || lib.update_prompt(v, id, &patch)).await?;
    Ok(web::Json(p.into()))
}

/// Deletes a prompt and its versions (owner or admin); its executions stay.
#[utoipa::path(delete, path = "/api/v1/expert-prompts/{id}", tag = "library", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "expert prompt id")),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn delete_prompt(
    state: web::Data<AppState>,
    user: CurrentUser,
    path: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    let (lib, v, id) = (state.library.clone(), viewer(&user.0), path.into_inner());
    blocking(move || lib.delete_prompt(v, id)).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// Every version of a prompt, newest first.
#[utoipa::path(get, path = "/api/v1/expert-prompts/{id}/versions", tag = "library", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "expert prompt id"), super::PageQuery),
    responses((status = 200, body = PromptVersionPage), (status = 404, body = ErrorBody)))]
pub async fn list_versions(
    state: web::Data<AppState>,
    user: CurrentUser,
    path: web::Path<Uuid>,
    query: web::Query<super::PageQuery>,
) -> Result<web::Json<PromptVersionPage>, ApiError> {
    let (lib, v, id) = (state.library.clone(), viewer(&user.0), path.into_inner());
    let page = query.request();
    let p = blocking(move || lib.prompt_versions(v, id, page)).await?;
    Ok(web::Json(PromptVersionPage {
        page: p.page,
        per_page: p.per_page,
        total: p.total,
        items: p.items.into_iter().map(PromptVersionView::from).collect(),
    }))
}

#[utoipa::path(get, path = "/api/v1/expert-prompts/{id}/versions/{version}", tag = "library", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "expert prompt id"), ("version" = i32, Path, description = "version number")),
    responses((status = 200, body = PromptVersionView), (status = 404, body = ErrorBody)))]
pub async fn get_version(
    state: web::Data<AppState>,
    user: CurrentUser,
    path: web::Path<(Uuid, i32)>,
) -> Result<web::Json<PromptVersionView>, ApiError> {
    let (id, version) = path.into_inner();
    let (lib, v) = (state.library.clone(), viewer(&user.0));
    let p = blocking(move || lib.prompt_version(v, id, version)).await?;
    Ok(web::Json(p.into()))
}

// ----- execution --------------------------------------------------------

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecuteBody {
    /// Checked against the prompt's `variables_schema`; defaults filled in.
    #[serde(default = "empty_object")]
    #[schema(value_type = Object)]
    pub variables: Value,
    /// e.g. `openai`, `anthropic`, `gemini`, `local`, or a compatible server's name.
    pub llm_provider: String,
    /// The provider's model name (`local`: the Hugging Face repo id).
    pub llm_model: String,
    pub temperature: Option<f32>,
    pub max_tokens: Option<u32>,
    /// Run this version instead of the current one.
    pub version: Option<i32>,
    /// An optional system message sent before the rendered prompt.
    pub system: Option<String>,
}

fn empty_object() -> Value {
    json!({})
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TokensUsed {
    pub prompt: u32,
    pub completion: u32,
    pub total: u32,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ExecuteResponse {
    pub execution_id: Uuid,
    pub prompt_id: Uuid,
    pub prompt_version: i32,
    pub output: String,
    pub llm_provider: String,
    pub llm_model: String,
    pub tokens_used: TokensUsed,
    /// USD; null when the model's price is unknown.
    pub cost: Option<f64>,
    /// Seconds.
    pub execution_time: f64,
    pub time_to_first_token: Option<f64>,
    /// `succeeded`.
    pub status: String,
}

fn invalid(field: &str, message: String) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
        "some fields are invalid",
    )
    .with_details(json!({"fields": [{"field": field, "message": message}]}))
}

/// Checks the request, loads the prompt (or the asked version), and
/// prepares the run ([`prompt_run`]).
pub async fn prepare_execution(
    state: &AppState,
    principal: &Principal,
    prompt_id: Uuid,
    body: ExecuteBody,
) -> Result<Run, ApiError> {
    if let Some(t) = body.temperature.filter(|t| !(0.0..=2.0).contains(t)) {
        return Err(invalid(
            "temperature",
            format!("temperature must be between 0 and 2, got {t}"),
        ));
    }
    if body.max_tokens.is_some_and(|m| m == 0 || m > 128_000) {
        return Err(invalid(
            "max_tokens",
            "max_tokens must be between 1 and 128000".into(),
        ));
    }
    if body.system.as_ref().is_some_and(|s| s.len() > 20_000) {
        return Err(invalid(
            "system",
            "system must be at most 20000 bytes".into(),
        ));
    }
    let (lib, v) = (state.library.clone(), viewer(principal));
    let (version, content) = match body.version {
        Some(n) => {
            blocking(move || {
                lib.prompt_version(v, prompt_id, n)
                    .map(|p| (p.version, p.content))
            })
            .await?
        }
        None => {
            let p = current_prompt(state, v, prompt_id).await?;
            (p.version, p.content)
        }
    };
    prompt_run(
        state,
        principal,
        PromptCall {
            source: ExecutionSource::Prompt,
            key: format!("{}/{}", body.llm_provider, body.llm_model),
            prompt_id,
            version,
            content,
            variables: body.variables,
            system: body.system,
            temperature: body.temperature,
            max_tokens: body.max_tokens,
        },
    )?
    .admit()
    .await
    .map_err(ApiError::from)
}

/// The current version of prompt `id` as `viewer` may see it: from
/// memory when it is cached (no blocking-pool hop on a model call's path),
/// else read on the blocking pool.
pub async fn current_prompt(
    state: &AppState,
    viewer: Viewer,
    id: Uuid,
) -> Result<muse_prompts::ExpertPrompt, ApiError> {
    if let Some(p) = state.prompt_cache.peek(id) {
        return Ok(muse_prompts::Library::readable(viewer, p)?);
    }
    let lib = state.library.clone();
    blocking(move || lib.prompt(viewer, id)).await
}

/// One call of a stored prompt version.
pub struct PromptCall {
    pub source: ExecutionSource,
    /// Registry key.
    pub key: String,
    pub prompt_id: Uuid,
    pub version: i32,
    pub content: PromptContent,
    pub variables: Value,
    pub system: Option<String>,
    pub temperature: Option<f32>,
    pub max_tokens: Option<u32>,
}

/// Validates and renders the variables and prepares the run. Invalid
/// variables are recorded as a failed execution and answered with 422
/// `invalid_variables`, `details.errors` listing every error with its path.
pub fn prompt_run(
    state: &AppState,
    principal: &Principal,
    call: PromptCall,
) -> Result<Run, ApiError> {
    provider_gate(state, principal, &call.key)?;
    let spec = state
        .specs
        .get_or_compile(
            call.prompt_id,
            call.version,
            &call.content.template,
            &call.content.variables_schema,
        )
        .map_err(|e| ApiError::internal("a stored prompt no longer compiles", e))?;
    let mut messages = Vec::new();
    if let Some(system) = call.system.filter(|s| !s.trim().is_empty()) {
        messages.push(Message::system(system));
    }
    let mut request = GenerateRequest::new(call.key.clone(), Vec::new());
    request.temperature = call.temperature;
    request.max_tokens = call.max_tokens;
    match spec.render(&call.variables) {
        Ok(r) => {
            messages.push(Message::user(r.text));
            request.messages = messages;
            Ok(Run::new(
                &state.gateway,
                principal.user.id,
                call.source,
                &call.key,
                request,
            )
            .with_prompt(call.prompt_id, call.version, r.variables))
        }
        Err(RenderError::Invalid(errors)) => {
            let run = Run::new(
                &state.gateway,
                principal.user.id,
                call.source,
                &call.key,
                request,
            )
            .with_prompt(call.prompt_id, call.version, call.variables);
            let execution = run.reject("the variables do not match the prompt's schema");
            Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_variables",
                format!("{} problem(s) with the variables", errors.len()),
            )
            .with_details(json!({"errors": errors, "execution_id": execution.id})))
        }
    }
}

/// Runs an expert prompt: validate → render → run → record → answer.
#[utoipa::path(post, path = "/api/v1/execute-prompt/{id}", tag = "library", security(("bearer" = [])), request_body = ExecuteBody,
    params(("id" = Uuid, Path, description = "expert prompt id")),
    responses(
        (status = 200, body = ExecuteResponse),
        (status = 404, description = "not_found (prompt) or model_not_found", body = ErrorBody),
        (status = 422, description = "invalid_variables: `details.errors` lists every error with its JSON `path`", body = ErrorBody),
        (status = 502, description = "provider errors (recorded as a failed execution)", body = ErrorBody),
    ))]
pub async fn execute_prompt(
    state: web::Data<AppState>,
    user: CurrentUser,
    path: web::Path<Uuid>,
    body: web::Json<ExecuteBody>,
) -> Result<web::Json<ExecuteResponse>, ApiError> {
    let run = prepare_execution(&state, &user.0, path.into_inner(), body.into_inner()).await?;
    let done = run.complete().await.map_err(|f| {
        ApiError::from(f.error).with_details(json!({"execution_id": f.execution.id}))
    })?;
    let e = done.execution;
    Ok(web::Json(ExecuteResponse {
        execution_id: e.id,
        prompt_id: e.prompt_id.unwrap_or_default(),
        prompt_version: e.prompt_version.unwrap_or_default(),
        output: e.output.unwrap_or_default(),
        llm_provider: e.provider,
        llm_model: e.model,
        tokens_used: TokensUsed {
            prompt: e.prompt_tokens,
            completion: e.completion_tokens,
            total: e.prompt_tokens + e.completion_tokens,
        },
        cost: e.cost_usd,
        execution_time: e.duration_ms as f64 / 1000.0,
        time_to_first_token: e.ttft_ms.map(|t| t as f64 / 1000.0),
        status: e.status.as_str().into(),
    }))
}

/// The same as `execute-prompt`, streamed as Server-Sent Events (`start`,
/// one `token` per token, then `done` with usage and cost, or `error`).
/// Closing the connection cancels the run (recorded as cancelled).
#[utoipa::path(post, path = "/api/v1/execute-prompt/{id}/stream", tag = "library", security(("bearer" = [])), request_body = ExecuteBody,
    params(("id" = Uuid, Path, description = "expert prompt id")),
    responses(
        (status = 200, description = "`text/event-stream`: events start, token, done, error (docs/streaming.md)"),
        (status = 404, body = ErrorBody),
        (status = 422, description = "invalid_variables", body = ErrorBody),
    ))]
pub async fn execute_prompt_stream(
    state: web::Data<AppState>,
    user: CurrentUser,
    path: web::Path<Uuid>,
    body: web::Json<ExecuteBody>,
) -> Result<HttpResponse, ApiError> {
    state
        .flags
        .check(muse_billing::flags::known::STREAMING, &user.0)?;
    let run = prepare_execution(&state, &user.0, path.into_inner(), body.into_inner()).await?;
    let id = run.id;
    let start = json!({"execution_id": id, "model": run.key});
    let events = run.stream().await.map_err(|f| {
        ApiError::from(f.error).with_details(json!({"execution_id": f.execution.id}))
    })?;
    Ok(sse::respond(start, id, events))
}

/// `provider.<id>` flag of the model `key`'s provider.
pub fn provider_gate(state: &AppState, principal: &Principal, key: &str) -> Result<(), ApiError> {
    let provider = key.split_once('/').map_or(key, |(p, _)| p);
    state.flags.check(
        &format!("{}{provider}", muse_billing::flags::known::PROVIDER_PREFIX),
        principal,
    )
}
