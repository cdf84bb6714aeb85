// Group norm (torch.nn.GroupNorm, affine) and layer norm over one view of x:
// [O, C, S] with G groups of CG = C / G consecutive channels, so each (o, g)
// is a contiguous block of M = CG * S elements ("row" = o * G + g).
// Layer norm is O = rows, C = D, S = 1, G = 1.
//
//   xhat = (x - mean) * rstd,  y = xhat * gamma[c] + beta[c]  (then SiLU when fused)
//
// Backward (dy' = dy, or dy * silu'(pre) with pre = xhat * gamma + beta
// recomputed; dxhat = dy' * gamma):
//   dx     = rstd * (dxhat - a / M - xhat * b / M),  a = sum dxhat, b = sum dxhat * xhat
//   dgamma = sum_{o, s} dy' * xhat,  dbeta = sum_{o, s} dy'
// Every reduction runs in a fixed order (strided per-lane sums, then a tree).
//
// A row is walked as CC chunks of L elements: (CC, L) = (CG, S), one channel
// per chunk, or with FLAT (S == 1) a single chunk of the row's CG channels,
// element j being channel c0 + j. VEC: L % 4 == 0, four elements at a time.
// Lanes stride over each chunk, so no index is ever divided in a loop.
// A row has a workgroup, or with ONE_LANE (many short rows) one invocation.
// Rows past the end are clamped (computed, not stored) so that every lane
// reaches the barriers.

var<workgroup> red: array<vec2<f32>, WG>;

// Sum of v over the workgroup, a fixed-order tree (WG a power of two).
fn workgroup_sum(lid: u32, v: vec2<f32>) -> vec2<f32> {
    red[lid] = v;
    workgroupBarrier();
    for (var h = WG / 2u; h > 0u; h /= 2u) {
        if (lid < h) { red[lid] += red[lid + h]; }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

// Sum over a row's lanes: with one lane per row (ONE_LANE) there is nothing to combine.
fn row_sum(lid: u32, v: vec2<f32>, one_lane: bool) -> vec2<f32> {
    if (one_lane) { return v; }
    return workgroup_sum(lid, v);
}

fn hsum(v: vec4<f32>) -> f32 { return (v.x + v.y) + (v.z + v.w); }

fn sigmoid4(v: vec4<f32>) -> vec4<f32> { return 1.0 / (1.0 + exp(-v)); }

// The output from normalized values.
fn affine_act(xh: vec4<f32>, gam: vec4<f32>, bet: vec4<f32>, silu: bool) -> vec4<f32> {
    let y = xh * gam + bet;
    if (silu) { return y * sigmoid4(y); }
    return y;
}

// dy', the gradient at the affine output: silu'(v) = s (1 + v (1 - s)), s = sigmoid(v).
fn affine_grad(dy: vec4<f32>, xh: vec4<f32>, gam: vec4<f32>, bet: vec4<f32>, silu: bool) -> vec4<f32> {
    if (silu) {
        let pre = xh * gam + bet;
        let s = sigmoid4(pre);
        return dy * s * (1.0 + pre * (1.0 - s));
    }
    return dy;
}

// The channel of element j of chunk k of a row whose first channel is c0.
fn channel(c0: u32, k: u32, j: u32, flat: bool) -> u32 { return c0 + k + select(0u, j, flat); }

//@ entry norm_forward
//@ tensors x:read4 gamma:read4 beta:read4 y:write4 mean:write rstd:write
//@ const WG = 64u
//@ const VEC = false
//@ const FLAT = false
//@ const SILU = false
//@ const ONE_LANE = false
// Per row: the statistics, then y. Sums are taken around the
// row's first element (a shift that keeps E[d^2] - E[d]^2 from cancelling
// when |mean| >> std).
struct Params { rows: u32, cc: u32, l: u32, g: u32, cg: u32, eps: f32 }
@compute @workgroup_size(WG)
fn norm_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let lane = select(lid, 0u, ONE_LANE);
    let lanes = select(WG, 1u, ONE_LANE);
    let rid = select(flat_id(wid, nwg, 1u), flat_id(gid, nwg, WG), ONE_LANE);
    let valid = rid < p.rows;
    let row = min(rid, p.rows - 1u);
    let m = p.cc * p.l;
    let base = row * m;
    let c0 = (row % p.g) * p.cg;
    let shift = x_load(base);
    var s1 = vec4<f32>(0.0);
    var s2 = vec4<f32>(0.0);
    if (VEC) {
        for (var j = 4u * lane; j < m; j += 4u * lanes) {
            let d = x_load4(base + j) - shift;
            s1 += d;
            s2 += d * d;
        }
    } else {
        for (var j = lane; j < m; j += lanes) {
            let d = x_load(base + j) - shift;
            s1.x += d;
            s2.x += d * d;
        }
    }
    let t = row_sum(lid, vec2<f32>(hsum(s1), hsum(s2)), ONE_LANE);
    let dm = t.x / f32(m);
    let mu = shift + dm;
    let rs = inverseSqrt(max(t.y / f32(m) - dm * dm, 0.0) + p.eps);
    if (valid && lane == 0u) {
        mean_store(row, mu);
        rstd_store(row, rs);
    }
    for (var k = 0u; k < p.cc; k++) {
        let off = base + k * p.l;
        // A chunk's channel (when chunks are channels).
        let gam_k = vec4<f32>(gamma_load(c0 + k));
        let bet_k = vec4<f32>(beta_load(c0 + k));
        if (VEC) {
            for (var j = 4u * lane; j < p.l; j += 4u * lanes) {
                var gam = gam_k;
                var bet = bet_k;
                if (FLAT) { gam = gamma_load4(c0 + j); bet = beta_load4(c0 + j); }
                if (valid) { y_store4(off + j, affine_act((x_load4(off + j) - mu) * rs, gam, bet, SILU)); }
            }
        } else {
            for (var j = lane; j < p.l; j += lanes) {
                let c = channel(c0, k, j, FLAT);
                let xh = vec4<f32>((x_load(off + j) - mu) * rs);
                if (valid) { y_store(off + j, affine_act(xh, vec4<f32>(gamma_load(c)), vec4<f32>(beta_load(c)), SILU).x); }
            }
        }
    }
}

//@ entry norm_backward
//@ tensors x:read4 dy:read4 gamma:read4 beta:read4 mean:read rstd:read dx:rw4 part:write
//@ const WG = 64u
//@ const VEC = false
//@ const FLAT = false
//@ const SILU = false
//@ const ONE_LANE = false
//@ const DX = true
//@ const PART = false
//@ const ACC = false
// Per row: a = sum dxhat and b = sum dxhat * xhat, then dx (when DX;
// added to dx with ACC). With PART (chunks are channels), lane l also
// writes its sums of dy' * xhat and dy' over chunk k to
// part[(row CC + k) lanes + l] and part[half + ..]: the parameter-gradient
// partials, summed in order later.
struct Params { rows: u32, cc: u32, l: u32, g: u32, cg: u32, half: u32 }
@compute @workgroup_size(WG)
fn norm_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let lane = select(lid, 0u, ONE_LANE);
    let lanes = select(WG, 1u, ONE_LANE);
    let rid = select(flat_id(wid, nwg, 1u), flat_id(gid, nwg, WG), ONE_LANE);
    let valid = rid < p.rows;
    let row = min(rid, p.rows - 1u);
    let m = p.cc * p.l;
    let base = row * m;
    let c0 = (row % p.g) * p.cg;
    let mu = mean_load(row);
    let rs = rstd_load(row);
    var a = vec4<f32>(0.0);
    var b = vec4<f32>(0.0);
    for (var k = 0u; k < p.cc; k++) {
        let off = base + k * p.l;
        // A chunk's channel (when chunks are channels).
        let gam_k = vec4<f32>(gamma_load(c0 + k));
        let bet_k = vec4<f32>(beta_load(c0 + k));
        var ds = vec4<f32>(0.0);
        var db = vec4<f32>(0.0);
        if (VEC) {
            for (var j = 4u * lane; j < p.l; j += 4u * lanes) {
                var gam = gam_k;
                var bet = bet_k;
                if (FLAT) { gam = gamma_load4(c0 + j); bet = beta_load4(c0 + j); }
                let xh = (x_load4(off + j) - mu) * rs;
                let d = affine_grad(dy_load4(off + j), xh, gam, bet, SILU);
                a += d * gam;
                b += d * gam * xh;
                ds += d * xh;
                db += d;
            }
        } else {
            for (var j = lane; j < p.l; j += lanes) {
                let c = channel(c0, k, j, FLAT);
                let gam = vec4<f32>(gamma_load(c));
                let xh = vec4<f32>((x_load(off + j) - mu) * rs);
                let d = affine_grad(vec4<f32>(dy_load(off + j)), xh, gam, vec4<f32>(beta_load(c)), SILU);
                a.x += d.x * gam.x;
                b.x += d.x * gam.x * xh.x;
                ds.x += d.x * xh.x;
                db.x += d.x;
            }
        }
        if (PART && valid) {
            let pi = (row * p.cc + k) * lanes + lane;
            part_store(pi, hsum(ds));
            part_store(p.half + pi, hsum(db));
        }
    }
    if (!DX) { return; }
    let t = row_sum(lid, vec2<f32>(hsum(a), hsum(b)), ONE_LANE);
    let am = t.x / f32(m);
    let bm = t.y / f32(m);
    for (var k = 0u; k < p.cc; k++) {
        let off = base + k * p.l;
        // A chunk's channel (when chunks are channels).
        let gam_k = vec4<f32>(gamma_load(c0 + k));
        let bet_k = vec4<f32>(beta_load(c0 + k));
        if (VEC) {
            for (var j = 4u * lane; j < p.l; j += 4u * lanes) {
                var gam = gam_k;
                var bet = bet_k;
                if (FLAT) { gam = gamma_load4(c0 + j); bet = beta_load4(c0 + j); }
                let xh = (x_load4(off + j) - mu) * rs;
                let dxh = affine_grad(dy_load4(off + j), xh, gam, bet, SILU) * gam;
                var g = rs * (dxh - am - xh * bm);
                if (ACC) { g += dx_load4(off + j); }
                if (valid) { dx_store4(off + j, g); }
            }
        } else {
            for (var j = lane; j < p.l; j += lanes) {
                let c = channel(c0, k, j, FLAT);
                let gam = vec4<f32>(gamma_load(c));
                let xh = vec4<f32>((x_load(off + j) - mu) * rs);
                let dxh = affine_grad(vec4<f32>(dy_load(off + j)), xh, gam, vec4<f32>(beta_load(c)), SILU).x * gam.x;
                var g = rs * (dxh - am - xh.x * bm);
                if (ACC) { g += dx_load(off + j); }
                if (valid) { dx_store(off + j, g); }
            }
        }
    }
}

//@ entry norm_param_partial
//@ tensors x:read dy:read gamma:read beta:read mean:read rstd:read part:write
//@ const WG = 64u
//@ const SILU = false
// Parameter-gradient partials when S == 1 (x [O, C], layer norm), one
// invocation per (chunk k of outer indices, channel c):
// part[k C + c] = sum dy' * xhat and part[half + k C + c] = sum dy' over the
// chunk, in order.
struct Params { o: u32, c: u32, g: u32, cg: u32, chunk: u32, half: u32 }
@compute @workgroup_size(WG)
fn norm_param_partial(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let id = flat_id(gid, nwg, WG);
    if (id >= p.half) { return; }
    let k = id / p.c;
    let c = id % p.c;
    let gam = vec4<f32>(gamma_load(c));
    let bet = vec4<f32>(beta_load(c));
    let grp = c / p.cg;
    var ds = 0.0;
    var db = 0.0;
    let end = min(p.o, (k + 1u) * p.chunk);
    for (var o = k * p.chunk; o < end; o++) {
        let row = o * p.g + grp;
        let xh = vec4<f32>((x_load(o * p.c + c) - mean_load(row)) * rstd_load(row));
        let d = affine_grad(vec4<f32>(dy_load(o * p.c + c)), xh, gam, bet, SILU).x;
        ds += d * xh.x;
        db += d;
    }
    part_store(id, ds);
    part_store(p.half + id, db);
}

//@ entry norm_param_reduce
//@ tensors part:read dgamma:rw dbeta:rw
//@ const WG = 64u
//@ const GAMMA = true
//@ const BETA = true
// Both parameter gradients in one launch, invocation j of 2C: the gamma
// half (j < C, partials from 0) and the beta half (partials from `half`):
//   d[c] = beta_d * d[c] + sum_{k, l} part[offset + (k C + c) L + l], in order.
struct Params { c: u32, k: u32, l: u32, half: u32, beta_g: f32, beta_b: f32 }
@compute @workgroup_size(WG)
fn norm_param_reduce(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let j = flat_id(gid, nwg, WG);
    let is_beta = j >= p.c;
    let c = j % p.c;
    if (j >= 2u * p.c || (is_beta && !BETA) || (!is_beta && !GAMMA)) { return; }
    let offset = select(0u, p.half, is_beta);
    var acc = 0.0;
    for (var k = 0u; k < p.k; k++) {
        let base = offset + (k * p.c + c) * p.l;
        for (var l = 0u; l < p.l; l++) { acc += part_load(base + l); }
    }
    if (is_beta) {
        if (p.beta_b != 0.0) { acc += dbeta_load(c); }
        dbeta_store(c, acc);
    } else {
        if (p.beta_g != 0.0) { acc += dgamma_load(c); }
        dgamma_store(c, acc);
    }
}
