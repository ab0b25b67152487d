//! The SQLite checkpointer thread lives exactly as long as its pool (its
//! own test binary: the thread count of this process is what is checked).
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use muse_persistence::Database;

/// Threads of this process named like the checkpointer (Linux keeps the
/// first 15 bytes of a thread's name).
fn checkpointers() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim() == "muse-sqlite-che")
        .count()
}

fn wait_for(count: usize) {
    let started = Instant::now();
    while checkpointers() != count {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{} checkpointer threads, expected {count}",
            checkpointers()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn one_thread_per_sqlite_pool_gone_with_its_last_clone() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    assert_eq!(checkpointers(), 0);
    let db = Database::connect(&url, 2).unwrap();
    wait_for(1);
    let clone = db.clone();
    drop(db);
    // A clone keeps it running.
    std::thread::sleep(muse_persistence::CHECKPOINT_EVERY * 2);
    assert_eq!(checkpointers(), 1);
    drop(clone);
    wait_for(0);
}
