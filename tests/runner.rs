//! The graph runner as a whole: memory planning, no-grad mode, limits,
//! determinism of a full training step.

use difftrain::graph::{AdamW, Graph, RunSpec, Session};
use difftrain::ops::testing::{gpu, random};
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
    let limit = gpu().max_binding_bytes();
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
