//! Training end to end: datasets (multipart upload, validation report,
//! limits, ownership), jobs through the external trainer (the example
//! trainer in scripts/trainers on a generated ONNX model, and fake
//! programs), progress over the WebSocket, stop, failure, and the OpenAI
//! fine-tuning trainer against a local server (success, failure, cancel,
//! and resuming a job whose worker died).

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::finetune_upstream::ft_upstream;
use crate::helpers::{access, Resp, TestApp};
use crate::websocket::{connect, recv};

const ADMIN: (&str, &str) = ("root@example.com", "an admin passphrase");

fn chat_rows(n: usize) -> String {
    (0..n)
        .map(|i| {
            json!({"messages": [
                {"role": "user", "content": format!("Write line {i} about the sea")},
                {"role": "assistant", "content": "the sea the sea the waves of the sea"}
            ]})
            .to_string()
                + "\n"
        })
        .collect()
}

/// A multipart body with one `file` field (and an unrelated text field).
async fn upload(app: &TestApp, token: &str, query: &str, name: &str, content: &[u8]) -> Resp {
    let boundary = "muse-test-boundary-7MA4YWxkTrZu0gW";
    let mut body = Vec::new();
    body.extend_from_slice(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nignored\r\n")
            .as_bytes(),
    );
    body.extend_from_slice(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\nContent-Type: application/jsonl\r\n\r\n")
            .as_bytes(),
    );
    body.extend_from_slice(content);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let res = app
        .client
        .post(format!("{}/api/v1/train/upload{query}", app.base))
        .bearer_auth(token)
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    TestApp::read(res).await
}

/// A user on the pro plan (training allowed), and the admin's token.
async fn trainer_user(app: &TestApp, name: &str) -> (String, String) {
    let token = access(&app.user(name).await);
    let admin = access(&app.login(ADMIN.0, ADMIN.1).await.body);
    let me = app.get("/api/v1/auth/me", Some(&token)).await.body["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = app
        .post(
            &format!("/api/v1/admin/users/{me}/plan"),
            Some(&admin),
            json!({"plan_id": "pro"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    (token, admin)
}

/// Polls the job until `done(job)` (bounded).
async fn wait_job(app: &TestApp, token: &str, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..600 {
        let r = app
            .get(&format!("/api/v1/train/status/{id}"), Some(token))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        if done(&r.body) {
            return r.body;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("job {id} did not get there in 30 s");
}

fn venv_python() -> Option<String> {
    // Not canonicalized: the venv's python is a symlink to the base
    // interpreter, and only the link finds the venv's packages.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let p = root.join(".venv/bin/python");
    p.is_file().then(|| p.to_string_lossy().into_owned())
}

/// Writes a fake trainer program (Python) into `dir`.
fn fake_program(dir: &std::path::Path, name: &str, body: &str) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    path.to_string_lossy().into_owned()
}

/// Prints progress every 50 ms for a minute; SIGTERM → a note on stderr
/// and exit 143.
const SLOW: &str = r#"
import json, signal, sys, time
def term(*_):
    sys.stderr.write("got SIGTERM, stopping\n"); sys.stderr.flush(); sys.exit(143)
signal.signal(signal.SIGTERM, term)
for step in range(1, 1201):
    print(json.dumps({"type": "progress", "step": step, "total_steps": 1200, "metrics": {"loss": 1.0 / step}}), flush=True)
    time.sleep(0.05)
"#;

/// Fails like a real trainer would.
const FAILING: &str = r#"
import json, sys
print(json.dumps({"type": "progress", "step": 1, "total_steps": 10}), flush=True)
print("not json, goes to the log", flush=True)
import os
sys.stderr.write("loading weights from " + os.getcwd() + "/checkpoint.bin\nRuntimeError: CUDA out of memory\n")
sys.exit(3)
"#;

#[actix_web::test]
async fn datasets_are_streamed_validated_limited_and_owned() {
    let ft = ft_upstream().await;
    let app = TestApp::spawn_with(&[
        ("ADMIN_EMAIL", ADMIN.0),
        ("ADMIN_PASSWORD", ADMIN.1),
        ("OPENAI_API_KEY", "sk-test"),
        ("OPENAI_BASE_URL", &ft.url),
        ("TRAINING_WORKERS", "0"),
        ("TRAINING_MAX_UPLOAD_BYTES", "8000"),
        ("TRAINING_STORAGE_QUOTA_BYTES", "11000"),
    ])
    .await;
    // The free plan does not train.
    let free = access(&app.user("freebie").await);
    let r = upload(&app, &free, "", "a.jsonl", chat_rows(12).as_bytes()).await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::FORBIDDEN, "training_not_in_plan")
    );

    let (token, _) = trainer_user(&app, "trainer").await;
    let good = chat_rows(12);
    let r = upload(
        &app,
        &token,
        "?base_model=openai/gpt-4o-mini-2024-07-18",
        "../../etc/poems.jsonl",
        good.as_bytes(),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let d = r.body.clone();
    assert_eq!(d["name"], "poems.jsonl", "only the last component is kept");
    assert_eq!(
        (d["rows"].as_u64(), d["format"].as_str()),
        (Some(12), Some("chat"))
    );
    assert_eq!(d["size_bytes"].as_u64(), Some(good.len() as u64));
    assert_eq!(d["report"]["valid"], true);
    assert_eq!(d["token_method"], "estimate");
    let tokens = d["tokens"].as_f64().unwrap();
    assert!(tokens > 100.0);
    // $3 per million training tokens, 3 epochs assumed for "auto".
    let cost = d["estimated_cost_usd"].as_f64().unwrap();
    assert!((cost - tokens * 3.0 * 3.0 / 1e6).abs() < 1e-12, "{cost}");
    let id = d["dataset_id"].as_str().unwrap().to_string();
    // Stored under an opaque name.
    let files: Vec<String> = std::fs::read_dir(app.data_dir.join("training/datasets"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files, [format!("{}.jsonl", id.replace('-', ""))]);

    // A broken file: every problem with its line, nothing stored.
    let mut lines: Vec<String> = good.lines().map(str::to_string).collect();
    lines[1] = "{not json".into();
    lines[3] = r#"{"messages": [{"role": "user", "content": "no answer"}]}"#.into();
    lines[6] = r#"{"prompt": "switches format", "completion": "x"}"#.into();
    let r = upload(
        &app,
        &token,
        "",
        "broken.jsonl",
        lines.join("\n").as_bytes(),
    )
    .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_dataset")
    );
    let report = &r.body["error"]["details"]["report"];
    let at: Vec<u64> = report["issues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["line"].as_u64().unwrap())
        .collect();
    // Line 0: the file as a whole (too few valid rows left).
    assert_eq!(at, [2, 4, 7, 0], "{report}");
    assert!(report["issues"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("not valid JSON"));
    assert!(report["issues"][1]["reason"]
        .as_str()
        .unwrap()
        .contains("assistant"));
    assert_eq!(report["rows"], 9);
    assert_eq!(
        std::fs::read_dir(app.data_dir.join("training/datasets"))
            .unwrap()
            .count(),
        1
    );

    // Limits: the file size, the user's storage, a missing file field.
    let big = chat_rows(100);
    let r = upload(&app, &token, "", "big.jsonl", big.as_bytes()).await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
    );
    let second = upload(&app, &token, "", "b.jsonl", chat_rows(40).as_bytes()).await;
    assert_eq!(second.status, StatusCode::CREATED, "{}", second.text);
    let r = upload(&app, &token, "", "c.jsonl", chat_rows(40).as_bytes()).await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::PAYLOAD_TOO_LARGE, "storage_quota_exceeded")
    );
    let r = TestApp::read(
        app.client
            .post(format!("{}/api/v1/train/upload", app.base))
            .bearer_auth(&token)
            .header("content-type", "multipart/form-data; boundary=x")
            .body("--x\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\nv\r\n--x--\r\n")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::BAD_REQUEST, "missing_file")
    );

    // Listing, ownership, deletion.
    let list = app
        .get("/api/v1/train/datasets?per_page=1", Some(&token))
        .await;
    assert_eq!(
        (
            list.body["total"].as_u64(),
            list.body["items"].as_array().unwrap().len()
        ),
        (Some(2), 1)
    );
    let other = access(&app.user("other").await);
    let r = app
        .get(&format!("/api/v1/train/datasets/{id}"), Some(&other))
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(
        app.get("/api/v1/train/datasets", Some(&other)).await.body["total"],
        0
    );
    let r = app
        .call(
            reqwest::Method::DELETE,
            &format!("/api/v1/train/datasets/{id}"),
            Some(&other),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = app
        .call(
            reqwest::Method::DELETE,
            &format!("/api/v1/train/datasets/{id}"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    assert_eq!(
        app.get(&format!("/api/v1/train/datasets/{id}"), Some(&token))
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        std::fs::read_dir(app.data_dir.join("training/datasets"))
            .unwrap()
            .count(),
        1
    );
}

#[actix_web::test]
async fn external_jobs_run_report_progress_stop_and_fail() {
    let dir = std::env::temp_dir().join(format!(
        "muse-fake-trainers-{}",
        uuid::Uuid::new_v4().simple()
    ));
    let slow = fake_program(&dir, "slow.py", SLOW);
    let failing = fake_program(&dir, "failing.py", FAILING);
    // One command, the program chosen by the base model name.
    let chooser = fake_program(
        &dir,
        "choose.py",
        &format!(
            "import os, sys\nargs = sys.argv[1:]\nbase = [a.split('=', 1)[1] for a in args if a.startswith('--base-model=')][0]\nprog = {{'slow': {slow:?}, 'failing': {failing:?}}}[base]\nos.execvp(sys.executable, [sys.executable, prog] + args)\n"
        ),
    );
    let app = TestApp::spawn_with(&[
        ("ADMIN_EMAIL", ADMIN.0),
        ("ADMIN_PASSWORD", ADMIN.1),
        ("TRAINING_EXTERNAL_COMMAND", &format!("python3 {chooser}")),
        ("TRAINING_WORKERS", "1"),
        ("TRAINING_POLL_MS", "50"),
        ("TRAINING_PROGRESS_POLL_MS", "50"),
        ("TRAINING_MAX_CONCURRENT_JOBS", "2"),
        ("TRAINING_EXTERNAL_GRACE_SECS", "5"),
    ])
    .await;
    let (token, _) = trainer_user(&app, "runner").await;
    let ds = upload(&app, &token, "", "d.jsonl", chat_rows(10).as_bytes()).await;
    assert_eq!(ds.status, StatusCode::CREATED, "{}", ds.text);
    let ds = ds.body["dataset_id"].as_str().unwrap().to_string();

    let trainers = app.get("/api/v1/train/trainers", Some(&token)).await;
    assert_eq!(trainers.body["items"][0]["id"], "external");

    // Every problem of a start request at once.
    let r = app
        .post(
            "/api/v1/train/start",
            Some(&token),
            json!({"dataset_id": ds, "base_model": "slow", "hyperparameters": {"n_epochs": 0, "dropout": 1}, "suffix": "Bad Suffix"}),
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed")
    );
    let fields: Vec<&str> = r.body["error"]["details"]["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["field"].as_str().unwrap())
        .collect();
    assert_eq!(
        fields,
        [
            "hyperparameters.dropout",
            "hyperparameters.n_epochs",
            "suffix"
        ],
        "as docs/training.md names them"
    );
    let r = app
        .post(
            "/api/v1/train/start",
            Some(&token),
            json!({"dataset_id": ds, "base_model": "slow", "trainer": "gpu-farm"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let stranger = access(&app.user("stranger").await);
    let r = app
        .post(
            "/api/v1/train/start",
            Some(&stranger),
            json!({"dataset_id": ds, "base_model": "slow"}),
        )
        .await;
    assert_eq!(r.error_code(), "training_not_in_plan");

    // A long job, watched over the WebSocket, then stopped.
    let mut ws = connect(&app, &token).await;
    assert_eq!(recv(&mut ws).await["type"], "ready");
    let r = app
        .post(
            "/api/v1/train/start",
            Some(&token),
            json!({"dataset_id": ds, "base_model": "slow", "hyperparameters": {"n_epochs": 2}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    assert_eq!(r.body["status"], "queued");
    let job = r.body["job_id"].as_str().unwrap().to_string();
    // A second job waits in the queue (one worker); a third is refused.
    let queued = app
        .post(
            "/api/v1/train/start",
            Some(&token),
            json!({"dataset_id": ds, "base_model": "failing"}),
        )
        .await
        .body["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = app
        .post(
            "/api/v1/train/start",
            Some(&token),
            json!({"dataset_id": ds, "base_model": "slow"}),
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::TOO_MANY_REQUESTS, "too_many_jobs")
    );
    // The dataset cannot go while jobs use it.
    let r = app
        .call(
            reqwest::Method::DELETE,
            &format!("/api/v1/train/datasets/{ds}"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(r.error_code(), "dataset_in_use");

    let mut live = Vec::new();
    while live.len() < 200 {
        let m = recv(&mut ws).await;
        if m["type"] == "training.progress" && m["job_id"] == job.as_str() {
            let running = m["status"] == "running" && m["step"].as_u64().unwrap_or(0) >= 3;
            live.push(m);
            if running {
                break;
            }
        }
    }
    let last = live.last().unwrap();
    assert_eq!(last["total_steps"], 1200);
    assert!(last["metrics"]["loss"].as_f64().unwrap() < 1.0);
    assert!(last["id"].is_null(), "pushes carry no request id");
    // The queued one is cancelled at once.
    let r = app
        .post(
            &format!("/api/v1/train/stop/{queued}"),
            Some(&token),
            json!({}),
        )
        .await;
    assert_eq!(
        (r.status, r.body["status"].as_str()),
        (StatusCode::OK, Some("cancelled"))
    );
    // The running one is stopped at the program (SIGTERM).
    let r = app
        .post(
            &format!("/api/v1/train/stop/{job}"),
            Some(&stranger),
            json!({}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = app
        .post(
            &format!("/api/v1/train/stop/{job}"),
            Some(&token),
            json!({}),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    let asked = std::time::Instant::now();
    let end = wait_job(&app, &token, &job, |j| j["status"] == "cancelled").await;
    let admin = access(&app.login(ADMIN.0, ADMIN.1).await.body);
    for event in ["training.started", "training.stop_requested"] {
        let audit = app
            .get(&format!("/api/v1/admin/audit?event={event}"), Some(&admin))
            .await;
        assert!(
            audit.body["items"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["subject"] == job.as_str()),
            "{event}: {}",
            audit.text
        );
    }
    // Within a second or two (the heartbeat reads the stop every second;
    // it used to take a third of the 30 s lease).
    assert!(
        asked.elapsed() < std::time::Duration::from_secs(5),
        "cancelled after {:?}",
        asked.elapsed()
    );
    assert!(end["finished_at"].is_string());
    let step_at_stop = end["step"].as_u64().unwrap();
    assert!(step_at_stop < 1200, "{end}");
    let log = app
        .get(&format!("/api/v1/train/logs/{job}"), Some(&token))
        .await;
    assert!(log.text.contains("got SIGTERM"), "{}", log.text);
    let r = app
        .post(
            &format!("/api/v1/train/stop/{job}"),
            Some(&token),
            json!({}),
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::CONFLICT, "job_finished")
    );
    // The socket saw the end too.
    loop {
        let m = recv(&mut ws).await;
        if m["type"] == "training.progress"
            && m["job_id"] == job.as_str()
            && m["status"] == "cancelled"
        {
            break;
        }
    }

    // A program that fails: its reason is the job's error.
    let r = app
        .post(
            "/api/v1/train/start",
            Some(&token),
            json!({"dataset_id": ds, "base_model": "failing"}),
        )
        .await;
    let failed_id = r.body["job_id"].as_str().unwrap().to_string();
    let failed = wait_job(&app, &token, &failed_id, |j| j["status"] == "failed").await;
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains("exit status: 3") && error.contains("CUDA out of memory"),
        "{error}"
    );
    // The program named a file in its job directory: its owner sees
    // `…/checkpoint.bin`, never the server's paths.
    assert!(
        error.contains("…/checkpoint.bin") && !error.contains(app.data_dir.to_str().unwrap()),
        "{error}"
    );
    let log = app
        .get(&format!("/api/v1/train/logs/{failed_id}"), Some(&token))
        .await;
    assert!(
        log.text.contains("stdout: not json, goes to the log"),
        "{}",
        log.text
    );
    let jobs = app
        .get("/api/v1/train/jobs?status=failed", Some(&token))
        .await;
    assert_eq!(jobs.body["total"], 1);
    let r = app
        .get("/api/v1/train/jobs?status=lost", Some(&token))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        app.get("/api/v1/train/jobs", Some(&stranger)).await.body["total"],
        0
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[actix_web::test]
async fn the_example_trainer_fine_tunes_a_local_model_that_then_generates() {
    let Some(cache) = crate::models::test_models() else {
        return;
    };
    let Some(python) = venv_python() else {
        assert!(
            std::env::var("MUSE_REQUIRE_LOCAL_MODELS").as_deref() != Ok("1"),
            "the venv is missing"
        );
        return;
    };
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scripts/trainers/bias_finetune.py")
        .canonicalize()
        .unwrap();
    let app = TestApp::spawn_with(&[
        ("ADMIN_EMAIL", ADMIN.0),
        ("ADMIN_PASSWORD", ADMIN.1),
        ("MODEL_CACHE_DIR", &cache),
        (
            "TRAINING_EXTERNAL_COMMAND",
            &format!(
                "env MUSE_EXAMPLE_STEP_DELAY=0.02 {python} {}",
                script.display()
            ),
        ),
        ("TRAINING_POLL_MS", "50"),
        ("TRAINING_PROGRESS_POLL_MS", "50"),
    ])
    .await;
    let (token, _) = trainer_user(&app, "poet").await;
    let base = "local/muse-test/tiny-gpt2";
    let r = upload(
        &app,
        &token,
        &format!("?base_model={base}"),
        "sea.jsonl",
        chat_rows(12).as_bytes(),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["token_method"], format!("tokenizer:{base}"));
    assert_eq!(
        r.body["estimated_cost_usd"],
        Value::Null,
        "no published price"
    );
    let ds = r.body["dataset_id"].as_str().unwrap().to_string();

    let mut ws = connect(&app, &token).await;
    assert_eq!(recv(&mut ws).await["type"], "ready");
    let r = app
        .post(
            "/api/v1/train/start",
            Some(&token),
            json!({"dataset_id": ds, "base_model": base, "suffix": "sea", "hyperparameters": {"n_epochs": 2, "max_steps": 20, "learning_rate": 0.5}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    let job = r.body["job_id"].as_str().unwrap().to_string();
    let mut statuses = Vec::new();
    let done = loop {
        let m = recv(&mut ws).await;
        if m["type"] != "training.progress" || m["job_id"] != job.as_str() {
            continue;
        }
        statuses.push(m["status"].as_str().unwrap().to_string());
        if m["status"] == "succeeded" || m["status"] == "failed" {
            break m;
        }
    };
    assert_eq!(done["status"], "succeeded", "{done}");
    assert!(statuses.iter().any(|s| s == "running"), "{statuses:?}");
    assert_eq!(done["step"], 40);
    let model = done["result_model"].as_str().unwrap().to_string();
    assert!(model.starts_with("local/trained/sea-"), "{model}");
    let log = app
        .get(&format!("/api/v1/train/logs/{job}"), Some(&token))
        .await;
    assert!(log.text.contains("answer tokens"), "{}", log.text);

    // The owner sees and uses the model; nobody else does.
    let listed = app.get("/v1/models", Some(&token)).await;
    assert!(listed.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["id"] == model.as_str()));
    let other = access(&app.user("reader").await);
    let listed = app.get("/v1/models", Some(&other)).await;
    assert!(!listed.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["id"] == model.as_str()));
    let ask = |m: &str| json!({"model": m, "messages": [{"role": "user", "content": "Once upon a time"}], "max_tokens": 12, "temperature": 0});
    let r = app
        .post("/v1/chat/completions", Some(&other), ask(&model))
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::NOT_FOUND, "model_not_found")
    );
    let tuned = app
        .post("/v1/chat/completions", Some(&token), ask(&model))
        .await;
    assert_eq!(tuned.status, StatusCode::OK, "{}", tuned.text);
    let before = app
        .post("/v1/chat/completions", Some(&token), ask(base))
        .await;
    assert_eq!(before.status, StatusCode::OK, "{}", before.text);
    let text = |r: &Resp| {
        r.body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_ne!(text(&tuned), text(&before), "training changed the model");
    // The answers' text now dominates the greedy output (the tiny
    // tokenizer cuts words into short pieces: count characters).
    let share = |s: &str| {
        let n = s.chars().count().max(1);
        s.chars()
            .filter(|c| "the sea waves of".contains(*c))
            .count() as f64
            / n as f64
    };
    let (after, was) = (text(&tuned), text(&before));
    assert!(
        share(&after) > 0.9 && share(&after) > share(&was),
        "{after:?} vs {was:?}"
    );
}

#[actix_web::test]
async fn openai_fine_tuning_succeeds_fails_cancels_and_resumes() {
    let ft = ft_upstream().await;
    let app = TestApp::spawn_with(&[
        ("ADMIN_EMAIL", ADMIN.0),
        ("ADMIN_PASSWORD", ADMIN.1),
        ("OPENAI_API_KEY", "sk-test"),
        ("OPENAI_BASE_URL", &ft.url),
        ("LLM_MAX_RETRIES", "0"),
        ("TRAINING_POLL_MS", "50"),
        ("TRAINING_PROGRESS_POLL_MS", "50"),
        ("TRAINING_PROVIDER_POLL_MS", "50"),
        ("TRAINING_WORKERS", "2"),
        ("TRAINING_MAX_CONCURRENT_JOBS", "5"),
        ("TRAINING_LEASE_SECS", "1"),
    ])
    .await;
    let (token, admin) = trainer_user(&app, "tuner").await;
    let ds = upload(&app, &token, "", "d.jsonl", chat_rows(10).as_bytes()).await;
    let ds = ds.body["dataset_id"].as_str().unwrap().to_string();
    let start = |model: &str| json!({"dataset_id": ds, "base_model": format!("openai/{model}"), "suffix": "poems", "hyperparameters": {"n_epochs": 2, "seed": 7}});

    let ok = app
        .post(
            "/api/v1/train/start",
            Some(&token),
            start("gpt-4o-mini-2024-07-18"),
        )
        .await;
    assert_eq!(ok.status, StatusCode::ACCEPTED, "{}", ok.text);
    assert_eq!(ok.body["trainer"], "openai");
    let ok = ok.body["job_id"].as_str().unwrap().to_string();
    let bad = app
        .post("/api/v1/train/start", Some(&token), start("fail-me"))
        .await
        .body["job_id"]
        .as_str()
        .unwrap()
        .to_string();

    let done = wait_job(&app, &token, &ok, |j| {
        j["status"] == "succeeded" || j["status"] == "failed"
    })
    .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let provider_job = done["provider_job_id"].as_str().unwrap().to_string();
    let model = done["result_model"].as_str().unwrap().to_string();
    assert_eq!(
        model,
        format!("openai/ft:gpt-4o-mini-2024-07-18:muse:poems:{provider_job}")
    );
    assert_eq!(done["total_steps"], 3);
    assert!(done["metrics"]["train_loss"].as_f64().is_some(), "{done}");
    // What the provider was asked.
    let (sent_job, _, _) = ft.state.jobs.lock().unwrap()[&provider_job].clone();
    assert_eq!(sent_job["hyperparameters"], json!({"n_epochs": 2}));
    assert_eq!(sent_job["seed"], 7);
    assert_eq!(sent_job["metadata"]["muse_job_id"], ok.as_str());
    // The fine-tuned model answers through Muse.
    let r = app
        .post(
            "/v1/chat/completions",
            Some(&token),
            json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["choices"][0]["message"]["content"], "Hello, world!");

    let failed = wait_job(&app, &token, &bad, |j| j["status"] == "failed").await;
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("too few examples"),
        "{failed}"
    );

    // Cancelled at the provider.
    let slow = app
        .post("/api/v1/train/start", Some(&token), start("gpt-slow"))
        .await
        .body["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_job(&app, &token, &slow, |j| {
        j["status"] == "running" && j["provider_job_id"].is_string()
    })
    .await;
    let r = app
        .post(
            &format!("/api/v1/train/stop/{slow}"),
            Some(&token),
            json!({}),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    wait_job(&app, &token, &slow, |j| j["status"] == "cancelled").await;
    assert_eq!(
        ft.state.cancels.load(std::sync::atomic::Ordering::SeqCst),
        1
    );

    // A job whose worker died mid-run (its lease ran out, the provider job
    // exists): a live worker takes it over and polls the provider again.
    let user_id = app.get("/api/v1/auth/me", Some(&token)).await.body["id"]
        .as_str()
        .unwrap()
        .parse::<uuid::Uuid>()
        .unwrap();
    let http = reqwest::Client::new();
    let file: Value = http
        .post(format!("{}/files", ft.url))
        .bearer_auth("sk-test")
        .body(
            "--b\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n--b--\r\n",
        )
        .header("content-type", "multipart/form-data; boundary=b")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let orphan: Value = http
        .post(format!("{}/fine_tuning/jobs", ft.url))
        .bearer_auth("sk-test")
        .json(&json!({"model": "gpt-4o-mini-2024-07-18", "training_file": file["id"], "suffix": "orphan", "method": {"supervised": {"hyperparameters": {}}}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let db = muse_persistence::Database::connect(app.config.database_url.expose(), 2).unwrap();
    let repo = muse_persistence::DieselTrainingRepository::new(db);
    let mut job = muse_training::TrainingJob::new(
        user_id,
        ds.parse().unwrap(),
        "openai/gpt-4o-mini-2024-07-18".into(),
        "openai".into(),
        json!({}),
        Some("orphan".into()),
        1_000,
    );
    job.state = muse_training::JobState::Running;
    job.worker_id = Some("a-worker-that-died".into());
    job.lease_until = Some(2_000);
    job.attempts = 1;
    job.provider_job_id = Some(orphan["id"].as_str().unwrap().to_string());
    use muse_training::JobRepository;
    repo.insert_job(&job).unwrap();
    let resumed = wait_job(&app, &token, &job.id.to_string(), |j| {
        j["status"] == "succeeded" || j["status"] == "failed"
    })
    .await;
    assert_eq!(resumed["status"], "succeeded", "{resumed}");
    assert_eq!(resumed["attempts"], 2);
    assert!(resumed["result_model"]
        .as_str()
        .unwrap()
        .contains(":orphan:"));
    let log = app
        .get(&format!("/api/v1/train/logs/{}", job.id), Some(&token))
        .await;
    assert!(log.text.contains("resuming"), "{}", log.text);
    let stats = app.get("/api/v1/admin/stats", Some(&admin)).await;
    assert_eq!(
        stats.body["training_jobs"],
        json!({"succeeded": 2, "failed": 1, "cancelled": 1}),
        "{}",
        stats.text
    );
}

#[actix_web::test]
async fn the_plan_caps_unfinished_jobs() {
    let app = TestApp::spawn_with(&[
        ("ADMIN_EMAIL", ADMIN.0),
        ("ADMIN_PASSWORD", ADMIN.1),
        ("TRAINING_EXTERNAL_COMMAND", "true"),
        // No worker: jobs stay queued.
        ("TRAINING_WORKERS", "0"),
        ("TRAINING_MAX_CONCURRENT_JOBS", "10"),
    ])
    .await;
    let (token, admin) = trainer_user(&app, "solo").await;
    let plan = json!({"name": "Solo", "price_cents": 500, "training_allowed": true, "max_training_jobs": 1});
    let r = app
        .call(
            reqwest::Method::PUT,
            "/api/v1/admin/plans/solo",
            Some(&admin),
            Some(plan),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["max_training_jobs"], 1);
    let r = app
        .call(
            reqwest::Method::PUT,
            "/api/v1/admin/plans/solo",
            Some(&admin),
            Some(json!({"name": "Solo", "price_cents": 500, "max_training_jobs": 101})),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let me = app.get("/api/v1/auth/me", Some(&token)).await.body["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = app
        .post(
            &format!("/api/v1/admin/users/{me}/plan"),
            Some(&admin),
            json!({"plan_id": "solo"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let ds = upload(&app, &token, "", "d.jsonl", chat_rows(10).as_bytes()).await;
    let ds = ds.body["dataset_id"].as_str().unwrap().to_string();
    let start = json!({"dataset_id": ds, "base_model": "local/x"});
    let r = app
        .post("/api/v1/train/start", Some(&token), start.clone())
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    let r = app.post("/api/v1/train/start", Some(&token), start).await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::TOO_MANY_REQUESTS, "too_many_jobs")
    );
    assert_eq!(
        r.body["error"]["details"],
        json!({"plan": "solo", "limit": 1})
    );
}

/// Two replicas on one database and one Redis: a job trained on `a` is
/// seen on a WebSocket open on `b` as it progresses, announced over Redis
/// (`muse:jobs`), though `b` polls only once a minute here.
#[actix_web::test]
async fn progress_reaches_another_replica_over_redis_without_polling() {
    let Ok(redis) = std::env::var("TEST_REDIS_URL") else {
        eprintln!("skipping: TEST_REDIS_URL is not set");
        return;
    };
    let dir = std::env::temp_dir().join(format!("muse-progress-{}", uuid::Uuid::new_v4().simple()));
    let slow = fake_program(&dir, "slow.py", SLOW);
    let command = format!("python3 {slow}");
    let a = TestApp::spawn_with(&[
        ("ADMIN_EMAIL", ADMIN.0),
        ("ADMIN_PASSWORD", ADMIN.1),
        ("REDIS_URL", redis.as_str()),
        ("TRAINING_EXTERNAL_COMMAND", command.as_str()),
        ("TRAINING_WORKERS", "1"),
        ("TRAINING_POLL_MS", "50"),
        ("TRAINING_PROGRESS_POLL_MS", "60000"),
    ])
    .await;
    let url = a.config.database_url.expose().to_string();
    let data = a.data_dir.display().to_string();
    let b = TestApp::spawn_with(&[
        ("ADMIN_EMAIL", ADMIN.0),
        ("ADMIN_PASSWORD", ADMIN.1),
        ("REDIS_URL", redis.as_str()),
        ("DATABASE_URL", url.as_str()),
        ("MUSE_DATA_DIR", data.as_str()),
        ("TRAINING_EXTERNAL_COMMAND", command.as_str()),
        ("TRAINING_WORKERS", "0"),
        ("TRAINING_PROGRESS_POLL_MS", "60000"),
    ])
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let (token, _) = trainer_user(&a, "spread").await;
    let ds = upload(&a, &token, "", "d.jsonl", chat_rows(10).as_bytes()).await;
    assert_eq!(ds.status, StatusCode::CREATED, "{}", ds.text);
    let ds = ds.body["dataset_id"].as_str().unwrap().to_string();
    let mut ws = crate::websocket::connect(&b, &token).await;
    assert_eq!(recv(&mut ws).await["type"], "ready");
    let started = std::time::Instant::now();
    let r = a
        .post(
            "/api/v1/train/start",
            Some(&token),
            json!({"dataset_id": ds, "base_model": "slow"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    let job = r.body["job_id"].as_str().unwrap().to_string();
    // Progress frames on b, with steps growing, long before b would poll.
    // Each frame's age: from the worker's write (`updated_at`, on a's
    // clock, the same machine's) to its arrival on b.
    let (mut steps, mut ages_ms) = (Vec::new(), Vec::new());
    while steps.len() < 5 {
        let m = recv(&mut ws).await;
        if m["type"] == "training.progress" && m["job_id"] == job.as_str() {
            if let Some(s) = m["step"].as_u64() {
                steps.push(s);
                let written =
                    chrono::DateTime::parse_from_rfc3339(m["updated_at"].as_str().unwrap())
                        .unwrap()
                        .timestamp_millis();
                ages_ms.push(chrono::Utc::now().timestamp_millis() - written);
            }
        }
    }
    let elapsed = started.elapsed();
    ages_ms.sort_unstable();
    eprintln!(
        "5 progress frames on the other replica {elapsed:?} after the start: steps {steps:?}; write-to-frame latency {ages_ms:?} ms"
    );
    assert!(elapsed < std::time::Duration::from_secs(20), "{elapsed:?}");
    assert!(
        steps.windows(2).all(|w| w[0] <= w[1]) && steps.last() > steps.first(),
        "{steps:?}"
    );
    let _ = a
        .post(
            &format!("/api/v1/train/stop/{job}"),
            Some(&token),
            json!({}),
        )
        .await;
    let _ = std::fs::remove_dir_all(&dir);
}
