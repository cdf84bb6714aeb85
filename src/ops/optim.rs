//! AdamW with decoupled weight decay and optional global gradient-norm
//! clipping. Kernels: `shaders/optim.wgsl`. Master weights, gradients and the
//! moments are f32 whatever the activation dtype.

use crate::dtype::DType;
use crate::error::Result;
use crate::graph::{AdamW, Emit, Kernel, Slot, TensorId};

/// Emit the optimizer step for `params` (after the backward pass). Returns
/// the persistent `hyper` slot the host fills each step with
/// `[lr, 1 - beta1^t, 1 - beta2^t, 0]`.
pub fn emit_adamw(e: &mut Emit, params: &[TensorId], opt: &AdamW) -> Result<Slot> {
    let hyper = e.persistent("adamw.hyper", 4, DType::F32);
    let mut scale = None;
    if let Some(max_norm) = opt.max_grad_norm {
        let norms = e.persistent("adamw.grad_sq_norms", params.len().max(1), DType::F32);
        for (slot, &p) in params.iter().enumerate() {
            e.push(
                Kernel::new("optim", "sumsq")
                    .bind("g", Slot::Grad(p))
                    .bind("norms", norms)
                    .u32(e.numel(p))
                    .u32(slot),
            );
        }
        let s = e.persistent("adamw.clip", 2, DType::F32);
        e.push(
            Kernel::new("optim", "clip_scale")
                .bind("norms", norms)
                .bind("scale", s)
                .u32(params.len())
                .f32(max_norm),
        );
        scale = Some(s);
    }
    for &p in params {
        let n = e.numel(p);
        let name = e.graph.desc(p).name.clone();
        let m = e.persistent(&format!("adamw.m.{name}"), n, DType::F32);
        let v = e.persistent(&format!("adamw.v.{name}"), n, DType::F32);
        let mut k = Kernel::new("optim", "adamw")
            .bind("param", Slot::Value(p))
            .bind("grad", Slot::Grad(p))
            .bind("m", m)
            .bind("v", v)
            .bind("hyper", hyper);
        if let Some(s) = scale {
            k = k.bind("scale", s).konst("CLIP", "true");
        }
        e.push(
            k.u32(n)
                .f32(opt.beta1)
                .f32(opt.beta2)
                .f32(opt.eps)
                .f32(opt.weight_decay)
                .groups_1d(n, 256),
        );
    }
    Ok(hyper)
}

#[cfg(test)]
mod tests {
    use crate::graph::{AdamW, Graph, RunSpec, Session};
    use crate::ops::testing::{gpu, random};
    use crate::DType;
    use std::sync::Arc;

    /// torch.optim.AdamW after clip_grad_norm_, in f64.
    fn adamw_cpu(w: &mut [f64], m: &mut [f64], v: &mut [f64], g: &[f64], t: i32, o: &AdamW) {
        let norm = g.iter().map(|x| x * x).sum::<f64>().sqrt();
        let clip = o
            .max_grad_norm
            .map(|mx| (mx as f64 / (norm + 1e-6)).min(1.0))
            .unwrap_or(1.0);
        let (b1, b2, lr) = (o.beta1 as f64, o.beta2 as f64, o.lr as f64);
        for i in 0..w.len() {
            let gi = g[i] * clip;
            w[i] *= 1.0 - lr * o.weight_decay as f64;
            m[i] = b1 * m[i] + (1.0 - b1) * gi;
            v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
            let denom = v[i].sqrt() / (1.0 - b2.powi(t)).sqrt() + o.eps as f64;
            w[i] -= lr / (1.0 - b1.powi(t)) * m[i] / denom;
        }
    }

    #[test]
    fn adamw_with_clipping_matches_torch_formula() {
        // loss = mean((w - target)^2): grad = 2 (w - target) / n, clipped to norm 0.05.
        for max_grad_norm in [None, Some(0.05)] {
            let n = 37;
            let opt = AdamW {
                lr: 0.01,
                weight_decay: 0.1,
                max_grad_norm,
                ..Default::default()
            };
            let mut g = Graph::new();
            let w = g.param("w", &[n]);
            let target = g.input("target", &[n], DType::F32);
            let loss = g.mse_loss(w, target).unwrap();
            let seed = g.input("seed", &[1], DType::F32);
            let spec = RunSpec {
                outputs: vec![loss],
                seeds: vec![(loss, seed)],
                optimizer: Some(opt.clone()),
                ..Default::default()
            };
            let mut s = Session::new(gpu(), Arc::new(g), spec).unwrap();
            let w0 = random(n, 1);
            let t0 = random(n, 2);
            s.write(w, &w0).unwrap();
            s.write(target, &t0).unwrap();
            s.write(seed, &[1.0]).unwrap();
            let mut wc: Vec<f64> = w0.iter().map(|&x| x as f64).collect();
            let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
            for step in 1..=3 {
                let grad: Vec<f64> = wc
                    .iter()
                    .zip(&t0)
                    .map(|(a, &b)| 2.0 * (a - b as f64) / n as f64)
                    .collect();
                adamw_cpu(&mut wc, &mut m, &mut v, &grad, step, &opt);
                s.step().unwrap();
            }
            let got = s.read_blocking(w).unwrap();
            let err = crate::ops::testing::rel_l2(&got, &wc);
            assert!(
                err < 1e-6,
                "max_grad_norm {max_grad_norm:?}: AdamW rel error {err:.2e}"
            );
        }
    }
}
