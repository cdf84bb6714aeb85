//! `difftrain bench ...`: benchmark tables.

use anyhow::{bail, Context, Result};
use difftrain::gpu::AdapterChoice;
use difftrain::Gpu;

pub fn bench_ops(
    choice: &AdapterChoice,
    filter: Option<String>,
    iters: usize,
    profile: bool,
) -> Result<()> {
    if iters == 0 {
        bail!("--iters must be at least 1");
    }
    let gpu = open(choice)?;
    let cases: Vec<_> = difftrain::bench::op_cases()
        .into_iter()
        .filter(|c| filter.as_ref().is_none_or(|f| c.name.contains(f.as_str())))
        .collect();
    if cases.is_empty() {
        bail!(
            "no benchmark matches --filter {:?}",
            filter.unwrap_or_default()
        );
    }
    run_cases(gpu, choice, &cases, iters, profile)
}

/// The input of a `bench unet` run.
pub struct UnetShape {
    pub batch: usize,
    pub latent: usize,
    pub forward_only: bool,
    /// Activation dtypes, a case each.
    pub dtypes: Vec<difftrain::DType>,
}

/// `bench unet`: forward, then (unless `forward_only`) forward + backward.
pub fn bench_unet(
    choice: &AdapterChoice,
    config: &std::path::Path,
    shape: UnetShape,
    iters: usize,
    profile: bool,
) -> Result<()> {
    let UnetShape {
        batch,
        latent,
        forward_only,
        dtypes,
    } = shape;
    if iters == 0 || batch == 0 || latent == 0 {
        bail!("--iters, --batch and --latent must be at least 1");
    }
    let gpu = open(choice)?;
    let mut cases = Vec::new();
    for dtype in dtypes {
        cases.push(difftrain::bench::unet_case(
            config, batch, latent, dtype, false,
        )?);
        if !forward_only {
            cases.push(difftrain::bench::unet_case(
                config, batch, latent, dtype, true,
            )?);
        }
    }
    run_cases(gpu, choice, &cases, iters, profile)
}

fn open(choice: &AdapterChoice) -> Result<Gpu> {
    let gpu = Gpu::new_blocking(choice)?;
    println!("adapter: {}", gpu.describe());
    Ok(gpu)
}

/// Time `cases` on `gpu`; with `profile`, profile them again on a second
/// device opened with timestamp queries (which slow some drivers, so the
/// timed runs go without them).
fn run_cases(
    gpu: Gpu,
    choice: &AdapterChoice,
    cases: &[difftrain::bench::BenchCase],
    iters: usize,
    profile: bool,
) -> Result<()> {
    let mut results = Vec::new();
    for case in cases {
        let r = difftrain::bench::run_case(&gpu, case, iters)
            .with_context(|| format!("benchmark {} {} {}", case.name, case.shape, case.dtype))?;
        eprintln!("{} {} {}: {:.2} ms", r.name, r.shape, r.dtype, r.median_ms);
        results.push(r);
    }
    print!("{}", difftrain::bench::table(&results));
    if profile {
        // One device at a time (on a CPU adapter buffers are process memory).
        drop(gpu);
        let timed = AdapterChoice {
            timestamps: true,
            ..choice.clone()
        };
        let gpu = Gpu::new_blocking(&timed)?;
        for case in cases {
            let rows = difftrain::bench::profile_case(&gpu, case, iters)
                .with_context(|| format!("profiling {} {}", case.name, case.shape))?;
            let pass = if case.backward { "fwd+bwd" } else { "fwd" };
            println!(
                "\nprofile: {} {} {} {pass}",
                case.name, case.shape, case.dtype
            );
            print!("{}", difftrain::bench::profile_table(&rows));
        }
    }
    Ok(())
}

/// `bench train`'s options.
#[derive(clap::Args)]
pub struct TrainBenchArgs {
    /// UNet2DConditionModel config.json (instead of --preset).
    #[arg(long, conflicts_with = "preset")]
    config: Option<std::path::PathBuf>,
    /// A built-in UNet config: builtin (the demo's), small (32/64 channels, 2 layers, heads
    /// 2/4, 32-wide text states) or sd15. Default: small.
    #[arg(long)]
    preset: Option<String>,
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Latent height and width (image size / 8).
    #[arg(long, default_value_t = 16)]
    latent: usize,
    /// Text tokens (the text states are random, the UNet's cross_attention_dim wide).
    #[arg(long, default_value_t = 77)]
    text_len: usize,
    /// Activation precisions, comma separated: fp32, fp16, bf16 (fp16 with loss scaling).
    #[arg(long, value_delimiter = ',', default_value = "fp32")]
    precision: Vec<String>,
    /// Also time the step with DREAM (its extra no-grad UNet pass).
    #[arg(long)]
    dream: bool,
    /// Also time the step with gradient checkpointing (each UNet block's activations
    /// recomputed in backward instead of kept): the memory / time trade-off side by side.
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Timed steps after the first (cold) step and one more warm-up step; the median is
    /// reported.
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// One JSON object per case on stdout instead of a table.
    #[arg(long)]
    json: bool,
    /// Then profile each case: GPU time per kernel (needs timestamp queries).
    #[arg(long, conflicts_with = "json")]
    profile: bool,
}

/// `bench train`: a case per precision (and with `--dream` or
/// `--gradient-checkpointing`, each also with DREAM or checkpointing).
pub fn bench_train(choice: &AdapterChoice, a: TrainBenchArgs) -> Result<()> {
    use difftrain::train::bench::{bench_train_step, preset_config, TrainBench};
    if a.iters == 0 || a.batch == 0 || a.latent == 0 || a.text_len == 0 {
        bail!("--iters, --batch, --latent and --text-len must be at least 1");
    }
    let (name, config) = match &a.config {
        Some(path) => (
            path.file_stem()
                .map_or("unet".into(), |s| s.to_string_lossy().into_owned()),
            path.clone(),
        ),
        None => {
            let preset = a.preset.clone().unwrap_or_else(|| "small".into());
            let path = preset_config(&preset)?;
            (preset, path)
        }
    };
    let gpu = Gpu::new_blocking(choice)?;
    if !a.json {
        println!("adapter: {}", gpu.describe());
    }
    let mut results = Vec::new();
    let mut cases = Vec::new();
    for p in &a.precision {
        let dtype = match p.as_str() {
            "fp32" => difftrain::DType::F32,
            "fp16" => difftrain::DType::F16,
            "bf16" => difftrain::DType::BF16,
            other => bail!("--precision: '{other}' is not one of fp32, fp16, bf16"),
        };
        let both = |on: bool| if on { vec![false, true] } else { vec![false] };
        for dream in both(a.dream) {
            for gradient_checkpointing in both(a.gradient_checkpointing) {
                let case = TrainBench {
                    name: name.clone(),
                    batch: a.batch,
                    latent: a.latent,
                    text_len: a.text_len,
                    dtype,
                    dream,
                    gradient_checkpointing,
                    iters: a.iters,
                };
                let r = bench_train_step(&gpu, &config, &case)
                    .with_context(|| format!("train step of {name} in {p}"))?;
                if a.json {
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    eprintln!("{name} {p}{}: {:.1} ms", case_flags(&case), r.median_ms);
                }
                cases.push(case);
                results.push(r);
            }
        }
    }
    if !a.json {
        println!(
            "{:<10} {:<18} {:<5} {:<5} {:<5} {:>10} {:>10} {:>9} {:>12} {:>6} {:>5} {:>10} {:>10}",
            "unet",
            "shape",
            "prec",
            "DREAM",
            "ckpt",
            "median ms",
            "first ms",
            "img/s",
            "GFLOP/s",
            "disp",
            "subm",
            "peak MiB",
            "RSS MiB"
        );
        for r in &results {
            println!(
                "{:<10} {:<18} {:<5} {:<5} {:<5} {:>10.1} {:>10.1} {:>9.1} {:>12.1} {:>6} {:>5} {:>10.1} {:>10}",
                r.name,
                format!("B{} {}x{} S{}", r.batch, r.latent, r.latent, r.text_len),
                r.precision,
                if r.dream { "on" } else { "off" },
                if r.gradient_checkpointing { "on" } else { "off" },
                r.median_ms,
                r.first_ms,
                r.images_per_s,
                r.gflops,
                r.dispatches,
                r.submissions,
                r.peak_bytes as f64 / (1 << 20) as f64,
                r.peak_rss_bytes
                    .map_or("-".into(), |b| format!("{:.0}", b as f64 / (1 << 20) as f64))
            );
        }
    }
    if a.profile {
        // The timed device goes first: on a CPU adapter its buffers are
        // process memory, and SD 1.5's would not fit twice.
        drop(gpu);
        let gpu = Gpu::new_blocking(&AdapterChoice {
            timestamps: true,
            ..choice.clone()
        })?;
        for case in &cases {
            let rows = difftrain::train::bench::profile_train_step(&gpu, &config, case)
                .with_context(|| format!("profiling the train step of {name}"))?;
            println!(
                "\nprofile: {name} B{} {}x{} {}{}",
                case.batch,
                case.latent,
                case.latent,
                case.dtype,
                case_flags(case)
            );
            print!("{}", difftrain::bench::profile_table(&rows));
        }
    }
    Ok(())
}

/// " DREAM", " checkpointed", both or nothing, for progress lines and profiles.
fn case_flags(case: &difftrain::train::bench::TrainBench) -> String {
    let mut s = String::new();
    if case.dream {
        s += " DREAM";
    }
    if case.gradient_checkpointing {
        s += " checkpointed";
    }
    s
}
