//! The `muse` command line.

use std::io::{BufRead, Write};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::app::{build_state, describe};
use crate::config::Config;
use crate::server::{open_database, serve};
use crate::telemetry::init_tracing;

#[derive(Debug, Parser)]
#[command(name = "muse", version, about = "Muse: a self-hostable AI backend", long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API (the default).
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Run training workers without the HTTP server (share the database
    /// and MUSE_DATA_DIR with the server). Stops on SIGTERM/SIGINT.
    Worker {
        /// Workers in this process (default: TRAINING_WORKERS, at least 1).
        #[arg(long)]
        workers: Option<usize>,
    },
    /// Administrative tasks.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Create an administrator account. The password comes from
    /// MUSE_ADMIN_PASSWORD or, when unset, from the first line of stdin.
    Create {
        #[arg(long)]
        email: String,
        #[arg(long, default_value = "admin")]
        username: String,
    },
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "muse: {message}");
    ExitCode::FAILURE
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    let config = match Config::load() {
        Ok(c) => c,
        Err(e) => return fail(format!("configuration error: {e}")),
    };
    init_tracing(config.log_format);
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let result = actix_web::rt::System::new().block_on(serve(config));
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Command::Worker { workers } => {
            let result =
                actix_web::rt::System::new().block_on(crate::training::run_worker(config, workers));
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Command::Migrate => match open_database(&config) {
            Ok(db) => {
                let _ = writeln!(
                    std::io::stdout(),
                    "migrations applied ({} database)",
                    db.backend().name()
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Command::Admin {
            command: AdminCommand::Create { email, username },
        } => {
            let password = match std::env::var("MUSE_ADMIN_PASSWORD") {
                Ok(p) if !p.is_empty() => p,
                _ => {
                    let mut line = String::new();
                    if let Err(e) = std::io::stdin().lock().read_line(&mut line) {
                        return fail(format!("cannot read the password from stdin: {e}"));
                    }
                    line.trim_end_matches(['\r', '\n']).to_string()
                }
            };
            let state = match open_database(&config).and_then(|db| build_state(config, db)) {
                Ok(s) => s,
                Err(e) => return fail(e),
            };
            match state.auth.create_admin(&email, &username, &password) {
                Ok(user) => {
                    let _ = writeln!(
                        std::io::stdout(),
                        "created admin {} <{}> ({})",
                        user.username,
                        user.email,
                        user.id
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(format!("cannot create the admin: {}", describe(e))),
            }
        }
    }
}
