//! Actor-level tests: the persistence actor's group commit, the outbox's
//! retry schedule (paused clock), and the session path's idempotency, each
//! on real actors over a real SQLite store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use futures::future::{join_all, BoxFuture};
use keel_actors::brain::CommandBrain;
use keel_actors::config::{OutboxConfig, Synchronous};
use keel_actors::error::{SendError, StoreError};
use keel_actors::health::Health;
use keel_actors::metrics::Metrics;
use keel_actors::outbox::{OutboundReply, OutboxActor, OutboxKick, ReplySink};
use keel_actors::persistence::{
    self, CommitAgentReply, CommitExchange, Exchange, ExchangeOutcome, GetTurns, PersistenceActor,
    ReplyPlan, SessionKey, StoreOptions,
};
use keel_actors::session::{Deliver, Delivered, SessionRegistry, SessionSettings};
use tokio::sync::mpsc;

fn options(path: Option<std::path::PathBuf>) -> StoreOptions {
    StoreOptions {
        path,
        synchronous: Synchronous::Full,
        busy_timeout: Duration::from_secs(5),
        max_batch: 1024,
        probe_interval: Duration::from_millis(100),
    }
}

fn start_store(path: Option<std::path::PathBuf>, metrics: &Metrics) -> Addr<PersistenceActor> {
    let opts = options(path);
    let (conn, _) = persistence::open_store(&opts).expect("open store");
    PersistenceActor::new(conn, opts, Health::new(metrics.clone()), metrics.clone()).start()
}

/// The stored turns of an existing session.
async fn turns_of(
    store: &Addr<PersistenceActor>,
    session: &str,
) -> Vec<keel_actors::persistence::TurnRow> {
    store
        .send(GetTurns {
            session: session.into(),
            after_seq: 0,
            limit: 100,
        })
        .await
        .expect("mailbox")
        .expect("store")
        .expect("session exists")
}

fn exchange(chat: &str, key: &str) -> Exchange {
    Exchange {
        session: SessionKey::new("webhook", chat),
        from: "u".into(),
        key: key.into(),
        text: format!("message {key}"),
        reply: Some(ReplyPlan {
            text: "ok".into(),
            deliver: true,
        }),
        memory: None,
        known: false,
        effect: None,
    }
}

#[actix_rt::test]
async fn concurrent_appends_share_commits_and_are_durable_when_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keel.db");
    let metrics = Metrics::new();
    let store = start_store(Some(path.clone()), &metrics);
    let n = 200;
    let sends = (0..n).map(|i| {
        store.send(CommitExchange(exchange(
            &format!("c{}", i % 16),
            &i.to_string(),
        )))
    });
    for res in join_all(sends).await {
        assert!(matches!(
            res.unwrap().unwrap(),
            ExchangeOutcome::Accepted { .. }
        ));
    }
    // Group commit: fewer commits than messages.
    let commits = metrics.commit_batch_size.get_sample_count();
    assert!(
        commits < n as u64,
        "{commits} commits for {n} messages: no batching"
    );
    // Every acknowledged message is visible to an independent connection.
    let other = rusqlite::Connection::open(&path).unwrap();
    let users: i64 = other
        .query_row("SELECT COUNT(*) FROM turns WHERE role = 'user'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(users, n);
}

#[actix_rt::test]
async fn one_failing_job_does_not_fail_its_batch() {
    let metrics = Metrics::new();
    let store = start_store(None, &metrics);
    // Answering a turn that does not exist fails on its own, in the same
    // batch as a good exchange, which still commits.
    let bad = store.send(CommitAgentReply {
        session: SessionKey::new("webhook", "nope"),
        user_seq: 7,
        reply: ReplyPlan {
            text: "x".into(),
            deliver: true,
        },
    });
    let good = store.send(CommitExchange(exchange("c1", "k1")));
    let (bad, good) = futures::join!(bad, good);
    assert!(matches!(bad.unwrap(), Err(StoreError::Invalid(_))));
    assert!(matches!(
        good.unwrap().unwrap(),
        ExchangeOutcome::Accepted { .. }
    ));
    assert_eq!(turns_of(&store, "webhook:c1").await.len(), 2);
}

/// A sink that fails the first `fail` sends, recording when each came.
struct FlakySink {
    fail: Mutex<u32>,
    calls: mpsc::UnboundedSender<(tokio::time::Instant, OutboundReply)>,
}

impl ReplySink for FlakySink {
    fn send(&self, reply: OutboundReply) -> BoxFuture<'static, Result<(), SendError>> {
        let _ = self.calls.send((tokio::time::Instant::now(), reply));
        let mut fail = self.fail.lock().unwrap();
        let result = if *fail > 0 {
            *fail -= 1;
            Err(SendError::Transient("HTTP 503".into()))
        } else {
            Ok(())
        };
        Box::pin(async move { result })
    }
}

#[actix_rt::test]
async fn failed_sends_back_off_exponentially_then_mark_sent() {
    tokio::time::pause();
    let metrics = Metrics::new();
    let store = start_store(None, &metrics);
    let (tx, mut calls) = mpsc::unbounded_channel();
    let sink = Arc::new(FlakySink {
        fail: Mutex::new(3),
        calls: tx,
    });
    let mut sinks: HashMap<String, Arc<dyn ReplySink>> = HashMap::new();
    sinks.insert("webhook".into(), sink);
    let config = OutboxConfig {
        concurrency: 4,
        send_timeout_ms: 1_000,
        retry_min_ms: 1_000,
        retry_max_ms: 60_000,
    };
    store
        .send(CommitExchange(exchange("c1", "k1")))
        .await
        .unwrap()
        .unwrap();
    let outbox = OutboxActor::new(store.clone(), sinks, config, metrics.clone()).start();
    outbox.do_send(OutboxKick);
    let mut times = Vec::new();
    for _ in 0..4 {
        let (at, reply) = calls.recv().await.unwrap();
        assert_eq!(reply.in_reply_to.as_deref(), Some("k1"));
        times.push(at);
    }
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    // 1 s, 2 s, 4 s (±20 % jitter): exponential, never a hot loop.
    for (gap, base) in gaps.iter().zip([1_000u64, 2_000, 4_000]) {
        let ms = gap.as_millis() as u64;
        assert!(
            ms >= base * 8 / 10 && ms <= base * 12 / 10 + 50,
            "gap {ms} ms, expected ~{base}"
        );
    }
    // The fourth attempt succeeded: the row is marked sent once recorded.
    let mut sent = false;
    for _ in 0..100 {
        let turns = turns_of(&store, "webhook:c1").await;
        if turns[1].sent == Some(true) {
            sent = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(sent, "reply never marked sent");
    assert_eq!(metrics.outbox_sent.get(), 1);
    assert_eq!(metrics.outbox_send_failures.get(), 3);
}

#[actix_rt::test]
async fn a_redelivered_message_is_stored_and_answered_once() {
    let metrics = Metrics::new();
    let store = start_store(None, &metrics);
    let (tx, mut calls) = mpsc::unbounded_channel();
    let mut sinks: HashMap<String, Arc<dyn ReplySink>> = HashMap::new();
    sinks.insert(
        "webhook".into(),
        Arc::new(FlakySink {
            fail: Mutex::new(0),
            calls: tx,
        }),
    );
    let outbox = OutboxActor::new(
        store.clone(),
        sinks,
        OutboxConfig::default(),
        metrics.clone(),
    )
    .start();
    let settings = SessionSettings {
        brain: Arc::new(CommandBrain::new(false)),
        routed_channels: ["webhook".to_string()].into_iter().collect(),
        agent: None,
    };
    let registry =
        SessionRegistry::new(store.clone(), outbox.recipient(), settings, metrics.clone()).start();
    let deliver = || Deliver {
        channel: "webhook".into(),
        chat: "c1".into(),
        from: "u".into(),
        key: "m1".into(),
        text: "/remember k v".into(),
    };
    let first = registry.send(deliver()).await.unwrap().unwrap();
    let second = registry.send(deliver()).await.unwrap().unwrap();
    assert!(matches!(first, Delivered::Accepted { seq: 1, .. }));
    assert!(matches!(second, Delivered::Duplicate { seq: 1, .. }));
    let (_, reply) = calls.recv().await.unwrap();
    assert_eq!(reply.text, "Remembered k.");
    // A later, different message is answered from the remembered state,
    // proving the duplicate left no second reply queued before it.
    registry
        .send(Deliver {
            key: "m2".into(),
            text: "/recall k".into(),
            ..deliver()
        })
        .await
        .unwrap()
        .unwrap();
    let (_, reply) = calls.recv().await.unwrap();
    assert_eq!(reply.text, "k: v");
    assert_eq!(reply.in_reply_to.as_deref(), Some("m2"));
}
