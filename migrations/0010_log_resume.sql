-- keel schema 11: container tasks resume their logs by engine timestamp.
-- Append-only: never edit a released migration; add a new one instead.

-- On a container task's fragment: where its output stands in the engine's
-- log, "<RFC3339Nano timestamp> <lines at that timestamp> <bytes of the
-- next line>" (every line up to there is stored). NULL for processes.
ALTER TABLE log_fragments ADD COLUMN resume TEXT;
