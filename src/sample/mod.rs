//! Sampling: text to images with DDIM or DDPM and classifier-free guidance,
//! as diffusers' `StableDiffusionPipeline` does it: the prompts (and the
//! negative prompt) through CLIP once, then per inference step one UNet pass
//! on [unconditional; conditional] latents and the scheduler step, all on
//! the GPU (one submission per step, no readback), then the VAE decode.

pub mod schedule;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::graph::{Graph, RunSpec, Session};
use crate::io::HostTensor;
use crate::models::init::Component;
use crate::models::weights::{load_params, read_component_weights};
use crate::models::PipelineDir;
use crate::ops::diffusion::{cpu, rng_key, stream};
use crate::train::scheduler::PredictionType;
use crate::Gpu;
use schedule::{Sampler, SamplerKind};
use std::sync::Arc;

/// What to sample.
#[derive(Clone, Debug)]
pub struct SampleRequest {
    pub prompts: Vec<String>,
    /// The unconditional branch's prompt ("" when none is given).
    pub negative_prompt: String,
    pub steps: usize,
    pub guidance_scale: f32,
    /// DDIM's eta (0: deterministic).
    pub eta: f64,
    pub seed: u64,
    /// Images per prompt.
    pub num_images: usize,
    /// Image size in pixels (multiples of the VAE's downscale times the UNet's).
    pub height: usize,
    pub width: usize,
    /// Initial latents `[N, C, h, w]` (the pipeline's `latents=`), else drawn.
    pub latents: Option<Vec<f32>>,
}

/// The result: final latents `[N, C, h, w]` and images `[N, 3, H, W]` in
/// [0, 1], prompt-major (all images of prompt 0 first).
pub struct Samples {
    pub latents: HostTensor,
    pub images: HostTensor,
}

/// The sampler `kind` as diffusers' `from_config` builds it from the
/// pipeline's scheduler config.
pub fn pipeline_sampler(p: &PipelineDir, kind: SamplerKind) -> Result<Sampler> {
    Sampler::from_config(
        kind,
        &p.root.join("scheduler").join("scheduler_config.json"),
    )
}

/// Sample from the pipeline in `p` with `sampler`; the UNet's weights
/// from `unet_dir` when given (validation during training), else the
/// pipeline's `unet/`.
pub async fn sample(
    gpu: &Gpu,
    p: &PipelineDir,
    sampler: &Sampler,
    req: &SampleRequest,
    unet_dir: Option<&std::path::Path>,
) -> Result<Samples> {
    let timesteps = sampler.timesteps(req.steps)?;
    let n = req.prompts.len() * req.num_images;
    let f = p.vae.downscale();
    let levels = 1 << (p.unet.layout.channels.len() - 1);
    if n == 0 || !req.height.is_multiple_of(f * levels) || !req.width.is_multiple_of(f * levels) {
        return Err(Error::Config {
            path: "sampling".into(),
            field: "height/width".into(),
            msg: format!(
                "{}x{} pixels for {n} images: sizes must be multiples of {} and there must be a prompt",
                req.height,
                req.width,
                f * levels
            ),
        });
    }
    let c = p.unet.config.in_channels;
    let (h, w) = (req.height / f, req.width / f);
    let latent_shape = [n, c, h, w];
    let guided = req.guidance_scale > 1.0;
    let rows = if guided { 2 * n } else { n };

    // The text states: [negative x n; prompts x n] (or the prompts alone).
    let mut texts: Vec<&str> = Vec::with_capacity(rows);
    if guided {
        texts.extend(std::iter::repeat_n(req.negative_prompt.as_str(), n));
    }
    for prompt in &req.prompts {
        texts.extend(std::iter::repeat_n(prompt.as_str(), req.num_images));
    }
    let len = p.tokenizer.max_length();
    let (mut clip, ids_in, hidden) = p.text_encoder_session(gpu, rows, DType::F32)?;
    clip.write(ids_in, &p.token_ids(&texts)?)?;

    // One denoising step: UNet on [x; x], guidance and the scheduler step.
    let mut g = Graph::new();
    let x = g.input("latents", &latent_shape, DType::F32);
    let t = g.input("timesteps", &[rows], DType::F32);
    let ctx = g.input(
        "encoder_hidden_states",
        &[rows, len, p.text_encoder.config.hidden_size],
        DType::F32,
    );
    let coef = g.input("coef", &[8], DType::F32);
    let key = g.input("rng_key", &[4], DType::F32);
    let x_in = if guided { g.concat(&[x, x], 0)? } else { x };
    let out = p.unet.forward(&mut g, x_in, t, ctx)?;
    let prediction = match sampler.prediction() {
        PredictionType::Epsilon => 0,
        PredictionType::VPrediction => 1,
        PredictionType::Sample => 2,
    };
    let x_prev = g.scheduler_step(x, out, coef, key, guided, prediction)?;
    let mut unet = match unet_dir {
        Some(dir) => {
            let s = Session::new(gpu, Arc::new(g), RunSpec::no_grad(vec![x_prev, x]))?;
            load_params(&s, &read_component_weights(dir, Component::Unet)?)?;
            s
        }
        None => p.session(gpu, g, vec![x_prev, x], Component::Unet)?,
    };

    let start = match &req.latents {
        Some(v) if v.len() == n * c * h * w => v.clone(),
        Some(v) => {
            return Err(Error::Tensor {
                name: "latents".into(),
                msg: format!("{} values given, {latent_shape:?} needed", v.len()),
            })
        }
        // init_noise_sigma is 1 for DDIM and DDPM.
        None => cpu::normals(req.seed, u64::MAX, stream::SAMPLING, n * c * h * w)
            .into_iter()
            .map(|v| v as f32)
            .collect(),
    };
    unet.write(x, &start)?;
    let mut cmd = gpu.encoder("text");
    clip.record_step(&mut cmd, false)?;
    clip.record_copy(&mut cmd, hidden, &unet, ctx)?;
    gpu.queue.submit([cmd.finish()]);
    for (k, &step_t) in timesteps.iter().enumerate() {
        unet.write(t, &vec![step_t as f32; rows])?;
        unet.write(
            coef,
            &sampler.coefficients(k, &timesteps, req.eta, req.guidance_scale),
        )?;
        unet.write(key, &rng_key(req.seed, k as u64))?;
        let mut cmd = gpu.encoder("denoise");
        unet.record_step(&mut cmd, false)?;
        unet.record_copy(&mut cmd, x_prev, &unet, x)?;
        gpu.queue.submit([cmd.finish()]);
    }
    let latents = unet.read(x).await?;

    // Decode: image = vae.decode(latents / scaling_factor), then to [0, 1].
    let mut g = Graph::new();
    let z = g.input("latents", &latent_shape, DType::F32);
    let scaled = g.scale(z, 1.0 / p.vae.config.scaling_factor);
    let image = p.vae.decode(&mut g, scaled)?;
    let mut vae = p.session(gpu, g, vec![image], Component::Vae)?;
    vae.write(z, &latents)?;
    vae.step()?;
    let pixels: Vec<f32> = vae
        .read(image)
        .await?
        .into_iter()
        .map(|v| (v / 2.0 + 0.5).clamp(0.0, 1.0))
        .collect();
    let image_shape = vae.graph.shape(image).to_vec();
    Ok(Samples {
        latents: HostTensor::f32(&latent_shape, latents),
        images: HostTensor::f32(&image_shape, pixels),
    })
}

/// The images as one grid, `per_row` images a row (a row per prompt).
pub fn grid(images: &HostTensor, per_row: usize) -> Result<image::RgbImage> {
    let [n, _, h, w] = images.shape[..] else {
        return Err(Error::Tensor {
            name: "images".into(),
            msg: format!("{:?}: expected [N, 3, H, W]", images.shape),
        });
    };
    let cols = per_row.max(1);
    let rows = n.div_ceil(cols);
    let mut grid = image::RgbImage::new((cols * w) as u32, (rows * h) as u32);
    for i in 0..n {
        let (r, c) = (i / cols, i % cols);
        for y in 0..h {
            for x in 0..w {
                let px = |ch: usize| {
                    (images.values[((i * 3 + ch) * h + y) * w + x] * 255.0).round() as u8
                };
                grid.put_pixel(
                    (c * w + x) as u32,
                    (r * h + y) as u32,
                    image::Rgb([px(0), px(1), px(2)]),
                );
            }
        }
    }
    Ok(grid)
}

/// [`grid`] written as a PNG.
pub fn write_grid(images: &HostTensor, per_row: usize, path: &std::path::Path) -> Result<()> {
    grid(images, per_row)?
        .save(path)
        .map_err(|e| crate::error::file_err(path, format!("cannot write the PNG: {e}")))
}
