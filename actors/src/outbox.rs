//! The OutboxActor sends stored replies (R3). Replies are written to the
//! `outbox` table in the same transaction as their turn; this actor pages
//! pending rows in (bounded memory), hands each to its channel's `ReplySink`,
//! and marks it sent only after the channel accepted it. Failures back off
//! per channel (an endpoint that is down is down for every chat); replies to
//! one session go out one at a time, in order. Delivery is at-least-once: a
//! crash between "accepted" and "marked sent" resends, and the reply's `id`
//! lets the receiver drop the repeat.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures::future::BoxFuture;
use rand::Rng;
use tokio::sync::oneshot;

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
}

/// How an adapter sends replies out. Implemented by each channel.
pub trait ReplySink: Send + Sync + 'static {
    fn send(&self, reply: OutboundReply) -> BoxFuture<'static, Result<(), SendError>>;
}

/// New replies were committed. Sent (fire and forget) by session actors.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct OutboxKick;

/// Replace the channel sinks (startup, reload). Sent by the app.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetSinks(pub HashMap<String, Arc<dyn ReplySink>>);

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
    failures: u32,
    paused_until: Option<tokio::time::Instant>,
}

pub struct OutboxActor {
    persistence: Addr<PersistenceActor>,
    sinks: HashMap<String, Arc<dyn ReplySink>>,
    config: OutboxConfig,
    metrics: Metrics,
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
    draining: bool,
    drained: Vec<oneshot::Sender<()>>,
    wake_scheduled: bool,
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
            metrics,
            queue: VecDeque::new(),
            in_flight: HashSet::new(),
            busy_sessions: HashSet::new(),
            high_water: 0,
            refilling: false,
            dirty: false,
            channels: HashMap::new(),
            unrouted: HashSet::new(),
            draining: false,
            drained: Vec::new(),
            wake_scheduled: false,
        }
    }

    fn refill(&mut self, ctx: &mut Context<Self>) {
        if self.refilling || self.draining {
            self.dirty = true;
            return;
        }
        if self.queue.len() as i64 >= PAGE {
            // Enough work in memory; read more once it drains.
            self.dirty = true;
            return;
        }
        self.refilling = true;
        self.dirty = false;
        let req = self.persistence.send(GetPendingOutbox {
            after: self.high_water,
            limit: PAGE,
        });
        ctx.spawn(req.into_actor(self).map(|res, this, ctx| {
            this.refilling = false;
            match res.unwrap_or(Err(StoreError::Closed)) {
                Ok(rows) => {
                    let full = rows.len() as i64 == PAGE;
                    for row in rows {
                        this.high_water = this.high_water.max(row.id);
                        this.queue.push_back(row);
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
        if self.draining {
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
        self.busy_sessions.insert(row.session_id.clone());
        let reply = OutboundReply {
            id: row.id,
            chat: row.chat.clone(),
            in_reply_to: row.in_reply_to.clone(),
            text: row.text.clone(),
        };
        let timeout = Duration::from_millis(self.config.send_timeout_ms);
        let persistence = self.persistence.clone();
        let work = async move {
            let result = match tokio::time::timeout(timeout, sink.send(reply)).await {
                Ok(r) => r,
                Err(_) => Err(SendError::Unknown(format!("no answer within {timeout:?}"))),
            };
            let outcome = match &result {
                Ok(()) => SendOutcome::Sent,
                Err(SendError::Permanent(e)) => SendOutcome::GaveUp(e.clone()),
                Err(e) => SendOutcome::Failed(e.to_string()),
            };
            let recorded = persistence
                .send(RecordSend {
                    id: row.id,
                    outcome,
                })
                .await
                .unwrap_or(Err(StoreError::Closed));
            (row, result, recorded)
        };
        ctx.spawn(work.into_actor(self).map(|(row, result, recorded), this, ctx| {
            this.in_flight.remove(&row.id);
            this.busy_sessions.remove(&row.session_id);
            let channel = this.channels.entry(row.channel.clone()).or_default();
            match result {
                Ok(()) => {
                    this.metrics.outbox_sent.inc();
                    channel.failures = 0;
                    channel.paused_until = None;
                    if let Err(e) = recorded {
                        // Sent but not recorded: it will be sent again after a
                        // restart (at-least-once); the id lets receivers dedupe.
                        tracing::warn!(id = row.id, error = %e, "reply sent but not marked sent");
                    }
                }
                Err(SendError::Permanent(e)) => {
                    tracing::warn!(id = row.id, channel = %row.channel, error = %e, "reply rejected by the channel; giving up on it");
                }
                Err(e) => {
                    this.metrics.outbox_send_failures.inc();
                    if matches!(e, SendError::Unknown(_)) {
                        this.metrics.outbox_unknown.inc();
                    }
                    channel.failures = channel.failures.saturating_add(1);
                    let delay = match &e {
                        SendError::RetryAfter(d) => *d,
                        _ => backoff(&this.config, channel.failures),
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

/// Retry delay after `failures` consecutive failures: exponential from
/// `retry_min_ms`, capped at `retry_max_ms`, with ±20 % jitter.
pub fn backoff(config: &OutboxConfig, failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(20);
    let base = config
        .retry_min_ms
        .saturating_mul(1u64 << exp)
        .min(config.retry_max_ms);
    let jitter = rand::thread_rng().gen_range(0.8..1.2);
    Duration::from_millis((base as f64 * jitter) as u64)
}

impl Actor for OutboxActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(65_536);
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

impl Handler<SetSinks> for OutboxActor {
    type Result = ();
    fn handle(&mut self, msg: SetSinks, ctx: &mut Context<Self>) {
        self.sinks = msg.0;
        // Rows skipped for lack of a route get another chance.
        if !self.unrouted.is_empty() {
            self.unrouted.clear();
            self.high_water = 0;
            self.queue.retain(|r| self.in_flight.contains(&r.id));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let c = OutboxConfig {
            concurrency: 1,
            send_timeout_ms: 1000,
            retry_min_ms: 100,
            retry_max_ms: 1000,
        };
        let d1 = backoff(&c, 1).as_millis();
        let d3 = backoff(&c, 3).as_millis();
        let d30 = backoff(&c, 30).as_millis();
        assert!((80..=120).contains(&d1), "{d1}");
        assert!((320..=480).contains(&d3), "{d3}");
        assert!((800..=1200).contains(&d30), "{d30}");
    }
}
