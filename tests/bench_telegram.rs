//! `keel bench telegram` through the real binary with a small N: it exits 0,
//! every queued update is stored exactly once, offsets never went back, and
//! the JSON line carries every key the issue names.

// Tests drive real processes in real time: clippy.toml's clock and env rules are for keel itself.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(240);
const UPDATES: u64 = 2000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_telegram_bench_stores_every_update_once_and_reports_its_keys() {
    let n = UPDATES.to_string();
    let out = common::run_keel(
        &[
            "bench",
            "telegram",
            "--updates",
            &n,
            "--reference-seconds",
            "0.5",
            "--json",
        ],
        None,
        DEADLINE,
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "keel bench telegram failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or("");
    let f: Value = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("last line is not JSON ({e}): {stdout}"));
    assert_eq!(f["updates"], UPDATES, "{f}");
    assert_eq!(f["stored"], UPDATES, "{f}");
    assert_eq!(f["missing"], 0, "{f}");
    assert_eq!(f["dup"], 0, "{f}");
    assert_eq!(f["offset_regressions"], 0, "{f}");
    for key in [
        "updates_per_s",
        "reference_per_s",
        "ratio",
        "cpu_us_per_update",
    ] {
        let v = f[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} is not a number: {f}"));
        assert!(v > 0.0, "{key} = {v}: {f}");
    }
}
