#!/usr/bin/env python3
"""Reference chat-template renderings and token ids, from Hugging Face transformers itself.

For every template of tests/data/chat_templates/corpus.json (real templates copied from
public model repos, each with its source), writes an export directory the way models ship:
  OUT/<name>/tokenizer.json          the tiny-llama test tokenizer, with the template's
                                     control tokens added as special tokens
  OUT/<name>/tokenizer_config.json   special tokens, and the template where the corpus says
                                     (`tokenizer_config`: a string; `list`: named templates)
  OUT/<name>/chat_template.jinja     (location `chat_template.jinja`)
then loads it with `AutoTokenizer.from_pretrained` (offline) and calls `apply_chat_template`
for every conversation of conversations.json — the exact environment transformers uses
(jinja2 sandbox, trim_blocks, lstrip_blocks, its raise_exception, tojson, strftime_now with
the clock fixed at 2026-01-02 03:04:05). OUT/reference.json records, per pair, the text
(`tokenize=False`) and the ids (`tokenize=True`), or how it failed: `refused` (the template
called raise_exception) or `error` (anything else).

Muse's test (crates/inference/tests/chat_templates.rs) must produce the same bytes and ids.
"""
import argparse
import datetime as _dt
import json
import os
import re
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jinja2  # noqa: E402
import transformers  # noqa: E402
import transformers.utils.chat_template_utils as ctu  # noqa: E402
from tokenizers import AddedToken, Tokenizer  # noqa: E402

FIXED_NOW = _dt.datetime(2026, 1, 2, 3, 4, 5)


class _FixedDatetime(_dt.datetime):
    @classmethod
    def now(cls, tz=None):
        return FIXED_NOW


# strftime_now calls `datetime.now()` through this module's global.
ctu.datetime = _FixedDatetime

CONTROL = re.compile(r"<\|[A-Za-z0-9_]+\|>|<(?:start|end)_of_turn>|\[/?[A-Z_]+\]|<[A-Z_]+>|<｜[^｜]+｜>|<</?SYS>>")


def write_export(entry, base_tokenizer, out):
    d = os.path.join(out, entry["name"])
    if os.path.exists(d):
        shutil.rmtree(d)
    os.makedirs(d)
    tok = Tokenizer.from_file(base_tokenizer)
    sources = entry["template"] if isinstance(entry["template"], str) else "".join(t["template"] for t in entry["template"])
    control = sorted(set(CONTROL.findall(sources)) | set(entry["special_tokens"].values()))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tok.save(os.path.join(d, "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096, **entry["special_tokens"]}
    if entry["location"] == "tokenizer_config":
        cfg["chat_template"] = entry["template"]
    elif entry["location"] == "list":
        cfg["chat_template"] = entry["template"]
    elif entry["location"] == "chat_template.jinja":
        with open(os.path.join(d, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(entry["template"])
    else:
        sys.exit(f"unknown location {entry['location']}")
    with open(os.path.join(d, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
    return d


def render(tokenizer, conv):
    kwargs = dict(conv.get("extra", {}))
    tools = conv.get("tools")
    try:
        text = tokenizer.apply_chat_template(conv["messages"], tools=tools, add_generation_prompt=conv["add_generation_prompt"], tokenize=False, **kwargs)
        ids = tokenizer.apply_chat_template(conv["messages"], tools=tools, add_generation_prompt=conv["add_generation_prompt"], tokenize=True, return_dict=False, **kwargs)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return {"text": text, "ids": list(ids)}
    except jinja2.exceptions.TemplateError as e:
        # raise_exception raises exactly TemplateError; its subclasses are
        # template bugs (undefined names, syntax, sandbox).
        kind = "refused" if type(e) is jinja2.exceptions.TemplateError else "error"
        return {kind: str(e)}
    except Exception as e:  # noqa: BLE001 - any other failure of the template
        return {"error": f"{type(e).__name__}: {e}"}


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.path.join(root, "tests", "data", "chat_templates"))
    ap.add_argument("--tokenizer", required=True, help="base tokenizer.json (the tiny-llama test model's)")
    ap.add_argument("--out", default=os.path.join(root, "target", "test-models", "chat-templates"))
    args = ap.parse_args()
    with open(os.path.join(args.data, "corpus.json"), encoding="utf-8") as f:
        corpus = json.load(f)
    with open(os.path.join(args.data, "conversations.json"), encoding="utf-8") as f:
        conversations = json.load(f)
    os.makedirs(args.out, exist_ok=True)
    results = []
    for entry in corpus:
        d = write_export(entry, args.tokenizer, args.out)
        tokenizer = transformers.AutoTokenizer.from_pretrained(d, local_files_only=True)
        for conv in conversations:
            results.append({"template": entry["name"], "conversation": conv["name"], **render(tokenizer, conv)})
    reference = {
        "transformers": transformers.__version__,
        "jinja2": jinja2.__version__,
        "now": FIXED_NOW.isoformat(),
        "results": results,
    }
    with open(os.path.join(args.out, "reference.json"), "w", encoding="utf-8") as f:
        json.dump(reference, f, indent=1, ensure_ascii=False)
    counts = {}
    for r in results:
        k = "ok" if "text" in r else next(iter(k for k in ("refused", "error") if k in r))
        counts[k] = counts.get(k, 0) + 1
    print(f"{args.out}: {len(corpus)} templates x {len(conversations)} conversations: {counts}")


if __name__ == "__main__":
    main()
