//! diffusers' `Attention`, `BasicTransformerBlock` and `Transformer2DModel`
//! (continuous input) as the SD UNets and the VAE mid block use them
//! (diffusers/models/attention_processor.py, attention.py,
//! transformers/transformer_2d.py).

use super::layers::{
    conv2d, conv2d_residual, group_norm, layer_norm, linear, linear_residual, Conv,
};
use crate::error::{shape_err, Result};
use crate::graph::{Graph, TensorId};

/// `Attention` named `name` on x `[B, S, C]`: self-attention, or
/// cross-attention over `context` `[B, Sk, Ck]`; `heads` heads of
/// `head_dim`, scale 1/sqrt(head_dim); q/k/v projections with a bias only when
/// `qkv_bias`; `to_out.0` always has one and adds `residual` (x's shape)
/// when given.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    g: &mut Graph,
    name: &str,
    x: TensorId,
    context: Option<TensorId>,
    heads: usize,
    head_dim: usize,
    qkv_bias: bool,
    residual: Option<TensorId>,
) -> Result<TensorId> {
    let c = last_dim(g, x);
    let src = context.unwrap_or(x);
    let cs = last_dim(g, src);
    let inner = heads * head_dim;
    g.scoped(name, |g| {
        let q = linear(g, "to_q", x, c, inner, qkv_bias)?;
        let k = linear(g, "to_k", src, cs, inner, qkv_bias)?;
        let v = linear(g, "to_v", src, cs, inner, qkv_bias)?;
        let o = g.attention(q, k, v, heads, false)?;
        match residual {
            Some(r) => linear_residual(g, "to_out.0", o, [inner, c], r),
            None => linear(g, "to_out.0", o, inner, c, true),
        }
    })
}

fn last_dim(g: &Graph, t: TensorId) -> usize {
    g.shape(t).last().copied().unwrap_or(0)
}

/// `BasicTransformerBlock` (layer norms, GEGLU feed-forward of 4x width) on
/// x `[B, S, C]`: self-attention, cross-attention over `context`, then the
/// feed-forward, each as a pre-norm residual (added in the epilogue of
/// to_out.0 and ff.net.2).
fn basic_transformer_block(
    g: &mut Graph,
    name: &str,
    x: TensorId,
    context: TensorId,
    heads: usize,
    head_dim: usize,
) -> Result<TensorId> {
    let c = last_dim(g, x);
    g.scoped(name, |g| {
        let h = layer_norm(g, "norm1", x, 1e-5)?;
        let x = attention(g, "attn1", h, None, heads, head_dim, false, Some(x))?;
        let h = layer_norm(g, "norm2", x, 1e-5)?;
        let x = attention(
            g,
            "attn2",
            h,
            Some(context),
            heads,
            head_dim,
            false,
            Some(x),
        )?;
        let h = layer_norm(g, "norm3", x, 1e-5)?;
        let inner = 4 * c;
        let f = linear(g, "ff.net.0.proj", h, c, 2 * inner, true)?;
        let f = g.geglu(f)?;
        linear_residual(g, "ff.net.2", f, [inner, c], x)
    })
}

/// The sizes of one `Transformer2DModel`.
#[derive(Clone, Copy, Debug)]
pub struct Transformer2d {
    pub channels: usize,
    pub heads: usize,
    pub layers: usize,
    pub groups: usize,
    /// `use_linear_projection`: proj_in/out are Linear on [B, HW, C] rather
    /// than 1x1 convs on [B, C, H, W].
    pub linear_projection: bool,
}

/// `Transformer2DModel` named `name` on x `[B, C, H, W]` with cross-attention
/// over `context` `[B, S, D]`: group norm (eps 1e-6), proj_in, `layers`
/// transformer blocks on the [B, HW, C] sequence, proj_out, plus x.
pub fn transformer_2d(
    g: &mut Graph,
    name: &str,
    x: TensorId,
    context: TensorId,
    t: Transformer2d,
) -> Result<TensorId> {
    let [b, c, h, w] = g.shape(x)[..] else {
        return Err(shape_err(
            "transformer_2d",
            format!("x {:?} must be [B, C, H, W]", g.shape(x)),
        ));
    };
    if t.heads == 0 || !c.is_multiple_of(t.heads) {
        return Err(shape_err(
            "transformer_2d",
            format!("{} heads do not divide {c} channels", t.heads),
        ));
    }
    let head_dim = c / t.heads;
    // [B, C, H, W] <-> [B, HW, C]
    let to_seq = |g: &mut Graph, v: TensorId| -> Result<TensorId> {
        let v = g.reshape(v, &[b, c, h * w])?;
        g.transpose_last2(v)
    };
    let to_image = |g: &mut Graph, v: TensorId| -> Result<TensorId> {
        let v = g.transpose_last2(v)?;
        g.reshape(v, &[b, c, h, w])
    };
    let proj_1x1 = Conv::same(c, c, 1);
    g.scoped(name, |g| {
        let n = group_norm(g, "norm", x, t.groups, 1e-6, false)?;
        let mut s = if t.linear_projection {
            let s = to_seq(g, n)?;
            linear(g, "proj_in", s, c, c, true)?
        } else {
            let p = conv2d(g, "proj_in", n, proj_1x1)?;
            to_seq(g, p)?
        };
        for i in 0..t.layers {
            let block = format!("transformer_blocks.{i}");
            s = basic_transformer_block(g, &block, s, context, t.heads, head_dim)?;
        }
        if t.linear_projection {
            let p = linear(g, "proj_out", s, c, c, true)?;
            let p = to_image(g, p)?;
            g.add(p, x)
        } else {
            let s = to_image(g, s)?;
            conv2d_residual(g, "proj_out", s, proj_1x1, x)
        }
    })
}
