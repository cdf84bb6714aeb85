//! Embeddings: the UNet's sinusoidal timestep embedding (forward only) and
//! CLIP's token-id lookup with its table gradient. Kernels:
//! `shaders/embedding.wgsl`.

use crate::error::{shape_err, Result};
use crate::graph::{Emit, Graph, Kernel, OpKernels, Slot, TensorId};

const WG: u32 = 256;
/// diffusers' `max_period` default.
const MAX_PERIOD: f64 = 10000.0;

/// diffusers `get_timestep_embedding(timesteps, dim, flip_sin_to_cos,
/// downscale_freq_shift)` with scale 1 and max_period 10000.
#[derive(Clone, Debug)]
pub struct TimestepEmbedding {
    pub dim: usize,
    pub flip_sin_to_cos: bool,
    pub downscale_freq_shift: f32,
}

/// `nn.Embedding` lookup: ids [..] (integers stored as floats) into a table
/// [V, D] -> [.., D].
#[derive(Clone, Debug)]
pub struct Embedding;

impl Graph {
    /// Sinusoidal embedding of timesteps [B] -> [B, dim], in the timesteps'
    /// dtype. Keep timesteps f32: bf16 cannot hold every step index.
    pub fn timestep_embedding(
        &mut self,
        timesteps: TensorId,
        dim: usize,
        flip_sin_to_cos: bool,
        downscale_freq_shift: f32,
    ) -> Result<TensorId> {
        let s = self.shape(timesteps).to_vec();
        let [b] = s[..] else {
            return Err(shape_err(
                "timestep_embedding",
                format!("timesteps {s:?} must be 1-D"),
            ));
        };
        if dim < 2 || (dim / 2) as f32 == downscale_freq_shift {
            return Err(shape_err(
                "timestep_embedding",
                format!("dim {dim} with shift {downscale_freq_shift} gives no frequencies"),
            ));
        }
        let op = TimestepEmbedding {
            dim,
            flip_sin_to_cos,
            downscale_freq_shift,
        };
        let dt = self.dtype(timesteps);
        Ok(self.add_node(op.into(), &[timesteps], &[(vec![b, dim], dt)])[0])
    }

    /// Rows of `table` [V, D] picked by `ids` [..] -> [.., D], in the ids'
    /// dtype. Ids are integers stored as floats (f32 is exact below 2^24; f16
    /// only below 2048). An id outside [0, V) is clamped into it by the
    /// kernel; callers validate ids on the host.
    pub fn embedding(&mut self, ids: TensorId, table: TensorId) -> Result<TensorId> {
        let ts = self.shape(table).to_vec();
        let [_, d] = ts[..] else {
            return Err(shape_err(
                "embedding",
                format!("table {ts:?} must be [vocab, dim]"),
            ));
        };
        let mut s = self.shape(ids).to_vec();
        s.push(d);
        let dt = self.dtype(ids);
        Ok(self.add_node(Embedding.into(), &[ids, table], &[(s, dt)])[0])
    }
}

/// Error for a gradient with respect to an input that has none here.
fn no_grad_err(op: &str, what: &str) -> crate::error::Error {
    shape_err(op, format!("{what} cannot receive a gradient"))
}

impl TimestepEmbedding {
    /// freq_k = exp(-ln(max_period) * k / (half - shift)) for k < dim / 2,
    /// rounded to f32 after each step as torch's float32 ops do (the python
    /// scalars `-ln(max_period)` and `half - shift` become float32 operands).
    fn freqs(&self) -> Vec<f32> {
        let half = self.dim / 2;
        let scale = -MAX_PERIOD.ln() as f32;
        let denom = (half as f64 - self.downscale_freq_shift as f64) as f32;
        (0..half)
            .map(|k| (((scale * k as f32) / denom) as f64).exp() as f32)
            .collect()
    }
}

impl OpKernels for TimestepEmbedding {
    fn kind(&self) -> &'static str {
        "timestep_embedding"
    }

    fn forward(&self, e: &mut Emit, i: &[TensorId], o: &[TensorId]) -> Result<()> {
        let n = e.numel(o[0]);
        let freqs = self.freqs();
        // The table as a WGSL const: shortest round-trip decimals, read as f32.
        let table = freqs
            .iter()
            .map(|f| format!("{f:e}f"))
            .collect::<Vec<_>>()
            .join(", ");
        e.push(
            Kernel::new("embedding", "timestep_embedding")
                .konst("FREQS", format!("array<f32, {}>({table})", freqs.len()))
                .bind("t", Slot::Value(i[0]))
                .bind("y", Slot::Value(o[0]))
                .u32(n)
                .u32(self.dim)
                .u32(freqs.len())
                .u32(self.flip_sin_to_cos as usize)
                .groups_1d(n, WG),
        );
        Ok(())
    }

    fn backward(&self, e: &mut Emit, _i: &[TensorId], _o: &[TensorId]) -> Result<()> {
        match e.grad_in(0) {
            Some(_) => Err(no_grad_err(self.kind(), "timesteps")),
            None => Ok(()),
        }
    }
}

impl OpKernels for Embedding {
    fn kind(&self) -> &'static str {
        "embedding"
    }

    /// A table above the binding limit is bound in windows of whole rows,
    /// one launch per window; each launch covers every position and handles
    /// those whose id falls in its rows, so every output is written once.
    fn forward(&self, e: &mut Emit, i: &[TensorId], o: &[TensorId]) -> Result<()> {
        let n = e.numel(o[0]);
        let (rows, d) = (e.shape(i[1])[0], e.shape(i[1])[1]);
        if n == 0 {
            return Ok(());
        }
        for w in e.windows(e.dtype(i[1]), rows * d, d) {
            e.push(
                Kernel::new("embedding", "embedding_forward")
                    .bind("ids", Slot::Value(i[0]))
                    .bind_window("table", Slot::Value(i[1]), w)
                    .bind("y", Slot::Value(o[0]))
                    .u32(n)
                    .u32(d)
                    .u32(rows)
                    .u32(w.first / d)
                    .u32(w.numel / d)
                    .groups_1d(n.div_ceil(4), WG),
            );
        }
        Ok(())
    }

    /// The table gradient in the same windows of rows as the forward: each
    /// launch writes the rows of its window (deterministic, no atomics).
    fn backward(&self, e: &mut Emit, i: &[TensorId], _o: &[TensorId]) -> Result<()> {
        if e.grad_in(0).is_some() {
            return Err(no_grad_err(self.kind(), "token ids"));
        }
        let (Some(dy), Some(dt)) = (e.grad_out(0), e.grad_in(1)) else {
            return Ok(());
        };
        let (rows, d) = (e.shape(i[1])[0], e.shape(i[1])[1]);
        if rows * d == 0 {
            return Ok(());
        }
        let chunks = d.div_ceil(4);
        for w in e.windows(e.slot_dtype(dt.slot), rows * d, d) {
            let wrows = w.numel / d;
            e.push(
                Kernel::new("embedding", "embedding_backward")
                    .bind("ids", Slot::Value(i[0]))
                    .bind("dy", dy)
                    .bind_window("dtable", dt.slot, w)
                    .u32(e.numel(i[0]))
                    .u32(d)
                    .u32(rows)
                    .u32(chunks)
                    .f32(dt.beta())
                    .u32(w.first / d)
                    .u32(wrows)
                    .groups_1d(wrows * chunks, WG),
            );
        }
        Ok(())
    }
}

/// CPU reference of diffusers `get_timestep_embedding` following torch's
/// float32 op sequence: every intermediate torch rounds to f32 is rounded
/// here too, with exp, sin and cos evaluated in f64.
pub fn timestep_embedding_cpu(t: &[f64], dim: usize, flip: bool, shift: f32) -> Vec<f64> {
    let f = |v: f64| v as f32 as f64;
    let half = dim / 2;
    let denom = f(half as f64 - shift as f64);
    let freqs: Vec<f64> = (0..half)
        .map(|k| f(f(f(f(-MAX_PERIOD.ln()) * k as f64) / denom).exp()))
        .collect();
    let mut out = Vec::with_capacity(t.len() * dim);
    for &tv in t {
        let phase: Vec<f64> = freqs.iter().map(|&fr| f(tv * fr)).collect();
        let sin = phase.iter().map(|p| p.sin());
        let cos = phase.iter().map(|p| p.cos());
        if flip {
            out.extend(cos.chain(sin));
        } else {
            out.extend(sin.chain(cos));
        }
        if dim % 2 == 1 {
            out.push(0.0);
        }
    }
    out
}

/// CPU reference of the lookup, clamping ids like the kernel.
pub fn embedding_cpu(ids: &[f64], table: &[f64], d: usize) -> Vec<f64> {
    let rows = table.len() / d;
    ids.iter()
        .flat_map(|&id| {
            let r = id.round().clamp(0.0, (rows - 1) as f64) as usize;
            table[r * d..(r + 1) * d].iter().copied()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::ops::testing::{check_op, check_op_all_dtypes, CaseInput};

    #[test]
    fn timestep_embedding_matches_diffusers() {
        // SD's range of steps, fractional ones included.
        let t = vec![0.0, 1.0, 999.0, 500.5, 37.0];
        for dim in [32, 33] {
            for flip in [false, true] {
                for shift in [0.0, 1.0] {
                    let r = check_op(
                        &format!("timestep_embedding_d{dim}_flip{flip}_shift{shift}"),
                        &[CaseInput::act(&[5]).no_grad().values(t.clone())],
                        &|g, x| g.timestep_embedding(x[0], dim, flip, shift),
                        &|x| timestep_embedding_cpu(&x[0], dim, flip, shift),
                        DType::F32,
                        false,
                    );
                    assert!(r.grad_errs.is_empty());
                }
            }
        }
    }

    #[test]
    fn timestep_embedding_f16_output() {
        check_op(
            "timestep_embedding_f16",
            &[CaseInput::act(&[3])
                .no_grad()
                .values(vec![3.0, 250.0, 981.0])],
            &|g, x| g.timestep_embedding(x[0], 20, true, 0.0),
            &|x| timestep_embedding_cpu(&x[0], 20, true, 0.0),
            DType::F16,
            true,
        );
    }

    #[test]
    fn embedding_lookup_and_table_gradient() {
        // Repeated ids sum their gradients; -2 and 14 clamp to rows 0 and 10.
        let ids = vec![3.0, 0.0, 10.0, 7.0, 7.0, 1.0, -2.0, 14.0, 3.0, 5.0];
        check_op_all_dtypes(
            "embedding_11x6",
            &[
                CaseInput::act(&[2, 5]).no_grad().values(ids),
                CaseInput::param(&[11, 6]),
            ],
            &|g, x| g.embedding(x[0], x[1]),
            &|x| embedding_cpu(&x[0], &x[1], 6),
        );
    }

    #[test]
    fn embedding_shape_errors() {
        let mut g = Graph::new();
        let t = g.input("t", &[2, 3], DType::F32);
        let err = g.timestep_embedding(t, 32, true, 0.0).unwrap_err();
        assert!(err.to_string().contains("[2, 3]"), "{err}");
        let table = g.param("table", &[11]);
        let err = g.embedding(t, table).unwrap_err().to_string();
        assert!(err.contains("[11]"), "{err}");
    }
}
