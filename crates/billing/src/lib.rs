//! Usage limits and switches: rate limiting ([`ratelimit`]) and feature
//! flags ([`flags`]). Plans, subscriptions and quotas are the rest of the
//! billing issue and not here yet.
//!
//! [`ratelimit`] implements GCRA (the generic cell rate algorithm) over a
//! [`RateLimitStore`]: [`MemoryStore`] for one process, a Redis store in
//! `muse-persistence` to share limits across replicas.

pub mod cached;
pub mod flags;
pub mod ledger;
pub mod plans;
pub mod ratelimit;
pub mod stripe;

pub use cached::{BillingChange, CachedBilling};
pub use flags::{FeatureFlag, FlagRepository, FlagSet, FlagStoreError};
pub use ledger::{QuotaLedger, SharedQuota, UsageChange};
pub use plans::{
    month_of, plan_id_in_force, plan_in_force, BillingError, BillingEvent, BillingRepository, Plan,
    QuotaKind, Reservation, Subscription, SubscriptionStatus, Usage, FREE_PLAN,
};
pub use ratelimit::{
    gcra, Decision, LimitError, MemoryStore, Quota, RateLimitStore, RateLimiter, Refusal,
    RouteClass, Subject,
};
pub use stripe::{CheckoutSession, PaymentError, PaymentGateway, SignatureError, StripeGateway};
