//! The rule for identifiers that come from outside (chat, user, message
//! ids), shared by config validation and every channel. Pure; it lives with
//! the config so the config depends on nothing else in the crate.

/// Longest external id accepted (chat, user, message id), in bytes.
pub const MAX_ID_BYTES: usize = 256;

/// Check an id that arrived from a channel. Returns a one-line reason.
pub fn check_external_id(field: &str, id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err(format!("{field} must not be empty"));
    }
    if id.len() > MAX_ID_BYTES {
        return Err(format!(
            "{field} is {} bytes long (at most {MAX_ID_BYTES})",
            id.len()
        ));
    }
    if let Some(c) = id.chars().find(|c| c.is_control() || is_bidi_control(*c)) {
        return Err(format!(
            "{field} contains the control character U+{:04X}",
            c as u32
        ));
    }
    Ok(())
}

/// Bidirectional overrides make a log line or file name display as something
/// it is not; no id needs them.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}')
}

/// Chat ids in keel.toml may be written as integers (`owner_chat = 123`) or
/// strings (`owner_chat = "123"`); both become the same string.
pub mod string_or_int {
    use serde::{Deserialize, Deserializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Id {
        Int(i64),
        Text(String),
    }

    impl From<Id> for String {
        fn from(id: Id) -> String {
            match id {
                Id::Int(n) => n.to_string(),
                Id::Text(s) => s,
            }
        }
    }

    /// For a required id.
    pub fn required<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        Id::deserialize(d).map(String::from)
    }

    /// For an optional id (`#[serde(default)]` on the struct covers absence).
    pub fn option<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        Option::<Id>::deserialize(d).map(|o| o.map(String::from))
    }
}
