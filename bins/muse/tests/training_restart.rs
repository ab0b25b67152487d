//! A server killed with SIGKILL in the middle of a training job: its
//! training program notices (its stdin closes) and stops, and after the
//! lease a new process — here `muse worker` — fails the job cleanly instead
//! of leaving it "running" forever.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use muse_auth::{AuthRepository, Role, User, UserStatus};
use muse_persistence::{Database, DieselAuthRepository, DieselTrainingRepository};
use muse_training::*;
use uuid::Uuid;

/// Prints progress every 50 ms; writes a marker when its stdin or stdout
/// closes (Muse went away) and stops.
const PROGRAM: &str = r#"
import json, os, signal, sys, threading, time
marker = os.environ["MARKER"]
def term(*_):
    open(os.environ["TERM_MARKER"], "w").write("SIGTERM")
    sys.exit(143)
signal.signal(signal.SIGTERM, term)
def muse_gone(why):
    open(marker, "w").write(why)
    os._exit(0)
def watch():
    sys.stdin.read()
    muse_gone("stdin closed")
threading.Thread(target=watch, daemon=True).start()
for step in range(1, 100000):
    try:
        print(json.dumps({"type": "progress", "step": step, "total_steps": 100000}), flush=True)
    except BrokenPipeError:
        # Muse went away and this print noticed first (its stdout closed
        # with its stdin).
        muse_gone("stdout closed")
    time.sleep(0.05)
"#;

struct Work(PathBuf);

impl Drop for Work {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn muse(dir: &Path, program: &Path, args: &[&str]) -> Child {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    Command::new(env!("CARGO_BIN_EXE_muse"))
        .args(args)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("MUSE_DATA_DIR", dir.join("data"))
        .env("PORT", port.to_string())
        .env("BCRYPT_COST", "4")
        .env("MARKER", dir.join("muse-gone"))
        .env("TERM_MARKER", dir.join("got-sigterm"))
        .env(
            "TRAINING_EXTERNAL_COMMAND",
            format!("python3 {}", program.display()),
        )
        .env("TRAINING_LEASE_SECS", "1")
        .env("TRAINING_POLL_MS", "50")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A migrated data directory with a user, a dataset and a queued job.
fn setup() -> (Work, PathBuf, DieselTrainingRepository, TrainingJob) {
    let dir = std::env::temp_dir().join(format!("muse-restart-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let work = Work(dir.clone());
    let program = dir.join("trainer.py");
    std::fs::write(&program, PROGRAM).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_muse"))
        .arg("migrate")
        .current_dir(&dir)
        .env_clear()
        .env("MUSE_DATA_DIR", dir.join("data"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A user, a dataset on disk, and a queued job.
    let db = Database::connect(
        &format!("sqlite://{}", dir.join("data/muse.db").display()),
        2,
    )
    .unwrap();
    let user = User {
        id: Uuid::now_v7(),
        email: "ada@example.com".into(),
        username: "ada".into(),
        password_hash: "$2b$04$hash".into(),
        role: Role::User,
        status: UserStatus::Active,
        email_verified_at: None,
        created_at: 1_000,
        updated_at: 1_000,
    };
    DieselAuthRepository::new(db.clone())
        .create_user(&user)
        .unwrap();
    let repo = DieselTrainingRepository::new(db);
    let mut v = DatasetValidator::new(&EstimateCounter);
    let line = br#"{"prompt": "2+2", "completion": "4"}"#;
    for _ in 0..10 {
        v.push_line(line);
    }
    let dataset = Dataset {
        id: Uuid::now_v7(),
        user_id: user.id,
        name: "math.jsonl".into(),
        size_bytes: 370,
        report: v.finish(),
        estimated_cost_usd: None,
        base_model: None,
        created_at: 1_000,
    };
    let file = dataset_path(&dir.join("data/training"), dataset.id);
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, [&line[..]; 10].join(&b"\n"[..])).unwrap();
    repo.insert(&dataset).unwrap();
    let job = TrainingJob::new(
        user.id,
        dataset.id,
        "local/some-model".into(),
        "external".into(),
        serde_json::json!({}),
        None,
        2_000,
    );
    repo.insert_job(&job).unwrap();

    (work, program, repo, job)
}

#[test]
fn a_killed_server_leaves_no_job_running_forever() {
    let (work, program, repo, job) = setup();
    let dir = work.0.clone();
    // The server takes it and runs the program…
    let mut server = muse(&dir, &program, &["serve"]);
    wait_for("the job to run", 60, || {
        let j = repo.job(None, job.id).unwrap().unwrap();
        j.state == JobState::Running && j.progress.step.unwrap_or(0) >= 2
    });
    // …and dies without a chance to clean up.
    server.kill().unwrap();
    server.wait().unwrap();
    assert_eq!(
        repo.job(None, job.id).unwrap().unwrap().state,
        JobState::Running
    );
    wait_for("the orphaned program to stop", 20, || {
        dir.join("muse-gone").exists()
    });

    // A separate worker process takes the job over once the lease is out.
    let mut worker = muse(&dir, &program, &["worker"]);
    wait_for("the job to end", 60, || {
        repo.job(None, job.id).unwrap().unwrap().state.is_terminal()
    });
    let end = repo.job(None, job.id).unwrap().unwrap();
    assert_eq!(end.state, JobState::Failed, "{end:?}");
    assert!(
        end.error.as_deref().unwrap().starts_with("interrupted"),
        "{end:?}"
    );
    assert_eq!(end.attempts, 2);
    assert!(end.worker_id.is_none() && end.lease_until.is_none());
    let status = Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(code) = worker.try_wait().unwrap() {
            assert!(code.success(), "muse worker exited with {code}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "muse worker did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_stopped_server_stops_the_program_and_fails_the_job_at_once() {
    let (work, program, repo, job) = setup();
    let dir = work.0.clone();
    let mut server = muse(&dir, &program, &["serve"]);
    wait_for("the job to run", 60, || {
        let j = repo.job(None, job.id).unwrap().unwrap();
        j.state == JobState::Running && j.progress.step.unwrap_or(0) >= 2
    });
    let status = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(code) = server.try_wait().unwrap() {
            assert!(code.success(), "muse exited with {code}");
            break;
        }
        assert!(Instant::now() < deadline, "muse did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Before exiting, the server stopped the program and recorded why.
    assert!(
        dir.join("got-sigterm").exists(),
        "the program got no SIGTERM"
    );
    let end = repo.job(None, job.id).unwrap().unwrap();
    assert_eq!(end.state, JobState::Failed, "{end:?}");
    assert!(
        end.error
            .as_deref()
            .unwrap()
            .contains("shut down during training"),
        "{end:?}"
    );
}
