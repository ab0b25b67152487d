//! The prompt library and prompt execution end to end: CRUD with
//! versions and permissions, execution with valid and invalid variables,
//! the SSE variant, and history.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::*;
use crate::upstream::{app_with_upstream, sse_events};

async fn library(app: &TestApp, token: &str) -> (String, String, Value) {
    let spec = app
        .post(
            "/api/v1/specialties",
            Some(token),
            json!({"name": "Medicine", "description": "Clinical prompts"}),
        )
        .await;
    assert_eq!(spec.status, StatusCode::CREATED, "{}", spec.text);
    let spec_id = spec.body["id"].as_str().unwrap().to_string();
    let sub = app
        .post(
            "/api/v1/sub-specialties",
            Some(token),
            json!({"specialty_id": spec_id, "name": "Cardiology"}),
        )
        .await;
    assert_eq!(sub.status, StatusCode::CREATED, "{}", sub.text);
    assert_eq!(sub.body["specialty_id"], spec_id.as_str());
    let sub_id = sub.body["id"].as_str().unwrap().to_string();
    let prompt = app
        .post(
            "/api/v1/expert-prompts",
            Some(token),
            json!({
                "sub_specialty_id": sub_id,
                "title": "Triage",
                "template": "Patient {name}, age {age}, symptoms: {symptoms}. Answer as JSON: {{\"urgency\": 1}} ({language})",
                "variables_schema": {
                    "type": "object",
                    "required": ["name", "age", "symptoms"],
                    "properties": {
                        "name": {"type": "string", "maxLength": 50},
                        "age": {"type": "integer", "minimum": 0, "maximum": 130},
                        "symptoms": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                        "language": {"type": "string", "default": "English"}
                    }
                },
                "expected_output": "{\"urgency\": 1-5}",
                "tags": ["triage", "Cardio"]
            }),
        )
        .await;
    assert_eq!(prompt.status, StatusCode::CREATED, "{}", prompt.text);
    (spec_id, sub_id, prompt.body)
}

#[actix_web::test]
async fn a_user_builds_a_library_and_executes_a_prompt_with_every_error_reported() {
    let (app, _up) = app_with_upstream(&[]).await;
    let token = access(&app.user("doctor").await);
    let (spec_id, sub_id, prompt) = library(&app, &token).await;
    let pid = prompt["id"].as_str().unwrap();
    assert_eq!(prompt["version"], 1);
    assert_eq!(prompt["tags"], json!(["triage", "cardio"]));

    // Creating checks the schema and the placeholders, every problem at once.
    let bad = app
        .post(
            "/api/v1/expert-prompts",
            Some(&token),
            json!({"sub_specialty_id": sub_id, "title": "", "template": "Hi {who} {", "variables_schema": {"type": "string"}}),
        )
        .await;
    assert_eq!(
        (bad.status, bad.error_code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed")
    );
    let fields: Vec<&str> = bad.body["error"]["details"]["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["title", "template"], "{}", bad.text);
    let undeclared = app
        .post(
            "/api/v1/expert-prompts",
            Some(&token),
            json!({"sub_specialty_id": sub_id, "title": "x", "template": "Hi {who}", "variables_schema": {"type": "object", "properties": {}}}),
        )
        .await;
    assert!(undeclared.text.contains("who"), "{}", undeclared.text);

    // Execute with valid variables: defaults filled in, rendered, recorded.
    let run = app
        .post(
            &format!("/api/v1/execute-prompt/{pid}"),
            Some(&token),
            json!({"variables": {"name": "Ada", "age": 36, "symptoms": ["chest pain"]}, "llm_provider": "up", "llm_model": "echo", "temperature": 0.2}),
        )
        .await;
    assert_eq!(run.status, StatusCode::OK, "{}", run.text);
    assert_eq!(
        run.body["output"],
        "Patient Ada, age 36, symptoms: [\"chest pain\"]. Answer as JSON: {\"urgency\": 1} (English)"
    );
    assert_eq!(
        (
            run.body["prompt_id"].as_str(),
            run.body["prompt_version"].as_i64()
        ),
        (Some(pid), Some(1))
    );
    assert_eq!(
        (
            run.body["llm_provider"].as_str(),
            run.body["llm_model"].as_str(),
            run.body["status"].as_str()
        ),
        (Some("up"), Some("echo"), Some("succeeded"))
    );
    assert_eq!(run.body["tokens_used"]["prompt"], 12);
    let exec_id = run.body["execution_id"].as_str().unwrap().to_string();

    // Invalid variables: every error with its JSON path; recorded as failed.
    let invalid = app
        .post(
            &format!("/api/v1/execute-prompt/{pid}"),
            Some(&token),
            json!({"variables": {"name": "x".repeat(60), "age": -1, "symptoms": [3]}, "llm_provider": "up", "llm_model": "echo"}),
        )
        .await;
    assert_eq!(
        (invalid.status, invalid.error_code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_variables")
    );
    let mut paths: Vec<&str> = invalid.body["error"]["details"]["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    paths.sort();
    assert_eq!(paths, ["/age", "/name", "/symptoms/0"], "{}", invalid.text);
    let missing = app
        .post(
            &format!("/api/v1/execute-prompt/{pid}"),
            Some(&token),
            json!({"variables": {}, "llm_provider": "up", "llm_model": "echo"}),
        )
        .await;
    assert_eq!(
        missing.body["error"]["details"]["errors"]
            .as_array()
            .unwrap()
            .len(),
        3,
        "{}",
        missing.text
    );

    // A provider failure is a 502 and a failed execution; an unknown model 404.
    let broken = app
        .post(&format!("/api/v1/execute-prompt/{pid}"), Some(&token), json!({"variables": {"name": "A", "age": 1, "symptoms": ["a"]}, "llm_provider": "up", "llm_model": "broken"}))
        .await;
    assert_eq!(
        (broken.status, broken.error_code()),
        (StatusCode::BAD_GATEWAY, "provider_error")
    );
    let unknown = app
        .post(&format!("/api/v1/execute-prompt/{pid}"), Some(&token), json!({"variables": {"name": "A", "age": 1, "symptoms": ["a"]}, "llm_provider": "up", "llm_model": "nope"}))
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);

    // Editing the template creates version 2; version 1 stays readable and runnable.
    let edit = app
        .call(
            reqwest::Method::PATCH,
            &format!("/api/v1/expert-prompts/{pid}"),
            Some(&token),
            Some(json!({"template": "v2 {name} {age} {symptoms}"})),
        )
        .await;
    assert_eq!(
        (edit.status, edit.body["version"].as_i64()),
        (StatusCode::OK, Some(2)),
        "{}",
        edit.text
    );
    let v1 = app
        .get(
            &format!("/api/v1/expert-prompts/{pid}/versions/1"),
            Some(&token),
        )
        .await;
    assert!(v1.body["template"]
        .as_str()
        .unwrap()
        .starts_with("Patient {name}"));
    let versions = app
        .get(
            &format!("/api/v1/expert-prompts/{pid}/versions"),
            Some(&token),
        )
        .await;
    assert_eq!(versions.body["total"], 2);
    let old = app
        .post(&format!("/api/v1/execute-prompt/{pid}"), Some(&token), json!({"variables": {"name": "B", "age": 2, "symptoms": ["b"]}, "llm_provider": "up", "llm_model": "echo", "version": 1}))
        .await;
    assert_eq!(
        (old.status, old.body["prompt_version"].as_i64()),
        (StatusCode::OK, Some(1))
    );
    let new = app
        .post(&format!("/api/v1/execute-prompt/{pid}"), Some(&token), json!({"variables": {"name": "C", "age": 3, "symptoms": ["c"]}, "llm_provider": "up", "llm_model": "echo"}))
        .await;
    assert_eq!(
        (
            new.body["output"].as_str(),
            new.body["prompt_version"].as_i64()
        ),
        (Some("v2 C 3 [\"c\"]"), Some(2))
    );

    // The streamed variant: start, tokens, done with usage and cost.
    let res = app
        .client
        .post(format!("{}/api/v1/execute-prompt/{pid}/stream", app.base))
        .bearer_auth(&token)
        .json(&json!({"variables": {"name": "D", "age": 4, "symptoms": ["d"]}, "llm_provider": "up", "llm_model": "echo"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let events = sse_events(&res.text().await.unwrap());
    assert_eq!(events.first().unwrap().0, "start");
    let text: String = events
        .iter()
        .filter(|e| e.0 == "token")
        .map(|e| e.1["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, "v2 D 4 [\"d\"]");
    let done = &events.last().unwrap();
    assert_eq!(done.0, "done");
    assert_eq!(
        (
            done.1["prompt_version"].as_i64(),
            done.1["usage"]["prompt_tokens"].as_u64()
        ),
        (Some(2), Some(12))
    );

    // History: filters by prompt and status; every call above was recorded.
    let h = app
        .get(
            &format!("/api/v1/executions/history?prompt_id={pid}"),
            Some(&token),
        )
        .await;
    assert_eq!(h.body["total"], 8, "{}", h.text);
    let failed = app
        .get(
            &format!("/api/v1/executions/history?prompt_id={pid}&status=failed"),
            Some(&token),
        )
        .await;
    assert_eq!(failed.body["total"], 4, "{}", failed.text);
    let one = app
        .get(&format!("/api/v1/executions/{exec_id}"), Some(&token))
        .await;
    assert_eq!(
        (
            one.body["source"].as_str(),
            one.body["variables"]["language"].as_str()
        ),
        (Some("prompt"), Some("English"))
    );
    assert!(one.body["rendered_prompt"]
        .as_str()
        .unwrap()
        .contains("Patient Ada"));

    // Another user: the unpublished library and the executions are invisible (404).
    let other = access(&app.user("stranger").await);
    for path in [
        format!("/api/v1/specialties/{spec_id}"),
        format!("/api/v1/sub-specialties/{sub_id}"),
        format!("/api/v1/expert-prompts/{pid}"),
        format!("/api/v1/executions/{exec_id}"),
    ] {
        let r = app.get(&path, Some(&other)).await;
        assert_eq!(
            (r.status, r.error_code()),
            (StatusCode::NOT_FOUND, "not_found"),
            "{path}"
        );
    }
    let r = app
        .post(
            &format!("/api/v1/execute-prompt/{pid}"),
            Some(&other),
            json!({"variables": {}, "llm_provider": "up", "llm_model": "echo"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(
        app.get("/api/v1/executions/history", Some(&other))
            .await
            .body["total"],
        0
    );
    let list = app
        .get("/api/v1/expert-prompts?tag=triage", Some(&other))
        .await;
    assert_eq!(list.body["total"], 0);

    // Published: readable and executable by others, but not editable (403).
    for path in [
        format!("/api/v1/specialties/{spec_id}"),
        format!("/api/v1/sub-specialties/{sub_id}"),
        format!("/api/v1/expert-prompts/{pid}"),
    ] {
        let r = app
            .call(
                reqwest::Method::PATCH,
                &path,
                Some(&token),
                Some(json!({"published": true})),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text);
    }
    assert_eq!(
        app.get("/api/v1/expert-prompts?tag=triage", Some(&other))
            .await
            .body["total"],
        1
    );
    let theirs = app
        .post(&format!("/api/v1/execute-prompt/{pid}"), Some(&other), json!({"variables": {"name": "E", "age": 5, "symptoms": ["e"]}, "llm_provider": "up", "llm_model": "ok"}))
        .await;
    assert_eq!(theirs.status, StatusCode::OK);
    let r = app
        .call(
            reqwest::Method::PATCH,
            &format!("/api/v1/expert-prompts/{pid}"),
            Some(&other),
            Some(json!({"title": "mine"})),
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::FORBIDDEN, "forbidden")
    );
    let r = app
        .call(
            reqwest::Method::DELETE,
            &format!("/api/v1/specialties/{spec_id}"),
            Some(&other),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);

    // A specialty that still holds things is not deleted (409); emptied, it is.
    let r = app
        .call(
            reqwest::Method::DELETE,
            &format!("/api/v1/specialties/{spec_id}"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::CONFLICT, "conflict")
    );
    for path in [
        format!("/api/v1/expert-prompts/{pid}"),
        format!("/api/v1/sub-specialties/{sub_id}"),
        format!("/api/v1/specialties/{spec_id}"),
    ] {
        let r = app
            .call(reqwest::Method::DELETE, &path, Some(&token), None)
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{path}: {}", r.text);
    }
    // The executions of a deleted prompt stay in the history.
    assert_eq!(
        app.get(
            &format!("/api/v1/executions/history?prompt_id={pid}"),
            Some(&token)
        )
        .await
        .body["total"],
        8
    );
}

#[actix_web::test]
async fn library_lists_paginate_and_filter() {
    let (app, _up) = app_with_upstream(&[]).await;
    let token = access(&app.user("lister").await);
    for i in 0..5 {
        let r = app
            .post(
                "/api/v1/specialties",
                Some(&token),
                json!({"name": format!("Area {i}")}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED);
    }
    let page = app
        .get(
            "/api/v1/specialties?mine=true&per_page=2&page=3",
            Some(&token),
        )
        .await;
    assert_eq!(
        (
            page.body["total"].as_u64(),
            page.body["items"].as_array().unwrap().len()
        ),
        (Some(5), 1),
        "{}",
        page.text
    );
    assert_eq!(page.body["items"][0]["name"], "Area 4");
    let q = app
        .get("/api/v1/specialties?q=AREA%203", Some(&token))
        .await;
    assert_eq!(q.body["total"], 1);
    // The built-in idea prompts are listed for everyone.
    let builtin = app
        .get("/api/v1/expert-prompts?tag=ideas", Some(&token))
        .await;
    assert_eq!(builtin.body["total"], 2, "{}", builtin.text);
    assert!(builtin.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["owner_id"].is_null()));
    // Bad input is a 4xx in the error shape.
    let r = app
        .post(
            "/api/v1/sub-specialties",
            Some(&token),
            json!({"name": "orphan"}),
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed")
    );
    let r = app
        .post(
            "/api/v1/specialties",
            Some(&token),
            json!({"name": "x", "colour": "red"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let r = app
        .get("/api/v1/expert-prompts/not-a-uuid", Some(&token))
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::BAD_REQUEST, "invalid_path_parameter")
    );
    let r = app.get("/api/v1/specialties", None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

/// Rubi Studio's quick start creates a specialty with an icon, as written
/// in its README (`icon_url`); the icon can be changed and removed, and
/// anything but an http(s) URL is refused by name.
#[actix_web::test]
async fn specialties_take_the_seeds_icon_url() {
    let app = TestApp::spawn().await;
    let token = access(&app.user("rubi").await);
    let r = app
        .post(
            "/api/v1/specialties",
            Some(&token),
            json!({"name": "Développement Web", "description": "Spécialité en développement web full-stack", "icon_url": "https://example.com/icon.png"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["icon_url"], "https://example.com/icon.png");
    let id = r.body["id"].as_str().unwrap().to_string();
    let got = app
        .get(&format!("/api/v1/specialties/{id}"), Some(&token))
        .await;
    assert_eq!(got.body["icon_url"], "https://example.com/icon.png");
    let r = app
        .call(
            reqwest::Method::PATCH,
            &format!("/api/v1/specialties/{id}"),
            Some(&token),
            Some(json!({"icon_url": ""})),
        )
        .await;
    assert_eq!(
        (r.status, &r.body["icon_url"]),
        (StatusCode::OK, &Value::Null),
        "{}",
        r.text
    );
    for bad in [
        "javascript:alert(1)",
        "ftp://example.com/i.png",
        "https://exa mple.com/i.png",
        // Multi-byte characters where the scheme would end (found by
        // schemathesis: the check sliced inside a character and panicked).
        "httpsé/example.com",
        "\u{a6}\u{1f306}\u{e9}\u{3a07a}\u{b9}|",
    ] {
        let r = app
            .post(
                "/api/v1/specialties",
                Some(&token),
                json!({"name": "x", "icon_url": bad}),
            )
            .await;
        assert_eq!(
            r.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{bad}: {}",
            r.text
        );
        assert_eq!(
            r.body["error"]["details"]["fields"][0]["field"], "icon_url",
            "{}",
            r.text
        );
    }
}
