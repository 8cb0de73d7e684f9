//! Identifiers that come from outside: validation of chat / user / message
//! ids, and the mapping of a session id to a file name that cannot escape its
//! directory.

pub use crate::config::{check_external_id, MAX_ID_BYTES};

/// A file name for a session id: every byte outside `[A-Za-z0-9_-]` is
/// percent-encoded (so `/`, `\`, `.`, NUL and non-ASCII can never form a path
/// component other than the name itself), and long names are cut and suffixed
/// with a hash so distinct ids stay distinct.
pub fn session_file_name(session_id: &str) -> String {
    const MAX_STEM: usize = 180;
    let mut stem = String::with_capacity(session_id.len());
    for b in session_id.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            stem.push(b as char);
        } else {
            stem.push_str(&format!("%{b:02X}"));
        }
    }
    if stem.is_empty() {
        stem.push_str("%00empty");
    }
    if stem.len() > MAX_STEM {
        let hash = fnv1a64(session_id.as_bytes());
        stem.truncate(MAX_STEM);
        // Never cut inside a %XX escape: drop a dangling partial one.
        if let Some(pos) = stem[stem.len().saturating_sub(2)..].find('%') {
            let cut = stem.len().saturating_sub(2) + pos;
            stem.truncate(cut);
        }
        stem.push_str(&format!("~{hash:016x}"));
    }
    format!("{stem}.json")
}

/// FNV-1a: a stable, dependency-free hash for disambiguating cut names.
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_session_ids_stay_one_plain_file_name() {
        let hostile = [
            "../../etc/passwd",
            "..%2f..%2f",
            "%252e%252e%252f",
            "..\\..\\",
            "/etc/passwd",
            "a\0b",
            ".",
            "..",
            "",
            "-rf",
            "\u{FF0E}\u{FF0E}",
            "a\u{202E}b",
            "line\nbreak",
        ];
        for id in hostile {
            let name = session_file_name(id);
            assert!(!name.contains('/') && !name.contains('\\') && !name.contains('\0'));
            assert!(
                name != "." && name != ".." && !name.starts_with('.'),
                "{id:?} -> {name}"
            );
            assert!(name.ends_with(".json"));
            assert!(name.is_ascii());
        }
        let long = "x".repeat(300);
        let long2 = format!("{}y", "x".repeat(299));
        assert!(session_file_name(&long).len() < 255);
        assert_ne!(session_file_name(&long), session_file_name(&long2));
        assert_eq!(session_file_name("webhook:c1"), "webhook%3Ac1.json");
    }

    #[test]
    fn external_ids_are_checked() {
        assert!(check_external_id("chat", "c1").is_ok());
        assert!(check_external_id("chat", "-1001234").is_ok());
        assert!(check_external_id("chat", "").is_err());
        assert!(check_external_id("chat", "a\nb")
            .unwrap_err()
            .contains("U+000A"));
        assert!(check_external_id("chat", "a\0b").is_err());
        assert!(check_external_id("chat", "a\u{202E}b").is_err());
        assert!(check_external_id("chat", &"x".repeat(300)).is_err());
    }
}
