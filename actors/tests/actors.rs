//! Actor-level tests: the persistence actor's group commit, the outbox's
//! retry schedule (paused clock), and the session path's idempotency, each
//! on real actors over a real SQLite store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use futures::future::{join_all, BoxFuture};
use keel_actors::brain::CommandBrain;
use keel_actors::clock::WallClock;
use keel_actors::config::SupervisionConfig;
use keel_actors::config::{OutboxConfig, Synchronous};
use keel_actors::error::{SendError, StoreError};
use keel_actors::health::Health;
use keel_actors::metrics::Metrics;
use keel_actors::outbox::{ChannelReady, OutboundReply, OutboxActor, OutboxKick, ReplySink};
use keel_actors::persistence::{
    self, CommitAgentReply, CommitExchange, Exchange, ExchangeOutcome, GetStats, GetTurns,
    PersistenceActor, ReplyPlan, SessionKey, StoreOptions,
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
        key: None,
    }
}

fn start_store(path: Option<std::path::PathBuf>, metrics: &Metrics) -> Addr<PersistenceActor> {
    let opts = options(path);
    let (conn, _) = persistence::open_store(&opts).expect("open store");
    PersistenceActor::new(
        conn,
        opts,
        Health::new(metrics.clone()),
        metrics.clone(),
        Arc::new(WallClock),
    )
    .start()
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

/// Polls (bounded) until the session's reply turn is marked sent.
async fn reply_marked_sent(store: &Addr<PersistenceActor>, session: &str) -> bool {
    for _ in 0..100 {
        if turns_of(store, session).await[1].sent == Some(true) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

fn exchange(chat: &str, key: &str) -> Exchange {
    let reply = Some(ReplyPlan {
        text: "ok".into(),
        deliver: true,
    });
    Exchange::text(
        SessionKey::new("webhook", chat),
        "u",
        key,
        &format!("message {key}"),
        reply,
    )
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

/// The supervisor's policy without jitter: 5, 10, 20, 40, 60 s cap, 5 attempts.
fn retry_policy() -> SupervisionConfig {
    SupervisionConfig {
        jitter: 0.0,
        seed: Some(7),
        ..SupervisionConfig::default()
    }
}

#[actix_rt::test]
async fn failed_sends_back_off_exponentially_then_mark_sent() {
    tokio::time::pause();
    let metrics = Metrics::new();
    let store = start_store(None, &metrics);
    let (tx, mut calls) = mpsc::unbounded_channel();
    // Seven failures: more than the policy's 5 attempts. A reply is never
    // dropped for a transient failure; it is retried at the cap.
    let sink = Arc::new(FlakySink {
        fail: Mutex::new(7),
        calls: tx,
    });
    let mut sinks: HashMap<String, Arc<dyn ReplySink>> = HashMap::new();
    sinks.insert("webhook".into(), sink);
    let config = OutboxConfig {
        concurrency: 4,
        send_timeout_ms: 1_000,
    };
    store
        .send(CommitExchange(exchange("c1", "k1")))
        .await
        .unwrap()
        .unwrap();
    let outbox = OutboxActor::new(store.clone(), sinks, config, metrics.clone())
        .with_retry(retry_policy())
        .start();
    outbox.do_send(OutboxKick);
    let mut times = Vec::new();
    for _ in 0..8 {
        let (at, reply) = calls.recv().await.unwrap();
        assert_eq!(reply.in_reply_to.as_deref(), Some("k1"));
        times.push(at);
        if times.len() == 7 {
            // Past the 5 attempts: the channel is reported as failing.
            assert!(metrics
                .render()
                .contains("keel_outbox_channel_failing{channel=\"webhook\"} 1"));
        }
    }
    let gaps: Vec<u64> = times.windows(2).map(|w| (w[1] - w[0]).as_secs()).collect();
    // The adapter supervisor's schedule, then the cap: never a hot loop,
    // never given up.
    assert_eq!(gaps, vec![5, 10, 20, 40, 60, 60, 60]);
    // The eighth attempt succeeded: the row is marked sent once recorded.
    let sent = reply_marked_sent(&store, "webhook:c1").await;
    assert!(sent, "reply never marked sent");
    assert_eq!(metrics.outbox_sent.get(), 1);
    assert_eq!(metrics.outbox_send_failures.get(), 7);
    assert!(metrics
        .render()
        .contains("keel_outbox_channel_failing{channel=\"webhook\"} 0"));
}

/// Answers each send from a script; `None` hangs (the request left, no
/// answer comes back).
struct ScriptedSink {
    script: Mutex<std::collections::VecDeque<Option<Result<(), SendError>>>>,
    calls: mpsc::UnboundedSender<(tokio::time::Instant, OutboundReply)>,
}

impl ReplySink for ScriptedSink {
    fn send(&self, reply: OutboundReply) -> BoxFuture<'static, Result<(), SendError>> {
        let _ = self.calls.send((tokio::time::Instant::now(), reply));
        match self.script.lock().unwrap().pop_front() {
            Some(Some(result)) => Box::pin(async move { result }),
            Some(None) => Box::pin(futures::future::pending()),
            None => Box::pin(async { Ok(()) }),
        }
    }
}

#[actix_rt::test]
async fn a_send_without_answer_is_recorded_unknown_counted_and_resent() {
    tokio::time::pause();
    let metrics = Metrics::new();
    let store = start_store(None, &metrics);
    let (tx, mut calls) = mpsc::unbounded_channel();
    let sink = Arc::new(ScriptedSink {
        script: Mutex::new(
            vec![
                Some(Err(SendError::RetryAfter(Duration::from_secs(3)))),
                None,
                None,
            ]
            .into(),
        ),
        calls: tx,
    });
    let mut sinks: HashMap<String, Arc<dyn ReplySink>> = HashMap::new();
    sinks.insert("webhook".into(), sink);
    store
        .send(CommitExchange(exchange("c1", "k1")))
        .await
        .unwrap()
        .unwrap();
    let config = OutboxConfig {
        concurrency: 4,
        send_timeout_ms: 1_000,
    };
    let outbox = OutboxActor::new(store.clone(), sinks, config.clone(), metrics.clone())
        .with_retry(retry_policy());
    outbox.start().do_send(OutboxKick);
    let mut times = Vec::new();
    for _ in 0..3 {
        times.push(calls.recv().await.unwrap().0);
    }
    // RetryAfter: exactly 3 s, not counted. Then a 1 s timeout (unknown)
    // and the first backoff step, 5 s.
    let gaps: Vec<u64> = times.windows(2).map(|w| (w[1] - w[0]).as_secs()).collect();
    assert_eq!(gaps, vec![3, 6]);
    // The third send hangs too: the row is `unknown` and counted. (While
    // this test waits for the store's thread the paused clock may run on
    // and time the third send out as well: one row, one or two counts.)
    let stats = store.send(GetStats).await.unwrap().unwrap();
    assert_eq!(stats.outbox_unknown, 1);
    assert_eq!(stats.outbox_pending, 0);
    let unknown = metrics.outbox_unknown.get();
    assert!((1..=2).contains(&unknown), "{unknown}");
    assert_eq!(
        metrics.outbox_send_failures.get(),
        unknown,
        "all were unknown"
    );
    // After a restart (a fresh outbox over the same store) the unknown row is
    // resent, and marked sent once accepted.
    let (tx, mut again) = mpsc::unbounded_channel();
    let mut sinks: HashMap<String, Arc<dyn ReplySink>> = HashMap::new();
    sinks.insert(
        "webhook".into(),
        Arc::new(ScriptedSink {
            script: Mutex::new(Default::default()),
            calls: tx,
        }),
    );
    OutboxActor::new(store.clone(), sinks, config, Metrics::new())
        .with_retry(retry_policy())
        .start()
        .do_send(OutboxKick);
    let (_, reply) = again.recv().await.unwrap();
    assert_eq!(reply.in_reply_to.as_deref(), Some("k1"));
    let sent = reply_marked_sent(&store, "webhook:c1").await;
    assert!(sent, "the unknown reply was never resent and marked sent");
    let stats = store.send(GetStats).await.unwrap().unwrap();
    assert_eq!(stats.outbox_unknown, 0);
}

/// Its first send finds nobody and answers `Waiting` only once `release`
/// fires; every later send succeeds.
struct LeavingClientSink {
    release: Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
    calls: mpsc::UnboundedSender<tokio::time::Instant>,
}

impl ReplySink for LeavingClientSink {
    fn send(&self, _reply: OutboundReply) -> BoxFuture<'static, Result<(), SendError>> {
        let _ = self.calls.send(tokio::time::Instant::now());
        match self.release.lock().unwrap().take() {
            Some(rx) => Box::pin(async move {
                let _ = rx.await;
                Err(SendError::Waiting("the client left".into()))
            }),
            None => Box::pin(async { Ok(()) }),
        }
    }
}

#[actix_rt::test]
async fn a_recipient_arriving_while_a_send_is_in_flight_gets_the_reply_at_once() {
    tokio::time::pause();
    let metrics = Metrics::new();
    let store = start_store(None, &metrics);
    let (release, rx) = tokio::sync::oneshot::channel();
    let (tx, mut calls) = mpsc::unbounded_channel();
    let mut sinks: HashMap<String, Arc<dyn ReplySink>> = HashMap::new();
    sinks.insert(
        "webhook".into(),
        Arc::new(LeavingClientSink {
            release: Mutex::new(Some(rx)),
            calls: tx,
        }),
    );
    store
        .send(CommitExchange(exchange("c1", "k1")))
        .await
        .unwrap()
        .unwrap();
    let outbox = OutboxActor::new(store.clone(), sinks, OutboxConfig::default(), metrics)
        .with_retry(retry_policy())
        .start();
    outbox.do_send(OutboxKick);
    let first = calls.recv().await.unwrap();
    // A client subscribes while the first send is still out; then the
    // first send comes back: its client had left.
    outbox.send(ChannelReady("webhook".into())).await.unwrap();
    release.send(()).unwrap();
    let second = calls.recv().await.unwrap();
    // Tried again at once, not parked until the 60 s backoff cap.
    assert!(
        second - first < Duration::from_secs(1),
        "resent only after {:?}",
        second - first
    );
    let sent = reply_marked_sent(&store, "webhook:c1").await;
    assert!(sent, "the reply was never marked sent");
}

/// Counts every send per reply id; each send takes a millisecond.
struct CountingSink {
    sent: Arc<Mutex<HashMap<i64, usize>>>,
}

impl ReplySink for CountingSink {
    fn send(&self, reply: OutboundReply) -> BoxFuture<'static, Result<(), SendError>> {
        *self.sent.lock().unwrap().entry(reply.id).or_default() += 1;
        Box::pin(async {
            tokio::time::sleep(Duration::from_millis(1)).await;
            Ok(())
        })
    }
}

#[actix_rt::test]
async fn a_shared_outbox_rescanning_a_backlog_of_several_pages_sends_each_reply_once() {
    // The lease holder of a shared store rescans every pending row often;
    // a backlog of more than one page (256) left `high_water` below rows
    // already queued, and the next read queued them again.
    let metrics = Metrics::new();
    let store = start_store(None, &metrics);
    let n = 700;
    let commits = (0..n).map(|i| store.send(CommitExchange(exchange(&format!("c{i}"), "k"))));
    for res in join_all(commits).await {
        res.unwrap().unwrap();
    }
    let sent: Arc<Mutex<HashMap<i64, usize>>> = Arc::default();
    let mut sinks: HashMap<String, Arc<dyn ReplySink>> = HashMap::new();
    sinks.insert(
        "webhook".into(),
        Arc::new(CountingSink { sent: sent.clone() }),
    );
    let (_lease, held) = tokio::sync::watch::channel(Some(1));
    let _outbox = OutboxActor::new(store.clone(), sinks, OutboxConfig::default(), metrics)
        .shared(held, Duration::from_millis(5))
        .start();
    let all = async {
        while sent.lock().unwrap().len() < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("every reply sent within 60 s");
    // Repeats still queued go out within a few more rescans.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = sent.lock().unwrap();
    let twice: Vec<_> = sent.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "{} of {n} replies sent more than once, e.g. {:?}",
        twice.len(),
        &twice[..twice.len().min(5)]
    );
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
        principals: Arc::default(),
    };
    let registry = SessionRegistry::new(
        store.clone(),
        outbox.recipient(),
        settings,
        metrics.clone(),
        Arc::new(WallClock),
    )
    .start();
    let deliver = || {
        Deliver::text(
            "webhook",
            "c1".into(),
            "u".into(),
            "m1".into(),
            "/remember k v".into(),
        )
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

fn lru_registry(
    store: &Addr<PersistenceActor>,
    metrics: &Metrics,
    agent: Option<keel_actors::agent::AgentSettings>,
    max_live: usize,
) -> Addr<SessionRegistry> {
    let outbox = OutboxActor::new(
        store.clone(),
        HashMap::new(),
        OutboxConfig::default(),
        metrics.clone(),
    )
    .start();
    let settings = SessionSettings {
        brain: Arc::new(CommandBrain::new(agent.is_some())),
        routed_channels: Default::default(),
        agent,
        principals: Arc::default(),
    };
    SessionRegistry::new(
        store.clone(),
        outbox.recipient(),
        settings,
        metrics.clone(),
        Arc::new(WallClock),
    )
    .with_max_live(max_live)
    .start()
}

/// A message only to store (no reply): its seq is the next of its chat.
fn stored_only(chat: &str, key: &str) -> Deliver {
    Deliver {
        answer: false,
        ..Deliver::text(
            "webhook",
            chat.into(),
            "u".into(),
            key.into(),
            format!("{chat}/{key}"),
        )
    }
}

async fn accepted_seq(registry: &Addr<SessionRegistry>, msg: Deliver) -> i64 {
    match registry.send(msg).await.unwrap().unwrap() {
        Delivered::Accepted { seq, .. } => seq,
        other => panic!("not accepted: {other:?}"),
    }
}

#[actix_rt::test]
async fn the_least_recently_used_idle_session_is_evicted_and_reloads() {
    use keel_actors::session::LiveSessions;
    let metrics = Metrics::new();
    let store = start_store(None, &metrics);
    let registry = lru_registry(&store, &metrics, None, 2);
    accepted_seq(&registry, stored_only("a", "1")).await;
    accepted_seq(&registry, stored_only("b", "1")).await;
    accepted_seq(&registry, stored_only("a", "2")).await;
    // `b` is the least recently used: a third chat evicts it, not `a`.
    accepted_seq(&registry, stored_only("c", "1")).await;
    let live = registry.send(LiveSessions).await.unwrap();
    assert_eq!(live, vec!["webhook:a".to_string(), "webhook:c".into()]);
    assert_eq!(metrics.sessions_active.get(), 2);
    // `b` comes back from the store: its numbering continues.
    assert_eq!(accepted_seq(&registry, stored_only("b", "2")).await, 2);
    let live = registry.send(LiveSessions).await.unwrap();
    assert_eq!(live, vec!["webhook:c".to_string(), "webhook:b".into()]);
}

#[actix_rt::test]
async fn messages_around_evictions_are_stored_in_order_without_gaps() {
    let metrics = Metrics::new();
    let store = start_store(None, &metrics);
    // One live session for three chats: nearly every wave evicts.
    let registry = lru_registry(&store, &metrics, None, 1);
    let mut next = HashMap::<&str, i64>::new();
    for wave in 0..15 {
        // Sent at once: two per chat in flight together, interleaved.
        let mut sent = Vec::new();
        for i in 0..2 {
            for chat in ["a", "b", "c"] {
                let key = format!("{wave}-{i}");
                sent.push((chat, registry.send(stored_only(chat, &key))));
            }
        }
        for (chat, req) in sent {
            let seq = match req.await.unwrap().unwrap() {
                Delivered::Accepted { seq, .. } => seq,
                other => panic!("not accepted: {other:?}"),
            };
            let n = next.entry(chat).or_insert(1);
            assert_eq!(seq, *n, "chat {chat}: seq out of order or with a gap");
            *n += 1;
        }
    }
    for chat in ["a", "b", "c"] {
        let turns = turns_of(&store, &format!("webhook:{chat}")).await;
        let texts: Vec<String> = turns.iter().map(|t| t.text.clone()).collect();
        let want: Vec<String> = (0..15)
            .flat_map(|w| (0..2).map(move |i| format!("{chat}/{w}-{i}")))
            .collect();
        assert_eq!(texts, want, "chat {chat}: stored out of order");
        let seqs: Vec<i64> = turns.iter().map(|t| t.seq).collect();
        assert_eq!(seqs, (1..=30).collect::<Vec<_>>());
    }
}

#[actix_rt::test]
async fn a_session_with_agent_work_in_flight_is_never_evicted() {
    use keel_actors::session::LiveSessions;
    let metrics = Metrics::new();
    let store = start_store(None, &metrics);
    // An agent that accepts the connection and never answers (until dropped).
    let agent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", agent.local_addr().unwrap());
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let hold = tokio::spawn(async move {
        let (conn, _) = agent.accept().await.unwrap();
        let _ = released.await;
        drop(conn);
    });
    let settings = keel_actors::agent::AgentSettings {
        url,
        timeout: Duration::from_secs(60),
        attempts: 1,
    };
    let registry = lru_registry(&store, &metrics, Some(settings), 1);
    let hello = Deliver::text(
        "webhook",
        "busy".into(),
        "u".into(),
        "m1".into(),
        "hello".into(),
    );
    accepted_seq(&registry, hello).await;
    // Free text went to the agent: the session is busy though its message
    // is answered. Other chats exceed the bound rather than evict it.
    for chat in ["x", "y"] {
        accepted_seq(&registry, stored_only(chat, "1")).await;
        let live = registry.send(LiveSessions).await.unwrap();
        assert!(live.contains(&"webhook:busy".to_string()), "{live:?}");
        assert!(live.len() <= 2, "idle sessions were kept: {live:?}");
    }
    release.send(()).unwrap();
    hold.await.unwrap();
    // The agent failed: the apology is stored, the work is done, and the
    // session may now go.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    loop {
        n += 1;
        accepted_seq(&registry, stored_only(&format!("z{n}"), "1")).await;
        let live = registry.send(LiveSessions).await.unwrap();
        if !live.contains(&"webhook:busy".to_string()) {
            assert_eq!(live.len(), 1, "{live:?}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "busy session never evicted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let turns = turns_of(&store, "webhook:busy").await;
    assert_eq!(turns.len(), 2, "the agent's reply was not stored");
}

/// The texts and seqs of a session's stored turns.
async fn stored_texts(store: &Addr<PersistenceActor>, session: &str) -> Vec<(i64, String)> {
    let mut all = Vec::new();
    loop {
        let after = all.last().map_or(0, |(seq, _)| *seq);
        let page = store
            .send(GetTurns {
                session: session.into(),
                after_seq: after,
                limit: 100,
            })
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if page.is_empty() {
            return all;
        }
        all.extend(
            page.into_iter()
                .map(|t| (t.seq, format!("{}: {}", t.role, t.text))),
        );
    }
}

/// What `/history N` answers for these turns (the brain's format).
fn history_of(turns: &[(i64, String)]) -> String {
    turns
        .iter()
        .map(|(seq, line)| format!("#{seq} {line}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A store in a real file (fsync) and a registry on it.
fn file_registry() -> (
    tempfile::TempDir,
    Metrics,
    Addr<PersistenceActor>,
    Addr<SessionRegistry>,
) {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Metrics::new();
    let store = start_store(Some(dir.path().join("keel.db")), &metrics);
    let registry = lru_registry(&store, &metrics, None, 100);
    (dir, metrics, store, registry)
}

/// A chat's backlog (messages that queue while its session commits)
/// commits as a few jobs, not one per message, and each message is decided
/// after the one before it: a /recall right after its /remember finds the
/// value, /history lists the seqs the turns were stored under.
#[actix_rt::test]
async fn a_chats_backlog_commits_in_a_few_jobs_each_decided_after_the_one_before() {
    let (_dir, metrics, store, registry) = file_registry();
    let say =
        |key: String, text: String| Deliver::text("webhook", "q".into(), "u".into(), key, text);
    let mut texts = Vec::new();
    for i in 0..30 {
        texts.push(format!("/remember k{i} v{i}"));
        texts.push(format!("/recall k{i}"));
    }
    texts.push("/history 3".into());
    let jobs_before = metrics.commit_batch_size.get_sample_sum();
    // Sent at once, in order.
    let sent: Vec<_> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| registry.send(say(format!("m{i}"), t.clone())))
        .collect();
    for (i, res) in join_all(sent).await.into_iter().enumerate() {
        match res.unwrap().unwrap() {
            Delivered::Accepted { seq, .. } => assert_eq!(seq, 2 * i as i64 + 1, "message {i}"),
            other => panic!("message {i}: {other:?}"),
        }
    }
    let jobs = metrics.commit_batch_size.get_sample_sum() - jobs_before;
    assert!(
        jobs <= (texts.len() / 4) as f64,
        "{jobs} jobs for {} messages of one chat: its backlog was not batched",
        texts.len()
    );
    let turns = stored_texts(&store, "webhook:q").await;
    assert_eq!(turns.len(), 2 * texts.len());
    let seqs: Vec<i64> = turns.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=2 * texts.len() as i64).collect::<Vec<_>>());
    for i in 0..30 {
        let reply = &turns[4 * i + 3].1;
        assert!(reply.ends_with(&format!(": k{i}: v{i}")), "{reply}");
    }
    let n = turns.len();
    let want = history_of(&turns[n - 5..n - 2]);
    let got = turns[n - 1].1.split_once(": ").unwrap().1;
    assert_eq!(got, want);
}

/// Turns written behind a session's back (here straight to the store, as a
/// reminder firing into the chat does) never make it decide against a stale
/// view: its guesses fail the store's check, the messages are decided again
/// after a reload, stored in order without gaps, and /history sees them.
#[actix_rt::test]
async fn turns_written_behind_a_session_are_seen_before_its_next_decision() {
    let (_dir, _, store, registry) = file_registry();
    let say = |key: &str, text: &str| {
        Deliver::text("webhook", "s".into(), "u".into(), key.into(), text.into())
    };
    assert_eq!(accepted_seq(&registry, say("a", "/remember a 1")).await, 1);
    for round in 0..5 {
        let side = store
            .send(CommitExchange(Exchange::text(
                SessionKey::new("webhook", "s"),
                "other",
                &format!("side{round}"),
                &format!("side {round}"),
                Some(ReplyPlan {
                    text: "ok".into(),
                    deliver: false,
                }),
            )))
            .await
            .unwrap()
            .unwrap();
        assert!(side.accepted(), "{side:?}");
        let burst = [
            format!("/remember b{round} {round}"),
            "/history 4".to_string(),
            format!("/recall b{round}"),
        ];
        let sent: Vec<_> = burst
            .iter()
            .enumerate()
            .map(|(i, t)| registry.send(say(&format!("r{round}-{i}"), t)))
            .collect();
        for res in join_all(sent).await {
            assert!(matches!(res.unwrap().unwrap(), Delivered::Accepted { .. }));
        }
        let turns = stored_texts(&store, "webhook:s").await;
        let seqs: Vec<i64> = turns.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, (1..=turns.len() as i64).collect::<Vec<_>>());
        let n = turns.len();
        // The burst's /history saw the side turns and the /remember before it.
        let want = history_of(&turns[n - 8..n - 4]);
        let got = turns[n - 3].1.split_once(": ").unwrap().1;
        assert_eq!(got, want, "round {round}");
        assert!(
            turns[n - 1].1.ends_with(&format!("b{round}: {round}")),
            "{:?}",
            turns[n - 1]
        );
    }
}

/// A reader that keeps the WAL from being restarted (the background
/// quick_check of a large store) is told to give way once the WAL outgrows
/// its bound, and once it has, the WAL restarts and its file shrinks back
/// to `journal_size_limit`: under a kill loop the check never finished and
/// the WAL grew to 7.6 GB in 25 minutes, every start reading all of it.
#[actix_rt::test]
async fn a_reader_holding_the_wal_back_gives_way_and_the_wal_shrinks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keel.db");
    let metrics = Metrics::new();
    let health = Health::new(metrics.clone());
    let opts = options(Some(path.clone()));
    let (conn, _) = persistence::open_store(&opts).unwrap();
    let store =
        PersistenceActor::new(conn, opts, health.clone(), metrics, Arc::new(WallClock)).start();
    // The long reader: a read transaction left open on its own connection.
    let reader = Arc::new(Mutex::new(Some(rusqlite::Connection::open(&path).unwrap())));
    {
        let g = reader.lock().unwrap();
        let r = g.as_ref().unwrap();
        r.execute_batch("BEGIN").unwrap();
        let _: i64 = r
            .query_row("SELECT COUNT(*) FROM sessions", [], |x| x.get(0))
            .unwrap();
    }
    let (tx, mut told) = mpsc::unbounded_channel();
    let held = reader.clone();
    let wal = dir.path().join("keel.db-wal");
    let at_pressure = wal.clone();
    health.on_wal_pressure(Box::new(move || {
        // What the check does: end its read transaction. The WAL's size
        // then, before the commits after it restart the WAL.
        held.lock().unwrap().take();
        let _ = tx.send(std::fs::metadata(&at_pressure).unwrap().len());
    }));
    let big = "x".repeat(60_000);
    let mut n = 0;
    // ~140 MB of turns: past the 32,000-page bound only if nothing restarts
    // the WAL meanwhile.
    let grown = loop {
        if let Ok(size) = told.try_recv() {
            break size;
        }
        assert!(n < 400, "no wal pressure after {n} rounds");
        let sends: Vec<_> = (0..20)
            .map(|i| {
                let mut e = exchange(&format!("w{}", i % 4), &format!("{n}-{i}"));
                e.text = big.clone();
                store.send(CommitExchange(e))
            })
            .collect();
        for r in join_all(sends).await {
            assert!(r.unwrap().unwrap().accepted());
        }
        n += 1;
    };
    assert!(grown > 120 << 20, "the WAL was held back: {grown} bytes");
    // Without the reader, the next commits restart the WAL and the file
    // is cut back to journal_size_limit (64 MiB).
    for after in 0.. {
        let size = std::fs::metadata(&wal).unwrap().len();
        if size <= 64 << 20 {
            break;
        }
        assert!(after < 2_000, "the WAL stayed at {size} bytes");
        let r = store.send(CommitExchange(exchange("w9", &format!("after-{size}-{n}"))));
        assert!(r.await.unwrap().unwrap().accepted());
        n += 1;
    }
}
