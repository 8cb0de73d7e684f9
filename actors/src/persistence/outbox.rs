//! The durable outbox (R3): the SQL of the `outbox` table and the messages
//! the outbox actor sends about it. A reply row is written in the same
//! transaction as its turn (`sessions.rs`), sent by the outbox actor and
//! marked sent only after the channel accepted it.

use actix::prelude::*;
use rusqlite::{params, Connection, OptionalExtension};

use super::sessions::SessionKey;
use super::PersistenceActor;
use crate::clock::Stamp;
use crate::error::StoreError;

/// A reply waiting to be sent.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    pub id: i64,
    pub session_id: String,
    pub channel: String,
    pub chat: String,
    pub in_reply_to: Option<String>,
    pub text: String,
    pub attempts: i64,
    /// State `unknown` (read outside the pending pages, so it does not move
    /// the outbox's page position).
    pub unknown: bool,
    /// Where the reply goes inside the chat (thread, topic, message to
    /// quote), as the channel gave it with the message answered.
    pub reply_meta: Option<serde_json::Value>,
    /// WhatsApp rows: when the chat's newest user turn was stored (unix
    /// ms), for the 24-hour customer-service window; `None` if never.
    pub last_inbound_ms: Option<i64>,
}

/// Queue a reply. A text longer than its channel takes in one message
/// (`text::part_limit`) becomes one row per part, in order (ids ascend, and
/// a session's rows go out one at a time in id order), each sent and
/// recorded on its own; returns the first row's id.
pub(super) fn insert_outbox(
    conn: &Connection,
    session: &SessionKey,
    turn_seq: i64,
    in_reply_to: Option<&str>,
    text: &str,
    reply_meta: Option<&str>,
    at: &str,
) -> Result<i64, StoreError> {
    let parts = match crate::text::part_limit(&session.channel) {
        Some(limit) => crate::text::split_message(text, limit),
        None => vec![text.to_string()],
    };
    let mut first = None;
    for part in &parts {
        conn.prepare_cached(
            "INSERT INTO outbox (session_id, turn_seq, channel, chat, in_reply_to, text, created_at,
                                 reply_meta)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?
        .execute(params![
            session.id,
            turn_seq,
            session.channel,
            session.chat,
            in_reply_to,
            part,
            at,
            reply_meta
        ])?;
        first.get_or_insert(conn.last_insert_rowid());
    }
    Ok(first.unwrap_or_default())
}

const OUTBOX_COLUMNS: &str =
    "SELECT id, session_id, channel, chat, in_reply_to, text, attempts, reply_meta,
        CASE WHEN channel = 'whatsapp' THEN
            (SELECT t.created_at FROM turns t WHERE t.session_id = outbox.session_id
               AND t.role = 'user' ORDER BY t.seq DESC LIMIT 1) END
     FROM outbox";

fn outbox_row(r: &rusqlite::Row<'_>, unknown: bool) -> rusqlite::Result<OutboxRow> {
    Ok(OutboxRow {
        id: r.get(0)?,
        session_id: r.get(1)?,
        channel: r.get(2)?,
        chat: r.get(3)?,
        in_reply_to: r.get(4)?,
        text: r.get(5)?,
        attempts: r.get(6)?,
        unknown,
        reply_meta: r
            .get::<_, Option<String>>(7)?
            .and_then(|m| serde_json::from_str(&m).ok()),
        last_inbound_ms: r
            .get::<_, Option<String>>(8)?
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(&t).ok())
            .map(|t| t.timestamp_millis()),
    })
}

/// Pending outbox rows with `id > after`, oldest first.
pub fn pending_outbox(
    conn: &Connection,
    after: i64,
    limit: i64,
) -> Result<Vec<OutboxRow>, StoreError> {
    let sql = format!("{OUTBOX_COLUMNS} WHERE state = 'pending' AND id > ?1 ORDER BY id LIMIT ?2");
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt
        .query_map(params![after, limit], |r| outbox_row(r, false))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// The channel accepted the reply.
pub fn mark_outbox_sent(conn: &Connection, at: &Stamp, id: i64) -> Result<(), StoreError> {
    conn.prepare_cached(
        "UPDATE outbox SET state = 'sent', attempts = attempts + 1, sent_at = ?2, last_error = NULL
         WHERE id = ?1",
    )?
    .execute(params![id, at.text])?;
    Ok(())
}

/// A send attempt failed (never undoes `sent` — an earlier attempt may have
/// been accepted meanwhile — nor `failed`: the first reason stays). `unknown` records that the request may have
/// arrived (it stays pending and is sent again: at-least-once, counted).
pub fn record_outbox_failure(conn: &Connection, id: i64, error: &str) -> Result<(), StoreError> {
    conn.prepare_cached(
        "UPDATE outbox SET attempts = attempts + 1, last_error = ?2
         WHERE id = ?1 AND state IN ('pending', 'unknown')",
    )?
    .execute(params![id, error])?;
    Ok(())
}

/// The request left but no answer came back: the reply may have arrived.
/// State `unknown` (counted by `keel status`); it is resent, and a later
/// accepted send marks it `sent`.
pub fn mark_outbox_unknown(conn: &Connection, id: i64, error: &str) -> Result<(), StoreError> {
    conn.prepare_cached(
        "UPDATE outbox SET state = 'unknown', attempts = attempts + 1, last_error = ?2
         WHERE id = ?1 AND state IN ('pending', 'unknown')",
    )?
    .execute(params![id, error])?;
    Ok(())
}

/// Rows whose last send had an unknown outcome, oldest first. Read on the
/// outbox's first page only (start, new routes): there is no index on
/// `unknown` (schema change avoided), so this scans, but only then.
pub fn unknown_outbox(conn: &Connection, limit: i64) -> Result<Vec<OutboxRow>, StoreError> {
    let sql = format!("{OUTBOX_COLUMNS} WHERE state = 'unknown' ORDER BY id LIMIT ?1");
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt
        .query_map(params![limit], |r| outbox_row(r, true))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Give up on a reply that can never be delivered (no route).
pub fn mark_outbox_failed(conn: &Connection, id: i64, error: &str) -> Result<(), StoreError> {
    conn.prepare_cached(
        "UPDATE outbox SET state = 'failed', attempts = attempts + 1, last_error = ?2
         WHERE id = ?1 AND state IN ('pending', 'unknown')",
    )?
    .execute(params![id, error])?;
    Ok(())
}

// ---- messages to the PersistenceActor ----

/// Pending outbox rows after an id. Sent by the outbox actor.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Vec<OutboxRow>, StoreError>")]
pub struct GetPendingOutbox {
    pub after: i64,
    pub limit: i64,
    /// Also return the rows in state `unknown` (one scan; the outbox asks
    /// at start and after new routes only).
    pub with_unknown: bool,
}

impl Handler<GetPendingOutbox> for PersistenceActor {
    type Result = ResponseFuture<Result<Vec<OutboxRow>, StoreError>>;
    fn handle(&mut self, msg: GetPendingOutbox, _: &mut Context<Self>) -> Self::Result {
        if self.backend() == super::sql::Backend::Postgres {
            return self.call_sql(move |db, _| {
                super::portable::outbox::pending_outbox(db, msg.after, msg.limit, msg.with_unknown)
            });
        }
        self.call(move |c, _| {
            let mut rows = pending_outbox(c, msg.after, msg.limit)?;
            // Rows whose last send had an unknown outcome are resent too.
            if msg.with_unknown {
                rows.extend(unknown_outbox(c, msg.limit)?);
                rows.sort_by_key(|r| r.id);
            }
            Ok(rows)
        })
    }
}

/// How a send attempt ended. Sent by the outbox actor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    Sent,
    /// Failed; stays `pending` and is retried.
    Failed(String),
    /// The request left but no answer came: state `unknown`, still retried.
    Unknown(String),
    /// Rejected for good: state `failed`.
    GaveUp(String),
}

/// Whether a row still waits to be sent (`pending` or `unknown`): a row
/// failed meanwhile (its chat became unreachable) is not retried.
pub fn outbox_live(conn: &Connection, id: i64) -> Result<bool, StoreError> {
    let state: Option<String> = conn
        .prepare_cached("SELECT state FROM outbox WHERE id = ?1")?
        .query_row([id], |r| r.get(0))
        .optional()?;
    Ok(matches!(state.as_deref(), Some("pending" | "unknown")))
}

/// The channel's own id of a sent reply (WhatsApp wamid).
pub fn set_channel_ref(conn: &Connection, id: i64, channel_ref: &str) -> Result<(), StoreError> {
    conn.prepare_cached("UPDATE outbox SET channel_ref = ?2 WHERE id = ?1")?
        .execute(params![id, channel_ref])?;
    Ok(())
}

/// Record the outcome of one send attempt. Answers whether the row still
/// waits to be sent (`false` after `Sent`/`GaveUp`, or when it was failed
/// meanwhile: the outbox then drops it instead of retrying).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<bool, StoreError>")]
pub struct RecordSend {
    pub id: i64,
    pub outcome: SendOutcome,
    /// The channel's id of the sent message, when it gave one.
    pub channel_ref: Option<String>,
}

impl Handler<RecordSend> for PersistenceActor {
    type Result = ResponseFuture<Result<bool, StoreError>>;
    fn handle(&mut self, msg: RecordSend, _: &mut Context<Self>) -> Self::Result {
        if self.backend() == super::sql::Backend::Postgres {
            return self.call_sql(move |db, at| {
                super::portable::outbox::record_send(
                    db,
                    at,
                    msg.id,
                    &msg.outcome,
                    msg.channel_ref.as_deref(),
                )
            });
        }
        self.call(move |c, at| {
            match &msg.outcome {
                SendOutcome::Sent => {
                    mark_outbox_sent(c, at, msg.id)?;
                    if let Some(r) = &msg.channel_ref {
                        set_channel_ref(c, msg.id, r)?;
                    }
                    return Ok(false);
                }
                SendOutcome::Failed(e) => record_outbox_failure(c, msg.id, e)?,
                SendOutcome::Unknown(e) => mark_outbox_unknown(c, msg.id, e)?,
                SendOutcome::GaveUp(e) => {
                    mark_outbox_failed(c, msg.id, e)?;
                    return Ok(false);
                }
            }
            outbox_live(c, msg.id)
        })
    }
}

/// A channel's delivery reports about sent replies, `(channel_ref, status,
/// error)`. Sent by the WhatsApp route; answers how many matched a row.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<usize, StoreError>")]
pub struct RecordDeliveryStatuses {
    pub channel: String,
    pub statuses: Vec<(String, String, Option<String>)>,
}

impl Handler<RecordDeliveryStatuses> for PersistenceActor {
    type Result = ResponseFuture<Result<usize, StoreError>>;
    fn handle(&mut self, msg: RecordDeliveryStatuses, _: &mut Context<Self>) -> Self::Result {
        self.call_sql(move |db, at| {
            let mut n = 0;
            for (r, status, error) in &msg.statuses {
                if super::portable::outbox::record_delivery_status(
                    db,
                    &msg.channel,
                    r,
                    status,
                    &at.text,
                    error.as_deref(),
                )? {
                    n += 1;
                }
            }
            Ok(n)
        })
    }
}
