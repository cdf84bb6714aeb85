//! The trainer end to end on the built-in model, at a tiny size: exact
//! resume (bit-identical weights, with gradient accumulation and a resume in
//! mid-epoch), a crash while writing a checkpoint, and the named errors of
//! damaged checkpoints and bad data.

use difftrain::ops::testing::gpu;
use difftrain::train::checkpoint;
use difftrain::train::config::Config;
use difftrain::train::trainer::{train, Event, Summary};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// A fresh folder under the system's temporary folder.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("difftrain-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The built-in preset, shrunk: 12 examples in batches of 2 with 2
/// accumulation steps, so an epoch is 3 optimizer steps.
fn tiny(out: &Path, extra: &[&str]) -> Config {
    let mut sets: Vec<String> = [
        "train.train_batch_size=2",
        "train.gradient_accumulation_steps=2",
        "train.max_train_steps=5",
        "train.lr_warmup_steps=1",
        "train.checkpointing_steps=100",
        "train.seed=7",
        "data.builtin_size=12",
        "train.use_ema=false",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    sets.push(format!("train.output_dir={:?}", out.display().to_string()));
    sets.extend(extra.iter().map(|s| s.to_string()));
    Config::for_training(None, &sets).unwrap()
}

/// Train; with `stop_after`, ask to stop once that step is done.
fn run(config: &Config, stop_after: Option<u64>) -> difftrain::Result<Summary> {
    let stop = AtomicBool::new(false);
    train(gpu(), config, &stop, &mut |e| {
        if let Event::Step(s) = e {
            if Some(s.step) == stop_after {
                stop.store(true, Ordering::SeqCst);
            }
        }
    })
}

fn unet_bytes(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("unet/diffusion_pytorch_model.safetensors")).unwrap()
}

#[test]
fn resume_is_bit_identical_with_accumulation_in_mid_epoch() {
    check_resume("plain", &[]);
}

#[test]
fn resume_is_bit_identical_with_ema() {
    check_resume("ema", &["train.use_ema=true", "train.ema_use_warmup=true"]);
}

#[test]
fn resume_is_bit_identical_in_fp16_with_loss_scaling() {
    check_resume("fp16", &["train.precision=\"fp16\""]);
}

#[test]
fn resume_is_bit_identical_with_ema_and_cached_encoders() {
    check_resume(
        "cache",
        &[
            "train.use_ema=true",
            "data.cache_latents=true",
            "data.cache_text_embeddings=true",
        ],
    );
}

/// A run started in fp32 resumes in fp16 (the loss scaler starts fresh)
/// and back in fp32.
#[test]
fn a_run_can_switch_precision_when_resumed() {
    let out = scratch("switch-precision");
    let s = run(
        &tiny(
            &out,
            &["train.checkpointing_steps=1", "train.max_train_steps=1"],
        ),
        None,
    );
    assert_eq!(s.unwrap().steps, 1);
    for (precision, steps) in [("fp16", 2), ("fp32", 3)] {
        let sets = [
            "train.checkpointing_steps=1",
            "train.resume_from=latest",
            &format!("train.precision={precision:?}"),
            &format!("train.max_train_steps={steps}"),
        ];
        let s = run(&tiny(&out, &sets), None).unwrap();
        assert_eq!((s.steps, s.steps_this_run), (steps, 1), "{precision}");
        assert!(s.last_loss.unwrap().is_finite());
    }
    let _ = std::fs::remove_dir_all(&out);
}

/// The encoder caches are keyed by what the encoders see: a changed image
/// or resolution is encoded again, an unchanged one is reused.
#[test]
fn the_cache_reencodes_changed_images_and_settings() {
    let root = scratch("cache-keys");
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut meta = String::new();
    for i in 0..4u8 {
        let img = image::RgbImage::from_pixel(16, 16, image::Rgb([60 * i, 30, 200 - 40 * i]));
        img.save(data.join(format!("{i}.png"))).unwrap();
        meta.push_str(&format!(
            "{{\"file_name\": \"{i}.png\", \"text\": \"a square {i}\"}}\n"
        ));
    }
    std::fs::write(data.join("metadata.jsonl"), meta).unwrap();
    let out = root.join("out");
    let entries = |kind: &str| {
        std::fs::read_dir(out.join("cache").join(kind))
            .unwrap()
            .count()
    };
    let train_at = |resolution: usize| {
        let config = tiny(
            &out,
            &[
                "train.gradient_accumulation_steps=1",
                "train.max_train_steps=2",
                "data.cache_latents=true",
                "data.cache_text_embeddings=true",
                "data.center_crop=true",
                &format!("data.resolution={resolution}"),
                &format!("data.train_data_dir={:?}", data.display().to_string()),
            ],
        );
        let mut notes = Vec::new();
        train(gpu(), &config, &AtomicBool::new(false), &mut |e| {
            if let Event::Note(n) = e {
                notes.push(n);
            }
        })
        .unwrap();
        notes.into_iter().find(|n| n.starts_with("cache:")).unwrap()
    };
    assert_eq!(
        train_at(32),
        "cache: latents 4 encoded, 0 reused; text states 4 encoded, 0 reused"
    );
    assert_eq!((entries("latents"), entries("text")), (4, 4));
    // One image changes: only it is encoded again.
    let img = image::RgbImage::from_pixel(16, 16, image::Rgb([0, 255, 0]));
    img.save(data.join("2.png")).unwrap();
    assert_eq!(
        train_at(32),
        "cache: latents 1 encoded, 3 reused; text states 0 encoded, 4 reused"
    );
    assert_eq!(entries("latents"), 5);
    // Another resolution: every image again; captions unchanged.
    assert_eq!(
        train_at(64),
        "cache: latents 4 encoded, 0 reused; text states 0 encoded, 4 reused"
    );
    assert_eq!(entries("latents"), 9);
    let _ = std::fs::remove_dir_all(&root);
}

/// 5 steps in one run, and 2 steps + resume + 3 steps, give identical
/// final UNet weights (the EMA's, when it is on).
fn check_resume(name: &str, extra: &[&str]) {
    let whole = scratch(&format!("whole-{name}"));
    let s = run(&tiny(&whole, extra), None).unwrap();
    assert_eq!((s.steps, s.interrupted), (5, false));
    let (first, last) = (s.first_loss.unwrap(), s.last_loss.unwrap());
    assert!(first.is_finite() && last.is_finite());

    // Stop after step 2 (micro-batch 4 of an epoch of 6), then resume.
    let split = scratch(&format!("split-{name}"));
    let s = run(&tiny(&split, extra), Some(2)).unwrap();
    assert_eq!((s.steps, s.interrupted), (2, true));
    assert!(split.join("checkpoint-2/unet/config.json").is_file());
    let ema = extra.contains(&"train.use_ema=true");
    assert_eq!(
        split.join("checkpoint-2/unet_ema/config.json").is_file(),
        ema
    );
    let mut resumed = extra.to_vec();
    resumed.push("train.resume_from=latest");
    let s = run(&tiny(&split, &resumed), None).unwrap();
    assert_eq!((s.steps, s.steps_this_run), (5, 3));
    assert!(
        unet_bytes(&whole) == unet_bytes(&split),
        "{name}: 5 steps and 2 + resume + 3 steps must give identical UNet weights"
    );

    // The log has one line per step, with the fields the issue names.
    let log = std::fs::read_to_string(split.join("train_log.jsonl")).unwrap();
    let steps: Vec<u64> = log
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            for k in [
                "step",
                "epoch",
                "loss",
                "lr",
                "grad_norm",
                "images_per_s",
                "elapsed_s",
            ] {
                assert!(v.get(k).is_some(), "{k} missing from {l}");
            }
            v["step"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(steps, [1, 2, 3, 4, 5]);
    let _ = std::fs::remove_dir_all(&whole);
    let _ = std::fs::remove_dir_all(&split);
}

#[test]
fn the_builtin_loss_falls() {
    let out = scratch("falls");
    let config = tiny(
        &out,
        &[
            "train.gradient_accumulation_steps=1",
            "train.train_batch_size=4",
            "data.builtin_size=64",
            "train.max_train_steps=40",
            "train.lr_warmup_steps=5",
        ],
    );
    let mut losses = Vec::new();
    let stop = AtomicBool::new(false);
    train(gpu(), &config, &stop, &mut |e| {
        if let Event::Step(s) = e {
            losses.push(s.loss);
        }
    })
    .unwrap();
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
    let (first, last) = (mean(&losses[..5]), mean(&losses[35..]));
    println!("mean loss of steps 1-5: {first:.3}, of steps 36-40: {last:.3}");
    assert!(last < 0.6 * first, "{first} -> {last}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn latest_without_a_checkpoint_starts_fresh_and_the_pipeline_is_complete() {
    let out = scratch("fresh");
    let mut notes = Vec::new();
    let stop = AtomicBool::new(false);
    let config = tiny(
        &out,
        &["train.resume_from=latest", "train.max_train_steps=1"],
    );
    train(gpu(), &config, &stop, &mut |e| {
        if let Event::Note(n) = e {
            notes.push(n);
        }
    })
    .unwrap();
    assert!(
        notes.iter().any(|n| n.contains("no checkpoint")),
        "{notes:?}"
    );
    for part in [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
        "scheduler/scheduler_config.json",
    ] {
        assert!(out.join(part).is_file(), "{part} missing");
    }
    let _ = std::fs::remove_dir_all(&out);
}

/// A process killed (SIGKILL) while writing a checkpoint leaves the
/// previous one loadable, and `latest` resumes from it.
#[cfg(unix)]
#[test]
fn a_crash_while_checkpointing_keeps_the_previous_checkpoint() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let out = scratch("crash");
    let mut child = Command::new(env!("CARGO_BIN_EXE_difftrain"))
        .args([
            "train",
            "--output-dir",
            out.to_str().unwrap(),
            "--set",
            "train.train_batch_size=2",
            "--set",
            "data.builtin_size=12",
            "--set",
            "train.max_train_steps=4",
            "--set",
            "train.checkpointing_steps=2",
            "--set",
            "train.seed=3",
        ])
        .env("DIFFTRAIN_TEST_PAUSE_CHECKPOINT", "4")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = Vec::new();
    for line in stderr.lines() {
        let line = line.unwrap();
        let paused = line.contains("paused while writing checkpoint-4");
        seen.push(line);
        if paused {
            break;
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        seen.iter().any(|l| l.contains("paused")),
        "never reached checkpoint 4:\n{}",
        seen.join("\n")
    );
    assert!(
        out.join(".checkpoint-4.tmp").is_dir(),
        "the interrupted write is left over"
    );
    assert_eq!(checkpoint::latest(&out), Some(out.join("checkpoint-2")));

    let config = tiny(
        &out,
        &[
            "train.gradient_accumulation_steps=1",
            "train.max_train_steps=4",
            "train.checkpointing_steps=2",
            "train.seed=3",
            "train.lr_warmup_steps=20",
            "train.resume_from=latest",
        ],
    );
    let s = run(&config, None).unwrap();
    assert_eq!((s.steps, s.steps_this_run), (4, 2));
    assert!(out.join("checkpoint-4/trainer_state.json").is_file());
    let _ = std::fs::remove_dir_all(&out);
}

/// Damaged or mismatched checkpoints and bad data are errors that name the
/// file, tensor or key; never a panic.
#[test]
fn bad_checkpoints_and_data_give_named_errors() {
    let out = scratch("damaged");
    run(
        &tiny(
            &out,
            &["train.max_train_steps=1", "train.checkpointing_steps=1"],
        ),
        None,
    )
    .unwrap();
    let good = out.join("checkpoint-1");

    let damage = |name: &str, f: &dyn Fn(&Path)| -> String {
        let dir = out.join(name);
        copy_dir(&good, &dir);
        f(&dir);
        let resume = format!("train.resume_from={:?}", dir.display().to_string());
        let config = tiny(&out.join("resumed"), &[&resume, "train.max_train_steps=2"]);
        run(&config, None).unwrap_err().to_string()
    };
    let cases: [(&str, Damage, &str); 4] = [
        (
            "missing",
            (|d: &Path| std::fs::remove_file(d.join("optimizer.safetensors")).unwrap()),
            "optimizer.safetensors",
        ),
        (
            "truncated",
            (|d: &Path| {
                let p = d.join("unet/diffusion_pytorch_model.safetensors");
                let bytes = std::fs::read(&p).unwrap();
                std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
            }),
            "diffusion_pytorch_model.safetensors: truncated: tensor '",
        ),
        (
            "other-config",
            (|d: &Path| {
                let p = d.join("unet/config.json");
                let t = std::fs::read_to_string(&p).unwrap();
                std::fs::write(
                    &p,
                    t.replace("\"norm_num_groups\": 8", "\"norm_num_groups\": 4"),
                )
                .unwrap();
            }),
            "norm_num_groups",
        ),
        (
            "no-state",
            (|d: &Path| std::fs::remove_file(d.join("trainer_state.json")).unwrap()),
            "trainer_state.json",
        ),
    ];
    for (name, f, needle) in &cases {
        let e = damage(name, f);
        println!("{name}: {e}");
        assert!(e.contains(needle), "{name}: '{needle}' not in: {e}");
    }

    // A tensor of another shape in the optimizer state.
    let e = damage("other-shape", &|d: &Path| {
        let p = d.join("optimizer.safetensors");
        let mut t = difftrain::io::TensorFile::read(&p).unwrap();
        let name = t.tensors.keys().next().unwrap().clone();
        t.insert(&name, difftrain::io::HostTensor::f32(&[3], vec![0.0; 3]));
        t.write(&p, None).unwrap();
    });
    assert!(e.contains("adamw.") && e.contains("expected"), "{e}");

    // Data: an empty folder, and a metadata.jsonl without the caption column.
    let empty = scratch("empty-data");
    let set = format!("data.train_data_dir={:?}", empty.display().to_string());
    let e = run(&tiny(&out.join("e"), &[&set]), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains(&empty.display().to_string()), "{e}");
    std::fs::write(
        empty.join("metadata.jsonl"),
        "{\"file_name\": \"a.png\", \"caption\": \"x\"}\n",
    )
    .unwrap();
    image_file(&empty.join("a.png"));
    let e = run(&tiny(&out.join("e"), &[&set]), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("text") && e.contains("metadata.jsonl"), "{e}");
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&empty);
}

/// How a test damages a copy of a checkpoint folder.
type Damage = fn(&Path);

fn image_file(p: &Path) {
    let img = image::RgbImage::from_pixel(8, 8, image::Rgb([200, 30, 30]));
    img.save(p).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let dst = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

/// `difftrain train-vae`'s fit: the reconstruction error falls, and the
/// written folder loads with its measured scaling factor.
#[test]
fn vae_fit_reconstructs_better_and_writes_a_vae_folder() {
    use difftrain::train::data::DataOptions;
    use difftrain::train::vae_fit::{fit_vae, VaeFit};
    let out = scratch("vae-fit");
    let fit = VaeFit {
        config: Path::new(env!("CARGO_MANIFEST_DIR")).join("src/train/builtin/vae.json"),
        init: None,
        data: DataOptions {
            resolution: 16,
            builtin_size: 32,
            ..Default::default()
        },
        steps: 30,
        batch: 4,
        learning_rate: 2e-3,
        kl_weight: 1e-4,
        seed: 3,
    };
    let mut rec = Vec::new();
    let (_, scale) = fit_vae(gpu(), &fit, &out, true, &mut |s| rec.push(s.reconstruction)).unwrap();
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
    println!(
        "reconstruction {:.4} -> {:.4}, scaling_factor {scale}",
        mean(&rec[..5]),
        mean(&rec[25..])
    );
    assert!(mean(&rec[25..]) < 0.7 * mean(&rec[..5]));
    let vae = difftrain::models::Vae::from_config_file(&out.join("config.json")).unwrap();
    assert_eq!(vae.config.scaling_factor, scale);
    assert!(scale.is_finite() && scale > 0.0);
    assert!(out
        .join("diffusion_pytorch_model.fp16.safetensors")
        .is_file());
    let _ = std::fs::remove_dir_all(&out);
}
