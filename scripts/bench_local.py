#!/usr/bin/env python3
"""Local decode speed: Muse vs the onnxruntime Python loop, same model file and threads.

Model: muse-test/gpt2-124m (GPT-2 small's shape, 124.5M parameters, fp32, random
weights; written by `make_test_models.py --bench`). Greedy, NEW new tokens, best of
REPEAT runs after a warm-up, in two rounds whose order alternates (Python first, then
Muse first) so that neither side always runs on a warmer or quieter machine. Two views:
  * decode alone: Muse's engine (examples/local_decode) vs scripts/reference_generate.py,
    tokens/s of the decode steps after the first token;
  * whole request: `POST /v1/completions` on the release server (HTTP, auth, tokenization,
    prompt pass, decode, detokenization, the execution record) vs the Python loop's
    prompt pass + decode; tokens/s = new tokens / wall time.
Prints Markdown rows (and JSON with --json). Needs target/release/muse and
target/release/examples/local_decode (`just bench` builds both).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

ROOT = bench.ROOT
PY = os.path.join(ROOT, ".venv", "bin", "python")
PROMPT = "Once upon a time there was a small model that"


def ort_env():
    lib = subprocess.run([os.path.join(ROOT, "scripts", "ort-path.sh")], check=True, capture_output=True, text=True).stdout.strip()
    return dict(os.environ, ORT_DYLIB_PATH=lib)


def python_loop(model, new, threads, repeat):
    return json.loads(subprocess.run([PY, os.path.join(ROOT, "scripts", "reference_generate.py"), "--model", model, "--prompt", PROMPT,
                                      "--max-new-tokens", str(new), "--threads", str(threads), "--repeat", str(repeat)],
                                     check=True, capture_output=True, text=True).stdout)


def muse_engine(model, new, threads, repeat):
    return json.loads(subprocess.run([os.path.join(ROOT, "target", "release", "examples", "local_decode"), model, PROMPT, str(new), str(threads), str(repeat)],
                                     check=True, capture_output=True, text=True, env=ort_env()).stdout)


def muse_request(hub, new, threads, repeat):
    """Best wall time of /v1/completions (greedy, `new` tokens) after a warm-up."""
    workdir = tempfile.mkdtemp(prefix="muse-bench-local-")
    os.environ.update(ort_env())
    os.environ.update({"MODEL_CACHE_DIR": hub, "LOCAL_MODEL_THREADS": str(threads), "HF_HUB_OFFLINE": "1"})
    proc, base = bench.start(f"sqlite://{workdir}/bench.db", workdir)
    try:
        bench.request(base, "POST", "/api/v1/auth/register", {"email": "local@example.com", "username": "localbench", "password": bench.PASSWORD})
        token = bench.request(base, "POST", "/api/v1/auth/login", {"email": "local@example.com", "password": bench.PASSWORD})["access_token"]
        body = {"model": "local/muse-test/gpt2-124m", "prompt": PROMPT, "max_tokens": new, "temperature": 0}
        bench.request(base, "POST", "/v1/completions", body, token)  # load + warm-up
        best = None
        for _ in range(repeat):
            t0 = time.perf_counter()
            r = bench.request(base, "POST", "/v1/completions", body, token)
            dt = time.perf_counter() - t0
            assert r["usage"]["completion_tokens"] == new, r["usage"]
            best = dt if best is None else min(best, dt)
        return best
    finally:
        proc.terminate()
        proc.wait(timeout=40)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    subprocess.run([PY, os.path.join(ROOT, "scripts", "make_test_models.py"), "--bench"], check=True, capture_output=True)
    hub = os.path.join(ROOT, "target", "test-models", "hub")
    model = os.path.join(hub, "models--muse-test--gpt2-124m")
    rows = [f"Local decode, GPT-2 small's shape (124.5M parameters, fp32, random weights), greedy, {args.new} new tokens, "
            f"best of {args.repeat} runs after a warm-up in each of two rounds of alternating order, same model file and thread count:", "",
            "| threads | view | Muse tokens/s | onnxruntime Python tokens/s | Muse ÷ Python |",
            "|---:|---|---:|---:|---:|"]
    out = []
    for threads in [int(t) for t in args.threads.split(",")]:
        refs, rusts, wholes = [], [], []
        for order in (0, 1):
            steps = [lambda: refs.append(python_loop(model, args.new, threads, args.repeat)),
                     lambda: rusts.append(muse_engine(model, args.new, threads, args.repeat)),
                     lambda: wholes.append(muse_request(hub, args.new, threads, args.repeat))]
            for step in (steps if order == 0 else steps[::-1]):
                step()
        decode = (max(r["decode_tokens_per_second"] for r in rusts), max(r["decode_tokens_per_second"] for r in refs))
        request = (args.new / min(wholes), max(r["tokens_per_second"] for r in refs))
        rows.append(f"| {threads} | decode alone | {decode[0]:.1f} | {decode[1]:.1f} | {decode[0] / decode[1]:.2f} |")
        rows.append(f"| {threads} | whole request (`/v1/completions` vs prompt + decode loop) | {request[0]:.1f} | {request[1]:.1f} | {request[0] / request[1]:.2f} |")
        out.append({"threads": threads, "decode": decode, "request": request})
    print(json.dumps(out) if args.json else "\n".join(rows))


if __name__ == "__main__":
    main()
