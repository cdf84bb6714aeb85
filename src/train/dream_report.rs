//! `difftrain dream-report`: plain training against DREAM, for epsilon and
//! v_prediction, on one config (the built-in default unless told otherwise)
//! with the same seeds, compared on the held-out loss (`train::heldout`)
//! against step and against training time. Writes `dream_report.md` (a
//! table) and `dream_report.png` (the curves) into the output folder.

use super::config::Config;
use super::plot::{write_heldout_plot, Curve};
use super::trainer::{train, Event, StepLog};
use crate::error::{file_err, Result};
use crate::Gpu;
use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

/// The four runs: (folder name, model.prediction_type, DREAM on).
pub const RUNS: [(&str, &str, bool); 4] = [
    ("epsilon", "epsilon", false),
    ("epsilon-dream", "epsilon", true),
    ("v_prediction", "v_prediction", false),
    ("v_prediction-dream", "v_prediction", true),
];

/// What one run measured.
#[derive(Clone, Debug)]
pub struct RunResult {
    pub name: String,
    pub prediction: String,
    pub dream: bool,
    /// (step, training seconds so far, held-out loss).
    pub points: Vec<(u64, f64, f32)>,
    /// Median seconds per optimizer step (steps after the first).
    pub step_s: f64,
}

/// The report's inputs.
pub struct ReportOptions {
    /// `--set` overrides applied to every run (on top of the built-in preset).
    pub sets: Vec<String>,
    pub steps: u64,
    /// Held-out loss every this many steps.
    pub every: u64,
    pub output_dir: PathBuf,
}

/// Train the four runs and write the report. `progress` hears every run's
/// events, after a note naming the run.
pub fn dream_report(
    gpu: &Gpu,
    opts: &ReportOptions,
    progress: &mut dyn FnMut(&str, Event),
) -> Result<Vec<RunResult>> {
    let mut results = Vec::new();
    for (name, prediction, dream) in RUNS {
        let dir = opts.output_dir.join(name);
        let mut sets = opts.sets.clone();
        sets.extend([
            format!("model.prediction_type={prediction:?}"),
            format!("train.dream_training={dream}"),
            format!("train.max_train_steps={}", opts.steps),
            format!("train.heldout_loss_steps={}", opts.every),
            format!("train.checkpointing_steps={}", opts.steps),
            "train.checkpoints_total_limit=1".to_string(),
            "sample.validation_prompts=[]".to_string(),
            format!("train.output_dir={:?}", dir.display().to_string()),
        ]);
        let mut config = Config::for_training(None, &sets)?;
        config.train.seed.get_or_insert(0);
        let mut log: Vec<StepLog> = Vec::new();
        progress(name, Event::Note(format!("run {name}")));
        train(gpu, &config, &AtomicBool::new(false), &mut |e| {
            if let Event::Step(s) = &e {
                log.push((*s).clone());
            }
            progress(name, e);
        })?;
        let images = config.train.train_batch_size * config.train.gradient_accumulation_steps;
        results.push(summarize(name, prediction, dream, &log, images));
    }
    write_report(&opts.output_dir, opts, &results)?;
    Ok(results)
}

/// The held-out points and the step time of one run's log. Training
/// seconds sum the steps' own times, so the held-out evaluations (the same
/// for every run) do not count.
pub fn summarize(
    name: &str,
    prediction: &str,
    dream: bool,
    log: &[StepLog],
    images_per_step: usize,
) -> RunResult {
    let step_s: Vec<f64> = log
        .iter()
        .map(|l| images_per_step as f64 / l.images_per_s)
        .collect();
    let mut points = Vec::new();
    let mut seconds = 0.0;
    for (l, s) in log.iter().zip(&step_s) {
        seconds += s;
        if let Some(h) = l.heldout_loss {
            points.push((l.step, seconds, h));
        }
    }
    let mut later: Vec<f64> = step_s.iter().skip(1).copied().collect();
    later.sort_by(f64::total_cmp);
    RunResult {
        name: name.to_string(),
        prediction: prediction.to_string(),
        dream,
        points,
        step_s: later.get(later.len() / 2).copied().unwrap_or(0.0),
    }
}

/// `dream_report.md` and `dream_report.png` in `dir`.
pub fn write_report(dir: &Path, opts: &ReportOptions, runs: &[RunResult]) -> Result<PathBuf> {
    let curves: Vec<Curve> = runs
        .iter()
        .map(|r| {
            let pts = r
                .points
                .iter()
                .map(|&(s, t, l)| (s as f32, t as f32, l))
                .collect();
            (r.name.clone(), pts)
        })
        .collect();
    write_heldout_plot(&dir.join("dream_report.png"), &curves)?;

    let mut md = String::new();
    let _ = writeln!(
        md,
        "# DREAM report\n\n{} steps per run, held-out loss every {} steps; overrides: {}.\n",
        opts.steps,
        opts.every,
        if opts.sets.is_empty() {
            "none (the built-in default)".to_string()
        } else {
            opts.sets.join(", ")
        }
    );
    let mid = |r: &RunResult| r.points.get(r.points.len().saturating_sub(1) / 2).copied();
    let _ = writeln!(
        md,
        "| run | DREAM | held-out loss, mid-run (step) | held-out loss, last | step time | vs plain | steps to plain's last loss |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    for r in runs {
        let plain = runs
            .iter()
            .find(|p| p.prediction == r.prediction && !p.dream)
            .unwrap_or(r);
        let target = plain.points.last().map_or(f32::NAN, |p| p.2);
        let reached = r
            .points
            .iter()
            .find(|p| p.2 <= target)
            .map_or("not reached".to_string(), |p| p.0.to_string());
        let last = r.points.last().map_or(f32::NAN, |p| p.2);
        let (mid_loss, mid_step) = mid(r).map_or((f32::NAN, 0), |p| (p.2, p.0));
        let _ = writeln!(
            md,
            "| {} | {} | {mid_loss:.4} ({mid_step}) | {last:.4} | {:.0} ms | {:.2}x | {reached} |",
            r.prediction,
            if r.dream { "on" } else { "off" },
            r.step_s * 1e3,
            r.step_s / plain.step_s,
        );
    }
    let _ = writeln!(
        md,
        "\nHeld-out loss: the plain denoising MSE (no DREAM, no Min-SNR) on a fixed set of \
         examples, timesteps and noise (`train.heldout_loss_steps`). Step time: the median \
         over the run. The curves: `dream_report.png`."
    );
    let path = dir.join("dream_report.md");
    std::fs::write(&path, md).map_err(|e| file_err(&path, e.to_string()))?;
    Ok(path)
}
