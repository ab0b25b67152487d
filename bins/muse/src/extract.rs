//! Request extractors: the authenticated caller, an admin, and the
//! client's address for audit and throttling.

use std::future::Future;
use std::pin::Pin;

use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::{web, FromRequest, HttpRequest};
use muse_auth::{Principal, RequestContext};

use crate::error::ApiError;
use crate::state::AppState;

/// The caller, authenticated by `Authorization: Bearer <JWT or muse_sk_ key>`.
#[derive(Debug, Clone)]
pub struct CurrentUser(pub Principal);

/// The caller, who must have the admin role (403 otherwise).
#[derive(Debug, Clone)]
pub struct AdminUser(pub Principal);

fn bearer(req: &HttpRequest) -> Result<String, ApiError> {
    let value = req.headers().get(header::AUTHORIZATION).ok_or_else(|| {
        ApiError::unauthorized("missing Authorization header (expected: Bearer <token>)")
    })?;
    let value = value
        .to_str()
        .map_err(|_| ApiError::unauthorized("malformed Authorization header"))?;
    let (scheme, token) = value.trim().split_once(' ').ok_or_else(|| {
        ApiError::unauthorized("malformed Authorization header (expected: Bearer <token>)")
    })?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() || token.len() > 4096 {
        return Err(ApiError::unauthorized(
            "malformed Authorization header (expected: Bearer <token>)",
        ));
    }
    Ok(token.to_string())
}

fn state(req: &HttpRequest) -> Result<web::Data<AppState>, ApiError> {
    req.app_data::<web::Data<AppState>>()
        .cloned()
        .ok_or_else(|| ApiError::internal("extractor", "AppState missing"))
}

impl FromRequest for CurrentUser {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let prepared = bearer(req).and_then(|t| Ok((t, state(req)?)));
        let (method, path) = (req.method().clone(), req.path().to_string());
        Box::pin(async move {
            let (token, state) = prepared?;
            // A caller verified moments ago is in memory: no database read,
            // no hop to the blocking pool.
            let principal = match state.auth.authenticate_cached(&token) {
                Some(cached) => cached?,
                None => {
                    let auth = state.auth.clone();
                    web::block(move || auth.authenticate(&token)).await??
                }
            };
            crate::limits::per_user(&state, &method, &path, principal.user.id).await?;
            Ok(CurrentUser(principal))
        })
    }
}

impl FromRequest for AdminUser {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let user = CurrentUser::from_request(req, payload);
        Box::pin(async move {
            let CurrentUser(p) = user.await?;
            if !p.is_admin() {
                return Err(ApiError::forbidden("this endpoint is for administrators"));
            }
            Ok(AdminUser(p))
        })
    }
}

/// Client address and user agent. The address is the TCP peer, or the
/// `Forwarded`/`X-Forwarded-For` value when `TRUST_PROXY_HEADERS=true`.
pub fn request_context(req: &HttpRequest, trust_proxy: bool) -> RequestContext {
    let ip = if trust_proxy {
        req.connection_info().realip_remote_addr().map(strip_port)
    } else {
        req.peer_addr().map(|a| a.ip().to_string())
    };
    RequestContext {
        ip,
        user_agent: req
            .headers()
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    }
}

fn strip_port(addr: &str) -> String {
    if let Ok(sock) = addr.parse::<std::net::SocketAddr>() {
        return sock.ip().to_string();
    }
    addr.to_string()
}

/// [`RequestContext`] as an extractor.
#[derive(Debug, Clone)]
pub struct ClientContext(pub RequestContext);

impl FromRequest for ClientContext {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let trust = req
            .app_data::<web::Data<AppState>>()
            .is_some_and(|s| s.config.trust_proxy_headers);
        std::future::ready(Ok(ClientContext(request_context(req, trust))))
    }
}

/// The caller of a stream request: by `?ticket=` (a single-use stream
/// ticket, for browsers) when one is given, else by the `Authorization`
/// header.
pub async fn user_or_ticket(
    req: &HttpRequest,
    ticket: Option<String>,
) -> Result<Principal, ApiError> {
    match ticket {
        Some(ticket) => {
            let state = state(req)?;
            let auth = state.auth.clone();
            let principal = web::block(move || auth.redeem_stream_ticket(&ticket)).await??;
            crate::limits::per_user(&state, req.method(), req.path(), principal.user.id).await?;
            Ok(principal)
        }
        None => {
            let mut payload = Payload::None;
            CurrentUser::from_request(req, &mut payload)
                .await
                .map(|u| u.0)
        }
    }
}
