//! `keel bench sessions [--chats N]`: one message to each of N distinct
//! chats through the webhook (64 clients), against the same load on 64
//! chats in the same run. Prints keel's RSS high-water mark (VmHWM from
//! /proc) for each and the throughput ratio (issue 14 target: HWM < 64 MiB
//! whatever N, the bounded `[sessions] max_live` cache; throughput within
//! 20 % of the 64-chat figure). Figures are printed, never asserted.
//!
//! The load generator runs its clients on several OS threads (one
//! single-threaded runtime each, `--client-threads`, default: the number of
//! cores), so it is not the bottleneck; the CPU it and keel used is printed
//! with each run to show which side was saturated.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};

use crate::messages::{cpu_seconds, progress, runtime, Keel, Scratch};

/// Flags of `keel bench sessions`.
#[derive(Debug, Args)]
pub struct SessionBenchArgs {
    /// Distinct chats, one message each.
    #[arg(long, default_value_t = 100_000)]
    pub chats: usize,
    /// Concurrent webhook clients.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// OS threads the clients are spread over (default: available cores).
    #[arg(long)]
    pub client_threads: Option<usize>,
    /// `[sessions] max_live` for keel (default: keel's own default).
    #[arg(long)]
    pub max_live: Option<usize>,
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
    /// CPU seconds (user + system) of keel and of this process over the load.
    keel_cpu: Option<f64>,
    load_cpu: Option<f64>,
}

impl Run {
    /// Share of one core over the load, in percent.
    fn cpu_percent(&self, cpu: Option<f64>) -> Option<f64> {
        cpu.filter(|_| self.seconds > 0.0)
            .map(|c| (c * 100.0 / self.seconds).round())
    }
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
            "keel_cpu_percent": self.cpu_percent(self.keel_cpu),
            "load_cpu_percent": self.cpu_percent(self.load_cpu),
        })
    }
}

/// Send `messages` messages, message `n` to chat `n % chats`, from
/// `clients` concurrent keep-alive clients spread over `threads` OS
/// threads; every one must get 200. Returns the seconds it took.
fn load(
    base: &str,
    messages: usize,
    chats: usize,
    clients: usize,
    threads: usize,
    tag: &str,
) -> Result<f64> {
    let url = format!("{base}/v1/messages");
    let started = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let url = url.clone();
            let tag = tag.to_string();
            // Clients t, t + threads, t + 2 × threads, … live on thread t.
            let mine: Vec<usize> = (t..clients).step_by(threads).collect();
            std::thread::spawn(move || -> Result<()> {
                let rt = runtime()?;
                let local = tokio::task::LocalSet::new();
                local.block_on(
                    &rt,
                    clients_on_thread(url, tag, mine, messages, chats, clients),
                )
            })
        })
        .collect();
    for w in workers {
        w.join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
    }
    Ok(started.elapsed().as_secs_f64())
}

async fn clients_on_thread(
    url: String,
    tag: String,
    mine: Vec<usize>,
    messages: usize,
    chats: usize,
    clients: usize,
) -> Result<()> {
    let http = reqwest::Client::new();
    let mut tasks = Vec::new();
    for c in mine {
        let http = http.clone();
        let url = url.clone();
        let tag = tag.clone();
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
    Ok(())
}

fn measure(
    args: &SessionBenchArgs,
    binary: &std::path::Path,
    dir: &std::path::Path,
    chats: usize,
) -> Result<Run> {
    std::fs::create_dir_all(dir)?;
    let extra = match args.max_live {
        Some(n) => format!("\n[sessions]\nmax_live = {n}\n"),
        None => String::new(),
    };
    let mut keel = Keel::start_with(binary, dir, true, &extra)?;
    let base = format!("http://{}", keel.addr);
    let rt = runtime()?;
    rt.block_on(keel.wait_ready_polling(
        &base,
        Duration::from_secs(60),
        Duration::from_millis(20),
    ))?;
    let threads = args
        .client_threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
        .clamp(1, args.clients);
    let pid = keel.pid.to_string();
    let (keel0, self0) = (cpu_seconds(&pid), cpu_seconds("self"));
    let seconds = load(&base, args.chats, chats, args.clients, threads, "s")?;
    let (keel1, self1) = (cpu_seconds(&pid), cpu_seconds("self"));
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
        keel_cpu: keel1.zip(keel0).map(|(b, a)| b - a),
        load_cpu: self1.zip(self0).map(|(b, a)| b - a),
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
        let pct = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.0}%"));
        for (name, r) in [("64 chats", &few), ("distinct chats", &many)] {
            println!(
                "{name:>15}: {} messages to {} chats in {:.2} s = {:.0} msg/s, VmHWM {:.1} MiB, cpu keel {} / load {} (% of one core)",
                r.messages,
                r.chats,
                r.seconds,
                r.rate(),
                r.hwm_kib as f64 / 1024.0,
                pct(r.cpu_percent(r.keel_cpu)),
                pct(r.cpu_percent(r.load_cpu)),
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
