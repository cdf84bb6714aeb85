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
// oy0 .. oy0+TY and columns ox0 .. ox0+4 of one image. Per input channel and
// kernel row it loads for each output row the window of 3*SW + KW input
// pixels under its 4 columns and reuses it for every kx.
struct Params {
    n: u32, ci: u32, h: u32, w: u32,
    co: u32, oh: u32, ow: u32, ph: u32, pw: u32,
    w_cs: u32, w_ks: u32,
    tiles_x: u32, tiles_y: u32,
    beta: f32,
}

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
        for (var ky = 0u; ky < KH; ky++) {
            var win: array<array<f32, WIN>, TY>;
            for (var r = 0u; r < TY; r++) {
                let iy = iy0 + i32(r * SH + ky);
                let row = (x_img + u32(clamp(iy, 0, i32(p.h) - 1))) * p.w;
                for (var j = 0u; j < WIN; j++) {
                    let ix = ix0 + i32(j);
                    win[r][j] = select(0.0, x_load(pix(row, ix, p.w)), inside(iy, p.h) && inside(ix, p.w));
                }
            }
            for (var kx = 0u; kx < KW; kx++) {
                var wv: array<f32, TCO>;
                for (var c = 0u; c < TCO; c++) {
                    wv[c] = w_load(w_index(min(co0 + c, p.co - 1u), ci, ky * KW + kx, p.w_cs, p.w_ks, FLIP));
                }
                for (var r = 0u; r < TY; r++) {
                    let xv = window4(win[r], kx);
                    for (var c = 0u; c < TCO; c++) {
                        acc[r * TCO + c] = fma(vec4<f32>(wv[c]), xv, acc[r * TCO + c]);
                    }
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
//@ const HAS_BIAS = false
//@ const FLIP = false
// conv2d_forward for adapters whose subgroups are exactly 8 wide (llvmpipe).
// The workgroup is one subgroup; a lane owns 16 output channels x 4 columns
// of one output row. Per tap, lane l loads the weights of channels l and
// 8 + l and subgroupBroadcast hands them to the others (2 loads instead of
// 16). Accumulators are four named mat4x4 (column = pixel, row = channel):
// llvmpipe keeps those in registers, while arrays indexed in loops spill to
// slow scratch memory.
struct Params {
    n: u32, ci: u32, h: u32, w: u32,
    co: u32, oh: u32, ow: u32, ph: u32, pw: u32,
    w_cs: u32, w_ks: u32,
    tiles_x: u32, tiles_y: u32,
    beta: f32,
}
const WG: u32 = 8u;

// Lanes 0..3 and 4..7 of v.
fn lo4(v: f32) -> vec4<f32> {
    return vec4<f32>(subgroupBroadcast(v, 0u), subgroupBroadcast(v, 1u), subgroupBroadcast(v, 2u), subgroupBroadcast(v, 3u));
}
fn hi4(v: f32) -> vec4<f32> {
    return vec4<f32>(subgroupBroadcast(v, 4u), subgroupBroadcast(v, 5u), subgroupBroadcast(v, 6u), subgroupBroadcast(v, 7u));
}

// a + w x^T: channels w (rows) times pixels x (columns).
fn outer_fma(a: mat4x4<f32>, w: vec4<f32>, x: vec4<f32>) -> mat4x4<f32> {
    return mat4x4<f32>(fma(w, vec4<f32>(x.x), a[0]), fma(w, vec4<f32>(x.y), a[1]),
                       fma(w, vec4<f32>(x.z), a[2]), fma(w, vec4<f32>(x.w), a[3]));
}

fn bias4(co: u32) -> mat4x4<f32> {
    var b = vec4<f32>(0.0);
    if (HAS_BIAS) {
        b = vec4<f32>(bias_load(min(co, p.co - 1u)), bias_load(min(co + 1u, p.co - 1u)),
                      bias_load(min(co + 2u, p.co - 1u)), bias_load(min(co + 3u, p.co - 1u)));
    }
    return mat4x4<f32>(b, b, b, b);
}

// y rows of channels co .. co+4 at (n, oy, ox0 .. ox0+4) = beta * y + a.
fn store4x4(a: mat4x4<f32>, live: bool, n: u32, co: u32, oy: u32, ox0: u32) {
    for (var i = 0u; i < 4u; i++) {
        if (live && oy < p.oh && co + i < p.co) {
            let idx = ((n * p.co + co + i) * p.oh + oy) * p.ow + ox0;
            var v = vec4<f32>(a[0][i], a[1][i], a[2][i], a[3][i]);
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

@compute @workgroup_size(WG)
fn conv2d_forward_sg(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(workgroup_id) wg: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
    let t = flat_id(gid, nwg, WG);
    // No early return: every lane of the subgroup must take part in broadcasts.
    let live = t / (p.tiles_x * p.tiles_y) < p.n;
    let n = min(t / (p.tiles_x * p.tiles_y), p.n - 1u);
    let ox0 = (t % p.tiles_x) * 4u;
    let oy = (t / p.tiles_x) % p.tiles_y;
    let co0 = wg.z * 16u;
    let c_lo = min(co0 + lane, p.co - 1u);
    let c_hi = min(co0 + 8u + lane, p.co - 1u);
    var a0 = bias4(co0);
    var a1 = bias4(co0 + 4u);
    var a2 = bias4(co0 + 8u);
    var a3 = bias4(co0 + 12u);
    let ix0 = i32(ox0 * SW) - i32(p.pw);
    for (var ci = 0u; ci < p.ci; ci++) {
        let x_img = (n * p.ci + ci) * p.h;
        for (var ky = 0u; ky < KH; ky++) {
            let iy = i32(oy * SH + ky) - i32(p.ph);
            let row = (x_img + u32(clamp(iy, 0, i32(p.h) - 1))) * p.w;
            var win: array<f32, WIN>;
            for (var j = 0u; j < WIN; j++) {
                let ix = ix0 + i32(j);
                win[j] = select(0.0, x_load(pix(row, ix, p.w)), inside(iy, p.h) && inside(ix, p.w));
            }
            for (var kx = 0u; kx < KW; kx++) {
                let tap = ky * KW + kx;
                let v0 = w_load(w_index(c_lo, ci, tap, p.w_cs, p.w_ks, FLIP));
                let v1 = w_load(w_index(c_hi, ci, tap, p.w_cs, p.w_ks, FLIP));
                let xv = window4(win, kx);
                a0 = outer_fma(a0, lo4(v0), xv);
                a1 = outer_fma(a1, hi4(v0), xv);
                a2 = outer_fma(a2, lo4(v1), xv);
                a3 = outer_fma(a3, hi4(v1), xv);
            }
        }
    }
    store4x4(a0, live, n, co0, oy, ox0);
    store4x4(a1, live, n, co0 + 4u, oy, ox0);
    store4x4(a2, live, n, co0 + 8u, oy, ox0);
    store4x4(a3, live, n, co0 + 12u, oy, ox0);
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
// The transposed convolution for stride > 1 (stride 1 runs conv2d_forward
// with FLIP on dy instead). One invocation: input channels ci0 .. ci0+TCI
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
