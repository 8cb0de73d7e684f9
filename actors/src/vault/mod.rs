//! The vault (R28–R30): capability tokens and their check, the access rule
//! of admin routes, secret names, and `vault:NAME` values.
//!
//! Tokens are `keel_<id>_<secret>`: `<id>` is 12 lowercase hex characters
//! (no `_`), `<secret>` 64 hex characters (256 random bits). The store keeps
//! the id and SHA-256 of the secret; a presented secret is hashed and
//! compared in constant time (`subtle`). The running daemon keeps every
//! token row in a [`TokenTable`] (loaded at start, updated by grants and
//! revocations through the admin socket), so a revocation is effective at
//! once and no request waits for the store.
//!
//! SQL for tokens and `secrets.db` lives in `persistence::vault`; the
//! admin-socket operations in [`admin`].

pub mod admin;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::persistence::vault::TokenRow;

/// A permission a token can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Perm {
    /// Sessions, turns, timers, tasks, services, status, `/metrics`.
    Read,
    /// `POST /v1/sessions/{session}/messages`: keel says something in a chat.
    Send,
    /// Run and cancel tasks.
    Tasks,
    /// Deploy and kill services.
    Deploy,
    /// Tokens, secrets, reload; implies every other permission.
    Admin,
}

impl Perm {
    pub const ALL: [Perm; 5] = [
        Perm::Read,
        Perm::Send,
        Perm::Tasks,
        Perm::Deploy,
        Perm::Admin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Perm::Read => "read",
            Perm::Send => "send",
            Perm::Tasks => "tasks",
            Perm::Deploy => "deploy",
            Perm::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Perm> {
        Perm::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

/// `read,send` → perms, with a one-line error for an unknown name.
pub fn parse_perms(list: &str) -> Result<Vec<Perm>, String> {
    let mut out = Vec::new();
    for p in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let perm = Perm::parse(p).ok_or_else(|| {
            format!("unknown permission {p:?} (known: read, send, tasks, deploy, admin)")
        })?;
        if !out.contains(&perm) {
            out.push(perm);
        }
    }
    if out.is_empty() {
        return Err("--perm needs at least one permission".into());
    }
    Ok(out)
}

/// Length of a token id in hex characters.
pub const ID_CHARS: usize = 12;
/// Length of a token secret in hex characters (256 bits).
pub const SECRET_CHARS: usize = 64;
/// Longest `Authorization` value looked at; anything longer is refused.
const MAX_HEADER: usize = 256;

/// A newly made token: the row to store and the text shown once.
pub struct NewToken {
    pub row: TokenRow,
    pub token: zeroize::Zeroizing<String>,
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
    hex::encode(b)
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// Make a token with `perms`, optional session-prefix `scope`, expiry
/// (unix ms) and note.
pub fn new_token(
    perms: &[Perm],
    scope: Option<String>,
    expires_ms: Option<i64>,
    note: Option<String>,
) -> NewToken {
    let id = random_hex(ID_CHARS / 2);
    let secret = zeroize::Zeroizing::new(random_hex(SECRET_CHARS / 2));
    let token = zeroize::Zeroizing::new(format!("keel_{id}_{}", *secret));
    NewToken {
        row: TokenRow {
            id,
            secret_sha256: sha256_hex(&secret),
            perms: perms.iter().map(|p| p.as_str().to_string()).collect(),
            scope,
            note,
            created_at: String::new(),
            expires_ms,
            last_used_at: None,
            revoked_at: None,
        },
        token,
    }
}

/// Split `keel_<id>_<secret>`; `None` unless both parts have the right shape.
pub fn parse_token(text: &str) -> Option<(&str, &str)> {
    let rest = text.strip_prefix("keel_")?;
    let (id, secret) = rest.split_once('_')?;
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    (hex(id, ID_CHARS) && hex(secret, SECRET_CHARS)).then_some((id, secret))
}

/// "12h", "30m", "7d", "45s" → milliseconds.
pub fn parse_ttl(text: &str) -> Result<i64, String> {
    let bad = || format!("--ttl {text:?}: use a number with s, m, h or d (e.g. 12h)");
    let (num, unit) = text.split_at(text.len().saturating_sub(1));
    let n: i64 = num.parse().map_err(|_| bad())?;
    let ms = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    if n <= 0 || n > 3650 * 86_400 {
        return Err(bad());
    }
    Ok(n * ms)
}

/// Secret names: 1–128 of letters, digits, `.`, `_`, `-`.
pub fn check_secret_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 128
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(format!(
            "secret name {:?}: 1-128 letters, digits, '.', '_' or '-'",
            name.chars().take(40).collect::<String>()
        ));
    }
    Ok(())
}

/// Who passed the check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorized {
    pub token_id: String,
    pub perms: Vec<Perm>,
    pub scope: Option<String>,
}

impl Authorized {
    pub fn has(&self, perm: Perm) -> bool {
        self.perms.contains(&perm) || self.perms.contains(&Perm::Admin)
    }

    /// Whether the token's scope includes `session`.
    pub fn sees(&self, session: &str) -> bool {
        self.scope.as_deref().is_none_or(|s| session.starts_with(s))
    }
}

/// Why a presented token was refused (logged and counted; the client only
/// ever sees one generic 401 message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Missing,
    Malformed,
    Unknown,
    Expired,
    Revoked,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Missing => "missing",
            Refusal::Malformed => "malformed",
            Refusal::Unknown => "unknown",
            Refusal::Expired => "expired",
            Refusal::Revoked => "revoked",
        }
    }
}

/// The running daemon's tokens, by id.
#[derive(Clone, Default)]
pub struct TokenTable {
    rows: Arc<RwLock<HashMap<String, TokenRow>>>,
    /// Failed attempts since the last `auth_failed` audit record.
    failures: Arc<AtomicU64>,
    /// When each token's `last_used_at` was last written (unix ms).
    touched: Arc<std::sync::Mutex<HashMap<String, i64>>>,
}

impl TokenTable {
    pub fn load(rows: Vec<TokenRow>) -> TokenTable {
        let t = TokenTable::default();
        t.replace(rows);
        t
    }

    pub fn replace(&self, rows: Vec<TokenRow>) {
        let mut map = self.rows.write().unwrap_or_else(|p| p.into_inner());
        *map = rows.into_iter().map(|r| (r.id.clone(), r)).collect();
    }

    pub fn insert(&self, row: TokenRow) {
        let mut map = self.rows.write().unwrap_or_else(|p| p.into_inner());
        map.insert(row.id.clone(), row);
    }

    /// Take in `rows` read from a shared store (other instances grant and
    /// revoke too). A read that started before a grant or revocation made
    /// here committed must not undo it: rows missing from `rows` stay, and a
    /// token revoked here stays revoked.
    pub fn merge(&self, rows: Vec<TokenRow>) {
        let mut map = self.rows.write().unwrap_or_else(|p| p.into_inner());
        for mut row in rows {
            if let Some(old) = map.get(&row.id) {
                if row.revoked_at.is_none() {
                    row.revoked_at = old.revoked_at.clone();
                }
            }
            map.insert(row.id.clone(), row);
        }
    }

    /// Mark `id` revoked in memory (the store already says so).
    pub fn revoke(&self, id: &str, at: &str) {
        let mut map = self.rows.write().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = map.get_mut(id) {
            r.revoked_at = Some(at.to_string());
        }
    }

    /// Check an `Authorization` header value at `now_ms`. `Err` carries the
    /// reason and, when the token parsed, its id (never the secret).
    pub fn check(
        &self,
        header: Option<&[u8]>,
        now_ms: i64,
    ) -> Result<Authorized, (Refusal, Option<String>)> {
        let Some(raw) = header else {
            return Err((Refusal::Missing, None));
        };
        if raw.len() > MAX_HEADER {
            return Err((Refusal::Malformed, None));
        }
        let text = std::str::from_utf8(raw).map_err(|_| (Refusal::Malformed, None))?;
        let token = text
            .strip_prefix("Bearer ")
            .ok_or((Refusal::Malformed, None))?;
        let (id, secret) = parse_token(token).ok_or((Refusal::Malformed, None))?;
        let map = self.rows.read().unwrap_or_else(|p| p.into_inner());
        let Some(row) = map.get(id) else {
            return Err((Refusal::Unknown, Some(id.to_string())));
        };
        let presented = sha256_hex(secret);
        if !bool::from(presented.as_bytes().ct_eq(row.secret_sha256.as_bytes())) {
            return Err((Refusal::Unknown, Some(id.to_string())));
        }
        if row.revoked_at.is_some() {
            return Err((Refusal::Revoked, Some(id.to_string())));
        }
        if row.expires_ms.is_some_and(|e| e <= now_ms) {
            return Err((Refusal::Expired, Some(id.to_string())));
        }
        Ok(Authorized {
            token_id: row.id.clone(),
            perms: row.perms.iter().filter_map(|p| Perm::parse(p)).collect(),
            scope: row.scope.clone(),
        })
    }

    /// Whether `id`'s `last_used_at` is due for a write (at most once a
    /// minute per token, so busy clients do not write on every request).
    pub fn should_touch(&self, id: &str, now_ms: i64) -> bool {
        let mut t = self.touched.lock().unwrap_or_else(|p| p.into_inner());
        match t.get(id) {
            Some(last) if now_ms - last < 60_000 => false,
            _ => {
                t.insert(id.to_string(), now_ms);
                true
            }
        }
    }

    /// Count one failed attempt (for the summarised audit record).
    pub fn count_failure(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Failed attempts since the last call.
    pub fn take_failures(&self) -> u64 {
        self.failures.swap(0, Ordering::Relaxed)
    }
}

/// The outcome of the access rule for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Let through; `None` = a loopback peer without a token while
    /// `[admin] loopback_open`.
    Granted(Option<Authorized>),
    /// 401: no usable token.
    Unauthorized(Refusal, Option<String>),
    /// 403: a valid token without the permission (or outside its scope).
    Forbidden { token_id: String, need: Perm },
}

/// The access rule of every admin route: a presented token is always
/// checked (also on loopback); without one, a loopback peer passes while
/// `loopback_open`; everyone else gets 401.
pub fn decide(
    tokens: &TokenTable,
    loopback_open: bool,
    peer_is_loopback: bool,
    header: Option<&[u8]>,
    need: Perm,
    now_ms: i64,
) -> Access {
    if header.is_none() && loopback_open && peer_is_loopback {
        return Access::Granted(None);
    }
    match tokens.check(header, now_ms) {
        Err((why, id)) => Access::Unauthorized(why, id),
        Ok(a) if a.has(need) => Access::Granted(Some(a)),
        Ok(a) => Access::Forbidden {
            token_id: a.token_id,
            need,
        },
    }
}

/// A config value `"vault:NAME"` names a secret; the name, if so.
pub fn vault_ref(value: &str) -> Option<&str> {
    value.strip_prefix("vault:")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table_with(perms: &[Perm]) -> (TokenTable, String) {
        let t = new_token(perms, None, Some(2_000), None);
        let table = TokenTable::load(vec![t.row.clone()]);
        (table, format!("Bearer {}", *t.token))
    }

    #[test]
    fn tokens_parse_check_and_refuse() {
        let (table, header) = table_with(&[Perm::Read]);
        let ok = table.check(Some(header.as_bytes()), 1_000).unwrap();
        assert!(ok.has(Perm::Read) && !ok.has(Perm::Send));
        let token = header.strip_prefix("Bearer ").unwrap();
        let (id, _) = parse_token(token).unwrap();
        assert!(!id.contains('_'));
        // Expired.
        assert_eq!(
            table.check(Some(header.as_bytes()), 2_000).unwrap_err().0,
            Refusal::Expired
        );
        // The stored hash presented as the secret.
        let row = table.rows.read().unwrap().get(id).cloned().unwrap();
        let forged = format!("Bearer keel_{id}_{}", row.secret_sha256);
        assert_eq!(
            table.check(Some(forged.as_bytes()), 1_000).unwrap_err().0,
            Refusal::Unknown
        );
        for bad in [
            "Bearer ",
            "Bearer",
            "bearer x",
            &format!("{header}\r\n"),
            &format!("Bearer {}", "a".repeat(10_000)),
            &format!("{header}x"),
        ] {
            assert!(table.check(Some(bad.as_bytes()), 1_000).is_err(), "{bad:?}");
        }
        table.revoke(id, "now");
        assert_eq!(
            table.check(Some(header.as_bytes()), 1_000).unwrap_err().0,
            Refusal::Revoked
        );
    }

    #[test]
    fn a_shared_stores_rows_merge_without_undoing_a_local_grant_or_revocation() {
        let (table, header) = table_with(&[Perm::Read]);
        let token = header.strip_prefix("Bearer ").unwrap();
        let id = parse_token(token).unwrap().0.to_string();
        let before = table.rows.read().unwrap().get(&id).cloned().unwrap();
        // Granted on another instance: accepted here after the merge.
        let other = new_token(&[Perm::Send], None, None, None);
        let other_header = format!("Bearer {}", *other.token);
        assert!(table.check(Some(other_header.as_bytes()), 1_000).is_err());
        // A snapshot read before the local grant committed lacks `id`.
        table.merge(vec![other.row.clone()]);
        assert!(table.check(Some(other_header.as_bytes()), 1_000).is_ok());
        assert!(table.check(Some(header.as_bytes()), 1_000).is_ok());
        // Revoked here; a snapshot from before the revocation keeps it revoked.
        table.revoke(&id, "now");
        table.merge(vec![before.clone()]);
        assert_eq!(
            table.check(Some(header.as_bytes()), 1_000).unwrap_err().0,
            Refusal::Revoked
        );
        // Revoked on another instance: refused here after the merge.
        let mut gone = other.row.clone();
        gone.revoked_at = Some("later".into());
        table.merge(vec![gone]);
        assert_eq!(
            table
                .check(Some(other_header.as_bytes()), 1_000)
                .unwrap_err()
                .0,
            Refusal::Revoked
        );
    }

    #[test]
    fn access_rule() {
        let (table, header) = table_with(&[Perm::Read]);
        let h = Some(header.as_bytes());
        assert_eq!(
            decide(&table, true, true, None, Perm::Admin, 0),
            Access::Granted(None)
        );
        assert!(matches!(
            decide(&table, false, true, None, Perm::Read, 0),
            Access::Unauthorized(Refusal::Missing, None)
        ));
        assert!(matches!(
            decide(&table, true, false, None, Perm::Read, 0),
            Access::Unauthorized(Refusal::Missing, None)
        ));
        assert!(matches!(
            decide(&table, false, false, h, Perm::Read, 0),
            Access::Granted(Some(_))
        ));
        assert!(matches!(
            decide(&table, true, true, h, Perm::Tasks, 0),
            Access::Forbidden {
                need: Perm::Tasks,
                ..
            }
        ));
        let (admin, ah) = table_with(&[Perm::Admin]);
        assert!(matches!(
            decide(&admin, false, false, Some(ah.as_bytes()), Perm::Deploy, 0),
            Access::Granted(Some(_))
        ));
    }

    #[test]
    fn perms_ttl_names() {
        assert_eq!(
            parse_perms("read,send").unwrap(),
            vec![Perm::Read, Perm::Send]
        );
        assert!(parse_perms("read,root").unwrap_err().contains("root"));
        assert!(parse_perms("").is_err());
        assert_eq!(parse_ttl("12h").unwrap(), 12 * 3_600_000);
        assert!(parse_ttl("12").is_err() && parse_ttl("-1h").is_err() && parse_ttl("h").is_err());
        assert!(check_secret_name("telegram.token").is_ok());
        assert!(check_secret_name("../x").is_err() && check_secret_name("").is_err());
    }
}
