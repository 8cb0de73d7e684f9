//! Container tasks (`[task.NAME] kind = "container"`): the [`Runner`] that
//! runs a task as a container on the engine of `[containers]`, through the
//! reaper's `Engine` trait (bollard stays in `containers/docker.rs`).
//!
//! - Name `keel-<instance>-task-<name>-<id>`, labels `keel.kind=task` and
//!   `keel.task=<id>`, no network. A create repeated after a crash meets a
//!   409 and takes the existing container (same task id).
//! - Output: the engine's log stream (stdout/stderr demultiplexed) is
//!   written into two in-memory pipes the supervisor reads like a child's;
//!   the exit code comes from the engine's wait. No PDEATHSIG: when keel is
//!   killed the container keeps running, and at the next start the task is
//!   re-attached ([`Runner::attach`]) instead of being marked INTERRUPTED.
//! - Resuming by timestamp: logs are read with the engine's timestamps
//!   (RFC3339Nano, one per entry). Each stored batch carries a resume point
//!   `"<ts> <n> <skip>"`: every entry up to the `n`-th one stamped `ts` is
//!   stored, plus `skip` bytes of the next (a read can end mid-entry).
//!   Re-attach asks for logs `since` that second and drops entries before
//!   `ts` (full nanosecond comparison), the first `n` at `ts`, and `skip`
//!   bytes of the next. The point is the longest prefix of the log (in the
//!   engine's order) read from both pipes; bytes of the other stream read
//!   past it are replayed again (both pipes are read together, so that is
//!   at most what was in flight at the kill). A task stored before this had
//!   no resume point and falls back to skipping its stored byte count.
//! - Cancel, timeout and shutdown stop the container (SIGTERM, SIGKILL
//!   after the grace); once the supervisor is done it is removed.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;

use std::collections::VecDeque;
use std::sync::Mutex;

use super::process::{Child, Control, ExitInfo, Runner, SpawnSpec};
use crate::containers::engine::{CreateRequest, Engine, EngineError};
use crate::containers::spec::{self, Kind};

/// Bytes buffered per output pipe between the engine and the supervisor.
const PIPE_BYTES: usize = 256 * 1024;

pub struct ContainerRunner {
    engine: Arc<dyn Engine>,
    instance: String,
    grace: Duration,
}

impl ContainerRunner {
    pub fn new(engine: Arc<dyn Engine>, instance: &str, grace: Duration) -> ContainerRunner {
        ContainerRunner {
            engine,
            instance: instance.to_string(),
            grace,
        }
    }
}

fn io_err(e: EngineError) -> io::Error {
    io::Error::other(e.to_string())
}

/// `keel-<instance>-task-<name>-<id>` (task names may hold `.` and capitals;
/// both are valid in container names).
pub fn task_container(instance: &str, name: &str, id: i64) -> String {
    spec::container_name(instance, Kind::Task, name, id)
}

impl Runner for ContainerRunner {
    fn spawn(&self, s: SpawnSpec) -> BoxFuture<'static, io::Result<Child>> {
        let engine = self.engine.clone();
        let instance = self.instance.clone();
        let grace = self.grace;
        Box::pin(async move {
            let c = s
                .container
                .clone()
                .ok_or_else(|| io::Error::other("not a container task"))?;
            spec::check_image(&c.image).map_err(|e| io::Error::other(e.to_string()))?;
            let name = task_container(&instance, &c.task_name, c.task_id);
            let mut labels: HashMap<String, String> = spec::labels(&instance, Kind::Task);
            labels.insert(spec::LABEL_TASK.into(), c.task_id.to_string());
            let mut command = vec![s.program.clone()];
            command.extend(s.args.iter().cloned());
            let req = CreateRequest {
                name: name.clone(),
                image: c.image.clone(),
                command,
                env: s.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
                labels,
                memory: None,
                nano_cpus: None,
                network: None,
                binds: Vec::new(),
            };
            let id = match engine.create(req).await {
                Ok(id) => id,
                Err(EngineError::Conflict(_)) => match engine
                    .inspect(&name)
                    .await
                    .map_err(io_err)?
                {
                    Some(info) if info.label(spec::LABEL_TASK) == Some(&c.task_id.to_string()) => {
                        info.id
                    }
                    _ => return Err(io::Error::other(format!("container name {name} is in use"))),
                },
                Err(EngineError::NotFound(m)) => {
                    return Err(io::Error::other(format!(
                        "image {} not found: {m}",
                        c.image
                    )))
                }
                Err(e) => return Err(io_err(e)),
            };
            engine.start(&id).await.map_err(io_err)?;
            Ok(attach_child(engine, id, From::Start, grace))
        })
    }

    fn attach(
        &self,
        s: SpawnSpec,
        skip: u64,
        resume: Option<String>,
    ) -> BoxFuture<'static, io::Result<Option<Child>>> {
        let engine = self.engine.clone();
        let instance = self.instance.clone();
        let grace = self.grace;
        Box::pin(async move {
            let Some(c) = s.container.clone() else {
                return Ok(None);
            };
            let name = task_container(&instance, &c.task_name, c.task_id);
            match engine.inspect(&name).await.map_err(io_err)? {
                Some(info) => {
                    let from = match resume.as_deref().and_then(Point::parse) {
                        Some(p) => From::Point(p),
                        None => From::Bytes(skip),
                    };
                    Ok(Some(attach_child(engine, info.id, from, grace)))
                }
                None => Ok(None),
            }
        })
    }
}

/// Where a container's log stands: every entry up to the `n`-th one stamped
/// `ts` (nanoseconds of the Unix epoch) is stored, and `skip` bytes of the next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Point {
    pub ts: i64,
    pub n: u64,
    pub skip: u64,
}

impl Point {
    /// `"<RFC3339Nano> <n> <skip>"`.
    pub fn parse(s: &str) -> Option<Point> {
        let mut it = s.split(' ');
        let ts = parse_ts(it.next()?.as_bytes())?;
        let n = it.next()?.parse().ok()?;
        let skip = it.next()?.parse().ok()?;
        Some(Point { ts, n, skip })
    }

    pub fn render(&self) -> String {
        let t = chrono::DateTime::from_timestamp_nanos(self.ts);
        format!(
            "{} {} {}",
            t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
            self.n,
            self.skip
        )
    }
}

/// An engine timestamp (RFC3339, any fraction) as nanoseconds.
fn parse_ts(b: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(b).ok()?;
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()?
        .timestamp_nanos_opt()
}

/// Where the log is read from.
enum From {
    Start,
    /// Old rows: skip this many bytes of output.
    Bytes(u64),
    Point(Point),
}

/// One entry written to a pipe: `[start, end)` of its stream's bytes here,
/// with `pre` bytes of it skipped before (so not in the pipe).
struct Entry {
    stream: usize,
    start: u64,
    end: u64,
    pre: u64,
    ts: i64,
}

/// Entries in the pipes not yet read whole, and the point before them.
struct Marks {
    queue: VecDeque<Entry>,
    done_ts: Option<i64>,
    done_n: u64,
}

impl Marks {
    fn at(&mut self, read: [u64; 2]) -> Option<String> {
        while let Some(e) = self.queue.front() {
            if e.end > read[e.stream] {
                break;
            }
            if self.done_ts == Some(e.ts) {
                self.done_n += 1;
            } else {
                self.done_ts = Some(e.ts);
                self.done_n = 1;
            }
            self.queue.pop_front();
        }
        let skip = match self.queue.front() {
            Some(e) if read[e.stream] > e.start => e.pre + read[e.stream] - e.start,
            Some(e) => e.pre,
            None => 0,
        };
        let p = Point {
            ts: self.done_ts?,
            n: self.done_n,
            skip,
        };
        Some(p.render())
    }
}

/// The supervisor's view of a container: its output as two pipes, its exit.
fn attach_child(engine: Arc<dyn Engine>, id: String, from: From, grace: Duration) -> Child {
    let (out_r, mut out_w) = tokio::io::duplex(PIPE_BYTES);
    let (err_r, mut err_w) = tokio::io::duplex(PIPE_BYTES);
    let (exit_tx, exited) = oneshot::channel();
    let (reap, reap_rx) = oneshot::channel::<()>();
    let (logs_done_tx, logs_done) = oneshot::channel::<()>();
    let (mut left, mut point) = match from {
        From::Start => (0, None),
        From::Bytes(n) => (n, None),
        From::Point(p) => (0, Some(p)),
    };
    let marks = Arc::new(Mutex::new(Marks {
        queue: VecDeque::new(),
        done_ts: point.as_ref().map(|p| p.ts),
        done_n: point.as_ref().map_or(0, |p| p.n),
    }));
    {
        let engine = engine.clone();
        let id = id.clone();
        let marks = marks.clone();
        tokio::spawn(async move {
            let since = point.as_ref().map(|p| p.ts.div_euclid(1_000_000_000));
            let mut logs = engine.logs_stamped(&id, since);
            let mut seen_at_ts = 0u64;
            let mut written = [0u64; 2];
            while let Some(item) = logs.next().await {
                let Ok((is_err, mut bytes)) = item else { break };
                let stream = usize::from(is_err);
                let space = bytes.iter().position(|&b| b == b' ');
                let ts = space.and_then(|i| parse_ts(&bytes[..i]));
                if let (Some(i), Some(_)) = (space, ts) {
                    bytes.drain(..=i);
                }
                let mut pre = 0u64;
                if let (Some(p), Some(t)) = (&mut point, ts) {
                    if t < p.ts {
                        continue;
                    }
                    if t == p.ts && seen_at_ts < p.n {
                        seen_at_ts += 1;
                        continue;
                    }
                    // The first entry past the point: its stored start.
                    let n = (p.skip as usize).min(bytes.len());
                    bytes.drain(..n);
                    pre = n as u64;
                    point = None;
                }
                if left > 0 {
                    let n = (left as usize).min(bytes.len());
                    bytes.drain(..n);
                    left -= n as u64;
                }
                let start = written[stream];
                written[stream] += bytes.len() as u64;
                if let Some(ts) = ts {
                    marks
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .queue
                        .push_back(Entry {
                            stream,
                            start,
                            end: written[stream],
                            pre,
                            ts,
                        });
                }
                if bytes.is_empty() {
                    continue;
                }
                let w = if is_err { &mut err_w } else { &mut out_w };
                if w.write_all(&bytes).await.is_err() {
                    break;
                }
            }
            drop(out_w);
            drop(err_w);
            let _ = logs_done_tx.send(());
        });
    }
    {
        let engine = engine.clone();
        let id = id.clone();
        tokio::spawn(async move {
            let code = engine.wait(&id).await;
            // The exit is reported after the output is in the pipes.
            let _ = tokio::time::timeout(Duration::from_secs(5), logs_done).await;
            let info = match code {
                Ok(c) => ExitInfo::Code(c as i32),
                Err(_) => ExitInfo::Unknown,
            };
            let _ = exit_tx.send(info);
        });
    }
    {
        let engine = engine.clone();
        let id = id.clone();
        tokio::spawn(async move {
            // Dropped or sent: the supervisor is done with it.
            let _ = reap_rx.await;
            if let Err(e) = engine.remove(&id).await {
                tracing::warn!(container = %id, error = %e, "task container not removed");
            }
        });
    }
    Child {
        stdout: Box::new(out_r),
        stderr: Box::new(err_r),
        exited,
        control: Box::new(ContainerControl { engine, id, grace }),
        reap,
        resume_at: Some(Box::new(move |read| {
            marks.lock().unwrap_or_else(|e| e.into_inner()).at(read)
        })),
    }
}

struct ContainerControl {
    engine: Arc<dyn Engine>,
    id: String,
    grace: Duration,
}

impl ContainerControl {
    fn stop(&self, grace_s: i64) {
        let engine = self.engine.clone();
        let id = self.id.clone();
        tokio::spawn(async move {
            if let Err(e) = engine.stop(&id, grace_s).await {
                tracing::warn!(container = %id, error = %e, "task container not stopped");
            }
        });
    }
}

impl Control for ContainerControl {
    /// No process of keel's own: nothing for recovery to signal.
    fn identity(&self) -> (i64, i64) {
        (0, 0)
    }

    fn terminate(&self) {
        // The engine sends SIGTERM, then SIGKILL after the grace.
        self.stop(self.grace.as_secs().max(1) as i64);
    }

    fn kill(&self) {
        self.stop(0);
    }

    fn leftovers(&self) -> usize {
        0
    }
}
