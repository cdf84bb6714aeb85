//! Group norm (torch.nn.GroupNorm with affine), optionally fused with the SiLU
//! that follows it everywhere in SD's UNet and VAE. Kernels:
//! `shaders/group_norm.wgsl`, which also serve layer norm
//! (`ops::layer_norm`): both normalize contiguous blocks of a `[O, C, S]` view.

use crate::dtype::DType;
use crate::error::{shape_err, Result};
use crate::graph::{Emit, Graph, Kernel, OpKernels, Slot, TensorId};

/// Most invocations of a per-row workgroup (rows with short chunks use fewer).
const ROW_WG: usize = 64;
/// Invocations per workgroup of the per-channel kernels.
const WG: u32 = 64;
/// Rows up to this long get one invocation each (no barriers) when there are
/// at least `ONE_LANE_ROWS` of them: per-workgroup costs dominate short rows.
const ONE_LANE_LEN: usize = 2048;
const ONE_LANE_ROWS: usize = 512;
/// Outer indices (layer-norm rows) one invocation sums for the parameter gradients.
const PARAM_ROWS: usize = 256;

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

    /// S == 1: a row is one chunk of its channels (see the shader).
    fn flat(&self) -> bool {
        self.spatial == 1
    }

    /// How the shaders walk a row: `cc` chunks of `l` elements.
    fn chunks(&self) -> (usize, usize) {
        if self.flat() {
            (1, self.group_channels())
        } else {
            (self.group_channels(), self.spatial)
        }
    }

    /// One invocation per row (see `ONE_LANE_LEN`).
    fn one_lane(&self) -> bool {
        let (cc, l) = self.chunks();
        cc * l <= ONE_LANE_LEN && self.rows() >= ONE_LANE_ROWS
    }

    /// Invocations per workgroup: a workgroup per row has enough lanes for a
    /// chunk's vec4s, 8 (a SIMD group) to 64.
    fn row_wg(&self) -> usize {
        if self.one_lane() {
            ROW_WG
        } else {
            self.chunks()
                .1
                .div_ceil(4)
                .next_power_of_two()
                .clamp(8, ROW_WG)
        }
    }

    /// Lanes working on one row.
    fn lanes(&self) -> usize {
        if self.one_lane() {
            1
        } else {
            self.row_wg()
        }
    }

    /// A per-row kernel (a workgroup, or with ONE_LANE an invocation, per
    /// row) with the row layout set.
    fn row_kernel(&self, entry: &'static str, silu: bool) -> Kernel {
        let (cc, l) = self.chunks();
        Kernel::new("group_norm", entry)
            .konst("WG", format!("{}u", self.row_wg()))
            .konst("VEC", l.is_multiple_of(4))
            .konst("FLAT", self.flat())
            .konst("SILU", silu)
            .konst("ONE_LANE", self.one_lane())
            .u32(self.rows())
            .u32(cc)
            .u32(l)
            .u32(self.groups)
            .u32(self.group_channels())
            .groups_1d(self.rows(), self.row_wg() as u32 / self.lanes() as u32)
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
        if groups == 0 || !xs[1].is_multiple_of(groups) {
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
    e.push(
        v.row_kernel("norm_forward", silu)
            .bind("x", Slot::Value(i[0]))
            .bind("gamma", Slot::Value(i[1]))
            .bind("beta", Slot::Value(i[2]))
            .bind("y", Slot::Value(o[0]))
            .bind("mean", Slot::Value(o[1]))
            .bind("rstd", Slot::Value(o[2]))
            .f32(eps),
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
    let (dx, dgamma, dbeta) = (e.grad_in(0), e.grad_in(1), e.grad_in(2));
    let params = dgamma.is_some() || dbeta.is_some();
    let bind_reads = |k: Kernel| {
        k.bind("x", Slot::Value(i[0]))
            .bind("dy", dy)
            .bind("gamma", Slot::Value(i[1]))
            .bind("beta", Slot::Value(i[2]))
            .bind("mean", Slot::Value(o[1]))
            .bind("rstd", Slot::Value(o[2]))
    };
    // Parameter-gradient partials: (slot, half, K, L) for norm_param_reduce
    // (gamma's from 0, beta's from `half`).
    let mut partials = None;
    // Chunks are channels: the row kernel writes per-lane partials.
    let row_partials = params && !v.flat();
    if dx.is_some() || row_partials {
        let lanes = v.lanes();
        let half = v.rows() * v.chunks().0 * lanes;
        let mut k = bind_reads(v.row_kernel("norm_backward", silu))
            .konst("DX", dx.is_some())
            .konst("PART", row_partials)
            .konst("ACC", dx.is_some_and(|t| t.beta() != 0.0))
            .u32(half);
        if let Some(dx) = dx {
            k = k.bind("dx", dx.slot);
        }
        if row_partials {
            let part = e.temp("param_partial", 2 * half, DType::F32);
            k = k.bind("part", part);
            partials = Some((part, half, v.outer, lanes));
        }
        e.push(k);
    }
    if params && !row_partials {
        let chunk = PARAM_ROWS.min(v.outer.max(1));
        let half = v.outer.div_ceil(chunk) * v.channels;
        let part = e.temp("param_partial", 2 * half, DType::F32);
        e.push(
            bind_reads(Kernel::new("group_norm", "norm_param_partial"))
                .konst("WG", format!("{WG}u"))
                .konst("SILU", silu)
                .bind("part", part)
                .u32(v.outer)
                .u32(v.channels)
                .u32(v.groups)
                .u32(v.group_channels())
                .u32(chunk)
                .u32(half)
                .groups_1d(half, WG),
        );
        partials = Some((part, half, half / v.channels, 1));
    }
    let Some((part, half, k_rows, l)) = partials else {
        return;
    };
    let mut k = Kernel::new("group_norm", "norm_param_reduce")
        .konst("WG", format!("{WG}u"))
        .konst("GAMMA", dgamma.is_some())
        .konst("BETA", dbeta.is_some())
        .bind("part", part);
    if let Some(t) = dgamma {
        k = k.bind("dgamma", t.slot);
    }
    if let Some(t) = dbeta {
        k = k.bind("dbeta", t.slot);
    }
    e.push(
        k.u32(v.channels)
            .u32(k_rows)
            .u32(l)
            .u32(half)
            .f32(dgamma.map_or(0.0, |t| t.beta()))
            .f32(dbeta.map_or(0.0, |t| t.beta()))
            .groups_1d(2 * v.channels, WG),
    );
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
    let (s, cg) = (v.spatial, v.group_channels());
    let m = cg * s;
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
            check_op(name, &inputs, &build, &reference, DType::F32, false);
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
        // spatial % 4 == 0 (vec4 chunks per channel), and spatial 1 with 4-channel
        // groups (FLAT vec4 rows).
        case("gn_silu_3x6x4x5_g3", &[3, 6, 4, 5], 3, true, true);
        case("gn_silu_5x8_g2", &[5, 8], 2, true, false);
    }

    #[test]
    fn group_norm_many_short_rows_one_lane() {
        // 171 * 3 = 513 rows of 8: one invocation per row.
        case("gn_silu_171x6x4_g3", &[171, 6, 4], 3, true, true);
    }

    #[test]
    fn group_norm_params_only() {
        // x needs no gradient: the backward still writes dgamma and dbeta.
        let inputs = [
            CaseInput::act(&[2, 6, 4]).no_grad(),
            CaseInput::param(&[6]),
            CaseInput::param(&[6]),
        ];
        let op = GroupNorm {
            groups: 3,
            eps: 1e-5,
            silu: true,
        };
        let v = op.view(&[2, 6, 4]);
        check_op(
            "gn_silu_2x6x4_g3_params_only",
            &inputs,
            &|g, x| g.group_norm_silu(x[0], x[1], x[2], 3, 1e-5),
            &|x| norm_cpu(&x[0], &x[1], &x[2], v, 1e-5, true),
            DType::F32,
            false,
        );
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
