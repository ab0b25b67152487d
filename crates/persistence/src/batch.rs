//! Group commit: the records of many model calls written in one
//! transaction (their executions and ideas inserted, their quota
//! reservations reconciled), so that a busy server commits once per batch
//! instead of three times per call.

use std::collections::BTreeMap;

use diesel::prelude::*;
use muse_prompts::{CallRecord, CallStore, RecordError};

use crate::db::{Database, DbConnection, DbError};
use crate::execution_repo::Row;
use crate::library_repo::IdeaRow;
use crate::schema::{executions, ideas};

/// Requests, tokens and cost to add to one usage row.
type Delta = (i64, i64, f64);
/// The usage changes of a batch, per (user, period start), in that order:
/// every writer (of every replica) locks usage rows in the same order, so
/// that two batches changing the same rows wait for each other instead of
/// deadlocking.
type Deltas = BTreeMap<(String, i64), Delta>;
/// One of them.
type Change<'a> = (&'a (String, i64), &'a Delta);

/// [`CallStore`] on the database: each batch in one transaction.
#[derive(Clone)]
pub struct DieselCallStore {
    db: Database,
}

impl DieselCallStore {
    pub fn new(db: Database) -> Self {
        Self { db }
    }
}

impl CallStore for DieselCallStore {
    fn record_calls(&self, batch: &[CallRecord]) -> Result<(), RecordError> {
        record_calls(&self.db, batch).map_err(|e| match e {
            DbError::Rejected(m) => RecordError::Rejected(m),
            other => RecordError::Unavailable(other.to_string()),
        })
    }

    fn between_batches(&self) {
        match self.db.restart_wal_if_large() {
            Ok(true) => tracing::debug!("the WAL was made to start over"),
            Ok(false) => {}
            // The next batch tries again; a WAL that keeps growing is
            // worth an operator's look.
            Err(e) => tracing::warn!(error = %e, "cannot make the WAL start over"),
        }
    }
}

/// Writes `batch` in one transaction: every execution and idea inserted,
/// every usage delta added (summed per user and period: one upsert
/// each). All or nothing.
pub fn record_calls(db: &Database, batch: &[CallRecord]) -> Result<(), DbError> {
    if batch.is_empty() {
        return Ok(());
    }
    let rows: Vec<Row> = batch
        .iter()
        .map(|c| Row::from_domain(&c.execution))
        .collect();
    let idea_rows: Vec<IdeaRow> = batch
        .iter()
        .filter_map(|c| c.idea.as_ref().map(IdeaRow::from_domain))
        .collect();
    // Per (user, period): requests, tokens and cost to add.
    let mut deltas: Deltas = BTreeMap::new();
    for u in batch.iter().filter_map(|c| c.usage.as_ref()) {
        let d = deltas
            .entry((u.user_id.to_string(), u.period_start))
            .or_default();
        d.0 += u.requests;
        d.1 += u.tokens;
        d.2 += u.cost_usd;
    }
    // A change that counts a request creates or adds to its period's row
    // (counted in memory or on Redis, the row may not exist yet); one
    // without (a refund of tokens or cost) changes only an existing row.
    db.write_batch(|conn| match conn {
        DbConnection::Pg(pg) => {
            let changes: Vec<Change> = deltas.iter().collect();
            record_in_one_statement(pg, rows, idea_rows, &changes)
        }
        DbConnection::Sqlite(conn) => conn.transaction::<_, diesel::result::Error, _>(|conn| {
            // SQLite takes no multi-row INSERT with NULLs through diesel:
            // one statement per row, still one commit (and no round trips:
            // SQLite is in this process).
            for row in &rows {
                diesel::insert_into(executions::table)
                    .values(row)
                    .execute(conn)?;
            }
            for row in &idea_rows {
                diesel::insert_into(ideas::table)
                    .values(row)
                    .execute(conn)?;
            }
            for change @ (_, &(requests, _, _)) in &deltas {
                if requests > 0 {
                    AddUsage::of(change).execute(conn)?;
                } else {
                    Refund::of(change).execute(conn)?;
                }
            }
            Ok(())
        }),
    })?
    .map_err(|e| {
        if crate::is_unavailable(&e) {
            DbError::Unavailable(e.to_string())
        } else {
            DbError::Rejected(e.to_string())
        }
    })
}

/// SQLite: adds one batch's requests, tokens and cost to a usage row —
/// creating it ([`AddUsage`]), or only if it exists ([`Refund`]). The
/// same statements diesel's query builders write, as statements of fixed
/// text and static type, which diesel prepares once per connection and
/// keeps: its builders mark every `ON CONFLICT … DO UPDATE` (and every
/// `UPDATE`) as not to be cached, so that SQLite parsed and planned the
/// upsert again for every batch (a fifth of the writer's work per commit,
/// measured with `perf` at 2,000 calls/s). `CREATE` is part of the type,
/// so each text has its own cache entry.
struct UsageChange<'a, const CREATE: bool> {
    user_id: &'a str,
    period_start: i64,
    requests: i64,
    tokens: i64,
    cost_usd: f64,
}

/// `INSERT … ON CONFLICT DO UPDATE`: counts a call.
type AddUsage<'a> = UsageChange<'a, true>;
/// `UPDATE` of an existing row: gives back what a call did not use.
type Refund<'a> = UsageChange<'a, false>;

impl<'a, const CREATE: bool> UsageChange<'a, CREATE> {
    fn of(((user_id, period_start), (requests, tokens, cost_usd)): Change<'a>) -> Self {
        Self {
            user_id,
            period_start: *period_start,
            requests: *requests,
            tokens: *tokens,
            cost_usd: *cost_usd,
        }
    }
}

impl<const CREATE: bool> diesel::query_builder::QueryId for UsageChange<'_, CREATE> {
    type QueryId = UsageChange<'static, CREATE>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl<const CREATE: bool> diesel::query_builder::QueryFragment<diesel::sqlite::Sqlite>
    for UsageChange<'_, CREATE>
{
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, diesel::sqlite::Sqlite>,
    ) -> QueryResult<()> {
        use diesel::sql_types::{BigInt, Double, Text};
        if CREATE {
            out.push_sql(
                "INSERT INTO usage_counters (user_id, period_start, requests, tokens, cost_usd) \
                 VALUES (",
            );
            out.push_bind_param::<Text, _>(&self.user_id)?;
            out.push_sql(", ");
            out.push_bind_param::<BigInt, _>(&self.period_start)?;
            out.push_sql(", ");
            out.push_bind_param::<BigInt, _>(&self.requests)?;
            out.push_sql(", ");
            out.push_bind_param::<BigInt, _>(&self.tokens)?;
            out.push_sql(", ");
            out.push_bind_param::<Double, _>(&self.cost_usd)?;
            out.push_sql(
                ") ON CONFLICT (user_id, period_start) DO UPDATE SET \
                 requests = requests + excluded.requests, \
                 tokens = tokens + excluded.tokens, \
                 cost_usd = cost_usd + excluded.cost_usd",
            );
        } else {
            out.push_sql("UPDATE usage_counters SET requests = requests + ");
            out.push_bind_param::<BigInt, _>(&self.requests)?;
            out.push_sql(", tokens = tokens + ");
            out.push_bind_param::<BigInt, _>(&self.tokens)?;
            out.push_sql(", cost_usd = cost_usd + ");
            out.push_bind_param::<Double, _>(&self.cost_usd)?;
            out.push_sql(" WHERE user_id = ");
            out.push_bind_param::<Text, _>(&self.user_id)?;
            out.push_sql(" AND period_start = ");
            out.push_bind_param::<BigInt, _>(&self.period_start)?;
        }
        Ok(())
    }
}

impl<const CREATE: bool> RunQueryDsl<diesel::sqlite::SqliteConnection> for UsageChange<'_, CREATE> {}

/// A batch on PostgreSQL: one statement, so one round trip and one
/// (implicit) transaction — every execution, idea and usage change of the
/// batch in data-modifying `WITH` clauses, each fed by `unnest` over one
/// array per column (the statement's text and its 40 parameters are the
/// same whatever the batch's size, so it is prepared once per connection:
/// see [`PgBatch`]). All or nothing, like the transaction it replaces: a
/// row the database refuses fails the whole statement. The usage rows are
/// changed in (user, period) order whatever the order of `changes`.
fn record_in_one_statement(
    pg: &mut PgConnection,
    rows: Vec<Row>,
    ideas: Vec<IdeaRow>,
    changes: &[Change],
) -> Result<(), diesel::result::Error> {
    use Column as C;
    macro_rules! column {
        ($kind:ident, $rows:expr, $field:ident) => {
            C::$kind($rows.iter().map(|r| r.$field.clone()).collect())
        };
    }
    PgBatch([
        column!(Text, rows, id),
        column!(Text, rows, user_id),
        column!(Text, rows, source),
        column!(OptText, rows, prompt_id),
        column!(OptInt, rows, prompt_version),
        column!(Text, rows, provider),
        column!(Text, rows, model),
        column!(OptText, rows, variables),
        column!(OptText, rows, rendered_prompt),
        column!(OptText, rows, output),
        column!(Int, rows, prompt_tokens),
        column!(Int, rows, completion_tokens),
        column!(OptDouble, rows, cost_usd),
        column!(BigInt, rows, duration_ms),
        column!(OptBigInt, rows, ttft_ms),
        column!(Text, rows, status),
        column!(OptText, rows, error),
        column!(BigInt, rows, created_at),
        column!(Text, ideas, id),
        column!(Text, ideas, user_id),
        column!(Text, ideas, execution_id),
        column!(OptText, ideas, prompt),
        column!(OptText, ideas, category),
        column!(OptText, ideas, theme),
        column!(Int, ideas, creativity),
        column!(Text, ideas, provider),
        column!(Text, ideas, model),
        column!(Text, ideas, content),
        column!(OptInt, ideas, rating),
        column!(Bool, ideas, favorite),
        column!(BigInt, ideas, created_at),
        C::Text(changes.iter().map(|((u, _), _)| u.clone()).collect()),
        C::BigInt(changes.iter().map(|((_, p), _)| *p).collect()),
        C::BigInt(changes.iter().map(|(_, d)| d.0).collect()),
        C::BigInt(changes.iter().map(|(_, d)| d.1).collect()),
        C::Double(changes.iter().map(|(_, d)| d.2).collect()),
    ])
    .execute(pg)?;
    Ok(())
}

/// One parameter of [`BATCH_SQL`]: a column of the batch, as an array.
enum Column {
    Text(Vec<String>),
    OptText(Vec<Option<String>>),
    Int(Vec<i32>),
    OptInt(Vec<Option<i32>>),
    BigInt(Vec<i64>),
    OptBigInt(Vec<Option<i64>>),
    OptDouble(Vec<Option<f64>>),
    Double(Vec<f64>),
    Bool(Vec<bool>),
}

/// [`BATCH_SQL`] with its parameters, as a statement of static type, which
/// diesel prepares once per connection and keeps (a `sql_query` is parsed
/// and planned by PostgreSQL again at every execution: diesel never caches
/// it). Its text is [`BATCH_SQL`] cut at each `$n`, each cut filled with
/// the next column.
struct PgBatch([Column; PARAMETERS]);

/// How many parameters [`BATCH_SQL`] takes.
const PARAMETERS: usize = 36;

impl diesel::query_builder::QueryId for PgBatch {
    type QueryId = PgBatch;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl diesel::query_builder::QueryFragment<diesel::pg::Pg> for PgBatch {
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, diesel::pg::Pg>,
    ) -> QueryResult<()> {
        use diesel::sql_types::{Array, BigInt, Bool, Double, Integer, Nullable, Text};
        let text = batch_sql_pieces();
        for (piece, column) in text.iter().zip(&self.0) {
            out.push_sql(piece);
            match column {
                Column::Text(v) => out.push_bind_param::<Array<Text>, _>(v)?,
                Column::OptText(v) => out.push_bind_param::<Array<Nullable<Text>>, _>(v)?,
                Column::Int(v) => out.push_bind_param::<Array<Integer>, _>(v)?,
                Column::OptInt(v) => out.push_bind_param::<Array<Nullable<Integer>>, _>(v)?,
                Column::BigInt(v) => out.push_bind_param::<Array<BigInt>, _>(v)?,
                Column::OptBigInt(v) => out.push_bind_param::<Array<Nullable<BigInt>>, _>(v)?,
                Column::OptDouble(v) => out.push_bind_param::<Array<Nullable<Double>>, _>(v)?,
                Column::Double(v) => out.push_bind_param::<Array<Double>, _>(v)?,
                Column::Bool(v) => out.push_bind_param::<Array<Bool>, _>(v)?,
            }
        }
        out.push_sql(text.last().copied().unwrap_or_default());
        Ok(())
    }
}

impl RunQueryDsl<PgConnection> for PgBatch {}

/// [`BATCH_SQL`] cut at its parameters: the text before `$1`, between each
/// `$n` and `$n+1`, and after the last (diesel writes each `$n` itself, in
/// the order the parameters are pushed).
fn batch_sql_pieces() -> &'static [&'static str] {
    static PIECES: std::sync::LazyLock<Vec<&'static str>> = std::sync::LazyLock::new(|| {
        let mut pieces = Vec::with_capacity(PARAMETERS + 1);
        let mut rest = BATCH_SQL;
        while let Some(at) = rest.find('$') {
            pieces.push(&rest[..at]);
            let digits = rest[at + 1..]
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len() - at - 1);
            rest = &rest[at + 1 + digits..];
        }
        pieces.push(rest);
        pieces
    });
    &PIECES
}

/// See [`record_in_one_statement`]. Every usage change goes through one
/// `INSERT … ON CONFLICT DO UPDATE` fed in (user, period) order, so the
/// rows are locked in that order (one statement with an upsert and an
/// `UPDATE … FROM`, or batches given in different orders, locked them in
/// orders that two writers — two replicas — could cross, and PostgreSQL
/// broke the deadlock after a second by failing one batch). A change that
/// counts a request creates its row if need be; a refund (no request:
/// tokens or cost given back) only changes a row that exists.
const BATCH_SQL: &str = "\
WITH new_executions AS (
    INSERT INTO executions (id, user_id, source, prompt_id, prompt_version, provider, model,
        variables, rendered_prompt, output, prompt_tokens, completion_tokens, cost_usd,
        duration_ms, ttft_ms, status, error, created_at)
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int4[], $6::text[],
        $7::text[], $8::text[], $9::text[], $10::text[], $11::int4[], $12::int4[], $13::float8[],
        $14::int8[], $15::int8[], $16::text[], $17::text[], $18::int8[])
), new_ideas AS (
    INSERT INTO ideas (id, user_id, execution_id, prompt, category, theme, creativity, provider,
        model, content, rating, favorite, created_at)
    SELECT * FROM unnest($19::text[], $20::text[], $21::text[], $22::text[], $23::text[],
        $24::text[], $25::int4[], $26::text[], $27::text[], $28::text[], $29::int4[],
        $30::bool[], $31::int8[])
), changed_usage AS (
    INSERT INTO usage_counters (user_id, period_start, requests, tokens, cost_usd)
    SELECT d.user_id, d.period_start, d.requests, d.tokens, d.cost_usd
    FROM unnest($32::text[], $33::int8[], $34::int8[], $35::int8[], $36::float8[])
        AS d(user_id, period_start, requests, tokens, cost_usd)
    WHERE d.requests > 0 OR EXISTS (SELECT 1 FROM usage_counters AS c
        WHERE c.user_id = d.user_id AND c.period_start = d.period_start)
    ORDER BY d.user_id, d.period_start
    ON CONFLICT (user_id, period_start) DO UPDATE SET
        requests = usage_counters.requests + excluded.requests,
        tokens = usage_counters.tokens + excluded.tokens,
        cost_usd = usage_counters.cost_usd + excluded.cost_usd
)
SELECT 1";

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::schema::usage_counters;
    use diesel::connection::{Instrumentation, InstrumentationEvent, SimpleConnection};
    use diesel_migrations::MigrationHarness;
    use std::sync::{Arc, Mutex};

    /// Every usage row as (user, requests, tokens, cost), by user (on
    /// either backend's connection).
    macro_rules! usage_rows {
        ($conn:expr) => {
            usage_counters::table
                .select((
                    usage_counters::user_id,
                    usage_counters::requests,
                    usage_counters::tokens,
                    usage_counters::cost_usd,
                ))
                .order(usage_counters::user_id)
                .load::<(String, i64, i64, f64)>(&mut $conn)
                .unwrap()
        };
    }

    /// What the connection put in its prepared statement cache.
    fn cached_statements<C: Connection>(conn: &mut C) -> Arc<Mutex<Vec<String>>> {
        let cached = Arc::new(Mutex::new(Vec::new()));
        let seen = cached.clone();
        let on_event = move |event: InstrumentationEvent<'_>| {
            if let InstrumentationEvent::CacheQuery { sql, .. } = event {
                seen.lock().unwrap().push(sql.to_string());
            }
        };
        let instrumentation: Box<dyn Instrumentation> = Box::new(on_event);
        conn.set_instrumentation(instrumentation);
        cached
    }

    #[test]
    fn the_usage_changes_are_prepared_once_per_connection() {
        // The real schema; its foreign keys off, so that no users are
        // needed for the usage rows.
        let mut conn = SqliteConnection::establish(":memory:").unwrap();
        conn.run_pending_migrations(crate::db::SQLITE_MIGRATIONS)
            .unwrap();
        conn.batch_execute("PRAGMA foreign_keys = OFF").unwrap();
        let cached = cached_statements(&mut conn);
        for (user, tokens) in [("a", 10), ("a", 5), ("b", 7)] {
            AddUsage {
                user_id: user,
                period_start: 100,
                requests: 1,
                tokens,
                cost_usd: 0.5,
            }
            .execute(&mut conn)
            .unwrap();
        }
        // Refunds: to an existing row, and to none (changes nothing).
        for (user, tokens) in [("a", -3), ("c", -1), ("a", -2)] {
            Refund {
                user_id: user,
                period_start: 100,
                requests: 0,
                tokens,
                cost_usd: -0.25,
            }
            .execute(&mut conn)
            .unwrap();
        }
        let cached = cached.lock().unwrap().clone();
        assert_eq!(cached.len(), 2, "{cached:?}");
        assert!(cached[0].contains("ON CONFLICT"), "{cached:?}");
        assert!(cached[1].starts_with("UPDATE"), "{cached:?}");
        // And it adds up.
        assert_eq!(
            usage_rows!(conn),
            vec![("a".into(), 2, 10, 0.5), ("b".into(), 1, 7, 0.5)]
        );
    }

    #[test]
    fn the_batch_statement_is_cut_at_each_of_its_parameters_in_order() {
        let pieces = batch_sql_pieces();
        assert_eq!(pieces.len(), PARAMETERS + 1);
        // Put back together with diesel's placeholders, it is the text.
        let mut text = String::new();
        for (n, piece) in pieces.iter().enumerate() {
            text.push_str(piece);
            if n < PARAMETERS {
                text.push_str(&format!("${}", n + 1));
            }
        }
        assert_eq!(text, BATCH_SQL);
    }

    /// A fresh, migrated PostgreSQL database when `TEST_DATABASE_URL` is set.
    fn migrated_postgres() -> Option<crate::testing::TestDb> {
        let url = std::env::var("TEST_DATABASE_URL").ok()?;
        if url.trim().is_empty() {
            return None;
        }
        let test_db = crate::testing::TestDb::postgres(url.trim());
        Database::connect(&test_db.url, 1)
            .unwrap()
            .run_migrations()
            .unwrap();
        Some(test_db)
    }

    /// A connection to `db` whose foreign keys are not checked, so that no
    /// users are needed for the usage rows.
    fn unchecked(db: &crate::testing::TestDb) -> PgConnection {
        let mut conn = PgConnection::establish(&db.url).unwrap();
        conn.batch_execute("SET session_replication_role = replica")
            .unwrap();
        conn
    }

    /// PostgreSQL (`TEST_DATABASE_URL`): the batch statement is prepared
    /// once per connection, and what it writes adds up.
    #[test]
    fn the_postgres_batch_is_prepared_once_per_connection() {
        let Some(test_db) = migrated_postgres() else {
            return;
        };
        let mut conn = unchecked(&test_db);
        let cached = cached_statements(&mut conn);
        let a = ("a".to_string(), 100);
        let b = ("b".to_string(), 100);
        let c = ("c".to_string(), 100);
        for changes in [
            vec![(&a, &(1, 10, 0.5))],
            vec![(&b, &(1, 7, 0.5)), (&a, &(1, 5, 0.5))],
            // A refund to an existing row, and to none (changes nothing).
            vec![(&a, &(0, -3, -0.25)), (&c, &(0, -1, -0.25))],
        ] {
            record_in_one_statement(&mut conn, vec![], vec![], &changes).unwrap();
        }
        let cached = cached.lock().unwrap().clone();
        assert_eq!(cached.len(), 1, "{cached:?}");
        assert!(cached[0].contains("unnest"), "{cached:?}");
        assert_eq!(
            usage_rows!(conn),
            vec![("a".into(), 2, 12, 0.75), ("b".into(), 1, 7, 0.5)]
        );
    }

    /// PostgreSQL (`TEST_DATABASE_URL`): two writers (two replicas) whose
    /// batches change the same usage rows, given in opposite orders and
    /// mixing counts and refunds, wait for each other and never deadlock;
    /// every change is there.
    #[test]
    fn writers_changing_the_same_usage_rows_never_deadlock() {
        let Some(test_db) = migrated_postgres() else {
            return;
        };
        let connect = || unchecked(&test_db);
        const USERS: usize = 16;
        const BATCHES: usize = 60;
        let keys: Vec<(String, i64)> = (0..USERS).map(|u| (format!("u{u:02}"), 100)).collect();
        // Every row exists (refunds change only existing rows).
        let mut conn = connect();
        let start: Vec<Change> = keys.iter().map(|k| (k, &(1, 0, 0.0))).collect();
        record_in_one_statement(&mut conn, vec![], vec![], &start).unwrap();
        let keys = Arc::new(keys);
        let writers: Vec<_> = [false, true]
            .into_iter()
            .map(|reversed| {
                let (keys, mut conn) = (keys.clone(), connect());
                std::thread::spawn(move || {
                    let (count, refund) = ((1, 10, 1.0), (0, -1, -0.5));
                    for _ in 0..BATCHES {
                        // One writer counts the first half and refunds the
                        // second, low to high; the other the reverse, high
                        // to low.
                        let mut changes: Vec<Change> = keys
                            .iter()
                            .enumerate()
                            .map(|(i, k)| {
                                (
                                    k,
                                    if (i < USERS / 2) != reversed {
                                        &count
                                    } else {
                                        &refund
                                    },
                                )
                            })
                            .collect();
                        if reversed {
                            changes.reverse();
                        }
                        record_in_one_statement(&mut conn, vec![], vec![], &changes)?;
                    }
                    Ok::<_, diesel::result::Error>(())
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap().unwrap();
        }
        // Each row: counted by one writer and refunded by the other, every
        // batch.
        let b = BATCHES as i64;
        let expected: Vec<(String, i64, i64, f64)> = keys
            .iter()
            .map(|(u, _)| (u.clone(), 1 + b, 10 * b - b, b as f64 * 0.5))
            .collect();
        assert_eq!(usage_rows!(conn), expected);
    }
}
