#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

//! The gateway embedded the way another Rust service would use it: no
//! actix, no HTTP — a registry, plans on a database, quotas counted in
//! memory, records written by group commit. Runs on SQLite, or on
//! PostgreSQL when `TEST_DATABASE_URL` is set.

use std::sync::Arc;

use futures_util::StreamExt;
use muse_auth::AuthRepository;
use muse_billing::{BillingRepository, CachedBilling, QuotaKind, QuotaLedger};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_admitted_run_recorded_and_refused_past_the_quota() {
    let t = muse_persistence::testing::TestDb::new();
    let db = Database::connect(&t.url, 4).unwrap();
    db.run_migrations().unwrap();
    let now = muse_core::Clock::now_ms(&muse_core::SystemClock);
    let user = muse_auth::User {
        id: Uuid::now_v7(),
        email: "embed@example.com".into(),
        username: "embedder".into(),
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
    let mut free = plans
        .plan("free")
        .unwrap()
        .expect("seeded by the migrations");
    free.max_requests = Some(3);
    free.max_cost_usd = None;
    plans.upsert_plan(&free, now).unwrap();

    let mut registry = ModelRegistry::new(PriceTable::builtin(), RetryPolicy::none());
    registry.add_provider(Arc::new(EchoProvider::new()), &["echo".to_string()]);
    let writer =
        Writer::start(Arc::new(DieselCallStore::new(db.clone())), WriteMode::Sync).unwrap();
    let gateway = Gateway::new(
        Arc::new(registry),
        plans.clone(),
        QuotaCounting::Memory(QuotaLedger::new()),
        writer,
        GatewayOptions::default(),
    );
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
    assert!(
        matches!(
            refused,
            AdmitError::QuotaExceeded {
                kind: QuotaKind::Requests,
                ..
            }
        ),
        "{refused:?}"
    );
    // The usage table got the three calls by group commit.
    assert_eq!(gateway.writer().drain(std::time::Duration::from_secs(5)), 0);
    let (period, _) = muse_billing::month_of(now);
    let usage = plans.usage(user.id, period).unwrap();
    assert_eq!(usage.requests, 3);
}
