# Muse — the two commands that matter are `just run` and `just test`.

set shell := ["bash", "-euo", "pipefail", "-c"]

default:
    @just --list

# Start Muse on SQLite (./data/muse.db), http://127.0.0.1:8000, docs at /docs/; offers local/HuggingFaceTB/SmolLM2-135M-Instruct (pulled on first use when online)
run *ARGS:
    ./scripts/ensure-system-deps.sh
    ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(./scripts/ort-path.sh)}" LOCAL_MODELS="${LOCAL_MODELS:-HuggingFaceTB/SmolLM2-135M-Instruct}" cargo run -p muse-server --bin muse -- {{ARGS}}

# Local model cache: `just models list`, `just models pull ORG/NAME [--variant fp32|fp16|int8|q4]`
models *ARGS:
    ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(./scripts/ort-path.sh)}" cargo run -q -p muse-server --bin muse -- models {{ARGS}}

# fmt, clippy -D warnings, dependency rules, test models, and every test (PostgreSQL too when TEST_DATABASE_URL is set; three replicas behind nginx when TEST_REDIS_URL is set too)
test: lint test-models
    ./scripts/check-domain-deps.sh
    if [ -n "${TEST_DATABASE_URL:-}" ] && [ -n "${TEST_REDIS_URL:-}" ]; then ./scripts/ensure-nginx.sh; fi
    PATH="$PATH:/usr/sbin" ORT_DYLIB_PATH="$(./scripts/ort-path.sh)" MUSE_REQUIRE_LOCAL_MODELS=1 cargo test --workspace --no-fail-fast

# Generate the tiny ONNX test models (deterministic, checked) into target/test-models/hub, check them against the reference onnxruntime loop, and write the chat-template reference (transformers) into target/test-models/chat-templates
test-models:
    ./scripts/ensure-venv.sh
    .venv/bin/python scripts/make_test_models.py --check
    .venv/bin/python scripts/reference_generate.py --verify --model target/test-models/hub/models--muse-test--tiny-gpt2 --prompt "Once upon a time" --max-new-tokens 24
    .venv/bin/python scripts/reference_generate.py --verify --model target/test-models/hub/models--muse-test--tiny-llama --prompt "Once upon a time" --max-new-tokens 24
    .venv/bin/python scripts/chat_template_reference.py --tokenizer "$(ls -d target/test-models/hub/models--muse-test--tiny-llama/snapshots/*)/tokenizer.json"

# Formatting and clippy, warnings are errors
lint:
    ./scripts/ensure-system-deps.sh
    cargo fmt --all --check
    cargo clippy --workspace --all-targets -- -D warnings

# Release build, then: wrk on /health, /auth/me (SQLite and PostgreSQL), /auth/login; provider and gateway overhead; SSE/WebSocket relay cost; local decode
bench:
    ./scripts/ensure-system-deps.sh
    cargo build --release -p muse-server --bin muse
    cargo build --release -p muse-inference --example provider_overhead --example local_decode
    cargo build --release -p muse-tests --example gateway_bench --example ws_bench
    python3 scripts/bench.py

# Muse against the model server directly, same run: /v1/chat/completions and execute-prompt at fixed rates (open loop, latency from the scheduled send time), then closed loop with 64 connections. SQLite; BENCH_DATABASE_URL=postgres://… for PostgreSQL, QUOTA_STORE/EXECUTION_WRITES pass through, BENCH_QUOTA=capped gives the plan quotas (reserved on every call)
bench-gateway SECONDS="5" *RATES="50 500 1000 2000 4000":
    cargo build --release -p muse-server --bin muse -p muse-tests --example gateway_bench
    target/release/examples/gateway_bench target/release/muse {{SECONDS}} {{RATES}}

# What one durable PostgreSQL commit costs here without Muse (pgbench, one-row INSERTs at fixed rates, synchronous_commit on and off): the floor under the default EXECUTION_WRITES=sync on PostgreSQL. The database: URL, else BENCH_DATABASE_URL, else the local test database
bench-pg-floor URL=env_var_or_default("BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test") SECONDS="10" *RATES="1000 4000":
    python3 scripts/pg_commit_floor.py {{URL}} {{SECONDS}} {{RATES}}

# Rewrite docs/openapi.json from the handlers (review the diff)
openapi:
    UPDATE_SNAPSHOTS=1 cargo test -p muse-tests --test api openapi_snapshot

# Training workers without the HTTP server (same database and data directory as `just run`)
worker *ARGS:
    ./scripts/ensure-system-deps.sh
    ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(./scripts/ort-path.sh)}" cargo run -p muse-server --bin muse -- worker {{ARGS}}

# Apply migrations and exit
migrate:
    cargo run -p muse-server --bin muse -- migrate
