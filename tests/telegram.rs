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
    // Updates about the chats themselves (the bot kicked and back, the
    // group moved) come after the rest is answered: they fail unsent
    // replies and move sessions, which is checked on its own below.
    let late_names = [
        "my_chat_member_kicked",
        "my_chat_member_member_again",
        "group_migrate_to_chat_id",
        "supergroup_migrate_from_chat_id",
    ];
    for case in corpus
        .iter()
        .filter(|c| !late_names.contains(&c["name"].as_str().unwrap()))
    {
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
    ];
    wait_all_sent(&d, &sessions).await;
    let sessions = [
        "telegram:111",
        "telegram:-1001333",
        "telegram:-1001444",
        "telegram:-1001555",
    ];
    let mut late: HashMap<String, i64> = HashMap::new();
    for case in corpus
        .iter()
        .filter(|c| late_names.contains(&c["name"].as_str().unwrap()))
    {
        let id = tg.push_raw(case["update"].clone());
        late.insert(case["update"]["update_id"].to_string(), id);
    }
    confirmed(&tg, *late.values().max().unwrap()).await;
    // The group moved into the supergroup: its turns with it.
    assert!(api_turns(&d, "telegram:-222").await.is_empty());
    let listed = d.get("/v1/sessions").await.unwrap().json();
    let unreachable = |id: &str| {
        listed["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == id)
            .map(|s| s["unreachable"].clone())
    };
    assert_eq!(
        unreachable("telegram:-222"),
        Some(json!("moved to telegram:-1001555"))
    );
    assert_eq!(
        unreachable("telegram:111"),
        Some(Value::Null),
        "member again"
    );

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
        let id = late.get(&id).map(i64::to_string).unwrap_or(id);
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
    for id in [1002, 1005, 1008, 1019, 1028, 1029, late["1030"]] {
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
    let stored_hostile: Vec<&String> = by_key
        .keys()
        .filter(|k| k.starts_with('5') && !late.values().any(|v| v.to_string() == **k))
        .collect();
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
        (n.starts_with("group_") && n != "group_migrate_to_chat_id") || n == "forum_topic_message"
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
    // (/help@OtherBot), 26 (bot added), 27 (left).
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
    poll_until(DEADLINE, || async {
        (!sent_to(&tg, -1001555).is_empty()).then_some(())
    })
    .await
    .expect("the reply reached the supergroup");
    let moved = sent_to(&tg, -1001555);
    assert_eq!(moved.len(), 1, "{:#?}", tg.sent());
    assert_eq!(moved[0]["reply_parameters"]["message_id"], 40);
    assert!(sent_to(&tg, -222).is_empty());
    // The 400 moved the session too, as the migration update would have.
    let turns = poll_until(DEADLINE, || async {
        let t = api_turns(&d, "telegram:-1001555").await;
        (t.len() == 2 && t[1]["sent"] == json!(true)).then_some(t)
    })
    .await
    .expect("the session moved to the supergroup");
    assert_eq!(turns[0]["text"], "/help@KeelTestBot");
    assert!(api_turns(&d, "telegram:-222").await.is_empty());
    d.assert_no_panics();
}

// ---------------------------------------------------------------------------
// Chats that move or drop the bot; webhook mode (issue 7 §2).

/// A message in group `chat` from Ann, addressed to the bot by a command.
fn group_command(chat: i64, message_id: i64, text: &str) -> Value {
    let command_len = text
        .split_whitespace()
        .next()
        .unwrap_or("")
        .encode_utf16()
        .count();
    json!({"message": {"message_id": message_id, "date": 0,
        "chat": {"id": chat, "type": if chat < -1_000_000_000_000 { "supergroup" } else { "group" }, "title": "g"},
        "from": {"id": 111, "is_bot": false, "first_name": "Ann"},
        "text": text, "entities": [{"type": "bot_command", "offset": 0, "length": command_len}]}})
}

/// `my_chat_member` for the bot in private chat `chat`: `status` is the new one.
fn bot_status(chat: i64, old: &str, status: &str) -> Value {
    json!({"my_chat_member": {"chat": {"id": chat, "type": "private", "first_name": "Ann"},
        "from": {"id": chat, "is_bot": false, "first_name": "Ann"}, "date": 0,
        "old_chat_member": {"status": old, "user": {"id": 999, "is_bot": true, "first_name": "Keel", "username": "KeelTestBot"}},
        "new_chat_member": {"status": status, "user": {"id": 999, "is_bot": true, "first_name": "Keel", "username": "KeelTestBot"}}}})
}

/// Outgoing turns of `session` whose outbox row is in `state`.
async fn replies_in(d: &Daemon, session: &str, state: &str) -> Vec<Value> {
    api_turns(d, session)
        .await
        .into_iter()
        .filter(|t| t["role"] != "user" && t["delivery"]["state"] == state)
        .collect()
}

/// `keel timers list --json` of this daemon.
async fn timers_json(d: &Daemon) -> Value {
    let dir = d.data_dir.to_string_lossy().into_owned();
    let out = d
        .cli(&["timers", "list", "--json", "--data-dir", &dir])
        .await;
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).expect("timers json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telegram_group_migration_moves_turns_memory_timers_and_unsent_replies_to_the_supergroup() {
    let tg = FakeTelegram::start();
    let mut d = daemon(Config::default(), &tg, "321:move", FAST_BACKOFF);
    let (old, new) = (-222, -1001555);
    tg.push_raw(group_command(old, 40, "/remember@KeelTestBot color blue"));
    d.boot().await;
    wait_answered_text(&tg, old, "Remembered color.").await;
    let id = tg.push_raw(group_command(
        old,
        41,
        "/remind@KeelTestBot every 1h --skip standup",
    ));
    confirmed(&tg, id).await;
    wait_all_sent(&d, &["telegram:-222"]).await;
    // The next reply cannot be sent (502s) and is still unsent when keel
    // dies and the group moves.
    tg.fail_sends((0..10_000).map(|_| Fault::api(502, "Bad Gateway", None)));
    let id = tg.push_raw(group_command(old, 42, "/recall@KeelTestBot color"));
    confirmed(&tg, id).await;
    poll_until(DEADLINE, || async {
        (!replies_in(&d, "telegram:-222", "pending").await.is_empty()).then_some(())
    })
    .await
    .expect("a pending reply");
    // Telegram tells both chats (the old one first), keel stores both.
    tg.migrate(old, new);
    tg.push_raw(json!({"message": {"message_id": 43, "date": 0,
        "chat": {"id": old, "type": "group", "title": "g"},
        "from": {"id": 111, "is_bot": false, "first_name": "Ann"}, "migrate_to_chat_id": new}}));
    let last = tg.push_raw(json!({"message": {"message_id": 1, "date": 0,
        "chat": {"id": new, "type": "supergroup", "title": "g"},
        "from": {"id": 111, "is_bot": false, "first_name": "Ann"}, "migrate_from_chat_id": old}}));
    confirmed(&tg, last).await;
    d.sigkill();
    tg.clear_send_faults();
    let before = tg.send_attempts().len();
    d.restart().await;
    wait_answered_text(&tg, new, "color: blue").await;
    // After the restart the unsent reply went straight to the new id: the
    // store had moved it (no 400 from the old id first).
    let after: Vec<Value> = tg.send_attempts()[before..].to_vec();
    assert!(
        after.iter().all(|s| s["chat_id"] == json!(new)),
        "{after:#?}"
    );
    // The turns moved in order, renumbered; the old session is empty.
    let turns = api_turns(&d, "telegram:-1001555").await;
    let texts: Vec<&str> = turns.iter().map(|t| t["text"].as_str().unwrap()).collect();
    assert_eq!(texts[0], "/remember@KeelTestBot color blue", "{texts:#?}");
    assert_eq!(texts[1], "Remembered color.");
    assert!(texts.contains(&"color: blue"), "{texts:#?}");
    let seqs: Vec<i64> = turns.iter().map(|t| t["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, (1..=turns.len() as i64).collect::<Vec<_>>());
    assert_eq!(turns.iter().filter(|t| t["kind"] == "service").count(), 2);
    assert!(api_turns(&d, "telegram:-222").await.is_empty());
    // Memory and timers came along; new replies go to the new id.
    let id = tg.push_raw(group_command(new, 2, "/recall@KeelTestBot color"));
    confirmed(&tg, id).await;
    poll_until(DEADLINE, || async {
        (sent_to(&tg, new)
            .iter()
            .filter(|s| s["text"] == "color: blue")
            .count()
            == 2)
            .then_some(())
    })
    .await
    .expect("memory recalled in the supergroup");
    let timers = timers_json(&d).await.to_string();
    assert!(
        timers.contains("telegram:-1001555") && !timers.contains("telegram:-222"),
        "{timers}"
    );
    let accepted_old = sent_to(&tg, old).len();
    assert_eq!(accepted_old, 2, "only the two replies before the move");
    d.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telegram_kicked_bot_fails_unsent_replies_pauses_timers_and_resumes_when_back() {
    let tg = FakeTelegram::start();
    let mut d = daemon(Config::default(), &tg, "654:kick", FAST_BACKOFF);
    let chat = 4242;
    let session = "telegram:4242";
    tg.push_text(chat, "/remind every 1s --skip tick");
    d.boot().await;
    let ticks = |tg: &FakeTelegram| {
        sent_to(tg, chat)
            .iter()
            .filter(|s| s["text"].as_str().unwrap_or("").contains("tick"))
            .count()
    };
    poll_until(DEADLINE, || async { (ticks(&tg) >= 2).then_some(()) })
        .await
        .expect("the reminder fires");
    // Replies pile up unsent, then the user blocks the bot.
    tg.fail_sends((0..10_000).map(|_| Fault::api(502, "Bad Gateway", None)));
    poll_until(DEADLINE, || async {
        (replies_in(&d, session, "pending").await.len() >= 2).then_some(())
    })
    .await
    .expect("unsent reminders");
    tg.set_blocked(chat, true);
    tg.clear_send_faults();
    let kicked = tg.push_raw(bot_status(chat, "member", "kicked"));
    confirmed(&tg, kicked).await;
    // Every unsent reply failed with the reason; none is retried.
    poll_until(DEADLINE, || async {
        let open = replies_in(&d, session, "pending").await.len()
            + replies_in(&d, session, "unknown").await.len();
        (open == 0).then_some(())
    })
    .await
    .expect("no reply left pending");
    let failed = replies_in(&d, session, "failed").await;
    assert!(failed.len() >= 2, "{failed:#?}");
    assert!(
        failed.iter().all(|t| t["delivery"]["error"]
            .as_str()
            .unwrap_or("")
            .starts_with("chat unreachable")),
        "{failed:#?}"
    );
    let timers = timers_json(&d).await;
    assert_eq!(timers["timers"][0]["state"], "parked", "{timers}");
    let listed = d.get("/v1/sessions").await.unwrap().json();
    let me = listed["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == session)
        .cloned()
        .unwrap();
    assert!(
        me["unreachable"].as_str().unwrap().contains("kicked"),
        "{me}"
    );
    // Paused: for 3 s (three periods) nothing more is written or sent.
    let turns_then = api_turns(&d, session).await.len();
    let attempts_then = tg.send_attempts().len();
    let other = tg.push_text(5353, "/recall nothing");
    wait_answered_text(&tg, 5353, "I have nothing under nothing.").await;
    let waited = tokio::time::Instant::now();
    poll_until(Duration::from_secs(4), || async {
        (waited.elapsed() >= Duration::from_secs(3)).then_some(())
    })
    .await;
    assert!(other > kicked);
    assert_eq!(
        api_turns(&d, session).await.len(),
        turns_then,
        "no fire while paused"
    );
    let to_chat = tg.send_attempts()[attempts_then..]
        .iter()
        .filter(|s| s["chat_id"] == json!(chat))
        .count();
    assert_eq!(to_chat, 0, "nothing sent to an unreachable chat");
    // Back: the timer fires again, into the chat.
    tg.set_blocked(chat, false);
    let before = ticks(&tg);
    tg.push_raw(bot_status(chat, "kicked", "member"));
    poll_until(DEADLINE, || async { (ticks(&tg) > before).then_some(()) })
        .await
        .expect("the reminder fires again");
    assert_eq!(timers_json(&d).await["timers"][0]["state"], "active");
    // The member updates themselves were never answered.
    assert!(sent_to(&tg, chat).iter().all(|s| {
        let t = s["text"].as_str().unwrap_or("");
        t.contains("tick") || t.starts_with("Reminder #1 set")
    }));
    d.assert_no_panics();
}

const SECRET: &str = "tg-webhook-SECRET_canary-42";

/// A daemon in webhook mode with `SECRET` (not started).
fn webhook_daemon(tg: &FakeTelegram, token: &str) -> Daemon {
    let extra = format!("mode = \"webhook\"\nwebhook_secret = \"{SECRET}\"\n{FAST_BACKOFF}");
    daemon(Config::default(), tg, token, &extra)
}

/// POST one update to `/v1/telegram` with `secret` (none: no header).
async fn post_update(
    d: &Daemon,
    base: &str,
    secret: Option<&str>,
    body: &str,
) -> Result<common::Resp, reqwest::Error> {
    let mut req = d
        .client
        .post(format!("{base}/v1/telegram"))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(s) = secret {
        req = req.header("X-Telegram-Bot-Api-Secret-Token", s);
    }
    common::send(req).await
}

fn text_update(id: i64, chat: i64, text: &str) -> Value {
    json!({"update_id": id, "message": {"message_id": id, "date": 0,
        "chat": {"id": chat, "type": "private"},
        "from": {"id": chat, "is_bot": false, "first_name": "t"}, "text": text}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telegram_webhook_mode_checks_the_secret_stores_before_200_and_dedupes_by_update_id() {
    let tg = FakeTelegram::start();
    // Without a secret, webhook mode refuses to start with one line.
    let d = daemon(
        Config::default(),
        &tg,
        "135:hook",
        &format!("mode = \"webhook\"\n{FAST_BACKOFF}"),
    );
    let data = d.data_dir.to_string_lossy().into_owned();
    let config = d.config_path.to_string_lossy().into_owned();
    let out = d
        .cli(&[
            "run",
            "--data-dir",
            &data,
            "--config",
            &config,
            "--listen",
            "127.0.0.1:0",
        ])
        .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("webhook_secret"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let mut d = webhook_daemon(&tg, "135:hook");
    d.boot().await;
    let base = d.base();
    poll_until(DEADLINE, || async { (tg.me_calls() > 0).then_some(()) })
        .await
        .expect("getMe at start");
    let update = text_update(700, 77, "/recall hooked").to_string();
    // Missing, wrong and same-length-wrong secrets: 401, nothing stored.
    let wrong_same_len: String = SECRET.chars().rev().collect();
    for secret in [None, Some("nope"), Some(wrong_same_len.as_str()), Some("")] {
        let r = post_update(&d, &base, secret, &update).await.unwrap();
        assert_eq!(r.status, 401, "{secret:?}: {}", r.body);
        assert!(r.error_problem().is_none(), "{}", r.body);
    }
    let r = d.get("/v1/sessions/telegram:77/turns").await.unwrap();
    assert_eq!(r.status, 404, "nothing stored: {}", r.body);
    // Bad bodies with the right secret: one-line 400s.
    for bad in [
        "",
        "not json",
        "[]",
        "{\"message\": {}}",
        "{\"update_id\": \"7\"}",
    ] {
        let r = post_update(&d, &base, Some(SECRET), bad).await.unwrap();
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
        assert!(r.error_problem().is_none(), "{}", r.body);
    }
    // A malformed update is passed over (200 rejected), never retried forever.
    let r = post_update(
        &d,
        &base,
        Some(SECRET),
        r#"{"update_id": 699, "message": {"chat": {"id": "x"}, "text": "bad"}}"#,
    )
    .await
    .unwrap();
    assert_eq!(
        (r.status, r.json()["status"].clone()),
        (200, json!("rejected"))
    );
    // Stored before 200; a redelivery is a duplicate, stored and answered once.
    let r = post_update(&d, &base, Some(SECRET), &update).await.unwrap();
    assert_eq!(
        (r.status, r.json()["status"].clone()),
        (200, json!("accepted")),
        "{}",
        r.body
    );
    let turns = api_turns(&d, "telegram:77").await;
    assert_eq!(turns[0]["key"], "700", "durable when 200 came back");
    let r = post_update(&d, &base, Some(SECRET), &update).await.unwrap();
    assert_eq!(
        (r.status, r.json()["status"].clone()),
        (200, json!("duplicate"))
    );
    wait_answered_text(&tg, 77, "I have nothing under hooked.").await;
    // The same handling as polling: groups answer only when addressed, a
    // button press is answered, a kick is applied.
    let plain = json!({"update_id": 701, "message": {"message_id": 9, "date": 0,
        "chat": {"id": -333, "type": "group", "title": "g"},
        "from": {"id": 5, "is_bot": false, "first_name": "B"}, "text": "just chatting"}});
    let r = post_update(&d, &base, Some(SECRET), &plain.to_string())
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let press = json!({"update_id": 702, "callback_query": {"id": "cbq-1", "data": "yes",
        "chat_instance": "1", "from": {"id": 77, "is_bot": false, "first_name": "t"},
        "message": {"message_id": 3, "date": 0, "chat": {"id": 77, "type": "private"}, "text": "ok?"}}});
    let r = post_update(&d, &base, Some(SECRET), &press.to_string())
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    poll_until(DEADLINE, || async {
        tg.callback_answers()
            .iter()
            .any(|b| b["callback_query_id"] == "cbq-1")
            .then_some(())
    })
    .await
    .expect("answerCallbackQuery");
    let mut kicked = bot_status(77, "member", "kicked");
    kicked["update_id"] = json!(703);
    let r = post_update(&d, &base, Some(SECRET), &kicked.to_string())
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let listed = d.get("/v1/sessions").await.unwrap().json();
    assert!(listed.to_string().contains("chat unreachable"), "{listed}");
    let group = api_turns(&d, "telegram:-333").await;
    assert_eq!(group.len(), 1, "stored, not answered: {group:#?}");
    assert!(tg.offsets().is_empty(), "webhook mode never polls");
    // The poller's hostile updates through the route: each one 200
    // (stored, ignored or rejected) or a one-line 400, never a 5xx.
    for h in hostile_updates() {
        let r = post_update(&d, &base, Some(SECRET), &h.to_string())
            .await
            .unwrap();
        match r.status {
            200 => assert!(
                ["accepted", "duplicate", "ignored", "rejected"]
                    .contains(&r.json()["status"].as_str().unwrap_or("")),
                "{h}: {}",
                r.body
            ),
            400 => assert!(r.error_problem().is_none(), "{h}: {}", r.body),
            other => panic!("{h}: {other} {}", r.body),
        }
    }
    let r = post_update(
        &d,
        &base,
        Some(SECRET),
        &text_update(704, 77, "/recall alive").to_string(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "still answering: {}", r.body);
    // The secret never shows up in the log.
    assert!(!d.stderr_all().contains(SECRET));
    d.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telegram_webhook_deliveries_survive_two_sigkills_none_lost_none_duplicated() {
    use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
    use std::sync::Arc;
    let tg = FakeTelegram::start();
    let mut d = webhook_daemon(&tg, "246:hook-crash");
    d.boot().await;
    let port = Arc::new(AtomicU16::new(d.port));
    let acked = Arc::new(AtomicUsize::new(0));
    let total = 300i64;
    // Telegram's side: each update is POSTed until it gets a 200 (a
    // refused connection, a reset or a 503 is retried, as Telegram does),
    // four at a time, in update_id order.
    let sender = {
        let (port, acked) = (port.clone(), acked.clone());
        let client = common::http_client();
        tokio::spawn(async move {
            let next = Arc::new(AtomicUsize::new(0));
            let workers = (0..4).map(|_| {
                let (port, acked, next, client) =
                    (port.clone(), acked.clone(), next.clone(), client.clone());
                tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst) as i64;
                        if i >= total {
                            return;
                        }
                        let id = 9000 + i;
                        let body =
                            text_update(id, 6000 + i % 7, &format!("/recall k{id}")).to_string();
                        loop {
                            let url = format!(
                                "http://127.0.0.1:{}/v1/telegram",
                                port.load(Ordering::SeqCst)
                            );
                            let sent = client
                                .post(url)
                                .header("X-Telegram-Bot-Api-Secret-Token", SECRET)
                                .header("content-type", "application/json")
                                .body(body.clone())
                                .send()
                                .await;
                            if let Ok(r) = sent {
                                if r.status().as_u16() == 200 {
                                    acked.fetch_add(1, Ordering::SeqCst);
                                    break;
                                }
                            }
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                })
            });
            futures::future::join_all(workers).await;
        })
    };
    for kill_at in [60, 180] {
        poll_until(DEADLINE, || async {
            (acked.load(Ordering::SeqCst) >= kill_at).then_some(())
        })
        .await
        .expect("deliveries acknowledged");
        d.sigkill();
        d.restart().await;
        port.store(d.port, Ordering::SeqCst);
    }
    tokio::time::timeout(DEADLINE, sender)
        .await
        .expect("every update acknowledged")
        .unwrap();
    let ids: Vec<i64> = (9000..9000 + total).collect();
    wait_answered(&tg, &ids).await;
    let counts = d.user_key_counts().await;
    for id in &ids {
        assert_eq!(
            counts.get(&id.to_string()),
            Some(&1),
            "update {id} stored once"
        );
    }
    assert_eq!(counts.len(), ids.len(), "nothing invented");
    // keel answers every update exactly once (one reply turn each)...
    for (session, turns) in d.all_turns().await {
        let users = turns.iter().filter(|t| t.role == "user").count();
        let replies = turns.iter().filter(|t| t.role == "assistant").count();
        assert_eq!(users, replies, "{session}: one reply per update");
    }
    // ...and the transport is at-least-once: only a reply in flight at a
    // kill (sent, not yet marked sent) may reach Telegram twice.
    let twice = answered_ids(&tg.sent())
        .values()
        .filter(|n| **n > 1)
        .count();
    println!("{{\"webhook_crash\": {{\"updates\": {total}, \"kills\": 2, \"answered_twice\": {twice}}}}}");
    assert!(twice <= 2 * 7, "{twice} answered twice");
    assert!(tg.offsets().is_empty(), "webhook mode never polls");
    d.assert_no_panics();
}

/// The poller's lease row in a stopped or running daemon's store.
fn poller_lease(d: &Daemon) -> (String, i64, i64) {
    common::open_db(&d.db_path())
        .query_row(
            "SELECT holder, token, expires_ms FROM leases WHERE name LIKE 'poller:telegram:%'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .expect("the poller's lease row")
}

fn unix_ms() -> i64 {
    use keel_actors::clock::Clock;
    keel_actors::clock::WallClock.now_ms()
}

async fn wait_replies(tg: &FakeTelegram, n: usize) {
    let got = poll_until(DEADLINE, || async { (tg.sent().len() >= n).then_some(()) }).await;
    assert!(got.is_some(), "{} replies, waited for {n}", tg.sent().len());
}

/// R49: keel polls a bot only while it holds the bot's lease
/// (`poller:telegram:<bot>`). A restart after SIGKILL takes its dead
/// predecessor's lease back at once (same instance, newer epoch: token + 1,
/// which fences any late write of the old start) instead of waiting out its
/// expiry; a lease another instance holds is waited out, then taken over
/// with the next token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telegram_polls_only_under_the_bot_lease_and_a_restart_takes_it_back_at_once() {
    let tg = FakeTelegram::start();
    let mut d = daemon(Config::default(), &tg, "333:lease-test-token", FAST_BACKOFF);
    d.boot().await;
    tg.push_text(7100, "/recall first");
    wait_replies(&tg, 1).await;
    let (holder1, token1, _) = poller_lease(&d);

    d.sigkill();
    d.restart().await;
    tg.push_text(7100, "/recall second");
    wait_replies(&tg, 2).await;
    let (holder2, token2, _) = poller_lease(&d);
    assert_eq!(token2, token1 + 1, "{holder1} → {holder2}");
    let instance = |h: &str| h.rsplit_once('#').map(|(i, _)| i.to_string());
    assert_eq!(instance(&holder1), instance(&holder2));
    assert_ne!(holder1, holder2, "a new start holds it under its new epoch");
    assert!(
        !d.stderr_all().contains("waits for the bot's lease"),
        "the restart waited for its own predecessor's lease"
    );

    // Another instance holds the lease for 8 s more (planted while stopped).
    d.sigterm(DEADLINE).await;
    let until = unix_ms() + 8_000;
    common::open_db(&d.db_path())
        .execute(
            "UPDATE leases SET holder = 'elsewhere#1', expires_ms = ?1
             WHERE name LIKE 'poller:telegram:%'",
            [until],
        )
        .expect("plant the other holder");
    d.restart().await;
    tg.push_text(7100, "/recall third");
    assert!(
        d.wait_for_log("waits for the bot's lease", 1, DEADLINE)
            .await,
        "the poller did not wait for the lease"
    );
    wait_replies(&tg, 3).await;
    assert!(
        unix_ms() >= until,
        "answered while another instance held the bot's lease"
    );
    let (holder3, token3, _) = poller_lease(&d);
    assert_eq!(token3, token2 + 1);
    assert_eq!(instance(&holder3), instance(&holder2));
    let offsets = tg.offsets();
    assert_offsets_monotonic(&offsets);
    d.assert_no_panics();
}
