//! The Telegram adapter: Bot API long polling (`getUpdates`) in, `sendMessage`
//! out, against a configurable `api_base` (R13, R14).
//!
//! One poll cycle: `getUpdates(offset, timeout, limit)` → every update of the
//! batch but the last goes to the session registry as a `Deliver` (key =
//! update_id, session `telegram:<chat_id>`) and is awaited until durable →
//! the last update's `Deliver` carries `{"last_offset": N}` (N = the batch's
//! highest update_id), which the store writes to `adapter_state` in the same
//! transaction as that turn → only then is `getUpdates(offset = N + 1)` sent,
//! which is what confirms the batch to Telegram.
//!
//! So the offset never becomes durable ahead of a turn of its batch (R14). A
//! crash before it leaves the offset at the previous batch: Telegram
//! redelivers, and the unique `(session, key)` drops every stored repeat —
//! nothing lost, nothing processed twice. A malformed update is logged,
//! listed as rejected in the state row and passed over, so it never stalls
//! the offset.
//!
//! Webhook mode (`mode = "webhook"`) replaces the poller with
//! `POST /v1/telegram` ([`TelegramWebhook`]; secret header in constant
//! time, 200 only once durable, deduped by update_id) and a supervised
//! [`TelegramIdentity`] that only runs `getMe`. Both modes turn an update
//! into its `Deliver` through [`intake`]. Updates about the chat itself —
//! a group upgraded to a supergroup, the bot kicked or back — carry a
//! `ChatEvent` the store applies with the turn.

use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use futures::future::BoxFuture;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::supervisor::Adapter;
use crate::config::{GroupReplies, Secret, TelegramConfig, TelegramMode};
use crate::error::{AdapterError, SendError, StoreError};
use crate::health::Gate;
use crate::lease::LeaseKeeper;
use crate::metrics::Metrics;
use crate::outbox::{OutboundReply, ReplySink};
use crate::persistence::cluster::PutFencedAdapterState;
use crate::persistence::portable::leases::Fence;
use crate::persistence::{ChatEvent, GetAdapterState, PersistenceActor, PutAdapterState};
use crate::redact::redact;
use crate::session::{Deliver, SessionRegistry};

/// The `adapter_state` key of a bot: a fingerprint of its token.
pub fn state_key(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    format!("telegram:{}", &hex::encode(digest)[..16])
}

/// A Bot API client bound to one token.
#[derive(Clone)]
pub struct BotApi {
    client: reqwest::Client,
    /// `api_base` without a trailing `/`.
    base: Arc<str>,
    /// Exposed only to build a request URL (`{base}/bot{token}/{method}`)
    /// and to redact it from error details.
    token: Secret,
}

/// The answer to one Bot API call, classified.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiError {
    /// 429 with the wait the server asked for, if any.
    RateLimited(Option<Duration>),
    Unauthorized(String),
    Conflict(String),
    /// 400/403: this request can never succeed.
    Rejected(String),
    /// 5xx, other statuses, bad JSON, network.
    Transient(String),
    /// Timed out after the request left.
    Unknown(String),
    /// 400: the group became this supergroup (`parameters.migrate_to_chat_id`);
    /// the request can be repeated there.
    Migrated(i64),
}

#[derive(Deserialize)]
struct Envelope {
    ok: bool,
    #[serde(default)]
    result: Value,
    error_code: Option<u16>,
    description: Option<String>,
    parameters: Option<Parameters>,
}

#[derive(Deserialize)]
struct Parameters {
    retry_after: Option<u64>,
    migrate_to_chat_id: Option<i64>,
}

/// Classify a Bot API response (status, `Retry-After` header, body).
pub fn classify(
    status: u16,
    retry_after_header: Option<u64>,
    body: &[u8],
) -> Result<Value, ApiError> {
    let env: Option<Envelope> = serde_json::from_slice(body).ok();
    if let Some(env) = &env {
        if env.ok && (200..300).contains(&status) {
            return Ok(env.result.clone());
        }
    }
    let code = env.as_ref().and_then(|e| e.error_code).unwrap_or(status);
    let description = env
        .as_ref()
        .and_then(|e| e.description.clone())
        .unwrap_or_else(|| {
            if env.is_none() && (200..300).contains(&status) {
                "response is not Bot API JSON".into()
            } else {
                format!("HTTP {status}")
            }
        });
    let description: String = description
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect();
    let migrated = env
        .as_ref()
        .and_then(|e| e.parameters.as_ref())
        .and_then(|p| p.migrate_to_chat_id);
    Err(match code {
        400 if migrated.is_some() => ApiError::Migrated(migrated.unwrap_or_default()),
        429 => ApiError::RateLimited(
            env.as_ref()
                .and_then(|e| e.parameters.as_ref())
                .and_then(|p| p.retry_after)
                .or(retry_after_header)
                .map(|s| Duration::from_secs(s.min(3600))),
        ),
        401 => ApiError::Unauthorized(description),
        409 => ApiError::Conflict(description),
        400 | 403 => ApiError::Rejected(format!("{code}: {description}")),
        _ => ApiError::Transient(format!("{code}: {description}")),
    })
}

impl BotApi {
    pub fn new(client: reqwest::Client, api_base: &str, token: &Secret) -> BotApi {
        BotApi {
            client,
            base: api_base.trim_end_matches('/').into(),
            token: token.clone(),
        }
    }

    /// POST `method` with a JSON body; the whole request is bounded by `timeout`.
    pub async fn call(
        &self,
        method: &str,
        body: &Value,
        timeout: Duration,
    ) -> Result<Value, ApiError> {
        let url = format!("{}/bot{}/{method}", self.base, self.token.expose());
        let sent = self
            .client
            .post(url)
            .json(body)
            .timeout(timeout)
            .send()
            .await;
        let resp = match sent {
            Ok(r) => r,
            Err(e) => {
                let detail = redact(&crate::redact::without_url(&e), self.token.expose());
                return Err(if e.is_timeout() {
                    ApiError::Unknown(detail)
                } else {
                    ApiError::Transient(detail)
                });
            }
        };
        let status = resp.status().as_u16();
        let header = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let body = match resp.bytes().await {
            Ok(b) => b,
            Err(e) => {
                let detail = redact(&crate::redact::without_url(&e), self.token.expose());
                return Err(if e.is_timeout() {
                    ApiError::Unknown(detail)
                } else {
                    ApiError::Transient(detail)
                });
            }
        };
        classify(status, header, &body).map_err(|e| match e {
            ApiError::Unauthorized(d) => ApiError::Unauthorized(redact(&d, self.token.expose())),
            ApiError::Conflict(d) => ApiError::Conflict(redact(&d, self.token.expose())),
            ApiError::Rejected(d) => ApiError::Rejected(redact(&d, self.token.expose())),
            ApiError::Transient(d) => ApiError::Transient(redact(&d, self.token.expose())),
            ApiError::Unknown(d) => ApiError::Unknown(redact(&d, self.token.expose())),
            other => other,
        })
    }
}

impl From<ApiError> for AdapterError {
    fn from(e: ApiError) -> AdapterError {
        match e {
            ApiError::RateLimited(Some(d)) => AdapterError::RetryAfter(d),
            ApiError::RateLimited(None) => {
                AdapterError::Transient("HTTP 429 without retry_after".into())
            }
            ApiError::Unauthorized(d) => AdapterError::Unauthorized(d),
            ApiError::Conflict(d) => AdapterError::Conflict(d),
            ApiError::Rejected(d) | ApiError::Transient(d) | ApiError::Unknown(d) => {
                AdapterError::Transient(d)
            }
            ApiError::Migrated(id) => AdapterError::Transient(format!("chat migrated to {id}")),
        }
    }
}

/// Who the bot is, learnt with `getMe` at every adapter start: groups
/// address it by `@username` (mentions, `/cmd@username`) and by replying to
/// its messages (`from.id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BotIdentity {
    pub id: i64,
    pub username: String,
}

/// `getMe`: verifies the token (401 stops the adapter) and names the bot.
pub async fn get_me(api: &BotApi, timeout: Duration) -> Result<BotIdentity, AdapterError> {
    let me = api.call("getMe", &json!({}), timeout).await?;
    let id = me.get("id").and_then(Value::as_i64);
    let username = me.get("username").and_then(Value::as_str);
    match (id, username) {
        (Some(id), Some(username)) if !username.is_empty() => Ok(BotIdentity {
            id,
            username: username.to_string(),
        }),
        _ => Err(AdapterError::Transient(
            "getMe result has no id or username".into(),
        )),
    }
}

/// Longest text or caption stored, in characters (Telegram's own limits are
/// 4096 and 1024; anything longer is hostile and is cut, marked `truncated`).
pub const MAX_TEXT_CHARS: usize = 16_384;
/// Longest string copied into a turn's meta, in characters.
const MAX_META_CHARS: usize = 256;

/// One update as keel stores it: everything a `Deliver` needs, plus the
/// callback query to answer once it is durable.
#[derive(Debug, Clone, PartialEq)]
pub struct Inbound {
    pub chat: String,
    pub from: String,
    /// `text`, a media kind, `edit`, `channel_post`, `callback`, `service`,
    /// `reaction` or `unknown` (the corpus README's table).
    pub kind: String,
    /// The text, a caption, or a callback's data; may be empty.
    pub text: String,
    pub meta: Value,
    /// The Telegram message_id (as text), so an edit finds its original.
    pub msg_ref: Option<String>,
    /// For an edit: the message_id it revises.
    pub revises: Option<String>,
    /// `{"message_id", "chat_type", "message_thread_id"?}` for the sink.
    pub reply_to: Option<Value>,
    /// Whether keel answers it (addressed, not a service message, …).
    pub answer: bool,
    /// A callback query's id, for `answerCallbackQuery`.
    pub callback_id: Option<String>,
    /// An album's `media_group_id`: only its first part is answered.
    pub media_group: Option<String>,
    /// What the update says about the chat: it moved to a supergroup, or
    /// the bot was removed from it or added back.
    pub event: Option<ChatEvent>,
}

/// What to do with one update.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    Store(Box<Inbound>),
    /// Nothing a chat could be found for (inline queries, poll state, an
    /// unknown update type without a chat): logged and passed over.
    Ignore(String),
}

/// The update's id (needed to advance the offset even past a bad update).
pub fn update_id(update: &Value) -> Option<i64> {
    update.get("update_id").and_then(Value::as_i64)
}

/// The update types keel asks for.
pub const ALLOWED_UPDATES: &[&str] = &[
    "message",
    "edited_message",
    "channel_post",
    "edited_channel_post",
    "callback_query",
    "my_chat_member",
    "message_reaction",
];

/// Message fields that make it a service message (never answered).
const SERVICE_FIELDS: &[&str] = &[
    "new_chat_members",
    "left_chat_member",
    "new_chat_title",
    "new_chat_photo",
    "delete_chat_photo",
    "group_chat_created",
    "supergroup_chat_created",
    "channel_chat_created",
    "migrate_to_chat_id",
    "migrate_from_chat_id",
    "pinned_message",
    "message_auto_delete_timer_changed",
    "forum_topic_created",
    "forum_topic_edited",
    "forum_topic_closed",
    "forum_topic_reopened",
    "general_forum_topic_hidden",
    "general_forum_topic_unhidden",
    "video_chat_scheduled",
    "video_chat_started",
    "video_chat_ended",
    "video_chat_participants_invited",
    "write_access_allowed",
    "users_shared",
    "chat_shared",
    "boost_added",
    "chat_background_set",
    "proximity_alert_triggered",
    "successful_payment",
    "refunded_payment",
    "giveaway_created",
    "giveaway_completed",
];

/// Media fields in the order they are checked (`animation` and `venue`
/// messages also carry `document` / `location`, so they come first).
const MEDIA_FIELDS: &[&str] = &[
    "animation",
    "photo",
    "document",
    "voice",
    "audio",
    "video",
    "video_note",
    "sticker",
    "venue",
    "location",
    "contact",
    "poll",
    "dice",
];

/// Fields copied from a media object into meta, when they have the right type.
const MEDIA_META: &[&str] = &[
    "file_id",
    "file_unique_id",
    "file_name",
    "mime_type",
    "file_size",
    "duration",
    "width",
    "height",
    "emoji",
    "set_name",
    "performer",
    "title",
    "latitude",
    "longitude",
    "horizontal_accuracy",
    "address",
    "phone_number",
    "first_name",
    "last_name",
    "user_id",
    "id",
    "question",
    "type",
    "value",
    "is_anonymous",
    "allows_multiple_answers",
];

/// A string fit for storage: NUL and other control characters except
/// newline and tab replaced, at most `max` characters. `true` if cut.
fn clean(s: &str, max: usize) -> (String, bool) {
    let mut out = String::with_capacity(s.len().min(max * 4));
    for (n, c) in s.chars().enumerate() {
        if n == max {
            return (out, true);
        }
        out.push(if c.is_control() && c != '\n' && c != '\t' {
            '\u{FFFD}'
        } else {
            c
        });
    }
    (out, false)
}

/// Copy `field` of `from` into `meta` if it is a number, bool or short string.
fn copy_scalar(meta: &mut serde_json::Map<String, Value>, from: &Value, field: &str) {
    match from.get(field) {
        Some(Value::String(v)) => {
            meta.insert(field.into(), Value::String(clean(v, MAX_META_CHARS).0));
        }
        Some(v @ (Value::Number(_) | Value::Bool(_))) => {
            meta.insert(field.into(), v.clone());
        }
        _ => {}
    }
}

/// The text of `entity` in `text`: Bot API offsets count UTF-16 units.
fn entity_text(text: &str, entity: &Value) -> Option<String> {
    let offset = usize::try_from(entity.get("offset")?.as_u64()?).ok()?;
    let length = usize::try_from(entity.get("length")?.as_u64()?).ok()?;
    let units: Vec<u16> = text.encode_utf16().collect();
    let end = offset.checked_add(length)?;
    let slice = units.get(offset..end)?;
    String::from_utf16(slice).ok()
}

/// Whether the entities of `text` mention the bot (`@username` or a
/// `text_mention` of its user id).
fn mentions(text: &str, entities: Option<&Value>, bot: &BotIdentity) -> bool {
    let Some(list) = entities.and_then(Value::as_array) else {
        return false;
    };
    let handle = format!("@{}", bot.username);
    list.iter()
        .take(100)
        .any(|e| match e.get("type").and_then(Value::as_str) {
            Some("mention") => {
                entity_text(text, e).is_some_and(|t| t.eq_ignore_ascii_case(&handle))
            }
            Some("text_mention") => e.pointer("/user/id").and_then(Value::as_i64) == Some(bot.id),
            _ => false,
        })
}

/// A command's name, the bot it names (`/cmd@bot`) and its arguments.
fn command(text: &str) -> Option<(&str, Option<&str>, &str)> {
    let rest = text.trim_start().strip_prefix('/')?;
    let (word, args) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    if word.is_empty() {
        return None;
    }
    Some(match word.split_once('@') {
        Some((name, target)) => (name, Some(target), args.trim()),
        None => (word, None, args.trim()),
    })
}

/// Take an update apart: where it goes, what it is, whether keel answers it.
/// `Err` is a malformed update (no usable chat, wrong types); it is logged
/// and passed over, never a crash.
pub fn parse_update(
    update: &Value,
    bot: &BotIdentity,
    group_replies: GroupReplies,
) -> Result<Parsed, String> {
    if !update.is_object() {
        return Err("update is not an object".into());
    }
    if let Some(m) = update.get("message") {
        return message(m, Source::Message, bot, group_replies);
    }
    if let Some(m) = update.get("edited_message") {
        return message(m, Source::Edit, bot, group_replies);
    }
    if let Some(m) = update.get("channel_post") {
        return message(m, Source::ChannelPost, bot, group_replies);
    }
    if let Some(m) = update.get("edited_channel_post") {
        return message(m, Source::Edit, bot, group_replies);
    }
    if let Some(q) = update.get("callback_query") {
        return callback(q);
    }
    for field in ["my_chat_member", "chat_member"] {
        if let Some(m) = update.get(field) {
            return member(m, field);
        }
    }
    for field in ["message_reaction", "message_reaction_count"] {
        if let Some(r) = update.get(field) {
            return reaction(r, field);
        }
    }
    unknown(update)
}

#[derive(Clone, Copy, PartialEq)]
enum Source {
    Message,
    Edit,
    ChannelPost,
}

fn chat_of(obj: &Value, what: &str) -> Result<(i64, String), String> {
    if !obj.is_object() {
        return Err(format!("{what} is not an object"));
    }
    let chat = obj
        .pointer("/chat/id")
        .and_then(Value::as_i64)
        .ok_or_else(|| format!("{what}.chat.id missing or not an integer"))?;
    let kind = obj
        .pointer("/chat/type")
        .and_then(Value::as_str)
        .map(|t| clean(t, 32).0)
        .unwrap_or_else(|| "unknown".into());
    Ok((chat, kind))
}

fn message(
    m: &Value,
    source: Source,
    bot: &BotIdentity,
    group_replies: GroupReplies,
) -> Result<Parsed, String> {
    let (chat, chat_type) = chat_of(m, "message")?;
    let from = m
        .pointer("/from/id")
        .and_then(Value::as_i64)
        .or_else(|| m.pointer("/sender_chat/id").and_then(Value::as_i64))
        .unwrap_or(chat);
    let from_bot = m.pointer("/from/is_bot").and_then(Value::as_bool) == Some(true);
    let message_id = m.get("message_id").and_then(Value::as_i64);
    if source == Source::Edit && message_id.is_none() {
        return Err("edit without an integer message_id".into());
    }
    let mut meta = serde_json::Map::new();
    meta.insert("chat_type".into(), json!(chat_type));
    if let Some(id) = message_id {
        meta.insert("message_id".into(), json!(id));
    }
    let mut event = None;
    let (raw_text, entities) = match (m.get("text"), m.get("caption")) {
        (Some(Value::String(t)), _) => (Some(t.as_str()), m.get("entities")),
        (_, Some(Value::String(c))) => (Some(c.as_str()), m.get("caption_entities")),
        _ => (None, None),
    };
    let content = if matches!(m.get("text"), Some(Value::String(_))) {
        "text".to_string()
    } else if let Some(field) = MEDIA_FIELDS.iter().find(|f| m.get(**f).is_some()) {
        let media = m.get(*field).unwrap_or(&Value::Null);
        // A photo is a list of sizes; the last is the largest.
        let media = match media {
            Value::Array(sizes) => {
                meta.insert("sizes".into(), json!(sizes.len()));
                sizes.last().unwrap_or(&Value::Null)
            }
            other => other,
        };
        let mut fields = serde_json::Map::new();
        for f in MEDIA_META {
            copy_scalar(&mut fields, media, f);
        }
        if let Some(loc) = media.get("location") {
            copy_scalar(&mut fields, loc, "latitude");
            copy_scalar(&mut fields, loc, "longitude");
        }
        if let Some(options) = media.get("options").and_then(Value::as_array) {
            let texts: Vec<Value> = options
                .iter()
                .take(12)
                .filter_map(|o| o.get("text").and_then(Value::as_str))
                .map(|t| json!(clean(t, MAX_META_CHARS).0))
                .collect();
            fields.insert("options".into(), Value::Array(texts));
        }
        meta.insert((*field).into(), Value::Object(fields));
        (*field).to_string()
    } else if let Some(field) = SERVICE_FIELDS.iter().find(|f| m.get(**f).is_some()) {
        meta.insert("service".into(), json!(field));
        for id in ["migrate_to_chat_id", "migrate_from_chat_id"] {
            copy_scalar(&mut meta, m, id);
        }
        // The old group says where it went; the new supergroup says where
        // it came from. Either moves the old session (the second finds
        // nothing left to move).
        let to = m.get("migrate_to_chat_id").and_then(Value::as_i64);
        let from = m.get("migrate_from_chat_id").and_then(Value::as_i64);
        event = match (to, from) {
            (Some(to), _) if to != chat => Some(ChatEvent::Migrated {
                from: chat.to_string(),
                to: to.to_string(),
            }),
            (_, Some(from)) if from != chat => Some(ChatEvent::Migrated {
                from: from.to_string(),
                to: chat.to_string(),
            }),
            _ => None,
        };
        "service".to_string()
    } else {
        // A content type keel does not know yet: stored, its field names kept.
        let fields: Vec<Value> = m
            .as_object()
            .map(|o| {
                o.keys()
                    .filter(|k| !matches!(k.as_str(), "chat" | "from" | "date" | "message_id"))
                    .take(10)
                    .map(|k| json!(clean(k, 64).0))
                    .collect()
            })
            .unwrap_or_default();
        meta.insert("fields".into(), Value::Array(fields));
        "unknown".to_string()
    };
    for f in ["media_group_id", "message_thread_id", "edit_date"] {
        copy_scalar(&mut meta, m, f);
    }
    let (text, truncated) = clean(raw_text.unwrap_or(""), MAX_TEXT_CHARS);
    if truncated {
        meta.insert("truncated".into(), json!(true));
    }
    // An edit of a service message is no migration.
    if source == Source::Edit {
        event = None;
    }
    let cmd = command(&text);
    let other_bot = cmd
        .and_then(|(_, target, _)| target)
        .is_some_and(|t| !t.eq_ignore_ascii_case(&bot.username));
    if let Some(("start", _, payload)) = cmd {
        if !payload.is_empty() && !other_bot {
            meta.insert(
                "start_payload".into(),
                json!(clean(payload, MAX_META_CHARS).0),
            );
        }
    }
    let group = matches!(chat_type.as_str(), "group" | "supergroup");
    // A message in a forum topic carries reply_to_message = the topic's
    // creation message: that is not a reply to keel.
    let reply_to_bot = m
        .pointer("/reply_to_message/from/id")
        .and_then(Value::as_i64)
        == Some(bot.id)
        && m.pointer("/reply_to_message/forum_topic_created").is_none();
    let addressed = (cmd.is_some() && !other_bot)
        || raw_text.is_some_and(|t| mentions(t, entities, bot))
        || reply_to_bot;
    let blank = content == "text" && text.trim().is_empty();
    let never = matches!(content.as_str(), "service" | "unknown");
    let answerable = !(never || blank || from_bot || other_bot);
    let answer = source == Source::Message
        && answerable
        && (!group || group_replies == GroupReplies::All || addressed);
    if group {
        meta.insert("addressed".into(), json!(addressed));
    }
    let topic = m.get("is_topic_message").and_then(Value::as_bool) == Some(true);
    let reply_to = message_id.map(|id| {
        let mut r = json!({"message_id": id, "chat_type": chat_type});
        if topic {
            if let Some(t) = m.get("message_thread_id").and_then(Value::as_i64) {
                r["message_thread_id"] = json!(t);
            }
        }
        r
    });
    let kind = match source {
        Source::Edit => {
            meta.insert("content".into(), json!(content));
            "edit".to_string()
        }
        Source::ChannelPost if content == "text" => "channel_post".to_string(),
        Source::ChannelPost => {
            meta.insert("channel_post".into(), json!(true));
            content.clone()
        }
        Source::Message => content.clone(),
    };
    let media_group = m
        .get("media_group_id")
        .and_then(Value::as_str)
        .map(|g| clean(g, 64).0);
    Ok(Parsed::Store(Box::new(Inbound {
        chat: chat.to_string(),
        from: from.to_string(),
        kind,
        text,
        meta: Value::Object(meta),
        msg_ref: message_id.map(|id| id.to_string()),
        revises: (source == Source::Edit)
            .then(|| message_id.map(|id| id.to_string()))
            .flatten(),
        reply_to,
        answer,
        callback_id: None,
        media_group,
        event,
    })))
}

fn callback(q: &Value) -> Result<Parsed, String> {
    let id = q
        .get("id")
        .and_then(Value::as_str)
        .filter(|id| !id.is_empty())
        .ok_or("callback_query.id missing or not a string")?;
    let from = q
        .pointer("/from/id")
        .and_then(Value::as_i64)
        .ok_or("callback_query.from.id missing or not an integer")?;
    let message = q.get("message").filter(|m| m.is_object());
    // A button under an inline-mode message has no chat: it is kept in the
    // sender's private chat and not answered there (keel cannot know the
    // user ever opened one).
    let (chat, chat_type) = match message {
        Some(m) => chat_of(m, "callback_query.message")?,
        None => (from, "private".to_string()),
    };
    let (data, truncated) = clean(
        q.get("data").and_then(Value::as_str).unwrap_or(""),
        MAX_TEXT_CHARS,
    );
    let mut meta = json!({"callback_id": clean(id, MAX_META_CHARS).0, "chat_type": chat_type});
    if truncated {
        meta["truncated"] = json!(true);
    }
    let message_id = message
        .and_then(|m| m.get("message_id"))
        .and_then(Value::as_i64);
    if let Some(mid) = message_id {
        meta["message_id"] = json!(mid);
    }
    // Replies quote the message that carried the button, in its topic.
    let reply_to = message_id.map(|mid| {
        let mut r = json!({"message_id": mid, "chat_type": chat_type});
        let m = message.unwrap_or(&Value::Null);
        if m.get("is_topic_message").and_then(Value::as_bool) == Some(true) {
            if let Some(t) = m.get("message_thread_id").and_then(Value::as_i64) {
                r["message_thread_id"] = json!(t);
            }
        }
        r
    });
    Ok(Parsed::Store(Box::new(Inbound {
        chat: chat.to_string(),
        from: from.to_string(),
        kind: "callback".into(),
        text: data,
        meta,
        msg_ref: None,
        revises: None,
        reply_to,
        answer: message.is_some(),
        callback_id: Some(id.to_string()),
        media_group: None,
        event: None,
    })))
}

fn member(m: &Value, field: &str) -> Result<Parsed, String> {
    let (chat, chat_type) = chat_of(m, field)?;
    let from = m
        .pointer("/from/id")
        .and_then(Value::as_i64)
        .unwrap_or(chat);
    let mut meta = json!({"service": field, "chat_type": chat_type});
    for (key, ptr) in [
        ("old_status", "/old_chat_member/status"),
        ("new_status", "/new_chat_member/status"),
    ] {
        if let Some(s) = m.pointer(ptr).and_then(Value::as_str) {
            meta[key] = json!(clean(s, 32).0);
        }
    }
    if let Some(u) = m
        .pointer("/new_chat_member/user/id")
        .and_then(Value::as_i64)
    {
        meta["user_id"] = json!(u);
    }
    let mut parsed = store_only(chat, from, "service", meta);
    // `my_chat_member` is about the bot itself: kicked or left (a private
    // chat: the user blocked it) makes the chat unreachable; a member again
    // makes it reachable. Never answered either way.
    if field == "my_chat_member" {
        let status = m.pointer("/new_chat_member/status").and_then(Value::as_str);
        let member = m
            .pointer("/new_chat_member/is_member")
            .and_then(Value::as_bool);
        let event = match (status, member) {
            (Some(s @ ("kicked" | "left")), _) | (Some(s @ "restricted"), Some(false)) => {
                Some(ChatEvent::Unreachable(format!(
                    "chat unreachable: the bot's status in it is now {s:?}"
                )))
            }
            (Some("member" | "administrator" | "creator" | "restricted"), _) => {
                Some(ChatEvent::Reachable)
            }
            _ => None,
        };
        if let Parsed::Store(i) = &mut parsed {
            i.event = event;
        }
    }
    Ok(parsed)
}

fn reaction(r: &Value, field: &str) -> Result<Parsed, String> {
    let (chat, chat_type) = chat_of(r, field)?;
    let from = r
        .pointer("/user/id")
        .and_then(Value::as_i64)
        .or_else(|| r.pointer("/actor_chat/id").and_then(Value::as_i64))
        .unwrap_or(chat);
    let emojis = |ptr: &str| -> Vec<Value> {
        r.pointer(ptr)
            .and_then(Value::as_array)
            .map(|l| {
                l.iter()
                    .take(20)
                    .filter_map(|e| e.get("emoji").and_then(Value::as_str))
                    .map(|e| json!(clean(e, 16).0))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut meta = json!({
        "update": field,
        "chat_type": chat_type,
        "new": emojis("/new_reaction"),
        "old": emojis("/old_reaction"),
    });
    if let Some(mid) = r.get("message_id").and_then(Value::as_i64) {
        meta["message_id"] = json!(mid);
    }
    Ok(store_only(chat, from, "reaction", meta))
}

/// An update type keel does not know: stored (kind `unknown`) if some
/// field names a chat, else ignored.
fn unknown(update: &Value) -> Result<Parsed, String> {
    let Some(obj) = update.as_object() else {
        return Err("update is not an object".into());
    };
    for (name, v) in obj.iter().filter(|(k, _)| k.as_str() != "update_id") {
        if let Some(chat) = v.pointer("/chat/id").and_then(Value::as_i64) {
            let from = v
                .pointer("/from/id")
                .and_then(Value::as_i64)
                .unwrap_or(chat);
            let meta = json!({"update": clean(name, 64).0});
            return Ok(store_only(chat, from, "unknown", meta));
        }
    }
    let names: Vec<String> = obj.keys().take(4).map(|k| clean(k, 64).0).collect();
    Ok(Parsed::Ignore(format!(
        "update without a chat ({})",
        names.join(", ")
    )))
}

fn store_only(chat: i64, from: i64, kind: &str, meta: Value) -> Parsed {
    Parsed::Store(Box::new(Inbound {
        chat: chat.to_string(),
        from: from.to_string(),
        kind: kind.into(),
        text: String::new(),
        meta,
        msg_ref: None,
        revises: None,
        reply_to: None,
        answer: false,
        callback_id: None,
        media_group: None,
        event: None,
    }))
}

/// The poller, restarted by the adapter supervisor.
pub struct TelegramAdapter {
    pub api: BotApi,
    pub config: TelegramConfig,
    pub registry: Addr<SessionRegistry>,
    pub persistence: Addr<PersistenceActor>,
    pub gate: Gate,
    pub metrics: Metrics,
    /// Polls only while holding `poller:<state key>` (one poller per bot
    /// across instances); `None`: always.
    pub leases: Option<LeaseKeeper>,
}

/// What the adapter keeps in its `adapter_state` row.
#[derive(Debug, Default, serde::Serialize, Deserialize)]
struct OffsetState {
    last_offset: Option<i64>,
    /// The last few update ids passed over as malformed.
    #[serde(default)]
    rejected: Vec<i64>,
}

impl Adapter for TelegramAdapter {
    fn name(&self) -> &'static str {
        "telegram"
    }

    fn run(&self, stop: watch::Receiver<bool>) -> BoxFuture<'static, Result<(), AdapterError>> {
        let api = self.api.clone();
        let config = self.config.clone();
        let registry = self.registry.clone();
        let persistence = self.persistence.clone();
        let gate = self.gate.clone();
        let metrics = self.metrics.clone();
        let leases = self.leases.clone();
        Box::pin(async move {
            let poller = Poller {
                api,
                config,
                registry,
                persistence,
                gate,
                metrics,
            };
            poller.run(leases, stop).await
        })
    }
}

/// One poller run's parts (the adapter's, cloned per run).
struct Poller {
    api: BotApi,
    config: TelegramConfig,
    registry: Addr<SessionRegistry>,
    persistence: Addr<PersistenceActor>,
    gate: Gate,
    metrics: Metrics,
}

/// Why a stretch of polling under one lease token ended.
enum Polled {
    /// Shutdown, or intake closed.
    Stopped,
    /// The lease moved on (renewal said so, or a fenced write was refused):
    /// wait to hold it again, then resume from the offset in the store.
    LeaseLost,
}

impl Poller {
    /// Poll while this instance holds the bot's lease; while another holds
    /// it, wait (R49: one poller per bot, however many instances run).
    /// Without a keeper, poll unfenced.
    async fn run(
        self,
        leases: Option<LeaseKeeper>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), AdapterError> {
        let key = state_key(self.api.token.expose());
        let Some(keeper) = leases else {
            self.polls(&key, None, &mut stop).await?;
            return Ok(());
        };
        let name = format!("poller:{key}");
        let mut held = keeper.want(&name).await;
        loop {
            if held.borrow().is_none() {
                tracing::info!(lease = %name, "telegram polling waits for the bot's lease");
            }
            let token = tokio::select! {
                t = held.wait_for(Option::is_some) => match t {
                    Ok(t) => (*t).unwrap_or_default(),
                    Err(_) => return Ok(()),
                },
                _ = stop.wait_for(|s| *s) => return Ok(()),
            };
            let fence = Fence {
                lease: name.clone(),
                token,
            };
            let lost = async {
                let mut rx = held.clone();
                let _ = rx.wait_for(|t| *t != Some(token)).await;
            };
            let run = self.polls(&key, Some(&fence), &mut stop);
            let polled = tokio::select! {
                r = run => r?,
                () = lost => Polled::LeaseLost,
            };
            match polled {
                Polled::Stopped => return Ok(()),
                Polled::LeaseLost => {
                    keeper.lost(&name);
                    tracing::info!(lease = %name, token, "telegram polling stopped: lease lost");
                }
            }
        }
    }

    /// Poll from the offset in the store until stopped or, under `fence`,
    /// until a fenced write is refused. Abandoning a poll (or a batch
    /// whose offset write did not commit) loses nothing: the offset has
    /// not moved, so Telegram sends those updates again.
    async fn polls(
        &self,
        key: &str,
        fence: Option<&Fence>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Polled, AdapterError> {
        let (api, config) = (&self.api, &self.config);
        let stored = self
            .persistence
            .send(GetAdapterState {
                adapter: key.to_string(),
            })
            .await
            .unwrap_or(Err(StoreError::Closed))?;
        let mut state: OffsetState = stored
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default();
        let total = Duration::from_secs(config.poll_timeout_s + config.request_margin_s);
        // Every run starts by asking who the bot is: a revoked token fails here
        // with 401 (the supervisor stops the adapter and tells the owner).
        let bot = tokio::select! {
            r = get_me(api, total) => r?,
            _ = stop.wait_for(|s| *s) => return Ok(Polled::Stopped),
        };
        tracing::info!(username = %bot.username, "telegram bot identified");
        let mut albums = Albums::default();
        loop {
            let mut body = json!({
                "timeout": config.poll_timeout_s,
                "limit": config.limit,
                "allowed_updates": ALLOWED_UPDATES,
            });
            if let Some(last) = state.last_offset {
                body["offset"] = json!(last + 1);
            }
            // Shutdown abandons a poll in flight: nothing was stored from it and
            // the offset has not moved, so Telegram sends those updates again.
            let result = tokio::select! {
                r = api.call("getUpdates", &body, total) => r,
                _ = stop.wait_for(|s| *s) => return Ok(Polled::Stopped),
            };
            let updates = match result? {
                Value::Array(u) => u,
                _ => {
                    return Err(AdapterError::Transient(
                        "getUpdates result is not a list".into(),
                    ))
                }
            };
            if updates.is_empty() {
                continue;
            }
            let Some(_guard) = self.gate.enter() else {
                // Intake closed (shutting down): leave the batch unconfirmed.
                return Ok(Polled::Stopped);
            };
            let mut max_id = state.last_offset;
            let mut valid = Vec::new();
            for update in &updates {
                let Some(id) = update_id(update) else {
                    tracing::warn!("telegram update without update_id ignored");
                    continue;
                };
                max_id = Some(max_id.map_or(id, |m| m.max(id)));
                match intake(
                    update,
                    id,
                    &bot,
                    config.group_replies,
                    &mut albums,
                    &self.metrics,
                ) {
                    Intake::Deliver(deliver, callback) => valid.push((id, *deliver, callback)),
                    Intake::Ignored => {}
                    Intake::Rejected(_) => state.rejected.push(id),
                }
            }
            // All updates but the last are stored first (concurrently, through
            // their sessions); the last one carries the new offset, so the offset
            // commits in the same transaction as the batch's final turn and never
            // becomes durable ahead of any turn of its batch (R14). Only that
            // write is fenced: the others are stored once by key whoever
            // stores them.
            let last = valid.pop();
            let mut callbacks = Vec::new();
            let (ids, requests): (Vec<(i64, Option<String>)>, Vec<_>) = valid
                .into_iter()
                .map(|(id, deliver, callback)| {
                    (
                        (id, callback),
                        super::deliver(&self.registry, &self.metrics, deliver),
                    )
                })
                .unzip();
            for ((id, callback), result) in ids
                .into_iter()
                .zip(futures::future::join_all(requests).await)
            {
                if result.is_ok() {
                    callbacks.extend(callback);
                }
                record_outcome(&mut state, id, result)?;
            }
            state.last_offset = max_id;
            let keep = state.rejected.len().saturating_sub(20);
            state.rejected.drain(..keep);
            let json = serde_json::to_string(&state).unwrap_or_default();
            let mut offset_stored = false;
            if let Some((id, mut deliver, callback)) = last {
                deliver.adapter_state = Some((key.to_string(), json.clone()));
                deliver.fence = fence.cloned();
                let result = super::deliver(&self.registry, &self.metrics, deliver).await;
                if matches!(result, Err(StoreError::StaleLease(_))) {
                    return Ok(Polled::LeaseLost);
                }
                offset_stored = result.is_ok();
                if result.is_ok() {
                    callbacks.extend(callback);
                }
                record_outcome(&mut state, id, result)?;
            }
            // Buttons stop spinning only once the press is durable; a redelivered
            // press (after a crash) is answered again, which Telegram tolerates.
            for callback in callbacks {
                actix::spawn(answer_callback(api.clone(), callback));
            }
            if !offset_stored {
                // No valid update in the batch, or its last one was refused on
                // its own: the offset is written by itself.
                let state_json = serde_json::to_string(&state).unwrap_or_default();
                if !self.put_offset(key, state_json, fence).await? {
                    return Ok(Polled::LeaseLost);
                }
            }
            // The batch is durable and answered; the next getUpdates is next.
            crate::failpoint::hit("reply_before_poll");
        }
    }

    /// Write the offset on its own, under `fence` when there is one;
    /// `false`: refused, the lease is lost.
    async fn put_offset(
        &self,
        key: &str,
        state_json: String,
        fence: Option<&Fence>,
    ) -> Result<bool, AdapterError> {
        let adapter = key.to_string();
        let written = match fence {
            Some(f) => self
                .persistence
                .send(PutFencedAdapterState {
                    lease: f.lease.clone(),
                    token: f.token,
                    adapter,
                    state_json,
                })
                .await
                .unwrap_or(Err(StoreError::Closed)),
            None => self
                .persistence
                .send(PutAdapterState {
                    adapter,
                    state_json,
                })
                .await
                .unwrap_or(Err(StoreError::Closed)),
        };
        match written {
            Ok(()) => Ok(true),
            Err(StoreError::StaleLease(_)) => Ok(false),
            Err(e) => Err(AdapterError::Store(e)),
        }
    }
}

/// `answerCallbackQuery` for a stored button press: a few quick tries for
/// transient failures; a 400 ("query is too old", after a restart) is
/// permanent and only logged.
async fn answer_callback(api: BotApi, id: String) {
    let body = json!({ "callback_query_id": id });
    for attempt in 0..3u32 {
        match api
            .call("answerCallbackQuery", &body, Duration::from_secs(10))
            .await
        {
            Ok(_) => return,
            Err(ApiError::Rejected(d)) | Err(ApiError::Unauthorized(d)) => {
                tracing::info!(reason = %d, "telegram callback query not answered");
                return;
            }
            Err(ApiError::RateLimited(wait)) => {
                tokio::time::sleep(wait.unwrap_or(Duration::from_secs(1))).await;
            }
            Err(e) => {
                tracing::debug!(error = ?e, attempt, "answerCallbackQuery failed");
                tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
            }
        }
    }
}

/// Albums arrive as one update per item: only the first item seen is
/// answered (within one run; a restart may answer one more).
#[derive(Debug, Default)]
pub struct Albums(std::collections::VecDeque<String>);

impl Albums {
    /// Whether `group` is an album not seen yet (remembered from now on).
    fn first(&mut self, group: &str) -> bool {
        if self.0.iter().any(|g| g == group) {
            return false;
        }
        self.0.push_back(group.to_string());
        if self.0.len() > 64 {
            self.0.pop_front();
        }
        true
    }
}

/// What one update becomes, the same in polling and webhook mode.
#[derive(Debug)]
pub enum Intake {
    /// Store it (with the callback query to answer once it is durable).
    Deliver(Box<Deliver>, Option<String>),
    /// Nothing to store (no chat); logged and counted.
    Ignored,
    /// Malformed; logged by field name and counted, never stored.
    Rejected(String),
}

/// Parse update `id` into the `Deliver` keel stores for it (key =
/// update_id, session `telegram:<chat_id>`), logging and counting what is
/// passed over. Polling and webhook mode both go through here.
pub fn intake(
    update: &Value,
    id: i64,
    bot: &BotIdentity,
    group_replies: GroupReplies,
    albums: &mut Albums,
    metrics: &Metrics,
) -> Intake {
    match parse_update(update, bot, group_replies) {
        Ok(Parsed::Store(mut msg)) => {
            if let Some(group) = &msg.media_group {
                if !albums.first(group) {
                    msg.answer = false;
                }
            }
            let callback = msg.callback_id.clone();
            Intake::Deliver(Box::new(telegram_deliver(*msg, id)), callback)
        }
        Ok(Parsed::Ignore(reason)) => {
            tracing::info!(update_id = id, reason = %reason, "telegram update ignored");
            super::count_inbound(metrics, "telegram", "ignored");
            Intake::Ignored
        }
        Err(reason) => {
            tracing::warn!(update_id = id, reason = %reason, "telegram update rejected");
            super::count_inbound(metrics, "telegram", "rejected");
            Intake::Rejected(reason)
        }
    }
}

/// The `Deliver` for one update (the poller adds its offset to a batch's last).
fn telegram_deliver(msg: Inbound, id: i64) -> Deliver {
    Deliver {
        chat_event: msg.event,
        kind: msg.kind,
        meta: Some(msg.meta),
        msg_ref: msg.msg_ref,
        revises: msg.revises,
        reply_to: msg.reply_to,
        answer: msg.answer,
        ..Deliver::text("telegram", msg.chat, msg.from, id.to_string(), msg.text)
    }
}

/// Note one delivery's outcome (`deliver` counted it); a storage failure
/// ends this poll run (the supervisor retries it, and the offset has not
/// moved).
fn record_outcome(
    state: &mut OffsetState,
    id: i64,
    result: Result<crate::session::Delivered, StoreError>,
) -> Result<(), AdapterError> {
    match result {
        Ok(_) => Ok(()),
        Err(StoreError::Invalid(reason)) => {
            tracing::warn!(update_id = id, reason = %reason, "telegram update rejected");
            state.rejected.push(id);
            Ok(())
        }
        Err(e) => Err(AdapterError::Store(e)),
    }
}

/// Sends replies to Telegram chats with `sendMessage`.
pub struct TelegramSink {
    pub api: BotApi,
    pub timeout: Duration,
    /// Parts of a split reply already accepted, by outbox id: a resend after
    /// a partial failure starts at the first part not yet accepted. Kept in
    /// memory only, so after a restart every part is sent again (under the
    /// same outbox id: replies are at-least-once).
    pub progress: super::PartProgress,
    /// Told when a reply finds its group became a supergroup: the session
    /// moves as if the migration update had come.
    pub events: super::ChatEvents,
}

impl TelegramSink {
    pub fn new(api: BotApi, timeout: Duration, events: super::ChatEvents) -> TelegramSink {
        TelegramSink {
            api,
            timeout,
            progress: Default::default(),
            events,
        }
    }
}

/// Telegram's limit for one message, in UTF-16 code units.
pub const MAX_MESSAGE_UNITS: usize = 4096;

pub use super::split_message;

/// The `sendMessage` body for one part: the chat, the forum topic, and in
/// groups the message answered, quoted (sent even if it was deleted).
pub fn send_body(chat: &Value, text: &str, reply_meta: Option<&Value>) -> Value {
    let mut body = json!({"chat_id": chat, "text": text});
    let Some(meta) = reply_meta else {
        return body;
    };
    if let Some(thread) = meta.get("message_thread_id").and_then(Value::as_i64) {
        body["message_thread_id"] = json!(thread);
    }
    let group = matches!(
        meta.get("chat_type").and_then(Value::as_str),
        Some("group" | "supergroup")
    );
    if let (true, Some(id)) = (group, meta.get("message_id").and_then(Value::as_i64)) {
        body["reply_parameters"] = json!({"message_id": id, "allow_sending_without_reply": true});
    }
    body
}

/// Map a Bot API failure of `sendMessage` to what the outbox does with it.
pub fn send_error(e: ApiError) -> SendError {
    match e {
        ApiError::RateLimited(wait) => {
            SendError::RetryAfter(wait.unwrap_or(Duration::from_secs(1)))
        }
        ApiError::Unknown(d) => SendError::Unknown(d),
        ApiError::Rejected(d) => SendError::Permanent(format!("telegram rejected the reply: {d}")),
        // The sink follows one migration itself; a second one is odd.
        ApiError::Migrated(id) => SendError::Permanent(format!("chat migrated again (to {id})")),
        // A revoked token may be replaced: keep the reply pending.
        ApiError::Unauthorized(d) | ApiError::Conflict(d) | ApiError::Transient(d) => {
            SendError::Transient(d)
        }
    }
}

impl ReplySink for TelegramSink {
    fn send(&self, reply: OutboundReply) -> BoxFuture<'static, Result<(), SendError>> {
        let api = self.api.clone();
        let timeout = self.timeout;
        let progress = self.progress.clone();
        let events = self.events.clone();
        let mut chat: Value = reply
            .chat
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or_else(|_| Value::from(reply.chat.clone()));
        Box::pin(async move {
            let parts = split_message(&reply.text, MAX_MESSAGE_UNITS);
            let done = progress.resume_at(reply.id);
            // Parts go out one after another, in order; the row is reported
            // sent only after the last one was accepted.
            for (n, part) in parts.iter().enumerate().skip(done) {
                let body = send_body(&chat, part, reply.reply_meta.as_ref());
                match api.call("sendMessage", &body, timeout).await {
                    Ok(_) => {}
                    // A group upgraded to a supergroup: send there (this
                    // part and the rest), once.
                    Err(ApiError::Migrated(to)) if chat != json!(to) => {
                        tracing::info!(chat = %reply.chat, to, "telegram chat migrated; reply sent there");
                        if chat.as_i64().is_some_and(|c| c.to_string() == reply.chat) {
                            events.report(
                                "telegram",
                                &reply.chat,
                                ChatEvent::Migrated {
                                    from: reply.chat.clone(),
                                    to: to.to_string(),
                                },
                            );
                        }
                        chat = json!(to);
                        let body = send_body(&chat, part, reply.reply_meta.as_ref());
                        api.call("sendMessage", &body, timeout)
                            .await
                            .map_err(send_error)?;
                    }
                    Err(e) => return Err(send_error(e)),
                }
                progress.accepted(reply.id, n, parts.len());
            }
            progress.finished(reply.id);
            Ok(())
        })
    }
}

// ---- webhook mode ----

/// Who the bot is, learnt by the webhook-mode adapter's `getMe` and read by
/// the route (`None` until the first `getMe` answered).
pub type BotCell = Arc<std::sync::RwLock<Option<BotIdentity>>>;

/// The supervised part of webhook mode: `getMe` at every start (a refused
/// token stops the channel and the owner is told, as in polling mode), then
/// it only waits; updates arrive on the route.
pub struct TelegramIdentity {
    pub api: BotApi,
    pub bot: BotCell,
    pub timeout: Duration,
}

impl Adapter for TelegramIdentity {
    fn name(&self) -> &'static str {
        "telegram"
    }

    fn run(&self, mut stop: watch::Receiver<bool>) -> BoxFuture<'static, Result<(), AdapterError>> {
        let (api, cell, timeout) = (self.api.clone(), self.bot.clone(), self.timeout);
        Box::pin(async move {
            let bot = tokio::select! {
                r = get_me(&api, timeout) => r?,
                _ = stop.wait_for(|s| *s) => return Ok(()),
            };
            tracing::info!(username = %bot.username, "telegram bot identified (webhook mode)");
            *cell.write().unwrap_or_else(|p| p.into_inner()) = Some(bot);
            let _ = stop.wait_for(|s| *s).await;
            Ok(())
        })
    }
}

/// Largest webhook body read (Telegram's updates are a few KiB).
const MAX_WEBHOOK_BODY: usize = 1024 * 1024;

/// What `POST /v1/telegram` needs.
#[derive(Clone)]
pub struct TelegramWebhook {
    pub api: BotApi,
    /// The `secret_token` given to `setWebhook`; exposed only to compare.
    pub secret: Secret,
    pub group_replies: GroupReplies,
    pub bot: BotCell,
    pub albums: Arc<std::sync::Mutex<Albums>>,
    pub registry: Addr<SessionRegistry>,
    pub gate: Gate,
    pub metrics: Metrics,
}

impl TelegramWebhook {
    /// Mount `POST /v1/telegram`.
    pub fn routes(&self) -> super::ChannelRoutes {
        let state = self.clone();
        Arc::new(move |cfg: &mut actix_web::web::ServiceConfig| {
            cfg.app_data(actix_web::web::Data::new(state.clone()))
                .route("/v1/telegram", actix_web::web::post().to(webhook_post));
        })
    }
}

/// `POST /v1/telegram`: one update per request. The secret header is
/// compared in constant time (missing or wrong: 401, nothing stored); the
/// answer is 200 only once the update is durable, so Telegram redelivers
/// anything keel did not store; a redelivered update is a duplicate of its
/// update_id (200, stored once). A malformed update with the right secret
/// is answered 200 `rejected` and logged, so it never blocks the ones
/// behind it (as the poller passes over it).
async fn webhook_post(
    state: actix_web::web::Data<TelegramWebhook>,
    req: actix_web::HttpRequest,
    payload: actix_web::web::Payload,
) -> actix_web::HttpResponse {
    use super::webhook::{error_response, read_limited, reject};
    use actix_web::HttpResponse;
    use subtle::ConstantTimeEq;
    let given = req
        .headers()
        .get("x-telegram-bot-api-secret-token")
        .map(|v| v.as_bytes())
        .unwrap_or(b"");
    if !bool::from(given.ct_eq(state.secret.expose().as_bytes())) || given.is_empty() {
        super::count_inbound(&state.metrics, "telegram", "rejected");
        tracing::info!("telegram webhook request with a missing or wrong secret token refused");
        return error_response(&reject(
            401,
            "missing or wrong X-Telegram-Bot-Api-Secret-Token",
        ));
    }
    let body = match read_limited(&req, payload, MAX_WEBHOOK_BODY).await {
        Ok(b) => b,
        Err(r) => {
            super::count_inbound(&state.metrics, "telegram", "rejected");
            return error_response(&r);
        }
    };
    let update: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            super::count_inbound(&state.metrics, "telegram", "rejected");
            return error_response(&reject(400, format!("invalid JSON body: {e}")));
        }
    };
    let Some(id) = update_id(&update) else {
        super::count_inbound(&state.metrics, "telegram", "rejected");
        return error_response(&reject(400, "update without an integer update_id"));
    };
    let bot = state.bot.read().unwrap_or_else(|p| p.into_inner()).clone();
    let Some(bot) = bot else {
        // Telegram retries: nothing is lost while getMe is pending.
        super::count_inbound(&state.metrics, "telegram", "unavailable");
        return error_response(&reject(
            503,
            "the bot is not identified yet (getMe pending)",
        ));
    };
    let Some(_guard) = state.gate.enter() else {
        super::count_inbound(&state.metrics, "telegram", "unavailable");
        return error_response(&reject(503, "not accepting messages right now"));
    };
    let parsed = {
        let mut albums = state.albums.lock().unwrap_or_else(|p| p.into_inner());
        intake(
            &update,
            id,
            &bot,
            state.group_replies,
            &mut albums,
            &state.metrics,
        )
    };
    let (deliver, callback) = match parsed {
        Intake::Deliver(d, c) => (d, c),
        Intake::Ignored => return HttpResponse::Ok().json(json!({"status": "ignored"})),
        Intake::Rejected(reason) => {
            return HttpResponse::Ok().json(json!({"status": "rejected", "error": reason}))
        }
    };
    match super::deliver(&state.registry, &state.metrics, *deliver).await {
        Ok(done) => {
            if let Some(callback) = callback {
                actix::spawn(answer_callback(state.api.clone(), callback));
            }
            let status = match done {
                crate::session::Delivered::Accepted { .. } => "accepted",
                _ => "duplicate",
            };
            HttpResponse::Ok().json(json!({ "status": status }))
        }
        Err(StoreError::Invalid(reason)) => {
            tracing::warn!(update_id = id, reason = %reason, "telegram update rejected");
            HttpResponse::Ok().json(json!({"status": "rejected", "error": reason}))
        }
        Err(e) => error_response(&reject(503, e.to_string())),
    }
}

/// The telegram channel: Bot API long polling in, `sendMessage` out.
pub const CHANNEL: super::Channel = super::Channel {
    name: "telegram",
    routed: |c| c.telegram.enabled && c.telegram.token.is_some(),
    sink: |c, deps| {
        c.telegram.token.as_ref().map(|token| {
            Arc::new(TelegramSink::new(
                BotApi::new(deps.http.clone(), &c.telegram.api_base, token),
                Duration::from_millis(c.outbox.send_timeout_ms),
                deps.events.clone(),
            )) as Arc<dyn ReplySink>
        })
    },
    intake: |c, deps| match (c.telegram.enabled, &c.telegram.token) {
        (true, Some(token)) if c.telegram.mode == TelegramMode::Webhook => {
            Some(Arc::new(TelegramIdentity {
                api: BotApi::new(deps.http.clone(), &c.telegram.api_base, token),
                bot: deps.telegram_bot.clone(),
                timeout: Duration::from_secs(
                    c.telegram.poll_timeout_s + c.telegram.request_margin_s,
                ),
            }) as Arc<dyn Adapter>)
        }
        (true, Some(token)) => Some(Arc::new(TelegramAdapter {
            api: BotApi::new(deps.http.clone(), &c.telegram.api_base, token),
            config: c.telegram.clone(),
            registry: deps.registry.clone(),
            persistence: deps.persistence.clone(),
            gate: deps.gate.clone(),
            metrics: deps.metrics.clone(),
            leases: deps.leases.clone(),
        }) as Arc<dyn Adapter>),
        _ => None,
    },
    unsupervised: |_| false,
    owner_chat: |c| c.telegram.owner_chat.clone(),
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_are_classified() {
        let ok = classify(200, None, br#"{"ok":true,"result":[1]}"#);
        assert_eq!(ok, Ok(json!([1])));
        let limited = br#"{"ok":false,"error_code":429,"description":"Too Many Requests","parameters":{"retry_after":7}}"#;
        assert_eq!(
            classify(429, None, limited),
            Err(ApiError::RateLimited(Some(Duration::from_secs(7))))
        );
        assert_eq!(
            classify(429, Some(3), b"{\"ok\":false,\"error_code\":429}"),
            Err(ApiError::RateLimited(Some(Duration::from_secs(3))))
        );
        assert_eq!(classify(429, None, b""), Err(ApiError::RateLimited(None)));
        assert!(matches!(
            classify(
                401,
                None,
                br#"{"ok":false,"error_code":401,"description":"Unauthorized"}"#
            ),
            Err(ApiError::Unauthorized(_))
        ));
        assert!(matches!(
            classify(409, None, b"{}"),
            Err(ApiError::Conflict(_))
        ));
        assert!(matches!(
            classify(502, None, b"<html>"),
            Err(ApiError::Transient(_))
        ));
        assert!(matches!(
            classify(200, None, b"not json"),
            Err(ApiError::Transient(_))
        ));
        assert!(matches!(
            classify(403, None, b"{}"),
            Err(ApiError::Rejected(_))
        ));
        let upgraded = br#"{"ok":false,"error_code":400,"description":"Bad Request: group chat was upgraded to a supergroup chat","parameters":{"migrate_to_chat_id":-1001555}}"#;
        assert_eq!(
            classify(400, None, upgraded),
            Err(ApiError::Migrated(-1001555))
        );
    }

    #[test]
    fn send_errors_map_to_outbox_outcomes() {
        assert!(matches!(
            send_error(ApiError::RateLimited(Some(Duration::from_secs(4)))),
            SendError::RetryAfter(d) if d == Duration::from_secs(4)
        ));
        assert!(matches!(
            send_error(ApiError::Unknown("t".into())),
            SendError::Unknown(_)
        ));
        assert!(matches!(
            send_error(ApiError::Rejected("x".into())),
            SendError::Permanent(_)
        ));
        assert!(matches!(
            send_error(ApiError::Transient("x".into())),
            SendError::Transient(_)
        ));
    }

    fn bot() -> BotIdentity {
        BotIdentity {
            id: 999,
            username: "KeelTestBot".into(),
        }
    }

    fn stored(update: &Value, mode: GroupReplies) -> Inbound {
        match parse_update(update, &bot(), mode) {
            Ok(Parsed::Store(i)) => *i,
            other => panic!("{update}: {other:?}"),
        }
    }

    const CORPUS: &str = include_str!("../../../tests/data/telegram/updates.json");

    #[test]
    fn every_corpus_update_is_stored_with_its_kind_and_addressing() {
        let corpus: Vec<Value> = serde_json::from_str(CORPUS).unwrap();
        assert_eq!(corpus.len(), 38);
        let mut by_name = std::collections::HashMap::new();
        for case in &corpus {
            let name = case["name"].as_str().unwrap();
            let parsed = parse_update(&case["update"], &bot(), GroupReplies::Addressed);
            let Ok(Parsed::Store(i)) = parsed else {
                panic!("{name}: {parsed:?}");
            };
            assert_eq!(i.kind, case["kind"].as_str().unwrap(), "{name}");
            by_name.insert(name.to_string(), *i);
        }
        let answered = |n: &str| by_name[n].answer;
        for yes in [
            "private_text",
            "group_command_addressed_to_us",
            "group_mention",
            "group_reply_to_bot",
            "private_start",
            "private_start_with_payload",
            "private_photo_with_caption",
            "album_photo_1",
            "private_document",
            "private_voice",
            "private_dice",
            "callback_query_button",
            "unicode_text",
            "text_4096_utf16_units",
            "future_unknown_message_field",
        ] {
            assert!(answered(yes), "{yes} is answered");
        }
        for no in [
            "group_command_addressed_to_other_bot",
            "group_plain_not_addressed",
            "forum_topic_message",
            "group_poll",
            "edited_private_text",
            "channel_post_text",
            "edited_channel_post",
            "my_chat_member_kicked",
            "group_my_chat_member_added",
            "group_new_chat_members_bot_added",
            "group_left_chat_member",
            "group_migrate_to_chat_id",
            "supergroup_migrate_from_chat_id",
            "message_reaction",
            "future_unknown_update_type",
            "future_unknown_content_type",
        ] {
            assert!(!answered(no), "{no} is stored, not answered");
        }
        let photo = &by_name["private_photo_with_caption"];
        assert_eq!(photo.text, "sunset \u{1F305} #holiday");
        assert_eq!(photo.msg_ref.as_deref(), Some("13"));
        assert!(photo.meta["photo"]["file_id"].is_string());
        let doc = &by_name["private_document"].meta["document"];
        assert_eq!(doc["mime_type"], "application/pdf");
        assert_eq!(doc["file_size"], 482113);
        let loc = &by_name["private_location"].meta["location"];
        assert_eq!(loc["latitude"], 52.520008);
        let edit = &by_name["edited_private_text"];
        assert_eq!(
            (edit.revises.as_deref(), edit.text.as_str()),
            (Some("10"), "hello keel (edited)")
        );
        assert_eq!(
            by_name["edited_channel_post"].revises.as_deref(),
            Some("501")
        );
        assert_eq!(
            by_name["private_start_with_payload"].meta["start_payload"],
            "PAYLOAD123"
        );
        let topic = &by_name["forum_topic_message"];
        assert_eq!(topic.reply_to.as_ref().unwrap()["message_thread_id"], 77);
        let cb = &by_name["callback_query_button"];
        assert_eq!(
            (cb.text.as_str(), cb.callback_id.as_deref()),
            ("confirm:yes", Some("4382000123456789012"))
        );
        assert_eq!(cb.reply_to.as_ref().unwrap()["message_id"], 24);
        assert_eq!(
            by_name["album_photo_2"].media_group.as_deref(),
            Some("13912345678901234")
        );
        assert_eq!(by_name["channel_post_text"].from, "-1001444");
        assert_eq!(
            by_name["future_unknown_update_type"].meta["update"],
            "business_message_v9"
        );
        // `all` answers plain group chatter, never other bots' commands.
        let corpus_update =
            |n: &str| corpus.iter().find(|c| c["name"] == n).unwrap()["update"].clone();
        assert!(
            stored(
                &corpus_update("group_plain_not_addressed"),
                GroupReplies::All
            )
            .answer
        );
        assert!(stored(&corpus_update("forum_topic_message"), GroupReplies::All).answer);
        assert!(
            !stored(
                &corpus_update("group_command_addressed_to_other_bot"),
                GroupReplies::All
            )
            .answer
        );
        assert!(!stored(&corpus_update("group_left_chat_member"), GroupReplies::All).answer);
    }

    #[test]
    fn hostile_updates_are_rejected_or_stored_safely_never_a_panic() {
        let huge = "x".repeat(200_000);
        let deep = (0..200).fold(json!(1), |v, _| json!({ "chat": v }));
        let cases = vec![
            json!(null),
            json!([]),
            json!("update"),
            json!({"update_id": 1}),
            json!({"update_id": 2, "message": null}),
            json!({"update_id": 3, "message": []}),
            json!({"update_id": 4, "message": {"text": "no chat"}}),
            json!({"update_id": 5, "message": {"chat": {"id": "x"}, "text": "hi"}}),
            json!({"update_id": 6, "message": {"chat": {"id": 1.5}, "text": "hi"}}),
            json!({"update_id": 7, "message": {"chat": {"id": 1}, "text": 42}}),
            json!({"update_id": 8, "message": {"chat": {"id": 1}, "text": "a\u{0}b"}}),
            json!({"update_id": 9, "message": {"chat": {"id": 1}, "caption": huge, "photo": []}}),
            json!({"update_id": 10, "message": {"chat": {"id": 1}, "photo": "not a list"}}),
            json!({"update_id": 11, "message": {"chat": {"id": 1}, "text": "@KeelTestBot",
                "entities": [{"type": "mention", "offset": 99_999_999_999u64, "length": 5}]}}),
            json!({"update_id": 12, "message": {"chat": {"id": 1}, "text": "x",
                "entities": [{"type": "mention", "offset": -1, "length": "5"}]}}),
            json!({"update_id": 13, "message": {"chat": {"id": -5, "type": "group"}, "text": "/"}}),
            json!({"update_id": 14, "message": {"chat": {"id": -5, "type": "group"}, "text": "/@"}}),
            json!({"update_id": 15, "edited_message": {"chat": {"id": 1}, "text": "no id"}}),
            json!({"update_id": 16, "callback_query": {"id": 5, "from": {"id": 1}}}),
            json!({"update_id": 17, "callback_query": {"id": "q", "from": {"id": 1}, "message": {"chat": {}}}}),
            json!({"update_id": 18, "callback_query": {"id": "q"}}),
            json!({"update_id": 19, "my_chat_member": {"new_chat_member": {"status": "kicked"}}}),
            json!({"update_id": 20, "message_reaction": {"chat": {"id": 1}, "new_reaction": "x"}}),
            json!({"update_id": 21, "message": {"chat": {"id": 1, "type": "\u{202E}evil\u{0}"}, "text": "hi"}}),
            json!({"update_id": 22, "poll": {"id": "p"}}),
            json!({"update_id": 23, "weird": deep}),
            json!({"update_id": 24, "message": {"chat": {"id": 1}, "document": {"file_id": {"nested": 1}, "file_size": "big"}}}),
            json!({"update_id": 25, "message": {"chat": {"id": 1}, "reply_to_message": "x", "text": "r"}}),
            json!({"update_id": 26, "message": {"chat": {"id": i64::MIN}, "text": "\u{FEFF}\u{200D}"}}),
            json!({"update_id": 27, "message": {"chat": {"id": 1}, "media_group_id": 7, "photo": [{}]}}),
        ];
        let mut outcomes = (0, 0, 0);
        for case in &cases {
            for mode in [GroupReplies::Addressed, GroupReplies::All] {
                match parse_update(case, &bot(), mode) {
                    Ok(Parsed::Store(i)) => {
                        outcomes.0 += 1;
                        assert!(i.text.chars().count() <= MAX_TEXT_CHARS);
                        assert!(!i.text.contains('\0'));
                        assert!(i.meta.to_string().len() < 8_192, "{case}");
                    }
                    Ok(Parsed::Ignore(_)) => outcomes.1 += 1,
                    Err(_) => outcomes.2 += 1,
                }
            }
        }
        assert!(
            outcomes.0 > 0 && outcomes.1 > 0 && outcomes.2 > 0,
            "{outcomes:?}"
        );
        let nul = stored(&cases[10], GroupReplies::Addressed);
        assert_eq!(nul.text, "a\u{FFFD}b");
        let big = stored(&cases[11], GroupReplies::Addressed);
        assert_eq!(big.meta["truncated"], true);
        assert!(parse_update(&cases[17], &bot(), GroupReplies::Addressed).is_err());
    }

    #[test]
    fn chat_moves_and_the_bots_membership_become_chat_events() {
        let a = GroupReplies::Addressed;
        let to = json!({"update_id": 1, "message": {"message_id": 3, "chat": {"id": -5, "type": "group"},
            "migrate_to_chat_id": -1005}});
        let from = json!({"update_id": 2, "message": {"message_id": 1, "chat": {"id": -1005, "type": "supergroup"},
            "migrate_from_chat_id": -5}});
        let moved = Some(ChatEvent::Migrated {
            from: "-5".into(),
            to: "-1005".into(),
        });
        assert_eq!(stored(&to, a).event, moved);
        assert_eq!(stored(&from, a).event, moved);
        for odd in [
            json!({"update_id": 3, "message": {"chat": {"id": -5}, "migrate_to_chat_id": -5}}),
            json!({"update_id": 4, "message": {"chat": {"id": -5}, "migrate_to_chat_id": "x"}}),
            json!({"update_id": 5, "edited_message": {"message_id": 1, "chat": {"id": -5}, "migrate_to_chat_id": -9}}),
        ] {
            assert_eq!(stored(&odd, a).event, None, "{odd}");
        }
        let member = |status: &str, extra: Value| {
            let mut m = json!({"update_id": 9, "my_chat_member": {"chat": {"id": 7, "type": "private"},
                "from": {"id": 7}, "new_chat_member": {"status": status, "user": {"id": 999}}}});
            if let Value::Object(o) = extra {
                for (k, v) in o {
                    m["my_chat_member"]["new_chat_member"][k] = v;
                }
            }
            stored(&m, a)
        };
        for gone in ["kicked", "left"] {
            let i = member(gone, json!({}));
            assert!(matches!(&i.event, Some(ChatEvent::Unreachable(r)) if r.contains(gone)));
            assert!(!i.answer);
        }
        assert!(matches!(
            member("restricted", json!({"is_member": false})).event,
            Some(ChatEvent::Unreachable(_))
        ));
        for back in ["member", "administrator", "creator", "restricted"] {
            assert_eq!(
                member(back, json!({})).event,
                Some(ChatEvent::Reachable),
                "{back}"
            );
        }
        assert_eq!(member("weird", json!({})).event, None);
        // Another member's change (chat_member) is no event about keel.
        let other = json!({"update_id": 10, "chat_member": {"chat": {"id": -5, "type": "group"},
            "new_chat_member": {"status": "kicked", "user": {"id": 1}}}});
        assert_eq!(stored(&other, a).event, None);
    }

    #[test]
    fn commands_to_other_bots_are_stored_and_ours_are_answered_anywhere() {
        let msg = |chat: i64, kind: &str, text: &str| {
            json!({"update_id": 1, "message": {"message_id": 3, "chat": {"id": chat, "type": kind},
                "from": {"id": 5}, "text": text}})
        };
        let a = GroupReplies::Addressed;
        assert!(!stored(&msg(5, "private", "/help@OtherBot"), a).answer);
        assert!(stored(&msg(5, "private", "/help@keeltestbot"), a).answer);
        assert!(stored(&msg(-7, "supergroup", "/help"), a).answer);
        assert!(!stored(&msg(-7, "supergroup", "hi @KeelTestBotX"), a).answer);
        let group = stored(&msg(-7, "group", "/start@KeelTestBot deep"), a);
        assert_eq!(group.meta["start_payload"], "deep");
        assert_eq!(
            group.reply_to,
            Some(json!({"message_id": 3, "chat_type": "group"}))
        );
        let from_bot = json!({"update_id": 1, "message": {"chat": {"id": 5, "type": "private"},
            "from": {"id": 6, "is_bot": true}, "text": "hi"}});
        assert!(!stored(&from_bot, a).answer);
    }

    #[test]
    fn long_replies_split_at_lines_then_words_in_utf16_units() {
        assert_eq!(split_message("short", 4096), vec!["short"]);
        let exact: String = "\u{1F600}".repeat(2048);
        assert_eq!(split_message(&exact, 4096).len(), 1);
        let lines = format!("{}\n{}", "a".repeat(3000), "b".repeat(3000));
        assert_eq!(
            split_message(&lines, 4096),
            vec!["a".repeat(3000), "b".repeat(3000)]
        );
        let words = "word ".repeat(2000);
        let parts = split_message(&words, 4096);
        assert!(parts.len() == 3 && parts.iter().all(|p| p.encode_utf16().count() <= 4096));
        assert!(parts[0].ends_with("word") && parts[1].starts_with("word"));
        let astral: String = "\u{1F600}".repeat(3000);
        let parts = split_message(&astral, 4096);
        assert_eq!(parts.concat(), astral, "no character is broken or lost");
        assert!(parts.iter().all(|p| p.encode_utf16().count() <= 4096));
    }

    #[test]
    fn send_bodies_carry_the_topic_and_quote_in_groups_only() {
        let chat = json!(-100);
        let topic = json!({"message_id": 78, "message_thread_id": 77, "chat_type": "supergroup"});
        assert_eq!(
            send_body(&chat, "t", Some(&topic)),
            json!({"chat_id": -100, "text": "t", "message_thread_id": 77,
                "reply_parameters": {"message_id": 78, "allow_sending_without_reply": true}})
        );
        let private = json!({"message_id": 5, "chat_type": "private"});
        assert_eq!(
            send_body(&json!(5), "t", Some(&private)),
            json!({"chat_id": 5, "text": "t"})
        );
        assert_eq!(
            send_body(&json!(5), "t", None),
            json!({"chat_id": 5, "text": "t"})
        );
    }

    #[test]
    fn state_key_fingerprints_the_token_and_hides_it() {
        let a = state_key("123:secret-canary");
        assert!(a.starts_with("telegram:") && !a.contains("secret"));
        assert_ne!(a, state_key("123:other"));
        assert_eq!(
            redact("GET /bot123:abc/x", "123:abc"),
            "GET /bot<redacted>/x"
        );
        let cfg = TelegramConfig {
            token: Some("123:secret-canary".into()),
            ..TelegramConfig::default()
        };
        assert!(!format!("{cfg:?}").contains("canary"));
    }
}
