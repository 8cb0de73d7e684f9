#![allow(clippy::disallowed_methods)] // real time: the token table's resync
//! The operator's commands on a shared store (issue 13) through the real
//! binary. With `[storage] backend = "postgres"` every instance's data dir
//! reaches the one store: `keel tokens`, `keel audit`, `keel sessions`,
//! `keel timers` and `keel tasks` read and write it from any instance, keel
//! running or not, and never create a local `keel.db`; a token granted on
//! one running instance is accepted by another, and a token revoked on one
//! is refused by the others, within a few seconds; the admin socket's secret
//! operations write the shared store, not a local `secrets.db`.

mod common;
#[path = "common/pg.rs"]
mod pg;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::Output;
use std::time::Duration;

use common::{poll_until, run_keel_env, send, toml_str, Config, Daemon};
use serde_json::{json, Value};

const KEY: &str = "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";
const DEADLINE: Duration = Duration::from_secs(60);
/// How long another instance may take to see a grant or a revocation
/// (it rereads the token table every second).
const SPREAD: Duration = Duration::from_secs(5);

fn instance(url: &str) -> Daemon {
    let mut d = Daemon::new(Config::default(), None);
    let text = d.config.to_toml()
        + &format!(
            "\n[storage]\nbackend = \"postgres\"\nurl = {}\n",
            toml_str(url)
        );
    d.write_config_text(&text);
    d.env.push(("KEEL_MASTER_KEY".into(), KEY.into()));
    d
}

/// `keel ARGS --data-dir … --config …` with the shared master key.
async fn keel(d: &Daemon, args: &[&str]) -> Output {
    let (data_dir, config) = (
        d.data_dir.display().to_string(),
        d.config_path.display().to_string(),
    );
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--data-dir", &data_dir, "--config", &config]);
    run_keel_env(&all, &[("KEEL_MASTER_KEY", KEY)], None, DEADLINE).await
}

async fn keel_ok(d: &Daemon, args: &[&str]) -> String {
    let out = keel(d, args).await;
    assert!(
        out.status.success(),
        "keel {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn keel_json(d: &Daemon, args: &[&str]) -> Value {
    let out = keel_ok(d, args).await;
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("keel {args:?}: not JSON ({e}): {out}"))
}

/// `(id, token)` of a new token granted from `d`'s data dir.
async fn grant(d: &Daemon, perm: &str) -> (String, String) {
    let out = keel_ok(d, &["tokens", "grant", "--perm", perm]).await;
    let token = out.lines().last().expect("a token line").to_string();
    let id = token
        .strip_prefix("keel_")
        .and_then(|t| t.split('_').next())
        .expect("keel_<id>_<secret>")
        .to_string();
    (id, token)
}

/// The status of `GET /v1/sessions` on `d` presenting `token`.
async fn sessions_with(d: &Daemon, token: &str) -> u16 {
    let req = d
        .client
        .get(d.url("/v1/sessions"))
        .header("authorization", format!("Bearer {token}"));
    send(req).await.expect("GET /v1/sessions").status
}

/// One request line on `d`'s admin socket, and its answer.
fn admin(d: &Daemon, request: &Value) -> Value {
    let mut s = UnixStream::connect(d.data_dir.join("keel-admin.sock")).expect("admin socket");
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(format!("{request}\n").as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).expect("an answer");
    serde_json::from_str(&line).expect("a JSON answer")
}

fn no_local_store(d: &Daemon) {
    for f in ["keel.db", "secrets.db"] {
        assert!(
            !d.data_dir.join(f).exists(),
            "{f} was written in {} on backend = postgres",
            d.data_dir.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_and_tokens_work_on_the_shared_store_from_every_instance() {
    let Some(db) = pg::fresh_db("pg_commands") else {
        return;
    };
    let (mut a, mut b) = (instance(&db.url), instance(&db.url));

    // Both stopped: a token granted from A's data dir lives in the shared
    // store and is listed from B's.
    let migrated = keel_ok(&a, &["migrate"]).await;
    assert!(migrated.contains("in the shared store"), "{migrated}");
    let (offline_id, offline) = grant(&a, "read").await;
    let listed = keel_json(&b, &["tokens", "list", "--json"]).await;
    let rows = listed["tokens"].as_array().expect("a tokens array");
    assert!(
        rows.iter()
            .any(|r| r["id"] == offline_id.as_str() && r["status"] == "active"),
        "B does not list the token granted from A: {listed}"
    );

    a.boot().await;
    b.boot().await;
    // The token granted while both were stopped opens both.
    assert_eq!(sessions_with(&a, &offline).await, 200);
    assert_eq!(sessions_with(&b, &offline).await, 200);

    // What A took in, read from B's data dir.
    a.post_ok("m-1", "chat-1", "hello from a").await;
    let list = keel_json(&b, &["sessions", "list", "--json"]).await;
    let ids: Vec<&str> = list["sessions"]
        .as_array()
        .expect("a sessions array")
        .iter()
        .filter_map(|s| s["id"].as_str())
        .collect();
    assert_eq!(ids.len(), 1, "sessions on the shared store: {list}");
    let shown = keel_json(&b, &["sessions", "show", ids[0], "--json"]).await;
    assert!(
        shown["turns"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["text"] == "hello from a")),
        "B's `sessions show` lacks A's turn: {shown}"
    );
    let out = tempfile::tempdir().unwrap();
    let export_dir = out.path().join("export");
    keel_ok(&b, &["sessions", "export", export_dir.to_str().unwrap()]).await;
    assert_eq!(std::fs::read_dir(&export_dir).unwrap().count(), 1);
    assert!(keel_json(&b, &["timers", "list", "--json"]).await["timers"].is_array());
    assert!(keel_json(&b, &["tasks", "list", "--json"]).await["tasks"].is_array());

    // Granted through running A's admin socket: B accepts it shortly.
    let (live_id, live) = grant(&a, "read").await;
    assert_eq!(sessions_with(&a, &live).await, 200);
    let seen = poll_until(SPREAD, || async {
        (sessions_with(&b, &live).await == 200).then_some(())
    })
    .await;
    assert!(
        seen.is_some(),
        "B did not accept a token granted on A within {SPREAD:?}"
    );

    // Revoked through running B: B refuses at once, A shortly.
    let revoked = keel_ok(&b, &["tokens", "revoke", &live_id]).await;
    assert!(revoked.contains("revoked"), "{revoked}");
    assert_eq!(sessions_with(&b, &live).await, 401);
    let refused = poll_until(SPREAD, || async {
        (sessions_with(&a, &live).await == 401).then_some(())
    })
    .await;
    assert!(
        refused.is_some(),
        "A still accepts a token revoked on B after {SPREAD:?}"
    );
    // And it stays refused (a later reread does not bring it back).
    let back = poll_until(Duration::from_millis(2_500), || async {
        (sessions_with(&a, &live).await != 401).then_some(())
    })
    .await;
    assert!(back.is_none(), "a revoked token was accepted again on A");
    // The other token is untouched everywhere.
    assert_eq!(sessions_with(&a, &offline).await, 200);
    assert_eq!(sessions_with(&b, &offline).await, 200);

    // The admin socket's secret operations work on the shared store.
    let set = admin(
        &a,
        &json!({"op": "secret_set", "name": "api-key", "value": "canary-xyzzy"}),
    );
    assert_eq!(set["set"], true, "{set}");
    let names = keel_json(&b, &["secrets", "list", "--json"]).await;
    assert!(
        names["secrets"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["name"] == "api-key")),
        "B does not list the secret set through A's admin socket: {names}"
    );
    let listed = admin(&b, &json!({"op": "secret_list"}));
    assert!(listed.to_string().contains("api-key"), "{listed}");
    assert!(!listed.to_string().contains("canary"), "{listed}");
    let removed = admin(&b, &json!({"op": "secret_rm", "name": "api-key"}));
    assert_eq!(removed["removed"], true, "{removed}");

    // Every change left its record in the one chain, which verifies.
    let verified = keel_json(&b, &["audit", "--verify", "--json"]).await;
    assert_eq!(verified["ok"], true, "{verified}");
    let records = keel_json(&a, &["audit", "--json"]).await;
    let kinds: Vec<&str> = records["records"]
        .as_array()
        .expect("a records array")
        .iter()
        .filter_map(|r| r["kind"].as_str())
        .collect();
    for (kind, n) in [
        ("token_granted", 2),
        ("token_revoked", 1),
        ("secret_set", 1),
        ("secret_removed", 1),
    ] {
        assert_eq!(
            kinds.iter().filter(|k| **k == kind).count(),
            n,
            "{kind} records in {kinds:?}"
        );
    }
    // A timer cancel from a data dir reaches the shared store as well.
    let out = keel(&a, &["timers", "cancel", "999999"]).await;
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("no active timer 999999"));

    a.sigterm(DEADLINE).await;
    b.sigterm(DEADLINE).await;
    a.assert_no_panics();
    b.assert_no_panics();
    no_local_store(&a);
    no_local_store(&b);
}
