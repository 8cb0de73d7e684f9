//! People, not chats (issue 7, §3c): `[principals.NAME]` maps a person's
//! identities on the channels to one person whose working memory
//! (`/remember`, `/recall`) follows them across chats and channels, while
//! history stays per chat. Two chats of one person changing memory at the
//! same time lose nothing; another person in the same chat has their own.

// Tests drive real processes in real time: clippy.toml's clock and env rules are for keel itself.
#![allow(clippy::disallowed_methods)]

mod common;

use common::{Config, Daemon};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// The reply keel stored to the message with key `id` in `session`.
async fn reply_to(d: &Daemon, session: &str, id: &str) -> String {
    let turns = d.turns(session).await;
    let at = turns
        .iter()
        .position(|t| t.key.as_deref() == Some(id))
        .unwrap_or_else(|| panic!("no turn {id} in {session}: {turns:?}"));
    turns[at + 1..]
        .iter()
        .find(|t| t.role == "assistant")
        .map(|t| t.text.clone())
        .unwrap_or_else(|| panic!("no reply to {id}: {turns:?}"))
}

async fn say(d: &Daemon, chat: &str, from: &str, id: &str, text: &str) -> String {
    let r = d
        .post_message(&json!({"id": id, "chat": chat, "from": from, "text": text}))
        .await
        .expect("POST");
    assert_eq!(r.status, 200, "{}", r.body);
    reply_to(d, &format!("webhook:{chat}"), id).await
}

/// One line over the `keel chat` socket; returns the reply text.
async fn cli_say(d: &Daemon, id: &str, text: &str) -> String {
    let stream = tokio::net::UnixStream::connect(d.data_dir.join("keel.sock"))
        .await
        .expect("connect");
    let (read, mut write) = stream.into_split();
    let line = json!({"text": text, "id": id}).to_string() + "\n";
    write.write_all(line.as_bytes()).await.expect("write");
    let mut lines = BufReader::new(read).lines();
    while let Some(l) = lines.next_line().await.expect("read") {
        let v: Value = serde_json::from_str(&l).expect("json");
        if v["in_reply_to"] == id {
            if let Some(n) = v["reply_id"].as_i64() {
                let ack = json!({ "received": n }).to_string() + "\n";
                write.write_all(ack.as_bytes()).await.expect("ack");
            }
            return v["reply"].as_str().unwrap_or("").to_string();
        }
    }
    panic!("no reply to {id}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_follows_the_person_across_chats_and_channels() {
    let mut d = Daemon::new(Config::default(), None);
    d.write_config_text(
        "[principals.alice]\nwebhook = \"alice\"\ncli = true\ntelegram = 1234\n\n\
         [principals.bob]\nwebhook = \"bob\"\n",
    );
    d.boot().await;

    assert_eq!(
        say(&d, "c1", "alice", "a1", "/remember color blue").await,
        "Remembered color."
    );
    // Another chat of hers, and another channel: the same memory.
    assert_eq!(
        say(&d, "c2", "alice", "a2", "/recall color").await,
        "color: blue"
    );
    assert_eq!(cli_say(&d, "a3", "/recall color").await, "color: blue");
    // Bob, in the same chat, has his own.
    assert!(
        say(&d, "c1", "bob", "b1", "/recall color")
            .await
            .contains("nothing"),
        "bob sees alice's memory"
    );
    // Someone not configured keeps the chat's memory, as before.
    say(&d, "c3", "carol", "c1", "/remember pet cat").await;
    assert_eq!(say(&d, "c3", "dave", "d1", "/recall pet").await, "pet: cat");

    // Two chats of hers remembering at once: nothing is lost.
    let mut jobs = Vec::new();
    for i in 0..10 {
        let (base, client) = (d.base(), d.client.clone());
        for chat in ["c1", "c2"] {
            let (base, client) = (base.clone(), client.clone());
            jobs.push(tokio::spawn(async move {
                let msg = json!({"id": format!("k-{chat}-{i}"), "chat": chat, "from": "alice",
                                 "text": format!("/remember k{chat}{i} v{i}")});
                let r = common::send(client.post(format!("{base}/v1/messages")).json(&msg))
                    .await
                    .expect("POST");
                assert_eq!(r.status, 200, "{}", r.body);
            }));
        }
    }
    for j in jobs {
        j.await.expect("job");
    }
    for i in 0..10 {
        for chat in ["c1", "c2"] {
            let got = cli_say(&d, &format!("r-{chat}-{i}"), &format!("/recall k{chat}{i}")).await;
            assert_eq!(got, format!("k{chat}{i}: v{i}"));
        }
    }
    // History stays per chat.
    let c2 = d.turns("webhook:c2").await;
    assert!(
        c2.iter().all(|t| t.key.as_deref() != Some("a1")),
        "c1's message shows up in c2: {c2:?}"
    );
    // A bad principals section is refused with the key named.
    d.sigkill();
    d.write_config_text(
        "[principals.x]\nwebhook = \"alice\"\n[principals.y]\nwebhook = \"alice\"\n",
    );
    let data = d.data_dir.to_string_lossy().into_owned();
    let config = d.config_path.to_string_lossy().into_owned();
    let out = d
        .cli(&["status", "--data-dir", &data, "--config", &config])
        .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("principals") && err.contains("both"),
        "{err}"
    );
    d.assert_no_panics();
}
