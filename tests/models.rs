//! Models against PyTorch: the fixtures in tests/fixtures were written by
//! tests/fixtures/generate.py (diffusers / transformers, float64 references).
//! Tolerances (relative L2 over each tensor): fp32 forward 1e-4 and
//! gradients 1e-3, the bar; the f32 PyTorch run of the same models
//! lands near 1e-6, so these leave room for a different summation order only.

use difftrain::io::TensorFile;
use difftrain::models::forward::{text_encoder_forward, unet_forward};
use difftrain::Gpu;
use std::path::{Path, PathBuf};

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Compare every tensor of `expected` with `got`: forward outputs within
/// `fwd_tol`, names starting with `grad.` within `grad_tol`.
fn compare(got: &TensorFile, expected: &TensorFile, fwd_tol: f64, grad_tol: f64) {
    let mut worst = (0.0f64, String::new());
    for (name, want) in &expected.tensors {
        let have = got.get(name).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(have.shape, want.shape, "{name}");
        let err = rel_l2(&have.values, &want.values);
        let tol = if name.starts_with("grad.") {
            grad_tol
        } else {
            fwd_tol
        };
        assert!(
            err <= tol,
            "{name}: relative L2 error {err:.3e} > {tol:.0e}"
        );
        if err > worst.0 {
            worst = (err, name.clone());
        }
    }
    println!(
        "{} tensors checked; worst {:.3e} ({})",
        expected.tensors.len(),
        worst.0,
        worst.1
    );
}

fn check_unet(name: &str) {
    let gpu = Gpu::new_blocking(&Default::default()).unwrap();
    let dir = fixture(name);
    let inputs = TensorFile::read(&dir.join("inputs.safetensors")).unwrap();
    let expected = TensorFile::read(&dir.join("expected.safetensors")).unwrap();
    let got = unet_forward(&gpu, &dir, &inputs, true).unwrap();
    assert_eq!(got.tensors.len(), expected.tensors.len());
    compare(&got, &expected, 1e-4, 1e-3);
}

#[test]
fn unet_linear_projection_matches_diffusers() {
    check_unet("unet_linear");
}

#[test]
fn unet_conv_projection_matches_diffusers() {
    check_unet("unet_conv");
}

fn check_clip(name: &str) {
    let gpu = Gpu::new_blocking(&Default::default()).unwrap();
    let dir = fixture(name);
    let expected = TensorFile::read(&dir.join("expected.safetensors")).unwrap();
    let ids = expected.get("input_ids").unwrap();
    for (skip, key) in [(0, "last_hidden_state"), (1, "clip_skip_1")] {
        let got = text_encoder_forward(&gpu, &dir, ids, skip).unwrap();
        let want = expected.get(key).unwrap();
        assert_eq!(got.shape, want.shape);
        let err = rel_l2(&got.values, &want.values);
        println!("{name} {key}: relative L2 error {err:.3e}");
        assert!(err <= 1e-4, "{name} {key}: {err:.3e}");
    }
}

#[test]
fn clip_quick_gelu_matches_transformers() {
    check_clip("clip_quick_gelu");
}

#[test]
fn clip_gelu_matches_transformers() {
    check_clip("clip_gelu");
}

#[test]
fn vae_matches_diffusers() {
    let gpu = Gpu::new_blocking(&Default::default()).unwrap();
    let dir = fixture("vae");
    let inputs = TensorFile::read(&dir.join("inputs.safetensors")).unwrap();
    let expected = TensorFile::read(&dir.join("expected.safetensors")).unwrap();
    let got = difftrain::models::forward::vae_forward(&gpu, &dir, &inputs).unwrap();
    assert_eq!(got.tensors.len(), 3);
    compare(&got, &expected, 1e-4, 0.0);
}
