//! The graph runner as a whole: memory planning, no-grad mode, limits,
//! determinism of a full training step.

use difftrain::gpu::Gpu;
use difftrain::graph::{AdamW, Graph, RunSpec, Session, Slot};
use difftrain::ops::testing::{gpu, gpu_with_binding_limit, random};
use difftrain::{DType, Error, TensorId};
use std::sync::Arc;

/// A small MLP with a residual fan-out: h = silu(x W1 + b1); y = h W2 + h.
fn mlp(g: &mut Graph, batch: usize, width: usize) -> (TensorId, TensorId, Vec<TensorId>) {
    let x = g.input("x", &[batch, width], DType::F32);
    let w1 = g.param("fc1.weight", &[width, width]);
    let b1 = g.param("fc1.bias", &[width]);
    let w2 = g.param("fc2.weight", &[width, width]);
    let h = g.linear(x, w1, Some(b1)).unwrap();
    let h = g.silu(h);
    let y = g.linear(h, w2, None).unwrap();
    let y = g.add(y, h).unwrap();
    (x, y, vec![w1, b1, w2])
}

#[test]
fn no_grad_forward_pools_less_memory_than_training() {
    let mut g = Graph::new();
    let (_, y, _) = mlp(&mut g, 16, 24);
    let seed = g.input("seed", &[16, 24], DType::F32);
    let g = Arc::new(g);
    let fwd = Session::new(
        gpu(),
        g.clone(),
        RunSpec {
            outputs: vec![y],
            ..Default::default()
        },
    )
    .unwrap();
    let train = Session::new(
        gpu(),
        g,
        RunSpec {
            outputs: vec![y],
            seeds: vec![(y, seed)],
            ..Default::default()
        },
    )
    .unwrap();
    let (f, t) = (fwd.stats(), train.stats());
    assert_eq!(f.submissions, 1);
    assert!(t.dispatches > f.dispatches, "{t:?} vs {f:?}");
    assert!(
        f.pooled_bytes < t.pooled_bytes,
        "forward {f:?} vs train {t:?}"
    );
}

#[test]
fn tensor_above_binding_limit_is_an_error_naming_op_and_shape() {
    let limit = gpu().caps.max_binding_bytes;
    let n = (limit / 4 + 1024) as usize;
    let mut g = Graph::new();
    let x = g.input("huge", &[1, n], DType::F32);
    let y = g.silu(x);
    let err = Session::new(
        gpu(),
        Arc::new(g),
        RunSpec {
            outputs: vec![y],
            ..Default::default()
        },
    )
    .err()
    .expect("a tensor above the binding limit must be refused");
    assert!(matches!(err, Error::BindingTooLarge { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("activation") && msg.contains(&n.to_string()),
        "{msg}"
    );
}

/// The binding limit the windowing tests force (2 KiB, offsets aligned to 256).
const SMALL_LIMIT: u64 = 2048;

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Launches of `entry` that bind `name` to the values or gradient of `t`.
fn launches(s: &Session, entry: &str, name: &str, t: TensorId) -> usize {
    s.plan
        .kernels
        .iter()
        .filter(|k| {
            k.entry == entry
                && k.bindings.iter().any(|b| {
                    b.name == name && (b.slot == Slot::Value(t) || b.slot == Slot::Grad(t))
                })
        })
        .count()
}

/// Ids with a hit in each 64-row window of a 203-row table, repeats, and two
/// that clamp (to rows 0 and 202).
const IDS: [f32; 18] = [
    0.0, 63.0, 64.0, 202.0, 130.0, 64.0, 5.0, 191.0, 192.0, -3.0, 999.0, 127.0, 128.0, 5.0, 70.0,
    150.0, 200.0, 1.0,
];

/// z = embedding(ids, table) + bias with table [203, 7], trained two AdamW
/// steps with gradient-norm clipping. Returns z, both gradients and both
/// parameters, and the launches of the table's forward and backward kernels
/// and of the norm and update kernels.
fn train_embedding(gpu: &Gpu) -> (Vec<Vec<f32>>, [usize; 4]) {
    let (rows, d) = (203, 7);
    let mut g = Graph::new();
    let ids = g.input("ids", &[2, 9], DType::F32);
    let table = g.param("table", &[rows, d]);
    let bias = g.param("bias", &[d]);
    let y = g.embedding(ids, table).unwrap();
    let z = g.add(y, bias).unwrap();
    let dz = g.input("dz", &[2, 9, d], DType::F32);
    let spec = RunSpec {
        outputs: vec![z],
        seeds: vec![(z, dz)],
        // The gradient norm is ~6, so clipping to 0.05 scales every gradient.
        optimizer: Some(AdamW {
            lr: 1e-2,
            max_grad_norm: Some(0.05),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut s = Session::new(gpu, Arc::new(g), spec).unwrap();
    s.write(ids, &IDS).unwrap();
    s.write(table, &random(rows * d, 3)).unwrap();
    s.write(bias, &random(d, 4)).unwrap();
    s.write(dz, &random(18 * d, 5)).unwrap();
    for _ in 0..2 {
        s.step().unwrap();
    }
    let counts = [
        launches(&s, "embedding_forward", "table", table),
        launches(&s, "embedding_backward", "dtable", table),
        // The optimizer runs over the parameter arena (table and bias).
        s.plan
            .kernels
            .iter()
            .filter(|k| k.entry.starts_with("sumsq"))
            .count(),
        s.plan.kernels.iter().filter(|k| k.entry == "adamw").count(),
    ];
    let values = vec![
        s.read_blocking(z).unwrap(),
        s.read_grad_blocking(table).unwrap(),
        s.read_grad_blocking(bias).unwrap(),
        s.read_blocking(table).unwrap(),
        s.read_blocking(bias).unwrap(),
    ];
    (values, counts)
}

#[test]
fn windowed_embedding_and_adamw_match_the_unsplit_run_bit_for_bit() {
    let (whole, n1) = train_embedding(gpu());
    // The optimizer windows the parameter arena in whole 1024-element
    // (4 KiB) blocks of its sum of squares, so this limit is one block.
    const ARENA_LIMIT: u64 = 4096;
    let (split, n2) = train_embedding(&gpu_with_binding_limit(ARENA_LIMIT));
    assert_eq!(n1, [1; 4], "one window each without a limit");
    // Table rows of 28 bytes: windows of 128 rows (3584 bytes, the most whole
    // rows at 256-byte-aligned starts), 128 + 75. AdamW and the norm go over
    // the parameter arena (table at 0, bias at 1472, padded to 2048 elements),
    // windowed in blocks of 1024 elements: 1024 + 1024.
    assert_eq!(n2, [2, 2, 2, 2], "windows under a {ARENA_LIMIT}-byte limit");
    let names = ["z", "grad table", "grad bias", "table", "bias"];
    for ((a, b), name) in whole.iter().zip(&split).zip(names) {
        assert_eq!(bits(a), bits(b), "{name} differs when windowed");
    }
}

/// Lookup and table gradient of a 16-bit table (an input with a gradient,
/// stored packed two per word) in `ids_dtype`.
fn embed_16bit(gpu: &Gpu, dtype: DType, ids_dtype: DType, d: usize) -> (Vec<Vec<f32>>, usize) {
    let rows = 300;
    let mut g = Graph::new();
    let ids = g.input("ids", &[2, 9], ids_dtype);
    let table = g.input_with_grad("table", &[rows, d], dtype);
    let y = g.embedding(ids, table).unwrap();
    let dy = g.input("dy", &[2, 9, d], ids_dtype);
    let spec = RunSpec {
        outputs: vec![y],
        seeds: vec![(y, dy)],
        grads: vec![table],
        force_packed_f16: true,
        ..Default::default()
    };
    let mut s = Session::new(gpu, Arc::new(g), spec).unwrap();
    let ids_values: Vec<f32> = IDS.iter().map(|&i| i * 1.4).collect();
    s.write(ids, &ids_values).unwrap();
    s.write(table, &random(rows * d, 6)).unwrap();
    s.write(dy, &random(18 * d, 7)).unwrap();
    s.step().unwrap();
    let values = vec![
        s.read_blocking(y).unwrap(),
        s.read_grad_blocking(table).unwrap(),
    ];
    (values, launches(&s, "embedding_forward", "table", table))
}

#[test]
fn windowed_16bit_embedding_table_matches_the_unsplit_run_bit_for_bit() {
    // Rows of 7 or 8 16-bit values: windows of 128 rows, 128 + 128 + 44.
    for (dtype, ids_dtype, d) in [(DType::F16, DType::F16, 7), (DType::BF16, DType::F32, 8)] {
        let (whole, n1) = embed_16bit(gpu(), dtype, ids_dtype, d);
        let (split, n2) = embed_16bit(&gpu_with_binding_limit(SMALL_LIMIT), dtype, ids_dtype, d);
        assert_eq!((n1, n2), (1, 3), "{dtype} windows");
        for ((a, b), name) in whole.iter().zip(&split).zip(["y", "grad table"]) {
            assert_eq!(bits(a), bits(b), "{dtype}: {name} differs when windowed");
        }
    }
}

#[test]
fn op_that_cannot_window_a_big_parameter_is_refused_clearly() {
    // The embedding windows the table; the tied output projection (a matmul)
    // binds it whole, which the limit refuses.
    let mut g = Graph::new();
    let ids = g.input("ids", &[2], DType::F32);
    let table = g.param("table", &[203, 7]);
    let y = g.embedding(ids, table).unwrap();
    let logits = g.linear(y, table, None).unwrap();
    let err = Session::new(
        &gpu_with_binding_limit(SMALL_LIMIT),
        Arc::new(g),
        RunSpec {
            outputs: vec![logits],
            ..Default::default()
        },
    )
    .err()
    .expect("a whole binding above the limit must be refused");
    assert!(matches!(err, Error::BindingTooLarge { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.starts_with("matmul") && msg.contains("'table' [203, 7]") && msg.contains("2048"),
        "{msg}"
    );
}

#[test]
fn tensor_above_the_buffer_limit_is_an_error_naming_it() {
    let mut small = gpu().clone();
    small.caps.max_buffer_bytes = 4096;
    let mut g = Graph::new();
    let w = g.param("w", &[40, 40]);
    let y = g.silu(w);
    let err = Session::new(
        &small,
        Arc::new(g),
        RunSpec {
            outputs: vec![y],
            ..Default::default()
        },
    )
    .err()
    .expect("a tensor above the buffer limit must be refused");
    assert!(matches!(err, Error::BufferTooLarge { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("'w' [40, 40]") && msg.contains("6400") && msg.contains("4096"),
        "{msg}"
    );
}

/// SD 1.5's CLIP token embedding, 49408 x 768 f32 (152 MB), is above a
/// 128 MiB binding limit (lavapipe's, and WebGPU's default): lookup, table
/// gradient and a clipped AdamW step at the device's real limits, with ids in
/// the first and the last window.
#[test]
fn clip_sized_token_embedding_trains_at_the_real_binding_limit() {
    let (rows, d) = (49408, 768);
    let mut g = Graph::new();
    let ids = g.input("ids", &[1, 4], DType::F32);
    let table = g.param("token_embedding.weight", &[rows, d]);
    let y = g.embedding(ids, table).unwrap();
    let dy = g.input("dy", &[1, 4, d], DType::F32);
    let opt = AdamW {
        lr: 1e-3,
        ..Default::default()
    };
    let spec = RunSpec {
        outputs: vec![y],
        seeds: vec![(y, dy)],
        optimizer: Some(opt.clone()),
        ..Default::default()
    };
    let mut s = Session::new(gpu(), Arc::new(g), spec).unwrap();
    if gpu().caps.max_binding_bytes < (rows * d * 4) as u64 {
        assert!(launches(&s, "embedding_forward", "table", table) > 1);
    }
    let w0: Vec<f32> = (0..rows * d)
        .map(|i| (i % 997) as f32 / 997.0 - 0.5)
        .collect();
    let id_rows = [49407, 0, 30000, 49407];
    let dy0 = random(4 * d, 8);
    s.write(table, &w0).unwrap();
    s.write(ids, &id_rows.map(|r| r as f32)).unwrap();
    s.write(dy, &dy0).unwrap();
    s.step().unwrap();

    let got_y = s.read_blocking(y).unwrap();
    let want_y: Vec<f32> = id_rows
        .iter()
        .flat_map(|&r| w0[r * d..(r + 1) * d].iter().copied())
        .collect();
    assert_eq!(bits(&got_y), bits(&want_y), "lookup");

    // Rows are summed over positions in order, from zero.
    let mut want_g = vec![0.0f32; rows * d];
    for (pos, &r) in id_rows.iter().enumerate() {
        for c in 0..d {
            want_g[r * d + c] += dy0[pos * d + c];
        }
    }
    let got_g = s.read_grad_blocking(table).unwrap();
    assert!(got_g == want_g, "table gradient");

    // torch AdamW after clip_grad_norm_ (first step), in f64.
    let norm = want_g
        .iter()
        .map(|&x| (x as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let clip = (opt.max_grad_norm.unwrap() as f64 / (norm + 1e-6)).min(1.0);
    let (lr, b1, b2) = (opt.lr as f64, opt.beta1 as f64, opt.beta2 as f64);
    let got_w = s.read_blocking(table).unwrap();
    let worst = (0..rows * d)
        .map(|i| {
            let gi = want_g[i] as f64 * clip;
            let (m, v) = ((1.0 - b1) * gi, (1.0 - b2) * gi * gi);
            let w = w0[i] as f64 * (1.0 - lr * opt.weight_decay as f64)
                - lr / (1.0 - b1) * m / (v.sqrt() / (1.0 - b2).sqrt() + opt.eps as f64);
            (got_w[i] as f64 - w).abs()
        })
        .fold(0.0, f64::max);
    assert!(worst < 1e-6, "AdamW step: max abs error {worst:.2e}");
}

#[test]
fn wrong_value_count_names_the_tensor() {
    let mut g = Graph::new();
    let (x, y, _) = mlp(&mut g, 4, 8);
    let s = Session::new(
        gpu(),
        Arc::new(g),
        RunSpec {
            outputs: vec![y],
            ..Default::default()
        },
    )
    .unwrap();
    let err = s.write(x, &[1.0; 5]).unwrap_err().to_string();
    assert!(
        err.contains("'x'") && err.contains("32") && err.contains('5'),
        "{err}"
    );
}

/// Train a few steps from a fixed start; return the loss and every parameter.
fn train_mlp_steps(steps: usize) -> (Vec<f32>, Vec<Vec<f32>>) {
    let mut g = Graph::new();
    let (x, y, params) = mlp(&mut g, 8, 12);
    let target = g.input("target", &[8, 12], DType::F32);
    let loss = g.mse_loss(y, target).unwrap();
    let seed = g.input("seed", &[1], DType::F32);
    let spec = RunSpec {
        outputs: vec![loss],
        seeds: vec![(loss, seed)],
        optimizer: Some(AdamW {
            lr: 1e-2,
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut s = Session::new(gpu(), Arc::new(g), spec).unwrap();
    for (i, &p) in params.iter().enumerate() {
        let n = s.graph.numel(p);
        s.write(
            p,
            &random(n, 10 + i as u64)
                .iter()
                .map(|v| v * 0.3)
                .collect::<Vec<_>>(),
        )
        .unwrap();
    }
    s.write(x, &random(96, 1)).unwrap();
    s.write(target, &random(96, 2)).unwrap();
    s.write(seed, &[1.0]).unwrap();
    let mut losses = Vec::new();
    for _ in 0..steps {
        s.step().unwrap();
        losses.push(s.read_blocking(loss).unwrap()[0]);
    }
    let weights = params
        .iter()
        .map(|&p| s.read_blocking(p).unwrap())
        .collect();
    (losses, weights)
}

#[test]
fn training_steps_are_bit_identical_run_to_run() {
    let (l1, w1) = train_mlp_steps(4);
    let (l2, w2) = train_mlp_steps(4);
    assert!(l1.last() < l1.first(), "loss must fall: {l1:?}");
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&l1), bits(&l2), "losses differ run to run");
    for (a, b) in w1.iter().zip(&w2) {
        assert_eq!(bits(a), bits(b), "parameters differ run to run");
    }
}

#[test]
fn profiled_step_times_every_dispatch() {
    // A two-layer MLP: the profile has one GPU time per dispatch, in
    // schedule order, and profiling is a step like any other.
    let session = |gpu: &Gpu| {
        let mut g = Graph::new();
        let x = g.input("x", &[4, 8], DType::F32);
        let w = g.param("w", &[16, 8]);
        let h = g.linear(x, w, None).unwrap();
        let y = g.silu(h);
        let spec = RunSpec {
            outputs: vec![y],
            ..Default::default()
        };
        let s = Session::new(gpu, Arc::new(g), spec).unwrap();
        s.write(x, &[0.5; 32]).unwrap();
        s.write(w, &[0.25; 128]).unwrap();
        (s, y)
    };
    // A device opened without asking for timestamps has none, and says so.
    let (mut s, _) = session(gpu());
    let err = s.profile_step().unwrap_err().to_string();
    assert!(err.contains("timestamp"), "{err}");

    let choice = difftrain::gpu::AdapterChoice {
        timestamps: true,
        ..difftrain::gpu::AdapterChoice::from_env()
    };
    let timed = Gpu::new_blocking(&choice).unwrap();
    let (mut s, y) = session(&timed);
    if !timed.caps.timestamps {
        let err = s.profile_step().unwrap_err().to_string();
        assert!(err.contains("timestamp"), "{err}");
        return;
    }
    let times = s.profile_step().unwrap();
    assert_eq!(times.len(), s.stats().dispatches);
    assert!(
        times.iter().all(|t| t.is_finite() && *t >= 0.0),
        "{times:?}"
    );
    let out = s.read_blocking(y).unwrap();
    let v = 0.5 * 0.25 * 8.0f32;
    assert!((out[0] - v / (1.0 + (-v).exp())).abs() < 1e-6);
}
