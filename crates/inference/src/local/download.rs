//! Getting a model into the cache from the Hugging Face Hub (hf-hub), when
//! online. `HF_HUB_OFFLINE=1` forbids it; `HF_TOKEN` authenticates.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use muse_core::Secret;

use super::resolve::resolve_model;
use crate::error::InferenceError;

/// Where and how to download.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// `https://huggingface.co`, or a mirror.
    pub endpoint: String,
    pub token: Option<Secret<String>>,
    /// `HF_HUB_OFFLINE`: never touch the network.
    pub offline: bool,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            endpoint: "https://huggingface.co".into(),
            token: None,
            offline: false,
        }
    }
}

impl HubConfig {
    /// From `HF_ENDPOINT`, `HF_TOKEN` and `HF_HUB_OFFLINE`.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        Self {
            endpoint: var("HF_ENDPOINT")
                .unwrap_or_else(|| "https://huggingface.co".into())
                .trim_end_matches('/')
                .to_string(),
            token: var("HF_TOKEN").map(Secret::new),
            offline: var("HF_HUB_OFFLINE").is_some_and(|v| {
                matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
            }),
        }
    }
}

/// Reports progress where operators look: the
/// `model_download_progress_ratio{model,file}` gauge and an info log line.
pub fn report(p: &DownloadProgress) {
    let ratio = if p.total_bytes == 0 {
        1.0
    } else {
        p.done_bytes as f64 / p.total_bytes as f64
    };
    metrics::gauge!("model_download_progress_ratio", "model" => p.model.clone(), "file" => p.file.clone()).set(ratio);
    tracing::info!(model = %p.model, file = %p.file, done = p.done_bytes, total = p.total_bytes, "downloading");
}

/// Download progress of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadProgress {
    pub model: String,
    pub file: String,
    pub done_bytes: u64,
    pub total_bytes: u64,
}

type ProgressFn = Arc<dyn Fn(DownloadProgress) + Send + Sync>;

#[derive(Clone)]
struct Reporter {
    model: String,
    file: String,
    done: u64,
    total: u64,
    last_reported: u64,
    sink: ProgressFn,
}

impl hf_hub::api::tokio::Progress for Reporter {
    async fn init(&mut self, size: usize, filename: &str) {
        self.file = filename.to_string();
        self.total = size as u64;
        self.done = 0;
        self.report();
    }

    async fn update(&mut self, size: usize) {
        self.done += size as u64;
        // At most ~20 reports per file.
        if self.done - self.last_reported >= (self.total / 20).max(1) {
            self.report();
        }
    }

    async fn finish(&mut self) {
        self.done = self.total;
        self.report();
    }
}

impl Reporter {
    fn report(&mut self) {
        self.last_reported = self.done;
        (self.sink)(DownloadProgress {
            model: self.model.clone(),
            file: self.file.clone(),
            done_bytes: self.done,
            total_bytes: self.total,
        });
    }
}

/// The ONNX variants a repository publishes (transformers.js layout:
/// `onnx/model.onnx` is `fp32`, `onnx/model_<variant>.onnx` the others).
pub fn variants(files: &[String]) -> Vec<String> {
    let mut out: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let name = f.strip_prefix("onnx/").unwrap_or(f);
            if name == "model.onnx" {
                return Some("fp32".to_string());
            }
            name.strip_prefix("model_")?
                .strip_suffix(".onnx")
                .map(str::to_string)
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The files a causal-LM ONNX export needs, from a repo's file list: one
/// ONNX variant (`variant`: `fp32`, `fp16`, `int8`, `q4`, …; default the
/// full-precision one), its external data, the tokenizer and the configs
/// — never the whole repository.
pub fn files_to_fetch(
    files: &[String],
    variant: Option<&str>,
) -> Result<Vec<String>, InferenceError> {
    let has = |f: &str| files.iter().any(|x| x == f);
    if !has("tokenizer.json") {
        return Err(InferenceError::NotConfigured(
            "the repo has no tokenizer.json".into(),
        ));
    }
    if let Some(v) = variant {
        let wanted = if v == "fp32" {
            vec!["onnx/model.onnx".to_string(), "model.onnx".to_string()]
        } else {
            vec![format!("onnx/model_{v}.onnx"), format!("model_{v}.onnx")]
        };
        let Some(onnx) = wanted.into_iter().find(|f| has(f)) else {
            return Err(InferenceError::BadRequest(format!(
                "the repo has no {v} ONNX variant (it has: {})",
                variants(files).join(", ")
            )));
        };
        return Ok(with_companions(files, onnx));
    }
    let onnx = ["model.onnx", "onnx/model.onnx"]
        .into_iter()
        .find(|f| has(f))
        .map(str::to_string)
        .or_else(|| {
            let mut c: Vec<&String> = files
                .iter()
                .filter(|f| f.starts_with("onnx/model") && f.ends_with(".onnx"))
                .collect();
            c.sort();
            c.first().map(|s| s.to_string())
        })
        .ok_or_else(|| {
            InferenceError::NotConfigured(
                "the repo has no ONNX export (model.onnx or onnx/model*.onnx)".into(),
            )
        })?;
    Ok(with_companions(files, onnx))
}

/// An ONNX file with its external data, the tokenizer and config files.
fn with_companions(files: &[String], onnx: String) -> Vec<String> {
    let has = |f: &str| files.iter().any(|x| x == f);
    let mut out = vec!["tokenizer.json".to_string()];
    out.extend(
        [
            "tokenizer_config.json",
            "special_tokens_map.json",
            "chat_template.jinja",
            "chat_template.json",
            "config.json",
            "generation_config.json",
        ]
        .into_iter()
        .filter(|f| has(f))
        .map(str::to_string),
    );
    out.extend(
        files
            .iter()
            .filter(|f| {
                f.starts_with(&format!("{onnx}_data")) || f.starts_with(&format!("{onnx}.data"))
            })
            .cloned(),
    );
    out.push(onnx);
    out
}

/// The model's snapshot directory, downloading it first when it is not in
/// the cache (and the hub may be used). Blocking callers use
/// `Handle::block_on` from a blocking thread.
pub async fn ensure_model(
    cache_dir: &Path,
    model: &str,
    hub: &HubConfig,
    progress: impl Fn(DownloadProgress) + Send + Sync + 'static,
) -> Result<PathBuf, InferenceError> {
    ensure_model_variant(cache_dir, model, hub, None, progress).await
}

/// [`ensure_model`] for one ONNX variant (`fp32`, `fp16`, `int8`, `q4`, …).
pub async fn ensure_model_variant(
    cache_dir: &Path,
    model: &str,
    hub: &HubConfig,
    variant: Option<&str>,
    progress: impl Fn(DownloadProgress) + Send + Sync + 'static,
) -> Result<PathBuf, InferenceError> {
    match resolve_model(cache_dir, model) {
        Ok(dir) if super::resolve::servable_problem(&dir).is_none() => return Ok(dir),
        Ok(_) => {}
        Err(InferenceError::ModelNotFound(_)) if hub.offline => {
            return Err(InferenceError::ModelNotFound(format!(
                "{model} is not in the local model cache and HF_HUB_OFFLINE is set: no download attempted \
                 (unset HF_HUB_OFFLINE on a machine that can reach the hub and run `muse models pull {model}`, \
                 or copy its files into MODEL_CACHE_DIR in the Hugging Face cache layout)"
            )))
        }
        Err(InferenceError::ModelNotFound(_)) => {}
        Err(e) => return Err(e),
    }
    let api = hf_hub::api::tokio::ApiBuilder::new()
        .with_endpoint(hub.endpoint.clone())
        .with_cache_dir(cache_dir.to_path_buf())
        .with_token(hub.token.as_ref().map(|t| t.expose().clone()))
        .with_progress(false)
        .build()
        .map_err(|e| InferenceError::NotConfigured(format!("Hugging Face client: {e}")))?;
    let repo = api.model(model.to_string());
    let hub_err = |what: &str, e: hf_hub::api::tokio::ApiError| {
        let text = crate::error::strip_url(&e.to_string());
        if text.contains("401") || text.contains("403") {
            InferenceError::Auth(format!(
                "{what} {model}: {text} (set HF_TOKEN for gated or private models)"
            ))
        } else if text.contains("404") {
            InferenceError::ModelNotFound(format!("{model} is not on the hub: {text}"))
        } else {
            InferenceError::Connection(format!(
                "{what} {model}: the Hugging Face Hub at {} cannot be reached ({text}); check the network \
                 or HF_ENDPOINT, or pull the model on a machine that can reach it and copy it into \
                 MODEL_CACHE_DIR (HF_HUB_OFFLINE=1 stops these attempts)",
                hub.endpoint
            ))
        }
    };
    let listing = hub_files(&repo, model, hub).await?;
    let files: Vec<String> = listing.keys().cloned().collect();
    let sink: ProgressFn = Arc::new(progress);
    for file in files_to_fetch(&files, variant)? {
        let reporter = Reporter {
            model: model.to_string(),
            file: file.clone(),
            done: 0,
            total: 0,
            last_reported: 0,
            sink: sink.clone(),
        };
        let path = repo
            .download_with_progress(&file, reporter)
            .await
            .map_err(|e| hub_err("cannot download", e))?;
        if let Some(expected) = listing.get(&file) {
            let (expected, path, name) =
                (expected.clone(), path.clone(), format!("{file} of {model}"));
            tokio::task::spawn_blocking(move || verify(&path, &expected, &name))
                .await
                .map_err(|e| {
                    InferenceError::NotConfigured(format!("verification failed to run: {e}"))
                })??;
        }
    }
    resolve_model(cache_dir, model)
}

/// What the hub publishes about one file (`?blobs=true`): its size, and the
/// SHA-256 of large (LFS) files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HubFile {
    pub size: Option<u64>,
    pub sha256: Option<String>,
}

/// The repository's files with their sizes and hashes.
async fn hub_files(
    repo: &hf_hub::api::tokio::ApiRepo,
    model: &str,
    hub: &HubConfig,
) -> Result<std::collections::BTreeMap<String, HubFile>, InferenceError> {
    let response = repo
        .info_request()
        .query(&[("blobs", "true")])
        .send()
        .await
        .map_err(|e| {
            InferenceError::Connection(format!(
                "cannot list {model}: the Hugging Face Hub at {} cannot be reached ({}); check the network \
                 or HF_ENDPOINT, or pull the model on a machine that can reach it and copy it into \
                 MODEL_CACHE_DIR (HF_HUB_OFFLINE=1 stops these attempts)",
                hub.endpoint,
                crate::error::strip_url(&e.to_string())
            ))
        })?;
    let status = response.status().as_u16();
    match status {
        200 => {}
        401 | 403 => {
            return Err(InferenceError::Auth(format!(
                "cannot list {model}: HTTP {status} (set HF_TOKEN for gated or private models)"
            )))
        }
        404 => {
            return Err(InferenceError::ModelNotFound(format!(
                "{model} is not on the hub (HTTP 404)"
            )))
        }
        s => {
            return Err(InferenceError::Upstream {
                status: Some(s),
                message: format!("cannot list {model} on the hub"),
            })
        }
    }
    let v: serde_json::Value = response.json().await.map_err(|e| {
        InferenceError::Protocol(format!("the hub's listing of {model} is unreadable: {e}"))
    })?;
    Ok(v["siblings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| {
            let name = s["rfilename"].as_str()?.to_string();
            let size = s["lfs"]["size"].as_u64().or_else(|| s["size"].as_u64());
            let sha256 = s["lfs"]["sha256"].as_str().map(str::to_ascii_lowercase);
            Some((name, HubFile { size, sha256 }))
        })
        .collect())
}

/// Checks a downloaded file against the hub's size and SHA-256; a file that
/// does not match is removed (so the next pull fetches it again).
pub fn verify(path: &Path, expected: &HubFile, name: &str) -> Result<(), InferenceError> {
    use sha2::Digest;
    use std::io::Read;
    let fail = |what: String| {
        let blob = std::fs::canonicalize(path).ok();
        let _ = std::fs::remove_file(path);
        if let Some(b) = blob {
            let _ = std::fs::remove_file(b);
        }
        InferenceError::Protocol(format!(
            "{name} {what}: the download was removed, pull it again"
        ))
    };
    let len = std::fs::metadata(path)
        .map_err(|e| InferenceError::NotConfigured(format!("{name}: {e}")))?
        .len();
    if let Some(size) = expected.size {
        if len != size {
            return Err(fail(format!("has {len} bytes where the hub says {size}")));
        }
    }
    if let Some(want) = &expected.sha256 {
        let mut file = std::fs::File::open(path)
            .map_err(|e| InferenceError::NotConfigured(format!("{name}: {e}")))?;
        let mut hasher = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file
                .read(&mut buf)
                .map_err(|e| InferenceError::NotConfigured(format!("{name}: {e}")))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let got = hex_lower(&hasher.finalize());
        if &got != want {
            return Err(fail(format!("has SHA-256 {got} where the hub says {want}")));
        }
    }
    Ok(())
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_export_and_its_data() {
        let files: Vec<String> = [
            "README.md",
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "onnx/model.onnx",
            "onnx/model.onnx_data",
            "onnx/model_quantized.onnx",
            "pytorch_model.bin",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            files_to_fetch(&files, None).unwrap(),
            [
                "tokenizer.json",
                "tokenizer_config.json",
                "config.json",
                "onnx/model.onnx_data",
                "onnx/model.onnx"
            ]
        );
        assert!(files_to_fetch(&["model.onnx".to_string()], None).is_err());
        assert!(files_to_fetch(&["tokenizer.json".to_string()], None).is_err());
        assert_eq!(variants(&files), ["fp32", "quantized"]);
        assert_eq!(
            files_to_fetch(&files, Some("quantized")).unwrap(),
            [
                "tokenizer.json",
                "tokenizer_config.json",
                "config.json",
                "onnx/model_quantized.onnx"
            ]
        );
        match files_to_fetch(&files, Some("q4")) {
            Err(InferenceError::BadRequest(m)) => assert!(m.contains("fp32, quantized"), "{m}"),
            other => panic!("{other:?}"),
        }
    }
}
