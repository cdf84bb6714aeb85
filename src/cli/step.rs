//! `difftrain step`: one exact training step on given tensors, written out
//! for comparison with a PyTorch step.

use anyhow::Result;
use clap::Args;
use difftrain::io::TensorFile;
use difftrain::train::config::Config;
use difftrain::train::single_step::single_step;
use difftrain::Gpu;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct StepArgs {
    /// The unet/ folder (config.json + weights) or a pipeline folder (its scheduler/ then
    /// gives the noise schedule, before the config's [scheduler] keys).
    #[arg(long)]
    model: PathBuf,
    /// safetensors file: `latents` [B,4,h,w] f32, `noise` [B,4,h,w], `timesteps` int64 [B],
    /// `encoder_hidden_states` [B,S,D].
    #[arg(long)]
    inputs: PathBuf,
    /// The trainer's TOML: [model] prediction_type / sample_target, [train] dream_training,
    /// dream_detail_preservation, learning_rate, adam_*, max_grad_norm, [scheduler] ...
    /// Other keys are allowed and unused.
    #[arg(long)]
    config: PathBuf,
    /// safetensors file to write: `loss`, `noisy_latents` and `target` (after DREAM),
    /// `alphas_cumprod`, `grad_norm` (before clipping) and every updated UNet parameter
    /// under its diffusers name, after one AdamW step from fresh state.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(gpu: &Gpu, a: StepArgs) -> Result<()> {
    let start = Instant::now();
    let config = Config::load(Some(&a.config), &[])?;
    let inputs = TensorFile::read(&a.inputs)?;
    let out = single_step(gpu, &a.model, &inputs, &config)?;
    out.write(&a.out, None)?;
    let scalar = |k: &str| out.get(k).map(|t| t.values[0]).unwrap_or(f32::NAN);
    eprintln!(
        "step: loss {:.6}, grad norm {:.6}; wrote {} tensors to {} in {:.2} s",
        scalar("loss"),
        scalar("grad_norm"),
        out.tensors.len(),
        a.out.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
