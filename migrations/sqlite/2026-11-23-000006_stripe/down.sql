DROP INDEX billing_events_external;
DROP INDEX subscriptions_customer;
ALTER TABLE subscriptions DROP COLUMN stripe_event_at;
DROP TABLE stripe_events;
