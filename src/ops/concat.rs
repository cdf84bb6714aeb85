//! Concatenation along an axis (UNet skip connections join on channels) and
//! its inverse, split. All four directions run one strided slice copy,
//! `copy_slice` in `shaders/concat.wgsl`.

use crate::error::{shape_err, Error, Result};
use crate::graph::{Emit, Graph, Kernel, OpKernels, Slot, TensorId};

const WG: u32 = 256;

/// `torch.cat(inputs, dim=axis)`.
#[derive(Clone, Debug)]
pub struct Concat {
    pub axis: usize,
}

/// `torch.split(x, sizes, dim=axis)`: one output per size.
#[derive(Clone, Debug)]
pub struct Split {
    pub axis: usize,
    pub sizes: Vec<usize>,
}

/// A tensor seen as (outer, axis_len, inner) around `axis`.
fn around_axis(shape: &[usize], axis: usize) -> (usize, usize) {
    let outer = shape[..axis].iter().product();
    let inner = shape[axis + 1..].iter().product();
    (outer, inner)
}

/// One side of a slice copy: element j of row r is at `base + r * stride + j`.
#[derive(Clone, Copy)]
struct Side {
    slot: Option<Slot>,
    base: usize,
    stride: usize,
}

/// Where slice k of the whole tensor lies, and the slice tensor itself.
struct SliceLayout {
    rows: usize,
    len: usize,
    whole_base: usize,
    whole_stride: usize,
}

impl SliceLayout {
    /// The slice of `sizes[k]` entries at `offset` along an axis of length
    /// `total`, in a tensor of `outer` x total x `inner`.
    fn new(outer: usize, inner: usize, total: usize, offset: usize, size: usize) -> Self {
        SliceLayout {
            rows: outer,
            len: size * inner,
            whole_base: offset * inner,
            whole_stride: total * inner,
        }
    }

    fn whole(&self, slot: Option<Slot>) -> Side {
        Side {
            slot,
            base: self.whole_base,
            stride: self.whole_stride,
        }
    }

    fn piece(&self, slot: Option<Slot>) -> Side {
        Side {
            slot,
            base: 0,
            stride: self.len,
        }
    }
}

/// dst = beta * dst + src over one slice (zeros when `src.slot` is None),
/// beta 0 or 1.
fn emit_copy(e: &mut Emit, l: &SliceLayout, src: Side, dst: Side, beta: f32) {
    let n = l.rows * l.len;
    if n == 0 {
        return;
    }
    let Some(dst_slot) = dst.slot else { return };
    let vec = [l.len, src.base, src.stride, dst.base, dst.stride]
        .iter()
        .all(|v| v.is_multiple_of(4));
    let mut k = Kernel::new("concat", "copy_slice")
        .konst("VEC", vec)
        .konst("ACC", beta != 0.0)
        .bind("dst", dst_slot);
    k = match src.slot {
        Some(s) => k.bind("src", s),
        None => k.konst("ZERO", true),
    };
    let per = if vec { 4 } else { 1 };
    e.push(
        k.u32(l.rows)
            .u32(l.len)
            .u32(src.base)
            .u32(src.stride)
            .u32(dst.base)
            .u32(dst.stride)
            .groups_1d(n / per, WG),
    );
}

/// Slice layouts of pieces with extents `sizes` along `axis` of `whole`.
fn layouts(whole: &[usize], axis: usize, sizes: &[usize]) -> Vec<SliceLayout> {
    let (outer, inner) = around_axis(whole, axis);
    let mut offset = 0;
    sizes
        .iter()
        .map(|&s| {
            let l = SliceLayout::new(outer, inner, whole[axis], offset, s);
            offset += s;
            l
        })
        .collect()
}

impl Graph {
    /// Concatenate tensors of equal shape except along `axis`.
    pub fn concat(&mut self, xs: &[TensorId], axis: usize) -> Result<TensorId> {
        let Some(&first) = xs.first() else {
            return Err(shape_err("concat", "no tensors to concatenate"));
        };
        let shapes: Vec<Vec<usize>> = xs.iter().map(|&x| self.shape(x).to_vec()).collect();
        let base = &shapes[0];
        if axis >= base.len() {
            return Err(shape_err(
                "concat",
                format!("axis {axis} out of range for {base:?}"),
            ));
        }
        let mut out = base.clone();
        out[axis] = 0;
        for (s, &x) in shapes.iter().zip(xs) {
            let same_rest =
                s.len() == base.len() && (0..s.len()).all(|d| d == axis || s[d] == base[d]);
            if !same_rest {
                return Err(shape_err(
                    "concat",
                    format!("shapes {shapes:?} differ outside axis {axis}"),
                ));
            }
            if self.dtype(x) != self.dtype(first) {
                return Err(Error::DType {
                    op: "concat".into(),
                    dtype: self.dtype(x),
                    msg: format!("all inputs must be {}", self.dtype(first)),
                });
            }
            out[axis] += s[axis];
        }
        let dt = self.dtype(first);
        Ok(self.add_node(Concat { axis }.into(), xs, &[(out, dt)])[0])
    }

    /// Split `x` along `axis` into pieces of extents `sizes` (summing to the axis).
    pub fn split(&mut self, x: TensorId, axis: usize, sizes: &[usize]) -> Result<Vec<TensorId>> {
        let shape = self.shape(x).to_vec();
        if axis >= shape.len() || sizes.iter().sum::<usize>() != shape[axis] || sizes.is_empty() {
            return Err(shape_err(
                "split",
                format!("sizes {sizes:?} do not split axis {axis} of {shape:?}"),
            ));
        }
        let dt = self.dtype(x);
        let outs: Vec<_> = sizes
            .iter()
            .map(|&s| {
                let mut o = shape.clone();
                o[axis] = s;
                (o, dt)
            })
            .collect();
        let op = Split {
            axis,
            sizes: sizes.to_vec(),
        };
        Ok(self.add_node(op.into(), &[x], &outs))
    }
}

impl Concat {
    fn layouts(&self, e: &Emit, i: &[TensorId], o: &[TensorId]) -> Vec<SliceLayout> {
        let sizes: Vec<usize> = i.iter().map(|&x| e.shape(x)[self.axis]).collect();
        layouts(e.shape(o[0]), self.axis, &sizes)
    }
}

impl OpKernels for Concat {
    fn kind(&self) -> &'static str {
        "concat"
    }

    fn forward(&self, e: &mut Emit, i: &[TensorId], o: &[TensorId]) -> Result<()> {
        for (l, &x) in self.layouts(e, i, o).iter().zip(i) {
            let y = Some(Slot::Value(o[0]));
            emit_copy(e, l, l.piece(Some(Slot::Value(x))), l.whole(y), 0.0);
        }
        Ok(())
    }

    fn backward(&self, e: &mut Emit, i: &[TensorId], o: &[TensorId]) -> Result<()> {
        let Some(dy) = e.grad_out(0) else {
            return Ok(());
        };
        for (k, l) in self.layouts(e, i, o).iter().enumerate() {
            if let Some(dx) = e.grad_in(k) {
                emit_copy(e, l, l.whole(Some(dy)), l.piece(Some(dx.slot)), dx.beta());
            }
        }
        Ok(())
    }
}

impl OpKernels for Split {
    fn kind(&self) -> &'static str {
        "split"
    }

    fn forward(&self, e: &mut Emit, i: &[TensorId], o: &[TensorId]) -> Result<()> {
        for (l, &y) in layouts(e.shape(i[0]), self.axis, &self.sizes).iter().zip(o) {
            let x = Some(Slot::Value(i[0]));
            emit_copy(e, l, l.whole(x), l.piece(Some(Slot::Value(y))), 0.0);
        }
        Ok(())
    }

    fn backward(&self, e: &mut Emit, i: &[TensorId], _o: &[TensorId]) -> Result<()> {
        let Some(dx) = e.grad_in(0) else {
            return Ok(());
        };
        for (k, l) in layouts(e.shape(i[0]), self.axis, &self.sizes)
            .iter()
            .enumerate()
        {
            // An output nothing consumed has zero gradient: its slice of dx
            // still needs writing when dx is overwritten rather than accumulated.
            let dy = e.grad_out(k);
            if dy.is_some() || !dx.accumulate {
                emit_copy(e, l, l.piece(dy), l.whole(Some(dx.slot)), dx.beta());
            }
        }
        Ok(())
    }
}

/// CPU reference of concat along `axis`.
pub fn concat_cpu(xs: &[Vec<f64>], shapes: &[Vec<usize>], axis: usize) -> Vec<f64> {
    let (outer, inner) = around_axis(&shapes[0], axis);
    let mut out = Vec::new();
    for r in 0..outer {
        for (x, s) in xs.iter().zip(shapes) {
            let run = s[axis] * inner;
            out.extend_from_slice(&x[r * run..(r + 1) * run]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::ops::testing::{check_op, check_op_all_dtypes, CaseInput};

    fn concat_case(name: &str, shapes: &[Vec<usize>], axis: usize) {
        let inputs: Vec<CaseInput> = shapes.iter().map(|s| CaseInput::act(s)).collect();
        let shapes = shapes.to_vec();
        check_op_all_dtypes(name, &inputs, &|g, x| g.concat(x, axis), &move |x| {
            concat_cpu(x, &shapes, axis)
        });
    }

    #[test]
    fn concat_channels_nchw() {
        concat_case(
            "concat_axis1_nchw",
            &[vec![2, 3, 5, 4], vec![2, 1, 5, 4], vec![2, 4, 5, 4]],
            1,
        );
    }

    #[test]
    fn concat_last_axis() {
        concat_case(
            "concat_last_axis",
            &[vec![3, 5, 3], vec![3, 5, 1], vec![3, 5, 2]],
            2,
        );
    }

    #[test]
    fn concat_same_tensor_twice_accumulates() {
        check_op(
            "concat_x_x",
            &[CaseInput::act(&[2, 3, 4])],
            &|g, x| g.concat(&[x[0], x[0]], 1),
            &|x| {
                concat_cpu(
                    &[x[0].clone(), x[0].clone()],
                    &[vec![2, 3, 4], vec![2, 3, 4]],
                    1,
                )
            },
            DType::F32,
            false,
        );
    }

    /// Split [2, 8, 3, 5] on axis 1 into 3 + 1 + 4; the middle piece is never
    /// used, so its slice of dx must come out as zeros. The result is
    /// concat(piece2, piece0) on axis 1.
    #[test]
    fn split_with_unused_output() {
        let (outer, inner) = (2, 15);
        check_op_all_dtypes(
            "split_3_1_4_unused_middle",
            &[CaseInput::act(&[2, 8, 3, 5])],
            &|g, x| {
                let parts = g.split(x[0], 1, &[3, 1, 4])?;
                g.concat(&[parts[2], parts[0]], 1)
            },
            &move |x| {
                let mut out = Vec::new();
                for r in 0..outer {
                    let row = &x[0][r * 8 * inner..(r + 1) * 8 * inner];
                    out.extend_from_slice(&row[4 * inner..8 * inner]);
                    out.extend_from_slice(&row[..3 * inner]);
                }
                out
            },
        );
    }

    #[test]
    fn split_last_axis_odd() {
        // Runs of 2, 3 and 2 elements: the scalar (unaligned) path.
        check_op_all_dtypes(
            "split_last_axis_2_3_2",
            &[CaseInput::act(&[3, 7])],
            &|g, x| {
                let parts = g.split(x[0], 1, &[2, 3, 2])?;
                let a = g.concat(&[parts[0], parts[2]], 1)?;
                g.mul(a, a)
            },
            &|x| {
                x[0].chunks(7)
                    .flat_map(|r| [r[0], r[1], r[5], r[6]])
                    .map(|v| v * v)
                    .collect()
            },
        );
    }

    #[test]
    fn concat_and_split_shape_errors() {
        let mut g = Graph::new();
        let a = g.input("a", &[2, 3, 4], DType::F32);
        let b = g.input("b", &[2, 5, 5], DType::F32);
        let err = g.concat(&[a, b], 1).unwrap_err().to_string();
        assert!(
            err.contains("[2, 3, 4]") && err.contains("[2, 5, 5]"),
            "{err}"
        );
        let err = g.split(a, 1, &[1, 1]).unwrap_err().to_string();
        assert!(err.contains("[1, 1]") && err.contains("[2, 3, 4]"), "{err}");
    }
}
