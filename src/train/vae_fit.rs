//! `difftrain train-vae`: fit an AutoencoderKL with difftrain itself, the
//! usual objective without the adversarial and perceptual terms: the
//! reconstruction MSE of decode(mean + std * noise) plus a small KL term
//! towards N(0, 1). Made for the built-in demo, whose pictures need a VAE that
//! decodes to something (a random one decodes to noise).
//!
//! At the end the latents' scale is measured over the dataset and written as
//! the config's `scaling_factor` = 1 / std(latents), as Stable Diffusion's
//! 0.18215 was chosen, so the UNet sees latents of unit variance.

use super::data::{DataOptions, Dataset, Loader, Position};
use crate::dtype::DType;
use crate::error::{file_err, Result};
use crate::graph::{AdamW, Graph, RunSpec, Session};
use crate::io::config::write_config;
use crate::io::{StoredDType, TensorFile};
use crate::models::init::Component;
use crate::models::weights::{load_params, read_component_weights, read_params, write_init_params};
use crate::models::Vae;
use crate::ops::diffusion::{rng_key, stream};
use crate::ops::elementwise::Activation;
use crate::Gpu;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What to fit.
#[derive(Clone, Debug)]
pub struct VaeFit {
    /// The VAE's config.json.
    pub config: PathBuf,
    /// Start from these weights (a VAE folder), else a fresh initialization.
    pub init: Option<PathBuf>,
    pub data: DataOptions,
    pub steps: u64,
    pub batch: usize,
    pub learning_rate: f32,
    /// Weight of the mean KL divergence per latent element.
    pub kl_weight: f32,
    pub seed: u64,
}

/// One step's figures.
#[derive(Clone, Copy, Debug)]
pub struct VaeStep {
    pub step: u64,
    pub reconstruction: f32,
    pub kl: f32,
}

/// Fit the VAE and write it to `out` (config.json with the measured
/// `scaling_factor`, weights as the fp16 variant when `fp16`). Returns the
/// last step's figures and the scaling factor.
pub fn fit_vae(
    gpu: &Gpu,
    fit: &VaeFit,
    out: &Path,
    fp16: bool,
    on_step: &mut dyn FnMut(VaeStep),
) -> Result<(VaeStep, f32)> {
    let mut vae = Vae::from_config_file(&fit.config)?;
    let res = fit.data.resolution;
    let b = fit.batch;
    let f = vae.downscale();
    let latent = [b, vae.config.latent_channels, res / f, res / f];

    // loss = mse(decode(mean + std * n), image) + kl_weight * mean(KL),
    // KL = 0.5 (mean^2 + var - 1 - logvar) per latent element (the constant
    // -1 does not change the gradient and is added on the host for the log).
    let mut g = Graph::new();
    g.train_all_modules();
    let image = g.input("image", &[b, 3, res, res], DType::F32);
    let key = g.input("rng_key", &[4], DType::F32);
    let (mean, logvar) = vae.encode(&mut g, image)?;
    let noise = g.random_normal(key, &latent, stream::LATENT, 0.0)?;
    let half = g.scale(logvar, 0.5);
    let std = g.activation(half, Activation::Exp);
    let z = g.mul(std, noise)?;
    let z = g.add(mean, z)?;
    let recon = vae.decode(&mut g, z)?;
    let rec = g.mse_loss(recon, image)?;
    let m2 = g.mul(mean, mean)?;
    let var = g.activation(logvar, Activation::Exp);
    let kl = g.add(m2, var)?;
    let neg_logvar = g.scale(logvar, -1.0);
    let kl = g.add(kl, neg_logvar)?;
    let n: usize = latent.iter().product();
    let kl = g.sum_axes(kl, &[0, 1, 2, 3])?;
    let kl = g.reshape(kl, &[1])?;
    let kl = g.scale(kl, 0.5 / n as f32);
    let weighted = g.scale(kl, fit.kl_weight);
    let loss = g.add(rec, weighted)?;
    let seed = g.input("loss_grad", &[1], DType::F32);
    let spec = RunSpec {
        outputs: vec![rec, kl, mean],
        seeds: vec![(loss, seed)],
        optimizer: Some(AdamW {
            lr: fit.learning_rate,
            weight_decay: 0.0,
            ..Default::default()
        }),
        ..Default::default()
    };
    let graph = Arc::new(g);
    let mut s = Session::new(gpu, graph.clone(), spec)?;
    match &fit.init {
        Some(dir) => load_params(&s, &read_component_weights(dir, Component::Vae)?)?,
        None => write_init_params(&s, fit.seed)?,
    }
    s.write(seed, &[1.0])?;

    let data = Arc::new(Dataset::open(&fit.data, fit.seed)?);
    let mut loader = Loader::new(data.clone(), fit.seed, b, Position::default(), 4);
    let mut last = VaeStep {
        step: 0,
        reconstruction: f32::NAN,
        kl: f32::NAN,
    };
    for step in 1..=fit.steps {
        let batch = loader.next()?;
        s.write(image, &batch.images)?;
        s.write(key, &rng_key(fit.seed, step))?;
        s.step()?;
        last = VaeStep {
            step,
            reconstruction: s.read_blocking(rec)?[0],
            kl: s.read_blocking(kl)?[0] - 0.5,
        };
        on_step(last);
    }

    // scaling_factor = 1 / std of the latent means over one pass of data.
    let mut loader = Loader::new(data.clone(), fit.seed ^ 1, b, Position::default(), 4);
    let (mut sum, mut sum2, mut count) = (0.0f64, 0.0f64, 0usize);
    for _ in 0..(data.len() / b).max(1) {
        s.write(image, &loader.next()?.images)?;
        s.step_accumulate()?;
        for v in s.read_blocking(mean)? {
            sum += v as f64;
            sum2 += (v as f64) * (v as f64);
            count += 1;
        }
    }
    let var = sum2 / count as f64 - (sum / count as f64).powi(2);
    vae.config.scaling_factor = (1.0 / var.sqrt().max(1e-6)) as f32;

    std::fs::create_dir_all(out).map_err(|e| file_err(out, e.to_string()))?;
    let header = [("_class_name", serde_json::json!("AutoencoderKL"))];
    write_config(&out.join("config.json"), &header, &vae.config)?;
    let name = if fp16 {
        "diffusion_pytorch_model.fp16.safetensors"
    } else {
        "diffusion_pytorch_model.safetensors"
    };
    let path = out.join(name);
    let weights: TensorFile = crate::platform::block_on(read_params(&s, &path))?;
    weights.write(&path, fp16.then_some(StoredDType::F16))?;
    Ok((last, vae.config.scaling_factor))
}
