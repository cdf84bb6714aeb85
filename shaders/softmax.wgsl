// Softmax over the last dim (torch.softmax(x, -1)), one workgroup per row of
// D elements, stable: y = exp(x - max) / sum exp(x - max).
// Backward: dx = y * (dy - sum(dy * y)).
// Reductions: strided per-lane partials, then a fixed-order tree.
// VEC: D % 4 == 0, so rows start on a vec4 boundary.

var<workgroup> red: array<f32, WG>;

// Reduce v over the workgroup with max (MAX) or +, as a fixed-order tree.
fn workgroup_reduce(lid: u32, v: f32, is_max: bool) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var h = WG / 2u; h > 0u; h /= 2u) {
        if (lid < h) {
            let o = red[lid + h];
            red[lid] = select(red[lid] + o, max(red[lid], o), is_max);
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

const NEG_BIG: f32 = -3.0e38;

//@ entry softmax_forward
//@ tensors x:read y:write
//@ const WG = 64u
//@ const VEC = false
struct Params { rows: u32, d: u32 }
@compute @workgroup_size(WG)
fn softmax_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = flat_id(wid, nwg, 1u);
    if (row >= p.rows) { return; }
    let base = row * p.d;
    var mx = vec4<f32>(NEG_BIG);
    if (VEC) {
        for (var j = 4u * lid; j < p.d; j += 4u * WG) { mx = max(mx, x_load4(base + j)); }
    } else {
        for (var j = lid; j < p.d; j += WG) { mx.x = max(mx.x, x_load(base + j)); }
    }
    let m = workgroup_reduce(lid, max(max(mx.x, mx.y), max(mx.z, mx.w)), true);
    var s = vec4<f32>(0.0);
    if (VEC) {
        for (var j = 4u * lid; j < p.d; j += 4u * WG) { s += exp(x_load4(base + j) - m); }
    } else {
        for (var j = lid; j < p.d; j += WG) { s.x += exp(x_load(base + j) - m); }
    }
    let inv = 1.0 / workgroup_reduce(lid, (s.x + s.y) + (s.z + s.w), false);
    if (VEC) {
        for (var j = 4u * lid; j < p.d; j += 4u * WG) { y_store4(base + j, exp(x_load4(base + j) - m) * inv); }
    } else {
        for (var j = lid; j < p.d; j += WG) { y_store(base + j, exp(x_load(base + j) - m) * inv); }
    }
}

//@ entry softmax_backward
//@ tensors y:read dy:read dx:rw
//@ const WG = 64u
//@ const VEC = false
// dx = beta * dx + y * (dy - sum(dy * y))
struct Params { rows: u32, d: u32, beta: f32 }
@compute @workgroup_size(WG)
fn softmax_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = flat_id(wid, nwg, 1u);
    if (row >= p.rows) { return; }
    let base = row * p.d;
    var s = vec4<f32>(0.0);
    if (VEC) {
        for (var j = 4u * lid; j < p.d; j += 4u * WG) { s += dy_load4(base + j) * y_load4(base + j); }
    } else {
        for (var j = lid; j < p.d; j += WG) { s.x += dy_load(base + j) * y_load(base + j); }
    }
    let t = workgroup_reduce(lid, (s.x + s.y) + (s.z + s.w), false);
    if (VEC) {
        for (var j = 4u * lid; j < p.d; j += 4u * WG) {
            var g = y_load4(base + j) * (dy_load4(base + j) - t);
            if (p.beta != 0.0) { g += dx_load4(base + j); }
            dx_store4(base + j, g);
        }
    } else {
        for (var j = lid; j < p.d; j += WG) {
            var g = y_load(base + j) * (dy_load(base + j) - t);
            if (p.beta != 0.0) { g += dx_load(base + j); }
            dx_store(base + j, g);
        }
    }
}
