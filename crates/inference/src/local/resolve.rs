//! Finding a model on disk: a Hugging Face cache (`MODEL_CACHE_DIR`,
//! `models--org--name/refs/main` → `snapshots/<rev>/…`) or a plain
//! directory.

use std::path::{Path, PathBuf};

use crate::error::InferenceError;

/// Where the files of `model` are: `model` may be a directory, or a repo id
/// (`org/name`) looked up in the cache at `cache_dir`. Offline and missing
/// is a clear error naming the model and how to get it.
pub fn resolve_model(cache_dir: &Path, model: &str) -> Result<PathBuf, InferenceError> {
    let direct = Path::new(model);
    if direct.is_absolute() && direct.is_dir() {
        return Ok(direct.to_path_buf());
    }
    if model.contains("..") || model.starts_with('/') || model.split('/').count() != 2 {
        return Err(InferenceError::BadRequest(format!(
            "{model:?} is not a model id (org/name) or a model directory"
        )));
    }
    let cache = hf_hub::Cache::new(cache_dir.to_path_buf());
    let repo = cache.model(model.to_string());
    match repo.get("tokenizer.json") {
        Some(tokenizer) => tokenizer
            .parent()
            .map(Path::to_path_buf)
            .ok_or_else(|| InferenceError::NotConfigured(format!("bad cache layout for {model}"))),
        None => Err(InferenceError::ModelNotFound(format!(
            "{model} is not in the model cache {} (offline). Download it with \
             `huggingface-cli download {model} --cache-dir {}` (it needs tokenizer.json and an ONNX export)",
            cache_dir.display(),
            cache_dir.display()
        ))),
    }
}

/// Repo ids (`org/name`) present in a cache directory, sorted.
pub fn cached_models(cache_dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(cache_dir) else {
        return Vec::new();
    };
    let mut out: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter_map(|n| n.strip_prefix("models--").map(|r| r.replacen("--", "/", 1)))
        .filter(|id| resolve_model(cache_dir, id).is_ok())
        .collect();
    out.sort();
    out
}

/// The ONNX file of a snapshot: `model.onnx`, `onnx/model.onnx`, or the
/// first `onnx/model*.onnx`.
pub fn onnx_file(dir: &Path) -> Result<PathBuf, InferenceError> {
    for candidate in [dir.join("model.onnx"), dir.join("onnx").join("model.onnx")] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    let mut others: Vec<PathBuf> = std::fs::read_dir(dir.join("onnx"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    others.retain(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("model") && n.ends_with(".onnx"))
    });
    others.sort();
    others.into_iter().next().ok_or_else(|| {
        InferenceError::NotConfigured(format!(
            "no ONNX model (model.onnx or onnx/model*.onnx) in {}",
            dir.display()
        ))
    })
}
