//! `Secret`: one secret value of the config (a channel token, a webhook
//! secret). Held in a `secrecy::SecretString` (zeroed on drop), printed by
//! `{:?}` as `<redacted>`, compared in constant time (`subtle`, so a reload
//! still sees a changed secret without a timing side channel), read from
//! TOML as the plain string it always was. The value comes out only
//! through [`Secret::expose`], at the point of use: building a request,
//! checking a signature, the binary's env/vault overlay.
//!
//! There is deliberately no `Serialize`: nothing writes a `Config` out,
//! and one would be a way for a secret to leave unnoticed.

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer};
use subtle::ConstantTimeEq;

/// A secret string of the config; see the module doc.
#[derive(Clone)]
pub struct Secret(SecretString);

impl Secret {
    /// Wrap a value (moved in; the `String`'s buffer becomes the secret's).
    pub fn new(value: String) -> Secret {
        Secret(SecretString::from(value))
    }

    /// The plain value, for the one place that needs it.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Secret {
        Secret(SecretString::from(value))
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Secret {
        Secret::new(value)
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Constant time in the contents (the length is not hidden).
impl PartialEq for Secret {
    fn eq(&self, other: &Secret) -> bool {
        bool::from(self.expose().as_bytes().ct_eq(other.expose().as_bytes()))
    }
}

impl Eq for Secret {}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Secret, D::Error> {
        String::deserialize(d).map(Secret::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_equality_compares_and_toml_reads_the_plain_string() {
        let s = Secret::from("canary-9q");
        assert_eq!(format!("{s:?}"), "<redacted>");
        assert_eq!(format!("{:?}", Some(s.clone())), "Some(<redacted>)");
        assert_eq!(s, Secret::from("canary-9q".to_string()));
        assert_ne!(s, Secret::from("canary-9r"));
        assert_ne!(s, Secret::from("canary-9"));
        #[derive(Deserialize)]
        struct T {
            v: Secret,
        }
        let t: T = toml::from_str("v = \"canary-9q\"").unwrap();
        assert_eq!(t.v.expose(), "canary-9q");
        assert!(toml::from_str::<T>("v = 5").is_err());
    }
}
