//! 2-D convolution with PyTorch `nn.Conv2d` semantics (NCHW, weight
//! `[Co, Ci, KH, KW]`, optional bias `[Co]`, zero padding, dilation 1,
//! groups 1), as implicit GEMM kernels in `shaders/conv2d.wgsl`: forward,
//! data gradient (the transposed convolution) and weight gradient gather their
//! operands directly; the bias gradient is a broadcast reduction.

use super::elementwise::{broadcast_layout, emit_broadcast_reduce, emit_grad_copy};
use crate::dtype::DType;
use crate::error::{shape_err, Result};
use crate::graph::{Emit, GradTarget, Graph, Kernel, OpKernels, Slot, TensorId};

/// Attributes of a convolution node (inputs: x, weight, and bias when `bias`).
#[derive(Clone, Debug)]
pub struct Conv2d {
    /// (height, width)
    pub stride: [usize; 2],
    /// Zero padding before the first row and column, (height, width).
    pub padding: [usize; 2],
    /// Zero padding after the last row and column (diffusers' VAE
    /// downsampler pads only bottom and right).
    pub padding_end: [usize; 2],
    pub bias: bool,
    /// A tensor of the output's shape added in the same kernel (a ResNet
    /// block's skip connection); the input after the bias.
    pub residual: bool,
}

/// The sizes of one convolution.
#[derive(Clone, Copy, Debug)]
struct Geom {
    n: usize,
    ci: usize,
    h: usize,
    w: usize,
    co: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
}

impl Conv2d {
    fn geom(&self, x: &[usize], w: &[usize]) -> std::result::Result<Geom, String> {
        let [n, ci, h, wd] = *x else {
            return Err(format!("x {x:?} must be [N, C, H, W] (weight {w:?})"));
        };
        let [co, wci, kh, kw] = *w else {
            return Err(format!("weight {w:?} must be [Co, Ci, KH, KW] (x {x:?})"));
        };
        if wci != ci {
            return Err(format!(
                "x {x:?} has {ci} channels but weight {w:?} expects {wci}"
            ));
        }
        let [sh, sw] = self.stride;
        let [ph, pw] = [
            self.padding[0] + self.padding_end[0],
            self.padding[1] + self.padding_end[1],
        ];
        if sh == 0 || sw == 0 || kh == 0 || kw == 0 || co == 0 {
            return Err(format!(
                "weight {w:?} and stride {:?} must be nonzero (x {x:?})",
                self.stride
            ));
        }
        if h + ph < kh || wd + pw < kw {
            return Err(format!(
                "kernel of weight {w:?} is larger than x {x:?} padded by {:?} + {:?}",
                self.padding, self.padding_end
            ));
        }
        Ok(Geom {
            n,
            ci,
            h,
            w: wd,
            co,
            kh,
            kw,
            oh: (h + ph - kh) / sh + 1,
            ow: (wd + pw - kw) / sw + 1,
        })
    }

    /// The input index of the residual (after the bias).
    fn residual_input(&self) -> usize {
        2 + self.bias as usize
    }

    fn geom_of(&self, g: &Graph, i: &[TensorId]) -> Result<Geom> {
        self.geom(g.shape(i[0]), g.shape(i[1]))
            .map_err(|m| shape_err("conv2d", m))
    }

    /// A kernel of `entry` with the consts and the size params every entry shares.
    fn kernel(&self, entry: &'static str, d: &Geom) -> Kernel {
        size_kernel(entry, d, self.stride, self.padding.map(|v| v as i64))
    }
}

/// A kernel of `entry` with the consts and size params all entries share.
/// Paddings travel as u32 bit patterns of i32 (the flipped convolution of a
/// data gradient may need a negative one).
fn size_kernel(entry: &'static str, d: &Geom, stride: [usize; 2], pad: [i64; 2]) -> Kernel {
    Kernel::new("conv2d", entry)
        .konst("KH", format!("{}u", d.kh))
        .konst("KW", format!("{}u", d.kw))
        .konst("SH", format!("{}u", stride[0]))
        .konst("SW", format!("{}u", stride[1]))
        .u32(d.n)
        .u32(d.ci)
        .u32(d.h)
        .u32(d.w)
        .u32(d.co)
        .u32(d.oh)
        .u32(d.ow)
        .u32(pad[0] as i32 as u32 as usize)
        .u32(pad[1] as i32 as u32 as usize)
}

/// Workgroup size of `conv2d_dilate`.
const DILATE_WG: u32 = 64;

/// One run of the forward kernel: y = beta*y + conv(x, w) (+ bias).
struct ConvLaunch {
    d: Geom,
    stride: [usize; 2],
    pad: [i64; 2],
    x: Slot,
    w: Slot,
    bias: Option<Slot>,
    /// Added to the output (same layout as y).
    residual: Option<Slot>,
    y: Slot,
    /// Read w as the data gradient of a stride-1 conv does (see `w_index`).
    flip: bool,
    beta: f32,
}

/// Register tile per invocation of the portable kernels: (channels, rows,
/// workgroup size). CPU adapters run one SIMD lane per invocation and like
/// big tiles in one SIMD group; GPUs want more, smaller threads.
fn tile(e: &Emit) -> (usize, usize, u32) {
    if cpu_tiles(e) {
        (16, 2, 8)
    } else {
        (8, 2, 64)
    }
}

/// CPU adapters (tests can ask for the GPU choices).
fn cpu_tiles(e: &Emit) -> bool {
    e.caps.is_cpu
}

/// Adapters with 8-wide subgroups (llvmpipe) take the subgroup kernel.
fn use_subgroups(e: &Emit) -> bool {
    e.caps.subgroups_exactly(8)
}

/// Whether the subgroup kernels may load x a whole vector of 4 columns at a
/// time: output rows as wide as input rows (stride 1), a multiple of 4, and
/// 1-wide taps without padding or 3-wide ones with padding 1.
fn vector_rows(d: &Geom, stride_x: usize, pad_x: i64) -> bool {
    let taps = (d.kw, pad_x);
    stride_x == 1 && d.ow == d.w && d.w.is_multiple_of(4) && (taps == (1, 0) || taps == (3, 1))
}

fn emit_conv(e: &mut Emit, l: ConvLaunch) {
    let d = l.d;
    let khw = d.kh * d.kw;
    // (stride between output channels, between input channels) in w.
    let (w_cs, w_ks) = if l.flip {
        (khw, d.co * khw)
    } else {
        (d.ci * khw, khw)
    };
    let sg = use_subgroups(e);
    let (tc, ty, wg) = if sg { (16, 1, 8) } else { tile(e) };
    let (tiles_x, tiles_y) = (d.ow.div_ceil(4), d.oh.div_ceil(ty));
    let entry = if sg {
        "conv2d_forward_sg"
    } else {
        "conv2d_forward"
    };
    let mut k = size_kernel(entry, &d, l.stride, l.pad)
        .bind("x", l.x)
        .bind("w", l.w)
        .bind("y", l.y)
        .u32(w_cs)
        .u32(w_ks)
        .u32(tiles_x)
        .u32(tiles_y)
        .groups_1d(d.n * tiles_x * tiles_y, wg);
    k.workgroups[2] = d.co.div_ceil(tc) as u32;
    k = k
        .konst("ACC_Y", l.beta != 0.0)
        .konst("VEC_Y", d.ow.is_multiple_of(4));
    if sg {
        k = k.konst("VEC_X", vector_rows(&d, l.stride[1], l.pad[1]));
    } else {
        k = k
            .konst("TCO", format!("{tc}u"))
            .konst("TY", format!("{ty}u"))
            .konst("WG", format!("{wg}u"));
    }
    if l.flip {
        k = k.konst("FLIP", "true");
    }
    if let Some(b) = l.bias {
        k = k.bind("bias", b).konst("HAS_BIAS", "true");
    }
    if let Some(r) = l.residual {
        k = k.bind("res", r).konst("HAS_RES", "true");
    }
    e.push(k);
}

impl Conv2d {
    /// dx = beta*dx + the data gradient: conv(dy, w transposed and flipped)
    /// at stride 1 with padding K-1-p before (and K-1-p_end after). A strided
    /// conv's dy is first spread onto the stride-1 grid (`conv2d_dilate`,
    /// zeros between), of height H + p + p_end - K + 1 so that the stride-1
    /// output is exactly H.
    fn emit_grad_input(&self, e: &mut Emit, d: &Geom, dy: Slot, w: Slot, dx: Slot, beta: f32) {
        let [ph, pw] = self.padding;
        let [eh, ew] = self.padding_end;
        let (hd, wd) = (d.h + ph + eh + 1 - d.kh, d.w + pw + ew + 1 - d.kw);
        let src = if self.stride == [1, 1] {
            dy
        } else {
            let total = d.n * d.co * hd * wd;
            let dyd = e.temp("dy_dilated", total, DType::F32);
            e.push(
                Kernel::new("conv2d", "conv2d_dilate")
                    .konst("SH", format!("{}u", self.stride[0]))
                    .konst("SW", format!("{}u", self.stride[1]))
                    .bind("dy", dy)
                    .bind("dyd", dyd)
                    .u32(total)
                    .u32(d.oh)
                    .u32(d.ow)
                    .u32(hd)
                    .u32(wd)
                    .groups_1d(total, DILATE_WG),
            );
            dyd
        };
        let t = Geom {
            ci: d.co,
            h: hd,
            w: wd,
            co: d.ci,
            oh: d.h,
            ow: d.w,
            ..*d
        };
        emit_conv(
            e,
            ConvLaunch {
                d: t,
                stride: [1, 1],
                pad: [d.kh as i64 - 1 - ph as i64, d.kw as i64 - 1 - pw as i64],
                x: src,
                w,
                bias: None,
                residual: None,
                y: dx,
                flip: true,
                beta,
            },
        );
    }
}

impl Conv2d {
    /// dw = beta*dw + sum over n, oy, ox of dy x im2col(x), and the bias
    /// gradient `db` when asked. The output rows are split into chunks when
    /// that is needed to fill a GPU; chunks write partial sums to scratch that
    /// a fixed-order reduction then adds up. With one chunk the same kernel
    /// sums db from the dy it loads.
    fn emit_grad_weight(
        &self,
        e: &mut Emit,
        d: &Geom,
        x: Slot,
        dy: Slot,
        dw: GradTarget,
        db: Option<GradTarget>,
    ) -> Result<()> {
        let (dw, beta) = (dw.slot, dw.beta());
        let sg = use_subgroups(e);
        let wg = if sg { 8 } else { tile(e).2 };
        // Input channels per workgroup: the subgroup kernel's lanes own two.
        let ci_per_group = if sg { 16 } else { wg as usize };
        let numel = d.co * d.ci * d.kh * d.kw;
        // Workgroups: input channels x 16 output channels x (ky, 3 kx) x chunks.
        let taps = d.kh * d.kw.div_ceil(3);
        let (gx, gy) = (d.ci.div_ceil(ci_per_group), d.co.div_ceil(16));
        let rows = d.n * d.oh;
        // CPU adapters have few cores: one chunk keeps dy loads shared.
        let want = if cpu_tiles(e) {
            1
        } else {
            1024usize.div_ceil(gx * gy * taps)
        };
        let rows_per_chunk = rows.div_ceil(want.clamp(1, rows));
        let chunks = rows.div_ceil(rows_per_chunk);
        let (out, out_beta) = if chunks == 1 {
            (dw, beta)
        } else {
            (e.temp("dw_partial", chunks * numel, DType::F32), 0.0)
        };
        let fused_db = db.filter(|_| chunks == 1);
        let mut k = if sg {
            self.kernel("conv2d_grad_weight_sg", d).konst(
                "VEC_X",
                vector_rows(d, self.stride[1], self.padding[1] as i64),
            )
        } else {
            self.kernel("conv2d_grad_weight", d)
                .konst("WG", format!("{wg}u"))
        };
        k = k
            .bind("x", x)
            .bind("dy", dy)
            .bind("dw", out)
            .u32(chunks)
            .u32(rows_per_chunk)
            .u32(numel)
            .f32(fused_db.map_or(0.0, |t| t.beta()))
            .groups(gx as u32, gy as u32, (taps * chunks) as u32);
        k = k
            .konst("ACC_DW", out_beta != 0.0)
            .konst("VEC_DY", d.ow.is_multiple_of(4));
        if let Some(db) = fused_db {
            k = k.bind("db", db.slot).konst("HAS_DB", "true");
        }
        e.push(k);
        if let (Some(db), None) = (db, fused_db) {
            emit_grad_bias(e, d, dy, db)?;
        }
        if chunks > 1 {
            // The [chunks, numel] partial sums reduce over their first axis.
            let l = broadcast_layout(&[chunks, numel], &[1, numel])
                .map_err(|m| shape_err("conv2d", m))?;
            emit_broadcast_reduce(e, dw, out, None, &l, beta);
        }
        Ok(())
    }
}

/// db = beta*db + dy summed over everything but its channels.
fn emit_grad_bias(e: &mut Emit, d: &Geom, dy: Slot, db: GradTarget) -> Result<()> {
    let l = broadcast_layout(&[d.n, d.co, d.oh * d.ow], &[1, d.co, 1])
        .map_err(|m| shape_err("conv2d", m))?;
    emit_broadcast_reduce(e, db.slot, dy, None, &l, db.beta());
    Ok(())
}

impl Graph {
    /// torch's `nn.Conv2d(stride, padding)`: x `[N, Ci, H, W]`, weight
    /// `[Co, Ci, KH, KW]`, bias `[Co]` -> `[N, Co, OH, OW]`.
    pub fn conv2d(
        &mut self,
        x: TensorId,
        weight: TensorId,
        bias: Option<TensorId>,
        stride: usize,
        padding: usize,
    ) -> Result<TensorId> {
        self.conv2d_padded(x, weight, bias, [stride, stride], [padding; 4])
    }

    /// [`Graph::conv2d`] with separate (height, width) stride and padding.
    pub fn conv2d_hw(
        &mut self,
        x: TensorId,
        weight: TensorId,
        bias: Option<TensorId>,
        stride: [usize; 2],
        [ph, pw]: [usize; 2],
    ) -> Result<TensorId> {
        self.conv2d_padded(x, weight, bias, stride, [ph, pw, ph, pw])
    }

    /// [`Graph::conv2d`] with padding (top, left, bottom, right), like
    /// `F.pad(x, (left, right, top, bottom))` followed by an unpadded conv.
    pub fn conv2d_padded(
        &mut self,
        x: TensorId,
        weight: TensorId,
        bias: Option<TensorId>,
        stride: [usize; 2],
        padding: [usize; 4],
    ) -> Result<TensorId> {
        self.conv2d_node(x, weight, bias, stride, padding, None)
    }

    /// `conv2d_padded(x, weight, bias, stride, padding) + residual` in one
    /// kernel (residual of the output's shape).
    pub fn conv2d_add(
        &mut self,
        x: TensorId,
        weight: TensorId,
        bias: Option<TensorId>,
        stride: [usize; 2],
        padding: [usize; 4],
        residual: TensorId,
    ) -> Result<TensorId> {
        self.conv2d_node(x, weight, bias, stride, padding, Some(residual))
    }

    fn conv2d_node(
        &mut self,
        x: TensorId,
        weight: TensorId,
        bias: Option<TensorId>,
        stride: [usize; 2],
        [top, left, bottom, right]: [usize; 4],
        residual: Option<TensorId>,
    ) -> Result<TensorId> {
        let op = Conv2d {
            stride,
            padding: [top, left],
            padding_end: [bottom, right],
            bias: bias.is_some(),
            residual: residual.is_some(),
        };
        let d = op
            .geom(self.shape(x), self.shape(weight))
            .map_err(|m| shape_err("conv2d", m))?;
        let mut inputs = vec![x, weight];
        if let Some(b) = bias {
            if self.shape(b) != [d.co] {
                return Err(shape_err(
                    "conv2d",
                    format!(
                        "bias {:?} must be [{}] for weight {:?}",
                        self.shape(b),
                        d.co,
                        self.shape(weight)
                    ),
                ));
            }
            inputs.push(b);
        }
        let out = vec![d.n, d.co, d.oh, d.ow];
        if let Some(r) = residual {
            if self.shape(r) != out.as_slice() {
                return Err(shape_err(
                    "conv2d",
                    format!(
                        "residual {:?} must be the output's shape {out:?}",
                        self.shape(r)
                    ),
                ));
            }
            inputs.push(r);
        }
        let dt = self.dtype(x);
        Ok(self.add_node(op.into(), &inputs, &[(out, dt)])[0])
    }
}

impl OpKernels for Conv2d {
    fn kind(&self) -> &'static str {
        "conv2d"
    }

    fn grad_passthrough(&self, _g: &Graph, _i: &[TensorId]) -> Vec<(usize, usize)> {
        if self.residual {
            vec![(self.residual_input(), 0)]
        } else {
            Vec::new()
        }
    }

    fn forward(&self, e: &mut Emit, i: &[TensorId], o: &[TensorId]) -> Result<()> {
        let d = self.geom_of(e.graph, i)?;
        emit_conv(
            e,
            ConvLaunch {
                d,
                stride: self.stride,
                pad: self.padding.map(|v| v as i64),
                x: Slot::Value(i[0]),
                w: Slot::Value(i[1]),
                bias: self.bias.then(|| Slot::Value(i[2])),
                residual: self.residual.then(|| Slot::Value(i[self.residual_input()])),
                y: Slot::Value(o[0]),
                flip: false,
                beta: 0.0,
            },
        );
        Ok(())
    }

    fn backward(&self, e: &mut Emit, i: &[TensorId], _o: &[TensorId]) -> Result<()> {
        let Some(dy) = e.grad_out(0) else {
            return Ok(());
        };
        let d = self.geom_of(e.graph, i)?;
        if let Some(dx) = e.grad_in(0) {
            self.emit_grad_input(e, &d, dy, Slot::Value(i[1]), dx.slot, dx.beta());
        }
        if let Some(dr) = e.grad_in(self.residual_input()).filter(|_| self.residual) {
            emit_grad_copy(e, dr, dy, e.numel(i[self.residual_input()]));
        }
        let db = e.grad_in(2).filter(|_| self.bias);
        match (e.grad_in(1), db) {
            (Some(dw), db) => self.emit_grad_weight(e, &d, Slot::Value(i[0]), dy, dw, db)?,
            (None, Some(db)) => emit_grad_bias(e, &d, dy, db)?,
            (None, None) => {}
        }
        Ok(())
    }

    fn flops(&self, g: &Graph, i: &[TensorId], _o: &[TensorId]) -> u64 {
        self.geom(g.shape(i[0]), g.shape(i[1]))
            .map(|d| 2 * (d.n * d.co * d.oh * d.ow * d.ci * d.kh * d.kw) as u64)
            .unwrap_or(0)
    }
}

/// CPU reference (f64): x `[n, ci, h, w]`, weight `[co, ci, kh, kw]` -> `[n, co, oh, ow]`,
/// padding (top, left, bottom, right).
#[allow(clippy::too_many_arguments)]
pub fn conv2d_cpu(
    x: &[f64],
    weight: &[f64],
    bias: Option<&[f64]>,
    [n, ci, h, w]: [usize; 4],
    [co, kh, kw]: [usize; 3],
    stride: [usize; 2],
    padding: [usize; 4],
) -> Vec<f64> {
    let oh = (h + padding[0] + padding[2] - kh) / stride[0] + 1;
    let ow = (w + padding[1] + padding[3] - kw) / stride[1] + 1;
    let mut out = vec![0.0; n * co * oh * ow];
    for b in 0..n {
        for o in 0..co {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut s = bias.map(|v| v[o]).unwrap_or(0.0);
                    for c in 0..ci {
                        for ky in 0..kh {
                            let iy = (oy * stride[0] + ky) as isize - padding[0] as isize;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            for kx in 0..kw {
                                let ix = (ox * stride[1] + kx) as isize - padding[1] as isize;
                                if ix < 0 || ix >= w as isize {
                                    continue;
                                }
                                s += weight[((o * ci + c) * kh + ky) * kw + kx]
                                    * x[((b * ci + c) * h + iy as usize) * w + ix as usize];
                            }
                        }
                    }
                    out[((b * co + o) * oh + oy) * ow + ox] = s;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{check_op, check_op_all_dtypes, check_op_portable, CaseInput};

    /// One convolution case: x shape, (co, k), stride, padding (top, left,
    /// bottom, right), bias.
    struct Case {
        x: [usize; 4],
        co: usize,
        k: usize,
        stride: usize,
        padding: [usize; 4],
        bias: bool,
    }

    impl Case {
        fn inputs(&self) -> Vec<CaseInput> {
            let mut v = vec![
                CaseInput::act(&self.x),
                CaseInput::param(&[self.co, self.x[1], self.k, self.k]),
            ];
            if self.bias {
                v.push(CaseInput::param(&[self.co]));
            }
            v
        }

        fn build(&self, g: &mut Graph, t: &[TensorId]) -> Result<TensorId> {
            g.conv2d_padded(
                t[0],
                t[1],
                self.bias.then(|| t[2]),
                [self.stride; 2],
                self.padding,
            )
        }

        fn reference(&self, v: &[Vec<f64>]) -> Vec<f64> {
            conv2d_cpu(
                &v[0],
                &v[1],
                self.bias.then(|| v[2].as_slice()),
                self.x,
                [self.co, self.k, self.k],
                [self.stride; 2],
                self.padding,
            )
        }

        fn check(&self, name: &str, dtype: DType) {
            let r = check_op(
                name,
                &self.inputs(),
                &|g, t| self.build(g, t),
                &|v| self.reference(v),
                dtype,
                false,
            );
            println!("{name} [{dtype}]: {r:?}");
        }

        /// The kernels and tiles of a GPU without subgroups (portable
        /// forward, GPU tiles, weight gradient in chunks).
        fn check_portable(&self, name: &str, dtype: DType) {
            let r = check_op_portable(
                name,
                &self.inputs(),
                &|g, t| self.build(g, t),
                &|v| self.reference(v),
                dtype,
            );
            println!("{name} [{dtype}]: {r:?}");
        }

        fn check_all_dtypes(&self, name: &str) {
            check_op_all_dtypes(name, &self.inputs(), &|g, t| self.build(g, t), &|v| {
                self.reference(v)
            });
        }
    }

    #[test]
    fn k3_s1_p1_bias_all_dtypes() {
        let c = Case {
            x: [2, 3, 7, 5],
            co: 4,
            k: 3,
            stride: 1,
            padding: [1; 4],
            bias: true,
        };
        c.check_all_dtypes("conv_k3_s1_p1_bias_2x3x7x5_to_4");
    }

    /// Rows 12 and 16 wide: whole-vector stores (OW a multiple of 4) over
    /// several tiles per row.
    #[test]
    fn k3_s1_p1_wide_rows_all_dtypes() {
        for w in [12, 16] {
            let c = Case {
                x: [1, 3, 3, w],
                co: 18,
                k: 3,
                stride: 1,
                padding: [1; 4],
                bias: true,
            };
            c.check_all_dtypes(&format!("conv_k3_s1_p1_bias_1x3x3x{w}_to_18"));
        }
    }

    #[test]
    fn k3_s2_p1_odd_all_dtypes() {
        let c = Case {
            x: [2, 3, 9, 7],
            co: 5,
            k: 3,
            stride: 2,
            padding: [1; 4],
            bias: true,
        };
        c.check_all_dtypes("conv_k3_s2_p1_bias_2x3x9x7_to_5");
    }

    #[test]
    fn k3_s1_p1_no_bias() {
        let c = Case {
            x: [1, 5, 6, 9],
            co: 3,
            k: 3,
            stride: 1,
            padding: [1; 4],
            bias: false,
        };
        c.check("conv_k3_s1_p1_1x5x6x9_to_3", DType::F32);
    }

    /// Rows 7 wide (element loads) and 8 wide (whole-vector loads of x).
    #[test]
    fn k1_s1_p0() {
        for w in [7, 8] {
            let c = Case {
                x: [2, 5, 3, w],
                co: 17,
                k: 1,
                stride: 1,
                padding: [0; 4],
                bias: true,
            };
            c.check(&format!("conv_k1_s1_p0_bias_2x5x3x{w}_to_17"), DType::F32);
        }
    }

    #[test]
    fn k3_s1_p0() {
        let c = Case {
            x: [2, 3, 6, 7],
            co: 3,
            k: 3,
            stride: 1,
            padding: [0; 4],
            bias: false,
        };
        c.check("conv_k3_s1_p0_2x3x6x7_to_3", DType::F32);
    }

    #[test]
    fn k5_s1_p2_taps_past_one_launch() {
        // KW = 5: the weight gradient covers a kernel row in two launches of 3 taps.
        let c = Case {
            x: [1, 2, 7, 6],
            co: 3,
            k: 5,
            stride: 1,
            padding: [2; 4],
            bias: false,
        };
        c.check("conv_k5_s1_p2_1x2x7x6_to_3", DType::F32);
    }

    #[test]
    fn k3_s2_p0_even() {
        let c = Case {
            x: [1, 3, 8, 10],
            co: 4,
            k: 3,
            stride: 2,
            padding: [0; 4],
            bias: true,
        };
        c.check("conv_k3_s2_p0_bias_1x3x8x10_to_4", DType::F32);
    }

    #[test]
    fn k3_s2_p1_no_bias_many_channels() {
        // Channel counts above one register tile (16 on CPU adapters, 8 elsewhere).
        let c = Case {
            x: [1, 19, 5, 11],
            co: 18,
            k: 3,
            stride: 2,
            padding: [1; 4],
            bias: false,
        };
        c.check("conv_k3_s2_p1_1x19x5x11_to_18", DType::F32);
    }

    #[test]
    fn k3_s1_p1_many_channels_vector_rows() {
        // Both input channels of a weight-gradient lane, whole-vector rows.
        let c = Case {
            x: [2, 19, 5, 8],
            co: 18,
            k: 3,
            stride: 1,
            padding: [1; 4],
            bias: true,
        };
        c.check_all_dtypes("conv_k3_s1_p1_bias_2x19x5x8_to_18");
    }

    #[test]
    fn asymmetric_padding() {
        // diffusers' VAE downsampler: F.pad(x, (0, 1, 0, 1)) then a stride-2 conv.
        let c = Case {
            x: [2, 3, 8, 6],
            co: 4,
            k: 3,
            stride: 2,
            padding: [0, 0, 1, 1],
            bias: true,
        };
        c.check("conv_k3_s2_pad0011_2x3x8x6_to_4", DType::F32);
        let c = Case {
            x: [1, 2, 5, 7],
            co: 3,
            k: 3,
            stride: 1,
            padding: [2, 0, 1, 3],
            bias: false,
        };
        c.check("conv_k3_s1_pad2013_1x2x5x7_to_3", DType::F32);
    }

    /// One weight and bias applied to two inputs: the second backward
    /// accumulates into dw and db. One output row keeps the portable weight
    /// gradient in one chunk, so both kernels sum db themselves; 18 output
    /// channels cross a 16-channel block.
    #[test]
    fn shared_conv_accumulates_weight_and_bias_gradients() {
        let (x, co) = ([1, 3, 1, 6], 18);
        let inputs = [
            CaseInput::act(&x),
            CaseInput::act(&x),
            CaseInput::param(&[co, x[1], 3, 3]),
            CaseInput::param(&[co]),
        ];
        let build = |g: &mut Graph, t: &[TensorId]| {
            let y0 = g.conv2d_padded(t[0], t[2], Some(t[3]), [1; 2], [1; 4])?;
            let y1 = g.conv2d_padded(t[1], t[2], Some(t[3]), [1; 2], [1; 4])?;
            g.add(y0, y1)
        };
        let reference = |v: &[Vec<f64>]| {
            let conv =
                |xv: &[f64]| conv2d_cpu(xv, &v[2], Some(&v[3]), x, [co, 3, 3], [1; 2], [1; 4]);
            let (y0, y1) = (conv(&v[0]), conv(&v[1]));
            y0.iter().zip(&y1).map(|(a, b)| a + b).collect()
        };
        check_op(
            "shared_conv",
            &inputs,
            &build,
            &reference,
            DType::F32,
            false,
        );
        check_op_portable("shared_conv", &inputs, &build, &reference, DType::F32);
    }

    /// `conv + residual` in the forward kernel's epilogue (both the vector
    /// and the scalar store: OW = 6), subgroup and portable kernels.
    #[test]
    fn conv_with_residual_epilogue() {
        let (x, co) = ([2, 3, 5, 6], 5);
        let inputs = [
            CaseInput::act(&x),
            CaseInput::param(&[co, x[1], 3, 3]),
            CaseInput::param(&[co]),
            CaseInput::act(&[2, co, 5, 6]),
        ];
        let build = |g: &mut Graph, t: &[TensorId]| {
            g.conv2d_add(t[0], t[1], Some(t[2]), [1; 2], [1; 4], t[3])
        };
        let reference = |v: &[Vec<f64>]| {
            let y = conv2d_cpu(&v[0], &v[1], Some(&v[2]), x, [co, 3, 3], [1; 2], [1; 4]);
            y.iter().zip(&v[3]).map(|(a, r)| a + r).collect()
        };
        check_op_all_dtypes("conv_residual", &inputs, &build, &reference);
        check_op_portable("conv_residual", &inputs, &build, &reference, DType::F32);
    }

    #[test]
    fn portable_kernels_without_subgroups() {
        let c = Case {
            x: [2, 3, 7, 5],
            co: 4,
            k: 3,
            stride: 1,
            padding: [1; 4],
            bias: true,
        };
        c.check_portable("conv_k3_s1_p1_bias_2x3x7x5_to_4", DType::F32);
        c.check_portable("conv_k3_s1_p1_bias_2x3x7x5_to_4", DType::F16);
        let c = Case {
            x: [1, 19, 6, 9],
            co: 18,
            k: 3,
            stride: 1,
            padding: [1; 4],
            bias: false,
        };
        c.check_portable("conv_k3_s1_p1_1x19x6x9_to_18", DType::F32);
        let c = Case {
            x: [2, 3, 5, 7],
            co: 5,
            k: 5,
            stride: 2,
            padding: [1; 4],
            bias: false,
        };
        c.check_portable("conv_k5_s2_p1_2x3x5x7_to_5", DType::F32);
    }

    #[test]
    fn shape_errors_name_the_shapes() {
        let mut g = Graph::new();
        let x = g.input("x", &[2, 3, 8, 8], DType::F32);
        let w = g.param("w", &[4, 5, 3, 3]);
        let err = g.conv2d(x, w, None, 1, 1).unwrap_err().to_string();
        assert!(
            err.contains("conv2d") && err.contains("[2, 3, 8, 8]") && err.contains("[4, 5, 3, 3]"),
            "{err}"
        );
        let w = g.param("w2", &[4, 3, 3, 3]);
        let b = g.param("b", &[5]);
        let err = g.conv2d(x, w, Some(b), 1, 1).unwrap_err().to_string();
        assert!(err.contains("conv2d") && err.contains("[5]"), "{err}");
    }
}
