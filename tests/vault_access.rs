#![allow(clippy::disallowed_methods)]
//! Secrets, capability tokens and the audit log through the real binary
//! (R28–R31, R47): `keel secrets` before the first start and while keel
//! runs, a channel secret taken from the vault, tokens with permissions,
//! scope, expiry and revocation in a running daemon (and after a restart),
//! the hash-chained audit log and its `--verify`, and the canary check: no
//! secret value, webhook secret or token in any output, log, HTTP answer or
//! raw byte of the data dir.

mod common;
#[path = "common/telegram.rs"]
mod telegram;

use std::path::Path;
use std::time::Duration;

use common::{poll_until, run_keel_env, send, sign, Config, Daemon};
use serde_json::{json, Value};

const DEADLINE: Duration = Duration::from_secs(60);

fn dir_args(d: &Daemon) -> Vec<String> {
    vec![
        "--data-dir".into(),
        d.data_dir.display().to_string(),
        "--config".into(),
        d.config_path.display().to_string(),
    ]
}

/// `keel ARGS --data-dir … --config …` with `stdin`.
async fn keel(d: &Daemon, args: &[&str], stdin: Option<&[u8]>) -> std::process::Output {
    let extra = dir_args(d);
    let mut all: Vec<&str> = args.to_vec();
    all.extend(extra.iter().map(String::as_str));
    run_keel_env(&all, &[], stdin, DEADLINE).await
}

async fn keel_ok(
    d: &Daemon,
    args: &[&str],
    stdin: Option<&[u8]>,
    outputs: &mut Vec<String>,
) -> String {
    let out = keel(d, args, stdin).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "keel {args:?}: {stderr}");
    outputs.push(stdout.clone());
    outputs.push(stderr);
    stdout
}

async fn grant(d: &Daemon, args: &[&str], outputs: &mut Vec<String>) -> String {
    let mut all = vec!["tokens", "grant"];
    all.extend_from_slice(args);
    let out = keel_ok(d, &all, None, outputs).await;
    out.lines().last().expect("token line").to_string()
}

fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    hits.push(path.display().to_string());
                }
            }
        }
    }
    hits
}

struct Http<'a> {
    d: &'a Daemon,
    bodies: Vec<String>,
}

impl Http<'_> {
    async fn get(&mut self, path: &str, token: Option<&str>) -> common::Resp {
        let mut req = self.d.client.get(self.d.url(path));
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let r = send(req).await.expect("GET");
        self.bodies.push(r.body.clone());
        r
    }

    async fn post(&mut self, path: &str, token: Option<&str>, body: Value) -> common::Resp {
        let mut req = self
            .d
            .client
            .post(self.d.url(path))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let r = send(req).await.expect("POST");
        self.bodies.push(r.body.clone());
        r
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_tokens_and_audit_work_stopped_and_running_and_leave_no_canary() {
    const HOOK: &str = "canary-webhook-secret-51d2";
    const VALUE: &str = "canary-secret-value-a8e0";
    const OTHER: &str = "canary-other-secret-0c77";
    let mut outputs = Vec::new();
    // No webhook secret in the file: it comes from the vault.
    let tight = Config {
        extra: "[admin]\nloopback_open = false\n".into(),
        ..Config::default()
    };
    let mut d = Daemon::new(tight, None);
    d.config.secret = Some(HOOK.into());

    // Before the first start (no key yet: created).
    keel_ok(
        &d,
        &["secrets", "set", "webhook.secret"],
        Some(HOOK.as_bytes()),
        &mut outputs,
    )
    .await;
    keel_ok(
        &d,
        &["secrets", "set", "mine"],
        Some(format!("{VALUE}\n").as_bytes()),
        &mut outputs,
    )
    .await;
    let stopped_token = grant(&d, &["--perm", "read"], &mut outputs).await;
    assert!(stopped_token.starts_with("keel_"), "{stopped_token}");
    // Values come from stdin only: an empty stdin is an error.
    let out = keel(&d, &["secrets", "set", "empty"], Some(b"")).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("stdin"));
    d.boot().await;

    // The webhook secret from the vault is in force: unsigned → 401.
    let unsigned = d
        .post_raw(
            serde_json::to_vec(&json!({"id": "u", "chat": "a", "from": "x", "text": "hi"}))
                .unwrap(),
            &[],
        )
        .await
        .expect("post");
    assert_eq!(unsigned.status, 401, "{}", unsigned.body);
    d.post_ok("1", "a", "in chat a").await;
    d.post_ok("2", "b", "in chat b").await;

    // While running: through the admin socket.
    keel_ok(
        &d,
        &["secrets", "set", "other"],
        Some(OTHER.as_bytes()),
        &mut outputs,
    )
    .await;
    let list = keel_ok(&d, &["secrets", "list", "--json"], None, &mut outputs).await;
    let names: Vec<String> = serde_json::from_str::<Value>(&list).unwrap()["secrets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["mine", "other", "webhook.secret"]);
    keel_ok(&d, &["secrets", "rm", "other"], None, &mut outputs).await;
    let out = keel(&d, &["secrets", "rm", "other"], None).await;
    assert_eq!(out.status.code(), Some(2));

    let read = grant(&d, &["--perm", "read"], &mut outputs).await;
    let scoped = grant(
        &d,
        &["--perm", "read,send", "--scope", "webhook:a"],
        &mut outputs,
    )
    .await;
    let short = grant(&d, &["--perm", "read", "--ttl", "1s"], &mut outputs).await;
    let mut http = Http {
        d: &d,
        bodies: Vec::new(),
    };

    // loopback_open = false: even loopback needs a token.
    assert_eq!(http.get("/v1/sessions", None).await.status, 401);
    for t in [&stopped_token, &read] {
        let r = http.get("/v1/sessions", Some(t)).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(r.body.contains("webhook:b"));
    }
    // Scope: only its sessions.
    let r = http.get("/v1/sessions", Some(&scoped)).await;
    assert!(
        r.body.contains("webhook:a") && !r.body.contains("webhook:b"),
        "{}",
        r.body
    );
    assert_eq!(
        http.get("/v1/sessions/webhook:b/turns", Some(&scoped))
            .await
            .status,
        403
    );
    assert_eq!(http.get("/v1/tasks", Some(&scoped)).await.status, 403);
    // /v1/services: reading needs `read`, deploying needs `deploy` (the
    // request then reaches the handler: containers are off in this keel).
    let deploy = grant(&d, &["--perm", "deploy"], &mut outputs).await;
    let spec = json!({"name": "web", "image": "busybox"});
    let r = http.post("/v1/services", Some(&read), spec.clone()).await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = http.post("/v1/services", Some(&deploy), spec).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("containers"), "{}", r.body);
    let r = http.get("/v1/services", Some(&read)).await;
    assert_eq!(r.status, 503, "{}", r.body);
    // send: keel says something in chat a.
    let r = http
        .post(
            "/v1/sessions/webhook:a/messages",
            Some(&scoped),
            json!({"text": "said by keel"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = http
        .post(
            "/v1/sessions/webhook:a/messages",
            Some(&read),
            json!({"text": "nope"}),
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    let turns = http
        .get("/v1/sessions/webhook:a/turns", Some(&scoped))
        .await;
    assert!(turns.body.contains("said by keel"), "{}", turns.body);
    assert_eq!(
        http.post(
            "/v1/sessions/webhook:zz/messages",
            Some(&scoped),
            json!({"text": "x"})
        )
        .await
        .status,
        403
    );
    // Bad tokens: one generic 401 each.
    let (id, _) = read.strip_prefix("keel_").unwrap().split_once('_').unwrap();
    let conn = common::open_db(&d.db_path());
    let hash: String = conn
        .query_row(
            "SELECT secret_sha256 FROM tokens WHERE id = ?1",
            [id],
            |r| r.get(0),
        )
        .expect("stored hash");
    drop(conn);
    for bad in [
        format!("keel_{id}_{hash}"),
        String::new(),
        "x".repeat(10_000),
        format!("{read}0"),
    ] {
        let r = http.get("/v1/sessions", Some(&bad)).await;
        assert_eq!(r.status, 401, "{bad:.40}: {}", r.body);
    }
    // Expiry.
    assert!(
        poll_until(Duration::from_secs(10), || async {
            let r = send(
                d.client
                    .get(d.url("/v1/sessions"))
                    .header("authorization", format!("Bearer {short}")),
            )
            .await
            .expect("GET");
            (r.status == 401).then_some(())
        })
        .await
        .is_some(),
        "a 1 s token still works"
    );
    // Revocation in the running daemon: effective at once.
    keel_ok(&d, &["tokens", "revoke", id], None, &mut outputs).await;
    assert_eq!(http.get("/v1/sessions", Some(&read)).await.status, 401);
    let metrics = http.get("/metrics", None).await;
    assert!(
        metrics.body.contains("keel_auth_failures_total"),
        "{}",
        metrics.body
    );
    assert!(d.stderr_all().contains("admin request refused"));

    let bodies = std::mem::take(&mut http.bodies);
    assert!(d.sigterm(DEADLINE).await.success());
    // After a restart: revoked and expired stay refused, others work.
    d.restart().await;
    let mut http = Http { d: &d, bodies };
    assert_eq!(http.get("/v1/sessions", Some(&read)).await.status, 401);
    assert_eq!(http.get("/v1/sessions", Some(&short)).await.status, 401);
    assert_eq!(
        http.get("/v1/sessions", Some(&stopped_token)).await.status,
        200
    );
    let listed = keel_ok(&d, &["tokens", "list", "--json"], None, &mut outputs).await;
    let tokens: Value = serde_json::from_str(&listed).unwrap();
    let status_of = |tid: &str| {
        tokens["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["id"] == tid)
            .map(|t| t["status"].as_str().unwrap().to_string())
    };
    assert_eq!(status_of(id).as_deref(), Some("revoked"));
    let bodies = std::mem::take(&mut http.bodies);
    assert!(d.sigterm(DEADLINE).await.success());

    // The audit log: every kind that happened, a verifying chain.
    let audit = keel_ok(&d, &["audit", "--json"], None, &mut outputs).await;
    let records: Value = serde_json::from_str(&audit).unwrap();
    let kinds: Vec<String> = records["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["kind"].as_str().unwrap().to_string())
        .collect();
    for k in [
        "started",
        "stopped",
        "secret_set",
        "secret_removed",
        "token_granted",
        "token_revoked",
        "auth_failed",
    ] {
        assert!(kinds.iter().any(|x| x == k), "no {k} in {kinds:?}");
    }
    let verify = keel_ok(&d, &["audit", "--verify"], None, &mut outputs).await;
    assert!(verify.contains("ok"), "{verify}");
    let since = keel_ok(
        &d,
        &["audit", "--since", "2999-01-01T00:00:00Z", "--json"],
        None,
        &mut outputs,
    )
    .await;
    assert_eq!(
        serde_json::from_str::<Value>(&since).unwrap()["records"],
        json!([])
    );

    // The canaries: nowhere.
    let logs = format!(
        "{}{}",
        d.stderr_all(),
        std::fs::read_to_string(&d.stdout_path).unwrap_or_default()
    );
    for canary in [
        HOOK,
        VALUE,
        OTHER,
        read.as_str(),
        scoped.as_str(),
        stopped_token.as_str(),
    ] {
        let hits = files_containing(&d.data_dir, canary.as_bytes());
        assert!(hits.is_empty(), "{canary:.20} in {hits:?}");
        assert!(!logs.contains(canary), "{canary:.20} in keel's log");
        for o in outputs.iter().filter(|o| !o.contains("shown once")) {
            assert!(
                !o.contains(canary) || o.trim() == canary,
                "{canary:.20} in command output {o:.200}"
            );
        }
        assert!(
            !bodies.iter().any(|b| b.contains(canary)),
            "{canary:.20} in an HTTP answer"
        );
    }
    for canary in [HOOK, VALUE, OTHER] {
        assert!(
            !outputs.iter().any(|o| o.contains(canary)),
            "{canary} printed by a command"
        );
    }

    // Tampering under the triggers breaks the chain, and --verify says where.
    {
        let conn = common::open_db(&d.db_path());
        conn.execute_batch(
            "DROP TRIGGER audit_no_update; UPDATE audit SET detail = '{}' WHERE seq = 2;",
        )
        .expect("tamper");
    }
    let out = keel(&d, &["audit", "--verify"], None).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("record 2"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The triggers themselves refuse changes.
    let conn = common::open_db(&d.db_path());
    assert!(conn.execute("DELETE FROM audit", []).is_err());
    let signed = sign(HOOK, b"x");
    assert!(!signed.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_while_running_restore_rekey_and_migrate_encrypt() {
    const TEXT: &str = "canary-backup-text-3b19";
    let mut outputs = Vec::new();
    let mut d = Daemon::start(Config::default()).await;
    keel_ok(
        &d,
        &["secrets", "set", "s1"],
        Some(b"canary-backup-secret-77aa"),
        &mut outputs,
    )
    .await;
    for i in 0..50 {
        d.post_ok(&format!("b{i}"), "chat", &format!("{TEXT} {i}"))
            .await;
    }
    let file = d.root().join("backup.db");
    let file_s = file.display().to_string();
    // Writes go on while the backup runs.
    let load = {
        let (client, url) = (d.client.clone(), d.url("/v1/messages"));
        tokio::spawn(async move {
            for i in 0..200 {
                let body =
                    json!({"id": format!("during{i}"), "chat": "busy", "from": "t", "text": "x"});
                let r = send(
                    client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body.to_string()),
                )
                .await
                .expect("post during backup");
                assert_eq!(r.status, 200, "{}", r.body);
            }
        })
    };
    let out = keel_ok(&d, &["backup", &file_s], None, &mut outputs).await;
    load.await.expect("load task");
    assert!(out.contains("integrity checked"), "{out}");
    assert!(file.exists() && file.with_file_name("backup.db.secrets").exists());
    assert!(
        files_containing(d.root(), TEXT.as_bytes()).is_empty(),
        "plaintext in the backup"
    );
    assert!(files_containing(d.root(), b"canary-backup-secret-77aa").is_empty());
    d.post_ok("after", "chat", "after the backup").await;
    assert!(d.sigterm(DEADLINE).await.success());
    // Newer commits in the store: refused without --force.
    let out = keel(&d, &["restore", &file_s], None).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("newer"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    keel_ok(&d, &["restore", &file_s, "--force"], None, &mut outputs).await;
    assert!(std::fs::read_dir(&d.data_dir).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains("replaced")));
    d.restart().await;
    let turns = d.turns("webhook:chat").await;
    assert!(turns.iter().any(|t| t.text == format!("{TEXT} 49")));
    assert!(!turns.iter().any(|t| t.text == "after the backup"));
    assert!(d.sigterm(DEADLINE).await.success());

    // Into a new data dir: needs the key the backup was made with.
    let fresh = Daemon::new(Config::default(), None);
    let fdir = fresh.data_dir.display().to_string();
    let out = run_keel_env(
        &["restore", &file_s, "--data-dir", &fdir],
        &[],
        None,
        DEADLINE,
    )
    .await;
    assert!(!out.status.success(), "restored without the key");
    let hex = common::master_key_hex(&d.data_dir).unwrap();
    let out = run_keel_env(
        &["restore", &file_s, "--data-dir", &fdir],
        &[("KEEL_MASTER_KEY", &hex)],
        None,
        DEADLINE,
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Rekey: a new key from stdin; the old one no longer opens the stores.
    let old = common::master_key_hex(&d.data_dir).unwrap();
    let new = "5e".repeat(32);
    keel_ok(&d, &["rekey"], Some(new.as_bytes()), &mut outputs).await;
    assert_eq!(common::master_key_hex(&d.data_dir).unwrap(), new);
    assert_ne!(old, new);
    let out = run_keel_env(
        &["status", "--data-dir", &d.data_dir.display().to_string()],
        &[("KEEL_MASTER_KEY", &old)],
        None,
        DEADLINE,
    )
    .await;
    assert!(!out.status.success(), "the old key still opens the store");
    // A rekey killed before the key switch left a copy behind: removed at start.
    std::fs::write(d.data_dir.join("keel.db.rekey"), b"half-written copy").unwrap();
    d.restart().await;
    assert!(!d.data_dir.join("keel.db.rekey").exists());
    assert!(d.turns("webhook:chat").await.len() >= 100);
    let list = keel_ok(&d, &["secrets", "list"], None, &mut outputs).await;
    assert!(list.contains("s1"));
    assert!(d.sigterm(DEADLINE).await.success());
    let audit = keel_ok(&d, &["audit"], None, &mut outputs).await;
    assert!(
        audit.contains("rekeyed") && audit.contains("restored"),
        "{audit}"
    );

    // migrate --encrypt: a plain store becomes an encrypted one.
    let plain = Config {
        extra: "[storage]\nencrypt = false\n".into(),
        ..Config::default()
    };
    let mut p = Daemon::start(plain).await;
    p.post_ok("p1", "chat", TEXT).await;
    assert!(p.sigterm(DEADLINE).await.success());
    assert!(!files_containing(&p.data_dir, TEXT.as_bytes()).is_empty());
    let out = keel(&p, &["migrate", "--encrypt"], None).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        files_containing(&p.data_dir, TEXT.as_bytes()).is_empty(),
        "plaintext left"
    );
    p.write_config_text(&Config::default().to_toml());
    p.restart().await;
    assert!(p.turns("webhook:chat").await.iter().any(|t| t.text == TEXT));
    assert!(p.sigterm(DEADLINE).await.success());
    let out = keel(&p, &["migrate", "--encrypt"], None).await;
    assert!(!out.status.success(), "migrated an encrypted store again");
}

/// `keel rekey` killed (SIGKILL) at seeded moments: every next start
/// finishes or undoes it, the stores open with the key file's key, and
/// nothing stored is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rekey_killed_at_random_moments_leaves_a_store_that_opens() {
    use rand::Rng;
    let seed = common::Seed::from_env("rekey_killed_at_random_moments_leaves_a_store_that_opens");
    let mut rng = seed.rng();
    let mut outputs = Vec::new();
    let mut d = Daemon::start(Config::default()).await;
    keel_ok(
        &d,
        &["secrets", "set", "kept"],
        Some(b"value"),
        &mut outputs,
    )
    .await;
    for i in 0..300 {
        d.post_ok(&format!("k{i}"), "chat", "some text to rewrite")
            .await;
    }
    assert!(d.sigterm(DEADLINE).await.success());
    let mut finished = 0;
    for cycle in 0..20 {
        let new: String = (0..32)
            .map(|_| format!("{:02x}", rng.gen::<u8>()))
            .collect();
        let mut cmd = tokio::process::Command::new(common::keel_bin());
        cmd.arg("rekey")
            .args(dir_args(&d))
            .env_remove("KEEL_MASTER_KEY")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn rekey");
        {
            use tokio::io::AsyncWriteExt;
            let mut stdin = child.stdin.take().expect("stdin");
            stdin.write_all(new.as_bytes()).await.expect("key");
        }
        // The kill moment: a seeded delay (fault injection, not a wait for
        // a condition), from before it starts to after it is done.
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..150))).await;
        let _ = child.start_kill();
        let status = child.wait().await.expect("wait rekey");
        if status.success() {
            finished += 1;
        }
        d.restart().await;
        assert_eq!(
            d.turns("webhook:chat").await.len(),
            600,
            "cycle {cycle}: turns lost after a killed rekey"
        );
        let list = keel_ok(&d, &["secrets", "list"], None, &mut outputs).await;
        assert!(list.contains("kept"), "cycle {cycle}: {list}");
        assert!(d.sigterm(DEADLINE).await.success());
        assert_eq!(common::integrity_check(&d.db_path()), "ok");
        let leftovers: Vec<_> = std::fs::read_dir(&d.data_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".rekey"))
            .collect();
        assert!(leftovers.is_empty(), "cycle {cycle}: {leftovers:?}");
    }
    eprintln!("rekey ran to completion in {finished} of 20 cycles");
}

/// Channel tokens from the vault: the Telegram bot token by the
/// `<channel>.token` fallback, the WhatsApp access token by `vault:NAME`.
/// Both work (the fake Bot API sees the bot token, the fake Graph API the
/// access token) and neither appears in keel's output, logs, HTTP answers
/// or the raw bytes of the data dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_tokens_from_the_vault_work_and_leave_no_canary() {
    const BOT: &str = "123456:canary-bot-token-ZZ91";
    const WA: &str = "canary-whatsapp-token-4f4f";
    let tg = telegram::FakeTelegram::start();
    let graph = common::ReplyServer::start();
    let graph_base = graph.url.trim_end_matches("/replies").to_string();
    let mut outputs = Vec::new();
    let d0 = Daemon::new(Config::default(), None);
    let text = format!(
        "{}\n[whatsapp]\nenabled = true\napi_base = {graph_base:?}\nphone_number_id = \"1234\"\n\
         access_token = \"vault:wa-token\"\napp_secret = \"wa-app-secret\"\nverify_token = \"v\"\n",
        telegram::config_toml(&tg.url, "placeholder", "").replace("token = \"placeholder\"\n", "")
    );
    d0.write_config_text(&text);
    keel_ok(
        &d0,
        &["secrets", "set", "telegram.token"],
        Some(BOT.as_bytes()),
        &mut outputs,
    )
    .await;
    keel_ok(
        &d0,
        &["secrets", "set", "wa-token"],
        Some(WA.as_bytes()),
        &mut outputs,
    )
    .await;
    let mut d = d0;
    d.boot().await;
    // Telegram: a message in, a reply out, with the vault's bot token.
    tg.push_text(77, "/help");
    assert!(
        poll_until(DEADLINE, || async { (!tg.sent().is_empty()).then_some(()) })
            .await
            .is_some(),
        "no reply through the bot token from the vault"
    );
    assert!(
        tg.polls().iter().any(|(t, _)| t == BOT),
        "the fake Bot API never saw the token"
    );
    // WhatsApp: a signed message in, a reply out with the vault's access token.
    let body = serde_json::to_vec(&json!({"object": "whatsapp_business_account", "entry": [{"id": "1",
        "changes": [{"field": "messages", "value": {"messaging_product": "whatsapp",
        "metadata": {"phone_number_id": "1234"}, "contacts": [{"wa_id": "4915", "profile": {"name": "A"}}],
        "messages": [{"from": "4915", "id": "wamid.1", "timestamp": "1764590400", "type": "text",
        "text": {"body": "/help"}}]}}]}]}))
    .unwrap();
    let r = send(
        d.client
            .post(d.url("/v1/whatsapp"))
            .header("content-type", "application/json")
            .header("x-hub-signature-256", sign("wa-app-secret", &body))
            .body(body),
    )
    .await
    .expect("POST");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        poll_until(DEADLINE, || async {
            (!graph.replies().is_empty()).then_some(())
        })
        .await
        .is_some(),
        "no WhatsApp reply"
    );
    let status = d.status_json().await;
    outputs.push(String::from_utf8_lossy(&status.stdout).into_owned());
    let metrics = send(d.client.get(d.url("/metrics")))
        .await
        .expect("metrics")
        .body;
    assert!(d.sigterm(DEADLINE).await.success());
    let logs = format!(
        "{}{}",
        d.stderr_all(),
        std::fs::read_to_string(&d.stdout_path).unwrap_or_default()
    );
    for canary in [BOT, "canary-bot-token-ZZ91", WA] {
        assert!(
            files_containing(&d.data_dir, canary.as_bytes()).is_empty(),
            "{canary} at rest"
        );
        assert!(!logs.contains(canary), "{canary} in keel's log");
        assert!(
            !outputs.iter().any(|o| o.contains(canary)),
            "{canary} in command output"
        );
        assert!(!metrics.contains(canary), "{canary} in /metrics");
    }
}
