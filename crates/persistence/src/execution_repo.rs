//! [`ExecutionRepository`] on diesel.

use diesel::prelude::*;
use muse_core::{Page, PageRequest};
use muse_prompts::{
    Execution, ExecutionFilter, ExecutionRepository, ExecutionScope, ExecutionSource,
    ExecutionStatus, ExecutionStoreError, ModelUsage,
};
use uuid::Uuid;

use crate::db::Database;
use crate::schema::executions;

#[derive(Debug, Clone)]
pub struct DieselExecutionRepository {
    db: Database,
}

impl DieselExecutionRepository {
    pub fn new(db: Database) -> Self {
        Self { db }
    }
}

fn other(e: diesel::result::Error) -> ExecutionStoreError {
    if crate::is_unavailable(&e) {
        return ExecutionStoreError::Unavailable(e.to_string());
    }
    ExecutionStoreError::Other(e.to_string())
}

#[derive(Queryable, Selectable, Insertable)]
#[diesel(table_name = executions)]
pub(crate) struct Row {
    pub(crate) id: String,
    pub(crate) user_id: String,
    pub(crate) source: String,
    pub(crate) prompt_id: Option<String>,
    pub(crate) prompt_version: Option<i32>,
    pub(crate) provider: String,
    pub(crate) model: String,
    pub(crate) variables: Option<String>,
    pub(crate) rendered_prompt: Option<String>,
    pub(crate) output: Option<String>,
    pub(crate) prompt_tokens: i32,
    pub(crate) completion_tokens: i32,
    pub(crate) cost_usd: Option<f64>,
    pub(crate) duration_ms: i64,
    pub(crate) ttft_ms: Option<i64>,
    pub(crate) status: String,
    pub(crate) error: Option<String>,
    pub(crate) created_at: i64,
}

impl Row {
    pub(crate) fn from_domain(e: &Execution) -> Self {
        Self {
            id: e.id.to_string(),
            user_id: e.user_id.to_string(),
            source: e.source.as_str().to_string(),
            prompt_id: e.prompt_id.map(|p| p.to_string()),
            prompt_version: e.prompt_version,
            provider: crate::storable(&e.provider).into_owned(),
            model: crate::storable(&e.model).into_owned(),
            variables: e.variables.as_ref().map(|v| v.to_string()),
            rendered_prompt: crate::storable_opt(&e.rendered_prompt),
            output: crate::storable_opt(&e.output),
            prompt_tokens: i32::try_from(e.prompt_tokens).unwrap_or(i32::MAX),
            completion_tokens: i32::try_from(e.completion_tokens).unwrap_or(i32::MAX),
            cost_usd: e.cost_usd,
            duration_ms: e.duration_ms,
            ttft_ms: e.ttft_ms,
            status: e.status.as_str().to_string(),
            error: crate::storable_opt(&e.error),
            created_at: e.created_at,
        }
    }

    fn into_domain(self) -> Result<Execution, ExecutionStoreError> {
        let bad = |what: &str| ExecutionStoreError::Other(format!("corrupt execution row: {what}"));
        Ok(Execution {
            id: Uuid::parse_str(&self.id).map_err(|_| bad("id"))?,
            user_id: Uuid::parse_str(&self.user_id).map_err(|_| bad("user_id"))?,
            source: ExecutionSource::parse(&self.source).ok_or_else(|| bad("source"))?,
            prompt_id: self
                .prompt_id
                .as_deref()
                .map(Uuid::parse_str)
                .transpose()
                .map_err(|_| bad("prompt_id"))?,
            prompt_version: self.prompt_version,
            provider: self.provider,
            model: self.model,
            variables: self.variables.and_then(|v| serde_json::from_str(&v).ok()),
            rendered_prompt: self.rendered_prompt,
            output: self.output,
            prompt_tokens: u32::try_from(self.prompt_tokens).unwrap_or(0),
            completion_tokens: u32::try_from(self.completion_tokens).unwrap_or(0),
            cost_usd: self.cost_usd,
            duration_ms: self.duration_ms,
            ttft_ms: self.ttft_ms,
            status: ExecutionStatus::parse(&self.status).ok_or_else(|| bad("status"))?,
            error: self.error,
            created_at: self.created_at,
        })
    }
}

impl ExecutionRepository for DieselExecutionRepository {
    fn record(&self, execution: &Execution) -> Result<(), ExecutionStoreError> {
        let row = Row::from_domain(execution);
        self.db
            .write(|conn| {
                diesel::insert_into(executions::table)
                    .values(row)
                    .execute(conn)
            })
            .map_err(|e| ExecutionStoreError::Unavailable(e.to_string()))?
            .map(|_| ())
            .map_err(other)
    }

    fn get(
        &self,
        scope: ExecutionScope,
        id: Uuid,
    ) -> Result<Option<Execution>, ExecutionStoreError> {
        let mut conn = self
            .db
            .get()
            .map_err(|e| ExecutionStoreError::Unavailable(e.to_string()))?;
        let mut q = executions::table.find(id.to_string()).into_boxed();
        if let ExecutionScope::User(user_id) = scope {
            q = q.filter(executions::user_id.eq(user_id.to_string()));
        }
        q.select(Row::as_select())
            .first(&mut *conn)
            .optional()
            .map_err(other)?
            .map(Row::into_domain)
            .transpose()
    }

    fn list(
        &self,
        scope: ExecutionScope,
        filter: &ExecutionFilter,
        page: PageRequest,
    ) -> Result<Page<Execution>, ExecutionStoreError> {
        let mut conn = self
            .db
            .get()
            .map_err(|e| ExecutionStoreError::Unavailable(e.to_string()))?;
        let query = || {
            let mut q = executions::table.into_boxed();
            if let ExecutionScope::User(user_id) = scope {
                q = q.filter(executions::user_id.eq(user_id.to_string()));
            }
            if let Some(p) = filter.prompt_id {
                q = q.filter(executions::prompt_id.eq(p.to_string()));
            }
            if let Some(s) = filter.status {
                q = q.filter(executions::status.eq(s.as_str()));
            }
            if let Some(p) = &filter.provider {
                q = q.filter(executions::provider.eq(p.clone()));
            }
            if let Some(m) = &filter.model {
                q = q.filter(executions::model.eq(m.clone()));
            }
            if let Some(from) = filter.from_ms {
                q = q.filter(executions::created_at.ge(from));
            }
            if let Some(to) = filter.to_ms {
                q = q.filter(executions::created_at.lt(to));
            }
            q
        };
        let total: i64 = query().count().get_result(&mut *conn).map_err(other)?;
        let items = query()
            .order((executions::created_at.desc(), executions::id.desc()))
            .offset(page.offset())
            .limit(page.limit())
            .select(Row::as_select())
            .load(&mut *conn)
            .map_err(other)?
            .into_iter()
            .map(Row::into_domain)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Page::new(items, page, u64::try_from(total).unwrap_or(0)))
    }

    fn usage(&self, from_ms: i64, to_ms: i64) -> Result<Vec<ModelUsage>, ExecutionStoreError> {
        use diesel::dsl::{count_star, sum};
        let mut conn = self
            .db
            .get()
            .map_err(|e| ExecutionStoreError::Unavailable(e.to_string()))?;
        type Group = (
            String,
            String,
            String,
            i64,
            Option<i64>,
            Option<i64>,
            Option<f64>,
        );
        let rows: Vec<Group> = executions::table
            .filter(executions::created_at.ge(from_ms))
            .filter(executions::created_at.lt(to_ms))
            .group_by((executions::provider, executions::model, executions::status))
            .select((
                executions::provider,
                executions::model,
                executions::status,
                count_star(),
                sum(executions::prompt_tokens),
                sum(executions::completion_tokens),
                sum(executions::cost_usd),
            ))
            .load(&mut *conn)
            .map_err(other)?;
        let mut out: Vec<ModelUsage> = Vec::new();
        for (provider, model, status, n, prompt, completion, cost) in rows {
            let idx = match out
                .iter()
                .position(|u| u.provider == provider && u.model == model)
            {
                Some(i) => i,
                None => {
                    out.push(ModelUsage {
                        provider,
                        model,
                        executions: 0,
                        succeeded: 0,
                        failed: 0,
                        cancelled: 0,
                        prompt_tokens: 0,
                        completion_tokens: 0,
                        cost_usd: 0.0,
                    });
                    out.len() - 1
                }
            };
            let u = &mut out[idx];
            let n = u64::try_from(n).unwrap_or(0);
            u.executions += n;
            match ExecutionStatus::parse(&status) {
                Some(ExecutionStatus::Succeeded) => u.succeeded += n,
                Some(ExecutionStatus::Failed) => u.failed += n,
                Some(ExecutionStatus::Cancelled) => u.cancelled += n,
                None => {}
            }
            u.prompt_tokens += u64::try_from(prompt.unwrap_or(0)).unwrap_or(0);
            u.completion_tokens += u64::try_from(completion.unwrap_or(0)).unwrap_or(0);
            u.cost_usd += cost.unwrap_or(0.0);
        }
        out.sort_by(|a, b| {
            b.executions
                .cmp(&a.executions)
                .then(a.provider.cmp(&b.provider))
                .then(a.model.cmp(&b.model))
        });
        Ok(out)
    }

    fn active_users(&self, from_ms: i64, to_ms: i64) -> Result<u64, ExecutionStoreError> {
        let mut conn = self
            .db
            .get()
            .map_err(|e| ExecutionStoreError::Unavailable(e.to_string()))?;
        let n: i64 = executions::table
            .filter(executions::created_at.ge(from_ms))
            .filter(executions::created_at.lt(to_ms))
            .select(diesel::dsl::count(executions::user_id).aggregate_distinct())
            .first(&mut *conn)
            .map_err(other)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}
