//! `covnoise illustrate`: a thin shell over [`covnoise_lab::theory::illustrate`]
//! that prints the clouds' covariances and draws the figure.

use std::path::PathBuf;

use clap::Args;

use covnoise_lab::report::theory_plots::draw_illustration;
use covnoise_lab::theory::{IllustrationConfig, illustrate};

/// Draws the paper's Figure 1 on a synthetic 2-D least-squares problem: the
/// clouds of one-step updates from one point under small-batch SGD (real
/// minibatch sampling) and under a large batch plus isotropic, full-Fisher or
/// diagonal-Fisher noise (scale c = 1/B_S - 1/B_L, same total variance), over
/// the loss contours, in four panels.
#[derive(Args, Debug)]
pub struct IllustrateArgs {
    /// Output figure: .png or .svg.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,

    /// Seed of the data set and of the sampled updates.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Updates drawn per cloud.
    #[arg(long, default_value_t = 600)]
    pub draws: usize,

    /// Small batch B_S of the SGD reference.
    #[arg(long, default_value_t = 8)]
    pub small_batch: usize,

    /// Large batch B_L that the noise is added to.
    #[arg(long, default_value_t = 256)]
    pub large_batch: usize,

    /// Learning rate of the one step.
    #[arg(long, default_value_t = 1.0)]
    pub lr: f64,

    /// Number of examples in the synthetic data set.
    #[arg(long, default_value_t = 4096)]
    pub examples: usize,
}

/// Runs `covnoise illustrate`.
pub fn run(args: &IllustrateArgs) -> anyhow::Result<()> {
    super::check_output_file("--out", &args.out)?;
    if !args
        .out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png") || e.eq_ignore_ascii_case("svg"))
    {
        anyhow::bail!(
            "--out {}: the file must end in .png or .svg",
            args.out.display()
        );
    }
    // The examples (two inputs and a target) and four clouds of 2-D points
    // are held at once: refuse counts no memory holds, before allocating.
    let needed = 8 * (3 * args.examples as u128 + 4 * 2 * args.draws as u128);
    if let Some(total) = covnoise_lab::device::host_memory_bytes()
        && needed > u128::from(total)
    {
        anyhow::bail!(
            "--examples {} and --draws {} need at least {:.1} GiB, more than this machine's {:.1} GiB of memory",
            args.examples,
            args.draws,
            needed as f64 / f64::from(1u32 << 30),
            total as f64 / f64::from(1u32 << 30)
        );
    }
    let config = IllustrationConfig {
        examples: args.examples,
        small_batch: args.small_batch,
        large_batch: args.large_batch,
        lr: args.lr,
        draws: args.draws,
        seed: args.seed,
    };
    let ill = illustrate(&config)?;
    println!(
        "2-D least squares: {} examples, start ({:.3}, {:.3}), optimum ({:.3}, {:.3}), noise scale c = {:.5}",
        config.examples, ill.start.x, ill.start.y, ill.optimum.x, ill.optimum.y, ill.noise_scale
    );
    println!(
        "{:<40} {:>12} {:>12} {:>16}",
        "cloud", "tr cov", "corr", "gap to SGD cov"
    );
    let sgd = ill.clouds[0].predicted_cov;
    for cloud in &ill.clouds {
        println!(
            "{:<40} {:>12.4e} {:>12.3} {:>16.3}",
            cloud.label,
            cloud.cov.trace(),
            cloud.correlation(),
            cloud.predicted_gap(&sgd)
        );
    }
    println!("(gap: ||predicted cov - SGD's|| / ||SGD's||, Frobenius)");
    draw_illustration(&args.out, &ill)?;
    println!("wrote {}", args.out.display());
    Ok(())
}
