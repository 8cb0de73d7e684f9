//! One attempt of one task, from spawn to its final state (R19, R20, R45).
//!
//! The supervisor reads the child's stdout and stderr in chunks into one
//! batch, and writes the batch to the store every `log_flush_ms` or as soon
//! as it holds `log_batch_bytes`. At most one batch is being written while
//! the next fills; when that one is full too, the pipes are not read until
//! the write returns, so a child that writes faster than the store commits
//! blocks on its pipe (back-pressure) and memory stays bounded whatever it
//! writes. Past `max_log_bytes` output is still read (the child never
//! blocks for good) but counted and dropped; the log ends with a marker
//! saying how much.
//!
//! Stopping (cancel, timeout, shutdown): SIGTERM to the process group,
//! SIGKILL `grace` later. When the main process exits, processes it left in
//! its group are stopped the same way. The final state is written once all
//! output is flushed; the chat that asked is told in the same unit of work.

use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tokio::time::{sleep_until, Instant};

use super::process::{Child, ExitInfo, Output, ResumeAt};
use crate::error::StoreError;
use crate::persistence::tasks::{AppendLogs, Finish, FinishTask, Fragment, TaskState};
use crate::persistence::PersistenceActor;

/// Bytes read from a pipe at a time.
const CHUNK: usize = 256 * 1024;
/// Output kept in memory for the end-of-task notice.
const TAIL_BYTES: usize = 2_048;
/// After the task's processes are gone, how long the last bytes may take.
const DRAIN: Duration = Duration::from_secs(1);
/// How often a group with leftover processes is looked at.
const GROUP_POLL: Duration = Duration::from_millis(50);

/// Why keel stops a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Cancel,
    /// keel shuts down; SIGKILL after `grace` (may be shorter than the
    /// configured grace, to fit the drain deadline).
    Shutdown {
        grace: Duration,
    },
}

/// Everything one attempt needs.
#[derive(Clone)]
pub struct Attempt {
    pub id: i64,
    pub name: String,
    pub attempt: i64,
    pub epoch: i64,
    pub next_seq: i64,
    /// Output stored by earlier attempts (the cap is per task).
    pub stored: u64,
    pub timeout: Option<Duration>,
    pub grace: Duration,
    pub flush_every: Duration,
    pub batch_bytes: usize,
    pub max_log_bytes: u64,
    /// Requeue when stopped by a shutdown (`retry_on_restart`, attempts left).
    pub retry: bool,
    /// Tell the task's chat when it ends (`Some(deliver)`).
    pub notice: Option<bool>,
    /// Counts captured bytes (`/metrics`).
    pub captured: Option<prometheus::IntCounter>,
}

/// How an attempt ended (after its final state is durable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub id: i64,
    pub state: TaskState,
    pub exit_code: Option<i64>,
}

struct Capture {
    batch: Vec<Fragment>,
    batch_len: usize,
    next_seq: i64,
    stored: u64,
    max: u64,
    dropped: [u64; 2],
    tail: Vec<u8>,
    captured: Option<prometheus::IntCounter>,
    /// Bytes read per stream (kept or dropped) and where that stands.
    read: [u64; 2],
    resume_at: Option<ResumeAt>,
}

const STREAMS: [&str; 2] = ["stdout", "stderr"];

impl Capture {
    fn take(&mut self, stream: usize, data: &[u8]) {
        self.read[stream] += data.len() as u64;
        self.tail.extend_from_slice(data);
        if self.tail.len() > TAIL_BYTES * 2 {
            let cut = self.tail.len() - TAIL_BYTES;
            self.tail.drain(..cut);
        }
        let room = self.max.saturating_sub(self.stored) as usize;
        let keep = room.min(data.len());
        self.dropped[stream] += (data.len() - keep) as u64;
        if keep == 0 {
            return;
        }
        self.stored += keep as u64;
        self.batch_len += keep;
        if let Some(c) = &self.captured {
            c.inc_by(keep as u64);
        }
        match self.batch.last_mut() {
            Some(f) if f.stream == STREAMS[stream] => f.bytes.extend_from_slice(&data[..keep]),
            _ => {
                self.batch.push(Fragment {
                    seq: self.next_seq,
                    stream: STREAMS[stream],
                    bytes: data[..keep].to_vec(),
                    resume: None,
                });
                self.next_seq += 1;
            }
        }
    }

    fn split(&mut self) -> Vec<Fragment> {
        self.batch_len = 0;
        let mut out = std::mem::take(&mut self.batch);
        if let (Some(f), Some(at)) = (out.last_mut(), &self.resume_at) {
            f.resume = at(self.read);
        }
        out
    }

    /// The truncation markers, one per stream that lost bytes.
    fn markers(&mut self) -> Vec<Fragment> {
        let mut out = Vec::new();
        for (i, &n) in self.dropped.iter().enumerate() {
            if n > 0 {
                out.push(Fragment {
                    seq: self.next_seq,
                    stream: STREAMS[i],
                    bytes: format!(
                        "\n[keel: output truncated at max_log_bytes = {}; {n} more bytes of {} dropped]\n",
                        self.max, STREAMS[i]
                    )
                    .into_bytes(),
                    resume: None,
                });
                self.next_seq += 1;
            }
        }
        out
    }

    /// The last few lines, for the chat.
    fn last_lines(&self) -> String {
        let text = String::from_utf8_lossy(&self.tail);
        let lines: Vec<&str> = text.trim_end().lines().collect();
        let start = lines.len().saturating_sub(5);
        let mut out = lines[start..].join("\n");
        if out.chars().count() > 500 {
            out = out
                .chars()
                .rev()
                .take(500)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
        }
        out
    }
}

async fn read_some(pipe: &mut Option<Output>, buf: &mut [u8]) -> std::io::Result<usize> {
    match pipe {
        Some(p) => p.read(buf).await,
        None => std::future::pending().await,
    }
}

type Flight = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

async fn in_flight(f: &mut Option<Flight>) {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

async fn at(deadline: Option<Instant>) {
    match deadline {
        Some(d) => sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Write one batch, retrying while storage is failing (the pipes are not
/// read meanwhile: the child waits instead of keel buffering).
fn flush(store: &Addr<PersistenceActor>, id: i64, fragments: Vec<Fragment>) -> Flight {
    let store = store.clone();
    let fragments = Arc::new(fragments);
    Box::pin(async move {
        let mut delay = Duration::from_millis(100);
        loop {
            let msg = AppendLogs {
                id,
                fragments: fragments.clone(),
            };
            match store.send(msg).await.unwrap_or(Err(StoreError::Closed)) {
                Ok(()) => return,
                Err(e) if e.is_transient() && !matches!(e, StoreError::Closed) => {
                    tracing::warn!(task = id, error = %e, "cannot store task output; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    tracing::error!(task = id, error = %e, "task output lost");
                    return;
                }
            }
        }
    })
}

/// Run an attempt to its end and record the final state.
pub async fn supervise(
    child: Child,
    a: Attempt,
    store: Addr<PersistenceActor>,
    mut stop: watch::Receiver<Option<Stop>>,
) -> Ended {
    let Child {
        stdout,
        stderr,
        mut exited,
        control,
        reap,
        resume_at,
    } = child;
    let mut pipes = [Some(stdout), Some(stderr)];
    let mut bufs = [vec![0u8; CHUNK], vec![0u8; CHUNK]];
    let mut cap = Capture {
        batch: Vec::new(),
        batch_len: 0,
        next_seq: a.next_seq,
        stored: a.stored,
        max: a.max_log_bytes,
        dropped: [0, 0],
        tail: Vec::new(),
        captured: a.captured.clone(),
        read: [0, 0],
        resume_at,
    };
    let mut flight: Option<Flight> = None;
    let mut tick = tokio::time::interval(a.flush_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let timeout_at = a.timeout.map(|t| Instant::now() + t);
    let mut reason: Option<Stop> = None;
    let mut timed_out = false;
    let mut kill_at: Option<Instant> = None;
    let mut killed = false;
    let mut exit: Option<ExitInfo> = None;
    let mut leftovers = 0usize;
    let mut group_poll: Option<Instant> = None;
    let mut drain_until: Option<Instant> = None;
    let mut pipe_held = false;
    let mut stop_closed = false;
    loop {
        if cap.batch_len >= a.batch_bytes && flight.is_none() {
            flight = Some(flush(&store, a.id, cap.split()));
        }
        let pipes_done = pipes.iter().all(Option::is_none);
        if exit.is_some() && group_poll.is_none() && pipes_done && flight.is_none() {
            break;
        }
        let can_read = cap.batch_len < a.batch_bytes;
        let [p0, p1] = &mut pipes;
        let [b0, b1] = &mut bufs;
        tokio::select! {
            r = read_some(p0, b0), if can_read => match r {
                Ok(0) | Err(_) => pipes[0] = None,
                Ok(n) => cap.take(0, &bufs[0][..n]),
            },
            r = read_some(p1, b1), if can_read => match r {
                Ok(0) | Err(_) => pipes[1] = None,
                Ok(n) => cap.take(1, &bufs[1][..n]),
            },
            _ = in_flight(&mut flight) => flight = None,
            _ = tick.tick() => {
                if flight.is_none() && !cap.batch.is_empty() {
                    flight = Some(flush(&store, a.id, cap.split()));
                }
            }
            info = &mut exited, if exit.is_none() => {
                exit = Some(info.unwrap_or(ExitInfo::Unknown));
                leftovers = control.leftovers();
                if leftovers > 0 {
                    // It left processes behind in its group: stop them too.
                    control.terminate();
                    kill_at = Some(kill_at.unwrap_or_else(|| Instant::now() + a.grace));
                    if killed {
                        control.kill();
                    }
                    group_poll = Some(Instant::now() + GROUP_POLL);
                } else {
                    drain_until = Some(Instant::now() + DRAIN);
                }
            }
            _ = at(timeout_at), if reason.is_none() && exit.is_none() && !timed_out => {
                timed_out = true;
                control.terminate();
                kill_at = Some(Instant::now() + a.grace);
            }
            changed = stop.changed(), if reason.is_none() && !timed_out && !stop_closed => {
                let asked = match changed {
                    Ok(()) => *stop.borrow(),
                    Err(_) => {
                        // The runner is gone: treat it as a shutdown.
                        stop_closed = true;
                        Some(Stop::Shutdown { grace: a.grace })
                    }
                };
                let ending = exit.is_some() && group_poll.is_none();
                if let (Some(s), false) = (asked, ending) {
                    reason = Some(s);
                    let grace = match s {
                        Stop::Shutdown { grace } => grace.min(a.grace),
                        Stop::Cancel => a.grace,
                    };
                    control.terminate();
                    kill_at = Some(Instant::now() + grace);
                }
            }
            _ = at(kill_at), if !killed => {
                killed = true;
                control.kill();
            }
            _ = at(group_poll) => {
                if control.leftovers() == 0 {
                    group_poll = None;
                    drain_until = Some(Instant::now() + DRAIN);
                } else {
                    group_poll = Some(Instant::now() + GROUP_POLL);
                }
            }
            _ = at(drain_until), if !pipes_done => {
                // Someone outside the group holds the pipe open: stop reading.
                pipe_held = true;
                pipes = [None, None];
            }
        }
    }
    // Everything read is written before the final state.
    let mut last = cap.split();
    last.extend(cap.markers());
    let dropped = (cap.dropped[0] + cap.dropped[1]) as i64;
    let exit = exit.unwrap_or(ExitInfo::Unknown);
    let _ = reap.send(());
    let (state, mut detail) = match (reason, timed_out, exit) {
        (Some(Stop::Cancel), _, _) => (TaskState::Cancelled, "cancelled".to_string()),
        (Some(Stop::Shutdown { .. }), _, _) => (
            TaskState::Interrupted,
            "keel shut down while it ran".to_string(),
        ),
        (None, true, _) => (
            TaskState::TimedOut,
            format!(
                "timed out after {}s",
                a.timeout.map(|t| t.as_secs()).unwrap_or(0)
            ),
        ),
        (None, false, ExitInfo::Code(0)) => (TaskState::Succeeded, String::new()),
        (None, false, ExitInfo::Code(c)) => (TaskState::Failed, format!("exit code {c}")),
        (None, false, ExitInfo::Signal(s)) => (TaskState::Failed, format!("killed by signal {s}")),
        (None, false, ExitInfo::Unknown) => (TaskState::Failed, "exit status unknown".to_string()),
    };
    let mut add = |s: String| {
        if !detail.is_empty() {
            detail.push_str("; ");
        }
        detail.push_str(&s);
    };
    if killed && (reason.is_some() || timed_out) && matches!(exit, ExitInfo::Signal(9)) {
        add(format!(
            "it did not stop within {} ms of SIGTERM and was killed",
            a.grace.as_millis()
        ));
    }
    if leftovers > 0 {
        add(format!(
            "it left {leftovers} process(es) running in its group; keel stopped them"
        ));
    }
    if pipe_held {
        add("its output stayed open after it exited (held by a process outside its group)".into());
    }
    if dropped > 0 {
        add(format!("output truncated: {dropped} bytes dropped"));
    }
    let requeue = matches!(reason, Some(Stop::Shutdown { .. })) && a.retry;
    if requeue {
        add("queued again for the next start".into());
    }
    let exit_code = match exit {
        ExitInfo::Code(c) => Some(i64::from(c)),
        _ => None,
    };
    let notice = a.notice.map(|deliver| {
        let mut text = format!("task {} ({}) {}", a.id, a.name, state.as_str());
        if let Some(c) = exit_code {
            text.push_str(&format!(", exit code {c}"));
        }
        if !detail.is_empty() {
            text.push_str(&format!(" ({detail})"));
        }
        let lines = cap.last_lines();
        if !lines.is_empty() {
            text.push_str(":\n");
            text.push_str(&lines);
        }
        (text, deliver)
    });
    let finish = Finish {
        id: a.id,
        state,
        exit_code,
        detail: (!detail.is_empty()).then_some(detail),
        attempt: a.attempt,
        epoch: a.epoch,
        dropped,
        fragments: last,
        requeue,
        notice,
    };
    record_finish(&store, finish).await;
    Ended {
        id: a.id,
        state,
        exit_code,
    }
}

/// Write a final state, retrying while storage is failing (bounded: keel
/// may be shutting down; an unrecorded end is an INTERRUPTED at the next
/// start, never a lost task).
pub async fn record_finish(store: &Addr<PersistenceActor>, finish: Finish) {
    let id = finish.id;
    let mut delay = Duration::from_millis(100);
    for _ in 0..20 {
        match store
            .send(FinishTask(finish.clone()))
            .await
            .unwrap_or(Err(StoreError::Closed))
        {
            Ok(_) => return,
            Err(e) if e.is_transient() && !matches!(e, StoreError::Closed) => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                tracing::error!(task = id, error = %e, "cannot record the end of a task");
                return;
            }
        }
    }
    tracing::error!(
        task = id,
        "gave up recording the end of a task; the next start marks it INTERRUPTED"
    );
}
