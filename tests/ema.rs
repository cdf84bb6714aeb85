//! The EMA of the weights against diffusers' `EMAModel`: fixtures in
//! tests/fixtures/ema written by tests/fixtures/generate_ema.py (float64).
//! Decays exact to 1e-12; shadows within 1e-6 absolute per element (the
//! parameters are N(0, 1); float32 storage alone rounds at ~1e-7, and a
//! relative bar would be meaningless for an element near zero).

use difftrain::graph::{AdamW, Graph, RunSpec, Session};
use difftrain::io::TensorFile;
use difftrain::ops::optim::{ema_label, EMA_ONE_MINUS_DECAY};
use difftrain::ops::testing::gpu;
use difftrain::train::ema::EmaSchedule;
use difftrain::train::run::reset_ema;
use difftrain::DType;
use std::sync::Arc;
mod common;

use common::fixture;

#[test]
fn ema_matches_diffusers_emamodel() {
    let dir = fixture("ema");
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let params = TensorFile::read(&dir.join("params.safetensors")).unwrap();
    let names = ["a", "b", "c"];
    for (case, c) in cases["cases"].as_object().unwrap() {
        let schedule = EmaSchedule {
            decay: c["decay"].as_f64().unwrap(),
            min_decay: c["min_decay"].as_f64().unwrap(),
            update_after_step: c["update_after_step"].as_u64().unwrap(),
            use_warmup: c["use_ema_warmup"].as_bool().unwrap(),
            inv_gamma: c["inv_gamma"].as_f64().unwrap(),
            power: c["power"].as_f64().unwrap(),
        };
        let want = TensorFile::read(&dir.join(format!("{case}.safetensors"))).unwrap();

        // Three parameters, each trained towards an input; AdamW with lr 0
        // leaves them as written, so the EMA sees the fixture's sequence.
        let mut g = Graph::new();
        let mut seeds = Vec::new();
        let mut ids = Vec::new();
        for n in names {
            let shape = params.get(&format!("init.{n}")).unwrap().shape.clone();
            let p = g.param(n, &shape);
            let target = g.input(&format!("target.{n}"), &shape, DType::F32);
            let loss = g.mse_loss(p, target).unwrap();
            let seed = g.input(&format!("seed.{n}"), &[1], DType::F32);
            seeds.push((loss, seed));
            ids.push((p, seed));
        }
        let spec = RunSpec {
            seeds,
            optimizer: Some(AdamW {
                lr: 0.0,
                weight_decay: 0.0,
                ..Default::default()
            }),
            ema: true,
            ..Default::default()
        };
        let mut s = Session::new(gpu(), Arc::new(g), spec).unwrap();
        s.set_lr(0.0);
        for (n, (p, seed)) in names.iter().zip(&ids) {
            s.write(*p, &params.get(&format!("init.{n}")).unwrap().values)
                .unwrap();
            s.write(*seed, &[1.0]).unwrap();
        }
        pollster::block_on(reset_ema(&s)).unwrap();
        let decays = c["decay_per_step"].as_array().unwrap();
        for k in 1..=decays.len() {
            let d = schedule.decay_at(k as u64);
            assert!(
                (d - decays[k - 1].as_f64().unwrap()).abs() < 1e-12,
                "{case} step {k}: {d}"
            );
            s.write_state(EMA_ONE_MINUS_DECAY, &[(1.0 - d) as f32])
                .unwrap();
            for (n, (p, _)) in names.iter().zip(&ids) {
                s.write(*p, &params.get(&format!("step{k}.{n}")).unwrap().values)
                    .unwrap();
            }
            s.step().unwrap();
            for n in names {
                let got = s.read_state_blocking(&ema_label(n)).unwrap();
                let w = &want.get(&format!("step{k}.{n}")).unwrap().values;
                let err = got
                    .iter()
                    .zip(w)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                assert!(err < 1e-6, "{case} step {k} {n}: {err:.2e}");
            }
        }
    }
}
