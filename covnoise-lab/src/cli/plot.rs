//! `covnoise plot`: test accuracy and training loss of run directories.

use std::path::PathBuf;

use anyhow::bail;

use covnoise_lab::report::run_plots::plot_runs;
use covnoise_lab::report::runs::load_run;

/// Plot test accuracy and training loss against epoch for one or more runs.
///
/// Reads each RUN_DIR written by `covnoise train --out RUN_DIR` (its
/// config.toml and metrics.jsonl; summary.json when present, so killed runs
/// plot too) and draws two panels side by side: test accuracy and training
/// loss (log scale when all losses are positive), one line per run.
///
/// Example: covnoise plot runs/none runs/diag --out curves.png --labels none,diag
#[derive(clap::Args, Debug)]
pub struct PlotArgs {
    /// Run directories written by `covnoise train --out`; each is drawn as
    /// one line per panel.
    #[arg(required = true, value_name = "RUN_DIR")]
    pub runs: Vec<PathBuf>,

    /// Image to write; its extension picks the format: .png or .svg.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,

    /// Legend labels, comma-separated, one per RUN_DIR in the same order.
    /// Default: built from each run's config (noise, batch size, lr, seed),
    /// or its directory name.
    #[arg(long, value_name = "A,B,...", value_delimiter = ',')]
    pub labels: Option<Vec<String>>,
}

/// Loads the runs, applies `--labels`, and writes the plot.
pub fn run(args: &PlotArgs) -> anyhow::Result<()> {
    // Check the labels before loading anything: a miscount is a typo, and
    // saying so first is clearer than any error from the runs.
    if let Some(labels) = &args.labels {
        if labels.len() != args.runs.len() {
            bail!(
                "--labels has {} label{} but {} run director{} given",
                labels.len(),
                if labels.len() == 1 { "" } else { "s" },
                args.runs.len(),
                if args.runs.len() == 1 {
                    "y was"
                } else {
                    "ies were"
                }
            );
        }
        if let Some(i) = labels.iter().position(|l| l.trim().is_empty()) {
            bail!("--labels: label {} is empty", i + 1);
        }
    }
    let mut runs = args
        .runs
        .iter()
        .map(|dir| load_run(dir))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if let Some(labels) = &args.labels {
        for (run, label) in runs.iter_mut().zip(labels) {
            run.label = label.trim().to_string();
        }
    }
    plot_runs(&runs, &args.out)?;
    println!("wrote {}", args.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    /// Stand-in for the real command line, which flattens the same args.
    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        plot: PlotArgs,
    }

    #[test]
    fn definition_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_runs_out_and_comma_separated_labels() {
        let cli = Cli::try_parse_from(["plot", "a", "b", "--out", "x.svg", "--labels", "one,two"])
            .unwrap();
        assert_eq!(cli.plot.runs, [PathBuf::from("a"), PathBuf::from("b")]);
        assert_eq!(cli.plot.out, PathBuf::from("x.svg"));
        assert_eq!(
            cli.plot.labels.as_deref(),
            Some(&["one".to_string(), "two".to_string()][..])
        );
    }

    #[test]
    fn requires_a_run_and_out() {
        assert!(Cli::try_parse_from(["plot", "--out", "x.svg"]).is_err());
        assert!(Cli::try_parse_from(["plot", "a"]).is_err());
    }

    #[test]
    fn label_count_must_match() {
        let cli =
            Cli::try_parse_from(["plot", "a", "b", "--out", "x.svg", "--labels", "one"]).unwrap();
        let err = run(&cli.plot).unwrap_err().to_string();
        assert_eq!(err, "--labels has 1 label but 2 run directories were given");
    }

    #[test]
    fn missing_run_is_one_line_naming_it() {
        let cli = Cli::try_parse_from(["plot", "/nonexistent/run", "--out", "x.svg"]).unwrap();
        let err = format!("{:#}", run(&cli.plot).unwrap_err());
        assert_eq!(err, "run directory /nonexistent/run does not exist");
    }
}
