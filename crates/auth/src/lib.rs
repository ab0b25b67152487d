//! Accounts and authentication for Muse, usable without the HTTP shell.
//!
//! * [`AuthService`] holds the rules: registration, login with throttling,
//!   JWT access tokens bound to a server-side session, rotating refresh
//!   tokens with reuse detection, personal API keys, email verification and
//!   password reset.
//! * [`AuthRepository`] is the storage port (implemented with diesel in
//!   `muse-persistence`), [`Mailer`] the outgoing-mail port.
//!
//! Every method of [`AuthService`] is **blocking** (bcrypt and database work):
//! call it from a blocking thread pool (`tokio::task::spawn_blocking`,
//! `actix_web::web::block`), never directly on an async executor.

pub mod cache;
mod common_passwords;
pub mod error;
pub mod jwt;
pub mod mail;
pub mod model;
pub mod password;
pub mod repo;
pub mod service;
pub mod validate;

pub use error::{AuthError, FieldError};
pub use jwt::{Claims, JwtKeys};
pub use mail::{MailError, Mailer, OutgoingEmail};
pub use model::*;
pub use repo::{AuditFilter, AuditQuery, AuthRepository, RepoError, RepoResult, UserQuery};
pub use service::{
    AuthConfig, AuthService, NewApiKey, RequestContext, ThrottleConfig, TokenPair, API_KEY_PREFIX,
    STREAM_TICKET_PREFIX, STREAM_TICKET_TTL_SECS,
};
