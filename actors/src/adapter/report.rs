//! Where the adapter supervisor reports in keel: each status change goes to
//! `adapter_state` (row `status:<adapter>`, read by `keel status`) and to
//! `/metrics`; a give-up becomes a system notice to the owner on a healthy
//! channel (R17), committed and sent through the outbox like any reply.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use actix::prelude::*;
use prometheus::{IntGaugeVec, Opts};

use super::supervisor::{AdapterStatus, SupervisionReport};
use crate::error::StoreError;
use crate::metrics::Metrics;
use crate::outbox::{OutboxActor, OutboxKick};
use crate::persistence::adapter_state::STATUS_PREFIX;
use crate::persistence::{CommitNotice, PersistenceActor, PutAdapterState, SessionKey};

/// States an adapter can be in (one gauge series each).
const STATES: &[&str] = &["running", "backoff", "stopped", "gave_up"];

/// Longest error text put into a metric label.
const MAX_LABEL_CHARS: usize = 120;

/// Adapter metrics: `keel_adapter_state{adapter,state}` (1 for the current
/// state), `keel_adapter_attempts{adapter}` and
/// `keel_adapter_last_error{adapter,error}` (info-style: 1 for the last
/// error, one series per adapter, the text passed through [`label_text`]).
#[derive(Clone)]
pub struct AdapterMetrics {
    pub state: IntGaugeVec,
    pub attempts: IntGaugeVec,
    pub last_error: IntGaugeVec,
    /// The error label currently exported per adapter, so a new error
    /// replaces the old series instead of adding one.
    shown: Arc<Mutex<HashMap<String, String>>>,
}

/// An error text fit for a metric label: token-looking words masked
/// (`redact::mask_secret_words`), control characters and quotes dropped,
/// bounded to [`MAX_LABEL_CHARS`] characters.
pub fn label_text(error: &str) -> String {
    crate::redact::mask_secret_words(error)
        .chars()
        .filter(|c| !c.is_control() && *c != '"' && *c != '\\')
        .take(MAX_LABEL_CHARS)
        .collect()
}

impl AdapterMetrics {
    /// Create and register on keel's registry.
    pub fn register(metrics: &Metrics) -> AdapterMetrics {
        let state = IntGaugeVec::new(
            Opts::new("keel_adapter_state", "1 for each adapter's current state"),
            &["adapter", "state"],
        )
        .expect("static metric definition");
        let attempts = IntGaugeVec::new(
            Opts::new(
                "keel_adapter_attempts",
                "Failed attempts since the adapter was last healthy",
            ),
            &["adapter"],
        )
        .expect("static metric definition");
        let last_error = IntGaugeVec::new(
            Opts::new(
                "keel_adapter_last_error",
                "1 for each adapter's last error (sanitized, bounded text)",
            ),
            &["adapter", "error"],
        )
        .expect("static metric definition");
        metrics.register(Box::new(state.clone()));
        metrics.register(Box::new(attempts.clone()));
        metrics.register(Box::new(last_error.clone()));
        AdapterMetrics {
            state,
            attempts,
            last_error,
            shown: Arc::default(),
        }
    }

    fn set(&self, adapter: &str, status: &AdapterStatus) {
        for s in STATES {
            self.state
                .with_label_values(&[adapter, s])
                .set(i64::from(*s == status.state));
        }
        self.attempts
            .with_label_values(&[adapter])
            .set(i64::from(status.attempts));
        let Some(error) = &status.last_error else {
            return;
        };
        let label = label_text(error);
        let mut shown = self.shown.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = shown.insert(adapter.to_string(), label.clone()) {
            if old != label {
                let _ = self.last_error.remove_label_values(&[adapter, &old]);
            }
        }
        self.last_error.with_label_values(&[adapter, &label]).set(1);
    }
}

/// The owner's chats, in order of preference: `[owner]`, then
/// `telegram.owner_chat`.
pub type OwnerTargets = Vec<(String, String)>;

pub struct StoreReport {
    pub persistence: Addr<PersistenceActor>,
    pub outbox: Addr<OutboxActor>,
    pub metrics: AdapterMetrics,
    pub owners: OwnerTargets,
    /// Channels with a reply route (a sink) right now.
    pub routed: HashSet<String>,
}

/// Pick the owner chat to tell that `failed` gave up: a routed channel other
/// than the failed one whose adapter (if supervised) is running.
pub fn pick_owner(
    owners: &OwnerTargets,
    routed: &HashSet<String>,
    failed: &str,
    statuses: &HashMap<String, AdapterStatus>,
) -> Option<(String, String)> {
    owners
        .iter()
        .find(|(channel, _)| {
            channel != failed
                && routed.contains(channel)
                && statuses.get(channel).is_none_or(|s| s.state == "running")
        })
        .cloned()
}

impl SupervisionReport for StoreReport {
    fn status(&self, adapter: &str, status: &AdapterStatus) {
        self.metrics.set(adapter, status);
        let json = serde_json::to_string(status).unwrap_or_default();
        self.persistence.do_send(PutAdapterState {
            adapter: format!("{STATUS_PREFIX}{adapter}"),
            state_json: json,
        });
    }

    fn gave_up(&self, adapter: &str, reason: &str, statuses: &HashMap<String, AdapterStatus>) {
        let Some((channel, chat)) = pick_owner(&self.owners, &self.routed, adapter, statuses)
        else {
            tracing::error!(
                adapter,
                "no healthy adapter to tell the owner that this adapter gave up"
            );
            return;
        };
        let text = format!("adapter {adapter} gave up: {reason}");
        let persistence = self.persistence.clone();
        let outbox = self.outbox.clone();
        tokio::spawn(async move {
            let res = persistence
                .send(CommitNotice {
                    session: SessionKey::new(&channel, &chat),
                    text,
                    deliver: true,
                })
                .await
                .unwrap_or(Err(StoreError::Closed));
            match res {
                Ok(_) => outbox.do_send(OutboxKick),
                Err(e) => tracing::error!(error = %e, "cannot store the give-up notice"),
            }
        });
    }
}

/// Build and start the supervised adapters of `config` (R15), in the
/// registry's priority order, and report the unsupervised channels as
/// running. Called once by `app::start`, after recovery.
pub fn start_adapters(
    config: &crate::config::Config,
    deps: &super::IntakeDeps,
    outbox: Addr<OutboxActor>,
    health: &super::ChannelHealth,
) -> Addr<super::supervisor::AdapterSupervisor> {
    use super::supervisor::{AdapterSupervisor, Statuses};

    let report = Arc::new(StoreReport {
        persistence: deps.persistence.clone(),
        outbox,
        metrics: AdapterMetrics::register(&deps.metrics),
        owners: super::owner_targets(config),
        routed: super::routed_channels(config),
    });
    let statuses = Statuses::default();
    // The webhook is a route of the shared HTTP server: it cannot fail on
    // its own (a bind failure fails startup), its intake follows the gate,
    // and its health is `/healthz` / `/readyz`; its reply sink's failures
    // show in the outbox metrics. Stdin (ephemeral cli) likewise.
    for name in super::unsupervised(config) {
        let status = AdapterStatus {
            state: "running".into(),
            attempts: 0,
            last_error: None,
            retry_in_ms: None,
        };
        report.status(name, &status);
        statuses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), status);
    }
    health.attach(report.clone(), statuses.clone());
    let adapters = super::intakes(config, deps);
    AdapterSupervisor::start_all(adapters, config.adapters.clone(), report, statuses).start()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_labels_are_sanitized_bounded_and_replaced() {
        let label = label_text(
            "HTTP 401 at https://x/bot123456:AAbbCCddEEffGGhhIIjjKK/getMe \"quoted\"\n next",
        );
        assert!(!label.contains("123456:AA"), "{label}");
        assert!(!label.contains('"') && !label.contains('\n'), "{label}");
        assert!(label_text("token xoxb-1-2-abc rejected").contains("[redacted]"));
        assert!(label_text("bare 987654:abcdefghijklmnopqrstuvwxyz").contains("[redacted]"));
        assert_eq!(
            label_text(&"e".repeat(500)).chars().count(),
            MAX_LABEL_CHARS
        );

        let metrics = Metrics::new();
        let m = AdapterMetrics::register(&metrics);
        let status = |e: &str| AdapterStatus {
            state: "backoff".into(),
            attempts: 1,
            last_error: Some(e.into()),
            retry_in_ms: None,
        };
        m.set("slack", &status("HTTP 502"));
        m.set("slack", &status("connection reset"));
        let text = metrics.render();
        assert!(text
            .contains("keel_adapter_last_error{adapter=\"slack\",error=\"connection reset\"} 1"));
        assert!(!text.contains("HTTP 502"), "old error series removed");
    }

    #[test]
    fn the_owner_is_told_on_a_healthy_routed_channel_other_than_the_failed_one() {
        let owners = vec![
            ("telegram".to_string(), "42".to_string()),
            ("webhook".to_string(), "owner".to_string()),
        ];
        let routed: HashSet<String> = ["telegram", "webhook"].map(String::from).into();
        let mut statuses = HashMap::new();
        let got = pick_owner(&owners, &routed, "telegram", &statuses);
        assert_eq!(got, Some(("webhook".into(), "owner".into())));
        let got = pick_owner(&owners, &routed, "slack", &statuses);
        assert_eq!(got, Some(("telegram".into(), "42".into())));
        statuses.insert(
            "telegram".to_string(),
            AdapterStatus {
                state: "backoff".into(),
                attempts: 2,
                last_error: None,
                retry_in_ms: None,
            },
        );
        let got = pick_owner(&owners, &routed, "slack", &statuses);
        assert_eq!(got, Some(("webhook".into(), "owner".into())));
        let only_webhook: HashSet<String> = ["telegram"].map(String::from).into();
        assert_eq!(
            pick_owner(&owners, &only_webhook, "telegram", &statuses),
            None
        );
    }
}
