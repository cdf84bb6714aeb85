// Swap the last two dims: x [B, R, C] -> y [B, C, R], y = beta * y + x^T
// (the backward is the same transpose of dy). Two schedules:
// - transpose_tiled (GPUs): a workgroup moves one 32x32 tile through
//   workgroup memory, so both the reads of x rows and the writes of y rows
//   are coalesced.
// - transpose_blocks (CPU adapters, where workgroup memory and barriers cost
//   more than they save): each invocation moves a 4x4 block in registers,
//   vec4 row loads in, vec4 row stores out.

//@ helpers runs
// x[i..i + min(avail, 4)], zeros past the end.
fn load_run(i: u32, avail: u32) -> vec4<f32> {
    if (avail >= 4u) { return x_load4(i); }
    var v = vec4<f32>(0.0);
    for (var k = 0u; k < avail; k++) { v[k] = x_load(i + k); }
    return v;
}

// y[i..i + min(avail, 4)] = beta * y[..] + v[..]
fn store_run(i: u32, avail: u32, v: vec4<f32>) {
    if (avail >= 4u) {
        var w = v;
        if (p.beta != 0.0) { w += y_load4(i); }
        y_store4(i, w);
        return;
    }
    for (var k = 0u; k < avail; k++) {
        var w = v[k];
        if (p.beta != 0.0) { w += y_load(i + k); }
        y_store(i + k, w);
    }
}

//@ entry transpose_tiled
//@ tensors x:read y:rw
//@ use runs
// GPUs: a workgroup of 8 x 32 lanes moves one 32x32 tile. rb, cb: tiles
// along R and C; ntiles = B * rb * cb.
struct Params { r: u32, c: u32, rb: u32, cb: u32, ntiles: u32, beta: f32 }
const T: u32 = 32u;
// One padding column keeps the column reads free of bank conflicts.
var<workgroup> tile: array<array<f32, 33>, 32>;
@compute @workgroup_size(8, 32)
fn transpose_tiled(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let wg = wid.x + wid.y * nwg.x;
    // WGX = 8, WGY = 32: lane (lx, ly) loads x row r0 + ly, columns
    // c0 + 4 lx .. + 3, and stores y row c0 + ly, columns r0 + 4 lx .. + 3.
    if (wg >= p.ntiles) { return; }
    let c0 = (wg % p.cb) * T;
    let r0 = ((wg / p.cb) % p.rb) * T;
    let b = wg / (p.cb * p.rb);
    let r = r0 + lid.y;
    let c = c0 + 4u * lid.x;
    var v = vec4<f32>(0.0);
    if (r < p.r && c < p.c) { v = load_run((b * p.r + r) * p.c + c, p.c - c); }
    for (var k = 0u; k < 4u; k++) { tile[lid.y][4u * lid.x + k] = v[k]; }
    workgroupBarrier();
    let oc = c0 + lid.y;
    let orow = r0 + 4u * lid.x;
    if (oc < p.c && orow < p.r) {
        let t = vec4<f32>(tile[4u * lid.x][lid.y], tile[4u * lid.x + 1u][lid.y],
                          tile[4u * lid.x + 2u][lid.y], tile[4u * lid.x + 3u][lid.y]);
        store_run((b * p.c + oc) * p.r + orow, p.r - orow, t);
    }
}

//@ entry transpose_blocks
//@ tensors x:read y:rw
//@ use runs
//@ const WGX = 64u
// CPU adapters: each invocation moves a 4x4 block. rb, cb: blocks along R
// and C; ntiles = B * rb * cb. The block is transposed through an array of
// rows, not mat4x4 + transpose(): with the matrix, llvmpipe (Mesa 22.3) took
// ~1-2 ms and leaked ~0.25 MB of host memory per dispatch.
struct Params { r: u32, c: u32, rb: u32, cb: u32, ntiles: u32, beta: f32 }
@compute @workgroup_size(WGX)
fn transpose_blocks(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let wg = wid.x + wid.y * nwg.x;
    let id = wg * WGX + lid.x;
    if (id >= p.ntiles) { return; }
    let c0 = (id % p.cb) * 4u;
    let r0 = ((id / p.cb) % p.rb) * 4u;
    let b = id / (p.cb * p.rb);
    // rows[k] = x row r0 + k, columns c0 .. c0 + 3; column j of them = y row c0 + j.
    let xi = (b * p.r + r0) * p.c + c0;
    let yi = (b * p.c + c0) * p.r + r0;
    let nr = min(4u, p.r - r0);
    let nc = min(4u, p.c - c0);
    var rows = array<vec4<f32>, 4>();
    for (var k = 0u; k < nr; k++) { rows[k] = load_run(xi + k * p.c, p.c - c0); }
    for (var j = 0u; j < nc; j++) {
        let col = vec4<f32>(rows[0][j], rows[1][j], rows[2][j], rows[3][j]);
        store_run(yi + j * p.r, p.r - r0, col);
    }
}
