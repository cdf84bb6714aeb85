//! Training through the whole op set: a tiny UNet-like network (conv, group
//! norm + SiLU, strided conv, a self-attention block, upsample, skip concat)
//! trained with AdamW. Its loss must fall, and two runs must agree bit for bit.

use difftrain::graph::{AdamW, Graph, RunSpec, Session};
use difftrain::ops::testing::{gpu, random};
use difftrain::{DType, Result, TensorId};
use std::sync::Arc;

struct Net {
    x: TensorId,
    target: TensorId,
    seed: TensorId,
    loss: TensorId,
    params: Vec<TensorId>,
}

fn conv(
    g: &mut Graph,
    name: &str,
    x: TensorId,
    cin: usize,
    cout: usize,
    stride: usize,
) -> Result<TensorId> {
    let w = g.param(&format!("{name}.weight"), &[cout, cin, 3, 3]);
    let b = g.param(&format!("{name}.bias"), &[cout]);
    g.conv2d(x, w, Some(b), stride, 1)
}

fn linear(g: &mut Graph, name: &str, x: TensorId, cin: usize, cout: usize) -> Result<TensorId> {
    let w = g.param(&format!("{name}.weight"), &[cout, cin]);
    let b = g.param(&format!("{name}.bias"), &[cout]);
    g.linear(x, w, Some(b))
}

/// x [2, 4, 8, 8] -> conv 8 -> GN+SiLU -> conv stride 2 -> attention over the
/// 4x4 tokens -> upsample -> concat skip -> conv 4 -> MSE to target.
fn build(dtype: DType) -> Result<(Graph, Net)> {
    let (b, c, hw) = (2, 8, 8);
    let mut g = Graph::new();
    let x = g.input("x", &[b, 4, hw, hw], dtype);
    let target = g.input("target", &[b, 4, hw, hw], dtype);
    let h = conv(&mut g, "conv_in", x, 4, c, 1)?;
    let gamma = g.param("norm.weight", &[c]);
    let beta = g.param("norm.bias", &[c]);
    let h = g.group_norm_silu(h, gamma, beta, 4, 1e-5)?;
    let d = conv(&mut g, "down", h, c, c, 2)?;
    // Attention over the 16 tokens of the 4x4 map: [B, C, 16] -> [B, 16, C].
    let s = hw / 2;
    let t = g.reshape(d, &[b, c, s * s])?;
    let t = g.transpose_last2(t)?;
    let ln_w = g.param("attn.norm.weight", &[c]);
    let ln_b = g.param("attn.norm.bias", &[c]);
    let n = g.layer_norm(t, ln_w, ln_b, 1e-5)?;
    let q = linear(&mut g, "attn.to_q", n, c, c)?;
    let k = linear(&mut g, "attn.to_k", n, c, c)?;
    let v = linear(&mut g, "attn.to_v", n, c, c)?;
    let a = g.attention(q, k, v, 2, false)?;
    let a = linear(&mut g, "attn.to_out", a, c, c)?;
    let t = g.add(a, t)?;
    let t = g.transpose_last2(t)?;
    let d = g.reshape(t, &[b, c, s, s])?;
    let u = g.upsample_nearest2x(d)?;
    let cat = g.concat(&[u, h], 1)?;
    let pred = conv(&mut g, "conv_out", cat, 2 * c, 4, 1)?;
    let loss = g.mse_loss(pred, target)?;
    let seed = g.input("seed", &[1], DType::F32);
    let params = g.params();
    Ok((
        g,
        Net {
            x,
            target,
            seed,
            loss,
            params,
        },
    ))
}

fn train(dtype: DType, steps: usize) -> (Vec<f32>, Vec<Vec<f32>>) {
    let (g, net) = build(dtype).unwrap();
    let spec = RunSpec {
        outputs: vec![net.loss],
        seeds: vec![(net.loss, net.seed)],
        optimizer: Some(AdamW {
            lr: 3e-3,
            weight_decay: 0.0,
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut s = Session::new(gpu(), Arc::new(g), spec).unwrap();
    for (i, &p) in net.params.iter().enumerate() {
        let d = s.graph.desc(p).clone();
        let fan_in: usize = d.shape.iter().skip(1).product::<usize>().max(1);
        let values: Vec<f32> = if d.name.ends_with("norm.weight") {
            vec![1.0; d.numel()]
        } else {
            let bound = 1.0 / (fan_in as f32).sqrt();
            random(d.numel(), 100 + i as u64)
                .iter()
                .map(|v| v * bound)
                .collect()
        };
        s.write(p, &values).unwrap();
    }
    let n = 2 * 4 * 8 * 8;
    s.write(net.x, &random(n, 1)).unwrap();
    // A target the network can learn: a smooth function of the input.
    let tgt: Vec<f32> = random(n, 1).iter().map(|v| (2.0 * v).sin() * 0.5).collect();
    s.write(net.target, &tgt).unwrap();
    s.write(net.seed, &[1.0]).unwrap();
    let mut losses = Vec::new();
    for _ in 0..steps {
        s.step().unwrap();
        losses.push(s.read_blocking(net.loss).unwrap()[0]);
    }
    let weights = net
        .params
        .iter()
        .map(|&p| s.read_blocking(p).unwrap())
        .collect();
    (losses, weights)
}

#[test]
fn conv_attention_network_learns_and_is_deterministic() {
    let (l1, w1) = train(DType::F32, 40);
    let (first, last) = (l1[0], *l1.last().unwrap());
    assert!(l1.iter().all(|l| l.is_finite()), "{l1:?}");
    assert!(
        last < 0.5 * first,
        "loss must fall by half in 40 steps: {first} -> {last}"
    );
    let (l2, w2) = train(DType::F32, 40);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&l1), bits(&l2), "losses differ between identical runs");
    for (a, b) in w1.iter().zip(&w2) {
        assert_eq!(bits(a), bits(b), "parameters differ between identical runs");
    }
}

#[test]
fn conv_attention_network_learns_in_f16_and_bf16_storage() {
    for dtype in [DType::F16, DType::BF16] {
        let (l, _) = train(dtype, 40);
        let (first, last) = (l[0], *l.last().unwrap());
        assert!(l.iter().all(|v| v.is_finite()), "{dtype}: {l:?}");
        assert!(
            last < 0.6 * first,
            "{dtype}: loss must fall: {first} -> {last}"
        );
    }
}
