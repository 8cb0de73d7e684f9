//! TESTING.md section C against the webhook and the admin API: every bad input gets
//! a 4xx with a one-line JSON `error` (never a 5xx, a panic or a stored turn), and
//! the daemon stays healthy; valid oddities (integer ids, unknown fields, SQL in the
//! text) are accepted and stored literally; hostile session ids never escape the
//! admin API or the export directory.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{raw_request, sign, Config, Daemon, RawOutcome, Resp};
use serde_json::{json, Value};

/// What a case must answer.
#[derive(Clone, Copy, Debug)]
enum Expect {
    Code(u16),
    OneOf(&'static [u16]),
    Class4xx,
}

impl Expect {
    fn admits(self, status: u16) -> bool {
        match self {
            Expect::Code(c) => status == c,
            Expect::OneOf(cs) => cs.contains(&status),
            Expect::Class4xx => (400..500).contains(&status),
        }
    }
}

/// Checks one answer against the contract; returns a description of what is wrong.
async fn judge(
    d: &Daemon,
    name: &str,
    r: Result<Resp, reqwest::Error>,
    expect: Expect,
) -> Option<String> {
    let problem = match r {
        Err(e) => Some(format!("{name}: transport error {e}")),
        Ok(r) if !expect.admits(r.status) => Some(format!(
            "{name}: expected {expect:?}, got {} {}",
            r.status, r.body
        )),
        Ok(r) if r.status >= 400 => r.error_problem().map(|p| format!("{name}: {p}")),
        Ok(_) => None,
    };
    match d.healthz().await {
        Ok(h) if h.status == 200 => problem,
        other => Some(format!(
            "{name}: /healthz afterwards: {other:?}; {problem:?}"
        )),
    }
}

/// Fails with every collected problem at once.
fn assert_no_problems(problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{} case(s) failed:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// Asserts that no session's chat starts with `prefix` (nothing rejected was stored).
async fn assert_nothing_stored(d: &Daemon, prefix: &str) {
    let stored: Vec<String> = d
        .session_ids()
        .await
        .into_iter()
        .filter(|s| s.starts_with(&format!("webhook:{prefix}")))
        .collect();
    assert!(stored.is_empty(), "rejected input was stored: {stored:?}");
}

fn msg(id: &str, chat: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"id": id, "chat": chat, "from": "u", "text": "t"})).expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signature_failures_are_401_with_json_error() {
    let secret = "s3cret";
    let d = Daemon::start(Config {
        secret: Some(secret.to_string()),
        ..Config::default()
    })
    .await;
    let good = sign(secret, &msg("sig-0", "sigbad-0"));
    let hex_part = good.trim_start_matches("sha256=").to_string();
    let flipped = {
        let mut h = hex_part.clone();
        let last = h.pop().expect("hex");
        h.push(if last == '0' { '1' } else { '0' });
        format!("sha256={h}")
    };
    let other_body = sign(secret, &msg("other", "elsewhere"));
    let cases: Vec<(&str, Option<String>)> = vec![
        ("missing signature", None),
        ("empty signature", Some(String::new())),
        (
            "wrong secret",
            Some(sign("not-the-secret", &msg("sig-0", "sigbad-0"))),
        ),
        ("same length, last digit changed", Some(flipped)),
        ("non-hex", Some(format!("sha256={}", "zz".repeat(32)))),
        ("sha1= prefix", Some(format!("sha1={hex_part}"))),
        ("no prefix", Some(hex_part.clone())),
        ("truncated", Some(good[..good.len() - 2].to_string())),
        ("signature of another body", Some(other_body)),
    ];
    let mut problems = Vec::new();
    for (name, header) in cases {
        let body = msg("sig-0", "sigbad-0");
        let headers: Vec<(&str, String)> = header
            .map(|h| vec![("x-keel-signature", h)])
            .unwrap_or_default();
        let r = d.post_raw(body, &headers).await;
        problems.extend(judge(&d, name, r, Expect::Code(401)).await);
    }
    assert_no_problems(&problems);
    assert_nothing_stored(&d, "sigbad").await;

    // The correctly signed request is accepted.
    let body = msg("sig-ok", "sigok");
    let r = d
        .post_raw(body.clone(), &[("x-keel-signature", sign(secret, &body))])
        .await
        .expect("POST");
    assert_eq!(r.status, 200, "{}", r.body);
    d.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_are_rejected_with_json_errors_and_nothing_stored() {
    let d = Daemon::start(Config::default()).await;
    let semantic: &[u16] = &[400, 422];
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let cases: Vec<(&str, Vec<u8>, Expect)> = vec![
        ("empty body", b"".to_vec(), Expect::Code(400)),
        ("not JSON", b"hello".to_vec(), Expect::Code(400)),
        ("truncated JSON", br#"{"id":"x","chat":"bad-1""#.to_vec(), Expect::Code(400)),
        ("JSON array", b"[]".to_vec(), Expect::OneOf(semantic)),
        ("empty object", b"{}".to_vec(), Expect::OneOf(semantic)),
        ("missing id", br#"{"chat":"bad-2","from":"u","text":"t"}"#.to_vec(), Expect::OneOf(semantic)),
        ("missing chat", br#"{"id":"m3","from":"u","text":"t"}"#.to_vec(), Expect::OneOf(semantic)),
        ("empty id", br#"{"id":"","chat":"bad-4","from":"u","text":"t"}"#.to_vec(), Expect::OneOf(semantic)),
        ("empty chat", br#"{"id":"m5","chat":"","from":"u","text":"t"}"#.to_vec(), Expect::OneOf(semantic)),
        ("id float", br#"{"id":1.5,"chat":"bad-6","from":"u","text":"t"}"#.to_vec(), Expect::Code(400)),
        ("id negative", br#"{"id":-1,"chat":"bad-7","from":"u","text":"t"}"#.to_vec(), Expect::Code(400)),
        ("id null", br#"{"id":null,"chat":"bad-8","from":"u","text":"t"}"#.to_vec(), Expect::Code(400)),
        ("id bool", br#"{"id":true,"chat":"bad-9","from":"u","text":"t"}"#.to_vec(), Expect::Code(400)),
        ("id array", br#"{"id":["a"],"chat":"bad-10","from":"u","text":"t"}"#.to_vec(), Expect::Code(400)),
        ("id object", br#"{"id":{},"chat":"bad-11","from":"u","text":"t"}"#.to_vec(), Expect::Code(400)),
        ("id 2^64", br#"{"id":18446744073709551616,"chat":"bad-12","from":"u","text":"t"}"#.to_vec(), Expect::Code(400)),
        ("id 1e3", br#"{"id":1e3,"chat":"bad-13","from":"u","text":"t"}"#.to_vec(), Expect::Code(400)),
        ("chat float", br#"{"id":"m14","chat":2.5,"from":"u","text":"t"}"#.to_vec(), Expect::Code(400)),
        ("chat 2^63 (beyond i64)", br#"{"id":"m15","chat":9223372036854775808,"from":"u","text":"t"}"#.to_vec(), Expect::Code(400)),
        ("chat null", br#"{"id":"m16","chat":null,"from":"u","text":"t"}"#.to_vec(), Expect::Code(400)),
        ("from bool", br#"{"id":"m17","chat":"bad-17","from":false,"text":"t"}"#.to_vec(), Expect::Code(400)),
        ("NUL in id", br#"{"id":"a\u0000b","chat":"bad-18","from":"u","text":"t"}"#.to_vec(), Expect::Code(400)),
        ("NUL in chat", br#"{"id":"m19","chat":"bad-19\u0000","from":"u","text":"t"}"#.to_vec(), Expect::Code(400)),
        ("raw NUL byte in id", b"{\"id\":\"a\0b\",\"chat\":\"bad-20\",\"from\":\"u\",\"text\":\"t\"}".to_vec(), Expect::Code(400)),
        ("newline in chat (log injection)", br#"{"id":"m21","chat":"bad-21\nFAKE-LOG-LINE ERROR keel: pwned","from":"u","text":"t"}"#.to_vec(), Expect::Code(400)),
        ("ESC in from", br#"{"id":"m22","chat":"bad-22","from":"u\u001b[31m","text":"t"}"#.to_vec(), Expect::Code(400)),
        ("tab in id", br#"{"id":"m\t23","chat":"bad-23","from":"u","text":"t"}"#.to_vec(), Expect::Code(400)),
        ("lone surrogate in id", br#"{"id":"\ud800","chat":"bad-24","from":"u","text":"t"}"#.to_vec(), Expect::Class4xx),
        ("lone surrogate in text", br#"{"id":"m25","chat":"bad-25","from":"u","text":"\udc00x"}"#.to_vec(), Expect::Class4xx),
        ("invalid UTF-8 in text", b"{\"id\":\"m26\",\"chat\":\"bad-26\",\"from\":\"u\",\"text\":\"\xff\xfe\"}".to_vec(), Expect::Class4xx),
        ("invalid UTF-8 in chat", b"{\"id\":\"m27\",\"chat\":\"bad-27\xc3\x28\",\"from\":\"u\",\"text\":\"t\"}".to_vec(), Expect::Class4xx),
        ("duplicate keys", br#"{"id":"m28","id":"m28b","chat":"bad-28","from":"u","text":"t"}"#.to_vec(), Expect::Class4xx),
        ("100k nested arrays", nested.into_bytes(), Expect::Class4xx),
        ("trailing garbage", br#"{"id":"m30","chat":"bad-30","from":"u","text":"t"} {"x":1}"#.to_vec(), Expect::Class4xx),
    ];
    assert!(cases.len() >= 25);
    let mut problems = Vec::new();
    for (name, body, expect) in cases {
        let r = d.post_raw(body, &[]).await;
        problems.extend(judge(&d, name, r, expect).await);
    }
    // Wrong method on the webhook path.
    let r = d.get("/v1/messages").await;
    problems.extend(judge(&d, "GET /v1/messages", r, Expect::OneOf(&[404, 405])).await);
    assert_no_problems(&problems);

    assert_nothing_stored(&d, "bad-").await;
    let injected = d
        .stderr_all()
        .lines()
        .any(|l| l.starts_with("FAKE-LOG-LINE"));
    assert!(!injected, "a chat id injected a line into the log");
    d.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_are_413() {
    let d = Daemon::start(Config::default()).await;
    let mut problems = Vec::new();
    // Just over the 256 KiB default.
    let over = serde_json::to_vec(&json!({
        "id": "big-1", "chat": "big-1", "from": "u", "text": "a".repeat(300 * 1024),
    }))
    .expect("json");
    let r = d.post_raw(over, &[]).await;
    problems.extend(judge(&d, "300 KiB body", r, Expect::Code(413)).await);

    // 10 MB: the server may answer 413 before reading it all and close; a raw
    // socket sees the answer either way (or a close, never a 5xx).
    let mut req = format!(
        "POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        10 * 1024 * 1024
    )
    .into_bytes();
    req.extend(std::iter::repeat_n(b' ', 10 * 1024 * 1024));
    match raw_request(d.port, &req, false, Duration::from_secs(30)).await {
        RawOutcome::Status(413, body) => {
            if serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .is_none()
            {
                problems.push(format!("10 MB body: 413 without a JSON error: {body:?}"));
            }
        }
        other => problems.push(format!("10 MB body: expected 413, got {other:?}")),
    }
    assert_eq!(d.healthz().await.expect("healthz").status, 200);
    assert_no_problems(&problems);
    assert_nothing_stored(&d, "big-").await;
    d.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_lies_never_cause_5xx() {
    let d = Daemon::start(Config::default()).await;
    let body = r#"{"id":"cl-1","chat":"cl-1","from":"u","text":"hello there"}"#;
    let head = |cl: &str| {
        format!("POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {cl}\r\n\r\n")
    };
    // (name, request, half-close after sending, reaches the handler). Requests whose
    // headers are malformed are refused by the HTTP/1 codec before any handler runs,
    // so only the others are held to the JSON error body.
    let cases: Vec<(&str, Vec<u8>, bool, bool)> = vec![
        ("says 10, body longer", format!("{}{body}", head("10")).into_bytes(), false, true),
        ("says 1000, body shorter, then EOF", format!("{}{body}", head("1000")).into_bytes(), true, true),
        ("non-numeric", format!("{}{body}", head("abc")).into_bytes(), true, false),
        ("negative", format!("{}{body}", head("-5")).into_bytes(), true, false),
        (
            "two different lengths",
            format!(
                "POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
            true,
            false,
        ),
    ];
    let mut problems = Vec::new();
    for (name, req, half_close, handled) in cases {
        let outcome = raw_request(d.port, &req, half_close, Duration::from_secs(15)).await;
        eprintln!("content-length {name}: {outcome:?}");
        match outcome {
            RawOutcome::Status(code, body) if (400..500).contains(&code) => {
                let r = Resp { status: code, body };
                if let Some(p) = r.error_problem().filter(|_| handled) {
                    problems.push(format!("{name}: {p}"));
                }
            }
            RawOutcome::Closed => {}
            other => problems.push(format!(
                "{name}: expected 4xx or a closed connection, got {other:?}"
            )),
        }
        match d.healthz().await {
            Ok(h) if h.status == 200 => {}
            other => problems.push(format!("{name}: /healthz afterwards {other:?}")),
        }
    }
    assert_no_problems(&problems);
    assert_nothing_stored(&d, "cl-").await;
    // The daemon still takes normal messages.
    d.post_ok("cl-after", "after", "fine").await;
    d.assert_no_panics();
}

/// `text` of `size` bytes of 'A' inside a message, gzip-compressed by gzip(1).
fn gzip_bomb(size: usize) -> Vec<u8> {
    use std::io::Write;
    let mut child = std::process::Command::new("gzip")
        .arg("-9c")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("gzip(1) is needed to build the bomb");
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || {
        stdin.write_all(br#"{"id":"bomb","chat":"bomb","from":"u","text":""#)?;
        let chunk = vec![b'A'; 1 << 20];
        for _ in 0..size / chunk.len() {
            stdin.write_all(&chunk)?;
        }
        stdin.write_all(br#""}"#)
    });
    let out = child.wait_with_output().expect("gzip");
    writer.join().expect("writer").expect("write to gzip");
    assert!(out.status.success());
    out.stdout
}

/// Peak resident set size of a process in KiB (VmHWM).
fn peak_rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_bomb_is_rejected_without_decompressing() {
    let d = Daemon::start(Config::default()).await;
    let bomb = gzip_bomb(128 << 20);
    assert!(
        bomb.len() < 256 * 1024,
        "bomb is {} bytes compressed",
        bomb.len()
    );
    let r = d
        .post_raw(bomb, &[("content-encoding", "gzip".to_string())])
        .await;
    eprintln!(
        "gzip bomb answered {:?}",
        r.as_ref().map(|r| (r.status, &r.body))
    );
    let problems: Vec<String> = judge(&d, "gzip bomb", r, Expect::Class4xx)
        .await
        .into_iter()
        .collect();
    assert_no_problems(&problems);
    assert_nothing_stored(&d, "bomb").await;
    let peak = peak_rss_kib(d.pid().expect("pid"));
    eprintln!("peak RSS after the bomb: {peak} KiB");
    assert!(
        peak < 100 * 1024,
        "peak RSS {peak} KiB: the bomb was inflated"
    );
    d.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_variants_are_accepted_with_the_right_session_and_key() {
    let d = Daemon::start(Config::default()).await;
    let min_chat = format!("webhook:{}", i64::MIN);
    let cases = vec![
        (
            json!({"id": "v-1", "chat": "v1", "from": "u", "text": "t", "extra": {"a": [1, 2]}, "x": null}),
            "webhook:v1",
            "v-1",
        ),
        (
            json!({"id": 42, "chat": "v2", "from": "u", "text": "t"}),
            "webhook:v2",
            "42",
        ),
        (
            json!({"id": "v-3", "chat": -1001234567890i64, "from": 12345, "text": "t"}),
            "webhook:-1001234567890",
            "v-3",
        ),
        (
            json!({"id": "v-4", "chat": i64::MIN, "from": "u", "text": "t"}),
            min_chat.as_str(),
            "v-4",
        ),
        (
            json!({"id": "v-5", "chat": "v5", "from": "u", "text": "héllo 👋 \u{202E} مرحبا"}),
            "webhook:v5",
            "v-5",
        ),
    ];
    for (m, session, key) in cases {
        let r = d.post_message(&m).await.expect("POST");
        assert_eq!(r.status, 200, "{m}: {} {}", r.status, r.body);
        assert_eq!(r.json()["status"], "accepted", "{m}: {}", r.body);
        assert_eq!(r.json()["session"], session, "{m}: {}", r.body);
        let turns = d.turns(session).await;
        let user: Vec<_> = turns.iter().filter(|t| t.role == "user").collect();
        assert_eq!(user.len(), 1, "{session}: {turns:?}");
        assert_eq!(user[0].key.as_deref(), Some(key), "{session}: {turns:?}");
        assert_eq!(user[0].text, m["text"].as_str().unwrap_or_default());
    }
    d.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_in_text_and_chat_is_stored_literally() {
    let d = Daemon::start(Config::default()).await;
    let evil = "'); DROP TABLE sessions;--";
    let r = d.post_ok("sql-1", evil, evil).await;
    let session = format!("webhook:{evil}");
    assert_eq!(r["session"], session.as_str());
    let turns = d.turns(&session).await;
    assert!(
        turns
            .iter()
            .any(|t| t.role == "user" && t.text == evil && t.key.as_deref() == Some("sql-1")),
        "SQL text not stored literally: {turns:?}"
    );
    d.post_ok("sql-2", "plain", "after").await;
    let ids = d.session_ids().await;
    assert!(
        ids.contains(&session) && ids.contains(&"webhook:plain".to_string()),
        "{ids:?}"
    );
    d.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_id_is_duplicate_and_stored_once() {
    let d = Daemon::start(Config::default()).await;
    let first = d.post_ok("rep-1", "rep", "first").await;
    assert_eq!(first["status"], "accepted");
    for _ in 0..3 {
        let again = d.post_ok("rep-1", "rep", "first").await;
        assert_eq!(again["status"], "duplicate", "{again}");
        assert_eq!(again["session"], "webhook:rep");
    }
    // The same key with another text is a conflict (R41), never a silent drop.
    let changed = d
        .post_message(
            &json!({"id": "rep-1", "chat": "rep", "from": "tester", "text": "changed text"}),
        )
        .await
        .expect("POST changed");
    assert_eq!(changed.status, 409, "{}", changed.body);
    assert!(changed.error_problem().is_none(), "{}", changed.body);
    assert!(
        changed.json()["error"]
            .as_str()
            .is_some_and(|e| e.contains("rep-1") && e.contains("different content")),
        "{}",
        changed.body
    );
    let turns = d.turns("webhook:rep").await;
    let user: Vec<_> = turns.iter().filter(|t| t.role == "user").collect();
    assert_eq!(user.len(), 1, "{turns:?}");
    assert_eq!(user[0].text, "first");
    d.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_session_ids_in_admin_paths_are_404_or_400() {
    let d = Daemon::start(Config::default()).await;
    d.post_ok("hp-1", "real", "hello").await;
    let long = "x".repeat(300);
    let paths = [
        "/v1/sessions/..%2f..%2fetc%2fpasswd/turns".to_string(),
        "/v1/sessions/..%2F..%2F..%2F..%2Fetc%2Fpasswd/turns".to_string(),
        "/v1/sessions/%252e%252e%252f%252e%252e%252fetc%252fpasswd/turns".to_string(),
        "/v1/sessions/..%5c..%5cwindows/turns".to_string(),
        "/v1/sessions/%2Fetc%2Fpasswd/turns".to_string(),
        "/v1/sessions/a%00b/turns".to_string(),
        format!("/v1/sessions/{long}/turns"),
        "/v1/sessions/./turns".to_string(),
        "/v1/sessions/../turns".to_string(),
        "/v1/sessions//turns".to_string(),
        "/v1/sessions/-rf/turns".to_string(),
        "/v1/sessions/%EF%BC%8E%EF%BC%8E/turns".to_string(),
        "/v1/sessions/%E2%80%AEevil/turns".to_string(),
        "/v1/sessions/a%0D%0AX-Injected:%201/turns".to_string(),
        "/v1/sessions/%ff%fe/turns".to_string(),
        "/v1/sessions/webhook:..%2f..%2fetc%2fpasswd/turns".to_string(),
        "/v1/sessions/../../../../etc/passwd".to_string(),
    ];
    let mut problems = Vec::new();
    for path in &paths {
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        match raw_request(d.port, req.as_bytes(), false, Duration::from_secs(10)).await {
            RawOutcome::Status(code, body) if code == 400 || code == 404 => {
                if body.contains("root:") {
                    problems.push(format!("{path}: body leaks a passwd file: {body}"));
                }
            }
            other => problems.push(format!("{path}: expected 404 or 400, got {other:?}")),
        }
    }
    assert_no_problems(&problems);
    assert_eq!(d.healthz().await.expect("healthz").status, 200);
    assert!(!d.stderr_all().lines().any(|l| l.starts_with("X-Injected")));
    d.assert_no_panics();
}

/// All files below `dir`, recursively.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read_dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() && !path.is_symlink() {
            walk(&path, out);
        } else {
            out.push(path);
        }
    }
}

/// The session id an export file names.
fn exported_session(v: &Value) -> Option<String> {
    [
        &v["session"],
        &v["session"]["id"],
        &v["id"],
        &v["session_id"],
    ]
    .into_iter()
    .find_map(|s| s.as_str().map(str::to_string))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_export_keeps_hostile_chat_ids_inside_the_target_dir() {
    let d = Daemon::start(Config::default()).await;
    let chats = [
        "../../etc/passwd".to_string(),
        "..".to_string(),
        ".".to_string(),
        "a/b".to_string(),
        "/abs/path".to_string(),
        "..\\..\\win".to_string(),
        "-rf".to_string(),
        // 250 bytes: within the chat limit, too long for a file name with a prefix.
        "é".repeat(125),
        "．．".to_string(),
        "plain".to_string(),
    ];
    for (i, chat) in chats.iter().enumerate() {
        d.post_ok(&format!("ex-{i}"), chat, "export me").await;
    }
    // A newline in a chat id is refused at the door (so it never reaches a file name).
    let r = d.post_raw(msg("ex-nl", "a\nb"), &[]).await.expect("POST");
    assert_eq!(r.status, 400, "chat with a newline: {}", r.body);
    // These may be refused at the door (a length limit, bidi controls treated as
    // control characters); if accepted they must export safely like the others.
    let mut chats = chats.to_vec();
    for (id, chat) in [
        ("ex-long", "x".repeat(300)),
        ("ex-rtl", "\u{202E}gnp.exe".to_string()),
    ] {
        let r = d.post_raw(msg(id, &chat), &[]).await.expect("POST");
        match r.status {
            200 => chats.push(chat),
            400..=499 => {
                assert!(r.error_problem().is_none(), "{:?}", r.error_problem());
                eprintln!("chat {chat:?} refused at the door: {}", r.body);
            }
            other => panic!("chat {chat:?}: {other} {}", r.body),
        }
    }

    // Deep enough that a `../..` escape still lands inside our temp tree.
    let out_dir = d.root().join("x1/x2/x3/out");
    std::fs::create_dir_all(&out_dir).expect("mkdir out");
    let out_arg = out_dir.to_str().expect("utf8 path");
    let data_arg = d.data_dir.to_str().expect("utf8 path");
    let out = d
        .cli(&["sessions", "export", out_arg, "--data-dir", data_arg])
        .await;
    assert!(
        out.status.success(),
        "keel sessions export failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );

    let mut files = Vec::new();
    walk(d.root(), &mut files);
    let known = [
        d.config_path.clone(),
        d.stderr_path.clone(),
        d.stdout_path.clone(),
    ];
    let mut sessions = BTreeSet::new();
    for f in files {
        if f.starts_with(&d.data_dir) || known.contains(&f) {
            continue;
        }
        assert_eq!(
            f.parent(),
            Some(out_dir.as_path()),
            "export wrote outside the target dir: {}",
            f.display()
        );
        let meta = std::fs::symlink_metadata(&f).expect("stat");
        assert!(meta.is_file(), "{} is not a regular file", f.display());
        assert_eq!(
            meta.permissions().mode() & 0o777,
            0o600,
            "{} mode",
            f.display()
        );
        let v: Value = serde_json::from_slice(&std::fs::read(&f).expect("read export"))
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}", f.display()));
        let s =
            exported_session(&v).unwrap_or_else(|| panic!("{} names no session: {v}", f.display()));
        sessions.insert(s);
    }
    for chat in &chats {
        let want = format!("webhook:{chat}");
        assert!(
            sessions.contains(&want),
            "no export file for {want:?}; got {sessions:?}"
        );
    }
    d.assert_no_panics();
}
