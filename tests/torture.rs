//! `keel torture` through the real binary: a short battery passes with every
//! figure of TESTING.md section F in its JSON line (Telegram and Slack
//! through the battery's fake upstreams included) and exit code 0, its
//! damaged-file cases are all detected or harmless, and the same seed
//! replays the same schedule. (The ledger accounting itself —
//! that a lost, duplicated or invented message is counted — is unit-tested
//! in bench/src/torture/.)

// Tests drive real processes in real time: clippy.toml's clock and env rules are for keel itself.
#![allow(clippy::disallowed_methods)]

mod common;
#[path = "common/docker.rs"]
mod docker;

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
    // Power loss (C4) and I/O errors (F2): images taken, faults fired,
    // nothing acknowledged missing.
    assert!(f["power_loss_images"].as_u64() >= Some(6), "{f}");
    assert!(
        f["power_loss_acked"].as_u64() > Some(0),
        "no load before a power loss: {f}"
    );
    assert_eq!(f["io_error_cases"], f["io_error_fired"], "{f}");
    for zero in [
        "power_loss_lost",
        "power_loss_not_prefix",
        "power_loss_unready",
        "io_error_lost",
        "io_error_acked_after_forever",
    ] {
        assert_eq!(f[zero], 0, "{zero} in {f}");
    }
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
    // Telegram and Slack through the battery's fake upstreams: both got
    // through, and nothing confirmed to them is lost, doubled or unanswered.
    for key in [
        "telegram_updates",
        "telegram_acked",
        "telegram_lost",
        "telegram_dup",
        "telegram_offset_regressions",
        "telegram_unanswered",
        "slack_events",
        "slack_acked",
        "slack_lost",
        "slack_dup",
        "slack_unanswered",
    ] {
        assert!(f[key].is_u64(), "{key} is not an integer in {f}");
    }
    for zero in [
        "telegram_lost",
        "telegram_dup",
        "telegram_unexpected",
        "telegram_offset_regressions",
        "telegram_unanswered",
        "slack_lost",
        "slack_dup",
        "slack_unexpected",
        "slack_unanswered",
    ] {
        assert_eq!(f[zero], 0, "{zero} in {f}");
    }
    assert!(
        f["telegram_acked"].as_u64() > Some(0),
        "no Telegram update confirmed: {f}"
    );
    assert!(
        f["slack_acked"].as_u64() > Some(0),
        "no Slack event acked: {f}"
    );
    // The final start confirms everything the fakes fed.
    assert_eq!(f["telegram_acked"], f["telegram_updates"], "{f}");
    assert_eq!(f["slack_acked"], f["slack_events"], "{f}");
    assert!(
        f["starts"].as_u64() > Some(5),
        "every cycle is a start plus the final one: {f}"
    );
    // Tasks in the load: submitted, interrupted by the kills, requeued,
    // and nothing lost, doubled or left unfinished.
    for zero in [
        "tasks_lost",
        "tasks_unexpected",
        "tasks_duplicated",
        "tasks_false_success",
        "tasks_unfinished",
    ] {
        assert_eq!(f[zero], 0, "{zero} in {f}");
    }
    assert!(f["tasks_acked"].as_u64() > Some(0), "no task ran: {f}");
    assert!(f["tasks_runs"].as_u64() > Some(0), "no task ran: {f}");
    assert!(f["tasks_interrupted"].is_u64(), "{f}");
    assert!(f["tasks_requeued"].is_u64(), "{f}");
    // No engine named: the container figures say so.
    assert_eq!(f["containers"], false, "{f}");
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

/// A default build has no kill points: it says so, and refuses to be broken.
#[cfg(not(feature = "failpoints"))]
#[tokio::test]
async fn a_default_build_refuses_failpoints_with_one_line_errors() {
    let out = common::run_keel(
        &["torture", "--break", "ack-before-commit"],
        None,
        Duration::from_secs(30),
    )
    .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("--features failpoints"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// The battery of a `--features failpoints` build (CI: `cargo test
/// --features failpoints --test torture failpoints::`).
#[cfg(feature = "failpoints")]
mod failpoints {
    use super::*;

    /// One battery at a time: each picks free ports by binding port 0, and
    /// two at once can hand the same port to both keels.
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_battery_kills_keel_at_every_named_point_and_loses_nothing() {
        let _serial = ONE_AT_A_TIME.lock().await;
        // Ten cycles arm each cycle point once (bench/src/torture/mod.rs CYCLE_POINTS).
        let out = common::run_keel(
            &["torture", "--cycles", "10", "--seed", "42", "--json"],
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
        let f = figures(&out.stdout);
        assert_eq!(f["failpoints"], true, "{f}");
        for zero in [
            "lost",
            "dup",
            "unexpected",
            "timers_double",
            "timers_missed",
        ] {
            assert_eq!(f[zero], 0, "{zero} in {f}");
        }
        assert_eq!(f["migration_unrecovered"], 0, "{f}");
        // Telegram and Slack went through the kill points too (their loss
        // counters are in the exit code checked above).
        for key in ["telegram_acked", "slack_acked"] {
            assert!(f[key].as_u64() > Some(0), "{key} in {f}");
        }
        let migrations = f["migration_cases"].as_u64().unwrap_or(0);
        assert!(migrations >= 8, "{f}");
        let hits = &f["failpoint_hits"];
        assert_eq!(hits["mid_migration"].as_u64(), Some(migrations), "{f}");
        for point in [
            "commit_before_reply",
            "reply_before_poll",
            "timer_fire",
            "startup_recovery",
            "mid_checkpoint",
        ] {
            assert!(hits[point].as_u64() > Some(0), "{point} never hit: {f}");
        }
        // No engine is configured: the container point is there, never reached.
        assert_eq!(hits["container_create"], 0, "{f}");
        assert!(
            !f["not_run"].to_string().contains("failpoints"),
            "not_run still lists failpoints: {f}"
        );
    }

    /// With an engine the container-create point joins the rotation (the
    /// 12th cycle arms it): keel killed right after a create converges
    /// with nothing orphaned or doubled.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_kill_after_a_container_create_leaves_nothing_orphaned() {
        let Some(engine) = docker::docker_or_skip("torture_container_create") else {
            return;
        };
        let _serial = ONE_AT_A_TIME.lock().await;
        let f = run_with_engine(engine, "12", "44").await;
        assert!(
            f["failpoint_hits"]["container_create"].as_u64() > Some(0),
            "container_create never hit: {f}"
        );
    }

    /// `keel torture --break WHAT` for `cycles` cycles (seed 7): it must
    /// exit 1; its stdout and figures.
    async fn broken_run(what: &str, cycles: &str) -> (String, Value) {
        let out = common::run_keel(
            &[
                "torture", "--cycles", cycles, "--seed", "7", "--break", what, "--json",
            ],
            None,
            DEADLINE,
        )
        .await;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(out.status.code(), Some(1), "{stdout}");
        let f = figures(&out.stdout);
        (stdout, f)
    }

    /// The counters can fail: a keel that acknowledges before it commits
    /// (the `ack_before_commit` switch of this test build) loses messages
    /// at every kill, and the battery says so and exits 1.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_keel_acknowledging_before_commit_fails_the_battery() {
        let _serial = ONE_AT_A_TIME.lock().await;
        let (stdout, f) = broken_run("ack-before-commit", "3").await;
        assert!(stdout.contains("keel torture: FAIL"), "{stdout}");
        assert_eq!(f["broken"], "ack_before_commit", "{f}");
        assert!(f["lost"].as_u64() > Some(0), "no loss counted: {f}");
        assert!(
            stdout.contains("  lost: "),
            "no sample of the lost: {stdout}"
        );
    }

    /// The dup counter can fail: a keel that stores every delivery under a
    /// key of its own (the `forget_message_ids` switch) stores the messages
    /// the clients retry after each kill twice, and the battery says so.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_keel_forgetting_message_ids_fails_the_battery_with_duplicates() {
        let _serial = ONE_AT_A_TIME.lock().await;
        let (_, f) = broken_run("forget-message-ids", "5").await;
        assert_eq!(f["broken"], "forget_message_ids", "{f}");
        assert!(f["dup"].as_u64() > Some(0), "no duplicate counted: {f}");
        assert_eq!(f["lost"], 0, "{f}");
    }
}

/// `keel torture` for `cycles` cycles with `seed` on the test engine; it
/// must pass. Its figures.
async fn run_with_engine(engine: &docker::Engine, cycles: &str, seed: &str) -> Value {
    let host = engine.host();
    let out = common::run_keel(
        &[
            "torture",
            "--cycles",
            cycles,
            "--seed",
            seed,
            "--json",
            "--docker-host",
            &host,
            "--image",
            docker::IMAGE,
        ],
        None,
        DEADLINE,
    )
    .await;
    assert!(
        out.status.success(),
        "keel torture failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let f = figures(&out.stdout);
    for zero in [
        "containers_orphaned",
        "containers_duplicated",
        "services_missing",
    ] {
        assert_eq!(f[zero], 0, "{zero} in {f}");
    }
    f
}

/// With an engine: services deployed and killed through the cycles
/// converge with nothing orphaned or doubled, every F8 event-log damage is
/// detected, and the battery leaves no container behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torture_with_an_engine_converges_services_and_detects_event_log_damage() {
    let Some(engine) = docker::docker_or_skip("torture_engine") else {
        return;
    };
    let f = run_with_engine(engine, "6", "43").await;
    assert_eq!(f["containers"], true, "{f}");
    assert!(f["services_acked"].as_u64() > Some(0), "no deploy: {f}");
    assert_eq!(f["event_log_cases"], 3, "{f}");
    assert_eq!(f["event_log_detected"], 3, "{f}");
    // The battery's instance is `torture` + the seed's low 32 bits in hex.
    let instance = format!("torture{:08x}", 43u32);
    assert!(
        engine.containers(&instance).is_empty(),
        "containers left behind: {:?}",
        engine.names(&instance)
    );
}
