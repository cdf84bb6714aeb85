//! diffusers' `ResnetBlock2D`, `Downsample2D` and `Upsample2D`
//! (diffusers/models/resnet.py, upsampling.py, downsampling.py).

use super::layers::{conv2d, conv2d_residual, group_norm, linear, Conv};
use crate::error::Result;
use crate::graph::{Graph, TensorId};

/// The sizes of one `ResnetBlock2D`.
#[derive(Clone, Copy, Debug)]
pub struct Resnet {
    pub cin: usize,
    pub cout: usize,
    pub groups: usize,
    pub eps: f32,
    /// diffusers' `output_scale_factor`: the block returns (x + h) / this.
    pub out_scale: f32,
}

/// `ResnetBlock2D` (time_embedding_norm "default", SiLU) named `name`:
/// h = conv2(silu(norm2(conv1(silu(norm1(x))) + time_emb_proj(silu(temb)))));
/// out = (shortcut(x) + h) / out_scale. `temb_act` is silu(temb) `[B, T]`,
/// computed once and shared by every block; `None` for the VAE's blocks.
pub fn resnet_block_2d(
    g: &mut Graph,
    name: &str,
    x: TensorId,
    temb_act: Option<TensorId>,
    r: Resnet,
) -> Result<TensorId> {
    g.scoped(name, |g| {
        let h = group_norm(g, "norm1", x, r.groups, r.eps, true)?;
        let mut h = conv2d(g, "conv1", h, Conv::same(r.cin, r.cout, 3))?;
        if let Some(t) = temb_act {
            let [b, tdim] = g.shape(t)[..] else {
                return Err(crate::error::shape_err(
                    "resnet_block_2d",
                    format!("temb {:?} must be [B, T]", g.shape(t)),
                ));
            };
            let t = linear(g, "time_emb_proj", t, tdim, r.cout, true)?;
            let t = g.reshape(t, &[b, r.cout, 1, 1])?;
            h = g.add(h, t)?;
        }
        let h = group_norm(g, "norm2", h, r.groups, r.eps, true)?;
        let shortcut = if r.cin != r.cout {
            conv2d(g, "conv_shortcut", x, Conv::same(r.cin, r.cout, 1))?
        } else {
            x
        };
        // conv2's epilogue adds the shortcut.
        let out = conv2d_residual(g, "conv2", h, Conv::same(r.cout, r.cout, 3), shortcut)?;
        Ok(if r.out_scale != 1.0 {
            g.scale(out, 1.0 / r.out_scale)
        } else {
            out
        })
    })
}

/// `Downsample2D(use_conv=True)` named `name`: a 3x3 stride-2 conv. diffusers
/// pads by `padding` on every side, except that padding 0 means
/// `F.pad(x, (0, 1, 0, 1))` (bottom and right only), as the VAE encoder uses.
pub fn downsample_2d(
    g: &mut Graph,
    name: &str,
    x: TensorId,
    channels: usize,
    padding: usize,
) -> Result<TensorId> {
    let pad = if padding == 0 {
        [0, 0, 1, 1]
    } else {
        [padding; 4]
    };
    g.scoped(name, |g| {
        conv2d(
            g,
            "conv",
            x,
            Conv {
                cin: channels,
                cout: channels,
                kernel: 3,
                stride: 2,
                padding: pad,
            },
        )
    })
}

/// `Upsample2D(use_conv=True)` named `name`: nearest 2x, then a 3x3 conv.
pub fn upsample_2d(g: &mut Graph, name: &str, x: TensorId, channels: usize) -> Result<TensorId> {
    g.scoped(name, |g| {
        let h = g.upsample_nearest2x(x)?;
        conv2d(g, "conv", h, Conv::same(channels, channels, 3))
    })
}
