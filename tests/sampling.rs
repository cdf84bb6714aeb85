//! Sampling against diffusers' StableDiffusionPipeline (0.42): fixtures in
//! tests/fixtures/sampling written by tests/fixtures/generate_sampling.py on
//! the tiny pipeline of tests/fixtures/current_versions, float32, from given
//! latents, two prompts, guidance 7.5. Bars (relative L2): one step 1e-4,
//! ten steps 1e-3 (the untrained UNet with guidance 7.5 grows the latents
//! six-fold, so step errors compound; diffusers' own float32 run lands
//! 2-3e-6 from float64).

use difftrain::io::TensorFile;
use difftrain::models::PipelineDir;
use difftrain::ops::testing::gpu;
use difftrain::sample::schedule::{SamplerKind, Spacing};
use difftrain::sample::{pipeline_sampler, sample, SampleRequest};
mod common;

use common::{fixture, rel_l2};

#[test]
fn ddim_and_ddpm_match_diffusers() {
    let p = PipelineDir::open(&fixture("current_versions")).unwrap();
    let want = TensorFile::read(&fixture("sampling/expected.safetensors")).unwrap();
    let w = |k: &str| want.get(k).unwrap_or_else(|e| panic!("{e}"));
    let request = |steps| SampleRequest {
        prompts: vec![
            "a red circle on the left".into(),
            "a small blue square".into(),
        ],
        negative_prompt: String::new(),
        steps,
        guidance_scale: 7.5,
        eta: 0.0,
        seed: 0,
        num_images: 1,
        height: 16,
        width: 16,
        latents: Some(w("latents").values.clone()),
    };
    // (scenario, sampler, steps, spacing, steps_offset, tolerance)
    let cases = [
        ("ddim_1", SamplerKind::Ddim, 1, None, None, 1e-4),
        ("ddpm_1", SamplerKind::Ddpm, 1, None, None, 1e-4),
        ("ddpm_1_t0", SamplerKind::Ddpm, 1, None, Some(0), 1e-4),
        ("ddim_10", SamplerKind::Ddim, 10, None, None, 1e-3),
        (
            "ddim_10_eps_trailing",
            SamplerKind::Ddim,
            10,
            Some(Spacing::Trailing),
            None,
            1e-3,
        ),
    ];
    for (name, kind, steps, spacing, offset, tol) in cases {
        let mut sampler = pipeline_sampler(&p, kind).unwrap();
        if let Some(s) = spacing {
            sampler.spacing = s;
        }
        if let Some(o) = offset {
            sampler.steps_offset = o;
        }
        let ts = sampler.timesteps(steps).unwrap();
        let want_ts: Vec<i64> = w(&format!("{name}.timesteps"))
            .values
            .iter()
            .map(|&v| v as i64)
            .collect();
        assert_eq!(ts, want_ts, "{name} timesteps");
        let out = pollster::block_on(sample(gpu(), &p, &sampler, &request(steps), None)).unwrap();
        let err = rel_l2(&out.latents.values, &w(&format!("{name}.final")).values);
        println!("{name}: final latents relative L2 {err:.2e}");
        assert!(err < tol, "{name}: {err:.2e} > {tol:.0e}");
        if name == "ddim_10" {
            let err = rel_l2(&out.images.values, &w("ddim_10.images").values);
            println!("{name}: images relative L2 {err:.2e}");
            assert!(err < tol, "{name} images: {err:.2e}");
        }
    }
}
