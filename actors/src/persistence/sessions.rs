//! Sessions, their turns and senders (R6): the SQL of the `sessions`,
//! `turns` and `principals` tables, one documented function per query or
//! unit of work (bound parameters, cached statements), and the messages the
//! PersistenceActor answers for them. Functions take a `&Connection` and
//! run inside the writer's transaction, so a unit of work here is atomic
//! with everything else in its group commit.

use actix::prelude::*;
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use super::outbox::insert_outbox;
use super::PersistenceActor;
use crate::clock::Stamp;
use crate::error::StoreError;

/// Where a session lives: `id` is `"<channel>:<chat>"`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct SessionKey {
    pub id: String,
    pub channel: String,
    pub chat: String,
}

impl SessionKey {
    pub fn new(channel: &str, chat: &str) -> SessionKey {
        SessionKey {
            id: format!("{channel}:{chat}"),
            channel: channel.to_string(),
            chat: chat.to_string(),
        }
    }
}

/// One inbound message and, when the brain answered at once, its reply:
/// committed together (R3: the reply is in the outbox before anyone sends it).
#[derive(Debug, Clone)]
pub struct Exchange {
    pub session: SessionKey,
    /// The sender on its channel (user id), recorded as a principal.
    pub from: String,
    /// Idempotency key: the channel's message id (R2).
    pub key: String,
    pub text: String,
    /// `None`: the message waits for the external agent (turn status `awaiting`).
    pub reply: Option<ReplyPlan>,
    /// New working-memory JSON, when the brain changed it.
    pub memory: Option<String>,
    /// The session and this sender are already stored (the session actor
    /// knows): skip the two existence checks on the hot path.
    pub known: bool,
    /// An adapter's resume state (e.g. the Telegram offset) written in the
    /// same transaction as this turn — also when the turn is a duplicate —
    /// so the state never becomes durable without it (R14).
    pub adapter_state: Option<(String, String)>,
    /// The lease this write is made under (a poller's): the whole exchange
    /// is refused (`StaleLease`, nothing written) unless its token is still
    /// current when it commits, so a poller that lost its lease can never
    /// move the offset the new holder owns (R49).
    pub fence: Option<super::portable::leases::Fence>,
    /// A command's effect (timers, timezone), applied in this transaction;
    /// when set, the text it renders replaces `reply.text`.
    pub effect: Option<super::timers::Effect>,
    /// `text`, a media kind, `edit`, `callback`, … (see `Deliver`).
    pub kind: String,
    /// The channel's metadata as JSON text.
    pub meta: Option<String>,
    /// The channel's reference of the message.
    pub msg_ref: Option<String>,
    /// For an edit: the ref of the message it revises.
    pub revises: Option<String>,
    /// Reply routing inside the chat, as JSON text (copied to replies).
    pub reply_meta: Option<String>,
    /// `false`: store only, no reply and no agent.
    pub answer: bool,
    /// The sender is a configured person: their memory row (a
    /// `principal:<name>` session) and the changes to apply to it, as a JSON
    /// object (`null` removes a key). Applied here, in the writer, so two
    /// chats of one person never overwrite each other's changes.
    pub person_memory: Option<(SessionKey, String)>,
    /// What the message says about the chat itself (it moved, keel was
    /// removed or added back), applied with the turn.
    pub chat_event: Option<ChatEvent>,
    /// The seq the session actor expects this user turn to get: it decided
    /// the message against turns it has not seen committed yet (an earlier
    /// message of the same batch). Another seq means that guess was wrong:
    /// nothing is written and the outcome is `Stale` (decide it again).
    pub expect_seq: Option<i64>,
}

/// Something a channel learnt about a chat, applied in the same unit of
/// work as the turn that told it, so a redelivered update (a duplicate)
/// applies nothing twice and a crash applies all or nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatEvent {
    /// The chat now lives under another id of the same channel (a Telegram
    /// group upgraded to a supergroup): the session of `from` — its turns,
    /// memory, timers, tasks and unsent replies — moves into the session of
    /// `to`, merged in time order with what `to` already has; unsent
    /// replies are addressed to `to`. The old session stays, empty, marked
    /// unreachable ("moved to …"). Idempotent: a second move finds nothing.
    Migrated { from: String, to: String },
    /// keel cannot write to this chat any more (kicked, left, blocked): the
    /// session is marked unreachable with `reason`, its unsent replies fail
    /// with it (never retried), its active timers are paused.
    Unreachable(String),
    /// keel is a member again: the mark is cleared and paused timers resume
    /// (instants missed meanwhile follow their misfire policy).
    Reachable,
}

impl Default for Exchange {
    /// An empty plain text message (fill in at least session, from, key).
    fn default() -> Exchange {
        Exchange::text(SessionKey::default(), "", "", "", None)
    }
}

impl Exchange {
    /// A plain text message from `from` with key `key`, to be answered by
    /// `reply` (`None`: awaiting the agent); everything else default.
    pub fn text(
        session: SessionKey,
        from: &str,
        key: &str,
        text: &str,
        reply: Option<ReplyPlan>,
    ) -> Exchange {
        Exchange {
            session,
            from: from.to_string(),
            key: key.to_string(),
            text: text.to_string(),
            reply,
            memory: None,
            known: false,
            adapter_state: None,
            fence: None,
            effect: None,
            kind: "text".into(),
            meta: None,
            msg_ref: None,
            revises: None,
            reply_meta: None,
            answer: true,
            person_memory: None,
            chat_event: None,
            expect_seq: None,
        }
    }
}

/// A reply to store; `deliver` puts it in the outbox (false when the channel
/// has no delivery route, e.g. a webhook without `reply_url`).
#[derive(Debug, Clone)]
pub struct ReplyPlan {
    pub text: String,
    pub deliver: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeOutcome {
    Accepted {
        user_seq: i64,
        reply_seq: Option<i64>,
        outbox_id: Option<i64>,
    },
    /// The key was seen before with the same text: nothing was written.
    Duplicate { user_seq: i64 },
    /// The key was seen before with a different text (R41): nothing was
    /// written; the sender reused an id for another message.
    Conflict { user_seq: i64 },
    /// `expect_seq` did not hold (or an earlier exchange of the same
    /// `CommitExchanges` was not accepted): nothing was written.
    Stale,
}

impl ExchangeOutcome {
    pub fn accepted(&self) -> bool {
        matches!(self, ExchangeOutcome::Accepted { .. })
    }
}

/// A turn as shown to operators and to the brain.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TurnRow {
    pub seq: i64,
    pub role: String,
    pub text: String,
    /// The id the channel or sender gave (user turns only).
    pub key: Option<String>,
    /// The sender's id on its channel (user turns only).
    pub from: Option<String>,
    /// `text` for plain messages; channels add media kinds, `edit`, `callback`.
    pub kind: String,
    /// What the channel said about the turn (file ids, sizes, …), if anything.
    pub meta: Option<serde_json::Value>,
    /// For `edit` turns: the seq of the turn revised.
    pub revises: Option<i64>,
    pub created_at: String,
    /// For outgoing turns: whether the channel accepted it (`None`: no route).
    pub sent: Option<bool>,
    /// For outgoing turns with an outbox row: its state (`pending`, `sent`,
    /// `unknown`, `failed`), why it failed, and the channel's newest
    /// delivery report (WhatsApp `delivered`, `read`, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivery: Option<Delivery>,
}

/// What became of one outgoing turn's outbox row.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct Delivery {
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The channel's own id of the sent message (WhatsApp wamid).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel_ref: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_error: Option<String>,
}

impl TurnRow {
    /// A reply keel wrote (no key, no sender); `deliver`: it has a route.
    pub fn reply(seq: i64, text: &str, created_at: String, deliver: bool) -> TurnRow {
        TurnRow::text(
            seq,
            "assistant",
            text,
            None,
            None,
            created_at,
            deliver.then_some(false),
        )
    }

    /// A plain text turn as the session actor caches it after a commit.
    pub fn text(
        seq: i64,
        role: &str,
        text: &str,
        key: Option<&str>,
        from: Option<&str>,
        created_at: String,
        sent: Option<bool>,
    ) -> TurnRow {
        TurnRow {
            seq,
            role: role.to_string(),
            text: text.to_string(),
            key: key.map(str::to_string),
            from: from.map(str::to_string),
            kind: "text".to_string(),
            meta: None,
            revises: None,
            created_at,
            sent,
            delivery: None,
        }
    }
}

/// What a session actor loads when it wakes up.
#[derive(Debug, Clone, Default)]
pub struct SessionSnapshot {
    pub memory_json: String,
    /// The newest turns, oldest first.
    pub recent: Vec<TurnRow>,
    /// The seq the next turn of the session gets.
    pub next_seq: i64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SessionSummary {
    pub id: String,
    pub channel: String,
    pub chat: String,
    pub turns: i64,
    pub created_at: String,
    pub updated_at: String,
    /// Why keel cannot write to this chat (kicked, left, moved); absent
    /// while it can.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unreachable: Option<String>,
}

/// A user turn still waiting for the external agent (resumed after restart).
#[derive(Debug, Clone, PartialEq)]
pub struct AwaitingTurn {
    pub session: SessionKey,
    pub seq: i64,
    pub key: Option<String>,
    pub text: String,
}

/// Create the principal and the session if they do not exist yet.
pub fn ensure_session(
    conn: &Connection,
    session: &SessionKey,
    from: Option<&str>,
    at: &str,
) -> Result<(), StoreError> {
    let principal = from.map(|f| format!("{}:{f}", session.channel));
    if let (Some(pid), Some(f)) = (&principal, from) {
        conn.prepare_cached(
            "INSERT OR IGNORE INTO principals (id, channel, external_id, created_at)
             VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![pid, session.channel, f, at])?;
    }
    conn.prepare_cached(
        "INSERT OR IGNORE INTO sessions (id, channel, chat, principal_id, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
    )?
    .execute(params![
        session.id,
        session.channel,
        session.chat,
        principal,
        at
    ])?;
    Ok(())
}

/// Reserve `n` consecutive sequence numbers in a session; returns the first.
fn take_seqs(
    conn: &Connection,
    session_id: &str,
    n: i64,
    memory: Option<&str>,
    at: &str,
) -> Result<i64, StoreError> {
    let first = session_row(conn, session_id)?.next_seq;
    bump_seqs(conn, session_id, n, memory, at)?;
    Ok(first)
}

/// What the message path reads of a session row, once per exchange.
struct SessionRow {
    next_seq: i64,
    unreachable: Option<String>,
    /// The first seq whose inbound key is not in `turn_keys` yet.
    keys_from: i64,
}

/// The session's next sequence number, its `unreachable` mark and where
/// its keys not yet in `turn_keys` begin.
fn session_row(conn: &Connection, session_id: &str) -> Result<SessionRow, StoreError> {
    Ok(conn
        .prepare_cached("SELECT next_seq, unreachable, keys_from FROM sessions WHERE id = ?1")?
        .query_row([session_id], |r| {
            Ok(SessionRow {
                next_seq: r.get(0)?,
                unreachable: r.get(1)?,
                keys_from: r.get(2)?,
            })
        })?)
}

/// How many turns past `keys_from` a conversation gathers before their
/// keys go to `turn_keys` in one write: the duplicate check scans at most
/// this many rows of the turns primary key (about one leaf), and the
/// `turn_keys` leaf is written once per ~16 messages instead of once each.
const KEYS_LAG: i64 = 32;

/// The turn already stored under `(session, sender, key)` (R2, R41): among
/// the session's newest turns, or in `turn_keys`.
fn find_keyed_turn(
    conn: &Connection,
    session_id: &str,
    principal: &str,
    key: &str,
    keys_from: i64,
) -> Result<Option<(i64, String)>, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT seq, content FROM turns
             WHERE session_id = ?1 AND seq >= ?4 AND principal_id = ?2 AND key = ?3
             UNION ALL
             SELECT t.seq, t.content FROM turn_keys k
             JOIN turns t ON t.session_id = k.session_id AND t.seq = k.seq
             WHERE k.session_id = ?1 AND k.principal_id = ?2 AND k.key = ?3
             LIMIT 1",
        )?
        .query_row(params![session_id, principal, key, keys_from], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?)
}

/// Once a session has `KEYS_LAG` turns past `keys_from`, copy their keys to
/// `turn_keys` (one leaf write for all of them) and move `keys_from` to
/// `next_seq`. In the same transaction as the turns, so the duplicate check
/// always finds every key in one of its two places.
fn file_keys(
    conn: &Connection,
    session_id: &str,
    keys_from: i64,
    next_seq: i64,
) -> Result<(), StoreError> {
    if next_seq - keys_from < KEYS_LAG {
        return Ok(());
    }
    conn.prepare_cached(
        "INSERT OR IGNORE INTO turn_keys (session_id, principal_id, key, seq)
         SELECT session_id, principal_id, key, seq FROM turns
         WHERE session_id = ?1 AND seq >= ?2 AND key IS NOT NULL AND principal_id IS NOT NULL",
    )?
    .execute(params![session_id, keys_from])?;
    conn.prepare_cached("UPDATE sessions SET keys_from = ?2 WHERE id = ?1")?
        .execute(params![session_id, next_seq])?;
    Ok(())
}

/// Advance the session's next sequence number by `n` (and set its memory).
fn bump_seqs(
    conn: &Connection,
    session_id: &str,
    n: i64,
    memory: Option<&str>,
    at: &str,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "UPDATE sessions SET next_seq = next_seq + ?2, updated_at = ?3,
                memory_json = COALESCE(?4, memory_json)
         WHERE id = ?1",
    )?
    .execute(params![session_id, n, at, memory])?;
    Ok(())
}

/// One row of `turns` to insert.
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
    /// A turn keel writes itself (reply or notice): plain text, no key.
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
    conn: &Connection,
    session_id: &str,
    t: &NewTurn<'_>,
    at: &str,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO turns (session_id, seq, role, content, key, principal_id, in_reply_to,
                            status, created_at, kind, meta_json, ref, revises, reply_meta)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
    )?
    .execute(params![
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
    ])?;
    Ok(())
}

/// Store an inbound turn (once per key) and its reply + outbox row.
pub fn commit_exchange(
    conn: &Connection,
    stamp: &Stamp,
    ex: &Exchange,
) -> Result<ExchangeOutcome, StoreError> {
    let at = &stamp.text;
    if let Some(f) = &ex.fence {
        super::portable::leases::check(
            &mut super::sql::SqliteSql(conn),
            &f.lease,
            f.token,
            stamp.ms,
        )?;
    }
    if let Some((adapter, state_json)) = &ex.adapter_state {
        super::adapter_state::save(conn, stamp, adapter, state_json)?;
    }
    if !ex.known {
        ensure_session(conn, &ex.session, Some(&ex.from), at)?;
    }
    let principal = format!("{}:{}", ex.session.channel, ex.from);
    // One read of the session row: where its unfiled keys begin, the guess
    // checked below and the first of the numbers reserved (nothing in
    // between writes the session row: an effect writes timers and tasks).
    let row = session_row(conn, &ex.session.id)?;
    // The key is per sender (R41): (session, sender, id).
    if let Some((user_seq, content)) =
        find_keyed_turn(conn, &ex.session.id, &principal, &ex.key, row.keys_from)?
    {
        return Ok(if content == ex.text {
            ExchangeOutcome::Duplicate { user_seq }
        } else {
            ExchangeOutcome::Conflict { user_seq }
        });
    }
    let (user_seq, unreachable) = (row.next_seq, row.unreachable);
    if ex.expect_seq.is_some_and(|expected| expected != user_seq) {
        return Ok(ExchangeOutcome::Stale);
    }
    let rendered;
    let reply = match (&ex.reply, &ex.effect) {
        (Some(plan), Some(effect)) => {
            let text = super::timers::apply_effect(conn, stamp, &ex.session, &principal, effect)?;
            rendered = ReplyPlan {
                text,
                deliver: plan.deliver,
            };
            Some(&rendered)
        }
        (plan, _) => plan.as_ref(),
    };
    // A turn that is only stored (group chatter, an edit, a bot's own
    // message) gets no reply and waits for nobody.
    let reply = reply.filter(|_| ex.answer);
    let n = if reply.is_some() { 2 } else { 1 };
    bump_seqs(conn, &ex.session.id, n, ex.memory.as_deref(), at)?;
    // A chat that writes to keel (a user message keel answers) can be
    // written to again: a missed "member again" update does not leave it
    // marked unreachable with its timers paused. A moved chat stays moved.
    let back = ex.answer
        && ex.chat_event.is_none()
        && unreachable.is_some_and(|u| !u.starts_with("moved to "));
    let status = match (ex.answer, reply.is_some()) {
        (false, _) => None,
        (true, true) => Some("answered"),
        (true, false) => Some("awaiting"),
    };
    // An edit points at the turn it revises, found by the channel's ref.
    let revises: Option<i64> = match &ex.revises {
        None => None,
        Some(r) => conn
            .prepare_cached(
                "SELECT seq FROM turns WHERE session_id = ?1 AND ref = ?2 ORDER BY seq LIMIT 1",
            )?
            .query_row(params![ex.session.id, r], |row| row.get(0))
            .optional()?,
    };
    insert_turn(
        conn,
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
        apply_memory_patch(conn, person, patch, at)?;
    }
    if let Some(event) = &ex.chat_event {
        apply_chat_event(conn, stamp, &ex.session, event)?;
    } else if back {
        apply_chat_event(conn, stamp, &ex.session, &ChatEvent::Reachable)?;
    }
    let (mut reply_seq, mut outbox_id) = (None, None);
    if let Some(reply) = reply {
        let seq = user_seq + 1;
        insert_turn(
            conn,
            &ex.session.id,
            &NewTurn::own(seq, "assistant", &reply.text, Some(user_seq)),
            at,
        )?;
        reply_seq = Some(seq);
        if reply.deliver {
            outbox_id = Some(insert_outbox(
                conn,
                &ex.session,
                seq,
                Some(&ex.key),
                &reply.text,
                ex.reply_meta.as_deref(),
                at,
            )?);
        }
    }
    file_keys(conn, &ex.session.id, row.keys_from, user_seq + n)?;
    Ok(ExchangeOutcome::Accepted {
        user_seq,
        reply_seq,
        outbox_id,
    })
}

/// Apply what a channel said about the chat of `session` (see [`ChatEvent`]):
/// the portable code (`portable::chats`), on the writer's connection.
pub fn apply_chat_event(
    conn: &Connection,
    stamp: &Stamp,
    session: &SessionKey,
    event: &ChatEvent,
) -> Result<(), StoreError> {
    super::portable::chats::apply_chat_event(
        &mut super::sql::SqliteSql(conn),
        stamp,
        session,
        event,
    )
}

/// Apply `patch` (a JSON object; `null` removes a key) to the memory of
/// `session` (created if needed).
fn apply_memory_patch(
    conn: &Connection,
    session: &SessionKey,
    patch: &str,
    at: &str,
) -> Result<(), StoreError> {
    use serde_json::{Map, Value};
    ensure_session(conn, session, None, at)?;
    let current = session_memory(conn, &session.id)?.unwrap_or_default();
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
    conn.prepare_cached("UPDATE sessions SET memory_json = ?2, updated_at = ?3 WHERE id = ?1")?
        .execute(params![session.id, Value::Object(memory).to_string(), at])?;
    Ok(())
}

/// Store the external agent's reply to an awaiting user turn. Idempotent: a
/// turn that is already answered is left alone and `None` is returned.
pub fn commit_agent_reply(
    conn: &Connection,
    stamp: &Stamp,
    session: &SessionKey,
    user_seq: i64,
    reply: &ReplyPlan,
) -> Result<Option<(i64, Option<i64>)>, StoreError> {
    let at = &stamp.text;
    type Row = (Option<String>, Option<String>, Option<String>);
    let row: Option<Row> = conn
        .prepare_cached(
            "SELECT status, key, reply_meta FROM turns WHERE session_id = ?1 AND seq = ?2",
        )?
        .query_row(params![session.id, user_seq], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()?;
    let Some((Some(status), key, reply_meta)) = row else {
        return Err(StoreError::Invalid(format!(
            "no user turn {user_seq} in session {}",
            session.id
        )));
    };
    if status != "awaiting" {
        return Ok(None);
    }
    conn.prepare_cached("UPDATE turns SET status = 'answered' WHERE session_id = ?1 AND seq = ?2")?
        .execute(params![session.id, user_seq])?;
    let seq = take_seqs(conn, &session.id, 1, None, at)?;
    insert_turn(
        conn,
        &session.id,
        &NewTurn::own(seq, "assistant", &reply.text, Some(user_seq)),
        at,
    )?;
    let outbox = if reply.deliver {
        Some(insert_outbox(
            conn,
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

/// A message from keel itself (e.g. "restarted") to a chat, via the outbox.
pub fn commit_notice(
    conn: &Connection,
    stamp: &Stamp,
    session: &SessionKey,
    text: &str,
    deliver: bool,
) -> Result<(i64, Option<i64>), StoreError> {
    let at = &stamp.text;
    ensure_session(conn, session, None, at)?;
    let seq = take_seqs(conn, &session.id, 1, None, at)?;
    insert_turn(
        conn,
        &session.id,
        &NewTurn::own(seq, "system", text, None),
        at,
    )?;
    let outbox = if deliver {
        Some(insert_outbox(conn, session, seq, None, text, None, at)?)
    } else {
        None
    };
    Ok((seq, outbox))
}

/// Working memory and the newest `tail` turns of a session.
pub fn load_session(
    conn: &Connection,
    session_id: &str,
    tail: i64,
) -> Result<Option<SessionSnapshot>, StoreError> {
    let row: Option<(String, i64)> = conn
        .prepare_cached("SELECT memory_json, next_seq FROM sessions WHERE id = ?1")?
        .query_row([session_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let Some((memory_json, next_seq)) = row else {
        return Ok(None);
    };
    let mut recent = turns_desc(conn, session_id, tail)?;
    recent.reverse();
    Ok(Some(SessionSnapshot {
        memory_json,
        recent,
        next_seq,
    }))
}

// The sender is the principal id without its "<channel>:" prefix (channel
// names never contain ':'), so no join is needed.
const TURN_COLUMNS: &str = "SELECT t.seq, t.role, t.content, t.key, t.created_at,
        CASE WHEN t.role = 'user' THEN NULL ELSE o.state = 'sent' END,
        CASE WHEN t.role = 'user' AND t.principal_id IS NOT NULL
             THEN substr(t.principal_id, instr(t.principal_id, ':') + 1) END,
        t.kind, t.meta_json, t.revises,
        o.state, o.last_error, o.channel_ref, o.delivery_status, o.delivery_at, o.delivery_error
     FROM turns t LEFT JOIN outbox o ON t.role != 'user' AND o.id = (
         -- A reply split into parts has a row per part: the one shown is
         -- the least advanced (failed, unknown, pending, then sent; the
         -- first part when all are sent).
         SELECT p.id FROM outbox p WHERE p.session_id = t.session_id AND p.turn_seq = t.seq
         ORDER BY CASE p.state WHEN 'failed' THEN 0 WHEN 'unknown' THEN 1
                               WHEN 'pending' THEN 2 ELSE 3 END, p.id
         LIMIT 1)";

fn turn_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TurnRow> {
    let meta: Option<String> = r.get(8)?;
    Ok(TurnRow {
        seq: r.get(0)?,
        role: r.get(1)?,
        text: r.get(2)?,
        key: r.get(3)?,
        created_at: r.get(4)?,
        sent: r.get(5)?,
        from: r.get(6)?,
        kind: r.get(7)?,
        // Written only by keel as JSON; unreadable text is shown as a string.
        meta: meta.map(|m| serde_json::from_str(&m).unwrap_or(serde_json::Value::String(m))),
        revises: r.get(9)?,
        delivery: match r.get::<_, Option<String>>(10)? {
            None => None,
            Some(state) => Some(Delivery {
                error: if state == "sent" { None } else { r.get(11)? },
                state,
                channel_ref: r.get(12)?,
                status: r.get(13)?,
                status_at: r.get(14)?,
                status_error: r.get(15)?,
            }),
        },
    })
}

fn turns_desc(conn: &Connection, session_id: &str, limit: i64) -> Result<Vec<TurnRow>, StoreError> {
    let sql = format!("{TURN_COLUMNS} WHERE t.session_id = ?1 ORDER BY t.seq DESC LIMIT ?2");
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt
        .query_map(params![session_id, limit], turn_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Turns of a session in order, after `after_seq`, at most `limit`.
/// `None` when the session does not exist.
pub fn session_turns(
    conn: &Connection,
    session_id: &str,
    after_seq: i64,
    limit: i64,
) -> Result<Option<Vec<TurnRow>>, StoreError> {
    let exists: Option<i64> = conn
        .prepare_cached("SELECT 1 FROM sessions WHERE id = ?1")?
        .query_row([session_id], |r| r.get(0))
        .optional()?;
    if exists.is_none() {
        return Ok(None);
    }
    let sql =
        format!("{TURN_COLUMNS} WHERE t.session_id = ?1 AND t.seq > ?2 ORDER BY t.seq LIMIT ?3");
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt
        .query_map(params![session_id, after_seq, limit], turn_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(rows))
}

/// All sessions, ordered by id.
pub fn list_sessions(conn: &Connection) -> Result<Vec<SessionSummary>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, channel, chat, next_seq - 1, created_at, updated_at, unreachable
         FROM sessions ORDER BY id",
    )?;
    let rows = stmt
        .query_map([], |r| {
            Ok(SessionSummary {
                id: r.get(0)?,
                channel: r.get(1)?,
                chat: r.get(2)?,
                turns: r.get(3)?,
                created_at: r.get(4)?,
                updated_at: r.get(5)?,
                unreachable: r.get(6)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// A session's memory JSON, or `None` when it does not exist.
pub fn session_memory(conn: &Connection, session_id: &str) -> Result<Option<String>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT memory_json FROM sessions WHERE id = ?1")?
        .query_row([session_id], |r| r.get(0))
        .optional()?)
}

/// User turns still waiting for the external agent, oldest first.
pub fn awaiting_turns(conn: &Connection, limit: i64) -> Result<Vec<AwaitingTurn>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT t.session_id, s.channel, s.chat, t.seq, t.key, t.content
         FROM turns t JOIN sessions s ON s.id = t.session_id
         WHERE t.status = 'awaiting' ORDER BY t.created_at, t.seq LIMIT ?1",
    )?;
    let rows = stmt
        .query_map([limit], |r| {
            Ok(AwaitingTurn {
                session: SessionKey {
                    id: r.get(0)?,
                    channel: r.get(1)?,
                    chat: r.get(2)?,
                },
                seq: r.get(3)?,
                key: r.get(4)?,
                text: r.get(5)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

// ---- messages to the PersistenceActor ----

/// Store an inbound turn (+ reply + outbox row). Sent by session actors; the
/// adapter acknowledges upstream only after `Ok`.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<ExchangeOutcome, StoreError>")]
pub struct CommitExchange(pub Exchange);

impl Handler<CommitExchange> for PersistenceActor {
    type Result = ResponseFuture<Result<ExchangeOutcome, StoreError>>;
    fn handle(&mut self, msg: CommitExchange, _: &mut Context<Self>) -> Self::Result {
        if self.backend() == super::sql::Backend::Postgres {
            return self.call_sql(move |db, at| {
                super::portable::sessions::commit_exchange(db, at, &msg.0)
            });
        }
        self.call(move |c, at| commit_exchange(c, at, &msg.0))
    }
}

/// Several messages of one session, in order, as one job (a session's
/// backlog): each is stored as by `CommitExchange` until one is not
/// accepted; those after it are `Stale` (nothing written). One outcome per
/// exchange; a failure fails them all (nothing written).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Vec<ExchangeOutcome>, StoreError>")]
pub struct CommitExchanges(pub Vec<Exchange>);

/// Runs `one` over `exchanges` in order until one is not accepted.
fn commit_in_order(
    exchanges: &[Exchange],
    mut one: impl FnMut(&Exchange) -> Result<ExchangeOutcome, StoreError>,
) -> Result<Vec<ExchangeOutcome>, StoreError> {
    let mut out = Vec::with_capacity(exchanges.len());
    for ex in exchanges {
        let o = match out.last() {
            Some(o) if !ExchangeOutcome::accepted(o) => ExchangeOutcome::Stale,
            _ => one(ex)?,
        };
        out.push(o);
    }
    Ok(out)
}

impl Handler<CommitExchanges> for PersistenceActor {
    type Result = ResponseFuture<Result<Vec<ExchangeOutcome>, StoreError>>;
    fn handle(&mut self, msg: CommitExchanges, _: &mut Context<Self>) -> Self::Result {
        if self.backend() == super::sql::Backend::Postgres {
            return self.call_sql(move |db, at| {
                commit_in_order(&msg.0, |ex| {
                    super::portable::sessions::commit_exchange(db, at, ex)
                })
            });
        }
        self.call(move |c, at| commit_in_order(&msg.0, |ex| commit_exchange(c, at, ex)))
    }
}

/// Store the external agent's reply. Sent by session actors.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Option<(i64, Option<i64>)>, StoreError>")]
pub struct CommitAgentReply {
    pub session: SessionKey,
    pub user_seq: i64,
    pub reply: ReplyPlan,
}

impl Handler<CommitAgentReply> for PersistenceActor {
    type Result = ResponseFuture<Result<Option<(i64, Option<i64>)>, StoreError>>;
    fn handle(&mut self, msg: CommitAgentReply, _: &mut Context<Self>) -> Self::Result {
        if self.backend() == super::sql::Backend::Postgres {
            return self.call_sql(move |db, at| {
                super::portable::sessions::commit_agent_reply(
                    db,
                    at,
                    &msg.session,
                    msg.user_seq,
                    &msg.reply,
                )
            });
        }
        self.call(move |c, at| commit_agent_reply(c, at, &msg.session, msg.user_seq, &msg.reply))
    }
}

/// A notice from keel itself to a chat (startup notification). Sent by the app.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(i64, Option<i64>), StoreError>")]
pub struct CommitNotice {
    pub session: SessionKey,
    pub text: String,
    pub deliver: bool,
}

impl Handler<CommitNotice> for PersistenceActor {
    type Result = ResponseFuture<Result<(i64, Option<i64>), StoreError>>;
    fn handle(&mut self, msg: CommitNotice, _: &mut Context<Self>) -> Self::Result {
        if self.backend() == super::sql::Backend::Postgres {
            return self.call_sql(move |db, at| {
                super::portable::sessions::commit_notice(
                    db,
                    at,
                    &msg.session,
                    &msg.text,
                    msg.deliver,
                )
            });
        }
        self.call(move |c, at| commit_notice(c, at, &msg.session, &msg.text, msg.deliver))
    }
}

/// A session's working memory JSON (`None`: no such session). Sent by a
/// session actor for a person's memory before each of their messages.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Option<String>, StoreError>")]
pub struct GetMemory {
    pub id: String,
}

impl Handler<GetMemory> for PersistenceActor {
    type Result = ResponseFuture<Result<Option<String>, StoreError>>;
    fn handle(&mut self, msg: GetMemory, _: &mut Context<Self>) -> Self::Result {
        if self.backend() == super::sql::Backend::Postgres {
            return self
                .call_sql(move |db, _| super::portable::sessions::session_memory(db, &msg.id));
        }
        self.call(move |c, _| session_memory(c, &msg.id))
    }
}

/// Apply what a reply sink learnt about a chat (a Telegram 400 naming
/// `migrate_to_chat_id`) without a turn of its own. Sent by the session
/// registry.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(), StoreError>")]
pub struct ApplyChatEvent {
    pub session: SessionKey,
    pub event: ChatEvent,
}

impl Handler<ApplyChatEvent> for PersistenceActor {
    type Result = ResponseFuture<Result<(), StoreError>>;
    fn handle(&mut self, msg: ApplyChatEvent, _: &mut Context<Self>) -> Self::Result {
        self.call_sql(move |db, at| {
            super::portable::chats::apply_chat_event(db, at, &msg.session, &msg.event)
        })
    }
}

/// Load a session's memory and recent turns. Sent by a session actor on wake.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Option<SessionSnapshot>, StoreError>")]
pub struct GetSession {
    pub id: String,
    pub tail: i64,
}

impl Handler<GetSession> for PersistenceActor {
    type Result = ResponseFuture<Result<Option<SessionSnapshot>, StoreError>>;
    fn handle(&mut self, msg: GetSession, _: &mut Context<Self>) -> Self::Result {
        if self.backend() == super::sql::Backend::Postgres {
            return self.call_sql(move |db, _| {
                super::portable::sessions::load_session(db, &msg.id, msg.tail)
            });
        }
        self.call(move |c, _| load_session(c, &msg.id, msg.tail))
    }
}

/// Turns of one session for the admin API.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Option<Vec<TurnRow>>, StoreError>")]
pub struct GetTurns {
    pub session: String,
    pub after_seq: i64,
    pub limit: i64,
}

impl Handler<GetTurns> for PersistenceActor {
    type Result = ResponseFuture<Result<Option<Vec<TurnRow>>, StoreError>>;
    fn handle(&mut self, msg: GetTurns, _: &mut Context<Self>) -> Self::Result {
        if self.backend() == super::sql::Backend::Postgres {
            return self.read_sql(move |db| {
                super::portable::sessions::session_turns(db, &msg.session, msg.after_seq, msg.limit)
            });
        }
        self.call(move |c, _| session_turns(c, &msg.session, msg.after_seq, msg.limit))
    }
}

/// All sessions for the admin API.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Vec<SessionSummary>, StoreError>")]
pub struct GetSessions;

impl Handler<GetSessions> for PersistenceActor {
    type Result = ResponseFuture<Result<Vec<SessionSummary>, StoreError>>;
    fn handle(&mut self, _: GetSessions, _: &mut Context<Self>) -> Self::Result {
        if self.backend() == super::sql::Backend::Postgres {
            return self.read_sql(super::portable::sessions::list_sessions);
        }
        self.call(|c, _| list_sessions(c))
    }
}

/// User turns waiting for the agent. Sent by the session registry at start.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Vec<AwaitingTurn>, StoreError>")]
pub struct GetAwaiting {
    pub limit: i64,
}

impl Handler<GetAwaiting> for PersistenceActor {
    type Result = ResponseFuture<Result<Vec<AwaitingTurn>, StoreError>>;
    fn handle(&mut self, msg: GetAwaiting, _: &mut Context<Self>) -> Self::Result {
        if self.backend() == super::sql::Backend::Postgres {
            return self
                .call_sql(move |db, _| super::portable::sessions::awaiting_turns(db, msg.limit));
        }
        self.call(move |c, _| awaiting_turns(c, msg.limit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Stamp;
    use crate::persistence::meta::{next_boot_epoch, stats};
    use crate::persistence::outbox::{mark_outbox_sent, pending_outbox};
    use crate::persistence::testing::{at, db};

    fn ex(chat: &str, key: &str, text: &str, reply: Option<&str>) -> Exchange {
        let reply = reply.map(|t| ReplyPlan {
            text: t.into(),
            deliver: true,
        });
        Exchange::text(SessionKey::new("webhook", chat), "u1", key, text, reply)
    }

    fn tg(chat: &str, key: &str, text: &str, reply: Option<&str>) -> Exchange {
        let mut e = ex(chat, key, text, reply);
        e.session = SessionKey::new("telegram", chat);
        e
    }

    #[test]
    fn a_migrated_chat_moves_turns_memory_timers_and_unsent_replies_in_time_order() {
        let c = db();
        c.execute_batch("PRAGMA foreign_keys = ON; BEGIN").unwrap();
        let t = |s: i64| Stamp::from_ms(1_764_590_400_000 + s * 1000);
        let mut first = tg("-5", "1", "/remember k v", Some("ok"));
        first.memory = Some(r#"{"k":"old","only_old":1}"#.into());
        commit_exchange(&c, &t(1), &first).unwrap();
        commit_exchange(&c, &t(3), &tg("-5", "3", "later", None)).unwrap();
        let mut newer = tg("-100", "2", "in between", None);
        newer.memory = Some(r#"{"k":"new"}"#.into());
        newer.answer = false;
        commit_exchange(&c, &t(2), &newer).unwrap();
        c.execute(
            "INSERT INTO timers (session_id, kind, schedule, timezone, callback, next_run,
                                 created_at, updated_at)
             VALUES ('telegram:-5', 'once', 'x', 'UTC', 'reminder', 99, 'a', 'a')",
            [],
        )
        .unwrap();
        let mut moved = tg("-100", "4", "", None);
        moved.kind = "service".into();
        moved.answer = false;
        moved.chat_event = Some(ChatEvent::Migrated {
            from: "-5".into(),
            to: "-100".into(),
        });
        commit_exchange(&c, &t(4), &moved).unwrap();
        let dangling = c.execute(
            "INSERT INTO outbox (session_id, turn_seq, channel, chat, text, created_at)
             VALUES ('telegram:-100', 999, 'telegram', '-100', 'x', 'a')",
            [],
        );
        assert!(dangling.is_err(), "foreign keys are checked at once again");
        c.execute_batch("COMMIT").unwrap();
        let turns = session_turns(&c, "telegram:-100", 0, 100).unwrap().unwrap();
        let got: Vec<(i64, &str)> = turns.iter().map(|t| (t.seq, t.text.as_str())).collect();
        assert_eq!(
            got,
            vec![
                (1, "/remember k v"),
                (2, "ok"),
                (3, "in between"),
                (4, "later"),
                (5, "")
            ]
        );
        let reply_to: i64 = c
            .query_row(
                "SELECT in_reply_to FROM turns WHERE session_id = 'telegram:-100' AND seq = 2",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(reply_to, 1);
        let rows = pending_outbox(&c, 0, 10).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].session_id.as_str(), rows[0].chat.as_str()),
            ("telegram:-100", "-100")
        );
        assert_eq!(turns[1].delivery.as_ref().unwrap().state, "pending");
        let timer_session: String = c
            .query_row("SELECT session_id FROM timers", [], |r| r.get(0))
            .unwrap();
        assert_eq!(timer_session, "telegram:-100");
        let memory: serde_json::Value =
            serde_json::from_str(&session_memory(&c, "telegram:-100").unwrap().unwrap()).unwrap();
        assert_eq!(memory, serde_json::json!({"k": "new", "only_old": 1}));
        assert_eq!(session_memory(&c, "telegram:-5").unwrap().unwrap(), "{}");
        let old = list_sessions(&c).unwrap();
        let old = old.iter().find(|s| s.id == "telegram:-5").unwrap();
        assert_eq!(old.unreachable.as_deref(), Some("moved to telegram:-100"));
        // The next turn of the new session follows the merged ones; a
        // second migration notice finds nothing left to move.
        let mut again = tg("-5", "6", "", None);
        again.answer = false;
        again.chat_event = moved.chat_event.clone();
        c.execute_batch("BEGIN").unwrap();
        commit_exchange(&c, &t(5), &again).unwrap();
        commit_exchange(&c, &t(6), &tg("-100", "7", "after", None)).unwrap();
        c.execute_batch("COMMIT").unwrap();
        let turns = session_turns(&c, "telegram:-100", 0, 100).unwrap().unwrap();
        assert_eq!(turns.len(), 7);
        assert_eq!(turns.last().unwrap().text, "after");
        assert_eq!(turns.last().unwrap().seq, 7);
    }

    #[test]
    fn a_long_reply_is_one_outbox_row_per_part_and_its_turn_shows_the_least_advanced() {
        let c = db();
        let long = "a".repeat(9000);
        commit_exchange(&c, &at(), &tg("3", "1", "hi", Some(&long))).unwrap();
        let rows = pending_outbox(&c, 0, 10).unwrap();
        let lens: Vec<usize> = rows.iter().map(|r| r.text.len()).collect();
        assert_eq!(lens, vec![4096, 4096, 808]);
        assert_eq!(
            rows.iter().map(|r| r.text.as_str()).collect::<String>(),
            long
        );
        let state = |c: &Connection| {
            session_turns(c, "telegram:3", 0, 10).unwrap().unwrap()[1]
                .delivery
                .clone()
                .unwrap()
        };
        assert_eq!(
            session_turns(&c, "telegram:3", 0, 10)
                .unwrap()
                .unwrap()
                .len(),
            2
        );
        mark_outbox_sent(&c, &at(), rows[0].id).unwrap();
        mark_outbox_sent(&c, &at(), rows[1].id).unwrap();
        assert_eq!(state(&c).state, "pending");
        mark_outbox_sent(&c, &at(), rows[2].id).unwrap();
        assert_eq!(state(&c).state, "sent");
        // Other channels take any length: one row.
        commit_exchange(&c, &at(), &ex("w", "1", "hi", Some(&long))).unwrap();
        assert_eq!(pending_outbox(&c, 0, 10).unwrap().len(), 1);
    }

    #[test]
    fn an_unreachable_chat_fails_its_replies_and_pauses_its_timers_until_it_is_back() {
        let c = db();
        commit_exchange(&c, &at(), &tg("9", "1", "hi", Some("hello"))).unwrap();
        c.execute(
            "INSERT INTO timers (session_id, kind, schedule, timezone, callback, next_run,
                                 created_at, updated_at)
             VALUES ('telegram:9', 'once', 'x', 'UTC', 'reminder', 99, 'a', 'a'),
                    ('telegram:9', 'once', 'x', 'UTC', 'reminder', NULL, 'a', 'a')",
            [],
        )
        .unwrap();
        c.execute(
            "UPDATE timers SET state = 'parked', error = 'bad' WHERE id = 2",
            [],
        )
        .unwrap();
        let mut kicked = tg("9", "2", "", None);
        kicked.answer = false;
        kicked.chat_event = Some(ChatEvent::Unreachable("chat unreachable: kicked".into()));
        commit_exchange(&c, &at(), &kicked).unwrap();
        assert!(pending_outbox(&c, 0, 10).unwrap().is_empty());
        let turns = session_turns(&c, "telegram:9", 0, 10).unwrap().unwrap();
        let d = turns[1].delivery.clone().unwrap();
        assert_eq!(
            (d.state.as_str(), d.error.as_deref()),
            ("failed", Some("chat unreachable: kicked"))
        );
        let states = |c: &Connection| -> Vec<(String, Option<i64>)> {
            let mut s = c
                .prepare("SELECT state, next_run FROM timers ORDER BY id")
                .unwrap();
            s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap()
                .map(Result::unwrap)
                .collect()
        };
        assert_eq!(
            states(&c),
            vec![("parked".into(), Some(99)), ("parked".into(), None)]
        );
        assert!(list_sessions(&c).unwrap()[0].unreachable.is_some());
        // A redelivered kick is a duplicate: nothing applied twice.
        let mut back = tg("9", "3", "", None);
        back.answer = false;
        back.chat_event = Some(ChatEvent::Reachable);
        commit_exchange(&c, &at(), &back).unwrap();
        // Only the paused timer resumes; one parked for its own reason stays.
        assert_eq!(
            states(&c),
            vec![("active".into(), Some(99)), ("parked".into(), None)]
        );
        assert!(list_sessions(&c).unwrap()[0].unreachable.is_none());
        // Kicked again; then the chat simply writes: reachable, timer back.
        let mut again = tg("9", "4", "", None);
        again.answer = false;
        again.chat_event = Some(ChatEvent::Unreachable("chat unreachable: left".into()));
        commit_exchange(&c, &at(), &again).unwrap();
        assert_eq!(states(&c)[0].0, "parked");
        commit_exchange(&c, &at(), &tg("9", "5", "hello?", Some("hi"))).unwrap();
        assert_eq!(states(&c)[0].0, "active");
        assert!(list_sessions(&c).unwrap()[0].unreachable.is_none());
    }

    #[test]
    fn an_exchange_stores_turns_and_outbox_once_per_key() {
        let c = db();
        let out = commit_exchange(&c, &at(), &ex("c1", "m1", "hi", Some("hello"))).unwrap();
        assert_eq!(
            out,
            ExchangeOutcome::Accepted {
                user_seq: 1,
                reply_seq: Some(2),
                outbox_id: Some(1)
            }
        );
        let dup = commit_exchange(&c, &at(), &ex("c1", "m1", "hi", Some("x"))).unwrap();
        assert_eq!(dup, ExchangeOutcome::Duplicate { user_seq: 1 });
        let conflict = commit_exchange(&c, &at(), &ex("c1", "m1", "hi again", Some("x"))).unwrap();
        assert_eq!(conflict, ExchangeOutcome::Conflict { user_seq: 1 });
        // Another sender's m1 in the same chat is its own message (R41).
        let mut other = ex("c1", "m1", "hi again", Some("y"));
        other.from = "u2".into();
        assert!(matches!(
            commit_exchange(&c, &at(), &other).unwrap(),
            ExchangeOutcome::Accepted { user_seq: 3, .. }
        ));
        let turns = session_turns(&c, "webhook:c1", 0, 100).unwrap().unwrap();
        assert_eq!(turns.len(), 4);
        assert_eq!(turns[0].key.as_deref(), Some("m1"));
        assert_eq!(turns[0].from.as_deref(), Some("u1"));
        assert_eq!(turns[2].from.as_deref(), Some("u2"));
        assert_eq!(
            (turns[1].from.as_deref(), turns[1].key.as_deref()),
            (None, None)
        );
        assert_eq!(turns[1].sent, Some(false));
        let pending = pending_outbox(&c, 0, 10).unwrap();
        assert_eq!(pending.len(), 2);
        mark_outbox_sent(&c, &at(), pending[1].id).unwrap();
        let pending = pending_outbox(&c, 0, 10).unwrap();
        assert_eq!(pending[0].in_reply_to.as_deref(), Some("m1"));
        mark_outbox_sent(&c, &at(), pending[0].id).unwrap();
        assert!(pending_outbox(&c, 0, 10).unwrap().is_empty());
        let turns = session_turns(&c, "webhook:c1", 0, 100).unwrap().unwrap();
        assert_eq!(turns[1].sent, Some(true));
    }

    #[test]
    fn adapter_state_rides_in_the_exchange_transaction_even_for_a_duplicate() {
        let c = db();
        let mut e = ex("c1", "7", "hi", Some("ok"));
        e.adapter_state = Some(("telegram:x".into(), r#"{"last_offset":7}"#.into()));
        commit_exchange(&c, &at(), &e).unwrap();
        let stored = crate::persistence::adapter_state::load(&c, "telegram:x").unwrap();
        assert_eq!(stored.as_deref(), Some(r#"{"last_offset":7}"#));
        // A redelivered last update still moves the offset.
        e.adapter_state = Some(("telegram:x".into(), r#"{"last_offset":8}"#.into()));
        assert!(matches!(
            commit_exchange(&c, &at(), &e).unwrap(),
            ExchangeOutcome::Duplicate { .. }
        ));
        let stored = crate::persistence::adapter_state::load(&c, "telegram:x").unwrap();
        assert_eq!(stored.as_deref(), Some(r#"{"last_offset":8}"#));
    }

    #[test]
    fn stored_only_turns_edits_and_reply_routing() {
        let c = db();
        let mut first = ex("g", "u100", "photo of a cat", Some("nice"));
        first.kind = "photo".into();
        first.meta = Some(r#"{"file_id":"F1"}"#.into());
        first.msg_ref = Some("55".into());
        first.reply_meta = Some(r#"{"message_id":55,"thread":7}"#.into());
        commit_exchange(&c, &at(), &first).unwrap();
        // Chatter not addressed to keel: stored, no reply, not awaiting.
        let mut chatter = ex("g", "u101", "lol", Some("never sent"));
        chatter.answer = false;
        let out = commit_exchange(&c, &at(), &chatter).unwrap();
        assert!(matches!(
            out,
            ExchangeOutcome::Accepted {
                reply_seq: None,
                outbox_id: None,
                ..
            }
        ));
        // An edit of message 55 points at its turn.
        let mut edit = ex("g", "u102", "photo of a dog", None);
        edit.kind = "edit".into();
        edit.revises = Some("55".into());
        edit.answer = false;
        commit_exchange(&c, &at(), &edit).unwrap();
        let turns = session_turns(&c, "webhook:g", 0, 100).unwrap().unwrap();
        let kinds: Vec<(&str, &str, Option<i64>)> = turns
            .iter()
            .map(|t| (t.role.as_str(), t.kind.as_str(), t.revises))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("user", "photo", None),
                ("assistant", "text", None),
                ("user", "text", None),
                ("user", "edit", Some(1)),
            ]
        );
        assert_eq!(turns[0].meta, Some(serde_json::json!({"file_id": "F1"})));
        assert!(awaiting_turns(&c, 10).unwrap().is_empty());
        // The reply carries the routing of the message it answers.
        let pending = crate::persistence::outbox::pending_outbox(&c, 0, 10).unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(
            pending[0].reply_meta,
            Some(serde_json::json!({"message_id": 55, "thread": 7}))
        );
        // So does an agent's later reply.
        let mut q = ex("g", "u103", "question", None);
        q.reply_meta = Some(r#"{"message_id":60}"#.into());
        commit_exchange(&c, &at(), &q).unwrap();
        let seq = awaiting_turns(&c, 10).unwrap()[0].seq;
        let plan = ReplyPlan {
            text: "answer".into(),
            deliver: true,
        };
        let s = SessionKey::new("webhook", "g");
        commit_agent_reply(&c, &at(), &s, seq, &plan).unwrap();
        let pending = crate::persistence::outbox::pending_outbox(&c, 0, 10).unwrap();
        assert_eq!(
            pending[1].reply_meta,
            Some(serde_json::json!({"message_id": 60}))
        );
    }

    #[test]
    fn hostile_text_is_stored_literally() {
        let c = db();
        let evil = "'); DROP TABLE sessions;--";
        commit_exchange(&c, &at(), &ex(evil, evil, evil, None)).unwrap();
        let id = format!("webhook:{evil}");
        let turns = session_turns(&c, &id, 0, 10).unwrap().unwrap();
        assert_eq!(turns[0].text, evil);
        assert_eq!(list_sessions(&c).unwrap().len(), 1);
    }

    #[test]
    fn agent_replies_answer_awaiting_turns_once() {
        let c = db();
        commit_exchange(&c, &at(), &ex("c1", "m1", "question", None)).unwrap();
        let waiting = awaiting_turns(&c, 10).unwrap();
        assert_eq!(waiting.len(), 1);
        let plan = ReplyPlan {
            text: "answer".into(),
            deliver: true,
        };
        let s = SessionKey::new("webhook", "c1");
        assert_eq!(
            commit_agent_reply(&c, &at(), &s, 1, &plan).unwrap(),
            Some((2, Some(1)))
        );
        assert_eq!(commit_agent_reply(&c, &at(), &s, 1, &plan).unwrap(), None);
        assert!(awaiting_turns(&c, 10).unwrap().is_empty());
    }

    #[test]
    fn boot_epoch_counts_up() {
        let c = db();
        assert_eq!(next_boot_epoch(&c).unwrap(), 1);
        assert_eq!(next_boot_epoch(&c).unwrap(), 2);
        assert_eq!(stats(&c).unwrap().boot_epoch, 2);
    }
}
