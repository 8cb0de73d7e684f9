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
    /// Inspect durable timers (safe while keel runs); cancel one (keel stopped).
    Timers {
        #[command(subcommand)]
        cmd: TimersCmd,
    },
    /// Create or upgrade the database schema, then exit.
    Migrate {
        #[command(flatten)]
        dir: DataDirArg,
    },
    /// Benchmarks: `messages` (default: acknowledged messages/s against
    /// references) and `timers` (ready time, RSS, fire latency).
    Bench(keel_bench::BenchCli),
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
}
