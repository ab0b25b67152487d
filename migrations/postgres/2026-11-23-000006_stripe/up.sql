-- Stripe webhooks: every event id processed once; subscription changes
-- applied in event order (an older event never overwrites a newer one).
CREATE TABLE stripe_events (
    id TEXT PRIMARY KEY NOT NULL,
    kind TEXT NOT NULL,
    created BIGINT NOT NULL,
    processed_at BIGINT NOT NULL
);
ALTER TABLE subscriptions ADD COLUMN stripe_event_at BIGINT;
CREATE INDEX subscriptions_customer ON subscriptions(stripe_customer_id);
CREATE UNIQUE INDEX billing_events_external ON billing_events(external_id);
