//! Local decode speed: time to first token and tokens/s of Muse's KV-cache
//! loop on one model, greedy, best of a few runs. Prints one JSON line.
//!
//! `ORT_DYLIB_PATH=… cargo run --release -p muse-inference --example local_decode -- DIR PROMPT NEW_TOKENS THREADS`
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::panic
)]

use std::path::PathBuf;
use std::time::Instant;

use muse_inference::local::engine::{DecodeParams, LocalModel, StepControl};
use muse_inference::local::resolve::resolve_model;
use muse_inference::local::sampling::SamplingParams;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let model = PathBuf::from(
        args.get(1)
            .expect("model directory (an HF cache repo dir or a snapshot)"),
    );
    let prompt = args
        .get(2)
        .cloned()
        .unwrap_or_else(|| "Once upon a time there was".into());
    let new_tokens: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(64);
    let threads: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(1);
    let repeat: usize = args.get(5).and_then(|s| s.parse().ok()).unwrap_or(3).max(1);
    let dir = if model.join("refs/main").exists() {
        let cache = model.parent().unwrap();
        let repo = model
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .trim_start_matches("models--")
            .replacen("--", "/", 1);
        resolve_model(cache, &repo).unwrap()
    } else {
        model
    };
    let mut engine = LocalModel::load(&dir, threads).unwrap();
    let ids = engine.encode(&prompt).unwrap();
    let params = DecodeParams {
        max_new_tokens: new_tokens,
        sampling: SamplingParams::default(),
    };
    engine
        .generate(
            &ids,
            &DecodeParams {
                max_new_tokens: 8,
                ..params.clone()
            },
            |_| StepControl::Continue,
        )
        .unwrap();
    let mut best: Option<(f64, f64, f64)> = None;
    for _ in 0..repeat {
        let start = Instant::now();
        let mut first = None;
        let (out, _) = engine
            .generate(&ids, &params, |_| {
                first.get_or_insert_with(|| start.elapsed().as_secs_f64());
                StepControl::Continue
            })
            .unwrap();
        let total = start.elapsed().as_secs_f64();
        let ttft = first.unwrap_or(total);
        let decode_tps = (out.len().saturating_sub(1)) as f64 / (total - ttft).max(1e-9);
        if best.is_none_or(|b| decode_tps > b.1) {
            best = Some((ttft, decode_tps, out.len() as f64 / total));
        }
    }
    let (ttft, decode_tps, tps) = best.unwrap();
    println!(
        "{{\"ttft_seconds\": {ttft}, \"decode_tokens_per_second\": {decode_tps}, \"tokens_per_second\": {tps}, \"weight_bytes\": {}, \"threads\": {threads}}}",
        engine.weight_bytes()
    );
}
