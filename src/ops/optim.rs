//! AdamW with decoupled weight decay and optional global gradient-norm
//! clipping. Kernels: `shaders/optim.wgsl`. Master weights, gradients and the
//! moments are f32 whatever the activation dtype.

use crate::dtype::DType;
use crate::error::Result;
use crate::graph::{AdamW, Emit, Kernel, Slot, TensorId};

/// Gradient elements per partial sum of squares (`BLOCK` in the shader).
/// Parameters above the binding limit are windowed in whole blocks, so the
/// partials, and the norm summed from them in a fixed order, do not depend
/// on the windowing.
const SUMSQ_BLOCK: usize = 256;
/// Workgroup size of the sum-of-squares kernels (`RWG` in the shader).
const RWG: u32 = 64;
const WG: u32 = 256;

/// Emit the optimizer step for `params` (after the backward pass). Returns
/// the persistent `hyper` slot the host fills each step with
/// `[lr, 1 - beta1^t, 1 - beta2^t, 0]`. The global gradient norm (before
/// clipping) lands in the persistent `adamw.clip` slot when clipping is on.
/// With `zero_grads` (gradient accumulation) each gradient is zeroed once
/// used, ready for the next accumulation.
pub fn emit_adamw(
    e: &mut Emit,
    params: &[TensorId],
    opt: &AdamW,
    zero_grads: bool,
) -> Result<Slot> {
    let hyper = e.persistent("adamw.hyper", 4, DType::F32);
    // A parameter, its gradient and its moments are all f32 of one size, so
    // one set of windows serves them all (one window unless it exceeds a binding).
    let windows: Vec<_> = params
        .iter()
        .map(|&p| e.windows(DType::F32, e.numel(p), SUMSQ_BLOCK))
        .collect();
    let mut scale = None;
    if let Some(max_norm) = opt.max_grad_norm {
        let blocks: usize = params
            .iter()
            .map(|&p| e.numel(p).div_ceil(SUMSQ_BLOCK))
            .sum();
        let partials = e.temp("grad_sq_partials", blocks.max(1), DType::F32);
        let mut base = 0;
        for (&p, ws) in params.iter().zip(&windows) {
            for &w in ws {
                let n = w.numel.div_ceil(SUMSQ_BLOCK);
                e.push(
                    Kernel::new("optim", "sumsq")
                        .bind_window("g", Slot::Grad(p), w)
                        .bind("partials", partials)
                        .u32(w.numel)
                        .u32(base + w.first / SUMSQ_BLOCK)
                        .groups_1d(n * RWG as usize, RWG),
                );
            }
            base += e.numel(p).div_ceil(SUMSQ_BLOCK);
        }
        let s = e.persistent("adamw.clip", 2, DType::F32);
        e.push(
            Kernel::new("optim", "clip_scale")
                .bind("partials", partials)
                .bind("scale", s)
                .u32(blocks)
                .f32(max_norm),
        );
        scale = Some(s);
    }
    for (&p, ws) in params.iter().zip(&windows) {
        let n = e.numel(p);
        let name = e.graph.desc(p).name.clone();
        let m = e.persistent(&format!("adamw.m.{name}"), n, DType::F32);
        let v = e.persistent(&format!("adamw.v.{name}"), n, DType::F32);
        for &w in ws {
            let mut k = Kernel::new("optim", "adamw")
                .bind_window("param", Slot::Value(p), w)
                .bind_window("grad", Slot::Grad(p), w)
                .bind_window("m", m, w)
                .bind_window("v", v, w)
                .bind("hyper", hyper);
            if let Some(s) = scale {
                k = k.bind("scale", s).konst("CLIP", "true");
            }
            if zero_grads {
                k = k.konst("ZERO_GRAD", "true");
            }
            e.push(
                k.u32(w.numel)
                    .f32(opt.beta1)
                    .f32(opt.beta2)
                    .f32(opt.eps)
                    .f32(opt.weight_decay)
                    .groups_1d(w.numel, WG),
            );
        }
    }
    Ok(hyper)
}

/// Label of the persistent `[1]` storage holding 1 - decay of the next
/// EMA update (written by the host before each optimizer step).
pub const EMA_ONE_MINUS_DECAY: &str = "ema.one_minus_decay";

/// The EMA shadow of parameter `name`.
pub fn ema_label(name: &str) -> String {
    format!("ema.{name}")
}

/// Emit the EMA update of `params` (after the optimizer): for each, its
/// shadow s -= (1 - decay) * (s - param), diffusers' `EMAModel.step`.
pub fn emit_ema(e: &mut Emit, params: &[TensorId]) {
    let one_minus = e.persistent(EMA_ONE_MINUS_DECAY, 1, DType::F32);
    for &p in params {
        let n = e.numel(p);
        let name = e.graph.desc(p).name.clone();
        let shadow = e.persistent(&ema_label(&name), n, DType::F32);
        for w in e.windows(DType::F32, n, SUMSQ_BLOCK) {
            e.push(
                Kernel::new("optim", "ema_update")
                    .bind_window("param", Slot::Value(p), w)
                    .bind_window("shadow", shadow, w)
                    .bind("one_minus_decay", one_minus)
                    .u32(w.numel)
                    .groups_1d(w.numel, WG),
            );
        }
    }
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
        // 601 elements: the norm sums three blocks of 256, the last partial.
        for max_grad_norm in [None, Some(0.05)] {
            let n = 601;
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
