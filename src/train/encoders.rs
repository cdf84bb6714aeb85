//! The frozen encoders of the trainer: the VAE and the text encoder as
//! no-grad sessions of one micro-batch shape, and the on-disk caches of
//! their outputs (`data.cache_latents`, `data.cache_text_embeddings`) with
//! the batch-of-one encoders that fill them.

use super::cache::{component_identity, EncoderCache};
use super::config::Config;
use crate::dtype::DType;
use crate::error::Result;
use crate::graph::{Graph, Session, TensorId};
use crate::models::init::Component;
use crate::models::PipelineDir;
use crate::ops::diffusion::{rng_key, stream};
use crate::Gpu;

/// The frozen encoders of one micro-batch shape, each a no-grad session.
pub(crate) struct Encoders {
    vae: Session,
    image: TensorId,
    vae_key: TensorId,
    latents: TensorId,
    clip: Session,
    input_ids: TensorId,
    hidden: TensorId,
}

impl Encoders {
    /// The encoders with weights and activations in `dtype`; the latents
    /// come out in f32, the text states in `dtype`.
    pub(crate) fn new(
        gpu: &Gpu,
        p: &PipelineDir,
        batch: usize,
        resolution: usize,
        dtype: DType,
    ) -> Result<Encoders> {
        // VAE: image -> (mean + exp(logvar / 2) * noise) * scaling_factor.
        let f = p.vae.downscale();
        let mut g = Graph::new();
        g.set_frozen_dtype(dtype);
        let image = g.input("image", &[batch, 3, resolution, resolution], DType::F32);
        let vae_key = g.input("rng_key", &[4], DType::F32);
        let c = p.vae.config.latent_channels;
        let shape = [batch, c, resolution / f, resolution / f];
        let noise = g.random_normal(vae_key, &shape, stream::LATENT, 0.0)?;
        let x = g.cast(image, dtype);
        let latents = p.vae.encode_latents(&mut g, x, noise)?;
        let vae = p.session(gpu, g, vec![latents], Component::Vae)?;
        // CLIP: input ids -> last hidden state.
        let (clip, input_ids, hidden) = p.text_encoder_session(gpu, batch, dtype)?;
        Ok(Encoders {
            vae,
            image,
            vae_key,
            latents,
            clip,
            input_ids,
            hidden,
        })
    }

    /// Run the VAE now: the latents of `images`, the sample drawn with `key`.
    async fn latents_now(&mut self, images: &[f32], key: [f32; 4]) -> Result<Vec<f32>> {
        self.vae.write(self.image, images)?;
        self.vae.write(self.vae_key, &key)?;
        self.vae.step()?;
        self.vae.read(self.latents).await
    }

    /// Run the text encoder now on token ids.
    async fn text_now(&mut self, ids: &[f32]) -> Result<Vec<f32>> {
        self.clip.write(self.input_ids, ids)?;
        self.clip.step()?;
        self.clip.read(self.hidden).await
    }

    /// Steps 1 and 5 of a micro-batch into `cmd`: both encoders' passes and
    /// the copies of their outputs into the step session's `(latents,
    /// context)` inputs; an output `cached` on disk is written there instead.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn record(
        &mut self,
        cmd: &mut wgpu::CommandEncoder,
        step: &Session,
        (latents, context): (TensorId, TensorId),
        images: &[f32],
        ids: &[f32],
        vae_key: [f32; 4],
        cached: (Option<Vec<f32>>, Option<Vec<f32>>),
    ) -> Result<()> {
        match cached.0 {
            Some(v) => step.write(latents, &v)?,
            None => {
                self.vae.write(self.image, images)?;
                self.vae.write(self.vae_key, &vae_key)?;
                self.vae.record_step(cmd, false)?;
                self.vae.record_copy(cmd, self.latents, step, latents)?;
            }
        }
        match cached.1 {
            Some(v) => step.write(context, &v)?,
            None => {
                self.clip.write(self.input_ids, ids)?;
                self.clip.record_step(cmd, false)?;
                self.clip.record_copy(cmd, self.hidden, step, context)?;
            }
        }
        Ok(())
    }

    /// Both encoders on one micro-batch: (latents, text states).
    pub(crate) async fn encode(
        &mut self,
        p: &PipelineDir,
        images: &[f32],
        captions: &[String],
        key: [f32; 4],
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let prompts: Vec<&str> = captions.iter().map(String::as_str).collect();
        Ok((
            self.latents_now(images, key).await?,
            self.text_now(&p.token_ids(&prompts)?).await?,
        ))
    }
}

/// `data.cache_latents` / `data.cache_text_embeddings`: the caches and the
/// batch-of-one encoders that fill them on a miss.
pub(crate) struct Caches {
    latents: Option<EncoderCache>,
    text: Option<EncoderCache>,
    one: Encoders,
}

impl Caches {
    /// None when neither cache is on.
    pub(crate) fn open(
        gpu: &Gpu,
        config: &Config,
        p: &PipelineDir,
        dtype: DType,
        seed: u64,
    ) -> Result<Option<Caches>> {
        let d = &config.data;
        if !d.cache_latents && !d.cache_text_embeddings {
            return Ok(None);
        }
        let out = &config.train.output_dir;
        let open = |on: bool, kind: &str, component: &str, settings: String| -> Result<_> {
            on.then(|| {
                let id = component_identity(&p.root.join(component))?;
                EncoderCache::open(out, kind, &id, &settings)
            })
            .transpose()
        };
        Ok(Some(Caches {
            latents: open(
                d.cache_latents,
                "latents",
                "vae",
                format!("{dtype} seed {seed}"),
            )?,
            text: open(
                d.cache_text_embeddings,
                "text",
                "text_encoder",
                dtype.to_string(),
            )?,
            one: Encoders::new(gpu, p, 1, d.resolution, dtype)?,
        }))
    }

    /// The latents of `images` (`[B, 3, H, W]`): cached, or encoded once
    /// with the latent sample keyed by the entry (not by the step).
    pub(crate) async fn latents(
        &mut self,
        images: &[f32],
        batch: usize,
        seed: u64,
    ) -> Result<Option<Vec<f32>>> {
        let (Some(cache), one) = (&mut self.latents, &mut self.one) else {
            return Ok(None);
        };
        let shape = one.vae.graph.shape(one.latents)[1..].to_vec();
        let out = cache
            .outputs(images, batch, &shape, async |image, key| {
                let counter = u64::from_le_bytes(key.as_bytes()[..8].try_into().unwrap());
                one.latents_now(image, rng_key(seed, counter)).await
            })
            .await?;
        Ok(Some(out))
    }

    /// The text states of the token ids `ids` (`[B, S]`): cached or encoded.
    pub(crate) async fn text(&mut self, ids: &[f32], batch: usize) -> Result<Option<Vec<f32>>> {
        let (Some(cache), one) = (&mut self.text, &mut self.one) else {
            return Ok(None);
        };
        let shape = one.clip.graph.shape(one.hidden)[1..].to_vec();
        let out = cache
            .outputs(ids, batch, &shape, async |row, _| one.text_now(row).await)
            .await?;
        Ok(Some(out))
    }

    /// "cache: latents 12 encoded, 36 reused; ..." for the end of a run.
    pub(crate) fn summary(&self) -> String {
        let line = |name: &str, c: &Option<EncoderCache>| {
            c.as_ref()
                .map(|c| format!("{name} {} encoded, {} reused", c.misses, c.hits))
        };
        let parts: Vec<String> = [
            line("latents", &self.latents),
            line("text states", &self.text),
        ]
        .into_iter()
        .flatten()
        .collect();
        format!("cache: {}", parts.join("; "))
    }
}
