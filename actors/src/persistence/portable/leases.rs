//! Fenced leases (R49): one holder of a named lease at a time (a bot's
//! poller `poller:telegram:<bot>`, the container reconciler
//! `reconciler`), until its expiry; renewed by the holder every few
//! seconds, taken over by anyone once expired. The fencing token grows by
//! one at every change of holder and never goes back (a released lease is
//! expired, not deleted), so a write carrying a token can be refused when a
//! newer holder exists. Times are the instances' clocks in unix ms: the
//! instances' clocks must agree to well under the lease's length.

use crate::error::StoreError;
use crate::persistence::sql::{Sql, Value};
use crate::vals;

/// A lease as held: who, which token, until when.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Lease {
    pub name: String,
    pub holder: String,
    pub token: i64,
    pub expires_ms: i64,
    pub renewed_ms: i64,
}

/// Take or renew `name` for `holder` (`<instance>#<epoch>`) until
/// `now_ms + ttl_ms`. `Some(token)` while `holder` has it after the call;
/// `None` while another holder's lease has not expired. An earlier start of
/// the same instance (`<instance>#<older epoch>`) counts as gone: every
/// start registers a newer epoch, and that older start no longer renews
/// (R49), so a restarted single instance takes its leases back at once
/// instead of waiting out its own predecessor's expiry; the token still
/// grows, which fences any late write of that predecessor. The upsert is
/// one statement, so two instances racing for a free lease cannot both win
/// (the row is the arbiter on both backends).
pub fn acquire(
    db: &mut dyn Sql,
    name: &str,
    holder: &str,
    now_ms: i64,
    ttl_ms: i64,
) -> Result<Option<i64>, StoreError> {
    let current = db.row("SELECT holder FROM leases WHERE name = $1", vals![name])?;
    let predecessor = match current {
        Some(r) => {
            let current = r.text(0)?;
            earlier_start(&current, holder).then_some(current)
        }
        None => None,
    };
    // If the holder changed since that read, `holder = $5` no longer
    // matches and the usual rules decide.
    let row = db.row(
        "INSERT INTO leases (name, holder, token, expires_ms, renewed_ms)
         VALUES ($1, $2, 1, $3, $4)
         ON CONFLICT (name) DO UPDATE SET
             token = CASE WHEN leases.holder = excluded.holder AND leases.expires_ms > $4
                          THEN leases.token ELSE leases.token + 1 END,
             holder = excluded.holder,
             expires_ms = excluded.expires_ms,
             renewed_ms = excluded.renewed_ms
         WHERE leases.holder = excluded.holder OR leases.expires_ms <= $4
            OR leases.holder = $5
         RETURNING token",
        vals![
            name,
            holder,
            now_ms + ttl_ms,
            now_ms,
            predecessor.map_or(Value::Null, Value::Text)
        ],
    )?;
    row.map(|r| r.int(0)).transpose()
}

/// `current` is `<instance>#<e1>` and `holder` is `<instance>#<e2>` with
/// e1 < e2: an earlier start of the same instance.
fn earlier_start(current: &str, holder: &str) -> bool {
    let split = |h: &str| {
        h.rsplit_once('#')
            .and_then(|(id, epoch)| Some((id.to_string(), epoch.parse::<i64>().ok()?)))
    };
    matches!((split(current), split(holder)), (Some((a, e1)), Some((b, e2))) if a == b && e1 < e2)
}

/// A write made under a lease: refused unless `token` is still the current
/// token of `lease` when it commits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub lease: String,
    pub token: i64,
}

/// Give the lease up at once (it expires now; the token stays, so the next
/// holder's is higher).
pub fn release(db: &mut dyn Sql, name: &str, holder: &str, now_ms: i64) -> Result<(), StoreError> {
    db.exec(
        "UPDATE leases SET expires_ms = $3 WHERE name = $1 AND holder = $2",
        vals![name, holder, now_ms],
    )?;
    Ok(())
}

/// Refuse a write made under `token` unless it is still the current,
/// unexpired token of `name`. On PostgreSQL the lease row stays locked
/// until COMMIT, so no takeover can slip in between this check and the
/// write it guards.
pub fn check(db: &mut dyn Sql, name: &str, token: i64, now_ms: i64) -> Result<(), StoreError> {
    let sql = format!(
        "SELECT token, expires_ms, holder FROM leases WHERE name = $1{}",
        db.for_update()
    );
    match db.row(&sql, vals![name])? {
        Some(r) if r.int(0)? == token && r.int(1)? > now_ms => Ok(()),
        Some(r) => Err(StoreError::StaleLease(format!(
            "stale lease {name}: token {token} is not current (now {} held by {}{})",
            r.int(0)?,
            r.text(2)?,
            if r.int(1)? > now_ms { "" } else { ", expired" }
        ))),
        None => Err(StoreError::StaleLease(format!("no lease {name}"))),
    }
}

/// Every lease, by name.
pub fn list(db: &mut dyn Sql) -> Result<Vec<Lease>, StoreError> {
    db.rows(
        "SELECT name, holder, token, expires_ms, renewed_ms FROM leases ORDER BY name",
        &[],
    )?
    .iter()
    .map(|r| {
        Ok(Lease {
            name: r.text(0)?,
            holder: r.text(1)?,
            token: r.int(2)?,
            expires_ms: r.int(3)?,
            renewed_ms: r.int(4)?,
        })
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::earlier_start;

    #[test]
    fn only_an_older_epoch_of_the_same_instance_is_an_earlier_start() {
        assert!(earlier_start("a#2", "a#3"));
        assert!(earlier_start("x#y#9", "x#y#10"));
        assert!(!earlier_start("a#3", "a#3"));
        assert!(!earlier_start("a#4", "a#3"));
        assert!(!earlier_start("b#1", "a#3"));
        assert!(!earlier_start("a#2", "a#2#1"));
        assert!(!earlier_start("a", "a#1"));
        assert!(!earlier_start("a#x", "a#1"));
    }
}
