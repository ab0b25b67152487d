//! The storage port of the accounts domain.
//!
//! All methods are blocking. Implementations must make the conditional
//! updates (`consume_*`) atomic: two concurrent calls for the same token
//! must not both succeed.

use muse_core::{Page, PageRequest};
use uuid::Uuid;

use crate::model::*;

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// A unique constraint was violated; the string names what collided
    /// (`email`, `username`, …) when the backend says.
    #[error("conflict on {0}")]
    Conflict(String),
    /// The database could not be reached or timed out.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A stored value could not be read back (corrupt row).
    #[error("corrupt data: {0}")]
    Corrupt(String),
    #[error("database error: {0}")]
    Other(String),
}

pub type RepoResult<T> = Result<T, RepoError>;

/// Which audit rows to look at for throttling.
#[derive(Debug, Clone)]
pub enum AuditQuery<'a> {
    Subject(&'a str),
    Ip(&'a str),
}

/// Which audit events to list (all conditions must hold).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// The actor (or the user the event is about).
    pub user_id: Option<Uuid>,
    /// An event name, or a prefix ending in `.` (`login.`).
    pub event: Option<String>,
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
}

/// Which users to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserQuery {
    /// Case-insensitive substring of the email or username.
    pub q: Option<String>,
    pub role: Option<Role>,
    pub status: Option<UserStatus>,
}

pub trait AuthRepository: Send + Sync + 'static {
    /// Checks that the store answers.
    fn ping(&self) -> RepoResult<()>;

    // Users
    /// Fails with [`RepoError::Conflict`] (`email` or `username`) on a duplicate.
    fn create_user(&self, user: &User) -> RepoResult<()>;
    fn user_by_id(&self, id: Uuid) -> RepoResult<Option<User>>;
    fn user_by_email(&self, email: &str) -> RepoResult<Option<User>>;
    fn user_by_username(&self, username: &str) -> RepoResult<Option<User>>;
    fn set_user_status(&self, id: Uuid, status: UserStatus, now: i64) -> RepoResult<bool>;
    fn set_user_role(&self, id: Uuid, role: Role, now: i64) -> RepoResult<bool>;
    fn mark_email_verified(&self, id: Uuid, now: i64) -> RepoResult<()>;
    fn count_users_with_role(&self, role: Role) -> RepoResult<u64>;

    // Sessions and refresh tokens
    fn create_session(&self, session: &Session, first_token: &RefreshToken) -> RepoResult<()>;
    fn session_with_user(&self, session_id: Uuid) -> RepoResult<Option<(Session, User)>>;
    fn refresh_token_by_hash(&self, token_hash: &str) -> RepoResult<Option<RefreshToken>>;
    /// Marks the token used if it was unused; `true` when this call did it.
    fn consume_refresh_token(&self, id: Uuid, now: i64) -> RepoResult<bool>;
    fn insert_refresh_token(&self, token: &RefreshToken) -> RepoResult<()>;
    fn revoke_session(&self, session_id: Uuid, now: i64, reason: &str) -> RepoResult<()>;
    /// Revokes every live session of a user; returns how many.
    fn revoke_user_sessions(&self, user_id: Uuid, now: i64, reason: &str) -> RepoResult<u64>;

    // API keys
    fn create_api_key(&self, key: &ApiKey) -> RepoResult<()>;
    /// The user's keys that are not revoked, newest first.
    fn active_api_keys(&self, user_id: Uuid) -> RepoResult<Vec<ApiKey>>;
    fn api_key_with_user(&self, key_hash: &str) -> RepoResult<Option<(ApiKey, User)>>;
    fn touch_api_key(&self, id: Uuid, now: i64) -> RepoResult<()>;
    /// Revokes the key if it belongs to `user_id`; `false` if there is no such key.
    fn revoke_api_key(&self, user_id: Uuid, key_id: Uuid, now: i64) -> RepoResult<bool>;

    // Email tokens
    fn create_email_token(&self, token: &EmailToken) -> RepoResult<()>;
    /// Atomically marks an unused, unexpired token of this purpose used and
    /// returns it; `None` when there is no such token.
    fn consume_email_token(
        &self,
        token_hash: &str,
        purpose: EmailTokenPurpose,
        now: i64,
    ) -> RepoResult<Option<EmailToken>>;
    /// In one transaction: consume the reset token, set the new password
    /// hash and revoke every session. Returns the user id, or `None` when
    /// the token is invalid, used or expired (then nothing changes).
    fn reset_password(
        &self,
        token_hash: &str,
        new_password_hash: &str,
        now: i64,
    ) -> RepoResult<Option<Uuid>>;

    // Stream tickets
    /// Stores a ticket digest for `user_id`, valid until `expires_at`, and
    /// removes tickets that expired before `now`.
    fn create_stream_ticket(
        &self,
        user_id: Uuid,
        token_hash: &str,
        now: i64,
        expires_at: i64,
    ) -> RepoResult<()>;
    /// Atomically marks an unused, unexpired ticket used and returns its
    /// user; `None` when there is no such ticket.
    fn consume_stream_ticket(&self, token_hash: &str, now: i64) -> RepoResult<Option<User>>;

    // Audit
    fn record_audit(&self, event: &AuditEvent) -> RepoResult<()>;
    /// Creation times (ascending) of `event` rows matching `query` since
    /// `since`, at most `limit` of the most recent.
    fn audit_times_since(
        &self,
        event: &str,
        query: AuditQuery<'_>,
        since: i64,
        limit: i64,
    ) -> RepoResult<Vec<i64>>;
    /// Audit events matching `filter`, newest first.
    fn list_audit(&self, filter: &AuditFilter, page: PageRequest) -> RepoResult<Page<AuditEvent>>;

    // Administration
    /// Users matching `query`, newest first.
    fn list_users(&self, query: &UserQuery, page: PageRequest) -> RepoResult<Page<User>>;
}
