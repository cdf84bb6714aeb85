//! Elementwise ops: activations, GEGLU, scale, and broadcasting add/mul.
//! Kernels: `shaders/elementwise.wgsl`.

use crate::dtype::DType;
use crate::error::{shape_err, Result};
use crate::graph::{Emit, GradTarget, Graph, Kernel, OpKernels, Slot, TensorId};

const WG: u32 = 256;

/// The pointwise nonlinearities of SD's UNet, CLIP and VAE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// x * sigmoid(x)
    Silu = 0,
    /// 0.5 x (1 + erf(x / sqrt 2)), torch's default GELU.
    Gelu = 1,
    /// GELU with the tanh approximation (`approximate="tanh"`).
    GeluTanh = 2,
    /// x * sigmoid(1.702 x), CLIP's quick_gelu.
    QuickGelu = 3,
    /// e^x (the VAE's standard deviation from its log-variance).
    Exp = 4,
}

impl Activation {
    pub fn cpu(self, x: f64) -> f64 {
        let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
        match self {
            Activation::Silu => x * sig(x),
            Activation::Gelu => 0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2)),
            Activation::GeluTanh => {
                let u = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
                0.5 * x * (1.0 + u.tanh())
            }
            Activation::QuickGelu => x * sig(1.702 * x),
            Activation::Exp => x.exp(),
        }
    }
}

/// erf to double precision (W. J. Cody's rational approximations are
/// overkill here; this series/continued-fraction pair is exact to ~1e-15).
pub fn erf(x: f64) -> f64 {
    if x.abs() < 2.5 {
        // Maclaurin series: erf x = 2/sqrt(pi) sum (-1)^n x^(2n+1) / (n! (2n+1))
        let mut sum = 0.0f64;
        let mut term = x;
        let mut n = 0.0;
        while term.abs() > 1e-17 * sum.abs().max(1e-300) || n < 3.0 {
            sum += term / (2.0 * n + 1.0);
            n += 1.0;
            term *= -x * x / n;
            if n > 200.0 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // Continued fraction for erfc, evaluated bottom-up.
        let a = x.abs();
        let mut f = 0.0;
        for k in (1..60).rev() {
            f = (k as f64 / 2.0) / (a + f);
        }
        let erfc = (-a * a).exp() / std::f64::consts::PI.sqrt() / (a + f);
        x.signum() * (1.0 - erfc)
    }
}

#[derive(Clone, Debug)]
pub struct Unary {
    pub act: Activation,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryKind {
    Add = 0,
    Mul = 1,
}

/// `a (+|*) b` where b broadcasts against a (numpy rules from the right).
#[derive(Clone, Debug)]
pub struct Binary {
    pub kind: BinaryKind,
}

#[derive(Clone, Debug)]
pub struct Scale {
    pub s: f32,
}

/// The values of x stored in another dtype (`x.to(dtype)`); the gradient
/// comes back in x's dtype. Mixed precision casts the UNet's input and
/// output between the f32 diffusion math and the activation dtype.
#[derive(Clone, Debug)]
pub struct Cast;

/// diffusers' GEGLU after its projection: x (.., 2d) -> hidden * gelu(gate).
#[derive(Clone, Debug)]
pub struct Geglu;

/// `torch.clamp(x, lo, hi)`; the gradient passes where lo <= x <= hi.
#[derive(Clone, Debug)]
pub struct Clamp {
    pub lo: f32,
    pub hi: f32,
}

impl Graph {
    pub fn activation(&mut self, x: TensorId, act: Activation) -> TensorId {
        let (s, d) = (self.shape(x).to_vec(), self.dtype(x));
        self.add_node(Unary { act }.into(), &[x], &[(s, d)])[0]
    }

    pub fn silu(&mut self, x: TensorId) -> TensorId {
        self.activation(x, Activation::Silu)
    }

    pub fn gelu(&mut self, x: TensorId) -> TensorId {
        self.activation(x, Activation::Gelu)
    }

    pub fn add(&mut self, a: TensorId, b: TensorId) -> Result<TensorId> {
        self.binary(a, b, BinaryKind::Add)
    }

    pub fn mul(&mut self, a: TensorId, b: TensorId) -> Result<TensorId> {
        self.binary(a, b, BinaryKind::Mul)
    }

    fn binary(&mut self, a: TensorId, b: TensorId, kind: BinaryKind) -> Result<TensorId> {
        broadcast_layout(self.shape(a), self.shape(b))
            .map_err(|m| shape_err(format!("{kind:?}").to_lowercase(), m))?;
        let (s, d) = (self.shape(a).to_vec(), self.dtype(a));
        Ok(self.add_node(Binary { kind }.into(), &[a, b], &[(s, d)])[0])
    }

    pub fn clamp(&mut self, x: TensorId, lo: f32, hi: f32) -> TensorId {
        let (sh, d) = (self.shape(x).to_vec(), self.dtype(x));
        self.add_node(Clamp { lo, hi }.into(), &[x], &[(sh, d)])[0]
    }

    pub fn scale(&mut self, x: TensorId, s: f32) -> TensorId {
        let (sh, d) = (self.shape(x).to_vec(), self.dtype(x));
        self.add_node(Scale { s }.into(), &[x], &[(sh, d)])[0]
    }

    /// x in `dtype`: x itself when it is already, else a [`Cast`].
    pub fn cast(&mut self, x: TensorId, dtype: DType) -> TensorId {
        if self.dtype(x) == dtype {
            return x;
        }
        let sh = self.shape(x).to_vec();
        self.add_node(Cast.into(), &[x], &[(sh, dtype)])[0]
    }

    pub fn geglu(&mut self, x: TensorId) -> Result<TensorId> {
        let mut s = self.shape(x).to_vec();
        match s.last_mut() {
            Some(last) if *last % 2 == 0 && *last > 0 => *last /= 2,
            _ => {
                return Err(shape_err(
                    "geglu",
                    format!("x {s:?} needs an even, non-zero last dim"),
                ))
            }
        }
        let d = self.dtype(x);
        Ok(self.add_node(Geglu.into(), &[x], &[(s, d)])[0])
    }
}

/// y's shape folded to 4-D and b's strides over it (0 on broadcast dims),
/// plus b's 4-D shape. Adjacent dims that broadcast alike are merged.
#[derive(Clone, Debug, PartialEq)]
pub struct BroadcastLayout {
    pub dims: [usize; 4],
    pub b_dims: [usize; 4],
    pub b_strides: [usize; 4],
}

pub fn broadcast_layout(y: &[usize], b: &[usize]) -> std::result::Result<BroadcastLayout, String> {
    if b.len() > y.len() {
        return Err(format!("{b:?} has more dims than {y:?}"));
    }
    let pad = y.len() - b.len();
    let bfull: Vec<usize> = std::iter::repeat_n(1, pad)
        .chain(b.iter().copied())
        .collect();
    // (extent, broadcast?) per dim, merging neighbours of the same kind.
    let mut merged: Vec<(usize, bool)> = Vec::new();
    for (&yd, &bd) in y.iter().zip(&bfull) {
        if bd != yd && bd != 1 {
            return Err(format!("{b:?} does not broadcast to {y:?}"));
        }
        let bc = bd == 1 && yd != 1;
        if yd == 1 {
            continue;
        }
        match merged.last_mut() {
            Some((e, k)) if *k == bc => *e *= yd,
            _ => merged.push((yd, bc)),
        }
    }
    if merged.len() > 4 {
        return Err(format!(
            "broadcasting {b:?} to {y:?} needs more than 4 folded dims"
        ));
    }
    while merged.len() < 4 {
        merged.insert(0, (1, false));
    }
    let mut dims = [1; 4];
    let mut b_dims = [1; 4];
    let mut b_strides = [0; 4];
    let mut stride = 1;
    for i in (0..4).rev() {
        let (e, bc) = merged[i];
        dims[i] = e;
        if !bc {
            b_dims[i] = e;
            b_strides[i] = if e == 1 { 0 } else { stride };
            stride *= e;
        }
    }
    Ok(BroadcastLayout {
        dims,
        b_dims,
        b_strides,
    })
}

/// y = beta*y + a (op) b[broadcast], or y = beta*y + b[broadcast] when `a` is None.
pub(crate) fn emit_broadcast(
    e: &mut Emit,
    y: Slot,
    a: Option<Slot>,
    b: Slot,
    l: &BroadcastLayout,
    op: u32,
    beta: f32,
) {
    let n: usize = l.dims.iter().product();
    let mut k = Kernel::new("elementwise", "broadcast_forward")
        .konst("OP", format!("{op}u"))
        .konst("ACC", beta != 0.0);
    if let Some(a) = a {
        k = k.bind("a", a);
    }
    k = k
        .bind("b", b)
        .bind("y", y)
        .u32(n)
        .u32(l.dims[1])
        .u32(l.dims[2])
        .u32(l.dims[3]);
    for s in l.b_strides {
        k = k.u32(s);
    }
    e.push(k.groups_1d(n, WG));
}

/// dst = beta*dst + src over `numel` elements: a gradient that passes
/// through an op unchanged, where the planner could not share its storage.
pub(crate) fn emit_grad_copy(e: &mut Emit, dst: GradTarget, src: Slot, numel: usize) {
    let whole = BroadcastLayout {
        dims: [1, 1, 1, numel],
        b_dims: [1, 1, 1, numel],
        b_strides: [0, 0, 0, 1],
    };
    emit_broadcast(e, dst.slot, None, src, &whole, 2, dst.beta());
}

/// db = beta*db + sum over broadcast dims of dy (* m).
pub(crate) fn emit_broadcast_reduce(
    e: &mut Emit,
    db: Slot,
    dy: Slot,
    m: Option<Slot>,
    l: &BroadcastLayout,
    beta: f32,
) {
    let nb: usize = l.b_dims.iter().product();
    let mut k = Kernel::new("elementwise", "broadcast_reduce")
        .konst("ACC", beta != 0.0)
        .bind("dy", dy)
        .bind("db", db);
    if let Some(m) = m {
        k = k.bind("m", m).konst("MUL", "true");
    }
    k = k.u32(nb);
    for d in l.dims {
        k = k.u32(d);
    }
    let k = k.u32(l.b_dims[1]).u32(l.b_dims[2]).u32(l.b_dims[3]);
    e.push(k.groups_1d(nb, WG));
}

fn emit_unary_forward(e: &mut Emit, x: Slot, y: Slot, n: usize, act: Activation) {
    e.push(
        Kernel::new("elementwise", "unary_forward")
            .konst("OP", format!("{}u", act as u32))
            .bind("x", x)
            .bind("y", y)
            .u32(n)
            .groups_1d(n.div_ceil(4), WG),
    );
}

impl OpKernels for Unary {
    fn kind(&self) -> &'static str {
        "activation"
    }

    fn forward(&self, e: &mut Emit, i: &[TensorId], o: &[TensorId]) -> Result<()> {
        emit_unary_forward(
            e,
            Slot::Value(i[0]),
            Slot::Value(o[0]),
            e.numel(o[0]),
            self.act,
        );
        Ok(())
    }

    fn backward(&self, e: &mut Emit, i: &[TensorId], _o: &[TensorId]) -> Result<()> {
        let (Some(dy), Some(dx)) = (e.grad_out(0), e.grad_in(0)) else {
            return Ok(());
        };
        let n = e.numel(i[0]);
        e.push(
            Kernel::new("elementwise", "unary_backward")
                .konst("OP", format!("{}u", self.act as u32))
                .bind("x", Slot::Value(i[0]))
                .bind("dy", dy)
                .bind("dx", dx.slot)
                .u32(n)
                .f32(dx.beta())
                .groups_1d(n, WG),
        );
        Ok(())
    }

    fn flops(&self, g: &Graph, _i: &[TensorId], o: &[TensorId]) -> u64 {
        8 * g.numel(o[0]) as u64
    }
}

impl OpKernels for Binary {
    fn kind(&self) -> &'static str {
        match self.kind {
            BinaryKind::Add => "add",
            BinaryKind::Mul => "mul",
        }
    }

    /// a + b: a's gradient is the output's (a has its shape), and so is b's
    /// when b is not broadcast.
    fn grad_passthrough(&self, g: &Graph, i: &[TensorId]) -> Vec<(usize, usize)> {
        match self.kind {
            BinaryKind::Add if g.shape(i[0]) == g.shape(i[1]) => vec![(0, 0), (1, 0)],
            BinaryKind::Add => vec![(0, 0)],
            BinaryKind::Mul => Vec::new(),
        }
    }

    fn forward(&self, e: &mut Emit, i: &[TensorId], o: &[TensorId]) -> Result<()> {
        let l = broadcast_layout(e.shape(i[0]), e.shape(i[1]))
            .map_err(|m| shape_err(self.kind(), m))?;
        emit_broadcast(
            e,
            Slot::Value(o[0]),
            Some(Slot::Value(i[0])),
            Slot::Value(i[1]),
            &l,
            self.kind as u32,
            0.0,
        );
        Ok(())
    }

    fn backward(&self, e: &mut Emit, i: &[TensorId], _o: &[TensorId]) -> Result<()> {
        let Some(dy) = e.grad_out(0) else {
            return Ok(());
        };
        let l = broadcast_layout(e.shape(i[0]), e.shape(i[1]))
            .map_err(|m| shape_err(self.kind(), m))?;
        if let Some(da) = e.grad_in(0) {
            match self.kind {
                BinaryKind::Add => emit_grad_copy(e, da, dy, e.numel(i[0])),
                // da = dy * b
                BinaryKind::Mul => {
                    emit_broadcast(e, da.slot, Some(dy), Slot::Value(i[1]), &l, 1, da.beta())
                }
            }
        }
        if let Some(db) = e.grad_in(1) {
            let m = (self.kind == BinaryKind::Mul).then_some(Slot::Value(i[0]));
            emit_broadcast_reduce(e, db.slot, dy, m, &l, db.beta());
        }
        Ok(())
    }

    fn flops(&self, g: &Graph, _i: &[TensorId], o: &[TensorId]) -> u64 {
        g.numel(o[0]) as u64
    }
}

fn emit_scale(e: &mut Emit, x: Slot, y: Slot, n: usize, s: f32, beta: f32) {
    e.push(
        Kernel::new("elementwise", "scale_forward")
            .bind("x", x)
            .bind("y", y)
            .u32(n)
            .f32(s)
            .f32(beta)
            .groups_1d(n, WG),
    );
}

impl OpKernels for Scale {
    fn kind(&self) -> &'static str {
        "scale"
    }

    fn forward(&self, e: &mut Emit, i: &[TensorId], o: &[TensorId]) -> Result<()> {
        emit_scale(
            e,
            Slot::Value(i[0]),
            Slot::Value(o[0]),
            e.numel(o[0]),
            self.s,
            0.0,
        );
        Ok(())
    }

    fn backward(&self, e: &mut Emit, i: &[TensorId], _o: &[TensorId]) -> Result<()> {
        if let (Some(dy), Some(dx)) = (e.grad_out(0), e.grad_in(0)) {
            emit_scale(e, dy, dx.slot, e.numel(i[0]), self.s, dx.beta());
        }
        Ok(())
    }
}

impl OpKernels for Cast {
    fn kind(&self) -> &'static str {
        "cast"
    }

    // The scale kernel converts on load and store, each binding in its
    // tensor's storage; a scale of 1 is exact.
    fn forward(&self, e: &mut Emit, i: &[TensorId], o: &[TensorId]) -> Result<()> {
        let n = e.numel(o[0]);
        emit_scale(e, Slot::Value(i[0]), Slot::Value(o[0]), n, 1.0, 0.0);
        Ok(())
    }

    fn backward(&self, e: &mut Emit, i: &[TensorId], _o: &[TensorId]) -> Result<()> {
        if let (Some(dy), Some(dx)) = (e.grad_out(0), e.grad_in(0)) {
            emit_scale(e, dy, dx.slot, e.numel(i[0]), 1.0, dx.beta());
        }
        Ok(())
    }
}

impl OpKernels for Clamp {
    fn kind(&self) -> &'static str {
        "clamp"
    }

    fn forward(&self, e: &mut Emit, i: &[TensorId], o: &[TensorId]) -> Result<()> {
        let n = e.numel(o[0]);
        e.push(
            Kernel::new("elementwise", "clamp_forward")
                .bind("x", Slot::Value(i[0]))
                .bind("y", Slot::Value(o[0]))
                .u32(n)
                .f32(self.lo)
                .f32(self.hi)
                .groups_1d(n, WG),
        );
        Ok(())
    }

    fn backward(&self, e: &mut Emit, i: &[TensorId], _o: &[TensorId]) -> Result<()> {
        if let (Some(dy), Some(dx)) = (e.grad_out(0), e.grad_in(0)) {
            let n = e.numel(i[0]);
            e.push(
                Kernel::new("elementwise", "clamp_backward")
                    .bind("x", Slot::Value(i[0]))
                    .bind("dy", dy)
                    .bind("dx", dx.slot)
                    .u32(n)
                    .f32(self.lo)
                    .f32(self.hi)
                    .f32(dx.beta())
                    .groups_1d(n, WG),
            );
        }
        Ok(())
    }
}

/// Columns per GEGLU invocation: 4 (vector accesses) where the half
/// width allows.
fn geglu_vec(d: usize) -> usize {
    if d.is_multiple_of(4) {
        4
    } else {
        1
    }
}

impl OpKernels for Geglu {
    fn kind(&self) -> &'static str {
        "geglu"
    }

    fn forward(&self, e: &mut Emit, i: &[TensorId], o: &[TensorId]) -> Result<()> {
        let n = e.numel(o[0]);
        let d = *e.shape(o[0]).last().unwrap_or(&1);
        let vec = geglu_vec(d);
        e.push(
            Kernel::new("elementwise", "geglu_forward")
                .konst("VEC", format!("{vec}u"))
                .bind("x", Slot::Value(i[0]))
                .bind("y", Slot::Value(o[0]))
                .u32(n)
                .u32(d)
                .groups_1d(n / vec, WG),
        );
        Ok(())
    }

    fn backward(&self, e: &mut Emit, i: &[TensorId], o: &[TensorId]) -> Result<()> {
        let (Some(dy), Some(dx)) = (e.grad_out(0), e.grad_in(0)) else {
            return Ok(());
        };
        let n = e.numel(o[0]);
        let d = *e.shape(o[0]).last().unwrap_or(&1);
        let vec = geglu_vec(d);
        e.push(
            Kernel::new("elementwise", "geglu_backward")
                .konst("VEC", format!("{vec}u"))
                .konst("ACC", dx.beta() != 0.0)
                .bind("x", Slot::Value(i[0]))
                .bind("dy", dy)
                .bind("dx", dx.slot)
                .u32(n)
                .u32(d)
                .groups_1d(n / vec, WG),
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::ops::testing::{check_op, check_op_all_dtypes, CaseInput};

    fn bcast_ref(
        a: &[f64],
        b: &[f64],
        ys: &[usize],
        bs: &[usize],
        f: impl Fn(f64, f64) -> f64,
    ) -> Vec<f64> {
        let l = broadcast_layout(ys, bs).unwrap();
        let [_, d1, d2, d3] = l.dims;
        (0..a.len())
            .map(|i| {
                let c = [
                    i / (d1 * d2 * d3),
                    (i / (d2 * d3)) % d1,
                    (i / d3) % d2,
                    i % d3,
                ];
                let bi: usize = (0..4).map(|k| c[k] * l.b_strides[k]).sum();
                f(a[i], b[bi])
            })
            .collect()
    }

    /// Residual adds hand their output's gradient to one input without a
    /// copy where that is safe (a fresh gradient that is not a parameter's,
    /// a seed's or kept, at most one input per output, not both inputs one
    /// tensor); the others still copy or accumulate. Gradients match finite
    /// differences through every case.
    #[test]
    fn residual_gradients_pass_through_without_copies() {
        use crate::graph::{Plan, RunSpec};
        // y = 2x + x + c (c broadcast over rows); z = y + y;
        // out = (z * w + y) * 1.5
        let build = |g: &mut Graph, t: &[TensorId]| {
            let h = g.scale(t[0], 2.0);
            let y = g.add(h, t[0])?;
            let y = g.add(y, t[2])?;
            let z = g.add(y, y)?;
            let zw = g.mul(z, t[1])?;
            let o = g.add(zw, y)?;
            Ok(g.scale(o, 1.5))
        };
        let reference = |v: &[Vec<f64>]| {
            (0..15)
                .map(|i| {
                    let y = 3.0 * v[0][i] + v[2][i % 5];
                    1.5 * (2.0 * y * v[1][i] + y)
                })
                .collect()
        };
        let inputs = [
            CaseInput::act(&[3, 5]),
            CaseInput::act(&[3, 5]),
            CaseInput::act(&[5]),
        ];
        check_op(
            "residual_chain",
            &inputs,
            &build,
            &reference,
            DType::F32,
            false,
        );

        let mut g = Graph::new();
        let x = g.input_with_grad("x", &[3, 5], DType::F32);
        let w = g.input_with_grad("w", &[3, 5], DType::F32);
        let c = g.input_with_grad("c", &[5], DType::F32);
        let out = build(&mut g, &[x, w, c]).unwrap();
        let seed = g.input("seed", &[3, 5], DType::F32);
        let spec = RunSpec {
            outputs: vec![out],
            seeds: vec![(out, seed)],
            grads: vec![x, w, c],
            ..Default::default()
        };
        let plan = Plan::build(&g, &crate::ops::testing::gpu().caps, &spec).unwrap();
        let add_backward: Vec<&str> = plan
            .kernels
            .iter()
            .filter(|k| k.node.starts_with("add#") && k.node.ends_with(".backward"))
            .map(|k| k.node.as_str())
            .collect();
        // add(zw, y): zw takes the output's gradient, y gets a copy; add(y, y)
        // writes dy twice (one launch writes, one adds); add(y, c): y takes
        // it, c is a reduction; add(h, x): h takes it, x (kept) gets a copy.
        // Without passing through: 8 launches.
        assert_eq!(add_backward.len(), 5, "{add_backward:?}");
    }

    #[test]
    fn cast_widens_narrow_dtypes_exactly() {
        // f16 (native and packed) and bf16 -> f32; the gradient narrows back.
        for (dtype, packed) in [
            (DType::F16, false),
            (DType::F16, true),
            (DType::BF16, false),
        ] {
            check_op(
                "cast_to_f32",
                &[CaseInput::act(&[3, 37])],
                &|g, t| Ok(g.cast(t[0], DType::F32)),
                &|v| v[0].clone(),
                dtype,
                packed,
            );
        }
    }

    #[test]
    fn cast_narrows_f32_by_rounding_and_passes_the_gradient() {
        use crate::graph::{RunSpec, Session};
        use crate::ops::testing::{gpu, random};
        // Finite differences see the rounding's steps, so compare directly:
        // y = round_f16(x), and dx is dy (f16 values, exact in f32).
        let n = 111;
        let mut g = Graph::new();
        let x = g.input_with_grad("x", &[n], DType::F32);
        let y = g.cast(x, DType::F16);
        let dy = g.input("dy", &[n], DType::F16);
        let spec = RunSpec {
            outputs: vec![y],
            seeds: vec![(y, dy)],
            grads: vec![x],
            ..Default::default()
        };
        let mut s = Session::new(gpu(), std::sync::Arc::new(g), spec).unwrap();
        let (xv, dyv) = (random(n, 1), random(n, 2));
        s.write(x, &xv).unwrap();
        s.write(dy, &dyv).unwrap();
        s.step().unwrap();
        let want: Vec<f32> = xv.iter().map(|&v| DType::F16.round(v)).collect();
        assert_eq!(s.read_blocking(y).unwrap(), want);
        let want: Vec<f32> = dyv.iter().map(|&v| DType::F16.round(v)).collect();
        assert_eq!(s.read_grad_blocking(x).unwrap(), want);
    }

    #[test]
    fn clamp_matches_torch_and_masks_the_gradient() {
        // Values spread over [-2, 2]; none within the finite-difference step
        // of a bound, where the gradient jumps.
        let values: Vec<f32> = crate::ops::testing::random(3 * 11, 7)
            .iter()
            .map(|v| 2.0 * v)
            .filter(|v| (v + 0.5).abs() > 0.02 && (v - 0.75).abs() > 0.02)
            .collect();
        let n = values.len();
        check_op_all_dtypes(
            "clamp",
            &[CaseInput::act(&[n]).values(values)],
            &|g, t| Ok(g.clamp(t[0], -0.5, 0.75)),
            &|v| v[0].iter().map(|x| x.clamp(-0.5, 0.75)).collect(),
        );
    }

    #[test]
    fn activations_match_reference_and_gradients() {
        for act in [
            Activation::Silu,
            Activation::Gelu,
            Activation::GeluTanh,
            Activation::QuickGelu,
            Activation::Exp,
        ] {
            let inputs = [CaseInput::act(&[3, 7, 5]).values(
                crate::ops::testing::random(105, 3)
                    .iter()
                    .map(|v| v * 4.0)
                    .collect(),
            )];
            check_op_all_dtypes(
                &format!("{act:?}"),
                &inputs,
                &|g, x| Ok(g.activation(x[0], act)),
                &|x| x[0].iter().map(|&v| act.cpu(v)).collect(),
            );
        }
    }

    #[test]
    fn unary_tail_not_multiple_of_four() {
        check_op(
            "silu_n5",
            &[CaseInput::act(&[5])],
            &|g, x| Ok(g.silu(x[0])),
            &|x| x[0].iter().map(|&v| Activation::Silu.cpu(v)).collect(),
            DType::F16,
            true,
        );
    }

    #[test]
    fn add_mul_broadcast_cases() {
        let cases: [(&str, Vec<usize>, Vec<usize>); 4] = [
            ("same_shape", vec![2, 3, 5], vec![2, 3, 5]),
            ("time_emb_bnc11", vec![2, 3, 5, 7], vec![2, 3, 1, 1]),
            ("bias_last_dim", vec![3, 5, 6], vec![6]),
            ("middle", vec![2, 5, 3], vec![1, 5, 1]),
        ];
        for (name, ys, bs) in cases {
            for kind in [BinaryKind::Add, BinaryKind::Mul] {
                let f = move |a: f64, b: f64| {
                    if kind == BinaryKind::Add {
                        a + b
                    } else {
                        a * b
                    }
                };
                let (ys2, bs2) = (ys.clone(), bs.clone());
                check_op_all_dtypes(
                    &format!("{kind:?}_{name}"),
                    &[CaseInput::act(&ys), CaseInput::act(&bs)],
                    &|g, x| g.binary(x[0], x[1], kind),
                    &move |x| bcast_ref(&x[0], &x[1], &ys2, &bs2, f),
                );
            }
        }
    }

    #[test]
    fn fan_out_accumulates_gradients() {
        // y = x * x + silu(x): x feeds three inputs, its gradient sums all of them.
        check_op(
            "x*x+silu(x)",
            &[CaseInput::act(&[3, 11])],
            &|g, x| {
                let sq = g.mul(x[0], x[0])?;
                let s = g.silu(x[0]);
                g.add(sq, s)
            },
            &|x| {
                x[0].iter()
                    .map(|&v| v * v + Activation::Silu.cpu(v))
                    .collect()
            },
            DType::F32,
            false,
        );
    }

    #[test]
    fn scale_and_geglu() {
        check_op_all_dtypes(
            "scale",
            &[CaseInput::act(&[4, 9])],
            &|g, x| Ok(g.scale(x[0], -0.37)),
            &|x| x[0].iter().map(|v| v * -0.37).collect(),
        );
        // Half widths 7 (one column per invocation) and 8 (four, vector
        // accesses).
        for d in [7usize, 8] {
            check_op_all_dtypes(
                "geglu",
                &[CaseInput::act(&[3, 5, 2 * d])],
                &|g, x| g.geglu(x[0]),
                &|x| {
                    x[0].chunks(2 * d)
                        .flat_map(|r| (0..d).map(move |c| r[c] * Activation::Gelu.cpu(r[d + c])))
                        .collect()
                },
            );
        }
    }

    #[test]
    fn erf_reference_is_accurate() {
        // Values from Abramowitz & Stegun table 7.1.
        assert!((erf(0.5) - 0.520_499_877_813_046_5).abs() < 1e-14);
        assert!((erf(2.0) - 0.995_322_265_018_952_7).abs() < 1e-14);
        assert!((erf(3.0) - 0.999_977_909_503_001_4).abs() < 1e-14);
    }

    #[test]
    fn bad_broadcast_names_shapes() {
        let mut g = Graph::new();
        let a = g.input("a", &[2, 3], DType::F32);
        let b = g.input("b", &[4], DType::F32);
        let err = g.add(a, b).unwrap_err().to_string();
        assert!(err.contains("[4]") && err.contains("[2, 3]"), "{err}");
    }
}
