-- keel schema 5: what a channel needs to find a message again (R40).
-- Append-only: never edit a released migration; add 0006_… instead.

-- The channel's own reference of an inbound message (Telegram message_id,
-- Slack ts, WhatsApp message id): an edit finds the turn it revises by it.
ALTER TABLE turns ADD COLUMN ref TEXT;
CREATE INDEX turns_ref ON turns(session_id, ref) WHERE ref IS NOT NULL;
-- Where replies to this turn go inside the chat (thread, topic, message to
-- quote), as the channel gave it; copied to every reply's outbox row.
ALTER TABLE turns ADD COLUMN reply_meta TEXT;
ALTER TABLE outbox ADD COLUMN reply_meta TEXT;
