//! The accounts use cases. Every method is blocking (see the crate docs).

use std::sync::{Arc, OnceLock};

use muse_core::token::{random_token, token_digest};
use muse_core::{Clock, Page, PageRequest};
use serde_json::json;
use uuid::Uuid;

use crate::error::{AuthError, FieldError};
use crate::jwt::{Claims, JwtKeys};
use crate::mail::{Mailer, OutgoingEmail};
use crate::model::*;
use crate::password::{hash_password, verify_password};
use crate::repo::{AuditFilter, AuditQuery, AuthRepository, RepoError, UserQuery};
use crate::validate;

/// Prefix of every personal API key.
pub const API_KEY_PREFIX: &str = "muse_sk_";
/// Prefix of stream tickets.
pub const STREAM_TICKET_PREFIX: &str = "muse_st_";
/// How long a stream ticket stays valid.
pub const STREAM_TICKET_TTL_SECS: i64 = 60;

/// Failed-login throttling: at most `max_per_account` failures per email
/// and `max_per_ip` per client address within `window_secs`.
#[derive(Debug, Clone)]
pub struct ThrottleConfig {
    pub max_per_account: u32,
    pub max_per_ip: u32,
    pub window_secs: i64,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        Self {
            max_per_account: 5,
            max_per_ip: 20,
            window_secs: 15 * 60,
        }
    }
}

/// Tunables of the accounts service.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub access_ttl_secs: i64,
    pub refresh_ttl_secs: i64,
    pub verify_email_ttl_secs: i64,
    pub reset_password_ttl_secs: i64,
    pub bcrypt_cost: u32,
    pub throttle: ThrottleConfig,
    /// Base URL used in emailed links, without a trailing slash.
    pub public_url: String,
    pub max_api_keys_per_user: u64,
    /// How long a verified caller is kept in memory (0: read every
    /// request from the database). Also the longest another replica's
    /// revocation takes to reach this one when revocations are not
    /// relayed between replicas.
    pub principal_cache_ttl_ms: i64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            access_ttl_secs: 15 * 60,
            refresh_ttl_secs: 30 * 24 * 3600,
            verify_email_ttl_secs: 48 * 3600,
            reset_password_ttl_secs: 3600,
            bcrypt_cost: 12,
            throttle: ThrottleConfig::default(),
            public_url: "http://127.0.0.1:8000".to_string(),
            max_api_keys_per_user: 50,
            principal_cache_ttl_ms: 2_000,
        }
    }
}

/// Who is asking, for audit rows and throttling.
#[derive(Debug, Clone, Default)]
pub struct RequestContext {
    pub ip: Option<String>,
    pub user_agent: Option<String>,
}

/// What a successful login or refresh returns.
#[derive(Debug, Clone)]
pub struct TokenPair {
    pub access_token: String,
    pub expires_in: i64,
    pub refresh_token: String,
    pub refresh_expires_in: i64,
    pub user: User,
}

/// A freshly created key: the only moment the secret is visible.
#[derive(Debug, Clone)]
pub struct NewApiKey {
    pub key: ApiKey,
    pub secret: String,
}

pub struct AuthService {
    repo: Arc<dyn AuthRepository>,
    mailer: Arc<dyn Mailer>,
    clock: Arc<dyn Clock>,
    jwt: JwtKeys,
    config: AuthConfig,
    dummy_hash: OnceLock<String>,
    cache: crate::cache::PrincipalCache,
    /// Called with the user whenever one loses access (to relay it to other
    /// replicas).
    on_revoke: std::sync::RwLock<Option<RevokeHook>>,
}

/// Told of each user whose access was cut (logout, key revocation,
/// suspension, role change, password reset, refresh-token reuse).
pub type RevokeHook = Arc<dyn Fn(Uuid) + Send + Sync>;

impl AuthService {
    pub fn new(
        repo: Arc<dyn AuthRepository>,
        mailer: Arc<dyn Mailer>,
        clock: Arc<dyn Clock>,
        jwt: JwtKeys,
        config: AuthConfig,
    ) -> Self {
        Self {
            repo,
            mailer,
            clock,
            jwt,
            cache: crate::cache::PrincipalCache::new(config.principal_cache_ttl_ms),
            config,
            dummy_hash: OnceLock::new(),
            on_revoke: std::sync::RwLock::new(None),
        }
    }

    /// The in-memory cache of verified callers.
    pub fn principal_cache(&self) -> &crate::cache::PrincipalCache {
        &self.cache
    }

    /// Registers who is told of revocations (the server relays them to
    /// other replicas).
    pub fn on_revoke(&self, hook: RevokeHook) {
        if let Ok(mut h) = self.on_revoke.write() {
            *h = Some(hook);
        }
    }

    /// `user_id` lost some access: cached callers of theirs are dropped
    /// here at once, and the hook relays it.
    fn revoked(&self, user_id: Uuid) {
        self.cache.forget_user(user_id);
        let hook = self.on_revoke.read().ok().and_then(|h| h.clone());
        if let Some(hook) = hook {
            hook(user_id);
        }
    }

    pub fn config(&self) -> &AuthConfig {
        &self.config
    }

    pub fn repository(&self) -> &Arc<dyn AuthRepository> {
        &self.repo
    }

    fn now(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Writes one audit row (actor `user_id`); a failure is logged, never
    /// returned. Never put a secret in `detail`.
    pub fn audit(
        &self,
        user_id: Option<Uuid>,
        event: &str,
        subject: Option<&str>,
        ctx: &RequestContext,
        detail: Option<serde_json::Value>,
    ) {
        let row = AuditEvent {
            id: Uuid::now_v7(),
            user_id,
            event: event.to_string(),
            subject: subject.map(str::to_string),
            ip: ctx.ip.clone(),
            detail,
            created_at: self.now(),
        };
        if let Err(e) = self.repo.record_audit(&row) {
            tracing::error!(error = %e, event, "could not write audit event");
        }
    }

    // ----- registration -------------------------------------------------

    /// Creates an account with role `user` and emails a verification link.
    pub fn register(
        &self,
        email: &str,
        username: &str,
        password: &str,
        ctx: &RequestContext,
    ) -> Result<User, AuthError> {
        let user = self.create_user(email, username, password, Role::User)?;
        self.audit(Some(user.id), audit::USER_REGISTERED, None, ctx, None);
        if let Err(e) = self.send_verification(&user) {
            // The account exists; the user can ask for a new link.
            tracing::warn!(error = %e, user_id = %user.id, "verification email not sent");
        }
        Ok(user)
    }

    /// Validates and stores a new user (no email is sent).
    pub fn create_user(
        &self,
        email: &str,
        username: &str,
        password: &str,
        role: Role,
    ) -> Result<User, AuthError> {
        let raw_email_of_create = email;
        let mut errors = Vec::new();
        let email = validate::normalize_email(email)
            .map_err(|e| errors.push(e))
            .ok();
        let username = validate::normalize_username(username)
            .map_err(|e| errors.push(e))
            .ok();
        if let Err(e) =
            validate::check_password("password", password, email.as_deref(), username.as_deref())
        {
            errors.push(e);
        }
        let (Some(email), Some(username), true) = (email, username, errors.is_empty()) else {
            return Err(AuthError::Validation(errors));
        };
        if self.user_by_email(&email, raw_email_of_create)?.is_some() {
            return Err(AuthError::EmailTaken);
        }
        if self.repo.user_by_username(&username)?.is_some() {
            return Err(AuthError::UsernameTaken);
        }
        let password_hash = hash_password(password, self.config.bcrypt_cost)?;
        let now = self.now();
        let user = User {
            id: Uuid::now_v7(),
            email,
            username,
            password_hash,
            role,
            status: UserStatus::Active,
            email_verified_at: None,
            created_at: now,
            updated_at: now,
        };
        match self.repo.create_user(&user) {
            Ok(()) => Ok(user),
            Err(RepoError::Conflict(what)) if what.contains("username") => {
                Err(AuthError::UsernameTaken)
            }
            Err(RepoError::Conflict(_)) => Err(AuthError::EmailTaken),
            Err(e) => Err(e.into()),
        }
    }

    /// Creates an admin account (CLI and first-start bootstrap). The email
    /// counts as verified.
    pub fn create_admin(
        &self,
        email: &str,
        username: &str,
        password: &str,
    ) -> Result<User, AuthError> {
        let mut user = self.create_user(email, username, password, Role::Admin)?;
        let now = self.now();
        self.repo.mark_email_verified(user.id, now)?;
        user.email_verified_at = Some(now);
        self.audit(
            Some(user.id),
            audit::ADMIN_CREATED,
            None,
            &RequestContext::default(),
            None,
        );
        Ok(user)
    }

    // ----- login, refresh, logout ---------------------------------------

    fn throttle_wait(
        &self,
        query: AuditQuery<'_>,
        max: u32,
        now: i64,
    ) -> Result<Option<u64>, AuthError> {
        if max == 0 {
            return Ok(None);
        }
        let window_ms = self.config.throttle.window_secs * 1000;
        let times = self.repo.audit_times_since(
            audit::LOGIN_FAILED,
            query,
            now - window_ms,
            i64::from(max),
        )?;
        if times.len() < max as usize {
            return Ok(None);
        }
        // The oldest of the last `max` failures must leave the window.
        let oldest = times.first().copied().unwrap_or(now);
        let wait_ms = (oldest + window_ms - now).max(1000);
        Ok(Some(
            u64::try_from(wait_ms.div_euclid(1000) + 1).unwrap_or(1),
        ))
    }

    /// The account of a canonical email, or of the form an internationalised
    /// domain was stored in before emails were canonicalised.
    fn user_by_email(&self, canonical: &str, raw: &str) -> Result<Option<User>, AuthError> {
        if let Some(user) = self.repo.user_by_email(canonical)? {
            return Ok(Some(user));
        }
        match validate::legacy_email(raw) {
            Some(legacy) if legacy != canonical => Ok(self.repo.user_by_email(&legacy)?),
            _ => Ok(None),
        }
    }

    /// Checks credentials and opens a session. Throttled per account and
    /// per IP *before* any bcrypt work.
    pub fn login(
        &self,
        email: &str,
        password: &str,
        ctx: &RequestContext,
    ) -> Result<TokenPair, AuthError> {
        // Something that is not an email cannot match an account; it still
        // costs a bcrypt run and counts against the client's address.
        let raw_email = email;
        let email = validate::normalize_email(email).ok();
        let now = self.now();
        let t = &self.config.throttle;
        let mut wait = match email.as_deref() {
            Some(e) => self.throttle_wait(AuditQuery::Subject(e), t.max_per_account, now)?,
            None => None,
        };
        if let Some(ip) = ctx.ip.as_deref() {
            wait = wait.max(self.throttle_wait(AuditQuery::Ip(ip), t.max_per_ip, now)?);
        }
        if let Some(retry_after_secs) = wait {
            return Err(AuthError::Throttled { retry_after_secs });
        }

        let user = match email.as_deref() {
            Some(e) => self.user_by_email(e, raw_email)?,
            None => None,
        };
        let ok = match &user {
            Some(u) => verify_password(password, &u.password_hash),
            None => {
                // Same work as for a real account, so timing tells nothing.
                let dummy = self.dummy_hash.get_or_init(|| {
                    hash_password("muse-dummy-password", self.config.bcrypt_cost)
                        .unwrap_or_default()
                });
                let _ = verify_password(password, dummy);
                false
            }
        };
        let user = match (user, ok) {
            (Some(u), true) => u,
            (u, _) => {
                self.audit(
                    u.map(|u| u.id),
                    audit::LOGIN_FAILED,
                    email.as_deref(),
                    ctx,
                    None,
                );
                return Err(AuthError::InvalidCredentials);
            }
        };
        if user.status == UserStatus::Suspended {
            self.audit(
                Some(user.id),
                audit::LOGIN_FAILED,
                email.as_deref(),
                ctx,
                Some(json!({"reason": "suspended"})),
            );
            return Err(AuthError::Suspended);
        }
        let pair = self.open_session(user, ctx)?;
        self.audit(
            Some(pair.user.id),
            audit::LOGIN_SUCCEEDED,
            email.as_deref(),
            ctx,
            None,
        );
        Ok(pair)
    }

    fn open_session(&self, user: User, ctx: &RequestContext) -> Result<TokenPair, AuthError> {
        let now = self.now();
        let session = Session {
            id: Uuid::now_v7(),
            user_id: user.id,
            created_at: now,
            expires_at: now + self.config.refresh_ttl_secs * 1000,
            revoked_at: None,
            revoked_reason: None,
            ip: ctx.ip.clone(),
            user_agent: ctx
                .user_agent
                .as_ref()
                .map(|ua| ua.chars().take(256).collect()),
        };
        let (refresh, refresh_secret) = self.new_refresh_token(session.id, session.expires_at);
        self.repo.create_session(&session, &refresh)?;
        self.issue(user, &session, refresh_secret)
    }

    fn new_refresh_token(&self, session_id: Uuid, expires_at: i64) -> (RefreshToken, String) {
        let secret = random_token(32);
        let row = RefreshToken {
            id: Uuid::now_v7(),
            session_id,
            token_hash: token_digest(&secret),
            created_at: self.now(),
            expires_at,
            used_at: None,
        };
        (row, secret)
    }

    fn issue(
        &self,
        user: User,
        session: &Session,
        refresh_secret: String,
    ) -> Result<TokenPair, AuthError> {
        let now_s = self.clock.now_secs();
        let claims = Claims {
            iss: self.jwt.issuer().to_string(),
            aud: self.jwt.audience().to_string(),
            sub: user.id.to_string(),
            jti: Uuid::new_v4().to_string(),
            iat: now_s,
            exp: now_s + self.config.access_ttl_secs,
            sid: session.id.to_string(),
        };
        Ok(TokenPair {
            access_token: self.jwt.sign(&claims)?,
            expires_in: self.config.access_ttl_secs,
            refresh_token: refresh_secret,
            refresh_expires_in: ((session.expires_at - self.now()) / 1000).max(0),
            user,
        })
    }

    /// Exchanges a refresh token for a new pair. Each refresh token works
    /// once; presenting a used one revokes its whole session.
    pub fn refresh(
        &self,
        refresh_token: &str,
        ctx: &RequestContext,
    ) -> Result<TokenPair, AuthError> {
        let now = self.now();
        let token = self
            .repo
            .refresh_token_by_hash(&token_digest(refresh_token))?
            .ok_or(AuthError::InvalidRefreshToken)?;
        let (session, user) = self
            .repo
            .session_with_user(token.session_id)?
            .ok_or(AuthError::InvalidRefreshToken)?;
        if session.revoked_at.is_some() {
            return Err(AuthError::InvalidRefreshToken);
        }
        if token.used_at.is_some() || !self.repo.consume_refresh_token(token.id, now)? {
            self.repo
                .revoke_session(session.id, now, "refresh_token_reuse")?;
            self.revoked(user.id);
            self.audit(
                Some(user.id),
                audit::REFRESH_REUSED,
                None,
                ctx,
                Some(json!({"session_id": session.id})),
            );
            return Err(AuthError::InvalidRefreshToken);
        }
        if token.expires_at <= now || session.expires_at <= now {
            return Err(AuthError::InvalidRefreshToken);
        }
        if user.status == UserStatus::Suspended {
            return Err(AuthError::Suspended);
        }
        let (next, secret) = self.new_refresh_token(session.id, session.expires_at);
        self.repo.insert_refresh_token(&next)?;
        self.issue(user, &session, secret)
    }

    /// Ends the session of the presented access token: it and every token
    /// of its refresh family stop working at once.
    pub fn logout(&self, principal: &Principal, ctx: &RequestContext) -> Result<(), AuthError> {
        let AuthMethod::Session { session_id, .. } = &principal.method else {
            return Err(AuthError::SessionRequired);
        };
        self.repo
            .revoke_session(*session_id, self.now(), "logout")?;
        self.revoked(principal.user.id);
        self.audit(Some(principal.user.id), audit::LOGOUT, None, ctx, None);
        Ok(())
    }

    // ----- authenticating requests --------------------------------------

    /// Resolves a bearer credential (JWT access token or `muse_sk_` key) to
    /// the caller. Revoked sessions or keys, expired tokens and suspended
    /// users are refused.
    pub fn authenticate(&self, bearer: &str) -> Result<Principal, AuthError> {
        if let Some(cached) = self.authenticate_cached(bearer) {
            return cached;
        }
        let epoch = self.cache.begin();
        if bearer.starts_with(API_KEY_PREFIX) {
            return self.authenticate_api_key(bearer, epoch);
        }
        let claims = self.jwt.verify(bearer)?;
        let session_id = Uuid::parse_str(&claims.sid).map_err(|_| AuthError::Unauthenticated)?;
        let (session, user) = self
            .repo
            .session_with_user(session_id)?
            .ok_or(AuthError::Unauthenticated)?;
        if session.revoked_at.is_some() || user.id.to_string() != claims.sub {
            return Err(AuthError::Unauthenticated);
        }
        if user.status == UserStatus::Suspended {
            return Err(AuthError::Suspended);
        }
        let principal = Principal {
            user,
            method: AuthMethod::Session {
                session_id,
                jti: claims.jti,
            },
        };
        self.cache.insert(
            crate::cache::CacheKey::Session(session_id),
            principal.clone(),
            epoch,
            self.now(),
            None,
        );
        Ok(principal)
    }

    /// Checks again, from the database, that a caller authenticated earlier
    /// (an open WebSocket's) still has access: the account is active, and
    /// the session or API key it came with is not revoked or expired.
    /// A stream ticket's caller is held to the account's status.
    pub fn revalidate(&self, principal: &Principal) -> Result<(), AuthError> {
        let epoch = self.cache.begin();
        let user = self.revalidate_uncached(principal)?;
        // Every connection of this caller (and HTTP requests with the same
        // session) can rely on this check for the cache's TTL: cached with
        // the user as just read (not as the connection first saw them).
        if let Some(key) = Self::credential_key(principal) {
            let fresh = Principal {
                user,
                method: principal.method.clone(),
            };
            self.cache.insert(key, fresh, epoch, self.now(), None);
        }
        Ok(())
    }

    /// [`AuthService::revalidate`] from memory alone: `true` when the same
    /// session or API key was checked from the database within the cache's
    /// TTL and the user lost no access since (the rule of
    /// [`AuthService::authenticate_cached`]); `false`: check the database.
    pub fn revalidated_recently(&self, principal: &Principal) -> bool {
        Self::credential_key(principal)
            .and_then(|key| self.cache.get(&key, self.now()))
            .is_some_and(|p| p.user.id == principal.user.id)
    }

    /// The cache entry a caller's credential is checked under (none for a
    /// single-use stream ticket).
    fn credential_key(principal: &Principal) -> Option<crate::cache::CacheKey> {
        match &principal.method {
            AuthMethod::Session { session_id, .. } => {
                Some(crate::cache::CacheKey::Session(*session_id))
            }
            AuthMethod::ApiKey { key_id, .. } => Some(crate::cache::CacheKey::ApiKeyId(*key_id)),
            AuthMethod::StreamTicket => None,
        }
    }

    fn revalidate_uncached(&self, principal: &Principal) -> Result<User, AuthError> {
        let now = self.now();
        let user = match &principal.method {
            AuthMethod::Session { session_id, .. } => {
                let (session, user) = self
                    .repo
                    .session_with_user(*session_id)?
                    .ok_or(AuthError::Unauthenticated)?;
                if session.revoked_at.is_some() {
                    return Err(AuthError::Unauthenticated);
                }
                user
            }
            AuthMethod::ApiKey { key_id, .. } => {
                let active = self.repo.active_api_keys(principal.user.id)?;
                let key = active
                    .iter()
                    .find(|k| k.id == *key_id)
                    .ok_or(AuthError::Unauthenticated)?;
                if key.expires_at.is_some_and(|e| e <= now) {
                    return Err(AuthError::Unauthenticated);
                }
                self.repo
                    .user_by_id(principal.user.id)?
                    .ok_or(AuthError::Unauthenticated)?
            }
            AuthMethod::StreamTicket => self
                .repo
                .user_by_id(principal.user.id)?
                .ok_or(AuthError::Unauthenticated)?,
        };
        if user.status == UserStatus::Suspended {
            return Err(AuthError::Suspended);
        }
        Ok(user)
    }

    /// [`AuthService::authenticate`] from memory alone: `None` when the
    /// caller is not cached (the database must be read, on a blocking
    /// thread). A JWT's signature and expiry are checked here every time.
    pub fn authenticate_cached(&self, bearer: &str) -> Option<Result<Principal, AuthError>> {
        let now = self.now();
        if bearer.starts_with(API_KEY_PREFIX) {
            let key = crate::cache::CacheKey::ApiKey(token_digest(bearer));
            return self.cache.get(&key, now).map(Ok);
        }
        let claims = match self.jwt.verify(bearer) {
            Ok(c) => c,
            Err(e) => return Some(Err(e)),
        };
        let session_id = Uuid::parse_str(&claims.sid).ok()?;
        let cached = self
            .cache
            .get(&crate::cache::CacheKey::Session(session_id), now)?;
        if cached.user.id.to_string() != claims.sub {
            return Some(Err(AuthError::Unauthenticated));
        }
        Some(Ok(Principal {
            user: cached.user,
            method: AuthMethod::Session {
                session_id,
                jti: claims.jti,
            },
        }))
    }

    fn authenticate_api_key(&self, secret: &str, epoch: u64) -> Result<Principal, AuthError> {
        let now = self.now();
        let digest = token_digest(secret);
        let (key, user) = self
            .repo
            .api_key_with_user(&digest)?
            .ok_or(AuthError::Unauthenticated)?;
        if key.revoked_at.is_some() || key.expires_at.is_some_and(|e| e <= now) {
            return Err(AuthError::Unauthenticated);
        }
        if user.status == UserStatus::Suspended {
            return Err(AuthError::Suspended);
        }
        // Keep writes cheap under load: at most one touch per minute.
        if key.last_used_at.is_none_or(|t| now - t >= 60_000) {
            if let Err(e) = self.repo.touch_api_key(key.id, now) {
                tracing::warn!(error = %e, "could not record API key use");
            }
        }
        let principal = Principal {
            user,
            method: AuthMethod::ApiKey {
                key_id: key.id,
                expires_at: key.expires_at,
            },
        };
        self.cache.insert(
            crate::cache::CacheKey::ApiKey(digest),
            principal.clone(),
            epoch,
            now,
            key.expires_at,
        );
        Ok(principal)
    }

    // ----- stream tickets -------------------------------------------------

    /// Issues a single-use ticket, valid [`STREAM_TICKET_TTL_SECS`] seconds,
    /// that authenticates one stream request from a client that cannot send
    /// headers (a browser `EventSource` or `WebSocket`): it goes in the URL
    /// instead of a long-lived token. Returns the ticket and its lifetime.
    pub fn issue_stream_ticket(&self, principal: &Principal) -> Result<(String, i64), AuthError> {
        let secret = format!("{STREAM_TICKET_PREFIX}{}", random_token(32));
        let now = self.now();
        self.repo.create_stream_ticket(
            principal.user.id,
            &token_digest(&secret),
            now,
            now + STREAM_TICKET_TTL_SECS * 1000,
        )?;
        Ok((secret, STREAM_TICKET_TTL_SECS))
    }

    /// Redeems a ticket: it works once, before it expires, for a user who
    /// is not suspended.
    pub fn redeem_stream_ticket(&self, ticket: &str) -> Result<Principal, AuthError> {
        if !ticket.starts_with(STREAM_TICKET_PREFIX) || ticket.len() > 128 {
            return Err(AuthError::Unauthenticated);
        }
        let user = self
            .repo
            .consume_stream_ticket(&token_digest(ticket), self.now())?
            .ok_or(AuthError::Unauthenticated)?;
        if user.status == UserStatus::Suspended {
            return Err(AuthError::Suspended);
        }
        Ok(Principal {
            user,
            method: AuthMethod::StreamTicket,
        })
    }

    // ----- API keys -------------------------------------------------------

    /// Creates a key for the caller. The secret is returned only here.
    pub fn create_api_key(
        &self,
        principal: &Principal,
        name: &str,
        expires_in_days: Option<u32>,
        ctx: &RequestContext,
    ) -> Result<NewApiKey, AuthError> {
        let name =
            validate::check_api_key_name(name).map_err(|e| AuthError::Validation(vec![e]))?;
        if let Some(d) = expires_in_days {
            if !(1..=3650).contains(&d) {
                return Err(AuthError::Validation(vec![FieldError::new(
                    "expires_in_days",
                    "out_of_range",
                    "must be between 1 and 3650",
                )]));
            }
        }
        let user_id = principal.user.id;
        let active = self.repo.active_api_keys(user_id)?.len() as u64;
        if active >= self.config.max_api_keys_per_user {
            return Err(AuthError::TooManyApiKeys(self.config.max_api_keys_per_user));
        }
        let now = self.now();
        let secret = format!("{API_KEY_PREFIX}{}", random_token(32));
        let key = ApiKey {
            id: Uuid::now_v7(),
            user_id,
            name,
            prefix: secret.chars().take(API_KEY_PREFIX.len() + 6).collect(),
            key_hash: token_digest(&secret),
            created_at: now,
            expires_at: expires_in_days.map(|d| now + i64::from(d) * 86_400_000),
            last_used_at: None,
            revoked_at: None,
        };
        self.repo.create_api_key(&key)?;
        self.audit(
            Some(user_id),
            audit::API_KEY_CREATED,
            None,
            ctx,
            Some(json!({"key_id": key.id, "name": key.name})),
        );
        Ok(NewApiKey { key, secret })
    }

    pub fn list_api_keys(&self, principal: &Principal) -> Result<Vec<ApiKey>, AuthError> {
        Ok(self.repo.active_api_keys(principal.user.id)?)
    }

    /// Revokes one of the caller's keys; another user's key id is "not found".
    pub fn revoke_api_key(
        &self,
        principal: &Principal,
        key_id: Uuid,
        ctx: &RequestContext,
    ) -> Result<(), AuthError> {
        if !self
            .repo
            .revoke_api_key(principal.user.id, key_id, self.now())?
        {
            return Err(AuthError::ApiKeyNotFound);
        }
        self.revoked(principal.user.id);
        self.audit(
            Some(principal.user.id),
            audit::API_KEY_REVOKED,
            None,
            ctx,
            Some(json!({"key_id": key_id})),
        );
        Ok(())
    }

    // ----- email verification and password reset ------------------------

    fn new_email_token(
        &self,
        user_id: Uuid,
        purpose: EmailTokenPurpose,
        ttl_secs: i64,
    ) -> Result<String, AuthError> {
        let secret = random_token(32);
        let now = self.now();
        self.repo.create_email_token(&EmailToken {
            id: Uuid::now_v7(),
            user_id,
            purpose,
            token_hash: token_digest(&secret),
            created_at: now,
            expires_at: now + ttl_secs * 1000,
            used_at: None,
        })?;
        Ok(secret)
    }

    /// Emails a new verification link (no-op when already verified).
    pub fn send_verification(&self, user: &User) -> Result<(), AuthError> {
        if user.email_verified_at.is_some() {
            return Ok(());
        }
        let token = self.new_email_token(
            user.id,
            EmailTokenPurpose::VerifyEmail,
            self.config.verify_email_ttl_secs,
        )?;
        let base = &self.config.public_url;
        let body = format!(
            "Hello {name},\n\nconfirm your email address for Muse by opening this link:\n\n  {base}/verify-email?token={token}\n\n\
             or from a terminal:\n\n  curl -X POST {base}/api/v1/auth/verify-email/{token}\n\n\
             The link works once and expires in {hours} hours.\n",
            name = user.username,
            hours = self.config.verify_email_ttl_secs / 3600,
        );
        self.mailer
            .send(&OutgoingEmail {
                to: user.email.clone(),
                subject: "Confirm your email address".to_string(),
                body,
            })
            .map_err(|e| AuthError::Internal(e.to_string()))
    }

    pub fn verify_email(&self, token: &str, ctx: &RequestContext) -> Result<(), AuthError> {
        let now = self.now();
        let row = self
            .repo
            .consume_email_token(&token_digest(token), EmailTokenPurpose::VerifyEmail, now)?
            .ok_or(AuthError::InvalidEmailToken)?;
        self.repo.mark_email_verified(row.user_id, now)?;
        self.audit(Some(row.user_id), audit::EMAIL_VERIFIED, None, ctx, None);
        Ok(())
    }

    /// Emails a reset link if the account exists. Returns `Ok(())` whether
    /// or not it does, and fails only on internal errors, never on a
    /// missing account or a mail failure (which is logged).
    pub fn forgot_password(&self, email: &str, ctx: &RequestContext) -> Result<(), AuthError> {
        let raw_email = email;
        let Ok(email) = validate::normalize_email(email) else {
            return Ok(());
        };
        let user = match self.user_by_email(&email, raw_email)? {
            Some(u) if u.status == UserStatus::Active => u,
            _ => {
                self.audit(
                    None,
                    audit::PASSWORD_RESET_REQUESTED,
                    Some(&email),
                    ctx,
                    Some(json!({"account": false})),
                );
                return Ok(());
            }
        };
        let token = self.new_email_token(
            user.id,
            EmailTokenPurpose::ResetPassword,
            self.config.reset_password_ttl_secs,
        )?;
        let base = &self.config.public_url;
        let body = format!(
            "Hello {name},\n\nsomeone (hopefully you) asked to reset your Muse password. Choose a new one here:\n\n  \
             {base}/reset-password?token={token}\n\nor from a terminal:\n\n  curl -X POST {base}/api/v1/auth/reset-password \
             -H 'content-type: application/json' -d '{{\"token\":\"{token}\",\"new_password\":\"…\"}}'\n\n\
             The link works once and expires in {mins} minutes. If you did not ask for it, ignore this email.\n",
            name = user.username,
            mins = self.config.reset_password_ttl_secs / 60,
        );
        let sent = self.mailer.send(&OutgoingEmail {
            to: user.email.clone(),
            subject: "Reset your Muse password".to_string(),
            body,
        });
        if let Err(e) = sent {
            tracing::error!(error = %e, user_id = %user.id, "password reset email not sent");
        }
        self.audit(
            Some(user.id),
            audit::PASSWORD_RESET_REQUESTED,
            Some(&email),
            ctx,
            None,
        );
        Ok(())
    }

    /// Sets a new password from a reset token and revokes every session.
    pub fn reset_password(
        &self,
        token: &str,
        new_password: &str,
        ctx: &RequestContext,
    ) -> Result<(), AuthError> {
        validate::check_password("new_password", new_password, None, None)
            .map_err(|e| AuthError::Validation(vec![e]))?;
        let hash = hash_password(new_password, self.config.bcrypt_cost)?;
        let user_id = self
            .repo
            .reset_password(&token_digest(token), &hash, self.now())?
            .ok_or(AuthError::InvalidEmailToken)?;
        self.revoked(user_id);
        self.audit(Some(user_id), audit::PASSWORD_RESET, None, ctx, None);
        Ok(())
    }

    /// Audit events of one user (or all, for admins), newest first.
    pub fn audit_log(
        &self,
        filter: &AuditFilter,
        page: PageRequest,
    ) -> Result<Page<AuditEvent>, AuthError> {
        Ok(self.repo.list_audit(filter, page)?)
    }

    // ----- administration ----------------------------------------------

    pub fn list_users(
        &self,
        query: &UserQuery,
        page: PageRequest,
    ) -> Result<Page<User>, AuthError> {
        Ok(self.repo.list_users(query, page)?)
    }

    /// Suspends or reinstates `target`. A suspended user's tokens and keys
    /// stop working on their next request (every request checks the
    /// status); nothing else is revoked, so reinstating restores access.
    /// Audited as `user.suspended` / `user.unsuspended`.
    pub fn set_status(
        &self,
        actor: &Principal,
        target: Uuid,
        status: UserStatus,
        ctx: &RequestContext,
    ) -> Result<User, AuthError> {
        if target == actor.user.id && status == UserStatus::Suspended {
            return Err(AuthError::Refused(
                "administrators cannot suspend themselves".into(),
            ));
        }
        let user = self
            .repo
            .user_by_id(target)?
            .ok_or(AuthError::UserNotFound)?;
        if status == UserStatus::Suspended
            && user.role == Role::Admin
            && user.status == UserStatus::Active
            && self.repo.count_users_with_role(Role::Admin)? <= 1
        {
            return Err(AuthError::Refused(
                "the last administrator cannot be suspended".into(),
            ));
        }
        let changed = self.repo.set_user_status(target, status, self.now())?;
        self.revoked(target);
        if !changed {
            return Err(AuthError::UserNotFound);
        }
        let event = match status {
            UserStatus::Suspended => audit::USER_SUSPENDED,
            UserStatus::Active => audit::USER_UNSUSPENDED,
        };
        self.audit(
            Some(actor.user.id),
            event,
            Some(&target.to_string()),
            ctx,
            Some(json!({"target": target, "email": user.email})),
        );
        Ok(User { status, ..user })
    }

    /// Makes `target` an admin or a plain user (never the last admin).
    /// Audited as `user.role_changed`.
    pub fn set_role(
        &self,
        actor: &Principal,
        target: Uuid,
        role: Role,
        ctx: &RequestContext,
    ) -> Result<User, AuthError> {
        let user = self
            .repo
            .user_by_id(target)?
            .ok_or(AuthError::UserNotFound)?;
        if user.role == Role::Admin
            && role == Role::User
            && self.repo.count_users_with_role(Role::Admin)? <= 1
        {
            return Err(AuthError::Refused(
                "the last administrator cannot be demoted".into(),
            ));
        }
        let changed = self.repo.set_user_role(target, role, self.now())?;
        self.revoked(target);
        if !changed {
            return Err(AuthError::UserNotFound);
        }
        self.audit(
            Some(actor.user.id),
            audit::ROLE_CHANGED,
            Some(&target.to_string()),
            ctx,
            Some(json!({"target": target, "from": user.role.as_str(), "to": role.as_str()})),
        );
        Ok(User { role, ..user })
    }
}
