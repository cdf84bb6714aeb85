//! Group norm (torch.nn.GroupNorm with affine), optionally fused with the SiLU
//! that follows it everywhere in SD's UNet and VAE. Kernels:
//! `shaders/group_norm.wgsl`, which also serve layer norm
//! (`ops::layer_norm`): both normalize contiguous blocks of a `[O, C, S]` view.

use crate::dtype::DType;
use crate::error::{shape_err, Result};
use crate::graph::{Emit, Graph, Kernel, OpKernels, Slot, TensorId};

/// Invocations per workgroup of the elementwise kernels (4 elements each).
const WG: u32 = 64;
/// Invocations per workgroup of the per-row reductions.
const RED_WG: u32 = 64;
/// Elements one invocation of the parameter-gradient kernel sums at least.
const PARAM_CHUNK: usize = 1024;

/// `GroupNorm(groups, C, eps, affine=True)`, then SiLU when `silu`.
/// Inputs x `[N, C, *spatial]`, gamma `[C]`, beta `[C]`; outputs y (x's
/// shape and dtype), and the saved f32 mean and rstd `[N, groups]`.
#[derive(Clone, Debug)]
pub struct GroupNorm {
    pub groups: usize,
    pub eps: f32,
    pub silu: bool,
}

/// x viewed as `[outer, channels, spatial]`, normalized over each of the
/// `outer * groups` contiguous blocks ("rows") of `channels / groups` channels.
#[derive(Clone, Copy, Debug)]
pub(crate) struct NormView {
    pub outer: usize,
    pub channels: usize,
    pub spatial: usize,
    pub groups: usize,
}

impl NormView {
    fn rows(&self) -> usize {
        self.outer * self.groups
    }

    fn group_channels(&self) -> usize {
        self.channels / self.groups
    }

    /// Elements per row.
    fn row_len(&self) -> usize {
        self.group_channels() * self.spatial
    }

    fn numel(&self) -> usize {
        self.outer * self.channels * self.spatial
    }

    /// The shaders' MODE: how a vec4 of elements maps to channels.
    fn mode(&self) -> u32 {
        if self.spatial % 4 == 0 {
            1
        } else if self.spatial == 1 && self.row_len() % 4 == 0 {
            2
        } else {
            0
        }
    }
}

impl GroupNorm {
    fn view(&self, x: &[usize]) -> NormView {
        NormView {
            outer: x[0],
            channels: x[1],
            spatial: x[2..].iter().product(),
            groups: self.groups,
        }
    }
}

impl Graph {
    /// `nn.GroupNorm(groups, C, eps)(x)` with weight `gamma` and bias `beta`.
    pub fn group_norm(
        &mut self,
        x: TensorId,
        gamma: TensorId,
        beta: TensorId,
        groups: usize,
        eps: f32,
    ) -> Result<TensorId> {
        self.group_norm_node(x, gamma, beta, groups, eps, false)
    }

    /// `silu(group_norm(x))` in one op (the pre-activation is not stored).
    pub fn group_norm_silu(
        &mut self,
        x: TensorId,
        gamma: TensorId,
        beta: TensorId,
        groups: usize,
        eps: f32,
    ) -> Result<TensorId> {
        self.group_norm_node(x, gamma, beta, groups, eps, true)
    }

    fn group_norm_node(
        &mut self,
        x: TensorId,
        gamma: TensorId,
        beta: TensorId,
        groups: usize,
        eps: f32,
        silu: bool,
    ) -> Result<TensorId> {
        let xs = self.shape(x).to_vec();
        let (gs, bs) = (self.shape(gamma), self.shape(beta));
        if xs.len() < 2 {
            return Err(shape_err(
                "group_norm",
                format!("x {xs:?} needs at least 2 dims [N, C, ..]"),
            ));
        }
        if groups == 0 || xs[1] % groups != 0 {
            return Err(shape_err(
                "group_norm",
                format!(
                    "{groups} groups do not divide the {} channels of x {xs:?}",
                    xs[1]
                ),
            ));
        }
        if gs != [xs[1]] || bs != [xs[1]] {
            return Err(shape_err(
                "group_norm",
                format!(
                    "gamma {gs:?} and beta {bs:?} must be [{}] for x {xs:?}",
                    xs[1]
                ),
            ));
        }
        let stats = (vec![xs[0], groups], DType::F32);
        let dt = self.dtype(x);
        let op = GroupNorm { groups, eps, silu };
        Ok(self.add_node(
            op.into(),
            &[x, gamma, beta],
            &[(xs, dt), stats.clone(), stats],
        )[0])
    }
}

/// Forward of a normalization: inputs [x, gamma, beta], outputs [y, mean, rstd].
pub(crate) fn emit_norm_forward(
    e: &mut Emit,
    v: NormView,
    eps: f32,
    silu: bool,
    i: &[TensorId],
    o: &[TensorId],
) {
    let (rows, m) = (v.rows(), v.row_len());
    e.push(
        Kernel::new("group_norm", "norm_stats")
            .konst("WG", format!("{RED_WG}u"))
            .konst("VEC", v.mode() != 0)
            .bind("x", Slot::Value(i[0]))
            .bind("mean", Slot::Value(o[1]))
            .bind("rstd", Slot::Value(o[2]))
            .u32(rows)
            .u32(m)
            .f32(eps)
            .groups_1d(rows, 1),
    );
    let n = v.numel();
    e.push(
        Kernel::new("group_norm", "norm_apply")
            .konst("WG", format!("{WG}u"))
            .konst("MODE", format!("{}u", v.mode()))
            .konst("SILU", silu)
            .bind("x", Slot::Value(i[0]))
            .bind("gamma", Slot::Value(i[1]))
            .bind("beta", Slot::Value(i[2]))
            .bind("mean", Slot::Value(o[1]))
            .bind("rstd", Slot::Value(o[2]))
            .bind("y", Slot::Value(o[0]))
            .u32(n)
            .u32(v.channels)
            .u32(v.spatial)
            .u32(m)
            .groups_1d(n.div_ceil(4), WG),
    );
}

/// Backward of a normalization (see the top of `shaders/group_norm.wgsl`).
pub(crate) fn emit_norm_backward(
    e: &mut Emit,
    v: NormView,
    silu: bool,
    i: &[TensorId],
    o: &[TensorId],
) {
    let Some(dy) = e.grad_out(0) else {
        return;
    };
    let (rows, m, mode) = (v.rows(), v.row_len(), v.mode());
    // The slots every backward kernel reads, in their header order.
    let reads = [
        ("x", Slot::Value(i[0])),
        ("dy", dy),
        ("gamma", Slot::Value(i[1])),
        ("beta", Slot::Value(i[2])),
        ("mean", Slot::Value(o[1])),
        ("rstd", Slot::Value(o[2])),
    ];
    let kernel = |entry: &'static str| {
        reads.iter().fold(
            Kernel::new("group_norm", entry).konst("SILU", silu).konst(
                "WG",
                format!(
                    "{}u",
                    if entry == "norm_backward_sums" {
                        RED_WG
                    } else {
                        WG
                    }
                ),
            ),
            |k, &(name, slot)| k.bind(name, slot),
        )
    };
    if let Some(dx) = e.grad_in(0) {
        let ab = e.temp("ab", 2 * rows, DType::F32);
        e.push(
            kernel("norm_backward_sums")
                .konst("MODE", format!("{mode}u"))
                .bind("ab", ab)
                .u32(rows)
                .u32(m)
                .u32(v.spatial)
                .u32(v.group_channels())
                .u32(v.groups)
                .groups_1d(rows, 1),
        );
        let n = v.numel();
        e.push(
            kernel("norm_backward_dx")
                .konst("MODE", format!("{mode}u"))
                .bind("ab", ab)
                .bind("dx", dx.slot)
                .u32(n)
                .u32(v.channels)
                .u32(v.spatial)
                .u32(m)
                .f32(dx.beta())
                .groups_1d(n.div_ceil(4), WG),
        );
    }
    let (dgamma, dbeta) = (e.grad_in(1), e.grad_in(2));
    if dgamma.is_none() && dbeta.is_none() {
        return;
    }
    // Parameter gradients: partial sums over chunks of the outer dim, then
    // an ordered sum of the chunks.
    let chunk = PARAM_CHUNK.div_ceil(v.spatial).clamp(1, v.outer.max(1));
    let kc = v.outer.div_ceil(chunk) * v.channels;
    let part = e.temp("param_partial", 2 * kc, DType::F32);
    e.push(
        kernel("norm_param_partial")
            .konst("VEC", v.spatial % 4 == 0)
            .bind("part", part)
            .u32(v.outer)
            .u32(v.channels)
            .u32(v.spatial)
            .u32(v.group_channels())
            .u32(v.groups)
            .u32(chunk)
            .u32(kc)
            .groups_1d(kc, WG),
    );
    for (target, offset) in [(dgamma, 0), (dbeta, kc)] {
        if let Some(t) = target {
            e.push(
                Kernel::new("group_norm", "norm_param_reduce")
                    .konst("WG", format!("{WG}u"))
                    .bind("part", part)
                    .bind("dp", t.slot)
                    .u32(v.channels)
                    .u32(kc / v.channels)
                    .u32(offset)
                    .f32(t.beta())
                    .groups_1d(v.channels, WG),
            );
        }
    }
}

impl OpKernels for GroupNorm {
    fn kind(&self) -> &'static str {
        if self.silu {
            "group_norm_silu"
        } else {
            "group_norm"
        }
    }

    fn forward(&self, e: &mut Emit, i: &[TensorId], o: &[TensorId]) -> Result<()> {
        let v = self.view(e.shape(i[0]));
        emit_norm_forward(e, v, self.eps, self.silu, i, o);
        Ok(())
    }

    fn backward(&self, e: &mut Emit, i: &[TensorId], o: &[TensorId]) -> Result<()> {
        let v = self.view(e.shape(i[0]));
        emit_norm_backward(e, v, self.silu, i, o);
        Ok(())
    }

    fn flops(&self, g: &Graph, i: &[TensorId], _o: &[TensorId]) -> u64 {
        (if self.silu { 12 } else { 8 }) * g.numel(i[0]) as u64
    }
}

/// CPU reference (f64) of a normalization over `v`, with the two-pass variance.
#[cfg(test)]
pub(crate) fn norm_cpu(
    x: &[f64],
    gamma: &[f64],
    beta: &[f64],
    v: NormView,
    eps: f64,
    silu: bool,
) -> Vec<f64> {
    let (m, s, cg) = (v.row_len(), v.spatial, v.group_channels());
    let mut y = vec![0.0; x.len()];
    for row in 0..v.rows() {
        let xs = &x[row * m..(row + 1) * m];
        let mean = xs.iter().sum::<f64>() / m as f64;
        let var = xs.iter().map(|a| (a - mean) * (a - mean)).sum::<f64>() / m as f64;
        let rstd = 1.0 / (var + eps).sqrt();
        for (j, &a) in xs.iter().enumerate() {
            let c = (row % v.groups) * cg + j / s;
            let pre = (a - mean) * rstd * gamma[c] + beta[c];
            y[row * m + j] = if silu {
                pre / (1.0 + (-pre).exp())
            } else {
                pre
            };
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{check_op, check_op_all_dtypes, CaseInput};

    fn case(name: &str, shape: &[usize], groups: usize, silu: bool, all_dtypes: bool) {
        let c = shape[1];
        let inputs = [
            CaseInput::act(shape),
            CaseInput::param(&[c]),
            CaseInput::param(&[c]),
        ];
        let op = GroupNorm {
            groups,
            eps: 1e-5,
            silu,
        };
        let v = op.view(shape);
        let build = move |g: &mut Graph, x: &[TensorId]| {
            if silu {
                g.group_norm_silu(x[0], x[1], x[2], groups, 1e-5)
            } else {
                g.group_norm(x[0], x[1], x[2], groups, 1e-5)
            }
        };
        let reference = move |x: &[Vec<f64>]| norm_cpu(&x[0], &x[1], &x[2], v, 1e-5, silu);
        if all_dtypes {
            check_op_all_dtypes(name, &inputs, &build, &reference);
        } else {
            let r = check_op(name, &inputs, &build, &reference, DType::F32, false);
            let grads: Vec<String> = r.grad_errs.iter().map(|e| format!("{e:.1e}")).collect();
            eprintln!("{name}: forward {:.1e}, grads {grads:?}", r.forward_err);
        }
    }

    #[test]
    fn group_norm_2x6x5x3_3_groups() {
        case("gn_2x6x5x3_g3", &[2, 6, 5, 3], 3, false, false);
    }

    #[test]
    fn group_norm_silu_2x6x5x3_all_dtypes() {
        case("gn_silu_2x6x5x3_g3", &[2, 6, 5, 3], 3, true, true);
    }

    #[test]
    fn group_norm_rank3_2_groups() {
        case("gn_3x4x7_g2", &[3, 4, 7], 2, false, false);
        case("gn_silu_3x4x7_g2", &[3, 4, 7], 2, true, false);
    }

    #[test]
    fn group_norm_groups_equal_channels() {
        case("gn_2x5x3x3_g5", &[2, 5, 3, 3], 5, false, false);
        case("gn_silu_2x5x3x3_g5", &[2, 5, 3, 3], 5, true, false);
    }

    #[test]
    fn group_norm_vec4_paths() {
        // spatial % 4 == 0 (MODE 1), and spatial 1 with 4-channel groups (MODE 2).
        case("gn_silu_3x6x4x5_g3", &[3, 6, 4, 5], 3, true, true);
        case("gn_silu_5x8_g2", &[5, 8], 2, true, false);
    }

    #[test]
    fn group_norm_shape_errors() {
        let mut g = Graph::new();
        let x = g.input("x", &[2, 6, 4], DType::F32);
        let p = g.param("p", &[6]);
        let q = g.param("q", &[5]);
        let err = g.group_norm(x, p, p, 4, 1e-5).unwrap_err().to_string();
        assert!(
            err.contains("[2, 6, 4]") && err.contains("4 groups"),
            "{err}"
        );
        let err = g.group_norm(x, q, p, 3, 1e-5).unwrap_err().to_string();
        assert!(err.contains("[5]"), "{err}");
    }
}
