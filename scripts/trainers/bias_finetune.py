#!/usr/bin/env python3
"""Example external trainer for Muse: output-bias fine-tuning of an ONNX causal LM.

It speaks Muse's external trainer protocol (docs/training.md):

  bias_finetune.py --dataset PATH --format chat|prompt_completion
                   --base-model=NAME [--base-model-dir DIR]
                   --output-dir DIR --hyperparameters JSON

- progress on stdout, one JSON object per line:
  {"type": "progress", "step", "total_steps", "epoch", "metrics": {"loss"}}
- anything for the job log on stderr (or {"type": "log", "message"})
- the trained model in OUTPUT_DIR/model (model.onnx, tokenizer.json, config.json…)
- exit 0 on success; stops on SIGTERM, and when stdin closes (Muse went away).

What it trains: only the bias added to the logits (the last `Add` that
produces `logits`), by gradient descent on the cross-entropy of the tokens of
the dataset's answers (assistant messages, or completions) — a real, if tiny,
fine-tune: the model then prefers the dataset's vocabulary. It needs numpy,
onnx and tokenizers (the venv that `just test` builds has them). A real
deployment would run transformers/PEFT here instead, on a GPU, and export
the result to ONNX (for example with optimum); the protocol stays the same.
"""
import argparse
import json
import os
import shutil
import signal
import stat
import sys
import threading
import time

import numpy as np
import onnx
from onnx import numpy_helper
from tokenizers import Tokenizer

STOP = threading.Event()


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def log(message):
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def watch_stdin():
    # Muse keeps stdin open; EOF means it is gone: stop.
    try:
        while sys.stdin.read(4096):
            pass
    except Exception:
        pass
    STOP.set()


def answers(path, fmt):
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            row = json.loads(line)
            if fmt == "chat":
                for m in row["messages"]:
                    if m.get("role") == "assistant":
                        yield m["content"]
            else:
                yield row["completion"]


def find_model_file(base):
    for rel in ("model.onnx", os.path.join("onnx", "model.onnx")):
        p = os.path.join(base, rel)
        if os.path.isfile(p):
            return p
    raise SystemExit(f"no model.onnx under {base}")


def logits_bias(model):
    inits = {i.name: i for i in model.graph.initializer}
    for node in reversed(model.graph.node):
        if node.op_type == "Add" and "logits" in node.output:
            for name in node.input:
                if name in inits:
                    return inits[name]
    raise SystemExit("the model has no bias added to its logits (an Add with an initializer producing `logits`)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--format", required=True, choices=["chat", "prompt_completion"])
    ap.add_argument("--base-model", required=True)
    ap.add_argument("--base-model-dir")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--hyperparameters", default="{}")
    args = ap.parse_args()
    hp = json.loads(args.hyperparameters)
    epochs = int(hp.get("n_epochs", 3))
    lr = float(hp.get("learning_rate", 0.5))
    steps_per_epoch = int(hp.get("max_steps", 20))
    seed = int(hp.get("seed", 0))
    delay = float(os.environ.get("MUSE_EXAMPLE_STEP_DELAY", "0"))

    signal.signal(signal.SIGTERM, lambda *_: STOP.set())
    if stat.S_ISFIFO(os.fstat(0).st_mode):
        threading.Thread(target=watch_stdin, daemon=True).start()

    if not args.base_model_dir:
        raise SystemExit(f"{args.base_model} is not a local model on this machine: no --base-model-dir")
    base = args.base_model_dir
    tok = Tokenizer.from_file(os.path.join(base, "tokenizer.json"))
    model = onnx.load(find_model_file(base))
    bias_init = logits_bias(model)
    bias = numpy_helper.to_array(bias_init).astype(np.float64)
    vocab = bias.shape[-1]

    counts = np.zeros(vocab)
    for text in answers(args.dataset, args.format):
        for i in tok.encode(text, add_special_tokens=False).ids:
            if i < vocab:
                counts[i] += 1
    if counts.sum() == 0:
        raise SystemExit("the dataset's answers have no tokens")
    target = counts / counts.sum()
    log(f"{int(counts.sum())} answer tokens, {int((counts > 0).sum())} distinct, vocabulary {vocab}")

    rng = np.random.default_rng(seed)
    total = epochs * steps_per_epoch
    b = bias.copy()
    for step in range(1, total + 1):
        if STOP.is_set():
            log("stopped before the end")
            return 143
        p = np.exp(b - b.max())
        p /= p.sum()
        loss = float(-(target * np.log(p + 1e-12)).sum())
        # Gradient of the cross-entropy with respect to the bias, with a
        # little noise (the "batches" of this toy trainer).
        grad = p - target + rng.normal(0, 1e-4, vocab)
        b -= lr * vocab * grad
        emit({"type": "progress", "step": step, "total_steps": total,
              "epoch": round(step / steps_per_epoch, 3), "metrics": {"loss": round(loss, 6)}})
        if delay:
            time.sleep(delay)

    out = os.path.join(args.output_dir, "model")
    os.makedirs(out, exist_ok=True)
    bias_init.CopyFrom(numpy_helper.from_array(b.astype(numpy_helper.to_array(bias_init).dtype), bias_init.name))
    onnx.save_model(model, os.path.join(out, "model.onnx"))
    for name in os.listdir(base):
        src = os.path.join(base, name)
        if os.path.isfile(src) and not name.startswith("model.onnx"):
            shutil.copy(src, os.path.join(out, name))
    emit({"type": "log", "message": f"wrote {out}"})
    emit({"type": "model", "dir": "model"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
