//! Container engine faults (R27, TESTING.md F9): the engine socket missing,
//! an engine answering 500 to everything, one that never answers (hung
//! requests time out), and the real engine going away mid-run and coming
//! back (through a proxy the test switches off). keel stays up and ready
//! (`/readyz` 200) with containers degraded and the reason in its body and
//! `keel status`, refuses deploys it cannot do with a clear error, and
//! recovers by itself.

#![allow(clippy::disallowed_methods)]

mod common;
#[path = "common/docker.rs"]
mod docker;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use common::{poll_until, Config, Daemon};
use docker::{docker_or_skip, Instance, IMAGE};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

const DEADLINE: Duration = Duration::from_secs(60);

#[derive(Clone, Copy)]
enum Mode {
    /// Accept and never answer.
    Hang,
    /// `500 Internal Server Error` to every request.
    Error500,
}

/// A fake engine socket.
struct FakeEngine {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl FakeEngine {
    fn start(mode: Mode) -> FakeEngine {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("docker.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut s, _)) = listener.accept().await {
                match mode {
                    Mode::Hang => held.push(s),
                    Mode::Error500 => {
                        tokio::spawn(async move {
                            let mut buf = [0u8; 4096];
                            let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
                            let body = r#"{"message":"injected failure"}"#;
                            let _ = s
                                .write_all(
                                    format!(
                                        "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                                        body.len()
                                    )
                                    .as_bytes(),
                                )
                                .await;
                        });
                    }
                }
            }
        });
        FakeEngine {
            _dir: dir,
            socket,
            task,
        }
    }
}

impl Drop for FakeEngine {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A proxy in front of the real engine that the test can switch off (the
/// engine "goes down": new connections are refused, open ones cut).
struct Proxy {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    up: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    fn start(target: &Path) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("docker.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let (up, rx) = watch::channel(true);
        let target = Arc::new(target.to_path_buf());
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !*rx.borrow() {
                    drop(client);
                    continue;
                }
                let target = target.clone();
                let mut down = rx.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = UnixStream::connect(target.as_path()).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = down.wait_for(|u| !*u) => {}
                    }
                });
            }
        });
        Proxy {
            _dir: dir,
            socket,
            up,
            task,
        }
    }

    fn set_up(&self, up: bool) {
        self.up.send_replace(up);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn config_text(d: &Daemon, socket: &Path, instance: &str, timeout_ms: u64) -> String {
    format!(
        "{}\n[containers]\nenabled = true\ndocker_host = \"unix://{}\"\ninstance = \"{instance}\"\nreconcile_interval_s = 1\nrequest_timeout_ms = {timeout_ms}\n",
        d.config.to_toml(),
        socket.display()
    )
}

async fn keel(d: &Daemon, args: &[&str], tail: &[&str]) -> Output {
    d.cli_here(args, tail).await
}

async fn containers_health(d: &Daemon) -> (u16, Value) {
    let r = d.readyz().await.unwrap();
    (r.status, r.json()["containers"].clone())
}

async fn status_containers(d: &Daemon) -> Value {
    let o = d.status_json().await;
    let v: Value = serde_json::from_slice(&o.stdout).expect("status json");
    v["containers"].clone()
}

/// keel with a broken engine: ready, degraded with `why`, deploy refused.
async fn assert_degraded_but_up(d: &Daemon, why: &str) {
    let (status, c) = containers_health(d).await;
    assert_eq!(status, 200, "/readyz stays 200");
    assert_eq!(c["status"], "degraded", "{c}");
    assert!(c["reason"].as_str().unwrap_or("").contains(why), "{c}");
    let s = status_containers(d).await;
    assert_eq!(s["state"], "degraded", "{s}");
    assert!(s["reason"].as_str().unwrap_or("").contains(why), "{s}");
    let o = keel(d, &["services", "deploy", "web", "--image", IMAGE], &[]).await;
    assert_eq!(o.status.code(), Some(1), "deploy with the engine broken");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("nothing was changed"), "{err}");
    // Messages still flow.
    d.post_ok("m1", "c1", "hello").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_socket_a_500_engine_and_a_hung_engine_leave_keel_ready_and_degraded() {
    // No real engine is needed for these.
    let missing = tempfile::tempdir().unwrap();
    let mut d = Daemon::new(Config::default(), None);
    d.write_config_text(&config_text(
        &d,
        &missing.path().join("docker.sock"),
        "fault1",
        2000,
    ));
    d.boot().await;
    assert_degraded_but_up(&d, "not found").await;
    let o = keel(&d, &["services", "list", "--json"], &[]).await;
    assert!(o.status.success());
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["engine"].as_str().unwrap().contains("not found"), "{v}");
    let o = keel(&d, &["verify", "--json"], &[]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(d.sigterm(DEADLINE).await.success());
    d.assert_no_panics();

    let e500 = FakeEngine::start(Mode::Error500);
    let mut d = Daemon::new(Config::default(), None);
    d.write_config_text(&config_text(&d, &e500.socket, "fault2", 2000));
    d.boot().await;
    assert_degraded_but_up(&d, "500").await;
    assert!(d.sigterm(DEADLINE).await.success());
    d.assert_no_panics();

    let hang = FakeEngine::start(Mode::Hang);
    let mut d = Daemon::new(Config::default(), None);
    d.write_config_text(&config_text(&d, &hang.socket, "fault3", 300));
    d.boot().await;
    assert_degraded_but_up(&d, "did not answer within 300 ms").await;
    // Shutdown is not held up by the hung engine.
    assert!(d.sigterm(DEADLINE).await.success());
    d.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_going_down_mid_run_is_retried_and_repaired_when_it_is_back() {
    let Some(engine) = docker_or_skip("engine_down_mid_run") else {
        return;
    };
    let inst = Instance::new(engine, "down");
    let proxy = Proxy::start(&engine.socket);
    let mut d = Daemon::new(Config::default(), None);
    d.write_config_text(&config_text(&d, &proxy.socket, &inst.id, 2000));
    d.boot().await;
    let o = keel(
        &d,
        &["services", "deploy", "web", "--image", IMAGE],
        &["sleep", "3600"],
    )
    .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (_, c) = containers_health(&d).await;
    assert_eq!(c["status"], "ok", "{c}");

    proxy.set_up(false);
    let degraded = poll_until(DEADLINE, || async {
        let (status, c) = containers_health(&d).await;
        assert_eq!(status, 200);
        (c["status"] == "degraded").then_some(c)
    })
    .await
    .expect("degraded while the engine is away");
    assert!(
        degraded["reason"].as_str().unwrap().contains("unavailable"),
        "{degraded}"
    );
    // Drift while keel cannot see: the container disappears.
    let web = format!("keel-{}-service-web-1", inst.id);
    engine.remove(&web);
    let r = common::send(d.client.post(d.url("/v1/services")).json(&json!({
        "name": "db", "image": IMAGE,
    })))
    .await
    .unwrap();
    assert_eq!(r.status, 503, "{}", r.body);

    proxy.set_up(true);
    let back = poll_until(DEADLINE, || async {
        let (_, c) = containers_health(&d).await;
        let running = engine
            .inspect(&web)
            .is_some_and(|c| c["State"]["Running"] == true);
        (c["status"] == "ok" && running).then_some(())
    })
    .await;
    assert!(back.is_some(), "not repaired: {:?}", engine.names(&inst.id));
    assert_eq!(engine.names(&inst.id).len(), 1, "no duplicate");
    assert!(d.stderr_all().contains("container engine answering again"));
    assert!(d.sigterm(DEADLINE).await.success());
    d.assert_no_panics();
}
