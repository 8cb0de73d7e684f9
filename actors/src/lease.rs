//! The lease keeper (R49, issue 13): one per process. It registers this
//! instance (boot epoch), heartbeats it every `renew` with an expiry of
//! `ttl`, and acquires and renews every named lease its users asked for
//! with holder `<instance>#<epoch>`. Each user holds a `watch` receiver of
//! the lease's current fencing token: `Some(token)` while held, `None`
//! while another holder has it (or the last renewal failed, or could not
//! be confirmed before the lease would expire). A change of that value is
//! how users are told that they gained or lost the lease. On clean
//! shutdown `leave` releases every lease and marks the instance gone.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::Addr;
use tokio::sync::watch;

use crate::clock::Clock;
use crate::error::StoreError;
use crate::persistence::cluster::{
    AcquireLease, Heartbeat, LeaveInstance, RegisterInstance, ReleaseLease,
};
use crate::persistence::PersistenceActor;

/// How often the keeper renews, and how long a renewal lasts.
#[derive(Debug, Clone, Copy)]
pub struct LeaseTimes {
    pub renew: Duration,
    pub ttl: Duration,
}

impl Default for LeaseTimes {
    /// Renewed every 2 s, valid for 6 s: a dead holder's lease is free
    /// within 6 s and taken by the next renewal round (≤ 8 s, under R49's 10 s).
    fn default() -> LeaseTimes {
        LeaseTimes {
            renew: Duration::from_secs(2),
            ttl: Duration::from_secs(6),
        }
    }
}

struct Wanted {
    tx: watch::Sender<Option<i64>>,
    /// Local deadline of the last confirmed renewal (unix ms).
    valid_until: i64,
}

struct State {
    wanted: BTreeMap<String, Wanted>,
    stopped: bool,
}

/// A handle on the keeper; cheap to clone.
#[derive(Clone)]
pub struct LeaseKeeper {
    persistence: Addr<PersistenceActor>,
    clock: Arc<dyn Clock>,
    times: LeaseTimes,
    instance: String,
    epoch: i64,
    state: Arc<Mutex<State>>,
}

fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

impl LeaseKeeper {
    /// Register `instance` (its next boot epoch) and start the renewal loop
    /// on the current actix runtime.
    pub async fn start(
        persistence: Addr<PersistenceActor>,
        clock: Arc<dyn Clock>,
        instance: &str,
        info: &str,
        times: LeaseTimes,
    ) -> Result<LeaseKeeper, StoreError> {
        let epoch = persistence
            .send(RegisterInstance {
                id: instance.to_string(),
                now_ms: clock.now_ms(),
                ttl_ms: ms(times.ttl),
                info: info.to_string(),
            })
            .await
            .unwrap_or(Err(StoreError::Closed))?;
        let keeper = LeaseKeeper {
            persistence,
            clock,
            times,
            instance: instance.to_string(),
            epoch,
            state: Arc::new(Mutex::new(State {
                wanted: BTreeMap::new(),
                stopped: false,
            })),
        };
        let k = keeper.clone();
        actix_rt::spawn(async move {
            let mut every = tokio::time::interval(k.times.renew);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                if k.lock().stopped {
                    return;
                }
                k.round().await;
            }
        });
        Ok(keeper)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    pub fn epoch(&self) -> i64 {
        self.epoch
    }

    /// `<instance>#<epoch>`: a restarted instance never shares its
    /// predecessor's token.
    pub fn holder(&self) -> String {
        format!("{}#{}", self.instance, self.epoch)
    }

    /// Ask for lease `name` (idempotent); answers its token as it changes.
    /// The first attempt is made at once.
    pub async fn want(&self, name: &str) -> watch::Receiver<Option<i64>> {
        let rx = {
            let mut st = self.lock();
            match st.wanted.get(name) {
                Some(w) => return w.tx.subscribe(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    st.wanted
                        .insert(name.to_string(), Wanted { tx, valid_until: 0 });
                    rx
                }
            }
        };
        self.renew(name).await;
        rx
    }

    /// The current token of `name`, if held.
    pub fn token(&self, name: &str) -> Option<i64> {
        self.lock().wanted.get(name).and_then(|w| *w.tx.borrow())
    }

    /// Tell the keeper a write under `name` was refused as stale: the lease
    /// counts as lost until the next renewal says otherwise.
    pub fn lost(&self, name: &str) {
        if let Some(w) = self.lock().wanted.get_mut(name) {
            w.valid_until = 0;
            w.tx.send_if_modified(|t| t.take().is_some());
        }
    }

    /// How long an answer about `name` (or, without a name, about any held
    /// lease) is worth waiting for: until the last confirmed renewal runs
    /// out. `None` when nothing is held (nothing to lose by waiting).
    fn patience(&self, name: Option<&str>) -> Option<Duration> {
        let now = self.clock.now_ms();
        self.lock()
            .wanted
            .iter()
            .filter(|(n, w)| name.is_none_or(|x| x == n.as_str()) && w.tx.borrow().is_some())
            .map(|(_, w)| w.valid_until)
            .min()
            .map(|until| Duration::from_millis(until.saturating_sub(now).max(0) as u64))
    }

    async fn round(&self) {
        let now = self.clock.now_ms();
        let beat = self.persistence.send(Heartbeat {
            id: self.instance.clone(),
            epoch: self.epoch,
            now_ms: now,
            ttl_ms: ms(self.times.ttl),
        });
        // A store that does not answer must not keep this instance
        // believing it holds a lease past its expiry (another instance
        // takes it then): the renewals below give up at that point.
        let alive = match self.patience(None) {
            Some(left) => tokio::time::timeout(left, beat)
                .await
                .unwrap_or_else(|_| Ok(Err(StoreError::Unavailable("no answer".into())))),
            None => beat.await,
        }
        .unwrap_or(Err(StoreError::Closed));
        match alive {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                instance = %self.instance,
                epoch = self.epoch,
                "a newer start of this instance id exists; its leases are not renewed"
            ),
            Err(ref e) => tracing::warn!(error = %e, "instance heartbeat failed"),
        }
        let names: Vec<String> = self.lock().wanted.keys().cloned().collect();
        for name in names {
            if matches!(alive, Ok(false)) {
                self.set(&name, None, 0);
            } else {
                self.renew(&name).await;
            }
        }
    }

    async fn renew(&self, name: &str) {
        let now = self.clock.now_ms();
        let ask = self.persistence.send(AcquireLease {
            name: name.to_string(),
            holder: self.holder(),
            now_ms: now,
            ttl_ms: ms(self.times.ttl),
        });
        let got = match self.patience(Some(name)) {
            // Held: a renewal still unanswered when the lease runs out may
            // never come (a hung store), and another instance may hold
            // it by then. Not held from here on; a late renewal that did
            // commit is picked up by the next round.
            Some(left) => match tokio::time::timeout(left, ask).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!(
                        lease = name,
                        "lease renewal not answered before the lease ran out; not held"
                    );
                    self.set(name, None, 0);
                    return;
                }
            },
            None => ask.await,
        }
        .unwrap_or(Err(StoreError::Closed));
        match got {
            // Counted from the time asked, not answered: the store's expiry
            // is never later than this process believes.
            Ok(Some(token)) => self.set(name, Some(token), now + ms(self.times.ttl)),
            Ok(None) => self.set(name, None, 0),
            Err(e) => {
                tracing::warn!(lease = name, error = %e, "lease renewal failed");
                // Still held until the last confirmed renewal runs out.
                let still = self
                    .lock()
                    .wanted
                    .get(name)
                    .map(|w| w.valid_until > self.clock.now_ms())
                    .unwrap_or(false);
                if !still {
                    self.set(name, None, 0);
                }
            }
        }
    }

    fn set(&self, name: &str, token: Option<i64>, valid_until: i64) {
        let mut st = self.lock();
        let Some(w) = st.wanted.get_mut(name) else {
            return;
        };
        if token.is_some() {
            w.valid_until = valid_until;
        }
        let changed = w.tx.send_if_modified(|t| {
            if *t == token {
                false
            } else {
                *t = token;
                true
            }
        });
        if changed {
            match token {
                Some(t) => {
                    tracing::info!(lease = name, token = t, holder = %self.holder(), "lease gained")
                }
                None => tracing::info!(lease = name, "lease not held"),
            }
        }
    }

    /// Stop renewing and release nothing: what a killed instance leaves
    /// behind (its leases run out at their expiry). For tests of takeover.
    pub fn halt(&self) {
        self.lock().stopped = true;
    }

    /// Clean shutdown: stop renewing, release every held lease, mark this
    /// instance gone (expired now).
    pub async fn leave(&self) {
        let held: Vec<String> = {
            let mut st = self.lock();
            st.stopped = true;
            st.wanted
                .iter()
                .filter(|(_, w)| w.tx.borrow().is_some())
                .map(|(n, _)| n.clone())
                .collect()
        };
        let now = self.clock.now_ms();
        for name in held {
            let _ = self
                .persistence
                .send(ReleaseLease {
                    name: name.clone(),
                    holder: self.holder(),
                    now_ms: now,
                })
                .await;
            self.set(&name, None, 0);
        }
        let _ = self
            .persistence
            .send(LeaveInstance {
                id: self.instance.clone(),
                epoch: self.epoch,
                now_ms: now,
            })
            .await;
    }
}
