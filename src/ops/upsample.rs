//! Nearest-neighbour 2x upsampling of NCHW tensors (diffusers `Upsample2D`
//! before its conv). Kernels: `shaders/upsample.wgsl`.

use crate::error::{shape_err, Result};
use crate::graph::{Emit, Graph, Kernel, OpKernels, Slot, TensorId};

const WG: u32 = 256;

/// `F.interpolate(x, scale_factor=2, mode="nearest")` on NCHW.
#[derive(Clone, Debug)]
pub struct UpsampleNearest2x;

impl Graph {
    /// [N, C, H, W] -> [N, C, 2H, 2W], each pixel repeated over a 2x2 block.
    pub fn upsample_nearest2x(&mut self, x: TensorId) -> Result<TensorId> {
        let s = self.shape(x).to_vec();
        let [n, c, h, w] = s[..] else {
            return Err(shape_err(
                "upsample_nearest2x",
                format!("input {s:?} must be NCHW"),
            ));
        };
        let dt = self.dtype(x);
        Ok(self.add_node(
            UpsampleNearest2x.into(),
            &[x],
            &[(vec![n, c, 2 * h, 2 * w], dt)],
        )[0])
    }
}

impl OpKernels for UpsampleNearest2x {
    fn kind(&self) -> &'static str {
        "upsample_nearest2x"
    }

    fn forward(&self, e: &mut Emit, i: &[TensorId], o: &[TensorId]) -> Result<()> {
        let n = e.numel(o[0]);
        e.push(
            Kernel::new("upsample", "upsample_forward")
                .bind("x", Slot::Value(i[0]))
                .bind("y", Slot::Value(o[0]))
                .u32(n)
                .u32(e.shape(i[0])[3])
                .groups_1d(n.div_ceil(4), WG),
        );
        Ok(())
    }

    fn backward(&self, e: &mut Emit, i: &[TensorId], _o: &[TensorId]) -> Result<()> {
        let (Some(dy), Some(dx)) = (e.grad_out(0), e.grad_in(0)) else {
            return Ok(());
        };
        let n = e.numel(i[0]);
        e.push(
            Kernel::new("upsample", "upsample_backward")
                .bind("dy", dy)
                .bind("dx", dx.slot)
                .u32(n)
                .u32(e.shape(i[0])[3])
                .f32(dx.beta())
                .groups_1d(n.div_ceil(4), WG),
        );
        Ok(())
    }
}

/// CPU reference: x [N, C, H, W] upsampled to [N, C, 2H, 2W].
pub fn upsample_nearest2x_cpu(x: &[f64], shape: [usize; 4]) -> Vec<f64> {
    let [n, c, h, w] = shape;
    let mut y = Vec::with_capacity(4 * x.len());
    for q in 0..n * c * h {
        let row = &x[q * w..(q + 1) * w];
        for _ in 0..2 {
            y.extend(row.iter().flat_map(|&v| [v, v]));
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::ops::testing::{check_op_all_dtypes, CaseInput};

    #[test]
    fn upsample_odd_shape() {
        // 2*3*10*14 = 840 outputs and 210 inputs: W odd, so 4-element groups
        // cross rows; totals are multiples of 4 but not of the workgroup.
        check_op_all_dtypes(
            "upsample_2x3x5x7",
            &[CaseInput::act(&[2, 3, 5, 7])],
            &|g, x| g.upsample_nearest2x(x[0]),
            &|x| upsample_nearest2x_cpu(&x[0], [2, 3, 5, 7]),
        );
    }

    #[test]
    fn upsample_tail_not_multiple_of_four() {
        // 3*3 = 9 inputs, 36 outputs: the backward has a 1-element tail.
        check_op_all_dtypes(
            "upsample_1x1x3x3",
            &[CaseInput::act(&[1, 1, 3, 3])],
            &|g, x| g.upsample_nearest2x(x[0]),
            &|x| upsample_nearest2x_cpu(&x[0], [1, 1, 3, 3]),
        );
    }

    #[test]
    fn upsample_rejects_non_nchw() {
        let mut g = Graph::new();
        let x = g.input("x", &[3, 5, 7], DType::F32);
        let err = g.upsample_nearest2x(x).unwrap_err().to_string();
        assert!(err.contains("[3, 5, 7]"), "{err}");
    }
}
