//! keel's configuration: the `keel.toml` schema with defaults, and validation.
//!
//! Parsing and validation are pure (text in, `Config` or a one-line error
//! out) so startup and SIGHUP reload run exactly the same checks. Reading the
//! file and overlaying flags and environment happens in the binary (`src/`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

mod channels;
mod containers;
mod ids;
mod secret;
mod tasks;
mod whatsapp;

pub use channels::{GroupReplies, SlackConfig, TelegramConfig, TelegramMode};
pub use containers::{check_instance, ContainersConfig, DEFAULT_DOCKER_HOST};
pub use ids::{check_external_id, MAX_ID_BYTES};
pub use secret::Secret;
pub use tasks::{validate_task, TaskConfig, TaskKind, TasksConfig, MAX_TASK_NAME};
pub use whatsapp::WhatsAppConfig;

/// The channels the schema knows (each has its section or is built in);
/// `adapter::CHANNELS` must list the same (a test checks it).
pub const CHANNEL_NAMES: &[&str] = &["cli", "telegram", "webhook", "slack", "whatsapp"];

/// Errors from loading or validating configuration.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConfigError {
    #[error("{origin}: {detail}")]
    Parse { origin: String, detail: String },
    #[error("{origin}: {key}: {detail}")]
    Invalid {
        origin: String,
        key: &'static str,
        detail: String,
    },
}

/// The whole configuration. Unknown keys are rejected so a typo is an error,
/// not a silently ignored setting.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the SQLite database and the CLI socket live.
    pub data_dir: PathBuf,
    /// Admin + webhook HTTP listener.
    pub listen: String,
    /// `tracing` filter directive, e.g. `info` or `keel_actors=debug`.
    pub log_level: String,
    /// `text` (default) or `json`: one JSON object per line on stderr
    /// (`KEEL_LOG_FORMAT` overrides). Applies at start.
    pub log_format: LogFormat,
    /// Deadline for draining in-flight work on SIGTERM (R33).
    pub shutdown_timeout_ms: u64,
    /// Run fully in memory: no files at all (R5).
    pub ephemeral: bool,
    pub storage: StorageConfig,
    pub webhook: WebhookConfig,
    /// Who may use the admin endpoints (`/v1/sessions*`, R30, R43).
    pub admin: AdminConfig,
    pub cli: CliConfig,
    pub agent: AgentConfig,
    pub owner: Option<OwnerConfig>,
    pub outbox: OutboxConfig,
    pub timers: TimersConfig,
    /// Telegram Bot API long polling (R13, R14).
    pub telegram: TelegramConfig,
    /// Slack Socket Mode (R13).
    pub slack: SlackConfig,
    /// WhatsApp Business Cloud API (R42).
    pub whatsapp: WhatsAppConfig,
    /// Restart policy of supervised adapters and reply resends (R16).
    pub adapters: SupervisionConfig,
    /// Limits shared by every task (R19–R22).
    pub tasks: TasksConfig,
    /// The configured tasks, by name (`[task.NAME]`).
    pub task: BTreeMap<String, TaskConfig>,
    /// People and their identities on the channels (`[principals.NAME]`):
    /// working memory belongs to the person across channels.
    pub principals: BTreeMap<String, PrincipalConfig>,
    /// The container engine (R23–R27).
    pub containers: ContainersConfig,
    /// `[vault]`: where the master key comes from (R28).
    pub vault: VaultConfig,
    /// `[sessions]`: how many conversations stay live in memory.
    pub sessions: SessionsConfig,
}

/// `[sessions]` in keel.toml.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SessionsConfig {
    /// Live session actors (with their cached snapshots) kept in memory;
    /// beyond this the least recently used idle one is evicted and reloads
    /// from the store on its next message. Default 4000: a live session
    /// costs ~5 KB (actor, mailbox, cached snapshot), so keel's VmHWM stays
    /// ~49 MiB at 100k and at 1M distinct chats (`keel bench sessions`,
    /// README "Sessions"), under the 64 MiB target; 10,000 measured 81 MiB.
    pub max_live: usize,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        SessionsConfig { max_live: 4_000 }
    }
}

/// Where the master key of the encrypted stores comes from (first match
/// wins: `KEEL_MASTER_KEY`, then this).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct VaultConfig {
    /// `file` (default) or `keychain` (the kernel keyutils store, Linux).
    pub key_source: KeySource,
    /// The key file; default `<data_dir>/master.key`, created 0600 at first start.
    pub key_file: Option<PathBuf>,
}

impl Default for VaultConfig {
    fn default() -> Self {
        VaultConfig {
            key_source: KeySource::File,
            key_file: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum KeySource {
    File,
    Keychain,
}

/// `[principals.NAME]`: one person's identities, one per channel.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PrincipalConfig {
    /// Telegram user id (integer or string).
    #[serde(deserialize_with = "ids::string_or_int::option")]
    pub telegram: Option<String>,
    /// Slack user id (`U…`).
    pub slack: Option<String>,
    /// WhatsApp id (the phone number, digits only).
    pub whatsapp: Option<String>,
    /// The webhook's `from`.
    pub webhook: Option<String>,
    /// The local CLI user (`keel chat`, `--stdin`).
    pub cli: bool,
}

impl PrincipalConfig {
    /// `(channel, user id)` of every identity this person has.
    pub fn identities(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        for (channel, id) in [
            ("telegram", &self.telegram),
            ("slack", &self.slack),
            ("whatsapp", &self.whatsapp),
            ("webhook", &self.webhook),
        ] {
            if let Some(id) = id {
                out.push((channel, id.clone()));
            }
        }
        if self.cli {
            out.push(("cli", "local".to_string()));
        }
        out
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line: timestamp, level, target, message, fields.
    Json,
}

impl LogFormat {
    /// Parse `text` / `json` (`KEEL_LOG_FORMAT`).
    pub fn parse(s: &str) -> Option<LogFormat> {
        match s.trim() {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            _ => None,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./keel-data"),
            listen: "127.0.0.1:7878".to_string(),
            log_level: "info".to_string(),
            log_format: LogFormat::Text,
            shutdown_timeout_ms: 5_000,
            ephemeral: false,
            storage: StorageConfig::default(),
            webhook: WebhookConfig::default(),
            admin: AdminConfig::default(),
            cli: CliConfig::default(),
            agent: AgentConfig::default(),
            owner: None,
            outbox: OutboxConfig::default(),
            timers: TimersConfig::default(),
            telegram: Default::default(),
            slack: Default::default(),
            whatsapp: Default::default(),
            adapters: Default::default(),
            tasks: TasksConfig::default(),
            task: BTreeMap::new(),
            principals: BTreeMap::new(),
            vault: VaultConfig::default(),
            containers: ContainersConfig::default(),
            sessions: SessionsConfig::default(),
        }
    }
}

/// Restart policy, `[adapters]` in keel.toml.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SupervisionConfig {
    /// Delay before the first restart; doubled per failed attempt.
    pub backoff_initial_ms: u64,
    /// Cap on one delay.
    pub backoff_max_ms: u64,
    /// Restarts tried before giving up.
    pub attempts: u32,
    /// A run that lasted this long resets the attempt count.
    pub healthy_after_ms: u64,
    /// Up to this fraction of a delay is taken off at random (0 = none).
    pub jitter: f64,
    /// Seed of the jitter RNG; none = a random seed per start.
    pub seed: Option<u64>,
}

impl Default for SupervisionConfig {
    fn default() -> Self {
        SupervisionConfig {
            backoff_initial_ms: 5_000,
            backoff_max_ms: 60_000,
            attempts: 5,
            healthy_after_ms: 60_000,
            jitter: 0.1,
            seed: None,
        }
    }
}

impl SupervisionConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.backoff_initial_ms == 0 || self.backoff_max_ms < self.backoff_initial_ms {
            return Err("backoff_initial_ms must be > 0 and backoff_max_ms >= it".into());
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err("jitter must be between 0 and 1".into());
        }
        Ok(())
    }
}

/// `[timers]`: history retention (R11).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TimersConfig {
    /// Done/cancelled timers and fire receipts older than this are pruned.
    pub retention_days: u32,
}

impl Default for TimersConfig {
    fn default() -> Self {
        TimersConfig { retention_days: 30 }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// fsync at every commit: an acknowledged message survives power loss.
    Full,
    /// fsync at checkpoints only: survives a process crash, not power loss.
    Normal,
}

// Debug is derived: `url` is a `Secret`, printed `<redacted>`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub synchronous: Synchronous,
    pub busy_timeout_ms: u64,
    /// Upper bound on jobs sharing one transaction (one fsync).
    pub max_batch: usize,
    /// How often a degraded store retries a write to see if the cause is gone.
    pub probe_interval_ms: u64,
    /// Encrypt `keel.db` with SQLCipher (R28); `secrets.db` is always
    /// encrypted. SQLite files only: it does not concern PostgreSQL.
    pub encrypt: bool,
    /// Where the main store lives: `sqlite` (`<data_dir>/keel.db`, the
    /// default) or `postgres` (the shared store at `url`, R37).
    pub backend: StorageBackend,
    /// The PostgreSQL URL in libpq form (`postgresql://keel@/keel?host=/run/pg`);
    /// `KEEL_DATABASE_URL` when unset. May carry a password: a `Secret`.
    pub url: Option<Secret>,
}

/// `[storage] backend`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    #[default]
    Sqlite,
    Postgres,
}

/// What a shared store without a URL is told.
pub const NO_SHARED_URL: &str =
    "backend = \"postgres\" needs a URL (storage.url or KEEL_DATABASE_URL)";

impl StorageConfig {
    /// The shared store's URL (`storage.url`, or `KEEL_DATABASE_URL` as
    /// loaded), or the one-line reason there is none.
    pub fn shared_url(&self) -> Result<zeroize::Zeroizing<String>, &'static str> {
        self.url
            .as_ref()
            .map(|u| zeroize::Zeroizing::new(u.expose().to_string()))
            .ok_or(NO_SHARED_URL)
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            synchronous: Synchronous::Full,
            busy_timeout_ms: 5_000,
            max_batch: 1_024,
            probe_interval_ms: 500,
            encrypt: true,
            backend: StorageBackend::Sqlite,
            url: None,
        }
    }
}

// Debug is derived: every secret is a `Secret`, printed `<redacted>`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    pub enabled: bool,
    /// When set, every POST must carry `X-Keel-Signature: sha256=<hex>`.
    pub secret: Option<Secret>,
    /// Where replies to webhook chats are POSTed; none = replies are only stored.
    pub reply_url: Option<String>,
    pub max_body_bytes: usize,
    /// Accept unsigned messages on a non-loopback listener (R43). Without
    /// it, such a start is refused: anyone who can reach the port could
    /// post as any sender.
    pub allow_unsigned: bool,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            enabled: true,
            secret: None,
            reply_url: None,
            max_body_bytes: 256 * 1024,
            allow_unsigned: false,
        }
    }
}

/// `[admin]`: access to the admin endpoints (R30, R43).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Loopback peers may use the admin endpoints without a token. Other
    /// peers always need a capability token (403 without one).
    pub loopback_open: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            loopback_open: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CliConfig {
    pub enabled: bool,
    /// Unix socket for `keel chat`, relative to `data_dir` unless absolute.
    pub socket: PathBuf,
}

impl Default for CliConfig {
    fn default() -> Self {
        CliConfig {
            enabled: true,
            socket: PathBuf::from("keel.sock"),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// External agent (HTTP JSON); none = the built-in brain acknowledges.
    pub url: Option<String>,
    pub timeout_ms: u64,
    pub attempts: u32,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            url: None,
            timeout_ms: 30_000,
            attempts: 3,
        }
    }
}

/// Who is told "keel restarted …" after every start (R18), and on which channel.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OwnerConfig {
    pub channel: String,
    /// An integer or a string in keel.toml.
    #[serde(deserialize_with = "ids::string_or_int::required")]
    pub chat: String,
    /// At most one "keel restarted" notice per this many seconds; one
    /// notice covers every start since the last (a crash loop sends one).
    #[serde(default = "default_owner_interval")]
    pub min_interval_s: u64,
}

fn default_owner_interval() -> u64 {
    300
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// Replies in flight at once across all channels.
    pub concurrency: usize,
    /// No answer within this long: the send's outcome is `unknown`. Resends
    /// follow the `[adapters]` backoff policy (see `outbox.rs`).
    pub send_timeout_ms: u64,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            concurrency: 32,
            send_timeout_ms: 10_000,
        }
    }
}

impl Config {
    /// Parse and validate TOML text. `origin` names the source in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config = Config::parse_toml(text, origin)?;
        config.validate(origin)?;
        Ok(config)
    }

    /// Parse TOML text without the cross-field checks, for callers that
    /// overlay flags and environment first and then call `validate`.
    pub fn parse_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_string(),
            detail: parse_detail(text, &e),
        })
    }

    /// Checks that serde cannot express. Runs at startup and on every reload.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, detail: String| ConfigError::Invalid {
            origin: origin.to_string(),
            key,
            detail,
        };
        let listen = self
            .listen_addr()
            .map_err(|e| invalid("listen", format!("{e}: {:?}", self.listen)))?;
        if self.webhook.enabled
            && self.webhook.secret.is_none()
            && !self.webhook.allow_unsigned
            && !listen.ip().is_loopback()
        {
            return Err(invalid(
                "webhook.secret",
                format!(
                    "listen {} is not a loopback address and the webhook has no secret: \
                     set webhook.secret (or KEEL_WEBHOOK_SECRET), or webhook.allow_unsigned = true \
                     (KEEL_WEBHOOK_ALLOW_UNSIGNED=true) to accept unsigned messages",
                    self.listen
                ),
            ));
        }
        if !self.ephemeral && self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty".into()));
        }
        tracing_filter_ok(&self.log_level)
            .map_err(|e| invalid("log_level", format!("{e}: {:?}", self.log_level)))?;
        if self.shutdown_timeout_ms == 0 || self.shutdown_timeout_ms > 600_000 {
            return Err(invalid(
                "shutdown_timeout_ms",
                "must be between 1 and 600000".into(),
            ));
        }
        if self.sessions.max_live == 0 || self.sessions.max_live > 10_000_000 {
            return Err(invalid(
                "sessions.max_live",
                "must be between 1 and 10000000".into(),
            ));
        }
        if self.storage.max_batch == 0 || self.storage.max_batch > 100_000 {
            return Err(invalid(
                "storage.max_batch",
                "must be between 1 and 100000".into(),
            ));
        }
        if self.timers.retention_days == 0 || self.timers.retention_days > 36_500 {
            return Err(invalid(
                "timers.retention_days",
                "must be between 1 and 36500".into(),
            ));
        }
        self.containers
            .validate()
            .map_err(|(key, detail)| invalid(key, detail))?;
        if self.storage.probe_interval_ms == 0 {
            return Err(invalid("storage.probe_interval_ms", "must be > 0".into()));
        }
        match (&self.storage.backend, &self.storage.url) {
            (StorageBackend::Postgres, None) => {
                return Err(invalid("storage.url", NO_SHARED_URL.into()))
            }
            (StorageBackend::Postgres, Some(url))
                if url.expose().parse::<postgres::Config>().is_err() =>
            {
                return Err(invalid(
                    "storage.url",
                    "is not a PostgreSQL URL (e.g. postgresql://keel@/keel?host=/run/pg)".into(),
                ))
            }
            _ => {}
        }
        if let Some(secret) = &self.webhook.secret {
            if secret.expose().is_empty() {
                return Err(invalid(
                    "webhook.secret",
                    "must not be empty (remove the key to disable signatures)".into(),
                ));
            }
        }
        if self.webhook.max_body_bytes == 0 || self.webhook.max_body_bytes > 64 * 1024 * 1024 {
            return Err(invalid(
                "webhook.max_body_bytes",
                "must be between 1 and 67108864".into(),
            ));
        }
        for (key, url) in [
            ("webhook.reply_url", &self.webhook.reply_url),
            ("agent.url", &self.agent.url),
        ] {
            if let Some(url) = url {
                check_http_url(url).map_err(|e| invalid(key, e))?;
            }
        }
        if self.agent.attempts == 0 || self.agent.timeout_ms == 0 {
            return Err(invalid(
                "agent",
                "timeout_ms and attempts must be > 0".into(),
            ));
        }
        let mut seen: BTreeMap<(&str, String), &str> = BTreeMap::new();
        for (name, person) in &self.principals {
            if name.is_empty()
                || name.len() > 64
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(invalid(
                    "principals",
                    format!("{name:?}: a name is 1-64 letters, digits, '_' or '-'"),
                ));
            }
            for (channel, id) in person.identities() {
                check_external_id("principals", &id).map_err(|e| invalid("principals", e))?;
                if let Some(other) = seen.insert((channel, id.clone()), name) {
                    return Err(invalid(
                        "principals",
                        format!("{channel} id {id:?} belongs to both {other:?} and {name:?}"),
                    ));
                }
            }
        }
        if let Some(owner) = &self.owner {
            if !CHANNEL_NAMES.contains(&owner.channel.as_str()) {
                return Err(invalid(
                    "owner.channel",
                    format!(
                        "unknown channel {:?} (known: {})",
                        owner.channel,
                        CHANNEL_NAMES.join(", ")
                    ),
                ));
            }
            check_external_id("owner.chat", &owner.chat).map_err(|e| invalid("owner.chat", e))?;
            if owner.min_interval_s > 7 * 86_400 {
                return Err(invalid(
                    "owner.min_interval_s",
                    "must be at most 604800 (a week)".into(),
                ));
            }
        }
        if self.outbox.concurrency == 0 || self.outbox.send_timeout_ms == 0 {
            return Err(invalid(
                "outbox",
                "concurrency and send_timeout_ms must be > 0".into(),
            ));
        }
        self.telegram
            .validate()
            .map_err(|e| invalid("telegram", e))?;
        self.slack.validate().map_err(|e| invalid("slack", e))?;
        self.whatsapp
            .validate()
            .map_err(|e| invalid("whatsapp", e))?;
        self.adapters
            .validate()
            .map_err(|e| invalid("adapters", e))?;
        self.tasks.validate().map_err(|(k, e)| invalid(k, e))?;
        for (name, t) in &self.task {
            validate_task(name, t).map_err(|e| invalid("task", e))?;
            if t.kind == TaskKind::Container && !self.containers.enabled {
                return Err(invalid(
                    "task",
                    format!("task.{name}.kind: container tasks need [containers] enabled = true"),
                ));
            }
        }
        Ok(())
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, std::net::AddrParseError> {
        self.listen.parse()
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }

    /// The database file, or `None` when running ephemeral.
    pub fn db_path(&self) -> Option<PathBuf> {
        (!self.ephemeral).then(|| self.data_dir.join("keel.db"))
    }

    /// The master key file (`[vault] key_file`, default `<data_dir>/master.key`).
    pub fn key_file(&self) -> PathBuf {
        match &self.vault.key_file {
            Some(p) if p.is_absolute() => p.clone(),
            Some(p) => self.data_dir.join(p),
            None => self.data_dir.join("master.key"),
        }
    }

    /// The vault database, or `None` when running ephemeral.
    pub fn secrets_path(&self) -> Option<PathBuf> {
        (!self.ephemeral).then(|| self.data_dir.join("secrets.db"))
    }

    /// The admin socket of `keel tasks run|cancel` (always in the data dir,
    /// independent of `[cli]`).
    pub fn admin_socket(&self) -> PathBuf {
        self.data_dir.join("keel-admin.sock")
    }

    pub fn cli_socket(&self) -> PathBuf {
        if self.cli.socket.is_absolute() {
            self.cli.socket.clone()
        } else {
            self.data_dir.join(&self.cli.socket)
        }
    }
}

fn check_http_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| format!("{url:?} must start with http:// or https://"))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(format!("{url:?} has no host"));
    }
    if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err("must not contain spaces or control characters".into());
    }
    Ok(())
}

/// A cheap syntax check for filter directives (`info`, `a=debug,b=warn`).
fn tracing_filter_ok(filter: &str) -> Result<(), &'static str> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    if filter.trim().is_empty() {
        return Err("must not be empty");
    }
    for directive in filter.split(',') {
        let level = directive.rsplit('=').next().unwrap_or("").trim();
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err("each directive must end in trace, debug, info, warn, error or off");
        }
    }
    Ok(())
}

/// Keep config errors on one line: toml's messages span several.
/// Where and what, never the text of the line: the line may hold a token
/// (a config cut mid-write stops inside one), and the TOML crate's own
/// message quotes it. Quoted values in the message are masked too (a
/// string given where a number belongs is echoed by serde).
fn parse_detail(text: &str, e: &toml::de::Error) -> String {
    let message = mask_quoted(&one_line(e.message()));
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            // The key the line sets is safe to name; its value is not.
            let start = before.rfind('\n').map_or(0, |i| i + 1);
            let key = text[start..]
                .split_once('=')
                .map(|(k, _)| k.trim())
                .filter(|k| {
                    !k.is_empty()
                        && k.chars()
                            .all(|c| c.is_ascii_alphanumeric() || "_-.\"".contains(c))
                })
                .map(|k| format!(" (key {k})"))
                .unwrap_or_default();
            format!("TOML parse error at line {line}, column {column}{key}: {message}")
        }
        None => format!("TOML parse error: {message}"),
    }
}

/// `"…"` for every double-quoted part of `s`.
fn mask_quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut inside = false;
    for c in s.chars() {
        if c == '"' {
            if inside {
                out.push_str("…\"");
            } else {
                out.push('"');
            }
            inside = !inside;
        } else if !inside {
            out.push(c);
        }
    }
    if inside {
        out.push('…');
    }
    out
}

fn one_line(s: &str) -> String {
    s.split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.chars().all(|c| c == '|' || c == '^' || c == ' '))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parse_error_names_line_and_column_but_never_the_line_or_a_value() {
        let cut = "log_level = \"info\"\n[telegram]\ntoken = \"4242:canary-s3cret";
        let e = Config::from_toml(cut, "keel.toml").unwrap_err().to_string();
        assert!(
            e.starts_with("keel.toml: TOML parse error at line 3, column "),
            "{e}"
        );
        assert!(!e.contains("canary") && !e.contains("4242"), "{e}");
        let typed = "[telegram]\npoll_timeout_s = \"canary-s3cret\"\n";
        let e = Config::from_toml(typed, "keel.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2"), "{e}");
        assert!(!e.contains("canary"), "{e}");
        assert!(e.contains("invalid type"), "{e}");
    }

    #[test]
    fn debug_output_never_shows_the_webhook_secret() {
        let c = Config::from_toml("[webhook]\nsecret = \"canary-5ecret\"\n", "t").unwrap();
        assert!(!format!("{c:?}").contains("canary-5ecret"));
    }

    /// Every channel token and webhook secret of the config (and the
    /// PostgreSQL URL, which may carry a password), set to a canary:
    /// `{:?}` and `{:#?}` of the whole config show none of them (they reach
    /// logs that way, e.g. a reload's debug line). Equality still sees
    /// them, so a reload notices a changed secret.
    #[test]
    fn debug_output_never_shows_any_channel_token_or_secret() {
        let text = "[webhook]\nsecret = \"canary-w1\"\n\
            [storage]\nurl = \"postgresql://keel:canary-p1@/keel?host=/run/pg\"\n\
            [telegram]\ntoken = \"canary-t1\"\nwebhook_secret = \"canary-t2\"\n\
            [slack]\napp_token = \"canary-s1\"\nbot_token = \"canary-s2\"\n\
            [whatsapp]\naccess_token = \"canary-a1\"\napp_secret = \"canary-a2\"\nverify_token = \"canary-a3\"\n";
        let c = Config::from_toml(text, "t").unwrap();
        assert_eq!(c, Config::from_toml(text, "t").unwrap());
        for (from, to) in [("canary-a2", "canary-a9"), ("canary-p1", "canary-p9")] {
            let changed = Config::from_toml(&text.replace(from, to), "t").unwrap();
            assert_ne!(c, changed, "{from} changed");
        }
        assert_eq!(
            c.telegram.token.as_ref().map(Secret::expose),
            Some("canary-t1"),
            "parsed"
        );
        assert_eq!(
            c.whatsapp.verify_token.as_ref().map(Secret::expose),
            Some("canary-a3"),
            "parsed"
        );
        for shown in [format!("{c:?}"), format!("{c:#?}")] {
            assert!(!shown.contains("canary-"), "{shown}");
            assert!(shown.contains("<redacted>"));
        }
    }

    #[test]
    fn the_postgres_backend_takes_a_libpq_url_and_never_prints_its_password() {
        let c = Config::from_toml(
            "[storage]\nbackend = \"postgres\"\nurl = \"postgresql://keel:canary-pw@/keel?host=/run/pg\"\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.storage.backend, StorageBackend::Postgres);
        let config: postgres::Config = c.storage.url.as_ref().unwrap().expose().parse().unwrap();
        assert_eq!(config.get_dbname(), Some("keel"));
        assert_eq!(
            config.get_hosts(),
            &[postgres::config::Host::Unix("/run/pg".into())]
        );
        assert!(!format!("{c:?}").contains("canary-pw"));
        let none = Config::from_toml("[storage]\nbackend = \"postgres\"\n", "t").unwrap_err();
        assert!(none.to_string().contains("KEEL_DATABASE_URL"), "{none}");
        let bad = Config::from_toml(
            "[storage]\nbackend = \"postgres\"\nurl = \"postgresql://x@/k?nope=1\"\n",
            "t",
        )
        .unwrap_err();
        assert!(bad.to_string().contains("storage.url"), "{bad}");
        let typo = Config::from_toml("[storage]\nbackend = \"mysql\"\n", "t").unwrap_err();
        assert!(typo.to_string().contains("backend"), "{typo}");
        assert_eq!(Config::default().storage.backend, StorageBackend::Sqlite);
    }

    #[test]
    fn a_public_webhook_needs_a_secret_or_the_opt_out() {
        let open = Config::from_toml("listen = \"0.0.0.0:7878\"", "t").unwrap_err();
        let msg = open.to_string();
        assert!(
            msg.contains("webhook.secret") && msg.contains("allow_unsigned"),
            "{msg}"
        );
        assert!(!msg.contains('\n'), "{msg}");
        for ok in [
            "listen = \"0.0.0.0:7878\"\n[webhook]\nsecret = \"s\"",
            "listen = \"0.0.0.0:7878\"\n[webhook]\nallow_unsigned = true",
            "listen = \"0.0.0.0:7878\"\n[webhook]\nenabled = false",
            "listen = \"[::1]:7878\"",
            "listen = \"127.0.0.2:7878\"",
        ] {
            assert!(Config::from_toml(ok, "t").is_ok(), "{ok}");
        }
        assert!(Config::from_toml("listen = \"[::]:7878\"", "t").is_err());
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::from_toml("", "test").unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn unknown_key_is_rejected_with_its_name() {
        let err = Config::from_toml("[webhook]\nsecrte = \"x\"\n", "keel.toml").unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("keel.toml:"), "{msg}");
        assert!(msg.contains("secrte"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[test]
    fn bad_values_name_the_key() {
        for (text, key) in [
            ("listen = \"nope\"", "listen"),
            ("log_level = \"loud\"", "log_level"),
            ("shutdown_timeout_ms = 0", "shutdown_timeout_ms"),
            ("[webhook]\nsecret = \"\"", "webhook.secret"),
            ("[webhook]\nreply_url = \"ftp://x\"", "webhook.reply_url"),
            ("[timers]\nretention_days = 0", "timers.retention_days"),
            (
                "[owner]\nchannel = \"pigeon\"\nchat = \"x\"",
                "owner.channel",
            ),
        ] {
            let msg = Config::from_toml(text, "t").unwrap_err().to_string();
            assert!(msg.contains(key), "{text} -> {msg}");
        }
    }

    #[test]
    fn task_sections_parse_and_bad_ones_name_the_key() {
        let c = Config::from_toml(
            "[tasks]\nconcurrency = 2\n[task.backup]\ncommand = [\"tar\", \"c\"]\n\
             env = { A = \"1\" }\ntimeout_s = 60\nallowed_chats = [\"telegram:1\"]",
            "t",
        )
        .unwrap();
        assert_eq!(c.tasks.concurrency, 2);
        let t = &c.task["backup"];
        assert_eq!((t.max_attempts, t.kind), (3, TaskKind::Process));
        for (text, key) in [
            ("[tasks]\nconcurrency = 0", "tasks.concurrency"),
            ("[tasks]\nretention_days = 0", "tasks.retention_days"),
            ("[task.x]\ncommand = []", "task.x.command"),
            (
                "[task.x]\ncommand = [\"a\"]\nkind = \"container\"",
                "task.x.kind",
            ),
            (
                "[task.x]\ncommand = [\"a\"]\nkind = \"container\"\nimage = \"busybox\"",
                "container tasks need [containers] enabled",
            ),
            (
                "[task.x]\ncommand = [\"a\"]\nimage = \"busybox\"",
                "task.x.image",
            ),
            (
                "[task.x]\ncommand = [\"a\"]\ntimeout_s = 0",
                "task.x.timeout_s",
            ),
            (
                "[task.x]\ncommand = [\"a\"]\nallowed_chats = [\"x\"]",
                "task.x.allowed_chats",
            ),
            ("[task.\"a b\"]\ncommand = [\"a\"]", "task name"),
            ("[task.x]\ncommand = [\"a\"]\nshell = true", "shell"),
        ] {
            let msg = Config::from_toml(text, "t").unwrap_err().to_string();
            assert!(msg.contains(key) && !msg.contains('\n'), "{text} -> {msg}");
        }
    }

    #[test]
    fn wrong_type_and_overflow_are_errors() {
        assert!(Config::from_toml("shutdown_timeout_ms = \"5\"", "t").is_err());
        assert!(Config::from_toml("shutdown_timeout_ms = 99999999999999999999", "t").is_err());
        assert!(Config::from_toml("listen = \"a\"\nlisten = \"b\"", "t").is_err());
    }
}
