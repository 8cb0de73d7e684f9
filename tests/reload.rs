//! R34: SIGHUP reloads the config file through the startup validation path. A valid
//! change applies at once (a new `webhook.secret` is enforced); an invalid file
//! (unknown key, broken TOML) is rejected with `config reload rejected` in the log,
//! the old config stays in force and the daemon stays ready.

mod common;

use std::time::Duration;

use common::{sign, toml_str, Config, Daemon};
use serde_json::json;

/// How long a reload may take to show up in the log.
const RELOAD_DEADLINE: Duration = Duration::from_secs(15);

/// POSTs `body` with an optional signature header and returns the status.
async fn post_status(d: &Daemon, body: &[u8], signature: Option<String>) -> u16 {
    let headers: Vec<(&str, String)> = signature
        .map(|s| vec![("x-keel-signature", s)])
        .unwrap_or_default();
    let r = d.post_raw(body.to_vec(), &headers).await.expect("POST");
    if r.status != 200 {
        assert!(
            r.error_problem().is_none(),
            "{}",
            r.error_problem().unwrap_or_default()
        );
    }
    r.status
}

fn body(id: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"id": id, "chat": "reload", "from": "u", "text": "hi"}))
        .expect("serialize")
}

/// Sends SIGHUP and waits for the `n`th occurrence of `needle` in the log.
async fn hup_and_wait(d: &Daemon, needle: &str, n: usize) {
    d.signal(libc::SIGHUP);
    assert!(
        d.wait_for_log(needle, n, RELOAD_DEADLINE).await,
        "no {needle:?} (occurrence {n}) in the log after SIGHUP:\n{}",
        common::tail(&d.stderr_boot(), 30)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_new_secret_enforces_it() {
    let d = Daemon::start(Config::default()).await;
    assert_eq!(post_status(&d, &body("before"), None).await, 200);

    let secret = "fresh-secret";
    let new = Config {
        secret: Some(secret.to_string()),
        ..Config::default()
    };
    d.write_config_text(&new.to_toml());
    hup_and_wait(&d, "config reloaded", 1).await;

    let b = body("unsigned-after");
    assert_eq!(
        post_status(&d, &b, None).await,
        401,
        "unsigned POST after reload"
    );
    let b = body("signed-after");
    assert_eq!(
        post_status(&d, &b, Some(sign(secret, &b))).await,
        200,
        "signed POST"
    );
    assert_eq!(d.readyz().await.expect("readyz").status, 200);
    d.assert_no_panics();
}

/// Shared body of the rejection tests: start with secret `old`, install `bad` (which
/// also names another secret), SIGHUP, and check the old config still rules.
async fn rejected_reload_keeps_old_config(bad: &str) {
    let old = "old-secret";
    let d = Daemon::start(Config {
        secret: Some(old.to_string()),
        ..Config::default()
    })
    .await;
    d.write_config_text(bad);
    hup_and_wait(&d, "config reload rejected", 1).await;
    assert!(
        !d.stderr_boot().contains("config reloaded"),
        "the invalid config was reported as reloaded"
    );

    assert_eq!(
        d.readyz().await.expect("readyz").status,
        200,
        "readyz after rejection"
    );
    let b = body("r1");
    assert_eq!(
        post_status(&d, &b, None).await,
        401,
        "unsigned POST after rejection"
    );
    let b = body("r2");
    assert_eq!(
        post_status(&d, &b, Some(sign("new-secret", &b))).await,
        401,
        "new secret"
    );
    let b = body("r3");
    assert_eq!(
        post_status(&d, &b, Some(sign(old, &b))).await,
        200,
        "old secret"
    );

    // A later valid reload is still possible.
    let good = Config {
        secret: Some("third-secret".to_string()),
        ..Config::default()
    };
    d.write_config_text(&good.to_toml());
    hup_and_wait(&d, "config reloaded", 1).await;
    let b = body("r4");
    assert_eq!(
        post_status(&d, &b, Some(sign("third-secret", &b))).await,
        200
    );
    d.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_unknown_key_is_rejected_and_old_config_stays() {
    let bad = format!(
        "log_level = \"info\"\nno_such_key = 1\n\n[webhook]\nenabled = true\nsecret = {}\n",
        toml_str("new-secret")
    );
    rejected_reload_keeps_old_config(&bad).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_broken_toml_is_rejected_and_old_config_stays() {
    let bad = format!(
        "log_level = \"info\"\n\n[webhook\nenabled = true\nsecret = {}\n",
        toml_str("new-secret")
    );
    rejected_reload_keeps_old_config(&bad).await;
}

/// The "config reloaded (applied: …; restart needed: …)" line of reload `n`
/// (1-based), split into its two key lists.
async fn reload_lists(d: &Daemon, n: usize) -> (Vec<String>, Vec<String>) {
    hup_and_wait(d, "config reloaded (", n).await;
    let log = d.stderr_boot();
    let line = log
        .lines()
        .filter(|l| l.contains("config reloaded ("))
        .nth(n - 1)
        .expect("the reload line")
        .to_string();
    let inner = line
        .split_once("config reloaded (")
        .and_then(|(_, rest)| rest.rsplit_once(')'))
        .map(|(inner, _)| inner.to_string())
        .unwrap_or_else(|| panic!("unparsable reload line: {line}"));
    let (applied, restart) = inner
        .split_once("; restart needed: ")
        .unwrap_or_else(|| panic!("no restart list in: {line}"));
    let keys = |s: &str| -> Vec<String> {
        let s = s.trim_start_matches("applied: ");
        if s == "nothing" {
            vec![]
        } else {
            s.split(", ").map(str::to_string).collect()
        }
    };
    (keys(applied), keys(restart))
}

/// One change per config section; each reload starts from the same base,
/// so the previous case's change is undone by the next (and reported).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_section_reports_each_changed_key_as_applied_or_restart_needed() {
    let mut d = Daemon::new(Config::default(), None);
    let base = "# every key at its default\n";
    d.write_config_text(base);
    d.boot().await;
    // (section, toml added to the base, key, applied live?)
    let cases: &[(&str, &str, &str, bool)] = &[
        ("top level", "log_level = \"debug\"\n", "log_level", true),
        (
            "top level",
            "shutdown_timeout_ms = 4000\n",
            "shutdown_timeout_ms",
            true,
        ),
        (
            "storage",
            "[storage]\nmax_batch = 64\n",
            "storage.max_batch",
            false,
        ),
        (
            "storage",
            "[storage]\nsynchronous = \"normal\"\n",
            "storage.synchronous",
            false,
        ),
        (
            "webhook",
            "[webhook]\nmax_body_bytes = 1000\n",
            "webhook.max_body_bytes",
            true,
        ),
        (
            "webhook",
            "[webhook]\nreply_url = \"http://127.0.0.1:9/r\"\n",
            "webhook.reply_url",
            true,
        ),
        (
            "webhook",
            "[webhook]\nenabled = false\n",
            "webhook.enabled",
            false,
        ),
        (
            "admin",
            "[admin]\nloopback_open = false\n",
            "admin.loopback_open",
            true,
        ),
        (
            "cli",
            "[cli]\nsocket = \"other.sock\"\n",
            "cli.socket",
            false,
        ),
        (
            "agent",
            "[agent]\ntimeout_ms = 1234\n",
            "agent.timeout_ms",
            true,
        ),
        (
            "owner",
            "[owner]\nchannel = \"webhook\"\nchat = \"ops\"\n",
            "owner",
            false,
        ),
        (
            "outbox",
            "[outbox]\nconcurrency = 2\n",
            "outbox.concurrency",
            true,
        ),
        (
            "outbox",
            "[outbox]\nsend_timeout_ms = 777\n",
            "outbox.send_timeout_ms",
            true,
        ),
        (
            "timers",
            "[timers]\nretention_days = 3\n",
            "timers.retention_days",
            true,
        ),
        (
            "telegram",
            "[telegram]\nlimit = 7\n",
            "telegram.limit",
            false,
        ),
        (
            "slack",
            "[slack]\nsilence_timeout_s = 9\n",
            "slack.silence_timeout_s",
            false,
        ),
        (
            "adapters",
            "[adapters]\nattempts = 2\n",
            "adapters.attempts",
            true,
        ),
        ("adapters", "[adapters]\nseed = 5\n", "adapters.seed", false),
        (
            "tasks",
            "[tasks]\nconcurrency = 2\n",
            "tasks.concurrency",
            true,
        ),
        (
            "task",
            "[task.hello]\ncommand = [\"echo\", \"hi\"]\n",
            "task",
            true,
        ),
    ];
    let mut previous: Option<(&str, bool)> = None;
    for (n, (section, change, key, live)) in cases.iter().enumerate() {
        d.write_config_text(&format!("{base}{change}"));
        let (applied, restart) = reload_lists(&d, n + 1).await;
        let (want, other) = if *live {
            (&applied, &restart)
        } else {
            (&restart, &applied)
        };
        assert!(
            want.iter().any(|k| k == key) && !other.iter().any(|k| k == key),
            "[{section}] {key}: applied {applied:?}, restart needed {restart:?}"
        );
        // Undoing the previous case is reported too (a live key is applied
        // back; a restart-only one simply stops being pending).
        if let Some((prev, prev_live)) = previous {
            if prev != *key && prev_live {
                assert!(
                    applied.iter().any(|k| k == prev),
                    "[{section}] undoing {prev} not reported: {applied:?}"
                );
            }
            if prev != *key && !prev_live {
                assert!(
                    !restart.iter().any(|k| k == prev),
                    "[{section}] {prev} still pending after undo: {restart:?}"
                );
            }
        }
        previous = Some((key, *live));
    }
    assert_eq!(d.readyz().await.expect("readyz").status, 200);
    d.assert_no_panics();
}

/// Live keys take effect at once; restart-only keys are listed by
/// `keel status` while keel runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_keys_take_effect_and_status_lists_the_pending_ones() {
    let mut d = Daemon::new(Config::default(), None);
    let base = "log_level = \"info\"\n";
    d.write_config_text(base);
    d.boot().await;
    assert_eq!(d.get("/v1/sessions").await.expect("GET").status, 200);

    d.write_config_text(&format!(
        "{base}[admin]\nloopback_open = false\n[webhook]\nmax_body_bytes = 200\n[storage]\nmax_batch = 8\n"
    ));
    let (applied, restart) = reload_lists(&d, 1).await;
    assert!(
        applied.contains(&"admin.loopback_open".to_string()),
        "{applied:?}"
    );
    assert_eq!(restart, vec!["storage.max_batch".to_string()]);
    // admin applies live: loopback needs a token now (401).
    assert_eq!(d.get("/v1/sessions").await.expect("GET").status, 401);
    // The body limit applies live.
    let big = serde_json::to_vec(
        &json!({"id": "big", "chat": "c", "from": "u", "text": "x".repeat(300)}),
    )
    .expect("json");
    assert_eq!(post_status(&d, &big, None).await, 413);
    // keel status names what waits for a restart.
    let out = d.status_json().await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
    assert_eq!(
        v["config"]["restart_needed"],
        json!(["storage.max_batch"]),
        "{v}"
    );

    // Back to the file keel started with: nothing pending, admin open again.
    d.write_config_text(base);
    let (_, restart) = reload_lists(&d, 2).await;
    assert!(restart.is_empty(), "{restart:?}");
    assert_eq!(d.get("/v1/sessions").await.expect("GET").status, 200);
    let out = d.status_json().await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
    assert_eq!(v["config"]["restart_needed"], json!([]), "{v}");
    d.assert_no_panics();
}
