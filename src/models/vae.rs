//! diffusers' `AutoencoderKL`: the encoder to a diagonal Gaussian over
//! latents (mean, logvar) and the decoder back to images
//! (diffusers/models/autoencoders/autoencoder_kl.py, vae.py). Frozen and
//! forward-only in training.

use crate::error::{shape_err, Result};
use crate::graph::{Graph, TensorId};
use crate::io::config::{parse_config, unsupported};
use crate::io::WeightFile;
use crate::nn::{
    attention, conv2d, downsample_2d, group_norm, resnet_block_2d, upsample_2d, Conv, Resnet,
};
use crate::ops::elementwise::Activation;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// `AutoencoderKL`'s config.json.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VaeConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    #[serde(default = "down_types")]
    pub down_block_types: Vec<String>,
    #[serde(default = "up_types")]
    pub up_block_types: Vec<String>,
    #[serde(default = "channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "silu")]
    pub act_fn: String,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    #[serde(default = "thirty_two")]
    pub sample_size: usize,
    #[serde(default = "scaling")]
    pub scaling_factor: f32,
    #[serde(default)]
    pub shift_factor: Option<f32>,
    #[serde(default)]
    pub latents_mean: Option<Vec<f32>>,
    #[serde(default)]
    pub latents_std: Option<Vec<f32>>,
    #[serde(default = "yes")]
    pub force_upcast: bool,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
}

fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn one() -> usize {
    1
}
fn thirty_two() -> usize {
    32
}
fn yes() -> bool {
    true
}
fn silu() -> String {
    "silu".into()
}
fn scaling() -> f32 {
    0.18215
}
fn channels() -> Vec<usize> {
    vec![64]
}
fn down_types() -> Vec<String> {
    vec!["DownEncoderBlock2D".into()]
}
fn up_types() -> Vec<String> {
    vec!["UpDecoderBlock2D".into()]
}

/// diffusers' VAE blocks use eps 1e-6 in every norm.
const EPS: f32 = 1e-6;

#[derive(Clone, Debug)]
pub struct Vae {
    pub config: VaeConfig,
}

impl Vae {
    pub fn from_config_file(path: &Path) -> Result<Vae> {
        let config: VaeConfig = parse_config(path)?;
        let c = &config;
        let n = c.block_out_channels.len();
        if n == 0 || c.down_block_types.len() != n || c.up_block_types.len() != n {
            return Err(unsupported(
                path,
                "block_out_channels",
                format!(
                    "{n} widths with {} down and {} up block types; expected one of each per width",
                    c.down_block_types.len(),
                    c.up_block_types.len()
                ),
            ));
        }
        for (i, t) in c.down_block_types.iter().enumerate() {
            if t != "DownEncoderBlock2D" {
                return Err(unsupported(
                    path,
                    &format!("down_block_types[{i}]"),
                    format!("value {t:?} is not supported (DownEncoderBlock2D)"),
                ));
            }
        }
        for (i, t) in c.up_block_types.iter().enumerate() {
            if t != "UpDecoderBlock2D" {
                return Err(unsupported(
                    path,
                    &format!("up_block_types[{i}]"),
                    format!("value {t:?} is not supported (UpDecoderBlock2D)"),
                ));
            }
        }
        if let Some(v) = c.shift_factor {
            return Err(unsupported(
                path,
                "shift_factor",
                format!("value {v} is not supported (SD 1.x / 2.x VAEs have none)"),
            ));
        }
        if c.latents_mean.is_some() || c.latents_std.is_some() {
            return Err(unsupported(
                path,
                "latents_mean",
                "per-channel latent statistics are not supported (SD 1.x / 2.x VAEs have none)",
            ));
        }
        if c.act_fn != "silu" {
            return Err(unsupported(
                path,
                "act_fn",
                format!("value {:?} is not supported (silu)", c.act_fn),
            ));
        }
        if let Some(&bad) = c
            .block_out_channels
            .iter()
            .find(|&&w| w == 0 || !w.is_multiple_of(c.norm_num_groups))
        {
            return Err(unsupported(
                path,
                "norm_num_groups",
                format!(
                    "{} groups do not divide block width {bad}",
                    c.norm_num_groups
                ),
            ));
        }
        Ok(Vae { config })
    }

    /// How many times the encoder halves the image size.
    pub fn downscale(&self) -> usize {
        1 << (self.config.block_out_channels.len() - 1)
    }

    /// Encode `image` `[B, in_channels, H, W]` (values in [-1, 1]) to the
    /// latent distribution: (mean, logvar), each `[B, latent_channels, H/f,
    /// W/f]`, logvar clamped to [-30, 20] as `DiagonalGaussianDistribution`
    /// does. Parameters are frozen.
    pub fn encode(&self, g: &mut Graph, image: TensorId) -> Result<(TensorId, TensorId)> {
        let c = &self.config;
        let s = g.shape(image).to_vec();
        let f = self.downscale();
        if s.len() != 4
            || s[1] != c.in_channels
            || !s[2].is_multiple_of(f)
            || !s[3].is_multiple_of(f)
            || s[2] == 0
            || s[3] == 0
        {
            return Err(shape_err(
                "vae.encode",
                format!(
                    "image {s:?} must be [B, {}, H, W] with H and W multiples of {f}",
                    c.in_channels
                ),
            ));
        }
        let ch = &c.block_out_channels;
        let n = ch.len();
        let l2 = 2 * c.latent_channels;
        g.frozen(|g| {
            let h = g.scoped("encoder", |g| {
                let mut h = conv2d(g, "conv_in", image, Conv::same(c.in_channels, ch[0], 3))?;
                for (i, &cout) in ch.iter().enumerate() {
                    h = g.scoped(&format!("down_blocks.{i}"), |g| {
                        let mut h = h;
                        for j in 0..c.layers_per_block {
                            h = self.resnet(g, &format!("resnets.{j}"), h, cout)?;
                        }
                        if i + 1 < n {
                            // diffusers' encoder: downsample_padding = 0.
                            h = downsample_2d(g, "downsamplers.0", h, cout, 0)?;
                        }
                        Ok::<_, crate::Error>(h)
                    })?;
                }
                let h = self.mid_block(g, h)?;
                let h = group_norm(g, "conv_norm_out", h, c.norm_num_groups, EPS, true)?;
                conv2d(g, "conv_out", h, Conv::same(ch[n - 1], l2, 3))
            })?;
            let h = if c.use_quant_conv {
                conv2d(g, "quant_conv", h, Conv::same(l2, l2, 1))?
            } else {
                h
            };
            let halves = g.split(h, 1, &[c.latent_channels, c.latent_channels])?;
            let logvar = g.clamp(halves[1], -30.0, 20.0);
            Ok((halves[0], logvar))
        })
    }

    /// Training latents from images: a sample of the encoder's distribution
    /// times `scaling_factor`, (mean + exp(logvar / 2) * noise) * scaling_factor,
    /// as diffusers' `train_text_to_image.py` takes
    /// `latent_dist.sample() * scaling_factor`. `noise` is N(0, 1) noise of
    /// the latents' shape.
    pub fn encode_latents(
        &self,
        g: &mut Graph,
        image: TensorId,
        noise: TensorId,
    ) -> Result<TensorId> {
        let (mean, logvar) = self.encode(g, image)?;
        if g.shape(noise) != g.shape(mean) {
            return Err(shape_err(
                "vae.encode_latents",
                format!("noise {:?} must be {:?}", g.shape(noise), g.shape(mean)),
            ));
        }
        // The sample is drawn in the noise's dtype (f32 in training).
        let (mean, logvar) = (g.cast(mean, g.dtype(noise)), g.cast(logvar, g.dtype(noise)));
        let half = g.scale(logvar, 0.5);
        let std = g.activation(half, Activation::Exp);
        let z = g.mul(std, noise)?;
        let z = g.add(mean, z)?;
        Ok(g.scale(z, self.config.scaling_factor))
    }

    /// Decode `latents` `[B, latent_channels, h, w]` (unscaled: divide by
    /// scaling_factor first) to images `[B, out_channels, h*f, w*f]`.
    pub fn decode(&self, g: &mut Graph, latents: TensorId) -> Result<TensorId> {
        let c = &self.config;
        let s = g.shape(latents).to_vec();
        if s.len() != 4 || s[1] != c.latent_channels {
            return Err(shape_err(
                "vae.decode",
                format!("latents {s:?} must be [B, {}, h, w]", c.latent_channels),
            ));
        }
        let ch = &c.block_out_channels;
        let n = ch.len();
        let lc = c.latent_channels;
        g.frozen(|g| {
            let z = if c.use_post_quant_conv {
                conv2d(g, "post_quant_conv", latents, Conv::same(lc, lc, 1))?
            } else {
                latents
            };
            g.scoped("decoder", |g| {
                let h = conv2d(g, "conv_in", z, Conv::same(lc, ch[n - 1], 3))?;
                let mut h = self.mid_block(g, h)?;
                for i in 0..n {
                    let cout = ch[n - 1 - i];
                    h = g.scoped(&format!("up_blocks.{i}"), |g| {
                        let mut h = h;
                        for j in 0..=c.layers_per_block {
                            h = self.resnet(g, &format!("resnets.{j}"), h, cout)?;
                        }
                        if i + 1 < n {
                            h = upsample_2d(g, "upsamplers.0", h, cout)?;
                        }
                        Ok::<_, crate::Error>(h)
                    })?;
                }
                let h = group_norm(g, "conv_norm_out", h, c.norm_num_groups, EPS, true)?;
                conv2d(g, "conv_out", h, Conv::same(ch[0], c.out_channels, 3))
            })
        })
    }

    fn resnet(&self, g: &mut Graph, name: &str, h: TensorId, cout: usize) -> Result<TensorId> {
        let r = Resnet {
            cin: g.shape(h)[1],
            cout,
            groups: self.config.norm_num_groups,
            eps: EPS,
            out_scale: 1.0,
        };
        resnet_block_2d(g, name, h, None, r)
    }

    /// `UNetMidBlock2D` without time embedding: resnet, single-head
    /// self-attention over all pixels (group norm inside, residual), resnet.
    fn mid_block(&self, g: &mut Graph, h: TensorId) -> Result<TensorId> {
        let c = &self.config;
        let [b, ch, hh, ww] = g.shape(h)[..] else {
            return Err(shape_err(
                "vae.mid_block",
                format!("{:?} is not [B, C, H, W]", g.shape(h)),
            ));
        };
        g.scoped("mid_block", |g| {
            let h = self.resnet(g, "resnets.0", h, ch)?;
            let h = if c.mid_block_add_attention {
                let n = group_norm(
                    g,
                    "attentions.0.group_norm",
                    h,
                    c.norm_num_groups,
                    EPS,
                    false,
                )?;
                let s = g.reshape(n, &[b, ch, hh * ww])?;
                let s = g.transpose_last2(s)?;
                let a = attention(g, "attentions.0", s, None, 1, ch, true, None)?;
                let a = g.transpose_last2(a)?;
                let a = g.reshape(a, &[b, ch, hh, ww])?;
                g.add(a, h)?
            } else {
                h
            };
            self.resnet(g, "resnets.1", h, ch)
        })
    }
}

/// Rename the attention weights of checkpoints saved before diffusers 0.14
/// (`query`, `key`, `value`, `proj_attn`, sometimes as 1x1 conv weights) to
/// today's names, as diffusers does when loading them.
pub fn upgrade_legacy_names(file: &mut WeightFile) {
    let renames = [
        (".query.", ".to_q."),
        (".key.", ".to_k."),
        (".value.", ".to_v."),
        (".proj_attn.", ".to_out.0."),
    ];
    let old: Vec<String> = file
        .names()
        .filter(|k| k.contains("mid_block.attentions.0."))
        .map(str::to_string)
        .collect();
    for k in old {
        let Some((from, to)) = renames.iter().find(|(o, _)| k.contains(o)) else {
            continue;
        };
        // 1x1 conv weights [C, C, 1, 1] become linear weights [C, C].
        let shape = file
            .shape(&k)
            .filter(|s| s.len() == 4)
            .map(|s| s[..2].to_vec());
        file.rename(&k, &k.replace(from, to), shape);
    }
}
