//! What ops write into: a list of kernel launches over abstract slots that the
//! planner later maps to buffers.

use super::{Graph, TensorId};
use crate::dtype::DType;
use crate::gpu::Capabilities;
use std::collections::HashSet;

/// A buffer a kernel binds, before memory planning.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Slot {
    /// The values of a tensor.
    Value(TensorId),
    /// The gradient of a tensor (same shape; f32 for parameters).
    Grad(TensorId),
    /// The values of a tensor recomputed for backward inside a gradient
    /// checkpointing segment (its own storage, live only during that
    /// segment's backward).
    Recomputed(TensorId),
    /// Scratch memory of one op, live only between its first and last use.
    Temp(usize),
    /// Memory that lives for the whole session (optimizer state, step constants).
    Persistent(usize),
}

/// Elements [first, first + numel) of a storage that one binding covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub first: usize,
    pub numel: usize,
}

/// A header tensor bound to a slot: the whole storage, or a window of it
/// (the kernel then indexes from the window's first element).
#[derive(Clone, Copy, Debug)]
pub struct Binding {
    pub name: &'static str,
    pub slot: Slot,
    pub window: Option<Window>,
}

/// One compute dispatch.
#[derive(Clone, Debug)]
pub struct Kernel {
    pub shader: &'static str,
    pub entry: &'static str,
    pub consts: Vec<(&'static str, String)>,
    /// Words of the `Params` uniform, in field order.
    pub params: Vec<u32>,
    /// Header tensors and what they bind. A header tensor left unbound gets a dummy.
    pub bindings: Vec<Binding>,
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
        self.bindings.push(Binding {
            name,
            slot,
            window: None,
        });
        self
    }

    /// Bind only `window` of the slot's storage (from [`Emit::windows`]).
    pub fn bind_window(mut self, name: &'static str, slot: Slot, window: Window) -> Kernel {
        self.bindings.push(Binding {
            name,
            slot,
            window: Some(window),
        });
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

/// A persistent storage that lives inside another (an arena) from element
/// `first` on, so that one dispatch over the arena covers every member.
#[derive(Clone, Copy, Debug)]
pub struct Placement {
    pub member: Slot,
    pub arena: Slot,
    pub first: usize,
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
    pub(super) placements: Vec<Placement>,
    pub(super) node_name: String,
    /// During backward: which outputs of the current node have a gradient,
    /// and where each input's gradient goes.
    pub(super) grad_outs: Vec<Option<Slot>>,
    pub(super) grad_ins: Vec<Option<GradTarget>>,
    /// Storage roots produced inside the checkpointing segment being
    /// recomputed or differentiated: kernels pushed now read and write
    /// their recomputed values instead.
    pub(super) recomputed: HashSet<TensorId>,
}

impl<'g> Emit<'g> {
    pub(super) fn new(graph: &'g Graph, caps: &'g Capabilities) -> Self {
        Emit {
            graph,
            caps,
            kernels: Vec::new(),
            temps: Vec::new(),
            persistents: Vec::new(),
            placements: Vec::new(),
            node_name: String::new(),
            grad_outs: Vec::new(),
            grad_ins: Vec::new(),
            recomputed: HashSet::new(),
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
            Slot::Value(t) | Slot::Grad(t) | Slot::Recomputed(t) => self.graph.dtype(t),
            Slot::Temp(i) => self.temps[i].dtype,
            Slot::Persistent(i) => self.persistents[i].dtype,
        }
    }

    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    pub fn push(&mut self, mut k: Kernel) {
        k.node = self.node_name.clone();
        for b in &mut k.bindings {
            if let Slot::Value(t) = b.slot {
                let root = self.graph.storage_root(t);
                if self.recomputed.contains(&root) {
                    b.slot = Slot::Recomputed(root);
                }
            }
        }
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

    /// Store the persistent `member` (a parameter, its gradient, optimizer
    /// state) inside the persistent `arena` from element `first` on, which
    /// must be a multiple of [`Emit::arena_align`]. Kernels may bind either.
    pub fn place(&mut self, member: Slot, arena: Slot, first: usize) {
        self.placements.push(Placement {
            member,
            arena,
            first,
        });
    }

    /// The element alignment of arena members of `dtype`: their storages
    /// start at byte offsets a binding may use.
    pub fn arena_align(&self, dtype: DType) -> usize {
        self.caps.storage_offset_alignment.max(16) as usize / dtype.size_bytes()
    }

    /// Windows over a storage of `numel` elements of `dtype`, in order, each
    /// whole rows of `row` elements (the last row may be partial), within the
    /// adapter's binding limit and starting at an aligned byte offset. One
    /// window of everything when the storage fits one binding; also when rows
    /// cannot be split that finely, and the planner then reports the binding
    /// as too large. An op binds each with [`Kernel::bind_window`] and launches
    /// once per window, so storages that fit cost nothing extra.
    pub fn windows(&self, dtype: DType, numel: usize, row: usize) -> Vec<Window> {
        let whole = vec![Window { first: 0, numel }];
        let limit = self.caps.max_binding_bytes;
        let row_bytes = (row * dtype.size_bytes()) as u64;
        if dtype.buffer_bytes(numel) <= limit || row_bytes == 0 {
            return whole;
        }
        // Windows start every `step` rows: the fewest rows filling a multiple
        // of the offset alignment (taken as at least 16 bytes, so a window's
        // 16-byte padded end, see `DType::window_bytes`, stays in its rows).
        let align = self.caps.storage_offset_alignment.max(16);
        let step = align / gcd(row_bytes, align);
        // A window of r rows binds r * row_bytes rounded up to 16 bytes.
        let rows = (limit / 16 * 16) / row_bytes / step * step;
        if rows == 0 {
            return whole;
        }
        let per = rows as usize * row;
        (0..numel)
            .step_by(per)
            .map(|first| Window {
                first,
                numel: per.min(numel - first),
            })
            .collect()
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

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(max_binding_bytes: u64, storage_offset_alignment: u64) -> Capabilities {
        Capabilities {
            shader_f16: false,
            subgroups: false,
            timestamps: false,
            subgroup_min_size: 0,
            subgroup_max_size: 0,
            is_cpu: false,
            max_binding_bytes,
            max_buffer_bytes: u64::MAX,
            storage_offset_alignment,
        }
    }

    /// Windows cover the storage in order, in whole rows, each within the
    /// limit at an aligned byte offset.
    #[test]
    fn windows_cover_in_aligned_whole_rows_within_the_limit() {
        let g = Graph::new();
        for (limit, align, dtype, numel, row) in [
            (2048, 256, DType::F32, 203 * 7, 7),
            (2048, 256, DType::F16, 300 * 7, 7),
            (4096, 16, DType::BF16, 1001 * 10, 10),
            (1024, 256, DType::F32, 601, 256),
            (128 << 20, 256, DType::F32, 49408 * 768, 768),
        ] {
            let c = caps(limit, align);
            let e = Emit::new(&g, &c);
            let ws = e.windows(dtype, numel, row);
            let case = format!("{dtype} {numel}/{row} under {limit}");
            assert!(ws.len() > 1, "{case}: {ws:?}");
            let mut next = 0;
            for w in &ws {
                assert_eq!(w.first, next, "{case}: {ws:?}");
                let (offset, bytes) = dtype.window_bytes(w.first, w.numel);
                assert!(
                    offset.is_multiple_of(align) && w.first % row == 0,
                    "{case}: {w:?}"
                );
                assert!(bytes <= limit, "{case}: {w:?} binds {bytes}");
                next += w.numel;
            }
            assert_eq!(next, numel, "{case}");
        }
    }

    #[test]
    fn storage_that_fits_or_cannot_split_is_one_window() {
        let g = Graph::new();
        let c = caps(2048, 256);
        let e = Emit::new(&g, &c);
        let whole = |numel| vec![Window { first: 0, numel }];
        assert_eq!(e.windows(DType::F32, 512, 7), whole(512));
        // One row of 600 f32 is above the limit.
        assert_eq!(e.windows(DType::F32, 1800, 600), whole(1800));
        // Rows of 1028 bytes: aligned starts every 64 rows, far above the limit.
        assert_eq!(e.windows(DType::F32, 2570, 257), whole(2570));
    }
}
