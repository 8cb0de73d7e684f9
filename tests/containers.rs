//! Containers on a real Docker engine (R23–R27, R46): orphans reaped at
//! start and on SIGTERM (other instances untouched), services deployed,
//! adopted after a crash, killed for good, reconciled when the engine
//! drifts, verified (`keel verify`), refused specs, and a damaged event log.
//! The engine comes from `tests/common/docker.rs` (a private dockerd, or
//! the one `.ci/run` started).

#![allow(clippy::disallowed_methods)]

mod common;
#[path = "common/docker.rs"]
mod docker;

use std::process::Output;
use std::time::Duration;

use common::{poll_until, Config, Daemon};
use docker::{docker_or_skip, Instance, IMAGE};
use serde_json::{json, Value};

const DEADLINE: Duration = Duration::from_secs(60);

/// A daemon whose config adds `[containers]` for `inst` (not started).
fn daemon(inst: &Instance, config: Config, interval_s: u64, extra: &str) -> Daemon {
    let d = Daemon::new(config, None);
    d.write_config_text(&format!(
        "{}{}{extra}",
        d.config.to_toml(),
        inst.toml(interval_s)
    ));
    d
}

/// `keel ARGS… --data-dir D --config C [-- TAIL…]`.
async fn keel(d: &Daemon, args: &[&str], tail: &[&str]) -> Output {
    d.cli_here(args, tail).await
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

async fn list(d: &Daemon) -> Value {
    let o = keel(d, &["services", "list", "--json"], &[]).await;
    assert!(o.status.success(), "services list: {}", stderr(&o));
    serde_json::from_slice(&o.stdout).expect("services list json")
}

async fn verify(d: &Daemon) -> (i32, Value) {
    let o = keel(d, &["verify", "--json"], &[]).await;
    let v: Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|_| panic!("verify json: {} / {}", stdout(&o), stderr(&o)));
    (o.status.code().unwrap_or(-1), v)
}

async fn status_containers(d: &Daemon) -> Value {
    let o = d.status_json().await;
    assert!(o.status.success(), "status: {}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).expect("status json");
    v["containers"].clone()
}

fn service_names(engine: &docker::Engine, inst: &Instance, service: &str) -> Vec<(String, String)> {
    engine
        .containers(&inst.id)
        .iter()
        .filter(|c| c["Labels"]["keel.service"] == service)
        .map(|c| {
            (
                c["Names"][0]
                    .as_str()
                    .unwrap_or("")
                    .trim_start_matches('/')
                    .to_string(),
                c["State"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_are_reaped_at_start_and_on_sigterm_and_other_instances_are_never_touched() {
    let Some(engine) = docker_or_skip("orphans_are_reaped") else {
        return;
    };
    let inst = Instance::new(engine, "reap");
    let other = Instance::new(engine, "other");
    // Left from an earlier run of this instance: two ephemeral containers
    // (one running, one stopped) and two task containers whose tasks are not
    // RUNNING (no such task rows): all reaped. Another instance's ephemeral
    // container must stay. (A RUNNING task's container is re-attached, not
    // reaped: tests/container_tasks.rs.)
    let orphan = format!("keel-{}-ephemeral-job-1", inst.id);
    let stopped = format!("keel-{}-ephemeral-job-2", inst.id);
    let foreign = format!("keel-{}-ephemeral-job-1", other.id);
    let task = format!("keel-{}-task-backup-7", inst.id);
    // A task container whose task does not exist (ended, pruned): reaped.
    let done_task = format!("keel-{}-task-backup-8", inst.id);
    engine.plant(&orphan, inst.labels("ephemeral", &[]), true);
    engine.plant(&stopped, inst.labels("ephemeral", &[]), false);
    engine.plant(&foreign, other.labels("ephemeral", &[]), true);
    engine.plant(&task, inst.labels("task", &[("keel.task", "7")]), true);
    engine.plant(&done_task, inst.labels("task", &[("keel.task", "8")]), true);

    let mut d = daemon(
        &inst,
        Config {
            owner_chat: Some("owner".into()),
            ..Default::default()
        },
        30,
        "",
    );
    d.boot().await;
    assert!(
        engine.names(&inst.id).is_empty(),
        "{:?}",
        engine.names(&inst.id)
    );
    assert_eq!(
        engine.names(&other.id).len(),
        1,
        "the other instance's container stays"
    );
    let c = status_containers(&d).await;
    assert_eq!(c["reaped_at_start"], 4, "{c}");
    assert_eq!(c["state"], "ok", "{c}");
    let notice = poll_until(DEADLINE, || async {
        d.turns("webhook:owner")
            .await
            .into_iter()
            .find(|t| t.text.contains("keel restarted"))
    })
    .await
    .expect("owner notice");
    assert!(
        notice.text.contains("Containers reaped: 4"),
        "{}",
        notice.text
    );
    let ready = d.readyz().await.unwrap();
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["containers"]["status"], "ok", "{}", ready.body);

    // While keel runs, another ephemeral container appears (as one keel
    // made would); SIGTERM stops and removes it.
    let later = format!("keel-{}-ephemeral-job-3", inst.id);
    engine.plant(&later, inst.labels("ephemeral", &[]), true);
    let status = d.sigterm(DEADLINE).await;
    assert!(status.success(), "exit {status:?}");
    assert!(engine.names(&inst.id).is_empty());
    assert_eq!(engine.names(&other.id).len(), 1);
    d.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_are_deployed_adopted_after_a_crash_replaced_killed_for_good_and_verified() {
    let Some(engine) = docker_or_skip("services") else {
        return;
    };
    let inst = Instance::new(engine, "svc");
    let mut d = daemon(&inst, Config::default(), 30, "");
    d.boot().await;

    let o = keel(
        &d,
        &[
            "services", "deploy", "web", "--image", IMAGE, "--env", "A=1", "--label", "team=x",
            "--memory", "64m",
        ],
        &["sleep", "3600"],
    )
    .await;
    assert!(o.status.success(), "deploy: {}", stderr(&o));
    assert!(
        stdout(&o).contains("service web deployed"),
        "{}",
        stdout(&o)
    );
    let l = list(&d).await;
    let web = &l["services"][0];
    assert_eq!(web["name"], "web");
    assert_eq!(web["state"], "running", "{l}");
    let id = web["container_id"].as_str().unwrap().to_string();
    let c = engine.inspect(&id).expect("container exists");
    assert_eq!(c["Config"]["Labels"]["keel.kind"], "service");
    assert_eq!(c["Config"]["Labels"]["keel.service"], "web");
    assert_eq!(c["Config"]["Labels"]["keel.spec"], web["spec_hash"]);
    assert_eq!(c["Config"]["Labels"]["team"], "x");
    assert_eq!(c["HostConfig"]["NetworkMode"], "none");
    assert_eq!(c["HostConfig"]["Memory"], 64 << 20);
    assert!(c["Config"]["Env"]
        .as_array()
        .unwrap()
        .contains(&json!("A=1")));
    assert_eq!(c["Name"], format!("/keel-{}-service-web-1", inst.id));

    // The same over HTTP.
    let r = common::send(d.client.post(d.url("/v1/services")).json(&json!({
        "name": "db", "image": IMAGE, "command": ["sleep", "3600"],
    })))
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let r = common::send(d.client.get(d.url("/v1/services")))
        .await
        .unwrap();
    assert_eq!(
        r.json()["services"].as_array().unwrap().len(),
        2,
        "{}",
        r.body
    );

    // Crash: the containers keep running and are adopted, not recreated.
    d.sigkill();
    d.restart().await;
    let l = list(&d).await;
    assert_eq!(l["services"][1]["name"], "web", "{l}");
    assert_eq!(l["services"][1]["container_id"], json!(id), "adopted: {l}");
    assert_eq!(service_names(engine, &inst, "web").len(), 1);
    let (code, v) = verify(&d).await;
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["chain_ok"], true);
    // The console agrees: desired and actual spec match, no drift.
    let stats = d.get("/v1/stats").await.unwrap().json();
    assert_eq!(stats["services_engine"], "ok", "{stats}");
    let rows = stats["services"].as_array().expect("services rows");
    assert_eq!(rows.len(), 2, "{stats}");
    for r in rows {
        assert_eq!(r["drift"], "none", "{r}");
        assert_eq!(r["state"], "running", "{r}");
        assert_eq!(r["actual_spec_hash"], r["spec_hash"], "{r}");
    }

    // A new spec replaces the container (new name, old one gone).
    let o = keel(
        &d,
        &["services", "deploy", "web", "--image", IMAGE],
        &["sleep", "1234"],
    )
    .await;
    assert!(o.status.success(), "redeploy: {}", stderr(&o));
    let names = service_names(engine, &inst, "web");
    assert_eq!(names.len(), 1, "{names:?}");
    assert_ne!(names[0].0, format!("keel-{}-service-web-1", inst.id));
    assert_eq!(names[0].1, "running");
    // An identical redeploy changes nothing.
    let o = keel(
        &d,
        &["services", "deploy", "web", "--image", IMAGE],
        &["sleep", "1234"],
    )
    .await;
    assert!(stdout(&o).contains("unchanged"), "{}", stdout(&o));

    // Kill: removed, and it stays dead across a restart and a reconcile.
    let o = keel(&d, &["services", "kill", "web"], &[]).await;
    assert!(o.status.success(), "kill: {}", stderr(&o));
    assert!(service_names(engine, &inst, "web").is_empty());
    let r = common::send(d.client.delete(d.url("/v1/services/db")))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let r = common::send(d.client.delete(d.url("/v1/services/nope")))
        .await
        .unwrap();
    assert_eq!(r.status, 404, "{}", r.body);
    d.sigkill();
    d.restart().await;
    assert!(
        engine.names(&inst.id).is_empty(),
        "killed services stay dead"
    );
    let l = list(&d).await;
    assert!(
        l["services"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["state"] == "killed"),
        "{l}"
    );
    let (code, v) = verify(&d).await;
    assert_eq!(code, 0, "{v}");

    // Offline verify (keel stopped) reads the store and the engine.
    assert!(d.sigterm(DEADLINE).await.success());
    let (code, v) = verify(&d).await;
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["consistent"], true);

    // Each decision is in the audit log too (R31): names, never the spec.
    let o = keel(&d, &["audit", "--json"], &[]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let audit: Value = serde_json::from_slice(&o.stdout).expect("audit json");
    let of = |kind: &str| -> Vec<Value> {
        audit["records"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["kind"] == kind)
            .map(|r| r["detail"]["name"].clone())
            .collect()
    };
    assert!(
        of("service_deployed").contains(&Value::from("web")),
        "{audit}"
    );
    assert!(
        of("service_killed").contains(&Value::from("web")),
        "{audit}"
    );
    assert!(
        !audit.to_string().contains("sleep"),
        "spec leaked into the audit log"
    );
    let o = keel(&d, &["audit", "--verify"], &[]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    d.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_specs_name_the_field_and_store_nothing() {
    let Some(engine) = docker_or_skip("refused_specs") else {
        return;
    };
    let inst = Instance::new(engine, "spec");
    let mut d = daemon(&inst, Config::default(), 30, "");
    d.boot().await;
    let socket = engine.socket.display().to_string();
    for (body, field) in [
        (
            json!({"name": "x", "image": IMAGE, "privileged": true}),
            "privileged",
        ),
        (
            json!({"name": "x", "image": IMAGE, "network_mode": "host"}),
            "network_mode",
        ),
        (
            json!({"name": "x", "image": IMAGE, "pid_mode": "host"}),
            "pid_mode",
        ),
        (
            json!({"name": "x", "image": IMAGE, "cap_add": ["SYS_ADMIN"]}),
            "cap_add",
        ),
        (
            json!({"name": "x", "image": IMAGE, "devices": ["/dev/sda"]}),
            "devices",
        ),
        (
            json!({"name": "x", "image": IMAGE, "mounts": ["/:/host"]}),
            "mounts",
        ),
        (
            json!({"name": "x", "image": IMAGE, "mounts": [format!("{socket}:/s")]}),
            "mounts",
        ),
        (
            json!({"name": "x", "image": IMAGE, "mounts": [format!("{}:/d", d.data_dir.display())]}),
            "mounts",
        ),
        (json!({"name": "x", "image": "Not An Image"}), "image"),
        (
            json!({"name": "x", "image": IMAGE, "memory": "-1m"}),
            "memory",
        ),
        (
            json!({"name": "x", "image": IMAGE, "env": {"A": "x\ny"}}),
            "env.A",
        ),
        (
            json!({"name": "x", "image": IMAGE, "labels": {"keel.managed": "no"}}),
            "labels.keel.managed",
        ),
        (json!({"name": "../x", "image": IMAGE}), "name"),
    ] {
        let r = common::send(d.client.post(d.url("/v1/services")).json(&body))
            .await
            .unwrap();
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        let e = r.json()["error"].as_str().unwrap_or("").to_string();
        assert!(e.starts_with(&format!("{field}:")), "{body}: {e}");
    }
    let r = common::send(d.client.post(d.url("/v1/services")).json(&json!({
        "name": "x", "image": "localhost/does-not-exist:1"
    })))
    .await
    .unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.body.contains("not found on the container engine"),
        "{}",
        r.body
    );
    // The CLI: exit 2 and the field named.
    let o = keel(
        &d,
        &[
            "services",
            "deploy",
            "x",
            "--image",
            IMAGE,
            "--label",
            "keel.kind=task",
        ],
        &[],
    )
    .await;
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("labels.keel.kind"), "{}", stderr(&o));
    let o = keel(&d, &["services", "kill", "ghost"], &[]).await;
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let l = list(&d).await;
    assert_eq!(l["services"], json!([]), "nothing stored: {l}");
    assert!(engine.names(&inst.id).is_empty());
    d.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconcile_loop_repairs_drift_and_a_409_is_resolved_by_inspect() {
    let Some(engine) = docker_or_skip("reconcile") else {
        return;
    };
    let inst = Instance::new(engine, "drift");
    // A container with the name keel will give the first deploy (a create
    // from a run that crashed before recording it elsewhere): the deploy
    // meets 409, inspects it and takes it instead of making a duplicate.
    let mut d = daemon(&inst, Config::default(), 2, "");
    d.boot().await;
    let spec_hash = {
        // Ask keel for the hash by deploying a throwaway name first.
        let r = common::send(d.client.post(d.url("/v1/services")).json(&json!({
            "name": "probe", "image": IMAGE, "command": ["sleep", "3600"],
        })))
        .await
        .unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["spec_hash"].as_str().unwrap().to_string()
    };
    let planted = format!("keel-{}-service-web-2", inst.id);
    engine.plant(
        &planted,
        inst.labels(
            "service",
            &[("keel.service", "web"), ("keel.spec", &spec_hash)],
        ),
        false,
    );
    let r = common::send(d.client.post(d.url("/v1/services")).json(&json!({
        "name": "web", "image": IMAGE, "command": ["sleep", "3600"],
    })))
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let names = service_names(engine, &inst, "web");
    assert_eq!(
        names,
        vec![(planted.clone(), "running".to_string())],
        "no duplicate"
    );

    // Drift behind keel's back: the container removed → recreated; an
    // extra managed service container → removed.
    engine.remove(&planted);
    let extra = format!("keel-{}-service-ghost-9", inst.id);
    engine.plant(
        &extra,
        inst.labels("service", &[("keel.service", "ghost"), ("keel.spec", "x")]),
        true,
    );
    let repaired = poll_until(DEADLINE, || async {
        let web = service_names(engine, &inst, "web");
        let ghost = service_names(engine, &inst, "ghost");
        (web.len() == 1 && web[0].1 == "running" && ghost.is_empty()).then_some(())
    })
    .await;
    assert!(
        repaired.is_some(),
        "not repaired: {:?}",
        engine.names(&inst.id)
    );
    let (code, v) = verify(&d).await;
    assert_eq!(code, 0, "{v}");
    let c = status_containers(&d).await;
    assert!(c["repairs"].as_u64().unwrap() >= 2, "{c}");
    let m = d.get("/metrics").await.unwrap().body;
    assert!(m.contains("keel_container_repairs_total"), "{m}");
    d.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_event_log_is_reported_and_never_replayed_past_the_damage() {
    let Some(engine) = docker_or_skip("damaged_log") else {
        return;
    };
    let inst = Instance::new(engine, "dmg");
    let mut d = daemon(&inst, Config::default(), 30, "");
    d.boot().await;
    for name in ["a", "b"] {
        let o = keel(
            &d,
            &["services", "deploy", name, "--image", IMAGE],
            &["sleep", "3600"],
        )
        .await;
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let o = keel(&d, &["services", "kill", "a"], &[]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(d.sigterm(DEADLINE).await.success());

    // Edit record 2 (the deploy of b) behind keel's back.
    {
        let c = common::open_db(&d.db_path());
        c.execute_batch(
            "DROP TRIGGER service_events_no_update;
             UPDATE service_events SET payload = replace(payload, 'sleep', 'sleeq') WHERE seq = 2;",
        )
        .unwrap();
    }
    let (code, v) = verify(&d).await;
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["chain_ok"], false);
    assert_eq!(v["log"]["valid"], 1, "{v}");
    assert!(
        v["log"]["damage"].as_str().unwrap().contains("record 2"),
        "{v}"
    );

    // keel starts (ready), says so, replays record 1 only: the kill of a
    // (record 3) lies past the damage and is not applied, nor is anything
    // new recorded on top of the damage.
    d.restart().await;
    let ready = d.readyz().await.unwrap();
    assert_eq!(ready.status, 200);
    assert_eq!(
        ready.json()["containers"]["status"],
        "degraded",
        "{}",
        ready.body
    );
    assert!(ready.body.contains("event log damaged"), "{}", ready.body);
    let c = status_containers(&d).await;
    assert_eq!(c["log"]["valid"], 1, "{c}");
    let o = keel(&d, &["services", "deploy", "c", "--image", IMAGE], &[]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("event log is damaged"),
        "{}",
        stderr(&o)
    );
    let (code, v) = verify(&d).await;
    assert_eq!(code, 1);
    assert_eq!(v["chain_ok"], false);
    assert!(d.stderr_all().contains("services event log damaged"));
    // Nothing is repaired on a damaged log, so the drift stays for the
    // console to show, as `keel verify` finds it: b's container runs but
    // nothing valid asks for it.
    let unexpected: Vec<&str> = v["unexpected"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(unexpected.iter().any(|c| c.contains("-service-b-")), "{v}");
    let stats = d.get("/v1/stats").await.unwrap().json();
    let rows = stats["services"].as_array().expect("services rows");
    for c in &unexpected {
        assert!(
            rows.iter().any(|r| r["container"] == *c
                && r["drift"] == "unexpected"
                && r["spec_hash"].is_null()),
            "{c} not shown unexpected: {stats}"
        );
    }
    for name in v["missing"].as_array().unwrap() {
        assert!(
            rows.iter()
                .any(|r| r["name"] == *name && r["drift"] == "missing"),
            "{name} not shown missing: {stats}"
        );
    }
    let a = rows
        .iter()
        .find(|r| r["name"] == "a" && !r["spec_hash"].is_null())
        .unwrap_or_else(|| panic!("a (desired by record 1) not shown: {stats}"));
    assert_ne!(a["drift"], "unexpected", "{stats}");
    d.assert_no_panics();
}

/// kill -9 during deploys, kills and reconciles, 10 cycles: no duplicate
/// containers, no orphan ephemeral ones, acknowledged deploys running,
/// acknowledged kills dead, and `keel verify` consistent at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_deploy_kill_and_reconcile_leaves_no_duplicates_or_orphans() {
    use rand::Rng;
    let Some(engine) = docker_or_skip("kill_9_cycles") else {
        return;
    };
    let seed = common::Seed::from_env("kill_9_cycles");
    let mut rng = seed.rng();
    let inst = Instance::new(engine, "k9");
    let mut d = daemon(&inst, Config::default(), 1, "");
    // name → Some(true) deployed and acknowledged, Some(false) killed and
    // acknowledged; absent or unknown outcomes are not checked.
    let mut acked: std::collections::BTreeMap<String, bool> = Default::default();
    let mut kill_tried: std::collections::BTreeSet<String> = Default::default();
    for cycle in 0..10 {
        d.boot().await;
        // Right after every start: no duplicates, no ephemeral orphans.
        let names = engine.names(&inst.id);
        assert!(
            names.iter().all(|(n, _)| !n.contains("-ephemeral-")),
            "cycle {cycle}: orphans {names:?}"
        );
        let mut per_service: std::collections::HashMap<String, usize> = Default::default();
        for c in engine.containers(&inst.id) {
            if let Some(s) = c["Labels"]["keel.service"].as_str() {
                *per_service.entry(s.to_string()).or_default() += 1;
            }
        }
        assert!(
            per_service.values().all(|n| *n <= 1),
            "cycle {cycle}: duplicates {per_service:?}"
        );
        // Plant an ephemeral container and some drift, then race a deploy
        // and a kill against SIGKILL.
        engine.plant(
            &format!("keel-{}-ephemeral-e-{cycle}", inst.id),
            inst.labels("ephemeral", &[]),
            true,
        );
        if let Some(victim) = engine
            .containers(&inst.id)
            .iter()
            .find(|c| c["Labels"]["keel.kind"] == "service")
        {
            engine.remove(victim["Id"].as_str().unwrap());
        }
        let name = format!("s{cycle}");
        let data_dir = d.data_dir.to_string_lossy().into_owned();
        let config = d.config_path.to_string_lossy().into_owned();
        let deploy = tokio::spawn({
            let (data_dir, config) = (data_dir.clone(), config.clone());
            let name = name.clone();
            async move {
                common::run_keel(
                    &[
                        "services",
                        "deploy",
                        &name,
                        "--image",
                        IMAGE,
                        "--data-dir",
                        &data_dir,
                        "--config",
                        &config,
                        "--",
                        "sleep",
                        "3600",
                    ],
                    None,
                    DEADLINE,
                )
                .await
            }
        });
        let kill = (cycle >= 2).then(|| {
            let victim = format!("s{}", cycle - 2);
            tokio::spawn(async move {
                let out = common::run_keel(
                    &[
                        "services",
                        "kill",
                        &victim,
                        "--data-dir",
                        &data_dir,
                        "--config",
                        &config,
                    ],
                    None,
                    DEADLINE,
                )
                .await;
                (victim, out)
            })
        });
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..400))).await;
        d.sigkill();
        let out = deploy.await.unwrap();
        if out.status.success() && stdout(&out).contains("deployed") {
            acked.insert(name, true);
        }
        if let Some(k) = kill {
            let (victim, out) = k.await.unwrap();
            kill_tried.insert(victim.clone());
            if out.status.success() {
                acked.insert(victim, false);
            }
        }
    }
    d.boot().await;
    let consistent = poll_until(DEADLINE, || async {
        let (code, v) = verify(&d).await;
        (code == 0).then_some(v)
    })
    .await;
    assert!(
        consistent.is_some(),
        "not consistent: {:?}",
        verify(&d).await
    );
    let l = list(&d).await;
    for (name, alive) in &acked {
        let s = l["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == json!(name))
            .unwrap_or_else(|| panic!("{name} lost: {l}"));
        if *alive && !kill_tried.contains(name) {
            assert_eq!(s["state"], "running", "{name}: {l}");
        }
        if !*alive {
            assert_eq!(s["state"], "killed", "{name}: {l}");
            assert!(
                service_names(engine, &inst, name).is_empty(),
                "{name} revived"
            );
        }
    }
    for (name, n) in l["services"].as_array().unwrap().iter().map(|s| {
        let name = s["name"].as_str().unwrap().to_string();
        let n = service_names(engine, &inst, &name).len();
        (name, n)
    }) {
        assert!(n <= 1, "{name}: {n} containers");
    }
    assert!(engine
        .names(&inst.id)
        .iter()
        .all(|(n, _)| !n.contains("-ephemeral-")));
    eprintln!(
        "kill_9 cycles: {} acknowledged operations, figures: {}",
        acked.len(),
        json!({"services": l["services"].as_array().unwrap().len()})
    );
    d.assert_no_panics();
}

/// SIGTERM keeps services running by default (adopted at the next start);
/// with `stop_services_on_shutdown = true` they are stopped and removed,
/// and the next start creates them again (they are still desired).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_survive_sigterm_unless_stop_services_on_shutdown() {
    let Some(engine) = docker_or_skip("stop_services_on_shutdown") else {
        return;
    };
    let inst = Instance::new(engine, "stop");
    let mut d = daemon(&inst, Config::default(), 30, "");
    d.boot().await;
    let o = keel(
        &d,
        &["services", "deploy", "web", "--image", IMAGE],
        &["sleep", "3600"],
    )
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    let id = list(&d).await["services"][0]["container_id"].clone();
    assert!(d.sigterm(DEADLINE).await.success());
    assert_eq!(service_names(engine, &inst, "web").len(), 1, "kept running");
    d.restart().await;
    assert_eq!(list(&d).await["services"][0]["container_id"], id, "adopted");
    assert!(d.sigterm(DEADLINE).await.success());

    d.write_config_text(&format!(
        "{}{}stop_services_on_shutdown = true\n",
        d.config.to_toml(),
        inst.toml(30)
    ));
    d.restart().await;
    assert!(d.sigterm(DEADLINE).await.success());
    assert!(
        service_names(engine, &inst, "web").is_empty(),
        "stopped and removed"
    );
    d.restart().await;
    let l = list(&d).await;
    assert_eq!(l["services"][0]["state"], "running", "created again: {l}");
    d.assert_no_panics();
}

/// `keel containers run ARGS… -- CMD…` in the background (its own deadline).
fn run_in_background(d: &Daemon, args: &[&str], tail: &[&str]) -> tokio::task::JoinHandle<Output> {
    let mut all: Vec<String> = vec![
        "containers".into(),
        "run".into(),
        "--image".into(),
        IMAGE.into(),
    ];
    all.extend(args.iter().map(|s| s.to_string()));
    all.extend([
        "--data-dir".into(),
        d.data_dir.to_string_lossy().into_owned(),
        "--config".into(),
        d.config_path.to_string_lossy().into_owned(),
        "--".into(),
    ]);
    all.extend(tail.iter().map(|s| s.to_string()));
    tokio::spawn(async move {
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        common::run_keel(&refs, None, DEADLINE).await
    })
}

/// The ephemeral containers of `inst` as (name, state, labels).
fn ephemerals(engine: &docker::Engine, inst: &Instance) -> Vec<(String, String, Value)> {
    engine
        .containers(&inst.id)
        .iter()
        .filter(|c| c["Labels"]["keel.kind"] == "ephemeral")
        .map(|c| {
            (
                c["Names"][0]
                    .as_str()
                    .unwrap_or("")
                    .trim_start_matches('/')
                    .to_string(),
                c["State"].as_str().unwrap_or("").to_string(),
                c["Labels"].clone(),
            )
        })
        .collect()
}

/// A one-off run: output and exit code come back, the container is gone
/// afterwards; a timeout kills it (exit 124); a refused spec names the
/// field; SIGTERM during a run stops and removes its container while a
/// deployed service keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_runs_return_their_output_and_sigterm_removes_them_but_not_services() {
    let Some(engine) = docker_or_skip("ephemeral_runs") else {
        return;
    };
    let inst = Instance::new(engine, "eph");
    let mut d = daemon(&inst, Config::default(), 30, "");
    d.boot().await;
    let o = keel(
        &d,
        &[
            "containers",
            "run",
            "--image",
            IMAGE,
            "--env",
            "GREETING=hello there",
            "--memory",
            "64m",
        ],
        &["sh", "-c", "echo \"$GREETING\"; echo oops >&2; exit 3"],
    )
    .await;
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert_eq!(stdout(&o), "hello there\n");
    assert!(stderr(&o).contains("oops"), "{}", stderr(&o));
    assert!(
        ephemerals(engine, &inst).is_empty(),
        "removed after the run"
    );

    // Over HTTP (`deploy` permission; loopback is open): the JSON result.
    let r = common::send(d.client.post(d.url("/v1/containers/run")).json(&json!({
        "image": IMAGE, "command": ["echo", "via http"], "name": "web-job", "timeout_s": 20
    })))
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["exit_code"], 0, "{v}");
    assert_eq!(v["stdout"], "via http\n", "{v}");
    let cname = v["container"].as_str().unwrap();
    assert!(
        cname.starts_with(&format!("keel-{}-ephemeral-web-job-", inst.id)),
        "{cname}"
    );
    for (body, field) in [
        (json!({"image": IMAGE, "privileged": true}), "privileged"),
        (json!({"image": IMAGE, "mounts": ["/:/host"]}), "mounts"),
        (
            json!({"image": IMAGE, "labels": {"keel.kind": "service"}}),
            "labels.keel.kind",
        ),
        (json!({"image": IMAGE, "timeout_s": 7200}), "timeout"),
    ] {
        let r = common::send(d.client.post(d.url("/v1/containers/run")).json(&body))
            .await
            .unwrap();
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        let e = r.json()["error"].as_str().unwrap_or("").to_string();
        assert!(e.starts_with(&format!("{field}:")), "{body}: {e}");
    }
    let o = keel(
        &d,
        &["containers", "run", "--image", "localhost/does-not-exist:1"],
        &["true"],
    )
    .await;
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("not found on the container engine"),
        "{}",
        stderr(&o)
    );

    // The timeout kills it.
    let o = keel(
        &d,
        &["containers", "run", "--image", IMAGE, "--timeout", "1s"],
        &["sleep", "60"],
    )
    .await;
    assert_eq!(o.status.code(), Some(124), "{}", stderr(&o));
    assert!(stderr(&o).contains("timed out"), "{}", stderr(&o));
    assert!(ephemerals(engine, &inst).is_empty());

    // A service and a long run; SIGTERM removes the run, keeps the service.
    let o = keel(
        &d,
        &["services", "deploy", "web", "--image", IMAGE],
        &["sleep", "3600"],
    )
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    let run = run_in_background(&d, &["--timeout", "10m"], &["sleep", "3600"]);
    let running = poll_until(DEADLINE, || async {
        ephemerals(engine, &inst)
            .into_iter()
            .find(|(_, state, _)| state == "running")
    })
    .await
    .expect("the run's container runs");
    assert_eq!(running.2["keel.managed"], "true");
    assert_eq!(running.2["keel.instance"], inst.id.as_str());
    assert!(running
        .0
        .starts_with(&format!("keel-{}-ephemeral-run-", inst.id)));
    let status = d.sigterm(DEADLINE).await;
    assert!(status.success(), "exit {status:?}");
    assert!(ephemerals(engine, &inst).is_empty(), "removed on SIGTERM");
    assert_eq!(
        service_names(engine, &inst, "web").len(),
        1,
        "the service keeps running"
    );
    let out = run.await.unwrap();
    assert!(
        !out.status.success(),
        "the interrupted run fails: {}",
        stderr(&out)
    );
    d.assert_no_panics();
}

/// kill -9 while ephemeral runs are in flight (3 cycles): the container
/// outlives keel, and the next start kills and removes it (counted in the
/// owner notice and `keel status`); another instance's container is never
/// touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_an_ephemeral_run_leaves_no_orphan_after_restart() {
    let Some(engine) = docker_or_skip("ephemeral_kill_9") else {
        return;
    };
    let inst = Instance::new(engine, "ek9");
    let other = Instance::new(engine, "ek9o");
    let foreign = format!("keel-{}-ephemeral-run-1", other.id);
    engine.plant(&foreign, other.labels("ephemeral", &[]), true);
    let mut d = daemon(
        &inst,
        Config {
            owner_chat: Some("owner".into()),
            owner_interval_s: Some(0),
            ..Default::default()
        },
        30,
        "",
    );
    d.boot().await;
    for cycle in 1..=3 {
        let run = run_in_background(&d, &["--timeout", "10m"], &["sleep", "3600"]);
        let left = poll_until(DEADLINE, || async {
            ephemerals(engine, &inst)
                .into_iter()
                .find(|(_, state, _)| state == "running")
        })
        .await
        .unwrap_or_else(|| panic!("cycle {cycle}: the run's container runs"));
        d.sigkill();
        let out = run.await.unwrap();
        assert!(!out.status.success(), "cycle {cycle}: {}", stderr(&out));
        assert_eq!(
            ephemerals(engine, &inst).len(),
            1,
            "cycle {cycle}: outlives keel ({})",
            left.0
        );
        d.boot().await;
        assert!(
            ephemerals(engine, &inst).is_empty(),
            "cycle {cycle}: reaped at start: {:?}",
            ephemerals(engine, &inst)
        );
        let c = status_containers(&d).await;
        assert_eq!(c["reaped_at_start"], 1, "cycle {cycle}: {c}");
        assert!(
            engine.inspect(&foreign).is_some(),
            "the other instance's stays"
        );
    }
    // The notice of the last start (#4; earlier ones may be coalesced).
    let notice = poll_until(DEADLINE, || async {
        d.turns("webhook:owner")
            .await
            .into_iter()
            .find(|t| t.text.contains("keel restarted") && t.text.contains("#4)"))
    })
    .await;
    let texts: Vec<String> = d
        .turns("webhook:owner")
        .await
        .into_iter()
        .map(|t| t.text)
        .collect();
    let notice = notice.unwrap_or_else(|| panic!("no owner notice of start #4: {texts:?}"));
    assert!(
        notice.text.contains("Containers reaped: 1"),
        "{}",
        notice.text
    );
    // A run after the restarts works and takes a fresh name.
    let o = keel(
        &d,
        &["containers", "run", "--image", IMAGE],
        &["echo", "ok"],
    )
    .await;
    assert_eq!(stdout(&o), "ok\n", "{}", stderr(&o));
    assert!(d.sigterm(DEADLINE).await.success());
    engine.remove(&foreign);
    d.assert_no_panics();
}

/// The engine named by `DOCKER_HOST` (no `docker_host` in the config), and
/// a `DOCKER_HOST` keel cannot use refused in one line rather than quietly
/// replaced by the standard socket. With a reconcile interval of an hour,
/// only the engine's events can trigger the repair of a container removed
/// behind keel's back. A container of the service's name running another
/// spec (planted while keel is stopped) is reported as drifted by `keel
/// verify` (exit 1) and replaced at the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_host_events_trigger_repairs_and_a_wrong_spec_is_reported_and_replaced() {
    let Some(engine) = docker_or_skip("docker_host_events_drift") else {
        return;
    };
    let inst = Instance::new(engine, "events");
    let mut d = Daemon::new(Config::default(), None);
    let section = format!(
        "\n[containers]\nenabled = true\ninstance = {:?}\nreconcile_interval_s = 3600\nrequest_timeout_ms = 5000\n",
        inst.id
    );
    d.write_config_text(&format!("{}{section}", d.config.to_toml()));

    let data_dir = d.data_dir.to_string_lossy().into_owned();
    let config = d.config_path.to_string_lossy().into_owned();
    let refused = common::run_keel_env(
        &["run", "--data-dir", &data_dir, "--config", &config],
        &[("DOCKER_HOST", "tcp://127.0.0.1:2375")],
        None,
        DEADLINE,
    )
    .await;
    assert!(!refused.status.success());
    let err = stderr(&refused);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("DOCKER_HOST names a tcp:// engine") && err.contains("Unix socket"),
        "{err}"
    );

    d.env
        .push(("DOCKER_HOST".into(), engine.host().to_string()));
    d.boot().await;
    let r = common::send(d.client.post(d.url("/v1/services")).json(&json!({
        "name": "web", "image": IMAGE, "command": ["sleep", "3600"],
    })))
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let hash = r.json()["spec_hash"].as_str().unwrap().to_string();
    let first = service_names(engine, &inst, "web");
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0].1, "running");

    // Removed behind keel's back: the engine's `destroy` event brings the
    // repair, an hour before the next periodic reconcile.
    engine.remove(&first[0].0);
    let repaired = poll_until(DEADLINE, || async {
        let web = service_names(engine, &inst, "web");
        (web.len() == 1 && web[0].1 == "running").then_some(web)
    })
    .await;
    assert!(
        repaired.is_some(),
        "no repair: {:?}",
        engine.names(&inst.id)
    );
    let c = status_containers(&d).await;
    assert!(c["repairs"].as_u64().unwrap() >= 1, "{c}");
    assert!(d.sigterm(DEADLINE).await.success());

    // Another spec under the service's name, planted while keel is stopped.
    let current = service_names(engine, &inst, "web");
    engine.remove(&current[0].0);
    let wrong = "0".repeat(64);
    engine.plant(
        &current[0].0,
        inst.labels("service", &[("keel.service", "web"), ("keel.spec", &wrong)]),
        true,
    );
    let o = common::run_keel_env(
        &[
            "verify",
            "--json",
            "--data-dir",
            &data_dir,
            "--config",
            &config,
        ],
        &[("DOCKER_HOST", &engine.host())],
        None,
        DEADLINE,
    )
    .await;
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).expect("verify json");
    assert_eq!(v["consistent"], false, "{v}");
    assert_eq!(v["drifted"], json!(["web"]), "{v}");
    assert_eq!(v["missing"], json!([]), "{v}");

    // The next start replaces it with a container of the logged spec.
    d.boot().await;
    let replaced = poll_until(DEADLINE, || async {
        let ok = engine.containers(&inst.id).iter().any(|c| {
            c["Labels"]["keel.service"] == "web"
                && c["Labels"]["keel.spec"] == hash.as_str()
                && c["State"] == "running"
        });
        let stale = engine
            .containers(&inst.id)
            .iter()
            .any(|c| c["Labels"]["keel.spec"] == wrong.as_str());
        (ok && !stale).then_some(())
    })
    .await;
    assert!(
        replaced.is_some(),
        "not replaced: {:?}",
        engine.names(&inst.id)
    );
    let (code, v) = verify(&d).await;
    assert_eq!(code, 0, "{v}");
    d.assert_no_panics();
}
