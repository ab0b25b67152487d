//! [`FlagRepository`] on diesel.

use diesel::prelude::*;
use muse_billing::{FeatureFlag, FlagRepository, FlagStoreError};
use uuid::Uuid;

use crate::db::Database;
use crate::schema::feature_flags;

#[derive(Debug, Clone)]
pub struct DieselFlagRepository {
    db: Database,
}

impl DieselFlagRepository {
    pub fn new(db: Database) -> Self {
        Self { db }
    }
}

fn other(e: diesel::result::Error) -> FlagStoreError {
    if crate::is_unavailable(&e) {
        return FlagStoreError::Unavailable(e.to_string());
    }
    FlagStoreError::Other(e.to_string())
}

#[derive(Queryable, Selectable, Insertable, AsChangeset)]
#[diesel(table_name = feature_flags, treat_none_as_null = true)]
struct Row {
    key: String,
    enabled: bool,
    rollout_percent: i32,
    allow_users: String,
    allow_plans: String,
    description: String,
    updated_by: Option<String>,
    updated_at: i64,
}

impl FlagRepository for DieselFlagRepository {
    fn list_flags(&self) -> Result<Vec<FeatureFlag>, FlagStoreError> {
        let mut conn = self
            .db
            .get()
            .map_err(|e| FlagStoreError::Unavailable(e.to_string()))?;
        let rows: Vec<Row> = feature_flags::table
            .select(Row::as_select())
            .order(feature_flags::key.asc())
            .load(&mut *conn)
            .map_err(other)?;
        rows.into_iter()
            .map(|r| {
                let bad = |w: &str| FlagStoreError::Other(format!("corrupt flag {}: {w}", r.key));
                Ok(FeatureFlag {
                    enabled: r.enabled,
                    rollout_percent: u8::try_from(r.rollout_percent.clamp(0, 100)).unwrap_or(100),
                    allow_users: serde_json::from_str(&r.allow_users)
                        .map_err(|_| bad("allow_users"))?,
                    allow_plans: serde_json::from_str(&r.allow_plans)
                        .map_err(|_| bad("allow_plans"))?,
                    description: r.description.clone(),
                    updated_by: r
                        .updated_by
                        .as_deref()
                        .map(Uuid::parse_str)
                        .transpose()
                        .map_err(|_| bad("updated_by"))?,
                    updated_at: r.updated_at,
                    key: r.key.clone(),
                })
            })
            .collect()
    }

    fn upsert_flag(&self, f: &FeatureFlag) -> Result<(), FlagStoreError> {
        let row = Row {
            key: f.key.clone(),
            enabled: f.enabled,
            rollout_percent: i32::from(f.rollout_percent),
            allow_users: serde_json::to_string(&f.allow_users).unwrap_or_else(|_| "[]".into()),
            allow_plans: serde_json::to_string(&f.allow_plans).unwrap_or_else(|_| "[]".into()),
            description: f.description.clone(),
            updated_by: f.updated_by.map(|u| u.to_string()),
            updated_at: f.updated_at,
        };
        let mut conn = self
            .db
            .get()
            .map_err(|e| FlagStoreError::Unavailable(e.to_string()))?;
        conn.transaction(|c| {
            let n = diesel::update(feature_flags::table.find(&row.key))
                .set(&row)
                .execute(c)?;
            if n == 0 {
                diesel::insert_into(feature_flags::table)
                    .values(&row)
                    .execute(c)?;
            }
            Ok(())
        })
        .map_err(other)
    }
}
