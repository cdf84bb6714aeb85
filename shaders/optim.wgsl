// AdamW (decoupled weight decay) and global gradient-norm clipping, in the
// order torch.optim.AdamW and torch.nn.utils.clip_grad_norm_ compute them.

const WG: u32 = 256u;
// Sum of squares: RWG lanes, each over 4 consecutive elements, make a block
// of BLOCK elements (SUMSQ_BLOCK in optim.rs).
const RWG: u32 = 64u;
const BLOCK: u32 = 256u;
var<workgroup> partial: array<f32, RWG>;

// The sum of partial[0..RWG] by a fixed pairwise tree (deterministic).
// Every lane of the workgroup calls it; the result is in partial[0].
fn tree_sum(lid: u32) {
    workgroupBarrier();
    for (var half = RWG / 2u; half > 0u; half /= 2u) {
        if (lid < half) { partial[lid] += partial[lid + half]; }
        workgroupBarrier();
    }
}

//@ entry sumsq
//@ tensors g:read4 partials:write
// partials[base + b] = sum of g^2 over elements [BLOCK b, BLOCK (b + 1)) of
// the first n of the bound window of g: one workgroup per block. Windows
// start at whole blocks, so a partial is the same however g is windowed.
struct Params { n: u32, base: u32 }
@compute @workgroup_size(RWG)
fn sumsq(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let block = wid.x + wid.y * nwg.x;
    if (block * BLOCK >= p.n) { return; }
    let i = block * BLOCK + lid * 4u;
    let inside = vec4<u32>(i) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(p.n);
    let v = select(vec4<f32>(0.0), g_load4(min(i, (p.n - 1u) & ~3u)), inside);
    partial[lid] = ((v.x * v.x + v.y * v.y) + v.z * v.z) + v.w * v.w;
    tree_sum(lid);
    if (lid == 0u) { partials_store(p.base + block, partial[0]); }
}

//@ entry clip_scale
//@ tensors partials:read scale:write
// scale[0] = min(1, max_norm / (||g|| + 1e-6)); scale[1] = ||g||, where
// ||g||^2 is the sum of all partials: lane l adds partials l, l + RWG, ...
// in order, then the lanes are summed by the fixed tree.
struct Params { count: u32, max_norm: f32 }
@compute @workgroup_size(RWG)
fn clip_scale(@builtin(local_invocation_index) lid: u32) {
    var s = 0.0;
    for (var i = lid; i < p.count; i += RWG) { s += partials_load(i); }
    partial[lid] = s;
    tree_sum(lid);
    if (lid == 0u) {
        let norm = sqrt(partial[0]);
        scale_store(0u, min(1.0, p.max_norm / (norm + 1e-6)));
        scale_store(1u, norm);
    }
}

//@ entry adamw
//@ tensors param:rw grad:rw m:rw v:rw hyper:read scale:read
//@ const CLIP = false
//@ const ZERO_GRAD = false
// One AdamW update of the first n elements of the bound windows of param,
// grad, m and v. hyper = [lr, 1 - beta1^t, 1 - beta2^t]; written by the host
// each step. ZERO_GRAD (gradient accumulation) clears grad once read.
struct Params { n: u32, beta1: f32, beta2: f32, eps: f32, weight_decay: f32 }
@compute @workgroup_size(WG)
fn adamw(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_id(gid, nwg, WG);
    if (i >= p.n) { return; }
    let lr = hyper_load(0u);
    var g = grad_load(i);
    if (ZERO_GRAD) { grad_store(i, 0.0); }
    if (CLIP) { g *= scale_load(0u); }
    let w = param_load(i) * (1.0 - lr * p.weight_decay);
    let m = p.beta1 * m_load(i) + (1.0 - p.beta1) * g;
    let v = p.beta2 * v_load(i) + (1.0 - p.beta2) * g * g;
    m_store(i, m);
    v_store(i, v);
    let denom = sqrt(v) / sqrt(hyper_load(2u)) + p.eps;
    param_store(i, w - (lr / hyper_load(1u)) * m / denom);
}

//@ entry ema_update
//@ tensors param:read shadow:rw one_minus_decay:read
// diffusers' EMAModel.step for the first n elements of the bound windows:
// shadow -= (1 - decay) * (shadow - param), 1 - decay from the host.
struct Params { n: u32 }
@compute @workgroup_size(WG)
fn ema_update(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_id(gid, nwg, WG);
    if (i >= p.n) { return; }
    let s = shadow_load(i);
    shadow_store(i, s - one_minus_decay_load(0u) * (s - param_load(i)));
}
