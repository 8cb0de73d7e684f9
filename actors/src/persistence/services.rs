//! The services event log (`service_events`, R25) and the containers'
//! instance id (`meta`). All of their SQL lives here. An event is appended
//! in the writer's transaction with its chain link computed from the last
//! stored record (`chain::next_link`), so the decision and its link commit
//! together.

use actix::prelude::*;
use rusqlite::Connection;

use super::sql::{self, Sql, SqliteSql};
use super::PersistenceActor;
use crate::chain::{self, Link};
use crate::clock::Stamp;
use crate::error::StoreError;
use crate::vals;

/// `meta` key of the instance id.
pub const INSTANCE_KEY: &str = "containers.instance";
/// `adapter_state` row holding the reaper's status for `keel status`.
pub const STATUS_KEY: &str = "containers:status";

fn link(r: &sql::Row) -> Result<Link, StoreError> {
    Ok(Link {
        seq: r.int(0)?,
        kind: r.text(1)?,
        payload: r.text(2)?,
        prev_hash: r.text(3)?,
        hash: r.text(4)?,
    })
}

/// Every record in seq order.
pub fn load(conn: &Connection) -> Result<Vec<Link>, StoreError> {
    load_sql(&mut SqliteSql(conn))
}

/// [`load`] on either backend.
pub fn load_sql(db: &mut dyn Sql) -> Result<Vec<Link>, StoreError> {
    db.rows(
        "SELECT seq, kind, payload, prev_hash, hash FROM service_events ORDER BY seq",
        &[],
    )?
    .iter()
    .map(link)
    .collect()
}

/// Append one record after the last stored one.
pub fn append(
    conn: &Connection,
    at: &Stamp,
    kind: &str,
    payload: &str,
) -> Result<Link, StoreError> {
    append_sql(&mut SqliteSql(conn), at, kind, payload)
}

/// [`append`] on either backend (serialised across instances on
/// PostgreSQL, like the audit log).
pub fn append_sql(
    db: &mut dyn Sql,
    at: &Stamp,
    kind: &str,
    payload: &str,
) -> Result<Link, StoreError> {
    sql::serialise_on(db, "lock:service_events")?;
    let last = db
        .row(
            "SELECT seq, kind, payload, prev_hash, hash FROM service_events
             ORDER BY seq DESC LIMIT 1",
            &[],
        )?
        .map(|r| link(&r))
        .transpose()?;
    let link = chain::next_link(last.as_ref(), kind, payload);
    db.exec(
        "INSERT INTO service_events (seq, kind, payload, prev_hash, hash, created_at)
         VALUES ($1, $2, $3, $4, $5, $6)",
        vals![
            link.seq,
            &link.kind,
            &link.payload,
            &link.prev_hash,
            &link.hash,
            &at.text
        ],
    )?;
    Ok(link)
}

/// The stored instance id, storing `proposed` first if there is none.
pub fn instance(conn: &Connection, proposed: &str) -> Result<String, StoreError> {
    instance_sql(&mut SqliteSql(conn), proposed)
}

/// [`instance`] on either backend.
pub fn instance_sql(db: &mut dyn Sql, proposed: &str) -> Result<String, StoreError> {
    db.exec(
        "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
        vals![INSTANCE_KEY, proposed],
    )?;
    db.row("SELECT value FROM meta WHERE key = $1", vals![INSTANCE_KEY])?
        .ok_or_else(|| StoreError::Invalid("the instance id vanished".into()))?
        .text(0)
}

/// The stored instance id, if any (read-only callers).
pub fn stored_instance_sql(db: &mut dyn Sql) -> Result<Option<String>, StoreError> {
    db.row("SELECT value FROM meta WHERE key = $1", vals![INSTANCE_KEY])?
        .map(|r| r.text(0))
        .transpose()
}

/// Append a service event; resolves after COMMIT. Sent by the reaper.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Link, StoreError>")]
pub struct AppendServiceEvent {
    pub kind: String,
    pub payload: String,
}

impl Handler<AppendServiceEvent> for PersistenceActor {
    type Result = ResponseFuture<Result<Link, StoreError>>;
    fn handle(&mut self, msg: AppendServiceEvent, _: &mut Context<Self>) -> Self::Result {
        self.call_sql(move |db, at| {
            let link = append_sql(db, at, &msg.kind, &msg.payload)?;
            // The audit record commits with the decision (R31): the
            // service's name and the event's seq, never the spec's env.
            let name = serde_json::from_str::<serde_json::Value>(&msg.payload)
                .ok()
                .and_then(|v| v.get("name").cloned());
            super::audit::append_sql(
                db,
                &at.text,
                &msg.kind,
                &serde_json::json!({"name": name, "event_seq": link.seq}),
            )?;
            Ok(link)
        })
    }
}

/// Read the whole event log. Sent by the reaper at start.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Vec<Link>, StoreError>")]
pub struct GetServiceEvents;

impl Handler<GetServiceEvents> for PersistenceActor {
    type Result = ResponseFuture<Result<Vec<Link>, StoreError>>;
    fn handle(&mut self, _: GetServiceEvents, _: &mut Context<Self>) -> Self::Result {
        self.call_sql(|db, _| load_sql(db))
    }
}

/// The instance id (created from `proposed` at first start). Sent by the
/// reaper at start when `[containers] instance` is not set.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<String, StoreError>")]
pub struct GetOrCreateInstance {
    pub proposed: String,
}

impl Handler<GetOrCreateInstance> for PersistenceActor {
    type Result = ResponseFuture<Result<String, StoreError>>;
    fn handle(&mut self, msg: GetOrCreateInstance, _: &mut Context<Self>) -> Self::Result {
        self.call_sql(move |db, _| instance_sql(db, &msg.proposed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persistence::testing::{at, db};

    #[test]
    fn appends_chain_and_the_schema_refuses_edits() {
        let c = db();
        let a = append(&c, &at(), "service_deployed", "{}").unwrap();
        let b = append(&c, &at(), "service_killed", "{}").unwrap();
        assert_eq!((a.seq, b.seq), (1, 2));
        assert_eq!(b.prev_hash, a.hash);
        let all = load(&c).unwrap();
        assert!(chain::verify(&all).ok());
        assert!(c
            .execute("UPDATE service_events SET payload = 'x'", [])
            .is_err());
        assert!(c.execute("DELETE FROM service_events", []).is_err());
        assert_eq!(instance(&c, "abc").unwrap(), "abc");
        assert_eq!(instance(&c, "zzz").unwrap(), "abc");
        assert_eq!(
            stored_instance_sql(&mut SqliteSql(&c)).unwrap().as_deref(),
            Some("abc")
        );
    }
}
