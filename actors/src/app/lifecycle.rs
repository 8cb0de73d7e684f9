//! Shutdown and reload, as messages to the `Lifecycle` controller.
//!
//! `Shutdown` cascades (R33): `/readyz` → 503, the intake gate closes and
//! in-flight messages drain (returning as soon as drained, bounded by the
//! deadline), the CLI adapter stops, timers stop, running tasks are stopped
//! and recorded (INTERRUPTED), ephemeral containers are removed (services
//! keep running unless `stop_services_on_shutdown`), in-flight reply sends are recorded, the
//! store finishes its queue, checkpoints the WAL (TRUNCATE) and closes, the
//! HTTP listener stops. Only then is `done` resolved; the binary exits 0.
//!
//! `Reload` applies a config that already passed the startup validation
//! (R34). `reload::plan` classifies every changed key: live ones (log level,
//! webhook secret and limits, admin access, reply routes, agent, outbox,
//! retry policy, timer retention, `[tasks]` and the task table) are pushed to the actors here; the others
//! keep their running value and are reported as "restart needed" (also in
//! `keel status`).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use actix::prelude::*;
use actix_web::dev::ServerHandle;
use tokio::sync::oneshot;

use crate::adapter::cli::{CliAdapter, CliClients};
use crate::adapter::supervisor::SetSupervision;
use crate::adapter::webhook::WebhookAdapter;
use crate::adapter::webhook::WebhookSettings;
use crate::adapter::StopAdapter;
use crate::app::{
    settings_admin, settings_retention, settings_sessions, settings_sinks, settings_webhook,
};
use crate::config::Config;
use crate::health::{Gate, Health, Phase};
use crate::http::AdminAccess;
use crate::metrics::Metrics;
use crate::outbox::{DrainOutbox, OutboxActor, SetOutboxPolicy, SetSinks};
use crate::persistence::audit::AppendAudit;
use crate::persistence::{CloseStore, PersistenceActor, PutAdapterState};
use crate::session::{Reconfigure, SessionRegistry};
use crate::tasks::{SetTaskSettings, StopTasks, TaskActor};
use crate::timer::{StopTimers, TimerActor};

/// Changes the log filter; returns a one-line error for a bad directive.
pub type LogLevelHook = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// How shutdown went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitReport {
    /// Messages still in flight when the drain deadline passed (0 = clean).
    pub abandoned: usize,
    /// Whether the store checkpointed and closed cleanly.
    pub store_closed: bool,
}

/// Start the shutdown cascade. Sent by the binary on SIGTERM/SIGINT (and at
/// stdin EOF). A second `Shutdown` while one runs is ignored; the binary
/// exits at once on a second signal instead.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct Shutdown {
    pub reason: String,
}

/// Apply a new, already validated config. Sent by the binary on SIGHUP.
/// Returns every changed key, applied or waiting for a restart.
#[derive(Debug, Clone, Message)]
#[rtype(result = "super::reload::ReloadReport")]
pub struct Reload(pub Config);

pub struct Lifecycle {
    pub(crate) config: Config,
    pub(crate) health: Health,
    pub(crate) gate: Gate,
    pub(crate) metrics: Metrics,
    pub(crate) persistence: Addr<PersistenceActor>,
    pub(crate) registry: Addr<SessionRegistry>,
    pub(crate) outbox: Addr<OutboxActor>,
    pub(crate) timers: Addr<TimerActor>,
    pub(crate) tasks: Addr<TaskActor>,
    /// The container reaper, when `[containers] enabled`.
    pub(crate) containers: Option<Addr<crate::containers::ContainerReaper>>,
    /// PATH/LANG for task children (kept for the settings rebuilt on reload).
    pub(crate) task_env: Vec<(String, String)>,
    pub(crate) cli: Option<Addr<CliAdapter>>,
    /// The webhook intake's adapter actor (behind the HTTP route).
    pub(crate) webhook: Option<Addr<WebhookAdapter>>,
    /// Supervised adapters (telegram); stopped first on shutdown.
    pub(crate) adapters: Option<Addr<crate::adapter::supervisor::AdapterSupervisor>>,
    pub(crate) http: ServerHandle,
    pub(crate) http_client: reqwest::Client,
    pub(crate) cli_clients: Option<CliClients>,
    pub(crate) webhook_settings: Arc<RwLock<WebhookSettings>>,
    pub(crate) admin_access: Arc<RwLock<AdminAccess>>,
    pub(crate) channel_health: crate::adapter::ChannelHealth,
    /// The process's wall clock, for sinks rebuilt on reload.
    pub(crate) clock: std::sync::Arc<dyn crate::clock::Clock>,
    /// Where rebuilt sinks report chats that moved.
    pub(crate) chat_events: crate::adapter::ChatEvents,
    pub(crate) log_level: Option<LogLevelHook>,
    pub(crate) shutting_down: bool,
    pub(crate) done: Option<oneshot::Sender<ExitReport>>,
    /// Capability tokens (failed attempts are summarised in the audit log).
    pub(crate) tokens: crate::vault::TokenTable,
    /// This instance's heartbeat and leases (released, instance marked
    /// gone, before the store closes).
    pub(crate) leases: Option<crate::lease::LeaseKeeper>,
}

/// Append the `auth_failed` summary (count since the last one), if any
/// attempt failed. Called every minute and in the shutdown cascade.
pub async fn flush_auth_failures(
    tokens: &crate::vault::TokenTable,
    persistence: &Addr<PersistenceActor>,
) {
    let n = tokens.take_failures();
    if n == 0 {
        return;
    }
    let sent = persistence
        .send(AppendAudit {
            kind: "auth_failed",
            detail: serde_json::json!({ "count": n }),
        })
        .await;
    if !matches!(sent, Ok(Ok(_))) {
        tracing::warn!(count = n, "auth_failed audit record not written");
    }
}

impl Actor for Lifecycle {
    type Context = Context<Self>;
}

impl Handler<Shutdown> for Lifecycle {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, msg: Shutdown, _: &mut Context<Self>) -> Self::Result {
        if self.shutting_down {
            return Box::pin(fut::ready(()));
        }
        self.shutting_down = true;
        tracing::info!(reason = %msg.reason, "shutting down");
        self.health.set_phase(Phase::ShuttingDown);
        let deadline = tokio::time::Instant::now() + self.config.shutdown_timeout();
        let gate = self.gate.clone();
        let cli = self.cli.clone();
        let webhook = self.webhook.clone();
        let outbox = self.outbox.clone();
        let timers = self.timers.clone();
        let tasks = self.tasks.clone();
        let containers = self.containers.clone();
        let persistence = self.persistence.clone();
        let http = self.http.clone();
        let adapters = self.adapters.clone();
        let tokens = self.tokens.clone();
        let leases = self.leases.clone();
        let reason = msg.reason.clone();
        let cascade = async move {
            // 0. Pollers stop first: a long poll in flight is abandoned and
            //    its offset not advanced, so Telegram sends it again later.
            if let Some(adapters) = adapters {
                let budget = deadline.saturating_duration_since(tokio::time::Instant::now());
                let _ = adapters
                    .send(crate::adapter::supervisor::StopAdapters { deadline: budget })
                    .await;
            }
            // 1. Stop intake and drain what is in flight.
            let left = gate
                .close_and_drain(deadline.saturating_duration_since(tokio::time::Instant::now()))
                .await;
            if left > 0 {
                tracing::warn!(in_flight = left, "drain deadline passed; those messages were not acknowledged and will be redelivered");
            }
            // 2. The other adapter actors stop (the gate already refuses
            //    new messages; nothing is in flight any more).
            if let Some(cli) = cli {
                cli.do_send(StopAdapter);
            }
            if let Some(webhook) = webhook {
                webhook.do_send(StopAdapter);
            }
            // 3. Timers stop firing (fires already queued commit or roll back
            //    as a unit before CloseStore, which queues behind them).
            let _ = timers.send(StopTimers).await;
            // 3b. Tasks: start nothing more; running ones get SIGTERM, then
            //     SIGKILL, within the deadline; their final states and last
            //     output are recorded before the store closes.
            let budget = deadline
                .saturating_duration_since(tokio::time::Instant::now())
                .max(Duration::from_millis(200));
            if let Ok(left) = tasks.send(StopTasks { deadline: budget }).await {
                if left > 0 {
                    tracing::warn!(running = left, "tasks not stopped by the deadline");
                }
            }
            // 3c. Containers: ephemeral ones are stopped and removed;
            //     services keep running unless stop_services_on_shutdown.
            if let Some(containers) = containers {
                let budget = deadline
                    .saturating_duration_since(tokio::time::Instant::now())
                    .max(Duration::from_millis(500));
                let _ = containers
                    .send(crate::containers::StopContainers { deadline: budget })
                    .await;
            }
            // 4. Reply sends under way get recorded (bounded by the deadline).
            let remaining = deadline
                .saturating_duration_since(tokio::time::Instant::now())
                .max(Duration::from_millis(100));
            let _ = tokio::time::timeout(remaining, outbox.send(DrainOutbox)).await;
            // 5. The audit log's last records, then flush, checkpoint, close
            //    (keel.db; secrets.db is closed with a TRUNCATE checkpoint
            //    after every write, so nothing of it is open here).
            flush_auth_failures(&tokens, &persistence).await;
            if let Some(leases) = leases {
                leases.leave().await;
            }
            let _ = persistence
                .send(AppendAudit {
                    kind: "stopped",
                    detail: serde_json::json!({ "reason": reason }),
                })
                .await;
            let store_closed = match persistence.send(CloseStore).await {
                Ok(Ok((busy, log, done))) => {
                    tracing::info!(busy, wal_frames = log, checkpointed = done, "store closed");
                    busy == 0
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "store did not close cleanly");
                    false
                }
                Err(e) => {
                    tracing::error!(error = %e, "persistence actor gone before close");
                    false
                }
            };
            // 6. The listener goes last so /readyz says shutting_down throughout.
            http.stop(false).await;
            ExitReport {
                abandoned: left,
                store_closed,
            }
        };
        Box::pin(cascade.into_actor(self).map(|report, this, _| {
            if let Some(done) = this.done.take() {
                let _ = done.send(report);
            }
        }))
    }
}

impl Handler<Reload> for Lifecycle {
    type Result = MessageResult<Reload>;

    fn handle(&mut self, msg: Reload, _: &mut Context<Self>) -> Self::Result {
        let (report, new) = super::reload::plan(&self.config, &msg.0);
        if self.config.log_level != new.log_level {
            if let Some(hook) = &self.log_level {
                if let Err(e) = hook(&new.log_level) {
                    tracing::warn!(error = %e, "log level not changed");
                }
            }
        }
        // Every live setting is pushed, changed or not: each is cheap, and
        // one path means none can be forgotten.
        *self
            .webhook_settings
            .write()
            .unwrap_or_else(|p| p.into_inner()) = settings_webhook(&new);
        *self.admin_access.write().unwrap_or_else(|p| p.into_inner()) = settings_admin(&new);
        self.registry.do_send(Reconfigure(settings_sessions(&new)));
        let sinks: HashMap<_, _> = settings_sinks(
            &new,
            &self.http_client,
            self.cli_clients.as_ref(),
            &self.channel_health,
            &self.clock,
            &self.chat_events,
        );
        self.outbox.do_send(SetSinks(sinks));
        self.outbox.do_send(SetOutboxPolicy {
            config: new.outbox.clone(),
            retry: new.adapters.clone(),
        });
        self.timers
            .do_send(crate::timer::SetTimerRoutes(crate::app::routed_channels(
                &new,
            )));
        self.timers
            .do_send(crate::timer::SetTimerRetention(settings_retention(&new)));
        self.tasks
            .do_send(SetTaskSettings(crate::app::settings_tasks(
                &new,
                &self.task_env,
            )));
        if let Some(adapters) = &self.adapters {
            adapters.do_send(SetSupervision(new.adapters.clone()));
        }
        if let Some(containers) = &self.containers {
            containers.do_send(crate::containers::SetReaperSettings {
                reconcile_interval: Duration::from_secs(new.containers.reconcile_interval_s),
                stop_services_on_shutdown: new.containers.stop_services_on_shutdown,
            });
        }
        // `keel status` shows what waits for a restart.
        self.persistence.do_send(PutAdapterState {
            adapter: PENDING_KEY.into(),
            state_json: pending_json(&report.restart_needed),
        });
        // Key names only: some keys hold secrets.
        self.persistence.do_send(AppendAudit {
            kind: "reloaded",
            detail: serde_json::json!({
                "applied": report.applied,
                "restart_needed": report.restart_needed,
            }),
        });
        self.metrics
            .config_reloads
            .with_label_values(&["applied"])
            .inc();
        self.config = new;
        MessageResult(report)
    }
}

/// The `adapter_state` row listing config keys that wait for a restart.
pub const PENDING_KEY: &str = "config:restart_needed";

/// `{"keys": [...]}` for [`PENDING_KEY`].
pub fn pending_json(keys: &[&str]) -> String {
    serde_json::json!({ "keys": keys }).to_string()
}
