//! The Dockerfile's runtime stage, built and run on a real engine (R46).
//!
//! No registry is reachable, so the base image `debian:bookworm-slim` is
//! made locally (`mmdebstrap --variant=apt bookworm`, imported) and the
//! `rust:` build stage is not used: the test takes the main Dockerfile's
//! last stage verbatim, replacing only the `COPY --from=build` of the binary
//! with a copy of the keel binary built for this test run (same glibc as
//! bookworm). `docker build --network host` (the engine has no bridge).
//! Then: the container runs as the non-root user with a webhook secret
//! (the image listens on 0.0.0.0), `/readyz` is ready, a signed message is
//! accepted, `docker stop` makes keel exit 0 within the grace period with
//! the WAL checkpointed, and a new container on the same volume still has
//! the message.

#![allow(clippy::disallowed_methods)]

mod common;
#[path = "common/docker.rs"]
mod docker;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{poll_until, sign};
use docker::docker_or_skip;
use serde_json::{json, Value};

const BASE: &str = "debian:bookworm-slim";

fn docker_cli(host: &str, args: &[&str]) -> std::process::Output {
    Command::new("docker")
        .arg("-H")
        .arg(host)
        .args(args)
        .output()
        .expect("run the docker CLI")
}

fn ok(out: &std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The main Dockerfile's runtime stage with the binary copied from the
/// build context instead of the build stage.
fn runtime_stage(dockerfile: &str) -> String {
    let start = dockerfile
        .rfind("\nFROM ")
        .expect("a second stage in the Dockerfile");
    let stage = &dockerfile[start + 1..];
    assert!(stage.starts_with(&format!("FROM {BASE}")), "{stage}");
    let copy = "COPY --from=build /usr/local/bin/keel /usr/local/bin/keel";
    assert!(
        stage.contains(copy),
        "the runtime stage copies the binary: {stage}"
    );
    stage.replace(copy, "COPY keel /usr/local/bin/keel")
}

async fn wait_ready(base: &str, deadline: Duration) -> bool {
    let http = common::http_client();
    poll_until(deadline, || async {
        let r = common::send(http.get(format!("{base}/readyz")))
            .await
            .ok()?;
        (r.status == 200).then_some(())
    })
    .await
    .is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_runs_non_root_keeps_its_volume_and_stops_cleanly() {
    let Some(engine) = docker_or_skip("dockerfile") else {
        return;
    };
    let have = |tool: &str| {
        Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !have("docker") || !have("mmdebstrap") {
        if std::env::var_os("KEEL_TEST_REQUIRE_DOCKER").is_some() {
            panic!("dockerfile: needs the docker CLI and mmdebstrap");
        }
        eprintln!("dockerfile: skipped: needs the docker CLI and mmdebstrap");
        return;
    }
    let host = engine.host();
    let work = tempfile::tempdir().unwrap();

    // The base image, made locally once per engine.
    if engine.api("GET", &format!("/images/{BASE}/json"), None).0 != 200 {
        let tar = work.path().join("base.tar");
        let out = Command::new("mmdebstrap")
            .args(["--variant=apt", "--quiet", "bookworm"])
            .arg(&tar)
            .output()
            .expect("run mmdebstrap");
        ok(&out, "mmdebstrap");
        let bytes = std::fs::read(&tar).unwrap();
        let (status, body) = engine.api(
            "POST",
            "/images/create?fromSrc=-&repo=debian&tag=bookworm-slim",
            Some(("application/x-tar", &bytes)),
        );
        assert_eq!(
            status,
            200,
            "import base: {}",
            String::from_utf8_lossy(&body)
        );
    }

    // Build: the main Dockerfile's runtime stage + this run's binary.
    let ctx = work.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    let dockerfile =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile")).unwrap();
    std::fs::write(ctx.join("Dockerfile"), runtime_stage(&dockerfile)).unwrap();
    // Without its debug sections: the image's layers and each container's
    // copy of them (the CI engine uses vfs, which copies every layer whole)
    // then hold a binary a fraction of the test build's size.
    let stripped = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(common::keel_bin())
        .arg(ctx.join("keel"))
        .status()
        .is_ok_and(|s| s.success());
    if !stripped {
        std::fs::copy(common::keel_bin(), ctx.join("keel")).unwrap();
    }
    let tag = format!("localhost/keel-image-test:{}", std::process::id());
    let out = docker_cli(
        &host,
        &[
            "build",
            "--network",
            "host",
            "-q",
            "-t",
            &tag,
            ctx.to_str().unwrap(),
        ],
    );
    if !out.status.success() {
        // Name the space left where the engine keeps its layers: a full
        // disk is the usual reason a build fails here.
        let root = docker_cli(&host, &["info", "--format", "{{.DockerRootDir}}"]);
        let root = String::from_utf8_lossy(&root.stdout).trim().to_string();
        let df = Command::new("df").arg("-h").arg(&root).output();
        let df = df
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        panic!(
            "docker build: {}\n{}\nspace at the engine's root {root}:\n{df}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let volume = format!("keel-image-test-{}", std::process::id());
    ok(
        &docker_cli(&host, &["volume", "create", &volume]),
        "volume create",
    );

    let port = common::free_port();
    let secret = "image-test-secret";
    let run = |name: &str| {
        docker_cli(
            &host,
            &[
                "run",
                "-d",
                "--name",
                name,
                "--network",
                "host",
                "--stop-timeout",
                "10",
                "-e",
                &format!("KEEL_WEBHOOK_SECRET={secret}"),
                "-e",
                &format!("KEEL_LISTEN=0.0.0.0:{port}"),
                "-v",
                &format!("{volume}:/var/lib/keel"),
                &tag,
            ],
        )
    };
    let first = format!("keel-image-a-{}", std::process::id());
    let second = format!("keel-image-b-{}", std::process::id());
    let _cleanup = Cleanup {
        host: host.clone(),
        containers: vec![first.clone(), second.clone()],
        volume: volume.clone(),
        image: tag.clone(),
    };
    ok(&run(&first), "docker run");
    let base = format!("http://127.0.0.1:{port}");
    assert!(
        wait_ready(&base, Duration::from_secs(60)).await,
        "not ready: {}",
        String::from_utf8_lossy(&docker_cli(&host, &["logs", &first]).stderr)
    );

    // Non-root: the image's user, and the process's real uid.
    let inspect: Value =
        serde_json::from_str(&ok(&docker_cli(&host, &["inspect", &first]), "inspect")).unwrap();
    assert_eq!(inspect[0]["Config"]["User"], "keel");
    let pid = inspect[0]["State"]["Pid"].as_i64().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .to_string();
    assert_eq!(uid, "10001", "keel runs as the keel user");

    // A signed message is accepted.
    let http = common::http_client();
    let body =
        json!({"id": "img-1", "chat": "c", "from": "u", "text": "kept in the volume"}).to_string();
    let r = common::send(
        http.post(format!("{base}/v1/messages"))
            .header("Content-Type", "application/json")
            .header("X-Keel-Signature", sign(secret, body.as_bytes()))
            .body(body.clone()),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let unsigned = common::send(
        http.post(format!("{base}/v1/messages"))
            .header("Content-Type", "application/json")
            .body(body),
    )
    .await
    .unwrap();
    assert_eq!(unsigned.status, 401, "{}", unsigned.body);

    // docker stop → SIGTERM → exit 0 within the grace period, WAL empty.
    let t = Instant::now();
    ok(
        &docker_cli(&host, &["stop", "-t", "10", &first]),
        "docker stop",
    );
    let stopped = t.elapsed();
    let state: Value =
        serde_json::from_str(&ok(&docker_cli(&host, &["inspect", &first]), "inspect")).unwrap();
    assert_eq!(state[0]["State"]["ExitCode"], 0, "{}", state[0]["State"]);
    assert!(stopped < Duration::from_secs(10), "stop took {stopped:?}");
    let vol: Value = serde_json::from_str(&ok(
        &docker_cli(&host, &["volume", "inspect", &volume]),
        "volume inspect",
    ))
    .unwrap();
    let mount = Path::new(vol[0]["Mountpoint"].as_str().unwrap()).to_path_buf();
    let wal = mount.join("keel.db-wal");
    let wal_len = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    assert_eq!(wal_len, 0, "WAL checkpointed at shutdown");

    // A new container on the same volume still has the message. The first
    // one goes first: its copy of the image's layers is not needed again.
    ok(&docker_cli(&host, &["rm", &first]), "docker rm");
    ok(&run(&second), "docker run (second)");
    assert!(
        wait_ready(&base, Duration::from_secs(60)).await,
        "second not ready"
    );
    let turns = common::send(http.get(format!("{base}/v1/sessions/webhook:c/turns")))
        .await
        .unwrap();
    assert_eq!(turns.status, 200, "{}", turns.body);
    assert!(turns.body.contains("kept in the volume"), "{}", turns.body);
    ok(
        &docker_cli(&host, &["stop", "-t", "10", &second]),
        "docker stop (second)",
    );
}

/// Removes the test's containers, volume and image, also after a failure.
struct Cleanup {
    host: String,
    containers: Vec<String>,
    volume: String,
    image: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = docker_cli(&self.host, &["rm", "-f", c]);
        }
        let _ = docker_cli(&self.host, &["volume", "rm", &self.volume]);
        let _ = docker_cli(&self.host, &["rmi", &self.image]);
    }
}
