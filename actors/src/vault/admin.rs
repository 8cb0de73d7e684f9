//! The vault's operations on the admin socket (`keel-admin.sock`, 0600, in
//! the data dir; served by `tasks::admin`): secrets and tokens while keel
//! runs, so the one writer of `keel.db` records them (and their audit
//! records) and the running token table changes at once. The socket needs
//! no token: only the user running keel can connect.
//!
//! Requests (one JSON line each): `secret_set {name, value}`, `secret_list`,
//! `secret_rm {name}`, `token_grant {perms, scope?, expires_ms?, note?}`,
//! `token_list`, `token_revoke {id}`, `backup {path, progress?}` (with
//! `progress`, `{"progress": {done, total}}` lines come first); answers are JSON
//! objects, `{"error": "<one line>"}` on failure. Values and tokens are
//! never logged.

use std::path::PathBuf;
use std::sync::Arc;

use actix::Addr;
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{check_secret_name, new_token, parse_perms, TokenTable};
use crate::clock::Clock;
use crate::masterkey::KeyHandle;
use crate::persistence::audit::AppendAudit;
use crate::persistence::vault::{
    self as store, GetTokens, GrantToken, RevokeToken, SecretAnswer, SharedSecret,
};
use crate::persistence::PersistenceActor;

/// What the vault's admin operations need from the running daemon.
#[derive(Clone)]
pub struct VaultAdmin {
    pub persistence: Addr<PersistenceActor>,
    pub tokens: TokenTable,
    /// `secrets.db`; `None` when ephemeral (the vault is in memory).
    pub secrets_path: Option<PathBuf>,
    pub key: KeyHandle,
    pub clock: Arc<dyn Clock>,
    /// `keel.db` and its key (for `backup`).
    pub db_path: Option<PathBuf>,
    pub db_key: Option<KeyHandle>,
    /// Secrets live in the shared store (`backend = "postgres"`), not in
    /// `secrets.db`.
    pub shared: bool,
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Request {
    SecretSet {
        name: String,
        value: secrecy::SecretString,
    },
    SecretList,
    SecretRm {
        name: String,
    },
    TokenGrant {
        perms: String,
        #[serde(default)]
        scope: Option<String>,
        #[serde(default)]
        expires_ms: Option<i64>,
        #[serde(default)]
        note: Option<String>,
    },
    TokenList,
    TokenRevoke {
        id: String,
    },
    Backup {
        path: PathBuf,
        /// Send `{"progress": {"done", "total"}}` lines (bytes) before the
        /// answer, one per copy step.
        #[serde(default)]
        progress: bool,
    },
}

/// The ops this module answers.
pub const OPS: &[&str] = &[
    "secret_set",
    "secret_list",
    "secret_rm",
    "token_grant",
    "token_list",
    "token_revoke",
    "backup",
];

fn err(e: impl std::fmt::Display) -> Value {
    json!({"error": e.to_string()})
}

/// Lines sent on the connection before the answer (backup progress).
pub type Notes = tokio::sync::mpsc::UnboundedSender<Value>;

/// Answer one request line; `notes` carries lines to send before it.
pub async fn handle(line: &str, v: &VaultAdmin, notes: Notes) -> Value {
    let req: Request = match serde_json::from_str(line) {
        Ok(r) => r,
        // serde's message could quote the value: never echo it.
        Err(_) => return err("bad vault request"),
    };
    match req {
        Request::SecretSet { name, value } => {
            if let Err(e) = check_secret_name(&name) {
                return err(e);
            }
            if v.shared {
                let value = zeroize::Zeroizing::new(value.expose_secret().as_bytes().to_vec());
                let key = v.key.clone();
                return match shared(
                    v,
                    SharedSecret::Set {
                        key,
                        name: name.clone(),
                        value,
                    },
                )
                .await
                {
                    Ok(_) => json!({"name": name, "set": true}),
                    Err(e) => e,
                };
            }
            let (path, key, at) = (v.secrets_path.clone(), v.key.clone(), v.clock.stamp());
            let n = name.clone();
            let done = tokio::task::spawn_blocking(move || {
                let c = store::open_secrets(path.as_deref(), &key, false)?;
                store::put_secret(&c, &at, &n, value.expose_secret().as_bytes())?;
                store::close_secrets(c)
            })
            .await;
            match done {
                Ok(Ok(())) => {
                    audit(v, "secret_set", json!({"name": name})).await;
                    json!({"name": name, "set": true})
                }
                Ok(Err(e)) => err(e),
                Err(e) => err(e),
            }
        }
        Request::SecretList if v.shared => match shared(v, SharedSecret::List).await {
            Ok(SecretAnswer::List(list)) => json!({"secrets": list}),
            Ok(_) => err("unexpected answer from the store"),
            Err(e) => e,
        },
        Request::SecretList => {
            let (path, key) = (v.secrets_path.clone(), v.key.clone());
            let done = tokio::task::spawn_blocking(move || {
                if path.as_ref().is_some_and(|p| !p.exists()) {
                    return Ok(Vec::new());
                }
                let c = store::open_secrets(path.as_deref(), &key, true)?;
                store::list_secrets(&c)
            })
            .await;
            match done {
                Ok(Ok(list)) => json!({"secrets": list}),
                Ok(Err(e)) => err(e),
                Err(e) => err(e),
            }
        }
        Request::SecretRm { name } => {
            if let Err(e) = check_secret_name(&name) {
                return err(e);
            }
            if v.shared {
                return match shared(v, SharedSecret::Remove { name: name.clone() }).await {
                    Ok(SecretAnswer::Removed(removed)) => json!({"name": name, "removed": removed}),
                    Ok(_) => err("unexpected answer from the store"),
                    Err(e) => e,
                };
            }
            let (path, key) = (v.secrets_path.clone(), v.key.clone());
            let n = name.clone();
            let done = tokio::task::spawn_blocking(move || {
                let c = store::open_secrets(path.as_deref(), &key, false)?;
                let removed = store::remove_secret(&c, &n)?;
                store::close_secrets(c)?;
                Ok::<_, crate::error::StoreError>(removed)
            })
            .await;
            match done {
                Ok(Ok(removed)) => {
                    if removed {
                        audit(v, "secret_removed", json!({"name": name})).await;
                    }
                    json!({"name": name, "removed": removed})
                }
                Ok(Err(e)) => err(e),
                Err(e) => err(e),
            }
        }
        Request::TokenGrant {
            perms,
            scope,
            expires_ms,
            note,
        } => {
            let perms = match parse_perms(&perms) {
                Ok(p) => p,
                Err(e) => return err(e),
            };
            let t = new_token(&perms, scope, expires_ms, note);
            match v.persistence.send(GrantToken(t.row)).await {
                Ok(Ok(row)) => {
                    let id = row.id.clone();
                    v.tokens.insert(row);
                    json!({"id": id, "token": *t.token})
                }
                Ok(Err(e)) => err(e),
                Err(_) => err("keel is shutting down"),
            }
        }
        Request::TokenList => match v.persistence.send(GetTokens).await {
            Ok(Ok(rows)) => json!({"tokens": rows}),
            Ok(Err(e)) => err(e),
            Err(_) => err("keel is shutting down"),
        },
        Request::TokenRevoke { id } => match v.persistence.send(RevokeToken(id.clone())).await {
            Ok(Ok(revoked)) => {
                v.tokens.revoke(&id, &v.clock.stamp().text);
                json!({"id": id, "revoked": revoked})
            }
            Ok(Err(e)) => err(e),
            Err(_) => err("keel is shutting down"),
        },
        Request::Backup { path, progress } => {
            let Some(db) = v.db_path.clone() else {
                return err("an ephemeral keel has no store to back up");
            };
            let key = v.db_key.clone();
            let secrets = v.secrets_path.clone().filter(|p| p.exists());
            let skey = v.key.clone();
            let done = tokio::task::spawn_blocking(move || {
                crate::persistence::backup::backup_files(
                    &db,
                    key.as_ref(),
                    secrets.as_deref(),
                    &skey,
                    &path,
                    &mut |p| {
                        if progress {
                            // The client may have gone: the backup goes on.
                            let _ = notes.send(json!({ "progress": p }));
                        }
                    },
                )
            })
            .await;
            match done {
                Ok(Ok(report)) => json!({"backup": report}),
                Ok(Err(e)) => err(e),
                Err(e) => err(e),
            }
        }
    }
}

/// A secret operation on the shared store, through the writer (its audit
/// record is written in the same transaction); `Err` is the answer to send.
async fn shared(v: &VaultAdmin, op: SharedSecret) -> Result<SecretAnswer, Value> {
    match v.persistence.send(op).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(e)) => Err(err(e)),
        Err(_) => Err(err("keel is shutting down")),
    }
}

async fn audit(v: &VaultAdmin, kind: &'static str, detail: Value) {
    if let Ok(Err(e)) = v.persistence.send(AppendAudit { kind, detail }).await {
        tracing::warn!(error = %e, kind, "audit record not written");
    }
}
