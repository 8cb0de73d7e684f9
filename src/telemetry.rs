//! Logging: `tracing` to stderr, with a reload handle so SIGHUP can change
//! the level. `RUST_LOG`, when set, wins over `log_level` at start.
//! `log_format = "json"` (or `KEEL_LOG_FORMAT=json`) writes one JSON object
//! per line: `timestamp`, `level`, `target`, `message` and the event's
//! fields beside it. Both formats carry the same fields, and no field ever
//! holds a secret (tokens are logged by id, errors pass through
//! `redact::mask_secret_words` where they may quote a request).

use anyhow::Result;
use keel_actors::app::lifecycle::LogLevelHook;
use keel_actors::config::LogFormat;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tracing_subscriber::{fmt, prelude::*, reload, EnvFilter};

/// JSON logs are on: the process edge's own stderr lines go through
/// `tracing` too, so every line stays one JSON object.
static JSON: AtomicBool = AtomicBool::new(false);

/// A line for the operator from the process edge: `keel: <text>` on stderr,
/// or a log event at `error` (else `warn`) level while JSON logs are on.
pub fn notice(error: bool, text: &str) {
    match (JSON.load(Ordering::Relaxed), error) {
        (false, true) => eprintln!("keel: error: {text}"),
        (false, false) => eprintln!("keel: {text}"),
        (true, true) => tracing::error!("{text}"),
        (true, false) => tracing::warn!("{text}"),
    }
}

#[allow(clippy::disallowed_methods)] // RUST_LOG: the binary edge reads the environment
pub fn init(level: &str, format: LogFormat) -> Result<LogLevelHook> {
    let initial = std::env::var("RUST_LOG").unwrap_or_else(|_| level.to_string());
    let filter = EnvFilter::try_new(&initial).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match format {
        LogFormat::Text => registry
            .with(
                fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_target(false)
                    // SAFETY: isatty only inspects a file descriptor.
                    .with_ansi(unsafe { libc::isatty(2) == 1 }),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false)
                    .with_writer(std::io::stderr)
                    .with_target(true)
                    .with_ansi(false),
            )
            .try_init(),
    };
    installed.map_err(|e| anyhow::anyhow!("cannot set up logging: {e}"))?;
    JSON.store(format == LogFormat::Json, Ordering::Relaxed);
    Ok(Arc::new(move |level: &str| {
        let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        handle.reload(filter).map_err(|e| e.to_string())
    }))
}
