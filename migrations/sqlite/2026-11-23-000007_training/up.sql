-- Training: uploaded datasets (the files live in the data directory under
-- training/datasets/<id>.jsonl) and the durable job queue.
CREATE TABLE datasets (
    id TEXT PRIMARY KEY NOT NULL,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    size_bytes BIGINT NOT NULL,
    format TEXT,
    row_count BIGINT NOT NULL,
    token_count BIGINT NOT NULL,
    report TEXT NOT NULL,
    estimated_cost_usd REAL,
    base_model TEXT,
    created_at BIGINT NOT NULL
);
CREATE INDEX datasets_user ON datasets (user_id, created_at);

-- A job is claimed by setting worker_id and lease_until; a worker renews
-- its lease (heartbeat), and a job whose lease ran out may be claimed again.
CREATE TABLE training_jobs (
    id TEXT PRIMARY KEY NOT NULL,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    dataset_id TEXT NOT NULL,
    base_model TEXT NOT NULL,
    trainer TEXT NOT NULL,
    hyperparameters TEXT NOT NULL,
    suffix TEXT,
    state TEXT NOT NULL CHECK (state IN ('queued', 'validating', 'running', 'succeeded', 'failed', 'cancelled')),
    progress TEXT NOT NULL,
    error TEXT,
    result_model TEXT,
    provider_job_id TEXT,
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
    worker_id TEXT,
    lease_until BIGINT,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    started_at BIGINT,
    finished_at BIGINT,
    updated_at BIGINT NOT NULL
);
CREATE INDEX training_jobs_user ON training_jobs (user_id, created_at);
CREATE INDEX training_jobs_queue ON training_jobs (state, created_at);
CREATE INDEX training_jobs_updated ON training_jobs (updated_at);
CREATE INDEX training_jobs_dataset ON training_jobs (dataset_id);

-- Plans cap unfinished training jobs per user.
ALTER TABLE plans ADD COLUMN max_training_jobs INTEGER NOT NULL DEFAULT 2;
UPDATE plans SET max_training_jobs = 0 WHERE id = 'free';
UPDATE plans SET max_training_jobs = 5 WHERE id = 'team';
