//! The WhatsApp Business Cloud API channel (R42): Meta's webhook in, the
//! Graph API out.
//!
//! - `GET /v1/whatsapp` answers the verification handshake: `hub.mode =
//!   subscribe` and `hub.verify_token` (compared in constant time) echo
//!   `hub.challenge`; anything else is 403.
//! - `POST /v1/whatsapp`: body size limit → `X-Hub-Signature-256:
//!   sha256=<HMAC-SHA256(app_secret, raw body)>` (constant time) → JSON →
//!   every `entry[].changes[].value.messages[]` becomes a turn of session
//!   `whatsapp:<wa_id>` (key = message id, so Meta's redeliveries are
//!   duplicates) with its kind and metadata; the answer is 200 only after
//!   all of them are durable (a storage failure is 503: Meta retries).
//!   Reactions are stored, never answered. `statuses[]` are recorded
//!   against the reply they name (by the wamid stored when it was sent)
//!   before the 200, and counted (`keel_whatsapp_statuses_total{status}`).
//! - Replies: `POST {api_base}/{phone_number_id}/messages` with the access
//!   token, quoting the message answered (`context.message_id`); the wamid
//!   of the answer is kept with the outbox row. A reply to a chat that last
//!   wrote more than 24 hours ago is failed without a call (the
//!   customer-service window). A revoked or expired token (401, or Graph
//!   error code 190) and Meta's own window refusal (131047) are permanent
//!   failures naming why.

use std::sync::Arc;

use actix::prelude::*;
use actix_web::{web, HttpRequest, HttpResponse};
use futures::future::BoxFuture;
use hmac::{Hmac, Mac};
use prometheus::{IntCounterVec, Opts};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::webhook::{error_response, read_limited, reject, Rejection};
use super::{AdapterInfo, GetAdapterInfo, ReplySink, StopAdapter};
use crate::config::{check_external_id, Secret, WhatsAppConfig};
use crate::error::{SendError, StoreError};
use crate::health::Gate;
use crate::metrics::Metrics;
use crate::outbox::OutboundReply;
use crate::persistence::{PersistenceActor, RecordDeliveryStatuses};
use crate::session::{Deliver, Delivered, SessionRegistry};

/// Largest webhook body read.
const MAX_BODY: usize = 1024 * 1024;
/// Longest text stored from one message, in bytes.
const MAX_TEXT: usize = 64 * 1024;

/// The channel's registry entry.
pub const CHANNEL: super::Channel = super::Channel {
    name: "whatsapp",
    routed: |c| c.whatsapp.enabled && c.whatsapp.access_token.is_some(),
    sink: |c, deps| {
        let w = &c.whatsapp;
        match (&w.phone_number_id, &w.access_token) {
            (Some(id), Some(token)) => Some(Arc::new(WhatsAppSink {
                client: deps.http.clone(),
                url: format!("{}/{id}/messages", w.api_base.trim_end_matches('/')),
                token: token.clone(),
                health: deps.health.clone(),
                revoked: Arc::default(),
                clock: deps.clock.clone(),
            }) as Arc<dyn ReplySink>),
            _ => None,
        }
    },
    intake: |_, _| None,
    unsupervised: |c| c.whatsapp.enabled,
    owner_chat: |_| None,
};

/// One inbound message, ready to deliver.
fn to_deliver(m: &Value) -> Result<Deliver, String> {
    let field = |k: &str| m.get(k).and_then(Value::as_str);
    let from = field("from").ok_or("message without \"from\"")?;
    let id = field("id").ok_or("message without \"id\"")?;
    check_external_id("from", from)?;
    check_external_id("id", id)?;
    let kind = field("type").unwrap_or("unknown");
    let body = m.get(kind).cloned().unwrap_or(Value::Null);
    let text_of = |v: &Value, keys: &[&str]| -> String {
        keys.iter()
            .find_map(|k| v.get(*k).and_then(Value::as_str))
            .unwrap_or("")
            .to_string()
    };
    let (text, answer) = match kind {
        "text" => (text_of(&body, &["body"]), true),
        "image" | "video" | "document" | "sticker" | "audio" => {
            let caption = text_of(&body, &["caption", "filename"]);
            (
                if caption.is_empty() {
                    format!("[{kind}]")
                } else {
                    caption
                },
                true,
            )
        }
        "location" => {
            let lat = body.get("latitude").and_then(Value::as_f64);
            let lon = body.get("longitude").and_then(Value::as_f64);
            match (lat, lon) {
                (Some(a), Some(b)) => (format!("[location {a}, {b}]"), true),
                _ => return Err("location without coordinates".into()),
            }
        }
        "interactive" => {
            let reply = body
                .get("button_reply")
                .or_else(|| body.get("list_reply"))
                .cloned()
                .unwrap_or(Value::Null);
            (text_of(&reply, &["title", "id"]), true)
        }
        "button" => (text_of(&body, &["text", "payload"]), true),
        // A reaction is a turn of its own, never answered.
        "reaction" => (text_of(&body, &["emoji"]), false),
        _ => (format!("[{kind}]"), false),
    };
    if text.len() > MAX_TEXT {
        return Err(format!("text is {} bytes (at most {MAX_TEXT})", text.len()));
    }
    if text.contains('\0') {
        return Err("text contains a NUL character".into());
    }
    let revises = (kind == "reaction")
        .then(|| text_of(&body, &["message_id"]))
        .filter(|s| !s.is_empty());
    Ok(Deliver {
        kind: kind.to_string(),
        meta: (!body.is_null()).then_some(body),
        msg_ref: Some(id.to_string()),
        revises,
        reply_to: Some(json!({ "message_id": id })),
        answer,
        ..Deliver::text(
            "whatsapp",
            from.to_string(),
            from.to_string(),
            id.to_string(),
            text,
        )
    })
}

/// One entry of `statuses[]`: Meta's report about a message keel sent.
#[derive(Debug, Clone, PartialEq)]
struct StatusReport {
    /// The wamid the Graph API gave the message.
    id: String,
    /// `sent`, `delivered`, `read`, `failed` (or what Meta adds later).
    status: String,
    /// For `failed`: Meta's code and title, one line.
    error: Option<String>,
}

fn status_report(s: &Value) -> Result<StatusReport, String> {
    let id = s
        .get("id")
        .and_then(Value::as_str)
        .ok_or("status without \"id\"")?;
    check_external_id("id", id)?;
    let status: String = s
        .get("status")
        .and_then(Value::as_str)
        .unwrap_or("unknown")
        .chars()
        .filter(char::is_ascii_lowercase)
        .take(16)
        .collect();
    let error = s
        .get("errors")
        .and_then(Value::as_array)
        .and_then(|e| e.first())
        .map(|e| {
            let code = e.get("code").and_then(Value::as_i64).unwrap_or(0);
            let title = e
                .get("title")
                .or_else(|| e.get("message"))
                .and_then(Value::as_str)
                .unwrap_or("");
            let line: String = format!("{code}: {title}")
                .chars()
                .filter(|c| !c.is_control())
                .take(200)
                .collect();
            line
        });
    Ok(StatusReport {
        id: id.to_string(),
        status: if status.is_empty() {
            "unknown".into()
        } else {
            status
        },
        error,
    })
}

/// Messages and statuses of one webhook body.
fn parse_body(body: &[u8]) -> Result<(Vec<Deliver>, Vec<StatusReport>), Rejection> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| reject(400, format!("invalid JSON body: {e}")))?;
    let entries = v
        .get("entry")
        .and_then(Value::as_array)
        .ok_or_else(|| reject(400, "body has no \"entry\" array"))?;
    let (mut messages, mut statuses) = (Vec::new(), Vec::new());
    for change in entries
        .iter()
        .filter_map(|e| e.get("changes").and_then(Value::as_array))
        .flatten()
    {
        let value = change.get("value").unwrap_or(&Value::Null);
        for m in value
            .get("messages")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            messages.push(to_deliver(m).map_err(|e| reject(400, format!("message: {e}")))?);
        }
        for s in value
            .get("statuses")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            statuses.push(status_report(s).map_err(|e| reject(400, format!("status: {e}")))?);
        }
    }
    Ok((messages, statuses))
}

/// `X-Hub-Signature-256: sha256=<hex>` over the raw body.
fn check_signature(secret: &str, header: Option<&[u8]>, body: &[u8]) -> Result<(), Rejection> {
    let sig = header
        .and_then(|h| h.strip_prefix(b"sha256="))
        .and_then(|h| hex::decode(h).ok())
        .ok_or_else(|| reject(401, "missing or malformed X-Hub-Signature-256"))?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .map_err(|_| reject(500, "app secret unusable"))?;
    mac.update(body);
    mac.verify_slice(&sig)
        .map_err(|_| reject(401, "signature does not match the body"))
}

/// The channel's adapter actor: delivers each webhook's messages.
pub struct WhatsAppAdapter {
    registry: Addr<SessionRegistry>,
    metrics: Metrics,
    stopped: bool,
    since: tokio::time::Instant,
}

impl WhatsAppAdapter {
    pub fn new(registry: Addr<SessionRegistry>, metrics: Metrics) -> WhatsAppAdapter {
        WhatsAppAdapter {
            registry,
            metrics,
            stopped: false,
            since: tokio::time::Instant::now(),
        }
    }
}

impl Actor for WhatsAppAdapter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(65_536);
        tracing::debug!("whatsapp adapter started");
    }
}

/// The messages of one webhook POST, delivered in order. Sent by the route
/// while it holds a `GateGuard`.
#[derive(Debug, Message)]
#[rtype(result = "Result<Vec<Delivered>, StoreError>")]
pub struct IntakeBatch(pub Vec<Deliver>);

impl Handler<IntakeBatch> for WhatsAppAdapter {
    type Result = ResponseFuture<Result<Vec<Delivered>, StoreError>>;

    fn handle(&mut self, msg: IntakeBatch, _: &mut Context<Self>) -> Self::Result {
        if self.stopped {
            return Box::pin(async { Err(StoreError::Closed) });
        }
        let (registry, metrics) = (self.registry.clone(), self.metrics.clone());
        Box::pin(async move {
            let mut out = Vec::with_capacity(msg.0.len());
            for d in msg.0 {
                out.push(super::deliver(&registry, &metrics, d).await?);
            }
            Ok(out)
        })
    }
}

impl Handler<StopAdapter> for WhatsAppAdapter {
    type Result = ();
    fn handle(&mut self, _: StopAdapter, _: &mut Context<Self>) {
        self.stopped = true;
    }
}

impl Handler<GetAdapterInfo> for WhatsAppAdapter {
    type Result = MessageResult<GetAdapterInfo>;
    fn handle(&mut self, _: GetAdapterInfo, _: &mut Context<Self>) -> Self::Result {
        MessageResult(AdapterInfo {
            name: "whatsapp",
            since: self.since,
            stopping: self.stopped,
        })
    }
}

/// What the routes need.
#[derive(Clone)]
pub struct WhatsAppState {
    pub config: Arc<WhatsAppConfig>,
    pub intake: Addr<WhatsAppAdapter>,
    /// Where delivery statuses are recorded against their outbox rows.
    pub persistence: Addr<PersistenceActor>,
    pub gate: Gate,
    pub metrics: Metrics,
    pub statuses: IntCounterVec,
}

impl WhatsAppState {
    pub fn new(
        config: WhatsAppConfig,
        intake: Addr<WhatsAppAdapter>,
        persistence: Addr<PersistenceActor>,
        gate: Gate,
        metrics: Metrics,
    ) -> WhatsAppState {
        let statuses = IntCounterVec::new(
            Opts::new(
                "keel_whatsapp_statuses_total",
                "Delivery statuses WhatsApp reported for keel's messages",
            ),
            &["status"],
        )
        .expect("static metric definition");
        metrics.register(Box::new(statuses.clone()));
        WhatsAppState {
            config: Arc::new(config),
            intake,
            persistence,
            gate,
            metrics,
            statuses,
        }
    }

    /// Mount `GET|POST /v1/whatsapp`.
    pub fn routes(&self) -> super::ChannelRoutes {
        let state = self.clone();
        Arc::new(move |cfg: &mut web::ServiceConfig| {
            cfg.app_data(web::Data::new(state.clone()))
                .route("/v1/whatsapp", web::get().to(verify))
                .route("/v1/whatsapp", web::post().to(post));
        })
    }
}

#[derive(Deserialize)]
struct Handshake {
    #[serde(rename = "hub.mode")]
    mode: Option<String>,
    #[serde(rename = "hub.verify_token")]
    token: Option<String>,
    #[serde(rename = "hub.challenge")]
    challenge: Option<String>,
}

/// `GET /v1/whatsapp`: Meta's verification handshake.
async fn verify(state: web::Data<WhatsAppState>, q: web::Query<Handshake>) -> HttpResponse {
    let expected = state
        .config
        .verify_token
        .as_ref()
        .map_or("", Secret::expose);
    let given = q.token.as_deref().unwrap_or("");
    let token_ok: bool =
        !expected.is_empty() && bool::from(given.as_bytes().ct_eq(expected.as_bytes()));
    match (&q.mode, &q.challenge) {
        (Some(mode), Some(challenge))
            if mode == "subscribe" && token_ok && challenge.len() <= 256 =>
        {
            HttpResponse::Ok()
                .content_type("text/plain")
                .body(challenge.clone())
        }
        _ => error_response(&reject(403, "verification refused")),
    }
}

/// `POST /v1/whatsapp`: messages and statuses, 200 once durable.
async fn post(
    state: web::Data<WhatsAppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> HttpResponse {
    let checked = async {
        let body = read_limited(&req, payload, MAX_BODY).await?;
        let secret = state.config.app_secret.as_ref().map_or("", Secret::expose);
        let header = req
            .headers()
            .get("x-hub-signature-256")
            .map(|v| v.as_bytes());
        check_signature(secret, header, &body)?;
        parse_body(&body)
    };
    let (messages, statuses) = match checked.await {
        Ok(parsed) => parsed,
        Err(r) => {
            super::count_inbound(&state.metrics, "whatsapp", "rejected");
            tracing::info!(status = r.status, error = ?r.error, "whatsapp request rejected");
            return error_response(&r);
        }
    };
    for s in &statuses {
        state.statuses.with_label_values(&[s.status.as_str()]).inc();
    }
    if messages.is_empty() && statuses.is_empty() {
        return HttpResponse::Ok().json(json!({"status": "ok", "messages": 0}));
    }
    let Some(_guard) = state.gate.enter() else {
        super::count_inbound(&state.metrics, "whatsapp", "unavailable");
        return error_response(&reject(503, "not accepting messages right now"));
    };
    // Statuses are recorded against their outbox rows (found by wamid)
    // before the 200, like messages: Meta resends what was not answered.
    if !statuses.is_empty() {
        let recorded = state
            .persistence
            .send(RecordDeliveryStatuses {
                channel: "whatsapp".into(),
                statuses: statuses
                    .into_iter()
                    .map(|s| (s.id, s.status, s.error))
                    .collect(),
            })
            .await
            .unwrap_or(Err(StoreError::Closed));
        match recorded {
            Ok(n) => tracing::debug!(matched = n, "whatsapp statuses recorded"),
            Err(e) => return error_response(&reject(503, e.to_string())),
        }
    }
    if messages.is_empty() {
        return HttpResponse::Ok().json(json!({"status": "ok", "messages": 0}));
    }
    let n = messages.len();
    match state
        .intake
        .send(IntakeBatch(messages))
        .await
        .unwrap_or(Err(StoreError::Closed))
    {
        Ok(_) => HttpResponse::Ok().json(json!({"status": "ok", "messages": n})),
        Err(StoreError::Invalid(m)) => error_response(&reject(422, m)),
        Err(e) => error_response(&reject(503, e.to_string())),
    }
}

/// Sends replies with the Graph API.
pub struct WhatsAppSink {
    pub client: reqwest::Client,
    pub url: String,
    /// Exposed only in the `Authorization` header of a request.
    pub token: Secret,
    /// Told when the token is refused: the channel stops, the owner hears.
    pub health: super::ChannelHealth,
    /// The token was refused: later replies fail at once, without a call.
    pub revoked: Arc<std::sync::atomic::AtomicBool>,
    /// For the 24-hour customer-service window.
    pub clock: Arc<dyn crate::clock::Clock>,
}

/// WhatsApp's customer-service window: free-form messages only within 24
/// hours of the user's last message.
pub const SERVICE_WINDOW_MS: i64 = 24 * 3600 * 1000;

/// `Some(reason)` when a free-form reply to a chat whose last message came
/// at `last_inbound_ms` may not be sent at `now_ms`.
pub fn outside_window(last_inbound_ms: Option<i64>, now_ms: i64) -> Option<String> {
    match last_inbound_ms {
        Some(last) if now_ms - last <= SERVICE_WINDOW_MS => None,
        Some(last) => {
            let at = crate::clock::Stamp::from_ms(last).text;
            Some(format!(
                "outside the 24-hour window: the chat last wrote at {at}; WhatsApp accepts only template messages now"
            ))
        }
        None => Some(
            "outside the 24-hour window: the chat never wrote to keel; WhatsApp accepts only template messages"
                .into(),
        ),
    }
}

/// Why replies stop after the Graph API refused the token.
const RENEW: &str = "whatsapp access token expired or revoked; renew it \
                     (whatsapp.access_token or KEEL_WHATSAPP_ACCESS_TOKEN) and restart keel";

impl ReplySink for WhatsAppSink {
    fn send(&self, reply: OutboundReply) -> BoxFuture<'static, Result<(), SendError>> {
        let sent = self.send_with_ref(reply);
        Box::pin(async move { sent.await.map(|_| ()) })
    }

    /// Sends the reply and answers the wamid the Graph API gave it, which
    /// later `statuses[]` name. Outside the 24-hour window nothing is sent.
    fn send_with_ref(
        &self,
        reply: OutboundReply,
    ) -> BoxFuture<'static, Result<Option<String>, SendError>> {
        if let Some(reason) = outside_window(reply.last_inbound_ms, self.clock.now_ms()) {
            return Box::pin(async move { Err(SendError::Permanent(reason)) });
        }
        let mut body = json!({
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": reply.chat,
            "type": "text",
            "text": {"body": reply.text},
        });
        if let Some(id) = reply
            .reply_meta
            .as_ref()
            .and_then(|m| m.get("message_id"))
            .and_then(Value::as_str)
        {
            body["context"] = json!({ "message_id": id });
        }
        use std::sync::atomic::Ordering;
        if self.revoked.load(Ordering::SeqCst) {
            return Box::pin(async { Err(SendError::Permanent(RENEW.into())) });
        }
        let req = self
            .client
            .post(&self.url)
            .bearer_auth(self.token.expose())
            .json(&body);
        let token = self.token.clone();
        let (health, revoked) = (self.health.clone(), self.revoked.clone());
        Box::pin(async move {
            let resp = req.send().await.map_err(|e| {
                let detail = crate::redact::redact(&crate::redact::without_url(&e), token.expose());
                if e.is_timeout() {
                    SendError::Unknown(detail)
                } else {
                    SendError::Transient(detail)
                }
            })?;
            let status = resp.status().as_u16();
            let v: Value = resp.json().await.unwrap_or(Value::Null);
            if (200..300).contains(&status) {
                let wamid = v
                    .pointer("/messages/0/id")
                    .and_then(Value::as_str)
                    .filter(|id| check_external_id("id", id).is_ok())
                    .map(str::to_string);
                return Ok(wamid);
            }
            let error = graph_error(status, &v);
            if token_refused(status, &v) && !revoked.swap(true, Ordering::SeqCst) {
                // The seed's "session expired → re-pair": stop and tell.
                health.stopped("whatsapp", RENEW);
            }
            Err(error)
        })
    }
}

/// 401, or Graph error 190: the access token is no good any more.
fn token_refused(status: u16, body: &Value) -> bool {
    status == 401 || body["error"]["code"].as_i64() == Some(190)
}

/// What a Graph API failure means for the outbox.
fn graph_error(status: u16, body: &Value) -> SendError {
    let code = body["error"]["code"].as_i64();
    let message: String = body["error"]["message"]
        .as_str()
        .unwrap_or("")
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect();
    match (status, code) {
        (401, _) | (_, Some(190)) => SendError::Permanent(format!(
            "whatsapp access token expired or revoked; renew it ({message})"
        )),
        (_, Some(131047)) => SendError::Permanent(
            "outside the 24-hour window: WhatsApp accepts only template messages now".into(),
        ),
        (429, _) | (_, Some(130429)) => SendError::RetryAfter(std::time::Duration::from_secs(5)),
        (s, _) if (400..500).contains(&s) && s != 408 => {
            SendError::Permanent(format!("graph api answered HTTP {s}: {message}"))
        }
        (s, _) => SendError::Transient(format!("graph api answered HTTP {s}: {message}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_of_every_kind_become_turns() {
        let body = json!({"entry": [{"changes": [{"value": {
            "messages": [
                {"from": "4915", "id": "w1", "type": "text", "text": {"body": "hi"}},
                {"from": "4915", "id": "w2", "type": "image", "image": {"id": "M1", "caption": "cat"}},
                {"from": "4915", "id": "w3", "type": "location", "location": {"latitude": 1.5, "longitude": 2.0}},
                {"from": "4915", "id": "w4", "type": "interactive", "interactive": {"type": "button_reply", "button_reply": {"id": "b1", "title": "Yes"}}},
                {"from": "4915", "id": "w5", "type": "reaction", "reaction": {"message_id": "w1", "emoji": "👍"}},
                {"from": "4915", "id": "w6", "type": "document", "document": {"id": "D1", "filename": "a.pdf"}}
            ],
            "statuses": [{"id": "x", "status": "delivered"}]
        }}]}]});
        let (msgs, statuses) = parse_body(body.to_string().as_bytes()).unwrap();
        let statuses: Vec<String> = statuses.into_iter().map(|s| s.status).collect();
        let got: Vec<(&str, &str, bool)> = msgs
            .iter()
            .map(|d| (d.kind.as_str(), d.text.as_str(), d.answer))
            .collect();
        assert_eq!(
            got,
            vec![
                ("text", "hi", true),
                ("image", "cat", true),
                ("location", "[location 1.5, 2]", true),
                ("interactive", "Yes", true),
                ("reaction", "👍", false),
                ("document", "a.pdf", true),
            ]
        );
        assert_eq!(msgs[4].revises.as_deref(), Some("w1"));
        assert_eq!(statuses, vec!["delivered".to_string()]);
    }

    #[test]
    fn statuses_are_parsed_with_their_reason_and_hostile_ones_refused() {
        let ok = status_report(&json!({"id": "wamid.X", "status": "failed",
            "errors": [{"code": 131047, "title": "Re-engagement\nmessage"}]}))
        .unwrap();
        assert_eq!(ok.status, "failed");
        assert_eq!(ok.error.as_deref(), Some("131047: Re-engagementmessage"));
        let odd = status_report(&json!({"id": "wamid.Y", "status": "DELIVERED!"})).unwrap();
        assert_eq!(odd.status, "unknown", "no lowercase letters left");
        for bad in [
            json!({}),
            json!({"status": "read"}),
            json!({"id": 5, "status": "read"}),
            json!({"id": "", "status": "read"}),
            json!({"id": "a\nb", "status": "read"}),
            json!({"id": "x".repeat(10_000), "status": "read"}),
            json!({"id": null}),
        ] {
            assert!(status_report(&bad).is_err(), "{bad}");
        }
        for body in [
            r#"{"entry": [{"changes": [{"value": {"statuses": [{"status": "read"}]}}]}]}"#,
            r#"{"entry": [{"changes": [{"value": {"statuses": [{"id": ["x"], "status": "read"}]}}]}]}"#,
        ] {
            assert_eq!(
                parse_body(body.as_bytes()).unwrap_err().status,
                400,
                "{body}"
            );
        }
        // Unknown shapes of `errors` are tolerated.
        let e = status_report(&json!({"id": "w", "status": "failed", "errors": "x"})).unwrap();
        assert_eq!(e.error, None);
    }

    #[test]
    fn the_24_hour_window_is_checked_against_the_last_inbound_message() {
        let now = 1_764_590_400_000;
        assert_eq!(outside_window(Some(now - 1000), now), None);
        assert_eq!(outside_window(Some(now - SERVICE_WINDOW_MS), now), None);
        let late = outside_window(Some(now - SERVICE_WINDOW_MS - 1), now).unwrap();
        assert!(late.starts_with("outside the 24-hour window"), "{late}");
        assert!(outside_window(None, now).unwrap().contains("never wrote"));
    }

    #[test]
    fn hostile_bodies_are_400_with_one_line() {
        for bad in [
            "",
            "[]",
            "{}",
            r#"{"entry": 5}"#,
            r#"{"entry": [{"changes": [{"value": {"messages": [{"id": "x"}]}}]}]}"#,
            r#"{"entry": [{"changes": [{"value": {"messages": [{"from": "a", "type": "text"}]}}]}]}"#,
            r#"{"entry": [{"changes": [{"value": {"messages": [{"from": "", "id": "x"}]}}]}]}"#,
            r#"{"entry": [{"changes": [{"value": {"messages": [{"from": "a\n", "id": "x"}]}}]}]}"#,
            r#"{"entry": [{"changes": [{"value": {"messages": [{"from": "a", "id": "x", "type": "location", "location": {}}]}}]}]}"#,
            r#"{"entry": [{"changes": [{"value": {"messages": [{"from": "a", "id": "x", "type": "text", "text": {"body": "a\u0000b"}}]}}]}]}"#,
        ] {
            let r = parse_body(bad.as_bytes()).unwrap_err();
            assert_eq!(r.status, 400, "{bad}: {}", r.error);
            assert!(!r.error.contains('\n'), "{bad}");
        }
        let deep = format!("{}{}", "[".repeat(50_000), "]".repeat(50_000));
        assert_eq!(parse_body(deep.as_bytes()).unwrap_err().status, 400);
        // Unknown fields and types are fine; an unknown type is stored, not answered.
        let odd = r#"{"entry": [{"changes": [{"value": {"x": 1, "messages": [{"from": "a", "id": "x", "type": "hologram", "hologram": {}}]}}]}]}"#;
        let (m, _) = parse_body(odd.as_bytes()).unwrap();
        assert!(!m[0].answer && m[0].kind == "hologram");
    }

    #[test]
    fn signatures_and_graph_errors() {
        let body = b"{}";
        let mut mac = Hmac::<Sha256>::new_from_slice(b"s").unwrap();
        mac.update(body);
        let good = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        assert!(check_signature("s", Some(good.as_bytes()), body).is_ok());
        assert_eq!(
            check_signature("t", Some(good.as_bytes()), body)
                .unwrap_err()
                .status,
            401
        );
        assert_eq!(check_signature("s", None, body).unwrap_err().status, 401);
        assert!(matches!(
            graph_error(400, &json!({"error": {"code": 190, "message": "expired"}})),
            SendError::Permanent(m) if m.contains("renew")
        ));
        assert!(matches!(
            graph_error(400, &json!({"error": {"code": 131047}})),
            SendError::Permanent(m) if m.contains("24-hour")
        ));
        assert!(matches!(
            graph_error(503, &json!({})),
            SendError::Transient(_)
        ));
        assert!(matches!(
            graph_error(429, &json!({})),
            SendError::RetryAfter(_)
        ));
    }
}
