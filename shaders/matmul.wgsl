// Batched GEMM over strided operands:
//   C[z, m, n] = (C if ACC_C) + sum_k A(z, m, k) B(z, k, n) (+ bias[n]) (+ res[z, m, n])
// with A(z, m, k) = a[z * a_bs + m * a_rs + k * a_cs] (B likewise) and C
// contiguous. Strides express transposes, so the forward and both backward
// products of matmul and linear are all this one kernel.
//
// B is first packed into panels of PW = WGX * TN columns, bp[z][panel][k][PW]
// (zero past N), so each k step of a workgroup reads one contiguous PW-wide
// row: lanes read neighbouring vec4s (coalesced). A row-major B whose rows
// start at vec4 boundaries is read in place instead (DIRECT_B), the same way;
// the subgroup kernel also reads a transposed one in place (TRANS_B). A workgroup is one row of
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

//@ helpers gemm_tiles
// Each invocation owns RB x CB blocks of 4 x 4 (TM = 4 RB rows, RB <= 8;
// TN = 4 CB columns, CB <= 2), each a mat4x4 whose column i is row i of the
// block. The blocks are named variables, not an array: compilers keep them
// in registers (an indexed array spills to scratch memory on llvmpipe).
struct Params {
    m: u32, n: u32, k: u32,
    a_bs: u32, a_rs: u32, a_cs: u32,
    panels: u32,
    b_bs: u32, b_rs: u32,
    rs_beta: f32,
}
const TN: u32 = 4u * CB;
const PW: u32 = WGX * TN;

// acc += outer product: row i of the block gains a[i] * b.
fn outer_fma(acc: mat4x4<f32>, a: vec4<f32>, b: vec4<f32>) -> mat4x4<f32> {
    return mat4x4<f32>(fma(vec4<f32>(a.x), b, acc[0]), fma(vec4<f32>(a.y), b, acc[1]),
                       fma(vec4<f32>(a.z), b, acc[2]), fma(vec4<f32>(a.w), b, acc[3]));
}

// Four rows of A at column offset k (row offsets precomputed, clamped).
// COL_A4 (the subgroup kernel, A's columns contiguous from vec4 boundaries):
// one vector load. A group whose first row is past M reads a clamped,
// unaligned offset; its rows are never stored.
fn a_col4(rows: vec4<u32>, k: u32) -> vec4<f32> {
    if (COL_A4) { return a_load4(rows.x + k); }
    return vec4<f32>(a_load(rows.x + k), a_load(rows.y + k), a_load(rows.z + k), a_load(rows.w + k));
}

// Offsets of rows row..row+3 of batch z; rows past the edge read row m - 1
// (a valid address) and are never stored.
fn row_offsets(z: u32, row: u32) -> vec4<u32> {
    let last = p.m - 1u;
    return z * p.a_bs + vec4<u32>(min(row, last), min(row + 1u, last), min(row + 2u, last), min(row + 3u, last)) * p.a_rs;
}

fn store_block(acc: mat4x4<f32>, row0: u32, col0: u32, c_base: u32) {
    for (var i = 0u; i < 4u; i++) {
        let row = row0 + i;
        if (row >= p.m) { return; }
        let at = c_base + row * p.n + col0;
        // VEC_C (N a multiple of 4): a row of the block is inside or outside
        // as a whole, one vector access per tensor. A constant, not a test of
        // N: llvmpipe runs both sides of a branch it cannot prove uniform.
        if (VEC_C) {
            if (col0 < p.n) {
                var r = acc[i];
                if (HAS_BIAS) { r += bias_load4(col0); }
                if (HAS_RES) { r += res_load4(at); }
                if (ACC_C) { r += c_load4(at); }
                c_store4(at, r);
            }
            continue;
        }
        for (var q = 0u; q < 4u; q++) {
            let col = col0 + q;
            if (col < p.n) {
                var r = acc[i][q];
                if (HAS_BIAS) { r += bias_load(col); }
                if (HAS_RES) { r += res_load(at + q); }
                if (ACC_C) { r += c_load(at + q); }
                c_store(at + q, r);
            }
        }
    }
}

// The register tile of one invocation: c<r><c> is row block r, column block c.
struct Tile {
    c00: mat4x4<f32>, c01: mat4x4<f32>,
    c10: mat4x4<f32>, c11: mat4x4<f32>,
    c20: mat4x4<f32>, c21: mat4x4<f32>,
    c30: mat4x4<f32>, c31: mat4x4<f32>,
    c40: mat4x4<f32>, c41: mat4x4<f32>,
    c50: mat4x4<f32>, c51: mat4x4<f32>,
    c60: mat4x4<f32>, c61: mat4x4<f32>,
    c70: mat4x4<f32>, c71: mat4x4<f32>,
}

// A's column for the tile's rows, four rows per vector.
struct ACol { a0: vec4<f32>, a1: vec4<f32>, a2: vec4<f32>, a3: vec4<f32>, a4: vec4<f32>, a5: vec4<f32>, a6: vec4<f32>, a7: vec4<f32> }

// Row offsets of the tile's rows in A, four per vector.
struct Rows { r0: vec4<u32>, r1: vec4<u32>, r2: vec4<u32>, r3: vec4<u32>, r4: vec4<u32>, r5: vec4<u32>, r6: vec4<u32>, r7: vec4<u32> }

fn rows_of(z: u32, row0: u32) -> Rows {
    return Rows(row_offsets(z, row0 + 0u), row_offsets(z, row0 + 4u), row_offsets(z, row0 + 8u), row_offsets(z, row0 + 12u), row_offsets(z, row0 + 16u), row_offsets(z, row0 + 20u), row_offsets(z, row0 + 24u), row_offsets(z, row0 + 28u));
}

// A's column k (offset a_k) for every row block in use.
fn a_column(rows: Rows, a_k: u32) -> ACol {
    var a = ACol();
    a.a0 = a_col4(rows.r0, a_k);
    if (RB > 1u) { a.a1 = a_col4(rows.r1, a_k); }
    if (RB > 2u) { a.a2 = a_col4(rows.r2, a_k); }
    if (RB > 3u) { a.a3 = a_col4(rows.r3, a_k); }
    if (RB > 4u) { a.a4 = a_col4(rows.r4, a_k); }
    if (RB > 5u) { a.a5 = a_col4(rows.r5, a_k); }
    if (RB > 6u) { a.a6 = a_col4(rows.r6, a_k); }
    if (RB > 7u) { a.a7 = a_col4(rows.r7, a_k); }
    return a;
}

// ROWSUM: the kernel also writes rowsum[m] = rs_beta * rowsum[m] + sum_k A(m, k)
// (a linear layer's bias gradient falls out of its weight gradient's GEMM,
// whose A is dC^T). Only for one batch; the workgroups of panel 0 store it.
fn acol_add(s: ACol, a: ACol) -> ACol {
    return ACol(s.a0 + a.a0, s.a1 + a.a1, s.a2 + a.a2, s.a3 + a.a3, s.a4 + a.a4, s.a5 + a.a5, s.a6 + a.a6, s.a7 + a.a7);
}

fn store_rowsum4(v: vec4<f32>, row0: u32) {
    for (var q = 0u; q < 4u; q++) {
        let row = row0 + q;
        if (row < p.m) {
            var r = v[q];
            if (p.rs_beta != 0.0) { r += rowsum_load(row); }
            rowsum_store(row, r);
        }
    }
}

fn store_rowsums(s: ACol, row0: u32) {
    store_rowsum4(s.a0, row0);
    if (RB > 1u) { store_rowsum4(s.a1, row0 + 4u); }
    if (RB > 2u) { store_rowsum4(s.a2, row0 + 8u); }
    if (RB > 3u) { store_rowsum4(s.a3, row0 + 12u); }
    if (RB > 4u) { store_rowsum4(s.a4, row0 + 16u); }
    if (RB > 5u) { store_rowsum4(s.a5, row0 + 20u); }
    if (RB > 6u) { store_rowsum4(s.a6, row0 + 24u); }
    if (RB > 7u) { store_rowsum4(s.a7, row0 + 28u); }
}

// One k step: the tile gains A's column times B's row (b0, b1).
fn tile_step(t: ptr<function, Tile>, a: ACol, b0: vec4<f32>, b1: vec4<f32>) {
    { (*t).c00 = outer_fma((*t).c00, a.a0, b0); if (CB > 1u) { (*t).c01 = outer_fma((*t).c01, a.a0, b1); } }
    if (RB > 1u) { (*t).c10 = outer_fma((*t).c10, a.a1, b0); if (CB > 1u) { (*t).c11 = outer_fma((*t).c11, a.a1, b1); } }
    if (RB > 2u) { (*t).c20 = outer_fma((*t).c20, a.a2, b0); if (CB > 1u) { (*t).c21 = outer_fma((*t).c21, a.a2, b1); } }
    if (RB > 3u) { (*t).c30 = outer_fma((*t).c30, a.a3, b0); if (CB > 1u) { (*t).c31 = outer_fma((*t).c31, a.a3, b1); } }
    if (RB > 4u) { (*t).c40 = outer_fma((*t).c40, a.a4, b0); if (CB > 1u) { (*t).c41 = outer_fma((*t).c41, a.a4, b1); } }
    if (RB > 5u) { (*t).c50 = outer_fma((*t).c50, a.a5, b0); if (CB > 1u) { (*t).c51 = outer_fma((*t).c51, a.a5, b1); } }
    if (RB > 6u) { (*t).c60 = outer_fma((*t).c60, a.a6, b0); if (CB > 1u) { (*t).c61 = outer_fma((*t).c61, a.a6, b1); } }
    if (RB > 7u) { (*t).c70 = outer_fma((*t).c70, a.a7, b0); if (CB > 1u) { (*t).c71 = outer_fma((*t).c71, a.a7, b1); } }
}

// DIRECT_B: bp is B itself, row-major with n, b_rs and b_bs multiples of 4
// (so no packing pass): row k of batch z starts at z b_bs + k b_rs, and
// columns from n on read as zero. Otherwise bp is the packed panels.
// Where this invocation's B row of step k = 0 starts, and the step per k.
fn b_start(z: u32, panel: u32, lane: u32) -> u32 {
    if (DIRECT_B) { return z * p.b_bs + panel * PW + lane * TN; }
    return (z * p.panels + panel) * p.k * PW + lane * TN;
}
fn b_stride() -> u32 {
    if (DIRECT_B) { return p.b_rs; }
    return PW;
}

// B's row at b_at: 4 CB columns, from column col0.
fn b_row(b_at: u32, col0: u32) -> array<vec4<f32>, 2> {
    if (DIRECT_B) {
        var b = array<vec4<f32>, 2>(select(vec4<f32>(0.0), bp_load4(select(0u, b_at, col0 < p.n)), col0 < p.n), vec4<f32>());
        if (CB > 1u) {
            let inside = col0 + 4u < p.n;
            b[1] = select(vec4<f32>(0.0), bp_load4(select(0u, b_at + 4u, inside)), inside);
        }
        return b;
    }
    var b = array<vec4<f32>, 2>(bp_load4(b_at), vec4<f32>());
    if (CB > 1u) { b[1] = bp_load4(b_at + 4u); }
    return b;
}

// TRANS_B (gemm_subgroup only): B is a row-major matrix read transposed,
// B(k, n) = bp[z b_bs + n b_rs + k] (a linear layer's weight [N, K], with
// b_rs, b_bs and K multiples of 4), so no packing pass. Each lane loads its
// columns 4 k at a time (one vec4 per column) and takes their rows apart in
// registers.
struct BBlock { v0: vec4<f32>, v1: vec4<f32>, v2: vec4<f32>, v3: vec4<f32>, v4: vec4<f32>, v5: vec4<f32>, v6: vec4<f32>, v7: vec4<f32> }

// k0 .. k0+4 of column col (zero past N).
fn bt_col4(z: u32, col: u32, k0: u32) -> vec4<f32> {
    let at = z * p.b_bs + min(col, p.n - 1u) * p.b_rs + k0;
    return select(vec4<f32>(0.0), bp_load4(at), col < p.n);
}

fn bt_block(z: u32, col0: u32, k0: u32) -> BBlock {
    var b = BBlock();
    b.v0 = bt_col4(z, col0, k0);
    b.v1 = bt_col4(z, col0 + 1u, k0);
    b.v2 = bt_col4(z, col0 + 2u, k0);
    b.v3 = bt_col4(z, col0 + 3u, k0);
    if (CB > 1u) {
        b.v4 = bt_col4(z, col0 + 4u, k0);
        b.v5 = bt_col4(z, col0 + 5u, k0);
        b.v6 = bt_col4(z, col0 + 6u, k0);
        b.v7 = bt_col4(z, col0 + 7u, k0);
    }
    return b;
}

// Row j (k0 + j) of a block: this lane's 4 CB columns.
fn bt_row(b: BBlock, j: u32) -> array<vec4<f32>, 2> {
    return array<vec4<f32>, 2>(vec4<f32>(b.v0[j], b.v1[j], b.v2[j], b.v3[j]), vec4<f32>(b.v4[j], b.v5[j], b.v6[j], b.v7[j]));
}

fn store_tile(t: Tile, row0: u32, col0: u32, z: u32) {
    let cb = z * p.m * p.n;
    { store_block(t.c00, row0 + 0u, col0, cb); if (CB > 1u) { store_block(t.c01, row0 + 0u, col0 + 4u, cb); } }
    if (RB > 1u) { store_block(t.c10, row0 + 4u, col0, cb); if (CB > 1u) { store_block(t.c11, row0 + 4u, col0 + 4u, cb); } }
    if (RB > 2u) { store_block(t.c20, row0 + 8u, col0, cb); if (CB > 1u) { store_block(t.c21, row0 + 8u, col0 + 4u, cb); } }
    if (RB > 3u) { store_block(t.c30, row0 + 12u, col0, cb); if (CB > 1u) { store_block(t.c31, row0 + 12u, col0 + 4u, cb); } }
    if (RB > 4u) { store_block(t.c40, row0 + 16u, col0, cb); if (CB > 1u) { store_block(t.c41, row0 + 16u, col0 + 4u, cb); } }
    if (RB > 5u) { store_block(t.c50, row0 + 20u, col0, cb); if (CB > 1u) { store_block(t.c51, row0 + 20u, col0 + 4u, cb); } }
    if (RB > 6u) { store_block(t.c60, row0 + 24u, col0, cb); if (CB > 1u) { store_block(t.c61, row0 + 24u, col0 + 4u, cb); } }
    if (RB > 7u) { store_block(t.c70, row0 + 28u, col0, cb); if (CB > 1u) { store_block(t.c71, row0 + 28u, col0 + 4u, cb); } }
}

//@ helpers gemm_kblock
// The subgroup kernel works in blocks of 8 k steps (WGX = 8, llvmpipe's SIMD
// width). The tile's rows each gain their 8 products in registers and are
// written back once per block: every write of a loop-carried value costs
// llvmpipe a masked blend, so one per block instead of one per product.

// B's rows of a block: row l is kb_rows[2 l] (columns 0-3) and kb_rows[2 l + 1].
alias KRows = array<vec4<f32>, 16>;

// A's values for a block. COLUMN (any strides): lane l holds A's column
// k0 + l for every row of the tile (col). ROW_A (A row-major, rows starting
// at vec4 boundaries): lane q holds rows 4q .. 4q + 3 of the tile over the
// block's 8 k (lo: k0 .. k0 + 3, hi: k0 + 4 .. k0 + 7), two vector loads per
// row instead of 8 scalar ones.
struct ALanes { col: ACol, lo: array<vec4<f32>, 4>, hi: array<vec4<f32>, 4> }

// Row i of row group q over the block: (k0 .. k0 + 3, k0 + 4 .. k0 + 7).
fn a_row8(a: ptr<function, ALanes>, col: vec4<f32>, q: u32, i: u32) -> array<vec4<f32>, 2> {
    if (ROW_A) {
        return array<vec4<f32>, 2>(subgroupShuffle((*a).lo[i], q), subgroupShuffle((*a).hi[i], q));
    }
    let v = col[i];
    return array<vec4<f32>, 2>(
        vec4<f32>(subgroupShuffle(v, 0u), subgroupShuffle(v, 1u), subgroupShuffle(v, 2u), subgroupShuffle(v, 3u)),
        vec4<f32>(subgroupShuffle(v, 4u), subgroupShuffle(v, 5u), subgroupShuffle(v, 6u), subgroupShuffle(v, 7u)));
}

// A row of a row block (r[0] in column block 0, r[1] in 1) gains a[l] times
// B's row l for the block's 8 k.
fn row_kblock(r: array<vec4<f32>, 2>, a: array<vec4<f32>, 2>, b: ptr<function, KRows>) -> array<vec4<f32>, 2> {
    var acc = r;
    for (var l = 0u; l < 8u; l++) {
        let s = vec4<f32>(a[l / 4u][l % 4u]);
        acc[0] = fma(s, (*b)[2u * l], acc[0]);
        if (CB > 1u) { acc[1] = fma(s, (*b)[2u * l + 1u], acc[1]); }
    }
    return acc;
}

struct BlockPair { c0: mat4x4<f32>, c1: mat4x4<f32> }

// Row group q (blocks m0, m1; col: the group's column values if COLUMN).
fn block_kblock(m0: mat4x4<f32>, m1: mat4x4<f32>, a: ptr<function, ALanes>, col: vec4<f32>, q: u32, b: ptr<function, KRows>) -> BlockPair {
    let r0 = row_kblock(array<vec4<f32>, 2>(m0[0], m1[0]), a_row8(a, col, q, 0u), b);
    let r1 = row_kblock(array<vec4<f32>, 2>(m0[1], m1[1]), a_row8(a, col, q, 1u), b);
    let r2 = row_kblock(array<vec4<f32>, 2>(m0[2], m1[2]), a_row8(a, col, q, 2u), b);
    let r3 = row_kblock(array<vec4<f32>, 2>(m0[3], m1[3]), a_row8(a, col, q, 3u), b);
    return BlockPair(mat4x4<f32>(r0[0], r1[0], r2[0], r3[0]), mat4x4<f32>(r0[1], r1[1], r2[1], r3[1]));
}

fn tile_kblock(t: ptr<function, Tile>, a: ptr<function, ALanes>, b: ptr<function, KRows>) {
    let c = (*a).col;
    { let p = block_kblock((*t).c00, (*t).c01, a, c.a0, 0u, b); (*t).c00 = p.c0; (*t).c01 = p.c1; }
    if (RB > 1u) { let p = block_kblock((*t).c10, (*t).c11, a, c.a1, 1u, b); (*t).c10 = p.c0; (*t).c11 = p.c1; }
    if (RB > 2u) { let p = block_kblock((*t).c20, (*t).c21, a, c.a2, 2u, b); (*t).c20 = p.c0; (*t).c21 = p.c1; }
    if (RB > 3u) { let p = block_kblock((*t).c30, (*t).c31, a, c.a3, 3u, b); (*t).c30 = p.c0; (*t).c31 = p.c1; }
    if (RB > 4u) { let p = block_kblock((*t).c40, (*t).c41, a, c.a4, 4u, b); (*t).c40 = p.c0; (*t).c41 = p.c1; }
    if (RB > 5u) { let p = block_kblock((*t).c50, (*t).c51, a, c.a5, 5u, b); (*t).c50 = p.c0; (*t).c51 = p.c1; }
    if (RB > 6u) { let p = block_kblock((*t).c60, (*t).c61, a, c.a6, 6u, b); (*t).c60 = p.c0; (*t).c61 = p.c1; }
    if (RB > 7u) { let p = block_kblock((*t).c70, (*t).c71, a, c.a7, 7u, b); (*t).c70 = p.c0; (*t).c71 = p.c1; }
}

//@ entry gemm
//@ tensors a:read bp:read4 bias:read4 res:read4 c:rw4 rowsum:rw
//@ const RB = 4u
//@ const CB = 2u
//@ const WGX = 8u
//@ const HAS_BIAS = false
//@ const DIRECT_B = false
//@ const ROWSUM = false
//@ const HAS_RES = false
//@ const VEC_C = false
//@ const ACC_C = false
//@ const COL_A4 = false
//@ use gemm_tiles
// A workgroup is one row of WGX invocations sharing the same rows of A:
// A's address is uniform across the workgroup, so a GPU fetches it once and
// broadcasts it.
@compute @workgroup_size(WGX, 1, 1)
fn gemm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let row0 = wg.y * 4u * RB;
    let rows = rows_of(wg.z, row0);
    var t = Tile();
    let col0 = wg.x * PW + lid.x * TN;
    var b_at = b_start(wg.z, wg.x, lid.x);
    var asum = ACol();
    for (var kk = 0u; kk < p.k; kk++) {
        let b = b_row(b_at, col0);
        let a = a_column(rows, kk * p.a_cs);
        if (ROWSUM) { asum = acol_add(asum, a); }
        tile_step(&t, a, b[0], b[1]);
        b_at += b_stride();
    }
    store_tile(t, row0, col0, wg.z);
    if (ROWSUM && wg.x == 0u && lid.x == 0u) { store_rowsums(asum, row0); }
}

//@ entry gemm_subgroup
//@ tensors a:read4 bp:read4 bias:read4 res:read4 c:rw4 rowsum:rw
//@ const RB = 4u
//@ const CB = 2u
//@ const WGX = 8u
//@ const HAS_BIAS = false
//@ const DIRECT_B = false
//@ const TRANS_B = false
//@ const ROW_A = false
//@ const COL_A4 = false
//@ const MT = 1u
//@ const ROWSUM = false
//@ const HAS_RES = false
//@ const VEC_C = false
//@ const ACC_C = false
//@ use gemm_tiles
//@ use gemm_kblock
// A's values for one tile's k block (see ALanes): rows of the tile at
// offsets rows, this lane's own rows (ROW_A) at mine.
fn a_block(rows: Rows, mine: vec4<u32>, k0: u32, lane: u32) -> ALanes {
    var a = ALanes();
    if (ROW_A) {
        for (var i = 0u; i < 4u; i++) {
            a.lo[i] = a_load4(mine[i] + k0);
            a.hi[i] = a_load4(mine[i] + k0 + 4u);
        }
    } else {
        a.col = a_column(rows, (k0 + lane) * p.a_cs);
    }
    return a;
}

fn acol_total(s: ACol) -> ACol {
    return ACol(subgroupAdd(s.a0), subgroupAdd(s.a1), subgroupAdd(s.a2), subgroupAdd(s.a3),
                subgroupAdd(s.a4), subgroupAdd(s.a5), subgroupAdd(s.a6), subgroupAdd(s.a7));
}

// For adapters whose subgroup is exactly the 8-wide workgroup (llvmpipe): in
// each block of 8 k steps, lane l loads A's column k0 + l (or, ROW_A, its
// own rows over the block) once, and subgroupShuffle hands the values to
// every lane, instead of every lane loading every element of A. MT = 2: the
// workgroup computes two tiles of 4 RB rows below each other from the same
// loads of B, which halves B's loads per product.
@compute @workgroup_size(WGX, 1, 1)
fn gemm_subgroup(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let z = wg.z;
    let row0 = wg.y * 4u * RB * MT;
    let row1 = row0 + 4u * RB;
    let rows0 = rows_of(z, row0);
    let rows1 = rows_of(z, row1);
    // ROW_A: this lane's rows of each tile (4 lid.x .. 4 lid.x + 3; RB <= WGX).
    let mine0 = row_offsets(z, row0 + 4u * lid.x);
    let mine1 = row_offsets(z, row1 + 4u * lid.x);
    var t0 = Tile();
    var t1 = Tile();
    let col0 = wg.x * PW + lid.x * TN;
    var b_at = b_start(z, wg.x, lid.x);
    let k_blocks = p.k / WGX;
    // ROWSUM: each lane sums the columns it loads; lane 0 also the tail's.
    var asum0 = ACol();
    var asum1 = ACol();
    var bt = BBlock();
    for (var kb = 0u; kb < k_blocks; kb++) {
        let k0 = kb * WGX;
        var kb_rows = KRows();
        for (var l = 0u; l < WGX; l++) {
            var b = array<vec4<f32>, 2>();
            if (TRANS_B) {
                if (l % 4u == 0u) { bt = bt_block(z, col0, k0 + l); }
                b = bt_row(bt, l % 4u);
            } else {
                b = b_row(b_at, col0);
            }
            kb_rows[2u * l] = b[0];
            kb_rows[2u * l + 1u] = b[1];
            b_at += b_stride();
        }
        var a0 = a_block(rows0, mine0, k0, lid.x);
        if (ROWSUM) { asum0 = acol_add(asum0, a0.col); }
        tile_kblock(&t0, &a0, &kb_rows);
        if (MT > 1u) {
            var a1 = a_block(rows1, mine1, k0, lid.x);
            if (ROWSUM) { asum1 = acol_add(asum1, a1.col); }
            tile_kblock(&t1, &a1, &kb_rows);
        }
    }
    for (var kk = k_blocks * WGX; kk < p.k; kk++) {
        var b = array<vec4<f32>, 2>();
        if (TRANS_B) {
            if (kk % 4u == 0u) { bt = bt_block(z, col0, kk); }
            b = bt_row(bt, kk % 4u);
        } else {
            b = b_row(b_at, col0);
        }
        let a0 = a_column(rows0, kk * p.a_cs);
        if (ROWSUM && lid.x == 0u) { asum0 = acol_add(asum0, a0); }
        tile_step(&t0, a0, b[0], b[1]);
        if (MT > 1u) {
            let a1 = a_column(rows1, kk * p.a_cs);
            if (ROWSUM && lid.x == 0u) { asum1 = acol_add(asum1, a1); }
            tile_step(&t1, a1, b[0], b[1]);
        }
        b_at += b_stride();
    }
    store_tile(t0, row0, col0, z);
    if (MT > 1u) { store_tile(t1, row1, col0, z); }
    if (ROWSUM) {
        let total0 = acol_total(asum0);
        let total1 = acol_total(asum1);
        if (wg.x == 0u && lid.x == 0u) {
            store_rowsums(total0, row0);
            if (MT > 1u) { store_rowsums(total1, row1); }
        }
    }
}
