//! `difftrain bench train`: one whole training step of a UNet as the
//! trainer runs it (noise and timesteps drawn on the GPU, add_noise, DREAM's
//! extra pass when on, forward, MSE, backward, clipping, AdamW) on random
//! latents and text states, timed after warm-up.

use super::scheduler::{NoiseSchedule, PredictionType};
use super::step::{StepOptions, StepShape, TrainStep};
use crate::dtype::DType;
use crate::error::Result;
use crate::graph::{AdamW, LossScaling, Session};
use crate::models::weights::write_init_params;
use crate::models::UNet;
use crate::ops::diffusion::rng_key;
use crate::ops::testing::random;
use crate::Gpu;
use serde::Serialize;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// UNet configs `bench train --preset` names: the built-in model's, the
/// performance issue's small UNet (32/64 channels, 2 layers, heads 2/4,
/// linear projections, 32-wide text states) and SD 1.5's.
pub const PRESETS: [(&str, &str); 3] = [
    ("builtin", include_str!("builtin/unet.json")),
    (
        "small",
        include_str!("../../examples/configs/small_unet.json"),
    ),
    (
        "sd15",
        include_str!("../../examples/configs/sd15_unet.json"),
    ),
];

/// The `config.json` of preset `name`, written under the temporary folder.
pub fn preset_config(name: &str) -> Result<std::path::PathBuf> {
    let (_, json) =
        PRESETS
            .iter()
            .find(|(n, _)| *n == name)
            .ok_or_else(|| crate::error::Error::Config {
                path: "--preset".into(),
                field: "preset".into(),
                msg: format!(
                    "'{name}' is not one of {}",
                    PRESETS.map(|(n, _)| n).join(", ")
                ),
            })?;
    let path = std::env::temp_dir().join(format!("difftrain-bench-{name}-unet.json"));
    std::fs::write(&path, json).map_err(|e| crate::error::file_err(&path, e.to_string()))?;
    Ok(path)
}

/// What to time.
#[derive(Clone, Debug)]
pub struct TrainBench {
    /// The case's name in tables (e.g. the preset or config file).
    pub name: String,
    pub batch: usize,
    /// Latent height and width.
    pub latent: usize,
    /// Text tokens.
    pub text_len: usize,
    pub dtype: DType,
    pub dream: bool,
    /// Recompute the UNet blocks' activations in backward.
    pub gradient_checkpointing: bool,
    /// Timed steps after the cold step and one more warm-up step.
    pub iters: usize,
}

/// What one case measured (`--json` prints it as one object per line).
#[derive(Clone, Debug, Serialize)]
pub struct TrainBenchResult {
    pub name: String,
    pub adapter: String,
    /// The driver and its version (see [`Gpu::driver`]).
    pub driver: String,
    pub batch: usize,
    pub latent: usize,
    pub text_len: usize,
    pub precision: String,
    pub dream: bool,
    pub gradient_checkpointing: bool,
    /// Median of the timed steps, each waited for.
    pub median_ms: f64,
    /// The first step: pipeline compilation on drivers that compile lazily.
    pub first_ms: f64,
    pub images_per_s: f64,
    /// The step's model FLOPs (forward x 3 for forward + backward, plus
    /// DREAM's extra forward; not gradient checkpointing's recomputation)
    /// over the median time.
    pub gflops: f64,
    pub step_gflop: f64,
    pub dispatches: usize,
    pub submissions: usize,
    /// Planned GPU buffers: pooled (activations, gradients of activations,
    /// scratch) plus persistent (weights, their gradients, AdamW moments,
    /// inputs).
    pub peak_bytes: u64,
    pub pooled_bytes: u64,
    pub persistent_bytes: u64,
    /// The process's peak resident memory after this case (everything the
    /// process held, GPU buffers included on a CPU adapter; cumulative over
    /// the cases of one run). None where the platform does not report it.
    pub peak_rss_bytes: Option<u64>,
}

/// A ready session of `case`'s step for the UNet of `config` (a
/// `config.json`), weights and inputs written, and the step's FLOPs.
fn train_session(gpu: &Gpu, config: &Path, case: &TrainBench) -> Result<(Session, TrainStep, f64)> {
    let unet = UNet::from_config_file(config)?;
    let schedule = NoiseSchedule::default();
    let opts = StepOptions {
        prediction: PredictionType::Epsilon,
        sample_target: Default::default(),
        dream: case.dream.then_some(1.0),
        noise_offset: 0.0,
        snr_gamma: None,
        num_train_timesteps: schedule.num_train_timesteps,
        given_noise: false,
        dtype: case.dtype,
        gradient_checkpointing: case.gradient_checkpointing,
    };
    let shape = StepShape {
        batch: case.batch,
        height: case.latent,
        width: case.latent,
        text_len: case.text_len,
        text_dim: unet.layout.down[0].cross_attention_dim,
    };
    let step = TrainStep::build(&unet, shape, &opts)?;
    let forward_flops = step.graph.forward_flops() as f64;
    // Each UNet pass is about half the graph's FLOPs with DREAM; the trained
    // one also runs backward (2x its forward).
    let step_flops = if case.dream { 2.0 } else { 3.0 } * forward_flops;
    let optimizer = AdamW {
        loss_scaling: (case.dtype == DType::F16).then(LossScaling::default),
        ..Default::default()
    };
    let spec = step.run_spec(optimizer, false, false);
    let s = Session::new(gpu, Arc::new(step.graph.clone()), spec)?;
    write_init_params(&s, 0)?;
    let n = |t| s.graph.numel(t);
    s.write(step.latents, &random(n(step.latents), 1))?;
    s.write(step.context, &random(n(step.context), 2))?;
    s.write(step.alphas_cumprod, &schedule.alphas_cumprod())?;
    s.write(step.key, &rng_key(0, 0))?;
    crate::platform::block_on(TrainStep::write_loss_grad(&s, step.loss_grad, 1))?;
    Ok((s, step, step_flops))
}

/// Time `case` for the UNet of `config` (a `config.json`).
pub fn bench_train_step(gpu: &Gpu, config: &Path, case: &TrainBench) -> Result<TrainBenchResult> {
    let (mut s, step, step_flops) = train_session(gpu, config, case)?;
    let mut times = Vec::with_capacity(case.iters);
    for i in 0..case.iters.max(1) + 2 {
        s.write(step.key, &rng_key(0, i as u64))?;
        let t0 = Instant::now();
        s.step()?;
        gpu.wait()?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let first_ms = times[0];
    let mut timed = times[2..].to_vec();
    timed.sort_by(f64::total_cmp);
    let median_ms = timed[timed.len() / 2];
    let st = s.stats();
    Ok(TrainBenchResult {
        name: case.name.clone(),
        adapter: gpu.info.name.clone(),
        driver: gpu.driver(),
        batch: case.batch,
        latent: case.latent,
        text_len: case.text_len,
        precision: case.dtype.to_string(),
        dream: case.dream,
        gradient_checkpointing: case.gradient_checkpointing,
        median_ms,
        first_ms,
        images_per_s: case.batch as f64 / (median_ms * 1e-3),
        gflops: step_flops / (median_ms * 1e-3) / 1e9,
        step_gflop: step_flops / 1e9,
        dispatches: st.dispatches,
        submissions: st.submissions,
        peak_bytes: st.pooled_bytes + st.persistent_bytes,
        pooled_bytes: st.pooled_bytes,
        persistent_bytes: st.persistent_bytes,
        peak_rss_bytes: crate::bench::peak_rss_bytes(),
    })
}

/// Where `case`'s step spends its GPU time, per kernel (`gpu` opened with
/// timestamp queries).
pub fn profile_train_step(
    gpu: &Gpu,
    config: &Path,
    case: &TrainBench,
) -> Result<Vec<crate::bench::ProfileRow>> {
    let (mut s, _, _) = train_session(gpu, config, case)?;
    crate::bench::profile_session(&mut s, case.iters)
}
