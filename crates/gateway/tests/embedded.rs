#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

//! The gateway embedded the way another Rust service would use it: no
//! actix, no HTTP — a registry, plans on a database, quotas counted in
//! memory, records written by group commit. Runs on SQLite, or on
//! PostgreSQL when `TEST_DATABASE_URL` is set.

use std::sync::Arc;

use futures_util::StreamExt;
use muse_auth::AuthRepository;
use muse_billing::{
    BillingError, BillingRepository, CachedBilling, Plan, QuotaKind, QuotaLedger, SharedQuota,
    Usage, UsageChange,
};
use muse_gateway::{
    AdmitError, Gateway, GatewayOptions, QuotaCounting, Run, RunEvent, WriteMode, Writer,
};
use muse_inference::{
    testing::EchoProvider, GenerateRequest, Message, ModelRegistry, PriceTable, RetryPolicy,
};
use muse_persistence::{Database, DieselBillingRepository, DieselCallStore};
use muse_prompts::{ExecutionRepository, ExecutionScope, ExecutionSource, ExecutionStatus};
use uuid::Uuid;

fn request(text: &str) -> GenerateRequest {
    GenerateRequest::new("echo", vec![Message::user(text)])
}

/// A user on `db`, and plans read through a cache (one minute).
fn user_and_plans(db: &Database, email: &str) -> (muse_auth::User, Arc<CachedBilling>) {
    let now = muse_core::Clock::now_ms(&muse_core::SystemClock);
    let user = muse_auth::User {
        id: Uuid::now_v7(),
        email: email.into(),
        username: email.split('@').next().unwrap_or("user").into(),
        password_hash: "$2b$04$hash".into(),
        role: muse_auth::Role::User,
        status: muse_auth::UserStatus::Active,
        email_verified_at: None,
        created_at: now,
        updated_at: now,
    };
    muse_persistence::DieselAuthRepository::new(db.clone())
        .create_user(&user)
        .unwrap();
    let plans = Arc::new(CachedBilling::new(
        Arc::new(DieselBillingRepository::new(db.clone())),
        60_000,
        Arc::new(muse_core::SystemClock),
    ));
    (user, plans)
}

/// A gateway over the echo model, plans read through `plans`, quotas
/// counted as `quota` says, records written by group commit on `db`.
fn gateway_on(db: &Database, plans: &Arc<CachedBilling>, quota: QuotaCounting) -> Gateway {
    let writer =
        Writer::start(Arc::new(DieselCallStore::new(db.clone())), WriteMode::Sync).unwrap();
    Gateway::new(
        echo_registry(),
        plans.clone(),
        quota,
        writer,
        GatewayOptions::default(),
    )
}

/// The free plan without any quota (returned, to be given one later).
fn uncapped_free_plan(plans: &CachedBilling, now: i64) -> Plan {
    let mut free = plans.plan("free").unwrap().expect("seeded");
    (free.max_requests, free.max_tokens, free.max_cost_usd) = (None, None, None);
    plans.upsert_plan(&free, now).unwrap();
    free
}

/// `user` asks `gateway` for one chat call on the echo model.
async fn admit(gateway: &Gateway, user: Uuid, text: &str) -> Result<Run, AdmitError> {
    Run::new(
        gateway,
        user,
        ExecutionSource::OpenaiApi,
        "test/echo",
        request(text),
    )
    .admit()
    .await
}

/// `e` is the plan's request quota refusing a call.
fn assert_requests_quota(e: AdmitError) {
    assert!(
        matches!(
            e,
            AdmitError::QuotaExceeded {
                kind: QuotaKind::Requests,
                ..
            }
        ),
        "{e:?}"
    );
}

/// A test database (SQLite, or PostgreSQL with `TEST_DATABASE_URL`; kept
/// while the first value lives), migrated, and a pool on it.
fn migrated_db() -> (muse_persistence::testing::TestDb, Database) {
    let t = muse_persistence::testing::TestDb::new();
    let db = Database::connect(&t.url, 4).unwrap();
    db.run_migrations().unwrap();
    (t, db)
}

fn echo_registry() -> Arc<ModelRegistry> {
    let mut registry = ModelRegistry::new(PriceTable::builtin(), RetryPolicy::none());
    registry.add_provider(Arc::new(EchoProvider::new()), &["echo".to_string()]);
    Arc::new(registry)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_admitted_run_recorded_and_refused_past_the_quota() {
    let (_t, db) = migrated_db();
    let now = muse_core::Clock::now_ms(&muse_core::SystemClock);
    let (user, plans) = user_and_plans(&db, "embed@example.com");
    let mut free = plans
        .plan("free")
        .unwrap()
        .expect("seeded by the migrations");
    free.max_requests = Some(3);
    free.max_cost_usd = None;
    plans.upsert_plan(&free, now).unwrap();

    let gateway = gateway_on(&db, &plans, QuotaCounting::Memory(QuotaLedger::new()));
    let key = "test/echo";
    let source = ExecutionSource::OpenaiApi;
    let executions = muse_persistence::DieselExecutionRepository::new(db.clone());

    // A whole answer, recorded before it is handed back.
    let done = Run::new(&gateway, user.id, source, key, request("hello world"))
        .admit()
        .await
        .unwrap()
        .complete()
        .await
        .unwrap();
    assert_eq!(done.execution.output.as_deref(), Some("echo: hello world"));
    let stored = executions
        .get(ExecutionScope::All, done.execution.id)
        .unwrap()
        .expect("recorded");
    assert_eq!(stored.status, ExecutionStatus::Succeeded);
    assert_eq!(stored.completion_tokens, 3);

    // A stream: tokens, then exactly one Done.
    let mut events = Run::new(&gateway, user.id, source, key, request("one two"))
        .admit()
        .await
        .unwrap()
        .stream()
        .await
        .unwrap();
    let mut text = String::new();
    let mut finished = None;
    while let Some(event) = events.next().await {
        match event {
            RunEvent::Token(t) => text.push_str(&t),
            RunEvent::Done(d) => finished = Some(d),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(text, "echo: one two");
    assert_eq!(
        finished.expect("a Done event").execution.status,
        ExecutionStatus::Succeeded
    );

    // A stream the caller drops after its first token: recorded as
    // cancelled, with the output it had.
    let run = Run::new(&gateway, user.id, source, key, request("a b c d"))
        .admit()
        .await
        .unwrap();
    let id = run.id;
    let mut events = run.stream().await.unwrap();
    assert!(matches!(events.next().await, Some(RunEvent::Token(_))));
    drop(events);
    let mut cancelled = None;
    for _ in 0..200 {
        cancelled = executions.get(ExecutionScope::All, id).unwrap();
        if cancelled.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let cancelled = cancelled.expect("the dropped run is recorded");
    assert_eq!(cancelled.status, ExecutionStatus::Cancelled);
    assert_eq!(cancelled.output.as_deref(), Some("echo: "));

    // The plan allows three requests a month: the fourth is refused before
    // any model is called, and nothing is recorded for it.
    let refused = Run::new(&gateway, user.id, source, key, request("again"))
        .admit()
        .await
        .err()
        .expect("over the quota");
    assert_requests_quota(refused);
    // The usage table got the three calls by group commit.
    assert_eq!(gateway.writer().drain(std::time::Duration::from_secs(5)), 0);
    let (period, _) = muse_billing::month_of(now);
    let usage = plans.usage(user.id, period).unwrap();
    assert_eq!(usage.requests, 3);
}

/// The Redis quota store, counting the reservations asked of it.
struct CountingStore {
    redis: muse_persistence::RedisQuotaStore,
    reservations: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl SharedQuota for CountingStore {
    async fn reserve(
        &self,
        user_id: Uuid,
        period_start: i64,
        plan: &Plan,
        tokens: i64,
        cost_usd: f64,
    ) -> Result<Option<Result<(), QuotaKind>>, BillingError> {
        self.reservations
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.redis
            .reserve(user_id, period_start, plan, tokens, cost_usd)
            .await
    }

    async fn load(
        &self,
        user_id: Uuid,
        period_start: i64,
        period_end: i64,
        stored: Usage,
    ) -> Result<(), BillingError> {
        self.redis
            .load(user_id, period_start, period_end, stored)
            .await
    }

    async fn add(&self, changes: &[UsageChange]) -> Result<(), BillingError> {
        self.redis.add(changes).await
    }

    async fn forget(&self, user_id: Uuid, period_start: i64) -> Result<(), BillingError> {
        self.redis.forget(user_id, period_start).await
    }
}

/// A plan with no quota needs no reservation: its calls take no round
/// trip to the shared store, yet are counted there once they end — so
/// that a quota the plan gains mid-period starts from the right count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncapped_plan_reserves_nothing_on_the_shared_store_and_is_counted_there() {
    let Ok(url) = std::env::var("TEST_REDIS_URL") else {
        eprintln!("skipping: TEST_REDIS_URL is not set");
        return;
    };
    let (_t, db) = migrated_db();
    let now = muse_core::Clock::now_ms(&muse_core::SystemClock);
    let (user, plans) = user_and_plans(&db, "uncapped@example.com");
    let mut free = uncapped_free_plan(&plans, now);

    let store = Arc::new(CountingStore {
        redis: muse_persistence::RedisQuotaStore::new(&url).unwrap(),
        reservations: Default::default(),
    });
    let gateway = gateway_on(&db, &plans, QuotaCounting::Shared(store.clone()));
    let (period, period_end) = muse_billing::month_of(now);
    store
        .load(user.id, period, period_end, Usage::default())
        .await
        .unwrap();
    let reservations = || store.reservations.load(std::sync::atomic::Ordering::SeqCst);
    let call = |text| admit(&gateway, user.id, text);

    for _ in 0..3 {
        call("hello world").await.unwrap().complete().await.unwrap();
    }
    assert_eq!(reservations(), 0, "no quota: nothing reserved");
    gateway.flush_quota_counts().await.unwrap();

    // The plan gains a quota of four requests: the three calls were
    // counted on the store, so one more is admitted, not four.
    free.max_requests = Some(4);
    plans.upsert_plan(&free, now).unwrap();
    call("one more").await.unwrap().complete().await.unwrap();
    assert_eq!(reservations(), 1, "capped again: reserved on the store");
    let refused = call("past the quota").await.err().expect("over the quota");
    assert_requests_quota(refused);
    // The usage table has the four calls too.
    assert_eq!(gateway.writer().drain(std::time::Duration::from_secs(5)), 0);
    assert_eq!(plans.usage(user.id, period).unwrap().requests, 4);
    store.forget(user.id, period).await.unwrap();
}

/// Quotas counted in the database: a plan without any quota takes no
/// reservation (no conditional `UPDATE` before the call), and each call is
/// counted exactly once, with its record — so a quota the plan gains
/// mid-month starts from the real count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncapped_plan_is_counted_once_in_the_database() {
    let (_t, db) = migrated_db();
    let now = muse_core::Clock::now_ms(&muse_core::SystemClock);
    let (user, plans) = user_and_plans(&db, "uncapped-db@example.com");
    let mut free = uncapped_free_plan(&plans, now);
    let gateway = gateway_on(&db, &plans, QuotaCounting::Database);
    let call = |text| admit(&gateway, user.id, text);
    let (period, _) = muse_billing::month_of(now);
    for done in 0..3 {
        let run = call("hello world").await.unwrap();
        assert_eq!(
            plans.usage(user.id, period).unwrap().requests,
            done,
            "nothing reserved before the call"
        );
        run.complete().await.unwrap();
    }
    assert_eq!(plans.usage(user.id, period).unwrap().requests, 3);

    free.max_requests = Some(4);
    plans.upsert_plan(&free, now).unwrap();
    call("one more").await.unwrap().complete().await.unwrap();
    assert_requests_quota(call("past the quota").await.err().expect("over the quota"));
    assert_eq!(plans.usage(user.id, period).unwrap().requests, 4);
}
