//! Signals become one closed enum (vector-style): SIGHUP → reload,
//! SIGTERM/SIGINT → shutdown (a second one → quit now).

use futures::stream::{Stream, StreamExt};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_tokio::Signals;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalTo {
    Reload,
    Shutdown,
}

/// Register handlers now (so a signal during startup is queued, not fatal)
/// and return the stream.
pub fn stream() -> std::io::Result<impl Stream<Item = SignalTo> + Unpin> {
    let signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    Ok(signals.map(|s| {
        if s == SIGHUP {
            SignalTo::Reload
        } else {
            SignalTo::Shutdown
        }
    }))
}
