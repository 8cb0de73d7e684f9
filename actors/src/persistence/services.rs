//! The services event log (`service_events`, R25) and the containers'
//! instance id (`meta`). All of their SQL lives here. An event is appended
//! in the writer's transaction with its chain link computed from the last
//! stored record (`chain::next_link`), so the decision and its link commit
//! together.

use actix::prelude::*;
use rusqlite::{params, Connection, OptionalExtension};

use super::PersistenceActor;
use crate::chain::{self, Link};
use crate::clock::Stamp;
use crate::error::StoreError;

/// `meta` key of the instance id.
pub const INSTANCE_KEY: &str = "containers.instance";
/// `adapter_state` row holding the reaper's status for `keel status`.
pub const STATUS_KEY: &str = "containers:status";

/// Every record in seq order.
pub fn load(conn: &Connection) -> Result<Vec<Link>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, kind, payload, prev_hash, hash FROM service_events ORDER BY seq",
    )?;
    let rows = stmt
        .query_map([], |r| {
            Ok(Link {
                seq: r.get(0)?,
                kind: r.get(1)?,
                payload: r.get(2)?,
                prev_hash: r.get(3)?,
                hash: r.get(4)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Append one record after the last stored one.
pub fn append(
    conn: &Connection,
    at: &Stamp,
    kind: &str,
    payload: &str,
) -> Result<Link, StoreError> {
    let last = conn
        .prepare_cached(
            "SELECT seq, kind, payload, prev_hash, hash FROM service_events
             ORDER BY seq DESC LIMIT 1",
        )?
        .query_row([], |r| {
            Ok(Link {
                seq: r.get(0)?,
                kind: r.get(1)?,
                payload: r.get(2)?,
                prev_hash: r.get(3)?,
                hash: r.get(4)?,
            })
        })
        .optional()?;
    let link = chain::next_link(last.as_ref(), kind, payload);
    conn.prepare_cached(
        "INSERT INTO service_events (seq, kind, payload, prev_hash, hash, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        link.seq,
        link.kind,
        link.payload,
        link.prev_hash,
        link.hash,
        at.text
    ])?;
    Ok(link)
}

/// The stored instance id, storing `proposed` first if there is none.
pub fn instance(conn: &Connection, proposed: &str) -> Result<String, StoreError> {
    conn.prepare_cached("INSERT OR IGNORE INTO meta (key, value) VALUES (?1, ?2)")?
        .execute(params![INSTANCE_KEY, proposed])?;
    Ok(conn
        .prepare_cached("SELECT value FROM meta WHERE key = ?1")?
        .query_row(params![INSTANCE_KEY], |r| r.get(0))?)
}

/// The stored instance id, if any (read-only callers).
pub fn stored_instance(conn: &Connection) -> Result<Option<String>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT value FROM meta WHERE key = ?1")?
        .query_row(params![INSTANCE_KEY], |r| r.get(0))
        .optional()?)
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
        self.call(move |c, at| {
            let link = append(c, at, &msg.kind, &msg.payload)?;
            // The audit record commits with the decision (R31): the
            // service's name and the event's seq, never the spec's env.
            let name = serde_json::from_str::<serde_json::Value>(&msg.payload)
                .ok()
                .and_then(|v| v.get("name").cloned());
            super::audit::append(
                c,
                at,
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
        self.call(|c, _| load(c))
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
        self.call(move |c, _| instance(c, &msg.proposed))
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
        assert_eq!(stored_instance(&c).unwrap().as_deref(), Some("abc"));
    }
}
