//! The audit log (R31): append-only (SQLite triggers refuse UPDATE and
//! DELETE, `migrations/0007_vault.sql`), hash-chained with the same scheme as the services event log
//! ([`crate::chain`]: `sha256(seq ‖ kind ‖ payload ‖ prev_hash)` over
//! length-prefixed fields, the payload being `[at, detail]` as JSON; the
//! first record's `prev_hash` is 64 zeros). `verify` recomputes the chain and names the
//! first record that does not match.
//!
//! Every event goes through [`append`] (inside the caller's transaction, so
//! the record commits with what it records) or the [`AppendAudit`] message
//! (its own group-commit job). Details hold names, never secret values.

use actix::prelude::*;
use rusqlite::Connection;
use serde::Serialize;
use serde_json::Value;

use super::sql::{self, Sql, SqliteSql};
use super::PersistenceActor;
use crate::chain;
use crate::clock::Stamp;
use crate::error::StoreError;

/// The record kinds (one per event).
pub const KINDS: &[&str] = &[
    "started",
    "stopped",
    "reloaded",
    "token_granted",
    "token_revoked",
    "auth_failed",
    "secret_set",
    "secret_removed",
    "task_started",
    "task_cancelled",
    "service_deployed",
    "service_killed",
    "migrated",
    "rekeyed",
    "restored",
    "data_loss_accepted",
    "owner_notified",
];

/// One audit record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditRecord {
    pub seq: i64,
    pub at: String,
    pub kind: String,
    pub detail: Value,
    pub prev_hash: String,
    pub hash: String,
}

/// The chained payload of a record: its time and detail as a JSON array
/// (unambiguous), hashed with the services event log's scheme
/// ([`crate::chain::link_hash`]).
pub(crate) fn payload(at: &str, detail: &str) -> String {
    serde_json::to_string(&(at, detail)).expect("strings serialize")
}

/// Append one record (in the caller's transaction). `kind` must be one of
/// [`KINDS`]. Returns its sequence number.
pub fn append(
    conn: &Connection,
    at: &Stamp,
    kind: &str,
    detail: &Value,
) -> Result<i64, StoreError> {
    append_sql(&mut SqliteSql(conn), &at.text, kind, detail)
}

/// [`append`] on either backend. On PostgreSQL, appends by several
/// instances serialise on the lock row `lock:audit` first, so each reads
/// the head the one before it committed.
pub fn append_sql(
    db: &mut dyn Sql,
    at: &str,
    kind: &str,
    detail: &Value,
) -> Result<i64, StoreError> {
    if !KINDS.contains(&kind) {
        return Err(StoreError::Invalid(format!("unknown audit kind {kind:?}")));
    }
    sql::serialise_on(db, "lock:audit")?;
    let last = db.row("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1", &[])?;
    let (seq, prev) = match last {
        Some(r) => (r.int(0)? + 1, r.text(1)?),
        None => (1, chain::GENESIS.to_string()),
    };
    let detail = detail.to_string();
    let hash = chain::link_hash(seq, kind, &payload(at, &detail), &prev);
    db.exec(
        "INSERT INTO audit (seq, at, kind, detail, prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6)",
        crate::vals![seq, at, kind, detail, prev, hash],
    )?;
    Ok(seq)
}

/// Every record (`since` = None) or those at or after `since`, in order.
fn rows(db: &mut dyn Sql, since: Option<&str>) -> Result<Vec<sql::Row>, StoreError> {
    match since {
        None => db.rows(
            "SELECT seq, at, kind, detail, prev_hash, hash FROM audit ORDER BY seq",
            &[],
        ),
        Some(since) => db.rows(
            "SELECT seq, at, kind, detail, prev_hash, hash FROM audit WHERE at >= $1 ORDER BY seq",
            crate::vals![since],
        ),
    }
}

/// Records at or after `since` (RFC 3339, compared as text: keel writes
/// UTC with millisecond precision), in order.
pub fn list(conn: &Connection, since: Option<&str>) -> Result<Vec<AuditRecord>, StoreError> {
    list_sql(&mut SqliteSql(conn), since)
}

/// [`list`] on either backend.
pub fn list_sql(db: &mut dyn Sql, since: Option<&str>) -> Result<Vec<AuditRecord>, StoreError> {
    rows(db, since)?
        .into_iter()
        .map(|r| {
            let detail = r.text(3)?;
            Ok(AuditRecord {
                seq: r.int(0)?,
                at: r.text(1)?,
                kind: r.text(2)?,
                detail: serde_json::from_str(&detail).unwrap_or(Value::String(detail)),
                prev_hash: r.text(4)?,
                hash: r.text(5)?,
            })
        })
        .collect()
}

/// Check the whole chain. `Ok(n)` = n records, all linked; `Err((seq,
/// reason))` names the first bad record.
pub fn verify(conn: &Connection) -> Result<Result<u64, (i64, String)>, StoreError> {
    verify_sql(&mut SqliteSql(conn))
}

/// [`verify`] on either backend.
pub fn verify_sql(db: &mut dyn Sql) -> Result<Result<u64, (i64, String)>, StoreError> {
    let links = rows(db, None)?
        .into_iter()
        .map(|r| {
            Ok(chain::Link {
                seq: r.int(0)?,
                kind: r.text(2)?,
                payload: payload(&r.text(1)?, &r.text(3)?),
                prev_hash: r.text(4)?,
                hash: r.text(5)?,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let check = chain::verify(&links);
    Ok(match check.damage {
        None => Ok(check.records as u64),
        Some(damage) => {
            let seq = links.get(check.valid).map_or(0, |l| l.seq);
            Err((seq, damage.to_string()))
        }
    })
}

/// Append one record as its own job; resolves after COMMIT. Sent by the
/// lifecycle (started, stopped, reloaded), the admin socket (secrets,
/// tokens), the HTTP auth summary (auth_failed) and, for services, by the
/// containers work (`service_deployed`, `service_killed`).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<i64, StoreError>")]
pub struct AppendAudit {
    pub kind: &'static str,
    pub detail: Value,
}

impl Handler<AppendAudit> for PersistenceActor {
    type Result = ResponseFuture<Result<i64, StoreError>>;
    fn handle(&mut self, msg: AppendAudit, _: &mut Context<Self>) -> Self::Result {
        self.call_sql(move |db, at| append_sql(db, &at.text, msg.kind, &msg.detail))
    }
}

/// The records at or after `since` and the whole chain's check (`keel
/// audit` on a shared store, which has no file to open).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(Vec<AuditRecord>, Result<u64, (i64, String)>), StoreError>")]
pub struct GetAudit {
    pub since: Option<String>,
}

impl Handler<GetAudit> for PersistenceActor {
    type Result =
        ResponseFuture<Result<(Vec<AuditRecord>, Result<u64, (i64, String)>), StoreError>>;
    fn handle(&mut self, msg: GetAudit, _: &mut Context<Self>) -> Self::Result {
        self.call_sql(move |db, _| Ok((list_sql(db, msg.since.as_deref())?, verify_sql(db)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persistence::testing::{at, db};
    use serde_json::json;

    #[test]
    fn chain_verifies_and_triggers_refuse_changes() {
        let c = db();
        for i in 0..3 {
            append(&c, &at(), "token_granted", &json!({"id": format!("t{i}")})).unwrap();
        }
        assert_eq!(verify(&c).unwrap(), Ok(3));
        assert!(append(&c, &at(), "nonsense", &json!({})).is_err());
        let e = c
            .execute("UPDATE audit SET detail = '{}' WHERE seq = 2", [])
            .unwrap_err();
        assert!(e.to_string().contains("append-only"), "{e}");
        assert!(c.execute("DELETE FROM audit", []).is_err());
        // Tamper under the triggers: the chain names the record.
        c.execute_batch("DROP TRIGGER audit_no_update").unwrap();
        c.execute(
            "UPDATE audit SET detail = '{\"id\":\"x\"}' WHERE seq = 2",
            [],
        )
        .unwrap();
        let bad = verify(&c).unwrap().unwrap_err();
        assert_eq!(bad.0, 2);
        assert_eq!(list(&c, None).unwrap().len(), 3);
    }
}
