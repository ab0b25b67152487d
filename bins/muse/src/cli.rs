//! The `muse` command line.

use std::io::{BufRead, Write};
use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

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
    /// Serve the HTTP API (the default). Every setting below is read from
    /// its environment variable (or `.env`, or the `MUSE_CONFIG` file); a
    /// flag given here wins.
    Serve(Box<ServeArgs>),
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
    /// The local model cache (MODEL_CACHE_DIR, a Hugging Face cache layout).
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
}

/// `muse serve`'s flags: every setting (see [`crate::settings`]).
#[derive(Clone, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub settings: crate::settings::Settings,
}

impl std::fmt::Debug for ServeArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Settings hold secrets: never printed.
        f.write_str("ServeArgs { .. }")
    }
}

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Download one ONNX variant of a model from the Hugging Face Hub
    /// (HF_ENDPOINT, HF_TOKEN; refused when HF_HUB_OFFLINE is set): only
    /// the files that variant needs, its tokenizer and configs.
    Pull {
        /// `org/name`, e.g. HuggingFaceTB/SmolLM2-135M-Instruct.
        model: String,
        /// `fp32` (default), `fp16`, `int8`, `q4`, `quantized`, … as the
        /// repository publishes them (`onnx/model_<variant>.onnx`).
        #[arg(long)]
        variant: Option<String>,
    },
    /// What is in the cache: size, and whether each model can be served.
    List,
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

/// Parses the process's command line and runs it. On `muse serve`, the
/// settings are flags: the environment is read for them only by
/// [`Config::load`] (one parse, with the settings file and `.env` layered
/// in), and shown in `--help`.
pub fn main() -> ExitCode {
    let help = std::env::args_os()
        .skip(1)
        .any(|a| a == "--help" || a == "-h" || a == "help");
    let mut cmd = Cli::command().mut_subcommand("serve", |s| {
        s.mut_args(|a| {
            if help {
                a.hide_env_values(true)
            } else {
                a.env(None::<&str>)
            }
        })
    });
    let matches = cmd.get_matches_mut();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.format(&mut cmd).exit(),
    };
    let mut flags = Vec::new();
    if let (Some(("serve", m)), Some(serve)) = (matches.subcommand(), cmd.find_subcommand("serve"))
    {
        for arg in serve.get_arguments() {
            let id = arg.get_id().as_str();
            if m.value_source(id) != Some(ValueSource::CommandLine) {
                continue;
            }
            if let (Some(long), Some(values)) = (arg.get_long(), m.get_raw(id)) {
                for v in values {
                    let mut flag = std::ffi::OsString::from(format!("--{long}="));
                    flag.push(v);
                    flags.push(flag);
                }
            }
        }
    }
    run(cli, &flags)
}

/// Runs a parsed command line; `flags` are the settings given as flags.
pub fn run(cli: Cli, flags: &[std::ffi::OsString]) -> ExitCode {
    let config = match Config::load(flags) {
        Ok(c) => c,
        Err(e) => return fail(format!("configuration error: {e}")),
    };
    // Held until this function returns: the log lines still queued are
    // written out before the process exits.
    let _log = init_tracing(config.log_format);
    match cli.command {
        None | Some(Command::Serve(_)) => {
            let result = actix_web::rt::System::new().block_on(serve(config));
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Some(Command::Worker { workers }) => {
            let result =
                actix_web::rt::System::new().block_on(crate::training::run_worker(config, workers));
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Some(Command::Migrate) => match open_database(&config) {
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
        Some(Command::Models {
            command: ModelsCommand::List,
        }) => {
            let models = muse_inference::local::resolve::scan_cache(&config.llm.model_cache_dir);
            let mut out = std::io::stdout().lock();
            let _ = writeln!(
                out,
                "{} ({} models)",
                config.llm.model_cache_dir.display(),
                models.len()
            );
            for m in models {
                let status = m
                    .problem
                    .as_deref()
                    .map_or("ready".to_string(), |p| format!("cannot be served: {p}"));
                let _ = writeln!(
                    out,
                    "{:<50} {:>10.1} MB  {status}",
                    m.id,
                    m.size_bytes as f64 / 1e6
                );
            }
            ExitCode::SUCCESS
        }
        Some(Command::Models {
            command: ModelsCommand::Pull { model, variant },
        }) => pull(&config, &model, variant.as_deref()),
        Some(Command::Admin {
            command: AdminCommand::Create { email, username },
        }) => {
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

/// `muse models pull`: progress on stderr (one updating line on a
/// terminal, a line per 10 % otherwise).
fn pull(config: &Config, model: &str, variant: Option<&str>) -> ExitCode {
    use std::io::IsTerminal;
    let hub = muse_inference::local::download::HubConfig {
        endpoint: config.llm.hf_endpoint.clone(),
        token: config.llm.hf_token.clone(),
        offline: config.llm.hf_offline,
    };
    let tty = std::io::stderr().is_terminal();
    let last = std::sync::Mutex::new((String::new(), 0u64));
    let progress = move |p: muse_inference::local::download::DownloadProgress| {
        let pct = (p.done_bytes * 100)
            .checked_div(p.total_bytes)
            .unwrap_or(100);
        let Ok(mut last) = last.lock() else { return };
        if !tty && last.0 == p.file && pct < last.1 + 10 && pct < 100 {
            return;
        }
        *last = (p.file.clone(), pct);
        let line = format!(
            "{} {:>3}% ({:.1}/{:.1} MB)",
            p.file,
            pct,
            p.done_bytes as f64 / 1e6,
            p.total_bytes as f64 / 1e6
        );
        let mut err = std::io::stderr().lock();
        let _ = if tty {
            write!(err, "\r\x1b[2K{line}")
        } else {
            writeln!(err, "{line}")
        };
        if tty && pct >= 100 {
            let _ = writeln!(err);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let result = runtime.block_on(muse_inference::local::download::ensure_model_variant(
        &config.llm.model_cache_dir,
        model,
        &hub,
        variant,
        progress,
    ));
    match result {
        Ok(dir) => {
            let _ = writeln!(
                std::io::stdout(),
                "{model} is ready ({}); use it as local/{model}",
                match muse_inference::local::resolve::servable_problem(&dir) {
                    None => "servable".to_string(),
                    Some(p) => format!("but cannot be served: {p}"),
                }
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(format!("cannot pull {model}: {e}")),
    }
}
