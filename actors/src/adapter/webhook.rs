//! The webhook adapter: `POST /v1/messages` in, replies POSTed to
//! `webhook.reply_url` out.
//!
//! Order of checks on a request: body size (streamed, never buffered past the
//! limit) → content encoding → signature over the raw body (constant time) →
//! JSON shape → field rules → intake gate → durable commit → 200. Every
//! rejection is a 4xx with a one-line `{"error": ...}` and stores nothing.
//!
//! The route (on the HTTP workers) does the checks; the message then goes
//! to the [`WebhookAdapter`] actor — the channel's adapter actor, started
//! with the HTTP server — which delivers it through the one counted
//! `adapter::deliver` path and answers once it is durable.

use std::sync::{Arc, RwLock};

use actix::prelude::*;
use actix_web::{web, HttpRequest, HttpResponse};
use futures::future::BoxFuture;
use futures::StreamExt;
use hmac::{Hmac, Mac};
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use serde_json::json;
use sha2::Sha256;

use super::actor::{AdapterInfo, GetAdapterInfo, StopAdapter};
use crate::error::{SendError, StoreError};
use crate::health::Gate;
use crate::ids::check_external_id;
use crate::metrics::Metrics;
use crate::outbox::{OutboundReply, ReplySink};
use crate::session::{Deliver, Delivered, SessionRegistry};

/// Longest message text accepted, in bytes.
pub const MAX_TEXT_BYTES: usize = 64 * 1024;

/// Reloadable webhook settings.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookSettings {
    /// `{:?}` shows `<redacted>`; exposed only to check a signature.
    pub secret: Option<crate::config::Secret>,
    pub max_body_bytes: usize,
}

/// What the webhook handler needs; shared by all HTTP workers.
#[derive(Clone)]
pub struct WebhookState {
    pub settings: Arc<RwLock<WebhookSettings>>,
    /// The channel's adapter actor: every accepted request goes through it.
    pub intake: Addr<WebhookAdapter>,
    pub gate: Gate,
    pub metrics: Metrics,
}

/// The deliberately broken test build (`keel torture --break
/// forget-message-ids`): a key of its own per delivery, so a retry is
/// stored twice and the battery must count duplicates.
#[cfg(feature = "failpoints")]
fn forget_message_id(mut msg: InboundMessage) -> InboundMessage {
    if crate::failpoint::armed(crate::failpoint::FORGET_MESSAGE_IDS) {
        msg.id = format!("{}~{:016x}", msg.id, rand::random::<u64>());
    }
    msg
}

/// The webhook channel's adapter actor: delivers validated messages to
/// their sessions and answers once they are durable (R1). Concurrent: each
/// `Intake` is its own future, so one slow commit holds up no other.
pub struct WebhookAdapter {
    pub registry: Addr<SessionRegistry>,
    pub metrics: Metrics,
    /// Set by `StopAdapter`: later intakes are refused as "shutting down".
    stopped: bool,
    since: tokio::time::Instant,
}

impl WebhookAdapter {
    pub fn new(registry: Addr<SessionRegistry>, metrics: Metrics) -> WebhookAdapter {
        WebhookAdapter {
            registry,
            metrics,
            stopped: false,
            since: tokio::time::Instant::now(),
        }
    }
}

impl Actor for WebhookAdapter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Every HTTP worker sends here; actix's default mailbox of 16 would
        // throttle a burst of concurrent clients.
        ctx.set_mailbox_capacity(65_536);
        tracing::debug!("webhook adapter started");
    }

    fn stopping(&mut self, _: &mut Self::Context) -> Running {
        tracing::debug!("webhook adapter stopping");
        Running::Stop
    }
}

/// One validated webhook message to deliver. Sent by the HTTP route while it
/// holds a `GateGuard`.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Delivered, StoreError>")]
pub struct Intake(pub InboundMessage);

impl Handler<Intake> for WebhookAdapter {
    type Result = ResponseFuture<Result<Delivered, StoreError>>;

    fn handle(&mut self, msg: Intake, _: &mut Context<Self>) -> Self::Result {
        if self.stopped {
            return Box::pin(async { Err(StoreError::Closed) });
        }
        let msg = msg.0;
        let deliver = Deliver::text("webhook", msg.chat, msg.from, msg.id, msg.text);
        let (registry, metrics) = (self.registry.clone(), self.metrics.clone());
        Box::pin(async move { super::deliver(&registry, &metrics, deliver).await })
    }
}

impl Handler<StopAdapter> for WebhookAdapter {
    type Result = ();
    fn handle(&mut self, _: StopAdapter, _: &mut Context<Self>) {
        self.stopped = true;
    }
}

impl Handler<GetAdapterInfo> for WebhookAdapter {
    type Result = MessageResult<GetAdapterInfo>;
    fn handle(&mut self, _: GetAdapterInfo, _: &mut Context<Self>) -> Self::Result {
        MessageResult(AdapterInfo {
            name: "webhook",
            since: self.since,
            stopping: self.stopped,
        })
    }
}

/// A validated inbound message.
#[derive(Debug, Clone, PartialEq)]
pub struct InboundMessage {
    pub id: String,
    pub chat: String,
    pub from: String,
    pub text: String,
}

#[derive(Deserialize)]
struct Wire {
    #[serde(deserialize_with = "message_id")]
    id: String,
    #[serde(deserialize_with = "chat_id")]
    chat: String,
    #[serde(deserialize_with = "chat_id")]
    from: String,
    text: String,
}

/// `id`: a string, or a non-negative integer (kept as its decimal text).
fn message_id<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    d.deserialize_any(IdVisitor { negative_ok: false })
}

/// `chat` / `from`: a string or any i64 (Telegram-style negative ids).
fn chat_id<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    d.deserialize_any(IdVisitor { negative_ok: true })
}

struct IdVisitor {
    negative_ok: bool,
}

impl<'de> Visitor<'de> for IdVisitor {
    type Value = String;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.negative_ok {
            f.write_str("a string or a 64-bit signed integer")
        } else {
            f.write_str("a string or a non-negative integer")
        }
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<String, E> {
        Ok(v)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
        // Chat and user ids are i64 on every channel keel speaks.
        if self.negative_ok && v > i64::MAX as u64 {
            return Err(E::invalid_value(de::Unexpected::Unsigned(v), &self));
        }
        Ok(v.to_string())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
        if v < 0 && !self.negative_ok {
            return Err(E::invalid_value(de::Unexpected::Signed(v), &self));
        }
        Ok(v.to_string())
    }
}

/// A rejection: HTTP status and one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: u16,
    pub error: String,
}

pub(super) fn reject(status: u16, error: impl Into<String>) -> Rejection {
    Rejection {
        status,
        error: error.into(),
    }
}

/// Verify `X-Keel-Signature: sha256=<hex>` over the raw body.
pub fn check_signature(secret: &str, header: Option<&[u8]>, body: &[u8]) -> Result<(), Rejection> {
    let Some(header) = header else {
        return Err(reject(401, "missing X-Keel-Signature header"));
    };
    let Some(hex_sig) = header.strip_prefix(b"sha256=") else {
        return Err(reject(401, "X-Keel-Signature must look like sha256=<hex>"));
    };
    let Ok(sig) = hex::decode(hex_sig) else {
        return Err(reject(401, "X-Keel-Signature is not valid hex"));
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .map_err(|_| reject(500, "webhook secret unusable"))?;
    mac.update(body);
    // `verify_slice` compares in constant time.
    mac.verify_slice(&sig)
        .map_err(|_| reject(401, "signature does not match the body"))
}

/// Parse and validate a request body.
pub fn parse_message(body: &[u8]) -> Result<InboundMessage, Rejection> {
    let wire: Wire =
        serde_json::from_slice(body).map_err(|e| reject(400, format!("invalid JSON body: {e}")))?;
    check_external_id("id", &wire.id).map_err(|e| reject(400, e))?;
    check_external_id("chat", &wire.chat).map_err(|e| reject(400, e))?;
    check_external_id("from", &wire.from).map_err(|e| reject(400, e))?;
    if wire.text.trim().is_empty() {
        return Err(reject(400, "text must not be empty"));
    }
    if wire.text.len() > MAX_TEXT_BYTES {
        return Err(reject(
            413,
            format!(
                "text is {} bytes (at most {MAX_TEXT_BYTES})",
                wire.text.len()
            ),
        ));
    }
    if wire.text.contains('\0') {
        return Err(reject(400, "text contains a NUL character"));
    }
    Ok(InboundMessage {
        id: wire.id,
        chat: wire.chat,
        from: wire.from,
        text: wire.text,
    })
}

pub(super) fn error_response(r: &Rejection) -> HttpResponse {
    HttpResponse::build(
        actix_web::http::StatusCode::from_u16(r.status)
            .unwrap_or(actix_web::http::StatusCode::BAD_REQUEST),
    )
    .json(json!({ "error": r.error }))
}

/// Read the body, refusing anything over `limit` without buffering it.
pub(super) async fn read_limited(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<web::BytesMut, Rejection> {
    if let Some(len) = req
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit as u64 {
            return Err(reject(
                413,
                format!("body is {len} bytes (at most {limit})"),
            ));
        }
    }
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| reject(400, format!("cannot read body: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(reject(413, format!("body exceeds {limit} bytes")));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

impl WebhookState {
    /// Mount `POST /v1/messages`.
    pub fn routes(&self) -> super::ChannelRoutes {
        let state = self.clone();
        Arc::new(move |cfg: &mut web::ServiceConfig| {
            cfg.app_data(web::Data::new(state.clone()))
                .route("/v1/messages", web::post().to(post_message));
        })
    }
}

/// `POST /v1/messages`.
pub async fn post_message(
    state: web::Data<WebhookState>,
    req: HttpRequest,
    payload: web::Payload,
) -> HttpResponse {
    let settings = state
        .settings
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let result = handle(&state, &settings, &req, payload).await;
    match result {
        Ok(Delivered::Accepted { session, .. }) => {
            HttpResponse::Ok().json(json!({"status": "accepted", "session": session}))
        }
        Ok(Delivered::Duplicate { session, .. }) => {
            HttpResponse::Ok().json(json!({"status": "duplicate", "session": session}))
        }
        // `handle` turns a conflict into a 409 rejection.
        Ok(Delivered::Conflict { .. }) => error_response(&reject(409, "id already used")),
        Err(r) => {
            if r.status != 503 {
                // `{:?}` escapes control characters: no log injection.
                tracing::info!(status = r.status, error = ?r.error, "webhook request rejected");
            }
            error_response(&r)
        }
    }
}

async fn handle(
    state: &WebhookState,
    settings: &WebhookSettings,
    req: &HttpRequest,
    payload: web::Payload,
) -> Result<Delivered, Rejection> {
    if let Some(enc) = req.headers().get(actix_web::http::header::CONTENT_ENCODING) {
        if !enc.as_bytes().eq_ignore_ascii_case(b"identity") {
            return Err(reject(
                415,
                "Content-Encoding is not supported; send plain JSON",
            ));
        }
    }
    let checked = async {
        let body = read_limited(req, payload, settings.max_body_bytes).await?;
        if let Some(secret) = &settings.secret {
            let header = req.headers().get("x-keel-signature").map(|v| v.as_bytes());
            check_signature(secret.expose(), header, &body)?;
        }
        parse_message(&body)
    };
    let msg = match checked.await {
        Ok(msg) => msg,
        Err(r) => {
            // Refused before delivery: counted here; delivered messages are
            // counted by `adapter::deliver`.
            super::count_inbound(&state.metrics, "webhook", "rejected");
            return Err(r);
        }
    };
    let Some(_guard) = state.gate.enter() else {
        super::count_inbound(&state.metrics, "webhook", "unavailable");
        return Err(reject(
            503,
            "not accepting messages right now (starting or shutting down)",
        ));
    };
    #[cfg(feature = "failpoints")]
    let msg = forget_message_id(msg);
    let id = msg.id.clone();
    // The deliberately broken test build (`keel torture --break
    // ack-before-commit`): 200 before the message is committed, so the
    // battery must count losses. Never compiled into a release build.
    #[cfg(feature = "failpoints")]
    if crate::failpoint::armed(crate::failpoint::ACK_BEFORE_COMMIT) {
        let intake = state.intake.clone();
        actix::spawn(async move {
            let _ = intake.send(Intake(msg)).await;
        });
        return Ok(Delivered::Accepted {
            session: String::new(),
            seq: 0,
        });
    }
    let delivered = state
        .intake
        .send(Intake(msg))
        .await
        .unwrap_or(Err(StoreError::Closed));
    match delivered {
        // The key is (chat, from, id): the same key with another text is a
        // client bug that must not pass as a duplicate (R41).
        Ok(Delivered::Conflict { .. }) => Err(reject(
            409,
            format!("id {id:?} already used with different content"),
        )),
        Ok(d) => Ok(d),
        Err(StoreError::Invalid(m)) => Err(reject(422, m)),
        Err(StoreError::Closed) => Err(reject(503, "shutting down")),
        Err(other) => Err(reject(503, other.to_string())),
    }
}

/// Sends webhook replies to `reply_url`.
pub struct WebhookSink {
    pub client: reqwest::Client,
    pub url: String,
}

impl ReplySink for WebhookSink {
    fn send(&self, reply: OutboundReply) -> BoxFuture<'static, Result<(), SendError>> {
        let req = self.client.post(&self.url).json(&json!({
            "id": reply.id.to_string(),
            "chat": reply.chat,
            "in_reply_to": reply.in_reply_to,
            "text": reply.text,
        }));
        Box::pin(async move {
            let resp = req.send().await.map_err(|e| {
                let detail = crate::redact::without_url(&e);
                // A timeout means the request may have arrived.
                if e.is_timeout() {
                    SendError::Unknown(detail)
                } else {
                    SendError::Transient(detail)
                }
            })?;
            let status = resp.status();
            if status.is_success() {
                return Ok(());
            }
            if status.as_u16() == 429 {
                let wait = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(1)
                    .min(3600);
                return Err(SendError::RetryAfter(std::time::Duration::from_secs(wait)));
            }
            if status.is_client_error() && status.as_u16() != 408 {
                return Err(SendError::Permanent(format!(
                    "reply_url answered HTTP {}",
                    status.as_u16()
                )));
            }
            Err(SendError::Transient(format!(
                "reply_url answered HTTP {}",
                status.as_u16()
            )))
        })
    }
}

/// The webhook channel: intake is the `POST /v1/messages` route and its
/// [`WebhookAdapter`] actor (started with the HTTP server, so not
/// supervised); replies go to `webhook.reply_url` when set.
pub const CHANNEL: super::Channel = super::Channel {
    name: "webhook",
    routed: |c| c.webhook.enabled && c.webhook.reply_url.is_some(),
    sink: |c, deps| {
        c.webhook.reply_url.as_ref().map(|url| {
            Arc::new(WebhookSink {
                client: deps.http.clone(),
                url: url.clone(),
            }) as Arc<dyn ReplySink>
        })
    },
    intake: |_, _| None,
    unsupervised: |c| c.webhook.enabled,
    owner_chat: |_| None,
};

#[cfg(test)]
mod tests {
    use super::*;

    /// The reloadable settings are logged with `{:?}` nowhere today, but
    /// if they ever are, the secret shows as `<redacted>`.
    #[test]
    fn settings_debug_hides_the_secret() {
        let s = WebhookSettings {
            secret: Some("canary-hook".into()),
            max_body_bytes: 1,
        };
        let shown = format!("{s:?}");
        assert!(
            !shown.contains("canary") && shown.contains("<redacted>"),
            "{shown}"
        );
    }

    fn sign(secret: &str, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(body);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    }

    #[test]
    fn signatures_are_checked() {
        let body = br#"{"id":"1"}"#;
        let good = sign("k", body);
        assert!(check_signature("k", Some(good.as_bytes()), body).is_ok());
        assert_eq!(check_signature("k", None, body).unwrap_err().status, 401);
        let other = sign("other", body);
        assert!(check_signature("k", Some(other.as_bytes()), body).is_err());
        assert!(check_signature("k", Some(b"sha256=zz"), body).is_err());
        assert!(check_signature("k", Some(b"sha1=00"), body).is_err());
        assert!(check_signature("k", Some(good.as_bytes()), b"{\"id\":\"2\"}").is_err());
    }

    #[test]
    fn ids_accept_strings_and_integers_only() {
        let ok = parse_message(br#"{"id":7,"chat":-100123,"from":"u","text":"hi"}"#).unwrap();
        assert_eq!((ok.id.as_str(), ok.chat.as_str()), ("7", "-100123"));
        for bad in [
            r#"{"id":1.5,"chat":"c","from":"u","text":"hi"}"#,
            r#"{"id":-1,"chat":"c","from":"u","text":"hi"}"#,
            r#"{"id":null,"chat":"c","from":"u","text":"hi"}"#,
            r#"{"id":"1","chat":"c","from":"u","text":"hi","id":"2"}"#,
            r#"{"id":"1","chat":"c\n","from":"u","text":"hi"}"#,
            r#"{"id":"1","chat":"c","from":"u","text":"a\u0000b"}"#,
            r#"{"id":"1","chat":"c","from":"u","text":"\ud800"}"#,
            r#"{"id":"1","chat":"c","from":"u"}"#,
            r#"{"id":"","chat":"c","from":"u","text":"hi"}"#,
        ] {
            let r = parse_message(bad.as_bytes()).unwrap_err();
            assert_eq!(r.status, 400, "{bad}: {}", r.error);
            assert!(!r.error.contains('\n'));
        }
        let unknown = parse_message(br#"{"id":"1","chat":"c","from":"u","text":"hi","x":[1]}"#);
        assert!(unknown.is_ok());
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(parse_message(deep.as_bytes()).unwrap_err().status, 400);
    }
}
