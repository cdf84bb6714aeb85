//! One training run: the model, data and sessions a config describes, and
//! its optimizer step. Per micro-batch, in the spec's order:
//!
//! - step 1: encode the images to latents with the frozen VAE (its own no-grad session);
//! - steps 2-4: sample timesteps and noise, add_noise (inside the UNet's step graph);
//! - step 5: encode the captions with the frozen CLIP text encoder (its own session);
//! - steps 6-10: target, DREAM, forward, MSE, backward, clipping + AdamW (the step graph).
//!
//! The encoders' outputs reach the UNet's session by GPU copies; the loss
//! and gradient norm are read back after the step. Readbacks are awaited, so
//! the same run trains natively (`trainer::train` blocks on each step and
//! adds checkpoints, the log and validation grids) and in the browser (the
//! page awaits each step).

use super::config::{Config, Precision, ValidationScheduler};
use super::data::{batches_per_epoch, Dataset, Loader, Position};
use super::ema::EmaSchedule;
use super::encoders::{Caches, Encoders};
use super::heldout::HeldOut;
use super::lr::LrSchedule;
use super::options::{adamw, noise_schedule, step_options};
use super::step::{StepOptions, StepShape, TrainStep};
use crate::error::{file_err, Error, Result};
use crate::graph::{Session, TensorId};
use crate::io::config::write_config;
use crate::io::TensorFile;
use crate::models::init::Component;
use crate::models::weights::{load_params, read_component_weights, read_params, write_init_params};
use crate::models::{PipelineDir, UNet};
use crate::ops::diffusion::rng_key;
use crate::ops::optim::{ema_label, ADAMW_CLIP, EMA_ONE_MINUS_DECAY, GRAD_SCALER};
use crate::platform::Instant;
use crate::sample::schedule::SamplerKind;
use crate::sample::{pipeline_sampler, sample, SampleRequest, Samples};
use crate::Gpu;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

/// Everything besides tensors that a resumed run needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub global_step: u64,
    /// Micro-batches done: the random generator's counter.
    pub micro_step: u64,
    /// Where the data loader continues.
    pub position: Position,
    pub seed: u64,
    pub lr_scheduler: LrSchedule,
    pub learning_rate: f32,
    pub lr_warmup_steps: u64,
    pub max_train_steps: u64,
    pub images_skipped: u64,
    /// Training time so far, seconds.
    pub elapsed_s: f64,
}

/// The step session's host-written inputs and read outputs.
struct StepTensors {
    latents: TensorId,
    context: TensorId,
    key: TensorId,
    loss_grad: TensorId,
    loss: TensorId,
}

/// A run, set up and ready to step.
pub struct Run {
    pub gpu: Gpu,
    pub config: Config,
    pub pipeline: PipelineDir,
    pub unet: UNet,
    pub dataset: Arc<Dataset>,
    /// The UNet's whole training step.
    pub session: Session,
    pub state: TrainerState,
    /// Images that could not be read in the last step: (path, why).
    pub skipped: Vec<(PathBuf, String)>,
    base_lr: f32,
    opts: StepOptions,
    ema: Option<EmaSchedule>,
    frozen: Encoders,
    caches: Option<Caches>,
    heldout: Option<HeldOut>,
    tensors: StepTensors,
    loader: Option<Loader>,
    /// fp16: the loss scale the next step runs with (the GPU updates it).
    loss_scale: Option<f32>,
    started: Option<(Instant, f64)>,
}

impl Run {
    /// Set up the run `config` describes (its seed resolved): the model (a
    /// local pipeline folder or the built-in one), data, sessions, and the
    /// UNet's starting weights (the pipeline's, or fresh ones from
    /// `model.unet_config`). A resumed run then overwrites
    /// [`Run::session`] and [`Run::state`] from its checkpoint; either way
    /// [`Run::start`] comes before the first step.
    pub async fn open(gpu: &Gpu, config: &Config) -> Result<Run> {
        let t = &config.train;
        let seed = t.seed.expect("the caller resolves the seed");
        let (pipeline, unet, fresh_unet) = open_model(config)?;
        let schedule = noise_schedule(&pipeline.root, config)?;
        let opts = step_options(config, &schedule, false)?;
        let mut dataset = Dataset::open(&config.data, data_seed(config))?;
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
        let total = total_steps(config, dataset.len());
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
        let caches = Caches::open(gpu, config, &pipeline, opts.dtype, seed)?;
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
        let session = Session::new(gpu, Arc::new(graph), spec)?;
        session.write(alphas_cumprod, &schedule.alphas_cumprod())?;
        let heldout = match t.heldout_loss_steps {
            0 => None,
            _ => Some(
                HeldOut::new(
                    gpu,
                    &unet,
                    shape,
                    &opts,
                    &dataset,
                    t.heldout_examples,
                    seed,
                    &schedule.alphas_cumprod(),
                    &session,
                    (&mut frozen, &pipeline),
                )
                .await?,
            ),
        };
        match fresh_unet {
            // The step graph's parameters are the UNet's, in its order, so
            // they initialize as `difftrain init unet` would.
            true => write_init_params(&session, seed)?,
            false => {
                let w = read_component_weights(&pipeline.root.join("unet"), Component::Unet)?;
                load_params(&session, &w)?;
            }
        }
        let state = TrainerState {
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
        Ok(Run {
            gpu: gpu.clone(),
            config: config.clone(),
            pipeline,
            unet,
            dataset,
            session,
            state,
            skipped: Vec::new(),
            base_lr,
            opts,
            ema,
            frozen,
            caches,
            heldout,
            tensors: StepTensors {
                latents,
                context,
                key,
                loss_grad,
                loss,
            },
            loader: None,
            loss_scale: None,
            started: None,
        })
    }

    /// Ready the first step, from the weights and state in place now (fresh,
    /// or restored from a checkpoint): the loss gradient, the EMA's start,
    /// and the data loader at the state's position.
    pub async fn start(&mut self) -> Result<()> {
        let t = &self.config.train;
        let s = &self.session;
        TrainStep::write_loss_grad(s, self.tensors.loss_grad, t.gradient_accumulation_steps)
            .await?;
        if t.precision == Precision::Fp16 {
            self.loss_scale = Some(s.read_state(GRAD_SCALER).await?[0]);
        }
        if self.ema.is_some() && self.state.global_step == 0 {
            reset_ema(s).await?;
        }
        self.state.max_train_steps = total_steps(&self.config, self.dataset.len());
        let loader = Loader::new(
            self.dataset.clone(),
            data_seed(&self.config),
            t.train_batch_size,
            self.state.position,
            4,
        );
        self.loader = Some(loader);
        self.started = Some((Instant::now(), self.state.elapsed_s));
        Ok(())
    }

    /// "the built-in model on ..., batch 8 x 1 accumulation, epsilon prediction".
    pub fn describe(&self) -> String {
        let t = &self.config.train;
        format!(
            "{} on {}, batch {} x {} accumulation, {} prediction{}",
            match &self.config.model.pretrained_model_name_or_path {
                Some(p) => p.clone(),
                None => "the built-in model".into(),
            },
            self.dataset.describe(),
            t.train_batch_size,
            t.gradient_accumulation_steps,
            self.opts.prediction.name(),
            (self.opts.dream)
                .map(|p| format!(", DREAM p = {p}"))
                .unwrap_or_default()
        )
    }

    /// One optimizer step (its micro-batches, each in one submission), and
    /// its figures. A non-finite loss outside fp16 is an error: divergence.
    pub async fn step(&mut self) -> Result<StepLog> {
        let step_start = Instant::now();
        let t = &self.config.train;
        let seed = self.state.seed;
        let total = self.state.max_train_steps;
        let batch = t.train_batch_size;
        let accum = t.gradient_accumulation_steps;
        let lr = t.lr_scheduler.lr(
            self.base_lr,
            self.state.global_step,
            t.lr_warmup_steps,
            total,
        );
        let s = &mut self.session;
        s.set_lr(lr);
        let gpu = &self.gpu;
        let x = &self.tensors;
        let loader = self.loader.as_mut().expect("Run::start comes first");
        let mut loss_sum = 0.0;
        let mut epoch = self.state.position.epoch;
        self.skipped.clear();
        for micro in 0..accum {
            let b = loader.next()?;
            self.state.images_skipped += b.skipped.len() as u64;
            self.skipped.extend(b.skipped);
            epoch = b.epoch;
            // Writes first; then one submission runs, in the spec's order:
            // 1. latents from the VAE (latent sample from the generator),
            // 5. text states from CLIP (diffusers' proportion_empty_prompts),
            // 2-4, 6-10 the step graph. Cached encoder outputs are written
            // instead of running the encoder.
            let ids = tokenize(
                &self.pipeline,
                &b.captions,
                t.proportion_empty_prompts,
                seed,
                self.state.micro_step,
            )?;
            let cached = match &mut self.caches {
                Some(c) => (
                    c.latents(&b.images, batch, seed).await?,
                    c.text(&ids, batch).await?,
                ),
                None => (None, None),
            };
            let mut cmd = gpu.encoder("train step");
            let vae_key = rng_key(seed, self.state.micro_step);
            let inputs = (x.latents, x.context);
            (self.frozen).record(&mut cmd, s, inputs, &b.images, &ids, vae_key, cached)?;
            s.write(x.key, &rng_key(seed, self.state.micro_step))?;
            if let Some(ema) = &self.ema {
                let decay = ema.decay_at(self.state.global_step + 1);
                s.write_state(EMA_ONE_MINUS_DECAY, &[(1.0 - decay) as f32])?;
            }
            s.record_step(&mut cmd, micro + 1 == accum)?;
            gpu.queue.submit([cmd.finish()]);
            loss_sum += s.read(x.loss).await?[0];
            self.state.micro_step += 1;
            self.state.position = b.next;
        }
        self.state.global_step += 1;
        let grad_norm = s.read_state(ADAMW_CLIP).await?[1];
        // The scaler after the step: [scale, tracker, skipped, 0].
        let fp16 = t.precision == Precision::Fp16;
        let scaler = match fp16 {
            true => Some(s.read_state(GRAD_SCALER).await?),
            false => None,
        };
        let scale_used = std::mem::replace(&mut self.loss_scale, scaler.as_ref().map(|v| v[0]));
        let secs = step_start.elapsed().as_secs_f64();
        let (run_start, elapsed_before) = self.started.expect("Run::start comes first");
        self.state.elapsed_s = elapsed_before + run_start.elapsed().as_secs_f64();
        let step = self.state.global_step;
        let heldout_loss = match &mut self.heldout {
            Some(h) if step.is_multiple_of(t.heldout_loss_steps) || step == total => {
                Some(h.loss(s).await?)
            }
            _ => None,
        };
        let entry = StepLog {
            step,
            epoch,
            loss: loss_sum / accum as f32,
            lr,
            grad_norm,
            images_per_s: (batch * accum) as f64 / secs,
            elapsed_s: self.state.elapsed_s,
            loss_scale: scale_used,
            skipped_steps: scaler.as_ref().map(|v| v[2] as u64),
            heldout_loss,
        };
        // fp16 skips a step whose values overflowed; elsewhere a
        // non-finite loss means divergence.
        if !entry.loss.is_finite() && !fp16 {
            return Err(Error::Gpu(format!(
                "the loss is {} at step {}: training diverged (try a lower train.learning_rate)",
                entry.loss, entry.step
            )));
        }
        Ok(entry)
    }

    /// "cache: latents 12 encoded, 36 reused; ..." when a cache is on.
    pub fn cache_summary(&self) -> Option<String> {
        self.caches.as_ref().map(Caches::summary)
    }

    /// The `[sample]` section's prompts (or `prompts`) sampled with the
    /// current weights (the EMA's when it is on), as the validation grids
    /// show them: a row of `num_validation_images` per prompt.
    pub async fn validation_samples(&self, prompts: &[String]) -> Result<Samples> {
        let v = &self.config.sample;
        let weights = self.config.train.output_dir.join(".validation-unet");
        write_unet(&weights, &self.session, &self.unet, self.ema.is_some()).await?;
        let kind = match v.scheduler {
            ValidationScheduler::Ddim => SamplerKind::Ddim,
            ValidationScheduler::Ddpm => SamplerKind::Ddpm,
        };
        let sampler = pipeline_sampler(&self.pipeline, kind)?;
        let req = SampleRequest {
            prompts: prompts.to_vec(),
            negative_prompt: String::new(),
            steps: v.num_inference_steps,
            guidance_scale: v.guidance_scale,
            eta: 0.0,
            seed: self.state.seed,
            num_images: v.num_validation_images,
            height: self.config.data.resolution,
            width: self.config.data.resolution,
            latents: None,
        };
        sample(&self.gpu, &self.pipeline, &sampler, &req, Some(&weights)).await
    }
}

/// Optimizer steps the run makes in all: `max_train_steps`, or its epochs'
/// worth of `examples` (whole batches, then accumulated).
fn total_steps(config: &Config, examples: usize) -> u64 {
    let t = &config.train;
    let per_epoch = batches_per_epoch(examples, t.train_batch_size);
    let updates = per_epoch.div_ceil(t.gradient_accumulation_steps) as u64;
    t.max_train_steps.unwrap_or(t.num_train_epochs * updates)
}

/// The data order's seed: the run's for a folder dataset; the built-in one
/// is always drawn with seed 0 (so every run sees the same examples).
fn data_seed(config: &Config) -> u64 {
    match config.data.train_data_dir {
        Some(_) => config.train.seed.expect("the caller resolves the seed"),
        None => 0,
    }
}

/// The model to train: a local pipeline folder or the built-in one, and
/// the UNet (the pipeline's, or a fresh one from `model.unet_config`, then
/// `true`).
fn open_model(config: &Config) -> Result<(PipelineDir, UNet, bool)> {
    let root = match &config.model.pretrained_model_name_or_path {
        Some(p) => PathBuf::from(p),
        None => super::builtin::pipeline_dir()?,
    };
    let pipeline = PipelineDir::open(&root)?;
    match &config.model.unet_config {
        Some(path) => Ok((pipeline, UNet::from_config_file(path)?, true)),
        None => {
            let unet = pipeline.unet.clone();
            Ok((pipeline, unet, false))
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

/// Start the EMA shadows as copies of the parameters (`EMAModel(params)`).
pub async fn reset_ema(session: &Session) -> Result<()> {
    for &p in &session.plan.trained_params {
        let values = session.read(p).await?;
        session.write_state(&ema_label(&session.graph.desc(p).name), &values)?;
    }
    Ok(())
}

/// The UNet's weights as diffusers saves them, named as in its
/// `diffusion_pytorch_model.safetensors`: the trained ones, or with `ema`
/// their EMA shadows.
pub async fn unet_weights(s: &Session, ema: bool) -> Result<TensorFile> {
    let path = Path::new("diffusion_pytorch_model.safetensors");
    let mut weights = read_params(s, path).await?;
    if ema {
        for (name, t) in weights.tensors.iter_mut() {
            t.values = s.read_state(&ema_label(name)).await?;
        }
    }
    Ok(weights)
}

/// The UNet's `config.json` and weights (diffusers layout) into `dir`:
/// the trained weights, or with `ema` their EMA shadows.
pub async fn write_unet(dir: &Path, s: &Session, unet: &UNet, ema: bool) -> Result<()> {
    crate::platform::create_dir_all(dir).map_err(|e| file_err(dir, e.to_string()))?;
    let header = [("_class_name", serde_json::json!("UNet2DConditionModel"))];
    write_config(&dir.join("config.json"), &header, &unet.config)?;
    let path = dir.join("diffusion_pytorch_model.safetensors");
    unet_weights(s, ema).await?.write(&path, None)
}
