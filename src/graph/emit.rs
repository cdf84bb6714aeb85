//! What ops write into: a list of kernel launches over abstract slots that the
//! planner later maps to buffers.

use super::{Graph, TensorId};
use crate::dtype::DType;
use crate::gpu::Capabilities;

/// A buffer a kernel binds, before memory planning.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Slot {
    /// The values of a tensor.
    Value(TensorId),
    /// The gradient of a tensor (same shape; f32 for parameters).
    Grad(TensorId),
    /// Scratch memory of one op, live only between its first and last use.
    Temp(usize),
    /// Memory that lives for the whole session (optimizer state, step constants).
    Persistent(usize),
}

/// One compute dispatch.
#[derive(Clone, Debug)]
pub struct Kernel {
    pub shader: &'static str,
    pub entry: &'static str,
    pub consts: Vec<(&'static str, String)>,
    /// Words of the `Params` uniform, in field order.
    pub params: Vec<u32>,
    /// Header tensor name -> slot. A header tensor left unbound gets a dummy.
    pub bindings: Vec<(&'static str, Slot)>,
    pub workgroups: [u32; 3],
    /// The node this dispatch belongs to, for labels and errors.
    pub node: String,
}

impl Kernel {
    pub fn new(shader: &'static str, entry: &'static str) -> Kernel {
        Kernel {
            shader,
            entry,
            consts: Vec::new(),
            params: Vec::new(),
            bindings: Vec::new(),
            workgroups: [1, 1, 1],
            node: String::new(),
        }
    }

    pub fn bind(mut self, name: &'static str, slot: Slot) -> Kernel {
        self.bindings.push((name, slot));
        self
    }

    pub fn u32(mut self, v: usize) -> Kernel {
        self.params.push(v as u32);
        self
    }

    pub fn f32(mut self, v: f32) -> Kernel {
        self.params.push(v.to_bits());
        self
    }

    pub fn konst(mut self, name: &'static str, value: impl ToString) -> Kernel {
        self.consts.push((name, value.to_string()));
        self
    }

    pub fn groups(mut self, x: u32, y: u32, z: u32) -> Kernel {
        self.workgroups = [x, y, z];
        self
    }

    /// Enough workgroups of `wg_size` invocations for `n` invocations,
    /// spread over x and y (shaders index them with `flat_id`).
    pub fn groups_1d(self, n: usize, wg_size: u32) -> Kernel {
        let (x, y) = grid_1d(n, wg_size);
        self.groups(x, y, 1)
    }
}

/// (x, y) workgroup counts covering `n` invocations, x at most 65535.
pub fn grid_1d(n: usize, wg_size: u32) -> (u32, u32) {
    let groups = n.div_ceil(wg_size as usize).max(1);
    let x = groups.min(65535);
    let y = groups.div_ceil(x);
    (x as u32, y as u32)
}

/// A scratch or persistent allocation requested by an op.
#[derive(Clone, Debug)]
pub struct ExtraDesc {
    pub label: String,
    pub numel: usize,
    pub dtype: DType,
}

/// How a backward kernel must write a gradient.
#[derive(Clone, Copy, Debug)]
pub struct GradTarget {
    pub slot: Slot,
    /// Add to what is there (another consumer wrote it already) instead of
    /// overwriting it.
    pub accumulate: bool,
}

impl GradTarget {
    /// The `beta` a kernel multiplies the old value by: 1 to accumulate, 0 to overwrite.
    pub fn beta(&self) -> f32 {
        if self.accumulate {
            1.0
        } else {
            0.0
        }
    }
}

/// Collects the kernels of a schedule. Ops receive it in `forward`/`backward`.
pub struct Emit<'g> {
    pub graph: &'g Graph,
    pub caps: &'g Capabilities,
    pub(super) kernels: Vec<Kernel>,
    pub(super) temps: Vec<ExtraDesc>,
    pub(super) persistents: Vec<ExtraDesc>,
    pub(super) node_name: String,
    /// During backward: which outputs of the current node have a gradient,
    /// and where each input's gradient goes.
    pub(super) grad_outs: Vec<Option<Slot>>,
    pub(super) grad_ins: Vec<Option<GradTarget>>,
}

impl<'g> Emit<'g> {
    pub(super) fn new(graph: &'g Graph, caps: &'g Capabilities) -> Self {
        Emit {
            graph,
            caps,
            kernels: Vec::new(),
            temps: Vec::new(),
            persistents: Vec::new(),
            node_name: String::new(),
            grad_outs: Vec::new(),
            grad_ins: Vec::new(),
        }
    }

    pub fn shape(&self, t: TensorId) -> &[usize] {
        self.graph.shape(t)
    }

    pub fn dtype(&self, t: TensorId) -> DType {
        self.graph.dtype(t)
    }

    pub fn numel(&self, t: TensorId) -> usize {
        self.graph.numel(t)
    }

    /// The storage dtype behind a slot.
    pub fn slot_dtype(&self, slot: Slot) -> DType {
        match slot {
            Slot::Value(t) | Slot::Grad(t) => self.graph.dtype(t),
            Slot::Temp(i) => self.temps[i].dtype,
            Slot::Persistent(i) => self.persistents[i].dtype,
        }
    }

    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    pub fn push(&mut self, mut k: Kernel) {
        k.node = self.node_name.clone();
        self.kernels.push(k);
    }

    /// Scratch memory for the current op.
    pub fn temp(&mut self, label: &str, numel: usize, dtype: DType) -> Slot {
        self.temps.push(ExtraDesc {
            label: format!("{}/{label}", self.node_name),
            numel,
            dtype,
        });
        Slot::Temp(self.temps.len() - 1)
    }

    /// Memory that outlives the step (optimizer state).
    pub fn persistent(&mut self, label: &str, numel: usize, dtype: DType) -> Slot {
        self.persistents.push(ExtraDesc {
            label: label.to_string(),
            numel,
            dtype,
        });
        Slot::Persistent(self.persistents.len() - 1)
    }

    /// The gradient of output `k` of the current node, if anything downstream
    /// produced one.
    pub fn grad_out(&self, k: usize) -> Option<Slot> {
        self.grad_outs.get(k).copied().flatten()
    }

    /// Where the gradient of input `k` goes, if that input needs one.
    pub fn grad_in(&self, k: usize) -> Option<GradTarget> {
        self.grad_ins.get(k).copied().flatten()
    }
}
