//! Layer norm over the last dim (torch.nn.LayerNorm with affine). It is a
//! group norm of the view `[rows, D, 1]` with one group, so it runs the
//! kernels of `ops::group_norm` (`shaders/group_norm.wgsl`).

use super::group_norm::{emit_norm_backward, emit_norm_forward, NormView};
use crate::dtype::DType;
use crate::error::{shape_err, Result};
use crate::graph::{Emit, Graph, OpKernels, TensorId};

/// `LayerNorm(D, eps)`. Inputs x `[.., D]`, gamma `[D]`, beta `[D]`; outputs
/// y (x's shape and dtype), and the saved f32 mean and rstd per row (x's
/// leading dims).
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub eps: f32,
}

fn view(x: &[usize]) -> NormView {
    let d = x.last().copied().unwrap_or(1);
    NormView {
        outer: x.iter().product::<usize>() / d.max(1),
        channels: d,
        spatial: 1,
        groups: 1,
    }
}

impl Graph {
    /// `nn.LayerNorm(D, eps)(x)` with weight `gamma` and bias `beta`.
    pub fn layer_norm(
        &mut self,
        x: TensorId,
        gamma: TensorId,
        beta: TensorId,
        eps: f32,
    ) -> Result<TensorId> {
        let xs = self.shape(x).to_vec();
        let (gs, bs) = (self.shape(gamma), self.shape(beta));
        let Some(&d) = xs.last() else {
            return Err(shape_err("layer_norm", "x has no dims"));
        };
        if d == 0 || gs != [d] || bs != [d] {
            return Err(shape_err(
                "layer_norm",
                format!("gamma {gs:?} and beta {bs:?} must be [{d}] for x {xs:?}"),
            ));
        }
        let mut rows = xs[..xs.len() - 1].to_vec();
        if rows.is_empty() {
            rows.push(1);
        }
        let stats = (rows, DType::F32);
        let dt = self.dtype(x);
        Ok(self.add_node(
            LayerNorm { eps }.into(),
            &[x, gamma, beta],
            &[(xs, dt), stats.clone(), stats],
        )[0])
    }
}

impl OpKernels for LayerNorm {
    fn kind(&self) -> &'static str {
        "layer_norm"
    }

    fn forward(&self, e: &mut Emit, i: &[TensorId], o: &[TensorId]) -> Result<()> {
        emit_norm_forward(e, view(e.shape(i[0])), self.eps, false, i, o);
        Ok(())
    }

    fn backward(&self, e: &mut Emit, i: &[TensorId], o: &[TensorId]) -> Result<()> {
        emit_norm_backward(e, view(e.shape(i[0])), false, i, o);
        Ok(())
    }

    fn flops(&self, g: &Graph, i: &[TensorId], _o: &[TensorId]) -> u64 {
        8 * g.numel(i[0]) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::group_norm::norm_cpu;
    use crate::ops::testing::{check_op_all_dtypes, CaseInput};

    fn case(name: &str, shape: &[usize]) {
        let d = *shape.last().unwrap();
        let v = view(shape);
        check_op_all_dtypes(
            name,
            &[
                CaseInput::act(shape),
                CaseInput::param(&[d]),
                CaseInput::param(&[d]),
            ],
            &|g, x| g.layer_norm(x[0], x[1], x[2], 1e-5),
            &|x| norm_cpu(&x[0], &x[1], &x[2], v, 1e-5, false),
        );
    }

    #[test]
    fn layer_norm_3x5x7_all_dtypes() {
        case("ln_3x5x7", &[3, 5, 7]);
    }

    #[test]
    fn layer_norm_2x33_all_dtypes() {
        case("ln_2x33", &[2, 33]);
    }

    #[test]
    fn layer_norm_vec4_rows_all_dtypes() {
        // D % 4 == 0 takes the vec4 path.
        case("ln_5x12", &[5, 12]);
    }

    #[test]
    fn layer_norm_many_rows_one_lane_all_dtypes() {
        // 520 rows: one invocation per row.
        case("ln_520x12", &[520, 12]);
    }

    #[test]
    fn layer_norm_shape_errors() {
        let mut g = Graph::new();
        let x = g.input("x", &[3, 8], DType::F32);
        let p = g.param("p", &[7]);
        let err = g.layer_norm(x, p, p, 1e-5).unwrap_err().to_string();
        assert!(err.contains("[3, 8]") && err.contains("[7]"), "{err}");
    }
}
