//! `keel torture` through the real binary: a short battery passes with every
//! figure of TESTING.md section F in its JSON line and exit code 0, its
//! damaged-file cases are all detected or harmless, and the same seed
//! replays the same schedule. (The ledger accounting itself —
//! that a lost, duplicated or invented message is counted — is unit-tested
//! in bench/src/torture.rs.)

// Tests drive real processes in real time: clippy.toml's clock and env rules are for keel itself.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(240);

/// The JSON line (the last line of stdout) of a finished run.
fn figures(stdout: &[u8]) -> Value {
    let text = String::from_utf8_lossy(stdout);
    let last = text.lines().last().unwrap_or("");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_torture_passes_and_reports_every_figure() {
    let out = common::run_keel(
        &["torture", "--cycles", "5", "--seed", "42", "--json"],
        None,
        DEADLINE,
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "keel torture failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("seed 42"),
        "the seed is not printed: {stdout}"
    );
    // Not a terminal: no progress lines on stderr.
    assert!(
        out.stderr.is_empty(),
        "stderr is not a terminal but got: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let f = figures(&out.stdout);
    for key in [
        "cycles",
        "acked",
        "lost",
        "dup",
        "unexpected",
        "recovered",
        "timers_fired",
        "timers_double",
        "timers_missed",
        "recovery_ms_p50",
        "recovery_ms_p99",
        "panics",
        "canary_hits",
    ] {
        assert!(f[key].is_u64(), "{key} is not an integer in {f}");
    }
    assert!(f["failpoints"].is_boolean(), "failpoints in {f}");
    assert_eq!(f["cycles"], 5, "{f}");
    for zero in [
        "lost",
        "dup",
        "unexpected",
        "timers_double",
        "timers_missed",
        "panics",
        "canary_hits",
    ] {
        assert_eq!(f[zero], 0, "{zero} in {f}");
    }
    assert!(f["acked"].as_u64() > Some(100), "too little load: {f}");
    // Damaged files (F5–F7): every case ran, none lost data silently, and
    // the WAL cases are caught by R39's record of acknowledged commits.
    assert_eq!(f["damage_cases"], 11, "{f}");
    assert_eq!(f["damage_silent"], 0, "{f}");
    for case in [
        "wal_deleted",
        "wal_truncated",
        "db_header_flip",
        "config_nul",
    ] {
        assert_eq!(f["damage"][case], "detected", "{case} in {f}");
    }
    assert!(
        f["timers_fired"].as_u64() > Some(0),
        "no reminder fired: {f}"
    );
    assert!(
        f["starts"].as_u64() > Some(5),
        "every cycle is a start plus the final one: {f}"
    );
    // The same seed draws the same schedule (the storms are part of it).
    let again = common::run_keel(
        &["torture", "--cycles", "5", "--seed", "42", "--json"],
        None,
        DEADLINE,
    )
    .await;
    assert!(again.status.success(), "second run failed");
    let g = figures(&again.stdout);
    assert_eq!(f["starts"], g["starts"], "same seed, other schedule");
    assert_eq!(
        f["storm_kills"], g["storm_kills"],
        "same seed, other schedule"
    );
}

#[tokio::test]
async fn bad_torture_flags_get_one_line_errors() {
    for (args, needle) in [
        (&["torture", "--cycles", "0"][..], "--cycles"),
        (&["torture", "--seconds", "0"][..], "--seconds"),
        (&["torture", "--clients", "0"][..], "--clients"),
        (
            &["torture", "--data-dir", "/nonexistent/keel-torture"][..],
            "not a directory",
        ),
    ] {
        let out = common::run_keel(args, None, Duration::from_secs(30)).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
}
