//! The ONNX Runtime shared library, loaded once per process from
//! `ORT_DYLIB_PATH` (ort's `load-dynamic`). When it is missing, remote
//! providers keep working and local models answer a clear error.

use std::path::PathBuf;
use std::sync::OnceLock;

use crate::error::InferenceError;

static RUNTIME: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

/// Loads ONNX Runtime (once). The library is `ORT_DYLIB_PATH`.
pub fn ensure_runtime() -> Result<(), InferenceError> {
    environment().map(|_| ())
}

/// The process-wide ONNX Runtime environment.
pub fn environment() -> Result<&'static ort::environment::Environment, InferenceError> {
    let result = RUNTIME.get_or_init(|| {
        let path = std::env::var_os("ORT_DYLIB_PATH")
            .map(PathBuf::from)
            .ok_or_else(|| {
                "ONNX Runtime is not available: set ORT_DYLIB_PATH to libonnxruntime.so \
             (`just run` installs it into .venv from the onnxruntime wheel)"
                    .to_string()
            })?;
        if !path.is_file() {
            return Err(format!(
                "ORT_DYLIB_PATH points to {}, which does not exist",
                path.display()
            ));
        }
        let builder = ort::init_from(&path)
            .map_err(|e| format!("cannot load ONNX Runtime from {}: {e}", path.display()))?;
        builder
            .with_name("muse")
            .build()
            .map_err(|e| format!("cannot start ONNX Runtime: {e}"))
    });
    result
        .as_ref()
        .map_err(|e| InferenceError::NotConfigured(e.clone()))
}
