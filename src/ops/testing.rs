//! Test support: one shared device, and a checker that runs an op on the GPU
//! and compares its forward with a CPU reference (f64) and its backward with
//! central finite differences of that reference.

use crate::dtype::DType;
use crate::error::Result;
use crate::gpu::{AdapterChoice, Gpu};
use crate::graph::{Graph, RunSpec, Session, TensorId};
use rand::{Rng, SeedableRng};
use std::sync::{Arc, OnceLock};

/// The device every test shares: the best adapter, or the one named by
/// DIFFTRAIN_BACKEND / DIFFTRAIN_ADAPTER. No adapter is a failure, not a skip.
pub fn gpu() -> &'static Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| {
        Gpu::new_blocking(&AdapterChoice::from_env())
            .unwrap_or_else(|e| panic!("no GPU for tests: {e}"))
    })
}

/// The shared device as a GPU without subgroups would see it (portable
/// kernels, GPU tile sizes), so tests cover those paths on any adapter.
pub fn portable_gpu() -> &'static Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| {
        let mut g = gpu().clone();
        g.caps.subgroups = false;
        g.caps.is_cpu = false;
        g
    })
}

/// The shared device with its storage-binding limit lowered to `bytes` and
/// binding offsets aligned to 256 bytes (WebGPU's default), so that tests
/// split small tensors into windows the way real models split big ones.
pub fn gpu_with_binding_limit(bytes: u64) -> Gpu {
    let mut g = gpu().clone();
    g.caps.max_binding_bytes = bytes;
    g.caps.storage_offset_alignment = g.caps.storage_offset_alignment.max(256);
    g
}

/// Uniform values in [-1, 1) from a fixed seed.
pub fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// One input of an op under test.
#[derive(Clone, Debug)]
pub struct CaseInput {
    pub shape: Vec<usize>,
    /// Check the gradient of this input.
    pub grad: bool,
    /// A parameter (always f32) rather than an activation of the tested dtype.
    pub param: bool,
    /// Values; random in [-1, 1) when `None`.
    pub values: Option<Vec<f32>>,
}

impl CaseInput {
    pub fn act(shape: &[usize]) -> Self {
        CaseInput {
            shape: shape.to_vec(),
            grad: true,
            param: false,
            values: None,
        }
    }
    pub fn param(shape: &[usize]) -> Self {
        CaseInput {
            shape: shape.to_vec(),
            grad: true,
            param: true,
            values: None,
        }
    }
    pub fn no_grad(mut self) -> Self {
        self.grad = false;
        self
    }
    pub fn values(mut self, v: Vec<f32>) -> Self {
        self.values = Some(v);
        self
    }
}

/// Relative L2 error ||a - b|| / ||b||.
pub fn rel_l2(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let num: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Forward and gradient tolerances (relative L2) for a storage dtype: f32
/// kernels accumulate in f32 (1e-5 forward, 1e-4 for gradients, which sum
/// more terms); f16 keeps 11 significant bits (~5e-4 per rounding, a few
/// roundings deep); bf16 keeps 8 (~4e-3 per rounding).
pub fn tolerance(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F32 => (1e-5, 1e-4),
        DType::F16 => (4e-3, 8e-3),
        DType::BF16 => (3e-2, 6e-2),
    }
}

pub type Build<'a> = &'a dyn Fn(&mut Graph, &[TensorId]) -> Result<TensorId>;
pub type Reference<'a> = &'a dyn Fn(&[Vec<f64>]) -> Vec<f64>;

/// What [`check_op`] measured.
#[derive(Debug)]
pub struct CheckReport {
    pub forward_err: f64,
    pub grad_errs: Vec<f64>,
}

/// Run `build` on the GPU with inputs of `dtype`, compare the output with
/// `reference`, and each input gradient of sum(output * r) (r random) with
/// central differences of the reference. Panics with the case name, the
/// error and the tolerance on failure.
pub fn check_op(
    name: &str,
    inputs: &[CaseInput],
    build: Build,
    reference: Reference,
    dtype: DType,
    force_packed_f16: bool,
) -> CheckReport {
    check_op_on(
        gpu(),
        name,
        inputs,
        build,
        reference,
        dtype,
        force_packed_f16,
    )
}

/// [`check_op`] on [`portable_gpu`]: the kernels a GPU without subgroups runs.
pub fn check_op_portable(
    name: &str,
    inputs: &[CaseInput],
    build: Build,
    reference: Reference,
    dtype: DType,
) -> CheckReport {
    let label = format!("{name} (portable)");
    check_op_on(
        portable_gpu(),
        &label,
        inputs,
        build,
        reference,
        dtype,
        false,
    )
}

fn check_op_on(
    device: &Gpu,
    name: &str,
    inputs: &[CaseInput],
    build: Build,
    reference: Reference,
    dtype: DType,
    force_packed_f16: bool,
) -> CheckReport {
    let (fwd_tol, grad_tol) = tolerance(dtype);
    let label = format!(
        "{name} [{dtype}{}]",
        if force_packed_f16 { ", packed" } else { "" }
    );
    let mut g = Graph::new();
    let mut ids = Vec::new();
    let mut values: Vec<Vec<f32>> = Vec::new();
    for (k, inp) in inputs.iter().enumerate() {
        let n: usize = inp.shape.iter().product();
        let dt = if inp.param { DType::F32 } else { dtype };
        let v: Vec<f32> = inp
            .values
            .clone()
            .unwrap_or_else(|| random(n, 1000 + k as u64))
            .iter()
            .map(|&x| dt.round(x))
            .collect();
        let id = match (inp.param, inp.grad) {
            (true, true) => g.param(&format!("in{k}"), &inp.shape),
            (true, false) => g.frozen_param(&format!("in{k}"), &inp.shape),
            (false, true) => g.input_with_grad(&format!("in{k}"), &inp.shape, dt),
            (false, false) => g.input(&format!("in{k}"), &inp.shape, dt),
        };
        ids.push(id);
        values.push(v);
    }
    let out = build(&mut g, &ids).unwrap_or_else(|e| panic!("{label}: build failed: {e}"));
    let out_shape = g.shape(out).to_vec();
    let out_n: usize = out_shape.iter().product();
    let seed = g.input("seed", &out_shape, g.dtype(out));
    let r: Vec<f32> = random(out_n, 7)
        .iter()
        .map(|&x| g.dtype(out).round(x))
        .collect();
    let grad_ids: Vec<TensorId> = ids
        .iter()
        .zip(inputs)
        .filter(|(_, i)| i.grad)
        .map(|(&t, _)| t)
        .collect();
    let spec = RunSpec {
        outputs: vec![out],
        seeds: if grad_ids.is_empty() {
            vec![]
        } else {
            vec![(out, seed)]
        },
        grads: grad_ids.clone(),
        force_packed_f16,
        ..Default::default()
    };
    let mut s = Session::new(device, Arc::new(g), spec).unwrap_or_else(|e| panic!("{label}: {e}"));
    for (id, v) in ids.iter().zip(&values) {
        s.write(*id, v).unwrap();
    }
    if !grad_ids.is_empty() {
        s.write(seed, &r).unwrap();
    }
    s.step().unwrap();
    let got = s.read_blocking(out).unwrap();

    let x64: Vec<Vec<f64>> = values
        .iter()
        .map(|v| v.iter().map(|&x| x as f64).collect())
        .collect();
    let want = reference(&x64);
    assert_eq!(
        want.len(),
        out_n,
        "{label}: reference returned {} values for {:?}",
        want.len(),
        out_shape
    );
    let forward_err = rel_l2(&got, &want);
    assert!(
        forward_err <= fwd_tol,
        "{label}: forward rel L2 error {forward_err:.3e} > {fwd_tol:.0e}; got {:?}.. want {:?}..",
        &got[..got.len().min(6)],
        &want[..want.len().min(6)]
    );

    let objective = |x: &[Vec<f64>]| -> f64 {
        reference(x)
            .iter()
            .zip(&r)
            .map(|(y, &w)| y * w as f64)
            .sum()
    };
    let mut grad_errs = Vec::new();
    for (k, inp) in inputs.iter().enumerate().filter(|(_, i)| i.grad) {
        let gpu_grad = s.read_grad_blocking(ids[k]).unwrap();
        let n = gpu_grad.len();
        // All elements of small tensors, an even spread of 48 of larger ones.
        let picks: Vec<usize> = if n <= 96 {
            (0..n).collect()
        } else {
            (0..48).map(|j| (j * n / 48 + j % 7).min(n - 1)).collect()
        };
        let mut fd = Vec::with_capacity(picks.len());
        let mut gg = Vec::with_capacity(picks.len());
        for &i in &picks {
            let h = 1e-4;
            let mut xp = x64.clone();
            xp[k][i] += h;
            let mut xm = x64.clone();
            xm[k][i] -= h;
            fd.push((objective(&xp) - objective(&xm)) / (2.0 * h));
            gg.push(gpu_grad[i]);
        }
        let err = rel_l2(&gg, &fd);
        assert!(
            err <= grad_tol,
            "{label}: gradient of input {k} {:?}: rel L2 error {err:.3e} > {grad_tol:.0e}; got {:?}.. want {:?}..",
            inp.shape,
            &gg[..gg.len().min(6)],
            &fd[..fd.len().min(6)]
        );
        grad_errs.push(err);
    }
    CheckReport {
        forward_err,
        grad_errs,
    }
}

/// [`check_op`] in f32, f16 (native where the adapter has it, and packed) and bf16.
pub fn check_op_all_dtypes(name: &str, inputs: &[CaseInput], build: Build, reference: Reference) {
    check_op(name, inputs, build, reference, DType::F32, false);
    check_op(name, inputs, build, reference, DType::F16, false);
    check_op(name, inputs, build, reference, DType::F16, true);
    check_op(name, inputs, build, reference, DType::BF16, false);
}
