//! `keel services deploy|kill|list` and `keel verify`. Services change
//! desired state, and keel has one writer, so they go through the running
//! keel's admin socket (`<data dir>/keel-admin.sock`). `verify` asks the
//! running keel when there is one; otherwise it reads the store (read-only)
//! and the engine itself, covering this instance's managed containers only.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use keel_actors::containers::docker::DockerEngine;
use keel_actors::containers::engine::Engine;
use keel_actors::persistence::services;
use serde_json::{json, Value};

use crate::cli::{ContainersCmd, DataDirArg, ServicesCmd};

pub fn services_cmd(cmd: ServicesCmd) -> Result<ExitCode> {
    match cmd {
        ServicesCmd::Deploy {
            name,
            image,
            env,
            label,
            memory,
            cpus,
            network,
            command,
            dir,
        } => {
            let env = match pairs("--env", &env) {
                Ok(m) => m,
                Err(e) => return Ok(usage(&e)),
            };
            let labels = match pairs("--label", &label) {
                Ok(m) => m,
                Err(e) => return Ok(usage(&e)),
            };
            let mut spec =
                json!({"image": image, "command": command, "env": env, "labels": labels});
            if let Some(m) = memory {
                spec["memory"] = json!(m);
            }
            if let Some(c) = cpus {
                spec["cpus"] = json!(c);
            }
            if let Some(n) = network {
                spec["network"] = json!(n);
            }
            let answer =
                crate::tasks_cmd::ask(&dir, &json!({"op": "deploy", "name": name, "spec": spec}))?;
            if let Some(code) = failed(&answer) {
                return Ok(code);
            }
            match answer["state"].as_str() {
                Some("pending") => {
                    println!(
                        "service {} recorded (spec {}); container not running yet: {}",
                        name,
                        short(&answer["spec_hash"]),
                        answer["error"].as_str().unwrap_or("?")
                    );
                    eprintln!("keel: the reconcile loop creates it when the engine answers");
                }
                _ => println!(
                    "service {} {} ({}, spec {})",
                    name,
                    if answer["unchanged"] == true {
                        "unchanged"
                    } else {
                        "deployed"
                    },
                    answer["container"].as_str().unwrap_or("?"),
                    short(&answer["spec_hash"])
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        ServicesCmd::Kill { name, dir } => {
            let answer = crate::tasks_cmd::ask(&dir, &json!({"op": "kill", "name": name}))?;
            if let Some(code) = failed(&answer) {
                return Ok(code);
            }
            println!("service {name} killed");
            if let Some(e) = answer["error"].as_str() {
                eprintln!("keel: {e} (the reconcile loop removes it)");
            }
            Ok(ExitCode::SUCCESS)
        }
        ServicesCmd::List { dir, json } => {
            let answer = crate::tasks_cmd::ask(&dir, &json!({"op": "services"}))?;
            if let Some(code) = failed(&answer) {
                return Ok(code);
            }
            if json {
                println!("{answer}");
                return Ok(ExitCode::SUCCESS);
            }
            let list = answer["services"].as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                println!("no services");
            }
            for s in list {
                println!(
                    "{:<24} {:<8} {}  spec {}",
                    s["name"].as_str().unwrap_or("?"),
                    s["state"].as_str().unwrap_or("?"),
                    s["container"].as_str().unwrap_or("-"),
                    short(&s["spec_hash"])
                );
            }
            if let Some(e) = answer["engine"].as_str().filter(|e| *e != "ok") {
                println!("engine: {e}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `keel containers run`: the output goes to stdout/stderr, the exit code
/// is the command's (124 when the timeout killed it).
pub fn containers_cmd(cmd: ContainersCmd) -> Result<ExitCode> {
    let ContainersCmd::Run {
        image,
        env,
        label,
        memory,
        cpus,
        network,
        timeout,
        name,
        json,
        command,
        dir,
    } = cmd;
    let env = match pairs("--env", &env) {
        Ok(m) => m,
        Err(e) => return Ok(usage(&e)),
    };
    let labels = match pairs("--label", &label) {
        Ok(m) => m,
        Err(e) => return Ok(usage(&e)),
    };
    let timeout_ms = match keel_actors::schedule::parse_duration(&timeout) {
        Ok(ms) => ms.max(0) as u64,
        Err(e) => return Ok(usage(&format!("--timeout: {e}"))),
    };
    let mut spec = json!({"image": image, "command": command, "env": env, "labels": labels});
    if let Some(m) = memory {
        spec["memory"] = json!(m);
    }
    if let Some(c) = cpus {
        spec["cpus"] = json!(c);
    }
    if let Some(n) = network {
        spec["network"] = json!(n);
    }
    let answer = crate::tasks_cmd::ask_waiting(
        &dir,
        &json!({"op": "container_run", "name": name, "spec": spec, "timeout_ms": timeout_ms}),
        Duration::from_millis(timeout_ms) + Duration::from_secs(60),
    )
    .context(
        "the ephemeral run got no answer (did keel stop? its next start removes the container)",
    )?;
    if let Some(code) = failed(&answer) {
        return Ok(code);
    }
    if json {
        println!("{answer}");
    } else {
        use std::io::Write;
        let _ = std::io::stdout().write_all(answer["stdout"].as_str().unwrap_or("").as_bytes());
        let _ = std::io::stderr().write_all(answer["stderr"].as_str().unwrap_or("").as_bytes());
        let _ = std::io::stdout().flush();
        if answer["truncated"] == true {
            eprintln!("keel: output cut at 1 MiB per stream");
        }
    }
    let container = answer["container"].as_str().unwrap_or("?");
    if answer["stopped"] == true {
        eprintln!("keel: {container} was stopped: keel is shutting down");
        return Ok(ExitCode::from(1));
    }
    if answer["timed_out"] == true {
        eprintln!("keel: {container} timed out after {timeout} and was killed");
        return Ok(ExitCode::from(124));
    }
    Ok(match answer["exit_code"].as_i64() {
        Some(c) if (0..=255).contains(&c) => ExitCode::from(c as u8),
        Some(_) => ExitCode::from(1),
        None => {
            eprintln!("keel: the exit of {container} was not observed");
            ExitCode::from(1)
        }
    })
}

/// `keel verify [--json]`.
/// No progress line (issue 15): verify is one read of the services event
/// log, its hash chain checked in memory (a ~100-byte record each, so even
/// a log of 100 000 events is well under a second), and one container list
/// from the engine, a single request with nothing to count while it runs.
pub fn verify(dir: &DataDirArg, as_json: bool) -> Result<ExitCode> {
    let config = crate::config::load(dir, None)?;
    let report = if crate::run::running_pid(&config.data_dir).is_some() {
        let answer = crate::tasks_cmd::ask(dir, &json!({"op": "verify"}))?;
        if let Some(code) = failed(&answer) {
            return Ok(code);
        }
        answer
    } else {
        offline(&config)?
    };
    if as_json {
        println!(
            "{}",
            json!({
                "consistent": report["consistent"],
                "chain_ok": report["chain_ok"],
                "missing": report["missing"],
                "unexpected": report["unexpected"],
                "drifted": report["drifted"],
                "instance": report["instance"],
                "engine_error": report["engine_error"],
                "log": report["log"],
            })
        );
    } else {
        let log = &report["log"];
        match log["damage"].as_str() {
            None => println!("event log: ok ({} records)", log["records"]),
            Some(d) => println!(
                "event log: DAMAGED: {d}; the first {} of {} records are used",
                log["valid"], log["records"]
            ),
        }
        if let Some(e) = report["engine_error"].as_str() {
            println!("engine: {e}");
        }
        for key in ["missing", "unexpected", "drifted"] {
            let items: Vec<&str> = report[key]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            println!(
                "{key:<11} {}",
                if items.is_empty() {
                    "none".to_string()
                } else {
                    items.join(", ")
                }
            );
        }
        println!(
            "{}",
            if report["consistent"] == true {
                "consistent"
            } else {
                "NOT consistent"
            }
        );
    }
    Ok(if report["consistent"] == true {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The comparison without a running keel: the store read-only, the engine
/// of the config, this instance's containers only.
fn offline(config: &keel_actors::config::Config) -> Result<Value> {
    let mut store = crate::commands::Store::open_ro(config)?;
    let links = store
        .read(services::load_sql)
        .map_err(crate::commands::no_table("service_events"))?;
    let replay = keel_actors::containers::replay(&links);
    let instance = match &config.containers.instance {
        Some(i) => i.clone(),
        // On a shared store the id is this instance's, kept in its data dir.
        None if store.is_shared() => std::fs::read_to_string(config.data_dir.join("instance.id"))
            .map(|t| t.trim().to_string())
            .unwrap_or_default(),
        None => store
            .read(services::stored_instance_sql)?
            .unwrap_or_default(),
    };
    let engine = DockerEngine::new(
        config.containers.host(),
        Duration::from_millis(config.containers.request_timeout_ms),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime for the engine client")?;
    let actual = if instance.is_empty() {
        // Containers never ran on this data dir: nothing can be ours.
        Ok(Vec::new())
    } else {
        rt.block_on(engine.list(&instance))
    };
    let actual_ref = match &actual {
        Ok(list) => Ok(list.as_slice()),
        Err(e) => Err(e),
    };
    Ok(keel_actors::containers::verify_json(
        &replay, actual_ref, &instance,
    ))
}

fn pairs(flag: &str, items: &[String]) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for item in items {
        match item.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                out.insert(k.to_string(), v.to_string());
            }
            _ => return Err(format!("{flag} takes K=V, got {item:?}")),
        }
    }
    Ok(out)
}

fn usage(e: &str) -> ExitCode {
    eprintln!("keel: error: {e}");
    ExitCode::from(2)
}

/// An error answer → its one line on stderr and the exit code (2 for a
/// refused request, 1 otherwise).
fn failed(answer: &Value) -> Option<ExitCode> {
    let e = answer["error"].as_str()?;
    if answer.get("state").is_some() {
        // A result with a warning, not a failure.
        return None;
    }
    eprintln!("keel: error: {e}");
    Some(match answer["code"].as_str() {
        Some("invalid") | Some("not_found") => ExitCode::from(2),
        _ => ExitCode::from(1),
    })
}

fn short(hash: &Value) -> String {
    hash.as_str()
        .map(|h| h.chars().take(12).collect())
        .unwrap_or_else(|| "-".into())
}
