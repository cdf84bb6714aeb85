//! End-to-end tests of the `difftrain` binary.

mod common;

use common::rel_l2;
use std::process::Command;

fn difftrain(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_difftrain"))
        .args(args)
        .output()
        .expect("running difftrain");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn info_reports_adapter_limits_and_features() {
    let (ok, out, err) = difftrain(&["info"]);
    assert!(ok, "difftrain info failed: {err}");
    for needle in [
        "selected:",
        "backend:",
        "max storage buffer binding",
        "shader-f16",
        "subgroups",
    ] {
        assert!(out.contains(needle), "'{needle}' missing from:\n{out}");
    }
}

#[test]
fn bench_ops_prints_a_table() {
    let (ok, out, err) = difftrain(&["bench", "ops", "--filter", "matmul", "--iters", "1"]);
    assert!(ok, "bench failed: {err}");
    assert!(
        out.contains("median ms") && out.contains("GFLOP/s"),
        "{out}"
    );
    assert_eq!(
        out.lines().filter(|l| l.starts_with("matmul")).count(),
        3,
        "one row per dtype:\n{out}"
    );
}

#[test]
fn bench_unet_times_a_whole_model_step() {
    let config = fixture("unet_conv/config.json");
    let (ok, out, err) = difftrain(&[
        "bench", "unet", "--config", &config, "--latent", "8", "--iters", "1",
    ]);
    assert!(ok, "bench unet failed: {err}");
    let rows: Vec<&str> = out.lines().filter(|l| l.starts_with("unet_conv")).collect();
    assert_eq!(
        rows.len(),
        2,
        "a forward and a forward + backward row:\n{out}"
    );
    assert!(
        rows[0].contains("fwd") && rows[1].contains("fwd+bwd") && out.contains("GFLOP/s"),
        "{out}"
    );
}

#[test]
fn bad_input_gives_clear_errors() {
    let (ok, _, err) = difftrain(&["bench", "ops", "--filter", "no-such-op"]);
    assert!(!ok && err.contains("no benchmark matches"), "{err}");
    let (ok, _, err) = difftrain(&["--backend", "quantum", "info"]);
    assert!(!ok && err.contains("unknown backend 'quantum'"), "{err}");
    let (ok, _, err) = difftrain(&["--adapter", "no-such-gpu-xyz", "info"]);
    assert!(!ok && err.contains("no-such-gpu-xyz"), "{err}");
}

fn fixture(p: &str) -> String {
    common::fixture(p).to_string_lossy().into_owned()
}

/// A fresh temporary folder for one test.
fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("difftrain-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn forward_unet_backward_writes_the_contract_tensors() {
    use difftrain::io::TensorFile;
    let dir = temp_dir("unet");
    let out = dir.join("out.safetensors");
    let (ok, _, err) = difftrain(&[
        "forward",
        "unet",
        "--model",
        &fixture("unet_linear"),
        "--inputs",
        &fixture("unet_linear/inputs.safetensors"),
        "--out",
        out.to_str().unwrap(),
        "--backward",
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("setup") && err.contains("dispatches"), "{err}");
    let got = TensorFile::read(&out).unwrap();
    let want = TensorFile::read(&std::path::PathBuf::from(fixture(
        "unet_linear/expected.safetensors",
    )))
    .unwrap();
    assert_eq!(
        got.tensors.keys().collect::<Vec<_>>(),
        want.tensors.keys().collect::<Vec<_>>()
    );
    let err = rel_l2(
        &got.get("sample").unwrap().values,
        &want.get("sample").unwrap().values,
    );
    assert!(err < 1e-4, "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn forward_text_encoder_tokenizes_and_encodes_prompts() {
    use difftrain::io::TensorFile;
    let dir = temp_dir("clip");
    let out = dir.join("out.safetensors");
    let (ok, _, err) = difftrain(&[
        "forward",
        "text-encoder",
        "--model",
        &fixture("clip_quick_gelu"),
        "--tokenizer",
        &fixture("tokenizer"),
        "--prompts",
        &fixture("prompts.txt"),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let got = TensorFile::read(&out).unwrap();
    let want = TensorFile::read(&std::path::PathBuf::from(fixture(
        "clip_quick_gelu/expected.safetensors",
    )))
    .unwrap();
    let ids = got.get("input_ids").unwrap();
    assert_eq!(ids.file_dtype, difftrain::io::StoredDType::I64);
    assert_eq!(ids.values, want.get("input_ids").unwrap().values);
    let h = &got.get("last_hidden_state").unwrap().values;
    let err = rel_l2(h, &want.get("last_hidden_state").unwrap().values);
    assert!(err < 1e-4, "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn init_then_forward_vae_round_trips_shapes() {
    use difftrain::io::{HostTensor, TensorFile};
    let dir = temp_dir("vae");
    let model = dir.join("vae");
    let (ok, _, err) = difftrain(&[
        "init",
        "vae",
        "--config",
        &fixture("vae/config.json"),
        "--out",
        model.to_str().unwrap(),
        "--seed",
        "3",
    ]);
    assert!(ok, "{err}");
    let inputs = dir.join("in.safetensors");
    let mut f = TensorFile::new(&inputs);
    f.insert("image", HostTensor::f32(&[1, 3, 8, 6], vec![0.25; 144]));
    f.insert("latents", HostTensor::f32(&[1, 4, 3, 5], vec![-0.5; 60]));
    f.write(&inputs, None).unwrap();
    let out = dir.join("out.safetensors");
    let args = [
        "forward",
        "vae",
        "--model",
        model.to_str().unwrap(),
        "--inputs",
        inputs.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    let (ok, _, err) = difftrain(&args);
    assert!(ok, "{err}");
    let got = TensorFile::read(&out).unwrap();
    assert_eq!(got.get("mean").unwrap().shape, [1, 4, 4, 3]);
    assert_eq!(got.get("logvar").unwrap().shape, [1, 4, 4, 3]);
    assert_eq!(got.get("decoded").unwrap().shape, [1, 3, 6, 10]);
    for t in got.tensors.values() {
        assert!(t.values.iter().all(|v| v.is_finite()));
    }

    // A wrong-rank input names the tensor and both shapes.
    let mut f = TensorFile::new(&inputs);
    f.insert("image", HostTensor::f32(&[3, 8, 6], vec![0.0; 144]));
    f.write(&inputs, None).unwrap();
    let (ok, _, err) = difftrain(&args);
    assert!(
        !ok && err.contains("'image'") && err.contains("[?, 3, ?, ?]") && err.contains("[3, 8, 6]"),
        "{err}"
    );
    // A truncated file names the file.
    std::fs::write(&inputs, b"\x10\x00").unwrap();
    let (ok, _, err) = difftrain(&args);
    assert!(!ok && err.contains("in.safetensors"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_model_configs_name_the_field() {
    let dir = temp_dir("badcfg");
    let cfg = dir.join("config.json");
    let text = std::fs::read_to_string(fixture("unet_conv/config.json")).unwrap();
    std::fs::write(
        &cfg,
        text.replace("\"DownBlock2D\"", "\"SimpleDownBlock2D\""),
    )
    .unwrap();
    let out = dir.join("unet");
    let args = [
        "init",
        "unet",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    let (ok, _, err) = difftrain(&args);
    assert!(
        !ok && err.contains("down_block_types[2]") && err.contains("SimpleDownBlock2D"),
        "{err}"
    );
    std::fs::write(
        &cfg,
        text.replace("\"dropout\": 0.0", "\"dropout\": 0.0, \"frobnicate\": 1"),
    )
    .unwrap();
    let (ok, _, err) = difftrain(&args);
    assert!(!ok && err.contains("frobnicate"), "{err}");
    std::fs::write(
        &cfg,
        text.replace(
            "\"use_linear_projection\": false",
            "\"use_linear_projection\": 3",
        ),
    )
    .unwrap();
    let (ok, _, err) = difftrain(&args);
    assert!(!ok && err.contains("use_linear_projection"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn train_runs_the_builtin_default_and_prints_no_xdg_noise() {
    let out = temp_dir("train");
    let out_s = out.to_str().unwrap();
    let (ok, _, err) = difftrain(&[
        "train",
        "--output-dir",
        out_s,
        "--set",
        "train.max_train_steps=3",
        "--set",
        "train.train_batch_size=2",
        "--set",
        "data.builtin_size=8",
    ]);
    assert!(ok, "train failed: {err}");
    assert!(!err.contains("XDG_RUNTIME_DIR"), "{err}");
    for needle in ["trained 3 steps", "loss", "images skipped: 0", out_s] {
        assert!(err.contains(needle), "'{needle}' missing from:\n{err}");
    }
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 3);
    // The preset's validation grid at the last step, 4 prompts x 4 images of 32x32.
    let grid = image::open(out.join("samples/step-3.png")).unwrap();
    assert_eq!((grid.width(), grid.height()), (4 * 32, 4 * 32));
    assert!(out.join("samples/step-3.txt").is_file() && out.join("loss.png").is_file());
    assert!(out
        .join("unet/diffusion_pytorch_model.safetensors")
        .is_file());

    // A bad key is an error naming it, before any training.
    let (ok, _, err) = difftrain(&[
        "train",
        "--output-dir",
        out_s,
        "--set",
        "train.lerning_rate=1",
    ]);
    assert!(!ok && err.contains("lerning_rate"), "{err}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn step_writes_the_contracts_outputs() {
    let dir = fixture("train_step");
    let tmp = temp_dir("step");
    let out = tmp.join("out.safetensors");
    let (ok, _, err) = difftrain(&[
        "step",
        "--model",
        &format!("{dir}/unet"),
        "--inputs",
        &format!("{dir}/inputs.safetensors"),
        "--config",
        &format!("{dir}/v_dream_p1.toml"),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "step failed: {err}");
    let got = difftrain::io::TensorFile::read(&out).unwrap();
    let want = difftrain::io::TensorFile::read(std::path::Path::new(&format!(
        "{dir}/v_dream_p1.expected.safetensors"
    )))
    .unwrap();
    for (name, w) in &want.tensors {
        let g = got.get(name).unwrap();
        assert!(rel_l2(&g.values, &w.values) < 1e-3, "{name}");
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn sample_writes_a_png_grid_and_safetensors() {
    let dir = temp_dir("sample");
    let model = fixture("current_versions");
    let png = dir.join("grid.png");
    let (ok, _, err) = difftrain(&[
        "sample",
        "--model",
        &model,
        "--prompt",
        "a red circle",
        "--prompt",
        "a blue square",
        "--num-images",
        "3",
        "--steps",
        "4",
        "--out",
        png.to_str().unwrap(),
    ]);
    assert!(ok, "sample failed: {err}");
    let img = image::open(&png).unwrap();
    assert_eq!(
        (img.width(), img.height()),
        (3 * 16, 2 * 16),
        "3 columns, 2 rows of 16x16"
    );

    let st = dir.join("out.safetensors");
    let (ok, _, err) = difftrain(&[
        "sample",
        "--model",
        &model,
        "--prompt",
        "a red circle",
        "--scheduler",
        "ddpm",
        "--steps",
        "3",
        "--out",
        st.to_str().unwrap(),
    ]);
    assert!(ok, "sample failed: {err}");
    let t = difftrain::io::TensorFile::read(&st).unwrap();
    assert_eq!(t.get("latents").unwrap().shape, [1, 4, 8, 8]);
    let images = t.get("images").unwrap();
    assert_eq!(images.shape, [1, 3, 16, 16]);
    assert!(images.values.iter().all(|v| (0.0..=1.0).contains(v)));

    let (ok, _, err) = difftrain(&[
        "sample", "--model", &model, "--prompt", "x", "--out", "x.jpg",
    ]);
    assert!(!ok && err.contains(".png or .safetensors"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dream_report_writes_a_table_and_a_plot() {
    let out = temp_dir("dream-report");
    let out_s = out.to_str().unwrap();
    let (ok, _, err) = difftrain(&[
        "dream-report",
        "--steps",
        "2",
        "--every",
        "1",
        "--output-dir",
        out_s,
        "--set",
        "data.builtin_size=8",
        "--set",
        "train.train_batch_size=2",
        "--set",
        "train.heldout_examples=4",
    ]);
    assert!(ok, "dream-report failed: {err}");
    let md = std::fs::read_to_string(out.join("dream_report.md")).unwrap();
    let rows: Vec<&str> = md
        .lines()
        .filter(|l| l.starts_with("| epsilon") || l.starts_with("| v_prediction"))
        .collect();
    assert_eq!(rows.len(), 4, "{md}");
    assert!(
        rows[1].contains("| on |") && rows[0].contains("1.00x"),
        "{md}"
    );
    let plot = image::open(out.join("dream_report.png")).unwrap();
    assert_eq!((plot.width(), plot.height()), (1100, 450));
    // Each run logged its held-out loss at both steps.
    let log = std::fs::read_to_string(out.join("epsilon-dream/train_log.jsonl")).unwrap();
    assert_eq!(log.matches("heldout_loss").count(), 2, "{log}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn bench_train_reports_a_whole_step_as_json() {
    let (ok, out, err) = difftrain(&[
        "bench",
        "train",
        "--preset",
        "builtin",
        "--batch",
        "2",
        "--latent",
        "8",
        "--text-len",
        "8",
        "--iters",
        "1",
        "--dream",
        "--json",
    ]);
    assert!(ok, "bench train failed: {err}");
    let cases: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(cases.len(), 2, "plain and DREAM:\n{out}");
    for (c, dream) in cases.iter().zip([false, true]) {
        for k in [
            "median_ms",
            "first_ms",
            "images_per_s",
            "gflops",
            "dispatches",
            "peak_bytes",
            "adapter",
            "driver",
        ] {
            assert!(c.get(k).is_some(), "{k} missing from {c}");
        }
        assert_eq!(c["dream"], dream);
        assert_eq!(c["submissions"], 1, "one submission per step: {c}");
        assert!(c["median_ms"].as_f64().unwrap() > 0.0 && c["gflops"].as_f64().unwrap() > 0.0);
    }
    // DREAM's extra UNet pass: more dispatches and more FLOPs per step.
    assert!(cases[1]["dispatches"].as_u64() > cases[0]["dispatches"].as_u64());
    assert!(cases[1]["step_gflop"].as_f64() > cases[0]["step_gflop"].as_f64());
}
