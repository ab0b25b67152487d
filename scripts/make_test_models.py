#!/usr/bin/env python3
"""Deterministic tiny causal LMs for Muse's tests, in a Hugging Face cache layout.

Writes, under OUT (default: target/test-models/hub):
  models--muse-test--tiny-gpt2/    GPT-2-like: LayerNorm, learned positions, GELU MLP,
                                   fp32, onnx/model.onnx, ByteLevel BPE tokenizer
  models--muse-test--tiny-llama/   Llama-like: RMSNorm, RoPE, SwiGLU MLP, no biases,
                                   fp16, model.onnx + model.onnx.data (external data),
                                   Llama-2-chat's real chat template in tokenizer_config.json,
                                   a tokenizer that adds BOS like Llama's, and a
                                   generation_config.json with two stop ids
  models--muse-test--tiny-minilm/  a BERT-like sentence-embedding encoder (WordPiece, [CLS]/[SEP],
                                   mean pooling and normalisation as sentence-transformers configs say)
The tiny GPT-2 carries the ChatML template of transformers in chat_template.jinja (the
separate file newer exports use); its tokenizer adds no special tokens, like GPT-2's.
Both take the standard inputs input_ids, attention_mask, position_ids and
past_key_values.N.key/value [batch, heads, past, head_dim], and return logits and
present.N.key/value — the Optimum/transformers.js layout — so the KV-cache
geometry can be read from the model's own inputs.

Same inputs, same bytes: weights come from a seeded generator and the tokenizer is
trained on a fixed corpus. `--check` rebuilds into a temp dir and compares hashes.
"""
import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

OPSET = 17
CORPUS = [
    "Muse is a self-hostable AI backend written in Rust.",
    "It gives users accounts, a typed prompt library, idea generation and streaming.",
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "Ideas come from prompts, themes and categories; every idea can be rated from one to five.",
    "Models run on OpenAI, Gemini, Claude, any OpenAI-compatible server, or locally with ONNX Runtime.",
    "Caffè, crème brûlée, naïve façade, smørrebrød — ünïcödé text must survive tokenization. 日本語のテキスト。",
    "Once upon a time there was a small model that learned to write short stories about cats and dogs.",
] * 4


def train_tokenizer(kind):
    if kind == "gpt2":
        special = ["<|endoftext|>"]
    else:
        special = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>" if kind == "llama" else None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, min_frequency=1, special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if kind == "llama":
        # Llama's tokenizer.json: `tokenizer(text)` prepends BOS.
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return tok


# meta-llama/Llama-2-7b-chat-hf's chat template, verbatim (see tests/data/chat_templates/corpus.json).
LLAMA2_CHAT_TEMPLATE = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
# transformers' ChatML template (huggingface.js e2e tests, `_base`).
CHATML_TEMPLATE = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"


class Graph:
    def __init__(self, dtype):
        self.nodes, self.inits, self.n = [], [], 0
        self.dtype = dtype
        self.np = np.float16 if dtype == TensorProto.FLOAT16 else np.float32

    def name(self, p):
        self.n += 1
        return f"{p}_{self.n}"

    def const(self, arr, p="c"):
        n = self.name(p)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), n))
        return n

    def weight(self, arr, p="w"):
        return self.const(np.asarray(arr, dtype=self.np), p)

    def op(self, op, inputs, p=None, outputs=None, **attrs):
        outs = outputs or [self.name(p or op.lower())]
        self.nodes.append(helper.make_node(op, inputs, outs, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def scalar(self, v):
        return self.const(np.array(v, dtype=self.np), "s")


def attention_mask_bias(g, attention_mask, q, k_all):
    """(B,1,T,S) boolean: causal with past, and not padding."""
    shape_q = g.op("Shape", [q])
    shape_k = g.op("Shape", [k_all])
    t = g.op("Gather", [shape_q, g.const(np.array(2, dtype=np.int64))], axis=0)
    s = g.op("Gather", [shape_k, g.const(np.array(2, dtype=np.int64))], axis=0)
    past = g.op("Sub", [s, t])
    zero, one = g.const(np.array(0, dtype=np.int64)), g.const(np.array(1, dtype=np.int64))
    rows = g.op("Add", [g.op("Range", [zero, t, one]), past])
    rows = g.op("Unsqueeze", [rows, g.const(np.array([1], dtype=np.int64))])  # (T,1)
    cols = g.op("Range", [zero, s, one])
    cols = g.op("Unsqueeze", [cols, g.const(np.array([0], dtype=np.int64))])  # (1,S)
    causal = g.op("LessOrEqual", [cols, rows])  # (T,S)
    pad = g.op("Cast", [attention_mask], to=TensorProto.BOOL)  # (B,S)
    pad = g.op("Unsqueeze", [pad, g.const(np.array([1, 2], dtype=np.int64))])  # (B,1,1,S)
    return g.op("And", [causal, pad])


def heads(g, x, n_heads, head_dim):
    x = g.op("Reshape", [x, g.const(np.array([0, 0, n_heads, head_dim], dtype=np.int64))])
    return g.op("Transpose", [x], perm=[0, 2, 1, 3])


def build(kind, vocab, rng, n_special, layers=2, hidden=64, n_heads=4, max_pos=256, std=None, tie=False):
    dtype = TensorProto.FLOAT16 if kind == "llama" else TensorProto.FLOAT
    g = Graph(dtype)
    hd = hidden // n_heads
    def W(*shape, scale=0.08):
        # float32 draws: fast and small enough for the 124M benchmark model.
        return (rng.standard_normal(size=shape, dtype=np.float32) * np.float32(std or scale))
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", dtype, ["batch", "seq", vocab])]
    for i in range(layers):
        for kv in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kv}", dtype, ["batch", n_heads, "past", hd]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kv}", dtype, ["batch", n_heads, "total", hd]))

    wte = g.weight(W(vocab, hidden, scale=0.5), "wte")
    h = g.op("Gather", [wte, "input_ids"], axis=0)
    if kind == "gpt2":
        h = g.op("Add", [h, g.op("Gather", [g.weight(W(max_pos, hidden, scale=0.3), "wpe"), "position_ids"], axis=0)])
    else:
        inv = 1.0 / (10000 ** (np.arange(0, hd, 2) / hd))
        ang = np.outer(np.arange(max_pos), inv)  # (P, hd/2)
        cos = g.op("Unsqueeze", [g.op("Gather", [g.weight(np.cos(ang), "cos"), "position_ids"], axis=0), g.const(np.array([1], dtype=np.int64))])
        sin = g.op("Unsqueeze", [g.op("Gather", [g.weight(np.sin(ang), "sin"), "position_ids"], axis=0), g.const(np.array([1], dtype=np.int64))])

    def norm(x, p):
        if kind == "gpt2":
            return g.op("LayerNormalization", [x, g.weight(1 + W(hidden, scale=0.05), p + "g"), g.weight(W(hidden, scale=0.05), p + "b")], axis=-1, epsilon=1e-5)
        ms = g.op("ReduceMean", [g.op("Mul", [x, x])], axes=[-1], keepdims=1)
        r = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [ms, g.scalar(1e-5)])])])
        return g.op("Mul", [g.op("Mul", [x, r]), g.weight(1 + W(hidden, scale=0.05), p + "g")])

    def linear(x, din, dout, p, bias):
        y = g.op("MatMul", [x, g.weight(W(din, dout), p)])
        return g.op("Add", [y, g.weight(W(dout, scale=0.02), p + "b")]) if bias else y

    def rope(x):
        x1, x2 = g.op("Split", [x, g.const(np.array([hd // 2, hd // 2], dtype=np.int64))], outputs=[g.name("x1"), g.name("x2")], axis=-1)
        a = g.op("Sub", [g.op("Mul", [x1, cos]), g.op("Mul", [x2, sin])])
        b = g.op("Add", [g.op("Mul", [x2, cos]), g.op("Mul", [x1, sin])])
        return g.op("Concat", [a, b], axis=-1)

    bias = kind == "gpt2"
    mask = None
    for i in range(layers):
        a = norm(h, f"ln{i}a")
        q = heads(g, linear(a, hidden, hidden, f"q{i}", bias), n_heads, hd)
        k = heads(g, linear(a, hidden, hidden, f"k{i}", bias), n_heads, hd)
        v = heads(g, linear(a, hidden, hidden, f"v{i}", bias), n_heads, hd)
        if kind == "llama":
            q, k = rope(q), rope(k)
        k_all = g.op("Concat", [f"past_key_values.{i}.key", k], axis=2, outputs=[f"present.{i}.key"])
        v_all = g.op("Concat", [f"past_key_values.{i}.value", v], axis=2, outputs=[f"present.{i}.value"])
        if mask is None:
            mask = attention_mask_bias(g, "attention_mask", q, k_all)
        scores = g.op("Mul", [g.op("MatMul", [q, g.op("Transpose", [k_all], perm=[0, 1, 3, 2])]), g.scalar(1.0 / np.sqrt(hd))])
        scores = g.op("Where", [mask, scores, g.scalar(-1e4)])
        ctx = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v_all])
        ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), g.const(np.array([0, 0, hidden], dtype=np.int64))])
        h = g.op("Add", [h, linear(ctx, hidden, hidden, f"o{i}", bias)])
        m = norm(h, f"ln{i}m")
        if kind == "gpt2":
            up = linear(m, hidden, 4 * hidden, f"fc{i}", True)
            gelu = g.op("Mul", [g.op("Mul", [up, g.scalar(0.5)]), g.op("Add", [g.op("Erf", [g.op("Mul", [up, g.scalar(1 / np.sqrt(2))])]), g.scalar(1.0)])])
            h = g.op("Add", [h, linear(gelu, 4 * hidden, hidden, f"proj{i}", True)])
        else:
            gate = linear(m, hidden, 3 * hidden, f"gate{i}", False)
            up = linear(m, hidden, 3 * hidden, f"up{i}", False)
            act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
            h = g.op("Add", [h, linear(act, 3 * hidden, hidden, f"down{i}", False)])
    h = norm(h, "lnf")
    if tie:
        # GPT-2 ties the output projection to the token embeddings.
        raw = g.op("MatMul", [h, g.op("Transpose", [wte], perm=[1, 0])])
    else:
        raw = g.op("MatMul", [h, g.weight(W(hidden, vocab, scale=0.5), "lm_head")])
    # Special tokens (the first ids) are pushed down so that greedy decoding
    # of these random weights runs to max_tokens instead of stopping at once.
    bias = np.zeros(vocab)
    bias[:n_special] = -30.0
    g.op("Add", [raw, g.weight(bias, "logit_bias")], outputs=["logits"])
    graph = helper.make_graph(g.nodes, f"tiny-{kind}", inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="muse-test-models")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, {"layers": layers, "hidden": hidden, "heads": n_heads, "head_dim": hd, "max_position_embeddings": max_pos}


def write_model(out, repo, kind, seed, size=None):
    tok = train_tokenizer(kind)
    vocab = tok.get_vocab_size()
    n_special = 1 if kind == "gpt2" else 3
    if size == "124m":
        # GPT-2 small's shape: 12 layers, 12 heads, 768 wide, 50257 tokens,
        # 1024 positions (≈124M parameters). Random weights: for speed only.
        vocab = 50257
        model, shape = build(kind, vocab, np.random.default_rng(seed), n_special, layers=12, hidden=768, n_heads=12, max_pos=1024, std=0.02, tie=True)
    else:
        # The tiny GPT-2 takes 1024 positions: real chat templates with tools
        # render prompts of several hundred of its (384-token vocabulary) tokens.
        model, shape = build(kind, vocab, np.random.default_rng(seed), n_special, max_pos=1024 if kind == "gpt2" else 256)
    files = {}
    files["tokenizer.json"] = tok.to_str().encode()
    if kind == "gpt2":
        eos = "<|endoftext|>"
        tcfg = {"bos_token": eos, "eos_token": eos, "unk_token": eos, "model_max_length": shape["max_position_embeddings"], "tokenizer_class": "PreTrainedTokenizerFast"}
        cfg = {"model_type": "gpt2", "vocab_size": vocab, "n_layer": shape["layers"], "n_head": shape["heads"], "n_embd": shape["hidden"],
               "n_positions": shape["max_position_embeddings"], "eos_token_id": tok.token_to_id(eos), "bos_token_id": tok.token_to_id(eos)}
    else:
        tcfg = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": shape["max_position_embeddings"],
                # The tokenizer is a byte-level BPE, not Llama's SentencePiece:
                # the generic fast class keeps transformers on tokenizer.json.
                "tokenizer_class": "PreTrainedTokenizerFast",
                "chat_template": LLAMA2_CHAT_TEMPLATE}
        cfg = {"model_type": "llama", "vocab_size": vocab, "num_hidden_layers": shape["layers"], "num_attention_heads": shape["heads"],
               "num_key_value_heads": shape["heads"], "hidden_size": shape["hidden"], "max_position_embeddings": shape["max_position_embeddings"],
               "torch_dtype": "float16", "bos_token_id": tok.token_to_id("<s>"), "eos_token_id": tok.token_to_id("</s>")}
    files["tokenizer_config.json"] = json.dumps(tcfg, indent=2, sort_keys=True).encode()
    if kind == "llama":
        # Llama-3 style: several stop ids (</s> and <unk>), greedy by default.
        files["generation_config.json"] = json.dumps({"bos_token_id": tok.token_to_id("<s>"), "eos_token_id": [tok.token_to_id("</s>"), tok.token_to_id("<unk>")], "do_sample": False}, indent=2).encode()
    elif size is None:
        files["chat_template.jinja"] = CHATML_TEMPLATE.encode()
    files["config.json"] = json.dumps(cfg, indent=2, sort_keys=True).encode()
    digest = hashlib.sha1()
    for k in sorted(files):
        digest.update(k.encode() + files[k])
    if size is None:
        digest.update(model.SerializeToString())
    else:
        digest.update(f"{size}-{seed}".encode())
    rev = digest.hexdigest()
    root = os.path.join(out, f"models--{repo.replace('/', '--')}")
    snap = os.path.join(root, "snapshots", rev)
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    os.makedirs(snap, exist_ok=True)
    with open(os.path.join(root, "refs", "main"), "w") as f:
        f.write(rev)
    for k, v in files.items():
        with open(os.path.join(snap, k), "wb") as f:
            f.write(v)
    if kind == "gpt2" and size is None:
        os.makedirs(os.path.join(snap, "onnx"), exist_ok=True)
        onnx.save_model(model, os.path.join(snap, "onnx", "model.onnx"))
    else:
        onnx.save_model(model, os.path.join(snap, "model.onnx"), save_as_external_data=True,
                        all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
    return snap


def tree_hash(path):
    h = hashlib.sha256()
    for root, _, names in sorted(os.walk(path)):
        for n in sorted(names):
            p = os.path.join(root, n)
            h.update(os.path.relpath(p, path).encode())
            with open(p, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def train_wordpiece():
    """A WordPiece vocabulary built deterministically from the corpus (the
    tokenizers trainer breaks frequency ties differently from run to run):
    the special tokens, every character alone and as a `##` continuation,
    then the corpus's words by frequency."""
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    counts = {}
    for line in CORPUS:
        for word, _ in pre.pre_tokenize_str(normalizer.normalize_str(line)):
            counts[word] = counts.get(word, 0) + 1
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = sorted({c for w in counts for c in w})
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if len(w) > 1][:150]
    vocab = {}
    for t in special + chars + ["##" + c for c in chars] + words:
        vocab.setdefault(t, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    return tok


def build_encoder(vocab, rng, layers=2, hidden=32, n_heads=4, max_pos=128):
    """A BERT-like encoder: input_ids, attention_mask, token_type_ids -> last_hidden_state."""
    g = Graph(TensorProto.FLOAT)
    hd = hidden // n_heads
    W = lambda *shape, scale=0.3: rng.standard_normal(size=shape, dtype=np.float32) * np.float32(scale)  # noqa: E731
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"]) for n in ("input_ids", "attention_mask", "token_type_ids")]
    outputs = [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", hidden])]
    seq = g.op("Gather", [g.op("Shape", ["input_ids"]), g.const(np.array(1, dtype=np.int64))], axis=0)
    positions = g.op("Range", [g.const(np.array(0, dtype=np.int64)), seq, g.const(np.array(1, dtype=np.int64))])
    h = g.op("Add", [g.op("Gather", [g.weight(W(vocab, hidden), "wte"), "input_ids"], axis=0),
                     g.op("Gather", [g.weight(W(max_pos, hidden), "wpe"), positions], axis=0)])
    h = g.op("Add", [h, g.op("Gather", [g.weight(W(2, hidden, scale=0.1), "wtt"), "token_type_ids"], axis=0)])

    def ln(x, p):
        return g.op("LayerNormalization", [x, g.weight(1 + W(hidden, scale=0.05), p + "g"), g.weight(W(hidden, scale=0.05), p + "b")], axis=-1, epsilon=1e-12)

    def linear(x, din, dout, p):
        return g.op("Add", [g.op("MatMul", [x, g.weight(W(din, dout, scale=0.15), p)]), g.weight(W(dout, scale=0.02), p + "b")])

    h = ln(h, "emb")
    # (B,1,1,S) additive mask: 0 where attended, -1e4 on padding.
    m = g.op("Cast", [g.op("Unsqueeze", ["attention_mask", g.const(np.array([1, 2], dtype=np.int64))])], to=TensorProto.FLOAT)
    bias = g.op("Mul", [g.op("Sub", [g.scalar(1.0), m]), g.scalar(-1e4)])
    for i in range(layers):
        q = heads(g, linear(h, hidden, hidden, f"q{i}"), n_heads, hd)
        k = heads(g, linear(h, hidden, hidden, f"k{i}"), n_heads, hd)
        v = heads(g, linear(h, hidden, hidden, f"v{i}"), n_heads, hd)
        scores = g.op("Add", [g.op("Mul", [g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])]), g.scalar(1.0 / np.sqrt(hd))]), bias])
        ctx = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
        ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), g.const(np.array([0, 0, hidden], dtype=np.int64))])
        h = ln(g.op("Add", [h, linear(ctx, hidden, hidden, f"o{i}")]), f"ln{i}a")
        up = linear(h, hidden, 4 * hidden, f"fc{i}")
        gelu = g.op("Mul", [g.op("Mul", [up, g.scalar(0.5)]), g.op("Add", [g.op("Erf", [g.op("Mul", [up, g.scalar(1 / np.sqrt(2))])]), g.scalar(1.0)])])
        h = ln(g.op("Add", [h, linear(gelu, 4 * hidden, hidden, f"proj{i}")]), f"ln{i}m")
    g.op("Identity", [h], outputs=["last_hidden_state"])
    graph = helper.make_graph(g.nodes, "tiny-minilm", inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="muse-test-models")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, hidden


def write_encoder(out, repo, seed):
    """A sentence-transformers export: onnx/model.onnx, a WordPiece tokenizer adding
    [CLS]/[SEP], modules.json (Transformer, Pooling, Normalize) and 1_Pooling/config.json
    (mean pooling), as all-MiniLM-L6-v2 ships."""
    tok = train_wordpiece()
    model, hidden = build_encoder(tok.get_vocab_size(), np.random.default_rng(seed))
    files = {
        "tokenizer.json": tok.to_str().encode(),
        "tokenizer_config.json": json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 128, "cls_token": "[CLS]", "sep_token": "[SEP]",
                                             "pad_token": "[PAD]", "unk_token": "[UNK]", "mask_token": "[MASK]", "do_lower_case": True}, indent=2, sort_keys=True).encode(),
        "config.json": json.dumps({"model_type": "bert", "hidden_size": hidden, "num_hidden_layers": 2, "num_attention_heads": 4,
                                   "max_position_embeddings": 128, "vocab_size": tok.get_vocab_size()}, indent=2, sort_keys=True).encode(),
        "modules.json": json.dumps([{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                                    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                                    {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}], indent=2).encode(),
        "1_Pooling/config.json": json.dumps({"word_embedding_dimension": hidden, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
                                             "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}, indent=2).encode(),
    }
    digest = hashlib.sha1()
    for k in sorted(files):
        digest.update(k.encode() + files[k])
    digest.update(model.SerializeToString())
    rev = digest.hexdigest()
    root = os.path.join(out, f"models--{repo.replace('/', '--')}")
    snap = os.path.join(root, "snapshots", rev)
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    os.makedirs(os.path.join(snap, "onnx"), exist_ok=True)
    os.makedirs(os.path.join(snap, "1_Pooling"), exist_ok=True)
    with open(os.path.join(root, "refs", "main"), "w") as f:
        f.write(rev)
    for k, v in files.items():
        with open(os.path.join(snap, k), "wb") as f:
            f.write(v)
    onnx.save_model(model, os.path.join(snap, "onnx", "model.onnx"))
    return snap


def generate(out):
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    write_model(out, "muse-test/tiny-gpt2", "gpt2", seed=1)
    write_model(out, "muse-test/tiny-llama", "llama", seed=2)
    write_encoder(out, "muse-test/tiny-minilm", seed=4)
    return tree_hash(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "target", "test-models", "hub"))
    ap.add_argument("--check", action="store_true", help="generate twice and fail if the bytes differ")
    ap.add_argument("--bench", action="store_true", help="also write muse-test/gpt2-124m (GPT-2 small's shape, ~500 MB, not checked)")
    args = ap.parse_args()
    if args.bench:
        os.makedirs(args.out, exist_ok=True)
        bench_dir = os.path.join(args.out, "models--muse-test--gpt2-124m")
        if os.path.exists(bench_dir):
            shutil.rmtree(bench_dir)
        print(write_model(args.out, "muse-test/gpt2-124m", "gpt2", seed=3, size="124m"))
        return
    first = generate(args.out)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            second = generate(os.path.join(tmp, "hub"))
        if first != second:
            sys.exit(f"not deterministic: {first} != {second}")
    print(f"{args.out} {first}")


if __name__ == "__main__":
    main()
