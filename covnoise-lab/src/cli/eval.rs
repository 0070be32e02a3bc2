//! `covnoise eval`: a saved model's test loss and accuracy.

use std::path::PathBuf;

use clap::Args;
use covnoise_lab::train::{RunDir, evaluate_checkpoint};

/// Settings of `covnoise eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A run directory written by `covnoise train --out`.
    #[arg(value_name = "RUN_DIR")]
    pub run_dir: PathBuf,
    /// The checkpoint after epoch N [default: the newest].
    #[arg(long, value_name = "N")]
    pub checkpoint: Option<usize>,
    /// Directory with the files of the run's data set (Fashion-MNIST or CIFAR) to test on [default: the run's data].
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
}

/// Runs `covnoise eval`: prints one line and writes `RUN_DIR/eval.json`.
pub fn run(args: &EvalArgs) -> anyhow::Result<()> {
    // Checked before the evaluation, so that a refusal writes nothing.
    let run_dir = RunDir::open(&args.run_dir)?;
    covnoise_lab::train::run_dir::check_writable(&args.run_dir)?;
    let data = args.data.as_deref().map(std::path::absolute).transpose()?;
    let result = evaluate_checkpoint(&args.run_dir, args.checkpoint, data.as_deref())?;
    let text = serde_json::to_string_pretty(&result)?;
    run_dir.write("eval.json", format!("{text}\n").as_bytes())?;
    println!(
        "test accuracy {:.4}  test loss {:.4}  ({} examples, epoch {}, {})",
        result.test_accuracy,
        result.test_loss,
        result.examples,
        result.epoch,
        result.checkpoint.display()
    );
    Ok(())
}
