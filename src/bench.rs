//! `difftrain bench ops`: per-op microbenchmarks through the real runner
//! (Graph -> Session::step), reporting the median step time, GFLOP/s or
//! GB/s, dispatches and submissions per step, and planned buffer memory.

use crate::dtype::DType;
use crate::error::Result;
use crate::gpu::Gpu;
use crate::graph::{Graph, RunSpec, Session, TensorId};
use crate::ops::testing::random;
use std::sync::Arc;
use std::time::Instant;

/// How a case's throughput is reported.
#[derive(Clone, Copy, Debug)]
pub enum Work {
    Flops(u64),
    Bytes(u64),
}

/// Builds a case's graph for a storage dtype; returns the output.
pub type BuildGraph = Box<dyn Fn(&mut Graph, DType) -> Result<TensorId>>;

/// One benchmark: a graph, and whether the step includes the backward pass.
pub struct BenchCase {
    pub name: String,
    pub shape: String,
    pub dtype: DType,
    pub backward: bool,
    pub build: BuildGraph,
    pub work: Work,
}

/// What one case measured.
#[derive(Clone, Debug)]
pub struct BenchResult {
    pub name: String,
    pub shape: String,
    pub dtype: DType,
    pub backward: bool,
    pub median_ms: f64,
    pub min_ms: f64,
    /// GFLOP/s or GB/s, by `work`.
    pub rate: f64,
    pub rate_unit: &'static str,
    pub dispatches: usize,
    pub submissions: usize,
    pub pooled_bytes: u64,
    pub persistent_bytes: u64,
}

/// The session of `case` with random inputs and parameters written.
fn session_for(gpu: &Gpu, case: &BenchCase) -> Result<Session> {
    let mut g = Graph::new();
    let out = (case.build)(&mut g, case.dtype)?;
    let mut spec = RunSpec {
        outputs: vec![out],
        ..Default::default()
    };
    if case.backward {
        let shape = g.shape(out).to_vec();
        let s = g.input("seed", &shape, g.dtype(out));
        spec.seeds = vec![(out, s)];
    }
    let inputs: Vec<TensorId> = (0..g.tensors.len())
        .map(TensorId)
        .filter(|&t| !matches!(g.desc(t).role, crate::graph::Role::Activation))
        .collect();
    let graph = Arc::new(g);
    let s = Session::new(gpu, graph.clone(), spec)?;
    for (k, &t) in inputs.iter().enumerate() {
        s.write(t, &random(graph.numel(t), k as u64))?;
    }
    Ok(s)
}

/// The process's peak resident memory so far (Linux's `VmHWM`), None where
/// the platform does not say. On a CPU adapter it includes every GPU buffer.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Time `case`: build, plan, warm up (pipeline compilation happens at the
/// first dispatch on some drivers), then `iters` timed steps, each waited for.
pub fn run_case(gpu: &Gpu, case: &BenchCase, iters: usize) -> Result<BenchResult> {
    let mut s = session_for(gpu, case)?;
    let mut times = Vec::with_capacity(iters);
    for i in 0..iters + 2 {
        let t0 = Instant::now();
        s.step()?;
        gpu.wait()?;
        if i >= 2 {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let median_ms = times[times.len() / 2];
    let (rate, rate_unit) = match case.work {
        Work::Flops(f) => (f as f64 / (median_ms * 1e-3) / 1e9, "GFLOP/s"),
        Work::Bytes(b) => (b as f64 / (median_ms * 1e-3) / 1e9, "GB/s"),
    };
    let st = s.stats();
    Ok(BenchResult {
        name: case.name.clone(),
        shape: case.shape.clone(),
        dtype: case.dtype,
        backward: case.backward,
        median_ms,
        min_ms: times[0],
        rate,
        rate_unit,
        dispatches: st.dispatches,
        submissions: st.submissions,
        pooled_bytes: st.pooled_bytes,
        persistent_bytes: st.persistent_bytes,
    })
}

/// The `bench ops` cases of the foundation issue.
pub fn op_cases() -> Vec<BenchCase> {
    let mut cases = Vec::new();
    for dtype in DType::ALL {
        let (m, n, k) = (1024usize, 1024usize, 1024usize);
        cases.push(BenchCase {
            name: "matmul".into(),
            shape: format!("{m}x{k} @ {k}x{n}"),
            dtype,
            backward: false,
            build: Box::new(move |g, dt| {
                let a = g.input("a", &[m, k], dt);
                let b = g.input("b", &[k, n], dt);
                g.matmul(a, b, false, false)
            }),
            work: Work::Flops(2 * (m * n * k) as u64),
        });
    }
    // A UNet-sized linear layer with bias (the small UNet's GEGLU projection:
    // 1024 tokens, 64 -> 512): K is small, so the epilogue and the operand
    // loads weigh as much as the product. Forward and forward + backward.
    let (tokens, fan_in, fan_out) = (1024usize, 64usize, 512usize);
    let linear_flops = 2 * (tokens * fan_in * fan_out) as u64;
    for backward in [false, true] {
        cases.push(BenchCase {
            name: "linear".into(),
            shape: format!("{tokens}x{fan_in} -> {fan_out}"),
            dtype: DType::F32,
            backward,
            build: Box::new(move |g, dt| {
                let x = g.input_with_grad("x", &[tokens, fan_in], dt);
                let w = g.param("weight", &[fan_out, fan_in]);
                let b = g.param("bias", &[fan_out]);
                g.linear(x, w, Some(b))
            }),
            // The data and weight gradients each cost one forward.
            work: Work::Flops(if backward {
                3 * linear_flops
            } else {
                linear_flops
            }),
        });
    }
    // conv2d 3x3 64->64 on [4,64,32,32], no bias: forward in every storage
    // dtype, and forward + backward (data and weight gradients) in f32.
    let (n, c, h, w) = (4usize, 64usize, 32usize, 32usize);
    let conv_flops = 2 * (n * c * h * w * c * 9) as u64;
    for (dtype, backward) in [
        (DType::F32, false),
        (DType::F32, true),
        (DType::F16, false),
        (DType::BF16, false),
    ] {
        cases.push(BenchCase {
            name: "conv2d".into(),
            shape: format!("3x3 {c}->{c} [{n},{c},{h},{w}]"),
            dtype,
            backward,
            build: Box::new(move |g, dt| {
                let x = g.input_with_grad("x", &[n, c, h, w], dt);
                let wt = g.param("weight", &[c, c, 3, 3]);
                g.conv2d(x, wt, None, 1, 1)
            }),
            // The data and weight gradients each cost one forward.
            work: Work::Flops(if backward { 3 * conv_flops } else { conv_flops }),
        });
    }
    // Self-attention, batch 4, 4 heads, sequence 256, head dim 16.
    let (b, heads, seq, d) = (4usize, 4usize, 256usize, 16usize);
    let attn_flops = 4 * (b * heads * seq * seq * d) as u64;
    for backward in [false, true] {
        cases.push(BenchCase {
            name: "attention".into(),
            shape: format!("B{b} H{heads} S{seq} D{d}"),
            dtype: DType::F32,
            backward,
            build: Box::new(move |g, dt| {
                let q = g.input_with_grad("q", &[b, seq, heads * d], dt);
                let k = g.input_with_grad("k", &[b, seq, heads * d], dt);
                let v = g.input_with_grad("v", &[b, seq, heads * d], dt);
                g.attention(q, k, v, heads, false)
            }),
            // FlashAttention-2 counting: the backward recomputes the scores and
            // does four more products, 2.5x the forward.
            work: Work::Flops(if backward {
                attn_flops * 7 / 2
            } else {
                attn_flops
            }),
        });
    }
    // Group norm (32 groups) + SiLU, forward + backward: memory-bound, so GB/s
    // of the minimum traffic (forward reads x, writes y; backward reads x and
    // dy, writes dx).
    let numel = n * c * h * w;
    cases.push(BenchCase {
        name: "group_norm_silu".into(),
        shape: format!("[{n},{c},{h},{w}] g32"),
        dtype: DType::F32,
        backward: true,
        build: Box::new(move |g, dt| {
            let x = g.input_with_grad("x", &[n, c, h, w], dt);
            let gamma = g.param("gamma", &[c]);
            let beta = g.param("beta", &[c]);
            g.group_norm_silu(x, gamma, beta, 32, 1e-5)
        }),
        work: Work::Bytes(5 * numel as u64 * 4),
    });
    cases
}

/// A whole UNet step (`bench unet`): the model of `config` on `batch`
/// latents of `latent` x `latent` with 77 text tokens, activations in
/// `dtype`, forward only or forward and backward (counted as 3x the forward
/// FLOPs, as for the ops).
pub fn unet_case(
    config: &std::path::Path,
    batch: usize,
    latent: usize,
    dtype: DType,
    backward: bool,
) -> Result<BenchCase> {
    let unet = crate::models::UNet::from_config_file(config)?;
    let channels = unet.config.in_channels;
    let cross = unet.layout.down[0].cross_attention_dim;
    // `sd15_unet.json` -> "sd15_unet"; `.../unet/config.json` -> "unet".
    let named = |p: Option<&std::path::Path>| {
        p.and_then(|p| p.file_stem())
            .map(|s| s.to_string_lossy().into_owned())
    };
    let name = match named(Some(config)) {
        Some(stem) if stem != "config" => stem,
        _ => named(config.parent()).unwrap_or_else(|| "unet".into()),
    };
    let build = move |g: &mut Graph, dtype: DType| {
        let x = g.input("sample", &[batch, channels, latent, latent], dtype);
        let t = g.input("timestep", &[batch], DType::F32);
        let c = g.input("encoder_hidden_states", &[batch, 77, cross], dtype);
        unet.forward(g, x, t, c)
    };
    let mut g = Graph::new();
    build(&mut g, DType::F32)?;
    let flops = g.forward_flops() * if backward { 3 } else { 1 };
    Ok(BenchCase {
        name,
        shape: format!("B{batch} {channels}x{latent}x{latent} S77"),
        dtype,
        backward,
        build: Box::new(build),
        work: Work::Flops(flops),
    })
}

/// GPU time of one kind of kernel (`shader::entry`) in a profiled step.
#[derive(Clone, Debug)]
pub struct ProfileRow {
    pub kernel: String,
    pub dispatches: usize,
    /// Milliseconds per step, summed over its dispatches (median step).
    pub ms: f64,
}

/// Where the GPU time of a step of `case` goes, per kernel, largest first:
/// 2 warm-up steps, then `iters` profiled steps (each dispatch timed with GPU
/// timestamps in its own pass; the median per dispatch is kept).
pub fn profile_case(gpu: &Gpu, case: &BenchCase, iters: usize) -> Result<Vec<ProfileRow>> {
    let mut s = session_for(gpu, case)?;
    profile_session(&mut s, iters)
}

/// Where the GPU time of a step of session `s` goes, per kernel, largest
/// first: 2 warm-up steps, then `iters` profiled steps (each dispatch timed
/// with GPU timestamps in its own pass; the median per dispatch is kept).
pub fn profile_session(s: &mut Session, iters: usize) -> Result<Vec<ProfileRow>> {
    for _ in 0..2 {
        s.step()?;
    }
    s.gpu.wait()?;
    let runs: Vec<Vec<f64>> = (0..iters.max(1))
        .map(|_| s.profile_step())
        .collect::<Result<_>>()?;
    let mut rows: Vec<ProfileRow> = Vec::new();
    for (i, k) in s.plan.kernels.iter().enumerate() {
        let mut t: Vec<f64> = runs.iter().map(|r| r[i]).collect();
        t.sort_by(|a, b| a.total_cmp(b));
        let name = format!("{}::{}", k.shader, k.entry);
        match rows.iter_mut().find(|r| r.kernel == name) {
            Some(r) => {
                r.dispatches += 1;
                r.ms += t[t.len() / 2];
            }
            None => rows.push(ProfileRow {
                kernel: name,
                dispatches: 1,
                ms: t[t.len() / 2],
            }),
        }
    }
    rows.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    Ok(rows)
}

/// Render a profile as a table with each kernel's share of the step.
pub fn profile_table(rows: &[ProfileRow]) -> String {
    let total: f64 = rows.iter().map(|r| r.ms).sum();
    let mut s = format!(
        "{:<44} {:>6} {:>10} {:>6}\n",
        "kernel", "disp", "ms/step", "share"
    );
    for r in rows {
        s += &format!(
            "{:<44} {:>6} {:>10.3} {:>5.1}%\n",
            r.kernel,
            r.dispatches,
            r.ms,
            100.0 * r.ms / total.max(1e-12)
        );
    }
    s += &format!(
        "{:<44} {:>6} {:>10.3}\n",
        "total (GPU time)",
        rows.iter().map(|r| r.dispatches).sum::<usize>(),
        total
    );
    s
}

/// Render results as an aligned table.
pub fn table(results: &[BenchResult]) -> String {
    let mut s = format!(
        "{:<22} {:<28} {:<5} {:>10} {:>10} {:>12} {:>6} {:>5} {:>10} {:>10}\n",
        "op",
        "shape",
        "dtype",
        "median ms",
        "min ms",
        "rate",
        "disp",
        "subm",
        "pool MiB",
        "persist MiB"
    );
    for r in results {
        let name = format!("{}{}", r.name, if r.backward { " fwd+bwd" } else { " fwd" });
        s += &format!(
            "{:<22} {:<28} {:<5} {:>10.2} {:>10.2} {:>6.1} {:<5} {:>6} {:>5} {:>10.2} {:>10.2}\n",
            name,
            r.shape,
            r.dtype.name(),
            r.median_ms,
            r.min_ms,
            r.rate,
            r.rate_unit,
            r.dispatches,
            r.submissions,
            r.pooled_bytes as f64 / (1 << 20) as f64,
            r.persistent_bytes as f64 / (1 << 20) as f64
        );
    }
    s
}
