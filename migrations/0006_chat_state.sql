-- keel schema 6: chats that keel cannot reach any more, and what a channel
-- reported about the replies keel sent (R40, R42).
-- Append-only: never edit a released migration; add 0007_… instead.

-- Why keel cannot write to this chat (Telegram: the bot was kicked or left,
-- or the group moved to a supergroup); NULL while it can. Set and cleared
-- by the channel's own service updates, in the same transaction as them.
ALTER TABLE sessions ADD COLUMN unreachable TEXT;

-- The id the channel gave a sent reply (WhatsApp: the `wamid` the Graph API
-- answered with), so the channel's later delivery reports find the row.
ALTER TABLE outbox ADD COLUMN channel_ref TEXT;
CREATE INDEX outbox_channel_ref ON outbox(channel, channel_ref) WHERE channel_ref IS NOT NULL;
-- The newest delivery report for it (`sent`, `delivered`, `read`, `failed`),
-- when it came and, for `failed`, the channel's reason.
ALTER TABLE outbox ADD COLUMN delivery_status TEXT;
ALTER TABLE outbox ADD COLUMN delivery_at TEXT;
ALTER TABLE outbox ADD COLUMN delivery_error TEXT;
