-- Plans (seeded, editable by admins), subscriptions (none = the free plan),
-- usage counters per user and calendar month, and billing history.
CREATE TABLE plans (
    id TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL,
    price_cents BIGINT NOT NULL DEFAULT 0,
    currency TEXT NOT NULL DEFAULT 'usd',
    stripe_price_id TEXT,
    max_requests BIGINT,
    max_tokens BIGINT,
    max_cost_usd DOUBLE PRECISION,
    max_batch INTEGER NOT NULL DEFAULT 10,
    allowed_models TEXT NOT NULL DEFAULT '[]',
    training_allowed BOOLEAN NOT NULL DEFAULT FALSE,
    active BOOLEAN NOT NULL DEFAULT TRUE,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE subscriptions (
    user_id TEXT PRIMARY KEY NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    plan_id TEXT NOT NULL REFERENCES plans(id),
    status TEXT NOT NULL CHECK (status IN ('active', 'past_due', 'canceled')),
    cancel_at_period_end BOOLEAN NOT NULL DEFAULT FALSE,
    stripe_customer_id TEXT,
    stripe_subscription_id TEXT,
    current_period_end BIGINT,
    updated_at BIGINT NOT NULL
);

CREATE TABLE usage_counters (
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    period_start BIGINT NOT NULL,
    requests BIGINT NOT NULL DEFAULT 0,
    tokens BIGINT NOT NULL DEFAULT 0,
    cost_usd DOUBLE PRECISION NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, period_start)
);

CREATE TABLE billing_events (
    id TEXT PRIMARY KEY NOT NULL,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    description TEXT NOT NULL,
    amount_cents BIGINT,
    currency TEXT,
    external_id TEXT,
    created_at BIGINT NOT NULL
);
CREATE INDEX billing_events_user_created ON billing_events(user_id, created_at);

INSERT INTO plans (id, name, price_cents, currency, max_requests, max_tokens, max_cost_usd, max_batch, allowed_models, training_allowed, created_at, updated_at) VALUES
    ('free', 'Free', 0, 'usd', 100, 100000, 1.0, 3, '[]', FALSE, 1763769600000, 1763769600000),
    ('pro', 'Pro', 1900, 'usd', 5000, 5000000, 50.0, 10, '[]', TRUE, 1763769600000, 1763769600000),
    ('team', 'Team', 9900, 'usd', 50000, 50000000, 500.0, 10, '[]', TRUE, 1763769600000, 1763769600000);
