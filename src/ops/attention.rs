//! Multi-head scaled-dot-product attention (self and cross, optional causal
//! mask), flash style: the forward runs an online softmax over key tiles and
//! saves each row's logsumexp; the backward (FlashAttention-2) recomputes the
//! probabilities from it, one kernel owning query rows for dQ and one owning
//! key rows for dK and dV, so no score matrix is ever stored and no gradient
//! needs atomics. Kernels: `shaders/attention.wgsl`.
//!
//! Tensors keep diffusers' `Attention` layout before its head split:
//! q `[B, Sq, H*D]`, k and v `[B, Sk, H*D]`, out `[B, Sq, H*D]`.

use crate::dtype::DType;
use crate::error::{shape_err, Result};
use crate::graph::{Emit, Graph, Kernel, OpKernels, Slot, TensorId};

/// `softmax(Q K^T * scale [+ causal mask]) V` per head, as torch's
/// `F.scaled_dot_product_attention` on the heads diffusers splits off.
/// Outputs: the attention result and the logsumexp `[B, H, Sq]` (f32) the
/// backward needs.
#[derive(Clone, Debug)]
pub struct Attention {
    pub heads: usize,
    /// Multiplies the scores; `1 / sqrt(D)` by default.
    pub scale: f32,
    /// Mask key j for query i when j > i (CLIP's text encoder).
    pub causal: bool,
}

/// The problem sizes of an attention node.
#[derive(Clone, Copy, Debug)]
struct Dims {
    batch: usize,
    sq: usize,
    sk: usize,
    heads: usize,
    /// Head dim D; rows are `heads * d` wide.
    d: usize,
}

impl Attention {
    fn dims(&self, q: &[usize], k: &[usize], v: &[usize]) -> std::result::Result<Dims, String> {
        if q.len() != 3 || k.len() != 3 || v.len() != 3 {
            return Err(format!(
                "q {q:?}, k {k:?}, v {v:?} must all be [B, S, heads * D]"
            ));
        }
        if k != v || q[0] != k[0] || q[2] != k[2] {
            return Err(format!(
                "q {q:?}, k {k:?}, v {v:?}: k and v must match, and share B and channels with q"
            ));
        }
        if self.heads == 0 || !q[2].is_multiple_of(self.heads) || q[2] == 0 {
            return Err(format!(
                "channels of q {q:?} must be a positive multiple of heads = {}",
                self.heads
            ));
        }
        if q[1] == 0 || k[1] == 0 {
            return Err(format!("q {q:?} and k {k:?} need at least one row"));
        }
        Ok(Dims {
            batch: q[0],
            sq: q[1],
            sk: k[1],
            heads: self.heads,
            d: q[2] / self.heads,
        })
    }

    fn node_dims(&self, e: &Emit, i: &[TensorId]) -> Result<Dims> {
        self.dims(e.shape(i[0]), e.shape(i[1]), e.shape(i[2]))
            .map_err(|m| shape_err("attention", m))
    }
}

impl Graph {
    /// Multi-head attention of q `[B, Sq, H*D]` over k, v `[B, Sk, H*D]` with
    /// `heads` = H and scale `1 / sqrt(D)`.
    pub fn attention(
        &mut self,
        q: TensorId,
        k: TensorId,
        v: TensorId,
        heads: usize,
        causal: bool,
    ) -> Result<TensorId> {
        let channels = self.shape(q).last().copied().unwrap_or(0);
        // heads = 0 is reported by the shape check in attention_scaled.
        let d = channels.checked_div(heads).unwrap_or(1);
        let scale = 1.0 / (d.max(1) as f32).sqrt();
        self.attention_scaled(q, k, v, heads, causal, scale)
    }

    /// [`Graph::attention`] with an explicit score scale.
    pub fn attention_scaled(
        &mut self,
        q: TensorId,
        k: TensorId,
        v: TensorId,
        heads: usize,
        causal: bool,
        scale: f32,
    ) -> Result<TensorId> {
        let op = Attention {
            heads,
            scale,
            causal,
        };
        let d = op
            .dims(self.shape(q), self.shape(k), self.shape(v))
            .map_err(|m| shape_err("attention", m))?;
        let out = self.shape(q).to_vec();
        let lse = vec![d.batch, d.heads, d.sq];
        let dt = self.dtype(q);
        Ok(self.add_node(op.into(), &[q, k, v], &[(out, dt), (lse, DType::F32)])[0])
    }
}

/// Launch shape per adapter: (invocations per workgroup, rows per
/// invocation, keys per forward tile). CPU adapters run a workgroup as one
/// SIMD group and like a few rows of register accumulators per invocation;
/// GPUs want many threads with few registers each.
fn tile(e: &Emit, d: &Dims) -> (usize, usize, usize) {
    if e.caps.is_cpu && d.d > SG_MAX_D {
        // Wide heads (SD's 80 and 160, the VAE's 512): one row per
        // invocation keeps its q and accumulator arrays small enough for
        // llvmpipe (4 rows spilled them: 20x slower at D = 512).
        (8, 1, 8)
    } else if e.caps.is_cpu {
        (8, 4, 8)
    } else {
        (64, 1, 16)
    }
}

/// Width of the subgroup forward's workgroup (one subgroup), its query
/// rows per lane, and the largest head dim it holds in registers
/// (`ROW_MAX_D` in the shader).
const SG_WIDTH: usize = 8;
const SG_ROWS: usize = 4;
const SG_MAX_D: usize = 64;

/// Whether the `*_subgroup` kernels apply: subgroups exactly one workgroup
/// wide (they share K/V rows by shuffles) and rows that fit their registers.
fn subgroup_rows(e: &Emit, d: &Dims) -> bool {
    e.caps.subgroups_exactly(SG_WIDTH as u32) && d.d <= SG_MAX_D
}

/// A kernel over row blocks: workgroup x covers `wg * rq` rows of `rows`,
/// y is the (batch, head) pair.
fn blocks(
    entry: &'static str,
    a: &Attention,
    d: &Dims,
    rows: usize,
    wg: usize,
    rq: usize,
) -> Kernel {
    Kernel::new("attention", entry)
        .konst("D", format!("{}u", d.d))
        .konst("RQ", format!("{rq}u"))
        .konst("CAUSAL", a.causal)
        .groups(rows.div_ceil(wg * rq) as u32, (d.batch * d.heads) as u32, 1)
}

/// [`blocks`] with the adapter's tile.
fn row_kernel(e: &Emit, entry: &'static str, a: &Attention, d: &Dims, rows: usize) -> Kernel {
    let (wg, rq, _) = tile(e, d);
    blocks(entry, a, d, rows, wg, rq).konst("WG", format!("{wg}u"))
}

impl OpKernels for Attention {
    fn kind(&self) -> &'static str {
        "attention"
    }

    fn forward(&self, e: &mut Emit, i: &[TensorId], o: &[TensorId]) -> Result<()> {
        let d = self.node_dims(e, i)?;
        let k = if subgroup_rows(e, &d) {
            let entry = "attention_forward_subgroup";
            blocks(entry, self, &d, d.sq, SG_WIDTH, SG_ROWS)
        } else {
            let (_, _, kt) = tile(e, &d);
            row_kernel(e, "attention_forward", self, &d, d.sq).konst("KT", format!("{kt}u"))
        };
        let k = k
            .bind("q", Slot::Value(i[0]))
            .bind("k", Slot::Value(i[1]))
            .bind("v", Slot::Value(i[2]))
            .bind("o", Slot::Value(o[0]))
            .bind("lse", Slot::Value(o[1]))
            .u32(d.sq)
            .u32(d.sk)
            .u32(d.heads)
            .u32(d.heads * d.d)
            .f32(self.scale * std::f32::consts::LOG2_E);
        e.push(k);
        Ok(())
    }

    fn backward(&self, e: &mut Emit, i: &[TensorId], o: &[TensorId]) -> Result<()> {
        // The logsumexp output is internal: only d(out) drives the backward.
        let Some(dout) = e.grad_out(0) else {
            return Ok(());
        };
        let d = self.node_dims(e, i)?;
        let rows = d.batch * d.heads * d.sq;
        const DELTA_WG: u32 = 64;
        let delta = e.temp("delta", rows, DType::F32);
        e.push(
            Kernel::new("attention", "attention_delta")
                .konst("D", format!("{}u", d.d))
                .konst("WG", format!("{DELTA_WG}u"))
                .bind("o", Slot::Value(o[0]))
                .bind("dout", dout)
                .bind("delta", delta)
                .u32(rows)
                .u32(d.sq)
                .u32(d.heads)
                .u32(d.heads * d.d)
                .groups_1d(rows, DELTA_WG),
        );
        let common = |k: Kernel| {
            k.bind("q", Slot::Value(i[0]))
                .bind("k", Slot::Value(i[1]))
                .bind("v", Slot::Value(i[2]))
                .bind("dout", dout)
                .bind("lse", Slot::Value(o[1]))
                .bind("delta", delta)
                .u32(d.sq)
                .u32(d.sk)
                .u32(d.heads)
                .u32(d.heads * d.d)
                .f32(self.scale)
        };
        if let Some(dq) = e.grad_in(0) {
            let kernel = if subgroup_rows(e, &d) {
                let entry = "attention_backward_dq_subgroup";
                blocks(entry, self, &d, d.sq, SG_WIDTH, SG_ROWS)
            } else {
                row_kernel(e, "attention_backward_dq", self, &d, d.sq)
            };
            let k = common(kernel).bind("dq", dq.slot).f32(dq.beta());
            e.push(k);
        }
        let (dk, dv) = (e.grad_in(1), e.grad_in(2));
        if dk.is_some() || dv.is_some() {
            let kernel = if subgroup_rows(e, &d) {
                let entry = "attention_backward_dkv_subgroup";
                blocks(entry, self, &d, d.sk, SG_WIDTH, SG_ROWS)
            } else {
                row_kernel(e, "attention_backward_dkv", self, &d, d.sk)
            };
            let mut k = common(kernel)
                .konst("HAS_DK", dk.is_some())
                .konst("HAS_DV", dv.is_some())
                .f32(dk.map_or(0.0, |t| t.beta()))
                .f32(dv.map_or(0.0, |t| t.beta()));
            if let Some(t) = dk {
                k = k.bind("dk", t.slot);
            }
            if let Some(t) = dv {
                k = k.bind("dv", t.slot);
            }
            e.push(k);
        }
        Ok(())
    }

    fn flops(&self, g: &Graph, i: &[TensorId], _o: &[TensorId]) -> u64 {
        self.dims(g.shape(i[0]), g.shape(i[1]), g.shape(i[2]))
            .map(|d| 4 * (d.batch * d.heads * d.sq * d.sk * d.d) as u64)
            .unwrap_or(0)
    }
}

/// CPU reference, f64: per batch and head, `softmax(Q K^T * scale) V` with
/// key j masked for query i when `causal` and j > i. Layouts as the op's.
#[allow(clippy::too_many_arguments)]
pub fn attention_cpu(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    batch: usize,
    sq: usize,
    sk: usize,
    heads: usize,
    d: usize,
    scale: f64,
    causal: bool,
) -> Vec<f64> {
    let hd = heads * d;
    let mut out = vec![0.0; batch * sq * hd];
    for b in 0..batch {
        for h in 0..heads {
            for i in 0..sq {
                let qi = &q[(b * sq + i) * hd + h * d..][..d];
                let keys = if causal { sk.min(i + 1) } else { sk };
                let scores: Vec<f64> = (0..keys)
                    .map(|j| {
                        let kj = &k[(b * sk + j) * hd + h * d..][..d];
                        qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>() * scale
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                let oi = &mut out[(b * sq + i) * hd + h * d..][..d];
                for (j, w) in weights.iter().enumerate() {
                    let vj = &v[(b * sk + j) * hd + h * d..][..d];
                    for (o, x) in oi.iter_mut().zip(vj) {
                        *o += w / total * x;
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{
        check_op, check_op_all_dtypes, check_op_portable, random, CaseInput,
    };

    /// Inputs of magnitude ~1..3 so the softmax is far from flat.
    fn qkv(b: usize, sq: usize, sk: usize, hd: usize) -> [CaseInput; 3] {
        let vals = |n: usize, seed: u64| random(n, seed).iter().map(|x| 3.0 * x).collect();
        [
            CaseInput::act(&[b, sq, hd]).values(vals(b * sq * hd, 11)),
            CaseInput::act(&[b, sk, hd]).values(vals(b * sk * hd, 12)),
            CaseInput::act(&[b, sk, hd]).values(vals(b * sk * hd, 13)),
        ]
    }

    /// Check one case; `dtypes` runs every storage dtype, else f32 only.
    fn check(
        name: &str,
        (b, sq, sk, h, d): (usize, usize, usize, usize, usize),
        causal: bool,
        dtypes: bool,
    ) {
        let scale = 1.0 / (d as f64).sqrt();
        let build = |g: &mut Graph, x: &[TensorId]| g.attention(x[0], x[1], x[2], h, causal);
        let reference =
            |x: &[Vec<f64>]| attention_cpu(&x[0], &x[1], &x[2], b, sq, sk, h, d, scale, causal);
        let inputs = qkv(b, sq, sk, h * d);
        if dtypes {
            check_op_all_dtypes(name, &inputs, &build, &reference);
        } else {
            let r = check_op(name, &inputs, &build, &reference, DType::F32, false);
            println!("{name}: {r:?}");
        }
    }

    #[test]
    fn self_attention_b2_s7_h3_d5() {
        check("self_b2_s7_h3_d5", (2, 7, 7, 3, 5), false, true);
    }

    #[test]
    fn cross_attention_sq9_sk13_h2_d4() {
        check("cross_b2_sq9_sk13_h2_d4", (2, 9, 13, 2, 4), false, true);
    }

    #[test]
    fn causal_self_attention_s6() {
        check("causal_b2_s6_h2_d3", (2, 6, 6, 2, 3), true, false);
    }

    #[test]
    fn single_head_longer_than_a_tile_s37_d8() {
        check("single_head_b1_s37_d8", (1, 37, 37, 1, 8), false, false);
        check(
            "causal_single_head_b1_s37_d8",
            (1, 37, 37, 1, 8),
            true,
            false,
        );
    }

    #[test]
    fn head_dims_across_register_blocks() {
        // D = 37: three of the subgroup kernel's 4x4 blocks, the last partial.
        check("self_b1_s11_h2_d37", (1, 11, 11, 2, 37), false, false);
        // D = 66 > SG_MAX_D: the array kernel even with subgroups.
        check("cross_b1_sq5_sk6_h1_d66", (1, 5, 6, 1, 66), false, false);
    }

    #[test]
    fn portable_kernels_without_subgroups() {
        for (name, causal) in [
            ("portable_b2_sq9_sk13_h2_d5", false),
            ("portable_causal", true),
        ] {
            let (b, sq, sk, h, d) = (2, 9, 13, 2, 5);
            let sk = if causal { sq } else { sk };
            let scale = 1.0 / (d as f64).sqrt();
            let r = check_op_portable(
                name,
                &qkv(b, sq, sk, h * d),
                &|g, x| g.attention(x[0], x[1], x[2], h, causal),
                &|x| attention_cpu(&x[0], &x[1], &x[2], b, sq, sk, h, d, scale, causal),
                DType::F32,
            );
            println!("{name}: {r:?}");
        }
    }

    #[test]
    fn custom_scale() {
        let (b, s, h, d) = (1, 5, 2, 6);
        check_op(
            "scale_0.3",
            &qkv(b, s, s, h * d),
            &|g, x| g.attention_scaled(x[0], x[1], x[2], h, false, 0.3),
            &|x| attention_cpu(&x[0], &x[1], &x[2], b, s, s, h, d, 0.3, false),
            DType::F32,
            false,
        );
    }

    #[test]
    fn shape_errors_name_the_shapes() {
        let mut g = Graph::new();
        let q = g.input("q", &[2, 7, 12], DType::F32);
        let k = g.input("k", &[2, 9, 12], DType::F32);
        let v = g.input("v", &[2, 8, 12], DType::F32);
        let err = g.attention(q, k, v, 3, false).unwrap_err().to_string();
        assert!(
            err.contains("attention") && err.contains("[2, 9, 12]") && err.contains("[2, 8, 12]"),
            "{err}"
        );
        let err = g.attention(q, k, k, 5, false).unwrap_err().to_string();
        assert!(
            err.contains("[2, 7, 12]") && err.contains("heads = 5"),
            "{err}"
        );
    }
}
