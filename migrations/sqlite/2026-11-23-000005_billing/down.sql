DROP TABLE billing_events;
DROP TABLE usage_counters;
DROP TABLE subscriptions;
DROP TABLE plans;
