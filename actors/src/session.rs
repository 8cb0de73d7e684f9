//! Sessions (R6): the `SessionRegistry` spawns one `SessionActor` per
//! conversation and forwards each inbound message to it.
//!
//! A session actor commits its messages in arrival order, one job at a
//! time, so a conversation's turns are ordered, while different sessions
//! commit concurrently and share group commits. For each message it asks
//! the brain for a decision against its cached snapshot (memory + recent
//! turns), then sends ONE `CommitExchange`: the inbound turn, the reply and
//! its outbox row become durable together, and only then does the adapter
//! acknowledge. Messages that queue up while a job commits (a Telegram
//! batch, a busy group) form the next job, `CommitExchanges`: each is
//! decided against the turns of those before it as they will be stored,
//! and the store checks that guess (`expect_seq`) before it writes; a
//! message whose guess was wrong is decided again after a reload.
//! Free text for an external agent is stored as `awaiting` first (so the
//! sender is acknowledged without waiting for the agent), then answered by a
//! per-session queue; awaiting turns are resumed after a restart.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use serde_json::{Map, Value};

use crate::agent::{self, AgentSettings};
use crate::brain::{Brain, BrainInput, Decision, RECENT_TURNS};
use crate::clock::Clock;
use crate::error::StoreError;
use crate::metrics::Metrics;
use crate::outbox::{ForgetReplies, OutboxKick};
use crate::persistence::{
    AwaitingTurn, ChatEvent, CommitAgentReply, CommitExchange, CommitExchanges, Exchange,
    ExchangeOutcome, GetAwaiting, GetSession, PersistenceActor, ReplyPlan, SessionKey, TurnRow,
};
use crate::tasks::TasksChanged;
use crate::timer::TimersChanged;

/// Everything a session needs that config can change (replaced on reload).
#[derive(Clone)]
pub struct SessionSettings {
    pub brain: Arc<dyn Brain>,
    /// Channels whose replies go to the outbox (they have a delivery route).
    pub routed_channels: HashSet<String>,
    pub agent: Option<AgentSettings>,
    /// Channel → user id → person (`[principals.NAME]`): their working
    /// memory lives in a `principal:<name>` row shared by all their chats.
    /// Nested so the per-message lookup borrows instead of allocating.
    pub principals: Arc<HashMap<String, HashMap<String, String>>>,
}

/// An inbound message from an adapter. The adapter acknowledges upstream
/// only after `Ok` (R1). Sent by adapters to the registry.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Delivered, StoreError>")]
pub struct Deliver {
    pub channel: String,
    pub chat: String,
    pub from: String,
    /// The channel's message id: the idempotency key (R2).
    pub key: String,
    pub text: String,
    /// `(adapter, state_json)` to store in the same transaction as this turn
    /// (see `Exchange::adapter_state`); `None` for most messages.
    pub adapter_state: Option<(String, String)>,
    /// The lease the adapter writes under (see `Exchange::fence`).
    pub fence: Option<crate::persistence::portable::leases::Fence>,
    /// What the turn is: `text`, a media kind (`photo`, `document`, …),
    /// `edit`, `callback`, … (R40: nothing a user sends is dropped).
    pub kind: String,
    /// What the channel said about it: file ids, sizes, coordinates, …
    pub meta: Option<serde_json::Value>,
    /// The channel's own reference of the message (Telegram message_id,
    /// Slack ts), so a later edit can find it.
    pub msg_ref: Option<String>,
    /// For an edit: the `msg_ref` of the message it revises.
    pub revises: Option<String>,
    /// Where replies go inside the chat (thread, topic, message to quote);
    /// copied to every reply's outbox row for the channel's sink.
    pub reply_to: Option<serde_json::Value>,
    /// `true`: answer it (brain, agent); `false`: store it only (chatter in
    /// a group not addressed to keel, edits, other bots' messages).
    pub answer: bool,
    /// What the message says about the chat itself (it moved to another
    /// id, keel was removed or added back): applied with the turn.
    pub chat_event: Option<ChatEvent>,
}

impl Deliver {
    /// A plain text message to answer: the common case.
    pub fn text(channel: &str, chat: String, from: String, key: String, text: String) -> Deliver {
        Deliver {
            channel: channel.to_string(),
            chat,
            from,
            key,
            text,
            adapter_state: None,
            fence: None,
            kind: "text".into(),
            meta: None,
            msg_ref: None,
            revises: None,
            reply_to: None,
            answer: true,
            chat_event: None,
        }
    }
}

/// The durable outcome of a `Deliver`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivered {
    Accepted {
        session: String,
        seq: i64,
    },
    Duplicate {
        session: String,
        seq: i64,
    },
    /// The sender already used this key for a different text: nothing was
    /// stored (R41). Webhook answers 409; other channels treat it as a
    /// duplicate (their ids are assigned by the platform, never reused).
    Conflict {
        session: String,
        seq: i64,
    },
}

impl Delivered {
    /// The one outcome label every adapter counts with.
    pub fn label(&self) -> &'static str {
        match self {
            Delivered::Accepted { .. } => "accepted",
            Delivered::Duplicate { .. } => "duplicate",
            Delivered::Conflict { .. } => "conflict",
        }
    }
}

/// Replace the settings (config reload). Sent by the app.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Reconfigure(pub SessionSettings);

/// Resume user turns left awaiting the agent (startup). Sent by the app.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<usize, StoreError>")]
pub struct ResumeAwaiting;

/// Session work started or finished: the session was used (its count of
/// work is the shared `Entry::work`). Sent by session actors.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
struct Busy {
    id: String,
}

/// Drop a session's cached snapshot: the store changed it behind the
/// session's back (a chat moved). Sent by session actors to the registry,
/// which forwards it to the session, if it is in memory.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
struct Forget {
    id: String,
}

struct Entry {
    addr: Addr<SessionActor>,
    /// `Deliver`s sent to the actor and not yet answered.
    busy: i64,
    /// Agent turns queued or running in the actor (and `Resume`s on their
    /// way to it): shared, so the actor counts them before it answers.
    work: Arc<AtomicI64>,
    last_used: tokio::time::Instant,
    /// Position in `SessionRegistry::lru`.
    tick: u64,
}

impl Entry {
    /// Nothing is queued or running for the actor: dropping its `Addr`
    /// stops it, and a later message starts a fresh one.
    fn idle(&self) -> bool {
        self.busy == 0 && self.work.load(Ordering::SeqCst) == 0
    }
}

/// Spawns and finds session actors. Lives on the main arbiter.
pub struct SessionRegistry {
    persistence: Addr<PersistenceActor>,
    outbox: Recipient<OutboxKick>,
    /// Told when a command created or cancelled a timer.
    timers: Option<Recipient<TimersChanged>>,
    /// Told when a chat became unreachable: its queued replies are dropped.
    forget_replies: Option<Recipient<ForgetReplies>>,
    /// Told when a command queued or cancelled a task.
    tasks: Option<Recipient<TasksChanged>>,
    settings: SessionSettings,
    metrics: Metrics,
    clock: Arc<dyn Clock>,
    http: reqwest::Client,
    sessions: HashMap<String, Entry>,
    /// Sessions idle this long (and not busy) leave memory.
    idle_ttl: Duration,
    /// At most this many live sessions (`[sessions] max_live`); beyond it
    /// the least recently used idle ones are evicted. Busy ones are never
    /// evicted, so the bound is exceeded only while they are all busy.
    max_live: usize,
    /// Least recently used first: use tick → session id.
    lru: BTreeMap<u64, String>,
    next_tick: u64,
}

impl SessionRegistry {
    pub fn new(
        persistence: Addr<PersistenceActor>,
        outbox: Recipient<OutboxKick>,
        settings: SessionSettings,
        metrics: Metrics,
        clock: Arc<dyn Clock>,
    ) -> SessionRegistry {
        SessionRegistry {
            persistence,
            outbox,
            timers: None,
            forget_replies: None,
            tasks: None,
            settings,
            metrics,
            clock,
            http: reqwest::Client::new(),
            sessions: HashMap::new(),
            idle_ttl: Duration::from_secs(600),
            max_live: crate::config::SessionsConfig::default().max_live,
            lru: BTreeMap::new(),
            next_tick: 0,
        }
    }

    /// Keep at most `max_live` sessions in memory (`[sessions] max_live`).
    pub fn with_max_live(mut self, max_live: usize) -> SessionRegistry {
        self.max_live = max_live.max(1);
        self
    }

    /// Tell `timers` when a command creates or cancels a timer.
    pub fn with_timers(mut self, timers: Recipient<TimersChanged>) -> SessionRegistry {
        self.timers = Some(timers);
        self
    }

    /// Tell the outbox when a chat became unreachable.
    pub fn with_outbox_forget(mut self, outbox: Recipient<ForgetReplies>) -> SessionRegistry {
        self.forget_replies = Some(outbox);
        self
    }

    /// Tell `tasks` when a command queues or cancels a task.
    pub fn with_tasks(mut self, tasks: Recipient<TasksChanged>) -> SessionRegistry {
        self.tasks = Some(tasks);
        self
    }

    fn session(&mut self, key: &SessionKey, me: Addr<SessionRegistry>) -> &mut Entry {
        if !self.sessions.contains_key(&key.id) && self.sessions.len() >= self.max_live {
            self.evict_lru(self.sessions.len() + 1 - self.max_live);
        }
        let tick = self.next_tick;
        self.next_tick += 1;
        let metrics = &self.metrics;
        let mut fresh = None;
        let entry = self.sessions.entry(key.id.clone()).or_insert_with(|| {
            metrics.sessions_active.inc();
            let work = Arc::new(AtomicI64::new(0));
            fresh = Some(work.clone());
            let actor = SessionActor {
                key: key.clone(),
                persistence: self.persistence.clone(),
                outbox: self.outbox.clone(),
                timers: self.timers.clone(),
                forget_replies: self.forget_replies.clone(),
                tasks: self.tasks.clone(),
                registry: me,
                settings: self.settings.clone(),
                clock: self.clock.clone(),
                http: self.http.clone(),
                cache: None,
                inbox: VecDeque::new(),
                draining: false,
                agent_queue: VecDeque::new(),
                agent_running: false,
                work: work.clone(),
            };
            Entry {
                addr: actor.start(),
                busy: 0,
                work,
                last_used: tokio::time::Instant::now(),
                tick,
            }
        });
        if fresh.is_none() {
            self.lru.remove(&entry.tick);
        }
        entry.tick = tick;
        entry.last_used = tokio::time::Instant::now();
        self.lru.insert(tick, key.id.clone());
        entry
    }

    /// Evict up to `n` idle sessions, least recently used first; busy ones
    /// stay (their turn order lives in their actor until they finish).
    fn evict_lru(&mut self, n: usize) {
        let mut victims = Vec::new();
        for (tick, id) in &self.lru {
            if victims.len() == n {
                break;
            }
            if self.sessions.get(id).is_some_and(Entry::idle) {
                victims.push(*tick);
            }
        }
        for tick in &victims {
            if let Some(id) = self.lru.remove(tick) {
                self.sessions.remove(&id);
            }
        }
        if !victims.is_empty() {
            self.metrics.sessions_active.sub(victims.len() as i64);
        }
    }

    fn evict_idle(&mut self) {
        let now = tokio::time::Instant::now();
        let ttl = self.idle_ttl;
        let before = self.sessions.len();
        // Dropping the last Addr stops an actor once its mailbox is empty;
        // `busy == 0` means nothing is queued or running for it.
        let lru = &mut self.lru;
        self.sessions.retain(|_, e| {
            let keep = !e.idle() || now.duration_since(e.last_used) < ttl;
            if !keep {
                lru.remove(&e.tick);
            }
            keep
        });
        let evicted = before - self.sessions.len();
        if evicted > 0 {
            self.metrics.sessions_active.sub(evicted as i64);
            tracing::debug!(evicted, "evicted idle sessions");
        }
    }
}

impl Actor for SessionRegistry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Every adapter funnels through here; do not let actix's default
        // mailbox of 16 throttle a burst from many clients.
        ctx.set_mailbox_capacity(65_536);
        ctx.run_interval(Duration::from_secs(60), |this, _| this.evict_idle());
    }
}

impl Handler<Deliver> for SessionRegistry {
    type Result = ResponseActFuture<Self, Result<Delivered, StoreError>>;

    fn handle(&mut self, msg: Deliver, ctx: &mut Context<Self>) -> Self::Result {
        let key = SessionKey::new(&msg.channel, &msg.chat);
        let id = key.id.clone();
        let entry = self.session(&key, ctx.address());
        entry.busy += 1;
        let request = entry.addr.send(msg);
        Box::pin(request.into_actor(self).map(move |res, this, _| {
            if let Some(e) = this.sessions.get_mut(&id) {
                e.busy -= 1;
            }
            if this.sessions.len() > this.max_live {
                // Busy sessions were skipped while the bound was reached.
                this.evict_lru(this.sessions.len() - this.max_live);
            }
            res.unwrap_or(Err(StoreError::Closed))
        }))
    }
}

/// The session ids in memory, least recently used first (tests, bench).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Vec<String>")]
pub struct LiveSessions;

impl Handler<LiveSessions> for SessionRegistry {
    type Result = Vec<String>;
    fn handle(&mut self, _: LiveSessions, _: &mut Context<Self>) -> Vec<String> {
        self.lru.values().cloned().collect()
    }
}

impl Handler<Busy> for SessionRegistry {
    type Result = ();
    fn handle(&mut self, msg: Busy, _: &mut Context<Self>) {
        if let Some(e) = self.sessions.get_mut(&msg.id) {
            e.last_used = tokio::time::Instant::now();
        }
    }
}

/// A reply sink learnt something about a chat (a Telegram group that
/// became a supergroup, from a 400 to a reply): applied in the store like
/// the channel's own service update, then every cached snapshot of the
/// chats involved is dropped. Sent by sinks through `adapter::ChatEvents`.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct ChatLearnt {
    pub channel: String,
    pub chat: String,
    pub event: ChatEvent,
}

impl Handler<ChatLearnt> for SessionRegistry {
    type Result = ();
    fn handle(&mut self, msg: ChatLearnt, ctx: &mut Context<Self>) {
        let session = SessionKey::new(&msg.channel, &msg.chat);
        let mut chats = vec![msg.chat.clone()];
        if let ChatEvent::Migrated { from, to } = &msg.event {
            chats = vec![from.clone(), to.clone()];
        }
        let req = self.persistence.send(crate::persistence::ApplyChatEvent {
            session,
            event: msg.event,
        });
        ctx.spawn(req.into_actor(self).map(move |res, this, _| {
            if let Err(e) = res.unwrap_or(Err(StoreError::Closed)) {
                tracing::warn!(error = %e, "chat event not applied");
                return;
            }
            for chat in chats {
                let id = SessionKey::new(&msg.channel, &chat).id;
                if let Some(e) = this.sessions.get(&id) {
                    e.addr.do_send(Forget { id });
                }
            }
            if let Some(timers) = &this.timers {
                timers.do_send(TimersChanged);
            }
        }));
    }
}

impl Handler<Forget> for SessionRegistry {
    type Result = ();
    fn handle(&mut self, msg: Forget, _: &mut Context<Self>) {
        if let Some(e) = self.sessions.get(&msg.id) {
            e.addr.do_send(msg);
        }
    }
}

impl Handler<Forget> for SessionActor {
    type Result = ();
    fn handle(&mut self, _: Forget, _: &mut Context<Self>) {
        self.cache = None;
    }
}

impl Handler<Reconfigure> for SessionRegistry {
    type Result = ();
    fn handle(&mut self, msg: Reconfigure, _: &mut Context<Self>) {
        for e in self.sessions.values() {
            e.addr.do_send(Reconfigure(msg.0.clone()));
        }
        self.settings = msg.0;
    }
}

impl Handler<ResumeAwaiting> for SessionRegistry {
    type Result = ResponseActFuture<Self, Result<usize, StoreError>>;
    fn handle(&mut self, _: ResumeAwaiting, _: &mut Context<Self>) -> Self::Result {
        let req = self.persistence.send(GetAwaiting { limit: 100_000 });
        Box::pin(req.into_actor(self).map(|res, this, ctx| {
            let turns = res.unwrap_or(Err(StoreError::Closed))?;
            let n = turns.len();
            for turn in turns {
                let entry = this.session(&turn.session, ctx.address());
                // Counted until the actor has queued it (it is busy).
                entry.work.fetch_add(1, Ordering::SeqCst);
                entry.addr.do_send(Resume(turn));
            }
            Ok(n)
        }))
    }
}

// ---------------------------------------------------------------------------

struct Cache {
    memory: Map<String, Value>,
    recent: VecDeque<TurnRow>,
    /// The session row exists, and these senders have principal rows.
    stored: bool,
    senders: HashSet<String>,
    /// The seq the session's next turn gets, as far as this actor knows
    /// (a reminder or an agent reply written meanwhile makes it stale; the
    /// store checks before it relies on it).
    next_seq: Option<i64>,
}

/// Senders remembered per session before the set is reset (bounds memory
/// in very large group chats; forgetting only costs an existence check).
const MAX_KNOWN_SENDERS: usize = 1_000;

impl Cache {
    fn push(&mut self, turn: TurnRow) {
        self.recent.push_back(turn);
        while self.recent.len() > RECENT_TURNS {
            self.recent.pop_front();
        }
    }

    /// `msg` is stored as `user_seq`, its reply (if any) as `reply_seq`.
    fn remember(
        &mut self,
        msg: &Deliver,
        user_seq: i64,
        reply_seq: Option<i64>,
        reply: Option<&ReplyPlan>,
        at: String,
    ) {
        self.stored = true;
        if self.senders.len() >= MAX_KNOWN_SENDERS {
            self.senders.clear();
        }
        self.senders.insert(msg.from.clone());
        self.push(TurnRow::text(
            user_seq,
            "user",
            &msg.text,
            Some(&msg.key),
            Some(&msg.from),
            at.clone(),
            None,
        ));
        if let (Some(seq), Some(plan)) = (reply_seq, reply) {
            self.push(TurnRow::reply(seq, &plan.text, at, plan.deliver));
        }
        self.next_seq = Some(reply_seq.unwrap_or(user_seq) + 1);
    }
}

/// One conversation. Started by the registry.
pub struct SessionActor {
    key: SessionKey,
    persistence: Addr<PersistenceActor>,
    outbox: Recipient<OutboxKick>,
    timers: Option<Recipient<TimersChanged>>,
    /// Told when a chat became unreachable: its queued replies are dropped.
    forget_replies: Option<Recipient<ForgetReplies>>,
    tasks: Option<Recipient<TasksChanged>>,
    registry: Addr<SessionRegistry>,
    settings: SessionSettings,
    clock: Arc<dyn Clock>,
    http: reqwest::Client,
    /// Loaded lazily; dropped after a failed commit so the next message
    /// reloads what is really on disk.
    cache: Option<Cache>,
    /// Messages not answered yet, in arrival order.
    inbox: VecDeque<Queued>,
    /// A round (load, decide, commit) is under way.
    draining: bool,
    agent_queue: VecDeque<AwaitingTurn>,
    agent_running: bool,
    /// The registry's count of agent work in this actor (it is never
    /// evicted while this is above 0).
    work: Arc<AtomicI64>,
}

impl Actor for SessionActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(1_024);
    }
}

/// Resume one awaiting turn. Sent by the registry.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
struct Resume(AwaitingTurn);

impl Handler<Reconfigure> for SessionActor {
    type Result = ();
    fn handle(&mut self, msg: Reconfigure, _: &mut Context<Self>) {
        self.settings = msg.0;
    }
}

impl Handler<Resume> for SessionActor {
    type Result = ();
    fn handle(&mut self, msg: Resume, ctx: &mut Context<Self>) {
        self.enqueue_agent(msg.0, ctx);
        // The registry's count for the message in transit.
        self.work.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Handler<Deliver> for SessionActor {
    type Result = ResponseFuture<Result<Delivered, StoreError>>;

    fn handle(&mut self, msg: Deliver, ctx: &mut Context<Self>) -> Self::Result {
        let (done, outcome) = tokio::sync::oneshot::channel();
        self.inbox.push_back(Queued { msg, done });
        self.drain(ctx);
        Box::pin(async move { outcome.await.unwrap_or(Err(StoreError::Closed)) })
    }
}

/// A `Deliver` in a session's inbox and where its outcome goes.
struct Queued {
    msg: Deliver,
    done: tokio::sync::oneshot::Sender<Result<Delivered, StoreError>>,
}

/// The most messages of one session committed as one job.
const MAX_BATCH: usize = 64;

/// One message decided, before and while it commits.
struct Planned {
    exchange: Exchange,
    decision: Option<Decision>,
    reply: Option<ReplyPlan>,
    /// The chat's new memory (not a person's), for the cache.
    memory: Option<Map<String, Value>>,
    timers_changed: bool,
    tasks_changed: bool,
    /// `(user_seq, reply_seq)` the cache was given before the commit,
    /// because a later message of the same batch was decided against it.
    speculated: Option<(i64, Option<i64>)>,
}

impl SessionActor {
    /// The person `msg`'s sender is (`[principals]`), if configured.
    fn person_of(&self, msg: &Deliver) -> Option<SessionKey> {
        self.settings
            .principals
            .get(&self.key.channel)
            .and_then(|users| users.get(&msg.from))
            .map(|name| SessionKey::new("principal", name))
    }

    /// May share a job with other messages of this session: nothing of it
    /// is read fresh (a person's memory) or written beside its turn (an
    /// offset, a fence, what it says about the chat).
    fn batchable(&self, msg: &Deliver) -> bool {
        msg.adapter_state.is_none()
            && msg.fence.is_none()
            && msg.chat_event.is_none()
            && self.person_of(msg).is_none()
    }

    /// Start a round unless one runs: messages are committed in arrival
    /// order, one job at a time; the messages that arrive while a job
    /// commits form the next job (so a chat's backlog commits together).
    fn drain(&mut self, ctx: &mut Context<Self>) {
        if self.draining || self.inbox.is_empty() {
            return;
        }
        self.draining = true;
        ctx.spawn(self.round().map(|(), this, ctx| {
            this.draining = false;
            this.drain(ctx);
        }));
    }

    /// Load what the front message needs, then decide and commit it with
    /// the batchable messages queued behind it.
    fn round(&mut self) -> ResponseActFuture<Self, ()> {
        let load = self.cache.is_none().then(|| {
            self.persistence.send(GetSession {
                id: self.key.id.clone(),
                tail: RECENT_TURNS as i64,
            })
        });
        // A configured person's memory is read fresh for each message (other
        // chats of theirs may have changed it); no cache to go stale.
        let person = self.inbox.front().and_then(|q| self.person_of(&q.msg));
        let person_load = person.as_ref().map(|p| {
            self.persistence
                .send(crate::persistence::GetMemory { id: p.id.clone() })
        });
        let fut = async move {
            let loaded = match load {
                Some(req) => Some(req.await.unwrap_or(Err(StoreError::Closed))),
                None => None,
            };
            let person_memory = match person_load {
                Some(req) => Some(req.await.unwrap_or(Err(StoreError::Closed))),
                None => None,
            };
            (loaded, person_memory)
        }
        .into_actor(self)
        .then(move |(loaded, person_memory), this, _| {
            if let Some(loaded) = loaded {
                match loaded {
                    Ok(snapshot) => {
                        let stored = snapshot.is_some();
                        let snapshot = snapshot.unwrap_or_default();
                        let memory =
                            serde_json::from_str(&snapshot.memory_json).unwrap_or_default();
                        this.cache = Some(Cache {
                            memory,
                            recent: snapshot.recent.into(),
                            stored,
                            senders: HashSet::new(),
                            next_seq: Some(if stored { snapshot.next_seq } else { 1 }),
                        });
                    }
                    Err(e) => return this.fail_front(e),
                }
            }
            let person = match (person, person_memory) {
                (Some(key), Some(Ok(json))) => {
                    let memory = json
                        .and_then(|j| serde_json::from_str(&j).ok())
                        .unwrap_or_default();
                    Some((key, memory))
                }
                (_, Some(Err(e))) => return this.fail_front(e),
                _ => None,
            };
            this.commit_round(person)
        });
        Box::pin(fut)
    }

    /// The front message fails with `e` (its load failed); the rest wait.
    fn fail_front(&mut self, e: StoreError) -> ResponseActFuture<Self, ()> {
        if let Some(q) = self.inbox.pop_front() {
            let _ = q.done.send(Err(e));
        }
        Box::pin(fut::ready(()))
    }

    /// Decide the front message (and the batchable ones behind it, each
    /// against the turns of those before it) and commit them as one job.
    /// The cache is loaded.
    fn commit_round(
        &mut self,
        person: Option<(SessionKey, Map<String, Value>)>,
    ) -> ResponseActFuture<Self, ()> {
        let mut items: Vec<(Queued, Planned)> = Vec::new();
        let mut person = person;
        while let Some(q) = self.inbox.pop_front() {
            let first = items.is_empty();
            let mut planned = self.plan(&q.msg, person.take());
            if !first {
                planned.exchange.expect_seq = self.cache.as_ref().and_then(|c| c.next_seq);
            }
            // A command with an effect: the store renders its reply, so
            // nothing can be decided after it before it commits.
            let ends_batch =
                !self.batchable(&q.msg) || matches!(planned.decision, Some(Decision::Act(_)));
            items.push((q, planned));
            let more = !ends_batch
                && items.len() < MAX_BATCH
                && self.cache.as_ref().is_some_and(|c| c.next_seq.is_some())
                && self.inbox.front().is_some_and(|n| self.batchable(&n.msg));
            if !more {
                break;
            }
            if let Some((q, planned)) = items.last_mut() {
                self.speculate(&q.msg, planned);
            }
        }
        let exchanges: Vec<Exchange> = items
            .iter_mut()
            .map(|(_, p)| std::mem::take(&mut p.exchange))
            .collect();
        let commit: ResponseFuture<Result<Vec<ExchangeOutcome>, StoreError>> =
            if exchanges.len() == 1 {
                let req = self.persistence.send(CommitExchange(
                    exchanges.into_iter().next().unwrap_or_default(),
                ));
                Box::pin(async move {
                    let outcome = req.await.unwrap_or(Err(StoreError::Closed))?;
                    Ok(vec![outcome])
                })
            } else {
                let req = self.persistence.send(CommitExchanges(exchanges));
                Box::pin(async move { req.await.unwrap_or(Err(StoreError::Closed)) })
            };
        Box::pin(commit.into_actor(self).map(move |res, this, ctx| {
            let res = res.and_then(|o| {
                (o.len() == items.len())
                    .then_some(o)
                    .ok_or_else(|| StoreError::Invalid("a batch came back short".into()))
            });
            let outcomes = match res {
                Ok(o) => o,
                Err(e) => {
                    this.cache = None;
                    for (q, _) in items {
                        let _ = q.done.send(Err(e.clone()));
                    }
                    return;
                }
            };
            let mut again = Vec::new();
            for ((q, planned), outcome) in items.into_iter().zip(outcomes) {
                if outcome == ExchangeOutcome::Stale {
                    again.push(q);
                    continue;
                }
                let result = this.settle(q.msg, planned, outcome, ctx);
                let _ = q.done.send(result);
            }
            if !again.is_empty() {
                // Decided against turns that did not commit as guessed:
                // decide them again against what is on disk, first.
                this.cache = None;
                for q in again.into_iter().rev() {
                    this.inbox.push_front(q);
                }
            }
        }))
    }

    /// Ask the brain about one message and build its exchange. The cache is
    /// loaded.
    fn plan(&mut self, msg: &Deliver, person: Option<(SessionKey, Map<String, Value>)>) -> Planned {
        let cache = self.cache.as_mut().expect("cache loaded before plan");
        // A contiguous view, not a copy: this runs for every message.
        let recent: &[TurnRow] = cache.recent.make_contiguous();
        // A message only to store (not addressed to keel, an edit, another
        // bot's) never reaches the brain.
        let decision = msg.answer.then(|| {
            self.settings.brain.decide(&BrainInput {
                session: &self.key,
                from: &msg.from,
                text: &msg.text,
                kind: &msg.kind,
                memory: person.as_ref().map_or(&cache.memory, |(_, m)| m),
                recent,
            })
        });
        let deliver = self.settings.routed_channels.contains(&self.key.channel);
        let (reply, memory, effect) = match &decision {
            None => (None, None, None),
            Some(Decision::Reply { text, memory }) => (
                Some(ReplyPlan {
                    text: text.clone(),
                    deliver,
                }),
                memory.clone(),
                None,
            ),
            Some(Decision::Forward) => (None, None, None),
            // The store renders the reply text while applying the effect.
            Some(Decision::Act(effect)) => (
                Some(ReplyPlan {
                    text: String::new(),
                    deliver,
                }),
                None,
                Some(effect.clone()),
            ),
        };
        let timers_changed = effect.as_ref().is_some_and(|e| e.changes_timers());
        let tasks_changed = effect.as_ref().is_some_and(|e| e.changes_tasks());
        // A person's memory changes go to their own row, as a patch; the
        // chat's memory is left alone.
        let (chat_memory, person_memory) = match (&person, &memory) {
            (Some((key, before)), Some(after)) => {
                (None, Some((key.clone(), memory_patch(before, after))))
            }
            (Some(_), None) => (None, None),
            (None, m) => (
                m.as_ref().map(|m| Value::Object(m.clone()).to_string()),
                None,
            ),
        };
        let memory = if person.is_some() { None } else { memory };
        let exchange = Exchange {
            session: self.key.clone(),
            from: msg.from.clone(),
            key: msg.key.clone(),
            text: msg.text.clone(),
            reply: reply.clone(),
            memory: chat_memory,
            known: cache.stored && cache.senders.contains(&msg.from),
            adapter_state: msg.adapter_state.clone(),
            fence: msg.fence.clone(),
            effect,
            kind: msg.kind.clone(),
            meta: msg.meta.as_ref().map(Value::to_string),
            msg_ref: msg.msg_ref.clone(),
            revises: msg.revises.clone(),
            reply_meta: msg.reply_to.as_ref().map(Value::to_string),
            answer: msg.answer,
            person_memory,
            chat_event: msg.chat_event.clone(),
            expect_seq: None,
        };
        Planned {
            exchange,
            decision,
            reply,
            memory,
            timers_changed,
            tasks_changed,
            speculated: None,
        }
    }

    /// Give the cache the turns `msg` will get if it commits, before it
    /// does, so the next message of the batch is decided after it. The
    /// store checks the guess (`expect_seq`); a wrong one is decided again.
    fn speculate(&mut self, msg: &Deliver, planned: &mut Planned) {
        let at = self.clock.stamp().text;
        let Some(cache) = self.cache.as_mut() else {
            return;
        };
        let Some(user_seq) = cache.next_seq else {
            return;
        };
        // As the store decides: a reply only for a message to answer.
        let reply_seq = (planned.reply.is_some() && msg.answer).then_some(user_seq + 1);
        cache.remember(msg, user_seq, reply_seq, planned.reply.as_ref(), at);
        if let Some(m) = &planned.memory {
            cache.memory = m.clone();
        }
        planned.speculated = Some((user_seq, reply_seq));
    }

    /// What follows one message's commit: the cache, the outbox, timers,
    /// tasks, the agent; the outcome for the adapter.
    fn settle(
        &mut self,
        msg: Deliver,
        planned: Planned,
        outcome: ExchangeOutcome,
        ctx: &mut Context<Self>,
    ) -> Result<Delivered, StoreError> {
        let session = self.key.id.clone();
        let (user_seq, reply_seq, outbox_id) = match outcome {
            ExchangeOutcome::Accepted {
                user_seq,
                reply_seq,
                outbox_id,
            } => (user_seq, reply_seq, outbox_id),
            other => {
                if planned.speculated.is_some() {
                    // The cache holds turns that were never written.
                    self.cache = None;
                }
                let seq = match other {
                    ExchangeOutcome::Duplicate { user_seq }
                    | ExchangeOutcome::Conflict { user_seq } => user_seq,
                    _ => 0,
                };
                return Ok(match other {
                    ExchangeOutcome::Conflict { .. } => Delivered::Conflict { session, seq },
                    _ => Delivered::Duplicate { session, seq },
                });
            }
        };
        match planned.speculated {
            Some(guess) if guess == (user_seq, reply_seq) => {}
            Some(_) => self.cache = None,
            None => {
                let at = self.clock.stamp().text;
                match self.cache.as_mut() {
                    // Turns were written behind the cache (a reminder, an
                    // agent reply): reload it rather than miss them.
                    Some(c) if c.next_seq.is_some_and(|n| n != user_seq) => self.cache = None,
                    Some(cache) => {
                        cache.remember(&msg, user_seq, reply_seq, planned.reply.as_ref(), at);
                        if let Some(m) = planned.memory {
                            cache.memory = m;
                        }
                    }
                    None => {}
                }
            }
        }
        if outbox_id.is_some() {
            self.outbox.do_send(OutboxKick);
        }
        if let Some(event) = &msg.chat_event {
            // The store moved turns or changed timers behind
            // every cached snapshot of the chats involved.
            self.cache = None;
            if let ChatEvent::Migrated { from, to } = event {
                for chat in [from, to] {
                    let key = SessionKey::new(&self.key.channel, chat);
                    if key.id != self.key.id {
                        self.registry.do_send(Forget { id: key.id });
                    }
                }
            }
            if let ChatEvent::Unreachable(_) = event {
                if let Some(outbox) = &self.forget_replies {
                    outbox.do_send(ForgetReplies {
                        session: self.key.id.clone(),
                    });
                }
            }
            if let Some(timers) = &self.timers {
                timers.do_send(TimersChanged);
            }
        }
        if let Some(Decision::Act(_)) = planned.decision {
            // The reply text was rendered by the store: reload
            // the snapshot next time instead of caching "".
            self.cache = None;
        }
        if planned.timers_changed {
            if let Some(timers) = &self.timers {
                timers.do_send(TimersChanged);
            }
        }
        if planned.tasks_changed {
            if let Some(tasks) = &self.tasks {
                tasks.do_send(TasksChanged);
            }
        }
        if planned.decision == Some(Decision::Forward) {
            self.enqueue_agent(
                AwaitingTurn {
                    session: self.key.clone(),
                    seq: user_seq,
                    key: Some(msg.key),
                    text: msg.text,
                },
                ctx,
            );
        }
        Ok(Delivered::Accepted {
            session,
            seq: user_seq,
        })
    }
    fn enqueue_agent(&mut self, turn: AwaitingTurn, ctx: &mut Context<Self>) {
        // Counted before the `Deliver` that queued it is answered, so the
        // registry never sees this session idle in between.
        self.work.fetch_add(1, Ordering::SeqCst);
        self.registry.do_send(Busy {
            id: self.key.id.clone(),
        });
        self.agent_queue.push_back(turn);
        self.run_agent(ctx);
    }

    /// Answer awaiting turns one at a time, in order.
    fn run_agent(&mut self, ctx: &mut Context<Self>) {
        if self.agent_running {
            return;
        }
        let Some(turn) = self.agent_queue.pop_front() else {
            return;
        };
        self.agent_running = true;
        let settings = self.settings.agent.clone();
        let http = self.http.clone();
        let history: Vec<TurnRow> = self
            .cache
            .as_ref()
            .map(|c| c.recent.iter().cloned().collect())
            .unwrap_or_default();
        let deliver = self.settings.routed_channels.contains(&self.key.channel);
        let persistence = self.persistence.clone();
        let key = self.key.clone();
        let work = async move {
            let text = match settings {
                None => {
                    "Got it — your message is saved. (No agent is configured any more.)".to_string()
                }
                Some(s) => ask_with_retries(&http, &s, &turn, &history).await,
            };
            let plan = ReplyPlan { text, deliver };
            // Retry the commit while storage is failing: the turn is durable
            // as awaiting, so a restart would also resume it.
            let mut delay = Duration::from_millis(200);
            loop {
                let req = CommitAgentReply {
                    session: key.clone(),
                    user_seq: turn.seq,
                    reply: plan.clone(),
                };
                match persistence
                    .send(req)
                    .await
                    .unwrap_or(Err(StoreError::Closed))
                {
                    Ok(done) => return Some((turn.seq, plan, done)),
                    Err(e) if e.is_transient() && !matches!(e, StoreError::Closed) => {
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(10));
                    }
                    Err(e) => {
                        tracing::error!(session = %key.id, error = %e, "could not store agent reply");
                        return None;
                    }
                }
            }
        };
        ctx.spawn(work.into_actor(self).map(|result, this, ctx| {
            if let Some((user_seq, plan, Some((seq, outbox)))) = result {
                if let Some(cache) = this.cache.as_mut() {
                    cache.push(TurnRow::reply(
                        seq,
                        &plan.text,
                        this.clock.stamp().text,
                        plan.deliver,
                    ));
                    cache.next_seq = cache.next_seq.map(|n| n.max(seq + 1));
                }
                if outbox.is_some() {
                    this.outbox.do_send(OutboxKick);
                }
                tracing::debug!(session = %this.key.id, user_seq, "agent replied");
            }
            this.agent_running = false;
            this.work.fetch_sub(1, Ordering::SeqCst);
            this.registry.do_send(Busy {
                id: this.key.id.clone(),
            });
            this.run_agent(ctx);
        }));
    }
}

async fn ask_with_retries(
    http: &reqwest::Client,
    settings: &AgentSettings,
    turn: &AwaitingTurn,
    history: &[TurnRow],
) -> String {
    let mut last = String::new();
    let mut delay = Duration::from_millis(500);
    for attempt in 1..=settings.attempts {
        match agent::ask(
            http,
            settings,
            &turn.session,
            turn.key.as_deref(),
            &turn.text,
            history,
        )
        .await
        {
            Ok(text) => return text,
            Err(e) => {
                tracing::warn!(session = %turn.session.id, attempt, error = %e, "agent call failed");
                last = e;
            }
        }
        if attempt < settings.attempts {
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
    }
    format!("Sorry, the agent is unavailable right now ({last}). Your message is saved; please ask again later.")
}

/// The changes from `before` to `after` as a JSON object (`null` = removed).
fn memory_patch(before: &Map<String, Value>, after: &Map<String, Value>) -> String {
    let mut patch = Map::new();
    for (k, v) in after {
        if before.get(k) != Some(v) {
            patch.insert(k.clone(), v.clone());
        }
    }
    for k in before.keys() {
        if !after.contains_key(k) {
            patch.insert(k.clone(), Value::Null);
        }
    }
    Value::Object(patch).to_string()
}
