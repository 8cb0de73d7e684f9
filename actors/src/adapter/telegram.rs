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

use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use futures::future::BoxFuture;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::supervisor::Adapter;
use crate::config::TelegramConfig;
use crate::error::{AdapterError, SendError, StoreError};
use crate::health::Gate;
use crate::metrics::Metrics;
use crate::outbox::{OutboundReply, ReplySink};
use crate::persistence::{GetAdapterState, PersistenceActor, PutAdapterState};
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
    /// `{api_base}/bot{token}`; never logged.
    base: Arc<str>,
    token: Arc<str>,
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
    Err(match code {
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
    pub fn new(client: reqwest::Client, api_base: &str, token: &str) -> BotApi {
        BotApi {
            client,
            base: format!("{}/bot{}", api_base.trim_end_matches('/'), token).into(),
            token: token.into(),
        }
    }

    /// POST `method` with a JSON body; the whole request is bounded by `timeout`.
    pub async fn call(
        &self,
        method: &str,
        body: &Value,
        timeout: Duration,
    ) -> Result<Value, ApiError> {
        let url = format!("{}/{method}", self.base);
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
                let detail = redact(&crate::redact::without_url(&e), &self.token);
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
                let detail = redact(&crate::redact::without_url(&e), &self.token);
                return Err(if e.is_timeout() {
                    ApiError::Unknown(detail)
                } else {
                    ApiError::Transient(detail)
                });
            }
        };
        classify(status, header, &body).map_err(|e| match e {
            ApiError::Unauthorized(d) => ApiError::Unauthorized(redact(&d, &self.token)),
            ApiError::Conflict(d) => ApiError::Conflict(redact(&d, &self.token)),
            ApiError::Rejected(d) => ApiError::Rejected(redact(&d, &self.token)),
            ApiError::Transient(d) => ApiError::Transient(redact(&d, &self.token)),
            ApiError::Unknown(d) => ApiError::Unknown(redact(&d, &self.token)),
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
        }
    }
}

/// One inbound text message taken from an update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextUpdate {
    pub chat: String,
    pub from: String,
    pub text: String,
}

/// The update's id (needed to advance the offset even past a bad update).
pub fn update_id(update: &Value) -> Option<i64> {
    update.get("update_id").and_then(Value::as_i64)
}

/// Take the text message out of an update, or say why it cannot be used.
pub fn parse_update(update: &Value) -> Result<TextUpdate, String> {
    let msg = update
        .get("message")
        .ok_or("not a message update (only `message` is handled)")?;
    let chat = msg
        .pointer("/chat/id")
        .and_then(Value::as_i64)
        .ok_or("message.chat.id missing or not an integer")?;
    let from = msg
        .pointer("/from/id")
        .and_then(Value::as_i64)
        .map(|v| v.to_string())
        .unwrap_or_else(|| chat.to_string());
    let text = msg
        .get("text")
        .and_then(Value::as_str)
        .ok_or("message has no text")?;
    if text.trim().is_empty() || text.contains('\0') {
        return Err("text is empty or contains NUL".into());
    }
    Ok(TextUpdate {
        chat: chat.to_string(),
        from,
        text: text.to_string(),
    })
}

/// The poller, restarted by the adapter supervisor.
pub struct TelegramAdapter {
    pub api: BotApi,
    pub config: TelegramConfig,
    pub registry: Addr<SessionRegistry>,
    pub persistence: Addr<PersistenceActor>,
    pub gate: Gate,
    pub metrics: Metrics,
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
        Box::pin(
            async move { poll_loop(api, config, registry, persistence, gate, metrics, stop).await },
        )
    }
}

async fn poll_loop(
    api: BotApi,
    config: TelegramConfig,
    registry: Addr<SessionRegistry>,
    persistence: Addr<PersistenceActor>,
    gate: Gate,
    metrics: Metrics,
    mut stop: watch::Receiver<bool>,
) -> Result<(), AdapterError> {
    let key = state_key(&api.token);
    let stored = persistence
        .send(GetAdapterState {
            adapter: key.clone(),
        })
        .await
        .unwrap_or(Err(StoreError::Closed))?;
    let mut state: OffsetState = stored
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
    let total = Duration::from_secs(config.poll_timeout_s + config.request_margin_s);
    loop {
        let mut body = json!({
            "timeout": config.poll_timeout_s,
            "limit": config.limit,
            "allowed_updates": ["message"],
        });
        if let Some(last) = state.last_offset {
            body["offset"] = json!(last + 1);
        }
        // Shutdown abandons a poll in flight: nothing was stored from it and
        // the offset has not moved, so Telegram sends those updates again.
        let result = tokio::select! {
            r = api.call("getUpdates", &body, total) => r,
            _ = stop.wait_for(|s| *s) => return Ok(()),
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
        let Some(_guard) = gate.enter() else {
            // Intake closed (shutting down): leave the batch unconfirmed.
            return Ok(());
        };
        let mut max_id = state.last_offset;
        let mut valid = Vec::new();
        for update in &updates {
            let Some(id) = update_id(update) else {
                tracing::warn!("telegram update without update_id ignored");
                continue;
            };
            max_id = Some(max_id.map_or(id, |m| m.max(id)));
            match parse_update(update) {
                Ok(msg) => valid.push((id, msg)),
                Err(reason) => {
                    tracing::warn!(update_id = id, reason = %reason, "telegram update rejected");
                    super::count_inbound(&metrics, "telegram", "rejected");
                    state.rejected.push(id);
                }
            }
        }
        // All updates but the last are stored first (concurrently, through
        // their sessions); the last one carries the new offset, so the offset
        // commits in the same transaction as the batch's final turn and never
        // becomes durable ahead of any turn of its batch (R14).
        let last = valid.pop();
        let (ids, requests): (Vec<i64>, Vec<_>) = valid
            .into_iter()
            .map(|(id, msg)| {
                let deliver = telegram_deliver(msg, id, None);
                (id, super::deliver(&registry, &metrics, deliver))
            })
            .unzip();
        for (id, result) in ids
            .into_iter()
            .zip(futures::future::join_all(requests).await)
        {
            record_outcome(&mut state, id, result)?;
        }
        state.last_offset = max_id;
        let keep = state.rejected.len().saturating_sub(20);
        state.rejected.drain(..keep);
        let json = serde_json::to_string(&state).unwrap_or_default();
        let mut offset_stored = false;
        if let Some((id, msg)) = last {
            let deliver = telegram_deliver(msg, id, Some((key.clone(), json.clone())));
            let result = super::deliver(&registry, &metrics, deliver).await;
            offset_stored = result.is_ok();
            record_outcome(&mut state, id, result)?;
        }
        if !offset_stored {
            // No valid update in the batch, or its last one was refused on
            // its own: the offset is written by itself.
            let json = serde_json::to_string(&state).unwrap_or_default();
            persistence
                .send(PutAdapterState {
                    adapter: key.clone(),
                    state_json: json,
                })
                .await
                .unwrap_or(Err(StoreError::Closed))?;
        }
    }
}

/// The `Deliver` for one update; `state` rides along on the batch's last.
fn telegram_deliver(msg: TextUpdate, id: i64, state: Option<(String, String)>) -> Deliver {
    Deliver {
        adapter_state: state,
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
}

/// Map a Bot API failure of `sendMessage` to what the outbox does with it.
pub fn send_error(e: ApiError) -> SendError {
    match e {
        ApiError::RateLimited(wait) => {
            SendError::RetryAfter(wait.unwrap_or(Duration::from_secs(1)))
        }
        ApiError::Unknown(d) => SendError::Unknown(d),
        ApiError::Rejected(d) => SendError::Permanent(format!("telegram rejected the reply: {d}")),
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
        let chat: Value = reply
            .chat
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or_else(|_| Value::from(reply.chat.clone()));
        Box::pin(async move {
            api.call(
                "sendMessage",
                &json!({"chat_id": chat, "text": reply.text}),
                timeout,
            )
            .await
            .map(|_| ())
            .map_err(send_error)
        })
    }
}

/// The telegram channel: Bot API long polling in, `sendMessage` out.
pub const CHANNEL: super::Channel = super::Channel {
    name: "telegram",
    routed: |c| c.telegram.enabled && c.telegram.token.is_some(),
    sink: |c, deps| {
        c.telegram.token.as_ref().map(|token| {
            Arc::new(TelegramSink {
                api: BotApi::new(deps.http.clone(), &c.telegram.api_base, token),
                timeout: Duration::from_millis(c.outbox.send_timeout_ms),
            }) as Arc<dyn ReplySink>
        })
    },
    intake: |c, deps| match (c.telegram.enabled, &c.telegram.token) {
        (true, Some(token)) => Some(Arc::new(TelegramAdapter {
            api: BotApi::new(deps.http.clone(), &c.telegram.api_base, token),
            config: c.telegram.clone(),
            registry: deps.registry.clone(),
            persistence: deps.persistence.clone(),
            gate: deps.gate.clone(),
            metrics: deps.metrics.clone(),
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

    #[test]
    fn updates_are_parsed_or_rejected_with_a_reason() {
        let good = json!({"update_id": 5, "message": {"chat": {"id": -100}, "from": {"id": 9}, "text": "hi"}});
        assert_eq!(update_id(&good), Some(5));
        assert_eq!(
            parse_update(&good).unwrap(),
            TextUpdate {
                chat: "-100".into(),
                from: "9".into(),
                text: "hi".into()
            }
        );
        for bad in [
            json!({"update_id": 6, "edited_message": {}}),
            json!({"update_id": 7, "message": {"chat": {"id": "x"}, "text": "hi"}}),
            json!({"update_id": 8, "message": {"chat": {"id": 1}, "photo": []}}),
        ] {
            assert!(parse_update(&bad).is_err(), "{bad}");
        }
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
