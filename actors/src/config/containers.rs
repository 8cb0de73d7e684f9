//! `[containers]`: the Docker engine keel manages containers on (R23–R27).

use serde::Deserialize;

/// The standard engine socket, used when neither `docker_host` nor
/// `DOCKER_HOST` names one.
pub const DEFAULT_DOCKER_HOST: &str = "unix:///var/run/docker.sock";

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ContainersConfig {
    /// Manage containers at all (off: no engine is contacted).
    pub enabled: bool,
    /// `unix:///path/docker.sock`; none = `DOCKER_HOST` (filled in by the
    /// binary), then [`DEFAULT_DOCKER_HOST`].
    pub docker_host: Option<String>,
    /// This deployment's id in container labels and names; none = the one
    /// created at first start and kept in the store.
    pub instance: Option<String>,
    /// How often desired services are compared with the engine.
    pub reconcile_interval_s: u64,
    /// Stop (and remove) service containers on SIGTERM too; by default they
    /// keep running (they are desired state) and are adopted at next start.
    pub stop_services_on_shutdown: bool,
    /// One engine request longer than this is a timeout (a hung engine).
    pub request_timeout_ms: u64,
}

impl Default for ContainersConfig {
    fn default() -> Self {
        ContainersConfig {
            enabled: false,
            docker_host: None,
            instance: None,
            reconcile_interval_s: 30,
            stop_services_on_shutdown: false,
            request_timeout_ms: 10_000,
        }
    }
}

impl ContainersConfig {
    /// The engine address keel connects to.
    pub fn host(&self) -> &str {
        self.docker_host.as_deref().unwrap_or(DEFAULT_DOCKER_HOST)
    }

    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if let Some(host) = &self.docker_host {
            if !host.starts_with("unix://") || host.len() <= "unix://".len() {
                return Err((
                    "containers.docker_host",
                    format!("must be unix:///path/to/docker.sock, got {host:?}"),
                ));
            }
        }
        if let Some(id) = &self.instance {
            check_instance(id).map_err(|e| ("containers.instance", e))?;
        }
        if self.reconcile_interval_s == 0 || self.reconcile_interval_s > 86_400 {
            return Err((
                "containers.reconcile_interval_s",
                "must be between 1 and 86400".into(),
            ));
        }
        if !(100..=600_000).contains(&self.request_timeout_ms) {
            return Err((
                "containers.request_timeout_ms",
                "must be between 100 and 600000".into(),
            ));
        }
        Ok(())
    }
}

/// An instance id: 1–32 of `a-z 0-9`, so container names built from it are valid.
pub fn check_instance(id: &str) -> Result<(), String> {
    if id.is_empty()
        || id.len() > 32
        || !id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(format!(
            "must be 1 to 32 characters of a-z and 0-9, got {:?}",
            id.chars().take(40).collect::<String>()
        ));
    }
    Ok(())
}
