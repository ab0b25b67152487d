//! Tool calling mapped natively to Anthropic (`tools`, `tool_use` /
//! `tool_result` blocks, `input_json_delta`) and Gemini
//! (`functionDeclarations`, `functionCall` / `functionResponse`), against
//! local servers that answer with the vendors' documented wire formats,
//! recorded in `tests/data/*.json` with the doc page each follows.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Mutex};

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use muse_inference::providers::{
    anthropic::{AnthropicConfig, AnthropicProvider},
    collect,
    gemini::{GeminiConfig, GeminiProvider},
};
use muse_inference::{
    FinishReason, GenerateRequest, LlmProvider, Message, Tool, ToolCall, ToolChoice,
};
use serde_json::{json, Value};

fn fixture(name: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<Value>>>);

/// Answers from the fixtures: a tool call while the conversation has no
/// tool result yet, then the final answer; streamed when asked.
async fn server(seen: Seen) -> String {
    let anthropic = fixture("anthropic_tool_use.json");
    let gemini = fixture("gemini_function_calling.json");
    let srv = HttpServer::new(move || {
        let (a, g, seen_a, seen_g) = (
            anthropic.clone(),
            gemini.clone(),
            seen.clone(),
            seen.clone(),
        );
        App::new()
            .route(
                "/v1/messages",
                web::post().to(move |body: web::Json<Value>| {
                    let (a, seen) = (a.clone(), seen_a.clone());
                    async move {
                        seen.0.lock().unwrap().push(body.0.clone());
                        if body["tool_choice"]["name"] == "json_response" {
                            return HttpResponse::Ok().json(&a["json_mode_response"]);
                        }
                        let answered = body.to_string().contains("tool_result");
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
                        HttpResponse::Ok().json(if answered {
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
                    let (g, seen) = (g.clone(), seen_g.clone());
                    async move {
                        seen.0.lock().unwrap().push(body.0.clone());
                        if body["generationConfig"]["responseMimeType"] == "application/json" {
                            return HttpResponse::Ok().json(&g["json_response"]);
                        }
                        let answered = body.to_string().contains("functionResponse");
                        if req.path().contains("streamGenerateContent") {
                            let frames: String = g["stream"]
                                .as_array()
                                .unwrap()
                                .iter()
                                .map(|c| format!("data: {c}\r\n\r\n"))
                                .collect();
                            return HttpResponse::Ok()
                                .content_type("text/event-stream")
                                .body(frames);
                        }
                        HttpResponse::Ok().json(if answered {
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

fn weather_tool() -> Tool {
    Tool {
        name: "get_weather".into(),
        description: Some("Get the current weather in a given location".into()),
        parameters: Some(
            json!({"type": "object", "properties": {"location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["location"]}),
        ),
        strict: None,
    }
}

fn ask(model: &str) -> GenerateRequest {
    let mut r = GenerateRequest::new(
        model,
        vec![Message::user("What's the weather like in San Francisco?")],
    );
    r.tools = vec![weather_tool()];
    r
}

fn answered(model: &str, call: &ToolCall) -> GenerateRequest {
    let mut r = ask(model);
    let mut turn = Message::assistant("");
    turn.tool_calls = vec![call.clone()];
    r.messages.push(turn);
    r.messages
        .push(Message::tool(call.id.clone(), "15 degrees"));
    r
}

#[actix_web::test]
async fn anthropic_tool_use_round_trip_whole_and_streamed() {
    let seen = Seen::default();
    let base = server(seen.clone()).await;
    let mut config = AnthropicConfig::new("sk-ant-test");
    config.base_url = base;
    let p = AnthropicProvider::new(config).unwrap();
    let doc = fixture("anthropic_tool_use.json");

    let mut req = ask("claude-3-5-sonnet-20241022");
    req.parallel_tool_calls = Some(false);
    let first = p.complete(&req).await.unwrap();
    let sent = seen.0.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        sent["tools"], doc["request_tools"],
        "the tool as the docs write it"
    );
    assert_eq!(
        sent["tool_choice"],
        json!({"type": "auto", "disable_parallel_tool_use": true})
    );
    assert_eq!(first.summary.finish_reason, FinishReason::ToolCalls);
    assert_eq!(
        first.tool_calls,
        [ToolCall {
            id: "toolu_01A09q90qw90lq917835lq9".into(),
            name: "get_weather".into(),
            arguments: json!({"location": "San Francisco, CA", "unit": "celsius"}).to_string(),
        }]
    );
    assert!(first.text.starts_with("<thinking>"));

    let second = p
        .complete(&answered(
            "claude-3-5-sonnet-20241022",
            &first.tool_calls[0],
        ))
        .await
        .unwrap();
    let sent = seen.0.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        sent["messages"],
        json!([
            {"role": "user", "content": [{"type": "text", "text": "What's the weather like in San Francisco?"}]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "get_weather", "input": {"location": "San Francisco, CA", "unit": "celsius"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01A09q90qw90lq917835lq9", "content": "15 degrees"}]}
        ])
    );
    assert!(second.text.contains("15 degrees Celsius"));
    assert_eq!(second.summary.finish_reason, FinishReason::Stop);

    let mut forced = ask("claude-3-5-sonnet-20241022");
    forced.tool_choice = Some(ToolChoice::Function("get_weather".into()));
    p.complete(&forced).await.unwrap();
    let sent = seen.0.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        sent["tool_choice"],
        json!({"type": "tool", "name": "get_weather"})
    );

    let streamed = collect(p.stream(&ask("claude-3-haiku-20240307")).await.unwrap())
        .await
        .unwrap();
    assert_eq!(
        streamed.text,
        "Okay, let's check the weather for San Francisco, CA:"
    );
    assert_eq!(
        streamed.tool_calls,
        [ToolCall {
            id: "toolu_01T1x1fJ34qAmk2tNTrN7Up6".into(),
            name: "get_weather".into(),
            arguments: "{\"location\": \"San Francisco, CA\", \"unit\": \"fahrenheit\"}".into(),
        }]
    );
    assert_eq!(streamed.summary.finish_reason, FinishReason::ToolCalls);
    assert_eq!(streamed.summary.usage.completion_tokens, 89);
}

#[actix_web::test]
async fn gemini_function_calling_round_trip_whole_and_streamed() {
    let seen = Seen::default();
    let base = server(seen.clone()).await;
    let mut config = GeminiConfig::new("gm-test");
    config.base_url = base;
    let p = GeminiProvider::new(config).unwrap();

    let mut req = ask("gemini-2.0-flash");
    req.tool_choice = Some(ToolChoice::Required);
    let first = p.complete(&req).await.unwrap();
    let sent = seen.0.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        sent["tools"],
        json!([{"functionDeclarations": [{"name": "get_weather", "description": "Get the current weather in a given location", "parameters": weather_tool().parameters}]}])
    );
    assert_eq!(
        sent["toolConfig"],
        json!({"functionCallingConfig": {"mode": "ANY"}})
    );
    assert_eq!(first.summary.finish_reason, FinishReason::ToolCalls);
    assert_eq!(first.tool_calls.len(), 1);
    assert_eq!(
        first.tool_calls[0].id, "call_0",
        "Gemini gives no ids: Muse names them"
    );
    assert_eq!(
        serde_json::from_str::<Value>(&first.tool_calls[0].arguments).unwrap(),
        json!({"location": "San Francisco, CA", "unit": "celsius"})
    );

    let second = p
        .complete(&answered("gemini-2.0-flash", &first.tool_calls[0]))
        .await
        .unwrap();
    let sent = seen.0.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        sent["contents"],
        json!([
            {"role": "user", "parts": [{"text": "What's the weather like in San Francisco?"}]},
            {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"location": "San Francisco, CA", "unit": "celsius"}}}]},
            {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"content": "15 degrees"}}}]}
        ])
    );
    assert_eq!(second.text, "It is 15 degrees Celsius in San Francisco.");
    assert_eq!(second.summary.finish_reason, FinishReason::Stop);

    let streamed = collect(p.stream(&ask("gemini-2.0-flash")).await.unwrap())
        .await
        .unwrap();
    assert_eq!(streamed.text, "Checking. ");
    assert_eq!(streamed.tool_calls[0].name, "get_weather");
    assert_eq!(streamed.summary.finish_reason, FinishReason::ToolCalls);
}

fn structured(model: &str) -> GenerateRequest {
    let mut r = GenerateRequest::new(model, vec![Message::user("An idea, as JSON")]);
    r.response_format = Some(muse_inference::ResponseFormat::JsonSchema {
        name: "idea".into(),
        schema: json!({"type": "object", "properties": {"title": {"type": "string"}, "year": {"type": "integer"}}, "required": ["title", "year"]}),
        strict: true,
    });
    r
}

#[actix_web::test]
async fn structured_output_uses_json_mode_on_anthropic_and_a_response_schema_on_gemini() {
    let seen = Seen::default();
    let base = server(seen.clone()).await;
    let mut config = AnthropicConfig::new("sk-ant-test");
    config.base_url = base.clone();
    let anthropic = AnthropicProvider::new(config).unwrap();
    let answer = anthropic
        .complete(&structured("claude-3-5-sonnet-20241022"))
        .await
        .unwrap();
    let sent = seen.0.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        sent["tool_choice"],
        json!({"type": "tool", "name": "json_response"})
    );
    assert_eq!(
        sent["tools"][0]["input_schema"]["required"],
        json!(["title", "year"])
    );
    assert_eq!(
        serde_json::from_str::<Value>(&answer.text).unwrap(),
        json!({"title": "Muse", "year": 2026})
    );
    assert!(
        answer.tool_calls.is_empty(),
        "the forced tool is Muse's, not the caller's"
    );
    assert_eq!(answer.summary.finish_reason, FinishReason::Stop);
    let format = structured("x").response_format.unwrap();
    assert_eq!(format.check(&answer.text), Ok(()));
    assert!(format.check("{\"title\": 1}").is_err());
    assert!(format.check("not json").is_err());

    let mut config = GeminiConfig::new("gm-test");
    config.base_url = base;
    let gemini = GeminiProvider::new(config).unwrap();
    let answer = gemini
        .complete(&structured("gemini-2.0-flash"))
        .await
        .unwrap();
    let sent = seen.0.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        sent["generationConfig"]["responseMimeType"],
        "application/json"
    );
    assert_eq!(
        sent["generationConfig"]["responseJsonSchema"]["required"],
        json!(["title", "year"])
    );
    assert_eq!(format.check(&answer.text), Ok(()));
}
