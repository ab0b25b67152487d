#!/usr/bin/env python3
"""Reference greedy decoding with a plain onnxruntime KV-cache loop.

The yardstick for Muse's local engine: for a model directory (an HF snapshot
with tokenizer.json and model.onnx or onnx/model.onnx), encode the prompt, run
the prompt once, then one token at a time feeding present.* back as
past_key_values.*, taking the argmax. Prints JSON:
{"prompt_ids", "output_ids", "text", "seconds", "tokens_per_second"}.

--chat '[{"role": "user", "content": "Hi"}]' builds the prompt as transformers does:
AutoTokenizer.from_pretrained(snapshot).apply_chat_template(messages,
add_generation_prompt=True) (tokenized without added special tokens); --prompt is
tokenized like `tokenizer(prompt)`.

--verify also decodes without the cache (whole sequence every step) and fails if
the two disagree — a check of the model's own KV-cache path.
"""
import argparse
import glob
import json
import os
import sys
import time

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


def find_model(snapshot):
    for pattern in ("model.onnx", "onnx/model.onnx", "onnx/model*.onnx"):
        hits = sorted(glob.glob(os.path.join(snapshot, pattern)))
        if hits:
            return hits[0]
    sys.exit(f"no ONNX model in {snapshot}")


def resolve(path):
    """A snapshot dir, or a models--org--name cache dir (follows refs/main)."""
    ref = os.path.join(path, "refs", "main")
    if os.path.exists(ref):
        with open(ref) as f:
            return os.path.join(path, "snapshots", f.read().strip())
    return path


class Model:
    def __init__(self, snapshot, threads):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.sess = ort.InferenceSession(find_model(snapshot), opts, providers=["CPUExecutionProvider"])
        self.past = [i for i in self.sess.get_inputs() if i.name.startswith("past_key_values.")]
        self.names = {i.name for i in self.sess.get_inputs()}
        first = self.past[0]
        self.heads, self.head_dim = first.shape[1], first.shape[3]
        self.dtype = np.float16 if first.type == "tensor(float16)" else np.float32

    def run(self, ids, past, past_len):
        t = len(ids)
        feed = {"input_ids": np.array([ids], dtype=np.int64),
                "attention_mask": np.ones((1, past_len + t), dtype=np.int64)}
        if "position_ids" in self.names:
            feed["position_ids"] = np.arange(past_len, past_len + t, dtype=np.int64)[None, :]
        for inp in self.past:
            feed[inp.name] = past.get(inp.name, np.zeros((1, self.heads, 0, self.head_dim), dtype=self.dtype))
        outs = self.sess.run(None, feed)
        names = [o.name for o in self.sess.get_outputs()]
        logits = outs[names.index("logits")]
        presents = {n.replace("present.", "past_key_values."): o for n, o in zip(names, outs) if n.startswith("present.")}
        return logits[0, -1].astype(np.float32), presents


def greedy(model, prompt_ids, n, use_cache=True, timing=None):
    out = []
    if use_cache:
        t0 = time.perf_counter()
        logits, past = model.run(prompt_ids, {}, 0)
        if timing is not None:
            timing["ttft"] = time.perf_counter() - t0
        for step in range(n):
            tok = int(np.argmax(logits))
            out.append(tok)
            if step + 1 == n:
                break
            logits, past = model.run([tok], past, len(prompt_ids) + step)
    else:
        for _ in range(n):
            logits, _ = model.run(prompt_ids + out, {}, 0)
            out.append(int(np.argmax(logits)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt")
    group.add_argument("--chat", help="JSON list of messages, rendered with the model's chat template by transformers")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--verify", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="runs after one warm-up; the fastest is reported")
    args = ap.parse_args()
    snapshot = resolve(args.model)
    tok = Tokenizer.from_file(os.path.join(snapshot, "tokenizer.json"))
    model = Model(snapshot, args.threads)
    if args.chat is not None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        import transformers
        hf = transformers.AutoTokenizer.from_pretrained(snapshot, local_files_only=True)
        ids = list(hf.apply_chat_template(json.loads(args.chat), add_generation_prompt=True, tokenize=True, return_dict=False))
    else:
        ids = tok.encode(args.prompt).ids
    if args.repeat > 1:
        greedy(model, ids, 8)
    best = None
    for _ in range(max(1, args.repeat)):
        timing = {}
        start = time.perf_counter()
        out = greedy(model, ids, args.max_new_tokens, timing=timing)
        seconds = time.perf_counter() - start
        if best is None or seconds < best[1]:
            best = (out, seconds, timing)
    out, seconds, timing = best
    if args.verify:
        plain = greedy(model, ids, args.max_new_tokens, use_cache=False)
        if plain != out:
            sys.exit(f"KV-cache decoding {out} differs from full recomputation {plain}")
    decode = seconds - timing["ttft"]
    print(json.dumps({"prompt_ids": ids, "output_ids": out, "text": tok.decode(out),
                      "seconds": seconds, "ttft_seconds": timing["ttft"],
                      "tokens_per_second": len(out) / seconds if seconds else None,
                      "decode_tokens_per_second": (len(out) - 1) / decode if decode > 0 else None}))


if __name__ == "__main__":
    main()
