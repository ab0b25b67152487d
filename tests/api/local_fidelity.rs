//! Local models answer through the OpenAI API exactly as `transformers`
//! plus a plain onnxruntime loop would: the chat is rendered by the
//! model's own template (Llama-2-chat's in tokenizer_config.json for the
//! tiny Llama, ChatML in chat_template.jinja for the tiny GPT-2), a raw
//! prompt is tokenized by the tokenizer's own rule, and greedy decoding
//! gives the tokens of `scripts/reference_generate.py` — whole and
//! streamed, with the same usage.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::*;
use crate::models::test_models;

fn reference(cache: &str, repo: &str, how: (&str, &str), n: usize) -> Value {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let model = format!("{cache}/models--{}", repo.replace('/', "--"));
    let out = std::process::Command::new(root.join(".venv/bin/python"))
        .arg(root.join("scripts/reference_generate.py"))
        .args([
            "--model",
            &model,
            how.0,
            how.1,
            "--max-new-tokens",
            &n.to_string(),
        ])
        .output()
        .expect("run the reference loop");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The text and usage of an SSE answer (`chat.completion.chunk` or
/// `text_completion`).
async fn read_stream(res: reqwest::Response) -> (String, Value, Value) {
    assert_eq!(res.status(), StatusCode::OK);
    let body = res.text().await.unwrap();
    let (mut text, mut usage, mut finish) = (String::new(), Value::Null, Value::Null);
    for line in body.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        assert!(v.get("error").is_none(), "{v}");
        if !v["usage"].is_null() {
            usage = v["usage"].clone();
        }
        for c in v["choices"].as_array().unwrap() {
            let piece = c["delta"]["content"]
                .as_str()
                .or(c["text"].as_str())
                .unwrap_or("");
            text.push_str(piece);
            if !c["finish_reason"].is_null() {
                finish = c["finish_reason"].clone();
            }
        }
    }
    (text, usage, finish)
}

fn usage_of(r: &Value) -> (u64, u64) {
    (
        r["prompt_ids"].as_array().unwrap().len() as u64,
        r["output_ids"].as_array().unwrap().len() as u64,
    )
}

#[actix_web::test]
async fn chat_and_text_completions_equal_the_transformers_reference_token_for_token() {
    let Some(cache) = test_models() else { return };
    let app = TestApp::spawn_with(&[("MODEL_CACHE_DIR", &cache)]).await;
    let token = access(&app.user("ada").await);
    const N: usize = 20;

    let messages = json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Tell me a story about a cat. "}]);
    for repo in ["muse-test/tiny-llama", "muse-test/tiny-gpt2"] {
        let key = format!("local/{repo}");
        // Chat: the model's template, rendered as transformers does.
        let want = reference(&cache, repo, ("--chat", &messages.to_string()), N);
        let (prompt_tokens, completion_tokens) = usage_of(&want);
        let r = app
            .post(
                "/v1/chat/completions",
                Some(&token),
                json!({"model": key, "messages": messages, "temperature": 0, "max_tokens": N}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(
            r.body["choices"][0]["message"]["content"], want["text"],
            "{repo} chat"
        );
        assert_eq!(
            (
                r.body["usage"]["prompt_tokens"].as_u64(),
                r.body["usage"]["completion_tokens"].as_u64()
            ),
            (Some(prompt_tokens), Some(completion_tokens)),
            "{repo} chat usage"
        );
        assert_eq!(r.body["choices"][0]["finish_reason"], "length");
        let res = app
            .client
            .post(format!("{}/v1/chat/completions", app.base))
            .bearer_auth(&token)
            .json(&json!({"model": key, "messages": messages, "temperature": 0, "max_tokens": N, "stream": true, "stream_options": {"include_usage": true}}))
            .send()
            .await
            .unwrap();
        let (text, usage, finish) = read_stream(res).await;
        assert_eq!(text, want["text"].as_str().unwrap(), "{repo} streamed chat");
        assert_eq!(
            (
                usage["prompt_tokens"].as_u64(),
                usage["completion_tokens"].as_u64(),
                finish.as_str()
            ),
            (Some(prompt_tokens), Some(completion_tokens), Some("length"))
        );

        // Raw text completion: the tokenizer's own rule (the Llama one adds
        // BOS, the GPT-2 one nothing), no template.
        let prompt = "Once upon a time";
        let want = reference(&cache, repo, ("--prompt", prompt), N);
        let (prompt_tokens, completion_tokens) = usage_of(&want);
        let r = app
            .post(
                "/v1/completions",
                Some(&token),
                json!({"model": key, "prompt": prompt, "temperature": 0, "max_tokens": N}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body["object"], "text_completion");
        assert_eq!(
            r.body["choices"][0]["text"], want["text"],
            "{repo} completion"
        );
        assert_eq!(
            (
                r.body["usage"]["prompt_tokens"].as_u64(),
                r.body["usage"]["completion_tokens"].as_u64()
            ),
            (Some(prompt_tokens), Some(completion_tokens)),
            "{repo} completion usage"
        );
        let res = app
            .client
            .post(format!("{}/v1/completions", app.base))
            .bearer_auth(&token)
            .json(&json!({"model": key, "prompt": prompt, "temperature": 0, "max_tokens": N, "stream": true, "stream_options": {"include_usage": true}}))
            .send()
            .await
            .unwrap();
        let (text, usage, _) = read_stream(res).await;
        assert_eq!(
            text,
            want["text"].as_str().unwrap(),
            "{repo} streamed completion"
        );
        assert_eq!(usage["prompt_tokens"].as_u64(), Some(prompt_tokens));
    }

    // Both are recorded like any call.
    let h = app
        .get("/api/v1/executions/history?per_page=50", Some(&token))
        .await;
    assert_eq!(h.body["items"].as_array().unwrap().len(), 8, "{}", h.text);
    assert!(h.text.contains("Once upon a time"));
}

#[actix_web::test]
async fn template_refusals_are_the_callers_and_unsupported_fields_are_named() {
    let Some(cache) = test_models() else { return };
    let app = TestApp::spawn_with(&[("MODEL_CACHE_DIR", &cache)]).await;
    let token = access(&app.user("bob").await);
    // Llama-2-chat's template refuses two user turns in a row.
    let r = app
        .post(
            "/v1/chat/completions",
            Some(&token),
            json!({"model": "local/muse-test/tiny-llama", "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    assert_eq!(r.error_code(), "invalid_model_request");
    assert!(r.text.contains("roles must alternate"), "{}", r.text);

    for (field, value) in [
        ("echo", json!(true)),
        ("logprobs", json!(2)),
        ("n", json!(2)),
        ("suffix", json!("x")),
    ] {
        let mut body = json!({"model": "local/muse-test/tiny-gpt2", "prompt": "x"});
        body[field] = value;
        let r = app.post("/v1/completions", Some(&token), body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{field}: {}", r.text);
        assert_eq!(r.error_code(), "unsupported_parameter");
        assert_eq!(r.body["error"]["param"], field, "OpenAI's error shape");
    }
    // Several prompts: one choice each, in order.
    let r = app
        .post(
            "/v1/completions",
            Some(&token),
            json!({"model": "local/muse-test/tiny-gpt2", "prompt": ["Once", "upon"], "max_tokens": 3, "temperature": 0}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let choices = r.body["choices"].as_array().unwrap();
    assert_eq!((choices.len(), choices[1]["index"].as_u64()), (2, Some(1)));
    assert_eq!(r.body["usage"]["completion_tokens"], 6);
}

#[actix_web::test]
async fn unservable_cache_entries_are_listed_with_the_reason_and_errors_hide_paths() {
    let Some(cache) = test_models() else { return };
    // A cache with the test models and a repo holding only PyTorch weights.
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&cache).unwrap() {
        let entry = entry.unwrap();
        std::os::unix::fs::symlink(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let repo = dir.path().join("models--some-org--torch-only");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(repo.join("snapshots/abc")).unwrap();
    std::fs::write(repo.join("refs/main"), "abc").unwrap();
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::write(repo.join("snapshots/abc").join(f), "{}").unwrap();
    }
    let cache_dir = dir.path().to_string_lossy().into_owned();
    let app = TestApp::spawn_with(&[("MODEL_CACHE_DIR", &cache_dir)]).await;
    let token = access(&app.user("cyd").await);
    let list = app.get("/api/v1/ai/models", Some(&token)).await;
    let items = list.body["items"].as_array().unwrap();
    let torch = items
        .iter()
        .find(|m| m["key"] == "local/some-org/torch-only")
        .unwrap();
    assert!(
        torch["unavailable_reason"]
            .as_str()
            .unwrap()
            .contains("no ONNX export"),
        "{torch}"
    );
    let gpt2 = items
        .iter()
        .find(|m| m["key"] == "local/muse-test/tiny-gpt2")
        .unwrap();
    assert!(gpt2.get("unavailable_reason").is_none(), "{gpt2}");

    let r = app
        .post(
            "/v1/chat/completions",
            Some(&token),
            json!({"model": "local/some-org/torch-only", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text);
    assert_eq!(r.error_code(), "model_unavailable");
    assert!(r.text.contains("some-org/torch-only"), "{}", r.text);
    assert!(!r.text.contains(&cache_dir), "no server path: {}", r.text);
}
