//! `keel bench --backend postgres` through the real binary, short: once on
//! a private cluster the bench starts itself (and must remove again), once
//! on the test cluster by `--url` (its databases must be dropped again).
//! Each run must exit 0 with every request answered 200 and report acks
//! for SQLite and for each instance count.

// Tests drive real processes in real time: clippy.toml's clock and env rules are for keel itself.
#![allow(clippy::disallowed_methods)]

mod common;
#[path = "common/pg.rs"]
mod pg;

use std::time::Duration;

use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(240);

async fn bench(extra: &[&str]) -> Value {
    let mut args = vec![
        "bench",
        "--backend",
        "postgres",
        "--clients",
        "4",
        "--seconds",
        "1",
        "--warmup-seconds",
        "0.2",
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = common::run_keel(&args, None, DEADLINE).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "keel {args:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or("");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {stdout}"))
}

fn assert_measured(run: &Value, what: &str) {
    assert!(run["acked"].as_u64().unwrap_or(0) > 0, "{what}: {run}");
    assert!(
        run["msgs_per_s"].as_f64().unwrap_or(0.0) > 0.0,
        "{what}: {run}"
    );
    assert_eq!(run["non_200"], 0, "{what}: {run}");
    assert_eq!(run["failed_requests"], 0, "{what}: {run}");
    assert!(run["p99_ms"].as_f64().is_some(), "{what}: {run}");
}

fn private_cluster_dirs() -> Vec<String> {
    std::fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("keel-bench-pg-"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_bench_measures_each_instance_count_and_sqlite_and_cleans_up() {
    let installed = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.path().join("bin/initdb").exists());
    if !installed {
        assert!(
            std::env::var_os("KEEL_TEST_REQUIRE_PG").is_none(),
            "needs PostgreSQL and KEEL_TEST_REQUIRE_PG is set"
        );
        eprintln!("skipped: PostgreSQL is not installed");
        return;
    }

    // A private cluster of the bench's own.
    let before = private_cluster_dirs();
    let f = bench(&["--instances", "1,2"]).await;
    assert_eq!(f["backend"], "postgres", "{f}");
    assert!(
        f["server"]
            .as_str()
            .is_some_and(|s| s.starts_with("private cluster")),
        "{f}"
    );
    assert_measured(&f["sqlite"], "sqlite");
    let runs = f["postgres"].as_array().expect("postgres runs");
    assert_eq!(runs.len(), 2, "{f}");
    for (run, n) in runs.iter().zip([1, 2]) {
        assert_eq!(run["instances"], n, "{f}");
        assert_measured(run, &format!("{n} instances"));
        assert!(run["vs_sqlite"].as_f64().is_some(), "{f}");
    }
    assert!(runs[1]["vs_one_instance"].as_f64().is_some(), "{f}");
    assert_eq!(
        private_cluster_dirs(),
        before,
        "the private cluster's dir is left behind"
    );

    // The test cluster, by URL: the bench's databases are dropped again.
    let Some(db) = pg::fresh_db("bench_postgres") else {
        return;
    };
    let f = bench(&["--instances", "2", "--url", &db.url]).await;
    assert_eq!(f["postgres"][0]["instances"], 2, "{f}");
    assert_measured(&f["postgres"][0], "2 instances by --url");
    let left: i64 = pg::off_runtime(|| {
        let mut c = postgres::Client::connect(&db.url, postgres::NoTls).expect("connect");
        c.query_one(
            "SELECT count(*) FROM pg_database WHERE datname LIKE 'keel_bench_%'",
            &[],
        )
        .expect("count databases")
        .get(0)
    });
    assert_eq!(left, 0, "the bench's databases are left on the server");
}
