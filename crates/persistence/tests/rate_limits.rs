#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

//! The same rate-limit tests on every store: memory always, Redis too when
//! `TEST_REDIS_URL` is set (CI points it at the local Redis). Keys are
//! unique per run, so runs never see each other.

use std::sync::Arc;

use muse_billing::{MemoryStore, Quota, RateLimitStore};
use muse_core::SystemClock;
use muse_persistence::RedisRateLimitStore;
use uuid::Uuid;

fn redis_url() -> Option<String> {
    std::env::var("TEST_REDIS_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
}

/// Two handles on each store: for Redis, two independent clients, as two
/// Muse processes would have.
fn stores() -> Vec<(Arc<dyn RateLimitStore>, Arc<dyn RateLimitStore>)> {
    let memory: Arc<dyn RateLimitStore> = Arc::new(MemoryStore::new(Arc::new(SystemClock)));
    let mut v = vec![(memory.clone(), memory)];
    if let Some(url) = redis_url() {
        v.push((
            Arc::new(RedisRateLimitStore::new(&url).unwrap()),
            Arc::new(RedisRateLimitStore::new(&url).unwrap()),
        ));
    }
    v
}

fn key() -> String {
    format!("ip:test-{}:auth", Uuid::new_v4().simple())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_refusals_and_unblocking_on_every_store() {
    for (store, _) in stores() {
        let quota = Quota {
            count: 3,
            period_ms: 60_000,
        };
        let k = key();
        for left in [2, 1, 0] {
            let d = store.hit(&k, quota).await.unwrap();
            assert!(d.allowed, "{}", store.name());
            assert_eq!(d.remaining, left);
        }
        // Peeking says the same without counting.
        assert!(!store.peek(&k, quota).await.unwrap().allowed);
        assert!(store.peek(&key(), quota).await.unwrap().allowed);
        let d = store.hit(&k, quota).await.unwrap();
        assert!(!d.allowed);
        assert!((19_000..=20_000).contains(&d.retry_after_ms), "{d:?}");
        assert!(d.reset_ms > 59_000 && d.reset_ms <= 60_000, "{d:?}");
        store.record_refusal(&k).await.unwrap();
        store.record_refusal(&k).await.unwrap();
        let top = store.top_refused(1000).await.unwrap();
        assert!(top.contains(&(k.clone(), 2)), "{}: {top:?}", store.name());
        // Another key is untouched.
        assert!(store.hit(&key(), quota).await.unwrap().allowed);
        // Unblocking forgets the key and its refusals.
        assert_eq!(store.reset(std::slice::from_ref(&k)).await.unwrap(), 1);
        assert!(store.hit(&k, quota).await.unwrap().allowed);
        assert!(!store
            .top_refused(1000)
            .await
            .unwrap()
            .iter()
            .any(|(x, _)| x == &k));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_hits_from_two_processes_admit_exactly_the_quota() {
    for (a, b) in stores() {
        let quota = Quota {
            count: 10,
            period_ms: 3_600_000,
        };
        let k = key();
        let mut tasks = Vec::new();
        for i in 0..100 {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            let k = k.clone();
            tasks.push(tokio::spawn(async move {
                store.hit(&k, quota).await.unwrap().allowed
            }));
        }
        let mut admitted = 0;
        for t in tasks {
            admitted += usize::from(t.await.unwrap());
        }
        assert_eq!(admitted, 10, "{}", a.name());
    }
}

#[tokio::test]
async fn an_unreachable_redis_is_an_error_quickly_not_a_hang() {
    let store = RedisRateLimitStore::new("redis://127.0.0.1:1").unwrap();
    let started = std::time::Instant::now();
    let r = store
        .hit(
            "ip:x:auth",
            Quota {
                count: 1,
                period_ms: 1_000,
            },
        )
        .await;
    assert!(r.is_err());
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
    assert!(RedisRateLimitStore::new("not a url").is_err());
}

/// The HTTP server runs one runtime per worker thread. A command must not
/// depend on the thread that opened the connection: here that thread's
/// runtime is left unpolled after its first command (as a busy or
/// descheduled worker's is), and a command from a second thread still gets
/// its answer (each thread has its own connection) instead of timing out.
#[test]
fn a_command_does_not_wait_for_the_thread_that_opened_the_connection() {
    let Some(url) = redis_url() else {
        eprintln!("skipping: TEST_REDIS_URL is not set");
        return;
    };
    let store: Arc<dyn RateLimitStore> = Arc::new(RedisRateLimitStore::new(&url).unwrap());
    let quota = Quota {
        count: 10,
        period_ms: 60_000,
    };
    let k = key();
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let (opened, wait_opened) = std::sync::mpsc::channel();
    let (release, wait_release) = std::sync::mpsc::channel::<()>();
    let (first, first_key) = (store.clone(), k.clone());
    let idle = std::thread::spawn(move || {
        let rt = runtime();
        let d = rt
            .block_on(first.hit(&first_key, quota))
            .map(|d| d.remaining);
        opened.send(d).unwrap();
        // The runtime (and the connection it drives) stays, unpolled.
        wait_release.recv().ok();
    });
    assert_eq!(wait_opened.recv().unwrap().unwrap(), 9);
    let second = runtime().block_on(store.hit(&k, quota));
    release.send(()).unwrap();
    idle.join().unwrap();
    assert_eq!(
        second
            .unwrap_or_else(|e| panic!("the command waited for the idle thread: {e}"))
            .remaining,
        8
    );
}
