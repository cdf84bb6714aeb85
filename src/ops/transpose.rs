//! Swap of the last two dims, [.., R, C] -> [.., C, R] (UNet transformer
//! blocks: NCHW viewed as [B, C, H*W] becomes [B, H*W, C]). Kernel:
//! `shaders/transpose.wgsl`; the backward is the same transpose of dy.

use crate::error::{shape_err, Result};
use crate::graph::{Emit, Graph, Kernel, OpKernels, Slot, TensorId};

/// Tile edge of the workgroup-memory schedule (matches `T` in the shader).
const TILE: usize = 32;
/// Block edge and workgroup size of the register schedule.
const BLOCK: usize = 4;
const BLOCK_WG: u32 = 64;

#[derive(Clone, Debug)]
pub struct TransposeLast2 {
    /// Workgroup-memory tiles (`Some(true)`) or register blocks; `None` picks
    /// tiles on GPUs and blocks on CPU adapters. Tests force each.
    pub tiled: Option<bool>,
}

impl Graph {
    /// `x.transpose(-1, -2)` materialized: [.., R, C] -> [.., C, R].
    pub fn transpose_last2(&mut self, x: TensorId) -> Result<TensorId> {
        self.transpose_node(x, None)
    }

    fn transpose_node(&mut self, x: TensorId, tiled: Option<bool>) -> Result<TensorId> {
        let mut s = self.shape(x).to_vec();
        if s.len() < 2 {
            return Err(shape_err(
                "transpose_last2",
                format!("input {s:?} needs at least 2 dims"),
            ));
        }
        let n = s.len();
        s.swap(n - 2, n - 1);
        let dt = self.dtype(x);
        Ok(self.add_node(TransposeLast2 { tiled }.into(), &[x], &[(s, dt)])[0])
    }
}

impl TransposeLast2 {
    /// y = beta * y + x^T with x of shape `xs` = [.., R, C].
    fn emit(&self, e: &mut Emit, xs: &[usize], x: Slot, y: Slot, beta: f32) {
        let (r, c) = (xs[xs.len() - 2], xs[xs.len() - 1]);
        let batch: usize = xs[..xs.len() - 2].iter().product();
        if batch * r * c == 0 {
            return;
        }
        let tiled = self.tiled.unwrap_or(!e.caps.is_cpu);
        let edge = if tiled { TILE } else { BLOCK };
        let (rb, cb) = (r.div_ceil(edge), c.div_ceil(edge));
        let ntiles = batch * rb * cb;
        let k = if tiled {
            Kernel::new("transpose", "transpose_tiled").groups_1d(ntiles, 1)
        } else {
            Kernel::new("transpose", "transpose_blocks")
                .konst("WGX", format!("{BLOCK_WG}u"))
                .groups_1d(ntiles, BLOCK_WG)
        };
        e.push(
            k.bind("x", x)
                .bind("y", y)
                .u32(r)
                .u32(c)
                .u32(rb)
                .u32(cb)
                .u32(ntiles)
                .f32(beta),
        );
    }
}

impl OpKernels for TransposeLast2 {
    fn kind(&self) -> &'static str {
        "transpose_last2"
    }

    fn forward(&self, e: &mut Emit, i: &[TensorId], o: &[TensorId]) -> Result<()> {
        let xs = e.shape(i[0]).to_vec();
        self.emit(e, &xs, Slot::Value(i[0]), Slot::Value(o[0]), 0.0);
        Ok(())
    }

    fn backward(&self, e: &mut Emit, _i: &[TensorId], o: &[TensorId]) -> Result<()> {
        let (Some(dy), Some(dx)) = (e.grad_out(0), e.grad_in(0)) else {
            return Ok(());
        };
        let ys = e.shape(o[0]).to_vec();
        self.emit(e, &ys, dy, dx.slot, dx.beta());
        Ok(())
    }
}

/// CPU reference: x [.., R, C] -> [.., C, R].
pub fn transpose_last2_cpu(x: &[f64], r: usize, c: usize) -> Vec<f64> {
    x.chunks(r * c)
        .flat_map(|m| (0..c).flat_map(move |j| (0..r).map(move |i| m[i * c + j])))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::ops::testing::{check_op_all_dtypes, CaseInput};

    fn case(name: &str, shape: &[usize]) {
        let (r, c) = (shape[shape.len() - 2], shape[shape.len() - 1]);
        for tiled in [false, true] {
            check_op_all_dtypes(
                &format!("{name}_{}", if tiled { "tiled" } else { "blocks" }),
                &[CaseInput::act(shape)],
                &|g, x| g.transpose_node(x[0], Some(tiled)),
                &|x| transpose_last2_cpu(&x[0], r, c),
            );
        }
    }

    #[test]
    fn transpose_3x5x7() {
        case("transpose_3x5x7", &[3, 5, 7]);
    }

    #[test]
    fn transpose_2x33x17() {
        // 33 x 17 spans two tiles of 32 along R with a 1-row tail.
        case("transpose_2x33x17", &[2, 33, 17]);
    }

    #[test]
    fn transpose_aligned_2x8x12() {
        // Whole 4x4 blocks: the vec4 load/store paths.
        case("transpose_2x8x12", &[2, 8, 12]);
    }

    #[test]
    fn transpose_needs_two_dims() {
        let mut g = Graph::new();
        let x = g.input("x", &[5], DType::F32);
        let err = g.transpose_last2(x).unwrap_err().to_string();
        assert!(err.contains("[5]"), "{err}");
    }
}
