//! Instances sharing a store (R49): an id, a boot epoch bumped at every
//! start, and a heartbeat that extends the instance's own lease on life.
//! An instance whose `expires_ms` passed is dead to the others: its leases
//! expire the same way and its work is taken over.

use crate::error::StoreError;
use crate::persistence::sql::Sql;
use crate::vals;

/// One instance as `keel status` lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Instance {
    pub id: String,
    pub epoch: i64,
    pub started_ms: i64,
    pub heartbeat_ms: i64,
    pub expires_ms: i64,
    /// What the instance said about itself (version, listen address) as JSON.
    pub info: String,
}

/// Register a start of instance `id`: its next boot epoch (1 the first
/// time), alive until `now_ms + ttl_ms`.
pub fn register(
    db: &mut dyn Sql,
    id: &str,
    now_ms: i64,
    ttl_ms: i64,
    info: &str,
) -> Result<i64, StoreError> {
    let row = db
        .row(
            "INSERT INTO instances (id, epoch, started_ms, heartbeat_ms, expires_ms, info)
             VALUES ($1, 1, $2, $2, $3, $4)
             ON CONFLICT (id) DO UPDATE SET epoch = instances.epoch + 1,
                 started_ms = excluded.started_ms, heartbeat_ms = excluded.heartbeat_ms,
                 expires_ms = excluded.expires_ms, info = excluded.info
             RETURNING epoch",
            vals![id, now_ms, now_ms + ttl_ms, info],
        )?
        .ok_or_else(|| StoreError::Invalid("instance registration returned nothing".into()))?;
    row.int(0)
}

/// Extend the life of `id` at `epoch`. `false`: a newer start of the same
/// id exists (this process is a stale duplicate and must stop writing).
pub fn heartbeat(
    db: &mut dyn Sql,
    id: &str,
    epoch: i64,
    now_ms: i64,
    ttl_ms: i64,
) -> Result<bool, StoreError> {
    let n = db.exec(
        "UPDATE instances SET heartbeat_ms = $3, expires_ms = $4 WHERE id = $1 AND epoch = $2",
        vals![id, epoch, now_ms, now_ms + ttl_ms],
    )?;
    Ok(n == 1)
}

/// Every instance, by id.
pub fn list(db: &mut dyn Sql) -> Result<Vec<Instance>, StoreError> {
    db.rows(
        "SELECT id, epoch, started_ms, heartbeat_ms, expires_ms, info FROM instances ORDER BY id",
        &[],
    )?
    .iter()
    .map(|r| {
        Ok(Instance {
            id: r.text(0)?,
            epoch: r.int(1)?,
            started_ms: r.int(2)?,
            heartbeat_ms: r.int(3)?,
            expires_ms: r.int(4)?,
            info: r.text(5)?,
        })
    })
    .collect()
}

/// A clean stop of `id` at `epoch`: its life ends now (its leases were
/// released before).
pub fn leave(db: &mut dyn Sql, id: &str, epoch: i64, now_ms: i64) -> Result<(), StoreError> {
    db.exec(
        "UPDATE instances SET expires_ms = $3 WHERE id = $1 AND epoch = $2",
        vals![id, epoch, now_ms],
    )?;
    Ok(())
}
