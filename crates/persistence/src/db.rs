use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::{Connection, PgConnection, SqliteConnection};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

pub(crate) const SQLITE_MIGRATIONS: EmbeddedMigrations =
    embed_migrations!("../../migrations/sqlite");
const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations/postgres");

diesel::define_sql_function!(
    /// SQL `lower()`, on both backends.
    fn lower(x: diesel::sql_types::Text) -> diesel::sql_types::Text
);

/// One connection type over both backends.
#[derive(diesel::MultiConnection)]
pub enum DbConnection {
    Sqlite(SqliteConnection),
    Pg(PgConnection),
}

pub type PooledConn = r2d2::PooledConnection<Manager>;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(
        "unsupported DATABASE_URL scheme in {0:?}: use sqlite://PATH or postgres://USER@HOST/DB"
    )]
    UnknownScheme(String),
    #[error("cannot open the database: {0}")]
    Connect(String),
    #[error("migrations failed: {0}")]
    Migration(String),
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The database answered and refused the statement (a constraint, a
    /// value it cannot hold): retrying the same write will not help.
    #[error("the database refused the write: {0}")]
    Rejected(String),
}

/// Which database a URL names.
#[derive(Clone, PartialEq, Eq)]
pub enum Backend {
    Sqlite(PathBuf),
    Postgres(String),
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Sqlite(p) => write!(f, "Sqlite({})", p.display()),
            Backend::Postgres(u) => write!(f, "Postgres({})", redact_url(u)),
        }
    }
}

/// The URL with any password replaced by `***`, for logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (auth, host) = match rest.rsplit_once('@') {
        Some((a, h)) => (a, h),
        None => return url.to_string(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

impl Backend {
    /// `sqlite://relative/path`, `sqlite:///absolute/path`, `sqlite:path`,
    /// `postgres://…` or `postgresql://…`. Anything else is an error.
    /// SQLAlchemy's forms mean what they mean there: `sqlite:///./x.db` and
    /// `sqlite:///../x.db` are relative to the working directory,
    /// `sqlite:////abs/x.db` is absolute.
    pub fn parse(url: &str) -> Result<Self, DbError> {
        let url = url.trim();
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Backend::Postgres(url.to_string()));
        }
        if let Some(rest) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            let mut path = rest.split('?').next().unwrap_or_default();
            // `/./x`, `/../x` (relative) and `//abs` (absolute) lose one slash.
            if ["/./", "/../", "//"].iter().any(|p| path.starts_with(p)) {
                path = &path[1..];
            }
            if path.is_empty() {
                return Err(DbError::UnknownScheme(url.to_string()));
            }
            return Ok(Backend::Sqlite(PathBuf::from(path)));
        }
        Err(DbError::UnknownScheme(redact_url(url)))
    }

    pub fn name(&self) -> &'static str {
        match self {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    fn connect(&self) -> Result<DbConnection, diesel::ConnectionError> {
        match self {
            Backend::Sqlite(path) => {
                let mut conn = SqliteConnection::establish(&path.to_string_lossy())?;
                // busy_timeout first: switching to WAL takes a lock that
                // the pool's other new connections must wait for. No
                // commit checkpoints the WAL (a checkpoint syncs the
                // file and took the p99 of group commits from under
                // 1 ms to several): a background thread does it (see
                // `Checkpointer`). No commit truncates the WAL file
                // either (`journal_size_limit = -1`): a WAL that starts
                // over is written again from its start, over blocks the
                // file already has, where a cut-back file gave its
                // blocks back (a synchronous discard on filesystems
                // mounted with `discard`) and had to allocate them again,
                // both on the commit's path. `Checkpointer` bounds the
                // file instead.
                let setup = "PRAGMA busy_timeout = 5000; PRAGMA journal_mode = WAL; \
                     PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON; \
                     PRAGMA wal_autocheckpoint = 0; PRAGMA journal_size_limit = -1;";
                // A new database's switch to WAL can still answer "locked"
                // without waiting (several connections opening it at once,
                // on a busy machine): the settings are tried again.
                let mut attempts = 0;
                loop {
                    match conn.batch_execute(setup) {
                        Ok(()) => break,
                        Err(e)
                            if attempts < 100 && e.to_string().contains("database is locked") =>
                        {
                            attempts += 1;
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        Err(e) => {
                            return Err(diesel::ConnectionError::BadConnection(e.to_string()))
                        }
                    }
                }
                Ok(DbConnection::Sqlite(conn))
            }
            Backend::Postgres(url) => Ok(DbConnection::Pg(PgConnection::establish(url)?)),
        }
    }
}

/// r2d2 manager that opens exactly the backend the URL names (never a
/// SQLite file by accident) and configures each new SQLite connection.
#[derive(Debug, Clone)]
pub struct Manager {
    backend: Backend,
}

impl r2d2::ManageConnection for Manager {
    type Connection = DbConnection;
    type Error = diesel::ConnectionError;

    fn connect(&self) -> Result<DbConnection, Self::Error> {
        self.backend.connect()
    }

    fn is_valid(&self, conn: &mut DbConnection) -> Result<(), Self::Error> {
        conn.batch_execute("SELECT 1")
            .map_err(|e| diesel::ConnectionError::BadConnection(e.to_string()))
    }

    fn has_broken(&self, _conn: &mut DbConnection) -> bool {
        false
    }
}

/// How long the same connection error stays quiet after it was logged.
pub const CONNECT_ERROR_QUIET: Duration = Duration::from_secs(30);

/// r2d2's error handler: each connection error once, not once per
/// attempt. r2d2 opens every connection the pool lacks in the background
/// and reports each failed attempt; with a URL that libpq or the server
/// refuses, r2d2's default handler printed the same `ERROR` line dozens of
/// times before `muse` could say why it stopped. An error is logged when
/// its text differs from the last one logged, or when
/// [`CONNECT_ERROR_QUIET`] has passed since, with how many times it came
/// in between.
#[derive(Debug, Default)]
struct ConnectErrors {
    /// The last error logged, when, and how many times it came since.
    last: std::sync::Mutex<Option<(String, Instant, u64)>>,
}

impl ConnectErrors {
    /// `None` when `error` is to stay quiet; otherwise how many times it
    /// came without being logged since it was last logged.
    fn admit(&self, error: &str, now: Instant) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match last.as_mut() {
            Some((text, at, quiet)) if text == error => {
                if now.saturating_duration_since(*at) < CONNECT_ERROR_QUIET {
                    *quiet += 1;
                    None
                } else {
                    let repeats = std::mem::take(quiet);
                    *at = now;
                    Some(repeats)
                }
            }
            _ => {
                *last = Some((error.to_string(), now, 0));
                Some(0)
            }
        }
    }
}

impl r2d2::HandleError<diesel::ConnectionError> for ConnectErrors {
    fn handle_error(&self, error: diesel::ConnectionError) {
        let error = error.to_string();
        match self.admit(&error, Instant::now()) {
            Some(0) => tracing::error!(%error, "cannot open a database connection"),
            Some(repeats) => tracing::error!(
                %error,
                repeats,
                "cannot open a database connection (the same error came {repeats} more times since it was last logged)"
            ),
            None => {}
        }
    }
}

/// A pool of connections to one database.
#[derive(Clone)]
pub struct Database {
    pool: r2d2::Pool<Manager>,
    backend: Backend,
    /// SQLite has one writer at a time; writers that collide wait in its
    /// busy handler, which sleeps in steps of up to 100 ms while holding a
    /// pooled connection. Frequent writes (executions, ideas) go through
    /// this one dedicated connection instead, queueing on its lock without
    /// holding a pooled connection (PostgreSQL does not need it).
    writer: std::sync::Arc<std::sync::Mutex<Option<DbConnection>>>,
    /// PostgreSQL: the group-commit writer's own connection (see
    /// [`Database::write_batch`]).
    batch_writer: std::sync::Arc<std::sync::Mutex<Option<DbConnection>>>,
    /// SQLite: keeps the WAL checkpointer thread running while any clone
    /// of this pool lives.
    _checkpointer: Option<std::sync::Arc<Checkpointer>>,
}

/// How often the SQLite checkpointer moves the WAL into the database.
pub const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

/// The size past which the WAL is made to start over (see
/// [`Database::restart_wal_if_large`]).
pub const WAL_RESTART_ABOVE: u64 = 64 * 1024 * 1024;

/// SQLite's WAL checkpoints, off every writer's path: a thread with its
/// own connection runs `PRAGMA wal_checkpoint(PASSIVE)` every
/// [`CHECKPOINT_EVERY`] (a passive checkpoint waits for no reader and
/// blocks no writer). The thread runs at the lowest CPU priority (nice
/// 19): copying the WAL into the database costs CPU, and under load it
/// would otherwise take a core from the requests for milliseconds at a
/// time (seen as latency spikes at each checkpoint); small, frequent
/// checkpoints spread that work out. It stops when the last clone of the
/// pool is dropped.
#[derive(Debug)]
pub struct Checkpointer {
    /// Dropped with the last pool: the thread sees it gone and returns.
    _stop: std::sync::mpsc::Sender<()>,
    /// How many bytes of frames the WAL held at the thread's last
    /// checkpoint (0 after a restart, until the next one).
    wal_bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Held by whoever checkpoints (the thread, or a restart).
    checkpointing: std::sync::Arc<std::sync::Mutex<()>>,
}

impl Checkpointer {
    /// One for a SQLite pool; none for PostgreSQL.
    fn for_backend(backend: &Backend) -> Result<Option<std::sync::Arc<Self>>, DbError> {
        match backend {
            Backend::Sqlite(_) => Self::start(backend.clone()).map(Some),
            Backend::Postgres(_) => Ok(None),
        }
    }

    fn start(backend: Backend) -> Result<std::sync::Arc<Self>, DbError> {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let checkpointing = std::sync::Arc::new(std::sync::Mutex::new(()));
        let held = checkpointing.clone();
        let wal_bytes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let measured = wal_bytes.clone();
        std::thread::Builder::new()
            .name("muse-sqlite-checkpoint".into())
            .spawn(move || {
                lowest_priority();
                let mut conn: Option<DbConnection> = None;
                // Ends when the sender is gone (the last pool was dropped).
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(CHECKPOINT_EVERY)
                {
                    let c = match conn.as_mut() {
                        Some(c) => c,
                        None => match backend.connect() {
                            Ok(c) => conn.insert(c),
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot open a connection for WAL checkpoints");
                                continue;
                            }
                        },
                    };
                    let _held = held.lock().unwrap_or_else(|e| e.into_inner());
                    match passive_checkpoint(c) {
                        Ok(bytes) => measured.store(bytes, std::sync::atomic::Ordering::Relaxed),
                        Err(e) => {
                            tracing::warn!(error = %e, "WAL checkpoint failed");
                            conn = None;
                        }
                    }
                }
            })
            .map_err(|e| DbError::Connect(format!("cannot start the WAL checkpointer: {e}")))?;
        Ok(std::sync::Arc::new(Self {
            _stop: stop,
            wal_bytes,
            checkpointing,
        }))
    }
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("backend", &self.backend)
            .finish()
    }
}

/// Runs a passive checkpoint; returns the bytes of frames the WAL holds.
fn passive_checkpoint(conn: &mut DbConnection) -> Result<u64, diesel::result::Error> {
    use diesel::sql_types::BigInt;
    use diesel::RunQueryDsl;
    #[derive(diesel::QueryableByName)]
    struct Checkpoint {
        /// Frames in the WAL (-1 when it is not in WAL mode).
        #[diesel(sql_type = BigInt)]
        log: i64,
    }
    #[derive(diesel::QueryableByName)]
    struct PageSize {
        #[diesel(sql_type = BigInt)]
        page_size: i64,
    }
    let DbConnection::Sqlite(c) = conn else {
        return Ok(0);
    };
    let frames = diesel::sql_query("PRAGMA wal_checkpoint(PASSIVE)")
        .get_result::<Checkpoint>(c)?
        .log;
    let page = diesel::sql_query("PRAGMA page_size")
        .get_result::<PageSize>(c)?
        .page_size;
    // Each frame is a page and its 24-byte header.
    Ok(u64::try_from(frames.max(0) * (page + 24)).unwrap_or(0))
}

/// Makes the calling thread the last to get a busy CPU (nice 19).
fn lowest_priority() {
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 19) {
        tracing::debug!(error = %e, "cannot lower the WAL checkpointer's priority");
    }
}

impl Database {
    /// Opens a pool and checks that the database answers. SQLite files
    /// (and their folder) are created; PostgreSQL must be reachable.
    pub fn connect(url: &str, pool_size: u32) -> Result<Self, DbError> {
        let backend = Backend::parse(url)?;
        if let Backend::Sqlite(path) = &backend {
            ensure_parent(path)?;
        }
        let pool = r2d2::Pool::builder()
            .max_size(pool_size.max(1))
            .connection_timeout(Duration::from_secs(5))
            .error_handler(Box::<ConnectErrors>::default())
            .build(Manager {
                backend: backend.clone(),
            })
            .map_err(|e| DbError::Connect(format!("{:?}: {e}", backend)))?;
        let checkpointer = Checkpointer::for_backend(&backend)?;
        Ok(Self {
            pool,
            backend,
            writer: Default::default(),
            batch_writer: Default::default(),
            _checkpointer: checkpointer,
        })
    }

    /// A pool that does not connect until first used (for tests of an
    /// unreachable database).
    pub fn connect_lazy(url: &str, pool_size: u32) -> Result<Self, DbError> {
        let backend = Backend::parse(url)?;
        let pool = r2d2::Pool::builder()
            .max_size(pool_size.max(1))
            .min_idle(Some(0))
            .connection_timeout(Duration::from_millis(500))
            .error_handler(Box::<ConnectErrors>::default())
            .build_unchecked(Manager {
                backend: backend.clone(),
            });
        let checkpointer = Checkpointer::for_backend(&backend)?;
        Ok(Self {
            pool,
            backend,
            writer: Default::default(),
            batch_writer: Default::default(),
            _checkpointer: checkpointer,
        })
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    pub fn get(&self) -> Result<PooledConn, DbError> {
        self.pool
            .get()
            .map_err(|e| DbError::Unavailable(e.to_string()))
    }

    /// Runs a frequent write: on SQLite through the one writer connection
    /// (see `writer`), on PostgreSQL on a pooled connection. The writer
    /// connection is reopened after a failed write.
    pub fn write<T, E>(
        &self,
        f: impl FnOnce(&mut DbConnection) -> Result<T, E>,
    ) -> Result<Result<T, E>, DbError> {
        if let Backend::Postgres(_) = self.backend {
            let mut conn = self.get()?;
            return Ok(f(&mut conn));
        }
        self.on_dedicated(&self.writer, f)
    }

    /// Runs one batch of the group-commit writer (one caller at a time):
    /// on SQLite like [`Database::write`]; on PostgreSQL on a connection
    /// of its own, kept from batch to batch — no pool check-out, and none
    /// of the pool's `SELECT 1` before each use — and reopened after a
    /// failed batch.
    pub fn write_batch<T, E>(
        &self,
        f: impl FnOnce(&mut DbConnection) -> Result<T, E>,
    ) -> Result<Result<T, E>, DbError> {
        match self.backend {
            Backend::Postgres(_) => self.on_dedicated(&self.batch_writer, f),
            Backend::Sqlite(_) => self.write(f),
        }
    }

    /// SQLite: makes the WAL start over once it holds more than
    /// [`WAL_RESTART_ABOVE`] (as measured by the background thread's last
    /// checkpoint); returns whether it ran the restart checkpoint (which,
    /// when a reader is still on an older snapshot, copies what it can
    /// and leaves the start-over to a later try). The WAL starts over
    /// from its first frame only when a commit finds it completely
    /// checkpointed; under steady writes the background checkpoints never
    /// get there (new commits land while they copy), and the file would
    /// grow for as long as the load lasts. This runs
    /// `PRAGMA wal_checkpoint(RESTART)` on the writing connection (it
    /// copies what the last background checkpoint left and syncs the
    /// database), so that the next commit writes the WAL from its start,
    /// over the blocks the file already has. The group-commit writer calls
    /// it between batches, after their callers were answered: at normal
    /// priority and with no other writer to wait for, where the
    /// background thread would hold every writer behind it. Skipped (false)
    /// while the background thread is checkpointing. PostgreSQL: nothing.
    pub fn restart_wal_if_large(&self) -> Result<bool, DbError> {
        self.restart_wal_above(WAL_RESTART_ABOVE)
    }

    fn restart_wal_above(&self, limit: u64) -> Result<bool, DbError> {
        use std::sync::atomic::Ordering;
        let Some(c) = &self._checkpointer else {
            return Ok(false);
        };
        if c.wal_bytes.load(Ordering::Relaxed) <= limit {
            return Ok(false);
        }
        let Ok(_held) = c.checkpointing.try_lock() else {
            return Ok(false);
        };
        // Without waiting: a reader still on an older snapshot (or a
        // writer in another process) would otherwise hold the writer, and
        // every caller waiting on its next batch, for up to the busy
        // timeout. Busy, the checkpoint does what it can without waiting
        // and the WAL does not start over this time; the thread's next
        // measurement asks again.
        let restarted = self.write(|conn| {
            conn.batch_execute("PRAGMA busy_timeout = 0")?;
            let restarted = conn.batch_execute("PRAGMA wal_checkpoint(RESTART)");
            conn.batch_execute("PRAGMA busy_timeout = 5000")?;
            restarted
        })?;
        restarted.map_err(|e| DbError::Unavailable(format!("WAL restart checkpoint: {e}")))?;
        // Until the thread's next checkpoint measures the new WAL.
        c.wal_bytes.store(0, Ordering::Relaxed);
        Ok(true)
    }

    /// Runs `f` on the connection kept in `slot` (opened when there is
    /// none; dropped when `f` fails, so that the next caller gets a fresh
    /// one).
    fn on_dedicated<T, E>(
        &self,
        slot: &std::sync::Mutex<Option<DbConnection>>,
        f: impl FnOnce(&mut DbConnection) -> Result<T, E>,
    ) -> Result<Result<T, E>, DbError> {
        let mut writer = slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let conn = match writer.as_mut() {
            Some(conn) => conn,
            None => writer.insert(
                self.backend
                    .connect()
                    .map_err(|e| DbError::Unavailable(e.to_string()))?,
            ),
        };
        let result = f(conn);
        if result.is_err() {
            *writer = None;
        }
        Ok(result)
    }

    /// Applies the embedded migrations of this backend; returns how many ran.
    /// On PostgreSQL, concurrent callers (replicas starting together) take
    /// turns under an advisory lock.
    pub fn run_migrations(&self) -> Result<usize, DbError> {
        let failed = |e: &dyn std::fmt::Display| DbError::Migration(e.to_string());
        let mut conn = self.get()?;
        match &mut *conn {
            DbConnection::Sqlite(c) => c
                .run_pending_migrations(SQLITE_MIGRATIONS)
                .map(|v| v.len())
                .map_err(|e| failed(&e)),
            DbConnection::Pg(c) => {
                // Replicas started together on a fresh database would run
                // the same migrations at once (and all but one fail): a
                // session advisory lock makes them take turns, and the
                // later ones find nothing pending.
                c.batch_execute(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK})"))
                    .map_err(|e| failed(&e))?;
                let applied = c
                    .run_pending_migrations(POSTGRES_MIGRATIONS)
                    .map(|v| v.len())
                    .map_err(|e| failed(&e));
                let unlocked = c
                    .batch_execute(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK})"))
                    .map_err(|e| failed(&e));
                let applied = applied?;
                unlocked?;
                Ok(applied)
            }
        }
    }

    /// How many embedded migrations are not applied yet.
    pub fn pending_migrations(&self) -> Result<usize, DbError> {
        let mut conn = self.get()?;
        match &mut *conn {
            DbConnection::Sqlite(c) => c.pending_migrations(SQLITE_MIGRATIONS).map(|v| v.len()),
            DbConnection::Pg(c) => c.pending_migrations(POSTGRES_MIGRATIONS).map(|v| v.len()),
        }
        .map_err(|e| DbError::Unavailable(e.to_string()))
    }

    /// `SELECT 1` on a pooled connection.
    pub fn ping(&self) -> Result<(), DbError> {
        let mut conn = self.get()?;
        conn.batch_execute("SELECT 1")
            .map_err(|e| DbError::Unavailable(e.to_string()))
    }
}

/// The advisory lock key `run_migrations` holds on PostgreSQL ("muse" in
/// ASCII).
const MIGRATION_LOCK: i64 = 0x6d75_7365;

fn ensure_parent(path: &Path) -> Result<(), DbError> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && path.to_string_lossy() != ":memory:" => {
            std::fs::create_dir_all(dir)
                .map_err(|e| DbError::Connect(format!("cannot create {}: {e}", dir.display())))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_connection_error_is_logged_once_per_quiet_period() {
        let errors = ConnectErrors::default();
        let t0 = Instant::now();
        let refused = "connection to server failed: Connection refused";
        assert_eq!(errors.admit(refused, t0), Some(0));
        for i in 1..=63 {
            let at = t0 + Duration::from_millis(50 * i);
            assert_eq!(errors.admit(refused, at), None, "attempt {i}");
        }
        // Past the quiet period: logged again, with the count it hid.
        let later = t0 + CONNECT_ERROR_QUIET;
        assert_eq!(errors.admit(refused, later), Some(63));
        assert_eq!(errors.admit(refused, later + Duration::from_secs(1)), None);
        // Another error is logged at once, and so is the first one after it.
        let auth = "FATAL: password authentication failed for user \"muse\"";
        assert_eq!(errors.admit(auth, later + Duration::from_secs(2)), Some(0));
        assert_eq!(
            errors.admit(refused, later + Duration::from_secs(3)),
            Some(0)
        );
    }

    #[test]
    fn parses_urls_by_scheme() {
        assert_eq!(
            Backend::parse("sqlite://data/muse.db").unwrap(),
            Backend::Sqlite("data/muse.db".into())
        );
        assert_eq!(
            Backend::parse("sqlite:///tmp/m.db").unwrap(),
            Backend::Sqlite("/tmp/m.db".into())
        );
        assert_eq!(
            Backend::parse("sqlite:m.db").unwrap(),
            Backend::Sqlite("m.db".into())
        );
        // The seeds' SQLAlchemy URLs: relative with ./ or ../, absolute with ////.
        assert_eq!(
            Backend::parse("sqlite:///./database/muse.db").unwrap(),
            Backend::Sqlite("./database/muse.db".into())
        );
        assert_eq!(
            Backend::parse("sqlite:///../muse.db").unwrap(),
            Backend::Sqlite("../muse.db".into())
        );
        assert_eq!(
            Backend::parse("sqlite:////abs/path.db").unwrap(),
            Backend::Sqlite("/abs/path.db".into())
        );
        assert!(matches!(
            Backend::parse("postgresql://u@h/db").unwrap(),
            Backend::Postgres(_)
        ));
        for bad in [
            "mysql://root@localhost/db",
            "data/muse.db",
            "sqlite://",
            "http://x",
        ] {
            assert!(
                matches!(Backend::parse(bad), Err(DbError::UnknownScheme(_))),
                "{bad}"
            );
        }
    }

    /// A new SQLite database in a folder of its own (kept while the first
    /// value lives), its file, and a pool on it.
    fn new_sqlite() -> (tempfile::TempDir, PathBuf, Database) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let db = Database::connect(&format!("sqlite://{}", path.display()), 2).unwrap();
        (dir, path, db)
    }

    /// Commits never checkpoint the WAL (its sync would stall the group
    /// commit); the background checkpointer moves it into the database.
    #[test]
    fn the_wal_reaches_the_database_file_off_the_writers_path() {
        let (_dir, path, db) = new_sqlite();
        let mut conn = db.get().unwrap();
        let mut autocheckpoint = 1;
        if let DbConnection::Sqlite(c) = &mut *conn {
            #[derive(diesel::QueryableByName)]
            struct Pages {
                #[diesel(sql_type = diesel::sql_types::Integer)]
                wal_autocheckpoint: i32,
            }
            use diesel::RunQueryDsl;
            autocheckpoint = diesel::sql_query("PRAGMA wal_autocheckpoint")
                .get_result::<Pages>(c)
                .unwrap()
                .wal_autocheckpoint;
        }
        assert_eq!(autocheckpoint, 0, "commits must not checkpoint");
        conn.batch_execute("CREATE TABLE t (x BLOB)").unwrap();
        for _ in 0..200 {
            conn.batch_execute("INSERT INTO t VALUES (randomblob(4000))")
                .unwrap();
        }
        let size = || std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let started = std::time::Instant::now();
        while size() < 800_000 {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the WAL was not checkpointed: the database file is {} bytes",
                size()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Under steady writes the background checkpoints never find the WAL
    /// complete, so it never starts over on its own: it grew to 2.8 GB in
    /// 20 s of 4,000 calls a second. A writer that calls
    /// `restart_wal_above` between its commits keeps it near the limit.
    #[test]
    fn steady_writes_keep_the_wal_near_its_limit() {
        fn wal_file_after_steady_writes(restart: bool) -> (u64, usize) {
            let (dir, _path, db) = new_sqlite();
            db.write(|c| c.batch_execute("CREATE TABLE t (x BLOB)"))
                .unwrap()
                .unwrap();
            let wal = dir.path().join("t.db-wal");
            let mut largest = 0;
            let mut restarts = 0;
            // 12 MB in 3,000 commits, 1 ms apart (4 MB/s, 1 MB between
            // two background checkpoints): they copy while commits keep
            // coming.
            for _ in 0..3_000 {
                db.write(|c| c.batch_execute("INSERT INTO t VALUES (randomblob(4000))"))
                    .unwrap()
                    .unwrap();
                if restart && db.restart_wal_above(1024 * 1024).unwrap() {
                    restarts += 1;
                }
                largest = largest.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
                std::thread::sleep(Duration::from_millis(1));
            }
            (largest, restarts)
        }
        let (unbounded, _) = wal_file_after_steady_writes(false);
        if unbounded <= 9_000_000 {
            // A disk whose syncs take well under a millisecond (tmpfs, some
            // NVMe) lets a checkpoint finish between two commits: the WAL
            // starts over on its own and there is nothing to show (on
            // this project's machines it grows to ~37 MB here).
            eprintln!("skipped: without restarts the WAL grew to {unbounded} bytes only");
            return;
        }
        let (bounded, restarts) = wal_file_after_steady_writes(true);
        assert!(restarts > 0, "the WAL was never made to start over");
        assert!(
            bounded < 6_000_000,
            "the WAL file reached {bounded} bytes with a 1 MB limit ({restarts} restarts)"
        );
    }

    /// A reader still on an older snapshot keeps the WAL from starting
    /// over; the restart must not wait for it (the group-commit writer,
    /// and every caller waiting on its next batch, would wait with it).
    #[test]
    fn a_restart_does_not_wait_for_an_old_reader() {
        let (_dir, _path, db) = new_sqlite();
        db.write(|c| c.batch_execute("CREATE TABLE t (x BLOB); INSERT INTO t VALUES (1)"))
            .unwrap()
            .unwrap();
        let mut reader = db.get().unwrap();
        reader
            .batch_execute("BEGIN; SELECT count(*) FROM t;")
            .unwrap();
        for _ in 0..100 {
            db.write(|c| c.batch_execute("INSERT INTO t VALUES (randomblob(4000))"))
                .unwrap()
                .unwrap();
        }
        let started = std::time::Instant::now();
        loop {
            // Once the background thread has measured the WAL.
            let call = std::time::Instant::now();
            if db.restart_wal_above(1024).unwrap() {
                assert!(
                    call.elapsed() < Duration::from_millis(2_500),
                    "the restart waited {:?} for the reader",
                    call.elapsed()
                );
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "never measured"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        reader.batch_execute("COMMIT").unwrap();
        // The writing connection waits for other writers again.
        db.write(|c| c.batch_execute("INSERT INTO t VALUES (2)"))
            .unwrap()
            .unwrap();
    }

    /// Many connections opening a new database at once (a server's pool
    /// and its checkpointer, on a busy machine): none fails with "locked".
    #[test]
    fn a_new_database_opened_by_many_connections_at_once() {
        for _ in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let url = format!("sqlite://{}", dir.path().join("n.db").display());
            let threads: Vec<_> = (0..8)
                .map(|_| {
                    let backend = Backend::parse(&url).unwrap();
                    std::thread::spawn(move || {
                        backend.connect().map(|_| ()).map_err(|e| e.to_string())
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap().unwrap();
            }
        }
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("postgres://muse:s3cret@db:5432/muse"),
            "postgres://muse:***@db:5432/muse"
        );
        assert_eq!(
            redact_url("postgres://muse@db/muse"),
            "postgres://muse@db/muse"
        );
        let e = Backend::parse("mysql://root:pw@h/db")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("pw@"), "{e}");
    }

    /// PostgreSQL (`TEST_DATABASE_URL`): libpq's `options` in the URL reach
    /// every pooled connection, so an operator can set a session setting
    /// for Muse's connections alone (docs/architecture.md names
    /// `synchronous_commit=off`).
    #[test]
    fn postgres_url_options_apply_to_every_connection() {
        let test_db = crate::testing::TestDb::new();
        if !test_db.is_postgres() {
            return;
        }
        let join = if test_db.url.contains('?') { '&' } else { '?' };
        let url = format!("{}{join}options=-c%20synchronous_commit%3Doff", test_db.url);
        let db = Database::connect(&url, 2).unwrap();
        #[derive(diesel::QueryableByName)]
        struct Setting {
            #[diesel(sql_type = diesel::sql_types::Text)]
            synchronous_commit: String,
        }
        use diesel::RunQueryDsl;
        // Both connections of the pool at once: each was opened with it.
        let mut conns = [db.get().unwrap(), db.get().unwrap()];
        for conn in &mut conns {
            let DbConnection::Pg(c) = &mut **conn else {
                panic!("a PostgreSQL URL gave another backend");
            };
            let setting = diesel::sql_query("SHOW synchronous_commit")
                .get_result::<Setting>(c)
                .unwrap();
            assert_eq!(setting.synchronous_commit, "off");
        }
    }
}
