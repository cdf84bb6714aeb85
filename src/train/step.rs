//! One training step of the UNet as one graph, in the spec's order: sample
//! timesteps and noise, `add_noise`, the target by prediction type, DREAM's
//! no-grad pass and update, the trainable forward, MSE. The session built
//! from it adds the backward pass, clipping and AdamW, so the whole step is
//! one submission with no readback.

use super::config::SampleTarget;
use super::scheduler::PredictionType;
use crate::dtype::DType;
use crate::error::Result;
use crate::graph::{AdamW, Graph, RunSpec, Session, TensorId};
use crate::models::UNet;
use crate::ops::diffusion::{stream, SnrDivisor};
use crate::ops::optim::GRAD_SCALER;

/// The shapes of one micro-batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepShape {
    pub batch: usize,
    /// Latent height and width.
    pub height: usize,
    pub width: usize,
    /// Text tokens and the encoder's width.
    pub text_len: usize,
    pub text_dim: usize,
}

/// What the step computes.
#[derive(Clone, Debug, PartialEq)]
pub struct StepOptions {
    pub prediction: PredictionType,
    pub sample_target: SampleTarget,
    /// DREAM's detail preservation p, when DREAM is on.
    pub dream: Option<f32>,
    pub noise_offset: f32,
    /// Min-SNR weighting of the loss with this gamma.
    pub snr_gamma: Option<f32>,
    pub num_train_timesteps: usize,
    /// Noise and timesteps are inputs (`difftrain step`) instead of drawn
    /// from the generator.
    pub given_noise: bool,
    /// The UNet's activation dtype (and the text states'). The diffusion
    /// arithmetic (noise, add_noise, targets, DREAM, the loss) stays f32.
    pub dtype: DType,
    /// Recompute the UNet blocks' activations in backward.
    pub gradient_checkpointing: bool,
}

/// The traced step and its named tensors.
pub struct TrainStep {
    pub graph: Graph,
    /// x0: the clean latents `[B, C, h, w]` (input).
    pub latents: TensorId,
    /// encoder_hidden_states `[B, S, D]` (input, in the activation dtype).
    pub context: TensorId,
    /// The random key `[4]` (input; see `ops::diffusion::rng_key`).
    pub key: TensorId,
    /// Noise and timesteps: inputs when given, else drawn.
    pub noise: TensorId,
    pub timesteps: TensorId,
    /// `alphas_cumprod` `[T]` (input, written once).
    pub alphas_cumprod: TensorId,
    /// d(objective)/d(loss) `[1]` (input: 1 / gradient_accumulation_steps).
    pub loss_grad: TensorId,
    /// The UNet's input and regression target after DREAM.
    pub noisy_latents: TensorId,
    pub target: TensorId,
    /// Min-SNR weights `[B]`, when on.
    pub loss_weights: Option<TensorId>,
    pub loss: TensorId,
}

impl TrainStep {
    /// Trace the step for `unet` at `shape`.
    pub fn build(unet: &UNet, shape: StepShape, opts: &StepOptions) -> Result<TrainStep> {
        let mut g = Graph::new();
        if opts.gradient_checkpointing {
            g.enable_checkpointing();
        }
        let c = unet.config.in_channels;
        let x_shape = [shape.batch, c, shape.height, shape.width];
        let latents = g.input("latents", &x_shape, DType::F32);
        let context = g.input(
            "encoder_hidden_states",
            &[shape.batch, shape.text_len, shape.text_dim],
            opts.dtype,
        );
        let key = g.input("rng_key", &[4], DType::F32);
        let alphas_cumprod = g.input("alphas_cumprod", &[opts.num_train_timesteps], DType::F32);
        let loss_grad = g.input("loss_grad", &[1], DType::F32);

        // 2-3. Timesteps and noise.
        let (timesteps, noise) = if opts.given_noise {
            (
                g.input("timesteps", &[shape.batch], DType::F32),
                g.input("noise", &x_shape, DType::F32),
            )
        } else {
            let t = g.random_timesteps(key, shape.batch, opts.num_train_timesteps as u32)?;
            let n = g.random_normal(key, &x_shape, stream::NOISE, opts.noise_offset)?;
            (t, n)
        };
        // 4. xt = scheduler.add_noise(x0, noise, t).
        let mut xt = g.add_noise(latents, noise, timesteps, alphas_cumprod)?;
        // 6. The target by prediction type.
        let mut target = match (opts.prediction, opts.sample_target) {
            (PredictionType::Epsilon, _) => noise,
            (PredictionType::VPrediction, _) => {
                g.get_velocity(latents, noise, timesteps, alphas_cumprod)?
            }
            (PredictionType::Sample, SampleTarget::X0) => latents,
            (PredictionType::Sample, SampleTarget::Xt) => xt,
        };
        // The UNet in the activation dtype, its prediction back in f32.
        let model = |g: &mut Graph, xt: TensorId| -> Result<TensorId> {
            let x = g.cast(xt, opts.dtype);
            let pred = unet.forward(g, x, timesteps, context)?;
            Ok(g.cast(pred, DType::F32))
        };
        // 7. DREAM: a no-grad prediction on xt, then the updated xt and target.
        if let Some(detail) = opts.dream {
            let pred = model(&mut g, xt)?;
            (xt, target) = g.dream_update(
                xt,
                target,
                noise,
                pred,
                timesteps,
                alphas_cumprod,
                opts.prediction == PredictionType::VPrediction,
                detail,
            )?;
        }
        // 8-9. pred = model(xt, t, cond); loss = mse(pred, target), with
        // Min-SNR each sample's error weighted by min(snr, gamma) / divisor.
        let pred = model(&mut g, xt)?;
        let loss_weights = match opts.snr_gamma {
            Some(gamma) => {
                let divisor = match opts.prediction {
                    PredictionType::Epsilon => SnrDivisor::Snr,
                    PredictionType::VPrediction => SnrDivisor::SnrPlusOne,
                    PredictionType::Sample => SnrDivisor::One,
                };
                Some(g.min_snr_weights(timesteps, alphas_cumprod, gamma, divisor)?)
            }
            None => None,
        };
        let loss = match loss_weights {
            Some(w) => g.weighted_mse_loss(pred, target, w)?,
            None => g.mse_loss(pred, target)?,
        };
        Ok(TrainStep {
            graph: g,
            latents,
            context,
            key,
            noise,
            timesteps,
            alphas_cumprod,
            loss_grad,
            noisy_latents: xt,
            target,
            loss_weights,
            loss,
        })
    }

    /// Write d(objective)/d(loss) for a session of this step: 1 / `accum`
    /// (gradient accumulation averages), times the loss scale in fp16 (the
    /// session's [`GRAD_SCALER`] state; the GPU keeps it current after that).
    pub async fn write_loss_grad(s: &Session, loss_grad: TensorId, accum: usize) -> Result<()> {
        let scale = if s.state_labels(GRAD_SCALER).is_empty() {
            1.0
        } else {
            s.read_state(GRAD_SCALER).await?[0]
        };
        s.write(loss_grad, &[scale / accum as f32])
    }

    /// Step 10: backward from the loss, then AdamW (after clipping) and,
    /// with `ema`, the EMA update. With `accumulate`, parameter gradients
    /// add up over micro-steps.
    pub fn run_spec(&self, optimizer: AdamW, accumulate: bool, ema: bool) -> RunSpec {
        let mut outputs = vec![self.loss, self.noisy_latents, self.target, self.timesteps];
        outputs.extend(self.loss_weights);
        RunSpec {
            outputs,
            seeds: vec![(self.loss, self.loss_grad)],
            optimizer: Some(optimizer),
            accumulate_grads: accumulate,
            ema,
            ..Default::default()
        }
    }
}
