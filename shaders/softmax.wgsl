// Softmax over the last dim (torch.softmax(x, -1)) over rows of D elements, stable: y = exp(x - max) / sum exp(x - max).
// Backward: dx = y * (dy - sum(dy * y)).
// Reductions: strided per-lane partials, then a fixed-order tree.
// VEC: D % 4 == 0, so rows start on a vec4 boundary.
// ONE_LANE: one invocation per row instead of a workgroup (many short rows:
// no barriers). Rows past the end are clamped (computed, not stored) so that
// every lane reaches the barriers.

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

// Reduce over a row's lanes (nothing to combine with ONE_LANE).
fn row_reduce(lid: u32, v: f32, is_max: bool, one_lane: bool) -> f32 {
    if (one_lane) { return v; }
    return workgroup_reduce(lid, v, is_max);
}

const NEG_BIG: f32 = -3.0e38;

//@ entry softmax_forward
//@ tensors x:read y:write
//@ const WG = 64u
//@ const VEC = false
//@ const ONE_LANE = false
struct Params { rows: u32, d: u32 }
@compute @workgroup_size(WG)
fn softmax_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let lane = select(lid, 0u, ONE_LANE);
    let lanes = select(WG, 1u, ONE_LANE);
    let rid = select(flat_id(wid, nwg, 1u), flat_id(gid, nwg, WG), ONE_LANE);
    let valid = rid < p.rows;
    let row = min(rid, p.rows - 1u);
    let base = row * p.d;
    var mx = vec4<f32>(NEG_BIG);
    if (VEC) {
        for (var j = 4u * lane; j < p.d; j += 4u * lanes) { mx = max(mx, x_load4(base + j)); }
    } else {
        for (var j = lane; j < p.d; j += lanes) { mx.x = max(mx.x, x_load(base + j)); }
    }
    let m = row_reduce(lid, max(max(mx.x, mx.y), max(mx.z, mx.w)), true, ONE_LANE);
    var s = vec4<f32>(0.0);
    if (VEC) {
        for (var j = 4u * lane; j < p.d; j += 4u * lanes) { s += exp(x_load4(base + j) - m); }
    } else {
        for (var j = lane; j < p.d; j += lanes) { s.x += exp(x_load(base + j) - m); }
    }
    let inv = 1.0 / row_reduce(lid, (s.x + s.y) + (s.z + s.w), false, ONE_LANE);
    if (VEC) {
        for (var j = 4u * lane; j < p.d; j += 4u * lanes) {
            if (valid) { y_store4(base + j, exp(x_load4(base + j) - m) * inv); }
        }
    } else {
        for (var j = lane; j < p.d; j += lanes) {
            if (valid) { y_store(base + j, exp(x_load(base + j) - m) * inv); }
        }
    }
}

//@ entry softmax_backward
//@ tensors y:read dy:read dx:rw
//@ const WG = 64u
//@ const VEC = false
//@ const ONE_LANE = false
// dx = beta * dx + y * (dy - sum(dy * y))
struct Params { rows: u32, d: u32, beta: f32 }
@compute @workgroup_size(WG)
fn softmax_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let lane = select(lid, 0u, ONE_LANE);
    let lanes = select(WG, 1u, ONE_LANE);
    let rid = select(flat_id(wid, nwg, 1u), flat_id(gid, nwg, WG), ONE_LANE);
    let valid = rid < p.rows;
    let row = min(rid, p.rows - 1u);
    let base = row * p.d;
    var s = vec4<f32>(0.0);
    if (VEC) {
        for (var j = 4u * lane; j < p.d; j += 4u * lanes) { s += dy_load4(base + j) * y_load4(base + j); }
    } else {
        for (var j = lane; j < p.d; j += lanes) { s.x += dy_load(base + j) * y_load(base + j); }
    }
    let t = row_reduce(lid, (s.x + s.y) + (s.z + s.w), false, ONE_LANE);
    if (VEC) {
        for (var j = 4u * lane; j < p.d; j += 4u * lanes) {
            var g = y_load4(base + j) * (dy_load4(base + j) - t);
            if (p.beta != 0.0) { g += dx_load4(base + j); }
            if (valid) { dx_store4(base + j, g); }
        }
    } else {
        for (var j = lane; j < p.d; j += lanes) {
            var g = y_load(base + j) * (dy_load(base + j) - t);
            if (p.beta != 0.0) { g += dx_load(base + j); }
            if (valid) { dx_store(base + j, g); }
        }
    }
}
