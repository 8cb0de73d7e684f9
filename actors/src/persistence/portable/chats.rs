//! What a channel says about a chat (`ChatEvent`: moved, unreachable,
//! reachable again) in portable SQL, for both backends; see
//! `persistence::sessions::apply_chat_event` for the rules. A move
//! renumbers turns while outbox rows still point at the old numbers, so the
//! outbox's foreign key is checked at the end of the move instead: SQLite's
//! `defer_foreign_keys`, PostgreSQL's `SET CONSTRAINTS … DEFERRED` (the
//! key is `DEFERRABLE`, postgres migration 4). Both are switched back at
//! once, which checks what the move changed (PostgreSQL checks deferred
//! rows retroactively), so the other jobs of the group commit keep failing
//! on their own statements.

use std::collections::HashMap;

use crate::clock::Stamp;
use crate::error::StoreError;
use crate::persistence::portable::sessions::{ensure_session, session_memory};
use crate::persistence::sessions::{ChatEvent, SessionKey};
use crate::persistence::sql::{Backend, Sql};
use crate::vals;

/// Seqs are moved out of the way by this much while a merge renumbers them
/// (no session has this many turns).
const SEQ_SHIFT: i64 = 1 << 40;

/// The outbox's foreign key to turns (PostgreSQL's default name).
const OUTBOX_TURN_FK: &str = "outbox_session_id_turn_seq_fkey";

/// Apply `event` about the chat of `session` in the caller's transaction.
pub fn apply_chat_event(
    db: &mut dyn Sql,
    stamp: &Stamp,
    session: &SessionKey,
    event: &ChatEvent,
) -> Result<(), StoreError> {
    let at = &stamp.text;
    match event {
        ChatEvent::Migrated { from, to } => {
            let old = SessionKey::new(&session.channel, from);
            let new = SessionKey::new(&session.channel, to);
            if old.id != new.id {
                defer_outbox_key(db, true)?;
                let moved = move_session(db, at, &old, &new);
                let checked = defer_outbox_key(db, false);
                moved?;
                checked?;
            }
        }
        ChatEvent::Unreachable(reason) => {
            db.exec(
                "UPDATE sessions SET unreachable = $2, updated_at = $3 WHERE id = $1",
                vals![&session.id, reason, at],
            )?;
            db.exec(
                "UPDATE outbox SET state = 'failed', last_error = $2
                 WHERE session_id = $1 AND state IN ('pending', 'unknown')",
                vals![&session.id, reason],
            )?;
            super::timers::pause_session(db, &session.id, reason, at)?;
        }
        ChatEvent::Reachable => {
            db.exec(
                "UPDATE sessions SET unreachable = NULL, updated_at = $2 WHERE id = $1",
                vals![&session.id, at],
            )?;
            super::timers::resume_session(db, &session.id, at)?;
        }
    }
    Ok(())
}

fn defer_outbox_key(db: &mut dyn Sql, defer: bool) -> Result<(), StoreError> {
    let sql = match (db.backend(), defer) {
        (Backend::Sqlite, true) => "PRAGMA defer_foreign_keys = ON".to_string(),
        (Backend::Sqlite, false) => "PRAGMA defer_foreign_keys = OFF".to_string(),
        (Backend::Postgres, true) => format!("SET CONSTRAINTS {OUTBOX_TURN_FK} DEFERRED"),
        (Backend::Postgres, false) => format!("SET CONSTRAINTS {OUTBOX_TURN_FK} IMMEDIATE"),
    };
    db.exec(&sql, &[])?;
    Ok(())
}

/// Move everything of session `old` into `new` (same channel): turns
/// renumbered in time order together with `new`'s own (references between
/// turns and from outbox rows follow), memory merged (`new`'s keys win),
/// timers and tasks re-pointed, unsent replies addressed to `new`'s chat.
fn move_session(
    db: &mut dyn Sql,
    at: &str,
    old: &SessionKey,
    new: &SessionKey,
) -> Result<(), StoreError> {
    let Some(old_memory) = session_memory(db, &old.id)? else {
        return Ok(());
    };
    ensure_session(db, new, None, at)?;
    // Both sessions' rows are locked (in id order: two moves never wait on
    // each other in a cycle) before their turns are read.
    let (first, second) = if old.id < new.id {
        (&old.id, &new.id)
    } else {
        (&new.id, &old.id)
    };
    for id in [first, second] {
        let sql = format!(
            "SELECT next_seq FROM sessions WHERE id = $1{}",
            db.for_update()
        );
        db.row(&sql, vals![id])?;
    }
    struct Turn {
        session: String,
        seq: i64,
        created_at: String,
        in_reply_to: Option<i64>,
        revises: Option<i64>,
    }
    let mut turns = Vec::new();
    for id in [&old.id, &new.id] {
        for r in db.rows(
            "SELECT session_id, seq, created_at, in_reply_to, revises FROM turns
             WHERE session_id = $1",
            vals![id],
        )? {
            turns.push(Turn {
                session: r.text(0)?,
                seq: r.int(1)?,
                created_at: r.text(2)?,
                in_reply_to: r.opt_int(3)?,
                revises: r.opt_int(4)?,
            });
        }
    }
    if turns.iter().all(|t| t.session != old.id) && old_memory == "{}" {
        return Ok(());
    }
    // Time order; within one instant the older chat first, then by seq.
    turns.sort_by(|a, b| {
        (&a.created_at, a.session != old.id, a.seq).cmp(&(
            &b.created_at,
            b.session != old.id,
            b.seq,
        ))
    });
    let renumber: HashMap<(String, i64), i64> = turns
        .iter()
        .enumerate()
        .map(|(n, t)| ((t.session.clone(), t.seq), n as i64 + 1))
        .collect();
    let map = |session: &str, seq: Option<i64>| {
        seq.and_then(|s| renumber.get(&(session.to_string(), s)).copied())
    };
    for t in &turns {
        let to = renumber[&(t.session.clone(), t.seq)];
        db.exec(
            "UPDATE turns SET session_id = $3, seq = $4, in_reply_to = $5, revises = $6
             WHERE session_id = $1 AND seq = $2",
            vals![
                &t.session,
                t.seq,
                &new.id,
                to + SEQ_SHIFT,
                map(&t.session, t.in_reply_to),
                map(&t.session, t.revises)
            ],
        )?;
    }
    db.exec(
        "UPDATE turns SET seq = seq - $2 WHERE session_id = $1 AND seq >= $2",
        vals![&new.id, SEQ_SHIFT],
    )?;
    let outbox = db.rows(
        "SELECT id, session_id, turn_seq FROM outbox WHERE session_id IN ($1, $2)",
        vals![&old.id, &new.id],
    )?;
    for r in outbox {
        let (id, session, turn_seq) = (r.int(0)?, r.text(1)?, r.int(2)?);
        let seq = renumber
            .get(&(session, turn_seq))
            .copied()
            .unwrap_or(turn_seq);
        db.exec(
            "UPDATE outbox SET session_id = $2, turn_seq = $3,
                    chat = CASE WHEN state IN ('pending', 'unknown') THEN $4 ELSE chat END
             WHERE id = $1",
            vals![id, &new.id, seq, &new.chat],
        )?;
    }
    for sql in [
        "UPDATE timers SET session_id = $2 WHERE session_id = $1",
        "UPDATE tasks SET session_id = $2 WHERE session_id = $1",
    ] {
        db.exec(sql, vals![&old.id, &new.id])?;
    }
    use serde_json::{Map, Value};
    let mut memory: Map<String, Value> = serde_json::from_str(&old_memory).unwrap_or_default();
    let current = session_memory(db, &new.id)?.unwrap_or_default();
    let newer: Map<String, Value> = serde_json::from_str(&current).unwrap_or_default();
    memory.extend(newer);
    db.exec(
        "UPDATE sessions SET memory_json = $2, next_seq = $3, updated_at = $4, unreachable = NULL
         WHERE id = $1",
        vals![
            &new.id,
            Value::Object(memory).to_string(),
            turns.len() as i64 + 1,
            at
        ],
    )?;
    // The old id keeps its row (a session actor may still know it) with
    // nothing in it; new turns there would start after the old numbers.
    db.exec(
        "UPDATE sessions SET memory_json = '{}', unreachable = $2, updated_at = $3 WHERE id = $1",
        vals![&old.id, format!("moved to {}", new.id), at],
    )?;
    Ok(())
}
