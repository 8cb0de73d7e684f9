-- Capability tokens (R29) and the audit log (R31).

-- One row per granted token. Only the SHA-256 of the secret part is kept;
-- the token itself (`keel_<id>_<secret>`) is shown once at grant.
CREATE TABLE tokens (
    id            TEXT PRIMARY KEY,
    secret_sha256 TEXT NOT NULL,
    -- Comma-separated permissions: read, send, tasks, deploy, admin.
    perms         TEXT NOT NULL,
    -- Session-id prefix the token is limited to; NULL = every session.
    scope         TEXT,
    note          TEXT,
    created_at    TEXT NOT NULL,
    -- Unix ms; NULL = never expires.
    expires_ms    INTEGER,
    last_used_at  TEXT,
    revoked_at    TEXT
);

-- Append-only, hash-chained: hash = sha256(prev_hash | seq | at | kind | detail).
CREATE TABLE audit (
    seq       INTEGER PRIMARY KEY,
    at        TEXT NOT NULL,
    kind      TEXT NOT NULL,
    -- JSON object; names only, never secret values.
    detail    TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);

CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only');
END;

CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only');
END;
