//! `keel bench services [--services N]`: start-up with N services whose
//! containers are running (nothing drifted) — time from `keel run` to all
//! adopted and `/readyz` 200 — against the same start with no services
//! (R25; target < 2 s at 1000, and independent of N). The one part of a
//! start that must grow with N is the engine listing the instance's
//! containers (one call); it is timed on its own and shown beside the
//! ready time, so what keel itself adds can be read off. Needs a Docker engine
//! (`--docker-host`, default `DOCKER_HOST` or the standard socket) with the
//! image (`--image`, default the tests' busybox image). Creating 1000
//! containers on a vfs engine is slow and large: run it by hand, not in CI.
//! Figures are printed, never asserted.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use keel_actors::containers::docker::DockerEngine;
use keel_actors::containers::engine::Engine;
use serde_json::{json, Value};

use crate::messages::{progress, runtime, Keel, Scratch};

/// Timed starts with and without services (alternating; medians).
const ROUNDS: usize = 3;

/// Target: ready with every service adopted, milliseconds.
const TARGET_READY_MS: f64 = 2_000.0;

/// Flags of `keel bench services`.
#[derive(Debug, Args)]
pub struct ServiceBenchArgs {
    /// Services in the log, each with its container running.
    #[arg(long, default_value_t = 1000)]
    pub services: usize,
    /// The engine (unix:///path); default `DOCKER_HOST`, then the standard socket.
    #[arg(long, env = "DOCKER_HOST")]
    pub docker_host: Option<String>,
    /// Image of the services (must exist on the engine).
    #[arg(long, default_value = "localhost/keel-test:latest")]
    pub image: String,
    /// Deploys in flight while seeding.
    #[arg(long, default_value_t = 8)]
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

fn section(host: &str, instance: &str) -> String {
    format!(
        "\n[containers]\nenabled = true\ndocker_host = {host:?}\ninstance = {instance:?}\nreconcile_interval_s = 3600\n"
    )
}

/// Start keel on `dir` (its data dir `dir/keel`), replacing its config.
fn start(binary: &Path, dir: &Path, extra: &str) -> Result<Keel> {
    let _ = std::fs::remove_file(dir.join("keel.toml"));
    Keel::start_with(binary, dir, true, extra)
}

/// Milliseconds from start to `/readyz` 200.
async fn timed_start(binary: &Path, dir: &Path, extra: &str) -> Result<(Keel, f64)> {
    let t = Instant::now();
    let mut keel = start(binary, dir, extra)?;
    let base = format!("http://{}", keel.addr);
    keel.wait_ready_polling(&base, Duration::from_secs(600), Duration::from_millis(5))
        .await?;
    Ok((keel, t.elapsed().as_secs_f64() * 1e3))
}

async fn running(http: &reqwest::Client, base: &str) -> Result<usize> {
    let v: Value = http
        .get(format!("{base}/v1/services"))
        .send()
        .await?
        .json()
        .await?;
    Ok(v["services"]
        .as_array()
        .map(|a| a.iter().filter(|s| s["state"] == "running").count())
        .unwrap_or(0))
}

pub fn bench_services(args: ServiceBenchArgs) -> Result<ExitCode> {
    let binary = match &args.keel_binary {
        Some(b) => b.clone(),
        None => std::env::current_exe().context("cannot find the keel executable")?,
    };
    let host = args
        .docker_host
        .clone()
        .filter(|h| h.starts_with("unix://"))
        .unwrap_or_else(|| keel_actors::config::DEFAULT_DOCKER_HOST.to_string());
    let scratch = Scratch::create(args.keep)?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let inst_n = format!("bench{:x}", nanos & 0xffff_ffff);
    let inst_0 = format!("benchz{:x}", nanos & 0xffff_ffff);
    let engine = DockerEngine::new(&host, Duration::from_secs(60));
    let rt = runtime()?;
    let http = reqwest::Client::new();
    let result = rt.block_on(async {
        if !engine.image_exists(&args.image).await? {
            bail!("image {} not found on {host}", args.image);
        }
        let with = scratch.path.join("with");
        let empty = scratch.path.join("empty");
        std::fs::create_dir_all(&with)?;
        std::fs::create_dir_all(&empty)?;

        progress(format!("seeding {} services on {host}", args.services));
        let mut keel = start(&binary, &with, &section(&host, &inst_n))?;
        let base = format!("http://{}", keel.addr);
        keel.wait_ready_polling(&base, Duration::from_secs(120), Duration::from_millis(20))
            .await?;
        let seed_t = Instant::now();
        let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut clients = Vec::new();
        for _ in 0..args.clients.max(1) {
            let (http, base, next, image, n) = (
                http.clone(),
                base.clone(),
                next.clone(),
                args.image.clone(),
                args.services,
            );
            clients.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= n {
                        return Ok::<_, anyhow::Error>(());
                    }
                    let r = http
                        .post(format!("{base}/v1/services"))
                        .json(&json!({"name": format!("svc{i}"), "image": image, "command": ["sleep", "86400"]}))
                        .send()
                        .await?;
                    if !r.status().is_success() {
                        bail!("deploy svc{i}: {} {}", r.status(), r.text().await.unwrap_or_default());
                    }
                    if i % 100 == 99 {
                        progress(format!("{} deployed", i + 1));
                    }
                }
            }));
        }
        for c in clients {
            c.await??;
        }
        let seeded = running(&http, &base).await?;
        let seed_s = seed_t.elapsed().as_secs_f64();
        keel.stop()?;

        // The one engine call of a start that grows with N: listing this
        // instance's containers (the engine's own work). Median of three.
        let mut lists = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            engine.list(&inst_n).await?;
            lists.push(t.elapsed().as_secs_f64() * 1e3);
        }
        lists.sort_by(f64::total_cmp);
        let list_ms = lists[1];

        // The first start of the empty store creates it; the timed ones
        // follow. Starts with and without services alternate, ROUNDS times,
        // so a busy machine weighs on both alike; medians are reported.
        progress("the same start with no services (creating its store)".into());
        let mut k0 = start(&binary, &empty, &section(&host, &inst_0))?;
        let b0 = format!("http://{}", k0.addr);
        k0.wait_ready_polling(&b0, Duration::from_secs(120), Duration::from_millis(20))
            .await?;
        k0.stop()?;
        let (mut with_ms, mut empty_ms) = (Vec::new(), Vec::new());
        let (mut adopted, mut created_again) = (usize::MAX, 0);
        for round in 1..=ROUNDS {
            progress(format!("round {round} of {ROUNDS}: restart with every service running"));
            let (mut keel, ms) = timed_start(&binary, &with, &section(&host, &inst_n)).await?;
            with_ms.push(ms);
            let base = format!("http://{}", keel.addr);
            adopted = adopted.min(running(&http, &base).await?);
            let log = std::fs::read_to_string(&keel.log).unwrap_or_default();
            created_again += log.matches("container created").count();
            keel.stop()?;
            progress(format!("round {round} of {ROUNDS}: the same start with no services"));
            let (mut k0, ms) = timed_start(&binary, &empty, &section(&host, &inst_0)).await?;
            empty_ms.push(ms);
            k0.stop()?;
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let ready_ms = median(&mut with_ms);
        let ready_empty_ms = median(&mut empty_ms);

        progress("removing the benchmark's containers".into());
        for c in engine.list(&inst_n).await? {
            engine.remove(&c.id).await?;
        }
        Ok(json!({
            "services": args.services,
            "seeded_running": seeded,
            "seed_seconds": seed_s,
            "ready_ms": ready_ms,
            "adopted_running": adopted,
            "recreated": created_again,
            "ready_ms_no_services": ready_empty_ms,
            "ratio": ready_ms / ready_empty_ms.max(1e-9),
            "rounds": ROUNDS,
            "ready_ms_runs": with_ms,
            "ready_ms_no_services_runs": empty_ms,
            "engine_list_ms": list_ms,
            "ready_ms_without_list": ready_ms - list_ms,
            "ratio_without_list": (ready_ms - list_ms) / ready_empty_ms.max(1e-9),
            "target_ready_ms": TARGET_READY_MS,
        }))
    });
    let figures = match result {
        Ok(f) => f,
        Err(e) => {
            // Leave nothing behind on the engine.
            rt.block_on(async {
                for c in engine.list(&inst_n).await.unwrap_or_default() {
                    let _ = engine.remove(&c.id).await;
                }
            });
            return Err(e);
        }
    };
    if args.json {
        println!("{figures}");
    } else {
        println!("services                 {}", figures["services"]);
        println!(
            "ready, all adopted       {:.0} ms (target < {TARGET_READY_MS:.0} ms); running {} of {}, recreated {}",
            figures["ready_ms"].as_f64().unwrap_or(0.0),
            figures["adopted_running"],
            figures["services"],
            figures["recreated"]
        );
        println!(
            "ready, no services       {:.0} ms (ratio {:.2})",
            figures["ready_ms_no_services"].as_f64().unwrap_or(0.0),
            figures["ratio"].as_f64().unwrap_or(0.0)
        );
        println!(
            "engine's list of them    {:.0} ms (one call; without it ready is {:.0} ms, ratio {:.2})",
            figures["engine_list_ms"].as_f64().unwrap_or(0.0),
            figures["ready_ms_without_list"].as_f64().unwrap_or(0.0),
            figures["ratio_without_list"].as_f64().unwrap_or(0.0)
        );
        println!(
            "seeding                  {:.1} s for {} containers",
            figures["seed_seconds"].as_f64().unwrap_or(0.0),
            figures["seeded_running"]
        );
    }
    if args.keep {
        println!("scratch kept: {}", scratch.path.display());
    }
    Ok(ExitCode::SUCCESS)
}
