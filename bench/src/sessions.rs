//! `keel bench sessions [--chats N]`: one message to each of N distinct
//! chats through the webhook (64 clients), against the same load on 64
//! chats in the same run. Prints keel's RSS high-water mark (VmHWM from
//! /proc) for each and the throughput ratio (issue 14 target: HWM < 64 MiB
//! whatever N, the bounded `[sessions] max_live` cache; throughput within
//! 20 % of the 64-chat figure). Figures are printed, never asserted.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};

use crate::messages::{progress, runtime, Keel, Scratch};

/// Flags of `keel bench sessions`.
#[derive(Debug, Args)]
pub struct SessionBenchArgs {
    /// Distinct chats, one message each.
    #[arg(long, default_value_t = 100_000)]
    pub chats: usize,
    /// Concurrent webhook clients.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
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

/// VmHWM of a process in KiB.
fn hwm_kib(pid: i32) -> Option<u64> {
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

struct Run {
    messages: usize,
    chats: usize,
    seconds: f64,
    hwm_kib: u64,
}

impl Run {
    fn rate(&self) -> f64 {
        self.messages as f64 / self.seconds
    }
    fn json(&self) -> Value {
        json!({
            "messages": self.messages,
            "chats": self.chats,
            "seconds": (self.seconds * 1000.0).round() / 1000.0,
            "msgs_per_s": self.rate().round(),
            "hwm_kib": self.hwm_kib,
            "hwm_mib": (self.hwm_kib as f64 / 1024.0 * 10.0).round() / 10.0,
        })
    }
}

/// Send `messages` messages, message `n` to chat `n % chats`, from
/// `clients` concurrent keep-alive clients; every one must get 200.
async fn load(base: &str, messages: usize, chats: usize, clients: usize, tag: &str) -> Result<f64> {
    let http = reqwest::Client::new();
    let url = format!("{base}/v1/messages");
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let http = http.clone();
        let url = url.clone();
        let tag = tag.to_string();
        tasks.push(tokio::task::spawn_local(async move {
            let mut n = c;
            while n < messages {
                let body = json!({
                    "id": format!("{tag}-{n}"),
                    "chat": format!("{tag}-{}", n % chats),
                    "from": format!("u{}", n % chats),
                    "text": format!("hello {n}"),
                });
                let r = http.post(&url).json(&body).send().await?;
                let status = r.status();
                r.bytes().await?;
                if status != reqwest::StatusCode::OK {
                    bail!("HTTP {status} for message {tag}-{n}");
                }
                n += clients;
            }
            Ok(())
        }));
    }
    for t in tasks {
        t.await.context("a client task failed")??;
    }
    Ok(started.elapsed().as_secs_f64())
}

fn measure(
    args: &SessionBenchArgs,
    binary: &std::path::Path,
    dir: &std::path::Path,
    chats: usize,
) -> Result<Run> {
    std::fs::create_dir_all(dir)?;
    let mut keel = Keel::start_with(binary, dir, true, "")?;
    let base = format!("http://{}", keel.addr);
    let rt = runtime()?;
    let local = tokio::task::LocalSet::new();
    let seconds = local.block_on(&rt, async {
        keel.wait_ready_polling(&base, Duration::from_secs(60), Duration::from_millis(20))
            .await?;
        load(&base, args.chats, chats, args.clients, "s").await
    })?;
    let hwm_kib = hwm_kib(keel.pid).context("cannot read keel's VmHWM")?;
    let status = keel.stop().context("stopping keel")?;
    if !status.success() {
        bail!("keel exited with {status}");
    }
    Ok(Run {
        messages: args.chats,
        chats,
        seconds,
        hwm_kib,
    })
}

pub fn bench_sessions(args: SessionBenchArgs) -> Result<ExitCode> {
    if args.chats == 0 || args.clients == 0 {
        bail!("--chats and --clients must be > 0");
    }
    let binary = match &args.keel_binary {
        Some(b) => b.clone(),
        None => std::env::current_exe().context("cannot find the keel executable")?,
    };
    let scratch = Scratch::create(args.keep)?;
    progress(format!(
        "reference: {} messages to 64 chats, {} clients",
        args.chats, args.clients
    ));
    let few = measure(&args, &binary, &scratch.path.join("few"), 64)?;
    progress(format!(
        "{} messages to {} distinct chats",
        args.chats, args.chats
    ));
    let many = measure(&args, &binary, &scratch.path.join("many"), args.chats)?;
    let ratio = many.rate() / few.rate();
    let ratio = (ratio * 1000.0).round() / 1000.0;
    if args.json {
        println!(
            "{}",
            json!({ "distinct": many.json(), "reference_64": few.json(), "throughput_ratio": ratio })
        );
    } else {
        for (name, r) in [("64 chats", &few), ("distinct chats", &many)] {
            println!(
                "{name:>15}: {} messages to {} chats in {:.2} s = {:.0} msg/s, VmHWM {:.1} MiB",
                r.messages,
                r.chats,
                r.seconds,
                r.rate(),
                r.hwm_kib as f64 / 1024.0
            );
        }
        println!(
            "throughput distinct / 64 chats: {ratio:.3} (target >= 0.8); VmHWM target < 64 MiB"
        );
    }
    if args.keep {
        println!("scratch: {}", scratch.path.display());
    }
    Ok(ExitCode::SUCCESS)
}
