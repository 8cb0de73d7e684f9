//! Sessions, turns and senders in portable SQL: the same units of work as
//! `persistence/sessions.rs` (which the SQLite backend still runs), with
//! the row lock that keeps a conversation's turns gapless and ordered when
//! two instances take messages for it at once.

use super::outbox::insert_outbox;
use crate::clock::Stamp;
use crate::error::StoreError;
use crate::persistence::sessions::{
    ChatEvent, Exchange, ExchangeOutcome, ReplyPlan, SessionKey, SessionSnapshot, SessionSummary,
    TurnRow,
};
use crate::persistence::sql::Sql;
use crate::vals;

/// Create the principal and the session if they do not exist yet.
pub fn ensure_session(
    db: &mut dyn Sql,
    session: &SessionKey,
    from: Option<&str>,
    at: &str,
) -> Result<(), StoreError> {
    let principal = from.map(|f| format!("{}:{f}", session.channel));
    if let (Some(pid), Some(f)) = (&principal, from) {
        db.exec(
            "INSERT INTO principals (id, channel, external_id, created_at)
             VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING",
            vals![pid, &session.channel, f, at],
        )?;
    }
    db.exec(
        "INSERT INTO sessions (id, channel, chat, principal_id, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $5) ON CONFLICT (id) DO NOTHING",
        vals![&session.id, &session.channel, &session.chat, principal, at],
    )?;
    Ok(())
}

/// Lock the session row until COMMIT (PostgreSQL; SQLite's writer already
/// holds the database) and read its next seq and unreachable mark. Every
/// writer of a session's turns takes this lock first, so two instances
/// serialise on it: the second sees the first's committed turns (and its
/// key, for the duplicate check) before it numbers its own.
fn lock_session(db: &mut dyn Sql, id: &str) -> Result<(i64, Option<String>), StoreError> {
    let sql = format!(
        "SELECT next_seq, unreachable FROM sessions WHERE id = $1{}",
        db.for_update()
    );
    let row = db
        .row(&sql, vals![id])?
        .ok_or_else(|| StoreError::Invalid(format!("no session {id}")))?;
    Ok((row.int(0)?, row.opt_text(1)?))
}

/// Reserve `n` seqs after `lock_session` returned `first`.
fn take_seqs(
    db: &mut dyn Sql,
    id: &str,
    n: i64,
    memory: Option<&str>,
    at: &str,
) -> Result<(), StoreError> {
    db.exec(
        "UPDATE sessions SET next_seq = next_seq + $2, updated_at = $3,
                memory_json = COALESCE($4, memory_json)
         WHERE id = $1",
        vals![id, n, at, memory],
    )?;
    Ok(())
}

/// One row of `turns`.
struct NewTurn<'a> {
    seq: i64,
    role: &'a str,
    text: &'a str,
    key: Option<&'a str>,
    principal: Option<&'a str>,
    in_reply_to: Option<i64>,
    status: Option<&'a str>,
    kind: &'a str,
    meta: Option<&'a str>,
    msg_ref: Option<&'a str>,
    revises: Option<i64>,
    reply_meta: Option<&'a str>,
}

impl<'a> NewTurn<'a> {
    fn own(seq: i64, role: &'a str, text: &'a str, in_reply_to: Option<i64>) -> NewTurn<'a> {
        NewTurn {
            seq,
            role,
            text,
            key: None,
            principal: None,
            in_reply_to,
            status: None,
            kind: "text",
            meta: None,
            msg_ref: None,
            revises: None,
            reply_meta: None,
        }
    }
}

fn insert_turn(
    db: &mut dyn Sql,
    session_id: &str,
    t: &NewTurn<'_>,
    at: &str,
) -> Result<(), StoreError> {
    db.exec(
        "INSERT INTO turns (session_id, seq, role, content, key, principal_id, in_reply_to,
                            status, created_at, kind, meta_json, ref, revises, reply_meta)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
        vals![
            session_id,
            t.seq,
            t.role,
            t.text,
            t.key,
            t.principal,
            t.in_reply_to,
            t.status,
            at,
            t.kind,
            t.meta,
            t.msg_ref,
            t.revises,
            t.reply_meta
        ],
    )?;
    Ok(())
}

/// An adapter's resume state, written with the turn that carries it.
pub fn save_adapter_state(
    db: &mut dyn Sql,
    at: &Stamp,
    adapter: &str,
    state_json: &str,
) -> Result<(), StoreError> {
    db.exec(
        "INSERT INTO adapter_state (adapter, state_json, updated_at) VALUES ($1, $2, $3)
         ON CONFLICT (adapter) DO UPDATE SET state_json = excluded.state_json,
                                             updated_at = excluded.updated_at",
        vals![adapter, state_json, &at.text],
    )?;
    Ok(())
}

/// The state stored under `adapter`, if any.
pub fn load_adapter_state(db: &mut dyn Sql, adapter: &str) -> Result<Option<String>, StoreError> {
    db.row(
        "SELECT state_json FROM adapter_state WHERE adapter = $1",
        vals![adapter],
    )?
    .map(|r| r.text(0))
    .transpose()
}

/// Store an inbound turn (once per sender and key) and its reply + outbox
/// row, with a command's timer effect and what the channel said about the
/// chat; see `persistence::sessions::commit_exchange`.
pub fn commit_exchange(
    db: &mut dyn Sql,
    stamp: &Stamp,
    ex: &Exchange,
) -> Result<ExchangeOutcome, StoreError> {
    let at = &stamp.text;
    if let Some(f) = &ex.fence {
        super::leases::check(db, &f.lease, f.token, stamp.ms)?;
    }
    if let Some((adapter, state_json)) = &ex.adapter_state {
        save_adapter_state(db, stamp, adapter, state_json)?;
    }
    ensure_session(db, &ex.session, Some(&ex.from), at)?;
    let (first, unreachable) = lock_session(db, &ex.session.id)?;
    let principal = format!("{}:{}", ex.session.channel, ex.from);
    let seen = db.row(
        "SELECT seq, content FROM turns
         WHERE session_id = $1 AND principal_id = $2 AND key = $3",
        vals![&ex.session.id, &principal, &ex.key],
    )?;
    if let Some(row) = seen {
        let user_seq = row.int(0)?;
        return Ok(if row.text(1)? == ex.text {
            ExchangeOutcome::Duplicate { user_seq }
        } else {
            ExchangeOutcome::Conflict { user_seq }
        });
    }
    if ex.expect_seq.is_some_and(|e| e != first) {
        return Ok(ExchangeOutcome::Stale);
    }
    let rendered;
    let reply = match (&ex.reply, &ex.effect) {
        (Some(plan), Some(effect)) => {
            let text = super::timers::apply_effect(db, stamp, &ex.session, &principal, effect)?;
            rendered = ReplyPlan {
                text,
                deliver: plan.deliver,
            };
            Some(&rendered)
        }
        (plan, _) => plan.as_ref(),
    };
    // A turn that is only stored gets no reply and waits for nobody.
    let reply: Option<&ReplyPlan> = reply.filter(|_| ex.answer);
    // A chat that writes to keel can be written to again: a missed "member
    // again" update does not leave it marked unreachable with its timers
    // paused. A moved chat stays moved.
    let back = ex.answer
        && ex.chat_event.is_none()
        && unreachable.is_some_and(|u| !u.starts_with("moved to "));
    let n = if reply.is_some() { 2 } else { 1 };
    take_seqs(db, &ex.session.id, n, ex.memory.as_deref(), at)?;
    let user_seq = first;
    let status = match (ex.answer, reply.is_some()) {
        (false, _) => None,
        (true, true) => Some("answered"),
        (true, false) => Some("awaiting"),
    };
    let revises = match &ex.revises {
        None => None,
        Some(r) => db
            .row(
                "SELECT seq FROM turns WHERE session_id = $1 AND ref = $2 ORDER BY seq LIMIT 1",
                vals![&ex.session.id, r],
            )?
            .map(|row| row.int(0))
            .transpose()?,
    };
    insert_turn(
        db,
        &ex.session.id,
        &NewTurn {
            seq: user_seq,
            role: "user",
            text: &ex.text,
            key: Some(&ex.key),
            principal: Some(&principal),
            in_reply_to: None,
            status,
            kind: &ex.kind,
            meta: ex.meta.as_deref(),
            msg_ref: ex.msg_ref.as_deref(),
            revises,
            reply_meta: ex.reply_meta.as_deref(),
        },
        at,
    )?;
    if let Some((person, patch)) = &ex.person_memory {
        apply_memory_patch(db, person, patch, at)?;
    }
    if let Some(event) = &ex.chat_event {
        super::chats::apply_chat_event(db, stamp, &ex.session, event)?;
    } else if back {
        super::chats::apply_chat_event(db, stamp, &ex.session, &ChatEvent::Reachable)?;
    }
    let (mut reply_seq, mut outbox_id) = (None, None);
    if let Some(reply) = reply {
        let seq = user_seq + 1;
        insert_turn(
            db,
            &ex.session.id,
            &NewTurn::own(seq, "assistant", &reply.text, Some(user_seq)),
            at,
        )?;
        reply_seq = Some(seq);
        if reply.deliver {
            outbox_id = Some(insert_outbox(
                db,
                &ex.session,
                seq,
                Some(&ex.key),
                &reply.text,
                ex.reply_meta.as_deref(),
                at,
            )?);
        }
    }
    Ok(ExchangeOutcome::Accepted {
        user_seq,
        reply_seq,
        outbox_id,
    })
}

/// Apply a memory patch (a JSON object; `null` removes a key) to `session`.
fn apply_memory_patch(
    db: &mut dyn Sql,
    session: &SessionKey,
    patch: &str,
    at: &str,
) -> Result<(), StoreError> {
    use serde_json::{Map, Value};
    ensure_session(db, session, None, at)?;
    let sql = format!(
        "SELECT memory_json FROM sessions WHERE id = $1{}",
        db.for_update()
    );
    let current = db
        .row(&sql, vals![&session.id])?
        .map(|r| r.text(0))
        .transpose()?
        .unwrap_or_default();
    let mut memory: Map<String, Value> = serde_json::from_str(&current).unwrap_or_default();
    let patch: Map<String, Value> = serde_json::from_str(patch)
        .map_err(|e| StoreError::Invalid(format!("memory patch: {e}")))?;
    for (k, v) in patch {
        if v.is_null() {
            memory.remove(&k);
        } else {
            memory.insert(k, v);
        }
    }
    db.exec(
        "UPDATE sessions SET memory_json = $2, updated_at = $3 WHERE id = $1",
        vals![&session.id, Value::Object(memory).to_string(), at],
    )?;
    Ok(())
}

/// Store the external agent's reply to an awaiting user turn (idempotent).
pub fn commit_agent_reply(
    db: &mut dyn Sql,
    stamp: &Stamp,
    session: &SessionKey,
    user_seq: i64,
    reply: &ReplyPlan,
) -> Result<Option<(i64, Option<i64>)>, StoreError> {
    let at = &stamp.text;
    let (seq, _) = lock_session(db, &session.id)?;
    let row = db.row(
        "SELECT status, key, reply_meta FROM turns WHERE session_id = $1 AND seq = $2",
        vals![&session.id, user_seq],
    )?;
    let Some(row) = row else {
        return Err(StoreError::Invalid(format!(
            "no user turn {user_seq} in session {}",
            session.id
        )));
    };
    if row.opt_text(0)?.as_deref() != Some("awaiting") {
        return Ok(None);
    }
    let (key, reply_meta) = (row.opt_text(1)?, row.opt_text(2)?);
    db.exec(
        "UPDATE turns SET status = 'answered' WHERE session_id = $1 AND seq = $2",
        vals![&session.id, user_seq],
    )?;
    take_seqs(db, &session.id, 1, None, at)?;
    insert_turn(
        db,
        &session.id,
        &NewTurn::own(seq, "assistant", &reply.text, Some(user_seq)),
        at,
    )?;
    let outbox = if reply.deliver {
        Some(insert_outbox(
            db,
            session,
            seq,
            key.as_deref(),
            &reply.text,
            reply_meta.as_deref(),
            at,
        )?)
    } else {
        None
    };
    Ok(Some((seq, outbox)))
}

/// A message from keel itself to a chat, via the outbox.
pub fn commit_notice(
    db: &mut dyn Sql,
    stamp: &Stamp,
    session: &SessionKey,
    text: &str,
    deliver: bool,
) -> Result<(i64, Option<i64>), StoreError> {
    let at = &stamp.text;
    ensure_session(db, session, None, at)?;
    let (seq, _) = lock_session(db, &session.id)?;
    take_seqs(db, &session.id, 1, None, at)?;
    insert_turn(
        db,
        &session.id,
        &NewTurn::own(seq, "system", text, None),
        at,
    )?;
    let outbox = if deliver {
        Some(insert_outbox(db, session, seq, None, text, None, at)?)
    } else {
        None
    };
    Ok((seq, outbox))
}

// The sender is the principal id without its "<channel>:" prefix, cut in
// Rust (SQLite's instr and PostgreSQL's strpos differ).
const TURN_COLUMNS: &str = "SELECT t.seq, t.role, t.content, t.key, t.created_at,
        CASE WHEN t.role = 'user' OR o.state IS NULL THEN NULL
             WHEN o.state = 'sent' THEN 1 ELSE 0 END,
        CASE WHEN t.role = 'user' THEN t.principal_id END,
        t.kind, t.meta_json, t.revises,
        o.state, o.last_error, o.channel_ref, o.delivery_status, o.delivery_at, o.delivery_error
     FROM turns t LEFT JOIN outbox o ON t.role != 'user' AND o.id = (
         SELECT p.id FROM outbox p WHERE p.session_id = t.session_id AND p.turn_seq = t.seq
         ORDER BY CASE p.state WHEN 'failed' THEN 0 WHEN 'unknown' THEN 1
                               WHEN 'pending' THEN 2 ELSE 3 END, p.id
         LIMIT 1)";

fn turn_row(r: &crate::persistence::sql::Row) -> Result<TurnRow, StoreError> {
    use crate::persistence::sessions::Delivery;
    let meta = r.opt_text(8)?;
    let state = r.opt_text(10)?;
    Ok(TurnRow {
        seq: r.int(0)?,
        role: r.text(1)?,
        text: r.text(2)?,
        key: r.opt_text(3)?,
        created_at: r.text(4)?,
        sent: r.opt_int(5)?.map(|v| v != 0),
        from: r
            .opt_text(6)?
            .map(|p| p.split_once(':').map_or(p.clone(), |(_, f)| f.to_string())),
        kind: r.text(7)?,
        meta: meta.map(|m| serde_json::from_str(&m).unwrap_or(serde_json::Value::String(m))),
        revises: r.opt_int(9)?,
        delivery: match state {
            None => None,
            Some(state) => Some(Delivery {
                error: if state == "sent" {
                    None
                } else {
                    r.opt_text(11)?
                },
                state,
                channel_ref: r.opt_text(12)?,
                status: r.opt_text(13)?,
                status_at: r.opt_text(14)?,
                status_error: r.opt_text(15)?,
            }),
        },
    })
}

/// Turns of a session in order after `after_seq` (at most `limit`); `None`
/// when the session does not exist.
pub fn session_turns(
    db: &mut dyn Sql,
    session_id: &str,
    after_seq: i64,
    limit: i64,
) -> Result<Option<Vec<TurnRow>>, StoreError> {
    if db
        .row("SELECT 1 FROM sessions WHERE id = $1", vals![session_id])?
        .is_none()
    {
        return Ok(None);
    }
    let sql =
        format!("{TURN_COLUMNS} WHERE t.session_id = $1 AND t.seq > $2 ORDER BY t.seq LIMIT $3");
    let rows = db.rows(&sql, vals![session_id, after_seq, limit])?;
    rows.iter()
        .map(turn_row)
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// Working memory and the newest `tail` turns of a session.
pub fn load_session(
    db: &mut dyn Sql,
    session_id: &str,
    tail: i64,
) -> Result<Option<SessionSnapshot>, StoreError> {
    let Some(memory) = db.row(
        "SELECT memory_json, next_seq FROM sessions WHERE id = $1",
        vals![session_id],
    )?
    else {
        return Ok(None);
    };
    let sql = format!("{TURN_COLUMNS} WHERE t.session_id = $1 ORDER BY t.seq DESC LIMIT $2");
    let mut recent = db
        .rows(&sql, vals![session_id, tail])?
        .iter()
        .map(turn_row)
        .collect::<Result<Vec<_>, _>>()?;
    recent.reverse();
    Ok(Some(SessionSnapshot {
        memory_json: memory.text(0)?,
        recent,
        next_seq: memory.int(1)?,
    }))
}

/// A session's memory JSON, or `None` when it does not exist.
pub fn session_memory(db: &mut dyn Sql, session_id: &str) -> Result<Option<String>, StoreError> {
    db.row(
        "SELECT memory_json FROM sessions WHERE id = $1",
        vals![session_id],
    )?
    .map(|r| r.text(0))
    .transpose()
}

/// All sessions, ordered by id.
pub fn list_sessions(db: &mut dyn Sql) -> Result<Vec<SessionSummary>, StoreError> {
    db.rows(
        "SELECT id, channel, chat, next_seq - 1, created_at, updated_at, unreachable
         FROM sessions ORDER BY id",
        &[],
    )?
    .iter()
    .map(|r| {
        Ok(SessionSummary {
            id: r.text(0)?,
            channel: r.text(1)?,
            chat: r.text(2)?,
            turns: r.int(3)?,
            created_at: r.text(4)?,
            updated_at: r.text(5)?,
            unreachable: r.opt_text(6)?,
        })
    })
    .collect()
}

/// User turns still waiting for the external agent, oldest first.
pub fn awaiting_turns(
    db: &mut dyn Sql,
    limit: i64,
) -> Result<Vec<crate::persistence::sessions::AwaitingTurn>, StoreError> {
    db.rows(
        "SELECT t.session_id, s.channel, s.chat, t.seq, t.key, t.content
         FROM turns t JOIN sessions s ON s.id = t.session_id
         WHERE t.status = 'awaiting' ORDER BY t.created_at, t.seq LIMIT $1",
        vals![limit],
    )?
    .iter()
    .map(|r| {
        Ok(crate::persistence::sessions::AwaitingTurn {
            session: SessionKey {
                id: r.text(0)?,
                channel: r.text(1)?,
                chat: r.text(2)?,
            },
            seq: r.int(3)?,
            key: r.opt_text(4)?,
            text: r.text(5)?,
        })
    })
    .collect()
}
