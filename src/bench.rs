//! `keel bench`: load generator (being written).

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Concurrent webhook clients.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
}

pub fn bench(_args: BenchArgs) -> Result<ExitCode> {
    anyhow::bail!("keel bench is not built yet")
}
