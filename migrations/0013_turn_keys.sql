-- keel schema 13: the inbound idempotency keys (R2, R41) move from an index
-- on `turns` to their own table, filled in bulk per conversation (issue 14).
-- Append-only: never edit a released migration; add 0014_… instead.
--
-- The unique index on turns(session_id, principal_id, key) put one more
-- leaf of a conversation-clustered b-tree into every commit for every
-- message (a third of a group commit's WAL frames at 64 chats). Now a
-- message's key is found either among its conversation's newest turns
-- (seq >= sessions.keys_from: a range of the turns primary key, at most
-- a few dozen rows) or in `turn_keys`, which the writer fills with the
-- keys of those newest turns once there are enough of them, one leaf write
-- for many messages. The duplicate check runs inside the writer's
-- transaction before any turn is numbered, as before.
CREATE TABLE turn_keys (
    session_id   TEXT NOT NULL,
    principal_id TEXT NOT NULL,
    key          TEXT NOT NULL,
    seq          INTEGER NOT NULL,
    PRIMARY KEY (session_id, principal_id, key)
) WITHOUT ROWID;

INSERT INTO turn_keys (session_id, principal_id, key, seq)
    SELECT session_id, principal_id, key, seq FROM turns
    WHERE key IS NOT NULL AND principal_id IS NOT NULL;

-- The first seq whose key is not in `turn_keys` yet.
ALTER TABLE sessions ADD COLUMN keys_from INTEGER NOT NULL DEFAULT 1;
UPDATE sessions SET keys_from = next_seq;

DROP INDEX turns_sender_key;

-- A turn that moves (a Telegram group that became a supergroup: its turns
-- are renumbered into the new chat) takes its key along, whatever side of
-- either conversation's `keys_from` it lands on.
CREATE TRIGGER turn_keys_move AFTER UPDATE OF session_id, seq, principal_id, key ON turns
    WHEN OLD.key IS NOT NULL OR NEW.key IS NOT NULL BEGIN
    DELETE FROM turn_keys
        WHERE session_id = OLD.session_id AND principal_id = OLD.principal_id
          AND key = OLD.key AND seq = OLD.seq;
    INSERT OR REPLACE INTO turn_keys (session_id, principal_id, key, seq)
        SELECT NEW.session_id, NEW.principal_id, NEW.key, NEW.seq
        WHERE NEW.key IS NOT NULL AND NEW.principal_id IS NOT NULL;
END;
CREATE TRIGGER turn_keys_delete AFTER DELETE ON turns WHEN OLD.key IS NOT NULL BEGIN
    DELETE FROM turn_keys
        WHERE session_id = OLD.session_id AND principal_id = OLD.principal_id
          AND key = OLD.key AND seq = OLD.seq;
END;
