-- Instances and fenced leases (issue 13). On SQLite one process owns the
-- store, so it is the only instance and holds every lease; the tables are
-- the same as on PostgreSQL so `keel status` and the lease code are one.

CREATE TABLE instances (
    id           TEXT PRIMARY KEY,
    epoch        INTEGER NOT NULL,
    started_ms   INTEGER NOT NULL,
    heartbeat_ms INTEGER NOT NULL,
    expires_ms   INTEGER NOT NULL,
    info         TEXT NOT NULL DEFAULT '{}'
) WITHOUT ROWID;

CREATE TABLE leases (
    name       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    token      INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    renewed_ms INTEGER NOT NULL
) WITHOUT ROWID;

-- Which instance fired a due instant (always this one on SQLite).
ALTER TABLE timer_fires ADD COLUMN fired_by TEXT;
