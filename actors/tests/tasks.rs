//! TaskActor tests over a real store file and real child processes: the
//! concurrency bound and `exclusive` hold (checked on the start/end events
//! the actor emits, never on sleeps), a task left RUNNING by an earlier
//! boot epoch is INTERRUPTED and requeued with the same id before anything
//! else starts, and a spawn failure is FAILED with the OS error.

// Tests drive real processes in real time: clippy.toml's clock and env rules are for keel itself.
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use keel_actors::clock::WallClock;
use keel_actors::config::{TaskConfig, TasksConfig};
use keel_actors::persistence::tasks::{
    CreateTask, GetTask, NewTask, Origin, RecordTaskPid, StartTask,
};
use keel_actors::persistence::{PersistenceActor, RecordBoot};
use keel_actors::tasks::process::ProcessRunner;
use keel_actors::tasks::{Recover, TaskActor, TaskEvent, TaskSettings, TasksChanged};
use tokio::sync::mpsc;

use common::{start_store, Kicks};

fn def(command: &[&str], exclusive: bool, retry: bool) -> TaskConfig {
    TaskConfig {
        command: command.iter().map(|s| s.to_string()).collect(),
        args_allowed: true,
        cwd: None,
        env: Default::default(),
        timeout_s: None,
        retry_on_restart: retry,
        max_attempts: 3,
        exclusive,
        allowed_chats: Vec::new(),
        kind: Default::default(),
        image: None,
    }
}

fn runner(
    store: &Addr<PersistenceActor>,
    defs: BTreeMap<String, TaskConfig>,
    concurrency: usize,
    epoch: i64,
) -> (Addr<TaskActor>, mpsc::UnboundedReceiver<TaskEvent>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let settings = TaskSettings {
        defs: Arc::new(defs),
        limits: TasksConfig {
            concurrency,
            ..TasksConfig::default()
        },
        owner: None,
        routed: HashSet::new(),
        default_cwd: std::env::temp_dir(),
        base_env: vec![("PATH".into(), "/usr/bin:/bin".into())],
    };
    let actor = TaskActor::new(
        store.clone(),
        Kicks.start().recipient(),
        Arc::new(ProcessRunner::start().expect("spawner")),
        Arc::new(WallClock),
        settings,
        epoch,
    )
    .with_events(tx)
    .start();
    (actor, rx)
}

async fn queue(store: &Addr<PersistenceActor>, name: &str) -> i64 {
    store
        .send(CreateTask(NewTask {
            name: name.into(),
            args: vec![],
            session_id: None,
            origin: Origin::Cli,
        }))
        .await
        .unwrap()
        .unwrap()
}

async fn next(rx: &mut mpsc::UnboundedReceiver<TaskEvent>) -> TaskEvent {
    tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("a task event within 30 s")
        .expect("events open")
}

#[actix::test]
async fn concurrency_and_exclusive_bound_what_runs_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = start_store(dir.path().join("keel.db"));
    store.send(RecordBoot).await.unwrap().unwrap();
    let mut defs = BTreeMap::new();
    defs.insert("nap".to_string(), def(&["sleep", "0.2"], false, false));
    defs.insert("solo".to_string(), def(&["sleep", "0.2"], true, false));
    let mut ids = Vec::new();
    for name in ["solo", "solo", "nap", "nap", "nap", "solo"] {
        ids.push(queue(&store, name).await);
    }
    let (tasks, mut rx) = runner(&store, defs, 2, 1);
    tasks.send(Recover).await.unwrap().unwrap();
    tasks.do_send(TasksChanged);
    let (mut running, mut solo, mut ended) = (HashSet::new(), 0, 0);
    let is_solo = |id: i64| [ids[0], ids[1], ids[5]].contains(&id);
    while ended < ids.len() {
        match next(&mut rx).await {
            TaskEvent::Running { id, .. } => {
                running.insert(id);
                assert!(running.len() <= 2, "more than 2 running: {running:?}");
                if is_solo(id) {
                    solo += 1;
                    assert_eq!(solo, 1, "two exclusive tasks ran at once");
                }
            }
            TaskEvent::Ended(e) => {
                assert_eq!(e.state.as_str(), "SUCCEEDED", "{e:?}");
                running.remove(&e.id);
                if is_solo(e.id) {
                    solo -= 1;
                }
                ended += 1;
            }
        }
    }
}

#[actix::test]
async fn an_older_epochs_running_task_is_interrupted_and_requeued_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let store = start_store(dir.path().join("keel.db"));
    store.send(RecordBoot).await.unwrap().unwrap();
    let mut defs = BTreeMap::new();
    defs.insert("again".to_string(), def(&["true"], false, true));
    defs.insert(
        "missing".to_string(),
        def(&["/no/such/keel-prog"], false, false),
    );
    // Boot 1 left `again` RUNNING with a pid that has been recycled since:
    // it is this test's own pid now, with another start time. Recovery
    // must not signal it (if it did, this test process would die).
    let left = queue(&store, "again").await;
    store
        .send(StartTask {
            id: left,
            epoch: 1,
            instance: None,
        })
        .await
        .unwrap()
        .unwrap();
    store
        .send(RecordTaskPid {
            id: left,
            pid: i64::from(std::process::id()),
            pid_start: 5,
        })
        .await
        .unwrap()
        .unwrap();
    let missing = queue(&store, "missing").await;
    store.send(RecordBoot).await.unwrap().unwrap();
    let (tasks, mut rx) = runner(&store, defs, 4, 2);
    let rec = tasks.send(Recover).await.unwrap().unwrap();
    assert_eq!((rec.interrupted, rec.requeued, rec.killed), (1, 1, 0));
    let mut seen = Vec::new();
    while seen.len() < 2 {
        if let TaskEvent::Ended(e) = next(&mut rx).await {
            seen.push(e);
        }
    }
    let again = store.send(GetTask(left)).await.unwrap().unwrap().unwrap();
    let states: Vec<(String, i64, i64)> = again
        .states
        .iter()
        .map(|s| (s.state.clone(), s.boot_epoch, s.attempt))
        .collect();
    assert_eq!(
        states,
        [
            ("QUEUED".into(), 1, 1),
            ("RUNNING".into(), 1, 1),
            ("INTERRUPTED".into(), 2, 1),
            ("QUEUED".into(), 2, 2),
            ("RUNNING".into(), 2, 2),
            ("SUCCEEDED".into(), 2, 2),
        ]
    );
    let failed = store
        .send(GetTask(missing))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(failed.task.state, "FAILED");
    let detail = failed.task.detail.unwrap();
    assert!(detail.contains("No such file or directory"), "{detail}");
}
