//! The Muse HTTP server: a thin actix-web shell over the domain crates.
//!
//! [`app::build_app`] builds the one application that `muse serve` and the
//! tests both run.

pub mod app;
pub mod audit;
pub mod cli;
pub mod config;
pub mod error;
pub mod extract;
pub mod flags;
pub mod inference;
pub mod limits;
pub mod mail;
pub mod openapi;
pub mod pulls;
pub mod quota;
pub mod routes;
pub mod server;
pub mod settings;
pub mod state;
pub mod telemetry;
pub mod training;
pub mod ws;

pub use app::{build_app, build_state, StartError};
pub use cli::{run, Cli};
pub use config::Config;
pub use state::AppState;
