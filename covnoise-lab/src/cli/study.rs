//! `covnoise study`: run (or resume) a study file and print its table.

use std::path::PathBuf;

use clap::Args;
use covnoise_lab::study::{StudyEvent, StudySpec, run_study};

use super::train::TerminalProgress;

/// Settings of `covnoise study`.
#[derive(Debug, Args)]
pub struct StudyArgs {
    /// Study file (TOML): seeds, optional [search], [base] settings and [[arm]]s.
    pub file: PathBuf,
    /// Output directory: runs/<arm>/{search-K,seed-S}, study.md, study.json and plots.
    /// Finished runs found there are reused, so a killed study resumes.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Worker threads shared by the runs' tensor operations [default: the
    /// study's `threads` setting, else all cores].
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Runs trained at once (searches first, then final runs), each on its
    /// own pool of threads/N threads (study.md says how many). Results do
    /// not depend on it; a per-run progress bar is shown only with 1.
    /// Small-model steps use few cores each, so on 2 cores `--jobs 2` nearly
    /// halves a study.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub jobs: u64,
    /// Print only the final table.
    #[arg(long)]
    pub quiet: bool,
    /// Validate the study file and list its runs and budget, without training.
    #[arg(long)]
    pub plan: bool,
    /// Run only the arm of this name (its search, if any, and its final
    /// runs), in the same run directories as the whole study.
    #[arg(long, value_name = "NAME")]
    pub arm: Option<String>,
    /// Run only the first N seeds of the study.
    #[arg(long, value_name = "N")]
    pub seeds: Option<usize>,
    /// Override a setting in every run (base, arms and grids), e.g.
    /// `--set data=/data/cifar-10-batches-bin --set device=cuda`; VALUE is
    /// TOML (a bare word is a string). Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

/// Runs `covnoise study`.
pub fn run(args: &StudyArgs) -> anyhow::Result<()> {
    let mut spec = StudySpec::load(&args.file)?;
    for assignment in &args.set {
        spec.set(assignment)?;
    }
    if let Some(name) = &args.arm {
        spec.only_arm(name)?;
    }
    if let Some(n) = args.seeds {
        spec.first_seeds(n)?;
    }
    // Validate every arm before touching the output directory or the CPU.
    let plans = spec.plan()?;
    if args.plan {
        // --plan trains nothing: the flags that shape training do nothing.
        for (set, flag) in [
            (args.jobs != 1, "jobs"),
            (args.threads.is_some(), "threads"),
            (args.quiet, "quiet"),
        ] {
            if set {
                eprintln!("warning: --{flag} is ignored: --plan trains nothing");
            }
        }
        for p in &plans {
            let search = if p.searches() { p.candidates.len() } else { 0 };
            let search_epochs: usize = if p.searches() {
                p.candidates.iter().map(|(_, s)| s.epochs).sum()
            } else {
                0
            };
            println!(
                "{}: {} search runs ({} epochs), {} final runs -> {}",
                p.name,
                search,
                search_epochs,
                spec.seeds.len(),
                args.out.join("runs").join(&p.slug).display()
            );
        }
        return Ok(());
    }
    // --threads, else the study's [base] threads (arms may not set their own).
    let base_threads = plans
        .first()
        .and_then(|p| p.candidates.first())
        .and_then(|(_, s)| s.threads);
    super::set_threads(args.threads.or(base_threads))?;
    let quiet = args.quiet;
    let mut progress = TerminalProgress::new(true);
    let mut on_event = |event: StudyEvent| {
        if let StudyEvent::Warning { arm, message } = &event {
            // Warnings are said also with --quiet, as train says them.
            eprintln!("warning: arm {arm:?}: {message}");
            return;
        }
        if quiet {
            return;
        }
        match event {
            StudyEvent::Warning { .. } => {}
            StudyEvent::Start { dir, index, total } => {
                eprintln!("[{index}/{total}] {} ...", dir.display())
            }
            StudyEvent::Skip { dir } => eprintln!("reusing finished run {}", dir.display()),
            StudyEvent::Continue { dir, epoch } => {
                eprintln!("{} continues from epoch {epoch}", dir.display())
            }
            StudyEvent::Restart { dir, reason } => {
                eprintln!("{} starts again: {reason}", dir.display())
            }
            StudyEvent::Done { dir, summary } => eprintln!(
                "  {} {:?}: test accuracy {:.4}, {:.2} s/epoch",
                dir.display(),
                summary.status,
                summary.test_accuracy,
                summary.seconds_per_epoch
            ),
        }
    };
    let report = run_study(
        &spec,
        &args.out,
        args.jobs as usize,
        &mut progress,
        &mut on_event,
    )?;
    println!("{}", report.markdown());
    println!(
        "written: {}",
        args.out.join(report.file("study.md")).display()
    );
    Ok(())
}
