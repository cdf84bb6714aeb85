//! The training step against PyTorch: fixtures in tests/fixtures/train_step
//! written by tests/fixtures/generate_step.py (diffusers' DDPMScheduler, the
//! spec's DREAM, torch AdamW after clip_grad_norm_, in float64).
//!
//! Tolerances (relative L2 over each tensor), the issues' bars: `loss`,
//! `noisy_latents`, `target` 1e-4; `grad_norm` 1e-4; every updated
//! parameter and every update (new - old) 1e-3; `alphas_cumprod` 1e-6;
//! Min-SNR `mse_loss_weights` 1e-5. Adam's
//! first step is about lr * sign(g), so the updates are what shows a wrong
//! gradient, clipping or weight decay.

use difftrain::io::TensorFile;
use difftrain::ops::testing::gpu;
use difftrain::train::config::Config;
use difftrain::train::scheduler::{BetaSchedule, NoiseSchedule};
use difftrain::train::single_step::single_step;
mod common;

use common::{fixture, rel_l2};

const CASES: &[&str] = &[
    "eps",
    "eps_dream_p1",
    "eps_dream_p05",
    "v",
    "v_dream_p1",
    "v_dream_p05",
    "sample_x0",
    "eps_noclip",
    "v_linear",
    "eps_cos",
    "v_zero_snr",
    "eps_snr5",
    "v_snr5_dream",
    "eps_snr1_linear",
];

fn check(name: &str, got: &[f32], want: &[f32], tol: f64) -> f64 {
    let err = rel_l2(got, want);
    assert!(
        err <= tol,
        "{name}: relative L2 error {err:.3e} > {tol:.0e}"
    );
    err
}

#[test]
fn step_matches_pytorch_on_every_case() {
    let dir = fixture("train_step");
    let inputs = TensorFile::read(&dir.join("inputs.safetensors")).unwrap();
    let before = TensorFile::read(&dir.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    for case in CASES {
        let config = Config::load(Some(&dir.join(format!("{case}.toml"))), &[]).unwrap();
        let want = TensorFile::read(&dir.join(format!("{case}.expected.safetensors"))).unwrap();
        let got = single_step(gpu(), &dir.join("unet"), &inputs, &config)
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        let g = |k: &str| &got.get(k).unwrap().values;
        let w = |k: &str| &want.get(k).unwrap().values;
        let mut line = format!("{case}:");
        for k in ["loss", "noisy_latents", "target", "grad_norm"] {
            let err = check(&format!("{case} {k}"), g(k), w(k), 1e-4);
            line += &format!(" {k} {err:.1e}");
        }
        check(
            &format!("{case} alphas_cumprod"),
            g("alphas_cumprod"),
            w("alphas_cumprod"),
            1e-6,
        );
        if want.tensors.contains_key("mse_loss_weights") {
            let err = check(
                &format!("{case} mse_loss_weights"),
                g("mse_loss_weights"),
                w("mse_loss_weights"),
                1e-5,
            );
            line += &format!(" min-snr weights {err:.1e}");
        }
        let (mut worst_param, mut worst_update) = (0.0f64, (0.0f64, String::new()));
        for (name, old) in &before.tensors {
            worst_param = worst_param.max(check(&format!("{case} {name}"), g(name), w(name), 1e-3));
            let delta = |new: &[f32]| -> Vec<f32> {
                new.iter().zip(&old.values).map(|(a, b)| a - b).collect()
            };
            let err = rel_l2(&delta(g(name)), &delta(w(name)));
            if err > worst_update.0 {
                worst_update = (err, name.clone());
            }
        }
        println!(
            "{line}; worst parameter {worst_param:.1e}, worst update {:.1e} ({})",
            worst_update.0, worst_update.1
        );
        assert!(
            worst_update.0 <= 1e-3,
            "{case}: update of {} off by {:.3e}",
            worst_update.1,
            worst_update.0
        );
    }
}

/// alphas_cumprod within 1e-6 of diffusers' for the three beta schedules.
/// The zero-terminal-SNR rescale gets 1e-5: torch's vectorized sqrt is not
/// always correctly rounded (an ulp off here and there), and the rescale's
/// tail, a ratio of values near zero, amplifies that ulp.
#[test]
fn alphas_cumprod_match_diffusers() {
    let dir = fixture("train_step");
    let want = TensorFile::read(&dir.join("schedules.safetensors")).unwrap();
    let sd = |schedule, start, end| NoiseSchedule {
        beta_schedule: schedule,
        beta_start: start,
        beta_end: end,
        ..Default::default()
    };
    let cases = [
        ("linear", sd(BetaSchedule::Linear, 0.0001, 0.02)),
        (
            "scaled_linear",
            sd(BetaSchedule::ScaledLinear, 0.00085, 0.012),
        ),
        (
            "squaredcos_cap_v2",
            sd(BetaSchedule::SquaredcosCapV2, 0.0001, 0.02),
        ),
        (
            "scaled_linear_zero_snr",
            NoiseSchedule {
                rescale_betas_zero_snr: true,
                ..sd(BetaSchedule::ScaledLinear, 0.00085, 0.012)
            },
        ),
        (
            "linear_t50",
            NoiseSchedule {
                num_train_timesteps: 50,
                ..sd(BetaSchedule::Linear, 0.0001, 0.02)
            },
        ),
    ];
    for (name, s) in cases {
        let got = s.alphas_cumprod();
        let w = &want.get(name).unwrap().values;
        let worst = got
            .iter()
            .zip(w)
            .map(|(a, b)| {
                if *b == 0.0 {
                    a.abs() as f64
                } else {
                    ((a - b) / b).abs() as f64
                }
            })
            .fold(0.0, f64::max);
        let tol = if s.rescale_betas_zero_snr { 1e-5 } else { 1e-6 };
        println!("{name}: worst relative difference {worst:.2e}");
        assert!(worst <= tol, "{name}: {worst:.2e} > {tol:.0e}");
    }
}

/// Gradient accumulation: two micro-batches of one sample with the loss
/// scaled by 1/2 and one optimizer step give the update of one batch of two
/// (mean loss of equal halves = mean loss of the whole).
#[test]
fn accumulated_half_batches_equal_one_whole_batch() {
    use difftrain::graph::Session;
    use difftrain::io::WeightFile;
    use difftrain::models::weights::load_params;
    use difftrain::models::UNet;
    use difftrain::train::options::{adamw, noise_schedule, step_options};
    use difftrain::train::step::{StepShape, TrainStep};
    use std::sync::Arc;

    let dir = fixture("train_step");
    let inputs = TensorFile::read(&dir.join("inputs.safetensors")).unwrap();
    let config = Config::load(Some(&dir.join("eps.toml")), &[]).unwrap();
    let unet = UNet::from_config_file(&dir.join("unet/config.json")).unwrap();
    let weights = WeightFile::read(&dir.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let schedule = noise_schedule(&dir.join("unet"), &config).unwrap();
    let opts = step_options(&config, &schedule, true).unwrap();
    let t = |k: &str| inputs.get(k).unwrap();
    let rows = |k: &str, b: usize, n: usize| {
        let per = t(k).values.len() / 2;
        t(k).values[b * per..(b + n) * per].to_vec()
    };

    // The update (new - old) of every parameter.
    let run = |batch: usize, accum: usize| -> Vec<Vec<f32>> {
        let shape = StepShape {
            batch,
            height: 8,
            width: 8,
            text_len: 7,
            text_dim: 12,
        };
        let step = TrainStep::build(&unet, shape, &opts).unwrap();
        let spec = step.run_spec(adamw(&config, config.train.learning_rate), accum > 1, false);
        let graph = Arc::new(step.graph);
        let mut s = Session::new(gpu(), graph.clone(), spec).unwrap();
        load_params(&s, &weights).unwrap();
        let params = graph.params();
        let before: Vec<Vec<f32>> = params
            .iter()
            .map(|&p| s.read_blocking(p).unwrap())
            .collect();
        s.write(step.alphas_cumprod, &schedule.alphas_cumprod())
            .unwrap();
        pollster::block_on(TrainStep::write_loss_grad(&s, step.loss_grad, accum)).unwrap();
        for m in 0..accum {
            let b0 = m * batch;
            s.write(step.latents, &rows("latents", b0, batch)).unwrap();
            s.write(step.noise, &rows("noise", b0, batch)).unwrap();
            s.write(step.timesteps, &rows("timesteps", b0, batch))
                .unwrap();
            s.write(step.context, &rows("encoder_hidden_states", b0, batch))
                .unwrap();
            if m + 1 == accum {
                s.step().unwrap();
            } else {
                s.step_accumulate().unwrap();
            }
        }
        params
            .iter()
            .zip(before)
            .map(|(&p, old)| {
                let new = s.read_blocking(p).unwrap();
                new.iter().zip(&old).map(|(x, y)| x - y).collect()
            })
            .collect()
    };
    let whole = run(2, 1);
    let halves = run(1, 2);
    let worst = whole
        .iter()
        .zip(&halves)
        .map(|(a, b)| rel_l2(b, a))
        .fold(0.0, f64::max);
    println!("accumulated vs whole batch: worst update difference {worst:.2e}");
    assert!(worst < 1e-3, "{worst:.2e}");
}

/// The pooled bytes and dispatches of the fixture UNet's step for the
/// config of `case`, at batch `batch` and `latent` x `latent` latents,
/// with gradient checkpointing when `checkpointing`.
fn planned_step(case: &str, batch: usize, latent: usize, checkpointing: bool) -> (u64, usize) {
    use difftrain::graph::Plan;
    use difftrain::models::UNet;
    use difftrain::train::options::{adamw, noise_schedule, step_options};
    use difftrain::train::step::{StepShape, TrainStep};

    let dir = fixture("train_step");
    let unet = UNet::from_config_file(&dir.join("unet/config.json")).unwrap();
    let shape = StepShape {
        batch,
        height: latent,
        width: latent,
        text_len: 7,
        text_dim: 12,
    };
    let mut config = Config::load(Some(&dir.join(format!("{case}.toml"))), &[]).unwrap();
    config.train.gradient_checkpointing = checkpointing;
    let schedule = noise_schedule(&dir.join("unet"), &config).unwrap();
    let opts = step_options(&config, &schedule, false).unwrap();
    let step = TrainStep::build(&unet, shape, &opts).unwrap();
    let spec = step.run_spec(adamw(&config, 1e-3), false, false);
    let plan = Plan::build(&step.graph, &gpu().caps, &spec).unwrap();
    (plan.stats.pooled_bytes, plan.stats.dispatches)
}

/// DREAM's extra UNet pass keeps no activations: its pooled memory is
/// reused as the pass goes, so the step's pool grows little with it.
#[test]
fn dream_pass_keeps_no_activations() {
    // Big enough latents that activations, not per-op scratch, fill the pool.
    let (plain, plain_dispatches) = planned_step("eps", 4, 32, false);
    let (dream, dream_dispatches) = planned_step("eps_dream_p1", 4, 32, false);
    println!("pooled bytes: {plain} plain, {dream} with DREAM; dispatches {plain_dispatches} -> {dream_dispatches}");
    assert!(
        dream_dispatches > plain_dispatches,
        "DREAM adds a forward pass"
    );
    // Kept activations would double the pool; what DREAM adds is the
    // greedy pool's fragmentation (about 11% here).
    assert!(
        (dream as f64) < 1.25 * plain as f64,
        "DREAM's pass must not keep activations: {dream} vs {plain} bytes"
    );
}

/// Gradient checkpointing recomputes each UNet block in backward with the
/// same kernels, so the step's results are bit for bit those without it
/// (with and without DREAM), while the pool holds fewer activations.
#[test]
fn gradient_checkpointing_same_step_less_memory() {
    let dir = fixture("train_step");
    let inputs = TensorFile::read(&dir.join("inputs.safetensors")).unwrap();
    for case in ["eps", "v_dream_p05"] {
        let mut config = Config::load(Some(&dir.join(format!("{case}.toml"))), &[]).unwrap();
        let plain = single_step(gpu(), &dir.join("unet"), &inputs, &config).unwrap();
        config.train.gradient_checkpointing = true;
        let ckpt = single_step(gpu(), &dir.join("unet"), &inputs, &config).unwrap();
        assert_eq!(plain.tensors.len(), ckpt.tensors.len());
        for (name, t) in &plain.tensors {
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&t.values),
                bits(&ckpt.get(name).unwrap().values),
                "{case}: {name} differs with gradient checkpointing"
            );
        }
    }

    let (plain, plain_dispatches) = planned_step("eps", 4, 32, false);
    let (ckpt, ckpt_dispatches) = planned_step("eps", 4, 32, true);
    println!(
        "pooled bytes {plain} -> {ckpt} with checkpointing; dispatches {plain_dispatches} -> {ckpt_dispatches}"
    );
    assert!(
        ckpt_dispatches > plain_dispatches,
        "recomputation adds dispatches"
    );
    assert!(
        (ckpt as f64) < 0.8 * plain as f64,
        "checkpointing must keep fewer activations: {ckpt} vs {plain} bytes"
    );
}
