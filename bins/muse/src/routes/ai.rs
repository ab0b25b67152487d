//! `/api/v1/ai`: the model registry; idea generation is in [`super::ideas`]
//! (same scope).

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use muse_inference::{ModelInfo, ModelKind};
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::{ApiError, ErrorBody};
use crate::extract::{AdminUser, CurrentUser};
use crate::state::AppState;

pub fn config(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/api/v1/ai")
            .service(web::resource("/models").get(list_models))
            .service(web::resource("/models/{model_key:.+}/load").post(load_model))
            .service(web::resource("/models/{model_key:.+}/unload").post(unload_model))
            .configure(super::ideas::config),
    );
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelPrice {
    /// USD per million prompt tokens.
    pub input_per_million: f64,
    /// USD per million completion tokens.
    pub output_per_million: f64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelEntry {
    /// `provider/model`: what requests name.
    #[schema(example = "openai/gpt-4o-mini")]
    pub key: String,
    pub provider: String,
    pub model: String,
    /// `remote` or `local`.
    pub kind: String,
    pub context_length: Option<u32>,
    /// Absent when the price is unknown (costs are then reported as unknown).
    pub price: Option<ModelPrice>,
    pub loaded: bool,
    /// Bytes of weights in memory (loaded local models).
    pub memory_bytes: Option<u64>,
    /// Why the model cannot be served (a local model whose files are
    /// incomplete, e.g. no ONNX export); absent when it can.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unavailable_reason: Option<String>,
}

impl From<ModelInfo> for ModelEntry {
    fn from(m: ModelInfo) -> Self {
        Self {
            key: m.key,
            provider: m.provider,
            model: m.model,
            kind: match m.kind {
                ModelKind::Remote => "remote".into(),
                ModelKind::Local => "local".into(),
            },
            context_length: m.context_length,
            price: m.price.map(|p| ModelPrice {
                input_per_million: p.input_per_million,
                output_per_million: p.output_per_million,
            }),
            loaded: m.loaded,
            memory_bytes: m.memory_bytes,
            unavailable_reason: m.unavailable,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelList {
    pub items: Vec<ModelEntry>,
}

/// Every model this server can run: configured remote providers, the local
/// ONNX models found in `MODEL_CACHE_DIR` at start or pulled since, and
/// cached models that cannot be served (with `unavailable_reason`).
#[utoipa::path(get, path = "/api/v1/ai/models", tag = "ai", security(("bearer" = [])),
    responses((status = 200, body = ModelList), (status = 401, body = ErrorBody)))]
pub async fn list_models(state: web::Data<AppState>, user: CurrentUser) -> web::Json<ModelList> {
    web::Json(ModelList {
        items: state
            .models
            .list()
            .into_iter()
            .filter(|m| state.training.visible(&m.key, user.0.user.id))
            .map(ModelEntry::from)
            .collect(),
    })
}

fn local_model(state: &AppState, key: &str) -> Result<(), ApiError> {
    let model = state.models.get(key).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!("{key} is not in the model registry"),
        )
    })?;
    match model.kind {
        ModelKind::Remote => Err(ApiError::new(
            StatusCode::CONFLICT,
            "model_not_loadable",
            format!("{key} runs at its provider: it is always available and cannot be loaded or unloaded"),
        )),
        ModelKind::Local => Ok(()),
    }
}

/// Load a local model into memory (admin only). Remote models answer 409.
#[utoipa::path(post, path = "/api/v1/ai/models/{model_key}/load", tag = "ai", security(("bearer" = [])),
    params(("model_key" = String, Path, description = "provider/model")),
    responses(
        (status = 200, description = "loaded (or already loaded)", body = ModelEntry),
        (status = 503, description = "not_configured: ONNX Runtime or the model files are missing", body = ErrorBody),
        (status = 403, description = "not an admin", body = ErrorBody),
        (status = 404, description = "model_not_found", body = ErrorBody),
        (status = 409, description = "model_not_loadable (remote model)", body = ErrorBody),
    ))]
pub async fn load_model(
    state: web::Data<AppState>,
    admin: AdminUser,
    ctx: crate::extract::ClientContext,
    path: web::Path<String>,
) -> Result<web::Json<ModelEntry>, ApiError> {
    let key = path.into_inner();
    local_model(&state, &key)?;
    let models = state.models.clone();
    let k = key.clone();
    let info = web::block(move || models.load_blocking(&k)).await??;
    crate::audit::record(
        &state,
        Some(admin.0.user.id),
        muse_auth::audit::MODEL_LOADED,
        Some(key),
        ctx.0,
        serde_json::json!({"by": "admin", "memory_bytes": info.memory_bytes}),
    )
    .await;
    Ok(web::Json(info.into()))
}

/// Unload a local model (admin only). Remote models answer 409.
#[utoipa::path(post, path = "/api/v1/ai/models/{model_key}/unload", tag = "ai", security(("bearer" = [])),
    params(("model_key" = String, Path, description = "provider/model")),
    responses(
        (status = 200, description = "`{key, was_loaded}`"),
        (status = 403, description = "not an admin", body = ErrorBody),
        (status = 404, description = "model_not_found", body = ErrorBody),
        (status = 409, description = "model_not_loadable (remote model)", body = ErrorBody),
    ))]
pub async fn unload_model(
    state: web::Data<AppState>,
    admin: AdminUser,
    ctx: crate::extract::ClientContext,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let key = path.into_inner();
    local_model(&state, &key)?;
    let was_loaded = state.models.unload(&key)?;
    crate::audit::record(
        &state,
        Some(admin.0.user.id),
        muse_auth::audit::MODEL_UNLOADED,
        Some(key.clone()),
        ctx.0,
        serde_json::json!({"by": "admin", "was_loaded": was_loaded}),
    )
    .await;
    Ok(HttpResponse::Ok().json(serde_json::json!({"key": key, "was_loaded": was_loaded})))
}
