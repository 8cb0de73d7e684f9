//! No open admin port (R30, R43):
//! - a peer that is not on loopback gets 401 with a one-line reason from every
//!   admin route and `/metrics` without a valid capability token, 403 with a
//!   token lacking the permission, 200 with the right one, while
//!   `/healthz`, `/readyz` and the signed webhook keep working for it. The
//!   peer is real: keel runs in a network namespace the test creates and the
//!   test connects over a veth pair, so no traffic leaves the machine;
//! - `[admin] loopback_open = false` closes the admin routes to loopback too;
//! - `keel run` on a non-loopback address with the webhook enabled and no
//!   secret refuses to start with one line naming the fix; the secret from
//!   `KEEL_WEBHOOK_SECRET` or `webhook.allow_unsigned = true` lets it start.
//!
//! The namespace test needs root; without it it prints `skipped: needs root`
//! unless `KEEL_TEST_REQUIRE_ROOT=1`, which makes it fail instead.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{http_client, poll_until, root_or_skip, send, sign, toml_str, Config, Daemon};
use serde_json::json;

/// How long a start may take (debug build, 2 cores).
const START: Duration = Duration::from_secs(60);

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace joined to this one by a veth pair: the host side is
/// `host_ip`, the namespace side `ns_ip`. Removed (with the pair) on drop.
struct Netns {
    name: String,
    host_ip: String,
    ns_ip: String,
}

impl Netns {
    fn create() -> Netns {
        let pid = std::process::id();
        let name = format!("keel-t{pid}");
        // Interface names are at most 15 bytes.
        let (host_if, ns_if) = (format!("kh{pid}"), format!("kn{pid}"));
        let net = 16 + (pid % 200);
        let ns = Netns {
            name: name.clone(),
            host_ip: format!("10.251.{net}.1"),
            ns_ip: format!("10.251.{net}.2"),
        };
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        run_ok(Command::new("ip").args([
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ]));
        run_ok(Command::new("ip").args(["link", "set", &ns_if, "netns", &name]));
        run_ok(Command::new("ip").args([
            "addr",
            "add",
            &format!("{}/30", ns.host_ip),
            "dev",
            &host_if,
        ]));
        run_ok(Command::new("ip").args(["link", "set", &host_if, "up"]));
        let inside = |args: &[&str]| {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &name, "ip"]).args(args);
            run_ok(&mut c);
        };
        inside(&["addr", "add", &format!("{}/30", ns.ns_ip), "dev", &ns_if]);
        inside(&["link", "set", &ns_if, "up"]);
        inside(&["link", "set", "lo", "up"]);
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A `keel run` child killed on drop.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn keel_run(
    prefix: &[&str],
    data: &Path,
    listen: &str,
    config: &Path,
    env: &[(&str, &str)],
) -> Command {
    let (prog, args) = match prefix.split_first() {
        Some((p, rest)) => (p.to_string(), rest.to_vec()),
        None => (common::keel_bin().to_string(), vec![]),
    };
    let mut cmd = Command::new(prog);
    cmd.args(args);
    if !prefix.is_empty() {
        cmd.arg(common::keel_bin());
    }
    cmd.arg("run")
        .arg("--data-dir")
        .arg(data)
        .arg("--listen")
        .arg(listen)
        .arg("--config")
        .arg(config)
        .env_remove("KEEL_CONFIG")
        .env_remove("KEEL_DATA_DIR")
        .env_remove("KEEL_LISTEN")
        .env_remove("KEEL_WEBHOOK_SECRET")
        .env_remove("KEEL_WEBHOOK_ALLOW_UNSIGNED")
        .env("NO_COLOR", "1")
        .envs(env.iter().copied())
        .stdin(Stdio::null());
    cmd
}

async fn wait_ready(base: &str) -> bool {
    let client = http_client();
    poll_until(START, || {
        let req = client.get(format!("{base}/readyz"));
        async move {
            match send(req).await {
                Ok(r) if r.status == 200 => Some(()),
                _ => None,
            }
        }
    })
    .await
    .is_some()
}

fn assert_forbidden(what: &str, r: &common::Resp) {
    assert_eq!(r.status, 403, "{what}: {} {}", r.status, r.body);
    assert!(r.error_problem().is_none(), "{what}: {}", r.body);
}

fn assert_unauthorized(what: &str, r: &common::Resp) {
    assert_eq!(r.status, 401, "{what}: {} {}", r.status, r.body);
    assert!(r.error_problem().is_none(), "{what}: {}", r.body);
}

/// `keel tokens grant --perm PERM` on `data`; the token (last line of stdout).
async fn grant(data: &Path, config: &Path, perm: &str) -> String {
    let out = common::run_keel(
        &[
            "tokens",
            "grant",
            "--perm",
            perm,
            "--data-dir",
            &data.display().to_string(),
            "--config",
            &config.display().to_string(),
        ],
        None,
        Duration::from_secs(60),
    )
    .await;
    assert!(
        out.status.success(),
        "grant: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .expect("token line")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_off_loopback_needs_a_token_with_the_right_permission() {
    if !root_or_skip("a_peer_off_loopback_needs_a_token_with_the_right_permission") {
        return;
    }
    let ns = Netns::create();
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).expect("mkdir");
    let secret = "netns-secret";
    let config = tmp.path().join("keel.toml");
    std::fs::write(
        &config,
        format!("[webhook]\nsecret = {}\n", toml_str(secret)),
    )
    .expect("config");
    let stderr = std::fs::File::create(tmp.path().join("stderr")).expect("stderr");
    let listen = format!("{}:7878", ns.ns_ip);
    let child = keel_run(
        &["ip", "netns", "exec", &ns.name],
        &data,
        &listen,
        &config,
        &[],
    )
    .stdout(Stdio::null())
    .stderr(stderr)
    .spawn()
    .expect("spawn keel in the namespace");
    let _child = Child(child);
    let base = format!("http://{listen}");
    assert!(
        wait_ready(&base).await,
        "keel in the namespace not ready; stderr:\n{}",
        std::fs::read_to_string(tmp.path().join("stderr")).unwrap_or_default()
    );
    let client = reqwest::Client::builder()
        .no_proxy()
        .local_address(ns.host_ip.parse::<std::net::IpAddr>().expect("host ip"))
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");

    // The webhook is not an admin route: a signed message is accepted.
    let body = serde_json::to_vec(&json!({"id": "n1", "chat": "ns", "from": "u", "text": "hi"}))
        .expect("json");
    let r = send(
        client
            .post(format!("{base}/v1/messages"))
            .header("content-type", "application/json")
            .header("x-keel-signature", sign(secret, &body))
            .body(body),
    )
    .await
    .expect("POST");
    assert_eq!(r.status, 200, "{}", r.body);
    for path in ["/healthz", "/readyz"] {
        let r = send(client.get(format!("{base}{path}"))).await.expect(path);
        assert_eq!(r.status, 200, "{path}: {}", r.body);
    }
    let r = send(client.get(format!("{base}/metrics")))
        .await
        .expect("metrics");
    assert_unauthorized("/metrics", &r);
    let read = grant(&data, &config, "read").await;
    let send_only = grant(&data, &config, "send").await;
    let bearer = |t: &str| format!("Bearer {t}");
    let r = send(
        client
            .get(format!("{base}/metrics"))
            .header("authorization", bearer(&read)),
    )
    .await
    .expect("metrics");
    assert_eq!(r.status, 200, "/metrics with a read token: {}", r.body);
    let r = send(
        client
            .get(format!("{base}/v1/sessions"))
            .header("authorization", bearer(&read)),
    )
    .await
    .expect("sessions");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("webhook:ns"), "{}", r.body);
    let r = send(
        client
            .get(format!("{base}/v1/sessions"))
            .header("authorization", bearer(&send_only)),
    )
    .await
    .expect("sessions");
    assert_forbidden("/v1/sessions with a send token", &r);
    let r = send(
        client
            .post(format!("{base}/v1/tasks"))
            .header("authorization", bearer(&read))
            .header("content-type", "application/json")
            .body(r#"{"name":"x"}"#),
    )
    .await
    .expect("tasks");
    assert_forbidden("POST /v1/tasks with a read token", &r);
    for path in [
        "/v1/sessions",
        "/v1/sessions/webhook:ns/turns",
        "/v1/sessions/webhook:ns/turns?after=0&limit=5",
        "/v1/sessions/no-such/turns",
        "/v1/sessions/",
    ] {
        let r = send(client.get(format!("{base}{path}"))).await.expect(path);
        assert_unauthorized(path, &r);
        assert!(!r.body.contains("hi\""), "{path} leaked a turn: {}", r.body);
        let stored_hash_style = format!("Bearer keel_{}_{}", "a".repeat(12), "b".repeat(64));
        for token in [
            "Bearer keel_abc_def",
            "Bearer ",
            "Basic YTpi",
            &stored_hash_style,
        ] {
            let r = send(
                client
                    .get(format!("{base}{path}"))
                    .header("authorization", token),
            )
            .await
            .expect(path);
            assert_unauthorized(&format!("{path} with {token:?}"), &r);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_open_false_closes_admin_routes_to_loopback_too() {
    let mut d = Daemon::new(Config::default(), None);
    d.write_config_text("[admin]\nloopback_open = false\n");
    d.boot().await;
    d.post_ok("c1", "closed", "hello").await;
    for path in ["/v1/sessions", "/v1/sessions/webhook:closed/turns"] {
        let r = d.get(path).await.expect(path);
        assert_unauthorized(path, &r);
    }
    assert_eq!(d.get("/metrics").await.expect("metrics").status, 200);
    d.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_unsigned_webhook_is_refused_unless_allowed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).expect("mkdir");
    let plain = tmp.path().join("plain.toml");
    std::fs::write(&plain, "log_level = \"info\"\n").expect("config");

    // Refused: one line naming the key and both ways out; nothing created.
    let listen = format!("0.0.0.0:{}", common::free_port());
    let out = keel_run(&[], &data, &listen, &plain, &[])
        .output()
        .expect("run keel");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "keel started unsigned on {listen}:\n{stderr}"
    );
    let line = stderr
        .lines()
        .find(|l| l.contains("webhook.secret"))
        .unwrap_or_else(|| panic!("no line names webhook.secret:\n{stderr}"));
    assert!(
        line.contains("KEEL_WEBHOOK_SECRET") && line.contains("allow_unsigned"),
        "{line}"
    );
    assert_eq!(
        std::fs::read_dir(&data).expect("ls").count(),
        0,
        "refused start wrote files"
    );

    // The secret from the environment, or the explicit opt-out, lets it start.
    let allow = tmp.path().join("allow.toml");
    std::fs::write(&allow, "[webhook]\nallow_unsigned = true\n").expect("config");
    for (config, env) in [
        (&plain, vec![("KEEL_WEBHOOK_SECRET", "from-env")]),
        (&allow, vec![]),
        (&plain, vec![("KEEL_WEBHOOK_ALLOW_UNSIGNED", "true")]),
    ] {
        let port = common::free_port();
        let child = keel_run(&[], &data, &format!("0.0.0.0:{port}"), config, &env)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn keel");
        let mut child = Child(child);
        let base = format!("http://127.0.0.1:{port}");
        assert!(
            wait_ready(&base).await,
            "keel did not start with {env:?} {}",
            config.display()
        );
        if env
            .first()
            .is_some_and(|(k, _)| *k == "KEEL_WEBHOOK_SECRET")
        {
            // The environment's secret is really in force.
            let msg = json!({"id": "e1", "chat": "env", "from": "u", "text": "hi"});
            let unsigned = send(http_client().post(format!("{base}/v1/messages")).json(&msg))
                .await
                .expect("POST");
            assert_eq!(unsigned.status, 401, "{}", unsigned.body);
        }
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
        let status = child.0.wait().expect("wait");
        assert!(status.success(), "exit after SIGTERM: {status}");
    }
    let bad = keel_run(
        &[],
        &data,
        &listen,
        &plain,
        &[("KEEL_WEBHOOK_ALLOW_UNSIGNED", "maybe")],
    )
    .output()
    .expect("run keel");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("KEEL_WEBHOOK_ALLOW_UNSIGNED"));
}

/// The console and `/v1/stats` are admin routes like the rest: no token →
/// 401, a token without `read` → 403, a `read` token → the page with its
/// strict Content-Security-Policy. Neither the page, its script nor the
/// stats carry the webhook secret or the token that fetched them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_needs_read_sends_its_csp_and_holds_no_secret() {
    const SECRET: &str = "console-canary-webhook-secret-77";
    let config = Config {
        secret: Some(SECRET.into()),
        ..Config::default()
    };
    let mut d = Daemon::new(config, None);
    d.write_config_text(&format!(
        "{}[admin]\nloopback_open = false\n",
        d.config.to_toml()
    ));
    d.boot().await;
    d.post_ok("c1", "console", "hello").await;
    let routes = ["/console", "/v1/stats", "/console/console.js"];
    for path in routes {
        let r = d.get(path).await.expect(path);
        assert_unauthorized(path, &r);
    }
    let send_only = grant(&d.data_dir, &d.config_path, "send").await;
    let read = grant(&d.data_dir, &d.config_path, "read").await;
    for path in routes {
        let r = d
            .client
            .get(d.url(path))
            .bearer_auth(&send_only)
            .send()
            .await
            .expect(path);
        assert_eq!(r.status().as_u16(), 403, "{path} with a send-only token");
    }
    for path in routes {
        let r = d
            .client
            .get(d.url(path))
            .bearer_auth(&read)
            .send()
            .await
            .expect(path);
        assert_eq!(r.status().as_u16(), 200, "{path} with a read token");
        if path == "/console" {
            let csp = r
                .headers()
                .get("content-security-policy")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            assert_eq!(csp, keel_actors::console::CSP, "{path}");
            assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe"));
        }
        let body = r.text().await.expect(path);
        assert!(!body.contains(SECRET), "{path} shows the webhook secret");
        assert!(!body.contains(&read), "{path} shows the token");
        if path == "/console" {
            assert!(body.contains("webhook"), "{path}: no channels shown");
        }
    }
    d.assert_no_panics();
}
