//! C4 power loss and F2 I/O errors through keel's SQLite VFS shim
//! (`KEEL_TORTURE_STORAGE`, actors/src/persistence/faultfs.rs), on the real
//! binary:
//!
//! - `power-loss:N:DIR`: the crash image holds every message acknowledged
//!   before the power went, and keel starts on it ready;
//! - the same check with `[storage] synchronous = "normal"` (WAL commits not
//!   synced) MUST find acknowledged messages missing from the image: the
//!   images really keep only what was synced;
//! - `fail-sync:N` once: that request is not acknowledged (5xx), the
//!   connection is reopened and a later request is; `forever`: nothing is
//!   acknowledged after the fault and `/readyz` turns 503. After a restart
//!   without the fault every acknowledged message is there.

// Tests drive real processes in real time: clippy.toml's clock and env rules are for keel itself.
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use common::{poll_until, Config, Daemon};
use serde_json::json;

const ENV: &str = "KEEL_TORTURE_STORAGE";
/// How long keel may take to react to a fault.
const FAULT_DEADLINE: Duration = Duration::from_secs(30);

fn config(synchronous: &str) -> Config {
    Config {
        secret: Some("storage-faults-secret".into()),
        extra: format!("[storage]\nsynchronous = \"{synchronous}\"\n"),
        ..Config::default()
    }
}

/// A store created by a clean start and stop, so that the fault's N counts
/// from a start on an existing store.
async fn made_store(synchronous: &str) -> Daemon {
    let mut d = Daemon::new(config(synchronous), None);
    d.boot().await;
    assert!(d.sigterm(FAULT_DEADLINE).await.success());
    d
}

/// POST one message; the status code, `None` when keel did not answer.
async fn post(d: &Daemon, id: &str) -> Option<u16> {
    let msg = json!({"id": id, "chat": "faults", "from": "tester", "text": format!("hello {id}")});
    d.post_message(&msg).await.ok().map(|r| r.status)
}

/// Every user turn's key keel reports.
async fn present_keys(d: &Daemon) -> HashSet<String> {
    let mut keys = HashSet::new();
    for s in d.session_ids().await {
        for t in d.turns(&s).await {
            if t.role == "user" {
                keys.extend(t.key);
            }
        }
    }
    keys
}

/// keel with `power-loss:N:<image>`: up to `max` messages posted one by
/// one until keel dies (or, if it has not, SIGKILLed: the image is what was
/// synced so far). Returns the acknowledged ids, whether the shim cut the
/// power, and the keys present when keel is started on the image.
async fn power_loss(synchronous: &str, n: u64, max: usize) -> (Vec<String>, bool, HashSet<String>) {
    let mut d = made_store(synchronous).await;
    let image = d.root().join("image");
    d.env
        .push((ENV.into(), format!("power-loss:{n}:{}", image.display())));
    d.restart().await;
    assert!(
        d.stderr_boot()
            .contains("storage faults injected: power-loss"),
        "no WARN line naming the injected fault:\n{}",
        d.stderr_boot()
    );
    let mut acked = Vec::new();
    for i in 0..max {
        let id = format!("pl-{i}");
        match post(&d, &id).await {
            Some(200) => acked.push(id),
            Some(_) => {}
            None => break,
        }
    }
    let cut = image.join("POWER_LOST").exists();
    d.sigkill();
    assert_no_shm(&image);
    let mut on_image = Daemon::new(config(synchronous), Some(image.clone()));
    on_image.boot().await;
    let ready = on_image.readyz().await.expect("readyz");
    assert_eq!(ready.status, 200, "{}", ready.body);
    let present = present_keys(&on_image).await;
    assert!(
        !on_image.stderr_all().contains("data_loss_detected"),
        "{}",
        on_image.stderr_all()
    );
    on_image.sigkill();
    (acked, cut, present)
}

/// SQLite rebuilds `-shm`; the image has none.
fn assert_no_shm(image: &Path) {
    assert!(!image.join("keel.db-shm").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_loss_image_holds_every_acknowledged_message() {
    let (acked, cut, present) = power_loss("full", 12, 200).await;
    assert!(cut, "the 12th sync never came");
    assert!(
        acked.len() >= 3,
        "only {} messages acknowledged",
        acked.len()
    );
    let missing: Vec<_> = acked.iter().filter(|id| !present.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "acknowledged but not in the image: {missing:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_unsynced_commits_the_image_misses_acknowledged_messages() {
    // synchronous = normal: WAL commits are not synced, so nothing of the
    // load reaches the image; the power is cut by SIGKILL after 20 messages.
    let (acked, cut, present) = power_loss("normal", 1_000_000, 20).await;
    assert!(!cut);
    assert_eq!(acked.len(), 20, "every message is acknowledged");
    let missing = acked.iter().filter(|id| !present.contains(*id)).count();
    assert!(
        missing > 0,
        "the image holds all {} acknowledged messages although none was synced",
        acked.len()
    );
}

/// keel with `spec` on an existing store; messages posted one at a time.
/// Returns the daemon and the (id, status) of every post.
async fn under_fault(spec: &str, posts: usize) -> (Daemon, Vec<(String, Option<u16>)>) {
    let mut d = made_store("full").await;
    d.env.push((ENV.into(), spec.into()));
    d.restart().await;
    let mut answers = Vec::new();
    for i in 0..posts {
        let id = format!("io-{i}");
        let code = post(&d, &id).await;
        answers.push((id, code));
    }
    (d, answers)
}

/// Restart without the fault: every acknowledged id is there.
async fn assert_acked_present(mut d: Daemon, answers: &[(String, Option<u16>)]) {
    d.sigkill();
    d.env.clear();
    d.restart().await;
    let present = present_keys(&d).await;
    let missing: Vec<_> = answers
        .iter()
        .filter(|(id, code)| *code == Some(200) && !present.contains(id))
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged, then missing: {missing:?}"
    );
    d.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_sync_is_not_acknowledged_and_a_later_request_is() {
    let (d, answers) = under_fault("fail-sync:12", 30).await;
    let log = d.stderr_boot();
    assert_eq!(
        log.matches("keel storage fault: fail-sync 12 injected")
            .count(),
        1,
        "{log}"
    );
    let failed = answers
        .iter()
        .position(|(_, c)| *c != Some(200))
        .unwrap_or_else(|| panic!("every request was acknowledged: {answers:?}"));
    let code = answers[failed].1;
    assert!(
        code.is_some_and(|c| c >= 500),
        "the failed batch answered {code:?}"
    );
    assert!(
        answers[failed + 1..].iter().any(|(_, c)| *c == Some(200)),
        "nothing acknowledged after the failed sync: {answers:?}"
    );
    // The connection that saw the failure was not reused.
    assert!(log.contains("reopened database"), "{log}");
    assert_acked_present(d, &answers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_syncs_failing_forever_nothing_is_acknowledged_and_readyz_is_503() {
    let (d, answers) = under_fault("fail-sync:12:forever", 20).await;
    let failed = answers
        .iter()
        .position(|(_, c)| *c != Some(200))
        .unwrap_or_else(|| panic!("every request was acknowledged: {answers:?}"));
    let after: Vec<_> = answers[failed..]
        .iter()
        .filter(|(_, c)| *c == Some(200))
        .collect();
    assert!(after.is_empty(), "acknowledged after the fault: {after:?}");
    let r = poll_until(FAULT_DEADLINE, || async {
        d.readyz().await.ok().filter(|r| r.status == 503)
    })
    .await;
    assert!(r.is_some(), "/readyz never answered 503 under the fault");
    assert_acked_present(d, &answers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_storage_fault_spec_is_a_one_line_error() {
    let mut d = Daemon::new(config("full"), None);
    d.env.push((ENV.into(), "fail-sync:zero".into()));
    d.spawn();
    let status = d.wait_exit(FAULT_DEADLINE).await.expect("keel exits");
    assert!(!status.success());
    let err = d.stderr_all();
    let line = err
        .lines()
        .find(|l| l.contains(ENV))
        .unwrap_or_else(|| panic!("no error naming {ENV}: {err}"));
    assert!(line.starts_with("keel: error:"), "{line}");
}
