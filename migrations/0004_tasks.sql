-- keel schema 4: supervised tasks (R19–R22, R38, R45).
-- Append-only: never edit a released migration; add 0005_… instead.

-- One task for its whole life: a requeue after a restart keeps the id and
-- adds 1 to `attempt`. `state` mirrors the newest `task_states` row.
-- `boot_epoch` is the start (R38) that ran the current attempt: a RUNNING
-- row of an older epoch is an orphan at once. `pid`/`pid_start` (field 22
-- of /proc/PID/stat) identify the process group, so a recycled pid is
-- never signalled.
CREATE TABLE tasks (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    name             TEXT NOT NULL,
    args_json        TEXT NOT NULL DEFAULT '[]',
    -- The chat that asked (told when the task ends); NULL for CLI/HTTP.
    session_id       TEXT,
    origin           TEXT NOT NULL CHECK (origin IN ('chat', 'cli', 'http', 'timer')),
    state            TEXT NOT NULL CHECK (state IN ('QUEUED', 'RUNNING', 'SUCCEEDED',
                         'FAILED', 'CANCELLED', 'INTERRUPTED', 'TIMED_OUT')),
    attempt          INTEGER NOT NULL DEFAULT 1,
    exit_code        INTEGER,
    detail           TEXT,
    boot_epoch       INTEGER,
    pid              INTEGER,
    pid_start        INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    log_bytes        INTEGER NOT NULL DEFAULT 0,
    log_dropped      INTEGER NOT NULL DEFAULT 0,
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL,
    finished_at      TEXT
);
-- The runner's queue and recovery: small partial indexes.
CREATE INDEX tasks_queued ON tasks(id) WHERE state = 'QUEUED';
CREATE INDEX tasks_running ON tasks(id) WHERE state = 'RUNNING';
-- Retention (R22): finished tasks by age.
CREATE INDEX tasks_finished ON tasks(finished_at) WHERE finished_at IS NOT NULL;
-- `/tasks`: a chat's recent tasks.
CREATE INDEX tasks_session ON tasks(session_id, id) WHERE session_id IS NOT NULL;

-- Every transition, committed before it is acted on (a task is RUNNING
-- here before its process is spawned).
CREATE TABLE task_states (
    task_id    INTEGER NOT NULL,
    seq        INTEGER NOT NULL,
    state      TEXT NOT NULL,
    at         TEXT NOT NULL,
    boot_epoch INTEGER NOT NULL,
    attempt    INTEGER NOT NULL,
    detail     TEXT,
    PRIMARY KEY (task_id, seq)
) WITHOUT ROWID;

-- Captured output in batches (R20): raw bytes, in `seq` order per task
-- across both streams. A rowid table: fragments are up to a batch large.
CREATE TABLE log_fragments (
    id      INTEGER PRIMARY KEY,
    task_id INTEGER NOT NULL,
    stream  TEXT NOT NULL CHECK (stream IN ('stdout', 'stderr')),
    seq     INTEGER NOT NULL,
    bytes   BLOB NOT NULL,
    at      TEXT NOT NULL
);
CREATE UNIQUE INDEX log_fragments_task ON log_fragments(task_id, seq);
