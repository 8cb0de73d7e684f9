//! The adapter supervisor (R15–R17). Named `AdapterSupervisor`: actix's own
//! `Supervisor` restarts at once, without backoff, and never after a panic.
//!
//! Each supervised adapter runs in its own task under [`supervise`]: the
//! adapter's `run` future is polled inside `catch_unwind`, so an error and a
//! panic both come back as an [`AdapterError`]. A transient failure is
//! retried after [`backoff_delay`] (5, 10, 20, 40, 60 s by default, jitter
//! from a seeded RNG), a 429 after exactly the time the server asked for;
//! a run that stayed up for `healthy_after_ms` resets the count. A revoked
//! token (401) or another poller (409) stops the adapter at once, and so does
//! the last failed attempt; either way the owner is told through a healthy
//! adapter (the [`SupervisionReport`] decides which). Adapters start in
//! priority order and independently: one failing never blocks the others.
//!
//! All waiting goes through `tokio::time`, so tests pause the clock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::actor::{AdapterActor, StopAdapter};
pub use super::Adapter;
use crate::backoff::backoff_delay;
use crate::config::SupervisionConfig;
use crate::error::AdapterError;

/// What `keel status` and `/metrics` show for one adapter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdapterStatus {
    /// `running`, `backoff`, `stopped` (401/409 or shutdown) or `gave_up`.
    pub state: String,
    /// Failed attempts since the last healthy period.
    pub attempts: u32,
    pub last_error: Option<String>,
    /// While backing off: how long until the next attempt, from when the
    /// status was recorded (the console shows "backing off until …").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_in_ms: Option<u64>,
}

impl AdapterStatus {
    fn new(state: &str, attempts: u32, last_error: Option<String>) -> AdapterStatus {
        AdapterStatus {
            state: state.to_string(),
            attempts,
            last_error,
            retry_in_ms: None,
        }
    }
}

/// Where the supervisor reports to (the store and metrics in keel; a channel
/// in tests). Called from the supervision tasks; must not block.
pub trait SupervisionReport: Send + Sync + 'static {
    /// An adapter changed state.
    fn status(&self, adapter: &str, status: &AdapterStatus);
    /// An adapter stopped for good; tell the owner (R17). `statuses` holds
    /// every adapter's current state, to pick a healthy one.
    fn gave_up(&self, adapter: &str, reason: &str, statuses: &HashMap<String, AdapterStatus>);
}

/// Every adapter's last reported status, shared with the supervisor actor.
pub type Statuses = Arc<Mutex<HashMap<String, AdapterStatus>>>;

/// Supervise one adapter until it is stopped or gives up.
pub async fn supervise(
    adapter: Arc<dyn Adapter>,
    policy: watch::Receiver<SupervisionConfig>,
    report: Arc<dyn SupervisionReport>,
    statuses: Statuses,
    mut stop: watch::Receiver<bool>,
    mut rng: StdRng,
) {
    let name = adapter.name();
    let set = |status: AdapterStatus| {
        report.status(name, &status);
        statuses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), status);
    };
    let mut attempts: u32 = 0;
    let mut last_error: Option<String> = None;
    loop {
        if *stop.borrow() {
            break;
        }
        set(AdapterStatus::new("running", attempts, last_error.clone()));
        tracing::info!(adapter = name, attempts, "adapter started");
        let started = tokio::time::Instant::now();
        // Each run is its own AdapterActor; its exit (or its death) comes
        // back on the oneshot.
        let (actor, exit) = AdapterActor::launch(adapter.clone());
        tokio::pin!(exit);
        let outcome = tokio::select! {
            r = &mut exit => r,
            _ = stop.wait_for(|s| *s) => {
                actor.do_send(StopAdapter);
                (&mut exit).await
            }
        };
        if *stop.borrow() {
            break;
        }
        // The policy in force now: a reload applies from the next restart.
        let cfg = policy.borrow().clone();
        let error = match outcome {
            Ok(Ok(())) => AdapterError::Exited,
            Ok(Err(e)) => e,
            Err(_) => AdapterError::Panicked("the adapter actor died without a result".into()),
        };
        if started.elapsed() >= Duration::from_millis(cfg.healthy_after_ms) {
            attempts = 0;
        }
        let reason = error.to_string();
        last_error = Some(reason.clone());
        if !error.is_transient() {
            tracing::error!(adapter = name, error = %reason, "adapter stopped; it will not be restarted");
            set(AdapterStatus::new("stopped", attempts, last_error.clone()));
            let all = statuses.lock().unwrap_or_else(|p| p.into_inner()).clone();
            report.gave_up(name, &reason, &all);
            return;
        }
        let delay = match error {
            // The server's own word; a rate limit is not a failed attempt.
            AdapterError::RetryAfter(wait) => wait,
            // Storage trouble is not the channel's fault and heals on its own
            // (R35): retry at the first backoff step without counting, so a
            // long disk-full spell never makes an adapter give up.
            AdapterError::Store(_) => backoff_delay(&cfg, 1, rng.gen::<f64>()),
            _ => {
                attempts += 1;
                if attempts > cfg.attempts {
                    tracing::error!(adapter = name, attempts = attempts - 1, error = %reason, "adapter gave up");
                    set(AdapterStatus::new(
                        "gave_up",
                        attempts - 1,
                        last_error.clone(),
                    ));
                    let all = statuses.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    report.gave_up(name, &reason, &all);
                    return;
                }
                backoff_delay(&cfg, attempts, rng.gen::<f64>())
            }
        };
        tracing::warn!(adapter = name, attempts, error = %reason, delay_ms = delay.as_millis() as u64, "adapter failed; restarting after backoff");
        set(AdapterStatus {
            retry_in_ms: Some(delay.as_millis() as u64),
            ..AdapterStatus::new("backoff", attempts, last_error.clone())
        });
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.changed() => break,
        }
    }
    set(AdapterStatus::new("stopped", attempts, last_error));
}

/// Owns the supervision tasks of every supervised adapter.
pub struct AdapterSupervisor {
    stop: watch::Sender<bool>,
    /// The restart policy every supervision task reads before each restart.
    policy: watch::Sender<SupervisionConfig>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    pub statuses: Statuses,
}

impl AdapterSupervisor {
    /// Start `adapters` in priority order (R15), each in its own task.
    pub fn start_all(
        mut adapters: Vec<Arc<dyn Adapter>>,
        cfg: SupervisionConfig,
        report: Arc<dyn SupervisionReport>,
        statuses: Statuses,
    ) -> AdapterSupervisor {
        adapters.sort_by_key(|a| super::priority(a.name()));
        let (stop, rx) = watch::channel(false);
        let (policy, policy_rx) = watch::channel(cfg.clone());
        let mut seeder = match cfg.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_entropy(),
        };
        let tasks = adapters
            .into_iter()
            .map(|a| {
                let rng = StdRng::seed_from_u64(seeder.gen());
                // On the actix arbiter: each run starts an AdapterActor.
                actix_rt::spawn(supervise(
                    a,
                    policy_rx.clone(),
                    report.clone(),
                    statuses.clone(),
                    rx.clone(),
                    rng,
                ))
            })
            .collect();
        AdapterSupervisor {
            stop,
            policy,
            tasks,
            statuses,
        }
    }
}

impl Actor for AdapterSupervisor {
    type Context = Context<Self>;
}

/// Stop every supervised adapter (an in-flight long poll is abandoned, the
/// offset not advanced) and resolve when their tasks ended or `deadline`
/// passed. Sent first by the lifecycle controller on shutdown (R33).
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct StopAdapters {
    pub deadline: Duration,
}

impl Handler<StopAdapters> for AdapterSupervisor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, msg: StopAdapters, _: &mut Context<Self>) -> Self::Result {
        let _ = self.stop.send(true);
        let tasks = std::mem::take(&mut self.tasks);
        Box::pin(async move {
            let all = futures::future::join_all(tasks);
            if tokio::time::timeout(msg.deadline, all).await.is_err() {
                tracing::warn!("adapters did not stop within the deadline");
            }
        })
    }
}

/// Replace the restart policy (reload); each adapter uses it from its next
/// restart on. Sent by the lifecycle controller.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct SetSupervision(pub SupervisionConfig);

impl Handler<SetSupervision> for AdapterSupervisor {
    type Result = ();
    fn handle(&mut self, msg: SetSupervision, _: &mut Context<Self>) {
        let _ = self.policy.send(msg.0);
    }
}

/// Every adapter's current status. Sent by the HTTP admin endpoints.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "HashMap<String, AdapterStatus>")]
pub struct GetAdapterStatus;

impl Handler<GetAdapterStatus> for AdapterSupervisor {
    type Result = MessageResult<GetAdapterStatus>;
    fn handle(&mut self, _: GetAdapterStatus, _: &mut Context<Self>) -> Self::Result {
        MessageResult(
            self.statuses
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::future::BoxFuture;
    use std::collections::VecDeque;
    use tokio::sync::mpsc;

    /// One scripted run of the fake adapter.
    enum Step {
        Fail(AdapterError),
        Panic,
        /// Stay up for this long, then fail transiently.
        UpFor(Duration),
    }

    struct Scripted {
        name: &'static str,
        steps: Mutex<VecDeque<Step>>,
        starts: mpsc::UnboundedSender<tokio::time::Instant>,
    }

    impl Adapter for Scripted {
        fn name(&self) -> &'static str {
            self.name
        }
        fn run(
            &self,
            mut stop: watch::Receiver<bool>,
        ) -> BoxFuture<'static, Result<(), AdapterError>> {
            let _ = self.starts.send(tokio::time::Instant::now());
            let step = self.steps.lock().unwrap().pop_front();
            Box::pin(async move {
                match step {
                    Some(Step::Fail(e)) => Err(e),
                    Some(Step::Panic) => panic!("scripted panic"),
                    Some(Step::UpFor(d)) => {
                        tokio::time::sleep(d).await;
                        Err(AdapterError::Transient("dropped after a while".into()))
                    }
                    // Script over: run until stopped.
                    None => {
                        let _ = stop.wait_for(|s| *s).await;
                        Ok(())
                    }
                }
            })
        }
    }

    #[derive(Debug, PartialEq)]
    enum Event {
        Status(String, u32),
        GaveUp(String),
    }

    struct Recorder(mpsc::UnboundedSender<Event>);

    impl SupervisionReport for Recorder {
        fn status(&self, _: &str, s: &AdapterStatus) {
            let _ = self.0.send(Event::Status(s.state.clone(), s.attempts));
        }
        fn gave_up(&self, _: &str, reason: &str, _: &HashMap<String, AdapterStatus>) {
            let _ = self.0.send(Event::GaveUp(reason.to_string()));
        }
    }

    struct Harness {
        starts: mpsc::UnboundedReceiver<tokio::time::Instant>,
        events: mpsc::UnboundedReceiver<Event>,
        stop: watch::Sender<bool>,
        policy: watch::Sender<SupervisionConfig>,
        task: tokio::task::JoinHandle<()>,
    }

    fn run(steps: Vec<Step>, cfg: SupervisionConfig) -> Harness {
        let (stx, starts) = mpsc::unbounded_channel();
        let (etx, events) = mpsc::unbounded_channel();
        let (stop, rx) = watch::channel(false);
        let (policy, policy_rx) = watch::channel(cfg);
        let adapter = Arc::new(Scripted {
            name: "telegram",
            steps: Mutex::new(steps.into()),
            starts: stx,
        });
        let task = actix_rt::spawn(supervise(
            adapter,
            policy_rx,
            Arc::new(Recorder(etx)),
            Statuses::default(),
            rx,
            StdRng::seed_from_u64(7),
        ));
        Harness {
            starts,
            events,
            stop,
            policy,
            task,
        }
    }

    fn no_jitter() -> SupervisionConfig {
        SupervisionConfig {
            jitter: 0.0,
            ..SupervisionConfig::default()
        }
    }

    fn transient() -> Step {
        Step::Fail(AdapterError::Transient("HTTP 502".into()))
    }

    /// Gaps between consecutive starts, in whole seconds.
    async fn gaps(h: &mut Harness, starts: usize) -> Vec<u64> {
        let mut at = Vec::new();
        for _ in 0..starts {
            at.push(h.starts.recv().await.expect("a start"));
        }
        at.windows(2).map(|w| (w[1] - w[0]).as_secs()).collect()
    }

    #[actix_rt::test]
    async fn failures_and_panics_restart_on_the_backoff_schedule_then_give_up() {
        tokio::time::pause();
        let steps = vec![
            transient(),
            Step::Panic,
            transient(),
            transient(),
            transient(),
            transient(),
        ];
        let mut h = run(steps, no_jitter());
        assert_eq!(gaps(&mut h, 6).await, vec![5, 10, 20, 40, 60]);
        h.task.await.unwrap();
        let mut events = Vec::new();
        while let Ok(e) = h.events.try_recv() {
            events.push(e);
        }
        assert_eq!(events.last(), Some(&Event::GaveUp("HTTP 502".into())));
        assert!(events.contains(&Event::Status("gave_up".into(), 5)));
        assert!(h.starts.try_recv().is_err(), "no start after giving up");
    }

    #[actix_rt::test]
    async fn a_new_policy_applies_from_the_next_restart() {
        tokio::time::pause();
        let mut h = run((0..5).map(|_| transient()).collect(), no_jitter());
        assert_eq!(gaps(&mut h, 2).await, vec![5]);
        // Reload: a 1 s initial backoff. The second failure was handled
        // under the old policy already (10 s); attempts 3 and 4 use the new
        // one: 1 s × 4 and 1 s × 8.
        let _ = h.policy.send(SupervisionConfig {
            backoff_initial_ms: 1_000,
            ..no_jitter()
        });
        assert_eq!(gaps(&mut h, 3).await, vec![4, 8]);
        let _ = h.stop.send(true);
        h.task.await.unwrap();
    }

    #[actix_rt::test]
    async fn jitter_is_seeded_and_only_shortens() {
        tokio::time::pause();
        let cfg = SupervisionConfig {
            jitter: 0.5,
            seed: Some(1),
            ..SupervisionConfig::default()
        };
        let mut a = run(vec![transient(), transient(), transient()], cfg.clone());
        let mut b = run(vec![transient(), transient(), transient()], cfg);
        let mut ta = Vec::new();
        let mut tb = Vec::new();
        for _ in 0..4 {
            ta.push(a.starts.recv().await.unwrap());
            tb.push(b.starts.recv().await.unwrap());
        }
        let da: Vec<Duration> = ta.windows(2).map(|w| w[1] - w[0]).collect();
        let db: Vec<Duration> = tb.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(da, db, "same seed, same schedule");
        for (d, full) in da.iter().zip([5u64, 10, 20]) {
            assert!(*d <= Duration::from_secs(full) && *d >= Duration::from_millis(full * 500));
        }
    }

    #[actix_rt::test]
    async fn retry_after_is_honoured_and_not_counted_as_an_attempt() {
        tokio::time::pause();
        let steps = vec![
            Step::Fail(AdapterError::RetryAfter(Duration::from_secs(17))),
            transient(),
        ];
        let mut h = run(steps, no_jitter());
        assert_eq!(gaps(&mut h, 3).await, vec![17, 5]);
        let _ = h.stop.send(true);
        h.task.await.unwrap();
    }

    #[actix_rt::test]
    async fn store_failures_are_retried_without_counting_towards_giving_up() {
        tokio::time::pause();
        let store = || {
            Step::Fail(AdapterError::Store(crate::error::StoreError::Unavailable(
                "disk full".into(),
            )))
        };
        let steps = vec![
            store(),
            store(),
            store(),
            store(),
            store(),
            store(),
            store(),
            transient(),
        ];
        let mut h = run(steps, no_jitter());
        assert_eq!(gaps(&mut h, 9).await, vec![5, 5, 5, 5, 5, 5, 5, 5]);
        let _ = h.stop.send(true);
        h.task.await.unwrap();
        while let Ok(e) = h.events.try_recv() {
            assert!(
                !matches!(e, Event::GaveUp(_)),
                "gave up over storage trouble"
            );
        }
    }

    #[actix_rt::test]
    async fn unauthorized_and_conflict_stop_without_retrying() {
        tokio::time::pause();
        for error in [
            AdapterError::Unauthorized("revoked".into()),
            AdapterError::Conflict("another poller".into()),
        ] {
            let text = error.to_string();
            let mut h = run(vec![Step::Fail(error)], no_jitter());
            h.task.await.unwrap();
            assert_eq!(h.starts.len(), 1, "{text}: started once, never again");
            let mut events = Vec::new();
            while let Ok(e) = h.events.try_recv() {
                events.push(e);
            }
            assert_eq!(
                events,
                vec![
                    Event::Status("running".into(), 0),
                    Event::Status("stopped".into(), 0),
                    Event::GaveUp(text),
                ]
            );
        }
    }

    #[actix_rt::test]
    async fn a_healthy_period_resets_the_attempt_count() {
        tokio::time::pause();
        let steps = vec![
            transient(),
            transient(),
            Step::UpFor(Duration::from_secs(61)),
            transient(),
        ];
        let mut h = run(steps, no_jitter());
        // 5, 10, then up for 61 s, which resets: the next delay is 5 s again,
        // then 10 s.
        assert_eq!(gaps(&mut h, 5).await, vec![5, 10, 61 + 5, 10]);
        let _ = h.stop.send(true);
        h.task.await.unwrap();
    }

    #[actix_rt::test]
    async fn stop_during_backoff_ends_at_once() {
        tokio::time::pause();
        let mut h = run(vec![transient()], no_jitter());
        h.starts.recv().await.unwrap();
        // Wait until the supervisor is in backoff, then stop it.
        loop {
            if h.events.recv().await == Some(Event::Status("backoff".into(), 1)) {
                break;
            }
        }
        let before = tokio::time::Instant::now();
        let _ = h.stop.send(true);
        h.task.await.unwrap();
        assert!(before.elapsed() < Duration::from_secs(1));
        assert!(h.starts.try_recv().is_err());
    }

    #[actix::test]
    async fn one_failing_adapter_does_not_block_the_others_and_stop_ends_all() {
        tokio::time::pause();
        let (stx, mut starts) = mpsc::unbounded_channel();
        let (etx, mut events) = mpsc::unbounded_channel();
        let failing = Arc::new(Scripted {
            name: "telegram",
            steps: Mutex::new(
                vec![Step::Fail(AdapterError::Unauthorized("revoked".into()))].into(),
            ),
            starts: stx.clone(),
        });
        let healthy = Arc::new(Scripted {
            name: "slack",
            steps: Mutex::new(VecDeque::new()),
            starts: stx,
        });
        let statuses = Statuses::default();
        let sup = AdapterSupervisor::start_all(
            vec![healthy, failing],
            SupervisionConfig::default(),
            Arc::new(Recorder(etx)),
            statuses.clone(),
        )
        .start();
        starts.recv().await.unwrap();
        starts.recv().await.unwrap();
        // The failing one gives up (an event the supervisor emits) …
        while !matches!(events.recv().await, Some(Event::GaveUp(_))) {}
        // … while the other keeps running.
        let all = sup.send(GetAdapterStatus).await.unwrap();
        assert_eq!(all["telegram"].state, "stopped");
        assert_eq!(all["slack"].state, "running");
        sup.send(StopAdapters {
            deadline: Duration::from_secs(5),
        })
        .await
        .unwrap();
        let all = statuses.lock().unwrap().clone();
        assert_eq!(all["slack"].state, "stopped");
        assert_eq!(
            all["telegram"].last_error.as_deref(),
            Some("token rejected (HTTP 401): revoked")
        );
    }
}
