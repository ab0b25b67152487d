-- Feature flags: on/off, a stable percentage rollout, and allow-lists of
-- users and plans (JSON arrays). A flag that has no row is on.
CREATE TABLE feature_flags (
    key TEXT PRIMARY KEY NOT NULL,
    enabled BOOLEAN NOT NULL DEFAULT TRUE,
    rollout_percent INTEGER NOT NULL DEFAULT 100 CHECK (rollout_percent BETWEEN 0 AND 100),
    allow_users TEXT NOT NULL DEFAULT '[]',
    allow_plans TEXT NOT NULL DEFAULT '[]',
    description TEXT NOT NULL DEFAULT '',
    updated_by TEXT REFERENCES users(id) ON DELETE SET NULL,
    updated_at BIGINT NOT NULL
);
