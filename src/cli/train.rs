//! `difftrain train`: the trainer with a progress bar, Ctrl-C / SIGTERM
//! handling (a checkpoint at the next step boundary) and an end summary.

use super::human_bytes;
use anyhow::Result;
use clap::Args;
use difftrain::train::config::Config;
use difftrain::train::trainer::{train, Event};
use difftrain::Gpu;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Args)]
pub struct TrainArgs {
    /// TOML config with sections [model], [train], [data], [scheduler] (README: "Config
    /// reference"). Without one, or when it names no model.pretrained_model_name_or_path,
    /// the built-in preset trains the built-in small model on the built-in dataset.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where checkpoints, train_log.jsonl and the final pipeline go (train.output_dir).
    #[arg(long)]
    output_dir: Option<PathBuf>,
    /// Override one config key, e.g. --set train.max_train_steps=20 or
    /// --set train.resume_from=latest (the value is read as TOML; a bare word as a string).
    /// Repeatable.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    sets: Vec<String>,
}

pub fn run(gpu: &Gpu, a: TrainArgs) -> Result<()> {
    let mut sets = a.sets.clone();
    if let Some(dir) = &a.output_dir {
        sets.push(format!("train.output_dir={:?}", dir.display().to_string()));
    }
    let mut config = Config::for_training(a.config.as_deref(), &sets)?;
    if config.train.seed.is_none() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        config.train.seed = Some(nanos % (1 << 31));
    }

    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond interrupt: exiting without a checkpoint");
            std::process::exit(130);
        }
        eprintln!("\nstopping: a checkpoint at the end of this step (Ctrl-C again to quit now)");
    })?;

    eprintln!("adapter: {}", gpu.describe());
    let mut progress = Progress::new()?;
    let summary = train(gpu, &config, &stop, &mut |e| progress.event(e))?;
    progress.finish();

    let loss = |l: Option<f32>| l.map_or("-".to_string(), |v| format!("{v:.4}"));
    let rss = super::peak_rss_bytes()
        .map(|b| format!(", peak process memory {}", human_bytes(b)))
        .unwrap_or_default();
    eprintln!(
        "{} {} steps ({} this run) in {:.1} s; loss {} -> {}; images skipped: {}{rss}",
        if summary.interrupted {
            "stopped after"
        } else {
            "trained"
        },
        summary.steps,
        summary.steps_this_run,
        summary.seconds,
        loss(summary.first_loss),
        loss(summary.last_loss),
        summary.images_skipped,
    );
    let out = summary.output_dir.display();
    if summary.interrupted {
        eprintln!("resume with: difftrain train ... --set train.resume_from=latest (in {out})");
    } else {
        eprintln!("pipeline written to {out} (train_log.jsonl, checkpoints, unet/ ...)");
    }
    Ok(())
}

/// The trainer's events on the terminal: a progress bar with the loss,
/// learning rate and speed, and a line for each note, checkpoint and
/// validation grid (plain lines every 10 s when stderr is not a terminal).
pub struct Progress {
    bar: ProgressBar,
    last_report: std::time::Instant,
}

impl Progress {
    pub fn new() -> Result<Progress> {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}",
            )?
            .progress_chars("=> "),
        );
        Ok(Progress {
            bar,
            last_report: std::time::Instant::now(),
        })
    }

    /// A line above the bar (a hidden bar, e.g. in CI logs, prints nothing).
    pub fn say(&self, line: String) {
        if self.bar.is_hidden() {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    pub fn event(&mut self, e: Event) {
        let bar = &self.bar;
        match e {
            Event::Start {
                first_step,
                total_steps,
                what,
                ..
            } => {
                self.say(format!("training {what}"));
                bar.set_length(total_steps);
                bar.set_position(first_step);
                bar.reset_eta();
            }
            Event::Step(s) => {
                let mut msg = format!(
                    "loss {:.4}  lr {:.2e}  {:.1} img/s",
                    s.loss, s.lr, s.images_per_s
                );
                if let Some(h) = s.heldout_loss {
                    msg.push_str(&format!("  held-out {h:.4}"));
                }
                if let (Some(scale), Some(skipped)) = (s.loss_scale, s.skipped_steps) {
                    msg.push_str(&format!("  scale {scale}  skipped {skipped}"));
                }
                bar.set_position(s.step);
                if bar.is_hidden() && self.last_report.elapsed().as_secs() >= 10 {
                    eprintln!("step {}/{}: {msg}", s.step, bar.length().unwrap_or(0));
                    self.last_report = std::time::Instant::now();
                }
                bar.set_message(msg);
            }
            Event::Skipped(path, why) => self.say(format!("skipped {}: {why}", path.display())),
            Event::Checkpoint(dir) => self.say(format!("checkpoint: {}", dir.display())),
            Event::Validation(png) => self.say(format!("validation samples: {}", png.display())),
            Event::Note(n) => self.say(n),
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
