//! `keel run`: lock the data dir, start the actor system, route signals,
//! exit 0 after an orderly shutdown.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use keel_actors::adapter::cli::ServeStdin;
use keel_actors::app::lifecycle::{Reload, Shutdown};
use keel_actors::app::{self, RunOptions};

use crate::cli::RunArgs;
use crate::signals::{self, SignalTo};

/// Take the data dir's exclusive lock (held for the life of the process), so
/// two keels never write one database.
pub fn lock_data_dir(dir: &Path) -> Result<File> {
    std::fs::create_dir_all(dir).with_context(|| {
        format!(
            "cannot create data dir {} (needs write permission on its parent)",
            dir.display()
        )
    })?;
    let path = dir.join("keel.lock");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .with_context(|| {
            format!(
                "cannot open {} (keel needs read and write permission on the data dir)",
                path.display()
            )
        })?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let holder = std::fs::read_to_string(&path).unwrap_or_default();
        bail!(
            "data dir {} is in use by another keel (pid {}); stop it first",
            dir.display(),
            holder.trim()
        );
    }
    file.set_len(0)?;
    write!(file, "{}", std::process::id())?;
    Ok(file)
}

/// Is a daemon holding the lock? Returns its pid.
pub fn running_pid(dir: &Path) -> Option<u32> {
    let path = dir.join("keel.lock");
    let file = File::open(&path).ok()?;
    // SAFETY: as above.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
    if rc == 0 {
        // SAFETY: as above; release the probe lock at once.
        unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
        return None;
    }
    std::fs::read_to_string(&path).ok()?.trim().parse().ok()
}

pub fn run(args: RunArgs) -> Result<ExitCode> {
    // Named kill points of a `--features failpoints` build, armed by `keel
    // torture` (a build without them refuses a non-empty value).
    if let Some(spec) = crate::config::failpoints_spec() {
        keel_actors::failpoint::arm(&spec)?;
    }
    // Storage faults (power-loss images, I/O errors) for `keel torture`:
    // the VFS shim becomes SQLite's default before any store opens.
    let storage_faults = crate::config::torture_storage_spec();
    if let Some(spec) = &storage_faults {
        keel_actors::persistence::faultfs::install(spec)?;
    }
    // Every file keel creates holds state: owner-only (0600 / 0700).
    // SAFETY: umask only changes this process's file-creation mask.
    unsafe { libc::umask(0o077) };
    // A write past RLIMIT_FSIZE must fail with EFBIG (→ degraded, retried),
    // not kill the process with SIGXFSZ.
    // SAFETY: setting a signal's disposition to SIG_IGN is async-signal-safe.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    // The data dir is locked, and a rekey killed halfway finished or undone,
    // before any store opens: loading the config opens secrets.db for its
    // `vault:` values, and after the key switch only the new copies open.
    let early = {
        let base = crate::config::load(&args.dir, None)?;
        if base.ephemeral || args.ephemeral || !crate::vault_cmd::rekey_pending(&base) {
            None
        } else {
            let lock = lock_data_dir(&base.data_dir)?;
            let key = crate::vault::master_key(&base, crate::vault::Create::Never)?;
            crate::vault_cmd::recover_rekey(&base, &key)?;
            Some(lock)
        }
    };
    let config = crate::config::load(&args.dir, Some(&args))?;
    let log_hook = crate::telemetry::init(&config.log_level, config.log_format)?;
    if let Some(spec) = &storage_faults {
        tracing::warn!("storage faults injected: {spec}");
    }
    let _lock = match early {
        Some(lock) => Some(lock),
        None if config.ephemeral => None,
        None => Some(lock_data_dir(&config.data_dir)?),
    };
    let key = crate::vault::master_key(&config, crate::vault::Create::IfFresh)?;
    if crate::vault::is_shared(&config) {
        // Every instance of a shared store must be given the same master
        // key: one whose key does not open the store's key check (written
        // by the first opener) is refused here, before anything starts.
        crate::vault::open_shared_vault(&config, key.clone())?;
    }
    if !config.ephemeral {
        // A rekey killed halfway is finished or undone before any store opens.
        crate::vault_cmd::recover_rekey(&config, &key)?;
    }
    let steps = keel_actors::app::StartSteps::default();
    if config.log_format == keel_actors::config::LogFormat::Text {
        show_slow_start(steps.clone());
    }
    let reload_args = args.clone();
    let system = actix_rt::System::new();
    let result = system.block_on(async move {
        let mut signals = signals::stream().context("cannot install signal handlers")?;
        let drain_deadline = config.shutdown_timeout();
        let running = app::start(
            config,
            RunOptions {
                stdin: args.stdin,
                log_level: Some(log_hook),
                task_env: crate::config::task_env(),
                accept_data_loss: args.accept_data_loss,
                key: Some(key),
                steps: steps.clone(),
            },
        )
        .await;
        steps.finish();
        let running = match running {
            Ok(running) => running,
            Err(e) => {
                // Exit from inside the runtime: actors started before the
                // failure must not be dropped after it is gone. Nothing was
                // acknowledged yet, so there is nothing to flush.
                crate::telemetry::notice(true, &crate::one_line(&anyhow::Error::from(e)));
                #[allow(clippy::disallowed_methods)] // the binary edge ends the process
                std::process::exit(1);
            }
        };
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        crate::notify::start_watchdog(running.lifecycle.clone());
        let lifecycle = running.lifecycle.clone();
        if args.stdin {
            if let Some(cli) = running.cli.clone() {
                let lifecycle = lifecycle.clone();
                actix_rt::spawn(async move {
                    let _ = cli
                        .send(ServeStdin {
                            reply_deadline: Duration::from_secs(60),
                        })
                        .await;
                    lifecycle.do_send(Shutdown {
                        reason: "stdin closed".into(),
                    });
                });
            }
        }
        let mut done = running.done;
        let mut stopping = false;
        loop {
            tokio::select! {
                report = &mut done => {
                    let report = report.context("shutdown did not complete")?;
                    tracing::info!(abandoned = report.abandoned, store_closed = report.store_closed, "keel stopped");
                    return Ok::<_, anyhow::Error>(report.store_closed);
                }
                Some(sig) = signals.next() => match sig {
                    SignalTo::Shutdown if stopping => {
                        // Nothing acknowledged depends on the rest of the
                        // cascade: every ack followed a durable commit.
                        crate::telemetry::notice(false, "second signal, exiting now");
                        #[allow(clippy::disallowed_methods)] // R33: a second signal exits at once
                        std::process::exit(1);
                    }
                    SignalTo::Shutdown => {
                        stopping = true;
                        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
                        tracing::info!(deadline = ?drain_deadline, "signal received");
                        lifecycle.do_send(Shutdown { reason: "signal".into() });
                    }
                    SignalTo::Reload => reload(&reload_args, &lifecycle).await,
                },
            }
        }
    });
    match result {
        Ok(true) => Ok(ExitCode::SUCCESS),
        Ok(false) => Ok(ExitCode::from(1)),
        Err(e) => Err(e),
    }
}

/// A start that takes over a second says, on a terminal, what it is doing:
/// `keel: still recovering: replaying timers (3 s)` once a second until
/// it is ready. Only when stderr is a terminal (never into a log file or
/// the journal) and the logs are text (a JSON log stays one object a line).
fn show_slow_start(steps: keel_actors::app::StartSteps) {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("keel-start-progress".into())
        .spawn(move || {
            let mut seconds = 0u64;
            loop {
                std::thread::sleep(Duration::from_secs(1));
                seconds += 1;
                match steps.current() {
                    Some(step) => eprintln!("keel: still recovering: {step} ({seconds} s)"),
                    None => return,
                }
            }
        });
    // Without the thread the start is only quieter.
    drop(spawned);
}

/// SIGHUP: load and validate through the same path as startup; apply or
/// reject as a whole.
async fn reload(args: &RunArgs, lifecycle: &actix::Addr<keel_actors::app::lifecycle::Lifecycle>) {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Reloading]);
    match crate::config::load(&args.dir, Some(args)) {
        Err(e) => {
            let msg = crate::one_line(&e);
            tracing::error!(error = %msg, "config reload rejected; keeping the running config");
        }
        Ok(config) => match lifecycle.send(Reload(config)).await {
            Ok(report) => {
                // Key names only, never values: some keys hold secrets.
                tracing::info!("config reloaded ({})", report.summary());
                if !report.restart_needed.is_empty() {
                    tracing::warn!(
                        "these settings change only after a restart: {}",
                        report.restart_needed.join(", ")
                    );
                }
            }
            Err(e) => tracing::error!(error = %e, "config reload failed"),
        },
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
}
