//! Durable timers on the real binary (R7–R12, TESTING.md C6 and C-inputs):
//! 1,000 reminders created over the webhook fire exactly once per due
//! instant although keel is SIGKILLed while they fire; a one-shot due while
//! keel is down fires once, late, and recurring timers follow their misfire
//! policy with misses counted; hostile `/remind` and `/tz` inputs get a clear
//! one-line error and create nothing.

// Tests drive real processes in real time: clippy.toml's clock and env rules are for keel itself.
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{poll_every, poll_until, Config, Daemon, ReplyServer};
use rusqlite::{Connection, OpenFlags};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(60);

/// A read-only look at the daemon's database (safe while it runs: WAL).
fn db(d: &Daemon) -> Connection {
    common::open_db_with(&d.db_path(), OpenFlags::SQLITE_OPEN_READ_ONLY)
}

fn count(d: &Daemon, sql: &str) -> i64 {
    db(d).query_row(sql, [], |r| r.get(0)).unwrap_or(-1)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

/// Waits until the wall clock passes `t` (the thing under test is time).
async fn wait_until_clock(t: i64) {
    let left = Duration::from_millis((t - now_ms()).max(0) as u64 + 1_000);
    assert!(
        poll_until(left, || async { (now_ms() >= t).then_some(()) })
            .await
            .is_some(),
        "the clock did not reach {t}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_reminders_fire_exactly_once_across_a_sigkill() {
    const TIMERS: usize = 1_000;
    let replies = ReplyServer::start();
    let mut d = Daemon::start(Config {
        reply_url: Some(replies.url.clone()),
        ..Config::default()
    })
    .await;
    // Created over the webhook, 8 clients at once, due 6–10 s from creation
    // (the first fire comes after the last create on this machine).
    let base = d.base();
    let client = common::http_client();
    let mut tasks = Vec::new();
    for w in 0..8usize {
        let client = client.clone();
        let url = format!("{base}/v1/messages");
        tasks.push(tokio::spawn(async move {
            for i in (w..TIMERS).step_by(8) {
                let body = json!({
                    "id": format!("r{i}"),
                    "chat": format!("c{}", i % 10),
                    "from": "tester",
                    "text": format!("/remind in {}s note-{i}", 6 + i % 5),
                });
                let r = client.post(&url).json(&body).send().await.expect("post");
                assert_eq!(r.status().as_u16(), 200, "create r{i}");
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    assert_eq!(
        count(&d, "SELECT COUNT(*) FROM timers"),
        TIMERS as i64,
        "every /remind created one timer"
    );
    // SIGKILL while they fire: after the first fires, before the last.
    let started = poll_every(Duration::from_millis(5), DEADLINE, || async {
        (count(&d, "SELECT COUNT(*) FROM timer_fires") >= 50).then_some(())
    })
    .await;
    assert!(started.is_some(), "no timer fired within {DEADLINE:?}");
    d.sigkill();
    let at_kill = count(&d, "SELECT COUNT(*) FROM timer_fires");
    d.restart().await;
    let done = poll_every(Duration::from_millis(100), DEADLINE, || async {
        (count(&d, "SELECT COUNT(*) FROM timers WHERE state = 'done'") == TIMERS as i64)
            .then_some(())
    })
    .await;
    assert!(done.is_some(), "not every timer finished after the restart");
    assert!(
        at_kill < TIMERS as i64,
        "the kill came after every fire ({at_kill}); the test proved nothing"
    );
    // Exactly once: one receipt, one reminder turn and one outbox row per timer.
    assert_eq!(count(&d, "SELECT COUNT(*) FROM timer_fires"), TIMERS as i64);
    assert_eq!(
        count(&d, "SELECT COUNT(*) FROM timers WHERE fired_count != 1"),
        0
    );
    let conn = db(&d);
    let mut per_timer: HashMap<i64, i64> = HashMap::new();
    let mut stmt = conn
        .prepare("SELECT text FROM outbox WHERE text LIKE '⏰ Reminder #%'")
        .unwrap();
    for text in stmt.query_map([], |r| r.get::<_, String>(0)).unwrap() {
        let text = text.unwrap();
        let id: i64 = text["⏰ Reminder #".len()..]
            .split(':')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("reminder text {text:?}"));
        *per_timer.entry(id).or_insert(0) += 1;
    }
    assert_eq!(per_timer.len(), TIMERS, "a timer has no reminder row");
    assert!(
        per_timer.values().all(|&n| n == 1),
        "a timer has two reminder rows"
    );
    // Every reminder reached the channel (at-least-once: repeats share an id).
    let delivered = poll_every(Duration::from_millis(100), DEADLINE, || async {
        let mut ids: HashMap<String, String> = HashMap::new();
        for r in replies.replies() {
            if let (Some(text), Some(id)) = (r["text"].as_str(), r["id"].as_str()) {
                if text.starts_with("⏰ Reminder #") {
                    let prev = ids.insert(text.to_string(), id.to_string());
                    assert!(
                        prev.is_none() || prev.as_deref() == Some(id),
                        "one reminder text under two outbox ids: {text}"
                    );
                }
            }
        }
        (ids.len() == TIMERS).then_some(())
    })
    .await;
    assert!(delivered.is_some(), "not every reminder was delivered");
    d.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_due_during_downtime_follow_their_misfire_policy() {
    let replies = ReplyServer::start();
    let mut d = Daemon::start(Config {
        reply_url: Some(replies.url.clone()),
        owner_chat: Some("owner".into()),
        // Every start is told at once (no coalescing window).
        owner_interval_s: Some(0),
        ..Config::default()
    })
    .await;
    d.post_ok("once", "c1", "/remind in 5s one-shot").await;
    d.post_ok("skip", "c1", "/remind every 1s --skip ticks-skip")
        .await;
    d.post_ok("fire1", "c1", "/remind every 1s ticks-once")
        .await;
    let created = now_ms();
    // Both recurring timers fired on time at least once before the outage.
    let running = poll_every(Duration::from_millis(20), DEADLINE, || async {
        (count(
            &d,
            "SELECT COUNT(*) FROM timers WHERE kind = 'interval' AND fired_count > 0",
        ) == 2)
            .then_some(())
    })
    .await;
    assert!(running.is_some(), "recurring timers never fired");
    assert_eq!(
        count(&d, "SELECT fired_count FROM timers WHERE kind = 'once'"),
        0,
        "the one-shot fired before the outage; the test proves nothing"
    );
    d.sigkill();
    // Down until 3 s past the one-shot's instant: it comes due during the outage.
    wait_until_clock(created + 5_000 + 3_000).await;
    d.restart().await;

    let q = |sql: &str| count(&d, sql);
    // The one-shot fired exactly once, late, with the lateness in its text.
    let once = poll_every(Duration::from_millis(50), DEADLINE, || async {
        (q("SELECT COUNT(*) FROM timers WHERE kind = 'once' AND state = 'done'") == 1).then_some(())
    })
    .await;
    assert!(once.is_some(), "the one-shot never fired after the restart");
    assert_eq!(
        q(
            "SELECT COUNT(*) FROM timer_fires f JOIN timers t ON t.id = f.timer_id
           WHERE t.kind = 'once' AND f.late_ms > 2000"
        ),
        1
    );
    assert_eq!(
        q("SELECT COUNT(*) FROM outbox WHERE text LIKE '%one-shot (late by%'"),
        1
    );
    // skip: no late fire at all, the missed seconds counted.
    let skip_id = "(SELECT id FROM timers WHERE params_json LIKE '%ticks-skip%')";
    assert_eq!(
        q(&format!(
            "SELECT COUNT(*) FROM timer_fires WHERE timer_id = {skip_id} AND late_ms > 2000"
        )),
        0
    );
    assert!(
        q(&format!(
            "SELECT missed_count FROM timers WHERE id = {skip_id}"
        )) >= 3
    );
    // fire_once: exactly one late fire for the outage, the rest counted missed.
    let once_id = "(SELECT id FROM timers WHERE params_json LIKE '%ticks-once%')";
    assert_eq!(
        q(&format!(
            "SELECT COUNT(*) FROM timer_fires WHERE timer_id = {once_id} AND late_ms > 2000"
        )),
        1
    );
    assert!(
        q(&format!(
            "SELECT missed_count FROM timers WHERE id = {once_id}"
        )) >= 2
    );
    // The owner hears how many fired late and how many were skipped.
    let notice = poll_every(Duration::from_millis(20), DEADLINE, || async {
        replies
            .replies()
            .into_iter()
            .filter_map(|r| r["text"].as_str().map(str::to_string))
            .find(|t| t.contains("keel restarted") && t.contains("start #2"))
    })
    .await
    .expect("no restart notice");
    assert!(notice.contains("Timers recovered: "), "{notice}");
    assert!(
        !notice.contains("Timers recovered: 0 fired late, 0 skipped"),
        "{notice}"
    );
    assert!(d.sigterm(DEADLINE).await.success());
    d.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_remind_and_tz_inputs_get_one_line_errors_and_create_nothing() {
    let replies = ReplyServer::start();
    let mut d = Daemon::start(Config {
        reply_url: Some(replies.url.clone()),
        ..Config::default()
    })
    .await;
    let long_tz = format!("/tz {}", "A".repeat(10_000));
    let cases: Vec<(&str, &str)> = vec![
        ("/remind", "Usage"),
        ("/remind in 0s x", "shortest"),
        ("/remind in 99999999999999999999d x", "duration"),
        ("/remind at 2024-02-30 09:00 x", "cannot read the date"),
        ("/remind at 2026-12-01 23:59:60 x", "cannot read the date"),
        ("/remind at 10000-01-01 00:00 x", "cannot read the date"),
        ("/remind at 2020-01-01 09:00 x", "in the past"),
        ("/remind cron \"*/0 * * * *\" x", "step of 0"),
        ("/remind cron \"0 0 31 2 *\" x", "never fires"),
        ("/remind cron \"60 * * * *\" x", "invalid cron"),
        ("/remind cron \"@reboot\" x", "cron"),
        ("/remind cron \"0 0 0 0 0 0 0 0\" x", "5 or 6 fields"),
        ("/remind every day at 9 x", "HH:MM"),
        ("/remind in 10m '); DROP TABLE timers;--", "Reminder #"),
        ("/tz ../../etc/passwd", "unknown timezone"),
        ("/tz :/etc/localtime", "unknown timezone"),
        ("/tz America/New_Yrok", "did you mean America/New_York"),
        ("/tz", "timezone name"),
        (&long_tz, "not a timezone name"),
        ("/cancel 99", "No active timer #99"),
        ("/cancel -1", "Usage"),
    ];
    for (i, (text, expect)) in cases.iter().enumerate() {
        let id = format!("h{i}");
        let msg = json!({"id": id, "chat": "evil", "from": "tester", "text": text});
        let r = d.post_message(&msg).await.expect("post");
        assert_eq!(r.status, 200, "{text}: {}", r.body);
        let reply = replies.reply_to(&id, DEADLINE).await;
        assert!(reply.contains(expect), "{text:?} → {reply:?}");
        assert!(
            !reply.contains('\n'),
            "{text:?}: a multi-line error {reply:?}"
        );
    }
    // Only the literal SQL-looking reminder was stored, as text.
    assert_eq!(count(&d, "SELECT COUNT(*) FROM timers"), 1);
    assert_eq!(
        count(
            &d,
            "SELECT COUNT(*) FROM timers WHERE params_json LIKE '%DROP TABLE timers%'"
        ),
        1
    );
    assert_eq!(
        count(
            &d,
            "SELECT COUNT(*) FROM principals WHERE timezone IS NOT NULL"
        ),
        0
    );
    // A good zone is stored; /timers lists the reminder in it.
    d.post_ok("tz", "evil", "/tz Europe/Berlin").await;
    assert!(replies
        .reply_to("tz", DEADLINE)
        .await
        .contains("Europe/Berlin"));
    d.post_ok("list", "evil", "/timers").await;
    let list = replies.reply_to("list", DEADLINE).await;
    assert!(
        list.starts_with("#1 ") && list.contains("DROP TABLE"),
        "{list}"
    );
    assert_eq!(d.readyz().await.expect("readyz").status, 200);
    assert!(d.sigterm(DEADLINE).await.success());
    d.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keel_timers_lists_and_shows_while_running_and_cancels_only_when_stopped() {
    let replies = ReplyServer::start();
    let mut d = Daemon::start(Config {
        reply_url: Some(replies.url.clone()),
        ..Config::default()
    })
    .await;
    d.post_ok("m1", "ops", "/remind every day at 09:00 water the plants")
        .await;
    assert!(replies
        .reply_to("m1", DEADLINE)
        .await
        .starts_with("Reminder #1 set"));
    let db = d.db_path();
    let dir = db
        .parent()
        .expect("data dir")
        .to_string_lossy()
        .into_owned();
    let list = d
        .cli(&["timers", "list", "--json", "--data-dir", &dir])
        .await;
    assert!(list.status.success(), "{list:?}");
    let v: serde_json::Value = serde_json::from_slice(&list.stdout).expect("json");
    assert_eq!(v["timers"][0]["id"], 1);
    assert_eq!(v["timers"][0]["kind"], "cron");
    assert_eq!(v["timers"][0]["schedule"], "0 9 * * *");
    let show = d.cli(&["timers", "show", "1", "--data-dir", &dir]).await;
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(
        show.status.success() && text.contains("water the plants"),
        "{text}"
    );
    let missing = d.cli(&["timers", "show", "42", "--data-dir", &dir]).await;
    assert_eq!(missing.status.code(), Some(2));
    // One writer: cancel refuses while keel runs, with the chat alternative.
    let refused = d.cli(&["timers", "cancel", "1", "--data-dir", &dir]).await;
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("/cancel 1"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(d.sigterm(DEADLINE).await.success());
    let cancelled = d.cli(&["timers", "cancel", "1", "--data-dir", &dir]).await;
    assert!(cancelled.status.success(), "{cancelled:?}");
    let show = d
        .cli(&["timers", "show", "1", "--json", "--data-dir", &dir])
        .await;
    let v: serde_json::Value = serde_json::from_slice(&show.stdout).expect("json");
    assert_eq!(v["state"], "cancelled");
}
