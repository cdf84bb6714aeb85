//! What a config makes of the training step: its noise schedule, the step
//! graph's options and the optimizer.

use super::config::{Config, Precision};
use super::scheduler::NoiseSchedule;
use super::step::StepOptions;
use crate::error::{Error, Result};
use crate::graph::{AdamW, LossScaling};
use std::path::Path;

/// The noise schedule of a model folder: the pipeline's
/// `scheduler/scheduler_config.json` when there is one, else
/// `DDPMScheduler()`'s defaults; then the config's `[scheduler]` keys.
pub fn noise_schedule(model_dir: &Path, config: &Config) -> Result<NoiseSchedule> {
    let json = model_dir.join("scheduler").join("scheduler_config.json");
    let base = if crate::platform::is_file(&json) {
        NoiseSchedule::from_diffusers_json(&json)?
    } else {
        NoiseSchedule::default()
    };
    let s = config.scheduler.apply(&base);
    s.check("[scheduler]")?;
    Ok(s)
}

/// AdamW from the config's `[train]` options, at learning rate `lr`: no
/// clipping when max_grad_norm is 0, dynamic loss scaling in fp16.
pub fn adamw(config: &Config, lr: f32) -> AdamW {
    let t = &config.train;
    AdamW {
        lr,
        beta1: t.adam_beta1,
        beta2: t.adam_beta2,
        eps: t.adam_epsilon,
        weight_decay: t.adam_weight_decay,
        max_grad_norm: (t.max_grad_norm > 0.0).then_some(t.max_grad_norm),
        loss_scaling: (t.precision == Precision::Fp16).then(LossScaling::default),
    }
}

/// The step options a config asks for, with the schedule's prediction type
/// when `[model]` sets none. DREAM with a `sample` prediction is an error
/// naming both keys.
pub fn step_options(
    config: &Config,
    schedule: &NoiseSchedule,
    given_noise: bool,
) -> Result<StepOptions> {
    let prediction = config
        .model
        .prediction_type
        .unwrap_or(schedule.prediction_type);
    if config.train.dream_training && prediction == super::scheduler::PredictionType::Sample {
        return Err(Error::Config {
            path: "config".into(),
            field: "train.dream_training".into(),
            msg: "DREAM is defined for epsilon and v_prediction; model.prediction_type \
                  (or the scheduler's) is \"sample\""
                .into(),
        });
    }
    Ok(StepOptions {
        prediction,
        sample_target: config.model.sample_target,
        dream: config
            .train
            .dream_training
            .then_some(config.train.dream_detail_preservation),
        noise_offset: config.train.noise_offset,
        snr_gamma: config.train.snr_gamma,
        num_train_timesteps: schedule.num_train_timesteps,
        given_noise,
        dtype: config.train.precision.dtype(),
        gradient_checkpointing: config.train.gradient_checkpointing,
    })
}
