#!/usr/bin/env bash
# Creates ./.venv with the pinned Python packages (once; again when the
# requirements change). Prints nothing on the fast path.
set -euo pipefail
cd "$(dirname "$0")/.."
req=scripts/requirements-models.txt
stamp=.venv/.requirements.sha256
want=$(sha256sum "$req" | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
echo "setting up .venv (onnx, onnxruntime, numpy, tokenizers, openai, transformers, jinja2, schemathesis)…" >&2
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$req"
echo "$want" > "$stamp"
