// Batched GEMM over strided operands: C[z, m, n] = beta * C + sum_k A(z, m, k) B(z, k, n) (+ bias[n]).
// A(z, m, k) = a[z * a_bs + m * a_rs + k * a_cs], B likewise, C contiguous.
// Strides express transposes, so the forward and both backward products of a
// matmul or linear are all this one kernel.
//
// Each invocation owns a TM x TN register tile (TN a multiple of 4, kept as
// vec4 accumulators); a workgroup of WGX x WGY invocations covers
// (WGY * TM) x (WGX * TN) of C. No workgroup memory: operands stream from
// global memory through the cache, which suits llvmpipe (barriers are costly
// there) and is correct everywhere.

//@ entry gemm
//@ tensors a:read b:read bias:read c:rw
//@ const TM = 4u
//@ const TN = 4u
//@ const WGX = 8u
//@ const WGY = 8u
//@ const HAS_BIAS = false
//@ const B_ROW_CONTIGUOUS = false
struct Params {
    m: u32, n: u32, k: u32,
    a_bs: u32, a_rs: u32, a_cs: u32,
    b_bs: u32, b_rs: u32, b_cs: u32,
    beta: f32,
}

const TN4: u32 = TN / 4u;

@compute @workgroup_size(WGX, WGY, 1)
fn gemm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let z = wg.z;
    let row0 = (wg.y * WGY + lid.y) * TM;
    let col0 = (wg.x * WGX + lid.x) * TN;
    if (row0 >= p.m || col0 >= p.n) { return; }
    var acc: array<vec4<f32>, TM * TN4>;
    // Rows and columns past the edge read a clamped (valid) address; their
    // results are never stored.
    var a_row: array<u32, TM>;
    for (var i = 0u; i < TM; i++) {
        a_row[i] = z * p.a_bs + min(row0 + i, p.m - 1u) * p.a_rs;
    }
    var b_col: array<u32, TN>;
    for (var j = 0u; j < TN; j++) {
        b_col[j] = z * p.b_bs + min(col0 + j, p.n - 1u) * p.b_cs;
    }
    let full_cols = col0 + TN <= p.n;
    for (var kk = 0u; kk < p.k; kk++) {
        var bv: array<vec4<f32>, TN4>;
        if (B_ROW_CONTIGUOUS && full_cols) {
            let base = z * p.b_bs + kk * p.b_rs + col0;
            for (var j = 0u; j < TN4; j++) { bv[j] = b_load4(base + 4u * j); }
        } else {
            for (var j = 0u; j < TN4; j++) {
                bv[j] = vec4<f32>(
                    b_load(b_col[4u * j] + kk * p.b_rs),
                    b_load(b_col[4u * j + 1u] + kk * p.b_rs),
                    b_load(b_col[4u * j + 2u] + kk * p.b_rs),
                    b_load(b_col[4u * j + 3u] + kk * p.b_rs));
            }
        }
        for (var i = 0u; i < TM; i++) {
            let av = a_load(a_row[i] + kk * p.a_cs);
            for (var j = 0u; j < TN4; j++) {
                acc[i * TN4 + j] = fma(vec4<f32>(av), bv[j], acc[i * TN4 + j]);
            }
        }
    }
    let c_base = z * p.m * p.n;
    for (var i = 0u; i < TM; i++) {
        let row = row0 + i;
        if (row >= p.m) { break; }
        for (var j = 0u; j < TN4; j++) {
            let v = acc[i * TN4 + j];
            for (var q = 0u; q < 4u; q++) {
                let col = col0 + 4u * j + q;
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
}
