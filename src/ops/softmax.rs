//! Softmax over the last dim. Kernels: `shaders/softmax.wgsl`.

use crate::error::{shape_err, Result};
use crate::graph::{Emit, Graph, Kernel, OpKernels, Slot, TensorId};

/// `torch.softmax(x, dim=-1)`; the backward reads the output y.
#[derive(Clone, Debug)]
pub struct Softmax;

impl Graph {
    pub fn softmax(&mut self, x: TensorId) -> Result<TensorId> {
        let xs = self.shape(x).to_vec();
        if xs.last().is_none_or(|&d| d == 0) {
            return Err(shape_err(
                "softmax",
                format!("x {xs:?} needs a non-empty last dim"),
            ));
        }
        let dt = self.dtype(x);
        Ok(self.add_node(Softmax.into(), &[x], &[(xs, dt)])[0])
    }
}

/// Invocations per workgroup, at most.
const WG: usize = 64;
/// Rows up to this long get one invocation each when there are at least
/// `ONE_LANE_ROWS` of them (per-workgroup costs dominate short rows).
const ONE_LANE_LEN: usize = 4096;
const ONE_LANE_ROWS: usize = 512;

/// One softmax kernel over `rows` rows of `d`: an invocation per row, or a
/// workgroup per row with as many lanes as the row has vec4s (8 to 64).
fn row_kernel(entry: &'static str, rows: usize, d: usize) -> Kernel {
    let one_lane = d <= ONE_LANE_LEN && rows >= ONE_LANE_ROWS;
    let (wg, rows_per_wg) = if one_lane {
        (WG, WG)
    } else {
        (d.div_ceil(4).next_power_of_two().clamp(8, WG), 1)
    };
    Kernel::new("softmax", entry)
        .konst("WG", format!("{wg}u"))
        .konst("VEC", d.is_multiple_of(4))
        .konst("ONE_LANE", one_lane)
        .u32(rows)
        .u32(d)
        .groups_1d(rows, rows_per_wg as u32)
}

fn dims(e: &Emit, x: TensorId) -> (usize, usize) {
    let d = e.shape(x).last().copied().unwrap_or(1);
    (e.numel(x) / d, d)
}

impl OpKernels for Softmax {
    fn kind(&self) -> &'static str {
        "softmax"
    }

    fn forward(&self, e: &mut Emit, i: &[TensorId], o: &[TensorId]) -> Result<()> {
        let (rows, d) = dims(e, i[0]);
        e.push(
            row_kernel("softmax_forward", rows, d)
                .bind("x", Slot::Value(i[0]))
                .bind("y", Slot::Value(o[0])),
        );
        Ok(())
    }

    fn backward(&self, e: &mut Emit, i: &[TensorId], o: &[TensorId]) -> Result<()> {
        let (Some(dy), Some(dx)) = (e.grad_out(0), e.grad_in(0)) else {
            return Ok(());
        };
        let (rows, d) = dims(e, i[0]);
        e.push(
            row_kernel("softmax_backward", rows, d)
                .bind("y", Slot::Value(o[0]))
                .bind("dy", dy)
                .bind("dx", dx.slot)
                .f32(dx.beta()),
        );
        Ok(())
    }

    fn flops(&self, g: &Graph, i: &[TensorId], _o: &[TensorId]) -> u64 {
        5 * g.numel(i[0]) as u64
    }
}

/// CPU reference (f64), rows of `d`.
pub fn softmax_cpu(x: &[f64], d: usize) -> Vec<f64> {
    x.chunks(d)
        .flat_map(|r| {
            let m = r.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let s: f64 = r.iter().map(|v| (v - m).exp()).sum();
            r.iter().map(move |v| (v - m).exp() / s)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{check_op_all_dtypes, random, CaseInput};

    /// Inputs of magnitude up to `scale` (20 makes exp(x) overflow f32
    /// unless the row max is subtracted).
    fn case(name: &str, shape: &[usize], scale: f32) {
        let n = shape.iter().product();
        let d = *shape.last().unwrap();
        let x = random(n, 11).iter().map(|v| v * scale).collect();
        check_op_all_dtypes(
            name,
            &[CaseInput::act(shape).values(x)],
            &|g, x| g.softmax(x[0]),
            &|x| softmax_cpu(&x[0], d),
        );
    }

    #[test]
    fn softmax_4x9_all_dtypes() {
        case("softmax_4x9", &[4, 9], 3.0);
    }

    #[test]
    fn softmax_large_magnitude_2x3x37_all_dtypes() {
        case("softmax_2x3x37_x20", &[2, 3, 37], 20.0);
        case("softmax_4x9_x20", &[4, 9], 20.0);
    }

    #[test]
    fn softmax_many_rows_one_lane_all_dtypes() {
        // 520 rows: one invocation per row; odd and vec4 row lengths.
        case("softmax_520x9_x20", &[520, 9], 20.0);
        case("softmax_520x12_x20", &[520, 12], 20.0);
    }

    #[test]
    fn softmax_long_rows_vec4_all_dtypes() {
        // D % 4 == 0 (vec4 path) and longer than one pass of the workgroup.
        case("softmax_3x300", &[3, 300], 4.0);
    }
}
