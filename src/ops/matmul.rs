//! Batched matmul and linear layers. Forward and both backward products run
//! the one strided GEMM kernel in `shaders/matmul.wgsl`. A linear layer's
//! bias gradient comes out of its weight gradient's GEMM (the row sums of
//! dC^T); other bias gradients are a column sum (`elementwise::broadcast_reduce`).

use super::elementwise::{broadcast_layout, emit_broadcast_reduce, emit_grad_copy};
use crate::error::{shape_err, Result};
use crate::graph::{Emit, GradTarget, Graph, Kernel, OpKernels, Slot, TensorId};

/// `out = op(a) @ op(b) (+ bias) (+ residual)`, op = transpose when asked.
///
/// Shapes: a `[.., M, K]` (`[.., K, M]` transposed); b `[K, N]` (`[N, K]`
/// transposed) shared by every batch, or `[.., K, N]` with a's batch dims;
/// bias `[N]`; residual and out `[.., M, N]`. Inputs: a, b, then bias and
/// residual when present. The residual add of a transformer block is the
/// GEMM's epilogue, not a pass of its own.
#[derive(Clone, Debug)]
pub struct Matmul {
    pub trans_a: bool,
    pub trans_b: bool,
    pub bias: bool,
    pub residual: bool,
}

/// A(z, m, k) = buf[z * bs + m * rs + k * cs]
#[derive(Clone, Copy, Debug)]
struct Operand {
    slot: Slot,
    bs: usize,
    rs: usize,
    cs: usize,
}

/// One GEMM launch: c[z] = beta * c[z] + A[z] B[z] (+ bias), c contiguous.
struct Gemm {
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    a: Operand,
    b: Operand,
    bias: Option<Slot>,
    /// Added to the product (same layout as c).
    residual: Option<Slot>,
    c: Slot,
    beta: f32,
    /// Also write rowsum = beta' * rowsum + sum_k A(m, k) (batch 1 only).
    rowsum: Option<GradTarget>,
}

/// Register tile and workgroup width per adapter: (RB, CB, WGX): each
/// invocation owns 4 RB rows x 4 CB columns, a workgroup WGX invocations.
/// CPU adapters (llvmpipe) run a workgroup of 8 as one SIMD group and favour
/// big register tiles; GPUs want wide workgroups for coalesced B reads.
/// On CPU adapters a product at most 32 columns wide takes 4-column tiles:
/// a 64-wide panel would leave half its lanes computing zeros.
fn tile(e: &Emit, n: usize) -> (usize, usize, usize) {
    if e.caps.is_cpu {
        (8, if n <= 32 { 1 } else { 2 }, 8)
    } else {
        (2, 1, 64)
    }
}

/// Multiply-adds from which the subgroup GEMM computes two row tiles per
/// workgroup (SD 1.5's products at 32x32 latents: 10^8; the small and
/// built-in UNets': at most 10^7). Unit tests take two tiles at any size.
fn two_tiles_pay_off(macs: usize) -> bool {
    cfg!(test) || macs >= 1 << 25
}

fn emit_gemm(e: &mut Emit, g: Gemm) {
    let (rb, cb, wgx) = tile(e, g.n);
    let (tm, pw) = (4 * rb, 4 * cb * wgx);
    let panels = g.n.div_ceil(pw);
    // The subgroup kernel shares A through the subgroup where the subgroup is
    // exactly one 8-wide workgroup (llvmpipe's SIMD group).
    let sg = wgx == 8 && e.caps.subgroups_exactly(8);
    // 1. Pack B into PW-wide panels (zero past N), unless the kernel can read
    // it in place: row-major with rows starting at vec4 boundaries (direct),
    // or, in the subgroup kernel, transposed with columns starting at vec4
    // boundaries and K a multiple of 4 (a linear layer's weight).
    let direct = g.b.cs == 1
        && g.b.rs.is_multiple_of(4)
        && g.b.bs.is_multiple_of(4)
        && g.n.is_multiple_of(4);
    let transposed = sg
        && !direct
        && g.b.rs == 1
        && g.b.cs.is_multiple_of(4)
        && g.b.bs.is_multiple_of(4)
        && g.k.is_multiple_of(4);
    let bp = if direct || transposed {
        g.b.slot
    } else {
        let total = g.batch * panels * g.k * pw;
        let b_dtype = e.slot_dtype(g.b.slot);
        let bp = e.temp("packed_b", total, b_dtype);
        e.push(
            Kernel::new("matmul", "pack_b")
                .konst("PW", format!("{pw}u"))
                .bind("b", g.b.slot)
                .bind("bp", bp)
                .u32(g.n)
                .u32(g.k)
                .u32(g.b.bs)
                .u32(g.b.rs)
                .u32(g.b.cs)
                .u32(panels)
                .u32(total)
                .groups_1d(total / 4, 256),
        );
        bp
    };
    // 2. The register-tiled product.
    let mut k = Kernel::new("matmul", if sg { "gemm_subgroup" } else { "gemm" })
        .konst("RB", format!("{rb}u"))
        .konst("CB", format!("{cb}u"))
        .konst("WGX", format!("{wgx}u"))
        .bind("a", g.a.slot)
        .bind("bp", bp)
        .bind("c", g.c);
    if let Some(bias) = g.bias {
        k = k.bind("bias", bias).konst("HAS_BIAS", "true");
    }
    if let Some(r) = g.residual {
        k = k.bind("res", r).konst("HAS_RES", "true");
    }
    if direct {
        k = k.konst("DIRECT_B", "true");
    }
    k = k
        .konst("VEC_C", g.n.is_multiple_of(4))
        .konst("ACC_C", g.beta != 0.0);
    if transposed {
        k = k.konst("TRANS_B", "true");
    }
    // Row-major A whose rows start at vec4 boundaries: the subgroup kernel
    // loads each lane's rows 4 k at a time.
    if sg
        && g.a.cs == 1
        && g.a.rs.is_multiple_of(4)
        && g.a.bs.is_multiple_of(4)
        && g.rowsum.is_none()
    {
        k = k.konst("ROW_A", "true");
    } else if sg && g.a.rs == 1 && g.a.cs.is_multiple_of(4) && g.a.bs.is_multiple_of(4) {
        // A transposed (a weight gradient's dC^T), columns starting at vec4
        // boundaries: 4 rows of a column in one load.
        k = k.konst("COL_A4", "true");
    }
    // Two row tiles per workgroup share B's loads (subgroup kernel, M >= 64),
    // for big products only: the doubled unrolled code costs llvmpipe compile
    // time and resident memory (with two tiles everywhere the small benchmark
    // peaked at 448 MiB instead of 306), which small models would pay for
    // nothing.
    let big = two_tiles_pay_off(g.batch * g.m * g.n * g.k);
    let mt = if sg && g.m >= 2 * tm && big { 2 } else { 1 };
    if sg {
        k = k.konst("MT", format!("{mt}u"));
    }
    if let Some(r) = g.rowsum {
        debug_assert_eq!(g.batch, 1, "GEMM row sums of several batches");
        k = k.bind("rowsum", r.slot).konst("ROWSUM", "true");
    }
    let k = k
        .u32(g.m)
        .u32(g.n)
        .u32(g.k)
        .u32(g.a.bs)
        .u32(g.a.rs)
        .u32(g.a.cs)
        .u32(panels)
        .u32(g.b.bs)
        // The stride between B's stored rows (its columns when transposed).
        .u32(if transposed { g.b.cs } else { g.b.rs })
        .f32(g.rowsum.map_or(0.0, |r| r.beta()))
        .groups(panels as u32, g.m.div_ceil(tm * mt) as u32, g.batch as u32);
    e.push(k);
}

/// The logical problem of a matmul node.
struct Dims {
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    /// b is one matrix shared by all batches (folded into M).
    shared_b: bool,
}

impl Matmul {
    /// The input index of the residual (after the bias).
    fn residual_input(&self) -> usize {
        2 + self.bias as usize
    }

    fn dims(&self, a: &[usize], b: &[usize]) -> std::result::Result<Dims, String> {
        if a.len() < 2 || b.len() < 2 {
            return Err(format!(
                "operands need at least 2 dims, got {a:?} and {b:?}"
            ));
        }
        let (ar, ac) = (a[a.len() - 2], a[a.len() - 1]);
        let (m, ka) = if self.trans_a { (ac, ar) } else { (ar, ac) };
        let (br, bc) = (b[b.len() - 2], b[b.len() - 1]);
        let (kb, n) = if self.trans_b { (bc, br) } else { (br, bc) };
        if ka != kb {
            return Err(format!(
                "inner dims differ: a {a:?}{} vs b {b:?}{}",
                if self.trans_a { "^T" } else { "" },
                if self.trans_b { "^T" } else { "" }
            ));
        }
        let a_batch: usize = a[..a.len() - 2].iter().product();
        if b.len() == 2 {
            if self.trans_a && a_batch > 1 {
                return Err(format!(
                    "a transposed with batch dims {a:?} needs a batched b, got {b:?}"
                ));
            }
            return Ok(Dims {
                batch: 1,
                m: m * a_batch,
                n,
                k: ka,
                shared_b: true,
            });
        }
        if a[..a.len() - 2] != b[..b.len() - 2] {
            return Err(format!("batch dims differ: {a:?} vs {b:?}"));
        }
        Ok(Dims {
            batch: a_batch,
            m,
            n,
            k: ka,
            shared_b: false,
        })
    }

    fn a_operand(&self, slot: Slot, d: &Dims) -> Operand {
        let bs = d.m * d.k;
        if self.trans_a {
            Operand {
                slot,
                bs,
                rs: 1,
                cs: d.m,
            }
        } else {
            Operand {
                slot,
                bs,
                rs: d.k,
                cs: 1,
            }
        }
    }

    fn b_operand(&self, slot: Slot, d: &Dims) -> Operand {
        let bs = if d.shared_b { 0 } else { d.k * d.n };
        if self.trans_b {
            Operand {
                slot,
                bs,
                rs: 1,
                cs: d.k,
            }
        } else {
            Operand {
                slot,
                bs,
                rs: d.n,
                cs: 1,
            }
        }
    }
}

/// The operand "X^T" of an operand X (swap its row and column strides).
fn t(o: Operand) -> Operand {
    Operand {
        rs: o.cs,
        cs: o.rs,
        ..o
    }
}

impl Graph {
    /// `a @ b` (batched; b may be a shared 2-D matrix).
    pub fn matmul(
        &mut self,
        a: TensorId,
        b: TensorId,
        trans_a: bool,
        trans_b: bool,
    ) -> Result<TensorId> {
        self.matmul_node(
            Matmul {
                trans_a,
                trans_b,
                bias: false,
                residual: false,
            },
            &[a, b],
        )
    }

    /// torch's `nn.Linear`: `x @ weight^T + bias`, weight `[out, in]`.
    pub fn linear(
        &mut self,
        x: TensorId,
        weight: TensorId,
        bias: Option<TensorId>,
    ) -> Result<TensorId> {
        self.linear_node(x, weight, bias, None)
    }

    /// `linear(x, weight, bias) + residual` in one kernel (residual of the
    /// output's shape).
    pub fn linear_add(
        &mut self,
        x: TensorId,
        weight: TensorId,
        bias: Option<TensorId>,
        residual: TensorId,
    ) -> Result<TensorId> {
        self.linear_node(x, weight, bias, Some(residual))
    }

    fn linear_node(
        &mut self,
        x: TensorId,
        weight: TensorId,
        bias: Option<TensorId>,
        residual: Option<TensorId>,
    ) -> Result<TensorId> {
        let op = Matmul {
            trans_a: false,
            trans_b: true,
            bias: bias.is_some(),
            residual: residual.is_some(),
        };
        let inputs: Vec<TensorId> = [x, weight]
            .into_iter()
            .chain(bias)
            .chain(residual)
            .collect();
        self.matmul_node(op, &inputs)
    }

    fn matmul_node(&mut self, op: Matmul, inputs: &[TensorId]) -> Result<TensorId> {
        let (a, b) = (
            self.shape(inputs[0]).to_vec(),
            self.shape(inputs[1]).to_vec(),
        );
        let d = op.dims(&a, &b).map_err(|m| shape_err("matmul", m))?;
        if op.bias && self.shape(inputs[2]) != [d.n] {
            return Err(shape_err(
                "matmul",
                format!("bias {:?} must be [{}]", self.shape(inputs[2]), d.n),
            ));
        }
        let mut out = a[..a.len() - 2].to_vec();
        let m = if op.trans_a {
            a[a.len() - 1]
        } else {
            a[a.len() - 2]
        };
        out.extend([m, d.n]);
        if op.residual && self.shape(inputs[op.residual_input()]) != out.as_slice() {
            return Err(shape_err(
                "matmul",
                format!(
                    "residual {:?} must be the output's shape {out:?}",
                    self.shape(inputs[op.residual_input()])
                ),
            ));
        }
        let dt = self.dtype(inputs[0]);
        Ok(self.add_node(op.into(), inputs, &[(out, dt)])[0])
    }
}

impl OpKernels for Matmul {
    fn kind(&self) -> &'static str {
        "matmul"
    }

    fn grad_passthrough(&self, _g: &Graph, _i: &[TensorId]) -> Vec<(usize, usize)> {
        if self.residual {
            vec![(self.residual_input(), 0)]
        } else {
            Vec::new()
        }
    }

    fn forward(&self, e: &mut Emit, i: &[TensorId], o: &[TensorId]) -> Result<()> {
        let d = self
            .dims(e.shape(i[0]), e.shape(i[1]))
            .map_err(|m| shape_err("matmul", m))?;
        let g = Gemm {
            batch: d.batch,
            m: d.m,
            n: d.n,
            k: d.k,
            a: self.a_operand(Slot::Value(i[0]), &d),
            b: self.b_operand(Slot::Value(i[1]), &d),
            bias: self.bias.then(|| Slot::Value(i[2])),
            residual: self.residual.then(|| Slot::Value(i[self.residual_input()])),
            c: Slot::Value(o[0]),
            beta: 0.0,
            rowsum: None,
        };
        emit_gemm(e, g);
        Ok(())
    }

    fn backward(&self, e: &mut Emit, i: &[TensorId], _o: &[TensorId]) -> Result<()> {
        let Some(dc) = e.grad_out(0) else {
            return Ok(());
        };
        let d = self
            .dims(e.shape(i[0]), e.shape(i[1]))
            .map_err(|m| shape_err("matmul", m))?;
        let a = self.a_operand(Slot::Value(i[0]), &d);
        let b = self.b_operand(Slot::Value(i[1]), &d);
        let dc_op = Operand {
            slot: dc,
            bs: d.m * d.n,
            rs: d.n,
            cs: 1,
        };
        if let Some(da) = e.grad_in(0) {
            // dA = dC B^T (M x K); stored transposed when a was: dA^T = B dC^T.
            let g = if self.trans_a {
                Gemm {
                    batch: d.batch,
                    m: d.k,
                    n: d.m,
                    k: d.n,
                    a: b,
                    b: t(dc_op),
                    bias: None,
                    residual: None,
                    c: da.slot,
                    beta: da.beta(),
                    rowsum: None,
                }
            } else {
                Gemm {
                    batch: d.batch,
                    m: d.m,
                    n: d.k,
                    k: d.n,
                    a: dc_op,
                    b: t(b),
                    bias: None,
                    residual: None,
                    c: da.slot,
                    beta: da.beta(),
                    rowsum: None,
                }
            };
            emit_gemm(e, g);
        }
        // A linear layer's bias gradient: the row sums of dC^T, the A of dB^T.
        let dbias = e.grad_in(2).filter(|_| self.bias);
        let fused_dbias = dbias.filter(|_| self.trans_b && d.shared_b && e.grad_in(1).is_some());
        if let Some(db) = e.grad_in(1) {
            // dB = A^T dC (K x N); stored transposed when b was: dB^T = dC^T A.
            // A shared b was folded into M, so this sums over the batch too.
            let g = if self.trans_b {
                Gemm {
                    batch: d.batch,
                    m: d.n,
                    n: d.k,
                    k: d.m,
                    a: t(dc_op),
                    b: a,
                    bias: None,
                    residual: None,
                    c: db.slot,
                    beta: db.beta(),
                    rowsum: fused_dbias,
                }
            } else {
                Gemm {
                    batch: d.batch,
                    m: d.k,
                    n: d.n,
                    k: d.m,
                    a: t(a),
                    b: dc_op,
                    bias: None,
                    residual: None,
                    c: db.slot,
                    beta: db.beta(),
                    rowsum: None,
                }
            };
            emit_gemm(e, g);
        }
        if let Some(dr) = e.grad_in(self.residual_input()).filter(|_| self.residual) {
            emit_grad_copy(e, dr, dc, e.numel(i[self.residual_input()]));
        }
        if let (Some(dbias), None) = (dbias, fused_dbias) {
            let l = broadcast_layout(&[d.batch * d.m, d.n], &[d.n])
                .map_err(|m| shape_err("matmul", m))?;
            emit_broadcast_reduce(e, dbias.slot, dc, None, &l, dbias.beta());
        }
        Ok(())
    }

    fn flops(&self, g: &Graph, i: &[TensorId], _o: &[TensorId]) -> u64 {
        self.dims(g.shape(i[0]), g.shape(i[1]))
            .map(|d| 2 * (d.batch * d.m * d.n * d.k) as u64)
            .unwrap_or(0)
    }
}

/// The sizes and layout of a CPU reference matmul.
#[derive(Clone, Copy, Debug)]
pub struct MatmulShape {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    /// b is one matrix for every batch.
    pub shared_b: bool,
}

/// CPU reference: out[z] = op(a[z]) @ op(b[z]) (+ bias), f64.
pub fn matmul_cpu(a: &[f64], b: &[f64], bias: Option<&[f64]>, s: MatmulShape) -> Vec<f64> {
    let MatmulShape {
        batch,
        m,
        n,
        k,
        trans_a,
        trans_b,
        shared_b,
    } = s;
    let mut out = vec![0.0; batch * m * n];
    for z in 0..batch {
        let bz = if shared_b { 0 } else { z * k * n };
        for r in 0..m {
            for c in 0..n {
                let mut acc = bias.map(|b| b[c]).unwrap_or(0.0);
                for q in 0..k {
                    let av = if trans_a {
                        a[z * m * k + q * m + r]
                    } else {
                        a[z * m * k + r * k + q]
                    };
                    let bv = if trans_b {
                        b[bz + c * k + q]
                    } else {
                        b[bz + q * n + c]
                    };
                    acc += av * bv;
                }
                out[z * m * n + r * n + c] = acc;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::ops::testing::{check_op, check_op_all_dtypes, check_op_portable, CaseInput};

    /// The product of a linear layer: `m` rows of x times W `[n, k]`^T.
    fn linear_shape(m: usize, n: usize, k: usize) -> MatmulShape {
        MatmulShape {
            batch: 1,
            m,
            n,
            k,
            trans_a: false,
            trans_b: true,
            shared_b: true,
        }
    }

    #[test]
    fn linear_odd_shapes_all_dtypes() {
        // x [2, 5, 7] @ W[9, 7]^T + b[9]: M = 10 and N = 9 do not divide the tiles.
        check_op_all_dtypes(
            "linear_2x5x7_to_9",
            &[
                CaseInput::act(&[2, 5, 7]),
                CaseInput::param(&[9, 7]),
                CaseInput::param(&[9]),
            ],
            &|g, x| g.linear(x[0], x[1], Some(x[2])),
            &|x| matmul_cpu(&x[0], &x[1], Some(&x[2]), linear_shape(10, 9, 7)),
        );
    }

    /// Linear layers whose weight the subgroup GEMM reads transposed in
    /// place (K a multiple of 4): K = 12 and 20 cover whole 8-step blocks
    /// and a 4-step tail; N = 9 and 37 columns past the edge, 4- and
    /// 8-column tiles. N = 100: the weight gradient's A (dY^T) has columns
    /// starting at vec4 boundaries, loaded 4 rows at a time, with the bias
    /// gradient summed from them, over two row tiles per workgroup.
    #[test]
    fn linear_weight_read_transposed_all_dtypes() {
        for (n, k) in [(9, 12), (37, 20), (100, 20)] {
            check_op_all_dtypes(
                &format!("linear_3x4x{k}_to_{n}"),
                &[
                    CaseInput::act(&[3, 4, k]),
                    CaseInput::param(&[n, k]),
                    CaseInput::param(&[n]),
                ],
                &|g, x| g.linear(x[0], x[1], Some(x[2])),
                &|x| matmul_cpu(&x[0], &x[1], Some(&x[2]), linear_shape(12, n, k)),
            );
        }
    }

    /// A weight and bias shared by two linear layers: the second backward
    /// accumulates into both gradients, on the subgroup and portable GEMMs
    /// (the bias gradient is the weight-gradient GEMM's row sums). M = 10 is
    /// not a multiple of the subgroup's k block.
    #[test]
    fn shared_linear_accumulates_weight_and_bias_gradients() {
        let shape = linear_shape(10, 9, 7);
        let inputs = [
            CaseInput::act(&[10, 7]),
            CaseInput::act(&[10, 7]),
            CaseInput::param(&[9, 7]),
            CaseInput::param(&[9]),
        ];
        let build = |g: &mut Graph, x: &[TensorId]| {
            let y0 = g.linear(x[0], x[2], Some(x[3]))?;
            let y1 = g.linear(x[1], x[2], Some(x[3]))?;
            g.add(y0, y1)
        };
        let reference = |x: &[Vec<f64>]| {
            let y0 = matmul_cpu(&x[0], &x[2], Some(&x[3]), shape);
            let y1 = matmul_cpu(&x[1], &x[2], Some(&x[3]), shape);
            y0.iter().zip(&y1).map(|(a, b)| a + b).collect()
        };
        check_op(
            "shared_linear",
            &inputs,
            &build,
            &reference,
            DType::F32,
            false,
        );
        check_op_portable("shared_linear", &inputs, &build, &reference, DType::F32);
    }

    /// `linear + residual` in the GEMM's epilogue, on the subgroup and the
    /// portable kernels; the residual's gradient is the output's.
    #[test]
    fn linear_with_residual_epilogue() {
        let shape = linear_shape(10, 9, 7);
        let inputs = [
            CaseInput::act(&[2, 5, 7]),
            CaseInput::param(&[9, 7]),
            CaseInput::param(&[9]),
            CaseInput::act(&[2, 5, 9]),
        ];
        let build = |g: &mut Graph, x: &[TensorId]| g.linear_add(x[0], x[1], Some(x[2]), x[3]);
        let reference = |x: &[Vec<f64>]| {
            let y = matmul_cpu(&x[0], &x[1], Some(&x[2]), shape);
            y.iter().zip(&x[3]).map(|(a, r)| a + r).collect()
        };
        check_op_all_dtypes("linear_residual", &inputs, &build, &reference);
        check_op_portable("linear_residual", &inputs, &build, &reference, DType::F32);
        let mut g = Graph::new();
        let x = g.input("x", &[2, 5, 7], DType::F32);
        let w = g.param("w", &[9, 7]);
        let r = g.input("r", &[2, 5, 8], DType::F32);
        let err = g.linear_add(x, w, None, r).unwrap_err().to_string();
        assert!(
            err.contains("[2, 5, 8]") && err.contains("[2, 5, 9]"),
            "{err}"
        );
    }

    /// Every transpose, with n = 6 (B packed) and n = 8 (a row-major B read
    /// in place; its transposed backward products are packed).
    #[test]
    fn batched_matmul_transposes() {
        let cases = [(false, false), (true, false), (false, true), (true, true)];
        for ((ta, tb), n) in cases.into_iter().flat_map(|c| [(c, 6), (c, 8)]) {
            // K = 12: one 8-k block of the subgroup kernel and a tail.
            let (bt, m, k) = (3, 5, 12);
            let ash = if ta { [bt, k, m] } else { [bt, m, k] };
            let bsh = if tb { [bt, n, k] } else { [bt, k, n] };
            check_op(
                &format!("bmm_ta{ta}_tb{tb}_n{n}"),
                &[CaseInput::act(&ash), CaseInput::act(&bsh)],
                &|g, x| g.matmul(x[0], x[1], ta, tb),
                &|x| {
                    matmul_cpu(
                        &x[0],
                        &x[1],
                        None,
                        MatmulShape {
                            batch: bt,
                            m,
                            n,
                            k,
                            trans_a: ta,
                            trans_b: tb,
                            shared_b: false,
                        },
                    )
                },
                DType::F32,
                false,
            );
        }
    }

    /// n = 37 packs B; n = 72 reads it in place, past one 64-wide panel.
    #[test]
    fn matmul_bigger_than_one_tile_all_dtypes() {
        // K = 44: row-major A read 4 k at a time by the subgroup kernel, with
        // a tail of 4 k after the 8-k blocks. M = 70 and 100: the subgroup
        // kernel's two 32-row tiles per workgroup, the second one dead or
        // partly live in the last workgroup.
        for (m, n, k) in [(70, 37, 33), (70, 72, 33), (100, 37, 44)] {
            matmul_all_dtypes(m, n, k);
        }
    }

    fn matmul_all_dtypes(m: usize, n: usize, k: usize) {
        check_op_all_dtypes(
            &format!("matmul_{m}x{k}x{n}"),
            &[CaseInput::act(&[m, k]), CaseInput::act(&[k, n])],
            &|g, x| g.matmul(x[0], x[1], false, false),
            &|x| {
                matmul_cpu(
                    &x[0],
                    &x[1],
                    None,
                    MatmulShape {
                        batch: 1,
                        m,
                        n,
                        k,
                        trans_a: false,
                        trans_b: false,
                        shared_b: true,
                    },
                )
            },
        );
    }

    #[test]
    fn portable_kernel_without_subgroups() {
        // K = 21 is not a multiple of the subgroup block, N = 13 not of the panel.
        let (m, n, k) = (19, 13, 21);
        check_op_portable(
            "matmul_19x21x13",
            &[CaseInput::act(&[m, k]), CaseInput::act(&[k, n])],
            &|g, x| g.matmul(x[0], x[1], false, false),
            &|x| {
                matmul_cpu(
                    &x[0],
                    &x[1],
                    None,
                    MatmulShape {
                        batch: 1,
                        m,
                        n,
                        k,
                        trans_a: false,
                        trans_b: false,
                        shared_b: true,
                    },
                )
            },
            DType::F32,
        );
    }

    #[test]
    fn shape_errors_name_the_shapes() {
        let mut g = Graph::new();
        let a = g.input("a", &[2, 3], DType::F32);
        let b = g.input("b", &[4, 5], DType::F32);
        let err = g.matmul(a, b, false, false).unwrap_err().to_string();
        assert!(
            err.contains("matmul") && err.contains("[2, 3]") && err.contains("[4, 5]"),
            "{err}"
        );
    }
}
