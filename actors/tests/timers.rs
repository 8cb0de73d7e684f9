//! TimerActor tests with a controlled wall clock (TESTING.md C7): the window
//! stays bounded and refills until every timer fired, and clock jumps back an
//! hour or forward a day neither double nor drop fires beyond the policy.
//! Real actors over a real SQLite file; the tests wait on the fire events the
//! actor emits, never on sleeps. Also: a burst larger than the window fires
//! each instant once while commits overlap, and SIGHUP's routes apply.

// Tests drive real processes in real time: clippy.toml's clock and env rules are for keel itself.
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use keel_actors::clock::{ManualClock, Stamp};
use keel_actors::config::Synchronous;
use keel_actors::persistence::timers::{Effect, FireOutcome, TimerRequest};
use keel_actors::persistence::{
    self, CommitExchange, Exchange, PersistenceActor, ReplyPlan, SessionKey, StoreOptions,
};
use keel_actors::schedule::plan::Misfire;
use keel_actors::schedule::ScheduleSpec;
use keel_actors::timer::{
    GetTimerStats, RecoverTimers, SetTimerRoutes, Tick, TimerActor, TimerSettings, TimersChanged,
};
use tokio::sync::mpsc;

use common::{start_store, Kicks};

async fn create(store: &Addr<PersistenceActor>, key: &str, spec: ScheduleSpec) {
    let ex = Exchange {
        session: SessionKey::new("webhook", "c1"),
        from: "u1".into(),
        key: key.into(),
        text: format!("/remind {key}"),
        reply: Some(ReplyPlan {
            text: String::new(),
            deliver: true,
        }),
        effect: Some(Effect::CreateTimer(TimerRequest {
            spec,
            text: format!("note {key}"),
            misfire: Misfire::FireOnce,
            task: None,
        })),
        ..Default::default()
    };
    store.send(CommitExchange(ex)).await.unwrap().unwrap();
}

fn start_timers(
    store: &Addr<PersistenceActor>,
    clock: Arc<ManualClock>,
    window: usize,
) -> (Addr<TimerActor>, mpsc::UnboundedReceiver<Vec<FireOutcome>>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut settings = TimerSettings::new(30, HashSet::from(["webhook".to_string()]));
    settings.window = window;
    // Only `Tick` moves this actor: the controlled clock never advances alone.
    settings.max_sleep = Duration::from_secs(3_600);
    let actor =
        TimerActor::new(store.clone(), Kicks.start().recipient(), clock, settings).with_events(tx);
    (actor.start(), rx)
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn count(path: &std::path::Path, sql: &str) -> i64 {
    let c = rusqlite::Connection::open(path).unwrap();
    c.query_row(sql, [], |r| r.get(0)).unwrap()
}

#[actix_rt::test]
async fn the_window_stays_bounded_and_refills_until_every_timer_fired() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keel.db");
    let store = start_store(path.clone());
    let t0 = now_ms();
    for i in 0..10 {
        create(
            &store,
            &format!("k{i}"),
            ScheduleSpec::Delay(60_000 + i * 1_000),
        )
        .await;
    }
    let clock = Arc::new(ManualClock::new(t0));
    let (timers, mut events) = start_timers(&store, clock.clone(), 4);
    let stats = timers.send(RecoverTimers).await.unwrap().unwrap();
    assert_eq!((stats.fired, stats.in_window), (0, 4), "window of 4 of 10");
    // Everything comes due; the actor fires, drains and refills its window.
    clock.set(t0 + 3_600_000);
    timers.send(Tick).await.unwrap();
    let mut fired = 0;
    while fired < 10 {
        let batch = tokio::time::timeout(Duration::from_secs(30), events.recv())
            .await
            .expect("fire events stopped")
            .unwrap();
        assert!(batch.len() <= 4, "a batch larger than the window");
        fired += batch.iter().map(|o| o.fired).sum::<i64>();
    }
    let stats = timers.send(GetTimerStats).await.unwrap();
    assert_eq!(stats.fired, 10);
    assert!(
        stats.reloads >= 3,
        "{stats:?}: the window was never refilled"
    );
    assert_eq!(count(&path, "SELECT COUNT(*) FROM timer_fires"), 10);
    assert_eq!(
        count(&path, "SELECT COUNT(*) FROM timers WHERE state = 'done'"),
        10
    );
}

#[actix_rt::test]
async fn clock_jumps_neither_double_nor_drop_fires() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keel.db");
    let store = start_store(path.clone());
    let t0 = now_ms();
    create(&store, "every", ScheduleSpec::Every(60_000)).await;
    let due = count(&path, "SELECT next_run FROM timers");
    let clock = Arc::new(ManualClock::new(t0));
    let (timers, mut events) = start_timers(&store, clock.clone(), 16);
    timers.send(RecoverTimers).await.unwrap().unwrap();

    // On time: one fire.
    clock.set(due + 10);
    timers.send(Tick).await.unwrap();
    let batch = events.recv().await.unwrap();
    assert_eq!((batch[0].fired, batch[0].late), (1, 0));
    assert_eq!(batch[0].next_run, Some(due + 60_000));

    // Back one hour: the fired instant does not fire again, nothing fires.
    clock.set(due + 10 - 3_600_000);
    timers.send(Tick).await.unwrap();
    let stats = timers.send(GetTimerStats).await.unwrap();
    assert_eq!(stats.fired, 1, "a backwards jump fired something");

    // Forward one day: fire_once fires once, late; the other minutes are missed.
    clock.set(due + 86_400_000);
    timers.send(Tick).await.unwrap();
    let batch = events.recv().await.unwrap();
    assert_eq!((batch[0].fired, batch[0].late), (1, 1));
    assert_eq!(
        batch[0].missed, 1_439,
        "minutes in the day minus the one fired"
    );
    assert_eq!(batch[0].next_run, Some(due + 86_400_000 + 60_000));
    assert_eq!(count(&path, "SELECT COUNT(*) FROM timer_fires"), 2);
    assert_eq!(count(&path, "SELECT missed_count FROM timers"), 1_439);
}

#[actix_rt::test]
async fn a_timer_created_ahead_of_a_full_window_fires_first() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keel.db");
    let store = start_store(path.clone());
    let t0 = now_ms();
    for i in 0..6 {
        create(
            &store,
            &format!("late{i}"),
            ScheduleSpec::Delay(3_600_000 + i * 1_000),
        )
        .await;
    }
    let clock = Arc::new(ManualClock::new(t0));
    let (timers, mut events) = start_timers(&store, clock.clone(), 4);
    let stats = timers.send(RecoverTimers).await.unwrap().unwrap();
    assert_eq!(stats.in_window, 4);
    // A new, earlier timer: the session tells the actor, the window updates.
    create(&store, "soon", ScheduleSpec::Delay(60_000)).await;
    timers.send(TimersChanged).await.unwrap();
    let soon = count(
        &path,
        "SELECT next_run FROM timers WHERE params_json LIKE '%soon%'",
    );
    clock.set(soon + 5);
    timers.send(Tick).await.unwrap();
    let batch = tokio::time::timeout(Duration::from_secs(30), events.recv())
        .await
        .expect("no fire")
        .unwrap();
    assert_eq!(batch.len(), 1, "only the new timer is due");
    assert_eq!((batch[0].fired, batch[0].next_run), (1, None));
    let fired: String = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row(
            "SELECT t.params_json FROM timer_fires f JOIN timers t ON t.id = f.timer_id",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(fired.contains("soon"), "{fired}");
    let stats = timers.send(GetTimerStats).await.unwrap();
    assert!(stats.in_window <= 4, "{stats:?}");
}

#[actix_rt::test]
async fn a_burst_larger_than_the_window_fires_each_instant_once_while_commits_overlap() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keel.db");
    let store = start_store(path.clone());
    let t0 = now_ms();
    // 300 one-shots due at the same instant and 3 recurring ones among
    // them: refills read ahead while earlier fires are still committing.
    {
        let (conn, _) = persistence::open_store(&StoreOptions {
            path: Some(path.clone()),
            synchronous: Synchronous::Normal,
            busy_timeout: Duration::from_secs(5),
            max_batch: 1024,
            probe_interval: Duration::from_millis(100),
            key: None,
        })
        .unwrap();
        // Seeded in one statement, as an operator's import would.
        let at = Stamp::from_ms(t0).text;
        let session = SessionKey::new("webhook", "burst");
        persistence::sessions::ensure_session(&conn, &session, None, &at).unwrap();
        let n = conn
            .execute(
                "WITH RECURSIVE seq(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM seq WHERE i < 299)
                 INSERT INTO timers (session_id, kind, schedule, timezone, callback, params_json,
                     misfire, catchup_secs, next_run, state, created_at, updated_at)
                 SELECT ?1, 'once', CAST(?2 AS TEXT), 'UTC', 'reminder', '{\"text\":\"b\"}',
                     'fire_once', 604800, ?2, 'active', ?3, ?3 FROM seq",
                rusqlite::params![session.id, t0 + 1_000, at],
            )
            .unwrap();
        assert_eq!(n, 300);
    }
    for i in 0..3 {
        create(&store, &format!("every{i}"), ScheduleSpec::Every(3_600_000)).await;
    }
    let clock = Arc::new(ManualClock::new(t0));
    let (timers, mut events) = start_timers(&store, clock.clone(), 8);
    timers.send(RecoverTimers).await.unwrap().unwrap();
    clock.set(t0 + 3_600_000 + 1_000);
    timers.send(Tick).await.unwrap();
    let mut fired = 0;
    while fired < 303 {
        let batch = tokio::time::timeout(Duration::from_secs(30), events.recv())
            .await
            .expect("fire events stopped")
            .unwrap();
        assert!(batch.len() <= 8, "a batch larger than the window");
        fired += batch.iter().map(|o| o.fired).sum::<i64>();
    }
    assert_eq!(fired, 303);
    assert_eq!(count(&path, "SELECT COUNT(*) FROM timer_fires"), 303);
    assert_eq!(
        count(&path, "SELECT COUNT(*) FROM timers WHERE state = 'done'"),
        300
    );
    // Nothing else is due: a further look fires nothing.
    timers.send(Tick).await.unwrap();
    let stats = timers.send(GetTimerStats).await.unwrap();
    assert_eq!(stats.fired, 303, "{stats:?}");
}

#[actix_rt::test]
async fn reminders_use_the_delivery_routes_set_on_reload() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keel.db");
    let store = start_store(path.clone());
    let t0 = now_ms();
    create(&store, "a", ScheduleSpec::Delay(60_000)).await;
    create(&store, "b", ScheduleSpec::Delay(120_000)).await;
    let clock = Arc::new(ManualClock::new(t0));
    let (tx, mut events) = mpsc::unbounded_channel();
    let mut settings = TimerSettings::new(30, HashSet::new());
    settings.max_sleep = Duration::from_secs(3_600);
    let timers = TimerActor::new(
        store.clone(),
        Kicks.start().recipient(),
        clock.clone(),
        settings,
    )
    .with_events(tx)
    .start();
    timers.send(RecoverTimers).await.unwrap().unwrap();
    // No route for webhook yet: the reminder is stored, not delivered.
    clock.set(t0 + 61_000);
    timers.send(Tick).await.unwrap();
    let batch = events.recv().await.unwrap();
    assert_eq!((batch[0].fired, batch[0].outbox_rows), (1, 0));
    // SIGHUP adds the route: the next reminder is delivered.
    timers
        .send(SetTimerRoutes(HashSet::from(["webhook".to_string()])))
        .await
        .unwrap();
    clock.set(t0 + 121_000);
    timers.send(Tick).await.unwrap();
    let batch = events.recv().await.unwrap();
    assert_eq!((batch[0].fired, batch[0].outbox_rows), (1, 1));
}
