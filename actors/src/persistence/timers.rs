//! Timer SQL (R7–R11): creating, cancelling, listing and firing timers, the
//! timer actor's window query and the retention job. Like `store.rs`: one
//! documented function per unit of work, bound parameters, cached statements,
//! run inside the writer's transaction.
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
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::sessions::{self, SessionKey};
use super::PersistenceActor;
use crate::clock::Stamp;
use crate::error::StoreError;
use crate::schedule::plan::{plan_fire, Misfire, LATE_AFTER_MS};
use crate::schedule::{first_run, parse_tz, Schedule, ScheduleSpec};

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

const TIMER_COLUMNS: &str = "SELECT id, session_id, kind, schedule, timezone, callback, params_json,
        misfire, next_run, last_fired, fired_count, missed_count, state, error, created_at, updated_at
     FROM timers";

fn timer_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TimerRow> {
    Ok(TimerRow {
        id: r.get(0)?,
        session_id: r.get(1)?,
        kind: r.get(2)?,
        schedule: r.get(3)?,
        timezone: r.get(4)?,
        callback: r.get(5)?,
        params_json: r.get(6)?,
        misfire: r.get(7)?,
        next_run: r.get(8)?,
        last_fired: r.get(9)?,
        fired_count: r.get(10)?,
        missed_count: r.get(11)?,
        state: r.get(12)?,
        error: r.get(13)?,
        created_at: r.get(14)?,
        updated_at: r.get(15)?,
    })
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

fn principal_timezone(conn: &Connection, principal: &str) -> Result<Option<String>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT timezone FROM principals WHERE id = ?1")?
        .query_row([principal], |r| r.get::<_, Option<String>>(0))
        .optional()?
        .flatten())
}

/// Run a command's effect; returns the reply text. Errors the participant
/// can fix (past instant, never-firing schedule) are replies, not failures.
pub fn apply_effect(
    conn: &Connection,
    stamp: &Stamp,
    session: &SessionKey,
    principal: &str,
    effect: &Effect,
) -> Result<String, StoreError> {
    let (at, now_ms) = (&stamp.text, stamp.ms);
    match effect {
        Effect::SetTimezone(name) => {
            conn.prepare_cached("UPDATE principals SET timezone = ?2 WHERE id = ?1")?
                .execute(params![principal, name])?;
            Ok(format!(
                "Timezone set to {name}. New reminders use it; existing ones keep theirs."
            ))
        }
        Effect::CreateTimer(req) => {
            let zone = principal_timezone(conn, principal)?.unwrap_or_else(|| "UTC".into());
            let tz = parse_tz(&zone).unwrap_or(Tz::UTC);
            let (schedule, next) = match first_run(&req.spec, tz, now_ms) {
                Ok(v) => v,
                Err(e) => return Ok(format!("Cannot set that reminder: {e}.")),
            };
            let active: i64 = conn
                .prepare_cached(
                    "SELECT COUNT(*) FROM timers WHERE session_id = ?1 AND state = 'active'",
                )?
                .query_row([&session.id], |r| r.get(0))?;
            if active >= MAX_ACTIVE_PER_SESSION {
                return Ok(format!(
                    "Cannot set that reminder: this chat already has {MAX_ACTIVE_PER_SESSION} active timers."
                ));
            }
            let schedule_text = match &schedule {
                Schedule::Once => next.to_string(),
                Schedule::Cron(e) => e.clone(),
                Schedule::Interval(ms) => ms.to_string(),
            };
            let (callback, params_json) = match &req.task {
                Some(task) => ("task", serde_json::to_string(task)),
                None => (
                    "reminder",
                    serde_json::to_string(&ReminderParams {
                        text: req.text.clone(),
                    }),
                ),
            };
            let params_json = params_json.map_err(|e| StoreError::Invalid(e.to_string()))?;
            conn.prepare_cached(
                "INSERT INTO timers (session_id, principal_id, kind, schedule, timezone, callback,
                     params_json, misfire, catchup_secs, next_run, state, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?11, ?6, ?7, ?8, ?9, 'active', ?10, ?10)",
            )?
            .execute(params![
                session.id,
                principal,
                schedule.kind(),
                schedule_text,
                zone,
                params_json,
                req.misfire.as_str(),
                DEFAULT_CATCHUP_SECS,
                next,
                at,
                callback
            ])?;
            let id = conn.last_insert_rowid();
            let runs = req
                .task
                .as_ref()
                .map(|t| format!(" It runs task {}.", t.name))
                .unwrap_or_default();
            Ok(format!(
                "Reminder #{id} set for {} ({zone}).{runs} /cancel {id} to remove it.",
                show_instant(next, tz)
            ))
        }
        Effect::CancelTimer(id) => {
            let n = conn
                .prepare_cached(
                    "UPDATE timers SET state = 'cancelled', next_run = NULL, updated_at = ?3
                     WHERE id = ?1 AND session_id = ?2 AND state IN ('active', 'parked')",
                )?
                .execute(params![id, session.id, at])?;
            Ok(if n == 1 {
                format!("Timer #{id} cancelled.")
            } else {
                format!("No active timer #{id} in this chat. Send /timers for the list.")
            })
        }
        Effect::ListTimers => {
            let rows = session_timers(conn, &session.id, 50)?;
            if rows.is_empty() {
                return Ok("No active timers. Set one with /remind in 10m TEXT".into());
            }
            let lines: Vec<String> = rows
                .iter()
                .map(|t| {
                    let tz = parse_tz(&t.timezone).unwrap_or(Tz::UTC);
                    let text = Callback::parse(&t.callback, &t.params_json)
                        .map(|c| c.describe())
                        .unwrap_or_default();
                    let when = t
                        .next_run
                        .map(|n| show_instant(n, tz))
                        .unwrap_or_else(|| t.state.clone());
                    let every = match t.kind.as_str() {
                        "cron" => format!(" (cron {})", t.schedule),
                        "interval" => format!(
                            " (every {}s)",
                            t.schedule.parse::<i64>().unwrap_or(0) / 1000
                        ),
                        _ => String::new(),
                    };
                    format!("#{} {when}{every}: {}", t.id, truncate(&text, 80))
                })
                .collect();
            Ok(lines.join("\n"))
        }
        Effect::Task(t) => super::tasks::apply_effect(conn, stamp, session, t),
    }
}

fn truncate(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// Active and parked timers of one session, soonest first.
pub fn session_timers(
    conn: &Connection,
    session_id: &str,
    limit: i64,
) -> Result<Vec<TimerRow>, StoreError> {
    let sql = format!(
        "{TIMER_COLUMNS} WHERE session_id = ?1 AND state IN ('active', 'parked')
         ORDER BY next_run IS NULL, next_run, id LIMIT ?2"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt
        .query_map(params![session_id, limit], timer_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Every timer, newest first (operator listing), at most `limit`.
pub fn list_timers(conn: &Connection, limit: i64) -> Result<Vec<TimerRow>, StoreError> {
    let sql = format!("{TIMER_COLUMNS} ORDER BY id DESC LIMIT ?1");
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt
        .query_map([limit], timer_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// One timer by id.
pub fn get_timer(conn: &Connection, id: i64) -> Result<Option<TimerRow>, StoreError> {
    let sql = format!("{TIMER_COLUMNS} WHERE id = ?1");
    Ok(conn
        .prepare_cached(&sql)?
        .query_row([id], timer_row)
        .optional()?)
}

/// Cancel any timer (operator). Returns whether it was active or parked.
pub fn cancel_timer(conn: &Connection, at: &Stamp, id: i64) -> Result<bool, StoreError> {
    let n = conn
        .prepare_cached(
            "UPDATE timers SET state = 'cancelled', next_run = NULL, updated_at = ?2
             WHERE id = ?1 AND state IN ('active', 'parked')",
        )?
        .execute(params![id, at.text])?;
    Ok(n == 1)
}

/// The earliest due active timers: `(id, next_run)`, at most `limit`, from
/// the partial index. The timer actor's window.
pub fn due_window(conn: &Connection, limit: i64) -> Result<Vec<(i64, i64)>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, next_run FROM timers WHERE state = 'active' AND next_run IS NOT NULL
         ORDER BY next_run, id LIMIT ?1",
    )?;
    let rows = stmt
        .query_map([limit], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Like [`due_window`], but only entries after `(next_run, id)` = `after`
/// (keyset order on the same index): the timer actor refills its window
/// this way while fires it already took are still being committed.
pub fn due_window_after(
    conn: &Connection,
    after: (i64, i64),
    limit: i64,
) -> Result<Vec<(i64, i64)>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, next_run FROM timers WHERE state = 'active' AND next_run IS NOT NULL
             AND (next_run, id) > (?1, ?2)
         ORDER BY next_run, id LIMIT ?3",
    )?;
    let rows = stmt
        .query_map(params![after.0, after.1, limit], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
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

fn park(conn: &Connection, at: &str, id: i64, error: &str) -> Result<FireOutcome, StoreError> {
    conn.prepare_cached(
        "UPDATE timers SET state = 'parked', next_run = NULL, error = ?2, updated_at = ?3 WHERE id = ?1",
    )?
    .execute(params![id, error, at])?;
    tracing::warn!(timer = id, %error, "timer parked");
    Ok(FireOutcome {
        parked: true,
        ..FireOutcome::default()
    })
}

/// What `fire_timer` reads about one timer and its session.
struct DueRow {
    state: String,
    kind: String,
    schedule: String,
    zone: String,
    callback: String,
    params_json: String,
    misfire: String,
    catchup_secs: i64,
    next_run: Option<i64>,
    session: SessionKey,
}

/// Fire timer `id`, expected due at `due`, at `now_ms` — ONE unit of work:
/// the receipt `(id, due instant)` (a receipt that exists already means the
/// instant fired: nothing happens), the callback's effect (a reminder turn +
/// outbox row) and the timer's next state. `routed`: channels with a
/// delivery route.
pub fn fire_timer(
    conn: &Connection,
    id: i64,
    due: i64,
    now_ms: i64,
    routed: &HashSet<String>,
) -> Result<FireOutcome, StoreError> {
    // `now_ms` comes from the timer actor's injected clock.
    let at = Stamp::from_ms(now_ms);
    let row: Option<DueRow> = conn
        .prepare_cached(
            "SELECT t.state, t.kind, t.schedule, t.timezone, t.callback, t.params_json, t.misfire,
                    t.catchup_secs, t.next_run, s.id, s.channel, s.chat
             FROM timers t JOIN sessions s ON s.id = t.session_id WHERE t.id = ?1",
        )?
        .query_row([id], |r| {
            Ok(DueRow {
                state: r.get(0)?,
                kind: r.get(1)?,
                schedule: r.get(2)?,
                zone: r.get(3)?,
                callback: r.get(4)?,
                params_json: r.get(5)?,
                misfire: r.get(6)?,
                catchup_secs: r.get(7)?,
                next_run: r.get(8)?,
                session: SessionKey {
                    id: r.get(9)?,
                    channel: r.get(10)?,
                    chat: r.get(11)?,
                },
            })
        })
        .optional()?;
    let stale = FireOutcome {
        stale: true,
        ..FireOutcome::default()
    };
    let Some(DueRow {
        state,
        kind,
        schedule,
        zone,
        callback,
        params_json,
        misfire,
        catchup_secs: catchup,
        next_run: next,
        session,
    }) = row
    else {
        return Ok(stale);
    };
    if state != "active" || next != Some(due) {
        return Ok(stale);
    }
    let tz = match parse_tz(&zone) {
        Ok(tz) => tz,
        Err(e) => return park(conn, &at.text, id, &e.to_string()),
    };
    let schedule = match Schedule::from_row(&kind, &schedule) {
        Ok(s) => s,
        Err(e) => return park(conn, &at.text, id, &e.to_string()),
    };
    let callback = match Callback::parse(&callback, &params_json) {
        Ok(c) => c,
        Err(e) => return park(conn, &at.text, id, &e),
    };
    let task_args = match &callback {
        Callback::Task(p) => match p.argv() {
            Ok(args) => args,
            Err(e) => return park(conn, &at.text, id, &e),
        },
        _ => Vec::new(),
    };
    let policy = Misfire::parse(&misfire).unwrap_or(Misfire::FireOnce);
    let plan = match plan_fire(
        &schedule,
        tz,
        policy,
        catchup.saturating_mul(1000),
        due,
        now_ms,
    ) {
        Ok(p) => p,
        Err(e) => return park(conn, &at.text, id, &e.to_string()),
    };
    let mut out = FireOutcome {
        missed: plan.missed,
        next_run: plan.next,
        ..FireOutcome::default()
    };
    for &instant in &plan.fires {
        let late_ms = (now_ms - instant).max(0);
        let inserted = conn
            .prepare_cached(
                "INSERT OR IGNORE INTO timer_fires (timer_id, due_at, fired_at, late_ms)
                 VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![id, instant, now_ms, late_ms])?;
        if inserted == 0 {
            continue;
        }
        out.fired += 1;
        if late_ms > LATE_AFTER_MS {
            out.late += 1;
        }
        match &callback {
            Callback::Reminder(p) => {
                let mut text = format!("⏰ Reminder #{id}: {}", p.text);
                if late_ms > LATE_AFTER_MS {
                    text.push_str(&format!(
                        " (late by {}s: keel was not running at {})",
                        late_ms / 1000,
                        show_instant(instant, tz)
                    ));
                }
                let deliver = routed.contains(&session.channel);
                let (_, outbox) = sessions::commit_notice(conn, &at, &session, &text, deliver)?;
                out.outbox_rows += i64::from(outbox.is_some());
            }
            Callback::StateTransition(p) => {
                let moved = transition_timer(conn, &at.text, &session.id, id, p)?;
                let text = if moved {
                    format!("Timer #{} {} by timer #{id}.", p.timer_id, p.to.as_str())
                } else {
                    format!(
                        "Timer #{id} found no active timer #{} in this chat to set {}.",
                        p.timer_id,
                        p.to.as_str()
                    )
                };
                sessions::commit_notice(conn, &at, &session, &text, false)?;
            }
            Callback::Task(p) => {
                let task = super::tasks::create_task(
                    conn,
                    &at.text,
                    &super::tasks::NewTask {
                        name: p.name.clone(),
                        args: task_args.clone(),
                        session_id: Some(session.id.clone()),
                        origin: super::tasks::Origin::Timer,
                    },
                )?;
                out.tasks_queued += 1;
                let text = format!("Timer #{id} started task {task} ({}).", p.name);
                sessions::commit_notice(conn, &at, &session, &text, false)?;
            }
        }
    }
    let last = plan.fires.last().copied();
    conn.prepare_cached(
        "UPDATE timers SET next_run = ?2, state = ?3, last_fired = COALESCE(?4, last_fired),
                fired_count = fired_count + ?5, missed_count = missed_count + ?6, updated_at = ?7
         WHERE id = ?1",
    )?
    .execute(params![
        id,
        plan.next,
        if plan.next.is_some() {
            "active"
        } else {
            "done"
        },
        last,
        out.fired,
        out.missed,
        at.text
    ])?;
    Ok(out)
}

/// `state_transition`: move timer `p.timer_id` of session `session_id`
/// (not `by` itself) from active/parked to `p.to`. Returns whether it moved.
fn transition_timer(
    conn: &Connection,
    at: &str,
    session_id: &str,
    by: i64,
    p: &StateTransitionParams,
) -> Result<bool, StoreError> {
    let note = format!("set {} by timer #{by}", p.to.as_str());
    let n = conn
        .prepare_cached(
            "UPDATE timers SET state = ?3, next_run = NULL,
                 error = CASE WHEN ?3 = 'parked' THEN ?4 ELSE error END, updated_at = ?5
             WHERE id = ?1 AND session_id = ?2 AND id != ?6 AND state IN ('active', 'parked')",
        )?
        .execute(params![p.timer_id, session_id, p.to.as_str(), note, at, by])?;
    Ok(n == 1)
}

/// Fire several due timers in the writer's transaction, each in its own
/// savepoint: a timer whose fire fails is rolled back alone (it stays due),
/// the others commit together. Storage failure (`Unavailable`) fails all.
pub fn fire_timers(
    conn: &Connection,
    fires: &[(i64, i64)],
    now_ms: i64,
    routed: &HashSet<String>,
) -> Result<Vec<Result<FireOutcome, StoreError>>, StoreError> {
    let mut out = Vec::with_capacity(fires.len());
    for &(id, due) in fires {
        conn.prepare_cached("SAVEPOINT fire")?.execute([])?;
        match fire_timer(conn, id, due, now_ms, routed) {
            Ok(o) => {
                crate::failpoint::hit("timer_fire");
                conn.prepare_cached("RELEASE fire")?.execute([])?;
                out.push(Ok(o));
            }
            Err(StoreError::Unavailable(reason)) => return Err(StoreError::Unavailable(reason)),
            Err(e) => {
                conn.prepare_cached("ROLLBACK TO fire")?.execute([])?;
                conn.prepare_cached("RELEASE fire")?.execute([])?;
                out.push(Err(e));
            }
        }
    }
    Ok(out)
}

/// Delete done/cancelled timers last changed before `before` (RFC 3339) and
/// receipts fired before `before_ms`. Returns (timers, receipts) deleted.
/// A receipt is consulted only while its timer's `next_run` is at or before
/// the receipt's instant, which ends with the commit that wrote it; old
/// receipts are kept for operators and the tests, then pruned.
pub fn prune(
    conn: &Connection,
    before: &str,
    before_ms: i64,
    limit: i64,
) -> Result<(usize, usize), StoreError> {
    let timers = conn
        .prepare_cached(
            "DELETE FROM timers WHERE id IN (
                 SELECT id FROM timers WHERE state IN ('done', 'cancelled') AND updated_at < ?1
                 LIMIT ?2)",
        )?
        .execute(params![before, limit])?;
    let receipts = conn
        .prepare_cached(
            "DELETE FROM timer_fires WHERE (timer_id, due_at) IN (
                 SELECT timer_id, due_at FROM timer_fires WHERE fired_at < ?1 LIMIT ?2)",
        )?
        .execute(params![before_ms, limit])?;
    Ok((timers, receipts))
}

/// Active, parked, done and cancelled timers: `(state, count)`, for
/// `keel status`. A scan of the table: on demand only, never at start.
pub fn count_by_state(conn: &Connection) -> Result<Vec<(String, i64)>, StoreError> {
    let mut stmt =
        conn.prepare_cached("SELECT state, COUNT(*) FROM timers GROUP BY state ORDER BY state")?;
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Active timers, counted through the `timers_due` partial index (about
/// 20 ms of CPU per million): `/metrics`, not the hot path.
pub fn count_active(conn: &Connection) -> Result<i64, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT COUNT(*) FROM timers WHERE state = 'active' AND next_run IS NOT NULL",
        )?
        .query_row([], |r| r.get(0))?)
}

// ---- messages to the PersistenceActor ----

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
        self.call(move |c, _| match msg.after {
            None => due_window(c, msg.limit),
            Some(after) => due_window_after(c, after, msg.limit),
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
        self.call(move |c, _| fire_timer(c, msg.id, msg.due, msg.now_ms, &msg.routed))
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
        self.call(move |c, _| fire_timers(c, &msg.fires, msg.now_ms, &msg.routed))
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
        self.call(move |c, _| prune(c, &msg.before, msg.before_ms, msg.limit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persistence::testing::{at, db};

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
