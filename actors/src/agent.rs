//! Client for an external agent (`agent.url`): POST JSON in, JSON out.
//!
//! Request: `{"session", "channel", "chat", "from", "key", "text",
//! "history": [{"role", "text"}]}`. Response: `{"text": "..."}` (or
//! `{"reply": "..."}`). Any non-2xx, timeout or malformed body is an error;
//! the session actor retries with backoff and, after the last attempt,
//! answers the user that the agent is unavailable.

use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

use crate::persistence::{SessionKey, TurnRow};

/// Agent settings (from `[agent]`).
#[derive(Debug, Clone, PartialEq)]
pub struct AgentSettings {
    pub url: String,
    pub timeout: Duration,
    pub attempts: u32,
}

#[derive(Deserialize)]
struct AgentAnswer {
    text: Option<String>,
    reply: Option<String>,
}

/// Longest reply accepted from an agent.
const MAX_REPLY_BYTES: usize = 64 * 1024;

/// One request to the agent.
pub async fn ask(
    client: &reqwest::Client,
    settings: &AgentSettings,
    session: &SessionKey,
    key: Option<&str>,
    text: &str,
    history: &[TurnRow],
) -> Result<String, String> {
    let history: Vec<_> = history
        .iter()
        .map(|t| json!({"role": t.role, "text": t.text}))
        .collect();
    let body = json!({
        "session": session.id,
        "channel": session.channel,
        "chat": session.chat,
        "key": key,
        "text": text,
        "history": history,
    });
    let resp = client
        .post(&settings.url)
        .timeout(settings.timeout)
        .json(&body)
        .send()
        .await
        .map_err(|e| format!("agent request failed: {}", crate::redact::without_url(&e)))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(format!("agent answered HTTP {}", status.as_u16()));
    }
    let bytes = resp.bytes().await.map_err(|e| {
        format!(
            "agent response unreadable: {}",
            crate::redact::without_url(&e)
        )
    })?;
    if bytes.len() > MAX_REPLY_BYTES {
        return Err(format!("agent reply too large ({} bytes)", bytes.len()));
    }
    let answer: AgentAnswer =
        serde_json::from_slice(&bytes).map_err(|e| format!("agent reply is not JSON: {e}"))?;
    answer
        .text
        .or(answer.reply)
        .filter(|t| !t.trim().is_empty())
        .ok_or_else(|| "agent reply has no \"text\"".to_string())
}
