//! Build the actor graph from a `Config`, in the start order of R32:
//! config → store (open, integrity check, migrate) → recovery (boot epoch,
//! unsent replies, awaiting turns, interrupted tasks, orphan containers
//! reaped and services rebuilt, overdue timers) →
//! adapters by priority → owner notice → ready. The `settings_*` functions are the one path that turns a `Config`
//! into running settings; startup and SIGHUP reload both go through them.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::oneshot;

use crate::adapter::cli::{CliAdapter, CliClients};
use crate::adapter::webhook::{WebhookAdapter, WebhookSettings, WebhookState};
use crate::agent::AgentSettings;
use crate::brain::CommandBrain;
use crate::config::Config;
use crate::error::StoreError;
use crate::health::{Gate, Health, Phase};
pub mod lifecycle;
pub mod reload;
pub mod watchdog;

use crate::clock::{Clock, WallClock};
use crate::containers::{ContainerReaper, ReaperSettings, RecoverContainers, RecoverReport};
use crate::metrics::Metrics;
use crate::outbox::{OutboxActor, OutboxKick, ReplySink};
use crate::persistence::meta::{CommitOwnerNotice, NoticeCoverage, NoticeOutcome};
use crate::persistence::{self, PersistenceActor, RecordBoot, SessionKey, StoreOptions};
use crate::session::{ResumeAwaiting, SessionRegistry, SessionSettings};
use crate::tasks::{Recover, TaskActor, TaskRecovery, TaskSettings};
use crate::timer::{RecoverTimers, TimerActor, TimerSettings, TimerStats};
use lifecycle::{ExitReport, Lifecycle, LogLevelHook};

/// How often an instance on a shared store rereads the token table (grants
/// and revocations made on other instances).
const TOKEN_RESYNC: Duration = Duration::from_secs(1);

/// Why keel could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
}

/// Options that only exist on the command line.
#[derive(Clone, Default)]
pub struct RunOptions {
    /// Serve one local user on stdin/stdout (`keel run --stdin`).
    pub stdin: bool,
    /// Changes the log filter on reload (owned by the binary).
    pub log_level: Option<LogLevelHook>,
    /// PATH and LANG of keel (read by the binary), given to task children.
    pub task_env: Vec<(String, String)>,
    /// R39: serve a store that lost acknowledged commits (`--accept-data-loss`).
    pub accept_data_loss: bool,
    /// The master key (found by the binary): unlocks `secrets.db` and, while
    /// `[storage] encrypt`, `keel.db`. `None` only in library tests.
    pub key: Option<crate::masterkey::KeyHandle>,
    /// Set to each recovery step as start reaches it (the binary shows the
    /// one under way on a terminal when start takes over a second).
    pub steps: StartSteps,
}

/// The start-up step under way, shared with the binary: `start` names each
/// step as it begins; the binary reads it (and marks start finished).
#[derive(Clone, Default)]
pub struct StartSteps(Arc<std::sync::Mutex<StepState>>);

#[derive(Default)]
struct StepState {
    step: &'static str,
    finished: bool,
}

impl StartSteps {
    /// `step` begins (`"checking keel.db"`).
    pub fn set(&self, step: &'static str) {
        if let Ok(mut s) = self.0.lock() {
            s.step = step;
        }
    }

    /// Start is over (ready, or failed).
    pub fn finish(&self) {
        if let Ok(mut s) = self.0.lock() {
            s.finished = true;
        }
    }

    /// The step under way; `None` once start is over.
    pub fn current(&self) -> Option<&'static str> {
        let s = self.0.lock().ok()?;
        (!s.finished).then_some(if s.step.is_empty() {
            "starting"
        } else {
            s.step
        })
    }
}

/// A started keel.
pub struct Running {
    pub lifecycle: Addr<Lifecycle>,
    /// Resolves when shutdown finished.
    pub done: oneshot::Receiver<ExitReport>,
    /// The HTTP address actually bound (useful with port 0).
    pub http_addr: SocketAddr,
    pub cli: Option<Addr<CliAdapter>>,
    pub boot_epoch: i64,
}

/// Channels that have somewhere to send replies (the channel registry).
pub fn routed_channels(config: &Config) -> HashSet<String> {
    crate::adapter::routed_channels(config)
}

pub fn settings_sessions(config: &Config) -> SessionSettings {
    let agent = config.agent.url.as_ref().map(|url| AgentSettings {
        url: url.clone(),
        timeout: Duration::from_millis(config.agent.timeout_ms),
        attempts: config.agent.attempts,
    });
    let mut brain = CommandBrain::new(agent.is_some());
    crate::timer::commands::register(&mut brain);
    crate::tasks::commands::register(
        &mut brain,
        crate::tasks::commands::TaskAccess {
            defs: Arc::new(config.task.clone()),
            owner: owner_session(config),
        },
    );
    SessionSettings {
        brain: Arc::new(brain),
        routed_channels: routed_channels(config),
        agent,
        principals: Arc::new(principal_index(config)),
    }
}

/// Channel → user id → person, from `[principals.*]`.
fn principal_index(config: &Config) -> HashMap<String, HashMap<String, String>> {
    let mut index: HashMap<String, HashMap<String, String>> = HashMap::new();
    for (name, person) in &config.principals {
        for (channel, id) in person.identities() {
            index
                .entry(channel.to_string())
                .or_default()
                .insert(id, name.clone());
        }
    }
    index
}

/// The owner's session id (`<channel>:<chat>`), if an owner is configured.
pub fn owner_session(config: &Config) -> Option<String> {
    config
        .owner
        .as_ref()
        .map(|o| SessionKey::new(&o.channel, &o.chat).id)
}

/// The task runner's settings (startup and reload).
pub fn settings_tasks(config: &Config, base_env: &[(String, String)]) -> TaskSettings {
    let default_cwd = if config.data_dir.is_dir() {
        config.data_dir.clone()
    } else {
        std::path::PathBuf::from("/")
    };
    TaskSettings {
        defs: Arc::new(config.task.clone()),
        limits: config.tasks.clone(),
        owner: owner_session(config),
        routed: routed_channels(config),
        default_cwd,
        base_env: base_env.to_vec(),
    }
}

/// This instance's id: `[containers] instance` when set, else the one kept
/// in the store (created at first start), the same the reaper uses.
async fn instance_id(
    config: &Config,
    persistence: &Addr<PersistenceActor>,
) -> Result<String, StartError> {
    if let Some(id) = &config.containers.instance {
        return Ok(id.clone());
    }
    use rand::Rng;
    let proposed: String = (0..12)
        .map(|_| {
            let n = rand::thread_rng().gen_range(0..36u32);
            char::from_digit(n, 36).unwrap_or('0')
        })
        .collect();
    if config.storage.backend == crate::config::StorageBackend::Postgres {
        // A shared store serves several instances: the id is this
        // instance's, kept in its own data dir (a new one per start when
        // ephemeral), never the store's.
        if config.ephemeral {
            return Ok(proposed);
        }
        return instance_file(&config.data_dir.join("instance.id"), &proposed);
    }
    Ok(persistence
        .send(crate::persistence::services::GetOrCreateInstance { proposed })
        .await
        .unwrap_or(Err(StoreError::Closed))?)
}

/// The id kept in `path`, written from `proposed` (0600, fsync'd) at the
/// first start.
fn instance_file(path: &std::path::Path, proposed: &str) -> Result<String, StartError> {
    let bad = |detail: String| {
        StartError::Store(StoreError::Open {
            path: path.to_path_buf(),
            detail,
        })
    };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let id = text.trim();
            let valid = !id.is_empty()
                && id.len() <= 64
                && id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !valid {
                return Err(bad(
                    "the instance id is empty or not [A-Za-z0-9_-]{1,64} (fix or remove the file)"
                        .into(),
                ));
            }
            Ok(id.to_string())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            crate::fsutil::write_atomic(path, format!("{proposed}\n").as_bytes())
                .map_err(|e| bad(e.to_string()))?;
            Ok(proposed.to_string())
        }
        Err(e) => Err(bad(e.to_string())),
    }
}

/// The reaper's settings: this instance's id and the paths no container
/// may mount.
fn settings_reaper(config: &Config, instance: &str) -> ReaperSettings {
    let mut paths = vec![std::path::PathBuf::from(
        config
            .containers
            .host()
            .strip_prefix("unix://")
            .unwrap_or("/var/run/docker.sock"),
    )];
    paths.push("/var/run/docker.sock".into());
    paths.push("/run/docker.sock".into());
    if !config.ephemeral {
        paths.push(config.data_dir.clone());
        if let Ok(real) = config.data_dir.canonicalize() {
            paths.push(real);
        }
    }
    ReaperSettings {
        instance: instance.to_string(),
        reconcile_interval: Duration::from_secs(config.containers.reconcile_interval_s),
        stop_services_on_shutdown: config.containers.stop_services_on_shutdown,
        forbidden: crate::containers::spec::Forbidden { paths },
    }
}

pub fn settings_admin(config: &Config) -> crate::http::AdminAccess {
    crate::http::AdminAccess {
        loopback_open: config.admin.loopback_open,
    }
}

/// How long finished timers and receipts are kept.
pub fn settings_retention(config: &Config) -> Duration {
    Duration::from_secs(u64::from(config.timers.retention_days) * 86_400)
}

pub fn settings_webhook(config: &Config) -> WebhookSettings {
    WebhookSettings {
        secret: config.webhook.secret.clone(),
        max_body_bytes: config.webhook.max_body_bytes,
    }
}

/// Every routed channel's reply sink (the channel registry).
pub fn settings_sinks(
    config: &Config,
    http: &reqwest::Client,
    cli: Option<&CliClients>,
    health: &crate::adapter::ChannelHealth,
    clock: &Arc<dyn Clock>,
    events: &crate::adapter::ChatEvents,
) -> HashMap<String, Arc<dyn ReplySink>> {
    crate::adapter::reply_sinks(
        config,
        &crate::adapter::SinkDeps {
            http,
            cli,
            health,
            clock,
            events,
        },
    )
}

/// The owner's "keel restarted" notice of this start (R18).
struct OwnerNotice {
    session: SessionKey,
    deliver: bool,
    min_interval_ms: i64,
    /// What this start recovered, appended to the headline.
    detail: String,
}

impl OwnerNotice {
    fn message(&self, boot_epoch: Option<i64>) -> CommitOwnerNotice {
        let detail = self.detail.clone();
        CommitOwnerNotice {
            session: self.session.clone(),
            deliver: self.deliver,
            boot_epoch,
            min_interval_ms: self.min_interval_ms,
            render: Box::new(move |cover| restart_headline(cover) + &detail),
        }
    }

    /// Kick the outbox for a committed notice; for a deferred one, try
    /// again once the interval has passed (if keel is still up then; if
    /// not, the next start's notice covers these starts too).
    fn follow_up(
        self,
        outcome: NoticeOutcome,
        persistence: Addr<PersistenceActor>,
        outbox: Addr<OutboxActor>,
    ) {
        match outcome {
            NoticeOutcome::Sent(_) => outbox.do_send(OutboxKick),
            NoticeOutcome::Nothing => {}
            NoticeOutcome::Deferred { retry_in_ms } => {
                actix_rt::spawn(async move {
                    let wait = Duration::from_millis(retry_in_ms.max(0) as u64);
                    tokio::time::sleep(wait).await;
                    match persistence.send(self.message(None)).await {
                        Ok(Ok(NoticeOutcome::Sent(cover))) => {
                            tracing::info!(restarts = cover.restarts, "owner told about restarts");
                            outbox.do_send(OutboxKick);
                        }
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => tracing::warn!(error = %e, "owner notice not stored"),
                        Err(_) => {}
                    }
                });
            }
        }
    }
}

/// "keel restarted (start #7)." or, for a notice covering several starts,
/// "keel restarted 6 times since the last notice (starts #2–#7)."
fn restart_headline(cover: &NoticeCoverage) -> String {
    if cover.restarts <= 1 {
        format!("keel restarted (start #{}).", cover.last_epoch)
    } else {
        format!(
            "keel restarted {} times since the last notice (starts #{}–#{}).",
            cover.restarts, cover.first_epoch, cover.last_epoch
        )
    }
}

/// What this start recovered, after the headline.
fn restart_detail(
    pending_replies: i64,
    awaiting: usize,
    timers: &TimerStats,
    tasks: &TaskRecovery,
    containers: Option<&RecoverReport>,
) -> String {
    let mut text = format!(
        " Timers recovered: {} fired late, {} skipped.",
        timers.late, timers.missed
    );
    text.push_str(&format!(
        " Tasks interrupted: {}, queued again: {}.",
        tasks.interrupted, tasks.requeued
    ));
    if let Some(c) = containers {
        text.push_str(&format!(
            " Containers reaped: {}; services: {} ({} adopted).",
            c.reaped, c.services, c.adopted
        ));
        if let Some(e) = &c.engine_error {
            text.push_str(&format!(" Container engine degraded: {e}."));
        }
        if let Some(d) = &c.log_damage {
            text.push_str(&format!(
                " Services event log damaged: {d}; run keel verify."
            ));
        }
    }
    if pending_replies > 0 {
        text.push_str(&format!(
            " {pending_replies} unsent replies are being delivered now."
        ));
    }
    if awaiting > 0 {
        text.push_str(&format!(
            " {awaiting} messages were still waiting for the agent; they are being answered."
        ));
    }
    text.push_str(" If you were waiting on something, ask again.");
    text
}

/// The store `start` runs on, opened and migrated.
struct OpenedStore {
    persistence: Addr<PersistenceActor>,
    /// `{"from", "to"}` when this start migrated the schema (audited once ready).
    migrated: Option<serde_json::Value>,
    /// Acknowledged commits found missing and accepted (`--accept-data-loss`).
    accepted_loss: Option<persistence::acked::DataLoss>,
    /// The SQLite file and its key; `None` in memory and on PostgreSQL.
    file: Option<(std::path::PathBuf, Option<crate::masterkey::KeyHandle>)>,
}

/// Open `<data_dir>/keel.db` (or memory): integrity check, migrations, the
/// acknowledged-commit check (R39), then the writer.
async fn open_file_store(
    config: &Config,
    opts: &RunOptions,
    health: &Health,
    metrics: &Metrics,
    clock: &Arc<dyn Clock>,
) -> Result<OpenedStore, StartError> {
    opts.steps.set("opening and checking keel.db");
    let store_opts = StoreOptions::from_config(config, opts.key.as_ref());
    let open_opts = store_opts.clone();
    let (conn, report) = tokio::task::spawn_blocking(move || persistence::open_store(&open_opts))
        .await
        .map_err(|e| StartError::Config(format!("store open task failed: {e}")))??;
    tracing::info!(
        path = %store_opts.path.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| ":memory:".into()),
        schema = report.schema_version,
        migrated_from = report.migrated_from,
        "store open"
    );
    let migrated = (report.migrated_from != report.schema_version)
        .then(|| serde_json::json!({"from": report.migrated_from, "to": report.schema_version}));
    let background_check = report
        .deferred_check
        .clone()
        .map(|db| persistence::check_in_background(db, store_opts.key.clone(), health.clone()));
    // R39: acknowledged commits missing (a damaged or deleted WAL).
    let mut accepted_loss = None;
    if let (Some(loss), Some(db)) = (report.data_loss, &store_opts.path) {
        if opts.accept_data_loss {
            accepted_loss = Some(loss);
            tracing::warn!(
                audit = "data_loss_accepted",
                path = %db.display(),
                missing = loss.missing(),
                recorded = loss.recorded,
                found = loss.found,
                "data loss accepted (--accept-data-loss): serving what is left; the record of acknowledged commits restarts at the store's commit"
            );
            let record = persistence::acked::record_path(db);
            persistence::acked::reset(&record, loss.found).map_err(|e| {
                StartError::Store(StoreError::Open {
                    path: record.clone(),
                    detail: e.to_string(),
                })
            })?;
        } else {
            let reason = loss.reason(db);
            tracing::error!(
                event = "data_loss_detected",
                path = %db.display(),
                missing = loss.missing(),
                recorded = loss.recorded,
                found = loss.found,
                "{reason}"
            );
            health.data_loss(&reason);
        }
    }
    let file = store_opts
        .path
        .clone()
        .map(|path| (path, store_opts.key.clone()));
    let persistence = PersistenceActor::new(
        conn,
        store_opts,
        health.clone(),
        metrics.clone(),
        clock.clone(),
    )
    .interrupt_on_close(background_check)
    .start();
    Ok(OpenedStore {
        persistence,
        migrated,
        accepted_loss,
        file,
    })
}

/// Connect to the shared store (`[storage] backend = "postgres"`), apply
/// its migrations (instances starting together apply each once) and start
/// its writer. The connection is made off the async runtime: the sync
/// client runs a small runtime of its own.
async fn open_shared_store(
    config: &Config,
    opts: &RunOptions,
    health: &Health,
    metrics: &Metrics,
    clock: &Arc<dyn Clock>,
) -> Result<OpenedStore, StartError> {
    opts.steps.set("connecting to the shared store");
    let url = config
        .storage
        .shared_url()
        .map_err(|e| StartError::Config(e.into()))?
        .to_string();
    let connect_url = url.clone();
    let (client, (from, to)) = tokio::task::spawn_blocking(move || {
        let mut client = persistence::pg::connect(&connect_url)?;
        let versions = persistence::pg::pg_migrate(&mut client, &connect_url)?;
        Ok::<_, StoreError>((client, versions))
    })
    .await
    .map_err(|e| StartError::Config(format!("store connect task failed: {e}")))??;
    tracing::info!(
        url = %persistence::pg::redact_url(&url),
        schema = to,
        migrated_from = from,
        "shared store open"
    );
    let persistence = PersistenceActor::postgres(
        client,
        persistence::pg::PgOptions {
            url,
            max_batch: config.storage.max_batch,
            probe_interval: Duration::from_millis(config.storage.probe_interval_ms),
        },
        health.clone(),
        metrics.clone(),
        clock.clone(),
    )
    .start();
    Ok(OpenedStore {
        persistence,
        migrated: (from != to).then(|| serde_json::json!({"from": from, "to": to})),
        accepted_loss: None,
        file: None,
    })
}

/// Start keel. Must run inside an actix `System`.
pub async fn start(config: Config, opts: RunOptions) -> Result<Running, StartError> {
    if config.telegram.enabled && config.telegram.token.is_none() {
        return Err(StartError::Config(
            "telegram.enabled is set but there is no token (set telegram.token or KEEL_TELEGRAM_TOKEN)".into(),
        ));
    }
    if config.slack.enabled
        && (config.slack.app_token.is_none() || config.slack.bot_token.is_none())
    {
        return Err(StartError::Config(
            "slack.enabled is set but a token is missing (set slack.app_token and slack.bot_token, or KEEL_SLACK_APP_TOKEN and KEEL_SLACK_BOT_TOKEN)".into(),
        ));
    }
    let metrics = Metrics::new();
    // The one wall clock of this process; every actor that reads the time
    // gets this handle.
    let clock: Arc<dyn Clock> = Arc::new(WallClock);
    let health = Health::new(metrics.clone());
    let gate = Gate::closed();

    // Stores: open, integrity check, migrate (blocking, before anything else).
    let shared = config.storage.backend == crate::config::StorageBackend::Postgres;
    let OpenedStore {
        persistence,
        migrated,
        accepted_loss,
        file: store_file,
    } = if shared {
        open_shared_store(&config, &opts, &health, &metrics, &clock).await?
    } else {
        open_file_store(&config, &opts, &health, &metrics, &clock).await?
    };

    // The HTTP listener comes up before recovery so /healthz and /readyz
    // answer throughout; the webhook route refuses messages (503) until the
    // intake gate opens at the end.
    let http = reqwest::Client::new();
    // Lets a webhook-driven channel stop from its sink (attached below,
    // when the supervisor's report exists).
    let channel_health = crate::adapter::ChannelHealth::default();
    // Lets a reply sink report a chat that moved (attached to the registry below).
    let chat_events = crate::adapter::ChatEvents::default();
    let cli_enabled = config.cli.enabled;
    let cli_clients = cli_enabled.then(CliClients::default);
    let outbox = OutboxActor::new(
        persistence.clone(),
        settings_sinks(
            &config,
            &http,
            cli_clients.as_ref(),
            &channel_health,
            &clock,
            &chat_events,
        ),
        config.outbox.clone(),
        metrics.clone(),
    )
    .with_retry(config.adapters.clone());
    let (outbox, outbox_lease) = if shared {
        let (tx, rx) = tokio::sync::watch::channel(None);
        (outbox.shared(rx, Duration::from_millis(200)), Some(tx))
    } else {
        (outbox, None)
    };
    let outbox = outbox.start();
    if let Some(clients) = &cli_clients {
        // A `keel chat` client subscribing releases the replies waiting for it.
        clients.set_ready_hook(outbox.clone().recipient());
    }
    // The timer actor's address exists from here (sessions tell it about new
    // timers); it starts running after recovery below.
    let timer_ctx: Context<TimerActor> = Context::new();
    let timers = timer_ctx.address();
    // Likewise the task runner's (sessions, timers and HTTP queue tasks).
    let task_ctx: Context<TaskActor> = Context::new();
    let tasks = task_ctx.address();
    // The container reaper's (HTTP and the admin socket send it service
    // requests); it starts, and recovers, after the tasks below.
    let reaper_ctx: Option<Context<ContainerReaper>> = config.containers.enabled.then(Context::new);
    let reaper = reaper_ctx.as_ref().map(|c| c.address());
    let registry = SessionRegistry::new(
        persistence.clone(),
        outbox.clone().recipient(),
        settings_sessions(&config),
        metrics.clone(),
        clock.clone(),
    )
    .with_timers(timers.clone().recipient())
    .with_outbox_forget(outbox.clone().recipient())
    .with_tasks(tasks.clone().recipient())
    .with_max_live(config.sessions.max_live)
    .start();
    chat_events.attach(registry.clone().recipient());
    let webhook_settings = Arc::new(RwLock::new(settings_webhook(&config)));
    // The webhook channel's adapter actor, behind the HTTP route.
    let webhook_adapter = config
        .webhook
        .enabled
        .then(|| WebhookAdapter::new(registry.clone(), metrics.clone()).start());
    // The WhatsApp channel's adapter actor, behind its routes.
    let whatsapp_adapter = config.whatsapp.enabled.then(|| {
        crate::adapter::whatsapp::WhatsAppAdapter::new(registry.clone(), metrics.clone()).start()
    });
    let whatsapp_state = whatsapp_adapter.clone().map(|intake| {
        crate::adapter::whatsapp::WhatsAppState::new(
            config.whatsapp.clone(),
            intake,
            persistence.clone(),
            gate.clone(),
            metrics.clone(),
        )
    });
    // Telegram in webhook mode: its route, and the cell where the
    // supervised getMe leaves the bot's identity for it.
    let telegram_bot = crate::adapter::telegram::BotCell::default();
    let telegram_webhook = match (&config.telegram, &config.telegram.token) {
        (t, Some(token)) if t.enabled && t.mode == crate::config::TelegramMode::Webhook => t
            .webhook_secret
            .as_ref()
            .map(|secret| crate::adapter::telegram::TelegramWebhook {
                api: crate::adapter::telegram::BotApi::new(http.clone(), &t.api_base, token),
                secret: secret.clone(),
                group_replies: t.group_replies,
                bot: telegram_bot.clone(),
                albums: Default::default(),
                registry: registry.clone(),
                gate: gate.clone(),
                metrics: metrics.clone(),
            }),
        _ => None,
    };
    let webhook = webhook_adapter.clone().map(|intake| WebhookState {
        settings: webhook_settings.clone(),
        intake,
        gate: gate.clone(),
        metrics: metrics.clone(),
    });
    let admin_access = Arc::new(RwLock::new(settings_admin(&config)));
    // Capability tokens: every row, kept in memory so a request never waits
    // for the store and a revocation applies at once.
    let tokens = crate::vault::TokenTable::load(
        persistence
            .send(crate::persistence::vault::GetTokens)
            .await
            .unwrap_or(Err(StoreError::Closed))?,
    );
    let addr = config
        .listen_addr()
        .map_err(|e| StartError::Config(format!("listen: {e}")))?;
    let (http_addr, server) = crate::http::serve(
        addr,
        health.clone(),
        metrics.clone(),
        persistence.clone(),
        admin_access.clone(),
        crate::http::Backends {
            tasks: Some(tasks.clone()),
            services: reaper.clone(),
            console: Some(crate::console::Console::new(
                health.clone(),
                clock.clone(),
                match &store_file {
                    Some((path, key)) => crate::console::StoreSource::File {
                        path: path.clone(),
                        key: key.clone(),
                    },
                    None => crate::console::StoreSource::Writer(persistence.clone()),
                },
                reaper.clone(),
                {
                    let mut names: Vec<String> = routed_channels(&config).into_iter().collect();
                    names.sort();
                    names
                },
            )),
        },
        crate::http::AdminDeps {
            tokens: tokens.clone(),
            clock: clock.clone(),
            outbox: Some(outbox.clone().recipient()),
        },
        webhook
            .iter()
            .map(|s| s.routes())
            .chain(whatsapp_state.iter().map(|s| s.routes()))
            .chain(telegram_webhook.iter().map(|s| s.routes()))
            .collect(),
    )
    .map_err(|source| StartError::Bind { addr, source })?;
    tracing::info!(addr = %http_addr, "http listening");

    // R39: refuse to serve a store that lost acknowledged commits. Only
    // the HTTP listener runs (`/readyz` says why); no recovery, timers,
    // tasks or adapters, and the writer commits nothing.
    if health.refusing_writes().is_some() {
        let (done_tx, done) = oneshot::channel();
        let lifecycle = Lifecycle {
            config,
            health,
            gate,
            metrics,
            persistence,
            registry,
            outbox,
            timers,
            tasks,
            task_env: opts.task_env.clone(),
            cli: None,
            webhook: webhook_adapter,
            adapters: None,
            containers: None,
            tokens: tokens.clone(),
            leases: None,
            http: server,
            http_client: http,
            cli_clients,
            webhook_settings,
            admin_access,
            channel_health,
            clock: clock.clone(),
            chat_events,
            log_level: opts.log_level,
            shutting_down: false,
            done: Some(done_tx),
        }
        .start();
        return Ok(Running {
            lifecycle,
            done,
            http_addr,
            cli: None,
            boot_epoch: 0,
        });
    }

    let recovery_started = tokio::time::Instant::now();
    // Recovery: count this start (R38) and resume turns awaiting the agent;
    // the outbox is already sending what an earlier run left unsent (R3).
    opts.steps.set("recording this start");
    let stats = persistence
        .send(RecordBoot)
        .await
        .unwrap_or(Err(StoreError::Closed))?;
    metrics.boot_epoch.set(stats.boot_epoch);
    // R49: this instance's heartbeat row and the leases it runs under.
    let instance = instance_id(&config, &persistence).await?;
    let leases = {
        let id = &instance;
        let info = serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "http": http_addr.to_string(),
        })
        .to_string();
        crate::lease::LeaseKeeper::start(
            persistence.clone(),
            clock.clone(),
            id,
            &info,
            crate::lease::LeaseTimes::default(),
        )
        .await?
    };
    if let Some(tx) = outbox_lease {
        // One sender for the cluster (issue 13): the holder of the
        // `outbox` lease sends every instance's replies, in order per chat;
        // when it dies another instance takes the lease and the replies.
        let mut held = leases.want("outbox").await;
        actix_rt::spawn(async move {
            loop {
                let token = *held.borrow_and_update();
                if tx.send(token).is_err() || held.changed().await.is_err() {
                    break;
                }
            }
        });
    }
    opts.steps.set("resuming turns awaiting the agent");
    let awaiting = registry
        .send(ResumeAwaiting)
        .await
        .unwrap_or(Err(StoreError::Closed))?;
    // Tasks (R21, R38): RUNNING rows of an earlier start are INTERRUPTED,
    // their leftovers killed, retry_on_restart ones queued again; then the
    // runner starts the queue. The admin socket of `keel tasks run|cancel`
    // lives in the data dir (none when ephemeral).
    let admin_socket = if config.ephemeral {
        None
    } else {
        Some(
            crate::tasks::admin::serve(
                &config.admin_socket(),
                tasks.clone(),
                opts.key.clone().map(|key| crate::vault::admin::VaultAdmin {
                    persistence: persistence.clone(),
                    tokens: tokens.clone(),
                    secrets_path: config.secrets_path(),
                    key,
                    clock: clock.clone(),
                    db_path: config.db_path(),
                    db_key: store_file.as_ref().and_then(|(_, key)| key.clone()),
                    shared,
                }),
                reaper.clone(),
            )
            .map_err(|e| {
                StartError::Config(format!(
                    "cannot bind the admin socket {}: {e}",
                    config.admin_socket().display()
                ))
            })?,
        )
    };
    // The engine and the instance id, shared by the reaper and the runner
    // of container tasks.
    let containers: Option<(Arc<dyn crate::containers::engine::Engine>, ReaperSettings)> =
        if config.containers.enabled {
            let settings = settings_reaper(&config, &instance);
            let engine = crate::containers::docker::DockerEngine::new(
                config.containers.host(),
                Duration::from_millis(config.containers.request_timeout_ms),
            );
            Some((Arc::new(engine), settings))
        } else {
            None
        };
    // Container tasks reach the engine through the reaper, the only code
    // that talks to it.
    let container_runner = containers
        .as_ref()
        .zip(reaper.clone())
        .map(|((_, settings), addr)| {
            Arc::new(crate::tasks::container::ContainerRunner::new(
                Arc::new(crate::containers::through::ThroughReaper::new(addr)),
                &settings.instance,
                Duration::from_millis(config.tasks.grace_ms),
            )) as Arc<dyn crate::tasks::process::Runner>
        });
    let runner = crate::tasks::process::ProcessRunner::start()
        .map_err(|e| StartError::Config(format!("cannot start the task spawner thread: {e}")))?;
    task_ctx.run(
        TaskActor::new(
            persistence.clone(),
            outbox.clone().recipient(),
            Arc::new(runner),
            clock.clone(),
            settings_tasks(&config, &opts.task_env),
            stats.boot_epoch,
        )
        .with_metrics(crate::tasks::TaskMetrics::new(&metrics))
        // On a shared store each instance runs, recovers and cancels its
        // own attempts (R49); one node keeps the rule it always had.
        .with_instance(shared.then(|| instance.clone()))
        .with_container_runner(container_runner)
        .with_admin(admin_socket),
    );
    opts.steps.set("recovering tasks");
    let task_stats = tasks
        .send(Recover)
        .await
        .unwrap_or(Err(StoreError::Closed))?;
    // Containers (R24, R25): reap this instance's orphans, rebuild services
    // from the event log (adopt / replace / create). An engine that fails
    // leaves containers degraded, never keel down (R27).
    let container_report = match (reaper_ctx, &reaper, containers) {
        (Some(ctx), Some(addr), Some((engine, settings))) => {
            let lease = leases
                .want(&format!("reconciler:{}", settings.instance))
                .await;
            ctx.run(
                ContainerReaper::new(
                    engine,
                    persistence.clone(),
                    health.clone(),
                    &metrics,
                    settings,
                )
                .with_lease(lease),
            );
            opts.steps.set("recovering containers");
            Some(
                addr.send(RecoverContainers)
                    .await
                    .unwrap_or(Err(StoreError::Closed))?,
            )
        }
        _ => None,
    };
    // Timers: fire what came due while keel was down, per misfire policy (R10).
    let mut timer_settings =
        TimerSettings::new(config.timers.retention_days, routed_channels(&config));
    if shared {
        // Other instances create timers too: reread the due window twice a
        // second, so an instant fires within well under 2 s on some live
        // instance whichever created it (the receipt keeps it to once).
        timer_settings.resync_every = Duration::from_millis(500);
    }
    timer_ctx.run(
        TimerActor::new(
            persistence.clone(),
            outbox.clone().recipient(),
            clock.clone(),
            timer_settings,
        )
        .with_metrics(crate::timer::TimerMetrics::new(&metrics))
        .with_tasks(tasks.clone().recipient()),
    );
    opts.steps.set("replaying timers");
    let timer_stats = timers
        .send(RecoverTimers)
        .await
        .unwrap_or(Err(StoreError::Closed))?;
    tracing::info!(
        fired = timer_stats.fired,
        late = timer_stats.late,
        skipped = timer_stats.missed,
        "timers recovered"
    );
    crate::failpoint::hit("startup_recovery");

    // Adapters in priority order (R15): cli, then webhook (its route is
    // bound already; its intake opens with the gate below).
    let cli = cli_clients.as_ref().map(|clients| {
        CliAdapter {
            registry: registry.clone(),
            gate: gate.clone(),
            metrics: metrics.clone(),
            clients: clients.clone(),
            since: tokio::time::Instant::now(),
        }
        .start()
    });
    // Owner notification (R18), through the outbox like any reply; at most
    // one per `[owner] min_interval_s`, covering every start since the last
    // (a crash loop sends one notice, not one per start).
    if let Some(owner) = &config.owner {
        let notice = OwnerNotice {
            session: SessionKey::new(&owner.channel, &owner.chat),
            deliver: routed_channels(&config).contains(&owner.channel),
            min_interval_ms: owner.min_interval_s.saturating_mul(1_000) as i64,
            detail: restart_detail(
                stats.outbox_pending,
                awaiting,
                &timer_stats,
                &task_stats,
                container_report.as_ref(),
            ),
        };
        let outcome = persistence
            .send(notice.message(Some(stats.boot_epoch)))
            .await
            .unwrap_or(Err(StoreError::Closed))?;
        notice.follow_up(outcome, persistence.clone(), outbox.clone());
    }

    // A fresh start runs the config on disk: nothing waits for a restart.
    persistence
        .send(crate::persistence::PutAdapterState {
            adapter: lifecycle::PENDING_KEY.into(),
            state_json: lifecycle::pending_json(&[]),
        })
        .await
        .unwrap_or(Err(StoreError::Closed))?;

    // Ready: intake opens; then the supervised adapters (telegram) start
    // polling, in priority order (R15).
    gate.open();
    let adapters = crate::adapter::report::start_adapters(
        &config,
        &crate::adapter::IntakeDeps {
            http: http.clone(),
            registry: registry.clone(),
            persistence: persistence.clone(),
            gate: gate.clone(),
            metrics: metrics.clone(),
            cli: cli_clients.clone(),
            telegram_bot,
            leases: Some(leases.clone()),
        },
        outbox.clone(),
        &channel_health,
    );
    if let (Some(clients), false) = (&cli_clients, config.ephemeral) {
        // Ready means `keel chat` can connect: wait for the first bind.
        clients.first_bind(Duration::from_secs(5)).await;
    }
    health.set_phase(Phase::Ready);
    if let Some(detail) = migrated {
        let _ = persistence
            .send(crate::persistence::audit::AppendAudit {
                kind: "migrated",
                detail,
            })
            .await;
    }
    if let Some(loss) = accepted_loss {
        let _ = persistence
            .send(crate::persistence::audit::AppendAudit {
                kind: "data_loss_accepted",
                detail: serde_json::json!({
                    "missing": loss.missing(),
                    "recorded": loss.recorded,
                    "found": loss.found,
                }),
            })
            .await;
    }
    let _ = persistence
        .send(crate::persistence::audit::AppendAudit {
            kind: "started",
            detail: serde_json::json!({
                "boot_epoch": stats.boot_epoch,
                "encrypted": config.storage.encrypt && !config.ephemeral,
                "recovery_ms": recovery_started.elapsed().as_millis() as u64,
            }),
        })
        .await;
    {
        // Failed token attempts are summarised once a minute.
        let (tokens, persistence) = (tokens.clone(), persistence.clone());
        actix_rt::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(60));
            every.tick().await;
            loop {
                every.tick().await;
                lifecycle::flush_auth_failures(&tokens, &persistence).await;
            }
        });
    }
    if shared {
        // Other instances grant and revoke tokens in the shared store: read
        // the table again every second, so a token granted or revoked
        // anywhere is accepted or refused here within about a second.
        let (tokens, persistence) = (tokens.clone(), persistence.clone());
        actix_rt::spawn(async move {
            let mut every = tokio::time::interval(TOKEN_RESYNC);
            every.tick().await;
            loop {
                every.tick().await;
                match persistence.send(crate::persistence::vault::GetTokens).await {
                    Ok(Ok(rows)) => tokens.merge(rows),
                    Ok(Err(StoreError::Closed)) | Err(_) => break,
                    Ok(Err(e)) => tracing::warn!(error = %e, "token table not reread"),
                }
            }
        });
    }
    tracing::info!(
        boot_epoch = stats.boot_epoch,
        sessions = stats.sessions,
        unsent_replies = stats.outbox_pending,
        awaiting_agent = awaiting,
        "keel ready"
    );

    let (done_tx, done) = oneshot::channel();
    let lifecycle = Lifecycle {
        config,
        health,
        gate,
        metrics,
        persistence,
        registry,
        outbox,
        timers,
        tasks,
        containers: reaper.clone(),
        task_env: opts.task_env.clone(),
        cli: cli.clone(),
        webhook: webhook_adapter,
        adapters: Some(adapters),
        http: server,
        http_client: http,
        cli_clients,
        webhook_settings,
        admin_access,
        channel_health,
        clock: clock.clone(),
        chat_events,
        log_level: opts.log_level,
        shutting_down: false,
        done: Some(done_tx),
        tokens,
        leases: Some(leases),
    }
    .start();
    Ok(Running {
        lifecycle,
        done,
        http_addr,
        cli,
        boot_epoch: stats.boot_epoch,
    })
}
