// Multi-head scaled-dot-product attention, flash style (FlashAttention-2,
// Dao 2023): O = softmax(Q K^T * scale) V per (batch, head), never holding
// more than a tile of scores. Tensors keep diffusers' pre-split layout:
// q/o [B, Sq, H*D], k/v [B, Sk, H*D]; head h of row i is the D values at
// (b * S + i) * HD + h * D. lse [B, H, Sq] is each row's natural-log
// logsumexp, saved by the forward for the backward.
//
// Every invocation owns a few rows (RQ) of one (batch, head) and keeps them
// in vec4 registers; a workgroup covers WG * RQ consecutive rows of one
// (batch, head) (workgroup id y = b * H + h), so the rows it streams (keys in
// the forward and dQ, queries in dK/dV) are the same for all its
// invocations and come from cache. No workgroup memory (costly on llvmpipe).
// Scores are kept in base-2 units (scaled by log2 e) so exp is exp2.
//
// D (head dim) is a specialization constant; a row is D4 vec4s, the last
// one partial when D is not a multiple of 4 (its lanes past D read a
// clamped address and are zeroed; they are never stored).

const D4: u32 = (D + 3u) / 4u;
const LOG2E: f32 = 1.4426950408889634;
const LN2: f32 = 0.6931471805599453;
// Score of a masked key: exp2(MASKED - m) is 0 for any real row max m.
const MASKED: f32 = -1.0e30;
// The last vec4 of a row: offsets of its elements, clamped to the last
// valid one, and which are valid.
const TAIL_OFF: vec4<u32> = min(vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>((D - 1u) % 4u));
const TAIL_MASK: vec4<bool> = vec4<u32>(0u, 1u, 2u, 3u) <= vec4<u32>((D - 1u) % 4u);

// Whether chunks are read and written as whole vectors: rows (of heads x D
// values) then start at multiples of 4. Otherwise element by element.
const VEC_ROWS: bool = D % 4u == 0u;

// Element offsets of chunk c of a row starting at `base` (the last chunk
// clamped to the row), and which are valid.
fn chunk_idx(base: u32, c: u32) -> vec4<u32> {
    return vec4<u32>(base + 4u * c) + select(vec4<u32>(0u, 1u, 2u, 3u), TAIL_OFF, c + 1u == D4);
}
fn chunk_mask(c: u32) -> vec4<bool> {
    return select(vec4<bool>(true), TAIL_MASK, c + 1u == D4);
}

// Key j is visible from query i (of sk keys, with the causal mask or not).
fn visible(i: u32, j: u32, sk: u32, causal: bool) -> bool {
    return j < sk && (!causal || j <= i);
}

// A head row of up to ROW_MAX_D values held as named 4x4 blocks (column c
// of block i is chunk 4i + c), not an array: compilers keep named values in
// registers, while an indexed array spills to scratch memory on llvmpipe.
// Chunks past D4 hold zeros and are skipped (the guards are constants).
const ROW_MAX_D: u32 = 64u;
struct Row { m0: mat4x4<f32>, m1: mat4x4<f32>, m2: mat4x4<f32>, m3: mat4x4<f32> }

// Chunks 4i.. of a . b, summed per component.
fn block_dot(a: mat4x4<f32>, b: mat4x4<f32>, i: u32) -> vec4<f32> {
    var v = a[0] * b[0];
    if (D4 > 4u * i + 1u) { v = fma(a[1], b[1], v); }
    if (D4 > 4u * i + 2u) { v = fma(a[2], b[2], v); }
    if (D4 > 4u * i + 3u) { v = fma(a[3], b[3], v); }
    return v;
}

fn row_dot(a: Row, b: Row) -> f32 {
    var v = block_dot(a.m0, b.m0, 0u);
    if (D4 > 4u) { v += block_dot(a.m1, b.m1, 1u); }
    if (D4 > 8u) { v += block_dot(a.m2, b.m2, 2u); }
    if (D4 > 12u) { v += block_dot(a.m3, b.m3, 3u); }
    return (v.x + v.y) + (v.z + v.w);
}

// acc * alpha + s * b over the chunks of block i.
fn block_fma(acc: mat4x4<f32>, alpha: f32, s: f32, b: mat4x4<f32>, i: u32) -> mat4x4<f32> {
    var o = mat4x4<f32>();
    o[0] = fma(vec4<f32>(s), b[0], acc[0] * alpha);
    if (D4 > 4u * i + 1u) { o[1] = fma(vec4<f32>(s), b[1], acc[1] * alpha); }
    if (D4 > 4u * i + 2u) { o[2] = fma(vec4<f32>(s), b[2], acc[2] * alpha); }
    if (D4 > 4u * i + 3u) { o[3] = fma(vec4<f32>(s), b[3], acc[3] * alpha); }
    return o;
}

// acc * alpha + s * b.
fn row_fma(acc: Row, alpha: f32, s: f32, b: Row) -> Row {
    var o = Row();
    o.m0 = block_fma(acc.m0, alpha, s, b.m0, 0u);
    if (D4 > 4u) { o.m1 = block_fma(acc.m1, alpha, s, b.m1, 1u); }
    if (D4 > 8u) { o.m2 = block_fma(acc.m2, alpha, s, b.m2, 2u); }
    if (D4 > 12u) { o.m3 = block_fma(acc.m3, alpha, s, b.m3, 3u); }
    return o;
}

// Chunk c of a row (c < D4).
fn row_chunk(r: Row, c: u32) -> vec4<f32> {
    switch (c / 4u) {
        case 0u: { return r.m0[c % 4u]; }
        case 1u: { return r.m1[c % 4u]; }
        case 2u: { return r.m2[c % 4u]; }
        default: { return r.m3[c % 4u]; }
    }
}

//@ helpers qkv_chunks
// Chunk c (4 values) of a q, k or v head row at base; zero past D and for c >= D4.
fn q_vec(base: u32, c: u32) -> vec4<f32> {
    if (c >= D4) { return vec4<f32>(); }
    if (VEC_ROWS) { return q_load4(base + 4u * c); }
    let ix = chunk_idx(base, c);
    return select(vec4<f32>(), vec4<f32>(q_load(ix.x), q_load(ix.y), q_load(ix.z), q_load(ix.w)), chunk_mask(c));
}
fn k_vec(base: u32, c: u32) -> vec4<f32> {
    if (c >= D4) { return vec4<f32>(); }
    if (VEC_ROWS) { return k_load4(base + 4u * c); }
    let ix = chunk_idx(base, c);
    return select(vec4<f32>(), vec4<f32>(k_load(ix.x), k_load(ix.y), k_load(ix.z), k_load(ix.w)), chunk_mask(c));
}
fn v_vec(base: u32, c: u32) -> vec4<f32> {
    if (c >= D4) { return vec4<f32>(); }
    if (VEC_ROWS) { return v_load4(base + 4u * c); }
    let ix = chunk_idx(base, c);
    return select(vec4<f32>(), vec4<f32>(v_load(ix.x), v_load(ix.y), v_load(ix.z), v_load(ix.w)), chunk_mask(c));
}

//@ helpers dout_chunks
// Chunk c of a dO head row at base, as above.
fn dout_vec(base: u32, c: u32) -> vec4<f32> {
    if (c >= D4) { return vec4<f32>(); }
    if (VEC_ROWS) { return dout_load4(base + 4u * c); }
    let ix = chunk_idx(base, c);
    return select(vec4<f32>(), vec4<f32>(dout_load(ix.x), dout_load(ix.y), dout_load(ix.z), dout_load(ix.w)), chunk_mask(c));
}

//@ entry attention_forward
//@ tensors q:read4 k:read4 v:read4 o:write4 lse:write
//@ const D = 4u
//@ const RQ = 4u
//@ const WG = 8u
//@ const KT = 8u
//@ const CAUSAL = false
//@ use qkv_chunks
// Online softmax over tiles of KT keys: per row keep the running max m, the
// running sum l of exp2(s - m) and acc = sum exp2(s - m) v; when the max
// grows, rescale l and acc by exp2(m_old - m_new). O = acc / l.
struct Params { sq: u32, sk: u32, heads: u32, hd: u32, scale_log2: f32 }


@compute @workgroup_size(WG)
fn attention_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let bh = wg.y;
    let b = bh / p.heads;
    let hoff = (bh % p.heads) * D;
    let row0 = wg.x * WG * RQ;
    var rows = array<u32, RQ>();
    var qr = array<vec4<f32>, RQ * D4>();
    var acc = array<vec4<f32>, RQ * D4>();
    var m = array<f32, RQ>();
    var l = array<f32, RQ>();
    for (var r = 0u; r < RQ; r++) {
        // Rows past the end compute on a clamped row and store nothing.
        rows[r] = min(row0 + r * WG + lane, p.sq - 1u);
        let base = (b * p.sq + rows[r]) * p.hd + hoff;
        for (var c = 0u; c < D4; c++) { qr[r * D4 + c] = q_vec(base, c) * p.scale_log2; }
        m[r] = MASKED;
    }
    let kbase = b * p.sk * p.hd + hoff;
    // Causal: keys past the workgroup's last row are masked for all its rows.
    var kend = p.sk;
    if (CAUSAL) { kend = min(p.sk, row0 + WG * RQ); }
    // The first tile holds key 0, visible to every row, so m is finite after it.
    for (var j0 = 0u; j0 < kend; j0 += KT) {
        var s = array<f32, RQ * KT>();
        for (var t = 0u; t < KT; t++) {
            let j = j0 + t;
            let kb = kbase + min(j, p.sk - 1u) * p.hd;
            var dots = array<f32, RQ>();
            for (var c = 0u; c < D4; c++) {
                let kc = k_vec(kb, c);
                for (var r = 0u; r < RQ; r++) { dots[r] += dot(qr[r * D4 + c], kc); }
            }
            for (var r = 0u; r < RQ; r++) {
                s[r * KT + t] = select(MASKED, dots[r], visible(rows[r], j, p.sk, CAUSAL));
            }
        }
        for (var r = 0u; r < RQ; r++) {
            var mt = m[r];
            for (var t = 0u; t < KT; t++) { mt = max(mt, s[r * KT + t]); }
            let alpha = exp2(m[r] - mt);
            m[r] = mt;
            var sum = 0.0;
            for (var t = 0u; t < KT; t++) {
                let e = exp2(s[r * KT + t] - mt);
                s[r * KT + t] = e;
                sum += e;
            }
            l[r] = l[r] * alpha + sum;
            for (var c = 0u; c < D4; c++) { acc[r * D4 + c] *= alpha; }
        }
        for (var t = 0u; t < KT; t++) {
            let vb = kbase + min(j0 + t, p.sk - 1u) * p.hd;
            for (var c = 0u; c < D4; c++) {
                let vc = v_vec(vb, c);
                for (var r = 0u; r < RQ; r++) {
                    acc[r * D4 + c] = fma(vec4<f32>(s[r * KT + t]), vc, acc[r * D4 + c]);
                }
            }
        }
    }
    for (var r = 0u; r < RQ; r++) {
        let row = row0 + r * WG + lane;
        if (row >= p.sq) { break; }
        lse_store(bh * p.sq + row, (m[r] + log2(l[r])) * LN2);
        let inv = 1.0 / l[r];
        let base = (b * p.sq + row) * p.hd + hoff;
        for (var c = 0u; c < D4; c++) {
            let val = acc[r * D4 + c] * inv;
            if (VEC_ROWS) {
                o_store4(base + 4u * c, val);
            } else {
                for (var e = 0u; e < min(4u, D - 4u * c); e++) { o_store(base + 4u * c + e, val[e]); }
            }
        }
    }
}

//@ helpers sg_rows
// For the subgroup kernels: rows of q, k and v as Row values (zero past D),
// and row t of a subgroup lane's Row.
// Up to 4 rows of one invocation, row r in field r (its scalars are
// component r of a vec4); RQ <= 4 of them are in use.
struct Rows { r0: Row, r1: Row, r2: Row, r3: Row }

// The dot product of each row with b.
fn rows_dot(a: Rows, b: Row) -> vec4<f32> {
    var s = vec4<f32>(row_dot(a.r0, b), 0.0, 0.0, 0.0);
    if (RQ > 1u) { s.y = row_dot(a.r1, b); }
    if (RQ > 2u) { s.z = row_dot(a.r2, b); }
    if (RQ > 3u) { s.w = row_dot(a.r3, b); }
    return s;
}

// Row r becomes acc_r * alpha[r] + s[r] * b.
fn rows_fma(acc: Rows, alpha: vec4<f32>, s: vec4<f32>, b: Row) -> Rows {
    var o = Rows();
    o.r0 = row_fma(acc.r0, alpha.x, s.x, b);
    if (RQ > 1u) { o.r1 = row_fma(acc.r1, alpha.y, s.y, b); }
    if (RQ > 2u) { o.r2 = row_fma(acc.r2, alpha.z, s.z, b); }
    if (RQ > 3u) { o.r3 = row_fma(acc.r3, alpha.w, s.w, b); }
    return o;
}

fn q_block(base: u32, c: u32) -> mat4x4<f32> {
    return mat4x4<f32>(q_vec(base, c), q_vec(base, c + 1u), q_vec(base, c + 2u), q_vec(base, c + 3u));
}
fn k_block(base: u32, c: u32) -> mat4x4<f32> {
    return mat4x4<f32>(k_vec(base, c), k_vec(base, c + 1u), k_vec(base, c + 2u), k_vec(base, c + 3u));
}
fn v_block(base: u32, c: u32) -> mat4x4<f32> {
    return mat4x4<f32>(v_vec(base, c), v_vec(base, c + 1u), v_vec(base, c + 2u), v_vec(base, c + 3u));
}

// Query row `row` (clamped to the last) of batch b, head offset hoff.
fn q_row(b: u32, row: u32, hoff: u32) -> Row {
    let base = (b * p.sq + min(row, p.sq - 1u)) * p.hd + hoff;
    return Row(q_block(base, 0u), q_block(base, 4u), q_block(base, 8u), q_block(base, 12u));
}

fn row_scaled(r: Row, s: f32) -> Row {
    return Row(r.m0 * s, r.m1 * s, r.m2 * s, r.m3 * s);
}

// Query rows `rows` times s.
fn q_rows(b: u32, rows: vec4<u32>, hoff: u32, s: f32) -> Rows {
    var o = Rows();
    o.r0 = row_scaled(q_row(b, rows.x, hoff), s);
    if (RQ > 1u) { o.r1 = row_scaled(q_row(b, rows.y, hoff), s); }
    if (RQ > 2u) { o.r2 = row_scaled(q_row(b, rows.z, hoff), s); }
    if (RQ > 3u) { o.r3 = row_scaled(q_row(b, rows.w, hoff), s); }
    return o;
}

// Key and value row j (clamped to the last) of batch b, head offset hoff.
fn k_row(b: u32, j: u32, hoff: u32) -> Row {
    let base = (b * p.sk + min(j, p.sk - 1u)) * p.hd + hoff;
    return Row(k_block(base, 0u), k_block(base, 4u), k_block(base, 8u), k_block(base, 12u));
}
fn v_row(b: u32, j: u32, hoff: u32) -> Row {
    let base = (b * p.sk + min(j, p.sk - 1u)) * p.hd + hoff;
    return Row(v_block(base, 0u), v_block(base, 4u), v_block(base, 8u), v_block(base, 12u));
}

// Which of the rows see key j.
fn visible4(rows: vec4<u32>, j: u32) -> vec4<bool> {
    return vec4<bool>(j < p.sk) & (vec4<bool>(!CAUSAL) | vec4<u32>(j) <= rows);
}

// Block i of lane t's row.
fn block_shuffle(m: mat4x4<f32>, i: u32, t: u32) -> mat4x4<f32> {
    var o = mat4x4<f32>();
    o[0] = subgroupShuffle(m[0], t);
    if (D4 > 4u * i + 1u) { o[1] = subgroupShuffle(m[1], t); }
    if (D4 > 4u * i + 2u) { o[2] = subgroupShuffle(m[2], t); }
    if (D4 > 4u * i + 3u) { o[3] = subgroupShuffle(m[3], t); }
    return o;
}

fn row_shuffle(r: Row, t: u32) -> Row {
    var o = Row();
    o.m0 = block_shuffle(r.m0, 0u, t);
    if (D4 > 4u) { o.m1 = block_shuffle(r.m1, 1u, t); }
    if (D4 > 8u) { o.m2 = block_shuffle(r.m2, 2u, t); }
    if (D4 > 12u) { o.m3 = block_shuffle(r.m3, 3u, t); }
    return o;
}

//@ entry attention_forward_subgroup
//@ tensors q:read4 k:read4 v:read4 o:write4 lse:write
//@ const D = 4u
//@ const RQ = 4u
//@ const CAUSAL = false
//@ use sg_rows
//@ use qkv_chunks
// attention_forward for adapters with 8-wide subgroups (llvmpipe) and
// D <= ROW_MAX_D. The workgroup is one subgroup; each lane owns RQ <= 4
// query rows (row r of lane l is row0 + r * WG + l; per-row scalars are
// component r of a vec4). Keys go in blocks of WG: lane l loads key and
// value row j0 + l once and subgroupShuffle hands row j0 + t to every lane,
// so each K/V element is loaded once per workgroup, not once per query row.
// Same online softmax as attention_forward, rescaling once per block.
struct Params { sq: u32, sk: u32, heads: u32, hd: u32, scale_log2: f32 }
const WG: u32 = 8u;

// Base-2 scores of the lane's rows (component r) against key j (row kj).
fn scores(q: Rows, kj: Row, j: u32, rows: vec4<u32>) -> vec4<f32> {
    return select(vec4<f32>(MASKED), rows_dot(q, kj), visible4(rows, j));
}

fn store_row(acc: Row, b: u32, bh: u32, row: u32, hoff: u32, m: f32, l: f32) {
    if (row >= p.sq) { return; }
    lse_store(bh * p.sq + row, (m + log2(l)) * LN2);
    let inv = 1.0 / l;
    let base = (b * p.sq + row) * p.hd + hoff;
    for (var c = 0u; c < D4; c++) {
        let val = row_chunk(acc, c) * inv;
        if (VEC_ROWS) {
            o_store4(base + 4u * c, val);
        } else {
            for (var e = 0u; e < min(4u, D - 4u * c); e++) { o_store(base + 4u * c + e, val[e]); }
        }
    }
}

@compute @workgroup_size(WG)
fn attention_forward_subgroup(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let bh = wg.y;
    let b = bh / p.heads;
    let hoff = (bh % p.heads) * D;
    let row0 = wg.x * WG * RQ;
    // Rows past the end compute on a clamped row and store nothing.
    let rows = vec4<u32>(row0 + lane) + vec4<u32>(0u, 1u, 2u, 3u) * WG;
    let q = q_rows(b, rows, hoff, p.scale_log2);
    var acc = Rows();
    var m = vec4<f32>(MASKED);
    var l = vec4<f32>();
    var kend = p.sk;
    if (CAUSAL) { kend = min(p.sk, row0 + WG * RQ); }
    // The first block holds key 0, visible to every row, so m is finite after it.
    for (var j0 = 0u; j0 < kend; j0 += WG) {
        let kl = k_row(b, j0 + lane, hoff);
        let vl = v_row(b, j0 + lane, hoff);
        let s0 = scores(q, row_shuffle(kl, 0u), j0, rows);
        let s1 = scores(q, row_shuffle(kl, 1u), j0 + 1u, rows);
        let s2 = scores(q, row_shuffle(kl, 2u), j0 + 2u, rows);
        let s3 = scores(q, row_shuffle(kl, 3u), j0 + 3u, rows);
        let s4 = scores(q, row_shuffle(kl, 4u), j0 + 4u, rows);
        let s5 = scores(q, row_shuffle(kl, 5u), j0 + 5u, rows);
        let s6 = scores(q, row_shuffle(kl, 6u), j0 + 6u, rows);
        let s7 = scores(q, row_shuffle(kl, 7u), j0 + 7u, rows);
        let mt = max(m, max(max(max(s0, s1), max(s2, s3)), max(max(s4, s5), max(s6, s7))));
        let alpha = exp2(m - mt);
        m = mt;
        let p0 = exp2(s0 - mt);
        let p1 = exp2(s1 - mt);
        let p2 = exp2(s2 - mt);
        let p3 = exp2(s3 - mt);
        let p4 = exp2(s4 - mt);
        let p5 = exp2(s5 - mt);
        let p6 = exp2(s6 - mt);
        let p7 = exp2(s7 - mt);
        l = l * alpha + (((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7)));
        let one = vec4<f32>(1.0);
        acc = rows_fma(acc, alpha, p0, row_shuffle(vl, 0u));
        acc = rows_fma(acc, one, p1, row_shuffle(vl, 1u));
        acc = rows_fma(acc, one, p2, row_shuffle(vl, 2u));
        acc = rows_fma(acc, one, p3, row_shuffle(vl, 3u));
        acc = rows_fma(acc, one, p4, row_shuffle(vl, 4u));
        acc = rows_fma(acc, one, p5, row_shuffle(vl, 5u));
        acc = rows_fma(acc, one, p6, row_shuffle(vl, 6u));
        acc = rows_fma(acc, one, p7, row_shuffle(vl, 7u));
    }
    store_row(acc.r0, b, bh, rows.x, hoff, m.x, l.x);
    if (RQ > 1u) { store_row(acc.r1, b, bh, rows.y, hoff, m.y, l.y); }
    if (RQ > 2u) { store_row(acc.r2, b, bh, rows.z, hoff, m.z, l.z); }
    if (RQ > 3u) { store_row(acc.r3, b, bh, rows.w, hoff, m.w, l.w); }
}

//@ entry attention_delta
//@ tensors o:read4 dout:read4 delta:write
//@ const D = 4u
//@ const WG = 64u
//@ use dout_chunks
// delta[b, h, i] = sum_d dO[b, i, h, d] * O[b, i, h, d] (FlashAttention-2's
// D_i = rowsum(dO o O)), one row per invocation.
struct Params { n: u32, sq: u32, heads: u32, hd: u32 }

fn o_vec(base: u32, c: u32) -> vec4<f32> {
    if (VEC_ROWS) { return o_load4(base + 4u * c); }
    let ix = chunk_idx(base, c);
    return select(vec4<f32>(), vec4<f32>(o_load(ix.x), o_load(ix.y), o_load(ix.z), o_load(ix.w)), chunk_mask(c));
}

@compute @workgroup_size(WG)
fn attention_delta(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = flat_id(gid, nwg, WG);
    if (idx >= p.n) { return; }
    let bh = idx / p.sq;
    let i = idx % p.sq;
    let base = ((bh / p.heads) * p.sq + i) * p.hd + (bh % p.heads) * D;
    var acc = vec4<f32>();
    for (var c = 0u; c < D4; c++) { acc = fma(dout_vec(base, c), o_vec(base, c), acc); }
    delta_store(idx, acc.x + acc.y + acc.z + acc.w);
}

//@ entry attention_backward_dq
//@ tensors q:read4 k:read4 v:read4 dout:read4 lse:read delta:read dq:rw4
//@ const D = 4u
//@ const RQ = 4u
//@ const WG = 8u
//@ const CAUSAL = false
//@ use qkv_chunks
//@ use dout_chunks
// dQ_i = scale * sum_j P_ij (dP_ij - delta_i) K_j with P_ij = exp(S_ij - L_i)
// recomputed from the saved logsumexp and dP_ij = dO_i . V_j. Each invocation
// owns RQ query rows and streams all keys.
struct Params { sq: u32, sk: u32, heads: u32, hd: u32, scale: f32, beta: f32 }

fn dq_vec(base: u32, c: u32) -> vec4<f32> {
    if (VEC_ROWS) { return dq_load4(base + 4u * c); }
    let ix = chunk_idx(base, c);
    return select(vec4<f32>(), vec4<f32>(dq_load(ix.x), dq_load(ix.y), dq_load(ix.z), dq_load(ix.w)), chunk_mask(c));
}

@compute @workgroup_size(WG)
fn attention_backward_dq(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let bh = wg.y;
    let b = bh / p.heads;
    let hoff = (bh % p.heads) * D;
    let row0 = wg.x * WG * RQ;
    let scale_log2 = p.scale * LOG2E;
    var rows = array<u32, RQ>();
    var qr = array<vec4<f32>, RQ * D4>();
    var dor = array<vec4<f32>, RQ * D4>();
    var acc = array<vec4<f32>, RQ * D4>();
    var lse2 = array<f32, RQ>();
    var dl = array<f32, RQ>();
    for (var r = 0u; r < RQ; r++) {
        rows[r] = min(row0 + r * WG + lane, p.sq - 1u);
        let base = (b * p.sq + rows[r]) * p.hd + hoff;
        for (var c = 0u; c < D4; c++) {
            qr[r * D4 + c] = q_vec(base, c) * scale_log2;
            dor[r * D4 + c] = dout_vec(base, c);
        }
        lse2[r] = lse_load(bh * p.sq + rows[r]) * LOG2E;
        dl[r] = delta_load(bh * p.sq + rows[r]);
    }
    let kbase = b * p.sk * p.hd + hoff;
    var kend = p.sk;
    if (CAUSAL) { kend = min(p.sk, row0 + WG * RQ); }
    for (var j = 0u; j < kend; j++) {
        let kb = kbase + j * p.hd;
        var s = array<f32, RQ>();
        var dp = array<f32, RQ>();
        for (var c = 0u; c < D4; c++) {
            let kc = k_vec(kb, c);
            let vc = v_vec(kb, c);
            for (var r = 0u; r < RQ; r++) {
                s[r] += dot(qr[r * D4 + c], kc);
                dp[r] += dot(dor[r * D4 + c], vc);
            }
        }
        for (var r = 0u; r < RQ; r++) {
            let pr = select(0.0, exp2(s[r] - lse2[r]), visible(rows[r], j, p.sk, CAUSAL));
            s[r] = pr * (dp[r] - dl[r]);
        }
        for (var c = 0u; c < D4; c++) {
            let kc = k_vec(kb, c);
            for (var r = 0u; r < RQ; r++) { acc[r * D4 + c] = fma(vec4<f32>(s[r]), kc, acc[r * D4 + c]); }
        }
    }
    for (var r = 0u; r < RQ; r++) {
        let row = row0 + r * WG + lane;
        if (row >= p.sq) { break; }
        let base = (b * p.sq + row) * p.hd + hoff;
        for (var c = 0u; c < D4; c++) {
            var val = acc[r * D4 + c] * p.scale;
            if (p.beta != 0.0) { val += dq_vec(base, c); }
            if (VEC_ROWS) {
                dq_store4(base + 4u * c, val);
            } else {
                for (var e = 0u; e < min(4u, D - 4u * c); e++) { dq_store(base + 4u * c + e, val[e]); }
            }
        }
    }
}

//@ helpers sg_dout
// dO rows as Row values for the subgroup backward kernels.
fn dout_block(base: u32, c: u32) -> mat4x4<f32> {
    return mat4x4<f32>(dout_vec(base, c), dout_vec(base, c + 1u), dout_vec(base, c + 2u), dout_vec(base, c + 3u));
}
fn dout_row(b: u32, row: u32, hoff: u32) -> Row {
    let base = (b * p.sq + min(row, p.sq - 1u)) * p.hd + hoff;
    return Row(dout_block(base, 0u), dout_block(base, 4u), dout_block(base, 8u), dout_block(base, 12u));
}

//@ entry attention_backward_dq_subgroup
//@ tensors q:read4 k:read4 v:read4 dout:read4 lse:read delta:read dq:rw4
//@ const D = 4u
//@ const RQ = 4u
//@ const CAUSAL = false
//@ use sg_rows
//@ use sg_dout
//@ use qkv_chunks
//@ use dout_chunks
// attention_backward_dq for 8-wide subgroups and D <= ROW_MAX_D, laid out
// as attention_forward_subgroup: RQ query rows per lane, key and value
// rows shared by subgroupShuffle in blocks of WG.
struct Params { sq: u32, sk: u32, heads: u32, hd: u32, scale: f32, beta: f32 }
const WG: u32 = 8u;

fn dq_vec(base: u32, c: u32) -> vec4<f32> {
    if (VEC_ROWS) { return dq_load4(base + 4u * c); }
    let ix = chunk_idx(base, c);
    return select(vec4<f32>(), vec4<f32>(dq_load(ix.x), dq_load(ix.y), dq_load(ix.z), dq_load(ix.w)), chunk_mask(c));
}
fn store_row(acc: Row, b: u32, row: u32, hoff: u32) {
    if (row >= p.sq) { return; }
    let base = (b * p.sq + row) * p.hd + hoff;
    for (var c = 0u; c < D4; c++) {
        var val = row_chunk(acc, c) * p.scale;
        if (p.beta != 0.0) { val += dq_vec(base, c); }
        if (VEC_ROWS) {
            dq_store4(base + 4u * c, val);
        } else {
            for (var e = 0u; e < min(4u, D - 4u * c); e++) { dq_store(base + 4u * c + e, val[e]); }
        }
    }
}

@compute @workgroup_size(WG)
fn attention_backward_dq_subgroup(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let bh = wg.y;
    let b = bh / p.heads;
    let hoff = (bh % p.heads) * D;
    let row0 = wg.x * WG * RQ;
    let rows = vec4<u32>(row0 + lane) + vec4<u32>(0u, 1u, 2u, 3u) * WG;
    let q = q_rows(b, rows, hoff, p.scale * LOG2E);
    var dor = Rows();
    dor.r0 = dout_row(b, rows.x, hoff);
    if (RQ > 1u) { dor.r1 = dout_row(b, rows.y, hoff); }
    if (RQ > 2u) { dor.r2 = dout_row(b, rows.z, hoff); }
    if (RQ > 3u) { dor.r3 = dout_row(b, rows.w, hoff); }
    let stat = bh * p.sq + min(rows, vec4<u32>(p.sq - 1u));
    let lse2 = vec4<f32>(lse_load(stat.x), lse_load(stat.y), lse_load(stat.z), lse_load(stat.w)) * LOG2E;
    let dl = vec4<f32>(delta_load(stat.x), delta_load(stat.y), delta_load(stat.z), delta_load(stat.w));
    var acc = Rows();
    var kend = p.sk;
    if (CAUSAL) { kend = min(p.sk, row0 + WG * RQ); }
    for (var j0 = 0u; j0 < kend; j0 += WG) {
        let kl = k_row(b, j0 + lane, hoff);
        let vl = v_row(b, j0 + lane, hoff);
        for (var t = 0u; t < WG; t++) {
            let kj = row_shuffle(kl, t);
            let pr = select(vec4<f32>(), exp2(rows_dot(q, kj) - lse2), visible4(rows, j0 + t));
            let ds = pr * (rows_dot(dor, row_shuffle(vl, t)) - dl);
            acc = rows_fma(acc, vec4<f32>(1.0), ds, kj);
        }
    }
    store_row(acc.r0, b, rows.x, hoff);
    if (RQ > 1u) { store_row(acc.r1, b, rows.y, hoff); }
    if (RQ > 2u) { store_row(acc.r2, b, rows.z, hoff); }
    if (RQ > 3u) { store_row(acc.r3, b, rows.w, hoff); }
}

//@ entry attention_backward_dkv_subgroup
//@ tensors q:read4 k:read4 v:read4 dout:read4 lse:read delta:read dk:rw4 dv:rw4
//@ const D = 4u
//@ const RQ = 4u
//@ const CAUSAL = false
//@ const HAS_DK = true
//@ const HAS_DV = true
//@ use sg_rows
//@ use sg_dout
//@ use qkv_chunks
//@ use dout_chunks
// attention_backward_dkv for 8-wide subgroups and D <= ROW_MAX_D: each lane
// owns RQ key rows (row r of lane l is row0 + r * WG + l); queries go in
// blocks of WG, lane l loading query i0 + l (q, dO, lse, delta) and
// subgroupShuffle handing query i0 + t to every lane.
struct Params { sq: u32, sk: u32, heads: u32, hd: u32, scale: f32, beta_k: f32, beta_v: f32 }
const WG: u32 = 8u;

fn dk_vec(base: u32, c: u32) -> vec4<f32> {
    if (VEC_ROWS) { return dk_load4(base + 4u * c); }
    let ix = chunk_idx(base, c);
    return select(vec4<f32>(), vec4<f32>(dk_load(ix.x), dk_load(ix.y), dk_load(ix.z), dk_load(ix.w)), chunk_mask(c));
}
fn dv_vec(base: u32, c: u32) -> vec4<f32> {
    if (VEC_ROWS) { return dv_load4(base + 4u * c); }
    let ix = chunk_idx(base, c);
    return select(vec4<f32>(), vec4<f32>(dv_load(ix.x), dv_load(ix.y), dv_load(ix.z), dv_load(ix.w)), chunk_mask(c));
}

fn store_row(dk: Row, dv: Row, b: u32, row: u32, hoff: u32) {
    if (row >= p.sk) { return; }
    let base = (b * p.sk + row) * p.hd + hoff;
    for (var c = 0u; c < D4; c++) {
        if (HAS_DK) {
            var val = row_chunk(dk, c) * p.scale;
            if (p.beta_k != 0.0) { val += dk_vec(base, c); }
            if (VEC_ROWS) {
                dk_store4(base + 4u * c, val);
            } else {
                for (var e = 0u; e < min(4u, D - 4u * c); e++) { dk_store(base + 4u * c + e, val[e]); }
            }
        }
        if (HAS_DV) {
            var val = row_chunk(dv, c);
            if (p.beta_v != 0.0) { val += dv_vec(base, c); }
            if (VEC_ROWS) {
                dv_store4(base + 4u * c, val);
            } else {
                for (var e = 0u; e < min(4u, D - 4u * c); e++) { dv_store(base + 4u * c + e, val[e]); }
            }
        }
    }
}

@compute @workgroup_size(WG)
fn attention_backward_dkv_subgroup(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let bh = wg.y;
    let b = bh / p.heads;
    let hoff = (bh % p.heads) * D;
    let row0 = wg.x * WG * RQ;
    let scale_log2 = p.scale * LOG2E;
    // Rows past the end compute on a clamped row and store nothing.
    let rows = vec4<u32>(row0 + lane) + vec4<u32>(0u, 1u, 2u, 3u) * WG;
    var kr = Rows();
    var vr = Rows();
    kr.r0 = k_row(b, rows.x, hoff);
    vr.r0 = v_row(b, rows.x, hoff);
    if (RQ > 1u) { kr.r1 = k_row(b, rows.y, hoff); vr.r1 = v_row(b, rows.y, hoff); }
    if (RQ > 2u) { kr.r2 = k_row(b, rows.z, hoff); vr.r2 = v_row(b, rows.z, hoff); }
    if (RQ > 3u) { kr.r3 = k_row(b, rows.w, hoff); vr.r3 = v_row(b, rows.w, hoff); }
    var dk = Rows();
    var dv = Rows();
    let one = vec4<f32>(1.0);
    // Causal: queries before the workgroup's first key see none of its keys.
    var i0 = 0u;
    if (CAUSAL) { i0 = min(row0, p.sq); }
    for (; i0 < p.sq; i0 += WG) {
        let mine = min(i0 + lane, p.sq - 1u);
        let ql = q_row(b, mine, hoff);
        let dol = dout_row(b, mine, hoff);
        let lse2l = lse_load(bh * p.sq + mine) * LOG2E;
        let dll = delta_load(bh * p.sq + mine);
        for (var t = 0u; t < WG; t++) {
            let i = i0 + t;
            let qi = row_shuffle(ql, t);
            let doi = row_shuffle(dol, t);
            // Key j is visible from query i when i is real and (causal) j <= i.
            let vis = vec4<bool>(i < p.sq) & (vec4<bool>(!CAUSAL) | rows <= vec4<u32>(i));
            let pr = select(vec4<f32>(), exp2(rows_dot(kr, qi) * scale_log2 - subgroupShuffle(lse2l, t)), vis);
            let ds = pr * (rows_dot(vr, doi) - subgroupShuffle(dll, t));
            if (HAS_DV) { dv = rows_fma(dv, one, pr, doi); }
            if (HAS_DK) { dk = rows_fma(dk, one, ds, qi); }
        }
    }
    store_row(dk.r0, dv.r0, b, rows.x, hoff);
    if (RQ > 1u) { store_row(dk.r1, dv.r1, b, rows.y, hoff); }
    if (RQ > 2u) { store_row(dk.r2, dv.r2, b, rows.z, hoff); }
    if (RQ > 3u) { store_row(dk.r3, dv.r3, b, rows.w, hoff); }
}

//@ entry attention_backward_dkv
//@ tensors q:read4 k:read4 v:read4 dout:read4 lse:read delta:read dk:rw4 dv:rw4
//@ const D = 4u
//@ const RQ = 4u
//@ const WG = 8u
//@ const CAUSAL = false
//@ const HAS_DK = true
//@ const HAS_DV = true
//@ use qkv_chunks
//@ use dout_chunks
// dV_j = sum_i P_ij dO_i and dK_j = scale * sum_i P_ij (dP_ij - delta_i) Q_i.
// Each invocation owns RQ key rows and streams the queries that see them.
struct Params { sq: u32, sk: u32, heads: u32, hd: u32, scale: f32, beta_k: f32, beta_v: f32 }

fn dk_vec(base: u32, c: u32) -> vec4<f32> {
    if (VEC_ROWS) { return dk_load4(base + 4u * c); }
    let ix = chunk_idx(base, c);
    return select(vec4<f32>(), vec4<f32>(dk_load(ix.x), dk_load(ix.y), dk_load(ix.z), dk_load(ix.w)), chunk_mask(c));
}
fn dv_vec(base: u32, c: u32) -> vec4<f32> {
    if (VEC_ROWS) { return dv_load4(base + 4u * c); }
    let ix = chunk_idx(base, c);
    return select(vec4<f32>(), vec4<f32>(dv_load(ix.x), dv_load(ix.y), dv_load(ix.z), dv_load(ix.w)), chunk_mask(c));
}

@compute @workgroup_size(WG)
fn attention_backward_dkv(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let bh = wg.y;
    let b = bh / p.heads;
    let hoff = (bh % p.heads) * D;
    let row0 = wg.x * WG * RQ;
    let scale_log2 = p.scale * LOG2E;
    var rows = array<u32, RQ>();
    var kr = array<vec4<f32>, RQ * D4>();
    var vr = array<vec4<f32>, RQ * D4>();
    var dk = array<vec4<f32>, RQ * D4>();
    var dv = array<vec4<f32>, RQ * D4>();
    for (var r = 0u; r < RQ; r++) {
        rows[r] = min(row0 + r * WG + lane, p.sk - 1u);
        let base = (b * p.sk + rows[r]) * p.hd + hoff;
        for (var c = 0u; c < D4; c++) {
            kr[r * D4 + c] = k_vec(base, c) * scale_log2;
            vr[r * D4 + c] = v_vec(base, c);
        }
    }
    let qbase = b * p.sq * p.hd + hoff;
    // Causal: queries before the workgroup's first key see none of its keys.
    var i0 = 0u;
    if (CAUSAL) { i0 = min(row0, p.sq); }
    for (var i = i0; i < p.sq; i++) {
        let qb = qbase + i * p.hd;
        var s = array<f32, RQ>();
        var dp = array<f32, RQ>();
        for (var c = 0u; c < D4; c++) {
            let qc = q_vec(qb, c);
            let doc = dout_vec(qb, c);
            for (var r = 0u; r < RQ; r++) {
                s[r] += dot(kr[r * D4 + c], qc);
                dp[r] += dot(vr[r * D4 + c], doc);
            }
        }
        let lse2 = lse_load(bh * p.sq + i) * LOG2E;
        let dl = delta_load(bh * p.sq + i);
        for (var r = 0u; r < RQ; r++) {
            let pr = select(0.0, exp2(s[r] - lse2), visible(i, rows[r], p.sk, CAUSAL));
            s[r] = pr;
            dp[r] = pr * (dp[r] - dl);
        }
        for (var c = 0u; c < D4; c++) {
            let qc = q_vec(qb, c);
            let doc = dout_vec(qb, c);
            for (var r = 0u; r < RQ; r++) {
                dv[r * D4 + c] = fma(vec4<f32>(s[r]), doc, dv[r * D4 + c]);
                dk[r * D4 + c] = fma(vec4<f32>(dp[r]), qc, dk[r * D4 + c]);
            }
        }
    }
    for (var r = 0u; r < RQ; r++) {
        let row = row0 + r * WG + lane;
        if (row >= p.sk) { break; }
        let base = (b * p.sk + row) * p.hd + hoff;
        for (var c = 0u; c < D4; c++) {
            if (HAS_DK) {
                var val = dk[r * D4 + c] * p.scale;
                if (p.beta_k != 0.0) { val += dk_vec(base, c); }
                if (VEC_ROWS) {
                    dk_store4(base + 4u * c, val);
                } else {
                    for (var e = 0u; e < min(4u, D - 4u * c); e++) { dk_store(base + 4u * c + e, val[e]); }
                }
            }
            if (HAS_DV) {
                var val = dv[r * D4 + c];
                if (p.beta_v != 0.0) { val += dv_vec(base, c); }
                if (VEC_ROWS) {
                    dv_store4(base + 4u * c, val);
                } else {
                    for (var e = 0u; e < min(4u, D - 4u * c); e++) { dv_store(base + 4u * c + e, val[e]); }
                }
            }
        }
    }
}
