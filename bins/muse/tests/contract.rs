//! The OpenAPI document is a contract the running service keeps:
//! schemathesis (pinned in `scripts/requirements-models.txt`, installed
//! into `.venv` by `just test`) generates requests for every operation from
//! `/openapi.json` and checks each answer with `not_a_server_error`,
//! `status_code_conformance` and `response_schema_conformance`.
//!
//! Three runs per database (SQLite always, PostgreSQL when
//! `TEST_DATABASE_URL` is set): without credentials, with a user's access
//! token and with an admin's. The number of cases per operation is bounded
//! (`SCHEMATHESIS_MAX_EXAMPLES`, default 8) and the seed fixed
//! (`SCHEMATHESIS_SEED`) so the run fits CI and a failure reproduces.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr
)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use muse_persistence::testing::TestDb;
use serde_json::{json, Value};

mod common;
use common::free_port;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// `.venv/bin/schemathesis`, or `None` (a skip) outside `just test`.
fn schemathesis() -> Option<PathBuf> {
    let bin = workspace().join(".venv/bin/schemathesis");
    if bin.is_file() {
        return Some(bin);
    }
    assert!(
        std::env::var("MUSE_REQUIRE_LOCAL_MODELS").as_deref() != Ok("1"),
        "schemathesis is required under `just test`: {} is missing (run ./scripts/ensure-venv.sh)",
        bin.display()
    );
    eprintln!("skipping: {} is missing", bin.display());
    None
}

struct Server {
    child: Child,
    base: String,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(db_url: &str, dir: &Path) -> Server {
    let port = free_port();
    let log = dir.join("serve.log");
    let mut cmd = common::serve_command(port, &dir.join("data"), &log);
    cmd.env("DATABASE_URL", db_url)
        .env(
            "JWT_SECRET",
            "contract-test-secret-0123456789-abcdefghijklmno",
        )
        // Thousands of requests from one address and one account.
        .env("RATE_LIMIT_ENABLED", "false")
        .env("TRAINING_WORKERS", "0");
    // The generated tiny models give the model routes something to run.
    let hub = workspace().join("target/test-models/hub");
    if let (Some(ort), true) = (
        std::env::var_os("ORT_DYLIB_PATH"),
        hub.join("models--muse-test--tiny-gpt2").is_dir(),
    ) {
        cmd.env("ORT_DYLIB_PATH", ort)
            .env("MODEL_CACHE_DIR", &hub)
            .env("LOCAL_MODELS", "muse-test/tiny-gpt2");
    }
    let child = cmd.spawn().unwrap();
    Server {
        child,
        base: format!("http://127.0.0.1:{port}"),
        log,
    }
}

async fn post(client: &reqwest::Client, url: String, body: Value) -> Value {
    let r = client.post(url).json(&body).send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    r.json().await.unwrap()
}

/// One schemathesis run; its report on failure.
fn run_schemathesis(st: &Path, server: &Server, dir: &Path, label: &str, token: Option<&str>) {
    let max_examples =
        std::env::var("SCHEMATHESIS_MAX_EXAMPLES").unwrap_or_else(|_| "8".to_string());
    let seed = std::env::var("SCHEMATHESIS_SEED").unwrap_or_else(|_| "20261130".to_string());
    let mut cmd = Command::new(st);
    cmd.current_dir(dir)
        .arg("run")
        .arg(format!("{}/openapi.json", server.base))
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,response_schema_conformance",
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            &max_examples,
            "--seed",
            &seed,
            "--workers",
            "2",
            "--request-timeout",
            "30",
            "--generation-database",
            "none",
            "--no-color",
        ]);
    if let Some(token) = token {
        cmd.args(["--header", &format!("Authorization: Bearer {token}")])
            // Logging out would revoke the session the run is using; the
            // anonymous run covers the operation.
            .args(["--exclude-path", "/api/v1/auth/logout"]);
    }
    let started = Instant::now();
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = stdout
        .lines()
        .rev()
        .find(|l| l.contains(" in ") && l.starts_with('='))
        .unwrap_or_default()
        .to_string();
    let cases = stdout
        .lines()
        .skip_while(|l| !l.starts_with("Test cases:"))
        .nth(1)
        .unwrap_or_default()
        .trim();
    let warnings: Vec<&str> = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with('⚠'))
        .map(str::trim)
        .collect();
    eprintln!(
        "schemathesis {label}: {cases}; {} ({:.1} s)\n  {}",
        summary.trim_matches(|c| c == '=' || c == ' '),
        started.elapsed().as_secs_f64(),
        warnings.join("\n  ")
    );
    assert!(
        out.status.success(),
        "schemathesis ({label}) found contract violations:\n{stdout}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(&server.log).unwrap_or_default()
    );
}

async fn check(db: TestDb) {
    let Some(st) = schemathesis() else { return };
    let dir = std::env::temp_dir().join(format!("muse-contract-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let server = serve(&db.url, &dir);
    let client = reqwest::Client::new();
    common::until_ready(
        &client,
        &server.base,
        200,
        Duration::from_secs(60),
        &server.log,
    )
    .await;
    let admin = common::login(
        &client,
        &server.base,
        common::ADMIN_EMAIL,
        common::ADMIN_PASSWORD,
    )
    .await;
    post(
        &client,
        format!("{}/api/v1/auth/register", server.base),
        json!({"email": "ada@example.com", "username": "ada", "password": "a long enough passphrase"}),
    )
    .await;
    let user = common::login(
        &client,
        &server.base,
        "ada@example.com",
        "a long enough passphrase",
    )
    .await;
    run_schemathesis(&st, &server, &dir, "anonymous", None);
    run_schemathesis(&st, &server, &dir, "user", Some(&user));
    run_schemathesis(&st, &server, &dir, "admin", Some(&admin));
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[actix_web::test]
async fn every_operation_keeps_the_openapi_contract_on_sqlite() {
    check(TestDb::sqlite()).await;
}

#[actix_web::test]
async fn every_operation_keeps_the_openapi_contract_on_postgres() {
    let Ok(pg) = std::env::var("TEST_DATABASE_URL") else {
        eprintln!("skipping: TEST_DATABASE_URL is not set");
        return;
    };
    check(TestDb::postgres(pg.trim())).await;
}
