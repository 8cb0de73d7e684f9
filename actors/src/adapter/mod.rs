//! The adapter protocol: everything a channel implements and everything it
//! may use, in one place.
//!
//! Inbound, a channel turns its traffic into [`Deliver`] messages and hands
//! them to [`deliver`], which sends them to the session registry and counts
//! the outcome with the one set of labels; the channel acknowledges upstream
//! only after the `Delivered` reply (R1), holding a `GateGuard` while a
//! message is in flight so shutdown can drain it.
//!
//! A channel's long-running part (poll loop, socket, listener) implements
//! [`Adapter`] and runs inside an [`AdapterActor`], started and restarted by
//! the supervisor (R15–R17); the webhook's intake is the [`webhook`]
//! adapter actor behind the HTTP route, and stdin the [`cli`] one. Every
//! adapter actor answers [`StopAdapter`] and [`GetAdapterInfo`].
//!
//! Outbound, a channel provides a [`ReplySink`] that the outbox calls with
//! an [`OutboundReply`] (the send interface is defined beside the outbox,
//! which sits below the channels, and re-exported here).
//!
//! [`CHANNELS`] is the one registry of channels, in start priority order:
//! name, delivery route, reply sink, supervised intake and owner chat. A new
//! channel is one file (its [`Channel`] entry included) plus one line here
//! and its config section in `config/`. Adapters never talk to each other.

pub mod actor;
pub mod cli;
pub mod report;
pub mod slack;
pub mod supervisor;
pub mod telegram;
pub mod webhook;
pub mod whatsapp;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use actix::Addr;
use futures::future::BoxFuture;
use tokio::sync::watch;

pub use crate::outbox::{OutboundReply, ReplySink};
pub use crate::session::{Deliver, Delivered};
pub use actor::{AdapterActor, AdapterExit, AdapterInfo, GetAdapterInfo, StopAdapter};
pub use supervisor::AdapterStatus;

use crate::config::Config;
use crate::error::{AdapterError, StoreError};
use crate::health::Gate;
use crate::metrics::Metrics;
use crate::persistence::PersistenceActor;
use crate::session::SessionRegistry;

/// A channel's long-running part (poll loop, socket, listener): run inside
/// an [`AdapterActor`], (re)started by the supervisor.
pub trait Adapter: Send + Sync + 'static {
    /// Channel name (`telegram`, …).
    fn name(&self) -> &'static str;
    /// Run until `stop` turns true (then `Ok`) or a failure (`Err`). Called
    /// again for every restart.
    fn run(&self, stop: watch::Receiver<bool>) -> BoxFuture<'static, Result<(), AdapterError>>;
}

/// A channel's own HTTP routes (`POST /v1/messages`, `GET|POST
/// /v1/whatsapp`, …), mounted on every HTTP worker by `http::serve`.
pub type ChannelRoutes = Arc<dyn Fn(&mut actix_web::web::ServiceConfig) + Send + Sync>;

/// What a channel's reply sink may be built from.
pub struct SinkDeps<'a> {
    pub http: &'a reqwest::Client,
    /// The connected `keel chat` clients, when the cli channel is on.
    pub cli: Option<&'a cli::CliClients>,
    /// Where a sink reports that its channel stopped for good.
    pub health: &'a ChannelHealth,
    /// The wall clock (WhatsApp's 24-hour window is checked at send time).
    pub clock: &'a Arc<dyn crate::clock::Clock>,
    /// Where a sink reports what it learnt about a chat.
    pub events: &'a ChatEvents,
}

/// Lets a channel without a supervised run (a webhook-driven one) stop for
/// good from its sink — e.g. WhatsApp's access token expired — with the
/// same effect as a supervised adapter giving up: its status row says
/// `stopped` with the reason, and the owner is told on a healthy channel
/// (R17, R42). Attached by `report::start_adapters` once the report exists.
#[derive(Clone, Default)]
pub struct ChannelHealth {
    inner: Arc<std::sync::Mutex<Option<HealthSink>>>,
}

/// Where [`ChannelHealth`] reports: the supervisor's report and statuses.
type HealthSink = (Arc<dyn supervisor::SupervisionReport>, supervisor::Statuses);

impl ChannelHealth {
    pub fn attach(
        &self,
        report: Arc<dyn supervisor::SupervisionReport>,
        statuses: supervisor::Statuses,
    ) {
        *self.inner.lock().unwrap_or_else(|p| p.into_inner()) = Some((report, statuses));
    }

    /// `channel` stopped for good because of `reason`; reported once per
    /// change to `stopped`.
    pub fn stopped(&self, channel: &str, reason: &str) {
        let guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Some((report, statuses)) = guard.as_ref() else {
            tracing::error!(channel, reason, "channel stopped");
            return;
        };
        let status = AdapterStatus {
            state: "stopped".into(),
            attempts: 0,
            last_error: Some(reason.to_string()),
            retry_in_ms: None,
        };
        let all = {
            let mut map = statuses.lock().unwrap_or_else(|p| p.into_inner());
            if map.get(channel).is_some_and(|s| s.state == "stopped") {
                return;
            }
            map.insert(channel.to_string(), status.clone());
            map.clone()
        };
        tracing::error!(channel, reason, "channel stopped; it needs the operator");
        report.status(channel, &status);
        report.gave_up(channel, reason, &all);
    }
}

/// Lets a reply sink report what it learnt about a chat while sending (a
/// Telegram 400 naming the supergroup a group became), applied like the
/// channel's own service update. Attached by `app::start` once the session
/// registry exists; reports before that are only logged.
#[derive(Clone, Default)]
pub struct ChatEvents {
    inner: Arc<std::sync::Mutex<Option<actix::Recipient<crate::session::ChatLearnt>>>>,
}

impl ChatEvents {
    pub fn attach(&self, to: actix::Recipient<crate::session::ChatLearnt>) {
        *self.inner.lock().unwrap_or_else(|p| p.into_inner()) = Some(to);
    }

    /// `chat` of `channel` says `event`.
    pub fn report(&self, channel: &str, chat: &str, event: crate::persistence::ChatEvent) {
        let guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match guard.as_ref() {
            Some(to) => to.do_send(crate::session::ChatLearnt {
                channel: channel.to_string(),
                chat: chat.to_string(),
                event,
            }),
            None => tracing::info!(channel, ?event, "chat event before start; not applied"),
        }
    }
}

/// What a channel's supervised intake may be built from.
#[derive(Clone)]
pub struct IntakeDeps {
    pub http: reqwest::Client,
    pub registry: Addr<SessionRegistry>,
    pub persistence: Addr<PersistenceActor>,
    pub gate: Gate,
    pub metrics: Metrics,
    /// The connected `keel chat` clients, when the cli channel is on.
    pub cli: Option<cli::CliClients>,
    /// Telegram webhook mode: where the supervised `getMe` leaves the bot's
    /// identity for the `POST /v1/telegram` route.
    pub telegram_bot: telegram::BotCell,
    /// The process's lease keeper: a poller polls only while it holds its
    /// bot's lease (R49). `None` (tests of one adapter): no lease.
    pub leases: Option<crate::lease::LeaseKeeper>,
}

/// One channel keel speaks. Plain function pointers, so the registry is a
/// constant and every entry lives in its channel's file.
pub struct Channel {
    pub name: &'static str,
    /// Replies to this channel have somewhere to go with this config.
    pub routed: fn(&Config) -> bool,
    /// The reply sink, when routed.
    pub sink: fn(&Config, &SinkDeps<'_>) -> Option<Arc<dyn ReplySink>>,
    /// The long-running intake the supervisor runs, if this config has one.
    pub intake: fn(&Config, &IntakeDeps) -> Option<Arc<dyn Adapter>>,
    /// Runs without the supervisor (shown as `running` while keel runs).
    pub unsupervised: fn(&Config) -> bool,
    /// An owner chat named in the channel's own section (R17/R18).
    pub owner_chat: fn(&Config) -> Option<String>,
}

/// Every channel, in start priority order (R15).
pub const CHANNELS: &[Channel] = &[
    cli::CHANNEL,
    telegram::CHANNEL,
    webhook::CHANNEL,
    slack::CHANNEL,
    whatsapp::CHANNEL,
];

/// Channels whose replies have a delivery route.
pub fn routed_channels(config: &Config) -> HashSet<String> {
    CHANNELS
        .iter()
        .filter(|c| (c.routed)(config))
        .map(|c| c.name.to_string())
        .collect()
}

/// Every routed channel's reply sink.
pub fn reply_sinks(config: &Config, deps: &SinkDeps<'_>) -> HashMap<String, Arc<dyn ReplySink>> {
    CHANNELS
        .iter()
        .filter(|c| (c.routed)(config))
        .filter_map(|c| (c.sink)(config, deps).map(|s| (c.name.to_string(), s)))
        .collect()
}

/// The supervised intakes of `config`, in priority order.
pub fn intakes(config: &Config, deps: &IntakeDeps) -> Vec<Arc<dyn Adapter>> {
    CHANNELS
        .iter()
        .filter_map(|c| (c.intake)(config, deps))
        .collect()
}

/// Channels running outside the supervisor with this config.
pub fn unsupervised(config: &Config) -> Vec<&'static str> {
    CHANNELS
        .iter()
        .filter(|c| (c.unsupervised)(config))
        .map(|c| c.name)
        .collect()
}

/// Where the owner can be told things: `[owner]` first, then owner chats
/// named in channel sections.
pub fn owner_targets(config: &Config) -> Vec<(String, String)> {
    let mut owners = Vec::new();
    if let Some(o) = &config.owner {
        owners.push((o.channel.clone(), o.chat.clone()));
    }
    for c in CHANNELS {
        if let Some(chat) = (c.owner_chat)(config) {
            owners.push((c.name.to_string(), chat));
        }
    }
    owners
}

/// Start priority of a channel name (unknown names last).
pub fn priority(name: &str) -> usize {
    CHANNELS
        .iter()
        .position(|c| c.name == name)
        .unwrap_or(usize::MAX)
}

pub use crate::text::split_message;

/// Parts of split replies already accepted by a channel, by outbox id: a
/// resend after a partial failure starts at the first part not accepted
/// yet. In memory only, so after a restart every part goes again (replies
/// are at-least-once).
#[derive(Clone, Default)]
pub struct PartProgress(std::sync::Arc<std::sync::Mutex<std::collections::HashMap<i64, usize>>>);

impl PartProgress {
    /// The first part of reply `id` still to send.
    pub fn resume_at(&self, id: i64) -> usize {
        self.0
            .lock()
            .map(|p| p.get(&id).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Part `n` of `total` was accepted.
    pub fn accepted(&self, id: i64, n: usize, total: usize) {
        if total > 1 {
            if let Ok(mut p) = self.0.lock() {
                if p.len() > 10_000 {
                    p.clear();
                }
                p.insert(id, n + 1);
            }
        }
    }

    /// Every part of reply `id` was accepted.
    pub fn finished(&self, id: i64) {
        if let Ok(mut p) = self.0.lock() {
            p.remove(&id);
        }
    }
}

/// The outcome label of one delivery, the same for every channel:
/// `accepted`, `duplicate`, `conflict`, `rejected` (the store refused the
/// message itself) or `unavailable` (storage or shutdown: retry later).
pub fn outcome_label(result: &Result<Delivered, StoreError>) -> &'static str {
    match result {
        Ok(d) => d.label(),
        Err(StoreError::Invalid(_)) => "rejected",
        Err(_) => "unavailable",
    }
}

/// Count one inbound message of `channel` under `outcome` (for rejections
/// a channel makes before delivering, e.g. a bad signature).
pub fn count_inbound(metrics: &Metrics, channel: &str, outcome: &str) {
    metrics.inbound.with_label_values(&[channel, outcome]).inc();
}

/// Deliver one inbound message to its session and count the outcome: the
/// one path every channel uses (R1: acknowledge only after `Ok`).
pub async fn deliver(
    registry: &Addr<SessionRegistry>,
    metrics: &Metrics,
    msg: Deliver,
) -> Result<Delivered, StoreError> {
    let channel = msg.channel.clone();
    let result = registry.send(msg).await.unwrap_or(Err(StoreError::Closed));
    count_inbound(metrics, &channel, outcome_label(&result));
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_matches_the_config_schema_and_is_in_priority_order() {
        let names: Vec<&str> = CHANNELS.iter().map(|c| c.name).collect();
        assert_eq!(names, ["cli", "telegram", "webhook", "slack", "whatsapp"]);
        let mut known: Vec<&str> = crate::config::CHANNEL_NAMES.to_vec();
        let mut ours = names.clone();
        known.sort_unstable();
        ours.sort_unstable();
        assert_eq!(ours, known, "config::CHANNEL_NAMES and CHANNELS differ");
        assert!(priority("cli") < priority("telegram"));
        assert_eq!(priority("pigeon"), usize::MAX);
    }

    #[test]
    fn routes_sinks_and_owners_follow_the_config() {
        let config = Config::from_toml(
            "[webhook]\nreply_url = \"http://127.0.0.1:9/r\"\n[telegram]\nowner_chat = \"42\"\n\
             [owner]\nchannel = \"webhook\"\nchat = \"ops\"",
            "t",
        )
        .unwrap();
        let routed = routed_channels(&config);
        assert_eq!(
            routed,
            ["cli", "webhook"].map(String::from).into_iter().collect()
        );
        let http = reqwest::Client::new();
        let clients = cli::CliClients::default();
        let sinks = reply_sinks(
            &config,
            &SinkDeps {
                http: &http,
                cli: Some(&clients),
                health: &ChannelHealth::default(),
                clock: &(Arc::new(crate::clock::ManualClock::new(0))
                    as Arc<dyn crate::clock::Clock>),
                events: &ChatEvents::default(),
            },
        );
        let mut names: Vec<&String> = sinks.keys().collect();
        names.sort();
        assert_eq!(names, ["cli", "webhook"]);
        assert_eq!(
            owner_targets(&config),
            vec![
                ("webhook".to_string(), "ops".to_string()),
                ("telegram".to_string(), "42".to_string())
            ]
        );
        assert_eq!(unsupervised(&config), vec!["webhook"]);
    }

    #[test]
    fn outcome_labels_are_one_set() {
        let d = |x| -> Result<Delivered, StoreError> { x };
        assert_eq!(
            outcome_label(&d(Ok(Delivered::Accepted {
                session: "s".into(),
                seq: 1
            }))),
            "accepted"
        );
        assert_eq!(
            outcome_label(&d(Err(StoreError::Invalid("x".into())))),
            "rejected"
        );
        assert_eq!(outcome_label(&d(Err(StoreError::Closed))), "unavailable");
    }
}
