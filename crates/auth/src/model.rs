//! Plain data types of the accounts domain.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// What a user may do. Admins reach `/api/v1/admin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "user" => Some(Role::User),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// A suspended user can neither log in nor use a token or key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UserStatus {
    Active,
    Suspended,
}

impl UserStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            UserStatus::Active => "active",
            UserStatus::Suspended => "suspended",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(UserStatus::Active),
            "suspended" => Some(UserStatus::Suspended),
            _ => None,
        }
    }
}

/// A user account. Times are milliseconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: Uuid,
    pub email: String,
    pub username: String,
    pub password_hash: String,
    pub role: Role,
    pub status: UserStatus,
    pub email_verified_at: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A login session: the family of one refresh-token chain and of every
/// access token issued from it. Revoking it ends them all at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub id: Uuid,
    pub user_id: Uuid,
    pub created_at: i64,
    pub expires_at: i64,
    pub revoked_at: Option<i64>,
    pub revoked_reason: Option<String>,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
}

/// One refresh token of a session; only its digest is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshToken {
    pub id: Uuid,
    pub session_id: Uuid,
    pub token_hash: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub used_at: Option<i64>,
}

/// A personal API key (`muse_sk_…`); only its digest is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub id: Uuid,
    pub user_id: Uuid,
    pub name: String,
    /// The first characters of the key, shown in listings to tell keys apart.
    pub prefix: String,
    pub key_hash: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub last_used_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

/// Why an emailed token exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmailTokenPurpose {
    VerifyEmail,
    ResetPassword,
}

impl EmailTokenPurpose {
    pub fn as_str(self) -> &'static str {
        match self {
            EmailTokenPurpose::VerifyEmail => "verify_email",
            EmailTokenPurpose::ResetPassword => "reset_password",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "verify_email" => Some(EmailTokenPurpose::VerifyEmail),
            "reset_password" => Some(EmailTokenPurpose::ResetPassword),
            _ => None,
        }
    }
}

/// A single-use, expiring token sent by email; only its digest is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmailToken {
    pub id: Uuid,
    pub user_id: Uuid,
    pub purpose: EmailTokenPurpose,
    pub token_hash: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub used_at: Option<i64>,
}

/// Names of audit events written by this crate (later crates add theirs).
pub mod audit {
    pub const USER_REGISTERED: &str = "user.registered";
    pub const LOGIN_SUCCEEDED: &str = "login.succeeded";
    pub const LOGIN_FAILED: &str = "login.failed";
    pub const LOGOUT: &str = "logout";
    pub const REFRESH_REUSED: &str = "refresh_token.reused";
    pub const EMAIL_VERIFIED: &str = "email.verified";
    pub const PASSWORD_RESET_REQUESTED: &str = "password.reset_requested";
    pub const PASSWORD_RESET: &str = "password.reset";
    pub const API_KEY_CREATED: &str = "api_key.created";
    pub const API_KEY_REVOKED: &str = "api_key.revoked";
    pub const ADMIN_CREATED: &str = "admin.created";
    pub const USER_SUSPENDED: &str = "user.suspended";
    pub const USER_UNSUSPENDED: &str = "user.unsuspended";
    pub const ROLE_CHANGED: &str = "user.role_changed";
    pub const RATE_LIMIT_UNBLOCKED: &str = "rate_limit.unblocked";
    pub const FEATURE_FLAG_CHANGED: &str = "feature_flag.changed";
    pub const PLAN_CHANGED: &str = "plan.changed";
    pub const PLAN_EDITED: &str = "plan.edited";
    pub const MODEL_PULLED: &str = "model.pulled";
    pub const MODEL_LOADED: &str = "model.loaded";
    pub const MODEL_UNLOADED: &str = "model.unloaded";
    pub const TRAINING_STARTED: &str = "training.started";
    pub const TRAINING_STOP_REQUESTED: &str = "training.stop_requested";
    /// A subscription changed by Stripe (webhook) or by its user
    /// (cancellation); `detail.by` says who.
    pub const SUBSCRIPTION_CHANGED: &str = "subscription.changed";
}

/// A row of the audit log.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEvent {
    pub id: Uuid,
    pub user_id: Option<Uuid>,
    pub event: String,
    /// What the event is about when there is no user id (e.g. the email
    /// of a failed login).
    pub subject: Option<String>,
    pub ip: Option<String>,
    pub detail: Option<serde_json::Value>,
    pub created_at: i64,
}

/// How a request was authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthMethod {
    /// A JWT access token of this session.
    Session { session_id: Uuid, jti: String },
    /// A personal API key, and when it expires (ms since the epoch).
    ApiKey {
        key_id: Uuid,
        expires_at: Option<i64>,
    },
    /// A single-use stream ticket (browser EventSource / WebSocket clients).
    StreamTicket,
}

/// The authenticated caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user: User,
    pub method: AuthMethod,
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        self.user.role == Role::Admin
    }
}
