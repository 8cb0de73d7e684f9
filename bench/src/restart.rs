//! `keel bench restart [--messages N] [--timers M] [--rounds R]`: start and
//! stop against store size (issue 14). Two stores in one run: one seeded
//! with N messages (and their replies) across 64 chats and M far-future
//! reminders, and an empty one (the reference). For each, alternating, R
//! rounds of
//! - a start timed from spawn to `/readyz` 200 (polled every 2 ms),
//! - SIGTERM at once (in the first second, while a large store's
//!   background `quick_check` still runs) timed to exit,
//! - a start, SIGKILL once ready, and the restart after it timed to ready.
//!
//! Targets (issue 14): SIGTERM → exit < 150 ms and ready < 100 ms p99,
//! whatever the store size; the figures for the seeded store are printed
//! beside the empty store's and as ratios. Both stores are encrypted with a
//! key file in their data dir, as `keel run` makes them by default.
//! Measured and printed, never asserted.

use std::fs::{DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use keel_actors::clock::{Clock, WallClock};
use keel_actors::config::Synchronous;
use keel_actors::masterkey;
use keel_actors::persistence::{self, StoreOptions};
use serde_json::{json, Value};

use crate::messages::{log_tail, progress, run_command, RowMaker, Scratch};

/// Messages per seeding transaction.
const SEED_BATCH: usize = 5_000;

/// Chats the seeded messages spread over (as `keel bench`'s clients).
const SEED_CHATS: usize = 64;

/// Targets, milliseconds.
const TARGET_STOP_MS: f64 = 150.0;
const TARGET_READY_P99_MS: f64 = 100.0;

/// How long one start or stop may take before the bench gives up.
const LIMIT: Duration = Duration::from_secs(60);

/// Flags of `keel bench restart`.
#[derive(Debug, Args)]
pub struct RestartBenchArgs {
    /// Messages in the seeded store (each stored with its reply).
    #[arg(long, default_value_t = 1_000_000)]
    pub messages: u64,
    /// Far-future reminders in the seeded store.
    #[arg(long, default_value_t = 1_000_000)]
    pub timers: i64,
    /// Rounds per store (each: start, SIGTERM, start, SIGKILL, restart).
    #[arg(long, default_value_t = 20)]
    pub rounds: usize,
    /// The keel binary to start (default: this executable).
    #[arg(long)]
    pub keel_binary: Option<PathBuf>,
    /// Keep the scratch directory and print its path.
    #[arg(long)]
    pub keep: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// One store under test: its data dir, config and log.
struct Store {
    name: &'static str,
    data: PathBuf,
    config: PathBuf,
    log: PathBuf,
    port: u16,
}

/// The figures of one store, in milliseconds.
#[derive(Default)]
struct Times {
    ready: Vec<f64>,
    stop: Vec<f64>,
    crash_ready: Vec<f64>,
}

pub fn bench_restart(args: RestartBenchArgs) -> Result<ExitCode> {
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let binary = match &args.keel_binary {
        Some(b) => b.clone(),
        None => std::env::current_exe().context("cannot find the keel executable")?,
    };
    let scratch = Scratch::create(args.keep)?;
    let empty = prepare(&scratch.path, "empty", 0, 0)?;
    progress(format!(
        "seeding {} messages and {} reminders",
        args.messages, args.timers
    ));
    let seeded = prepare(&scratch.path, "seeded", args.messages, args.timers)?;
    let db_bytes = std::fs::metadata(seeded.data.join("keel.db"))
        .map(|m| m.len())
        .unwrap_or(0);
    let stores = [empty, seeded];
    let mut times: [Times; 2] = Default::default();
    for round in 0..args.rounds {
        progress(format!("round {}/{}", round + 1, args.rounds));
        for (store, t) in stores.iter().zip(times.iter_mut()) {
            one_round(&binary, store, t)?;
        }
    }
    let figures = json!({
        "messages": args.messages,
        "timers": args.timers,
        "rounds": args.rounds,
        "db_bytes": db_bytes,
        "empty": summary(&times[0]),
        "seeded": summary(&times[1]),
        "ratio_ready_p99": ratio(&times[1].ready, &times[0].ready, 0.99),
        "ratio_stop_p99": ratio(&times[1].stop, &times[0].stop, 0.99),
        "target_stop_ms": TARGET_STOP_MS,
        "target_ready_p99_ms": TARGET_READY_P99_MS,
    });
    if args.json {
        println!("{figures}");
    } else {
        print_table(&figures);
    }
    if args.keep {
        println!("scratch kept: {}", scratch.path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// A data dir with its key file and migrated store, seeded with `messages`
/// and `timers`, and its config.
fn prepare(scratch: &Path, name: &'static str, messages: u64, timers: i64) -> Result<Store> {
    let data = scratch.join(name);
    DirBuilder::new()
        .mode(0o700)
        .create(&data)
        .with_context(|| format!("cannot create {}", data.display()))?;
    let (key, _) = masterkey::resolve(None, &data.join("master.key"), true)
        .with_context(|| format!("cannot create the key file in {}", data.display()))?;
    let opts = StoreOptions {
        path: Some(data.join("keel.db")),
        synchronous: Synchronous::Normal,
        busy_timeout: Duration::from_secs(10),
        max_batch: 1024,
        probe_interval: Duration::from_millis(500),
        key: Some(key),
    };
    let (conn, _) =
        persistence::open_store(&opts).with_context(|| format!("opening {}", data.display()))?;
    let rows = RowMaker::new(SEED_CHATS);
    let mut done = 0u64;
    while done < messages {
        let n = (messages - done).min(SEED_BATCH as u64) as usize;
        crate::reference::batched(&conn, &rows.make(done, n), SEED_BATCH)?;
        done += n as u64;
    }
    if timers > 0 {
        let far = WallClock.now_ms() + 30 * 86_400_000;
        crate::seed::seed_timers(&conn, &WallClock.stamp(), "pending", timers, far, 1000)?;
    }
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        .context("checkpointing the seeded store")?;
    conn.close()
        .map_err(|(_, e)| anyhow::anyhow!("closing {}: {e}", data.display()))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("cannot find a free port")?
        .port();
    let config = scratch.join(format!("{name}.toml"));
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&config)
        .and_then(|mut f| {
            f.write_all(b"[storage]\nsynchronous = \"full\"\n\n[webhook]\nenabled = true\n")
        })
        .with_context(|| format!("cannot write {}", config.display()))?;
    Ok(Store {
        name,
        log: scratch.join(format!("{name}.log")),
        data,
        config,
        port,
    })
}

fn spawn(binary: &Path, s: &Store) -> Result<Child> {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&s.log)
        .with_context(|| format!("cannot open {}", s.log.display()))?;
    let err = log.try_clone().context("cannot reopen the log")?;
    run_command(binary, &s.data, &s.config, &format!("127.0.0.1:{}", s.port))
        // The data dir holds the key file; an operator's key must not win.
        .env_remove("KEEL_MASTER_KEY")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))
}

/// `GET /readyz` answered 200 (one plain HTTP/1.1 request per probe, so
/// no client pool or runtime sits between the probe and the figure).
fn readyz_ok(port: u16) -> bool {
    use std::io::Read;
    let probe = || -> std::io::Result<bool> {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port))?;
        c.set_read_timeout(Some(Duration::from_secs(1)))?;
        c.write_all(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
        let mut head = [0u8; 12];
        c.read_exact(&mut head)?;
        Ok(&head[9..12] == b"200")
    };
    probe().unwrap_or(false)
}

/// Spawn to `/readyz` 200, in ms.
fn ready(binary: &Path, s: &Store) -> Result<(Child, f64)> {
    let t = Instant::now();
    let mut child = spawn(binary, s)?;
    loop {
        if let Some(status) = child.try_wait().context("waiting for keel")? {
            bail!(
                "{} store: keel exited with {status} before it was ready; its log:\n{}",
                s.name,
                log_tail(&s.log)
            );
        }
        if readyz_ok(s.port) {
            return Ok((child, t.elapsed().as_secs_f64() * 1000.0));
        }
        if t.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{} store: keel was not ready within {LIMIT:?}", s.name);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// SIGTERM to exit, in ms; a non-zero exit is an error.
fn stop(mut child: Child, s: &Store) -> Result<f64> {
    let t = Instant::now();
    let pid = i32::try_from(child.id()).context("keel's pid does not fit a pid_t")?;
    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    loop {
        if let Some(status) = child.try_wait().context("waiting for keel")? {
            if !status.success() {
                bail!(
                    "{} store: keel's SIGTERM stop exited with {status}; its log:\n{}",
                    s.name,
                    log_tail(&s.log)
                );
            }
            return Ok(t.elapsed().as_secs_f64() * 1000.0);
        }
        if t.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{} store: keel did not exit within {LIMIT:?} of SIGTERM",
                s.name
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn one_round(binary: &Path, s: &Store, t: &mut Times) -> Result<()> {
    let (child, ms) = ready(binary, s)?;
    t.ready.push(ms);
    t.stop.push(stop(child, s)?);
    let (mut child, _) = ready(binary, s)?;
    child.kill().context("SIGKILL keel")?;
    child.wait().context("reaping keel")?;
    let (child, ms) = ready(binary, s)?;
    t.crash_ready.push(ms);
    stop(child, s)?;
    Ok(())
}

/// Nearest-rank quantile of unsorted figures.
fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match crate::messages::nearest_rank(s.len(), q) {
        Some(i) => s[i],
        None => 0.0,
    }
}

fn stats(v: &[f64]) -> Value {
    let r = |x: f64| (x * 10.0).round() / 10.0;
    json!({
        "p50": r(quantile(v, 0.5)),
        "p99": r(quantile(v, 0.99)),
        "max": r(v.iter().copied().fold(0.0, f64::max)),
    })
}

fn summary(t: &Times) -> Value {
    json!({
        "ready_ms": stats(&t.ready),
        "stop_ms": stats(&t.stop),
        "crash_ready_ms": stats(&t.crash_ready),
    })
}

fn ratio(seeded: &[f64], empty: &[f64], q: f64) -> f64 {
    let e = quantile(empty, q);
    if e > 0.0 {
        ((quantile(seeded, q) / e) * 100.0).round() / 100.0
    } else {
        0.0
    }
}

fn print_table(f: &Value) {
    println!(
        "keel bench restart: {} messages + {} reminders ({:.0} MiB store) vs an empty store, {} rounds",
        f["messages"],
        f["timers"],
        f["db_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
        f["rounds"]
    );
    println!(
        "{:<28} {:>24} {:>24}",
        "", "empty p50/p99/max ms", "seeded p50/p99/max ms"
    );
    for (key, label) in [
        ("ready_ms", "start → ready"),
        ("stop_ms", "SIGTERM (1st second) → exit"),
        ("crash_ready_ms", "after SIGKILL → ready"),
    ] {
        let cell = |store: &str| {
            let s = &f[store][key];
            format!("{}/{}/{}", s["p50"], s["p99"], s["max"])
        };
        println!("{label:<28} {:>24} {:>24}", cell("empty"), cell("seeded"));
    }
    let stop_ok = f["seeded"]["stop_ms"]["max"].as_f64().unwrap_or(f64::MAX) < TARGET_STOP_MS;
    let ready_ok = f["seeded"]["ready_ms"]["p99"].as_f64().unwrap_or(f64::MAX)
        < TARGET_READY_P99_MS
        && f["seeded"]["crash_ready_ms"]["p99"]
            .as_f64()
            .unwrap_or(f64::MAX)
            < TARGET_READY_P99_MS;
    println!(
        "seeded/empty p99: ready ×{}, stop ×{}; targets: stop < {TARGET_STOP_MS} ms {}, ready p99 < {TARGET_READY_P99_MS} ms {}",
        f["ratio_ready_p99"],
        f["ratio_stop_p99"],
        if stop_ok { "met" } else { "NOT met" },
        if ready_ok { "met" } else { "NOT met" },
    );
}
