//! AdamW with decoupled weight decay and optional global gradient-norm
//! clipping. Kernels: `shaders/optim.wgsl`. Master weights, gradients and the
//! moments are f32 whatever the activation dtype.

use crate::dtype::DType;
use crate::error::Result;
use crate::graph::{AdamW, Emit, Kernel, Slot, TensorId};

/// Gradient elements per partial sum of squares (`BLOCK` in the shader).
/// Arenas above the binding limit are windowed in whole blocks, so the
/// partials, and the norm summed from them in a fixed order, do not depend
/// on the windowing.
const SUMSQ_BLOCK: usize = 1024;
/// Workgroup size of the sum-of-squares kernels (`RWG` in the shader).
const RWG: u32 = 64;
/// Subgroup width of `sumsq_subgroup` (`SG` in the shader).
const SUMSQ_SUBGROUP: u32 = 8;
const WG: u32 = 256;

/// Label of the persistent `[4]` storage `[t, 1 - beta1^t, 1 - beta2^t,
/// skipped]`: AdamW's step count (applied updates) and bias corrections,
/// kept on the GPU because a loss-scaled step may be skipped there.
pub const ADAMW_STEP: &str = "adamw.step";
/// Label of the persistent `[2]` storage `[multiplier, gradient norm]`.
pub const ADAMW_CLIP: &str = "adamw.clip";
/// Label of the persistent `[4]` storage `[scale, growth tracker, skipped
/// steps, 0]` of dynamic loss scaling.
pub const GRAD_SCALER: &str = "grad_scaler";

/// Trained parameters packed into one arena per buffer: each parameter sits
/// at the same element offset of its arena as its gradient, AdamW moments
/// and EMA shadow do in theirs, so one dispatch per arena (and binding
/// window) updates every parameter. The gaps between members stay zero,
/// which every optimizer kernel maps to zero.
pub struct ParamArena {
    pub index: usize,
    /// Members and their first element.
    pub members: Vec<(TensorId, usize)>,
    pub numel: usize,
    pub params: Slot,
    pub grads: Slot,
}

impl ParamArena {
    /// A persistent arena of this layout labelled `arena{index}/{what}`,
    /// with `member_label(param name)` placed in it for every member.
    fn state(&self, e: &mut Emit, what: &str, member_label: impl Fn(&str) -> String) -> Slot {
        let arena = e.persistent(
            &format!("arena{}/{what}", self.index),
            self.numel,
            DType::F32,
        );
        for &(p, first) in &self.members {
            let n = e.numel(p);
            let member = e.persistent(&member_label(&e.graph.desc(p).name), n, DType::F32);
            e.place(member, arena, first);
        }
        arena
    }

    /// Binding windows over the arena, in whole sum-of-squares blocks.
    fn windows(&self, e: &Emit) -> Vec<crate::graph::Window> {
        e.windows(DType::F32, self.numel, SUMSQ_BLOCK)
    }
}

/// Lay `params` (f32) out in arenas of at most the adapter's buffer size,
/// each member at an aligned element offset, and place their values and
/// gradients there.
pub fn param_arenas(e: &mut Emit, params: &[TensorId]) -> Vec<ParamArena> {
    let align = e.arena_align(DType::F32);
    let max_numel = (e.caps.max_buffer_bytes / 4) as usize / SUMSQ_BLOCK * SUMSQ_BLOCK;
    let mut layouts: Vec<(Vec<(TensorId, usize)>, usize)> = Vec::new();
    for &p in params {
        let n = e.numel(p);
        match layouts.last_mut() {
            Some((members, end)) if end.next_multiple_of(align) + n <= max_numel => {
                let first = end.next_multiple_of(align);
                members.push((p, first));
                *end = first + n;
            }
            _ => layouts.push((vec![(p, 0)], n)),
        }
    }
    layouts
        .into_iter()
        .enumerate()
        .map(|(index, (members, end))| {
            // Whole sum-of-squares blocks.
            let numel = end.next_multiple_of(SUMSQ_BLOCK);
            let params = e.persistent(&format!("arena{index}/params"), numel, DType::F32);
            let grads = e.persistent(&format!("arena{index}/grads"), numel, DType::F32);
            for &(p, first) in &members {
                e.place(Slot::Value(p), params, first);
                e.place(Slot::Grad(p), grads, first);
            }
            ParamArena {
                index,
                members,
                numel,
                params,
                grads,
            }
        })
        .collect()
}

/// Emit the optimizer step over the parameter `arenas` (after the backward
/// pass): the global gradient norm, the step prologue (clipping
/// multiplier, loss scaling, the step count) and AdamW. Returns the
/// persistent `hyper` slot the host fills each step with `[lr, 0, 0, 0]`.
/// The norm lands in [`ADAMW_CLIP`]. With `zero_grads` (gradient
/// accumulation) each gradient is zeroed once used, ready for the next
/// accumulation. With loss scaling, `seed` is the backward seed input that
/// the scale multiplies.
pub fn emit_adamw(
    e: &mut Emit,
    arenas: &[ParamArena],
    opt: &AdamW,
    zero_grads: bool,
    seed: Option<TensorId>,
) -> Result<Slot> {
    let hyper = e.persistent("adamw.hyper", 4, DType::F32);
    let blocks: usize = arenas.iter().map(|a| a.numel.div_ceil(SUMSQ_BLOCK)).sum();
    let partials = e.temp("grad_sq_partials", blocks.max(1), DType::F32);
    // Where a workgroup can be one 8-wide subgroup, its lanes combine by
    // subgroupAdd instead of a barrier tree.
    let (entry, wg) = if e.caps.subgroups_exactly(SUMSQ_SUBGROUP) {
        ("sumsq_subgroup", SUMSQ_SUBGROUP)
    } else {
        ("sumsq", RWG)
    };
    let mut base = 0;
    for a in arenas {
        for w in a.windows(e) {
            let n = w.numel.div_ceil(SUMSQ_BLOCK);
            e.push(
                Kernel::new("optim", entry)
                    .bind_window("g", a.grads, w)
                    .bind("partials", partials)
                    .u32(w.numel)
                    .u32(base + w.first / SUMSQ_BLOCK)
                    .groups_1d(n * wg as usize, wg),
            );
        }
        base += a.numel.div_ceil(SUMSQ_BLOCK);
    }
    let clip = e.persistent(ADAMW_CLIP, 2, DType::F32);
    let step = e.persistent(ADAMW_STEP, 4, DType::F32);
    let mut k = Kernel::new("optim", "step_prologue")
        .bind("partials", partials)
        .bind("clip", clip)
        .bind("step", step);
    if opt.max_grad_norm.is_some() {
        k = k.konst("CLIP", "true");
    }
    let scaling = opt.loss_scaling.clone().unwrap_or_default();
    if opt.loss_scaling.is_some() {
        let seed = seed.ok_or_else(|| {
            crate::error::shape_err("adamw", "loss scaling needs a backward seed")
        })?;
        k = k
            .bind("scaler", e.persistent(GRAD_SCALER, 4, DType::F32))
            .bind("seed", Slot::Value(seed))
            .konst("SCALER", "true");
    }
    e.push(
        k.u32(blocks)
            .f32(opt.max_grad_norm.unwrap_or(0.0))
            .f32((opt.beta1 as f64).ln() as f32)
            .f32((opt.beta2 as f64).ln() as f32)
            .f32(scaling.growth_factor)
            .f32(scaling.backoff_factor)
            .f32(scaling.growth_interval as f32),
    );
    for a in arenas {
        let m = a.state(e, "adamw_m", |name| format!("adamw.m.{name}"));
        let v = a.state(e, "adamw_v", |name| format!("adamw.v.{name}"));
        for w in a.windows(e) {
            let mut k = Kernel::new("optim", "adamw")
                .bind_window("param", a.params, w)
                .bind_window("grad", a.grads, w)
                .bind_window("m", m, w)
                .bind_window("v", v, w)
                .bind("hyper", hyper)
                .bind("clip", clip)
                .bind("step", step);
            if zero_grads {
                k = k.konst("ZERO_GRAD", "true");
            }
            e.push(
                k.u32(w.numel)
                    .f32(opt.beta1)
                    .f32(opt.beta2)
                    .f32(opt.eps)
                    .f32(opt.weight_decay)
                    .groups_1d(w.numel / 4, WG),
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

/// Emit the EMA update of the parameters in `arenas` (after the
/// optimizer): for each, its shadow s -= (1 - decay) * (s - param),
/// diffusers' `EMAModel.step`.
pub fn emit_ema(e: &mut Emit, arenas: &[ParamArena]) {
    let one_minus = e.persistent(EMA_ONE_MINUS_DECAY, 1, DType::F32);
    for a in arenas {
        let shadow = a.state(e, "ema", ema_label);
        for w in a.windows(e) {
            e.push(
                Kernel::new("optim", "ema_update")
                    .bind_window("param", a.params, w)
                    .bind_window("shadow", shadow, w)
                    .bind("one_minus_decay", one_minus)
                    .u32(w.numel)
                    .groups_1d(w.numel / 4, WG),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::graph::{AdamW, Graph, RunSpec, Session, TensorId};
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

    /// A session of loss = mean((w - target)^2) over n values with `opt`:
    /// (session, [w, target, backward seed]).
    fn mse_session(n: usize, opt: &AdamW) -> (Session, [TensorId; 3]) {
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
        let s = Session::new(gpu(), Arc::new(g), spec).unwrap();
        (s, [w, target, seed])
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
            let (mut s, [w, target, seed]) = mse_session(n, &opt);
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

    /// Parameters of several sizes share one arena: the whole optimizer is
    /// three dispatches (sum of squares, prologue, AdamW), the global norm
    /// spans every parameter, and each parameter and moment reads back by
    /// its own name from its aligned place in the arena.
    #[test]
    fn parameters_in_one_arena_step_like_one_vector() {
        let sizes = [601, 37, 256];
        let opt = AdamW {
            lr: 0.01,
            weight_decay: 0.1,
            max_grad_norm: Some(0.05),
            ..Default::default()
        };
        let mut g = Graph::new();
        let mut seeds = Vec::new();
        let mut tensors = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            let w = g.param(&format!("w{i}"), &[n]);
            let target = g.input(&format!("target{i}"), &[n], DType::F32);
            let loss = g.mse_loss(w, target).unwrap();
            let seed = g.input(&format!("seed{i}"), &[1], DType::F32);
            seeds.push((loss, seed));
            tensors.push((w, target, seed));
        }
        let spec = RunSpec {
            seeds,
            optimizer: Some(opt.clone()),
            ..Default::default()
        };
        let mut s = Session::new(gpu(), Arc::new(g), spec).unwrap();
        assert_eq!(s.plan.kernels.len() - s.plan.optimizer_start, 3);
        let (mut wc, mut targets) = (Vec::new(), Vec::new());
        for (i, &(w, target, seed)) in tensors.iter().enumerate() {
            let (w0, t0) = (
                random(sizes[i], 10 + i as u64),
                random(sizes[i], 20 + i as u64),
            );
            s.write(w, &w0).unwrap();
            s.write(target, &t0).unwrap();
            s.write(seed, &[1.0]).unwrap();
            wc.extend(w0.iter().map(|&x| x as f64));
            targets.extend(t0.iter().map(|&x| (x as f64, sizes[i] as f64)));
        }
        let total = wc.len();
        let (mut m, mut v) = (vec![0.0; total], vec![0.0; total]);
        for step in 1..=3 {
            let grad: Vec<f64> = wc
                .iter()
                .zip(&targets)
                .map(|(a, &(b, n))| 2.0 * (a - b) / n)
                .collect();
            adamw_cpu(&mut wc, &mut m, &mut v, &grad, step, &opt);
            s.step().unwrap();
        }
        let mut first = 0;
        for (i, &(w, _, _)) in tensors.iter().enumerate() {
            let range = first..first + sizes[i];
            let got = s.read_blocking(w).unwrap();
            let err = crate::ops::testing::rel_l2(&got, &wc[range.clone()]);
            assert!(err < 1e-6, "w{i}: AdamW rel error {err:.2e}");
            let got_m = s.read_state_blocking(&format!("adamw.m.w{i}")).unwrap();
            let err = crate::ops::testing::rel_l2(&got_m, &m[range]);
            assert!(err < 1e-6, "adamw.m.w{i}: rel error {err:.2e}");
            first += sizes[i];
        }
    }

    /// torch.amp.GradScaler over a run of good and overflowing steps: the
    /// scale backs off and grows, skipped steps leave the weights, the
    /// moments and AdamW's step count alone, and the backward seed follows
    /// the scale.
    #[test]
    fn loss_scaling_skips_overflow_and_follows_grad_scaler() {
        use crate::graph::LossScaling;
        let n = 300;
        let scaling = LossScaling {
            init_scale: 1024.0,
            growth_interval: 3,
            ..Default::default()
        };
        let opt = AdamW {
            lr: 0.01,
            max_grad_norm: Some(0.05),
            loss_scaling: Some(scaling.clone()),
            ..Default::default()
        };
        let (mut s, [w, target, seed]) = mse_session(n, &opt);
        let w0 = random(n, 1);
        let t0 = random(n, 2);
        s.write(w, &w0).unwrap();
        s.write(seed, &[scaling.init_scale]).unwrap();
        let mut wc: Vec<f64> = w0.iter().map(|&x| x as f64).collect();
        let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
        let (mut scale, mut tracker, mut skipped, mut t) = (1024.0f32, 0, 0, 0);
        // A target of 1e38 overflows the scaled gradient to inf.
        let overflow = [false, true, false, false, false, false, true, false];
        for (k, &bad) in overflow.iter().enumerate() {
            let tv: Vec<f32> = if bad { vec![1e38; n] } else { t0.clone() };
            s.write(target, &tv).unwrap();
            s.step().unwrap();
            if bad {
                scale *= 0.5;
                tracker = 0;
                skipped += 1;
            } else {
                t += 1;
                let grad: Vec<f64> = wc
                    .iter()
                    .zip(&t0)
                    .map(|(a, &b)| 2.0 * (a - b as f64) / n as f64)
                    .collect();
                adamw_cpu(&mut wc, &mut m, &mut v, &grad, t, &opt);
                tracker += 1;
                if tracker == 3 {
                    scale *= 2.0;
                    tracker = 0;
                }
            }
            let scaler = s.read_state_blocking(super::GRAD_SCALER).unwrap();
            assert_eq!(
                scaler[..3],
                [scale, tracker as f32, skipped as f32],
                "step {k}: scaler state"
            );
            assert_eq!(s.read_blocking(seed).unwrap(), [scale], "step {k}: seed");
            let step = s.read_state_blocking(super::ADAMW_STEP).unwrap();
            assert_eq!(step[0], t as f32, "step {k}: AdamW's step count");
            assert_eq!(step[3], if bad { 1.0 } else { 0.0 }, "step {k}: skip flag");
            let got = s.read_blocking(w).unwrap();
            assert!(
                got.iter().all(|x| x.is_finite()),
                "step {k}: weights not finite"
            );
            let err = crate::ops::testing::rel_l2(&got, &wc);
            assert!(err < 1e-6, "step {k}: AdamW rel error {err:.2e}");
        }
        // 1024 -> 512 (overflow) -> 1024 (three good steps) -> 512 (overflow).
        assert_eq!(scale, 512.0);
    }
}
