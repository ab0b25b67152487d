-- Every model call a user makes: prompt executions, ideas, and calls to the
-- OpenAI-compatible API. Failures and cancellations are recorded too.
CREATE TABLE executions (
    id TEXT PRIMARY KEY NOT NULL,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    source TEXT NOT NULL CHECK (source IN ('openai_api', 'prompt', 'idea')),
    prompt_id TEXT,
    prompt_version INTEGER,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    variables TEXT,
    rendered_prompt TEXT,
    output TEXT,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cost_usd DOUBLE PRECISION,
    duration_ms BIGINT NOT NULL,
    ttft_ms BIGINT,
    status TEXT NOT NULL CHECK (status IN ('succeeded', 'failed', 'cancelled')),
    error TEXT,
    created_at BIGINT NOT NULL
);
CREATE INDEX executions_user_created ON executions(user_id, created_at);
