//! The shared store suite (R37): the same assertions against the SQLite
//! backend (a real file with fsync) and the PostgreSQL backend (a fresh
//! database on the test cluster, `tests/common/pg.rs`), through the
//! PersistenceActor's messages — the interface the rest of keel uses.
//! "Two instances" are two PersistenceActors on one PostgreSQL database;
//! on SQLite, where one process owns the store, two clients of one actor.

#![allow(clippy::disallowed_methods)] // real time for the lease expiries

#[path = "common/pg.rs"]
mod pg;
#[path = "store_suite/tasks.rs"]
mod tasks;

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use actix::prelude::*;
use keel_actors::clock::{Clock, WallClock};
use keel_actors::error::StoreError;
use keel_actors::health::Health;
use keel_actors::metrics::Metrics;
use keel_actors::persistence::cluster::{
    AcquireLease, ClaimDueTimers, GetCluster, Heartbeat, PutFencedAdapterState, RegisterInstance,
    ReleaseLease,
};
use keel_actors::persistence::pg::{connect, pg_latest_version, pg_migrate, PgOptions};
use keel_actors::persistence::portable::leases::Fence;
use keel_actors::persistence::{
    open_store, CommitExchange, CommitExchanges, Exchange, ExchangeOutcome, GetAdapterState,
    GetPendingOutbox, GetSession, GetSessions, GetTurns, PersistenceActor, RecordSend, ReplyPlan,
    SendOutcome, SessionKey, StoreOptions,
};

/// One backend under test: the actors standing for instances, and what
/// keeps the store alive (temp dir or database).
struct Store {
    name: &'static str,
    instances: Vec<Addr<PersistenceActor>>,
    /// A connection string for fixtures (SQLite file path or PG URL).
    fixture: Fixture,
    _keep: Box<dyn std::any::Any>,
}

enum Fixture {
    Sqlite(std::path::PathBuf),
    Postgres(String),
}

impl Store {
    /// Run fixture SQL (test setup only), same text on both backends.
    fn fixture(&self, sql: &str) {
        match &self.fixture {
            Fixture::Sqlite(p) => rusqlite::Connection::open(p)
                .unwrap()
                .execute_batch(sql)
                .unwrap(),
            Fixture::Postgres(url) => {
                pg::off_runtime(|| connect(url).unwrap().batch_execute(sql).unwrap())
            }
        }
    }
}

fn sqlite(n: usize) -> Store {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keel.db");
    let opts = StoreOptions {
        path: Some(path.clone()),
        synchronous: keel_actors::config::Synchronous::Full,
        busy_timeout: std::time::Duration::from_secs(5),
        max_batch: 1024,
        probe_interval: std::time::Duration::from_millis(200),
        key: None,
    };
    let (conn, _) = open_store(&opts).unwrap();
    let metrics = Metrics::new();
    let actor = PersistenceActor::new(
        conn,
        opts,
        Health::new(metrics.clone()),
        metrics,
        Arc::new(WallClock),
    )
    .start();
    Store {
        name: "sqlite",
        instances: vec![actor; n],
        fixture: Fixture::Sqlite(path),
        _keep: Box::new(dir),
    }
}

fn postgres(test: &str, n: usize) -> Option<Store> {
    let db = pg::fresh_db(test)?;
    let mut instances = Vec::new();
    for _ in 0..n {
        let client = pg::off_runtime(|| {
            let mut client = connect(&db.url).unwrap();
            pg_migrate(&mut client, &db.url).unwrap();
            client
        });
        let metrics = Metrics::new();
        let opts = PgOptions {
            url: db.url.clone(),
            max_batch: 1024,
            probe_interval: std::time::Duration::from_millis(200),
        };
        instances.push(
            PersistenceActor::postgres(
                client,
                opts,
                Health::new(metrics.clone()),
                metrics,
                Arc::new(WallClock),
            )
            .start(),
        );
    }
    Some(Store {
        name: "postgres",
        instances,
        fixture: Fixture::Postgres(db.url.clone()),
        _keep: Box::new(db),
    })
}

/// Both backends (PostgreSQL only when available; see `pg::fresh_db`).
fn backends(test: &str, n: usize) -> Vec<Store> {
    let mut v = vec![sqlite(n)];
    v.extend(postgres(test, n));
    v
}

/// The first 100 turns of an existing session.
async fn turns_of(
    st: &Addr<PersistenceActor>,
    session: &str,
) -> Vec<keel_actors::persistence::TurnRow> {
    st.send(GetTurns {
        session: session.into(),
        after_seq: 0,
        limit: 1000,
    })
    .await
    .unwrap()
    .unwrap()
    .unwrap()
}

fn msg(chat: &str, from: &str, key: &str, text: &str, reply: Option<&str>) -> Exchange {
    Exchange::text(
        SessionKey::new("webhook", chat),
        from,
        key,
        text,
        reply.map(|t| ReplyPlan {
            text: t.into(),
            deliver: true,
        }),
    )
}

/// A session's backlog as one job: each message stored as by itself, in
/// order; one whose guessed seq (`expect_seq`) is wrong, and every one after
/// a message not accepted, is `Stale` with nothing written; the snapshot
/// says which seq comes next.
#[actix::test]
async fn a_batch_of_exchanges_checks_each_guessed_seq_and_stops_at_the_first_not_accepted() {
    for s in backends("batch", 1) {
        let st = &s.instances[0];
        let guess = |mut e: Exchange, seq: i64| {
            e.expect_seq = Some(seq);
            e
        };
        let batch = vec![
            msg("b1", "u1", "m1", "one", Some("r1")),
            guess(msg("b1", "u1", "m2", "two", None), 3),
            guess(msg("b1", "u1", "m3", "three", Some("r3")), 4),
        ];
        let out = st.send(CommitExchanges(batch)).await.unwrap().unwrap();
        let seqs: Vec<_> = out
            .iter()
            .map(|o| match o {
                ExchangeOutcome::Accepted {
                    user_seq,
                    reply_seq,
                    ..
                } => (*user_seq, *reply_seq),
                other => panic!("{}: {other:?}", s.name),
            })
            .collect();
        assert_eq!(seqs, [(1, Some(2)), (3, None), (4, Some(5))], "{}", s.name);
        // A wrong guess: that message and the one after it write nothing.
        let batch = vec![
            msg("b1", "u1", "m4", "four", Some("r4")),
            guess(msg("b1", "u1", "m5", "five", Some("r5")), 7),
            guess(msg("b1", "u1", "m6", "six", Some("r6")), 10),
        ];
        let out = st.send(CommitExchanges(batch)).await.unwrap().unwrap();
        assert!(out[0].accepted(), "{}: {out:?}", s.name);
        assert_eq!(
            out[1..],
            [ExchangeOutcome::Stale, ExchangeOutcome::Stale],
            "{}",
            s.name
        );
        // A duplicate stops the batch too; a right guess after it is not tried.
        let batch = vec![
            msg("b1", "u1", "m1", "one", Some("r1")),
            guess(msg("b1", "u1", "m7", "seven", None), 8),
        ];
        let out = st.send(CommitExchanges(batch)).await.unwrap().unwrap();
        assert_eq!(
            out,
            [
                ExchangeOutcome::Duplicate { user_seq: 1 },
                ExchangeOutcome::Stale
            ],
            "{}",
            s.name
        );
        let turns = turns_of(st, "webhook:b1").await;
        let texts: Vec<(i64, &str)> = turns.iter().map(|t| (t.seq, t.text.as_str())).collect();
        assert_eq!(
            texts,
            [
                (1, "one"),
                (2, "r1"),
                (3, "two"),
                (4, "three"),
                (5, "r3"),
                (6, "four"),
                (7, "r4")
            ],
            "{}",
            s.name
        );
        let snap = st
            .send(GetSession {
                id: "webhook:b1".into(),
                tail: 2,
            })
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(snap.next_seq, 8, "{}", s.name);
        assert_eq!(snap.recent.len(), 2, "{}", s.name);
    }
}

/// A long conversation: every earlier message is still a duplicate (same
/// text) or a conflict (another text) when it comes again, wherever its
/// key is kept by then (SQLite files keys in bulk after a few dozen turns),
/// and a reminder-only stretch (turns without keys) changes nothing.
#[actix::test]
async fn every_key_of_a_long_conversation_is_still_deduplicated() {
    for s in backends("longkeys", 1) {
        let st = &s.instances[0];
        let commit = |from: &str, i: usize, text: &str, reply: Option<&str>| {
            st.send(CommitExchange(msg(
                "long",
                from,
                &format!("k{i}"),
                text,
                reply,
            )))
        };
        let mut seqs = Vec::new();
        for i in 0..100 {
            // Every third message has no reply: seqs do not step by two.
            let reply = (i % 3 != 0).then_some("ok");
            let out = commit("u1", i, &format!("text {i}"), reply)
                .await
                .unwrap()
                .unwrap();
            let ExchangeOutcome::Accepted { user_seq, .. } = out else {
                panic!("{}: message {i}: {out:?}", s.name);
            };
            seqs.push(user_seq);
        }
        for (i, &user_seq) in seqs.iter().enumerate() {
            // Again with the same text: a duplicate; with another: a conflict.
            let same = format!("text {i}");
            for (text, want) in [
                (same.as_str(), ExchangeOutcome::Duplicate { user_seq }),
                ("another text", ExchangeOutcome::Conflict { user_seq }),
            ] {
                let out = commit("u1", i, text, Some("ok")).await.unwrap().unwrap();
                assert_eq!(out, want, "{}: message {i}", s.name);
            }
            // The same id from another sender is its own message.
            if i % 10 == 0 {
                let other = commit("u2", i, "u2 says", None).await.unwrap().unwrap();
                assert!(
                    other.accepted(),
                    "{}: message {i} from u2: {other:?}",
                    s.name
                );
            }
        }
        let turns = turns_of(st, "webhook:long").await;
        let users = turns.iter().filter(|t| t.role == "user").count();
        assert_eq!(
            users, 110,
            "{}: 100 from u1, 10 from u2, nothing twice",
            s.name
        );
        let numbered: Vec<i64> = turns.iter().map(|t| t.seq).collect();
        assert_eq!(
            numbered,
            (1..=numbered.len() as i64).collect::<Vec<_>>(),
            "{}",
            s.name
        );
    }
}

#[actix::test]
async fn a_message_its_reply_and_outbox_row_commit_together_and_dedupe_by_sender_and_key() {
    for s in backends("exchange", 1) {
        let st = &s.instances[0];
        let out = st
            .send(CommitExchange(msg("c1", "u1", "m1", "hello", Some("hi"))))
            .await
            .unwrap()
            .unwrap();
        let ExchangeOutcome::Accepted {
            user_seq: 1,
            reply_seq: Some(2),
            outbox_id: Some(oid),
        } = out
        else {
            panic!("{}: {out:?}", s.name);
        };
        let again = st
            .send(CommitExchange(msg("c1", "u1", "m1", "hello", Some("hi"))))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            again,
            ExchangeOutcome::Duplicate { user_seq: 1 },
            "{}",
            s.name
        );
        let other = st
            .send(CommitExchange(msg("c1", "u1", "m1", "changed", Some("hi"))))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            other,
            ExchangeOutcome::Conflict { user_seq: 1 },
            "{}",
            s.name
        );
        // The same id from another sender is another message (R41).
        let u2 = st
            .send(CommitExchange(msg("c1", "u2", "m1", "hello", None)))
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(
                u2,
                ExchangeOutcome::Accepted {
                    user_seq: 3,
                    reply_seq: None,
                    ..
                }
            ),
            "{}: {u2:?}",
            s.name
        );
        let turns = turns_of(st, "webhook:c1").await;
        let shape: Vec<_> = turns
            .iter()
            .map(|t| {
                (
                    t.seq,
                    t.role.as_str(),
                    t.text.as_str(),
                    t.from.as_deref(),
                    t.sent,
                )
            })
            .collect();
        assert_eq!(
            shape,
            vec![
                (1, "user", "hello", Some("u1"), None),
                (2, "assistant", "hi", None, Some(false)),
                (3, "user", "hello", Some("u2"), None),
            ],
            "{}",
            s.name
        );
        let pending = st
            .send(GetPendingOutbox {
                after: 0,
                limit: 10,
                with_unknown: true,
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(pending.len(), 1, "{}", s.name);
        assert_eq!((pending[0].id, pending[0].text.as_str()), (oid, "hi"));
        assert_eq!(pending[0].in_reply_to.as_deref(), Some("m1"));
        let live = st
            .send(RecordSend {
                id: oid,
                outcome: SendOutcome::Sent,
                channel_ref: None,
            })
            .await
            .unwrap()
            .unwrap();
        assert!(!live, "{}", s.name);
        let pending = st
            .send(GetPendingOutbox {
                after: 0,
                limit: 10,
                with_unknown: true,
            })
            .await
            .unwrap()
            .unwrap();
        assert!(pending.is_empty(), "{}: {pending:?}", s.name);
        let turns = st
            .send(GetTurns {
                session: "webhook:c1".into(),
                after_seq: 1,
                limit: 1,
            })
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(turns[0].sent, Some(true), "{}", s.name);
        let sessions = st.send(GetSessions).await.unwrap().unwrap();
        assert_eq!(sessions.len(), 1);
        assert_eq!(
            (sessions[0].id.as_str(), sessions[0].turns),
            ("webhook:c1", 3)
        );
        let missing = st
            .send(GetTurns {
                session: "webhook:nope".into(),
                after_seq: 0,
                limit: 1,
            })
            .await
            .unwrap()
            .unwrap();
        assert!(missing.is_none(), "{}", s.name);
    }
}

#[actix::test]
async fn two_instances_taking_messages_for_one_chat_number_its_turns_without_gaps_or_duplicates() {
    const PER: usize = 60;
    for s in backends("gapless", 2) {
        // Every message is sent by both instances (a redelivery racing the
        // original); each one's reply takes the seq after it.
        let mut calls = Vec::new();
        for i in 0..PER {
            // Each instance also takes messages of its own in between, so
            // both writers hold transactions on the session at once.
            for (n, st) in s.instances.iter().enumerate() {
                let m = msg(
                    "shared",
                    "u1",
                    &format!("k{i}"),
                    &format!("t{i}"),
                    Some("ok"),
                );
                calls.push(st.send(CommitExchange(m)));
                let own = msg(
                    "shared",
                    &format!("own{n}"),
                    &format!("k{i}"),
                    "x",
                    Some("ok"),
                );
                calls.push(st.send(CommitExchange(own)));
            }
        }
        let outs = futures::future::join_all(calls).await;
        let mut accepted = BTreeSet::new();
        let mut dups = 0;
        for o in outs {
            match o.unwrap().unwrap() {
                ExchangeOutcome::Accepted {
                    user_seq,
                    reply_seq,
                    ..
                } => {
                    assert_eq!(reply_seq, Some(user_seq + 1), "{}", s.name);
                    assert!(
                        accepted.insert(user_seq),
                        "{}: seq {user_seq} twice",
                        s.name
                    );
                }
                ExchangeOutcome::Duplicate { .. } => dups += 1,
                other => panic!("{}: {other:?}", s.name),
            }
        }
        assert_eq!((accepted.len(), dups), (3 * PER, PER), "{}", s.name);
        let turns = s.instances[1]
            .send(GetTurns {
                session: "webhook:shared".into(),
                after_seq: 0,
                limit: 10_000,
            })
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let seqs: Vec<i64> = turns.iter().map(|t| t.seq).collect();
        assert_eq!(seqs, (1..=6 * PER as i64).collect::<Vec<_>>(), "{}", s.name);
        let keys: HashSet<_> = turns
            .iter()
            .filter_map(|t| t.key.clone().map(|k| (t.from.clone(), k)))
            .collect();
        assert_eq!(keys.len(), 3 * PER, "{}", s.name);
        for pair in turns.chunks(2) {
            assert_eq!(
                (pair[0].role.as_str(), pair[1].role.as_str()),
                ("user", "assistant"),
                "{}",
                s.name
            );
        }
    }
}

#[actix::test]
async fn a_lease_has_one_holder_its_token_fences_writes_and_it_is_taken_over_after_expiry() {
    for s in backends("lease", 2) {
        let (a, b) = (&s.instances[0], &s.instances[1]);
        let now = WallClock.now_ms();
        let take = |who: &Addr<PersistenceActor>, holder: &str, at: i64| {
            who.send(AcquireLease {
                name: "poller:telegram:bot1".into(),
                holder: holder.into(),
                now_ms: at,
                ttl_ms: 10_000,
            })
        };
        assert_eq!(
            take(a, "a#1", now).await.unwrap().unwrap(),
            Some(1),
            "{}",
            s.name
        );
        assert_eq!(
            take(b, "b#1", now + 1).await.unwrap().unwrap(),
            None,
            "{}",
            s.name
        );
        // Renewal keeps the token.
        assert_eq!(take(a, "a#1", now + 5_000).await.unwrap().unwrap(), Some(1));
        let put = |who: &Addr<PersistenceActor>, token: i64, offset: i64| {
            who.send(PutFencedAdapterState {
                lease: "poller:telegram:bot1".into(),
                token,
                adapter: "telegram:bot1".into(),
                state_json: format!("{{\"offset\":{offset}}}"),
            })
        };
        put(a, 1, 10).await.unwrap().unwrap();
        // a stops renewing: after its expiry b takes over with a higher token.
        assert_eq!(
            take(b, "b#1", now + 15_001).await.unwrap().unwrap(),
            Some(2),
            "{}",
            s.name
        );
        // a's writes under the old token are refused, b's accepted.
        let stale = put(a, 1, 11).await.unwrap();
        assert!(
            stale
                .as_ref()
                .is_err_and(|e| e.to_string().contains("stale lease")),
            "{}: {stale:?}",
            s.name
        );
        put(b, 2, 12).await.unwrap().unwrap();
        let state = a
            .send(GetAdapterState {
                adapter: "telegram:bot1".into(),
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(state.as_deref(), Some("{\"offset\":12}"), "{}", s.name);
        // Released leases move at once, and the token still grows.
        b.send(ReleaseLease {
            name: "poller:telegram:bot1".into(),
            holder: "b#1".into(),
            now_ms: now + 15_002,
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(
            take(a, "a#2", now + 15_003).await.unwrap().unwrap(),
            Some(3)
        );
        let (_, leases) = b.send(GetCluster).await.unwrap().unwrap();
        assert_eq!(leases.len(), 1);
        assert_eq!((leases[0].holder.as_str(), leases[0].token), ("a#2", 3));
        // a is killed and starts again as a#3 while a#2's lease is still
        // valid: a later epoch of the same instance takes it at once (token
        // 4, fencing a#2); another instance, or an instance whose id merely
        // starts the same way, still waits for the expiry.
        assert_eq!(take(b, "b#9", now + 15_004).await.unwrap().unwrap(), None);
        assert_eq!(take(b, "a#2#1", now + 15_004).await.unwrap().unwrap(), None);
        assert_eq!(
            take(a, "a#3", now + 15_005).await.unwrap().unwrap(),
            Some(4),
            "{}",
            s.name
        );
        let stale = put(a, 3, 13).await.unwrap();
        assert!(
            matches!(stale, Err(StoreError::StaleLease(_))),
            "{}: {stale:?}",
            s.name
        );
        put(a, 4, 14).await.unwrap().unwrap();
        // A poller's batch commits its last turn with the offset under the
        // lease: with a stale token nothing of it is written.
        let mut ex = msg("fenced", "u1", "f1", "hi", Some("ho"));
        ex.adapter_state = Some(("telegram:bot1".into(), "{\"offset\":15}".into()));
        ex.fence = Some(Fence {
            lease: "poller:telegram:bot1".into(),
            token: 3,
        });
        let stale = a.send(CommitExchange(ex.clone())).await.unwrap();
        assert!(
            matches!(stale, Err(StoreError::StaleLease(_))),
            "{}: {stale:?}",
            s.name
        );
        let turns = |who: &Addr<PersistenceActor>| {
            who.send(GetTurns {
                session: "webhook:fenced".into(),
                after_seq: 0,
                limit: 10,
            })
        };
        assert_eq!(
            turns(b).await.unwrap().unwrap().map_or(0, |t| t.len()),
            0,
            "{}",
            s.name
        );
        let offset = |who: &Addr<PersistenceActor>| {
            who.send(GetAdapterState {
                adapter: "telegram:bot1".into(),
            })
        };
        assert_eq!(
            offset(b).await.unwrap().unwrap().as_deref(),
            Some("{\"offset\":14}"),
            "{}",
            s.name
        );
        ex.fence = Some(Fence {
            lease: "poller:telegram:bot1".into(),
            token: 4,
        });
        a.send(CommitExchange(ex)).await.unwrap().unwrap();
        assert_eq!(
            turns(b).await.unwrap().unwrap().map_or(0, |t| t.len()),
            2,
            "{}",
            s.name
        );
        assert_eq!(
            offset(b).await.unwrap().unwrap().as_deref(),
            Some("{\"offset\":15}"),
            "{}",
            s.name
        );
        // An older epoch never takes it back.
        assert_eq!(take(b, "a#1", now + 15_006).await.unwrap().unwrap(), None);
    }
}

#[actix::test]
async fn instances_register_with_growing_boot_epochs_and_a_stale_epoch_cannot_heartbeat() {
    for s in backends("instances", 2) {
        let reg = |st: &Addr<PersistenceActor>, id: &str| {
            st.send(RegisterInstance {
                id: id.into(),
                now_ms: 1_000,
                ttl_ms: 10_000,
                info: "{}".into(),
            })
        };
        assert_eq!(reg(&s.instances[0], "i1").await.unwrap().unwrap(), 1);
        assert_eq!(reg(&s.instances[1], "i2").await.unwrap().unwrap(), 1);
        assert_eq!(reg(&s.instances[1], "i1").await.unwrap().unwrap(), 2);
        let beat = |epoch: i64| {
            s.instances[0].send(Heartbeat {
                id: "i1".into(),
                epoch,
                now_ms: 5_000,
                ttl_ms: 10_000,
            })
        };
        assert!(!beat(1).await.unwrap().unwrap(), "{}", s.name);
        assert!(beat(2).await.unwrap().unwrap(), "{}", s.name);
        let (instances, _) = s.instances[0].send(GetCluster).await.unwrap().unwrap();
        let shape: Vec<_> = instances
            .iter()
            .map(|i| (i.id.as_str(), i.epoch, i.heartbeat_ms, i.expires_ms))
            .collect();
        assert_eq!(
            shape,
            vec![("i1", 2, 5_000, 15_000), ("i2", 1, 1_000, 11_000)],
            "{}",
            s.name
        );
    }
}

#[actix::test]
async fn a_due_instant_fires_once_however_many_instances_claim_it() {
    for s in backends("timers", 3) {
        s.fixture(
            "INSERT INTO sessions (id, channel, chat, created_at, updated_at)
             VALUES ('webhook:r', 'webhook', 'r', 'x', 'x');
             INSERT INTO timers (session_id, kind, schedule, timezone, callback, params_json,
                                 next_run, created_at, updated_at)
             VALUES ('webhook:r', 'interval', '1000', 'UTC', 'reminder', '{\"text\":\"tick\"}',
                     10000, 'x', 'x');",
        );
        let mut fired = Vec::new();
        // Three instances claim together at each of 10 instants, one second apart.
        for k in 0..10i64 {
            let now = 10_000 + k * 1_000;
            let calls = s.instances.iter().enumerate().map(|(i, st)| {
                st.send(ClaimDueTimers {
                    now_ms: now,
                    limit: 100,
                    instance: format!("i{i}"),
                    deliver: true,
                })
            });
            for r in futures::future::join_all(calls).await {
                fired.extend(r.unwrap().unwrap());
            }
        }
        let dues: Vec<i64> = fired.iter().map(|f| f.due_at).collect();
        let mut sorted = dues.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            (0..10).map(|k| 10_000 + k * 1_000).collect::<Vec<_>>(),
            "{}: every instant once",
            s.name
        );
        let turns = s.instances[0]
            .send(GetTurns {
                session: "webhook:r".into(),
                after_seq: 0,
                limit: 100,
            })
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(turns.len(), 10, "{}", s.name);
        assert!(turns
            .iter()
            .all(|t| t.role == "system" && t.text == "⏰ Reminder #1: tick"));
    }
}

#[test]
fn a_shared_store_of_a_newer_keel_is_refused() {
    let Some(db) = pg::fresh_db("newer") else {
        return;
    };
    let mut c = connect(&db.url).unwrap();
    pg_migrate(&mut c, &db.url).unwrap();
    c.execute(
        "INSERT INTO keel_schema_migrations (version, name, applied_at) VALUES ($1, 'future', 'x')",
        &[&(pg_latest_version() + 1)],
    )
    .unwrap();
    let err = pg_migrate(&mut c, &db.url).unwrap_err().to_string();
    assert!(err.contains("newer than this binary supports"), "{err}");
    // Running twice on an up-to-date store is a no-op.
    let db2 = pg::fresh_db("newer2").unwrap();
    let mut c2 = connect(&db2.url).unwrap();
    assert_eq!(
        pg_migrate(&mut c2, &db2.url).unwrap(),
        (0, pg_latest_version())
    );
    assert_eq!(
        pg_migrate(&mut c2, &db2.url).unwrap(),
        (pg_latest_version(), pg_latest_version())
    );
}

#[test]
fn keel_run_on_an_unreachable_shared_store_fails_with_one_line_and_creates_no_store() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("keel.toml");
    std::fs::write(
        &config,
        "[storage]\nbackend = \"postgres\"\nurl = \"postgresql://keel@/keel?host=/nonexistent\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["run", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot connect to postgres"), "{err}");
    assert_eq!(
        err.lines().filter(|l| l.contains("error")).count(),
        1,
        "{err}"
    );
    // Nothing was created in the data dir's store.
    assert!(!dir.path().join("data/keel.db").exists());
}

/// The lease keeper (issue 13) on both backends: two instances want the
/// same lease; exactly one holds it; when the holder stops renewing (as a
/// killed instance does) the other takes it over within 10 s, with a higher
/// token, and the old holder's offset write is refused as stale.
#[actix::test]
async fn two_lease_keepers_one_holder_takeover_within_10s_and_stale_token_refused() {
    use keel_actors::lease::{LeaseKeeper, LeaseTimes};
    for s in backends("keeper", 2) {
        let clock: Arc<dyn Clock> = Arc::new(WallClock);
        let times = LeaseTimes::default();
        let a = LeaseKeeper::start(s.instances[0].clone(), clock.clone(), "ia", "{}", times)
            .await
            .unwrap();
        let b = LeaseKeeper::start(s.instances[1].clone(), clock.clone(), "ib", "{}", times)
            .await
            .unwrap();
        let name = "telegram:bot1";
        let mut ra = a.want(name).await;
        let mut rb = b.want(name).await;
        let (ta, tb) = (*ra.borrow_and_update(), *rb.borrow_and_update());
        assert!(
            ta.is_some() != tb.is_some(),
            "{}: exactly one holder, got {ta:?} / {tb:?}",
            s.name
        );
        let (holder, other, mut rother, token) = match ta {
            Some(t) => (a.clone(), b.clone(), rb, t),
            None => (b.clone(), a.clone(), ra, tb.unwrap()),
        };
        // Several renewal rounds later nothing moved.
        tokio::time::sleep(times.renew * 2 + std::time::Duration::from_millis(200)).await;
        assert_eq!(holder.token(name), Some(token), "{}", s.name);
        assert_eq!(other.token(name), None, "{}", s.name);
        let put = |who: &Addr<PersistenceActor>, token: i64, offset: i64| {
            who.send(PutFencedAdapterState {
                lease: name.into(),
                token,
                adapter: "telegram:bot1".into(),
                state_json: format!("{{\"offset\":{offset}}}"),
            })
        };
        let holder_store = if ta.is_some() {
            &s.instances[0]
        } else {
            &s.instances[1]
        };
        put(holder_store, token, 5).await.unwrap().unwrap();
        // The holder dies (stops renewing, releases nothing).
        let died = std::time::Instant::now();
        holder.halt();
        let gained = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            loop {
                rother.changed().await.unwrap();
                if let Some(t) = *rother.borrow_and_update() {
                    return t;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{}: no takeover within 10 s", s.name));
        assert!(gained > token, "{}: token {gained} after {token}", s.name);
        eprintln!("{}: lease moved after {:?}", s.name, died.elapsed());
        let stale = put(holder_store, token, 6).await.unwrap();
        assert!(
            stale
                .as_ref()
                .is_err_and(|e| e.to_string().contains("stale lease")),
            "{}: {stale:?}",
            s.name
        );
        let other_store = if ta.is_some() {
            &s.instances[1]
        } else {
            &s.instances[0]
        };
        put(other_store, gained, 7).await.unwrap().unwrap();
        let (instances, leases) = other_store.send(GetCluster).await.unwrap().unwrap();
        assert_eq!(instances.len(), 2, "{}", s.name);
        assert_eq!(leases[0].holder, other.holder(), "{}", s.name);
        other.leave().await;
    }
}

/// R49 on PostgreSQL: a unit of work that numbers a session's turns waits
/// for another instance's open transaction on that session, then numbers
/// after what it committed. Another instance is stood in for by a raw
/// connection holding the session row (`FOR UPDATE`, as the job does)
/// before it adds a turn; the instance's message must be seen waiting on a
/// lock, the other's turn must then go in without waiting for the message
/// (so the message had numbered nothing yet), and the message must come out
/// numbered right after it. Without the job's row lock the message would
/// take the other's seq first and the other's insert would time out.
#[actix::test]
async fn a_message_waits_for_another_instances_open_transaction_on_its_session_and_numbers_after_it(
) {
    let Some(s) = postgres("txn_open", 1) else {
        return;
    };
    let Fixture::Postgres(url) = &s.fixture else {
        unreachable!("a postgres store");
    };
    let st = &s.instances[0];
    st.send(CommitExchange(msg("held", "u1", "m1", "first", Some("ok"))))
        .await
        .unwrap()
        .unwrap();
    let (locked_tx, locked_rx) = std::sync::mpsc::channel::<()>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let holder_url = url.clone();
    let holder = std::thread::spawn(move || -> Result<i64, String> {
        let mut c = connect(&holder_url).unwrap();
        let mut t = c.transaction().unwrap();
        // Locked, not yet written: the state another instance is in
        // between numbering and adding its turn.
        let next: i64 = t
            .query_one(
                "SELECT next_seq FROM sessions WHERE id = 'webhook:held' FOR UPDATE",
                &[],
            )
            .unwrap()
            .get(0);
        locked_tx.send(()).unwrap();
        go_rx.recv().unwrap();
        // Had the message numbered without the lock, its uncommitted turn
        // would hold this seq and this insert would wait for it: fail fast.
        t.batch_execute("SET LOCAL lock_timeout = '500ms'").unwrap();
        t.execute(
            "INSERT INTO turns (session_id, seq, role, content, created_at)
             VALUES ('webhook:held', $1, 'system', 'from the other instance', '2026-01-01T00:00:00Z')",
            &[&next],
        )
        .map_err(|e| format!("the other instance could not add its turn {next}: {e}"))?;
        t.execute(
            "UPDATE sessions SET next_seq = $1 WHERE id = 'webhook:held'",
            &[&(next + 1)],
        )
        .map_err(|e| e.to_string())?;
        t.commit().map_err(|e| e.to_string())?;
        Ok(next)
    });
    locked_rx.recv().unwrap();
    let waiting = st.send(CommitExchange(msg(
        "held",
        "u2",
        "m2",
        "second",
        Some("ok"),
    )));
    let waiting = actix::spawn(waiting);
    // The instance's transaction is blocked on the held row lock.
    assert!(
        waits_on_a_lock(url).await,
        "the message did not wait for the session's row lock"
    );
    go_tx.send(()).unwrap();
    let other_seq = holder.join().unwrap().unwrap();
    let out = waiting.await.unwrap().unwrap().unwrap();
    let ExchangeOutcome::Accepted {
        user_seq,
        reply_seq,
        ..
    } = out
    else {
        panic!("{out:?}");
    };
    assert_eq!((other_seq, user_seq, reply_seq), (3, 4, Some(5)));
    let turns = st
        .send(GetTurns {
            session: "webhook:held".into(),
            after_seq: 0,
            limit: 100,
        })
        .await
        .unwrap()
        .unwrap();
    let seqs: Vec<i64> = turns.expect("the session").iter().map(|t| t.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5], "gapless, no duplicates");
}

// ---- timers (issue 13): the messages the timer actor and the chat
// commands use, on both backends.

use keel_actors::persistence::sessions::ChatEvent;
use keel_actors::persistence::timers::{
    CancelTimerById, CountActiveTimers, Effect, FireOutcome, FireTimer, FireTimers, GetDueWindow,
    GetTimer, GetTimerCounts, GetTimers, PruneTimers, TimerRequest, TimerRow,
};
use keel_actors::schedule::plan::Misfire;
use keel_actors::schedule::ScheduleSpec;

/// A chat command `key` in `webhook:<chat>` from `u1` with `effect`; the
/// reply text the store rendered for it (`None`: a duplicate).
async fn command(
    st: &Addr<PersistenceActor>,
    chat: &str,
    key: &str,
    effect: Effect,
) -> Option<String> {
    let mut ex = msg(chat, "u1", key, &format!("command {key}"), Some(""));
    ex.effect = Some(effect);
    let out = st.send(CommitExchange(ex)).await.unwrap().unwrap();
    let ExchangeOutcome::Accepted {
        reply_seq: Some(seq),
        ..
    } = out
    else {
        return None;
    };
    let turns = st
        .send(GetTurns {
            session: format!("webhook:{chat}"),
            after_seq: seq - 1,
            limit: 1,
        })
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    Some(turns[0].text.clone())
}

fn remind(spec: ScheduleSpec, text: &str) -> Effect {
    Effect::CreateTimer(TimerRequest {
        spec,
        text: text.into(),
        misfire: Misfire::FireOnce,
        task: None,
    })
}

fn routed() -> Arc<HashSet<String>> {
    Arc::new(HashSet::from(["webhook".to_string()]))
}

async fn timer(st: &Addr<PersistenceActor>, id: i64) -> TimerRow {
    st.send(GetTimer { id }).await.unwrap().unwrap().unwrap()
}

async fn fire(st: &Addr<PersistenceActor>, id: i64, due: i64, now_ms: i64) -> FireOutcome {
    st.send(FireTimer {
        id,
        due,
        now_ms,
        routed: routed(),
    })
    .await
    .unwrap()
    .unwrap()
}

async fn texts(st: &Addr<PersistenceActor>, session: &str) -> Vec<String> {
    st.send(GetTurns {
        session: session.into(),
        after_seq: 0,
        limit: 1000,
    })
    .await
    .unwrap()
    .unwrap()
    .unwrap()
    .into_iter()
    .map(|t| t.text)
    .collect()
}

#[actix::test]
async fn a_remind_command_creates_a_timer_that_is_listed_counted_and_fires_once_at_its_due_instant()
{
    for s in backends("timer_fire", 1) {
        let st = &s.instances[0];
        let reply = command(st, "c1", "m1", remind(ScheduleSpec::Delay(60_000), "tea"))
            .await
            .unwrap();
        assert!(
            reply.starts_with("Reminder #1 set for"),
            "{}: {reply}",
            s.name
        );
        // A redelivered command is a duplicate: no second timer.
        let dup = command(st, "c1", "m1", remind(ScheduleSpec::Delay(60_000), "tea")).await;
        assert_eq!(dup, None, "{}", s.name);
        let all = st.send(GetTimers { limit: 100 }).await.unwrap().unwrap();
        assert_eq!(all.len(), 1, "{}", s.name);
        let t = &all[0];
        assert_eq!(
            (
                t.id,
                t.session_id.as_str(),
                t.kind.as_str(),
                t.callback.as_str()
            ),
            (1, "webhook:c1", "once", "reminder"),
            "{}",
            s.name
        );
        assert_eq!((t.state.as_str(), t.fired_count), ("active", 0));
        let due = t.next_run.unwrap();
        assert_eq!(
            st.send(GetTimerCounts).await.unwrap().unwrap(),
            vec![("active".to_string(), 1)],
            "{}",
            s.name
        );
        assert_eq!(st.send(CountActiveTimers).await.unwrap().unwrap(), 1);
        let window = st
            .send(GetDueWindow {
                limit: 10,
                after: None,
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(window, vec![(1, due)], "{}", s.name);
        // Not due at another instant: stale, nothing fired.
        assert!(fire(st, 1, due - 1, due).await.stale, "{}", s.name);
        let first = fire(st, 1, due, due + 5).await;
        assert_eq!(
            (first.fired, first.outbox_rows, first.next_run, first.stale),
            (1, 1, None, false),
            "{}",
            s.name
        );
        assert!(fire(st, 1, due, due + 10).await.stale, "{}", s.name);
        let t = timer(st, 1).await;
        assert_eq!(
            (t.state.as_str(), t.fired_count, t.last_fired, t.next_run),
            ("done", 1, Some(due), None),
            "{}",
            s.name
        );
        let reminders: Vec<String> = texts(st, "webhook:c1")
            .await
            .into_iter()
            .filter(|t| t.starts_with("⏰ Reminder #1: tea"))
            .collect();
        assert_eq!(reminders.len(), 1, "{}: {reminders:?}", s.name);
        let pending = st
            .send(GetPendingOutbox {
                after: 0,
                limit: 10,
                with_unknown: false,
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            pending
                .iter()
                .filter(|r| r.text.starts_with("⏰ Reminder #1: tea"))
                .count(),
            1,
            "{}",
            s.name
        );
        assert_eq!(st.send(CountActiveTimers).await.unwrap().unwrap(), 0);
        assert!(st
            .send(GetDueWindow {
                limit: 10,
                after: None
            })
            .await
            .unwrap()
            .unwrap()
            .is_empty());
    }
}

#[actix::test]
async fn timers_are_listed_and_cancelled_from_their_own_chat_only_then_pruned() {
    for s in backends("timer_cancel", 1) {
        let st = &s.instances[0];
        command(st, "c1", "m1", remind(ScheduleSpec::Every(60_000), "walk")).await;
        command(st, "c1", "m2", remind(ScheduleSpec::Delay(30_000), "tea")).await;
        let list = command(st, "c1", "m3", Effect::ListTimers).await.unwrap();
        let lines: Vec<&str> = list.lines().collect();
        assert_eq!(lines.len(), 2, "{}: {list}", s.name);
        // Soonest first: the 30 s reminder, then the every-minute one.
        assert!(lines[0].starts_with("#2 ") && lines[0].ends_with(": tea"));
        assert!(
            lines[1].starts_with("#1 ") && lines[1].contains("(every 60s): walk"),
            "{}: {list}",
            s.name
        );
        let other = command(st, "c2", "m1", Effect::CancelTimer(1))
            .await
            .unwrap();
        assert!(
            other.starts_with("No active timer #1"),
            "{}: {other}",
            s.name
        );
        assert_eq!(timer(st, 1).await.state, "active");
        let own = command(st, "c1", "m4", Effect::CancelTimer(1))
            .await
            .unwrap();
        assert_eq!(own, "Timer #1 cancelled.", "{}", s.name);
        let t = timer(st, 1).await;
        assert_eq!((t.state.as_str(), t.next_run), ("cancelled", None));
        // The operator's cancel: once.
        assert!(st.send(CancelTimerById { id: 2 }).await.unwrap().unwrap());
        assert!(!st.send(CancelTimerById { id: 2 }).await.unwrap().unwrap());
        let empty = command(st, "c1", "m5", Effect::ListTimers).await.unwrap();
        assert!(
            empty.starts_with("No active timers."),
            "{}: {empty}",
            s.name
        );
        assert_eq!(
            st.send(GetTimerCounts).await.unwrap().unwrap(),
            vec![("cancelled".to_string(), 2)],
            "{}",
            s.name
        );
        // A fired instant leaves a receipt; pruning takes finished timers
        // and old receipts, never an active timer.
        command(
            st,
            "c1",
            "m6",
            remind(ScheduleSpec::Every(60_000), "stretch"),
        )
        .await;
        let due = timer(st, 3).await.next_run.unwrap();
        assert_eq!(fire(st, 3, due, due).await.fired, 1);
        let nothing = st
            .send(PruneTimers {
                before: "2000-01-01T00:00:00Z".into(),
                before_ms: 0,
                limit: 100,
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(nothing, (0, 0), "{}", s.name);
        let pruned = st
            .send(PruneTimers {
                before: "9999-01-01T00:00:00Z".into(),
                before_ms: i64::MAX,
                limit: 100,
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(pruned, (2, 1), "{}", s.name);
        let left = st.send(GetTimers { limit: 100 }).await.unwrap().unwrap();
        assert_eq!(
            left.iter()
                .map(|t| (t.id, t.state.as_str()))
                .collect::<Vec<_>>(),
            vec![(3, "active")],
            "{}",
            s.name
        );
    }
}

#[actix::test]
async fn state_transition_and_task_callbacks_fire_at_their_due_instant() {
    for s in backends("timer_callbacks", 1) {
        let st = &s.instances[0];
        command(st, "c1", "m1", remind(ScheduleSpec::Every(60_000), "daily")).await;
        command(st, "c1", "m2", remind(ScheduleSpec::Delay(30_000), "stop")).await;
        command(st, "c1", "m3", remind(ScheduleSpec::Every(60_000), "job")).await;
        s.fixture(
            "UPDATE timers SET callback = 'state_transition',
                 params_json = '{\"timer_id\":1,\"to\":\"cancelled\"}' WHERE id = 2;
             UPDATE timers SET callback = 'task',
                 params_json = '{\"name\":\"backup\",\"args\":[\"--full\"]}' WHERE id = 3;",
        );
        let due = timer(st, 2).await.next_run.unwrap();
        let out = fire(st, 2, due, due).await;
        assert_eq!(
            (out.fired, out.outbox_rows, out.parked),
            (1, 0, false),
            "{}",
            s.name
        );
        assert_eq!(timer(st, 1).await.state, "cancelled", "{}", s.name);
        assert_eq!(timer(st, 2).await.state, "done", "{}", s.name);
        assert!(texts(st, "webhook:c1")
            .await
            .contains(&"Timer #1 cancelled by timer #2.".to_string()));
        // Its instant fired: firing it again changes nothing.
        assert!(fire(st, 2, due, due).await.stale);
        let due = timer(st, 3).await.next_run.unwrap();
        let out = fire(st, 3, due, due).await;
        let t = timer(st, 3).await;
        // Queued in the fire's transaction, told to the chat.
        assert_eq!(
            (out.fired, out.tasks_queued, out.parked),
            (1, 1, false),
            "{}",
            s.name
        );
        assert_eq!(t.state, "active", "{}", s.name);
        assert!(texts(st, "webhook:c1")
            .await
            .iter()
            .any(|t| t.starts_with("Timer #3 started task 1 (backup)")));
    }
}

#[actix::test]
async fn the_due_window_refills_after_its_cursor_and_a_batch_fires_each_timer_in_its_own_savepoint()
{
    for s in backends("timer_window", 1) {
        let st = &s.instances[0];
        s.fixture(
            "INSERT INTO sessions (id, channel, chat, created_at, updated_at)
             VALUES ('webhook:w', 'webhook', 'w', 'x', 'x');
             INSERT INTO timers (session_id, kind, schedule, timezone, callback, params_json,
                                 next_run, created_at, updated_at)
             VALUES ('webhook:w', 'once', '1000', 'UTC', 'reminder', '{\"text\":\"a\"}', 1000, 'x', 'x'),
                    ('webhook:w', 'once', '1000', 'UTC', 'reminder', '{\"text\":\"b\"}', 1000, 'x', 'x'),
                    ('webhook:w', 'interval', '1000', 'UTC', 'reminder', '{\"text\":\"c\"}', 1000, 'x', 'x'),
                    ('webhook:w', 'once', '2000', 'UTC', 'launch_rockets', '{}', 2000, 'x', 'x'),
                    ('webhook:w', 'once', '3000', 'UTC', 'reminder', '{\"text\":\"e\"}', 3000, 'x', 'x');",
        );
        let all = st
            .send(GetDueWindow {
                limit: 10,
                after: None,
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            all,
            vec![(1, 1000), (2, 1000), (3, 1000), (4, 2000), (5, 3000)],
            "{}",
            s.name
        );
        let rest = st
            .send(GetDueWindow {
                limit: 2,
                after: Some((1000, 2)),
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rest, vec![(3, 1000), (4, 2000)], "{}", s.name);
        // One batch: two due reminders, an interval timer, an unknown
        // callback (parks), and a wrong instant (stale).
        let out = st
            .send(FireTimers {
                fires: vec![(1, 1000), (2, 1000), (3, 1000), (4, 2000), (5, 9999)],
                now_ms: 2_500,
                routed: routed(),
            })
            .await
            .unwrap()
            .unwrap();
        let out: Vec<FireOutcome> = out.into_iter().map(|r| r.unwrap()).collect();
        assert_eq!(
            out.iter()
                .map(|o| (o.fired, o.next_run, o.parked, o.stale))
                .collect::<Vec<_>>(),
            vec![
                (1, None, false, false),
                (1, None, false, false),
                // Due at 1000, now 2500: fire_once fires one, next 3000.
                (1, Some(3000), false, false),
                (0, None, true, false),
                (0, None, false, true),
            ],
            "{}",
            s.name
        );
        let t4 = timer(st, 4).await;
        assert_eq!(t4.state, "parked");
        assert!(t4.error.unwrap().contains("launch_rockets"));
        let window = st
            .send(GetDueWindow {
                limit: 10,
                after: None,
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(window, vec![(3, 3000), (5, 3000)], "{}", s.name);
        assert_eq!(
            texts(st, "webhook:w").await,
            vec![
                "⏰ Reminder #1: a",
                "⏰ Reminder #2: b",
                "⏰ Reminder #3: c"
            ],
            "{}",
            s.name
        );
    }
}

#[actix::test]
async fn an_unreachable_chat_pauses_its_timers_and_writing_again_resumes_them() {
    for s in backends("timer_pause", 1) {
        let st = &s.instances[0];
        command(st, "c1", "m1", remind(ScheduleSpec::Every(60_000), "walk")).await;
        let due = timer(st, 1).await.next_run.unwrap();
        let mut kicked = msg("c1", "u1", "m2", "(kicked)", None);
        kicked.answer = false;
        kicked.chat_event = Some(ChatEvent::Unreachable("kicked".into()));
        st.send(CommitExchange(kicked)).await.unwrap().unwrap();
        let t = timer(st, 1).await;
        assert_eq!(
            (t.state.as_str(), t.error.as_deref(), t.next_run),
            ("parked", Some("paused: kicked"), Some(due)),
            "{}",
            s.name
        );
        assert!(st
            .send(GetDueWindow {
                limit: 10,
                after: None
            })
            .await
            .unwrap()
            .unwrap()
            .is_empty());
        // The chat writes to keel again: reachable, the timer resumes.
        st.send(CommitExchange(msg("c1", "u1", "m3", "hi", Some("hello"))))
            .await
            .unwrap()
            .unwrap();
        let t = timer(st, 1).await;
        assert_eq!(
            (t.state.as_str(), t.error, t.next_run),
            ("active", None, Some(due)),
            "{}",
            s.name
        );
        assert_eq!(fire(st, 1, due, due).await.fired, 1, "{}", s.name);
    }
}

/// Both instances' timer actors fire the same 20 due timers at once. Each
/// fires once; the one that comes second finds the timer moved on (stale)
/// because `fire_timer` locks the row (`FOR UPDATE OF t`) and re-reads it
/// after the other's COMMIT — without that lock this fails on PostgreSQL
/// (a fire that inserted no receipt yet reported not stale).
#[actix::test]
async fn two_instances_firing_the_same_timers_at_once_fire_each_instant_once() {
    for s in backends("timer_race", 2) {
        let mut values = Vec::new();
        for i in 0..20 {
            values.push(format!(
                "('webhook:r', 'interval', '60000', 'UTC', 'reminder', '{{\"text\":\"t{i}\"}}', 5000, 'x', 'x')"
            ));
        }
        s.fixture(&format!(
            "INSERT INTO sessions (id, channel, chat, created_at, updated_at)
             VALUES ('webhook:r', 'webhook', 'r', 'x', 'x');
             INSERT INTO timers (session_id, kind, schedule, timezone, callback, params_json,
                                 next_run, created_at, updated_at) VALUES {};",
            values.join(", ")
        ));
        let fires: Vec<(i64, i64)> = (1..=20).map(|id| (id, 5000)).collect();
        let calls = s.instances.iter().map(|st| {
            st.send(FireTimers {
                fires: fires.clone(),
                now_ms: 5_000,
                routed: routed(),
            })
        });
        let mut fired = 0;
        for r in futures::future::join_all(calls).await {
            for o in r.unwrap().unwrap() {
                let o = o.unwrap();
                assert!(o.fired == 1 || o.stale, "{}: {o:?}", s.name);
                fired += o.fired;
            }
        }
        assert_eq!(fired, 20, "{}: each timer once", s.name);
        let turns = texts(&s.instances[0], "webhook:r").await;
        assert_eq!(turns.len(), 20, "{}", s.name);
        let all = s.instances[1]
            .send(GetTimers { limit: 100 })
            .await
            .unwrap()
            .unwrap();
        assert!(
            all.iter()
                .all(|t| t.fired_count == 1 && t.next_run == Some(65_000)),
            "{}",
            s.name
        );
    }
}

/// Whether a session of the test database is seen waiting on a lock
/// within 30 s (polled; the pauses let the actor deliver its job).
async fn waits_on_a_lock(url: &str) -> bool {
    let watch_url = url.to_string();
    let mut watch = pg::off_runtime(move || connect(&watch_url).unwrap());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let blocked = loop {
        let n: i64 = pg::off_runtime(|| {
            watch
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                    &[],
                )
                .unwrap()
                .get(0)
        });
        if n > 0 {
            break true;
        }
        if std::time::Instant::now() >= deadline {
            break false;
        }
        actix_rt::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    // The sync client must not be dropped on a runtime thread either.
    pg::off_runtime(move || drop(watch));
    blocked
}

/// On PostgreSQL the reads of the HTTP routes run beside the writer, on
/// pooled read-only connections: while the writer is stuck on a session
/// row another instance holds (its message waits for the lock), listing
/// the sessions and reading the turns still answer, and the message goes
/// through once the lock is let go. On the writer they would queue behind
/// the stuck message until the other instance let go.
#[actix::test]
async fn reads_on_postgres_answer_while_the_writer_waits_on_another_instances_lock() {
    let Some(s) = postgres("reads_beside", 1) else {
        return;
    };
    let Fixture::Postgres(url) = &s.fixture else {
        unreachable!("a postgres store");
    };
    let st = &s.instances[0];
    st.send(CommitExchange(msg("held", "u1", "m1", "first", Some("ok"))))
        .await
        .unwrap()
        .unwrap();
    let (release, holder) = hold_row_lock(
        url,
        "SELECT next_seq FROM sessions WHERE id = 'webhook:held' FOR UPDATE",
    );
    let waiting = actix::spawn(st.send(CommitExchange(msg(
        "held",
        "u2",
        "m2",
        "second",
        Some("ok"),
    ))));
    assert!(
        waits_on_a_lock(url).await,
        "the message did not wait for the session's row lock"
    );
    let within = std::time::Duration::from_secs(5);
    let sessions = actix_rt::time::timeout(within, st.send(GetSessions))
        .await
        .expect("listing the sessions waited behind the stuck writer")
        .unwrap()
        .unwrap();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    let turns = actix_rt::time::timeout(
        within,
        st.send(GetTurns {
            session: "webhook:held".into(),
            after_seq: 0,
            limit: 100,
        }),
    )
    .await
    .expect("reading the turns waited behind the stuck writer")
    .unwrap()
    .unwrap()
    .expect("the session exists");
    assert_eq!(turns.len(), 2, "the first exchange only: {turns:?}");
    assert!(!waiting.is_finished(), "the message did not wait");
    release.send(()).unwrap();
    holder.join().unwrap();
    let out = waiting.await.unwrap().unwrap().unwrap();
    assert!(
        matches!(out, ExchangeOutcome::Accepted { user_seq: 3, .. }),
        "{out:?}"
    );
}

/// A raw PostgreSQL connection runs `query` (a `… FOR UPDATE`) in a
/// transaction and holds it; returns once the lock is taken. Sending on
/// the sender (or 20 s) commits; join the handle after.
fn hold_row_lock(
    url: &str,
    query: &'static str,
) -> (std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    let (locked_tx, locked_rx) = std::sync::mpsc::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let url = url.to_string();
    let holder = std::thread::spawn(move || {
        let mut c = connect(&url).unwrap();
        let mut t = c.transaction().unwrap();
        t.query_one(query, &[]).unwrap();
        locked_tx.send(()).unwrap();
        let _ = done_rx.recv_timeout(std::time::Duration::from_secs(20));
        t.commit().unwrap();
    });
    locked_rx.recv().unwrap();
    (done_tx, holder)
}

/// On PostgreSQL a timer fire waits only briefly for its conversation's
/// row lock: another instance's batch may hold the conversation while it
/// waits for a lock of this batch, and PostgreSQL would break that cycle
/// only after `deadlock_timeout` (1 s), twice in a row made reminders 2.8 s
/// late. A raw connection holds the conversation (`FOR UPDATE`, as a
/// message being numbered does) until the fire has answered: the fire must
/// come back `Contended` (its due instant untouched) instead of waiting for
/// the holder, and fire once the holder is gone.
#[actix::test]
async fn a_timer_fire_gives_up_on_a_held_conversation_lock_instead_of_waiting_for_deadlock_detection(
) {
    let Some(s) = postgres("fire_lock", 1) else {
        return;
    };
    let Fixture::Postgres(url) = &s.fixture else {
        unreachable!("a postgres store");
    };
    s.fixture(
        "INSERT INTO sessions (id, channel, chat, created_at, updated_at)
         VALUES ('webhook:held', 'webhook', 'held', 'x', 'x');
         INSERT INTO timers (session_id, kind, schedule, timezone, callback, params_json,
                             next_run, created_at, updated_at)
         VALUES ('webhook:held', 'once', '5000', 'UTC', 'reminder', '{\"text\":\"tea\"}', 5000, 'x', 'x');",
    );
    // Released once the fire answered; a fire that waits for the lock gets
    // it only after the holder's 20 s bound.
    let (done_tx, holder) = hold_row_lock(
        url,
        "SELECT next_seq FROM sessions WHERE id = 'webhook:held' FOR UPDATE",
    );
    let st = &s.instances[0];
    let fire = |st: &Addr<PersistenceActor>| {
        st.send(FireTimers {
            fires: vec![(1, 5000)],
            now_ms: 5_000,
            routed: routed(),
        })
    };
    let held = fire(st).await.unwrap();
    done_tx.send(()).unwrap();
    holder.join().unwrap();
    assert!(
        matches!(held, Err(StoreError::Contended(_))),
        "a fire behind a held conversation lock: {held:?}"
    );
    assert_eq!(timer(st, 1).await.next_run, Some(5000), "still due");
    let free = fire(st).await.unwrap().unwrap();
    assert_eq!(free.len(), 1);
    assert_eq!(free[0].as_ref().unwrap().fired, 1, "{free:?}");
    assert_eq!(texts(st, "webhook:held").await.len(), 1);
}

/// A window of fires runs under one savepoint; when one fire fails on its
/// own (here a trigger refuses timer 2's receipt), the window is run again
/// fire by fire: the others fire once, the failing one stays due, and
/// nothing of it is half-applied.
#[actix::test]
async fn one_failing_fire_in_a_window_leaves_the_others_fired_once() {
    for s in backends("fire_one_fails", 1) {
        let trigger = match &s.fixture {
            Fixture::Sqlite(_) => {
                "CREATE TRIGGER boom BEFORE INSERT ON timer_fires
                 WHEN NEW.timer_id = 2 BEGIN SELECT RAISE(ABORT, 'boom'); END;"
            }
            Fixture::Postgres(_) => {
                "CREATE FUNCTION boom() RETURNS trigger AS $$
                 BEGIN IF NEW.timer_id = 2 THEN RAISE EXCEPTION 'boom'; END IF; RETURN NEW; END
                 $$ LANGUAGE plpgsql;
                 CREATE TRIGGER boom BEFORE INSERT ON timer_fires
                 FOR EACH ROW EXECUTE FUNCTION boom();"
            }
        };
        let mut sql = String::from(
            "INSERT INTO sessions (id, channel, chat, created_at, updated_at)
             VALUES ('webhook:w', 'webhook', 'w', 'x', 'x');",
        );
        for note in ["one", "two", "three"] {
            sql.push_str(&format!(
                "INSERT INTO timers (session_id, kind, schedule, timezone, callback, params_json,
                                     next_run, created_at, updated_at)
                 VALUES ('webhook:w', 'once', '5000', 'UTC', 'reminder', '{{\"text\":\"{note}\"}}',
                         5000, 'x', 'x');"
            ));
        }
        sql.push_str(trigger);
        s.fixture(&sql);
        let st = &s.instances[0];
        let out = st
            .send(FireTimers {
                fires: vec![(1, 5000), (2, 5000), (3, 5000)],
                now_ms: 5_000,
                routed: routed(),
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(out.len(), 3, "{}", s.name);
        assert_eq!(
            out[0].as_ref().map(|o| o.fired).ok(),
            Some(1),
            "{}: {out:?}",
            s.name
        );
        assert!(out[1].is_err(), "{}: {out:?}", s.name);
        assert_eq!(
            out[2].as_ref().map(|o| o.fired).ok(),
            Some(1),
            "{}: {out:?}",
            s.name
        );
        assert_eq!(
            timer(st, 2).await.next_run,
            Some(5000),
            "{}: still due",
            s.name
        );
        assert_ne!(timer(st, 1).await.next_run, Some(5000), "{}: fired", s.name);
        let mut texts = texts(st, "webhook:w").await;
        texts.sort();
        assert_eq!(texts.len(), 2, "{}: {texts:?}", s.name);
    }
}

/// A lease holder whose store stops answering (its renewal blocked behind
/// a lock here; a hung server or network alike) must stop counting itself
/// the holder once its last confirmed renewal runs out — another instance
/// may take the lease from then on, and two outbox senders or pollers would
/// each do the work. A raw connection holds the lease row `FOR UPDATE`, so
/// the keeper's renewal (an upsert of that row) waits; the keeper must say
/// "not held" within the lease's length, and "held" again once the row is
/// free.
#[actix::test]
async fn a_lease_whose_renewal_hangs_is_given_up_when_it_runs_out() {
    use keel_actors::lease::{LeaseKeeper, LeaseTimes};
    let Some(s) = postgres("lease_hang", 1) else {
        return;
    };
    let Fixture::Postgres(url) = &s.fixture else {
        unreachable!("a postgres store");
    };
    let times = LeaseTimes {
        renew: std::time::Duration::from_millis(100),
        ttl: std::time::Duration::from_millis(600),
    };
    let clock: Arc<dyn Clock> = Arc::new(WallClock);
    let keeper = LeaseKeeper::start(s.instances[0].clone(), clock, "ih", "{}", times)
        .await
        .unwrap();
    let mut held = keeper.want("outbox").await;
    let token = held
        .borrow_and_update()
        .expect("the only instance takes the lease");
    let (done_tx, locker) = hold_row_lock(
        url,
        "SELECT token FROM leases WHERE name = 'outbox' FOR UPDATE",
    );
    let locked_at = std::time::Instant::now();
    let lost = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while held.borrow_and_update().is_some() {
            held.changed().await.unwrap();
        }
    })
    .await;
    let waited = locked_at.elapsed();
    done_tx.send(()).unwrap();
    locker.join().unwrap();
    assert!(
        lost.is_ok(),
        "still counted as held 10 s after its renewals stopped being answered (ttl {:?})",
        times.ttl
    );
    assert!(
        waited <= times.ttl + std::time::Duration::from_millis(500),
        "given up only after {waited:?} (ttl {:?})",
        times.ttl
    );
    let back = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            if let Some(t) = *held.borrow_and_update() {
                return t;
            }
            held.changed().await.unwrap();
        }
    })
    .await
    .expect("held again once the store answers");
    // The same token if a late renewal committed before the lease ran out
    // in the store, a higher one (fencing anything of the gap) if not.
    assert!(back >= token, "token {back} after {token}");
    keeper.leave().await;
}

#[actix::test]
async fn the_senders_timezone_is_stored_and_used_by_new_timers_only() {
    for s in backends("timer_tz", 1) {
        let st = &s.instances[0];
        command(
            st,
            "c1",
            "m1",
            remind(ScheduleSpec::Cron("0 9 * * *".into()), "old"),
        )
        .await;
        let set = command(st, "c1", "m2", Effect::SetTimezone("Europe/Berlin".into()))
            .await
            .unwrap();
        assert!(set.starts_with("Timezone set to Europe/Berlin."), "{set}");
        let reply = command(
            st,
            "c1",
            "m3",
            remind(ScheduleSpec::Cron("0 9 * * *".into()), "new"),
        )
        .await
        .unwrap();
        assert!(reply.contains("(Europe/Berlin)"), "{}: {reply}", s.name);
        let (old, new) = (timer(st, 1).await, timer(st, 2).await);
        assert_eq!(
            (old.timezone.as_str(), new.timezone.as_str()),
            ("UTC", "Europe/Berlin"),
            "{}",
            s.name
        );
        let local = keel_actors::persistence::timers::show_instant(
            new.next_run.unwrap(),
            keel_actors::schedule::parse_tz("Europe/Berlin").unwrap(),
        );
        assert!(local.contains(" 09:00:00 "), "{}: {local}", s.name);
    }
}

#[actix::test]
async fn audit_and_service_event_chains_stay_gapless_when_instances_append_at_once() {
    use keel_actors::persistence::audit::{AppendAudit, GetAudit};
    use keel_actors::persistence::services::{AppendServiceEvent, GetServiceEvents};
    for s in backends("chains", 2) {
        let mut pending = Vec::new();
        for i in 0..40 {
            let st = s.instances[i % 2].clone();
            pending.push(async move {
                let a = st.send(AppendAudit {
                    kind: "token_granted",
                    detail: serde_json::json!({"id": format!("t{i}")}),
                });
                let e = st.send(AppendServiceEvent {
                    kind: "service_deployed".into(),
                    payload: format!("{{\"name\":\"svc{i}\"}}"),
                });
                (a.await.unwrap().unwrap(), e.await.unwrap().unwrap().seq)
            });
        }
        let done = futures::future::join_all(pending).await;
        let events: BTreeSet<i64> = done.iter().map(|d| d.1).collect();
        assert_eq!(events, (1..=40).collect(), "{}", s.name);
        let (records, check) = s.instances[1]
            .send(GetAudit { since: None })
            .await
            .unwrap()
            .unwrap();
        // 40 grants and one service_deployed per event (each append commits
        // its audit record with it).
        assert_eq!(records.len(), 80, "{}", s.name);
        let seqs: Vec<i64> = records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (1..=80).collect::<Vec<_>>(), "{}", s.name);
        assert_eq!(check, Ok(80), "{}", s.name);
        let links = s.instances[0]
            .send(GetServiceEvents)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(links.len(), 40, "{}", s.name);
        assert!(keel_actors::chain::verify(&links).ok(), "{}", s.name);
        // Append-only on both backends.
        let edit = match &s.fixture {
            Fixture::Sqlite(p) => rusqlite::Connection::open(p)
                .unwrap()
                .execute("UPDATE audit SET detail = '{}' WHERE seq = 2", [])
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Fixture::Postgres(url) => {
                let url = url.clone();
                pg::off_runtime(move || {
                    connect(&url)
                        .unwrap()
                        .batch_execute("UPDATE audit SET detail = '{}' WHERE seq = 2")
                        .map_err(|e| format!("{e:?}"))
                })
            }
        };
        let e = edit.unwrap_err();
        assert!(e.contains("append-only"), "{}: {e}", s.name);
    }
}

#[actix::test]
async fn tokens_boot_epochs_and_the_instance_id_work_on_both_backends() {
    use keel_actors::persistence::meta::{GetStats, RecordBoot};
    use keel_actors::persistence::services::GetOrCreateInstance;
    use keel_actors::persistence::vault::{GetTokens, GrantToken, RevokeToken, TokenRow};
    for s in backends("tokens", 2) {
        let row = TokenRow {
            id: "abc123".into(),
            secret_sha256: "00".repeat(32),
            perms: vec!["read".into(), "send".into()],
            scope: Some("telegram:".into()),
            note: None,
            created_at: String::new(),
            expires_ms: Some(9_999_999_999_999),
            last_used_at: None,
            revoked_at: None,
        };
        let granted = s.instances[0]
            .send(GrantToken(row.clone()))
            .await
            .unwrap()
            .unwrap();
        assert!(!granted.created_at.is_empty(), "{}", s.name);
        let seen = s.instances[1].send(GetTokens).await.unwrap().unwrap();
        assert_eq!(seen.len(), 1, "{}", s.name);
        assert_eq!(seen[0].perms, row.perms, "{}", s.name);
        assert_eq!(seen[0].scope, row.scope, "{}", s.name);
        assert_eq!(seen[0].expires_ms, row.expires_ms, "{}", s.name);
        assert!(s.instances[1]
            .send(RevokeToken("abc123".into()))
            .await
            .unwrap()
            .unwrap());
        assert!(!s.instances[0]
            .send(RevokeToken("abc123".into()))
            .await
            .unwrap()
            .unwrap());
        let seen = s.instances[0].send(GetTokens).await.unwrap().unwrap();
        assert!(seen[0].revoked_at.is_some(), "{}", s.name);

        // Starts on both instances at once: every one a distinct epoch.
        let boots =
            futures::future::join_all((0..10).map(|i| s.instances[i % 2].send(RecordBoot))).await;
        let epochs: BTreeSet<i64> = boots
            .into_iter()
            .map(|b| b.unwrap().unwrap().boot_epoch)
            .collect();
        assert_eq!(epochs.len(), 10, "{}: {epochs:?}", s.name);
        let stats = s.instances[0].send(GetStats).await.unwrap().unwrap();
        assert_eq!(stats.boot_epoch, 10, "{}", s.name);
        assert!(stats.schema_version > 0, "{}", s.name);

        let first = s.instances[0]
            .send(GetOrCreateInstance {
                proposed: "one".into(),
            })
            .await
            .unwrap()
            .unwrap();
        let second = s.instances[1]
            .send(GetOrCreateInstance {
                proposed: "two".into(),
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (first.as_str(), second.as_str()),
            ("one", "one"),
            "{}",
            s.name
        );
    }
}

/// A chat that moved (a Telegram group upgraded to a supergroup) and a
/// chat keel was removed from, on both backends: the move merges turns in
/// time order into the new session and readdresses unsent replies; an
/// unreachable chat fails its unsent replies and a message from it clears
/// the mark.
#[actix::test]
async fn a_moved_chat_merges_into_its_new_session_and_an_unreachable_one_fails_its_replies() {
    use keel_actors::persistence::ChatEvent;
    for s in backends("chats", 1) {
        let st = &s.instances[0];
        let send = |ex: Exchange| st.send(CommitExchange(ex));
        send(msg("old", "u1", "a", "one", Some("r1")))
            .await
            .unwrap()
            .unwrap();
        send(msg("new", "u1", "b", "two", Some("r2")))
            .await
            .unwrap()
            .unwrap();
        // The channel's service message telling of the move (no reply).
        let mut moved = msg("new", "u1", "c", "", None);
        moved.kind = "service".into();
        moved.answer = false;
        moved.chat_event = Some(ChatEvent::Migrated {
            from: "old".into(),
            to: "new".into(),
        });
        send(moved.clone()).await.unwrap().unwrap();
        // Redelivered: a duplicate, nothing applied twice.
        let again = send(moved).await.unwrap().unwrap();
        assert!(
            matches!(again, ExchangeOutcome::Duplicate { .. }),
            "{}: {again:?}",
            s.name
        );
        let turns = turns_of(st, "webhook:new").await;
        let texts: Vec<(i64, &str)> = turns.iter().map(|t| (t.seq, t.text.as_str())).collect();
        assert_eq!(
            texts,
            vec![(1, "one"), (2, "r1"), (3, "two"), (4, "r2"), (5, "")],
            "{}",
            s.name
        );
        // The moved turns took their keys along, renumbered.
        for (key, text, user_seq) in [("a", "one", 1), ("b", "two", 3)] {
            let again = send(msg("new", "u1", key, text, Some("r")))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                again,
                ExchangeOutcome::Duplicate { user_seq },
                "{}: {key}",
                s.name
            );
        }
        let pending = st
            .send(GetPendingOutbox {
                after: 0,
                limit: 100,
                with_unknown: true,
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(pending.len(), 2, "{}", s.name);
        assert!(
            pending
                .iter()
                .all(|r| r.chat == "new" && r.session_id == "webhook:new"),
            "{}: {pending:?}",
            s.name
        );

        // Kicked: unsent replies fail, then a message clears the mark.
        let mut kicked = msg("new", "u1", "d", "bye", None);
        kicked.chat_event = Some(ChatEvent::Unreachable("chat unreachable: kicked".into()));
        kicked.answer = false;
        send(kicked).await.unwrap().unwrap();
        let pending = st
            .send(GetPendingOutbox {
                after: 0,
                limit: 100,
                with_unknown: true,
            })
            .await
            .unwrap()
            .unwrap();
        assert!(pending.is_empty(), "{}: {pending:?}", s.name);
        let unreachable = |sessions: Vec<keel_actors::persistence::SessionSummary>| {
            sessions
                .into_iter()
                .find(|x| x.id == "webhook:new")
                .and_then(|x| x.unreachable)
        };
        let list = st.send(GetSessions).await.unwrap().unwrap();
        assert_eq!(
            unreachable(list).as_deref(),
            Some("chat unreachable: kicked"),
            "{}",
            s.name
        );
        send(msg("new", "u1", "e", "back", Some("hello again")))
            .await
            .unwrap()
            .unwrap();
        let list = st.send(GetSessions).await.unwrap().unwrap();
        assert_eq!(unreachable(list), None, "{}", s.name);
    }
}
