//! [`AuthRepository`] on diesel.

use diesel::prelude::*;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use muse_auth::*;
use muse_core::{Page, PageRequest};
use uuid::Uuid;

use crate::db::{Database, DbError};
use crate::schema::{
    api_keys, audit_events, email_tokens, refresh_tokens, sessions, stream_tickets, users,
};

/// Accounts storage on SQLite or PostgreSQL.
#[derive(Debug, Clone)]
pub struct DieselAuthRepository {
    db: Database,
}

impl DieselAuthRepository {
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    fn conn(&self) -> RepoResult<crate::db::PooledConn> {
        self.db
            .get()
            .map_err(|e| RepoError::Unavailable(e.to_string()))
    }
}

fn map_err(e: DieselError) -> RepoError {
    if crate::is_unavailable(&e) {
        return RepoError::Unavailable(e.to_string());
    }
    match e {
        DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, info) => {
            let what = info
                .constraint_name()
                .map(str::to_string)
                .unwrap_or_else(|| info.message().to_string());
            RepoError::Conflict(what)
        }
        DieselError::DatabaseError(DatabaseErrorKind::ClosedConnection, info) => {
            RepoError::Unavailable(info.message().to_string())
        }
        other => RepoError::Other(other.to_string()),
    }
}

impl From<DbError> for RepoError {
    fn from(e: DbError) -> Self {
        RepoError::Unavailable(e.to_string())
    }
}

fn uuid(s: &str) -> RepoResult<Uuid> {
    Uuid::parse_str(s).map_err(|_| RepoError::Corrupt(format!("bad uuid {s:?}")))
}

#[derive(Queryable, Selectable, Insertable)]
#[diesel(table_name = users)]
struct UserRow {
    id: String,
    email: String,
    username: String,
    password_hash: String,
    role: String,
    status: String,
    email_verified_at: Option<i64>,
    created_at: i64,
    updated_at: i64,
}

impl UserRow {
    fn from_domain(u: &User) -> Self {
        Self {
            id: u.id.to_string(),
            email: u.email.clone(),
            username: u.username.clone(),
            password_hash: u.password_hash.clone(),
            role: u.role.as_str().to_string(),
            status: u.status.as_str().to_string(),
            email_verified_at: u.email_verified_at,
            created_at: u.created_at,
            updated_at: u.updated_at,
        }
    }

    fn into_domain(self) -> RepoResult<User> {
        Ok(User {
            id: uuid(&self.id)?,
            role: Role::parse(&self.role)
                .ok_or_else(|| RepoError::Corrupt(format!("role {:?}", self.role)))?,
            status: UserStatus::parse(&self.status)
                .ok_or_else(|| RepoError::Corrupt(format!("status {:?}", self.status)))?,
            email: self.email,
            username: self.username,
            password_hash: self.password_hash,
            email_verified_at: self.email_verified_at,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

#[derive(Queryable, Selectable, Insertable)]
#[diesel(table_name = sessions)]
struct SessionRow {
    id: String,
    user_id: String,
    created_at: i64,
    expires_at: i64,
    revoked_at: Option<i64>,
    revoked_reason: Option<String>,
    ip: Option<String>,
    user_agent: Option<String>,
}

impl SessionRow {
    fn from_domain(s: &Session) -> Self {
        Self {
            id: s.id.to_string(),
            user_id: s.user_id.to_string(),
            created_at: s.created_at,
            expires_at: s.expires_at,
            revoked_at: s.revoked_at,
            revoked_reason: s.revoked_reason.clone(),
            ip: s.ip.clone(),
            user_agent: s.user_agent.clone(),
        }
    }

    fn into_domain(self) -> RepoResult<Session> {
        Ok(Session {
            id: uuid(&self.id)?,
            user_id: uuid(&self.user_id)?,
            created_at: self.created_at,
            expires_at: self.expires_at,
            revoked_at: self.revoked_at,
            revoked_reason: self.revoked_reason,
            ip: self.ip,
            user_agent: self.user_agent,
        })
    }
}

#[derive(Queryable, Selectable, Insertable)]
#[diesel(table_name = refresh_tokens)]
struct RefreshRow {
    id: String,
    session_id: String,
    token_hash: String,
    created_at: i64,
    expires_at: i64,
    used_at: Option<i64>,
}

impl RefreshRow {
    fn from_domain(t: &RefreshToken) -> Self {
        Self {
            id: t.id.to_string(),
            session_id: t.session_id.to_string(),
            token_hash: t.token_hash.clone(),
            created_at: t.created_at,
            expires_at: t.expires_at,
            used_at: t.used_at,
        }
    }

    fn into_domain(self) -> RepoResult<RefreshToken> {
        Ok(RefreshToken {
            id: uuid(&self.id)?,
            session_id: uuid(&self.session_id)?,
            token_hash: self.token_hash,
            created_at: self.created_at,
            expires_at: self.expires_at,
            used_at: self.used_at,
        })
    }
}

#[derive(Queryable, Selectable, Insertable)]
#[diesel(table_name = api_keys)]
struct ApiKeyRow {
    id: String,
    user_id: String,
    name: String,
    prefix: String,
    key_hash: String,
    created_at: i64,
    expires_at: Option<i64>,
    last_used_at: Option<i64>,
    revoked_at: Option<i64>,
}

impl ApiKeyRow {
    fn from_domain(k: &ApiKey) -> Self {
        Self {
            id: k.id.to_string(),
            user_id: k.user_id.to_string(),
            name: k.name.clone(),
            prefix: k.prefix.clone(),
            key_hash: k.key_hash.clone(),
            created_at: k.created_at,
            expires_at: k.expires_at,
            last_used_at: k.last_used_at,
            revoked_at: k.revoked_at,
        }
    }

    fn into_domain(self) -> RepoResult<ApiKey> {
        Ok(ApiKey {
            id: uuid(&self.id)?,
            user_id: uuid(&self.user_id)?,
            name: self.name,
            prefix: self.prefix,
            key_hash: self.key_hash,
            created_at: self.created_at,
            expires_at: self.expires_at,
            last_used_at: self.last_used_at,
            revoked_at: self.revoked_at,
        })
    }
}

#[derive(Queryable, Selectable, Insertable)]
#[diesel(table_name = email_tokens)]
struct EmailTokenRow {
    id: String,
    user_id: String,
    purpose: String,
    token_hash: String,
    created_at: i64,
    expires_at: i64,
    used_at: Option<i64>,
}

impl EmailTokenRow {
    fn into_domain(self) -> RepoResult<EmailToken> {
        Ok(EmailToken {
            id: uuid(&self.id)?,
            user_id: uuid(&self.user_id)?,
            purpose: EmailTokenPurpose::parse(&self.purpose)
                .ok_or_else(|| RepoError::Corrupt(format!("purpose {:?}", self.purpose)))?,
            token_hash: self.token_hash,
            created_at: self.created_at,
            expires_at: self.expires_at,
            used_at: self.used_at,
        })
    }
}

#[derive(Queryable, Selectable, Insertable)]
#[diesel(table_name = audit_events)]
struct AuditRow {
    id: String,
    user_id: Option<String>,
    event: String,
    subject: Option<String>,
    ip: Option<String>,
    detail: Option<String>,
    created_at: i64,
}

impl AuditRow {
    fn into_domain(self) -> RepoResult<AuditEvent> {
        Ok(AuditEvent {
            id: uuid(&self.id)?,
            user_id: self.user_id.as_deref().map(uuid).transpose()?,
            event: self.event,
            subject: self.subject,
            ip: self.ip,
            detail: self.detail.and_then(|d| serde_json::from_str(&d).ok()),
            created_at: self.created_at,
        })
    }
}

impl AuthRepository for DieselAuthRepository {
    fn ping(&self) -> RepoResult<()> {
        self.db
            .ping()
            .map_err(|e| RepoError::Unavailable(e.to_string()))
    }

    fn create_user(&self, user: &User) -> RepoResult<()> {
        let mut conn = self.conn()?;
        diesel::insert_into(users::table)
            .values(UserRow::from_domain(user))
            .execute(&mut *conn)
            .map(|_| ())
            .map_err(map_err)
    }

    fn user_by_id(&self, id: Uuid) -> RepoResult<Option<User>> {
        let mut conn = self.conn()?;
        users::table
            .find(id.to_string())
            .select(UserRow::as_select())
            .first(&mut *conn)
            .optional()
            .map_err(map_err)?
            .map(UserRow::into_domain)
            .transpose()
    }

    fn user_by_email(&self, email: &str) -> RepoResult<Option<User>> {
        let mut conn = self.conn()?;
        users::table
            .filter(users::email.eq(email))
            .select(UserRow::as_select())
            .first(&mut *conn)
            .optional()
            .map_err(map_err)?
            .map(UserRow::into_domain)
            .transpose()
    }

    fn user_by_username(&self, username: &str) -> RepoResult<Option<User>> {
        let mut conn = self.conn()?;
        users::table
            .filter(users::username.eq(username))
            .select(UserRow::as_select())
            .first(&mut *conn)
            .optional()
            .map_err(map_err)?
            .map(UserRow::into_domain)
            .transpose()
    }

    fn set_user_status(&self, id: Uuid, status: UserStatus, now: i64) -> RepoResult<bool> {
        let mut conn = self.conn()?;
        let n = diesel::update(users::table.find(id.to_string()))
            .set((users::status.eq(status.as_str()), users::updated_at.eq(now)))
            .execute(&mut *conn)
            .map_err(map_err)?;
        Ok(n == 1)
    }

    fn set_user_role(&self, id: Uuid, role: Role, now: i64) -> RepoResult<bool> {
        let mut conn = self.conn()?;
        let n = diesel::update(users::table.find(id.to_string()))
            .set((users::role.eq(role.as_str()), users::updated_at.eq(now)))
            .execute(&mut *conn)
            .map_err(map_err)?;
        Ok(n == 1)
    }

    fn mark_email_verified(&self, id: Uuid, now: i64) -> RepoResult<()> {
        let mut conn = self.conn()?;
        diesel::update(
            users::table
                .find(id.to_string())
                .filter(users::email_verified_at.is_null()),
        )
        .set((
            users::email_verified_at.eq(Some(now)),
            users::updated_at.eq(now),
        ))
        .execute(&mut *conn)
        .map(|_| ())
        .map_err(map_err)
    }

    fn count_users_with_role(&self, role: Role) -> RepoResult<u64> {
        let mut conn = self.conn()?;
        let n: i64 = users::table
            .filter(users::role.eq(role.as_str()))
            .count()
            .get_result(&mut *conn)
            .map_err(map_err)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    fn create_session(&self, session: &Session, first_token: &RefreshToken) -> RepoResult<()> {
        let mut conn = self.conn()?;
        conn.transaction(|c| {
            diesel::insert_into(sessions::table)
                .values(SessionRow::from_domain(session))
                .execute(c)?;
            diesel::insert_into(refresh_tokens::table)
                .values(RefreshRow::from_domain(first_token))
                .execute(c)?;
            Ok(())
        })
        .map_err(map_err)
    }

    fn session_with_user(&self, session_id: Uuid) -> RepoResult<Option<(Session, User)>> {
        let mut conn = self.conn()?;
        let row: Option<(SessionRow, UserRow)> = sessions::table
            .inner_join(users::table)
            .filter(sessions::id.eq(session_id.to_string()))
            .select((SessionRow::as_select(), UserRow::as_select()))
            .first(&mut *conn)
            .optional()
            .map_err(map_err)?;
        row.map(|(s, u)| Ok((s.into_domain()?, u.into_domain()?)))
            .transpose()
    }

    fn refresh_token_by_hash(&self, token_hash: &str) -> RepoResult<Option<RefreshToken>> {
        let mut conn = self.conn()?;
        refresh_tokens::table
            .filter(refresh_tokens::token_hash.eq(token_hash))
            .select(RefreshRow::as_select())
            .first(&mut *conn)
            .optional()
            .map_err(map_err)?
            .map(RefreshRow::into_domain)
            .transpose()
    }

    fn consume_refresh_token(&self, id: Uuid, now: i64) -> RepoResult<bool> {
        let mut conn = self.conn()?;
        let n = diesel::update(
            refresh_tokens::table
                .find(id.to_string())
                .filter(refresh_tokens::used_at.is_null()),
        )
        .set(refresh_tokens::used_at.eq(Some(now)))
        .execute(&mut *conn)
        .map_err(map_err)?;
        Ok(n == 1)
    }

    fn insert_refresh_token(&self, token: &RefreshToken) -> RepoResult<()> {
        let mut conn = self.conn()?;
        diesel::insert_into(refresh_tokens::table)
            .values(RefreshRow::from_domain(token))
            .execute(&mut *conn)
            .map(|_| ())
            .map_err(map_err)
    }

    fn revoke_session(&self, session_id: Uuid, now: i64, reason: &str) -> RepoResult<()> {
        let mut conn = self.conn()?;
        diesel::update(
            sessions::table
                .find(session_id.to_string())
                .filter(sessions::revoked_at.is_null()),
        )
        .set((
            sessions::revoked_at.eq(Some(now)),
            sessions::revoked_reason.eq(Some(reason)),
        ))
        .execute(&mut *conn)
        .map(|_| ())
        .map_err(map_err)
    }

    fn revoke_user_sessions(&self, user_id: Uuid, now: i64, reason: &str) -> RepoResult<u64> {
        let mut conn = self.conn()?;
        let n = diesel::update(
            sessions::table
                .filter(sessions::user_id.eq(user_id.to_string()))
                .filter(sessions::revoked_at.is_null()),
        )
        .set((
            sessions::revoked_at.eq(Some(now)),
            sessions::revoked_reason.eq(Some(reason)),
        ))
        .execute(&mut *conn)
        .map_err(map_err)?;
        Ok(n as u64)
    }

    fn create_api_key(&self, key: &ApiKey) -> RepoResult<()> {
        let mut conn = self.conn()?;
        diesel::insert_into(api_keys::table)
            .values(ApiKeyRow::from_domain(key))
            .execute(&mut *conn)
            .map(|_| ())
            .map_err(map_err)
    }

    fn active_api_keys(&self, user_id: Uuid) -> RepoResult<Vec<ApiKey>> {
        let mut conn = self.conn()?;
        api_keys::table
            .filter(api_keys::user_id.eq(user_id.to_string()))
            .filter(api_keys::revoked_at.is_null())
            .order((api_keys::created_at.desc(), api_keys::id.desc()))
            .select(ApiKeyRow::as_select())
            .load(&mut *conn)
            .map_err(map_err)?
            .into_iter()
            .map(ApiKeyRow::into_domain)
            .collect()
    }

    fn api_key_with_user(&self, key_hash: &str) -> RepoResult<Option<(ApiKey, User)>> {
        let mut conn = self.conn()?;
        let row: Option<(ApiKeyRow, UserRow)> = api_keys::table
            .inner_join(users::table)
            .filter(api_keys::key_hash.eq(key_hash))
            .select((ApiKeyRow::as_select(), UserRow::as_select()))
            .first(&mut *conn)
            .optional()
            .map_err(map_err)?;
        row.map(|(k, u)| Ok((k.into_domain()?, u.into_domain()?)))
            .transpose()
    }

    fn touch_api_key(&self, id: Uuid, now: i64) -> RepoResult<()> {
        let mut conn = self.conn()?;
        diesel::update(api_keys::table.find(id.to_string()))
            .set(api_keys::last_used_at.eq(Some(now)))
            .execute(&mut *conn)
            .map(|_| ())
            .map_err(map_err)
    }

    fn revoke_api_key(&self, user_id: Uuid, key_id: Uuid, now: i64) -> RepoResult<bool> {
        let mut conn = self.conn()?;
        let n = diesel::update(
            api_keys::table
                .find(key_id.to_string())
                .filter(api_keys::user_id.eq(user_id.to_string()))
                .filter(api_keys::revoked_at.is_null()),
        )
        .set(api_keys::revoked_at.eq(Some(now)))
        .execute(&mut *conn)
        .map_err(map_err)?;
        Ok(n == 1)
    }

    fn create_email_token(&self, token: &EmailToken) -> RepoResult<()> {
        let mut conn = self.conn()?;
        diesel::insert_into(email_tokens::table)
            .values(EmailTokenRow {
                id: token.id.to_string(),
                user_id: token.user_id.to_string(),
                purpose: token.purpose.as_str().to_string(),
                token_hash: token.token_hash.clone(),
                created_at: token.created_at,
                expires_at: token.expires_at,
                used_at: token.used_at,
            })
            .execute(&mut *conn)
            .map(|_| ())
            .map_err(map_err)
    }

    fn consume_email_token(
        &self,
        token_hash: &str,
        purpose: EmailTokenPurpose,
        now: i64,
    ) -> RepoResult<Option<EmailToken>> {
        let mut conn = self.conn()?;
        let n = diesel::update(
            email_tokens::table
                .filter(email_tokens::token_hash.eq(token_hash))
                .filter(email_tokens::purpose.eq(purpose.as_str()))
                .filter(email_tokens::used_at.is_null())
                .filter(email_tokens::expires_at.gt(now)),
        )
        .set(email_tokens::used_at.eq(Some(now)))
        .execute(&mut *conn)
        .map_err(map_err)?;
        if n != 1 {
            return Ok(None);
        }
        email_tokens::table
            .filter(email_tokens::token_hash.eq(token_hash))
            .select(EmailTokenRow::as_select())
            .first(&mut *conn)
            .optional()
            .map_err(map_err)?
            .map(EmailTokenRow::into_domain)
            .transpose()
    }

    fn reset_password(
        &self,
        token_hash: &str,
        new_password_hash: &str,
        now: i64,
    ) -> RepoResult<Option<Uuid>> {
        let mut conn = self.conn()?;
        let purpose = EmailTokenPurpose::ResetPassword.as_str();
        let result: Result<Option<String>, DieselError> = conn.transaction(|c| {
            // Write first, so SQLite takes the write lock at once.
            let n = diesel::update(
                email_tokens::table
                    .filter(email_tokens::token_hash.eq(token_hash))
                    .filter(email_tokens::purpose.eq(purpose))
                    .filter(email_tokens::used_at.is_null())
                    .filter(email_tokens::expires_at.gt(now)),
            )
            .set(email_tokens::used_at.eq(Some(now)))
            .execute(c)?;
            if n != 1 {
                return Ok(None);
            }
            let user_id: String = email_tokens::table
                .filter(email_tokens::token_hash.eq(token_hash))
                .select(email_tokens::user_id)
                .first(c)?;
            diesel::update(users::table.find(&user_id))
                .set((
                    users::password_hash.eq(new_password_hash),
                    users::updated_at.eq(now),
                ))
                .execute(c)?;
            diesel::update(
                sessions::table
                    .filter(sessions::user_id.eq(&user_id))
                    .filter(sessions::revoked_at.is_null()),
            )
            .set((
                sessions::revoked_at.eq(Some(now)),
                sessions::revoked_reason.eq(Some("password_reset")),
            ))
            .execute(c)?;
            // Other outstanding reset links die with this one.
            diesel::update(
                email_tokens::table
                    .filter(email_tokens::user_id.eq(&user_id))
                    .filter(email_tokens::purpose.eq(purpose))
                    .filter(email_tokens::used_at.is_null()),
            )
            .set(email_tokens::used_at.eq(Some(now)))
            .execute(c)?;
            Ok(Some(user_id))
        });
        result.map_err(map_err)?.as_deref().map(uuid).transpose()
    }

    fn create_stream_ticket(
        &self,
        user_id: Uuid,
        token_hash: &str,
        now: i64,
        expires_at: i64,
    ) -> RepoResult<()> {
        let mut conn = self.conn()?;
        diesel::delete(stream_tickets::table.filter(stream_tickets::expires_at.lt(now)))
            .execute(&mut *conn)
            .map_err(map_err)?;
        diesel::insert_into(stream_tickets::table)
            .values((
                stream_tickets::id.eq(Uuid::now_v7().to_string()),
                stream_tickets::user_id.eq(user_id.to_string()),
                stream_tickets::token_hash.eq(token_hash),
                stream_tickets::created_at.eq(now),
                stream_tickets::expires_at.eq(expires_at),
            ))
            .execute(&mut *conn)
            .map(|_| ())
            .map_err(map_err)
    }

    fn consume_stream_ticket(&self, token_hash: &str, now: i64) -> RepoResult<Option<User>> {
        let mut conn = self.conn()?;
        let n = diesel::update(
            stream_tickets::table
                .filter(stream_tickets::token_hash.eq(token_hash))
                .filter(stream_tickets::used_at.is_null())
                .filter(stream_tickets::expires_at.gt(now)),
        )
        .set(stream_tickets::used_at.eq(Some(now)))
        .execute(&mut *conn)
        .map_err(map_err)?;
        if n != 1 {
            return Ok(None);
        }
        stream_tickets::table
            .inner_join(users::table)
            .filter(stream_tickets::token_hash.eq(token_hash))
            .select(UserRow::as_select())
            .first(&mut *conn)
            .optional()
            .map_err(map_err)?
            .map(UserRow::into_domain)
            .transpose()
    }

    fn record_audit(&self, event: &AuditEvent) -> RepoResult<()> {
        let mut conn = self.conn()?;
        diesel::insert_into(audit_events::table)
            .values(AuditRow {
                id: event.id.to_string(),
                user_id: event.user_id.map(|u| u.to_string()),
                event: event.event.clone(),
                subject: event.subject.clone(),
                ip: event.ip.clone(),
                detail: event.detail.as_ref().map(|d| d.to_string()),
                created_at: event.created_at,
            })
            .execute(&mut *conn)
            .map(|_| ())
            .map_err(map_err)
    }

    fn audit_times_since(
        &self,
        event: &str,
        query: AuditQuery<'_>,
        since: i64,
        limit: i64,
    ) -> RepoResult<Vec<i64>> {
        let mut conn = self.conn()?;
        let mut q = audit_events::table
            .filter(audit_events::event.eq(event))
            .filter(audit_events::created_at.ge(since))
            .select(audit_events::created_at)
            .order(audit_events::created_at.desc())
            .limit(limit)
            .into_boxed();
        q = match query {
            AuditQuery::Subject(s) => q.filter(audit_events::subject.eq(s.to_string())),
            AuditQuery::Ip(ip) => q.filter(audit_events::ip.eq(ip.to_string())),
        };
        let mut times: Vec<i64> = q.load(&mut *conn).map_err(map_err)?;
        times.reverse();
        Ok(times)
    }

    fn list_audit(&self, filter: &AuditFilter, page: PageRequest) -> RepoResult<Page<AuditEvent>> {
        let mut conn = self.conn()?;
        let query = || {
            let mut q = audit_events::table.into_boxed();
            if let Some(u) = filter.user_id {
                q = q.filter(audit_events::user_id.eq(u.to_string()));
            }
            if let Some(e) = &filter.event {
                q = if let Some(prefix) = e.strip_suffix('.') {
                    q.filter(
                        audit_events::event.like(format!("{}.%", prefix.replace(['%', '_'], ""))),
                    )
                } else {
                    q.filter(audit_events::event.eq(e.clone()))
                };
            }
            if let Some(from) = filter.from_ms {
                q = q.filter(audit_events::created_at.ge(from));
            }
            if let Some(to) = filter.to_ms {
                q = q.filter(audit_events::created_at.lt(to));
            }
            q
        };
        let total: i64 = query().count().get_result(&mut *conn).map_err(map_err)?;
        let items = query()
            .select(AuditRow::as_select())
            .order((audit_events::created_at.desc(), audit_events::id.desc()))
            .offset(page.offset())
            .limit(page.limit())
            .load(&mut *conn)
            .map_err(map_err)?
            .into_iter()
            .map(AuditRow::into_domain)
            .collect::<RepoResult<Vec<_>>>()?;
        Ok(Page::new(items, page, u64::try_from(total).unwrap_or(0)))
    }

    fn list_users(&self, query: &UserQuery, page: PageRequest) -> RepoResult<Page<User>> {
        let mut conn = self.conn()?;
        let build = || {
            let mut q = users::table.into_boxed();
            if let Some(text) = query.q.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
                let pattern = format!(
                    "%{}%",
                    text.to_lowercase()
                        .replace('\\', "\\\\")
                        .replace('%', "\\%")
                        .replace('_', "\\_")
                );
                q = q.filter(
                    users::email
                        .like(pattern.clone())
                        .escape('\\')
                        .or(crate::db::lower(users::username).like(pattern).escape('\\')),
                );
            }
            if let Some(r) = query.role {
                q = q.filter(users::role.eq(r.as_str()));
            }
            if let Some(s) = query.status {
                q = q.filter(users::status.eq(s.as_str()));
            }
            q
        };
        let total: i64 = build().count().get_result(&mut *conn).map_err(map_err)?;
        let items = build()
            .select(UserRow::as_select())
            .order((users::created_at.desc(), users::id.desc()))
            .offset(page.offset())
            .limit(page.limit())
            .load(&mut *conn)
            .map_err(map_err)?
            .into_iter()
            .map(UserRow::into_domain)
            .collect::<RepoResult<Vec<_>>>()?;
        Ok(Page::new(items, page, u64::try_from(total).unwrap_or(0)))
    }
}
