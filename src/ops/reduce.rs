//! Sum over axes (keeping them as size-1 dims). Kernels are the broadcast
//! pair in `shaders/elementwise.wgsl`: the forward is the reduction a
//! broadcast's gradient needs, the backward is a broadcast.

use super::elementwise::{broadcast_layout, emit_broadcast, emit_broadcast_reduce};
use crate::error::{shape_err, Result};
use crate::graph::{Emit, Graph, OpKernels, Slot, TensorId};

#[derive(Clone, Debug)]
pub struct ReduceSum {
    pub axes: Vec<usize>,
}

impl Graph {
    /// Sum of `x` over `axes`; the result keeps them with extent 1.
    pub fn sum_axes(&mut self, x: TensorId, axes: &[usize]) -> Result<TensorId> {
        let mut shape = self.shape(x).to_vec();
        for &a in axes {
            if a >= shape.len() {
                return Err(shape_err(
                    "sum",
                    format!("axis {a} out of range for {shape:?}"),
                ));
            }
            shape[a] = 1;
        }
        let dt = self.dtype(x);
        Ok(self.add_node(
            ReduceSum {
                axes: axes.to_vec(),
            }
            .into(),
            &[x],
            &[(shape, dt)],
        )[0])
    }
}

impl OpKernels for ReduceSum {
    fn kind(&self) -> &'static str {
        "sum"
    }

    fn forward(&self, e: &mut Emit, i: &[TensorId], o: &[TensorId]) -> Result<()> {
        let l = broadcast_layout(e.shape(i[0]), e.shape(o[0])).map_err(|m| shape_err("sum", m))?;
        emit_broadcast_reduce(e, Slot::Value(o[0]), Slot::Value(i[0]), None, &l, 0.0);
        Ok(())
    }

    fn backward(&self, e: &mut Emit, i: &[TensorId], o: &[TensorId]) -> Result<()> {
        let (Some(dy), Some(dx)) = (e.grad_out(0), e.grad_in(0)) else {
            return Ok(());
        };
        let l = broadcast_layout(e.shape(i[0]), e.shape(o[0])).map_err(|m| shape_err("sum", m))?;
        emit_broadcast(e, dx.slot, None, dy, &l, 2, dx.beta());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::testing::{check_op_all_dtypes, CaseInput};

    #[test]
    fn sum_over_axes() {
        // [2, 3, 5, 4] summed over axes 0 and 2 -> [1, 3, 1, 4].
        check_op_all_dtypes(
            "sum_axes_0_2",
            &[CaseInput::act(&[2, 3, 5, 4])],
            &|g, x| g.sum_axes(x[0], &[0, 2]),
            &|x| {
                let mut out = vec![0.0; 12];
                for a in 0..2 {
                    for b in 0..3 {
                        for c in 0..5 {
                            for d in 0..4 {
                                out[b * 4 + d] += x[0][((a * 3 + b) * 5 + c) * 4 + d];
                            }
                        }
                    }
                }
                out
            },
        );
    }
}
