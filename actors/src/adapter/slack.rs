//! The Slack adapter: Socket Mode in, `chat.postMessage` out, against a
//! configurable `api_base` (R13).
//!
//! `apps.connections.open` (app token) yields a WebSocket URL; keel connects
//! and waits for `hello`. Each `events_api` envelope carrying a user message
//! becomes a `Deliver` (session `slack:<channel>`, key = `event_id`, which
//! Slack keeps across its own retries) and is acknowledged by its
//! `envelope_id` only after the turn is durable; envelopes keel does not use
//! are acknowledged at once so Slack does not resend them. A `disconnect`
//! message (Slack rotates sockets) or a close opens a new socket right away.
//! A socket that stays connected but silent — no `hello` and no frame at all,
//! pings included, within `silence_timeout_s` — is treated as dead ("ghost"
//! socket) and the adapter fails so the supervisor reconnects it.
//! A server that keeps sending `disconnect` (or closing) right after the
//! socket opened does not make keel reconnect in a hot loop: after
//! [`MAX_QUICK_DISCONNECTS`] sockets in a row that each lived less than
//! [`QUICK_SOCKET`], the run fails and the supervisor's backoff applies.
//! `invalid_auth` / `not_authed` / `account_inactive` or an HTTP 401 from
//! `apps.connections.open` stops the adapter (no retry) with that reason.
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
use crate::config::SlackConfig;
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
/// Quick disconnects in a row after which the run fails (and backs off).
pub const MAX_QUICK_DISCONNECTS: u32 = 3;

/// A Web API call with a bearer token; `Ok(body)` only for `"ok": true`.
async fn web_api(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    body: &Value,
    timeout: Duration,
) -> Result<Value, (Option<u16>, String, Option<Duration>)> {
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
        Box::pin(async move { socket_loop(client, config, registry, gate, metrics, stop).await })
    }
}

/// A user message taken from an `events_api` envelope payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlackMessage {
    pub event_id: String,
    pub channel: String,
    pub user: String,
    pub text: String,
}

/// The user message in an `events_api` payload, or `None` for anything keel
/// does not answer (bot messages, edits, other event types).
pub fn parse_event(payload: &Value) -> Option<SlackMessage> {
    let event = payload.get("event")?;
    if event["type"] != "message" || event.get("subtype").is_some() || event.get("bot_id").is_some()
    {
        return None;
    }
    let msg = SlackMessage {
        event_id: payload["event_id"].as_str()?.to_string(),
        channel: event["channel"].as_str()?.to_string(),
        user: event["user"].as_str()?.to_string(),
        text: event["text"].as_str()?.to_string(),
    };
    let ok = check_external_id("channel", &msg.channel).is_ok()
        && check_external_id("event_id", &msg.event_id).is_ok()
        && !msg.text.trim().is_empty()
        && !msg.text.contains('\0');
    ok.then_some(msg)
}

async fn socket_loop(
    client: reqwest::Client,
    config: SlackConfig,
    registry: Addr<SessionRegistry>,
    gate: Gate,
    metrics: Metrics,
    mut stop: watch::Receiver<bool>,
) -> Result<(), AdapterError> {
    let app_token = config.app_token.clone().unwrap_or_default();
    let silence = Duration::from_secs(config.silence_timeout_s);
    let open_url = format!(
        "{}/apps.connections.open",
        config.api_base.trim_end_matches('/')
    );
    let mut quick_disconnects: u32 = 0;
    loop {
        let opened = web_api(&client, &open_url, &app_token, &json!({}), silence).await;
        let url = match opened {
            Ok(v) => v["url"].as_str().unwrap_or_default().to_string(),
            Err((status, e, _))
                if status == Some(401)
                    || e == "invalid_auth"
                    || e == "not_authed"
                    || e == "account_inactive" =>
            {
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
        let (mut ws, _) = match connect.await {
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
        let mut hello = false;
        loop {
            let frame = tokio::select! {
                f = tokio::time::timeout(silence, ws.next()) => Some(f),
                _ = stop.wait_for(|s| *s) => None,
            };
            let Some(frame) = frame else {
                let _ = ws.close(None).await;
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
                    let _ = ws.close(None).await;
                    break;
                }
                _ => {
                    let Some(envelope) = v["envelope_id"].as_str().map(str::to_string) else {
                        continue;
                    };
                    if v["type"] == "events_api" {
                        if let Some(msg) = parse_event(&v["payload"]) {
                            let Some(_guard) = gate.enter() else {
                                // Shutting down: no ack, Slack resends later.
                                return Ok(());
                            };
                            let res = super::deliver(
                                &registry,
                                &metrics,
                                Deliver::text(
                                    "slack",
                                    msg.channel,
                                    msg.user,
                                    msg.event_id,
                                    msg.text,
                                ),
                            )
                            .await;
                            match res {
                                // Stored, a repeat, or refused for good: ack.
                                Ok(_) | Err(StoreError::Invalid(_)) => {}
                                // No ack: Slack redelivers once we are back.
                                Err(e) => return Err(AdapterError::Store(e)),
                            }
                        }
                    }
                    // Durable (or not ours): acknowledge by envelope id.
                    let ack = json!({ "envelope_id": envelope }).to_string();
                    if let Err(e) = ws.send(Message::text(ack)).await {
                        tracing::warn!(error = %e, "slack ack failed; reconnecting");
                        break;
                    }
                }
            }
        }
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

/// Sends replies to Slack channels with `chat.postMessage`.
pub struct SlackSink {
    pub client: reqwest::Client,
    pub api_base: String,
    pub bot_token: String,
    pub timeout: Duration,
}

impl ReplySink for SlackSink {
    fn send(&self, reply: OutboundReply) -> BoxFuture<'static, Result<(), SendError>> {
        let client = self.client.clone();
        let url = format!("{}/chat.postMessage", self.api_base.trim_end_matches('/'));
        let token = self.bot_token.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            let body = json!({"channel": reply.chat, "text": reply.text});
            match web_api(&client, &url, &token, &body, timeout).await {
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
        })
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
    fn only_user_messages_are_taken() {
        let good = json!({"event_id": "Ev1", "event": {"type": "message", "channel": "C1", "user": "U1", "text": "hi"}});
        assert_eq!(
            parse_event(&good),
            Some(SlackMessage {
                event_id: "Ev1".into(),
                channel: "C1".into(),
                user: "U1".into(),
                text: "hi".into()
            })
        );
        for bad in [
            json!({"event_id": "Ev2", "event": {"type": "message", "subtype": "message_changed", "channel": "C1"}}),
            json!({"event_id": "Ev3", "event": {"type": "message", "bot_id": "B1", "channel": "C1", "user": "U", "text": "x"}}),
            json!({"event_id": "Ev4", "event": {"type": "reaction_added"}}),
            json!({"event": {"type": "message", "channel": "C1", "user": "U", "text": "x"}}),
        ] {
            assert_eq!(parse_event(&bad), None, "{bad}");
        }
        let cfg = SlackConfig {
            app_token: Some("xapp-CANARY".into()),
            bot_token: Some("xoxb-CANARY".into()),
            ..SlackConfig::default()
        };
        assert!(!format!("{cfg:?}").contains("CANARY"));
    }
}
