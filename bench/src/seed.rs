//! The benchmarks' own SQL: seeding many timers in one statement, and the
//! reads a peer scheduler makes (load everything at start) and the figures
//! need (fire receipts). None of it runs in keel; it lives here so the
//! production library carries no benchmark code.

use keel_actors::clock::Stamp;
use keel_actors::error::StoreError;
use keel_actors::persistence::sessions::{self, SessionKey};
use keel_actors::persistence::timers;
use rusqlite::{params, Connection};

/// `keel bench timers`: insert `n` active one-shot reminders into session
/// `webhook:<chat>` in one statement, the i-th due at
/// `first_ms + i * step_us / 1000`. Returns the rows inserted. Benchmark
/// seeding only: one transaction, whatever `n`.
pub fn seed_timers(
    conn: &Connection,
    stamp: &Stamp,
    chat: &str,
    n: i64,
    first_ms: i64,
    step_us: i64,
) -> Result<i64, StoreError> {
    let tx = conn.unchecked_transaction()?;
    let session = SessionKey::new("webhook", chat);
    let at = &stamp.text;
    sessions::ensure_session(&tx, &session, None, at)?;
    let inserted = tx
        .prepare_cached(
            "WITH RECURSIVE seq(i) AS (SELECT 0 WHERE ?2 > 0
                 UNION ALL SELECT i + 1 FROM seq WHERE i + 1 < ?2)
             INSERT INTO timers (session_id, kind, schedule, timezone, callback, params_json,
                 misfire, catchup_secs, next_run, state, created_at, updated_at)
             SELECT ?1, 'once', CAST(?3 + i * ?4 / 1000 AS TEXT), 'UTC', 'reminder',
                 '{\"text\":\"bench\"}', 'fire_once', ?5, ?3 + i * ?4 / 1000, 'active', ?6, ?6
             FROM seq",
        )?
        .execute(params![
            session.id,
            n,
            first_ms,
            step_us,
            timers::DEFAULT_CATCHUP_SECS,
            at
        ])?;
    tx.commit()?;
    Ok(inserted as i64)
}

/// An active timer as a peer scheduler holds it when it loads everything
/// at start (the benchmark's baseline).
// The fields are loaded to measure what a peer holds in memory; the
// benchmark reads only `id` and `next_run`.
#[allow(dead_code)]
#[derive(Debug, Clone)]
pub struct LoadedTimer {
    pub id: i64,
    pub session_id: String,
    pub kind: String,
    pub schedule: String,
    pub timezone: String,
    pub callback: String,
    pub params_json: String,
    pub next_run: i64,
}

/// `keel bench timers` baseline: every active timer, a full scan into
/// structs (what keel's window avoids).
pub fn load_all_timers(conn: &Connection) -> Result<Vec<LoadedTimer>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, session_id, kind, schedule, timezone, callback, params_json, next_run
         FROM timers WHERE state = 'active' AND next_run IS NOT NULL",
    )?;
    let rows = stmt
        .query_map([], |r| {
            Ok(LoadedTimer {
                id: r.get(0)?,
                session_id: r.get(1)?,
                kind: r.get(2)?,
                schedule: r.get(3)?,
                timezone: r.get(4)?,
                callback: r.get(5)?,
                params_json: r.get(6)?,
                next_run: r.get(7)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// `keel bench timers`: `(due_at, late_ms)` of every receipt, and how
/// many there are.
pub fn receipts(conn: &Connection) -> Result<Vec<(i64, i64)>, StoreError> {
    let mut stmt = conn.prepare_cached("SELECT due_at, late_ms FROM timer_fires")?;
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// `keel bench timers`: receipts written so far.
/// The highest timer id holding a receipt, if any (a read at the end of
/// `timer_fires`' primary key).
pub fn highest_receipt(conn: &Connection) -> Result<Option<i64>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT max(timer_id) FROM timer_fires")?
        .query_row([], |r| r.get(0))?)
}

/// The lowest timer id of the webhook chat `chat` (what [`seed_timers`]
/// inserted there first).
pub fn first_timer_id(conn: &Connection, chat: &str) -> Result<i64, StoreError> {
    let session = SessionKey::new("webhook", chat);
    Ok(conn
        .prepare_cached("SELECT min(id) FROM timers WHERE session_id = ?1")?
        .query_row([&session.id], |r| r.get::<_, Option<i64>>(0))?
        .unwrap_or(0))
}

pub fn count_receipts(conn: &Connection) -> Result<i64, StoreError> {
    Ok(conn
        .prepare_cached("SELECT COUNT(*) FROM timer_fires")?
        .query_row([], |r| r.get(0))?)
}
