//! The OpenAI-compatible API, driven by an OpenAI SDK (async-openai) as a
//! real client would, with a local OpenAI-protocol server as the upstream.

use std::time::Duration;

use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessage, ChatCompletionStreamOptions, CreateChatCompletionRequest,
};
use async_openai::Client;
use futures_util::StreamExt;
use muse_prompts::{ExecutionRepository, ExecutionStatus};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::*;

#[actix_web::test]
async fn an_openai_sdk_works_against_muse_and_every_call_is_recorded() {
    let up = crate::upstream::upstream().await;
    let app = TestApp::spawn_with(&[
        ("OPENAI_COMPATIBLE_BASE_URL", &up.url),
        ("OPENAI_COMPATIBLE_NAME", "upstream"),
        ("OPENAI_COMPATIBLE_MODELS", "ok,broken"),
        ("LLM_MAX_RETRIES", "0"),
        ("ADMIN_EMAIL", "root@example.com"),
        ("ADMIN_PASSWORD", "an admin passphrase"),
    ])
    .await;
    let token = access(&app.user("sdk").await);
    let key = app
        .post(
            "/api/v1/auth/api-keys",
            Some(&token),
            json!({"name": "sdk"}),
        )
        .await
        .body["key"]
        .as_str()
        .unwrap()
        .to_string();

    let models = app.get("/v1/models", Some(&key)).await;
    assert_eq!(models.body["object"], "list");
    assert!(models.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["id"] == "upstream/ok" && m["owned_by"] == "upstream"));

    let client = Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!("{}/v1", app.base))
            .with_api_key(key.clone()),
    );
    let request = CreateChatCompletionRequest {
        model: "upstream/ok".into(),
        messages: vec![ChatCompletionRequestUserMessage::from("Say hello").into()],
        ..Default::default()
    };
    let answer = client.chat().create(request.clone()).await.unwrap();
    assert_eq!(
        answer.choices[0].message.content.as_deref(),
        Some("Hello, world!")
    );
    assert_eq!(answer.usage.as_ref().unwrap().total_tokens, 16);
    assert_eq!(answer.model, "upstream/ok");

    let mut streamed = request.clone();
    // The workspace builds async-openai with `byot` (muse-training), and
    // then `create_stream` sends the request as it is: ask for a stream.
    streamed.stream = Some(true);
    streamed.stream_options = Some(ChatCompletionStreamOptions {
        include_usage: Some(true),
        include_obfuscation: None,
    });
    let mut stream = client.chat().create_stream(streamed).await.unwrap();
    let (mut text, mut usage, mut finish) = (String::new(), None, None);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        for c in chunk.choices {
            text.push_str(c.delta.content.as_deref().unwrap_or_default());
            if c.finish_reason.is_some() {
                finish = c.finish_reason;
            }
        }
        if chunk.usage.is_some() {
            usage = chunk.usage;
        }
    }
    assert_eq!(text, "Hello, world!");
    assert!(finish.is_some());
    assert_eq!(usage.unwrap().completion_tokens, 4);

    // Errors come back in a shape the SDK understands.
    let mut broken = request.clone();
    broken.model = "upstream/broken".into();
    let err = client.chat().create(broken).await.unwrap_err();
    assert!(
        err.to_string().contains("boom") || err.to_string().contains("502"),
        "{err}"
    );
    let mut unknown = request.clone();
    unknown.model = "nope/nothing".into();
    match client.chat().create(unknown).await.unwrap_err() {
        async_openai::error::OpenAIError::ApiError(api) => {
            assert_eq!(api.status_code.as_u16(), 404)
        }
        other => panic!("{other:?}"),
    }

    // Every call was recorded for this user, failures included.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let db = muse_persistence::Database::connect(app.config.database_url.expose(), 1).unwrap();
    let auth = muse_persistence::DieselAuthRepository::new(db.clone());
    use muse_auth::AuthRepository;
    let me = auth.user_by_email("sdk@example.com").unwrap().unwrap();
    let execs = muse_persistence::DieselExecutionRepository::new(db)
        .list(
            muse_prompts::ExecutionScope::User(me.id),
            &muse_prompts::ExecutionFilter::default(),
            muse_core::PageRequest::default(),
        )
        .unwrap();
    // (The SDK itself retries a 502 a few times: each attempt is a call.)
    let ok: Vec<_> = execs
        .items
        .iter()
        .filter(|e| e.status == ExecutionStatus::Succeeded)
        .collect();
    assert_eq!(ok.len(), 2, "{:?}", execs.items);
    assert!(ok
        .iter()
        .all(|e| e.output.as_deref() == Some("Hello, world!")
            && e.prompt_tokens == 12
            && e.completion_tokens == 4
            && e.provider == "upstream"));
    assert!(
        ok.iter().all(|e| e.cost_usd.is_none()),
        "unknown price stays unknown"
    );
    let failed: Vec<_> = execs
        .items
        .iter()
        .filter(|e| e.status == ExecutionStatus::Failed)
        .collect();
    assert!(
        failed
            .iter()
            .any(|e| e.model == "broken" && e.error.as_deref().is_some_and(|m| m.contains("boom"))),
        "{failed:?}"
    );
    assert!(
        failed.iter().any(|e| e.provider == "nope"
            && e.error
                .as_deref()
                .is_some_and(|m| m.contains("not in the model registry"))),
        "{failed:?}"
    );
    assert_eq!(ok.len() + failed.len(), execs.items.len());

    // The same history over HTTP, filtered and paginated, own only.
    let h = app
        .get(
            "/api/v1/executions/history?status=succeeded&per_page=1",
            Some(&token),
        )
        .await;
    assert_eq!(h.status, StatusCode::OK, "{}", h.text);
    assert_eq!(
        (
            h.body["total"].as_u64(),
            h.body["items"].as_array().unwrap().len()
        ),
        (Some(2), 1)
    );
    let item = &h.body["items"][0];
    assert_eq!(
        (
            item["llm_provider"].as_str(),
            item["llm_model"].as_str(),
            item["output"].as_str()
        ),
        (Some("upstream"), Some("ok"), Some("Hello, world!"))
    );
    assert_eq!(item["source"], "openai_api");
    let id = item["execution_id"].as_str().unwrap();
    let one = app
        .get(&format!("/api/v1/executions/{id}"), Some(&token))
        .await;
    assert_eq!(
        (one.status, one.body["completion_tokens"].as_u64()),
        (StatusCode::OK, Some(4))
    );
    let metrics = app
        .client
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"prompt_executions_total{source="openai_api",provider="upstream",model="ok",status="succeeded"} 2"#),
        "{metrics}"
    );
    assert!(metrics.contains("prompt_execution_duration_seconds_bucket{"));
    assert!(metrics
        .contains(r#"llm_tokens_used_total{provider="upstream",model="ok",kind="completion"} 8"#));
    // (A gauge shared with the tests running beside this one: present, value not asserted.)
    assert!(metrics.contains("\nactive_executions "), "{metrics}");
    let admin = root_token(&app).await;
    let all = app
        .get("/api/v1/executions/history?status=succeeded", Some(&admin))
        .await;
    assert_eq!(
        all.body["total"], 2,
        "administrators see everyone's executions"
    );
    assert_eq!(
        app.get(&format!("/api/v1/executions/{id}"), Some(&admin))
            .await
            .status,
        StatusCode::OK
    );
    let other = access(&app.user("someone").await);
    assert_eq!(
        app.get(&format!("/api/v1/executions/{id}"), Some(&other))
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        app.get("/api/v1/executions/history", Some(&other))
            .await
            .body["total"],
        0
    );
    let h = app
        .get(
            "/api/v1/executions/history?model=broken&from=2000-01-01T00:00:00Z",
            Some(&token),
        )
        .await;
    assert!(h.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["status"] == "failed" && e["llm_model"] == "broken"));
    for bad in [
        "status=weird",
        "from=yesterday",
        "prompt_id=not-a-uuid",
        "page=-1",
    ] {
        let r = app
            .get(&format!("/api/v1/executions/history?{bad}"), Some(&token))
            .await;
        assert_eq!(
            (r.status, r.error_code()),
            (StatusCode::BAD_REQUEST, "invalid_query_parameter"),
            "{bad}"
        );
    }
}

#[actix_web::test]
async fn bad_openai_requests_are_4xx_in_the_error_shape() {
    let up = crate::upstream::upstream().await;
    let app = TestApp::spawn_with(&[
        ("OPENAI_COMPATIBLE_BASE_URL", &up.url),
        ("OPENAI_COMPATIBLE_MODELS", "ok"),
    ])
    .await;
    let token = access(&app.user("bad").await);
    let r = app
        .post(
            "/v1/chat/completions",
            None,
            json!({"model": "compatible/ok", "messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.body["error"]["type"], "authentication_error",
        "{}",
        r.text
    );
    // OpenAI's error shape on /v1: validation is 400 with the field in `param`.
    for (body, code, param) in [
        (
            json!({"model": "compatible/ok", "messages": []}),
            "validation_failed",
            "messages",
        ),
        (
            json!({"model": "compatible/ok", "messages": [{"role": "function", "content": "x"}]}),
            "unsupported_parameter",
            "messages[0].role",
        ),
        (
            json!({"model": "compatible/ok", "messages": [{"role": "tool", "content": "x"}]}),
            "validation_failed",
            "messages[0].tool_call_id",
        ),
        (
            json!({"model": "compatible/ok", "messages": [{"role": "robot", "content": "x"}]}),
            "validation_failed",
            "messages[0].role",
        ),
        (
            json!({"model": "compatible/ok", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]}),
            "unsupported_parameter",
            "messages[0].content[0]",
        ),
        (
            json!({"model": "compatible/ok", "messages": [{"role": "user", "content": "x", "name": "ann"}]}),
            "unsupported_parameter",
            "messages[0].name",
        ),
        (
            json!({"model": "compatible/ok", "messages": [{"role": "user", "content": "x"}], "temperature": 5}),
            "validation_failed",
            "temperature",
        ),
        (
            json!({"model": "compatible/ok", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}),
            "validation_failed",
            "max_tokens",
        ),
        (
            json!({"model": "compatible/ok", "messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}),
            "validation_failed",
            "stop",
        ),
        (
            json!({"model": "compatible/ok", "messages": [{"role": "user", "content": "x"}], "presence_penalty": 3}),
            "validation_failed",
            "presence_penalty",
        ),
        // Never dropped silently: what is not served is refused by name.
        (
            json!({"model": "compatible/ok", "messages": [{"role": "user", "content": "x"}], "functions": [{"name": "f"}]}),
            "unsupported_parameter",
            "functions",
        ),
        (
            json!({"model": "compatible/ok", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "a b"}}]}),
            "validation_failed",
            "tools[0].function.name",
        ),
        (
            json!({"model": "compatible/ok", "messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}),
            "validation_failed",
            "tool_choice",
        ),
        (
            json!({"model": "compatible/ok", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}),
            "validation_failed",
            "response_format.type",
        ),
        (
            json!({"model": "compatible/ok", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 12}}}}),
            "validation_failed",
            "response_format.json_schema.schema",
        ),
        (
            json!({"model": "compatible/ok", "messages": [{"role": "user", "content": "x"}], "n": 9}),
            "validation_failed",
            "n",
        ),
        (
            json!({"model": "compatible/ok", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}),
            "validation_failed",
            "top_logprobs",
        ),
        (
            json!({"model": "compatible/ok", "messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 21}),
            "validation_failed",
            "top_logprobs",
        ),
        (
            json!({"model": "compatible/ok", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"eos": -100}}),
            "validation_failed",
            "logit_bias",
        ),
        (
            json!({"model": "compatible/ok", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"50256": -101}}),
            "validation_failed",
            "logit_bias",
        ),
        (
            json!({"model": "compatible/ok", "messages": [{"role": "user", "content": "x"}], "temprature": 0.2}),
            "unsupported_parameter",
            "temprature",
        ),
    ] {
        let r = app
            .post("/v1/chat/completions", Some(&token), body.clone())
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.text);
        assert_eq!(
            (
                r.body["error"]["code"].as_str(),
                r.body["error"]["param"].as_str(),
                r.body["error"]["type"].as_str()
            ),
            (Some(code), Some(param), Some("invalid_request_error")),
            "{body}: {}",
            r.text
        );
        assert!(r.body["error"]["message"].is_string());
    }
    // Fields that mean "off", and those ignored by rule, are accepted.
    let r = app
        .post(
            "/v1/chat/completions",
            Some(&token),
            json!({"model": "compatible/ok", "messages": [{"role": "user", "content": "x"}], "n": 1, "tools": [], "logprobs": false,
                   "presence_penalty": 0, "response_format": {"type": "text"}, "user": "u-1", "metadata": {"a": "b"}, "store": false}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = app
        .post(
            "/v1/chat/completions",
            Some(&token),
            json!({"model": "compatible/ok"}),
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::BAD_REQUEST, "invalid_body")
    );
    // Models by key (slashes plain or encoded), bare name; unknown ones are 404.
    for path in [
        "/v1/models/compatible/ok",
        "/v1/models/compatible%2Fok",
        "/v1/models/ok",
    ] {
        let r = app.get(path, Some(&token)).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text);
        assert_eq!(r.body["object"], "model");
        assert_eq!(r.body["owned_by"], "compatible");
        assert!(r.body["created"].as_i64().unwrap() > 1_700_000_000);
    }
    let r = app.get("/v1/models/nope/nothing", Some(&token)).await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::NOT_FOUND, "model_not_found")
    );
    assert_eq!(r.body["error"]["type"], "invalid_request_error");
    // Content as text parts works; a bare model name resolves.
    let r = app.post("/v1/chat/completions", Some(&token), json!({"model": "ok", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["model"], "compatible/ok");
    assert!(r.headers.get("x-muse-execution-id").is_some());
}

#[actix_web::test]
async fn text_parts_penalties_and_aliases_reach_the_upstream() {
    let (app, up) = crate::upstream::app_with_upstream(&[("MODEL_ALIASES", "quick=up/echo")]).await;
    let token = access(&app.user("par").await);
    // Text parts are joined with "\n", as OpenAI-compatible servers do.
    let r = app
        .post(
            "/v1/chat/completions",
            Some(&token),
            json!({"model": "quick", "messages": [{"role": "user", "content": [{"type": "text", "text": "p1"}, {"type": "text", "text": "p2"}]}],
                   "presence_penalty": 0.3, "frequency_penalty": -0.5, "temperature": 0.3}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["choices"][0]["message"]["content"], "p1\np2");
    assert_eq!(r.body["model"], "up/echo", "the alias names its model");
    let sent = up.last_chat.lock().unwrap().clone();
    assert_eq!(sent["messages"][0]["content"], "p1\np2");
    assert_eq!(
        (
            sent["presence_penalty"].as_f64(),
            sent["frequency_penalty"].as_f64(),
            sent["temperature"].as_f64()
        ),
        (Some(0.3), Some(-0.5), Some(0.3)),
        "{sent}"
    );
    let models = app.get("/v1/models", Some(&token)).await;
    assert!(
        models.body["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == "quick" && m["owned_by"] == "up"),
        "{}",
        models.text
    );
    let r = app.get("/v1/models/quick", Some(&token)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
}

/// The official `openai` Python package (installed in ./.venv by
/// `just test`) against Muse, streaming and not.
#[actix_web::test]
async fn the_official_python_sdk_works_against_muse() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = root.join(".venv/bin/python");
    let has_sdk = python.exists()
        && std::process::Command::new(&python)
            .args(["-c", "import openai"])
            .status()
            .is_ok_and(|s| s.success());
    if !has_sdk {
        assert!(
            std::env::var("MUSE_REQUIRE_LOCAL_MODELS").as_deref() != Ok("1"),
            "the openai Python package is required (just test installs it into .venv)"
        );
        return;
    }
    // The Anthropic and Gemini fakes answer tool calls with the vendors'
    // documented examples (crates/inference/tests/data).
    let vendor = vendor_tools_server().await;
    let (app, _up) = crate::upstream::app_with_upstream(&[
        ("ANTHROPIC_API_KEY", "sk-ant-test"),
        ("ANTHROPIC_BASE_URL", &vendor),
        ("ANTHROPIC_MODELS", "claude-3-5-sonnet-20241022"),
        ("GEMINI_API_KEY", "gm-test"),
        ("GEMINI_BASE_URL", &vendor),
        ("GEMINI_MODELS", "gemini-2.0-flash"),
    ])
    .await;
    let token = access(&app.user("pysdk").await);
    let key = app
        .post("/api/v1/auth/api-keys", Some(&token), json!({"name": "py"}))
        .await
        .body["key"]
        .as_str()
        .unwrap()
        .to_string();
    let script = root.join("scripts/openai_sdk_check.py");
    let base = format!("{}/v1", app.base);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(script)
            .args([
                "--base-url",
                &base,
                "--api-key",
                &key,
                "--model",
                "up/ok",
                "--tools-model",
                "up/tools",
                "--tools-model",
                "anthropic/claude-3-5-sonnet-20241022",
                "--tools-model",
                "gemini/gemini-2.0-flash",
                "--json-model",
                "up/json",
                "--embedding-model",
                "up/embed",
                "--limited-model",
                "up/limited",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(
        seen["models"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m == "up/ok"),
        "{seen}"
    );
    assert_eq!(seen["whole"]["content"], "Hello, world!");
    assert_eq!(seen["whole"]["total_tokens"], 16);
    assert_eq!(seen["whole"]["finish_reason"], "stop");
    assert_eq!(seen["stream"]["content"], "Hello, world!");
    assert_eq!(seen["stream"]["chunks"], 4);
    assert_eq!(seen["stream"]["total_tokens"], 16);
    assert_eq!(seen["missing"]["status"], 404);
    assert_eq!(seen["bad_key"]["status"], 401);
    assert_eq!(seen["retrieve"], "up/ok");
    assert_eq!(
        seen["bare"], "up/ok",
        "a bare name one provider offers resolves"
    );
    assert_eq!(seen["parsed"], json!({"title": "Muse", "year": 2026}));
    assert_eq!(
        seen["n2"],
        json!(["Hello, world!", "Hello, world!"]),
        "n = 2: two choices"
    );
    assert_eq!(
        (&seen["n2_stream"]["content"], &seen["n2_stream"]["finish"]),
        (
            &json!(["Hello, world!", "Hello, world!"]),
            &json!(["stop", "stop"])
        ),
        "n = 2 streamed: each choice's deltas under its index"
    );
    assert_eq!(
        seen["n2_stream"]["total_tokens"].as_u64().unwrap(),
        2 * seen["stream"]["total_tokens"].as_u64().unwrap(),
        "the usage of both calls, once"
    );
    assert_eq!(
        seen["embeddings"],
        json!({"vectors": [[4.0, 77.0, 0.5], [5.0, 105.0, 0.5]], "tokens": 2}),
        "base64 vectors decoded by the SDK"
    );
    assert_eq!(
        seen["broken_schema"],
        json!({"status": 502, "code": "invalid_structured_output", "param": "response_format"}),
        "an answer that breaks the schema is not returned as if it kept it"
    );
    assert_eq!(
        seen["logprobs_alone"],
        json!({"status": 400, "type": "invalid_request_error", "param": "top_logprobs", "code": "validation_failed"})
    );
    // Log-probabilities pass through as the upstream wrote them, whole and
    // streamed (four pieces of "Hello, world!", two alternatives each).
    assert_eq!(
        seen["logprobs"]["whole"],
        json!([
            ["Hel", -0.25, ["Hel", "alt1"]],
            ["lo, ", -0.5, ["lo, ", "alt1"]],
            ["wor", -0.75, ["wor", "alt1"]],
            ["ld!", -1.0, ["ld!", "alt1"]]
        ])
    );
    assert_eq!(
        seen["logprobs"]["streamed"],
        json!([
            ["Hel", -0.25, 2],
            ["lo, ", -0.5, 2],
            ["wor", -0.75, 2],
            ["ld!", -1.0, 2]
        ])
    );
    // Anthropic and Gemini: their tool_use / functionCall answers reach the
    // SDK as OpenAI tool calls, whole and streamed, and the tool result
    // goes back to them for the final answer.
    for model in [
        "anthropic/claude-3-5-sonnet-20241022",
        "gemini/gemini-2.0-flash",
    ] {
        let trip = &seen["tool_round_trip"][model];
        assert_eq!(trip["finish_reason"], "tool_calls", "{model}: {trip}");
        assert_eq!(
            (
                &trip["call"]["name"],
                &trip["call"]["arguments"]["location"]
            ),
            (&json!("get_weather"), &json!("San Francisco, CA")),
            "{model}: {trip}"
        );
        assert!(
            trip["final"].as_str().is_some_and(|t| !t.is_empty()),
            "{model}: {trip}"
        );
        assert_eq!(
            trip["streamed"]["finish_reason"], "tool_calls",
            "{model}: {trip}"
        );
        assert_eq!(
            trip["streamed"]["calls"][0]["name"], "get_weather",
            "{model}: {trip}"
        );
    }
    assert_eq!(
        seen["tool_round_trip"]["up/tools"],
        json!({
            "finish_reason": "tool_calls",
            "call": {"id": "call_abc123", "name": "get_weather", "arguments": {"location": "Paris"}},
            "final": "It is 22 C in Paris.",
            "streamed": {"calls": [{"id": "call_abc123", "name": "get_weather", "arguments": "{\"location\": \"Paris\"}"}], "finish_reason": "tool_calls"}
        })
    );
    assert_eq!(
        seen["temperature"],
        json!({"status": 400, "type": "invalid_request_error", "param": "temperature", "code": "validation_failed"})
    );
    assert_eq!(
        seen["missing_type"],
        json!({"type": "invalid_request_error", "code": "model_not_found"})
    );
    assert_eq!(
        seen["rate_limited"],
        json!({"status": 429, "type": "rate_limit_error", "code": "provider_rate_limited", "retry_after": "7"}),
        "the provider's 429 reaches the SDK as RateLimitError, its Retry-After kept"
    );
    let h = app
        .get(
            "/api/v1/executions/history?provider=up&status=succeeded",
            Some(&token),
        )
        .await;
    // up/ok: whole, streamed, n = 2 (twice: whole and streamed), bare
    // name, log-probabilities (whole and streamed); up/tools: call, final
    // answer, streamed call; up/json: two parses; up/embed.
    assert_eq!(h.body["total"], 15, "{}", h.text);
}

#[actix_web::test]
async fn text_completions_reach_openai_protocol_servers_and_chat_only_providers_refuse_them() {
    let (app, up) =
        crate::upstream::app_with_upstream(&[("ANTHROPIC_API_KEY", "sk-ant-test")]).await;
    let token = crate::helpers::access(&app.user("tex").await);
    let r = app
        .post(
            "/v1/completions",
            Some(&token),
            serde_json::json!({"model": "up/ok", "prompt": "Once upon a time", "max_tokens": 7, "temperature": 0.3, "stop": ["\n"], "seed": 4}),
        )
        .await;
    assert_eq!(r.status, reqwest::StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["choices"][0]["text"], " and then");
    assert_eq!(r.body["choices"][0]["finish_reason"], "length");
    assert_eq!(r.body["usage"]["prompt_tokens"], 4);
    let sent = up.last_completion.lock().unwrap().clone();
    assert_eq!(
        (
            sent["prompt"].as_str(),
            sent["max_tokens"].as_u64(),
            sent["temperature"].as_f64(),
            sent["seed"].as_u64()
        ),
        (Some("Once upon a time"), Some(7), Some(0.3), Some(4)),
        "forwarded as given: {sent}"
    );
    assert_eq!(sent["stop"], serde_json::json!(["\n"]));
    assert!(sent.get("messages").is_none(), "{sent}");

    let res = app
        .client
        .post(format!("{}/v1/completions", app.base))
        .bearer_auth(&token)
        .json(&serde_json::json!({"model": "up/ok", "prompt": "Once", "stream": true, "stream_options": {"include_usage": true}}))
        .send()
        .await
        .unwrap();
    let body = res.text().await.unwrap();
    let events = crate::upstream::sse_events(&body);
    let text: String = events
        .iter()
        .filter_map(|(_, v)| v["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, " and then", "{body}");
    assert!(
        events
            .iter()
            .any(|(_, v)| v["usage"]["completion_tokens"] == 2),
        "{body}"
    );
    assert!(body.trim_end().ends_with("data: [DONE]"));

    let r = app
        .post(
            "/v1/completions",
            Some(&token),
            serde_json::json!({"model": "anthropic/claude-3-5-haiku-latest", "prompt": "x"}),
        )
        .await;
    assert_eq!(r.status, reqwest::StatusCode::BAD_REQUEST, "{}", r.text);
    assert!(r.text.contains("chats only"), "{}", r.text);
}

/// Anthropic's and Gemini's documented tool-use answers (the fixtures of
/// crates/inference/tests/data), served as their APIs would: a tool call
/// until the conversation holds a result, then the final answer.
async fn vendor_tools_server() -> String {
    use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
    let data =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/inference/tests/data");
    let load = |f: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(data.join(f)).unwrap()).unwrap()
    };
    let (anthropic, gemini) = (
        load("anthropic_tool_use.json"),
        load("gemini_function_calling.json"),
    );
    let srv = HttpServer::new(move || {
        let (a, g) = (anthropic.clone(), gemini.clone());
        App::new()
            .route(
                "/v1/messages",
                web::post().to(move |body: web::Json<Value>| {
                    let a = a.clone();
                    async move {
                        if body["stream"] == true {
                            let frames: String = a["stream"]
                                .as_array()
                                .unwrap()
                                .iter()
                                .map(|f| {
                                    format!("event: {}\ndata: {}\n\n", f[0].as_str().unwrap(), f[1])
                                })
                                .collect();
                            return HttpResponse::Ok()
                                .content_type("text/event-stream")
                                .body(frames);
                        }
                        let done = body.to_string().contains("tool_result");
                        HttpResponse::Ok().json(if done {
                            &a["final_response"]
                        } else {
                            &a["response"]
                        })
                    }
                }),
            )
            .route(
                "/v1beta/models/{call}",
                web::post().to(move |req: HttpRequest, body: web::Json<Value>| {
                    let g = g.clone();
                    async move {
                        if req.path().contains("batchEmbedContents") {
                            // https://ai.google.dev/api/embeddings#method:-models.batchembedcontents
                            let embeddings: Vec<Value> = body["requests"]
                                .as_array()
                                .unwrap()
                                .iter()
                                .map(|r| {
                                    let text = r["content"]["parts"][0]["text"]
                                        .as_str()
                                        .unwrap_or_default();
                                    let mut v = vec![
                                        json!(text.len() as f64),
                                        json!(text.chars().next().map_or(0, |c| c as u32) as f64),
                                    ];
                                    v.resize(
                                        r["outputDimensionality"].as_u64().unwrap_or(4) as usize,
                                        json!(0.5),
                                    );
                                    json!({"values": v})
                                })
                                .collect();
                            return HttpResponse::Ok().json(json!({"embeddings": embeddings}));
                        }
                        if req.path().contains("streamGenerateContent") {
                            let frames: String = g["stream"]
                                .as_array()
                                .unwrap()
                                .iter()
                                .map(|c| format!("data: {c}\n\n"))
                                .collect();
                            return HttpResponse::Ok()
                                .content_type("text/event-stream")
                                .body(frames);
                        }
                        let done = body.to_string().contains("functionResponse");
                        HttpResponse::Ok().json(if done {
                            &g["final_response"]
                        } else {
                            &g["response"]
                        })
                    }
                }),
            )
    })
    .workers(1)
    .bind(("127.0.0.1", 0))
    .unwrap();
    let addr = srv.addrs()[0];
    actix_web::rt::spawn(srv.run());
    format!("http://{addr}")
}

#[actix_web::test]
async fn tool_round_trips_through_anthropic_and_gemini_in_openais_format() {
    let vendor = vendor_tools_server().await;
    let app = TestApp::spawn_with(&[
        ("ANTHROPIC_API_KEY", "sk-ant-test"),
        ("ANTHROPIC_BASE_URL", &vendor),
        ("ANTHROPIC_MODELS", "claude-3-5-sonnet-20241022"),
        ("GEMINI_API_KEY", "gm-test"),
        ("GEMINI_BASE_URL", &vendor),
        ("GEMINI_MODELS", "gemini-2.0-flash"),
        ("LLM_MAX_RETRIES", "0"),
    ])
    .await;
    let token = access(&app.user("vendortools").await);
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a given location",
                        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}}]);
    let ask = json!([{"role": "user", "content": "What's the weather like in San Francisco?"}]);
    for model in [
        "anthropic/claude-3-5-sonnet-20241022",
        "gemini/gemini-2.0-flash",
    ] {
        let r = app
            .post(
                "/v1/chat/completions",
                Some(&token),
                json!({"model": model, "messages": ask, "tools": tools}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{model}: {}", r.text);
        assert_eq!(
            r.body["choices"][0]["finish_reason"], "tool_calls",
            "{model}"
        );
        let call = r.body["choices"][0]["message"]["tool_calls"][0].clone();
        assert_eq!(
            (call["type"].as_str(), call["function"]["name"].as_str()),
            (Some("function"), Some("get_weather")),
            "{model}"
        );
        let args: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args["location"], "San Francisco, CA", "{model}");

        let mut follow = ask.as_array().unwrap().clone();
        follow.push(r.body["choices"][0]["message"].clone());
        follow.push(json!({"role": "tool", "tool_call_id": call["id"], "content": "15 degrees"}));
        let r = app
            .post(
                "/v1/chat/completions",
                Some(&token),
                json!({"model": model, "messages": follow, "tools": tools}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{model}: {}", r.text);
        assert!(
            r.body["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .contains("15 degrees Celsius"),
            "{model}: {}",
            r.text
        );

        let res = app
            .client
            .post(format!("{}/v1/chat/completions", app.base))
            .bearer_auth(&token)
            .json(&json!({"model": model, "messages": ask, "tools": tools, "stream": true}))
            .send()
            .await
            .unwrap();
        let body = res.text().await.unwrap();
        let (mut name, mut arguments, mut finish) = (String::new(), String::new(), String::new());
        for (_, v) in crate::upstream::sse_events(&body) {
            for c in v["choices"].as_array().into_iter().flatten() {
                for d in c["delta"]["tool_calls"].as_array().into_iter().flatten() {
                    assert_eq!(d["index"], 0);
                    name.push_str(d["function"]["name"].as_str().unwrap_or_default());
                    arguments.push_str(d["function"]["arguments"].as_str().unwrap_or_default());
                }
                if let Some(f) = c["finish_reason"].as_str() {
                    finish = f.to_string();
                }
            }
        }
        assert_eq!(
            (name.as_str(), finish.as_str()),
            ("get_weather", "tool_calls"),
            "{model}: {body}"
        );
        let args: Value = serde_json::from_str(&arguments).unwrap();
        assert_eq!(
            args["location"], "San Francisco, CA",
            "{model}: {arguments}"
        );
    }
}

#[actix_web::test]
async fn tool_calls_are_recorded_and_local_models_refuse_them_by_name() {
    let cache = crate::models::test_models();
    let mut extra = vec![("ANTHROPIC_API_KEY", "sk-ant-test")];
    if let Some(c) = &cache {
        extra.push(("MODEL_CACHE_DIR", c.as_str()));
    }
    let (app, _up) = crate::upstream::app_with_upstream(&extra).await;
    let token = access(&app.user("tooler").await);
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]);
    let r = app
        .post(
            "/v1/chat/completions",
            Some(&token),
            json!({"model": "up/tools", "messages": [{"role": "user", "content": "weather?"}], "tools": tools}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["choices"][0]["finish_reason"], "tool_calls");
    assert!(r.body["choices"][0]["message"]["content"].is_null());
    let id = r.headers["x-muse-execution-id"]
        .to_str()
        .unwrap()
        .to_string();
    let e = app
        .get(&format!("/api/v1/executions/{id}"), Some(&token))
        .await;
    assert!(
        e.body["output"]
            .as_str()
            .unwrap()
            .contains("\"name\":\"get_weather\""),
        "the call is in the record: {}",
        e.text
    );

    // A local model whose chat template takes no tools (Llama 2's): refused
    // by name, before anything runs.
    let models: Vec<&str> = if cache.is_some() {
        vec!["local/muse-test/tiny-llama"]
    } else {
        Vec::new()
    };
    for model in models {
        let r = app
            .post(
                "/v1/chat/completions",
                Some(&token),
                json!({"model": model, "messages": [{"role": "user", "content": "weather?"}], "tools": tools}),
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{model}: {}", r.text);
        assert_eq!(
            (
                r.body["error"]["code"].as_str(),
                r.body["error"]["param"].as_str()
            ),
            (Some("unsupported_parameter"), Some("tools")),
            "{model}: {}",
            r.text
        );
    }
    let r = app
        .post(
            "/v1/chat/completions",
            Some(&token),
            json!({"model": "anthropic/claude-3-5-haiku-latest", "messages": [{"role": "user", "content": "x"}], "seed": 3}),
        )
        .await;
    assert_eq!(r.body["error"]["param"], "seed", "{}", r.text);
    for (field, value) in [("logprobs", json!(true)), ("logit_bias", json!({"1": 5}))] {
        let mut body = json!({"model": "anthropic/claude-3-5-haiku-latest", "messages": [{"role": "user", "content": "x"}]});
        body[field] = value;
        let r = app.post("/v1/chat/completions", Some(&token), body).await;
        assert_eq!(
            (r.status, r.body["error"]["param"].as_str()),
            (StatusCode::BAD_REQUEST, Some(field)),
            "Anthropic has no {field}: {}",
            r.text
        );
    }
}

#[actix_web::test]
async fn structured_answers_are_checked_and_local_models_write_json() {
    let cache = crate::models::test_models();
    let mut extra = Vec::new();
    if let Some(c) = &cache {
        extra.push(("MODEL_CACHE_DIR", c.as_str()));
    }
    let (app, up) = crate::upstream::app_with_upstream(&extra).await;
    let token = access(&app.user("structured").await);
    let schema = json!({"type": "json_schema", "json_schema": {"name": "idea", "strict": true,
        "schema": {"type": "object", "properties": {"title": {"type": "string"}, "year": {"type": "integer"}}, "required": ["title", "year"], "additionalProperties": false}}});
    let r = app
        .post("/v1/chat/completions", Some(&token), json!({"model": "up/json", "messages": [{"role": "user", "content": "idea"}], "response_format": schema}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let sent = up.last_chat.lock().unwrap().clone();
    assert_eq!(sent["response_format"], schema, "forwarded as given");

    // "Hello, world!" is not JSON: a broken promise is a 502, not an answer.
    for stream in [false, true] {
        let body = json!({"model": "up/ok", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}, "stream": stream});
        let res = app
            .client
            .post(format!("{}/v1/chat/completions", app.base))
            .bearer_auth(&token)
            .json(&body)
            .send()
            .await
            .unwrap();
        if stream {
            let text = res.text().await.unwrap();
            assert!(
                text.contains("invalid_structured_output")
                    && text.trim_end().ends_with("data: [DONE]"),
                "{text}"
            );
            assert!(!text.contains("\"finish_reason\":\"stop\""), "{text}");
        } else {
            let r = TestApp::read(res).await;
            assert_eq!(
                (r.status, r.error_code()),
                (StatusCode::BAD_GATEWAY, "invalid_structured_output"),
                "{}",
                r.text
            );
            assert!(r.body["error"]["details"]["execution_id"].is_string());
        }
    }
    if let Some(cache) = &cache {
        // Local models are held to JSON while they write (constrained
        // decoding); the bias on `}` makes the tiny model close at once.
        let snapshot = std::fs::read_dir(
            std::path::Path::new(cache).join("models--muse-test--tiny-gpt2/snapshots"),
        )
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
        let tokenizer: Value =
            serde_json::from_slice(&std::fs::read(snapshot.join("tokenizer.json")).unwrap())
                .unwrap();
        let close = tokenizer["model"]["vocab"]["}"].as_u64().unwrap();
        let r = app
            .post("/v1/chat/completions", Some(&token), json!({"model": "local/muse-test/tiny-gpt2", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}, "logit_bias": {close.to_string(): 100}}))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let content = r.body["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(
            serde_json::from_str::<Value>(content).unwrap().is_object(),
            "{content}"
        );
    }
}

#[actix_web::test]
async fn embeddings_come_from_openai_protocol_servers_and_gemini() {
    let vendor = vendor_tools_server().await;
    let cache = crate::models::test_models();
    let mut extra = vec![
        ("GEMINI_API_KEY", "gm-test"),
        ("GEMINI_BASE_URL", vendor.as_str()),
        ("GEMINI_MODELS", "text-embedding-004"),
    ];
    if let Some(c) = &cache {
        extra.push(("MODEL_CACHE_DIR", c.as_str()));
    }
    let (app, _up) = crate::upstream::app_with_upstream(&extra).await;
    let token = access(&app.user("embedder").await);
    let r = app
        .post(
            "/v1/embeddings",
            Some(&token),
            json!({"model": "up/embed", "input": "Muse"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["data"][0]["embedding"], json!([4.0, 77.0, 0.5, 0.5]));
    assert_eq!(
        (r.body["object"].as_str(), r.body["model"].as_str()),
        (Some("list"), Some("up/embed"))
    );
    assert_eq!(r.body["usage"]["prompt_tokens"], 1);
    let id = r.headers["x-muse-execution-id"]
        .to_str()
        .unwrap()
        .to_string();
    let e = app
        .get(&format!("/api/v1/executions/{id}"), Some(&token))
        .await;
    assert_eq!(
        e.body["output"], "1 embeddings of 4 dimensions",
        "{}",
        e.text
    );

    let r = app
        .post(
            "/v1/embeddings",
            Some(&token),
            json!({"model": "gemini/text-embedding-004", "input": ["a b", "c"], "dimensions": 2}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        r.body["data"][1]["embedding"],
        json!([1.0, 99.0]),
        "{}",
        r.text
    );

    for (body, param) in [
        (json!({"model": "up/embed", "input": []}), "input"),
        (json!({"model": "up/embed", "input": [""]}), "input[0]"),
        (json!({"model": "up/embed", "input": [[1, 2, 3]]}), "input"),
        (
            json!({"model": "up/embed", "input": "x", "encoding_format": "hex"}),
            "encoding_format",
        ),
        (
            json!({"model": "up/embed", "input": "x", "normalise": true}),
            "normalise",
        ),
    ] {
        let r = app.post("/v1/embeddings", Some(&token), body.clone()).await;
        assert_eq!(
            (r.status, r.body["error"]["param"].as_str()),
            (StatusCode::BAD_REQUEST, Some(param)),
            "{body}: {}",
            r.text
        );
    }
    if cache.is_some() {
        // A local sentence-transformers export (its vectors equal the
        // onnxruntime reference within 1e-5: crates/inference/tests/local.rs).
        let r = app
            .post(
                "/v1/embeddings",
                Some(&token),
                json!({"model": "local/muse-test/tiny-minilm", "input": ["Muse", "ideas"]}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let v: Vec<f64> = r.body["data"][1]["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(v.len(), 32);
        assert!((v.iter().map(|x| x * x).sum::<f64>().sqrt() - 1.0).abs() < 1e-5);
        assert!(r.body["usage"]["prompt_tokens"].as_u64().unwrap() >= 4);
        let r = app
            .post(
                "/v1/embeddings",
                Some(&token),
                json!({"model": "local/muse-test/tiny-gpt2", "input": "x"}),
            )
            .await;
        assert_eq!(
            (r.status, r.error_code()),
            (StatusCode::BAD_REQUEST, "unsupported_parameter"),
            "{}",
            r.text
        );
    }
}

/// Every field of OpenAI's Chat Completions request reference
/// (https://platform.openai.com/docs/api-reference/chat/create), one at a
/// time with a value that means something: each is either seen by the
/// OpenAI-protocol upstream, ignored by the documented rule, or refused by
/// name — never dropped silently (docs/openai.md has the table).
#[actix_web::test]
async fn every_chat_completions_field_is_forwarded_ignored_by_rule_or_refused_by_name() {
    let (app, up) = crate::upstream::app_with_upstream(&[]).await;
    let token = access(&app.user("fieldwalk").await);
    let tool =
        json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
    enum Expect {
        /// Forwarded: the upstream saw this key with this value.
        Seen(&'static str, Value),
        /// Accepted and documented as ignored: not forwarded.
        Ignored,
        /// 400 unsupported_parameter naming the field.
        Refused,
    }
    use Expect::*;
    /// Field, value, what must happen, and a field it needs alongside.
    type Case = (&'static str, Value, Expect, Option<(&'static str, Value)>);
    let cases: Vec<Case> = vec![
        (
            "temperature",
            json!(0.3),
            Seen("temperature", json!(0.3)),
            None,
        ),
        ("top_p", json!(0.9), Seen("top_p", json!(0.9)), None),
        ("max_tokens", json!(7), Seen("max_tokens", json!(7)), None),
        (
            "max_completion_tokens",
            json!(9),
            Seen("max_tokens", json!(9)),
            None,
        ),
        ("stop", json!(["###"]), Seen("stop", json!(["###"])), None),
        ("seed", json!(5), Seen("seed", json!(5)), None),
        (
            "presence_penalty",
            json!(0.5),
            Seen("presence_penalty", json!(0.5)),
            None,
        ),
        (
            "frequency_penalty",
            json!(-0.5),
            Seen("frequency_penalty", json!(-0.5)),
            None,
        ),
        ("tools", tool.clone(), Seen("tools", tool.clone()), None),
        (
            "tool_choice",
            json!("required"),
            Seen("tool_choice", json!("required")),
            Some(("tools", tool.clone())),
        ),
        (
            "parallel_tool_calls",
            json!(false),
            Seen("parallel_tool_calls", json!(false)),
            Some(("tools", tool.clone())),
        ),
        (
            "response_format",
            json!({"type": "json_object"}),
            Seen("response_format", json!({"type": "json_object"})),
            None,
        ),
        (
            "stream_options",
            json!({"include_usage": true}),
            Seen("stream_options", json!({"include_usage": true})),
            Some(("stream", json!(true))),
        ),
        ("n", json!(1), Ignored, None),
        ("user", json!("u-1"), Ignored, None),
        ("metadata", json!({"k": "v"}), Ignored, None),
        ("store", json!(true), Ignored, None),
        ("service_tier", json!("auto"), Ignored, None),
        ("prompt_cache_key", json!("k"), Ignored, None),
        ("safety_identifier", json!("s"), Ignored, None),
        ("n", json!(2), Ignored, None),
        ("n", json!(2), Ignored, Some(("stream", json!(true)))),
        ("logprobs", json!(true), Seen("logprobs", json!(true)), None),
        (
            "top_logprobs",
            json!(2),
            Seen("top_logprobs", json!(2)),
            Some(("logprobs", json!(true))),
        ),
        (
            "logit_bias",
            json!({"50256": -100}),
            Seen("logit_bias", json!({"50256": -100})),
            None,
        ),
        (
            "audio",
            json!({"voice": "alloy", "format": "wav"}),
            Refused,
            None,
        ),
        ("modalities", json!(["text", "audio"]), Refused, None),
        (
            "prediction",
            json!({"type": "content", "content": "x"}),
            Refused,
            None,
        ),
        ("reasoning_effort", json!("low"), Refused, None),
        ("verbosity", json!("low"), Refused, None),
        ("web_search_options", json!({}), Refused, None),
        ("functions", json!([{"name": "f"}]), Refused, None),
        (
            "function_call",
            json!("auto"),
            Refused,
            Some(("functions", json!([{"name": "f"}]))),
        ),
    ];
    for (field, value, expect, with) in cases {
        *up.last_chat.lock().unwrap() = Value::Null;
        // up/json answers JSON (so that response_format is kept); up/ok streams.
        let model = if with.as_ref().is_some_and(|(k, _)| *k == "stream") {
            "up/ok"
        } else {
            "up/json"
        };
        let mut body = json!({"model": model, "messages": [{"role": "user", "content": "x"}]});
        body[field] = value.clone();
        if let Some((k, v)) = &with {
            body[*k] = v.clone();
        }
        let r = app
            .post("/v1/chat/completions", Some(&token), body.clone())
            .await;
        let sent = up.last_chat.lock().unwrap().clone();
        match expect {
            Seen(key, want) => {
                assert!(r.status.is_success(), "{field}: {}", r.text);
                assert_eq!(
                    sent[key], want,
                    "{field} reaches the upstream as {key}: {sent}"
                );
            }
            Ignored => {
                assert!(r.status.is_success(), "{field}: {}", r.text);
                assert!(
                    sent.get(field).is_none(),
                    "{field} is not forwarded: {sent}"
                );
            }
            Refused => {
                assert_eq!(
                    (
                        r.status,
                        r.body["error"]["code"].as_str(),
                        r.body["error"]["param"].as_str()
                    ),
                    (
                        StatusCode::BAD_REQUEST,
                        Some("unsupported_parameter"),
                        Some(field)
                    ),
                    "{field}: {}",
                    r.text
                );
                assert!(
                    sent.is_null(),
                    "{field}: a refused request never reaches the upstream"
                );
            }
        }
    }
}

#[actix_web::test]
async fn a_failed_call_names_its_execution() {
    let (app, _up) = crate::upstream::app_with_upstream(&[]).await;
    let token = access(&app.user("failnamed").await);
    for path in ["/v1/chat/completions", "/v1/completions"] {
        let body = if path.ends_with("chat/completions") {
            json!({"model": "up/broken", "messages": [{"role": "user", "content": "x"}]})
        } else {
            json!({"model": "up/broken", "prompt": "x"})
        };
        let r = app.post(path, Some(&token), body).await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{path}: {}", r.text);
        let id = r.headers["x-muse-execution-id"]
            .to_str()
            .unwrap()
            .to_string();
        assert_eq!(
            r.body["error"]["details"]["execution_id"],
            id.as_str(),
            "{}",
            r.text
        );
        let e = app
            .get(&format!("/api/v1/executions/{id}"), Some(&token))
            .await;
        assert_eq!(e.body["status"], "failed", "{path}: {}", e.text);
    }
    // The Rubi Studio seed's `?limit=` is another name for `per_page`.
    let h = app
        .get("/api/v1/executions/history?limit=1", Some(&token))
        .await;
    assert_eq!(
        (h.body["per_page"].as_u64(), h.body["total"].as_u64()),
        (Some(1), Some(2)),
        "{}",
        h.text
    );
    let h = app
        .get("/api/v1/ai/ideas/history?limit=3", Some(&token))
        .await;
    assert_eq!(h.body["per_page"], 3, "{}", h.text);
}

#[actix_web::test]
async fn a_group_alias_falls_back_to_its_next_model() {
    let (app, _up) = crate::upstream::app_with_upstream(&[(
        "MODEL_ALIASES",
        "fast=up/broken|up/ok,solo=up/echo",
    )])
    .await;
    let token = access(&app.user("grouper").await);
    for stream in [false, true] {
        let body = json!({"model": "fast", "messages": [{"role": "user", "content": "hi"}], "stream": stream});
        let res = app
            .client
            .post(format!("{}/v1/chat/completions", app.base))
            .bearer_auth(&token)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let text = res.text().await.unwrap();
        assert!(
            text.contains("\"model\":\"up/ok\""),
            "the model that answered is named: {text}"
        );
        assert!(text.contains("Hello") || text.contains("Hel"), "{text}");
    }
    // Both attempts of each call are recorded: the failure and the answer.
    let h = app
        .get("/api/v1/executions/history?status=failed", Some(&token))
        .await;
    assert_eq!(h.body["total"], 2, "{}", h.text);
    let models = app.get("/v1/models", Some(&token)).await;
    let ids: Vec<&str> = models.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&"fast") && ids.contains(&"solo"), "{ids:?}");
}
