// The diffusion arithmetic of a training step: counter-based random numbers
// (timesteps, noise), the DDPM scheduler's add_noise and get_velocity, and
// the DREAM update. Forward only: nothing differentiates through them.

const WG: u32 = 256u;

// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2,
// 3", SC 2011): a counter-based generator, so element i of step s needs no
// state, only (key, counter). key = the run's seed (two words); counter =
// (block, stream, step low, step high).
const PHILOX_M0: u32 = 0xD2511F53u;
const PHILOX_M1: u32 = 0xCD9E8D57u;
const PHILOX_W0: u32 = 0x9E3779B9u;
const PHILOX_W1: u32 = 0xBB67AE85u;

// (high, low) words of the 64-bit product a * b, from 16-bit halves (WGSL
// has no widening multiply). No partial sum overflows 32 bits.
fn mul_hi_lo(a: u32, b: u32) -> vec2<u32> {
    let al = a & 0xffffu;
    let ah = a >> 16u;
    let bl = b & 0xffffu;
    let bh = b >> 16u;
    let ll = al * bl;
    let hl = ah * bl;
    let lh = al * bh;
    let mid = (ll >> 16u) + (hl & 0xffffu) + lh;
    let hi = ah * bh + (hl >> 16u) + (mid >> 16u);
    return vec2<u32>(hi, (mid << 16u) | (ll & 0xffffu));
}

fn philox(counter: vec4<u32>, key: vec2<u32>) -> vec4<u32> {
    var c = counter;
    var k = key;
    for (var r = 0u; r < 10u; r++) {
        let p0 = mul_hi_lo(PHILOX_M0, c.x);
        let p1 = mul_hi_lo(PHILOX_M1, c.z);
        c = vec4<u32>(p1.x ^ c.y ^ k.x, p1.y, p0.x ^ c.w ^ k.y, p0.y);
        k += vec2<u32>(PHILOX_W0, PHILOX_W1);
    }
    return c;
}

// Two standard normals from two words (Box-Muller): u1 in (0, 1], u2 in [0, 1).
fn box_muller(a: u32, b: u32) -> vec2<f32> {
    let u1 = (f32(a >> 8u) + 1.0) * 5.9604644775390625e-8;
    let u2 = f32(b >> 8u) * 5.9604644775390625e-8;
    let r = sqrt(-2.0 * log(u1));
    let sc = sincos(6.283185307179586 * u2);
    return r * sc.yx;
}

//@ helpers rng
// The 4 random words of `block` in `stream` for this step. `key` holds the
// bit patterns [seed lo, seed hi, step lo, step hi] (written by the host).
fn random_words(block: u32, stream: u32) -> vec4<u32> {
    let w = vec4<u32>(bitcast<u32>(key_load(0u)), bitcast<u32>(key_load(1u)),
                      bitcast<u32>(key_load(2u)), bitcast<u32>(key_load(3u)));
    return philox(vec4<u32>(block, stream, w.z, w.w), w.xy);
}

// Four standard normals: elements 4 block .. 4 block + 3 of a stream.
fn normals(block: u32, stream: u32) -> vec4<f32> {
    let w = random_words(block, stream);
    return vec4<f32>(box_muller(w.x, w.y), box_muller(w.z, w.w));
}

//@ helpers schedule
// sqrt(alphas_cumprod[t]) and sqrt(1 - alphas_cumprod[t]): alpha_t, sigma_t.
fn alpha_sigma(t: f32) -> vec2<f32> {
    let a = ac_load(u32(t));
    return vec2<f32>(sqrt(a), sqrt(1.0 - a));
}

//@ entry random_timesteps
//@ tensors key:read t:write
//@ use rng
// t[b] uniform over the integers [0, count) (torch.randint(0, count)): the
// high word of word * count, stored as a float (exact below 2^24).
struct Params { n: u32, count: u32, stream: u32 }
@compute @workgroup_size(64)
fn random_timesteps(@builtin(global_invocation_id) gid: vec3<u32>) {
    let b = gid.x;
    if (b >= p.n) { return; }
    let w = random_words(b, p.stream);
    t_store(b, f32(mul_hi_lo(w.x, p.count).x));
}

//@ entry random_normal
//@ tensors key:read y:write
//@ use rng
// y = N(0, 1) per element, plus offset * N(0, 1) per (row of `plane`
// elements), diffusers' noise_offset: noise + offset * randn(B, C, 1, 1).
// Each invocation writes four consecutive elements.
struct Params { n: u32, stream: u32, plane: u32, offset: f32 }
@compute @workgroup_size(WG)
fn random_normal(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let block = flat_id(gid, nwg, WG);
    if (block * 4u >= p.n) { return; }
    let z = normals(block, p.stream);
    for (var j = 0u; j < 4u; j++) {
        let i = block * 4u + j;
        if (i < p.n) {
            var v = z[j];
            if (p.offset != 0.0) {
                let row = i / p.plane;
                v += p.offset * normals(row / 4u, p.stream + 1u)[row % 4u];
            }
            y_store(i, v);
        }
    }
}

//@ entry add_noise
//@ tensors x0:read noise:read t:read ac:read y:write
//@ use schedule
// DDPMScheduler.add_noise: xt = alpha_t x0 + sigma_t noise.
// VELOCITY: DDPMScheduler.get_velocity: v = alpha_t noise - sigma_t x0.
// `per` elements per sample.
//@ const VELOCITY = false
struct Params { n: u32, per: u32 }
@compute @workgroup_size(WG)
fn add_noise(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_id(gid, nwg, WG);
    if (i >= p.n) { return; }
    let as_ = alpha_sigma(t_load(i / p.per));
    if (VELOCITY) {
        y_store(i, as_.x * noise_load(i) - as_.y * x0_load(i));
    } else {
        y_store(i, as_.x * x0_load(i) + as_.y * noise_load(i));
    }
}

//@ entry dream_update
//@ tensors xt:read target:read noise:read pred:read t:read ac:read xt_out:write target_out:write
//@ use schedule
//@ const V_PREDICTION = false
// The spec's DREAM update, lambda = sigma_t^detail:
//   epsilon: delta = noise - pred
//   v:       delta = noise - (sigma_t xt + alpha_t pred)
//   xt' = xt + sigma_t (delta lambda)
//   target' = target + delta lambda        (epsilon)
//   target' = target + alpha_t (delta lambda)  (v)
struct Params { n: u32, per: u32, detail: f32 }
@compute @workgroup_size(WG)
fn dream_update(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_id(gid, nwg, WG);
    if (i >= p.n) { return; }
    let as_ = alpha_sigma(t_load(i / p.per));
    let x = xt_load(i);
    var pred_eps = pred_load(i);
    if (V_PREDICTION) { pred_eps = as_.y * x + as_.x * pred_eps; }
    let scaled = (noise_load(i) - pred_eps) * pow(as_.y, p.detail);
    xt_out_store(i, x + as_.y * scaled);
    if (V_PREDICTION) {
        target_out_store(i, target_load(i) + as_.x * scaled);
    } else {
        target_out_store(i, target_load(i) + scaled);
    }
}

//@ entry min_snr_weights
//@ tensors t:read ac:read w:write
//@ use schedule
// Min-SNR loss weights (diffusers' compute_snr and train_text_to_image):
// snr = (alpha_t / sigma_t)^2, w = min(snr, gamma), then divided by snr
// (DIVISOR 1, epsilon), by snr + 1 (DIVISOR 2, v-prediction) or kept (0).
//@ const DIVISOR = 0u
struct Params { n: u32, gamma: f32 }
@compute @workgroup_size(64)
fn min_snr_weights(@builtin(global_invocation_id) gid: vec3<u32>) {
    let b = gid.x;
    if (b >= p.n) { return; }
    let as_ = alpha_sigma(t_load(b));
    let r = as_.x / as_.y;
    let snr = r * r;
    var w = min(snr, p.gamma);
    if (DIVISOR == 1u) { w = w / snr; }
    if (DIVISOR == 2u) { w = w / (snr + 1.0); }
    w_store(b, w);
}

//@ entry scheduler_step
//@ tensors x:read out:read coef:read key:read x_prev:write
//@ use rng
// One denoising step of DDIM or DDPM (diffusers' DDIMScheduler.step,
// DDPMScheduler.step) for x [N, ..] from the UNet's output: with GUIDED, out
// is [2N, ..] = [unconditional; conditional] and the prediction is
// u + guidance (c - u) (classifier-free guidance). From the prediction, by
// PREDICTION (0 epsilon, 1 v_prediction, 2 sample), the clean estimate x0
// (clamped to +-clip when clip > 0) and the noise estimate eps, then
//   x_prev = c_x0 x0 + c_eps eps + c_x x + c_noise z,  z ~ N(0, 1).
// coef = [sqrt(a_t), sqrt(1 - a_t), c_x0, c_eps, c_x, c_noise, guidance, clip]
// is written by the host for each step.
//@ const GUIDED = false
//@ const PREDICTION = 0u
struct Params { n: u32, stream: u32 }
@compute @workgroup_size(WG)
fn scheduler_step(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_id(gid, nwg, WG);
    if (i >= p.n) { return; }
    let sa = coef_load(0u);
    let sb = coef_load(1u);
    let x = x_load(i);
    var m = out_load(i);
    if (GUIDED) { m = m + coef_load(6u) * (out_load(i + p.n) - m); }
    var x0 = f32();
    var eps = f32();
    if (PREDICTION == 0u) {
        eps = m;
        x0 = (x - sb * m) / sa;
    } else if (PREDICTION == 1u) {
        x0 = sa * x - sb * m;
        eps = sa * m + sb * x;
    } else {
        x0 = m;
        eps = (x - sa * m) / sb;
    }
    let clip = coef_load(7u);
    if (clip > 0.0) { x0 = clamp(x0, -clip, clip); }
    var v = coef_load(2u) * x0 + coef_load(3u) * eps + coef_load(4u) * x;
    let c_noise = coef_load(5u);
    if (c_noise != 0.0) { v += c_noise * normals(i / 4u, p.stream)[i % 4u]; }
    x_prev_store(i, v);
}
