#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

//! The Redis quota store (`QUOTA_STORE=redis`), when `TEST_REDIS_URL` is
//! set (CI points it at the local Redis): exact under concurrency from two
//! independent clients, as two replicas would be. Users are unique per
//! run, so runs never see each other.

use std::sync::Arc;

use muse_billing::{Plan, QuotaKind, SharedQuota, Usage};
use muse_persistence::RedisQuotaStore;
use uuid::Uuid;

fn redis_url() -> Option<String> {
    std::env::var("TEST_REDIS_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
}

fn plan(requests: Option<i64>, tokens: Option<i64>, cost: Option<f64>) -> Plan {
    Plan {
        id: "free".into(),
        name: "Free".into(),
        price_cents: 0,
        currency: "usd".into(),
        stripe_price_id: None,
        max_requests: requests,
        max_tokens: tokens,
        max_cost_usd: cost,
        max_batch: 3,
        allowed_models: vec![],
        training_allowed: false,
        max_training_jobs: 0,
        active: true,
    }
}

const PERIOD: i64 = 1_700_000_000_000;
/// Far enough ahead that the counters do not expire during the test.
fn period_end() -> i64 {
    muse_core::Clock::now_ms(&muse_core::SystemClock) + 3_600_000
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_admit_exactly_the_quota_together() {
    let Some(url) = redis_url() else {
        eprintln!("skipping: TEST_REDIS_URL is not set");
        return;
    };
    let stores: [Arc<dyn SharedQuota>; 2] = [
        Arc::new(RedisQuotaStore::new(&url).unwrap()),
        Arc::new(RedisQuotaStore::new(&url).unwrap()),
    ];
    let user = Uuid::now_v7();
    let p = plan(Some(10), None, None);
    // Not loaded yet: the caller must load it from storage first.
    assert_eq!(
        stores[0].reserve(user, PERIOD, &p, 5, 0.0).await.unwrap(),
        None
    );
    let stored = Usage {
        requests: 2,
        tokens: 0,
        cost_usd: 0.0,
    };
    stores[0]
        .load(user, PERIOD, period_end(), stored)
        .await
        .unwrap();
    // A second load (another replica, later) keeps the count.
    stores[1]
        .load(user, PERIOD, period_end(), Usage::default())
        .await
        .unwrap();
    let calls = (0..100).map(|i| {
        let (store, p) = (stores[i % 2].clone(), p.clone());
        tokio::spawn(async move { store.reserve(user, PERIOD, &p, 5, 0.0).await.unwrap() })
    });
    let outcomes: Vec<_> = futures_util::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let admitted = outcomes.iter().filter(|o| **o == Some(Ok(()))).count();
    let refused = outcomes
        .iter()
        .filter(|o| **o == Some(Err(QuotaKind::Requests)))
        .count();
    assert_eq!((admitted, refused), (8, 92), "10 minus the 2 already used");
    stores[0].forget(user, PERIOD).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_cost_are_reserved_reconciled_and_forgotten() {
    let Some(url) = redis_url() else {
        eprintln!("skipping: TEST_REDIS_URL is not set");
        return;
    };
    let store = RedisQuotaStore::new(&url).unwrap();
    let user = Uuid::now_v7();
    store
        .load(user, PERIOD, period_end(), Usage::default())
        .await
        .unwrap();
    let p = plan(None, Some(100), Some(1.0));
    assert_eq!(
        store.reserve(user, PERIOD, &p, 80, 0.5).await.unwrap(),
        Some(Ok(()))
    );
    assert_eq!(
        store.reserve(user, PERIOD, &p, 30, 0.0).await.unwrap(),
        Some(Err(QuotaKind::Tokens))
    );
    let r = muse_billing::Reservation {
        user_id: user,
        period_start: PERIOD,
        tokens: 80,
        cost_usd: 0.5,
    };
    store
        .add(&[muse_billing::UsageChange::settling(&r, 10, 0.1)])
        .await
        .unwrap();
    assert_eq!(
        store.reserve(user, PERIOD, &p, 30, 0.0).await.unwrap(),
        Some(Ok(())),
        "the estimate was given back"
    );
    assert_eq!(
        store.reserve(user, PERIOD, &p, 1, 0.95).await.unwrap(),
        Some(Err(QuotaKind::Cost))
    );
    // Costs as small as one token's keep their precision.
    assert_eq!(
        store
            .reserve(user, PERIOD, &p, 1, 0.000_000_15)
            .await
            .unwrap(),
        Some(Ok(()))
    );
    store.forget(user, PERIOD).await.unwrap();
    assert_eq!(
        store.reserve(user, PERIOD, &p, 1, 0.0).await.unwrap(),
        None,
        "forgotten: loaded again from storage"
    );
}

/// One `add` changes several periods at once (more than one script run
/// takes: 300 periods), counts requests when told to, and leaves alone a
/// period that is not loaded (it loads from storage when next used).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_added_to_many_periods_at_once_and_only_where_loaded() {
    let Some(url) = redis_url() else {
        eprintln!("skipping: TEST_REDIS_URL is not set");
        return;
    };
    let store = RedisQuotaStore::new(&url).unwrap();
    let users: Vec<Uuid> = (0..300).map(|_| Uuid::now_v7()).collect();
    for u in &users {
        store
            .load(*u, PERIOD, period_end(), Usage::default())
            .await
            .unwrap();
    }
    let not_loaded = Uuid::now_v7();
    let change = |user_id: Uuid| muse_billing::UsageChange {
        user_id,
        period_start: PERIOD,
        usage: Usage {
            requests: 1,
            tokens: 40,
            cost_usd: 0.25,
        },
    };
    let mut changes: Vec<_> = users.iter().map(|u| change(*u)).collect();
    changes.push(change(not_loaded));
    store.add(&changes).await.unwrap();
    // Each loaded period now holds one request, 40 tokens and $0.25.
    let p = plan(Some(2), Some(100), Some(1.0));
    for u in [users[0], users[299]] {
        assert_eq!(
            store.reserve(u, PERIOD, &p, 61, 0.0).await.unwrap(),
            Some(Err(QuotaKind::Tokens)),
            "40 counted + 61 > 100"
        );
        assert_eq!(
            store.reserve(u, PERIOD, &p, 60, 0.75).await.unwrap(),
            Some(Ok(())),
            "40 + 60 and 0.25 + 0.75 fit exactly"
        );
        assert_eq!(
            store.reserve(u, PERIOD, &p, 0, 0.0).await.unwrap(),
            Some(Err(QuotaKind::Requests)),
            "1 counted + 1 reserved: the quota of 2 is reached"
        );
    }
    assert_eq!(
        store.reserve(not_loaded, PERIOD, &p, 1, 0.0).await.unwrap(),
        None,
        "never loaded: left alone"
    );
    for u in users {
        store.forget(u, PERIOD).await.unwrap();
    }
}

#[tokio::test]
async fn an_unreachable_redis_is_an_unavailable_error() {
    let store = RedisQuotaStore::new("redis://127.0.0.1:1").unwrap();
    let e = store
        .reserve(Uuid::now_v7(), PERIOD, &plan(Some(1), None, None), 1, 0.0)
        .await
        .unwrap_err();
    assert!(
        matches!(e, muse_billing::BillingError::Unavailable(_)),
        "{e:?}"
    );
}

/// Muse's HTTP workers each run a runtime of their own and stop before
/// the process sends its last settlements (from the main runtime): the
/// store must still answer once the runtime that first used it is gone.
#[test]
fn the_store_outlives_the_runtime_that_first_used_it() {
    let Some(url) = redis_url() else {
        eprintln!("skipping: TEST_REDIS_URL is not set");
        return;
    };
    let store = Arc::new(RedisQuotaStore::new(&url).unwrap());
    let user = Uuid::now_v7();
    let first = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    first.block_on(async {
        store
            .load(user, PERIOD, period_end(), Usage::default())
            .await
            .unwrap();
    });
    drop(first);
    let second = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    second.block_on(async {
        let change = muse_billing::UsageChange {
            user_id: user,
            period_start: PERIOD,
            usage: Usage {
                requests: 1,
                tokens: 0,
                cost_usd: 0.0,
            },
        };
        store.add(&[change]).await.unwrap();
        assert_eq!(
            store
                .reserve(user, PERIOD, &plan(Some(1), None, None), 0, 0.0)
                .await
                .unwrap(),
            Some(Err(QuotaKind::Requests)),
            "the request added from the second runtime was counted"
        );
        store.forget(user, PERIOD).await.unwrap();
    });
}
