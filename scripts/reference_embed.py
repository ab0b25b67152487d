#!/usr/bin/env python3
"""Reference sentence embeddings with a plain onnxruntime run, as sentence-transformers computes them.

For a model directory (an HF snapshot, or models--org--name following refs/main) with
tokenizer.json, onnx/model.onnx, modules.json and 1_Pooling/config.json: tokenize each text
(`tokenizer(text)`: the tokenizer's own special tokens), run the encoder, pool the token
embeddings as 1_Pooling/config.json says (mean over the attention mask, CLS, or max), and
L2-normalise when modules.json lists a Normalize module. Prints JSON: {"vectors": [[...], ...]}.
"""
import argparse
import json
import os

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from reference_generate import find_model, resolve


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("texts", nargs="+")
    args = ap.parse_args()
    snap = resolve(args.model)
    tok = Tokenizer.from_file(os.path.join(snap, "tokenizer.json"))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(find_model(snap), opts, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    with open(os.path.join(snap, "1_Pooling", "config.json")) as f:
        pooling = json.load(f)
    with open(os.path.join(snap, "modules.json")) as f:
        normalize = any(m["type"].endswith("Normalize") for m in json.load(f))
    vectors = []
    for text in args.texts:
        enc = tok.encode(text)
        ids = np.array([enc.ids], dtype=np.int64)
        mask = np.array([enc.attention_mask], dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in names:
            feed["token_type_ids"] = np.array([enc.type_ids], dtype=np.int64)
        hidden = sess.run(None, feed)[0][0].astype(np.float64)  # (T, H)
        m = mask[0].astype(np.float64)[:, None]
        if pooling.get("pooling_mode_cls_token"):
            v = hidden[0]
        elif pooling.get("pooling_mode_max_tokens"):
            v = np.where(m > 0, hidden, -1e9).max(axis=0)
        else:
            v = (hidden * m).sum(axis=0) / max(m.sum(), 1e-9)
        if normalize:
            v = v / max(np.linalg.norm(v), 1e-12)
        vectors.append([float(x) for x in v])
    print(json.dumps({"vectors": vectors}))


if __name__ == "__main__":
    main()
