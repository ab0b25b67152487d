//! The Prometheus recorder keeps every histogram sample until an upkeep
//! folds it into its buckets; Muse runs that upkeep on a thread of its own,
//! so that a server nobody scrapes does not keep every request's samples
//! in memory. (A test binary of its own: it counts the bytes the whole
//! process holds.)
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

/// Bytes the process holds now, net of what it held at `since`.
fn held(since: &Region<'_, std::alloc::System>) -> isize {
    let c = since.change();
    (c.bytes_allocated as isize - c.bytes_deallocated as isize) + c.bytes_reallocated
}

const SAMPLES: usize = 1_000_000;

#[test]
fn histogram_samples_are_released_without_a_scrape() {
    let handle = muse_server::telemetry::metrics_handle();
    let region = Region::new(GLOBAL);
    for i in 0..SAMPLES {
        metrics::histogram!("http_request_duration_seconds", "route" => "/upkeep-test")
            .record(i as f64 * 1e-6);
    }
    let grown = held(&region);
    // The samples are held as they come (8 bytes each, and more).
    assert!(grown >= (SAMPLES * 8) as isize, "grew by {grown} bytes");

    // Nobody renders the metrics: the upkeep thread alone must fold the
    // samples and let their memory go.
    let deadline = Instant::now() + muse_server::telemetry::METRICS_UPKEEP_EVERY * 4;
    loop {
        // A sample now and then, as a live server records them (the
        // recorder frees its old blocks once no thread still reads them).
        metrics::histogram!("http_request_duration_seconds", "route" => "/upkeep-test")
            .record(0.001);
        let now = held(&region);
        if now < grown / 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still {now} bytes held of {grown} after {:?}",
            muse_server::telemetry::METRICS_UPKEEP_EVERY * 4
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // And the samples are counted, not lost.
    let text = handle.render();
    let count = text
        .lines()
        .find(|l| {
            l.starts_with("http_request_duration_seconds_count") && l.contains("/upkeep-test")
        })
        .unwrap_or_else(|| panic!("no count line in:\n{text}"));
    let n: usize = count.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n > SAMPLES, "{count}");
}
