//! The task store in portable SQL (R19–R22, R38, R49): the queue, every
//! state transition, captured output, recovery and retention, one code on
//! both backends (`persistence/tasks.rs` keeps the types and messages and
//! runs these on SQLite too).
//!
//! Several instances on one PostgreSQL store: any instance may start a
//! QUEUED task, and the start claims it — the row is read
//! `FOR UPDATE SKIP LOCKED` and must still be QUEUED, so of two instances
//! starting one task one gets it and the other gets `None` (also when it
//! comes after the first committed: the row is RUNNING then). A RUNNING
//! task names the instance and the start (`boot_epoch`) running it;
//! recovery on an instance interrupts its own tasks of older starts and
//! the tasks of instances whose heartbeat lease expired, never those of a
//! live instance. Every transition first updates the task row (locking it
//! on PostgreSQL until COMMIT), then appends its `task_states` row, so two
//! transitions of one task never race for the same `seq`.

use std::collections::{HashMap, HashSet};

use serde_json::json;

use crate::clock::Stamp;
use crate::error::StoreError;
use crate::persistence::audit;
use crate::persistence::portable::sessions::commit_notice;
use crate::persistence::sessions::SessionKey;
use crate::persistence::sql::{Backend, Row, Sql};
use crate::persistence::tasks::{
    CancelOutcome, Finish, Fragment, NewTask, Origin, Orphan, Queued, Reattach, Recovery,
    StartInfo, StateRow, TaskDetail, TaskEffect, TaskRow, TaskState, TaskWork,
};
use crate::vals;

const TASK_COLUMNS: &str = "SELECT id, name, args_json, session_id, origin, state, attempt,
        exit_code, detail, boot_epoch, pid, log_bytes, log_dropped, created_at, updated_at,
        finished_at
     FROM tasks";

fn args(json: &str) -> Vec<String> {
    serde_json::from_str(json).unwrap_or_default()
}

fn task_row(r: &Row) -> Result<TaskRow, StoreError> {
    Ok(TaskRow {
        id: r.int(0)?,
        name: r.text(1)?,
        args: args(&r.text(2)?),
        session: r.opt_text(3)?,
        origin: r.text(4)?,
        state: r.text(5)?,
        attempt: r.int(6)?,
        exit_code: r.opt_int(7)?,
        detail: r.opt_text(8)?,
        boot_epoch: r.opt_int(9)?,
        pid: r.opt_int(10)?,
        log_bytes: r.int(11)?,
        log_dropped: r.int(12)?,
        created_at: r.text(13)?,
        updated_at: r.text(14)?,
        finished_at: r.opt_text(15)?,
    })
}

/// `FOR UPDATE SKIP LOCKED` on PostgreSQL: rows another instance is
/// claiming right now are passed over instead of waited for.
fn skip_locked(db: &dyn Sql) -> &'static str {
    match db.backend() {
        Backend::Sqlite => "",
        Backend::Postgres => " FOR UPDATE SKIP LOCKED",
    }
}

/// The boot epoch of this start (R38), as counted in `meta`.
pub fn current_epoch(db: &mut dyn Sql) -> Result<i64, StoreError> {
    let row = db.row(
        "SELECT COALESCE((SELECT CAST(value AS BIGINT) FROM meta WHERE key = 'boot_epoch'), 0)",
        &[],
    )?;
    row.map_or(Ok(0), |r| r.int(0))
}

/// Mirror a transition on the task row, then append it.
pub fn record_state(
    db: &mut dyn Sql,
    at: &str,
    id: i64,
    state: TaskState,
    epoch: i64,
    attempt: i64,
    detail: Option<&str>,
) -> Result<(), StoreError> {
    db.exec(
        "UPDATE tasks SET state = $2, detail = $3, updated_at = $4,
             finished_at = CASE WHEN $5 = 1 THEN $4 ELSE NULL END
         WHERE id = $1",
        vals![id, state.as_str(), detail, at, state.is_final()],
    )?;
    db.exec(
        "INSERT INTO task_states (task_id, seq, state, at, boot_epoch, attempt, detail)
         VALUES ($1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM task_states WHERE task_id = $1),
                 $2, $3, $4, $5, $6)",
        vals![id, state.as_str(), at, epoch, attempt, detail],
    )?;
    Ok(())
}

/// Queue a task; returns its id.
pub fn create_task(db: &mut dyn Sql, at: &str, t: &NewTask) -> Result<i64, StoreError> {
    let epoch = current_epoch(db)?;
    let args = serde_json::to_string(&t.args).map_err(|e| StoreError::Invalid(e.to_string()))?;
    let id = db
        .row(
            "INSERT INTO tasks (name, args_json, session_id, origin, state, created_at, updated_at)
             VALUES ($1, $2, $3, $4, 'QUEUED', $5, $5) RETURNING id",
            vals![
                &t.name,
                args,
                t.session_id.as_deref(),
                t.origin.as_str(),
                at
            ],
        )?
        .ok_or_else(|| StoreError::Invalid("task insert returned no id".into()))?
        .int(0)?;
    record_state(db, at, id, TaskState::Queued, epoch, 1, None)?;
    Ok(id)
}

/// Run a chat command's effect; returns the reply text.
pub fn apply_effect(
    db: &mut dyn Sql,
    stamp: &Stamp,
    session: &SessionKey,
    effect: &TaskEffect,
) -> Result<String, StoreError> {
    let at = &stamp.text;
    match effect {
        TaskEffect::Run { name, args } => {
            let id = create_task(
                db,
                at,
                &NewTask {
                    name: name.clone(),
                    args: args.clone(),
                    session_id: Some(session.id.clone()),
                    origin: Origin::Chat,
                },
            )?;
            Ok(format!("task {id} started ({name})"))
        }
        TaskEffect::Status { id, any } => {
            let Some(t) = get_task(db, *id)?
                .filter(|t| *any || t.session.as_deref() == Some(session.id.as_str()))
            else {
                return Ok(format!(
                    "No task {id} in this chat. Send /tasks for the list."
                ));
            };
            let mut text = format!("task {} ({}): {}", t.id, t.name, t.state);
            if let Some(code) = t.exit_code {
                text.push_str(&format!(", exit code {code}"));
            }
            text.push_str(&format!(", attempt {}", t.attempt));
            text.push_str(&format!(", since {}", t.updated_at));
            if let Some(d) = &t.detail {
                text.push_str(&format!(" — {d}"));
            }
            text.push_str(&format!(", {} log bytes", t.log_bytes));
            Ok(text)
        }
        TaskEffect::Cancel { id, any } => {
            let scope = (!any).then_some(session.id.as_str());
            Ok(match request_cancel(db, at, *id, scope)? {
                CancelOutcome::NotFound => {
                    format!("No task {id} in this chat. Send /tasks for the list.")
                }
                CancelOutcome::Finished(state) => format!("task {id} already ended ({state})"),
                CancelOutcome::Cancelled => format!("task {id} cancelled (it had not started)"),
                CancelOutcome::Requested => format!("cancelling task {id}"),
            })
        }
        TaskEffect::List => {
            let rows = session_tasks(db, &session.id, 10)?;
            if rows.is_empty() {
                return Ok("No tasks in this chat yet. Send /task run NAME".into());
            }
            Ok(rows
                .iter()
                .map(|t| {
                    let code = t
                        .exit_code
                        .map(|c| format!(", exit code {c}"))
                        .unwrap_or_default();
                    format!(
                        "task {} ({}): {}{code}, {}",
                        t.id, t.name, t.state, t.updated_at
                    )
                })
                .collect::<Vec<_>>()
                .join("\n"))
        }
    }
}

/// Cancel task `id` (only within `session` when given). The row is locked
/// first on PostgreSQL: a start or an end on another instance waits, or is
/// waited for.
pub fn request_cancel(
    db: &mut dyn Sql,
    at: &str,
    id: i64,
    session: Option<&str>,
) -> Result<CancelOutcome, StoreError> {
    let sql = format!(
        "SELECT state, attempt, session_id FROM tasks WHERE id = $1{}",
        db.for_update()
    );
    let Some(r) = db.row(&sql, vals![id])? else {
        return Ok(CancelOutcome::NotFound);
    };
    let (state, attempt, owner) = (r.text(0)?, r.int(1)?, r.opt_text(2)?);
    if session.is_some_and(|s| owner.as_deref() != Some(s)) {
        return Ok(CancelOutcome::NotFound);
    }
    match state.as_str() {
        "QUEUED" => {
            let epoch = current_epoch(db)?;
            record_state(
                db,
                at,
                id,
                TaskState::Cancelled,
                epoch,
                attempt,
                Some("cancelled before it started"),
            )?;
            audit::append_sql(
                db,
                at,
                "task_cancelled",
                &json!({"id": id, "was": "QUEUED", "session": session}),
            )?;
            Ok(CancelOutcome::Cancelled)
        }
        "RUNNING" => {
            db.exec(
                "UPDATE tasks SET cancel_requested = 1 WHERE id = $1",
                vals![id],
            )?;
            audit::append_sql(
                db,
                at,
                "task_cancelled",
                &json!({"id": id, "was": "RUNNING", "session": session}),
            )?;
            Ok(CancelOutcome::Requested)
        }
        _ => Ok(CancelOutcome::Finished(state)),
    }
}

/// QUEUED → RUNNING in start `epoch` of `instance`, before the process is
/// spawned: the claim. `None` when the task is not QUEUED any more
/// (cancelled, or started by another instance) or another instance is
/// claiming it at this moment (PostgreSQL: the locked row is skipped).
pub fn start_task(
    db: &mut dyn Sql,
    at: &str,
    id: i64,
    epoch: i64,
    instance: Option<&str>,
) -> Result<Option<StartInfo>, StoreError> {
    let sql = format!(
        "SELECT name, args_json, attempt, session_id, log_bytes FROM tasks
         WHERE id = $1 AND state = 'QUEUED'{}",
        skip_locked(db)
    );
    let Some(r) = db.row(&sql, vals![id])? else {
        return Ok(None);
    };
    let (name, args_json, attempt, session_id, log_bytes) =
        (r.text(0)?, r.text(1)?, r.int(2)?, r.opt_text(3)?, r.int(4)?);
    db.exec(
        "UPDATE tasks SET boot_epoch = $2, instance = $3, pid = NULL, pid_start = NULL,
             exit_code = NULL, cancel_requested = 0
         WHERE id = $1",
        vals![id, epoch, instance],
    )?;
    record_state(db, at, id, TaskState::Running, epoch, attempt, None)?;
    audit::append_sql(
        db,
        at,
        "task_started",
        &json!({"id": id, "name": name, "attempt": attempt, "session": session_id}),
    )?;
    let next_seq = next_seq(db, id)?;
    Ok(Some(StartInfo {
        name,
        args: args(&args_json),
        attempt,
        session_id,
        next_seq,
        log_bytes,
    }))
}

fn next_seq(db: &mut dyn Sql, id: i64) -> Result<i64, StoreError> {
    db.row(
        "SELECT COALESCE(MAX(seq), 0) + 1 FROM log_fragments WHERE task_id = $1",
        vals![id],
    )?
    .map_or(Ok(1), |r| r.int(0))
}

/// The spawned process: pid and start time (its process group is `pid`).
pub fn record_pid(db: &mut dyn Sql, id: i64, pid: i64, pid_start: i64) -> Result<(), StoreError> {
    db.exec(
        "UPDATE tasks SET pid = $2, pid_start = $3 WHERE id = $1",
        vals![id, pid, pid_start],
    )?;
    Ok(())
}

/// Store captured output and count it on the task. A fragment whose `seq`
/// is stored already (a retried batch) is skipped and not counted.
pub fn append_logs(
    db: &mut dyn Sql,
    at: &str,
    id: i64,
    fragments: &[Fragment],
) -> Result<(), StoreError> {
    let mut total = 0i64;
    for f in fragments {
        let n = db.exec(
            "INSERT INTO log_fragments (task_id, stream, seq, bytes, at, resume)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (task_id, seq) DO NOTHING",
            vals![id, f.stream, f.seq, &f.bytes, at, f.resume.as_deref()],
        )?;
        if n == 1 {
            total += f.bytes.len() as i64;
        }
    }
    db.exec(
        "UPDATE tasks SET log_bytes = log_bytes + $2 WHERE id = $1",
        vals![id, total],
    )?;
    Ok(())
}

/// Record the end of an attempt (and its notice to the chat). A task that
/// is not RUNNING (or QUEUED: refused before its start) in that attempt
/// any more is left alone (`false`): e.g. the late end of an attempt that
/// another instance's recovery interrupted and queued again meanwhile.
pub fn finish_task(db: &mut dyn Sql, stamp: &Stamp, f: &Finish) -> Result<bool, StoreError> {
    let at = &stamp.text;
    let sql = format!(
        "SELECT state, session_id, attempt FROM tasks WHERE id = $1{}",
        db.for_update()
    );
    let Some(r) = db.row(&sql, vals![f.id])? else {
        return Ok(false);
    };
    let (state, session, attempt) = (r.text(0)?, r.opt_text(1)?, r.int(2)?);
    if (state != "RUNNING" && state != "QUEUED") || attempt != f.attempt {
        return Ok(false);
    }
    append_logs(db, at, f.id, &f.fragments)?;
    db.exec(
        "UPDATE tasks SET exit_code = $2, log_dropped = log_dropped + $3 WHERE id = $1",
        vals![f.id, f.exit_code, f.dropped],
    )?;
    record_state(
        db,
        at,
        f.id,
        f.state,
        f.epoch,
        f.attempt,
        f.detail.as_deref(),
    )?;
    if f.requeue {
        requeue(db, at, f.id, f.epoch, f.attempt + 1)?;
    }
    if let (Some((text, deliver)), Some(session)) = (&f.notice, session) {
        if let Some(key) = session_key(db, &session)? {
            commit_notice(db, stamp, &key, text, *deliver)?;
        }
    }
    Ok(true)
}

fn requeue(
    db: &mut dyn Sql,
    at: &str,
    id: i64,
    epoch: i64,
    attempt: i64,
) -> Result<(), StoreError> {
    db.exec(
        "UPDATE tasks SET attempt = $2, cancel_requested = 0 WHERE id = $1",
        vals![id, attempt],
    )?;
    record_state(
        db,
        at,
        id,
        TaskState::Queued,
        epoch,
        attempt,
        Some("queued again after a restart"),
    )
}

fn session_key(db: &mut dyn Sql, id: &str) -> Result<Option<SessionKey>, StoreError> {
    db.row(
        "SELECT channel, chat FROM sessions WHERE id = $1",
        vals![id],
    )?
    .map(|r| {
        Ok(SessionKey {
            id: id.to_string(),
            channel: r.text(0)?,
            chat: r.text(1)?,
        })
    })
    .transpose()
}

/// QUEUED tasks in order (any instance may start them; on PostgreSQL
/// those another instance is claiming right now are skipped), and the
/// RUNNING tasks of `instance` whose cancel was asked for (only the
/// instance running a process can stop it).
pub fn task_work(
    db: &mut dyn Sql,
    limit: i64,
    instance: Option<&str>,
) -> Result<TaskWork, StoreError> {
    let sql = format!(
        "SELECT id, name, args_json, session_id, attempt FROM tasks
         WHERE state = 'QUEUED' ORDER BY id LIMIT $1{}",
        skip_locked(db)
    );
    let queued = db
        .rows(&sql, vals![limit])?
        .iter()
        .map(|r| {
            Ok(Queued {
                id: r.int(0)?,
                name: r.text(1)?,
                args: args(&r.text(2)?),
                session_id: r.opt_text(3)?,
                attempt: r.int(4)?,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let cancel = db
        .rows(
            "SELECT id FROM tasks WHERE state = 'RUNNING' AND cancel_requested = 1
                 AND COALESCE(instance, '') = COALESCE(CAST($1 AS TEXT), '')
             ORDER BY id",
            vals![instance],
        )?
        .iter()
        .map(|r| r.int(0))
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(TaskWork { queued, cancel })
}

/// Whose RUNNING task a recovery may take over, and why.
enum Left {
    /// This instance's own (or, without instance ids, the one node's), of
    /// an older start.
    Own,
    /// Another instance's whose heartbeat lease expired (or that never
    /// registered).
    Dead(String),
}

/// At start: every RUNNING task of `instance` from an older start, and
/// every RUNNING task of an instance whose lease expired by `stamp.ms`, is
/// INTERRUPTED at once (no timeout guessing); one whose name is in `retry`
/// (name → max_attempts) and has attempts left is QUEUED again with
/// attempt + 1. Container tasks (`reattach`) are taken over instead.
/// Tasks a live instance runs are left alone, and so — for a caller with
/// an instance id — are tasks run without one (a one-node keel's; the
/// epoch of another start cannot be compared with this instance's).
/// Only this instance's own interrupted processes are returned as orphans
/// (another instance's pids are another host's).
pub fn recover(
    db: &mut dyn Sql,
    stamp: &Stamp,
    epoch: i64,
    instance: Option<&str>,
    retry: &HashMap<String, u32>,
    reattach: &HashSet<String>,
) -> Result<Recovery, StoreError> {
    let at = &stamp.text;
    let sql = format!(
        "SELECT id, name, attempt, pid, pid_start, boot_epoch, instance FROM tasks
         WHERE state = 'RUNNING' ORDER BY id{}",
        db.for_update()
    );
    let rows = db.rows(&sql, &[])?;
    let mut alive: HashMap<String, bool> = HashMap::new();
    let mut out = Recovery::default();
    for r in rows {
        let (id, name, attempt) = (r.int(0)?, r.text(1)?, r.int(2)?);
        let (pid, pid_start, ran_in) = (r.opt_int(3)?, r.opt_int(4)?, r.opt_int(5)?);
        let runner = r.opt_text(6)?;
        let left = if runner.as_deref() == instance {
            if ran_in.is_some_and(|e| e >= epoch) {
                continue;
            }
            Left::Own
        } else if let Some(other) = runner {
            let live = match alive.get(&other) {
                Some(&l) => l,
                None => {
                    let l = db
                        .row(
                            "SELECT expires_ms FROM instances WHERE id = $1",
                            vals![&other],
                        )?
                        .map(|r| r.int(0))
                        .transpose()?
                        .is_some_and(|exp| exp > stamp.ms);
                    alive.insert(other.clone(), l);
                    l
                }
            };
            if live {
                continue;
            }
            Left::Dead(other)
        } else {
            continue;
        };
        let was = match &left {
            Left::Own => format!("start #{}", ran_in.unwrap_or(0)),
            Left::Dead(other) => format!(
                "start #{} of instance {other}, whose lease expired",
                ran_in.unwrap_or(0)
            ),
        };
        if reattach.contains(&name) {
            let detail = format!("re-attached by start #{epoch} (it ran in {was})");
            db.exec(
                "UPDATE tasks SET boot_epoch = $2, instance = $3 WHERE id = $1",
                vals![id, epoch, instance],
            )?;
            record_state(
                db,
                at,
                id,
                TaskState::Running,
                epoch,
                attempt,
                Some(&detail),
            )?;
            let t = db
                .row(
                    "SELECT args_json, session_id, log_bytes, log_dropped FROM tasks WHERE id = $1",
                    vals![id],
                )?
                .ok_or_else(|| StoreError::Invalid(format!("task {id} vanished")))?;
            let (log_bytes, log_dropped) = (t.int(2)?, t.int(3)?);
            let next_seq = next_seq(db, id)?;
            let resume = db
                .row(
                    "SELECT resume FROM log_fragments WHERE task_id = $1 AND resume IS NOT NULL
                     ORDER BY seq DESC LIMIT 1",
                    vals![id],
                )?
                .map(|r| r.text(0))
                .transpose()?;
            out.reattach.push(Reattach {
                id,
                name,
                args: args(&t.text(0)?),
                session_id: t.opt_text(1)?,
                attempt,
                next_seq,
                stored: log_bytes + log_dropped,
                log_bytes,
                resume,
            });
            continue;
        }
        let detail = format!("keel restarted (start #{epoch}) while it ran in {was}");
        record_state(
            db,
            at,
            id,
            TaskState::Interrupted,
            epoch,
            attempt,
            Some(&detail),
        )?;
        out.interrupted += 1;
        if let (Left::Own, Some(pid), Some(pid_start)) = (&left, pid, pid_start) {
            out.orphans.push(Orphan { id, pid, pid_start });
        }
        if retry
            .get(&name)
            .is_some_and(|&max| attempt < i64::from(max))
        {
            requeue(db, at, id, epoch, attempt + 1)?;
            out.requeued += 1;
        }
    }
    Ok(out)
}

/// Every task (oldest first), optionally in one state.
pub fn list_tasks(
    db: &mut dyn Sql,
    state: Option<&str>,
    limit: i64,
) -> Result<Vec<TaskRow>, StoreError> {
    let sql = format!(
        "{TASK_COLUMNS} WHERE (CAST($1 AS TEXT) IS NULL OR state = $1) ORDER BY id LIMIT $2"
    );
    db.rows(&sql, vals![state, limit])?
        .iter()
        .map(task_row)
        .collect()
}

/// One task by id.
pub fn get_task(db: &mut dyn Sql, id: i64) -> Result<Option<TaskRow>, StoreError> {
    let sql = format!("{TASK_COLUMNS} WHERE id = $1");
    db.row(&sql, vals![id])?.as_ref().map(task_row).transpose()
}

/// One task with every transition, oldest first.
pub fn task_detail(db: &mut dyn Sql, id: i64) -> Result<Option<TaskDetail>, StoreError> {
    let Some(task) = get_task(db, id)? else {
        return Ok(None);
    };
    let states = task_states(db, id)?;
    Ok(Some(TaskDetail { task, states }))
}

/// Every task with its transitions (oldest first), optionally in one state.
pub fn list_details(
    db: &mut dyn Sql,
    state: Option<&str>,
    limit: i64,
) -> Result<Vec<TaskDetail>, StoreError> {
    let mut out = Vec::new();
    for task in list_tasks(db, state, limit)? {
        let states = task_states(db, task.id)?;
        out.push(TaskDetail { task, states });
    }
    Ok(out)
}

fn task_states(db: &mut dyn Sql, id: i64) -> Result<Vec<StateRow>, StoreError> {
    db.rows(
        "SELECT state, at, boot_epoch, attempt, detail FROM task_states
         WHERE task_id = $1 ORDER BY seq",
        vals![id],
    )?
    .iter()
    .map(|r| {
        Ok(StateRow {
            state: r.text(0)?,
            at: r.text(1)?,
            boot_epoch: r.int(2)?,
            attempt: r.int(3)?,
            detail: r.opt_text(4)?,
        })
    })
    .collect()
}

/// A chat's newest tasks, newest first.
pub fn session_tasks(
    db: &mut dyn Sql,
    session_id: &str,
    limit: i64,
) -> Result<Vec<TaskRow>, StoreError> {
    let sql = format!("{TASK_COLUMNS} WHERE session_id = $1 ORDER BY id DESC LIMIT $2");
    db.rows(&sql, vals![session_id, limit])?
        .iter()
        .map(task_row)
        .collect()
}

/// Output fragments of a task after `after_seq`, in order, optionally of
/// one stream, until about `max_bytes` are collected (at least one).
pub fn log_fragments(
    db: &mut dyn Sql,
    id: i64,
    stream: Option<&str>,
    after_seq: i64,
    max_bytes: usize,
) -> Result<Vec<(i64, String, Vec<u8>)>, StoreError> {
    // Read in pages so a large log is not loaded whole for one page of it.
    const PAGE: i64 = 64;
    let mut out = Vec::new();
    let mut total = 0usize;
    let mut after = after_seq;
    loop {
        let rows = db.rows(
            "SELECT seq, stream, bytes FROM log_fragments
             WHERE task_id = $1 AND seq > $2 AND (CAST($3 AS TEXT) IS NULL OR stream = $3)
             ORDER BY seq LIMIT $4",
            vals![id, after, stream, PAGE],
        )?;
        let last_page = (rows.len() as i64) < PAGE;
        for r in &rows {
            let (seq, bytes) = (r.int(0)?, r.bytes(2)?);
            after = seq;
            total += bytes.len();
            out.push((seq, r.text(1)?, bytes));
            if total >= max_bytes {
                return Ok(out);
            }
        }
        if last_page {
            return Ok(out);
        }
    }
}

/// Delete up to `limit` log fragments, then the transitions and rows, of
/// tasks that finished before `before` (RFC 3339). Bounded so no unit of
/// work holds the write lock long; the runner repeats while work is left.
/// Returns (tasks, fragments) deleted.
pub fn prune(db: &mut dyn Sql, before: &str, limit: i64) -> Result<(usize, usize), StoreError> {
    let fragments = db.exec(
        "DELETE FROM log_fragments WHERE id IN (
             SELECT f.id FROM tasks t JOIN log_fragments f ON f.task_id = t.id
             WHERE t.finished_at IS NOT NULL AND t.finished_at < $1 LIMIT $2)",
        vals![before, limit],
    )? as usize;
    if fragments as i64 >= limit {
        return Ok((0, fragments));
    }
    let ids = db
        .rows(
            "SELECT id FROM tasks WHERE finished_at IS NOT NULL AND finished_at < $1
                 AND state NOT IN ('QUEUED', 'RUNNING') LIMIT $2",
            vals![before, limit],
        )?
        .iter()
        .map(|r| r.int(0))
        .collect::<Result<Vec<_>, StoreError>>()?;
    for id in &ids {
        db.exec("DELETE FROM task_states WHERE task_id = $1", vals![*id])?;
        db.exec("DELETE FROM log_fragments WHERE task_id = $1", vals![*id])?;
        db.exec("DELETE FROM tasks WHERE id = $1", vals![*id])?;
    }
    Ok((ids.len(), fragments))
}

/// `(state, count)` of every task, and the stored log bytes: `keel status`
/// and the runner's gauges. A scan of the tasks table (retention keeps it
/// small); never on the hot path.
pub fn counts(db: &mut dyn Sql) -> Result<(Vec<(String, i64)>, i64), StoreError> {
    let rows = db
        .rows(
            "SELECT state, COUNT(*) FROM tasks GROUP BY state ORDER BY state",
            &[],
        )?
        .iter()
        .map(|r| Ok((r.text(0)?, r.int(1)?)))
        .collect::<Result<Vec<_>, StoreError>>()?;
    let bytes = db
        .row(
            "SELECT CAST(COALESCE(SUM(log_bytes), 0) AS BIGINT) FROM tasks",
            &[],
        )?
        .map_or(Ok(0), |r| r.int(0))?;
    Ok((rows, bytes))
}
