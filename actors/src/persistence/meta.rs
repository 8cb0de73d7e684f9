//! Facts about the store itself: the boot epoch (R38), the storage probe,
//! the counts `keel status` shows, integrity checks and WAL checkpoints.

use actix::prelude::*;
use rusqlite::Connection;
use serde::Serialize;

use super::sql::{self, Sql, SqliteSql};
use super::PersistenceActor;
use crate::clock::Stamp;
use crate::error::StoreError;
use crate::vals;

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
    next_boot_epoch_sql(&mut SqliteSql(conn))
}

/// [`next_boot_epoch`] on either backend: one upsert, so instances
/// starting together on one shared store each get their own epoch.
pub fn next_boot_epoch_sql(db: &mut dyn Sql) -> Result<i64, StoreError> {
    db.row(
        "INSERT INTO meta (key, value) VALUES ('boot_epoch', '1')
         ON CONFLICT (key) DO UPDATE SET value = CAST(CAST(meta.value AS BIGINT) + 1 AS TEXT)
         RETURNING value",
        &[],
    )?
    .map(|r| r.text(0))
    .transpose()?
    .and_then(|v| v.parse().ok())
    .ok_or_else(|| StoreError::Invalid("the boot epoch is not a number".into()))
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
    let db = &mut SqliteSql(conn);
    let version = schema_version(db)?;
    stats_sql(db, version)
}

/// The schema version, read the backend's way.
pub fn schema_version(db: &mut dyn Sql) -> Result<i64, StoreError> {
    let sql = match db.backend() {
        sql::Backend::Sqlite => "PRAGMA user_version",
        sql::Backend::Postgres => "SELECT COALESCE(MAX(version), 0) FROM keel_schema_migrations",
    };
    db.row(sql, &[])?.map_or(Ok(0), |r| r.int(0))
}

/// [`stats`] on either backend, with the schema version read the
/// backend's way (`PRAGMA user_version`, `keel_schema_migrations`).
pub fn stats_sql(db: &mut dyn Sql, schema_version: i64) -> Result<StoreStats, StoreError> {
    // Trigger-kept counts on SQLite (schema 11): reading them is flat, a
    // `COUNT(*) ... WHERE state = 'sent'` scans the whole outbox.
    let outbox = match db.backend() {
        sql::Backend::Sqlite => "SELECT n FROM outbox_counts WHERE state = $1",
        sql::Backend::Postgres => "SELECT COUNT(*) FROM outbox WHERE state = $1",
    };
    let mut one = |sql: &str, params: &[sql::Value]| -> Result<i64, StoreError> {
        db.row(sql, params)?.map_or(Ok(0), |r| r.int(0))
    };
    Ok(StoreStats {
        schema_version,
        boot_epoch: one(
            "SELECT CAST(value AS BIGINT) FROM meta WHERE key = 'boot_epoch'",
            &[],
        )?,
        sessions: one("SELECT COUNT(*) FROM sessions", &[])?,
        turns: one(
            "SELECT CAST(COALESCE(SUM(next_seq - 1), 0) AS BIGINT) FROM sessions",
            &[],
        )?,
        outbox_pending: one(outbox, vals!["pending"])?,
        outbox_unknown: one(outbox, vals!["unknown"])?,
        outbox_sent: one(outbox, vals!["sent"])?,
        awaiting_agent: one("SELECT COUNT(*) FROM turns WHERE status = 'awaiting'", &[])?,
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
    crate::failpoint::hit("mid_checkpoint");
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
        self.call_sql(|db, _| {
            next_boot_epoch_sql(db)?;
            let version = schema_version(db)?;
            stats_sql(db, version)
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
        self.call_sql(|db, _| {
            let version = schema_version(db)?;
            stats_sql(db, version)
        })
    }
}

/// Which starts an owner notice covers (R18, coalesced).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoticeCoverage {
    /// Starts since the last notice, this one included.
    pub restarts: i64,
    pub first_epoch: i64,
    pub last_epoch: i64,
}

/// What became of an owner notice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoticeOutcome {
    /// Committed with its outbox row.
    Sent(NoticeCoverage),
    /// The last notice is younger than the interval: try again in this long.
    Deferred { retry_in_ms: i64 },
    /// No start waits to be told about.
    Nothing,
}

fn meta_i64(db: &mut dyn Sql, key: &str) -> Result<Option<i64>, StoreError> {
    Ok(db
        .row("SELECT value FROM meta WHERE key = $1", vals![key])?
        .map(|r| r.text(0))
        .transpose()?
        .and_then(|v| v.parse().ok()))
}

fn set_meta(db: &mut dyn Sql, key: &str, value: i64) -> Result<(), StoreError> {
    db.exec(
        "INSERT INTO meta (key, value) VALUES ($1, $2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        vals![key, value.to_string()],
    )?;
    Ok(())
}

/// Count start `boot_epoch` (when given) towards the owner notice and
/// decide whether one is due: at most one per `min_interval_ms`, covering
/// every start since the last. Deciding and resetting happen in the
/// caller's transaction, with the notice itself.
pub fn owner_notice_due(
    db: &mut dyn Sql,
    at: &Stamp,
    boot_epoch: Option<i64>,
    min_interval_ms: i64,
) -> Result<Result<NoticeCoverage, NoticeOutcome>, StoreError> {
    // Instances starting together on one shared store decide one at a time.
    sql::serialise_on(db, "lock:owner_notice")?;
    let mut pending = meta_i64(db, "owner_restarts_pending")?.unwrap_or(0);
    let mut first = meta_i64(db, "owner_pending_first_epoch")?;
    let mut last = meta_i64(db, "owner_pending_last_epoch")?;
    if let Some(epoch) = boot_epoch {
        pending += 1;
        first = first.or(Some(epoch));
        last = Some(epoch);
        set_meta(db, "owner_restarts_pending", pending)?;
        set_meta(db, "owner_pending_first_epoch", first.unwrap_or(epoch))?;
        set_meta(db, "owner_pending_last_epoch", epoch)?;
    }
    if pending == 0 {
        return Ok(Err(NoticeOutcome::Nothing));
    }
    if let Some(sent_ms) = meta_i64(db, "owner_notice_last_ms")? {
        let age = at.ms.saturating_sub(sent_ms);
        if (0..min_interval_ms).contains(&age) {
            return Ok(Err(NoticeOutcome::Deferred {
                retry_in_ms: min_interval_ms - age,
            }));
        }
    }
    set_meta(db, "owner_restarts_pending", 0)?;
    set_meta(db, "owner_notice_last_ms", at.ms)?;
    db.exec(
        "DELETE FROM meta WHERE key IN ('owner_pending_first_epoch', 'owner_pending_last_epoch')",
        &[],
    )?;
    let last = last.unwrap_or(0);
    Ok(Ok(NoticeCoverage {
        restarts: pending,
        first_epoch: first.unwrap_or(last),
        last_epoch: last,
    }))
}

/// Renders the notice text for the starts it covers. Supplied by the app.
pub type RenderNotice = Box<dyn Fn(&NoticeCoverage) -> String + Send>;

/// Tell the owner about the starts since the last notice, if one is due
/// (R18): decide, render, and commit the notice with its outbox row in one
/// unit. Sent by the app at start (with this start's epoch) and, when the
/// notice was deferred, again once the interval passed (without).
#[derive(Message)]
#[rtype(result = "Result<NoticeOutcome, StoreError>")]
pub struct CommitOwnerNotice {
    pub session: super::SessionKey,
    pub deliver: bool,
    pub boot_epoch: Option<i64>,
    pub min_interval_ms: i64,
    pub render: RenderNotice,
}

impl Handler<CommitOwnerNotice> for PersistenceActor {
    type Result = ResponseFuture<Result<NoticeOutcome, StoreError>>;
    fn handle(&mut self, msg: CommitOwnerNotice, _: &mut Context<Self>) -> Self::Result {
        self.call_sql(move |db, at| {
            match owner_notice_due(db, at, msg.boot_epoch, msg.min_interval_ms)? {
                Err(outcome) => Ok(outcome),
                Ok(cover) => {
                    let text = (msg.render)(&cover);
                    super::portable::sessions::commit_notice(
                        db,
                        at,
                        &msg.session,
                        &text,
                        msg.deliver,
                    )?;
                    // What the owner was told, and which starts it covers:
                    // the console shows it beside each restart.
                    super::audit::append_sql(
                        db,
                        &at.text,
                        "owner_notified",
                        &serde_json::json!({
                            "first_epoch": cover.first_epoch,
                            "last_epoch": cover.last_epoch,
                            "restarts": cover.restarts,
                            "delivered": msg.deliver,
                            "text": text,
                        }),
                    )?;
                    Ok(NoticeOutcome::Sent(cover))
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persistence::testing::db;

    #[test]
    fn owner_notices_are_coalesced_per_interval() {
        let c = db();
        let t = |ms| Stamp::from_ms(ms);
        let first = owner_notice_due(&mut SqliteSql(&c), &t(1_000), Some(1), 300_000).unwrap();
        assert_eq!(
            first,
            Ok(NoticeCoverage {
                restarts: 1,
                first_epoch: 1,
                last_epoch: 1
            })
        );
        for (epoch, ms) in [(2, 2_000), (3, 3_000), (4, 4_000)] {
            let r = owner_notice_due(&mut SqliteSql(&c), &t(ms), Some(epoch), 300_000).unwrap();
            assert_eq!(
                r,
                Err(NoticeOutcome::Deferred {
                    retry_in_ms: 301_000 - ms
                })
            );
        }
        // Too early still, then due: one notice for starts 2–4.
        assert!(
            owner_notice_due(&mut SqliteSql(&c), &t(200_000), None, 300_000)
                .unwrap()
                .is_err()
        );
        let late = owner_notice_due(&mut SqliteSql(&c), &t(301_000), None, 300_000).unwrap();
        assert_eq!(
            late,
            Ok(NoticeCoverage {
                restarts: 3,
                first_epoch: 2,
                last_epoch: 4
            })
        );
        assert_eq!(
            owner_notice_due(&mut SqliteSql(&c), &t(302_000), None, 300_000).unwrap(),
            Err(NoticeOutcome::Nothing)
        );
        // A clock that went back is not "younger than the interval" forever.
        let back = owner_notice_due(&mut SqliteSql(&c), &t(100), Some(5), 300_000).unwrap();
        assert!(back.is_ok(), "{back:?}");
    }
}
