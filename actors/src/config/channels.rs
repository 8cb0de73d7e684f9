//! The channel sections of keel.toml: `[telegram]` and `[slack]`. Plain
//! data with defaults and validation; the adapters that use them live in
//! `adapter/`, and nothing here knows about them.

use serde::Deserialize;

use super::ids::{check_external_id, string_or_int};
use super::Secret;

/// `[telegram] group_replies`: which group messages keel answers.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum GroupReplies {
    /// Only messages addressed to the bot: a command, an @mention of it, or
    /// a reply to one of its messages. Everything else is stored.
    #[default]
    Addressed,
    /// Every user message, as in a private chat.
    All,
}

/// `[telegram] mode`: how updates arrive.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TelegramMode {
    /// keel asks with `getUpdates` (long polling); nothing needs to reach keel.
    #[default]
    Polling,
    /// Telegram POSTs each update to `/v1/telegram` (registered by the
    /// operator with `setWebhook`), signed with `webhook_secret`.
    Webhook,
}

/// `[telegram]` in keel.toml. The token may come from `KEEL_TELEGRAM_TOKEN`
/// and the webhook secret from `KEEL_TELEGRAM_WEBHOOK_SECRET` instead (read
/// by the binary).
// Debug is derived: every secret is a `Secret`, printed `<redacted>`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TelegramConfig {
    pub enabled: bool,
    /// Bot API base URL, without the `/bot<token>` part.
    pub api_base: String,
    pub token: Option<Secret>,
    /// The owner's chat id (R17/R18 notices when the owner is on Telegram);
    /// written as an integer or a string.
    #[serde(deserialize_with = "string_or_int::option")]
    pub owner_chat: Option<String>,
    /// Long-poll `timeout` sent to getUpdates, in seconds.
    pub poll_timeout_s: u64,
    /// Updates per getUpdates (1–100).
    pub limit: u32,
    /// Added to the poll timeout for the total request timeout, so a
    /// hanging server is noticed.
    pub request_margin_s: u64,
    /// Which group and supergroup messages are answered (default: only
    /// those addressed to the bot).
    pub group_replies: GroupReplies,
    /// Polling (default) or webhook.
    pub mode: TelegramMode,
    /// The `secret_token` given to `setWebhook`: Telegram sends it in
    /// `X-Telegram-Bot-Api-Secret-Token` with every update (webhook mode).
    pub webhook_secret: Option<Secret>,
}

impl Default for TelegramConfig {
    fn default() -> Self {
        TelegramConfig {
            enabled: false,
            api_base: "https://api.telegram.org".into(),
            token: None,
            owner_chat: None,
            poll_timeout_s: 30,
            limit: 100,
            request_margin_s: 10,
            group_replies: GroupReplies::Addressed,
            mode: TelegramMode::Polling,
            webhook_secret: None,
        }
    }
}

impl TelegramConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.api_base.starts_with("http://") || self.api_base.starts_with("https://")) {
            return Err("api_base must be an http:// or https:// URL".into());
        }
        if let Some(t) = self.token.as_ref().map(Secret::expose) {
            if t.is_empty()
                || t.chars()
                    .any(|c| c.is_whitespace() || c == '/' || c.is_control())
            {
                return Err("token must be non-empty, without spaces or '/'".into());
            }
        }
        if let Some(chat) = &self.owner_chat {
            check_external_id("owner_chat", chat)?;
        }
        if self.poll_timeout_s > 600 || !(1..=100).contains(&self.limit) {
            return Err("poll_timeout_s must be <= 600 and limit between 1 and 100".into());
        }
        if let Some(s) = self.webhook_secret.as_ref().map(Secret::expose) {
            // Telegram's own rule for `secret_token`.
            if s.is_empty()
                || s.len() > 256
                || !s
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(
                    "webhook_secret must be 1-256 characters of A-Z, a-z, 0-9, _ and -".into(),
                );
            }
        }
        if self.enabled && self.mode == TelegramMode::Webhook && self.webhook_secret.is_none() {
            return Err("mode = \"webhook\" needs a webhook_secret (set telegram.webhook_secret or KEEL_TELEGRAM_WEBHOOK_SECRET, and give the same value to setWebhook as secret_token)".into());
        }
        Ok(())
    }
}

/// `[slack]` in keel.toml. Tokens may come from `KEEL_SLACK_APP_TOKEN` and
/// `KEEL_SLACK_BOT_TOKEN` instead (read by the binary).
// Debug is derived: every secret is a `Secret`, printed `<redacted>`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SlackConfig {
    pub enabled: bool,
    /// Web API base URL (`apps.connections.open`, `chat.postMessage`).
    pub api_base: String,
    /// App-level token (`xapp-…`) for Socket Mode.
    pub app_token: Option<Secret>,
    /// Bot token (`xoxb-…`) for `chat.postMessage`.
    pub bot_token: Option<Secret>,
    /// Bound on silence (no hello, no frame, no ping) before reconnecting.
    pub silence_timeout_s: u64,
    /// Which channel messages are answered (default: only those addressed
    /// to the bot: a mention, a command, a thread keel is in). Direct
    /// messages are always answered.
    pub channel_replies: GroupReplies,
}

impl Default for SlackConfig {
    fn default() -> Self {
        SlackConfig {
            enabled: false,
            api_base: "https://slack.com/api".into(),
            app_token: None,
            bot_token: None,
            silence_timeout_s: 60,
            channel_replies: GroupReplies::Addressed,
        }
    }
}

impl SlackConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.api_base.starts_with("http://") || self.api_base.starts_with("https://")) {
            return Err("api_base must be an http:// or https:// URL".into());
        }
        if self.silence_timeout_s == 0 || self.silence_timeout_s > 3600 {
            return Err("silence_timeout_s must be between 1 and 3600".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn chat_ids_may_be_integers_or_strings_and_group_replies_parses() {
        let c = Config::from_toml(
            "[telegram]\nowner_chat = 123456\ngroup_replies = \"all\"\n\
             [owner]\nchannel = \"telegram\"\nchat = -1001333",
            "t",
        )
        .unwrap();
        assert_eq!(c.telegram.owner_chat.as_deref(), Some("123456"));
        assert_eq!(c.telegram.group_replies, GroupReplies::All);
        assert_eq!(c.owner.unwrap().chat, "-1001333");
        let c = Config::from_toml("[telegram]\nowner_chat = \"42\"", "t").unwrap();
        assert_eq!(c.telegram.owner_chat.as_deref(), Some("42"));
        assert_eq!(c.telegram.group_replies, GroupReplies::Addressed);
        assert!(Config::from_toml("[telegram]\ngroup_replies = \"some\"", "t").is_err());
        assert!(Config::from_toml("[telegram]\nowner_chat = 1.5", "t").is_err());
    }
}
