//! The Slack adapter against a fake Slack (real HTTP Web API and a real
//! Socket Mode WebSocket on 127.0.0.1), driving the real `keel` binary:
//! every envelope is acknowledged only once its turn is durable (checked by
//! the fake at ack time), a redelivered event is stored once, replies go out
//! with chat.postMessage; `disconnect` and a silent ("ghost") socket both
//! lead to a new socket, and the tokens never reach the log.

mod common;
#[path = "common/slack.rs"]
mod slack;

use std::time::Duration;

use common::{poll_until, Config, Daemon};
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
