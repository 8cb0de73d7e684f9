//! keel under systemd, without systemd: a fake `NOTIFY_SOCKET` (a Unix
//! datagram socket this test binds) receives what keel tells the service
//! manager.
//! - READY=1 only after recovery (`/readyz` is already 200 when it arrives);
//! - `WATCHDOG=1` every `WATCHDOG_USEC / 2` while keel makes progress;
//! - the pings stop while the store's writer is wedged (another connection
//!   holds the database's write lock) and resume once it is free;
//! - STOPPING=1 on SIGTERM, before the process exits.
//!
//! And `deploy/keel.service` passes `systemd-analyze verify` (skips without
//! systemd-analyze unless `KEEL_TEST_REQUIRE_SYSTEMD=1`).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Config, Daemon};
use tokio::time::Instant;

#[allow(clippy::disallowed_methods)] // the test reads its own switches
fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// `GET /readyz` over a plain TCP connection: the status code.
fn readyz_status(port: u16) -> u16 {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return 0;
    };
    let _ = s.write_all(b"GET /readyz HTTP/1.0\r\nHost: x\r\n\r\n");
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Every datagram received: (when, text, `/readyz` status probed on READY=1).
type Log = Arc<Mutex<Vec<(Instant, String, Option<u16>)>>>;

fn listen(sock: UnixDatagram, port: u16) -> Log {
    let log: Log = Arc::default();
    let out = log.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = sock.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).to_string();
            let probe = text
                .lines()
                .any(|l| l == "READY=1")
                .then(|| readyz_status(port));
            out.lock().unwrap().push((Instant::now(), text, probe));
        }
    });
    log
}

fn count(log: &Log, what: &str, after: Instant, before: Instant) -> usize {
    log.lock()
        .unwrap()
        .iter()
        .filter(|(t, m, _)| *t >= after && *t < before && m.lines().any(|l| l == what))
        .count()
}

async fn wait_for(log: &Log, what: &str, deadline: Duration) -> bool {
    common::poll_until(deadline, || async {
        log.lock()
            .unwrap()
            .iter()
            .any(|(_, m, _)| m.lines().any(|l| l == what))
            .then_some(())
    })
    .await
    .is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_ready_after_recovery_watchdog_only_while_the_writer_answers_stopping_on_sigterm() {
    let mut d = Daemon::new(
        Config {
            extra: "[storage]\nencrypt = false\n".into(),
            ..Config::default()
        },
        None,
    );
    let sock_path = d.root().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    d.env
        .push(("NOTIFY_SOCKET".into(), sock_path.display().to_string()));
    // Pings every 500 ms.
    d.env.push(("WATCHDOG_USEC".into(), "1000000".into()));
    d.spawn();
    let log = listen(sock, d.port);
    assert!(
        wait_for(&log, "READY=1", Duration::from_secs(30)).await,
        "no READY=1; stderr:\n{}",
        d.stderr_all()
    );
    let probe = log.lock().unwrap().iter().find_map(|(_, _, p)| *p).unwrap();
    assert_eq!(probe, 200, "READY=1 came before /readyz said ready");
    // Nothing but READY=1 before it (no early watchdog pings).
    let first = log.lock().unwrap()[0].1.clone();
    assert!(
        first.lines().any(|l| l == "READY=1"),
        "first message: {first:?}"
    );

    // The rate: about one ping per 500 ms.
    let from = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pings = count(&log, "WATCHDOG=1", from, Instant::now());
    assert!(
        (4..=8).contains(&pings),
        "{pings} pings in 3 s at a 500 ms interval"
    );

    // Wedge the writer: another connection takes the write lock and holds it.
    let db = rusqlite::Connection::open(d.db_path()).unwrap();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    // A write that must go through the writer (it waits for the lock).
    let client = d.client.clone();
    let url = d.url("/v1/messages");
    let _queued = tokio::spawn(async move {
        let _ = client
            .post(url)
            .json(&serde_json::json!({"id": "w1", "chat": "c", "from": "u", "text": "hi"}))
            .send()
            .await;
    });
    let wedged = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    // The tick in flight when the lock was taken may still ping once.
    let during = count(
        &log,
        "WATCHDOG=1",
        wedged + Duration::from_millis(1200),
        Instant::now(),
    );
    assert_eq!(
        during, 0,
        "watchdog pings went on while the writer was wedged"
    );
    assert!(
        d.wait_for_log("watchdog pings withheld", 1, Duration::from_secs(5))
            .await,
        "no log line about the withheld pings"
    );

    // Free the writer: the pings resume.
    db.execute_batch("ROLLBACK").unwrap();
    drop(db);
    let freed = Instant::now();
    let resumed = common::poll_until(Duration::from_secs(15), || async {
        (count(&log, "WATCHDOG=1", freed, Instant::now()) >= 2).then_some(())
    })
    .await;
    assert!(
        resumed.is_some(),
        "pings did not resume after the lock was released"
    );

    let status = d.sigterm(Duration::from_secs(20)).await;
    assert!(status.success(), "keel exited with {status}");
    assert!(
        wait_for(&log, "STOPPING=1", Duration::from_secs(5)).await,
        "no STOPPING=1 on SIGTERM"
    );
    d.assert_no_panics();
}

#[test]
fn the_unit_file_verifies() {
    let unit = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/keel.service");
    let text = std::fs::read_to_string(&unit).expect("deploy/keel.service");
    for key in [
        "Type=notify",
        "WatchdogSec=30",
        "Restart=on-failure",
        "User=keel",
        "StateDirectory=keel",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "ProtectHome=yes",
        "RestrictAddressFamilies=",
    ] {
        assert!(text.contains(key), "keel.service lacks {key}");
    }
    // Above keel's default drain deadline (shutdown_timeout_ms = 5 s).
    let stop: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .and_then(|v| v.trim().parse().ok())
        .expect("TimeoutStopSec= in seconds");
    assert!(
        stop > 5,
        "TimeoutStopSec={stop} is not above the drain deadline"
    );

    let Some(analyze) = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
    else {
        if env("KEEL_TEST_REQUIRE_SYSTEMD").as_deref() == Some("1") {
            panic!("KEEL_TEST_REQUIRE_SYSTEMD=1 but systemd-analyze is missing (apt-get install systemd)");
        }
        eprintln!("skipping: systemd-analyze is not installed");
        return;
    };
    // The unit names /usr/local/bin/keel, which `verify` checks exists:
    // verify a copy that names this build's binary instead (nothing else
    // changed).
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("keel.service");
    std::fs::write(
        &copy,
        text.replace("/usr/local/bin/keel", common::keel_bin()),
    )
    .unwrap();
    let out = std::process::Command::new(analyze)
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify failed ({}):\n{stderr}",
        out.status
    );
}

/// The unit's process hardening, applied the way systemd applies it
/// (`setpriv`, which execs keel in place): `NoNewPrivileges=yes` and an
/// empty `CapabilityBoundingSet=`. keel starts, accepts a message and stops
/// cleanly under them, and it maps no memory writable and executable at
/// once (what `MemoryDenyWriteExecute=yes` forbids). The filesystem and
/// system-call sandbox need systemd itself; `systemd-analyze verify`
/// checks those directives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keel_runs_without_privileges_and_maps_nothing_writable_and_executable() {
    let Some(setpriv) = ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
    else {
        eprintln!("skipping: setpriv is not installed");
        return;
    };
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/keel.service"),
    )
    .unwrap();
    for key in [
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=\n",
        "MemoryDenyWriteExecute=yes",
    ] {
        assert!(text.contains(key), "keel.service lacks {key:?}");
    }
    let mut d = Daemon::new(Config::default(), None);
    d.wrapper = [
        setpriv,
        "--no-new-privs",
        "--bounding-set=-all",
        "--inh-caps=-all",
    ]
    .map(String::from)
    .to_vec();
    d.boot().await;
    let pid = d.pid().expect("keel's pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(field("NoNewPrivs:"), "1", "{status}");
    assert_eq!(field("CapBnd:"), "0000000000000000", "{status}");
    d.post_ok("m1", "hardened", "hello").await;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let wx: Vec<&str> = maps
        .lines()
        .filter(|l| {
            let perms = l.split_whitespace().nth(1).unwrap_or("");
            perms.contains('w') && perms.contains('x')
        })
        .collect();
    assert!(wx.is_empty(), "writable and executable mappings: {wx:#?}");
    assert!(d.sigterm(Duration::from_secs(30)).await.success());
    d.assert_no_panics();
}
