//! The task store on both backends (R19–R22, R38, R49): the runner's and
//! the admin API's messages, and several instances sharing one queue.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use actix::prelude::*;
use keel_actors::clock::{Clock, WallClock};
use keel_actors::persistence::cluster::RegisterInstance;
use keel_actors::persistence::tasks::{
    AppendLogs, CancelOutcome, CreateTask, Finish, FinishTask, Fragment, GetTask, GetTaskCounts,
    GetTaskLogs, GetTaskWork, GetTasks, NewTask, Origin, Orphan, PruneTasks, RecordTaskPid,
    RecoverTasks, RequestCancel, StartTask, TaskDetail, TaskState,
};
use keel_actors::persistence::{GetPendingOutbox, GetTurns, PersistenceActor};

use super::backends;

fn new(name: &str, session: Option<&str>) -> CreateTask {
    CreateTask(NewTask {
        name: name.into(),
        args: vec!["a b".into(), "c".into()],
        session_id: session.map(str::to_string),
        origin: Origin::Cli,
    })
}

async fn create(st: &Addr<PersistenceActor>, name: &str) -> i64 {
    st.send(new(name, None)).await.unwrap().unwrap()
}

async fn start(st: &Addr<PersistenceActor>, id: i64, epoch: i64, instance: Option<&str>) -> bool {
    st.send(StartTask {
        id,
        epoch,
        instance: instance.map(str::to_string),
    })
    .await
    .unwrap()
    .unwrap()
    .is_some()
}

async fn detail(st: &Addr<PersistenceActor>, id: i64) -> TaskDetail {
    st.send(GetTask(id)).await.unwrap().unwrap().unwrap()
}

async fn state(st: &Addr<PersistenceActor>, id: i64) -> String {
    detail(st, id).await.task.state
}

fn frag(seq: i64, stream: &'static str, bytes: &[u8]) -> Fragment {
    Fragment {
        seq,
        stream,
        bytes: bytes.to_vec(),
        resume: None,
    }
}

fn finish(id: i64, state: TaskState, epoch: i64, fragments: Vec<Fragment>) -> Finish {
    Finish {
        id,
        state,
        exit_code: Some(if state == TaskState::Succeeded { 0 } else { 1 }),
        detail: None,
        attempt: 1,
        epoch,
        dropped: 0,
        fragments,
        requeue: false,
        notice: None,
    }
}

#[actix::test]
async fn a_task_is_queued_listed_started_logs_its_output_in_order_and_finishes_with_a_notice() {
    for s in backends("task_life", 1) {
        let st = &s.instances[0];
        s.fixture(
            "INSERT INTO sessions (id, channel, chat, created_at, updated_at)
             VALUES ('webhook:t', 'webhook', 't', 'x', 'x');",
        );
        let id = st
            .send(new("echo", Some("webhook:t")))
            .await
            .unwrap()
            .unwrap();
        let queued = st
            .send(GetTasks {
                state: Some("QUEUED".into()),
                limit: 10,
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(queued.len(), 1, "{}", s.name);
        assert_eq!(
            (queued[0].task.id, queued[0].task.args.clone()),
            (id, vec!["a b".to_string(), "c".to_string()]),
            "{}",
            s.name
        );
        let none = st
            .send(GetTasks {
                state: Some("RUNNING".into()),
                limit: 10,
            })
            .await
            .unwrap()
            .unwrap();
        assert!(none.is_empty(), "{}", s.name);
        let work = st
            .send(GetTaskWork {
                limit: 10,
                instance: None,
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            work.queued.iter().map(|q| q.id).collect::<Vec<_>>(),
            vec![id],
            "{}",
            s.name
        );
        let info = st
            .send(StartTask {
                id,
                epoch: 1,
                instance: Some("i1".into()),
            })
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(
            (info.attempt, info.next_seq, info.session_id.as_deref()),
            (1, 1, Some("webhook:t")),
            "{}",
            s.name
        );
        assert!(
            !start(st, id, 1, Some("i1")).await,
            "{}: started twice",
            s.name
        );
        st.send(RecordTaskPid {
            id,
            pid: 4242,
            pid_start: 99,
        })
        .await
        .unwrap()
        .unwrap();
        let batch = Arc::new(vec![frag(1, "stdout", b"a\xff"), frag(2, "stderr", b"e")]);
        for _ in 0..2 {
            // A retried batch stores and counts nothing twice.
            st.send(AppendLogs {
                id,
                fragments: batch.clone(),
            })
            .await
            .unwrap()
            .unwrap();
        }
        let mut f = finish(id, TaskState::Succeeded, 1, vec![frag(3, "stdout", b"z")]);
        f.notice = Some(("task done".into(), true));
        assert!(st.send(FinishTask(f.clone())).await.unwrap().unwrap());
        assert!(
            !st.send(FinishTask(f)).await.unwrap().unwrap(),
            "{}: an ended task is left alone",
            s.name
        );
        let d = detail(st, id).await;
        let states: Vec<_> = d
            .states
            .iter()
            .map(|x| (x.state.as_str(), x.attempt))
            .collect();
        assert_eq!(
            states,
            vec![("QUEUED", 1), ("RUNNING", 1), ("SUCCEEDED", 1)],
            "{}",
            s.name
        );
        assert_eq!((d.states[1].boot_epoch, d.states[2].boot_epoch), (1, 1));
        assert_eq!(
            (d.task.state.as_str(), d.task.exit_code, d.task.log_bytes),
            ("SUCCEEDED", Some(0), 4),
            "{}",
            s.name
        );
        assert_eq!((d.task.pid, d.task.boot_epoch), (Some(4242), Some(1)));
        assert!(d.task.finished_at.is_some(), "{}", s.name);
        let logs = |stream: Option<&str>, after_seq: i64, max_bytes: usize| {
            st.send(GetTaskLogs {
                id,
                stream: stream.map(str::to_string),
                after_seq,
                max_bytes,
            })
        };
        let out: Vec<u8> = logs(Some("stdout"), 0, usize::MAX)
            .await
            .unwrap()
            .unwrap()
            .into_iter()
            .flat_map(|(_, _, b)| b)
            .collect();
        assert_eq!(out, b"a\xffz", "{}", s.name);
        let all = logs(None, 0, usize::MAX).await.unwrap().unwrap();
        assert_eq!(
            all.iter()
                .map(|(seq, stream, _)| (*seq, stream.as_str()))
                .collect::<Vec<_>>(),
            vec![(1, "stdout"), (2, "stderr"), (3, "stdout")],
            "{}",
            s.name
        );
        // Bounded: at least one fragment, stopping once max_bytes are in.
        let page = logs(None, 1, 1).await.unwrap().unwrap();
        assert_eq!(page, vec![(2, "stderr".to_string(), b"e".to_vec())]);
        // The notice is a system turn of the chat with an outbox row.
        let turns = st
            .send(GetTurns {
                session: "webhook:t".into(),
                after_seq: 0,
                limit: 10,
            })
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(
            turns
                .iter()
                .map(|t| (t.role.as_str(), t.text.as_str()))
                .collect::<Vec<_>>(),
            vec![("system", "task done")],
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
    }
}

#[actix::test]
async fn a_cancel_ends_a_queued_task_and_flags_a_running_one_for_the_instance_running_it() {
    for s in backends("task_cancel", 1) {
        let st = &s.instances[0];
        let q = create(st, "x").await;
        let r = create(st, "x").await;
        assert!(start(st, r, 1, Some("i1")).await);
        let cancel = |id: i64| st.send(RequestCancel(id));
        assert_eq!(
            cancel(q).await.unwrap().unwrap(),
            CancelOutcome::Cancelled,
            "{}",
            s.name
        );
        assert_eq!(state(st, q).await, "CANCELLED", "{}", s.name);
        assert!(
            !start(st, q, 1, Some("i1")).await,
            "{}: a cancelled task never starts",
            s.name
        );
        assert_eq!(
            cancel(r).await.unwrap().unwrap(),
            CancelOutcome::Requested,
            "{}",
            s.name
        );
        assert_eq!(state(st, r).await, "RUNNING", "{}", s.name);
        let work = |instance: Option<&str>| {
            st.send(GetTaskWork {
                limit: 10,
                instance: instance.map(str::to_string),
            })
        };
        let mine = work(Some("i1")).await.unwrap().unwrap();
        assert_eq!((mine.queued.len(), mine.cancel), (0, vec![r]), "{}", s.name);
        let theirs = work(Some("i2")).await.unwrap().unwrap();
        assert!(theirs.cancel.is_empty(), "{}: {theirs:?}", s.name);
        assert_eq!(
            cancel(q).await.unwrap().unwrap(),
            CancelOutcome::Finished("CANCELLED".into()),
            "{}",
            s.name
        );
        assert_eq!(
            cancel(9_999).await.unwrap().unwrap(),
            CancelOutcome::NotFound,
            "{}",
            s.name
        );
    }
}

#[actix::test]
async fn two_instances_picking_work_at_once_never_start_the_same_task() {
    const N: usize = 40;
    for s in backends("task_claims", 2) {
        let mut ids = Vec::new();
        for _ in 0..N {
            ids.push(create(&s.instances[0], "x").await);
        }
        // Each instance reads the queue and starts everything it saw, both
        // at once, until nothing is queued.
        let pick = |i: usize| {
            let st = s.instances[i].clone();
            let me = format!("i{i}");
            async move {
                let mut started = Vec::new();
                loop {
                    let work = st
                        .send(GetTaskWork {
                            limit: 8,
                            instance: Some(me.clone()),
                        })
                        .await
                        .unwrap()
                        .unwrap();
                    if work.queued.is_empty() {
                        return started;
                    }
                    let tries = work.queued.iter().map(|q| {
                        st.send(StartTask {
                            id: q.id,
                            epoch: 1,
                            instance: Some(me.clone()),
                        })
                    });
                    for (q, r) in work
                        .queued
                        .iter()
                        .zip(futures::future::join_all(tries).await)
                    {
                        if r.unwrap().unwrap().is_some() {
                            started.push(q.id);
                        }
                    }
                }
            }
        };
        let (a, b) = futures::join!(pick(0), pick(1));
        let mut all: Vec<i64> = a.iter().chain(&b).copied().collect();
        all.sort();
        assert_eq!(all, ids, "{}: every task started exactly once", s.name);
        let both: HashSet<_> = a.iter().filter(|id| b.contains(id)).collect();
        assert!(both.is_empty(), "{}: started by both: {both:?}", s.name);
        for id in &ids {
            let d = detail(&s.instances[1], *id).await;
            let running = d.states.iter().filter(|x| x.state == "RUNNING").count();
            assert_eq!(running, 1, "{}: task {id}", s.name);
        }
    }
}

#[actix::test]
async fn recovery_interrupts_only_its_own_older_starts_and_dead_instances_tasks() {
    for s in backends("task_recovery", 2) {
        let (a, b) = (&s.instances[0], &s.instances[1]);
        let now = WallClock.now_ms();
        let reg = |st: &Addr<PersistenceActor>, id: &str, now_ms: i64, ttl_ms: i64| {
            st.send(RegisterInstance {
                id: id.into(),
                now_ms,
                ttl_ms,
                info: "{}".into(),
            })
        };
        assert_eq!(reg(a, "a", now, 600_000).await.unwrap().unwrap(), 1);
        assert_eq!(reg(b, "b", now, 600_000).await.unwrap().unwrap(), 1);
        // "c" stopped heartbeating long ago: its lease expired.
        assert_eq!(
            reg(b, "c", now - 120_000, 10_000).await.unwrap().unwrap(),
            1
        );
        let own = create(a, "once").await;
        let own_retry = create(a, "retry").await;
        let live = create(a, "once").await;
        let dead = create(a, "retry").await;
        let nameless = create(a, "once").await;
        assert!(start(a, own, 1, Some("a")).await);
        assert!(start(a, own_retry, 1, Some("a")).await);
        assert!(start(b, live, 1, Some("b")).await);
        assert!(start(b, dead, 1, Some("c")).await);
        assert!(start(a, nameless, 1, None).await);
        for (id, pid) in [(own, 11), (live, 22), (dead, 33)] {
            a.send(RecordTaskPid {
                id,
                pid,
                pid_start: 7,
            })
            .await
            .unwrap()
            .unwrap();
        }
        let recover = |st: &Addr<PersistenceActor>, epoch: i64, instance: Option<&str>| {
            st.send(RecoverTasks {
                epoch,
                retry: HashMap::from([("retry".to_string(), 2u32)]),
                reattach: HashSet::new(),
                instance: instance.map(str::to_string),
            })
        };
        // b in its current start: nothing of its own is older; a is alive;
        // c is dead, so its task is taken over (and requeued: attempts left).
        let r = recover(b, 1, Some("b")).await.unwrap().unwrap();
        assert_eq!((r.interrupted, r.requeued), (1, 1), "{}", s.name);
        assert!(r.orphans.is_empty(), "{}: c's pid is c's host's", s.name);
        assert_eq!(state(a, dead).await, "QUEUED", "{}", s.name);
        // c's late end of that attempt changes nothing.
        assert!(
            !b.send(FinishTask(finish(
                dead,
                TaskState::Succeeded,
                1,
                Vec::new()
            )))
            .await
            .unwrap()
            .unwrap(),
            "{}",
            s.name
        );
        assert_eq!(state(a, dead).await, "QUEUED", "{}", s.name);
        assert_eq!(detail(a, dead).await.task.attempt, 2, "{}", s.name);
        // a restarts (epoch 2): its own RUNNING tasks of start 1 go.
        assert_eq!(reg(a, "a", now, 600_000).await.unwrap().unwrap(), 2);
        let r = recover(a, 2, Some("a")).await.unwrap().unwrap();
        assert_eq!((r.interrupted, r.requeued), (2, 1), "{}", s.name);
        assert_eq!(
            r.orphans,
            vec![Orphan {
                id: own,
                pid: 11,
                pid_start: 7
            }],
            "{}",
            s.name
        );
        assert_eq!(state(a, own).await, "INTERRUPTED", "{}", s.name);
        assert_eq!(state(a, own_retry).await, "QUEUED", "{}", s.name);
        assert_eq!(
            state(a, live).await,
            "RUNNING",
            "{}: a live instance's task",
            s.name
        );
        assert_eq!(
            state(a, nameless).await,
            "RUNNING",
            "{}: run without an instance id",
            s.name
        );
        let d = detail(a, own).await;
        let last = d.states.last().unwrap();
        assert_eq!(
            (last.state.as_str(), last.boot_epoch),
            ("INTERRUPTED", 2),
            "{}",
            s.name
        );
        // Again: nothing left for a.
        let r = recover(a, 2, Some("a")).await.unwrap().unwrap();
        assert_eq!(r.interrupted, 0, "{}", s.name);
        // One node without instance ids: the boot-epoch rule alone, and
        // still never a live instance's task.
        let r = recover(a, 2, None).await.unwrap().unwrap();
        assert_eq!((r.interrupted, r.requeued), (1, 0), "{}", s.name);
        assert_eq!(state(a, nameless).await, "INTERRUPTED", "{}", s.name);
        assert_eq!(state(a, live).await, "RUNNING", "{}", s.name);
    }
}

#[actix::test]
async fn pruning_removes_old_finished_tasks_in_bounded_batches_and_counts_follow() {
    for s in backends("task_prune", 1) {
        let st = &s.instances[0];
        let old = create(st, "x").await;
        let live = create(st, "x").await;
        let running = create(st, "x").await;
        assert!(start(st, old, 1, None).await);
        assert!(start(st, running, 1, None).await);
        let frags: Vec<Fragment> = (1..=5)
            .map(|seq| frag(seq, "stdout", &[b'x'; 10]))
            .collect();
        st.send(AppendLogs {
            id: old,
            fragments: Arc::new(frags),
        })
        .await
        .unwrap()
        .unwrap();
        assert!(st
            .send(FinishTask(finish(old, TaskState::Failed, 1, Vec::new())))
            .await
            .unwrap()
            .unwrap());
        let counts = st.send(GetTaskCounts).await.unwrap().unwrap();
        assert_eq!(
            counts,
            (
                vec![
                    ("FAILED".to_string(), 1),
                    ("QUEUED".to_string(), 1),
                    ("RUNNING".to_string(), 1)
                ],
                50
            ),
            "{}",
            s.name
        );
        let prune = |before: &str| {
            st.send(PruneTasks {
                before: before.into(),
                limit: 3,
            })
        };
        // Finished after this cut: kept.
        assert_eq!(
            prune("2000-01-01T00:00:00Z").await.unwrap().unwrap(),
            (0, 0)
        );
        let cut = "9999-01-01T00:00:00Z";
        assert_eq!(prune(cut).await.unwrap().unwrap(), (0, 3), "{}", s.name);
        assert_eq!(prune(cut).await.unwrap().unwrap(), (1, 2), "{}", s.name);
        assert_eq!(prune(cut).await.unwrap().unwrap(), (0, 0), "{}", s.name);
        assert!(st.send(GetTask(old)).await.unwrap().unwrap().is_none());
        assert!(st.send(GetTask(live)).await.unwrap().unwrap().is_some());
        let counts = st.send(GetTaskCounts).await.unwrap().unwrap();
        assert_eq!(
            counts,
            (
                vec![("QUEUED".to_string(), 1), ("RUNNING".to_string(), 1)],
                0
            ),
            "{}",
            s.name
        );
    }
}

#[actix::test]
async fn a_container_task_of_an_older_start_is_re_attached_where_its_output_ends() {
    for s in backends("task_reattach", 1) {
        let st = &s.instances[0];
        let id = create(st, "box").await;
        assert!(start(st, id, 1, Some("a")).await);
        let mut with_resume = frag(2, "stdout", b"yy");
        with_resume.resume = Some("2026-12-03T00:00:01Z 1 0".into());
        st.send(AppendLogs {
            id,
            fragments: Arc::new(vec![
                frag(1, "stdout", b"x"),
                with_resume,
                frag(3, "stderr", b"z"),
            ]),
        })
        .await
        .unwrap()
        .unwrap();
        let r = st
            .send(RecoverTasks {
                epoch: 2,
                retry: HashMap::new(),
                reattach: HashSet::from(["box".to_string()]),
                instance: Some("a".into()),
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!((r.interrupted, r.reattach.len()), (0, 1), "{}", s.name);
        let t = &r.reattach[0];
        assert_eq!(
            (t.id, t.next_seq, t.stored, t.log_bytes, t.resume.as_deref()),
            (id, 4, 4, 4, Some("2026-12-03T00:00:01Z 1 0")),
            "{}",
            s.name
        );
        assert_eq!(t.args, vec!["a b".to_string(), "c".to_string()]);
        let d = detail(st, id).await;
        let last = d.states.last().unwrap();
        assert_eq!(
            (d.task.state.as_str(), d.task.boot_epoch, last.boot_epoch),
            ("RUNNING", Some(2), 2),
            "{}",
            s.name
        );
        assert!(
            last.detail
                .as_deref()
                .unwrap_or("")
                .starts_with("re-attached by start #2"),
            "{}: {last:?}",
            s.name
        );
    }
}
