//! Child processes of tasks (R45): the `Runner` trait and its process
//! implementation.
//!
//! - Every child is spawned by ONE long-lived thread (`keel-spawner`):
//!   `PR_SET_PDEATHSIG` fires when the *thread* that forked the child
//!   exits, so a pooled blocking thread that retires when idle would kill
//!   healthy children. The spawner lives as long as the runner.
//! - Each child gets its own process group (`setpgid(0, 0)`) and
//!   `PR_SET_PDEATHSIG = SIGKILL` in `pre_exec`, then checks that keel did
//!   not die between fork and prctl. stdin is /dev/null; the environment is
//!   exactly the map given (keel adds PATH and LANG).
//! - A waiter thread per child waits with `waitid(WNOWAIT)`: it reports the
//!   exit without reaping, so while keel still signals the group (leftover
//!   grandchildren) the leader's pid — and with it the group id — cannot be
//!   reused. The leader is reaped only when the supervisor is done.
//! - Identity: pid + start time (field 22 of `/proc/PID/stat`), recorded in
//!   the store, so recovery never signals a recycled pid.

use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Mutex;

use futures::future::BoxFuture;
use tokio::io::AsyncRead;
use tokio::sync::oneshot;

/// What to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpawnSpec {
    pub program: String,
    pub args: Vec<String>,
    pub cwd: PathBuf,
    /// The whole environment of the child.
    pub env: Vec<(String, String)>,
    /// Set for `kind = "container"`: run `program args…` in this image.
    pub container: Option<ContainerSpawn>,
}

/// What a container task needs besides argv and env.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerSpawn {
    pub task_id: i64,
    pub task_name: String,
    pub image: String,
}

/// How the main process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitInfo {
    Code(i32),
    Signal(i32),
    /// The wait itself failed (should not happen).
    Unknown,
}

/// Signals and checks on a running task's processes.
pub trait Control: Send + Sync {
    /// `(pid, start time)` to record in the store.
    fn identity(&self) -> (i64, i64);
    /// Ask every process of the task to stop (SIGTERM to the group).
    fn terminate(&self);
    /// Stop every process of the task now (SIGKILL to the group).
    fn kill(&self);
    /// Processes of the task still alive besides its (exited) main one.
    fn leftovers(&self) -> usize;
}

/// Output of a child: a pipe read with back-pressure.
pub type Output = Box<dyn AsyncRead + Send + Unpin>;

/// Given the bytes of stdout and stderr read so far, where the output
/// stands in its source (a container's log; see `tasks/container.rs`).
pub type ResumeAt = Box<dyn Fn([u64; 2]) -> Option<String> + Send>;

/// A started task.
pub struct Child {
    pub stdout: Output,
    pub stderr: Output,
    /// Resolves when the main process exited (not reaped yet).
    pub exited: oneshot::Receiver<ExitInfo>,
    pub control: Box<dyn Control>,
    /// Dropping (or sending) lets the waiter reap the main process.
    pub reap: oneshot::Sender<()>,
    /// Containers: the resume point stored with each batch of output.
    pub resume_at: Option<ResumeAt>,
}

/// Starts tasks: processes here, containers in `tasks/container.rs`.
pub trait Runner: Send + Sync + 'static {
    fn spawn(&self, spec: SpawnSpec) -> BoxFuture<'static, io::Result<Child>>;

    /// Take over a task an earlier keel started, skipping the output
    /// already stored: after `resume` (the newest stored resume point) when
    /// there is one, else the first `skip` bytes. `None`: it cannot be re-attached
    /// (processes die with keel; a container that is gone).
    fn attach(
        &self,
        _spec: SpawnSpec,
        _skip: u64,
        _resume: Option<String>,
    ) -> BoxFuture<'static, io::Result<Option<Child>>> {
        Box::pin(async { Ok(None) })
    }
}

/// What the spawner thread hands back (converted to async pipes by the caller,
/// which runs on the actor runtime).
struct Raw {
    pid: i32,
    start: u64,
    stdout: OwnedFd,
    stderr: OwnedFd,
    exited: oneshot::Receiver<ExitInfo>,
    reap: oneshot::Sender<()>,
}

type Request = (SpawnSpec, oneshot::Sender<io::Result<Raw>>);

/// Capacity asked for each output pipe (the kernel default is 64 KiB).
const PIPE_BYTES: libc::c_int = 1 << 20;

/// The process runner: a handle to the `keel-spawner` thread.
pub struct ProcessRunner {
    tx: Mutex<mpsc::Sender<Request>>,
}

impl ProcessRunner {
    /// Start the spawner thread. It ends when the runner is dropped (after
    /// shutdown stopped every task).
    pub fn start() -> io::Result<ProcessRunner> {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("keel-spawner".into())
            .spawn(move || {
                while let Ok((spec, reply)) = rx.recv() {
                    let _ = reply.send(spawn_now(&spec));
                }
            })?;
        Ok(ProcessRunner { tx: Mutex::new(tx) })
    }
}

impl Runner for ProcessRunner {
    fn spawn(&self, spec: SpawnSpec) -> BoxFuture<'static, io::Result<Child>> {
        let (reply, rx) = oneshot::channel();
        let sent = self
            .tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send((spec, reply))
            .is_ok();
        Box::pin(async move {
            if !sent {
                return Err(io::Error::other("the spawner thread is gone"));
            }
            let raw = rx
                .await
                .map_err(|_| io::Error::other("the spawner thread is gone"))??;
            let pid = raw.pid;
            let control = Box::new(Group {
                pid,
                start: raw.start,
            });
            let pipes = (|| -> io::Result<(Output, Output)> {
                let out = tokio::net::unix::pipe::Receiver::from_owned_fd(raw.stdout)?;
                let err = tokio::net::unix::pipe::Receiver::from_owned_fd(raw.stderr)?;
                Ok((Box::new(out), Box::new(err)))
            })();
            match pipes {
                Ok((stdout, stderr)) => Ok(Child {
                    stdout,
                    stderr,
                    exited: raw.exited,
                    control,
                    reap: raw.reap,
                    resume_at: None,
                }),
                Err(e) => {
                    // Never leave a child nobody watches.
                    control.kill();
                    let _ = raw.reap.send(());
                    Err(e)
                }
            }
        })
    }
}

/// Fork and exec on the spawner thread.
fn spawn_now(spec: &SpawnSpec) -> io::Result<Raw> {
    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&spec.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: getpid has no preconditions.
    let keel = unsafe { libc::getpid() };
    // SAFETY: the closure runs in the child between fork and exec and only
    // calls async-signal-safe functions (setpgid, prctl, getppid, _exit).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setpgid(0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // keel died between fork and prctl: the signal will never come.
            if libc::getppid() != keel {
                libc::_exit(137);
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let pid = child.id() as i32;
    let start = stat(pid).map(|s| s.start).unwrap_or(0);
    let stdout = OwnedFd::from(
        child
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("no stdout pipe"))?,
    );
    let stderr = OwnedFd::from(
        child
            .stderr
            .take()
            .ok_or_else(|| io::Error::other("no stderr pipe"))?,
    );
    // A larger pipe lets a chatty child run on while a batch is committed
    // (fewer stalls on both sides); still a fixed, small bound per task.
    for fd in [&stdout, &stderr] {
        use std::os::fd::AsRawFd;
        // SAFETY: F_SETPIPE_SZ on a pipe we own; failure leaves the default size.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_BYTES) };
    }
    let (exited_tx, exited) = oneshot::channel();
    let (reap, reap_rx) = oneshot::channel::<()>();
    let waiter = std::thread::Builder::new()
        .name(format!("keel-task-{pid}"))
        .spawn(move || {
            let _ = exited_tx.send(wait_no_reap(pid));
            let _ = reap_rx.blocking_recv();
            let _ = child.wait();
        });
    if let Err(e) = waiter {
        // SAFETY: the child is ours and not reaped yet: -pid is its group.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
        return Err(e);
    }
    Ok(Raw {
        pid,
        start,
        stdout,
        stderr,
        exited,
        reap,
    })
}

/// Wait for `pid` to exit without reaping it.
fn wait_no_reap(pid: i32) -> ExitInfo {
    loop {
        // SAFETY: a zeroed siginfo_t is a valid out-parameter for waitid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid writes only into `info`.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if rc == 0 {
            // SAFETY: waitid succeeded for a child, so the status fields are set.
            let status = unsafe { info.si_status() };
            return match info.si_code {
                libc::CLD_EXITED => ExitInfo::Code(status),
                libc::CLD_KILLED | libc::CLD_DUMPED => ExitInfo::Signal(status),
                _ => ExitInfo::Unknown,
            };
        }
        if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return ExitInfo::Unknown;
        }
    }
}

/// A task's process group; the group id is the main process's pid.
struct Group {
    pid: i32,
    start: u64,
}

impl Control for Group {
    fn identity(&self) -> (i64, i64) {
        (i64::from(self.pid), self.start as i64)
    }
    fn terminate(&self) {
        signal_group(self.pid, libc::SIGTERM);
    }
    fn kill(&self) {
        signal_group(self.pid, libc::SIGKILL);
    }
    fn leftovers(&self) -> usize {
        group_members(self.pid, self.pid).len()
    }
}

fn signal_group(pgid: i32, sig: libc::c_int) {
    if pgid > 1 {
        // SAFETY: kill has no memory preconditions; a negative pid names a group.
        unsafe { libc::kill(-pgid, sig) };
    }
}

/// The fields of `/proc/PID/stat` keel uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub state: char,
    pub pgrp: i32,
    /// Start time after boot in clock ticks (field 22).
    pub start: u64,
}

/// Read `/proc/PID/stat`. The command name may hold spaces and parentheses,
/// so the fields are counted from the last `)`.
pub fn stat(pid: i32) -> Option<Stat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state): field N is fields[N - 3].
    Some(Stat {
        state: fields.first()?.chars().next()?,
        pgrp: fields.get(2)?.parse().ok()?,
        start: fields.get(19)?.parse().ok()?,
    })
}

/// Live (non-zombie) processes of group `pgid`, except `except`.
pub fn group_members(pgid: i32, except: i32) -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != except)
        .filter(|&pid| stat(pid).is_some_and(|s| s.pgrp == pgid && s.state != 'Z'))
        .collect()
}

/// After a crash: stop what is left of a task's process group, unless the
/// recorded pid now belongs to someone else. A group id cannot be reused
/// while any process of the group lives, so: a live leader with the
/// recorded start time → ours; a leader with another start time → the old
/// group is gone and the pid recycled, leave it; no leader but members of
/// the group → still ours. Returns how many processes were signalled.
pub fn stop_orphan_group(pid: i64, start: i64) -> usize {
    let Ok(pid) = i32::try_from(pid) else {
        return 0;
    };
    if pid <= 1 {
        return 0;
    }
    let leader = stat(pid);
    let mut members = group_members(pid, pid);
    match leader {
        Some(s) if s.start as i64 != start => return 0,
        Some(s) if s.state != 'Z' => members.push(pid),
        _ => {}
    }
    if !members.is_empty() {
        signal_group(pid, libc::SIGKILL);
    }
    members.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let line =
            "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 987654 1 2 3";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                state: 'S',
                pgrp: 4242,
                start: 987_654
            })
        );
        assert_eq!(parse_stat("garbage"), None);
        let me = stat(std::process::id() as i32).expect("own stat");
        assert!(me.start > 0);
    }
}
