//! The `muse` binary: subcommands, start-up errors, graceful shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A scratch directory, removed when dropped.
struct Work(PathBuf);

impl std::ops::Deref for Work {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn workdir() -> Work {
    let dir = std::env::temp_dir().join(format!("muse-cli-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    Work(dir)
}

fn muse(dir: &Work) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_muse"));
    cmd.current_dir(&dir.0)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("MUSE_DATA_DIR", dir.join("data"))
        .env("BCRYPT_COST", "4")
        .env("RUST_LOG", "info");
    cmd
}

#[test]
fn migrate_creates_the_default_sqlite_database() {
    let dir = workdir();
    let out = muse(&dir).arg("migrate").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("migrations applied (sqlite database)"));
    assert!(dir.join("data/muse.db").exists());
    let again = muse(&dir).arg("migrate").output().unwrap();
    assert!(again.status.success());
}

#[test]
fn unknown_database_scheme_is_a_clear_error() {
    let dir = workdir();
    let out = muse(&dir)
        .arg("migrate")
        .env("DATABASE_URL", "mysql://root:hunter2@localhost/muse")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unsupported DATABASE_URL scheme"), "{err}");
    assert!(!err.contains("hunter2"), "password leaked: {err}");
    assert!(
        !dir.join("mysql:").exists() && !dir.join("data/muse.db").exists(),
        "no stray SQLite file"
    );
}

#[test]
fn unreachable_postgres_is_a_clear_error() {
    let dir = workdir();
    let out = muse(&dir)
        .arg("migrate")
        .env("DATABASE_URL", "postgres://muse:hunter2@127.0.0.1:1/muse")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot open the database"), "{err}");
    assert!(!err.contains("hunter2"), "password leaked: {err}");
    assert_reported_once(&err, "Connection refused");
}

/// r2d2 retries every connection the pool lacks and reports each failed
/// attempt: one error must not fill the log before `muse` says why it
/// stops (one log line, and the message `muse` exits with).
fn assert_reported_once(stderr: &str, error: &str) {
    let lines = stderr.lines().filter(|l| l.contains(error)).count();
    assert!(
        (1..=2).contains(&lines),
        "{lines} lines name {error:?}:\n{stderr}"
    );
}

/// libpq refuses the URL itself (no server is asked).
#[test]
fn a_refused_database_url_is_reported_once() {
    let dir = workdir();
    let out = muse(&dir)
        .arg("migrate")
        .env(
            "DATABASE_URL",
            "postgres://muse:hunter2@127.0.0.1:1/muse?sslmode=bogus",
        )
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot open the database"), "{err}");
    assert!(!err.contains("hunter2"), "password leaked: {err}");
    assert_reported_once(&err, "invalid sslmode value");
}

#[test]
fn production_refuses_a_weak_or_missing_secret() {
    let dir = workdir();
    for secret in [None, Some("too-short")] {
        let mut cmd = muse(&dir);
        cmd.arg("serve")
            .env("MUSE_ENV", "production")
            .env("BCRYPT_COST", "12")
            .env("PORT", "0");
        if let Some(s) = secret {
            cmd.env("JWT_SECRET", s);
        }
        let out = cmd.output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("JWT_SECRET"), "{err}");
        if let Some(s) = secret {
            assert!(!err.contains(s));
        }
    }
}

#[test]
fn admin_create_reads_the_password_from_stdin() {
    let dir = workdir();
    let create = |email: &str| {
        let mut child = muse(&dir)
            .args(["admin", "create", "--email", email, "--username", "root"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"a strong admin passphrase\n")
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let out = create("root@example.com");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("created admin root <root@example.com>"));
    let out = create("root@example.com");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    let weak = muse(&dir)
        .args([
            "admin",
            "create",
            "--email",
            "x@example.com",
            "--username",
            "xadmin",
        ])
        .env("MUSE_ADMIN_PASSWORD", "password123")
        .output()
        .unwrap();
    assert!(!weak.status.success());
    assert!(String::from_utf8_lossy(&weak.stderr).contains("too common"));
}

fn http(addr: &str, method: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// `muse serve` on a free port, one worker, its logs (in `format`) on a
/// pipe.
fn serve_logging(dir: &Work, format: &str) -> std::process::Child {
    muse(dir)
        .env("PORT", "0")
        .env("LOG_FORMAT", format)
        .env("WORKERS", "1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[cfg(unix)]
#[test]
fn serve_logs_json_and_stops_gracefully_on_sigterm() {
    let dir = workdir();
    let mut child = serve_logging(&dir, "json");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut addr = None;
    let mut startup = Vec::new();
    while addr.is_none() && Instant::now() < deadline {
        let Some(Ok(line)) = lines.next() else { break };
        startup.push(line.clone());
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|_| panic!("not a JSON log line: {line}"));
        if v["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("Muse is listening"))
        {
            addr = v["fields"]["addr"].as_str().map(str::to_string);
        }
    }
    let addr = addr.expect("server announced its address");
    let res = http(&addr, "GET", "/health");
    assert!(res.starts_with("HTTP/1.1 200"), "{res}");
    let res = http(&addr, "POST", "/api/v1/auth/verify-email/secret-token-xyz");
    assert!(res.starts_with("HTTP/1.1 400"), "{res}");
    // Request logs are JSON lines with the request id.
    let rest = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        if let Some(code) = child.try_wait().unwrap() {
            assert!(code.success(), "exit status {code}");
            break;
        }
        assert!(Instant::now() < deadline, "server did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    let rest = rest.join().unwrap();
    let finished: Vec<serde_json::Value> = rest
        .iter()
        .filter(|l| l.contains("request finished"))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(finished.len(), 2, "{rest:?}");
    assert!(
        finished[0]["span"]["request_id"].is_string(),
        "{:?}",
        finished[0]
    );
    assert_eq!(finished[0]["fields"]["status"], 200);
    assert_eq!(
        finished[1]["fields"]["route"],
        "/api/v1/auth/verify-email/{token}"
    );
    assert!(
        rest.iter().all(|l| !l.contains("secret-token-xyz")),
        "a token reached the logs"
    );
    // A fresh SQLite database: the pool's first connections must not trip
    // over each other while switching to WAL.
    assert!(
        startup
            .iter()
            .chain(&rest)
            .all(|l| !l.contains("database is locked")),
        "{startup:?}"
    );
}

/// Text logs through a pipe (the usual case under systemd or a container
/// runtime): plain lines, no terminal colour codes, and the lines logged
/// while stopping reach the pipe before the process exits (they are
/// written by a log thread of their own, flushed at exit).
#[cfg(unix)]
#[test]
fn text_logs_in_a_pipe_are_plain_and_complete_at_exit() {
    let dir = workdir();
    let mut child = serve_logging(&dir, "text");
    // Lines arrive on a channel, so that a missing one fails the test
    // instead of blocking it; the channel closes with the pipe.
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !seen
        .iter()
        .any(|l: &String| l.contains("Muse is listening"))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => {
                let _ = child.kill();
                panic!("no address announced: {seen:?}");
            }
        }
    }
    let addr = seen
        .iter()
        .find(|l| l.contains("Muse is listening"))
        .and_then(|l| l.split_once("addr="))
        .map(|(_, addr)| addr.trim().to_string())
        .unwrap_or_else(|| {
            let _ = child.kill();
            panic!("no plain addr= field: {seen:?}")
        });
    // Serving (its signal handlers are in place once it answers).
    let res = http(&addr, "GET", "/health");
    assert!(res.starts_with("HTTP/1.1 200"), "{res}");
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // Everything up to the pipe's end (the process has exited then).
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                panic!("stderr still open after SIGTERM: {seen:?}");
            }
        }
    }
    let code = child.wait().unwrap();
    assert!(code.success(), "exit status {code}: {seen:?}");
    assert!(
        seen.iter().all(|l| !l.contains('\u{1b}')),
        "colour codes in a pipe: {seen:?}"
    );
    assert!(
        seen.last().is_some_and(|l| l.contains("server stopped")),
        "the last lines were lost at exit: {seen:?}"
    );
}

/// On SIGTERM the server reports not ready first (for SHUTDOWN_DELAY_MS,
/// while still serving), then stops and exits cleanly.
#[cfg(unix)]
#[test]
fn sigterm_reports_not_ready_before_stopping() {
    let dir = workdir();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = muse(&dir)
        .env("PORT", port.to_string())
        .env("WORKERS", "1")
        .env("SHUTDOWN_DELAY_MS", "1500")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(http(&addr, "GET", "/health/ready").starts_with("HTTP/1.1 200"));
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    std::thread::sleep(Duration::from_millis(300));
    let ready = http(&addr, "GET", "/health/ready");
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    assert!(ready.contains("\"draining\":true"), "{ready}");
    assert!(
        http(&addr, "GET", "/health/live").starts_with("HTTP/1.1 200"),
        "still serving"
    );
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        if let Some(code) = child.try_wait().unwrap() {
            assert!(code.success(), "exit status {code}");
            break;
        }
        assert!(Instant::now() < deadline, "server did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `muse serve --help` lists every setting with its variable, and shows no
/// value taken from the environment (secrets among them).
#[test]
fn serve_help_lists_every_setting_and_no_secret() {
    let dir = workdir();
    let out = muse(&dir)
        .args(["serve", "--help"])
        .env("JWT_SECRET", "a-secret-that-help-must-not-print-0123456789")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    let vars = muse_server::settings::variables();
    assert!(vars.len() > 80, "{}", vars.len());
    for var in vars {
        assert!(
            help.contains(&format!("[env: {var}]")),
            "{var} missing from --help"
        );
    }
    assert!(!help.contains("a-secret-that-help-must-not-print"));
}

/// Layers: ./muse.toml under the environment, flags over both.
#[test]
fn serve_takes_settings_from_muse_toml_the_environment_and_flags() {
    let dir = workdir();
    std::fs::write(
        dir.join("muse.toml"),
        "port = 1\nworkers = 1\nlog_format = \"text\"\n",
    )
    .unwrap();
    let mut child = muse(&dir)
        .env("LOG_FORMAT", "json")
        .args(["serve", "--port", "0"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut addr = None;
    while addr.is_none() && Instant::now() < deadline {
        let Some(Ok(line)) = lines.next() else { break };
        // LOG_FORMAT from the environment beats the file's `text`.
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|_| panic!("not a JSON log line: {line}"));
        if v["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("Muse is listening"))
        {
            addr = v["fields"]["addr"].as_str().map(str::to_string);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    // `--port 0` beats the file's port 1: an ephemeral port was bound.
    let addr = addr.expect("server announced its address");
    assert!(!addr.ends_with(":1"), "{addr}");

    std::fs::write(dir.join("muse.toml"), "prot = 8000\n").unwrap();
    let out = muse(&dir).arg("migrate").output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("muse.toml") && err.contains("unknown setting \"prot\""),
        "{err}"
    );
}
