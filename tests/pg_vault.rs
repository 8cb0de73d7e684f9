//! Secrets in the shared PostgreSQL store (issue 13) through the real
//! binary: `keel secrets set/list/rm` with `[storage] backend = "postgres"`
//! work on the shared store directly, the stored value is encrypted (a
//! canary never appears in the row), each change leaves its audit record,
//! and an instance given another master key is refused with one line
//! naming its key source — by `keel secrets` and by `keel run`.

#![allow(clippy::disallowed_methods)] // a deadline for the child processes

#[path = "common/pg.rs"]
mod pg;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(60);
const KEY_A: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
const KEY_B: &str = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";

/// A data dir and its config file naming the shared store.
struct Instance {
    _dir: tempfile::TempDir,
    data_dir: PathBuf,
    config: PathBuf,
    key: &'static str,
}

impl Instance {
    fn new(url: &str, key: &'static str) -> Instance {
        Instance::with_config(url, key, "")
    }

    /// An instance whose config has `extra` after the `[storage]` table
    /// (top-level keys first: `extra` may start with them).
    fn with_config(url: &str, key: &'static str, extra: &str) -> Instance {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        std::fs::create_dir_all(&data_dir).unwrap();
        let config = dir.path().join("keel.toml");
        std::fs::write(
            &config,
            format!("{extra}\n[storage]\nbackend = \"postgres\"\nurl = \"{url}\"\n"),
        )
        .unwrap();
        Instance {
            _dir: dir,
            data_dir,
            config,
            key,
        }
    }

    /// `keel ARGS --data-dir … --config …` with this instance's key in
    /// `KEEL_MASTER_KEY`, `stdin` piped in.
    fn keel(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keel"));
        cmd.args(args)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--config")
            .arg(&self.config)
            .env_remove("KEEL_DATA_DIR")
            .env_remove("KEEL_CONFIG")
            .env_remove("KEEL_LISTEN")
            .env_remove("KEEL_DATABASE_URL")
            .env("KEEL_MASTER_KEY", self.key)
            .env("NO_COLOR", "1")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn keel");
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().expect("stdin pipe");
            pipe.write_all(input.as_bytes()).expect("write stdin");
        }
        let pid = child.id();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        match rx.recv_timeout(DEADLINE) {
            Ok(out) => out.expect("wait keel"),
            Err(_) => {
                // SAFETY: kill on the pid of the child this test spawned.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                panic!(
                    "`keel {}` did not finish within {DEADLINE:?}",
                    args.join(" ")
                );
            }
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The error lines of a failed command: exactly one, naming the key source
/// and what to do.
fn assert_key_refusal(out: &Output, what: &str) {
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{what} succeeded with another key");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(
        errors.len(),
        1,
        "{what}: one error line expected:\n{stderr}"
    );
    assert!(
        errors[0].contains("KEEL_MASTER_KEY") && errors[0].contains("same master key"),
        "{what}: the error names neither the key source nor the fix:\n{stderr}"
    );
}

fn secret_names(out: &Output) -> Vec<String> {
    assert!(out.status.success(), "list failed: {}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("list --json is JSON");
    v["secrets"]
        .as_array()
        .expect("a secrets array")
        .iter()
        .map(|s| s["name"].as_str().expect("a name").to_string())
        .collect()
}

fn sql(url: &str) -> postgres::Client {
    postgres::Client::connect(url, postgres::NoTls).expect("connect to the test database")
}

fn no_secrets_db(data_dir: &Path) {
    assert!(
        !data_dir.join("secrets.db").exists(),
        "secrets.db was written on backend = postgres"
    );
}

#[test]
fn secrets_live_encrypted_in_the_shared_store_and_another_key_is_refused() {
    const CANARY: &str = "canary-shared-secret-5d1e8b";
    let Some(db) = pg::fresh_db("pg_vault") else {
        return;
    };
    let a = Instance::new(&db.url, KEY_A);

    let set = a.keel(&["secrets", "set", "slack.bot_token"], Some(CANARY));
    assert!(set.status.success(), "set failed: {}", text(&set.stderr));

    let list = a.keel(&["secrets", "list", "--json"], None);
    assert_eq!(secret_names(&list), ["slack.bot_token"]);
    assert!(
        !text(&list.stdout).contains(CANARY),
        "list printed the value"
    );

    let mut client = sql(&db.url);
    let rows = client
        .query("SELECT name, value FROM secrets", &[])
        .unwrap();
    assert_eq!(rows.len(), 1);
    let stored: String = rows[0].get(1);
    assert!(!stored.contains(CANARY), "the value is stored in the clear");
    assert!(
        stored.len() > CANARY.len(),
        "the stored value is too short to be sealed"
    );
    let check: i64 = client
        .query_one(
            "SELECT COUNT(*) FROM meta WHERE key = 'vault.key_check'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(check, 1, "no key check written");
    no_secrets_db(&a.data_dir);

    // Another instance given another key: refused before anything is read
    // or written, by every command and by keel run.
    let b = Instance::new(&db.url, KEY_B);
    assert_key_refusal(&b.keel(&["secrets", "list"], None), "list");
    assert_key_refusal(
        &b.keel(&["secrets", "set", "other"], Some("value-b")),
        "set",
    );
    assert_key_refusal(&b.keel(&["run"], None), "keel run");
    // Rotating the key of one instance would lock it out: refused.
    let rekey = b.keel(&["rekey"], Some(""));
    assert!(!rekey.status.success(), "rekey ran on the shared store");
    assert!(
        text(&rekey.stderr).contains("does not re-encrypt the shared store"),
        "{}",
        text(&rekey.stderr)
    );
    let n: i64 = client
        .query_one("SELECT COUNT(*) FROM secrets", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "the refused instance wrote a secret");

    // An instance given the same key shares the secrets.
    let c = Instance::new(&db.url, KEY_A);
    let list = c.keel(&["secrets", "list", "--json"], None);
    assert_eq!(secret_names(&list), ["slack.bot_token"]);

    let rm = a.keel(&["secrets", "rm", "slack.bot_token"], None);
    assert!(rm.status.success(), "rm failed: {}", text(&rm.stderr));
    let list = a.keel(&["secrets", "list", "--json"], None);
    assert!(secret_names(&list).is_empty(), "the secret is still listed");
    let again = a.keel(&["secrets", "rm", "slack.bot_token"], None);
    assert_eq!(again.status.code(), Some(2), "rm of a missing secret");

    let audit: Vec<(String, String)> = client
        .query("SELECT kind, detail FROM audit ORDER BY seq", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let kinds: Vec<&str> = audit
        .iter()
        .filter(|(k, _)| k.starts_with("secret_"))
        .map(|(k, _)| k.as_str())
        .collect();
    assert_eq!(kinds, ["secret_set", "secret_removed"]);
    assert!(audit
        .iter()
        .filter(|(k, _)| k.starts_with("secret_"))
        .all(|(_, d)| d.contains("slack.bot_token") && !d.contains(CANARY)));
    no_secrets_db(&a.data_dir);
}

/// Hold `data_dir`'s lock as a running keel does: a `keel run` gets past
/// config load (where the vault is resolved) and stops at the lock, so the
/// test sees how far it got without starting keel.
fn hold_lock(data_dir: &Path) -> std::fs::File {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(data_dir.join("keel.lock"))
        .unwrap();
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );
    f
}

fn stderr_of_run(i: &Instance) -> String {
    let out = i.keel(&["run"], None);
    assert!(!out.status.success(), "keel run started");
    text(&out.stderr)
}

#[test]
fn keel_run_on_postgres_resolves_config_secrets_from_the_shared_store() {
    let Some(db) = pg::fresh_db("pg_vault_config") else {
        return;
    };
    let i = Instance::with_config(&db.url, KEY_A, "[telegram]\ntoken = \"vault:tg-bot\"");
    let _lock = hold_lock(&i.data_dir);
    let err = stderr_of_run(&i);
    assert!(
        err.contains("telegram.token = \"vault:tg-bot\": no such secret in the shared store"),
        "{err}"
    );
    let set = i.keel(&["secrets", "set", "tg-bot"], Some("123:canary-bot"));
    assert!(set.status.success(), "{}", text(&set.stderr));
    // Found: config load passed, keel stops at the held lock.
    let err = stderr_of_run(&i);
    assert!(err.contains("is in use by another keel"), "{err}");
    assert!(!err.contains("canary"), "a value was printed: {err}");

    // The `<channel>.<key>` fallback entries are looked up in the shared
    // store too: one whose value was moved there from another name does
    // not open, and keel run is refused naming it.
    let set = i.keel(
        &["secrets", "set", "telegram.webhook_secret"],
        Some("canary-hook"),
    );
    assert!(set.status.success(), "{}", text(&set.stderr));
    let err = stderr_of_run(&i);
    assert!(err.contains("is in use by another keel"), "{err}");
    let mut client = sql(&db.url);
    client
        .execute(
            "UPDATE secrets SET value = (SELECT value FROM secrets WHERE name = 'tg-bot') \
             WHERE name = 'telegram.webhook_secret'",
            &[],
        )
        .unwrap();
    let err = stderr_of_run(&i);
    assert!(
        err.contains("secret telegram.webhook_secret in the shared store")
            && err.contains("does not open"),
        "{err}"
    );
    assert!(!err.contains("canary"), "a value was printed: {err}");
    no_secrets_db(&i.data_dir);
}

/// The library path on PostgreSQL itself: `SharedVault` sets (an update
/// keeps `created_at`), reads, lists and removes; of several first openers
/// with different keys racing on an empty store exactly one key wins, and
/// the others are refused naming their key source.
#[test]
fn shared_vault_on_postgres_and_racing_first_openers_agree_on_one_key() {
    use keel_actors::masterkey::{KeyHandle, MasterKey};
    use keel_actors::persistence::portable::secrets::SharedVault;
    let Some(db) = pg::fresh_db("pg_vault_lib") else {
        return;
    };
    let keys: Vec<KeyHandle> = (0..4)
        .map(|i| KeyHandle::new(MasterKey::generate(), format!("test key {i}")))
        .collect();
    let barrier = std::sync::Barrier::new(keys.len());
    let opened: Vec<Result<SharedVault, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = keys
            .iter()
            .map(|k| {
                let (url, barrier) = (&db.url, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    SharedVault::open(url, k.clone()).map_err(|e| e.to_string())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let winners: Vec<usize> = (0..keys.len()).filter(|i| opened[*i].is_ok()).collect();
    assert_eq!(
        winners.len(),
        1,
        "first openers: {:?}",
        opened.iter().map(|r| r.as_ref().err()).collect::<Vec<_>>()
    );
    for (i, r) in opened.iter().enumerate() {
        if let Err(e) = r {
            assert!(
                e.contains(&format!("test key {i}")) && e.contains("same master key"),
                "{e}"
            );
        }
    }
    let winner = winners[0];
    let mut v = opened.into_iter().nth(winner).unwrap().unwrap();
    assert_eq!(v.key_source(), format!("test key {winner}"));
    v.set("a.b", b"first").unwrap();
    let created = v.list().unwrap()[0].created_at.clone();
    v.set("a.b", b"second").unwrap();
    assert_eq!(v.get("a.b").unwrap().unwrap().as_slice(), b"second");
    assert!(v.get("missing").unwrap().is_none());
    let list = v.list().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].created_at, created, "an update changed created_at");
    assert!(v.remove("a.b").unwrap());
    assert!(!v.remove("a.b").unwrap());
    assert!(v.list().unwrap().is_empty());
    // A later opener with the winning key opens; with another it is refused.
    assert!(SharedVault::open(&db.url, keys[winner].clone()).is_ok());
    let other = (winner + 1) % keys.len();
    assert!(SharedVault::open(&db.url, keys[other].clone()).is_err());
}
