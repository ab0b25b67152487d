#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

//! The training job queue and dataset records on every backend (SQLite
//! always, PostgreSQL when `TEST_DATABASE_URL` is set): one job goes to one
//! worker even under contention, leases expire and are taken over, stops
//! and progress writes respect who holds a job.

use std::collections::HashMap;
use std::sync::{Arc, Barrier, Mutex};

use muse_auth::*;
use muse_core::PageRequest;
use muse_persistence::testing::TestDb;
use muse_persistence::{Database, DieselAuthRepository, DieselTrainingRepository};
use muse_training::*;
use serde_json::json;
use uuid::Uuid;

fn each_backend(f: impl Fn(&Database, Uuid)) {
    let mut dbs = vec![TestDb::sqlite()];
    if let Ok(url) = std::env::var("TEST_DATABASE_URL") {
        if !url.trim().is_empty() {
            dbs.push(TestDb::postgres(url.trim()));
        }
    }
    for t in &dbs {
        let db = Database::connect(&t.url, 8).expect("connect");
        db.run_migrations().expect("migrate");
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
        f(&db, user.id);
    }
}

fn job(user: Uuid, trainer: &str, now: i64) -> TrainingJob {
    TrainingJob::new(
        user,
        Uuid::now_v7(),
        "local/base".into(),
        trainer.into(),
        json!({"n_epochs": 1}),
        None,
        now,
    )
}

fn running(progress_step: u64) -> JobUpdate {
    JobUpdate {
        state: JobState::Running,
        progress: Progress {
            step: Some(progress_step),
            total_steps: Some(10),
            ..Progress::default()
        },
        provider_job_id: None,
        error: None,
        result_model: None,
    }
}

#[test]
fn each_job_is_claimed_by_exactly_one_of_many_workers() {
    each_backend(|db, user| {
        let repo = Arc::new(DieselTrainingRepository::new(db.clone()));
        for i in 0..20 {
            repo.insert_job(&job(user, "external", 1_000 + i)).unwrap();
        }
        let trainers = vec!["external".to_string()];
        let claims: Arc<Mutex<HashMap<Uuid, Vec<String>>>> = Arc::default();
        let barrier = Arc::new(Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|w| {
                let (repo, claims, barrier, trainers) = (
                    repo.clone(),
                    claims.clone(),
                    barrier.clone(),
                    trainers.clone(),
                );
                std::thread::spawn(move || {
                    barrier.wait();
                    let me = format!("w{w}");
                    while let Some(j) = repo.claim(&me, &trainers, 5_000, 60_000).unwrap() {
                        assert_eq!(j.state, JobState::Queued);
                        claims
                            .lock()
                            .unwrap()
                            .entry(j.id)
                            .or_default()
                            .push(me.clone());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let claims = claims.lock().unwrap();
        assert_eq!(claims.len(), 20, "every job claimed");
        assert!(
            claims.values().all(|w| w.len() == 1),
            "a job went to two workers: {claims:?}"
        );
        // Claimed jobs are validating, held, and not claimable again.
        let page = repo
            .jobs(
                Some(user),
                &JobFilter::default(),
                PageRequest::new(Some(1), Some(100)),
            )
            .unwrap();
        assert!(page
            .items
            .iter()
            .all(|j| j.state == JobState::Validating && j.attempts == 1 && j.worker_id.is_some()));
        assert!(repo
            .claim("late", &trainers, 5_001, 60_000)
            .unwrap()
            .is_none());
    });
}

#[test]
fn a_dead_workers_job_is_taken_over_after_its_lease() {
    each_backend(|db, user| {
        let repo = DieselTrainingRepository::new(db.clone());
        let t = vec!["openai".to_string()];
        let j = job(user, "openai", 1_000);
        repo.insert_job(&j).unwrap();
        // Other trainers' jobs are left alone.
        assert!(repo
            .claim("a", &["external".into()], 2_000, 1_000)
            .unwrap()
            .is_none());
        assert_eq!(repo.claim("a", &t, 2_000, 1_000).unwrap().unwrap().id, j.id);
        assert!(repo.update_job(j.id, "a", &running(3), 2_100).unwrap());
        assert_eq!(
            repo.heartbeat(j.id, "a", 2_500, 1_000).unwrap(),
            Lease::Held { cancel: false }
        );
        // Lease now runs to 3 500: nobody else may take it before.
        assert!(repo.claim("b", &t, 3_400, 1_000).unwrap().is_none());
        // "a" dies; after its lease, "b" takes the running job over.
        let taken = repo.claim("b", &t, 3_600, 1_000).unwrap().unwrap();
        assert_eq!(
            (taken.state, taken.progress.step),
            (JobState::Running, Some(3))
        );
        assert_eq!(taken.worker_id.as_deref(), Some("a"));
        let now = repo.job(Some(user), j.id).unwrap().unwrap();
        assert_eq!((now.worker_id.as_deref(), now.attempts), (Some("b"), 2));
        // "a" comes back: its heartbeat and writes are refused.
        assert_eq!(
            repo.heartbeat(j.id, "a", 3_700, 1_000).unwrap(),
            Lease::Lost
        );
        assert!(!repo.update_job(j.id, "a", &running(9), 3_700).unwrap());
        // "b" finishes it; the lease is released.
        let done = JobUpdate {
            state: JobState::Succeeded,
            result_model: Some("openai/ft:x".into()),
            ..running(10)
        };
        assert!(repo.update_job(j.id, "b", &done, 3_800).unwrap());
        let end = repo.job(None, j.id).unwrap().unwrap();
        assert_eq!(end.state, JobState::Succeeded);
        assert_eq!(
            (end.worker_id, end.lease_until, end.finished_at),
            (None, None, Some(3_800))
        );
        assert!(repo.claim("c", &t, 99_000, 1_000).unwrap().is_none());
        assert_eq!(repo.trained_models().unwrap().len(), 1);
        assert!(!repo.update_job(j.id, "b", &running(1), 3_900).unwrap());
    });
}

#[test]
fn stops_cancel_queued_jobs_and_flag_running_ones() {
    each_backend(|db, user| {
        let repo = DieselTrainingRepository::new(db.clone());
        let t = vec!["external".to_string()];
        let queued = job(user, "external", 1_000);
        let busy = job(user, "external", 900);
        repo.insert_job(&busy).unwrap();
        repo.insert_job(&queued).unwrap();
        assert_eq!(
            repo.claim("w", &t, 1_100, 10_000).unwrap().unwrap().id,
            busy.id
        );
        assert_eq!(repo.unfinished_jobs(user).unwrap(), 2);
        // Someone else cannot stop it.
        assert_eq!(
            repo.request_stop(Uuid::now_v7(), queued.id, 1_200).unwrap(),
            StopOutcome::NotFound
        );
        match repo.request_stop(user, queued.id, 1_200).unwrap() {
            StopOutcome::Cancelled(j) => assert_eq!(j.state, JobState::Cancelled),
            other => panic!("{other:?}"),
        }
        match repo.request_stop(user, busy.id, 1_300).unwrap() {
            StopOutcome::Requested(j) => assert!(j.cancel_requested),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            repo.heartbeat(busy.id, "w", 1_400, 10_000).unwrap(),
            Lease::Held { cancel: true }
        );
        assert!(matches!(
            repo.request_stop(user, queued.id, 1_500).unwrap(),
            StopOutcome::AlreadyEnded(_)
        ));
        assert!(repo.claim("w2", &t, 1_600, 10_000).unwrap().is_none());
        // Changes are listed in order for the progress relay.
        let changed = repo.changed_since(1_200, 100).unwrap();
        let ids: Vec<Uuid> = changed.iter().map(|j| j.id).collect();
        assert_eq!(ids, [queued.id, busy.id]);
        let counts = repo.count_by_state().unwrap();
        assert!(
            counts.contains(&(JobState::Cancelled, 1))
                && counts.contains(&(JobState::Validating, 1))
        );
        assert_eq!(repo.jobs_using_dataset(busy.dataset_id).unwrap(), 1);
        let filtered = repo
            .jobs(
                Some(user),
                &JobFilter {
                    state: Some(JobState::Cancelled),
                    dataset_id: None,
                },
                PageRequest::default(),
            )
            .unwrap();
        assert_eq!((filtered.total, filtered.items[0].id), (1, queued.id));
    });
}

#[test]
fn datasets_are_stored_per_user() {
    each_backend(|db, user| {
        let repo = DieselTrainingRepository::new(db.clone());
        let mut v = DatasetValidator::new(&EstimateCounter);
        for _ in 0..10 {
            v.push_line(br#"{"prompt": "a", "completion": "b"}"#);
        }
        let report = v.finish();
        let d = Dataset {
            id: Uuid::now_v7(),
            user_id: user,
            name: "poems.jsonl".into(),
            size_bytes: 340,
            report: report.clone(),
            estimated_cost_usd: Some(0.25),
            base_model: Some("openai/gpt-4o-mini".into()),
            created_at: 1_000,
        };
        repo.insert(&d).unwrap();
        let mut d2 = d.clone();
        d2.id = Uuid::now_v7();
        d2.size_bytes = 60;
        d2.created_at = 2_000;
        repo.insert(&d2).unwrap();
        assert_eq!(repo.get(user, d.id).unwrap().unwrap(), d);
        assert_eq!(repo.get(Uuid::now_v7(), d.id).unwrap(), None);
        assert_eq!(repo.total_bytes(user).unwrap(), 400);
        let page = repo.list(user, PageRequest::default()).unwrap();
        assert_eq!((page.total, page.items[0].id), (2, d2.id));
        assert!(!repo.delete(Uuid::now_v7(), d.id).unwrap());
        assert!(repo.delete(user, d.id).unwrap());
        assert_eq!(repo.total_bytes(user).unwrap(), 60);
    });
}
