//! `/api/v1/auth`: accounts, sessions, API keys, email flows.

use actix_web::{web, HttpResponse};
use muse_auth::{ApiKey, TokenPair, User};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::{blocking, rfc3339};
use crate::error::{ApiError, ErrorBody};
use crate::extract::{ClientContext, CurrentUser};
use crate::state::AppState;

pub fn config(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/api/v1/auth")
            .service(web::resource("/register").post(register))
            .service(web::resource("/login").post(login))
            .service(web::resource("/refresh").post(refresh))
            .service(web::resource("/logout").post(logout))
            .service(web::resource("/me").get(me))
            .service(web::resource("/profile").get(me))
            .service(
                web::resource("/api-keys")
                    .post(create_api_key)
                    .get(list_api_keys),
            )
            .service(web::resource("/api-keys/{key_id}").delete(delete_api_key))
            .service(web::resource("/verify-email/{token}").post(verify_email))
            .service(web::resource("/resend-verification").post(resend_verification))
            .service(web::resource("/forgot-password").post(forgot_password))
            .service(web::resource("/reset-password").post(reset_password)),
    );
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// Normalised to lowercase.
    #[schema(example = "ada@example.com")]
    pub email: String,
    /// 3–32 characters: letters, digits, `_`, `-`, `.`; case-insensitive.
    #[schema(example = "ada")]
    pub username: String,
    /// 8–128 characters; common passwords are refused.
    #[schema(example = "correct horse battery staple")]
    pub password: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    #[schema(example = "ada@example.com")]
    pub email: String,
    pub password: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    pub refresh_token: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TokenResponse {
    /// HS256 JWT; send as `Authorization: Bearer …`.
    pub access_token: String,
    /// Always `bearer`.
    #[schema(example = "bearer")]
    pub token_type: &'static str,
    /// Seconds until the access token expires.
    pub expires_in: i64,
    /// Single use: `/refresh` returns a new one each time.
    pub refresh_token: String,
    pub refresh_expires_in: i64,
}

impl From<TokenPair> for TokenResponse {
    fn from(p: TokenPair) -> Self {
        Self {
            access_token: p.access_token,
            token_type: "bearer",
            expires_in: p.expires_in,
            refresh_token: p.refresh_token,
            refresh_expires_in: p.refresh_expires_in,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UserProfile {
    pub id: Uuid,
    pub email: String,
    pub username: String,
    /// `user` or `admin`.
    pub role: String,
    /// `active` or `suspended`.
    pub status: String,
    pub email_verified: bool,
    pub email_verified_at: Option<String>,
    pub created_at: String,
}

impl From<&User> for UserProfile {
    fn from(u: &User) -> Self {
        Self {
            id: u.id,
            email: u.email.clone(),
            username: u.username.clone(),
            role: u.role.as_str().to_string(),
            status: u.status.as_str().to_string(),
            email_verified: u.email_verified_at.is_some(),
            email_verified_at: u.email_verified_at.map(rfc3339),
            created_at: rfc3339(u.created_at),
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKeyRequest {
    /// 1–64 characters.
    #[schema(example = "ci pipeline")]
    pub name: String,
    /// 1–3650; no expiry when absent.
    pub expires_in_days: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKeyInfo {
    pub id: Uuid,
    pub name: String,
    /// The first characters of the key, to recognise it.
    pub prefix: String,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub last_used_at: Option<String>,
}

impl From<&ApiKey> for ApiKeyInfo {
    fn from(k: &ApiKey) -> Self {
        Self {
            id: k.id,
            name: k.name.clone(),
            prefix: k.prefix.clone(),
            created_at: rfc3339(k.created_at),
            expires_at: k.expires_at.map(rfc3339),
            last_used_at: k.last_used_at.map(rfc3339),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedApiKey {
    #[serde(flatten)]
    pub info: ApiKeyInfo,
    /// The secret key (`muse_sk_…`). Shown only in this response.
    pub key: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKeyList {
    pub items: Vec<ApiKeyInfo>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForgotPasswordRequest {
    pub email: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetPasswordRequest {
    /// The token from the emailed link.
    pub token: String,
    pub new_password: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MessageResponse {
    pub message: String,
}

fn message(m: &str) -> MessageResponse {
    MessageResponse {
        message: m.to_string(),
    }
}

/// Create an account. A verification link is emailed.
#[utoipa::path(post, path = "/api/v1/auth/register", tag = "auth", request_body = RegisterRequest,
    responses(
        (status = 201, body = UserProfile),
        (status = 409, description = "email_taken or username_taken", body = ErrorBody),
        (status = 422, description = "validation_failed, with every bad field", body = ErrorBody),
    ))]
pub async fn register(
    state: web::Data<AppState>,
    ctx: ClientContext,
    body: web::Json<RegisterRequest>,
) -> Result<HttpResponse, ApiError> {
    let auth = state.auth.clone();
    let b = body.into_inner();
    let user = blocking(move || auth.register(&b.email, &b.username, &b.password, &ctx.0)).await?;
    Ok(HttpResponse::Created().json(UserProfile::from(&user)))
}

/// Exchange email and password for an access token and a refresh token.
#[utoipa::path(post, path = "/api/v1/auth/login", tag = "auth", request_body = LoginRequest,
    responses(
        (status = 200, body = TokenResponse),
        (status = 401, description = "invalid_credentials", body = ErrorBody),
        (status = 403, description = "account_suspended", body = ErrorBody),
        (status = 429, description = "too_many_attempts, with Retry-After", body = ErrorBody),
    ))]
pub async fn login(
    state: web::Data<AppState>,
    ctx: ClientContext,
    body: web::Json<LoginRequest>,
) -> Result<web::Json<TokenResponse>, ApiError> {
    let b = body.into_inner();
    // With the rate limiter on, failed logins are throttled by it (shared
    // across replicas through Redis): refused before any bcrypt work.
    let throttle = crate::limits::login_throttle(&state, &b.email, ctx.0.ip.as_deref());
    if let Some(t) = &throttle {
        t.check().await?;
    }
    let auth = state.auth.clone();
    let result = blocking(move || auth.login(&b.email, &b.password, &ctx.0)).await;
    if let (Some(t), Err(e)) = (&throttle, &result) {
        if e.code == "invalid_credentials" {
            t.charge().await;
        }
    }
    Ok(web::Json(result?.into()))
}

/// Rotate a refresh token. Reusing an old one revokes its whole session.
#[utoipa::path(post, path = "/api/v1/auth/refresh", tag = "auth", request_body = RefreshRequest,
    responses(
        (status = 200, body = TokenResponse),
        (status = 401, description = "invalid_refresh_token", body = ErrorBody),
    ))]
pub async fn refresh(
    state: web::Data<AppState>,
    ctx: ClientContext,
    body: web::Json<RefreshRequest>,
) -> Result<web::Json<TokenResponse>, ApiError> {
    let auth = state.auth.clone();
    let token = body.into_inner().refresh_token;
    let pair = blocking(move || auth.refresh(&token, &ctx.0)).await?;
    Ok(web::Json(pair.into()))
}

/// End the current session: this access token and its refresh tokens stop working.
#[utoipa::path(post, path = "/api/v1/auth/logout", tag = "auth", security(("bearer" = [])),
    responses(
        (status = 204, description = "logged out"),
        (status = 400, description = "session_required (called with an API key)", body = ErrorBody),
        (status = 401, body = ErrorBody),
    ))]
pub async fn logout(
    state: web::Data<AppState>,
    user: CurrentUser,
    ctx: ClientContext,
) -> Result<HttpResponse, ApiError> {
    let auth = state.auth.clone();
    blocking(move || auth.logout(&user.0, &ctx.0)).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// The caller's profile (also at `/api/v1/auth/profile`).
#[utoipa::path(get, path = "/api/v1/auth/me", tag = "auth", security(("bearer" = [])),
    responses((status = 200, body = UserProfile), (status = 401, body = ErrorBody), (status = 403, description = "account_suspended", body = ErrorBody)))]
pub async fn me(user: CurrentUser) -> web::Json<UserProfile> {
    web::Json(UserProfile::from(&user.0.user))
}

/// Create a personal API key, usable wherever a bearer token is.
#[utoipa::path(post, path = "/api/v1/auth/api-keys", tag = "auth", security(("bearer" = [])), request_body = CreateApiKeyRequest,
    responses(
        (status = 201, body = CreatedApiKey),
        (status = 409, description = "api_key_limit", body = ErrorBody),
        (status = 422, body = ErrorBody),
    ))]
pub async fn create_api_key(
    state: web::Data<AppState>,
    user: CurrentUser,
    ctx: ClientContext,
    body: web::Json<CreateApiKeyRequest>,
) -> Result<HttpResponse, ApiError> {
    let auth = state.auth.clone();
    let b = body.into_inner();
    let created =
        blocking(move || auth.create_api_key(&user.0, &b.name, b.expires_in_days, &ctx.0)).await?;
    Ok(HttpResponse::Created().json(CreatedApiKey {
        info: ApiKeyInfo::from(&created.key),
        key: created.secret,
    }))
}

/// The caller's active API keys, newest first (at most 50 exist).
#[utoipa::path(get, path = "/api/v1/auth/api-keys", tag = "auth", security(("bearer" = [])),
    responses((status = 200, body = ApiKeyList), (status = 401, body = ErrorBody)))]
pub async fn list_api_keys(
    state: web::Data<AppState>,
    user: CurrentUser,
) -> Result<web::Json<ApiKeyList>, ApiError> {
    let auth = state.auth.clone();
    let keys = blocking(move || auth.list_api_keys(&user.0)).await?;
    Ok(web::Json(ApiKeyList {
        items: keys.iter().map(ApiKeyInfo::from).collect(),
    }))
}

/// Revoke one of the caller's API keys.
#[utoipa::path(delete, path = "/api/v1/auth/api-keys/{key_id}", tag = "auth", security(("bearer" = [])),
    params(("key_id" = Uuid, Path, description = "the key id")),
    responses((status = 204, description = "revoked"), (status = 404, body = ErrorBody), (status = 400, description = "invalid_path_parameter", body = ErrorBody)))]
pub async fn delete_api_key(
    state: web::Data<AppState>,
    user: CurrentUser,
    ctx: ClientContext,
    path: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    let auth = state.auth.clone();
    let key_id = path.into_inner();
    blocking(move || auth.revoke_api_key(&user.0, key_id, &ctx.0)).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// Confirm an email address with the token from the emailed link.
#[utoipa::path(post, path = "/api/v1/auth/verify-email/{token}", tag = "auth",
    params(("token" = String, Path, description = "the token from the link")),
    responses((status = 200, body = MessageResponse), (status = 400, description = "invalid_token", body = ErrorBody)))]
pub async fn verify_email(
    state: web::Data<AppState>,
    ctx: ClientContext,
    path: web::Path<String>,
) -> Result<web::Json<MessageResponse>, ApiError> {
    let auth = state.auth.clone();
    let token = path.into_inner();
    blocking(move || auth.verify_email(&token, &ctx.0)).await?;
    Ok(web::Json(message("email verified")))
}

/// Email a new verification link to the caller.
#[utoipa::path(post, path = "/api/v1/auth/resend-verification", tag = "auth", security(("bearer" = [])),
    responses((status = 202, body = MessageResponse), (status = 401, body = ErrorBody)))]
pub async fn resend_verification(
    state: web::Data<AppState>,
    user: CurrentUser,
) -> Result<HttpResponse, ApiError> {
    let auth = state.auth.clone();
    let already = user.0.user.email_verified_at.is_some();
    blocking(move || auth.send_verification(&user.0.user)).await?;
    let msg = if already {
        "email already verified"
    } else {
        "verification email sent"
    };
    Ok(HttpResponse::Accepted().json(message(msg)))
}

const FORGOT_ANSWER: &str = "if an account exists for this email, a reset link has been sent";

/// Ask for a password-reset link. The answer is the same whether or not the account exists.
#[utoipa::path(post, path = "/api/v1/auth/forgot-password", tag = "auth", request_body = ForgotPasswordRequest,
    responses((status = 202, body = MessageResponse)))]
pub async fn forgot_password(
    state: web::Data<AppState>,
    ctx: ClientContext,
    body: web::Json<ForgotPasswordRequest>,
) -> Result<HttpResponse, ApiError> {
    let auth = state.auth.clone();
    let email = body.into_inner().email;
    // Answer at once, whatever happens next: neither the body nor the
    // response time may tell whether the account exists.
    actix_web::rt::spawn(async move {
        match web::block(move || auth.forgot_password(&email, &ctx.0)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "forgot-password failed"),
            Err(e) => tracing::error!(error = %e, "forgot-password task failed"),
        }
    });
    Ok(HttpResponse::Accepted().json(message(FORGOT_ANSWER)))
}

/// Set a new password with a reset token. Every session of the user ends.
#[utoipa::path(post, path = "/api/v1/auth/reset-password", tag = "auth", request_body = ResetPasswordRequest,
    responses(
        (status = 200, body = MessageResponse),
        (status = 400, description = "invalid_token", body = ErrorBody),
        (status = 422, body = ErrorBody),
    ))]
pub async fn reset_password(
    state: web::Data<AppState>,
    ctx: ClientContext,
    body: web::Json<ResetPasswordRequest>,
) -> Result<web::Json<MessageResponse>, ApiError> {
    let auth = state.auth.clone();
    let b = body.into_inner();
    blocking(move || auth.reset_password(&b.token, &b.new_password, &ctx.0)).await?;
    Ok(web::Json(message("password changed; log in again")))
}
