//! `difftrain step`: one exact training step on given tensors (latents,
//! noise, timesteps, encoder_hidden_states), to check the trainer's step
//! against PyTorch: the same graph the trainer runs, with noise and
//! timesteps as inputs instead of drawn, from fresh AdamW state.

use super::config::Config;
use super::options::{adamw, noise_schedule, step_options};
use super::step::{StepShape, TrainStep};
use crate::error::{Error, Result};
use crate::graph::Session;
use crate::io::{HostTensor, TensorFile};
use crate::models::init::Component;
use crate::models::pipeline::component_dir;
use crate::models::weights::{load_params, read_component_weights};
use crate::models::UNet;
use crate::Gpu;
use std::path::Path;
use std::sync::Arc;

/// Run one step of the UNet in `model_dir` (a `unet/` folder or a pipeline)
/// on `inputs`. Returns `loss`, `noisy_latents`, `target`, `alphas_cumprod`,
/// `grad_norm`, with Min-SNR `mse_loss_weights`, and every updated parameter
/// under its diffusers name.
pub fn single_step(
    gpu: &Gpu,
    model_dir: &Path,
    inputs: &TensorFile,
    config: &Config,
) -> Result<TensorFile> {
    let unet_dir = component_dir(model_dir, "unet");
    let unet = UNet::from_config_file(&unet_dir.join("config.json"))?;
    let weights = read_component_weights(&unet_dir, Component::Unet)?;
    let schedule = noise_schedule(model_dir, config)?;
    let opts = step_options(config, &schedule, true)?;

    let cin = unet.config.in_channels;
    let latents = inputs.get_shaped("latents", &[None, Some(cin), None, None])?;
    let [b, _, h, w] = latents.shape[..] else {
        unreachable!("checked rank")
    };
    let noise = inputs.get_shaped("noise", &[Some(b), Some(cin), Some(h), Some(w)])?;
    let timesteps = inputs.get_shaped("timesteps", &[Some(b)])?;
    let cross = unet.layout.down[0].cross_attention_dim;
    let context = inputs.get_shaped("encoder_hidden_states", &[Some(b), None, Some(cross)])?;
    let t_max = schedule.num_train_timesteps as f32;
    if let Some(t) = timesteps
        .values
        .iter()
        .find(|t| !(0.0..t_max).contains(*t) || t.fract() != 0.0)
    {
        return Err(Error::Tensor {
            name: "timesteps".into(),
            msg: format!(
                "in {}: {t} is not an integer in [0, {})",
                inputs.path.display(),
                schedule.num_train_timesteps
            ),
        });
    }

    let shape = StepShape {
        batch: b,
        height: h,
        width: w,
        text_len: context.shape[1],
        text_dim: cross,
    };
    let step = TrainStep::build(&unet, shape, &opts)?;
    let spec = step.run_spec(adamw(config, config.train.learning_rate), false, false);
    let (loss, xt, target, loss_weights) = (
        step.loss,
        step.noisy_latents,
        step.target,
        step.loss_weights,
    );
    let graph = Arc::new(step.graph);
    let mut s = Session::new(gpu, graph.clone(), spec)?;
    load_params(&s, &weights)?;
    let alphas_cumprod = schedule.alphas_cumprod();
    s.write(step.latents, &latents.values)?;
    s.write(step.noise, &noise.values)?;
    s.write(step.timesteps, &timesteps.values)?;
    s.write(step.context, &context.values)?;
    s.write(step.alphas_cumprod, &alphas_cumprod)?;
    crate::platform::block_on(TrainStep::write_loss_grad(&s, step.loss_grad, 1))?;
    s.step()?;

    let mut out = TensorFile::new(Path::new("step"));
    let read =
        |t| -> Result<HostTensor> { Ok(HostTensor::f32(graph.shape(t), s.read_blocking(t)?)) };
    out.insert("loss", HostTensor::f32(&[], s.read_blocking(loss)?));
    out.insert("noisy_latents", read(xt)?);
    out.insert("target", read(target)?);
    if let Some(w) = loss_weights {
        out.insert("mse_loss_weights", read(w)?);
    }
    let n = alphas_cumprod.len();
    out.insert("alphas_cumprod", HostTensor::f32(&[n], alphas_cumprod));
    let clip = s.read_state_blocking("adamw.clip")?;
    out.insert("grad_norm", HostTensor::f32(&[], vec![clip[1]]));
    for p in graph.params() {
        out.insert(&graph.desc(p).name, read(p)?);
    }
    Ok(out)
}
