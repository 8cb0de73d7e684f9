//! The brain decides replies. keel ships a command brain (`/help`,
//! `/history`, `/remember`, `/recall`); anything else is forwarded to an
//! external agent over HTTP when `agent.url` is set, else acknowledged.
//!
//! The brain is pure: it sees a snapshot (text, memory, recent turns) and
//! returns a `Decision`; the session actor turns that into one commit. Later
//! features (timers, tasks) register more commands through `Command`.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::persistence::timers::Effect;
use crate::persistence::{SessionKey, TurnRow};

/// What the brain sees of one inbound message.
pub struct BrainInput<'a> {
    pub session: &'a SessionKey,
    pub from: &'a str,
    /// The text, or a media message's caption (may be empty).
    pub text: &'a str,
    /// What the turn is (`text`, `photo`, `callback`, …; see `Deliver::kind`).
    pub kind: &'a str,
    pub memory: &'a Map<String, Value>,
    /// Newest turns of the session, oldest first (at most `RECENT_TURNS`).
    pub recent: &'a [TurnRow],
}

/// How many recent turns a session keeps in memory for the brain.
pub const RECENT_TURNS: usize = 50;

/// The brain's answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Reply now; `memory` replaces working memory when set.
    Reply {
        text: String,
        memory: Option<Map<String, Value>>,
    },
    /// Ask the external agent (the turn is stored as awaiting first).
    Forward,
    /// Apply `Effect` in the inbound turn's transaction; the store renders
    /// the reply text (e.g. the new timer's id).
    Act(Effect),
}

impl Decision {
    pub fn say(text: impl Into<String>) -> Decision {
        Decision::Reply {
            text: text.into(),
            memory: None,
        }
    }
}

/// A brain. Implementations must be cheap and must not block: they run on the
/// session actor's thread between receiving a message and committing it.
pub trait Brain: Send + Sync + 'static {
    fn decide(&self, input: &BrainInput<'_>) -> Decision;
}

/// One slash command.
pub trait Command: Send + Sync + 'static {
    /// One line for `/help`, e.g. `/recall KEY — what you stored under KEY`.
    fn usage(&self) -> &'static str;
    fn run(&self, args: &str, input: &BrainInput<'_>) -> Decision;
}

/// The built-in brain: a table of commands plus the fallback.
pub struct CommandBrain {
    commands: BTreeMap<&'static str, Arc<dyn Command>>,
    agent: bool,
}

impl CommandBrain {
    /// The default command set. `agent`: forward free text to the agent.
    pub fn new(agent: bool) -> CommandBrain {
        let mut b = CommandBrain {
            commands: BTreeMap::new(),
            agent,
        };
        b.register("start", Arc::new(Start));
        b.register("history", Arc::new(History));
        b.register("remember", Arc::new(Remember));
        b.register("recall", Arc::new(Recall));
        b
    }

    /// Add (or replace) a command, e.g. `/remind` from the timer feature.
    pub fn register(&mut self, name: &'static str, cmd: Arc<dyn Command>) {
        self.commands.insert(name, cmd);
    }

    fn help(&self) -> String {
        let mut out = String::from("Commands:\n/help — this list");
        for cmd in self.commands.values() {
            out.push('\n');
            out.push_str(cmd.usage());
        }
        if self.agent {
            out.push_str("\nAnything else goes to the agent.");
        }
        out
    }
}

impl Brain for CommandBrain {
    fn decide(&self, input: &BrainInput<'_>) -> Decision {
        let text = input.text.trim();
        if let Some(rest) = text.strip_prefix('/') {
            let (name, args) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
            // Telegram-style `/cmd@botname`.
            let name = name.split('@').next().unwrap_or(name);
            if name == "help" {
                return Decision::say(self.help());
            }
            return match self.commands.get(name) {
                Some(cmd) => cmd.run(args.trim(), input),
                None => Decision::say(format!(
                    "Unknown command /{}. Send /help for the list.",
                    truncate(name, 32)
                )),
            };
        }
        // Media (its caption is the text) is acknowledged here even with an
        // agent: the agent sees it, with its metadata, in the history.
        if let Some(what) = media_name(input.kind) {
            return Decision::say(format!("Got your {what}."));
        }
        if self.agent {
            Decision::Forward
        } else if input.kind == "callback" {
            Decision::say("Got it — your choice is saved.")
        } else {
            Decision::say("Got it — your message is saved. Send /help to see what I can do.")
        }
    }
}

/// How a reply names a media kind; `None` for text-like kinds.
fn media_name(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "photo" => "photo",
        "document" => "document",
        "voice" => "voice message",
        "audio" => "audio",
        "video" => "video",
        "video_note" => "video message",
        "animation" => "animation",
        "sticker" => "sticker",
        "location" => "location",
        "venue" => "venue",
        "contact" => "contact",
        "poll" => "poll",
        "dice" => "dice roll",
        _ => return None,
    })
}

/// `/start [PAYLOAD]`: what a Telegram client sends first (the payload of a
/// deep link is kept in the turn's meta by the channel, not used here).
struct Start;

impl Command for Start {
    fn usage(&self) -> &'static str {
        "/start — a greeting"
    }

    fn run(&self, _args: &str, _input: &BrainInput<'_>) -> Decision {
        Decision::say(
            "Hello! I'm keel, your assistant. I keep what you send me. \
             Send /help to see what I can do.",
        )
    }
}

struct History;

impl Command for History {
    fn usage(&self) -> &'static str {
        "/history [N] — the last N turns of this chat (default 10, at most 50)"
    }

    fn run(&self, args: &str, input: &BrainInput<'_>) -> Decision {
        let n = if args.is_empty() {
            10
        } else {
            match args.parse::<usize>() {
                Ok(n) if (1..=RECENT_TURNS).contains(&n) => n,
                _ => {
                    return Decision::say(format!(
                        "Usage: /history [N] with N between 1 and {RECENT_TURNS}"
                    ))
                }
            }
        };
        if input.recent.is_empty() {
            return Decision::say("No history yet.");
        }
        let start = input.recent.len().saturating_sub(n);
        let lines: Vec<String> = input.recent[start..]
            .iter()
            .map(|t| format!("#{} {}: {}", t.seq, t.role, truncate(&t.text, 200)))
            .collect();
        Decision::say(lines.join("\n"))
    }
}

/// Limits that keep working memory small enough to load on every wake-up.
const MAX_MEMORY_KEYS: usize = 1_000;
const MAX_KEY_CHARS: usize = 64;
const MAX_VALUE_BYTES: usize = 4_096;

struct Remember;

impl Command for Remember {
    fn usage(&self) -> &'static str {
        "/remember KEY VALUE — store VALUE under KEY in this chat's memory"
    }

    fn run(&self, args: &str, input: &BrainInput<'_>) -> Decision {
        let Some((key, value)) = args.split_once(char::is_whitespace) else {
            return Decision::say("Usage: /remember KEY VALUE");
        };
        let value = value.trim();
        if key.chars().count() > MAX_KEY_CHARS || value.is_empty() {
            return Decision::say(format!(
                "Usage: /remember KEY VALUE (KEY up to {MAX_KEY_CHARS} characters)"
            ));
        }
        if value.len() > MAX_VALUE_BYTES {
            return Decision::say(format!(
                "That value is too long (at most {MAX_VALUE_BYTES} bytes)."
            ));
        }
        if !input.memory.contains_key(key) && input.memory.len() >= MAX_MEMORY_KEYS {
            return Decision::say(format!("Memory is full ({MAX_MEMORY_KEYS} keys)."));
        }
        let mut memory = input.memory.clone();
        memory.insert(key.to_string(), Value::String(value.to_string()));
        Decision::Reply {
            text: format!("Remembered {key}."),
            memory: Some(memory),
        }
    }
}

struct Recall;

impl Command for Recall {
    fn usage(&self) -> &'static str {
        "/recall KEY — what you stored under KEY"
    }

    fn run(&self, args: &str, input: &BrainInput<'_>) -> Decision {
        if args.is_empty() {
            let mut keys: Vec<&str> = input.memory.keys().map(String::as_str).collect();
            keys.sort_unstable();
            return Decision::say(if keys.is_empty() {
                "Usage: /recall KEY (nothing remembered yet)".to_string()
            } else {
                format!("Usage: /recall KEY. Known keys: {}", keys.join(", "))
            });
        }
        match input.memory.get(args) {
            Some(Value::String(v)) => Decision::say(format!("{args}: {v}")),
            Some(other) => Decision::say(format!("{args}: {other}")),
            None => Decision::say(format!("I have nothing under {}.", truncate(args, 64))),
        }
    }
}

fn truncate(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decide(brain: &CommandBrain, text: &str, memory: &Map<String, Value>) -> Decision {
        let session = SessionKey::new("cli", "local");
        brain.decide(&BrainInput {
            session: &session,
            from: "me",
            text,
            kind: "text",
            memory,
            recent: &[],
        })
    }

    fn reply_text(d: Decision) -> String {
        match d {
            Decision::Reply { text, .. } => text,
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    #[test]
    fn remember_then_recall() {
        let b = CommandBrain::new(false);
        let mem = Map::new();
        let Decision::Reply {
            memory: Some(mem), ..
        } = decide(&b, "/remember color blue", &mem)
        else {
            panic!("remember must update memory");
        };
        assert_eq!(reply_text(decide(&b, "/recall color", &mem)), "color: blue");
        assert!(reply_text(decide(&b, "/recall shape", &mem)).contains("nothing"));
    }

    #[test]
    fn free_text_is_acknowledged_or_forwarded() {
        let mem = Map::new();
        assert!(reply_text(decide(&CommandBrain::new(false), "hello", &mem)).contains("/help"));
        assert_eq!(
            decide(&CommandBrain::new(true), "hello", &mem),
            Decision::Forward
        );
        // Commands are answered locally even with an agent.
        assert!(reply_text(decide(&CommandBrain::new(true), "/help", &mem)).contains("/recall"));
    }

    #[test]
    fn bad_command_arguments_get_usage() {
        let b = CommandBrain::new(false);
        let mem = Map::new();
        assert!(reply_text(decide(&b, "/history 0", &mem)).starts_with("Usage"));
        assert!(reply_text(decide(&b, "/history lots", &mem)).starts_with("Usage"));
        assert!(reply_text(decide(&b, "/remember", &mem)).starts_with("Usage"));
        assert!(reply_text(decide(&b, "/nope", &mem)).contains("Unknown command"));
    }

    #[test]
    fn start_greets_and_names_help_with_or_without_a_payload() {
        let b = CommandBrain::new(true);
        let mem = Map::new();
        for text in ["/start", "/start PAYLOAD123", "/start@KeelTestBot x"] {
            let t = reply_text(decide(&b, text, &mem));
            assert!(t.starts_with("Hello") && t.contains("/help"), "{text}: {t}");
        }
        assert!(reply_text(decide(&b, "/help", &mem)).contains("/start"));
    }

    #[test]
    fn media_is_acknowledged_and_captions_can_be_commands() {
        let b = CommandBrain::new(true);
        let mem = Map::new();
        let session = SessionKey::new("telegram", "1");
        let run = |text: &str, kind: &str| {
            b.decide(&BrainInput {
                session: &session,
                from: "me",
                text,
                kind,
                memory: &mem,
                recent: &[],
            })
        };
        assert_eq!(reply_text(run("sunset", "photo")), "Got your photo.");
        assert_eq!(reply_text(run("", "voice")), "Got your voice message.");
        assert!(reply_text(run("/help", "document")).contains("/recall"));
        assert_eq!(run("confirm:yes", "callback"), Decision::Forward);
        assert_eq!(run("later", "text"), Decision::Forward);
    }
}
