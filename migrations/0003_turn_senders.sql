-- keel schema 3: inbound idempotency keys are per sender (R2, R41), and
-- turns carry a kind, metadata and the turn they revise (R40).
-- Append-only: never edit a released migration; add 0004_… instead.

-- Two senders in one chat may reuse an id: the key is (session, sender, id).
-- Existing keyed turns are user turns and already carry their sender
-- (`principal_id` = "<channel>:<from>"), so swapping the index migrates them.
DROP INDEX turns_session_key;
CREATE UNIQUE INDEX turns_sender_key ON turns(session_id, principal_id, key)
    WHERE key IS NOT NULL;

-- What a turn is: 'text' for every turn stored before this version; channels
-- add 'photo', 'document', 'edit', 'callback', … with `meta_json` holding
-- what the channel said about it (file ids, sizes, coordinates).
ALTER TABLE turns ADD COLUMN kind TEXT NOT NULL DEFAULT 'text';
ALTER TABLE turns ADD COLUMN meta_json TEXT;
-- For kind 'edit': the seq of the turn this one revises.
ALTER TABLE turns ADD COLUMN revises INTEGER;
