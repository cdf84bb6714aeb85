//! The training loop. Per micro-batch, in the spec's order:
//!
//! - step 1: encode the images to latents with the frozen VAE (its own no-grad session);
//! - steps 2-4: sample timesteps and noise, add_noise (inside the UNet's step graph);
//! - step 5: encode the captions with the frozen CLIP text encoder (its own session);
//! - steps 6-10: target, DREAM, forward, MSE, backward, clipping + AdamW (the step graph).
//!
//! The encoders' outputs reach the UNet's session by GPU copies; the loss
//! and gradient norm are read back after the step, for the log. What the
//! caller shows (progress bar, page) comes through [`Event`]s.

use super::checkpoint::{self, TrainerState};
use super::config::{Config, Precision, ValidationScheduler};
use super::data::{batches_per_epoch, Dataset, Loader, Position};
use super::encoders::{Caches, Encoders};
use super::heldout::HeldOut;
use super::single_step::{adamw, noise_schedule, step_options};
use super::step::{StepShape, TrainStep};
use crate::error::{file_err, Error, Result};
use crate::graph::Session;
use crate::models::init::Component;
use crate::models::weights::{load_params, read_component_weights, write_init_params};
use crate::models::{PipelineDir, UNet};
use crate::ops::diffusion::rng_key;
use crate::ops::optim::{ADAMW_CLIP, EMA_ONE_MINUS_DECAY, GRAD_SCALER};
use crate::sample::schedule::SamplerKind;
use crate::sample::{pipeline_sampler, sample, write_grid, SampleRequest};
use crate::Gpu;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// One optimizer step's figures (a line of `train_log.jsonl`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepLog {
    pub step: u64,
    pub epoch: u64,
    /// Mean loss over the step's micro-batches.
    pub loss: f32,
    pub lr: f32,
    /// Global gradient norm before clipping (inf or NaN on a skipped step).
    pub grad_norm: f32,
    pub images_per_s: f64,
    pub elapsed_s: f64,
    /// fp16: the loss scale this step ran with, and the steps skipped for
    /// inf/NaN gradients so far (all runs of this output folder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped_steps: Option<u64>,
    /// The held-out loss after this step, at `train.heldout_loss_steps`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heldout_loss: Option<f32>,
}

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

/// The model to train: a local pipeline folder or the built-in one, and
/// the UNet (the pipeline's, or a fresh one from `model.unet_config`).
fn open_model(config: &Config) -> Result<(PipelineDir, UNet, Option<PathBuf>)> {
    let root = match &config.model.pretrained_model_name_or_path {
        Some(p) => PathBuf::from(p),
        None => super::builtin::pipeline_dir()?,
    };
    let pipeline = PipelineDir::open(&root)?;
    match &config.model.unet_config {
        Some(path) => Ok((pipeline, UNet::from_config_file(path)?, Some(path.clone()))),
        None => {
            let unet = pipeline.unet.clone();
            Ok((pipeline, unet, None))
        }
    }
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
    let seed = t.seed.expect("the caller resolves the seed");
    let out_dir = t.output_dir.clone();
    std::fs::create_dir_all(&out_dir).map_err(|e| file_err(&out_dir, e.to_string()))?;

    // Model, schedule and data.
    let (pipeline, unet, fresh_unet) = open_model(config)?;
    let schedule = noise_schedule(&pipeline.root, config)?;
    let opts = step_options(config, &schedule, false)?;
    let data_seed = if config.data.train_data_dir.is_some() {
        seed
    } else {
        0
    };
    let mut dataset = Dataset::open(&config.data, data_seed)?;
    if let Some(n) = config.data.max_train_samples {
        dataset.select(n, seed);
    }
    let dataset = Arc::new(dataset);
    let batch = t.train_batch_size;
    let accum = t.gradient_accumulation_steps;
    let per_epoch = batches_per_epoch(dataset.len(), batch);
    if per_epoch == 0 {
        return Err(Error::Config {
            path: "config".into(),
            field: "train.train_batch_size".into(),
            msg: format!(
                "{batch} is more than the {} examples of {}",
                dataset.len(),
                dataset.describe()
            ),
        });
    }
    let updates_per_epoch = per_epoch.div_ceil(accum) as u64;
    let total = t
        .max_train_steps
        .unwrap_or(t.num_train_epochs * updates_per_epoch);
    let res = config.data.resolution;
    let f = pipeline.vae.downscale();
    let levels = 1 << (unet.layout.channels.len() - 1);
    if !res.is_multiple_of(f * levels) {
        return Err(Error::Config {
            path: "config".into(),
            field: "data.resolution".into(),
            msg: format!(
                "{res} must be a multiple of {} (the VAE's downscale {f} times the UNet's {levels})",
                f * levels
            ),
        });
    }
    let base_lr = if t.scale_lr {
        t.learning_rate * (accum * batch) as f32
    } else {
        t.learning_rate
    };

    // Sessions: the encoders, and the UNet's whole training step.
    let shape = StepShape {
        batch,
        height: res / f,
        width: res / f,
        text_len: pipeline.tokenizer.max_length(),
        text_dim: pipeline.text_encoder.config.hidden_size,
    };
    let step_graph = TrainStep::build(&unet, shape, &opts)?;
    let ema = t.ema();
    let spec = step_graph.run_spec(adamw(config, base_lr), accum > 1, ema.is_some());
    let mut frozen = Encoders::new(gpu, &pipeline, batch, res, opts.dtype)?;
    let mut caches = Caches::open(gpu, config, &pipeline, opts.dtype, seed)?;
    let TrainStep {
        graph,
        latents,
        context,
        key,
        alphas_cumprod,
        loss_grad,
        loss,
        ..
    } = step_graph;
    let mut s = Session::new(gpu, Arc::new(graph), spec)?;
    s.write(alphas_cumprod, &schedule.alphas_cumprod())?;
    let mut heldout = match t.heldout_loss_steps {
        0 => None,
        _ => Some(HeldOut::new(
            gpu,
            &unet,
            shape,
            &opts,
            &dataset,
            t.heldout_examples,
            seed,
            &schedule.alphas_cumprod(),
            &s,
            &mut |images, captions, key| frozen.encode(&pipeline, images, captions, key),
        )?),
    };

    // Fresh weights or a checkpoint.
    let mut state = TrainerState {
        global_step: 0,
        micro_step: 0,
        position: Position::default(),
        seed,
        lr_scheduler: t.lr_scheduler,
        learning_rate: base_lr,
        lr_warmup_steps: t.lr_warmup_steps,
        max_train_steps: total,
        images_skipped: 0,
        elapsed_s: 0.0,
    };
    match resume_dir(config, &out_dir, on_event)? {
        Some(dir) => {
            state = checkpoint::load(&dir, &s, &unet)?;
            on_event(Event::Note(format!(
                "resumed from {} (step {})",
                dir.display(),
                state.global_step
            )));
        }
        None => match &fresh_unet {
            // The step graph's parameters are the UNet's, in its order, so
            // they initialize as `difftrain init unet` would.
            Some(_) => write_init_params(&s, seed)?,
            None => {
                let w = read_component_weights(&pipeline.root.join("unet"), Component::Unet)?;
                load_params(&s, &w)?;
            }
        },
    }
    TrainStep::write_loss_grad(&s, loss_grad, accum)?;
    let fp16 = t.precision == Precision::Fp16;
    // fp16: the loss scale the next step runs with (the GPU updates it).
    let mut loss_scale = if fp16 {
        Some(s.read_state_blocking(GRAD_SCALER)?[0])
    } else {
        None
    };
    if ema.is_some() && state.global_step == 0 {
        checkpoint::reset_ema(&s)?;
    }
    state.max_train_steps = total;
    let first_step = state.global_step;
    let mut log = TrainLog::open(&out_dir, first_step)?;
    on_event(Event::Start {
        first_step,
        total_steps: total,
        examples: dataset.len(),
        what: format!(
            "{} on {}, batch {batch} x {accum} accumulation, {} prediction{}",
            match &config.model.pretrained_model_name_or_path {
                Some(p) => p.clone(),
                None => "the built-in model".into(),
            },
            dataset.describe(),
            opts.prediction.name(),
            opts.dream
                .map(|p| format!(", DREAM p = {p}"))
                .unwrap_or_default()
        ),
    });

    let mut loader = Loader::new(dataset.clone(), data_seed, batch, state.position, 4);
    let config_toml = config.to_toml();
    let run_start = Instant::now();
    let elapsed_before = state.elapsed_s;
    let (mut first_loss, mut last_loss) = (None, None);
    let mut interrupted = false;
    while state.global_step < total {
        if stop.load(Ordering::SeqCst) {
            interrupted = true;
            break;
        }
        let step_start = Instant::now();
        let lr = t
            .lr_scheduler
            .lr(base_lr, state.global_step, t.lr_warmup_steps, total);
        s.set_lr(lr);
        let mut loss_sum = 0.0;
        let mut epoch = state.position.epoch;
        for micro in 0..accum {
            let b = loader.next()?;
            for (path, why) in &b.skipped {
                state.images_skipped += 1;
                on_event(Event::Skipped(path, why));
            }
            epoch = b.epoch;
            // Writes first; then one submission runs, in the spec's order:
            // 1. latents from the VAE (latent sample from the generator),
            // 5. text states from CLIP (diffusers' proportion_empty_prompts),
            // 2-4, 6-10 the step graph. Cached encoder outputs are written
            // instead of running the encoder.
            let ids = tokenize(
                &pipeline,
                &b.captions,
                t.proportion_empty_prompts,
                seed,
                state.micro_step,
            )?;
            let cached = match &mut caches {
                Some(c) => (c.latents(&b.images, batch, seed)?, c.text(&ids, batch)?),
                None => (None, None),
            };
            let mut cmd = gpu.encoder("train step");
            let vae_key = rng_key(seed, state.micro_step);
            let inputs = (latents, context);
            frozen.record(&mut cmd, &s, inputs, &b.images, &ids, vae_key, cached)?;
            s.write(key, &rng_key(seed, state.micro_step))?;
            if let Some(ema) = &ema {
                let decay = ema.decay_at(state.global_step + 1);
                s.write_state(EMA_ONE_MINUS_DECAY, &[(1.0 - decay) as f32])?;
            }
            s.record_step(&mut cmd, micro + 1 == accum)?;
            gpu.queue.submit([cmd.finish()]);
            loss_sum += s.read_blocking(loss)?[0];
            state.micro_step += 1;
            state.position = b.next;
        }
        state.global_step += 1;
        let grad_norm = s.read_state_blocking(ADAMW_CLIP)?[1];
        // The scaler after the step: [scale, tracker, skipped, 0].
        let scaler = if fp16 {
            Some(s.read_state_blocking(GRAD_SCALER)?)
        } else {
            None
        };
        let scale_used = std::mem::replace(&mut loss_scale, scaler.as_ref().map(|v| v[0]));
        let secs = step_start.elapsed().as_secs_f64();
        state.elapsed_s = elapsed_before + run_start.elapsed().as_secs_f64();
        let entry = StepLog {
            step: state.global_step,
            epoch,
            loss: loss_sum / accum as f32,
            lr,
            grad_norm,
            images_per_s: (batch * accum) as f64 / secs,
            elapsed_s: state.elapsed_s,
            loss_scale: scale_used,
            skipped_steps: scaler.as_ref().map(|v| v[2] as u64),
            heldout_loss: match &mut heldout {
                Some(h)
                    if state.global_step.is_multiple_of(t.heldout_loss_steps)
                        || state.global_step == total =>
                {
                    Some(h.loss(&s)?)
                }
                _ => None,
            },
        };
        // fp16 skips a step whose values overflowed; elsewhere a
        // non-finite loss means divergence.
        if !entry.loss.is_finite() && !fp16 {
            return Err(Error::Gpu(format!(
                "the loss is {} at step {}: training diverged (try a lower train.learning_rate)",
                entry.loss, entry.step
            )));
        }
        first_loss.get_or_insert(entry.loss);
        last_loss = Some(entry.loss);
        log.append(&entry)?;
        on_event(Event::Step(&entry));
        let stopping = stop.load(Ordering::SeqCst);
        if state.global_step.is_multiple_of(t.checkpointing_steps) || stopping {
            let dir = checkpoint::save(
                &out_dir,
                &s,
                &unet,
                &state,
                &config_toml,
                t.checkpoints_total_limit,
            )?;
            on_event(Event::Checkpoint(&dir));
            log.plot()?;
        }
        let v = &config.sample;
        let last = state.global_step == total;
        if !v.validation_prompts.is_empty()
            && (state.global_step.is_multiple_of(v.validation_steps) || last)
        {
            let path = validate(gpu, config, &pipeline, &s, &unet, state.global_step)?;
            on_event(Event::Validation(&path));
        }
    }
    log.plot()?;
    if let Some(c) = &caches {
        on_event(Event::Note(c.summary()));
    }
    if interrupted {
        on_event(Event::Note("stopped on request".into()));
    } else {
        write_pipeline(&out_dir, &pipeline.root, &s, &unet, ema.is_some())?;
    }
    Ok(Summary {
        steps: state.global_step,
        steps_this_run: state.global_step - first_step,
        seconds: run_start.elapsed().as_secs_f64(),
        images_skipped: state.images_skipped,
        first_loss,
        last_loss,
        output_dir: out_dir,
        interrupted,
    })
}

/// `OUTPUT_DIR/samples/step-STEP.png`: a grid of the `[sample]` prompts
/// (a row each) sampled with the current weights (the EMA's when it is on),
/// and `step-STEP.txt` listing the prompts.
fn validate(
    gpu: &Gpu,
    config: &Config,
    pipeline: &PipelineDir,
    s: &Session,
    unet: &UNet,
    step: u64,
) -> Result<PathBuf> {
    let v = &config.sample;
    let dir = config.train.output_dir.join("samples");
    let weights = config.train.output_dir.join(".validation-unet");
    for d in [&dir, &weights] {
        std::fs::create_dir_all(d).map_err(|e| file_err(d, e.to_string()))?;
    }
    checkpoint::write_unet(&weights, s, unet, config.train.use_ema)?;
    let kind = match v.scheduler {
        ValidationScheduler::Ddim => SamplerKind::Ddim,
        ValidationScheduler::Ddpm => SamplerKind::Ddpm,
    };
    let sampler = pipeline_sampler(pipeline, kind)?;
    let req = SampleRequest {
        prompts: v.validation_prompts.clone(),
        negative_prompt: String::new(),
        steps: v.num_inference_steps,
        guidance_scale: v.guidance_scale,
        eta: 0.0,
        seed: config.train.seed.unwrap_or(0),
        num_images: v.num_validation_images,
        height: config.data.resolution,
        width: config.data.resolution,
        latents: None,
    };
    let out = sample(gpu, pipeline, &sampler, &req, Some(&weights))?;
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

/// Token ids `[B, L]` as floats; each caption replaced by the empty prompt
/// with probability `p_empty` (diffusers' `proportion_empty_prompts`), drawn
/// from (seed, micro-step, sample).
fn tokenize(
    p: &PipelineDir,
    captions: &[String],
    p_empty: f32,
    seed: u64,
    micro_step: u64,
) -> Result<Vec<f32>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x656d_7074_795f_7072);
    rng.set_stream(micro_step);
    let prompts: Vec<&str> = captions
        .iter()
        .map(|c| {
            if p_empty > 0.0 && rng.random::<f32>() < p_empty {
                ""
            } else {
                c.as_str()
            }
        })
        .collect();
    p.token_ids(&prompts)
}

/// The final pipeline folder: the trained UNet (its EMA weights with
/// `ema`, as diffusers' script saves them) and the base pipeline's other
/// components.
fn write_pipeline(out: &Path, base: &Path, s: &Session, unet: &UNet, ema: bool) -> Result<()> {
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
    let dir = out.join("unet");
    std::fs::create_dir_all(&dir).map_err(|e| file_err(&dir, e.to_string()))?;
    checkpoint::write_unet(&dir, s, unet, ema)
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
