//! `covnoise bench`: time one training step per noise variant.

use std::path::{Path, PathBuf};

use clap::Args;
use covnoise_lab::bench::reference::{self, Against, ReferenceConfig};
use covnoise_lab::bench::{BenchConfig, run_bench, standard_variants};

/// Settings of `covnoise bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Batch sizes to time, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "128,4096")]
    pub batch_sizes: Vec<usize>,
    /// Model: mlp (784 inputs), lenet5 (28x28 grey), vgg11, vgg16,
    /// resnet20..resnet56 (32x32 colour); 10 classes. Batch-norm models time
    /// plain steps (whole-batch batch norm), the micro-batch estimator and
    /// full noise (with ghost batches of one micro-batch) and the penalties;
    /// per-example estimators do not apply to them.
    #[arg(long, value_name = "NAME", default_value = "mlp", value_parser = super::train::parse_model)]
    pub model: covnoise_lab::zoo::Architecture,
    /// The device: cpu (burn's flex backend), ndarray (burn's ndarray
    /// backend, OpenBLAS with `--features openblas`), libtorch (burn's
    /// LibTorch backend, `--features tch`), wgpu, cuda.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Run each pass over at most N examples, accumulated (every variant).
    #[arg(long, value_name = "N")]
    pub chunk: Option<usize>,
    /// How the micro-batch and penalty variants form micro-batch gradients:
    /// `one` (one pass over the batch where the model allows it) or `each`
    /// (passes of their own per micro-batch).
    #[arg(long, value_name = "HOW", default_value = "one", value_parser = ["one", "each"])]
    pub micro_batch_passes: String,
    /// Hidden widths of the MLP (input 784, 10 classes).
    #[arg(long, value_delimiter = ',', default_value = "512,512")]
    pub hidden: Vec<usize>,
    /// Untimed warm-up rounds (each round runs one step of every variant).
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Timed rounds.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Micro-batches M of the micro-batch variant and of the penalty variants.
    #[arg(long, default_value_t = 16)]
    pub micro_batches: usize,
    /// Small batch B_S setting the noise scale c = 1/B_S of every noisy variant.
    #[arg(long, default_value_t = 128)]
    pub small_batch: usize,
    /// Worker threads [default: all cores].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Time only these variants (comma-separated names, e.g. diag-exact,full);
    /// plain is always timed as the baseline [default: all]. Names: plain,
    /// plain-burn (conv nets: the plain step on burn's own convolution and
    /// batch-norm ops instead of covnoise's fast flex kernels), diag-exact,
    /// diag-exact-refresh10, diag-microbatch, diag-mc-fisher, full,
    /// isotropic-exact, grad-norm and fisher-trace (the penalties over
    /// --micro-batches micro-batches, no noise), and matmul-products (the
    /// MLP's plain step reduced to its matrix products: the share the matmul
    /// library sets).
    #[arg(long, value_delimiter = ',', value_name = "NAMES")]
    pub variants: Vec<String>,
    /// Also time an outside reference in the same run, after covnoise's
    /// rounds, with the same model, batch sizes, threads and rounds, and
    /// print the ratios: `pytorch` (PyTorch's plain step) or `backpack`
    /// (PyTorch's plain step and BackPACK's exact and Monte-Carlo
    /// diagonal-Fisher noise steps; models without batch norm). Runs
    /// bench/pytorch_reference.py with --python.
    #[arg(long, value_enum, value_name = "LIBRARY")]
    pub against: Option<Against>,
    /// The Python interpreter of --against, with torch (and
    /// backpack-for-pytorch) installed [default: bench/.venv/bin/python,
    /// which `make bench-venv` makes].
    #[arg(long, value_name = "PATH")]
    pub python: Option<PathBuf>,
    /// The reference script of --against.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "bench/pytorch_reference.py"
    )]
    pub reference_script: PathBuf,
    /// Write the results as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
}

/// Runs `covnoise bench`.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    if args.threads == Some(0) {
        anyhow::bail!("invalid threads = 0: must be >= 1");
    }
    if args.model == covnoise_lab::zoo::Architecture::Sequential {
        anyhow::bail!(
            "bench times the zoo's fixed architectures; --model sequential is described by --layers, which bench does not take (time it with covnoise train, whose study table gives ms/step)"
        );
    }
    let json = args.json.as_deref().map(std::path::absolute).transpose()?;
    if let Some(path) = &json {
        super::check_output_file("--json", path)?;
    }
    let mut variants = standard_variants(args.small_batch, args.micro_batches);
    if !args.variants.is_empty() {
        let known: Vec<&str> = variants.iter().map(|v| v.name).collect();
        if let Some(bad) = args.variants.iter().find(|n| !known.contains(&n.as_str())) {
            anyhow::bail!("unknown bench variant {bad:?}; known: {}", known.join(", "));
        }
        variants.retain(|v| v.name == "plain" || args.variants.iter().any(|n| n == v.name));
    }
    // A variant asked for by name that the model cannot run is refused,
    // rather than silently leaving the table with plain alone.
    if let Some(v) = variants.iter().find(|v| {
        args.variants.iter().any(|n| n == v.name) && !covnoise_lab::bench::applies(v, args.model)
    }) {
        anyhow::bail!(
            "bench variant {} does not apply to --model {} (batch-norm models time plain, plain-burn, diag-microbatch, full, grad-norm and fisher-trace; matmul-products is the MLP's)",
            v.name,
            args.model
        );
    }
    if args.small_batch == 0 {
        anyhow::bail!("invalid small-batch = 0: must be >= 1 (the noise scale is 1/B_S)");
    }
    let config = BenchConfig {
        model: args.model,
        chunk: args.chunk,
        one_pass: args.micro_batch_passes == "one",
        device: covnoise_lab::device::parse_device(&args.device)?,
        batch_sizes: args.batch_sizes.clone(),
        hidden: args.hidden.clone(),
        warmup: args.warmup,
        steps: args.steps,
        micro_batches: args.micro_batches,
    };
    covnoise_lab::bench::check(&config, &variants)?;
    for warning in ignored(args, &variants) {
        eprintln!("warning: {warning}");
    }
    super::set_threads(args.threads)?;
    let reference_config = args.against.map(|against| ReferenceConfig {
        against,
        python: args
            .python
            .clone()
            .unwrap_or_else(reference::default_python),
        script: args.reference_script.clone(),
        model: args.model,
        batch_sizes: args.batch_sizes.clone(),
        hidden: args.hidden.clone(),
        threads: rayon::current_num_threads(),
        warmup: args.warmup,
        steps: args.steps,
        small_batch: args.small_batch,
    });
    if let Some(r) = &reference_config {
        reference::check(r)?;
    }
    if cfg!(debug_assertions) {
        eprintln!("warning: this is a debug build; time a release build (cargo build --release)");
    }
    println!(
        "model {}  device {}  threads {}  hidden {:?}  chunk {}  micro-batch passes {}  {} timed steps after {} warm-up rounds",
        args.model,
        args.device,
        rayon::current_num_threads(),
        args.hidden,
        args.chunk.map_or("none".to_string(), |c| c.to_string()),
        args.micro_batch_passes,
        args.steps,
        args.warmup
    );
    let results = run_bench(&config, &variants, |line| println!("{line}"))?;
    let reference_run = match &reference_config {
        Some(r) => {
            println!(
                "reference: {} {} (same model, batch sizes, threads and rounds)",
                r.python.display(),
                r.script.display()
            );
            let run = reference::run(r, |line| println!("  {line}"))?;
            for (b, mine, theirs, ratio) in reference::comparisons(&results, &run.results) {
                println!("batch {b:>5}  {mine} / {theirs}  x{ratio:.3}");
            }
            Some(run)
        }
        None => None,
    };
    if let Some(path) = &json {
        let doc = serde_json::json!({
            "model": args.model,
            "device": args.device,
            "chunk": args.chunk,
            "micro_batch_passes": args.micro_batch_passes,
            "threads": rayon::current_num_threads(),
            "hidden": args.hidden,
            "warmup": args.warmup,
            "git_commit": env!("COVNOISE_GIT_COMMIT"),
            "results": results,
            "against": args.against,
            "reference": reference_run,
        });
        covnoise_lab::train::run_dir::write_atomic(
            path,
            (serde_json::to_string_pretty(&doc)? + "\n").as_bytes(),
        )?;
        println!("written: {}", path.display());
    }
    Ok(())
}

/// The flags this bench will not use (set away from their defaults), one
/// warning each.
fn ignored(args: &BenchArgs, variants: &[covnoise_lab::bench::Variant]) -> Vec<String> {
    let mut out = Vec::new();
    let timed: Vec<_> = variants
        .iter()
        .filter(|v| covnoise_lab::bench::applies(v, args.model))
        .collect();
    if args.model != covnoise_lab::zoo::Architecture::Mlp && args.hidden != [512, 512] {
        out.push(format!(
            "--hidden is ignored: it applies only to --model mlp, not {}",
            args.model
        ));
    }
    let microbatch = timed
        .iter()
        .any(|v| covnoise_lab::bench::uses_micro_batches(v, args.model));
    if !microbatch && args.micro_batches != 16 {
        out.push(
            "--micro-batches is ignored: no timed variant splits its batches into micro-batches"
                .into(),
        );
    }
    if args.against.is_none()
        && (args.python.is_some()
            || args.reference_script != Path::new("bench/pytorch_reference.py"))
    {
        out.push("--python and --reference-script are ignored without --against".into());
    }
    let noisy = timed.iter().any(|v| !v.noise.is_none());
    if !noisy && args.small_batch != 128 {
        out.push("--small-batch is ignored: no noisy variant is timed".into());
    }
    out
}
