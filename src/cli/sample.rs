//! `difftrain sample`: text to images from a pipeline folder (DDIM or DDPM
//! with classifier-free guidance), as a PNG grid or, for checking against
//! diffusers, the final latents and images as safetensors.

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use difftrain::io::config::OneOrMany;
use difftrain::io::TensorFile;
use difftrain::models::PipelineDir;
use difftrain::sample::schedule::SamplerKind;
use difftrain::sample::{pipeline_sampler, sample, write_grid, SampleRequest};
use difftrain::Gpu;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Clone, Copy, ValueEnum)]
pub enum Scheduler {
    /// DDIMScheduler.from_config(the pipeline's scheduler config)
    Ddim,
    /// DDPMScheduler.from_config(the pipeline's scheduler config)
    Ddpm,
}

#[derive(Args)]
pub struct SampleArgs {
    /// A diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
    /// scheduler/), e.g. the output of `difftrain train`.
    #[arg(long)]
    model: PathBuf,
    /// A prompt; repeat for several (one grid row each).
    #[arg(long = "prompt", required = true)]
    prompts: Vec<String>,
    /// The prompt of the unconditional branch of classifier-free guidance (default: empty).
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// Denoising steps.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Classifier-free guidance scale (1 or less: no guidance).
    #[arg(long, default_value_t = 7.5)]
    guidance_scale: f32,
    #[arg(long, value_enum, default_value = "ddim")]
    scheduler: Scheduler,
    /// DDIM's eta (0: deterministic).
    #[arg(long, default_value_t = 0.0)]
    eta: f64,
    /// Seed of the initial latents and of the sampling noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Images per prompt (grid columns).
    #[arg(long, default_value_t = 1)]
    num_images: usize,
    /// Image height in pixels (default: the UNet's sample_size times the VAE's downscale).
    #[arg(long)]
    height: Option<usize>,
    /// Image width in pixels (default as height).
    #[arg(long)]
    width: Option<usize>,
    /// Start from these latents: a safetensors file with `latents` [N,4,h,w] (the pipeline's
    /// `latents=` argument).
    #[arg(long)]
    latents: Option<PathBuf>,
    /// Output: a .png grid (a row per prompt), or a .safetensors file with the final `latents`
    /// and the decoded `images` [N,3,H,W] in [0,1].
    #[arg(long)]
    out: PathBuf,
}

pub fn run(gpu: &Gpu, a: SampleArgs) -> Result<()> {
    let start = Instant::now();
    let p = PipelineDir::open(&a.model)?;
    let kind = match a.scheduler {
        Scheduler::Ddim => SamplerKind::Ddim,
        Scheduler::Ddpm => SamplerKind::Ddpm,
    };
    let sampler = pipeline_sampler(&p, kind)?;
    // The UNet's sample_size (one size, or [height, width]) in pixels; 64 if unset.
    let (h0, w0) = match &p.unet.config.sample_size {
        Some(OneOrMany::One(s)) => (*s, *s),
        Some(OneOrMany::Many(v)) if v.len() == 2 => (v[0], v[1]),
        _ => (64, 64),
    };
    let f = p.vae.downscale();
    let latents = match &a.latents {
        Some(path) => Some(TensorFile::read(path)?.get("latents")?.values.clone()),
        None => None,
    };
    let png = match a.out.extension().and_then(|e| e.to_str()) {
        Some("png") => true,
        Some("safetensors") => false,
        _ => bail!(
            "{}: --out must end in .png or .safetensors",
            a.out.display()
        ),
    };
    let req = SampleRequest {
        prompts: a.prompts.clone(),
        negative_prompt: a.negative_prompt.clone(),
        steps: a.steps,
        guidance_scale: a.guidance_scale,
        eta: a.eta,
        seed: a.seed,
        num_images: a.num_images,
        height: a.height.unwrap_or(h0 * f),
        width: a.width.or(a.height).unwrap_or(w0 * f),
        latents,
    };
    let out = difftrain::platform::block_on(sample(gpu, &p, &sampler, &req, None))?;
    if png {
        write_grid(&out.images, a.num_images, &a.out)?;
    } else {
        let mut t = TensorFile::new(&a.out);
        t.insert("latents", out.latents);
        t.insert("images", out.images);
        t.write(&a.out, None)?;
    }
    eprintln!(
        "sampled {} image(s) of {}x{} in {} steps in {:.1} s; wrote {}",
        a.prompts.len() * a.num_images,
        req.width,
        req.height,
        a.steps,
        start.elapsed().as_secs_f64(),
        a.out.display()
    );
    Ok(())
}
