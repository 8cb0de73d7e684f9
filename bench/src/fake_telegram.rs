//! A fake Telegram Bot API on 127.0.0.1 for `keel torture` (and any later
//! `keel bench telegram`): real HTTP, the real wire format
//! (`POST /bot<token>/getUpdates|getMe|sendMessage|answerCallbackQuery`,
//! `{"ok":true,"result":…}`), in a thread and runtime of its own so it
//! outlives every keel restart and never waits on the battery.
//!
//! It keeps updates as Telegram does: `getUpdates(offset = o)` confirms
//! (forgets) every update below `o` and answers those from `o` on, at once
//! when some are queued, else after holding the long poll (at most 1 s, so
//! a kill is never held up). A feeder queues a steady stream of private-chat
//! texts `/recall tg-<update_id>` across a few chats, also while keel is
//! down; keel's reply (`I have nothing under tg-N.`) names the update it
//! answers. The [`TgLedger`] records every offset keel sends: one below an
//! offset keel already sent means keel lost its committed offset.

use std::collections::{HashMap, VecDeque};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::fake_http::{
    read_request, tag_in, write_json, Fake, FakeLedger, Fed, Request, Upstream,
};

/// The longest a getUpdates is held without updates, whatever `timeout` asks.
const MAX_HOLD: Duration = Duration::from_secs(1);
/// How often the feeder queues updates.
const FEED_EVERY: Duration = Duration::from_millis(100);
/// The private chats the feeder writes from.
const CHATS: [i64; 4] = [7001, 7002, 7003, 7004];
/// The first update_id (Telegram's are large and never start at 0).
const FIRST_UPDATE: i64 = 100_000;

/// What the fake saw, and the updates keel has not confirmed yet.
#[derive(Debug)]
pub struct TgLedger {
    /// Updates not confirmed yet, in update_id order.
    queue: VecDeque<Value>,
    /// The chat of every update queued, by update_id.
    chats: HashMap<i64, i64>,
    next_id: i64,
    /// The highest offset keel sent (0: none yet).
    max_offset: i64,
    /// Offsets below one keel had already sent.
    regressions: u64,
    /// Replies per tag (`tg-N`) that went to the chat of update N.
    replies: HashMap<String, u64>,
    /// Replies that named no update of that chat.
    stray_replies: u64,
    /// sendMessage calls accepted (the message_id of the last one).
    sends: i64,
    feeding: bool,
    /// Most updates one getUpdates gets (`keel bench telegram --batch`).
    max_batch: usize,
    /// When the first getUpdates arrived.
    first_poll: Option<Instant>,
    /// When an offset first confirmed every update queued (the bench's
    /// durable instant: keel sends an offset only after its batch committed).
    all_confirmed: Option<Instant>,
    /// After the final check: polls are answered empty and nothing is recorded.
    frozen: bool,
}

impl Default for TgLedger {
    fn default() -> TgLedger {
        TgLedger {
            queue: VecDeque::new(),
            chats: HashMap::new(),
            next_id: FIRST_UPDATE,
            max_offset: 0,
            regressions: 0,
            replies: HashMap::new(),
            stray_replies: 0,
            sends: 0,
            feeding: true,
            max_batch: 100,
            first_poll: None,
            all_confirmed: None,
            frozen: false,
        }
    }
}

impl TgLedger {
    /// Queues a text update from `chat`; its update_id.
    pub fn push(&mut self, chat: i64) -> i64 {
        let id = self.next_id;
        self.next_id += 1;
        self.chats.insert(id, chat);
        self.queue.push_back(json!({
            "update_id": id,
            "message": {
                "message_id": id, "date": 0,
                "chat": {"id": chat, "type": "private"},
                "from": {"id": chat, "is_bot": false, "first_name": "torture"},
                "text": format!("/recall tg-{id}"),
            }
        }));
        id
    }

    /// A getUpdates arrived with `offset` (`None`: absent): records it and
    /// confirms every update below it. Returns whether it went backwards.
    pub fn poll(&mut self, offset: Option<i64>) -> bool {
        let offset = offset.unwrap_or(0);
        let regressed = offset < self.max_offset;
        if regressed {
            self.regressions += 1;
        }
        self.max_offset = self.max_offset.max(offset);
        let now = Instant::now();
        self.first_poll.get_or_insert(now);
        if self.all_confirmed.is_none() && self.next_id > FIRST_UPDATE && offset >= self.next_id {
            self.all_confirmed = Some(now);
        }
        while self
            .queue
            .front()
            .and_then(|u| u["update_id"].as_i64())
            .is_some_and(|id| id < offset)
        {
            self.queue.pop_front();
        }
        regressed
    }

    /// The updates a getUpdates with `offset` gets now (at most `limit`).
    pub fn batch(&self, offset: Option<i64>, limit: usize) -> Vec<Value> {
        let from = offset.unwrap_or(0);
        self.queue
            .iter()
            .filter(|u| u["update_id"].as_i64().unwrap_or(0) >= from)
            .take(limit)
            .cloned()
            .collect()
    }

    /// A sendMessage to `chat` with `text` was accepted; its message_id.
    pub fn sent(&mut self, chat: i64, text: &str) -> i64 {
        self.sends += 1;
        let update = tag_in(text, "tg-").and_then(|t| Some((t, t[3..].parse::<i64>().ok()?)));
        match update {
            Some((tag, id)) if self.chats.get(&id) == Some(&chat) => {
                *self.replies.entry(tag.to_string()).or_insert(0) += 1;
            }
            _ => self.stray_replies += 1,
        }
        self.sends
    }

    /// Every update queued so far; acknowledged = below an offset keel sent.
    pub fn fed(&self) -> Vec<Fed> {
        (FIRST_UPDATE..self.next_id)
            .map(|id| Fed {
                key: id.to_string(),
                tag: format!("tg-{id}"),
                acked: id < self.max_offset,
            })
            .collect()
    }

    /// The ledger for the final check.
    pub fn upstream(&self) -> Upstream {
        Upstream {
            fed: self.fed(),
            replies: self.replies.clone(),
            stray_replies: self.stray_replies,
            offset_regressions: self.regressions,
            redelivered: 0,
        }
    }
}

/// The fake Bot API server and its feeder, running until dropped.
impl FakeLedger for TgLedger {
    fn flags(&mut self) -> (&mut bool, &mut bool) {
        (&mut self.feeding, &mut self.frozen)
    }

    fn upstream(&self) -> Upstream {
        TgLedger::upstream(self)
    }
}

pub type FakeTelegram = Fake<TgLedger>;

impl Fake<TgLedger> {
    /// Serves bot `token` on a free loopback port, queueing `per_tick`
    /// updates every 100 ms until [`FakeTelegram::stop_feeding`].
    pub fn start(token: &str, per_tick: usize) -> Result<FakeTelegram> {
        FakeTelegram::serve_ledger(token, TgLedger::default(), per_tick)
    }

    /// Serves bot `token` with `updates` already queued (round-robin over
    /// the fake's four chats) and nothing fed later, at most `batch` per
    /// getUpdates: the workload of `keel bench telegram`.
    pub fn start_queued(token: &str, updates: usize, batch: usize) -> Result<FakeTelegram> {
        let mut ledger = TgLedger {
            feeding: false,
            max_batch: batch.max(1),
            ..TgLedger::default()
        };
        for n in 0..updates {
            ledger.push(CHATS[n % CHATS.len()]);
        }
        FakeTelegram::serve_ledger(token, ledger, 0)
    }

    /// `(first getUpdates, first offset confirming every queued update)`.
    pub fn timing(&self) -> (Option<Instant>, Option<Instant>) {
        let l = self.ledger();
        (l.first_poll, l.all_confirmed)
    }

    fn serve_ledger(token: &str, ledger: TgLedger, per_tick: usize) -> Result<FakeTelegram> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .context("cannot bind the fake Telegram API")?;
        let api_base = format!(
            "http://{}",
            listener
                .local_addr()
                .context("cannot bind the fake Telegram API")?
        );
        let runtime = crate::messages::runtime()?;
        let ledger = Arc::new(Mutex::new(ledger));
        let stop = Arc::new(Notify::new());
        let queued = Arc::new(Notify::new());
        let (l2, s2, prefix) = (ledger.clone(), stop.clone(), format!("/bot{token}/"));
        let thread = std::thread::Builder::new()
            .name("fake-telegram".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        return;
                    };
                    let feeder = feed(l2.clone(), queued.clone(), per_tick);
                    let server = serve(listener, l2, queued, prefix);
                    tokio::select! {
                        _ = s2.notified() => {}
                        _ = feeder => {}
                        _ = server => {}
                    }
                });
            })
            .context("cannot start the fake Telegram API")?;
        Ok(Fake::new(api_base, ledger, stop, thread))
    }
}

/// Queues `per_tick` updates every [`FEED_EVERY`] while feeding.
async fn feed(ledger: Arc<Mutex<TgLedger>>, queued: Arc<Notify>, per_tick: usize) {
    let mut tick = tokio::time::interval(FEED_EVERY);
    let mut chat = 0usize;
    loop {
        tick.tick().await;
        {
            let mut l = ledger.lock().unwrap_or_else(|p| p.into_inner());
            if !l.feeding {
                continue;
            }
            for _ in 0..per_tick {
                l.push(CHATS[chat % CHATS.len()]);
                chat += 1;
            }
        }
        queued.notify_waiters();
    }
}

async fn serve(
    listener: tokio::net::TcpListener,
    ledger: Arc<Mutex<TgLedger>>,
    queued: Arc<Notify>,
    prefix: String,
) {
    let prefix: Arc<str> = prefix.into();
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            continue;
        };
        let (ledger, queued, prefix) = (ledger.clone(), queued.clone(), prefix.clone());
        tokio::spawn(async move {
            let _ = connection(sock, &ledger, &queued, &prefix).await;
        });
    }
}

/// One keep-alive connection of keel's Bot API client.
async fn connection(
    mut sock: TcpStream,
    ledger: &Mutex<TgLedger>,
    queued: &Notify,
    prefix: &str,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    while let Some(req) = read_request(&mut sock, &mut buf).await? {
        let (status, body) = match req.path.strip_prefix(prefix) {
            Some(method) => (200, answer(method, &req, ledger, queued).await),
            None => (
                401,
                json!({"ok": false, "error_code": 401, "description": "Unauthorized"}),
            ),
        };
        write_json(&mut sock, status, &body).await?;
    }
    Ok(())
}

/// The answer to Bot API `method`.
async fn answer(method: &str, req: &Request, ledger: &Mutex<TgLedger>, queued: &Notify) -> Value {
    let lock = || ledger.lock().unwrap_or_else(|p| p.into_inner());
    match method {
        "getUpdates" => {
            let offset = req.int("offset");
            let asked = req.int("limit").unwrap_or(100).clamp(1, 100) as usize;
            let hold = Duration::from_secs(req.int("timeout").unwrap_or(0).clamp(0, 60) as u64)
                .min(MAX_HOLD);
            let (frozen, limit) = {
                let mut l = lock();
                if !l.frozen {
                    l.poll(offset);
                }
                (l.frozen, asked.min(l.max_batch))
            };
            let end = tokio::time::Instant::now() + hold;
            loop {
                let wake = queued.notified();
                tokio::pin!(wake);
                wake.as_mut().enable();
                let batch = if frozen {
                    Vec::new()
                } else {
                    lock().batch(offset, limit)
                };
                if !batch.is_empty() || tokio::time::Instant::now() >= end {
                    return json!({"ok": true, "result": batch});
                }
                let _ = tokio::time::timeout_at(end, wake).await;
            }
        }
        "getMe" => json!({"ok": true, "result": {
            "id": 4242, "is_bot": true, "first_name": "Keel", "username": "KeelTortureBot",
            "can_join_groups": true, "can_read_all_group_messages": false,
            "supports_inline_queries": false}}),
        "sendMessage" => {
            let chat = req.body["chat_id"].as_i64().unwrap_or(0);
            let text = req.body["text"].as_str().unwrap_or("");
            let mut l = lock();
            let message_id = if l.frozen { 1 } else { l.sent(chat, text) };
            json!({"ok": true, "result": {"message_id": message_id, "date": 0,
                "chat": {"id": chat, "type": "private"}, "text": text}})
        }
        "answerCallbackQuery" => json!({"ok": true, "result": true}),
        _ => json!({"ok": false, "error_code": 404, "description": "Not Found"}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offset_confirms_what_is_below_it_and_a_lower_one_is_a_regression() {
        let mut l = TgLedger::default();
        let a = l.push(CHATS[0]);
        let b = l.push(CHATS[1]);
        // The first poll has no offset: not a regression, nothing confirmed.
        assert!(!l.poll(None));
        assert_eq!(l.batch(None, 100).len(), 2);
        assert!(l.fed().iter().all(|f| !f.acked));
        // Offset a + 1 confirms a only.
        assert!(!l.poll(Some(a + 1)));
        assert_eq!(l.batch(Some(a + 1), 100)[0]["update_id"], b);
        let acked: Vec<bool> = l.fed().iter().map(|f| f.acked).collect();
        assert_eq!(acked, [true, false]);
        // The same offset again is fine; an absent or lower one is not.
        assert!(!l.poll(Some(a + 1)));
        assert!(l.poll(None));
        assert!(l.poll(Some(a)));
        assert_eq!(l.upstream().offset_regressions, 2);
        // A regression does not take an acknowledgement back.
        assert!(l.fed()[0].acked);
    }

    #[test]
    fn the_fake_speaks_the_bot_api_over_http_and_sees_a_lost_offset() {
        let fake = FakeTelegram::start("42:tok", 1).unwrap();
        let http = reqwest::Client::new();
        let call = |token: &str, method: &str, body: Value| {
            let req = http
                .post(format!("{}/bot{token}/{method}", fake.api_base))
                .json(&body);
            async move {
                let r = req.send().await.unwrap();
                (r.status().as_u16(), r.json::<Value>().await.unwrap())
            }
        };
        crate::messages::runtime().unwrap().block_on(async {
            // The long poll answers once the feeder queued something.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            let update = loop {
                let (status, v) = call("42:tok", "getUpdates", json!({"timeout": 1})).await;
                assert_eq!(status, 200, "{v}");
                if let Some(u) = v["result"].get(0) {
                    break u.clone();
                }
                assert!(tokio::time::Instant::now() < deadline, "no update fed");
            };
            let id = update["update_id"].as_i64().unwrap();
            let chat = update["message"]["chat"]["id"].clone();
            assert_eq!(update["message"]["text"], format!("/recall tg-{id}"));
            let (_, v) = call(
                "42:tok",
                "getUpdates",
                json!({"offset": id + 1, "timeout": 0}),
            )
            .await;
            assert!(v["result"]
                .as_array()
                .unwrap()
                .iter()
                .all(|u| u["update_id"].as_i64() > Some(id)));
            // keel forgetting its offset: the next poll has none.
            call("42:tok", "getUpdates", json!({"timeout": 0})).await;
            let text = format!("I have nothing under tg-{id}.");
            let (_, sent) = call(
                "42:tok",
                "sendMessage",
                json!({"chat_id": chat, "text": text}),
            )
            .await;
            assert_eq!(sent["ok"], true, "{sent}");
            let (status, _) = call("43:other", "getMe", json!({})).await;
            assert_eq!(status, 401, "a wrong token is refused");
        });
        let up = fake.upstream();
        assert_eq!(up.offset_regressions, 1, "{up:?}");
        let first = up.fed.iter().find(|f| f.acked).unwrap();
        assert_eq!(up.replies[&first.tag], 1, "{up:?}");
    }

    #[test]
    fn a_reply_counts_for_its_update_only_in_that_chat() {
        let mut l = TgLedger::default();
        let a = l.push(CHATS[0]);
        l.poll(Some(a + 1));
        assert!(!l.upstream().settled());
        l.sent(CHATS[1], &format!("I have nothing under tg-{a}."));
        assert!(
            !l.upstream().settled(),
            "a reply in another chat answers nothing"
        );
        l.sent(CHATS[0], &format!("I have nothing under tg-{a}."));
        l.sent(CHATS[0], &format!("I have nothing under tg-{a}."));
        assert!(l.upstream().settled());
        let u = l.upstream();
        assert_eq!(u.replies[&format!("tg-{a}")], 2);
        assert_eq!(u.stray_replies, 1);
    }
}
