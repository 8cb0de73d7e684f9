//! Tasks in the store (R19–R22, R38, R49): the types, the
//! PersistenceActor's task messages and the rusqlite entry points of the
//! SQLite-only callers (CLI reads, timer callbacks, chat commands). The
//! SQL itself — the queue, every state transition, captured output,
//! recovery by boot epoch and instance, retention — is portable, one code
//! on both backends: `persistence/portable/tasks.rs`.
//!
//! Each transition is a `task_states` row written in the same unit of work
//! as the `tasks.state` it mirrors, and it is committed before the runner
//! acts on it: a task is RUNNING in the store before its process is
//! spawned, so after a crash every process keel may have started is found
//! by its RUNNING row of an older boot epoch.

use std::collections::HashMap;

use actix::prelude::*;
use rusqlite::Connection;
use serde::Serialize;

use super::portable::tasks as p;
use super::sessions::SessionKey;
use super::sql::SqliteSql;
use super::PersistenceActor;
use crate::clock::Stamp;
use crate::error::StoreError;

/// The states of a task (R19). Written in capitals, as the CLI shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum TaskState {
    #[serde(rename = "QUEUED")]
    Queued,
    #[serde(rename = "RUNNING")]
    Running,
    #[serde(rename = "SUCCEEDED")]
    Succeeded,
    #[serde(rename = "FAILED")]
    Failed,
    #[serde(rename = "CANCELLED")]
    Cancelled,
    #[serde(rename = "INTERRUPTED")]
    Interrupted,
    #[serde(rename = "TIMED_OUT")]
    TimedOut,
}

impl TaskState {
    pub const ALL: [TaskState; 7] = [
        TaskState::Queued,
        TaskState::Running,
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::Cancelled,
        TaskState::Interrupted,
        TaskState::TimedOut,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Queued => "QUEUED",
            TaskState::Running => "RUNNING",
            TaskState::Succeeded => "SUCCEEDED",
            TaskState::Failed => "FAILED",
            TaskState::Cancelled => "CANCELLED",
            TaskState::Interrupted => "INTERRUPTED",
            TaskState::TimedOut => "TIMED_OUT",
        }
    }

    pub fn parse(s: &str) -> Option<TaskState> {
        TaskState::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// No further transition follows (except a requeue after INTERRUPTED).
    pub fn is_final(self) -> bool {
        !matches!(self, TaskState::Queued | TaskState::Running)
    }
}

/// Who asked for a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Chat,
    Cli,
    Http,
    Timer,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Chat => "chat",
            Origin::Cli => "cli",
            Origin::Http => "http",
            Origin::Timer => "timer",
        }
    }
}

/// A task to queue. `name` and `args` were checked against the task table
/// by whoever asked (the runner checks again at start: config may change).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTask {
    pub name: String,
    pub args: Vec<String>,
    /// The chat to tell when it ends.
    pub session_id: Option<String>,
    pub origin: Origin,
}

/// Chat commands that touch tasks, applied in the inbound turn's
/// transaction (a redelivered `/task run` queues nothing twice).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskEffect {
    Run {
        name: String,
        args: Vec<String>,
    },
    /// `any`: the owner's chat or the local CLI, which may see every task.
    Status {
        id: i64,
        any: bool,
    },
    Cancel {
        id: i64,
        any: bool,
    },
    /// This chat's recent tasks.
    List,
}

impl TaskEffect {
    /// Whether the runner should look at the store again.
    pub fn changes_tasks(&self) -> bool {
        matches!(self, TaskEffect::Run { .. } | TaskEffect::Cancel { .. })
    }
}

/// A task as operators see it (`keel tasks`, `GET /v1/tasks`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TaskRow {
    pub id: i64,
    pub name: String,
    pub args: Vec<String>,
    pub session: Option<String>,
    pub origin: String,
    pub state: String,
    pub attempt: i64,
    pub exit_code: Option<i64>,
    pub detail: Option<String>,
    pub boot_epoch: Option<i64>,
    pub pid: Option<i64>,
    pub log_bytes: i64,
    pub log_dropped: i64,
    pub created_at: String,
    pub updated_at: String,
    pub finished_at: Option<String>,
}

/// One transition.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StateRow {
    pub state: String,
    pub at: String,
    pub boot_epoch: i64,
    pub attempt: i64,
    pub detail: Option<String>,
}

/// A task with its transitions.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TaskDetail {
    #[serde(flatten)]
    pub task: TaskRow,
    pub states: Vec<StateRow>,
}

/// What a cancel found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelOutcome {
    NotFound,
    /// It ended already (state given).
    Finished(String),
    /// It was QUEUED and is CANCELLED now.
    Cancelled,
    /// It is RUNNING: the runner stops it (`cancel_requested` set).
    Requested,
}

/// What the runner needs to start an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartInfo {
    pub name: String,
    pub args: Vec<String>,
    pub attempt: i64,
    pub session_id: Option<String>,
    /// The next `log_fragments.seq` (earlier attempts' output stays).
    pub next_seq: i64,
    /// Bytes stored by earlier attempts (the cap is per task).
    pub log_bytes: i64,
}

/// One captured batch of one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fragment {
    pub seq: i64,
    pub stream: &'static str,
    pub bytes: Vec<u8>,
    /// A container task's place in the engine's log after this fragment
    /// (see `tasks/container.rs`); `None` for processes.
    pub resume: Option<String>,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finish {
    pub id: i64,
    pub state: TaskState,
    pub exit_code: Option<i64>,
    pub detail: Option<String>,
    pub attempt: i64,
    pub epoch: i64,
    /// Output the cap dropped (counted on the task).
    pub dropped: i64,
    /// Last output fragments (the truncation marker), stored first.
    pub fragments: Vec<Fragment>,
    /// Queue again (attempt + 1): an interrupted `retry_on_restart` task.
    pub requeue: bool,
    /// Tell the task's chat this text (`deliver`: it has a route).
    pub notice: Option<(String, bool)>,
}

/// What the runner should look at: QUEUED tasks in order, and RUNNING ones
/// whose cancel was asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskWork {
    /// Oldest first.
    pub queued: Vec<Queued>,
    pub cancel: Vec<i64>,
}

/// A QUEUED task as the runner checks it before starting it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub id: i64,
    pub name: String,
    pub args: Vec<String>,
    pub session_id: Option<String>,
    pub attempt: i64,
}

/// A process group an earlier boot may have left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orphan {
    pub id: i64,
    pub pid: i64,
    pub pid_start: i64,
}

/// What recovery did (R21, R38).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    pub interrupted: i64,
    pub requeued: i64,
    /// Recorded processes of interrupted tasks, to stop if still alive.
    pub orphans: Vec<Orphan>,
    /// Container tasks left RUNNING and taken over by this start.
    pub reattach: Vec<Reattach>,
}

/// A container task an earlier start left running: re-attached, not
/// interrupted (its container survives keel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reattach {
    pub id: i64,
    pub name: String,
    pub args: Vec<String>,
    pub session_id: Option<String>,
    pub attempt: i64,
    pub next_seq: i64,
    /// Output bytes stored so far (kept and dropped): skipped on re-attach.
    pub stored: i64,
    pub log_bytes: i64,
    /// Where the stored output ends in the engine's log (timestamp form,
    /// newest fragment that has one): re-attach resumes after it.
    pub resume: Option<String>,
}

// ---- rusqlite entry points (SQLite-only callers) ----

/// Queue a task; returns its id (a timer's `task` callback).
pub fn create_task(conn: &Connection, at: &str, t: &NewTask) -> Result<i64, StoreError> {
    p::create_task(&mut SqliteSql(conn), at, t)
}

/// Run a chat command's effect; returns the reply text.
pub fn apply_effect(
    conn: &Connection,
    stamp: &Stamp,
    session: &SessionKey,
    effect: &TaskEffect,
) -> Result<String, StoreError> {
    p::apply_effect(&mut SqliteSql(conn), stamp, session, effect)
}

/// Store captured output and count it on the task.
pub fn append_logs(
    conn: &Connection,
    at: &str,
    id: i64,
    fragments: &[Fragment],
) -> Result<(), StoreError> {
    p::append_logs(&mut SqliteSql(conn), at, id, fragments)
}

/// One task by id.
pub fn get_task(conn: &Connection, id: i64) -> Result<Option<TaskRow>, StoreError> {
    p::get_task(&mut SqliteSql(conn), id)
}

/// Every task with its transitions (oldest first), optionally in one state.
pub fn list_details(
    conn: &Connection,
    state: Option<&str>,
    limit: i64,
) -> Result<Vec<TaskDetail>, StoreError> {
    p::list_details(&mut SqliteSql(conn), state, limit)
}

/// One task with every transition, oldest first.
pub fn task_detail(conn: &Connection, id: i64) -> Result<Option<TaskDetail>, StoreError> {
    p::task_detail(&mut SqliteSql(conn), id)
}

/// Output fragments of a task after `after_seq` (see
/// [`p::log_fragments`]).
pub fn log_fragments(
    conn: &Connection,
    id: i64,
    stream: Option<&str>,
    after_seq: i64,
    max_bytes: usize,
) -> Result<Vec<(i64, String, Vec<u8>)>, StoreError> {
    p::log_fragments(&mut SqliteSql(conn), id, stream, after_seq, max_bytes)
}

/// `(state, count)` of every task, and the stored log bytes.
pub fn counts(conn: &Connection) -> Result<(Vec<(String, i64)>, i64), StoreError> {
    p::counts(&mut SqliteSql(conn))
}

// ---- messages to the PersistenceActor ----

/// Queue a task. Sent by the runner for the CLI and HTTP.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<i64, StoreError>")]
pub struct CreateTask(pub NewTask);

impl Handler<CreateTask> for PersistenceActor {
    type Result = ResponseFuture<Result<i64, StoreError>>;
    fn handle(&mut self, msg: CreateTask, _: &mut Context<Self>) -> Self::Result {
        self.call_sql(move |db, at| p::create_task(db, &at.text, &msg.0))
    }
}

/// Cancel a task. Sent by the runner for the CLI and HTTP.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<CancelOutcome, StoreError>")]
pub struct RequestCancel(pub i64);

impl Handler<RequestCancel> for PersistenceActor {
    type Result = ResponseFuture<Result<CancelOutcome, StoreError>>;
    fn handle(&mut self, msg: RequestCancel, _: &mut Context<Self>) -> Self::Result {
        self.call_sql(move |db, at| p::request_cancel(db, &at.text, msg.0, None))
    }
}

/// QUEUED → RUNNING, committed before the spawn. Sent by the runner.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Option<StartInfo>, StoreError>")]
pub struct StartTask {
    pub id: i64,
    pub epoch: i64,
    /// The instance starting it (recorded on the task; `None` for a keel
    /// without an instance id).
    pub instance: Option<String>,
}

impl Handler<StartTask> for PersistenceActor {
    type Result = ResponseFuture<Result<Option<StartInfo>, StoreError>>;
    fn handle(&mut self, msg: StartTask, _: &mut Context<Self>) -> Self::Result {
        self.call_sql(move |db, at| {
            p::start_task(db, &at.text, msg.id, msg.epoch, msg.instance.as_deref())
        })
    }
}

/// The spawned process's pid and start time. Sent by the runner.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(), StoreError>")]
pub struct RecordTaskPid {
    pub id: i64,
    pub pid: i64,
    pub pid_start: i64,
}

impl Handler<RecordTaskPid> for PersistenceActor {
    type Result = ResponseFuture<Result<(), StoreError>>;
    fn handle(&mut self, msg: RecordTaskPid, _: &mut Context<Self>) -> Self::Result {
        self.call_sql(move |db, _| p::record_pid(db, msg.id, msg.pid, msg.pid_start))
    }
}

/// A batch of captured output. Sent by a task's supervisor, which reads no
/// more output until the answer comes (back-pressure).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(), StoreError>")]
pub struct AppendLogs {
    pub id: i64,
    /// Shared so a retry after a storage failure does not copy the batch.
    pub fragments: std::sync::Arc<Vec<Fragment>>,
}

impl Handler<AppendLogs> for PersistenceActor {
    type Result = ResponseFuture<Result<(), StoreError>>;
    fn handle(&mut self, msg: AppendLogs, _: &mut Context<Self>) -> Self::Result {
        self.call_sql(move |db, at| p::append_logs(db, &at.text, msg.id, &msg.fragments))
    }
}

/// The end of an attempt. Sent by a task's supervisor.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<bool, StoreError>")]
pub struct FinishTask(pub Finish);

impl Handler<FinishTask> for PersistenceActor {
    type Result = ResponseFuture<Result<bool, StoreError>>;
    fn handle(&mut self, msg: FinishTask, _: &mut Context<Self>) -> Self::Result {
        self.call_sql(move |db, at| p::finish_task(db, at, &msg.0))
    }
}

/// Queued tasks and pending cancels. Sent by the runner.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<TaskWork, StoreError>")]
pub struct GetTaskWork {
    pub limit: i64,
    /// Whose pending cancels to return (only the runner of a process can
    /// stop it).
    pub instance: Option<String>,
}

impl Handler<GetTaskWork> for PersistenceActor {
    type Result = ResponseFuture<Result<TaskWork, StoreError>>;
    fn handle(&mut self, msg: GetTaskWork, _: &mut Context<Self>) -> Self::Result {
        self.call_sql(move |db, _| p::task_work(db, msg.limit, msg.instance.as_deref()))
    }
}

/// Startup recovery (R21). Sent once by the runner, before ready.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Recovery, StoreError>")]
pub struct RecoverTasks {
    pub epoch: i64,
    pub retry: HashMap<String, u32>,
    /// Names of container tasks (re-attached instead of interrupted).
    pub reattach: std::collections::HashSet<String>,
    /// This instance (see `portable::tasks::recover` for what it may take
    /// over).
    pub instance: Option<String>,
}

impl Handler<RecoverTasks> for PersistenceActor {
    type Result = ResponseFuture<Result<Recovery, StoreError>>;
    fn handle(&mut self, msg: RecoverTasks, _: &mut Context<Self>) -> Self::Result {
        self.call_sql(move |db, at| {
            p::recover(
                db,
                at,
                msg.epoch,
                msg.instance.as_deref(),
                &msg.retry,
                &msg.reattach,
            )
        })
    }
}

/// Tasks with their transitions for the admin API, oldest first.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Vec<TaskDetail>, StoreError>")]
pub struct GetTasks {
    pub state: Option<String>,
    pub limit: i64,
}

impl Handler<GetTasks> for PersistenceActor {
    type Result = ResponseFuture<Result<Vec<TaskDetail>, StoreError>>;
    fn handle(&mut self, msg: GetTasks, _: &mut Context<Self>) -> Self::Result {
        self.read_sql(move |db| p::list_details(db, msg.state.as_deref(), msg.limit))
    }
}

/// One task with its transitions, for the admin API.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Option<TaskDetail>, StoreError>")]
pub struct GetTask(pub i64);

impl Handler<GetTask> for PersistenceActor {
    type Result = ResponseFuture<Result<Option<TaskDetail>, StoreError>>;
    fn handle(&mut self, msg: GetTask, _: &mut Context<Self>) -> Self::Result {
        self.call_sql(move |db, _| p::task_detail(db, msg.0))
    }
}

/// Output of a task for the admin API (bounded per call).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Vec<(i64, String, Vec<u8>)>, StoreError>")]
pub struct GetTaskLogs {
    pub id: i64,
    pub stream: Option<String>,
    pub after_seq: i64,
    pub max_bytes: usize,
}

impl Handler<GetTaskLogs> for PersistenceActor {
    type Result = ResponseFuture<Result<Vec<(i64, String, Vec<u8>)>, StoreError>>;
    fn handle(&mut self, msg: GetTaskLogs, _: &mut Context<Self>) -> Self::Result {
        self.read_sql(move |db| {
            p::log_fragments(
                db,
                msg.id,
                msg.stream.as_deref(),
                msg.after_seq,
                msg.max_bytes,
            )
        })
    }
}

/// Prune finished tasks (one bounded batch). Sent by the runner.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(usize, usize), StoreError>")]
pub struct PruneTasks {
    pub before: String,
    pub limit: i64,
}

impl Handler<PruneTasks> for PersistenceActor {
    type Result = ResponseFuture<Result<(usize, usize), StoreError>>;
    fn handle(&mut self, msg: PruneTasks, _: &mut Context<Self>) -> Self::Result {
        self.call_sql(move |db, _| p::prune(db, &msg.before, msg.limit))
    }
}

/// Counts by state and stored log bytes. Sent by the runner for gauges.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(Vec<(String, i64)>, i64), StoreError>")]
pub struct GetTaskCounts;

impl Handler<GetTaskCounts> for PersistenceActor {
    type Result = ResponseFuture<Result<(Vec<(String, i64)>, i64), StoreError>>;
    fn handle(&mut self, _: GetTaskCounts, _: &mut Context<Self>) -> Self::Result {
        self.call_sql(|db, _| p::counts(db))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persistence::migrate;

    fn at() -> Stamp {
        Stamp::from_ms(1_764_590_400_000)
    }

    fn db() -> Connection {
        let mut c = Connection::open_in_memory().unwrap();
        migrate::migrate(&mut c, std::path::Path::new(":memory:")).unwrap();
        crate::persistence::meta::next_boot_epoch(&c).unwrap();
        c
    }

    // The portable functions on the SQLite connection, as one node runs
    // them (no instance id).
    fn record_state(
        c: &Connection,
        at: &str,
        id: i64,
        state: TaskState,
        epoch: i64,
        attempt: i64,
        detail: Option<&str>,
    ) -> Result<(), StoreError> {
        p::record_state(&mut SqliteSql(c), at, id, state, epoch, attempt, detail)
    }
    fn request_cancel(
        c: &Connection,
        at: &str,
        id: i64,
        session: Option<&str>,
    ) -> Result<CancelOutcome, StoreError> {
        p::request_cancel(&mut SqliteSql(c), at, id, session)
    }
    fn start_task(
        c: &Connection,
        at: &str,
        id: i64,
        epoch: i64,
    ) -> Result<Option<StartInfo>, StoreError> {
        p::start_task(&mut SqliteSql(c), at, id, epoch, None)
    }
    fn record_pid(c: &Connection, id: i64, pid: i64, pid_start: i64) -> Result<(), StoreError> {
        p::record_pid(&mut SqliteSql(c), id, pid, pid_start)
    }
    fn finish_task(c: &Connection, stamp: &Stamp, f: &Finish) -> Result<bool, StoreError> {
        p::finish_task(&mut SqliteSql(c), stamp, f)
    }
    fn task_work(c: &Connection, limit: i64) -> Result<TaskWork, StoreError> {
        p::task_work(&mut SqliteSql(c), limit, None)
    }
    fn recover(
        c: &Connection,
        _at: &str,
        epoch: i64,
        retry: &HashMap<String, u32>,
        reattach: &std::collections::HashSet<String>,
    ) -> Result<Recovery, StoreError> {
        p::recover(&mut SqliteSql(c), &at(), epoch, None, retry, reattach)
    }
    fn prune(c: &Connection, before: &str, limit: i64) -> Result<(usize, usize), StoreError> {
        p::prune(&mut SqliteSql(c), before, limit)
    }

    fn new(name: &str) -> NewTask {
        NewTask {
            name: name.into(),
            args: vec!["a b".into()],
            session_id: None,
            origin: Origin::Cli,
        }
    }

    fn states(c: &Connection, id: i64) -> Vec<String> {
        task_detail(c, id)
            .unwrap()
            .unwrap()
            .states
            .into_iter()
            .map(|s| format!("{}@{}#{}", s.state, s.boot_epoch, s.attempt))
            .collect()
    }

    #[test]
    fn a_task_runs_through_its_states_and_keeps_its_output_in_order() {
        let c = db();
        let id = create_task(&c, &at().text, &new("echo")).unwrap();
        let info = start_task(&c, &at().text, id, 1).unwrap().unwrap();
        assert_eq!((info.attempt, info.next_seq, info.args.len()), (1, 1, 1));
        assert!(start_task(&c, &at().text, id, 1).unwrap().is_none());
        let frag = |seq, stream, b: &[u8]| Fragment {
            seq,
            stream,
            bytes: b.to_vec(),
            resume: None,
        };
        append_logs(
            &c,
            &at().text,
            id,
            &[frag(1, "stdout", b"a\xff"), frag(2, "stderr", b"e")],
        )
        .unwrap();
        let done = finish_task(
            &c,
            &at(),
            &Finish {
                id,
                state: TaskState::Succeeded,
                exit_code: Some(0),
                detail: None,
                attempt: 1,
                epoch: 1,
                dropped: 0,
                fragments: vec![frag(3, "stdout", b"z")],
                requeue: false,
                notice: None,
            },
        )
        .unwrap();
        assert!(done);
        assert_eq!(
            states(&c, id),
            ["QUEUED@1#1", "RUNNING@1#1", "SUCCEEDED@1#1"]
        );
        let t = get_task(&c, id).unwrap().unwrap();
        assert_eq!((t.log_bytes, t.exit_code), (4, Some(0)));
        assert!(t.finished_at.is_some());
        let out: Vec<u8> = log_fragments(&c, id, Some("stdout"), 0, usize::MAX)
            .unwrap()
            .into_iter()
            .flat_map(|(_, _, b)| b)
            .collect();
        assert_eq!(out, b"a\xffz");
    }

    #[test]
    fn recovery_interrupts_older_epochs_only_and_requeues_with_the_same_id() {
        let c = db();
        let a = create_task(&c, &at().text, &new("retry")).unwrap();
        let b = create_task(&c, &at().text, &new("once")).unwrap();
        start_task(&c, &at().text, a, 1).unwrap();
        start_task(&c, &at().text, b, 1).unwrap();
        record_pid(&c, a, 4242, 99).unwrap();
        let retry = HashMap::from([("retry".to_string(), 2u32)]);
        // The same epoch: nothing is an orphan.
        assert_eq!(
            recover(&c, &at().text, 1, &retry, &Default::default())
                .unwrap()
                .interrupted,
            0
        );
        let r = recover(&c, &at().text, 2, &retry, &Default::default()).unwrap();
        assert_eq!((r.interrupted, r.requeued), (2, 1));
        assert_eq!(
            r.orphans,
            vec![Orphan {
                id: a,
                pid: 4242,
                pid_start: 99
            }]
        );
        assert_eq!(get_task(&c, a).unwrap().unwrap().state, "QUEUED");
        assert_eq!(get_task(&c, b).unwrap().unwrap().state, "INTERRUPTED");
        // Attempt 2 of 2 interrupted again: not requeued.
        start_task(&c, &at().text, a, 2).unwrap();
        let r = recover(&c, &at().text, 3, &retry, &Default::default()).unwrap();
        assert_eq!((r.interrupted, r.requeued), (1, 0));
        assert_eq!(
            states(&c, a),
            [
                "QUEUED@1#1",
                "RUNNING@1#1",
                "INTERRUPTED@2#1",
                "QUEUED@2#2",
                "RUNNING@2#2",
                "INTERRUPTED@3#2"
            ]
        );
    }

    #[test]
    fn cancel_stops_a_queued_task_and_flags_a_running_one_within_its_chat() {
        let c = db();
        let mut t = new("x");
        t.session_id = Some("webhook:c1".into());
        let q = create_task(&c, &at().text, &t).unwrap();
        let r = create_task(&c, &at().text, &t).unwrap();
        start_task(&c, &at().text, r, 1).unwrap();
        assert_eq!(
            request_cancel(&c, &at().text, q, Some("webhook:c2")).unwrap(),
            CancelOutcome::NotFound
        );
        assert_eq!(
            request_cancel(&c, &at().text, q, Some("webhook:c1")).unwrap(),
            CancelOutcome::Cancelled
        );
        assert_eq!(
            request_cancel(&c, &at().text, r, None).unwrap(),
            CancelOutcome::Requested
        );
        let work = task_work(&c, 10).unwrap();
        assert_eq!((work.queued.len(), work.cancel), (0, vec![r]));
        assert_eq!(
            request_cancel(&c, &at().text, q, None).unwrap(),
            CancelOutcome::Finished("CANCELLED".into())
        );
    }

    #[test]
    fn pruning_removes_old_finished_tasks_in_bounded_batches() {
        let c = db();
        let id = create_task(&c, &at().text, &new("x")).unwrap();
        let live = create_task(&c, &at().text, &new("x")).unwrap();
        start_task(&c, &at().text, id, 1).unwrap();
        let frags: Vec<Fragment> = (1..=5)
            .map(|seq| Fragment {
                seq,
                stream: "stdout",
                bytes: vec![b'x'; 10],
                resume: None,
            })
            .collect();
        append_logs(&c, &at().text, id, &frags).unwrap();
        record_state(&c, &at().text, id, TaskState::Failed, 1, 1, None).unwrap();
        let cut = "9999-01-01T00:00:00Z";
        assert_eq!(prune(&c, cut, 3).unwrap(), (0, 3));
        assert_eq!(prune(&c, cut, 3).unwrap(), (1, 2));
        assert_eq!(prune(&c, cut, 3).unwrap(), (0, 0));
        assert!(get_task(&c, id).unwrap().is_none());
        assert!(get_task(&c, live).unwrap().is_some());
    }
}
