//! The Slack adapter: Socket Mode in, `chat.postMessage` out, against a
//! configurable `api_base` (R13).
//!
//! At start, `auth.test` (bot token) tells keel its own user and bot ids;
//! then `apps.connections.open` (app token) yields a WebSocket URL; keel
//! connects and waits for `hello`. Each `events_api` envelope carrying a
//! message event becomes a `Deliver` (session `slack:<channel>`, key =
//! `event_id`, which Slack keeps across its own retries, so a redelivery —
//! `retry_attempt` > 0 — is stored and answered once) and is acknowledged by
//! its `envelope_id` only after the turn is durable; envelopes keel does not
//! use, and malformed ones, are acknowledged at once so Slack does not resend
//! them. Nothing a user sends is dropped (R40, [`parse_event`]): files are
//! stored with their metadata, `message_changed` / `message_deleted` as
//! revisions of the original turn (found by its `ts`), bots' messages
//! (keel's own included) and service messages are stored and never
//! answered. A reply to a message in a thread goes to that thread
//! (`thread_ts`); a reply to a top-level message goes to the channel.
//! In channels only messages addressed to keel are answered (a mention, a
//! command, a thread keel is in; [`addressed`]) unless `channel_replies =
//! "all"`; direct messages always are.
//!
//! A `disconnect` message (Slack rotates sockets) or a close opens a new
//! socket right away.
//! A socket that stays connected but silent — no `hello` and no frame at all,
//! pings included, within `silence_timeout_s` — is treated as dead ("ghost"
//! socket) and the adapter fails so the supervisor reconnects it.
//! A server that keeps sending `disconnect` (or closing) right after the
//! socket opened does not make keel reconnect in a hot loop: after
//! [`MAX_QUICK_DISCONNECTS`] sockets in a row that each lived less than
//! [`QUICK_SOCKET`], the run fails and the supervisor's backoff applies.
//! `invalid_auth` / `not_authed` / `account_inactive` / `token_revoked` /
//! `token_expired` or an HTTP 401 from `auth.test` or
//! `apps.connections.open` stops the adapter (no retry) with
//! that reason.
//! Tokens (from keel.toml or `KEEL_SLACK_APP_TOKEN` / `KEEL_SLACK_BOT_TOKEN`)
//! are sent only in `Authorization` headers and never logged.

use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use futures::future::BoxFuture;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use super::supervisor::Adapter;
use crate::config::{GroupReplies, Secret, SlackConfig};
use crate::error::{AdapterError, SendError, StoreError};
use crate::health::Gate;
use crate::ids::check_external_id;
use crate::metrics::Metrics;
use crate::outbox::{OutboundReply, ReplySink};
use crate::redact::redact;
use crate::session::{Deliver, SessionRegistry};

/// A socket that ends (disconnect, close) sooner than this after opening
/// counts as a quick disconnect.
pub const QUICK_SOCKET: Duration = Duration::from_secs(10);
/// The longest a closing socket waits for its queued acks to be written.
const ACK_FLUSH: Duration = Duration::from_secs(1);
/// Quick disconnects in a row after which the run fails (and backs off).
pub const MAX_QUICK_DISCONNECTS: u32 = 3;

/// A Web API call with a bearer token; `Ok(body)` only for `"ok": true`.
async fn web_api(
    client: &reqwest::Client,
    url: &str,
    token: &Secret,
    body: &Value,
    timeout: Duration,
) -> Result<Value, (Option<u16>, String, Option<Duration>)> {
    let token = token.expose();
    let resp = client
        .post(url)
        .bearer_auth(token)
        .json(body)
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| {
            let kind = if e.is_timeout() { Some(0) } else { None };
            (kind, redact(&crate::redact::without_url(&e), token), None)
        })?;
    let status = resp.status().as_u16();
    let retry = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s.min(3600)));
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    if status == 200 && v["ok"] == json!(true) {
        return Ok(v);
    }
    let error = v["error"].as_str().unwrap_or("no error field").to_string();
    let error: String = error
        .chars()
        .filter(|c| !c.is_control())
        .take(100)
        .collect();
    Err((Some(status), redact(&error, token), retry))
}

/// The Socket Mode poller, restarted by the adapter supervisor.
pub struct SlackAdapter {
    pub client: reqwest::Client,
    pub config: SlackConfig,
    pub registry: Addr<SessionRegistry>,
    pub gate: Gate,
    pub metrics: Metrics,
    /// Connects only while holding `poller:slack:<app fingerprint>` (one
    /// Socket Mode connection per app across instances); `None`: always.
    pub leases: Option<crate::lease::LeaseKeeper>,
}

/// The lease name of the app whose app-level token is `app_token`: a
/// fingerprint, never the token.
pub fn lease_name(app_token: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(app_token.as_bytes());
    format!("poller:slack:{}", &hex::encode(digest)[..16])
}

impl Adapter for SlackAdapter {
    fn name(&self) -> &'static str {
        "slack"
    }

    fn run(&self, stop: watch::Receiver<bool>) -> BoxFuture<'static, Result<(), AdapterError>> {
        let client = self.client.clone();
        let config = self.config.clone();
        let registry = self.registry.clone();
        let gate = self.gate.clone();
        let metrics = self.metrics.clone();
        let leases = self.leases.clone();
        Box::pin(async move {
            let Some(keeper) = leases else {
                return socket_loop(client, config, registry, gate, metrics, stop).await;
            };
            let name = lease_name(config.app_token.as_ref().map_or("", |t| t.expose()));
            let mut held = keeper.want(&name).await;
            let mut stop = stop;
            loop {
                if held.borrow().is_none() {
                    tracing::info!(lease = %name, "slack socket mode waits for the app's lease");
                }
                let token = tokio::select! {
                    t = held.wait_for(Option::is_some) => match t {
                        Ok(t) => (*t).unwrap_or_default(),
                        Err(_) => return Ok(()),
                    },
                    _ = stop.wait_for(|s| *s) => return Ok(()),
                };
                let lost = async {
                    let mut rx = held.clone();
                    let _ = rx.wait_for(|t| *t != Some(token)).await;
                };
                // Dropping the connection's future closes the socket: Slack
                // redelivers what it had not been acknowledged for to the
                // lease's next holder.
                let run = socket_loop(
                    client.clone(),
                    config.clone(),
                    registry.clone(),
                    gate.clone(),
                    metrics.clone(),
                    stop.clone(),
                );
                tokio::select! {
                    r = run => return r,
                    () = lost => {
                        keeper.lost(&name);
                        tracing::info!(lease = %name, token, "slack socket mode closed: lease lost");
                    }
                }
            }
        })
    }
}

/// What keel knows of its own bot identity, from `auth.test` with the bot
/// token at adapter start: messages from either id are keel's own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BotIdentity {
    pub user_id: Option<String>,
    pub bot_id: Option<String>,
}

/// Longest text keel stores from Slack, in characters: Slack's own limit
/// for a message, so a longer one is not a real Slack message.
pub const MAX_TEXT_CHARS: usize = 40_000;
/// At most this many files are described in a turn's `meta`.
pub const MAX_FILES: usize = 20;
/// A file's string fields (name, title, …) are cut to this many characters.
const MAX_FIELD_CHARS: usize = 512;

/// One Slack message event as keel stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct SlackMessage {
    pub event_id: String,
    pub channel: String,
    /// The sender: the user id, or the bot id of a bot without a user.
    pub user: String,
    pub text: String,
    /// `text`, `file`, `edit`, `deleted` or `service` (other subtypes).
    pub kind: &'static str,
    pub meta: Option<Value>,
    /// The message's own `ts` (its reference for later edits).
    pub ts: Option<String>,
    /// For `edit` / `deleted`: the `ts` of the message revised.
    pub revises: Option<String>,
    /// The thread the message sits in: replies go there.
    pub thread_ts: Option<String>,
    /// `false` for bots (keel included), edits, deletions, service messages.
    pub answer: bool,
}

impl SlackMessage {
    /// The protocol message for this event.
    pub fn into_deliver(self) -> Deliver {
        let reply_to = self.thread_ts.map(|t| json!({ "thread_ts": t }));
        Deliver {
            kind: self.kind.to_string(),
            meta: self.meta,
            msg_ref: self.ts,
            revises: self.revises,
            reply_to,
            answer: self.answer,
            ..Deliver::text("slack", self.channel, self.user, self.event_id, self.text)
        }
    }
}

/// What an `events_api` payload is to keel.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    /// A message event to store (and maybe answer).
    Message(Box<SlackMessage>),
    /// Not a message keel keeps (reactions, unchanged edits, …): ack only.
    Ignored,
    /// A message event that is malformed: ack (Slack would resend the same
    /// bytes forever), store nothing, count it `rejected`.
    Invalid(&'static str),
}

/// A string field that is a usable id; `Err` when present but unusable.
fn opt_id(v: &Value, field: &'static str) -> Result<Option<String>, &'static str> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if check_external_id(field, s).is_ok() => Ok(Some(s.clone())),
        Some(_) => Err(field),
    }
}

/// A Slack timestamp (`1355517523.000005`): digits and one dot.
fn opt_ts(v: &Value, field: &'static str) -> Result<Option<String>, &'static str> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s))
            if !s.is_empty()
                && s.len() <= 32
                && s.chars().all(|c| c.is_ascii_digit() || c == '.')
                && s.chars().filter(|c| *c == '.').count() <= 1 =>
        {
            Ok(Some(s.clone()))
        }
        Some(_) => Err(field),
    }
}

/// A file's string field, without control characters, bounded.
fn clean(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control())
        .take(MAX_FIELD_CHARS)
        .collect()
}

/// The metadata of a message's files: id, name, title, mimetype, filetype,
/// size, mode and `url_private` (which needs the bot token to fetch; keel
/// never stores a token). Entries without a usable id are left out.
fn files_meta(m: &Value) -> Result<Vec<Value>, &'static str> {
    let files = match m.get("files") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(files)) => files,
        Some(_) => return Err("files"),
    };
    let mut out = Vec::new();
    for f in files.iter().take(MAX_FILES) {
        let Ok(Some(id)) = opt_id(f, "id") else {
            continue;
        };
        let mut entry = serde_json::Map::new();
        entry.insert("id".into(), Value::String(id));
        for field in ["name", "title", "mimetype", "filetype", "mode"] {
            if let Some(s) = f.get(field).and_then(Value::as_str) {
                entry.insert(field.into(), Value::String(clean(s)));
            }
        }
        if let Some(size) = f.get("size").and_then(Value::as_u64) {
            entry.insert("size".into(), size.into());
        }
        if let Some(url) = f.get("url_private").and_then(Value::as_str) {
            // A cut URL would point elsewhere: kept whole or not at all.
            let usable = (url.starts_with("https://") || url.starts_with("http://"))
                && url.len() <= 2048
                && !url.chars().any(char::is_control);
            if usable {
                entry.insert("url_private".into(), Value::String(url.to_string()));
            }
        }
        out.push(Value::Object(entry));
    }
    Ok(out)
}

/// The content of one message object (the event itself, or the new
/// version inside a `message_changed`).
struct Content {
    from: String,
    text: String,
    files: Vec<Value>,
    ts: Option<String>,
    thread_ts: Option<String>,
    bot_id: Option<String>,
    /// Sent by a bot (any bot, keel included).
    bot: bool,
    /// Sent by keel itself.
    own: bool,
}

fn content(m: &Value, me: &BotIdentity) -> Result<Content, &'static str> {
    if !m.is_object() {
        return Err("message");
    }
    let user = opt_id(m, "user")?;
    let bot_id = opt_id(m, "bot_id")?;
    let from = user.clone().or_else(|| bot_id.clone()).ok_or("sender")?;
    let text = match m.get("text") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err("text"),
    };
    // Bytes first: a huge frame is refused without counting its characters.
    if text.len() > 4 * MAX_TEXT_CHARS || text.chars().count() > MAX_TEXT_CHARS {
        return Err("text too long");
    }
    if text.contains('\0') {
        return Err("text contains NUL");
    }
    let own = (user.is_some() && user == me.user_id) || (bot_id.is_some() && bot_id == me.bot_id);
    Ok(Content {
        from,
        text,
        files: files_meta(m)?,
        ts: opt_ts(m, "ts")?,
        thread_ts: opt_ts(m, "thread_ts")?,
        bot: bot_id.is_some() || m["subtype"] == "bot_message" || own,
        bot_id,
        own,
    })
}

/// `meta` for a turn: its files and what else Slack said about it.
fn meta_of(c: &Content, subtype: Option<&str>) -> Option<Value> {
    let mut meta = serde_json::Map::new();
    if !c.files.is_empty() {
        meta.insert("files".into(), Value::Array(c.files.clone()));
    }
    if let Some(s) = subtype {
        meta.insert("subtype".into(), s.into());
    }
    if let Some(t) = &c.thread_ts {
        meta.insert("thread_ts".into(), t.clone().into());
    }
    if let Some(b) = &c.bot_id {
        meta.insert("bot_id".into(), b.clone().into());
    }
    if c.own {
        meta.insert("own".into(), true.into());
    }
    (!meta.is_empty()).then_some(Value::Object(meta))
}

/// Subtypes whose message is a user's own words (and files): answered like
/// plain text unless a bot sent them.
const CONTENT_SUBTYPES: &[&str] = &[
    "file_share",
    "thread_broadcast",
    "me_message",
    "bot_message",
];

/// Classify an `events_api` payload. `me` is keel's own bot identity.
///
/// - a message (no subtype, or `file_share`, `thread_broadcast`,
///   `me_message`): kind `text` (or `file` when files are attached, their
///   metadata in `meta.files`), answered; replies go to its thread if it
///   is in one;
/// - from a bot (`bot_id`, subtype `bot_message`, or keel's own user):
///   stored, never answered;
/// - `message_changed`: kind `edit`, the new text, `revises` the original
///   `ts`; one whose text and files did not change (link unfurls, reply
///   counts) is ignored;
/// - `message_deleted`: kind `deleted`, empty text, `revises` the deleted
///   `ts`;
/// - any other subtype (joins, topics, pins, future ones) with a sender:
///   kind `service`, `meta.subtype`, stored, never answered;
/// - `message_replied` and non-message events: ignored.
pub fn parse_event(payload: &Value, me: &BotIdentity) -> Parsed {
    let Some(event) = payload.get("event").filter(|e| e.is_object()) else {
        return Parsed::Ignored;
    };
    if event["type"] != "message" {
        return Parsed::Ignored;
    }
    match parse_message(payload, event, me) {
        Ok(Some(m)) => Parsed::Message(Box::new(m)),
        Ok(None) => Parsed::Ignored,
        Err(why) => Parsed::Invalid(why),
    }
}

fn parse_message(
    payload: &Value,
    event: &Value,
    me: &BotIdentity,
) -> Result<Option<SlackMessage>, &'static str> {
    let event_id = opt_id(payload, "event_id")?.ok_or("event_id")?;
    let channel = opt_id(event, "channel")?.ok_or("channel")?;
    let subtype = match event.get("subtype") {
        None | Some(Value::Null) => None,
        Some(Value::String(s))
            if !s.is_empty()
                && s.len() <= 64
                && s.chars().all(|c| c.is_ascii_lowercase() || c == '_') =>
        {
            Some(s.as_str())
        }
        Some(_) => return Err("subtype"),
    };
    let base = |text: String, kind, c: &Content| SlackMessage {
        event_id: event_id.clone(),
        channel: channel.clone(),
        user: c.from.clone(),
        text,
        kind,
        meta: None,
        ts: None,
        revises: None,
        thread_ts: None,
        answer: false,
    };
    match subtype {
        Some("message_replied") => Ok(None),
        Some("message_changed") => {
            let new = &event["message"];
            let c = content(new, me)?;
            let original = c.ts.clone().ok_or("message.ts")?;
            let old = &event["previous_message"];
            if old.is_object() {
                let old_files = files_meta(old).unwrap_or_default();
                if old["text"].as_str().unwrap_or("") == c.text && old_files == c.files {
                    return Ok(None);
                }
            }
            Ok(Some(SlackMessage {
                meta: meta_of(&c, None),
                revises: Some(original),
                ..base(c.text.clone(), "edit", &c)
            }))
        }
        Some("message_deleted") => {
            let deleted = opt_ts(event, "deleted_ts")?.ok_or("deleted_ts")?;
            let old = &event["previous_message"];
            let from = opt_id(old, "user")
                .ok()
                .flatten()
                .or_else(|| opt_id(old, "bot_id").ok().flatten())
                .unwrap_or_else(|| "unknown".into());
            Ok(Some(SlackMessage {
                event_id,
                channel,
                user: from,
                text: String::new(),
                kind: "deleted",
                meta: None,
                ts: None,
                revises: Some(deleted),
                thread_ts: None,
                answer: false,
            }))
        }
        None | Some(_) => {
            let c = content(event, me)?;
            if c.text.trim().is_empty() && c.files.is_empty() {
                return Err("empty message");
            }
            let user_content = subtype.is_none_or(|s| CONTENT_SUBTYPES.contains(&s));
            let kind = match (user_content, c.files.is_empty()) {
                (false, _) => "service",
                (true, true) => "text",
                (true, false) => "file",
            };
            Ok(Some(SlackMessage {
                meta: meta_of(&c, subtype),
                ts: c.ts.clone(),
                thread_ts: c.thread_ts.clone(),
                answer: user_content && !c.bot,
                ..base(c.text.clone(), kind, &c)
            }))
        }
    }
}

/// Threads keel is in (it answered there), per channel: a reply in one of
/// them is addressed to keel. In memory, the newest few thousand; after a
/// restart a thread counts again once keel is addressed in it.
#[derive(Debug, Default)]
pub struct Threads {
    set: std::collections::HashSet<(String, String)>,
    order: std::collections::VecDeque<(String, String)>,
}

impl Threads {
    const MAX: usize = 4096;

    pub fn insert(&mut self, channel: &str, thread_ts: &str) {
        let key = (channel.to_string(), thread_ts.to_string());
        if self.set.insert(key.clone()) {
            self.order.push_back(key);
            if self.order.len() > Self::MAX {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }

    pub fn contains(&self, channel: &str, thread_ts: &str) -> bool {
        self.set
            .contains(&(channel.to_string(), thread_ts.to_string()))
    }
}

/// A direct message (`channel_type` `im`; a `D…` channel id when Slack
/// left the type out): always answered.
pub fn is_direct(event: &Value, channel: &str) -> bool {
    match event.get("channel_type").and_then(Value::as_str) {
        Some(t) => t == "im",
        None => channel.starts_with('D'),
    }
}

/// Whether a channel message is addressed to keel: it mentions keel's user
/// (`<@U…>`), is a command in keel's grammar (`/recall …`), is in a thread
/// whose first message is keel's (`parent_user_id`), or in a thread keel
/// answered in.
pub fn addressed(event: &Value, me: &BotIdentity, threads: &Threads, channel: &str) -> bool {
    let text = event.get("text").and_then(Value::as_str).unwrap_or("");
    let mention = me
        .user_id
        .as_ref()
        .is_some_and(|u| text.contains(&format!("<@{u}>")) || text.contains(&format!("<@{u}|")));
    let command = text.trim_start().starts_with('/');
    let thread = event.get("thread_ts").and_then(Value::as_str);
    let parent_is_me = me.user_id.is_some()
        && event.get("parent_user_id").and_then(Value::as_str) == me.user_id.as_deref();
    let in_thread = thread.is_some_and(|t| parent_is_me || threads.contains(channel, t));
    mention || command || in_thread
}

/// Whether a Web API error means the token itself was refused.
fn token_refused(status: Option<u16>, error: &str) -> bool {
    status == Some(401)
        || matches!(
            error,
            "invalid_auth" | "not_authed" | "account_inactive" | "token_revoked" | "token_expired"
        )
}

/// `auth.test` with the bot token: keel's own user and bot ids, so its own
/// messages are never answered. No bot token: nothing to learn (keel's own
/// posts still carry a `bot_id`). A refused bot token stops the adapter.
async fn identify(
    client: &reqwest::Client,
    config: &SlackConfig,
    timeout: Duration,
) -> Result<BotIdentity, AdapterError> {
    let Some(token) = &config.bot_token else {
        return Ok(BotIdentity::default());
    };
    let url = format!("{}/auth.test", config.api_base.trim_end_matches('/'));
    match web_api(client, &url, token, &json!({}), timeout).await {
        Ok(v) => {
            let id = |f: &'static str| opt_id(&v, f).ok().flatten();
            Ok(BotIdentity {
                user_id: id("user_id"),
                bot_id: id("bot_id"),
            })
        }
        Err((status, e, _)) if token_refused(status, &e) => {
            Err(AdapterError::Unauthorized(format!("auth.test: {e}")))
        }
        Err((Some(429), _, Some(wait))) => Err(AdapterError::RetryAfter(wait)),
        Err((_, e, _)) => Err(AdapterError::Transient(format!("auth.test: {e}"))),
    }
}

async fn socket_loop(
    client: reqwest::Client,
    config: SlackConfig,
    registry: Addr<SessionRegistry>,
    gate: Gate,
    metrics: Metrics,
    mut stop: watch::Receiver<bool>,
) -> Result<(), AdapterError> {
    let app_token = config.app_token.clone().unwrap_or_else(|| Secret::from(""));
    let silence = Duration::from_secs(config.silence_timeout_s);
    let open_url = format!(
        "{}/apps.connections.open",
        config.api_base.trim_end_matches('/')
    );
    let me = identify(&client, &config, silence).await?;
    let mut quick_disconnects: u32 = 0;
    let mut threads = Threads::default();
    loop {
        let opened = web_api(&client, &open_url, &app_token, &json!({}), silence).await;
        let url = match opened {
            Ok(v) => v["url"].as_str().unwrap_or_default().to_string(),
            Err((status, e, _)) if token_refused(status, &e) => {
                return Err(AdapterError::Unauthorized(format!(
                    "apps.connections.open: {e}"
                )))
            }
            Err((Some(429), _, Some(wait))) => return Err(AdapterError::RetryAfter(wait)),
            Err((_, e, _)) => {
                return Err(AdapterError::Transient(format!(
                    "apps.connections.open: {e}"
                )))
            }
        };
        let connect = tokio::time::timeout(silence, tokio_tungstenite::connect_async(url.as_str()));
        let (ws, _) = match connect.await {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => {
                return Err(AdapterError::Transient(format!(
                    "socket connect failed: {}",
                    redact(&e.to_string(), &url)
                )))
            }
            Err(_) => return Err(AdapterError::Transient("socket connect timed out".into())),
        };
        let opened_at = tokio::time::Instant::now();
        // Reading never waits for an ack to be written: a server that
        // writes a backlog before it reads any ack would otherwise fill
        // both directions of the socket and hold it still for good.
        let (sink, mut ws) = ws.split();
        let mut acks = AckWriter::start(sink, silence);
        let mut hello = false;
        loop {
            let frame = tokio::select! {
                f = tokio::time::timeout(silence, ws.next()) => Some(f),
                _ = stop.wait_for(|s| *s) => None,
            };
            let Some(frame) = frame else {
                acks.close().await;
                return Ok(());
            };
            let frame = match frame {
                Err(_) => {
                    let what = if hello { "no frame" } else { "no hello" };
                    return Err(AdapterError::Transient(format!(
                        "socket silent: {what} within {silence:?}; reconnecting"
                    )));
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    tracing::warn!(error = %e, "slack socket error; reconnecting");
                    break;
                }
                Ok(Some(Ok(f))) => f,
            };
            let text = match frame {
                Message::Text(t) => t.as_str().to_string(),
                Message::Close(_) => break,
                // Pings (answered by tungstenite) still prove the socket lives.
                _ => continue,
            };
            let Ok(v) = serde_json::from_str::<Value>(&text) else {
                tracing::warn!("slack sent a frame that is not JSON; ignored");
                continue;
            };
            match v["type"].as_str().unwrap_or("") {
                "hello" => hello = true,
                "disconnect" => {
                    tracing::info!(reason = ?v["reason"].as_str(), "slack asked to reconnect");
                    break;
                }
                _ => {
                    let Some(envelope) = v["envelope_id"].as_str().map(str::to_string) else {
                        continue;
                    };
                    if v["type"] == "events_api" {
                        if let Some(n) = v["retry_attempt"].as_u64().filter(|n| *n > 0) {
                            // Slack's redelivery keeps the event_id: the store
                            // dedups it; it is acked like the first.
                            tracing::debug!(retry_attempt = n, "slack redelivered an event");
                        }
                        match parse_event(&v["payload"], &me) {
                            Parsed::Message(mut msg) => {
                                let event = &v["payload"]["event"];
                                if msg.answer && !is_direct(event, &msg.channel) {
                                    let to_us = addressed(event, &me, &threads, &msg.channel);
                                    if let Some(Value::Object(m)) = &mut msg.meta {
                                        m.insert("addressed".into(), to_us.into());
                                    } else {
                                        msg.meta = Some(json!({ "addressed": to_us }));
                                    }
                                    if !to_us && config.channel_replies == GroupReplies::Addressed {
                                        msg.answer = false;
                                    }
                                }
                                if msg.answer {
                                    if let Some(t) = &msg.thread_ts {
                                        threads.insert(&msg.channel, t);
                                    }
                                }
                                let Some(_guard) = gate.enter() else {
                                    // Shutting down: no ack, Slack resends later.
                                    acks.close().await;
                                    return Ok(());
                                };
                                let res =
                                    super::deliver(&registry, &metrics, msg.into_deliver()).await;
                                match res {
                                    // Stored, a repeat, or refused for good: ack.
                                    Ok(_) | Err(StoreError::Invalid(_)) => {}
                                    // No ack: Slack redelivers once we are back.
                                    Err(e) => {
                                        acks.close().await;
                                        return Err(AdapterError::Store(e));
                                    }
                                }
                            }
                            Parsed::Ignored => {}
                            Parsed::Invalid(field) => {
                                // Only the field's name: never the content.
                                tracing::warn!(
                                    field,
                                    "slack sent a malformed message event; acked, not stored"
                                );
                                super::count_inbound(&metrics, "slack", "rejected");
                            }
                        }
                    }
                    // Durable (or not ours): acknowledge by envelope id.
                    let ack = json!({ "envelope_id": envelope }).to_string();
                    if !acks.send(ack) {
                        break;
                    }
                }
            }
        }
        acks.close().await;
        // The socket ended without a failure of ours. A server that ends
        // every socket at once must not get a reconnect hot loop.
        if opened_at.elapsed() < QUICK_SOCKET {
            quick_disconnects += 1;
            if quick_disconnects >= MAX_QUICK_DISCONNECTS {
                return Err(AdapterError::Transient(format!(
                    "slack keeps disconnecting: {quick_disconnects} sockets in a row ended within {QUICK_SOCKET:?}"
                )));
            }
        } else {
            quick_disconnects = 0;
        }
    }
}

type WsSink = futures::stream::SplitSink<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    Message,
>;

/// The write half of a Socket Mode socket: acks queued by the reader go out
/// in order from a task of their own. A write that does not finish within
/// the silence timeout ends it (the socket is dead); the reader learns so at
/// its next ack and reconnects.
struct AckWriter {
    queue: Option<tokio::sync::mpsc::UnboundedSender<String>>,
    task: tokio::task::JoinHandle<()>,
}

impl AckWriter {
    fn start(mut sink: WsSink, patience: Duration) -> AckWriter {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let task = tokio::spawn(async move {
            while let Some(ack) = rx.recv().await {
                let sent = tokio::time::timeout(patience, sink.send(Message::text(ack))).await;
                let failed = match sent {
                    Ok(Ok(())) => continue,
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => format!("not written within {patience:?}"),
                };
                tracing::warn!(error = %failed, "slack ack failed; reconnecting");
                return;
            }
            // Every queued ack is out: a clean close.
            let _ = tokio::time::timeout(patience, sink.close()).await;
        });
        AckWriter {
            queue: Some(tx),
            task,
        }
    }

    /// Queue one ack; false once the writer has failed.
    fn send(&self, ack: String) -> bool {
        self.queue.as_ref().is_some_and(|q| q.send(ack).is_ok())
    }

    /// Write what is queued and close the socket, waiting for that at most
    /// [`ACK_FLUSH`] (a peer that reads nothing must not hold up a stop).
    async fn close(&mut self) {
        self.queue = None;
        let _ = tokio::time::timeout(ACK_FLUSH, &mut self.task).await;
    }
}

impl Drop for AckWriter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends replies to Slack channels with `chat.postMessage`.
pub struct SlackSink {
    pub client: reqwest::Client,
    pub api_base: String,
    /// Exposed only in the `Authorization` header of a request.
    pub bot_token: Secret,
    pub timeout: Duration,
    /// Parts of a split reply already accepted, by outbox id.
    pub progress: super::PartProgress,
}

/// Longest part of a reply, in UTF-16 units (at most as many characters):
/// Slack's recommended limit for one message (it cuts messages at 40,000
/// characters and answers `msg_too_long` beyond).
pub const MAX_MESSAGE_UNITS: usize = 4000;

impl ReplySink for SlackSink {
    fn send(&self, reply: OutboundReply) -> BoxFuture<'static, Result<(), SendError>> {
        let client = self.client.clone();
        let url = format!("{}/chat.postMessage", self.api_base.trim_end_matches('/'));
        let token = self.bot_token.clone();
        let timeout = self.timeout;
        let progress = self.progress.clone();
        Box::pin(async move {
            // A long reply goes out as several messages, in order, split at
            // lines or words; a resend after a partial failure starts at the
            // first part not accepted yet (in memory: after a restart every
            // part goes again, at-least-once).
            let parts = super::split_message(&reply.text, MAX_MESSAGE_UNITS);
            let done = progress.resume_at(reply.id);
            for (n, part) in parts.iter().enumerate().skip(done) {
                post_part(&client, &url, &token, timeout, &reply, part).await?;
                progress.accepted(reply.id, n, parts.len());
            }
            progress.finished(reply.id);
            Ok(())
        })
    }
}

/// `chat.postMessage` for one part of a reply.
async fn post_part(
    client: &reqwest::Client,
    url: &str,
    token: &Secret,
    timeout: Duration,
    reply: &OutboundReply,
    text: &str,
) -> Result<(), SendError> {
    let mut body = json!({"channel": reply.chat, "text": text});
    // A reply to a threaded message goes to its thread.
    if let Some(ts) = reply
        .reply_meta
        .as_ref()
        .and_then(|m| opt_ts(m, "thread_ts").ok().flatten())
    {
        body["thread_ts"] = Value::String(ts);
    }
    match web_api(client, url, token, &body, timeout).await {
        Ok(_) => Ok(()),
        Err((Some(0), e, _)) => Err(SendError::Unknown(e)),
        Err((Some(429), _, wait)) => Err(SendError::RetryAfter(
            wait.unwrap_or(Duration::from_secs(1)),
        )),
        Err((_, e, _))
            if matches!(
                e.as_str(),
                "channel_not_found" | "not_in_channel" | "is_archived" | "msg_too_long"
            ) =>
        {
            Err(SendError::Permanent(format!(
                "slack rejected the reply: {e}"
            )))
        }
        Err((_, e, _)) => Err(SendError::Transient(format!("chat.postMessage: {e}"))),
    }
}

/// The slack channel: Socket Mode in, `chat.postMessage` out.
pub const CHANNEL: super::Channel = super::Channel {
    name: "slack",
    routed: |c| c.slack.enabled,
    sink: |c, deps| {
        c.slack.bot_token.as_ref().map(|token| {
            Arc::new(SlackSink {
                client: deps.http.clone(),
                api_base: c.slack.api_base.clone(),
                bot_token: token.clone(),
                timeout: Duration::from_millis(c.outbox.send_timeout_ms),
                progress: Default::default(),
            }) as Arc<dyn ReplySink>
        })
    },
    intake: |c, deps| {
        c.slack.enabled.then(|| {
            Arc::new(SlackAdapter {
                client: deps.http.clone(),
                config: c.slack.clone(),
                registry: deps.registry.clone(),
                gate: deps.gate.clone(),
                metrics: deps.metrics.clone(),
                leases: deps.leases.clone(),
            }) as Arc<dyn Adapter>
        })
    },
    unsupervised: |_| false,
    owner_chat: |_| None,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_messages_are_addressed_by_mention_command_or_keels_thread() {
        let me = BotIdentity {
            user_id: Some("UKEEL".into()),
            bot_id: Some("BKEEL".into()),
        };
        let mut threads = Threads::default();
        threads.insert("C1", "1.5");
        let ev = |v: Value| v;
        let yes = [
            ev(json!({"text": "hi <@UKEEL> there"})),
            ev(json!({"text": "<@UKEEL|keel> hi"})),
            ev(json!({"text": "  /recall x"})),
            ev(json!({"text": "plain", "thread_ts": "1.5"})),
            ev(json!({"text": "plain", "thread_ts": "9.9", "parent_user_id": "UKEEL"})),
        ];
        for e in &yes {
            assert!(addressed(e, &me, &threads, "C1"), "{e}");
        }
        let no = [
            ev(json!({"text": "plain"})),
            ev(json!({"text": "hi <@UOTHER>"})),
            ev(json!({"text": "<@UKEELX> close"})),
            ev(json!({"text": "plain", "thread_ts": "1.5x"})),
            ev(json!({"text": "plain", "thread_ts": "9.9", "parent_user_id": "U2"})),
            ev(json!({"text": 5})),
            ev(json!({})),
        ];
        for e in &no {
            assert!(!addressed(e, &me, &threads, "C1"), "{e}");
        }
        // The same thread id in another channel is another thread.
        assert!(!addressed(
            &json!({"text": "x", "thread_ts": "1.5"}),
            &me,
            &threads,
            "C2"
        ));
        // No identity: mentions and keel's threads cannot be recognised.
        let anon = BotIdentity::default();
        assert!(!addressed(
            &json!({"text": "x", "thread_ts": "9", "parent_user_id": null}),
            &anon,
            &threads,
            "C1"
        ));
        assert!(is_direct(&json!({"channel_type": "im"}), "C1"));
        assert!(!is_direct(&json!({"channel_type": "mpim"}), "D1"));
        assert!(is_direct(&json!({}), "D1"));
        assert!(!is_direct(&json!({}), "C1"));
        // The thread memory is bounded.
        for n in 0..(Threads::MAX + 10) {
            threads.insert("C9", &n.to_string());
        }
        assert!(!threads.contains("C9", "0"));
        assert!(threads.contains("C9", &(Threads::MAX + 9).to_string()));
    }

    fn me() -> BotIdentity {
        BotIdentity {
            user_id: Some("UKEEL".into()),
            bot_id: Some("BKEEL".into()),
        }
    }

    fn parse(event: Value) -> Parsed {
        parse_event(&json!({"event_id": "Ev1", "event": event}), &me())
    }

    fn msg(event: Value) -> SlackMessage {
        match parse(event.clone()) {
            Parsed::Message(m) => *m,
            other => panic!("{event}: {other:?}"),
        }
    }

    #[test]
    fn plain_messages_are_answered_and_threads_kept() {
        let m = msg(
            json!({"type": "message", "channel": "C1", "user": "U1", "text": "hi", "ts": "1.5"}),
        );
        assert_eq!((m.kind, m.answer, m.meta.clone()), ("text", true, None));
        assert_eq!(m.ts.as_deref(), Some("1.5"));
        assert_eq!(m.clone().into_deliver().reply_to, None);
        let t = msg(
            json!({"type": "message", "channel": "C1", "user": "U1", "text": "in thread",
            "ts": "2.5", "thread_ts": "1.5"}),
        );
        let d = t.into_deliver();
        assert_eq!(d.reply_to, Some(json!({"thread_ts": "1.5"})));
        assert_eq!(d.msg_ref.as_deref(), Some("2.5"));
        assert!(d.answer);
    }

    #[test]
    fn files_are_kept_with_their_metadata_and_text() {
        let m = msg(
            json!({"type": "message", "subtype": "file_share", "channel": "C1", "user": "U1",
            "text": "see this", "ts": "3.0", "files": [
                {"id": "F1", "name": "a.png", "mimetype": "image/png", "size": 42,
                 "url_private": "https://files.slack.com/a.png", "secret_thing": "x"},
                {"name": "no id"}, 7]}),
        );
        assert_eq!(
            (m.kind, m.answer, m.text.as_str()),
            ("file", true, "see this")
        );
        let meta = m.meta.unwrap();
        assert_eq!(meta["subtype"], "file_share");
        assert_eq!(
            meta["files"],
            json!([{"id": "F1", "name": "a.png", "mimetype": "image/png", "size": 42,
                    "url_private": "https://files.slack.com/a.png"}])
        );
        // A file without text is still a message.
        let f = msg(
            json!({"type": "message", "subtype": "file_share", "channel": "C1", "user": "U1",
            "text": "", "files": [{"id": "F2"}]}),
        );
        assert_eq!((f.kind, f.text.as_str()), ("file", ""));
    }

    #[test]
    fn bots_edits_deletions_and_service_messages_are_stored_not_answered() {
        for (event, kind) in [
            (
                json!({"type": "message", "channel": "C1", "bot_id": "B9", "text": "beep"}),
                "text",
            ),
            (
                json!({"type": "message", "subtype": "bot_message", "channel": "C1", "bot_id": "B9", "text": "x"}),
                "text",
            ),
            (
                json!({"type": "message", "channel": "C1", "user": "UKEEL", "text": "my own"}),
                "text",
            ),
            (
                json!({"type": "message", "subtype": "channel_join", "channel": "C1", "user": "U2",
                    "text": "<@U2> has joined"}),
                "service",
            ),
            (
                json!({"type": "message", "subtype": "future_kind", "channel": "C1", "user": "U2", "text": "?"}),
                "service",
            ),
        ] {
            let m = msg(event.clone());
            assert_eq!((m.kind, m.answer), (kind, false), "{event}");
        }
        let own =
            msg(json!({"type": "message", "channel": "C1", "bot_id": "BKEEL", "text": "reply"}));
        assert_eq!(own.meta.unwrap()["own"], true);
        let e = msg(
            json!({"type": "message", "subtype": "message_changed", "channel": "C1",
            "message": {"user": "U1", "text": "new", "ts": "1.5", "edited": {"ts": "9.0"}},
            "previous_message": {"user": "U1", "text": "old", "ts": "1.5"}}),
        );
        assert_eq!((e.kind, e.answer, e.text.as_str()), ("edit", false, "new"));
        assert_eq!((e.revises.as_deref(), e.user.as_str()), (Some("1.5"), "U1"));
        let d = msg(
            json!({"type": "message", "subtype": "message_deleted", "channel": "C1",
            "deleted_ts": "1.5", "previous_message": {"user": "U1", "text": "old", "ts": "1.5"}}),
        );
        assert_eq!((d.kind, d.answer, d.text.as_str()), ("deleted", false, ""));
        assert_eq!((d.revises.as_deref(), d.user.as_str()), (Some("1.5"), "U1"));
        // An unfurl or a new reply count changes nothing the user wrote.
        assert_eq!(
            parse(
                json!({"type": "message", "subtype": "message_changed", "channel": "C1",
                "message": {"user": "U1", "text": "same", "ts": "1.5", "attachments": [{}]},
                "previous_message": {"user": "U1", "text": "same", "ts": "1.5"}})
            ),
            Parsed::Ignored
        );
    }

    #[test]
    fn other_events_are_ignored_and_garbage_is_invalid() {
        for ignored in [
            json!({"event_id": "Ev4", "event": {"type": "reaction_added"}}),
            json!({"event_id": "Ev4", "event": {"type": "app_mention", "channel": "C1", "user": "U", "text": "x"}}),
            json!({"event_id": "Ev4", "event": {"type": "message", "subtype": "message_replied", "channel": "C1"}}),
            json!({"event_id": "Ev4", "event": [1, 2]}),
            json!("payload"),
            Value::Null,
        ] {
            assert_eq!(parse_event(&ignored, &me()), Parsed::Ignored, "{ignored}");
        }
        let huge = "x".repeat(MAX_TEXT_CHARS + 1);
        // Slack's longest message, in 4-byte characters, is still a message.
        let longest = "\u{1F600}".repeat(MAX_TEXT_CHARS);
        assert_eq!(
            msg(json!({"type": "message", "channel": "C1", "user": "U", "text": longest})).text,
            longest
        );
        for bad in [
            json!({"event": {"type": "message", "channel": "C1", "user": "U", "text": "x"}}),
            json!({"event_id": 5, "event": {"type": "message", "channel": "C1", "user": "U", "text": "x"}}),
            json!({"event_id": "E\u{7}", "event": {"type": "message", "channel": "C1", "user": "U", "text": "x"}}),
            json!({"event_id": "Ev", "event": {"type": "message", "user": "U", "text": "x"}}),
            json!({"event_id": "Ev", "event": {"type": "message", "channel": "C1", "user": {"id": "U"}, "text": "x"}}),
            json!({"event_id": "Ev", "event": {"type": "message", "channel": "C1", "text": "no sender"}}),
            json!({"event_id": "Ev", "event": {"type": "message", "channel": "C1", "user": "U", "text": 42}}),
            json!({"event_id": "Ev", "event": {"type": "message", "channel": "C1", "user": "U", "text": "a\u{0}b"}}),
            json!({"event_id": "Ev", "event": {"type": "message", "channel": "C1", "user": "U", "text": huge}}),
            json!({"event_id": "Ev", "event": {"type": "message", "channel": "C1", "user": "U", "text": "  "}}),
            json!({"event_id": "Ev", "event": {"type": "message", "channel": "C1", "user": "U", "text": "x", "ts": {"a": 1}}}),
            json!({"event_id": "Ev", "event": {"type": "message", "channel": "C1", "user": "U", "text": "x", "thread_ts": "1.2.3"}}),
            json!({"event_id": "Ev", "event": {"type": "message", "subtype": 7, "channel": "C1", "user": "U", "text": "x"}}),
            json!({"event_id": "Ev", "event": {"type": "message", "subtype": "file_share", "channel": "C1", "user": "U", "files": "nope"}}),
            json!({"event_id": "Ev", "event": {"type": "message", "subtype": "file_share", "channel": "C1", "user": "U", "files": [1, null, {"id": 5}]}}),
            json!({"event_id": "Ev", "event": {"type": "message", "subtype": "message_changed", "channel": "C1", "message": "x"}}),
            json!({"event_id": "Ev", "event": {"type": "message", "subtype": "message_changed", "channel": "C1", "message": {"user": "U", "text": "x"}}}),
            json!({"event_id": "Ev", "event": {"type": "message", "subtype": "message_deleted", "channel": "C1"}}),
            json!({"event_id": "Ev", "event": {"type": "message", "subtype": "future_kind", "channel": "C1"}}),
        ] {
            assert!(
                matches!(parse_event(&bad, &me()), Parsed::Invalid(_)),
                "{bad}"
            );
        }
        let cfg = SlackConfig {
            app_token: Some("xapp-CANARY".into()),
            bot_token: Some("xoxb-CANARY".into()),
            ..SlackConfig::default()
        };
        assert!(!format!("{cfg:?}").contains("CANARY"));
    }
}
