//! Mean-squared-error loss to a scalar. Kernels: `shaders/loss.wgsl`.

use crate::error::{shape_err, Result};
use crate::graph::{Emit, Graph, Kernel, OpKernels, Slot, TensorId};

/// `mean((pred - target)^2)`, a `[1]` f32 tensor.
#[derive(Clone, Debug)]
pub struct MseLoss;

impl Graph {
    pub fn mse_loss(&mut self, pred: TensorId, target: TensorId) -> Result<TensorId> {
        if self.shape(pred) != self.shape(target) {
            return Err(shape_err(
                "mse_loss",
                format!(
                    "pred {:?} and target {:?} differ",
                    self.shape(pred),
                    self.shape(target)
                ),
            ));
        }
        Ok(self.add_node(
            MseLoss.into(),
            &[pred, target],
            &[(vec![1], crate::DType::F32)],
        )[0])
    }
}

impl OpKernels for MseLoss {
    fn kind(&self) -> &'static str {
        "mse_loss"
    }

    fn forward(&self, e: &mut Emit, i: &[TensorId], o: &[TensorId]) -> Result<()> {
        e.push(
            Kernel::new("loss", "mse_forward")
                .bind("pred", Slot::Value(i[0]))
                .bind("target", Slot::Value(i[1]))
                .bind("loss", Slot::Value(o[0]))
                .u32(e.numel(i[0])),
        );
        Ok(())
    }

    fn backward(&self, e: &mut Emit, i: &[TensorId], _o: &[TensorId]) -> Result<()> {
        let Some(dl) = e.grad_out(0) else {
            return Ok(());
        };
        let n = e.numel(i[0]);
        for (k, sign) in [(0, 1.0), (1, -1.0)] {
            if let Some(dx) = e.grad_in(k) {
                e.push(
                    Kernel::new("loss", "mse_backward")
                        .bind("pred", Slot::Value(i[0]))
                        .bind("target", Slot::Value(i[1]))
                        .bind("dloss", dl)
                        .bind("dx", dx.slot)
                        .u32(n)
                        .f32(sign)
                        .f32(dx.beta())
                        .groups_1d(n, 256),
                );
            }
        }
        Ok(())
    }

    fn flops(&self, g: &Graph, i: &[TensorId], _o: &[TensorId]) -> u64 {
        3 * g.numel(i[0]) as u64
    }
}

#[cfg(test)]
mod tests {
    use crate::dtype::DType;
    use crate::ops::testing::{check_op, CaseInput};

    #[test]
    fn mse_forward_and_backward() {
        for dt in DType::ALL {
            check_op(
                "mse_3x333",
                &[CaseInput::act(&[3, 333]), CaseInput::act(&[3, 333])],
                &|g, x| g.mse_loss(x[0], x[1]),
                &|x| {
                    vec![
                        x[0].iter()
                            .zip(&x[1])
                            .map(|(a, b)| (a - b) * (a - b))
                            .sum::<f64>()
                            / 999.0,
                    ]
                },
                dt,
                false,
            );
        }
    }
}
