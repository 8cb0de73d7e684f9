//! What a SIGHUP reload changes, key by key (R34).
//!
//! [`plan`] destructures every field of the new [`Config`] — no `..` — and
//! builds the config keel runs with afterwards as a struct literal naming
//! every field, so a field added to the schema does not compile until it is
//! classified here: applied live (the new value is taken) or restart-only
//! (the running value is kept, and the key is reported as "restart needed").
//! The lifecycle controller then pushes the live settings to the actors.

use crate::config::{
    AdminConfig, AgentConfig, CliConfig, Config, ContainersConfig, OutboxConfig, SlackConfig,
    StorageConfig, SupervisionConfig, TasksConfig, TelegramConfig, TimersConfig, VaultConfig,
    WebhookConfig,
};

/// The outcome of comparing a new config with the running one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// Changed keys whose new value is in force now.
    pub applied: Vec<&'static str>,
    /// Changed keys that keep their running value until the next start.
    pub restart_needed: Vec<&'static str>,
}

impl ReloadReport {
    fn live<T: PartialEq + Clone>(&mut self, key: &'static str, new: &T, old: &T) -> T {
        if new != old {
            self.applied.push(key);
        }
        new.clone()
    }

    fn restart<T: PartialEq + Clone>(&mut self, key: &'static str, new: &T, old: &T) -> T {
        if new != old {
            self.restart_needed.push(key);
        }
        old.clone()
    }

    /// One line for the log: "applied: a, b; restart needed: c".
    pub fn summary(&self) -> String {
        let list = |keys: &[&str]| {
            if keys.is_empty() {
                "nothing".to_string()
            } else {
                keys.join(", ")
            }
        };
        format!(
            "applied: {}; restart needed: {}",
            list(&self.applied),
            list(&self.restart_needed)
        )
    }
}

/// Compare `new` with `running`; returns the report and the config to run
/// with from now on (live keys from `new`, restart-only keys from `running`).
pub fn plan(running: &Config, new: &Config) -> (ReloadReport, Config) {
    let mut r = ReloadReport::default();
    let old = running;
    let Config {
        data_dir,
        listen,
        log_level,
        log_format,
        shutdown_timeout_ms,
        ephemeral,
        storage,
        webhook,
        admin,
        cli,
        agent,
        owner,
        outbox,
        timers,
        telegram,
        slack,
        whatsapp,
        adapters,
        tasks,
        task,
        principals,
        vault,
        containers,
        sessions,
    } = new;
    let storage = {
        let StorageConfig {
            synchronous,
            busy_timeout_ms,
            max_batch,
            probe_interval_ms,
            encrypt,
            backend,
            url,
        } = storage;
        let o = &old.storage;
        StorageConfig {
            synchronous: r.restart("storage.synchronous", synchronous, &o.synchronous),
            busy_timeout_ms: r.restart(
                "storage.busy_timeout_ms",
                busy_timeout_ms,
                &o.busy_timeout_ms,
            ),
            max_batch: r.restart("storage.max_batch", max_batch, &o.max_batch),
            probe_interval_ms: r.restart(
                "storage.probe_interval_ms",
                probe_interval_ms,
                &o.probe_interval_ms,
            ),
            encrypt: r.restart("storage.encrypt", encrypt, &o.encrypt),
            backend: r.restart("storage.backend", backend, &o.backend),
            url: r.restart("storage.url", url, &o.url),
        }
    };
    let vault = {
        let VaultConfig {
            key_source,
            key_file,
        } = vault;
        VaultConfig {
            // The key unlocks the stores at start only.
            key_source: r.restart("vault.key_source", key_source, &old.vault.key_source),
            key_file: r.restart("vault.key_file", key_file, &old.vault.key_file),
        }
    };
    let webhook = {
        let WebhookConfig {
            enabled,
            secret,
            reply_url,
            max_body_bytes,
            allow_unsigned,
        } = webhook;
        let o = &old.webhook;
        WebhookConfig {
            // The route is mounted at start or not at all.
            enabled: r.restart("webhook.enabled", enabled, &o.enabled),
            secret: r.live("webhook.secret", secret, &o.secret),
            reply_url: r.live("webhook.reply_url", reply_url, &o.reply_url),
            max_body_bytes: r.live("webhook.max_body_bytes", max_body_bytes, &o.max_body_bytes),
            // Checked by validation, which the new config has passed.
            allow_unsigned: r.live("webhook.allow_unsigned", allow_unsigned, &o.allow_unsigned),
        }
    };
    let admin = {
        let AdminConfig { loopback_open } = admin;
        AdminConfig {
            loopback_open: r.live(
                "admin.loopback_open",
                loopback_open,
                &old.admin.loopback_open,
            ),
        }
    };
    let cli = {
        let CliConfig { enabled, socket } = cli;
        CliConfig {
            enabled: r.restart("cli.enabled", enabled, &old.cli.enabled),
            socket: r.restart("cli.socket", socket, &old.cli.socket),
        }
    };
    let agent = {
        let AgentConfig {
            url,
            timeout_ms,
            attempts,
        } = agent;
        let o = &old.agent;
        AgentConfig {
            url: r.live("agent.url", url, &o.url),
            timeout_ms: r.live("agent.timeout_ms", timeout_ms, &o.timeout_ms),
            attempts: r.live("agent.attempts", attempts, &o.attempts),
        }
    };
    let outbox = {
        let OutboxConfig {
            concurrency,
            send_timeout_ms,
        } = outbox;
        let o = &old.outbox;
        OutboxConfig {
            concurrency: r.live("outbox.concurrency", concurrency, &o.concurrency),
            send_timeout_ms: r.live(
                "outbox.send_timeout_ms",
                send_timeout_ms,
                &o.send_timeout_ms,
            ),
        }
    };
    let timers = {
        let TimersConfig { retention_days } = timers;
        TimersConfig {
            retention_days: r.live(
                "timers.retention_days",
                retention_days,
                &old.timers.retention_days,
            ),
        }
    };
    // Pollers keep their connection and token until a restart; their reply
    // sinks keep the same token, so both halves of a channel stay in step.
    let telegram = {
        let TelegramConfig {
            enabled,
            api_base,
            token,
            owner_chat,
            poll_timeout_s,
            limit,
            request_margin_s,
            group_replies,
            mode,
            webhook_secret,
        } = telegram;
        let o = &old.telegram;
        TelegramConfig {
            enabled: r.restart("telegram.enabled", enabled, &o.enabled),
            api_base: r.restart("telegram.api_base", api_base, &o.api_base),
            token: r.restart("telegram.token", token, &o.token),
            owner_chat: r.restart("telegram.owner_chat", owner_chat, &o.owner_chat),
            poll_timeout_s: r.restart("telegram.poll_timeout_s", poll_timeout_s, &o.poll_timeout_s),
            limit: r.restart("telegram.limit", limit, &o.limit),
            request_margin_s: r.restart(
                "telegram.request_margin_s",
                request_margin_s,
                &o.request_margin_s,
            ),
            group_replies: r.restart("telegram.group_replies", group_replies, &o.group_replies),
            // The route and the poller are chosen at start.
            mode: r.restart("telegram.mode", mode, &o.mode),
            webhook_secret: r.restart("telegram.webhook_secret", webhook_secret, &o.webhook_secret),
        }
    };
    let slack = {
        let SlackConfig {
            enabled,
            api_base,
            app_token,
            bot_token,
            silence_timeout_s,
            channel_replies,
        } = slack;
        let o = &old.slack;
        SlackConfig {
            enabled: r.restart("slack.enabled", enabled, &o.enabled),
            api_base: r.restart("slack.api_base", api_base, &o.api_base),
            app_token: r.restart("slack.app_token", app_token, &o.app_token),
            bot_token: r.restart("slack.bot_token", bot_token, &o.bot_token),
            silence_timeout_s: r.restart(
                "slack.silence_timeout_s",
                silence_timeout_s,
                &o.silence_timeout_s,
            ),
            channel_replies: r.restart(
                "slack.channel_replies",
                channel_replies,
                &o.channel_replies,
            ),
        }
    };
    let adapters = {
        let SupervisionConfig {
            backoff_initial_ms,
            backoff_max_ms,
            attempts,
            healthy_after_ms,
            jitter,
            seed,
        } = adapters;
        let o = &old.adapters;
        SupervisionConfig {
            backoff_initial_ms: r.live(
                "adapters.backoff_initial_ms",
                backoff_initial_ms,
                &o.backoff_initial_ms,
            ),
            backoff_max_ms: r.live("adapters.backoff_max_ms", backoff_max_ms, &o.backoff_max_ms),
            attempts: r.live("adapters.attempts", attempts, &o.attempts),
            healthy_after_ms: r.live(
                "adapters.healthy_after_ms",
                healthy_after_ms,
                &o.healthy_after_ms,
            ),
            jitter: r.live("adapters.jitter", jitter, &o.jitter),
            // The jitter generators are seeded once, at start.
            seed: r.restart("adapters.seed", seed, &o.seed),
        }
    };
    // The runner gets every task setting on reload (`SetTaskSettings`);
    // tasks already running keep the settings they started with.
    let tasks = {
        let TasksConfig {
            concurrency,
            grace_ms,
            log_flush_ms,
            log_batch_bytes,
            max_log_bytes,
            retention_days,
        } = tasks;
        let o = &old.tasks;
        TasksConfig {
            concurrency: r.live("tasks.concurrency", concurrency, &o.concurrency),
            grace_ms: r.live("tasks.grace_ms", grace_ms, &o.grace_ms),
            log_flush_ms: r.live("tasks.log_flush_ms", log_flush_ms, &o.log_flush_ms),
            log_batch_bytes: r.live("tasks.log_batch_bytes", log_batch_bytes, &o.log_batch_bytes),
            max_log_bytes: r.live("tasks.max_log_bytes", max_log_bytes, &o.max_log_bytes),
            retention_days: r.live("tasks.retention_days", retention_days, &o.retention_days),
        }
    };
    // The engine connection and the instance id are fixed for a run (the
    // reaper connects and names containers with them at start); the loop's
    // interval and the shutdown policy are pushed to the reaper.
    let containers = {
        let ContainersConfig {
            enabled,
            docker_host,
            instance,
            reconcile_interval_s,
            stop_services_on_shutdown,
            request_timeout_ms,
        } = containers;
        let o = &old.containers;
        ContainersConfig {
            enabled: r.restart("containers.enabled", enabled, &o.enabled),
            docker_host: r.restart("containers.docker_host", docker_host, &o.docker_host),
            instance: r.restart("containers.instance", instance, &o.instance),
            reconcile_interval_s: r.live(
                "containers.reconcile_interval_s",
                reconcile_interval_s,
                &o.reconcile_interval_s,
            ),
            stop_services_on_shutdown: r.live(
                "containers.stop_services_on_shutdown",
                stop_services_on_shutdown,
                &o.stop_services_on_shutdown,
            ),
            request_timeout_ms: r.restart(
                "containers.request_timeout_ms",
                request_timeout_ms,
                &o.request_timeout_ms,
            ),
        }
    };
    let effective = Config {
        // The registry's bound is set when it starts.
        sessions: r.restart("sessions", sessions, &old.sessions),
        data_dir: r.restart("data_dir", data_dir, &old.data_dir),
        listen: r.restart("listen", listen, &old.listen),
        log_level: r.live("log_level", log_level, &old.log_level),
        log_format: r.restart("log_format", log_format, &old.log_format),
        shutdown_timeout_ms: r.live(
            "shutdown_timeout_ms",
            shutdown_timeout_ms,
            &old.shutdown_timeout_ms,
        ),
        ephemeral: r.restart("ephemeral", ephemeral, &old.ephemeral),
        storage,
        webhook,
        admin,
        cli,
        agent,
        // The owner is told at start and picked for give-up notices by the
        // supervisor built at start.
        owner: r.restart("owner", owner, &old.owner),
        outbox,
        timers,
        telegram,
        slack,
        // Its routes are mounted at start with the secrets they check.
        whatsapp: r.restart("whatsapp", whatsapp, &old.whatsapp),
        adapters,
        tasks,
        // The task table goes to the runner and to the brain's `/task`
        // command (both replaced on reload); a running task keeps its
        // definition until it ends.
        task: r.live("task", task, &old.task),
        // Sessions look people up per message (settings replaced on reload).
        principals: r.live("principals", principals, &old.principals),
        vault,
        containers,
    };
    (r, effective)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> Config {
        Config::from_toml(text, "t").unwrap()
    }

    #[test]
    fn every_changed_key_is_applied_or_reported() {
        let old = cfg("");
        let new = cfg(
            "log_level = \"debug\"\n[outbox]\nconcurrency = 3\n[storage]\nmax_batch = 7\n\
             [telegram]\nlimit = 5\n[adapters]\nattempts = 9\nseed = 4\n[timers]\nretention_days = 2",
        );
        let (r, eff) = plan(&old, &new);
        assert_eq!(
            r.applied,
            vec![
                "outbox.concurrency",
                "timers.retention_days",
                "adapters.attempts",
                "log_level"
            ]
        );
        assert_eq!(
            r.restart_needed,
            vec!["storage.max_batch", "telegram.limit", "adapters.seed"]
        );
        assert_eq!(eff.log_level, "debug");
        assert_eq!(eff.outbox.concurrency, 3);
        assert_eq!(eff.storage.max_batch, old.storage.max_batch);
        assert_eq!(eff.telegram.limit, old.telegram.limit);
        assert_eq!(eff.adapters.seed, None);
        assert_eq!(
            r.summary(),
            "applied: outbox.concurrency, timers.retention_days, adapters.attempts, log_level; \
             restart needed: storage.max_batch, telegram.limit, adapters.seed"
        );
    }

    #[test]
    fn containers_interval_and_shutdown_policy_are_live_the_engine_is_not() {
        let old = cfg("[containers]\nenabled = true");
        let new = cfg(
            "[containers]\nenabled = true\nreconcile_interval_s = 5\nstop_services_on_shutdown = true\n\
             instance = \"abc\"\ndocker_host = \"unix:///x.sock\"\nrequest_timeout_ms = 500",
        );
        let (r, eff) = plan(&old, &new);
        assert_eq!(
            r.applied,
            vec![
                "containers.reconcile_interval_s",
                "containers.stop_services_on_shutdown"
            ]
        );
        assert_eq!(
            r.restart_needed,
            vec![
                "containers.docker_host",
                "containers.instance",
                "containers.request_timeout_ms"
            ]
        );
        assert_eq!(eff.containers.reconcile_interval_s, 5);
        assert_eq!(eff.containers.instance, None);
    }

    #[test]
    fn an_unchanged_config_reports_nothing_and_secrets_are_named_not_shown() {
        let old = cfg("[webhook]\nsecret = \"canary-old\"");
        let (r, eff) = plan(&old, &old.clone());
        assert_eq!(r, ReloadReport::default());
        assert_eq!(eff, old);
        let (r, _) = plan(&old, &cfg("[webhook]\nsecret = \"canary-new\""));
        assert_eq!(r.applied, vec!["webhook.secret"]);
        assert!(!r.summary().contains("canary"));
    }
}
