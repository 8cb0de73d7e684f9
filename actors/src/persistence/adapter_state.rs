//! Adapter state in the `adapter_state` table (R14, R16): resume points such
//! as the Telegram offset, and each supervised adapter's status for
//! `keel status`. All of its SQL lives here (bound parameters, cached
//! statements); the messages beside it queue the work on the writer thread,
//! so a write is acknowledged only after its COMMIT.

use actix::prelude::*;
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use super::PersistenceActor;
use crate::clock::Stamp;
use crate::error::StoreError;

/// Rows whose key starts with this prefix hold a supervised adapter's status.
pub const STATUS_PREFIX: &str = "status:";

/// One `adapter_state` row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AdapterStateRow {
    pub adapter: String,
    pub state_json: String,
    pub updated_at: String,
}

/// The state stored under `adapter`, if any.
pub fn load(conn: &Connection, adapter: &str) -> Result<Option<String>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT state_json FROM adapter_state WHERE adapter = ?1")?
        .query_row(params![adapter], |r| r.get(0))
        .optional()?)
}

/// Insert or replace the state stored under `adapter`.
pub fn save(
    conn: &Connection,
    at: &Stamp,
    adapter: &str,
    state_json: &str,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO adapter_state (adapter, state_json, updated_at) VALUES (?1, ?2, ?3)
         ON CONFLICT(adapter) DO UPDATE SET state_json = excluded.state_json,
                                            updated_at = excluded.updated_at",
    )?
    .execute(params![adapter, state_json, at.text])?;
    Ok(())
}

/// Every adapter status row (key prefix [`STATUS_PREFIX`]), by name.
pub fn statuses(conn: &Connection) -> Result<Vec<AdapterStateRow>, StoreError> {
    statuses_sql(&mut super::sql::SqliteSql(conn))
}

/// [`statuses`] on either backend.
pub fn statuses_sql(db: &mut dyn super::sql::Sql) -> Result<Vec<AdapterStateRow>, StoreError> {
    db.rows(
        // CAST: PostgreSQL cannot pick a `length` for an untyped parameter.
        "SELECT adapter, state_json, updated_at FROM adapter_state
         WHERE substr(adapter, 1, length(CAST($1 AS TEXT))) = $1 ORDER BY adapter",
        crate::vals![STATUS_PREFIX],
    )?
    .into_iter()
    .map(|r| {
        Ok(AdapterStateRow {
            adapter: r.text(0)?,
            state_json: r.text(1)?,
            updated_at: r.text(2)?,
        })
    })
    .collect()
}

/// Read one adapter's state. Sent by adapters when they start.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Option<String>, StoreError>")]
pub struct GetAdapterState {
    pub adapter: String,
}

impl Handler<GetAdapterState> for PersistenceActor {
    type Result = ResponseFuture<Result<Option<String>, StoreError>>;
    fn handle(&mut self, msg: GetAdapterState, _: &mut Context<Self>) -> Self::Result {
        if self.backend() == super::sql::Backend::Postgres {
            return self.call_sql(move |db, _| {
                super::portable::sessions::load_adapter_state(db, &msg.adapter)
            });
        }
        self.call(move |c, _| load(c, &msg.adapter))
    }
}

/// Store one adapter's state; resolves after COMMIT. Sent by adapters (the
/// Telegram offset, after the batch's turns are durable) and by the adapter
/// supervisor (status).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(), StoreError>")]
pub struct PutAdapterState {
    pub adapter: String,
    pub state_json: String,
}

impl Handler<PutAdapterState> for PersistenceActor {
    type Result = ResponseFuture<Result<(), StoreError>>;
    fn handle(&mut self, msg: PutAdapterState, _: &mut Context<Self>) -> Self::Result {
        if self.backend() == super::sql::Backend::Postgres {
            return self.call_sql(move |db, at| {
                super::portable::sessions::save_adapter_state(db, at, &msg.adapter, &msg.state_json)
            });
        }
        self.call(move |c, at| save(c, at, &msg.adapter, &msg.state_json))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persistence::testing::{at, db as conn};

    #[test]
    fn save_replaces_and_statuses_lists_only_status_rows() {
        let c = conn();
        assert_eq!(load(&c, "telegram:x").unwrap(), None);
        save(&c, &at(), "telegram:x", r#"{"last_offset":1}"#).unwrap();
        save(&c, &at(), "telegram:x", r#"{"last_offset":7}"#).unwrap();
        assert_eq!(
            load(&c, "telegram:x").unwrap().as_deref(),
            Some(r#"{"last_offset":7}"#)
        );
        save(&c, &at(), "status:telegram", r#"{"state":"running"}"#).unwrap();
        let rows = statuses(&c).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].adapter, "status:telegram");
    }
}
