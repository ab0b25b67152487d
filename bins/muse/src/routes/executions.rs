//! `/api/v1/executions`: the caller's own execution history.

use actix_web::http::StatusCode;
use actix_web::web;
use muse_core::PageRequest;
use muse_prompts::{Execution, ExecutionFilter, ExecutionScope, ExecutionStatus};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::{bad_query, blocking, rfc3339, time};
use crate::error::{ApiError, ErrorBody};
use crate::extract::CurrentUser;
use crate::state::AppState;

pub fn config(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/api/v1/executions")
            .service(web::resource("/history").get(history))
            .service(web::resource("/{execution_id}").get(get_execution)),
    );
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct HistoryQuery {
    /// 1-based page (default 1).
    pub page: Option<u32>,
    /// 1–100 (default 20); `limit` is accepted as another name (the Rubi
    /// Studio seed's).
    #[serde(alias = "limit")]
    pub per_page: Option<u32>,
    pub prompt_id: Option<Uuid>,
    /// `succeeded`, `failed` or `cancelled`.
    pub status: Option<String>,
    pub provider: Option<String>,
    pub model: Option<String>,
    /// RFC 3339; executions created at or after.
    pub from: Option<String>,
    /// RFC 3339; executions created before.
    pub to: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ExecutionView {
    pub execution_id: Uuid,
    /// `openai_api`, `prompt` or `idea`.
    pub source: String,
    pub prompt_id: Option<Uuid>,
    pub prompt_version: Option<i32>,
    pub llm_provider: String,
    pub llm_model: String,
    #[schema(value_type = Option<Object>)]
    pub variables: Option<serde_json::Value>,
    pub rendered_prompt: Option<String>,
    pub output: Option<String>,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// USD; null when the model's price is unknown.
    pub cost: Option<f64>,
    /// Seconds.
    pub execution_time: f64,
    pub time_to_first_token: Option<f64>,
    /// `succeeded`, `failed` or `cancelled`.
    pub status: String,
    pub error: Option<String>,
    pub created_at: String,
}

impl From<Execution> for ExecutionView {
    fn from(e: Execution) -> Self {
        Self {
            execution_id: e.id,
            source: e.source.as_str().into(),
            prompt_id: e.prompt_id,
            prompt_version: e.prompt_version,
            llm_provider: e.provider,
            llm_model: e.model,
            variables: e.variables,
            rendered_prompt: e.rendered_prompt,
            output: e.output,
            prompt_tokens: e.prompt_tokens,
            completion_tokens: e.completion_tokens,
            cost: e.cost_usd,
            execution_time: e.duration_ms as f64 / 1000.0,
            time_to_first_token: e.ttft_ms.map(|t| t as f64 / 1000.0),
            status: e.status.as_str().into(),
            error: e.error,
            created_at: rfc3339(e.created_at),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ExecutionPage {
    pub items: Vec<ExecutionView>,
    pub page: u32,
    pub per_page: u32,
    pub total: u64,
}

/// The caller's executions (an administrator's: everyone's), newest first, with filters.
#[utoipa::path(get, path = "/api/v1/executions/history", tag = "executions", security(("bearer" = [])), params(HistoryQuery),
    responses((status = 200, body = ExecutionPage), (status = 400, description = "invalid_query_parameter", body = ErrorBody), (status = 401, body = ErrorBody)))]
pub async fn history(
    state: web::Data<AppState>,
    user: CurrentUser,
    query: web::Query<HistoryQuery>,
) -> Result<web::Json<ExecutionPage>, ApiError> {
    let q = query.into_inner();
    let status = q
        .status
        .as_deref()
        .map(|s| {
            ExecutionStatus::parse(s).ok_or_else(|| {
                bad_query(format!(
                    "status: {s:?} is not succeeded, failed or cancelled"
                ))
            })
        })
        .transpose()?;
    let filter = ExecutionFilter {
        prompt_id: q.prompt_id,
        status,
        provider: q.provider,
        model: q.model,
        from_ms: time("from", &q.from)?,
        to_ms: time("to", &q.to)?,
    };
    let page = PageRequest::new(q.page, q.per_page);
    let repo = state.executions.clone();
    let scope = scope_of(&user);
    let result = blocking(move || repo.list(scope, &filter, page).map_err(store_error)).await?;
    Ok(web::Json(ExecutionPage {
        page: result.page,
        per_page: result.per_page,
        total: result.total,
        items: result.items.into_iter().map(ExecutionView::from).collect(),
    }))
}

/// One of the caller's executions (any, for an administrator).
#[utoipa::path(get, path = "/api/v1/executions/{execution_id}", tag = "executions", security(("bearer" = [])),
    params(("execution_id" = Uuid, Path, description = "the execution id")),
    responses((status = 200, body = ExecutionView), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub async fn get_execution(
    state: web::Data<AppState>,
    user: CurrentUser,
    path: web::Path<Uuid>,
) -> Result<web::Json<ExecutionView>, ApiError> {
    let id = path.into_inner();
    let repo = state.executions.clone();
    let scope = scope_of(&user);
    let found = blocking(move || repo.get(scope, id).map_err(store_error)).await?;
    found
        .map(|e| web::Json(ExecutionView::from(e)))
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such execution"))
}

/// Users see their own executions; administrators see everyone's.
fn scope_of(user: &CurrentUser) -> ExecutionScope {
    if user.0.is_admin() {
        ExecutionScope::All
    } else {
        ExecutionScope::User(user.0.user.id)
    }
}

fn store_error(e: muse_prompts::ExecutionStoreError) -> ApiError {
    match e {
        muse_prompts::ExecutionStoreError::Unavailable(m) => {
            ApiError::unavailable("executions store", m)
        }
        muse_prompts::ExecutionStoreError::Other(m) => ApiError::internal("executions store", m),
    }
}
