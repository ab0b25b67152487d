//! Administrators pull local models from a Hugging Face Hub (here a local
//! server speaking the hub's protocol: the `?blobs=true` listing with sizes
//! and LFS hashes, ranged `resolve/main/{file}` downloads): in the
//! background, one ONNX variant only, verified, then served at once.

use std::path::PathBuf;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::*;
use crate::models::test_models;

const ADMIN: (&str, &str) = ("root@example.com", "an admin passphrase");

/// Serves the snapshot of `repo` found in `cache` as the hub would, and
/// counts the files downloaded.
async fn hub(
    cache: &str,
    repo: &'static str,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
    let root = PathBuf::from(cache).join(format!("models--{}", repo.replace('/', "--")));
    let rev = std::fs::read_to_string(root.join("refs/main")).unwrap();
    let snapshot = root.join("snapshots").join(rev.trim());
    let fetched = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = fetched.clone();
    let srv = HttpServer::new(move || {
        let (list_dir, file_dir, seen) = (snapshot.clone(), snapshot.clone(), seen.clone());
        App::new()
            .route(
                &format!("/api/models/{repo}/revision/main"),
                web::get().to(move || {
                    let dir = list_dir.clone();
                    async move {
                        use sha2::Digest;
                        let mut siblings = Vec::new();
                        for e in std::fs::read_dir(&dir).unwrap().flatten() {
                            let name = e.file_name().to_string_lossy().into_owned();
                            let bytes = std::fs::read(e.path()).unwrap();
                            let mut s = json!({"rfilename": name, "size": bytes.len()});
                            if name.contains(".onnx") {
                                let sha: String = sha2::Sha256::digest(&bytes)
                                    .iter()
                                    .map(|b| format!("{b:02x}"))
                                    .collect();
                                s["lfs"] = json!({"sha256": sha, "size": bytes.len()});
                            }
                            siblings.push(s);
                        }
                        // A repo also holds files a pull must not fetch.
                        siblings.push(json!({"rfilename": "pytorch_model.bin", "size": 10}));
                        HttpResponse::Ok().json(json!({"sha": "abc123", "siblings": siblings}))
                    }
                }),
            )
            .route(
                &format!("/{repo}/resolve/main/{{file:.*}}"),
                web::get().to(move |req: HttpRequest, file: web::Path<String>| {
                    let (dir, seen) = (file_dir.clone(), seen.clone());
                    async move {
                        let file = file.into_inner();
                        let Ok(bytes) = std::fs::read(dir.join(&file)) else {
                            return HttpResponse::NotFound().finish();
                        };
                        let total = bytes.len();
                        let (start, end) = req
                            .headers()
                            .get("range")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|r| r.strip_prefix("bytes="))
                            .and_then(|r| r.split_once('-'))
                            .and_then(|(a, b)| {
                                Some((
                                    a.parse::<usize>().ok()?,
                                    b.parse::<usize>().ok()?.min(total - 1),
                                ))
                            })
                            .unwrap_or((0, total - 1));
                        if end > start {
                            seen.lock().unwrap().push(file);
                        }
                        HttpResponse::PartialContent()
                            .insert_header(("x-repo-commit", "abc123"))
                            .insert_header(("etag", format!("\"{total:x}\"")))
                            .insert_header((
                                "content-range",
                                format!("bytes {start}-{end}/{total}"),
                            ))
                            .body(bytes[start..=end].to_vec())
                    }
                }),
            )
    })
    .workers(1)
    .bind(("127.0.0.1", 0))
    .unwrap();
    let addr = srv.addrs()[0];
    actix_web::rt::spawn(srv.run());
    (format!("http://{addr}"), fetched)
}

#[actix_web::test]
async fn an_admin_pulls_a_model_which_is_then_served() {
    let Some(cache) = test_models() else { return };
    let (endpoint, fetched) = hub(&cache, "muse-test/tiny-llama").await;
    let empty = tempfile::tempdir().unwrap();
    let app = TestApp::spawn_with(&[
        ("MODEL_CACHE_DIR", &empty.path().to_string_lossy()),
        ("HF_ENDPOINT", &endpoint),
        ("ADMIN_EMAIL", ADMIN.0),
        ("ADMIN_PASSWORD", ADMIN.1),
    ])
    .await;
    let admin = access(&app.login(ADMIN.0, ADMIN.1).await.body);
    let user = access(&app.user("dee").await);
    let key = "local/muse-test/tiny-llama";
    let chat =
        json!({"model": key, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4});
    assert_eq!(
        app.post("/v1/chat/completions", Some(&user), chat.clone())
            .await
            .status,
        StatusCode::NOT_FOUND
    );

    let body = json!({"model": "muse-test/tiny-llama", "variant": "fp32"});
    assert_eq!(
        app.post("/api/v1/admin/models/pull", Some(&user), body.clone())
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    for bad in [
        json!({"model": "../etc"}),
        json!({"model": "a/b/c"}),
        json!({"model": "a/b", "variant": "x y"}),
    ] {
        let r = app
            .post("/api/v1/admin/models/pull", Some(&admin), bad)
            .await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
    }
    let r = app
        .post("/api/v1/admin/models/pull", Some(&admin), body)
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    assert_eq!(r.body["state"], "running");

    let mut status = Value::Null;
    for _ in 0..200 {
        let r = app.get("/api/v1/admin/models/pulls", Some(&admin)).await;
        status = r.body["items"][0].clone();
        if status["state"] != "running" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(status["state"], "succeeded", "{status}");
    assert_eq!(status["key"], key);
    assert!(status["total_bytes"].as_u64().unwrap() > 0);
    let files = fetched.lock().unwrap().clone();
    assert!(
        files.contains(&"model.onnx".to_string()) && files.contains(&"tokenizer.json".to_string()),
        "{files:?}"
    );
    assert!(
        !files.contains(&"pytorch_model.bin".to_string()),
        "only what the variant needs: {files:?}"
    );

    // Served at once, without a restart.
    let r = app.post("/v1/chat/completions", Some(&user), chat).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let audit = app
        .get("/api/v1/admin/audit?event=model.pulled", Some(&admin))
        .await;
    assert_eq!(
        audit.body["items"][0]["subject"], "muse-test/tiny-llama",
        "{}",
        audit.text
    );
}
