//! Group commit of model-call records: one writer thread per store takes
//! finished calls (execution, idea, quota reconciliation) from a bounded
//! queue and writes everything queued in one transaction. A batch closes
//! when the queue is empty or at [`MAX_BATCH`] calls: under load, the
//! calls that finish while a batch commits form the next one, so commits
//! per second stay flat while calls per second grow. Above a rate
//! ([`BatchWindow`]: 2,000 calls/s by default) a batch also waits a little
//! (200 µs) for more calls before it commits.
//!
//! `EXECUTION_WRITES=sync` (the default): a call is answered once its
//! batch has committed — no acknowledged call is ever unrecorded.
//! `EXECUTION_WRITES=async`: answered at once; a crash loses what was
//! queued (at most the queue, [`QUEUE`] calls, and in practice the few
//! milliseconds of one batch). A full queue makes callers wait (never
//! drops). Shutdown drains the queue before the process exits.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use muse_prompts::{CallRecord, CallStore, RecordError};
use tokio::sync::{mpsc, oneshot};

/// Most calls in one transaction.
pub const MAX_BATCH: usize = 512;
/// Calls waiting to be written before callers wait.
pub const QUEUE: usize = 8_192;
/// Attempts at a batch while the database refuses it (1 s apart).
const ATTEMPTS: u32 = 30;

/// When a call's answer waits for its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// After the record's commit (default).
    Sync,
    /// At once; the record follows.
    Async,
}

enum Item {
    Record(Box<CallRecord>, Option<oneshot::Sender<bool>>),
}

/// The writer: cheap to clone (a queue handle).
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Item>,
    store: Arc<dyn CallStore>,
    mode: WriteMode,
    /// Records submitted and not yet written.
    pending: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").field("mode", &self.mode).finish()
    }
}

/// What a queued record becomes: `true` once committed, `false` if it
/// could not be written (logged).
pub type Written = oneshot::Receiver<bool>;

impl Writer {
    /// Starts the writer thread over `store`, with the default
    /// [`BatchWindow`].
    pub fn start(store: Arc<dyn CallStore>, mode: WriteMode) -> std::io::Result<Self> {
        Self::start_with(store, mode, BatchWindow::default())
    }

    /// Starts the writer thread over `store`; batches wait as `window` says.
    pub fn start_with(
        store: Arc<dyn CallStore>,
        mode: WriteMode,
        window: BatchWindow,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let pending = Arc::new(AtomicUsize::new(0));
        let counter = pending.clone();
        let writes = store.clone();
        std::thread::Builder::new()
            .name("muse-writer".into())
            .spawn(move || run(&*writes, rx, counter, window))?;
        Ok(Self {
            tx,
            store,
            mode,
            pending,
        })
    }

    pub fn mode(&self) -> WriteMode {
        self.mode
    }

    /// Queues a call's record. Returns when it will be written (or `None`
    /// when the writer is gone: the record is then written here, blocking).
    /// A full queue makes this wait: on a blocking thread when there is a
    /// runtime, else here.
    pub fn submit(&self, record: CallRecord) -> Option<Written> {
        let (done, written) = oneshot::channel();
        let item = Item::Record(Box::new(record), Some(done));
        self.pending.fetch_add(1, Ordering::SeqCst);
        match self.tx.try_send(item) {
            Ok(()) => Some(written),
            Err(mpsc::error::TrySendError::Full(item)) => {
                metrics::counter!("execution_write_backpressure_total").increment(1);
                let tx = self.tx.clone();
                match tokio::runtime::Handle::try_current() {
                    Ok(rt) => {
                        rt.spawn_blocking(move || {
                            let _ = tx.blocking_send(item);
                        });
                    }
                    Err(_) => {
                        let _ = tx.blocking_send(item);
                    }
                }
                Some(written)
            }
            Err(mpsc::error::TrySendError::Closed(Item::Record(record, _))) => {
                self.pending.fetch_sub(1, Ordering::SeqCst);
                // The writer stopped (shutdown): write this one directly.
                if let Err(e) = self.store.record_calls(std::slice::from_ref(&record)) {
                    tracing::error!(error = %e, execution_id = %record.execution.id, "could not record an execution");
                }
                None
            }
        }
    }

    /// Waits (at most `limit`) until every record submitted so far is
    /// written: graceful shutdown calls it once the server has stopped.
    /// Returns how many are still unwritten (0 normally).
    pub fn drain(&self, limit: Duration) -> usize {
        let started = Instant::now();
        loop {
            let left = self.pending.load(Ordering::SeqCst);
            if left == 0 || started.elapsed() >= limit {
                return left;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// When a batch waits for more calls before it commits: only while the
/// writer is busy (more than `above` calls per second over its last 50 ms),
/// for `wait`. More calls per commit means fewer commits and less work per
/// call, which shortens the tail at high rates; every call of such a batch
/// waits up to `wait` longer. An idle server commits each call at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchWindow {
    /// Calls per second above which batches wait.
    pub above: f64,
    /// How long they wait (zero: never).
    pub wait: Duration,
}

impl Default for BatchWindow {
    /// 200 µs above 2,000 calls/s (`EXECUTION_BATCH_WINDOW_US`).
    fn default() -> Self {
        Self {
            above: 2_000.0,
            wait: Duration::from_micros(200),
        }
    }
}

/// How often the writer measures its rate.
const RATE_EVERY: Duration = Duration::from_millis(50);

/// The writer's recent rate of calls, measured over [`RATE_EVERY`].
struct Rate {
    since: Instant,
    calls: usize,
    busy: bool,
}

impl Rate {
    fn new() -> Self {
        Self {
            since: Instant::now(),
            calls: 0,
            busy: false,
        }
    }

    /// Says whether the writer is busy: above `above` calls per second
    /// over its last full period (a period that has run its length ends
    /// here).
    fn busy(&mut self, above: f64) -> bool {
        let elapsed = self.since.elapsed();
        if elapsed >= RATE_EVERY {
            self.busy = self.calls as f64 / elapsed.as_secs_f64() > above;
            self.since = Instant::now();
            self.calls = 0;
        }
        self.busy
    }

    /// Counts a written batch: every call in it, those that joined while
    /// it waited too.
    fn count(&mut self, calls: usize) {
        self.calls += calls;
    }
}

/// Moves what is queued (up to [`MAX_BATCH`]) into the batch.
fn take_queued(
    rx: &mut mpsc::Receiver<Item>,
    batch: &mut Vec<CallRecord>,
    waiters: &mut Vec<oneshot::Sender<bool>>,
) {
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(Item::Record(record, done)) => {
                batch.push(*record);
                waiters.extend(done);
            }
            Err(_) => break,
        }
    }
}

fn run(
    store: &dyn CallStore,
    mut rx: mpsc::Receiver<Item>,
    pending: Arc<AtomicUsize>,
    window: BatchWindow,
) {
    let mut batch: Vec<CallRecord> = Vec::with_capacity(MAX_BATCH);
    let mut waiters: Vec<oneshot::Sender<bool>> = Vec::with_capacity(MAX_BATCH);
    let mut rate = Rate::new();
    while let Some(first) = rx.blocking_recv() {
        let Item::Record(record, done) = first;
        batch.push(*record);
        waiters.extend(done);
        // Everything already queued joins this batch.
        take_queued(&mut rx, &mut batch, &mut waiters);
        // Busy: more calls may share this commit if it waits a little.
        if rate.busy(window.above) && !window.wait.is_zero() && batch.len() < MAX_BATCH {
            std::thread::sleep(window.wait);
            take_queued(&mut rx, &mut batch, &mut waiters);
        }
        rate.count(batch.len());
        metrics::histogram!("execution_write_batch_size").record(batch.len() as f64);
        let ok = write(store, &batch);
        pending.fetch_sub(batch.len(), Ordering::SeqCst);
        for w in waiters.drain(..) {
            let _ = w.send(ok);
        }
        batch.clear();
        store.between_batches();
    }
}

/// Writes one batch, retrying while the database cannot serve (down,
/// locked); gives up after [`ATTEMPTS`] and logs every execution lost. A
/// batch the database refuses (a record it cannot take) is written one
/// record at a time, so that one bad record costs only itself.
fn write(store: &dyn CallStore, batch: &[CallRecord]) -> bool {
    let started = Instant::now();
    for attempt in 1..=ATTEMPTS {
        match store.record_calls(batch) {
            Ok(()) => {
                metrics::histogram!("execution_write_seconds")
                    .record(started.elapsed().as_secs_f64());
                return true;
            }
            Err(RecordError::Rejected(e)) if batch.len() > 1 => {
                tracing::warn!(error = %e, calls = batch.len(), "a batch of executions was refused; writing them one by one");
                // Every record is tried (no short cut on the first failure).
                let failed = batch
                    .iter()
                    .map(|c| write(store, std::slice::from_ref(c)))
                    .filter(|ok| !ok)
                    .count();
                return failed == 0;
            }
            Err(e @ RecordError::Rejected(_)) => {
                for c in batch {
                    tracing::error!(error = %e, execution_id = %c.execution.id, user_id = %c.execution.user_id, "could not record an execution");
                }
                return false;
            }
            Err(e) if attempt < ATTEMPTS => {
                tracing::warn!(error = %e, calls = batch.len(), attempt, "could not write a batch of executions; retrying");
                // The first retry is immediate: a store whose connection
                // was closed while idle reconnects at once.
                if attempt > 1 {
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
            Err(e) => {
                for c in batch {
                    tracing::error!(error = %e, execution_id = %c.execution.id, user_id = %c.execution.user_id, "could not record an execution");
                }
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use muse_auth::AuthRepository;
    use muse_prompts::{
        Execution, ExecutionRepository, ExecutionScope, ExecutionSource, ExecutionStatus,
    };
    use uuid::Uuid;

    fn execution(user_id: Uuid) -> Execution {
        Execution {
            id: Uuid::now_v7(),
            user_id,
            source: ExecutionSource::OpenaiApi,
            prompt_id: None,
            prompt_version: None,
            provider: "up".into(),
            model: "ok".into(),
            variables: None,
            rendered_prompt: Some("hi".into()),
            output: Some("ok".into()),
            prompt_tokens: 3,
            completion_tokens: 1,
            cost_usd: None,
            duration_ms: 1,
            ttft_ms: None,
            status: ExecutionStatus::Succeeded,
            error: None,
            created_at: 1,
        }
    }

    /// The real store, remembering the size of each batch it is given.
    struct Sizes {
        store: muse_persistence::DieselCallStore,
        sizes: std::sync::Mutex<Vec<usize>>,
    }

    impl CallStore for Sizes {
        fn record_calls(&self, batch: &[CallRecord]) -> Result<(), RecordError> {
            if let Ok(mut s) = self.sizes.lock() {
                s.push(batch.len());
            }
            self.store.record_calls(batch)
        }
    }

    /// Batch sizes for: one call, then (once a rate period has passed) a
    /// call and another 10 ms later — each written to `db`.
    async fn batches_with(db: &muse_persistence::Database, window: BatchWindow) -> Vec<usize> {
        let user = user_in(db);
        let store = Arc::new(Sizes {
            store: muse_persistence::DieselCallStore::new(db.clone()),
            sizes: std::sync::Mutex::default(),
        });
        let writer = Writer::start_with(store.clone(), WriteMode::Async, window).unwrap();
        let executions = [execution(user.id), execution(user.id), execution(user.id)];
        let record = |e: &Execution| CallRecord {
            execution: e.clone(),
            idea: None,
            usage: None,
        };
        let first = writer.submit(record(&executions[0])).unwrap();
        assert_eq!(first.await, Ok(true));
        tokio::time::sleep(RATE_EVERY + Duration::from_millis(10)).await;
        let a = writer.submit(record(&executions[1])).unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        let b = writer.submit(record(&executions[2])).unwrap();
        assert_eq!((a.await, b.await), (Ok(true), Ok(true)));
        let repo = muse_persistence::DieselExecutionRepository::new(db.clone());
        for e in &executions {
            assert!(repo.get(ExecutionScope::All, e.id).unwrap().is_some());
        }
        let sizes = store.sizes.lock().unwrap();
        sizes.clone()
    }

    #[tokio::test]
    async fn a_busy_writer_waits_for_more_calls_and_an_idle_one_does_not() {
        let (_t, db) = migrated_db();
        // Any rate counts as busy: the first call commits at once (no
        // rate measured yet); the second waits 100 ms, and the third,
        // 10 ms later, joins its batch.
        let busy = BatchWindow {
            above: 0.0,
            wait: Duration::from_millis(100),
        };
        assert_eq!(batches_with(&db, busy).await, vec![1, 2]);
        // Below the rate, or with no window: each call at once.
        let idle = BatchWindow {
            above: 1e9,
            wait: Duration::from_millis(100),
        };
        assert_eq!(batches_with(&db, idle).await, vec![1, 1, 1]);
        let off = BatchWindow {
            above: 0.0,
            wait: Duration::ZERO,
        };
        assert_eq!(batches_with(&db, off).await, vec![1, 1, 1]);
    }

    /// The rate that opens the window counts every call a batch wrote,
    /// those that joined while it waited too: a writer whose batches
    /// grow in their windows stays busy. (Counting only the calls a batch
    /// started with, a busy writer looked idle every other period, and
    /// the window opened only half the time.)
    #[tokio::test]
    async fn calls_that_join_a_waiting_batch_count_towards_the_rate() {
        let (_t, db) = migrated_db();
        let user = user_in(&db);
        let store = Arc::new(Sizes {
            store: muse_persistence::DieselCallStore::new(db.clone()),
            sizes: std::sync::Mutex::default(),
        });
        let window = BatchWindow {
            above: 30.0,
            wait: Duration::from_millis(100),
        };
        let writer = Writer::start_with(store.clone(), WriteMode::Async, window).unwrap();
        let record = || CallRecord {
            execution: execution(user.id),
            idea: None,
            usage: None,
        };
        let submit = |n: usize| {
            (0..n)
                .map(|_| writer.submit(record()).unwrap())
                .collect::<Vec<_>>()
        };
        let wait = |w: Vec<Written>| async {
            for w in w {
                assert_eq!(w.await, Ok(true));
            }
        };
        // A first period well above the rate (5 calls in 60 ms) …
        wait(submit(5)).await;
        tokio::time::sleep(RATE_EVERY + Duration::from_millis(10)).await;
        // … so the next batch waits, and 9 calls join it: 10 calls in
        // this period, which lasts the window (100 ms): 100 calls/s at
        // most, well above 30 (counting only the one call the batch
        // started with: 10 calls/s, below) …
        let first = submit(1);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let joined = submit(9);
        wait(first).await;
        wait(joined).await;
        // … so the next batch waits again: these two share a commit.
        let a = submit(1);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let b = submit(1);
        wait(a).await;
        wait(b).await;
        // (The first 5 may have been written in more than one batch.)
        let sizes = store.sizes.lock().unwrap().clone();
        let (first, rest) = sizes.split_at(sizes.len() - 2);
        assert_eq!(
            (first.iter().sum::<usize>(), rest),
            (5, &[10, 2][..]),
            "{sizes:?}"
        );
    }

    /// On PostgreSQL the writer keeps a connection of its own between
    /// batches: when the server closes it (a restart, an idle timeout, an
    /// administrator), the next batch is written on a new one at once —
    /// not after the one-second wait of an outage.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_closed_connection_costs_no_wait() {
        use diesel::RunQueryDsl;
        let t = muse_persistence::testing::TestDb::new();
        let db = muse_persistence::Database::connect(&t.url, 2).unwrap();
        if db.backend().name() != "postgres" {
            eprintln!("skipping: PostgreSQL only (TEST_DATABASE_URL is not set)");
            return;
        }
        db.run_migrations().unwrap();
        let user = user_in(&db);
        let store: Arc<dyn CallStore> =
            Arc::new(muse_persistence::DieselCallStore::new(db.clone()));
        let writer = Writer::start(store, WriteMode::Sync).unwrap();
        let record = || CallRecord {
            execution: execution(user.id),
            idea: None,
            usage: None,
        };
        assert_eq!(writer.submit(record()).unwrap().await, Ok(true));
        // Every other session on this database ends (the writer's too).
        let mut conn = db.get().unwrap();
        let closed: usize = diesel::sql_query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .execute(&mut *conn)
        .unwrap();
        assert!(closed >= 1, "the writer's session was open");
        let started = Instant::now();
        assert_eq!(writer.submit(record()).unwrap().await, Ok(true));
        assert!(
            started.elapsed() < Duration::from_millis(900),
            "{:?}",
            started.elapsed()
        );
    }

    /// The real store, with its `between_batches` held until the test
    /// lets it go, and counted.
    struct HeldHousekeeping {
        store: muse_persistence::DieselCallStore,
        release: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
        calls: AtomicUsize,
    }

    impl CallStore for HeldHousekeeping {
        fn record_calls(&self, batch: &[CallRecord]) -> Result<(), muse_prompts::RecordError> {
            self.store.record_calls(batch)
        }

        fn between_batches(&self) {
            let _ = self.release.lock().unwrap().recv();
            self.store.between_batches();
            self.calls.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A migrated test database (removed when the first value is dropped).
    fn migrated_db() -> (
        muse_persistence::testing::TestDb,
        muse_persistence::Database,
    ) {
        let t = muse_persistence::testing::TestDb::new();
        let db = muse_persistence::Database::connect(&t.url, 2).unwrap();
        db.run_migrations().unwrap();
        (t, db)
    }

    /// The store's housekeeping (SQLite's WAL restart) runs after each
    /// batch, and only once its callers were answered: a caller never
    /// waits for it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn housekeeping_runs_after_each_batch_once_its_callers_are_answered() {
        let (_t, db) = migrated_db();
        let user = user_in(&db);
        let (release, held) = std::sync::mpsc::channel();
        let store = Arc::new(HeldHousekeeping {
            store: muse_persistence::DieselCallStore::new(db.clone()),
            release: std::sync::Mutex::new(held),
            calls: AtomicUsize::new(0),
        });
        let writer = Writer::start(store.clone(), WriteMode::Sync).unwrap();
        for batch in 1..=2 {
            let written = writer
                .submit(CallRecord {
                    execution: execution(user.id),
                    idea: None,
                    usage: None,
                })
                .unwrap();
            // Answered while the housekeeping after it is still held.
            let answered = tokio::time::timeout(Duration::from_secs(5), written).await;
            assert_eq!(answered.map_err(|_| "not answered"), Ok(Ok(true)));
            release.send(()).unwrap();
            let started = Instant::now();
            while store.calls.load(Ordering::SeqCst) < batch {
                assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "no housekeeping"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }

    fn user_in(db: &muse_persistence::Database) -> muse_auth::User {
        let user = muse_auth::User {
            id: Uuid::now_v7(),
            email: format!("{}@example.com", Uuid::now_v7()),
            username: format!("w{}", Uuid::now_v7().simple()),
            password_hash: "$2b$04$hash".into(),
            role: muse_auth::Role::User,
            status: muse_auth::UserStatus::Active,
            email_verified_at: None,
            created_at: 1,
            updated_at: 1,
        };
        muse_persistence::DieselAuthRepository::new(db.clone())
            .create_user(&user)
            .unwrap();
        user
    }

    /// One record the database refuses (its user does not exist) costs only
    /// itself: the others of its batch are written.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_record_does_not_take_its_batch_down() {
        let (_t, db) = migrated_db();
        let user = user_in(&db);
        let store: Arc<dyn CallStore> =
            Arc::new(muse_persistence::DieselCallStore::new(db.clone()));
        let writer = Writer::start(store.clone(), WriteMode::Sync).unwrap();
        let good = [execution(user.id), execution(user.id)];
        let bad = execution(Uuid::now_v7());
        let record = |e: &Execution| CallRecord {
            execution: e.clone(),
            idea: None,
            usage: None,
        };
        let waits: Vec<_> = [&good[0], &bad, &good[1]]
            .into_iter()
            .map(|e| writer.submit(record(e)).unwrap())
            .collect();
        for w in waits {
            let _ = w.await;
        }
        assert_eq!(writer.drain(Duration::from_secs(5)), 0);
        let repo = muse_persistence::DieselExecutionRepository::new(db.clone());
        for e in &good {
            assert!(repo.get(ExecutionScope::All, e.id).unwrap().is_some());
        }
        assert!(repo.get(ExecutionScope::All, bad.id).unwrap().is_none());

        // The same, as one batch for certain: refused at once (not retried
        // like an outage), the two good records written.
        let batch = [
            execution(user.id),
            execution(Uuid::now_v7()),
            execution(user.id),
        ];
        let records: Vec<CallRecord> = batch.iter().map(record).collect();
        let started = Instant::now();
        assert!(!write(&*store, &records), "one of the three was refused");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert!(repo
            .get(ExecutionScope::All, batch[0].id)
            .unwrap()
            .is_some());
        assert!(repo
            .get(ExecutionScope::All, batch[2].id)
            .unwrap()
            .is_some());
        assert!(repo
            .get(ExecutionScope::All, batch[1].id)
            .unwrap()
            .is_none());
    }
}
