//! Harness shared by the integration tests: it drives the real `keel` binary.
//!
//! - [`Daemon`] spawns `keel run` on a fresh temp data dir and a free port, captures
//!   stderr to a file, waits for `/readyz` with a deadline and stops the process with
//!   SIGKILL or SIGTERM (Drop always kills it).
//! - [`Resp`] and the `Daemon` HTTP helpers wrap an async `reqwest` client; raw
//!   socket requests ([`raw_request`]) cover what a well-behaved client cannot send.
//! - [`ReplyServer`] is a fake `webhook.reply_url` receiver that records every reply;
//!   [`HangServer`] accepts connections and never answers.
//! - [`Ledger`] is the Jepsen-style oracle: one row per operation (ok / fail /
//!   unknown), checked against what the daemon reports after the faults.
//! - [`Seed`] makes random choices replayable: `SEED=<n> cargo test ...`.
//! - [`Load`] runs concurrent webhook clients that record into a ledger.
//!
//! Nothing here sleeps in place of synchronisation: every wait polls a condition
//! (an endpoint, a file, a process status) until a deadline.

// The harness drives real processes in real time and reads the test
// environment (KEEL_TEST_REQUIRE_ROOT, SEED): the clock and env rules of
// clippy.toml are for keel itself.
#![allow(clippy::disallowed_methods)]
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use rand::{rngs::StdRng, SeedableRng};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tempfile::TempDir;

/// How long a start may take before the test gives up (debug build, 2 cores, and
/// several daemons starting at once).
pub const READY_DEADLINE: Duration = Duration::from_secs(60);
/// Interval between two polls of a condition.
pub const POLL: Duration = Duration::from_millis(25);
/// Timeout of one HTTP request made by the tests.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Path of the binary under test.
pub fn keel_bin() -> &'static str {
    env!("CARGO_BIN_EXE_keel")
}

/// A port that was free a moment ago (bind port 0, read it, drop the listener).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("local addr")
        .port()
}

/// Polls `check` every [`POLL`] until it returns `Some`, or `None` at the deadline.
pub async fn poll_until<T, F, Fut>(deadline: Duration, check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    poll_every(POLL, deadline, check).await
}

/// Polls `check` every `interval` until it returns `Some`, or `None` at the deadline.
pub async fn poll_every<T, F, Fut>(
    interval: Duration,
    deadline: Duration,
    mut check: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        tokio::time::sleep(interval).await;
    }
}

/// `sha256=<hex HMAC-SHA256(secret, body)>`, the `X-Keel-Signature` value.
pub fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("hmac key");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Hex SHA-256 of a file's bytes.
pub fn sha256_file(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    hex::encode(Sha256::digest(&bytes))
}

/// Percent-encodes one path segment (everything but unreserved characters and `:`).
pub fn encode_segment(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_~:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A TOML basic string literal (JSON string escapes are valid TOML escapes).
pub fn toml_str(s: &str) -> String {
    serde_json::to_string(s).expect("string to json")
}

/// The config file the harness writes for `keel run --config`.
#[derive(Clone, Debug, Default)]
pub struct Config {
    /// `webhook.secret`; when set, [`Daemon::post_message`] signs its requests.
    pub secret: Option<String>,
    /// `webhook.reply_url`.
    pub reply_url: Option<String>,
    /// `shutdown_timeout_ms`.
    pub shutdown_timeout_ms: Option<u64>,
    /// `webhook.max_body_bytes`.
    pub max_body_bytes: Option<u64>,
    /// `agent.url` (with `agent.timeout_ms` and `agent.attempts`).
    pub agent: Option<(String, u64, u32)>,
    /// `[owner]` chat on the webhook channel.
    pub owner_chat: Option<String>,
    /// `[owner] min_interval_s` (keel's default coalesces notices for 300 s).
    pub owner_interval_s: Option<u64>,
    /// TOML appended verbatim (whole sections, e.g. `[storage]\nencrypt = false\n`).
    pub extra: String,
}

impl Config {
    /// Renders the config as TOML (data dir and listen address come from flags).
    pub fn to_toml(&self) -> String {
        let mut s = String::from("log_level = \"info\"\n");
        if let Some(ms) = self.shutdown_timeout_ms {
            s.push_str(&format!("shutdown_timeout_ms = {ms}\n"));
        }
        s.push_str("\n[webhook]\nenabled = true\n");
        if let Some(secret) = &self.secret {
            s.push_str(&format!("secret = {}\n", toml_str(secret)));
        }
        if let Some(url) = &self.reply_url {
            s.push_str(&format!("reply_url = {}\n", toml_str(url)));
        }
        if let Some(max) = self.max_body_bytes {
            s.push_str(&format!("max_body_bytes = {max}\n"));
        }
        if let Some((url, timeout_ms, attempts)) = &self.agent {
            s.push_str(&format!(
                "\n[agent]\nurl = {}\ntimeout_ms = {timeout_ms}\nattempts = {attempts}\n",
                toml_str(url)
            ));
        }
        if let Some(chat) = &self.owner_chat {
            s.push_str(&format!(
                "\n[owner]\nchannel = \"webhook\"\nchat = {}\n",
                toml_str(chat)
            ));
            if let Some(secs) = self.owner_interval_s {
                s.push_str(&format!("min_interval_s = {secs}\n"));
            }
        }
        if !self.extra.is_empty() {
            s.push('\n');
            s.push_str(&self.extra);
        }
        s
    }
}

/// An HTTP answer: status code and body text.
#[derive(Clone, Debug)]
pub struct Resp {
    pub status: u16,
    pub body: String,
}

impl Resp {
    /// The body as JSON, or `Value::Null` when it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    /// Checks the error body contract: JSON with a one-line string `error`.
    pub fn error_problem(&self) -> Option<String> {
        match self.json().get("error") {
            Some(Value::String(e)) if !e.is_empty() && !e.contains('\n') && !e.contains('\r') => {
                None
            }
            _ => Some(format!(
                "error body is not JSON with a one-line \"error\": {:?}",
                self.body.chars().take(300).collect::<String>()
            )),
        }
    }
}

/// A turn as reported by `GET /v1/sessions/{session}/turns`.
#[derive(Clone, Debug)]
pub struct Turn {
    pub seq: i64,
    pub role: String,
    pub text: String,
    pub key: Option<String>,
    /// The sender's id (user turns).
    pub from: Option<String>,
    /// `text`, a media kind, `edit`, `callback`, …
    pub kind: String,
    pub sent: Option<bool>,
}

impl Turn {
    fn from_json(v: &Value) -> Turn {
        Turn {
            seq: v.get("seq").and_then(Value::as_i64).unwrap_or(-1),
            role: v
                .get("role")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            text: v
                .get("text")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            key: match v.get("key") {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Number(n)) => Some(n.to_string()),
                _ => None,
            },
            from: v.get("from").and_then(Value::as_str).map(str::to_string),
            kind: v
                .get("kind")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            sent: v.get("sent").and_then(Value::as_bool),
        }
    }
}

/// The HTTP client the tests use: no proxy, no pooled connections (a pooled
/// connection closed by the server would turn into a spurious error).
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(REQUEST_TIMEOUT)
        .build()
        .expect("reqwest client")
}

/// Sends a request and collects status and body.
pub async fn send(req: reqwest::RequestBuilder) -> Result<Resp, reqwest::Error> {
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let body = resp.text().await?;
    Ok(Resp { status, body })
}

/// Why a daemon start did not reach ready.
enum BootFailure {
    Exited(ExitStatus),
    Timeout,
}

/// One `keel run` process and its data dir, restartable on the same dir.
pub struct Daemon {
    /// Temp tree holding the data dir (unless one was given), config and logs.
    root: TempDir,
    pub data_dir: PathBuf,
    pub config: Config,
    pub config_path: PathBuf,
    pub stderr_path: PathBuf,
    pub stdout_path: PathBuf,
    /// Port of the current (or last) boot; a fresh one is chosen at every boot.
    pub port: u16,
    child: Option<Child>,
    /// Length of the stderr file when the current boot started.
    boot_offset: u64,
    pub boots: u32,
    pub client: reqwest::Client,
    /// Start the child with SIGXFSZ ignored (for `RLIMIT_FSIZE` fault tests).
    pub ignore_sigxfsz: bool,
    /// Extra environment for `keel run` (e.g. tokens from env).
    pub env: Vec<(String, String)>,
    /// Extra flags for `keel run` (e.g. `--accept-data-loss`).
    pub args: Vec<String>,
    /// A program (and its flags) that execs keel, e.g. `setpriv …`.
    pub wrapper: Vec<String>,
}

impl Daemon {
    /// Starts keel on a fresh temp data dir and waits until `/readyz` is 200.
    pub async fn start(config: Config) -> Daemon {
        let mut d = Daemon::new(config, None);
        d.boot().await;
        d
    }

    /// Starts keel on the given data dir (e.g. a tmpfs mount point).
    pub async fn start_in(config: Config, data_dir: PathBuf) -> Daemon {
        let mut d = Daemon::new(config, Some(data_dir));
        d.boot().await;
        d
    }

    /// Prepares a daemon (temp tree, config file) without starting it.
    pub fn new(config: Config, data_dir: Option<PathBuf>) -> Daemon {
        let root = tempfile::Builder::new()
            .prefix("keel-test-")
            .tempdir()
            .expect("tempdir");
        let data_dir = data_dir.unwrap_or_else(|| root.path().join("data"));
        std::fs::create_dir_all(&data_dir).expect("create data dir");
        let config_path = root.path().join("keel.toml");
        std::fs::write(&config_path, config.to_toml()).expect("write config");
        Daemon {
            stderr_path: root.path().join("keel.stderr"),
            stdout_path: root.path().join("keel.stdout"),
            root,
            data_dir,
            config,
            config_path,
            port: 0,
            child: None,
            boot_offset: 0,
            boots: 0,
            client: http_client(),
            ignore_sigxfsz: false,
            env: Vec::new(),
            args: Vec::new(),
            wrapper: Vec::new(),
        }
    }

    /// The temp tree of this daemon (config, logs; the data dir by default).
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// `DATA_DIR/keel.db`.
    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("keel.db")
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base(), path)
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The command line of `keel run` for this daemon on the given port.
    pub fn run_command(&self, port: u16) -> Command {
        let mut cmd = match self.wrapper.split_first() {
            Some((program, flags)) => {
                let mut c = Command::new(program);
                c.args(flags).arg(keel_bin());
                c
            }
            None => Command::new(keel_bin()),
        };
        cmd.arg("run")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--config")
            .arg(&self.config_path)
            .env_remove("KEEL_DATA_DIR")
            .env_remove("KEEL_LISTEN")
            .env_remove("KEEL_CONFIG")
            .env_remove("KEEL_MASTER_KEY")
            .env("NO_COLOR", "1")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(&self.args);
        cmd
    }

    /// Spawns `keel run` without waiting for readiness (stderr appended to the log).
    pub fn spawn(&mut self) {
        assert!(
            self.child.is_none(),
            "spawn while a keel process is running"
        );
        self.port = free_port();
        let stderr = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_path)
            .expect("open stderr log");
        self.boot_offset = stderr.metadata().map(|m| m.len()).unwrap_or(0);
        let stdout = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stdout_path)
            .expect("open stdout log");
        let mut cmd = self.run_command(self.port);
        if self.ignore_sigxfsz {
            use std::os::unix::process::CommandExt;
            // SAFETY: the closure only calls signal(2), which is async-signal-safe;
            // an ignored disposition survives execve.
            unsafe {
                cmd.pre_exec(|| {
                    libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                    Ok(())
                });
            }
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr))
            .spawn()
            .expect("spawn keel");
        self.child = Some(child);
        self.boots += 1;
    }

    /// Spawns and waits for ready; retries with another port if the port was taken.
    pub async fn boot(&mut self) {
        for _attempt in 0..3 {
            self.spawn();
            match self.wait_ready_or_exit(READY_DEADLINE).await {
                Ok(()) => return,
                Err(BootFailure::Exited(status)) => {
                    let log = self.stderr_boot();
                    if log.contains("in use") || log.contains("AddrInUse") {
                        continue;
                    }
                    panic!(
                        "keel exited during startup ({status}); stderr:\n{}",
                        tail(&log, 40)
                    );
                }
                Err(BootFailure::Timeout) => {
                    let readyz = self.readyz().await;
                    self.sigkill();
                    panic!(
                        "keel not ready within {READY_DEADLINE:?} (last /readyz: {readyz:?}); stderr:\n{}",
                        tail(&self.stderr_boot(), 40)
                    );
                }
            }
        }
        panic!("keel could not bind a free port in 3 attempts");
    }

    /// Starts again on the same data dir (the previous process must be gone).
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "restart while keel still runs");
        self.boot().await;
    }

    async fn wait_ready_or_exit(&mut self, deadline: Duration) -> Result<(), BootFailure> {
        let end = Instant::now() + deadline;
        loop {
            if let Some(status) = self.try_wait() {
                return Err(BootFailure::Exited(status));
            }
            if let Ok(r) = self.readyz().await {
                if r.status == 200 {
                    return Ok(());
                }
            }
            if Instant::now() >= end {
                return Err(BootFailure::Timeout);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Polls `/readyz` until it answers 200; false at the deadline.
    pub async fn wait_ready(&self, deadline: Duration) -> bool {
        poll_until(deadline, || async {
            match self.readyz().await {
                Ok(r) if r.status == 200 => Some(()),
                _ => None,
            }
        })
        .await
        .is_some()
    }

    /// Non-blocking check whether the process exited; reaps it if so.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        match child.try_wait().expect("try_wait") {
            Some(status) => {
                self.child = None;
                Some(status)
            }
            None => None,
        }
    }

    /// Sends a signal to the running process.
    pub fn signal(&self, sig: libc::c_int) {
        let pid = self.pid().expect("signal: keel is not running");
        // SAFETY: kill(2) on the pid of our own child, which has not been reaped.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
    }

    /// Waits until `sig`, sent to the whole process, is no longer pending (it reached
    /// the handler); standard signals sent while one is pending merge into one.
    pub async fn wait_signal_taken(&self, sig: libc::c_int, deadline: Duration) -> bool {
        let pid = self.pid().expect("keel is not running");
        let bit = 1u64 << (sig - 1);
        poll_every(Duration::from_millis(2), deadline, || async move {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let pending = status
                .lines()
                .find_map(|l| l.strip_prefix("ShdPnd:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())?;
            (pending & bit == 0).then_some(())
        })
        .await
        .is_some()
    }

    /// Kills the real process with SIGKILL and reaps it.
    pub fn sigkill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
            let _ = child.wait();
        }
    }

    /// Polls until the process exits; `None` if it still runs at the deadline.
    pub async fn wait_exit(&mut self, deadline: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + deadline;
        loop {
            if self.child.is_none() {
                panic!("wait_exit: keel is not running");
            }
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= end {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGTERM, then wait for the exit; panics (after SIGKILL) past the deadline.
    pub async fn sigterm(&mut self, deadline: Duration) -> ExitStatus {
        self.signal(libc::SIGTERM);
        match self.wait_exit(deadline).await {
            Some(status) => status,
            None => {
                self.sigkill();
                panic!(
                    "keel did not exit within {deadline:?} after SIGTERM; stderr:\n{}",
                    tail(&self.stderr_boot(), 40)
                );
            }
        }
    }

    /// Replaces the config file (for SIGHUP reload tests).
    pub fn write_config_text(&self, text: &str) {
        let tmp = self.config_path.with_extension("toml.tmp");
        std::fs::write(&tmp, text).expect("write config");
        std::fs::rename(&tmp, &self.config_path).expect("rename config");
    }

    /// All stderr written by every boot so far.
    pub fn stderr_all(&self) -> String {
        read_lossy(&self.stderr_path)
    }

    /// Stderr written since the current (or last) boot started.
    pub fn stderr_boot(&self) -> String {
        let all = std::fs::read(&self.stderr_path).unwrap_or_default();
        let from = (self.boot_offset as usize).min(all.len());
        String::from_utf8_lossy(&all[from..]).into_owned()
    }

    /// Waits until `needle` occurs at least `count` times in this boot's stderr.
    pub async fn wait_for_log(&self, needle: &str, count: usize, deadline: Duration) -> bool {
        poll_until(deadline, || async {
            (self.stderr_boot().matches(needle).count() >= count).then_some(())
        })
        .await
        .is_some()
    }

    /// Asserts that no boot so far logged a panic.
    pub fn assert_no_panics(&self) {
        let log = self.stderr_all();
        assert!(
            !log.contains("panicked"),
            "keel logged a panic:\n{}",
            tail(&log, 60)
        );
    }

    pub async fn get(&self, path: &str) -> Result<Resp, reqwest::Error> {
        send(self.client.get(self.url(path))).await
    }

    pub async fn readyz(&self) -> Result<Resp, reqwest::Error> {
        self.get("/readyz").await
    }

    pub async fn healthz(&self) -> Result<Resp, reqwest::Error> {
        self.get("/healthz").await
    }

    /// POSTs raw bytes to `/v1/messages` with the given extra headers.
    pub async fn post_raw(
        &self,
        body: Vec<u8>,
        headers: &[(&str, String)],
    ) -> Result<Resp, reqwest::Error> {
        let mut req = self
            .client
            .post(self.url("/v1/messages"))
            .header("content-type", "application/json");
        for (k, v) in headers {
            req = req.header(*k, v.as_str());
        }
        send(req.body(body)).await
    }

    /// POSTs a message, signed with the configured secret when there is one.
    pub async fn post_message(&self, msg: &Value) -> Result<Resp, reqwest::Error> {
        let body = serde_json::to_vec(msg).expect("serialize");
        let headers: Vec<(&str, String)> = match &self.config.secret {
            Some(secret) => vec![("x-keel-signature", sign(secret, &body))],
            None => vec![],
        };
        self.post_raw(body, &headers).await
    }

    /// POSTs a message and asserts a 200 answer; returns the JSON body.
    pub async fn post_ok(&self, id: &str, chat: &str, text: &str) -> Value {
        let msg = json!({"id": id, "chat": chat, "from": "tester", "text": text});
        let r = self
            .post_message(&msg)
            .await
            .unwrap_or_else(|e| panic!("POST {msg}: {e}"));
        assert_eq!(r.status, 200, "POST {msg} answered {} {}", r.status, r.body);
        r.json()
    }

    /// `GET /v1/sessions` → the `sessions` array.
    pub async fn sessions(&self) -> Vec<Value> {
        let r = self.get("/v1/sessions").await.expect("GET /v1/sessions");
        assert_eq!(r.status, 200, "GET /v1/sessions: {} {}", r.status, r.body);
        r.json()
            .get("sessions")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_else(|| panic!("GET /v1/sessions: no sessions array in {}", r.body))
    }

    /// Session ids reported by `GET /v1/sessions`.
    pub async fn session_ids(&self) -> Vec<String> {
        self.sessions()
            .await
            .iter()
            .filter_map(|s| s.get("id").and_then(Value::as_str).map(str::to_string))
            .collect()
    }

    /// `GET /v1/sessions/{session}/turns` → the turns.
    pub async fn turns(&self, session: &str) -> Vec<Turn> {
        let path = format!("/v1/sessions/{}/turns", encode_segment(session));
        let r = self.get(&path).await.expect("GET turns");
        assert_eq!(r.status, 200, "GET {path}: {} {}", r.status, r.body);
        let v = r.json();
        assert_eq!(
            v.get("session").and_then(Value::as_str),
            Some(session),
            "GET {path}: wrong session in {}",
            r.body
        );
        v.get("turns")
            .and_then(Value::as_array)
            .unwrap_or_else(|| panic!("GET {path}: no turns array in {}", r.body))
            .iter()
            .map(Turn::from_json)
            .collect()
    }

    /// Every turn of every session, by session id.
    pub async fn all_turns(&self) -> BTreeMap<String, Vec<Turn>> {
        let mut out = BTreeMap::new();
        for id in self.session_ids().await {
            let turns = self.turns(&id).await;
            out.insert(id, turns);
        }
        out
    }

    /// How many user turns carry each key, over all sessions.
    pub async fn user_key_counts(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for turns in self.all_turns().await.values() {
            for t in turns.iter().filter(|t| t.role == "user") {
                if let Some(k) = &t.key {
                    *counts.entry(k.clone()).or_insert(0) += 1;
                }
            }
        }
        counts
    }

    /// Runs a CLI subcommand (`keel ARGS...`) to completion with a deadline.
    /// `keel ARGS… --data-dir D --config C [-- TAIL…]` against this daemon.
    pub async fn cli_here(&self, args: &[&str], tail: &[&str]) -> Output {
        let data_dir = self.data_dir.to_string_lossy().into_owned();
        let config = self.config_path.to_string_lossy().into_owned();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--data-dir", &data_dir, "--config", &config]);
        if !tail.is_empty() {
            all.push("--");
            all.extend(tail);
        }
        self.cli(&all).await
    }

    pub async fn cli(&self, args: &[&str]) -> Output {
        run_keel(args, None, Duration::from_secs(60)).await
    }

    /// `keel status --json` against this daemon's data dir and config.
    pub async fn status_json(&self) -> Output {
        let data_dir = self.data_dir.to_string_lossy().into_owned();
        let config = self.config_path.to_string_lossy().into_owned();
        self.cli(&[
            "status",
            "--json",
            "--data-dir",
            &data_dir,
            "--config",
            &config,
        ])
        .await
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.sigkill();
    }
}

/// Runs `keel ARGS...` with optional stdin input; kills it past the deadline and panics.
pub async fn run_keel(args: &[&str], stdin: Option<&[u8]>, deadline: Duration) -> Output {
    run_keel_env(args, &[], stdin, deadline).await
}

/// [`run_keel`] with extra environment (e.g. `KEEL_MASTER_KEY`).
pub async fn run_keel_env(
    args: &[&str],
    env: &[(&str, &str)],
    stdin: Option<&[u8]>,
    deadline: Duration,
) -> Output {
    use tokio::io::AsyncWriteExt;
    let mut cmd = tokio::process::Command::new(keel_bin());
    cmd.args(args)
        .env_remove("KEEL_DATA_DIR")
        .env_remove("KEEL_LISTEN")
        .env_remove("KEEL_CONFIG")
        .env_remove("KEEL_MASTER_KEY")
        .envs(env.iter().copied())
        .env("NO_COLOR", "1")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn keel");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin pipe");
        pipe.write_all(input).await.expect("write stdin");
        drop(pipe);
    }
    match tokio::time::timeout(deadline, child.wait_with_output()).await {
        Ok(out) => out.expect("wait keel"),
        Err(_) => panic!(
            "`keel {}` did not finish within {deadline:?}",
            args.join(" ")
        ),
    }
}

/// Last `n` lines of a log.
pub fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn read_lossy(path: &Path) -> String {
    let mut bytes = Vec::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_end(&mut bytes);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// What a raw socket request got back.
#[derive(Debug)]
pub enum RawOutcome {
    /// A status line was read: code and whatever body arrived.
    Status(u16, String),
    /// The server closed or reset the connection without a status line.
    Closed,
    /// Neither an answer nor a close within the deadline.
    Timeout,
}

/// Sends raw bytes to 127.0.0.1:port and reads one HTTP answer.
/// With `half_close`, the write side is shut down after sending.
pub async fn raw_request(
    port: u16,
    request: &[u8],
    half_close: bool,
    deadline: Duration,
) -> RawOutcome {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = request.to_vec();
    let attempt = async move {
        let stream = match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            Ok(s) => s,
            Err(e) => panic!("connect 127.0.0.1:{port}: {e}"),
        };
        let (mut rd, mut wr) = stream.into_split();
        // Write concurrently with reading: the server may answer (and close) before
        // it has read everything, so write errors are expected and ignored.
        let writer = tokio::spawn(async move {
            let _ = wr.write_all(&request).await;
            if half_close {
                let _ = wr.shutdown().await;
            }
            // Keep the write half open until the reader is done.
            wr
        });
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            match rd.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if let Some(done) = complete_response(&buf) {
                buf.truncate(done);
                break;
            }
        }
        writer.abort();
        parse_status(&buf)
    };
    tokio::time::timeout(deadline, attempt)
        .await
        .unwrap_or(RawOutcome::Timeout)
}

/// Length of a complete response in `buf` (headers plus Content-Length body), if any.
fn complete_response(buf: &[u8]) -> Option<usize> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())?;
    (buf.len() >= end + len).then_some(end + len)
}

fn parse_status(buf: &[u8]) -> RawOutcome {
    let text = String::from_utf8_lossy(buf);
    let mut parts = text.splitn(3, ' ');
    match (parts.next(), parts.next()) {
        (Some(v), Some(code)) if v.starts_with("HTTP/") => match code.parse() {
            Ok(code) => {
                let body = text
                    .split_once("\r\n\r\n")
                    .map(|(_, b)| b.to_string())
                    .unwrap_or_default();
                RawOutcome::Status(code, body)
            }
            Err(_) => RawOutcome::Closed,
        },
        _ => RawOutcome::Closed,
    }
}

/// A fake `webhook.reply_url` receiver: records every POSTed reply and answers 200.
pub struct ReplyServer {
    pub url: String,
    replies: Arc<Mutex<Vec<Value>>>,
    /// The sender's address of each reply, in the same order.
    peers: Arc<Mutex<Vec<String>>>,
    handle: actix_web::dev::ServerHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ReplyServer {
    /// Starts the receiver on a free port in its own thread and actix system.
    pub fn start() -> ReplyServer {
        use actix_web::{web, App, HttpResponse, HttpServer};
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind reply server");
        let url = format!(
            "http://127.0.0.1:{}/replies",
            listener.local_addr().expect("addr").port()
        );
        let replies: Arc<Mutex<Vec<Value>>> = Arc::default();
        let peers: Arc<Mutex<Vec<String>>> = Arc::default();
        let store = (replies.clone(), peers.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let system = actix_web::rt::System::new();
            system.block_on(async move {
                let server = HttpServer::new(move || {
                    let store = store.clone();
                    App::new()
                        .app_data(web::PayloadConfig::new(16 * 1024 * 1024))
                        .default_service(web::to(
                            move |req: actix_web::HttpRequest, body: web::Bytes| {
                                let store = store.clone();
                                async move {
                                    let v = serde_json::from_slice(&body).unwrap_or_else(
                                        |_| json!({"unparsed": String::from_utf8_lossy(&body)}),
                                    );
                                    let peer =
                                        req.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                                    let mut replies = store.0.lock().expect("replies lock");
                                    replies.push(v);
                                    store.1.lock().expect("peers lock").push(peer);
                                    drop(replies);
                                    HttpResponse::Ok().json(json!({"ok": true}))
                                }
                            },
                        ))
                })
                .workers(1)
                .disable_signals()
                .listen(listener)
                .expect("listen reply server")
                .run();
                tx.send(server.handle()).expect("send handle");
                let _ = server.await;
            });
        });
        let handle = rx.recv().expect("reply server started");
        ReplyServer {
            url,
            replies,
            peers,
            handle,
            thread: Some(thread),
        }
    }

    /// Every reply received so far.
    pub fn replies(&self) -> Vec<Value> {
        self.replies.lock().expect("replies lock").clone()
    }

    /// The sender's address (`ip:port`) of every reply so far, in the
    /// order of [`ReplyServer::replies`].
    pub fn peers(&self) -> Vec<String> {
        self.peers.lock().expect("peers lock").clone()
    }

    /// The text of the first reply to message `id`, waited for up to `deadline`.
    pub async fn reply_to(&self, id: &str, deadline: Duration) -> String {
        poll_every(Duration::from_millis(20), deadline, || async {
            self.replies()
                .into_iter()
                .find(|r| r["in_reply_to"] == id)
                .and_then(|r| r["text"].as_str().map(str::to_string))
        })
        .await
        .unwrap_or_else(|| panic!("no reply to {id} within {deadline:?}"))
    }

    /// How many replies arrived per `in_reply_to`.
    pub fn in_reply_to_counts(&self) -> HashMap<String, usize> {
        let mut out = HashMap::new();
        for r in self.replies() {
            let key = match r.get("in_reply_to") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                _ => continue,
            };
            *out.entry(key).or_insert(0) += 1;
        }
        out
    }
}

impl Drop for ReplyServer {
    fn drop(&mut self) {
        let stop = self.handle.stop(false);
        futures::executor::block_on(stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A fake external agent (`agent.url`): records every request and answers
/// `{"text": "agent: <text>"}`, or HTTP 500 while `failing` is set.
pub struct AgentServer {
    pub url: String,
    requests: Arc<Mutex<Vec<Value>>>,
    pub failing: Arc<std::sync::atomic::AtomicBool>,
    handle: actix_web::dev::ServerHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AgentServer {
    pub fn start() -> AgentServer {
        use actix_web::{web, App, HttpResponse, HttpServer};
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind agent server");
        let url = format!(
            "http://127.0.0.1:{}/agent",
            listener.local_addr().expect("addr").port()
        );
        let requests: Arc<Mutex<Vec<Value>>> = Arc::default();
        let failing = Arc::new(AtomicBool::new(false));
        let (store, fail) = (requests.clone(), failing.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let system = actix_web::rt::System::new();
            system.block_on(async move {
                let server = HttpServer::new(move || {
                    let (store, fail) = (store.clone(), fail.clone());
                    App::new().default_service(web::to(move |body: web::Bytes| {
                        let (store, fail) = (store.clone(), fail.clone());
                        async move {
                            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                            store.lock().expect("agent lock").push(v.clone());
                            if fail.load(Ordering::SeqCst) {
                                return HttpResponse::InternalServerError().finish();
                            }
                            let text = v["text"].as_str().unwrap_or("").to_string();
                            HttpResponse::Ok().json(json!({"text": format!("agent: {text}")}))
                        }
                    }))
                })
                .workers(1)
                .disable_signals()
                .listen(listener)
                .expect("listen agent server")
                .run();
                tx.send(server.handle()).expect("send handle");
                let _ = server.await;
            });
        });
        let handle = rx.recv().expect("agent server started");
        AgentServer {
            url,
            requests,
            failing,
            handle,
            thread: Some(thread),
        }
    }

    /// Every request body received so far.
    pub fn requests(&self) -> Vec<Value> {
        self.requests.lock().expect("agent lock").clone()
    }
}

impl Drop for AgentServer {
    fn drop(&mut self) {
        futures::executor::block_on(self.handle.stop(false));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A server that accepts connections and never answers (a stuck upstream).
pub struct HangServer {
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

impl HangServer {
    pub async fn start() -> HangServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind hang server");
        let url = format!(
            "http://127.0.0.1:{}/replies",
            listener.local_addr().expect("addr").port()
        );
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((sock, _)) = listener.accept().await {
                held.push(sock);
            }
        });
        HangServer { url, task }
    }
}

impl Drop for HangServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The outcome of one operation as the client saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// 200: acknowledged, must be present exactly once.
    Ok,
    /// A definite 4xx rejection: must not be present.
    Fail,
    /// No answer, a transport error or a 5xx: may or may not be present.
    Unknown,
}

/// One operation in the ledger.
#[derive(Clone, Debug)]
pub struct Op {
    pub chat: String,
    pub from: String,
    pub text: String,
    pub outcome: Outcome,
}

/// What the ledger found after the faults.
#[derive(Debug, Default)]
pub struct Verdict {
    pub invoked: usize,
    pub acked: usize,
    pub failed: usize,
    pub unknown: usize,
    /// Acknowledged but absent.
    pub lost: Vec<String>,
    /// Present more than once.
    pub dup: Vec<String>,
    /// Present but never sent.
    pub unexpected: Vec<String>,
    /// Rejected (4xx) but present.
    pub failed_present: Vec<String>,
    /// Unknown outcome, present.
    pub recovered: usize,
}

impl Verdict {
    /// The figures as one JSON line (TESTING.md section F).
    pub fn figures(&self) -> Value {
        json!({
            "invoked": self.invoked, "acked": self.acked, "failed": self.failed,
            "unknown": self.unknown, "lost": self.lost.len(), "dup": self.dup.len(),
            "unexpected": self.unexpected.len(), "failed_present": self.failed_present.len(),
            "recovered": self.recovered,
        })
    }

    /// Asserts lost = dup = unexpected = failed_present = 0.
    pub fn assert_clean(&self) {
        eprintln!("ledger: {}", self.figures());
        let sample = |v: &Vec<String>| v.iter().take(10).cloned().collect::<Vec<_>>();
        assert!(
            self.lost.is_empty()
                && self.dup.is_empty()
                && self.unexpected.is_empty()
                && self.failed_present.is_empty(),
            "ledger violations {}: lost {:?}, dup {:?}, unexpected {:?}, failed_present {:?}",
            self.figures(),
            sample(&self.lost),
            sample(&self.dup),
            sample(&self.unexpected),
            sample(&self.failed_present)
        );
    }
}

/// Jepsen-style record of every operation (kept outside the data dir).
#[derive(Default)]
pub struct Ledger {
    ops: Mutex<BTreeMap<String, Op>>,
}

impl Ledger {
    pub fn new() -> Ledger {
        Ledger::default()
    }

    /// Records an operation as invoked (outcome unknown until answered).
    pub fn invoke(&self, id: &str, chat: &str, from: &str, text: &str) {
        let op = Op {
            chat: chat.to_string(),
            from: from.to_string(),
            text: text.to_string(),
            outcome: Outcome::Unknown,
        };
        let prev = self.ops.lock().expect("ledger").insert(id.to_string(), op);
        assert!(prev.is_none(), "ledger: id {id} invoked twice");
    }

    pub fn complete(&self, id: &str, outcome: Outcome) {
        if let Some(op) = self.ops.lock().expect("ledger").get_mut(id) {
            op.outcome = outcome;
        }
    }

    /// Classifies an HTTP result (200 ok, 4xx fail, anything else unknown).
    pub fn complete_with(&self, id: &str, result: &Result<Resp, reqwest::Error>) -> Outcome {
        let outcome = match result {
            Ok(r) if r.status == 200 => Outcome::Ok,
            Ok(r) if (400..500).contains(&r.status) => Outcome::Fail,
            _ => Outcome::Unknown,
        };
        self.complete(id, outcome);
        outcome
    }

    pub fn ops(&self) -> BTreeMap<String, Op> {
        self.ops.lock().expect("ledger").clone()
    }

    pub fn count(&self, outcome: Outcome) -> usize {
        self.ops
            .lock()
            .expect("ledger")
            .values()
            .filter(|o| o.outcome == outcome)
            .count()
    }

    /// Ids with the given outcome.
    pub fn ids(&self, outcome: Outcome) -> Vec<String> {
        self.ops
            .lock()
            .expect("ledger")
            .iter()
            .filter(|(_, o)| o.outcome == outcome)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Compares the ledger with the user turn keys the daemon reports.
    pub fn check(&self, observed: &HashMap<String, usize>) -> Verdict {
        let ops = self.ops.lock().expect("ledger");
        let mut v = Verdict {
            invoked: ops.len(),
            ..Verdict::default()
        };
        for (id, op) in ops.iter() {
            let n = observed.get(id).copied().unwrap_or(0);
            match op.outcome {
                Outcome::Ok => {
                    v.acked += 1;
                    if n == 0 {
                        v.lost.push(id.clone());
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
        }
        for (key, n) in observed {
            if !ops.contains_key(key) {
                v.unexpected.push(format!("{key} (x{n})"));
            }
        }
        v
    }
}

/// The seed of a test's random choices: `SEED` replays one; printed at start and
/// again if the test panics.
pub struct Seed {
    pub value: u64,
    test: &'static str,
}

impl Seed {
    pub fn from_env(test: &'static str) -> Seed {
        let value = match std::env::var("SEED") {
            Ok(s) => s
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("SEED={s:?} is not a u64")),
            Err(_) => rand::random(),
        };
        eprintln!("{test}: SEED={value}");
        Seed { value, test }
    }

    pub fn rng(&self) -> StdRng {
        StdRng::seed_from_u64(self.value)
    }
}

impl Drop for Seed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "{} failed; replay with SEED={} cargo test {}",
                self.test, self.value, self.test
            );
        }
    }
}

/// One concurrent webhook client of a [`Load`].
#[derive(Clone, Debug)]
pub struct ClientSpec {
    /// Chat the client writes to (several clients may share one).
    pub chat: String,
    /// Prefix of its message ids; ids are `{prefix}-{n}`.
    pub prefix: String,
}

/// `n` clients: all but the last two have their own chat, the last two share one.
pub fn client_specs(n: usize, tag: &str) -> Vec<ClientSpec> {
    (0..n)
        .map(|i| ClientSpec {
            chat: if i + 2 >= n {
                "shared".to_string()
            } else {
                format!("c{i}")
            },
            prefix: format!("{tag}-k{i}"),
        })
        .collect()
}

/// Concurrent clients posting to one daemon until stopped, recording into a ledger.
pub struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// Starts one task per client against `base` (signing with `secret` if given).
    pub fn start(
        base: String,
        secret: Option<String>,
        specs: Vec<ClientSpec>,
        ledger: Arc<Ledger>,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let client = http_client();
        let tasks = specs
            .into_iter()
            .map(|spec| {
                let (stop, acked, ledger, client) =
                    (stop.clone(), acked.clone(), ledger.clone(), client.clone());
                let (base, secret) = (base.clone(), secret.clone());
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        let id = format!("{}-{n}", spec.prefix);
                        n += 1;
                        let text = format!("hello from {id}");
                        let body = serde_json::to_vec(&json!({
                            "id": id, "chat": spec.chat, "from": spec.prefix, "text": text,
                        }))
                        .expect("serialize");
                        ledger.invoke(&id, &spec.chat, &spec.prefix, &text);
                        let mut req = client
                            .post(format!("{base}/v1/messages"))
                            .header("content-type", "application/json");
                        if let Some(s) = &secret {
                            req = req.header("x-keel-signature", sign(s, &body));
                        }
                        let result = send(req.body(body)).await;
                        match ledger.complete_with(&id, &result) {
                            Outcome::Ok => {
                                acked.fetch_add(1, Ordering::SeqCst);
                            }
                            // Pace retries against a dead or refusing daemon.
                            _ => tokio::time::sleep(Duration::from_millis(20)).await,
                        }
                    }
                })
            })
            .collect();
        Load { stop, acked, tasks }
    }

    /// Messages acknowledged by this load so far.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::SeqCst)
    }

    /// Waits until this load has at least `n` acks; false at the deadline.
    pub async fn wait_acked(&self, n: u64, deadline: Duration) -> bool {
        poll_until(deadline, || async { (self.acked() >= n).then_some(()) })
            .await
            .is_some()
    }

    /// Stops the clients and waits for them (each request has its own timeout).
    pub async fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.await.expect("load client task");
        }
    }
}

/// The master key keel keeps in `dir/master.key`, as 64 hex characters.
pub fn master_key_hex(dir: &Path) -> Option<String> {
    std::fs::read_to_string(dir.join("master.key"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Open a database of a data dir the way keel does: unlocked with the
/// dir's `master.key` when there is one. A database that does not exist
/// yet is created encrypted with a fresh 0600 key file (as keel's first
/// start would), so tests can prepare stores keel then opens.
pub fn open_db(db: &Path) -> rusqlite::Connection {
    open_db_with(db, rusqlite::OpenFlags::default())
}

/// [`open_db`] with explicit open flags (e.g. read-only).
pub fn open_db_with(db: &Path, flags: rusqlite::OpenFlags) -> rusqlite::Connection {
    let dir = db.parent().expect("db has a parent dir");
    let mut key = master_key_hex(dir);
    if key.is_none() && !db.exists() {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let hex: String = (0..32)
            .map(|_| format!("{:02x}", rand::random::<u8>()))
            .collect();
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.join("master.key"))
            .expect("create master.key");
        writeln!(f, "{hex}").expect("write master.key");
        key = Some(hex);
    }
    // A plain store (`[storage] encrypt = false`) is opened without the key.
    let plain = std::fs::read(db)
        .map(|b| b.starts_with(b"SQLite format 3\0"))
        .unwrap_or(false);
    let conn = rusqlite::Connection::open_with_flags(db, flags).expect("open db");
    if let Some(k) = key.filter(|_| !plain) {
        conn.execute_batch(&format!(
            "PRAGMA cipher_log_level = NONE; PRAGMA key = \"x'{k}'\";"
        ))
        .expect("apply key");
    }
    conn.busy_timeout(Duration::from_secs(5))
        .expect("busy timeout");
    conn
}

/// `PRAGMA integrity_check` on a stopped daemon's database.
pub fn integrity_check(db: &Path) -> String {
    let conn = open_db(db);
    conn.query_row("PRAGMA integrity_check", [], |r| r.get::<_, String>(0))
        .expect("integrity_check")
}

/// True when the tests run as root (mount tests need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// For tests that need root: returns false (after printing why) when they must skip;
/// panics instead when `KEEL_TEST_REQUIRE_ROOT` is set.
pub fn root_or_skip(test: &str) -> bool {
    if is_root() {
        return true;
    }
    if std::env::var_os("KEEL_TEST_REQUIRE_ROOT").is_some_and(|v| v != "0" && !v.is_empty()) {
        panic!("{test}: needs root and KEEL_TEST_REQUIRE_ROOT is set");
    }
    eprintln!("{test}: skipped: needs root");
    false
}
