-- keel schema 2: durable timers (R7–R11).
-- Append-only: never edit a released migration; add 0003_… instead.

-- One timer. `next_run` is unix milliseconds UTC (an integer: indexable and
-- cheap to compare); NULL once the timer is done, cancelled or parked.
-- kind 'once': schedule is the instant as given; 'cron': a cron expression
-- evaluated in `timezone`; 'interval': a period in milliseconds.
-- History lives in `state`: done/cancelled rows are pruned after the
-- retention period by a periodic job (R11).
CREATE TABLE timers (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id      TEXT NOT NULL REFERENCES sessions(id),
    principal_id    TEXT,
    kind            TEXT NOT NULL CHECK (kind IN ('once', 'cron', 'interval')),
    schedule        TEXT NOT NULL,
    timezone        TEXT NOT NULL,
    callback        TEXT NOT NULL,
    params_json     TEXT NOT NULL DEFAULT '{}',
    misfire         TEXT NOT NULL DEFAULT 'fire_once'
                    CHECK (misfire IN ('fire_once', 'skip', 'fire_all')),
    catchup_secs    INTEGER NOT NULL DEFAULT 86400,
    next_run        INTEGER,
    last_fired      INTEGER,
    fired_count     INTEGER NOT NULL DEFAULT 0,
    missed_count    INTEGER NOT NULL DEFAULT 0,
    state           TEXT NOT NULL DEFAULT 'active'
                    CHECK (state IN ('active', 'done', 'cancelled', 'parked')),
    error           TEXT,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL
);
-- The timer actor's window: the earliest due active timers.
CREATE INDEX timers_due ON timers(next_run, id) WHERE state = 'active';
CREATE INDEX timers_session ON timers(session_id, state);
-- The pruning job: finished timers by age.
CREATE INDEX timers_finished ON timers(updated_at) WHERE state IN ('done', 'cancelled');

-- One row per fired due instant: the primary key makes each instant fire at
-- most once (R9); written in the same transaction as the callback's effect
-- and the timer's next state.
CREATE TABLE timer_fires (
    timer_id INTEGER NOT NULL,
    due_at   INTEGER NOT NULL,
    fired_at INTEGER NOT NULL,
    late_ms  INTEGER NOT NULL,
    PRIMARY KEY (timer_id, due_at)
) WITHOUT ROWID;
CREATE INDEX timer_fires_age ON timer_fires(fired_at);
