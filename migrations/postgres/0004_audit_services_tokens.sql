-- keel shared store, step 4: capability tokens (R29), the audit log (R31)
-- and the services event log (R25), as in SQLite schemas 7 and 8. The two
-- logs are append-only and hash-chained (actors/src/chain.rs); triggers
-- refuse UPDATE and DELETE like SQLite's. Appends from several instances
-- serialise on a lock row in `meta` ('lock:audit', 'lock:service_events',
-- `sql::serialise_on`) taken first in the appending transaction, so sequence numbers and links
-- stay gapless.

CREATE TABLE tokens (
    id            TEXT PRIMARY KEY,
    secret_sha256 TEXT NOT NULL,
    perms         TEXT NOT NULL,
    scope         TEXT,
    note          TEXT,
    created_at    TEXT NOT NULL,
    expires_ms    BIGINT,
    last_used_at  TEXT,
    revoked_at    TEXT
);

CREATE TABLE audit (
    seq       BIGINT PRIMARY KEY,
    at        TEXT NOT NULL,
    kind      TEXT NOT NULL,
    detail    TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);

CREATE TABLE service_events (
    seq        BIGINT PRIMARY KEY,
    kind       TEXT NOT NULL,
    payload    TEXT NOT NULL,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL,
    created_at TEXT NOT NULL
);

CREATE FUNCTION keel_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME;
END;
$$;

CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION keel_append_only();
CREATE TRIGGER service_events_append_only BEFORE UPDATE OR DELETE ON service_events
    FOR EACH ROW EXECUTE FUNCTION keel_append_only();

-- A chat move (persistence/portable/chats.rs) renumbers turns while outbox
-- rows still point at the old numbers: the key is checked at the end of
-- the move (SET CONSTRAINTS … DEFERRED, then IMMEDIATE), as SQLite's
-- `defer_foreign_keys` does. Everywhere else it is checked per statement.
ALTER TABLE outbox ALTER CONSTRAINT outbox_session_id_turn_seq_fkey DEFERRABLE INITIALLY IMMEDIATE;

-- WhatsApp delivery reports find their reply by the channel's message id.
CREATE INDEX outbox_channel_ref ON outbox(channel, channel_ref) WHERE channel_ref IS NOT NULL;
