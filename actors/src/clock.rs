//! The one source of wall-clock time. Every wall-clock read in keel goes
//! through a [`Clock`] handed in at construction (`WallClock` in production,
//! `ManualClock` in tests that jump time, C7); `clippy.toml` forbids
//! `Utc::now` / `SystemTime::now` everywhere but [`WallClock`]. Monotonic
//! waits use `tokio::time`, which tests can pause.

use std::sync::atomic::{AtomicI64, Ordering};

/// Wall-clock time in unix milliseconds, injectable for tests.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> i64;

    /// The current instant as a [`Stamp`].
    fn stamp(&self) -> Stamp {
        Stamp::from_ms(self.now_ms())
    }
}

/// The system clock: the only place keel reads it.
pub struct WallClock;

impl Clock for WallClock {
    #[allow(clippy::disallowed_methods)] // the one allowed read of the system clock
    fn now_ms(&self) -> i64 {
        chrono::Utc::now().timestamp_millis()
    }
}

/// A clock that moves only when told (tests: clock jumps, C7).
#[derive(Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn new(now_ms: i64) -> ManualClock {
        ManualClock(AtomicI64::new(now_ms))
    }
    pub fn set(&self, now_ms: i64) {
        self.0.store(now_ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// One instant in both forms the store writes: unix milliseconds (timer
/// columns) and RFC 3339 UTC text with milliseconds (sortable `*_at`
/// columns). The writer takes one per group commit, so every row of a
/// batch carries the same time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    pub ms: i64,
    pub text: String,
}

impl Stamp {
    pub fn from_ms(ms: i64) -> Stamp {
        let text = chrono::DateTime::from_timestamp_millis(ms)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        Stamp { ms, text }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_rfc3339_utc_with_millis() {
        let s = Stamp::from_ms(1_764_590_400_123);
        assert_eq!(s.text, "2025-12-01T12:00:00.123Z");
        let c = ManualClock::new(5);
        c.set(1_000);
        assert_eq!(c.stamp(), Stamp::from_ms(1_000));
    }
}
