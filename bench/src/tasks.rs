//! `keel bench tasks`: output capture throughput, memory and start latency
//! of supervised tasks (issue 10's benchmark; not a test). Figures are
//! printed, never asserted.
//!
//! 1. Capture: a task writes `--bytes` (1 GiB) to stdout (`head -c N
//!    /dev/zero`); keel stores it in `log_fragments` with `synchronous =
//!    full`, one commit (one fsync) per `log_batch_bytes`. The reference,
//!    in the same run: the same stream read by this process in 64 KiB
//!    chunks into a file with `fdatasync` every `log_batch_bytes` — `cat`
//!    with keel's fsync cadence. Throughput is bytes over the task's
//!    RUNNING → finished time (keel's own clock, both stamps written by
//!    the store); the ratio keel / reference is the figure (target ≥ 0.5).
//!    keel's peak RSS (VmHWM) is read after the flood (target < 64 MiB).
//! 2. Start latency: `--runs` (100) times `/task run stamp` over the
//!    webhook; the child prints its own start time (`date +%s%N`), and the
//!    latency is that minus the instant just before the POST (p50/p99).

use std::fs::File;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};

use crate::messages::{progress, runtime, Keel, Scratch};

/// Target: capture throughput as a fraction of the reference.
const TARGET_RATIO: f64 = 0.5;
/// Target: keel's peak RSS, MiB.
const TARGET_RSS_MIB: f64 = 64.0;
/// Batch size keel is configured with (and the reference's fsync cadence).
const BATCH: usize = 256 * 1024;

/// Flags of `keel bench tasks`.
#[derive(Debug, Args)]
pub struct TaskBenchArgs {
    /// Bytes the capture task writes to stdout.
    #[arg(long, default_value_t = 1 << 30)]
    pub bytes: u64,
    /// `/task run` → child running measurements.
    #[arg(long, default_value_t = 100)]
    pub runs: usize,
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

fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

/// `cat` of the same stream into a file, `fdatasync` every `BATCH` bytes.
fn reference(bytes: u64, out: &std::path::Path) -> Result<f64> {
    let mut child = Command::new("head")
        .arg("-c")
        .arg(bytes.to_string())
        .arg("/dev/zero")
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start head")?;
    let mut pipe = child.stdout.take().context("no stdout pipe")?;
    let mut file = File::create(out)?;
    let mut buf = vec![0u8; 64 * 1024];
    let (mut total, mut since_sync) = (0u64, 0usize);
    let t = Instant::now();
    loop {
        let n = pipe.read(&mut buf)?;
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n])?;
        total += n as u64;
        since_sync += n;
        if since_sync >= BATCH {
            file.sync_data()?;
            since_sync = 0;
        }
    }
    file.sync_data()?;
    let secs = t.elapsed().as_secs_f64();
    child.wait()?;
    if total != bytes {
        bail!("reference read {total} bytes, expected {bytes}");
    }
    Ok(bytes as f64 / secs.max(1e-9))
}

fn ms_between(a: &str, b: &str) -> Option<f64> {
    let a = chrono_ms(a)?;
    let b = chrono_ms(b)?;
    Some((b - a) as f64)
}

/// RFC 3339 `YYYY-MM-DDTHH:MM:SS.mmmZ` → unix ms (keel's stamps).
fn chrono_ms(s: &str) -> Option<i64> {
    let (date, time) = s.trim_end_matches('Z').split_once('T')?;
    let d: Vec<i64> = date
        .split('-')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let (hms, ms) = time.split_once('.').unwrap_or((time, "0"));
    let t: Vec<i64> = hms
        .split(':')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let (y, m, day) = (d[0], d[1], d[2]);
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 24 + t[0]) * 60 + t[1]) * 60_000 + t[2] * 1000 + ms.parse::<i64>().ok()?)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn bench_tasks(args: TaskBenchArgs) -> Result<ExitCode> {
    let binary = match &args.keel_binary {
        Some(b) => b.clone(),
        None => std::env::current_exe().context("cannot find the keel executable")?,
    };
    let scratch = Scratch::create(args.keep)?;
    progress(format!(
        "reference: cat of {} bytes into a file, fdatasync every {BATCH} bytes",
        args.bytes
    ));
    let ref_bps = reference(args.bytes, &scratch.path.join("reference.out"))?;
    let _ = std::fs::remove_file(scratch.path.join("reference.out"));
    let extra = format!(
        "\n[tasks]\nlog_batch_bytes = {BATCH}\nmax_log_bytes = {}\nconcurrency = 1\n\
         \n[task.flood]\ncommand = [\"head\", \"-c\", \"{}\", \"/dev/zero\"]\n\
         \n[task.stamp]\ncommand = [\"date\", \"+%s%N\"]\nallowed_chats = [\"webhook:bench\"]\n",
        args.bytes + 1,
        args.bytes
    );
    let mut keel = Keel::start_with(&binary, &scratch.path, true, &extra)?;
    let base = format!("http://{}", keel.addr);
    let rt = runtime()?;
    let result = rt.block_on(async {
        keel.wait_ready_polling(&base, Duration::from_secs(60), Duration::from_millis(20))
            .await?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?;
        let get = |id: i64| {
            let http = http.clone();
            let url = format!("{base}/v1/tasks/{id}");
            async move { http.get(url).send().await?.json::<Value>().await }
        };
        let wait_end = |id: i64| {
            let get = &get;
            async move {
                loop {
                    let t = get(id).await?;
                    if t["finished_at"].is_string() {
                        return Ok::<Value, anyhow::Error>(t);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        progress(format!("keel: a task writing {} bytes to stdout", args.bytes));
        let r: Value = http
            .post(format!("{base}/v1/tasks"))
            .json(&json!({"name": "flood"}))
            .send()
            .await?
            .json()
            .await?;
        let id = r["id"].as_i64().context("no task id")?;
        let t = wait_end(id).await?;
        if t["state"] != "SUCCEEDED" || t["log_bytes"].as_u64() != Some(args.bytes) {
            bail!("the capture task ended {t}");
        }
        let running = t["states"][1]["at"].as_str().unwrap_or("");
        let finished = t["finished_at"].as_str().unwrap_or("");
        let ms = ms_between(running, finished).context("bad timestamps")?;
        let keel_bps = args.bytes as f64 / (ms.max(1.0) / 1000.0);
        let hwm_kib = memory_hwm_kib(keel.pid).unwrap_or(0);

        progress(format!("start latency: {} runs of /task run stamp", args.runs));
        let mut lat = Vec::new();
        for i in 0..args.runs {
            let t0 = now_ns();
            let r = http
                .post(format!("{base}/v1/messages"))
                .json(&json!({"id": format!("b{i}"), "chat": "bench", "from": "bench", "text": "/task run stamp"}))
                .send()
                .await?;
            if !r.status().is_success() {
                bail!("POST /v1/messages answered {}", r.status());
            }
            // Queued ids follow the capture task in order.
            let id = id + 1 + i as i64;
            let t = wait_end(id).await?;
            if t["name"] != "stamp" || t["state"] != "SUCCEEDED" {
                bail!("stamp run {i} ended {t}");
            }
            let out = http
                .get(format!("{base}/v1/tasks/{id}/logs"))
                .send()
                .await?
                .text()
                .await?;
            let child_ns: i128 = out.trim().parse().context("date +%s%N output")?;
            lat.push((child_ns - t0) as f64 / 1e6);
        }
        lat.sort_by(|a, b| a.total_cmp(b));
        Ok::<_, anyhow::Error>((keel_bps, hwm_kib, lat))
    });
    let stopped = keel.stop();
    let (keel_bps, hwm_kib, lat) = result?;
    stopped?;
    let ratio = keel_bps / ref_bps;
    let hwm_mib = hwm_kib as f64 / 1024.0;
    let (p50, p99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
    if args.json {
        println!(
            "{}",
            json!({
                "bytes": args.bytes,
                "keel_mib_s": keel_bps / 1048576.0,
                "reference_mib_s": ref_bps / 1048576.0,
                "ratio": ratio,
                "ratio_target": TARGET_RATIO,
                "keel_hwm_mib": hwm_mib,
                "hwm_target_mib": TARGET_RSS_MIB,
                "start_latency_ms": {"runs": lat.len(), "p50": p50, "p99": p99},
            })
        );
    } else {
        println!(
            "task output capture ({} bytes, fsync every {BATCH} bytes)",
            args.bytes
        );
        println!(
            "  keel       {:8.1} MiB/s   reference (cat into a file) {:8.1} MiB/s   ratio {:.2} (target >= {TARGET_RATIO})",
            keel_bps / 1048576.0,
            ref_bps / 1048576.0,
            ratio
        );
        println!("  keel peak RSS {hwm_mib:.1} MiB (target < {TARGET_RSS_MIB})");
        println!(
            "/task run -> child running, {} runs: p50 {p50:.1} ms, p99 {p99:.1} ms",
            lat.len()
        );
    }
    if args.keep {
        println!("scratch kept: {}", scratch.path.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn memory_hwm_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        l.strip_prefix("VmHWM:")?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn keel_stamps_read_as_unix_ms() {
        assert_eq!(super::chrono_ms("1970-01-01T00:00:01.500Z"), Some(1_500));
        assert_eq!(
            super::chrono_ms("2025-12-01T12:00:00.123Z"),
            Some(1_764_590_400_123)
        );
    }
}
