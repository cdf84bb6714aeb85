//! The native training loop around a [`Run`]: the stop request, the log
//! file and loss plot, checkpoints, validation grids and the final pipeline
//! folder. What the caller shows (progress bar) comes through [`Event`]s.

use super::checkpoint;
use super::config::Config;
pub use super::run::StepLog;
use super::run::{write_unet, Run};
use crate::error::{file_err, Error, Result};
use crate::platform::{block_on, Instant};
use crate::sample::write_grid;
use crate::Gpu;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// What the trainer reports as it goes.
#[derive(Debug)]
pub enum Event<'a> {
    /// Set up; training starts at `first_step` of `total_steps`.
    Start {
        first_step: u64,
        total_steps: u64,
        examples: usize,
        what: String,
    },
    Step(&'a StepLog),
    /// An image that could not be read, skipped.
    Skipped(&'a Path, &'a str),
    Checkpoint(&'a Path),
    /// A validation grid written.
    Validation(&'a Path),
    /// Anything else worth a line (resume, stop request).
    Note(String),
}

/// How a run ended.
#[derive(Clone, Debug)]
pub struct Summary {
    /// Optimizer steps done (in all runs of this output folder).
    pub steps: u64,
    /// Steps done by this run.
    pub steps_this_run: u64,
    pub seconds: f64,
    pub images_skipped: u64,
    pub first_loss: Option<f32>,
    pub last_loss: Option<f32>,
    pub output_dir: PathBuf,
    /// Stopped by a stop request before `max_train_steps`.
    pub interrupted: bool,
}

/// Train as `config` says until `max_train_steps` or until `stop` is set
/// (then a checkpoint at the next step boundary). `config` is the resolved
/// config (its seed set).
pub fn train(
    gpu: &Gpu,
    config: &Config,
    stop: &AtomicBool,
    on_event: &mut dyn FnMut(Event),
) -> Result<Summary> {
    let t = &config.train;
    let out_dir = t.output_dir.clone();
    std::fs::create_dir_all(&out_dir).map_err(|e| file_err(&out_dir, e.to_string()))?;
    let mut run = block_on(Run::open(gpu, config))?;
    if let Some(dir) = resume_dir(config, &out_dir, on_event)? {
        run.state = checkpoint::load(&dir, &run.session, &run.unet)?;
        on_event(Event::Note(format!(
            "resumed from {} (step {})",
            dir.display(),
            run.state.global_step
        )));
    }
    block_on(run.start())?;
    let total = run.state.max_train_steps;
    let first_step = run.state.global_step;
    let mut log = TrainLog::open(&out_dir, first_step)?;
    on_event(Event::Start {
        first_step,
        total_steps: total,
        examples: run.dataset.len(),
        what: run.describe(),
    });

    let config_toml = config.to_toml();
    let run_start = Instant::now();
    let (mut first_loss, mut last_loss) = (None, None);
    let mut interrupted = false;
    while run.state.global_step < total {
        if stop.load(Ordering::SeqCst) {
            interrupted = true;
            break;
        }
        let entry = block_on(run.step())?;
        for (path, why) in &run.skipped {
            on_event(Event::Skipped(path, why));
        }
        first_loss.get_or_insert(entry.loss);
        last_loss = Some(entry.loss);
        log.append(&entry)?;
        on_event(Event::Step(&entry));
        let step = run.state.global_step;
        let stopping = stop.load(Ordering::SeqCst);
        if step.is_multiple_of(t.checkpointing_steps) || stopping {
            let dir = checkpoint::save(
                &out_dir,
                &run.session,
                &run.unet,
                &run.state,
                &config_toml,
                t.checkpoints_total_limit,
            )?;
            on_event(Event::Checkpoint(&dir));
            log.plot()?;
        }
        let v = &config.sample;
        if !v.validation_prompts.is_empty()
            && (step.is_multiple_of(v.validation_steps) || step == total)
        {
            let path = validate(&run)?;
            on_event(Event::Validation(&path));
        }
    }
    log.plot()?;
    if let Some(note) = run.cache_summary() {
        on_event(Event::Note(note));
    }
    if interrupted {
        on_event(Event::Note("stopped on request".into()));
    } else {
        write_pipeline(&out_dir, &run)?;
    }
    Ok(Summary {
        steps: run.state.global_step,
        steps_this_run: run.state.global_step - first_step,
        seconds: run_start.elapsed().as_secs_f64(),
        images_skipped: run.state.images_skipped,
        first_loss,
        last_loss,
        output_dir: out_dir,
        interrupted,
    })
}

/// `OUTPUT_DIR/samples/step-STEP.png`: a grid of the `[sample]` prompts
/// (a row each) sampled with the current weights (the EMA's when it is on),
/// and `step-STEP.txt` listing the prompts.
fn validate(run: &Run) -> Result<PathBuf> {
    let v = &run.config.sample;
    let dir = run.config.train.output_dir.join("samples");
    std::fs::create_dir_all(&dir).map_err(|e| file_err(&dir, e.to_string()))?;
    let out = block_on(run.validation_samples(&v.validation_prompts))?;
    let step = run.state.global_step;
    let png = dir.join(format!("step-{step}.png"));
    write_grid(&out.images, v.num_validation_images, &png)?;
    let txt = dir.join(format!("step-{step}.txt"));
    std::fs::write(&txt, v.validation_prompts.join("\n") + "\n")
        .map_err(|e| file_err(&txt, e.to_string()))?;
    Ok(png)
}

/// The checkpoint `train.resume_from` names: a folder, `"latest"` (the
/// newest complete one; none: a fresh start, said in a note), or nothing.
fn resume_dir(
    config: &Config,
    out_dir: &Path,
    on_event: &mut dyn FnMut(Event),
) -> Result<Option<PathBuf>> {
    match config.train.resume_from.as_str() {
        "" => Ok(None),
        "latest" => {
            let found = checkpoint::latest(out_dir);
            if found.is_none() {
                on_event(Event::Note(format!(
                    "no checkpoint in {} to resume from; starting a new run",
                    out_dir.display()
                )));
            }
            Ok(found)
        }
        path => {
            let dir = PathBuf::from(path);
            if !dir.is_dir() {
                return Err(Error::Config {
                    path: "config".into(),
                    field: "train.resume_from".into(),
                    msg: format!("'{path}' is not a checkpoint folder"),
                });
            }
            Ok(Some(dir))
        }
    }
}

/// The final pipeline folder: the trained UNet (its EMA weights when the
/// EMA is on, as diffusers' script saves them) and the base pipeline's
/// other components.
fn write_pipeline(out: &Path, run: &Run) -> Result<()> {
    let base = &run.pipeline.root;
    if same_dir(out, base) {
        return Err(file_err(
            out,
            "train.output_dir is the pretrained pipeline folder; choose another",
        ));
    }
    for part in ["vae", "text_encoder", "tokenizer", "scheduler"] {
        copy_dir(&base.join(part), &out.join(part))?;
    }
    std::fs::copy(base.join("model_index.json"), out.join("model_index.json"))
        .map_err(|e| file_err(&out.join("model_index.json"), e.to_string()))?;
    let ema = run.config.train.use_ema;
    block_on(write_unet(&out.join("unet"), &run.session, &run.unet, ema))
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| file_err(to, e.to_string()))?;
    let entries = std::fs::read_dir(from).map_err(|e| file_err(from, e.to_string()))?;
    for e in entries.flatten() {
        let (src, dst) = (e.path(), to.join(e.file_name()));
        if src.is_dir() {
            copy_dir(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst).map_err(|e| file_err(&dst, e.to_string()))?;
        }
    }
    Ok(())
}

/// `OUTPUT_DIR/train_log.jsonl`: one JSON object per optimizer step. A
/// resumed run first drops the lines of steps after its checkpoint. The
/// loss plot `OUTPUT_DIR/loss.png` is drawn from it at each checkpoint and
/// at the end.
struct TrainLog {
    file: std::fs::File,
    path: PathBuf,
    /// Every step logged so far (for the plot).
    entries: Vec<StepLog>,
}

impl TrainLog {
    fn open(out_dir: &Path, first_step: u64) -> Result<TrainLog> {
        let path = out_dir.join("train_log.jsonl");
        let entries: Vec<StepLog> = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<StepLog>(l).ok())
            .filter(|e| e.step <= first_step)
            .collect();
        let kept: String = entries
            .iter()
            .filter_map(|e| serde_json::to_string(e).ok())
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&path, kept).map_err(|e| file_err(&path, e.to_string()))?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| file_err(&path, e.to_string()))?;
        Ok(TrainLog {
            file,
            path,
            entries,
        })
    }

    /// `loss.png` beside the log.
    fn plot(&self) -> Result<()> {
        super::plot::write_loss_plot(&self.path.with_file_name("loss.png"), &self.entries)
    }

    fn append(&mut self, entry: &StepLog) -> Result<()> {
        use std::io::Write;
        let line = serde_json::to_string(entry).map_err(|e| file_err(&self.path, e.to_string()))?;
        self.entries.push(entry.clone());
        writeln!(self.file, "{line}").map_err(|e| file_err(&self.path, e.to_string()))
    }
}
