//! `keel timers preview` on the real binary: the next due instants of a
//! schedule in JSON and in human form, through New York's 2026 fall-back
//! fold (wildcard hours fire through the repeated hour, a fixed time fires
//! once); every bad input exits 2 with one line on stderr naming the
//! problem; it needs no data dir and no running keel.

// Tests drive real processes in real time: clippy.toml's clock and env rules are for keel itself.
#![allow(clippy::disallowed_methods)]

mod common;

use std::process::{Output, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::run_keel;
use keel_actors::schedule::parse_rfc3339;
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(60);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

async fn preview(args: &[&str]) -> Output {
    let mut all = vec!["timers", "preview"];
    all.extend_from_slice(args);
    run_keel(&all, None, DEADLINE).await
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The `next` list of a successful `--json` run.
fn next_of(out: &Output) -> Vec<String> {
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(out));
    let v: Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    let next = v["next"].as_array().expect("a \"next\" array");
    assert_eq!(
        v.as_object().map(|o| o.len()),
        Some(1),
        "only \"next\": {v}"
    );
    next.iter()
        .map(|t| t.as_str().expect("instants are strings").to_string())
        .collect()
}

#[tokio::test]
async fn json_lists_every_quarter_hour_through_the_repeated_hour() {
    let out = preview(&[
        "--cron",
        "*/15 * * * *",
        "--tz",
        "America/New_York",
        "--from",
        "2026-11-01T05:30:00Z",
        "--count",
        "8",
        "--json",
    ])
    .await;
    let next = next_of(&out);
    assert_eq!(
        next[..6],
        [
            "2026-11-01T05:45:00Z",
            "2026-11-01T06:00:00Z",
            "2026-11-01T06:15:00Z",
            "2026-11-01T06:30:00Z",
            "2026-11-01T06:45:00Z",
            "2026-11-01T07:00:00Z",
        ],
        "01:45 EDT, then 01:00–02:00 EST"
    );
    assert_eq!(next.len(), 8);

    let hourly = preview(&[
        "--cron",
        "0 * * * *",
        "--tz",
        "America/New_York",
        "--from",
        "2026-11-01T04:30:00Z",
        "--count",
        "3",
        "--json",
    ])
    .await;
    assert_eq!(
        next_of(&hourly),
        [
            "2026-11-01T05:00:00Z",
            "2026-11-01T06:00:00Z",
            "2026-11-01T07:00:00Z"
        ]
    );
}

#[tokio::test]
async fn human_output_is_one_line_per_instant_in_utc_and_local_time() {
    let out = preview(&[
        "--cron",
        "*/15 * * * *",
        "--tz",
        "America/New_York",
        "--from",
        "2026-11-01T05:30:00Z",
        "--count",
        "3",
    ])
    .await;
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "2026-11-01T05:45:00Z  2026-11-01 01:45:00 EDT (-04:00)\n\
         2026-11-01T06:00:00Z  2026-11-01 01:00:00 EST (-05:00)\n\
         2026-11-01T06:15:00Z  2026-11-01 01:15:00 EST (-05:00)\n"
    );
    assert!(stderr(&out).is_empty(), "stderr: {}", stderr(&out));

    // `--daily` is `/remind every day at`: a fixed time, once in the fold.
    let daily = preview(&[
        "--daily",
        "01:30",
        "--tz",
        "America/New_York",
        "--from",
        "2026-10-31T12:00:00Z",
        "--count",
        "2",
    ])
    .await;
    assert_eq!(
        stdout(&daily),
        "2026-11-01T05:30:00Z  2026-11-01 01:30:00 EDT (-04:00)\n\
         2026-11-02T06:30:00Z  2026-11-02 01:30:00 EST (-05:00)\n"
    );

    // `--every` is `/remind every 90m`, anchored at --from; --tz defaults to UTC.
    let every = preview(&[
        "--every",
        "90m",
        "--from",
        "2026-11-01T01:30:00-04:00",
        "--count",
        "2",
    ])
    .await;
    assert_eq!(
        stdout(&every),
        "2026-11-01T07:00:00Z  2026-11-01 07:00:00 UTC (+00:00)\n\
         2026-11-01T08:30:00Z  2026-11-01 08:30:00 UTC (+00:00)\n"
    );
}

#[tokio::test]
async fn every_bad_input_exits_2_with_one_line_naming_the_problem() {
    let cron = ["--cron", "* * * * *"];
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--cron", "61 * * * *"],
            "--cron: invalid cron expression",
        ),
        (vec!["--cron", "* * *"], "5 or 6 fields"),
        (vec!["--cron", "*/0 * * * *"], "step of 0"),
        (vec!["--cron", "@reboot"], "--cron: invalid cron expression"),
        (
            vec!["--cron", "0 0 31 2 *"],
            "--cron: that schedule never fires",
        ),
        (
            vec!["--every", "0s"],
            "--every: the shortest duration is 1s",
        ),
        (vec!["--every", "-5m"], "--every: cannot read the duration"),
        (
            vec!["--daily", "25:00"],
            "--daily: cannot read the time \"25:00\"",
        ),
        (
            [&cron[..], &["--tz", "America/New_Yrok"]].concat(),
            "--tz: unknown timezone \"America/New_Yrok\"; did you mean America/New_York?",
        ),
        (
            [&cron[..], &["--tz", "../../etc/localtime"]].concat(),
            "--tz: unknown timezone",
        ),
        (
            [&cron[..], &["--tz", ""]].concat(),
            "--tz: give a timezone name",
        ),
        (
            [&cron[..], &["--from", "2026-13-01T00:00:00Z"]].concat(),
            "--from: cannot read the instant \"2026-13-01T00:00:00Z\"",
        ),
        (
            [&cron[..], &["--from", "2026-11-01 05:30"]].concat(),
            "--from: cannot read the instant",
        ),
        (
            [&cron[..], &["--count", "0"]].concat(),
            "--count: give a whole number from 1 to 1000, not \"0\"",
        ),
        ([&cron[..], &["--count", "1001"]].concat(), "--count"),
        ([&cron[..], &["--count", "-3"]].concat(), "--count"),
        ([&cron[..], &["--count", "ten"]].concat(), "--count"),
        (
            vec!["--every", "100w", "--from", "9999-01-01T00:00:00Z"],
            "--every: the instants run past the year 9999",
        ),
        (
            vec![],
            "give exactly one of --cron EXPR, --every DUR, --daily HH:MM",
        ),
        (
            vec!["--cron", "* * * * *", "--every", "2h"],
            "give exactly one of",
        ),
        (
            vec!["--every", "2h", "--daily", "09:00"],
            "give exactly one of",
        ),
    ];
    let mut problems = Vec::new();
    for (args, needle) in &cases {
        let out = preview(args).await;
        let err = stderr(&out);
        let ok = out.status.code() == Some(2)
            && out.stdout.is_empty()
            && err.ends_with('\n')
            && err.lines().count() == 1
            && err.starts_with("keel: error: ")
            && err.contains(needle)
            && !err.contains("panicked");
        if !ok {
            problems.push(format!(
                "{args:?}: exit {:?}, stdout {:?}, stderr {err:?} (wanted {needle:?})",
                out.status.code(),
                stdout(&out)
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[tokio::test]
async fn it_needs_no_data_dir_and_defaults_to_ten_instants_from_now() {
    // An empty working directory and a data dir that does not exist: both
    // stay as they are.
    let cwd = tempfile::tempdir().expect("temp dir");
    let missing = cwd.path().join("no-such-data-dir");
    let before = now_ms();
    let child = tokio::process::Command::new(common::keel_bin())
        .args(["timers", "preview", "--cron", "* * * * *", "--json"])
        .current_dir(cwd.path())
        .env("KEEL_DATA_DIR", &missing)
        .env_remove("KEEL_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn keel");
    let out = tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .expect("keel timers preview finished")
        .expect("wait keel");
    let next = next_of(&out);
    assert_eq!(next.len(), 10, "--count defaults to 10");
    // Every minute from now: the first whole minute after the start, then
    // one a minute.
    let after = now_ms();
    let ms: Vec<i64> = next
        .iter()
        .map(|t| parse_rfc3339(t).expect("RFC 3339"))
        .collect();
    assert!(
        ms[0] > before && ms[0] <= after + 60_000 && ms[0] % 60_000 == 0,
        "first instant {} is not the next minute after {before}",
        next[0]
    );
    assert!(ms.windows(2).all(|w| w[1] - w[0] == 60_000), "{next:?}");
    assert!(!missing.exists(), "preview created the data dir");
    let left: Vec<_> = std::fs::read_dir(cwd.path()).expect("read cwd").collect();
    assert!(
        left.is_empty(),
        "preview wrote into its working dir: {left:?}"
    );
}
