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
    run_cases(&gpu, choice, &cases, iters, profile)
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
    run_cases(&gpu, choice, &cases, iters, profile)
}

fn open(choice: &AdapterChoice) -> Result<Gpu> {
    let gpu = Gpu::new_blocking(choice)?;
    println!(
        "adapter: {} ({:?}, {})",
        gpu.info.name, gpu.info.backend, gpu.info.driver
    );
    Ok(gpu)
}

/// Time `cases` on `gpu`; with `profile`, profile them again on a second
/// device opened with timestamp queries (which slow some drivers, so the
/// timed runs go without them).
fn run_cases(
    gpu: &Gpu,
    choice: &AdapterChoice,
    cases: &[difftrain::bench::BenchCase],
    iters: usize,
    profile: bool,
) -> Result<()> {
    let mut results = Vec::new();
    for case in cases {
        let r = difftrain::bench::run_case(gpu, case, iters)
            .with_context(|| format!("benchmark {} {} {}", case.name, case.shape, case.dtype))?;
        eprintln!("{} {} {}: {:.2} ms", r.name, r.shape, r.dtype, r.median_ms);
        results.push(r);
    }
    print!("{}", difftrain::bench::table(&results));
    if profile {
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
