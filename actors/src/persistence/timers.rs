//! Timers (R7–R11): the types (effects, callbacks, rows, fire outcomes), the
//! PersistenceActor's timer messages, and `&Connection` wrappers for SQLite
//! callers (the CLI, the bench, unit tests). The SQL itself — creating,
//! cancelling, listing and firing timers, the timer actor's window query and
//! the retention job — is written once in `portable::timers` and runs on
//! both backends, inside the writer's transaction.
//!
//! Chat commands that touch timers reach the store as an [`Effect`] on the
//! inbound `Exchange`: the effect runs in the same transaction as the inbound
//! turn (a redelivered message is a duplicate and creates nothing) and
//! renders the reply text, because only the store knows the new timer's id
//! or the current list.

use std::collections::HashSet;
use std::sync::Arc;

use actix::prelude::*;
use chrono::{TimeZone, Utc};
use chrono_tz::Tz;
use rusqlite::Connection;
use serde::{Deserialize, Serialize};

use super::portable;
use super::sessions::SessionKey;
use super::sql::{Backend, SqliteSql};
use super::PersistenceActor;
use crate::clock::Stamp;
use crate::error::StoreError;
use crate::schedule::plan::Misfire;
use crate::schedule::ScheduleSpec;

/// A change a chat command asks the store to make, inside the transaction
/// of the message that asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    CreateTimer(TimerRequest),
    /// Cancel one of this session's timers.
    CancelTimer(i64),
    /// Render this session's active timers as the reply.
    ListTimers,
    /// Store the sender's IANA timezone (already validated).
    SetTimezone(String),
    /// `/task …` (queue, cancel, status, list): see `persistence::tasks`.
    Task(super::tasks::TaskEffect),
}

impl Effect {
    /// Whether the timer actor's window may have changed.
    pub fn changes_timers(&self) -> bool {
        matches!(self, Effect::CreateTimer(_) | Effect::CancelTimer(_))
    }

    /// Whether the task runner should look at the queue again.
    pub fn changes_tasks(&self) -> bool {
        matches!(self, Effect::Task(t) if t.changes_tasks())
    }
}

/// `/remind …` as parsed by the brain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimerRequest {
    pub spec: ScheduleSpec,
    /// The reminder text.
    pub text: String,
    pub misfire: Misfire,
    /// `/remind … /task run NAME ARGS`: the timer runs this task instead
    /// of sending `text`.
    pub task: Option<TaskParams>,
}

/// Callback kinds, by name, with typed params (R7). Unknown names or bad
/// params in the database park the timer instead of failing the actor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Callback {
    /// `reminder`: a message to the session through the outbox.
    Reminder(ReminderParams),
    /// `state_transition`: move another timer of the same session to a
    /// state (e.g. stop a daily reminder on a date), recorded as a system
    /// turn of the session; never delivered.
    StateTransition(StateTransitionParams),
    /// `task`: queue the named task (in the fire's transaction, so each
    /// due instant queues it once), told to the timer's chat when it ends.
    /// The runner checks the name, the args and the chat's right to run it
    /// when it starts the task.
    Task(TaskParams),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReminderParams {
    pub text: String,
}

/// Target states a `state_transition` may set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransitionTo {
    /// Stopped for good (moves to history).
    Cancelled,
    /// Stopped with a note; `keel timers` shows it, nothing fires.
    Parked,
}

impl TransitionTo {
    pub fn as_str(self) -> &'static str {
        match self {
            TransitionTo::Cancelled => "cancelled",
            TransitionTo::Parked => "parked",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateTransitionParams {
    /// The timer to move; it must belong to the same session.
    pub timer_id: i64,
    pub to: TransitionTo,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskParams {
    /// The configured task to run.
    pub name: String,
    /// Extra argv: a list of strings (or absent).
    #[serde(default)]
    pub args: serde_json::Value,
}

impl TaskParams {
    /// The extra argv, or why the params are unusable.
    pub fn argv(&self) -> Result<Vec<String>, String> {
        match &self.args {
            serde_json::Value::Null => Ok(Vec::new()),
            serde_json::Value::Array(items) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| "bad task params: args must be a list of strings".into())
                })
                .collect(),
            _ => Err("bad task params: args must be a list of strings".into()),
        }
    }
}

impl Callback {
    pub fn parse(kind: &str, params_json: &str) -> Result<Callback, String> {
        fn typed<T: serde::de::DeserializeOwned>(kind: &str, json: &str) -> Result<T, String> {
            serde_json::from_str(json).map_err(|e| format!("bad {kind} params: {e}"))
        }
        match kind {
            "reminder" => typed(kind, params_json).map(Callback::Reminder),
            "state_transition" => typed(kind, params_json).map(Callback::StateTransition),
            "task" => typed(kind, params_json).map(Callback::Task),
            other => Err(format!("unknown callback kind {other:?}")),
        }
    }

    /// One line for `/timers`.
    pub fn describe(&self) -> String {
        match self {
            Callback::Reminder(p) => p.text.clone(),
            Callback::StateTransition(p) => format!("set timer #{} {}", p.timer_id, p.to.as_str()),
            Callback::Task(p) => format!("task {}", p.name),
        }
    }
}

/// Catch-up window of timers created by chat commands: a week.
pub const DEFAULT_CATCHUP_SECS: i64 = 7 * 86_400;
/// Active timers one session may hold.
pub const MAX_ACTIVE_PER_SESSION: i64 = 10_000;

/// A timer as shown to operators and in `/timers`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TimerRow {
    pub id: i64,
    pub session_id: String,
    pub kind: String,
    pub schedule: String,
    pub timezone: String,
    pub callback: String,
    pub params_json: String,
    pub misfire: String,
    pub next_run: Option<i64>,
    pub last_fired: Option<i64>,
    pub fired_count: i64,
    pub missed_count: i64,
    pub state: String,
    pub error: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

/// A unix-ms instant shown in a zone, e.g. `2026-12-01 09:00 CET`.
pub fn show_instant(ms: i64, tz: Tz) -> String {
    match Utc.timestamp_millis_opt(ms).single() {
        Some(t) => t
            .with_timezone(&tz)
            .format("%Y-%m-%d %H:%M:%S %Z")
            .to_string(),
        None => ms.to_string(),
    }
}

/// The SQLite connection seen through the portable seam.
fn sql(conn: &Connection) -> SqliteSql<'_> {
    SqliteSql(conn)
}

/// Run a command's effect; returns the reply text. Errors the participant
/// can fix (past instant, never-firing schedule) are replies, not failures.
/// Timer effects are [`portable::timers::apply_effect`]; `/task …` goes to
/// the task store.
pub fn apply_effect(
    conn: &Connection,
    stamp: &Stamp,
    session: &SessionKey,
    principal: &str,
    effect: &Effect,
) -> Result<String, StoreError> {
    portable::timers::apply_effect(&mut sql(conn), stamp, session, principal, effect)
}

/// Active and parked timers of one session, soonest first.
pub fn session_timers(
    conn: &Connection,
    session_id: &str,
    limit: i64,
) -> Result<Vec<TimerRow>, StoreError> {
    portable::timers::session_timers(&mut sql(conn), session_id, limit)
}

/// Every timer, newest first (operator listing), at most `limit`.
pub fn list_timers(conn: &Connection, limit: i64) -> Result<Vec<TimerRow>, StoreError> {
    portable::timers::list_timers(&mut sql(conn), limit)
}

/// One timer by id.
pub fn get_timer(conn: &Connection, id: i64) -> Result<Option<TimerRow>, StoreError> {
    portable::timers::get_timer(&mut sql(conn), id)
}

/// Cancel any timer (operator). Returns whether it was active or parked.
pub fn cancel_timer(conn: &Connection, at: &Stamp, id: i64) -> Result<bool, StoreError> {
    portable::timers::cancel_timer(&mut sql(conn), at, id)
}

/// The earliest due active timers: `(id, next_run)`, at most `limit`, from
/// the partial index. The timer actor's window.
pub fn due_window(conn: &Connection, limit: i64) -> Result<Vec<(i64, i64)>, StoreError> {
    portable::timers::due_window(&mut sql(conn), limit)
}

/// Like [`due_window`], but only entries after `(next_run, id)` = `after`.
pub fn due_window_after(
    conn: &Connection,
    after: (i64, i64),
    limit: i64,
) -> Result<Vec<(i64, i64)>, StoreError> {
    portable::timers::due_window_after(&mut sql(conn), after, limit)
}

/// What one fire did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FireOutcome {
    /// Due instants fired now (receipts written).
    pub fired: i64,
    /// Of those, fired later than `LATE_AFTER_MS`.
    pub late: i64,
    /// Due instants that will never fire.
    pub missed: i64,
    /// The timer's next due instant (`None`: done, parked or stale).
    pub next_run: Option<i64>,
    /// Outbox rows written (kick the outbox).
    pub outbox_rows: i64,
    /// The timer was parked (unknown callback, bad schedule).
    pub parked: bool,
    /// The timer was not due at `due` any more (cancelled or fired already).
    pub stale: bool,
    /// Tasks queued by `task` callbacks (tell the runner).
    pub tasks_queued: i64,
}

/// Fire timer `id`, expected due at `due`, at `now_ms` — ONE unit of work
/// ([`portable::timers::fire_timer`]).
pub fn fire_timer(
    conn: &Connection,
    id: i64,
    due: i64,
    now_ms: i64,
    routed: &HashSet<String>,
) -> Result<FireOutcome, StoreError> {
    portable::timers::fire_timer(&mut sql(conn), id, due, now_ms, routed, None)
}

/// Fire several due timers, each in its own savepoint
/// ([`portable::timers::fire_timers`]).
pub fn fire_timers(
    conn: &Connection,
    fires: &[(i64, i64)],
    now_ms: i64,
    routed: &HashSet<String>,
) -> Result<Vec<Result<FireOutcome, StoreError>>, StoreError> {
    portable::timers::fire_timers(&mut sql(conn), fires, now_ms, routed)
}

/// Delete old finished timers and receipts ([`portable::timers::prune`]).
pub fn prune(
    conn: &Connection,
    before: &str,
    before_ms: i64,
    limit: i64,
) -> Result<(usize, usize), StoreError> {
    portable::timers::prune(&mut sql(conn), before, before_ms, limit)
}

/// Active, parked, done and cancelled timers: `(state, count)`, for
/// `keel status`. A scan of the table: on demand only, never at start.
pub fn count_by_state(conn: &Connection) -> Result<Vec<(String, i64)>, StoreError> {
    portable::timers::count_by_state(&mut sql(conn))
}

/// Active timers, counted through the `timers_due` partial index:
/// `/metrics`, not the hot path.
pub fn count_active(conn: &Connection) -> Result<i64, StoreError> {
    portable::timers::count_active(&mut sql(conn))
}

// ---- messages to the PersistenceActor ----
//
// Every handler runs the portable store code on PostgreSQL (`call_sql`);
// on SQLite the same functions through the wrappers above, on the writer
// (`call`, where `task` callbacks can reach the SQLite task store).

/// Load the timer window. Sent by the timer actor.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Vec<(i64, i64)>, StoreError>")]
pub struct GetDueWindow {
    pub limit: i64,
    /// Only entries after this `(next_run, id)` (a refill while fires are
    /// in flight); `None`: from the start.
    pub after: Option<(i64, i64)>,
}

impl Handler<GetDueWindow> for PersistenceActor {
    type Result = ResponseFuture<Result<Vec<(i64, i64)>, StoreError>>;
    fn handle(&mut self, msg: GetDueWindow, _: &mut Context<Self>) -> Self::Result {
        self.call_sql(move |db, _| match msg.after {
            None => portable::timers::due_window(db, msg.limit),
            Some(after) => portable::timers::due_window_after(db, after, msg.limit),
        })
    }
}

/// Count the active timers (through the `timers_due` index). Sent by the
/// timer actor after recovery and at every pruning run, for `/metrics`.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<i64, StoreError>")]
pub struct CountActiveTimers;

impl Handler<CountActiveTimers> for PersistenceActor {
    type Result = ResponseFuture<Result<i64, StoreError>>;
    fn handle(&mut self, _: CountActiveTimers, _: &mut Context<Self>) -> Self::Result {
        if self.backend() == Backend::Postgres {
            return self.call_sql(|db, _| portable::timers::count_active(db));
        }
        // About 100 ms per million active timers: beside the writer.
        self.read_beside(count_active)
    }
}

/// Fire one due timer in one transaction. Sent by the timer actor.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<FireOutcome, StoreError>")]
pub struct FireTimer {
    pub id: i64,
    pub due: i64,
    pub now_ms: i64,
    pub routed: Arc<HashSet<String>>,
}

impl Handler<FireTimer> for PersistenceActor {
    type Result = ResponseFuture<Result<FireOutcome, StoreError>>;
    fn handle(&mut self, msg: FireTimer, _: &mut Context<Self>) -> Self::Result {
        self.call_sql(move |db, _| {
            portable::timers::fire_timer(db, msg.id, msg.due, msg.now_ms, &msg.routed, None)
        })
    }
}

/// Fire a batch of due timers in one writer job (one savepoint each). Sent
/// by the timer actor; the answer comes after the group commit.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Vec<Result<FireOutcome, StoreError>>, StoreError>")]
pub struct FireTimers {
    /// `(id, due)` pairs.
    pub fires: Vec<(i64, i64)>,
    pub now_ms: i64,
    pub routed: Arc<HashSet<String>>,
}

impl Handler<FireTimers> for PersistenceActor {
    type Result = ResponseFuture<Result<Vec<Result<FireOutcome, StoreError>>, StoreError>>;
    fn handle(&mut self, msg: FireTimers, _: &mut Context<Self>) -> Self::Result {
        self.call_sql(move |db, _| {
            portable::timers::fire_timers(db, &msg.fires, msg.now_ms, &msg.routed)
        })
    }
}

/// Prune timer history and receipts. Sent by the timer actor periodically.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(usize, usize), StoreError>")]
pub struct PruneTimers {
    /// RFC 3339 cut-off for finished timers.
    pub before: String,
    /// Unix-ms cut-off for receipts.
    pub before_ms: i64,
    pub limit: i64,
}

impl Handler<PruneTimers> for PersistenceActor {
    type Result = ResponseFuture<Result<(usize, usize), StoreError>>;
    fn handle(&mut self, msg: PruneTimers, _: &mut Context<Self>) -> Self::Result {
        self.call_sql(move |db, _| {
            portable::timers::prune(db, &msg.before, msg.before_ms, msg.limit)
        })
    }
}

/// Every timer, newest first, at most `limit`: what `keel timers list`
/// reads, through the actor (either backend).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Vec<TimerRow>, StoreError>")]
pub struct GetTimers {
    pub limit: i64,
}

impl Handler<GetTimers> for PersistenceActor {
    type Result = ResponseFuture<Result<Vec<TimerRow>, StoreError>>;
    fn handle(&mut self, msg: GetTimers, _: &mut Context<Self>) -> Self::Result {
        self.read_sql(move |db| portable::timers::list_timers(db, msg.limit))
    }
}

/// One timer by id (`keel timers show`).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Option<TimerRow>, StoreError>")]
pub struct GetTimer {
    pub id: i64,
}

impl Handler<GetTimer> for PersistenceActor {
    type Result = ResponseFuture<Result<Option<TimerRow>, StoreError>>;
    fn handle(&mut self, msg: GetTimer, _: &mut Context<Self>) -> Self::Result {
        self.call_sql(move |db, _| portable::timers::get_timer(db, msg.id))
    }
}

/// Cancel any timer (`keel timers cancel`); whether it was active or parked.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<bool, StoreError>")]
pub struct CancelTimerById {
    pub id: i64,
}

impl Handler<CancelTimerById> for PersistenceActor {
    type Result = ResponseFuture<Result<bool, StoreError>>;
    fn handle(&mut self, msg: CancelTimerById, _: &mut Context<Self>) -> Self::Result {
        self.call_sql(move |db, at| portable::timers::cancel_timer(db, at, msg.id))
    }
}

/// Timers per state (`keel status`).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Vec<(String, i64)>, StoreError>")]
pub struct GetTimerCounts;

impl Handler<GetTimerCounts> for PersistenceActor {
    type Result = ResponseFuture<Result<Vec<(String, i64)>, StoreError>>;
    fn handle(&mut self, _: GetTimerCounts, _: &mut Context<Self>) -> Self::Result {
        self.call_sql(|db, _| portable::timers::count_by_state(db))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persistence::sessions;
    use crate::persistence::testing::{at, db};
    use rusqlite::params;

    use crate::persistence::sessions::{commit_exchange, Exchange, ExchangeOutcome, ReplyPlan};

    fn command(c: &Connection, chat: &str, key: &str, effect: Effect) -> ExchangeOutcome {
        commit_exchange(
            c,
            &at(),
            &Exchange {
                session: SessionKey::new("webhook", chat),
                from: "u1".into(),
                key: key.into(),
                text: format!("command {key}"),
                reply: Some(ReplyPlan {
                    text: String::new(),
                    deliver: true,
                }),
                effect: Some(effect),
                ..Default::default()
            },
        )
        .unwrap()
    }

    fn remind(spec: ScheduleSpec) -> Effect {
        Effect::CreateTimer(TimerRequest {
            spec,
            text: "tea".into(),
            misfire: Misfire::FireOnce,
            task: None,
        })
    }

    fn routed() -> HashSet<String> {
        HashSet::from(["webhook".to_string()])
    }

    fn count(c: &Connection, sql: &str) -> i64 {
        c.query_row(sql, [], |r| r.get(0)).unwrap()
    }

    #[test]
    fn a_redelivered_remind_creates_one_timer_and_the_reply_names_it() {
        let c = db();
        command(&c, "c1", "m1", remind(ScheduleSpec::Delay(60_000)));
        let dup = command(&c, "c1", "m1", remind(ScheduleSpec::Delay(60_000)));
        assert!(matches!(dup, ExchangeOutcome::Duplicate { .. }));
        assert_eq!(count(&c, "SELECT COUNT(*) FROM timers"), 1);
        let reply: String = c
            .query_row("SELECT text FROM outbox ORDER BY id LIMIT 1", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert!(reply.starts_with("Reminder #1 set for"), "{reply}");
    }

    #[test]
    fn a_due_instant_fires_exactly_once_with_its_reminder() {
        let c = db();
        command(&c, "c1", "m1", remind(ScheduleSpec::Delay(60_000)));
        let (id, due) = due_window(&c, 10).unwrap()[0];
        let first = fire_timer(&c, id, due, due + 5, &routed()).unwrap();
        assert_eq!(
            (first.fired, first.outbox_rows, first.next_run),
            (1, 1, None)
        );
        let again = fire_timer(&c, id, due, due + 10, &routed()).unwrap();
        assert!(again.stale);
        assert_eq!(count(&c, "SELECT COUNT(*) FROM timer_fires"), 1);
        assert_eq!(
            count(
                &c,
                "SELECT COUNT(*) FROM outbox WHERE text LIKE '⏰ Reminder #1: tea%'"
            ),
            1
        );
        assert_eq!(get_timer(&c, id).unwrap().unwrap().state, "done");
        assert!(due_window(&c, 10).unwrap().is_empty());
    }

    #[test]
    fn an_unknown_callback_kind_parks_the_timer_and_keeps_the_row() {
        let c = db();
        command(&c, "c1", "m1", remind(ScheduleSpec::Delay(60_000)));
        c.execute("UPDATE timers SET callback = 'launch_rockets'", [])
            .unwrap();
        let (id, due) = due_window(&c, 10).unwrap()[0];
        let out = fire_timer(&c, id, due, due, &routed()).unwrap();
        assert!(out.parked);
        let row = get_timer(&c, id).unwrap().unwrap();
        assert_eq!(row.state, "parked");
        assert!(row.error.unwrap().contains("launch_rockets"));
        assert_eq!(count(&c, "SELECT COUNT(*) FROM timer_fires"), 0);
    }

    #[test]
    fn the_window_refill_starts_after_the_cursor() {
        let c = db();
        timers_seed(&c);
        let all = due_window(&c, 10).unwrap();
        assert_eq!(all.len(), 5);
        let (id, next) = all[1];
        let rest = due_window_after(&c, (next, id), 10).unwrap();
        assert_eq!(rest, all[2..].to_vec());
    }

    /// Five active reminders in `webhook:seed`: three due at 1 000 ms, two
    /// at 2 000 and 3 000 ms.
    fn timers_seed(c: &Connection) {
        let session = SessionKey::new("webhook", "seed");
        sessions::ensure_session(c, &session, None, &at().text).unwrap();
        for due in [1_000, 1_000, 1_000, 2_000, 3_000] {
            c.execute(
                "INSERT INTO timers (session_id, kind, schedule, timezone, callback, params_json,
                     misfire, catchup_secs, next_run, state, created_at, updated_at)
                 VALUES (?1, 'once', CAST(?2 AS TEXT), 'UTC', 'reminder', '{\"text\":\"t\"}',
                     'fire_once', 60, ?2, 'active', ?3, ?3)",
                params![session.id, due, at().text],
            )
            .unwrap();
        }
    }

    fn set_callback(c: &Connection, id: i64, kind: &str, params: &str) {
        c.execute(
            "UPDATE timers SET callback = ?2, params_json = ?3 WHERE id = ?1",
            params![id, kind, params],
        )
        .unwrap();
    }

    #[test]
    fn a_state_transition_cancels_another_timer_of_the_same_session_once() {
        let c = db();
        command(&c, "c1", "m1", remind(ScheduleSpec::Every(60_000)));
        command(&c, "c1", "m2", remind(ScheduleSpec::Delay(30_000)));
        command(&c, "c2", "m1", remind(ScheduleSpec::Every(60_000)));
        set_callback(
            &c,
            2,
            "state_transition",
            r#"{"timer_id":1,"to":"cancelled"}"#,
        );
        let due = get_timer(&c, 2).unwrap().unwrap().next_run.unwrap();
        let out = fire_timer(&c, 2, due, due, &routed()).unwrap();
        assert_eq!((out.fired, out.outbox_rows, out.parked), (1, 0, false));
        assert_eq!(get_timer(&c, 1).unwrap().unwrap().state, "cancelled");
        assert_eq!(get_timer(&c, 2).unwrap().unwrap().state, "done");
        assert_eq!(
            count(
                &c,
                "SELECT COUNT(*) FROM turns WHERE content = 'Timer #1 cancelled by timer #2.'"
            ),
            1
        );
        // Another session's timer is out of reach: a recorded no-op.
        command(&c, "c1", "m3", remind(ScheduleSpec::Delay(30_000)));
        set_callback(&c, 4, "state_transition", r#"{"timer_id":3,"to":"parked"}"#);
        let due = get_timer(&c, 4).unwrap().unwrap().next_run.unwrap();
        fire_timer(&c, 4, due, due, &routed()).unwrap();
        assert_eq!(get_timer(&c, 3).unwrap().unwrap().state, "active");
        assert_eq!(
            count(
                &c,
                "SELECT COUNT(*) FROM turns WHERE content LIKE 'Timer #4 found no active timer #3%'"
            ),
            1
        );
    }

    #[test]
    fn a_state_transition_with_bad_params_parks_the_timer() {
        let c = db();
        command(&c, "c1", "m1", remind(ScheduleSpec::Delay(30_000)));
        set_callback(
            &c,
            1,
            "state_transition",
            r#"{"timer_id":1,"to":"exploded"}"#,
        );
        let due = get_timer(&c, 1).unwrap().unwrap().next_run.unwrap();
        assert!(fire_timer(&c, 1, due, due, &routed()).unwrap().parked);
        let row = get_timer(&c, 1).unwrap().unwrap();
        assert!(row.error.unwrap().contains("bad state_transition params"));
    }

    #[test]
    fn a_task_timer_queues_its_task_once_per_due_instant() {
        let c = db();
        crate::persistence::meta::next_boot_epoch(&c).unwrap();
        command(&c, "c1", "m1", remind(ScheduleSpec::Every(60_000)));
        let params = r#"{"name":"backup","args":["--full"]}"#;
        set_callback(&c, 1, "task", params);
        let due = get_timer(&c, 1).unwrap().unwrap().next_run.unwrap();
        let out = fire_timer(&c, 1, due, due, &routed()).unwrap();
        assert_eq!((out.fired, out.tasks_queued, out.parked), (1, 1, false));
        assert!(fire_timer(&c, 1, due, due, &routed()).unwrap().stale);
        let task = super::super::tasks::get_task(&c, 1).unwrap().unwrap();
        assert_eq!(
            (task.name.as_str(), task.state.as_str(), task.args.clone()),
            ("backup", "QUEUED", vec!["--full".to_string()])
        );
        assert_eq!(task.session.as_deref(), Some("webhook:c1"));
        assert_eq!(
            Callback::parse("task", params).unwrap().describe(),
            "task backup"
        );
        // Args that are not a list of strings park the timer, params kept.
        set_callback(&c, 1, "task", r#"{"name":"backup","args":{"full":true}}"#);
        let due = get_timer(&c, 1).unwrap().unwrap().next_run.unwrap();
        assert!(fire_timer(&c, 1, due, due, &routed()).unwrap().parked);
        assert_eq!(count(&c, "SELECT COUNT(*) FROM tasks"), 1);
    }

    #[test]
    fn cancel_only_touches_the_sessions_own_timers() {
        let c = db();
        command(&c, "c1", "m1", remind(ScheduleSpec::Every(60_000)));
        command(&c, "c2", "m1", Effect::CancelTimer(1));
        assert_eq!(get_timer(&c, 1).unwrap().unwrap().state, "active");
        command(&c, "c1", "m2", Effect::CancelTimer(1));
        assert_eq!(get_timer(&c, 1).unwrap().unwrap().state, "cancelled");
        assert!(due_window(&c, 10).unwrap().is_empty());
    }

    #[test]
    fn timezone_is_stored_on_the_principal_and_used_by_new_timers() {
        let c = db();
        command(&c, "c1", "m1", Effect::SetTimezone("Europe/Berlin".into()));
        command(
            &c,
            "c1",
            "m2",
            remind(ScheduleSpec::Cron("0 9 * * *".into())),
        );
        let row = get_timer(&c, 1).unwrap().unwrap();
        assert_eq!(row.timezone, "Europe/Berlin");
        let local = show_instant(row.next_run.unwrap(), Tz::Europe__Berlin);
        assert!(local.contains(" 09:00:00 "), "{local}");
    }

    #[test]
    fn pruning_removes_old_history_but_not_active_timers() {
        let c = db();
        command(&c, "c1", "m1", remind(ScheduleSpec::Delay(60_000)));
        command(&c, "c1", "m2", remind(ScheduleSpec::Every(60_000)));
        let (id, due) = due_window(&c, 10).unwrap()[0];
        fire_timer(&c, id, due, due, &routed()).unwrap();
        let (timers, receipts) = prune(&c, "9999-01-01T00:00:00Z", i64::MAX, 100).unwrap();
        assert_eq!((timers, receipts), (1, 1));
        assert_eq!(
            count(&c, "SELECT COUNT(*) FROM timers WHERE state = 'active'"),
            1
        );
    }
}
