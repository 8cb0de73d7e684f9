-- keel schema 8: the services event log (R25). Append-only and hash-chained
-- (actors/src/chain.rs): each record carries the previous record's hash, so
-- an edited, deleted or torn record is found and the log replayed only up
-- to it. The instance id lives in `meta` (key `containers.instance`).
CREATE TABLE service_events (
    seq        INTEGER PRIMARY KEY,
    kind       TEXT NOT NULL,
    payload    TEXT NOT NULL,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL,
    created_at TEXT NOT NULL
);

-- Append-only at the schema level too.
CREATE TRIGGER service_events_no_update BEFORE UPDATE ON service_events
BEGIN
    SELECT RAISE(ABORT, 'service_events is append-only');
END;
CREATE TRIGGER service_events_no_delete BEFORE DELETE ON service_events
BEGIN
    SELECT RAISE(ABORT, 'service_events is append-only');
END;
