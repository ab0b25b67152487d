//! A local server speaking OpenAI's files and fine-tuning API (and chat,
//! so fine-tuned models can be called): `POST /v1/files` (multipart, sent
//! chunked by async-openai), `POST /v1/fine_tuning/jobs`,
//! `GET /v1/fine_tuning/jobs/{id}`, `GET …/{id}/events`, `POST …/{id}/cancel`.
//!
//! Base models decide what a job does:
//! - `gpt-4o-mini-2024-07-18`: runs 3 polls (a metrics event each), then
//!   succeeds as `ft:gpt-4o-mini-2024-07-18:muse:<suffix>:<n>`;
//! - `fail-me`: fails with a reason at the second poll;
//! - anything else: runs until cancelled.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use actix_web::web::{self, Bytes};
use actix_web::{App, HttpRequest, HttpResponse, HttpServer};
use serde_json::{json, Value};

/// A job object, its events (newest first), and how often it was polled.
pub type FtJob = (Value, Vec<Value>, u32);

#[derive(Default)]
pub struct FtState {
    /// Uploaded files: id → bytes received.
    pub files: Mutex<HashMap<String, usize>>,
    /// Jobs: id → (job object, events newest first, polls).
    pub jobs: Mutex<HashMap<String, FtJob>>,
    pub cancels: AtomicUsize,
    next: AtomicUsize,
}

pub struct FtUpstream {
    pub url: String,
    pub state: Arc<FtState>,
}

fn authorized(req: &HttpRequest) -> bool {
    req.headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        == Some("Bearer sk-test")
}

fn unauthorized() -> HttpResponse {
    HttpResponse::Unauthorized().json(json!({"error": {"message": "bad key", "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}}))
}

async fn upload(req: HttpRequest, body: Bytes, st: web::Data<Arc<FtState>>) -> HttpResponse {
    if !authorized(&req) {
        return unauthorized();
    }
    let text = String::from_utf8_lossy(&body);
    if !text.contains("name=\"purpose\"") || !text.contains("fine-tune") {
        return HttpResponse::BadRequest().json(json!({"error": {"message": "purpose must be fine-tune", "type": "invalid_request_error", "param": "purpose", "code": null}}));
    }
    let n = st.next.fetch_add(1, Ordering::SeqCst);
    let id = format!("file-{n}");
    st.files.lock().unwrap().insert(id.clone(), body.len());
    HttpResponse::Ok().json(json!({"id": id, "object": "file", "bytes": body.len(), "created_at": 1, "filename": "train.jsonl", "purpose": "fine-tune", "status": "processed"}))
}

async fn create(
    req: HttpRequest,
    body: web::Json<Value>,
    st: web::Data<Arc<FtState>>,
) -> HttpResponse {
    if !authorized(&req) {
        return unauthorized();
    }
    let file = body["training_file"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if !st.files.lock().unwrap().contains_key(&file) {
        return HttpResponse::BadRequest().json(json!({"error": {"message": format!("no file {file}"), "type": "invalid_request_error", "param": "training_file", "code": null}}));
    }
    let n = st.next.fetch_add(1, Ordering::SeqCst);
    let id = format!("ftjob-{n}");
    let job = json!({
        "id": id, "object": "fine_tuning.job", "created_at": 1, "model": body["model"],
        "training_file": file, "status": "validating_files", "fine_tuned_model": null,
        "error": null, "hyperparameters": body["method"]["supervised"]["hyperparameters"],
        "suffix": body["suffix"], "metadata": body["metadata"], "seed": body["seed"],
        "organization_id": "org-muse", "result_files": [], "trained_tokens": null,
        "validation_file": null, "finished_at": null, "estimated_finish": null, "integrations": null,
    });
    let created = json!({"id": format!("ev-{id}-0"), "object": "fine_tuning.job.event", "created_at": 1, "level": "info", "message": "Created fine-tuning job", "type": "message", "data": {}});
    st.jobs
        .lock()
        .unwrap()
        .insert(id, (job.clone(), vec![created], 0));
    HttpResponse::Ok().json(job)
}

async fn retrieve(
    req: HttpRequest,
    path: web::Path<String>,
    st: web::Data<Arc<FtState>>,
) -> HttpResponse {
    if !authorized(&req) {
        return unauthorized();
    }
    let mut jobs = st.jobs.lock().unwrap();
    let Some((job, events, polls)) = jobs.get_mut(path.as_str()) else {
        return HttpResponse::NotFound().json(json!({"error": {"message": "no such job", "type": "invalid_request_error", "param": null, "code": null}}));
    };
    let status = job["status"].as_str().unwrap_or_default().to_string();
    if ["succeeded", "failed", "cancelled"].contains(&status.as_str()) {
        return HttpResponse::Ok().json(job.clone());
    }
    *polls += 1;
    let model = job["model"].as_str().unwrap_or_default().to_string();
    let step = *polls;
    let job_id = path.as_str().to_string();
    let ev = |kind: &str, msg: String, data: Value| json!({"id": format!("ev-{job_id}-{step}-{kind}"), "object": "fine_tuning.job.event", "created_at": step, "level": "info", "message": msg, "type": kind, "data": data});
    match model.as_str() {
        "fail-me" if step >= 2 => {
            job["status"] = json!("failed");
            job["error"] = json!({"code": "invalid_training_file", "message": "The file has too few examples", "param": "training_file"});
            events.insert(0, ev("message", "Job failed".into(), json!({})));
        }
        "gpt-4o-mini-2024-07-18" => {
            job["status"] = json!("running");
            let e = ev(
                "metrics",
                format!("Step {step}/3: training loss={:.2}", 2.0 / f64::from(step)),
                json!({"step": step, "total_steps": 3, "train_loss": 2.0 / f64::from(step)}),
            );
            events.insert(0, e);
            if step >= 3 {
                job["status"] = json!("succeeded");
                let suffix = job["suffix"].as_str().unwrap_or("x").to_string();
                job["fine_tuned_model"] =
                    json!(format!("ft:{model}:muse:{suffix}:{}", path.as_str()));
                events.insert(
                    0,
                    ev(
                        "message",
                        "The job has successfully completed".into(),
                        json!({}),
                    ),
                );
            }
        }
        _ => job["status"] = json!("running"),
    }
    HttpResponse::Ok().json(job.clone())
}

async fn events(
    req: HttpRequest,
    path: web::Path<String>,
    st: web::Data<Arc<FtState>>,
) -> HttpResponse {
    if !authorized(&req) {
        return unauthorized();
    }
    let jobs = st.jobs.lock().unwrap();
    let Some((_, events, _)) = jobs.get(path.as_str()) else {
        return HttpResponse::NotFound().finish();
    };
    HttpResponse::Ok().json(json!({"object": "list", "data": events, "has_more": false}))
}

async fn cancel(
    req: HttpRequest,
    path: web::Path<String>,
    st: web::Data<Arc<FtState>>,
) -> HttpResponse {
    if !authorized(&req) {
        return unauthorized();
    }
    st.cancels.fetch_add(1, Ordering::SeqCst);
    let mut jobs = st.jobs.lock().unwrap();
    let Some((job, _, _)) = jobs.get_mut(path.as_str()) else {
        return HttpResponse::NotFound().finish();
    };
    job["status"] = json!("cancelled");
    HttpResponse::Ok().json(job.clone())
}

pub async fn ft_upstream() -> FtUpstream {
    let state = Arc::new(FtState::default());
    let data = web::Data::new(state.clone());
    let sent = web::Data::new(Arc::new(AtomicUsize::new(0)));
    let srv = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .app_data(sent.clone())
            .app_data(web::PayloadConfig::default().limit(16 * 1024 * 1024))
            .route("/v1/files", web::post().to(upload))
            .route("/v1/fine_tuning/jobs", web::post().to(create))
            .route("/v1/fine_tuning/jobs/{id}", web::get().to(retrieve))
            .route("/v1/fine_tuning/jobs/{id}/events", web::get().to(events))
            .route("/v1/fine_tuning/jobs/{id}/cancel", web::post().to(cancel))
            .route(
                "/v1/chat/completions",
                web::post().to(crate::upstream::chat),
            )
    })
    .workers(1)
    .bind(("127.0.0.1", 0))
    .unwrap();
    let addr = srv.addrs()[0];
    actix_web::rt::spawn(srv.run());
    FtUpstream {
        url: format!("http://{addr}/v1"),
        state,
    }
}
