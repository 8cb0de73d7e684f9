//! Issue 13 through the real binary on SQLite: `keel run` registers its
//! instance (boot epoch), heartbeats it, and marks it gone on a clean stop;
//! `keel status --json` lists it under `instances`.

mod common;
#[path = "common/docker.rs"]
mod docker;

use std::time::Duration;

use common::{Config, Daemon};
use serde_json::Value;

async fn status(d: &Daemon) -> Value {
    let out = d.status_json().await;
    assert!(
        out.status.success(),
        "status exited {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status --json is JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_registers_heartbeats_and_leaves_its_instance() {
    let mut d = Daemon::start(Config::default()).await;
    let first = status(&d).await;
    let inst = first["instances"].as_array().expect("instances array");
    assert_eq!(inst.len(), 1, "{first}");
    assert_eq!(inst[0]["epoch"], 1, "{first}");
    let hb0 = inst[0]["heartbeat_ms"].as_i64().expect("heartbeat_ms");
    assert!(
        inst[0]["expires_ms"].as_i64().expect("expires_ms") > hb0,
        "{first}"
    );
    assert!(first["leases"].is_array(), "{first}");
    // The heartbeat moves (renewed every 2 s).
    let moved = common::poll_until(Duration::from_secs(10), || async {
        let v = status(&d).await;
        let hb = v["instances"][0]["heartbeat_ms"].as_i64()?;
        (hb > hb0).then_some(v)
    })
    .await;
    assert!(moved.is_some(), "heartbeat did not advance within 10 s");
    // A clean stop marks the instance gone: its life ended at its last write.
    let exit = d.sigterm(Duration::from_secs(20)).await;
    assert!(exit.success(), "{exit}");
    let v = status(&d).await;
    let i = &v["instances"][0];
    // Alive, the expiry is always the last heartbeat plus the 6 s lease; a
    // clean stop pulls it in to the moment of the stop.
    let alive = &moved.expect("moved")["instances"][0];
    assert_eq!(
        alive["expires_ms"].as_i64().unwrap() - alive["heartbeat_ms"].as_i64().unwrap(),
        6_000,
        "{alive}"
    );
    let left = i["expires_ms"].as_i64().unwrap() - i["heartbeat_ms"].as_i64().unwrap();
    assert!((0..6_000).contains(&left), "not marked gone: {v}");
    // A restart is the next boot epoch of the same id.
    d.restart().await;
    let v = status(&d).await;
    assert_eq!(v["instances"].as_array().map(|a| a.len()), Some(1), "{v}");
    assert_eq!(v["instances"][0]["epoch"], 2, "{v}");
    assert_eq!(v["instances"][0]["id"], i["id"], "{v}");
    d.assert_no_panics();
}

/// With `[containers]` on, the reconciler runs under lease
/// `reconciler:<containers instance id>`, held by `<instance>#<epoch>`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_lists_the_reconciler_lease_held_by_this_instance() {
    let Some(engine) = docker::docker_or_skip("cluster_reconciler_lease") else {
        return;
    };
    let inst = docker::Instance::new(engine, "lease");
    let mut d = Daemon::new(Config::default(), None);
    d.write_config_text(&format!("{}{}", d.config.to_toml(), inst.toml(1)));
    d.boot().await;
    let v = status(&d).await;
    let i = &v["instances"][0];
    let holder = format!(
        "{}#{}",
        i["id"].as_str().expect("id"),
        i["epoch"].as_i64().expect("epoch")
    );
    let name = format!("reconciler:{}", inst.id);
    let lease = v["leases"]
        .as_array()
        .expect("leases")
        .iter()
        .find(|l| l["name"] == name.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("no lease {name}: {v}"));
    assert_eq!(lease["holder"], holder.as_str(), "{v}");
    assert_eq!(lease["token"], 1, "{v}");
    let exit = d.sigterm(Duration::from_secs(30)).await;
    assert!(exit.success(), "{exit}");
    // Released on a clean stop: expired, token kept.
    let v = status(&d).await;
    let l = v["leases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == name.as_str())
        .cloned()
        .unwrap();
    assert!(
        l["expires_ms"].as_i64() <= l["renewed_ms"].as_i64().map(|r| r + 2_000),
        "{v}"
    );
    d.assert_no_panics();
}
