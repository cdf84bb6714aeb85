//! The held-out loss (`train.heldout_loss_steps`): the plain denoising loss
//! of the current weights on a fixed set of examples, timesteps and noise,
//! so that runs (plain training against DREAM, one precision against
//! another) compare on one yardstick whatever their training objective.
//!
//! The examples are built-in examples that the training set does not
//! contain (another generator seed), or, for a folder dataset, its first
//! images. Each example gets its own timestep, evenly spread over
//! [0, num_train_timesteps), and noise from a fixed key; the loss is the
//! MSE to the prediction type's target without DREAM or Min-SNR weighting.

use super::data::{builtin_caption, builtin_render, Dataset};
use super::encoders::Encoders;
use super::step::{StepOptions, StepShape, TrainStep};
use crate::error::{Error, Result};
use crate::graph::{RunSpec, Session, TensorId};
use crate::models::{PipelineDir, UNet};
use crate::ops::diffusion::{cpu, rng_key, stream};
use crate::Gpu;
use std::sync::Arc;

/// Mixed into the seed of every held-out draw, apart from training's.
const HELDOUT_SEED: u64 = 0x6865_6c64_6f75_7400;

/// One micro-batch of held-out examples, ready on the host.
struct Chunk {
    latents: Vec<f32>,
    context: Vec<f32>,
    timesteps: Vec<f32>,
    noise: Vec<f32>,
}

/// A no-grad session of the step on the held-out set.
pub struct HeldOut {
    session: Session,
    step: TrainStep,
    chunks: Vec<Chunk>,
    /// (held-out parameter, training parameter) pairs, by name.
    params: Vec<(TensorId, TensorId)>,
}

/// The held-out examples' images `[n, 3, res, res]` and captions.
fn examples(dataset: &Dataset, n: usize, res: usize) -> Result<(Vec<f32>, Vec<String>)> {
    let (mut images, mut captions) = (Vec::new(), Vec::new());
    if dataset.is_builtin() {
        for i in 0..n {
            images.extend(builtin_render(HELDOUT_SEED, i, res));
            captions.push(builtin_caption(HELDOUT_SEED, i));
        }
    } else {
        for i in 0..n.min(dataset.len()) {
            images.extend(dataset.load(i, 0)?);
            captions.push(dataset.caption(i).to_string());
        }
    }
    Ok((images, captions))
}

impl HeldOut {
    /// `n` held-out examples (rounded down to whole micro-batches of
    /// `shape.batch`), encoded once by the run's frozen encoders.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn new(
        gpu: &Gpu,
        unet: &UNet,
        shape: StepShape,
        opts: &StepOptions,
        dataset: &Dataset,
        n: usize,
        seed: u64,
        alphas_cumprod: &[f32],
        train: &Session,
        (encoders, pipeline): (&mut Encoders, &PipelineDir),
    ) -> Result<HeldOut> {
        let res = dataset.resolution();
        let (images, captions) = examples(dataset, n, res)?;
        let b = shape.batch;
        let count = captions.len() / b;
        if count == 0 {
            return Err(Error::Config {
                path: "config".into(),
                field: "train.heldout_examples".into(),
                msg: format!(
                    "{} held-out examples make no micro-batch of {b}",
                    captions.len()
                ),
            });
        }
        let plain = StepOptions {
            dream: None,
            snr_gamma: None,
            noise_offset: 0.0,
            given_noise: true,
            ..opts.clone()
        };
        let step = TrainStep::build(unet, shape, &plain)?;
        let session = Session::new(
            gpu,
            Arc::new(step.graph.clone()),
            RunSpec::no_grad(vec![step.loss]),
        )?;
        session.write(step.alphas_cumprod, alphas_cumprod)?;
        let per_image = images.len() / captions.len();
        let latent_numel = shape.batch * unet.config.in_channels * shape.height * shape.width;
        let total = count * b;
        let t = plain.num_train_timesteps as f64;
        let mut chunks = Vec::with_capacity(count);
        for c in 0..count {
            let rows = c * b..(c + 1) * b;
            let key = rng_key(seed ^ HELDOUT_SEED, c as u64);
            let (latents, context) = encoders
                .encode(
                    pipeline,
                    &images[rows.start * per_image..rows.end * per_image],
                    &captions[rows.clone()],
                    key,
                )
                .await?;
            let timesteps = rows
                .map(|j| ((j as f64 + 0.5) * t / total as f64).floor() as f32)
                .collect();
            let noise = cpu::normals(seed ^ HELDOUT_SEED, c as u64, stream::NOISE, latent_numel)
                .into_iter()
                .map(|v| v as f32)
                .collect();
            chunks.push(Chunk {
                latents,
                context,
                timesteps,
                noise,
            });
        }
        let g = &step.graph;
        let params = g
            .params()
            .into_iter()
            .map(|p| {
                let name = &g.desc(p).name;
                let q = train.graph.find(name).ok_or_else(|| Error::Tensor {
                    name: name.clone(),
                    msg: "not a parameter of the training step".into(),
                })?;
                Ok((p, q))
            })
            .collect::<Result<_>>()?;
        Ok(HeldOut {
            session,
            step,
            chunks,
            params,
        })
    }

    /// The mean loss of `train`'s current weights over the held-out set.
    pub async fn loss(&mut self, train: &Session) -> Result<f32> {
        let mut cmd = train.gpu.encoder("held-out weights");
        for &(p, q) in &self.params {
            train.record_copy(&mut cmd, q, &self.session, p)?;
        }
        train.gpu.queue.submit([cmd.finish()]);
        let mut sum = 0.0;
        for c in &self.chunks {
            let (s, st) = (&mut self.session, &self.step);
            s.write(st.latents, &c.latents)?;
            s.write(st.context, &c.context)?;
            s.write(st.timesteps, &c.timesteps)?;
            s.write(st.noise, &c.noise)?;
            s.step()?;
            sum += s.read(st.loss).await?[0];
        }
        Ok(sum / self.chunks.len() as f32)
    }
}
