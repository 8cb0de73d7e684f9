//! Container tasks (`[task.NAME] kind = "container"`) on a real engine:
//! the task runs as a container labelled `keel.kind=task`, `keel.task=<id>`;
//! when keel is killed (10 times while it runs) the container keeps running
//! and every restart re-attaches it — its output is stored once, in order,
//! its exit code collected — instead of marking it INTERRUPTED; cancel and
//! timeout stop the container; finished containers are removed.

#![allow(clippy::disallowed_methods)]

mod common;
#[path = "common/docker.rs"]
mod docker;

use std::process::Output;
use std::time::Duration;

use common::{poll_until, Config, Daemon};
use docker::{docker_or_skip, Instance, IMAGE};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(90);

fn daemon(inst: &Instance) -> Daemon {
    let d = Daemon::new(Config::default(), None);
    let tasks = format!(
        "\n[tasks]\nlog_flush_ms = 50\ngrace_ms = 1000\n\
         \n[task.count]\nkind = \"container\"\nimage = {IMAGE:?}\n\
         command = [\"sh\", \"-c\", \"i=1; while [ $i -le 40 ]; do echo line $i; echo err $i >&2; echo more $i; i=$((i+1)); sleep 0.25; done; exit 3\"]\n\
         \n[task.forever]\nkind = \"container\"\nimage = {IMAGE:?}\ncommand = [\"sleep\", \"3600\"]\n\
         \n[task.slow]\nkind = \"container\"\nimage = {IMAGE:?}\ncommand = [\"sleep\", \"3600\"]\ntimeout_s = 1\n"
    );
    d.write_config_text(&format!("{}{}{tasks}", d.config.to_toml(), inst.toml(30)));
    d
}

async fn keel(d: &Daemon, args: &[&str]) -> Output {
    d.cli_here(args, &[]).await
}

async fn run_task(d: &Daemon, name: &str) -> i64 {
    let o = keel(d, &["tasks", "run", name]).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    out.split_whitespace()
        .find_map(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no task id in {out:?}"))
}

async fn show(d: &Daemon, id: i64) -> Value {
    let o = keel(d, &["tasks", "show", &id.to_string(), "--json"]).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

async fn logs_of(d: &Daemon, id: i64, stream: &str) -> String {
    let o = keel(d, &["tasks", "logs", &id.to_string(), "--stream", stream]).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).to_string()
}

async fn wait_state(d: &Daemon, id: i64, done: &[&str]) -> Value {
    poll_until(DEADLINE, || async {
        let t = show(d, id).await;
        done.iter().any(|s| t["state"] == *s).then_some(t)
    })
    .await
    .unwrap_or_else(|| panic!("task {id} not in {done:?}"))
}

fn task_containers(engine: &docker::Engine, inst: &Instance, id: i64) -> Vec<Value> {
    let want = id.to_string();
    engine
        .containers(&inst.id)
        .into_iter()
        .filter(|c| c["Labels"]["keel.task"].as_str() == Some(want.as_str()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_task_survives_ten_kill_9s_and_is_re_attached_each_time() {
    use rand::Rng;
    let Some(engine) = docker_or_skip("container_task_reattach") else {
        return;
    };
    let seed = common::Seed::from_env("container_task_reattach");
    let mut rng = seed.rng();
    let inst = Instance::new(engine, "ctask");
    let mut d = daemon(&inst);
    d.boot().await;
    let id = run_task(&d, "count").await;
    wait_state(&d, id, &["RUNNING"]).await;
    let c = poll_until(DEADLINE, || async {
        task_containers(engine, &inst, id).into_iter().next()
    })
    .await
    .expect("task container");
    assert_eq!(c["Labels"]["keel.kind"], "task");
    assert_eq!(c["Names"][0], format!("/keel-{}-task-count-{id}", inst.id));
    let mut cycles = 0;
    while cycles < 10 {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(100..500))).await;
        d.sigkill();
        cycles += 1;
        // The container outlives keel.
        let alive = task_containers(engine, &inst, id);
        assert_eq!(alive.len(), 1, "cycle {cycles}: {alive:?}");
        d.restart().await;
        let t = show(&d, id).await;
        if t["state"] != "RUNNING" {
            break;
        }
    }
    assert!(
        cycles >= 10,
        "the task ended after {cycles} kills (too fast)"
    );
    let t = wait_state(&d, id, &["SUCCEEDED", "FAILED", "INTERRUPTED"]).await;
    assert_eq!(t["state"], "FAILED", "{t}");
    assert_eq!(t["exit_code"], 3, "{t}");
    let states: Vec<String> = t["states"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["state"].as_str().unwrap().to_string())
        .collect();
    assert!(!states.contains(&"INTERRUPTED".to_string()), "{states:?}");
    let reattached = t["states"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["detail"].as_str().unwrap_or("").contains("re-attached"))
        .count();
    assert!(reattached >= 10, "re-attached {reattached} times: {t}");
    // Every line of each stream exactly once, in order (the streams are
    // read from two pipes: a kill can find one stored further than the
    // other).
    let out = logs_of(&d, id, "stdout").await;
    let want: String = (1..=40).map(|i| format!("line {i}\nmore {i}\n")).collect();
    assert_eq!(out, want);
    let err = logs_of(&d, id, "stderr").await;
    let want: String = (1..=40).map(|i| format!("err {i}\n")).collect();
    assert_eq!(err, want);
    // Resumed by the engine's timestamps, not a byte count: the stored
    // batches carry resume points "<RFC3339Nano> <n> <skip>" per stream.
    let conn = common::open_db(&d.db_path());
    let last: String = conn
        .query_row(
            "SELECT resume FROM log_fragments WHERE task_id = ?1 AND resume IS NOT NULL
             ORDER BY seq DESC LIMIT 1",
            [id],
            |r| r.get(0),
        )
        .expect("a resume point stored");
    let fields: Vec<&str> = last.split(' ').collect();
    assert_eq!(fields.len(), 6, "{last}");
    for ts in [fields[0], fields[3]] {
        assert!(
            ts.ends_with('Z') && ts.contains('T') && ts.contains('.'),
            "{last}"
        );
    }
    let gone = poll_until(DEADLINE, || async {
        task_containers(engine, &inst, id).is_empty().then_some(())
    })
    .await;
    assert!(gone.is_some(), "finished container removed");
    d.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_timeout_stop_the_container() {
    let Some(engine) = docker_or_skip("container_task_cancel") else {
        return;
    };
    let inst = Instance::new(engine, "ccancel");
    let mut d = daemon(&inst);
    d.boot().await;
    let id = run_task(&d, "forever").await;
    wait_state(&d, id, &["RUNNING"]).await;
    poll_until(DEADLINE, || async {
        task_containers(engine, &inst, id)
            .iter()
            .any(|c| c["State"] == "running")
            .then_some(())
    })
    .await
    .expect("running container");
    let o = keel(&d, &["tasks", "cancel", &id.to_string()]).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t = wait_state(&d, id, &["CANCELLED", "FAILED", "SUCCEEDED"]).await;
    assert_eq!(t["state"], "CANCELLED", "{t}");
    let gone = poll_until(DEADLINE, || async {
        task_containers(engine, &inst, id).is_empty().then_some(())
    })
    .await;
    assert!(gone.is_some(), "cancelled container removed");

    let id = run_task(&d, "slow").await;
    let t = wait_state(&d, id, &["TIMED_OUT", "FAILED", "SUCCEEDED", "CANCELLED"]).await;
    assert_eq!(t["state"], "TIMED_OUT", "{t}");
    let gone = poll_until(DEADLINE, || async {
        task_containers(engine, &inst, id).is_empty().then_some(())
    })
    .await;
    assert!(gone.is_some(), "timed-out container removed");
    d.assert_no_panics();
}
