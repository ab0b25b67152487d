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
            "{model} is not in the local model cache. Download it with \
             `muse models pull {model}` (it needs tokenizer.json and an ONNX export), \
             or name it in LOCAL_MODELS to have it pulled on first use"
        ))),
    }
}

/// One model repository found in a cache, servable or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedModel {
    /// `org/name`.
    pub id: String,
    /// Bytes of the snapshot's files.
    pub size_bytes: u64,
    /// Why it cannot be served, when it cannot.
    pub problem: Option<String>,
}

/// Why the files of `dir` cannot be served as a local causal LM, if they
/// cannot (checked from file names only; loading may still fail).
pub fn servable_problem(dir: &Path) -> Option<String> {
    let has = |f: &str| dir.join(f).is_file();
    let has_onnx = onnx_file(dir).is_ok();
    if !has_onnx {
        let weights = [
            "model.safetensors",
            "model.safetensors.index.json",
            "pytorch_model.bin",
            "pytorch_model.bin.index.json",
        ]
        .iter()
        .any(|f| has(f));
        return Some(if weights {
            "no ONNX export (only PyTorch/safetensors weights); look for an ONNX export of this model (e.g. under onnx-community/) and pull that".into()
        } else {
            "no ONNX model (model.onnx or onnx/model*.onnx)".into()
        });
    }
    if !has("tokenizer.json") {
        return Some("no tokenizer.json (a fast tokenizer is needed)".into());
    }
    None
}

fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                dir_size(&p)
            } else {
                // Snapshots hold symlinks to blobs: follow them.
                std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0)
            }
        })
        .sum()
}

/// Every model repository in a cache (`models--org--name` with a
/// `refs/main` snapshot), sorted, each with its size and — when it cannot
/// be served — the reason.
pub fn scan_cache(cache_dir: &Path) -> Vec<CachedModel> {
    let Ok(entries) = std::fs::read_dir(cache_dir) else {
        return Vec::new();
    };
    let mut out: Vec<CachedModel> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            let id = name.strip_prefix("models--")?.replacen("--", "/", 1);
            let rev = std::fs::read_to_string(e.path().join("refs").join("main")).ok()?;
            let snapshot = e.path().join("snapshots").join(rev.trim());
            if !snapshot.is_dir() {
                return Some(CachedModel {
                    id,
                    size_bytes: 0,
                    problem: Some("incomplete download (no snapshot); pull it again".into()),
                });
            }
            Some(CachedModel {
                size_bytes: dir_size(&snapshot),
                problem: servable_problem(&snapshot),
                id,
            })
        })
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
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
