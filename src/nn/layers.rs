//! torch.nn's Linear, Conv2d, GroupNorm and LayerNorm with their default
//! initialization (kaiming-uniform with a = sqrt(5): U(+-1/sqrt(fan_in)) for
//! weights and biases; norms start at weight 1, bias 0).

use crate::error::Result;
use crate::graph::{Graph, Init, TensorId};

fn fan_in_bound(fan_in: usize) -> Init {
    Init::Uniform(1.0 / (fan_in.max(1) as f32).sqrt())
}

/// `nn.Linear(fan_in, out, bias)` named `name`, on x `[.., fan_in]`, with
/// torch's default initialization.
pub fn linear(
    g: &mut Graph,
    name: &str,
    x: TensorId,
    fan_in: usize,
    out: usize,
    bias: bool,
) -> Result<TensorId> {
    let init = fan_in_bound(fan_in);
    linear_init(g, name, x, [fan_in, out], init, bias.then_some(init))
}

/// [`linear`] with explicit initializations of the weight and the bias
/// (None: no bias), for models that override torch's default.
pub fn linear_init(
    g: &mut Graph,
    name: &str,
    x: TensorId,
    [fan_in, out]: [usize; 2],
    weight: Init,
    bias: Option<Init>,
) -> Result<TensorId> {
    linear_module(g, name, x, [fan_in, out], weight, bias, None)
}

/// [`linear`] with a bias, plus `residual` (the output's shape) in the same
/// kernel: a transformer block's `ff(x) + x` or `attn(x) + x`.
pub fn linear_residual(
    g: &mut Graph,
    name: &str,
    x: TensorId,
    [fan_in, out]: [usize; 2],
    residual: TensorId,
) -> Result<TensorId> {
    let init = fan_in_bound(fan_in);
    linear_module(g, name, x, [fan_in, out], init, Some(init), Some(residual))
}

/// The parameters of a linear module named `name` and its product with x,
/// plus `residual`.
fn linear_module(
    g: &mut Graph,
    name: &str,
    x: TensorId,
    [fan_in, out]: [usize; 2],
    weight: Init,
    bias: Option<Init>,
    residual: Option<TensorId>,
) -> Result<TensorId> {
    g.scoped(name, |g| {
        let w = g.module_param("weight", &[out, fan_in], weight)?;
        let b = bias
            .map(|init| g.module_param("bias", &[out], init))
            .transpose()?;
        match residual {
            Some(r) => g.linear_add(x, w, b, r),
            None => g.linear(x, w, b),
        }
    })
}

/// The geometry of an `nn.Conv2d` with a bias.
#[derive(Clone, Copy, Debug)]
pub struct Conv {
    pub cin: usize,
    pub cout: usize,
    pub kernel: usize,
    pub stride: usize,
    /// (top, left, bottom, right)
    pub padding: [usize; 4],
}

impl Conv {
    /// A square kernel with "same" padding (k / 2 on every side) at stride 1.
    pub fn same(cin: usize, cout: usize, kernel: usize) -> Conv {
        Conv {
            cin,
            cout,
            kernel,
            stride: 1,
            padding: [kernel / 2; 4],
        }
    }
}

/// `nn.Conv2d` named `name`, with a bias, on x `[N, cin, H, W]`.
pub fn conv2d(g: &mut Graph, name: &str, x: TensorId, c: Conv) -> Result<TensorId> {
    conv2d_module(g, name, x, c, None)
}

/// [`conv2d`] plus `residual` (the output's shape) in the same kernel: a
/// ResNet block's `shortcut + conv2(h)`.
pub fn conv2d_residual(
    g: &mut Graph,
    name: &str,
    x: TensorId,
    c: Conv,
    residual: TensorId,
) -> Result<TensorId> {
    conv2d_module(g, name, x, c, Some(residual))
}

fn conv2d_module(
    g: &mut Graph,
    name: &str,
    x: TensorId,
    c: Conv,
    residual: Option<TensorId>,
) -> Result<TensorId> {
    g.scoped(name, |g| {
        let fan_in = c.cin * c.kernel * c.kernel;
        let w = g.module_param(
            "weight",
            &[c.cout, c.cin, c.kernel, c.kernel],
            fan_in_bound(fan_in),
        )?;
        let b = g.module_param("bias", &[c.cout], fan_in_bound(fan_in))?;
        let (stride, pad) = ([c.stride; 2], c.padding);
        match residual {
            Some(r) => g.conv2d_add(x, w, Some(b), stride, pad, r),
            None => g.conv2d_padded(x, w, Some(b), stride, pad),
        }
    })
}

/// `nn.GroupNorm(groups, channels, eps)` named `name`, followed by SiLU
/// when `silu` (fused into one kernel).
pub fn group_norm(
    g: &mut Graph,
    name: &str,
    x: TensorId,
    groups: usize,
    eps: f32,
    silu: bool,
) -> Result<TensorId> {
    let c = g.shape(x).get(1).copied().unwrap_or(0);
    g.scoped(name, |g| {
        let w = g.module_param("weight", &[c], Init::Const(1.0))?;
        let b = g.module_param("bias", &[c], Init::Const(0.0))?;
        if silu {
            g.group_norm_silu(x, w, b, groups, eps)
        } else {
            g.group_norm(x, w, b, groups, eps)
        }
    })
}

/// `nn.LayerNorm(dim, eps)` over the last dim, named `name`.
pub fn layer_norm(g: &mut Graph, name: &str, x: TensorId, eps: f32) -> Result<TensorId> {
    let d = g.shape(x).last().copied().unwrap_or(0);
    g.scoped(name, |g| {
        let w = g.module_param("weight", &[d], Init::Const(1.0))?;
        let b = g.module_param("bias", &[d], Init::Const(0.0))?;
        g.layer_norm(x, w, b, eps)
    })
}
