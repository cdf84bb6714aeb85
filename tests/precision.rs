//! Mixed precision end to end: the built-in model trained for 50 steps in
//! fp16 (native f16 storage and the packed u32 storage of adapters without
//! SHADER_F16) and bf16 follows the fp32 run's loss curve.

use difftrain::gpu::Gpu;
use difftrain::ops::testing::gpu;
use difftrain::train::config::Config;
use difftrain::train::trainer::{train, Event, StepLog};
use std::sync::atomic::AtomicBool;

/// The per-step logs of 50 steps of the built-in model (batch 4 of 64
/// examples) at `precision` on `device`.
fn losses(device: &Gpu, precision: &str, name: &str) -> Vec<StepLog> {
    let out = std::env::temp_dir().join(format!(
        "difftrain-test-precision-{name}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&out);
    let sets: Vec<String> = [
        "train.train_batch_size=4",
        "data.builtin_size=64",
        "train.max_train_steps=50",
        "train.lr_warmup_steps=5",
        "train.checkpointing_steps=1000",
        "train.seed=3",
        "sample.validation_prompts=[]",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        format!("train.precision={precision:?}"),
        format!("train.output_dir={:?}", out.display().to_string()),
    ])
    .collect();
    let config = Config::for_training(None, &sets).unwrap();
    let mut log = Vec::new();
    train(device, &config, &AtomicBool::new(false), &mut |e| {
        if let Event::Step(s) = e {
            log.push(s.clone());
        }
    })
    .unwrap();
    let _ = std::fs::remove_dir_all(&out);
    log
}

/// Mean and largest |loss - fp32 loss| / fp32 loss over the steps.
fn deviation(run: &[StepLog], reference: &[StepLog]) -> (f32, f32) {
    let rel: Vec<f32> = run
        .iter()
        .zip(reference)
        .map(|(a, b)| (a.loss - b.loss).abs() / b.loss)
        .collect();
    let mean = rel.iter().sum::<f32>() / rel.len() as f32;
    (mean, rel.iter().copied().fold(0.0, f32::max))
}

/// The same seeds give the same images, timesteps and noise in every
/// precision, so the curves differ only by rounding, which compounds
/// through the weights step after step. f16 keeps 11 significant bits and
/// bf16 8 (16x coarser); each step's loss is a mean over 4096 latent
/// elements, which averages rounding. Tolerances (relative to the fp32
/// loss, measured on llvmpipe: fp16 mean 7e-5 / worst 2.3e-4, bf16 mean
/// 4.9e-4 / worst 2.8e-3): fp16 mean 1e-3, worst 5e-3; bf16 mean 5e-3, worst 3e-2.
#[test]
fn fp16_and_bf16_follow_the_fp32_loss_curve() {
    let fp32 = losses(gpu(), "fp32", "fp32");
    assert_eq!(fp32.len(), 50);
    let mut packed = gpu().clone();
    packed.caps.shader_f16 = false;
    let cases = [
        ("fp16", gpu(), 1e-3, 5e-3),
        ("fp16", &packed, 1e-3, 5e-3),
        ("bf16", gpu(), 5e-3, 3e-2),
    ];
    for (k, (precision, device, mean_tol, worst_tol)) in cases.into_iter().enumerate() {
        let label = format!(
            "{precision}{}",
            if device.caps.shader_f16 {
                ""
            } else {
                " (packed, no SHADER_F16)"
            }
        );
        let run = losses(device, precision, &format!("{precision}-{k}"));
        assert_eq!(run.len(), 50, "{label}");
        let (mean, worst) = deviation(&run, &fp32);
        println!(
            "{label}: loss {:.4} -> {:.4} (fp32 {:.4} -> {:.4}); relative deviation mean {mean:.1e}, worst {worst:.1e}",
            run[0].loss, run[49].loss, fp32[0].loss, fp32[49].loss
        );
        assert!(
            mean <= mean_tol && worst <= worst_tol,
            "{label}: the loss curve strays from fp32's (mean {mean:.1e} > {mean_tol:.0e} or worst {worst:.1e} > {worst_tol:.0e})"
        );
        if precision == "fp16" {
            let last = &run[49];
            assert_eq!(last.loss_scale, Some(65536.0), "{label}: loss scale");
            assert_eq!(last.skipped_steps, Some(0), "{label}: skipped steps");
        } else {
            assert_eq!(run[49].loss_scale, None, "{label}: no loss scaling");
        }
    }
}
