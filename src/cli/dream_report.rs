//! `difftrain dream-report`: plain training against DREAM (epsilon and
//! v_prediction) on the built-in default, compared on the held-out loss.

use super::train::Progress;
use anyhow::Result;
use clap::Args;
use difftrain::train::dream_report::{dream_report, ReportOptions};
use difftrain::Gpu;
use std::path::PathBuf;

#[derive(Args)]
pub struct DreamReportArgs {
    /// Optimizer steps per run.
    #[arg(long, default_value_t = 300)]
    steps: u64,
    /// Measure the held-out loss every this many steps.
    #[arg(long, default_value_t = 25)]
    every: u64,
    /// Folder for the four runs, dream_report.md and dream_report.png.
    #[arg(long, default_value = "dream-report")]
    output_dir: PathBuf,
    /// Override a config key of every run (as `difftrain train --set`), e.g.
    /// --set train.dream_detail_preservation=0.5. Repeatable.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    sets: Vec<String>,
}

pub fn run(gpu: &Gpu, a: DreamReportArgs) -> Result<()> {
    if a.steps == 0 || a.every == 0 {
        anyhow::bail!("--steps and --every must be at least 1");
    }
    eprintln!("adapter: {}", gpu.describe());
    let opts = ReportOptions {
        sets: a.sets,
        steps: a.steps,
        every: a.every,
        output_dir: a.output_dir,
    };
    let mut progress = Progress::new()?;
    let runs = dream_report(gpu, &opts, &mut |_, e| progress.event(e))?;
    progress.finish();
    for r in &runs {
        let last = r.points.last().map_or(f32::NAN, |p| p.2);
        eprintln!(
            "{:<20} held-out loss {last:.4}, {:.0} ms/step",
            r.name,
            r.step_s * 1e3
        );
    }
    let dir = opts.output_dir.display();
    eprintln!("report: {dir}/dream_report.md, {dir}/dream_report.png");
    Ok(())
}
