//! The outbox in portable SQL (see `persistence/outbox.rs` for the rules):
//! queueing replies with their turn, reading pending rows, recording sends.

use crate::clock::Stamp;
use crate::error::StoreError;
use crate::persistence::outbox::{OutboxRow, SendOutcome};
use crate::persistence::sessions::SessionKey;
use crate::persistence::sql::{Row, Sql};
use crate::vals;

/// Queue a reply, one row per part of the channel's size; the first id.
pub(crate) fn insert_outbox(
    db: &mut dyn Sql,
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
        let row = db
            .row(
                "INSERT INTO outbox (session_id, turn_seq, channel, chat, in_reply_to, text,
                                     created_at, reply_meta)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
                vals![
                    &session.id,
                    turn_seq,
                    &session.channel,
                    &session.chat,
                    in_reply_to,
                    part.as_str(),
                    at,
                    reply_meta
                ],
            )?
            .ok_or_else(|| StoreError::Invalid("outbox insert returned no id".into()))?;
        first.get_or_insert(row.int(0)?);
    }
    Ok(first.unwrap_or_default())
}

const OUTBOX_COLUMNS: &str =
    "SELECT id, session_id, channel, chat, in_reply_to, text, attempts, reply_meta,
        CASE WHEN channel = 'whatsapp' THEN
            (SELECT t.created_at FROM turns t WHERE t.session_id = outbox.session_id
               AND t.role = 'user' ORDER BY t.seq DESC LIMIT 1) END
     FROM outbox";

fn outbox_row(r: &Row, unknown: bool) -> Result<OutboxRow, StoreError> {
    Ok(OutboxRow {
        id: r.int(0)?,
        session_id: r.text(1)?,
        channel: r.text(2)?,
        chat: r.text(3)?,
        in_reply_to: r.opt_text(4)?,
        text: r.text(5)?,
        attempts: r.int(6)?,
        unknown,
        reply_meta: r.opt_text(7)?.and_then(|m| serde_json::from_str(&m).ok()),
        last_inbound_ms: r
            .opt_text(8)?
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(&t).ok())
            .map(|t| t.timestamp_millis()),
    })
}

/// Pending rows with `id > after` (and, when asked, every `unknown` row),
/// oldest first.
pub fn pending_outbox(
    db: &mut dyn Sql,
    after: i64,
    limit: i64,
    with_unknown: bool,
) -> Result<Vec<OutboxRow>, StoreError> {
    let sql = format!("{OUTBOX_COLUMNS} WHERE state = 'pending' AND id > $1 ORDER BY id LIMIT $2");
    let mut rows = db
        .rows(&sql, vals![after, limit])?
        .iter()
        .map(|r| outbox_row(r, false))
        .collect::<Result<Vec<_>, _>>()?;
    if with_unknown {
        let sql = format!("{OUTBOX_COLUMNS} WHERE state = 'unknown' ORDER BY id LIMIT $1");
        for r in db.rows(&sql, vals![limit])? {
            rows.push(outbox_row(&r, true)?);
        }
        rows.sort_by_key(|r| r.id);
    }
    Ok(rows)
}

/// Record how a send attempt ended; whether the row still waits to be sent.
pub fn record_send(
    db: &mut dyn Sql,
    at: &Stamp,
    id: i64,
    outcome: &SendOutcome,
    channel_ref: Option<&str>,
) -> Result<bool, StoreError> {
    match outcome {
        SendOutcome::Sent => {
            db.exec(
                "UPDATE outbox SET state = 'sent', attempts = attempts + 1, sent_at = $2,
                        last_error = NULL, channel_ref = COALESCE($3, channel_ref)
                 WHERE id = $1",
                vals![id, &at.text, channel_ref],
            )?;
            return Ok(false);
        }
        SendOutcome::Failed(e) => db.exec(
            "UPDATE outbox SET attempts = attempts + 1, last_error = $2
             WHERE id = $1 AND state IN ('pending', 'unknown')",
            vals![id, e],
        )?,
        SendOutcome::Unknown(e) => db.exec(
            "UPDATE outbox SET state = 'unknown', attempts = attempts + 1, last_error = $2
             WHERE id = $1 AND state IN ('pending', 'unknown')",
            vals![id, e],
        )?,
        SendOutcome::GaveUp(e) => {
            db.exec(
                "UPDATE outbox SET state = 'failed', attempts = attempts + 1, last_error = $2
                 WHERE id = $1 AND state IN ('pending', 'unknown')",
                vals![id, e],
            )?;
            return Ok(false);
        }
    };
    let state = db.row("SELECT state FROM outbox WHERE id = $1", vals![id])?;
    Ok(matches!(
        state.map(|r| r.text(0)).transpose()?.as_deref(),
        Some("pending" | "unknown")
    ))
}

/// Record a channel's delivery report (`sent` < `delivered` < `read`,
/// `failed`) for the reply it knows as `channel_ref`; a report older than
/// what is stored changes nothing. Answers whether a row matched.
pub fn record_delivery_status(
    db: &mut dyn Sql,
    channel: &str,
    channel_ref: &str,
    status: &str,
    at: &str,
    error: Option<&str>,
) -> Result<bool, StoreError> {
    let rank = |s: &str| match s {
        "sent" => 1,
        "delivered" => 2,
        "read" => 3,
        "failed" => 4,
        _ => 0,
    };
    let Some(row) = db.row(
        "SELECT id, delivery_status FROM outbox WHERE channel = $1 AND channel_ref = $2
         ORDER BY id DESC LIMIT 1",
        vals![channel, channel_ref],
    )?
    else {
        return Ok(false);
    };
    let (id, current) = (row.int(0)?, row.opt_text(1)?);
    if current.as_deref().map_or(0, rank) >= rank(status) && rank(status) > 0 {
        return Ok(true);
    }
    db.exec(
        "UPDATE outbox SET delivery_status = $2, delivery_at = $3, delivery_error = $4 WHERE id = $1",
        vals![id, status, at, error],
    )?;
    Ok(true)
}
