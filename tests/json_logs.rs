//! `log_format = "json"` and `KEEL_LOG_FORMAT=json`: every stderr line of
//! the real binary is one JSON object with timestamp, level, target,
//! message and the event's fields; a canary bot token and webhook secret,
//! used by failing requests that get logged, appear in no line.

mod common;
#[path = "common/telegram.rs"]
mod telegram;

use std::time::Duration;

use common::{Config, Daemon};
use serde_json::Value;
use telegram::{config_toml, FakeTelegram, Fault};

const TOKEN: &str = "777:CANARY-json-logs-5d1e";
const SECRET: &str = "CANARY-webhook-secret-9b2c";

/// Every line parses as a JSON object with the four keys; returns them.
fn lines(log: &str) -> Vec<Value> {
    log.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}"));
            for key in ["timestamp", "level", "target", "message"] {
                assert!(v.get(key).is_some(), "no {key} in {l}");
            }
            v
        })
        .collect()
}

async fn exercise(d: &Daemon, tg: &FakeTelegram) {
    // Failing polls are logged with their error; a badly signed webhook
    // request is logged as refused.
    tg.fail_polls([
        Fault::api(502, "Bad Gateway", None),
        Fault::api(401, "Unauthorized", None),
    ]);
    assert!(
        d.wait_for_log("adapter stopped", 1, Duration::from_secs(30))
            .await,
        "telegram never stopped on 401:\n{}",
        d.stderr_all()
    );
    let r = d
        .post_raw(
            br#"{"id":"1","chat":"c","from":"u","text":"x"}"#.to_vec(),
            &[("X-Keel-Signature", "sha256=00".to_string())],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_from_the_config_file_and_from_the_environment_carry_no_secret() {
    let tg = FakeTelegram::start();
    let extra =
        "\n[adapters]\nbackoff_initial_ms = 50\nbackoff_max_ms = 200\nattempts = 5\nseed = 1\n";
    let mut d = Daemon::new(
        Config {
            secret: Some(SECRET.into()),
            ..Config::default()
        },
        None,
    );
    let text = format!(
        "log_format = \"json\"\n{}{}",
        d.config.to_toml(),
        config_toml(&tg.url, TOKEN, extra)
    );
    d.write_config_text(&text);
    d.boot().await;
    exercise(&d, &tg).await;
    d.sigterm(Duration::from_secs(20)).await;
    let log = d.stderr_all();
    let all = lines(&log);
    assert!(all
        .iter()
        .any(|v| v["message"] == "keel ready" && v["boot_epoch"] == 1));
    assert!(
        all.iter().any(|v| v["level"] == "WARN"
            && v.get("adapter").is_some()
            && v.get("error").is_some()),
        "no WARN line with adapter and error fields"
    );
    assert!(all
        .iter()
        .all(|v| v["target"].as_str().is_some_and(|t| !t.is_empty())));
    assert!(all.iter().any(|v| v["target"]
        .as_str()
        .is_some_and(|t| t.starts_with("keel_actors"))));
    assert!(!log.contains("CANARY"), "a secret reached the log");

    // The environment chooses too (over a file that says text).
    let text = format!(
        "log_format = \"text\"\n{}{}",
        d.config.to_toml(),
        config_toml(&tg.url, TOKEN, extra)
    );
    d.write_config_text(&text);
    d.env.push(("KEEL_LOG_FORMAT".into(), "json".into()));
    d.restart().await;
    d.sigterm(Duration::from_secs(20)).await;
    let boot = d.stderr_boot();
    assert!(lines(&boot).iter().any(|v| v["message"] == "keel ready"));
    assert!(!d.stderr_all().contains("CANARY"));

    // A bad value is one clear line, and keel does not start.
    d.env.retain(|(k, _)| k != "KEEL_LOG_FORMAT");
    d.env.push(("KEEL_LOG_FORMAT".into(), "yaml".into()));
    d.spawn();
    let status = d
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("keel exits");
    assert!(!status.success());
    assert!(
        d.stderr_boot()
            .contains("KEEL_LOG_FORMAT must be text or json, not \"yaml\""),
        "{}",
        d.stderr_boot()
    );
    d.assert_no_panics();
}
