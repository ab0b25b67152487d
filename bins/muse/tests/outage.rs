//! Surviving the shared services: two `muse serve` replicas on a PostgreSQL
//! and a Redis that this test starts itself (initdb on a loopback port,
//! `redis-server --port …`) so it can stop and restart them.
//!
//! While PostgreSQL is down, what needs it answers 503
//! `database_unavailable` with `Retry-After` (not 500, not a hang),
//! `/health/ready` says not ready and `/health/live` still answers; once it
//! is back every replica recovers without a restart and every call answered
//! 2xx has its execution recorded. While Redis is down, rate limiting
//! follows `RATE_LIMIT_FAILURE` (`open` admits, `closed` answers 503
//! `rate_limiter_unavailable`) and the events channel reports itself down
//! (`events_channel_up 0`); both recover when Redis returns.
//!
//! Run when `TEST_DATABASE_URL` and `TEST_REDIS_URL` are set (as in CI, on
//! a machine with the PostgreSQL and Redis server packages); skipped
//! otherwise. Prints the recovery times it saw.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr
)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;
use common::{free_port, instant_upstream};

/// The PostgreSQL server binaries (Debian's layout, or on PATH).
fn pg_bin(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .collect();
    dirs.sort();
    dirs.reverse();
    dirs.extend(
        std::env::var("PATH")
            .unwrap_or_default()
            .split(':')
            .map(PathBuf::from),
    );
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Runs a PostgreSQL tool, as the `postgres` user when this test is root
/// (PostgreSQL refuses to run as root).
fn pg_command(bin: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

struct Postgres {
    dir: PathBuf,
    port: u16,
    pg_ctl: PathBuf,
}

impl Postgres {
    fn init(root: &Path) -> Self {
        let dir = root.join("pg");
        std::fs::create_dir_all(&dir).unwrap();
        if is_root() {
            assert!(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(root)
                .status()
                .unwrap()
                .success());
        }
        let initdb = pg_bin("initdb").expect("initdb");
        let out = pg_command(&initdb)
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pg = Self {
            dir,
            port: free_port(),
            pg_ctl: pg_bin("pg_ctl").expect("pg_ctl"),
        };
        pg.start();
        pg
    }

    fn start(&self) {
        let out = pg_command(&self.pg_ctl)
            .arg("-D")
            .arg(&self.dir)
            .arg("-o")
            .arg(format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
                self.port,
                self.dir.display()
            ))
            .arg("-l")
            .arg(self.dir.join("log"))
            .args(["-w", "start"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn stop(&self) {
        let _ = pg_command(&self.pg_ctl)
            .arg("-D")
            .arg(&self.dir)
            .args(["-m", "fast", "-w", "stop"])
            .output();
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Redis {
    port: u16,
    child: Option<Child>,
}

impl Redis {
    fn start(port: u16) -> Self {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            port,
            child: Some(child),
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Replica {
    child: Child,
    base: String,
    log: PathBuf,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn replica(db: &str, redis: &str, up: &str, dir: &Path, failure: &str) -> Replica {
    let port = free_port();
    let log = dir.join(format!("replica-{port}.log"));
    let mut cmd = common::serve_command(port, &dir.join("data"), &log);
    let child = common::with_upstream(&mut cmd, up, "ok")
        .env("DATABASE_URL", db)
        .env("REDIS_URL", redis)
        .env("RATE_LIMIT_FAILURE", failure)
        .env(
            "JWT_SECRET",
            "outage-test-secret-0123456789-abcdefghijklmnop",
        )
        .env("WORKERS", "1")
        .env("TRAINING_WORKERS", "0")
        .env("AUTH_CACHE_TTL_MS", "0")
        .spawn()
        .unwrap();
    Replica {
        child,
        base: format!("http://127.0.0.1:{port}"),
        log,
    }
}

async fn status(client: &reqwest::Client, url: String) -> Option<u16> {
    client
        .get(url)
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

/// Waits until `/health/ready` answers `want`; the time it took.
async fn until_ready(
    client: &reqwest::Client,
    r: &Replica,
    want: u16,
    within: Duration,
) -> Duration {
    common::until_ready(client, &r.base, want, within, &r.log).await
}

async fn chat(client: &reqwest::Client, r: &Replica, key: &str) -> (u16, Value, Option<String>) {
    let res = client
        .post(format!("{}/v1/chat/completions", r.base))
        .bearer_auth(key)
        .json(&json!({"model": "up/ok", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    let code = res.status().as_u16();
    let retry = res
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    (code, res.json().await.unwrap_or_default(), retry)
}

async fn gauge(client: &reqwest::Client, r: &Replica, name: &str) -> Option<f64> {
    let text = client
        .get(format!("{}/metrics", r.base))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[actix_web::test]
async fn replicas_survive_postgres_and_redis_restarts() {
    if std::env::var("TEST_DATABASE_URL").is_err() || std::env::var("TEST_REDIS_URL").is_err() {
        eprintln!("skipping: set TEST_DATABASE_URL and TEST_REDIS_URL (as CI does)");
        return;
    }
    assert!(
        pg_bin("initdb").is_some() && pg_bin("pg_ctl").is_some(),
        "the PostgreSQL server binaries (initdb, pg_ctl) are required with TEST_DATABASE_URL"
    );
    let root = std::env::temp_dir().join(format!("muse-outage-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(root.join("data")).unwrap();
    let pg = Postgres::init(&root);
    let mut redis = Redis::start(free_port());
    let redis_url = format!("redis://127.0.0.1:{}", redis.port);
    let up = instant_upstream().await;
    let open = replica(&pg.url(), &redis_url, &up, &root, "open");
    let closed = replica(&pg.url(), &redis_url, &up, &root, "closed");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    for r in [&open, &closed] {
        until_ready(&client, r, 200, Duration::from_secs(60)).await;
    }

    // A user with an API key (checked against the database on every call:
    // AUTH_CACHE_TTL_MS=0).
    let post = |r: &Replica, path: &str, token: Option<&str>, body: Value| {
        let mut req = client.post(format!("{}{path}", r.base)).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t.to_string());
        }
        req.send()
    };
    let reg = post(
        &open,
        "/api/v1/auth/register",
        None,
        json!({"email": "ops@example.com", "username": "ops", "password": "a long enough passphrase"}),
    )
    .await
    .unwrap();
    assert_eq!(reg.status().as_u16(), 201);
    let token = common::login(
        &client,
        &open.base,
        "ops@example.com",
        "a long enough passphrase",
    )
    .await;
    let key: Value = post(
        &open,
        "/api/v1/auth/api-keys",
        Some(&token),
        json!({"name": "ops"}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let key = key["key"]
        .as_str()
        .unwrap_or_else(|| panic!("{key}"))
        .to_string();

    let mut acknowledged = 0;
    for r in [&open, &closed] {
        for _ in 0..3 {
            let (code, body, _) = chat(&client, r, &key).await;
            assert_eq!(code, 200, "{body}");
            acknowledged += 1;
        }
    }

    // PostgreSQL goes away.
    pg.stop();
    for r in [&open, &closed] {
        let started = Instant::now();
        let (code, body, retry) = chat(&client, r, &key).await;
        assert_eq!(code, 503, "{body}");
        assert_eq!(body["error"]["code"], "database_unavailable", "{body}");
        assert!(retry.is_some(), "503 without Retry-After");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "took {:?}",
            started.elapsed()
        );
        let history = client
            .get(format!("{}/api/v1/executions/history", r.base))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(history.status().as_u16(), 503);
        until_ready(&client, r, 503, Duration::from_secs(15)).await;
        assert_eq!(
            status(&client, format!("{}/health/live", r.base)).await,
            Some(200)
        );
    }

    // It comes back: every replica recovers by itself.
    let restarted = Instant::now();
    pg.start();
    let mut recovery = Vec::new();
    for r in [&open, &closed] {
        until_ready(&client, r, 200, Duration::from_secs(30)).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (code, body, _) = chat(&client, r, &key).await;
            if code == 200 {
                acknowledged += 1;
                break;
            }
            assert!(Instant::now() < deadline, "no recovery: {code} {body}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        recovery.push(restarted.elapsed());
    }
    let history: Value = client
        .get(format!(
            "{}/api/v1/executions/history?per_page=100",
            closed.base
        ))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        history["total"].as_u64(),
        Some(acknowledged),
        "every acknowledged call is recorded: {history}"
    );

    // Redis goes away: `open` admits, `closed` refuses; events fall back.
    assert_eq!(gauge(&client, &open, "events_channel_up").await, Some(1.0));
    redis.stop();
    let (code, body, _) = chat(&client, &open, &key).await;
    assert_eq!(code, 200, "{body}");
    let (code, body, _) = chat(&client, &closed, &key).await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (503, Some("rate_limiter_unavailable")),
        "{body}"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while gauge(&client, &open, "events_channel_up").await != Some(0.0) {
        assert!(
            Instant::now() < deadline,
            "the events channel still reads up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // It comes back on the same port: both recover.
    let restarted = Instant::now();
    redis = Redis::start(redis.port);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, _, _) = chat(&client, &closed, &key).await;
        if code == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "rate limiting never recovered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let limits_back = restarted.elapsed();
    while gauge(&client, &open, "events_channel_up").await != Some(1.0) {
        assert!(
            restarted.elapsed() < Duration::from_secs(30),
            "the events channel never came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "after a PostgreSQL restart: ready and serving again in {:?} / {:?}; after a Redis restart: rate limits in {limits_back:?}, events channel in {:?}",
        recovery[0],
        recovery[1],
        restarted.elapsed()
    );
    drop(open);
    drop(closed);
    drop(redis);
    drop(pg);
    let _ = std::fs::remove_dir_all(&root);
}
