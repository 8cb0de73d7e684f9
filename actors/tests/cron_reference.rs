//! keel's cron DST rule against independent reference data
//! (`tests/data/cron/dst_reference.json`, see its README): for every case
//! keel's next 12 instants equal `expected_keel` (a brute-force evaluation
//! of the rule) and equal croniter 7.0.0's output wherever the README says
//! the two agree, which is everywhere except `30 1 * * *` in New York (a
//! fixed time in the fold: croniter fires both occurrences, keel the first).

use keel_actors::schedule::{next_after, parse_rfc3339, parse_tz, rfc3339_utc, Schedule};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Case {
    expr: String,
    tz: String,
    from: String,
    croniter: Vec<String>,
    expected_keel: Vec<String>,
}

fn cases() -> Vec<Case> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/data/cron/dst_reference.json"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    serde_json::from_str(&text).expect("dst_reference.json parses")
}

/// keel's next `n` instants after `from`, as RFC 3339 UTC strings.
fn keel_next(c: &Case, n: usize) -> Vec<String> {
    let tz = parse_tz(&c.tz).expect("zone");
    let schedule = Schedule::Cron(c.expr.clone());
    let from = parse_rfc3339(&c.from).expect("from");
    let mut t = from;
    (0..n)
        .map(|_| {
            t = next_after(&schedule, tz, from, t)
                .expect("schedule evaluates")
                .expect("cron never ends");
            rfc3339_utc(t)
        })
        .collect()
}

#[test]
fn keel_follows_the_brute_force_dst_rule_for_every_reference_case() {
    let cases = cases();
    assert_eq!(cases.len(), 8, "the README documents 8 cases");
    for c in &cases {
        assert_eq!(c.expected_keel.len(), 12, "{} {}", c.expr, c.tz);
        assert_eq!(
            keel_next(c, c.expected_keel.len()),
            c.expected_keel,
            "{} in {} from {}",
            c.expr,
            c.tz,
            c.from
        );
    }
}

#[test]
fn keel_agrees_with_croniter_except_for_the_documented_fixed_time_in_the_fold() {
    let cases = cases();
    let mut differing = Vec::new();
    for c in &cases {
        let keel = keel_next(c, c.croniter.len());
        if c.croniter == c.expected_keel {
            assert_eq!(keel, c.croniter, "{} in {} from {}", c.expr, c.tz, c.from);
        } else {
            differing.push((c.expr.as_str(), c.tz.as_str()));
            // Both fire the first (daylight-time) occurrence; croniter then
            // fires the repeat, keel does not.
            assert_eq!(keel[0], c.croniter[0], "{}", c.expr);
            assert_ne!(keel[1], c.croniter[1], "{}", c.expr);
            assert_eq!(keel[1..11], c.croniter[2..], "{}", c.expr);
        }
    }
    assert_eq!(
        differing,
        [("30 1 * * *", "America/New_York")],
        "the README names the one case where croniter and keel differ"
    );
}
