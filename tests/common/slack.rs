//! A fake Slack on 127.0.0.1 for the Socket Mode tests: real HTTP for the
//! Web API (`POST /apps.connections.open` → `{"ok":true,"url":"ws://…"}`,
//! `POST /chat.postMessage`, `POST /auth.test` → keel's own ids
//! [`BOT_USER`] / [`BOT_ID`]) and a real WebSocket server speaking Socket
//! Mode (`hello`, `events_api` envelopes, `{"envelope_id"}` acks,
//! `disconnect`). Each new socket plays the next scripted [`Socket`]
//! behaviour. On every ack it asks the daemon, right then, whether the
//! acknowledged event's turn is already stored ("ack only after durable").
//! Raw frames ([`FakeSlack::push_raw`], hostile input) are sent once, on
//! the first socket that is up, and never resent.
//! Include it with `#[path = "common/slack.rs"] mod slack;`.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

/// keel's own bot user, as `auth.test` tells it.
pub const BOT_USER: &str = "UKEEL";
/// keel's own bot id, as `auth.test` tells it.
pub const BOT_ID: &str = "BKEEL";

/// How one accepted socket behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Socket {
    /// hello, then every pending envelope; records acks.
    Normal,
    /// Connected but never says anything (a "ghost" socket).
    Silent,
    /// hello, then `disconnect` (Slack rotating the socket).
    Disconnect,
}

/// One ack received: which socket, which envelope, and whether the daemon
/// already had the turn stored when the ack arrived.
#[derive(Clone, Debug)]
pub struct Ack {
    pub socket: usize,
    pub envelope_id: String,
    pub stored_at_ack: bool,
}

#[derive(Default)]
struct Inner {
    script: VecDeque<Socket>,
    opens: usize,
    sockets: usize,
    /// Envelopes not acked yet: (envelope_id, event_id, channel, envelope).
    pending: Vec<(String, String, String, Value)>,
    acks: Vec<Ack>,
    posts: Vec<Value>,
    /// Raw frames to send once each, and how many were sent.
    raw: Vec<String>,
    raw_sent: usize,
    auth_tests: usize,
    /// Base URL of the daemon, for the stored-at-ack check.
    daemon: Option<String>,
    next: u64,
}

pub struct FakeSlack {
    pub api_base: String,
    inner: Arc<Mutex<Inner>>,
    notify: Arc<Notify>,
    http: actix_web::dev::ServerHandle,
    threads: Vec<std::thread::JoinHandle<()>>,
    ws_stop: Arc<Notify>,
}

async fn stored(daemon: &str, channel: &str, event_id: &str) -> bool {
    let url = format!("{daemon}/v1/sessions/slack:{channel}/turns");
    let Ok(r) = reqwest::get(url).await else {
        return false;
    };
    let v: Value = r.json().await.unwrap_or(Value::Null);
    v["turns"]
        .as_array()
        .is_some_and(|t| t.iter().any(|t| t["key"] == event_id))
}

async fn serve_socket(
    stream: tokio::net::TcpStream,
    n: usize,
    mode: Socket,
    inner: Arc<Mutex<Inner>>,
    notify: Arc<Notify>,
) {
    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    if mode == Socket::Silent {
        // Read (and drop) whatever comes until the client gives up.
        while let Some(Ok(_)) = ws.next().await {}
        return;
    }
    let hello = json!({"type": "hello", "num_connections": 1});
    if ws.send(Message::text(hello.to_string())).await.is_err() {
        return;
    }
    if mode == Socket::Disconnect {
        let bye = json!({"type": "disconnect", "reason": "refresh_requested"});
        let _ = ws.send(Message::text(bye.to_string())).await;
        while let Some(Ok(_)) = ws.next().await {}
        return;
    }
    let mut sent: Vec<String> = Vec::new();
    loop {
        let wake = notify.notified();
        tokio::pin!(wake);
        wake.as_mut().enable();
        let out: Vec<(String, String)> = {
            let mut g = inner.lock().unwrap();
            let mut out: Vec<(String, String)> = g.raw[g.raw_sent..]
                .iter()
                .map(|f| (String::new(), f.clone()))
                .collect();
            g.raw_sent = g.raw.len();
            out.extend(
                g.pending
                    .iter()
                    .filter(|(id, ..)| !sent.contains(id))
                    .map(|(id, _, _, env)| (id.clone(), env.to_string())),
            );
            out
        };
        for (id, env) in out {
            if ws.send(Message::text(env)).await.is_err() {
                return;
            }
            if !id.is_empty() {
                sent.push(id);
            }
        }
        tokio::select! {
            _ = &mut wake => {}
            frame = ws.next() => {
                let Some(Ok(frame)) = frame else { return };
                let Message::Text(t) = frame else { continue };
                let Ok(v) = serde_json::from_str::<Value>(t.as_str()) else { continue };
                let Some(env_id) = v["envelope_id"].as_str().map(str::to_string) else { continue };
                let (daemon, target) = {
                    let g = inner.lock().unwrap();
                    let target = g.pending.iter().find(|(id, ..)| *id == env_id)
                        .map(|(_, ev, ch, _)| (ev.clone(), ch.clone()));
                    (g.daemon.clone(), target)
                };
                let stored_at_ack = match (daemon, &target) {
                    (Some(d), Some((ev, ch))) => stored(&d, ch, ev).await,
                    _ => false,
                };
                let mut g = inner.lock().unwrap();
                // One ack settles one delivery of that envelope.
                if let Some(i) = g.pending.iter().position(|(id, ..)| *id == env_id) {
                    g.pending.remove(i);
                }
                g.acks.push(Ack { socket: n, envelope_id: env_id, stored_at_ack });
            }
        }
    }
}

impl FakeSlack {
    pub fn start() -> FakeSlack {
        use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
        let inner: Arc<Mutex<Inner>> = Arc::default();
        let notify = Arc::new(Notify::new());
        let ws_stop = Arc::new(Notify::new());
        // WebSocket side.
        let ws_listener = TcpListener::bind("127.0.0.1:0").expect("bind ws");
        ws_listener.set_nonblocking(true).expect("nonblocking");
        let ws_url = format!("ws://{}/link", ws_listener.local_addr().unwrap());
        let (i2, n2, stop2) = (inner.clone(), notify.clone(), ws_stop.clone());
        let ws_thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(ws_listener).expect("listener");
                loop {
                    tokio::select! {
                        _ = stop2.notified() => return,
                        acc = listener.accept() => {
                            let Ok((stream, _)) = acc else { continue };
                            let (n, mode) = {
                                let mut g = i2.lock().unwrap();
                                g.sockets += 1;
                                (g.sockets, g.script.pop_front().unwrap_or(Socket::Normal))
                            };
                            tokio::spawn(serve_socket(stream, n, mode, i2.clone(), n2.clone()));
                        }
                    }
                }
            });
        });
        // Web API side.
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind slack api");
        let api_base = format!("http://{}", listener.local_addr().unwrap());
        let i3 = inner.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let http_thread = std::thread::spawn(move || {
            let system = actix_web::rt::System::new();
            system.block_on(async move {
                let server = HttpServer::new(move || {
                    let inner = i3.clone();
                    let ws_url = ws_url.clone();
                    App::new().default_service(web::to(
                        move |req: HttpRequest, body: web::Bytes| {
                            let inner = inner.clone();
                            let ws_url = ws_url.clone();
                            async move {
                                let auth = req
                                    .headers()
                                    .get("authorization")
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("")
                                    .to_string();
                                let mut g = inner.lock().unwrap();
                                match req.path() {
                                    "/apps.connections.open"
                                        if auth.starts_with("Bearer xapp-") =>
                                    {
                                        g.opens += 1;
                                        HttpResponse::Ok().json(json!({"ok": true, "url": ws_url}))
                                    }
                                    "/auth.test" if auth.starts_with("Bearer xoxb-") => {
                                        g.auth_tests += 1;
                                        HttpResponse::Ok().json(json!({"ok": true,
                                            "url": "https://fake.slack.com/", "team": "Fake",
                                            "user": "keel", "team_id": "T1",
                                            "user_id": BOT_USER, "bot_id": BOT_ID}))
                                    }
                                    "/chat.postMessage" if auth.starts_with("Bearer xoxb-") => {
                                        g.posts.push(
                                            serde_json::from_slice(&body).unwrap_or(Value::Null),
                                        );
                                        HttpResponse::Ok().json(json!({"ok": true}))
                                    }
                                    _ => HttpResponse::Ok()
                                        .json(json!({"ok": false, "error": "invalid_auth"})),
                                }
                            }
                        },
                    ))
                })
                .workers(1)
                .disable_signals()
                .listen(listener)
                .expect("listen slack api")
                .run();
                tx.send(server.handle()).expect("send handle");
                let _ = server.await;
            });
        });
        let http = rx.recv().expect("slack api started");
        FakeSlack {
            api_base,
            inner,
            notify,
            http,
            threads: vec![ws_thread, http_thread],
            ws_stop,
        }
    }

    /// The next sockets behave like this (then `Normal`).
    pub fn script(&self, sockets: impl IntoIterator<Item = Socket>) {
        self.inner.lock().unwrap().script.extend(sockets);
    }

    /// Where to check "stored at ack time".
    pub fn set_daemon(&self, base: &str) {
        self.inner.lock().unwrap().daemon = Some(base.to_string());
    }

    /// Queue an `events_api` envelope with a user message; returns its
    /// envelope id. The same `event_id` may be sent again (Slack's retry).
    pub fn push_message(&self, event_id: &str, channel: &str, text: &str) -> String {
        let ts = self.next_ts();
        self.push_event(
            event_id,
            json!({"type": "message", "channel": channel, "user": "U1", "text": text, "ts": ts}),
            0,
        )
    }

    /// A fresh message `ts` (`1700000000.000N`).
    pub fn next_ts(&self) -> String {
        let mut g = self.inner.lock().unwrap();
        g.next += 1;
        format!("1700000000.{:06}", g.next)
    }

    /// Queue an `events_api` envelope carrying `event` (its `channel` is
    /// where the stored-at-ack check looks); `retry_attempt` > 0 is Slack
    /// redelivering. Returns the envelope id.
    pub fn push_event(&self, event_id: &str, event: Value, retry_attempt: u32) -> String {
        let mut g = self.inner.lock().unwrap();
        g.next += 1;
        let env_id = format!("env-{}", g.next);
        let channel = event["channel"].as_str().unwrap_or("").to_string();
        let envelope = json!({
            "envelope_id": env_id,
            "type": "events_api",
            "accepts_response_payload": false,
            "retry_attempt": retry_attempt,
            "retry_reason": if retry_attempt > 0 { "timeout" } else { "" },
            "payload": {
                "token": "verification-token-unused",
                "team_id": "T1",
                "api_app_id": "A1",
                "event_id": event_id,
                "event_time": 1_700_000_000,
                "type": "event_callback",
                "event": event,
            }
        });
        g.pending
            .push((env_id.clone(), event_id.to_string(), channel, envelope));
        drop(g);
        self.notify.notify_waiters();
        env_id
    }

    /// Send this text frame once, as is (hostile input); it is never
    /// resent, acked or not.
    pub fn push_raw(&self, frame: String) {
        self.inner.lock().unwrap().raw.push(frame);
        self.notify.notify_waiters();
    }

    /// How many `auth.test` calls came in.
    pub fn auth_tests(&self) -> usize {
        self.inner.lock().unwrap().auth_tests
    }

    pub fn acks(&self) -> Vec<Ack> {
        self.inner.lock().unwrap().acks.clone()
    }

    /// How many acks came in (cheaper than [`FakeSlack::acks`] for many).
    #[allow(dead_code)]
    pub fn ack_count(&self) -> usize {
        self.inner.lock().unwrap().acks.len()
    }

    pub fn opens(&self) -> usize {
        self.inner.lock().unwrap().opens
    }

    pub fn posts(&self) -> Vec<Value> {
        self.inner.lock().unwrap().posts.clone()
    }
}

impl Drop for FakeSlack {
    fn drop(&mut self) {
        self.ws_stop.notify_one();
        futures::executor::block_on(self.http.stop(false));
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The `[slack]` section for a daemon.
pub fn config_toml(api_base: &str, app_token: &str, bot_token: &str, silence_s: u64) -> String {
    format!(
        "\n[slack]\nenabled = true\napi_base = {}\napp_token = {}\nbot_token = {}\nsilence_timeout_s = {silence_s}\n",
        serde_json::to_string(api_base).unwrap(),
        serde_json::to_string(app_token).unwrap(),
        serde_json::to_string(bot_token).unwrap(),
    )
}
