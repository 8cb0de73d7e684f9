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
    open_store, CommitExchange, Exchange, ExchangeOutcome, GetAdapterState, GetPendingOutbox,
    GetSessions, GetTurns, PersistenceActor, RecordSend, ReplyPlan, SendOutcome, SessionKey,
    StoreOptions,
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
        let turns = st
            .send(GetTurns {
                session: "webhook:c1".into(),
                after_seq: 0,
                limit: 100,
            })
            .await
            .unwrap()
            .unwrap()
            .unwrap();
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
        assert!(turns.iter().all(|t| t.role == "system" && t.text == "tick"));
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
fn keel_run_on_postgres_is_refused_with_one_line_until_the_store_is_complete() {
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
    assert!(err.contains("storage.backend = \"postgres\""), "{err}");
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
    let watch_url = url.clone();
    let mut watch = pg::off_runtime(move || connect(&watch_url).unwrap());
    // Polled with a deadline; the pauses let the actor deliver the job.
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
    assert!(
        blocked,
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
