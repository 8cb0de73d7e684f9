//! The CLI adapter: `keel chat` over a local Unix socket (mode 0600), and
//! `keel run --stdin` serving one local user from stdin/stdout.
//!
//! Socket protocol, JSON lines. Client → keel:
//! - `{"text": "...", "chat": "local", "id": "<unique>"}` — a message
//!   (`chat` and `id` optional; `id` makes a resend after a reconnect
//!   idempotent). keel answers `{"ack": "accepted" | "duplicate", "seq": N}`
//!   once the turn is durable (R1), or `{"error": "..."}`;
//! - `{"hello": true, "chat": "local"}` — subscribe to a chat without
//!   sending anything (answered `{"subscribed": "local"}`), so reminders and
//!   notices arrive while the prompt waits;
//! - `{"received": N}` — the client has shown reply `N`.
//!
//! keel → client, at any time: `{"reply": "...", "in_reply_to": "<id>",
//! "reply_id": N}`. A reply counts as sent only when a client answered
//! `{"received": N}` (at-least-once: a client may see a reply again after a
//! reconnect and drops repeats by `reply_id`). With no client subscribed to
//! its chat a reply waits (`SendError::Waiting`) and goes out as soon as one
//! subscribes (`ChannelReady`).
//!
//! The socket listener ([`CliListener`]) runs under the adapter supervisor
//! like Telegram and Slack: a bind or accept failure, or the socket file
//! vanishing or being replaced (checked every [`SOCKET_CHECK`]), ends the
//! run and the supervisor binds a fresh socket after its backoff. Open
//! connections are not affected by a restart. The `CliAdapter` actor serves
//! stdin (`keel run --stdin`).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use futures::future::BoxFuture;
use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::error::SendError;
use crate::health::Gate;
use crate::ids::check_external_id;
use crate::metrics::Metrics;
use crate::outbox::{ChannelReady, OutboundReply, ReplySink};
use crate::session::{Deliver, Delivered, SessionRegistry};

/// The chat name used by `keel run --stdin`.
pub const STDIN_CHAT: &str = "stdin";
/// Longest line a socket client may send.
const MAX_LINE_BYTES: usize = 128 * 1024;

/// Who is connected, so replies can find them.
#[derive(Clone)]
pub struct CliClients {
    inner: Arc<Mutex<ClientsInner>>,
    /// Signalled whenever a stdin reply is printed.
    printed: Arc<Notify>,
    /// Bind attempts of the socket listener so far (ok or not), so startup
    /// can report ready only once `keel chat` can connect.
    binds: Arc<tokio::sync::watch::Sender<u64>>,
    /// Told when a client subscribes, so replies waiting for one go out.
    ready: Arc<Mutex<Option<Recipient<ChannelReady>>>>,
}

impl Default for CliClients {
    fn default() -> Self {
        CliClients {
            inner: Arc::default(),
            printed: Arc::default(),
            binds: Arc::new(tokio::sync::watch::channel(0).0),
            ready: Arc::default(),
        }
    }
}

/// A reply sent to clients, waiting for one of them to confirm it.
struct PendingReply {
    /// Connections it was written to; when all are gone, it failed.
    conns: HashSet<u64>,
    /// Its chat and the line written, so a client subscribing while it
    /// waits is sent it too (and the reply does not fail when the client
    /// it was first written to leaves).
    chat: String,
    line: String,
    done: oneshot::Sender<Result<(), SendError>>,
}

#[derive(Default)]
struct ClientsInner {
    sockets: HashMap<String, Vec<(u64, mpsc::UnboundedSender<String>)>>,
    stdout: bool,
    /// Keys of stdin messages whose reply has not been printed yet.
    awaiting_stdout: HashSet<String>,
    /// Replies written to sockets and not yet confirmed, by outbox id.
    pending: HashMap<i64, PendingReply>,
}

impl CliClients {
    /// Resolve once the socket listener tried its first bind (or `deadline`
    /// passed). Awaited by the app before it reports ready.
    pub async fn first_bind(&self, deadline: Duration) {
        let mut rx = self.binds.subscribe();
        let _ = tokio::time::timeout(deadline, rx.wait_for(|n| *n > 0)).await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ClientsInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where to say that a client subscribed (the outbox). Set by the app.
    pub fn set_ready_hook(&self, ready: Recipient<ChannelReady>) {
        *self.ready.lock().unwrap_or_else(|p| p.into_inner()) = Some(ready);
    }

    /// Connection `conn` subscribed to `chat` (its first message or hello).
    fn subscribe(&self, chat: &str, conn: u64, tx: &mpsc::UnboundedSender<String>) {
        {
            let mut inner = self.lock();
            inner
                .sockets
                .entry(chat.to_string())
                .or_default()
                .push((conn, tx.clone()));
            // Replies of this chat still waiting for a confirmation go to the
            // new client as well (at-least-once), so they do not hang on a
            // client that is leaving.
            for p in inner.pending.values_mut() {
                if p.chat == chat && !p.conns.contains(&conn) && tx.send(p.line.clone()).is_ok() {
                    p.conns.insert(conn);
                }
            }
        }
        if let Some(ready) = self
            .ready
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            ready.do_send(ChannelReady("cli".into()));
        }
    }

    /// A client confirmed reply `id`.
    fn received(&self, id: i64) {
        if let Some(p) = self.lock().pending.remove(&id) {
            let _ = p.done.send(Ok(()));
        }
    }

    /// Connection `conn` closed: forget it, and fail the replies that only
    /// it had been sent (they wait for the next client).
    fn disconnected(&self, conn: u64, chats: &HashSet<String>) {
        let mut inner = self.lock();
        for chat in chats {
            if let Some(v) = inner.sockets.get_mut(chat) {
                v.retain(|(id, _)| *id != conn);
            }
        }
        let orphaned: Vec<i64> = inner
            .pending
            .iter_mut()
            .filter_map(|(id, p)| {
                p.conns.remove(&conn);
                p.conns.is_empty().then_some(*id)
            })
            .collect();
        for id in orphaned {
            if let Some(p) = inner.pending.remove(&id) {
                let _ = p.done.send(Err(SendError::Waiting(
                    "the keel chat client left before confirming".into(),
                )));
            }
        }
    }
}

/// Delivers replies on the `cli` channel.
pub struct CliSink {
    pub clients: CliClients,
}

impl ReplySink for CliSink {
    fn send(&self, reply: OutboundReply) -> BoxFuture<'static, Result<(), SendError>> {
        let clients = self.clients.clone();
        Box::pin(async move {
            if reply.chat == STDIN_CHAT && clients.lock().stdout {
                let mut out = tokio::io::stdout();
                let text = format!("{}\n", reply.text);
                out.write_all(text.as_bytes())
                    .await
                    .map_err(|e| SendError::Transient(format!("stdout: {e}")))?;
                out.flush()
                    .await
                    .map_err(|e| SendError::Transient(format!("stdout: {e}")))?;
                if let Some(key) = &reply.in_reply_to {
                    clients.lock().awaiting_stdout.remove(key);
                }
                clients.printed.notify_waiters();
                return Ok(());
            }
            let confirmed = {
                let mut inner = clients.lock();
                let conns = inner.sockets.entry(reply.chat.clone()).or_default();
                conns.retain(|(_, tx)| !tx.is_closed());
                if conns.is_empty() {
                    return Err(SendError::Waiting(format!(
                        "no `keel chat` client connected for chat {:?}",
                        reply.chat
                    )));
                }
                let line = json!({
                    "reply": reply.text,
                    "in_reply_to": reply.in_reply_to,
                    "reply_id": reply.id,
                })
                .to_string();
                let mut sent_to = HashSet::new();
                for (conn, tx) in conns.iter() {
                    if tx.send(line.clone()).is_ok() {
                        sent_to.insert(*conn);
                    }
                }
                let (done, confirmed) = oneshot::channel();
                // A resend replaces an older wait for the same reply.
                inner.pending.insert(
                    reply.id,
                    PendingReply {
                        conns: sent_to,
                        chat: reply.chat.clone(),
                        line,
                        done,
                    },
                );
                confirmed
            };
            // Sent only once a client confirmed it; the outbox's send
            // timeout bounds the wait (then: unknown, resent).
            confirmed
                .await
                .unwrap_or_else(|_| Err(SendError::Waiting("the confirmation was dropped".into())))
        })
    }
}

/// How often the listener checks that its socket file is still its own.
pub const SOCKET_CHECK: Duration = Duration::from_secs(1);

/// The `keel chat` socket listener, (re)started by the adapter supervisor.
pub struct CliListener {
    pub socket: PathBuf,
    pub registry: Addr<SessionRegistry>,
    pub gate: Gate,
    pub metrics: Metrics,
    pub clients: CliClients,
}

/// Device and inode of a path, to notice a socket file removed or replaced.
fn file_id(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

impl super::supervisor::Adapter for CliListener {
    fn name(&self) -> &'static str {
        "cli"
    }

    fn run(
        &self,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> BoxFuture<'static, Result<(), crate::error::AdapterError>> {
        use crate::error::AdapterError;
        let path = self.socket.clone();
        let conn = Conn {
            registry: self.registry.clone(),
            gate: self.gate.clone(),
            metrics: self.metrics.clone(),
            clients: self.clients.clone(),
        };
        Box::pin(async move {
            // keel holds the data-dir lock, so a socket file left here is stale.
            let _ = std::fs::remove_file(&path);
            let bound = UnixListener::bind(&path);
            if bound.is_ok() {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::Permissions::from_mode(0o600);
                if let Err(e) = std::fs::set_permissions(&path, mode) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot set socket mode 0600");
                }
            }
            conn.clients.binds.send_modify(|n| *n += 1);
            let listener = bound.map_err(|e| {
                AdapterError::Transient(format!("cli socket {}: bind: {e}", path.display()))
            })?;
            let ours = file_id(&path);
            tracing::info!(path = %path.display(), "cli adapter listening");
            let mut check = tokio::time::interval(SOCKET_CHECK);
            static NEXT: AtomicU64 = AtomicU64::new(1);
            let result = loop {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => break Ok(()),
                    _ = check.tick() => {
                        if ours.is_none() || file_id(&path) != ours {
                            break Err(AdapterError::Transient(format!(
                                "cli socket {} was removed or replaced", path.display()
                            )));
                        }
                    }
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => {
                            let conn = conn.clone();
                            let id = NEXT.fetch_add(1, Ordering::Relaxed);
                            tokio::spawn(async move { conn.serve(id, stream).await });
                        }
                        Err(e) => break Err(AdapterError::Transient(format!("cli accept failed: {e}"))),
                    },
                }
            };
            // Remove the file only if it is still ours (not a newer socket).
            if file_id(&path) == ours {
                let _ = std::fs::remove_file(&path);
            }
            result
        })
    }
}

/// The CLI adapter actor: serves stdin (`ServeStdin`). The socket is served
/// by [`CliListener`] under the supervisor.
pub struct CliAdapter {
    pub registry: Addr<SessionRegistry>,
    pub gate: Gate,
    pub metrics: Metrics,
    pub clients: CliClients,
    /// When the actor started.
    pub since: tokio::time::Instant,
}

impl Actor for CliAdapter {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Self::Context) {
        tracing::debug!("cli stdin adapter started");
    }

    fn stopping(&mut self, _: &mut Self::Context) -> Running {
        tracing::debug!("cli stdin adapter stopping");
        Running::Stop
    }
}

impl Handler<super::StopAdapter> for CliAdapter {
    type Result = ();
    fn handle(&mut self, _: super::StopAdapter, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

impl Handler<super::GetAdapterInfo> for CliAdapter {
    type Result = MessageResult<super::GetAdapterInfo>;
    fn handle(&mut self, _: super::GetAdapterInfo, ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(super::AdapterInfo {
            name: "cli",
            since: self.since,
            stopping: ctx.state() != ActorState::Running,
        })
    }
}

/// Serve stdin until EOF; resolves when every reply has been printed (or the
/// deadline passed). Sent by the app once intake is open.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ServeStdin {
    pub reply_deadline: Duration,
}

impl Handler<ServeStdin> for CliAdapter {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, msg: ServeStdin, _: &mut Context<Self>) -> Self::Result {
        self.clients.lock().stdout = true;
        let conn = Conn {
            registry: self.registry.clone(),
            gate: self.gate.clone(),
            metrics: self.metrics.clone(),
            clients: self.clients.clone(),
        };
        Box::pin(async move { conn.serve_stdin(msg.reply_deadline).await })
    }
}

#[derive(Clone)]
struct Conn {
    registry: Addr<SessionRegistry>,
    gate: Gate,
    metrics: Metrics,
    clients: CliClients,
}

/// One line from a socket client: a message (`text`), a subscription
/// (`hello`) or a confirmation (`received`); exactly one of the three.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientLine {
    text: Option<String>,
    chat: Option<String>,
    id: Option<String>,
    hello: Option<bool>,
    received: Option<i64>,
}

/// A key for a message that came without one: unique per line, and across
/// processes by a random part (never a clock read: see `clock.rs`).
fn fresh_key(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{:016x}-{}",
        std::process::id(),
        rand::random::<u64>(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

impl Conn {
    async fn deliver(&self, chat: &str, key: String, text: String) -> Result<Delivered, String> {
        let Some(_guard) = self.gate.enter() else {
            return Err(
                "keel is not accepting messages right now (starting or shutting down)".into(),
            );
        };
        let msg = Deliver::text("cli", chat.to_string(), "local".into(), key, text);
        super::deliver(&self.registry, &self.metrics, msg)
            .await
            .map_err(|e| e.to_string())
    }

    async fn serve(self, conn_id: u64, stream: UnixStream) {
        let (read, mut write) = stream.into_split();
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        let writer = tokio::spawn(async move {
            while let Some(line) = rx.recv().await {
                if write
                    .write_all(format!("{line}\n").as_bytes())
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        let mut lines = BufReader::new(read);
        let mut registered: HashSet<String> = HashSet::new();
        let mut buf = String::new();
        loop {
            buf.clear();
            match (&mut lines)
                .take(MAX_LINE_BYTES as u64 + 1)
                .read_line(&mut buf)
                .await
            {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if buf.len() > MAX_LINE_BYTES {
                let _ = tx.send(
                    json!({"error": format!("line longer than {MAX_LINE_BYTES} bytes")})
                        .to_string(),
                );
                break;
            }
            let reply = match serde_json::from_str::<ClientLine>(buf.trim_end()) {
                Err(e) => json!({"error": format!("invalid request: {e}")}),
                Ok(ClientLine {
                    received: Some(id),
                    text: None,
                    hello: None,
                    ..
                }) => {
                    self.clients.received(id);
                    continue;
                }
                Ok(ClientLine {
                    received: Some(_), ..
                }) => json!({"error": "a confirmation carries only \"received\""}),
                Ok(line) => {
                    let chat = line.chat.unwrap_or_else(|| "local".to_string());
                    let hello = line.hello == Some(true);
                    let text = line.text.unwrap_or_default();
                    if let Err(e) = check_external_id("chat", &chat) {
                        json!({"error": e})
                    } else if hello && !text.is_empty() {
                        json!({"error": "hello and text do not go together"})
                    } else if hello {
                        if registered.insert(chat.clone()) {
                            self.clients.subscribe(&chat, conn_id, &tx);
                        }
                        json!({"subscribed": chat})
                    } else if text.trim().is_empty() || text.contains('\0') {
                        json!({"error": "text must be non-empty and contain no NUL"})
                    } else {
                        if registered.insert(chat.clone()) {
                            self.clients.subscribe(&chat, conn_id, &tx);
                        }
                        let line_text = text;
                        let key = line.id.unwrap_or_else(|| fresh_key("cli"));
                        match check_external_id("id", &key) {
                            Err(e) => json!({"error": e}),
                            Ok(()) => match self.deliver(&chat, key, line_text).await {
                                Ok(Delivered::Accepted { seq, .. }) => {
                                    json!({"ack": "accepted", "seq": seq})
                                }
                                Ok(Delivered::Duplicate { seq, .. }) => {
                                    json!({"ack": "duplicate", "seq": seq})
                                }
                                Ok(Delivered::Conflict { .. }) => {
                                    json!({"error": "id already used with different content"})
                                }
                                Err(e) => json!({"error": e}),
                            },
                        }
                    }
                }
            };
            if tx.send(reply.to_string()).is_err() {
                break;
            }
        }
        self.clients.disconnected(conn_id, &registered);
        drop(tx);
        let _ = writer.await;
    }

    async fn serve_stdin(self, reply_deadline: Duration) {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        loop {
            let line = match lines.next_line().await {
                Ok(Some(l)) => l,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "stdin unreadable; stopping");
                    break;
                }
            };
            if line.trim().is_empty() {
                continue;
            }
            let key = fresh_key("stdin");
            self.clients.lock().awaiting_stdout.insert(key.clone());
            if let Err(e) = self.deliver(STDIN_CHAT, key.clone(), line).await {
                self.clients.lock().awaiting_stdout.remove(&key);
                eprintln!("keel: message not stored: {e}");
            }
        }
        // EOF: wait until every reply has been printed, then return.
        let wait = async {
            loop {
                let printed = self.clients.printed.notified();
                if self.clients.lock().awaiting_stdout.is_empty() {
                    return;
                }
                printed.await;
            }
        };
        if tokio::time::timeout(reply_deadline, wait).await.is_err() {
            tracing::warn!("stdin closed; some replies were not printed before the deadline (they stay in the outbox)");
        }
    }
}

/// The cli channel: `keel chat` over the socket (supervised), or stdin in
/// ephemeral mode (served by [`CliAdapter`], outside the supervisor).
pub const CHANNEL: super::Channel = super::Channel {
    name: "cli",
    routed: |c| c.cli.enabled,
    sink: |_, deps| {
        deps.cli.map(|clients| {
            Arc::new(CliSink {
                clients: clients.clone(),
            }) as Arc<dyn ReplySink>
        })
    },
    intake: |c, deps| match (&deps.cli, c.ephemeral) {
        (Some(clients), false) => Some(Arc::new(CliListener {
            socket: c.cli_socket(),
            registry: deps.registry.clone(),
            gate: deps.gate.clone(),
            metrics: deps.metrics.clone(),
            clients: clients.clone(),
        }) as Arc<dyn super::Adapter>),
        _ => None,
    },
    unsupervised: |c| c.cli.enabled && c.ephemeral,
    owner_chat: |_| None,
};
