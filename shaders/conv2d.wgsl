// 2-D convolution (PyTorch nn.Conv2d: NCHW, weight [Co, Ci, KH, KW], zero
// padding, dilation 1, groups 1) as implicit GEMM: every kernel gathers its
// operands straight from x / dy / w, no im2col buffer.
//
//   y[n, co, oy, ox] = bias[co] + sum_{ci, ky, kx} w[co, ci, ky, kx] * x[n, ci, oy*SH - ph + ky, ox*SW - pw + kx]
//
// Backward (each writes dst = beta * dst + new):
//   dx[n, ci, iy, ix] = sum_{co, ky, kx} w[co, ci, ky, kx] * dy[n, co, oy, ox]
//                       over the taps with oy*SH = iy + ph - ky, ox*SW = ix + pw - kx
//   dw[co, ci, ky, kx] = sum_{n, oy, ox} dy[n, co, oy, ox] * x[n, ci, oy*SH - ph + ky, ox*SW - pw + kx]
//
// Kernel size and stride are specialization constants so tap loops unroll.
// Every invocation owns a register tile of output channels x (rows x 4
// pixels) kept in vec4 accumulators. The channel block of a workgroup is
// uniform, so weight loads are the same for all its invocations; out-of-range
// coordinates read a clamped address and select 0 instead of branching.
// Reductions run in a fixed order (deterministic).

// Input pixels under 4 output columns SW apart, over all KW taps.
const WIN: u32 = 3u * SW + KW;

// Index of an in-bounds pixel (or 0 when out of range; the caller masks it).
fn pix(row_off: u32, i: i32, extent: u32) -> u32 {
    return row_off + u32(clamp(i, 0, i32(extent) - 1));
}

fn inside(i: i32, extent: u32) -> bool {
    return i >= 0 && i < i32(extent);
}

// Index of w for (output channel c, input channel k, tap ky*KW + kx). The
// data gradient of a stride-1 conv is the conv of dy with w transposed in
// its channels and flipped in space (FLIP): strides w_cs/w_ks swap roles.
fn w_index(c: u32, k: u32, tap: u32, w_cs: u32, w_ks: u32, flip: bool) -> u32 {
    return c * w_cs + k * w_ks + select(tap, KH * KW - 1u - tap, flip);
}

// The 4 pixels SW apart that columns ox0 .. ox0+4 read at tap kx of a window.
fn window4(win: array<f32, WIN>, kx: u32) -> vec4<f32> {
    return vec4<f32>(win[kx], win[SW + kx], win[2u * SW + kx], win[3u * SW + kx]);
}

//@ entry conv2d_forward
//@ tensors x:read w:read bias:read y:rw
//@ const KH = 3u
//@ const KW = 3u
//@ const SH = 1u
//@ const SW = 1u
//@ const TCO = 8u
//@ const TY = 2u
//@ const WG = 8u
//@ const HAS_BIAS = false
//@ const FLIP = false
// One invocation: output channels co0 .. co0+TCO (workgroup z), rows
// oy0 .. oy0+TY and columns ox0 .. ox0+4 of one image. Per input channel it
// loads each input row the tile touches once, as the window of 3*SW + KW
// pixels under its 4 columns, and reuses it for every tap.
struct Params {
    n: u32, ci: u32, h: u32, w: u32,
    co: u32, oh: u32, ow: u32, ph: u32, pw: u32,
    w_cs: u32, w_ks: u32,
    tiles_x: u32, tiles_y: u32,
    beta: f32,
}
const NR: u32 = (TY - 1u) * SH + KH;

@compute @workgroup_size(WG)
fn conv2d_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(workgroup_id) wg: vec3<u32>) {
    let t = flat_id(gid, nwg, WG);
    // Invocations past the end compute on clamped coordinates and store
    // nothing (no early return: the loops stay uniform).
    let live = t / (p.tiles_x * p.tiles_y) < p.n;
    let n = min(t / (p.tiles_x * p.tiles_y), p.n - 1u);
    let ox0 = (t % p.tiles_x) * 4u;
    let oy0 = ((t / p.tiles_x) % p.tiles_y) * TY;
    let co0 = wg.z * TCO;
    var acc: array<vec4<f32>, TCO * TY>;
    if (HAS_BIAS) {
        for (var c = 0u; c < TCO; c++) {
            let b = vec4<f32>(bias_load(min(co0 + c, p.co - 1u)));
            for (var r = 0u; r < TY; r++) { acc[r * TCO + c] = b; }
        }
    }
    let ix0 = i32(ox0 * SW) - i32(p.pw);
    let iy0 = i32(oy0 * SH) - i32(p.ph);
    for (var ci = 0u; ci < p.ci; ci++) {
        let x_img = (n * p.ci + ci) * p.h;
        var win: array<array<f32, WIN>, NR>;
        for (var rr = 0u; rr < NR; rr++) {
            let iy = iy0 + i32(rr);
            let row = (x_img + u32(clamp(iy, 0, i32(p.h) - 1))) * p.w;
            for (var j = 0u; j < WIN; j++) {
                let ix = ix0 + i32(j);
                win[rr][j] = select(0.0, x_load(pix(row, ix, p.w)), inside(iy, p.h) && inside(ix, p.w));
            }
        }
        for (var tap = 0u; tap < KH * KW; tap++) {
            let ky = tap / KW;
            let kx = tap % KW;
            var wv: array<f32, TCO>;
            for (var c = 0u; c < TCO; c++) {
                wv[c] = w_load(w_index(min(co0 + c, p.co - 1u), ci, tap, p.w_cs, p.w_ks, FLIP));
            }
            for (var r = 0u; r < TY; r++) {
                let xv = window4(win[r * SH + ky], kx);
                for (var c = 0u; c < TCO; c++) {
                    acc[r * TCO + c] = fma(vec4<f32>(wv[c]), xv, acc[r * TCO + c]);
                }
            }
        }
    }
    for (var r = 0u; r < TY; r++) {
        for (var c = 0u; c < TCO; c++) {
            if (live && oy0 + r < p.oh && co0 + c < p.co) {
                let idx = ((n * p.co + co0 + c) * p.oh + oy0 + r) * p.ow + ox0;
                var v = acc[r * TCO + c];
                if (ox0 + 4u <= p.ow) {
                    if (p.beta != 0.0) { v += y_load4(idx); }
                    y_store4(idx, v);
                } else {
                    for (var q = 0u; ox0 + q < p.ow; q++) {
                        var o = v[q];
                        if (p.beta != 0.0) { o += y_load(idx + q); }
                        y_store(idx + q, o);
                    }
                }
            }
        }
    }
}

//@ entry conv2d_forward_sg
//@ tensors x:read w:read bias:read y:rw
//@ const KH = 3u
//@ const KW = 3u
//@ const SH = 1u
//@ const SW = 1u
//@ const TCO = 16u
//@ const TY = 2u
//@ const HAS_BIAS = false
//@ const FLIP = false
// conv2d_forward for adapters whose subgroups are exactly 8 wide (llvmpipe,
// where every buffer load is costly): the workgroup is one subgroup, each
// lane loads 1/8 of the tile's weights of an input channel and
// subgroupBroadcast hands them to the others.
struct Params {
    n: u32, ci: u32, h: u32, w: u32,
    co: u32, oh: u32, ow: u32, ph: u32, pw: u32,
    w_cs: u32, w_ks: u32,
    tiles_x: u32, tiles_y: u32,
    beta: f32,
}
const NR: u32 = (TY - 1u) * SH + KH;
const WG: u32 = 8u;
const NW: u32 = TCO * KH * KW;
const NWL: u32 = (NW + 7u) / 8u;

fn lanes8(v: f32) -> array<f32, 8> {
    return array<f32, 8>(subgroupBroadcast(v, 0u), subgroupBroadcast(v, 1u), subgroupBroadcast(v, 2u), subgroupBroadcast(v, 3u),
                         subgroupBroadcast(v, 4u), subgroupBroadcast(v, 5u), subgroupBroadcast(v, 6u), subgroupBroadcast(v, 7u));
}

@compute @workgroup_size(WG)
fn conv2d_forward_sg(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(workgroup_id) wg: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
    let t = flat_id(gid, nwg, WG);
    // Invocations past the end compute on clamped coordinates and store
    // nothing (no early return: the loops stay uniform).
    let live = t / (p.tiles_x * p.tiles_y) < p.n;
    let n = min(t / (p.tiles_x * p.tiles_y), p.n - 1u);
    let ox0 = (t % p.tiles_x) * 4u;
    let oy0 = ((t / p.tiles_x) % p.tiles_y) * TY;
    let co0 = wg.z * TCO;
    var acc: array<vec4<f32>, TCO * TY>;
    if (HAS_BIAS) {
        for (var c = 0u; c < TCO; c++) {
            let b = vec4<f32>(bias_load(min(co0 + c, p.co - 1u)));
            for (var r = 0u; r < TY; r++) { acc[r * TCO + c] = b; }
        }
    }
    let ix0 = i32(ox0 * SW) - i32(p.pw);
    let iy0 = i32(oy0 * SH) - i32(p.ph);
    for (var ci = 0u; ci < p.ci; ci++) {
        let x_img = (n * p.ci + ci) * p.h;
        // Weight m = c * KH*KW + tap of the tile: lane m % 8 loads it.
        var wb: array<f32, NWL * 8u>;
        for (var i = 0u; i < NWL; i++) {
            let m = min(lane + 8u * i, NW - 1u);
            let c = min(co0 + m / (KH * KW), p.co - 1u);
            let l = lanes8(w_load(w_index(c, ci, m % (KH * KW), p.w_cs, p.w_ks, FLIP)));
            for (var j = 0u; j < 8u; j++) { wb[8u * i + j] = l[j]; }
        }
        var win: array<array<f32, WIN>, NR>;
        for (var rr = 0u; rr < NR; rr++) {
            let iy = iy0 + i32(rr);
            let row = (x_img + u32(clamp(iy, 0, i32(p.h) - 1))) * p.w;
            for (var j = 0u; j < WIN; j++) {
                let ix = ix0 + i32(j);
                win[rr][j] = select(0.0, x_load(pix(row, ix, p.w)), inside(iy, p.h) && inside(ix, p.w));
            }
        }
        for (var tap = 0u; tap < KH * KW; tap++) {
            let ky = tap / KW;
            let kx = tap % KW;
            for (var r = 0u; r < TY; r++) {
                let xv = window4(win[r * SH + ky], kx);
                for (var c = 0u; c < TCO; c++) {
                    acc[r * TCO + c] = fma(vec4<f32>(wb[c * KH * KW + tap]), xv, acc[r * TCO + c]);
                }
            }
        }
    }
    for (var r = 0u; r < TY; r++) {
        for (var c = 0u; c < TCO; c++) {
            if (live && oy0 + r < p.oh && co0 + c < p.co) {
                let idx = ((n * p.co + co0 + c) * p.oh + oy0 + r) * p.ow + ox0;
                var v = acc[r * TCO + c];
                if (ox0 + 4u <= p.ow) {
                    if (p.beta != 0.0) { v += y_load4(idx); }
                    y_store4(idx, v);
                } else {
                    for (var q = 0u; ox0 + q < p.ow; q++) {
                        var o = v[q];
                        if (p.beta != 0.0) { o += y_load(idx + q); }
                        y_store(idx + q, o);
                    }
                }
            }
        }
    }
}

//@ entry conv2d_grad_input
//@ tensors dy:read w:read dx:rw
//@ const KH = 3u
//@ const KW = 3u
//@ const SH = 1u
//@ const SW = 1u
//@ const TCI = 8u
//@ const TY = 2u
//@ const WG = 8u
// The transposed convolution. One invocation: input channels ci0 .. ci0+TCI
// (workgroup z), rows iy0 .. iy0+TY and 4 columns ix = phase + SW*(4q + t),
// t < 4, that share ix mod SW, so a tap kx either hits a dy pixel for all 4
// columns (at consecutive ox) or for none. Column tiles are ordered by phase
// so neighbouring invocations take the same taps.
struct Params {
    n: u32, ci: u32, h: u32, w: u32,
    co: u32, oh: u32, ow: u32, ph: u32, pw: u32,
    tiles_x: u32, tiles_y: u32, tiles_per_phase: u32,
    beta: f32,
}

@compute @workgroup_size(WG)
fn conv2d_grad_input(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(workgroup_id) wg: vec3<u32>) {
    let t = flat_id(gid, nwg, WG);
    // Invocations past the end compute on clamped coordinates and store
    // nothing (no early return: the loops stay uniform).
    let live = t / (p.tiles_x * p.tiles_y) < p.n;
    let n = min(t / (p.tiles_x * p.tiles_y), p.n - 1u);
    let tx = t % p.tiles_x;
    let phase = tx / p.tiles_per_phase;
    let q = tx % p.tiles_per_phase;
    let iy0 = ((t / p.tiles_x) % p.tiles_y) * TY;
    let ci0 = wg.z * TCI;
    let khw = KH * KW;
    var w_off: array<u32, TCI>;
    for (var c = 0u; c < TCI; c++) { w_off[c] = min(ci0 + c, p.ci - 1u) * khw; }
    var acc: array<vec4<f32>, TCI * TY>;
    // ox of column t for tap kx is (phase + pw - kx) / SW + 4q + t when SW divides it.
    let base_x = i32(phase + p.pw);
    for (var co = 0u; co < p.co; co++) {
        let dy_img = (n * p.co + co) * p.oh;
        let w_co = co * p.ci * khw;
        for (var ky = 0u; ky < KH; ky++) {
            var wv: array<array<f32, KW>, TCI>;
            for (var c = 0u; c < TCI; c++) {
                for (var kx = 0u; kx < KW; kx++) { wv[c][kx] = w_load(w_co + w_off[c] + ky * KW + kx); }
            }
            for (var r = 0u; r < TY; r++) {
                let num_y = i32(iy0 + r + p.ph) - i32(ky);
                let oy = num_y / i32(SH);
                let row_ok = num_y >= 0 && num_y % i32(SH) == 0 && oy < i32(p.oh);
                let row = (dy_img + u32(clamp(oy, 0, i32(p.oh) - 1))) * p.ow;
                for (var kx = 0u; kx < KW; kx++) {
                    let num_x = base_x - i32(kx);
                    if (num_x % i32(SW) != 0) { continue; }
                    let lo = num_x / i32(SW) + i32(4u * q);
                    var dv: vec4<f32>;
                    for (var j = 0u; j < 4u; j++) {
                        let ox = lo + i32(j);
                        dv[j] = select(0.0, dy_load(pix(row, ox, p.ow)), row_ok && inside(ox, p.ow));
                    }
                    for (var c = 0u; c < TCI; c++) {
                        acc[r * TCI + c] = fma(vec4<f32>(wv[c][kx]), dv, acc[r * TCI + c]);
                    }
                }
            }
        }
    }
    for (var r = 0u; r < TY; r++) {
        let iy = iy0 + r;
        for (var c = 0u; c < TCI; c++) {
            let ci = ci0 + c;
            if (live && iy < p.h && ci < p.ci) {
                let row = ((n * p.ci + ci) * p.h + iy) * p.w;
                let v = acc[r * TCI + c];
                for (var j = 0u; j < 4u; j++) {
                    let ix = phase + SW * (4u * q + j);
                    if (ix < p.w) {
                        var o = v[j];
                        if (p.beta != 0.0) { o += dx_load(row + ix); }
                        dx_store(row + ix, o);
                    }
                }
            }
        }
    }
}

//@ entry conv2d_grad_weight
//@ tensors x:read dy:read dw:rw
//@ const KH = 3u
//@ const KW = 3u
//@ const SH = 1u
//@ const SW = 1u
//@ const TCO = 8u
//@ const WG = 8u
// A GEMM of dy [Co x (N*OH*OW)] with the implicit im2col of x. One
// invocation: input channel ci (the invocation index) x output channels
// co0 .. co0+TCO (workgroup y) x every tap, summed over n, oy and ox in
// chunks of 4 (one vec4 accumulator lane per ox mod 4, added at the end).
struct Params {
    n: u32, ci: u32, h: u32, w: u32,
    co: u32, oh: u32, ow: u32, ph: u32, pw: u32,
    beta: f32,
}

@compute @workgroup_size(WG)
fn conv2d_grad_weight(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wg: vec3<u32>) {
    let live = gid.x < p.ci;
    let ci = min(gid.x, p.ci - 1u);
    let co0 = wg.y * TCO;
    let khw = KH * KW;
    var acc: array<vec4<f32>, TCO * KH * KW>;
    for (var n = 0u; n < p.n; n++) {
        let x_img = (n * p.ci + ci) * p.h;
        for (var oy = 0u; oy < p.oh; oy++) {
            for (var ox0 = 0u; ox0 < p.ow; ox0 += 4u) {
                var dv: array<vec4<f32>, TCO>;
                for (var c = 0u; c < TCO; c++) {
                    let idx = ((n * p.co + min(co0 + c, p.co - 1u)) * p.oh + oy) * p.ow + ox0;
                    if (ox0 + 4u <= p.ow) {
                        dv[c] = dy_load4(idx);
                    } else {
                        for (var j = 0u; j < 4u; j++) {
                            dv[c][j] = select(0.0, dy_load(idx + min(j, p.ow - 1u - ox0)), ox0 + j < p.ow);
                        }
                    }
                }
                let ix0 = i32(ox0 * SW) - i32(p.pw);
                for (var ky = 0u; ky < KH; ky++) {
                    let iy = i32(oy * SH + ky) - i32(p.ph);
                    let row = (x_img + u32(clamp(iy, 0, i32(p.h) - 1))) * p.w;
                    let row_ok = inside(iy, p.h);
                    var win: array<f32, WIN>;
                    for (var j = 0u; j < WIN; j++) {
                        let ix = ix0 + i32(j);
                        win[j] = select(0.0, x_load(pix(row, ix, p.w)), row_ok && inside(ix, p.w));
                    }
                    for (var kx = 0u; kx < KW; kx++) {
                        let xv = vec4<f32>(win[kx], win[SW + kx], win[2u * SW + kx], win[3u * SW + kx]);
                        for (var c = 0u; c < TCO; c++) {
                            let a = (c * KH + ky) * KW + kx;
                            acc[a] = fma(dv[c], xv, acc[a]);
                        }
                    }
                }
            }
        }
    }
    for (var c = 0u; c < TCO; c++) {
        let co = co0 + c;
        if (live && co < p.co) {
            for (var k = 0u; k < khw; k++) {
                let idx = (co * p.ci + ci) * khw + k;
                var v = dot(acc[c * khw + k], vec4<f32>(1.0));
                if (p.beta != 0.0) { v += dw_load(idx); }
                dw_store(idx, v);
            }
        }
    }
}
