//! Chat commands for tasks: `/task run NAME [ARGS…]`, `/task status ID`,
//! `/task cancel ID`, `/tasks`.
//!
//! Who may run a task: the owner's chat, the chats in its `allowed_chats`
//! and the local CLI; anyone else gets a one-line refusal and nothing is
//! stored. Checks are pure (they run in the brain); a valid command is an
//! `Effect` applied in the inbound turn's transaction, so a redelivered
//! `/task run` queues one task.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{check_args, may_run, unknown_task};
use crate::brain::{BrainInput, Command, CommandBrain, Decision};
use crate::config::TaskConfig;
use crate::persistence::tasks::TaskEffect;
use crate::persistence::timers::Effect;

/// What the commands need from config (replaced with the brain on reload).
pub struct TaskAccess {
    pub defs: Arc<BTreeMap<String, TaskConfig>>,
    /// The owner's session id.
    pub owner: Option<String>,
}

impl TaskAccess {
    /// The owner's chat and the local CLI see and cancel every task.
    fn privileged(&self, session: &str) -> bool {
        Some(session) == self.owner.as_deref() || session.starts_with("cli:")
    }
}

/// Add the task commands to a brain.
pub fn register(brain: &mut CommandBrain, access: TaskAccess) {
    let access = Arc::new(access);
    brain.register("task", Arc::new(TaskCmd(access)));
    brain.register("tasks", Arc::new(ListTasks));
}

const USAGE: &str = "Usage: /task run NAME [ARGS…] | /task status ID | /task cancel ID";

struct TaskCmd(Arc<TaskAccess>);

fn parse_id(s: &str) -> Option<i64> {
    s.trim()
        .trim_start_matches('#')
        .parse()
        .ok()
        .filter(|&i| i > 0)
}

impl Command for TaskCmd {
    fn usage(&self) -> &'static str {
        "/task run NAME [ARGS…] | status ID | cancel ID — run a configured task, follow it, stop it"
    }

    fn run(&self, args: &str, input: &BrainInput<'_>) -> Decision {
        let (verb, rest) = args
            .trim()
            .split_once(char::is_whitespace)
            .unwrap_or((args.trim(), ""));
        let session = input.session.id.as_str();
        let any = self.0.privileged(session);
        match verb {
            "run" => {
                let mut words = rest.split_whitespace();
                let Some(name) = words.next() else {
                    return Decision::say(USAGE);
                };
                let Some(def) = self.0.defs.get(name) else {
                    return Decision::say(format!(
                        "{}.",
                        capital(&unknown_task(name, &self.0.defs))
                    ));
                };
                if !may_run(Some(session), def, self.0.owner.as_deref()) {
                    return Decision::say(format!("You may not run task {name} from this chat."));
                }
                let args: Vec<String> = words.map(str::to_string).collect();
                if let Err(e) = check_args(name, def, &args) {
                    return Decision::say(format!("Cannot run task {name}: {e}."));
                }
                Decision::Act(Effect::Task(TaskEffect::Run {
                    name: name.to_string(),
                    args,
                }))
            }
            "status" => match parse_id(rest) {
                Some(id) => Decision::Act(Effect::Task(TaskEffect::Status { id, any })),
                None => Decision::say("Usage: /task status ID"),
            },
            "cancel" => match parse_id(rest) {
                Some(id) => Decision::Act(Effect::Task(TaskEffect::Cancel { id, any })),
                None => Decision::say("Usage: /task cancel ID"),
            },
            _ => Decision::say(USAGE),
        }
    }
}

fn capital(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

struct ListTasks;

impl Command for ListTasks {
    fn usage(&self) -> &'static str {
        "/tasks — this chat's recent tasks"
    }

    fn run(&self, _args: &str, _input: &BrainInput<'_>) -> Decision {
        Decision::Act(Effect::Task(TaskEffect::List))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::brain::Brain;
    use crate::persistence::SessionKey;

    fn brain() -> CommandBrain {
        let mut defs = BTreeMap::new();
        let def = |args_allowed, allowed: &[&str]| TaskConfig {
            command: vec!["echo".into()],
            args_allowed,
            cwd: None,
            env: Default::default(),
            timeout_s: None,
            retry_on_restart: false,
            max_attempts: 3,
            exclusive: false,
            allowed_chats: allowed.iter().map(|s| s.to_string()).collect(),
            kind: Default::default(),
            image: None,
        };
        defs.insert("echo".to_string(), def(true, &["webhook:friends"]));
        defs.insert("fixed".to_string(), def(false, &[]));
        let mut b = CommandBrain::new(false);
        register(
            &mut b,
            TaskAccess {
                defs: Arc::new(defs),
                owner: Some("telegram:1".into()),
            },
        );
        b
    }

    fn decide(b: &CommandBrain, session: &str, text: &str) -> Decision {
        let (channel, chat) = session.split_once(':').unwrap();
        let key = SessionKey::new(channel, chat);
        b.decide(&BrainInput {
            session: &key,
            from: "u",
            text,
            kind: "text",
            memory: &Default::default(),
            recent: &[],
        })
    }

    fn said(d: Decision) -> String {
        match d {
            Decision::Reply { text, .. } => text,
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    #[test]
    fn the_owner_allowed_chats_and_the_cli_may_run_others_are_refused() {
        let b = brain();
        for session in ["telegram:1", "webhook:friends", "cli:local"] {
            assert_eq!(
                decide(&b, session, "/task run echo a b"),
                Decision::Act(Effect::Task(TaskEffect::Run {
                    name: "echo".into(),
                    args: vec!["a".into(), "b".into()]
                })),
                "{session}"
            );
        }
        let no = said(decide(&b, "webhook:stranger", "/task run echo"));
        assert_eq!(no, "You may not run task echo from this chat.");
        assert!(said(decide(&b, "telegram:2", "/task run fixed")).starts_with("You may not"));
    }

    #[test]
    fn bad_task_commands_get_one_line_answers() {
        let b = brain();
        let unknown = said(decide(&b, "telegram:1", "/task run nope"));
        assert!(
            unknown.starts_with("Unknown task \"nope\"") && unknown.contains("echo, fixed"),
            "{unknown}"
        );
        let no_args = said(decide(&b, "telegram:1", "/task run fixed x"));
        assert!(no_args.contains("takes no arguments"), "{no_args}");
        let nul = said(decide(&b, "telegram:1", "/task run echo a\0b"));
        assert!(nul.contains("NUL"), "{nul}");
        let huge = format!("/task run echo {}", "x ".repeat(600_000));
        assert!(said(decide(&b, "telegram:1", &huge)).contains("too long"));
        for bad in [
            "/task",
            "/task run",
            "/task status x",
            "/task cancel -1",
            "/task explode",
        ] {
            let e = said(decide(&b, "telegram:1", bad));
            assert!(!e.contains('\n'), "{bad} -> {e}");
        }
        assert_eq!(
            decide(&b, "webhook:x", "/task status 3"),
            Decision::Act(Effect::Task(TaskEffect::Status { id: 3, any: false }))
        );
        assert_eq!(
            decide(&b, "telegram:1", "/task cancel #3"),
            Decision::Act(Effect::Task(TaskEffect::Cancel { id: 3, any: true }))
        );
        assert_eq!(
            decide(&b, "webhook:x", "/tasks"),
            Decision::Act(Effect::Task(TaskEffect::List))
        );
    }
}
