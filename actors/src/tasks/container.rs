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
//!   per stream, `"<ts> <n> <skip> <ts> <n> <skip>"` (stdout, stderr): every
//!   entry of that stream up to its `n`-th one stamped `ts` is stored, plus
//!   `skip` bytes of its next (a read can end mid-entry). Re-attach asks for
//!   logs `since` the earlier second and drops, stream by stream, entries
//!   before `ts` (full nanosecond comparison), the first `n` at `ts`, and
//!   `skip` bytes of the next. The streams are kept apart because they are
//!   read from two pipes: one can be stored further than the other, and a
//!   single point over both would replay what the faster one had stored. A
//!   task stored before resume points falls back to skipping its stored
//!   byte count.
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
                    let from = match resume.as_deref().and_then(Resume::parse) {
                        Some(r) => From::Resume(r),
                        None => From::Bytes(skip),
                    };
                    Ok(Some(attach_child(engine, info.id, from, grace)))
                }
                None => Ok(None),
            }
        })
    }
}

/// Where one stream of a container's log stands: every entry of that
/// stream up to its `n`-th one stamped `ts` (nanoseconds of the Unix epoch;
/// 0 = none yet) is stored, and `skip` bytes of its next one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Point {
    pub ts: i64,
    pub n: u64,
    pub skip: u64,
}

impl Point {
    /// `"<RFC3339Nano> <n> <skip>"`, from three fields.
    fn parse<'a>(it: &mut impl Iterator<Item = &'a str>) -> Option<Point> {
        let ts = parse_ts(it.next()?.as_bytes())?;
        let n = it.next()?.parse().ok()?;
        let skip = it.next()?.parse().ok()?;
        Some(Point { ts, n, skip })
    }

    fn render(&self) -> String {
        let t = chrono::DateTime::from_timestamp_nanos(self.ts);
        format!(
            "{} {} {}",
            t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
            self.n,
            self.skip
        )
    }
}

/// Where a container task's output stands, stdout and stderr each on its
/// own: the two are read from separate pipes and stored as they come, so
/// one stream can be stored further than the other. Kept with the stored
/// batch it describes (`log_fragments.resume`); re-attach reads the
/// engine's log from the earlier of the two and drops what each stream
/// already holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume(pub [Point; 2]);

impl Resume {
    /// `"<stdout point> <stderr point>"`. The first form of the column, one
    /// point over both streams, reads as both at that instant with none of
    /// its lines counted: a line stamped exactly then may be stored twice,
    /// none is lost.
    pub fn parse(s: &str) -> Option<Resume> {
        let mut it = s.split(' ');
        let out = Point::parse(&mut it)?;
        match it.next() {
            None => {
                let p = Point {
                    ts: out.ts,
                    n: 0,
                    skip: 0,
                };
                Some(Resume([p.clone(), p]))
            }
            Some(first) => {
                let mut rest = std::iter::once(first).chain(it);
                let err = Point::parse(&mut rest)?;
                rest.next().is_none().then_some(Resume([out, err]))
            }
        }
    }

    pub fn render(&self) -> String {
        format!("{} {}", self.0[0].render(), self.0[1].render())
    }

    /// The engine's `since` (seconds) that returns every entry not yet
    /// stored on either stream.
    fn since_s(&self) -> i64 {
        self.0[0].ts.min(self.0[1].ts).div_euclid(1_000_000_000)
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
    Resume(Resume),
}

/// Drops from a log read again what a resume point says is stored.
struct Replay {
    /// Per stream, until its first entry past the point.
    points: [Option<Point>; 2],
    /// Entries seen at the point's instant, per stream.
    seen: [u64; 2],
}

impl Replay {
    fn new(from: Option<&Resume>) -> Replay {
        Replay {
            points: from.map_or([None, None], |r| r.0.clone().map(Some)),
            seen: [0; 2],
        }
    }

    /// Whether the entry stamped `ts` on `stream` is still to be stored,
    /// and how many bytes of its start are stored already (`None`: all of
    /// it). Entries without a timestamp are always kept.
    fn admit(&mut self, stream: usize, ts: Option<i64>, len: usize) -> Option<u64> {
        let (Some(p), Some(t)) = (&self.points[stream], ts) else {
            return Some(0);
        };
        if t < p.ts {
            return None;
        }
        if t == p.ts && self.seen[stream] < p.n {
            self.seen[stream] += 1;
            return None;
        }
        // The first entry past the point: its stored start.
        let pre = (p.skip as usize).min(len) as u64;
        self.points[stream] = None;
        Some(pre)
    }
}

/// One entry written to a stream's pipe: `[start, end)` of that stream's
/// bytes here, with `pre` bytes of it skipped before (so not in the pipe).
struct Entry {
    start: u64,
    end: u64,
    pre: u64,
    ts: i64,
}

/// One stream's entries in its pipe not yet read whole, and the point
/// before them.
#[derive(Default)]
struct StreamMarks {
    queue: VecDeque<Entry>,
    done_ts: i64,
    done_n: u64,
}

impl StreamMarks {
    fn point(&mut self, read: u64) -> Point {
        while let Some(e) = self.queue.front() {
            if e.end > read {
                break;
            }
            if self.done_ts == e.ts {
                self.done_n += 1;
            } else {
                self.done_ts = e.ts;
                self.done_n = 1;
            }
            self.queue.pop_front();
        }
        let skip = match self.queue.front() {
            Some(e) if read > e.start => e.pre + read - e.start,
            Some(e) => e.pre,
            None => 0,
        };
        Point {
            ts: self.done_ts,
            n: self.done_n,
            skip,
        }
    }
}

/// Both streams' marks.
struct Marks([StreamMarks; 2]);

impl Marks {
    fn new(from: Option<&Resume>) -> Marks {
        Marks([0, 1].map(|s| StreamMarks {
            queue: VecDeque::new(),
            done_ts: from.map_or(0, |r| r.0[s].ts),
            done_n: from.map_or(0, |r| r.0[s].n),
        }))
    }

    /// The resume point once `read` bytes of each stream are stored;
    /// `None` before anything stamped was read.
    fn at(&mut self, read: [u64; 2]) -> Option<String> {
        let points = [0, 1].map(|s| self.0[s].point(read[s]));
        if points.iter().all(|p| p.ts == 0 && p.skip == 0) {
            return None;
        }
        Some(Resume(points).render())
    }
}

/// What of each log entry goes to its stream's pipe.
struct Feed {
    replay: Replay,
    /// Old rows: bytes of output still to skip.
    left: u64,
    /// Bytes written to each pipe.
    written: [u64; 2],
}

impl Feed {
    fn new(resume: Option<&Resume>, left: u64) -> Feed {
        Feed {
            replay: Replay::new(resume),
            left,
            written: [0; 2],
        }
    }

    /// One entry as the engine sends it (`"<RFC3339Nano> "` then the
    /// bytes): `None` when it is stored already; else the bytes for the
    /// pipe (maybe none) and its mark when it is stamped.
    fn entry(&mut self, stream: usize, mut bytes: Vec<u8>) -> Option<(Vec<u8>, Option<Entry>)> {
        let space = bytes.iter().position(|&b| b == b' ');
        let ts = space.and_then(|i| parse_ts(&bytes[..i]));
        if let (Some(i), Some(_)) = (space, ts) {
            bytes.drain(..=i);
        }
        // `pre`: bytes of this entry stored before, not sent again.
        let mut pre = self.replay.admit(stream, ts, bytes.len())?;
        bytes.drain(..pre as usize);
        if self.left > 0 {
            let n = (self.left as usize).min(bytes.len());
            bytes.drain(..n);
            self.left -= n as u64;
            pre += n as u64;
        }
        let start = self.written[stream];
        self.written[stream] += bytes.len() as u64;
        let mark = ts.map(|ts| Entry {
            start,
            end: self.written[stream],
            pre,
            ts,
        });
        Some((bytes, mark))
    }
}

/// The supervisor's view of a container: its output as two pipes, its exit.
fn attach_child(engine: Arc<dyn Engine>, id: String, from: From, grace: Duration) -> Child {
    let (out_r, mut out_w) = tokio::io::duplex(PIPE_BYTES);
    let (err_r, mut err_w) = tokio::io::duplex(PIPE_BYTES);
    let (exit_tx, exited) = oneshot::channel();
    let (reap, reap_rx) = oneshot::channel::<()>();
    let (logs_done_tx, logs_done) = oneshot::channel::<()>();
    let (left, resume) = match from {
        From::Start => (0, None),
        From::Bytes(n) => (n, None),
        From::Resume(r) => (0, Some(r)),
    };
    let marks = Arc::new(Mutex::new(Marks::new(resume.as_ref())));
    {
        let engine = engine.clone();
        let id = id.clone();
        let marks = marks.clone();
        tokio::spawn(async move {
            let since = resume.as_ref().map(Resume::since_s);
            let mut feed = Feed::new(resume.as_ref(), left);
            let mut logs = engine.logs_stamped(&id, since);
            while let Some(item) = logs.next().await {
                let Ok((is_err, bytes)) = item else { break };
                let stream = usize::from(is_err);
                let Some((bytes, mark)) = feed.entry(stream, bytes) else {
                    continue;
                };
                if let Some(e) = mark {
                    marks.lock().unwrap_or_else(|e| e.into_inner()).0[stream]
                        .queue
                        .push_back(e);
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

#[cfg(test)]
mod tests {
    use super::*;

    const T: i64 = 1_767_225_600_000_000_000;

    /// An interleaved log with several entries at one instant on both
    /// streams, as the engine sends it.
    fn log() -> Vec<(usize, Vec<u8>)> {
        let e = |s: usize, dt: i64, text: &str| {
            let t = chrono::DateTime::from_timestamp_nanos(T + dt)
                .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
            (s, format!("{t} {text}").into_bytes())
        };
        vec![
            e(0, 0, "o1\n"),
            e(1, 0, "e1\n"),
            e(0, 0, "o2\n"),
            e(1, 7, "e2\n"),
            e(0, 1_000_000_000, "o3\n"),
            e(0, 1_000_000_000, "o4\n"),
            e(1, 1_000_000_000, "e3\n"),
            e(1, 2_500_000_000, "e4\n"),
            e(0, 2_500_000_000, "o5\n"),
        ]
    }

    /// Feed the log from `resume`: the bytes each pipe gets, and the marks.
    fn feed(resume: Option<&Resume>) -> ([Vec<u8>; 2], Marks) {
        let mut f = Feed::new(resume, 0);
        let mut marks = Marks::new(resume);
        let mut pipes = [Vec::new(), Vec::new()];
        for (s, bytes) in log() {
            if let Some((b, mark)) = f.entry(s, bytes) {
                pipes[s].extend_from_slice(&b);
                if let Some(m) = mark {
                    marks.0[s].queue.push_back(m);
                }
            }
        }
        (pipes, marks)
    }

    /// Every pair of read positions (each stream read to its own point, as
    /// the two pipes are), at two successive kills: what was stored plus
    /// what re-attach delivers is each stream's output exactly once.
    #[test]
    fn re_attach_from_any_pair_of_read_positions_stores_each_stream_exactly_once() {
        let (full, _) = feed(None);
        let mut checked = 0;
        for a0 in 0..=full[0].len() {
            for a1 in 0..=full[1].len() {
                let (_, mut marks) = feed(None);
                let stored = [full[0][..a0].to_vec(), full[1][..a1].to_vec()];
                let Some(point) = marks.at([a0 as u64, a1 as u64]) else {
                    assert_eq!((a0, a1), (0, 0), "no point after reading");
                    continue;
                };
                let resume = Resume::parse(&point).expect(&point);
                assert_eq!(resume.render(), point);
                let (rest, _) = feed(Some(&resume));
                for s in 0..2 {
                    assert_eq!(
                        [stored[s].clone(), rest[s].clone()].concat(),
                        full[s],
                        "stream {s} after a kill at {a0}/{a1} ({point})"
                    );
                }
                // A second kill after re-attach, at every pair again.
                for b0 in 0..=rest[0].len() {
                    for b1 in 0..=rest[1].len() {
                        let (_, mut marks) = feed(Some(&resume));
                        let p2 = marks
                            .at([b0 as u64, b1 as u64])
                            .expect("a point after a resume");
                        let (rest2, _) = feed(Some(&Resume::parse(&p2).expect(&p2)));
                        for s in 0..2 {
                            let b = if s == 0 { b0 } else { b1 };
                            assert_eq!(
                                [stored[s].clone(), rest[s][..b].to_vec(), rest2[s].clone()]
                                    .concat(),
                                full[s],
                                "stream {s}: kills at {a0}/{a1} then {b0}/{b1} ({point} → {p2})"
                            );
                        }
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 1000, "{checked}");
    }

    /// The column's first form (one point over both streams) still
    /// re-attaches: nothing lost, at most the lines of that instant twice.
    #[test]
    fn a_single_point_of_the_first_form_loses_nothing() {
        let ts = chrono::DateTime::from_timestamp_nanos(T + 1_000_000_000)
            .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
        let r = Resume::parse(&format!("{ts} 2 1")).expect("first form");
        assert_eq!(r.0[0], r.0[1]);
        assert_eq!((r.0[0].n, r.0[0].skip), (0, 0));
        let (rest, _) = feed(Some(&r));
        assert_eq!(rest[0], b"o3\no4\no5\n");
        assert_eq!(rest[1], b"e3\ne4\n");
        for bad in [
            "",
            "x 1 2",
            &format!("{ts} 1"),
            &format!("{ts} 1 2 {ts} 1"),
            &format!("{ts} 1 2 {ts} 1 2 3"),
        ] {
            assert!(Resume::parse(bad).is_none(), "{bad:?}");
        }
    }
}
