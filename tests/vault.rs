#![allow(clippy::disallowed_methods)]
//! Encryption at rest (R28) through the real binary: the store on disk
//! holds no plaintext, the master key is found the same way by `run` and
//! the read-only commands, and a wrong, missing, too-open or truncated key
//! is a one-line error naming the key source and the file, with the files
//! left untouched.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::{run_keel_env, sha256_file, Config, Daemon};

const DEADLINE: Duration = Duration::from_secs(60);

/// Every byte of every file under `dir` (recursively).
pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
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

fn dir_args(d: &Daemon) -> Vec<String> {
    vec![
        "--data-dir".into(),
        d.data_dir.display().to_string(),
        "--config".into(),
        d.config_path.display().to_string(),
    ]
}

/// `keel ARGS --data-dir … --config …` with `env`.
async fn keel(d: &Daemon, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let extra = dir_args(d);
    let mut all: Vec<&str> = args.to_vec();
    all.extend(extra.iter().map(String::as_str));
    run_keel_env(&all, env, None, DEADLINE).await
}

/// Start `keel run` expecting a refusal; returns its stderr.
async fn refused_start(d: &Daemon, env: &[(&str, &str)]) -> String {
    let port = common::free_port();
    let mut cmd = tokio::process::Command::from(d.run_command(port));
    cmd.envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(DEADLINE, cmd.output())
        .await
        .expect("keel kept running with a bad key")
        .expect("run keel");
    assert!(!out.status.success(), "keel started with a bad key");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn error_lines(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.contains("error")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_is_encrypted_at_rest_and_read_only_commands_unlock_it() {
    const CANARY: &str = "canary-plaintext-7f3a9c";
    let mut d = Daemon::start(Config::default()).await;
    let key = d.data_dir.join("master.key");
    let mode = std::fs::metadata(&key)
        .expect("master.key created")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "master.key mode {mode:o}");
    assert!(
        d.stderr_all().contains("back it up"),
        "no line saying where the key is and to back it up"
    );
    for i in 0..20 {
        d.post_ok(&format!("m{i}"), "chat", &format!("{CANARY} number {i}"))
            .await;
    }
    // While keel runs: the read-only commands find the key the same way.
    let status = d.status_json().await;
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let sessions = keel(&d, &["sessions", "show", "webhook:chat", "--json"], &[]).await;
    assert!(
        sessions.status.success(),
        "{}",
        String::from_utf8_lossy(&sessions.stderr)
    );
    assert!(String::from_utf8_lossy(&sessions.stdout).contains(CANARY));
    for args in [&["timers", "list"][..], &["tasks", "list"][..]] {
        let out = keel(&d, args, &[]).await;
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        files_containing(&d.data_dir, CANARY.as_bytes()).is_empty(),
        "plaintext in the data dir while running: {:?}",
        files_containing(&d.data_dir, CANARY.as_bytes())
    );
    assert!(d.sigterm(DEADLINE).await.success());
    let hits = files_containing(&d.data_dir, CANARY.as_bytes());
    assert!(hits.is_empty(), "plaintext in {hits:?}");
    // Shutdown checkpointed with TRUNCATE: no WAL content left behind.
    let wal = d.data_dir.join("keel.db-wal");
    assert_eq!(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0), 0);
    // Without the key SQLite sees no database.
    let plain = rusqlite::Connection::open(d.db_path()).expect("open");
    assert!(plain
        .query_row("SELECT COUNT(*) FROM sqlite_master", [], |r| r
            .get::<_, i64>(0))
        .is_err());
    // With it, everything is there.
    let conn = common::open_db(&d.db_path());
    let n: i64 = conn
        .query_row("SELECT COUNT(*) FROM turns WHERE role = 'user'", [], |r| {
            r.get(0)
        })
        .expect("count");
    assert_eq!(n, 20);
    // KEEL_MASTER_KEY wins over the file and works for every command.
    let hex = common::master_key_hex(&d.data_dir).expect("key");
    std::fs::rename(&key, d.data_dir.join("moved.key")).expect("move key");
    let out = keel(&d, &["status", "--json"], &[("KEEL_MASTER_KEY", &hex)]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    d.env.push(("KEEL_MASTER_KEY".into(), hex));
    d.restart().await;
    assert!(
        !key.exists(),
        "keel created a key file although KEEL_MASTER_KEY was set"
    );
    assert!(d.sigterm(DEADLINE).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_missing_too_open_and_truncated_keys_are_refused_and_files_untouched() {
    let mut d = Daemon::start(Config::default()).await;
    d.post_ok("1", "chat", "hello").await;
    assert!(d.sigterm(DEADLINE).await.success());
    let db = d.db_path();
    let db_path = db.display().to_string();
    let key = d.data_dir.join("master.key");
    let key_path = key.display().to_string();
    let good = std::fs::read_to_string(&key).expect("key");
    let before = sha256_file(&db);

    // A wrong key from the environment: the source and the file are named.
    let wrong = "ab".repeat(32);
    for stderr in [
        refused_start(&d, &[("KEEL_MASTER_KEY", &wrong)]).await,
        String::from_utf8_lossy(
            &keel(&d, &["status"], &[("KEEL_MASTER_KEY", &wrong)])
                .await
                .stderr,
        )
        .into_owned(),
    ] {
        let lines = error_lines(&stderr);
        assert_eq!(lines.len(), 1, "{stderr}");
        assert!(
            lines[0].contains("KEEL_MASTER_KEY") && lines[0].contains(&db_path),
            "{stderr}"
        );
        assert!(!stderr.contains(&wrong), "the key was printed");
    }
    // A malformed environment key.
    let stderr = refused_start(&d, &[("KEEL_MASTER_KEY", "abc")]).await;
    assert!(
        stderr.contains("KEEL_MASTER_KEY") && stderr.contains("64 hex"),
        "{stderr}"
    );

    // Missing key file: named, and no new key is created over the store.
    std::fs::rename(&key, d.root().join("saved.key")).expect("move key");
    let stderr = refused_start(&d, &[]).await;
    assert!(
        stderr.contains(&key_path) && stderr.contains("missing"),
        "{stderr}"
    );
    assert!(
        !key.exists(),
        "a fresh key was created for an existing store"
    );
    let out = keel(&d, &["sessions", "list"], &[]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing"));
    std::fs::rename(d.root().join("saved.key"), &key).expect("restore key");

    // Readable by others: refused.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let stderr = refused_start(&d, &[]).await;
    assert!(
        stderr.contains(&key_path) && stderr.contains("readable by others"),
        "{stderr}"
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");

    // Truncated.
    std::fs::write(&key, &good[..30]).expect("truncate key");
    let stderr = refused_start(&d, &[]).await;
    assert!(
        stderr.contains(&key_path) && stderr.contains("64 hex"),
        "{stderr}"
    );
    // Same length, other key: a wrong key from the file.
    std::fs::write(&key, format!("{}\n", "cd".repeat(32))).expect("other key");
    let stderr = refused_start(&d, &[]).await;
    assert!(
        stderr.contains(&key_path) && stderr.contains(&db_path),
        "{stderr}"
    );

    assert_eq!(sha256_file(&db), before, "a refused start changed keel.db");
    std::fs::write(&key, &good).expect("restore key");
    d.restart().await;
    assert_eq!(d.turns("webhook:chat").await.len(), 2);
    assert!(d.sigterm(DEADLINE).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypt_false_keeps_plain_sqlite_and_a_plain_store_is_not_opened_encrypted() {
    let plain_cfg = Config {
        extra: "[storage]\nencrypt = false\n".into(),
        ..Config::default()
    };
    let mut d = Daemon::start(plain_cfg).await;
    d.post_ok("1", "chat", "plain text here").await;
    let out = d.status_json().await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(d.sigterm(DEADLINE).await.success());
    let conn = rusqlite::Connection::open(d.db_path()).expect("open");
    let n: i64 = conn
        .query_row("SELECT COUNT(*) FROM turns", [], |r| r.get(0))
        .expect("plain read");
    assert_eq!(n, 2);
    drop(conn);
    // The same store with encryption on: refused, naming the migration.
    let before = sha256_file(&d.db_path());
    d.write_config_text(&Config::default().to_toml());
    let stderr = refused_start(&d, &[]).await;
    assert!(
        stderr.contains("plain SQLite") && stderr.contains("migrate --encrypt"),
        "{stderr}"
    );
    assert_eq!(sha256_file(&d.db_path()), before);
}

/// A plain store with no vault yet (made by a keel before the vault, or
/// seeded by a tool such as `keel bench timers`) holds nothing a key
/// would open: keel starts, makes the key, and keeps what was stored. With
/// a `secrets.db` present the missing key is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_store_without_a_vault_starts_with_a_new_key() {
    let plain_cfg = Config {
        extra: "[storage]\nencrypt = false\n".into(),
        ..Config::default()
    };
    let mut d = Daemon::start(plain_cfg).await;
    d.post_ok("1", "chat", "kept").await;
    assert!(d.sigterm(DEADLINE).await.success());
    let key = d.data_dir.join("master.key");
    let secrets = d.data_dir.join("secrets.db");
    // With a secret stored, the vault needs its key: keel refuses, as before.
    let mut args = vec!["secrets", "set", "probe"];
    let extra = dir_args(&d);
    args.extend(extra.iter().map(String::as_str));
    let set = run_keel_env(&args, &[], Some(b"value"), DEADLINE).await;
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    assert!(secrets.exists(), "secrets set made secrets.db");
    std::fs::rename(&key, d.root().join("saved.key")).expect("move key");
    let stderr = refused_start(&d, &[]).await;
    assert!(stderr.contains("missing"), "{stderr}");
    assert!(!key.exists(), "a fresh key was created beside a vault");
    // No vault at all: nothing needs the old key.
    for f in std::fs::read_dir(&d.data_dir).expect("data dir") {
        let p = f.expect("entry").path();
        if p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("secrets.db"))
        {
            std::fs::remove_file(&p).expect("remove");
        }
    }
    d.boot().await;
    assert!(key.exists(), "a new key was made");
    assert_eq!(
        d.turns("webhook:chat").await.len(),
        2,
        "what was stored is kept"
    );
    assert!(d.sigterm(DEADLINE).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_keeps_the_vault_in_memory_with_no_key_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).expect("mkdir");
    let listen = format!("127.0.0.1:{}", common::free_port());
    let out = common::run_keel(
        &[
            "run",
            "--ephemeral",
            "--stdin",
            "--data-dir",
            &data.display().to_string(),
            "--listen",
            &listen,
        ],
        Some(b"/remember color blue\n/recall color\n"),
        DEADLINE,
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("blue"));
    let left: Vec<_> = std::fs::read_dir(&data)
        .expect("data dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert!(left.is_empty(), "an ephemeral keel wrote {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keychain_source_keeps_the_key_out_of_the_data_dir() {
    let cfg = Config {
        extra: "[vault]\nkey_source = \"keychain\"\n".into(),
        ..Config::default()
    };
    let mut d = Daemon::start(cfg).await;
    d.post_ok("1", "chat", "keychain-canary-90ab").await;
    assert!(
        d.stderr_all().contains("keyutils"),
        "no line naming the backend"
    );
    let out = keel(&d, &["status", "--json"], &[]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(d.sigterm(DEADLINE).await.success());
    assert!(
        !d.data_dir.join("master.key").exists(),
        "a key file was written"
    );
    assert!(files_containing(&d.data_dir, b"keychain-canary-90ab").is_empty());
    d.restart().await;
    assert_eq!(d.turns("webhook:chat").await.len(), 2);
    assert!(d.sigterm(DEADLINE).await.success());
    let ring =
        linux_keyutils::KeyRing::from_special_id(linux_keyutils::KeyRingIdentifier::User, false)
            .expect("user keyring");
    let description = format!("keel:{}", d.data_dir.display());
    let stored = |ring: &linux_keyutils::KeyRing| {
        ring.search(&description)
            .expect("the key is in the user keyring")
            .read_to_vec()
            .expect("read the key")
    };
    // keel rekey (a fresh key: empty stdin) updates the keychain entry;
    // the stores open with the new key, still no key file.
    let before_key = stored(&ring);
    let mut all = vec!["rekey".to_string()];
    all.extend(dir_args(&d));
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    let out = run_keel_env(&refs, &[], Some(b""), DEADLINE).await;
    assert!(
        out.status.success(),
        "rekey: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("keychain"));
    assert_ne!(
        stored(&ring),
        before_key,
        "the keychain entry holds the new key"
    );
    assert!(!d.data_dir.join("master.key").exists());
    d.restart().await;
    assert_eq!(d.turns("webhook:chat").await.len(), 2);
    assert!(d.sigterm(DEADLINE).await.success());
    // Gone from the keychain: a clear refusal, the store untouched.
    let key = ring
        .search(&description)
        .expect("the key is in the user keyring");
    key.invalidate().expect("remove the test's key");
    let before = sha256_file(&d.db_path());
    let stderr = refused_start(&d, &[]).await;
    assert!(stderr.contains("no master key stored"), "{stderr}");
    assert_eq!(sha256_file(&d.db_path()), before);
}
