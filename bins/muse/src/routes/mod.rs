//! Routes, one module per area, each with `config(cfg)`.

pub mod admin;
pub mod ai;
pub mod auth;
pub mod executions;
pub mod ideas;
pub mod library;
pub mod openai;
pub mod pages;
pub mod sse;
pub mod subscription;
pub mod system;
pub mod train;

use actix_web::web;

use crate::error::ApiError;

/// Runs blocking domain work (diesel, bcrypt) on the blocking pool.
pub async fn blocking<T, E>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, ApiError>
where
    T: Send + 'static,
    E: Into<ApiError> + Send + 'static,
{
    web::block(f).await?.map_err(Into::into)
}

/// Milliseconds since the epoch as RFC 3339 (UTC, millisecond precision).
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// `?page=&per_page=` for lists that take nothing else.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
pub struct PageQuery {
    pub page: Option<u32>,
    pub per_page: Option<u32>,
}

impl PageQuery {
    pub fn request(&self) -> muse_core::PageRequest {
        muse_core::PageRequest::new(self.page, self.per_page)
    }
}

/// A 400 `invalid_query_parameter`.
pub fn bad_query(message: String) -> ApiError {
    ApiError::bad_request("invalid_query_parameter", message)
}

/// An optional RFC 3339 query parameter as milliseconds since the epoch.
pub fn time(name: &str, value: &Option<String>) -> Result<Option<i64>, ApiError> {
    value
        .as_deref()
        .map(|v| {
            chrono::DateTime::parse_from_rfc3339(v)
                .map(|t| t.timestamp_millis())
                .map_err(|e| {
                    bad_query(format!(
                        "{name}: expected an RFC 3339 time such as 2026-11-22T10:00:00Z ({e})"
                    ))
                })
        })
        .transpose()
}
