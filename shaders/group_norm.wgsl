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
// MODE says how four consecutive elements map to channels:
//   0: any shape, channel and row computed per element;
//   1: S % 4 == 0: a vec4 lies inside one channel;
//   2: S == 1 and M % 4 == 0: a vec4 covers 4 consecutive channels of one row.

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

// Channels and rows of the elements i .. i + 3 (see MODE).
struct Idx4 { ch: vec4<u32>, row: vec4<u32> }
fn index4(i: u32, c: u32, s: u32, m: u32, mode: u32) -> Idx4 {
    if (mode == 0u) {
        let j = vec4<u32>(i) + vec4<u32>(0u, 1u, 2u, 3u);
        return Idx4((j / s) % c, j / m);
    }
    let c0 = (i / s) % c;
    let row = vec4<u32>(i / m);
    if (mode == 1u) { return Idx4(vec4<u32>(c0), row); }
    return Idx4(vec4<u32>(c0) + vec4<u32>(0u, 1u, 2u, 3u), row);
}

//@ entry norm_stats
//@ tensors x:read mean:write rstd:write
//@ const WG = 64u
//@ const VEC = false
// One workgroup per row. Sums are taken around the row's first element (a
// shift that keeps E[d^2] - E[d]^2 from cancelling when |mean| >> std).
struct Params { rows: u32, m: u32, eps: f32 }
@compute @workgroup_size(WG)
fn norm_stats(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = flat_id(wid, nwg, 1u);
    if (row >= p.rows) { return; }
    let base = row * p.m;
    let shift = x_load(base);
    var s1 = vec4<f32>(0.0);
    var s2 = vec4<f32>(0.0);
    if (VEC) {
        for (var j = 4u * lid; j < p.m; j += 4u * WG) {
            let d = x_load4(base + j) - shift;
            s1 += d;
            s2 += d * d;
        }
    } else {
        for (var j = lid; j < p.m; j += WG) {
            let d = x_load(base + j) - shift;
            s1.x += d;
            s2.x += d * d;
        }
    }
    let t = workgroup_sum(lid, vec2<f32>(hsum(s1), hsum(s2)));
    if (lid == 0u) {
        let dm = t.x / f32(p.m);
        let var_ = max(t.y / f32(p.m) - dm * dm, 0.0);
        mean_store(row, shift + dm);
        rstd_store(row, inverseSqrt(var_ + p.eps));
    }
}

//@ entry norm_apply
//@ tensors x:read gamma:read beta:read mean:read rstd:read y:write
//@ const WG = 64u
//@ const MODE = 0u
//@ const SILU = false
// Four elements per invocation.
struct Params { n: u32, c: u32, s: u32, m: u32 }
@compute @workgroup_size(WG)
fn norm_apply(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_id(gid, nwg, WG) * 4u;
    if (i >= p.n) { return; }
    let ix = index4(i, p.c, p.s, p.m, MODE);
    let mu = vec4<f32>(mean_load(ix.row.x), mean_load(ix.row.y), mean_load(ix.row.z), mean_load(ix.row.w));
    let rs = vec4<f32>(rstd_load(ix.row.x), rstd_load(ix.row.y), rstd_load(ix.row.z), rstd_load(ix.row.w));
    let gam = vec4<f32>(gamma_load(ix.ch.x), gamma_load(ix.ch.y), gamma_load(ix.ch.z), gamma_load(ix.ch.w));
    let bet = vec4<f32>(beta_load(ix.ch.x), beta_load(ix.ch.y), beta_load(ix.ch.z), beta_load(ix.ch.w));
    let y = affine_act((x_load4(i) - mu) * rs, gam, bet, SILU);
    if (i + 4u <= p.n) {
        y_store4(i, y);
    } else {
        for (var k = 0u; i + k < p.n; k++) { y_store(i + k, y[k]); }
    }
}

//@ entry norm_backward_sums
//@ tensors x:read dy:read gamma:read beta:read mean:read rstd:read ab:write
//@ const WG = 64u
//@ const MODE = 0u
//@ const SILU = false
// One workgroup per row: ab[2 row] = a, ab[2 row + 1] = b (see top).
struct Params { rows: u32, m: u32, s: u32, cg: u32, g: u32 }
@compute @workgroup_size(WG)
fn norm_backward_sums(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = flat_id(wid, nwg, 1u);
    if (row >= p.rows) { return; }
    let base = row * p.m;
    let c0 = (row % p.g) * p.cg;
    let mu = mean_load(row);
    let rs = rstd_load(row);
    var a = vec4<f32>(0.0);
    var b = vec4<f32>(0.0);
    if (MODE == 0u) {
        for (var j = lid; j < p.m; j += WG) {
            let c = c0 + j / p.s;
            let gam = vec4<f32>(gamma_load(c));
            let xh = vec4<f32>((x_load(base + j) - mu) * rs);
            let dxh = affine_grad(vec4<f32>(dy_load(base + j)), xh, gam, vec4<f32>(beta_load(c)), SILU) * gam;
            a.x += dxh.x;
            b.x += dxh.x * xh.x;
        }
    } else if (MODE == 1u) {
        // Channel offset q = j / s tracked incrementally (r = j % s) as j
        // advances by 4 WG: no division in the loop.
        let step = 4u * WG;
        let dq = step / p.s;
        let dr = step % p.s;
        var q = (4u * lid) / p.s;
        var r = (4u * lid) % p.s;
        for (var j = 4u * lid; j < p.m; j += step) {
            let c = c0 + q;
            let gam = vec4<f32>(gamma_load(c));
            let xh = (x_load4(base + j) - mu) * rs;
            let dxh = affine_grad(dy_load4(base + j), xh, gam, vec4<f32>(beta_load(c)), SILU) * gam;
            a += dxh;
            b += dxh * xh;
            r += dr;
            q += dq;
            let wrap = r >= p.s;
            r = select(r, r - p.s, wrap);
            q = select(q, q + 1u, wrap);
        }
    } else {
        for (var j = 4u * lid; j < p.m; j += 4u * WG) {
            let gam = gamma_load4(c0 + j);
            let xh = (x_load4(base + j) - mu) * rs;
            let dxh = affine_grad(dy_load4(base + j), xh, gam, beta_load4(c0 + j), SILU) * gam;
            a += dxh;
            b += dxh * xh;
        }
    }
    let t = workgroup_sum(lid, vec2<f32>(hsum(a), hsum(b)));
    if (lid == 0u) {
        ab_store(2u * row, t.x);
        ab_store(2u * row + 1u, t.y);
    }
}

//@ entry norm_backward_dx
//@ tensors x:read dy:read gamma:read beta:read mean:read rstd:read ab:read dx:rw
//@ const WG = 64u
//@ const MODE = 0u
//@ const SILU = false
// dx = beta * dx + rstd * (dxhat - a / M - xhat * b / M), four elements per invocation.
struct Params { n: u32, c: u32, s: u32, m: u32, beta: f32 }
@compute @workgroup_size(WG)
fn norm_backward_dx(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_id(gid, nwg, WG) * 4u;
    if (i >= p.n) { return; }
    let ix = index4(i, p.c, p.s, p.m, MODE);
    let mu = vec4<f32>(mean_load(ix.row.x), mean_load(ix.row.y), mean_load(ix.row.z), mean_load(ix.row.w));
    let rs = vec4<f32>(rstd_load(ix.row.x), rstd_load(ix.row.y), rstd_load(ix.row.z), rstd_load(ix.row.w));
    let ar = 2u * ix.row;
    let a = vec4<f32>(ab_load(ar.x), ab_load(ar.y), ab_load(ar.z), ab_load(ar.w));
    let b = vec4<f32>(ab_load(ar.x + 1u), ab_load(ar.y + 1u), ab_load(ar.z + 1u), ab_load(ar.w + 1u));
    let gam = vec4<f32>(gamma_load(ix.ch.x), gamma_load(ix.ch.y), gamma_load(ix.ch.z), gamma_load(ix.ch.w));
    let bet = vec4<f32>(beta_load(ix.ch.x), beta_load(ix.ch.y), beta_load(ix.ch.z), beta_load(ix.ch.w));
    let xh = (x_load4(i) - mu) * rs;
    let dxh = affine_grad(dy_load4(i), xh, gam, bet, SILU) * gam;
    let inv_m = 1.0 / f32(p.m);
    var g = rs * (dxh - a * inv_m - xh * (b * inv_m));
    if (i + 4u <= p.n) {
        if (p.beta != 0.0) { g += dx_load4(i); }
        dx_store4(i, g);
    } else {
        for (var k = 0u; i + k < p.n; k++) {
            var v = g[k];
            if (p.beta != 0.0) { v += dx_load(i + k); }
            dx_store(i + k, v);
        }
    }
}

//@ entry norm_param_partial
//@ tensors x:read dy:read gamma:read beta:read mean:read rstd:read part:write
//@ const WG = 64u
//@ const VEC = false
//@ const SILU = false
// Partial parameter gradients over chunks of `chunk` outer indices, one
// invocation per (chunk k, channel c): part[k C + c] = sum dy' * xhat and
// part[K C + k C + c] = sum dy' over o in chunk k and all s (in order).
struct Params { o: u32, c: u32, s: u32, cg: u32, g: u32, chunk: u32, kc: u32 }
@compute @workgroup_size(WG)
fn norm_param_partial(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let id = flat_id(gid, nwg, WG);
    if (id >= p.kc) { return; }
    let k = id / p.c;
    let c = id % p.c;
    let gam = vec4<f32>(gamma_load(c));
    let bet = vec4<f32>(beta_load(c));
    var ds = vec4<f32>(0.0);
    var db = vec4<f32>(0.0);
    let o_end = min(p.o, (k + 1u) * p.chunk);
    for (var o = k * p.chunk; o < o_end; o++) {
        let row = o * p.g + c / p.cg;
        let mu = mean_load(row);
        let rs = rstd_load(row);
        let base = (o * p.c + c) * p.s;
        if (VEC) {
            for (var j = 0u; j < p.s; j += 4u) {
                let xh = (x_load4(base + j) - mu) * rs;
                let d = affine_grad(dy_load4(base + j), xh, gam, bet, SILU);
                ds += d * xh;
                db += d;
            }
        } else {
            for (var j = 0u; j < p.s; j++) {
                let xh = vec4<f32>((x_load(base + j) - mu) * rs);
                let d = affine_grad(vec4<f32>(dy_load(base + j)), xh, gam, bet, SILU);
                ds.x += d.x * xh.x;
                db.x += d.x;
            }
        }
    }
    part_store(id, hsum(ds));
    part_store(p.kc + id, hsum(db));
}

//@ entry norm_param_reduce
//@ tensors part:read dp:rw
//@ const WG = 64u
// dp[c] = beta * dp[c] + sum_k part[offset + k C + c], summed in order of k.
struct Params { c: u32, k: u32, offset: u32, beta: f32 }
@compute @workgroup_size(WG)
fn norm_param_reduce(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = flat_id(gid, nwg, WG);
    if (c >= p.c) { return; }
    var acc = 0.0;
    for (var k = 0u; k < p.k; k++) { acc += part_load(p.offset + k * p.c + c); }
    if (p.beta != 0.0) { acc += dp_load(c); }
    dp_store(c, acc);
}
