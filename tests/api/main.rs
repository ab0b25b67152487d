#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

//! End-to-end tests: the real server on 127.0.0.1:0, its own database
//! (SQLite, or a fresh PostgreSQL database when TEST_DATABASE_URL is set),
//! spoken to over HTTP.

mod finetune_upstream;
mod helpers;
mod upstream;

mod accounts;
mod admin;
mod api_keys;
mod billing;
mod email_flows;
mod errors;
mod ideas;
mod local_fidelity;
mod model_pulls;
mod models;
mod openai_api;
mod prompts;
mod rate_limits;
mod stripe;
mod system;
mod tokens;
mod training;
mod websocket;
