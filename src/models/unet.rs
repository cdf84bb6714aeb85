//! diffusers' `UNet2DConditionModel` (SD 1.x / 2.x): the spec's model call
//! `model(noisy_latents, timesteps, encoder_hidden_states) -> prediction`,
//! traced into a graph with diffusers' parameter names
//! (diffusers/models/unets/unet_2d_condition.py, unet_2d_blocks.py).

use super::unet_config::{BlockSpec, UNetConfig, UNetLayout};
use crate::error::{shape_err, Result};
use crate::graph::{Graph, TensorId};
use crate::nn::{
    conv2d, downsample_2d, group_norm, linear, resnet_block_2d, transformer_2d, upsample_2d, Conv,
    Resnet, Transformer2d,
};
use std::path::Path;

/// A UNet described by its config, ready to be traced for any input shape.
#[derive(Clone, Debug)]
pub struct UNet {
    pub config: UNetConfig,
    pub layout: UNetLayout,
}

/// What the blocks of one UNet share while tracing.
struct Ctx {
    temb_act: TensorId,
    context: TensorId,
    groups: usize,
    eps: f32,
    linear_projection: bool,
}

impl UNet {
    /// Read and check `config.json`.
    pub fn from_config_file(path: &Path) -> Result<UNet> {
        let config = UNetConfig::read(path)?;
        let layout = config.layout(path)?;
        Ok(UNet { config, layout })
    }

    /// Trace the forward pass: `sample` `[B, in_channels, H, W]`, `timesteps`
    /// `[B]` (f32), `context` (encoder_hidden_states) `[B, S, cross_attention_dim]`
    /// -> prediction `[B, out_channels, H, W]`. H and W must be multiples of
    /// 2^(blocks - 1).
    pub fn forward(
        &self,
        g: &mut Graph,
        sample: TensorId,
        timesteps: TensorId,
        context: TensorId,
    ) -> Result<TensorId> {
        self.check_inputs(g, sample, timesteps, context)?;
        let cfg = &self.config;
        let ch = &self.layout.channels;
        let c0 = ch[0];
        let temb_dim = cfg.time_embed_dim();

        let t = g.timestep_embedding(timesteps, c0, cfg.flip_sin_to_cos, cfg.freq_shift)?;
        // diffusers casts the sinusoidal embedding to the sample's dtype.
        let t = g.cast(t, g.dtype(sample));
        let temb = g.scoped("time_embedding", |g| {
            let h = linear(g, "linear_1", t, c0, temb_dim, true)?;
            let h = g.silu(h);
            linear(g, "linear_2", h, temb_dim, temb_dim, true)
        })?;
        // Every ResnetBlock2D applies silu to temb first; do it once.
        let temb_act = g.silu(temb);
        let ctx = Ctx {
            temb_act,
            context,
            groups: self.layout.groups,
            eps: cfg.norm_eps,
            linear_projection: cfg.use_linear_projection,
        };

        let mut h = conv2d(
            g,
            "conv_in",
            sample,
            Conv::same(cfg.in_channels, c0, cfg.conv_in_kernel),
        )?;
        let mut skips = vec![h];
        let n = ch.len();
        for (i, b) in self.layout.down.iter().enumerate() {
            h = g.scoped(&format!("down_blocks.{i}"), |g| {
                let mut h = h;
                for j in 0..b.resnets {
                    h = self.layer(g, &ctx, b, j, h, ch[i])?;
                    skips.push(h);
                }
                if i + 1 < n {
                    h = downsample_2d(g, "downsamplers.0", h, ch[i], cfg.downsample_padding)?;
                    skips.push(h);
                }
                Ok::<_, crate::Error>(h)
            })?;
        }

        h = g.scoped("mid_block", |g| {
            let c = ch[n - 1];
            let r = Resnet {
                cin: c,
                cout: c,
                groups: ctx.groups,
                eps: ctx.eps,
                out_scale: cfg.mid_block_scale_factor,
            };
            let h = g.checkpoint(|g| resnet_block_2d(g, "resnets.0", h, Some(ctx.temb_act), r))?;
            let t = Transformer2d {
                channels: c,
                heads: self.layout.mid_heads,
                layers: self.layout.mid_transformer_layers,
                groups: ctx.groups,
                linear_projection: ctx.linear_projection,
            };
            let h = g.checkpoint(|g| transformer_2d(g, "attentions.0", h, ctx.context, t))?;
            g.checkpoint(|g| resnet_block_2d(g, "resnets.1", h, Some(ctx.temb_act), r))
        })?;

        for (i, b) in self.layout.up.iter().enumerate() {
            let cout = ch[n - 1 - i];
            h = g.scoped(&format!("up_blocks.{i}"), |g| {
                let mut h = h;
                for j in 0..b.resnets {
                    let skip = skips.pop().ok_or_else(|| {
                        shape_err(
                            "unet",
                            "up blocks take more skip connections than the down blocks made",
                        )
                    })?;
                    h = g.concat(&[h, skip], 1)?;
                    h = self.layer(g, &ctx, b, j, h, cout)?;
                }
                if i + 1 < n {
                    h = upsample_2d(g, "upsamplers.0", h, cout)?;
                }
                Ok::<_, crate::Error>(h)
            })?;
        }

        let h = group_norm(g, "conv_norm_out", h, ctx.groups, ctx.eps, true)?;
        conv2d(
            g,
            "conv_out",
            h,
            Conv::same(c0, cfg.out_channels, cfg.conv_out_kernel),
        )
    }

    /// Layer `j` of a block: a resnet to `cout` channels, then a transformer
    /// when the block has cross-attention; each a gradient-checkpointing
    /// segment, as diffusers checkpoints them.
    fn layer(
        &self,
        g: &mut Graph,
        ctx: &Ctx,
        b: &BlockSpec,
        j: usize,
        h: TensorId,
        cout: usize,
    ) -> Result<TensorId> {
        let r = Resnet {
            cin: g.shape(h)[1],
            cout,
            groups: ctx.groups,
            eps: ctx.eps,
            out_scale: self.config.resnet_out_scale_factor,
        };
        let h = g.checkpoint(|g| {
            resnet_block_2d(g, &format!("resnets.{j}"), h, Some(ctx.temb_act), r)
        })?;
        if !b.cross_attention {
            return Ok(h);
        }
        let t = Transformer2d {
            channels: cout,
            heads: b.heads,
            layers: b.transformer_layers,
            groups: ctx.groups,
            linear_projection: ctx.linear_projection,
        };
        g.checkpoint(|g| transformer_2d(g, &format!("attentions.{j}"), h, ctx.context, t))
    }

    fn check_inputs(
        &self,
        g: &Graph,
        sample: TensorId,
        timesteps: TensorId,
        context: TensorId,
    ) -> Result<()> {
        let s = g.shape(sample);
        let levels = 1usize << (self.layout.channels.len() - 1);
        let ok_sample = s.len() == 4
            && s[1] == self.config.in_channels
            && s[2].is_multiple_of(levels)
            && s[3].is_multiple_of(levels)
            && s[2] > 0
            && s[3] > 0;
        if !ok_sample {
            return Err(shape_err(
                "unet",
                format!(
                    "sample {s:?} must be [B, {}, H, W] with H and W multiples of {levels}",
                    self.config.in_channels
                ),
            ));
        }
        let b = s[0];
        if g.shape(timesteps) != [b] {
            return Err(shape_err(
                "unet",
                format!("timestep {:?} must be [{b}]", g.shape(timesteps)),
            ));
        }
        let dims: Vec<usize> = self
            .layout
            .down
            .iter()
            .chain(&self.layout.up)
            .filter(|b| b.cross_attention)
            .map(|b| b.cross_attention_dim)
            .chain([self.layout.down.last().map_or(0, |b| b.cross_attention_dim)])
            .collect();
        let c = g.shape(context);
        if c.len() != 3 || c[0] != b || dims.iter().any(|&d| d != c[2]) {
            return Err(shape_err(
                "unet",
                format!(
                    "encoder_hidden_states {c:?} must be [{b}, S, {}]",
                    dims.first().copied().unwrap_or(0)
                ),
            ));
        }
        Ok(())
    }
}
