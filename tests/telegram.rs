//! The Telegram adapter against a fake Bot API server (real HTTP on
//! 127.0.0.1, real wire format), driving the real `keel` binary:
//! - SIGKILL twice during a stream of 500 updates: every update stored once
//!   and answered, offsets never go back, none skipped (R14); a new token does
//!   not reuse the old bot's offset.
//! - Outages (TESTING.md D): 5xx burst, 429 with and without retry_after,
//!   reset mid-body, a hanging server, a malformed update, sendMessage 429 and
//!   timeout — all ridden out; SIGTERM during a long poll exits promptly.
//! - 401 and 409 stop the adapter without a retry storm and the owner hears
//!   it on the webhook; the webhook keeps working (R17).
//! - A canary token never shows up in stderr, HTTP answers or `keel status`.
//!
//! The backoff schedule itself is checked with paused time in
//! `actors/src/adapter/supervisor.rs`; here the policy is shortened so
//! outages pass in seconds.

mod common;
#[path = "common/telegram.rs"]
mod telegram;

use std::collections::HashMap;
use std::time::Duration;

use common::{poll_until, Config, Daemon, ReplyServer};
use serde_json::{json, Value};
use telegram::{config_toml, FakeTelegram, Fault};

const DEADLINE: Duration = Duration::from_secs(90);
const FAST_BACKOFF: &str =
    "\n[adapters]\nbackoff_initial_ms = 50\nbackoff_max_ms = 400\nattempts = 10\nseed = 1\n";

/// A daemon whose config has `[telegram]` pointing at `tg` (not started).
fn daemon(config: Config, tg: &FakeTelegram, token: &str, extra: &str) -> Daemon {
    let d = Daemon::new(config, None);
    let text = d.config.to_toml() + &config_toml(&tg.url, token, extra);
    d.write_config_text(&text);
    d
}

/// `k<update_id>` from a reply to `/recall k<id>`.
fn answered_ids(sent: &[Value]) -> HashMap<i64, usize> {
    let mut out = HashMap::new();
    for s in sent {
        let text = s["text"].as_str().unwrap_or("");
        if let Some(rest) = text.split(" k").nth(1) {
            let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
            if let Ok(id) = digits.parse() {
                *out.entry(id).or_insert(0) += 1;
            }
        }
    }
    out
}

fn assert_offsets_monotonic(offsets: &[i64]) {
    for w in offsets.windows(2) {
        assert!(
            w[1] >= w[0],
            "offset went back from {} to {}: {offsets:?}",
            w[0],
            w[1]
        );
    }
}

async fn wait_answered(tg: &FakeTelegram, ids: &[i64]) {
    let all = poll_until(DEADLINE, || async {
        let got = answered_ids(&tg.sent());
        ids.iter().all(|id| got.contains_key(id)).then_some(())
    })
    .await;
    let got = answered_ids(&tg.sent());
    let missing: Vec<_> = ids.iter().filter(|id| !got.contains_key(id)).collect();
    assert!(all.is_some(), "updates never answered: {missing:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telegram_updates_survive_two_sigkills_exactly_once_and_all_answered() {
    let tg = FakeTelegram::start();
    let token = "111:crash-test-token";
    let mut d = daemon(Config::default(), &tg, token, FAST_BACKOFF);
    let mut ids = Vec::new();
    for i in 0..500 {
        let chat = 7000 + (i % 5);
        // Ids are assigned in order, so the text can name the next one.
        let next = 1000 + i;
        ids.push(tg.push_text(chat, &format!("/recall k{next}")));
    }
    assert_eq!(ids[0], 1000);
    d.boot().await;
    for kill_at in [100, 300] {
        let reached = poll_until(DEADLINE, || async {
            (tg.sent().len() >= kill_at).then_some(())
        })
        .await;
        assert!(
            reached.is_some(),
            "{} replies before kill point {kill_at}",
            tg.sent().len()
        );
        d.sigkill();
        d.restart().await;
    }
    wait_answered(&tg, &ids).await;

    // Stored exactly once each: the unique (session, key) dropped redeliveries.
    let counts = d.user_key_counts().await;
    for id in &ids {
        assert_eq!(counts.get(&id.to_string()), Some(&1), "update {id} stored");
    }
    assert_eq!(counts.len(), ids.len(), "nothing invented");
    let offsets = tg.offsets();
    assert_offsets_monotonic(&offsets);
    // None skipped: the server only forgets updates below an offset, and every
    // update was stored, so the last offset confirms all of them.
    poll_until(DEADLINE, || async { (tg.unconfirmed() == 0).then_some(()) })
        .await
        .expect("all updates confirmed");
    assert_eq!(*offsets.iter().max().unwrap(), ids[499] + 1);
    assert_eq!(d.boots, 3);

    // A new bot token starts from scratch instead of reusing the old offset.
    d.sigterm(DEADLINE).await;
    let new_token = "222:another-bot";
    let text = d.config.to_toml() + &config_toml(&tg.url, new_token, FAST_BACKOFF);
    d.write_config_text(&text);
    d.restart().await;
    let first = poll_until(DEADLINE, || async {
        tg.polls().into_iter().find(|(t, _)| t == new_token)
    })
    .await
    .expect("the new bot polls");
    assert_eq!(
        first.1, 0,
        "the new bot does not resume at the old bot's offset"
    );
    d.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telegram_outages_are_ridden_out_and_a_canary_token_never_leaks() {
    let tg = FakeTelegram::start();
    let canary = "999:CANARY-tg-7f3a9c1e";
    let extra = format!("{FAST_BACKOFF}\n[outbox]\nsend_timeout_ms = 1000\n");
    let mut d = daemon(Config::default(), &tg, canary, &extra);
    tg.fail_polls([
        Fault::api(502, "Bad Gateway", None),
        Fault::Status(503, json!("<html>unavailable</html>"), None),
        Fault::api(500, "Internal Server Error", None),
        Fault::api(429, "Too Many Requests: retry after 1", Some(1)),
        Fault::api(429, "Too Many Requests", None),
        Fault::Status(429, json!({"ok": false}), Some(1)),
        Fault::Reset,
        Fault::Hang,
        Fault::Status(200, json!("not the bot api"), None),
    ]);
    // The first two replies: one rate limited, one timing out after it left.
    tg.fail_sends([Fault::api(429, "Too Many Requests", Some(1)), Fault::Hang]);
    let mut ids = vec![tg.push_text(1, "/recall k1000")];
    let bad = tg.push_raw(json!({"edited_message": {"chat": {"id": 1}, "text": "x"}}));
    ids.push(tg.push_text(2, "/recall k1002"));
    d.boot().await;
    wait_answered(&tg, &ids).await;
    assert_eq!(tg.poll_faults_left(), 0, "every fault was played");
    // More traffic after the outage flows normally.
    for i in 0..5 {
        let next = 1003 + i;
        ids.push(tg.push_text(3, &format!("/recall k{next}")));
    }
    wait_answered(&tg, &ids).await;

    let counts = d.user_key_counts().await;
    for id in &ids {
        assert_eq!(
            counts.get(&id.to_string()),
            Some(&1),
            "update {id} stored once"
        );
    }
    assert!(
        !counts.contains_key(&bad.to_string()),
        "malformed update not stored"
    );
    assert!(
        tg.offsets().iter().any(|o| *o > bad),
        "the malformed update did not stall the offset"
    );
    assert_offsets_monotonic(&tg.offsets());
    assert!(
        d.wait_for_log("telegram update rejected", 1, DEADLINE)
            .await
    );
    let metrics = d.get("/metrics").await.unwrap().body;
    let unknown: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("keel_outbox_unknown_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        unknown >= 1,
        "the hung send is counted as unknown:\n{metrics}"
    );
    assert!(metrics.contains(r#"keel_adapter_state{adapter="telegram",state="running"} 1"#));

    // Shutdown during a long poll: prompt exit, nothing confirmed by it.
    let status = d.sigterm(Duration::from_secs(10)).await;
    assert!(status.success(), "{status}");

    // The canary: nowhere in logs, HTTP answers or `keel status`.
    d.restart().await;
    let mut seen = d.stderr_all();
    for path in ["/metrics", "/readyz", "/v1/sessions"] {
        seen.push_str(&d.get(path).await.unwrap().body);
    }
    for turns in d.all_turns().await.values() {
        for t in turns {
            seen.push_str(&t.text);
        }
    }
    let status = d.status_json().await;
    seen.push_str(&String::from_utf8_lossy(&status.stdout));
    seen.push_str(&String::from_utf8_lossy(&status.stderr));
    assert!(status.status.success(), "keel status failed");
    assert!(!seen.contains("CANARY"), "the bot token leaked");
    assert!(seen.contains("\"telegram\""), "status lists the adapter");
    d.assert_no_panics();
}

/// 401 or 409 (or failures past the last attempt): the adapter stops, the
/// owner hears it on the webhook, the webhook keeps working, status and
/// metrics show the state and the reason.
async fn stops_and_tells_the_owner(faults: Vec<Fault>, policy: &str, state: &str, expect: &str) {
    let tg = FakeTelegram::start();
    let replies = ReplyServer::start();
    let config = Config {
        reply_url: Some(replies.url.clone()),
        owner_chat: Some("owner".into()),
        ..Config::default()
    };
    let mut d = daemon(config, &tg, "333:revoked", policy);
    let polls = faults.len();
    tg.fail_polls(faults);
    d.boot().await;
    let notice = poll_until(DEADLINE, || async {
        replies.replies().into_iter().find(|r| {
            r["text"]
                .as_str()
                .unwrap_or("")
                .starts_with("adapter telegram gave up")
        })
    })
    .await
    .expect("the owner is told on the webhook");
    assert_eq!(notice["chat"], "owner");
    assert!(
        notice["text"].as_str().unwrap().contains(expect),
        "{notice}"
    );
    // Other adapters keep working.
    let r = d.post_ok("after-stop", "c1", "/help").await;
    assert_eq!(r["status"], "accepted");
    // No retry storm: one poll, never repeated.
    let status = d.status_json().await;
    let v: Value = serde_json::from_slice(&status.stdout).expect("status json");
    assert_eq!(v["adapters"]["telegram"]["state"], state, "{v}");
    assert!(v["adapters"]["telegram"]["last_error"]
        .as_str()
        .unwrap()
        .contains(expect));
    assert_eq!(v["adapters"]["webhook"]["state"], "running");
    assert_eq!(tg.offsets().len(), polls, "no retry after {expect}");
    let metrics = d.get("/metrics").await.unwrap().body;
    let line = format!(r#"keel_adapter_state{{adapter="telegram",state="{state}"}} 1"#);
    assert!(metrics.contains(&line), "{metrics}");
    d.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telegram_401_stops_the_adapter_and_the_owner_hears_it_on_the_webhook() {
    let faults = vec![Fault::api(401, "Unauthorized", None)];
    stops_and_tells_the_owner(faults, FAST_BACKOFF, "stopped", "HTTP 401").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telegram_409_stops_the_adapter_and_the_owner_hears_it_on_the_webhook() {
    let faults = vec![Fault::api(
        409,
        "Conflict: terminated by other getUpdates request",
        None,
    )];
    stops_and_tells_the_owner(faults, FAST_BACKOFF, "stopped", "HTTP 409").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telegram_gives_up_after_the_last_attempt_and_the_owner_hears_it_on_the_webhook() {
    // Three attempts: the first run and three restarts all fail, then it gives up.
    let policy =
        "\n[adapters]\nbackoff_initial_ms = 20\nbackoff_max_ms = 80\nattempts = 3\nseed = 3\n";
    let faults = (0..4)
        .map(|_| Fault::api(502, "Bad Gateway", None))
        .collect();
    stops_and_tells_the_owner(faults, policy, "gave_up", "502: Bad Gateway").await;
}

// ---------------------------------------------------------------------------
// Telegram as clients send it (issue 7 §2), through the binary.

const CORPUS: &str = include_str!("data/telegram/updates.json");

/// Every sendMessage body sent to `chat`.
fn sent_to(tg: &FakeTelegram, chat: i64) -> Vec<Value> {
    tg.sent()
        .into_iter()
        .filter(|s| s["chat_id"] == json!(chat))
        .collect()
}

/// The turns of `session` as the API shows them (kind, meta, revises).
async fn api_turns(d: &Daemon, session: &str) -> Vec<Value> {
    let path = format!("/v1/sessions/{}/turns", common::encode_segment(session));
    let r = d.get(&path).await.expect("GET turns");
    assert_eq!(r.status, 200, "{path}: {}", r.body);
    r.json()["turns"].as_array().cloned().unwrap_or_default()
}

/// Waits until every reply keel wrote in these sessions was accepted.
async fn wait_all_sent(d: &Daemon, sessions: &[&str]) {
    let done = poll_until(DEADLINE, || async {
        for s in sessions {
            for t in api_turns(d, s).await {
                if t["role"] == "assistant" && t["sent"] != json!(true) {
                    return None;
                }
            }
        }
        Some(())
    })
    .await;
    assert!(done.is_some(), "replies in {sessions:?} never all sent");
}

/// Bad shapes sent by a hostile or broken Bot API peer (ids from 5000).
fn hostile_updates() -> Vec<Value> {
    let huge = "\u{1F600}".repeat(70_000);
    let deep = (0..64).fold(json!(1), |v, _| json!({ "chat": v }));
    let cases = vec![
        json!({"message": null}),
        json!({"message": []}),
        json!({"message": "text"}),
        json!({"message": {"text": "no chat"}}),
        json!({"message": {"chat": {"id": "x"}, "text": "string chat id"}}),
        json!({"message": {"chat": {"id": 1.5}, "text": "float chat id"}}),
        json!({"message": {"chat": {}, "text": "empty chat"}}),
        json!({"message": {"chat": {"id": 5555, "type": "private"}, "text": 42}}),
        json!({"message": {"message_id": 1, "chat": {"id": 5555, "type": "private"}, "text": "nul\u{0}inside"}}),
        json!({"message": {"message_id": 2, "chat": {"id": 5555, "type": "private"}, "caption": huge, "photo": [{"file_id": 7}]}}),
        json!({"message": {"chat": {"id": 5555, "type": "private"}, "photo": "not a list"}}),
        json!({"message": {"chat": {"id": -5556, "type": "group"}, "text": "@KeelTestBot",
            "entities": [{"type": "mention", "offset": 99_999_999_999u64, "length": 5}]}}),
        json!({"message": {"chat": {"id": -5556, "type": "group"}, "text": "x",
            "entities": "not a list"}}),
        json!({"message": {"chat": {"id": -5556, "type": "group"}, "text": "/@"}}),
        json!({"edited_message": {"chat": {"id": 5555}, "text": "edit without message_id"}}),
        json!({"edited_message": {"message_id": 999_999, "chat": {"id": 5555}, "text": "edit of nothing"}}),
        json!({"callback_query": {"id": 5, "from": {"id": 1}}}),
        json!({"callback_query": {"id": "q1"}}),
        json!({"callback_query": {"id": "q2", "from": {"id": 5555}, "message": {"chat": {}}}}),
        json!({"my_chat_member": {"new_chat_member": {"status": "kicked"}}}),
        json!({"message_reaction": {"chat": {"id": 5555}, "new_reaction": "x", "old_reaction": 3}}),
        json!({"message": {"chat": {"id": 5555, "type": "\u{202E}evil\u{0}"}, "text": "odd type"}}),
        json!({"poll": {"id": "p", "question": "state only"}}),
        json!({"weird_future": deep}),
        json!({"message": {"chat": {"id": 5555}, "document": {"file_id": {"nested": 1}, "file_size": "big"}}}),
        json!({"message": {"chat": {"id": 5555}, "reply_to_message": "x", "text": "bad reply_to"}}),
        json!({"message": {"chat": {"id": 5555}, "media_group_id": 7, "photo": [{}]}}),
        json!({"message": {"chat": {"id": 5555}, "from": "nobody", "text": "from is a string"}}),
        json!({}),
    ];
    cases
        .into_iter()
        .enumerate()
        .map(|(i, mut u)| {
            u["update_id"] = json!(5000 + i as i64);
            u
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telegram_corpus_is_stored_with_kinds_and_meta_and_answered_only_when_addressed() {
    let tg = FakeTelegram::start();
    let mut d = daemon(Config::default(), &tg, "444:corpus", FAST_BACKOFF);
    let corpus: Vec<Value> = serde_json::from_str(CORPUS).unwrap();
    for case in &corpus {
        tg.push_exact(case["update"].clone());
    }
    // An addressed message in the forum topic (thread 77), after the corpus.
    let topic_id = tg.push_exact(json!({"update_id": 1100, "message": {
        "message_id": 90, "date": 0, "is_topic_message": true, "message_thread_id": 77,
        "chat": {"id": -1001333, "type": "supergroup", "is_forum": true, "title": "Keel Forum"},
        "from": {"id": 112, "is_bot": false, "first_name": "Bob"},
        "reply_to_message": {"message_id": 77, "date": 0, "forum_topic_created": {"name": "Planning", "icon_color": 1},
            "chat": {"id": -1001333, "type": "supergroup"}, "from": {"id": 112, "is_bot": false, "first_name": "Bob"}},
        "text": "@KeelTestBot summary please",
        "entities": [{"type": "mention", "offset": 0, "length": 12}]}}));
    let hostile = hostile_updates();
    for h in &hostile {
        tg.push_exact(h.clone());
    }
    let last = hostile.last().unwrap()["update_id"].as_i64().unwrap();
    d.boot().await;
    // The whole batch is confirmed, hostile updates included.
    confirmed(&tg, last).await;
    assert_eq!(tg.me_calls(), 1, "getMe once at start");
    let sessions = [
        "telegram:111",
        "telegram:-222",
        "telegram:-1001333",
        "telegram:-1001444",
        "telegram:-1001555",
    ];
    wait_all_sent(&d, &sessions).await;

    // Every corpus update is a turn with the corpus kind, keyed by update_id.
    let mut by_key: HashMap<String, (String, Value)> = HashMap::new();
    for s in sessions {
        for t in api_turns(&d, s).await {
            if t["role"] == "user" {
                let key = t["key"].as_str().unwrap().to_string();
                by_key.insert(key, (s.to_string(), t));
            }
        }
    }
    for case in &corpus {
        let id = case["update"]["update_id"].to_string();
        let (_, turn) = by_key
            .get(&id)
            .unwrap_or_else(|| panic!("{} ({id}) not stored", case["name"]));
        assert_eq!(turn["kind"], case["kind"], "{}", case["name"]);
    }
    let turn = |id: i64| by_key[&id.to_string()].1.clone();
    // Captions are the text; media metadata is kept.
    assert_eq!(turn(1009)["text"], "sunset \u{1F305} #holiday");
    assert_eq!(turn(1009)["meta"]["photo"]["file_id"], "AgACAgIAAxkBAAIA3");
    assert_eq!(turn(1012)["meta"]["document"]["file_name"], "report Q1.pdf");
    assert_eq!(turn(1017)["meta"]["location"]["longitude"], 13.404954);
    assert_eq!(
        turn(1018)["meta"]["contact"]["phone_number"],
        "+4915112345678"
    );
    assert_eq!(turn(1010)["meta"]["media_group_id"], "13912345678901234");
    assert_eq!(turn(1007)["meta"]["start_payload"], "PAYLOAD123");
    // An edit is a revision of the original turn.
    assert_eq!(turn(1021)["revises"], turn(1000)["seq"]);
    assert_eq!(turn(1021)["text"], "hello keel (edited)");
    assert_eq!(turn(1023)["revises"], turn(1022)["seq"]);
    assert_eq!(by_key["1022"].0, "telegram:-1001444", "channel post stored");
    assert_eq!(turn(1035)["meta"]["update"], "business_message_v9");

    // What was answered. Private chat: everything a user sent except edits,
    // service messages and unknown content; an album answered once.
    let private: Vec<String> = sent_to(&tg, 111)
        .iter()
        .map(|s| s["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(private.len(), 17, "{private:#?}");
    let starts = private.iter().filter(|t| t.starts_with("Hello")).count();
    assert_eq!(starts, 2, "/start and /start PAYLOAD greet: {private:#?}");
    assert!(private.iter().all(|t| !t.contains("Unknown command")));
    let photos = private.iter().filter(|t| *t == "Got your photo.").count();
    assert_eq!(photos, 2, "one photo and one album: {private:#?}");
    for what in [
        "document",
        "voice message",
        "sticker",
        "location",
        "dice roll",
    ] {
        assert!(private.contains(&format!("Got your {what}.")), "{what}");
    }
    assert!(sent_to(&tg, 111)
        .iter()
        .all(|s| s.get("reply_parameters").is_none()));
    // The group: only the three addressed messages, each quoted.
    let group = sent_to(&tg, -222);
    let quoted: Vec<i64> = group
        .iter()
        .map(|s| {
            assert_eq!(s["reply_parameters"]["allow_sending_without_reply"], true);
            s["reply_parameters"]["message_id"].as_i64().unwrap()
        })
        .collect();
    let mut quoted_sorted = quoted.clone();
    quoted_sorted.sort_unstable();
    assert_eq!(quoted_sorted, vec![20, 22, 23], "{group:#?}");
    assert!(group
        .iter()
        .any(|s| s["text"].as_str().unwrap().contains("/recall")));
    // Not addressed: stored with answer = false, no reply turn.
    for id in [1002, 1005, 1008, 1019, 1028, 1029, 1030] {
        assert!(turn(id)["meta"]["addressed"] != json!(true), "{id}");
    }
    // The forum: the topic message addressed to keel is answered in its topic.
    let forum = sent_to(&tg, -1001333);
    assert_eq!(forum.len(), 1, "{forum:#?}");
    assert_eq!(forum[0]["message_thread_id"], 77);
    assert_eq!(forum[0]["reply_parameters"]["message_id"], 90);
    assert!(by_key.contains_key(&topic_id.to_string()));
    // Nothing to the channel or the migrated supergroup.
    assert!(sent_to(&tg, -1001444).is_empty());
    assert!(sent_to(&tg, -1001555).is_empty());
    // The button press was answered at once.
    let answered = poll_until(DEADLINE, || async {
        tg.callback_answers()
            .into_iter()
            .find(|b| b["callback_query_id"] == "4382000123456789012")
    })
    .await;
    assert!(answered.is_some(), "answerCallbackQuery sent");

    // Hostile updates: stored or passed over, never a crash; the daemon
    // still answers.
    let stored_hostile: Vec<&String> = by_key.keys().filter(|k| k.starts_with('5')).collect();
    assert!(
        stored_hostile.is_empty(),
        "hostile turns live in their own chats"
    );
    let odd = api_turns(&d, "telegram:5555").await;
    let nul = odd
        .iter()
        .find(|t| t["key"] == "5008")
        .expect("NUL text stored");
    assert_eq!(nul["text"], "nul\u{FFFD}inside");
    let huge = odd
        .iter()
        .find(|t| t["key"] == "5009")
        .expect("huge caption stored");
    assert_eq!(huge["meta"]["truncated"], true);
    assert_eq!(huge["kind"], "photo");
    assert!(
        d.wait_for_log("telegram update rejected", 5, DEADLINE)
            .await
    );
    let after = tg.push_text(111, "/recall still-alive");
    wait_answered_text(&tg, 111, "I have nothing under still-alive.").await;
    assert!(after > last);
    let metrics = d.get("/metrics").await.unwrap().body;
    assert!(metrics.contains(r#"keel_adapter_state{adapter="telegram",state="running"} 1"#));
    d.assert_no_panics();
}

/// Waits until Telegram was told every update up to `id` is stored.
async fn confirmed(tg: &FakeTelegram, id: i64) {
    poll_until(DEADLINE, || async {
        tg.offsets().iter().any(|o| *o > id).then_some(())
    })
    .await
    .expect("updates confirmed");
}

async fn wait_answered_text(tg: &FakeTelegram, chat: i64, text: &str) {
    let found = poll_until(DEADLINE, || async {
        sent_to(tg, chat)
            .into_iter()
            .find(|s| s["text"] == text)
            .map(|_| ())
    })
    .await;
    assert!(found.is_some(), "{text:?} never sent to {chat}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telegram_group_replies_all_answers_every_user_message_but_never_service_or_other_bots() {
    let tg = FakeTelegram::start();
    // Keys of [telegram] come before the [adapters] section; the owner
    // chat is written as an integer.
    let extra = format!("group_replies = \"all\"\nowner_chat = 111\n{FAST_BACKOFF}");
    let mut d = daemon(Config::default(), &tg, "555:all", &extra);
    let corpus: Vec<Value> = serde_json::from_str(CORPUS).unwrap();
    let mut last = 0;
    for case in corpus.iter().filter(|c| {
        let n = c["name"].as_str().unwrap();
        n.starts_with("group_") || n == "forum_topic_message"
    }) {
        last = tg.push_exact(case["update"].clone());
    }
    d.boot().await;
    confirmed(&tg, last).await;
    wait_all_sent(&d, &["telegram:-222", "telegram:-1001333"]).await;
    let quoted: Vec<i64> = sent_to(&tg, -222)
        .iter()
        .map(|s| s["reply_parameters"]["message_id"].as_i64().unwrap())
        .collect();
    let mut q = quoted.clone();
    q.sort_unstable();
    // 20 /help@us, 22 mention, 23 reply, 24 plain, 25 poll; not 21
    // (/help@OtherBot), 26 (bot added), 27 (left), 28 (migration).
    assert_eq!(q, vec![20, 22, 23, 24, 25]);
    let forum = sent_to(&tg, -1001333);
    assert_eq!(forum.len(), 1);
    assert_eq!(forum[0]["message_thread_id"], 77);
    assert_eq!(forum[0]["reply_parameters"]["message_id"], 78);
    d.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telegram_get_me_401_stops_the_adapter_before_polling_and_the_owner_hears_it() {
    let tg = FakeTelegram::start();
    let replies = ReplyServer::start();
    let config = Config {
        reply_url: Some(replies.url.clone()),
        owner_chat: Some("owner".into()),
        ..Config::default()
    };
    let mut d = daemon(config, &tg, "666:revoked", FAST_BACKOFF);
    tg.fail_me([Fault::api(401, "Unauthorized", None)]);
    d.boot().await;
    let notice = poll_until(DEADLINE, || async {
        replies.replies().into_iter().find(|r| {
            r["text"]
                .as_str()
                .unwrap_or("")
                .starts_with("adapter telegram gave up")
        })
    })
    .await
    .expect("the owner is told on the webhook");
    assert!(
        notice["text"].as_str().unwrap().contains("HTTP 401"),
        "{notice}"
    );
    assert_eq!(tg.me_calls(), 1, "no retry after 401");
    assert!(tg.offsets().is_empty(), "never polled with a revoked token");
    d.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telegram_long_reply_is_split_in_order_and_a_partial_failure_resends_only_the_rest() {
    let tg = FakeTelegram::start();
    let mut d = daemon(Config::default(), &tg, "777:split", FAST_BACKOFF);
    let chat = 8080;
    let line = "lorem ipsum ".repeat(16);
    for _ in 0..30 {
        tg.push_text(chat, &line);
    }
    d.boot().await;
    poll_until(DEADLINE, || async {
        (sent_to(&tg, chat).len() == 30).then_some(())
    })
    .await
    .expect("30 acknowledgements");
    // /history 50 is ~8,000 UTF-16 units: two or more parts. The second
    // part fails once (502); the retry sends only what is left.
    tg.fail_sends([Fault::Pass, Fault::api(502, "Bad Gateway", None)]);
    let history = tg.push_text(chat, "/history 50");
    confirmed(&tg, history).await;
    wait_all_sent(&d, &[&format!("telegram:{chat}")]).await;
    let parts: Vec<String> = sent_to(&tg, chat)[30..]
        .iter()
        .map(|s| s["text"].as_str().unwrap().to_string())
        .collect();
    assert!(parts.len() >= 2, "{parts:#?}");
    assert!(parts.iter().all(|p| p.encode_utf16().count() <= 4096));
    let turns = api_turns(&d, &format!("telegram:{chat}")).await;
    let reply = turns.last().unwrap()["text"].as_str().unwrap().to_string();
    assert_eq!(
        parts.join("\n"),
        reply,
        "every part once, in order, split at lines"
    );
    d.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telegram_reply_to_a_migrated_group_goes_to_the_new_supergroup() {
    let tg = FakeTelegram::start();
    let mut d = daemon(Config::default(), &tg, "888:migrate", FAST_BACKOFF);
    tg.fail_sends([Fault::Status(
        400,
        json!({"ok": false, "error_code": 400,
            "description": "Bad Request: group chat was upgraded to a supergroup chat",
            "parameters": {"migrate_to_chat_id": -1001555}}),
        None,
    )]);
    let id = tg.push_raw(json!({"message": {"message_id": 40, "date": 0,
        "chat": {"id": -222, "type": "group", "title": "g"},
        "from": {"id": 111, "is_bot": false, "first_name": "Ann"},
        "text": "/help@KeelTestBot", "entities": [{"type": "bot_command", "offset": 0, "length": 17}]}}));
    d.boot().await;
    confirmed(&tg, id).await;
    wait_all_sent(&d, &["telegram:-222"]).await;
    let moved = sent_to(&tg, -1001555);
    assert_eq!(moved.len(), 1, "{:#?}", tg.sent());
    assert_eq!(moved[0]["reply_parameters"]["message_id"], 40);
    assert!(sent_to(&tg, -222).is_empty());
    d.assert_no_panics();
}
