// 2-D convolution (PyTorch nn.Conv2d: NCHW, weight [Co, Ci, KH, KW], zero
// padding, dilation 1, groups 1) as implicit GEMM: every kernel gathers its
// operands straight from x / dy / w, no im2col buffer.
//
//   y[n, co, oy, ox] = bias[co] (+ res[n, co, oy, ox]) + sum_{ci, ky, kx} w[co, ci, ky, kx] * x[n, ci, oy*SH - ph + ky, ox*SW - pw + kx]
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

// Weight gradient: taps per launch along a kernel row, and the x window
// under 4 output columns.
const KXS: u32 = min(KW, 3u);
const XWIN: u32 = 3u * SW + KXS;

// The weight gradient's register tile: a<q><k> holds output channels
// 4q .. 4q+4 (columns) at tap kx0 + k, per ox mod 4 (rows, summed at the
// end). Named matrices stay in registers; arrays indexed in loops spill.
struct DwAcc {
    a00: mat4x4<f32>, a01: mat4x4<f32>, a02: mat4x4<f32>,
    a10: mat4x4<f32>, a11: mat4x4<f32>, a12: mat4x4<f32>,
    a20: mat4x4<f32>, a21: mat4x4<f32>, a22: mat4x4<f32>,
    a30: mat4x4<f32>, a31: mat4x4<f32>, a32: mat4x4<f32>,
}

// The 4 window pixels SW apart under tap kx0 + kx (clamped index: taps past
// KXS are compiled out, but their indices must stay in range).
fn xwin4(win: array<f32, XWIN>, kx: u32) -> vec4<f32> {
    let i = vec4<u32>(kx) + vec4<u32>(0u, SW, 2u * SW, 3u * SW);
    return vec4<f32>(win[min(i.x, XWIN - 1u)], win[min(i.y, XWIN - 1u)], win[min(i.z, XWIN - 1u)], win[min(i.w, XWIN - 1u)]);
}

// a + d * diag(x) column by column: channel c gains dy_c * x per pixel.
fn col_fma(a: mat4x4<f32>, d: mat4x4<f32>, x: vec4<f32>) -> mat4x4<f32> {
    return mat4x4<f32>(fma(d[0], x, a[0]), fma(d[1], x, a[1]), fma(d[2], x, a[2]), fma(d[3], x, a[3]));
}

// One step of 4 output columns: dy of the 16 channels (d0 .. d3, column =
// channel) times the x window of each tap.
fn dw_step(a: DwAcc, d0: mat4x4<f32>, d1: mat4x4<f32>, d2: mat4x4<f32>, d3: mat4x4<f32>,
           win: array<f32, XWIN>) -> DwAcc {
    var r = a;
    let x0 = xwin4(win, 0u);
    r.a00 = col_fma(r.a00, d0, x0); r.a10 = col_fma(r.a10, d1, x0);
    r.a20 = col_fma(r.a20, d2, x0); r.a30 = col_fma(r.a30, d3, x0);
    if (KXS > 1u) {
        let x1 = xwin4(win, 1u);
        r.a01 = col_fma(r.a01, d0, x1); r.a11 = col_fma(r.a11, d1, x1);
        r.a21 = col_fma(r.a21, d2, x1); r.a31 = col_fma(r.a31, d3, x1);
    }
    if (KXS > 2u) {
        let x2 = xwin4(win, 2u);
        r.a02 = col_fma(r.a02, d0, x2); r.a12 = col_fma(r.a12, d1, x2);
        r.a22 = col_fma(r.a22, d2, x2); r.a32 = col_fma(r.a32, d3, x2);
    }
    return r;
}

// The sums over ox mod 4 of a<q><k> (q, k constant after unrolling).
fn dw_sums(a: DwAcc, q: u32, k: u32) -> vec4<f32> {
    var m = mat4x4<f32>();
    switch (q * 3u + k) {
        case 0u: { m = a.a00; } case 1u: { m = a.a01; } case 2u: { m = a.a02; }
        case 3u: { m = a.a10; } case 4u: { m = a.a11; } case 5u: { m = a.a12; }
        case 6u: { m = a.a20; } case 7u: { m = a.a21; } case 8u: { m = a.a22; }
        case 9u: { m = a.a30; } case 10u: { m = a.a31; } default: { m = a.a32; }
    }
    return vec4<f32>(1.0) * m;
}

//@ helpers store_pixels
// y[idx .. idx + 4] (pixels ox0 .. ox0 + 4 of an output row) = v (+ y with
// ACC_Y) (+ res with HAS_RES), the pixels past the row's end skipped.
// VEC_Y (ow a multiple of 4): a whole vector, one access per tensor. Both are
// constants: llvmpipe executes every side of a branch it cannot prove
// uniform, so a runtime test would pay for the scalar path too.
fn store_pixels4(v: vec4<f32>, idx: u32, ox0: u32) {
    if (VEC_Y) {
        var o = v;
        if (ACC_Y) { o += y_load4(idx); }
        if (HAS_RES) { o += res_load4(idx); }
        y_store4(idx, o);
        return;
    }
    for (var q = 0u; q < 4u && ox0 + q < p.ow; q++) {
        var o = v[q];
        if (ACC_Y) { o += y_load(idx + q); }
        if (HAS_RES) { o += res_load(idx + q); }
        y_store(idx + q, o);
    }
}

//@ entry conv2d_forward
//@ tensors x:read w:read bias:read res:read4 y:rw4
//@ const ACC_Y = false
//@ const VEC_Y = false
//@ use store_pixels
//@ const KH = 3u
//@ const KW = 3u
//@ const SH = 1u
//@ const SW = 1u
//@ const TCO = 8u
//@ const TY = 2u
//@ const WG = 8u
//@ const HAS_BIAS = false
//@ const HAS_RES = false
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
    var acc = array<vec4<f32>, TCO * TY>();
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
            var win = array<array<f32, WIN>, TY>();
            for (var r = 0u; r < TY; r++) {
                let iy = iy0 + i32(r * SH + ky);
                let row = (x_img + u32(clamp(iy, 0, i32(p.h) - 1))) * p.w;
                for (var j = 0u; j < WIN; j++) {
                    let ix = ix0 + i32(j);
                    win[r][j] = select(0.0, x_load(pix(row, ix, p.w)), inside(iy, p.h) && inside(ix, p.w));
                }
            }
            for (var kx = 0u; kx < KW; kx++) {
                var wv = array<f32, TCO>();
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
                store_pixels4(acc[r * TCO + c], idx, ox0);
            }
        }
    }
}

//@ entry conv2d_forward_sg
//@ tensors x:read4 w:read bias:read res:read4 y:rw4
//@ const ACC_Y = false
//@ const VEC_Y = false
//@ const VEC_X = false
//@ use store_pixels
//@ const KH = 3u
//@ const KW = 3u
//@ const SH = 1u
//@ const SW = 1u
//@ const HAS_BIAS = false
//@ const HAS_RES = false
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

// y rows of channels co .. co+4 at (n, oy, ox0 .. ox0+4) (+ y with ACC_Y) + a.
fn store4x4(a: mat4x4<f32>, live: bool, n: u32, co: u32, oy: u32, ox0: u32) {
    for (var i = 0u; i < 4u; i++) {
        if (live && oy < p.oh && co + i < p.co) {
            let idx = ((n * p.co + co + i) * p.oh + oy) * p.ow + ox0;
            store_pixels4(vec4<f32>(a[0][i], a[1][i], a[2][i], a[3][i]), idx, ox0);
        }
    }
}

// VEC_X (stride 1, rows a multiple of 4 wide, and 1-wide taps without
// padding or 3-wide ones with padding 1): the window of row `row` is this
// lane's 4 pixels, one vector load, and for 3-wide taps the pixels left and
// right of them: the last of the lane to the left and the first of the lane
// to the right (neighbouring lanes hold neighbouring tiles of a row), one
// scalar load at the subgroup's two ends, zero at the row's ends. 2 loads
// instead of 6.
fn vector_window(row: u32, ox0: u32, lane: u32, row_inside: bool) -> array<f32, WIN> {
    let mid = select(vec4<f32>(0.0), x_load4(row + ox0), row_inside);
    // (Indices clamped to WIN - 1: the function is compiled for every WIN.)
    var win = array<f32, WIN>();
    if (KW == 1u) {
        win[0] = mid.x; win[1] = mid.y; win[2] = mid.z; win[3] = mid.w;
        return win;
    }
    let edge_ix = select(ox0 + 4u, ox0 - 1u, lane == 0u);
    let edge = x_load(row + min(edge_ix, p.w - 1u));
    let left = select(subgroupShuffleUp(mid.w, 1u), edge, lane == 0u);
    let right = select(subgroupShuffleDown(mid.x, 1u), edge, lane == WG - 1u);
    win[0] = select(0.0, left, ox0 > 0u && row_inside);
    win[1] = mid.x; win[2] = mid.y; win[3] = mid.z;
    win[min(4u, WIN - 1u)] = mid.w;
    win[min(5u, WIN - 1u)] = select(0.0, right, ox0 + 4u < p.w && row_inside);
    return win;
}

@compute @workgroup_size(WG)
fn conv2d_forward_sg(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(workgroup_id) wg: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
    // The tile follows the subgroup lane (the workgroup is one subgroup), so
    // lane l - 1 holds the tile left of lane l's.
    let t = flat_id(gid, nwg, WG) - gid.x % WG + lane;
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
            var win = array<f32, WIN>();
            if (VEC_X) {
                win = vector_window(row, ox0, lane, inside(iy, p.h));
            } else {
                for (var j = 0u; j < WIN; j++) {
                    let ix = ix0 + i32(j);
                    win[j] = select(0.0, x_load(pix(row, ix, p.w)), inside(iy, p.h) && inside(ix, p.w));
                }
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

//@ entry conv2d_dilate
//@ tensors dy:read dyd:write
//@ const KH = 3u
//@ const KW = 3u
//@ const SH = 1u
//@ const SW = 1u
// The data gradient of a strided conv is the stride-1 data gradient of dy
// spread onto the stride-1 grid: dyd[plane, y, x] = dy[plane, y / SH, x / SW]
// where SH divides y and SW divides x, zero elsewhere (rows and columns past
// the last dy one included).
struct Params { total: u32, oh: u32, ow: u32, hd: u32, wd: u32 }
const DILATE_WG: u32 = 64u;

@compute @workgroup_size(DILATE_WG)
fn conv2d_dilate(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_id(gid, nwg, DILATE_WG);
    if (i >= p.total) { return; }
    let x = i % p.wd;
    let y = (i / p.wd) % p.hd;
    let plane = i / (p.wd * p.hd);
    let oy = y / SH;
    let ox = x / SW;
    let hit = y % SH == 0u && x % SW == 0u && oy < p.oh && ox < p.ow;
    let src = (plane * p.oh + min(oy, p.oh - 1u)) * p.ow + min(ox, p.ow - 1u);
    dyd_store(i, select(0.0, dy_load(src), hit));
}

//@ helpers grad_weight_common
// Shared by both weight-gradient entries.
struct Params {
    n: u32, ci: u32, h: u32, w: u32,
    co: u32, oh: u32, ow: u32, ph: u32, pw: u32,
    chunks: u32, rows_per_chunk: u32, chunk_stride: u32,
    db_beta: f32,
}

// HAS_DB (one chunk only): the bias gradient db[co] = db_beta * db[co] +
// sum_{n, oy, ox} dy[n, co, oy, ox] comes from the dy loads of the
// workgroups at tap (0, 0) of the first input-channel block.
fn store_db(co: u32, v: f32) {
    if (co < p.co) {
        var o = v;
        if (p.db_beta != 0.0) { o += db_load(co); }
        db_store(co, o);
    }
}

// dy of one channel row at columns ox0 .. ox0+4 (zero past the edge;
// ox0 < OW): with VEC_DY (OW a multiple of 4) one vector load. No branch:
// llvmpipe runs both sides of every `if` it cannot prove uniform.
fn dy4(row: u32, ox0: u32) -> vec4<f32> {
    if (VEC_DY) { return dy_load4(row + ox0); }
    let last = row + p.ow - 1u;
    return vec4<f32>(dy_load(min(row + ox0, last)),
                     select(0.0, dy_load(min(row + ox0 + 1u, last)), ox0 + 1u < p.ow),
                     select(0.0, dy_load(min(row + ox0 + 2u, last)), ox0 + 2u < p.ow),
                     select(0.0, dy_load(min(row + ox0 + 3u, last)), ox0 + 3u < p.ow));
}

// Chunk z of the output rows r = n * OH + oy: (first row, end).
fn chunk_rows(chunk: u32) -> vec2<u32> {
    let r = chunk * p.rows_per_chunk;
    return vec2<u32>(r, min(r + p.rows_per_chunk, p.n * p.oh));
}

// x window of channel plane x_img for output row oy at tap row ky, columns
// ox0 .. ox0+4 from tap kx0 on (zero in the padding).
fn x_window(x_img: u32, oy: u32, ky: u32, ox0: u32, kx0: u32) -> array<f32, XWIN> {
    let iy = i32(oy * SH + ky) - i32(p.ph);
    let row = (x_img + u32(clamp(iy, 0, i32(p.h) - 1))) * p.w;
    let ix0 = i32(ox0 * SW + kx0) - i32(p.pw);
    var win = array<f32, XWIN>();
    for (var j = 0u; j < XWIN; j++) {
        let ix = ix0 + i32(j);
        win[j] = select(0.0, x_load(pix(row, ix, p.w)), inside(iy, p.h) && inside(ix, p.w));
    }
    return win;
}

// dw[chunk part] of channels co0 .. co0+16 x taps (ky, kx0 ..) = a's sums (+ dw with ACC_DW).
fn store_dw(a: DwAcc, live: bool, ci: u32, co0: u32, ky: u32, kx0: u32, chunk: u32) {
    for (var q = 0u; q < 4u; q++) {
        for (var k = 0u; k < KXS; k++) {
            let v = dw_sums(a, q, k);
            for (var c = 0u; c < 4u; c++) {
                let co = co0 + 4u * q + c;
                if (live && kx0 + k < KW && co < p.co) {
                    let idx = chunk * p.chunk_stride + ((co * p.ci + ci) * KH + ky) * KW + kx0 + k;
                    var o = v[c];
                    if (ACC_DW) { o += dw_load(idx); }
                    dw_store(idx, o);
                }
            }
        }
    }
}

//@ entry conv2d_grad_weight
//@ tensors x:read dy:read4 dw:rw db:rw
//@ const VEC_DY = false
//@ const ACC_DW = false
//@ const KH = 3u
//@ const KW = 3u
//@ const SH = 1u
//@ const SW = 1u
//@ const WG = 8u
//@ const HAS_DB = false
//@ use grad_weight_common
// A GEMM of dy [Co x (N*OH*OW)] with the implicit im2col of x. One
// invocation: input channel ci (the invocation index) x output channels
// co0 .. co0+16 (workgroup y) x taps (ky, kx0 .. kx0+3) of one kernel row,
// summed over the output rows of one chunk, 4 columns at a time (DwAcc).
// Workgroup z enumerates (ky, kx0 / 3, chunk). dy addresses are the same for
// the whole workgroup (one load serves every input channel on a GPU). Chunk
// z writes dw[chunk * p.chunk_stride + i] = partial (+ dw with ACC_DW); with several
// chunks dw is a scratch buffer summed in chunk order afterwards.

@compute @workgroup_size(WG)
fn conv2d_grad_weight(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wg: vec3<u32>) {
    let live = gid.x < p.ci;
    let ci = min(gid.x, p.ci - 1u);
    let co0 = wg.y * 16u;
    let chunk = wg.z % p.chunks;
    let kx_chunks = (KW + KXS - 1u) / KXS;
    let ky = wg.z / p.chunks / kx_chunks;
    let kx0 = (wg.z / p.chunks % kx_chunks) * KXS;
    let c4 = vec4<u32>(co0) + vec4<u32>(0u, 1u, 2u, 3u);
    let last = vec4<u32>(p.co - 1u);
    let co_0 = min(c4, last);
    let co_1 = min(c4 + 4u, last);
    let co_2 = min(c4 + 8u, last);
    let co_3 = min(c4 + 12u, last);
    var a = DwAcc();
    // HAS_DB: per-channel sums of dy, channels co0 + 4q .. co0 + 4q + 4.
    var s0 = vec4<f32>();
    var s1 = vec4<f32>();
    var s2 = vec4<f32>();
    var s3 = vec4<f32>();
    let rows = chunk_rows(chunk);
    var n = rows.x / p.oh;
    var oy = rows.x % p.oh;
    for (var r = rows.x; r < rows.y; r++) {
        let x_img = (n * p.ci + ci) * p.h;
        let dy_img = n * p.co;
        let r0 = ((dy_img + co_0) * p.oh + oy) * p.ow;
        let r1 = ((dy_img + co_1) * p.oh + oy) * p.ow;
        let r2 = ((dy_img + co_2) * p.oh + oy) * p.ow;
        let r3 = ((dy_img + co_3) * p.oh + oy) * p.ow;
        for (var ox0 = 0u; ox0 < p.ow; ox0 += 4u) {
            let d0 = mat4x4<f32>(dy4(r0.x, ox0), dy4(r0.y, ox0), dy4(r0.z, ox0), dy4(r0.w, ox0));
            let d1 = mat4x4<f32>(dy4(r1.x, ox0), dy4(r1.y, ox0), dy4(r1.z, ox0), dy4(r1.w, ox0));
            let d2 = mat4x4<f32>(dy4(r2.x, ox0), dy4(r2.y, ox0), dy4(r2.z, ox0), dy4(r2.w, ox0));
            let d3 = mat4x4<f32>(dy4(r3.x, ox0), dy4(r3.y, ox0), dy4(r3.z, ox0), dy4(r3.w, ox0));
            a = dw_step(a, d0, d1, d2, d3, x_window(x_img, oy, ky, ox0, kx0));
            if (HAS_DB) {
                let ones = vec4<f32>(1.0);
                s0 += ones * d0;
                s1 += ones * d1;
                s2 += ones * d2;
                s3 += ones * d3;
            }
        }
        // Next row without a branch (llvmpipe runs both sides of an `if`).
        let wrap = oy + 1u == p.oh;
        oy = select(oy + 1u, 0u, wrap);
        n = select(n, n + 1u, wrap);
    }
    store_dw(a, live, ci, co0, ky, kx0, chunk);
    if (HAS_DB && gid.x == 0u && wg.z == 0u) {
        for (var c = 0u; c < 4u; c++) {
            store_db(co0 + c, s0[c]);
            store_db(co0 + 4u + c, s1[c]);
            store_db(co0 + 8u + c, s2[c]);
            store_db(co0 + 12u + c, s3[c]);
        }
    }
}

//@ entry conv2d_grad_weight_sg
//@ tensors x:read4 dy:read4 dw:rw db:rw
//@ const VEC_DY = false
//@ const VEC_X = false
//@ const ACC_DW = false
//@ const KH = 3u
//@ const KW = 3u
//@ const SH = 1u
//@ const SW = 1u
//@ const HAS_DB = false
//@ use grad_weight_common
// conv2d_grad_weight for adapters whose subgroups are exactly 8 wide
// (llvmpipe, where every load costs a per-lane gather). Lane l owns input
// channels ci0 + l and ci0 + 8 + l (ci0 = 16 x workgroup x), output channels
// co0 .. co0+16 and the taps (ky, kx0 ..). Per 4 output columns it loads the
// dy of channels co0 + l and co0 + 8 + l, and subgroupBroadcast hands them to
// the others (2 loads per lane instead of 16). The sum over the 4 columns
// happens in the FMAs: each (input channel, tap) keeps one vec4 per 4 output
// channels, so two input channels fit in the registers one did before.
const WG: u32 = 8u;

// t[j] = dy of 4 output channels (lanes l0 .. l0+4) at column j.
fn lanes_lo(v: vec4<f32>) -> mat4x4<f32> {
    return transpose(mat4x4<f32>(subgroupBroadcast(v, 0u), subgroupBroadcast(v, 1u), subgroupBroadcast(v, 2u), subgroupBroadcast(v, 3u)));
}
fn lanes_hi(v: vec4<f32>) -> mat4x4<f32> {
    return transpose(mat4x4<f32>(subgroupBroadcast(v, 4u), subgroupBroadcast(v, 5u), subgroupBroadcast(v, 6u), subgroupBroadcast(v, 7u)));
}

// dy of the 16 output channels at 4 columns: t<q> holds channels 4q .. 4q+4.
struct Dy16 { t0: mat4x4<f32>, t1: mat4x4<f32>, t2: mat4x4<f32>, t3: mat4x4<f32> }

// Sums of one (input channel, tap) over 16 output channels, 4 per vector.
struct Quad { q0: vec4<f32>, q1: vec4<f32>, q2: vec4<f32>, q3: vec4<f32> }

// a + sum_j x[j] t[j]: 4 channels gain their dy times x over 4 columns.
fn cols_fma(a: vec4<f32>, t: mat4x4<f32>, x: vec4<f32>) -> vec4<f32> {
    return fma(vec4<f32>(x.w), t[3], fma(vec4<f32>(x.z), t[2], fma(vec4<f32>(x.y), t[1], fma(vec4<f32>(x.x), t[0], a))));
}

fn quad_fma(a: Quad, d: Dy16, x: vec4<f32>) -> Quad {
    return Quad(cols_fma(a.q0, d.t0, x), cols_fma(a.q1, d.t1, x), cols_fma(a.q2, d.t2, x), cols_fma(a.q3, d.t3, x));
}

// The register tile: i<i>k<k> is input channel i (lo, hi) at tap kx0 + k.
struct SgAcc { i0k0: Quad, i0k1: Quad, i0k2: Quad, i1k0: Quad, i1k1: Quad, i1k2: Quad }

fn sg_step(a: SgAcc, d: Dy16, lo: array<f32, XWIN>, hi: array<f32, XWIN>) -> SgAcc {
    var r = a;
    r.i0k0 = quad_fma(r.i0k0, d, xwin4(lo, 0u));
    r.i1k0 = quad_fma(r.i1k0, d, xwin4(hi, 0u));
    if (KXS > 1u) {
        r.i0k1 = quad_fma(r.i0k1, d, xwin4(lo, 1u));
        r.i1k1 = quad_fma(r.i1k1, d, xwin4(hi, 1u));
    }
    if (KXS > 2u) {
        r.i0k2 = quad_fma(r.i0k2, d, xwin4(lo, 2u));
        r.i1k2 = quad_fma(r.i1k2, d, xwin4(hi, 2u));
    }
    return r;
}

// VEC_X (stride 1, input rows as wide as output rows and a multiple of 4,
// 1-wide taps without padding or 3-wide ones with padding 1, so kx0 = 0):
// the window of columns ox0 .. ox0+4 is one vector load and, for 3-wide
// taps, the pixels on either side. Otherwise element loads (x_window).
fn x_window_sg(x_img: u32, oy: u32, ky: u32, ox0: u32, kx0: u32) -> array<f32, XWIN> {
    if (!VEC_X) { return x_window(x_img, oy, ky, ox0, kx0); }
    let iy = i32(oy * SH + ky) - i32(p.ph);
    let row_inside = inside(iy, p.h);
    let row = (x_img + u32(clamp(iy, 0, i32(p.h) - 1))) * p.w;
    let mid = select(vec4<f32>(0.0), x_load4(row + ox0), row_inside);
    // (Indices clamped to XWIN - 1: the function is compiled for every XWIN.)
    var win = array<f32, XWIN>();
    if (KW == 1u) {
        win[0] = mid.x; win[1] = mid.y; win[2] = mid.z; win[3] = mid.w;
        return win;
    }
    win[0] = select(0.0, x_load(row + select(ox0, ox0 - 1u, ox0 > 0u)), ox0 > 0u && row_inside);
    win[1] = mid.x; win[2] = mid.y; win[3] = mid.z;
    win[min(4u, XWIN - 1u)] = mid.w;
    let right = ox0 + 4u < p.w;
    win[min(5u, XWIN - 1u)] = select(0.0, x_load(row + select(ox0, ox0 + 4u, right)), right && row_inside);
    return win;
}

// dw[chunk part] of input channel ci, channels co0 .. co0+16, tap (ky, kx) = a (+ dw with ACC_DW).
fn store_quad(a: Quad, live: bool, ci: u32, co0: u32, ky: u32, kx: u32, chunk: u32) {
    for (var q = 0u; q < 4u; q++) {
        var v = a.q0;
        switch (q) { case 1u: { v = a.q1; } case 2u: { v = a.q2; } case 3u: { v = a.q3; } default: {} }
        for (var c = 0u; c < 4u; c++) {
            let co = co0 + 4u * q + c;
            if (live && kx < KW && co < p.co) {
                let idx = chunk * p.chunk_stride + ((co * p.ci + ci) * KH + ky) * KW + kx;
                var o = v[c];
                if (ACC_DW) { o += dw_load(idx); }
                dw_store(idx, o);
            }
        }
    }
}

@compute @workgroup_size(WG)
fn conv2d_grad_weight_sg(@builtin(workgroup_id) wg: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
    let ci_lo = wg.x * 16u + lane;
    let ci_hi = ci_lo + 8u;
    let co0 = wg.y * 16u;
    let chunk = wg.z % p.chunks;
    let kx_chunks = (KW + KXS - 1u) / KXS;
    let ky = wg.z / p.chunks / kx_chunks;
    let kx0 = (wg.z / p.chunks % kx_chunks) * KXS;
    let co_lo = min(co0 + lane, p.co - 1u);
    let co_hi = min(co0 + 8u + lane, p.co - 1u);
    var a = SgAcc();
    // HAS_DB: sums of this lane's dy channels.
    var s_lo = vec4<f32>();
    var s_hi = vec4<f32>();
    let rows = chunk_rows(chunk);
    var n = rows.x / p.oh;
    var oy = rows.x % p.oh;
    for (var r = rows.x; r < rows.y; r++) {
        let x_lo = (n * p.ci + min(ci_lo, p.ci - 1u)) * p.h;
        let x_hi = (n * p.ci + min(ci_hi, p.ci - 1u)) * p.h;
        let dy_lo = ((n * p.co + co_lo) * p.oh + oy) * p.ow;
        let dy_hi = ((n * p.co + co_hi) * p.oh + oy) * p.ow;
        for (var ox0 = 0u; ox0 < p.ow; ox0 += 4u) {
            let lo = dy4(dy_lo, ox0);
            let hi = dy4(dy_hi, ox0);
            let d = Dy16(lanes_lo(lo), lanes_hi(lo), lanes_lo(hi), lanes_hi(hi));
            a = sg_step(a, d, x_window_sg(x_lo, oy, ky, ox0, kx0), x_window_sg(x_hi, oy, ky, ox0, kx0));
            if (HAS_DB) {
                s_lo += lo;
                s_hi += hi;
            }
        }
        let wrap = oy + 1u == p.oh;
        oy = select(oy + 1u, 0u, wrap);
        n = select(n, n + 1u, wrap);
    }
    let live_lo = ci_lo < p.ci;
    let live_hi = ci_hi < p.ci;
    store_quad(a.i0k0, live_lo, ci_lo, co0, ky, kx0, chunk);
    store_quad(a.i1k0, live_hi, ci_hi, co0, ky, kx0, chunk);
    if (KXS > 1u) {
        store_quad(a.i0k1, live_lo, ci_lo, co0, ky, kx0 + 1u, chunk);
        store_quad(a.i1k1, live_hi, ci_hi, co0, ky, kx0 + 1u, chunk);
    }
    if (KXS > 2u) {
        store_quad(a.i0k2, live_lo, ci_lo, co0, ky, kx0 + 2u, chunk);
        store_quad(a.i1k2, live_hi, ci_hi, co0, ky, kx0 + 2u, chunk);
    }
    if (HAS_DB && wg.x == 0u && wg.z == 0u) {
        let ones = vec4<f32>(1.0);
        store_db(co0 + lane, dot(s_lo, ones));
        store_db(co0 + 8u + lane, dot(s_hi, ones));
    }
}
