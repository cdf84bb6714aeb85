//! `difftrain bench ...`: benchmark tables.

use anyhow::{bail, Context, Result};
use difftrain::gpu::AdapterChoice;
use difftrain::Gpu;

pub fn bench_ops(choice: &AdapterChoice, filter: Option<String>, iters: usize) -> Result<()> {
    if iters == 0 {
        bail!("--iters must be at least 1");
    }
    let gpu = Gpu::new_blocking(choice)?;
    println!(
        "adapter: {} ({:?}, {})",
        gpu.info.name, gpu.info.backend, gpu.info.driver
    );
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
    let mut results = Vec::new();
    for case in &cases {
        let r = difftrain::bench::run_case(&gpu, case, iters)
            .with_context(|| format!("benchmark {} {} {}", case.name, case.shape, case.dtype))?;
        eprintln!("{} {} {}: {:.2} ms", r.name, r.shape, r.dtype, r.median_ms);
        results.push(r);
    }
    print!("{}", difftrain::bench::table(&results));
    Ok(())
}
