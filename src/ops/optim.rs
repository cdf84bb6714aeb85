//! AdamW with decoupled weight decay and optional global gradient-norm
//! clipping. Kernels: `shaders/optim.wgsl`. Master weights, gradients and the
//! moments are f32 whatever the activation dtype.

use crate::dtype::DType;
use crate::error::Result;
use crate::graph::{AdamW, Emit, Kernel, Slot, TensorId};

/// Emit the optimizer step for `params` (after the backward pass). Returns
/// the persistent `hyper` slot the host fills each step with
/// `[lr, 1 - beta1^t, 1 - beta2^t, 0]`.
pub fn emit_adamw(e: &mut Emit, params: &[TensorId], opt: &AdamW) -> Result<Slot> {
    let hyper = e.persistent("adamw.hyper", 4, DType::F32);
    let mut scale = None;
    if let Some(max_norm) = opt.max_grad_norm {
        let norms = e.persistent("adamw.grad_sq_norms", params.len().max(1), DType::F32);
        for (slot, &p) in params.iter().enumerate() {
            e.push(
                Kernel::new("optim", "sumsq")
                    .bind("g", Slot::Grad(p))
                    .bind("norms", norms)
                    .u32(e.numel(p))
                    .u32(slot),
            );
        }
        let s = e.persistent("adamw.clip", 2, DType::F32);
        e.push(
            Kernel::new("optim", "clip_scale")
                .bind("norms", norms)
                .bind("scale", s)
                .u32(params.len())
                .f32(max_norm),
        );
        scale = Some(s);
    }
    for &p in params {
        let n = e.numel(p);
        let name = e.graph.desc(p).name.clone();
        let m = e.persistent(&format!("adamw.m.{name}"), n, DType::F32);
        let v = e.persistent(&format!("adamw.v.{name}"), n, DType::F32);
        let mut k = Kernel::new("optim", "adamw")
            .bind("param", Slot::Value(p))
            .bind("grad", Slot::Grad(p))
            .bind("m", m)
            .bind("v", v)
            .bind("hyper", hyper);
        if let Some(s) = scale {
            k = k.bind("scale", s).konst("CLIP", "true");
        }
        e.push(
            k.u32(n)
                .f32(opt.beta1)
                .f32(opt.beta2)
                .f32(opt.eps)
                .f32(opt.weight_decay)
                .groups_1d(n, 256),
        );
    }
    Ok(hyper)
}
