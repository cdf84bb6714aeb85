//! `difftrain bench ...`: benchmark tables.

use anyhow::{bail, Context, Result};
use difftrain::gpu::AdapterChoice;
use difftrain::Gpu;

pub fn bench_ops(choice: &AdapterChoice, filter: Option<String>, iters: usize) -> Result<()> {
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
    run_cases(&gpu, &cases, iters)
}

/// `bench unet`: forward, then (unless `forward_only`) forward + backward.
pub fn bench_unet(
    choice: &AdapterChoice,
    config: &std::path::Path,
    batch: usize,
    latent: usize,
    iters: usize,
    forward_only: bool,
) -> Result<()> {
    if iters == 0 || batch == 0 || latent == 0 {
        bail!("--iters, --batch and --latent must be at least 1");
    }
    let gpu = open(choice)?;
    let mut cases = vec![difftrain::bench::unet_case(config, batch, latent, false)?];
    if !forward_only {
        cases.push(difftrain::bench::unet_case(config, batch, latent, true)?);
    }
    run_cases(&gpu, &cases, iters)
}

fn open(choice: &AdapterChoice) -> Result<Gpu> {
    let gpu = Gpu::new_blocking(choice)?;
    println!(
        "adapter: {} ({:?}, {})",
        gpu.info.name, gpu.info.backend, gpu.info.driver
    );
    Ok(gpu)
}

fn run_cases(gpu: &Gpu, cases: &[difftrain::bench::BenchCase], iters: usize) -> Result<()> {
    let mut results = Vec::new();
    for case in cases {
        let r = difftrain::bench::run_case(gpu, case, iters)
            .with_context(|| format!("benchmark {} {} {}", case.name, case.shape, case.dtype))?;
        eprintln!("{} {} {}: {:.2} ms", r.name, r.shape, r.dtype, r.median_ms);
        results.push(r);
    }
    print!("{}", difftrain::bench::table(&results));
    Ok(())
}
