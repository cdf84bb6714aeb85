//! Build a tiny network through the public API and train it with AdamW:
//! a two-layer MLP (linear -> SiLU -> linear) fitting y = sin(3x) on
//! [-1, 1]. Run: `cargo run --release --example tiny_train`.

use difftrain::graph::{AdamW, Graph, RunSpec, Session};
use difftrain::{AdapterChoice, DType, Gpu};
use std::sync::Arc;

fn main() -> difftrain::Result<()> {
    let gpu = Gpu::new_blocking(&AdapterChoice::from_env())?;
    println!("adapter: {} ({:?})", gpu.info.name, gpu.info.backend);

    // 1. Trace the model once for its shape.
    let (batch, hidden) = (64, 32);
    let mut g = Graph::new();
    let x = g.input("x", &[batch, 1], DType::F32);
    let y = g.input("y", &[batch, 1], DType::F32);
    let w1 = g.param("fc1.weight", &[hidden, 1]);
    let b1 = g.param("fc1.bias", &[hidden]);
    let w2 = g.param("fc2.weight", &[1, hidden]);
    let b2 = g.param("fc2.bias", &[1]);
    let h = g.linear(x, w1, Some(b1))?;
    let h = g.silu(h);
    let pred = g.linear(h, w2, Some(b2))?;
    let loss = g.mse_loss(pred, y)?;
    let seed = g.input("loss.grad", &[1], DType::F32);

    // 2. A training session: forward, backward from the loss, AdamW; one submission a step.
    let opt = AdamW {
        lr: 1e-2,
        weight_decay: 0.0,
        ..Default::default()
    };
    let spec = RunSpec {
        outputs: vec![loss],
        seeds: vec![(loss, seed)],
        optimizer: Some(opt),
        ..Default::default()
    };
    let mut s = Session::new(&gpu, Arc::new(g), spec)?;
    let st = s.stats();
    println!(
        "step: {} dispatches, {} submission, {} B pooled + {} B persistent",
        st.dispatches, st.submissions, st.pooled_bytes, st.persistent_bytes
    );

    // 3. Initialize like torch's nn.Linear (uniform in +-1/sqrt(fan_in)), deterministic.
    let uniform = |n: usize, bound: f32, salt: u32| -> Vec<f32> {
        (0..n as u32)
            .map(|i| {
                let h = (i.wrapping_mul(2654435761) ^ salt.wrapping_mul(40503))
                    .wrapping_mul(2246822519);
                ((h >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0) * bound
            })
            .collect()
    };
    s.write(w1, &uniform(hidden, 1.0, 1))?;
    s.write(b1, &uniform(hidden, 1.0, 2))?;
    let bound2 = 1.0 / (hidden as f32).sqrt();
    s.write(w2, &uniform(hidden, bound2, 3))?;
    s.write(b2, &uniform(1, bound2, 4))?;
    s.write(seed, &[1.0])?;

    let xs: Vec<f32> = (0..batch)
        .map(|i| -1.0 + 2.0 * i as f32 / (batch - 1) as f32)
        .collect();
    let ys: Vec<f32> = xs.iter().map(|v| (3.0 * v).sin()).collect();
    s.write(x, &xs)?;
    s.write(y, &ys)?;

    // 4. Train.
    let mut first = None;
    for step in 0..300 {
        s.step()?;
        if step % 50 == 0 || step == 299 {
            let l = s.read_blocking(loss)?[0];
            first.get_or_insert(l);
            println!("step {step:>3}  loss {l:.5}");
        }
    }
    let last = s.read_blocking(loss)?[0];
    println!("loss {:.5} -> {:.5}", first.unwrap_or(last), last);
    Ok(())
}
