//! The diffusion arithmetic of a training step as graph ops: random
//! timesteps and noise from a counter-based generator, the DDPM scheduler's
//! `add_noise` and `get_velocity`, and the DREAM update of the spec. Kernels:
//! `shaders/diffusion.wgsl`. None is differentiable: their outputs are data
//! (or, for DREAM, detached), so a step never differentiates through them.

use crate::dtype::DType;
use crate::error::{shape_err, Result};
use crate::graph::{Emit, Graph, Kernel, OpKernels, Slot, TensorId};

const WG: u32 = 256;

/// The random streams of a step: each draws from its own Philox counters.
pub mod stream {
    pub const TIMESTEPS: u32 = 1;
    /// Noise uses this stream and, for the noise offset, the next one.
    pub const NOISE: u32 = 2;
    /// The VAE's latent sample (`latent_dist.sample()`).
    pub const LATENT: u32 = 4;
    /// The noise of stochastic sampling steps (DDPM, DDIM with eta > 0).
    pub const SAMPLING: u32 = 5;
}

/// The 4 words of a random key, [seed lo, seed hi, counter lo, counter hi],
/// as the f32 bit patterns the kernels read back with `bitcast<u32>`. The
/// counter is the micro-step: every step draws fresh numbers, and resuming
/// only needs the counter.
pub fn rng_key(seed: u64, counter: u64) -> [f32; 4] {
    [seed, seed >> 32, counter, counter >> 32].map(|w| f32::from_bits(w as u32))
}

/// The diffusion ops, one variant each.
#[derive(Clone, Debug)]
pub enum Diffusion {
    /// `torch.randint(0, count, (B,))` from the generator, as f32.
    RandomTimesteps { count: u32 },
    /// N(0, 1) noise, plus `offset` * N(0, 1) per leading (batch, channel)
    /// plane (diffusers' `noise_offset`).
    RandomNormal { stream: u32, offset: f32 },
    /// `add_noise` (xt = alpha_t x0 + sigma_t noise) or, with `velocity`,
    /// `get_velocity` (v = alpha_t noise - sigma_t x0) of DDPMScheduler.
    Noising { velocity: bool },
    /// The spec's DREAM update of (xt, target) from a no-grad prediction;
    /// `detail` is p of lambda = sigma_t^p (`dream_detail_preservation`).
    DreamUpdate { v_prediction: bool, detail: f32 },
    /// Min-SNR loss weights per sample: min(snr_t, gamma) / divisor.
    MinSnrWeights { gamma: f32, divisor: SnrDivisor },
    /// One DDIM / DDPM denoising step with optional classifier-free
    /// guidance; `prediction` 0 epsilon, 1 v_prediction, 2 sample.
    SchedulerStep { guided: bool, prediction: u32 },
}

/// What the Min-SNR weight min(snr, gamma) is divided by, by prediction
/// type (diffusers' train_text_to_image).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnrDivisor {
    /// `sample`: not divided.
    One = 0,
    /// `epsilon`: snr.
    Snr = 1,
    /// `v_prediction`: snr + 1.
    SnrPlusOne = 2,
}

impl Graph {
    /// Per-sample timesteps `[batch]` uniform over `0..count`, drawn from
    /// `key` (an f32 `[4]` input holding [`rng_key`]).
    pub fn random_timesteps(
        &mut self,
        key: TensorId,
        batch: usize,
        count: u32,
    ) -> Result<TensorId> {
        check_key(self, key, "random_timesteps")?;
        let op = Diffusion::RandomTimesteps { count };
        Ok(self.add_node(op.into(), &[key], &[(vec![batch], DType::F32)])[0])
    }

    /// Standard normal noise of `shape` from `key`, plus `offset` times one
    /// normal per plane of the first two axes.
    pub fn random_normal(
        &mut self,
        key: TensorId,
        shape: &[usize],
        stream: u32,
        offset: f32,
    ) -> Result<TensorId> {
        check_key(self, key, "random_normal")?;
        if offset != 0.0 && shape.len() < 2 {
            return Err(shape_err(
                "random_normal",
                format!("a noise offset needs (batch, channel, ..) axes, got {shape:?}"),
            ));
        }
        let op = Diffusion::RandomNormal { stream, offset };
        Ok(self.add_node(op.into(), &[key], &[(shape.to_vec(), DType::F32)])[0])
    }

    /// `scheduler.add_noise(x0, noise, timesteps)` with `alphas_cumprod` `[T]`.
    pub fn add_noise(
        &mut self,
        x0: TensorId,
        noise: TensorId,
        timesteps: TensorId,
        alphas_cumprod: TensorId,
    ) -> Result<TensorId> {
        self.noising(x0, noise, timesteps, alphas_cumprod, false)
    }

    /// `scheduler.get_velocity(x0, noise, timesteps)`.
    pub fn get_velocity(
        &mut self,
        x0: TensorId,
        noise: TensorId,
        timesteps: TensorId,
        alphas_cumprod: TensorId,
    ) -> Result<TensorId> {
        self.noising(x0, noise, timesteps, alphas_cumprod, true)
    }

    fn noising(
        &mut self,
        x0: TensorId,
        noise: TensorId,
        t: TensorId,
        ac: TensorId,
        velocity: bool,
    ) -> Result<TensorId> {
        let op = if velocity {
            "get_velocity"
        } else {
            "add_noise"
        };
        check_per_sample(self, op, &[x0, noise], t, ac)?;
        let (s, d) = (self.shape(x0).to_vec(), self.dtype(x0));
        let op = Diffusion::Noising { velocity };
        Ok(self.add_node(op.into(), &[x0, noise, t, ac], &[(s, d)])[0])
    }

    /// The DREAM update: from `pred` (a no-grad model call on `xt`) the new
    /// `(xt, target)`. Detached: no gradient flows back through it.
    #[allow(clippy::too_many_arguments)]
    pub fn dream_update(
        &mut self,
        xt: TensorId,
        target: TensorId,
        noise: TensorId,
        pred: TensorId,
        timesteps: TensorId,
        alphas_cumprod: TensorId,
        v_prediction: bool,
        detail: f32,
    ) -> Result<(TensorId, TensorId)> {
        check_per_sample(
            self,
            "dream_update",
            &[xt, target, noise, pred],
            timesteps,
            alphas_cumprod,
        )?;
        let (s, d) = (self.shape(xt).to_vec(), self.dtype(xt));
        let op = Diffusion::DreamUpdate {
            v_prediction,
            detail,
        };
        let out = self.add_node(
            op.into(),
            &[xt, target, noise, pred, timesteps, alphas_cumprod],
            &[(s.clone(), d), (s, d)],
        );
        Ok((out[0], out[1]))
    }
}

impl Graph {
    /// One denoising step: x `[N, ..]`, the UNet's output `out` (`[2N, ..]`
    /// = [unconditional; conditional] when `guided`), per-step coefficients
    /// `coef` `[8]` (see `shaders/diffusion.wgsl`), the random key for the
    /// step's noise -> x_prev.
    pub fn scheduler_step(
        &mut self,
        x: TensorId,
        out: TensorId,
        coef: TensorId,
        key: TensorId,
        guided: bool,
        prediction: u32,
    ) -> Result<TensorId> {
        check_key(self, key, "scheduler_step")?;
        let (xs, os) = (self.shape(x).to_vec(), self.shape(out).to_vec());
        let mut want = xs.clone();
        if guided && !want.is_empty() {
            want[0] *= 2;
        }
        if os != want || self.shape(coef) != [8] {
            return Err(shape_err(
                "scheduler_step",
                format!(
                    "x {xs:?} needs out {want:?} and coef [8], got {os:?} and {:?}",
                    self.shape(coef)
                ),
            ));
        }
        let op = Diffusion::SchedulerStep { guided, prediction };
        let d = self.dtype(x);
        Ok(self.add_node(op.into(), &[x, out, coef, key], &[(xs, d)])[0])
    }

    /// Min-SNR loss weights `[B]` for `timesteps` (diffusers' `compute_snr`:
    /// snr = (alpha_t / sigma_t)^2; weight min(snr, gamma) / divisor).
    pub fn min_snr_weights(
        &mut self,
        timesteps: TensorId,
        alphas_cumprod: TensorId,
        gamma: f32,
        divisor: SnrDivisor,
    ) -> Result<TensorId> {
        let b = self.shape(timesteps).to_vec();
        if b.len() != 1 || self.shape(alphas_cumprod).len() != 1 {
            return Err(shape_err(
                "min_snr_weights",
                format!(
                    "expected timesteps [B] and alphas_cumprod [T], got {b:?} and {:?}",
                    self.shape(alphas_cumprod)
                ),
            ));
        }
        let op = Diffusion::MinSnrWeights { gamma, divisor };
        Ok(self.add_node(op.into(), &[timesteps, alphas_cumprod], &[(b, DType::F32)])[0])
    }
}

fn check_key(g: &Graph, key: TensorId, op: &str) -> Result<()> {
    if g.shape(key) != [4] || g.dtype(key) != DType::F32 {
        return Err(shape_err(
            op,
            format!(
                "the random key must be f32 [4], got {} {:?}",
                g.dtype(key),
                g.shape(key)
            ),
        ));
    }
    Ok(())
}

/// Tensors of one shape `[B, ..]`, timesteps `[B]`, a 1-D table.
fn check_per_sample(g: &Graph, op: &str, xs: &[TensorId], t: TensorId, ac: TensorId) -> Result<()> {
    let s = g.shape(xs[0]);
    if let Some(&other) = xs.iter().find(|&&x| g.shape(x) != s) {
        return Err(shape_err(
            op,
            format!("shapes {:?} and {:?} differ", s, g.shape(other)),
        ));
    }
    if s.is_empty() || g.shape(t) != [s[0]] || g.shape(ac).len() != 1 {
        return Err(shape_err(
            op,
            format!(
                "expected x [B, ..], timesteps [B], alphas_cumprod [T]; got {:?}, {:?}, {:?}",
                s,
                g.shape(t),
                g.shape(ac)
            ),
        ));
    }
    Ok(())
}

/// Elements per sample of a `[B, ..]` tensor.
fn per_sample(e: &Emit, x: TensorId) -> usize {
    e.numel(x) / e.shape(x)[0].max(1)
}

impl OpKernels for Diffusion {
    fn kind(&self) -> &'static str {
        match self {
            Diffusion::RandomTimesteps { .. } => "random_timesteps",
            Diffusion::RandomNormal { .. } => "random_normal",
            Diffusion::Noising { velocity: false } => "add_noise",
            Diffusion::Noising { velocity: true } => "get_velocity",
            Diffusion::DreamUpdate { .. } => "dream_update",
            Diffusion::MinSnrWeights { .. } => "min_snr_weights",
            Diffusion::SchedulerStep { .. } => "scheduler_step",
        }
    }

    fn forward(&self, e: &mut Emit, i: &[TensorId], o: &[TensorId]) -> Result<()> {
        let n = e.numel(o[0]);
        let k = match *self {
            Diffusion::RandomTimesteps { count } => Kernel::new("diffusion", "random_timesteps")
                .bind("key", Slot::Value(i[0]))
                .bind("t", Slot::Value(o[0]))
                .u32(n)
                .u32(count as usize)
                .u32(stream::TIMESTEPS as usize)
                .groups((n as u32).div_ceil(64).max(1), 1, 1),
            Diffusion::RandomNormal { stream, offset } => {
                let plane = e.shape(o[0]).iter().skip(2).product::<usize>().max(1);
                Kernel::new("diffusion", "random_normal")
                    .bind("key", Slot::Value(i[0]))
                    .bind("y", Slot::Value(o[0]))
                    .u32(n)
                    .u32(stream as usize)
                    .u32(plane)
                    .f32(offset)
                    .groups_1d(n.div_ceil(4), WG)
            }
            Diffusion::Noising { velocity } => {
                let mut k = Kernel::new("diffusion", "add_noise").konst("VELOCITY", velocity);
                for (name, &t) in ["x0", "noise", "t", "ac"].iter().zip(i) {
                    k = k.bind(name, Slot::Value(t));
                }
                k.bind("y", Slot::Value(o[0]))
                    .u32(n)
                    .u32(per_sample(e, i[0]))
                    .groups_1d(n, WG)
            }
            Diffusion::DreamUpdate {
                v_prediction,
                detail,
            } => {
                let mut k =
                    Kernel::new("diffusion", "dream_update").konst("V_PREDICTION", v_prediction);
                for (name, &t) in ["xt", "target", "noise", "pred", "t", "ac"].iter().zip(i) {
                    k = k.bind(name, Slot::Value(t));
                }
                k.bind("xt_out", Slot::Value(o[0]))
                    .bind("target_out", Slot::Value(o[1]))
                    .u32(n)
                    .u32(per_sample(e, i[0]))
                    .f32(detail)
                    .groups_1d(n, WG)
            }
            Diffusion::MinSnrWeights { gamma, divisor } => {
                Kernel::new("diffusion", "min_snr_weights")
                    .konst("DIVISOR", format!("{}u", divisor as u32))
                    .bind("t", Slot::Value(i[0]))
                    .bind("ac", Slot::Value(i[1]))
                    .bind("w", Slot::Value(o[0]))
                    .u32(n)
                    .f32(gamma)
                    .groups((n as u32).div_ceil(64).max(1), 1, 1)
            }
            Diffusion::SchedulerStep { guided, prediction } => {
                let mut k = Kernel::new("diffusion", "scheduler_step")
                    .konst("GUIDED", guided)
                    .konst("PREDICTION", format!("{prediction}u"));
                for (name, &t) in ["x", "out", "coef", "key"].iter().zip(i) {
                    k = k.bind(name, Slot::Value(t));
                }
                k.bind("x_prev", Slot::Value(o[0]))
                    .u32(n)
                    .u32(stream::SAMPLING as usize)
                    .groups_1d(n, WG)
            }
        };
        e.push(k);
        Ok(())
    }

    /// Nothing flows back: see [`OpKernels::differentiable`].
    fn backward(&self, _e: &mut Emit, _i: &[TensorId], _o: &[TensorId]) -> Result<()> {
        Ok(())
    }

    fn differentiable(&self) -> bool {
        false
    }

    fn flops(&self, g: &Graph, i: &[TensorId], _o: &[TensorId]) -> u64 {
        let per_element = match self {
            Diffusion::Noising { .. } => 3,
            Diffusion::DreamUpdate { .. } => 8,
            _ => 0,
        };
        per_element * g.numel(i[0]) as u64
    }
}

/// CPU references of the kernels (f64 math on the same f32 inputs), for
/// tests and for checking the generator's output on the host.
pub mod cpu {
    /// Philox4x32-10 of `counter` under `key`.
    pub fn philox(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
        let (mut c, mut k) = (counter, key);
        for _ in 0..10 {
            let p0 = 0xD251_1F53u64 * c[0] as u64;
            let p1 = 0xCD9E_8D57u64 * c[2] as u64;
            c = [
                (p1 >> 32) as u32 ^ c[1] ^ k[0],
                p1 as u32,
                (p0 >> 32) as u32 ^ c[3] ^ k[1],
                p0 as u32,
            ];
            k = [
                k[0].wrapping_add(0x9E37_79B9),
                k[1].wrapping_add(0xBB67_AE85),
            ];
        }
        c
    }

    fn words(seed: u64, counter: u64, block: u32, stream: u32) -> [u32; 4] {
        philox(
            [block, stream, counter as u32, (counter >> 32) as u32],
            [seed as u32, (seed >> 32) as u32],
        )
    }

    /// The timesteps `random_timesteps` draws.
    pub fn timesteps(seed: u64, counter: u64, batch: usize, count: u32) -> Vec<u32> {
        (0..batch as u32)
            .map(|b| {
                ((words(seed, counter, b, super::stream::TIMESTEPS)[0] as u64 * count as u64) >> 32)
                    as u32
            })
            .collect()
    }

    /// The first `n` normals of `stream` (no offset).
    pub fn normals(seed: u64, counter: u64, stream: u32, n: usize) -> Vec<f64> {
        let bm = |a: u32, b: u32| {
            let u1 = ((a >> 8) as f64 + 1.0) / 16_777_216.0;
            let u2 = (b >> 8) as f64 / 16_777_216.0;
            let r = (-2.0 * u1.ln()).sqrt();
            let phi = std::f64::consts::TAU * u2;
            [r * phi.cos(), r * phi.sin()]
        };
        (0..n.div_ceil(4) as u32)
            .flat_map(|block| {
                let w = words(seed, counter, block, stream);
                let [a, b] = bm(w[0], w[1]);
                let [c, d] = bm(w[2], w[3]);
                [a, b, c, d]
            })
            .take(n)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::{cpu, rng_key, stream};
    use crate::graph::{Graph, RunSpec, Session};
    use crate::ops::testing::{gpu, random, rel_l2};
    use crate::DType;
    use std::sync::Arc;

    /// Philox4x32-10 known-answer test (Random123's kat_vectors).
    #[test]
    fn philox_matches_random123_known_answers() {
        assert_eq!(
            cpu::philox([0; 4], [0; 2]),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
        assert_eq!(
            cpu::philox([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            cpu::philox(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    /// Timesteps and noise on the GPU equal the CPU generator; another
    /// counter gives other numbers; the noise is roughly N(0, 1).
    #[test]
    fn random_kernels_match_the_cpu_generator() {
        let (seed, batch, count) = (0x1234_5678_9abc_def0u64, 7, 1000);
        let shape = [batch, 3, 5, 5];
        let mut g = Graph::new();
        let key = g.input("key", &[4], DType::F32);
        let t = g.random_timesteps(key, batch, count).unwrap();
        let noise = g.random_normal(key, &shape, stream::NOISE, 0.0).unwrap();
        let spec = RunSpec {
            outputs: vec![t, noise],
            ..Default::default()
        };
        let mut s = Session::new(gpu(), Arc::new(g), spec).unwrap();
        let mut first = Vec::new();
        for counter in [3u64, (1 << 33) + 5] {
            s.write(key, &rng_key(seed, counter)).unwrap();
            s.step().unwrap();
            let got_t = s.read_blocking(t).unwrap();
            let want_t = cpu::timesteps(seed, counter, batch, count);
            assert_eq!(got_t, want_t.iter().map(|&v| v as f32).collect::<Vec<_>>());
            let got_n = s.read_blocking(noise).unwrap();
            let want_n = cpu::normals(seed, counter, stream::NOISE, got_n.len());
            let err = rel_l2(&got_n, &want_n);
            assert!(err < 1e-5, "counter {counter}: noise rel error {err:.2e}");
            if first.is_empty() {
                first = got_n;
            } else {
                assert_ne!(first, got_n, "another counter must draw other noise");
            }
        }
        let many = cpu::normals(seed, 0, stream::NOISE, 100_000);
        let mean = many.iter().sum::<f64>() / many.len() as f64;
        let var = many.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / many.len() as f64;
        assert!(
            mean.abs() < 0.01 && (var - 1.0).abs() < 0.02,
            "mean {mean}, var {var}"
        );
        let ts = cpu::timesteps(seed, 1, 20_000, 1000);
        assert!(ts.iter().all(|&t| t < 1000));
        let avg = ts.iter().map(|&t| t as f64).sum::<f64>() / ts.len() as f64;
        assert!((avg - 499.5).abs() < 8.0, "timestep mean {avg}");
    }

    /// The noise offset adds one shared normal per (batch, channel) plane.
    #[test]
    fn noise_offset_shifts_each_plane() {
        let (seed, shape) = (9u64, [2, 3, 4, 4]);
        let mut g = Graph::new();
        let key = g.input("key", &[4], DType::F32);
        let plain = g.random_normal(key, &shape, stream::NOISE, 0.0).unwrap();
        let offset = g.random_normal(key, &shape, stream::NOISE, 0.5).unwrap();
        let spec = RunSpec {
            outputs: vec![plain, offset],
            ..Default::default()
        };
        let mut s = Session::new(gpu(), Arc::new(g), spec).unwrap();
        s.write(key, &rng_key(seed, 0)).unwrap();
        s.step().unwrap();
        let (a, b) = (
            s.read_blocking(plain).unwrap(),
            s.read_blocking(offset).unwrap(),
        );
        let shifts = cpu::normals(seed, 0, stream::NOISE + 1, 6);
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            let want = 0.5 * shifts[i / 16];
            assert!(((y - x) as f64 - want).abs() < 1e-5, "element {i}");
        }
    }

    /// add_noise, get_velocity and both DREAM updates against the formulas.
    #[test]
    fn noising_and_dream_match_the_formulas() {
        let (b, per) = (3, 2 * 3 * 5);
        let shape = [b, 2, 3, 5];
        let ac: Vec<f32> = (0..50).map(|k| 0.999 - 0.019 * k as f32).collect();
        let ts = [0.0f32, 17.0, 49.0];
        let (x0v, nv, pv) = (random(b * per, 1), random(b * per, 2), random(b * per, 3));
        for (v_pred, detail) in [(false, 1.0f32), (false, 0.5), (true, 1.0), (true, 0.5)] {
            let mut g = Graph::new();
            let x0 = g.input("x0", &shape, DType::F32);
            let noise = g.input("noise", &shape, DType::F32);
            let pred = g.input("pred", &shape, DType::F32);
            let t = g.input("t", &[b], DType::F32);
            let table = g.input("ac", &[50], DType::F32);
            let xt = g.add_noise(x0, noise, t, table).unwrap();
            let target = if v_pred {
                g.get_velocity(x0, noise, t, table).unwrap()
            } else {
                noise
            };
            let (xt2, target2) = g
                .dream_update(xt, target, noise, pred, t, table, v_pred, detail)
                .unwrap();
            let spec = RunSpec {
                outputs: vec![xt, target, xt2, target2],
                ..Default::default()
            };
            let mut s = Session::new(gpu(), Arc::new(g), spec).unwrap();
            for (id, v) in [(x0, &x0v), (noise, &nv), (pred, &pv)] {
                s.write(id, v).unwrap();
            }
            s.write(t, &ts).unwrap();
            s.write(table, &ac).unwrap();
            s.step().unwrap();
            let mut want = [vec![], vec![], vec![], vec![]];
            for i in 0..b * per {
                let a = ac[ts[i / per] as usize] as f64;
                let (al, si) = (a.sqrt(), (1.0 - a).sqrt());
                let (x, n, p) = (x0v[i] as f64, nv[i] as f64, pv[i] as f64);
                let xt = al * x + si * n;
                let target = if v_pred { al * n - si * x } else { n };
                let pred_eps = if v_pred { si * xt + al * p } else { p };
                let delta = (n - pred_eps) * si.powf(detail as f64);
                want[0].push(xt);
                want[1].push(target);
                want[2].push(xt + si * delta);
                want[3].push(target + if v_pred { al * delta } else { delta });
            }
            for (k, id) in [xt, target, xt2, target2].into_iter().enumerate() {
                let err = rel_l2(&s.read_blocking(id).unwrap(), &want[k]);
                assert!(
                    err < 1e-6,
                    "v {v_pred} p {detail}: output {k} rel error {err:.2e}"
                );
            }
        }
    }
}
