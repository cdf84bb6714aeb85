//! `difftrain train-vae`: fit an AutoencoderKL (reconstruction MSE plus a
//! small KL term) on a dataset, e.g. the VAE of the built-in demo.

use anyhow::Result;
use clap::Args;
use difftrain::train::data::DataOptions;
use difftrain::train::vae_fit::{fit_vae, VaeFit};
use difftrain::Gpu;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct TrainVaeArgs {
    /// The AutoencoderKL config.json (e.g. src/train/builtin/vae.json).
    #[arg(long)]
    config: PathBuf,
    /// Folder to write config.json (with the measured scaling_factor) and the weights into.
    #[arg(long)]
    out: PathBuf,
    /// Start from this VAE folder's weights instead of a fresh initialization.
    #[arg(long)]
    init: Option<PathBuf>,
    /// A folder of captioned images (as `data.train_data_dir`); default: the built-in dataset.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Image size (square).
    #[arg(long, default_value_t = 32)]
    resolution: usize,
    /// Examples of the built-in dataset.
    #[arg(long, default_value_t = 512)]
    builtin_size: usize,
    #[arg(long, default_value_t = 2000)]
    steps: u64,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f32,
    /// Weight of the mean KL divergence per latent element.
    #[arg(long, default_value_t = 1e-4)]
    kl_weight: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write the weights as the .fp16.safetensors variant.
    #[arg(long)]
    fp16: bool,
}

pub fn run(gpu: &Gpu, a: TrainVaeArgs) -> Result<()> {
    let start = Instant::now();
    let fit = VaeFit {
        config: a.config.clone(),
        init: a.init.clone(),
        data: DataOptions {
            train_data_dir: a.data.clone(),
            resolution: a.resolution,
            builtin_size: a.builtin_size,
            center_crop: true,
            ..Default::default()
        },
        steps: a.steps,
        batch: a.batch,
        learning_rate: a.lr,
        kl_weight: a.kl_weight,
        seed: a.seed,
    };
    let bar = ProgressBar::new(a.steps);
    bar.set_style(ProgressStyle::with_template(
        "{bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}",
    )?);
    let (last, scale) = fit_vae(gpu, &fit, &a.out, a.fp16, &mut |s| {
        bar.set_position(s.step);
        bar.set_message(format!(
            "reconstruction {:.5}  kl {:.3}",
            s.reconstruction, s.kl
        ));
    })?;
    bar.finish_and_clear();
    eprintln!(
        "fitted in {:.1} s: reconstruction MSE {:.5}, KL {:.3} per latent; scaling_factor {scale:.5}; wrote {}",
        start.elapsed().as_secs_f64(),
        last.reconstruction,
        last.kl,
        a.out.display()
    );
    Ok(())
}
