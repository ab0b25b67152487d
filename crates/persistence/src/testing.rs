//! Throw-away databases for tests: a temporary SQLite file, or — when
//! `TEST_DATABASE_URL` names a PostgreSQL server — a fresh database on it,
//! dropped when the guard goes out of scope.

use diesel::connection::SimpleConnection;
use diesel::{Connection, PgConnection};
use uuid::Uuid;

/// A database that exists for the lifetime of this value.
pub struct TestDb {
    pub url: String,
    cleanup: Cleanup,
}

enum Cleanup {
    Files(Vec<std::path::PathBuf>),
    Postgres { admin_url: String, name: String },
}

/// Swaps the database name of a PostgreSQL URL.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let host_and_path = &base[scheme_end..];
    let host = host_and_path.split('/').next().unwrap_or(host_and_path);
    let mut out = format!("{}{}/{}", &base[..scheme_end], host, name);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

impl TestDb {
    /// PostgreSQL when `TEST_DATABASE_URL` is set, SQLite otherwise.
    pub fn new() -> Self {
        match std::env::var("TEST_DATABASE_URL") {
            Ok(url) if !url.trim().is_empty() => Self::postgres(url.trim()),
            _ => Self::sqlite(),
        }
    }

    pub fn sqlite() -> Self {
        let path = std::env::temp_dir().join(format!("muse-test-{}.db", Uuid::new_v4().simple()));
        let files = ["", "-wal", "-shm"]
            .iter()
            .map(|s| std::path::PathBuf::from(format!("{}{s}", path.display())))
            .collect();
        Self {
            url: format!("sqlite://{}", path.display()),
            cleanup: Cleanup::Files(files),
        }
    }

    /// # Panics
    /// When the server cannot be reached: tests should fail loudly then.
    #[allow(clippy::panic)]
    pub fn postgres(admin_url: &str) -> Self {
        let name = format!("muse_test_{}", Uuid::new_v4().simple());
        let mut admin = PgConnection::establish(admin_url)
            .unwrap_or_else(|e| panic!("TEST_DATABASE_URL is set but unreachable: {e}"));
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("cannot create test database: {e}"));
        Self {
            url: with_database(admin_url, &name),
            cleanup: Cleanup::Postgres {
                admin_url: admin_url.to_string(),
                name,
            },
        }
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self.cleanup, Cleanup::Postgres { .. })
    }
}

impl Default for TestDb {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        match &self.cleanup {
            Cleanup::Files(files) => {
                for f in files {
                    let _ = std::fs::remove_file(f);
                }
            }
            Cleanup::Postgres { admin_url, name } => {
                if let Ok(mut admin) = PgConnection::establish(admin_url) {
                    let _ = admin
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn swaps_database_names() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/test", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_database("postgres://u:p@h/test?sslmode=disable", "x"),
            "postgres://u:p@h/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "x"), "postgres://h/x");
    }
}
