//! Command-line interface (clap). Flags override the config file;
//! `KEEL_CONFIG`, `KEEL_DATA_DIR` and `KEEL_LISTEN` stand in for flags.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "keel",
    version,
    about = "The crash-safe core of a self-hosted chat assistant"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Where state lives; shared by every command that reads the store.
#[derive(Debug, Clone, Args)]
pub struct DataDirArg {
    /// State directory (default ./keel-data, or data_dir from the config file).
    #[arg(long, env = "KEEL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Config file (default ./keel.toml when it exists).
    #[arg(long, env = "KEEL_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Run(RunArgs),
    /// Talk to the running daemon over its local socket.
    Chat(ChatArgs),
    /// Show the state of the store (safe while keel runs).
    Status {
        #[command(flatten)]
        dir: DataDirArg,
        #[arg(long)]
        json: bool,
    },
    /// Inspect or export sessions (safe while keel runs).
    Sessions {
        #[command(subcommand)]
        cmd: SessionsCmd,
    },
    /// Inspect durable timers (safe while keel runs); cancel one (keel stopped);
    /// preview a schedule's next instants (no data dir).
    Timers {
        #[command(subcommand)]
        cmd: TimersCmd,
    },
    /// Supervised tasks: list, show and logs read the store (safe while keel
    /// runs); run and cancel ask the running keel over its admin socket.
    Tasks {
        #[command(subcommand)]
        cmd: TasksCmd,
    },
    /// Services in containers (through the running keel): deploy, kill, list.
    Services {
        #[command(subcommand)]
        cmd: ServicesCmd,
    },
    /// One-off sandboxed runs in ephemeral containers (through the running keel).
    Containers {
        #[command(subcommand)]
        cmd: ContainersCmd,
    },
    /// Compare the services event log with the container engine and check
    /// the log's hash chain; exit 0 when consistent, 1 otherwise. Asks the
    /// running keel when there is one, else reads the store and the engine.
    Verify {
        #[command(flatten)]
        dir: DataDirArg,
        #[arg(long)]
        json: bool,
    },
    /// Create or upgrade the database schema, then exit.
    Migrate {
        #[command(flatten)]
        dir: DataDirArg,
        /// Encrypt a plain keel.db with the master key (temp file, fsync,
        /// atomic rename; the plain file is kept as keel.db.plain-<time>).
        #[arg(long)]
        encrypt: bool,
    },
    /// Secrets in the encrypted vault (secrets.db, or the shared store on
    /// `[storage] backend = "postgres"`); values come from stdin only.
    Secrets {
        #[command(subcommand)]
        cmd: SecretsCmd,
    },
    /// Capability tokens for the admin HTTP endpoints.
    Tokens {
        #[command(subcommand)]
        cmd: TokensCmd,
    },
    /// The hash-chained audit log.
    Audit {
        /// Only records at or after this instant (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        json: bool,
        /// Check the chain; exit 1 naming the first bad record.
        #[arg(long)]
        verify: bool,
        #[command(flatten)]
        dir: DataDirArg,
    },
    /// Copy the stores to FILE (and FILE.secrets) with the online backup API;
    /// works while keel runs.
    Backup {
        file: PathBuf,
        #[command(flatten)]
        dir: DataDirArg,
    },
    /// Put a backup in place (keel stopped); the replaced files are kept.
    Restore {
        file: PathBuf,
        /// Replace a store holding newer commits than the backup.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        dir: DataDirArg,
    },
    /// Rotate the master key (keel stopped): new key from stdin (64 hex
    /// characters) or --new-key-file.
    Rekey {
        #[arg(long)]
        new_key_file: Option<PathBuf>,
        #[command(flatten)]
        dir: DataDirArg,
    },
    /// Benchmarks: `messages` (default: acknowledged messages/s against
    /// references), `timers` (ready time, RSS, fire latency) and `tasks`
    /// (output capture vs cat, RSS, start latency).
    Bench(keel_bench::BenchCli),
    /// The durability battery: runs this keel under load, SIGKILLs it again
    /// and again (restart storms too) and checks a ledger kept outside the
    /// data dir: nothing acknowledged lost, duplicated or invented.
    Torture(keel_bench::torture::TortureArgs),
}

impl Command {
    /// Commands whose work is a report on stdout, so that a closed stdout
    /// may simply end them (see `main`). The few of them that write
    /// (`timers cancel`, `sessions export`) finish their write before they
    /// print what they did.
    pub fn is_report(&self) -> bool {
        matches!(
            self,
            Command::Status { .. }
                | Command::Sessions { .. }
                | Command::Timers { .. }
                | Command::Audit { .. }
                | Command::Verify { .. }
        )
    }
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub dir: DataDirArg,
    /// HTTP listen address (default 127.0.0.1:7878).
    #[arg(long, env = "KEEL_LISTEN")]
    pub listen: Option<String>,
    /// Keep everything in memory: no files at all.
    #[arg(long)]
    pub ephemeral: bool,
    /// Serve one local user on stdin/stdout; exit at EOF.
    #[arg(long)]
    pub stdin: bool,
    /// Serve although the store lost acknowledged commits (R39: a damaged or
    /// deleted WAL); logged at WARN with `audit="data_loss_accepted"`.
    #[arg(long)]
    pub accept_data_loss: bool,
}

#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub dir: DataDirArg,
    /// The chat to talk in.
    #[arg(long, default_value = "local")]
    pub chat: String,
    /// Socket path (default: <data dir>/keel.sock).
    #[arg(long)]
    pub socket: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum SessionsCmd {
    /// List sessions.
    List {
        #[command(flatten)]
        dir: DataDirArg,
        #[arg(long)]
        json: bool,
    },
    /// Show one session's turns.
    Show {
        id: String,
        #[command(flatten)]
        dir: DataDirArg,
        #[arg(long)]
        json: bool,
    },
    /// Write one {session}.json per session into DIR (atomic, mode 0600).
    Export {
        out: PathBuf,
        #[command(flatten)]
        dir: DataDirArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum TimersCmd {
    /// List timers, newest first.
    List {
        #[command(flatten)]
        dir: DataDirArg,
        #[arg(long)]
        json: bool,
    },
    /// Show one timer.
    Show {
        id: i64,
        #[command(flatten)]
        dir: DataDirArg,
        #[arg(long)]
        json: bool,
    },
    /// Cancel one timer; refuses while keel runs (one writer): use /cancel ID in the chat then.
    Cancel {
        id: i64,
        #[command(flatten)]
        dir: DataDirArg,
    },
    /// Print the next due instants of a schedule in UTC and local time
    /// (exactly one of --cron, --every, --daily); reads no data dir.
    #[command(
        override_usage = "keel timers preview (--cron EXPR | --every DUR | --daily HH:MM) [--tz ZONE] [--from RFC3339] [--count N] [--json]"
    )]
    Preview(PreviewArgs),
}

/// `keel timers preview`. Values are checked by the command, not by clap, so
/// every bad value gets one line naming the problem (and exit code 2).
#[derive(Debug, Args)]
pub struct PreviewArgs {
    /// A cron expression, 5 fields or 6 with seconds first (as `/remind cron "…"`).
    #[arg(long, value_name = "EXPR")]
    pub cron: Option<String>,
    /// A fixed period such as 2h or 1h30m (as `/remind every 2h`), anchored at --from.
    #[arg(long, value_name = "DUR", allow_hyphen_values = true)]
    pub every: Option<String>,
    /// Every day at this local time (as `/remind every day at 09:00`).
    #[arg(long, value_name = "HH:MM")]
    pub daily: Option<String>,
    /// The IANA zone local times are read in.
    #[arg(long, value_name = "ZONE", default_value = "UTC")]
    pub tz: String,
    /// List instants after this one, e.g. 2026-11-01T05:30:00Z (default: now).
    #[arg(long, value_name = "RFC3339", allow_hyphen_values = true)]
    pub from: Option<String>,
    /// How many instants (1 to 1000).
    #[arg(
        long,
        value_name = "N",
        default_value = "10",
        allow_hyphen_values = true
    )]
    pub count: String,
    /// Print `{"next": ["2026-11-01T05:30:00Z", …]}`.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum ServicesCmd {
    /// Deploy (or redeploy) a service: `keel services deploy NAME --image IMG -- CMD…`.
    Deploy {
        name: String,
        #[arg(long)]
        image: String,
        /// K=V, repeatable.
        #[arg(long = "env", value_name = "K=V")]
        env: Vec<String>,
        /// k=v, repeatable (not starting with keel.).
        #[arg(long = "label", value_name = "k=v")]
        label: Vec<String>,
        /// Memory limit, e.g. 64m.
        #[arg(long)]
        memory: Option<String>,
        /// CPU limit in cores, e.g. 0.5.
        #[arg(long)]
        cpus: Option<f64>,
        /// A user-defined network (default: no network).
        #[arg(long)]
        network: Option<String>,
        #[arg(last = true)]
        command: Vec<String>,
        #[command(flatten)]
        dir: DataDirArg,
    },
    /// Kill a service: its container is removed and it stays dead.
    Kill {
        name: String,
        #[command(flatten)]
        dir: DataDirArg,
    },
    /// List services with their state and container.
    List {
        #[command(flatten)]
        dir: DataDirArg,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ContainersCmd {
    /// Run a command in an ephemeral container and print its output; exits
    /// with the command's exit code (124 when the timeout killed it). The
    /// container is removed afterwards: `keel containers run --image IMG -- CMD…`.
    Run {
        #[arg(long)]
        image: String,
        /// K=V, repeatable.
        #[arg(long = "env", value_name = "K=V")]
        env: Vec<String>,
        /// k=v, repeatable (not starting with keel.).
        #[arg(long = "label", value_name = "k=v")]
        label: Vec<String>,
        /// Memory limit, e.g. 64m.
        #[arg(long)]
        memory: Option<String>,
        /// CPU limit in cores, e.g. 0.5.
        #[arg(long)]
        cpus: Option<f64>,
        /// A user-defined network (default: no network).
        #[arg(long)]
        network: Option<String>,
        /// Kill the container after this long (1s to 1h; default 30s).
        #[arg(long, default_value = "30s")]
        timeout: String,
        /// Part of the container's name (default run).
        #[arg(long)]
        name: Option<String>,
        /// Print the whole result as JSON instead of the output.
        #[arg(long)]
        json: bool,
        #[arg(last = true, required = true)]
        command: Vec<String>,
        #[command(flatten)]
        dir: DataDirArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum SecretsCmd {
    /// Store a secret; the value is read from stdin (no echo on a terminal).
    Set {
        name: String,
        #[command(flatten)]
        dir: DataDirArg,
    },
    /// Names and times (never values).
    List {
        #[command(flatten)]
        dir: DataDirArg,
        #[arg(long)]
        json: bool,
    },
    /// Remove a secret.
    Rm {
        name: String,
        #[command(flatten)]
        dir: DataDirArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokensCmd {
    /// Grant a token; it is printed once, as the last line of stdout.
    Grant {
        /// read, send, tasks, deploy, admin (comma-separated).
        #[arg(long)]
        perm: String,
        /// Limit the token to sessions whose id starts with this.
        #[arg(long)]
        scope: Option<String>,
        /// Lifetime, e.g. 30m, 12h, 7d (default: no expiry).
        #[arg(long)]
        ttl: Option<String>,
        #[arg(long)]
        note: Option<String>,
        #[command(flatten)]
        dir: DataDirArg,
    },
    /// Every token (id, permissions, scope, times; never the secret).
    List {
        #[command(flatten)]
        dir: DataDirArg,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token at once (also in a running keel).
    Revoke {
        id: String,
        #[command(flatten)]
        dir: DataDirArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum TasksCmd {
    /// List every task, oldest first.
    List {
        /// Only tasks in this state (QUEUED, RUNNING, SUCCEEDED, FAILED,
        /// CANCELLED, INTERRUPTED, TIMED_OUT).
        #[arg(long)]
        state: Option<String>,
        #[command(flatten)]
        dir: DataDirArg,
        #[arg(long)]
        json: bool,
    },
    /// One task: its states with times, attempt, exit code, boot epoch.
    Show {
        id: i64,
        #[command(flatten)]
        dir: DataDirArg,
        #[arg(long)]
        json: bool,
    },
    /// A task's captured output, raw bytes in order.
    Logs {
        id: i64,
        /// Only this stream (stdout or stderr).
        #[arg(long)]
        stream: Option<String>,
        /// Keep printing new output until the task ends.
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        dir: DataDirArg,
    },
    /// Queue a configured task on the running keel: `keel tasks run NAME -- ARGS…`.
    Run {
        name: String,
        #[arg(last = true)]
        args: Vec<String>,
        #[command(flatten)]
        dir: DataDirArg,
    },
    /// Cancel a task on the running keel.
    Cancel {
        id: i64,
        #[command(flatten)]
        dir: DataDirArg,
    },
}
