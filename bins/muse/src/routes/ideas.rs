//! Idea generation (Creative Muse), under `/api/v1/ai`: one idea, a batch,
//! a token stream over SSE (with single-use stream tickets for browsers),
//! the caller's ideas and their ratings.

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::future::join_all;
use muse_auth::Principal;
use muse_core::PageRequest;
use muse_prompts::ideas::MAX_BATCH;
use muse_prompts::{ExecutionSource, Idea, IdeaFilter, IdeaRequest};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::library::{prompt_run, viewer, PromptCall};
use super::{blocking, rfc3339, sse};
use crate::error::{ApiError, ErrorBody};
use crate::extract::{user_or_ticket, CurrentUser};
use crate::state::AppState;
use muse_gateway::Run;

/// Registered inside the `/api/v1/ai` scope.
pub fn config(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/generate").post(generate))
        .service(web::resource("/generate/batch").post(generate_batch))
        .service(web::resource("/stream/ticket").post(stream_ticket))
        .service(web::resource("/stream/generate").get(stream_generate))
        .service(web::resource("/ideas/history").get(history))
        .service(web::resource("/ideas/{idea_id}").get(get_idea))
        .service(web::resource("/ideas/{idea_id}/rate").post(rate));
}

#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IdeaBody {
    /// A free prompt (or give `category`).
    pub prompt: Option<String>,
    /// A category, e.g. `mobile apps` (or give `prompt`).
    pub category: Option<String>,
    /// With `category`: a theme, e.g. `sustainability`.
    pub theme: Option<String>,
    /// 1 (practical) to 10 (bold), default 5; sets the temperature
    /// (0.2 + creativity × 0.1) unless `temperature` is given.
    pub creativity: Option<u8>,
    /// A registry key (`GET /api/v1/ai/models`); default `DEFAULT_MODEL`,
    /// else the first model listed.
    pub model: Option<String>,
    pub temperature: Option<f32>,
    /// Default 512, at most 8192.
    pub max_tokens: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct IdeaView {
    pub idea_id: Uuid,
    pub execution_id: Uuid,
    pub content: String,
    pub prompt: Option<String>,
    pub category: Option<String>,
    pub theme: Option<String>,
    pub creativity: u8,
    pub llm_provider: String,
    pub llm_model: String,
    /// 1–5 once rated.
    pub rating: Option<u8>,
    pub favorite: bool,
    pub created_at: String,
}

impl From<Idea> for IdeaView {
    fn from(i: Idea) -> Self {
        Self {
            idea_id: i.id,
            execution_id: i.execution_id,
            content: i.content,
            prompt: i.prompt,
            category: i.category,
            theme: i.theme,
            creativity: i.creativity,
            llm_provider: i.provider,
            llm_model: i.model,
            rating: i.rating,
            favorite: i.favorite,
            created_at: rfc3339(i.created_at),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct IdeaUsage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GenerateResponse {
    pub idea: IdeaView,
    pub usage: IdeaUsage,
    /// USD; null when the model's price is unknown.
    pub cost: Option<f64>,
    /// Seconds.
    pub execution_time: f64,
}

/// The model an idea request runs on.
fn pick_model(state: &AppState, asked: Option<String>) -> Result<String, ApiError> {
    if let Some(m) = asked.filter(|m| !m.trim().is_empty()) {
        return Ok(m);
    }
    if let Some(m) = &state.config.llm.default_model {
        return Ok(m.clone());
    }
    state
        .models
        .list()
        .into_iter()
        .next()
        .map(|m| m.key)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_configured",
                "no model is configured: set a provider key, or LOCAL_MODELS",
            )
        })
}

/// Checks an idea request and prepares its run (an execution of the
/// built-in idea prompt that stores the idea on success).
pub async fn prepare_idea(
    state: &AppState,
    principal: &Principal,
    body: IdeaBody,
) -> Result<Run, ApiError> {
    let request = IdeaRequest {
        prompt: body.prompt,
        category: body.category,
        theme: body.theme,
        creativity: body.creativity,
        temperature: body.temperature,
        max_tokens: body.max_tokens,
    };
    let plan = request.plan().map_err(|fields| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "some fields are invalid",
        )
        .with_details(json!({ "fields": fields }))
    })?;
    let key = pick_model(state, body.model)?;
    let prompt_id = plan.prompt_id;
    let prompt =
        crate::routes::library::current_prompt(state, viewer(principal), prompt_id).await?;
    let run = prompt_run(
        state,
        principal,
        PromptCall {
            source: ExecutionSource::Idea,
            key,
            prompt_id,
            version: prompt.version,
            content: prompt.content,
            variables: plan.variables.clone(),
            system: None,
            temperature: Some(plan.temperature),
            max_tokens: Some(plan.max_tokens),
        },
    )?
    .admit()
    .await?;
    Ok(run.with_idea(Idea {
        id: Uuid::now_v7(),
        user_id: principal.user.id,
        execution_id: Uuid::nil(),
        prompt: plan.prompt,
        category: plan.category,
        theme: plan.theme,
        creativity: plan.creativity,
        provider: String::new(),
        model: String::new(),
        content: String::new(),
        rating: None,
        favorite: false,
        created_at: 0,
    }))
}

async fn generate_one(
    state: &AppState,
    principal: &Principal,
    body: IdeaBody,
) -> Result<GenerateResponse, ApiError> {
    let run = prepare_idea(state, principal, body).await?;
    let done = run.complete().await.map_err(|f| {
        ApiError::from(f.error).with_details(json!({"execution_id": f.execution.id}))
    })?;
    let e = &done.execution;
    let idea = done
        .idea
        .clone()
        .ok_or_else(|| ApiError::internal("ideas", "a finished idea run has no idea"))?;
    Ok(GenerateResponse {
        idea: idea.into(),
        usage: IdeaUsage {
            prompt_tokens: e.prompt_tokens,
            completion_tokens: e.completion_tokens,
            total_tokens: e.prompt_tokens + e.completion_tokens,
        },
        cost: e.cost_usd,
        execution_time: e.duration_ms as f64 / 1000.0,
    })
}

/// Generates one idea from a free prompt, or a category and theme.
#[utoipa::path(post, path = "/api/v1/ai/generate", tag = "ideas", security(("bearer" = [])), request_body = IdeaBody,
    responses(
        (status = 200, body = GenerateResponse),
        (status = 404, description = "model_not_found", body = ErrorBody),
        (status = 422, description = "validation_failed", body = ErrorBody),
        (status = 502, description = "provider errors (recorded as a failed execution)", body = ErrorBody),
    ))]
pub async fn generate(
    state: web::Data<AppState>,
    user: CurrentUser,
    body: web::Json<IdeaBody>,
) -> Result<web::Json<GenerateResponse>, ApiError> {
    generate_one(&state, &user.0, body.into_inner())
        .await
        .map(web::Json)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchBody {
    /// 1 to 10 idea requests, run concurrently.
    pub items: Vec<IdeaBody>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BatchError {
    pub code: String,
    pub message: String,
    #[schema(value_type = Option<Object>)]
    pub details: Option<serde_json::Value>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BatchItem {
    pub index: usize,
    /// `succeeded` or `failed`.
    pub status: String,
    pub result: Option<GenerateResponse>,
    pub error: Option<BatchError>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BatchResponse {
    pub results: Vec<BatchItem>,
    pub succeeded: usize,
    pub failed: usize,
}

/// Generates up to 10 ideas concurrently; each item reports its idea or
/// its own error (one failing item does not fail the others).
#[utoipa::path(post, path = "/api/v1/ai/generate/batch", tag = "ideas", security(("bearer" = [])), request_body = BatchBody,
    responses((status = 200, body = BatchResponse), (status = 422, description = "validation_failed: 1 to 10 items", body = ErrorBody)))]
pub async fn generate_batch(
    state: web::Data<AppState>,
    user: CurrentUser,
    body: web::Json<BatchBody>,
) -> Result<web::Json<BatchResponse>, ApiError> {
    state
        .flags
        .check(muse_billing::flags::known::BATCH_GENERATION, &user.0)?;
    let items = body.into_inner().items;
    if items.is_empty() || items.len() > MAX_BATCH {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            format!(
                "items must hold 1 to {MAX_BATCH} idea requests, got {}",
                items.len()
            ),
        ));
    }
    let (billing, uid) = (state.billing.clone(), user.0.user.id);
    let now = muse_core::Clock::now_ms(&muse_core::SystemClock);
    let (plan, _) = web::block(move || crate::quota::plan_of(&*billing, uid, now))
        .await?
        .map_err(crate::quota::store_error)?;
    if items.len() > usize::try_from(plan.max_batch).unwrap_or(0) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            format!(
                "the {} plan allows up to {} ideas per batch",
                plan.name, plan.max_batch
            ),
        )
        .with_details(json!({"plan": plan.id, "max_batch": plan.max_batch})));
    }
    let principal = &user.0;
    let results = join_all(
        items
            .into_iter()
            .map(|item| generate_one(&state, principal, item)),
    )
    .await;
    let results: Vec<BatchItem> = results
        .into_iter()
        .enumerate()
        .map(|(index, r)| match r {
            Ok(res) => BatchItem {
                index,
                status: "succeeded".into(),
                result: Some(res),
                error: None,
            },
            Err(e) => BatchItem {
                index,
                status: "failed".into(),
                result: None,
                error: Some(BatchError {
                    code: e.code.to_string(),
                    message: e.message,
                    details: e.details.map(|d| *d),
                }),
            },
        })
        .collect();
    let succeeded = results.iter().filter(|r| r.result.is_some()).count();
    Ok(web::Json(BatchResponse {
        failed: results.len() - succeeded,
        succeeded,
        results,
    }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TicketResponse {
    /// Put it in the stream URL: `?ticket=…`. Works once.
    pub ticket: String,
    /// Seconds.
    pub expires_in: i64,
}

/// A single-use ticket (valid 60 s) for one `GET /api/v1/ai/stream/generate`
/// or one WebSocket handshake from a browser, which cannot send an
/// `Authorization` header there.
#[utoipa::path(post, path = "/api/v1/ai/stream/ticket", tag = "ideas", security(("bearer" = [])),
    responses((status = 201, body = TicketResponse), (status = 401, body = ErrorBody)))]
pub async fn stream_ticket(
    state: web::Data<AppState>,
    user: CurrentUser,
) -> Result<HttpResponse, ApiError> {
    let auth = state.auth.clone();
    let (ticket, expires_in) = blocking(move || auth.issue_stream_ticket(&user.0)).await?;
    Ok(HttpResponse::Created()
        .insert_header(("cache-control", "no-store"))
        .json(TicketResponse { ticket, expires_in }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    /// A stream ticket (browsers); other clients may send `Authorization` instead.
    pub ticket: Option<String>,
    pub prompt: Option<String>,
    pub category: Option<String>,
    pub theme: Option<String>,
    pub creativity: Option<u8>,
    pub model: Option<String>,
    pub temperature: Option<f32>,
    pub max_tokens: Option<u32>,
}

/// One idea, streamed as Server-Sent Events: `start`, one `token` per
/// token, then `done` (usage, cost, idea id) or `error`. Authenticated by
/// `?ticket=` (from `POST /stream/ticket`) or an `Authorization` header.
/// Closing the connection cancels the generation.
#[utoipa::path(get, path = "/api/v1/ai/stream/generate", tag = "ideas", params(StreamQuery),
    responses(
        (status = 200, description = "`text/event-stream`: events start, token, done, error (docs/streaming.md)"),
        (status = 401, description = "no, a spent, or an expired ticket", body = ErrorBody),
        (status = 422, body = ErrorBody),
    ))]
pub async fn stream_generate(
    state: web::Data<AppState>,
    req: HttpRequest,
    query: web::Query<StreamQuery>,
) -> Result<HttpResponse, ApiError> {
    let q = query.into_inner();
    let principal = user_or_ticket(&req, q.ticket).await?;
    state
        .flags
        .check(muse_billing::flags::known::STREAMING, &principal)?;
    let body = IdeaBody {
        prompt: q.prompt,
        category: q.category,
        theme: q.theme,
        creativity: q.creativity,
        model: q.model,
        temperature: q.temperature,
        max_tokens: q.max_tokens,
    };
    let run = prepare_idea(&state, &principal, body).await?;
    let id = run.id;
    let start = json!({"execution_id": id, "model": run.key});
    let events = run.stream().await.map_err(|f| {
        ApiError::from(f.error).with_details(json!({"execution_id": f.execution.id}))
    })?;
    Ok(sse::respond(start, id, events))
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct IdeaHistoryQuery {
    pub page: Option<u32>,
    /// 1–100 (default 20); `limit` is accepted as another name (the Rubi
    /// Studio seed's).
    #[serde(alias = "limit")]
    pub per_page: Option<u32>,
    /// Exactly this rating (1–5).
    pub rating: Option<u8>,
    /// At least this rating (1–5).
    pub min_rating: Option<u8>,
    /// Case-insensitive category.
    pub category: Option<String>,
    pub favorite: Option<bool>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct IdeaPage {
    pub items: Vec<IdeaView>,
    pub page: u32,
    pub per_page: u32,
    pub total: u64,
}

fn check_rating(name: &str, r: Option<u8>) -> Result<Option<u8>, ApiError> {
    match r {
        Some(r) if !(1..=5).contains(&r) => Err(ApiError::bad_request(
            "invalid_query_parameter",
            format!("{name} must be between 1 and 5"),
        )),
        other => Ok(other),
    }
}

/// Your ideas, newest first.
#[utoipa::path(get, path = "/api/v1/ai/ideas/history", tag = "ideas", security(("bearer" = [])), params(IdeaHistoryQuery),
    responses((status = 200, body = IdeaPage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub async fn history(
    state: web::Data<AppState>,
    user: CurrentUser,
    query: web::Query<IdeaHistoryQuery>,
) -> Result<web::Json<IdeaPage>, ApiError> {
    let q = query.into_inner();
    let filter = IdeaFilter {
        rating: check_rating("rating", q.rating)?,
        min_rating: check_rating("min_rating", q.min_rating)?,
        category: q
            .category
            .filter(|c| !c.trim().is_empty())
            .map(|c| c.trim().to_string()),
        favorite: q.favorite,
    };
    let page = PageRequest::new(q.page, q.per_page);
    let (ideas, uid) = (state.ideas.clone(), user.0.user.id);
    let p = blocking(move || ideas.list(uid, &filter, page)).await?;
    Ok(web::Json(IdeaPage {
        page: p.page,
        per_page: p.per_page,
        total: p.total,
        items: p.items.into_iter().map(IdeaView::from).collect(),
    }))
}

/// One of your ideas.
#[utoipa::path(get, path = "/api/v1/ai/ideas/{idea_id}", tag = "ideas", security(("bearer" = [])),
    params(("idea_id" = Uuid, Path, description = "idea id")),
    responses((status = 200, body = IdeaView), (status = 404, body = ErrorBody)))]
pub async fn get_idea(
    state: web::Data<AppState>,
    user: CurrentUser,
    path: web::Path<Uuid>,
) -> Result<web::Json<IdeaView>, ApiError> {
    let (ideas, uid, id) = (state.ideas.clone(), user.0.user.id, path.into_inner());
    blocking(move || ideas.get(uid, id))
        .await?
        .map(|i| web::Json(i.into()))
        .ok_or_else(|| ApiError::not_found("no such idea"))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RateBody {
    /// 1–5.
    pub rating: Option<u8>,
    /// Mark (or unmark) as a favourite.
    pub favorite: Option<bool>,
}

/// Rates one of your ideas (1–5) and/or marks it a favourite.
#[utoipa::path(post, path = "/api/v1/ai/ideas/{idea_id}/rate", tag = "ideas", security(("bearer" = [])), request_body = RateBody,
    params(("idea_id" = Uuid, Path, description = "idea id")),
    responses((status = 200, body = IdeaView), (status = 404, description = "not your idea, or none", body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn rate(
    state: web::Data<AppState>,
    user: CurrentUser,
    path: web::Path<Uuid>,
    body: web::Json<RateBody>,
) -> Result<web::Json<IdeaView>, ApiError> {
    let b = body.into_inner();
    if b.rating.is_none() && b.favorite.is_none() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "give a rating (1-5) and/or favorite",
        ));
    }
    if b.rating.is_some_and(|r| !(1..=5).contains(&r)) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "rating must be between 1 and 5",
        )
        .with_details(
            json!({"fields": [{"field": "rating", "message": "rating must be between 1 and 5"}]}),
        ));
    }
    let (ideas, uid, id) = (state.ideas.clone(), user.0.user.id, path.into_inner());
    blocking(move || ideas.update(uid, id, b.rating, b.favorite))
        .await?
        .map(|i| web::Json(i.into()))
        .ok_or_else(|| ApiError::not_found("no such idea"))
}
