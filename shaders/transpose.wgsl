// Swap the last two dims: x [B, R, C] -> y [B, C, R], y = beta * y + x^T
// (the backward is the same transpose of dy). Two schedules:
// - TILED (GPUs): a workgroup moves one 32x32 tile through workgroup memory,
//   so both the reads of x rows and the writes of y rows are coalesced.
// - blocks (CPU adapters, where workgroup memory and barriers cost more than
//   they save): each invocation moves a 4x4 block in registers, four vec4
//   row loads in, four vec4 row stores out.

//@ entry transpose_last2
//@ tensors x:read y:rw
//@ const TILED = false
//@ const WGX = 64u
//@ const WGY = 1u
// rb, cb: tiles (TILED) or blocks along R and C; ntiles = B * rb * cb.
struct Params { r: u32, c: u32, rb: u32, cb: u32, ntiles: u32, beta: f32 }

const T: u32 = 32u;
// One padding column keeps the column reads free of bank conflicts.
var<workgroup> tile: array<array<f32, 33>, 32>;

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

@compute @workgroup_size(WGX, WGY)
fn transpose_last2(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let wg = wid.x + wid.y * nwg.x;
    if (TILED) {
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
    } else {
        let id = wg * WGX + lid.x;
        if (id >= p.ntiles) { return; }
        let c0 = (id % p.cb) * 4u;
        let r0 = ((id / p.cb) % p.rb) * 4u;
        let b = id / (p.cb * p.rb);
        // m[k] = x row r0 + k, columns c0 .. c0 + 3; transpose(m)[j] = y row c0 + j.
        let xi = (b * p.r + r0) * p.c + c0;
        let yi = (b * p.c + c0) * p.r + r0;
        if (r0 + 4u <= p.r && c0 + 4u <= p.c) {
            // Whole block: straight-line vec4 rows.
            let mt = transpose(mat4x4<f32>(x_load4(xi), x_load4(xi + p.c),
                                           x_load4(xi + 2u * p.c), x_load4(xi + 3u * p.c)));
            for (var j = 0u; j < 4u; j++) { store_run(yi + j * p.r, 4u, mt[j]); }
            return;
        }
        var m = mat4x4<f32>();
        for (var k = 0u; k < min(4u, p.r - r0); k++) {
            m[k] = load_run(xi + k * p.c, p.c - c0);
        }
        let mt = transpose(m);
        for (var j = 0u; j < min(4u, p.c - c0); j++) {
            store_run(yi + j * p.r, p.r - r0, mt[j]);
        }
    }
}
