//! C3: graceful shutdown. SIGTERM under load exits 0 within the deadline, loses no
//! acknowledged message and leaves the WAL checkpointed; `/readyz` stops saying
//! ready once shutdown begins; a second signal ends the process at once; an idle
//! daemon does not wait for its deadline.

// Tests drive real processes in real time: clippy.toml's clock and env rules are for keel itself.
#![allow(clippy::disallowed_methods)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{client_specs, Config, Daemon, HangServer, Ledger, Load, Outcome, ReplyServer};

/// Slack on top of the configured shutdown deadline (debug build, loaded machine).
const MARGIN: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_load_exits_zero_keeps_acked_and_checkpoints_wal() {
    let replies = ReplyServer::start();
    let deadline_ms = 5000;
    let mut d = Daemon::start(Config {
        reply_url: Some(replies.url.clone()),
        shutdown_timeout_ms: Some(deadline_ms),
        ..Config::default()
    })
    .await;
    let ledger = Arc::new(Ledger::new());
    let load = Load::start(d.base(), None, client_specs(16, "term"), ledger.clone());
    assert!(
        load.wait_acked(50, Duration::from_secs(30)).await,
        "load got only {} acks before SIGTERM",
        load.acked()
    );

    d.signal(libc::SIGTERM);
    let signalled = Instant::now();
    let status = d
        .wait_exit(Duration::from_millis(deadline_ms) + MARGIN)
        .await;
    load.stop().await;
    let status = status.unwrap_or_else(|| {
        panic!(
            "keel still running {:?} after SIGTERM (deadline {deadline_ms} ms)",
            signalled.elapsed()
        )
    });
    assert!(status.success(), "keel exited with {status} after SIGTERM");
    eprintln!("exit after SIGTERM took {:?}", signalled.elapsed());

    let wal = d.data_dir.join("keel.db-wal");
    let wal_len = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    assert_eq!(
        wal_len,
        0,
        "{} holds {wal_len} bytes after a clean exit",
        wal.display()
    );

    d.restart().await;
    ledger.check(&d.user_key_counts().await).assert_clean();
    assert!(d
        .sigterm(Duration::from_millis(deadline_ms) + MARGIN)
        .await
        .success());
    d.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_during_shutdown_is_503_shutting_down_or_refused() {
    let hang = HangServer::start().await;
    let mut d = Daemon::start(Config {
        reply_url: Some(hang.url.clone()),
        shutdown_timeout_ms: Some(3000),
        ..Config::default()
    })
    .await;
    for i in 0..5 {
        d.post_ok(&format!("rz-{i}"), "rz", "hello").await;
    }
    let client = common::http_client();
    let url = d.url("/readyz");

    d.signal(libc::SIGTERM);
    // Before the daemon has handled the signal it may still say ready; from the first
    // answer that is not 200 on, it must never say ready again, and every answer
    // must be 503 "shutting_down" (or the connection refused).
    let mut seen_not_ready = false;
    let mut observations = Vec::new();
    let end = Instant::now() + Duration::from_secs(3) + MARGIN;
    let mut exited = None;
    while exited.is_none() && Instant::now() < end {
        match common::send(client.get(&url)).await {
            Ok(r) if r.status == 200 => {
                assert!(
                    !seen_not_ready,
                    "/readyz said 200 after saying not ready: {observations:?}"
                );
            }
            Ok(r) => {
                seen_not_ready = true;
                assert_eq!(
                    r.status, 503,
                    "/readyz during shutdown: {} {}",
                    r.status, r.body
                );
                assert_eq!(
                    r.json()["status"],
                    "shutting_down",
                    "/readyz during shutdown: {}",
                    r.body
                );
                observations.push(format!("503 {}", r.body));
            }
            Err(e) => {
                seen_not_ready = true;
                observations.push(format!("error {e}"));
            }
        }
        exited = d.try_wait();
        // Pace the polling (this is not waiting for anything in particular).
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let status =
        exited.unwrap_or_else(|| panic!("keel did not exit; observations {observations:?}"));
    assert!(status.success(), "keel exited with {status}");
    eprintln!(
        "observations during shutdown: {:?}",
        &observations[..observations.len().min(5)]
    );
    let after = common::send(client.get(&url)).await;
    assert!(after.is_err(), "/readyz answered after exit: {after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_sigint_exits_promptly_during_slow_drain() {
    // Replies go to a server that never answers and the deadline is long: a drain
    // that waits for them would take 30 s; the second SIGINT must cut it short.
    let hang = HangServer::start().await;
    let mut d = Daemon::start(Config {
        reply_url: Some(hang.url.clone()),
        shutdown_timeout_ms: Some(30_000),
        ..Config::default()
    })
    .await;
    let ids: Vec<String> = (0..5).map(|i| format!("int-{i}")).collect();
    for id in &ids {
        d.post_ok(id, "int", "hello").await;
    }
    d.signal(libc::SIGINT);
    // Two signals sent while the first is still pending merge into one.
    assert!(
        d.wait_signal_taken(libc::SIGINT, Duration::from_secs(5))
            .await,
        "the first SIGINT stayed pending"
    );
    d.signal(libc::SIGINT);
    let sent = Instant::now();
    let exited = d.wait_exit(Duration::from_secs(3)).await;
    assert!(
        exited.is_some(),
        "keel still running {:?} after two SIGINTs",
        sent.elapsed()
    );
    eprintln!("exit after two SIGINTs took {:?}", sent.elapsed());

    // Quitting at once still keeps what was acknowledged.
    d.restart().await;
    let counts = d.user_key_counts().await;
    for id in &ids {
        assert_eq!(counts.get(id), Some(&1), "acked {id} after a forced exit");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_when_idle_exits_well_before_the_deadline() {
    let mut d = Daemon::start(Config {
        shutdown_timeout_ms: Some(30_000),
        ..Config::default()
    })
    .await;
    d.post_ok("idle-1", "idle", "hello").await;
    let ledger = Ledger::new();
    ledger.invoke("idle-1", "idle", "tester", "hello");
    ledger.complete("idle-1", Outcome::Ok);
    let sent = Instant::now();
    let status = d.sigterm(Duration::from_secs(5)).await;
    assert!(status.success(), "keel exited with {status}");
    eprintln!("idle exit took {:?}", sent.elapsed());
    d.restart().await;
    ledger.check(&d.user_key_counts().await).assert_clean();
}

/// Issue 14: a store too large for the check before start gets its
/// `quick_check` in the background; SIGTERM interrupts that check instead
/// of waiting for it (its read transaction would hold the closing TRUNCATE
/// checkpoint), the WAL is still checkpointed, and the next start checks the
/// file again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_interrupts_the_background_quick_check() {
    let mut d = Daemon::start(Config::default()).await;
    d.post_ok("qc-1", "qc", "hello").await;
    let status = d.sigterm(Duration::from_secs(30)).await;
    assert!(status.success(), "keel exited with {status}");
    // Grow the store well past the size checked before start: many small
    // indexed rows, so the check reads (and decrypts) every page of ~100 MB.
    {
        let conn = common::open_db(&d.db_path());
        conn.execute_batch(
            "CREATE TABLE filler(id INTEGER PRIMARY KEY, v BLOB);
             CREATE INDEX filler_v ON filler(v);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 600000)
             INSERT INTO filler SELECT i, randomblob(60) FROM n;
             PRAGMA wal_checkpoint(TRUNCATE);",
        )
        .expect("grow the store");
    }
    let size = std::fs::metadata(d.db_path()).expect("db size").len();
    assert!(size > 64 << 20, "store only {size} bytes");

    d.restart().await;
    // On a fast disk with the file in the page cache the check may already
    // have finished before the signal: then there is nothing to interrupt
    // (said, not failed); otherwise it must be interrupted, not waited for.
    let finished_first = d.stderr_boot().contains("background quick_check ok");
    let sent = Instant::now();
    let status = d.sigterm(Duration::from_secs(30)).await;
    eprintln!(
        "SIGTERM during the background check: exit after {:?}",
        sent.elapsed()
    );
    assert!(status.success(), "keel exited with {status}");
    let log = d.stderr_boot();
    if finished_first {
        eprintln!("the background check finished before SIGTERM: interruption not exercised");
    } else {
        assert!(
            log.contains("background quick_check interrupted by shutdown"),
            "the background check was not interrupted:\n{}",
            common::tail(&log, 30)
        );
    }
    assert!(
        !log.contains("corrupt"),
        "an interrupted check reported damage:\n{log}"
    );
    let wal = d.db_path().with_extension("db-wal");
    let wal_len = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    assert_eq!(wal_len, 0, "the WAL was not checkpointed at shutdown");

    // The next start runs the check again, to the end this time.
    d.restart().await;
    assert!(
        d.wait_for_log("background quick_check ok", 1, Duration::from_secs(120))
            .await,
        "the check did not run to the end after the restart:\n{}",
        common::tail(&d.stderr_boot(), 30)
    );
    d.post_ok("qc-2", "qc", "again").await;
    d.assert_no_panics();
}
