//! `keel bench telegram [--updates N] [--batch B]`: the Telegram poller's
//! durable intake (issue 14). The fake Bot API of the torture battery
//! ([`FakeTelegram::start_queued`]) holds N updates queued before keel
//! starts, round-robin over four private chats (a bot's traffic is many
//! messages per chat; distinct chats would measure session creation, not
//! the poller), and serves at most B per getUpdates. A real keel (real
//! binary, real SQLite, `[storage]` defaults: encrypted, synchronous=full)
//! polls it; keel's replies are answered at once and not counted.
//!
//! Durable updates/s = N / (first getUpdates → the first offset confirming
//! the last update): keel sends an offset only after its batch committed.
//! Reference (b) of `keel bench` (raw batched SQLite transactions, B rows
//! each, same storage settings) runs in this process for the ratio. Checked
//! (exit 1 if not): every update stored exactly once, read back through the
//! admin HTTP API, and offsets never went backwards.

use std::fs::DirBuilder;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use keel_actors::masterkey::{KeyHandle, MasterKey};
use serde_json::json;

use crate::fake_telegram::FakeTelegram;
use crate::messages::{cpu_seconds, progress, run_reference, runtime, Keel, RowMaker, Scratch};

/// Target: keel's durable updates/s as a fraction of reference (b).
const TARGET_RATIO: f64 = 0.5;
/// Chats the updates come from (the fake's four).
const CHATS: usize = 4;
/// The bot token the fake serves.
const TOKEN: &str = "4242:bench-telegram";

/// Flags of `keel bench telegram`.
#[derive(Debug, Args)]
pub struct TelegramBenchArgs {
    /// Updates queued at the fake Bot API before keel starts.
    #[arg(long, default_value_t = 100_000)]
    pub updates: usize,
    /// Most updates per getUpdates (keel's `[telegram] limit`, 1–100).
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Seconds of transaction time for reference (b).
    #[arg(long, default_value_t = 3.0)]
    pub reference_seconds: f64,
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

/// What one run measured and checked.
struct Outcome {
    per_s: f64,
    reference_per_s: f64,
    stored: usize,
    dup: u64,
    missing: usize,
    offset_regressions: u64,
    cpu_us_per_update: Option<f64>,
}

pub fn bench_telegram(args: TelegramBenchArgs) -> Result<ExitCode> {
    if args.updates == 0 {
        bail!("--updates must be at least 1");
    }
    if !(1..=100).contains(&args.batch) {
        bail!("--batch must be 1 to 100 (Telegram's getUpdates limit)");
    }
    if !(args.reference_seconds.is_finite() && args.reference_seconds > 0.0) {
        bail!("--reference-seconds must be a positive number of seconds");
    }
    let binary = match &args.keel_binary {
        Some(b) => b.clone(),
        None => std::env::current_exe().context("cannot find the keel executable")?,
    };
    let scratch = Scratch::create(args.keep)?;
    let out = run(&args, &binary, &scratch.path)?;
    print(&args, &out);
    if args.keep {
        eprintln!("keel bench: scratch kept in {}", scratch.path.display());
    }
    let correct = out.missing == 0 && out.dup == 0 && out.offset_regressions == 0;
    if !correct {
        eprintln!(
            "keel bench: {} updates missing, {} duplicated, {} offset regressions (all must be 0)",
            out.missing, out.dup, out.offset_regressions
        );
    }
    Ok(if correct {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Reference (b), then keel against the fake; the figures and checks.
fn run(
    args: &TelegramBenchArgs,
    binary: &std::path::Path,
    dir: &std::path::Path,
) -> Result<Outcome> {
    progress(format!(
        "reference (b): {} rows per transaction, {} s",
        args.batch, args.reference_seconds
    ));
    let ref_dir = dir.join("ref-b");
    DirBuilder::new()
        .mode(0o700)
        .create(&ref_dir)
        .with_context(|| format!("cannot create {}", ref_dir.display()))?;
    let key = KeyHandle::new(MasterKey::generate(), "bench");
    let reference = run_reference(
        &ref_dir,
        &RowMaker::new(CHATS),
        Some(args.batch),
        args.reference_seconds,
        Some(key),
    )
    .context("reference (b): batched transactions")?;
    let reference_per_s = reference.messages as f64 / reference.busy.as_secs_f64().max(1e-9);

    progress(format!(
        "queueing {} updates at the fake Bot API",
        args.updates
    ));
    let fake = FakeTelegram::start_queued(TOKEN, args.updates, args.batch)?;
    let extra = format!(
        "\n[telegram]\nenabled = true\napi_base = \"{}\"\ntoken = \"{TOKEN}\"\nlimit = {}\n",
        fake.api_base, args.batch
    );
    progress(format!("starting {}", binary.display()));
    let mut keel = Keel::start_with(binary, dir, true, &extra)?;
    let rt = runtime()?;
    let base = format!("http://{}", keel.addr);
    rt.block_on(keel.wait_ready_polling(
        &base,
        Duration::from_secs(60),
        Duration::from_millis(20),
    ))?;
    let pid = keel.pid.to_string();
    let cpu_before = cpu_seconds(&pid);
    let (first, done) = wait_confirmed(&fake, &mut keel, args.updates)?;
    let cpu_after = cpu_seconds(&pid);
    let seen = rt.block_on(async {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .context("cannot build an HTTP client")?;
        crate::torture::observe(&http, &base).await
    })?;
    keel.stop().context("stopping keel")?;

    let upstream = fake.upstream();
    let stored = seen.telegram.len();
    let dup = seen.telegram.values().map(|n| n.saturating_sub(1)).sum();
    let missing = upstream
        .fed
        .iter()
        .filter(|f| !seen.telegram.contains_key(&f.key))
        .count();
    let secs = done.duration_since(first).as_secs_f64().max(1e-9);
    Ok(Outcome {
        per_s: args.updates as f64 / secs,
        reference_per_s,
        stored,
        dup,
        missing,
        offset_regressions: upstream.offset_regressions,
        cpu_us_per_update: cpu_before
            .zip(cpu_after)
            .map(|(a, b)| (b - a) * 1e6 / args.updates as f64),
    })
}

/// Poll the fake until an offset confirmed every update (or keel exits, or
/// a deadline generous for the machine passes): `(first poll, confirmed)`.
fn wait_confirmed(
    fake: &FakeTelegram,
    keel: &mut Keel,
    updates: usize,
) -> Result<(Instant, Instant)> {
    let limit = Duration::from_secs(60) + Duration::from_millis(updates as u64);
    let deadline = Instant::now() + limit;
    loop {
        if let (Some(first), Some(done)) = fake.timing() {
            return Ok((first, done));
        }
        if let Some(status) = keel.child.try_wait().context("waiting for keel")? {
            keel.exited = Some(status);
            bail!(
                "keel exited with {status} before confirming every update; its log:\n{}",
                crate::messages::log_tail(&keel.log)
            );
        }
        if Instant::now() >= deadline {
            bail!("keel did not confirm all {updates} updates within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn print(args: &TelegramBenchArgs, o: &Outcome) {
    let ratio = o.per_s / o.reference_per_s.max(1e-9);
    if args.json {
        println!(
            "{}",
            json!({
                "updates": args.updates,
                "batch": args.batch,
                "updates_per_s": (o.per_s * 10.0).round() / 10.0,
                "reference_per_s": (o.reference_per_s * 10.0).round() / 10.0,
                "ratio": (ratio * 1000.0).round() / 1000.0,
                "ratio_min": TARGET_RATIO,
                "stored": o.stored,
                "missing": o.missing,
                "dup": o.dup,
                "offset_regressions": o.offset_regressions,
                "cpu_us_per_update": o.cpu_us_per_update.map(|v| (v * 10.0).round() / 10.0),
            })
        );
        return;
    }
    println!(
        "updates            {} ({} per getUpdates, {CHATS} chats)",
        args.updates, args.batch
    );
    println!("keel durable       {:.0} updates/s", o.per_s);
    println!(
        "reference (b)      {:.0} rows/s ({} per transaction)",
        o.reference_per_s, args.batch
    );
    println!("ratio              {ratio:.2} (target >= {TARGET_RATIO})");
    match o.cpu_us_per_update {
        Some(v) => println!("keel CPU           {v:.1} µs per update"),
        None => println!("keel CPU           - (no /proc)"),
    }
    println!(
        "stored {} / missing {} / duplicated {} / offset regressions {}",
        o.stored, o.missing, o.dup, o.offset_regressions
    );
}
