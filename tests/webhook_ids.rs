//! Webhook idempotency keys are per sender (R2, R41): the key is
//! (chat, from, id). Two senders in one chat may reuse an id and both
//! messages are stored; the same key with the same text is a duplicate; the
//! same key with another text is 409 and stores nothing. A store written by
//! schema 2 (key unique per chat) is migrated and keeps deduplicating its
//! old turns; a SIGKILL while two senders reuse ids loses nothing
//! acknowledged and stores nothing twice.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use common::{Config, Daemon, Resp};
use serde_json::json;

async fn post(d: &Daemon, id: &str, chat: &str, from: &str, text: &str) -> Resp {
    let msg = json!({"id": id, "chat": chat, "from": from, "text": text});
    d.post_message(&msg)
        .await
        .unwrap_or_else(|e| panic!("POST {msg}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_senders_reusing_an_id_are_both_stored() {
    let d = Daemon::start(Config::default()).await;
    let a = post(&d, "1", "room", "alice", "hello from alice").await;
    assert_eq!(
        (a.status, a.json()["status"].clone()),
        (200, json!("accepted")),
        "{}",
        a.body
    );
    let b = post(&d, "1", "room", "bob", "hello from bob").await;
    assert_eq!(
        (b.status, b.json()["status"].clone()),
        (200, json!("accepted")),
        "{}",
        b.body
    );

    // The same key and text again: a duplicate, for each sender.
    for (from, text) in [("alice", "hello from alice"), ("bob", "hello from bob")] {
        let r = post(&d, "1", "room", from, text).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["status"], "duplicate", "{}", r.body);
        assert_eq!(r.json()["session"], "webhook:room", "{}", r.body);
    }

    // The same key with another text: 409, one line naming the id, nothing stored.
    let c = post(&d, "1", "room", "bob", "something else").await;
    assert_eq!(c.status, 409, "{}", c.body);
    assert!(c.error_problem().is_none(), "{}", c.body);
    let err = c.json()["error"].as_str().unwrap_or("").to_string();
    assert!(
        err.contains("\"1\"") && err.contains("different content"),
        "{err}"
    );

    let turns = d.turns("webhook:room").await;
    let user: Vec<_> = turns.iter().filter(|t| t.role == "user").collect();
    let seen: Vec<(Option<&str>, Option<&str>, &str)> = user
        .iter()
        .map(|t| (t.from.as_deref(), t.key.as_deref(), t.text.as_str()))
        .collect();
    assert_eq!(
        seen,
        vec![
            (Some("alice"), Some("1"), "hello from alice"),
            (Some("bob"), Some("1"), "hello from bob"),
        ],
        "{turns:?}"
    );
    assert!(turns.iter().all(|t| t.kind == "text"), "{turns:?}");
    // Replies carry neither a key nor a sender.
    for t in turns.iter().filter(|t| t.role != "user") {
        assert_eq!((t.key.as_deref(), t.from.as_deref()), (None, None), "{t:?}");
    }
    d.assert_no_panics();
}

/// The statements of schema versions 1 and 2, as the released binaries ran them.
fn old_schema() -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    let one = std::fs::read_to_string(format!("{root}/migrations/0001_init.sql")).expect("0001");
    let two = std::fs::read_to_string(format!("{root}/migrations/0002_timers.sql")).expect("0002");
    format!("{one}\n{two}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_2_store_is_migrated_and_old_keys_stay_deduplicated() {
    let d0 = Daemon::new(Config::default(), None);
    {
        // A store as schema 2 left it: one webhook turn from alice with key "7".
        let conn = common::open_db(&d0.db_path());
        conn.execute_batch(&old_schema()).expect("old schema");
        conn.execute_batch(
            "PRAGMA user_version = 2;
             INSERT INTO principals (id, channel, external_id, created_at)
                 VALUES ('webhook:alice', 'webhook', 'alice', '2026-11-30T10:00:00.000Z');
             INSERT INTO sessions (id, channel, chat, principal_id, next_seq, created_at, updated_at)
                 VALUES ('webhook:old', 'webhook', 'old', 'webhook:alice', 2,
                         '2026-11-30T10:00:00.000Z', '2026-11-30T10:00:00.000Z');
             INSERT INTO turns (session_id, seq, role, content, key, principal_id, status, created_at)
                 VALUES ('webhook:old', 1, 'user', 'before the upgrade', '7', 'webhook:alice',
                         'answered', '2026-11-30T10:00:00.000Z');",
        )
        .expect("old rows");
    }
    let mut d = d0;
    d.boot().await;

    let again = post(&d, "7", "old", "alice", "before the upgrade").await;
    assert_eq!(again.json()["status"], "duplicate", "{}", again.body);
    let changed = post(&d, "7", "old", "alice", "edited after the upgrade").await;
    assert_eq!(changed.status, 409, "{}", changed.body);
    let other = post(&d, "7", "old", "bob", "bob's own 7").await;
    assert_eq!(other.json()["status"], "accepted", "{}", other.body);

    let turns = d.turns("webhook:old").await;
    let user: Vec<_> = turns
        .iter()
        .filter(|t| t.role == "user")
        .map(|t| (t.from.clone(), t.text.clone()))
        .collect();
    assert_eq!(
        user,
        vec![
            (Some("alice".into()), "before the upgrade".into()),
            (Some("bob".into()), "bob's own 7".into()),
        ]
    );
    let version: i64 = common::open_db(&d.db_path())
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .expect("user_version");
    assert!(version >= 3, "schema {version}");
    d.assert_no_panics();
}

/// What each sender's posts came to: acknowledged, or unknown (no answer).
#[derive(Default)]
struct Book {
    acked: BTreeSet<(String, String)>,
    unknown: BTreeSet<(String, String)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_senders_reuse_ids_loses_nothing_and_stores_nothing_twice() {
    let mut d = Daemon::start(Config::default()).await;
    let book = Arc::new(std::sync::Mutex::new(Book::default()));
    let senders = ["alice", "bob", "carol"];
    let base = d.base();
    let mut tasks = Vec::new();
    for from in senders {
        let book = book.clone();
        let client = common::http_client();
        let base = base.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..400 {
                let id = format!("m{i}");
                let msg = json!({"id": id, "chat": "shared", "from": from, "text": format!("{from} says {i}")});
                let r = common::send(client.post(format!("{base}/v1/messages")).json(&msg)).await;
                let mut b = book.lock().expect("book");
                match r {
                    Ok(r) if r.status == 200 => {
                        b.acked.insert((from.to_string(), id));
                    }
                    Ok(r) if (400..500).contains(&r.status) => {
                        panic!("{from} {id}: {} {}", r.status, r.body)
                    }
                    // The process died under the request: it may or may not be stored.
                    _ => {
                        b.unknown.insert((from.to_string(), id));
                        return;
                    }
                }
            }
        }));
    }
    // Kill once a good share is acknowledged: a condition, not a sleep.
    let enough = common::poll_until(Duration::from_secs(60), || {
        let book = book.clone();
        async move { (book.lock().expect("book").acked.len() >= 300).then_some(()) }
    })
    .await;
    assert!(
        enough.is_some(),
        "fewer than 300 messages acknowledged in 60 s"
    );
    d.sigkill();
    for t in tasks {
        t.await.expect("sender task");
    }
    d.restart().await;

    let turns = d.turns("webhook:shared").await;
    let mut stored: BTreeMap<(String, String), usize> = BTreeMap::new();
    for t in turns.iter().filter(|t| t.role == "user") {
        let key = (
            t.from.clone().unwrap_or_default(),
            t.key.clone().unwrap_or_default(),
        );
        *stored.entry(key).or_default() += 1;
    }
    // Every sender task has ended: take the book out of its lock.
    let book = std::mem::take(&mut *book.lock().expect("book"));
    let lost: Vec<_> = book
        .acked
        .iter()
        .filter(|k| !stored.contains_key(*k))
        .collect();
    let dup: Vec<_> = stored.iter().filter(|(_, n)| **n > 1).collect();
    let unexpected: Vec<_> = stored
        .keys()
        .filter(|k| !book.acked.contains(*k) && !book.unknown.contains(*k))
        .collect();
    assert!(
        lost.is_empty(),
        "lost {} acknowledged: {lost:?}",
        lost.len()
    );
    assert!(dup.is_empty(), "stored twice: {dup:?}");
    assert!(unexpected.is_empty(), "never sent: {unexpected:?}");
    // Every sender's acknowledged ids really were reused by the others.
    let ids_by = |who: &str| -> BTreeSet<&str> {
        book.acked
            .iter()
            .filter(|(f, _)| f == who)
            .map(|(_, i)| i.as_str())
            .collect()
    };
    assert!(
        !ids_by("alice").is_disjoint(&ids_by("bob")),
        "no id was shared between senders"
    );
    // Resending what was acknowledged is a duplicate, never a conflict.
    for (from, id) in book.acked.iter().take(30) {
        let i: usize = id[1..].parse().expect("index");
        let r = post(&d, id, "shared", from, &format!("{from} says {i}")).await;
        assert_eq!(r.json()["status"], "duplicate", "{from} {id}: {}", r.body);
    }
    d.assert_no_panics();
}
