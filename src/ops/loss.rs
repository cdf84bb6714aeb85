//! Mean-squared-error loss to a scalar. Kernels: `shaders/loss.wgsl`.

use crate::error::{shape_err, Result};
use crate::graph::{Emit, Graph, Kernel, OpKernels, Slot, TensorId};

/// `mean((pred - target)^2)`, a `[1]` f32 tensor.
#[derive(Clone, Debug)]
pub struct MseLoss;

impl Graph {
    pub fn mse_loss(&mut self, pred: TensorId, target: TensorId) -> Result<TensorId> {
        self.mse_node(&[pred, target])
    }

    /// diffusers' Min-SNR loss: the mean over samples of `weights[b]` times
    /// the sample's mean squared error (`weights` `[B]`, no gradient).
    pub fn weighted_mse_loss(
        &mut self,
        pred: TensorId,
        target: TensorId,
        weights: TensorId,
    ) -> Result<TensorId> {
        let b = self.shape(pred).first().copied().unwrap_or(0);
        if self.shape(weights) != [b] {
            return Err(shape_err(
                "mse_loss",
                format!(
                    "weights {:?} must be [{b}], one per sample of pred {:?}",
                    self.shape(weights),
                    self.shape(pred)
                ),
            ));
        }
        self.mse_node(&[pred, target, weights])
    }

    fn mse_node(&mut self, inputs: &[TensorId]) -> Result<TensorId> {
        let (pred, target) = (inputs[0], inputs[1]);
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
        Ok(self.add_node(MseLoss.into(), inputs, &[(vec![1], crate::DType::F32)])[0])
    }
}

/// The loss kernel with or without per-sample weights (input 2).
fn mse_kernel(e: &Emit, entry: &'static str, i: &[TensorId]) -> Kernel {
    let k = Kernel::new("loss", entry)
        .bind("pred", Slot::Value(i[0]))
        .bind("target", Slot::Value(i[1]));
    match i.get(2) {
        Some(&w) => k
            .konst("WEIGHTED", true)
            .bind("w", Slot::Value(w))
            .u32(e.numel(i[0]))
            .u32(e.numel(i[0]) / e.shape(w)[0].max(1)),
        None => k.u32(e.numel(i[0])).u32(1),
    }
}

impl OpKernels for MseLoss {
    fn kind(&self) -> &'static str {
        "mse_loss"
    }

    fn forward(&self, e: &mut Emit, i: &[TensorId], o: &[TensorId]) -> Result<()> {
        let k = mse_kernel(e, "mse_forward", i).bind("loss", Slot::Value(o[0]));
        e.push(k);
        Ok(())
    }

    fn backward(&self, e: &mut Emit, i: &[TensorId], _o: &[TensorId]) -> Result<()> {
        let Some(dl) = e.grad_out(0) else {
            return Ok(());
        };
        if i.len() > 2 && e.grad_in(2).is_some() {
            return Err(shape_err(
                "mse_loss",
                "the loss weights cannot receive a gradient",
            ));
        }
        let n = e.numel(i[0]);
        for (k, sign) in [(0, 1.0), (1, -1.0)] {
            if let Some(dx) = e.grad_in(k) {
                let kernel = mse_kernel(e, "mse_backward", i)
                    .bind("dloss", dl)
                    .bind("dx", dx.slot)
                    .f32(sign)
                    .f32(dx.beta())
                    .groups_1d(n, 256);
                e.push(kernel);
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

    #[test]
    fn weighted_mse_forward_and_backward() {
        let weights = CaseInput {
            grad: false,
            ..CaseInput::act(&[3])
        };
        for dt in DType::ALL {
            check_op(
                "weighted_mse_3x2x37",
                &[
                    CaseInput::act(&[3, 2, 37]),
                    CaseInput::act(&[3, 2, 37]),
                    weights.clone(),
                ],
                &|g, x| g.weighted_mse_loss(x[0], x[1], x[2]),
                &|x| {
                    let per = 74;
                    let s: f64 = (0..222)
                        .map(|i| x[2][i / per] * (x[0][i] - x[1][i]).powi(2))
                        .sum();
                    vec![s / 222.0]
                },
                dt,
                false,
            );
        }
    }
}
