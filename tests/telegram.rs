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
