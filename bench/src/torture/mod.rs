//! `keel torture`: the durability battery (TESTING.md C1, C5 and section F),
//! run by users on their own machine against the real binary.
//!
//! The battery starts this very executable as `keel run` on a scratch data
//! dir (or a fresh directory on the disk the user names), drives webhook
//! clients at it (plain messages and `/remind in 1s` reminders), SIGKILLs the
//! whole process group at seeded moments, now and then in restart storms that
//! kill the next starts while they recover, and starts it again. Every
//! operation is written to a Jepsen-style ledger kept *outside* the data dir
//! (`ledger.log` in the battery's scratch dir). At the end keel is started
//! once more and every acknowledged message must be present exactly once,
//! nothing must be present that was never sent, and every acknowledged
//! reminder must have fired exactly once.
//!
//! The schedule (kill moments, storms, which message is a reminder) comes
//! from one seed, printed at the start: `--seed N` replays it. Outcomes still
//! depend on timing, which is the point.
//!
//! Every child is in a process group of its own (killed as a group) and has
//! `PR_SET_PDEATHSIG = SIGKILL`, so nothing outlives the battery.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{BufWriter, IsTerminal, Write};
use std::net::TcpListener;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use hmac::{Hmac, Mac};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::fake_http::Upstream;
use crate::fake_slack::FakeSlack;
use crate::fake_telegram::FakeTelegram;
use crate::messages::{log_tail, nearest_rank, runtime, Scratch};

mod damage;
mod faults;
mod services;
mod storage;
mod tasks;

use damage::{damage_case, Damage, DamageOutcome};
use faults::{fault_case, Fault, FaultOutcome};
use storage::{storage_cases, StorageFigures};

/// How long a start may take to answer `/readyz` with 200.
const READY_DEADLINE: Duration = Duration::from_secs(60);
/// How long the final start may take until every acknowledged reminder fired.
const FIRE_DEADLINE: Duration = Duration::from_secs(60);
/// How long keel may take to exit after the final SIGTERM.
const STOP_DEADLINE: Duration = Duration::from_secs(30);
/// Every n-th message of a client is a reminder.
const REMIND_EVERY: u64 = 8;

/// How hard the battery pushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Profile {
    /// About a minute: CI and a first look (24 cycles).
    Quick,
    /// 200 cycles: a real run on your disk.
    Standard,
    /// 1000 cycles: the soak the README's figures come from.
    Soak,
}

impl Profile {
    fn cycles(self) -> u64 {
        match self {
            Profile::Quick => 24,
            Profile::Standard => 200,
            Profile::Soak => 1000,
        }
    }
}

/// Flags of `keel torture`.
#[derive(Debug, Args)]
pub struct TortureArgs {
    /// quick (24 cycles), standard (200) or soak (1000).
    #[arg(long, value_enum, default_value = "quick")]
    pub profile: Profile,
    /// Kill/restart cycles (overrides the profile).
    #[arg(long)]
    pub cycles: Option<u64>,
    /// Stop starting new cycles after this many seconds (with --cycles, whichever comes first).
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Replay the schedule of an earlier run.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Put keel's data dir in a fresh directory under DIR (to test that disk).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Concurrent webhook clients.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Keep the scratch directory (ledger, logs, data) and print its path.
    #[arg(long)]
    pub keep: bool,
    /// Deploy services on this container engine during the load
    /// (`unix:///path/docker.sock`; needs --image).
    #[arg(long, value_name = "URL")]
    pub docker_host: Option<String>,
    /// A local image with `sleep` for those services (nothing is pulled).
    #[arg(long, value_name = "IMAGE")]
    pub image: Option<String>,
    /// Print the figures as one line of JSON, the last line of stdout.
    #[arg(long)]
    pub json: bool,
    /// The keel binary to torture (default: this executable).
    #[arg(long, hide = true)]
    pub keel_binary: Option<PathBuf>,
    /// Test builds (`--features failpoints`) only: make keel deliberately
    /// wrong, so the battery must report losses.
    #[arg(long = "break", value_enum, hide = true)]
    pub break_: Option<Break>,
}

/// A deliberately broken behaviour of a failpoints build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Break {
    /// The webhook answers 200 before the message is committed.
    AckBeforeCommit,
    /// The webhook stores every delivery under a key of its own (retries
    /// are stored twice).
    ForgetMessageIds,
}

impl Break {
    /// The keel switch that breaks it (`KEEL_FAILPOINTS=<switch>=on`).
    fn switch(self) -> &'static str {
        match self {
            Break::AckBeforeCommit => keel_actors::failpoint::ACK_BEFORE_COMMIT,
            Break::ForgetMessageIds => keel_actors::failpoint::FORGET_MESSAGE_IDS,
        }
    }
}

// ---------------------------------------------------------------------------
// The ledger.

/// What an operation was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A plain webhook message: must be stored once as a user turn.
    Message,
    /// `/remind in 1s note-<id>`: stored once, and its reminder fires once.
    Remind,
}

/// The outcome of an operation as the client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 200: acknowledged; must be present exactly once.
    Ok,
    /// A 4xx: definitely refused; must be absent.
    Fail,
    /// No answer, a transport error or a 5xx: may or may not be present.
    Unknown,
}

/// Jepsen-style record of every operation, mirrored to a file outside the
/// data dir (`invoke ID KIND` / `ok ID` / `fail ID CODE` / `unknown ID`).
pub struct Ledger {
    ops: BTreeMap<String, (Kind, Outcome)>,
    file: Option<BufWriter<File>>,
}

impl Ledger {
    pub fn new(file: Option<File>) -> Ledger {
        Ledger {
            ops: BTreeMap::new(),
            file: file.map(BufWriter::new),
        }
    }

    fn write(&mut self, line: std::fmt::Arguments<'_>) {
        if let Some(f) = &mut self.file {
            if f.write_fmt(line).and_then(|()| f.write_all(b"\n")).is_err() {
                self.file = None;
                eprintln!("keel torture: cannot write the ledger file; keeping it in memory only");
            }
        }
    }

    /// An operation is about to be sent (again, for a retried unknown one).
    pub fn invoke(&mut self, id: &str, kind: Kind) {
        self.write(format_args!("invoke {id} {kind:?}"));
        self.ops
            .entry(id.to_string())
            .or_insert((kind, Outcome::Unknown));
    }

    /// The answer to an operation. An acknowledgement is never taken back.
    pub fn complete(&mut self, id: &str, outcome: Outcome, code: Option<u16>) {
        match (outcome, code) {
            (Outcome::Fail, Some(c)) => self.write(format_args!("fail {id} {c}")),
            (o, _) => self.write(format_args!("{} {id}", format!("{o:?}").to_lowercase())),
        }
        if let Some(op) = self.ops.get_mut(id) {
            if op.1 != Outcome::Ok {
                op.1 = outcome;
            }
        }
    }

    pub fn count(&self, outcome: Outcome) -> u64 {
        self.ops.values().filter(|o| o.1 == outcome).count() as u64
    }

    fn flush(&mut self) {
        if let Some(f) = &mut self.file {
            let _ = f.flush();
        }
    }

    /// Compares the ledger with what the restarted keel reports:
    /// `user_keys` (user turns per message id) and `fires` (reminder
    /// notices per note, the id of the `/remind` message).
    pub fn check(&self, user_keys: &HashMap<String, u64>, fires: &HashMap<String, u64>) -> Verdict {
        let mut v = Verdict {
            invoked: self.ops.len() as u64,
            ..Verdict::default()
        };
        for (id, &(kind, outcome)) in &self.ops {
            let n = user_keys.get(id).copied().unwrap_or(0);
            let f = fires.get(id).copied().unwrap_or(0);
            match outcome {
                Outcome::Ok => {
                    v.acked += 1;
                    if n == 0 {
                        v.lost.push(id.clone());
                    }
                    if kind == Kind::Remind && f == 0 {
                        v.timers_missed.push(id.clone());
                    }
                }
                Outcome::Fail => {
                    v.failed += 1;
                    if n > 0 {
                        v.failed_present.push(id.clone());
                    }
                }
                Outcome::Unknown => {
                    v.unknown += 1;
                    if n > 0 {
                        v.recovered += 1;
                    }
                }
            }
            if n > 1 {
                v.dup.push(id.clone());
            }
            if f > 0 {
                v.timers_fired += 1;
            }
            if f > 1 {
                v.timers_double.push(id.clone());
            }
            if f > 0 && (kind != Kind::Remind || n == 0) {
                // A reminder fired for a message that was no reminder, or
                // whose creating message is not in the store.
                v.unexpected.push(format!("fire of {id}"));
            }
        }
        for (key, n) in user_keys {
            if !self.ops.contains_key(key) {
                v.unexpected.push(format!("{key} (x{n})"));
            }
        }
        for (note, n) in fires {
            if !self.ops.contains_key(note) {
                v.unexpected.push(format!("fire of {note} (x{n})"));
            }
        }
        v
    }
}

/// What the ledger check found.
#[derive(Debug, Default)]
pub struct Verdict {
    pub invoked: u64,
    pub acked: u64,
    pub failed: u64,
    pub unknown: u64,
    /// Unknown outcome, present after recovery.
    pub recovered: u64,
    /// Acknowledged but absent.
    pub lost: Vec<String>,
    /// Present more than once.
    pub dup: Vec<String>,
    /// Present but never sent (or a fire nobody asked for).
    pub unexpected: Vec<String>,
    /// Refused (4xx) but present.
    pub failed_present: Vec<String>,
    /// Reminders that fired (at least once).
    pub timers_fired: u64,
    /// Reminders that fired more than once.
    pub timers_double: Vec<String>,
    /// Acknowledged reminders that never fired.
    pub timers_missed: Vec<String>,
}

impl Verdict {
    /// Every loss counter is zero.
    pub fn clean(&self) -> bool {
        self.lost.is_empty()
            && self.dup.is_empty()
            && self.unexpected.is_empty()
            && self.failed_present.is_empty()
            && self.timers_double.is_empty()
            && self.timers_missed.is_empty()
    }
}

// ---------------------------------------------------------------------------
// Telegram and Slack through the fake upstreams.

/// What the final check found for one channel fed by a fake upstream.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ChannelVerdict {
    /// Messages the fake fed.
    pub fed: u64,
    /// Of those, confirmed by keel to the upstream.
    pub acked: u64,
    /// Confirmed but not stored.
    pub lost: Vec<String>,
    /// Stored more than once.
    pub dup: Vec<String>,
    /// Stored under a key the fake never fed.
    pub unexpected: Vec<String>,
    /// Stored but no reply reached its chat.
    pub unanswered: Vec<String>,
    /// Telegram offsets below one keel had already sent.
    pub offset_regressions: u64,
    /// Replies beyond the first for a message (at-least-once after a kill).
    pub replies_resent: u64,
    /// Slack envelopes sent again after their socket died unacked.
    pub redelivered: u64,
    /// Replies that named no message of their chat (not a loss).
    pub stray_replies: u64,
}

impl ChannelVerdict {
    /// Findings that fail the run: lost, dup, unexpected, unanswered and
    /// offset regressions.
    pub fn losses(&self) -> u64 {
        (self.lost.len() + self.dup.len() + self.unexpected.len() + self.unanswered.len()) as u64
            + self.offset_regressions
    }
}

/// Compares a fake upstream's ledger with the user turns keel stored for
/// that channel (per key).
pub fn check_channel(up: &Upstream, stored: &HashMap<String, u64>) -> ChannelVerdict {
    let mut v = ChannelVerdict {
        fed: up.fed.len() as u64,
        offset_regressions: up.offset_regressions,
        redelivered: up.redelivered,
        stray_replies: up.stray_replies,
        ..ChannelVerdict::default()
    };
    for f in &up.fed {
        let n = stored.get(&f.key).copied().unwrap_or(0);
        let replies = up.replies.get(&f.tag).copied().unwrap_or(0);
        if f.acked {
            v.acked += 1;
            if n == 0 {
                v.lost.push(f.tag.clone());
            }
        }
        if n > 1 {
            v.dup.push(f.tag.clone());
        }
        if n > 0 && replies == 0 {
            v.unanswered.push(f.tag.clone());
        }
        v.replies_resent += replies.saturating_sub(1);
    }
    let fed: std::collections::HashSet<&str> = up.fed.iter().map(|f| f.key.as_str()).collect();
    for (key, n) in stored {
        if !fed.contains(key.as_str()) {
            v.unexpected.push(format!("{key} (x{n})"));
        }
    }
    v
}

/// The fake Telegram and Slack the battery's keel talks to, for the whole run.
struct Upstreams {
    telegram: FakeTelegram,
    slack: FakeSlack,
}

impl Upstreams {
    /// Both fakes, each fed [`CHANNEL_FEED`] messages per 100 ms; the
    /// tokens carry the canary (keel must never log them).
    fn start(canary: &str) -> Result<Upstreams> {
        let t = tokens(canary);
        Ok(Upstreams {
            telegram: FakeTelegram::start(&t.telegram, CHANNEL_FEED)?,
            slack: FakeSlack::start(&t.slack_app, &t.slack_bot, CHANNEL_FEED)?,
        })
    }

    /// The `[telegram]` and `[slack]` sections of the battery's keel.toml.
    fn config(&self, canary: &str) -> String {
        let t = tokens(canary);
        format!(
            "\n[telegram]\nenabled = true\napi_base = \"{}\"\ntoken = \"{}\"\n\
             poll_timeout_s = 1\nrequest_margin_s = 1\n\n\
             [slack]\nenabled = true\napi_base = \"{}\"\napp_token = \"{}\"\n\
             bot_token = \"{}\"\nsilence_timeout_s = 10\n",
            self.telegram.api_base, t.telegram, self.slack.api_base, t.slack_app, t.slack_bot
        )
    }

    fn stop_feeding(&self) {
        self.telegram.stop_feeding();
        self.slack.stop_feeding();
    }

    fn freeze(&self) {
        self.telegram.freeze();
        self.slack.freeze();
    }
}

/// Messages each fake upstream feeds per 100 ms.
const CHANNEL_FEED: usize = 2;

/// The channel tokens of a run, each carrying the canary.
struct Tokens {
    telegram: String,
    slack_app: String,
    slack_bot: String,
}

fn tokens(canary: &str) -> Tokens {
    Tokens {
        telegram: format!("4242:{canary}"),
        slack_app: format!("xapp-{canary}"),
        slack_bot: format!("xoxb-{canary}"),
    }
}

// ---------------------------------------------------------------------------
// The keel under torture.

/// One `keel run` child in a process group of its own.
struct Child_ {
    child: Child,
    pid: i32,
    base: String,
    started: Instant,
}

/// How every start of keel is made.
struct Launcher {
    binary: PathBuf,
    data_dir: PathBuf,
    config: PathBuf,
    log: PathBuf,
    starts: u64,
    /// Start keel with SIGXFSZ ignored (the RLIMIT_FSIZE case).
    ignore_sigxfsz: bool,
    /// `KEEL_FAILPOINTS` switches every start gets (`--break`).
    switches: Option<String>,
    /// `KEEL_TORTURE_STORAGE`: the storage fault every start gets.
    storage: Option<String>,
}

impl Launcher {
    fn spawn(&mut self) -> Result<Child_> {
        self.spawn_armed(None)
    }

    /// A start with the named kill point `arm` (`NAME=N[@MS]`) armed.
    fn spawn_armed(&mut self, arm: Option<&str>) -> Result<Child_> {
        let addr = {
            let l = TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
            l.local_addr().context("cannot find a free port")?
        };
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        let log2 = log
            .try_clone()
            .with_context(|| format!("cannot reopen {}", self.log.display()))?;
        let mut cmd = Command::new(&self.binary);
        cmd.arg("run")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--config")
            .arg(&self.config)
            .arg("--listen")
            .arg(addr.to_string())
            .env_remove("RUST_LOG")
            .env_remove("KEEL_CONFIG")
            .env_remove("KEEL_DATA_DIR")
            .env_remove("KEEL_LISTEN")
            .env_remove("KEEL_FAILPOINTS")
            .env_remove(keel_actors::persistence::faultfs::ENV)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0);
        let spec: Vec<&str> = self.switches.as_deref().into_iter().chain(arm).collect();
        if !spec.is_empty() {
            cmd.env("KEEL_FAILPOINTS", spec.join(","));
        }
        if let Some(storage) = &self.storage {
            cmd.env(keel_actors::persistence::faultfs::ENV, storage);
        }
        // SAFETY: prctl(2) is async-signal-safe; nothing else runs between
        // fork and exec. The child gets SIGKILL when this thread exits.
        let ignore_sigxfsz = self.ignore_sigxfsz;
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if ignore_sigxfsz {
                    // An ignored disposition survives execve.
                    libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                }
                Ok(())
            });
        }
        let started = Instant::now();
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", self.binary.display()))?;
        self.starts += 1;
        let pid = i32::try_from(child.id()).context("keel's pid does not fit a pid_t")?;
        Ok(Child_ {
            child,
            pid,
            base: format!("http://{addr}"),
            started,
        })
    }
}

impl Child_ {
    /// SIGKILL the whole process group and reap keel.
    fn kill(&mut self) -> Result<()> {
        // SAFETY: kill(2) on the process group of a child we spawned (its
        // pgid is its pid) and have not reaped yet.
        unsafe { libc::kill(-self.pid, libc::SIGKILL) };
        self.child.wait().context("reaping keel")?;
        Ok(())
    }

    /// Whether keel has exited, killed by SIGKILL (its own kill point).
    fn died_of_sigkill(&mut self) -> bool {
        use std::os::unix::process::ExitStatusExt;
        matches!(self.child.try_wait(), Ok(Some(s)) if s.signal() == Some(libc::SIGKILL))
    }

    /// SIGTERM and wait for the exit: clean, or SIGKILLed by an armed
    /// kill point. Anything else is a failure.
    async fn stop(&mut self, log: &Path) -> Result<()> {
        // SAFETY: kill(2) on the child we spawned and have not reaped.
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().context("waiting for keel")? {
                if status.success() || self.died_of_sigkill() {
                    return Ok(());
                }
                bail!(
                    "keel's SIGTERM stop exited with {status}; its log:\n{}",
                    log_tail(log)
                );
            }
            if Instant::now() >= deadline {
                self.kill()?;
                bail!("keel did not stop within {STOP_DEADLINE:?} of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Peak RSS of keel so far, KiB (VmHWM), if readable.
    fn peak_rss_kib(&self) -> Option<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    }

    /// Poll `/readyz` until 200; the time from spawn to ready.
    async fn wait_ready(&mut self, http: &reqwest::Client, log: &Path) -> Result<Duration> {
        let deadline = self.started + READY_DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().context("waiting for keel")? {
                bail!(
                    "keel exited with {status} before it was ready; its log:\n{}",
                    log_tail(log)
                );
            }
            if let Ok(r) = http.get(format!("{}/readyz", self.base)).send().await {
                if r.status() == reqwest::StatusCode::OK {
                    return Ok(self.started.elapsed());
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "keel was not ready within {READY_DEADLINE:?}; its log:\n{}",
                    log_tail(log)
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for Child_ {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.kill();
        }
    }
}

// ---------------------------------------------------------------------------
// Load.

/// What the clients saw, besides the ledger.
#[derive(Default)]
struct Seen {
    /// Non-200 answers by status code.
    rejections: BTreeMap<u16, u64>,
    /// Transport errors (no answer).
    errors: u64,
}

/// A webhook client: its chat, its message counter and the operation whose
/// outcome it never learnt (retried with the same id on the next cycle, so
/// keel's idempotency is under test too).
struct Client {
    index: usize,
    n: u64,
    retry: Option<(String, String, Kind)>,
}

/// `sha256=<hex HMAC-SHA256(secret, body)>`, the `X-Keel-Signature` value.
fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("hmac takes any key");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// What every client of one cycle shares.
struct Cycle<'a> {
    cycle: u64,
    http: &'a reqwest::Client,
    url: &'a str,
    secret: &'a str,
    ledger: &'a RefCell<Ledger>,
    seen: &'a RefCell<Seen>,
    stop: &'a Cell<bool>,
}

/// One client in a closed loop until `stop` is set.
async fn client_loop(c: &mut Client, cx: &Cycle<'_>) {
    let Cycle {
        cycle,
        http,
        url,
        secret,
        ledger,
        seen,
        stop,
    } = *cx;
    while !stop.get() {
        let (id, text, kind) = match c.retry.take() {
            Some(op) => op,
            None => {
                let id = format!("k{cycle}c{}n{}", c.index, c.n);
                c.n += 1;
                if c.n.is_multiple_of(REMIND_EVERY) {
                    let text = format!("/remind in 1s note-{id}");
                    (id, text, Kind::Remind)
                } else {
                    let text = format!("hello {id}");
                    (id, text, Kind::Message)
                }
            }
        };
        let body = json!({
            "id": id,
            "chat": format!("torture-{}", c.index),
            "from": format!("u{}", c.index),
            "text": text,
        });
        let body = serde_json::to_vec(&body).expect("a JSON value serializes");
        ledger.borrow_mut().invoke(&id, kind);
        let answer = http
            .post(url)
            .header("content-type", "application/json")
            .header("x-keel-signature", sign(secret, &body))
            .body(body)
            .send()
            .await;
        let answer = match answer {
            Ok(r) => {
                let status = r.status().as_u16();
                r.bytes().await.map(|_| status)
            }
            Err(e) => Err(e),
        };
        match answer {
            Ok(200) => ledger.borrow_mut().complete(&id, Outcome::Ok, None),
            Ok(code) => {
                *seen.borrow_mut().rejections.entry(code).or_insert(0) += 1;
                if (400..500).contains(&code) {
                    ledger.borrow_mut().complete(&id, Outcome::Fail, Some(code));
                } else {
                    ledger.borrow_mut().complete(&id, Outcome::Unknown, None);
                    c.retry = Some((id, text, kind));
                }
            }
            Err(_) => {
                seen.borrow_mut().errors += 1;
                ledger.borrow_mut().complete(&id, Outcome::Unknown, None);
                c.retry = Some((id, text, kind));
                // keel went away: do not spin until the stop flag is seen.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The schedule.

/// One cycle's plan, all drawn from the seed before the cycle runs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CyclePlan {
    /// Milliseconds of load after ready before the SIGKILL.
    kill_after_ms: u64,
    /// Starts killed while they recover (restart storm), ms after spawn.
    storm_ms: Vec<u64>,
    /// A named kill point armed in this cycle's start (failpoints builds).
    arm: Option<ArmPlan>,
}

/// A named kill point armed for one start (TESTING.md C2).
#[derive(Debug, Clone, PartialEq, Eq)]
struct ArmPlan {
    point: &'static str,
    /// Killed at the `at`-th hit …
    at: u64,
    /// … by a thread of its own `delay_ms` later (0: at once).
    delay_ms: u64,
}

impl ArmPlan {
    /// The `KEEL_FAILPOINTS` entry.
    fn spec(&self) -> String {
        format!("{}={}@{}", self.point, self.at, self.delay_ms)
    }

    /// The checkpoint point is reached by the SIGTERM stop (and a large
    /// WAL): the cycle ends with SIGTERM instead of SIGKILL.
    fn stops_with_sigterm(&self) -> bool {
        self.point == "mid_checkpoint"
    }
}

/// The kill points the cycles arm, in turn (`container_create` needs an
/// engine; `mid_migration` has cases of its own on fresh stores).
const CYCLE_POINTS: [&str; 5] = [
    "commit_before_reply",
    "reply_before_poll",
    "timer_fire",
    "startup_recovery",
    "mid_checkpoint",
];

/// Every second cycle of a failpoints build arms the next point of
/// [`CYCLE_POINTS`], at a drawn hit.
fn draw_arm(rng: &mut StdRng, cycle: u64, engine: bool) -> Option<ArmPlan> {
    if cycle.is_multiple_of(2) {
        return None;
    }
    let points: Vec<&'static str> = CYCLE_POINTS
        .iter()
        .copied()
        .chain(engine.then_some("container_create"))
        .collect();
    let point = points[((cycle / 2) % points.len() as u64) as usize];
    let (at, delay_ms) = match point {
        "commit_before_reply" => (rng.gen_range(1..=100), 0),
        "reply_before_poll" => (rng.gen_range(1..=12), 0),
        "timer_fire" => (rng.gen_range(1..=4), 0),
        "mid_checkpoint" => (1, rng.gen_range(0..=3)),
        "container_create" => (rng.gen_range(1..=2), 0),
        _ => (1, 0),
    };
    Some(ArmPlan {
        point,
        at,
        delay_ms,
    })
}

/// Cycle `cycle`'s plan; `failpoints`: keel has named kill points to arm.
fn plan(rng: &mut StdRng, cycle: u64, failpoints: bool, engine: bool) -> CyclePlan {
    let mut kill_after_ms = rng.gen_range(100..=1200);
    let storm_ms = if rng.gen_ratio(1, 4) {
        // Half the kills land inside recovery (keel is ready in tens of
        // ms), half 150–400 ms after the spawn.
        (0..rng.gen_range(1..=3))
            .map(|_| {
                if rng.gen_bool(0.5) {
                    rng.gen_range(0..=40)
                } else {
                    rng.gen_range(150..=400)
                }
            })
            .collect()
    } else {
        Vec::new()
    };
    let arm = if failpoints {
        draw_arm(rng, cycle, engine)
    } else {
        None
    };
    if arm.is_some() {
        // Time for the armed point to be reached (a reminder fires 1 s
        // after it is set) before the plain SIGKILL.
        kill_after_ms += 1000;
    }
    CyclePlan {
        kill_after_ms,
        storm_ms,
        arm,
    }
}

// ---------------------------------------------------------------------------
// The run.

/// How far the battery is, after each kill/restart cycle (for the
/// binary's progress line on a terminal).
#[derive(Debug, Clone)]
pub struct CycleProgress {
    /// Cycles done.
    pub done: u64,
    /// Cycles planned; `None` under `--seconds` alone (until time is up).
    pub total: Option<u64>,
    /// Operations acknowledged so far (the ledger's `ok` count).
    pub acked: u64,
    /// The last start's recovery time.
    pub recovery_ms: u64,
    /// The cycle as one line (`cycle 3/24: 120 acked, recovery 85 ms`).
    pub line: String,
}

/// Run the battery; see the module documentation. On a terminal each
/// cycle is a line on stderr.
pub fn torture(args: TortureArgs) -> Result<ExitCode> {
    let tty = std::io::stderr().is_terminal();
    torture_noted(args, &mut |c| {
        if tty {
            eprintln!("keel torture: {}", c.line);
        }
    })
}

/// [`torture`], handing each finished cycle to `on_cycle` instead of
/// printing it (the other stages still print their lines on a terminal).
/// stdout (the figures, the JSON) is the same either way.
pub fn torture_noted(
    args: TortureArgs,
    on_cycle: &mut dyn FnMut(&CycleProgress),
) -> Result<ExitCode> {
    if args.clients == 0 {
        bail!("--clients must be at least 1");
    }
    if let Some(s) = args.seconds {
        if !(s.is_finite() && s > 0.0) {
            bail!("--seconds must be a positive number of seconds");
        }
    }
    let cycles = match (args.cycles, args.seconds) {
        (Some(0), _) => bail!("--cycles must be at least 1"),
        (Some(n), _) => n,
        (None, Some(_)) => u64::MAX,
        (None, None) => args.profile.cycles(),
    };
    let failpoints = keel_actors::failpoint::ENABLED;
    if args.break_.is_some() && !failpoints {
        bail!("--break needs a keel built with --features failpoints");
    }
    let budget = args.seconds.map(Duration::from_secs_f64);
    let seed = args.seed.unwrap_or_else(rand::random);
    let engine =
        services::EngineLoad::from_flags(args.docker_host.as_deref(), args.image.as_deref(), seed)?;
    let binary = match &args.keel_binary {
        Some(b) => b.clone(),
        None => std::env::current_exe().context("cannot find the keel executable")?,
    };
    let tty = std::io::stderr().is_terminal();
    let progress = |line: String| {
        if tty {
            eprintln!("keel torture: {line}");
        }
    };

    // The ledger and logs live in the scratch dir; the data dir is a fresh
    // directory of its own (on the user's disk with --data-dir).
    let scratch = Scratch::create(args.keep)?;
    let data_parent = match &args.data_dir {
        Some(d) => {
            if !d.is_dir() {
                bail!("--data-dir {}: not a directory", d.display());
            }
            d.clone()
        }
        None => scratch.path.clone(),
    };
    let data_dir = data_parent.join(format!("keel-torture-{seed}-{}", std::process::id()));
    DirBuilder::new()
        .mode(0o700)
        .create(&data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let _data_guard = RemoveOnDrop {
        path: (args.data_dir.is_some() && !args.keep).then(|| data_dir.clone()),
    };
    // The fake reply endpoint (webhook.reply_url): replies and reminder
    // notices go out through the outbox, so its kill point is under test.
    let sink = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .context("cannot bind the fake reply endpoint")?;
    let sink_addr = sink
        .local_addr()
        .context("cannot bind the fake reply endpoint")?;
    // A canary secret: keel must never write it to its log.
    let canary = format!("keel-torture-canary-{seed:016x}");
    // Telegram and Slack through fakes that outlive every keel restart.
    let upstreams = Upstreams::start(&canary)?;
    // Task runs report to a directory outside keel's data dir.
    let runs_dir = tasks::runs_dir(&scratch.path)?;
    let config = scratch.path.join("keel.toml");
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&config)
        .and_then(|mut f| {
            write!(
                f,
                "log_level = \"info\"\n\n[storage]\nsynchronous = \"full\"\n\n\
                 [webhook]\nenabled = true\nsecret = \"{canary}\"\n\
                 reply_url = \"http://{sink_addr}/replies\"\n{}{}{}",
                upstreams.config(&canary),
                tasks::config(&runs_dir),
                engine
                    .as_ref()
                    .map_or_else(String::new, services::EngineLoad::config)
            )
        })
        .with_context(|| format!("cannot write {}", config.display()))?;
    let ledger_path = scratch.path.join("ledger.log");
    let ledger_file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&ledger_path)
        .with_context(|| format!("cannot create {}", ledger_path.display()))?;
    let mut launcher = Launcher {
        binary,
        data_dir: data_dir.clone(),
        config,
        log: scratch.path.join("keel.log"),
        starts: 0,
        ignore_sigxfsz: false,
        switches: args.break_.map(|b| format!("{}=on", b.switch())),
        storage: None,
    };

    println!("keel torture: seed {seed} (replay with --seed {seed})");
    println!("keel torture: data dir {}", data_dir.display());
    let rt = runtime()?;
    let ledger = RefCell::new(Ledger::new(Some(ledger_file)));
    let seen = RefCell::new(Seen::default());
    let task_ledger = RefCell::new(tasks::TaskLedger::default());
    let service_ledger = RefCell::new(services::ServiceLedger::default());
    let mut rng = StdRng::seed_from_u64(seed);
    let mut clients: Vec<Client> = (0..args.clients)
        .map(|index| Client {
            index,
            n: 0,
            retry: None,
        })
        .collect();
    let mut recovery: Vec<u64> = Vec::new();
    let mut storm_kills = 0u64;
    let mut sigterm_stops = 0u64;
    let mut storm_ready = 0u64;
    let mut peak_rss = 0u64;
    let began = Instant::now();
    let mut done_cycles = 0u64;

    let replies = Arc::new(Mutex::new(Replies::default()));
    let result: Result<(Verdict, Finals)> = rt.block_on(async {
        let sink = tokio::net::TcpListener::from_std(sink)
            .context("cannot serve the fake reply endpoint")?;
        tokio::spawn(reply_sink(sink, replies.clone()));
        let probe = reqwest::Client::builder()
            .timeout(Duration::from_secs(1))
            .build()
            .context("cannot build an HTTP client")?;
        if let Some(e) = &engine {
            e.preflight().await?;
        }
        for cycle in 0..cycles {
            if budget.is_some_and(|b| began.elapsed() >= b) && done_cycles > 0 {
                break;
            }
            let plan = plan(&mut rng, cycle, failpoints, engine.is_some());
            // Restart storm: starts killed while they recover.
            for &ms in &plan.storm_ms {
                let mut k = launcher.spawn()?;
                tokio::time::sleep(Duration::from_millis(ms)).await;
                if let Ok(Some(status)) = k.child.try_wait() {
                    bail!(
                        "keel exited with {status} during a restart storm; its log:\n{}",
                        log_tail(&launcher.log)
                    );
                }
                if probe
                    .get(format!("{}/readyz", k.base))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
                {
                    storm_ready += 1;
                }
                k.kill()?;
                storm_kills += 1;
            }
            let arm = plan.arm.as_ref().map(ArmPlan::spec);
            let mut k = launcher.spawn_armed(arm.as_deref())?;
            let took = match k.wait_ready(&probe, &launcher.log).await {
                Ok(took) => took,
                // A start armed during recovery dies by its kill point
                // before it is ready: the next (unarmed) start recovers.
                Err(_) if arm.is_some() && k.died_of_sigkill() => {
                    k = launcher.spawn()?;
                    k.wait_ready(&probe, &launcher.log).await?
                }
                Err(e) => return Err(e),
            };
            recovery.push(took.as_millis() as u64);
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .pool_max_idle_per_host(args.clients)
                .build()
                .context("cannot build an HTTP client")?;
            let url = format!("{}/v1/messages", k.base);
            let base = k.base.clone();
            let stop = Cell::new(false);
            let cx = Cycle {
                cycle,
                http: &http,
                url: &url,
                secret: &canary,
                ledger: &ledger,
                seen: &seen,
                stop: &stop,
            };
            let load = futures::future::join(
                futures::future::join_all(clients.iter_mut().map(|c| client_loop(c, &cx))),
                futures::future::join(
                    tasks::task_loop(&task_ledger, &http, &base, cycle, &stop),
                    async {
                        if let Some(e) = &engine {
                            services::service_loop(e, &service_ledger, &http, &base, cycle, &stop)
                                .await;
                        }
                    },
                ),
            );
            let sigterm = plan.arm.as_ref().is_some_and(ArmPlan::stops_with_sigterm);
            let killer = async {
                tokio::time::sleep(Duration::from_millis(plan.kill_after_ms)).await;
                let rss = k.peak_rss_kib();
                let killed = if sigterm {
                    // The stop checkpoints the WAL: the armed point kills
                    // keel at (or while) that checkpoint.
                    stop.set(true);
                    sigterm_stops += 1;
                    k.stop(&launcher.log).await
                } else {
                    k.kill()
                };
                stop.set(true);
                (rss, killed)
            };
            let (_, (rss, killed)) = tokio::join!(load, killer);
            killed?;
            peak_rss = peak_rss.max(rss.unwrap_or(0));
            done_cycles += 1;
            let line = format!(
                "cycle {}/{}: {} acked, recovery {} ms{}",
                cycle + 1,
                if cycles == u64::MAX {
                    "?".to_string()
                } else {
                    cycles.to_string()
                },
                ledger.borrow().count(Outcome::Ok),
                took.as_millis(),
                if plan.storm_ms.is_empty() {
                    String::new()
                } else {
                    format!(", storm of {}", plan.storm_ms.len())
                }
            );
            on_cycle(&CycleProgress {
                done: done_cycles,
                total: (cycles != u64::MAX).then_some(cycles),
                acked: ledger.borrow().count(Outcome::Ok),
                recovery_ms: took.as_millis() as u64,
                line,
            });
        }
        ledger.borrow_mut().flush();
        upstreams.stop_feeding();
        // The final start: everything acknowledged must be there.
        let mut k = launcher.spawn()?;
        let took = k.wait_ready(&probe, &launcher.log).await?;
        recovery.push(took.as_millis() as u64);
        progress("final start ready; waiting for the reminders and the channels".to_string());
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .context("cannot build an HTTP client")?;
        let deadline = Instant::now() + FIRE_DEADLINE;
        let (verdict, seen, (telegram, slack), task_verdict) = loop {
            // The fakes' ledgers before the store is read: whatever keel
            // confirmed by then it had stored by then.
            let (tg, sl) = (upstreams.telegram.upstream(), upstreams.slack.upstream());
            // The fakes' ledgers are cheap to read; the store (every turn
            // over HTTP, ~1M after a soak) is not, and reading it competes
            // with the replies keel is still sending: read it only once the
            // fakes have seen every message acknowledged and answered.
            if !(tg.settled() && sl.settled()) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
            let read_at = Instant::now();
            let seen = observe(&http, &k.base).await?;
            let v = ledger.borrow().check(&seen.keys, &seen.fires);
            let stored_tasks = tasks::stored(&http, &k.base).await?;
            // A reminder whose message is lost can never fire: no need to wait for it.
            let waiting = v.timers_missed.iter().any(|id| !v.lost.contains(id))
                || !tg.settled()
                || !sl.settled()
                || !tasks::TaskVerdict::settled(&stored_tasks);
            if !waiting || Instant::now() >= deadline {
                let channels = (
                    check_channel(&tg, &seen.telegram),
                    check_channel(&sl, &seen.slack),
                );
                let runs = tasks::Runs::read(&runs_dir);
                let t = tasks::check(&task_ledger.borrow(), &stored_tasks, &runs);
                break (v, seen, channels, t);
            }
            // Leave keel at least as long as the read took to go on.
            tokio::time::sleep(read_at.elapsed().max(Duration::from_millis(250))).await;
        };
        let containers = match &engine {
            Some(e) => services::converge(e, &service_ledger).await?,
            None => services::ContainerVerdict::default(),
        };
        // The cases below run other stores with the same config.
        upstreams.freeze();
        peak_rss = peak_rss.max(k.peak_rss_kib().unwrap_or(0));
        // SAFETY: kill(2) on the child we spawned and have not reaped.
        unsafe { libc::kill(k.pid, libc::SIGTERM) };
        let stop_deadline = Instant::now() + STOP_DEADLINE;
        let clean_exit = loop {
            if let Some(status) = k.child.try_wait().context("waiting for keel")? {
                break status.success();
            }
            if Instant::now() >= stop_deadline {
                k.kill()?;
                break false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        // The final store after its clean stop.
        let integrity = integrity_failures(&launcher.data_dir)?;
        // A damaged services event log (F8), on copies of the final store.
        let mut event_damage = Vec::new();
        if engine.is_some() && clean_exit {
            for &case in services::EventDamage::ALL {
                progress(format!("event log damage {}", case.name()));
                let outcome =
                    event_damage_case(case, &launcher, &scratch.path, &ledger, &probe).await?;
                event_damage.push((case, outcome));
            }
        }
        if let Some(e) = &engine {
            e.remove_all().await?;
        }
        // Damaged files (F5, F6, F7), each on a store of its own.
        let mut damage = Vec::new();
        for &case in Damage::ALL {
            progress(format!("damage case {}", case.name()));
            let outcome = damage_case(case, &launcher, &scratch.path, &canary, &probe).await?;
            damage.push((case, outcome));
        }
        // Storage faults while keel runs (F3 file size limit, F1 full disk).
        let mut faults = Vec::new();
        for fault in [Fault::FileSizeLimit, Fault::DiskFull] {
            progress(format!("storage fault {}", fault.name()));
            let outcome = fault_case(fault, &launcher, &scratch.path, &canary, &probe).await?;
            faults.push((fault, outcome));
        }
        // Power loss (C4) and I/O errors (F2) through the VFS shim.
        let storage = storage_cases(
            seed,
            args.profile,
            &launcher,
            &scratch.path,
            &canary,
            &probe,
            &progress,
        )
        .await?;
        // C2 mid-migration, on fresh stores (a failpoints build only).
        let migrations = if failpoints {
            progress("mid-migration kills".to_string());
            Some(migration_cases(&launcher, &scratch.path, &canary, &probe).await?)
        } else {
            None
        };
        Ok((
            verdict,
            Finals {
                clean_exit,
                damage,
                faults,
                storage,
                migrations,
                lateness: seen.lateness_ms,
                telegram,
                slack,
                tasks: task_verdict,
                containers,
                event_damage,
                integrity,
            },
        ))
    });
    let (verdict, finals) = result?;

    let log = fs::read_to_string(&launcher.log).unwrap_or_default();
    let ledger_text = fs::read_to_string(&ledger_path).unwrap_or_default();
    let (panics, canary_hits) = log_findings(&log, &ledger_text, &canary);
    let hits = failpoint_hits(&log);
    let (replies_received, replies_resent) = replies
        .lock()
        .map(|r| (r.received, r.resent))
        .unwrap_or((0, 0));
    let (migration_cases, migration_unrecovered) = finals.migrations.unwrap_or((0, 0));
    let mut not_run = Vec::new();
    if !failpoints {
        not_run.push("failpoints (C2): needs a keel built with --features failpoints");
    }
    if engine.is_none() {
        not_run.push(
            "services, containers and event log damage (F8): needs --docker-host and --image",
        );
    }
    recovery.sort_unstable();
    let pct = |q: f64| nearest_rank(recovery.len(), q).map_or(0, |i| recovery[i]);
    let seen = seen.into_inner();
    let rejections: serde_json::Map<String, Value> = seen
        .rejections
        .iter()
        .map(|(k, v)| (k.to_string(), (*v).into()))
        .collect();
    let count_damage =
        |f: fn(&DamageOutcome) -> bool| finals.damage.iter().filter(|(_, o)| f(o)).count() as u64;
    let damage_json: serde_json::Map<String, Value> = finals
        .damage
        .iter()
        .map(|(c, o)| {
            let short = match o {
                DamageOutcome::Detected(_) => "detected".to_string(),
                DamageOutcome::Survived => "survived".to_string(),
                DamageOutcome::Silent(n) => format!("silent_loss:{n}"),
            };
            (c.name().to_string(), Value::String(short))
        })
        .collect();
    let faults_json: serde_json::Map<String, Value> = finals
        .faults
        .iter()
        .map(|(f, o)| (f.name().to_string(), Value::String(o.short())))
        .collect();
    let fault_losses: u64 = finals
        .faults
        .iter()
        .map(|(_, o)| match o {
            FaultOutcome::Lost(n) => *n,
            _ => 0,
        })
        .sum();
    let figures = json!({
        "seed": seed,
        "cycles": done_cycles,
        "starts": launcher.starts,
        "storm_kills": storm_kills,
        "storm_ready_before_kill": storm_ready,
        "invoked": verdict.invoked,
        "acked": verdict.acked,
        "failed": verdict.failed,
        "unknown": verdict.unknown,
        "lost": verdict.lost.len(),
        "dup": verdict.dup.len(),
        "unexpected": verdict.unexpected.len(),
        "failed_present": verdict.failed_present.len(),
        "recovered": verdict.recovered,
        "timers_fired": verdict.timers_fired,
        "timers_double": verdict.timers_double.len(),
        "timers_missed": verdict.timers_missed.len(),
        "timer_lateness_ms_p50": quantile(&finals.lateness, 0.50),
        "timer_lateness_ms_p99": quantile(&finals.lateness, 0.99),
        "recovery_ms_p50": pct(0.50),
        "recovery_ms_p99": pct(0.99),
        "recovery_ms_max": recovery.last().copied().unwrap_or(0),
        "transport_errors": seen.errors,
        "rejections": rejections,
        "panics": panics,
        "peak_rss_kib": peak_rss,
        "canary_hits": canary_hits,
        "clean_final_exit": finals.clean_exit,
        "damage_cases": finals.damage.len(),
        "damage_detected": count_damage(|o| matches!(o, DamageOutcome::Detected(_))),
        "damage_survived": count_damage(|o| matches!(o, DamageOutcome::Survived)),
        "damage_silent": count_damage(|o| matches!(o, DamageOutcome::Silent(_))),
        "damage": damage_json,
        "faults": faults_json,
        "fault_losses": fault_losses,
        "integrity_failures": finals.integrity.len(),
        "not_run": not_run,
        "seconds": began.elapsed().as_secs(),
    });
    // Named kill points (C2) are compiled in only with --features failpoints.
    let more = json!({
        "failpoints": failpoints,
        "failpoint_hits": hits,
        "failpoint_kills": hits.values().sum::<u64>(),
        "sigterm_stops": sigterm_stops,
        "migration_cases": migration_cases,
        "migration_unrecovered": migration_unrecovered,
        "replies": replies_received,
        "replies_resent": replies_resent,
        "broken": args.break_.map(Break::switch),
    });
    let storage = finals.storage.json();
    let mut figures = figures;
    for part in [
        more,
        channel_figures(&finals.telegram, &finals.slack),
        finals.tasks.json(),
        finals.containers.json(),
        event_damage_figures(&finals.event_damage),
        storage,
    ] {
        if let (Some(f), Value::Object(m)) = (figures.as_object_mut(), part) {
            f.extend(m);
        }
    }
    print_figures(&figures);
    let sample = |what: &str, v: &[String]| {
        if !v.is_empty() {
            println!(
                "  {what}: {}",
                v.iter().take(10).cloned().collect::<Vec<_>>().join(", ")
            );
        }
    };
    sample("lost", &verdict.lost);
    sample("dup", &verdict.dup);
    sample("unexpected", &verdict.unexpected);
    sample("failed but present", &verdict.failed_present);
    sample("timers double", &verdict.timers_double);
    sample("timers missed", &verdict.timers_missed);
    for (name, c) in [("telegram", &finals.telegram), ("slack", &finals.slack)] {
        sample(&format!("{name} lost"), &c.lost);
        sample(&format!("{name} dup"), &c.dup);
        sample(&format!("{name} unexpected"), &c.unexpected);
        sample(&format!("{name} unanswered"), &c.unanswered);
    }
    sample("tasks lost", &finals.tasks.lost);
    sample("tasks unexpected", &finals.tasks.unexpected);
    sample("tasks duplicated", &finals.tasks.duplicated);
    sample("tasks false success", &finals.tasks.false_success);
    sample("tasks unfinished", &finals.tasks.unfinished);
    sample("integrity_check", &finals.integrity);
    sample("containers orphaned", &finals.containers.orphaned);
    sample("containers duplicated", &finals.containers.duplicated);
    sample("services missing", &finals.containers.missing);
    for (c, o) in &finals.event_damage {
        println!("  damage {:<22} {o}", c.name());
    }
    for (c, o) in &finals.damage {
        println!("  damage {:<22} {o}", c.name());
    }
    for (f, o) in &finals.faults {
        println!("  fault  {:<22} {o}", f.name());
    }
    for line in &finals.storage.notes {
        println!("{line}");
    }
    let ok = Losses {
        ledger: !verdict.clean(),
        panics,
        canary_hits,
        unclean_final_exit: !finals.clean_exit,
        damage_silent: count_damage(|o| matches!(o, DamageOutcome::Silent(_))),
        fault_losses,
        migration_unrecovered,
        channels: finals.telegram.losses() + finals.slack.losses(),
        storage_losses: finals.storage.losses(),
        tasks: finals.tasks.losses(),
        integrity_failures: finals.integrity.len() as u64,
        containers: finals.containers.losses()
            + finals
                .event_damage
                .iter()
                .filter(|(_, o)| *o != services::EventOutcome::Detected)
                .count() as u64,
    }
    .none();
    println!(
        "keel torture: {} (seed {seed}; ledger {})",
        if ok { "PASS" } else { "FAIL" },
        if args.keep {
            ledger_path.display().to_string()
        } else {
            "removed".to_string()
        }
    );
    if args.keep {
        eprintln!("keel torture: scratch kept in {}", scratch.path.display());
    }
    if args.json {
        println!("{figures}");
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The Telegram and Slack figures (`telegram_*`, `slack_*`).
fn channel_figures(telegram: &ChannelVerdict, slack: &ChannelVerdict) -> Value {
    let n = |v: &[String]| v.len() as u64;
    json!({
        "telegram_updates": telegram.fed,
        "telegram_acked": telegram.acked,
        "telegram_lost": n(&telegram.lost),
        "telegram_dup": n(&telegram.dup),
        "telegram_unexpected": n(&telegram.unexpected),
        "telegram_offset_regressions": telegram.offset_regressions,
        "telegram_unanswered": n(&telegram.unanswered),
        "telegram_replies_resent": telegram.replies_resent,
        "telegram_stray_replies": telegram.stray_replies,
        "slack_events": slack.fed,
        "slack_acked": slack.acked,
        "slack_lost": n(&slack.lost),
        "slack_dup": n(&slack.dup),
        "slack_unexpected": n(&slack.unexpected),
        "slack_unanswered": n(&slack.unanswered),
        "slack_redelivered": slack.redelivered,
        "slack_replies_resent": slack.replies_resent,
        "slack_stray_replies": slack.stray_replies,
    })
}

/// Everything that fails a run besides the ledger's own counters.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Losses {
    /// The ledger found lost, dup, unexpected, failed_present,
    /// timers_double or timers_missed entries ([`Verdict::clean`]).
    pub ledger: bool,
    pub panics: u64,
    pub canary_hits: u64,
    pub unclean_final_exit: bool,
    pub damage_silent: u64,
    pub fault_losses: u64,
    pub migration_unrecovered: u64,
    /// Telegram and Slack findings ([`ChannelVerdict::losses`]).
    pub channels: u64,
    /// Power-loss and I/O error losses ([`StorageFigures::losses`]).
    pub storage_losses: u64,
    /// Task findings ([`tasks::TaskVerdict::losses`]).
    pub tasks: u64,
    /// Lines of the final store's `integrity_check` that are not `ok`.
    pub integrity_failures: u64,
    /// Container findings ([`services::ContainerVerdict::losses`]) and
    /// F8 cases not detected or losing messages.
    pub containers: u64,
}

impl Losses {
    /// The run passes (exit 0) only when this holds.
    pub fn none(&self) -> bool {
        *self == Losses::default()
    }
}

/// Panics in keel's log, and hits of the canary secret in the log and
/// the ledger.
pub fn log_findings(log: &str, ledger: &str, canary: &str) -> (u64, u64) {
    let panics = log.matches("panicked at").count() as u64;
    let canary_hits = (log.matches(canary).count() + ledger.matches(canary).count()) as u64;
    (panics, canary_hits)
}

struct Finals {
    clean_exit: bool,
    damage: Vec<(Damage, DamageOutcome)>,
    faults: Vec<(Fault, FaultOutcome)>,
    /// Power-loss images and I/O errors.
    storage: StorageFigures,
    /// (cases, starts that did not recover) of the mid-migration kills.
    migrations: Option<(u64, u64)>,
    /// Reminders' lateness, ms, sorted ([`Observed::lateness_ms`]).
    lateness: Vec<i64>,
    telegram: ChannelVerdict,
    slack: ChannelVerdict,
    tasks: tasks::TaskVerdict,
    containers: services::ContainerVerdict,
    /// F8 cases (an engine configured).
    event_damage: Vec<(services::EventDamage, services::EventOutcome)>,
    /// `integrity_check` lines of the final store that are not `ok`.
    integrity: Vec<String>,
}

/// Hits of every named kill point in keel's log (the line each kill
/// writes before it fires).
pub fn failpoint_hits(log: &str) -> BTreeMap<&'static str, u64> {
    keel_actors::failpoint::POINTS
        .iter()
        .map(|(name, _)| {
            let line = format!("keel failpoint {name}: hit");
            (*name, log.matches(line.as_str()).count() as u64)
        })
        .collect()
}

// ---------------------------------------------------------------------------
// The fake reply endpoint.

/// What `webhook.reply_url` received.
#[derive(Default)]
struct Replies {
    received: u64,
    /// A reply whose outbox id came before: sent, killed before it was
    /// marked sent, sent again (at-least-once; the id lets receivers dedupe).
    resent: u64,
    ids: std::collections::HashSet<String>,
}

/// A real HTTP/1.1 server on loopback answering every request 200.
async fn reply_sink(listener: tokio::net::TcpListener, replies: Arc<Mutex<Replies>>) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            continue;
        };
        let replies = replies.clone();
        tokio::spawn(async move {
            let _ = serve_replies(sock, &replies).await;
        });
    }
}

async fn serve_replies(
    mut sock: tokio::net::TcpStream,
    replies: &Mutex<Replies>,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = sock.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        while buf.len() < head_end + len {
            let n = sock.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let id = serde_json::from_slice::<Value>(&buf[head_end..head_end + len])
            .ok()
            .and_then(|v| v.get("id")?.as_str().map(str::to_string));
        buf.drain(..head_end + len);
        if let Ok(mut r) = replies.lock() {
            r.received += 1;
            if let Some(id) = id {
                if !r.ids.insert(id) {
                    r.resent += 1;
                }
            }
        }
        sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await?;
    }
}

// ---------------------------------------------------------------------------
// Mid-migration kills (TESTING.md C2).

/// For each migration K: a fresh store's first start is SIGKILLed inside
/// K's transaction (`mid_migration=K`); the next start must migrate, be
/// ready and acknowledge a message. Returns (cases, unrecovered).
async fn migration_cases(
    main: &Launcher,
    scratch: &Path,
    secret: &str,
    probe: &reqwest::Client,
) -> Result<(u64, u64)> {
    let n = keel_actors::persistence::migrate::MIGRATIONS.len() as u64;
    let mut unrecovered = 0;
    for k in 1..=n {
        let dir = scratch.join(format!("migration-{k}"));
        DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let mut l = Launcher {
            binary: main.binary.clone(),
            data_dir: dir.join("data"),
            config: main.config.clone(),
            log: main.log.clone(),
            starts: 0,
            ignore_sigxfsz: false,
            switches: None,
            storage: None,
        };
        let mut c = l.spawn_armed(Some(&format!("mid_migration={k}")))?;
        let deadline = Instant::now() + READY_DEADLINE;
        while c.child.try_wait().context("waiting for keel")?.is_none() {
            if Instant::now() >= deadline {
                bail!("mid-migration {k}: keel was not killed by its kill point within {READY_DEADLINE:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if !c.died_of_sigkill() {
            bail!(
                "mid-migration {k}: keel exited before its kill point; its log:\n{}",
                log_tail(&l.log)
            );
        }
        drop(c);
        let mut c = l.spawn()?;
        let ok = c.wait_ready(probe, &l.log).await.is_ok()
            && post_signed(probe, &c.base, secret, &format!("mig-{k}"), "after")
                .await
                .is_ok_and(|code| code == 200);
        if !ok {
            unrecovered += 1;
        }
        c.kill()?;
    }
    Ok((n, unrecovered))
}

/// Removes a directory on drop (the data dir made under the user's `--data-dir`).
struct RemoveOnDrop {
    path: Option<PathBuf>,
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            if let Err(e) = fs::remove_dir_all(p) {
                eprintln!("keel torture: cannot remove {}: {e}", p.display());
            }
        }
    }
}

/// The figures as a table.
fn print_figures(f: &Value) {
    let g = |k: &str| f.get(k).map_or_else(|| "-".to_string(), Value::to_string);
    println!(
        "cycles {}  starts {}  storm kills {}  seconds {}",
        g("cycles"),
        g("starts"),
        g("storm_kills"),
        g("seconds")
    );
    println!(
        "ops: invoked {}  acked {}  failed {}  unknown {}  recovered {}",
        g("invoked"),
        g("acked"),
        g("failed"),
        g("unknown"),
        g("recovered")
    );
    println!(
        "losses: lost {}  dup {}  unexpected {}  failed but present {}",
        g("lost"),
        g("dup"),
        g("unexpected"),
        g("failed_present")
    );
    println!(
        "timers: fired {}  double {}  missed {}  lateness (ms) p50 {}  p99 {}",
        g("timers_fired"),
        g("timers_double"),
        g("timers_missed"),
        g("timer_lateness_ms_p50"),
        g("timer_lateness_ms_p99")
    );
    println!(
        "recovery to ready (ms): p50 {}  p99 {}  max {}",
        g("recovery_ms_p50"),
        g("recovery_ms_p99"),
        g("recovery_ms_max")
    );
    println!(
        "rejections by code {}  transport errors {}  panics {}  peak RSS {} KiB  canary hits {}  failpoints {}  integrity failures {}",
        g("rejections"),
        g("transport_errors"),
        g("panics"),
        g("peak_rss_kib"),
        g("canary_hits"),
        g("failpoints"),
        g("integrity_failures")
    );
    if f["failpoints"] == true {
        println!(
            "failpoint hits {}  sigterm stops {}  mid-migration cases {} (unrecovered {})",
            g("failpoint_hits"),
            g("sigterm_stops"),
            g("migration_cases"),
            g("migration_unrecovered")
        );
    }
    println!(
        "power loss: images {} (sync reached {})  acked {}  lost {}  not a prefix {}  unready {}",
        g("power_loss_images"),
        g("power_loss_reached"),
        g("power_loss_acked"),
        g("power_loss_lost"),
        g("power_loss_not_prefix"),
        g("power_loss_unready")
    );
    println!(
        "I/O errors: cases {} (fired {})  lost {}  acked after forever {}  ready under forever {}  unrecovered {}",
        g("io_error_cases"),
        g("io_error_fired"),
        g("io_error_lost"),
        g("io_error_acked_after_forever"),
        g("io_error_ready_under_forever"),
        g("io_error_unrecovered")
    );
    println!(
        "replies received {}  resent {}",
        g("replies"),
        g("replies_resent")
    );
    println!(
        "telegram: updates {}  acked {}  lost {}  dup {}  unexpected {}  offset regressions {}  unanswered {}  replies resent {}",
        g("telegram_updates"),
        g("telegram_acked"),
        g("telegram_lost"),
        g("telegram_dup"),
        g("telegram_unexpected"),
        g("telegram_offset_regressions"),
        g("telegram_unanswered"),
        g("telegram_replies_resent")
    );
    println!(
        "slack: events {}  acked {}  lost {}  dup {}  unexpected {}  unanswered {}  redelivered {}  replies resent {}",
        g("slack_events"),
        g("slack_acked"),
        g("slack_lost"),
        g("slack_dup"),
        g("slack_unexpected"),
        g("slack_unanswered"),
        g("slack_redelivered"),
        g("slack_replies_resent")
    );
    println!(
        "tasks: invoked {}  acked {}  recovered {}  lost {}  unexpected {}  duplicated {}  false success {}  unfinished {}  succeeded {}  interrupted {}  requeued {}  runs {}",
        g("tasks_invoked"),
        g("tasks_acked"),
        g("tasks_recovered"),
        g("tasks_lost"),
        g("tasks_unexpected"),
        g("tasks_duplicated"),
        g("tasks_false_success"),
        g("tasks_unfinished"),
        g("tasks_succeeded"),
        g("tasks_interrupted"),
        g("tasks_requeued"),
        g("tasks_runs")
    );
    if f["containers"] == true {
        println!(
            "containers: service ops {}  acked {}  listed {}  orphaned {}  duplicated {}  services missing {}  converged in {} ms  event log damage {}",
            g("services_ops"),
            g("services_acked"),
            g("containers_listed"),
            g("containers_orphaned"),
            g("containers_duplicated"),
            g("services_missing"),
            g("containers_converge_ms"),
            g("event_log_damage")
        );
    }
}

/// Open `data_dir/keel.db` of a stopped keel the way keel opens it: with
/// the dir's `master.key` unless it is plain SQLite.
fn open_store(data_dir: &Path) -> Result<rusqlite::Connection> {
    let db = data_dir.join("keel.db");
    let conn =
        rusqlite::Connection::open(&db).with_context(|| format!("cannot open {}", db.display()))?;
    let plain = fs::read(&db)
        .map(|b| b.starts_with(b"SQLite format 3\0"))
        .unwrap_or(false);
    if !plain {
        let key = fs::read_to_string(data_dir.join("master.key"))
            .context("the torture store has no master.key")?;
        conn.execute_batch(&format!(
            "PRAGMA cipher_log_level = NONE; PRAGMA key = \"x'{}'\";",
            key.trim()
        ))
        .context("cannot unlock the torture store")?;
    }
    Ok(conn)
}

/// `PRAGMA integrity_check` of the final store after its clean stop: the
/// lines that are not `ok` (0 for a sound store).
fn integrity_failures(data_dir: &Path) -> Result<Vec<String>> {
    let conn = open_store(data_dir)?;
    let mut st = conn
        .prepare("PRAGMA integrity_check")
        .context("integrity_check")?;
    let lines = st
        .query_map([], |r| r.get::<_, String>(0))
        .context("integrity_check")?
        .collect::<rusqlite::Result<Vec<String>>>()
        .context("integrity_check")?;
    Ok(lines.into_iter().filter(|l| l != "ok").collect())
}

/// The F8 figures: `event_log_cases`, `event_log_detected` and each case's outcome.
fn event_damage_figures(cases: &[(services::EventDamage, services::EventOutcome)]) -> Value {
    let outcomes: serde_json::Map<String, Value> = cases
        .iter()
        .map(|(c, o)| (c.name().to_string(), Value::String(o.short())))
        .collect();
    json!({
        "event_log_cases": cases.len(),
        "event_log_detected": cases
            .iter()
            .filter(|(_, o)| *o == services::EventOutcome::Detected)
            .count(),
        "event_log_damage": outcomes,
    })
}

/// F8: a copy of the final store with its services event log damaged
/// (keel stopped); keel must start, report the damage, refuse deploys and
/// keep every acknowledged message.
async fn event_damage_case(
    case: services::EventDamage,
    main: &Launcher,
    scratch: &Path,
    ledger: &RefCell<Ledger>,
    probe: &reqwest::Client,
) -> Result<services::EventOutcome> {
    let dir = scratch.join(format!("damage-{}", case.name()));
    let mut l = Launcher {
        binary: main.binary.clone(),
        data_dir: dir.join("data"),
        config: main.config.clone(),
        log: main.log.clone(),
        starts: 0,
        ignore_sigxfsz: false,
        switches: None,
        storage: None,
    };
    services::copy_store(&main.data_dir, &l.data_dir)?;
    case.apply(&l.data_dir)?;
    let mut k = l.spawn()?;
    k.wait_ready(probe, &l.log).await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .context("cannot build an HTTP client")?;
    let readyz: Value = http
        .get(format!("{}/readyz", k.base))
        .send()
        .await
        .context("GET /readyz")?
        .json()
        .await
        .context("GET /readyz: reading JSON")?;
    let deploy = http
        .post(format!("{}/v1/services", k.base))
        .json(&json!({"name": "afterdamage", "image": "none", "command": ["true"]}))
        .send()
        .await
        .context("POST /v1/services")?
        .status()
        .as_u16();
    let seen = observe(&http, &k.base).await?;
    let lost = ledger.borrow().check(&seen.keys, &seen.fires).lost.len() as u64;
    k.stop(&l.log).await?;
    let _ = fs::remove_dir_all(&dir);
    Ok(services::judge(&readyz, deploy, lost))
}

/// What keel's store shows after a run.
#[derive(Debug, Default)]
pub(crate) struct Observed {
    /// User turns per message id (webhook sessions).
    keys: HashMap<String, u64>,
    /// User turns per key in `telegram:` sessions (the update_id).
    pub(crate) telegram: HashMap<String, u64>,
    /// User turns per key in `slack:` sessions (the event_id).
    slack: HashMap<String, u64>,
    /// Reminder notices per note (the id of the `/remind` message).
    fires: HashMap<String, u64>,
    /// Per fired reminder, ms from its due time (its message's store time
    /// + 1 s) to its first notice; downtime counts, as a user sees it.
    lateness_ms: Vec<i64>,
}

/// User turns per message id (per channel), reminder notices per note and
/// how late they came, over every session keel reports.
pub(crate) async fn observe(http: &reqwest::Client, base: &str) -> Result<Observed> {
    let sessions: Value = get_json(http, &format!("{base}/v1/sessions?limit=100000")).await?;
    let mut seen = Observed::default();
    let mut reminded: HashMap<String, i64> = HashMap::new();
    let mut first_fire: HashMap<String, i64> = HashMap::new();
    let ids = sessions
        .get("sessions")
        .and_then(Value::as_array)
        .context("GET /v1/sessions: no sessions array")?;
    let at_ms = |t: &Value| {
        t.get("created_at")
            .and_then(Value::as_str)
            .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
            .map(|d| d.timestamp_millis())
    };
    for s in ids {
        let Some(id) = s.get("id").and_then(Value::as_str) else {
            continue;
        };
        let mut after = 0i64;
        let channel = id.split_once(':').map_or("", |(c, _)| c);
        loop {
            let url = format!(
                "{base}/v1/sessions/{}/turns?after={after}&limit=100000",
                encode_segment(id)
            );
            let v = get_json(http, &url).await?;
            let turns = v
                .get("turns")
                .and_then(Value::as_array)
                .with_context(|| format!("GET {url}: no turns array"))?;
            for t in turns {
                after = after.max(t.get("seq").and_then(Value::as_i64).unwrap_or(after));
                let role = t.get("role").and_then(Value::as_str).unwrap_or("");
                let text = t.get("text").and_then(Value::as_str).unwrap_or("");
                if role == "user" {
                    if let Some(key) = t.get("key").and_then(Value::as_str) {
                        let (keys, k) = match channel {
                            "telegram" => (&mut seen.telegram, key),
                            "slack" => (&mut seen.slack, key),
                            // By the id the text carries, not the key keel
                            // stored it under: a keel that mangled keys
                            // would otherwise hide its duplicates.
                            _ => (&mut seen.keys, sent_id(text).unwrap_or(key)),
                        };
                        *keys.entry(k.to_string()).or_insert(0) += 1;
                        if let (true, Some(at)) = (text.starts_with("/remind "), at_ms(t)) {
                            reminded.entry(k.to_string()).or_insert(at);
                        }
                    }
                } else if let Some(note) = reminder_note(text) {
                    *seen.fires.entry(note.to_string()).or_insert(0) += 1;
                    if let Some(at) = at_ms(t) {
                        let first = first_fire.entry(note.to_string()).or_insert(at);
                        *first = (*first).min(at);
                    }
                }
            }
            if turns.len() < 100_000 {
                break;
            }
        }
    }
    seen.lateness_ms = first_fire
        .iter()
        .filter_map(|(note, fired)| reminded.get(note).map(|set| fired - (set + 1_000)))
        .collect();
    seen.lateness_ms.sort_unstable();
    Ok(seen)
}

/// The `q` quantile of sorted `v` (0 when empty).
fn quantile(v: &[i64], q: f64) -> i64 {
    if v.is_empty() {
        return 0;
    }
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    v[i.min(v.len() - 1)]
}

/// The note id of a reminder notice `⏰ Reminder #N: note-<id>[ (late …)]`.
/// The message id a battery client put in its text (`hello <id>`,
/// `/remind in 1s note-<id>`).
fn sent_id(text: &str) -> Option<&str> {
    text.strip_prefix("hello ")
        .or_else(|| text.split_once(" note-").map(|(_, id)| id))
        .filter(|id| !id.is_empty() && !id.contains(char::is_whitespace))
}

fn reminder_note(text: &str) -> Option<&str> {
    let rest = text.strip_prefix("⏰ Reminder #")?;
    let (_, note) = rest.split_once(": note-")?;
    note.split_whitespace().next()
}

/// POST one signed webhook message; the status code.
async fn post_signed(
    http: &reqwest::Client,
    base: &str,
    secret: &str,
    id: &str,
    text: &str,
) -> Result<u16> {
    let body = serde_json::to_vec(&json!({"id": id, "chat": "fault", "from": "u", "text": text}))
        .expect("a JSON value serializes");
    let r = http
        .post(format!("{base}/v1/messages"))
        .header("content-type", "application/json")
        .header("x-keel-signature", sign(secret, &body))
        .body(body)
        .send()
        .await
        .with_context(|| format!("POST {id}"))?;
    Ok(r.status().as_u16())
}

async fn get_json(http: &reqwest::Client, url: &str) -> Result<Value> {
    let r = http
        .get(url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    if !r.status().is_success() {
        bail!("GET {url} answered {}", r.status());
    }
    r.json()
        .await
        .with_context(|| format!("GET {url}: reading JSON"))
}

/// Percent-encodes a path segment.
fn encode_segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::storage::*;
    use super::*;
    use crate::fake_http::Fed;

    fn ledger(ops: &[(&str, Kind, Outcome)]) -> Ledger {
        let mut l = Ledger::new(None);
        for &(id, kind, outcome) in ops {
            l.invoke(id, kind);
            l.complete(id, outcome, Some(400));
        }
        l
    }

    fn counts(pairs: &[(&str, u64)]) -> HashMap<String, u64> {
        pairs.iter().map(|(k, n)| (k.to_string(), *n)).collect()
    }

    #[test]
    fn a_clean_store_passes() {
        let l = ledger(&[
            ("a", Kind::Message, Outcome::Ok),
            ("b", Kind::Remind, Outcome::Ok),
            ("c", Kind::Message, Outcome::Unknown),
            ("d", Kind::Message, Outcome::Unknown),
            ("e", Kind::Message, Outcome::Fail),
        ]);
        let v = l.check(
            &counts(&[("a", 1), ("b", 1), ("c", 1)]),
            &counts(&[("b", 1)]),
        );
        assert!(v.clean(), "{v:?}");
        assert_eq!((v.invoked, v.acked, v.unknown, v.failed), (5, 2, 2, 1));
        assert_eq!((v.recovered, v.timers_fired), (1, 1));
    }

    #[test]
    fn every_kind_of_loss_is_counted() {
        let l = ledger(&[
            ("lost", Kind::Message, Outcome::Ok),
            ("dup", Kind::Message, Outcome::Ok),
            ("refused", Kind::Message, Outcome::Fail),
            ("missed", Kind::Remind, Outcome::Ok),
            ("twice", Kind::Remind, Outcome::Ok),
        ]);
        let v = l.check(
            &counts(&[
                ("dup", 2),
                ("refused", 1),
                ("missed", 1),
                ("twice", 1),
                ("invented", 1),
            ]),
            &counts(&[("twice", 2), ("ghost", 1)]),
        );
        assert!(!v.clean());
        assert_eq!(v.lost, ["lost"]);
        assert_eq!(v.dup, ["dup"]);
        assert_eq!(v.failed_present, ["refused"]);
        assert_eq!(v.timers_missed, ["missed"]);
        assert_eq!(v.timers_double, ["twice"]);
        let mut unexpected = v.unexpected.clone();
        unexpected.sort();
        assert_eq!(unexpected, ["fire of ghost (x1)", "invented (x1)"]);
    }

    #[test]
    fn every_other_loss_fails_the_run() {
        assert!(Losses::default().none());
        let each = [
            Losses {
                ledger: true,
                ..Losses::default()
            },
            Losses {
                panics: 1,
                ..Losses::default()
            },
            Losses {
                canary_hits: 1,
                ..Losses::default()
            },
            Losses {
                unclean_final_exit: true,
                ..Losses::default()
            },
            Losses {
                damage_silent: 1,
                ..Losses::default()
            },
            Losses {
                fault_losses: 1,
                ..Losses::default()
            },
            Losses {
                migration_unrecovered: 1,
                ..Losses::default()
            },
            Losses {
                channels: 1,
                ..Losses::default()
            },
            Losses {
                storage_losses: 1,
                ..Losses::default()
            },
            Losses {
                tasks: 1,
                ..Losses::default()
            },
            Losses {
                containers: 1,
                ..Losses::default()
            },
            Losses {
                integrity_failures: 1,
                ..Losses::default()
            },
        ];
        for l in each {
            assert!(!l.none(), "{l:?} passed");
        }
    }

    fn fed(key: &str, acked: bool) -> Fed {
        Fed {
            key: key.to_string(),
            tag: format!("t-{key}"),
            acked,
        }
    }

    /// A fake's ledger with every message fed answered once.
    fn upstream(fed_: Vec<Fed>) -> Upstream {
        Upstream {
            replies: fed_.iter().map(|f| (f.tag.clone(), 1)).collect(),
            fed: fed_,
            ..Upstream::default()
        }
    }

    #[test]
    fn a_clean_channel_passes() {
        // b was fed but never confirmed (keel may or may not have it).
        let up = upstream(vec![fed("a", true), fed("b", false), fed("c", false)]);
        let v = check_channel(&up, &counts(&[("a", 1), ("b", 1)]));
        assert_eq!(v.losses(), 0, "{v:?}");
        assert_eq!((v.fed, v.acked, v.replies_resent), (3, 1, 0));
    }

    #[test]
    fn every_kind_of_channel_loss_fails_the_run() {
        let clean = || upstream(vec![fed("a", true), fed("b", true)]);
        let stored = || counts(&[("a", 1), ("b", 1)]);
        let mut lost = stored();
        lost.remove("b");
        let mut dup = stored();
        dup.insert("a".into(), 2);
        let mut unexpected = stored();
        unexpected.insert("ghost".into(), 1);
        let mut unanswered = clean();
        unanswered.replies.remove("t-b");
        let mut regressed = clean();
        regressed.offset_regressions = 1;
        let cases = [
            (clean(), lost),
            (clean(), dup),
            (clean(), unexpected),
            (unanswered, stored()),
            (regressed, stored()),
        ];
        for (up, stored) in cases {
            let v = check_channel(&up, &stored);
            assert_eq!(v.losses(), 1, "{v:?}");
            let l = Losses {
                channels: v.losses(),
                ..Losses::default()
            };
            assert!(!l.none(), "{v:?} passed");
        }
        assert_eq!(check_channel(&clean(), &counts(&[("a", 1)])).lost, ["t-b"]);
    }

    #[test]
    fn a_resent_reply_is_counted_and_not_a_loss() {
        let mut up = upstream(vec![fed("a", true)]);
        up.replies.insert("t-a".into(), 3);
        let v = check_channel(&up, &counts(&[("a", 1)]));
        assert_eq!((v.losses(), v.replies_resent), (0, 2));
    }

    #[test]
    fn panics_and_canaries_are_found_in_the_log_and_the_ledger() {
        let log = "INFO ok\nthread 'keel-writer' panicked at src/x.rs:1:2\nsecret=canary-1\n";
        assert_eq!(log_findings(log, "ok a\n", "canary-1"), (1, 1));
        assert_eq!(
            log_findings("INFO ok\n", "invoke canary-1\n", "canary-1"),
            (0, 1)
        );
        assert_eq!(log_findings("INFO ok\n", "ok a\n", "canary-1"), (0, 0));
    }

    #[test]
    fn failpoint_hits_are_counted_per_point() {
        let log = "keel failpoint timer_fire: hit 3, SIGKILL\nINFO x\n\
                   keel failpoint mid_migration: hit 1, SIGKILL\n\
                   keel failpoint timer_fire: hit 1, SIGKILL\n";
        let hits = failpoint_hits(log);
        assert_eq!(hits["timer_fire"], 2);
        assert_eq!(hits["mid_migration"], 1);
        assert_eq!(hits["commit_before_reply"], 0);
        assert_eq!(hits.len(), keel_actors::failpoint::POINTS.len());
    }

    #[test]
    fn an_acknowledgement_is_never_taken_back() {
        let mut l = ledger(&[("a", Kind::Message, Outcome::Ok)]);
        // A retry of the same id that times out does not unacknowledge it.
        l.invoke("a", Kind::Message);
        l.complete("a", Outcome::Unknown, None);
        assert_eq!(l.count(Outcome::Ok), 1);
        let v = l.check(&HashMap::new(), &HashMap::new());
        assert_eq!(v.lost, ["a"]);
    }

    #[test]
    fn the_schedule_is_a_function_of_the_seed() {
        let a: Vec<_> = {
            let mut r = StdRng::seed_from_u64(7);
            (0..50).map(|c| plan(&mut r, c, true, true)).collect()
        };
        let b: Vec<_> = {
            let mut r = StdRng::seed_from_u64(7);
            (0..50).map(|c| plan(&mut r, c, true, true)).collect()
        };
        assert_eq!(a, b);
        assert!(a.iter().any(|p| !p.storm_ms.is_empty()));
        // Every kill point the cycles arm is one keel knows.
        for p in a.iter().filter_map(|p| p.arm.as_ref()) {
            assert!(
                keel_actors::failpoint::parse(&p.spec()).is_ok(),
                "{}",
                p.spec()
            );
        }
        // Ten cycles arm every cycle point once.
        let armed: std::collections::BTreeSet<_> = a[..10]
            .iter()
            .filter_map(|p| Some(p.arm.as_ref()?.point))
            .collect();
        assert_eq!(armed.len(), CYCLE_POINTS.len(), "{armed:?}");
        // With an engine the container create point is armed too.
        let with_engine: std::collections::BTreeSet<_> = a[..12]
            .iter()
            .filter_map(|p| Some(p.arm.as_ref()?.point))
            .collect();
        assert!(with_engine.contains("container_create"), "{with_engine:?}");
        // Without failpoints nothing is armed.
        let mut r = StdRng::seed_from_u64(7);
        assert!((0..50).all(|c| plan(&mut r, c, false, true).arm.is_none()));
        assert!(a
            .iter()
            .all(|p| (100..=1200)
                .contains(&(p.kill_after_ms - if p.arm.is_some() { 1000 } else { 0 }))));
    }

    #[test]
    fn lateness_quantiles_pick_from_the_sorted_figures() {
        let v: Vec<i64> = (1..=100).collect();
        assert_eq!(quantile(&v, 0.5), 51);
        assert_eq!(quantile(&v, 0.99), 99);
        assert_eq!(quantile(&[7], 0.99), 7);
        assert_eq!(quantile(&[], 0.5), 0);
    }

    #[test]
    fn a_stored_message_is_counted_by_the_id_its_text_carries() {
        assert_eq!(sent_id("hello k1c2n8"), Some("k1c2n8"));
        assert_eq!(sent_id("/remind in 1s note-k1c2n9"), Some("k1c2n9"));
        assert_eq!(sent_id("something else"), None);
        assert_eq!(sent_id("hello "), None);
    }

    #[test]
    fn reminder_notices_name_their_note() {
        assert_eq!(
            reminder_note("⏰ Reminder #12: note-k1c2n8"),
            Some("k1c2n8")
        );
        assert_eq!(
            reminder_note("⏰ Reminder #3: note-k0c0n8 (late by 4s: keel was not running at …)"),
            Some("k0c0n8")
        );
        assert_eq!(reminder_note("Reminder #3 set for …"), None);
    }

    #[test]
    fn every_storage_loss_fails_the_run() {
        assert_eq!(StorageFigures::default().losses(), 0);
        let lost = PowerLossOutcome {
            acked: 3,
            lost: vec!["k1c0n1".into()],
            ..PowerLossOutcome::default()
        };
        let hole = PowerLossOutcome {
            not_prefix: vec![2],
            ..PowerLossOutcome::default()
        };
        let unready = PowerLossOutcome {
            unready: Some("data_loss_detected".into()),
            ..PowerLossOutcome::default()
        };
        for o in [lost, hole, unready] {
            let mut f = StorageFigures::default();
            f.add_power_loss(&o);
            assert_eq!(f.power_loss_images, 1);
            assert!(f.losses() > 0, "{o:?} passed");
        }
        let once = IoError::ALL[0];
        let forever = IoError::ALL[2];
        assert!(!once.forever && forever.forever);
        let io = [
            (
                once,
                IoErrorOutcome {
                    fired: true,
                    lost: 1,
                    recovered: true,
                    ..IoErrorOutcome::default()
                },
            ),
            (
                once,
                IoErrorOutcome {
                    fired: true,
                    recovered: false,
                    ..IoErrorOutcome::default()
                },
            ),
            (
                forever,
                IoErrorOutcome {
                    fired: true,
                    acked_after_forever: 1,
                    readyz_503: true,
                    ..IoErrorOutcome::default()
                },
            ),
            (
                forever,
                IoErrorOutcome {
                    fired: true,
                    readyz_503: false,
                    ..IoErrorOutcome::default()
                },
            ),
        ];
        for (case, o) in io {
            let mut f = StorageFigures::default();
            f.add_io_error(case, &o);
            assert!(f.losses() > 0, "{case:?} {o:?} passed");
            let l = Losses {
                storage_losses: f.losses(),
                ..Losses::default()
            };
            assert!(!l.none());
        }
        let mut clean = StorageFigures::default();
        clean.add_io_error(
            once,
            &IoErrorOutcome {
                fired: true,
                acked: 9,
                recovered: true,
                ..IoErrorOutcome::default()
            },
        );
        clean.add_io_error(
            forever,
            &IoErrorOutcome {
                fired: true,
                acked: 4,
                readyz_503: true,
                ..IoErrorOutcome::default()
            },
        );
        assert_eq!(
            (clean.losses(), clean.io_error_cases, clean.io_error_fired),
            (0, 2, 2)
        );
        // Every figure the brief names is in the JSON line.
        let j = clean.json();
        for key in [
            "power_loss_images",
            "power_loss_lost",
            "power_loss_not_prefix",
            "io_error_cases",
            "io_error_lost",
            "io_error_acked_after_forever",
        ] {
            assert!(j.get(key).is_some_and(Value::is_u64), "{key} missing");
        }
    }

    #[test]
    fn an_image_missing_an_acknowledged_message_is_a_loss_and_a_hole_breaks_the_prefix() {
        let l = ledger(&[
            ("k9c0n0", Kind::Message, Outcome::Ok),
            ("k9c0n1", Kind::Message, Outcome::Ok),
            ("k9c0n2", Kind::Message, Outcome::Unknown),
            ("k9c1n0", Kind::Message, Outcome::Ok),
            ("k9c1n1", Kind::Message, Outcome::Ok),
        ]);
        // A prefix: client 0 up to n1 (n2 unknown, present), client 1 up to n0.
        let ok = check_image(
            &l,
            &counts(&[
                ("k9c0n0", 1),
                ("k9c0n1", 1),
                ("k9c0n2", 1),
                ("k9c1n0", 1),
                ("k9c1n1", 1),
            ]),
        );
        assert_eq!((ok.acked, ok.lost.len(), ok.not_prefix.len()), (4, 0, 0));
        // The tail of client 1 lost: a loss, still a prefix.
        let tail = check_image(&l, &counts(&[("k9c0n0", 1), ("k9c0n1", 1), ("k9c1n0", 1)]));
        assert_eq!(tail.lost, ["k9c1n1"]);
        assert!(tail.not_prefix.is_empty());
        // Client 0's n0 missing while n1 is there: not a prefix.
        let hole = check_image(&l, &counts(&[("k9c0n1", 1), ("k9c1n0", 1), ("k9c1n1", 1)]));
        assert_eq!(hole.lost, ["k9c0n0"]);
        assert_eq!(hole.not_prefix, [0]);
        assert_eq!(client_seq("k9012c3n17"), Some((3, 17)));
    }

    #[test]
    fn power_loss_points_start_at_one_and_follow_the_seed() {
        let a = power_loss_points(5, Profile::Quick);
        assert_eq!(&a[..3], [1, 2, 3]);
        assert_eq!(a.len(), 6);
        assert_eq!(a, power_loss_points(5, Profile::Quick));
        assert!(a[3..].iter().all(|n| (4..=160).contains(n)));
        assert!(power_loss_points(5, Profile::Soak).len() > a.len());
        // Each point is an image directory of its own: never drawn twice
        // (the soak of seed 20261202 drew one twice and stopped).
        for seed in (0..200).chain([20261202]) {
            let mut p = power_loss_points(seed, Profile::Soak);
            let n = p.len();
            p.dedup();
            assert_eq!(p.len(), n, "seed {seed}");
        }
    }
}
