//! Tasks (R19–R22, R38, R45): configured commands run under supervision.
//!
//! The store is the queue. Whoever asks for a task (a chat command in its
//! inbound turn's transaction, a timer in its fire's transaction, the CLI
//! over the admin socket, HTTP) writes a QUEUED row and pokes the
//! `TaskActor` with `TasksChanged`; the actor reads the queue in order and
//! starts tasks up to `[tasks] concurrency` (an `exclusive` name at most
//! once). Each start is QUEUED → RUNNING committed *before* the spawn; the
//! attempt then runs in its own supervisor future (`supervise.rs`) that
//! captures output, enforces the timeout, obeys cancel and shutdown, and
//! records the final state.
//!
//! Recovery (`Recover`, before ready): every RUNNING row of an older boot
//! epoch is INTERRUPTED at once, its process group killed if anything of
//! it survived (pid + start time checked), and a `retry_on_restart` task
//! is queued again (same id, attempt + 1, up to `max_attempts`) — only
//! after the old group is gone, so two copies never run.

pub mod admin;
pub mod commands;
pub mod container;
pub mod process;
pub mod supervise;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts};
use tokio::sync::{oneshot, watch};

use crate::clock::Clock;
use crate::config::{TaskConfig, TaskKind, TasksConfig};
use crate::error::StoreError;
use crate::metrics::Metrics;
use crate::outbox::OutboxKick;
use crate::persistence::tasks::{
    self as store, CancelOutcome, CreateTask, Finish, GetTaskCounts, GetTaskWork, NewTask, Origin,
    PruneTasks, Queued, RecordTaskPid, RequestCancel, StartTask, TaskState,
};
use crate::persistence::PersistenceActor;
use process::{ContainerSpawn, Runner, SpawnSpec};
use supervise::{Attempt, Ended, Stop};

/// Most extra arguments a caller may pass.
pub const MAX_ARGS: usize = 256;
/// Most bytes of extra arguments in all.
pub const MAX_ARGS_BYTES: usize = 64 * 1024;

/// Everything the runner takes from config (replaced on reload; running
/// tasks keep the settings they started with).
#[derive(Clone)]
pub struct TaskSettings {
    pub defs: Arc<BTreeMap<String, TaskConfig>>,
    pub limits: TasksConfig,
    /// The owner's session id (may run every task).
    pub owner: Option<String>,
    /// Channels with a delivery route (end notices to others are stored only).
    pub routed: HashSet<String>,
    /// Working directory of tasks without `cwd`.
    pub default_cwd: PathBuf,
    /// PATH and LANG of keel, given to every child (from the binary).
    pub base_env: Vec<(String, String)>,
}

/// May a task be run on behalf of `session` (None = CLI or HTTP admin)?
/// The owner's chat, the task's `allowed_chats` and the local CLI may.
pub fn may_run(session: Option<&str>, def: &TaskConfig, owner: Option<&str>) -> bool {
    match session {
        None => true,
        Some(s) => {
            Some(s) == owner || s.starts_with("cli:") || def.allowed_chats.iter().any(|c| c == s)
        }
    }
}

/// Check a caller's extra arguments; the error is one line for the caller.
pub fn check_args(name: &str, def: &TaskConfig, args: &[String]) -> Result<(), String> {
    if !args.is_empty() && !def.args_allowed {
        return Err(format!("task {name} takes no arguments"));
    }
    if args.iter().any(|a| a.contains('\0')) {
        return Err("arguments must not contain NUL".into());
    }
    let bytes: usize = args.iter().map(String::len).sum();
    if args.len() > MAX_ARGS || bytes > MAX_ARGS_BYTES {
        return Err(format!(
            "arguments too long ({} arguments, {bytes} bytes; at most {MAX_ARGS} and {MAX_ARGS_BYTES})",
            args.len()
        ));
    }
    Ok(())
}

/// "unknown task X (configured: a, b)".
pub fn unknown_task(name: &str, defs: &BTreeMap<String, TaskConfig>) -> String {
    let shown: String = name.chars().take(64).collect();
    if defs.is_empty() {
        format!("unknown task {shown:?}: no tasks are configured")
    } else {
        let names: Vec<&str> = defs.keys().map(String::as_str).collect();
        format!("unknown task {shown:?} (configured: {})", names.join(", "))
    }
}

/// Task metrics for `/metrics`.
#[derive(Clone)]
pub struct TaskMetrics {
    /// Tasks by state (from the store after each change).
    pub by_state: IntGaugeVec,
    pub running: IntGauge,
    pub log_bytes: IntCounter,
    pub interrupted_at_start: IntCounter,
    pub ended: IntCounterVec,
}

impl TaskMetrics {
    pub fn new(m: &Metrics) -> TaskMetrics {
        let t = TaskMetrics {
            by_state: IntGaugeVec::new(
                Opts::new("keel_tasks", "Stored tasks by state"),
                &["state"],
            )
            .expect("static metric"),
            running: IntGauge::new("keel_tasks_running", "Task processes running now")
                .expect("static metric"),
            log_bytes: IntCounter::new(
                "keel_task_log_bytes_total",
                "Task output captured into the store",
            )
            .expect("static metric"),
            interrupted_at_start: IntCounter::new(
                "keel_tasks_interrupted_at_start_total",
                "Tasks found RUNNING from an earlier start (R21)",
            )
            .expect("static metric"),
            ended: IntCounterVec::new(
                Opts::new("keel_tasks_ended_total", "Attempts ended, by final state"),
                &["state"],
            )
            .expect("static metric"),
        };
        m.register(Box::new(t.by_state.clone()));
        m.register(Box::new(t.running.clone()));
        m.register(Box::new(t.log_bytes.clone()));
        m.register(Box::new(t.interrupted_at_start.clone()));
        m.register(Box::new(t.ended.clone()));
        t
    }
}

/// Something happened to a task (tests wait on these instead of sleeping).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskEvent {
    Running { id: i64, pid: i64 },
    Ended(Ended),
}

struct Entry {
    name: String,
    stop: watch::Sender<Option<Stop>>,
}

/// The runner. Owns every task child of this process.
pub struct TaskActor {
    store: Addr<PersistenceActor>,
    outbox: Recipient<OutboxKick>,
    runner: Arc<dyn Runner>,
    /// Runs `kind = "container"` tasks (none: containers are off).
    container_runner: Option<Arc<dyn Runner>>,
    clock: Arc<dyn Clock>,
    settings: TaskSettings,
    epoch: i64,
    /// This instance's id when several share the store (recorded on the
    /// tasks it starts; recovery takes over only its own and dead ones').
    instance: Option<String>,
    running: HashMap<i64, Entry>,
    /// A queue read is in flight; `dirty`: another one was asked for.
    loading: bool,
    dirty: bool,
    recovered: bool,
    stopping: bool,
    drained: Vec<oneshot::Sender<()>>,
    metrics: Option<TaskMetrics>,
    events: Option<tokio::sync::mpsc::UnboundedSender<TaskEvent>>,
    admin: Option<admin::AdminSocket>,
}

impl TaskActor {
    pub fn new(
        store: Addr<PersistenceActor>,
        outbox: Recipient<OutboxKick>,
        runner: Arc<dyn Runner>,
        clock: Arc<dyn Clock>,
        settings: TaskSettings,
        epoch: i64,
    ) -> TaskActor {
        TaskActor {
            store,
            outbox,
            runner,
            container_runner: None,
            clock,
            settings,
            epoch,
            instance: None,
            running: HashMap::new(),
            loading: false,
            dirty: false,
            recovered: false,
            stopping: false,
            drained: Vec::new(),
            metrics: None,
            events: None,
            admin: None,
        }
    }

    pub fn with_metrics(mut self, m: TaskMetrics) -> TaskActor {
        self.metrics = Some(m);
        self
    }

    /// Report starts and ends on `events` (tests).
    pub fn with_events(mut self, e: tokio::sync::mpsc::UnboundedSender<TaskEvent>) -> TaskActor {
        self.events = Some(e);
        self
    }

    /// The runner of container tasks (`[containers] enabled`).
    pub fn with_container_runner(mut self, r: Option<Arc<dyn Runner>>) -> TaskActor {
        self.container_runner = r;
        self
    }

    /// Run as instance `id` of several sharing the store (`epoch` is then
    /// that instance's boot epoch).
    pub fn with_instance(mut self, id: Option<String>) -> TaskActor {
        self.instance = id;
        self
    }

    /// The admin socket to close at shutdown.
    pub fn with_admin(mut self, a: Option<admin::AdminSocket>) -> TaskActor {
        self.admin = a;
        self
    }

    /// Read the queue and start what fits.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        if !self.recovered || self.stopping {
            return;
        }
        if self.loading {
            self.dirty = true;
            return;
        }
        self.loading = true;
        self.dirty = false;
        let req = self.store.send(GetTaskWork {
            limit: 1_000,
            instance: self.instance.clone(),
        });
        ctx.spawn(req.into_actor(self).map(|res, this, ctx| {
            this.loading = false;
            match res.unwrap_or(Err(StoreError::Closed)) {
                Ok(work) => {
                    for id in work.cancel {
                        if let Some(e) = this.running.get(&id) {
                            let _ = e.stop.send(Some(Stop::Cancel));
                        }
                    }
                    for q in work.queued {
                        if this.stopping || this.running.len() >= this.settings.limits.concurrency {
                            break;
                        }
                        if this.running.contains_key(&q.id) {
                            continue;
                        }
                        let exclusive =
                            this.settings.defs.get(&q.name).is_some_and(|d| d.exclusive);
                        if exclusive && this.running.values().any(|e| e.name == q.name) {
                            continue;
                        }
                        this.launch(q, ctx);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the task queue; retrying");
                    ctx.run_later(Duration::from_secs(1), |this, ctx| this.pump(ctx));
                }
            }
            if this.dirty {
                this.pump(ctx);
            }
        }));
    }

    /// Start one queued task in its own future.
    fn launch(&mut self, q: Queued, ctx: &mut Context<Self>) {
        let (stop, stop_rx) = watch::channel(None);
        self.running.insert(
            q.id,
            Entry {
                name: q.name.clone(),
                stop,
            },
        );
        if let Some(m) = &self.metrics {
            m.running.set(self.running.len() as i64);
        }
        let id = q.id;
        let run = run_attempt(
            q,
            self.settings.clone(),
            self.store.clone(),
            Runners {
                process: self.runner.clone(),
                container: self.container_runner.clone(),
            },
            self.epoch,
            self.instance.clone(),
            stop_rx,
            self.metrics.clone(),
            self.events.clone(),
        );
        self.track(id, Box::pin(run), ctx);
    }

    /// Re-attach a container task an earlier start left running.
    fn launch_reattach(&mut self, r: store::Reattach, ctx: &mut Context<Self>) {
        let (stop, stop_rx) = watch::channel(None);
        self.running.insert(
            r.id,
            Entry {
                name: r.name.clone(),
                stop,
            },
        );
        if let Some(m) = &self.metrics {
            m.running.set(self.running.len() as i64);
        }
        let id = r.id;
        let run = reattach_attempt(
            r,
            self.settings.clone(),
            self.store.clone(),
            self.container_runner.clone(),
            self.epoch,
            stop_rx,
        );
        self.track(id, Box::pin(run), ctx);
    }

    /// Await one attempt and account for its end.
    fn track(
        &mut self,
        id: i64,
        run: std::pin::Pin<Box<dyn std::future::Future<Output = Option<Ended>>>>,
        ctx: &mut Context<Self>,
    ) {
        ctx.spawn(run.into_actor(self).map(move |ended, this, ctx| {
            this.running.remove(&id);
            if let Some(m) = &this.metrics {
                m.running.set(this.running.len() as i64);
            }
            if let Some(ended) = ended {
                if let Some(m) = &this.metrics {
                    m.ended.with_label_values(&[ended.state.as_str()]).inc();
                }
                if let Some(ev) = &this.events {
                    let _ = ev.send(TaskEvent::Ended(ended));
                }
                this.outbox.do_send(OutboxKick);
            }
            this.refresh_gauges();
            if this.stopping && this.running.is_empty() {
                for d in this.drained.drain(..) {
                    let _ = d.send(());
                }
            }
            this.pump(ctx);
        }));
    }

    fn refresh_gauges(&self) {
        let Some(m) = self.metrics.clone() else {
            return;
        };
        let req = self.store.send(GetTaskCounts);
        actix::spawn(async move {
            if let Ok(Ok((rows, _))) = req.await {
                for s in TaskState::ALL {
                    let n = rows
                        .iter()
                        .find(|(st, _)| st == s.as_str())
                        .map_or(0, |r| r.1);
                    m.by_state.with_label_values(&[s.as_str()]).set(n);
                }
            }
        });
    }

    /// Delete finished tasks past retention, one bounded batch at a time.
    fn prune(&self) {
        let cut = self.clock.now_ms() - i64::from(self.settings.limits.retention_days) * 86_400_000;
        let before = chrono::DateTime::from_timestamp_millis(cut)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let store = self.store.clone();
        actix::spawn(async move {
            let (mut tasks, mut fragments) = (0, 0);
            for _ in 0..1_000 {
                let req = store.send(PruneTasks {
                    before: before.clone(),
                    limit: 1_000,
                });
                match req.await.unwrap_or(Err(StoreError::Closed)) {
                    Ok((0, 0)) => break,
                    Ok((t, f)) => {
                        tasks += t;
                        fragments += f;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "task pruning failed");
                        break;
                    }
                }
            }
            if tasks + fragments > 0 {
                tracing::info!(tasks, fragments, "pruned task history");
            }
        });
    }
}

/// Check, start, supervise and record one attempt. `None` when the task
/// was not started (cancelled meanwhile, or storage failing).
#[allow(clippy::too_many_arguments)]
async fn run_attempt(
    q: Queued,
    settings: TaskSettings,
    store_addr: Addr<PersistenceActor>,
    runners: Runners,
    epoch: i64,
    instance: Option<String>,
    stop: watch::Receiver<Option<Stop>>,
    metrics: Option<TaskMetrics>,
    events: Option<tokio::sync::mpsc::UnboundedSender<TaskEvent>>,
) -> Option<Ended> {
    let deliver = q.session_id.as_ref().map(|s| {
        s.split_once(':')
            .is_some_and(|(channel, _)| settings.routed.contains(channel))
    });
    let fail = |detail: String, attempt: i64, exit_code: Option<i64>| Finish {
        id: q.id,
        state: TaskState::Failed,
        exit_code,
        detail: Some(detail.clone()),
        attempt,
        epoch,
        dropped: 0,
        fragments: Vec::new(),
        requeue: false,
        notice: deliver.map(|d| (format!("task {} ({}) FAILED ({detail})", q.id, q.name), d)),
    };
    // Checked again at start: config may have changed since it was queued.
    let checked = match settings.defs.get(&q.name) {
        None => Err(format!("task {:?} is not configured", q.name)),
        Some(def) if !may_run(q.session_id.as_deref(), def, settings.owner.as_deref()) => {
            Err(format!(
                "chat {} may not run task {}",
                q.session_id.as_deref().unwrap_or("?"),
                q.name
            ))
        }
        Some(def) => check_args(&q.name, def, &q.args).map(|()| def.clone()),
    };
    let def = match checked {
        Ok(def) => def,
        Err(detail) => {
            let ended = Ended {
                id: q.id,
                state: TaskState::Failed,
                exit_code: None,
            };
            supervise::record_finish(&store_addr, fail(detail, q.attempt, None)).await;
            return Some(ended);
        }
    };
    let info = match store_addr
        .send(StartTask {
            id: q.id,
            epoch,
            instance,
        })
        .await
        .unwrap_or(Err(StoreError::Closed))
    {
        Ok(Some(info)) => info,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(task = q.id, error = %e, "cannot start task; it stays queued");
            return None;
        }
    };
    let cwd = def
        .cwd
        .clone()
        .unwrap_or_else(|| settings.default_cwd.clone());
    let mut env = settings.base_env.clone();
    env.extend(def.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    let spec = SpawnSpec {
        program: def.command[0].clone(),
        args: def.command[1..]
            .iter()
            .cloned()
            .chain(info.args.iter().cloned())
            .collect(),
        cwd: cwd.clone(),
        env,
        container: (def.kind == TaskKind::Container).then(|| ContainerSpawn {
            task_id: q.id,
            task_name: q.name.clone(),
            image: def.image.clone().unwrap_or_default(),
        }),
    };
    let runner = match (def.kind, &runners.container) {
        (TaskKind::Process, _) => runners.process.clone(),
        (TaskKind::Container, Some(r)) => r.clone(),
        (TaskKind::Container, None) => {
            supervise::record_finish(
                &store_addr,
                fail(
                    "container tasks need [containers] enabled = true".into(),
                    info.attempt,
                    None,
                ),
            )
            .await;
            return Some(Ended {
                id: q.id,
                state: TaskState::Failed,
                exit_code: None,
            });
        }
    };
    let failed_start = |detail: String| async {
        supervise::record_finish(&store_addr, fail(detail, info.attempt, None)).await;
        Some(Ended {
            id: q.id,
            state: TaskState::Failed,
            exit_code: None,
        })
    };
    if def.kind == TaskKind::Process && !cwd.is_dir() {
        return failed_start(format!(
            "cwd {} does not exist or is not a directory",
            cwd.display()
        ))
        .await;
    }
    let child = match runner.spawn(spec.clone()).await {
        Ok(c) => c,
        Err(e) => {
            return failed_start(format!("cannot start {:?}: {e}", spec.program)).await;
        }
    };
    let (pid, pid_start) = child.control.identity();
    // A container has no process of keel's to record (nothing for
    // recovery to signal): pid 0.
    if pid != 0 {
        if let Err(e) = store_addr
            .send(RecordTaskPid {
                id: q.id,
                pid,
                pid_start,
            })
            .await
            .unwrap_or(Err(StoreError::Closed))
        {
            tracing::warn!(task = q.id, error = %e, "cannot record the task's pid");
        }
    }
    tracing::info!(task = q.id, name = %q.name, attempt = info.attempt, pid, "task running");
    if let Some(ev) = &events {
        let _ = ev.send(TaskEvent::Running { id: q.id, pid });
    }
    let retry = def.retry_on_restart && info.attempt < i64::from(def.max_attempts);
    let attempt = Attempt {
        id: q.id,
        name: q.name.clone(),
        attempt: info.attempt,
        epoch,
        next_seq: info.next_seq,
        stored: info.log_bytes.max(0) as u64,
        timeout: def.timeout_s.map(Duration::from_secs),
        grace: Duration::from_millis(settings.limits.grace_ms),
        flush_every: Duration::from_millis(settings.limits.log_flush_ms),
        batch_bytes: settings.limits.log_batch_bytes,
        max_log_bytes: settings.limits.max_log_bytes,
        retry,
        notice: deliver,
        captured: metrics.as_ref().map(|m| m.log_bytes.clone()),
    };
    let ended = supervise::supervise(child, attempt, store_addr, stop).await;
    tracing::info!(task = ended.id, state = ended.state.as_str(), exit_code = ?ended.exit_code, "task ended");
    Some(ended)
}

/// The runners an attempt may use.
struct Runners {
    process: Arc<dyn Runner>,
    container: Option<Arc<dyn Runner>>,
}

/// Re-attach and supervise a container task left RUNNING by an earlier
/// start; a container that is gone makes it INTERRUPTED.
async fn reattach_attempt(
    r: store::Reattach,
    settings: TaskSettings,
    store_addr: Addr<PersistenceActor>,
    runner: Option<Arc<dyn Runner>>,
    epoch: i64,
    stop: watch::Receiver<Option<Stop>>,
) -> Option<Ended> {
    let deliver = r.session_id.as_ref().map(|s| {
        s.split_once(':')
            .is_some_and(|(channel, _)| settings.routed.contains(channel))
    });
    let def = settings.defs.get(&r.name).cloned();
    let spec = def.as_ref().map(|def| SpawnSpec {
        program: def.command.first().cloned().unwrap_or_default(),
        args: def
            .command
            .iter()
            .skip(1)
            .cloned()
            .chain(r.args.iter().cloned())
            .collect(),
        cwd: settings.default_cwd.clone(),
        env: Vec::new(),
        container: Some(ContainerSpawn {
            task_id: r.id,
            task_name: r.name.clone(),
            image: def.image.clone().unwrap_or_default(),
        }),
    });
    let child = match (&runner, spec) {
        (Some(runner), Some(spec)) => {
            runner
                .attach(spec, r.stored.max(0) as u64, r.resume.clone())
                .await
        }
        _ => Ok(None),
    };
    let child = match child {
        Ok(Some(c)) => c,
        Ok(None) | Err(_) => {
            let detail = match child {
                Err(e) => format!("keel restarted and could not re-attach its container: {e}"),
                _ => "keel restarted and its container is gone".to_string(),
            };
            supervise::record_finish(
                &store_addr,
                store::Finish {
                    id: r.id,
                    state: TaskState::Interrupted,
                    exit_code: None,
                    detail: Some(detail.clone()),
                    attempt: r.attempt,
                    epoch,
                    dropped: 0,
                    fragments: Vec::new(),
                    requeue: false,
                    notice: deliver.map(|d| {
                        (
                            format!("task {} ({}) INTERRUPTED ({detail})", r.id, r.name),
                            d,
                        )
                    }),
                },
            )
            .await;
            return Some(Ended {
                id: r.id,
                state: TaskState::Interrupted,
                exit_code: None,
            });
        }
    };
    tracing::info!(task = r.id, name = %r.name, resume = ?r.resume, skipped = r.stored, "container task re-attached");
    let def = def?;
    let attempt = Attempt {
        id: r.id,
        name: r.name.clone(),
        attempt: r.attempt,
        epoch,
        next_seq: r.next_seq,
        stored: r.log_bytes.max(0) as u64,
        timeout: def.timeout_s.map(Duration::from_secs),
        grace: Duration::from_millis(settings.limits.grace_ms),
        flush_every: Duration::from_millis(settings.limits.log_flush_ms),
        batch_bytes: settings.limits.log_batch_bytes,
        max_log_bytes: settings.limits.max_log_bytes,
        retry: false,
        notice: deliver,
        captured: None,
    };
    let ended = supervise::supervise(child, attempt, store_addr, stop).await;
    tracing::info!(task = ended.id, state = ended.state.as_str(), exit_code = ?ended.exit_code, "task ended");
    Some(ended)
}

impl Actor for TaskActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(1_024);
        ctx.run_interval(Duration::from_secs(3_600), |this, _| this.prune());
        // A safety net for a lost `TasksChanged`: a task is delayed, never dropped.
        ctx.run_interval(Duration::from_secs(30), |this, ctx| this.pump(ctx));
    }
}

/// The queue changed (a task was queued or a cancel asked for). Sent by
/// sessions, the timer actor and the admin paths after their commit.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct TasksChanged;

impl Handler<TasksChanged> for TaskActor {
    type Result = ();
    fn handle(&mut self, _: TasksChanged, ctx: &mut Context<Self>) {
        self.pump(ctx);
    }
}

/// What recovery found, for the owner notice (R18).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskRecovery {
    pub interrupted: i64,
    pub requeued: i64,
    /// Processes of an earlier start that were still alive and were killed.
    pub killed: usize,
}

/// Startup recovery (R21, R38), then start running the queue. Sent once by
/// the app, before ready.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<TaskRecovery, StoreError>")]
pub struct Recover;

impl Handler<Recover> for TaskActor {
    type Result = ResponseActFuture<Self, Result<TaskRecovery, StoreError>>;

    fn handle(&mut self, _: Recover, _: &mut Context<Self>) -> Self::Result {
        let retry: HashMap<String, u32> = self
            .settings
            .defs
            .iter()
            .filter(|(_, d)| d.retry_on_restart)
            .map(|(n, d)| (n.clone(), d.max_attempts))
            .collect();
        // Container tasks survive keel: re-attached, not interrupted.
        let reattach: std::collections::HashSet<String> = if self.container_runner.is_some() {
            self.settings
                .defs
                .iter()
                .filter(|(_, d)| d.kind == TaskKind::Container)
                .map(|(n, _)| n.clone())
                .collect()
        } else {
            Default::default()
        };
        let req = self.store.send(store::RecoverTasks {
            epoch: self.epoch,
            retry,
            reattach,
            instance: self.instance.clone(),
        });
        Box::pin(req.into_actor(self).map(|res, this, ctx| {
            let rec = res.unwrap_or(Err(StoreError::Closed))?;
            // The old groups go before any requeued attempt starts.
            let killed: usize = rec
                .orphans
                .iter()
                .map(|o| {
                    let n = process::stop_orphan_group(o.pid, o.pid_start);
                    if n > 0 {
                        tracing::warn!(
                            task = o.id,
                            pid = o.pid,
                            processes = n,
                            "killed what was left of an interrupted task"
                        );
                    }
                    n
                })
                .sum();
            if let Some(m) = &this.metrics {
                m.interrupted_at_start.inc_by(rec.interrupted.max(0) as u64);
            }
            tracing::info!(
                interrupted = rec.interrupted,
                requeued = rec.requeued,
                killed,
                "tasks recovered"
            );
            let reattached = rec.reattach.len();
            for r in rec.reattach {
                this.launch_reattach(r, ctx);
            }
            if reattached > 0 {
                tracing::info!(reattached, "container tasks re-attached");
            }
            this.recovered = true;
            this.refresh_gauges();
            this.prune();
            this.pump(ctx);
            Ok(TaskRecovery {
                interrupted: rec.interrupted,
                requeued: rec.requeued,
                killed,
            })
        }))
    }
}

/// Queue a task for the CLI (admin socket) or HTTP; the name and the
/// arguments are checked first (a one-line error otherwise).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<i64, SubmitError>")]
pub struct SubmitTask {
    pub name: String,
    pub args: Vec<String>,
    pub origin: Origin,
}

/// Why a task was not queued.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SubmitError {
    #[error("{0}")]
    UnknownTask(String),
    #[error("{0}")]
    BadArgs(String),
    #[error("keel is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Handler<SubmitTask> for TaskActor {
    type Result = ResponseActFuture<Self, Result<i64, SubmitError>>;

    fn handle(&mut self, msg: SubmitTask, _: &mut Context<Self>) -> Self::Result {
        let checked = if self.stopping {
            Err(SubmitError::ShuttingDown)
        } else {
            match self.settings.defs.get(&msg.name) {
                None => Err(SubmitError::UnknownTask(unknown_task(
                    &msg.name,
                    &self.settings.defs,
                ))),
                Some(def) => check_args(&msg.name, def, &msg.args).map_err(SubmitError::BadArgs),
            }
        };
        if let Err(e) = checked {
            return Box::pin(fut::ready(Err(e)));
        }
        let req = self.store.send(CreateTask(NewTask {
            name: msg.name,
            args: msg.args,
            session_id: None,
            origin: msg.origin,
        }));
        Box::pin(req.into_actor(self).map(|res, this, ctx| {
            let id = res.unwrap_or(Err(StoreError::Closed))?;
            this.pump(ctx);
            Ok(id)
        }))
    }
}

/// Cancel a task for the CLI or HTTP.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<CancelOutcome, StoreError>")]
pub struct CancelTask(pub i64);

impl Handler<CancelTask> for TaskActor {
    type Result = ResponseActFuture<Self, Result<CancelOutcome, StoreError>>;

    fn handle(&mut self, msg: CancelTask, _: &mut Context<Self>) -> Self::Result {
        let req = self.store.send(RequestCancel(msg.0));
        Box::pin(req.into_actor(self).map(|res, this, ctx| {
            let out = res.unwrap_or(Err(StoreError::Closed))?;
            this.pump(ctx);
            Ok(out)
        }))
    }
}

/// New settings (SIGHUP reload): tasks started from now on use them.
/// Sent by the lifecycle controller.
#[derive(Clone, Message)]
#[rtype(result = "()")]
pub struct SetTaskSettings(pub TaskSettings);

impl Handler<SetTaskSettings> for TaskActor {
    type Result = ();
    fn handle(&mut self, msg: SetTaskSettings, ctx: &mut Context<Self>) {
        self.settings = msg.0;
        // A higher concurrency may let queued tasks start now.
        self.pump(ctx);
    }
}

/// Shutdown (R33): start nothing more, stop every running task (SIGTERM,
/// SIGKILL after the grace or half the `deadline`, whichever is shorter)
/// and wait until their final states and last output are recorded, or the
/// deadline passes. Returns how many were still running then. Sent by the
/// lifecycle controller before the store closes.
#[derive(Debug, Clone, Message)]
#[rtype(result = "usize")]
pub struct StopTasks {
    pub deadline: Duration,
}

impl Handler<StopTasks> for TaskActor {
    type Result = ResponseActFuture<Self, usize>;

    fn handle(&mut self, msg: StopTasks, _: &mut Context<Self>) -> Self::Result {
        self.stopping = true;
        if let Some(a) = self.admin.take() {
            a.stop();
        }
        let grace = (msg.deadline / 2).min(Duration::from_millis(self.settings.limits.grace_ms));
        for e in self.running.values() {
            let _ = e.stop.send(Some(Stop::Shutdown { grace }));
        }
        let (tx, rx) = oneshot::channel();
        if self.running.is_empty() {
            let _ = tx.send(());
        } else {
            self.drained.push(tx);
        }
        let deadline = msg.deadline;
        Box::pin(
            async move { tokio::time::timeout(deadline, rx).await.is_ok() }
                .into_actor(self)
                .map(|_, this, _| {
                    if !this.running.is_empty() {
                        tracing::warn!(
                            running = this.running.len(),
                            "tasks still stopping at the drain deadline; the next start marks them INTERRUPTED"
                        );
                    }
                    this.running.len()
                }),
        )
    }
}
