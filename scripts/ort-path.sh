#!/usr/bin/env bash
# Prints the path of the ONNX Runtime shared library inside ./.venv (from the
# onnxruntime wheel), for ORT_DYLIB_PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/ensure-venv.sh
dir=$(.venv/bin/python -c 'import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), "capi"))')
lib=$(ls "$dir"/libonnxruntime.so.* 2>/dev/null | head -n1 || true)
[ -n "$lib" ] || lib=$(ls "$dir"/libonnxruntime*.dylib 2>/dev/null | head -n1 || true)
[ -n "$lib" ] || { echo "no libonnxruntime in $dir" >&2; exit 1; }
echo "$(cd "$(dirname "$lib")" && pwd)/$(basename "$lib")"
