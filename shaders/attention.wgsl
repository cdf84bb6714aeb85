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

// Whether chunk c of a row is a full vec4.
fn full_chunk(c: u32) -> bool {
    return D % 4u == 0u || c + 1u < D4;
}

// Element offsets of chunk c of a row starting at `base`.
fn chunk_idx(base: u32, c: u32) -> vec4<u32> {
    return vec4<u32>(base + 4u * c) + TAIL_OFF;
}

// Key j is visible from query i (of sk keys, with the causal mask or not).
fn visible(i: u32, j: u32, sk: u32, causal: bool) -> bool {
    return j < sk && (!causal || j <= i);
}

//@ entry attention_forward
//@ tensors q:read k:read v:read o:write lse:write
//@ const D = 4u
//@ const RQ = 4u
//@ const WG = 8u
//@ const KT = 8u
//@ const CAUSAL = false
// Online softmax over tiles of KT keys: per row keep the running max m, the
// running sum l of exp2(s - m) and acc = sum exp2(s - m) v; when the max
// grows, rescale l and acc by exp2(m_old - m_new). O = acc / l.
struct Params { sq: u32, sk: u32, heads: u32, hd: u32, scale_log2: f32 }

fn q_vec(base: u32, c: u32) -> vec4<f32> {
    if (full_chunk(c)) { return q_load4(base + 4u * c); }
    let ix = chunk_idx(base, c);
    return select(vec4<f32>(), vec4<f32>(q_load(ix.x), q_load(ix.y), q_load(ix.z), q_load(ix.w)), TAIL_MASK);
}
fn k_vec(base: u32, c: u32) -> vec4<f32> {
    if (full_chunk(c)) { return k_load4(base + 4u * c); }
    let ix = chunk_idx(base, c);
    return select(vec4<f32>(), vec4<f32>(k_load(ix.x), k_load(ix.y), k_load(ix.z), k_load(ix.w)), TAIL_MASK);
}
fn v_vec(base: u32, c: u32) -> vec4<f32> {
    if (full_chunk(c)) { return v_load4(base + 4u * c); }
    let ix = chunk_idx(base, c);
    return select(vec4<f32>(), vec4<f32>(v_load(ix.x), v_load(ix.y), v_load(ix.z), v_load(ix.w)), TAIL_MASK);
}

@compute @workgroup_size(WG)
fn attention_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let bh = wg.y;
    let b = bh / p.heads;
    let hoff = (bh % p.heads) * D;
    let row0 = wg.x * WG * RQ;
    var rows: array<u32, RQ>;
    var qr: array<vec4<f32>, RQ * D4>;
    var acc: array<vec4<f32>, RQ * D4>;
    var m: array<f32, RQ>;
    var l: array<f32, RQ>;
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
        var s: array<f32, RQ * KT>;
        for (var t = 0u; t < KT; t++) {
            let j = j0 + t;
            let kb = kbase + min(j, p.sk - 1u) * p.hd;
            var dots: array<f32, RQ>;
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
            if (full_chunk(c)) {
                o_store4(base + 4u * c, val);
            } else {
                for (var e = 0u; e < D - 4u * c; e++) { o_store(base + 4u * c + e, val[e]); }
            }
        }
    }
}

//@ entry attention_delta
//@ tensors o:read dout:read delta:write
//@ const D = 4u
//@ const WG = 64u
// delta[b, h, i] = sum_d dO[b, i, h, d] * O[b, i, h, d] (FlashAttention-2's
// D_i = rowsum(dO o O)), one row per invocation.
struct Params { n: u32, sq: u32, heads: u32, hd: u32 }

fn o_vec(base: u32, c: u32) -> vec4<f32> {
    if (full_chunk(c)) { return o_load4(base + 4u * c); }
    let ix = chunk_idx(base, c);
    return select(vec4<f32>(), vec4<f32>(o_load(ix.x), o_load(ix.y), o_load(ix.z), o_load(ix.w)), TAIL_MASK);
}
fn dout_vec(base: u32, c: u32) -> vec4<f32> {
    if (full_chunk(c)) { return dout_load4(base + 4u * c); }
    let ix = chunk_idx(base, c);
    return select(vec4<f32>(), vec4<f32>(dout_load(ix.x), dout_load(ix.y), dout_load(ix.z), dout_load(ix.w)), TAIL_MASK);
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
//@ tensors q:read k:read v:read dout:read lse:read delta:read dq:rw
//@ const D = 4u
//@ const RQ = 4u
//@ const WG = 8u
//@ const CAUSAL = false
// dQ_i = scale * sum_j P_ij (dP_ij - delta_i) K_j with P_ij = exp(S_ij - L_i)
// recomputed from the saved logsumexp and dP_ij = dO_i . V_j. Each invocation
// owns RQ query rows and streams all keys.
struct Params { sq: u32, sk: u32, heads: u32, hd: u32, scale: f32, beta: f32 }

fn q_vec(base: u32, c: u32) -> vec4<f32> {
    if (full_chunk(c)) { return q_load4(base + 4u * c); }
    let ix = chunk_idx(base, c);
    return select(vec4<f32>(), vec4<f32>(q_load(ix.x), q_load(ix.y), q_load(ix.z), q_load(ix.w)), TAIL_MASK);
}
fn k_vec(base: u32, c: u32) -> vec4<f32> {
    if (full_chunk(c)) { return k_load4(base + 4u * c); }
    let ix = chunk_idx(base, c);
    return select(vec4<f32>(), vec4<f32>(k_load(ix.x), k_load(ix.y), k_load(ix.z), k_load(ix.w)), TAIL_MASK);
}
fn v_vec(base: u32, c: u32) -> vec4<f32> {
    if (full_chunk(c)) { return v_load4(base + 4u * c); }
    let ix = chunk_idx(base, c);
    return select(vec4<f32>(), vec4<f32>(v_load(ix.x), v_load(ix.y), v_load(ix.z), v_load(ix.w)), TAIL_MASK);
}
fn dout_vec(base: u32, c: u32) -> vec4<f32> {
    if (full_chunk(c)) { return dout_load4(base + 4u * c); }
    let ix = chunk_idx(base, c);
    return select(vec4<f32>(), vec4<f32>(dout_load(ix.x), dout_load(ix.y), dout_load(ix.z), dout_load(ix.w)), TAIL_MASK);
}
fn dq_vec(base: u32, c: u32) -> vec4<f32> {
    if (full_chunk(c)) { return dq_load4(base + 4u * c); }
    let ix = chunk_idx(base, c);
    return select(vec4<f32>(), vec4<f32>(dq_load(ix.x), dq_load(ix.y), dq_load(ix.z), dq_load(ix.w)), TAIL_MASK);
}

@compute @workgroup_size(WG)
fn attention_backward_dq(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let bh = wg.y;
    let b = bh / p.heads;
    let hoff = (bh % p.heads) * D;
    let row0 = wg.x * WG * RQ;
    let scale_log2 = p.scale * LOG2E;
    var rows: array<u32, RQ>;
    var qr: array<vec4<f32>, RQ * D4>;
    var dor: array<vec4<f32>, RQ * D4>;
    var acc: array<vec4<f32>, RQ * D4>;
    var lse2: array<f32, RQ>;
    var dl: array<f32, RQ>;
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
        var s: array<f32, RQ>;
        var dp: array<f32, RQ>;
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
            if (full_chunk(c)) {
                dq_store4(base + 4u * c, val);
            } else {
                for (var e = 0u; e < D - 4u * c; e++) { dq_store(base + 4u * c + e, val[e]); }
            }
        }
    }
}

//@ entry attention_backward_dkv
//@ tensors q:read k:read v:read dout:read lse:read delta:read dk:rw dv:rw
//@ const D = 4u
//@ const RQ = 4u
//@ const WG = 8u
//@ const CAUSAL = false
//@ const HAS_DK = true
//@ const HAS_DV = true
// dV_j = sum_i P_ij dO_i and dK_j = scale * sum_i P_ij (dP_ij - delta_i) Q_i.
// Each invocation owns RQ key rows and streams the queries that see them.
struct Params { sq: u32, sk: u32, heads: u32, hd: u32, scale: f32, beta_k: f32, beta_v: f32 }

fn q_vec(base: u32, c: u32) -> vec4<f32> {
    if (full_chunk(c)) { return q_load4(base + 4u * c); }
    let ix = chunk_idx(base, c);
    return select(vec4<f32>(), vec4<f32>(q_load(ix.x), q_load(ix.y), q_load(ix.z), q_load(ix.w)), TAIL_MASK);
}
fn k_vec(base: u32, c: u32) -> vec4<f32> {
    if (full_chunk(c)) { return k_load4(base + 4u * c); }
    let ix = chunk_idx(base, c);
    return select(vec4<f32>(), vec4<f32>(k_load(ix.x), k_load(ix.y), k_load(ix.z), k_load(ix.w)), TAIL_MASK);
}
fn v_vec(base: u32, c: u32) -> vec4<f32> {
    if (full_chunk(c)) { return v_load4(base + 4u * c); }
    let ix = chunk_idx(base, c);
    return select(vec4<f32>(), vec4<f32>(v_load(ix.x), v_load(ix.y), v_load(ix.z), v_load(ix.w)), TAIL_MASK);
}
fn dout_vec(base: u32, c: u32) -> vec4<f32> {
    if (full_chunk(c)) { return dout_load4(base + 4u * c); }
    let ix = chunk_idx(base, c);
    return select(vec4<f32>(), vec4<f32>(dout_load(ix.x), dout_load(ix.y), dout_load(ix.z), dout_load(ix.w)), TAIL_MASK);
}
fn dk_vec(base: u32, c: u32) -> vec4<f32> {
    if (full_chunk(c)) { return dk_load4(base + 4u * c); }
    let ix = chunk_idx(base, c);
    return select(vec4<f32>(), vec4<f32>(dk_load(ix.x), dk_load(ix.y), dk_load(ix.z), dk_load(ix.w)), TAIL_MASK);
}
fn dv_vec(base: u32, c: u32) -> vec4<f32> {
    if (full_chunk(c)) { return dv_load4(base + 4u * c); }
    let ix = chunk_idx(base, c);
    return select(vec4<f32>(), vec4<f32>(dv_load(ix.x), dv_load(ix.y), dv_load(ix.z), dv_load(ix.w)), TAIL_MASK);
}

@compute @workgroup_size(WG)
fn attention_backward_dkv(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let bh = wg.y;
    let b = bh / p.heads;
    let hoff = (bh % p.heads) * D;
    let row0 = wg.x * WG * RQ;
    let scale_log2 = p.scale * LOG2E;
    var rows: array<u32, RQ>;
    var kr: array<vec4<f32>, RQ * D4>;
    var vr: array<vec4<f32>, RQ * D4>;
    var dk: array<vec4<f32>, RQ * D4>;
    var dv: array<vec4<f32>, RQ * D4>;
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
        var s: array<f32, RQ>;
        var dp: array<f32, RQ>;
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
                if (full_chunk(c)) {
                    dk_store4(base + 4u * c, val);
                } else {
                    for (var e = 0u; e < D - 4u * c; e++) { dk_store(base + 4u * c + e, val[e]); }
                }
            }
            if (HAS_DV) {
                var val = dv[r * D4 + c];
                if (p.beta_v != 0.0) { val += dv_vec(base, c); }
                if (full_chunk(c)) {
                    dv_store4(base + 4u * c, val);
                } else {
                    for (var e = 0u; e < D - 4u * c; e++) { dv_store(base + 4u * c + e, val[e]); }
                }
            }
        }
    }
}
