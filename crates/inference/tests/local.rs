//! Local models on ONNX Runtime, against the tiny models that
//! `scripts/make_test_models.py` generates (`just test-models`), and against
//! the reference onnxruntime loop in `scripts/reference_generate.py`.
//!
//! Needs `ORT_DYLIB_PATH` (set by `just test`). Without it the tests say so
//! and pass, unless `MUSE_REQUIRE_LOCAL_MODELS=1` (also set by `just test`,
//! so CI never skips them).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr
)]

use std::path::PathBuf;
use std::process::Command;

use muse_inference::local::engine::{DecodeParams, LocalModel, StepControl};
use muse_inference::local::resolve::{cached_models, resolve_model};
use muse_inference::local::sampling::SamplingParams;
use muse_inference::local::text::Detokenizer;
use muse_inference::{FinishReason, InferenceError, Message};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn cache() -> Option<PathBuf> {
    let dir = std::env::var_os("MUSE_TEST_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/test-models/hub"));
    let ready = std::env::var_os("ORT_DYLIB_PATH").is_some()
        && dir.join("models--muse-test--tiny-gpt2").is_dir();
    if !ready {
        if std::env::var("MUSE_REQUIRE_LOCAL_MODELS").as_deref() == Ok("1") {
            panic!("local-model tests required but ORT_DYLIB_PATH or the test models are missing (run `just test-models`)");
        }
        eprintln!("skipping: set ORT_DYLIB_PATH and run `just test-models` (just test does both)");
        return None;
    }
    Some(dir)
}

fn greedy(max: usize) -> DecodeParams {
    DecodeParams {
        max_new_tokens: max,
        sampling: SamplingParams::default(),
    }
}

fn reference(model: &str, prompt: &str, n: usize) -> Vec<u32> {
    let out = Command::new(root().join(".venv/bin/python"))
        .arg(root().join("scripts/reference_generate.py"))
        .args([
            "--model",
            model,
            "--prompt",
            prompt,
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
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["output_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn greedy_output_matches_the_onnxruntime_reference_loop_token_for_token() {
    let Some(cache) = cache() else { return };
    for repo in ["muse-test/tiny-gpt2", "muse-test/tiny-llama"] {
        let dir = resolve_model(&cache, repo).unwrap();
        let mut model = LocalModel::load(&dir, 1).unwrap();
        for prompt in [
            "Once upon a time",
            "Muse gives users accounts and ünïcödé ideas",
        ] {
            let ids = model.encode(prompt).unwrap();
            let (out, finish) = model
                .generate(&ids, &greedy(32), |_| StepControl::Continue)
                .unwrap();
            assert_eq!(finish, FinishReason::Length);
            let expected = reference(dir.to_str().unwrap(), prompt, 32);
            assert_eq!(out, expected, "{repo} / {prompt:?}");
        }
    }
}

#[test]
fn kv_layout_is_read_from_the_model_inputs() {
    let Some(cache) = cache() else { return };
    let gpt2 = LocalModel::load(&resolve_model(&cache, "muse-test/tiny-gpt2").unwrap(), 1).unwrap();
    let l = gpt2.layout();
    assert_eq!(
        (l.layers, l.heads, l.head_dim, l.fp16, l.has_position_ids),
        (2, 4, 16, false, true)
    );
    assert_eq!(gpt2.context_length(), Some(1024));
    assert!(gpt2.weight_bytes() > 100_000);
    let llama =
        LocalModel::load(&resolve_model(&cache, "muse-test/tiny-llama").unwrap(), 1).unwrap();
    assert!(llama.layout().fp16, "fp16 model with external data");
    assert_eq!(
        llama.eos_ids().len(),
        2,
        "generation_config.json lists two stop ids"
    );
    assert_eq!(
        cached_models(&cache),
        [
            "muse-test/tiny-gpt2",
            "muse-test/tiny-llama",
            "muse-test/tiny-minilm"
        ]
    );
}

#[test]
fn streaming_text_never_splits_a_character_and_sampling_is_reproducible() {
    let Some(cache) = cache() else { return };
    let mut model =
        LocalModel::load(&resolve_model(&cache, "muse-test/tiny-gpt2").unwrap(), 1).unwrap();
    let ids = model.encode("Caffè crème").unwrap();
    let (out, _) = model
        .generate(&ids, &greedy(40), |_| StepControl::Continue)
        .unwrap();
    let tok = model.tokenizer().clone();
    // Multi-byte characters split across byte-level tokens come out whole.
    let text = "日本語のテキスト, crème brûlée";
    let text_ids = tok.encode(text, true).unwrap().get_ids().to_vec();
    assert!(
        text_ids.len() > text.chars().count() / 2,
        "the test needs characters split across tokens"
    );
    let mut detok = Detokenizer::new(tok.clone());
    let mut streamed = String::new();
    for id in &text_ids {
        let d = detok.push(*id);
        assert!(
            !d.contains('\u{FFFD}'),
            "half a character was emitted: {d:?}"
        );
        streamed.push_str(&d);
    }
    streamed.push_str(&detok.finish());
    assert_eq!(streamed, text);
    // Model output (random weights: possibly invalid UTF-8): what was
    // emitted is never taken back.
    let mut detok = Detokenizer::new(tok.clone());
    let mut streamed = String::new();
    let full = tok.decode(&out, true).unwrap();
    for id in &out {
        streamed.push_str(&detok.push(*id));
        assert!(full.starts_with(&streamed), "emitted text changed later");
    }
    streamed.push_str(&detok.finish());
    assert_eq!(streamed, full);

    let params = DecodeParams {
        max_new_tokens: 20,
        sampling: SamplingParams {
            temperature: 0.9,
            top_k: Some(20),
            top_p: Some(0.95),
            repetition_penalty: 1.1,
            seed: Some(42),
            ..Default::default()
        },
    };
    let a = model
        .generate(&ids, &params, |_| StepControl::Continue)
        .unwrap()
        .0;
    let b = model
        .generate(&ids, &params, |_| StepControl::Continue)
        .unwrap()
        .0;
    assert_eq!(a, b, "same seed, same tokens");
    let mut seen = 0;
    let (stopped, finish) = model
        .generate(&ids, &greedy(40), |_| {
            seen += 1;
            if seen == 3 {
                StepControl::Stop
            } else {
                StepControl::Continue
            }
        })
        .unwrap();
    assert_eq!((stopped.len(), finish), (3, FinishReason::Stop));
    let cancelled = model.generate(&ids, &greedy(40), |_| StepControl::Cancel);
    assert!(matches!(cancelled, Err(InferenceError::Cancelled)));
}

#[test]
fn chat_templates_and_limits() {
    use muse_inference::local::template::{message_values, ChatInput};
    let Some(cache) = cache() else { return };
    let mut llama =
        LocalModel::load(&resolve_model(&cache, "muse-test/tiny-llama").unwrap(), 1).unwrap();
    let input = |messages: Vec<Message>| ChatInput {
        messages: message_values(&messages),
        add_generation_prompt: true,
        ..Default::default()
    };
    // Llama-2-chat's own template; its BOS comes from the template only.
    let prompt = llama
        .render_chat(&input(vec![
            Message::system("Be brief."),
            Message::user(" Hi "),
        ]))
        .unwrap();
    assert_eq!(
        prompt,
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n Hi [/INST]"
    );
    let chat_ids = llama.encode_chat(&prompt).unwrap();
    assert_eq!(
        chat_ids.iter().filter(|&&i| i == 1).count(),
        1,
        "{chat_ids:?}"
    );
    assert_eq!(
        llama.encode("Hi").unwrap()[0],
        1,
        "a raw prompt gets the tokenizer's BOS"
    );
    // The template's refusal is the caller's error; a model without a
    // template joins the messages.
    assert!(matches!(
        llama.render_chat(&input(vec![Message::user("a"), Message::user("b")])),
        Err(InferenceError::BadRequest(m)) if m.contains("alternate")
    ));
    assert_eq!(
        llama.eos_ids(),
        &[0, 2],
        "generation_config.json's stop ids"
    );
    let long: Vec<u32> = std::iter::repeat_n(300u32, 300).collect();
    assert!(matches!(
        llama.generate(&long, &greedy(4), |_| StepControl::Continue),
        Err(InferenceError::ContextTooLong(_))
    ));
    assert!(matches!(
        llama.generate(&[], &greedy(4), |_| StepControl::Continue),
        Err(InferenceError::BadRequest(_))
    ));
}

#[test]
fn missing_models_are_clear_errors() {
    let dir = std::env::temp_dir().join("muse-empty-cache");
    std::fs::create_dir_all(&dir).unwrap();
    match resolve_model(&dir, "org/not-here") {
        Err(InferenceError::ModelNotFound(m)) => assert!(
            m.contains("org/not-here") && m.contains("muse models pull org/not-here"),
            "{m}"
        ),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        resolve_model(&dir, "../../etc"),
        Err(InferenceError::BadRequest(_))
    ));
}

fn provider(
    cache: &std::path::Path,
    max_queue: usize,
) -> std::sync::Arc<muse_inference::local::LocalProvider> {
    std::sync::Arc::new(muse_inference::local::LocalProvider::new(
        muse_inference::local::LocalConfig {
            cache_dir: cache.to_path_buf(),
            threads: 1,
            max_queue,
            max_active: 4,
            default_max_tokens: 16,
            extra_models: Vec::new(),
            hub: muse_inference::local::download::HubConfig {
                offline: true,
                ..Default::default()
            },
        },
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_provider_streams_through_the_common_trait() {
    use futures::StreamExt;
    use muse_inference::{GenerateRequest, LlmProvider, StreamEvent};
    let Some(cache) = cache() else { return };
    let p = provider(&cache, 4);
    assert_eq!(
        p.available(),
        [
            "muse-test/tiny-gpt2",
            "muse-test/tiny-llama",
            "muse-test/tiny-minilm"
        ]
    );
    let mut req = GenerateRequest::new(
        "muse-test/tiny-llama",
        vec![Message::system("Be brief."), Message::user("Hi")],
    );
    req.max_tokens = Some(12);
    // Loaded on first use, then streamed.
    let mut s = p.stream(&req).await.unwrap();
    let mut text = String::new();
    let mut done = None;
    while let Some(ev) = s.next().await {
        match ev.unwrap() {
            StreamEvent::Delta(t) => text.push_str(&t),
            StreamEvent::Done(sum) => done = Some(sum),
            StreamEvent::ToolCall(c) => panic!("no tools were offered: {c:?}"),
            StreamEvent::Logprobs(l) => panic!("no log-probabilities were asked for: {l:?}"),
        }
    }
    let done = done.unwrap();
    assert_eq!(done.usage.completion_tokens, 12);
    assert!(done.usage.prompt_tokens > 5);
    assert_eq!(done.finish_reason, FinishReason::Length);
    assert!(done.timing.time_to_first_token.is_some());
    assert!(p.is_loaded("muse-test/tiny-llama"));
    let whole = p.complete(&req).await.unwrap();
    assert_eq!(whole.text, text, "greedy: the same answer twice");

    // Two at once: both are served (FIFO on the model's thread).
    let (a, b) = tokio::join!(p.complete(&req), p.complete(&req));
    assert_eq!(a.unwrap().text, b.unwrap().text);

    // Dropping a stream cancels it; the model serves the next request.
    let mut long = req.clone();
    long.max_tokens = Some(200);
    let mut s = p.stream(&long).await.unwrap();
    let _ = s.next().await;
    drop(s);
    assert_eq!(p.complete(&req).await.unwrap().text, text);

    // Stop strings end the answer before the stop text.
    let cut: String = text.chars().skip(3).take(2).collect();
    if !cut.trim().is_empty() && !text.starts_with(&cut) {
        let mut stop = req.clone();
        stop.stop = vec![cut.clone()];
        let c = p.complete(&stop).await.unwrap();
        assert!(
            !c.text.contains(&cut) && text.starts_with(&c.text),
            "{:?} / {:?}",
            c.text,
            text
        );
        assert_eq!(c.summary.finish_reason, FinishReason::Stop);
    }

    assert!(p.unload("muse-test/tiny-llama"));
    assert!(!p.is_loaded("muse-test/tiny-llama"));
    let missing = GenerateRequest::new("org/absent", vec![Message::user("x")]);
    assert!(matches!(
        p.complete(&missing).await,
        Err(InferenceError::ModelNotFound(_))
    ));
}

/// A local server speaking the Hugging Face Hub's download protocol
/// (`/api/models/{repo}/revision/main`, ranged `resolve/main/{file}`),
/// serving one snapshot; it requires `Authorization: Bearer hf_test`.
async fn fake_hub(snapshot: PathBuf, repo: &'static str) -> String {
    fake_hub_with(snapshot, repo, None).await
}

/// [`fake_hub`], serving `corrupt` with its first byte flipped (while the
/// listing still publishes the true size and SHA-256, as the hub does for
/// LFS files).
async fn fake_hub_with(
    snapshot: PathBuf,
    repo: &'static str,
    corrupt: Option<&'static str>,
) -> String {
    use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
    let files: Vec<String> = walk(&snapshot);
    let srv = HttpServer::new(move || {
        let snapshot = snapshot.clone();
        let snapshot_list = snapshot.clone();
        let files = files.clone();
        App::new()
            .route(
                &format!("/api/models/{repo}/revision/main"),
                web::get().to(move |req: HttpRequest| {
                    let files = files.clone();
                    let snapshot_list = snapshot_list.clone();
                    async move {
                        if req
                            .headers()
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            != Some("Bearer hf_test")
                        {
                            return HttpResponse::Unauthorized().finish();
                        }
                        let siblings: Vec<_> = files
                            .iter()
                            .map(|f| {
                                use sha2::Digest;
                                let bytes = std::fs::read(snapshot_list.join(f)).unwrap();
                                let mut entry = serde_json::json!({"rfilename": f, "size": bytes.len()});
                                if f.contains(".onnx") {
                                    let sha: String = sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
                                    entry["lfs"] = serde_json::json!({"sha256": sha, "size": bytes.len(), "pointerSize": 134});
                                }
                                entry
                            })
                            .collect();
                        HttpResponse::Ok()
                            .json(serde_json::json!({"sha": "abc123", "siblings": siblings}))
                    }
                }),
            )
            .route(
                &format!("/{repo}/resolve/main/{{file:.*}}"),
                web::get().to(move |req: HttpRequest, file: web::Path<String>| {
                    let file = file.into_inner();
                    let flip = corrupt == Some(file.as_str());
                    let path = snapshot.join(file);
                    async move {
                        if req
                            .headers()
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            != Some("Bearer hf_test")
                        {
                            return HttpResponse::Unauthorized().finish();
                        }
                        let Ok(mut bytes) = std::fs::read(&path) else {
                            return HttpResponse::NotFound().finish();
                        };
                        if flip {
                            bytes[0] ^= 0xff;
                        }
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
                        HttpResponse::PartialContent()
                            .insert_header(("x-repo-commit", "abc123"))
                            .insert_header(("etag", format!("\"{:x}\"", total)))
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
    format!("http://{addr}")
}

fn walk(root: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out
}

#[actix_web::test]
async fn models_are_downloaded_from_the_hub_when_online_and_never_when_offline() {
    use muse_inference::local::download::{ensure_model, HubConfig};
    let Some(cache) = cache() else { return };
    let source = resolve_model(&cache, "muse-test/tiny-gpt2").unwrap();
    let endpoint = fake_hub(source.clone(), "muse-test/tiny-gpt2").await;
    let empty = std::env::temp_dir().join(format!("muse-dl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&empty);

    let offline = HubConfig {
        endpoint: endpoint.clone(),
        token: Some("hf_test".to_string().into()),
        offline: true,
    };
    match ensure_model(&empty, "muse-test/tiny-gpt2", &offline, |_| {}).await {
        Err(InferenceError::ModelNotFound(m)) => assert!(m.contains("HF_HUB_OFFLINE"), "{m}"),
        other => panic!("{other:?}"),
    }
    let no_token = HubConfig {
        endpoint: endpoint.clone(),
        token: None,
        offline: false,
    };
    assert!(matches!(
        ensure_model(&empty, "muse-test/tiny-gpt2", &no_token, |_| {}).await,
        Err(InferenceError::Auth(_))
    ));

    let online = HubConfig {
        endpoint,
        token: Some("hf_test".to_string().into()),
        offline: false,
    };
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = seen.clone();
    let dir = ensure_model(&empty, "muse-test/tiny-gpt2", &online, move |p| {
        sink.lock().unwrap().push(p)
    })
    .await
    .unwrap();
    let progress = seen.lock().unwrap().clone();
    assert!(
        progress.iter().any(|p| p.file == "onnx/model.onnx"
            && p.done_bytes == p.total_bytes
            && p.total_bytes > 0),
        "{progress:?}"
    );
    // The downloaded copy decodes exactly like the original.
    let ids;
    let expected = {
        let mut m = LocalModel::load(&source, 1).unwrap();
        ids = m.encode("Once upon a time").unwrap();
        m.generate(&ids, &greedy(8), |_| StepControl::Continue)
            .unwrap()
            .0
    };
    let mut m = LocalModel::load(&dir, 1).unwrap();
    assert_eq!(
        m.generate(&ids, &greedy(8), |_| StepControl::Continue)
            .unwrap()
            .0,
        expected
    );
    // Second call: from the cache, no network needed.
    let again = ensure_model(&empty, "muse-test/tiny-gpt2", &offline, |_| {})
        .await
        .unwrap();
    assert_eq!(again, dir);
    let _ = std::fs::remove_dir_all(&empty);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generations_on_one_model_are_interleaved_and_slow_readers_block_nobody() {
    use futures::StreamExt;
    use muse_inference::{GenerateRequest, LlmProvider, StreamEvent};
    use std::time::Instant;
    let Some(cache) = cache() else { return };
    let p = provider(&cache, 8);
    let mut long = GenerateRequest::new(
        "muse-test/tiny-gpt2",
        vec![Message::user("Once upon a time")],
    );
    long.max_tokens = Some(220);
    let mut short = long.clone();
    short.max_tokens = Some(5);
    p.complete(&short).await.unwrap(); // load

    // A long answer read at full speed, and a short one sent just after it:
    // the short one finishes first (round robin, not first come first served).
    let mut a = p.stream(&long).await.unwrap();
    let _ = a.next().await;
    let reader = tokio::spawn(async move {
        while let Some(ev) = a.next().await {
            if let Ok(StreamEvent::Done(_)) = ev {
                return Instant::now();
            }
        }
        panic!("no final event");
    });
    let b = muse_inference::providers::collect(p.stream(&short).await.unwrap())
        .await
        .unwrap();
    let short_done = Instant::now();
    assert_eq!(b.summary.usage.completion_tokens, 5);
    let long_done = reader.await.unwrap();
    assert!(
        short_done < long_done,
        "the short request waited for the long one"
    );

    // A stream nobody reads fills its buffer and pauses; others go on.
    let idle = p.stream(&long).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let c = tokio::time::timeout(std::time::Duration::from_secs(10), p.complete(&short))
        .await
        .expect("not blocked")
        .unwrap();
    assert_eq!(c.summary.usage.completion_tokens, 5);
    drop(idle);
}

#[actix_web::test]
async fn pulls_fetch_one_variant_and_verify_it_against_the_hub() {
    use muse_inference::local::download::{ensure_model_variant, HubConfig};
    use muse_inference::local::resolve::scan_cache;
    let Some(cache) = cache() else { return };
    let source = resolve_model(&cache, "muse-test/tiny-gpt2").unwrap();
    let hub = |endpoint: String| HubConfig {
        endpoint,
        token: Some("hf_test".to_string().into()),
        offline: false,
    };
    let empty = tempfile::tempdir().unwrap();

    // A variant the repository does not publish: refused, naming the ones it has.
    let good = fake_hub(source.clone(), "muse-test/tiny-gpt2").await;
    match ensure_model_variant(
        empty.path(),
        "muse-test/tiny-gpt2",
        &hub(good.clone()),
        Some("q4"),
        |_| {},
    )
    .await
    {
        Err(InferenceError::BadRequest(m)) => {
            assert!(m.contains("no q4") && m.contains("fp32"), "{m}")
        }
        other => panic!("{other:?}"),
    }

    // A corrupted transfer is caught by the hub's SHA-256 and removed.
    let bad = fake_hub_with(
        source.clone(),
        "muse-test/tiny-gpt2",
        Some("onnx/model.onnx"),
    )
    .await;
    match ensure_model_variant(
        empty.path(),
        "muse-test/tiny-gpt2",
        &hub(bad),
        Some("fp32"),
        |_| {},
    )
    .await
    {
        Err(InferenceError::Protocol(m)) => assert!(
            m.contains("SHA-256") && m.contains("onnx/model.onnx"),
            "{m}"
        ),
        other => panic!("{other:?}"),
    }
    let listed = scan_cache(empty.path());
    assert!(
        listed.iter().all(|m| m.problem.is_some()),
        "a failed pull is never servable: {listed:?}"
    );

    // Pulled again from a good hub: complete, verified, servable.
    let dir = ensure_model_variant(
        empty.path(),
        "muse-test/tiny-gpt2",
        &hub(good),
        Some("fp32"),
        |_| {},
    )
    .await
    .unwrap();
    let listed = scan_cache(empty.path());
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].id.as_str(), listed[0].problem.as_deref()),
        ("muse-test/tiny-gpt2", None)
    );
    assert!(listed[0].size_bytes > 100_000);
    assert!(
        dir.join("chat_template.jinja").is_file(),
        "the chat template file comes along"
    );
}

#[test]
fn models_without_a_template_join_and_broken_templates_are_the_servers_fault() {
    use muse_inference::local::template::{message_values, ChatInput};
    let Some(cache) = cache() else { return };
    let source = resolve_model(&cache, "muse-test/tiny-gpt2").unwrap();
    let copy = |dir: &std::path::Path| {
        std::fs::create_dir_all(dir.join("onnx")).unwrap();
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "config.json",
            "onnx/model.onnx",
        ] {
            std::fs::copy(source.join(f), dir.join(f)).unwrap();
        }
    };
    let input = ChatInput {
        messages: message_values(&[
            Message::user("a"),
            Message::assistant("b"),
            Message::user("c"),
        ]),
        add_generation_prompt: true,
        ..Default::default()
    };

    // No chat_template.jinja: the messages, one per line.
    let plain = tempfile::tempdir().unwrap();
    copy(plain.path());
    let model = LocalModel::load_named(plain.path(), "org/plain", 1).unwrap();
    assert!(!model.has_chat_template());
    assert_eq!(model.render_chat(&input).unwrap(), "a\nb\nc");

    // A template that does not parse: the model still loads (raw prompts
    // work); chats get the model's error, naming the model, not the path.
    let broken = tempfile::tempdir().unwrap();
    copy(broken.path());
    std::fs::write(
        broken.path().join("chat_template.jinja"),
        "{% for m in messages %}{{ m.content ",
    )
    .unwrap();
    let model = LocalModel::load_named(broken.path(), "org/broken", 1).unwrap();
    assert!(model.encode("Once upon a time").is_ok());
    match model.render_chat(&input) {
        Err(InferenceError::BrokenModel(m)) => {
            assert!(
                m.contains("org/broken") && m.contains("does not parse"),
                "{m}"
            );
            assert!(!m.contains(&broken.path().display().to_string()), "{m}");
        }
        other => panic!("{other:?}"),
    }

    // Files that do not load: the model's name, not the server's path.
    std::fs::write(broken.path().join("onnx/model.onnx"), b"not onnx").unwrap();
    match LocalModel::load_named(broken.path(), "org/broken", 1) {
        Err(InferenceError::BrokenModel(m)) => {
            assert!(m.contains("org/broken"), "{m}");
            assert!(!m.contains(&broken.path().display().to_string()), "{m}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_sentence_embeddings_equal_the_onnxruntime_reference() {
    use muse_inference::{EmbedRequest, GenerateRequest, LlmProvider};
    let Some(cache) = cache() else { return };
    let p = provider(&cache, 4);
    let texts = vec![
        "Muse writes ideas.".to_string(),
        "Ünïcödé café, crème brûlée — and a longer sentence about cats and dogs.".to_string(),
    ];
    let request = EmbedRequest {
        model: "muse-test/tiny-minilm".into(),
        inputs: texts.clone(),
        dimensions: None,
    };
    let got = p.embed(&request).await.unwrap();
    let dir = resolve_model(&cache, "muse-test/tiny-minilm").unwrap();
    let out = Command::new(root().join(".venv/bin/python"))
        .arg(root().join("scripts/reference_embed.py"))
        .args(["--model", dir.to_str().unwrap()])
        .args(&texts)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reference: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let want = reference["vectors"].as_array().unwrap();
    assert_eq!(got.vectors.len(), 2);
    for (v, w) in got.vectors.iter().zip(want) {
        let w: Vec<f64> = w
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(v.len(), w.len());
        let worst = v
            .iter()
            .zip(&w)
            .map(|(a, b)| (f64::from(*a) - b).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-5, "largest difference {worst}");
        let norm: f64 = v
            .iter()
            .map(|x| f64::from(*x) * f64::from(*x))
            .sum::<f64>()
            .sqrt();
        assert!(
            (norm - 1.0).abs() < 1e-5,
            "normalised as modules.json says: {norm}"
        );
    }
    assert!(got.usage.prompt_tokens > 10);

    // An embedding model is not a chat model, and the other way round.
    let chat = GenerateRequest::new(
        "muse-test/tiny-minilm",
        vec![muse_inference::Message::user("hi")],
    );
    assert!(matches!(
        p.complete(&chat).await,
        Err(InferenceError::Unsupported { .. })
    ));
    let wrong = EmbedRequest {
        model: "muse-test/tiny-gpt2".into(),
        ..request
    };
    assert!(matches!(
        p.embed(&wrong).await,
        Err(InferenceError::Unsupported { .. })
    ));
}

/// Tool calling and JSON mode on a local model whose chat template takes
/// tools: Qwen2.5's real template (Hermes-style `<tool_call>` calls) on
/// the tiny GPT-2's weights and tokenizer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_tool_calls_and_json_mode_follow_the_templates_format() {
    use futures::StreamExt;
    use muse_inference::{
        GenerateRequest, LlmProvider, ResponseFormat, StreamEvent, Tool, ToolCall,
        ToolCallCollector, ToolChoice,
    };
    let Some(cache) = cache() else { return };
    let source = resolve_model(&cache, "muse-test/tiny-gpt2").unwrap();
    let corpus: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/data/chat_templates/corpus.json")).unwrap(),
    )
    .unwrap();
    let qwen = corpus
        .iter()
        .find(|t| t["model"] == "Qwen/Qwen2.5-7B-Instruct")
        .unwrap()["template"]
        .as_str()
        .unwrap()
        .to_string();
    let dir = tempfile::tempdir().unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json", "config.json"] {
        std::fs::copy(source.join(f), dir.path().join(f)).unwrap();
    }
    std::fs::copy(
        source.join("onnx/model.onnx"),
        dir.path().join("model.onnx"),
    )
    .unwrap();
    std::fs::write(dir.path().join("chat_template.jinja"), &qwen).unwrap();
    let p = provider(&cache, 8);
    p.add_dir("org/tiny-qwen-tools", dir.path().to_path_buf())
        .unwrap();
    let tokenizer = tokenizers::Tokenizer::from_file(source.join("tokenizer.json")).unwrap();
    let close = tokenizer.token_to_id("}").expect("a } token");

    let weather = Tool {
        name: "get_weather".into(),
        description: Some("The weather in a city".into()),
        parameters: Some(
            serde_json::json!({"type": "object", "properties": {"city": {"type": "string"}}}),
        ),
        strict: None,
    };
    let time = Tool {
        name: "get_time".into(),
        description: None,
        parameters: None,
        strict: None,
    };
    let mut req = GenerateRequest::new(
        "org/tiny-qwen-tools",
        vec![Message::user("What is the weather in Paris?")],
    );
    req.tools = vec![weather.clone(), time.clone()];
    req.max_tokens = Some(120);

    // `required`: the model writes one call in its template's format (the
    // bias on `}` makes the tiny model close the arguments at once).
    let mut required = req.clone();
    required.tool_choice = Some(ToolChoice::Required);
    required.logit_bias = [(close, 100.0)].into_iter().collect();
    let c = p.complete(&required).await.unwrap();
    assert_eq!(c.summary.finish_reason, FinishReason::ToolCalls, "{c:?}");
    assert_eq!(c.tool_calls.len(), 1, "{c:?}");
    let call: &ToolCall = &c.tool_calls[0];
    assert!(
        ["get_weather", "get_time"].contains(&call.name.as_str()),
        "{call:?}"
    );
    assert!(call.id.starts_with("call_"));
    assert!(
        serde_json::from_str::<serde_json::Value>(&call.arguments)
            .unwrap()
            .is_object(),
        "{call:?}"
    );
    assert_eq!(c.text, "", "the call is not shown as text");

    // A named function, streamed, sampled with a seed: that function, as
    // index-addressed fragments.
    let mut named = required.clone();
    named.tool_choice = Some(ToolChoice::Function("get_time".into()));
    named.temperature = Some(1.0);
    named.seed = Some(3);
    let mut s = p.stream(&named).await.unwrap();
    let mut calls = ToolCallCollector::default();
    let mut text = String::new();
    let mut finish = None;
    while let Some(ev) = s.next().await {
        match ev.unwrap() {
            StreamEvent::Delta(t) => text.push_str(&t),
            StreamEvent::ToolCall(d) => calls.push(&d),
            StreamEvent::Done(sum) => finish = Some(sum.finish_reason),
            StreamEvent::Logprobs(l) => panic!("not asked for: {l:?}"),
        }
    }
    let calls = calls.finish();
    assert_eq!(finish, Some(FinishReason::ToolCalls));
    assert_eq!(
        (calls.len(), calls[0].name.as_str(), text.as_str()),
        (1, "get_time", "")
    );

    // `auto`: the tiny model answers in text; the tools reached the prompt
    // through the template (more prompt tokens than without them).
    let auto = p.complete(&req).await.unwrap();
    assert!(
        auto.tool_calls.is_empty() && !auto.text.is_empty(),
        "{auto:?}"
    );
    let mut plain = req.clone();
    plain.tools.clear();
    let without = p.complete(&plain).await.unwrap();
    assert!(
        auto.summary.usage.prompt_tokens > without.summary.usage.prompt_tokens + 20,
        "{} vs {}",
        auto.summary.usage.prompt_tokens,
        without.summary.usage.prompt_tokens
    );

    // A round trip: the call and its result go back through the template.
    let mut round = req.clone();
    let mut asked = Message::assistant("");
    asked.tool_calls = vec![call.clone()];
    round.messages.push(asked);
    round
        .messages
        .push(Message::tool(call.id.clone(), "{\"celsius\": 21}"));
    round.max_tokens = Some(8);
    let answer = p.complete(&round).await.unwrap();
    assert!(answer.summary.usage.completion_tokens > 0);

    // JSON mode: an object, whatever the tiny model would rather write.
    let mut json = plain.clone();
    json.response_format = Some(ResponseFormat::JsonObject);
    json.logit_bias = [(close, 100.0)].into_iter().collect();
    let j = p.complete(&json).await.unwrap();
    assert!(ResponseFormat::JsonObject.check(&j.text).is_ok(), "{j:?}");
    assert_eq!(j.summary.finish_reason, FinishReason::Stop);
    // Without help it still writes nothing but JSON, cut at max_tokens.
    json.logit_bias.clear();
    json.max_tokens = Some(24);
    let j = p.complete(&json).await.unwrap();
    assert!(j.text.trim_start().starts_with('{'), "{j:?}");

    // A template without tools: refused by name, naming the model.
    let mut gpt2 = req.clone();
    gpt2.model = "muse-test/tiny-gpt2".into();
    match p.complete(&gpt2).await {
        Err(InferenceError::Unsupported { param, message }) => {
            assert_eq!(param, "tools");
            assert!(
                message.contains("muse-test/tiny-gpt2") && message.contains("does not take tools"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    // Token ids outside the vocabulary are the caller's mistake.
    let mut bias = plain.clone();
    bias.logit_bias = [(1_000_000, 5.0)].into_iter().collect();
    assert!(
        matches!(p.complete(&bias).await, Err(InferenceError::BadRequest(m)) if m.contains("1000000"))
    );
}

/// Log-probabilities of a local answer: one entry per generated token, the
/// model's own distribution (greedy picks the likeliest), alternatives
/// likeliest first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_answers_carry_log_probabilities_when_asked() {
    use futures::StreamExt;
    use muse_inference::{GenerateRequest, LlmProvider, StreamEvent};
    let Some(cache) = cache() else { return };
    let p = provider(&cache, 4);
    let mut req = GenerateRequest::completion("muse-test/tiny-gpt2", "Once upon a time");
    req.max_tokens = Some(10);
    req.temperature = Some(0.0);
    let plain = p.complete(&req).await.unwrap();
    assert!(plain.logprobs.is_empty(), "not asked, not given");
    req.logprobs = Some(3);
    let c = p.complete(&req).await.unwrap();
    assert_eq!(c.text, plain.text, "asking changes nothing in the answer");
    assert_eq!(c.logprobs.len() as u32, c.summary.usage.completion_tokens);
    for t in &c.logprobs {
        assert!(t.logprob <= 0.0, "{t:?}");
        assert_eq!(t.top_logprobs.len(), 3);
        assert!(t
            .top_logprobs
            .windows(2)
            .all(|w| w[0].logprob >= w[1].logprob));
        assert_eq!(
            (t.top_logprobs[0].token.as_str(), t.top_logprobs[0].logprob),
            (t.token.as_str(), t.logprob),
            "greedy takes the likeliest token"
        );
        let mass: f64 = t.top_logprobs.iter().map(|a| a.logprob.exp()).sum();
        assert!(mass <= 1.0 + 1e-9);
        assert_eq!(t.bytes.as_deref(), Some(t.token.as_bytes()));
    }
    let mut s = p.stream(&req).await.unwrap();
    let mut streamed = Vec::new();
    while let Some(ev) = s.next().await {
        if let StreamEvent::Logprobs(l) = ev.unwrap() {
            streamed.extend(l);
        }
    }
    assert_eq!(streamed, c.logprobs, "the same, streamed");
}
