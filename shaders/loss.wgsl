// Mean-squared error: loss = mean((pred - target)^2), reduced by one
// workgroup in a fixed order (deterministic).

const WG: u32 = 256u;
var<workgroup> partial: array<f32, WG>;

//@ entry mse_forward
//@ tensors pred:read target:read loss:write
struct Params { n: u32 }
@compute @workgroup_size(WG)
fn mse_forward(@builtin(local_invocation_index) lid: u32) {
    var s = 0.0;
    for (var i = lid; i < p.n; i += WG) {
        let d = pred_load(i) - target_load(i);
        s += d * d;
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
//@ tensors pred:read target:read dloss:read dx:rw
// dpred = dloss * 2 (pred - target) / n; dtarget is its negation (SIGN = -1).
struct Params { n: u32, sign: f32, beta: f32 }
@compute @workgroup_size(WG)
fn mse_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_id(gid, nwg, WG);
    if (i >= p.n) { return; }
    var g = p.sign * dloss_load(0u) * 2.0 * (pred_load(i) - target_load(i)) / f32(p.n);
    if (p.beta != 0.0) { g += dx_load(i); }
    dx_store(i, g);
}
