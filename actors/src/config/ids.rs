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
