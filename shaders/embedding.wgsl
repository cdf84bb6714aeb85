// Embeddings: diffusers' sinusoidal timestep embedding, and token-id lookup
// into a table (CLIP's token_embedding) with its table gradient.

const WG: u32 = 256u;

// Table row of a token id stored as a float: rounded, and clamped into
// [0, rows) so a bad id cannot read out of bounds (the CLI validates ids).
fn token_row(id: f32, rows: u32) -> u32 {
    return u32(clamp(round(id), 0.0, f32(rows - 1u)));
}

//@ entry timestep_embedding
//@ tensors t:read y:write
//@ const FREQS = array<f32, 1>(1.0)
// diffusers get_timestep_embedding: phase = t * freq_k, y = [sin(phase) |
// cos(phase)] ([cos | sin] when flip), a zero column if dim is odd. FREQS
// (half of them) come from the host exactly as torch rounds them: GPU exp and
// division may be an ulp off, and the phase multiplies that by t (~1000).
struct Params { n: u32, dim: u32, half: u32, flip: u32 }
@compute @workgroup_size(WG)
fn timestep_embedding(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_id(gid, nwg, WG);
    if (i >= p.n) { return; }
    let row = i / p.dim;
    let j = i % p.dim;
    var v = 0.0;
    if (j < 2u * p.half) {
        let second = j >= p.half;
        let sc = sincos(t_load(row) * FREQS[select(j, j - p.half, second)]);
        v = select(sc.x, sc.y, second != (p.flip != 0u));
    }
    y_store(i, v);
}

//@ entry embedding_forward
//@ tensors ids:read table:read y:write
// y[pos, c] = table[token_row(ids[pos]), c] for the positions whose row lies
// in the bound window of the table, rows [first, first + wrows) (the whole
// table unless it exceeds a binding); four consecutive outputs per invocation
// (one vec4 store when all four are in the window), the rest one by one.
struct Params { n: u32, d: u32, rows: u32, first: u32, wrows: u32 }
@compute @workgroup_size(WG)
fn embedding_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let j0 = flat_id(gid, nwg, WG) * 4u;
    if (j0 >= p.n) { return; }
    var v = vec4<f32>(0.0);
    var mine = vec4<bool>(false);
    for (var k = 0u; k < 4u; k++) {
        let j = min(j0 + k, p.n - 1u);
        let row = token_row(ids_load(j / p.d), p.rows);
        mine[k] = row >= p.first && row - p.first < p.wrows && j0 + k < p.n;
        let local = clamp(row, p.first, p.first + p.wrows - 1u) - p.first;
        v[k] = table_load(local * p.d + j % p.d);
    }
    if (all(mine)) {
        y_store4(j0, v);
    } else {
        for (var k = 0u; k < 4u; k++) {
            if (mine[k]) { y_store(j0 + k, v[k]); }
        }
    }
}

//@ entry embedding_backward
//@ tensors ids:read dy:read dtable:rw
// dtable[row, c..c+3] = beta * dtable[..] + sum over positions pos with
// token_row(ids[pos]) == row of dy[pos, c..c+3], scanning positions in order
// (deterministic, no atomics). One invocation per 4 columns of a row of the
// bound window of dtable, rows [first, first + wrows).
struct Params { npos: u32, d: u32, rows: u32, chunks: u32, beta: f32, first: u32, wrows: u32 }
@compute @workgroup_size(WG)
fn embedding_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_id(gid, nwg, WG);
    if (i >= p.wrows * p.chunks) { return; }
    let local = i / p.chunks;
    let row = p.first + local;
    let c = (i % p.chunks) * 4u;
    let width = min(4u, p.d - c);
    var acc = vec4<f32>(0.0);
    for (var pos = 0u; pos < p.npos; pos++) {
        if (token_row(ids_load(pos), p.rows) != row) { continue; }
        let base = pos * p.d + c;
        if (width == 4u) {
            acc += dy_load4(base);
        } else {
            for (var k = 0u; k < width; k++) { acc[k] += dy_load(base + k); }
        }
    }
    let o = local * p.d + c;
    if (width == 4u) {
        if (p.beta != 0.0) { acc += dtable_load4(o); }
        dtable_store4(o, acc);
    } else {
        for (var k = 0u; k < width; k++) {
            var g = acc[k];
            if (p.beta != 0.0) { g += dtable_load(o + k); }
            dtable_store(o + k, g);
        }
    }
}
