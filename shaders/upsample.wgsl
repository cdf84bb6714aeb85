// Nearest-neighbour 2x upsampling of NCHW (torch `F.interpolate(x,
// scale_factor=2, mode="nearest")`, the UNet's Upsample2D). With the N*C*H
// input rows flattened, output rows 2q and 2q + 1 both repeat input row q.
// Each invocation writes four consecutive outputs with one vec4 store (whole
// words in packed 16-bit buffers); the tail past a multiple of 4 goes one by one.

const WG: u32 = 256u;

//@ entry upsample_forward
//@ tensors x:read y:write
// y[j] = x[(j / 2W / 2) * W + (j % 2W) / 2]; W = input width, n = numel(y).
struct Params { n: u32, w: u32 }
@compute @workgroup_size(WG)
fn upsample_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let j0 = flat_id(gid, nwg, WG) * 4u;
    if (j0 >= p.n) { return; }
    let w2 = 2u * p.w;
    var v = vec4<f32>(0.0);
    for (var k = 0u; k < 4u; k++) {
        let j = min(j0 + k, p.n - 1u);
        v[k] = x_load((j / w2 / 2u) * p.w + (j % w2) / 2u);
    }
    if (j0 + 4u <= p.n) {
        y_store4(j0, v);
    } else {
        for (var k = 0u; j0 + k < p.n; k++) { y_store(j0 + k, v[k]); }
    }
}

//@ entry upsample_backward
//@ tensors dy:read dx:rw
// dx[i] = beta * dx[i] + the sum of dy's 2x2 block over input pixel i
// (row q = i / W, column c = i % W), in a fixed order. n = numel(dx).
struct Params { n: u32, w: u32, beta: f32 }
@compute @workgroup_size(WG)
fn upsample_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i0 = flat_id(gid, nwg, WG) * 4u;
    if (i0 >= p.n) { return; }
    let w2 = 2u * p.w;
    var v = vec4<f32>(0.0);
    for (var k = 0u; k < 4u; k++) {
        let i = min(i0 + k, p.n - 1u);
        let top = (2u * (i / p.w)) * w2 + 2u * (i % p.w);
        let bot = top + w2;
        v[k] = (dy_load(top) + dy_load(top + 1u)) + (dy_load(bot) + dy_load(bot + 1u));
    }
    if (i0 + 4u <= p.n) {
        if (p.beta != 0.0) { v += dx_load4(i0); }
        dx_store4(i0, v);
    } else {
        for (var k = 0u; i0 + k < p.n; k++) {
            var g = v[k];
            if (p.beta != 0.0) { g += dx_load(i0 + k); }
            dx_store(i0 + k, g);
        }
    }
}
