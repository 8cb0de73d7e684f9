//! `keel bench timers`: restart-to-ready time, memory, fire latency and
//! burst throughput of durable timers (issue 3's benchmark; not a test).
//!
//! Every figure comes from a real keel started from this very binary on a
//! database seeded directly (`persistence::timers::bench_seed_timers`, one
//! bulk insert) and is printed next to a baseline measured in the same run:
//! a child process (`keel bench timers --scan-only DB`) that does what peers
//! do at start — load every active timer into structs and a heap — and
//! reports its time and peak RSS. Ratios and targets are printed, never
//! asserted: the command fails only when keel does not start or does not
//! fire every timer.
//!
//! 1. Ready: `--pending` far-future timers (they never fire); time from
//!    spawn to `/readyz` 200, then VmHWM/VmRSS of keel from /proc.
//! 2. Latency: `--due` timers due within one second, a few seconds after
//!    start, on top of the pending ones; lateness is `fired_at − due_at` of
//!    each receipt (`fired_at` is the clock the timer actor read when it
//!    took the batch, so the commit time is not included; see README).
//! 3. Burst: `--burst` timers all due at the same instant; fires/s is the
//!    count over the time from that instant until the last receipt is
//!    visible to a reader (commits included).

use std::collections::BinaryHeap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use keel_actors::clock::{Clock, WallClock};
use keel_actors::config::Synchronous;
use keel_actors::persistence::{self, timers, StoreOptions};
use serde_json::{json, Value};

use crate::messages::{nearest_rank, progress, runtime, BenchArgs, Keel, Scratch};
use crate::seed;

/// Target: restart-to-ready, milliseconds, whatever the count.
const TARGET_READY_MS: f64 = 200.0;
/// Target: peak RSS, MiB, whatever the count.
const TARGET_RSS_MIB: f64 = 150.0;
/// Target: p99 fire lateness, milliseconds.
const TARGET_P99_MS: f64 = 5.0;
/// How long after the seeding the due timers start being due.
const LEAD: Duration = Duration::from_secs(3);
/// How long keel may take to fire everything that is due.
const FIRE_DEADLINE: Duration = Duration::from_secs(120);

/// `keel bench [messages|timers]`; no subcommand = `messages`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchCli {
    #[command(subcommand)]
    pub which: Option<BenchWhich>,
    #[command(flatten)]
    pub messages: BenchArgs,
}

#[derive(Debug, Subcommand)]
pub enum BenchWhich {
    /// Acknowledged webhook messages/s against references (the default).
    Messages(BenchArgs),
    /// Durable timers: ready time and RSS with many pending, fire latency, burst.
    Timers(TimerBenchArgs),
    /// Supervised tasks: 1 GiB output capture vs `cat` into a file, RSS, start latency.
    Tasks(crate::tasks::TaskBenchArgs),
    /// Services: ready time with N running containers adopted vs none (needs Docker; by hand).
    Services(crate::services::ServiceBenchArgs),
    /// Sessions: RSS high-water mark and msg/s with one message to each of N chats vs 64.
    Sessions(crate::sessions::SessionBenchArgs),
    /// Start and stop: ready and SIGTERM-to-exit with 1M messages and 1M timers vs an empty store.
    Restart(crate::restart::RestartBenchArgs),
    /// Telegram poller intake: durable updates/s from a fake Bot API vs raw batched SQLite.
    Telegram(crate::telegram::TelegramBenchArgs),
}

/// Flags of `keel bench timers`.
#[derive(Debug, Args)]
pub struct TimerBenchArgs {
    /// Far-future pending timers (comma-separated counts, one keel each),
    /// e.g. `1000000,10000000`.
    #[arg(long, value_delimiter = ',', default_value = "1000000")]
    pub pending: Vec<i64>,
    /// Timers due within one second (fire latency).
    #[arg(long, default_value_t = 10_000)]
    pub due: i64,
    /// Timers due at the same instant (fires/s).
    #[arg(long, default_value_t = 100_000)]
    pub burst: i64,
    /// The keel binary to start (default: this executable).
    #[arg(long)]
    pub keel_binary: Option<PathBuf>,
    /// Keep the scratch directory and print its path.
    #[arg(long)]
    pub keep: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Internal: the baseline child; load every timer of DB, print JSON.
    #[arg(long, hide = true)]
    pub scan_only: Option<PathBuf>,
}

/// Run `keel bench …`.
pub fn dispatch(cli: BenchCli) -> Result<ExitCode> {
    match cli.which {
        None => crate::messages::bench(cli.messages),
        Some(BenchWhich::Messages(args)) => crate::messages::bench(args),
        Some(BenchWhich::Timers(args)) => match &args.scan_only {
            Some(db) => scan_only(db),
            None => bench_timers(args),
        },
        Some(BenchWhich::Tasks(args)) => crate::tasks::bench_tasks(args),
        Some(BenchWhich::Services(args)) => crate::services::bench_services(args),
        Some(BenchWhich::Sessions(args)) => crate::sessions::bench_sessions(args),
        Some(BenchWhich::Restart(args)) => crate::restart::bench_restart(args),
        Some(BenchWhich::Telegram(args)) => crate::telegram::bench_telegram(args),
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn store_opts(db: &Path) -> StoreOptions {
    StoreOptions {
        path: Some(db.to_path_buf()),
        synchronous: Synchronous::Normal,
        busy_timeout: Duration::from_secs(10),
        max_batch: 1024,
        probe_interval: Duration::from_millis(500),
        key: None,
    }
}

/// `(VmHWM, VmRSS)` of a process in KiB.
fn memory_kib(pid: &str) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status.lines().find_map(|l| {
            l.strip_prefix(name)?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()
        })
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The baseline child: a full scan of the active timers into structs and a
/// min-heap by next run, as peers do at start.
fn scan_only(db: &Path) -> Result<ExitCode> {
    let t = Instant::now();
    let conn = persistence::open_read_only(db, None)
        .with_context(|| format!("opening {}", db.display()))?;
    let all = seed::load_all_timers(&conn)?;
    let heap: BinaryHeap<std::cmp::Reverse<(i64, i64)>> = all
        .iter()
        .map(|t| std::cmp::Reverse((t.next_run, t.id)))
        .collect();
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    let (hwm, rss) = memory_kib("self").unwrap_or((0, 0));
    println!(
        "{}",
        json!({"ms": ms, "rows": all.len(), "heap": heap.len(), "hwm_kib": hwm, "rss_kib": rss})
    );
    Ok(ExitCode::SUCCESS)
}

/// Ready time and memory of keel, and of the baseline, with `n` pending.
#[derive(Debug, Clone)]
struct ReadyLine {
    pending: i64,
    seed_s: f64,
    keel_ready_ms: f64,
    keel_hwm_kib: u64,
    keel_rss_kib: u64,
    base_ms: f64,
    base_hwm_kib: u64,
}

/// Fire lateness of one phase.
#[derive(Debug, Clone, Default)]
struct FireLine {
    count: i64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// Due instant (burst) until the last receipt was visible (20 ms polls).
    span_s: f64,
    /// Due instant until its receipt was visible to a reader: p50, p99.
    visible_p50_ms: f64,
    visible_p99_ms: f64,
}

/// A keel on `dir`, timed from spawn to `/readyz` 200 (polled every 2 ms).
fn start_timed(binary: &Path, dir: &Path) -> Result<(Keel, f64)> {
    let t = Instant::now();
    // The seeded store is plain SQLite (written by the bench itself).
    let mut keel = Keel::start_with(binary, dir, false, "")?;
    let rt = runtime()?;
    let base = format!("http://{}", keel.addr);
    rt.block_on(keel.wait_ready_polling(&base, Duration::from_secs(60), Duration::from_millis(2)))?;
    Ok((keel, t.elapsed().as_secs_f64() * 1000.0))
}

fn baseline(binary: &Path, db: &Path) -> Result<(f64, u64)> {
    let out = Command::new(binary)
        .args(["bench", "timers", "--scan-only"])
        .arg(db)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("running the baseline scan")?;
    if !out.status.success() {
        bail!("the baseline scan failed: {}", out.status);
    }
    let v: Value = serde_json::from_slice(&out.stdout).context("the baseline's output")?;
    Ok((
        v["ms"].as_f64().unwrap_or(0.0),
        v["hwm_kib"].as_u64().unwrap_or(0),
    ))
}

/// Wait until `want` receipts exist, polling every `poll`; returns when
/// the last became visible and the `(unix ms, receipts)` samples.
/// How the bench watches receipts arrive.
#[derive(Clone, Copy)]
enum Watch {
    /// `COUNT(*)` of the receipts at every poll: exact, cheap for 10k.
    Count,
    /// The highest timer id holding a receipt (one read at the end of the
    /// primary key): keel fires a burst in id order, so that id less the
    /// burst's first id is how many fired; an exact `COUNT` confirms the
    /// end. A `COUNT` over 100k receipts at every poll kept most of a core
    /// busy beside keel on this 2-core machine (and its read transactions
    /// held the WAL back).
    Highest { first_id: i64 },
}

fn wait_receipts(
    db: &Path,
    want: i64,
    poll: Duration,
    watch: Watch,
) -> Result<(Instant, Vec<(i64, i64)>)> {
    let conn = persistence::open_read_only(db, None)?;
    let deadline = Instant::now() + FIRE_DEADLINE;
    let mut samples = Vec::new();
    let mut watch = watch;
    loop {
        let n = match watch {
            Watch::Count => seed::count_receipts(&conn)?,
            Watch::Highest { first_id } => {
                let seen = (seed::highest_receipt(&conn)?.unwrap_or(first_id - 1) - first_id + 1)
                    .clamp(0, want);
                if seen < want {
                    seen
                } else {
                    // The last id fired: count exactly from here on (a
                    // fire that failed and waits for its retry shows).
                    watch = Watch::Count;
                    seed::count_receipts(&conn)?
                }
            }
        };
        samples.push((now_ms(), n));
        if n >= want {
            return Ok((Instant::now(), samples));
        }
        if Instant::now() >= deadline {
            bail!("only {n} of {want} timers fired within {FIRE_DEADLINE:?}");
        }
        std::thread::sleep(poll);
    }
}

/// Durable lateness of the k-th due instant: when the k-th receipt was
/// first seen committed by a reader, minus the instant (an upper bound: it
/// includes the commit, the fsync and up to one poll). `(p50, p99)` ms.
fn visible_lateness(samples: &[(i64, i64)], first: i64, step_us: i64, count: i64) -> (f64, f64) {
    let mut late: Vec<i64> = Vec::with_capacity(count as usize);
    let mut j = 0;
    for k in 0..count {
        while j < samples.len() && samples[j].1 < k + 1 {
            j += 1;
        }
        let Some(&(seen, _)) = samples.get(j) else {
            break;
        };
        late.push((seen - (first + k * step_us / 1000)).max(0));
    }
    late.sort_unstable();
    let pick = |q: f64| pick_ms(&late, q);
    (pick(0.50), pick(0.99))
}

/// Nearest-rank quantile of sorted millisecond values (0 when empty).
fn pick_ms(sorted: &[i64], q: f64) -> f64 {
    nearest_rank(sorted.len(), q).map_or(0.0, |i| sorted[i] as f64)
}

fn lateness(db: &Path) -> Result<FireLine> {
    let conn = persistence::open_read_only(db, None)?;
    let mut late: Vec<i64> = seed::receipts(&conn)?.into_iter().map(|(_, l)| l).collect();
    late.sort_unstable();
    let pick = |q: f64| pick_ms(&late, q);
    Ok(FireLine {
        count: late.len() as i64,
        p50_ms: pick(0.50),
        p99_ms: pick(0.99),
        max_ms: late.last().copied().unwrap_or(0) as f64,
        ..FireLine::default()
    })
}

fn bench_timers(args: TimerBenchArgs) -> Result<ExitCode> {
    if args.pending.iter().any(|&n| n < 0) || args.due < 1 || args.burst < 1 {
        bail!("counts must be positive");
    }
    let binary = match &args.keel_binary {
        Some(b) => b.clone(),
        None => std::env::current_exe().context("cannot find the keel executable")?,
    };
    let scratch = Scratch::create(args.keep)?;
    let far = now_ms() + 10 * 365 * 86_400_000;

    let mut ready = Vec::new();
    for (i, &n) in args.pending.iter().enumerate() {
        let dir = scratch.path.join(format!("pending-{i}"));
        let db = dir.join("keel").join("keel.db");
        std::fs::create_dir_all(db.parent().unwrap_or(&dir))?;
        progress(format!("seeding {n} far-future timers"));
        let t = Instant::now();
        {
            let (conn, _) = persistence::open_store(&store_opts(&db))?;
            seed::seed_timers(&conn, &WallClock.stamp(), "pending", n, far, 1000)?;
        }
        let seed_s = t.elapsed().as_secs_f64();
        progress(format!("seeded in {seed_s:.1} s; baseline scan"));
        let (base_ms, base_hwm_kib) = baseline(&binary, &db)?;
        progress("starting keel".into());
        let (mut keel, keel_ready_ms) = start_timed(&binary, &dir)?;
        let (keel_hwm_kib, keel_rss_kib) = memory_kib(&keel.pid.to_string()).unwrap_or((0, 0));
        keel.stop()?;
        ready.push(ReadyLine {
            pending: n,
            seed_s,
            keel_ready_ms,
            keel_hwm_kib,
            keel_rss_kib,
            base_ms,
            base_hwm_kib,
        });
    }

    // Latency and burst run on their own databases holding the first
    // pending count too, so the window is refilled from a large index.
    let pending = args.pending.first().copied().unwrap_or(0);
    let mut fires = Vec::new();
    for (name, count, step_us) in [
        ("due", args.due, 1_000_000 / args.due.max(1)),
        ("burst", args.burst, 0),
    ] {
        let dir = scratch.path.join(name);
        let db = dir.join("keel").join("keel.db");
        std::fs::create_dir_all(db.parent().unwrap_or(&dir))?;
        progress(format!("{name}: seeding {pending} pending + {count} due"));
        let (first, first_id) = {
            let (conn, _) = persistence::open_store(&store_opts(&db))?;
            seed::seed_timers(&conn, &WallClock.stamp(), "pending", pending, far, 1000)?;
            let first = now_ms() + LEAD.as_millis() as i64;
            seed::seed_timers(&conn, &WallClock.stamp(), name, count, first, step_us)?;
            (first, seed::first_timer_id(&conn, name)?)
        };
        let (mut keel, _) = start_timed(&binary, &dir)?;
        if now_ms() >= first {
            progress("warning: keel became ready after the first due instant".into());
        }
        let watch = if step_us == 0 {
            Watch::Highest { first_id }
        } else {
            Watch::Count
        };
        let (done, samples) = wait_receipts(&db, count, Duration::from_millis(1), watch)?;
        let span_s = {
            let due_at = Instant::now()
                - Duration::from_millis(u64::try_from(now_ms() - first).unwrap_or(0));
            done.saturating_duration_since(due_at).as_secs_f64()
        };
        keel.stop()?;
        let mut line = lateness(&db)?;
        line.span_s = span_s;
        (line.visible_p50_ms, line.visible_p99_ms) =
            visible_lateness(&samples, first, step_us, count);
        fires.push((name, line));
    }

    // Reference: the same fires (fire_timer, due window by window, one
    // transaction per window) in this process with nothing else running,
    // on a store holding what keel's burst store holds (the same pending
    // timers beside the due ones): the machine's limit for these rows.
    let reference_fps = {
        let dir = scratch.path.join("reference");
        let db = dir.join("keel.db");
        progress(format!(
            "reference: seeding {pending} pending; {} fires back to back",
            args.burst
        ));
        let mut opts = store_opts(&db);
        opts.synchronous = Synchronous::Full;
        let (conn, _) = persistence::open_store(&opts)?;
        seed::seed_timers(&conn, &WallClock.stamp(), "pending", pending, far, 1000)?;
        let due_at = now_ms() - 1;
        seed::seed_timers(&conn, &WallClock.stamp(), "burst", args.burst, due_at, 0)?;
        // As in keel: the bench keel has no webhook reply_url, so webhook
        // chats are not routed and reminders get no outbox row.
        let routed = std::collections::HashSet::new();
        let t = Instant::now();
        let mut fired = 0;
        loop {
            let window = timers::due_window(&conn, 1024)?;
            if window.is_empty() {
                break;
            }
            let tx = conn.unchecked_transaction()?;
            let now = now_ms();
            for (id, due) in window {
                fired += timers::fire_timer(&tx, id, due, now, &routed)?.fired;
            }
            tx.commit()?;
        }
        fired as f64 / t.elapsed().as_secs_f64()
    };

    let report = json!({
        "ready": ready.iter().map(|r| json!({
            "pending": r.pending,
            "seed_s": r.seed_s,
            "keel_ready_ms": r.keel_ready_ms,
            "keel_hwm_mib": mib(r.keel_hwm_kib),
            "keel_rss_mib": mib(r.keel_rss_kib),
            "baseline_load_ms": r.base_ms,
            "baseline_hwm_mib": mib(r.base_hwm_kib),
        })).collect::<Vec<_>>(),
        "fires": fires.iter().map(|(name, f)| json!({
            "phase": name,
            "count": f.count,
            "late_p50_ms": f.p50_ms,
            "late_p99_ms": f.p99_ms,
            "late_max_ms": f.max_ms,
            "visible_p50_ms": f.visible_p50_ms,
            "visible_p99_ms": f.visible_p99_ms,
            "fires_per_s": f.count as f64 / f.span_s.max(1e-9),
        })).collect::<Vec<_>>(),
        "reference_fires_per_s": reference_fps,
    });
    if args.json {
        println!("{report}");
    } else {
        print_table(&ready, &fires, reference_fps);
    }
    if args.keep {
        eprintln!("keel bench: scratch kept in {}", scratch.path.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "MISSED"
    }
}

fn print_table(ready: &[ReadyLine], fires: &[(&str, FireLine)], reference_fps: f64) {
    println!("keel bench timers (targets: ready < {TARGET_READY_MS} ms, RSS < {TARGET_RSS_MIB} MiB, p99 late < {TARGET_P99_MS} ms)");
    println!();
    println!(
        "{:>10}  {:>14} {:>12} {:>12}   {:>16} {:>14}   {:>8}",
        "pending",
        "keel ready ms",
        "keel HWM MiB",
        "keel RSS MiB",
        "baseline load ms",
        "baseline MiB",
        "verdict"
    );
    for r in ready {
        let ok = r.keel_ready_ms < TARGET_READY_MS && mib(r.keel_hwm_kib) < TARGET_RSS_MIB;
        println!(
            "{:>10}  {:>14.1} {:>12.1} {:>12.1}   {:>16.1} {:>14.1}   {:>8}",
            r.pending,
            r.keel_ready_ms,
            mib(r.keel_hwm_kib),
            mib(r.keel_rss_kib),
            r.base_ms,
            mib(r.base_hwm_kib),
            verdict(ok)
        );
    }
    for r in ready {
        println!(
            "  {} pending: baseline/keel load time {:.1}x, memory {:.1}x (seeded in {:.1} s)",
            r.pending,
            r.base_ms / r.keel_ready_ms.max(1e-9),
            r.base_hwm_kib as f64 / (r.keel_hwm_kib.max(1)) as f64,
            r.seed_s
        );
    }
    println!();
    println!(
        "{:>6} {:>8} {:>10} {:>10} {:>10} {:>12} {:>12} {:>10}   {:>8}",
        "phase",
        "timers",
        "p50 ms",
        "p99 ms",
        "max ms",
        "durable p50",
        "durable p99",
        "fires/s",
        "verdict"
    );
    for (name, f) in fires {
        println!(
            "{:>6} {:>8} {:>10.1} {:>10.1} {:>10.1} {:>12.1} {:>12.1} {:>10.0}   {:>8}",
            name,
            f.count,
            f.p50_ms,
            f.p99_ms,
            f.max_ms,
            f.visible_p50_ms,
            f.visible_p99_ms,
            f.count as f64 / f.span_s.max(1e-9),
            if *name == "due" {
                verdict(f.p99_ms < TARGET_P99_MS)
            } else {
                "-"
            }
        );
    }
    println!("p50/p99/max: fired_at − due_at of each receipt (the actor's clock when it fired);");
    println!("durable: from the due instant until a reader saw the receipt committed (fsync, 1 ms polls)");
    if let Some((_, f)) = fires.iter().find(|(n, _)| *n == "burst") {
        let fps = f.count as f64 / f.span_s.max(1e-9);
        println!(
            "reference (same fires back to back on a store like keel's, one transaction per 1024): {reference_fps:.0} fires/s; burst is {:.2}x of it",
            fps / reference_fps.max(1e-9)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_lateness_uses_the_first_sample_that_shows_each_receipt() {
        // Instants at 1000, 1001, 1002, 1003 (1 ms apart); receipts seen
        // 2 at 1002, 4 at 1010: late 2, 1, 8, 7.
        let samples = [(1000, 0), (1002, 2), (1010, 4)];
        let (p50, p99) = visible_lateness(&samples, 1000, 1000, 4);
        assert_eq!((p50, p99), (2.0, 8.0));
    }

    #[test]
    fn no_subcommand_means_the_message_benchmark() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            bench: BenchCli,
        }
        let cli = Cli::try_parse_from(["keel", "--clients", "3"]).unwrap();
        assert!(cli.bench.which.is_none());
        assert_eq!(cli.bench.messages.clients, 3);
        let cli = Cli::try_parse_from(["keel", "timers", "--pending", "5,7"]).unwrap();
        match cli.bench.which {
            Some(BenchWhich::Timers(t)) => assert_eq!(t.pending, vec![5, 7]),
            _ => panic!("timers subcommand not parsed"),
        }
    }
}
