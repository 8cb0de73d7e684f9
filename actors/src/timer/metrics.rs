//! Timer metrics in `/metrics`: registered through `Metrics::register`
//! (like the adapter metrics), updated only by the `TimerActor`.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge};

use crate::metrics::Metrics;

/// The timer actor's figures. Cheap to clone.
#[derive(Clone, Debug)]
pub struct TimerMetrics {
    /// Active timers in the store: counted (through the `timers_due`
    /// index) after recovery and at every pruning run, not on each change.
    pub active: IntGauge,
    /// Timers held in the in-memory window.
    pub in_window: IntGauge,
    pub fired: IntCounter,
    /// Fired more than 2 s after their instant (downtime, clock jump).
    pub late: IntCounter,
    /// Due instants that will never fire (skip policy, coalesced, too old).
    pub missed: IntCounter,
    pub parked: IntCounter,
    /// Seconds from a due instant to the moment the actor fired it.
    pub lateness: Histogram,
}

impl TimerMetrics {
    /// Create the collectors and register them with `metrics`.
    pub fn new(metrics: &Metrics) -> TimerMetrics {
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("static metric");
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("static metric");
        let m = TimerMetrics {
            active: gauge(
                "keel_timers_active",
                "Active timers stored (counted at start and hourly)",
            ),
            in_window: gauge("keel_timers_in_window", "Timers held in memory"),
            fired: counter("keel_timers_fired_total", "Due instants fired"),
            late: counter("keel_timers_late_total", "Due instants fired late (> 2 s)"),
            missed: counter(
                "keel_timers_missed_total",
                "Due instants that will never fire (misfire policy)",
            ),
            parked: counter("keel_timers_parked_total", "Timers parked with an error"),
            lateness: Histogram::with_opts(
                HistogramOpts::new(
                    "keel_timer_lateness_seconds",
                    "From a due instant to its fire",
                )
                .buckets(prometheus::exponential_buckets(0.000_5, 2.0, 18).expect("buckets")),
            )
            .expect("static metric definition"),
        };
        for c in [
            Box::new(m.active.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.in_window.clone()),
            Box::new(m.fired.clone()),
            Box::new(m.late.clone()),
            Box::new(m.missed.clone()),
            Box::new(m.parked.clone()),
            Box::new(m.lateness.clone()),
        ] {
            metrics.register(c);
        }
        m
    }
}
