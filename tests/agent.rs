//! The external agent path and the owner notification, end to end on the real
//! binary: free text is acknowledged at once and answered by the agent through
//! the outbox; commands never reach the agent; an unreachable agent gets the
//! user an apology instead of silence; a turn left waiting for the agent by a
//! SIGKILL is answered after the restart (R3, R18).

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{poll_every, AgentServer, Config, Daemon, HangServer, ReplyServer};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn free_text_goes_to_the_agent_and_commands_stay_local() {
    let agent = AgentServer::start();
    let replies = ReplyServer::start();
    let mut d = Daemon::start(Config {
        reply_url: Some(replies.url.clone()),
        agent: Some((agent.url.clone(), 5_000, 2)),
        ..Config::default()
    })
    .await;
    d.post_ok("m1", "c1", "what is the weather").await;
    assert_eq!(
        replies.reply_to("m1", DEADLINE).await,
        "agent: what is the weather"
    );
    let req = &agent.requests()[0];
    assert_eq!(req["session"], "webhook:c1");
    assert_eq!(req["key"], "m1");
    d.post_ok("m2", "c1", "/remember city Oslo").await;
    assert_eq!(replies.reply_to("m2", DEADLINE).await, "Remembered city.");
    assert_eq!(agent.requests().len(), 1, "a command reached the agent");
    // The stored conversation: question, agent answer (sent), command, reply.
    let turns = d.turns("webhook:c1").await;
    let roles: Vec<&str> = turns.iter().map(|t| t.role.as_str()).collect();
    assert_eq!(roles, ["user", "assistant", "user", "assistant"]);
    assert!(d.sigterm(DEADLINE).await.success());
    d.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_agent_gets_the_user_an_apology_not_silence() {
    let agent = AgentServer::start();
    agent.failing.store(true, Ordering::SeqCst);
    let replies = ReplyServer::start();
    let mut d = Daemon::start(Config {
        reply_url: Some(replies.url.clone()),
        agent: Some((agent.url.clone(), 2_000, 2)),
        ..Config::default()
    })
    .await;
    d.post_ok("m1", "c1", "hello?").await;
    let text = replies.reply_to("m1", DEADLINE).await;
    assert!(text.contains("agent is unavailable"), "{text}");
    assert_eq!(agent.requests().len(), 2, "attempts = 2");
    assert!(d.sigterm(DEADLINE).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_waiting_for_the_agent_is_answered_after_sigkill() {
    // First run: the agent never answers, so the turn stays `awaiting`.
    let hang = HangServer::start().await;
    let replies = ReplyServer::start();
    let mut d = Daemon::start(Config {
        reply_url: Some(replies.url.clone()),
        agent: Some((hang.url.clone(), 60_000, 1)),
        ..Config::default()
    })
    .await;
    let r = d.post_ok("m1", "c1", "slow question").await;
    assert_eq!(
        r["status"], "accepted",
        "acknowledged without waiting for the agent"
    );
    d.sigkill();
    // Second run: a working agent. The waiting turn is resumed and answered.
    let agent = AgentServer::start();
    d.config.agent = Some((agent.url.clone(), 5_000, 2));
    d.write_config_text(&d.config.to_toml());
    d.restart().await;
    assert_eq!(
        replies.reply_to("m1", DEADLINE).await,
        "agent: slow question"
    );
    let answered = d
        .turns("webhook:c1")
        .await
        .iter()
        .filter(|t| t.role == "assistant")
        .count();
    assert_eq!(answered, 1);
    assert!(d.sigterm(DEADLINE).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_is_told_after_every_start() {
    let replies = ReplyServer::start();
    let mut d = Daemon::start(Config {
        reply_url: Some(replies.url.clone()),
        owner_chat: Some("ops".into()),
        // Every start is told at once (no coalescing window).
        owner_interval_s: Some(0),
        ..Config::default()
    })
    .await;
    let notices = |replies: &ReplyServer| -> Vec<Value> {
        replies
            .replies()
            .into_iter()
            .filter(|r| r["chat"] == "ops")
            .collect()
    };
    let first = poll_every(Duration::from_millis(20), DEADLINE, || async {
        let n = notices(&replies);
        (!n.is_empty()).then_some(n)
    })
    .await
    .expect("no start notice");
    let text = first[0]["text"].as_str().unwrap_or_default();
    assert!(
        text.contains("restarted") && text.contains("ask again"),
        "{text}"
    );
    d.sigkill();
    d.restart().await;
    // Delivery is at-least-once: the first notice may arrive again (SIGKILL
    // between send and mark-sent), so look for the second start's notice.
    let second = poll_every(Duration::from_millis(20), DEADLINE, || async {
        notices(&replies).into_iter().find(|n| {
            n["text"]
                .as_str()
                .is_some_and(|t| t.contains("start #2") && t.contains("restarted"))
        })
    })
    .await;
    assert!(
        second.is_some(),
        "no notice for start #2: {:?}",
        notices(&replies)
    );
    assert!(d.sigterm(DEADLINE).await.success());
}
