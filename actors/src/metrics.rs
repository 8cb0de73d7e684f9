//! Prometheus metrics (R36). One registry per process, passed in (never a
//! global), so tests build their own.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// All of keel's metrics. Cheap to clone (every field is an `Arc` inside).
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    /// Inbound messages by channel and outcome (accepted, duplicate, rejected, unavailable).
    pub inbound: IntCounterVec,
    /// Jobs per group commit: the fsync sharing that R4 asks for.
    pub commit_batch_size: Histogram,
    /// Time from BEGIN to a durable COMMIT.
    pub commit_seconds: Histogram,
    pub commit_failures: IntCounter,
    pub outbox_sent: IntCounter,
    pub outbox_send_failures: IntCounter,
    pub outbox_unknown: IntCounter,
    pub storage_degraded: IntGauge,
    pub ready: IntGauge,
    pub sessions_active: IntGauge,
    pub boot_epoch: IntGauge,
    pub config_reloads: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let inbound = IntCounterVec::new(
            Opts::new("keel_inbound_messages_total", "Inbound messages by outcome"),
            &["channel", "outcome"],
        )
        .expect("static metric definition");
        let commit_batch_size = Histogram::with_opts(
            HistogramOpts::new(
                "keel_commit_batch_jobs",
                "Jobs sharing one commit (one fsync)",
            )
            .buckets(vec![
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0,
            ]),
        )
        .expect("static metric definition");
        let commit_seconds = Histogram::with_opts(
            HistogramOpts::new("keel_commit_seconds", "Duration of one group commit")
                .buckets(prometheus::exponential_buckets(0.000_05, 2.0, 16).expect("buckets")),
        )
        .expect("static metric definition");
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("static metric");
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("static metric");
        let m = Metrics {
            inbound,
            commit_batch_size,
            commit_seconds,
            commit_failures: counter("keel_commit_failures_total", "Group commits that failed"),
            outbox_sent: counter(
                "keel_outbox_sent_total",
                "Replies accepted by their channel",
            ),
            outbox_send_failures: counter(
                "keel_outbox_send_failures_total",
                "Reply send attempts that failed (retried)",
            ),
            outbox_unknown: counter(
                "keel_outbox_unknown_total",
                "Reply sends whose outcome is unknown (timeout after the request left)",
            ),
            storage_degraded: gauge("keel_storage_degraded", "1 while commits are failing"),
            ready: gauge("keel_ready", "1 while /readyz answers 200"),
            sessions_active: gauge("keel_sessions_active", "Session actors in memory"),
            boot_epoch: gauge("keel_boot_epoch", "Start counter of this data dir (R38)"),
            config_reloads: IntCounterVec::new(
                Opts::new("keel_config_reloads_total", "SIGHUP reloads by outcome"),
                &["outcome"],
            )
            .expect("static metric definition"),
            registry,
        };
        let r = &m.registry;
        for c in [
            Box::new(m.inbound.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.commit_batch_size.clone()),
            Box::new(m.commit_seconds.clone()),
            Box::new(m.commit_failures.clone()),
            Box::new(m.outbox_sent.clone()),
            Box::new(m.outbox_send_failures.clone()),
            Box::new(m.outbox_unknown.clone()),
            Box::new(m.storage_degraded.clone()),
            Box::new(m.ready.clone()),
            Box::new(m.sessions_active.clone()),
            Box::new(m.boot_epoch.clone()),
            Box::new(m.config_reloads.clone()),
        ] {
            r.register(c).expect("metric names are unique");
        }
        m
    }

    /// Register a collector defined elsewhere (e.g. the adapter metrics).
    pub fn register(&self, c: Box<dyn prometheus::core::Collector>) {
        if let Err(e) = self.registry.register(c) {
            tracing::warn!(error = %e, "metric not registered");
        }
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
