// AdamW (decoupled weight decay) and global gradient-norm clipping, in the
// order torch.optim.AdamW and torch.nn.utils.clip_grad_norm_ compute them.

const WG: u32 = 256u;
var<workgroup> partial: array<f32, WG>;

//@ entry sumsq
//@ tensors g:read norms:rw
// norms[slot] = sum(g^2): one workgroup, fixed order.
struct Params { n: u32, slot: u32 }
@compute @workgroup_size(WG)
fn sumsq(@builtin(local_invocation_index) lid: u32) {
    var s = 0.0;
    for (var i = lid; i < p.n; i += WG) {
        let v = g_load(i);
        s += v * v;
    }
    partial[lid] = s;
    workgroupBarrier();
    for (var half = WG / 2u; half > 0u; half /= 2u) {
        if (lid < half) { partial[lid] += partial[lid + half]; }
        workgroupBarrier();
    }
    if (lid == 0u) { norms_store(p.slot, partial[0]); }
}

//@ entry clip_scale
//@ tensors norms:read scale:write
// scale[0] = min(1, max_norm / (||g|| + 1e-6)); scale[1] = ||g||.
struct Params { count: u32, max_norm: f32 }
@compute @workgroup_size(1)
fn clip_scale() {
    var s = 0.0;
    for (var i = 0u; i < p.count; i++) { s += norms_load(i); }
    let norm = sqrt(s);
    scale_store(0u, min(1.0, p.max_norm / (norm + 1e-6)));
    scale_store(1u, norm);
}

//@ entry adamw
//@ tensors param:rw grad:read m:rw v:rw hyper:read scale:read
//@ const CLIP = false
// hyper = [lr, 1 - beta1^t, 1 - beta2^t]; written by the host each step.
struct Params { n: u32, beta1: f32, beta2: f32, eps: f32, weight_decay: f32 }
@compute @workgroup_size(WG)
fn adamw(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_id(gid, nwg, WG);
    if (i >= p.n) { return; }
    let lr = hyper_load(0u);
    var g = grad_load(i);
    if (CLIP) { g *= scale_load(0u); }
    let w = param_load(i) * (1.0 - lr * p.weight_decay);
    let m = p.beta1 * m_load(i) + (1.0 - p.beta1) * g;
    let v = p.beta2 * v_load(i) + (1.0 - p.beta2) * g * g;
    m_store(i, m);
    v_store(i, v);
    let denom = sqrt(v) / sqrt(hyper_load(2u)) + p.eps;
    param_store(i, w - (lr / hyper_load(1u)) * m / denom);
}
