-- keel schema 1: sessions, turns, durable outbox, adapter state, metadata.
-- Append-only: never edit a released migration; add 0002_… instead.

-- Small key/value facts about the store itself (boot epoch, last probe).
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

-- Migration history; PRAGMA user_version holds the current number.
CREATE TABLE schema_migrations (
    version    INTEGER PRIMARY KEY,
    name       TEXT NOT NULL,
    applied_at TEXT NOT NULL
);

-- A person on a channel ("<channel>:<user id>"); the timezone is theirs (R8).
CREATE TABLE principals (
    id          TEXT PRIMARY KEY,
    channel     TEXT NOT NULL,
    external_id TEXT NOT NULL,
    timezone    TEXT,
    created_at  TEXT NOT NULL
) WITHOUT ROWID;

-- One conversation ("<channel>:<chat id>") with its working memory (R6).
CREATE TABLE sessions (
    id           TEXT PRIMARY KEY,
    channel      TEXT NOT NULL,
    chat         TEXT NOT NULL,
    principal_id TEXT REFERENCES principals(id),
    memory_json  TEXT NOT NULL DEFAULT '{}',
    next_seq     INTEGER NOT NULL DEFAULT 1,
    created_at   TEXT NOT NULL,
    updated_at   TEXT NOT NULL
) WITHOUT ROWID;

-- Every turn of every session. `key` is the inbound idempotency key (R2):
-- unique per session, so a redelivered message is stored once.
-- `status` is set on user turns: 'answered', or 'awaiting' while an external
-- agent has not replied yet (resumed after a restart).
CREATE TABLE turns (
    session_id   TEXT NOT NULL REFERENCES sessions(id),
    seq          INTEGER NOT NULL,
    role         TEXT NOT NULL CHECK (role IN ('user', 'assistant', 'system')),
    content      TEXT NOT NULL,
    key          TEXT,
    principal_id TEXT,
    in_reply_to  INTEGER,
    status       TEXT CHECK (status IN ('answered', 'awaiting')),
    created_at   TEXT NOT NULL,
    PRIMARY KEY (session_id, seq)
) WITHOUT ROWID;
CREATE UNIQUE INDEX turns_session_key ON turns(session_id, key) WHERE key IS NOT NULL;
CREATE INDEX turns_awaiting ON turns(status) WHERE status = 'awaiting';

-- The durable outbox (R3): a reply is written here in the same transaction as
-- its turn, sent by the outbox actor, and marked sent only after the channel
-- accepted it. 'unknown' = the request left but no answer came back.
CREATE TABLE outbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id  TEXT NOT NULL,
    turn_seq    INTEGER NOT NULL,
    channel     TEXT NOT NULL,
    chat        TEXT NOT NULL,
    in_reply_to TEXT,
    text        TEXT NOT NULL,
    state       TEXT NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending', 'sent', 'unknown', 'failed')),
    attempts    INTEGER NOT NULL DEFAULT 0,
    last_error  TEXT,
    created_at  TEXT NOT NULL,
    sent_at     TEXT,
    FOREIGN KEY (session_id, turn_seq) REFERENCES turns(session_id, seq)
);
CREATE INDEX outbox_pending ON outbox(id) WHERE state = 'pending';
CREATE INDEX outbox_turn ON outbox(session_id, turn_seq);

-- Per-adapter resume state, e.g. the Telegram offset (R14).
CREATE TABLE adapter_state (
    adapter    TEXT PRIMARY KEY,
    state_json TEXT NOT NULL,
    updated_at TEXT NOT NULL
) WITHOUT ROWID;
