//! Every setting Muse reads, declared once with clap: its variable, type,
//! default and meaning. `muse serve --help` lists them, the README's
//! configuration table is generated from them (`markdown_table`, checked by
//! a test), and [`crate::config::Config`] is built from the parsed values.
//!
//! Layers, lowest first: the defaults declared here, an optional TOML file
//! (`MUSE_CONFIG`, else `./muse.toml` when present), a `.env` file in the
//! working directory, the environment, and flags given to `muse serve` or
//! `muse worker`. An empty value counts as unset.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::path::PathBuf;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Args, CommandFactory, FromArgMatches, Parser};

use crate::config::{ConfigError, Environment, ExecutionWrites, LogFormat, QuotaStore};

/// All settings (flattened into `muse serve` and `muse worker`).
#[derive(Clone, Args)]
pub struct Settings {
    #[command(flatten)]
    pub server: ServerSettings,
    #[command(flatten)]
    pub accounts: AccountSettings,
    #[command(flatten)]
    pub models: ModelSettings,
    #[command(flatten)]
    pub limits: LimitSettings,
    #[command(flatten)]
    pub training: TrainingSettings,
}

#[derive(Clone, Args)]
#[command(next_help_heading = "Server")]
pub struct ServerSettings {
    /// A TOML file of settings, layered under the environment: any setting
    /// by its variable name (`port = 8080`), lists as arrays, and tables for
    /// `model_aliases` and `model_prices` (docs/configuration.md) (default:
    /// `./muse.toml` when it exists)
    #[arg(long, env)]
    pub muse_config: Option<PathBuf>,
    /// `production` refuses weak settings at start (JWT secret, bcrypt cost)
    #[arg(long, env, value_enum, default_value = "development")]
    pub muse_env: Environment,
    /// Listen address (`0.0.0.0` to expose)
    #[arg(long, env, default_value = "127.0.0.1")]
    pub host: String,
    /// Listen port
    #[arg(long, env, default_value_t = 8000)]
    pub port: u16,
    /// HTTP worker threads (default: the number of CPUs)
    #[arg(long, env)]
    pub workers: Option<usize>,
    /// SQLite file, development JWT secret, email outbox, datasets
    #[arg(long, env, default_value = "./data")]
    pub muse_data_dir: PathBuf,
    /// `sqlite://path` or `postgres://user:pass@host/db`; any other scheme is
    /// an error. SQLAlchemy's forms work as there: `sqlite:///./db/muse.db`
    /// is relative to the working directory, `sqlite:////abs/muse.db`
    /// absolute. A PostgreSQL URL's parameters go to libpq as written
    /// (`?sslmode=require`, `?options=-c%20synchronous_commit%3Doff` for
    /// Muse's connections alone: docs/architecture.md) (default:
    /// `sqlite://$MUSE_DATA_DIR/muse.db`)
    #[arg(long, env)]
    pub database_url: Option<String>,
    /// r2d2 pool size
    #[arg(long, env, default_value_t = 16)]
    pub database_pool_size: u32,
    /// Base of the links in emails (default: `http://HOST:PORT`)
    #[arg(long, env)]
    pub public_url: Option<String>,
    /// Comma-separated allowed origins, or `*`; production allows only
    /// these (default: none; in development `http(s)://localhost` and
    /// `127.0.0.1` on any port)
    #[arg(long, env)]
    pub cors_origins: Option<String>,
    /// Take the client address from `Forwarded`/`X-Forwarded-For` (only
    /// behind a proxy you control)
    #[arg(long, env, default_value_t = false, action = ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub trust_proxy_headers: bool,
    /// Request body limit (413 above)
    #[arg(long, env, default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Close a WebSocket that sends nothing for this long
    #[arg(long, env, default_value_t = 60)]
    pub ws_idle_timeout_secs: u64,
    /// How often each replica reloads the feature flags
    #[arg(long, env, default_value_t = 5)]
    pub feature_flags_refresh_secs: u64,
    /// On SIGTERM, how long `/health/ready` answers 503 (while still
    /// serving) before the server stops accepting connections
    #[arg(long, env, default_value_t = 0)]
    pub shutdown_delay_ms: u64,
    /// On SIGTERM, how long in-flight requests and streams may take before
    /// they are cut
    #[arg(long, env, default_value_t = 30)]
    pub shutdown_grace_secs: u64,
    /// Where quota reservations are counted: in the process (one server
    /// process only), on Redis or by a conditional `UPDATE` (any number of
    /// replicas) (default: `memory` on SQLite; on PostgreSQL `redis` when
    /// `REDIS_URL` is set, else `database`)
    #[arg(long, env, value_enum)]
    pub quota_store: Option<QuotaStore>,
    /// `sync`: a model call is answered once its record is committed (group
    /// commit); `async`: answered at once, the record follows
    #[arg(long, env, value_enum, default_value = "sync")]
    pub execution_writes: ExecutionWrites,
    /// Above 2,000 model calls per second, how long (µs, at most 10000) a
    /// group commit waits for more calls before it commits: fewer commits
    /// and a shorter tail at high rates, for this much more at the median
    /// there; 0 commits every batch at once
    #[arg(long, env, default_value_t = 200, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub execution_batch_window_us: u64,
    /// `json` for one JSON object per line
    #[arg(long, env, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Log filter (`muse_server=debug,info`, …) (default: `info`)
    #[arg(long, env)]
    pub rust_log: Option<String>,
}

#[derive(Clone, Args)]
#[command(next_help_heading = "Accounts")]
pub struct AccountSettings {
    /// HS256 key; required and at least 32 bytes in production; in
    /// development a random one is kept in `$MUSE_DATA_DIR/jwt_secret`
    /// (0600) (default: generated in development)
    #[arg(long, env)]
    pub jwt_secret: Option<String>,
    /// Checked on every token
    #[arg(long, env, default_value = "muse")]
    pub jwt_issuer: String,
    /// Checked on every token
    #[arg(long, env, default_value = "muse-api")]
    pub jwt_audience: String,
    /// Access token lifetime (60–86400)
    #[arg(long, env, default_value_t = 900, value_parser = clap::value_parser!(i64).range(60..=86_400))]
    pub access_token_ttl_secs: i64,
    /// Session (refresh family) lifetime (300–31536000)
    #[arg(long, env, default_value_t = 30 * 86_400, value_parser = clap::value_parser!(i64).range(300..=365 * 86_400))]
    pub refresh_token_ttl_secs: i64,
    /// How long a verified caller is kept in memory (0: off, at most 60000):
    /// the bound on how late a revocation made on another replica is seen
    /// without Redis
    #[arg(long, env, default_value_t = 2_000, value_parser = clap::value_parser!(i64).range(0..=60_000))]
    pub auth_cache_ttl_ms: i64,
    /// 4–31; at least 10 in production
    #[arg(long, env, default_value_t = 12, value_parser = clap::value_parser!(u32).range(4..=31))]
    pub bcrypt_cost: u32,
    /// Failed logins per email per window before 429
    #[arg(long, env, default_value_t = 5)]
    pub login_max_failures_per_account: u32,
    /// Failed logins per client address per window
    #[arg(long, env, default_value_t = 20)]
    pub login_max_failures_per_ip: u32,
    /// Login throttling window (1–86400)
    #[arg(long, env, default_value_t = 900, value_parser = clap::value_parser!(i64).range(1..=86_400))]
    pub login_failure_window_secs: i64,
    /// Create this admin at start if no account has that email
    #[arg(long, env)]
    pub admin_email: Option<String>,
    /// The password of `ADMIN_EMAIL`'s account
    #[arg(long, env)]
    pub admin_password: Option<String>,
    /// The username of `ADMIN_EMAIL`'s account
    #[arg(long, env, default_value = "admin")]
    pub admin_username: String,
    /// `smtp://user:pass@host:587?tls=required` or `smtps://…` (default:
    /// unset, emails are written to `$MUSE_DATA_DIR/outbox`)
    #[arg(long, env)]
    pub smtp_url: Option<String>,
    /// Sender address
    #[arg(long, env, default_value = "Muse <no-reply@muse.local>")]
    pub mail_from: String,
}

#[derive(Clone, Args)]
#[command(next_help_heading = "Models")]
pub struct ModelSettings {
    /// Enables OpenAI
    #[arg(long, env)]
    pub openai_api_key: Option<String>,
    /// OpenAI's base URL (default: `https://api.openai.com/v1`)
    #[arg(long, env)]
    pub openai_base_url: Option<String>,
    /// The OpenAI models offered, comma separated
    #[arg(long, env, default_value = "gpt-4o-mini,gpt-4o")]
    pub openai_models: String,
    /// Enables Anthropic
    #[arg(long, env)]
    pub anthropic_api_key: Option<String>,
    /// Anthropic's base URL (default: `https://api.anthropic.com`)
    #[arg(long, env)]
    pub anthropic_base_url: Option<String>,
    /// The Anthropic models offered, comma separated
    #[arg(
        long,
        env,
        default_value = "claude-3-5-haiku-latest,claude-3-5-sonnet-latest"
    )]
    pub anthropic_models: String,
    /// Enables Google Gemini
    #[arg(long, env)]
    pub gemini_api_key: Option<String>,
    /// Gemini's base URL (default: `https://generativelanguage.googleapis.com`)
    #[arg(long, env)]
    pub gemini_base_url: Option<String>,
    /// The Gemini models offered, comma separated
    #[arg(long, env, default_value = "gemini-2.0-flash,gemini-2.5-flash")]
    pub gemini_models: String,
    /// An OpenAI-compatible server (vLLM, Ollama, LM Studio), e.g.
    /// `http://127.0.0.1:11434/v1`
    #[arg(long, env)]
    pub openai_compatible_base_url: Option<String>,
    /// Its provider name in model keys (`NAME/model`)
    #[arg(long, env, default_value = "compatible")]
    pub openai_compatible_name: String,
    /// The models it serves, comma separated (required with its base URL)
    #[arg(long, env)]
    pub openai_compatible_models: Option<String>,
    /// Its API key (default: `none`)
    #[arg(long, env)]
    pub openai_compatible_api_key: Option<String>,
    /// `name=provider/model` pairs, comma separated (`gpt=openai/gpt-4o-mini`);
    /// `|` makes a fallback chain (`fast=local/org/name|ollama/llama3.2`);
    /// listed by `/v1/models`
    #[arg(long, env)]
    pub model_aliases: Option<String>,
    /// The registry key ideas use when a request names none (default: the
    /// first model listed)
    #[arg(long, env)]
    pub default_model: Option<String>,
    /// JSON of `provider/model` → `{input_per_million, output_per_million,
    /// context_length?}` layered over the built-in prices
    /// (crates/inference/prices.json)
    #[arg(long, env)]
    pub model_prices_file: Option<PathBuf>,
    /// The same JSON inline (the config file's `[model_prices]` table),
    /// layered over `MODEL_PRICES_FILE`
    #[arg(long, env)]
    pub model_prices: Option<String>,
    /// `IN,OUT` USD per million tokens counted for models with no known
    /// price; unset, a vendor model without a price is refused on plans
    /// with a cost quota
    #[arg(long, env)]
    pub unpriced_model_price: Option<String>,
    /// Retries on 429/5xx/connection errors (honouring `Retry-After`)
    #[arg(long, env, default_value_t = 3)]
    pub llm_max_retries: u32,
    /// Time limit of a whole model call
    #[arg(long, env, default_value_t = 120)]
    pub llm_request_timeout_secs: u64,
    /// Time limit until the first token of a streamed call
    #[arg(long, env, default_value_t = 60)]
    pub llm_first_token_timeout_secs: u64,
    /// Hugging Face cache of local ONNX models (`models--org--name/…`),
    /// served as `local/org/name` (default: `$MUSE_DATA_DIR/models`)
    #[arg(long, env)]
    pub model_cache_dir: Option<PathBuf>,
    /// Repo ids (`org/name`, comma separated) offered before they are
    /// cached; downloaded on load (`just run`:
    /// `HuggingFaceTB/SmolLM2-135M-Instruct`)
    #[arg(long, env)]
    pub local_models: Option<String>,
    /// ONNX Runtime threads per model (default: the number of CPUs)
    #[arg(long, env)]
    pub local_model_threads: Option<usize>,
    /// Requests waiting per local model
    #[arg(long, env, default_value_t = 16)]
    pub local_model_queue: usize,
    /// The ONNX Runtime shared library; without it local models are off and
    /// remote ones still work (default: set by `just run`)
    #[arg(long, env)]
    pub ort_dylib_path: Option<PathBuf>,
    /// Hugging Face Hub token
    #[arg(long, env)]
    pub hf_token: Option<String>,
    /// Hugging Face Hub mirror
    #[arg(long, env, default_value = "https://huggingface.co")]
    pub hf_endpoint: String,
    /// No downloads from the Hub
    #[arg(long, env, default_value_t = false, action = ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub hf_hub_offline: bool,
}

#[derive(Clone, Args)]
#[command(next_help_heading = "Rate limits and billing")]
pub struct LimitSettings {
    /// GCRA limits per IP and per user (docs/rate-limits.md)
    #[arg(long, env, default_value_t = true, action = ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub rate_limit_enabled: bool,
    /// Logins, registrations, resets per client address (`N/sec|min|hour|day`
    /// or `off`)
    #[arg(long, env, default_value = "30/min")]
    pub rate_limit_auth_per_ip: String,
    /// … per user
    #[arg(long, env, default_value = "off")]
    pub rate_limit_auth_per_user: String,
    /// Model calls per client address
    #[arg(long, env, default_value = "300/min")]
    pub rate_limit_generation_per_ip: String,
    /// … per user
    #[arg(long, env, default_value = "60/min")]
    pub rate_limit_generation_per_user: String,
    /// Reads per client address
    #[arg(long, env, default_value = "1200/min")]
    pub rate_limit_reads_per_ip: String,
    /// … per user
    #[arg(long, env, default_value = "600/min")]
    pub rate_limit_reads_per_user: String,
    /// Writes per client address
    #[arg(long, env, default_value = "600/min")]
    pub rate_limit_writes_per_ip: String,
    /// … per user
    #[arg(long, env, default_value = "240/min")]
    pub rate_limit_writes_per_user: String,
    /// Share rate limits, revocations and job events across replicas
    #[arg(long, env)]
    pub redis_url: Option<String>,
    /// What rate limiting does when Redis does not answer
    #[arg(long, env, value_parser = ["open", "closed"], default_value = "open")]
    pub rate_limit_failure: String,
    /// Turns Stripe payments on; without it an administrator changes plans
    #[arg(long, env)]
    pub stripe_secret_key: Option<String>,
    /// Verifies Stripe's webhook signatures
    #[arg(long, env)]
    pub stripe_webhook_secret: Option<String>,
    /// Stripe's API base URL
    #[arg(long, env, default_value = "https://api.stripe.com")]
    pub stripe_api_base: String,
}

#[derive(Clone, Args)]
#[command(next_help_heading = "Training (docs/training.md)")]
pub struct TrainingSettings {
    /// Training workers inside the server; 0 leaves the jobs to `muse
    /// worker` processes
    #[arg(long, env, default_value_t = 1)]
    pub training_workers: usize,
    /// Largest dataset upload
    #[arg(long, env, default_value_t = 100 * 1024 * 1024)]
    pub training_max_upload_bytes: u64,
    /// Datasets per user
    #[arg(long, env, default_value_t = 1024 * 1024 * 1024)]
    pub training_storage_quota_bytes: u64,
    /// Unfinished jobs per user
    #[arg(long, env, default_value_t = 2)]
    pub training_max_concurrent_jobs: u64,
    /// A job whose worker is silent this long is taken over
    #[arg(long, env, default_value_t = 30)]
    pub training_lease_secs: u64,
    /// How often an idle worker looks for a job
    #[arg(long, env, default_value_t = 1000)]
    pub training_poll_ms: u64,
    /// How often the server relays job changes to WebSockets when Redis
    /// does not announce them
    #[arg(long, env, default_value_t = 500)]
    pub training_progress_poll_ms: u64,
    /// The external trainer program and its first arguments (shell-style
    /// quoting); unset: no external trainer
    #[arg(long, env)]
    pub training_external_command: Option<String>,
    /// Time limit of an external training run
    #[arg(long, env, default_value_t = 6 * 3600)]
    pub training_external_time_limit_secs: u64,
    /// SIGTERM → SIGKILL delay for the external trainer
    #[arg(long, env, default_value_t = 10)]
    pub training_external_grace_secs: u64,
    /// How often provider fine-tuning jobs are polled
    #[arg(long, env, default_value_t = 10_000)]
    pub training_provider_poll_ms: u64,
    /// Offer the compatible server's fine-tuning API as a trainer too
    #[arg(long, env, default_value_t = false, action = ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub training_compatible: bool,
}

/// The settings alone, as a command (for parsing outside `serve`/`worker`).
#[derive(Parser)]
#[command(name = "muse")]
struct SettingsCommand {
    #[command(flatten)]
    settings: Settings,
}

/// Every declared variable name.
pub fn variables() -> Vec<String> {
    SettingsCommand::command()
        .get_arguments()
        .filter_map(|a| a.get_env().and_then(|e| e.to_str()).map(str::to_string))
        .collect()
}

impl Settings {
    /// Parses `vars` (variable → value; empty values count as unset) and
    /// `flags` (`--name=value` as given on the command line, which win)
    /// without looking at the process environment.
    pub fn parse(vars: &HashMap<String, String>, flags: &[OsString]) -> Result<Self, ConfigError> {
        let mut long_to_env = HashMap::new();
        let mut argv: Vec<OsString> = vec!["muse".into()];
        let flagged: Vec<String> = flags
            .iter()
            .filter_map(|f| f.to_str())
            .filter_map(|f| f.strip_prefix("--"))
            .map(|f| f.split('=').next().unwrap_or(f).to_string())
            .collect();
        let cmd = SettingsCommand::command().mut_args(|a| {
            if let (Some(env), Some(long)) = (a.get_env().and_then(|e| e.to_str()), a.get_long()) {
                long_to_env.insert(long.to_string(), env.to_string());
                if let Some(v) = vars
                    .get(env)
                    .map(|v| v.trim())
                    .filter(|v| !v.is_empty() && !flagged.iter().any(|f| f == long))
                {
                    argv.push(format!("--{long}={v}").into());
                }
            }
            a.env(None::<&str>)
        });
        argv.extend(flags.iter().cloned());
        let matches = cmd
            .try_get_matches_from(argv)
            .map_err(|e| clap_error(&e, &long_to_env))?;
        let parsed = SettingsCommand::from_arg_matches(&matches)
            .map_err(|e| clap_error(&e, &long_to_env))?;
        Ok(parsed.settings)
    }
}

/// A clap error as a [`ConfigError`] naming the variable.
fn clap_error(e: &clap::Error, long_to_env: &HashMap<String, String>) -> ConfigError {
    use clap::error::{ContextKind, ContextValue};
    let arg = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(s)) => s.clone(),
        _ => String::new(),
    };
    let long = arg
        .trim_start_matches("--")
        .split([' ', '='])
        .next()
        .unwrap_or_default();
    let var = long_to_env
        .get(long)
        .cloned()
        .unwrap_or_else(|| "configuration".to_string());
    let rendered = e.render().to_string();
    let first = rendered
        .lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ");
    // "invalid value 'x' for '--port <PORT>': reason" → "invalid value 'x': reason"
    let message = match first.split_once(&format!(" for '{arg}'")) {
        Some((head, tail)) => format!("{head}{tail}"),
        None => first.to_string(),
    };
    let valid = match e.get(ContextKind::ValidValue) {
        Some(ContextValue::Strings(v)) => format!(" (expected one of: {})", v.join(", ")),
        _ => String::new(),
    };
    ConfigError::Invalid {
        var,
        message: format!("{message}{valid}"),
    }
}

/// The variables a TOML settings file sets: top-level keys are variable
/// names (any case); arrays of strings become comma-separated lists;
/// `model_aliases` is a table of name → key or [keys…] (a fallback chain);
/// `model_prices` a table of `provider/model` → `{input_per_million,
/// output_per_million, context_length?}`.
pub fn read_file(path: &std::path::Path) -> Result<HashMap<String, String>, ConfigError> {
    let io = |message: String| ConfigError::Io {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| io(e.to_string()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| io(e.to_string()))?;
    let known = variables();
    let mut out = HashMap::new();
    for (key, value) in table {
        let var = key.to_ascii_uppercase();
        if !known.contains(&var) {
            return Err(io(format!("unknown setting {key:?}")));
        }
        let bad = |what: &str| ConfigError::Invalid {
            var: var.clone(),
            message: format!("in {}: {what}", path.display()),
        };
        let text = match (var.as_str(), value) {
            ("MODEL_ALIASES", toml::Value::Table(t)) => {
                let mut pairs = Vec::new();
                for (name, keys) in t {
                    let chain: Vec<String> = match keys {
                        toml::Value::String(s) => vec![s],
                        toml::Value::Array(a) => a
                            .into_iter()
                            .map(|k| k.as_str().map(str::to_string))
                            .collect::<Option<_>>()
                            .ok_or_else(|| bad("a chain is an array of model keys"))?,
                        _ => return Err(bad("an alias is a model key or an array of keys")),
                    };
                    pairs.push(format!("{name}={}", chain.join("|")));
                }
                pairs.join(",")
            }
            ("MODEL_PRICES", toml::Value::Table(t)) => {
                let prices: BTreeMap<String, muse_inference::Price> = toml::Value::Table(t)
                    .try_into()
                    .map_err(|e: toml::de::Error| bad(&e.to_string()))?;
                serde_json::to_string(&prices).map_err(|e| bad(&e.to_string()))?
            }
            (_, toml::Value::String(s)) => s,
            (_, toml::Value::Integer(i)) => i.to_string(),
            (_, toml::Value::Float(f)) => f.to_string(),
            (_, toml::Value::Boolean(b)) => b.to_string(),
            (_, toml::Value::Array(a)) => a
                .into_iter()
                .map(|v| match v {
                    toml::Value::String(s) => Some(s),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad("a list is an array of strings"))?
                .join(","),
            _ => return Err(bad("expected a string, number, boolean or list")),
        };
        out.insert(var, text);
    }
    Ok(out)
}

/// The README's configuration table, generated from the declarations.
pub fn markdown_table() -> String {
    let mut out = String::from("| variable | default | meaning |\n|---|---|---|\n");
    let cmd = SettingsCommand::command();
    let mut heading = None;
    for arg in cmd.get_arguments() {
        let Some(env) = arg.get_env().and_then(|e| e.to_str()) else {
            continue;
        };
        if arg.get_help_heading() != heading {
            heading = arg.get_help_heading();
            if let Some(h) = heading {
                out.push_str(&format!("| **{h}** | | |\n"));
            }
        }
        let help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default()
            .replace('\n', " ");
        // A default that depends on other settings is written in the help
        // as "(default: …)".
        let (meaning, default) = match help.rsplit_once(" (default: ") {
            Some((meaning, default)) => (
                meaning.to_string(),
                default.trim_end_matches(')').to_string(),
            ),
            None => {
                let values: Vec<String> = arg
                    .get_default_values()
                    .iter()
                    .map(|v| format!("`{}`", v.to_string_lossy()))
                    .collect();
                let default = if values.is_empty() {
                    "unset".to_string()
                } else {
                    values.join(", ")
                };
                (help.clone(), default)
            }
        };
        let possible: Vec<String> = arg
            .get_possible_values()
            .iter()
            .filter(|v| !v.is_hide_set())
            .map(|v| format!("`{}`", v.get_name()))
            .collect();
        let meaning = if possible.is_empty() || possible.iter().any(|p| p == "`true`") {
            meaning
        } else {
            format!("{meaning} ({})", possible.join(", "))
        };
        out.push_str(&format!(
            "| `{env}` | {default} | {} |\n",
            meaning.replace('|', "\\|")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::vars;
    use crate::config::Config;

    fn workspace_file(rel: &str) -> PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(rel)
    }

    /// The README's table is this declaration's: `UPDATE_SNAPSHOTS=1`
    /// rewrites it.
    #[test]
    fn the_readme_table_is_generated_from_the_declarations() {
        const BEGIN: &str = "<!-- settings:begin (generated from bins/muse/src/settings.rs) -->\n";
        const END: &str = "<!-- settings:end -->";
        let path = workspace_file("README.md");
        let readme = std::fs::read_to_string(&path).unwrap();
        let (head, rest) = readme
            .split_once(BEGIN)
            .expect("README has the settings markers");
        let (current, tail) = rest.split_once(END).expect("README has the end marker");
        let table = markdown_table();
        if std::env::var("UPDATE_SNAPSHOTS").as_deref() == Ok("1") {
            std::fs::write(&path, format!("{head}{BEGIN}{table}{END}{tail}")).unwrap();
            return;
        }
        assert_eq!(
            current, table,
            "README.md's configuration table is stale: UPDATE_SNAPSHOTS=1 cargo test -p muse-server --lib settings"
        );
        for var in variables() {
            assert!(table.contains(&format!("`{var}`")), "{var}");
        }
    }

    #[test]
    fn a_settings_file_is_layered_under_the_environment_and_flags_win() {
        let dir = std::env::temp_dir().join(format!("muse-settings-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("muse.toml");
        std::fs::write(
            &file,
            r#"
port = 9000
host = "0.0.0.0"
TRUST_PROXY_HEADERS = true
openai_api_key = "sk-from-file"
openai_models = ["gpt-4o-mini", "o3-mini"]

[model_aliases]
gpt = "openai/gpt-4o-mini"
fast = ["openai/o3-mini", "openai/gpt-4o-mini"]

[model_prices."openai/o3-mini"]
input_per_million = 1.1
output_per_million = 4.4
"#,
        )
        .unwrap();
        let path = file.to_str().unwrap();
        let c = Config::from_vars(&vars(&[("MUSE_CONFIG", path), ("PORT", "9100")])).unwrap();
        assert_eq!(c.port, 9100, "the environment wins over the file");
        assert_eq!(c.host, "0.0.0.0");
        assert!(c.trust_proxy_headers);
        assert_eq!(
            c.llm.openai.as_ref().unwrap().models,
            ["gpt-4o-mini", "o3-mini"]
        );
        assert_eq!(c.llm.model_aliases["gpt"], ["openai/gpt-4o-mini"]);
        assert_eq!(
            c.llm.model_aliases["fast"],
            ["openai/o3-mini", "openai/gpt-4o-mini"]
        );
        assert_eq!(c.llm.prices["openai/o3-mini"].output_per_million, 4.4);

        let merged = {
            let mut m = read_file(&file).unwrap();
            m.insert("PORT".into(), "9100".into());
            m
        };
        let s = Settings::parse(&merged, &["--port=9200".into()]).unwrap();
        assert_eq!(s.server.port, 9200, "a flag wins over the environment");

        std::fs::write(&file, "prot = 9000\n").unwrap();
        let err = Config::from_vars(&vars(&[("MUSE_CONFIG", path)]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown setting \"prot\""), "{err}");
        std::fs::write(&file, "[model_aliases]\nfast = 3\n").unwrap();
        let err = Config::from_vars(&vars(&[("MUSE_CONFIG", path)]))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("MODEL_ALIASES"), "{err}");
        std::fs::write(&file, "port = \"eighty\"\n").unwrap();
        let err = Config::from_vars(&vars(&[("MUSE_CONFIG", path)]))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("PORT"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }

    /// The example in docs/configuration.md is a file Muse accepts.
    #[test]
    fn the_documented_example_file_loads() {
        let file = workspace_file("deploy/muse.example.toml");
        let c = Config::from_vars(&vars(&[("MUSE_CONFIG", file.to_str().unwrap())])).unwrap();
        assert!(!c.llm.model_aliases.is_empty());
        assert!(!c.llm.prices.is_empty());
    }

    #[test]
    fn the_batch_window_is_bounded() {
        let window = |v: &str| {
            Config::from_vars(&vars(&[("EXECUTION_BATCH_WINDOW_US", v)]))
                .map(|c| c.execution_batch_window_us)
        };
        assert_eq!(window("0").unwrap(), 0);
        assert_eq!(window("10000").unwrap(), 10_000);
        assert_eq!(
            Config::from_vars(&vars(&[]))
                .unwrap()
                .execution_batch_window_us,
            200
        );
        for bad in ["10001", "-1", "soon"] {
            let err = window(bad).unwrap_err().to_string();
            assert!(err.starts_with("EXECUTION_BATCH_WINDOW_US"), "{err}");
        }
    }

    #[test]
    fn enumerated_values_are_listed_in_errors() {
        for (k, v, want) in [
            ("QUOTA_STORE", "disk", "memory, redis, database"),
            ("RATE_LIMIT_FAILURE", "maybe", "open, closed"),
            ("EXECUTION_WRITES", "later", "sync, async"),
            ("MUSE_ENV", "staging", "development, production"),
        ] {
            let err = Config::from_vars(&vars(&[(k, v)])).unwrap_err().to_string();
            assert!(err.starts_with(k) && err.contains(want), "{err}");
        }
        // Aliases the old parser took still work; empty values are unset.
        let c = Config::from_vars(&vars(&[
            ("MUSE_ENV", "prod"),
            ("LOG_FORMAT", "pretty"),
            ("PORT", " "),
        ]))
        .unwrap();
        assert_eq!(c.env, crate::config::Environment::Production);
        assert_eq!(c.port, 8000);
    }
}
