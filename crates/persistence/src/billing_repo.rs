//! [`BillingRepository`] on diesel.

use diesel::prelude::*;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use muse_billing::{
    BillingError, BillingEvent, BillingRepository, Plan, QuotaKind, Reservation, Subscription,
    SubscriptionStatus, Usage,
};
use muse_core::{Page, PageRequest};
use uuid::Uuid;

use crate::db::Database;
use crate::schema::{billing_events, plans, stripe_events, subscriptions, usage_counters};

#[derive(Debug, Clone)]
pub struct DieselBillingRepository {
    db: Database,
}

impl DieselBillingRepository {
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    fn conn(&self) -> Result<crate::db::PooledConn, BillingError> {
        self.db
            .get()
            .map_err(|e| BillingError::Unavailable(e.to_string()))
    }
}

fn other(e: DieselError) -> BillingError {
    if crate::is_unavailable(&e) {
        return BillingError::Unavailable(e.to_string());
    }
    BillingError::Other(e.to_string())
}

fn corrupt(what: &str) -> BillingError {
    BillingError::Other(format!("corrupt billing row: {what}"))
}

#[derive(Queryable, Selectable, Insertable, AsChangeset)]
#[diesel(table_name = plans, treat_none_as_null = true)]
struct PlanRow {
    id: String,
    name: String,
    price_cents: i64,
    currency: String,
    stripe_price_id: Option<String>,
    max_requests: Option<i64>,
    max_tokens: Option<i64>,
    max_cost_usd: Option<f64>,
    max_batch: i32,
    allowed_models: String,
    training_allowed: bool,
    active: bool,
    max_training_jobs: i32,
}

impl PlanRow {
    fn from_domain(p: &Plan) -> Self {
        Self {
            id: p.id.clone(),
            name: p.name.clone(),
            price_cents: p.price_cents,
            currency: p.currency.clone(),
            stripe_price_id: p.stripe_price_id.clone(),
            max_requests: p.max_requests,
            max_tokens: p.max_tokens,
            max_cost_usd: p.max_cost_usd,
            max_batch: p.max_batch,
            allowed_models: serde_json::to_string(&p.allowed_models)
                .unwrap_or_else(|_| "[]".into()),
            training_allowed: p.training_allowed,
            active: p.active,
            max_training_jobs: p.max_training_jobs,
        }
    }

    fn into_domain(self) -> Result<Plan, BillingError> {
        Ok(Plan {
            allowed_models: serde_json::from_str(&self.allowed_models)
                .map_err(|_| corrupt("allowed_models"))?,
            id: self.id,
            name: self.name,
            price_cents: self.price_cents,
            currency: self.currency,
            stripe_price_id: self.stripe_price_id,
            max_requests: self.max_requests,
            max_tokens: self.max_tokens,
            max_cost_usd: self.max_cost_usd,
            max_batch: self.max_batch,
            training_allowed: self.training_allowed,
            max_training_jobs: self.max_training_jobs,
            active: self.active,
        })
    }
}

#[derive(Queryable, Selectable, Insertable, AsChangeset)]
#[diesel(table_name = subscriptions, treat_none_as_null = true)]
struct SubRow {
    user_id: String,
    plan_id: String,
    status: String,
    cancel_at_period_end: bool,
    stripe_customer_id: Option<String>,
    stripe_subscription_id: Option<String>,
    current_period_end: Option<i64>,
    updated_at: i64,
    stripe_event_at: Option<i64>,
}

impl SubRow {
    fn into_domain(self) -> Result<Subscription, BillingError> {
        Ok(Subscription {
            user_id: Uuid::parse_str(&self.user_id).map_err(|_| corrupt("user_id"))?,
            status: SubscriptionStatus::parse(&self.status).ok_or_else(|| corrupt("status"))?,
            plan_id: self.plan_id,
            cancel_at_period_end: self.cancel_at_period_end,
            stripe_customer_id: self.stripe_customer_id,
            stripe_subscription_id: self.stripe_subscription_id,
            current_period_end: self.current_period_end,
            updated_at: self.updated_at,
            stripe_event_at: self.stripe_event_at,
        })
    }
}

#[derive(Queryable, Selectable, Insertable)]
#[diesel(table_name = billing_events)]
struct EventRow {
    id: String,
    user_id: String,
    kind: String,
    description: String,
    amount_cents: Option<i64>,
    currency: Option<String>,
    external_id: Option<String>,
    created_at: i64,
}

impl BillingRepository for DieselBillingRepository {
    fn plans(&self) -> Result<Vec<Plan>, BillingError> {
        let mut conn = self.conn()?;
        plans::table
            .order((plans::price_cents.asc(), plans::id.asc()))
            .select(PlanRow::as_select())
            .load(&mut *conn)
            .map_err(other)?
            .into_iter()
            .map(PlanRow::into_domain)
            .collect()
    }

    fn plan(&self, id: &str) -> Result<Option<Plan>, BillingError> {
        let mut conn = self.conn()?;
        plans::table
            .find(id)
            .select(PlanRow::as_select())
            .first(&mut *conn)
            .optional()
            .map_err(other)?
            .map(PlanRow::into_domain)
            .transpose()
    }

    fn upsert_plan(&self, p: &Plan, now: i64) -> Result<(), BillingError> {
        let row = PlanRow::from_domain(p);
        let mut conn = self.conn()?;
        conn.transaction(|c| {
            let n = diesel::update(plans::table.find(&row.id))
                .set((&row, plans::updated_at.eq(now)))
                .execute(c)?;
            if n == 0 {
                diesel::insert_into(plans::table)
                    .values((&row, plans::created_at.eq(now), plans::updated_at.eq(now)))
                    .execute(c)?;
            }
            Ok(())
        })
        .map_err(other)
    }

    fn subscription(&self, user_id: Uuid) -> Result<Option<Subscription>, BillingError> {
        let mut conn = self.conn()?;
        subscriptions::table
            .find(user_id.to_string())
            .select(SubRow::as_select())
            .first(&mut *conn)
            .optional()
            .map_err(other)?
            .map(SubRow::into_domain)
            .transpose()
    }

    fn subscription_by_customer(
        &self,
        customer_id: &str,
    ) -> Result<Option<Subscription>, BillingError> {
        let mut conn = self.conn()?;
        subscriptions::table
            .filter(subscriptions::stripe_customer_id.eq(customer_id))
            .select(SubRow::as_select())
            .first(&mut *conn)
            .optional()
            .map_err(other)?
            .map(SubRow::into_domain)
            .transpose()
    }

    fn plan_by_stripe_price(&self, price_id: &str) -> Result<Option<Plan>, BillingError> {
        let mut conn = self.conn()?;
        plans::table
            .filter(plans::stripe_price_id.eq(price_id))
            .select(PlanRow::as_select())
            .first(&mut *conn)
            .optional()
            .map_err(other)?
            .map(PlanRow::into_domain)
            .transpose()
    }

    fn stripe_event_seen(&self, id: &str) -> Result<bool, BillingError> {
        let mut conn = self.conn()?;
        let n: i64 = stripe_events::table
            .filter(stripe_events::id.eq(id))
            .count()
            .get_result(&mut *conn)
            .map_err(other)?;
        Ok(n > 0)
    }

    fn mark_stripe_event(
        &self,
        id: &str,
        kind: &str,
        created: i64,
        now: i64,
    ) -> Result<bool, BillingError> {
        let mut conn = self.conn()?;
        match diesel::insert_into(stripe_events::table)
            .values((
                stripe_events::id.eq(id),
                stripe_events::kind.eq(kind),
                stripe_events::created.eq(created),
                stripe_events::processed_at.eq(now),
            ))
            .execute(&mut *conn)
        {
            Ok(_) => Ok(true),
            Err(DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _)) => Ok(false),
            Err(e) => Err(other(e)),
        }
    }

    fn upsert_subscription(&self, s: &Subscription) -> Result<(), BillingError> {
        let row = SubRow {
            user_id: s.user_id.to_string(),
            plan_id: s.plan_id.clone(),
            status: s.status.as_str().to_string(),
            cancel_at_period_end: s.cancel_at_period_end,
            stripe_customer_id: s.stripe_customer_id.clone(),
            stripe_subscription_id: s.stripe_subscription_id.clone(),
            current_period_end: s.current_period_end,
            updated_at: s.updated_at,
            stripe_event_at: s.stripe_event_at,
        };
        let mut conn = self.conn()?;
        conn.transaction(|c| {
            let n = diesel::update(subscriptions::table.find(&row.user_id))
                .set(&row)
                .execute(c)?;
            if n == 0 {
                diesel::insert_into(subscriptions::table)
                    .values(&row)
                    .execute(c)?;
            }
            Ok(())
        })
        .map_err(|e: DieselError| match e {
            DieselError::DatabaseError(DatabaseErrorKind::ForeignKeyViolation, _) => {
                BillingError::UnknownPlan(s.plan_id.clone())
            }
            e => other(e),
        })
    }

    fn usage(&self, user_id: Uuid, period_start: i64) -> Result<Usage, BillingError> {
        let mut conn = self.conn()?;
        let row: Option<(i64, i64, f64)> = usage_counters::table
            .find((user_id.to_string(), period_start))
            .select((
                usage_counters::requests,
                usage_counters::tokens,
                usage_counters::cost_usd,
            ))
            .first(&mut *conn)
            .optional()
            .map_err(other)?;
        Ok(row
            .map(|(requests, tokens, cost_usd)| Usage {
                requests,
                tokens,
                cost_usd,
            })
            .unwrap_or_default())
    }

    fn reserve(
        &self,
        user_id: Uuid,
        period_start: i64,
        plan: &Plan,
        tokens: i64,
        cost_usd: f64,
    ) -> Result<Result<(), QuotaKind>, BillingError> {
        let uid = user_id.to_string();
        let result = self
            .db
            .write(|conn| -> Result<Result<(), QuotaKind>, DieselError> {
                // The period's row, once (a concurrent creator wins the race).
                match diesel::insert_into(usage_counters::table)
                    .values((
                        usage_counters::user_id.eq(&uid),
                        usage_counters::period_start.eq(period_start),
                    ))
                    .execute(conn)
                {
                    Ok(_)
                    | Err(DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _)) => {}
                    Err(e) => return Err(e),
                }
                // One conditional update: admitted only within every quota.
                let mut q = diesel::update(usage_counters::table)
                    .filter(usage_counters::user_id.eq(&uid))
                    .filter(usage_counters::period_start.eq(period_start))
                    .into_boxed();
                if let Some(max) = plan.max_requests {
                    q = q.filter(usage_counters::requests.lt(max));
                }
                if let Some(max) = plan.max_tokens {
                    q = q.filter(usage_counters::tokens.le(max - tokens));
                }
                if let Some(max) = plan.max_cost_usd {
                    q = q.filter(usage_counters::cost_usd.le(max - cost_usd));
                }
                let n = q
                    .set((
                        usage_counters::requests.eq(usage_counters::requests + 1),
                        usage_counters::tokens.eq(usage_counters::tokens + tokens),
                        usage_counters::cost_usd.eq(usage_counters::cost_usd + cost_usd),
                    ))
                    .execute(conn)?;
                if n == 1 {
                    return Ok(Ok(()));
                }
                let (requests, used_tokens, used_cost): (i64, i64, f64) = usage_counters::table
                    .find((&uid, period_start))
                    .select((
                        usage_counters::requests,
                        usage_counters::tokens,
                        usage_counters::cost_usd,
                    ))
                    .first(conn)?;
                let kind = if plan.max_requests.is_some_and(|m| requests >= m) {
                    QuotaKind::Requests
                } else if plan.max_tokens.is_some_and(|m| used_tokens + tokens > m) {
                    QuotaKind::Tokens
                } else if plan.max_cost_usd.is_some_and(|m| used_cost + cost_usd > m) {
                    QuotaKind::Cost
                } else {
                    QuotaKind::Requests
                };
                Ok(Err(kind))
            })
            .map_err(|e| BillingError::Unavailable(e.to_string()))?;
        result.map_err(other)
    }

    fn reconcile(
        &self,
        r: &Reservation,
        used_tokens: i64,
        used_cost_usd: f64,
    ) -> Result<(), BillingError> {
        let (dt, dc) = (used_tokens - r.tokens, used_cost_usd - r.cost_usd);
        let uid = r.user_id.to_string();
        self.db
            .write(|conn| {
                diesel::update(usage_counters::table.find((&uid, r.period_start)))
                    .set((
                        usage_counters::tokens.eq(usage_counters::tokens + dt),
                        usage_counters::cost_usd.eq(usage_counters::cost_usd + dc),
                    ))
                    .execute(conn)
            })
            .map_err(|e| BillingError::Unavailable(e.to_string()))?
            .map(|_| ())
            .map_err(other)
    }

    fn record_event(&self, e: &BillingEvent) -> Result<bool, BillingError> {
        let mut conn = self.conn()?;
        match diesel::insert_into(billing_events::table)
            .values(EventRow {
                id: e.id.to_string(),
                user_id: e.user_id.to_string(),
                kind: e.kind.clone(),
                description: e.description.clone(),
                amount_cents: e.amount_cents,
                currency: e.currency.clone(),
                external_id: e.external_id.clone(),
                created_at: e.created_at,
            })
            .execute(&mut *conn)
        {
            Ok(_) => Ok(true),
            Err(DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _)) => Ok(false),
            Err(err) => Err(other(err)),
        }
    }

    fn events(&self, user_id: Uuid, page: PageRequest) -> Result<Page<BillingEvent>, BillingError> {
        let mut conn = self.conn()?;
        let uid = user_id.to_string();
        let total: i64 = billing_events::table
            .filter(billing_events::user_id.eq(&uid))
            .count()
            .get_result(&mut *conn)
            .map_err(other)?;
        let items = billing_events::table
            .filter(billing_events::user_id.eq(&uid))
            .order((billing_events::created_at.desc(), billing_events::id.desc()))
            .offset(page.offset())
            .limit(page.limit())
            .select(EventRow::as_select())
            .load(&mut *conn)
            .map_err(other)?
            .into_iter()
            .map(|r| {
                Ok(BillingEvent {
                    id: Uuid::parse_str(&r.id).map_err(|_| corrupt("id"))?,
                    user_id,
                    kind: r.kind,
                    description: r.description,
                    amount_cents: r.amount_cents,
                    currency: r.currency,
                    external_id: r.external_id,
                    created_at: r.created_at,
                })
            })
            .collect::<Result<Vec<_>, BillingError>>()?;
        Ok(Page::new(items, page, u64::try_from(total).unwrap_or(0)))
    }
}
