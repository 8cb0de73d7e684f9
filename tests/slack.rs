//! The Slack adapter against a fake Slack (real HTTP Web API and a real
//! Socket Mode WebSocket on 127.0.0.1), driving the real `keel` binary:
//! every envelope is acknowledged only once its turn is durable (checked by
//! the fake at ack time), a redelivered event is stored once, replies go out
//! with chat.postMessage; `disconnect` and a silent ("ghost") socket both
//! lead to a new socket, and the tokens never reach the log. A server that
//! keeps disconnecting at once gets backoff, not a reconnect hot loop;
//! `invalid_auth` stops the adapter with that reason; a give-up notice for
//! another adapter reaches the owner over Slack; tokens may come from env.
//!
//! Issue 7 §3 (R40): a file is stored with its text and metadata and
//! answered; edits and deletions are revisions linked to the original turn;
//! bots' messages (keel's own, learnt from `auth.test`) and service messages
//! are stored, never answered; a reply to a threaded message carries its
//! `thread_ts`; an envelope redelivered three times is stored and answered
//! once; 20+ hostile frames are acked or skipped without a crash or a stored
//! turn; two SIGKILLs lose nothing acked and answer nothing twice; the
//! agent's replies go to the thread too and bots never reach it; a refused
//! bot token stops the adapter at `auth.test`.

mod common;
#[path = "common/slack.rs"]
mod slack;
#[path = "common/telegram.rs"]
mod telegram;

use std::collections::HashMap;
use std::time::Duration;

use common::{poll_until, AgentServer, Config, Daemon};
use serde_json::{json, Value};
use slack::{config_toml, FakeSlack, Socket, BOT_ID, BOT_USER};

const DEADLINE: Duration = Duration::from_secs(60);
const FAST_BACKOFF: &str =
    "\n[adapters]\nbackoff_initial_ms = 50\nbackoff_max_ms = 400\nattempts = 10\nseed = 1\n";

fn daemon(fake: &FakeSlack, silence_s: u64) -> Daemon {
    let d = Daemon::new(Config::default(), None);
    let text = d.config.to_toml()
        + &config_toml(
            &fake.api_base,
            "xapp-CANARY-app",
            "xoxb-CANARY-bot",
            silence_s,
        )
        + FAST_BACKOFF;
    d.write_config_text(&text);
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_acks_only_after_durable_dedups_redelivery_and_answers() {
    let fake = FakeSlack::start();
    let mut d = daemon(&fake, 30);
    d.spawn();
    assert!(d.wait_ready(common::READY_DEADLINE).await);
    fake.set_daemon(&d.base());
    fake.push_message("Ev1", "C1", "/recall k1");
    fake.push_message("Ev2", "C1", "/recall k2");
    fake.push_message("Ev3", "C2", "/recall k3");
    // Slack retries an event it thinks was not acknowledged: same event_id.
    fake.push_message("Ev1", "C1", "/recall k1");
    let acks = poll_until(DEADLINE, || async {
        let a = fake.acks();
        (a.len() == 4).then_some(a)
    })
    .await
    .expect("four acks");
    for a in &acks {
        assert!(a.stored_at_ack, "acked before durable: {a:?}");
    }
    let counts = d.user_key_counts().await;
    for ev in ["Ev1", "Ev2", "Ev3"] {
        assert_eq!(counts.get(ev), Some(&1), "{ev} stored once");
    }
    let posts = poll_until(DEADLINE, || async {
        let p = fake.posts();
        (p.len() >= 3).then_some(p)
    })
    .await
    .expect("replies posted");
    for k in ["k1", "k2", "k3"] {
        assert!(
            posts
                .iter()
                .any(|p| p["text"].as_str().unwrap_or("").contains(k)),
            "reply for {k}: {posts:?}"
        );
    }
    d.assert_no_panics();
}

/// A server that writes a long backlog before it reads a single ack (every
/// envelope not acked yet, as after a long outage) must not hold the socket
/// still: keel goes on reading while its acks wait to be written. The acks
/// of 200,000 envelopes are ~7 MB, more than both ends' socket buffers hold
/// (4 MB send, 128 KB receive here), so a reader that waits for each ack to
/// be written stops for good halfway and never reaches the last message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_a_backlog_written_before_any_ack_is_read_is_acked_on_one_socket() {
    const BACKLOG: usize = 200_000;
    let fake = FakeSlack::start();
    for n in 0..BACKLOG {
        let envelope = json!({"envelope_id": format!("b{n}"), "type": "events_api",
            "payload": {"event_id": format!("Evb{n}"), "type": "event_callback",
                        "event": {"type": "reaction_added"}}});
        fake.push_raw(envelope.to_string());
    }
    // After the backlog, on the same first write: a message to answer.
    fake.push_event(
        "EvAfter",
        msg("CAFTER", "U1", "/recall kafter", &fake.next_ts()),
        0,
    );
    let mut d = daemon(&fake, 30);
    d.boot().await;
    fake.set_daemon(&d.base());
    wait_post(&fake, "kafter").await;
    let acked = poll_until(DEADLINE, || async {
        let n = fake.ack_count();
        (n > BACKLOG).then_some(n)
    })
    .await
    .unwrap_or_else(|| panic!("acks stopped at {} of {}", fake.ack_count(), BACKLOG + 1));
    assert_eq!(acked, BACKLOG + 1);
    assert_eq!(fake.opens(), 1, "one socket carried the whole backlog");
    d.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_reconnects_after_a_silent_socket_and_on_disconnect() {
    let fake = FakeSlack::start();
    fake.script([Socket::Silent, Socket::Disconnect]);
    let mut d = daemon(&fake, 1);
    d.spawn();
    assert!(d.wait_ready(common::READY_DEADLINE).await);
    fake.set_daemon(&d.base());
    fake.push_message("Ev9", "C9", "/recall k9");
    let acks = poll_until(DEADLINE, || async {
        let a = fake.acks();
        (!a.is_empty()).then_some(a)
    })
    .await
    .expect("the event is acked on a live socket");
    assert_eq!(
        acks[0].socket, 3,
        "silent socket, then disconnect, then the third"
    );
    assert!(acks[0].stored_at_ack);
    assert!(fake.opens() >= 3);
    assert!(d.wait_for_log("socket silent", 1, DEADLINE).await);
    assert!(
        d.wait_for_log("slack asked to reconnect", 1, DEADLINE)
            .await
    );
    let status = d.sigterm(Duration::from_secs(10)).await;
    assert!(status.success());
    assert!(!d.stderr_all().contains("CANARY"), "a slack token leaked");
    d.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_backs_off_after_repeated_quick_disconnects_with_tokens_from_env() {
    let fake = FakeSlack::start();
    // Six sockets that say hello and `disconnect` at once: two runs of three
    // quick disconnects, each ending in a supervisor backoff.
    fake.script([Socket::Disconnect; 6]);
    let mut d = Daemon::new(Config::default(), None);
    let text = d.config.to_toml()
        + &format!(
            "\n[slack]\nenabled = true\napi_base = {}\nsilence_timeout_s = 30\n",
            serde_json::to_string(&fake.api_base).unwrap()
        )
        + FAST_BACKOFF;
    d.write_config_text(&text);
    d.env = vec![
        ("KEEL_SLACK_APP_TOKEN".into(), "xapp-CANARY-env".into()),
        ("KEEL_SLACK_BOT_TOKEN".into(), "xoxb-CANARY-env".into()),
    ];
    d.spawn();
    assert!(d.wait_ready(common::READY_DEADLINE).await);
    fake.set_daemon(&d.base());
    fake.push_message("Ev7", "C7", "/recall k7");
    let acks = poll_until(DEADLINE, || async {
        let a = fake.acks();
        (!a.is_empty()).then_some(a)
    })
    .await
    .expect("acked once the server stops disconnecting");
    assert_eq!(acks[0].socket, 7, "six disconnects, then a live socket");
    assert!(
        d.wait_for_log("slack keeps disconnecting", 2, DEADLINE)
            .await,
        "each run of quick disconnects ends in a backoff"
    );
    assert!(
        d.wait_for_log("restarting after backoff", 2, DEADLINE)
            .await
    );
    let metrics = d.get("/metrics").await.unwrap().body;
    assert!(
        metrics.contains(
            r#"keel_adapter_last_error{adapter="slack",error="slack keeps disconnecting"#
        ),
        "{metrics}"
    );
    // The reply goes out with the bot token from env.
    poll_until(DEADLINE, || async {
        fake.posts()
            .iter()
            .any(|p| p["text"].as_str().unwrap_or("").contains("k7"))
            .then_some(())
    })
    .await
    .expect("reply posted");
    assert!(!d.stderr_all().contains("CANARY"), "a slack token leaked");
    assert!(!metrics.contains("CANARY"), "a slack token leaked");
    d.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_invalid_auth_stops_the_adapter_with_a_clear_reason() {
    let fake = FakeSlack::start();
    let mut d = Daemon::new(Config::default(), None);
    // The fake answers `invalid_auth` to any app token not starting `xapp-`.
    let text = d.config.to_toml()
        + &config_toml(&fake.api_base, "revoked-CANARY", "xoxb-CANARY-bot", 30)
        + FAST_BACKOFF;
    d.write_config_text(&text);
    d.boot().await;
    assert!(
        d.wait_for_log("adapter stopped; it will not be restarted", 1, DEADLINE)
            .await
    );
    let status = d.status_json().await;
    let v: Value = serde_json::from_slice(&status.stdout).expect("status json");
    assert_eq!(v["adapters"]["slack"]["state"], "stopped", "{v}");
    assert_eq!(
        v["adapters"]["slack"]["last_error"],
        "token rejected (HTTP 401): apps.connections.open: invalid_auth"
    );
    // No retry storm: started once.
    let log = d.stderr_all();
    let slack_starts = log
        .lines()
        .filter(|l| l.contains("adapter started") && l.contains("slack"))
        .count();
    assert_eq!(slack_starts, 1, "started once, never restarted");
    assert!(!log.contains("CANARY"), "a slack token leaked");
    // The rest of keel keeps working.
    let r = d.post_ok("after-401", "c1", "/help").await;
    assert_eq!(r["status"], "accepted");
    d.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_give_up_notice_reaches_the_owner_over_slack() {
    let fake = FakeSlack::start();
    let tg = telegram::FakeTelegram::start();
    tg.fail_polls(vec![telegram::Fault::api(401, "Unauthorized", None)]);
    let mut d = Daemon::new(Config::default(), None);
    let text = d.config.to_toml()
        + "\n[owner]\nchannel = \"slack\"\nchat = \"COWNER\"\n"
        + &config_toml(&fake.api_base, "xapp-CANARY-app", "xoxb-CANARY-bot", 30)
        + &telegram::config_toml(&tg.url, "444:CANARYrevokedtoken", "")
        + FAST_BACKOFF;
    d.write_config_text(&text);
    d.boot().await;
    let notice = poll_until(DEADLINE, || async {
        fake.posts().into_iter().find(|p| {
            p["text"]
                .as_str()
                .unwrap_or("")
                .starts_with("adapter telegram gave up")
        })
    })
    .await
    .expect("the owner is told over slack");
    assert_eq!(notice["channel"], "COWNER");
    assert!(notice["text"].as_str().unwrap().contains("HTTP 401"));
    assert!(!d.stderr_all().contains("CANARY"), "a token leaked");
    d.assert_no_panics();
}

/// The raw turns of a session (with `meta` and `revises`).
async fn raw_turns(d: &Daemon, session: &str) -> Vec<Value> {
    let r = d
        .get(&format!(
            "/v1/sessions/{}/turns",
            common::encode_segment(session)
        ))
        .await
        .expect("GET turns");
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["turns"].as_array().cloned().unwrap_or_default()
}

/// Posts whose text mentions `needle`.
fn posts_with(fake: &FakeSlack, needle: &str) -> Vec<Value> {
    fake.posts()
        .into_iter()
        .filter(|p| p["text"].as_str().unwrap_or("").contains(needle))
        .collect()
}

/// Wait until a reply mentioning `needle` went out.
async fn wait_post(fake: &FakeSlack, needle: &str) -> Value {
    poll_until(DEADLINE, || async {
        posts_with(fake, needle).into_iter().next()
    })
    .await
    .unwrap_or_else(|| panic!("no reply with {needle}: {:?}", fake.posts()))
}

/// Wait until `n` acks came in.
async fn wait_acks(fake: &FakeSlack, n: usize) -> Vec<slack::Ack> {
    poll_until(DEADLINE, || async {
        let a = fake.acks();
        (a.len() >= n).then_some(a)
    })
    .await
    .unwrap_or_else(|| panic!("{n} acks expected, got {:?}", fake.acks()))
}

fn msg(channel: &str, user: &str, text: &str, ts: &str) -> Value {
    json!({"type": "message", "channel": channel, "user": user, "text": text, "ts": ts,
           "channel_type": "channel", "team": "T1"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_files_threads_edits_deletions_and_bots_as_users_send_them() {
    let fake = FakeSlack::start();
    let mut d = daemon(&fake, 30);
    d.boot().await;
    fake.set_daemon(&d.base());
    let c = "CMIX";
    // A file with a caption: stored with its metadata, answered.
    let file_ts = fake.next_ts();
    let mut file = msg(c, "U1", "/recall kfile", &file_ts);
    file["subtype"] = json!("file_share");
    file["upload"] = json!(false);
    file["files"] = json!([{
        "id": "F0001", "created": 1_700_000_000, "name": "report.pdf", "title": "Report",
        "mimetype": "application/pdf", "filetype": "pdf", "size": 12345, "mode": "hosted",
        "is_external": false, "user": "U1",
        "url_private": "https://files.slack.com/files-pri/T1-F0001/report.pdf",
        "url_private_download": "https://files.slack.com/files-pri/T1-F0001/download/report.pdf",
        "permalink": "https://fake.slack.com/files/U1/F0001/report.pdf"
    }]);
    fake.push_event("EvFile", file, 0);
    // A top-level message: the reply goes to the channel.
    let top_ts = fake.next_ts();
    fake.push_event("EvTop", msg(c, "U1", "/recall ktop", &top_ts), 0);
    // A reply inside the thread the file started: the reply goes there.
    let mut threaded = msg(c, "U2", "/recall kthread", &fake.next_ts());
    threaded["thread_ts"] = json!(file_ts);
    threaded["parent_user_id"] = json!("U1");
    fake.push_event("EvThread", threaded, 0);
    // The file's caption edited, the top-level message deleted.
    let edited_ts = fake.next_ts();
    fake.push_event(
        "EvEdit",
        json!({"type": "message", "subtype": "message_changed", "channel": c, "hidden": true,
               "ts": edited_ts, "event_ts": edited_ts,
               "message": {"type": "message", "user": "U1", "text": "/recall kedited",
                           "ts": file_ts, "edited": {"user": "U1", "ts": edited_ts}},
               "previous_message": {"type": "message", "user": "U1", "text": "/recall kfile",
                                    "ts": file_ts}}),
        0,
    );
    let del_ts = fake.next_ts();
    fake.push_event(
        "EvDel",
        json!({"type": "message", "subtype": "message_deleted", "channel": c, "hidden": true,
               "ts": del_ts, "deleted_ts": top_ts, "event_ts": del_ts,
               "previous_message": {"type": "message", "user": "U1", "text": "/recall ktop",
                                    "ts": top_ts}}),
        0,
    );
    // Bots: another bot, a bot_message, keel's own post (its bot id and
    // user) and keel's own user without a bot id (known from auth.test).
    let mut other = msg(c, "U9", "/recall kbot1", &fake.next_ts());
    other["bot_id"] = json!("B0OTHER");
    fake.push_event("EvBot1", other, 0);
    fake.push_event(
        "EvBot2",
        json!({"type": "message", "subtype": "bot_message", "channel": c, "bot_id": "B0HOOK",
               "username": "ci", "text": "/recall kbot2", "ts": fake.next_ts()}),
        0,
    );
    let mut own = msg(c, BOT_USER, "/recall kbot3", &fake.next_ts());
    own["bot_id"] = json!(BOT_ID);
    own["app_id"] = json!("A1");
    fake.push_event("EvBot3", own, 0);
    fake.push_event(
        "EvBot4",
        msg(c, BOT_USER, "/recall kbot4", &fake.next_ts()),
        0,
    );
    // A service message and an unknown future subtype: stored, not answered.
    let mut join = msg(
        c,
        "U3",
        "<@U3> has joined the channel /recall kjoin",
        &fake.next_ts(),
    );
    join["subtype"] = json!("channel_join");
    fake.push_event("EvJoin", join, 0);
    let mut future = msg(c, "U3", "/recall kfuture", &fake.next_ts());
    future["subtype"] = json!("huddle_thread");
    fake.push_event("EvFuture", future, 0);
    // An edit that changes nothing the user wrote (a link unfurl): ignored.
    let unfurl = fake.push_event(
        "EvUnfurl",
        json!({"type": "message", "subtype": "message_changed", "channel": c, "hidden": true,
               "message": {"user": "U1", "text": "/recall ktop", "ts": top_ts, "attachments": [{"id": 1}]},
               "previous_message": {"user": "U1", "text": "/recall ktop", "ts": top_ts}}),
        0,
    );
    // Last, in the same session: once it is answered, all above are done.
    fake.push_event("EvEnd", msg(c, "U1", "/recall kend", &fake.next_ts()), 0);
    let acks = wait_acks(&fake, 13).await;
    for a in acks.iter().filter(|a| a.envelope_id != unfurl) {
        assert!(a.stored_at_ack, "acked before durable: {a:?}");
    }
    wait_post(&fake, "kend").await;
    assert!(fake.auth_tests() >= 1, "auth.test called at start");

    // Replies: the file, the top-level message, the thread reply, the last.
    let file_reply = wait_post(&fake, "kfile").await;
    assert!(file_reply.get("thread_ts").is_none(), "{file_reply}");
    let top_reply = wait_post(&fake, "ktop").await;
    assert!(top_reply.get("thread_ts").is_none(), "{top_reply}");
    let thread_reply = wait_post(&fake, "kthread").await;
    assert_eq!(thread_reply["thread_ts"], json!(file_ts), "{thread_reply}");
    assert_eq!(thread_reply["channel"], c);
    for never in [
        "kedited", "kbot1", "kbot2", "kbot3", "kbot4", "kjoin", "kfuture",
    ] {
        assert!(posts_with(&fake, never).is_empty(), "{never} was answered");
    }
    assert_eq!(fake.posts().len(), 4, "{:?}", fake.posts());

    let turns = raw_turns(&d, &format!("slack:{c}")).await;
    let by_key = |k: &str| -> Value {
        turns
            .iter()
            .find(|t| t["key"] == k)
            .cloned()
            .unwrap_or_else(|| panic!("{k} not stored: {turns:?}"))
    };
    let f = by_key("EvFile");
    assert_eq!(f["kind"], "file");
    assert_eq!(f["text"], "/recall kfile");
    let meta_file = &f["meta"]["files"][0];
    assert_eq!(meta_file["id"], "F0001");
    assert_eq!(meta_file["name"], "report.pdf");
    assert_eq!(meta_file["mimetype"], "application/pdf");
    assert_eq!(meta_file["size"], 12345);
    assert_eq!(
        meta_file["url_private"],
        "https://files.slack.com/files-pri/T1-F0001/report.pdf"
    );
    let e = by_key("EvEdit");
    assert_eq!(
        (&e["kind"], &e["text"], &e["revises"]),
        (&json!("edit"), &json!("/recall kedited"), &f["seq"])
    );
    let del = by_key("EvDel");
    assert_eq!(
        (&del["kind"], &del["text"], &del["revises"]),
        (&json!("deleted"), &json!(""), &by_key("EvTop")["seq"])
    );
    assert_eq!(by_key("EvThread")["meta"]["thread_ts"], json!(file_ts));
    assert_eq!(by_key("EvBot3")["meta"]["own"], true);
    assert_eq!(by_key("EvBot4")["meta"]["own"], true);
    assert_eq!(by_key("EvBot2")["from"], "B0HOOK");
    assert_eq!(by_key("EvJoin")["kind"], "service");
    assert_eq!(by_key("EvJoin")["meta"]["subtype"], "channel_join");
    assert_eq!(by_key("EvFuture")["kind"], "service");
    assert!(turns.iter().all(|t| t["key"] != "EvUnfurl"));
    // Exactly one reply per answered message, none for the stored-only ones.
    let user = turns.iter().filter(|t| t["role"] == "user").count();
    let replies = turns.iter().filter(|t| t["role"] == "assistant").count();
    assert_eq!((user, replies), (12, 4), "{turns:#?}");
    d.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_redelivered_envelope_is_stored_and_answered_once() {
    let fake = FakeSlack::start();
    let mut d = daemon(&fake, 30);
    d.boot().await;
    fake.set_daemon(&d.base());
    let ts = fake.next_ts();
    let event = msg("CRE", "U1", "/recall kretry", &ts);
    // The first delivery and three retries (Slack thought it unacked).
    for attempt in 0..4 {
        fake.push_event("EvRetry", event.clone(), attempt);
    }
    fake.push_event(
        "EvAfter",
        msg("CRE", "U1", "/recall kafter", &fake.next_ts()),
        0,
    );
    let acks = wait_acks(&fake, 5).await;
    assert!(acks.iter().all(|a| a.stored_at_ack), "{acks:?}");
    wait_post(&fake, "kafter").await;
    assert_eq!(posts_with(&fake, "kretry").len(), 1, "{:?}", fake.posts());
    let counts = d.user_key_counts().await;
    assert_eq!(counts.get("EvRetry"), Some(&1));
    let turns = raw_turns(&d, "slack:CRE").await;
    assert_eq!(turns.len(), 4, "two messages, two replies: {turns:#?}");
    let metrics = d.get("/metrics").await.unwrap().body;
    for line in [
        r#"keel_inbound_messages_total{channel="slack",outcome="accepted"} 2"#,
        r#"keel_inbound_messages_total{channel="slack",outcome="duplicate"} 3"#,
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    d.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_hostile_frames_are_acked_or_skipped_without_a_crash() {
    let fake = FakeSlack::start();
    let mut d = daemon(&fake, 30);
    d.boot().await;
    fake.set_daemon(&d.base());
    let env = |id: &str, payload: Value| {
        json!({"envelope_id": id, "type": "events_api", "retry_attempt": 0,
               "payload": payload})
        .to_string()
    };
    let ev = |id: &str, event: Value| {
        env(
            id,
            json!({"event_id": format!("Ev-{id}"), "type": "event_callback", "event": event}),
        )
    };
    let m = |extra: Value| {
        let mut e =
            json!({"type": "message", "channel": "CBAD", "user": "U1", "text": "x", "ts": "1.1"});
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                e.as_object_mut().unwrap().remove(k);
            } else {
                e[k] = v.clone();
            }
        }
        e
    };
    let nested = "[".repeat(5000) + &"]".repeat(5000);
    // Frames with a string envelope_id must be acked (else Slack resends
    // them forever); the rest cannot be.
    let acked: Vec<(&str, String)> = vec![
        ("bad-1", env("bad-1", json!("a string payload"))),
        ("bad-2", env("bad-2", json!([1, 2, 3]))),
        (
            "bad-3",
            env(
                "bad-3",
                json!({"event_id": "Ev-bad-3", "event": [m(json!({}))]}),
            ),
        ),
        ("bad-4", ev("bad-4", m(json!({"type": 7})))),
        ("bad-5", ev("bad-5", m(json!({"text": 42})))),
        ("bad-6", ev("bad-6", m(json!({"channel": null})))),
        ("bad-7", ev("bad-7", m(json!({"user": {"id": "U1"}})))),
        ("bad-8", ev("bad-8", m(json!({"text": "nul \u{0} inside"})))),
        (
            "bad-9",
            ev("bad-9", m(json!({"text": "h".repeat(1 << 20)}))),
        ),
        ("bad-10", ev("bad-10", m(json!({"subtype": 12})))),
        (
            "bad-11",
            ev(
                "bad-11",
                m(json!({"subtype": "from_the_future", "user": null, "text": null})),
            ),
        ),
        (
            "bad-12",
            ev(
                "bad-12",
                m(json!({"subtype": "file_share", "text": "", "files": "nope"})),
            ),
        ),
        (
            "bad-13",
            ev(
                "bad-13",
                m(
                    json!({"subtype": "file_share", "text": "", "files": [1, null, {"id": 5}, {"id": ""}]}),
                ),
            ),
        ),
        (
            "bad-14",
            ev(
                "bad-14",
                m(json!({"subtype": "message_changed", "message": "garbage"})),
            ),
        ),
        (
            "bad-15",
            ev(
                "bad-15",
                m(
                    json!({"subtype": "message_changed", "message": {"user": "U1", "text": "no ts"}}),
                ),
            ),
        ),
        (
            "bad-16",
            ev(
                "bad-16",
                m(json!({"subtype": "message_deleted", "deleted_ts": {"x": 1}})),
            ),
        ),
        ("bad-17", ev("bad-17", m(json!({"ts": "not-a-ts"})))),
        ("bad-18", ev("bad-18", m(json!({"thread_ts": [1]})))),
        ("bad-19", ev("bad-19", m(json!({"text": "   \n\t "})))),
        (
            "bad-20",
            env(
                "bad-20",
                json!({"event_id": "E\u{1b}[31m", "event": m(json!({}))}),
            ),
        ),
        (
            "bad-21",
            env(
                "bad-21",
                json!({"event_id": "x".repeat(5000), "event": m(json!({}))}),
            ),
        ),
        (
            "bad-22",
            ev("bad-22", m(json!({"channel": "C\u{202e}LIVE"}))),
        ),
        (
            "bad-23",
            json!({"envelope_id": "bad-23", "type": "mystery"}).to_string(),
        ),
        (
            "bad-24",
            json!({"envelope_id": "bad-24", "type": "events_api"}).to_string(),
        ),
    ];
    let skipped: Vec<String> = vec![
        "{\"type\": ".into(),
        "[]".into(),
        "\"hello\"".into(),
        "null".into(),
        nested,
        json!({"envelope_id": 5, "type": "events_api", "payload": {"event_id": "Ev-num", "event": m(json!({}))}}).to_string(),
        json!({"type": "events_api", "payload": {"event_id": "Ev-noenv", "event": m(json!({}))}}).to_string(),
    ];
    assert!(acked.len() + skipped.len() >= 15);
    for f in &skipped {
        fake.push_raw(f.clone());
    }
    for (_, f) in &acked {
        fake.push_raw(f.clone());
    }
    fake.push_event(
        "EvGood",
        msg("CGOOD", "U1", "/recall kgood", &fake.next_ts()),
        0,
    );
    wait_post(&fake, "kgood").await;
    // The fake reads acks in order: the last one is the good message's.
    let acks = wait_acks(&fake, acked.len() + 1).await;
    for (id, _) in &acked {
        assert!(
            acks.iter().any(|a| a.envelope_id == *id),
            "{id} not acked: {acks:?}"
        );
    }
    assert_eq!(acks.len(), acked.len() + 1, "{acks:?}");
    assert_eq!(fake.opens(), 1, "the socket survived every frame");
    let metrics = d.get("/metrics").await.unwrap().body;
    assert!(
        metrics.contains(r#"keel_inbound_messages_total{channel="slack",outcome="rejected"} 18"#),
        "{metrics}"
    );
    assert_eq!(d.session_ids().await, vec!["slack:CGOOD".to_string()]);
    assert_eq!(d.user_key_counts().await.len(), 1);
    assert!(d.healthz().await.unwrap().status == 200);
    let log = d.stderr_all();
    assert!(!log.contains("nul "), "message content reached the log");
    d.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_survives_two_sigkills_nothing_acked_lost_nothing_answered_twice() {
    let fake = FakeSlack::start();
    let mut d = daemon(&fake, 30);
    let mut by_env: HashMap<String, String> = HashMap::new();
    let n = 400;
    for i in 0..n {
        let ev = format!("EvK{i}");
        let channel = format!("CK{}", i % 3);
        let env = fake.push_event(
            &ev,
            msg(&channel, "U1", &format!("/recall k{i}."), &fake.next_ts()),
            0,
        );
        by_env.insert(env, ev);
    }
    d.boot().await;
    let mut acked_before_kill: Vec<String> = Vec::new();
    for kill_at in [60, 200] {
        wait_acks(&fake, kill_at).await;
        d.sigkill();
        acked_before_kill = fake
            .acks()
            .iter()
            .map(|a| by_env[&a.envelope_id].clone())
            .collect();
        eprintln!(
            "killed at {} acks, {} posts",
            acked_before_kill.len(),
            fake.posts().len()
        );
        assert!(acked_before_kill.len() < n, "the kill lands mid-stream");
        d.restart().await;
    }
    fake.set_daemon(&d.base());
    // Everything is acked in the end (unacked envelopes are resent on the
    // new socket, stored ones come back as duplicates).
    poll_until(DEADLINE, || async {
        let acked: std::collections::HashSet<String> = fake
            .acks()
            .iter()
            .map(|a| by_env[&a.envelope_id].clone())
            .collect();
        (acked.len() == n).then_some(())
    })
    .await
    .expect("every event acked");
    for i in 0..n {
        wait_post(&fake, &format!("k{i}.")).await;
    }
    let counts = d.user_key_counts().await;
    for ev in &acked_before_kill {
        assert_eq!(counts.get(ev), Some(&1), "{ev} was acked before a kill");
    }
    for i in 0..n {
        assert_eq!(
            counts.get(&format!("EvK{i}")),
            Some(&1),
            "EvK{i} stored once"
        );
    }
    assert_eq!(counts.len(), n, "nothing invented");
    // One reply per message in the store.
    for c in 0..3 {
        let turns = raw_turns(&d, &format!("slack:CK{c}")).await;
        let user = turns.iter().filter(|t| t["role"] == "user").count();
        let replies = turns.iter().filter(|t| t["role"] == "assistant").count();
        assert_eq!(user, replies, "CK{c}: one reply per message");
    }
    // On the wire: a reply in flight at a kill may be resent (the outbox is
    // at-least-once: accepted but not yet marked sent), at most one per
    // session per kill; nothing else twice.
    let mut wire: HashMap<String, usize> = HashMap::new();
    for p in fake.posts() {
        let text = p["text"].as_str().unwrap_or("").to_string();
        *wire.entry(text).or_insert(0) += 1;
    }
    let extra: usize = wire.values().map(|c| c - 1).sum();
    assert!(
        extra <= 2 * 3,
        "answered twice beyond the in-flight window: {wire:?}"
    );
    assert_eq!(d.boots, 3);
    d.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_a_refused_bot_token_stops_the_adapter_at_auth_test() {
    let fake = FakeSlack::start();
    let mut d = Daemon::new(Config::default(), None);
    // The fake answers `invalid_auth` to any bot token not starting `xoxb-`.
    let text = d.config.to_toml()
        + &config_toml(&fake.api_base, "xapp-CANARY-app", "revoked-CANARY", 30)
        + FAST_BACKOFF;
    d.write_config_text(&text);
    d.boot().await;
    assert!(
        d.wait_for_log("adapter stopped; it will not be restarted", 1, DEADLINE)
            .await
    );
    let status = d.status_json().await;
    let v: Value = serde_json::from_slice(&status.stdout).expect("status json");
    assert_eq!(v["adapters"]["slack"]["state"], "stopped", "{v}");
    assert_eq!(
        v["adapters"]["slack"]["last_error"],
        "token rejected (HTTP 401): auth.test: invalid_auth"
    );
    assert_eq!(fake.opens(), 0, "no socket without a working bot token");
    assert!(!d.stderr_all().contains("CANARY"), "a slack token leaked");
    d.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_agent_replies_go_to_the_thread_and_bots_never_reach_the_agent() {
    let fake = FakeSlack::start();
    let agent = AgentServer::start();
    let mut d = Daemon::new(
        Config {
            agent: Some((agent.url.clone(), 5_000, 2)),
            ..Config::default()
        },
        None,
    );
    // Every channel message is answered here (not only addressed ones).
    let text = d.config.to_toml()
        + &config_toml(&fake.api_base, "xapp-CANARY-app", "xoxb-CANARY-bot", 30)
        + "channel_replies = \"all\"\n"
        + FAST_BACKOFF;
    d.write_config_text(&text);
    d.boot().await;
    fake.set_daemon(&d.base());
    let parent = fake.next_ts();
    let mut threaded = msg("CAG", "U1", "what about this one", &fake.next_ts());
    threaded["thread_ts"] = json!(parent);
    fake.push_event("EvAg1", threaded, 0);
    let mut file = msg("CAG", "U1", "summarise the attachment", &fake.next_ts());
    file["subtype"] = json!("file_share");
    file["files"] = json!([{"id": "F9", "name": "notes.txt", "mimetype": "text/plain", "size": 3}]);
    fake.push_event("EvAg2", file, 0);
    let in_thread = wait_post(&fake, "agent: what about this one").await;
    assert_eq!(in_thread["thread_ts"], json!(parent), "{in_thread}");
    let top = wait_post(&fake, "agent: summarise the attachment").await;
    assert!(top.get("thread_ts").is_none(), "{top}");
    // A bot's message never reaches the agent.
    let mut bot = msg("CAG", "U7", "bot chatter", &fake.next_ts());
    bot["bot_id"] = json!("B7");
    fake.push_event("EvAg3", bot, 0);
    fake.push_event("EvAg4", msg("CAG", "U1", "last one", &fake.next_ts()), 0);
    wait_post(&fake, "agent: last one").await;
    let asked: Vec<String> = agent
        .requests()
        .iter()
        .map(|r| r["text"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        !asked.iter().any(|t| t.contains("bot chatter")),
        "{asked:?}"
    );
    assert_eq!(asked.len(), 3, "{asked:?}");
    d.assert_no_panics();
}

const SAVED: &str = "Got it — your message is saved. Send /help to see what I can do.";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_channels_answer_only_when_addressed_and_long_replies_are_split() {
    let fake = FakeSlack::start();
    let mut d = daemon(&fake, 30);
    d.boot().await;
    fake.set_daemon(&d.base());
    let c = "CADR";
    let in_channel = |text: &str, ts: &str| msg(c, "U1", text, ts);
    // Not addressed: stored, never answered.
    fake.push_event("EvA1", in_channel("hello everyone", &fake.next_ts()), 0);
    // A mention, a command: answered at the channel.
    fake.push_event(
        "EvA2",
        in_channel(&format!("<@{BOT_USER}> are you there?"), &fake.next_ts()),
        0,
    );
    fake.push_event("EvA3", in_channel("/recall kaddr", &fake.next_ts()), 0);
    // A thread: addressed once, then keel is in it; another thread is not.
    let t1 = fake.next_ts();
    let mut first = in_channel(
        &format!("<@{BOT_USER}> a question in a thread"),
        &fake.next_ts(),
    );
    first["thread_ts"] = json!(t1);
    fake.push_event("EvA4", first, 0);
    poll_until(DEADLINE, || async {
        posts_with(&fake, SAVED)
            .iter()
            .any(|p| p["thread_ts"] == json!(t1))
            .then_some(())
    })
    .await
    .expect("answered in the thread");
    let mut follow = in_channel("and what about this", &fake.next_ts());
    follow["thread_ts"] = json!(t1);
    fake.push_event("EvA5", follow, 0);
    let mut elsewhere = in_channel("unrelated thread chatter", &fake.next_ts());
    elsewhere["thread_ts"] = json!(fake.next_ts());
    fake.push_event("EvA6", elsewhere, 0);
    // A thread under one of keel's own messages.
    let mut under_keel = in_channel("replying to keel", &fake.next_ts());
    under_keel["thread_ts"] = json!(fake.next_ts());
    under_keel["parent_user_id"] = json!(BOT_USER);
    fake.push_event("EvA7", under_keel, 0);
    // A direct message is always answered.
    let mut dm = msg("DKEEL", "U1", "plain direct message", &fake.next_ts());
    dm["channel_type"] = json!("im");
    fake.push_event("EvA8", dm, 0);
    fake.push_event("EvA9", in_channel("/recall kend", &fake.next_ts()), 0);
    wait_post(&fake, "kend").await;
    poll_until(DEADLINE, || async {
        (posts_with(&fake, SAVED).len() >= 5).then_some(())
    })
    .await
    .expect("the addressed messages answered");
    let saved: Vec<Value> = posts_with(&fake, SAVED);
    let places: Vec<(String, Option<String>)> = saved
        .iter()
        .map(|p| {
            (
                p["channel"].as_str().unwrap().to_string(),
                p["thread_ts"].as_str().map(str::to_string),
            )
        })
        .collect();
    // mention (channel), both in t1, under keel's message, DM.
    assert_eq!(places.len(), 5, "{saved:#?}");
    assert_eq!(
        places
            .iter()
            .filter(|p| p.1.as_deref() == Some(t1.as_str()))
            .count(),
        2
    );
    assert!(places.contains(&(c.to_string(), None)));
    assert!(places.contains(&(c.to_string(), Some(t1.clone()))));
    assert!(places.contains(&("DKEEL".to_string(), None)));
    let turns = d.turns("slack:CADR").await;
    let users = turns.iter().filter(|t| t.role == "user").count();
    assert_eq!(users, 8, "every message stored");
    let r = d.get("/v1/sessions/slack:CADR/turns").await.unwrap().json();
    let hello = r["turns"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["text"] == "hello everyone")
        .cloned()
        .unwrap();
    assert_eq!(hello["meta"]["addressed"], false, "{hello}");
    assert!(posts_with(&fake, "unrelated").is_empty());
    assert_eq!(
        fake.posts().iter().filter(|p| p["channel"] == c).count(),
        6,
        "mention, 2 commands, 2 in t1, under keel: {:#?}",
        fake.posts()
    );

    // A reply over Slack's limit goes out as several messages, in order,
    // split at lines, each within the limit.
    let line = "lorem ipsum ".repeat(16);
    for i in 0..30 {
        let mut m = msg("DLONG", "U1", &line, &fake.next_ts());
        m["channel_type"] = json!("im");
        fake.push_event(&format!("EvL{i}"), m, 0);
    }
    poll_until(DEADLINE, || async {
        (fake
            .posts()
            .iter()
            .filter(|p| p["channel"] == "DLONG")
            .count()
            == 30)
            .then_some(())
    })
    .await
    .expect("30 acknowledgements");
    let mut history = msg("DLONG", "U1", "/history 50", &fake.next_ts());
    history["channel_type"] = json!("im");
    fake.push_event("EvLH", history, 0);
    let parts = poll_until(DEADLINE, || async {
        let posts: Vec<Value> = fake
            .posts()
            .into_iter()
            .filter(|p| p["channel"] == "DLONG")
            .skip(30)
            .collect();
        let turns = d.turns("slack:DLONG").await;
        // 31 messages and 31 replies, the last one sent (all its parts).
        let done = turns.len() == 62
            && turns
                .last()
                .is_some_and(|t| t.role == "assistant" && t.sent == Some(true));
        done.then_some(posts)
    })
    .await
    .expect("the long reply sent");
    let texts: Vec<String> = parts
        .iter()
        .map(|p| p["text"].as_str().unwrap().to_string())
        .collect();
    assert!(texts.len() >= 2, "{texts:#?}");
    assert!(texts.iter().all(|t| t.encode_utf16().count() <= 4000));
    let reply = d.turns("slack:DLONG").await.last().unwrap().text.clone();
    assert_eq!(texts.join("\n"), reply, "every part once, in order");
    d.assert_no_panics();
}
