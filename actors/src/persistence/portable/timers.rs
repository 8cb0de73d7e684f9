//! Timers in portable SQL (R7–R11, R37, R49): the chat commands that create,
//! cancel and list them, the operator's reads, the timer actor's window,
//! firing one due instant, pruning — one code on both backends (the SQLite
//! functions of `persistence::timers` are thin wrappers over these).
//!
//! Firing, on PostgreSQL, reads the timer `FOR UPDATE OF t`: a second
//! instance firing the same timer waits for the first's COMMIT, then sees
//! it moved on (stale). The per-instant receipt (`timer_fires`, primary key
//! (timer, due)) is inserted with `ON CONFLICT DO NOTHING` — a due instant
//! someone already fired inserts nothing and is skipped — and the timer
//! moves to its next instant, all in one COMMIT. `claim_and_fire` does the
//! same for several instances polling for due rows, reading them with
//! `FOR UPDATE OF t SKIP LOCKED` (an instance skips what another is firing
//! right now instead of waiting for it). On SQLite the single writer makes
//! the same statements safe without the lock clauses.

use std::collections::HashSet;

use chrono_tz::Tz;

use crate::clock::Stamp;
use crate::error::StoreError;
use crate::persistence::portable::sessions::commit_notice;
use crate::persistence::sessions::SessionKey;
use crate::persistence::sql::{Backend, Row, Sql};
use crate::persistence::timers::{
    show_instant, Callback, Effect, FireOutcome, ReminderParams, StateTransitionParams, TimerRow,
    DEFAULT_CATCHUP_SECS, MAX_ACTIVE_PER_SESSION,
};
use crate::schedule::plan::{plan_fire, Misfire, LATE_AFTER_MS};
use crate::schedule::{first_run, parse_tz, Schedule};
use crate::vals;

const TIMER_COLUMNS: &str = "SELECT id, session_id, kind, schedule, timezone, callback, params_json,
        misfire, next_run, last_fired, fired_count, missed_count, state, error, created_at, updated_at
     FROM timers";

fn timer_row(r: &Row) -> Result<TimerRow, StoreError> {
    Ok(TimerRow {
        id: r.int(0)?,
        session_id: r.text(1)?,
        kind: r.text(2)?,
        schedule: r.text(3)?,
        timezone: r.text(4)?,
        callback: r.text(5)?,
        params_json: r.text(6)?,
        misfire: r.text(7)?,
        next_run: r.opt_int(8)?,
        last_fired: r.opt_int(9)?,
        fired_count: r.int(10)?,
        missed_count: r.int(11)?,
        state: r.text(12)?,
        error: r.opt_text(13)?,
        created_at: r.text(14)?,
        updated_at: r.text(15)?,
    })
}

fn timer_rows(rows: Vec<Row>) -> Result<Vec<TimerRow>, StoreError> {
    rows.iter().map(timer_row).collect()
}

fn principal_timezone(db: &mut dyn Sql, principal: &str) -> Result<Option<String>, StoreError> {
    Ok(db
        .row(
            "SELECT timezone FROM principals WHERE id = $1",
            vals![principal],
        )?
        .map(|r| r.opt_text(0))
        .transpose()?
        .flatten())
}

/// Run a command's timer effect; returns the reply text (see
/// `persistence::timers::apply_effect`). Errors the participant can fix
/// (past instant, never-firing schedule) are replies, not failures.
/// `Effect::Task` needs the task store, which is not portable yet: refused.
pub fn apply_effect(
    db: &mut dyn Sql,
    stamp: &Stamp,
    session: &SessionKey,
    principal: &str,
    effect: &Effect,
) -> Result<String, StoreError> {
    let (at, now_ms) = (&stamp.text, stamp.ms);
    match effect {
        Effect::SetTimezone(name) => {
            db.exec(
                "UPDATE principals SET timezone = $2 WHERE id = $1",
                vals![principal, name],
            )?;
            Ok(format!(
                "Timezone set to {name}. New reminders use it; existing ones keep theirs."
            ))
        }
        Effect::CreateTimer(req) => {
            let zone = principal_timezone(db, principal)?.unwrap_or_else(|| "UTC".into());
            let tz = parse_tz(&zone).unwrap_or(Tz::UTC);
            let (schedule, next) = match first_run(&req.spec, tz, now_ms) {
                Ok(v) => v,
                Err(e) => return Ok(format!("Cannot set that reminder: {e}.")),
            };
            let active = db
                .row(
                    "SELECT COUNT(*) FROM timers WHERE session_id = $1 AND state = 'active'",
                    vals![&session.id],
                )?
                .map(|r| r.int(0))
                .transpose()?
                .unwrap_or(0);
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
            let id = db
                .row(
                    "INSERT INTO timers (session_id, principal_id, kind, schedule, timezone,
                         callback, params_json, misfire, catchup_secs, next_run, state,
                         created_at, updated_at)
                     VALUES ($1, $2, $3, $4, $5, $11, $6, $7, $8, $9, 'active', $10, $10)
                     RETURNING id",
                    vals![
                        &session.id,
                        principal,
                        schedule.kind(),
                        schedule_text,
                        &zone,
                        params_json,
                        req.misfire.as_str(),
                        DEFAULT_CATCHUP_SECS,
                        next,
                        at,
                        callback
                    ],
                )?
                .ok_or_else(|| StoreError::Invalid("timer insert returned no id".into()))?
                .int(0)?;
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
            let n = db.exec(
                "UPDATE timers SET state = 'cancelled', next_run = NULL, updated_at = $3
                 WHERE id = $1 AND session_id = $2 AND state IN ('active', 'parked')",
                vals![*id, &session.id, at],
            )?;
            Ok(if n == 1 {
                format!("Timer #{id} cancelled.")
            } else {
                format!("No active timer #{id} in this chat. Send /timers for the list.")
            })
        }
        Effect::ListTimers => {
            let rows = session_timers(db, &session.id, 50)?;
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
        Effect::Task(t) => super::tasks::apply_effect(db, stamp, session, t),
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
    db: &mut dyn Sql,
    session_id: &str,
    limit: i64,
) -> Result<Vec<TimerRow>, StoreError> {
    let sql = format!(
        "{TIMER_COLUMNS} WHERE session_id = $1 AND state IN ('active', 'parked')
         ORDER BY next_run IS NULL, next_run, id LIMIT $2"
    );
    timer_rows(db.rows(&sql, vals![session_id, limit])?)
}

/// Every timer, newest first (operator listing), at most `limit`.
pub fn list_timers(db: &mut dyn Sql, limit: i64) -> Result<Vec<TimerRow>, StoreError> {
    let sql = format!("{TIMER_COLUMNS} ORDER BY id DESC LIMIT $1");
    timer_rows(db.rows(&sql, vals![limit])?)
}

/// One timer by id.
pub fn get_timer(db: &mut dyn Sql, id: i64) -> Result<Option<TimerRow>, StoreError> {
    let sql = format!("{TIMER_COLUMNS} WHERE id = $1");
    db.row(&sql, vals![id])?.as_ref().map(timer_row).transpose()
}

/// Cancel any timer (operator). Returns whether it was active or parked.
pub fn cancel_timer(db: &mut dyn Sql, at: &Stamp, id: i64) -> Result<bool, StoreError> {
    let n = db.exec(
        "UPDATE timers SET state = 'cancelled', next_run = NULL, updated_at = $2
         WHERE id = $1 AND state IN ('active', 'parked')",
        vals![id, &at.text],
    )?;
    Ok(n == 1)
}

/// Why timers of an unreachable chat are parked: resumed by
/// [`resume_session`].
pub const PAUSED: &str = "paused: ";

/// Park the active timers of an unreachable chat, keeping `next_run`
/// (resuming continues from there), with the error `paused: <reason>`.
pub fn pause_session(
    db: &mut dyn Sql,
    session_id: &str,
    reason: &str,
    at: &str,
) -> Result<u64, StoreError> {
    db.exec(
        "UPDATE timers SET state = 'parked', error = $2, updated_at = $3
         WHERE session_id = $1 AND state = 'active'",
        vals![session_id, format!("{PAUSED}{reason}"), at],
    )
}

/// Resume the timers [`pause_session`] parked (a timer parked for its own
/// reason stays parked).
pub fn resume_session(db: &mut dyn Sql, session_id: &str, at: &str) -> Result<u64, StoreError> {
    db.exec(
        // CAST: PostgreSQL cannot pick a `length` for an untyped parameter.
        "UPDATE timers SET state = 'active', error = NULL, updated_at = $3
         WHERE session_id = $1 AND state = 'parked' AND next_run IS NOT NULL
           AND substr(error, 1, length(CAST($2 AS TEXT))) = $2",
        vals![session_id, PAUSED, at],
    )
}

/// The earliest due active timers: `(id, next_run)`, at most `limit`, from
/// the partial index. The timer actor's window.
pub fn due_window(db: &mut dyn Sql, limit: i64) -> Result<Vec<(i64, i64)>, StoreError> {
    db.rows(
        "SELECT id, next_run FROM timers WHERE state = 'active' AND next_run IS NOT NULL
         ORDER BY next_run, id LIMIT $1",
        vals![limit],
    )?
    .iter()
    .map(|r| Ok((r.int(0)?, r.int(1)?)))
    .collect()
}

/// Like [`due_window`], but only entries after `(next_run, id)` = `after`
/// (keyset order on the same index): the timer actor refills its window
/// this way while fires it already took are still being committed.
pub fn due_window_after(
    db: &mut dyn Sql,
    after: (i64, i64),
    limit: i64,
) -> Result<Vec<(i64, i64)>, StoreError> {
    db.rows(
        "SELECT id, next_run FROM timers WHERE state = 'active' AND next_run IS NOT NULL
             AND (next_run, id) > ($1, $2)
         ORDER BY next_run, id LIMIT $3",
        vals![after.0, after.1, limit],
    )?
    .iter()
    .map(|r| Ok((r.int(0)?, r.int(1)?)))
    .collect()
}

fn park(db: &mut dyn Sql, at: &str, id: i64, error: &str) -> Result<FireOutcome, StoreError> {
    db.exec(
        "UPDATE timers SET state = 'parked', next_run = NULL, error = $2, updated_at = $3
         WHERE id = $1",
        vals![id, error, at],
    )?;
    tracing::warn!(timer = id, %error, "timer parked");
    Ok(FireOutcome {
        parked: true,
        ..FireOutcome::default()
    })
}

/// Queues a `task` callback's task inside the fire's transaction:
/// Fire timer `id`, expected due at `due`, at `now_ms` — ONE unit of work:
/// the receipt `(id, due instant)` (a receipt that exists already means the
/// instant fired: nothing happens), the callback's effect (a reminder turn +
/// outbox row, a state transition, a queued task) and the timer's next
/// state. `routed`: channels with a delivery route. `fired_by`: the
/// instance, recorded in the receipt.
pub fn fire_timer(
    db: &mut dyn Sql,
    id: i64,
    due: i64,
    now_ms: i64,
    routed: &HashSet<String>,
    fired_by: Option<&str>,
) -> Result<FireOutcome, StoreError> {
    // `now_ms` comes from the timer actor's injected clock.
    let at = Stamp::from_ms(now_ms);
    let lock = match db.backend() {
        Backend::Sqlite => "",
        Backend::Postgres => " FOR UPDATE OF t",
    };
    let sql = format!(
        "SELECT t.state, t.kind, t.schedule, t.timezone, t.callback, t.params_json, t.misfire,
                t.catchup_secs, t.next_run, s.id, s.channel, s.chat
         FROM timers t JOIN sessions s ON s.id = t.session_id WHERE t.id = $1{lock}"
    );
    let stale = FireOutcome {
        stale: true,
        ..FireOutcome::default()
    };
    let Some(r) = db.row(&sql, vals![id])? else {
        return Ok(stale);
    };
    if r.text(0)? != "active" || r.opt_int(8)? != Some(due) {
        return Ok(stale);
    }
    let session = SessionKey {
        id: r.text(9)?,
        channel: r.text(10)?,
        chat: r.text(11)?,
    };
    let tz = match parse_tz(&r.text(3)?) {
        Ok(tz) => tz,
        Err(e) => return park(db, &at.text, id, &e.to_string()),
    };
    let schedule = match Schedule::from_row(&r.text(1)?, &r.text(2)?) {
        Ok(s) => s,
        Err(e) => return park(db, &at.text, id, &e.to_string()),
    };
    let callback = match Callback::parse(&r.text(4)?, &r.text(5)?) {
        Ok(c) => c,
        Err(e) => return park(db, &at.text, id, &e),
    };
    let task_args = match &callback {
        Callback::Task(p) => match p.argv() {
            Ok(args) => args,
            Err(e) => return park(db, &at.text, id, &e),
        },
        _ => Vec::new(),
    };
    let policy = Misfire::parse(&r.text(6)?).unwrap_or(Misfire::FireOnce);
    let catchup = r.int(7)?;
    let plan = match plan_fire(
        &schedule,
        tz,
        policy,
        catchup.saturating_mul(1000),
        due,
        now_ms,
    ) {
        Ok(p) => p,
        Err(e) => return park(db, &at.text, id, &e.to_string()),
    };
    let mut out = FireOutcome {
        missed: plan.missed,
        next_run: plan.next,
        ..FireOutcome::default()
    };
    for &instant in &plan.fires {
        let late_ms = (now_ms - instant).max(0);
        let inserted = db.exec(
            "INSERT INTO timer_fires (timer_id, due_at, fired_at, late_ms, fired_by)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (timer_id, due_at) DO NOTHING",
            vals![id, instant, now_ms, late_ms, fired_by],
        )?;
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
                let (_, outbox) = commit_notice(db, &at, &session, &text, deliver)?;
                out.outbox_rows += i64::from(outbox.is_some());
            }
            Callback::StateTransition(p) => {
                let moved = transition_timer(db, &at.text, &session.id, id, p)?;
                let text = if moved {
                    format!("Timer #{} {} by timer #{id}.", p.timer_id, p.to.as_str())
                } else {
                    format!(
                        "Timer #{id} found no active timer #{} in this chat to set {}.",
                        p.timer_id,
                        p.to.as_str()
                    )
                };
                commit_notice(db, &at, &session, &text, false)?;
            }
            Callback::Task(p) => {
                let task = super::tasks::create_task(
                    db,
                    &at.text,
                    &crate::persistence::tasks::NewTask {
                        name: p.name.clone(),
                        args: task_args.clone(),
                        session_id: Some(session.id.clone()),
                        origin: crate::persistence::tasks::Origin::Timer,
                    },
                )?;
                out.tasks_queued += 1;
                let text = format!("Timer #{id} started task {task} ({}).", p.name);
                commit_notice(db, &at, &session, &text, false)?;
            }
        }
    }
    let last = plan.fires.last().copied();
    let state = if plan.next.is_some() {
        "active"
    } else {
        "done"
    };
    db.exec(
        // CAST: PostgreSQL cannot infer the type of a parameter seen only
        // as COALESCE's argument or a NULL.
        "UPDATE timers SET next_run = CAST($2 AS BIGINT), state = $3,
                last_fired = COALESCE(CAST($4 AS BIGINT), last_fired),
                fired_count = fired_count + $5, missed_count = missed_count + $6, updated_at = $7
         WHERE id = $1",
        vals![id, plan.next, state, last, out.fired, out.missed, &at.text],
    )?;
    Ok(out)
}

/// `state_transition`: move timer `p.timer_id` of session `session_id`
/// (not `by` itself) from active/parked to `p.to`. Returns whether it moved.
fn transition_timer(
    db: &mut dyn Sql,
    at: &str,
    session_id: &str,
    by: i64,
    p: &StateTransitionParams,
) -> Result<bool, StoreError> {
    let note = format!("set {} by timer #{by}", p.to.as_str());
    let n = db.exec(
        "UPDATE timers SET state = $3, next_run = NULL,
             error = CASE WHEN $3 = 'parked' THEN $4 ELSE error END, updated_at = $5
         WHERE id = $1 AND session_id = $2 AND id != $6 AND state IN ('active', 'parked')",
        vals![p.timer_id, session_id, p.to.as_str(), note, at, by],
    )?;
    Ok(n == 1)
}

/// Fire several due timers in the writer's transaction, each in its own
/// savepoint: a timer whose fire fails is rolled back alone (it stays due),
/// the others commit together. Storage failure (`Unavailable`) fails all,
/// and so does a lost deadlock (`Contended`: the writer runs the whole job
/// again in its next transaction).
///
/// On PostgreSQL the fire waits at most [`FIRE_LOCK_TIMEOUT`] for a row lock
/// (`lock_timeout`, `SET LOCAL`, undone with the job's savepoint if it fails):
/// a fire locks its timer and then its conversation, while another
/// instance's batch may hold that conversation and wait for a conversation
/// of this batch. PostgreSQL would break that cycle only after
/// `deadlock_timeout` (1 s by default, settable by superusers only), and
/// two in a row made reminders fire 2.8 s late; a fire that waits too long
/// is `Contended` instead and runs again in the next transaction, after
/// this one released its locks.
pub fn fire_timers(
    db: &mut dyn Sql,
    fires: &[(i64, i64)],
    now_ms: i64,
    routed: &HashSet<String>,
) -> Result<Vec<Result<FireOutcome, StoreError>>, StoreError> {
    let pg = db.backend() == Backend::Postgres;
    if pg {
        db.exec(FIRE_LOCK_TIMEOUT, &[])?;
    }
    let out = fire_each(db, fires, now_ms, routed)?;
    if pg {
        db.exec("SET LOCAL lock_timeout = 0", &[])?;
    }
    Ok(out)
}

/// How long a timer fire waits for a row lock on PostgreSQL (see
/// [`fire_timers`]): longer than another instance's commit takes, far
/// shorter than PostgreSQL's deadlock detection.
pub const FIRE_LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '100ms'";

/// One savepoint for the whole window first: a fire that fails on its own
/// is rare, and a savepoint per fire cost a quarter of the writer's time in
/// a burst (`sqlite3PagerSavepoint`, every page journaled again per fire).
/// When one does fail, the window is rolled back and run again fire by fire
/// ([`fire_one_by_one`]), so the others still commit.
fn fire_each(
    db: &mut dyn Sql,
    fires: &[(i64, i64)],
    now_ms: i64,
    routed: &HashSet<String>,
) -> Result<Vec<Result<FireOutcome, StoreError>>, StoreError> {
    db.exec("SAVEPOINT fires", &[])?;
    let mut out = Vec::with_capacity(fires.len());
    for &(id, due) in fires {
        match fire_timer(db, id, due, now_ms, routed, None) {
            Ok(o) => {
                crate::failpoint::hit("timer_fire");
                out.push(Ok(o));
            }
            Err(e @ (StoreError::Unavailable(_) | StoreError::Contended(_))) => return Err(e),
            Err(_) => {
                db.exec("ROLLBACK TO fires", &[])?;
                db.exec("RELEASE fires", &[])?;
                return fire_one_by_one(db, fires, now_ms, routed);
            }
        }
    }
    db.exec("RELEASE fires", &[])?;
    Ok(out)
}

/// Each fire in its own savepoint: a failing one rolls back alone.
fn fire_one_by_one(
    db: &mut dyn Sql,
    fires: &[(i64, i64)],
    now_ms: i64,
    routed: &HashSet<String>,
) -> Result<Vec<Result<FireOutcome, StoreError>>, StoreError> {
    let mut out = Vec::with_capacity(fires.len());
    for &(id, due) in fires {
        db.exec("SAVEPOINT fire", &[])?;
        match fire_timer(db, id, due, now_ms, routed, None) {
            Ok(o) => {
                crate::failpoint::hit("timer_fire");
                db.exec("RELEASE fire", &[])?;
                out.push(Ok(o));
            }
            Err(e @ (StoreError::Unavailable(_) | StoreError::Contended(_))) => return Err(e),
            Err(e) => {
                db.exec("ROLLBACK TO fire", &[])?;
                db.exec("RELEASE fire", &[])?;
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
    db: &mut dyn Sql,
    before: &str,
    before_ms: i64,
    limit: i64,
) -> Result<(usize, usize), StoreError> {
    let timers = db.exec(
        "DELETE FROM timers WHERE id IN (
             SELECT id FROM timers WHERE state IN ('done', 'cancelled') AND updated_at < $1
             LIMIT $2)",
        vals![before, limit],
    )?;
    let receipts = db.exec(
        "DELETE FROM timer_fires WHERE (timer_id, due_at) IN (
             SELECT timer_id, due_at FROM timer_fires WHERE fired_at < $1 LIMIT $2)",
        vals![before_ms, limit],
    )?;
    Ok((timers as usize, receipts as usize))
}

/// Active, parked, done and cancelled timers: `(state, count)`, for
/// `keel status`. A scan of the table: on demand only, never at start.
pub fn count_by_state(db: &mut dyn Sql) -> Result<Vec<(String, i64)>, StoreError> {
    db.rows(
        "SELECT state, COUNT(*) FROM timers GROUP BY state ORDER BY state",
        &[],
    )?
    .iter()
    .map(|r| Ok((r.text(0)?, r.int(1)?)))
    .collect()
}

/// Active timers, counted through the `timers_due` partial index (about
/// 20 ms of CPU per million): `/metrics`, not the hot path.
pub fn count_active(db: &mut dyn Sql) -> Result<i64, StoreError> {
    db.row(
        "SELECT COUNT(*) FROM timers WHERE state = 'active' AND next_run IS NOT NULL",
        &[],
    )?
    .map(|r| r.int(0))
    .transpose()
    .map(|n| n.unwrap_or(0))
}

/// One timer this call fired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fired {
    pub timer_id: i64,
    /// The due instant it was claimed at.
    pub due_at: i64,
    /// What [`fire_timer`] did (`fired` ≥ 1).
    pub outcome: FireOutcome,
}

/// Fire up to `limit` timers due at `now_ms` as `instance` (recorded in
/// each receipt's `fired_by`): the due rows are claimed with `FOR UPDATE OF
/// t SKIP LOCKED` on PostgreSQL, so instances claiming together each take
/// other timers, and each is fired by [`fire_timer`] — every callback it
/// supports, reminders delivered when `deliver`. No task store here yet: a
/// `task` timer parks. Answers the timers that fired.
pub fn claim_and_fire(
    db: &mut dyn Sql,
    now_ms: i64,
    limit: i64,
    instance: &str,
    deliver: bool,
) -> Result<Vec<Fired>, StoreError> {
    let lock = match db.backend() {
        Backend::Sqlite => "",
        Backend::Postgres => " FOR UPDATE OF t SKIP LOCKED",
    };
    let sql = format!(
        "SELECT t.id, t.next_run, s.channel
         FROM timers t JOIN sessions s ON s.id = t.session_id
         WHERE t.state = 'active' AND t.next_run <= $1
         ORDER BY t.next_run, t.id LIMIT $2{lock}"
    );
    let due = db.rows(&sql, vals![now_ms, limit])?;
    let routed: HashSet<String> = match deliver {
        true => due.iter().map(|r| r.text(2)).collect::<Result<_, _>>()?,
        false => HashSet::new(),
    };
    let mut fired = Vec::new();
    for r in due {
        let (id, due_at) = (r.int(0)?, r.int(1)?);
        let outcome = fire_timer(db, id, due_at, now_ms, &routed, Some(instance))?;
        if outcome.fired > 0 {
            fired.push(Fired {
                timer_id: id,
                due_at,
                outcome,
            });
        }
    }
    Ok(fired)
}
