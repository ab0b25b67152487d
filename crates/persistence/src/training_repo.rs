//! [`DatasetRepository`] and [`JobRepository`] on diesel. The job queue's
//! claim is `SELECT … FOR UPDATE SKIP LOCKED` on PostgreSQL, and a guarded
//! `UPDATE` (compare and set on the state and lease) on SQLite, whose
//! writers are serialised: either way one job goes to one worker.

use diesel::prelude::*;
use muse_core::{Page, PageRequest};
use muse_training::{
    Dataset, DatasetFormat, DatasetRepository, DatasetStoreError, JobFilter, JobRepository,
    JobState, JobStoreError, JobUpdate, Lease, Progress, StopOutcome, TrainingJob,
    ValidationReport,
};
use uuid::Uuid;

use crate::db::{Database, DbConnection};
use crate::schema::{datasets, training_jobs};

#[derive(Debug, Clone)]
pub struct DieselTrainingRepository {
    db: Database,
}

impl DieselTrainingRepository {
    pub fn new(db: Database) -> Self {
        Self { db }
    }
}

fn ds_err(e: diesel::result::Error) -> DatasetStoreError {
    if crate::is_unavailable(&e) {
        return DatasetStoreError::Unavailable(e.to_string());
    }
    DatasetStoreError::Other(e.to_string())
}

fn job_err(e: diesel::result::Error) -> JobStoreError {
    if crate::is_unavailable(&e) {
        return JobStoreError::Unavailable(e.to_string());
    }
    JobStoreError::Other(e.to_string())
}

#[derive(Queryable, Selectable, Insertable)]
#[diesel(table_name = datasets)]
struct DatasetRow {
    id: String,
    user_id: String,
    name: String,
    size_bytes: i64,
    format: Option<String>,
    row_count: i64,
    token_count: i64,
    report: String,
    estimated_cost_usd: Option<f64>,
    base_model: Option<String>,
    created_at: i64,
}

impl DatasetRow {
    fn from_domain(d: &Dataset) -> Self {
        Self {
            id: d.id.to_string(),
            user_id: d.user_id.to_string(),
            name: d.name.clone(),
            size_bytes: i64::try_from(d.size_bytes).unwrap_or(i64::MAX),
            format: d.report.format.map(|f| f.as_str().to_string()),
            row_count: i64::try_from(d.report.rows).unwrap_or(i64::MAX),
            token_count: i64::try_from(d.report.tokens).unwrap_or(i64::MAX),
            report: serde_json::to_string(&d.report).unwrap_or_else(|_| "{}".into()),
            estimated_cost_usd: d.estimated_cost_usd,
            base_model: d.base_model.clone(),
            created_at: d.created_at,
        }
    }

    fn into_domain(self) -> Result<Dataset, DatasetStoreError> {
        let bad = |w: &str| DatasetStoreError::Other(format!("corrupt dataset row: {w}"));
        let mut report: ValidationReport =
            serde_json::from_str(&self.report).map_err(|_| bad("report"))?;
        report.format = self.format.as_deref().and_then(DatasetFormat::parse);
        Ok(Dataset {
            id: Uuid::parse_str(&self.id).map_err(|_| bad("id"))?,
            user_id: Uuid::parse_str(&self.user_id).map_err(|_| bad("user_id"))?,
            name: self.name,
            size_bytes: u64::try_from(self.size_bytes).unwrap_or(0),
            report,
            estimated_cost_usd: self.estimated_cost_usd,
            base_model: self.base_model,
            created_at: self.created_at,
        })
    }
}

#[derive(Queryable, Selectable, Insertable)]
#[diesel(table_name = training_jobs)]
struct JobRow {
    id: String,
    user_id: String,
    dataset_id: String,
    base_model: String,
    trainer: String,
    hyperparameters: String,
    suffix: Option<String>,
    state: String,
    progress: String,
    error: Option<String>,
    result_model: Option<String>,
    provider_job_id: Option<String>,
    cancel_requested: bool,
    worker_id: Option<String>,
    lease_until: Option<i64>,
    attempts: i32,
    created_at: i64,
    started_at: Option<i64>,
    finished_at: Option<i64>,
    updated_at: i64,
}

impl JobRow {
    fn from_domain(j: &TrainingJob) -> Self {
        Self {
            id: j.id.to_string(),
            user_id: j.user_id.to_string(),
            dataset_id: j.dataset_id.to_string(),
            base_model: j.base_model.clone(),
            trainer: j.trainer.clone(),
            hyperparameters: j.hyperparameters.to_string(),
            suffix: j.suffix.clone(),
            state: j.state.as_str().to_string(),
            progress: progress_json(&j.progress),
            error: j.error.clone(),
            result_model: j.result_model.clone(),
            provider_job_id: j.provider_job_id.clone(),
            cancel_requested: j.cancel_requested,
            worker_id: j.worker_id.clone(),
            lease_until: j.lease_until,
            attempts: j.attempts,
            created_at: j.created_at,
            started_at: j.started_at,
            finished_at: j.finished_at,
            updated_at: j.updated_at,
        }
    }

    fn into_domain(self) -> Result<TrainingJob, JobStoreError> {
        let bad = |w: &str| JobStoreError::Other(format!("corrupt training job row: {w}"));
        Ok(TrainingJob {
            id: Uuid::parse_str(&self.id).map_err(|_| bad("id"))?,
            user_id: Uuid::parse_str(&self.user_id).map_err(|_| bad("user_id"))?,
            dataset_id: Uuid::parse_str(&self.dataset_id).map_err(|_| bad("dataset_id"))?,
            base_model: self.base_model,
            trainer: self.trainer,
            hyperparameters: serde_json::from_str(&self.hyperparameters)
                .map_err(|_| bad("hyperparameters"))?,
            suffix: self.suffix,
            state: JobState::parse(&self.state).ok_or_else(|| bad("state"))?,
            progress: serde_json::from_str(&self.progress).map_err(|_| bad("progress"))?,
            error: self.error,
            result_model: self.result_model,
            provider_job_id: self.provider_job_id,
            cancel_requested: self.cancel_requested,
            worker_id: self.worker_id,
            lease_until: self.lease_until,
            attempts: self.attempts,
            created_at: self.created_at,
            started_at: self.started_at,
            finished_at: self.finished_at,
            updated_at: self.updated_at,
        })
    }
}

fn progress_json(p: &Progress) -> String {
    serde_json::to_string(p).unwrap_or_else(|_| "{}".into())
}

const ACTIVE: [&str; 2] = ["validating", "running"];
const UNFINISHED: [&str; 3] = ["queued", "validating", "running"];

impl DatasetRepository for DieselTrainingRepository {
    fn insert(&self, d: &Dataset) -> Result<(), DatasetStoreError> {
        let row = DatasetRow::from_domain(d);
        let mut conn = self
            .db
            .get()
            .map_err(|e| DatasetStoreError::Unavailable(e.to_string()))?;
        diesel::insert_into(datasets::table)
            .values(row)
            .execute(&mut *conn)
            .map(|_| ())
            .map_err(ds_err)
    }

    fn get(&self, user_id: Uuid, id: Uuid) -> Result<Option<Dataset>, DatasetStoreError> {
        let mut conn = self
            .db
            .get()
            .map_err(|e| DatasetStoreError::Unavailable(e.to_string()))?;
        datasets::table
            .find(id.to_string())
            .filter(datasets::user_id.eq(user_id.to_string()))
            .select(DatasetRow::as_select())
            .first(&mut *conn)
            .optional()
            .map_err(ds_err)?
            .map(DatasetRow::into_domain)
            .transpose()
    }

    fn list(&self, user_id: Uuid, page: PageRequest) -> Result<Page<Dataset>, DatasetStoreError> {
        let mut conn = self
            .db
            .get()
            .map_err(|e| DatasetStoreError::Unavailable(e.to_string()))?;
        let uid = user_id.to_string();
        let total: i64 = datasets::table
            .filter(datasets::user_id.eq(&uid))
            .count()
            .get_result(&mut *conn)
            .map_err(ds_err)?;
        let rows: Vec<DatasetRow> = datasets::table
            .filter(datasets::user_id.eq(&uid))
            .order((datasets::created_at.desc(), datasets::id.desc()))
            .offset(page.offset())
            .limit(page.limit())
            .select(DatasetRow::as_select())
            .load(&mut *conn)
            .map_err(ds_err)?;
        let items = rows
            .into_iter()
            .map(DatasetRow::into_domain)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Page::new(items, page, u64::try_from(total).unwrap_or(0)))
    }

    fn delete(&self, user_id: Uuid, id: Uuid) -> Result<bool, DatasetStoreError> {
        let mut conn = self
            .db
            .get()
            .map_err(|e| DatasetStoreError::Unavailable(e.to_string()))?;
        diesel::delete(
            datasets::table
                .find(id.to_string())
                .filter(datasets::user_id.eq(user_id.to_string())),
        )
        .execute(&mut *conn)
        .map(|n| n > 0)
        .map_err(ds_err)
    }

    fn total_bytes(&self, user_id: Uuid) -> Result<u64, DatasetStoreError> {
        let mut conn = self
            .db
            .get()
            .map_err(|e| DatasetStoreError::Unavailable(e.to_string()))?;
        // Summed here: SUM(BIGINT) is NUMERIC on PostgreSQL.
        let sizes: Vec<i64> = datasets::table
            .filter(datasets::user_id.eq(user_id.to_string()))
            .select(datasets::size_bytes)
            .load(&mut *conn)
            .map_err(ds_err)?;
        Ok(sizes
            .into_iter()
            .map(|s| u64::try_from(s).unwrap_or(0))
            .sum())
    }
}

impl DieselTrainingRepository {
    fn conn(&self) -> Result<crate::db::PooledConn, JobStoreError> {
        self.db
            .get()
            .map_err(|e| JobStoreError::Unavailable(e.to_string()))
    }

    fn load_job(
        conn: &mut DbConnection,
        user_id: Option<Uuid>,
        id: Uuid,
    ) -> Result<Option<TrainingJob>, JobStoreError> {
        let mut q = training_jobs::table.find(id.to_string()).into_boxed();
        if let Some(u) = user_id {
            q = q.filter(training_jobs::user_id.eq(u.to_string()));
        }
        q.select(JobRow::as_select())
            .first(conn)
            .optional()
            .map_err(job_err)?
            .map(JobRow::into_domain)
            .transpose()
    }
}

/// `state = 'queued' OR (state IN ('validating', 'running') AND lease_until < now)`
/// for one of `trainers`: what a worker may claim.
macro_rules! claimable {
    ($trainers:expr, $now:expr) => {
        training_jobs::trainer.eq_any($trainers).and(
            training_jobs::state.eq("queued").or(training_jobs::state
                .eq_any(ACTIVE)
                .and(training_jobs::lease_until.lt($now))),
        )
    };
}

impl JobRepository for DieselTrainingRepository {
    fn insert_job(&self, job: &TrainingJob) -> Result<(), JobStoreError> {
        let row = JobRow::from_domain(job);
        let mut conn = self.conn()?;
        diesel::insert_into(training_jobs::table)
            .values(row)
            .execute(&mut *conn)
            .map(|_| ())
            .map_err(job_err)
    }

    fn job(&self, user_id: Option<Uuid>, id: Uuid) -> Result<Option<TrainingJob>, JobStoreError> {
        let mut conn = self.conn()?;
        Self::load_job(&mut conn, user_id, id)
    }

    fn jobs(
        &self,
        user_id: Option<Uuid>,
        filter: &JobFilter,
        page: PageRequest,
    ) -> Result<Page<TrainingJob>, JobStoreError> {
        let mut conn = self.conn()?;
        let query = || {
            let mut q = training_jobs::table.into_boxed();
            if let Some(u) = user_id {
                q = q.filter(training_jobs::user_id.eq(u.to_string()));
            }
            if let Some(s) = filter.state {
                q = q.filter(training_jobs::state.eq(s.as_str()));
            }
            if let Some(d) = filter.dataset_id {
                q = q.filter(training_jobs::dataset_id.eq(d.to_string()));
            }
            q
        };
        let total: i64 = query().count().get_result(&mut *conn).map_err(job_err)?;
        let rows: Vec<JobRow> = query()
            .order((training_jobs::created_at.desc(), training_jobs::id.desc()))
            .offset(page.offset())
            .limit(page.limit())
            .select(JobRow::as_select())
            .load(&mut *conn)
            .map_err(job_err)?;
        let items = rows
            .into_iter()
            .map(JobRow::into_domain)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Page::new(items, page, u64::try_from(total).unwrap_or(0)))
    }

    fn unfinished_jobs(&self, user_id: Uuid) -> Result<u64, JobStoreError> {
        let mut conn = self.conn()?;
        let n: i64 = training_jobs::table
            .filter(training_jobs::user_id.eq(user_id.to_string()))
            .filter(training_jobs::state.eq_any(UNFINISHED))
            .count()
            .get_result(&mut *conn)
            .map_err(job_err)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    fn jobs_using_dataset(&self, dataset_id: Uuid) -> Result<u64, JobStoreError> {
        let mut conn = self.conn()?;
        let n: i64 = training_jobs::table
            .filter(training_jobs::dataset_id.eq(dataset_id.to_string()))
            .filter(training_jobs::state.eq_any(UNFINISHED))
            .count()
            .get_result(&mut *conn)
            .map_err(job_err)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    fn claim(
        &self,
        worker_id: &str,
        trainers: &[String],
        now: i64,
        lease_ms: i64,
    ) -> Result<Option<TrainingJob>, JobStoreError> {
        if trainers.is_empty() {
            return Ok(None);
        }
        let lease_until = now.saturating_add(lease_ms);
        let mut conn = self.conn()?;
        let take = |c: &mut DbConnection, row: &JobRow| {
            // A queued job becomes validating as it is taken; a recovered
            // one keeps its state (the worker decides what to do with it).
            let state = if row.state == "queued" {
                "validating"
            } else {
                row.state.as_str()
            };
            diesel::update(
                training_jobs::table
                    .find(&row.id)
                    .filter(claimable!(trainers, now)),
            )
            .set((
                training_jobs::worker_id.eq(worker_id),
                training_jobs::lease_until.eq(lease_until),
                training_jobs::attempts.eq(training_jobs::attempts + 1),
                training_jobs::state.eq(state),
                training_jobs::started_at.eq(row.started_at.unwrap_or(now)),
                training_jobs::updated_at.eq(now.max(row.updated_at + 1)),
            ))
            .execute(c)
        };
        match &mut *conn {
            DbConnection::Pg(_) => conn
                .transaction(|c| {
                    // The oldest claimable job that no other worker is
                    // looking at (their rows are skipped, not waited for).
                    let c: &mut DbConnection = c;
                    let DbConnection::Pg(pg) = &mut *c else {
                        return Err(diesel::result::Error::BrokenTransactionManager);
                    };
                    let row: Option<JobRow> = training_jobs::table
                        .filter(claimable!(trainers, now))
                        .order((training_jobs::created_at.asc(), training_jobs::id.asc()))
                        .for_update()
                        .skip_locked()
                        .select(JobRow::as_select())
                        .first(pg)
                        .optional()?;
                    let Some(row) = row else { return Ok(None) };
                    take(c, &row)?;
                    Ok(Some(row))
                })
                .map_err(job_err)?
                .map(JobRow::into_domain)
                .transpose(),
            DbConnection::Sqlite(_) => {
                drop(conn);
                // Candidates are read, then taken with a guarded update that
                // only one writer can win; a loser tries the next candidate.
                for _ in 0..5 {
                    let candidates: Vec<JobRow> = self
                        .db
                        .write(|c| {
                            training_jobs::table
                                .filter(claimable!(trainers, now))
                                .order((training_jobs::created_at.asc(), training_jobs::id.asc()))
                                .limit(8)
                                .select(JobRow::as_select())
                                .load(c)
                        })
                        .map_err(|e| JobStoreError::Unavailable(e.to_string()))?
                        .map_err(job_err)?;
                    if candidates.is_empty() {
                        return Ok(None);
                    }
                    for row in candidates {
                        let n = self
                            .db
                            .write(|c| take(c, &row))
                            .map_err(|e| JobStoreError::Unavailable(e.to_string()))?
                            .map_err(job_err)?;
                        if n == 1 {
                            return row.into_domain().map(Some);
                        }
                    }
                }
                Ok(None)
            }
        }
    }

    fn heartbeat(
        &self,
        id: Uuid,
        worker_id: &str,
        now: i64,
        lease_ms: i64,
    ) -> Result<Lease, JobStoreError> {
        let id = id.to_string();
        self.db
            .write(|c| {
                let n = diesel::update(
                    training_jobs::table
                        .find(&id)
                        .filter(training_jobs::worker_id.eq(worker_id))
                        .filter(training_jobs::state.eq_any(ACTIVE)),
                )
                .set(training_jobs::lease_until.eq(now.saturating_add(lease_ms)))
                .execute(c)?;
                if n == 0 {
                    return Ok(Lease::Lost);
                }
                let cancel: bool = training_jobs::table
                    .find(&id)
                    .select(training_jobs::cancel_requested)
                    .first(c)?;
                Ok(Lease::Held { cancel })
            })
            .map_err(|e| JobStoreError::Unavailable(e.to_string()))?
            .map_err(job_err)
    }

    fn update_job(
        &self,
        id: Uuid,
        worker_id: &str,
        u: &JobUpdate,
        now: i64,
    ) -> Result<bool, JobStoreError> {
        let id = id.to_string();
        let terminal = u.state.is_terminal();
        self.db
            .write(|c| {
                let target = training_jobs::table
                    .find(&id)
                    .filter(training_jobs::worker_id.eq(worker_id))
                    .filter(training_jobs::state.eq_any(ACTIVE));
                let fields = (
                    training_jobs::state.eq(u.state.as_str()),
                    training_jobs::progress.eq(progress_json(&u.progress)),
                    training_jobs::provider_job_id.eq(&u.provider_job_id),
                    training_jobs::error.eq(&u.error),
                    training_jobs::result_model.eq(&u.result_model),
                    training_jobs::updated_at.eq(now),
                );
                let n = if terminal {
                    diesel::update(target)
                        .set((
                            fields,
                            training_jobs::finished_at.eq(Some(now)),
                            training_jobs::worker_id.eq(None::<String>),
                            training_jobs::lease_until.eq(None::<i64>),
                        ))
                        .execute(c)?
                } else {
                    diesel::update(target).set(fields).execute(c)?
                };
                Ok(n == 1)
            })
            .map_err(|e| JobStoreError::Unavailable(e.to_string()))?
            .map_err(job_err)
    }

    fn request_stop(
        &self,
        user_id: Uuid,
        id: Uuid,
        now: i64,
    ) -> Result<StopOutcome, JobStoreError> {
        let sid = id.to_string();
        self.db
            .write(|c| {
                for _ in 0..3 {
                    let Some(job) = Self::load_job(c, Some(user_id), id)? else {
                        return Ok(StopOutcome::NotFound);
                    };
                    if job.state.is_terminal() {
                        return Ok(StopOutcome::AlreadyEnded(job));
                    }
                    let updated_at = now.max(job.updated_at + 1);
                    if job.state == JobState::Queued {
                        let n = diesel::update(
                            training_jobs::table
                                .find(&sid)
                                .filter(training_jobs::state.eq("queued")),
                        )
                        .set((
                            training_jobs::state.eq("cancelled"),
                            training_jobs::cancel_requested.eq(true),
                            training_jobs::finished_at.eq(Some(now)),
                            training_jobs::updated_at.eq(updated_at),
                        ))
                        .execute(c)
                        .map_err(job_err)?;
                        if n == 1 {
                            return Ok(StopOutcome::Cancelled(TrainingJob {
                                state: JobState::Cancelled,
                                cancel_requested: true,
                                finished_at: Some(now),
                                updated_at,
                                ..job
                            }));
                        }
                        continue; // claimed meanwhile: flag it instead
                    }
                    let n = diesel::update(
                        training_jobs::table
                            .find(&sid)
                            .filter(training_jobs::state.eq_any(ACTIVE)),
                    )
                    .set((
                        training_jobs::cancel_requested.eq(true),
                        training_jobs::updated_at.eq(updated_at),
                    ))
                    .execute(c)
                    .map_err(job_err)?;
                    if n == 1 {
                        return Ok(StopOutcome::Requested(TrainingJob {
                            cancel_requested: true,
                            updated_at,
                            ..job
                        }));
                    }
                }
                Err(JobStoreError::Other(
                    "the job kept changing while it was being stopped".into(),
                ))
            })
            .map_err(|e| JobStoreError::Unavailable(e.to_string()))?
    }

    fn changed_since(&self, since: i64, limit: i64) -> Result<Vec<TrainingJob>, JobStoreError> {
        let mut conn = self.conn()?;
        let rows: Vec<JobRow> = training_jobs::table
            .filter(training_jobs::updated_at.ge(since))
            .order(training_jobs::updated_at.asc())
            .limit(limit)
            .select(JobRow::as_select())
            .load(&mut *conn)
            .map_err(job_err)?;
        rows.into_iter().map(JobRow::into_domain).collect()
    }

    fn trained_models(&self) -> Result<Vec<TrainingJob>, JobStoreError> {
        let mut conn = self.conn()?;
        let rows: Vec<JobRow> = training_jobs::table
            .filter(training_jobs::state.eq("succeeded"))
            .filter(training_jobs::result_model.is_not_null())
            .order(training_jobs::created_at.asc())
            .select(JobRow::as_select())
            .load(&mut *conn)
            .map_err(job_err)?;
        rows.into_iter().map(JobRow::into_domain).collect()
    }

    fn count_by_state(&self) -> Result<Vec<(JobState, u64)>, JobStoreError> {
        let mut conn = self.conn()?;
        let rows: Vec<(String, i64)> = training_jobs::table
            .group_by(training_jobs::state)
            .select((training_jobs::state, diesel::dsl::count_star()))
            .load(&mut *conn)
            .map_err(job_err)?;
        Ok(rows
            .into_iter()
            .filter_map(|(s, n)| Some((JobState::parse(&s)?, u64::try_from(n).unwrap_or(0))))
            .collect())
    }
}
