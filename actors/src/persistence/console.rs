//! The store's part of the operator console (`/console`, `/v1/stats`): one
//! read-only snapshot of what an operator looks at — adapter statuses,
//! messages per channel and per minute over the last hour, outbox states,
//! timers due next, running and failed tasks, recent starts. All of its SQL
//! lives here; every query is bounded (indexes, `LIMIT`, or the last hour's
//! turns only) because the console polls it every few seconds.

use std::collections::BTreeMap;

use actix::prelude::*;
use rusqlite::Connection;
use serde::Serialize;

use super::sql::{self, Sql, SqliteSql};
use super::PersistenceActor;
use crate::clock::Stamp;
use crate::error::StoreError;
use crate::vals;

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

fn one(db: &mut dyn Sql, sql: &str, params: &[sql::Value]) -> Result<i64, StoreError> {
    db.row(sql, params)?.map_or(Ok(0), |r| r.int(0))
}

/// Read the snapshot at wall-clock time `now_ms`.
pub fn snapshot(conn: &Connection, now_ms: i64) -> Result<StoreSnapshot, StoreError> {
    snapshot_sql(&mut SqliteSql(conn), now_ms)
}

/// [`snapshot`] on either backend.
pub fn snapshot_sql(db: &mut dyn Sql, now_ms: i64) -> Result<StoreSnapshot, StoreError> {
    let mut s = StoreSnapshot {
        schema_version: super::meta::schema_version(db)?,
        boot_epoch: one(
            db,
            "SELECT CAST(value AS BIGINT) FROM meta WHERE key = 'boot_epoch'",
            &[],
        )?,
        sessions: one(db, "SELECT COUNT(*) FROM sessions", &[])?,
        acked_per_minute: vec![0; CHART_MINUTES],
        ..StoreSnapshot::default()
    };
    s.statuses = db
        .rows(
            "SELECT adapter, state_json, updated_at FROM adapter_state
             WHERE substr(adapter, 1, length(CAST($1 AS TEXT))) = $1 ORDER BY adapter",
            vals![super::adapter_state::STATUS_PREFIX],
        )?
        .into_iter()
        .map(|r| {
            Ok(StatusRow {
                adapter: r
                    .text(0)?
                    .trim_start_matches(super::adapter_state::STATUS_PREFIX)
                    .to_string(),
                state_json: r.text(1)?,
                updated_at: r.text(2)?,
            })
        })
        .collect::<Result<_, StoreError>>()?;
    hour_counts(db, now_ms, &mut s)?;
    // Trigger-kept on SQLite (schema 11); counted on PostgreSQL.
    let outbox = match db.backend() {
        sql::Backend::Sqlite => "SELECT state, n FROM outbox_counts",
        sql::Backend::Postgres => "SELECT state, COUNT(*) FROM outbox GROUP BY state",
    };
    s.outbox = db
        .rows(outbox, &[])?
        .into_iter()
        .map(|r| Ok((r.text(0)?, r.int(1)?)))
        .collect::<Result<_, StoreError>>()?;
    for st in ["pending", "unknown", "failed", "sent"] {
        s.outbox.entry(st.to_string()).or_insert(0);
    }
    s.timers_active = one(
        db,
        "SELECT COUNT(*) FROM timers WHERE state = 'active'",
        &[],
    )?;
    s.timers_late = one(
        db,
        "SELECT COUNT(*) FROM timers WHERE state = 'active' AND next_run IS NOT NULL AND next_run < $1",
        vals![now_ms],
    )?;
    s.timers_missed = one(
        db,
        "SELECT CAST(COALESCE(SUM(missed_count), 0) AS BIGINT) FROM timers",
        &[],
    )?;
    s.timers_next = db
        .rows(
            "SELECT id, session_id, kind, callback, next_run FROM timers
             WHERE state = 'active' AND next_run IS NOT NULL ORDER BY next_run, id LIMIT 10",
            &[],
        )?
        .into_iter()
        .map(|r| {
            Ok(DueTimer {
                id: r.int(0)?,
                session: r.text(1)?,
                kind: r.text(2)?,
                callback: r.text(3)?,
                next_run_ms: r.int(4)?,
            })
        })
        .collect::<Result<_, StoreError>>()?;
    s.tasks_by_state = db
        .rows("SELECT state, COUNT(*) FROM tasks GROUP BY state", &[])?
        .into_iter()
        .map(|r| Ok((r.text(0)?, r.int(1)?)))
        .collect::<Result<_, StoreError>>()?;
    let task = |r: sql::Row| -> Result<TaskLine, StoreError> {
        Ok(TaskLine {
            id: r.int(0)?,
            name: r.text(1)?,
            state: r.text(2)?,
            exit_code: r.opt_int(3)?,
            detail: r.opt_text(4)?,
            at: r.text(5)?,
            log_tail: None,
        })
    };
    s.tasks_running = db
        .rows(
            "SELECT id, name, state, exit_code, detail, updated_at FROM tasks
             WHERE state = 'RUNNING' ORDER BY id LIMIT 20",
            &[],
        )?
        .into_iter()
        .map(task)
        .collect::<Result<_, _>>()?;
    for t in &mut s.tasks_running {
        t.log_tail = Some(log_tail(db, t.id)?);
    }
    s.tasks_failed = db
        .rows(
            "SELECT id, name, state, exit_code, detail, finished_at FROM tasks
             WHERE finished_at IS NOT NULL AND state IN ('FAILED', 'TIMED_OUT', 'INTERRUPTED')
             ORDER BY finished_at DESC LIMIT 10",
            &[],
        )?
        .into_iter()
        .map(task)
        .collect::<Result<_, _>>()?;
    s.life = db
        .rows(
            "SELECT seq, at, kind, detail FROM audit
             WHERE kind IN ('started', 'stopped', 'owner_notified')
             ORDER BY seq DESC LIMIT 40",
            &[],
        )?
        .into_iter()
        .map(|r| {
            Ok(LifeEvent {
                seq: r.int(0)?,
                at: r.text(1)?,
                kind: r.text(2)?,
                detail: r.text(3)?,
            })
        })
        .collect::<Result<_, StoreError>>()?;
    Ok(s)
}

/// Messages per channel (user turns in, assistant turns out) over the last
/// minute and hour, and inbound turns per minute. Reads only sessions
/// touched in the last hour, each newest turn first until the hour ends
/// (a page of turns at a time).
fn hour_counts(db: &mut dyn Sql, now_ms: i64, s: &mut StoreSnapshot) -> Result<(), StoreError> {
    const PAGE: i64 = 500;
    let hour_ago = Stamp::from_ms(now_ms - 3_600_000).text;
    let minute_ago = Stamp::from_ms(now_ms - 60_000).text;
    let active = db.rows(
        "SELECT id, channel FROM sessions WHERE updated_at >= $1 ORDER BY updated_at DESC",
        vals![&hour_ago],
    )?;
    let mut read = 0usize;
    for session in active {
        let (id, channel) = (session.text(0)?, session.text(1)?);
        let counts = s.channels.entry(channel).or_default();
        let mut before = i64::MAX;
        'pages: loop {
            let page = db.rows(
                "SELECT seq, role, created_at FROM turns WHERE session_id = $1 AND seq < $2
                 ORDER BY seq DESC LIMIT $3",
                vals![&id, before, PAGE],
            )?;
            let full = page.len() as i64 == PAGE;
            for row in page {
                before = row.int(0)?;
                let (role, at) = (row.text(1)?, row.text(2)?);
                if at < hour_ago {
                    break 'pages;
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
            if !full {
                break;
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
fn log_tail(db: &mut dyn Sql, task: i64) -> Result<String, StoreError> {
    let mut frags: Vec<Vec<u8>> = db
        .rows(
            "SELECT bytes FROM log_fragments WHERE task_id = $1 ORDER BY seq DESC LIMIT 8",
            vals![task],
        )?
        .into_iter()
        .map(|r| r.bytes(0))
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
        self.read_sql(move |db| snapshot_sql(db, m.now_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persistence::testing::db;
    use rusqlite::params;

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
