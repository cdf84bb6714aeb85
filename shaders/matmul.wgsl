// Batched GEMM over strided operands:
//   C[z, m, n] = beta * C + sum_k A(z, m, k) B(z, k, n) (+ bias[n])
// with A(z, m, k) = a[z * a_bs + m * a_rs + k * a_cs] (B likewise) and C
// contiguous. Strides express transposes, so the forward and both backward
// products of matmul and linear are all this one kernel.
//
// B is first packed into panels of PW = WGX * TN columns, bp[z][panel][k][PW]
// (zero past N), so each k step of a workgroup reads one contiguous PW-wide
// row: lanes read neighbouring vec4s (coalesced). A workgroup is one row of
// WGX invocations that share the same TM rows of A: A's address is uniform
// across the workgroup, so a GPU (and llvmpipe, which scalarizes uniform
// loads) fetches it once and broadcasts it. Each invocation keeps a TM x TN
// register tile. No workgroup memory and no barriers.

//@ entry pack_b
//@ tensors b:read bp:write
//@ const PW = 64u
struct Params { n: u32, k: u32, b_bs: u32, b_rs: u32, b_cs: u32, panels: u32, total: u32 }
const PACK_WG: u32 = 256u;
@compute @workgroup_size(PACK_WG)
fn pack_b(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_id(gid, nwg, PACK_WG) * 4u;
    if (i >= p.total) { return; }
    let c = i % PW;
    let r = i / PW;
    let kk = r % p.k;
    let r2 = r / p.k;
    let panel = r2 % p.panels;
    let z = r2 / p.panels;
    let base = z * p.b_bs + kk * p.b_rs;
    var v = vec4<f32>(0.0);
    for (var q = 0u; q < 4u; q++) {
        let col = panel * PW + c + q;
        v[q] = select(0.0, b_load(base + min(col, p.n - 1u) * p.b_cs), col < p.n);
    }
    bp_store4(i, v);
}

//@ entry gemm
//@ tensors a:read bp:read bias:read c:rw
//@ const RB = 8u
//@ const CB = 2u
//@ const WGX = 8u
//@ const HAS_BIAS = false
// Each invocation owns RB x CB blocks of 4 x 4 (TM = 4 RB rows, RB <= 8;
// TN = 4 CB columns, CB <= 2), each a mat4x4 whose column i is row i of the block. The blocks
// are named variables, not an array: compilers keep them in registers.
struct Params {
    m: u32, n: u32, k: u32,
    a_bs: u32, a_rs: u32, a_cs: u32,
    panels: u32, beta: f32,
}
const TN: u32 = 4u * CB;
const PW: u32 = WGX * TN;

// acc += outer product: row i of the block gains a[i] * b.
fn outer_fma(acc: mat4x4<f32>, a: vec4<f32>, b: vec4<f32>) -> mat4x4<f32> {
    return mat4x4<f32>(fma(vec4<f32>(a.x), b, acc[0]), fma(vec4<f32>(a.y), b, acc[1]),
                       fma(vec4<f32>(a.z), b, acc[2]), fma(vec4<f32>(a.w), b, acc[3]));
}

// Four rows of A at column offset k (row offsets precomputed, clamped).
fn a_col4(rows: vec4<u32>, k: u32) -> vec4<f32> {
    return vec4<f32>(a_load(rows.x + k), a_load(rows.y + k), a_load(rows.z + k), a_load(rows.w + k));
}

fn store_block(acc: mat4x4<f32>, row0: u32, col0: u32, c_base: u32) {
    for (var i = 0u; i < 4u; i++) {
        let row = row0 + i;
        if (row >= p.m) { return; }
        let v = acc[i];
        for (var q = 0u; q < 4u; q++) {
            let col = col0 + q;
            if (col < p.n) {
                var r = v[q];
                if (HAS_BIAS) { r += bias_load(col); }
                let idx = c_base + row * p.n + col;
                if (p.beta != 0.0) { r += c_load(idx); }
                c_store(idx, r);
            }
        }
    }
}

fn row_offsets(z: u32, row: u32) -> vec4<u32> {
    let last = p.m - 1u;
    return z * p.a_bs + vec4<u32>(min(row, last), min(row + 1u, last), min(row + 2u, last), min(row + 3u, last)) * p.a_rs;
}

@compute @workgroup_size(WGX, 1, 1)
fn gemm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let z = wg.z;
    let row0 = wg.y * 4u * RB;
    let lane_col = lid.x * TN;
    // Rows past the edge read row m - 1 (a valid address) and are not stored.
    let r0 = row_offsets(z, row0 + 0u);
    let r1 = row_offsets(z, row0 + 4u);
    let r2 = row_offsets(z, row0 + 8u);
    let r3 = row_offsets(z, row0 + 12u);
    let r4 = row_offsets(z, row0 + 16u);
    let r5 = row_offsets(z, row0 + 20u);
    let r6 = row_offsets(z, row0 + 24u);
    let r7 = row_offsets(z, row0 + 28u);
    var c00 = mat4x4<f32>(); var c01 = mat4x4<f32>();
    var c10 = mat4x4<f32>(); var c11 = mat4x4<f32>();
    var c20 = mat4x4<f32>(); var c21 = mat4x4<f32>();
    var c30 = mat4x4<f32>(); var c31 = mat4x4<f32>();
    var c40 = mat4x4<f32>(); var c41 = mat4x4<f32>();
    var c50 = mat4x4<f32>(); var c51 = mat4x4<f32>();
    var c60 = mat4x4<f32>(); var c61 = mat4x4<f32>();
    var c70 = mat4x4<f32>(); var c71 = mat4x4<f32>();
    var b_at = (z * p.panels + wg.x) * p.k * PW + lane_col;
    var a_k = 0u;
    for (var kk = 0u; kk < p.k; kk++) {
        let b0 = bp_load4(b_at);
        var b1 = vec4<f32>();
        if (CB > 1u) { b1 = bp_load4(b_at + 4u); }
        { let a = a_col4(r0, a_k); c00 = outer_fma(c00, a, b0); if (CB > 1u) { c01 = outer_fma(c01, a, b1); } }
        if (RB > 1u) { let a = a_col4(r1, a_k); c10 = outer_fma(c10, a, b0); if (CB > 1u) { c11 = outer_fma(c11, a, b1); } }
        if (RB > 2u) { let a = a_col4(r2, a_k); c20 = outer_fma(c20, a, b0); if (CB > 1u) { c21 = outer_fma(c21, a, b1); } }
        if (RB > 3u) { let a = a_col4(r3, a_k); c30 = outer_fma(c30, a, b0); if (CB > 1u) { c31 = outer_fma(c31, a, b1); } }
        if (RB > 4u) { let a = a_col4(r4, a_k); c40 = outer_fma(c40, a, b0); if (CB > 1u) { c41 = outer_fma(c41, a, b1); } }
        if (RB > 5u) { let a = a_col4(r5, a_k); c50 = outer_fma(c50, a, b0); if (CB > 1u) { c51 = outer_fma(c51, a, b1); } }
        if (RB > 6u) { let a = a_col4(r6, a_k); c60 = outer_fma(c60, a, b0); if (CB > 1u) { c61 = outer_fma(c61, a, b1); } }
        if (RB > 7u) { let a = a_col4(r7, a_k); c70 = outer_fma(c70, a, b0); if (CB > 1u) { c71 = outer_fma(c71, a, b1); } }
        b_at += PW;
        a_k += p.a_cs;
    }
    let col0 = wg.x * PW + lane_col;
    let cb = z * p.m * p.n;
    { store_block(c00, row0 + 0u, col0, cb); if (CB > 1u) { store_block(c01, row0 + 0u, col0 + 4u, cb); } }
    if (RB > 1u) { store_block(c10, row0 + 4u, col0, cb); if (CB > 1u) { store_block(c11, row0 + 4u, col0 + 4u, cb); } }
    if (RB > 2u) { store_block(c20, row0 + 8u, col0, cb); if (CB > 1u) { store_block(c21, row0 + 8u, col0 + 4u, cb); } }
    if (RB > 3u) { store_block(c30, row0 + 12u, col0, cb); if (CB > 1u) { store_block(c31, row0 + 12u, col0 + 4u, cb); } }
    if (RB > 4u) { store_block(c40, row0 + 16u, col0, cb); if (CB > 1u) { store_block(c41, row0 + 16u, col0 + 4u, cb); } }
    if (RB > 5u) { store_block(c50, row0 + 20u, col0, cb); if (CB > 1u) { store_block(c51, row0 + 20u, col0 + 4u, cb); } }
    if (RB > 6u) { store_block(c60, row0 + 24u, col0, cb); if (CB > 1u) { store_block(c61, row0 + 24u, col0 + 4u, cb); } }
    if (RB > 7u) { store_block(c70, row0 + 28u, col0, cb); if (CB > 1u) { store_block(c71, row0 + 28u, col0 + 4u, cb); } }
}
