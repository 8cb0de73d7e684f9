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
