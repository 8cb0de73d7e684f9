//! The store's part of the operator console (`/console`, `/v1/stats`): one
//! read-only snapshot of what an operator looks at — adapter statuses,
//! messages per channel and per minute over the last hour, outbox states,
//! timers due next, running and failed tasks, recent starts. All of its SQL
//! lives here; every query is bounded (indexes, `LIMIT`, or the last hour's
//! turns only) because the console polls it every few seconds.

use std::collections::BTreeMap;

use actix::prelude::*;
use rusqlite::{params, Connection};
use serde::Serialize;

use super::PersistenceActor;
use crate::clock::Stamp;
use crate::error::StoreError;

/// Minutes the per-minute series covers.
pub const CHART_MINUTES: usize = 60;

/// Most turns read per snapshot for the hour's counts (a burst larger than
/// this is counted up to it and marked `truncated`).
const MAX_HOUR_TURNS: usize = 200_000;

/// Bytes of a running task's output the console shows.
pub const LOG_TAIL_BYTES: usize = 512;

/// Messages on one channel over the last minute and hour.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ChannelCounts {
    pub in_minute: u64,
    pub out_minute: u64,
    pub in_hour: u64,
    pub out_hour: u64,
}

/// One supervised adapter's stored status row.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct StatusRow {
    pub adapter: String,
    pub state_json: String,
    pub updated_at: String,
}

/// One active timer due soon.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DueTimer {
    pub id: i64,
    pub session: String,
    pub kind: String,
    pub callback: String,
    pub next_run_ms: i64,
}

/// One task for the console (running, or a recent failure).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TaskLine {
    pub id: i64,
    pub name: String,
    pub state: String,
    pub exit_code: Option<i64>,
    pub detail: Option<String>,
    pub at: String,
    /// The last [`LOG_TAIL_BYTES`] of output (running tasks), lossy UTF-8.
    pub log_tail: Option<String>,
}

/// A `started`, `stopped` or `owner_notified` audit record.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LifeEvent {
    pub seq: i64,
    pub at: String,
    pub kind: String,
    pub detail: String,
}

/// What the store says, read in one go.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct StoreSnapshot {
    pub schema_version: i64,
    pub boot_epoch: i64,
    pub sessions: i64,
    pub statuses: Vec<StatusRow>,
    pub channels: BTreeMap<String, ChannelCounts>,
    /// Inbound (acknowledged) messages per minute, oldest first; the last
    /// entry is the current minute.
    pub acked_per_minute: Vec<u64>,
    /// The hour's turns were more than the snapshot reads.
    pub truncated: bool,
    pub outbox: BTreeMap<String, i64>,
    pub timers_active: i64,
    /// Active timers whose due time has passed.
    pub timers_late: i64,
    /// Due instants skipped by misfire policy, over every timer kept.
    pub timers_missed: i64,
    pub timers_next: Vec<DueTimer>,
    pub tasks_by_state: BTreeMap<String, i64>,
    pub tasks_running: Vec<TaskLine>,
    pub tasks_failed: Vec<TaskLine>,
    /// Newest first.
    pub life: Vec<LifeEvent>,
}

fn one(conn: &Connection, sql: &str) -> Result<i64, StoreError> {
    Ok(conn.prepare_cached(sql)?.query_row([], |r| r.get(0))?)
}

/// Read the snapshot at wall-clock time `now_ms`.
pub fn snapshot(conn: &Connection, now_ms: i64) -> Result<StoreSnapshot, StoreError> {
    let mut s = StoreSnapshot {
        schema_version: one(conn, "PRAGMA user_version")?,
        boot_epoch: one(conn, "SELECT COALESCE((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'boot_epoch'), 0)")?,
        sessions: one(conn, "SELECT COUNT(*) FROM sessions")?,
        acked_per_minute: vec![0; CHART_MINUTES],
        ..StoreSnapshot::default()
    };
    s.statuses = super::adapter_state::statuses(conn)?
        .into_iter()
        .map(|r| StatusRow {
            adapter: r
                .adapter
                .trim_start_matches(super::adapter_state::STATUS_PREFIX)
                .to_string(),
            state_json: r.state_json,
            updated_at: r.updated_at,
        })
        .collect();
    hour_counts(conn, now_ms, &mut s)?;
    let mut stmt = conn.prepare_cached("SELECT state, n FROM outbox_counts")?;
    s.outbox = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    for st in ["pending", "unknown", "failed", "sent"] {
        s.outbox.entry(st.to_string()).or_insert(0);
    }
    s.timers_active = one(conn, "SELECT COUNT(*) FROM timers WHERE state = 'active'")?;
    s.timers_late = conn
        .prepare_cached(
            "SELECT COUNT(*) FROM timers WHERE state = 'active' AND next_run IS NOT NULL AND next_run < ?1",
        )?
        .query_row(params![now_ms], |r| r.get(0))?;
    s.timers_missed = one(conn, "SELECT COALESCE(SUM(missed_count), 0) FROM timers")?;
    let mut stmt = conn.prepare_cached(
        "SELECT id, session_id, kind, callback, next_run FROM timers
         WHERE state = 'active' AND next_run IS NOT NULL ORDER BY next_run, id LIMIT 10",
    )?;
    s.timers_next = stmt
        .query_map([], |r| {
            Ok(DueTimer {
                id: r.get(0)?,
                session: r.get(1)?,
                kind: r.get(2)?,
                callback: r.get(3)?,
                next_run_ms: r.get(4)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    let mut stmt = conn.prepare_cached("SELECT state, COUNT(*) FROM tasks GROUP BY state")?;
    s.tasks_by_state = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let task = |r: &rusqlite::Row<'_>| -> rusqlite::Result<TaskLine> {
        Ok(TaskLine {
            id: r.get(0)?,
            name: r.get(1)?,
            state: r.get(2)?,
            exit_code: r.get(3)?,
            detail: r.get(4)?,
            at: r.get(5)?,
            log_tail: None,
        })
    };
    let mut stmt = conn.prepare_cached(
        "SELECT id, name, state, exit_code, detail, updated_at FROM tasks
         WHERE state = 'RUNNING' ORDER BY id LIMIT 20",
    )?;
    s.tasks_running = stmt.query_map([], task)?.collect::<Result<_, _>>()?;
    for t in &mut s.tasks_running {
        t.log_tail = Some(log_tail(conn, t.id)?);
    }
    let mut stmt = conn.prepare_cached(
        "SELECT id, name, state, exit_code, detail, finished_at FROM tasks
         WHERE finished_at IS NOT NULL AND state IN ('FAILED', 'TIMED_OUT', 'INTERRUPTED')
         ORDER BY finished_at DESC LIMIT 10",
    )?;
    s.tasks_failed = stmt.query_map([], task)?.collect::<Result<_, _>>()?;
    let mut stmt = conn.prepare_cached(
        "SELECT seq, at, kind, detail FROM audit WHERE kind IN ('started', 'stopped', 'owner_notified')
         ORDER BY seq DESC LIMIT 40",
    )?;
    s.life = stmt
        .query_map([], |r| {
            Ok(LifeEvent {
                seq: r.get(0)?,
                at: r.get(1)?,
                kind: r.get(2)?,
                detail: r.get(3)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(s)
}

/// Messages per channel (user turns in, assistant turns out) over the last
/// minute and hour, and inbound turns per minute. Reads only sessions
/// touched in the last hour, each newest turn first until the hour ends.
fn hour_counts(conn: &Connection, now_ms: i64, s: &mut StoreSnapshot) -> Result<(), StoreError> {
    let hour_ago = Stamp::from_ms(now_ms - 3_600_000).text;
    let minute_ago = Stamp::from_ms(now_ms - 60_000).text;
    let mut sessions = conn.prepare_cached(
        "SELECT id, channel FROM sessions WHERE updated_at >= ?1 ORDER BY updated_at DESC",
    )?;
    let active: Vec<(String, String)> = sessions
        .query_map(params![hour_ago], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let mut turns = conn.prepare_cached(
        "SELECT role, created_at FROM turns WHERE session_id = ?1 ORDER BY seq DESC",
    )?;
    let mut read = 0usize;
    for (id, channel) in active {
        let counts = s.channels.entry(channel).or_default();
        let mut rows = turns.query(params![id])?;
        while let Some(row) = rows.next()? {
            let role: String = row.get(0)?;
            let at: String = row.get(1)?;
            if at < hour_ago {
                break;
            }
            read += 1;
            if read > MAX_HOUR_TURNS {
                s.truncated = true;
                return Ok(());
            }
            let recent = at >= minute_ago;
            match role.as_str() {
                "user" => {
                    counts.in_hour += 1;
                    counts.in_minute += u64::from(recent);
                    if let Some(ms) = parse_ms(&at) {
                        let back = ((now_ms - ms).max(0) / 60_000) as usize;
                        if back < CHART_MINUTES {
                            s.acked_per_minute[CHART_MINUTES - 1 - back] += 1;
                        }
                    }
                }
                "assistant" => {
                    counts.out_hour += 1;
                    counts.out_minute += u64::from(recent);
                }
                _ => {}
            }
        }
    }
    Ok(())
}

fn parse_ms(text: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.timestamp_millis())
}

/// The last bytes of a task's output (both streams, in order).
fn log_tail(conn: &Connection, task: i64) -> Result<String, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT bytes FROM log_fragments WHERE task_id = ?1 ORDER BY seq DESC LIMIT 8",
    )?;
    let mut frags: Vec<Vec<u8>> = stmt
        .query_map(params![task], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    frags.reverse();
    let all: Vec<u8> = frags.concat();
    let start = all.len().saturating_sub(LOG_TAIL_BYTES);
    Ok(String::from_utf8_lossy(&all[start..]).into_owned())
}

/// The snapshot of an in-memory (`--ephemeral`) store, read on the writer.
/// Sent by the console; a file store is read on the console's own
/// connection instead.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<StoreSnapshot, StoreError>")]
pub struct GetConsoleSnapshot {
    pub now_ms: i64,
}

impl Handler<GetConsoleSnapshot> for PersistenceActor {
    type Result = ResponseFuture<Result<StoreSnapshot, StoreError>>;
    fn handle(&mut self, m: GetConsoleSnapshot, _: &mut Context<Self>) -> Self::Result {
        self.call(move |c, _| snapshot(c, m.now_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persistence::testing::db;

    fn turn(conn: &Connection, session: &str, seq: i64, role: &str, at_ms: i64) {
        let at = Stamp::from_ms(at_ms).text;
        conn.execute(
            "INSERT INTO turns (session_id, seq, role, content, created_at) VALUES (?1, ?2, ?3, 'x', ?4)",
            params![session, seq, role, at],
        )
        .unwrap();
        conn.execute(
            "UPDATE sessions SET updated_at = ?2, next_seq = ?3 WHERE id = ?1",
            params![session, at, seq + 1],
        )
        .unwrap();
    }

    #[test]
    fn counts_only_the_last_hour_per_channel_and_minute() {
        let conn = db();
        let now = 1_764_590_400_000;
        for (id, ch) in [("telegram:1", "telegram"), ("webhook:a", "webhook")] {
            conn.execute(
                "INSERT INTO sessions (id, channel, chat, created_at, updated_at) VALUES (?1, ?2, 'c', 'x', 'x')",
                params![id, ch],
            )
            .unwrap();
        }
        // Two hours ago (not counted), 30 min ago, 10 s ago.
        turn(&conn, "telegram:1", 1, "user", now - 7_200_000);
        turn(&conn, "telegram:1", 2, "user", now - 1_800_000);
        turn(&conn, "telegram:1", 3, "assistant", now - 1_799_000);
        turn(&conn, "telegram:1", 4, "user", now - 10_000);
        turn(&conn, "webhook:a", 1, "user", now - 20_000);
        let s = snapshot(&conn, now).unwrap();
        let tg = &s.channels["telegram"];
        assert_eq!(
            (tg.in_minute, tg.out_minute, tg.in_hour, tg.out_hour),
            (1, 0, 2, 1)
        );
        assert_eq!(s.channels["webhook"].in_minute, 1);
        assert_eq!(s.acked_per_minute.len(), CHART_MINUTES);
        assert_eq!(s.acked_per_minute[CHART_MINUTES - 1], 2);
        assert_eq!(s.acked_per_minute[CHART_MINUTES - 31], 1);
        assert_eq!(s.acked_per_minute.iter().sum::<u64>(), 3);
        assert_eq!(s.outbox["pending"], 0);
    }
}
