//! `keel bench`: the benchmark load generator.
//!
//! Drives N concurrent webhook clients (closed loop: send, wait for the 200,
//! send the next) against a real keel started from this very binary on a
//! fresh data dir with `synchronous=FULL`, and prints acknowledged
//! messages/s and p50/p99 acknowledgement latency next to two references
//! measured in the same run on the same machine:
//!
//! - (a) the same rows, one transaction (one fsync) per message;
//! - (b) the same rows, `--batch` messages per transaction: the machine's
//!   limit for these rows.
//!
//! Speed is reported as ratios against those references, never asserted:
//! disk-sync figures drift 2–4× between runs on a shared VM (see
//! PERFORMANCE.md). The references run before keel starts, so nothing
//! competes with them for CPU or disk. The command fails (exit 1) only when
//! keel answered something other than 200 or a request failed.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::TcpListener;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Args;
use keel_actors::brain::{Brain, BrainInput, CommandBrain, Decision};
use keel_actors::config::Synchronous;
use keel_actors::masterkey::{KeyHandle, MasterKey};
use keel_actors::persistence::{self, Exchange, ReplyPlan, SessionKey, StoreOptions};

use crate::reference;
use serde_json::{json, Value};

/// Target: keel's throughput over reference (a).
const TARGET_VS_ONE_PER_TXN: f64 = 10.0;
/// Target: keel's throughput as a fraction of reference (b).
const TARGET_OF_BATCHED: f64 = 0.30;
/// Target: p99 acknowledgement latency, milliseconds.
const TARGET_P99_MS: f64 = 20.0;
/// keel CPU µs per acknowledged message (issue 14).
const TARGET_CPU_US_PER_ACK: f64 = 25.0;
/// How long keel may take to answer `/readyz` with 200.
const READY_DEADLINE: Duration = Duration::from_secs(30);
/// How long keel may take to exit after SIGTERM before it is killed.
const STOP_DEADLINE: Duration = Duration::from_secs(30);

/// Flags of `keel bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Concurrent webhook clients, each with its own chat.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Length of the measured window, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Untimed load before the measured window, seconds.
    #[arg(long, default_value_t = 2.0)]
    pub warmup_seconds: f64,
    /// Messages per transaction in reference (b).
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// How long each reference runs, seconds.
    #[arg(long, default_value_t = 3.0)]
    pub reference_seconds: f64,
    /// OS threads for the load generator (clients are split between them).
    #[arg(long, default_value_t = 1)]
    pub load_threads: usize,
    /// The keel binary to start (default: this executable).
    #[arg(long)]
    pub keel_binary: Option<PathBuf>,
    /// Keep the scratch directory (databases, keel's log) and print its path.
    #[arg(long)]
    pub keep: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// The store under test: `sqlite` (encrypted and plain) or `postgres`
    /// (each count of `--instances` on one server, SQLite in the same run).
    #[arg(long, value_enum, default_value_t = Backend::Sqlite)]
    pub backend: Backend,
    /// With `--backend postgres`: how many instances share the server, one
    /// measurement per count (default 1,3).
    #[arg(long, value_delimiter = ',')]
    pub instances: Option<Vec<usize>>,
    /// With `--backend postgres`: a libpq URL whose user may create
    /// databases (the bench makes one per measurement and drops it);
    /// without it a private cluster is started in a temp dir.
    #[arg(long, env = "KEEL_BENCH_PG_URL", hide_env_values = true)]
    pub url: Option<String>,
}

/// `keel bench --backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Run the benchmark; see the module documentation.
pub fn bench(args: BenchArgs) -> Result<ExitCode> {
    if args.clients == 0 {
        bail!("--clients must be at least 1");
    }
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    for (name, v) in [
        ("--seconds", args.seconds),
        ("--reference-seconds", args.reference_seconds),
    ] {
        if !(v.is_finite() && v > 0.0) {
            bail!("{name} must be a positive number of seconds");
        }
    }
    if !(args.warmup_seconds.is_finite() && args.warmup_seconds >= 0.0) {
        bail!("--warmup-seconds must be zero or more");
    }
    let binary = match &args.keel_binary {
        Some(b) => b.clone(),
        None => std::env::current_exe().context("cannot find the keel executable")?,
    };

    if args.backend == Backend::Postgres {
        return crate::scaleout::bench_postgres(&args, &binary);
    }
    if args.url.is_some() || args.instances.is_some() {
        bail!("--url and --instances are for --backend postgres");
    }

    let scratch = Scratch::create(args.keep)?;
    let rows = RowMaker::new(args.clients);

    // The message path with encryption on and off in the same run; each
    // keel is compared with references on the same storage settings.
    let encrypted = measure(&args, &binary, &scratch.path.join("encrypted"), &rows, true)?;
    let plain = measure(&args, &binary, &scratch.path.join("plain"), &rows, false)?;
    let ratio = Report::ratio(encrypted.keel.per_second, plain.keel.per_second);
    if args.json {
        println!("{}", {
            // The top-level keys stay the default (encrypted) run's, as
            // before encryption existed; outside checks read them.
            let mut out = encrypted.to_json();
            out["plain"] = plain.to_json();
            out["encrypted_vs_plain"] = json!(ratio.map(|r| round(r, 3)));
            out["encrypted_vs_plain_min"] = json!(TARGET_ENCRYPTED_OF_PLAIN);
            out
        });
    } else {
        println!("== encrypted store (SQLCipher, [storage] encrypt = true) ==");
        encrypted.print();
        println!();
        println!("== plain store ([storage] encrypt = false) ==");
        plain.print();
        println!();
        println!(
            "encrypted / plain = {} (target >= {TARGET_ENCRYPTED_OF_PLAIN})",
            ratio.map_or_else(|| "-".into(), |r| format!("{r:.2}"))
        );
    }
    if args.keep {
        eprintln!("keel bench: scratch kept in {}", scratch.path.display());
    }
    let mut failed = false;
    for report in [&encrypted, &plain] {
        if report.load.non_200 > 0 || report.load.errors > 0 {
            eprintln!(
                "keel bench: {} non-200 responses and {} failed requests (must be 0){}",
                report.load.non_200,
                report.load.errors,
                report
                    .load
                    .first_failure
                    .as_deref()
                    .map(|f| format!("; first: {f}"))
                    .unwrap_or_default()
            );
            failed = true;
        }
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Target: encrypted throughput as a fraction of plain.
const TARGET_ENCRYPTED_OF_PLAIN: f64 = 0.85;

/// One keel (encrypted or plain) and its two references, in `dir`.
fn measure(
    args: &BenchArgs,
    binary: &Path,
    dir: &Path,
    rows: &RowMaker,
    encrypt: bool,
) -> Result<Report> {
    DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let what = if encrypt { "encrypted" } else { "plain" };
    // The references write stores keyed like keel's (a raw key: no
    // per-connection derivation, as in keel).
    let key = encrypt.then(|| KeyHandle::new(MasterKey::generate(), "bench"));
    progress(format!(
        "{what} reference (a): one transaction per message, {} s",
        args.reference_seconds
    ));
    let one = run_reference(
        &dir.join("ref-a"),
        rows,
        None,
        args.reference_seconds,
        key.clone(),
    )
    .context("reference (a): one transaction per message")?;
    progress(format!(
        "{what} reference (b): {} messages per transaction, {} s",
        args.batch, args.reference_seconds
    ));
    let batched = run_reference(
        &dir.join("ref-b"),
        rows,
        Some(args.batch),
        args.reference_seconds,
        key,
    )
    .context("reference (b): batched transactions")?;

    progress(format!("starting {} ({what} store)", binary.display()));
    let rt = runtime()?;
    let mut keel = Keel::start_with(binary, dir, encrypt, "")?;
    let base = format!("http://{}", keel.addr);
    rt.block_on(keel.wait_ready(&base))?;
    progress(format!(
        "keel ready on {}; {} clients, {} s warm-up, {} s measured",
        keel.addr, args.clients, args.warmup_seconds, args.seconds
    ));

    let window = Window::after_warmup(args.warmup_seconds, args.seconds);
    let (load, probe) = drive(
        &rt,
        &[(base, keel.pid)],
        args.clients,
        args.load_threads,
        window,
    )?;
    let status = keel.stop().context("stopping keel")?;
    if !status.success() {
        eprintln!(
            "keel bench: keel exited with {status}; its log:\n{}",
            log_tail(&keel.log)
        );
    }
    let mut report = Report::new(args, load, probe, one, batched);
    report.encrypted = encrypt;
    Ok(report)
}

/// A progress line on stderr (stdout carries only the result).
pub(crate) fn progress(line: String) {
    eprintln!("keel bench: {line}");
}

/// A single-threaded tokio runtime (the binary has no multi-thread feature).
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot build a tokio runtime")
}

// ---------------------------------------------------------------------------
// Scratch directory.

/// A fresh directory under the system temp dir, removed on drop unless kept.
pub(crate) struct Scratch {
    pub(crate) path: PathBuf,
    keep: bool,
}

impl Scratch {
    pub(crate) fn create(keep: bool) -> Result<Scratch> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!("keel-bench-{}-{nanos}", std::process::id()));
        DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("cannot create scratch dir {}", path.display()))?;
        Ok(Scratch { path, keep })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !self.keep {
            if let Err(e) = fs::remove_dir_all(&self.path) {
                eprintln!("keel bench: cannot remove {}: {e}", self.path.display());
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The rows.

/// Makes the rows every measurement writes: message `n` comes from client
/// `n % clients` in chat `bench-<client>`, exactly as the webhook clients
/// send them, with the reply keel's own brain gives to such a message (not
/// delivered: the bench keel has no `reply_url`).
pub(crate) struct RowMaker {
    clients: usize,
    reply: String,
}

impl RowMaker {
    pub(crate) fn new(clients: usize) -> RowMaker {
        let session = SessionKey::new("webhook", "bench-0");
        let memory = serde_json::Map::new();
        let decision = CommandBrain::new(false).decide(&BrainInput {
            session: &session,
            from: "u0",
            text: "hello 0",
            kind: "text",
            memory: &memory,
            recent: &[],
        });
        let reply = match decision {
            Decision::Reply { text, .. } => text,
            Decision::Forward | Decision::Act(_) => "ok".to_string(),
        };
        RowMaker { clients, reply }
    }

    /// Exchanges `first .. first + count`.
    pub(crate) fn make(&self, first: u64, count: usize) -> Vec<Exchange> {
        (first..first + count as u64)
            .map(|n| {
                let client = (n % self.clients as u64) as usize;
                Exchange {
                    session: SessionKey::new("webhook", &format!("bench-{client}")),
                    from: format!("u{client}"),
                    key: format!("{client}-{n}"),
                    text: format!("hello {n}"),
                    reply: Some(ReplyPlan {
                        text: self.reply.clone(),
                        deliver: false,
                    }),
                    memory: None,
                    // As in keel after a session's first message: the
                    // session and sender rows exist.
                    known: n >= self.clients as u64,
                    ..Default::default()
                }
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------
// References.

/// Throughput (and, for one message per transaction, latency) of a reference.
#[derive(Debug, Clone)]
pub(crate) struct RefStats {
    pub(crate) messages: u64,
    pub(crate) busy: Duration,
    /// Per-transaction latency in µs; empty for batched runs.
    latencies: Vec<u32>,
}

/// Write rows into a fresh store in `dir` for about `seconds` of transaction
/// time: one per transaction (`batch = None`) or `batch` per transaction.
pub(crate) fn run_reference(
    dir: &Path,
    rows: &RowMaker,
    batch: Option<usize>,
    seconds: f64,
    key: Option<KeyHandle>,
) -> Result<RefStats> {
    let opts = StoreOptions {
        path: Some(dir.join("keel.db")),
        synchronous: Synchronous::Full,
        busy_timeout: Duration::from_secs(5),
        max_batch: 1024,
        probe_interval: Duration::from_millis(500),
        key,
    };
    let (conn, _) =
        persistence::open_store(&opts).with_context(|| format!("opening {}", dir.display()))?;
    let per_call = batch.unwrap_or(1);
    let budget = Duration::from_secs_f64(seconds);
    let wall_limit = budget * 3;
    let began = Instant::now();
    let mut stats = RefStats {
        messages: 0,
        busy: Duration::ZERO,
        latencies: Vec::new(),
    };
    while stats.busy < budget && began.elapsed() < wall_limit {
        let chunk = rows.make(stats.messages, per_call);
        let t = Instant::now();
        match batch {
            None => reference::one_per_txn(&conn, &chunk)?,
            Some(b) => reference::batched(&conn, &chunk, b)?,
        }
        let took = t.elapsed();
        stats.busy += took;
        stats.messages += chunk.len() as u64;
        if batch.is_none() {
            stats.latencies.push(micros(took));
        }
    }
    conn.close()
        .map_err(|(_, e)| anyhow::anyhow!("closing {}: {e}", dir.display()))?;
    Ok(stats)
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

// ---------------------------------------------------------------------------
// The keel under test.

/// `binary run` on `data_dir` with `config`, listening on `addr`, warnings
/// only, and none of the operator's `KEEL_*` overrides (stdio is the
/// caller's).
pub(crate) fn run_command(binary: &Path, data_dir: &Path, config: &Path, addr: &str) -> Command {
    let mut c = Command::new(binary);
    c.arg("run")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--config")
        .arg(config)
        .arg("--listen")
        .arg(addr)
        .env("RUST_LOG", "warn")
        .env_remove("KEEL_CONFIG")
        .env_remove("KEEL_DATA_DIR")
        .env_remove("KEEL_LISTEN");
    c
}

/// A keel daemon started for the benchmark; stopped (SIGTERM) on drop.
pub(crate) struct Keel {
    pub(crate) child: Child,
    pub(crate) pid: i32,
    pub(crate) addr: String,
    pub(crate) log: PathBuf,
    pub(crate) exited: Option<ExitStatus>,
}

impl Keel {
    /// Start `binary run` on a fresh data dir under `scratch` and a free
    /// port, with `[storage] encrypt` set and `extra` appended to the config.
    pub(crate) fn start_with(
        binary: &Path,
        scratch: &Path,
        encrypt: bool,
        extra: &str,
    ) -> Result<Keel> {
        Keel::start_configured(
            binary,
            scratch,
            &format!(
                "[storage]\nsynchronous = \"full\"\nencrypt = {encrypt}\n\n[webhook]\nenabled = true\n{extra}"
            ),
            &[],
        )
    }

    /// Start `binary run` on a fresh data dir under `scratch` and a free
    /// port with the whole `config` (written 0600) and `env` set.
    pub(crate) fn start_configured(
        binary: &Path,
        scratch: &Path,
        config_text: &str,
        env: &[(&str, &str)],
    ) -> Result<Keel> {
        let addr = {
            let l = TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
            l.local_addr()
                .context("cannot find a free port")?
                .to_string()
        };
        let config = scratch.join("keel.toml");
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&config)
            .and_then(|mut f| f.write_all(config_text.as_bytes()))
            .with_context(|| format!("cannot write {}", config.display()))?;
        let log = scratch.join("keel.log");
        let stderr =
            File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let stdout = stderr
            .try_clone()
            .with_context(|| format!("cannot reopen {}", log.display()))?;
        let child = run_command(binary, &scratch.join("keel"), &config, &addr)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let pid = i32::try_from(child.id()).context("keel's pid does not fit a pid_t")?;
        Ok(Keel {
            child,
            pid,
            addr,
            log,
            exited: None,
        })
    }

    /// Poll `GET /readyz` until it answers 200.
    pub(crate) async fn wait_ready(&mut self, base: &str) -> Result<()> {
        self.wait_ready_polling(base, READY_DEADLINE, Duration::from_millis(20))
            .await
    }

    /// Poll `/readyz` every `every` until 200; fails if keel exits first or
    /// `limit` passes.
    pub(crate) async fn wait_ready_polling(
        &mut self,
        base: &str,
        limit: Duration,
        every: Duration,
    ) -> Result<()> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(1))
            .build()
            .context("cannot build an HTTP client")?;
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().context("waiting for keel")? {
                self.exited = Some(status);
                bail!(
                    "keel exited with {status} before it was ready; its log:\n{}",
                    log_tail(&self.log)
                );
            }
            if let Ok(r) = http.get(format!("{base}/readyz")).send().await {
                if r.status() == reqwest::StatusCode::OK {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "keel was not ready within {limit:?}; its log:\n{}",
                    log_tail(&self.log)
                );
            }
            tokio::time::sleep(every).await;
        }
    }

    /// SIGTERM, wait for an orderly exit (SIGKILL after `STOP_DEADLINE`).
    pub(crate) fn stop(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.exited {
            return Ok(status);
        }
        if let Some(status) = self.child.try_wait()? {
            self.exited = Some(status);
            return Ok(status);
        }
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait()? {
                self.exited = Some(status);
                return Ok(status);
            }
            if Instant::now() >= deadline {
                self.child.kill().context("killing keel")?;
                let status = self.child.wait().context("reaping keel")?;
                self.exited = Some(status);
                bail!("keel did not exit within {STOP_DEADLINE:?} of SIGTERM; killed");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Keel {
    fn drop(&mut self) {
        if self.exited.is_none() {
            if let Err(e) = self.stop() {
                eprintln!("keel bench: {e:#}");
            }
        }
    }
}

/// The last few KiB of keel's log, for error messages.
pub(crate) fn log_tail(path: &Path) -> String {
    const TAIL: u64 = 4096;
    let mut text = String::new();
    let read = File::open(path).and_then(|mut f| {
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(TAIL)))?;
        f.read_to_string(&mut text)
    });
    match read {
        Ok(_) if text.trim().is_empty() => "(empty)".to_string(),
        Ok(_) => text,
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

// ---------------------------------------------------------------------------
// Load.

/// The measured window: requests that start at or after `from` and are
/// answered by `until` count; clients stop sending at `until`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window {
    from: Instant,
    until: Instant,
}

impl Window {
    /// A window of `seconds` that opens `warmup` seconds from now.
    pub(crate) fn after_warmup(warmup: f64, seconds: f64) -> Window {
        let start = Instant::now();
        Window {
            from: start + Duration::from_secs_f64(warmup),
            until: start + Duration::from_secs_f64(warmup + seconds),
        }
    }
}

/// Run `clients` webhook clients on `load_threads` OS threads against the
/// keels `targets` (`(base URL, pid)`; client `i` talks to target
/// `i % targets.len()`) through `window`, observing the keels meanwhile.
pub(crate) fn drive(
    rt: &tokio::runtime::Runtime,
    targets: &[(String, i32)],
    clients: usize,
    load_threads: usize,
    window: Window,
) -> Result<(LoadStats, Probe)> {
    let load_threads = load_threads.clamp(1, clients);
    let urls: Vec<String> = targets
        .iter()
        .map(|(base, _)| format!("{base}/v1/messages"))
        .collect();
    let (loads, probe) = std::thread::scope(|s| {
        let handles: Vec<_> = (0..load_threads)
            .map(|t| {
                let ids: Vec<usize> = (t..clients).step_by(load_threads).collect();
                let urls = urls.as_slice();
                s.spawn(move || load_thread(urls, ids, window))
            })
            .collect();
        let probe = rt.block_on(observe(targets, window));
        let loads: Vec<Result<LoadStats>> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a load thread panicked")))
            })
            .collect();
        (loads, probe)
    });
    let mut load = LoadStats::default();
    for l in loads {
        load.merge(l?);
    }
    Ok((load, probe?))
}

/// What the webhook clients saw.
#[derive(Debug, Default)]
pub(crate) struct LoadStats {
    /// 200s inside the window.
    pub(crate) acked: u64,
    /// Ack latency of each of those, µs.
    pub(crate) latencies: Vec<u32>,
    /// Non-200 answers over the whole run (warm-up included).
    pub(crate) non_200: u64,
    /// Requests without an answer (connection errors, timeouts).
    pub(crate) errors: u64,
    pub(crate) first_failure: Option<String>,
}

impl LoadStats {
    fn merge(&mut self, other: LoadStats) {
        self.acked += other.acked;
        self.latencies.extend(other.latencies);
        self.non_200 += other.non_200;
        self.errors += other.errors;
        if self.first_failure.is_none() {
            self.first_failure = other.first_failure;
        }
    }

    fn fail(&mut self, what: String) {
        if self.first_failure.is_none() {
            self.first_failure = Some(what);
        }
    }
}

/// One OS thread of the load generator: its own runtime, its own connection
/// pool, clients `ids` (client `i` posts to `urls[i % urls.len()]`).
fn load_thread(urls: &[String], ids: Vec<usize>, window: Window) -> Result<LoadStats> {
    let rt = runtime()?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(ids.len())
        .timeout(Duration::from_secs(30))
        .build()
        .context("cannot build an HTTP client")?;
    let results = rt.block_on(futures::future::join_all(
        ids.into_iter()
            .map(|i| client(&http, &urls[i % urls.len()], i, window)),
    ));
    let mut all = LoadStats::default();
    for r in results {
        all.merge(r);
    }
    Ok(all)
}

/// One webhook client in a closed loop over a keep-alive connection.
async fn client(http: &reqwest::Client, url: &str, i: usize, window: Window) -> LoadStats {
    let mut stats = LoadStats::default();
    let chat = format!("bench-{i}");
    let from = format!("u{i}");
    let mut n: u64 = 0;
    loop {
        let sent = Instant::now();
        if sent >= window.until {
            break;
        }
        let body = json!({
            "id": format!("{i}-{n}"),
            "chat": chat,
            "from": from,
            "text": format!("hello {n}"),
        });
        n += 1;
        let answer = match http.post(url).json(&body).send().await {
            // Read the body so the connection goes back to the pool.
            Ok(r) => {
                let status = r.status();
                r.bytes().await.map(|_| status)
            }
            Err(e) => Err(e),
        };
        let done = Instant::now();
        match answer {
            Ok(status) if status == reqwest::StatusCode::OK => {
                if sent >= window.from && done <= window.until {
                    stats.acked += 1;
                    stats.latencies.push(micros(done - sent));
                }
            }
            Ok(status) => {
                stats.non_200 += 1;
                stats.fail(format!("HTTP {status} for message {i}-{}", n - 1));
            }
            Err(e) => {
                stats.errors += 1;
                stats.fail(format!("request failed: {e}"));
                // Do not spin if keel went away.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    stats
}

// ---------------------------------------------------------------------------
// Observing keel during the window.

/// keel's own figures over the measured window.
#[derive(Debug, Default)]
pub(crate) struct Probe {
    /// Group commits and the jobs they carried.
    pub(crate) commits: f64,
    pub(crate) jobs: f64,
    /// Seconds spent inside commits (BEGIN … COMMIT, fsync included).
    pub(crate) commit_seconds: f64,
    /// p50 / p99 commit duration, seconds: upper bounds of histogram buckets.
    pub(crate) commit_p50: Option<f64>,
    pub(crate) commit_p99: Option<f64>,
    /// p50 / p99 jobs per commit: upper bounds of histogram buckets.
    pub(crate) batch_p50: Option<f64>,
    pub(crate) batch_p99: Option<f64>,
    /// CPU seconds used by keel and by this process (the load generator).
    pub(crate) keel_cpu: Option<f64>,
    pub(crate) load_cpu: Option<f64>,
    pub(crate) elapsed: f64,
}

/// Scrape `/metrics` and CPU times of every keel in `targets` at both ends
/// of the window; counters are summed over the keels.
async fn observe(targets: &[(String, i32)], window: Window) -> Result<Probe> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .context("cannot build an HTTP client")?;
    let cpu = || -> (Option<f64>, Option<f64>) {
        let keels = targets
            .iter()
            .map(|(_, pid)| cpu_seconds(&pid.to_string()))
            .sum::<Option<f64>>();
        (keels, cpu_seconds("self"))
    };
    let scrape_all = || async {
        let mut texts = Vec::with_capacity(targets.len());
        for (base, _) in targets {
            texts.push(scrape(&http, base).await?);
        }
        Ok::<_, anyhow::Error>(texts)
    };
    tokio::time::sleep_until(tokio::time::Instant::from_std(window.from)).await;
    let t0 = Instant::now();
    let (keel0, self0) = cpu();
    let m0 = scrape_all().await?;
    tokio::time::sleep_until(tokio::time::Instant::from_std(window.until)).await;
    let (keel1, self1) = cpu();
    let elapsed = t0.elapsed().as_secs_f64();
    let m1 = scrape_all().await?;
    let delta = |name: &str| {
        m0.iter()
            .zip(&m1)
            .map(|(a, b)| metric(b, name).unwrap_or(0.0) - metric(a, name).unwrap_or(0.0))
            .sum::<f64>()
    };
    Ok(Probe {
        commits: delta("keel_commit_batch_jobs_count"),
        jobs: delta("keel_commit_batch_jobs_sum"),
        commit_seconds: delta("keel_commit_seconds_sum"),
        commit_p50: bucket_quantile(&m0, &m1, "keel_commit_seconds", 0.50),
        commit_p99: bucket_quantile(&m0, &m1, "keel_commit_seconds", 0.99),
        batch_p50: bucket_quantile(&m0, &m1, "keel_commit_batch_jobs", 0.50),
        batch_p99: bucket_quantile(&m0, &m1, "keel_commit_batch_jobs", 0.99),
        keel_cpu: keel1.zip(keel0).map(|(b, a)| b - a),
        load_cpu: self1.zip(self0).map(|(b, a)| b - a),
        elapsed,
    })
}

async fn scrape(http: &reqwest::Client, base: &str) -> Result<String> {
    let r = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .context("GET /metrics")?;
    if !r.status().is_success() {
        bail!("GET /metrics answered {}", r.status());
    }
    r.text().await.context("reading /metrics")
}

/// The value of an unlabelled sample in Prometheus text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let mut parts = line.split_whitespace();
        (parts.next() == Some(name))
            .then(|| parts.next()?.parse().ok())
            .flatten()
    })
}

/// Cumulative `(le, count)` buckets of histogram `name`.
fn buckets(text: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(&prefix)?;
            let (le, rest) = rest.split_once('"')?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count = rest.split_whitespace().last()?.parse().ok()?;
            Some((le, count))
        })
        .collect()
}

/// The `q` quantile of histogram `name` over the interval between two
/// scrapes (of one or more keels, buckets summed), as the upper bound of the
/// bucket it falls in.
fn bucket_quantile(before: &[String], after: &[String], name: &str, q: f64) -> Option<f64> {
    let mut cumulative: Vec<(f64, f64)> = Vec::new();
    for (b, a) in before.iter().zip(after) {
        let old = buckets(b, name);
        for (le, n) in buckets(a, name) {
            let was = old.iter().find(|(l, _)| *l == le).map_or(0.0, |b| b.1);
            match cumulative.iter_mut().find(|(l, _)| *l == le) {
                Some(slot) => slot.1 += n - was,
                None => cumulative.push((le, n - was)),
            }
        }
    }
    let total = cumulative.last()?.1;
    if total <= 0.0 {
        return None;
    }
    cumulative
        .iter()
        .find(|(_, n)| *n >= q * total)
        .map(|(le, _)| *le)
}

/// User + system CPU seconds of `/proc/<pid>` (all threads), if readable.
pub(crate) fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces): state is
    // field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks > 0).then(|| (utime + stime) / ticks as f64)
}

// ---------------------------------------------------------------------------
// The report.

/// Throughput and latency of one line of the table.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Line {
    pub(crate) per_second: f64,
    pub(crate) p50_ms: Option<f64>,
    pub(crate) p99_ms: Option<f64>,
}

impl Line {
    pub(crate) fn from_latencies(per_second: f64, latencies: &mut [u32]) -> Line {
        latencies.sort_unstable();
        Line {
            per_second,
            p50_ms: percentile(latencies, 0.50),
            p99_ms: percentile(latencies, 0.99),
        }
    }

    pub(crate) fn to_json(self) -> Value {
        json!({
            "msgs_per_s": round(self.per_second, 1),
            "p50_ms": self.p50_ms.map(|v| round(v, 3)),
            "p99_ms": self.p99_ms.map(|v| round(v, 3)),
        })
    }
}

/// The index of the nearest-rank `q` quantile in a sorted list of `len`.
pub(crate) fn nearest_rank(len: usize, q: f64) -> Option<usize> {
    if len == 0 {
        return None;
    }
    let rank = (q * len as f64).ceil() as usize;
    Some(rank.clamp(1, len) - 1)
}

/// Nearest-rank percentile of sorted µs values, in milliseconds.
fn percentile(sorted: &[u32], q: f64) -> Option<f64> {
    nearest_rank(sorted.len(), q).map(|i| f64::from(sorted[i]) / 1000.0)
}

pub(crate) fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

/// Everything measured in one run.
struct Report {
    /// The store was SQLCipher-encrypted (keel and its references).
    encrypted: bool,
    clients: usize,
    seconds: f64,
    batch: usize,
    keel: Line,
    one: Line,
    batched: Line,
    load: LoadStats,
    probe: Probe,
}

impl Report {
    fn new(
        args: &BenchArgs,
        mut load: LoadStats,
        probe: Probe,
        mut one: RefStats,
        batched: RefStats,
    ) -> Report {
        let rate = |n: u64, d: Duration| {
            let s = d.as_secs_f64();
            if s > 0.0 {
                n as f64 / s
            } else {
                0.0
            }
        };
        let keel = Line::from_latencies(load.acked as f64 / args.seconds, &mut load.latencies);
        Report {
            encrypted: false,
            clients: args.clients,
            seconds: args.seconds,
            batch: args.batch,
            keel,
            one: Line::from_latencies(rate(one.messages, one.busy), &mut one.latencies),
            batched: Line {
                per_second: rate(batched.messages, batched.busy),
                p50_ms: None,
                p99_ms: None,
            },
            load,
            probe,
        }
    }

    fn ratio(a: f64, b: f64) -> Option<f64> {
        (b > 0.0).then(|| a / b)
    }

    fn vs_one(&self) -> Option<f64> {
        Self::ratio(self.keel.per_second, self.one.per_second)
    }

    fn of_batched(&self) -> Option<f64> {
        Self::ratio(self.keel.per_second, self.batched.per_second)
    }

    fn jobs_per_commit(&self) -> Option<f64> {
        Self::ratio(self.probe.jobs, self.probe.commits)
    }

    fn mean_commit_ms(&self) -> Option<f64> {
        Self::ratio(self.probe.commit_seconds * 1000.0, self.probe.commits)
    }

    /// keel's CPU (user + system, all threads, from /proc/<pid>/stat) per
    /// acknowledged message, µs: keel's CPU rate over the window divided
    /// by the ack rate over the same window (issue 14 target <= 25 µs).
    fn cpu_us_per_ack(&self) -> Option<f64> {
        let cpu_per_s = Self::ratio(self.probe.keel_cpu?, self.probe.elapsed)?;
        Self::ratio(cpu_per_s * 1e6, self.keel.per_second)
    }

    /// Share of one core, in percent.
    fn cpu_percent(&self, cpu: Option<f64>) -> Option<f64> {
        cpu.and_then(|c| Self::ratio(c * 100.0, self.probe.elapsed))
    }

    fn print(&self) {
        let ms = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"));
        let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or_else(|| "-".into(), f);
        println!(
            "keel bench — {} clients, {} s, synchronous=FULL",
            self.clients, self.seconds
        );
        println!("{:<30}{:>10}{:>10}{:>10}", "", "msgs/s", "p50 ms", "p99 ms");
        let rows = [
            ("keel webhook (group commit)".to_string(), self.keel),
            ("(a) one txn per message".to_string(), self.one),
            (
                format!("(b) raw batched ({}/txn)", self.batch),
                self.batched,
            ),
        ];
        for (name, l) in rows {
            println!(
                "{name:<30}{:>10.0}{:>10}{:>10}",
                l.per_second,
                ms(l.p50_ms),
                ms(l.p99_ms)
            );
        }
        println!(
            "keel / (a) = {:<8} (target >= {TARGET_VS_ONE_PER_TXN}x)",
            opt(self.vs_one(), &|v| format!("{v:.1}x"))
        );
        println!(
            "keel / (b) = {:<8} (target >= {:.0}%)",
            opt(self.of_batched(), &|v| format!("{:.1}%", v * 100.0)),
            TARGET_OF_BATCHED * 100.0
        );
        println!(
            "p99 = {:<14} (target < {TARGET_P99_MS} ms)",
            opt(self.keel.p99_ms, &|v| format!("{v:.1} ms"))
        );
        println!(
            "group commit: {} jobs/commit, {} ms/commit, {:.0} commits/s",
            opt(self.jobs_per_commit(), &|v| format!("{v:.1}")),
            opt(self.mean_commit_ms(), &|v| format!("{v:.2}")),
            Self::ratio(self.probe.commits, self.probe.elapsed).unwrap_or(0.0)
        );
        let le = |v: Option<f64>| {
            v.map_or_else(
                || "-".to_string(),
                |s| {
                    if s.is_finite() {
                        format!("<= {:.2}", s * 1000.0)
                    } else {
                        "> max bucket".to_string()
                    }
                },
            )
        };
        println!(
            "jobs per commit: p50 {}, p99 {} (histogram buckets)",
            opt(self.probe.batch_p50, &|v| format!("<= {v}")),
            opt(self.probe.batch_p99, &|v| format!("<= {v}"))
        );
        println!(
            "commit duration: p50 {} ms, p99 {} ms (histogram buckets)",
            le(self.probe.commit_p50),
            le(self.probe.commit_p99)
        );
        println!(
            "cpu (% of one core): keel {}, load generator {}",
            opt(self.cpu_percent(self.probe.keel_cpu), &|v| format!(
                "{v:.0}%"
            )),
            opt(self.cpu_percent(self.probe.load_cpu), &|v| format!(
                "{v:.0}%"
            ))
        );
        println!(
            "cpu per acknowledged message: keel {} (target <= {TARGET_CPU_US_PER_ACK} µs); {} jobs per commit",
            opt(self.cpu_us_per_ack(), &|v| format!("{v:.1} µs")),
            opt(self.jobs_per_commit(), &|v| format!("{v:.1}"))
        );
        println!(
            "acked {} in window; non-200: {}; failed requests: {}",
            self.load.acked, self.load.non_200, self.load.errors
        );
    }

    fn to_json(&self) -> Value {
        let r = |v: Option<f64>, d: i32| v.map(|v| round(v, d));
        json!({
            "clients": self.clients,
            "seconds": self.seconds,
            "synchronous": "full",
            "encrypted": self.encrypted,
            "keel": self.keel.to_json(),
            "one_txn_per_message": self.one.to_json(),
            "batched": {
                "batch": self.batch,
                "msgs_per_s": round(self.batched.per_second, 1),
            },
            "keel_vs_one_txn": r(self.vs_one(), 3),
            "keel_of_batched": r(self.of_batched(), 4),
            "targets": {
                "keel_vs_one_txn_min": TARGET_VS_ONE_PER_TXN,
                "keel_of_batched_min": TARGET_OF_BATCHED,
                "p99_ms_max": TARGET_P99_MS,
                "keel_cpu_us_per_ack_max": TARGET_CPU_US_PER_ACK,
            },
            "acked": self.load.acked,
            "non_200": self.load.non_200,
            "failed_requests": self.load.errors,
            "first_failure": self.load.first_failure,
            "commits": self.probe.commits,
            "mean_jobs_per_commit": r(self.jobs_per_commit(), 2),
            "mean_commit_ms": r(self.mean_commit_ms(), 3),
            "commit_p50_ms_at_most": r(self.probe.commit_p50.filter(|v| v.is_finite()).map(|v| v * 1000.0), 3),
            "commit_p99_ms_at_most": r(self.probe.commit_p99.filter(|v| v.is_finite()).map(|v| v * 1000.0), 3),
            "jobs_per_commit_p50_at_most": self.probe.batch_p50.filter(|v| v.is_finite()),
            "jobs_per_commit_p99_at_most": self.probe.batch_p99.filter(|v| v.is_finite()),
            "keel_cpu_percent": r(self.cpu_percent(self.probe.keel_cpu), 1),
            "load_cpu_percent": r(self.cpu_percent(self.probe.load_cpu), 1),
            "keel_cpu_us_per_ack": r(self.cpu_us_per_ack(), 2),
            "jobs_per_commit": r(self.jobs_per_commit(), 2),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<u32> = (1..=100).map(|x| x * 1000).collect();
        assert_eq!(percentile(&v, 0.50), Some(50.0));
        assert_eq!(percentile(&v, 0.99), Some(99.0));
        assert_eq!(percentile(&[7000], 0.99), Some(7.0));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn metrics_are_read_from_prometheus_text() {
        let text = "# HELP x\nkeel_commit_batch_jobs_sum 120\nkeel_commit_batch_jobs_count 4\n\
                    keel_commit_batch_jobs_bucket{le=\"1\"} 0\n";
        assert_eq!(metric(text, "keel_commit_batch_jobs_sum"), Some(120.0));
        assert_eq!(metric(text, "keel_commit_batch_jobs_count"), Some(4.0));
        assert_eq!(metric(text, "keel_commit_batch_jobs"), None);
    }

    #[test]
    fn histogram_quantiles_use_the_difference_between_scrapes() {
        let before =
            "h_bucket{le=\"0.001\"} 10\nh_bucket{le=\"0.01\"} 10\nh_bucket{le=\"+Inf\"} 10\n";
        let after =
            "h_bucket{le=\"0.001\"} 60\nh_bucket{le=\"0.01\"} 109\nh_bucket{le=\"+Inf\"} 110\n";
        let (before, after) = (vec![before.to_string()], vec![after.to_string()]);
        assert_eq!(bucket_quantile(&before, &after, "h", 0.5), Some(0.001));
        assert_eq!(bucket_quantile(&before, &after, "h", 0.99), Some(0.01));
        assert_eq!(bucket_quantile(&after, &after, "h", 0.5), None);
        // Two keels: their buckets add up.
        let two_before = vec![before[0].clone(), before[0].clone()];
        let two_after = vec![after[0].clone(), before[0].clone()];
        assert_eq!(
            bucket_quantile(&two_before, &two_after, "h", 0.5),
            Some(0.001)
        );
    }

    #[test]
    fn rows_match_what_the_clients_send() {
        let rows = RowMaker::new(4);
        let ex = rows.make(5, 2);
        assert_eq!(ex[0].session.id, "webhook:bench-1");
        assert_eq!(ex[0].key, "1-5");
        assert_eq!(ex[0].from, "u1");
        assert_eq!(ex[1].text, "hello 6");
        assert!(ex[0].reply.as_ref().is_some_and(|r| !r.deliver));
    }
}
