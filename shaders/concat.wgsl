// Concat and split along any axis. Both directions of both ops are one
// strided copy: with a tensor viewed as (outer, axis_len, inner), a slice
// along the axis is `rows = outer` contiguous runs of `len = slice_len * inner`
// elements, so src and dst are each addressed as base + row * stride + j.

const WG: u32 = 256u;

//@ entry copy_slice
//@ tensors src:read4 dst:rw4
//@ const VEC = false
//@ const ZERO = false
//@ const ACC = false
// dst[dst_base + r * dst_stride + j] = src[src_base + r * src_stride + j]
// (+ dst[..] with ACC) for r < rows, j < len; ZERO copies zeros instead (src
// unbound). VEC: len, bases and strides are multiples of 4, so each
// invocation moves one aligned vec4 (one vector access, whole words in
// packed 16-bit buffers); else one element.
struct Params { rows: u32, len: u32, src_base: u32, src_stride: u32, dst_base: u32, dst_stride: u32 }
@compute @workgroup_size(WG)
fn copy_slice(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    var i = flat_id(gid, nwg, WG);
    if (VEC) { i *= 4u; }
    if (i >= p.rows * p.len) { return; }
    let r = i / p.len;
    let j = i % p.len;
    let s = p.src_base + r * p.src_stride + j;
    let d = p.dst_base + r * p.dst_stride + j;
    if (VEC) {
        var v = vec4<f32>(0.0);
        if (!ZERO) { v = src_load4(s); }
        if (ACC) { v += dst_load4(d); }
        dst_store4(d, v);
    } else {
        var v = 0.0;
        if (!ZERO) { v = src_load(s); }
        if (ACC) { v += dst_load(d); }
        dst_store(d, v);
    }
}
