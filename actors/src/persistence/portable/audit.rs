//! Appending to the audit log in portable SQL (R31), for store code that
//! runs on both backends (tasks). The record and its hash are exactly those
//! of [`crate::persistence::audit::append_at`]; on PostgreSQL appenders of
//! every instance first take one transaction-scoped advisory lock, so the
//! chain gets one order (without it two instances would read the same last
//! record and both try its successor's `seq`). On SQLite the writer holds
//! the whole database, which serialises appenders already.

use serde_json::Value;

use crate::chain;
use crate::error::StoreError;
use crate::persistence::audit::{payload, KINDS};
use crate::persistence::sql::{Backend, Sql};
use crate::vals;

/// 0x6b65656c + 1 ("keel" + 1): the audit chain's lock id (the schema's is
/// "keel").
const AUDIT_LOCK: i64 = 1_801_807_213;

/// Append one record (in the caller's transaction). `kind` must be one of
/// [`KINDS`]. Returns its sequence number.
pub fn append_at(
    db: &mut dyn Sql,
    at: &str,
    kind: &str,
    detail: &Value,
) -> Result<i64, StoreError> {
    if !KINDS.contains(&kind) {
        return Err(StoreError::Invalid(format!("unknown audit kind {kind:?}")));
    }
    if db.backend() == Backend::Postgres {
        db.exec("SELECT pg_advisory_xact_lock($1)", vals![AUDIT_LOCK])?;
    }
    let last = db.row("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1", &[])?;
    let (seq, prev) = match last {
        Some(r) => (r.int(0)? + 1, r.text(1)?),
        None => (1, chain::GENESIS.to_string()),
    };
    let detail = detail.to_string();
    let hash = chain::link_hash(seq, kind, &payload(at, &detail), &prev);
    db.exec(
        "INSERT INTO audit (seq, at, kind, detail, prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6)",
        vals![seq, at, kind, detail, prev, hash],
    )?;
    Ok(seq)
}
