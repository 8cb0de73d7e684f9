//! Readiness as seen from outside (`/readyz`), and the intake gate that
//! shutdown closes and drains.
//!
//! These are the two pieces of state shared across threads instead of passed
//! as messages: HTTP workers must answer `/readyz` even when every actor is
//! busy, and the gate must be checked on the hot path without a round trip.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

/// Lifecycle phase of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Starting,
    Ready,
    ShuttingDown,
}

#[derive(Debug)]
struct State {
    phase: Phase,
    /// Why storage is failing, while it is.
    storage_degraded: Option<String>,
    /// Damage found after start (background quick_check); never clears.
    corrupt: Option<String>,
    /// What the background quick_check of a large store is doing, when
    /// there is one ("running", "interrupted", "failed: …").
    integrity_check: Option<String>,
    /// R39: acknowledged commits are missing and the operator did not
    /// accept it: not ready, and the writer commits nothing.
    data_loss: Option<String>,
    /// The container engine's state while `[containers]` is enabled: `None`
    /// = ok, `Some(why)` = degraded. Never makes keel unready (R27).
    containers: Option<Option<String>>,
    /// The last WAL checkpoint keel ran since start (console).
    checkpoint: Option<Checkpoint>,
}

/// One completed WAL checkpoint (`PRAGMA wal_checkpoint`), for the console.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Checkpoint {
    /// Wall-clock time it returned.
    pub at_ms: i64,
    /// `background` (the checkpoint thread, PASSIVE) or `inline` (the
    /// writer's WAL hook past the hard bound).
    pub mode: &'static str,
    /// Frames in the WAL, and how many of them were copied back.
    pub wal_frames: i64,
    pub checkpointed_frames: i64,
}

/// Shared readiness. Cheap to clone.
#[derive(Clone)]
pub struct Health {
    state: Arc<Mutex<State>>,
    metrics: crate::metrics::Metrics,
    /// What gives way when the WAL outgrows its bound: the background
    /// `quick_check`, whose read transaction would keep the WAL from ever
    /// being restarted (see [`Health::on_wal_pressure`]).
    wal_pressure: Arc<Mutex<Option<GiveWay>>>,
}

/// What runs once when the WAL outgrows its bound.
pub type GiveWay = Box<dyn FnOnce() + Send>;

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("state", &self.state)
            .finish()
    }
}

/// What `/readyz` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub ready: bool,
    pub status: &'static str,
    pub reason: String,
}

impl Health {
    pub fn new(metrics: crate::metrics::Metrics) -> Health {
        Health {
            state: Arc::new(Mutex::new(State {
                phase: Phase::Starting,
                storage_degraded: None,
                corrupt: None,
                integrity_check: None,
                data_loss: None,
                containers: None,
                checkpoint: None,
            })),
            metrics,
            wal_pressure: Arc::new(Mutex::new(None)),
        }
    }

    /// Run `give_way` (once) when the WAL outgrows its bound.
    pub fn on_wal_pressure(&self, give_way: GiveWay) {
        *self.wal_pressure.lock().unwrap_or_else(|p| p.into_inner()) = Some(give_way);
    }

    /// The WAL outgrew its bound (the writer's WAL hook says so): whatever
    /// registered with [`Health::on_wal_pressure`] gives way.
    pub fn wal_pressure(&self) {
        let give_way = self
            .wal_pressure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(f) = give_way {
            f();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the state half-written
        // (every update is a single assignment), so poisoning is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_phase(&self, phase: Phase) {
        self.lock().phase = phase;
        self.metrics.ready.set(i64::from(self.readiness().ready));
    }

    pub fn phase(&self) -> Phase {
        self.lock().phase
    }

    /// Called by the persistence writer when a commit fails.
    pub fn storage_failed(&self, reason: &str) {
        self.lock().storage_degraded = Some(reason.to_string());
        self.metrics.storage_degraded.set(1);
        self.metrics.ready.set(0);
    }

    /// The database file is damaged (found after start): `/readyz` reports
    /// `degraded` until keel is stopped and the file repaired.
    pub fn storage_corrupt(&self, reason: &str) {
        self.lock().corrupt = Some(reason.to_string());
        self.metrics.storage_degraded.set(1);
        self.metrics.ready.set(0);
    }

    /// R39: the store is missing acknowledged commits. Sticky: `/readyz`
    /// answers 503 with `reason`, and the writer refuses every write.
    pub fn data_loss(&self, reason: &str) {
        let mut s = self.lock();
        s.data_loss = Some(reason.to_string());
        drop(s);
        self.metrics.storage_degraded.set(1);
        self.metrics.ready.set(0);
    }

    /// The damage the background integrity check found, if any.
    pub fn integrity(&self) -> Option<String> {
        self.lock().corrupt.clone()
    }

    /// The background quick_check's progress (`None` once it passed, or
    /// when the store was small enough to be checked before start).
    pub fn integrity_check(&self, state: Option<&str>) {
        self.lock().integrity_check = state.map(str::to_string);
    }

    /// What [`Health::integrity_check`] last said.
    pub fn integrity_checking(&self) -> Option<String> {
        self.lock().integrity_check.clone()
    }

    /// Why writes are refused (R39), if they are.
    pub fn refusing_writes(&self) -> Option<String> {
        self.lock().data_loss.clone()
    }

    /// Called by the persistence writer after a commit succeeds.
    /// Returns true when this ends a degraded period.
    pub fn storage_ok(&self) -> bool {
        let mut s = self.lock();
        let was = s.storage_degraded.take().is_some();
        let ready = s.phase == Phase::Ready && s.corrupt.is_none() && s.data_loss.is_none();
        drop(s);
        if was && ready {
            self.metrics.storage_degraded.set(0);
            self.metrics.ready.set(i64::from(ready));
        }
        was
    }

    /// Set by the container reaper: `None` = engine ok, `Some(why)` =
    /// degraded (engine unreachable, event log damaged). `/readyz` stays
    /// 200 and shows it in its body.
    pub fn set_containers(&self, degraded: Option<String>) {
        self.lock().containers = Some(degraded);
    }

    /// `(status, reason)` of the containers part, when it is enabled.
    pub fn containers(&self) -> Option<(&'static str, String)> {
        match &self.lock().containers {
            None => None,
            Some(None) => Some(("ok", String::new())),
            Some(Some(why)) => Some(("degraded", why.clone())),
        }
    }

    /// Called by the store's checkpointer when a checkpoint returns.
    pub fn checkpointed(&self, done: Checkpoint) {
        self.lock().checkpoint = Some(done);
    }

    /// The last checkpoint since start, if any ran.
    pub fn last_checkpoint(&self) -> Option<Checkpoint> {
        self.lock().checkpoint
    }

    pub fn readiness(&self) -> Readiness {
        let s = self.lock();
        if let (Some(reason), false) = (&s.data_loss, s.phase == Phase::ShuttingDown) {
            return Readiness {
                ready: false,
                status: "data_loss_detected",
                reason: reason.clone(),
            };
        }
        if let (Some(reason), false) = (&s.corrupt, s.phase == Phase::ShuttingDown) {
            return Readiness {
                ready: false,
                status: "degraded",
                reason: format!("database corrupt: {reason}"),
            };
        }
        match (s.phase, &s.storage_degraded) {
            (Phase::ShuttingDown, _) => Readiness {
                ready: false,
                status: "shutting_down",
                reason: "keel is shutting down".into(),
            },
            (_, Some(reason)) => Readiness {
                ready: false,
                status: "degraded",
                reason: format!("storage failing: {reason}"),
            },
            (Phase::Starting, None) => Readiness {
                ready: false,
                status: "starting",
                reason: "recovery in progress".into(),
            },
            (Phase::Ready, None) => Readiness {
                ready: true,
                status: "ready",
                reason: String::new(),
            },
        }
    }
}

/// The intake gate: adapters `enter()` before handing a message in and hold
/// the guard until it is acknowledged; shutdown closes the gate and waits
/// until every guard is dropped (mini-redis style: completion is observed,
/// never guessed with a sleep).
#[derive(Debug, Clone, Default)]
pub struct Gate {
    inner: Arc<GateInner>,
}

#[derive(Debug, Default)]
struct GateInner {
    closed: AtomicBool,
    in_flight: AtomicUsize,
    idle: Notify,
}

/// Proof that one inbound message is in flight.
#[derive(Debug)]
pub struct GateGuard {
    inner: Arc<GateInner>,
}

impl Gate {
    /// A gate that admits nothing until `open()` (intake opens only after
    /// recovery, R32).
    pub fn closed() -> Gate {
        let gate = Gate::default();
        gate.inner.closed.store(true, Ordering::SeqCst);
        gate
    }

    /// Start admitting messages.
    pub fn open(&self) {
        self.inner.closed.store(false, Ordering::SeqCst);
    }

    /// `None` while the gate is closed: the adapter must refuse the message
    /// (503, or leave it unconfirmed upstream) so it is redelivered later.
    pub fn enter(&self) -> Option<GateGuard> {
        self.inner.in_flight.fetch_add(1, Ordering::SeqCst);
        let guard = GateGuard {
            inner: self.inner.clone(),
        };
        // Checked after counting so a concurrent `close_and_drain` either
        // sees this message in flight or this check sees the gate closed.
        (!self.inner.closed.load(Ordering::SeqCst)).then_some(guard)
    }

    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::SeqCst)
    }

    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::SeqCst)
    }

    /// Close the gate and wait until nothing is in flight, or `deadline`
    /// passes. Returns how many were still in flight (0 = fully drained).
    pub async fn close_and_drain(&self, deadline: Duration) -> usize {
        self.inner.closed.store(true, Ordering::SeqCst);
        let drained = async {
            loop {
                let idle = self.inner.idle.notified();
                if self.in_flight() == 0 {
                    return;
                }
                idle.await;
            }
        };
        let _ = tokio::time::timeout(deadline, drained).await;
        self.in_flight()
    }
}

impl Drop for GateGuard {
    fn drop(&mut self) {
        if self.inner.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.inner.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn drain_returns_as_soon_as_the_last_guard_drops() {
        let gate = Gate::default();
        let guard = gate.enter().unwrap();
        let g2 = gate.clone();
        let start = tokio::time::Instant::now();
        let drain = tokio::spawn(async move { g2.close_and_drain(Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(gate.enter().is_none(), "closed gate admits nothing");
        drop(guard);
        assert_eq!(drain.await.unwrap(), 0);
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn drain_gives_up_at_the_deadline() {
        let gate = Gate::default();
        let _stuck = gate.enter().unwrap();
        let left = gate.close_and_drain(Duration::from_secs(5)).await;
        assert_eq!(left, 1);
    }

    #[test]
    fn data_loss_is_sticky_and_refuses_writes() {
        let h = Health::new(crate::metrics::Metrics::new());
        assert_eq!(h.refusing_writes(), None);
        h.set_phase(Phase::Ready);
        h.data_loss("data_loss_detected: 3 missing");
        h.storage_ok();
        let r = h.readiness();
        assert_eq!((r.ready, r.status), (false, "data_loss_detected"));
        assert!(r.reason.contains("3 missing"));
        assert!(h.refusing_writes().is_some());
    }

    #[test]
    fn readiness_reports_degraded_then_recovers() {
        let h = Health::new(crate::metrics::Metrics::new());
        assert_eq!(h.readiness().status, "starting");
        h.set_phase(Phase::Ready);
        assert!(h.readiness().ready);
        h.storage_failed("disk full");
        let r = h.readiness();
        assert_eq!((r.ready, r.status), (false, "degraded"));
        assert!(r.reason.contains("disk full"));
        assert!(h.storage_ok());
        assert!(h.readiness().ready);
        h.storage_corrupt("keel.db: page 7");
        h.storage_failed("disk full");
        h.storage_ok();
        let r = h.readiness();
        assert_eq!(
            (r.ready, r.status),
            (false, "degraded"),
            "corruption is sticky"
        );
        assert!(r.reason.contains("page 7"));
        h.set_phase(Phase::ShuttingDown);
        assert_eq!(h.readiness().status, "shutting_down");
    }
}
