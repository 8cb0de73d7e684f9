//! A fake Telegram Bot API on 127.0.0.1 for the adapter tests: real HTTP,
//! the real wire format (`POST|GET /bot<token>/getUpdates` with offset,
//! timeout and limit; `/sendMessage`; `{"ok":true,"result":…}` and
//! `{"ok":false,"error_code":…,"description":…,"parameters":{"retry_after":N}}`).
//!
//! It keeps updates like Telegram does: `getUpdates(offset = o)` confirms
//! (forgets) every update below `o` and answers those from `o` on, at most
//! `limit`, waiting up to `timeout` seconds (long poll) for new ones. It
//! records every offset it receives and every `sendMessage` body, and plays
//! scripted faults (status codes, a reset mid-body, a hang) on the next calls.
//! Include it with `#[path = "common/telegram.rs"] mod telegram;`.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::Notify;

/// A fault played instead of a normal answer.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer with this status and body, plus a `Retry-After` header if set.
    Status(u16, Value, Option<u64>),
    /// Start a 200 answer and drop the connection mid-body.
    Reset,
    /// Accept the request and never answer.
    Hang,
    /// Answer this call normally (to aim a later fault at a later call).
    Pass,
}

impl Fault {
    /// The Bot API error envelope.
    pub fn api(code: u16, description: &str, retry_after: Option<u64>) -> Fault {
        let mut body = json!({"ok": false, "error_code": code, "description": description});
        if let Some(s) = retry_after {
            body["parameters"] = json!({ "retry_after": s });
        }
        Fault::Status(code, body, None)
    }
}

#[derive(Default)]
struct Inner {
    /// Updates not yet confirmed, in update_id order.
    queue: VecDeque<Value>,
    next_id: i64,
    /// `(token, offset)` of every getUpdates received (offset 0 = absent).
    offsets: Vec<(String, i64)>,
    /// Every sendMessage body accepted.
    sent: Vec<Value>,
    /// sendMessage requests received, accepted or not.
    send_requests: usize,
    poll_faults: VecDeque<Fault>,
    send_faults: VecDeque<Fault>,
    /// Every request path and body, to check for leaks elsewhere.
    tokens_seen: Vec<String>,
    /// getMe calls received, and faults to play on them.
    me_calls: usize,
    me_faults: VecDeque<Fault>,
    /// Every answerCallbackQuery body, and faults to play on them.
    callback_answers: Vec<Value>,
    callback_faults: VecDeque<Fault>,
    /// Every sendMessage body received, accepted or not.
    send_attempts: Vec<Value>,
    /// Groups upgraded to supergroups: sends to the old id answer 400 with
    /// `parameters.migrate_to_chat_id`, as Telegram does.
    migrated: std::collections::HashMap<i64, i64>,
    /// Chats that removed the bot: sends answer 403, as Telegram does.
    blocked: std::collections::HashSet<i64>,
}

pub struct FakeTelegram {
    /// The `api_base` to configure.
    pub url: String,
    inner: Arc<Mutex<Inner>>,
    notify: Arc<Notify>,
    handle: actix_web::dev::ServerHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn param(req: &actix_web::HttpRequest, body: &Value, name: &str) -> Option<i64> {
    if let Some(v) = body.get(name).and_then(Value::as_i64) {
        return Some(v);
    }
    let q = req.query_string();
    q.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| v.parse().ok()).flatten()
    })
}

fn fault_response(f: Fault) -> Option<actix_web::HttpResponse> {
    use actix_web::HttpResponse;
    match f {
        Fault::Status(code, body, header) => {
            let mut r = HttpResponse::build(
                actix_web::http::StatusCode::from_u16(code).expect("status code"),
            );
            if let Some(s) = header {
                r.insert_header(("Retry-After", s.to_string()));
            }
            Some(r.json(body))
        }
        Fault::Reset => {
            let chunks = futures::stream::iter(vec![
                Ok::<_, std::io::Error>(actix_web::web::Bytes::from_static(b"{\"ok\":true,\"res")),
                Err(std::io::Error::other("reset")),
            ]);
            Some(
                HttpResponse::Ok()
                    .content_type("application/json")
                    .streaming(chunks),
            )
        }
        Fault::Hang | Fault::Pass => None,
    }
}

impl FakeTelegram {
    /// Starts the server on a free port in its own thread and actix system.
    pub fn start() -> FakeTelegram {
        use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake telegram");
        let url = format!(
            "http://127.0.0.1:{}",
            listener.local_addr().expect("addr").port()
        );
        let inner: Arc<Mutex<Inner>> = Arc::new(Mutex::new(Inner {
            next_id: 1000,
            ..Inner::default()
        }));
        let notify = Arc::new(Notify::new());
        let (tx, rx) = std::sync::mpsc::channel();
        let (i2, n2) = (inner.clone(), notify.clone());
        let thread = std::thread::spawn(move || {
            let system = actix_web::rt::System::new();
            system.block_on(async move {
                let server = HttpServer::new(move || {
                    let inner = i2.clone();
                    let notify = n2.clone();
                    App::new().default_service(web::to(
                        move |req: HttpRequest, body: web::Bytes| {
                            let inner = inner.clone();
                            let notify = notify.clone();
                            async move { handle(req, body, inner, notify).await }
                        },
                    ))
                })
                .workers(2)
                .disable_signals()
                .shutdown_timeout(1)
                .listen(listener)
                .expect("listen fake telegram")
                .run();
                tx.send(server.handle()).expect("send handle");
                let _ = server.await;
            });
        });
        let handle = rx.recv().expect("fake telegram started");
        return FakeTelegram {
            url,
            inner,
            notify,
            handle,
            thread: Some(thread),
        };

        async fn handle(
            req: HttpRequest,
            body: web::Bytes,
            inner: Arc<Mutex<Inner>>,
            notify: Arc<Notify>,
        ) -> HttpResponse {
            let path = req.path().to_string();
            let Some((token, method)) = path
                .strip_prefix("/bot")
                .and_then(|rest| rest.split_once('/'))
            else {
                return HttpResponse::NotFound()
                    .json(json!({"ok": false, "error_code": 404, "description": "Not Found"}));
            };
            let (token, method) = (token.to_string(), method.to_string());
            let body: Value = serde_json::from_slice(&body).unwrap_or(json!({}));
            match method.as_str() {
                "getUpdates" => {
                    let offset = param(&req, &body, "offset").unwrap_or(0);
                    let timeout = param(&req, &body, "timeout").unwrap_or(0).clamp(0, 60);
                    let limit = param(&req, &body, "limit").unwrap_or(100).clamp(1, 100) as usize;
                    let fault = {
                        let mut g = inner.lock().unwrap();
                        g.offsets.push((token, offset));
                        // An offset confirms everything below it.
                        if offset > 0 {
                            while g
                                .queue
                                .front()
                                .and_then(|u| u["update_id"].as_i64())
                                .is_some_and(|id| id < offset)
                            {
                                g.queue.pop_front();
                            }
                        }
                        g.poll_faults.pop_front()
                    };
                    if let Some(f) = fault {
                        return match fault_response(f) {
                            Some(r) => r,
                            None => std::future::pending().await,
                        };
                    }
                    let end = tokio::time::Instant::now() + Duration::from_secs(timeout as u64);
                    loop {
                        let wait = notify.notified();
                        tokio::pin!(wait);
                        wait.as_mut().enable();
                        let batch: Vec<Value> = {
                            let g = inner.lock().unwrap();
                            g.queue
                                .iter()
                                .filter(|u| u["update_id"].as_i64().unwrap_or(0) >= offset)
                                .take(limit)
                                .cloned()
                                .collect()
                        };
                        if !batch.is_empty() || tokio::time::Instant::now() >= end {
                            return HttpResponse::Ok().json(json!({"ok": true, "result": batch}));
                        }
                        let _ = tokio::time::timeout_at(end, wait).await;
                    }
                }
                "getMe" => {
                    let fault = {
                        let mut g = inner.lock().unwrap();
                        g.me_calls += 1;
                        g.me_faults.pop_front()
                    };
                    if let Some(f) = fault {
                        return match fault_response(f) {
                            Some(r) => r,
                            None => std::future::pending().await,
                        };
                    }
                    HttpResponse::Ok().json(json!({"ok": true, "result": {
                        "id": 999, "is_bot": true, "first_name": "Keel",
                        "username": "KeelTestBot", "can_join_groups": true,
                        "can_read_all_group_messages": false, "supports_inline_queries": false}}))
                }
                "answerCallbackQuery" => {
                    let fault = {
                        let mut g = inner.lock().unwrap();
                        g.callback_answers.push(body.clone());
                        g.callback_faults.pop_front()
                    };
                    if let Some(f) = fault {
                        return match fault_response(f) {
                            Some(r) => r,
                            None => std::future::pending().await,
                        };
                    }
                    HttpResponse::Ok().json(json!({"ok": true, "result": true}))
                }
                "sendMessage" => {
                    let fault = {
                        let mut g = inner.lock().unwrap();
                        g.send_requests += 1;
                        g.send_attempts.push(body.clone());
                        let chat = body["chat_id"].as_i64().unwrap_or(0);
                        if let Some(to) = g.migrated.get(&chat) {
                            return HttpResponse::BadRequest().json(json!({"ok": false,
                                "error_code": 400,
                                "description": "Bad Request: group chat was upgraded to a supergroup chat",
                                "parameters": {"migrate_to_chat_id": to}}));
                        }
                        if g.blocked.contains(&chat) {
                            return HttpResponse::Forbidden().json(json!({"ok": false,
                                "error_code": 403,
                                "description": "Forbidden: bot was kicked from the chat"}));
                        }
                        g.send_faults.pop_front()
                    };
                    if let Some(f) = fault.filter(|f| !matches!(f, Fault::Pass)) {
                        return match fault_response(f) {
                            Some(r) => r,
                            None => std::future::pending().await,
                        };
                    }
                    let mut g = inner.lock().unwrap();
                    g.sent.push(body.clone());
                    let id = g.sent.len();
                    HttpResponse::Ok().json(json!({"ok": true, "result": {
                        "message_id": id, "chat": {"id": body["chat_id"]}, "text": body["text"]}}))
                }
                _ => HttpResponse::NotFound()
                    .json(json!({"ok": false, "error_code": 404, "description": "Not Found"})),
            }
        }
    }

    /// Queue a text message from `chat`; returns its update_id.
    pub fn push_text(&self, chat: i64, text: &str) -> i64 {
        let mut g = self.inner.lock().unwrap();
        let id = g.next_id;
        g.next_id += 1;
        g.queue.push_back(json!({
            "update_id": id,
            "message": {"message_id": id, "date": 0, "chat": {"id": chat, "type": "private"},
                        "from": {"id": chat, "is_bot": false, "first_name": "t"}, "text": text}
        }));
        drop(g);
        self.notify.notify_waiters();
        id
    }

    /// Queue an arbitrary update (its update_id is set here); returns the id.
    pub fn push_raw(&self, mut update: Value) -> i64 {
        let mut g = self.inner.lock().unwrap();
        let id = g.next_id;
        g.next_id += 1;
        update["update_id"] = json!(id);
        g.queue.push_back(update);
        drop(g);
        self.notify.notify_waiters();
        id
    }

    /// Queue an update exactly as given (its own update_id; the next ids
    /// continue after it).
    pub fn push_exact(&self, update: Value) -> i64 {
        let mut g = self.inner.lock().unwrap();
        let id = update["update_id"].as_i64().expect("update_id");
        g.next_id = g.next_id.max(id + 1);
        g.queue.push_back(update);
        drop(g);
        self.notify.notify_waiters();
        id
    }

    /// Play these faults on the next getMe calls.
    pub fn fail_me(&self, faults: impl IntoIterator<Item = Fault>) {
        self.inner.lock().unwrap().me_faults.extend(faults);
    }

    pub fn me_calls(&self) -> usize {
        self.inner.lock().unwrap().me_calls
    }

    /// Play these faults on the next answerCallbackQuery calls.
    pub fn fail_callbacks(&self, faults: impl IntoIterator<Item = Fault>) {
        self.inner.lock().unwrap().callback_faults.extend(faults);
    }

    /// Every answerCallbackQuery body received (answered or failed).
    pub fn callback_answers(&self) -> Vec<Value> {
        self.inner.lock().unwrap().callback_answers.clone()
    }

    /// Play these faults on the next getUpdates calls.
    pub fn fail_polls(&self, faults: impl IntoIterator<Item = Fault>) {
        self.inner.lock().unwrap().poll_faults.extend(faults);
    }

    /// Play these faults on the next sendMessage calls.
    pub fn fail_sends(&self, faults: impl IntoIterator<Item = Fault>) {
        self.inner.lock().unwrap().send_faults.extend(faults);
    }

    pub fn poll_faults_left(&self) -> usize {
        self.inner.lock().unwrap().poll_faults.len()
    }

    /// Offsets received with getUpdates, in order (0 = no offset sent).
    pub fn offsets(&self) -> Vec<i64> {
        self.inner
            .lock()
            .unwrap()
            .offsets
            .iter()
            .map(|(_, o)| *o)
            .collect()
    }

    /// `(token, offset)` of every getUpdates.
    pub fn polls(&self) -> Vec<(String, i64)> {
        self.inner.lock().unwrap().offsets.clone()
    }

    /// Every accepted sendMessage body.
    pub fn sent(&self) -> Vec<Value> {
        self.inner.lock().unwrap().sent.clone()
    }

    /// Every sendMessage body received (accepted, failed or refused).
    pub fn send_attempts(&self) -> Vec<Value> {
        self.inner.lock().unwrap().send_attempts.clone()
    }

    /// Forget the faults not played yet on sendMessage.
    pub fn clear_send_faults(&self) {
        self.inner.lock().unwrap().send_faults.clear();
    }

    /// The group `old` became supergroup `new`: sends to `old` answer 400
    /// with `migrate_to_chat_id`.
    pub fn migrate(&self, old: i64, new: i64) {
        self.inner.lock().unwrap().migrated.insert(old, new);
    }

    /// The bot was removed from `chat` (`true`) or is back (`false`):
    /// sends there answer 403 while removed.
    pub fn set_blocked(&self, chat: i64, blocked: bool) {
        let mut g = self.inner.lock().unwrap();
        if blocked {
            g.blocked.insert(chat);
        } else {
            g.blocked.remove(&chat);
        }
    }

    pub fn send_requests(&self) -> usize {
        self.inner.lock().unwrap().send_requests
    }

    /// Updates not confirmed yet.
    pub fn unconfirmed(&self) -> usize {
        self.inner.lock().unwrap().queue.len()
    }
}

impl Drop for FakeTelegram {
    fn drop(&mut self) {
        let stop = self.handle.stop(false);
        futures::executor::block_on(stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The `[telegram]` section (and a fast `[adapters]` policy) for a daemon.
pub fn config_toml(api_base: &str, token: &str, extra: &str) -> String {
    format!(
        "\n[telegram]\nenabled = true\napi_base = {}\ntoken = {}\npoll_timeout_s = 1\nrequest_margin_s = 1\n{extra}",
        serde_json::to_string(api_base).unwrap(),
        serde_json::to_string(token).unwrap(),
    )
}
