//! The hash chain of keel's append-only logs (the services event log; the
//! audit log reuses it). Each record is `(seq, kind, payload, prev_hash,
//! hash)` with `hash = sha256(seq ‖ kind ‖ payload ‖ prev_hash)` over
//! length-prefixed fields, and `prev_hash` the previous record's hash
//! ([`GENESIS`] for the first). Pure: the store computes links with
//! [`link_hash`] inside the transaction that appends, readers check a whole
//! log with [`verify`] and replay only its valid prefix.

use sha2::{Digest, Sha256};

/// `prev_hash` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One stored record.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Link {
    pub seq: i64,
    pub kind: String,
    pub payload: String,
    pub prev_hash: String,
    pub hash: String,
}

/// The hash of a record (lowercase hex SHA-256).
pub fn link_hash(seq: i64, kind: &str, payload: &str, prev_hash: &str) -> String {
    let mut h = Sha256::new();
    h.update(seq.to_be_bytes());
    for field in [kind, payload, prev_hash] {
        h.update((field.len() as u64).to_be_bytes());
        h.update(field.as_bytes());
    }
    hex::encode(h.finalize())
}

/// The first damage found in a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Damage {
    /// A sequence number is missing (a record was deleted).
    Gap { expected: i64, found: i64 },
    /// `prev_hash` is not the previous record's hash.
    BrokenLink { seq: i64 },
    /// The record's own hash does not match its fields (edited or torn).
    HashMismatch { seq: i64, last: bool },
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Damage::Gap { expected, found } => {
                write!(f, "sequence gap: expected record {expected}, found {found}")
            }
            Damage::BrokenLink { seq } => write!(f, "broken link at record {seq}"),
            Damage::HashMismatch { seq, last: true } => {
                write!(f, "torn last record {seq} (hash mismatch)")
            }
            Damage::HashMismatch { seq, last: false } => {
                write!(f, "hash mismatch at record {seq}")
            }
        }
    }
}

/// The outcome of [`verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainCheck {
    /// Records in the log.
    pub records: usize,
    /// Length of the valid prefix (== `records` when undamaged).
    pub valid: usize,
    pub damage: Option<Damage>,
}

impl ChainCheck {
    pub fn ok(&self) -> bool {
        self.damage.is_none()
    }
}

/// Check `links` (in seq order, starting at 1): the valid prefix and the
/// first damage after it.
pub fn verify(links: &[Link]) -> ChainCheck {
    let mut prev = GENESIS.to_string();
    for (i, l) in links.iter().enumerate() {
        let expected = i as i64 + 1;
        let damage = if l.seq != expected {
            Some(Damage::Gap {
                expected,
                found: l.seq,
            })
        } else if l.prev_hash != prev {
            Some(Damage::BrokenLink { seq: l.seq })
        } else if link_hash(l.seq, &l.kind, &l.payload, &l.prev_hash) != l.hash {
            Some(Damage::HashMismatch {
                seq: l.seq,
                last: i + 1 == links.len(),
            })
        } else {
            None
        };
        if damage.is_some() {
            return ChainCheck {
                records: links.len(),
                valid: i,
                damage,
            };
        }
        prev = l.hash.clone();
    }
    ChainCheck {
        records: links.len(),
        valid: links.len(),
        damage: None,
    }
}

/// The next record after `last` (none = the first).
pub fn next_link(last: Option<&Link>, kind: &str, payload: &str) -> Link {
    let (seq, prev) = match last {
        Some(l) => (l.seq + 1, l.hash.clone()),
        None => (1, GENESIS.to_string()),
    };
    Link {
        seq,
        kind: kind.to_string(),
        payload: payload.to_string(),
        hash: link_hash(seq, kind, payload, &prev),
        prev_hash: prev,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(n: usize) -> Vec<Link> {
        let mut out: Vec<Link> = Vec::new();
        for i in 0..n {
            let l = next_link(out.last(), "service_deployed", &format!("{{\"n\":{i}}}"));
            out.push(l);
        }
        out
    }

    #[test]
    fn an_intact_log_verifies_and_each_damage_is_found_with_its_prefix() {
        assert!(verify(&[]).ok());
        let good = log(5);
        assert_eq!(verify(&good).valid, 5);
        assert!(verify(&good).ok());

        let mut gap = good.clone();
        gap.remove(2);
        let c = verify(&gap);
        assert_eq!(c.valid, 2);
        assert_eq!(
            c.damage,
            Some(Damage::Gap {
                expected: 3,
                found: 4
            })
        );

        let mut edited = good.clone();
        edited[1].payload = "{\"n\":99}".into();
        let c = verify(&edited);
        assert_eq!(c.valid, 1);
        assert_eq!(
            c.damage,
            Some(Damage::HashMismatch {
                seq: 2,
                last: false
            })
        );

        let mut torn = good.clone();
        torn[4].payload.truncate(3);
        let c = verify(&torn);
        assert_eq!(c.valid, 4);
        assert!(c.damage.unwrap().to_string().contains("torn last record 5"));

        let mut relinked = good.clone();
        relinked[3].prev_hash = GENESIS.into();
        assert_eq!(
            verify(&relinked).damage,
            Some(Damage::BrokenLink { seq: 4 })
        );
    }

    #[test]
    fn fields_are_length_prefixed() {
        assert_ne!(
            link_hash(1, "ab", "c", GENESIS),
            link_hash(1, "a", "bc", GENESIS)
        );
    }
}
