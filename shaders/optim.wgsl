// AdamW (decoupled weight decay) and global gradient-norm clipping, in the
// order torch.optim.AdamW and torch.nn.utils.clip_grad_norm_ compute them.

const WG: u32 = 256u;
// Sum of squares: RWG lanes, each over SPAN vectors of 4 elements, make a
// block of BLOCK elements (SUMSQ_BLOCK in optim.rs).
const RWG: u32 = 64u;
const SPAN: u32 = 4u;
const BLOCK: u32 = RWG * SPAN * 4u;
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

//@ helpers block_part
// Lane `lane` of `lanes`: the sum of g^2 over vectors lane, lane + lanes, ...
// of `block` (adjacent lanes read adjacent vectors), in order.
fn block_part(block: u32, lane: u32, lanes: u32) -> f32 {
    var s = 0.0;
    for (var j = 0u; j < BLOCK / (4u * lanes); j++) {
        let i = block * BLOCK + (j * lanes + lane) * 4u;
        let inside = vec4<u32>(i) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(p.n);
        let v = select(vec4<f32>(0.0), g_load4(min(i, (p.n - 1u) & ~3u)), inside);
        s += ((v.x * v.x + v.y * v.y) + v.z * v.z) + v.w * v.w;
    }
    return s;
}

//@ entry sumsq
//@ tensors g:read4 partials:write
//@ use block_part
// partials[base + b] = sum of g^2 over elements [BLOCK b, BLOCK (b + 1)) of
// the first n of the bound window of g: one workgroup per block. Windows
// start at whole blocks, so a partial is the same however g is windowed.
struct Params { n: u32, base: u32 }
@compute @workgroup_size(RWG)
fn sumsq(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let block = wid.x + wid.y * nwg.x;
    if (block * BLOCK >= p.n) { return; }
    partial[lid] = block_part(block, lid, RWG);
    tree_sum(lid);
    if (lid == 0u) { partials_store(p.base + block, partial[0]); }
}

//@ entry sumsq_subgroup
//@ tensors g:read4 partials:write
//@ use block_part
// sumsq for adapters whose subgroups are exactly SG wide (llvmpipe): the
// workgroup is one subgroup, whose lanes subgroupAdd combines, with no
// workgroup memory and no barriers (each a switch between the invocations
// of a workgroup on llvmpipe). Same blocks and partials as sumsq.
struct Params { n: u32, base: u32 }
const SG: u32 = 8u;
@compute @workgroup_size(SG)
fn sumsq_subgroup(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
    let block = wid.x + wid.y * nwg.x;
    // (block is the same in the whole subgroup: all of it returns or none.)
    if (block * BLOCK >= p.n) { return; }
    let s = subgroupAdd(block_part(block, lane, SG));
    if (lane == 0u) { partials_store(p.base + block, s); }
}

//@ entry step_prologue
//@ tensors partials:read clip:write step:rw scaler:rw seed:rw
//@ const CLIP = false
//@ const SCALER = false
// Once per optimizer step, before the AdamW kernels; one workgroup.
// ||g||^2 is the sum of all partials: lane l adds partials l, l + RWG, ...
// in order, then the lanes are summed by the fixed tree.
//
// SCALER (fp16 loss scaling, torch.amp.GradScaler): the gradients are those
// of scale * loss. inf/NaN anywhere makes ||g||^2 non-finite: the step is
// skipped (step[3] = 1), the scale backs off and the growth tracker resets;
// otherwise after `interval` good steps in a row the scale grows. The
// backward seed (d objective / d loss) follows the scale for the next step.
// Scales are powers of two, so unscaling is exact.
//
// clip = [multiplier, ||g|| unscaled], multiplier = 1 / scale times, with
// CLIP, min(1, max_norm / (||g|| + 1e-6)) (clip_grad_norm_).
// step = [t, 1 - beta1^t, 1 - beta2^t, skip]: AdamW's step count counts
// applied updates only, as torch's does when GradScaler skips one.
// scaler = [scale, growth tracker, skipped steps in all, 0].
struct Params {
    count: u32, max_norm: f32, log_beta1: f32, log_beta2: f32,
    growth: f32, backoff: f32, interval: f32,
}
@compute @workgroup_size(RWG)
fn step_prologue(@builtin(local_invocation_index) lid: u32) {
    var s = 0.0;
    for (var i = lid; i < p.count; i += RWG) { s += partials_load(i); }
    partial[lid] = s;
    tree_sum(lid);
    if (lid != 0u) { return; }
    let sumsq = partial[0];
    var inv_scale = 1.0;
    var skip = false;
    if (SCALER) {
        inv_scale = 1.0 / scaler_load(0u);
        skip = !is_finite(sumsq);
    }
    let norm = sqrt(sumsq) * inv_scale;
    var mult = inv_scale;
    if (CLIP) { mult *= min(1.0, p.max_norm / (norm + 1e-6)); }
    clip_store(0u, mult);
    clip_store(1u, norm);
    let t = step_load(0u) + select(1.0, 0.0, skip);
    step_store(0u, t);
    step_store(1u, one_minus_exp(t * p.log_beta1));
    step_store(2u, one_minus_exp(t * p.log_beta2));
    step_store(3u, select(0.0, 1.0, skip));
    if (SCALER) {
        let old = scaler_load(0u);
        var scale = old;
        var tracker = scaler_load(1u) + 1.0;
        if (skip) {
            scale *= p.backoff;
            tracker = 0.0;
            scaler_store(2u, scaler_load(2u) + 1.0);
        } else if (tracker >= p.interval) {
            scale *= p.growth;
            tracker = 0.0;
        }
        scaler_store(0u, scale);
        scaler_store(1u, tracker);
        seed_store(0u, seed_load(0u) * (scale / old));
    }
}

// Whether x is neither infinite nor NaN (WGSL has no isinf / isnan).
fn is_finite(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7f800000u) != 0x7f800000u;
}

// 1 - e^x for x <= 0 (Adam's bias corrections 1 - beta^t = 1 - e^(t ln beta)):
// a Taylor series where 1 - exp(x) would cancel, exp beyond.
fn one_minus_exp(x: f32) -> f32 {
    if (x > -0.25) {
        // -(x + x^2/2! + ... + x^9/9!), Horner; the next term is below 3e-13.
        var q = x / 9.0;
        for (var k = 8.0; k >= 1.0; k -= 1.0) { q = x / k * (1.0 + q); }
        return -q;
    }
    return 1.0 - exp(x);
}

//@ entry adamw
//@ tensors param:rw4 grad:rw4 m:rw4 v:rw4 hyper:read clip:read step:read
//@ const ZERO_GRAD = false
// One AdamW update of the first n elements (a multiple of 4: arenas are
// whole blocks) of the bound windows of param, grad, m and v, four per
// invocation: the gradient times clip[0] (unscaling and clipping), the
// bias corrections from step (see step_prologue), nothing when step[3]
// says the step is skipped. hyper = [lr], written by the host each step.
// ZERO_GRAD (gradient accumulation) clears grad once read, skipped or not.
struct Params { n: u32, beta1: f32, beta2: f32, eps: f32, weight_decay: f32 }
@compute @workgroup_size(WG)
fn adamw(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_id(gid, nwg, WG) * 4u;
    if (i >= p.n) { return; }
    let lr = hyper_load(0u);
    var g = grad_load4(i);
    if (ZERO_GRAD) { grad_store4(i, vec4<f32>(0.0)); }
    if (step_load(3u) != 0.0) { return; }
    g *= clip_load(0u);
    let w = param_load4(i) * (1.0 - lr * p.weight_decay);
    let m = p.beta1 * m_load4(i) + (1.0 - p.beta1) * g;
    let v = p.beta2 * v_load4(i) + (1.0 - p.beta2) * g * g;
    m_store4(i, m);
    v_store4(i, v);
    let denom = sqrt(v) / sqrt(step_load(2u)) + p.eps;
    param_store4(i, w - (lr / step_load(1u)) * m / denom);
}

//@ entry ema_update
//@ tensors param:read4 shadow:rw4 one_minus_decay:read
// diffusers' EMAModel.step for the first n elements (a multiple of 4) of
// the bound windows, four per invocation: shadow -= (1 - decay) *
// (shadow - param), 1 - decay from the host.
struct Params { n: u32 }
@compute @workgroup_size(WG)
fn ema_update(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_id(gid, nwg, WG) * 4u;
    if (i >= p.n) { return; }
    let s = shadow_load4(i);
    shadow_store4(i, s - one_minus_decay_load(0u) * (s - param_load4(i)));
}
