//! Group commit: the records of many model calls written in one
//! transaction (their executions and ideas inserted, their quota
//! reservations reconciled), so that a busy server commits once per batch
//! instead of three times per call.

use std::collections::HashMap;

use diesel::prelude::*;
use muse_billing::Reservation;
use muse_prompts::{Execution, Idea};

use crate::db::{Database, DbConnection, DbError};
use crate::execution_repo::Row;
use crate::library_repo::IdeaRow;
use crate::schema::{executions, ideas, usage_counters};

/// What one finished call leaves behind.
#[derive(Debug, Clone)]
pub struct CallRecord {
    pub execution: Execution,
    /// The idea it produced (idea generations that succeeded).
    pub idea: Option<Idea>,
    /// Its reservation and what it really used (tokens, cost).
    pub settle: Option<(Reservation, i64, f64)>,
    /// Whether the reservation was already counted in the database (its
    /// conditional `UPDATE`): then only the difference is written. A
    /// reservation counted in memory writes the whole usage: one request,
    /// its tokens and its cost.
    pub reserved_in_db: bool,
}

/// Writes `batch` in one transaction: every execution and idea inserted,
/// every reservation replaced by what its call used (summed per user and
/// period: one `UPDATE` each). All or nothing.
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
    for c in batch {
        if let Some((r, used_tokens, used_cost)) = &c.settle {
            let d = deltas
                .entry((r.user_id.to_string(), r.period_start))
                .or_default();
            if c.reserved_in_db {
                d.1 += used_tokens - r.tokens;
                d.2 += used_cost - r.cost_usd;
            } else {
                d.0 += 1;
                d.1 += used_tokens;
                d.2 += used_cost;
            }
        }
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
                    // The period's row may not exist yet (counted in memory).
                    let row = (
                        usage_counters::user_id.eq(uid),
                        usage_counters::period_start.eq(*period),
                    );
                    match conn {
                        DbConnection::Pg(pg) => {
                            diesel::insert_into(usage_counters::table)
                                .values(row)
                                .on_conflict_do_nothing()
                                .execute(pg)?;
                        }
                        DbConnection::Sqlite(sqlite) => {
                            diesel::insert_or_ignore_into(usage_counters::table)
                                .values(row)
                                .execute(sqlite)?;
                        }
                    }
                }
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
