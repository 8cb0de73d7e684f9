//! A fake Slack for `keel torture` (and any later `keel bench slack`): the
//! Web API over real HTTP (`POST /auth.test` and `/chat.postMessage` with
//! the bot token, `/apps.connections.open` with the app token →
//! `{"ok":true,"url":"ws://127.0.0.1:PORT/link"}`) and a real WebSocket
//! server speaking Socket Mode: `hello`, `events_api` envelopes, acks by
//! `envelope_id`, a ping every second. It runs in a thread and runtime of
//! its own, so it outlives every keel restart.
//!
//! A feeder queues direct-message events `/recall sl-<n>` (unique
//! `event_id` each) across a few DM channels, also while keel is down.
//! Every socket gets every event not acked yet that it has not sent; an
//! envelope that was sent on a socket which died before its ack goes out
//! again on the next socket as a new envelope with `retry_attempt` + 1, as
//! Slack redelivers. An event is acknowledged once one of its envelopes is.

use std::collections::{BTreeSet, HashMap};
use std::net::TcpListener;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, Result};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

use crate::fake_http::{read_request, tag_in, write_json, Fake, FakeLedger, Fed, Upstream};

/// How often the feeder queues events.
const FEED_EVERY: Duration = Duration::from_millis(100);
/// How often a socket pings keel (Slack pings too; keel counts it as life).
const PING_EVERY: Duration = Duration::from_secs(1);
/// The DM channels the feeder writes in.
const CHANNELS: [&str; 3] = ["DTORT1", "DTORT2", "DTORT3"];

/// One event fed.
#[derive(Debug)]
struct Event {
    channel: &'static str,
    /// Envelopes sent so far (the next one's `retry_attempt`).
    sent: u32,
    acked: bool,
}

/// What the fake saw, and the events keel has not acknowledged yet.
#[derive(Debug)]
pub struct SlackLedger {
    events: Vec<Event>,
    /// Indexes of the events not acked yet (what a new socket sends first).
    unacked: BTreeSet<usize>,
    /// Event index of every envelope sent.
    envelopes: HashMap<String, usize>,
    /// Replies per tag (`sl-N`) that went to event N's channel.
    replies: HashMap<String, u64>,
    stray_replies: u64,
    redelivered: u64,
    /// chat.postMessage calls accepted (each gets a `ts` of its own).
    posts: u64,
    feeding: bool,
    /// After the final check: no envelopes go out and nothing is recorded.
    frozen: bool,
}

impl Default for SlackLedger {
    fn default() -> SlackLedger {
        SlackLedger {
            events: Vec::new(),
            unacked: BTreeSet::new(),
            envelopes: HashMap::new(),
            replies: HashMap::new(),
            stray_replies: 0,
            redelivered: 0,
            posts: 0,
            feeding: true,
            frozen: false,
        }
    }
}

fn event_id(n: usize) -> String {
    format!("EvTORT{n:08}")
}

impl SlackLedger {
    /// Queues a DM event in `channel`; its index.
    pub fn push(&mut self, channel: &'static str) -> usize {
        self.events.push(Event {
            channel,
            sent: 0,
            acked: false,
        });
        self.unacked.insert(self.events.len() - 1);
        self.events.len() - 1
    }

    /// The indexes of the events a socket sends now; `seen` is how many
    /// events it has considered before (`None`: it just opened). A new
    /// socket sends every event not acked yet; later it sends only events
    /// queued since (each socket sends an event once).
    fn due(&self, seen: &mut Option<usize>) -> Vec<usize> {
        if self.frozen {
            return Vec::new();
        }
        let due: Vec<usize> = match *seen {
            None => self.unacked.iter().copied().collect(),
            Some(from) => (from..self.events.len())
                .filter(|i| !self.events[*i].acked)
                .collect(),
        };
        *seen = Some(self.events.len());
        due
    }

    /// The next envelope of event `n` (a redelivery if one went out before).
    pub fn envelope(&mut self, n: usize) -> Value {
        let e = &mut self.events[n];
        let attempt = e.sent;
        e.sent += 1;
        let (channel, ts) = (e.channel, format!("1700000000.{n:06}"));
        if attempt > 0 {
            self.redelivered += 1;
        }
        let envelope_id = format!("env-{n}-{attempt}");
        self.envelopes.insert(envelope_id.clone(), n);
        json!({
            "envelope_id": envelope_id,
            "type": "events_api",
            "accepts_response_payload": false,
            "retry_attempt": attempt,
            "retry_reason": if attempt > 0 { "timeout" } else { "" },
            "payload": {
                "team_id": "TTORT", "api_app_id": "ATORT",
                "event_id": event_id(n), "event_time": 1_700_000_000,
                "type": "event_callback",
                "event": {"type": "message", "channel": channel, "channel_type": "im",
                          "user": "UTORT", "text": format!("/recall sl-{n}"), "ts": ts},
            }
        })
    }

    /// keel acked `envelope_id`; whether it was one the fake sent.
    pub fn ack(&mut self, envelope_id: &str) -> bool {
        if self.frozen {
            return false;
        }
        match self.envelopes.get(envelope_id) {
            Some(&n) => {
                self.events[n].acked = true;
                self.unacked.remove(&n);
                true
            }
            None => false,
        }
    }

    /// A chat.postMessage to `channel` with `text` was accepted; its `ts`.
    pub fn posted(&mut self, channel: &str, text: &str) -> String {
        self.posts += 1;
        let event = tag_in(text, "sl-").and_then(|t| Some((t, t[3..].parse::<usize>().ok()?)));
        match event {
            Some((tag, n)) if self.events.get(n).is_some_and(|e| e.channel == channel) => {
                *self.replies.entry(tag.to_string()).or_insert(0) += 1;
            }
            _ => self.stray_replies += 1,
        }
        format!("1800000000.{:06}", self.posts)
    }

    /// The ledger for the final check.
    pub fn upstream(&self) -> Upstream {
        Upstream {
            fed: self
                .events
                .iter()
                .enumerate()
                .map(|(n, e)| Fed {
                    key: event_id(n),
                    tag: format!("sl-{n}"),
                    acked: e.acked,
                })
                .collect(),
            replies: self.replies.clone(),
            stray_replies: self.stray_replies,
            offset_regressions: 0,
            redelivered: self.redelivered,
        }
    }
}

/// The fake Slack (Web API and Socket Mode) and its feeder, running until dropped.
impl FakeLedger for SlackLedger {
    fn flags(&mut self) -> (&mut bool, &mut bool) {
        (&mut self.feeding, &mut self.frozen)
    }

    fn upstream(&self) -> Upstream {
        SlackLedger::upstream(self)
    }
}

pub type FakeSlack = Fake<SlackLedger>;

/// The two tokens keel must present.
#[derive(Clone)]
struct Tokens {
    app: String,
    bot: String,
    ws_url: String,
}

impl Fake<SlackLedger> {
    /// Serves Slack for `app_token` / `bot_token` on free loopback ports,
    /// queueing `per_tick` events every 100 ms until [`FakeSlack::stop_feeding`].
    pub fn start(app_token: &str, bot_token: &str, per_tick: usize) -> Result<FakeSlack> {
        let bind = || {
            TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .context("cannot bind the fake Slack")
        };
        let (api, ws) = (bind()?, bind()?);
        let addr = |l: &TcpListener| l.local_addr().context("cannot bind the fake Slack");
        let api_base = format!("http://{}", addr(&api)?);
        let tokens = Tokens {
            app: format!("Bearer {app_token}"),
            bot: format!("Bearer {bot_token}"),
            ws_url: format!("ws://{}/link", addr(&ws)?),
        };
        let runtime = crate::messages::runtime()?;
        let ledger = Arc::new(Mutex::new(SlackLedger::default()));
        let stop = Arc::new(Notify::new());
        let (l2, s2) = (ledger.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("fake-slack".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let (Ok(api), Ok(ws)) = (
                        tokio::net::TcpListener::from_std(api),
                        tokio::net::TcpListener::from_std(ws),
                    ) else {
                        return;
                    };
                    let queued = Arc::new(Notify::new());
                    tokio::select! {
                        _ = s2.notified() => {}
                        _ = feed(l2.clone(), queued.clone(), per_tick) => {}
                        _ = serve_api(api, l2.clone(), tokens) => {}
                        _ = serve_sockets(ws, l2, queued) => {}
                    }
                });
            })
            .context("cannot start the fake Slack")?;
        Ok(Fake::new(api_base, ledger, stop, thread))
    }
}

fn lock(ledger: &Mutex<SlackLedger>) -> MutexGuard<'_, SlackLedger> {
    ledger.lock().unwrap_or_else(|p| p.into_inner())
}

/// Queues `per_tick` events every [`FEED_EVERY`] while feeding.
async fn feed(ledger: Arc<Mutex<SlackLedger>>, queued: Arc<Notify>, per_tick: usize) {
    let mut tick = tokio::time::interval(FEED_EVERY);
    let mut channel = 0usize;
    loop {
        tick.tick().await;
        {
            let mut l = lock(&ledger);
            if !l.feeding {
                continue;
            }
            for _ in 0..per_tick {
                l.push(CHANNELS[channel % CHANNELS.len()]);
                channel += 1;
            }
        }
        queued.notify_waiters();
    }
}

async fn serve_api(
    listener: tokio::net::TcpListener,
    ledger: Arc<Mutex<SlackLedger>>,
    tokens: Tokens,
) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            continue;
        };
        let (ledger, tokens) = (ledger.clone(), tokens.clone());
        tokio::spawn(async move {
            let _ = api_connection(sock, &ledger, &tokens).await;
        });
    }
}

/// One keep-alive connection of keel's Web API client.
async fn api_connection(
    mut sock: TcpStream,
    ledger: &Mutex<SlackLedger>,
    tokens: &Tokens,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    while let Some(req) = read_request(&mut sock, &mut buf).await? {
        let bot = req.authorization == tokens.bot;
        let body = match req.path.as_str() {
            "/apps.connections.open" if req.authorization == tokens.app => {
                json!({"ok": true, "url": tokens.ws_url})
            }
            "/auth.test" if bot => json!({"ok": true, "url": "https://torture.slack.invalid/",
                "team": "Torture", "user": "keel", "team_id": "TTORT",
                "user_id": "UKEEL", "bot_id": "BKEEL"}),
            "/chat.postMessage" if bot => {
                let channel = req.body["channel"].as_str().unwrap_or("").to_string();
                let text = req.body["text"].as_str().unwrap_or("");
                let mut l = lock(ledger);
                let ts = if l.frozen {
                    "1800000000.000000".to_string()
                } else {
                    l.posted(&channel, text)
                };
                json!({"ok": true, "channel": channel, "ts": ts})
            }
            _ => json!({"ok": false, "error": "invalid_auth"}),
        };
        write_json(&mut sock, 200, &body).await?;
    }
    Ok(())
}

async fn serve_sockets(
    listener: tokio::net::TcpListener,
    ledger: Arc<Mutex<SlackLedger>>,
    queued: Arc<Notify>,
) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            continue;
        };
        let (ledger, queued) = (ledger.clone(), queued.clone());
        tokio::spawn(async move {
            let _ = socket(sock, &ledger, &queued).await;
        });
    }
}

/// One Socket Mode connection: hello, then every due envelope, acks
/// recorded, until keel goes away.
async fn socket(
    stream: TcpStream,
    ledger: &Mutex<SlackLedger>,
    queued: &Notify,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    let mut ws = tokio_tungstenite::accept_async(stream).await?;
    let hello = json!({"type": "hello", "num_connections": 1});
    ws.send(Message::text(hello.to_string())).await?;
    let mut seen = None;
    let mut ping = tokio::time::interval(PING_EVERY);
    loop {
        let wake = queued.notified();
        tokio::pin!(wake);
        wake.as_mut().enable();
        let out: Vec<Value> = {
            let mut l = lock(ledger);
            let due = l.due(&mut seen);
            due.into_iter().map(|n| l.envelope(n)).collect()
        };
        for envelope in out {
            ws.send(Message::text(envelope.to_string())).await?;
        }
        tokio::select! {
            _ = &mut wake => {}
            _ = ping.tick() => ws.send(Message::Ping(Vec::new().into())).await?,
            frame = ws.next() => {
                let Some(frame) = frame else { return Ok(()) };
                if let Message::Text(t) = frame? {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
                    if let Some(id) = v["envelope_id"].as_str() {
                        lock(ledger).ack(id);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The next text frame of a socket, as JSON.
    async fn next_json<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> Value
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        loop {
            match ws.next().await.unwrap().unwrap() {
                Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
                _ => continue,
            }
        }
    }

    #[test]
    fn the_fake_speaks_socket_mode_and_redelivers_on_the_next_socket() {
        let fake = FakeSlack::start("xapp-a", "xoxb-b", 1).unwrap();
        let http = reqwest::Client::new();
        let api = |path: &str, token: &str, body: Value| {
            let req = http
                .post(format!("{}/{path}", fake.api_base))
                .bearer_auth(token)
                .json(&body);
            async move { req.send().await.unwrap().json::<Value>().await.unwrap() }
        };
        crate::messages::runtime().unwrap().block_on(async {
            let open = api("apps.connections.open", "xapp-a", json!({})).await;
            let url = open["url"].as_str().unwrap().to_string();
            let refused = api("apps.connections.open", "xoxb-b", json!({})).await;
            assert_eq!(refused["error"], "invalid_auth");
            let connect = || async {
                let addr = url.trim_start_matches("ws://").trim_end_matches("/link");
                let tcp = TcpStream::connect(addr).await.unwrap();
                let (mut ws, _) = tokio_tungstenite::client_async(url.as_str(), tcp)
                    .await
                    .unwrap();
                assert_eq!(next_json(&mut ws).await["type"], "hello");
                ws
            };
            // The first socket gets an envelope and dies without its ack.
            let mut ws = connect().await;
            let first = next_json(&mut ws).await;
            assert_eq!(first["retry_attempt"], 0, "{first}");
            drop(ws);
            // The next socket gets the same event again, retry_attempt 1.
            let mut ws = connect().await;
            let again = loop {
                let e = next_json(&mut ws).await;
                if e["payload"]["event_id"] == first["payload"]["event_id"] {
                    break e;
                }
            };
            assert_eq!(again["retry_attempt"], 1, "{again}");
            let ack = json!({"envelope_id": again["envelope_id"]}).to_string();
            ws.send(Message::text(ack)).await.unwrap();
            let channel = first["payload"]["event"]["channel"].clone();
            let tag = first["payload"]["event"]["text"]
                .as_str()
                .unwrap()
                .trim_start_matches("/recall ")
                .to_string();
            let text = format!("I have nothing under {tag}.");
            let posted = api(
                "chat.postMessage",
                "xoxb-b",
                json!({"channel": channel, "text": text}),
            )
            .await;
            assert_eq!(posted["ok"], true, "{posted}");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while !fake.upstream().fed[0].acked {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the ack was not seen"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let up = fake.upstream();
            assert_eq!(up.replies[&tag], 1, "{up:?}");
            assert!(up.redelivered >= 1, "{up:?}");
        });
    }

    #[test]
    fn an_unacked_envelope_is_redelivered_with_the_next_retry_attempt() {
        let mut l = SlackLedger::default();
        let a = l.push(CHANNELS[0]);
        let b = l.push(CHANNELS[1]);
        // The first socket sends both; keel acks only b before it dies.
        let mut first = None;
        assert_eq!(l.due(&mut first), [a, b]);
        let (ea, eb) = (l.envelope(a), l.envelope(b));
        assert_eq!(ea["retry_attempt"], 0);
        assert_eq!(ea["payload"]["event_id"], event_id(a));
        assert!(l.ack(eb["envelope_id"].as_str().unwrap()));
        assert!(
            l.due(&mut first).is_empty(),
            "a socket sends an envelope once"
        );
        // An event queued later goes out on the open socket once.
        let c = l.push(CHANNELS[2]);
        assert_eq!(l.due(&mut first), [c]);
        assert!(l.due(&mut first).is_empty());
        let ec = l.envelope(c);
        assert!(l.ack(ec["envelope_id"].as_str().unwrap()));
        // The next socket sends a again, as a redelivery.
        assert_eq!(l.due(&mut None), [a]);
        let again = l.envelope(a);
        assert_eq!(again["retry_attempt"], 1);
        assert_eq!(again["payload"]["event_id"], event_id(a));
        assert_ne!(again["envelope_id"], ea["envelope_id"]);
        let acked: Vec<bool> = l.upstream().fed.iter().map(|f| f.acked).collect();
        assert_eq!(acked, [false, true, true]);
        // An ack of the old envelope still acknowledges the event; an
        // unknown one does not.
        assert!(!l.ack("env-unknown"));
        assert!(l.ack(ea["envelope_id"].as_str().unwrap()));
        assert_eq!(l.upstream().redelivered, 1);
        assert!(!l.upstream().settled(), "acked but not answered");
        l.posted(CHANNELS[0], &format!("I have nothing under sl-{a}."));
        l.posted(CHANNELS[0], &format!("I have nothing under sl-{b}."));
        assert!(!l.upstream().settled(), "b's reply went to a's channel");
        l.posted(CHANNELS[1], &format!("I have nothing under sl-{b}."));
        l.posted(CHANNELS[2], &format!("I have nothing under sl-{c}."));
        assert!(l.upstream().settled());
        assert_eq!(l.upstream().stray_replies, 1);
    }
}
