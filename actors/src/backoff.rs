//! The one retry schedule (R16): used by the adapter supervisor to restart a
//! channel and by the outbox to resend a reply. Pure, with a table test.

use std::time::Duration;

use crate::config::SupervisionConfig;

/// Delay before restart number `attempt` (1-based): `initial * 2^(attempt-1)`
/// capped at `max`, minus up to `jitter` of it (`unit` in [0, 1) from the
/// RNG). Pure, so the schedule has a table test.
pub fn backoff_delay(cfg: &SupervisionConfig, attempt: u32, unit: f64) -> Duration {
    let exp = attempt.saturating_sub(1).min(32);
    let base = cfg
        .backoff_initial_ms
        .saturating_mul(1u64 << exp)
        .min(cfg.backoff_max_ms);
    let cut = (base as f64 * cfg.jitter * unit.clamp(0.0, 1.0)) as u64;
    Duration::from_millis(base - cut.min(base))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_schedule_table() {
        let cfg = SupervisionConfig::default();
        let table = [
            (1, 5),
            (2, 10),
            (3, 20),
            (4, 40),
            (5, 60),
            (6, 60),
            (40, 60),
        ];
        for (attempt, secs) in table {
            assert_eq!(
                backoff_delay(&cfg, attempt, 0.0),
                Duration::from_secs(secs),
                "attempt {attempt}"
            );
        }
        // Jitter only shortens, by at most the configured fraction.
        assert_eq!(
            backoff_delay(&cfg, 1, 1.0),
            Duration::from_millis(4_500),
            "10% off 5 s"
        );
        let none = SupervisionConfig { jitter: 0.0, ..cfg };
        assert_eq!(backoff_delay(&none, 3, 0.99), Duration::from_secs(20));
    }
}
