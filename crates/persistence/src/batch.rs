//! Group commit: the records of many model calls written in one
//! transaction (their executions and ideas inserted, their quota
//! reservations reconciled), so that a busy server commits once per batch
//! instead of three times per call.

use std::collections::HashMap;

use diesel::prelude::*;
use diesel::upsert::excluded;
use muse_prompts::{CallRecord, CallStore, RecordError};

use crate::db::{Database, DbConnection, DbError};
use crate::execution_repo::Row;
use crate::library_repo::IdeaRow;
use crate::schema::{executions, ideas, usage_counters};

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
    let mut deltas: HashMap<(String, i64), (i64, i64, f64)> = HashMap::new();
    for u in batch.iter().filter_map(|c| c.usage.as_ref()) {
        let d = deltas
            .entry((u.user_id.to_string(), u.period_start))
            .or_default();
        d.0 += u.requests;
        d.1 += u.tokens;
        d.2 += u.cost_usd;
    }
    db.write(|conn| {
        conn.transaction::<_, diesel::result::Error, _>(|conn| {
            match conn {
                // One multi-row INSERT per batch.
                DbConnection::Pg(pg) => {
                    diesel::insert_into(executions::table)
                        .values(&rows)
                        .execute(pg)?;
                }
                // SQLite takes no multi-row INSERT with NULLs through
                // diesel: one statement per row, still one commit.
                DbConnection::Sqlite(_) => {
                    for row in &rows {
                        diesel::insert_into(executions::table)
                            .values(row)
                            .execute(conn)?;
                    }
                }
            }
            for row in &idea_rows {
                diesel::insert_into(ideas::table)
                    .values(row)
                    .execute(conn)?;
            }
            for ((uid, period), (dr, dt, dc)) in &deltas {
                if *dr > 0 {
                    // The period's row may not exist yet (counted in
                    // memory): created or added to in one statement (one
                    // round trip less per batch on PostgreSQL).
                    let row = (
                        usage_counters::user_id.eq(uid),
                        usage_counters::period_start.eq(*period),
                        usage_counters::requests.eq(*dr),
                        usage_counters::tokens.eq(*dt),
                        usage_counters::cost_usd.eq(*dc),
                    );
                    let add = (
                        usage_counters::requests
                            .eq(usage_counters::requests + excluded(usage_counters::requests)),
                        usage_counters::tokens
                            .eq(usage_counters::tokens + excluded(usage_counters::tokens)),
                        usage_counters::cost_usd
                            .eq(usage_counters::cost_usd + excluded(usage_counters::cost_usd)),
                    );
                    let key = (usage_counters::user_id, usage_counters::period_start);
                    match conn {
                        DbConnection::Pg(pg) => {
                            diesel::insert_into(usage_counters::table)
                                .values(row)
                                .on_conflict(key)
                                .do_update()
                                .set(add)
                                .execute(pg)?;
                        }
                        DbConnection::Sqlite(sqlite) => {
                            diesel::insert_into(usage_counters::table)
                                .values(row)
                                .on_conflict(key)
                                .do_update()
                                .set(add)
                                .execute(sqlite)?;
                        }
                    }
                    continue;
                }
                // No request to count (a refund of tokens or cost): only
                // an existing period's row changes.
                diesel::update(usage_counters::table.find((uid, *period)))
                    .set((
                        usage_counters::requests.eq(usage_counters::requests + *dr),
                        usage_counters::tokens.eq(usage_counters::tokens + *dt),
                        usage_counters::cost_usd.eq(usage_counters::cost_usd + *dc),
                    ))
                    .execute(conn)?;
            }
            Ok(())
        })
    })?
    .map_err(|e| {
        if crate::is_unavailable(&e) {
            DbError::Unavailable(e.to_string())
        } else {
            DbError::Rejected(e.to_string())
        }
    })
}
