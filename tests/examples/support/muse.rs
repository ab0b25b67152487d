//! What the bench examples share: the release `muse` as a child process,
//! its database, and JSON calls that must succeed.
#![allow(dead_code)]

use std::time::Duration;

use serde_json::Value;

pub struct Muse {
    pub child: std::process::Child,
    pub base: String,
    pub port: u16,
    wrapped: bool,
    _dir: tempfile::TempDir,
}

impl Drop for Muse {
    fn drop(&mut self) {
        if self.wrapped {
            // A profiler writes its report on a clean exit: SIGTERM is
            // Muse's graceful shutdown.
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let _ = self.child.wait();
            return;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The release `muse` on a loopback port with `database_url`, the bench's
/// upstream as provider `up` (model `bench`), rate limiting off (one client
/// address sends everything) and `extra` settings; its log in its data
/// directory.
pub async fn start_muse(
    bin: &str,
    upstream: &str,
    database_url: &str,
    extra: &[(&str, &str)],
) -> Muse {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = std::fs::File::create(dir.path().join("muse.log")).unwrap();
    // `BENCH_MUSE_WRAPPER="valgrind --tool=callgrind …"` runs Muse under
    // a profiler (see docs/benchmarks.md).
    let wrapper: Vec<String> = std::env::var("BENCH_MUSE_WRAPPER")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = std::process::Command::new(program);
            c.args(args).arg(bin);
            c
        }
        None => std::process::Command::new(bin),
    };
    let mut child = command
        .arg("serve")
        .env("HOST", "127.0.0.1")
        .env("PORT", port.to_string())
        .env("DATABASE_URL", database_url)
        .env("MUSE_DATA_DIR", dir.path().join("data"))
        .env(
            "JWT_SECRET",
            "bench-secret-0123456789-abcdefghijklmnopqrstuvwxyz",
        )
        .env("OPENAI_COMPATIBLE_BASE_URL", format!("{upstream}/v1"))
        .env("OPENAI_COMPATIBLE_NAME", "up")
        .env("OPENAI_COMPATIBLE_MODELS", "bench")
        .env("LLM_MAX_RETRIES", "0")
        // One client address sends everything: measure the gateway, not its rate limiter.
        .env("RATE_LIMIT_ENABLED", "false")
        .env("ADMIN_EMAIL", "root@example.com")
        .env("ADMIN_PASSWORD", "bench admin passphrase")
        .envs(extra.iter().copied())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let tries = if wrapper.is_empty() { 300 } else { 3_000 };
    for _ in 0..tries {
        if client.get(format!("{base}/health")).send().await.is_ok() {
            return Muse {
                child,
                base,
                port,
                wrapped: !wrapper.is_empty(),
                _dir: dir,
            };
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!(
        "muse did not start; see {}",
        dir.path().join("muse.log").display()
    );
}

pub async fn post(client: &reqwest::Client, url: &str, token: &str, body: Value) -> Value {
    let r = client
        .post(url)
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    assert!(status.is_success(), "{url}: {status} {v}");
    v
}

/// SQLite in the run's directory, or a fresh PostgreSQL database created
/// on the server `BENCH_DATABASE_URL` names (dropped at exit).
pub fn database_url(dir: &std::path::Path) -> String {
    match std::env::var("BENCH_DATABASE_URL") {
        Ok(admin) if !admin.trim().is_empty() => {
            let db = muse_persistence::testing::TestDb::postgres(admin.trim());
            let url = db.url.clone();
            // Kept for the whole run (the process exits at the end).
            std::mem::forget(db);
            url
        }
        _ => format!("sqlite://{}/muse.db", dir.display()),
    }
}

/// Removes every quota of the free plan (as the bench's admin).
/// The free plan the benches run on: no quota (a call reserves nothing),
/// or with `BENCH_QUOTA=capped` quotas no bench reaches (every call is
/// reserved and settled as on a paying plan: on Redis with
/// `QUOTA_STORE=redis`).
fn plan_body() -> serde_json::Value {
    match std::env::var("BENCH_QUOTA").as_deref() {
        Ok("capped") => serde_json::json!({
            "name": "Free", "price_cents": 0,
            "max_requests": 1_000_000_000_000i64, "max_tokens": 1_000_000_000_000_000i64,
        }),
        _ => serde_json::json!({"name": "Free", "price_cents": 0}),
    }
}

pub async fn lift_free_plan(client: &reqwest::Client, base: &str) {
    let admin = post(
        client,
        &format!("{base}/api/v1/auth/login"),
        "",
        serde_json::json!({"email": "root@example.com", "password": "bench admin passphrase"}),
    )
    .await;
    let r = client
        .put(format!("{base}/api/v1/admin/plans/free"))
        .bearer_auth(admin["access_token"].as_str().unwrap())
        .json(&plan_body())
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
}

/// CPU time (user + system) a process has used, in seconds, from
/// `/proc/<pid>/stat` (clock ticks of 10 ms).
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is the
    // 3rd field; utime and stime the 14th and 15th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// Context switches (voluntary and not) of all a process's threads so far,
/// from `/proc/<pid>/task/*/status`; threads that already ended are not
/// counted.
pub fn context_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .flat_map(|status| {
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}
