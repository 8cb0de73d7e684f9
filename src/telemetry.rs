//! Logging: `tracing` to stderr, with a reload handle so SIGHUP can change
//! the level. `RUST_LOG`, when set, wins over `log_level` at start.

use anyhow::Result;
use keel_actors::app::lifecycle::LogLevelHook;
use std::sync::Arc;
use tracing_subscriber::{fmt, prelude::*, reload, EnvFilter};

#[allow(clippy::disallowed_methods)] // RUST_LOG: the binary edge reads the environment
pub fn init(level: &str) -> Result<LogLevelHook> {
    let initial = std::env::var("RUST_LOG").unwrap_or_else(|_| level.to_string());
    let filter = EnvFilter::try_new(&initial).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false)
                // SAFETY: isatty only inspects a file descriptor.
                .with_ansi(unsafe { libc::isatty(2) == 1 }),
        )
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot set up logging: {e}"))?;
    Ok(Arc::new(move |level: &str| {
        let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        handle.reload(filter).map_err(|e| e.to_string())
    }))
}
