//! The owner in a restart storm (issue 7, §3c; R18): seven starts in a few
//! seconds send one "keel restarted" notice for the first start and one
//! more, once `[owner] min_interval_s` has passed, covering the six that
//! followed — not seven messages. The notices are durable outbox rows, so
//! the count is checked at the owner's receiving end.

// Tests drive real processes in real time: clippy.toml's clock and env rules are for keel itself.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use common::{poll_until, toml_str, Config, Daemon, ReplyServer};

/// The starts a notice covers, read from its headline.
fn covered(text: &str) -> Vec<i64> {
    if let Some(rest) = text.split("(start #").nth(1) {
        let n: i64 = rest.split(')').next().unwrap_or("").parse().expect("epoch");
        return vec![n];
    }
    let range = text
        .split("(starts #")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .unwrap_or_else(|| panic!("no starts in {text:?}"));
    let (a, b) = range.split_once("–#").expect("a range");
    let (a, b): (i64, i64) = (a.parse().expect("first"), b.parse().expect("last"));
    (a..=b).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_storm_sends_one_coalesced_owner_notice() {
    const INTERVAL_S: u64 = 8;
    let replies = ReplyServer::start();
    let mut d = Daemon::new(Config::default(), None);
    d.write_config_text(&format!(
        "[webhook]\nreply_url = {}\n[owner]\nchannel = \"webhook\"\nchat = \"ops\"\nmin_interval_s = {INTERVAL_S}\n",
        toml_str(&replies.url)
    ));
    // Delivery is at-least-once: a notice may arrive twice (same outbox id).
    let notices = || {
        let mut seen = std::collections::BTreeMap::new();
        for r in replies.replies().into_iter().filter(|r| r["chat"] == "ops") {
            if let (Some(id), Some(text)) = (r["id"].as_str(), r["text"].as_str()) {
                seen.entry(id.parse::<i64>().unwrap_or(0))
                    .or_insert_with(|| text.to_string());
            }
        }
        seen.into_values().collect::<Vec<_>>()
    };
    let began = std::time::Instant::now();
    d.boot().await;
    let first = poll_until(Duration::from_secs(30), || async {
        notices().first().cloned()
    })
    .await
    .expect("the first start's notice");
    assert!(first.contains("keel restarted (start #1)"), "{first}");

    // Six crashes and restarts, each start reaching ready.
    for _ in 0..6 {
        d.sigkill();
        d.restart().await;
    }
    // Every start is covered exactly once, in order, by the notices.
    let all = poll_until(Duration::from_secs(60), || async {
        let n = notices();
        (n.iter().flat_map(|t| covered(t)).count() >= 7).then_some(n)
    })
    .await
    .unwrap_or_else(|| panic!("not every start was told: {:#?}", notices()));
    let starts: Vec<i64> = all.iter().flat_map(|t| covered(t)).collect();
    assert_eq!(starts, (1..=7).collect::<Vec<_>>(), "{all:#?}");
    // At most one notice per interval: seven starts, a handful of notices.
    let windows = began.elapsed().as_secs() / INTERVAL_S + 1;
    assert!(
        (all.len() as u64) <= windows && all.len() < 7,
        "{} notices in {} s: {all:#?}",
        all.len(),
        began.elapsed().as_secs()
    );
    assert!(
        all.iter()
            .skip(1)
            .any(|t| t.contains(" times since the last notice (starts #")),
        "no notice covers several starts: {all:#?}"
    );
    // The console shows, beside each of the last starts, the notice the
    // owner received for it (issue 15).
    let shown = poll_until(Duration::from_secs(10), || async {
        let v = d.get("/v1/stats").await.ok()?.json();
        let rows = v["restarts"].as_array()?.clone();
        (rows.len() == 5 && rows.iter().all(|r| r["owner_told"].is_string())).then_some(rows)
    })
    .await
    .expect("the console shows what the owner was told for the last five starts");
    for r in &shown {
        let epoch = r["boot_epoch"].as_i64().expect("epoch");
        let received = all
            .iter()
            .find(|t| covered(t).contains(&epoch))
            .expect("a notice covers it");
        let told = r["owner_told"].as_str().unwrap();
        assert!(
            received.starts_with(told.trim_end_matches('…')),
            "start #{epoch}: console says {told:?}, the owner got {received:?}"
        );
    }
    d.assert_no_panics();
}
