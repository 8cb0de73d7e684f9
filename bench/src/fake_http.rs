//! The HTTP/1.1 that the bench's fake upstreams speak ([`crate::fake_telegram`],
//! [`crate::fake_slack`]): keep-alive requests with a `Content-Length`
//! body (what keel's reqwest client sends) read off a real loopback socket,
//! and JSON answers. Small on purpose: the fakes model the upstreams' wire
//! protocols, not HTTP.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// Largest request head or body the fakes accept (keel sends small JSON).
const MAX_REQUEST: usize = 1 << 20;

/// One request as the fakes need it.
#[derive(Debug, Default)]
pub struct Request {
    pub method: String,
    /// The path without the query string.
    pub path: String,
    /// The raw query string (empty when absent).
    pub query: String,
    /// The `Authorization` header (empty when absent).
    pub authorization: String,
    /// The body as JSON (`{}` when empty or not JSON).
    pub body: Value,
}

impl Request {
    /// An integer parameter from the JSON body or else the query string.
    pub fn int(&self, name: &str) -> Option<i64> {
        if let Some(v) = self.body.get(name).and_then(Value::as_i64) {
            return Some(v);
        }
        self.query.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == name).then(|| v.parse().ok()).flatten()
        })
    }
}

/// Reads the next request of a keep-alive connection; `None` once the
/// client closed it. `buf` carries bytes read past the previous request.
pub async fn read_request(sock: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<Option<Request>> {
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if !fill(sock, buf).await? {
            return Ok(None);
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.lines();
    let mut first = lines.next().unwrap_or("").split_whitespace();
    let method = first.next().unwrap_or("").to_string();
    let target = first.next().unwrap_or("");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut len = 0usize;
    let mut authorization = String::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => len = value.trim().parse().unwrap_or(0),
            "authorization" => authorization = value.trim().to_string(),
            _ => {}
        }
    }
    if len > MAX_REQUEST {
        return Err(io::Error::other("request body too large"));
    }
    while buf.len() < head_end + len {
        if !fill(sock, buf).await? {
            return Ok(None);
        }
    }
    let body = serde_json::from_slice(&buf[head_end..head_end + len])
        .unwrap_or_else(|_| Value::Object(Default::default()));
    let request = Request {
        method,
        path: path.to_string(),
        query: query.to_string(),
        authorization,
        body,
    };
    buf.drain(..head_end + len);
    Ok(Some(request))
}

/// Reads more bytes into `buf`; false at end of stream.
async fn fill(sock: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<bool> {
    if buf.len() > MAX_REQUEST {
        return Err(io::Error::other("request head too large"));
    }
    let mut chunk = [0u8; 8192];
    let n = sock.read(&mut chunk).await?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n > 0)
}

/// Writes `body` as a JSON answer with `status` (keep-alive).
pub async fn write_json(sock: &mut TcpStream, status: u16, body: &Value) -> io::Result<()> {
    let body = body.to_string();
    let reason = match status {
        200 => "OK",
        401 => "Unauthorized",
        _ => "Not Found",
    };
    // One write: a head and a body written apart meet Nagle's algorithm
    // and the client's delayed ACK, ~40 ms per response on loopback.
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(response.as_bytes()).await
}

/// One message a fake upstream fed keel, as its ledger has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fed {
    /// The turn key keel stores it under (Telegram's update_id, Slack's event_id).
    pub key: String,
    /// The id in its text (`tg-N`, `sl-N`), which keel's reply repeats.
    pub tag: String,
    /// keel confirmed it to the upstream (Telegram: an offset above it;
    /// Slack: one of its envelopes acked), so it must be stored.
    pub acked: bool,
}

/// What a fake upstream saw over a run, for the battery's final check.
#[derive(Debug, Clone, Default)]
pub struct Upstream {
    /// Everything it fed, in order.
    pub fed: Vec<Fed>,
    /// keel's replies per tag that reached the tag's own chat.
    pub replies: HashMap<String, u64>,
    /// Replies that named no message of their chat.
    pub stray_replies: u64,
    /// Telegram: offsets below one keel had already sent (its committed
    /// offset lost). Always 0 for Slack.
    pub offset_regressions: u64,
    /// Slack: envelopes sent again (`retry_attempt` > 0) because the socket
    /// died before their ack. Always 0 for Telegram.
    pub redelivered: u64,
}

impl Upstream {
    /// Everything fed was acknowledged and answered (the final start is done).
    pub fn settled(&self) -> bool {
        self.fed
            .iter()
            .all(|f| f.acked && self.replies.contains_key(&f.tag))
    }
}

/// The `tag`-prefixed id in a text (`tg-17` in `I have nothing under tg-17.`):
/// the prefix and the digits after it.
pub fn tag_in<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let at = text.find(prefix)?;
    let rest = &text[at + prefix.len()..];
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    (digits > 0).then(|| &text[at..at + prefix.len() + digits])
}

/// What every fake upstream's ledger offers the battery.
pub trait FakeLedger: Send + 'static {
    /// `(feeding, frozen)`: still queueing messages; answering empty and
    /// recording nothing.
    fn flags(&mut self) -> (&mut bool, &mut bool);
    /// The ledger for the final check.
    fn upstream(&self) -> Upstream;
}

/// A fake upstream served by a thread of its own (it outlives every keel
/// restart): its base URL and its ledger. Stopped and joined on drop.
pub struct Fake<L> {
    /// The `api_base` to configure.
    pub api_base: String,
    ledger: Arc<Mutex<L>>,
    stop: Arc<Notify>,
    thread: Option<JoinHandle<()>>,
}

impl<L: FakeLedger> Fake<L> {
    pub(crate) fn new(
        api_base: String,
        ledger: Arc<Mutex<L>>,
        stop: Arc<Notify>,
        thread: JoinHandle<()>,
    ) -> Fake<L> {
        Fake {
            api_base,
            ledger,
            stop,
            thread: Some(thread),
        }
    }

    pub(crate) fn ledger(&self) -> MutexGuard<'_, L> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// No more messages are queued (the cycles are over).
    pub fn stop_feeding(&self) {
        *self.ledger().flags().0 = false;
    }

    /// From now on nothing goes out and nothing is recorded (the cases
    /// after the final check run other stores with the same config).
    pub fn freeze(&self) {
        *self.ledger().flags().1 = true;
    }

    /// What it saw so far.
    pub fn upstream(&self) -> Upstream {
        self.ledger().upstream()
    }
}

impl<L> Drop for Fake<L> {
    fn drop(&mut self) {
        self.stop.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_found_in_reply_texts() {
        assert_eq!(tag_in("I have nothing under tg-17.", "tg-"), Some("tg-17"));
        assert_eq!(tag_in("sl-3", "sl-"), Some("sl-3"));
        assert_eq!(tag_in("tg-x tg-", "tg-"), None);
        assert_eq!(tag_in("Got it", "tg-"), None);
    }
}
