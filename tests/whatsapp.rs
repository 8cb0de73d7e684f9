//! The WhatsApp channel through the real binary (issue 7, §4; R42): the
//! verification handshake, signed webhook messages stored once per message
//! id with their kind, replies sent to the Graph API quoting the message
//! they answer, reactions stored but never answered, and unsigned or
//! mis-signed posts refused with nothing stored. The Graph API is a server
//! on 127.0.0.1 that records what keel sends.

// Tests drive real processes in real time: clippy.toml's clock and env rules are for keel itself.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use common::{poll_until, send, Config, Daemon, ReplyServer};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

const SECRET: &str = "wa-app-secret";

fn sign(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("hmac");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn message(id: &str, kind: &str, content: Value) -> Value {
    let mut m = json!({"from": "4915550001", "id": id, "timestamp": "1764590400", "type": kind});
    m[kind] = content;
    json!({"object": "whatsapp_business_account", "entry": [{"id": "WABA", "changes": [{
        "field": "messages",
        "value": {"messaging_product": "whatsapp",
                  "metadata": {"display_phone_number": "15550000", "phone_number_id": "1234"},
                  "contacts": [{"profile": {"name": "Ann"}, "wa_id": "4915550001"}],
                  "messages": [m]}}]}]})
}

async fn post(d: &Daemon, body: &Value, signature: Option<String>) -> common::Resp {
    let bytes = serde_json::to_vec(body).expect("json");
    let mut req = d
        .client
        .post(d.url("/v1/whatsapp"))
        .header("content-type", "application/json");
    if let Some(s) = signature {
        req = req.header("x-hub-signature-256", s);
    }
    send(req.body(bytes)).await.expect("POST /v1/whatsapp")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whatsapp_messages_in_replies_out() {
    let graph = ReplyServer::start();
    let api_base = graph.url.trim_end_matches("/replies").to_string();
    let mut d = Daemon::new(Config::default(), None);
    d.write_config_text(&format!(
        "[whatsapp]\nenabled = true\napi_base = {:?}\nphone_number_id = \"1234\"\n\
         app_secret = {SECRET:?}\nverify_token = \"wa-verify\"\n",
        api_base
    ));
    // The access token comes from the environment, as an operator would set it.
    d.env.push((
        "KEEL_WHATSAPP_ACCESS_TOKEN".into(),
        "wa-access-canary".into(),
    ));
    d.boot().await;

    // Verification handshake.
    let ok = d
        .get("/v1/whatsapp?hub.mode=subscribe&hub.verify_token=wa-verify&hub.challenge=1158201444")
        .await
        .expect("GET");
    assert_eq!((ok.status, ok.body.as_str()), (200, "1158201444"));
    for bad in [
        "/v1/whatsapp?hub.mode=subscribe&hub.verify_token=wrong&hub.challenge=1",
        "/v1/whatsapp?hub.mode=unsubscribe&hub.verify_token=wa-verify&hub.challenge=1",
        "/v1/whatsapp?hub.challenge=1",
    ] {
        assert_eq!(d.get(bad).await.expect("GET").status, 403, "{bad}");
    }

    // A text message: stored, answered, the reply quotes it.
    let text = message("wamid.A1", "text", json!({"body": "hello keel"}));
    let r = post(&d, &text, Some(sign(&serde_json::to_vec(&text).unwrap()))).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let sent = poll_until(Duration::from_secs(30), || async {
        graph
            .replies()
            .into_iter()
            .find(|b| b["context"]["message_id"] == "wamid.A1")
    })
    .await
    .expect("a reply reached the Graph API");
    assert_eq!(sent["to"], "4915550001");
    assert_eq!(sent["messaging_product"], "whatsapp");
    assert!(sent["text"]["body"].as_str().is_some_and(|t| !t.is_empty()));

    // Meta redelivers: stored once, answered once.
    let again = post(&d, &text, Some(sign(&serde_json::to_vec(&text).unwrap()))).await;
    assert_eq!(again.status, 200, "{}", again.body);

    // A reaction and an image: stored with their kinds; the reaction unanswered.
    for (id, kind, content) in [
        (
            "wamid.R1",
            "reaction",
            json!({"message_id": "wamid.A1", "emoji": "👍"}),
        ),
        (
            "wamid.I1",
            "image",
            json!({"id": "MEDIA1", "mime_type": "image/jpeg", "caption": "my cat"}),
        ),
    ] {
        let b = message(id, kind, content);
        let r = post(&d, &b, Some(sign(&serde_json::to_vec(&b).unwrap()))).await;
        assert_eq!(r.status, 200, "{kind}: {}", r.body);
    }

    // Unsigned and mis-signed posts store nothing.
    let forged = message("wamid.F1", "text", json!({"body": "forged"}));
    assert_eq!(post(&d, &forged, None).await.status, 401);
    assert_eq!(
        post(&d, &forged, Some("sha256=00".into())).await.status,
        401
    );
    let r = post(
        &d,
        &json!({"entry": "nope"}),
        Some(sign(br#"{"entry":"nope"}"#)),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);

    let turns = d.turns("whatsapp:4915550001").await;
    let users: Vec<(String, String)> = turns
        .iter()
        .filter(|t| t.role == "user")
        .map(|t| (t.key.clone().unwrap_or_default(), t.kind.clone()))
        .collect();
    assert_eq!(
        users,
        vec![
            ("wamid.A1".to_string(), "text".to_string()),
            ("wamid.R1".to_string(), "reaction".to_string()),
            ("wamid.I1".to_string(), "image".to_string()),
        ],
        "{turns:?}"
    );
    let replies = turns.iter().filter(|t| t.role == "assistant").count();
    assert_eq!(
        replies, 2,
        "text and image answered, the reaction not: {turns:?}"
    );
    // The access token never shows in keel's log.
    assert!(!d.stderr_all().contains("wa-access-canary"));
    d.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_no_acknowledged_whatsapp_message() {
    let graph = ReplyServer::start();
    let api_base = graph.url.trim_end_matches("/replies").to_string();
    let mut d = Daemon::new(Config::default(), None);
    d.write_config_text(&format!(
        "[whatsapp]\nenabled = true\napi_base = {api_base:?}\nphone_number_id = \"1234\"\n\
         access_token = \"t\"\napp_secret = {SECRET:?}\nverify_token = \"v\"\n"
    ));
    d.boot().await;
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let base = d.base();
    let sender = {
        let acked = acked.clone();
        tokio::spawn(async move {
            let client = common::http_client();
            for i in 0..400 {
                let id = format!("wamid.K{i}");
                let b = message(&id, "text", json!({"body": format!("m {i}")}));
                let bytes = serde_json::to_vec(&b).expect("json");
                let r = send(
                    client
                        .post(format!("{base}/v1/whatsapp"))
                        .header("x-hub-signature-256", sign(&bytes))
                        .body(bytes),
                )
                .await;
                match r {
                    Ok(r) if r.status == 200 => acked.lock().expect("acked").push(id),
                    _ => return,
                }
            }
        })
    };
    let enough = poll_until(Duration::from_secs(60), || {
        let acked = acked.clone();
        async move { (acked.lock().expect("acked").len() >= 100).then_some(()) }
    })
    .await;
    assert!(enough.is_some(), "fewer than 100 acknowledged");
    d.sigkill();
    sender.await.expect("sender");
    d.restart().await;
    let turns = d.turns("whatsapp:4915550001").await;
    let mut stored: std::collections::HashMap<String, usize> = Default::default();
    for t in turns.iter().filter(|t| t.role == "user") {
        *stored.entry(t.key.clone().unwrap_or_default()).or_default() += 1;
    }
    let acked = acked.lock().expect("acked").clone();
    let lost: Vec<_> = acked
        .iter()
        .filter(|id| !stored.contains_key(*id))
        .collect();
    assert!(lost.is_empty(), "lost {lost:?}");
    assert!(stored.values().all(|n| *n == 1), "stored twice");
    // Every stored message has exactly one reply turn (none answered twice).
    let users = turns.iter().filter(|t| t.role == "user").count();
    let replies = turns.iter().filter(|t| t.role == "assistant").count();
    assert_eq!(users, replies, "one reply per message");
    d.assert_no_panics();
}

/// A Graph API that refuses the token on every call (401, code 190);
/// counts the calls.
async fn refusing_graph() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = calls.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Read the head and the body (Content-Length) of one request.
                loop {
                    let Ok(n) = s.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text[..end]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let body = r#"{"error":{"message":"Error validating access token: Session has expired","type":"OAuthException","code":190}}"#;
                let resp = format!(
                    "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    (base, calls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_stops_the_channel_and_the_owner_is_told_to_renew_it() {
    let (graph, calls) = refusing_graph().await;
    let owner = ReplyServer::start();
    let mut d = Daemon::new(Config::default(), None);
    d.write_config_text(&format!(
        "[webhook]\nreply_url = {:?}\n[owner]\nchannel = \"webhook\"\nchat = \"ops\"\n\
         [whatsapp]\nenabled = true\napi_base = {graph:?}\nphone_number_id = \"1234\"\n\
         access_token = \"expired-canary\"\napp_secret = {SECRET:?}\nverify_token = \"v\"\n",
        owner.url
    ));
    d.boot().await;
    for id in ["wamid.E1", "wamid.E2"] {
        let b = message(id, "text", json!({"body": "hi"}));
        let r = post(&d, &b, Some(sign(&serde_json::to_vec(&b).unwrap()))).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    // The owner hears it on a healthy channel, once.
    let told = poll_until(Duration::from_secs(30), || async {
        owner
            .replies()
            .into_iter()
            .filter_map(|r| r["text"].as_str().map(str::to_string))
            .find(|t| t.contains("adapter whatsapp gave up") && t.contains("renew"))
    })
    .await
    .expect("the owner was not told to renew the token");
    assert!(!told.contains("expired-canary"), "{told}");
    // The channel is stopped; the second reply failed without a call.
    let out = d.status_json().await;
    let v: Value = serde_json::from_slice(&out.stdout).expect("status json");
    assert_eq!(v["adapters"]["whatsapp"]["state"], "stopped", "{v}");
    let failed = poll_until(Duration::from_secs(30), || async {
        let turns = d.turns("whatsapp:4915550001").await;
        let replies: Vec<_> = turns.iter().filter(|t| t.role == "assistant").collect();
        (replies.len() == 2 && replies.iter().all(|t| t.sent == Some(false))).then_some(())
    })
    .await;
    assert!(failed.is_some(), "both replies should be stored, unsent");
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one refused call, then none"
    );
    let told_twice = owner
        .replies()
        .into_iter()
        .filter(|r| {
            r["text"]
                .as_str()
                .is_some_and(|t| t.contains("adapter whatsapp gave up"))
        })
        .count();
    assert_eq!(told_twice, 1);
    assert!(!d.stderr_all().contains("expired-canary"));
    d.assert_no_panics();
}

/// A Graph API on 127.0.0.1 answering `POST /{phone_number_id}/messages`
/// as Meta does (`{"messages": [{"id": "wamid.OUT<n>"}]}`), or 503 while
/// `failing` is set; records every body.
struct FakeGraph {
    base: String,
    bodies: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
    failing: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: actix_web::dev::ServerHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeGraph {
    fn start() -> FakeGraph {
        use actix_web::{web, App, HttpResponse, HttpServer};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind graph");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let bodies: std::sync::Arc<std::sync::Mutex<Vec<Value>>> = Default::default();
        let failing: std::sync::Arc<std::sync::atomic::AtomicBool> = Default::default();
        let (b2, f2) = (bodies.clone(), failing.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                let server = HttpServer::new(move || {
                    let (bodies, failing) = (b2.clone(), f2.clone());
                    App::new().default_service(web::to(move |body: web::Bytes| {
                        let (bodies, failing) = (bodies.clone(), failing.clone());
                        async move {
                            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                            let mut g = bodies.lock().unwrap();
                            g.push(v.clone());
                            if failing.load(Ordering::SeqCst) {
                                return HttpResponse::ServiceUnavailable().json(
                                    json!({"error": {"message": "temporarily unavailable", "code": 2}}),
                                );
                            }
                            HttpResponse::Ok().json(json!({"messaging_product": "whatsapp",
                                "contacts": [{"input": v["to"], "wa_id": v["to"]}],
                                "messages": [{"id": format!("wamid.OUT{}", g.len())}]}))
                        }
                    }))
                })
                .workers(1)
                .disable_signals()
                .listen(listener)
                .expect("listen graph")
                .run();
                tx.send(server.handle()).expect("handle");
                let _ = server.await;
            });
        });
        FakeGraph {
            base,
            bodies,
            failing,
            handle: rx.recv().expect("graph started"),
            thread: Some(thread),
        }
    }

    fn bodies(&self) -> Vec<Value> {
        self.bodies.lock().unwrap().clone()
    }
}

impl Drop for FakeGraph {
    fn drop(&mut self) {
        futures::executor::block_on(self.handle.stop(false));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn graph_daemon(graph: &FakeGraph) -> Daemon {
    let d = Daemon::new(Config::default(), None);
    d.write_config_text(&format!(
        "[whatsapp]\nenabled = true\napi_base = {:?}\nphone_number_id = \"1234\"\n\
         access_token = \"wa-token\"\napp_secret = {SECRET:?}\nverify_token = \"v\"\n\
         [adapters]\nbackoff_initial_ms = 50\nbackoff_max_ms = 400\n",
        graph.base
    ));
    d
}

fn statuses(list: Value) -> Value {
    json!({"object": "whatsapp_business_account", "entry": [{"id": "WABA", "changes": [{
        "field": "messages",
        "value": {"messaging_product": "whatsapp",
                  "metadata": {"display_phone_number": "15550000", "phone_number_id": "1234"},
                  "statuses": list}}]}]})
}

/// The outgoing turns of Ann's chat as the API shows them.
async fn reply_turns(d: &Daemon) -> Vec<Value> {
    let r = d
        .get("/v1/sessions/whatsapp:4915550001/turns")
        .await
        .expect("GET turns");
    r.json()["turns"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|t| t["role"] != "user")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whatsapp_statuses_are_recorded_against_the_reply_by_its_wamid() {
    let graph = FakeGraph::start();
    let mut d = graph_daemon(&graph);
    d.boot().await;
    let b = message("wamid.IN1", "text", json!({"body": "/recall x"}));
    let r = post(&d, &b, Some(sign(&serde_json::to_vec(&b).unwrap()))).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // The wamid the Graph API answered is stored with the reply.
    let wamid = poll_until(Duration::from_secs(30), || async {
        reply_turns(&d)
            .await
            .first()
            .and_then(|t| t["delivery"]["channel_ref"].as_str().map(str::to_string))
    })
    .await
    .expect("the reply's wamid");
    assert_eq!(wamid, "wamid.OUT1");
    // Meta reports out of order; the newest state wins, an unknown wamid is
    // acknowledged and matches nothing.
    let report = |status: &str| {
        json!({"id": wamid, "status": status, "timestamp": "1764590500",
        "recipient_id": "4915550001"})
    };
    for list in [
        json!([report("delivered"), report("read")]),
        json!([report("sent")]),
        json!([{"id": "wamid.NOT-OURS", "status": "read", "timestamp": "1"}]),
    ] {
        let b = statuses(list);
        let r = post(&d, &b, Some(sign(&serde_json::to_vec(&b).unwrap()))).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let delivery = reply_turns(&d).await[0]["delivery"].clone();
    assert_eq!(delivery["status"], "read", "{delivery}");
    assert!(delivery["status_at"].is_string());
    // Unsigned, or without an id: refused, nothing recorded.
    let fail = statuses(json!([{"id": wamid, "status": "failed",
        "errors": [{"code": 131026, "title": "Message undeliverable"}]}]));
    assert_eq!(post(&d, &fail, None).await.status, 401);
    let no_id = statuses(json!([{"status": "failed"}]));
    let r = post(&d, &no_id, Some(sign(&serde_json::to_vec(&no_id).unwrap()))).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.error_problem().is_none(), "{}", r.body);
    assert_eq!(reply_turns(&d).await[0]["delivery"]["status"], "read");
    // A failure report wins over read and keeps Meta's reason.
    let r = post(&d, &fail, Some(sign(&serde_json::to_vec(&fail).unwrap()))).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let delivery = reply_turns(&d).await[0]["delivery"].clone();
    assert_eq!(
        (delivery["status"].clone(), delivery["status_error"].clone()),
        (json!("failed"), json!("131026: Message undeliverable")),
        "{delivery}"
    );
    assert_eq!(delivery["state"], "sent", "the Graph API did accept it");
    d.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whatsapp_reply_outside_the_24_hour_window_is_failed_without_a_call() {
    use std::sync::atomic::Ordering;
    let graph = FakeGraph::start();
    graph.failing.store(true, Ordering::SeqCst);
    let mut d = graph_daemon(&graph);
    d.boot().await;
    let b = message("wamid.IN1", "text", json!({"body": "/recall x"}));
    let r = post(&d, &b, Some(sign(&serde_json::to_vec(&b).unwrap()))).await;
    assert_eq!(r.status, 200, "{}", r.body);
    poll_until(Duration::from_secs(30), || async {
        (!graph.bodies().is_empty()).then_some(())
    })
    .await
    .expect("a refused send");
    // keel is down for a day: the user's message is now 25 hours old.
    d.sigkill();
    {
        let db = common::open_db(&d.db_path());
        let day_ago = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            - 25 * 3600;
        let n = db
            .execute(
                "UPDATE turns SET created_at = strftime('%Y-%m-%dT%H:%M:%fZ', ?1, 'unixepoch')
                 WHERE session_id = 'whatsapp:4915550001' AND role = 'user'",
                [day_ago as i64],
            )
            .expect("age the turn");
        assert_eq!(n, 1);
    }
    graph.failing.store(false, Ordering::SeqCst);
    let calls_before = graph.bodies().len();
    d.restart().await;
    let failed = poll_until(Duration::from_secs(30), || async {
        reply_turns(&d)
            .await
            .into_iter()
            .find(|t| t["delivery"]["state"] == "failed")
    })
    .await
    .expect("the reply is failed");
    let why = failed["delivery"]["error"].as_str().unwrap_or("");
    assert!(why.contains("outside the 24-hour window"), "{why}");
    assert_eq!(
        graph.bodies().len(),
        calls_before,
        "no call outside the window"
    );
    // The user writes again: the window is open, the reply goes out.
    let b = message("wamid.IN2", "text", json!({"body": "/recall y"}));
    let r = post(&d, &b, Some(sign(&serde_json::to_vec(&b).unwrap()))).await;
    assert_eq!(r.status, 200, "{}", r.body);
    poll_until(Duration::from_secs(30), || async {
        (reply_turns(&d)
            .await
            .iter()
            .any(|t| t["delivery"]["state"] == "sent"))
        .then_some(())
    })
    .await
    .expect("the reply inside the window is sent");
    d.assert_no_panics();
}
