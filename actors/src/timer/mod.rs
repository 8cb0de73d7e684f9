//! Durable timers (R7–R12): the `TimerActor`, schedules and chat commands.
//!
//! The actor keeps only a bounded window of the earliest due active timers
//! in memory (at most `window` entries from the `(next_run)` partial index)
//! and ONE pending wake-up for the earliest of them — never a timer per row.
//! When the window drains and the store holds more, it is refilled; a
//! command that creates or cancels a timer sends `TimersChanged` and the
//! window is reloaded (coalesced while a reload or fire is in flight).
//!
//! Firing goes through the `PersistenceActor`: each due timer is ONE unit of
//! work (`persistence::timers::fire_timer`) that writes the receipt
//! `(timer_id, due_at)`, the callback's effect and the timer's next state in
//! one transaction. A crash before that commit fires it again after restart;
//! after the commit, never (R9).
//!
//! Wall-clock time comes from an injected [`Clock`] so tests can jump it
//! (C7); the wait itself is a tokio timer capped at `max_sleep`, so a jump
//! of the wall clock is noticed within that cap.

pub mod commands;
pub mod metrics;

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use crate::clock::Clock;
use crate::error::StoreError;
use crate::outbox::OutboxKick;
use crate::persistence::timers::{
    CountActiveTimers, FireOutcome, FireTimers, GetDueWindow, PruneTimers,
};
use crate::persistence::PersistenceActor;
use crate::tasks::TasksChanged;
pub use metrics::TimerMetrics;

/// How the timer actor runs.
#[derive(Clone)]
pub struct TimerSettings {
    /// Most timers held in memory at once.
    pub window: usize,
    /// Longest single wait: bounds how late a wall-clock jump is noticed.
    pub max_sleep: Duration,
    /// Finished timers and receipts older than this are pruned.
    pub retention: Duration,
    /// How often the pruning job runs.
    pub prune_every: Duration,
    /// How often the window is reloaded even without `TimersChanged`: a
    /// safety net, so a lost notification delays a timer, never drops it.
    pub resync_every: Duration,
    /// Channels with a delivery route (reminders to others are stored only).
    pub routed: Arc<HashSet<String>>,
}

impl TimerSettings {
    pub fn new(retention_days: u32, routed: HashSet<String>) -> TimerSettings {
        TimerSettings {
            window: 1024,
            max_sleep: Duration::from_secs(1),
            retention: Duration::from_secs(u64::from(retention_days) * 86_400),
            prune_every: Duration::from_secs(3_600),
            resync_every: Duration::from_secs(60),
            routed: Arc::new(routed),
        }
    }
}

/// Running totals, for tests and the startup notice.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TimerStats {
    /// Due instants fired.
    pub fired: i64,
    /// Of those, fired late (after downtime or a clock jump).
    pub late: i64,
    /// Due instants that will never fire (skip policy, coalesced, too old).
    pub missed: i64,
    /// Timers parked with an error.
    pub parked: i64,
    /// Window reloads from the store.
    pub reloads: i64,
    /// Timers currently held in memory.
    pub in_window: usize,
}

/// A command created or cancelled a timer: refresh the window. Sent by
/// session actors after their commit.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct TimersChanged;

/// Fire what is overdue right now (startup recovery, R10) and start the
/// schedule. Sent once by the app after recovery; the answer feeds the
/// owner notification.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<TimerStats, StoreError>")]
pub struct RecoverTimers;

/// Look at the clock now (tests move a `ManualClock`, then send this).
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct Tick;

/// Totals so far. Sent by tests and status.
#[derive(Debug, Clone, Message)]
#[rtype(result = "TimerStats")]
pub struct GetTimerStats;

/// Channels with a delivery route changed (SIGHUP reload): reminders fired
/// from now on use them. Sent by the lifecycle controller.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct SetTimerRoutes(pub HashSet<String>);

/// How long finished timers and fire receipts are kept (reload). Sent by
/// the lifecycle controller.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct SetTimerRetention(pub Duration);

/// Stop scheduling (shutdown, before `CloseStore`). Fires already handed
/// to the store complete or roll back as a unit. Sent by the lifecycle.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct StopTimers;

/// Most fires handed to the store and not answered yet, in windows: bounds
/// memory while commits lag behind a burst.
const MAX_IN_FLIGHT_WINDOWS: usize = 4;

/// `(id, due, fired at, outcome)` of one fire.
type Fired = (i64, i64, i64, Result<FireOutcome, StoreError>);

/// Emitted after every fire batch (tests wait on it instead of sleeping).
pub type FireEvents = tokio::sync::mpsc::UnboundedSender<Vec<FireOutcome>>;

pub struct TimerActor {
    store: Addr<PersistenceActor>,
    outbox: Recipient<OutboxKick>,
    clock: Arc<dyn Clock>,
    settings: TimerSettings,
    /// `(next_run, id)` of the earliest due active timers.
    window: BTreeSet<(i64, i64)>,
    /// The window holds every active timer (the last load was short).
    complete: bool,
    /// A full window load is in flight (nothing fires meanwhile).
    loading: bool,
    /// A read-ahead refill (after the window's last entry) is in flight;
    /// firing goes on from what the window holds.
    refilling: bool,
    /// The window was trimmed while a refill was in flight: its rows may
    /// not join up with the window's new end, so they are dropped.
    trimmed: bool,
    /// Fire batches handed to the store and not answered yet. Firing does
    /// not wait for the previous batch's commit (the writer group-commits
    /// them), so one fsync does not delay the next due instant.
    in_flight: usize,
    /// Timers in those batches.
    in_flight_fires: usize,
    /// The last `(next_run, id)` taken for firing since the last full load:
    /// a refill while fires are in flight starts after it.
    cursor: Option<(i64, i64)>,
    /// A full reload was asked for; it runs once no fire is in flight.
    dirty: bool,
    /// Recovery ran; before it the actor does not fire on its own.
    running: bool,
    stopped: bool,
    wake: Option<SpawnHandle>,
    stats: TimerStats,
    events: Option<FireEvents>,
    metrics: Option<TimerMetrics>,
    /// Told when a `task` callback queued a task.
    tasks: Option<Recipient<TasksChanged>>,
}

impl TimerActor {
    pub fn new(
        store: Addr<PersistenceActor>,
        outbox: Recipient<OutboxKick>,
        clock: Arc<dyn Clock>,
        settings: TimerSettings,
    ) -> TimerActor {
        TimerActor {
            store,
            outbox,
            clock,
            settings,
            window: BTreeSet::new(),
            complete: false,
            loading: false,
            refilling: false,
            trimmed: false,
            in_flight: 0,
            in_flight_fires: 0,
            cursor: None,
            dirty: false,
            running: false,
            stopped: false,
            wake: None,
            stats: TimerStats::default(),
            events: None,
            metrics: None,
            tasks: None,
        }
    }

    /// Tell `tasks` when a `task` callback queued a task.
    pub fn with_tasks(mut self, tasks: Recipient<TasksChanged>) -> TimerActor {
        self.tasks = Some(tasks);
        self
    }

    /// Export figures in `/metrics`.
    pub fn with_metrics(mut self, metrics: TimerMetrics) -> TimerActor {
        self.metrics = Some(metrics);
        self
    }

    /// Report every fire batch on `events` (tests).
    pub fn with_events(mut self, events: FireEvents) -> TimerActor {
        self.events = Some(events);
        self
    }

    fn set_window(&mut self, rows: Vec<(i64, i64)>) {
        self.complete = rows.len() < self.settings.window;
        self.window = rows.into_iter().map(|(id, next)| (next, id)).collect();
        self.cursor = None;
        self.stats.reloads += 1;
        self.stats.in_window = self.window.len();
    }

    /// Merge a refill loaded after `cursor` (entries rescheduled meanwhile
    /// stay; the window stays bounded).
    fn extend_window(&mut self, rows: Vec<(i64, i64)>) {
        if std::mem::take(&mut self.trimmed) {
            self.complete = false;
            return;
        }
        let short = rows.len() < self.settings.window;
        let bound = rows.iter().map(|&(id, next)| (next, id)).max();
        self.window
            .extend(rows.into_iter().map(|(id, next)| (next, id)));
        if let (false, Some(bound)) = (short, bound) {
            // Entries put back past the page's end may have unloaded
            // neighbours in the store: the next refill brings them.
            let _ = self.window.split_off(&(bound.0, bound.1.saturating_add(1)));
        }
        self.complete = short;
        while self.window.len() > self.settings.window {
            self.window.pop_last();
            self.complete = false;
        }
        self.stats.reloads += 1;
        self.stats.in_window = self.window.len();
    }

    /// Put a rescheduled timer back if it belongs in the window: when the
    /// window is partial, only instants up to its last entry (later ones are
    /// picked up by the next refill).
    fn reinsert(&mut self, id: i64, next: i64) {
        // While a refill is in flight a later entry is kept too: the refill
        // covers it, or `extend_window` drops it past the page's end.
        let fits = self.complete
            || self.refilling
            || self.window.last().is_some_and(|&(last, _)| next <= last);
        if !fits && self.cursor.is_some_and(|c| (next, id) <= c) {
            // Behind the refill cursor: only a full reload finds it.
            self.dirty = true;
        }
        if fits {
            self.window.insert((next, id));
            while self.window.len() > self.settings.window {
                self.window.pop_last();
                self.complete = false;
                self.trimmed |= self.refilling;
            }
        }
        self.stats.in_window = self.window.len();
    }

    /// Remove and return every entry due at `now` (at most one window).
    fn take_due(&mut self, now: i64) -> Vec<(i64, i64)> {
        let mut due = Vec::new();
        while let Some(&(next, id)) = self.window.first() {
            if next > now {
                break;
            }
            self.window.pop_first();
            due.push((id, next));
            self.cursor = self.cursor.max(Some((next, id)));
        }
        self.stats.in_window = self.window.len();
        due
    }

    fn fire_all(
        &self,
        due: Vec<(i64, i64)>,
        now: i64,
    ) -> impl std::future::Future<Output = Vec<Fired>> {
        let req = self.store.send(FireTimers {
            fires: due.clone(),
            now_ms: now,
            routed: self.settings.routed.clone(),
        });
        async move {
            let answer = req.await.unwrap_or(Err(StoreError::Closed));
            match answer {
                Ok(outcomes) if outcomes.len() == due.len() => due
                    .into_iter()
                    .zip(outcomes)
                    .map(|((id, due), r)| (id, due, now, r))
                    .collect(),
                Ok(_) => due
                    .into_iter()
                    .map(|(id, due)| {
                        (
                            id,
                            due,
                            now,
                            Err(StoreError::Invalid("short fire batch".into())),
                        )
                    })
                    .collect(),
                Err(e) => due
                    .into_iter()
                    .map(|(id, due)| (id, due, now, Err(e.clone())))
                    .collect(),
            }
        }
    }

    /// Account for a fire batch; returns whether anything failed.
    fn absorb(&mut self, results: Vec<Fired>) -> bool {
        let mut failed = false;
        let mut outcomes = Vec::with_capacity(results.len());
        let mut kick = false;
        let mut queued = false;
        for (id, due, now, r) in results {
            match r {
                Ok(o) => {
                    if let Some(m) = &self.metrics {
                        m.fired.inc_by(o.fired.max(0) as u64);
                        m.late.inc_by(o.late.max(0) as u64);
                        m.missed.inc_by(o.missed.max(0) as u64);
                        m.parked.inc_by(u64::from(o.parked));
                        if o.fired > 0 {
                            m.lateness.observe((now - due).max(0) as f64 / 1000.0);
                        }
                    }
                    self.stats.fired += o.fired;
                    self.stats.late += o.late;
                    self.stats.missed += o.missed;
                    self.stats.parked += i64::from(o.parked);
                    kick |= o.outbox_rows > 0;
                    queued |= o.tasks_queued > 0;
                    if let Some(next) = o.next_run {
                        self.reinsert(id, next);
                    }
                    outcomes.push(o);
                }
                Err(e) => {
                    // Not committed: the row still says due; a reload finds it.
                    tracing::warn!(timer = id, error = %e, "timer fire failed; will retry");
                    failed = true;
                }
            }
        }
        if kick {
            self.outbox.do_send(OutboxKick);
        }
        if let (true, Some(tasks)) = (queued, &self.tasks) {
            tasks.do_send(TasksChanged);
        }
        if let Some(m) = &self.metrics {
            m.in_window.set(self.window.len() as i64);
        }
        if let (Some(events), false) = (&self.events, outcomes.is_empty()) {
            let _ = events.send(outcomes);
        }
        failed
    }

    fn saturated(&self) -> bool {
        self.in_flight_fires >= MAX_IN_FLIGHT_WINDOWS * self.settings.window.max(1)
    }

    /// The one driver: refill, fire what is due, or wait for the earliest.
    fn cycle(&mut self, ctx: &mut Context<Self>) {
        if self.loading || !self.running || self.stopped {
            return;
        }
        if let Some(h) = self.wake.take() {
            ctx.cancel_future(h);
        }
        if self.dirty || (self.window.is_empty() && !self.complete) {
            if self.in_flight == 0 && !self.refilling {
                self.reload(ctx, None);
                return;
            }
            if self.dirty || self.refilling {
                // The next answered batch or refill calls `cycle` again.
                return;
            }
        }
        // Read ahead: refill before the window runs dry, so firing never
        // waits for a load queued behind a commit.
        if !self.complete && !self.refilling && self.window.len() <= self.settings.window / 2 {
            let after = self
                .window
                .last()
                .map(|&(next, id)| (next, id))
                .max(self.cursor);
            if after.is_some() {
                self.reload(ctx, after);
            }
        }
        if self.saturated() {
            return;
        }
        let now = self.clock.now_ms();
        let due = self.take_due(now);
        if due.is_empty() {
            let wait = self
                .window
                .first()
                .map(|&(next, _)| Duration::from_millis((next - now).max(0) as u64))
                .unwrap_or(self.settings.max_sleep)
                .min(self.settings.max_sleep);
            self.wake = Some(ctx.run_later(wait, |this, ctx| {
                this.wake = None;
                this.cycle(ctx);
            }));
            return;
        }
        let n = due.len();
        self.in_flight += 1;
        self.in_flight_fires += n;
        let fut = self.fire_all(due, now);
        ctx.spawn(fut.into_actor(self).map(move |results, this, ctx| {
            this.in_flight -= 1;
            this.in_flight_fires -= n;
            if this.absorb(results) {
                this.dirty = true;
                this.retry_later(ctx);
                return;
            }
            this.cycle(ctx);
        }));
        // Look again at once: what else is due, or when to wake.
        self.cycle(ctx);
    }

    /// Replace any pending wake-up with one `max_sleep` from now (after a
    /// store failure: try again, without a hot loop).
    fn retry_later(&mut self, ctx: &mut Context<Self>) {
        if let Some(h) = self.wake.take() {
            ctx.cancel_future(h);
        }
        self.wake = Some(ctx.run_later(self.settings.max_sleep, |this, ctx| {
            this.wake = None;
            this.cycle(ctx);
        }));
    }

    /// Load the window: from the start (`after = None`, replaces it) or
    /// after a cursor (merged into it).
    fn reload(&mut self, ctx: &mut Context<Self>, after: Option<(i64, i64)>) {
        if after.is_none() {
            self.loading = true;
            self.dirty = false;
        } else {
            self.refilling = true;
            self.trimmed = false;
        }
        let req = self.store.send(GetDueWindow {
            limit: self.settings.window as i64,
            after,
        });
        ctx.spawn(req.into_actor(self).map(move |res, this, ctx| {
            if after.is_none() {
                this.loading = false;
            } else {
                this.refilling = false;
            }
            match res.unwrap_or(Err(StoreError::Closed)) {
                Ok(rows) => {
                    if after.is_none() {
                        this.set_window(rows);
                    } else {
                        this.extend_window(rows);
                    }
                    this.cycle(ctx);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot load the timer window; retrying");
                    this.dirty = true;
                    this.retry_later(ctx);
                }
            }
        }));
    }

    fn prune(&mut self, _ctx: &mut Context<Self>) {
        let now = self.clock.now_ms();
        let cut = now - self.settings.retention.as_millis() as i64;
        let before = chrono::DateTime::from_timestamp_millis(cut)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let req = self.store.send(PruneTimers {
            before,
            before_ms: cut,
            limit: 10_000,
        });
        let count = self
            .metrics
            .clone()
            .map(|m| (m, self.store.send(CountActiveTimers)));
        actix::spawn(async move {
            match req.await.unwrap_or(Err(StoreError::Closed)) {
                Ok((timers, receipts)) if timers + receipts > 0 => {
                    tracing::info!(timers, receipts, "pruned timer history");
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "timer history pruning failed"),
            }
            if let Some((m, count)) = count {
                if let Ok(Ok(n)) = count.await {
                    m.active.set(n);
                }
            }
        });
    }
}

/// How long after recovery the first pruning run (and active count) waits.
const FIRST_PRUNE_AFTER: Duration = Duration::from_secs(10);

impl Actor for TimerActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Creates arrive in bursts; do_send ignores the capacity anyway.
        ctx.set_mailbox_capacity(1024);
        ctx.run_interval(self.settings.prune_every, |this, ctx| this.prune(ctx));
        ctx.run_interval(self.settings.resync_every, |this, ctx| {
            this.dirty = true;
            this.cycle(ctx);
        });
    }
}

impl Handler<RecoverTimers> for TimerActor {
    type Result = ResponseActFuture<Self, Result<TimerStats, StoreError>>;

    fn handle(&mut self, _: RecoverTimers, _: &mut Context<Self>) -> Self::Result {
        self.loading = true;
        let req = self.store.send(GetDueWindow {
            limit: self.settings.window as i64,
            after: None,
        });
        Box::pin(
            req.into_actor(self)
                .then(
                    |res, this, _| -> fut::LocalBoxActorFuture<Self, Result<(), StoreError>> {
                        let loaded = res.unwrap_or(Err(StoreError::Closed));
                        let due = match loaded {
                            Ok(rows) => {
                                this.set_window(rows);
                                this.take_due(this.clock.now_ms())
                            }
                            Err(e) => {
                                this.loading = false;
                                return fut::ready(Err(e)).boxed_local();
                            }
                        };
                        let now = this.clock.now_ms();
                        this.fire_all(due, now)
                            .into_actor(this)
                            .map(|results, this, _| {
                                if this.absorb(results) {
                                    this.dirty = true;
                                }
                                Ok(())
                            })
                            .boxed_local()
                    },
                )
                .map(|res: Result<(), StoreError>, this, ctx| {
                    this.loading = false;
                    res?;
                    this.running = true;
                    // Not at once: the count for the gauge reads every
                    // active timer (a read transaction a stop's TRUNCATE
                    // checkpoint would wait for), and a start has better
                    // things to do in its first seconds (issue 14).
                    ctx.run_later(FIRST_PRUNE_AFTER, |this, ctx| this.prune(ctx));
                    this.cycle(ctx);
                    Ok(this.stats.clone())
                }),
        )
    }
}

impl Handler<TimersChanged> for TimerActor {
    type Result = ();
    fn handle(&mut self, _: TimersChanged, ctx: &mut Context<Self>) {
        self.dirty = true;
        self.cycle(ctx);
    }
}

impl Handler<Tick> for TimerActor {
    type Result = ();
    fn handle(&mut self, _: Tick, ctx: &mut Context<Self>) {
        self.cycle(ctx);
    }
}

impl Handler<GetTimerStats> for TimerActor {
    type Result = MessageResult<GetTimerStats>;
    fn handle(&mut self, _: GetTimerStats, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.stats.clone())
    }
}

impl Handler<SetTimerRoutes> for TimerActor {
    type Result = ();
    fn handle(&mut self, msg: SetTimerRoutes, _: &mut Context<Self>) {
        self.settings.routed = Arc::new(msg.0);
    }
}

impl Handler<SetTimerRetention> for TimerActor {
    type Result = ();
    fn handle(&mut self, msg: SetTimerRetention, _: &mut Context<Self>) {
        self.settings.retention = msg.0;
    }
}

impl Handler<StopTimers> for TimerActor {
    type Result = ();
    fn handle(&mut self, _: StopTimers, ctx: &mut Context<Self>) {
        self.stopped = true;
        if let Some(h) = self.wake.take() {
            ctx.cancel_future(h);
        }
        ctx.stop();
    }
}
