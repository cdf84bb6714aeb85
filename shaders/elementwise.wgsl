// Elementwise ops: activations (SiLU, GELU, GELU-tanh, quick-GELU), GEGLU,
// scale, and broadcasting add/mul with the reduction their backward needs.
// Every backward writes dx = beta * dx + (new value), beta in {0, 1}, so a
// gradient that fans out accumulates in a fixed order.

const WG: u32 = 256u;

// Activation ids, matching ops::elementwise::Activation.
const SILU: u32 = 0u;
const GELU: u32 = 1u;
const GELU_TANH: u32 = 2u;
const QUICK_GELU: u32 = 3u;

fn sigmoid(x: f32) -> f32 { return 1.0 / (1.0 + exp(-x)); }

// erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7).
fn erf_approx(x: f32) -> f32 {
    let s = sign(x);
    let a = abs(x);
    let t = 1.0 / (1.0 + 0.3275911 * a);
    let y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t * exp(-a * a);
    return s * y;
}

// tanh without overflow of exp for large |x|.
fn tanh_safe(x: f32) -> f32 { return tanh(clamp(x, -15.0, 15.0)); }

const SQRT_2_OVER_PI: f32 = 0.7978845608028654;
const INV_SQRT_2: f32 = 0.7071067811865476;
const INV_SQRT_2PI: f32 = 0.3989422804014327;

fn act(op: u32, x: f32) -> f32 {
    switch op {
        case 0u: { return x * sigmoid(x); }
        case 1u: { return 0.5 * x * (1.0 + erf_approx(x * INV_SQRT_2)); }
        case 2u: { return 0.5 * x * (1.0 + tanh_safe(SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))); }
        case 3u: { return x * sigmoid(1.702 * x); }
        default: { return exp(x); }
    }
}

// d act(x) / dx
fn act_grad(op: u32, x: f32) -> f32 {
    switch op {
        case 0u: { let s = sigmoid(x); return s * (1.0 + x * (1.0 - s)); }
        case 1u: { return 0.5 * (1.0 + erf_approx(x * INV_SQRT_2)) + x * INV_SQRT_2PI * exp(-0.5 * x * x); }
        case 2u: {
            let u = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x);
            let t = tanh_safe(u);
            return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x);
        }
        case 3u: { let s = sigmoid(1.702 * x); return s * (1.0 + 1.702 * x * (1.0 - s)); }
        default: { return exp(x); }
    }
}

fn act4(op: u32, x: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(act(op, x.x), act(op, x.y), act(op, x.z), act(op, x.w));
}

fn act_grad4(op: u32, x: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(act_grad(op, x.x), act_grad(op, x.y), act_grad(op, x.z), act_grad(op, x.w));
}

// Coordinates of flat index i in a 4-D shape (d0 is implied).
fn coords4(i: u32, d1: u32, d2: u32, d3: u32) -> vec4<u32> {
    let c3 = i % d3;
    let r = i / d3;
    let c2 = r % d2;
    let r2 = r / d2;
    return vec4<u32>(r2 / d1, r2 % d1, c2, c3);
}

//@ entry unary_forward
//@ tensors x:read y:write
//@ const OP = 0u
// y = act(x), four elements per invocation.
struct Params { n: u32 }
@compute @workgroup_size(WG)
fn unary_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_id(gid, nwg, WG) * 4u;
    if (i >= p.n) { return; }
    if (i + 4u <= p.n) {
        let x = x_load4(i);
        y_store4(i, vec4<f32>(act(OP, x.x), act(OP, x.y), act(OP, x.z), act(OP, x.w)));
        return;
    }
    for (var j = i; j < p.n; j++) { y_store(j, act(OP, x_load(j))); }
}

//@ entry unary_backward
//@ tensors x:read dy:read dx:rw
//@ const OP = 0u
// dx = beta * dx + dy * act'(x)
struct Params { n: u32, beta: f32 }
@compute @workgroup_size(WG)
fn unary_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_id(gid, nwg, WG);
    if (i >= p.n) { return; }
    var g = dy_load(i) * act_grad(OP, x_load(i));
    if (p.beta != 0.0) { g += dx_load(i); }
    dx_store(i, g);
}

//@ entry scale_forward
//@ tensors x:read y:rw
// y = beta * y + s * x (forward uses beta = 0; backward reuses it for dx).
struct Params { n: u32, s: f32, beta: f32 }
@compute @workgroup_size(WG)
fn scale_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_id(gid, nwg, WG);
    if (i >= p.n) { return; }
    var v = p.s * x_load(i);
    if (p.beta != 0.0) { v += y_load(i); }
    y_store(i, v);
}

//@ entry clamp_forward
//@ tensors x:read y:write
struct Params { n: u32, lo: f32, hi: f32 }
@compute @workgroup_size(WG)
fn clamp_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_id(gid, nwg, WG);
    if (i >= p.n) { return; }
    y_store(i, clamp(x_load(i), p.lo, p.hi));
}

//@ entry clamp_backward
//@ tensors x:read dy:read dx:rw
// torch.clamp's gradient: dy where lo <= x <= hi, else 0.
struct Params { n: u32, lo: f32, hi: f32, beta: f32 }
@compute @workgroup_size(WG)
fn clamp_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_id(gid, nwg, WG);
    if (i >= p.n) { return; }
    let x = x_load(i);
    var g = select(0.0, dy_load(i), x >= p.lo && x <= p.hi);
    if (p.beta != 0.0) { g += dx_load(i); }
    dx_store(i, g);
}

//@ entry geglu_forward
//@ tensors x:read4 y:write4
//@ const VEC = 1u
// x: (rows, 2 * d) = [hidden | gate]; y: (rows, d) = hidden * gelu(gate)
// (diffusers GEGLU: proj(x).chunk(2, dim=-1)). One invocation per VEC
// columns of a row (VEC = 4 when d is a multiple of 4).
struct Params { n: u32, d: u32 }

// VEC consecutive values as a vector (in .x when VEC = 1).
fn x_vec(i: u32) -> vec4<f32> {
    if (VEC == 4u) { return x_load4(i); }
    return vec4<f32>(x_load(i), 0.0, 0.0, 0.0);
}

@compute @workgroup_size(WG)
fn geglu_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_id(gid, nwg, WG) * VEC;
    if (i >= p.n) { return; }
    let at = (i / p.d) * 2u * p.d + i % p.d;
    let y = x_vec(at) * act4(GELU, x_vec(at + p.d));
    if (VEC == 4u) { y_store4(i, y); } else { y_store(i, y.x); }
}

//@ entry geglu_backward
//@ tensors x:read4 dy:read4 dx:rw4
//@ const VEC = 1u
//@ const ACC = false
// d hidden = dy * gelu(gate); d gate = dy * hidden * gelu'(gate): one
// invocation per VEC columns of a row writes both (added to dx with ACC).
struct Params { n: u32, d: u32 }

// VEC consecutive values of x, dy or dx as a vector (in .x when VEC = 1),
// and the store of such a vector into dx (plus dx with ACC).
fn x_vec(i: u32) -> vec4<f32> {
    if (VEC == 4u) { return x_load4(i); }
    return vec4<f32>(x_load(i), 0.0, 0.0, 0.0);
}
fn dy_vec(i: u32) -> vec4<f32> {
    if (VEC == 4u) { return dy_load4(i); }
    return vec4<f32>(dy_load(i), 0.0, 0.0, 0.0);
}
fn dx_put(i: u32, v: vec4<f32>) {
    var o = v;
    if (VEC == 4u) {
        if (ACC) { o += dx_load4(i); }
        dx_store4(i, o);
    } else {
        if (ACC) { o.x += dx_load(i); }
        dx_store(i, o.x);
    }
}

@compute @workgroup_size(WG)
fn geglu_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_id(gid, nwg, WG) * VEC;
    if (i >= p.n) { return; }
    let at = (i / p.d) * 2u * p.d + i % p.d;
    let h = x_vec(at);
    let g = x_vec(at + p.d);
    let d = dy_vec(i);
    dx_put(at, d * act4(GELU, g));
    dx_put(at + p.d, d * h * act_grad4(GELU, g));
}

//@ entry broadcast_forward
//@ tensors a:read b:read y:rw
//@ const OP = 0u
//@ const ACC = false
// y[i] = a[i] (+|*) b[bidx(i)], or just b[bidx(i)] (OP 2), plus y[i] with
// ACC, where bidx uses b's strides over y's 4-D shape (0 on broadcast dims).
// Accumulation is a constant: llvmpipe would pay for a runtime test's load.
struct Params { n: u32, d1: u32, d2: u32, d3: u32, bs0: u32, bs1: u32, bs2: u32, bs3: u32 }
@compute @workgroup_size(WG)
fn broadcast_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_id(gid, nwg, WG);
    if (i >= p.n) { return; }
    let c = coords4(i, p.d1, p.d2, p.d3);
    let bv = b_load(c.x * p.bs0 + c.y * p.bs1 + c.z * p.bs2 + c.w * p.bs3);
    var v = f32();
    switch OP {
        case 0u: { v = a_load(i) + bv; }
        case 1u: { v = a_load(i) * bv; }
        default: { v = bv; }
    }
    if (ACC) { v += y_load(i); }
    y_store(i, v);
}

//@ entry broadcast_reduce
//@ tensors dy:read m:read db:rw
//@ const MUL = false
//@ const ACC = false
// db[j] = sum over the broadcast dims of dy[i] (* m[i] when MUL) (+ db[j]
// with ACC), the gradient of a broadcast operand. One invocation per element
// of db, summing in a fixed order. Dims: y's 4-D shape; bd*: b's 4-D shape.
struct Params { nb: u32, d0: u32, d1: u32, d2: u32, d3: u32, bd1: u32, bd2: u32, bd3: u32 }
@compute @workgroup_size(WG)
fn broadcast_reduce(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let j = flat_id(gid, nwg, WG);
    if (j >= p.nb) { return; }
    let c = coords4(j, p.bd1, p.bd2, p.bd3);
    // A dim is reduced when b has extent 1 there and y does not.
    var lo = c;
    var hi = c + vec4<u32>(1u);
    let b0 = p.nb / (p.bd1 * p.bd2 * p.bd3);
    if (b0 == 1u) { lo.x = 0u; hi.x = p.d0; }
    if (p.bd1 == 1u) { lo.y = 0u; hi.y = p.d1; }
    if (p.bd2 == 1u) { lo.z = 0u; hi.z = p.d2; }
    if (p.bd3 == 1u) { lo.w = 0u; hi.w = p.d3; }
    var acc = 0.0;
    for (var i0 = lo.x; i0 < hi.x; i0++) {
        for (var i1 = lo.y; i1 < hi.y; i1++) {
            for (var i2 = lo.z; i2 < hi.z; i2++) {
                let base = ((i0 * p.d1 + i1) * p.d2 + i2) * p.d3;
                for (var i3 = lo.w; i3 < hi.w; i3++) {
                    let i = base + i3;
                    if (MUL) { acc += dy_load(i) * m_load(i); } else { acc += dy_load(i); }
                }
            }
        }
    }
    if (ACC) { acc += db_load(j); }
    db_store(j, acc);
}
