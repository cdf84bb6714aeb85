// Mean-squared error: loss = mean((pred - target)^2), reduced by one
// workgroup in a fixed order (deterministic). WEIGHTED: each sample's squared
// errors times its weight w[b] (Min-SNR), i.e. mean over samples of
// w[b] * mean((pred_b - target_b)^2); `per` elements per sample.

const WG: u32 = 256u;
var<workgroup> partial: array<f32, WG>;

//@ entry mse_forward
//@ tensors pred:read target:read w:read loss:write
//@ const WEIGHTED = false
struct Params { n: u32, per: u32 }
@compute @workgroup_size(WG)
fn mse_forward(@builtin(local_invocation_index) lid: u32) {
    var s = 0.0;
    for (var i = lid; i < p.n; i += WG) {
        let d = pred_load(i) - target_load(i);
        var e = d * d;
        if (WEIGHTED) { e *= w_load(i / p.per); }
        s += e;
    }
    partial[lid] = s;
    workgroupBarrier();
    for (var half = WG / 2u; half > 0u; half /= 2u) {
        if (lid < half) { partial[lid] += partial[lid + half]; }
        workgroupBarrier();
    }
    if (lid == 0u) { loss_store(0u, partial[0] / f32(p.n)); }
}

//@ entry mse_backward
//@ tensors pred:read target:read w:read dloss:read dx:rw
//@ const WEIGHTED = false
// dpred = dloss * 2 (pred - target) / n (times w[b]); dtarget is its
// negation (SIGN = -1).
struct Params { n: u32, per: u32, sign: f32, beta: f32 }
@compute @workgroup_size(WG)
fn mse_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_id(gid, nwg, WG);
    if (i >= p.n) { return; }
    var g = p.sign * dloss_load(0u) * 2.0 * (pred_load(i) - target_load(i)) / f32(p.n);
    if (WEIGHTED) { g *= w_load(i / p.per); }
    if (p.beta != 0.0) { g += dx_load(i); }
    dx_store(i, g);
}
