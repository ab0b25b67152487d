//! Ideas end to end: one, a batch with a failing item, a stream over SSE
//! with a single-use ticket (as a browser's EventSource would), history,
//! ratings.

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::*;
use crate::upstream::{app_with_upstream, sse_events};

#[actix_web::test]
async fn ideas_are_generated_streamed_listed_and_rated() {
    let (app, _up) = app_with_upstream(&[
        ("DEFAULT_MODEL", "up/echo"),
        ("ADMIN_EMAIL", "root@example.com"),
        ("ADMIN_PASSWORD", "an admin passphrase"),
    ])
    .await;
    let token = access(&app.user("muse").await);
    // Batches of 4 need more than the free plan's 3.
    let admin = root_token(&app).await;
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

    // One idea from a category: the seeded idea prompt, rendered, run, stored.
    let one = app
        .post(
            "/api/v1/ai/generate",
            Some(&token),
            json!({"category": "Games", "theme": "space", "creativity": 8}),
        )
        .await;
    assert_eq!(one.status, StatusCode::OK, "{}", one.text);
    let idea = &one.body["idea"];
    let content = idea["content"].as_str().unwrap();
    assert!(
        content.contains("in the category \"Games\", on the theme \"space\""),
        "{content}"
    );
    assert!(content.contains("Creativity level: 8/10"), "{content}");
    assert_eq!(
        (idea["llm_provider"].as_str(), idea["llm_model"].as_str()),
        (Some("up"), Some("echo"))
    );
    let idea_id = idea["idea_id"].as_str().unwrap().to_string();
    let exec = app
        .get(
            &format!(
                "/api/v1/executions/{}",
                idea["execution_id"].as_str().unwrap()
            ),
            Some(&token),
        )
        .await;
    assert_eq!(
        (
            exec.body["source"].as_str(),
            exec.body["prompt_version"].as_i64()
        ),
        (Some("idea"), Some(1))
    );
    assert_eq!(
        exec.body["prompt_id"],
        "01930000-0000-7000-8000-000000000011"
    );

    // A free prompt on another model; bad requests list every problem.
    let free = app
        .post(
            "/api/v1/ai/generate",
            Some(&token),
            json!({"prompt": "a bakery app", "model": "up/ok"}),
        )
        .await;
    assert_eq!(
        (free.status, free.body["idea"]["content"].as_str()),
        (StatusCode::OK, Some("Hello, world!"))
    );
    let bad = app
        .post(
            "/api/v1/ai/generate",
            Some(&token),
            json!({"creativity": 0, "temperature": 9}),
        )
        .await;
    assert_eq!(
        (bad.status, bad.error_code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed")
    );
    assert_eq!(
        bad.body["error"]["details"]["fields"]
            .as_array()
            .unwrap()
            .len(),
        3,
        "{}",
        bad.text
    );

    // A batch: each item answers for itself, one failing.
    let batch = app
        .post(
            "/api/v1/ai/generate/batch",
            Some(&token),
            json!({"items": [{"prompt": "one"}, {"prompt": "two", "model": "up/broken"}, {"category": "food"}, {"prompt": "x", "creativity": 42}]}),
        )
        .await;
    assert_eq!(batch.status, StatusCode::OK, "{}", batch.text);
    assert_eq!(
        (
            batch.body["succeeded"].as_u64(),
            batch.body["failed"].as_u64()
        ),
        (Some(2), Some(2))
    );
    let r = &batch.body["results"];
    assert_eq!(
        (r[0]["status"].as_str(), r[1]["status"].as_str()),
        (Some("succeeded"), Some("failed"))
    );
    assert_eq!(r[1]["error"]["code"], "provider_error");
    assert_eq!(r[3]["error"]["code"], "validation_failed");
    assert!(r[2]["result"]["idea"]["content"]
        .as_str()
        .unwrap()
        .contains("\"food\""));
    let too_many = app
        .post(
            "/api/v1/ai/generate/batch",
            Some(&token),
            json!({"items": vec![json!({"prompt": "x"}); 11]}),
        )
        .await;
    assert_eq!(
        (too_many.status, too_many.error_code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed")
    );

    // SSE with a ticket: what an EventSource does (no headers, GET).
    let ticket = app
        .post("/api/v1/ai/stream/ticket", Some(&token), json!({}))
        .await;
    assert_eq!(ticket.status, StatusCode::CREATED, "{}", ticket.text);
    assert_eq!(ticket.body["expires_in"], 60);
    let t = ticket.body["ticket"].as_str().unwrap().to_string();
    let url = format!(
        "{}/api/v1/ai/stream/generate?ticket={t}&prompt=tell%20me%20a%20story&creativity=3",
        app.base
    );
    let res = app
        .client
        .get(&url)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let events = sse_events(&res.text().await.unwrap());
    let names: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(names.first(), Some(&"start"));
    assert_eq!(names.last(), Some(&"done"));
    assert!(
        names.iter().filter(|n| **n == "token").count() > 10,
        "one event per token: {names:?}"
    );
    let streamed: String = events
        .iter()
        .filter(|e| e.0 == "token")
        .map(|e| e.1["text"].as_str().unwrap())
        .collect();
    assert!(streamed.contains("Request: tell me a story"), "{streamed}");
    let done = &events.last().unwrap().1;
    assert!(
        done["idea_id"].is_string() && done["usage"]["total_tokens"].as_u64().unwrap() > 12,
        "{done}"
    );
    assert!(done.get("cost").is_some());
    // The ticket worked once; a reconnect with it is refused.
    let again = app.client.get(&url).send().await.unwrap();
    assert_eq!(again.status(), StatusCode::UNAUTHORIZED);
    let forged = app
        .client
        .get(format!(
            "{}/api/v1/ai/stream/generate?ticket=muse_st_forged&prompt=x",
            app.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), StatusCode::UNAUTHORIZED);
    // Non-browser clients may use the Authorization header instead.
    let res = app
        .client
        .get(format!(
            "{}/api/v1/ai/stream/generate?category=music",
            app.base
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let tail = sse_events(&res.text().await.unwrap());
    assert_eq!(tail.last().unwrap().0, "done");
    // A failing upstream ends the stream with an error event, or a 502 before it starts.
    let res = app
        .client
        .get(format!(
            "{}/api/v1/ai/stream/generate?prompt=x&model=up/broken",
            app.base
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);

    // History: own ideas, newest first, filters; rating own ideas only.
    let h = app
        .get("/api/v1/ai/ideas/history?per_page=100", Some(&token))
        .await;
    assert_eq!(h.body["total"], 6, "{}", h.text);
    let rated = app
        .post(
            &format!("/api/v1/ai/ideas/{idea_id}/rate"),
            Some(&token),
            json!({"rating": 5, "favorite": true}),
        )
        .await;
    assert_eq!(
        (
            rated.status,
            rated.body["rating"].as_u64(),
            rated.body["favorite"].as_bool()
        ),
        (StatusCode::OK, Some(5), Some(true))
    );
    let five = app
        .get("/api/v1/ai/ideas/history?rating=5", Some(&token))
        .await;
    assert_eq!(
        (
            five.body["total"].as_u64(),
            five.body["items"][0]["idea_id"].as_str()
        ),
        (Some(1), Some(idea_id.as_str()))
    );
    let games = app
        .get("/api/v1/ai/ideas/history?category=games", Some(&token))
        .await;
    assert_eq!(games.body["total"], 1);
    let favs = app
        .get("/api/v1/ai/ideas/history?favorite=true", Some(&token))
        .await;
    assert_eq!(favs.body["total"], 1);
    for bad in [json!({"rating": 0}), json!({"rating": 6}), json!({})] {
        let r = app
            .post(
                &format!("/api/v1/ai/ideas/{idea_id}/rate"),
                Some(&token),
                bad.clone(),
            )
            .await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
    }
    let r = app
        .get("/api/v1/ai/ideas/history?rating=9", Some(&token))
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::BAD_REQUEST, "invalid_query_parameter")
    );

    let other = access(&app.user("other").await);
    let r = app
        .post(
            &format!("/api/v1/ai/ideas/{idea_id}/rate"),
            Some(&other),
            json!({"rating": 1}),
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::NOT_FOUND, "not_found")
    );
    let r = app
        .get(&format!("/api/v1/ai/ideas/{idea_id}"), Some(&other))
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(
        app.get("/api/v1/ai/ideas/history", Some(&other)).await.body["total"],
        0
    );
}
