#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

//! The same repository tests on every backend: SQLite always, PostgreSQL
//! too when `TEST_DATABASE_URL` is set. Each test gets its own database.

use std::sync::{Arc, Barrier};

use diesel::prelude::*;
use muse_auth::*;
use muse_core::PageRequest;
use muse_persistence::schema::*;
use muse_persistence::testing::TestDb;
use muse_persistence::{Database, DbConnection, DbError, DieselAuthRepository};
use uuid::Uuid;

/// Runs `f` once per available backend, each on a fresh migrated database.
fn each_backend(f: impl Fn(&Database, &DieselAuthRepository)) {
    let mut dbs = vec![TestDb::sqlite()];
    if let Ok(url) = std::env::var("TEST_DATABASE_URL") {
        if !url.trim().is_empty() {
            dbs.push(TestDb::postgres(url.trim()));
        }
    }
    for t in &dbs {
        let db = Database::connect(&t.url, 4).expect("connect");
        assert_eq!(db.run_migrations().expect("migrate"), 8);
        let repo = DieselAuthRepository::new(db.clone());
        f(&db, &repo);
    }
}

fn user(email: &str, username: &str) -> User {
    User {
        id: Uuid::now_v7(),
        email: email.into(),
        username: username.into(),
        password_hash: "$2b$04$hash".into(),
        role: Role::User,
        status: UserStatus::Active,
        email_verified_at: None,
        created_at: 1_000,
        updated_at: 1_000,
    }
}

fn session(user_id: Uuid) -> (Session, RefreshToken) {
    let s = Session {
        id: Uuid::now_v7(),
        user_id,
        created_at: 1_000,
        expires_at: 10_000,
        revoked_at: None,
        revoked_reason: None,
        ip: Some("127.0.0.1".into()),
        user_agent: None,
    };
    let t = RefreshToken {
        id: Uuid::now_v7(),
        session_id: s.id,
        token_hash: format!("rt-{}", Uuid::new_v4()),
        created_at: 1_000,
        expires_at: 10_000,
        used_at: None,
    };
    (s, t)
}

#[test]
fn migrations_are_idempotent_and_match_schema_rs() {
    each_backend(|db, _| {
        assert_eq!(db.run_migrations().unwrap(), 0);
        let mut conn = db.get().unwrap();
        let c: &mut DbConnection = &mut conn;
        // Every column schema.rs declares must exist with a readable type.
        users::table
            .select(users::all_columns)
            .load::<(
                String,
                String,
                String,
                String,
                String,
                String,
                Option<i64>,
                i64,
                i64,
            )>(c)
            .unwrap();
        sessions::table
            .select(sessions::all_columns)
            .load::<(
                String,
                String,
                i64,
                i64,
                Option<i64>,
                Option<String>,
                Option<String>,
                Option<String>,
            )>(c)
            .unwrap();
        refresh_tokens::table
            .select(refresh_tokens::all_columns)
            .load::<(String, String, String, i64, i64, Option<i64>)>(c)
            .unwrap();
        api_keys::table
            .select(api_keys::all_columns)
            .load::<(
                String,
                String,
                String,
                String,
                String,
                i64,
                Option<i64>,
                Option<i64>,
                Option<i64>,
            )>(c)
            .unwrap();
        email_tokens::table
            .select(email_tokens::all_columns)
            .load::<(String, String, String, String, i64, i64, Option<i64>)>(c)
            .unwrap();
        audit_events::table
            .select(audit_events::all_columns)
            .load::<(
                String,
                Option<String>,
                String,
                Option<String>,
                Option<String>,
                Option<String>,
                i64,
            )>(c)
            .unwrap();
    });
}

#[test]
fn users_round_trip_and_duplicates_conflict() {
    each_backend(|_, repo| {
        let u = user("ada@example.com", "ada");
        repo.create_user(&u).unwrap();
        assert_eq!(repo.user_by_id(u.id).unwrap().unwrap(), u);
        assert_eq!(
            repo.user_by_email("ada@example.com").unwrap().unwrap().id,
            u.id
        );
        assert_eq!(repo.user_by_username("ada").unwrap().unwrap().id, u.id);
        assert!(repo.user_by_email("nobody@example.com").unwrap().is_none());

        match repo.create_user(&user("ada@example.com", "other")) {
            Err(RepoError::Conflict(what)) => assert!(what.contains("email"), "{what}"),
            other => panic!("expected conflict, got {other:?}"),
        }
        match repo.create_user(&user("other@example.com", "ada")) {
            Err(RepoError::Conflict(what)) => assert!(what.contains("username"), "{what}"),
            other => panic!("expected conflict, got {other:?}"),
        }

        assert!(repo
            .set_user_status(u.id, UserStatus::Suspended, 2_000)
            .unwrap());
        assert!(repo.set_user_role(u.id, Role::Admin, 2_000).unwrap());
        assert!(!repo
            .set_user_role(Uuid::now_v7(), Role::Admin, 2_000)
            .unwrap());
        let back = repo.user_by_id(u.id).unwrap().unwrap();
        assert_eq!(
            (back.status, back.role, back.updated_at),
            (UserStatus::Suspended, Role::Admin, 2_000)
        );
        assert_eq!(repo.count_users_with_role(Role::Admin).unwrap(), 1);
        repo.mark_email_verified(u.id, 3_000).unwrap();
        repo.mark_email_verified(u.id, 4_000).unwrap();
        assert_eq!(
            repo.user_by_id(u.id).unwrap().unwrap().email_verified_at,
            Some(3_000)
        );
    });
}

#[test]
fn foreign_keys_are_enforced() {
    each_backend(|_, repo| {
        let (s, t) = session(Uuid::now_v7());
        assert!(repo.create_session(&s, &t).is_err());
        // The transaction rolled back: no orphan token.
        assert!(repo.refresh_token_by_hash(&t.token_hash).unwrap().is_none());
    });
}

#[test]
fn refresh_tokens_are_consumed_exactly_once_under_concurrency() {
    each_backend(|_, repo| {
        let u = user("bo@example.com", "bo");
        repo.create_user(&u).unwrap();
        let (s, t) = session(u.id);
        repo.create_session(&s, &t).unwrap();
        let (got_s, got_u) = repo.session_with_user(s.id).unwrap().unwrap();
        assert_eq!((got_s, got_u.id), (s.clone(), u.id));
        assert_eq!(
            repo.refresh_token_by_hash(&t.token_hash).unwrap().unwrap(),
            t
        );

        let barrier = Arc::new(Barrier::new(4));
        let wins: usize = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let b = barrier.clone();
                    scope.spawn(move || {
                        b.wait();
                        repo.consume_refresh_token(t.id, 2_000).unwrap()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| usize::from(h.join().unwrap()))
                .sum()
        });
        assert_eq!(wins, 1);
        assert_eq!(
            repo.refresh_token_by_hash(&t.token_hash)
                .unwrap()
                .unwrap()
                .used_at,
            Some(2_000)
        );

        let (_, next) = session(u.id);
        let next = RefreshToken {
            session_id: s.id,
            ..next
        };
        repo.insert_refresh_token(&next).unwrap();
        repo.revoke_session(s.id, 3_000, "logout").unwrap();
        repo.revoke_session(s.id, 4_000, "again").unwrap();
        let (after, _) = repo.session_with_user(s.id).unwrap().unwrap();
        assert_eq!(
            (after.revoked_at, after.revoked_reason.as_deref()),
            (Some(3_000), Some("logout"))
        );

        let (s2, t2) = session(u.id);
        let (s3, t3) = session(u.id);
        repo.create_session(&s2, &t2).unwrap();
        repo.create_session(&s3, &t3).unwrap();
        assert_eq!(repo.revoke_user_sessions(u.id, 5_000, "reset").unwrap(), 2);
        assert!(repo.session_with_user(Uuid::now_v7()).unwrap().is_none());
    });
}

#[test]
fn api_keys_are_scoped_to_their_owner() {
    each_backend(|_, repo| {
        let a = user("a@example.com", "aaa");
        let b = user("b@example.com", "bbb");
        repo.create_user(&a).unwrap();
        repo.create_user(&b).unwrap();
        let key = ApiKey {
            id: Uuid::now_v7(),
            user_id: a.id,
            name: "ci".into(),
            prefix: "muse_sk_abc".into(),
            key_hash: "kh-1".into(),
            created_at: 1_000,
            expires_at: Some(9_000),
            last_used_at: None,
            revoked_at: None,
        };
        repo.create_api_key(&key).unwrap();
        assert_eq!(repo.active_api_keys(a.id).unwrap(), vec![key.clone()]);
        assert!(repo.active_api_keys(b.id).unwrap().is_empty());
        let (k, u) = repo.api_key_with_user("kh-1").unwrap().unwrap();
        assert_eq!((k.id, u.id), (key.id, a.id));
        repo.touch_api_key(key.id, 1_500).unwrap();
        assert_eq!(
            repo.api_key_with_user("kh-1")
                .unwrap()
                .unwrap()
                .0
                .last_used_at,
            Some(1_500)
        );

        assert!(
            !repo.revoke_api_key(b.id, key.id, 2_000).unwrap(),
            "another user cannot revoke it"
        );
        assert!(repo.revoke_api_key(a.id, key.id, 2_000).unwrap());
        assert!(
            !repo.revoke_api_key(a.id, key.id, 2_000).unwrap(),
            "already revoked"
        );
        assert!(repo.active_api_keys(a.id).unwrap().is_empty());
    });
}

#[test]
fn email_tokens_are_single_use_and_expire() {
    each_backend(|_, repo| {
        let u = user("c@example.com", "ccc");
        repo.create_user(&u).unwrap();
        let tok = |hash: &str, purpose, expires_at| EmailToken {
            id: Uuid::now_v7(),
            user_id: u.id,
            purpose,
            token_hash: hash.into(),
            created_at: 1_000,
            expires_at,
            used_at: None,
        };
        repo.create_email_token(&tok("v1", EmailTokenPurpose::VerifyEmail, 5_000))
            .unwrap();
        repo.create_email_token(&tok("v2", EmailTokenPurpose::VerifyEmail, 1_500))
            .unwrap();
        assert!(
            repo.consume_email_token("v1", EmailTokenPurpose::ResetPassword, 2_000)
                .unwrap()
                .is_none(),
            "wrong purpose"
        );
        assert_eq!(
            repo.consume_email_token("v1", EmailTokenPurpose::VerifyEmail, 2_000)
                .unwrap()
                .unwrap()
                .user_id,
            u.id
        );
        assert!(
            repo.consume_email_token("v1", EmailTokenPurpose::VerifyEmail, 2_000)
                .unwrap()
                .is_none(),
            "single use"
        );
        assert!(
            repo.consume_email_token("v2", EmailTokenPurpose::VerifyEmail, 2_000)
                .unwrap()
                .is_none(),
            "expired"
        );

        let (s, t) = session(u.id);
        repo.create_session(&s, &t).unwrap();
        repo.create_email_token(&tok("r1", EmailTokenPurpose::ResetPassword, 5_000))
            .unwrap();
        repo.create_email_token(&tok("r2", EmailTokenPurpose::ResetPassword, 5_000))
            .unwrap();
        assert!(repo
            .reset_password("nope", "$2b$new", 2_000)
            .unwrap()
            .is_none());
        assert_eq!(
            repo.reset_password("r1", "$2b$new", 2_000).unwrap(),
            Some(u.id)
        );
        assert_eq!(
            repo.user_by_id(u.id).unwrap().unwrap().password_hash,
            "$2b$new"
        );
        assert!(repo
            .session_with_user(s.id)
            .unwrap()
            .unwrap()
            .0
            .revoked_at
            .is_some());
        assert!(
            repo.reset_password("r1", "$2b$again", 2_500)
                .unwrap()
                .is_none(),
            "single use"
        );
        assert!(
            repo.reset_password("r2", "$2b$again", 2_500)
                .unwrap()
                .is_none(),
            "sibling links die too"
        );
        assert_eq!(
            repo.user_by_id(u.id).unwrap().unwrap().password_hash,
            "$2b$new"
        );
    });
}

#[test]
fn audit_log_queries() {
    each_backend(|_, repo| {
        let u = user("d@example.com", "ddd");
        repo.create_user(&u).unwrap();
        for (i, (subject, ip)) in [
            ("x@example.com", "10.0.0.1"),
            ("x@example.com", "10.0.0.2"),
            ("y@example.com", "10.0.0.1"),
        ]
        .into_iter()
        .enumerate()
        {
            repo.record_audit(&AuditEvent {
                id: Uuid::now_v7(),
                user_id: (i == 0).then_some(u.id),
                event: audit::LOGIN_FAILED.into(),
                subject: Some(subject.into()),
                ip: Some(ip.into()),
                detail: Some(serde_json::json!({"i": i})),
                created_at: 1_000 + i as i64 * 100,
            })
            .unwrap();
        }
        let times = repo
            .audit_times_since(
                audit::LOGIN_FAILED,
                AuditQuery::Subject("x@example.com"),
                0,
                10,
            )
            .unwrap();
        assert_eq!(times, vec![1_000, 1_100]);
        assert_eq!(
            repo.audit_times_since(audit::LOGIN_FAILED, AuditQuery::Ip("10.0.0.1"), 1_050, 10)
                .unwrap(),
            vec![1_200]
        );
        assert_eq!(
            repo.audit_times_since(audit::LOGIN_FAILED, AuditQuery::Ip("10.0.0.1"), 0, 1)
                .unwrap(),
            vec![1_200]
        );
        assert!(repo
            .audit_times_since(audit::LOGOUT, AuditQuery::Ip("10.0.0.1"), 0, 10)
            .unwrap()
            .is_empty());

        let page = repo
            .list_audit(&AuditFilter::default(), PageRequest::new(Some(1), Some(2)))
            .unwrap();
        assert_eq!((page.total, page.items.len()), (3, 2));
        assert_eq!(page.items[0].created_at, 1_200);
        assert_eq!(page.items[0].detail, Some(serde_json::json!({"i": 2})));
        let page2 = repo
            .list_audit(&AuditFilter::default(), PageRequest::new(Some(2), Some(2)))
            .unwrap();
        assert_eq!(page2.items.len(), 1);
        let mine = repo
            .list_audit(
                &AuditFilter {
                    user_id: Some(u.id),
                    ..Default::default()
                },
                PageRequest::default(),
            )
            .unwrap();
        assert_eq!((mine.total, mine.items[0].user_id), (1, Some(u.id)));
    });
}

#[test]
fn bad_urls_are_clear_errors() {
    assert!(matches!(
        Database::connect("mysql://root@localhost/x", 1),
        Err(DbError::UnknownScheme(_))
    ));
    // Nothing listens on port 1: a clear connect error, not a hang.
    let err = Database::connect("postgres://muse:pw@127.0.0.1:1/muse", 1).unwrap_err();
    assert!(matches!(err, DbError::Connect(_)), "{err}");
    assert!(!err.to_string().contains(":pw@"), "password leaked: {err}");
    let lazy = Database::connect_lazy("postgres://127.0.0.1:1/muse", 1).unwrap();
    assert!(matches!(lazy.ping(), Err(DbError::Unavailable(_))));
}

/// Parses `schema.rs`: table name → [(column, nullable)].
fn declared_schema() -> Vec<(String, Vec<(String, bool)>)> {
    let src = include_str!("../src/schema.rs");
    let mut tables = Vec::new();
    let mut current: Option<(String, Vec<(String, bool)>)> = None;
    for line in src.lines().map(str::trim) {
        if let Some((name, _)) = line
            .split_once(" (")
            .filter(|_| line.ends_with('{') && current.is_none())
        {
            if !name.contains(' ') {
                current = Some((name.to_string(), Vec::new()));
            }
        } else if let Some((col, ty)) = line.split_once(" -> ") {
            if let Some((_, cols)) = current.as_mut() {
                cols.push((col.to_string(), ty.starts_with("Nullable<")));
            }
        } else if line == "}" {
            if let Some(t) = current.take() {
                tables.push(t);
            }
        }
    }
    tables
}

#[derive(QueryableByName)]
struct ColumnInfo {
    #[diesel(sql_type = diesel::sql_types::Text)]
    name: String,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    nullable: bool,
}

#[test]
fn schema_rs_matches_the_migrated_databases_exactly() {
    let declared = declared_schema();
    assert_eq!(declared.len(), 20, "parsed {declared:?}");
    each_backend(|db, _| {
        let mut conn = db.get().unwrap();
        for (table, columns) in &declared {
            let sql = match &*conn {
                DbConnection::Sqlite(_) => format!("SELECT name, \"notnull\" = 0 AND pk = 0 AS nullable FROM pragma_table_info('{table}') ORDER BY cid"),
                DbConnection::Pg(_) => format!(
                    "SELECT column_name::text AS name, is_nullable = 'YES' AS nullable FROM information_schema.columns \
                     WHERE table_schema = current_schema() AND table_name = '{table}' ORDER BY ordinal_position"
                ),
            };
            let actual: Vec<(String, bool)> = diesel::sql_query(sql)
                .load::<ColumnInfo>(&mut *conn)
                .unwrap()
                .into_iter()
                .map(|c| (c.name, c.nullable))
                .collect();
            assert_eq!(&actual, columns, "table {table} on {}", db.backend().name());
        }
    });
}

#[test]
fn executions_are_recorded_and_read_back_per_user() {
    use muse_persistence::DieselExecutionRepository;
    use muse_prompts::{Execution, ExecutionRepository, ExecutionSource, ExecutionStatus};
    each_backend(|db, repo| {
        let a = user("exec-a@example.com", "execa");
        let b = user("exec-b@example.com", "execb");
        repo.create_user(&a).unwrap();
        repo.create_user(&b).unwrap();
        let execs = DieselExecutionRepository::new(db.clone());
        let mk = |i: i64, status| Execution {
            id: Uuid::now_v7(),
            user_id: a.id,
            source: ExecutionSource::OpenaiApi,
            prompt_id: None,
            prompt_version: None,
            provider: "vllm".into(),
            model: "ok".into(),
            variables: Some(serde_json::json!({"k": i})),
            rendered_prompt: Some("hi".into()),
            output: Some("Hello".into()),
            prompt_tokens: 12,
            completion_tokens: 4,
            cost_usd: if i == 0 { None } else { Some(0.25) },
            duration_ms: 100 + i,
            ttft_ms: Some(10),
            status,
            error: (status == ExecutionStatus::Failed).then(|| "boom".to_string()),
            created_at: 1_000 + i,
        };
        let all: Vec<Execution> = (0..3)
            .map(|i| {
                mk(
                    i,
                    if i == 2 {
                        ExecutionStatus::Failed
                    } else {
                        ExecutionStatus::Succeeded
                    },
                )
            })
            .collect();
        for e in &all {
            execs.record(e).unwrap();
        }
        assert_eq!(
            execs
                .get(muse_prompts::ExecutionScope::User(a.id), all[0].id)
                .unwrap()
                .unwrap(),
            all[0]
        );
        assert!(
            execs
                .get(muse_prompts::ExecutionScope::User(b.id), all[0].id)
                .unwrap()
                .is_none(),
            "scoped to the owner"
        );
        let none = muse_prompts::ExecutionFilter::default();
        let page = execs
            .list(
                muse_prompts::ExecutionScope::User(a.id),
                &none,
                PageRequest::new(Some(1), Some(2)),
            )
            .unwrap();
        assert_eq!((page.total, page.items.len()), (3, 2));
        assert_eq!(page.items[0], all[2], "newest first");
        assert_eq!(
            execs
                .list(
                    muse_prompts::ExecutionScope::User(b.id),
                    &none,
                    PageRequest::default()
                )
                .unwrap()
                .total,
            0
        );
        let failed = muse_prompts::ExecutionFilter {
            status: Some(ExecutionStatus::Failed),
            ..Default::default()
        };
        assert_eq!(
            execs
                .list(
                    muse_prompts::ExecutionScope::User(a.id),
                    &failed,
                    PageRequest::default()
                )
                .unwrap()
                .items,
            vec![all[2].clone()]
        );
        let window = muse_prompts::ExecutionFilter {
            from_ms: Some(1_001),
            to_ms: Some(1_002),
            provider: Some("vllm".into()),
            model: Some("ok".into()),
            ..Default::default()
        };
        assert_eq!(
            execs
                .list(
                    muse_prompts::ExecutionScope::User(a.id),
                    &window,
                    PageRequest::default()
                )
                .unwrap()
                .items,
            vec![all[1].clone()]
        );
        let everyone = execs
            .list(
                muse_prompts::ExecutionScope::All,
                &none,
                PageRequest::default(),
            )
            .unwrap();
        assert_eq!(everyone.total, 3, "the admin scope sees everyone's");
        assert!(execs
            .get(muse_prompts::ExecutionScope::All, all[0].id)
            .unwrap()
            .is_some());
        let other = muse_prompts::ExecutionFilter {
            model: Some("other".into()),
            ..Default::default()
        };
        assert_eq!(
            execs
                .list(
                    muse_prompts::ExecutionScope::User(a.id),
                    &other,
                    PageRequest::default()
                )
                .unwrap()
                .total,
            0
        );
        // Model output may hold NUL characters, which PostgreSQL text cannot:
        // the execution is still written, NUL as U+FFFD, on every backend.
        let c = user("exec-c@example.com", "execc");
        repo.create_user(&c).unwrap();
        let mut nul = mk(7, ExecutionStatus::Succeeded);
        nul.id = Uuid::now_v7();
        nul.user_id = c.id;
        nul.output = Some("a\0b".into());
        nul.rendered_prompt = Some("\0".into());
        nul.variables = Some(serde_json::json!({"k": "\u{0}"}));
        execs.record(&nul).unwrap();
        let back = execs
            .get(muse_prompts::ExecutionScope::User(c.id), nul.id)
            .unwrap()
            .unwrap();
        assert_eq!(
            back.output.as_deref(),
            Some("a\u{FFFD}b"),
            "{}",
            db.backend().name()
        );
        assert_eq!(back.rendered_prompt.as_deref(), Some("\u{FFFD}"));
        assert_eq!(
            back.variables, nul.variables,
            "JSON text escapes NUL itself"
        );
    });
}

#[test]
fn the_prompt_library_keeps_versions_permissions_and_seeded_idea_prompts() {
    use muse_core::FixedClock;
    use muse_persistence::DieselLibraryRepository;
    use muse_prompts::*;
    use serde_json::json;
    each_backend(|db, repo| {
        let a = user("lib-a@example.com", "liba");
        let b = user("lib-b@example.com", "libb");
        repo.create_user(&a).unwrap();
        repo.create_user(&b).unwrap();
        let lib = Library::new(
            Arc::new(DieselLibraryRepository::new(db.clone())),
            Arc::new(FixedClock::new(5_000)),
        );
        let va = Viewer {
            user_id: a.id,
            is_admin: false,
        };
        let vb = Viewer {
            user_id: b.id,
            is_admin: false,
        };
        let admin = Viewer {
            user_id: Uuid::now_v7(),
            is_admin: true,
        };

        // The migration seeds the built-in idea prompts, readable by all.
        let seeded = lib.prompt(vb, ideas::CATEGORY_IDEA_PROMPT_ID).unwrap();
        assert_eq!(seeded.version, 1);
        assert!(PromptSpec::new(
            &seeded.content.template,
            seeded.content.variables_schema.clone()
        )
        .is_ok());
        assert!(lib.prompt(vb, ideas::FREE_IDEA_PROMPT_ID).is_ok());
        assert!(matches!(
            lib.update_prompt(
                vb,
                ideas::FREE_IDEA_PROMPT_ID,
                &PromptInput {
                    title: Some("mine".into()),
                    ..Default::default()
                }
            ),
            Err(LibraryError::Forbidden(_))
        ));

        let input = |name: &str, published| SpecialtyInput {
            name: Some(name.into()),
            description: None,
            published: Some(published),
            icon_url: None,
        };
        let spec = lib
            .create_specialty(va, None, &input("Medicine_%", false))
            .unwrap();
        let sub = lib
            .create_specialty(va, Some(spec.id), &input("Cardiology", false))
            .unwrap();
        assert!(
            matches!(
                lib.specialty(vb, spec.id, false),
                Err(LibraryError::NotFound(_))
            ),
            "unpublished is hidden"
        );
        assert!(
            matches!(
                lib.specialty(va, sub.id, false),
                Err(LibraryError::NotFound(_))
            ),
            "a sub-specialty is not a specialty"
        );
        let prompt = lib
            .create_prompt(va, &PromptInput {
                sub_specialty_id: Some(sub.id),
                title: Some("Diagnose".into()),
                template: Some("Symptoms: {symptoms} {{json}}".into()),
                variables_schema: Some(json!({"type": "object", "required": ["symptoms"], "properties": {"symptoms": {"type": "string"}}})),
                tags: Some(vec!["Heart".into(), "heart".into(), "triage".into()]),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(prompt.content.tags, ["heart", "triage"]);
        let v2 = lib
            .update_prompt(
                va,
                prompt.id,
                &PromptInput {
                    template: Some("Symptoms now: {symptoms}".into()),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(v2.version, 2);
        let same = lib
            .update_prompt(
                va,
                prompt.id,
                &PromptInput {
                    published: Some(true),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(same.version, 2, "publication is not a new version");
        assert_eq!(
            lib.prompt_version(va, prompt.id, 1)
                .unwrap()
                .content
                .template,
            "Symptoms: {symptoms} {{json}}"
        );
        let versions = lib
            .prompt_versions(va, prompt.id, PageRequest::default())
            .unwrap();
        assert_eq!(
            versions.items.iter().map(|v| v.version).collect::<Vec<_>>(),
            [2, 1]
        );
        // Published now: b reads it but may not edit it.
        assert_eq!(lib.prompt(vb, prompt.id).unwrap().version, 2);
        assert!(matches!(
            lib.delete_prompt(vb, prompt.id),
            Err(LibraryError::Forbidden(_))
        ));
        // Lists: filters and visibility.
        let by_tag = ListFilter {
            tag: Some("triage".into()),
            ..Default::default()
        };
        assert_eq!(
            lib.list_prompts(vb, by_tag.clone(), PageRequest::default())
                .unwrap()
                .total,
            1
        );
        let q = ListFilter {
            q: Some("medicine_%".into()),
            ..Default::default()
        };
        assert_eq!(
            lib.list_specialties(va, false, q.clone(), PageRequest::default())
                .unwrap()
                .total,
            1
        );
        assert_eq!(
            lib.list_specialties(vb, false, q, PageRequest::default())
                .unwrap()
                .total,
            0
        );
        let wildcard = ListFilter {
            q: Some("_".into()),
            ..Default::default()
        };
        assert_eq!(
            lib.list_specialties(va, false, wildcard, PageRequest::default())
                .unwrap()
                .total,
            1,
            "LIKE wildcards are literal"
        );
        let subs = ListFilter {
            parent: ParentFilter::Of(spec.id),
            ..Default::default()
        };
        assert_eq!(
            lib.list_specialties(va, true, subs, PageRequest::default())
                .unwrap()
                .items[0]
                .id,
            sub.id
        );
        // A non-empty specialty cannot be deleted; nothing is lost.
        assert!(matches!(
            lib.delete_specialty(va, spec.id, false),
            Err(LibraryError::Conflict(_))
        ));
        // A concurrent edit from a stale version is refused.
        let raw = DieselLibraryRepository::new(db.clone());
        let stale = raw.update_prompt(&v2, 1, None);
        assert!(matches!(stale, Err(LibraryError::Conflict(_))), "{stale:?}");
        lib.delete_prompt(admin, prompt.id).unwrap();
        assert!(raw.prompt_version(prompt.id, 1).unwrap().is_none());
        lib.delete_specialty(va, sub.id, true).unwrap();
        lib.delete_specialty(va, spec.id, false).unwrap();
    });
}

#[test]
fn ideas_are_scoped_rated_and_filtered() {
    use muse_persistence::DieselLibraryRepository;
    use muse_prompts::{Idea, IdeaFilter, IdeaRepository};
    each_backend(|db, repo| {
        let a = user("idea-a@example.com", "ideaa");
        let b = user("idea-b@example.com", "ideab");
        repo.create_user(&a).unwrap();
        repo.create_user(&b).unwrap();
        let ideas = DieselLibraryRepository::new(db.clone());
        let mk = |i: i64, category: &str| Idea {
            id: Uuid::now_v7(),
            user_id: a.id,
            execution_id: Uuid::now_v7(),
            prompt: None,
            category: Some(category.into()),
            theme: None,
            creativity: 5,
            provider: "echo".into(),
            model: "m".into(),
            content: format!("idea {i}"),
            rating: None,
            favorite: false,
            created_at: 1_000 + i,
        };
        let all = [mk(0, "Games"), mk(1, "food"), mk(2, "games")];
        for i in &all {
            ideas.insert(i).unwrap();
        }
        assert!(
            ideas
                .update(b.id, all[0].id, Some(5), None)
                .unwrap()
                .is_none(),
            "not b's idea"
        );
        let rated = ideas
            .update(a.id, all[0].id, Some(4), Some(true))
            .unwrap()
            .unwrap();
        assert_eq!((rated.rating, rated.favorite), (Some(4), true));
        let games = IdeaFilter {
            category: Some("GAMES".into()),
            ..Default::default()
        };
        assert_eq!(
            ideas
                .list(a.id, &games, PageRequest::default())
                .unwrap()
                .total,
            2
        );
        let good = IdeaFilter {
            min_rating: Some(3),
            ..Default::default()
        };
        assert_eq!(
            ideas
                .list(a.id, &good, PageRequest::default())
                .unwrap()
                .items,
            vec![rated]
        );
        assert_eq!(
            ideas
                .list(b.id, &IdeaFilter::default(), PageRequest::default())
                .unwrap()
                .total,
            0
        );
    });
}

#[test]
fn stream_tickets_work_once_and_expire() {
    each_backend(|_, repo| {
        let a = user("ticket@example.com", "ticketa");
        repo.create_user(&a).unwrap();
        repo.create_stream_ticket(a.id, "t1", 1_000, 61_000)
            .unwrap();
        repo.create_stream_ticket(a.id, "t2", 1_000, 2_000).unwrap();
        assert_eq!(
            repo.consume_stream_ticket("t1", 1_500).unwrap().unwrap().id,
            a.id
        );
        assert!(
            repo.consume_stream_ticket("t1", 1_600).unwrap().is_none(),
            "single use"
        );
        assert!(
            repo.consume_stream_ticket("t2", 2_000).unwrap().is_none(),
            "expired"
        );
        assert!(repo.consume_stream_ticket("nope", 1_000).unwrap().is_none());
    });
}

#[test]
fn feature_flags_round_trip_and_update_in_place() {
    use muse_billing::{FeatureFlag, FlagRepository};
    use muse_persistence::DieselFlagRepository;
    each_backend(|db, repo| {
        let admin = user("flags@example.com", "flagger");
        repo.create_user(&admin).unwrap();
        let flags = DieselFlagRepository::new(db.clone());
        assert!(flags.list_flags().unwrap().is_empty());
        let mut f = FeatureFlag {
            key: "streaming".into(),
            enabled: true,
            rollout_percent: 25,
            allow_users: vec![admin.id],
            allow_plans: vec!["pro".into()],
            description: "SSE and WebSocket".into(),
            updated_by: Some(admin.id),
            updated_at: 1_000,
        };
        flags.upsert_flag(&f).unwrap();
        f.enabled = false;
        f.rollout_percent = 0;
        f.updated_by = None;
        flags.upsert_flag(&f).unwrap();
        assert_eq!(flags.list_flags().unwrap(), vec![f]);
    });
}

#[test]
fn quotas_hold_under_100_concurrent_reservations_and_reconcile() {
    use muse_billing::*;
    use muse_persistence::DieselBillingRepository;
    each_backend(|db, repo| {
        let u = user("quota@example.com", "quota");
        repo.create_user(&u).unwrap();
        let billing = Arc::new(DieselBillingRepository::new(db.clone()));
        let plans = billing.plans().unwrap();
        assert_eq!(
            plans.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
            ["free", "pro", "team"]
        );
        let mut plan = billing.plan("free").unwrap().unwrap();
        plan.max_requests = Some(10);
        plan.max_tokens = Some(1_000);
        let period = 1_000;
        let barrier = Arc::new(Barrier::new(20));
        let admitted: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..20)
                .map(|_| {
                    let (billing, plan, barrier) = (billing.clone(), plan.clone(), barrier.clone());
                    s.spawn(move || {
                        barrier.wait();
                        (0..5)
                            .filter(|_| {
                                billing
                                    .reserve(u.id, period, &plan, 50, 0.01)
                                    .unwrap()
                                    .is_ok()
                            })
                            .count()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(
            admitted, 10,
            "exactly the quota under 100 concurrent reservations"
        );
        let used = billing.usage(u.id, period).unwrap();
        assert_eq!((used.requests, used.tokens), (10, 500));
        assert_eq!(
            billing.reserve(u.id, period, &plan, 50, 0.0).unwrap(),
            Err(QuotaKind::Requests)
        );
        // Reconciling replaces the worst case by what was used.
        let r = Reservation {
            user_id: u.id,
            period_start: period,
            tokens: 50,
            cost_usd: 0.01,
        };
        billing.reconcile(&r, 20, 0.002).unwrap();
        let used = billing.usage(u.id, period).unwrap();
        assert_eq!((used.requests, used.tokens), (10, 470));
        assert!((used.cost_usd - 0.092).abs() < 1e-9, "{used:?}");
        // A token quota refuses a reservation that would pass it.
        plan.max_requests = None;
        assert_eq!(
            billing.reserve(u.id, period, &plan, 600, 0.0).unwrap(),
            Err(QuotaKind::Tokens)
        );
        assert!(billing
            .reserve(u.id, period, &plan, 530, 0.0)
            .unwrap()
            .is_ok());
        // A new period starts from zero.
        assert_eq!(billing.usage(u.id, period + 1).unwrap(), Usage::default());
        // Subscriptions and history.
        assert!(billing.subscription(u.id).unwrap().is_none());
        let sub = Subscription {
            user_id: u.id,
            plan_id: "pro".into(),
            status: SubscriptionStatus::Active,
            cancel_at_period_end: false,
            stripe_customer_id: None,
            stripe_subscription_id: None,
            current_period_end: Some(9_999),
            updated_at: 5,
            stripe_event_at: None,
        };
        billing.upsert_subscription(&sub).unwrap();
        billing
            .upsert_subscription(&Subscription {
                cancel_at_period_end: true,
                ..sub.clone()
            })
            .unwrap();
        assert!(
            billing
                .subscription(u.id)
                .unwrap()
                .unwrap()
                .cancel_at_period_end
        );
        let bad = billing.upsert_subscription(&Subscription {
            plan_id: "gold".into(),
            ..sub
        });
        assert!(matches!(bad, Err(BillingError::UnknownPlan(_))), "{bad:?}");
        billing
            .record_event(&BillingEvent {
                id: Uuid::now_v7(),
                user_id: u.id,
                kind: "plan_changed".into(),
                description: "free → pro".into(),
                amount_cents: None,
                currency: None,
                external_id: None,
                created_at: 7,
            })
            .unwrap();
        assert_eq!(
            billing.events(u.id, PageRequest::default()).unwrap().total,
            1
        );
    });
}

/// Group commit (`record_calls`, one statement per batch on PostgreSQL,
/// one transaction on SQLite): every execution (NULLs and values alike),
/// idea and usage change of a batch lands as given; a request counted
/// creates or adds to its month's row, a correction (tokens or cost given
/// back) changes only a row that exists; and a batch with one row the
/// database refuses writes nothing.
#[test]
fn a_batch_of_calls_is_written_whole_or_not_at_all() {
    use muse_billing::BillingRepository;
    use muse_persistence::{record_calls, DieselBillingRepository, DieselExecutionRepository};
    use muse_prompts::{
        CallRecord, Execution, ExecutionRepository, ExecutionScope, ExecutionSource,
        ExecutionStatus, Idea, IdeaRepository, UsageDelta,
    };
    each_backend(|db, repo| {
        let (a, b, c) = (
            user("batch-a@example.com", "batcha"),
            user("batch-b@example.com", "batchb"),
            user("batch-c@example.com", "batchc"),
        );
        for u in [&a, &b, &c] {
            repo.create_user(u).unwrap();
        }
        let full = |user_id: Uuid| Execution {
            id: Uuid::now_v7(),
            user_id,
            source: ExecutionSource::Prompt,
            prompt_id: Some(Uuid::now_v7()),
            prompt_version: Some(3),
            provider: "vllm".into(),
            model: "ok".into(),
            variables: Some(serde_json::json!({"topic": "l'été", "n": 2})),
            rendered_prompt: Some("Write about l'été".into()),
            output: Some("Un été".into()),
            prompt_tokens: 12,
            completion_tokens: 4,
            cost_usd: Some(0.000_25),
            duration_ms: 120,
            ttft_ms: Some(15),
            status: ExecutionStatus::Succeeded,
            error: None,
            created_at: 2_000,
        };
        let bare = |user_id: Uuid| Execution {
            prompt_id: None,
            prompt_version: None,
            variables: None,
            rendered_prompt: None,
            output: None,
            cost_usd: None,
            ttft_ms: None,
            status: ExecutionStatus::Failed,
            error: Some("upstream said no".into()),
            source: ExecutionSource::OpenaiApi,
            ..full(user_id)
        };
        let delta = |user_id: Uuid, requests, tokens, cost_usd| UsageDelta {
            user_id,
            period_start: 1_000,
            requests,
            tokens,
            cost_usd,
        };
        let billing = DieselBillingRepository::new(db.clone());
        // A first batch creates the months of a and b.
        let first = [
            CallRecord {
                execution: full(a.id),
                idea: None,
                usage: Some(delta(a.id, 1, 100, 1.0)),
            },
            CallRecord {
                execution: bare(b.id),
                idea: None,
                usage: Some(delta(b.id, 1, 50, 0.5)),
            },
        ];
        record_calls(db, &first).unwrap();

        let with_idea = full(a.id);
        let idea = Idea {
            id: Uuid::now_v7(),
            user_id: a.id,
            execution_id: with_idea.id,
            prompt: None,
            category: Some("poetry".into()),
            theme: None,
            creativity: 7,
            provider: "vllm".into(),
            model: "ok".into(),
            content: "Un été".into(),
            rating: None,
            favorite: false,
            created_at: 2_000,
        };
        let second = [
            CallRecord {
                execution: with_idea.clone(),
                idea: Some(idea.clone()),
                usage: Some(delta(a.id, 1, 10, 0.25)),
            },
            // Two changes of a's month in one batch add up.
            CallRecord {
                execution: bare(a.id),
                idea: None,
                usage: Some(delta(a.id, 1, 5, 0.0)),
            },
            // b's estimate corrected (a reservation held in the database).
            CallRecord {
                execution: bare(b.id),
                idea: None,
                usage: Some(delta(b.id, 0, -20, -0.25)),
            },
            // c has no month yet: a correction alone creates none.
            CallRecord {
                execution: bare(c.id),
                idea: None,
                usage: Some(delta(c.id, 0, -3, 0.0)),
            },
        ];
        record_calls(db, &second).unwrap();

        let executions = DieselExecutionRepository::new(db.clone());
        for r in first.iter().chain(&second) {
            let stored = executions
                .get(ExecutionScope::All, r.execution.id)
                .unwrap()
                .expect("recorded");
            assert_eq!(stored, r.execution);
        }
        let ideas = muse_persistence::DieselLibraryRepository::new(db.clone());
        assert_eq!(ideas.get(a.id, idea.id).unwrap(), Some(idea));
        let usage = |u: &User| billing.usage(u.id, 1_000).unwrap();
        assert_eq!(
            (usage(&a).requests, usage(&a).tokens),
            (3, 115),
            "{:?}",
            usage(&a)
        );
        assert!((usage(&a).cost_usd - 1.25).abs() < 1e-9);
        assert_eq!((usage(&b).requests, usage(&b).tokens), (1, 30));
        assert!((usage(&b).cost_usd - 0.25).abs() < 1e-9);
        assert_eq!(usage(&c), muse_billing::Usage::default());

        // One execution of a user that does not exist: the batch is
        // refused, and none of it is written.
        let good = full(a.id);
        let refused = [
            CallRecord {
                execution: good.clone(),
                idea: None,
                usage: Some(delta(a.id, 1, 1, 0.0)),
            },
            CallRecord {
                execution: full(Uuid::now_v7()),
                idea: None,
                usage: None,
            },
        ];
        assert!(matches!(
            record_calls(db, &refused),
            Err(DbError::Rejected(_))
        ));
        assert!(executions
            .get(ExecutionScope::All, good.id)
            .unwrap()
            .is_none());
        assert_eq!(usage(&a).requests, 3);
    });
}
