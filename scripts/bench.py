#!/usr/bin/env python3
"""Load benchmarks for Muse (run by `just bench` after a release build).

Starts the release binary on 127.0.0.1 with a throw-away database, then
drives it with wrk from a second process:
  * GET  /health
  * GET  /api/v1/auth/me with a JWT   (SQLite, and PostgreSQL when
    BENCH_DATABASE_URL or TEST_DATABASE_URL names a server and psql exists)
  * POST /api/v1/auth/login           (bcrypt cost 12, the default)
then the provider layer (examples/provider_overhead), the gateway overhead
of /v1/chat/completions, execute-prompt, SSE and WebSocket relays
(tests/examples/gateway_bench.rs), and the local decode loop.
Every run is bounded (DURATION seconds). Results: a Markdown table on
stdout and in target/bench/results.md.
"""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "muse")
DURATION = int(os.environ.get("BENCH_SECONDS", "10"))
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "32"))
PASSWORD = "bench passphrase 2026"


def ensure_wrk():
    if shutil.which("wrk"):
        return
    print("wrk is missing; installing it with apt-get…", file=sys.stderr)
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    try:
        subprocess.run(sudo + ["apt-get", "install", "-y", "-qq", "wrk"], check=True)
    except Exception as e:  # noqa: BLE001
        sys.exit(f"cannot install wrk ({e}); install it (apt-get install wrk) and retry")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(base, method, path, body=None, token=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method)
    req.add_header("content-type", "application/json")
    if token:
        req.add_header("authorization", "Bearer " + token)
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


def start(database_url, workdir):
    port = free_port()
    env = dict(os.environ)
    env.update({
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "DATABASE_URL": database_url,
        "MUSE_DATA_DIR": os.path.join(workdir, "data"),
        "JWT_SECRET": "bench-secret-0123456789-abcdefghijklmnopqrstuvwxyz",
        "LOGIN_MAX_FAILURES_PER_IP": "1000000",
        # One client address sends everything here: measure the server, not its rate limiter.
        "RATE_LIMIT_ENABLED": "false",
    })
    log = open(os.path.join(workdir, f"server-{port}.log"), "w")
    proc = subprocess.Popen([BIN, "serve"], env=env, stdout=log, stderr=log, cwd=workdir)
    base = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            request(base, "GET", "/health")
            return proc, base
        except Exception:  # noqa: BLE001
            time.sleep(0.1)
    proc.kill()
    sys.exit(f"server did not start; see {log.name}")


def to_ms(value):
    m = re.match(r"([\d.]+)(us|ms|s)", value)
    n, unit = float(m.group(1)), m.group(2)
    return n / 1000 if unit == "us" else n * 1000 if unit == "s" else n


def wrk(url, connections, token=None, script=None):
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{DURATION}s", "--latency", "--timeout", "10s"]
    if token:
        cmd += ["-H", f"Authorization: Bearer {token}"]
    if script:
        cmd += ["-s", script]
    out = subprocess.run(cmd + [url], check=True, capture_output=True, text=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = to_ms(re.search(r"\s50%\s+(\S+)", out).group(1))
    p99 = to_ms(re.search(r"\s99%\s+(\S+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p50_ms": p50, "p99_ms": p99, "non_2xx": int(errors.group(1)) if errors else 0}


def run_suite(label, database_url, workdir, results, with_login):
    proc, base = start(database_url, workdir)
    try:
        request(base, "POST", "/api/v1/auth/register",
                {"email": "bench@example.com", "username": "bench", "password": PASSWORD})
        token = request(base, "POST", "/api/v1/auth/login",
                        {"email": "bench@example.com", "password": PASSWORD})["access_token"]
        results.append((f"GET /health ({label})", CONNECTIONS, wrk(base + "/health", CONNECTIONS)))
        results.append((f"GET /api/v1/auth/me, JWT ({label})", CONNECTIONS,
                        wrk(base + "/api/v1/auth/me", CONNECTIONS, token=token)))
        if with_login:
            script = os.path.join(workdir, "login.lua")
            with open(script, "w") as f:
                body = json.dumps({"email": "bench@example.com", "password": PASSWORD})
                f.write('wrk.method = "POST"\n')
                f.write(f"wrk.body = {json.dumps(body)}\n")
                f.write('wrk.headers["Content-Type"] = "application/json"\n')
            results.append((f"POST /api/v1/auth/login, bcrypt cost 12 ({label})", 8,
                            wrk(base + "/api/v1/auth/login", 8, script=script)))
    finally:
        proc.terminate()
        proc.wait(timeout=40)


def memory_bandwidth():
    """Single-threaded read bandwidth (bytes/s): numpy sums a 1 GiB array."""
    code = ("import numpy as np, time\n"
            "a = np.ones(256 * 1024 * 1024, dtype=np.float32)\n"
            "a.sum()\n"
            "best = min((lambda t0: (a.sum(), time.perf_counter() - t0)[1])(time.perf_counter()) for _ in range(5))\n"
            "print(a.nbytes / best)\n")
    out = subprocess.run([os.path.join(ROOT, ".venv", "bin", "python"), "-c", code], check=True, capture_output=True, text=True)
    return float(out.stdout.strip())


def local_decode():
    """Muse's local decode vs the onnxruntime Python loop: decode alone and whole request (scripts/bench_local.py)."""
    py = os.path.join(ROOT, ".venv", "bin", "python")
    out = subprocess.run([py, os.path.join(ROOT, "scripts", "bench_local.py")], check=True, capture_output=True, text=True).stdout
    bw = memory_bandwidth()
    return out.splitlines() + ["", f"Single-thread read bandwidth {bw / 1e9:.1f} GB/s ÷ 498 MB of weights read per token "
                               f"= {bw / 498e6:.1f} tokens/s (the roofline of one thread)."]


def main():
    if not os.path.exists(BIN):
        sys.exit(f"{BIN} is missing: run `cargo build --release -p muse-server` (just bench does)")
    ensure_wrk()
    results = []
    workdir = tempfile.mkdtemp(prefix="muse-bench-")
    run_suite("SQLite", f"sqlite://{workdir}/bench.db", workdir, results, with_login=True)

    pg_url = os.environ.get("BENCH_DATABASE_URL") or os.environ.get("TEST_DATABASE_URL")
    if pg_url and shutil.which("psql"):
        name = f"muse_bench_{os.getpid()}"
        subprocess.run(["psql", pg_url, "-qc", f"CREATE DATABASE {name}"], check=True)
        base_url = pg_url.split("?")[0].rsplit("/", 1)[0]
        try:
            pg_dir = tempfile.mkdtemp(prefix="muse-bench-pg-")
            run_suite("PostgreSQL", f"{base_url}/{name}", pg_dir, results, with_login=False)
        finally:
            subprocess.run(["psql", pg_url, "-qc", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"], check=False)
    else:
        print("PostgreSQL run skipped: set BENCH_DATABASE_URL (or TEST_DATABASE_URL) and install psql", file=sys.stderr)
    subprocess.run([os.path.join(ROOT, "scripts", "ensure-venv.sh")], check=True)

    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except Exception:  # noqa: BLE001
        pass
    lines = [
        f"Machine: {os.cpu_count()} cores, {cpu}; wrk 1 thread, {DURATION} s per row, server WORKERS=default.",
        "",
        "| endpoint | connections | req/s | p50 ms | p99 ms | non-2xx |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, conns, r in results:
        lines.append(f"| {name} | {conns} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['non_2xx']} |")
    overhead = subprocess.run(
        [os.path.join(ROOT, "target", "release", "examples", "provider_overhead"), os.environ.get("BENCH_RATE", "500"), str(DURATION)],
        check=True, capture_output=True, text=True).stdout
    lines += ["", "Provider layer over a direct HTTP call (local OpenAI-protocol server, fixed rate, open loop):", "", overhead.strip()]
    rates = os.environ.get("BENCH_GATEWAY_RATES", "1000 2000 4000").split()
    sqlite_env = {k: v for k, v in os.environ.items() if k != "BENCH_DATABASE_URL"}
    gateway = subprocess.run(
        [os.path.join(ROOT, "target", "release", "examples", "gateway_bench"), BIN, str(DURATION), *rates],
        check=True, capture_output=True, text=True, env=sqlite_env).stdout
    lines += ["", "Gateway overhead: Muse (release binary, SQLite, every call authenticated by API key and recorded) "
              "in front of a local OpenAI-protocol server that answers at once, fixed rate, open loop; then closed loop:", "",
              gateway.strip()]
    pg = os.environ.get("BENCH_DATABASE_URL") or os.environ.get("TEST_DATABASE_URL")
    if pg:
        gateway = subprocess.run(
            [os.path.join(ROOT, "target", "release", "examples", "gateway_bench"), BIN, str(DURATION), *rates],
            check=True, capture_output=True, text=True, env={**os.environ, "BENCH_DATABASE_URL": pg}).stdout
        lines += ["", "The same on PostgreSQL (a fresh database on that server):", "", gateway.strip()]
    # A burst of WebSocket generations (issue 14's start-up target), after a
    # pause for the previous runs' sockets to leave TIME_WAIT.
    time.sleep(65)
    burst = subprocess.run(
        [os.path.join(ROOT, "target", "release", "examples", "ws_bench"), BIN, "100", "10", "250"],
        check=True, capture_output=True, text=True, env=sqlite_env).stdout
    lines += ["", "WebSocket start-up under a burst (SQLite):", "", burst.strip()]
    lines += ["", *local_decode()]
    table = "\n".join(lines)
    print(table)
    out_dir = os.path.join(ROOT, "target", "bench")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
