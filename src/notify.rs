//! systemd's watchdog (`Type=notify`, `WatchdogSec=`): while `WATCHDOG_USEC`
//! is set for this process, every `WATCHDOG_USEC / 2` a progress tick goes
//! through the actors and the store's writer
//! ([`keel_actors::app::watchdog::ProgressTick`]); `WATCHDOG=1` is sent only
//! when it comes back in time, so a wedged keel stops pinging and systemd
//! restarts it. READY=1, RELOADING=1 and STOPPING=1 are sent by `run.rs`.
//!
//! The `sd-notify` crate writes the datagrams (a few lines over a
//! `UnixDatagram` would do too; the crate also handles abstract sockets and
//! `WATCHDOG_PID`, and was already keel's dependency for READY=1).

use std::time::Duration;

use actix::Addr;
use keel_actors::app::lifecycle::Lifecycle;
use keel_actors::app::watchdog::ProgressTick;

/// `WATCHDOG_USEC`, when it is meant for this process: as
/// `sd_watchdog_enabled(3)` reads it — a `WATCHDOG_PID` that is set must be
/// ours, an absent one is accepted (the `sd-notify` crate insists on it).
#[allow(clippy::disallowed_methods)] // the binary edge reads the environment
fn watchdog_usec() -> Option<u64> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.trim().parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then_some(usec)
}

/// Start the watchdog loop, if systemd asked for one.
pub fn start_watchdog(lifecycle: Addr<Lifecycle>) {
    let Some(usec) = watchdog_usec() else {
        return;
    };
    let every = Duration::from_micros(usec / 2).max(Duration::from_millis(10));
    tracing::info!(
        interval_ms = every.as_millis() as u64,
        "systemd watchdog on"
    );
    actix_rt::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut healthy = true;
        loop {
            tick.tick().await;
            let ok = lifecycle
                .send(ProgressTick { deadline: every })
                .await
                .unwrap_or(false);
            if ok {
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
            }
            if ok != healthy {
                healthy = ok;
                if ok {
                    tracing::info!("progress again; watchdog pings resumed");
                } else {
                    tracing::error!(
                        deadline_ms = every.as_millis() as u64,
                        "no progress through the store writer in time; watchdog pings withheld"
                    );
                }
            }
        }
    });
}
