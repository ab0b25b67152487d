//! `/api/v1/train`: datasets (multipart upload streamed to disk and
//! validated line by line), fine-tuning jobs, and the trainers on offer.
//! Everything is scoped to the caller: another user's dataset or job is
//! 404. See docs/training.md.

use actix_multipart::Multipart;
use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use futures_util::StreamExt;
use muse_core::{Clock, PageRequest, SystemClock};
use muse_training::{
    dataset_path, job_log_path, Dataset, DatasetValidator, EstimateCounter, JobFilter, JobState,
    LineSplitter, StopOutcome, TrainingJob, ValidationReport,
};
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::{bad_query, blocking, rfc3339};
use crate::error::{ApiError, ErrorBody};
use crate::extract::CurrentUser;
use crate::state::AppState;
use crate::training::job_view;

pub fn config(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/api/v1/train")
            .service(web::resource("/upload").post(upload))
            .service(web::resource("/trainers").get(trainers))
            .service(web::resource("/datasets").get(list_datasets))
            .service(
                web::resource("/datasets/{dataset_id}")
                    .get(get_dataset)
                    .delete(delete_dataset),
            )
            .service(web::resource("/start").post(start))
            .service(web::resource("/jobs").get(list_jobs))
            .service(web::resource("/status/{job_id}").get(status))
            .service(web::resource("/stop/{job_id}").post(stop))
            .service(web::resource("/logs/{job_id}").get(logs)),
    );
}

impl From<muse_training::JobStoreError> for ApiError {
    fn from(e: muse_training::JobStoreError) -> Self {
        match e {
            muse_training::JobStoreError::Unavailable(m) => ApiError::unavailable("job store", m),
            muse_training::JobStoreError::Other(m) => ApiError::internal("job store", m),
        }
    }
}

impl From<muse_training::DatasetStoreError> for ApiError {
    fn from(e: muse_training::DatasetStoreError) -> Self {
        match e {
            muse_training::DatasetStoreError::Unavailable(m) => {
                ApiError::unavailable("dataset store", m)
            }
            muse_training::DatasetStoreError::Other(m) => ApiError::internal("dataset store", m),
        }
    }
}

fn dataset_view(d: &Dataset) -> Value {
    json!({
        "dataset_id": d.id,
        "name": d.name,
        "size_bytes": d.size_bytes,
        "format": d.report.format.map(|f| f.as_str()),
        "rows": d.report.rows,
        "tokens": d.report.tokens,
        "token_method": d.report.token_method,
        "base_model": d.base_model,
        "estimated_cost_usd": d.estimated_cost_usd,
        "report": d.report,
        "created_at": rfc3339(d.created_at),
    })
}

/// The caller may train: the `training` flag is on for them and their
/// plan allows it (403 `feature_disabled` / `training_not_in_plan`).
async fn gate(state: &AppState, user: &CurrentUser) -> Result<muse_billing::Plan, ApiError> {
    state
        .flags
        .check(muse_billing::flags::known::TRAINING, &user.0)?;
    let (billing, uid) = (state.billing.clone(), user.0.user.id);
    let now = SystemClock.now_ms();
    let (plan, _) = web::block(move || crate::quota::plan_of(&*billing, uid, now))
        .await?
        .map_err(crate::quota::store_error)?;
    if !plan.training_allowed {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "training_not_in_plan",
            format!(
                "the {} plan does not include fine-tuning; upgrade to train models",
                plan.name
            ),
        )
        .with_details(json!({"plan": plan.id})));
    }
    Ok(plan)
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct UploadQuery {
    /// The model you mean to train (e.g. `openai/gpt-4o-mini-2024-07-18`
    /// or `local/org/name`): tokens are counted with its tokenizer when
    /// Muse has it, and the cost is estimated where a price is known.
    pub base_model: Option<String>,
}

/// Counts with the base model's tokenizer (local models), else estimates.
struct ModelCounter(muse_inference::local::TokenCounter, String);

impl muse_training::TokenCounter for ModelCounter {
    fn count(&self, text: &str) -> u64 {
        self.0.count(text)
    }
    fn method(&self) -> String {
        format!("tokenizer:{}", self.1)
    }
}

/// Blocking (reads the tokenizer): call it on a blocking thread.
fn counter_for(
    models: &muse_inference::ModelRegistry,
    base_model: Option<&str>,
) -> Box<dyn muse_training::TokenCounter> {
    let local = base_model
        .and_then(|m| m.strip_prefix("local/"))
        .and_then(|m| models.local().and_then(|l| l.tokenizer_path(m)));
    match (local, base_model) {
        (Some(path), Some(model)) => match muse_inference::local::TokenCounter::from_file(&path) {
            Ok(c) => Box::new(ModelCounter(c, model.to_string())),
            Err(_) => Box::new(EstimateCounter),
        },
        _ => Box::new(EstimateCounter),
    }
}

/// A display name from the client's file name: its last path component,
/// printable characters only, at most 200 (it never reaches a path).
fn display_name(raw: Option<&str>) -> String {
    let last = raw
        .unwrap_or("dataset.jsonl")
        .rsplit(['/', '\\'])
        .next()
        .unwrap_or_default();
    let clean: String = last.chars().filter(|c| !c.is_control()).take(200).collect();
    if clean.trim().is_empty() {
        "dataset.jsonl".into()
    } else {
        clean
    }
}

fn too_large(code: &'static str, message: String) -> ApiError {
    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, code, message)
}

/// Upload a JSONL dataset (multipart field `file`). Streamed to disk and
/// validated line by line; a broken file is refused with 422
/// `invalid_dataset` and a report of line numbers and reasons (capped at
/// 100). Limits: `TRAINING_MAX_UPLOAD_BYTES` per file (413
/// `payload_too_large`), `TRAINING_STORAGE_QUOTA_BYTES` per user (413
/// `storage_quota_exceeded`).
#[utoipa::path(post, path = "/api/v1/train/upload", tag = "training", security(("bearer" = [])), params(UploadQuery),
    request_body(content_type = "multipart/form-data", description = "field `file`: the JSONL file"),
    responses((status = 201, description = "the stored dataset with its report"), (status = 400, description = "missing_file, invalid_multipart", body = ErrorBody),
        (status = 403, description = "feature_disabled or training_not_in_plan", body = ErrorBody), (status = 413, description = "payload_too_large or storage_quota_exceeded", body = ErrorBody),
        (status = 422, description = "invalid_dataset, with `details.report`", body = ErrorBody)))]
pub async fn upload(
    state: web::Data<AppState>,
    user: CurrentUser,
    query: web::Query<UploadQuery>,
    mut payload: Multipart,
) -> Result<HttpResponse, ApiError> {
    gate(&state, &user).await?;
    let uid = user.0.user.id;
    let training = state.training.clone();
    let datasets = training.datasets.clone();
    let used = blocking(move || datasets.total_bytes(uid)).await?;
    let quota = training.config.storage_quota_bytes;
    let max = training.config.max_upload_bytes;
    if used >= quota {
        return Err(too_large(
            "storage_quota_exceeded",
            format!("your datasets use {used} of {quota} bytes; delete some to upload more"),
        ));
    }
    let base_model = query
        .into_inner()
        .base_model
        .map(|m| m.trim().to_string())
        .filter(|m| !m.is_empty());
    if base_model.as_ref().is_some_and(|m| m.len() > 200) {
        return Err(bad_query("base_model: at most 200 characters".into()));
    }
    let id = Uuid::now_v7();
    let path = dataset_path(&training.root, id);
    let part = path.with_extension("part");
    let mut name = None;
    let mut written: u64 = 0;
    let mut found = false;
    // Chunks go to a blocking thread that writes and validates them; the
    // bounded channel slows the upload down to the disk's pace.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<web::Bytes>(16);
    let (models, model) = (state.models.clone(), base_model.clone());
    let (dir, file_path) = (training.root.join("datasets"), part.clone());
    let writer = tokio::task::spawn_blocking(move || -> std::io::Result<ValidationReport> {
        use std::io::Write;
        let counter = counter_for(&models, model.as_deref());
        std::fs::create_dir_all(&dir)?;
        let mut file = std::io::BufWriter::new(std::fs::File::create(&file_path)?);
        let mut lines = LineSplitter::new(DatasetValidator::new(counter.as_ref()));
        while let Some(chunk) = rx.blocking_recv() {
            file.write_all(&chunk)?;
            lines.feed(&chunk);
        }
        file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok(lines.finish())
    });
    let mut failure: Option<ApiError> = None;
    'fields: while let Some(field) = payload.next().await {
        let mut field = match field {
            Ok(f) => f,
            Err(e) => {
                failure = Some(ApiError::bad_request(
                    "invalid_multipart",
                    format!("cannot read the multipart body: {e}"),
                ));
                break;
            }
        };
        if field.name() != Some("file") || found {
            // Other fields are read and ignored.
            while let Some(chunk) = field.next().await {
                if chunk.is_err() {
                    break;
                }
            }
            continue;
        }
        found = true;
        name = Some(display_name(
            field.content_disposition().and_then(|cd| cd.get_filename()),
        ));
        while let Some(chunk) = field.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    failure = Some(ApiError::bad_request(
                        "invalid_multipart",
                        format!("the upload was interrupted: {e}"),
                    ));
                    break 'fields;
                }
            };
            written += chunk.len() as u64;
            if written > max {
                failure = Some(too_large(
                    "payload_too_large",
                    format!("a dataset may have at most {max} bytes"),
                ));
                break 'fields;
            }
            if used + written > quota {
                failure = Some(too_large(
                    "storage_quota_exceeded",
                    format!("this upload would take your datasets over {quota} bytes"),
                ));
                break 'fields;
            }
            if tx.send(chunk).await.is_err() {
                break 'fields; // the writer failed: its error is below
            }
        }
    }
    drop(tx);
    let written_report = writer.await;
    let cleanup = |p: std::path::PathBuf| async move {
        let _ = tokio::fs::remove_file(p).await;
    };
    if let Some(e) = failure {
        cleanup(part).await;
        return Err(e);
    }
    let report = match written_report {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            cleanup(part).await;
            return Err(ApiError::internal("writing a dataset", e));
        }
        Err(e) => {
            cleanup(part).await;
            return Err(ApiError::internal("writing a dataset", e));
        }
    };
    if !found {
        cleanup(part).await;
        return Err(ApiError::bad_request(
            "missing_file",
            "send the dataset as the multipart field `file`",
        ));
    }
    if !report.valid {
        cleanup(part).await;
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_dataset",
            format!(
                "the dataset has {} problem(s); the first is at line {}",
                report.issue_count,
                report.issues.first().map_or(0, |i| i.line)
            ),
        )
        .with_details(json!({ "report": report })));
    }
    let estimated_cost_usd = base_model.as_deref().and_then(|m| {
        training.trainers.all().find_map(|t| {
            let price = t.price_per_million_tokens(m)?;
            Some(price * report.tokens as f64 * t.epochs(&Value::Null) as f64 / 1e6)
        })
    });
    let dataset = Dataset {
        id,
        user_id: uid,
        name: name.unwrap_or_else(|| "dataset.jsonl".into()),
        size_bytes: written,
        report,
        estimated_cost_usd,
        base_model,
        created_at: SystemClock.now_ms(),
    };
    if let Err(e) = tokio::fs::rename(&part, &path).await {
        cleanup(part).await;
        return Err(ApiError::internal("storing a dataset", e));
    }
    let (datasets, d) = (training.datasets.clone(), dataset.clone());
    if let Err(e) = blocking(move || datasets.insert(&d)).await {
        cleanup(path).await;
        return Err(e);
    }
    Ok(HttpResponse::Created().json(dataset_view(&dataset)))
}

/// The caller's datasets, newest first.
#[utoipa::path(get, path = "/api/v1/train/datasets", tag = "training", security(("bearer" = [])), params(super::PageQuery),
    responses((status = 200, description = "`{items, page, per_page, total}`"), (status = 401, body = ErrorBody)))]
pub async fn list_datasets(
    state: web::Data<AppState>,
    user: CurrentUser,
    query: web::Query<super::PageQuery>,
) -> Result<HttpResponse, ApiError> {
    let page = query.request();
    let (datasets, uid) = (state.training.datasets.clone(), user.0.user.id);
    let p = blocking(move || datasets.list(uid, page)).await?;
    Ok(HttpResponse::Ok().json(json!({
        "items": p.items.iter().map(dataset_view).collect::<Vec<_>>(),
        "page": p.page, "per_page": p.per_page, "total": p.total,
    })))
}

async fn own_dataset(state: &AppState, user: &CurrentUser, id: Uuid) -> Result<Dataset, ApiError> {
    let (datasets, uid) = (state.training.datasets.clone(), user.0.user.id);
    blocking(move || datasets.get(uid, id))
        .await?
        .ok_or_else(|| ApiError::not_found("no such dataset"))
}

/// One of the caller's datasets with its validation report.
#[utoipa::path(get, path = "/api/v1/train/datasets/{dataset_id}", tag = "training", security(("bearer" = [])),
    params(("dataset_id" = Uuid, Path)), responses((status = 200, description = "the dataset"), (status = 404, body = ErrorBody)))]
pub async fn get_dataset(
    state: web::Data<AppState>,
    user: CurrentUser,
    path: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    let d = own_dataset(&state, &user, path.into_inner()).await?;
    Ok(HttpResponse::Ok().json(dataset_view(&d)))
}

/// Delete a dataset and its file. 409 `dataset_in_use` while an
/// unfinished job uses it.
#[utoipa::path(delete, path = "/api/v1/train/datasets/{dataset_id}", tag = "training", security(("bearer" = [])),
    params(("dataset_id" = Uuid, Path)), responses((status = 204), (status = 404, body = ErrorBody), (status = 409, description = "dataset_in_use", body = ErrorBody)))]
pub async fn delete_dataset(
    state: web::Data<AppState>,
    user: CurrentUser,
    path: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    let d = own_dataset(&state, &user, path.into_inner()).await?;
    let jobs = state.training.jobs.clone();
    let in_use = blocking(move || jobs.jobs_using_dataset(d.id)).await?;
    if in_use > 0 {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "dataset_in_use",
            format!("{in_use} unfinished job(s) use this dataset; stop them first"),
        ));
    }
    let (datasets, uid) = (state.training.datasets.clone(), user.0.user.id);
    if !blocking(move || datasets.delete(uid, d.id)).await? {
        return Err(ApiError::not_found("no such dataset"));
    }
    let file = dataset_path(&state.training.root, d.id);
    if let Err(e) = tokio::fs::remove_file(&file).await {
        tracing::warn!(dataset = %d.id, error = %e, "dataset record deleted but not its file");
    }
    Ok(HttpResponse::NoContent().finish())
}

/// The trainers this server offers, with their hyper-parameters.
#[utoipa::path(get, path = "/api/v1/train/trainers", tag = "training", security(("bearer" = [])),
    responses((status = 200, description = "`{items: [{id, description, can_resume, parameters}]}`")))]
pub async fn trainers(state: web::Data<AppState>, _user: CurrentUser) -> HttpResponse {
    let items: Vec<Value> = state
        .training
        .trainers
        .all()
        .map(|t| {
            json!({"id": t.id(), "description": t.description(), "can_resume": t.can_resume(), "parameters": t.parameters()})
        })
        .collect();
    HttpResponse::Ok().json(json!({ "items": items }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartBody {
    pub dataset_id: Uuid,
    /// As the trainer names it: `openai/gpt-4o-mini-2024-07-18`,
    /// `local/muse-test/tiny-gpt2`, …
    pub base_model: String,
    /// A trainer id from `GET /api/v1/train/trainers` (default: the only
    /// one, when there is one).
    pub trainer: Option<String>,
    #[schema(value_type = Object)]
    #[serde(default)]
    pub hyperparameters: Value,
    /// 1–40 of `a-z`, `0-9`, `-`: part of the trained model's name.
    pub suffix: Option<String>,
}

fn invalid(fields: Vec<Value>) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
        "the job cannot be started as asked",
    )
    .with_details(json!({ "fields": fields }))
}

/// Queue a fine-tuning job. Checks the `training` flag and plan, the
/// caller's unfinished jobs (the plan's `max_training_jobs`, capped by
/// `TRAINING_MAX_CONCURRENT_JOBS`; 429 `too_many_jobs`), the dataset (own and valid), the trainer, the base
/// model and the hyper-parameters (422 `validation_failed`, every problem).
#[utoipa::path(post, path = "/api/v1/train/start", tag = "training", security(("bearer" = [])), request_body = StartBody,
    responses((status = 202, description = "the queued job"), (status = 403, description = "feature_disabled or training_not_in_plan", body = ErrorBody),
        (status = 404, description = "no such dataset", body = ErrorBody), (status = 422, description = "validation_failed", body = ErrorBody),
        (status = 429, description = "too_many_jobs", body = ErrorBody)))]
pub async fn start(
    state: web::Data<AppState>,
    user: CurrentUser,
    ctx: crate::extract::ClientContext,
    body: web::Json<StartBody>,
) -> Result<HttpResponse, ApiError> {
    let plan = gate(&state, &user).await?;
    let b = body.into_inner();
    let training = state.training.clone();
    let trainer_id = match (&b.trainer, training.trainers.ids().as_slice()) {
        (Some(t), _) => t.clone(),
        (None, [only]) => only.clone(),
        (None, ids) => {
            return Err(invalid(vec![
                json!({"field": "trainer", "message": format!("choose one of: {}", if ids.is_empty() { "none is configured on this server".to_string() } else { ids.join(", ") })}),
            ]));
        }
    };
    let Some(trainer) = training.trainers.get(&trainer_id).cloned() else {
        return Err(invalid(vec![
            json!({"field": "trainer", "message": format!("unknown trainer {trainer_id:?}; this server offers: {}", training.trainers.ids().join(", "))}),
        ]));
    };
    let mut fields = Vec::new();
    let hyperparameters = match trainer.validate(&b.base_model, &b.hyperparameters) {
        Ok(hp) => Some(hp),
        Err(issues) => {
            fields.extend(
                issues
                    .iter()
                    .map(|i| json!({"field": i.field, "message": i.message})),
            );
            None
        }
    };
    if let Some(s) = &b.suffix {
        if s.is_empty()
            || s.len() > 40
            || !s
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            fields.push(json!({"field": "suffix", "message": "1 to 40 of a-z, 0-9 and -"}));
        }
    }
    if !fields.is_empty() {
        return Err(invalid(fields));
    }
    let dataset = own_dataset(&state, &user, b.dataset_id).await?;
    let uid = user.0.user.id;
    let jobs = training.jobs.clone();
    let unfinished = blocking(move || jobs.unfinished_jobs(uid)).await?;
    // The plan's limit, under the server's.
    let max = training
        .config
        .max_concurrent_jobs
        .min(u64::try_from(plan.max_training_jobs).unwrap_or(0));
    if unfinished >= max {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_jobs",
            format!(
                "you have {unfinished} unfinished training job(s); the {} plan allows {max} at once",
                plan.name
            ),
        )
        .with_details(json!({"plan": plan.id, "limit": max})));
    }
    let job = TrainingJob::new(
        uid,
        dataset.id,
        b.base_model.trim().to_string(),
        trainer_id,
        hyperparameters.unwrap_or_default(),
        b.suffix,
        SystemClock.now_ms(),
    );
    let (jobs, j) = (training.jobs.clone(), job.clone());
    blocking(move || jobs.insert_job(&j)).await?;
    tracing::info!(job = %job.id, trainer = %job.trainer, "training job queued");
    crate::audit::record(
        &state,
        Some(user.0.user.id),
        muse_auth::audit::TRAINING_STARTED,
        Some(job.id.to_string()),
        ctx.0,
        serde_json::json!({"by": "user", "trainer": job.trainer, "base_model": job.base_model}),
    )
    .await;
    Ok(HttpResponse::Accepted().json(job_view(&job)))
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct JobsQuery {
    pub page: Option<u32>,
    pub per_page: Option<u32>,
    /// queued, validating, running, succeeded, failed or cancelled.
    pub status: Option<String>,
    pub dataset_id: Option<Uuid>,
}

/// The caller's jobs, newest first.
#[utoipa::path(get, path = "/api/v1/train/jobs", tag = "training", security(("bearer" = [])), params(JobsQuery),
    responses((status = 200, description = "`{items, page, per_page, total}`"), (status = 400, description = "invalid_query_parameter", body = ErrorBody)))]
pub async fn list_jobs(
    state: web::Data<AppState>,
    user: CurrentUser,
    query: web::Query<JobsQuery>,
) -> Result<HttpResponse, ApiError> {
    let q = query.into_inner();
    let filter = JobFilter {
        state: q
            .status
            .as_deref()
            .map(|s| {
                JobState::parse(s).ok_or_else(|| {
                    bad_query(format!("status: expected queued, validating, running, succeeded, failed or cancelled, got {s:?}"))
                })
            })
            .transpose()?,
        dataset_id: q.dataset_id,
    };
    let page = PageRequest::new(q.page, q.per_page);
    let (jobs, uid) = (state.training.jobs.clone(), user.0.user.id);
    let p = blocking(move || jobs.jobs(Some(uid), &filter, page)).await?;
    Ok(HttpResponse::Ok().json(json!({
        "items": p.items.iter().map(job_view).collect::<Vec<_>>(),
        "page": p.page, "per_page": p.per_page, "total": p.total,
    })))
}

async fn own_job(state: &AppState, user: &CurrentUser, id: Uuid) -> Result<TrainingJob, ApiError> {
    let (jobs, uid) = (state.training.jobs.clone(), user.0.user.id);
    blocking(move || jobs.job(Some(uid), id))
        .await?
        .ok_or_else(|| ApiError::not_found("no such training job"))
}

/// A job: state, progress (step, total, metrics), error, trained model.
#[utoipa::path(get, path = "/api/v1/train/status/{job_id}", tag = "training", security(("bearer" = [])),
    params(("job_id" = Uuid, Path)), responses((status = 200, description = "the job"), (status = 404, body = ErrorBody)))]
pub async fn status(
    state: web::Data<AppState>,
    user: CurrentUser,
    path: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    let job = own_job(&state, &user, path.into_inner()).await?;
    Ok(HttpResponse::Ok().json(job_view(&job)))
}

/// Stop a job: a queued one is cancelled at once (200); a running one is
/// stopped at its trainer by its worker (202, `cancel_requested`); an
/// ended one answers 409 `job_finished`.
#[utoipa::path(post, path = "/api/v1/train/stop/{job_id}", tag = "training", security(("bearer" = [])),
    params(("job_id" = Uuid, Path)), responses((status = 200, description = "cancelled"), (status = 202, description = "stopping"),
        (status = 404, body = ErrorBody), (status = 409, description = "job_finished", body = ErrorBody)))]
pub async fn stop(
    state: web::Data<AppState>,
    user: CurrentUser,
    ctx: crate::extract::ClientContext,
    path: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    let (jobs, uid, id) = (
        state.training.jobs.clone(),
        user.0.user.id,
        path.into_inner(),
    );
    let now = SystemClock.now_ms();
    let outcome = blocking(move || jobs.request_stop(uid, id, now)).await?;
    if let StopOutcome::Cancelled(j) | StopOutcome::Requested(j) = &outcome {
        crate::audit::record(
            &state,
            Some(uid),
            muse_auth::audit::TRAINING_STOP_REQUESTED,
            Some(j.id.to_string()),
            ctx.0,
            serde_json::json!({"by": "user", "state": j.state.as_str()}),
        )
        .await;
    }
    match outcome {
        StopOutcome::Cancelled(j) => Ok(HttpResponse::Ok().json(job_view(&j))),
        StopOutcome::Requested(j) => Ok(HttpResponse::Accepted().json(job_view(&j))),
        StopOutcome::AlreadyEnded(j) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "job_finished",
            format!("the job has already ended ({})", j.state.as_str()),
        )),
        StopOutcome::NotFound => Err(ApiError::not_found("no such training job")),
    }
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct LogQuery {
    /// Last bytes of the log to return (default 65536, at most 1 MiB).
    pub tail_bytes: Option<u64>,
}

/// The end of a job's log: the trainer's stderr, provider events, Muse's notes.
#[utoipa::path(get, path = "/api/v1/train/logs/{job_id}", tag = "training", security(("bearer" = [])),
    params(("job_id" = Uuid, Path), LogQuery), responses((status = 200, description = "text/plain"), (status = 404, body = ErrorBody)))]
pub async fn logs(
    state: web::Data<AppState>,
    user: CurrentUser,
    path: web::Path<Uuid>,
    query: web::Query<LogQuery>,
) -> Result<HttpResponse, ApiError> {
    let job = own_job(&state, &user, path.into_inner()).await?;
    let tail = query.tail_bytes.unwrap_or(65_536).min(1024 * 1024);
    let file = job_log_path(&state.training.root, job.id);
    let text = web::block(move || -> std::io::Result<String> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = match std::fs::File::open(&file) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
            Err(e) => return Err(e),
        };
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(tail)))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    })
    .await?
    .map_err(|e| ApiError::internal("reading a job log", e))?;
    Ok(HttpResponse::Ok()
        .content_type("text/plain; charset=utf-8")
        .body(text))
}
