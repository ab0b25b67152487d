//! Typed configuration, built from the settings declared in
//! [`crate::settings`] (defaults, an optional TOML file, `.env`, the
//! environment, command-line flags). Secrets are wrapped in [`Secret`], so
//! `Debug` output and logs never show them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use muse_core::Secret;

/// `MUSE_ENV`: production turns weak settings into start-up errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Environment {
    #[value(alias = "dev")]
    Development,
    #[value(alias = "prod")]
    Production,
}

impl Environment {
    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Development => "development",
            Environment::Production => "production",
        }
    }
}

/// `LOG_FORMAT`: `text` (default) or `json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[value(alias = "pretty")]
    Text,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{var}: {message}")]
    Invalid { var: String, message: String },
    #[error("JWT_SECRET: {0}")]
    WeakSecret(String),
    #[error("cannot read or write {path}: {message}")]
    Io { path: String, message: String },
}

/// Everything the server reads from its environment.
#[derive(Debug, Clone)]
pub struct Config {
    pub env: Environment,
    pub host: String,
    pub port: u16,
    pub workers: usize,
    pub data_dir: PathBuf,
    /// May carry a password: redacted in `Debug`.
    pub database_url: Secret<String>,
    pub database_pool_size: u32,
    pub jwt_secret: Option<Secret<String>>,
    pub jwt_issuer: String,
    pub jwt_audience: String,
    pub access_token_ttl_secs: i64,
    /// `AUTH_CACHE_TTL_MS`: how long a verified caller is kept in memory
    /// (0 turns the cache off): the bound on how late another replica
    /// learns of a revocation when Redis does not relay it.
    pub auth_cache_ttl_ms: i64,
    /// `EXECUTION_WRITES`: `sync` (answers wait for their record's commit)
    /// or `async` (answered at once; see docs/benchmarks.md).
    pub execution_writes: ExecutionWrites,
    /// `EXECUTION_BATCH_WINDOW_US`: how long a group commit waits for more
    /// calls when the writer is busy (0: never).
    pub execution_batch_window_us: u64,
    /// `QUOTA_STORE`: where quota reservations are counted.
    pub quota_store: QuotaStore,
    /// `SHUTDOWN_GRACE_SECS`: on SIGTERM, how long in-flight requests and
    /// streams may take before they are cut.
    pub shutdown_grace_secs: u64,
    /// `SHUTDOWN_DELAY_MS`: on SIGTERM, how long `/health/ready` answers
    /// 503 before the server stops accepting connections (for load
    /// balancers to notice).
    pub shutdown_delay_ms: u64,
    pub refresh_token_ttl_secs: i64,
    pub bcrypt_cost: u32,
    pub cors_origins: Vec<String>,
    pub log_format: LogFormat,
    pub smtp_url: Option<Secret<String>>,
    pub mail_from: String,
    pub public_url: String,
    pub admin_email: Option<String>,
    pub admin_username: String,
    pub admin_password: Option<Secret<String>>,
    pub max_body_bytes: usize,
    /// `WS_IDLE_TIMEOUT_SECS`: a WebSocket that sends nothing (not even a
    /// pong) for this long is closed.
    pub ws_idle_timeout_secs: u64,
    /// `FEATURE_FLAGS_REFRESH_SECS`: how often each replica reloads the flags.
    pub feature_flags_refresh_secs: u64,
    pub trust_proxy_headers: bool,
    pub login_max_failures_per_account: u32,
    pub login_max_failures_per_ip: u32,
    pub login_failure_window_secs: i64,
    pub llm: LlmConfig,
    pub rate_limits: RateLimitConfig,
    pub stripe: Option<StripeConfig>,
    pub training: TrainingConfig,
}

/// `TRAINING_*`: see docs/training.md.
#[derive(Debug, Clone)]
pub struct TrainingConfig {
    /// `TRAINING_WORKERS` (default 1): workers inside the server; 0 leaves
    /// the jobs to `muse worker` processes.
    pub workers: usize,
    /// `TRAINING_MAX_UPLOAD_BYTES` (default 100 MiB).
    pub max_upload_bytes: u64,
    /// `TRAINING_STORAGE_QUOTA_BYTES` (default 1 GiB): datasets per user.
    pub storage_quota_bytes: u64,
    /// `TRAINING_MAX_CONCURRENT_JOBS` (default 2): unfinished jobs per user.
    pub max_concurrent_jobs: u64,
    /// `TRAINING_LEASE_SECS` (default 30): a job whose worker is silent
    /// this long is taken over.
    pub lease_secs: u64,
    /// `TRAINING_POLL_MS` (default 1000): how often an idle worker looks
    /// for a job.
    pub poll_ms: u64,
    /// `TRAINING_PROGRESS_POLL_MS` (default 500): how often the server
    /// relays job changes to WebSockets.
    pub progress_poll_ms: u64,
    /// `TRAINING_EXTERNAL_COMMAND`: the external trainer program and its
    /// first arguments (shell-style quoting); unset: no external trainer.
    pub external_command: Option<Vec<String>>,
    /// `TRAINING_EXTERNAL_TIME_LIMIT_SECS` (default 6 h).
    pub external_time_limit_secs: u64,
    /// `TRAINING_EXTERNAL_GRACE_SECS` (default 10): SIGTERM → SIGKILL.
    pub external_grace_secs: u64,
    /// `TRAINING_PROVIDER_POLL_MS` (default 10000): provider job polling.
    pub provider_poll_ms: u64,
    /// `TRAINING_COMPATIBLE` (default false): offer the compatible server's
    /// fine-tuning API as a trainer too.
    pub compatible: bool,
}

impl TrainingConfig {
    fn from_settings(t: &crate::settings::TrainingSettings) -> Result<Self, ConfigError> {
        let external_command = match t
            .training_external_command
            .as_deref()
            .filter(|c| !c.trim().is_empty())
        {
            None => None,
            Some(c) => Some(shlex::split(c).filter(|v| !v.is_empty()).ok_or(
                ConfigError::Invalid {
                    var: "TRAINING_EXTERNAL_COMMAND".into(),
                    message:
                        "cannot split it into a program and arguments (unbalanced quotes?)".into(),
                },
            )?),
        };
        Ok(Self {
            workers: t.training_workers,
            max_upload_bytes: t.training_max_upload_bytes,
            storage_quota_bytes: t.training_storage_quota_bytes,
            max_concurrent_jobs: t.training_max_concurrent_jobs,
            lease_secs: t.training_lease_secs.max(1),
            poll_ms: t.training_poll_ms.max(10),
            progress_poll_ms: t.training_progress_poll_ms.max(10),
            external_command,
            external_time_limit_secs: t.training_external_time_limit_secs.max(1),
            external_grace_secs: t.training_external_grace_secs,
            provider_poll_ms: t.training_provider_poll_ms.max(10),
            compatible: t.training_compatible,
        })
    }
}

/// `STRIPE_SECRET_KEY` (turns payments on), `STRIPE_WEBHOOK_SECRET`,
/// `STRIPE_API_BASE` (tests point it at a local server).
#[derive(Debug, Clone)]
pub struct StripeConfig {
    pub secret_key: Secret<String>,
    pub webhook_secret: Option<Secret<String>>,
    pub api_base: String,
}

/// `RATE_LIMIT_*` and `REDIS_URL`: see docs/rate-limits.md.
#[derive(Debug, Clone)]
pub struct RateLimitConfig {
    /// `RATE_LIMIT_ENABLED` (default true).
    pub enabled: bool,
    /// `REDIS_URL`: share the limits across replicas; in memory without it.
    pub redis_url: Option<Secret<String>>,
    /// `RATE_LIMIT_FAILURE=open|closed` (default open): what to do when
    /// Redis does not answer.
    pub fail_open: bool,
    /// `RATE_LIMIT_<CLASS>_PER_IP`.
    pub per_ip: std::collections::HashMap<muse_billing::RouteClass, muse_billing::Quota>,
    /// `RATE_LIMIT_<CLASS>_PER_USER`.
    pub per_user: std::collections::HashMap<muse_billing::RouteClass, muse_billing::Quota>,
}

fn rate_limit_config(l: &crate::settings::LimitSettings) -> Result<RateLimitConfig, ConfigError> {
    use muse_billing::{Quota, RouteClass};
    let mut per_ip = std::collections::HashMap::new();
    let mut per_user = std::collections::HashMap::new();
    for class in RouteClass::ALL {
        let (ip, user) = match class {
            RouteClass::Auth => (&l.rate_limit_auth_per_ip, &l.rate_limit_auth_per_user),
            RouteClass::Generation => (
                &l.rate_limit_generation_per_ip,
                &l.rate_limit_generation_per_user,
            ),
            RouteClass::Reads => (&l.rate_limit_reads_per_ip, &l.rate_limit_reads_per_user),
            RouteClass::Writes => (&l.rate_limit_writes_per_ip, &l.rate_limit_writes_per_user),
        };
        for (scope, value, map) in [("IP", ip, &mut per_ip), ("USER", user, &mut per_user)] {
            let quota = Quota::parse(value).map_err(|message| ConfigError::Invalid {
                var: format!("RATE_LIMIT_{}_PER_{scope}", class.as_str().to_uppercase()),
                message,
            })?;
            if let Some(q) = quota {
                map.insert(class, q);
            }
        }
    }
    Ok(RateLimitConfig {
        enabled: l.rate_limit_enabled,
        redis_url: l
            .redis_url
            .as_ref()
            .filter(|u| !u.trim().is_empty())
            .map(|u| Secret::new(u.clone())),
        fail_open: l.rate_limit_failure != "closed",
        per_ip,
        per_user,
    })
}

/// One remote provider: key, base URL (operator-chosen only) and the
/// models to expose.
#[derive(Debug, Clone)]
pub struct RemoteProviderConfig {
    pub api_key: Secret<String>,
    pub base_url: Option<String>,
    pub models: Vec<String>,
}

/// An OpenAI-compatible server (vLLM, Ollama, LM Studio, …).
#[derive(Debug, Clone)]
pub struct CompatibleServerConfig {
    pub name: String,
    pub base_url: String,
    pub api_key: Secret<String>,
    pub models: Vec<String>,
}

/// Model providers, prices and call limits.
#[derive(Debug, Clone)]
pub struct LlmConfig {
    pub openai: Option<RemoteProviderConfig>,
    pub anthropic: Option<RemoteProviderConfig>,
    pub gemini: Option<RemoteProviderConfig>,
    pub compatible: Option<CompatibleServerConfig>,
    pub prices_file: Option<PathBuf>,
    /// `MODEL_PRICES`: `provider/model` → price, over the file's.
    pub prices: std::collections::BTreeMap<String, muse_inference::Price>,
    /// `UNPRICED_MODEL_PRICE` (`IN,OUT` USD per million tokens): what a
    /// remote model with no known price counts against cost quotas. Unset:
    /// such a model is refused on plans with a cost quota.
    pub unpriced_price: Option<muse_inference::Price>,
    pub max_retries: u32,
    pub request_timeout_secs: u64,
    pub first_token_timeout_secs: u64,
    /// Hugging Face cache of local ONNX models.
    pub model_cache_dir: PathBuf,
    pub local_threads: usize,
    pub local_queue: usize,
    /// `LOCAL_MODELS`: repo ids offered even before they are in the cache.
    pub local_models: Vec<String>,
    /// `HF_ENDPOINT`, `HF_TOKEN`, `HF_HUB_OFFLINE`.
    pub hf_endpoint: String,
    pub hf_token: Option<Secret<String>>,
    pub hf_offline: bool,
    /// `DEFAULT_MODEL`: the registry key ideas use when a request names no
    /// model (else the first model of `GET /api/v1/ai/models`).
    pub default_model: Option<String>,
    /// `MODEL_ALIASES`: `name=provider/model` pairs, comma separated; a
    /// name may stand for a fallback chain, `|`-separated
    /// (`gpt=openai/gpt-4o-mini,fast=local/org/name|compatible/llama3`).
    pub model_aliases: std::collections::BTreeMap<String, Vec<String>>,
}

/// Secrets that ship in tutorials and must never protect a real server.
const KNOWN_WEAK_SECRETS: &[&str] = &[
    "secret",
    "changeme",
    "change-me",
    "change_me",
    "your-secret-key",
    "your_secret_key",
    "supersecret",
    "jwt-secret",
    "jwt_secret",
    "development",
];

/// Shortest `JWT_SECRET` accepted in production, in bytes.
pub const MIN_SECRET_BYTES: usize = 32;

impl Config {
    /// Reads the settings' layers (see [`crate::settings`]): the TOML file
    /// (`MUSE_CONFIG`, else `./muse.toml` when present), `.env` (which does
    /// not override real variables), the environment, then `flags` (what
    /// was given on the command line, `--name=value`).
    pub fn load(flags: &[std::ffi::OsString]) -> Result<Self, ConfigError> {
        match dotenvy::dotenv() {
            Ok(_) => {}
            Err(e) if e.not_found() => {}
            Err(e) => {
                return Err(ConfigError::Io {
                    path: ".env".into(),
                    message: e.to_string(),
                })
            }
        }
        let mut vars: HashMap<String, String> = std::env::vars().collect();
        if !vars.contains_key("MUSE_CONFIG") && Path::new("muse.toml").is_file() {
            vars.insert("MUSE_CONFIG".into(), "muse.toml".into());
        }
        Self::from_layers(&vars, flags)
    }

    /// Builds the configuration from a map of variables (defaults for the
    /// missing ones; `MUSE_CONFIG` names a settings file layered under them).
    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        Self::from_layers(vars, &[])
    }

    fn from_layers(
        vars: &HashMap<String, String>,
        flags: &[std::ffi::OsString],
    ) -> Result<Self, ConfigError> {
        let file = vars
            .get("MUSE_CONFIG")
            .map(|p| p.trim())
            .filter(|p| !p.is_empty())
            .map(|p| crate::settings::read_file(Path::new(p)))
            .transpose()?
            .unwrap_or_default();
        let mut merged = file;
        for (k, v) in vars {
            if !v.trim().is_empty() {
                merged.insert(k.clone(), v.clone());
            }
        }
        let settings = crate::settings::Settings::parse(&merged, flags)?;
        Self::from_settings(settings)
    }

    /// The configuration the parsed settings describe: defaults that depend
    /// on other settings, and the checks that span several of them.
    pub fn from_settings(s: crate::settings::Settings) -> Result<Self, ConfigError> {
        let (server, accounts) = (&s.server, &s.accounts);
        let env = server.muse_env;
        let host = server.host.clone();
        let port = server.port;
        let data_dir = server.muse_data_dir.clone();
        let database_url = Secret::new(
            server
                .database_url
                .clone()
                .unwrap_or_else(|| format!("sqlite://{}", data_dir.join("muse.db").display())),
        );
        let workers = server.workers.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
        });
        let bcrypt_cost = accounts.bcrypt_cost;
        if env == Environment::Production && bcrypt_cost < 10 {
            return Err(ConfigError::Invalid {
                var: "BCRYPT_COST".into(),
                message: "must be at least 10 in production".into(),
            });
        }
        let public_url = server
            .public_url
            .clone()
            .unwrap_or_else(|| {
                let h = if host == "0.0.0.0" || host == "::" {
                    "127.0.0.1"
                } else {
                    host.as_str()
                };
                format!("http://{h}:{port}")
            })
            .trim_end_matches('/')
            .to_string();
        let secret = |v: &Option<String>| v.clone().map(Secret::new);
        let has_redis = s
            .limits
            .redis_url
            .as_ref()
            .is_some_and(|u| !u.trim().is_empty());
        Ok(Self {
            env,
            port,
            workers: workers.max(1),
            database_pool_size: server.database_pool_size,
            jwt_secret: secret(&accounts.jwt_secret),
            jwt_issuer: accounts.jwt_issuer.clone(),
            jwt_audience: accounts.jwt_audience.clone(),
            access_token_ttl_secs: accounts.access_token_ttl_secs,
            auth_cache_ttl_ms: accounts.auth_cache_ttl_ms,
            shutdown_grace_secs: server.shutdown_grace_secs,
            shutdown_delay_ms: server.shutdown_delay_ms,
            quota_store: quota_store(
                server.quota_store,
                database_url.expose().starts_with("sqlite"),
                has_redis,
            )?,
            execution_writes: server.execution_writes,
            execution_batch_window_us: server.execution_batch_window_us,
            refresh_token_ttl_secs: accounts.refresh_token_ttl_secs,
            bcrypt_cost,
            cors_origins: list(server.cors_origins.as_deref()),
            log_format: server.log_format,
            smtp_url: secret(&accounts.smtp_url),
            mail_from: accounts.mail_from.clone(),
            public_url,
            admin_email: accounts.admin_email.clone(),
            admin_username: accounts.admin_username.clone(),
            admin_password: secret(&accounts.admin_password),
            max_body_bytes: server.max_body_bytes,
            ws_idle_timeout_secs: server.ws_idle_timeout_secs,
            feature_flags_refresh_secs: server.feature_flags_refresh_secs,
            trust_proxy_headers: server.trust_proxy_headers,
            login_max_failures_per_account: accounts.login_max_failures_per_account,
            login_max_failures_per_ip: accounts.login_max_failures_per_ip,
            login_failure_window_secs: accounts.login_failure_window_secs,
            llm: llm_config(&s.models, &data_dir)?,
            rate_limits: rate_limit_config(&s.limits)?,
            stripe: match s
                .limits
                .stripe_secret_key
                .clone()
                .filter(|k| !k.trim().is_empty())
            {
                None => None,
                Some(key) => Some(StripeConfig {
                    secret_key: Secret::new(key),
                    webhook_secret: secret(&s.limits.stripe_webhook_secret),
                    api_base: check_url("STRIPE_API_BASE", &s.limits.stripe_api_base)?,
                }),
            },
            training: TrainingConfig::from_settings(&s.training)?,
            host,
            data_dir,
            database_url,
        })
    }

    /// The address to bind.
    pub fn bind_addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// Where the development mailer writes emails.
    pub fn outbox_dir(&self) -> PathBuf {
        self.data_dir.join("outbox")
    }

    /// The JWT signing secret. In production `JWT_SECRET` must be set, at
    /// least [`MIN_SECRET_BYTES`] long and not a well-known value. In
    /// development a missing secret is generated once and kept in
    /// `DATA_DIR/jwt_secret` (mode 0600), with a warning.
    pub fn resolve_jwt_secret(&self) -> Result<Secret<String>, ConfigError> {
        if let Some(secret) = &self.jwt_secret {
            let s = secret.expose();
            let weak = s.len() < MIN_SECRET_BYTES
                || KNOWN_WEAK_SECRETS.contains(&s.to_ascii_lowercase().as_str())
                || s.chars().all(|c| c == s.chars().next().unwrap_or(c));
            if weak {
                if self.env == Environment::Production {
                    return Err(ConfigError::WeakSecret(format!(
                        "must be at least {MIN_SECRET_BYTES} bytes of random data in production \
                         (generate one with: openssl rand -base64 48)"
                    )));
                }
                tracing::warn!("JWT_SECRET is weak; this is refused when MUSE_ENV=production");
            }
            return Ok(secret.clone());
        }
        if self.env == Environment::Production {
            return Err(ConfigError::WeakSecret(
                "is required in production (generate one with: openssl rand -base64 48)".into(),
            ));
        }
        let path = self.data_dir.join("jwt_secret");
        load_or_create_secret(&path)
    }
}

fn load_or_create_secret(path: &Path) -> Result<Secret<String>, ConfigError> {
    let io = |e: std::io::Error| ConfigError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    if let Ok(existing) = std::fs::read_to_string(path) {
        let existing = existing.trim().to_string();
        if existing.len() >= MIN_SECRET_BYTES {
            tracing::warn!(path = %path.display(), "JWT_SECRET not set: using the development secret kept in the data directory");
            return Ok(Secret::new(existing));
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let secret = muse_core::token::random_token(48);
    write_private(path, &secret).map_err(io)?;
    tracing::warn!(path = %path.display(), "JWT_SECRET not set: generated a development secret; set JWT_SECRET in production");
    Ok(Secret::new(secret))
}

#[cfg(unix)]
fn write_private(path: &Path, content: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(content.as_bytes())
}

#[cfg(not(unix))]
fn write_private(path: &Path, content: &str) -> std::io::Result<()> {
    std::fs::write(path, content)
}

/// A comma-separated list (empty items dropped; unset: empty).
fn list(v: Option<&str>) -> Vec<String> {
    v.into_iter()
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

fn check_url(var: &'static str, url: &str) -> Result<String, ConfigError> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(ConfigError::Invalid {
            var: var.into(),
            message: format!("must be an http:// or https:// URL, got {url:?}"),
        });
    }
    Ok(url.trim_end_matches('/').to_string())
}

fn llm_config(
    m: &crate::settings::ModelSettings,
    data_dir: &Path,
) -> Result<LlmConfig, ConfigError> {
    let remote = |key: &Option<String>,
                  url_var: &'static str,
                  url: &Option<String>,
                  models: &str|
     -> Result<Option<RemoteProviderConfig>, ConfigError> {
        let Some(key) = key.clone() else {
            return Ok(None);
        };
        Ok(Some(RemoteProviderConfig {
            api_key: Secret::new(key),
            base_url: url.as_ref().map(|u| check_url(url_var, u)).transpose()?,
            models: list(Some(models)),
        }))
    };
    let compatible = match &m.openai_compatible_base_url {
        None => None,
        Some(url) => {
            let models = list(m.openai_compatible_models.as_deref());
            if models.is_empty() {
                return Err(ConfigError::Invalid {
                    var: "OPENAI_COMPATIBLE_MODELS".into(),
                    message: "list the models the server serves (comma-separated)".into(),
                });
            }
            let name = m.openai_compatible_name.clone();
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(ConfigError::Invalid {
                    var: "OPENAI_COMPATIBLE_NAME".into(),
                    message: "letters, digits, '-' and '_' only".into(),
                });
            }
            Some(CompatibleServerConfig {
                name,
                base_url: check_url("OPENAI_COMPATIBLE_BASE_URL", url)?,
                api_key: Secret::new(
                    m.openai_compatible_api_key
                        .clone()
                        .unwrap_or_else(|| "none".into()),
                ),
                models,
            })
        }
    };
    Ok(LlmConfig {
        openai: remote(
            &m.openai_api_key,
            "OPENAI_BASE_URL",
            &m.openai_base_url,
            &m.openai_models,
        )?,
        anthropic: remote(
            &m.anthropic_api_key,
            "ANTHROPIC_BASE_URL",
            &m.anthropic_base_url,
            &m.anthropic_models,
        )?,
        gemini: remote(
            &m.gemini_api_key,
            "GEMINI_BASE_URL",
            &m.gemini_base_url,
            &m.gemini_models,
        )?,
        compatible,
        prices_file: m.model_prices_file.clone(),
        prices: m
            .model_prices
            .as_deref()
            .map(inline_prices)
            .transpose()?
            .unwrap_or_default(),
        unpriced_price: m
            .unpriced_model_price
            .as_deref()
            .map(unpriced_price)
            .transpose()?,
        max_retries: m.llm_max_retries,
        request_timeout_secs: m.llm_request_timeout_secs,
        first_token_timeout_secs: m.llm_first_token_timeout_secs,
        model_cache_dir: m
            .model_cache_dir
            .clone()
            .unwrap_or_else(|| data_dir.join("models")),
        local_threads: m.local_model_threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }),
        local_queue: m.local_model_queue,
        local_models: list(m.local_models.as_deref()),
        hf_endpoint: check_url("HF_ENDPOINT", &m.hf_endpoint)?,
        hf_token: m.hf_token.clone().map(Secret::new),
        hf_offline: m.hf_hub_offline,
        default_model: m.default_model.clone(),
        model_aliases: aliases(m.model_aliases.clone())?,
    })
}

/// `MODEL_PRICES`: JSON of `provider/model` → price.
fn inline_prices(
    v: &str,
) -> Result<std::collections::BTreeMap<String, muse_inference::Price>, ConfigError> {
    let bad = |message: String| ConfigError::Invalid {
        var: "MODEL_PRICES".into(),
        message,
    };
    let prices: std::collections::BTreeMap<String, muse_inference::Price> = serde_json::from_str(v)
        .map_err(|e| {
            bad(format!(
                "expected JSON of provider/model -> {{input_per_million, output_per_million}}: {e}"
            ))
        })?;
    if let Some(key) = prices.keys().find(|k| !k.contains('/')) {
        return Err(bad(format!("{key:?} is not provider/model")));
    }
    Ok(prices)
}

/// `MODEL_ALIASES`: `name=key` pairs separated by commas.
fn aliases(
    v: Option<String>,
) -> Result<std::collections::BTreeMap<String, Vec<String>>, ConfigError> {
    let mut out = std::collections::BTreeMap::new();
    for pair in v
        .iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=') {
            Some((name, keys))
                if !name.trim().is_empty() && keys.split('|').all(|k| k.trim().contains('/')) =>
            {
                let chain = keys.split('|').map(|k| k.trim().to_string()).collect();
                out.insert(name.trim().to_string(), chain);
            }
            _ => {
                return Err(ConfigError::Invalid {
                    var: "MODEL_ALIASES".into(),
                    message: format!("{pair:?} is not name=provider/model[|provider/model…]"),
                })
            }
        }
    }
    Ok(out)
}

/// Where quota reservations are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QuotaStore {
    /// In this process (`muse_billing::QuotaLedger`): no database write on
    /// a call's critical path; exact for one server process only.
    Memory,
    /// On Redis (`REDIS_URL`), one atomic script per call: exact across
    /// replicas, no database write on a call's critical path.
    Redis,
    /// A conditional `UPDATE` per call: exact across replicas.
    Database,
}

/// `QUOTA_STORE`, or its default: one SQLite file means one server (count
/// in memory); PostgreSQL with Redis counts on Redis, without it in the
/// database.
fn quota_store(
    chosen: Option<QuotaStore>,
    sqlite: bool,
    has_redis: bool,
) -> Result<QuotaStore, ConfigError> {
    match chosen {
        Some(QuotaStore::Redis) if !has_redis => Err(ConfigError::Invalid {
            var: "QUOTA_STORE".into(),
            message: "redis needs REDIS_URL".into(),
        }),
        Some(q) => Ok(q),
        None if sqlite => Ok(QuotaStore::Memory),
        None if has_redis => Ok(QuotaStore::Redis),
        None => Ok(QuotaStore::Database),
    }
}

/// `EXECUTION_WRITES`: when a call's answer waits for its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExecutionWrites {
    /// After the record's commit (default).
    Sync,
    /// At once; the record follows.
    Async,
}

impl From<ExecutionWrites> for muse_gateway::WriteMode {
    fn from(w: ExecutionWrites) -> Self {
        match w {
            ExecutionWrites::Sync => Self::Sync,
            ExecutionWrites::Async => Self::Async,
        }
    }
}

/// `IN,OUT`: USD per million input and output tokens.
fn unpriced_price(v: &str) -> Result<muse_inference::Price, ConfigError> {
    let bad = || ConfigError::Invalid {
        var: "UNPRICED_MODEL_PRICE".into(),
        message: format!(
            "{v:?}: expected IN,OUT (USD per million input and output tokens, e.g. 10,30)"
        ),
    };
    let (i, o) = v.split_once(',').ok_or_else(bad)?;
    let num = |s: &str| {
        s.trim()
            .parse::<f64>()
            .ok()
            .filter(|x| x.is_finite() && *x >= 0.0)
            .ok_or_else(bad)
    };
    Ok(muse_inference::Price {
        input_per_million: num(i)?,
        output_per_million: num(o)?,
        context_length: None,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_a_local_sqlite_dev_server() {
        let c = Config::from_vars(&HashMap::new()).unwrap();
        assert_eq!(c.env, Environment::Development);
        assert_eq!(c.bind_addr(), "127.0.0.1:8000");
        assert_eq!(c.database_url.expose(), "sqlite://./data/muse.db");
        assert_eq!(c.bcrypt_cost, 12);
        assert_eq!(c.public_url, "http://127.0.0.1:8000");
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (k, v) in [
            ("PORT", "eighty"),
            ("BCRYPT_COST", "3"),
            ("MUSE_ENV", "staging"),
            ("LOG_FORMAT", "xml"),
            ("TRUST_PROXY_HEADERS", "maybe"),
            ("ACCESS_TOKEN_TTL_SECS", "5"),
        ] {
            let err = Config::from_vars(&vars(&[(k, v)])).unwrap_err().to_string();
            assert!(err.starts_with(k), "{err}");
        }
    }

    #[test]
    fn production_refuses_missing_short_or_default_secrets() {
        let prod = |secret: Option<&str>| {
            let mut v = vars(&[("MUSE_ENV", "production")]);
            if let Some(s) = secret {
                v.insert("JWT_SECRET".into(), s.into());
            }
            Config::from_vars(&v).unwrap().resolve_jwt_secret()
        };
        assert!(matches!(prod(None), Err(ConfigError::WeakSecret(_))));
        assert!(matches!(
            prod(Some("short-secret")),
            Err(ConfigError::WeakSecret(_))
        ));
        assert!(matches!(
            prod(Some(&"a".repeat(40))),
            Err(ConfigError::WeakSecret(_))
        ));
        assert!(prod(Some("Zr8m2v9Qx1LkT7pW4sYb6Nf3Hc0Jd5Ug")).is_ok());
    }

    #[test]
    fn development_generates_and_keeps_a_secret() {
        let dir = std::env::temp_dir().join(format!("muse-cfg-{}", uuid::Uuid::new_v4()));
        let c = Config::from_vars(&vars(&[("MUSE_DATA_DIR", dir.to_str().unwrap())])).unwrap();
        let a = c.resolve_jwt_secret().unwrap();
        let b = c.resolve_jwt_secret().unwrap();
        assert_eq!(a, b);
        assert!(a.expose().len() >= MIN_SECRET_BYTES);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join("jwt_secret"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn providers_come_from_their_keys() {
        let c = Config::from_vars(&HashMap::new()).unwrap();
        assert!(
            c.llm.openai.is_none()
                && c.llm.anthropic.is_none()
                && c.llm.gemini.is_none()
                && c.llm.compatible.is_none()
        );
        let c = Config::from_vars(&vars(&[
            ("GEMINI_API_KEY", "g"),
            ("GEMINI_MODELS", "gemini-2.0-flash, gemini-1.5-pro"),
            ("OPENAI_COMPATIBLE_BASE_URL", "http://127.0.0.1:11434/v1/"),
            ("OPENAI_COMPATIBLE_NAME", "ollama"),
            ("OPENAI_COMPATIBLE_MODELS", "llama3.2"),
        ]))
        .unwrap();
        assert_eq!(
            c.llm.gemini.unwrap().models,
            ["gemini-2.0-flash", "gemini-1.5-pro"]
        );
        let compat = c.llm.compatible.unwrap();
        assert_eq!(
            (compat.name.as_str(), compat.base_url.as_str()),
            ("ollama", "http://127.0.0.1:11434/v1")
        );
        for (k, v) in [
            ("OPENAI_COMPATIBLE_BASE_URL", "ftp://x"),
            ("OPENAI_COMPATIBLE_BASE_URL", "http://x"),
        ] {
            assert!(Config::from_vars(&vars(&[(k, v)])).is_err());
        }
        assert!(Config::from_vars(&vars(&[
            ("OPENAI_API_KEY", "k"),
            ("OPENAI_BASE_URL", "file:///etc")
        ]))
        .is_err());
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let c = Config::from_vars(&vars(&[
            ("JWT_SECRET", "super-secret-value-that-must-not-leak"),
            ("SMTP_URL", "smtp://user:hunter2@mail"),
            ("ADMIN_PASSWORD", "admin-password-xyz"),
            ("DATABASE_URL", "postgres://muse:dbpass-xyz@db/muse"),
            ("OPENAI_API_KEY", "sk-openai-xyz"),
            ("ANTHROPIC_API_KEY", "sk-ant-xyz"),
        ]))
        .unwrap();
        let dbg = format!("{c:?}");
        for s in [
            "super-secret-value",
            "hunter2",
            "admin-password-xyz",
            "dbpass-xyz",
        ] {
            assert!(!dbg.contains(s), "{s} leaked");
        }
    }
}
