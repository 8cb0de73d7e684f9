//! Task SQL (R19–R22, R38): the queue, every state transition, captured
//! output, recovery by boot epoch and retention. Like `store.rs`: one
//! documented function per unit of work, bound parameters, cached
//! statements, run inside the writer's transaction.
//!
//! Each transition is a `task_states` row written in the same unit of work
//! as the `tasks.state` it mirrors, and it is committed before the runner
//! acts on it: a task is RUNNING in the store before its process is
//! spawned, so after a crash every process keel may have started is found
//! by its RUNNING row of an older boot epoch.

use std::collections::HashMap;

use actix::prelude::*;
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use super::sessions::{self, SessionKey};
use super::PersistenceActor;
use crate::clock::Stamp;
use crate::error::StoreError;

/// The states of a task (R19). Written in capitals, as the CLI shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum TaskState {
    #[serde(rename = "QUEUED")]
    Queued,
    #[serde(rename = "RUNNING")]
    Running,
    #[serde(rename = "SUCCEEDED")]
    Succeeded,
    #[serde(rename = "FAILED")]
    Failed,
    #[serde(rename = "CANCELLED")]
    Cancelled,
    #[serde(rename = "INTERRUPTED")]
    Interrupted,
    #[serde(rename = "TIMED_OUT")]
    TimedOut,
}

impl TaskState {
    pub const ALL: [TaskState; 7] = [
        TaskState::Queued,
        TaskState::Running,
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::Cancelled,
        TaskState::Interrupted,
        TaskState::TimedOut,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Queued => "QUEUED",
            TaskState::Running => "RUNNING",
            TaskState::Succeeded => "SUCCEEDED",
            TaskState::Failed => "FAILED",
            TaskState::Cancelled => "CANCELLED",
            TaskState::Interrupted => "INTERRUPTED",
            TaskState::TimedOut => "TIMED_OUT",
        }
    }

    pub fn parse(s: &str) -> Option<TaskState> {
        TaskState::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// No further transition follows (except a requeue after INTERRUPTED).
    pub fn is_final(self) -> bool {
        !matches!(self, TaskState::Queued | TaskState::Running)
    }
}

/// Who asked for a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Chat,
    Cli,
    Http,
    Timer,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Chat => "chat",
            Origin::Cli => "cli",
            Origin::Http => "http",
            Origin::Timer => "timer",
        }
    }
}

/// A task to queue. `name` and `args` were checked against the task table
/// by whoever asked (the runner checks again at start: config may change).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTask {
    pub name: String,
    pub args: Vec<String>,
    /// The chat to tell when it ends.
    pub session_id: Option<String>,
    pub origin: Origin,
}

/// Chat commands that touch tasks, applied in the inbound turn's
/// transaction (a redelivered `/task run` queues nothing twice).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskEffect {
    Run {
        name: String,
        args: Vec<String>,
    },
    /// `any`: the owner's chat or the local CLI, which may see every task.
    Status {
        id: i64,
        any: bool,
    },
    Cancel {
        id: i64,
        any: bool,
    },
    /// This chat's recent tasks.
    List,
}

impl TaskEffect {
    /// Whether the runner should look at the store again.
    pub fn changes_tasks(&self) -> bool {
        matches!(self, TaskEffect::Run { .. } | TaskEffect::Cancel { .. })
    }
}

/// A task as operators see it (`keel tasks`, `GET /v1/tasks`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TaskRow {
    pub id: i64,
    pub name: String,
    pub args: Vec<String>,
    pub session: Option<String>,
    pub origin: String,
    pub state: String,
    pub attempt: i64,
    pub exit_code: Option<i64>,
    pub detail: Option<String>,
    pub boot_epoch: Option<i64>,
    pub pid: Option<i64>,
    pub log_bytes: i64,
    pub log_dropped: i64,
    pub created_at: String,
    pub updated_at: String,
    pub finished_at: Option<String>,
}

/// One transition.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StateRow {
    pub state: String,
    pub at: String,
    pub boot_epoch: i64,
    pub attempt: i64,
    pub detail: Option<String>,
}

/// A task with its transitions.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TaskDetail {
    #[serde(flatten)]
    pub task: TaskRow,
    pub states: Vec<StateRow>,
}

const TASK_COLUMNS: &str = "SELECT id, name, args_json, session_id, origin, state, attempt,
        exit_code, detail, boot_epoch, pid, log_bytes, log_dropped, created_at, updated_at,
        finished_at
     FROM tasks";

fn task_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TaskRow> {
    let args: String = r.get(2)?;
    Ok(TaskRow {
        id: r.get(0)?,
        name: r.get(1)?,
        args: serde_json::from_str(&args).unwrap_or_default(),
        session: r.get(3)?,
        origin: r.get(4)?,
        state: r.get(5)?,
        attempt: r.get(6)?,
        exit_code: r.get(7)?,
        detail: r.get(8)?,
        boot_epoch: r.get(9)?,
        pid: r.get(10)?,
        log_bytes: r.get(11)?,
        log_dropped: r.get(12)?,
        created_at: r.get(13)?,
        updated_at: r.get(14)?,
        finished_at: r.get(15)?,
    })
}

/// The boot epoch of this start (R38), as counted in `meta`.
pub fn current_epoch(conn: &Connection) -> Result<i64, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT COALESCE((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'boot_epoch'), 0)",
        )?
        .query_row([], |r| r.get(0))?)
}

/// Append a transition and mirror it on the task row.
pub fn record_state(
    conn: &Connection,
    at: &str,
    id: i64,
    state: TaskState,
    epoch: i64,
    attempt: i64,
    detail: Option<&str>,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO task_states (task_id, seq, state, at, boot_epoch, attempt, detail)
         VALUES (?1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM task_states WHERE task_id = ?1),
                 ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![id, state.as_str(), at, epoch, attempt, detail])?;
    conn.prepare_cached(
        "UPDATE tasks SET state = ?2, detail = ?3, updated_at = ?4,
             finished_at = CASE WHEN ?5 THEN ?4 ELSE NULL END
         WHERE id = ?1",
    )?
    .execute(params![id, state.as_str(), detail, at, state.is_final()])?;
    Ok(())
}

/// Queue a task; returns its id.
pub fn create_task(conn: &Connection, at: &str, t: &NewTask) -> Result<i64, StoreError> {
    let epoch = current_epoch(conn)?;
    let args = serde_json::to_string(&t.args).map_err(|e| StoreError::Invalid(e.to_string()))?;
    conn.prepare_cached(
        "INSERT INTO tasks (name, args_json, session_id, origin, state, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, 'QUEUED', ?5, ?5)",
    )?
    .execute(params![t.name, args, t.session_id, t.origin.as_str(), at])?;
    let id = conn.last_insert_rowid();
    record_state(conn, at, id, TaskState::Queued, epoch, 1, None)?;
    Ok(id)
}

/// Run a chat command's effect; returns the reply text.
pub fn apply_effect(
    conn: &Connection,
    stamp: &Stamp,
    session: &SessionKey,
    effect: &TaskEffect,
) -> Result<String, StoreError> {
    let at = &stamp.text;
    match effect {
        TaskEffect::Run { name, args } => {
            let id = create_task(
                conn,
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
            let Some(t) = visible(conn, *id, &session.id, *any)? else {
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
            Ok(match request_cancel(conn, at, *id, scope)? {
                CancelOutcome::NotFound => {
                    format!("No task {id} in this chat. Send /tasks for the list.")
                }
                CancelOutcome::Finished(state) => format!("task {id} already ended ({state})"),
                CancelOutcome::Cancelled => format!("task {id} cancelled (it had not started)"),
                CancelOutcome::Requested => format!("cancelling task {id}"),
            })
        }
        TaskEffect::List => {
            let rows = session_tasks(conn, &session.id, 10)?;
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

/// A task this chat may see: its own, or any for the owner / CLI.
fn visible(
    conn: &Connection,
    id: i64,
    session_id: &str,
    any: bool,
) -> Result<Option<TaskRow>, StoreError> {
    Ok(get_task(conn, id)?.filter(|t| any || t.session.as_deref() == Some(session_id)))
}

/// What a cancel found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelOutcome {
    NotFound,
    /// It ended already (state given).
    Finished(String),
    /// It was QUEUED and is CANCELLED now.
    Cancelled,
    /// It is RUNNING: the runner stops it (`cancel_requested` set).
    Requested,
}

/// Cancel task `id` (only within `session` when given).
pub fn request_cancel(
    conn: &Connection,
    at: &str,
    id: i64,
    session: Option<&str>,
) -> Result<CancelOutcome, StoreError> {
    let row: Option<(String, i64, Option<String>)> = conn
        .prepare_cached("SELECT state, attempt, session_id FROM tasks WHERE id = ?1")?
        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let Some((state, attempt, owner)) = row else {
        return Ok(CancelOutcome::NotFound);
    };
    if session.is_some_and(|s| owner.as_deref() != Some(s)) {
        return Ok(CancelOutcome::NotFound);
    }
    match state.as_str() {
        "QUEUED" => {
            let epoch = current_epoch(conn)?;
            record_state(
                conn,
                at,
                id,
                TaskState::Cancelled,
                epoch,
                attempt,
                Some("cancelled before it started"),
            )?;
            super::audit::append_at(
                conn,
                at,
                "task_cancelled",
                &serde_json::json!({"id": id, "was": "QUEUED", "session": session}),
            )?;
            Ok(CancelOutcome::Cancelled)
        }
        "RUNNING" => {
            conn.prepare_cached("UPDATE tasks SET cancel_requested = 1 WHERE id = ?1")?
                .execute([id])?;
            super::audit::append_at(
                conn,
                at,
                "task_cancelled",
                &serde_json::json!({"id": id, "was": "RUNNING", "session": session}),
            )?;
            Ok(CancelOutcome::Requested)
        }
        _ => Ok(CancelOutcome::Finished(state)),
    }
}

/// What the runner needs to start an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartInfo {
    pub name: String,
    pub args: Vec<String>,
    pub attempt: i64,
    pub session_id: Option<String>,
    /// The next `log_fragments.seq` (earlier attempts' output stays).
    pub next_seq: i64,
    /// Bytes stored by earlier attempts (the cap is per task).
    pub log_bytes: i64,
}

/// QUEUED → RUNNING in epoch `epoch`, before the process is spawned.
/// `None` when the task is not QUEUED any more (cancelled meanwhile).
pub fn start_task(
    conn: &Connection,
    at: &str,
    id: i64,
    epoch: i64,
) -> Result<Option<StartInfo>, StoreError> {
    let row: Option<(String, String, i64, Option<String>, i64)> = conn
        .prepare_cached(
            "SELECT name, args_json, attempt, session_id, log_bytes FROM tasks
             WHERE id = ?1 AND state = 'QUEUED'",
        )?
        .query_row([id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .optional()?;
    let Some((name, args, attempt, session_id, log_bytes)) = row else {
        return Ok(None);
    };
    conn.prepare_cached(
        "UPDATE tasks SET boot_epoch = ?2, pid = NULL, pid_start = NULL, exit_code = NULL,
             cancel_requested = 0
         WHERE id = ?1",
    )?
    .execute(params![id, epoch])?;
    record_state(conn, at, id, TaskState::Running, epoch, attempt, None)?;
    super::audit::append_at(
        conn,
        at,
        "task_started",
        &serde_json::json!({"id": id, "name": name, "attempt": attempt, "session": session_id}),
    )?;
    let next_seq: i64 = conn
        .prepare_cached("SELECT COALESCE(MAX(seq), 0) + 1 FROM log_fragments WHERE task_id = ?1")?
        .query_row([id], |r| r.get(0))?;
    Ok(Some(StartInfo {
        name,
        args: serde_json::from_str(&args).unwrap_or_default(),
        attempt,
        session_id,
        next_seq,
        log_bytes,
    }))
}

/// The spawned process: pid and start time (its process group is `pid`).
pub fn record_pid(conn: &Connection, id: i64, pid: i64, pid_start: i64) -> Result<(), StoreError> {
    conn.prepare_cached("UPDATE tasks SET pid = ?2, pid_start = ?3 WHERE id = ?1")?
        .execute(params![id, pid, pid_start])?;
    Ok(())
}

/// One captured batch of one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fragment {
    pub seq: i64,
    pub stream: &'static str,
    pub bytes: Vec<u8>,
    /// A container task's place in the engine's log after this fragment
    /// (see `tasks/container.rs`); `None` for processes.
    pub resume: Option<String>,
}

/// Store captured output and count it on the task.
pub fn append_logs(
    conn: &Connection,
    at: &str,
    id: i64,
    fragments: &[Fragment],
) -> Result<(), StoreError> {
    let mut total = 0i64;
    let mut stmt = conn.prepare_cached(
        "INSERT OR IGNORE INTO log_fragments (task_id, stream, seq, bytes, at, resume)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    for f in fragments {
        if stmt.execute(params![id, f.stream, f.seq, f.bytes, at, f.resume])? == 1 {
            total += f.bytes.len() as i64;
        }
    }
    conn.prepare_cached("UPDATE tasks SET log_bytes = log_bytes + ?2 WHERE id = ?1")?
        .execute(params![id, total])?;
    Ok(())
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finish {
    pub id: i64,
    pub state: TaskState,
    pub exit_code: Option<i64>,
    pub detail: Option<String>,
    pub attempt: i64,
    pub epoch: i64,
    /// Output the cap dropped (counted on the task).
    pub dropped: i64,
    /// Last output fragments (the truncation marker), stored first.
    pub fragments: Vec<Fragment>,
    /// Queue again (attempt + 1): an interrupted `retry_on_restart` task.
    pub requeue: bool,
    /// Tell the task's chat this text (`deliver`: it has a route).
    pub notice: Option<(String, bool)>,
}

/// Record the end of an attempt (and its notice to the chat). A task that
/// is not RUNNING any more is left alone (`false`).
pub fn finish_task(conn: &Connection, stamp: &Stamp, f: &Finish) -> Result<bool, StoreError> {
    let at = &stamp.text;
    let row: Option<(String, Option<String>)> = conn
        .prepare_cached("SELECT state, session_id FROM tasks WHERE id = ?1")?
        .query_row([f.id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let Some((state, session)) = row else {
        return Ok(false);
    };
    if state != "RUNNING" && state != "QUEUED" {
        return Ok(false);
    }
    append_logs(conn, at, f.id, &f.fragments)?;
    conn.prepare_cached(
        "UPDATE tasks SET exit_code = ?2, log_dropped = log_dropped + ?3 WHERE id = ?1",
    )?
    .execute(params![f.id, f.exit_code, f.dropped])?;
    record_state(
        conn,
        at,
        f.id,
        f.state,
        f.epoch,
        f.attempt,
        f.detail.as_deref(),
    )?;
    if f.requeue {
        requeue(conn, at, f.id, f.epoch, f.attempt + 1)?;
    }
    if let (Some((text, deliver)), Some(session)) = (&f.notice, session) {
        if let Some(key) = session_key(conn, &session)? {
            sessions::commit_notice(conn, stamp, &key, text, *deliver)?;
        }
    }
    Ok(true)
}

fn requeue(
    conn: &Connection,
    at: &str,
    id: i64,
    epoch: i64,
    attempt: i64,
) -> Result<(), StoreError> {
    conn.prepare_cached("UPDATE tasks SET attempt = ?2, cancel_requested = 0 WHERE id = ?1")?
        .execute(params![id, attempt])?;
    record_state(
        conn,
        at,
        id,
        TaskState::Queued,
        epoch,
        attempt,
        Some("queued again after a restart"),
    )
}

fn session_key(conn: &Connection, id: &str) -> Result<Option<SessionKey>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT channel, chat FROM sessions WHERE id = ?1")?
        .query_row([id], |r| {
            Ok(SessionKey {
                id: id.to_string(),
                channel: r.get(0)?,
                chat: r.get(1)?,
            })
        })
        .optional()?)
}

/// What the runner should look at: QUEUED tasks in order, and RUNNING ones
/// whose cancel was asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskWork {
    /// Oldest first.
    pub queued: Vec<Queued>,
    pub cancel: Vec<i64>,
}

/// A QUEUED task as the runner checks it before starting it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub id: i64,
    pub name: String,
    pub args: Vec<String>,
    pub session_id: Option<String>,
    pub attempt: i64,
}

pub fn task_work(conn: &Connection, limit: i64) -> Result<TaskWork, StoreError> {
    let queued = conn
        .prepare_cached(
            "SELECT id, name, args_json, session_id, attempt FROM tasks
             WHERE state = 'QUEUED' ORDER BY id LIMIT ?1",
        )?
        .query_map([limit], |r| {
            let args: String = r.get(2)?;
            Ok(Queued {
                id: r.get(0)?,
                name: r.get(1)?,
                args: serde_json::from_str(&args).unwrap_or_default(),
                session_id: r.get(3)?,
                attempt: r.get(4)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let cancel = conn
        .prepare_cached(
            "SELECT id FROM tasks WHERE state = 'RUNNING' AND cancel_requested = 1 ORDER BY id",
        )?
        .query_map([], |r| r.get(0))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(TaskWork { queued, cancel })
}

/// A process group an earlier boot may have left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orphan {
    pub id: i64,
    pub pid: i64,
    pub pid_start: i64,
}

/// What recovery did (R21, R38).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    pub interrupted: i64,
    pub requeued: i64,
    /// Recorded processes of interrupted tasks, to stop if still alive.
    pub orphans: Vec<Orphan>,
    /// Container tasks left RUNNING and taken over by this start.
    pub reattach: Vec<Reattach>,
}

/// A container task an earlier start left running: re-attached, not
/// interrupted (its container survives keel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reattach {
    pub id: i64,
    pub name: String,
    pub args: Vec<String>,
    pub session_id: Option<String>,
    pub attempt: i64,
    pub next_seq: i64,
    /// Output bytes stored so far (kept and dropped): skipped on re-attach.
    pub stored: i64,
    pub log_bytes: i64,
    /// Where the stored output ends in the engine's log (timestamp form,
    /// newest fragment that has one): re-attach resumes after it.
    pub resume: Option<String>,
}

/// At start: every task RUNNING under an older boot epoch is INTERRUPTED
/// at once (no timeout guessing); one whose name is in `retry` (name →
/// max_attempts) and has attempts left is QUEUED again with attempt + 1.
pub fn recover(
    conn: &Connection,
    at: &str,
    epoch: i64,
    retry: &HashMap<String, u32>,
    reattach: &std::collections::HashSet<String>,
) -> Result<Recovery, StoreError> {
    type Left = (i64, String, i64, Option<i64>, Option<i64>, Option<i64>);
    let rows: Vec<Left> = conn
        .prepare_cached(
            "SELECT id, name, attempt, pid, pid_start, boot_epoch FROM tasks
             WHERE state = 'RUNNING' ORDER BY id",
        )?
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = Recovery::default();
    for (id, name, attempt, pid, pid_start, ran_in) in rows {
        if ran_in.is_some_and(|e| e >= epoch) {
            continue;
        }
        if reattach.contains(&name) {
            let detail = format!(
                "re-attached by start #{epoch} (it ran in start #{})",
                ran_in.unwrap_or(0)
            );
            conn.prepare_cached("UPDATE tasks SET boot_epoch = ?2 WHERE id = ?1")?
                .execute(params![id, epoch])?;
            record_state(
                conn,
                at,
                id,
                TaskState::Running,
                epoch,
                attempt,
                Some(&detail),
            )?;
            let (args, session_id, log_bytes, log_dropped): (String, Option<String>, i64, i64) =
                conn.prepare_cached(
                    "SELECT args_json, session_id, log_bytes, log_dropped FROM tasks WHERE id = ?1",
                )?
                .query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
            let next_seq: i64 = conn
                .prepare_cached(
                    "SELECT COALESCE(MAX(seq), 0) + 1 FROM log_fragments WHERE task_id = ?1",
                )?
                .query_row([id], |r| r.get(0))?;
            let resume: Option<String> = conn
                .prepare_cached(
                    "SELECT resume FROM log_fragments WHERE task_id = ?1 AND resume IS NOT NULL
                     ORDER BY seq DESC LIMIT 1",
                )?
                .query_row([id], |r| r.get(0))
                .optional()?;
            out.reattach.push(Reattach {
                id,
                name,
                args: serde_json::from_str(&args).unwrap_or_default(),
                session_id,
                attempt,
                next_seq,
                stored: log_bytes + log_dropped,
                log_bytes,
                resume,
            });
            continue;
        }
        let detail = format!(
            "keel restarted (start #{epoch}) while it ran in start #{}",
            ran_in.unwrap_or(0)
        );
        record_state(
            conn,
            at,
            id,
            TaskState::Interrupted,
            epoch,
            attempt,
            Some(&detail),
        )?;
        out.interrupted += 1;
        if let (Some(pid), Some(pid_start)) = (pid, pid_start) {
            out.orphans.push(Orphan { id, pid, pid_start });
        }
        if retry
            .get(&name)
            .is_some_and(|&max| attempt < i64::from(max))
        {
            requeue(conn, at, id, epoch, attempt + 1)?;
            out.requeued += 1;
        }
    }
    Ok(out)
}

/// Every task (oldest first), optionally in one state.
pub fn list_tasks(
    conn: &Connection,
    state: Option<&str>,
    limit: i64,
) -> Result<Vec<TaskRow>, StoreError> {
    let sql = format!("{TASK_COLUMNS} WHERE (?1 IS NULL OR state = ?1) ORDER BY id LIMIT ?2");
    let rows = conn
        .prepare_cached(&sql)?
        .query_map(params![state, limit], task_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// One task by id.
pub fn get_task(conn: &Connection, id: i64) -> Result<Option<TaskRow>, StoreError> {
    let sql = format!("{TASK_COLUMNS} WHERE id = ?1");
    Ok(conn
        .prepare_cached(&sql)?
        .query_row([id], task_row)
        .optional()?)
}

/// One task with every transition, oldest first.
pub fn task_detail(conn: &Connection, id: i64) -> Result<Option<TaskDetail>, StoreError> {
    let Some(task) = get_task(conn, id)? else {
        return Ok(None);
    };
    let states = task_states(conn, id)?;
    Ok(Some(TaskDetail { task, states }))
}

/// Every task with its transitions (oldest first), optionally in one state.
pub fn list_details(
    conn: &Connection,
    state: Option<&str>,
    limit: i64,
) -> Result<Vec<TaskDetail>, StoreError> {
    let mut out = Vec::new();
    for task in list_tasks(conn, state, limit)? {
        let states = task_states(conn, task.id)?;
        out.push(TaskDetail { task, states });
    }
    Ok(out)
}

fn task_states(conn: &Connection, id: i64) -> Result<Vec<StateRow>, StoreError> {
    let rows = conn
        .prepare_cached(
            "SELECT state, at, boot_epoch, attempt, detail FROM task_states
             WHERE task_id = ?1 ORDER BY seq",
        )?
        .query_map([id], |r| {
            Ok(StateRow {
                state: r.get(0)?,
                at: r.get(1)?,
                boot_epoch: r.get(2)?,
                attempt: r.get(3)?,
                detail: r.get(4)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// A chat's newest tasks, newest first.
pub fn session_tasks(
    conn: &Connection,
    session_id: &str,
    limit: i64,
) -> Result<Vec<TaskRow>, StoreError> {
    let sql = format!("{TASK_COLUMNS} WHERE session_id = ?1 ORDER BY id DESC LIMIT ?2");
    let rows = conn
        .prepare_cached(&sql)?
        .query_map(params![session_id, limit], task_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Output fragments of a task after `after_seq`, in order, optionally of
/// one stream, until about `max_bytes` are collected (at least one).
pub fn log_fragments(
    conn: &Connection,
    id: i64,
    stream: Option<&str>,
    after_seq: i64,
    max_bytes: usize,
) -> Result<Vec<(i64, String, Vec<u8>)>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, stream, bytes FROM log_fragments
         WHERE task_id = ?1 AND seq > ?2 AND (?3 IS NULL OR stream = ?3) ORDER BY seq",
    )?;
    let mut rows = stmt.query(params![id, after_seq, stream])?;
    let mut out = Vec::new();
    let mut total = 0usize;
    while let Some(r) = rows.next()? {
        let bytes: Vec<u8> = r.get(2)?;
        total += bytes.len();
        out.push((r.get(0)?, r.get(1)?, bytes));
        if total >= max_bytes {
            break;
        }
    }
    Ok(out)
}

/// Delete up to `limit` log fragments, then the transitions and rows, of
/// tasks that finished before `before` (RFC 3339). Bounded so no unit of
/// work holds the write lock long; the runner repeats while work is left.
/// Returns (tasks, fragments) deleted.
pub fn prune(conn: &Connection, before: &str, limit: i64) -> Result<(usize, usize), StoreError> {
    let fragments = conn
        .prepare_cached(
            "DELETE FROM log_fragments WHERE id IN (
                 SELECT f.id FROM tasks t JOIN log_fragments f ON f.task_id = t.id
                 WHERE t.finished_at IS NOT NULL AND t.finished_at < ?1 LIMIT ?2)",
        )?
        .execute(params![before, limit])?;
    if fragments as i64 >= limit {
        return Ok((0, fragments));
    }
    let ids: Vec<i64> = conn
        .prepare_cached(
            "SELECT id FROM tasks WHERE finished_at IS NOT NULL AND finished_at < ?1
                 AND state NOT IN ('QUEUED', 'RUNNING') LIMIT ?2",
        )?
        .query_map(params![before, limit], |r| r.get(0))?
        .collect::<Result<Vec<_>, _>>()?;
    for id in &ids {
        conn.prepare_cached("DELETE FROM task_states WHERE task_id = ?1")?
            .execute([id])?;
        conn.prepare_cached("DELETE FROM log_fragments WHERE task_id = ?1")?
            .execute([id])?;
        conn.prepare_cached("DELETE FROM tasks WHERE id = ?1")?
            .execute([id])?;
    }
    Ok((ids.len(), fragments))
}

/// `(state, count)` of every task, and the stored log bytes: `keel status`
/// and the runner's gauges. A scan of the tasks table (retention keeps it
/// small); never on the hot path.
pub fn counts(conn: &Connection) -> Result<(Vec<(String, i64)>, i64), StoreError> {
    let rows = conn
        .prepare_cached("SELECT state, COUNT(*) FROM tasks GROUP BY state ORDER BY state")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    let bytes: i64 = conn
        .prepare_cached("SELECT COALESCE(SUM(log_bytes), 0) FROM tasks")?
        .query_row([], |r| r.get(0))?;
    Ok((rows, bytes))
}

// ---- messages to the PersistenceActor ----

/// Queue a task. Sent by the runner for the CLI and HTTP.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<i64, StoreError>")]
pub struct CreateTask(pub NewTask);

impl Handler<CreateTask> for PersistenceActor {
    type Result = ResponseFuture<Result<i64, StoreError>>;
    fn handle(&mut self, msg: CreateTask, _: &mut Context<Self>) -> Self::Result {
        self.call(move |c, at| create_task(c, &at.text, &msg.0))
    }
}

/// Cancel a task. Sent by the runner for the CLI and HTTP.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<CancelOutcome, StoreError>")]
pub struct RequestCancel(pub i64);

impl Handler<RequestCancel> for PersistenceActor {
    type Result = ResponseFuture<Result<CancelOutcome, StoreError>>;
    fn handle(&mut self, msg: RequestCancel, _: &mut Context<Self>) -> Self::Result {
        self.call(move |c, at| request_cancel(c, &at.text, msg.0, None))
    }
}

/// QUEUED → RUNNING, committed before the spawn. Sent by the runner.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Option<StartInfo>, StoreError>")]
pub struct StartTask {
    pub id: i64,
    pub epoch: i64,
}

impl Handler<StartTask> for PersistenceActor {
    type Result = ResponseFuture<Result<Option<StartInfo>, StoreError>>;
    fn handle(&mut self, msg: StartTask, _: &mut Context<Self>) -> Self::Result {
        self.call(move |c, at| start_task(c, &at.text, msg.id, msg.epoch))
    }
}

/// The spawned process's pid and start time. Sent by the runner.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(), StoreError>")]
pub struct RecordTaskPid {
    pub id: i64,
    pub pid: i64,
    pub pid_start: i64,
}

impl Handler<RecordTaskPid> for PersistenceActor {
    type Result = ResponseFuture<Result<(), StoreError>>;
    fn handle(&mut self, msg: RecordTaskPid, _: &mut Context<Self>) -> Self::Result {
        self.call(move |c, _| record_pid(c, msg.id, msg.pid, msg.pid_start))
    }
}

/// A batch of captured output. Sent by a task's supervisor, which reads no
/// more output until the answer comes (back-pressure).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(), StoreError>")]
pub struct AppendLogs {
    pub id: i64,
    /// Shared so a retry after a storage failure does not copy the batch.
    pub fragments: std::sync::Arc<Vec<Fragment>>,
}

impl Handler<AppendLogs> for PersistenceActor {
    type Result = ResponseFuture<Result<(), StoreError>>;
    fn handle(&mut self, msg: AppendLogs, _: &mut Context<Self>) -> Self::Result {
        self.call(move |c, at| append_logs(c, &at.text, msg.id, &msg.fragments))
    }
}

/// The end of an attempt. Sent by a task's supervisor.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<bool, StoreError>")]
pub struct FinishTask(pub Finish);

impl Handler<FinishTask> for PersistenceActor {
    type Result = ResponseFuture<Result<bool, StoreError>>;
    fn handle(&mut self, msg: FinishTask, _: &mut Context<Self>) -> Self::Result {
        self.call(move |c, at| finish_task(c, at, &msg.0))
    }
}

/// Queued tasks and pending cancels. Sent by the runner.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<TaskWork, StoreError>")]
pub struct GetTaskWork {
    pub limit: i64,
}

impl Handler<GetTaskWork> for PersistenceActor {
    type Result = ResponseFuture<Result<TaskWork, StoreError>>;
    fn handle(&mut self, msg: GetTaskWork, _: &mut Context<Self>) -> Self::Result {
        self.call(move |c, _| task_work(c, msg.limit))
    }
}

/// Startup recovery (R21). Sent once by the runner, before ready.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Recovery, StoreError>")]
pub struct RecoverTasks {
    pub epoch: i64,
    pub retry: HashMap<String, u32>,
    /// Names of container tasks (re-attached instead of interrupted).
    pub reattach: std::collections::HashSet<String>,
}

impl Handler<RecoverTasks> for PersistenceActor {
    type Result = ResponseFuture<Result<Recovery, StoreError>>;
    fn handle(&mut self, msg: RecoverTasks, _: &mut Context<Self>) -> Self::Result {
        self.call(move |c, at| recover(c, &at.text, msg.epoch, &msg.retry, &msg.reattach))
    }
}

/// Tasks with their transitions for the admin API, oldest first.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Vec<TaskDetail>, StoreError>")]
pub struct GetTasks {
    pub state: Option<String>,
    pub limit: i64,
}

impl Handler<GetTasks> for PersistenceActor {
    type Result = ResponseFuture<Result<Vec<TaskDetail>, StoreError>>;
    fn handle(&mut self, msg: GetTasks, _: &mut Context<Self>) -> Self::Result {
        self.call(move |c, _| list_details(c, msg.state.as_deref(), msg.limit))
    }
}

/// One task with its transitions, for the admin API.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Option<TaskDetail>, StoreError>")]
pub struct GetTask(pub i64);

impl Handler<GetTask> for PersistenceActor {
    type Result = ResponseFuture<Result<Option<TaskDetail>, StoreError>>;
    fn handle(&mut self, msg: GetTask, _: &mut Context<Self>) -> Self::Result {
        self.call(move |c, _| task_detail(c, msg.0))
    }
}

/// Output of a task for the admin API (bounded per call).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Vec<(i64, String, Vec<u8>)>, StoreError>")]
pub struct GetTaskLogs {
    pub id: i64,
    pub stream: Option<String>,
    pub after_seq: i64,
    pub max_bytes: usize,
}

impl Handler<GetTaskLogs> for PersistenceActor {
    type Result = ResponseFuture<Result<Vec<(i64, String, Vec<u8>)>, StoreError>>;
    fn handle(&mut self, msg: GetTaskLogs, _: &mut Context<Self>) -> Self::Result {
        self.call(move |c, _| {
            log_fragments(
                c,
                msg.id,
                msg.stream.as_deref(),
                msg.after_seq,
                msg.max_bytes,
            )
        })
    }
}

/// Prune finished tasks (one bounded batch). Sent by the runner.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(usize, usize), StoreError>")]
pub struct PruneTasks {
    pub before: String,
    pub limit: i64,
}

impl Handler<PruneTasks> for PersistenceActor {
    type Result = ResponseFuture<Result<(usize, usize), StoreError>>;
    fn handle(&mut self, msg: PruneTasks, _: &mut Context<Self>) -> Self::Result {
        self.call(move |c, _| prune(c, &msg.before, msg.limit))
    }
}

/// Counts by state and stored log bytes. Sent by the runner for gauges.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(Vec<(String, i64)>, i64), StoreError>")]
pub struct GetTaskCounts;

impl Handler<GetTaskCounts> for PersistenceActor {
    type Result = ResponseFuture<Result<(Vec<(String, i64)>, i64), StoreError>>;
    fn handle(&mut self, _: GetTaskCounts, _: &mut Context<Self>) -> Self::Result {
        self.call(|c, _| counts(c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persistence::migrate;

    fn at() -> Stamp {
        Stamp::from_ms(1_764_590_400_000)
    }

    fn db() -> Connection {
        let mut c = Connection::open_in_memory().unwrap();
        migrate::migrate(&mut c, std::path::Path::new(":memory:")).unwrap();
        crate::persistence::meta::next_boot_epoch(&c).unwrap();
        c
    }

    fn new(name: &str) -> NewTask {
        NewTask {
            name: name.into(),
            args: vec!["a b".into()],
            session_id: None,
            origin: Origin::Cli,
        }
    }

    fn states(c: &Connection, id: i64) -> Vec<String> {
        task_detail(c, id)
            .unwrap()
            .unwrap()
            .states
            .into_iter()
            .map(|s| format!("{}@{}#{}", s.state, s.boot_epoch, s.attempt))
            .collect()
    }

    #[test]
    fn a_task_runs_through_its_states_and_keeps_its_output_in_order() {
        let c = db();
        let id = create_task(&c, &at().text, &new("echo")).unwrap();
        let info = start_task(&c, &at().text, id, 1).unwrap().unwrap();
        assert_eq!((info.attempt, info.next_seq, info.args.len()), (1, 1, 1));
        assert!(start_task(&c, &at().text, id, 1).unwrap().is_none());
        let frag = |seq, stream, b: &[u8]| Fragment {
            seq,
            stream,
            bytes: b.to_vec(),
            resume: None,
        };
        append_logs(
            &c,
            &at().text,
            id,
            &[frag(1, "stdout", b"a\xff"), frag(2, "stderr", b"e")],
        )
        .unwrap();
        let done = finish_task(
            &c,
            &at(),
            &Finish {
                id,
                state: TaskState::Succeeded,
                exit_code: Some(0),
                detail: None,
                attempt: 1,
                epoch: 1,
                dropped: 0,
                fragments: vec![frag(3, "stdout", b"z")],
                requeue: false,
                notice: None,
            },
        )
        .unwrap();
        assert!(done);
        assert_eq!(
            states(&c, id),
            ["QUEUED@1#1", "RUNNING@1#1", "SUCCEEDED@1#1"]
        );
        let t = get_task(&c, id).unwrap().unwrap();
        assert_eq!((t.log_bytes, t.exit_code), (4, Some(0)));
        assert!(t.finished_at.is_some());
        let out: Vec<u8> = log_fragments(&c, id, Some("stdout"), 0, usize::MAX)
            .unwrap()
            .into_iter()
            .flat_map(|(_, _, b)| b)
            .collect();
        assert_eq!(out, b"a\xffz");
    }

    #[test]
    fn recovery_interrupts_older_epochs_only_and_requeues_with_the_same_id() {
        let c = db();
        let a = create_task(&c, &at().text, &new("retry")).unwrap();
        let b = create_task(&c, &at().text, &new("once")).unwrap();
        start_task(&c, &at().text, a, 1).unwrap();
        start_task(&c, &at().text, b, 1).unwrap();
        record_pid(&c, a, 4242, 99).unwrap();
        let retry = HashMap::from([("retry".to_string(), 2u32)]);
        // The same epoch: nothing is an orphan.
        assert_eq!(
            recover(&c, &at().text, 1, &retry, &Default::default())
                .unwrap()
                .interrupted,
            0
        );
        let r = recover(&c, &at().text, 2, &retry, &Default::default()).unwrap();
        assert_eq!((r.interrupted, r.requeued), (2, 1));
        assert_eq!(
            r.orphans,
            vec![Orphan {
                id: a,
                pid: 4242,
                pid_start: 99
            }]
        );
        assert_eq!(get_task(&c, a).unwrap().unwrap().state, "QUEUED");
        assert_eq!(get_task(&c, b).unwrap().unwrap().state, "INTERRUPTED");
        // Attempt 2 of 2 interrupted again: not requeued.
        start_task(&c, &at().text, a, 2).unwrap();
        let r = recover(&c, &at().text, 3, &retry, &Default::default()).unwrap();
        assert_eq!((r.interrupted, r.requeued), (1, 0));
        assert_eq!(
            states(&c, a),
            [
                "QUEUED@1#1",
                "RUNNING@1#1",
                "INTERRUPTED@2#1",
                "QUEUED@2#2",
                "RUNNING@2#2",
                "INTERRUPTED@3#2"
            ]
        );
    }

    #[test]
    fn cancel_stops_a_queued_task_and_flags_a_running_one_within_its_chat() {
        let c = db();
        let mut t = new("x");
        t.session_id = Some("webhook:c1".into());
        let q = create_task(&c, &at().text, &t).unwrap();
        let r = create_task(&c, &at().text, &t).unwrap();
        start_task(&c, &at().text, r, 1).unwrap();
        assert_eq!(
            request_cancel(&c, &at().text, q, Some("webhook:c2")).unwrap(),
            CancelOutcome::NotFound
        );
        assert_eq!(
            request_cancel(&c, &at().text, q, Some("webhook:c1")).unwrap(),
            CancelOutcome::Cancelled
        );
        assert_eq!(
            request_cancel(&c, &at().text, r, None).unwrap(),
            CancelOutcome::Requested
        );
        let work = task_work(&c, 10).unwrap();
        assert_eq!((work.queued.len(), work.cancel), (0, vec![r]));
        assert_eq!(
            request_cancel(&c, &at().text, q, None).unwrap(),
            CancelOutcome::Finished("CANCELLED".into())
        );
    }

    #[test]
    fn pruning_removes_old_finished_tasks_in_bounded_batches() {
        let c = db();
        let id = create_task(&c, &at().text, &new("x")).unwrap();
        let live = create_task(&c, &at().text, &new("x")).unwrap();
        start_task(&c, &at().text, id, 1).unwrap();
        let frags: Vec<Fragment> = (1..=5)
            .map(|seq| Fragment {
                seq,
                stream: "stdout",
                bytes: vec![b'x'; 10],
                resume: None,
            })
            .collect();
        append_logs(&c, &at().text, id, &frags).unwrap();
        record_state(&c, &at().text, id, TaskState::Failed, 1, 1, None).unwrap();
        let cut = "9999-01-01T00:00:00Z";
        assert_eq!(prune(&c, cut, 3).unwrap(), (0, 3));
        assert_eq!(prune(&c, cut, 3).unwrap(), (1, 2));
        assert_eq!(prune(&c, cut, 3).unwrap(), (0, 0));
        assert!(get_task(&c, id).unwrap().is_none());
        assert!(get_task(&c, live).unwrap().is_some());
    }
}
