//! The OutboxActor sends stored replies (R3). Replies are written to the
//! `outbox` table in the same transaction as their turn; this actor pages
//! pending rows in (bounded memory), hands each to its channel's `ReplySink`,
//! and marks it sent only after the channel accepted it. Failures back off
//! per channel (an endpoint that is down is down for every chat); replies to
//! one session go out one at a time, in order. Delivery is at-least-once: a
//! crash between "accepted" and "marked sent" resends, and the reply's `id`
//! lets the receiver drop the repeat.
//!
//! Retry policy (R16 "outbound sends retry with the same policy"): the
//! pure [`backoff_delay`] (the supervisor's schedule) over the same `[adapters]`
//! config (5, 10, 20, 40, 60 s cap by default, seeded jitter that only
//! shortens). A `RetryAfter` from the channel is waited exactly and not
//! counted. What "gave up" means for a reply: a *transient* failure never
//! drops it. After `attempts` consecutive failures the channel is reported
//! as failing (an error log line and `keel_outbox_channel_failing{channel}`
//! = 1) and its replies keep being retried at the cap, each attempt counted
//! in the row's `attempts`, until the channel accepts again. Only a
//! *permanent* rejection (a 4xx the channel will repeat forever) marks a row
//! `failed`, with an error log line and `keel_outbox_failed_total`.
//!
//! A send whose outcome is unknown (the request left, no answer within
//! `send_timeout_ms`) is recorded with state `unknown` and counted
//! (`keel_outbox_unknown_total`); it is resent under the same policy (the
//! outbox id lets receivers drop the repeat) and becomes `sent` once a resend
//! is accepted. `unknown` rows are picked up again after a restart.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures::future::BoxFuture;
use prometheus::{IntCounter, IntGaugeVec, Opts};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::oneshot;

use crate::backoff::backoff_delay;
use crate::config::SupervisionConfig;

use crate::config::OutboxConfig;
use crate::error::{SendError, StoreError};
use crate::metrics::Metrics;
use crate::persistence::{GetPendingOutbox, OutboxRow, PersistenceActor, RecordSend, SendOutcome};

/// A reply on its way out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundReply {
    /// Outbox row id: stable across resends, so receivers can dedupe.
    pub id: i64,
    pub chat: String,
    pub in_reply_to: Option<String>,
    pub text: String,
    /// Where it goes inside the chat (thread, topic, message to quote), as
    /// the channel gave it with the message answered; `None` for notices.
    pub reply_meta: Option<serde_json::Value>,
    /// When the chat last wrote to keel (unix ms; WhatsApp rows only).
    pub last_inbound_ms: Option<i64>,
}

/// How an adapter sends replies out. Implemented by each channel.
pub trait ReplySink: Send + Sync + 'static {
    fn send(&self, reply: OutboundReply) -> BoxFuture<'static, Result<(), SendError>>;

    /// Like `send`, and also the channel's own id of the sent message when
    /// the channel reports delivery later (WhatsApp's wamid). The outbox
    /// calls this one.
    fn send_with_ref(
        &self,
        reply: OutboundReply,
    ) -> BoxFuture<'static, Result<Option<String>, SendError>> {
        let sent = self.send(reply);
        Box::pin(async move { sent.await.map(|()| None) })
    }
}

/// New replies were committed. Sent (fire and forget) by session actors.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct OutboxKick;

/// Replace the channel sinks (startup, reload). Sent by the app.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetSinks(pub HashMap<String, Arc<dyn ReplySink>>);

/// Replace the send limits and the resend policy (reload). The jitter RNG
/// keeps its seed. Sent by the lifecycle controller.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct SetOutboxPolicy {
    pub config: OutboxConfig,
    pub retry: SupervisionConfig,
}

/// A channel can deliver again (a `keel chat` client connected): replies
/// parked with `SendError::Waiting` on it are tried at once. Sent by the
/// channel's adapter.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct ChannelReady(pub String);

/// Stop starting sends and resolve once the in-flight ones are recorded.
/// Sent by the lifecycle controller during shutdown.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct DrainOutbox;

/// Page size when reading pending rows.
const PAGE: i64 = 256;
/// How soon to read the outbox again after the store failed to answer.
const STORE_RETRY: Duration = Duration::from_millis(500);

#[derive(Default)]
struct ChannelState {
    /// Consecutive failed sends (RetryAfter not counted); reset on success.
    failures: u32,
    paused_until: Option<tokio::time::Instant>,
    /// `ChannelReady` messages seen: a send that started before the latest
    /// one and comes back `Waiting` is tried again at once, not parked (the
    /// recipient arrived while it was in flight).
    readies: u64,
}

/// Outbox metrics beyond the shared counters in [`Metrics`]: registered here
/// so the outbox owns its policy's observability.
#[derive(Clone)]
struct OutboxMetrics {
    /// 1 while a channel has failed more than `attempts` times in a row.
    failing: IntGaugeVec,
    /// Replies marked `failed` after a permanent rejection.
    failed: IntCounter,
}

impl OutboxMetrics {
    fn register(metrics: &Metrics) -> OutboxMetrics {
        let failing = IntGaugeVec::new(
            Opts::new(
                "keel_outbox_channel_failing",
                "1 while a channel's replies failed more than `attempts` times in a row (still retried at the cap)",
            ),
            &["channel"],
        )
        .expect("static metric definition");
        let failed = IntCounter::new(
            "keel_outbox_failed_total",
            "Replies marked failed after a permanent rejection by the channel",
        )
        .expect("static metric definition");
        metrics.register(Box::new(failing.clone()));
        metrics.register(Box::new(failed.clone()));
        OutboxMetrics { failing, failed }
    }
}

pub struct OutboxActor {
    persistence: Addr<PersistenceActor>,
    sinks: HashMap<String, Arc<dyn ReplySink>>,
    config: OutboxConfig,
    /// The supervisor's restart policy, used for resends too.
    retry: SupervisionConfig,
    rng: StdRng,
    metrics: Metrics,
    own_metrics: OutboxMetrics,
    queue: VecDeque<OutboxRow>,
    /// Row ids being sent, and the sessions they belong to.
    in_flight: HashSet<i64>,
    busy_sessions: HashSet<String>,
    /// Highest row id read so far; pages continue after it.
    high_water: i64,
    refilling: bool,
    dirty: bool,
    channels: HashMap<String, ChannelState>,
    /// Rows whose channel has no sink right now (reported once each).
    unrouted: HashSet<i64>,
    /// Rows whose channel had nobody to deliver to (`SendError::Waiting`),
    /// parked until `ChannelReady` or the backoff cap.
    waiting: HashMap<i64, OutboxRow>,
    /// One safety-net retry of every parked row is scheduled (never one
    /// per row: parked rows would multiply the timers each round).
    waiting_wake: bool,
    /// `unknown` rows were read since the start or the last new routes.
    unknown_loaded: bool,
    draining: bool,
    drained: Vec<oneshot::Sender<()>>,
    wake_scheduled: bool,
    /// On a shared store (issue 13): the token of the cluster's `outbox`
    /// lease. Only its holder sends; see [`ShareOutbox`].
    lease: Option<tokio::sync::watch::Receiver<Option<i64>>>,
    /// Rows whose send finished since the last rescan was asked for: a
    /// rescan's snapshot may predate their `sent`, so they are skipped.
    done_since_rescan: HashSet<i64>,
    rescanning: bool,
    rescan_every: Option<Duration>,
}

impl OutboxActor {
    pub fn new(
        persistence: Addr<PersistenceActor>,
        sinks: HashMap<String, Arc<dyn ReplySink>>,
        config: OutboxConfig,
        metrics: Metrics,
    ) -> OutboxActor {
        OutboxActor {
            persistence,
            sinks,
            config,
            retry: SupervisionConfig::default(),
            rng: StdRng::from_entropy(),
            own_metrics: OutboxMetrics::register(&metrics),
            metrics,
            queue: VecDeque::new(),
            in_flight: HashSet::new(),
            busy_sessions: HashSet::new(),
            high_water: 0,
            refilling: false,
            dirty: false,
            channels: HashMap::new(),
            unrouted: HashSet::new(),
            waiting: HashMap::new(),
            waiting_wake: false,
            unknown_loaded: false,
            draining: false,
            drained: Vec::new(),
            wake_scheduled: false,
            lease: None,
            done_since_rescan: HashSet::new(),
            rescanning: false,
            rescan_every: None,
        }
    }

    /// Use `retry` (the `[adapters]` policy) for resends. Called by the app
    /// with the same config the adapter supervisor gets.
    /// On a shared store: send only while `lease` (the cluster's `outbox`
    /// lease) is held, and rescan every pending row every `every` — the
    /// other instances commit replies this one is not told about, with ids
    /// that may commit out of order, so no cursor can be trusted. When the
    /// lease is lost, what is queued here is dropped (it stays pending in
    /// the store for the next holder); a send in flight finishes
    /// (at-least-once: the reply's id lets the receiver drop a repeat).
    pub fn shared(
        mut self,
        lease: tokio::sync::watch::Receiver<Option<i64>>,
        every: Duration,
    ) -> OutboxActor {
        self.lease = Some(lease);
        self.rescan_every = Some(every);
        self
    }

    pub fn with_retry(mut self, retry: SupervisionConfig) -> OutboxActor {
        self.rng = match retry.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_entropy(),
        };
        self.retry = retry;
        self
    }

    /// Whether this instance may send: always on one node; on a shared
    /// store only while it holds the `outbox` lease.
    fn holds_lease(&self) -> bool {
        self.lease.as_ref().is_none_or(|l| l.borrow().is_some())
    }

    fn refill(&mut self, ctx: &mut Context<Self>) {
        if self.refilling || self.draining {
            self.dirty = true;
            return;
        }
        if !self.holds_lease() {
            return;
        }
        if self.queue.len() as i64 >= PAGE {
            // Enough work in memory; read more once it drains.
            self.dirty = true;
            return;
        }
        self.refilling = true;
        self.dirty = false;
        let rescan = std::mem::take(&mut self.rescanning);
        if rescan {
            self.high_water = 0;
            self.done_since_rescan.clear();
        }
        let with_unknown = !self.unknown_loaded || rescan;
        let req = self.persistence.send(GetPendingOutbox {
            after: self.high_water,
            limit: PAGE,
            with_unknown,
        });
        ctx.spawn(req.into_actor(self).map(move |res, this, ctx| {
            this.refilling = false;
            match res.unwrap_or(Err(StoreError::Closed)) {
                Ok(rows) => {
                    this.unknown_loaded |= with_unknown;
                    let full = rows.iter().filter(|r| !r.unknown).count() as i64 == PAGE;
                    // Any read may see a row still queued here: unknown
                    // rows and re-reads after SetSinks always could, and
                    // after a rescan of more than a page `high_water`
                    // stands below rows queued before it (each was then
                    // sent twice).
                    let mut queued: HashSet<i64> = this.queue.iter().map(|q| q.id).collect();
                    for row in rows {
                        if !row.unknown {
                            this.high_water = this.high_water.max(row.id);
                        }
                        let known = this.in_flight.contains(&row.id)
                            || this.waiting.contains_key(&row.id)
                            || this.done_since_rescan.contains(&row.id)
                            || !queued.insert(row.id);
                        if !known {
                            this.queue.push_back(row);
                        }
                    }
                    if full {
                        this.dirty = true;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the outbox; retrying");
                    this.dirty = true;
                    this.schedule_wake(ctx, STORE_RETRY);
                }
            }
            this.pump(ctx);
            if this.dirty && (this.queue.len() as i64) < PAGE {
                this.refill(ctx);
            }
        }));
    }

    /// Put parked rows (of `channel`, or all) back at the front of the queue.
    fn requeue_waiting(&mut self, channel: Option<&str>, ctx: &mut Context<Self>) {
        let ids: Vec<i64> = self
            .waiting
            .iter()
            .filter(|(_, r)| channel.is_none_or(|c| r.channel == c))
            .map(|(id, _)| *id)
            .collect();
        let mut rows: Vec<OutboxRow> = ids
            .into_iter()
            .filter_map(|id| self.waiting.remove(&id))
            .collect();
        rows.sort_by_key(|r| std::cmp::Reverse(r.id));
        for row in rows {
            self.queue.push_front(row);
        }
        self.pump(ctx);
    }

    fn schedule_wake(&mut self, ctx: &mut Context<Self>, after: Duration) {
        if self.wake_scheduled {
            return;
        }
        self.wake_scheduled = true;
        ctx.run_later(after, |this, ctx| {
            this.wake_scheduled = false;
            this.pump(ctx);
            if this.dirty {
                this.refill(ctx);
            }
        });
    }

    /// Start as many sends as allowed: one per session, none on a paused
    /// channel, at most `concurrency` overall.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        if self.draining || !self.holds_lease() {
            return;
        }
        let now = tokio::time::Instant::now();
        let mut next_wake: Option<tokio::time::Instant> = None;
        let mut i = 0;
        while i < self.queue.len() && self.in_flight.len() < self.config.concurrency {
            let row = &self.queue[i];
            if self.busy_sessions.contains(&row.session_id) {
                i += 1;
                continue;
            }
            if let Some(until) = self.channels.get(&row.channel).and_then(|c| c.paused_until) {
                if until > now {
                    next_wake = Some(next_wake.map_or(until, |w| w.min(until)));
                    i += 1;
                    continue;
                }
            }
            let Some(sink) = self.sinks.get(&row.channel).cloned() else {
                let row = self.queue.remove(i).expect("index in range");
                if self.unrouted.insert(row.id) {
                    tracing::warn!(id = row.id, channel = %row.channel,
                        "no delivery route for this channel; reply stays pending until one is configured");
                }
                continue;
            };
            let row = self.queue.remove(i).expect("index in range");
            self.start_send(row, sink, ctx);
        }
        if let Some(when) = next_wake {
            self.schedule_wake(ctx, when.saturating_duration_since(now));
        }
        if self.dirty && (self.queue.len() as i64) < PAGE / 2 {
            self.refill(ctx);
        }
    }

    fn start_send(&mut self, row: OutboxRow, sink: Arc<dyn ReplySink>, ctx: &mut Context<Self>) {
        self.in_flight.insert(row.id);
        let readies_at_start = self.channels.get(&row.channel).map_or(0, |c| c.readies);
        self.busy_sessions.insert(row.session_id.clone());
        let reply = OutboundReply {
            id: row.id,
            chat: row.chat.clone(),
            in_reply_to: row.in_reply_to.clone(),
            text: row.text.clone(),
            reply_meta: row.reply_meta.clone(),
            last_inbound_ms: row.last_inbound_ms,
        };
        let timeout = Duration::from_millis(self.config.send_timeout_ms);
        let persistence = self.persistence.clone();
        let work = async move {
            let result = match tokio::time::timeout(timeout, sink.send_with_ref(reply)).await {
                Ok(r) => r,
                Err(_) => Err(SendError::Unknown(format!("no answer within {timeout:?}"))),
            };
            let (outcome, channel_ref) = match result {
                Ok(ref r) => (SendOutcome::Sent, r.clone()),
                Err(SendError::Permanent(ref e)) => (SendOutcome::GaveUp(e.clone()), None),
                Err(ref e @ SendError::Unknown(_)) => (SendOutcome::Unknown(e.to_string()), None),
                Err(ref e) => (SendOutcome::Failed(e.to_string()), None),
            };
            let result = result.map(|_| ());
            if result.is_ok() {
                crate::failpoint::hit("reply_before_poll");
            }
            let recorded = persistence
                .send(RecordSend {
                    id: row.id,
                    outcome,
                    channel_ref,
                })
                .await
                .unwrap_or(Err(StoreError::Closed));
            (row, result, recorded)
        };
        ctx.spawn(work.into_actor(self).map(move |(row, result, recorded), this, ctx| {
            this.in_flight.remove(&row.id);
            if this.lease.is_some() {
                this.done_since_rescan.insert(row.id);
            }
            this.busy_sessions.remove(&row.session_id);
            let channel = this.channels.entry(row.channel.clone()).or_default();
            match result {
                Ok(()) => {
                    this.metrics.outbox_sent.inc();
                    if channel.failures > this.retry.attempts {
                        tracing::info!(channel = %row.channel, "channel accepts replies again");
                    }
                    channel.failures = 0;
                    channel.paused_until = None;
                    this.own_metrics
                        .failing
                        .with_label_values(&[row.channel.as_str()])
                        .set(0);
                    if let Err(e) = recorded {
                        // Sent but not recorded: it will be sent again after a
                        // restart (at-least-once); the id lets receivers dedupe.
                        tracing::warn!(id = row.id, error = %e, "reply sent but not marked sent");
                    }
                }
                Err(SendError::Permanent(e)) => {
                    this.own_metrics.failed.inc();
                    tracing::error!(id = row.id, channel = %row.channel, error = %e, "reply rejected by the channel; marked failed");
                }
                Err(SendError::Waiting(why)) if channel.readies != readies_at_start => {
                    tracing::debug!(id = row.id, channel = %row.channel, %why,
                        "reply found nobody, but a recipient arrived meanwhile; trying again");
                    this.queue.push_front(row);
                }
                Err(SendError::Waiting(why)) => {
                    // Not the channel's failure: park the row (other chats
                    // of the channel go on) until the channel is ready.
                    tracing::debug!(id = row.id, channel = %row.channel, %why, "reply waits for its recipient");
                    this.waiting.insert(row.id, row);
                    if !this.waiting_wake {
                        this.waiting_wake = true;
                        let cap = Duration::from_millis(this.retry.backoff_max_ms);
                        ctx.run_later(cap, |this, ctx| {
                            this.waiting_wake = false;
                            this.requeue_waiting(None, ctx);
                        });
                    }
                }
                // Failed meanwhile (its chat became unreachable): not retried.
                Err(e) if matches!(recorded, Ok(false)) => {
                    tracing::info!(id = row.id, channel = %row.channel, error = %e,
                        "reply no longer pending (failed meanwhile); not retried");
                }
                Err(e) => {
                    let delay = match &e {
                        // The channel's own word; a rate limit is not a failure.
                        SendError::RetryAfter(d) => *d,
                        _ => {
                            this.metrics.outbox_send_failures.inc();
                            if matches!(e, SendError::Unknown(_)) {
                                this.metrics.outbox_unknown.inc();
                            }
                            channel.failures = channel.failures.saturating_add(1);
                            if channel.failures == this.retry.attempts.saturating_add(1) {
                                this.own_metrics
                                    .failing
                                    .with_label_values(&[row.channel.as_str()])
                                    .set(1);
                                tracing::error!(channel = %row.channel, failures = channel.failures, error = %e,
                                    "replies on this channel keep failing; still retrying at the backoff cap");
                            }
                            backoff_delay(&this.retry, channel.failures, this.rng.gen::<f64>())
                        }
                    };
                    channel.paused_until = Some(tokio::time::Instant::now() + delay);
                    tracing::warn!(id = row.id, channel = %row.channel, error = %e, retry_in = ?delay, "reply not delivered; will retry");
                    this.queue.push_front(row);
                }
            }
            if this.draining && this.in_flight.is_empty() {
                for tx in this.drained.drain(..) {
                    let _ = tx.send(());
                }
            }
            this.pump(ctx);
        }));
    }
}

impl Actor for OutboxActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(65_536);
        if let Some(every) = self.rescan_every {
            ctx.run_interval(every, |this, ctx| {
                if !this.holds_lease() {
                    if !this.queue.is_empty() || !this.waiting.is_empty() {
                        tracing::info!(
                            queued = this.queue.len() + this.waiting.len(),
                            "outbox lease not held: another instance sends these replies"
                        );
                    }
                    this.queue.clear();
                    this.waiting.clear();
                    return;
                }
                this.rescanning = true;
                this.refill(ctx);
            });
        }
        // Replies left unsent by an earlier run go out first (R3).
        self.refill(ctx);
    }
}

impl Handler<OutboxKick> for OutboxActor {
    type Result = ();
    fn handle(&mut self, _: OutboxKick, ctx: &mut Context<Self>) {
        self.refill(ctx);
    }
}

/// The replies of `session` were failed in the store (its chat became
/// unreachable): drop the ones queued or waiting here, so none is sent.
/// The one in flight, if any, is dropped when its outcome is recorded.
/// Sent by session actors.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct ForgetReplies {
    pub session: String,
}

impl Handler<ForgetReplies> for OutboxActor {
    type Result = ();
    fn handle(&mut self, msg: ForgetReplies, _: &mut Context<Self>) {
        let before = self.queue.len() + self.waiting.len();
        self.queue.retain(|r| r.session_id != msg.session);
        self.waiting.retain(|_, r| r.session_id != msg.session);
        let dropped = before - self.queue.len() - self.waiting.len();
        if dropped > 0 {
            tracing::info!(session = %msg.session, dropped, "queued replies to an unreachable chat dropped");
        }
    }
}

impl Handler<ChannelReady> for OutboxActor {
    type Result = ();
    fn handle(&mut self, msg: ChannelReady, ctx: &mut Context<Self>) {
        self.channels.entry(msg.0.clone()).or_default().readies += 1;
        self.requeue_waiting(Some(&msg.0), ctx);
    }
}

impl Handler<SetOutboxPolicy> for OutboxActor {
    type Result = ();
    fn handle(&mut self, msg: SetOutboxPolicy, ctx: &mut Context<Self>) {
        self.config = msg.config;
        self.retry = msg.retry;
        // A higher concurrency may start queued sends at once.
        self.pump(ctx);
    }
}

impl Handler<SetSinks> for OutboxActor {
    type Result = ();
    fn handle(&mut self, msg: SetSinks, ctx: &mut Context<Self>) {
        self.sinks = msg.0;
        // Rows skipped for lack of a route get another chance.
        if !self.unrouted.is_empty() {
            self.unrouted.clear();
            self.high_water = 0;
            self.queue.retain(|r| self.in_flight.contains(&r.id));
            self.unknown_loaded = false;
        }
        // New routes, fresh start for every channel's failure count.
        for channel in self.channels.keys() {
            self.own_metrics
                .failing
                .with_label_values(&[channel.as_str()])
                .set(0);
        }
        self.channels.clear();
        self.refill(ctx);
    }
}

impl Handler<DrainOutbox> for OutboxActor {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, _: DrainOutbox, _: &mut Context<Self>) -> Self::Result {
        self.draining = true;
        if self.in_flight.is_empty() {
            return Box::pin(async {});
        }
        let (tx, rx) = oneshot::channel();
        self.drained.push(tx);
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}
