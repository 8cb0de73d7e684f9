//! Facts about the store itself: the boot epoch (R38), the storage probe,
//! the counts `keel status` shows, integrity checks and WAL checkpoints.

use actix::prelude::*;
use rusqlite::{Connection, OptionalExtension};
use serde::Serialize;

use super::PersistenceActor;
use crate::clock::Stamp;
use crate::error::StoreError;

/// Counts for `keel status` and the startup notification.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct StoreStats {
    pub schema_version: i64,
    pub boot_epoch: i64,
    pub sessions: i64,
    pub turns: i64,
    pub outbox_pending: i64,
    pub outbox_unknown: i64,
    pub outbox_sent: i64,
    pub awaiting_agent: i64,
}

/// Count this start (R38) and return the new boot epoch.
pub fn next_boot_epoch(conn: &Connection) -> Result<i64, StoreError> {
    let current: Option<String> = conn
        .prepare_cached("SELECT value FROM meta WHERE key = 'boot_epoch'")?
        .query_row([], |r| r.get(0))
        .optional()?;
    let next = current.and_then(|v| v.parse::<i64>().ok()).unwrap_or(0) + 1;
    conn.prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES ('boot_epoch', ?1)")?
        .execute([next.to_string()])?;
    Ok(next)
}

/// Bytes the storage probe writes: enough that "the probe succeeded" means
/// there is real headroom again, not just room for one tiny page.
const PROBE_BYTES: i64 = 64 * 1024;

/// A write used to find out whether storage works again.
pub fn probe(conn: &Connection, at: &Stamp) -> Result<(), StoreError> {
    conn.prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES ('last_probe', ?1)")?
        .execute([&at.text])?;
    conn.prepare_cached(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('probe_headroom', randomblob(?1))",
    )?
    .execute([PROBE_BYTES])?;
    Ok(())
}

/// Counts for status output.
pub fn stats(conn: &Connection) -> Result<StoreStats, StoreError> {
    let one = |sql: &str| -> Result<i64, StoreError> {
        Ok(conn.prepare_cached(sql)?.query_row([], |r| r.get(0))?)
    };
    Ok(StoreStats {
        schema_version: one("PRAGMA user_version")?,
        boot_epoch: one("SELECT COALESCE((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'boot_epoch'), 0)")?,
        sessions: one("SELECT COUNT(*) FROM sessions")?,
        turns: one("SELECT COALESCE(SUM(next_seq - 1), 0) FROM sessions")?,
        outbox_pending: one("SELECT COUNT(*) FROM outbox WHERE state = 'pending'")?,
        outbox_unknown: one("SELECT COUNT(*) FROM outbox WHERE state = 'unknown'")?,
        outbox_sent: one("SELECT COUNT(*) FROM outbox WHERE state = 'sent'")?,
        awaiting_agent: one("SELECT COUNT(*) FROM turns WHERE status = 'awaiting'")?,
    })
}

/// `PRAGMA quick_check`: "ok" or the first problems found.
pub fn quick_check(conn: &Connection) -> Result<Vec<String>, rusqlite::Error> {
    let mut stmt = conn.prepare("PRAGMA quick_check(20)")?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
    rows.collect()
}

/// Fold the WAL back into the database file and truncate it to zero bytes.
/// Returns (busy, wal frames, frames checkpointed).
pub fn checkpoint_truncate(conn: &Connection) -> Result<(i64, i64, i64), StoreError> {
    Ok(conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    })?)
}

// ---- messages to the PersistenceActor ----

/// Count this start and read the store's counts. Sent once by the app.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<StoreStats, StoreError>")]
pub struct RecordBoot;

impl Handler<RecordBoot> for PersistenceActor {
    type Result = ResponseFuture<Result<StoreStats, StoreError>>;
    fn handle(&mut self, _: RecordBoot, _: &mut Context<Self>) -> Self::Result {
        self.call(|c, _| {
            next_boot_epoch(c)?;
            stats(c)
        })
    }
}

/// Store counts for `/metrics` and status.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<StoreStats, StoreError>")]
pub struct GetStats;

impl Handler<GetStats> for PersistenceActor {
    type Result = ResponseFuture<Result<StoreStats, StoreError>>;
    fn handle(&mut self, _: GetStats, _: &mut Context<Self>) -> Self::Result {
        self.call(|c, _| stats(c))
    }
}
