//! Loading configuration: the file (if any), then flags and environment on
//! top, then the library's validation. Startup and SIGHUP reload both call
//! `load`, so a reload is checked exactly like a start (R34).

// The binary edge: the one place that reads the environment (KEEL_* overrides).
#![allow(clippy::disallowed_methods)]

use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use keel_actors::config::{Config, Secret};

use crate::cli::{DataDirArg, RunArgs};

/// Largest config file read.
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// Which file to read, if any: `--config`/`KEEL_CONFIG`, else ./keel.toml if present.
pub fn config_path(dir: &DataDirArg) -> Option<PathBuf> {
    dir.config.clone().or_else(|| {
        let default = PathBuf::from("keel.toml");
        default.is_file().then_some(default)
    })
}

/// Read a config file defensively: regular file, bounded size, UTF-8.
fn read_config_file(path: &Path) -> Result<String> {
    let meta = fs::metadata(path).with_context(|| format!("config {}", path.display()))?;
    let ft = meta.file_type();
    if !ft.is_file() || ft.is_fifo() || ft.is_char_device() || ft.is_block_device() {
        bail!("config {}: not a regular file", path.display());
    }
    if meta.len() > MAX_CONFIG_BYTES {
        bail!(
            "config {}: {} bytes is too large (at most {MAX_CONFIG_BYTES})",
            path.display(),
            meta.len()
        );
    }
    let mut bytes = Vec::new();
    fs::File::open(path)
        .and_then(|f| f.take(MAX_CONFIG_BYTES + 1).read_to_end(&mut bytes))
        .with_context(|| format!("config {}", path.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "config {}: not UTF-8 (byte {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    if text.contains("secret") && meta.permissions().mode() & 0o004 != 0 {
        tracing::warn!(path = %path.display(), "config file holds a secret and is world-readable; chmod 600 it");
    }
    Ok(text)
}

/// The config for `dir` (+ run flags when given).
pub fn load(dir: &DataDirArg, run: Option<&RunArgs>) -> Result<Config> {
    // Validated once, after flags and environment are applied: a file that
    // is only valid with them (e.g. a public listener whose webhook secret
    // comes from KEEL_WEBHOOK_SECRET) must load, and a flag may fix a file.
    let (mut config, origin) = match config_path(dir) {
        Some(path) => {
            let text = read_config_file(&path)?;
            let origin = path.display().to_string();
            (Config::parse_toml(&text, &origin)?, origin)
        }
        None => (Config::default(), "command line".to_string()),
    };
    if let Some(d) = &dir.data_dir {
        config.data_dir = d.clone();
    }
    if let Some(run) = run {
        if let Some(listen) = &run.listen {
            config.listen = listen.clone();
        }
        if run.ephemeral {
            config.ephemeral = true;
        }
    }
    if let Some(format) = std::env::var("KEEL_LOG_FORMAT")
        .ok()
        .filter(|v| !v.is_empty())
    {
        config.log_format = keel_actors::config::LogFormat::parse(&format).ok_or_else(|| {
            anyhow::anyhow!(
                "KEEL_LOG_FORMAT must be text or json, not {:?}",
                format.chars().take(32).collect::<String>()
            )
        })?;
    }
    let env_token = |name: &str| std::env::var(name).ok().filter(|t| !t.is_empty());
    // A secret from the environment goes straight into a `Secret`.
    let env_secret = |name: &str| env_token(name).map(Secret::new);
    if config.telegram.token.is_none() {
        // The token may live outside the config file (e.g. a systemd credential).
        config.telegram.token = env_secret("KEEL_TELEGRAM_TOKEN");
    }
    if config.storage.url.is_none() {
        // Like a token, the URL may carry a password: env, not argv.
        config.storage.url = env_secret("KEEL_DATABASE_URL");
    }
    for (slot, name) in [
        (
            &mut config.whatsapp.access_token,
            "KEEL_WHATSAPP_ACCESS_TOKEN",
        ),
        (&mut config.whatsapp.app_secret, "KEEL_WHATSAPP_APP_SECRET"),
        (
            &mut config.whatsapp.verify_token,
            "KEEL_WHATSAPP_VERIFY_TOKEN",
        ),
        (
            &mut config.telegram.webhook_secret,
            "KEEL_TELEGRAM_WEBHOOK_SECRET",
        ),
    ] {
        if slot.is_none() {
            *slot = env_secret(name);
        }
    }
    if config.webhook.secret.is_none() {
        config.webhook.secret = env_secret("KEEL_WEBHOOK_SECRET");
    }
    if let Some(v) = env_token("KEEL_WEBHOOK_ALLOW_UNSIGNED") {
        config.webhook.allow_unsigned = match v.as_str() {
            "1" | "true" | "yes" => true,
            "0" | "false" | "no" => false,
            _ => bail!("KEEL_WEBHOOK_ALLOW_UNSIGNED must be true or false, not {v:?}"),
        };
    }
    if config.slack.app_token.is_none() {
        config.slack.app_token = env_secret("KEEL_SLACK_APP_TOKEN");
    }
    if config.slack.bot_token.is_none() {
        config.slack.bot_token = env_secret("KEEL_SLACK_BOT_TOKEN");
    }
    if run.is_some() {
        resolve_vault(&mut config)?;
    }
    if config.containers.docker_host.is_none() {
        // The engine's usual variable; keel speaks to Unix sockets only, and
        // says so rather than quietly using the standard socket instead.
        match env_token("DOCKER_HOST") {
            Some(h) if h.starts_with("unix://") => config.containers.docker_host = Some(h),
            Some(h) if config.containers.enabled => {
                let scheme = h.split("://").next().unwrap_or("");
                bail!("DOCKER_HOST names a {scheme}:// engine, but keel talks to a local engine over a Unix socket only: set [containers] docker_host = \"unix:///path/to/docker.sock\" or unset DOCKER_HOST")
            }
            _ => {}
        }
    }
    config.validate(&origin)?;
    Ok(config)
}

/// `"vault:NAME"` values are looked up in `secrets.db`; a channel secret
/// absent from the config file and the environment is taken from the vault
/// entry named after its key (`telegram.token`, `slack.app_token`, …) when
/// there is one. Only `keel run` (start and reload) resolves them.
fn resolve_vault(config: &mut Config) -> Result<()> {
    if crate::vault::is_shared(config) {
        return resolve_shared_vault(config);
    }
    let secrets = config.data_dir.join("secrets.db");
    let wants_vault = secret_slots(config)
        .iter()
        .any(|(_, v)| v.as_ref().is_some_and(|s| s.expose().starts_with("vault:")));
    if config.ephemeral || (!wants_vault && !secrets.exists()) {
        if wants_vault {
            bail!("a config value names the vault (vault:NAME) but this keel has no secrets.db (keel secrets set NAME)");
        }
        return Ok(());
    }
    let key = crate::vault::master_key(config, crate::vault::Create::Never)?;
    let conn = if secrets.exists() {
        Some(keel_actors::persistence::vault::open_secrets(
            Some(&secrets),
            &key,
            true,
        )?)
    } else {
        None
    };
    let lookup = |name: &str| -> Result<Option<Secret>> {
        let Some(c) = &conn else { return Ok(None) };
        match keel_actors::persistence::vault::get_secret(c, name)? {
            Some(v) => Ok(Some(Secret::new(
                String::from_utf8(v.to_vec())
                    .map_err(|_| anyhow::anyhow!("secret {name} is not UTF-8"))?,
            ))),
            None => Ok(None),
        }
    };
    for (key_name, slot) in secret_slots(config) {
        match slot
            .as_ref()
            .and_then(|s| keel_actors::vault::vault_ref(s.expose()))
        {
            Some(name) => {
                let name = name.to_string();
                *slot = Some(lookup(&name)?.ok_or_else(|| {
                    anyhow::anyhow!(
                        "{key_name} = \"vault:{name}\": no such secret (keel secrets set {name})"
                    )
                })?);
            }
            None if slot.is_none() => *slot = lookup(key_name)?,
            None => {}
        }
    }
    Ok(())
}

/// [`resolve_vault`] on `[storage] backend = "postgres"`: the values come
/// from the shared store's secrets (each encrypted with the master key,
/// which must open the store's key check), not from `secrets.db`.
fn resolve_shared_vault(config: &mut Config) -> Result<()> {
    // Which secret each slot wants: its `vault:NAME`, or the entry named
    // after its key when the slot is empty.
    let wanted: Vec<(&'static str, String, bool)> = secret_slots(config)
        .into_iter()
        .filter_map(|(key_name, slot)| {
            match slot
                .as_ref()
                .map(|s| keel_actors::vault::vault_ref(s.expose()))
            {
                Some(Some(name)) => Some((key_name, name.to_string(), true)),
                Some(None) => None,
                None => Some((key_name, key_name.to_string(), false)),
            }
        })
        .collect();
    let shared: &Config = config;
    // The sync postgres client must not run on a tokio runtime thread (a
    // SIGHUP reload loads the config from one): its own thread.
    let found = std::thread::scope(|s| {
        s.spawn(|| -> Result<Vec<Option<Secret>>> {
            let mut vault = crate::vault::shared_vault(shared, crate::vault::Create::IfFresh)?;
            wanted
                .iter()
                .map(|(_, name, _)| {
                    vault
                        .get(name)?
                        .map(|v| {
                            String::from_utf8(v.to_vec())
                                .map(Secret::new)
                                .map_err(|_| anyhow::anyhow!("secret {name} is not UTF-8"))
                        })
                        .transpose()
                })
                .collect()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("reading the shared vault failed (thread panicked)"))
    })??;
    let mut found: std::collections::HashMap<&str, Option<Secret>> = wanted
        .iter()
        .map(|(key_name, _, _)| *key_name)
        .zip(found)
        .collect();
    for (key_name, slot) in secret_slots(config) {
        let Some((_, name, named)) = wanted.iter().find(|(k, _, _)| *k == key_name) else {
            continue;
        };
        let value = found.remove(key_name).flatten();
        if *named && value.is_none() {
            bail!("{key_name} = \"vault:{name}\": no such secret in the shared store (keel secrets set {name})");
        }
        *slot = value;
    }
    Ok(())
}

/// PATH and LANG of keel: the only part of its environment task children
/// get besides their configured `env` (a missing PATH gets a safe default).
pub fn task_env() -> Vec<(String, String)> {
    let path = std::env::var("PATH")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".to_string());
    let mut env = vec![("PATH".to_string(), path)];
    if let Ok(lang) = std::env::var("LANG") {
        env.push(("LANG".to_string(), lang));
    }
    env
}

/// The config values that may name the vault (`vault:NAME`) or fall back to
/// the vault entry named after their key.
fn secret_slots(config: &mut Config) -> [(&'static str, &mut Option<Secret>); 8] {
    [
        ("telegram.token", &mut config.telegram.token),
        (
            "telegram.webhook_secret",
            &mut config.telegram.webhook_secret,
        ),
        ("slack.app_token", &mut config.slack.app_token),
        ("slack.bot_token", &mut config.slack.bot_token),
        ("whatsapp.access_token", &mut config.whatsapp.access_token),
        ("whatsapp.app_secret", &mut config.whatsapp.app_secret),
        ("whatsapp.verify_token", &mut config.whatsapp.verify_token),
        ("webhook.secret", &mut config.webhook.secret),
    ]
}

/// `KEEL_FAILPOINTS`: the named kill points `keel torture` arms in a
/// `--features failpoints` build (actors/src/failpoint.rs).
pub fn failpoints_spec() -> Option<String> {
    std::env::var_os("KEEL_FAILPOINTS").map(|v| v.to_string_lossy().into_owned())
}

/// `KEEL_TORTURE_STORAGE`: the storage fault `keel torture` injects through
/// the SQLite VFS shim (actors/src/persistence/faultfs.rs).
pub fn torture_storage_spec() -> Option<String> {
    std::env::var_os(keel_actors::persistence::faultfs::ENV)
        .map(|v| v.to_string_lossy().into_owned())
}
