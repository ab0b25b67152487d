use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::*;

const COMPAT: [(&str, &str); 4] = [
    ("OPENAI_COMPATIBLE_BASE_URL", "http://127.0.0.1:9/v1"),
    ("OPENAI_COMPATIBLE_NAME", "ollama"),
    ("OPENAI_COMPATIBLE_MODELS", "llama3.2,qwen2.5"),
    ("ANTHROPIC_API_KEY", "sk-ant-test-never-shown"),
];

#[actix_web::test]
async fn the_registry_lists_configured_models_with_prices() {
    let app = TestApp::spawn_with(&COMPAT).await;
    let token = access(&app.user("mia").await);
    assert_eq!(
        app.get("/api/v1/ai/models", None).await.status,
        StatusCode::UNAUTHORIZED
    );
    let r = app.get("/api/v1/ai/models", Some(&token)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let keys: Vec<&str> = r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["key"].as_str().unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            "anthropic/claude-3-5-haiku-latest",
            "anthropic/claude-3-5-sonnet-latest",
            "ollama/llama3.2",
            "ollama/qwen2.5"
        ]
    );
    let haiku = &r.body["items"][0];
    assert_eq!(
        haiku["price"],
        json!({"input_per_million": 0.8, "output_per_million": 4.0})
    );
    assert_eq!(
        (
            haiku["kind"].as_str(),
            haiku["loaded"].as_bool(),
            haiku["context_length"].as_u64()
        ),
        (Some("remote"), Some(true), Some(200000))
    );
    assert!(
        r.body["items"][2]["price"].is_null(),
        "unknown price is absent, not 0"
    );
    assert!(!r.text.contains("sk-ant-test-never-shown"));

    let health = app.get("/health", None).await;
    let providers = &health.body["checks"]["providers"];
    assert_eq!(providers["anthropic"], json!({"status": "configured"}));
    assert_eq!(providers["ollama"], json!({"status": "configured"}));
    let local = providers["local"]["status"].as_str().unwrap();
    let reason = providers["local"]["reason"].as_str().unwrap_or_default();
    assert!(
        local == "available" || (local == "unavailable" && reason.contains("ORT_DYLIB_PATH")),
        "{providers}"
    );
    assert_eq!(health.body["checks"]["loaded_models"], json!([]));
    assert!(!health.text.contains("sk-ant"));
}

#[actix_web::test]
async fn load_and_unload_are_admin_only_and_explain_remote_models() {
    let app = TestApp::spawn_with(&[
        COMPAT[0],
        COMPAT[1],
        COMPAT[2],
        ("ADMIN_EMAIL", "root@example.com"),
        ("ADMIN_PASSWORD", "an admin passphrase"),
    ])
    .await;
    let user = access(&app.user("noa").await);
    let admin = root_token(&app).await;
    let r = app
        .post(
            "/api/v1/ai/models/ollama/llama3.2/load",
            Some(&user),
            json!({}),
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::FORBIDDEN, "forbidden")
    );
    for action in ["load", "unload"] {
        let r = app
            .post(
                &format!("/api/v1/ai/models/ollama/llama3.2/{action}"),
                Some(&admin),
                json!({}),
            )
            .await;
        assert_eq!(
            (r.status, r.error_code()),
            (StatusCode::CONFLICT, "model_not_loadable"),
            "{action}"
        );
        let r = app
            .post(
                &format!("/api/v1/ai/models/nope/nothing/{action}"),
                Some(&admin),
                json!({}),
            )
            .await;
        assert_eq!(
            (r.status, r.error_code()),
            (StatusCode::NOT_FOUND, "model_not_found"),
            "{action}"
        );
    }
}

#[actix_web::test]
async fn no_providers_means_an_empty_registry() {
    let app = TestApp::spawn().await;
    let token = access(&app.user("ora").await);
    let r = app.get("/api/v1/ai/models", Some(&token)).await;
    assert_eq!(r.body, json!({"items": []}));
}

pub(crate) fn test_models() -> Option<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-models/hub");
    let ready = std::env::var_os("ORT_DYLIB_PATH").is_some()
        && dir.join("models--muse-test--tiny-gpt2").is_dir();
    if !ready {
        assert!(
            std::env::var("MUSE_REQUIRE_LOCAL_MODELS").as_deref() != Ok("1"),
            "local-model tests required but ORT_DYLIB_PATH or the test models are missing"
        );
        return None;
    }
    Some(dir.canonicalize().unwrap().to_string_lossy().into_owned())
}

#[actix_web::test]
async fn local_models_are_listed_loaded_reported_and_unloaded() {
    let Some(cache) = test_models() else { return };
    let app = TestApp::spawn_with(&[
        ("MODEL_CACHE_DIR", &cache),
        ("ADMIN_EMAIL", "root@example.com"),
        ("ADMIN_PASSWORD", "an admin passphrase"),
    ])
    .await;
    let admin = root_token(&app).await;
    let list = app.get("/api/v1/ai/models", Some(&admin)).await;
    let gpt2 = list.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["key"] == "local/muse-test/tiny-gpt2")
        .cloned()
        .unwrap();
    assert_eq!(
        (gpt2["kind"].as_str(), gpt2["loaded"].as_bool()),
        (Some("local"), Some(false))
    );
    assert_eq!(
        gpt2["price"],
        json!({"input_per_million": 0.0, "output_per_million": 0.0})
    );

    let r = app
        .post(
            "/api/v1/ai/models/local/muse-test/tiny-gpt2/load",
            Some(&admin),
            json!({}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["loaded"], true);
    assert!(r.body["memory_bytes"].as_u64().unwrap() > 100_000);
    assert_eq!(r.body["context_length"], 1024);
    let health = app.get("/health", None).await;
    assert_eq!(
        health.body["checks"]["providers"]["local"]["status"],
        "available"
    );
    assert_eq!(
        health.body["checks"]["loaded_models"][0]["key"],
        "local/muse-test/tiny-gpt2"
    );

    let r = app
        .post(
            "/api/v1/ai/models/local/muse-test/tiny-gpt2/unload",
            Some(&admin),
            json!({}),
        )
        .await;
    assert_eq!(
        (r.status, &r.body["was_loaded"]),
        (StatusCode::OK, &json!(true))
    );
    let r = app
        .post(
            "/api/v1/ai/models/local/muse-test/tiny-gpt2/unload",
            Some(&admin),
            json!({}),
        )
        .await;
    assert_eq!(r.body["was_loaded"], false);
    assert_eq!(
        app.get("/health", None).await.body["checks"]["loaded_models"],
        json!([])
    );
    // Loads and unloads are audited, with the admin who made them.
    for event in ["model.loaded", "model.unloaded"] {
        let audit = app
            .get(&format!("/api/v1/admin/audit?event={event}"), Some(&admin))
            .await;
        let items = audit.body["items"].as_array().unwrap();
        assert!(
            items.iter().any(
                |e| e["subject"] == "local/muse-test/tiny-gpt2" && e["detail"]["by"] == "admin"
            ),
            "{event}: {}",
            audit.text
        );
    }
}

/// A generated local ONNX model behind every generation path: an expert
/// prompt executed whole, over SSE and over the WebSocket, recorded with a
/// cost of 0 (local models are free).
#[actix_web::test]
async fn a_local_model_serves_prompt_executions_over_http_sse_and_websocket() {
    let Some(cache) = test_models() else { return };
    let app = TestApp::spawn_with(&[("MODEL_CACHE_DIR", &cache)]).await;
    let token = access(&app.user("localuser").await);
    let spec = app
        .post(
            "/api/v1/specialties",
            Some(&token),
            json!({"name": "Stories"}),
        )
        .await;
    let sub = app
        .post(
            "/api/v1/sub-specialties",
            Some(&token),
            json!({"specialty_id": spec.body["id"], "name": "Openings"}),
        )
        .await;
    let prompt = app
        .post(
            "/api/v1/expert-prompts",
            Some(&token),
            json!({"sub_specialty_id": sub.body["id"], "title": "Continue", "template": "{start}",
                   "variables_schema": {"type": "object", "properties": {"start": {"type": "string", "default": "Once upon a time"}}}}),
        )
        .await;
    let pid = prompt.body["id"].as_str().unwrap().to_string();
    let body = json!({"variables": {}, "llm_provider": "local", "llm_model": "muse-test/tiny-gpt2", "max_tokens": 12, "temperature": 0});
    let whole = app
        .post(
            &format!("/api/v1/execute-prompt/{pid}"),
            Some(&token),
            body.clone(),
        )
        .await;
    assert_eq!(whole.status, StatusCode::OK, "{}", whole.text);
    assert_eq!(whole.body["tokens_used"]["completion"], 12);
    assert_eq!(whole.body["cost"], 0.0);
    let text = whole.body["output"].as_str().unwrap().to_string();

    let res = app
        .client
        .post(format!("{}/api/v1/execute-prompt/{pid}/stream", app.base))
        .bearer_auth(&token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let events = crate::upstream::sse_events(&res.text().await.unwrap());
    let streamed: String = events
        .iter()
        .filter(|e| e.0 == "token")
        .map(|e| e.1["text"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, text, "greedy: the same text streamed");
    assert_eq!(events.last().unwrap().1["usage"]["completion_tokens"], 12);

    let mut ws = crate::websocket::connect(&app, &token).await;
    assert_eq!(crate::websocket::recv(&mut ws).await["type"], "ready");
    let mut msg = body.clone();
    msg["type"] = json!("execute");
    msg["id"] = json!("local-1");
    msg["prompt_id"] = json!(pid);
    crate::websocket::send(&mut ws, msg).await;
    let msgs = crate::websocket::until(&mut ws, "local-1", &["done", "error"]).await;
    let done = msgs.last().unwrap();
    assert_eq!(done["type"], "done", "{done}");
    let over_ws: String = msgs
        .iter()
        .filter(|m| m["type"] == "token")
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(over_ws, text);
    let h = app
        .get(
            "/api/v1/executions/history?provider=local&status=succeeded",
            Some(&token),
        )
        .await;
    assert_eq!(h.body["total"], 3, "{}", h.text);
}
