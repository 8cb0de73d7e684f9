//! `[whatsapp]`: the WhatsApp Business Cloud API channel (R42). Plain data
//! with defaults and validation; secrets may come from `KEEL_WHATSAPP_*`
//! (read by the binary) and never reach a log through `{:?}`.

use serde::Deserialize;

use super::Secret;

/// `[whatsapp]` in keel.toml.
// Debug is derived: every secret is a `Secret`, printed `<redacted>`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WhatsAppConfig {
    pub enabled: bool,
    /// Graph API base URL, with the version (`…/v21.0`).
    pub api_base: String,
    /// The business phone number's id: replies go to `{api_base}/{id}/messages`.
    pub phone_number_id: Option<String>,
    /// Bearer token for the Graph API.
    pub access_token: Option<Secret>,
    /// Signs every webhook POST (`X-Hub-Signature-256`).
    pub app_secret: Option<Secret>,
    /// Answers Meta's verification handshake (`hub.verify_token`).
    pub verify_token: Option<Secret>,
}

impl Default for WhatsAppConfig {
    fn default() -> Self {
        WhatsAppConfig {
            enabled: false,
            api_base: "https://graph.facebook.com/v21.0".into(),
            phone_number_id: None,
            access_token: None,
            app_secret: None,
            verify_token: None,
        }
    }
}

impl WhatsAppConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.api_base.starts_with("http://") || self.api_base.starts_with("https://")) {
            return Err("api_base must be an http:// or https:// URL".into());
        }
        if let Some(id) = &self.phone_number_id {
            if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
                return Err("phone_number_id must be digits".into());
            }
        }
        for (key, v) in [
            ("access_token", &self.access_token),
            ("app_secret", &self.app_secret),
            ("verify_token", &self.verify_token),
        ] {
            if v.as_ref()
                .map(Secret::expose)
                .is_some_and(|t| t.is_empty() || t.chars().any(char::is_control))
            {
                return Err(format!(
                    "{key} must be non-empty, without control characters"
                ));
            }
        }
        if self.enabled {
            let missing: Vec<&str> = [
                ("phone_number_id", self.phone_number_id.is_none()),
                ("access_token", self.access_token.is_none()),
                ("app_secret", self.app_secret.is_none()),
                ("verify_token", self.verify_token.is_none()),
            ]
            .into_iter()
            .filter_map(|(k, m)| m.then_some(k))
            .collect();
            if !missing.is_empty() {
                return Err(format!(
                    "enabled but {} missing (set them here or in KEEL_WHATSAPP_*)",
                    missing.join(", ")
                ));
            }
        }
        Ok(())
    }
}
