//! R39 silent WAL damage: keel's own record of the highest acknowledged
//! commit catches a store that SQLite silently rolled back. Acked writes,
//! SIGKILL (so the WAL is not checkpointed), then the `-wal` of the stopped
//! store is deleted or truncated: the next start logs `data_loss_detected`
//! at ERROR, `/readyz` answers 503 with that reason, `keel status` shows
//! how many commits are missing, and keel refuses messages, until it is
//! started with `--accept-data-loss`. keel itself never deletes the -wal.

// Tests drive real processes in real time: clippy.toml's clock and env rules are for keel itself.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use common::{Config, Daemon};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(30);

/// A daemon with `n` acknowledged messages, SIGKILLed: the WAL holds them.
async fn acked_then_killed(n: usize) -> Daemon {
    let mut d = Daemon::start(Config::default()).await;
    for i in 0..n {
        d.post_ok(&format!("m{i}"), "c1", &format!("hello {i}"))
            .await;
    }
    d.sigkill();
    let wal = wal_path(&d);
    let len = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    assert!(
        len > 0,
        "the WAL of the killed keel is empty: nothing to damage"
    );
    d
}

fn wal_path(d: &Daemon) -> std::path::PathBuf {
    d.data_dir.join("keel.db-wal")
}

/// Starts keel on the damaged store and checks every R39 symptom.
async fn assert_loss_detected(d: &mut Daemon) {
    d.spawn();
    let reason = common::poll_until(DEADLINE, || async {
        let r = d.readyz().await.ok()?;
        (r.status == 503 && r.body.contains("data_loss_detected")).then(|| r.body.clone())
    })
    .await;
    let reason = reason.unwrap_or_else(|| {
        panic!(
            "/readyz never reported data_loss_detected; log:\n{}",
            common::tail(&d.stderr_boot(), 30)
        )
    });
    assert!(reason.contains("missing"), "{reason}");
    let log = d.stderr_boot();
    assert!(
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains("data_loss_detected")),
        "no data_loss_detected ERROR line:\n{}",
        common::tail(&log, 30)
    );
    // It refuses to serve: messages are not acknowledged.
    let r = d
        .post_message(&json!({"id": "after", "chat": "c1", "from": "u", "text": "x"}))
        .await
        .expect("POST");
    assert_ne!(
        r.status, 200,
        "a message was acknowledged on a store that lost commits"
    );
    // `keel status` shows how many commits are missing.
    let out = d.status_json().await;
    assert!(out.status.success(), "keel status failed: {out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    let missing = v["commits"]["missing"].as_i64().unwrap_or(0);
    assert!(missing > 0, "keel status shows no missing commits: {v}");
    d.sigterm(DEADLINE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_wal_is_detected_and_keel_refuses_until_accepted() {
    let mut d = acked_then_killed(20).await;
    std::fs::remove_file(wal_path(&d)).expect("delete the -wal");
    assert_loss_detected(&mut d).await;
    // Detected again on the next start: refusing wrote nothing over the record.
    assert_loss_detected(&mut d).await;
    // The operator accepts the loss: keel serves what is left, says so at
    // WARN, and the next plain start is clean.
    d.args = vec!["--accept-data-loss".into()];
    d.restart().await;
    assert!(
        d.stderr_boot().contains("data_loss_accepted"),
        "the acceptance is not in the log"
    );
    d.post_ok("after", "c1", "hello again").await;
    d.sigterm(DEADLINE).await;
    // … and in the audit log, with the counts.
    let data_dir = d.data_dir.to_string_lossy().into_owned();
    let config = d.config_path.to_string_lossy().into_owned();
    let audit = d
        .cli(&[
            "audit",
            "--json",
            "--data-dir",
            &data_dir,
            "--config",
            &config,
        ])
        .await;
    let audit = String::from_utf8_lossy(&audit.stdout);
    assert!(
        audit.contains("data_loss_accepted") && audit.contains("missing"),
        "no data_loss_accepted audit record: {audit}"
    );
    d.args.clear();
    d.restart().await;
    let keys = d.user_key_counts().await;
    assert_eq!(keys.get("after"), Some(&1), "{keys:?}");
    d.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_wal_is_detected() {
    let mut d = acked_then_killed(20).await;
    let wal = wal_path(&d);
    let len = std::fs::metadata(&wal).expect("wal").len();
    // Keep the header and the first frames: SQLite replays a prefix and
    // says nothing.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&wal)
        .expect("open wal");
    f.set_len(len / 3).expect("truncate");
    drop(f);
    assert_loss_detected(&mut d).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intact_store_after_sigkill_starts_clean() {
    // The control: the same steps without damage never report a loss.
    let mut d = acked_then_killed(20).await;
    d.restart().await;
    assert!(
        !d.stderr_boot().contains("data_loss_detected"),
        "a false alarm:\n{}",
        common::tail(&d.stderr_boot(), 20)
    );
    let out = d.status_json().await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(v["commits"]["missing"], 0, "{v}");
    assert_eq!(d.user_key_counts().await.len(), 20);
}
