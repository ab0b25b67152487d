//! diesel + r2d2 implementations of the Muse repository traits, on SQLite
//! (bundled, the default) and PostgreSQL, chosen by the database URL.
//!
//! ```no_run
//! let db = muse_persistence::Database::connect("sqlite://./data/muse.db", 8)?;
//! db.run_migrations()?;
//! let repo = muse_persistence::DieselAuthRepository::new(db.clone());
//! # Ok::<(), muse_persistence::DbError>(())
//! ```
//!
//! Every call blocks: run it on a blocking pool.

mod auth_repo;
mod batch;
mod billing_repo;
mod db;
mod execution_repo;
mod flags_repo;
mod library_repo;
mod redis_conn;
mod redis_events;
mod redis_limits;
mod redis_quota;
pub mod schema;
pub mod testing;
mod training_repo;

/// Text as both backends can store it: PostgreSQL refuses NUL characters
/// in text, so model output, prompts and errors are written with every NUL
/// replaced by U+FFFD (the replacement character), on SQLite too, so that
/// the same call reads back the same on either database.
pub fn storable(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains('\0') {
        std::borrow::Cow::Owned(s.replace('\0', "\u{FFFD}"))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

/// Whether a database error means "the database cannot serve now" (a
/// locked or busy SQLite file, a dropped connection, a transaction
/// PostgreSQL aborted to break a deadlock or a serialization conflict)
/// rather than a bug: callers answer 503 and may retry.
pub(crate) fn is_unavailable(e: &diesel::result::Error) -> bool {
    use diesel::result::{DatabaseErrorKind, Error};
    match e {
        Error::DatabaseError(
            DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::SerializationFailure,
            _,
        ) => true,
        Error::DatabaseError(_, info) => {
            let m = info.message().to_ascii_lowercase();
            m.contains("database is locked")
                || m.contains("deadlock detected")
                || m.contains("database is busy")
                || m.contains("database table is locked")
                || m.contains("terminating connection")
                || m.contains("server closed the connection")
                || m.contains("connection to server")
        }
        other => {
            let m = other.to_string().to_ascii_lowercase();
            m.contains("database is locked") || m.contains("database is busy")
        }
    }
}

fn storable_opt(s: &Option<String>) -> Option<String> {
    s.as_deref().map(|v| storable(v).into_owned())
}

pub use auth_repo::DieselAuthRepository;
pub use batch::{record_calls, DieselCallStore};
pub use billing_repo::DieselBillingRepository;
pub use db::{Backend, Database, DbConnection, DbError, PooledConn, CHECKPOINT_EVERY};
pub use execution_repo::DieselExecutionRepository;
pub use flags_repo::DieselFlagRepository;
pub use library_repo::DieselLibraryRepository;
pub use redis_events::RedisEvents;
pub use redis_limits::RedisRateLimitStore;
pub use redis_quota::RedisQuotaStore;
pub use training_repo::DieselTrainingRepository;

#[cfg(test)]
mod tests {
    use diesel::result::{DatabaseErrorKind, Error};

    fn database_error(kind: DatabaseErrorKind, message: &str) -> Error {
        Error::DatabaseError(kind, Box::new(message.to_string()))
    }

    #[test]
    fn deadlocks_and_serialization_failures_are_worth_retrying() {
        // What PostgreSQL answers when it breaks a deadlock (40P01) or a
        // serializable transaction conflicts (40001).
        assert!(super::is_unavailable(&database_error(
            DatabaseErrorKind::Unknown,
            "deadlock detected"
        )));
        assert!(super::is_unavailable(&database_error(
            DatabaseErrorKind::SerializationFailure,
            "could not serialize access due to concurrent update"
        )));
        // A row the database refuses is not.
        assert!(!super::is_unavailable(&database_error(
            DatabaseErrorKind::UniqueViolation,
            "duplicate key value violates unique constraint"
        )));
    }
}
