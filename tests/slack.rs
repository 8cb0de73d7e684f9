//! The Slack adapter against a fake Slack (real HTTP Web API and a real
//! Socket Mode WebSocket on 127.0.0.1), driving the real `keel` binary:
//! every envelope is acknowledged only once its turn is durable (checked by
//! the fake at ack time), a redelivered event is stored once, replies go out
//! with chat.postMessage; `disconnect` and a silent ("ghost") socket both
//! lead to a new socket, and the tokens never reach the log. A server that
//! keeps disconnecting at once gets backoff, not a reconnect hot loop;
//! `invalid_auth` stops the adapter with that reason; a give-up notice for
//! another adapter reaches the owner over Slack; tokens may come from env.

mod common;
#[path = "common/slack.rs"]
mod slack;
#[path = "common/telegram.rs"]
mod telegram;

use std::time::Duration;

use common::{poll_until, Config, Daemon};
use serde_json::Value;
use slack::{config_toml, FakeSlack, Socket};

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
