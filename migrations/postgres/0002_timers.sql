-- keel PostgreSQL schema 2: timers as on SQLite (its 0002_timers).
-- Append-only: never edit a released migration; add the next number instead.

-- The pruning job: finished timers by age (SQLite has had it since its
-- schema 2; 0001 here lacked it, so pruning scanned the table).
CREATE INDEX timers_finished ON timers(updated_at) WHERE state IN ('done', 'cancelled');
