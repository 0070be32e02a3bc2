//! Command-line parsing and dispatch: one file per subcommand.

mod train;

use clap::{Parser, Subcommand};

/// Large-batch SGD with structured (Fisher) covariance noise.
#[derive(Debug, Parser)]
#[command(name = "covnoise", version, about, long_about = None, args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train an MLP on Fashion-MNIST, with or without structured noise.
    Train(Box<train::TrainArgs>),
}

/// Parses the command line and runs the subcommand.
pub fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Train(args) => train::run(&args),
    }
}

/// Builds the global thread pool once (burn's CPU backend and the noise
/// generator both use it).
pub fn set_threads(threads: Option<usize>) -> anyhow::Result<()> {
    if let Some(n) = threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .map_err(|e| anyhow::anyhow!("cannot set --threads {n}: {e}"))?;
    }
    Ok(())
}
