//! From a graph to a schedule with memory: forward kernels, the backward
//! schedule derived in reverse, optimizer kernels, and buffers assigned to
//! every slot by liveness.

use super::emit::{Binding, Emit, ExtraDesc, GradTarget, Kernel, Placement, Slot, Window};
use super::{Graph, Role, TensorId};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gpu::Capabilities;
use std::collections::{HashMap, HashSet};

/// AdamW with decoupled weight decay (Loshchilov & Hutter), optionally after
/// clipping the global gradient norm, as `torch.nn.utils.clip_grad_norm_` does.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Clip the global L2 norm of all gradients to this value.
    pub max_grad_norm: Option<f32>,
    /// Dynamic loss scaling (fp16 training).
    pub loss_scaling: Option<LossScaling>,
}

/// Dynamic loss scaling with `torch.amp.GradScaler`'s semantics: the
/// backward pass runs on scale * loss; a step whose gradients hold inf or
/// NaN is skipped and the scale multiplied by `backoff_factor`; after
/// `growth_interval` good steps in a row it is multiplied by `growth_factor`.
#[derive(Clone, Debug, PartialEq)]
pub struct LossScaling {
    pub init_scale: f32,
    pub growth_factor: f32,
    pub backoff_factor: f32,
    pub growth_interval: u32,
}

impl Default for LossScaling {
    /// GradScaler's defaults: 2^16, x2 after 2000 good steps, x0.5.
    fn default() -> Self {
        LossScaling {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }
}

impl Default for AdamW {
    /// diffusers' train_text_to_image.py defaults (lr 1e-4, betas 0.9/0.999,
    /// eps 1e-8, weight decay 1e-2, max_grad_norm 1.0).
    fn default() -> Self {
        AdamW {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
            max_grad_norm: Some(1.0),
            loss_scaling: None,
        }
    }
}

/// What a session computes each step.
#[derive(Clone, Debug, Default)]
pub struct RunSpec {
    /// Tensors kept readable after a step. Everything else may share memory.
    pub outputs: Vec<TensorId>,
    /// Backward roots: (tensor, host input holding d(objective)/d(tensor)).
    /// Empty: a no-grad forward that keeps no activations.
    pub seeds: Vec<(TensorId, TensorId)>,
    /// Gradients kept readable after a step (parameter gradients always are).
    pub grads: Vec<TensorId>,
    pub optimizer: Option<AdamW>,
    /// Store f16 packed in u32 even where the adapter has SHADER_F16 (tests
    /// use it to cover the portable path on any adapter).
    pub force_packed_f16: bool,
    /// Gradient accumulation: parameter gradients add up over steps run
    /// with [`crate::Session::step_accumulate`] (no optimizer), and the
    /// optimizer zeroes each gradient after using it.
    pub accumulate_grads: bool,
    /// Keep an exponential moving average of the trained parameters in
    /// persistent `ema.NAME` storages, updated after each optimizer step
    /// (see [`crate::ops::optim::emit_ema`]).
    pub ema: bool,
}

impl RunSpec {
    /// A forward pass that keeps `outputs` readable and no activations.
    pub fn no_grad(outputs: Vec<TensorId>) -> RunSpec {
        RunSpec {
            outputs,
            ..Default::default()
        }
    }
}

/// One planned allocation (a tensor's values or gradient, scratch, state).
#[derive(Clone, Debug)]
pub struct StorageDesc {
    pub label: String,
    pub numel: usize,
    pub dtype: DType,
    pub persistent: bool,
    /// First and last kernel index that binds it.
    pub first: usize,
    pub last: usize,
    /// Index into `Plan::buffers`, and the byte offset in it (non-zero for
    /// members of an arena).
    pub buffer: usize,
    pub offset: u64,
}

impl StorageDesc {
    /// A storage not yet used by any kernel nor given a buffer.
    fn new(label: String, numel: usize, dtype: DType, persistent: bool) -> StorageDesc {
        StorageDesc {
            label,
            numel,
            dtype,
            persistent,
            first: usize::MAX,
            last: 0,
            buffer: 0,
            offset: 0,
        }
    }

    /// Byte offset and size in its buffer of a binding of `window` of this
    /// storage (`None`: all of it).
    pub fn extent(&self, window: Option<Window>) -> (u64, u64) {
        let w = window.unwrap_or(Window {
            first: 0,
            numel: self.numel,
        });
        let (offset, bytes) = self.dtype.window_bytes(w.first, w.numel);
        (self.offset + offset, bytes)
    }
}

/// Figures per step, reported by benches and `difftrain` commands.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepStats {
    pub dispatches: usize,
    pub submissions: usize,
    /// Bytes of the pooled activation/gradient/scratch buffers.
    pub pooled_bytes: u64,
    /// Bytes of persistent buffers (inputs, parameters, their gradients, optimizer state).
    pub persistent_bytes: u64,
    /// Forward FLOPs of the graph's ops (backward counted by benches).
    pub forward_flops: u64,
}

/// The complete static schedule of a session.
pub struct Plan {
    pub kernels: Vec<Kernel>,
    pub storages: Vec<StorageDesc>,
    pub slot_storage: HashMap<Slot, usize>,
    /// Byte size and label of each buffer to create.
    pub buffers: Vec<(String, u64)>,
    pub stats: StepStats,
    /// The persistent slot the host fills each step with AdamW's
    /// [lr, 0, 0, 0] (the step count lives on the GPU, `adamw.step`).
    pub adamw_step: Option<Slot>,
    pub adamw: Option<AdamW>,
    pub trained_params: Vec<TensorId>,
    /// `kernels[optimizer_start..]` are the optimizer's (clipping, AdamW, EMA).
    pub optimizer_start: usize,
}

/// Keys of storages: slots that share memory map to one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum StorageKey {
    Value(TensorId),
    Grad(TensorId),
    Recomputed(TensorId),
    Temp(usize),
    Persistent(usize),
}

impl Plan {
    /// Plan `spec` on `graph` for a device with `caps` (whose binding and
    /// buffer limits every binding and buffer is checked against).
    pub fn build(graph: &Graph, caps: &Capabilities, spec: &RunSpec) -> Result<Plan> {
        let mut e = Emit::new(graph, caps);
        let mut stats = StepStats::default();

        // 1. Forward, in graph order.
        for node in &graph.nodes {
            e.node_name = node.name.clone();
            node.op
                .kernels()
                .forward(&mut e, &node.inputs, &node.outputs)?;
        }

        // 2. Backward, in reverse, from the seeds.
        let root = |t: TensorId| graph.storage_root(t);
        // Gradients stored elsewhere than their own storage: a seed's host
        // input, or the gradient of an output they pass through unchanged.
        let mut grad_alias: HashMap<TensorId, StorageKey> = HashMap::new();
        let kept_grads: HashSet<TensorId> = spec.grads.iter().map(|&t| root(t)).collect();
        let mut has_grad: HashSet<TensorId> = HashSet::new();
        for &(t, seed) in &spec.seeds {
            if graph.shape(t) != graph.shape(seed) {
                return Err(Error::Shape {
                    op: "backward".into(),
                    msg: format!(
                        "seed '{}' {:?} does not match '{}' {:?}",
                        graph.desc(seed).name,
                        graph.shape(seed),
                        graph.desc(t).name,
                        graph.shape(t)
                    ),
                });
            }
            grad_alias.insert(root(t), StorageKey::Value(root(seed)));
            has_grad.insert(root(t));
        }
        let requires = requires_grad(graph);
        let mut trained_params = Vec::new();
        if !spec.seeds.is_empty() {
            for (ni, node) in graph.nodes.iter().enumerate().rev() {
                // Gradient checkpointing: leaving a segment (this node comes
                // before it), its recomputed values are no longer read...
                if graph.checkpoints.iter().any(|s| s.start == ni + 1) {
                    e.recomputed.clear();
                }
                // ...and entering one from its end,
                // recompute its forward (if backward passes through it); its
                // nodes' backward then reads the recomputed values.
                if let Some(seg) = graph.checkpoints.iter().find(|s| s.end == ni + 1) {
                    let nodes = &graph.nodes[seg.clone()];
                    let needed = nodes
                        .iter()
                        .flat_map(|n| &n.outputs)
                        .any(|&o| has_grad.contains(&root(o)));
                    if needed {
                        e.recomputed = nodes
                            .iter()
                            .flat_map(|n| &n.outputs)
                            .map(|&o| root(o))
                            .collect();
                        for n in nodes {
                            e.node_name = format!("{}.recompute", n.name);
                            n.op.kernels().forward(&mut e, &n.inputs, &n.outputs)?;
                        }
                    }
                }
                let grad_outs: Vec<Option<Slot>> = node
                    .outputs
                    .iter()
                    .map(|&o| has_grad.contains(&root(o)).then_some(Slot::Grad(o)))
                    .collect();
                if grad_outs.iter().all(Option::is_none) {
                    continue;
                }
                let mut written = has_grad.clone();
                let mut grad_ins: Vec<Option<GradTarget>> = node
                    .inputs
                    .iter()
                    .map(|&i| {
                        requires.contains(&root(i)).then(|| {
                            let first = written.insert(root(i));
                            let param = matches!(graph.desc(root(i)).role, Role::Param { .. });
                            GradTarget {
                                slot: Slot::Grad(i),
                                accumulate: !first || (param && spec.accumulate_grads),
                            }
                        })
                    })
                    .collect();
                // At most one input per output: two inputs' gradients in one
                // storage would mix.
                let mut taken: HashSet<usize> = HashSet::new();
                for (ii, oi) in node.op.kernels().grad_passthrough(graph, &node.inputs) {
                    if taken.contains(&oi) {
                        continue;
                    }
                    let (i, o) = (root(node.inputs[ii]), root(node.outputs[oi]));
                    let fresh = grad_ins[ii].is_some_and(|t| !t.accumulate);
                    let alone = node.inputs.iter().filter(|&&x| root(x) == i).count() == 1;
                    let same = graph.desc(i).dtype == graph.desc(o).dtype
                        && graph.desc(i).numel() == graph.desc(o).numel();
                    let own = |t: TensorId| {
                        !matches!(graph.desc(t).role, Role::Param { .. })
                            && !kept_grads.contains(&t)
                    };
                    // Where the output's gradient lives (not in a seed's input).
                    let target = match grad_alias.get(&o) {
                        None => Some(StorageKey::Grad(o)),
                        Some(&k @ StorageKey::Grad(_)) => Some(k),
                        Some(_) => None,
                    };
                    // The output's gradient is read only by this node's
                    // backward, so from here on it may hold the input's.
                    if let Some(target) = target.filter(|_| {
                        fresh && alone && same && own(i) && own(o) && has_grad.contains(&o)
                    }) {
                        grad_alias.insert(i, target);
                        grad_ins[ii] = None;
                        taken.insert(oi);
                    }
                }
                if grad_ins.iter().all(Option::is_none) {
                    continue;
                }
                e.node_name = format!("{}.backward", node.name);
                e.grad_outs = grad_outs;
                e.grad_ins = grad_ins;
                node.op
                    .kernels()
                    .backward(&mut e, &node.inputs, &node.outputs)?;
                has_grad = written;
            }
            e.grad_outs.clear();
            e.grad_ins.clear();
            e.recomputed.clear();
            for p in graph.params() {
                if matches!(graph.desc(p).role, Role::Param { trainable: true })
                    && has_grad.contains(&p)
                {
                    trained_params.push(p);
                }
            }
        }

        // 3. Optimizer, over the trained parameters packed in arenas.
        let optimizer_start = e.kernels.len();
        let mut adamw_step = None;
        let arenas = if spec.optimizer.is_some() || spec.ema {
            crate::ops::optim::param_arenas(&mut e, &trained_params)
        } else {
            Vec::new()
        };
        if let Some(opt) = &spec.optimizer {
            e.node_name = "adamw".into();
            adamw_step = Some(crate::ops::optim::emit_adamw(
                &mut e,
                &arenas,
                opt,
                spec.accumulate_grads,
                spec.seeds.first().map(|&(_, seed)| seed),
            )?);
        }
        if spec.ema {
            e.node_name = "ema".into();
            crate::ops::optim::emit_ema(&mut e, &arenas);
        }

        // 4. Slots -> storages.
        let outputs: HashSet<TensorId> = spec.outputs.iter().map(|&t| root(t)).collect();
        let mut storages: Vec<StorageDesc> = Vec::new();
        let mut by_key: HashMap<StorageKey, usize> = HashMap::new();
        let mut slot_storage: HashMap<Slot, usize> = HashMap::new();
        let Emit {
            kernels,
            temps,
            persistents,
            placements,
            ..
        } = e;
        let extra = |d: &ExtraDesc, persistent: bool| {
            StorageDesc::new(d.label.clone(), d.numel, d.dtype, persistent)
        };
        // The storage of a slot, created on first sight.
        let mut storage_of = |slot: Slot, storages: &mut Vec<StorageDesc>| -> (usize, StorageKey) {
            let key = match slot {
                Slot::Value(t) => StorageKey::Value(root(t)),
                Slot::Grad(t) => grad_alias
                    .get(&root(t))
                    .copied()
                    .unwrap_or(StorageKey::Grad(root(t))),
                Slot::Recomputed(t) => StorageKey::Recomputed(root(t)),
                Slot::Temp(i) => StorageKey::Temp(i),
                Slot::Persistent(i) => StorageKey::Persistent(i),
            };
            let sid = *by_key.entry(key).or_insert_with(|| {
                storages.push(match key {
                    StorageKey::Value(t) | StorageKey::Grad(t) => {
                        let d = graph.desc(t);
                        let is_grad = matches!(key, StorageKey::Grad(_));
                        let persistent = match d.role {
                            Role::Input { .. } => !is_grad || kept_grads.contains(&t),
                            Role::Param { .. } => true,
                            Role::Activation => {
                                if is_grad {
                                    kept_grads.contains(&t)
                                } else {
                                    outputs.contains(&t)
                                }
                            }
                        };
                        let label = if is_grad {
                            format!("grad.{}", d.name)
                        } else {
                            d.name.clone()
                        };
                        StorageDesc::new(label, d.numel(), d.dtype, persistent)
                    }
                    StorageKey::Recomputed(t) => {
                        let d = graph.desc(t);
                        StorageDesc::new(
                            format!("recomputed.{}", d.name),
                            d.numel(),
                            d.dtype,
                            false,
                        )
                    }
                    StorageKey::Temp(i) => extra(&temps[i], false),
                    StorageKey::Persistent(i) => extra(&persistents[i], true),
                });
                storages.len() - 1
            });
            (sid, key)
        };
        for (ki, k) in kernels.iter().enumerate() {
            for b in &k.bindings {
                let (sid, key) = storage_of(b.slot, &mut storages);
                slot_storage.insert(normalize(graph, b.slot), sid);
                if let StorageKey::Value(t) = key {
                    slot_storage.insert(Slot::Value(t), sid);
                }
                let s = &mut storages[sid];
                s.first = s.first.min(ki);
                s.last = s.last.max(ki);
                check_binding(graph, caps, k, b, s)?;
            }
        }
        // Arena members, also those no kernel binds by themselves (optimizer
        // state that checkpoints read by label): storage -> its placement.
        let mut placed: HashMap<usize, Placement> = HashMap::new();
        for pl in &placements {
            let (sid, _) = storage_of(pl.member, &mut storages);
            slot_storage.insert(normalize(graph, pl.member), sid);
            placed.insert(sid, *pl);
        }
        // 5. Buffers: persistent storages get their own; the rest share a pool,
        // greedily by liveness (best fit, else grow the largest free buffer).
        let mut buffers: Vec<(String, u64)> = Vec::new();
        let mut order: Vec<usize> = (0..storages.len())
            .filter(|&s| !storages[s].persistent)
            .collect();
        order.sort_by_key(|&s| (storages[s].first, s));
        let mut free: Vec<usize> = Vec::new();
        let mut live: Vec<usize> = Vec::new(); // storage ids holding a pool buffer
        for s in order {
            let first = storages[s].first;
            live.retain(|&o| {
                if storages[o].last < first {
                    free.push(storages[o].buffer);
                    false
                } else {
                    true
                }
            });
            let need = storages[s].dtype.buffer_bytes(storages[s].numel);
            let pick = free
                .iter()
                .enumerate()
                .filter(|(_, &b)| buffers[b].1 >= need)
                .min_by_key(|(_, &b)| buffers[b].1)
                .or_else(|| free.iter().enumerate().max_by_key(|(_, &b)| buffers[b].1))
                .map(|(i, _)| i);
            let b = match pick {
                Some(i) => {
                    let b = free.swap_remove(i);
                    buffers[b].1 = buffers[b].1.max(need);
                    b
                }
                None => {
                    buffers.push((format!("pool{}", buffers.len()), need));
                    buffers.len() - 1
                }
            };
            storages[s].buffer = b;
            live.push(s);
        }
        stats.pooled_bytes = buffers.iter().map(|b| b.1).sum();
        for (sid, s) in storages.iter_mut().enumerate() {
            if s.persistent && !placed.contains_key(&sid) {
                let bytes = s.dtype.buffer_bytes(s.numel);
                stats.persistent_bytes += bytes;
                buffers.push((s.label.clone(), bytes));
                s.buffer = buffers.len() - 1;
            }
        }
        // Arena members share their arena's buffer, each at an aligned offset.
        for (&sid, pl) in &placed {
            let arena = storages[slot_storage[&pl.arena]].clone();
            let s = &mut storages[sid];
            let at = (pl.first * s.dtype.size_bytes()) as u64;
            if !s.persistent
                || s.dtype != arena.dtype
                || pl.first + s.numel > arena.numel
                || !at.is_multiple_of(caps.storage_offset_alignment.max(16))
            {
                return Err(Error::Tensor {
                    name: s.label.clone(),
                    msg: format!(
                        "cannot be placed at element {} of arena '{}' ({} {} elements)",
                        pl.first, arena.label, arena.numel, arena.dtype
                    ),
                });
            }
            s.buffer = arena.buffer;
            s.offset = arena.offset + at;
        }
        stats.dispatches = kernels.len();
        stats.forward_flops = graph.forward_flops();
        stats.submissions = 1;
        Ok(Plan {
            kernels,
            storages,
            slot_storage,
            buffers,
            stats,
            adamw_step,
            adamw: spec.optimizer.clone(),
            trained_params,
            optimizer_start,
        })
    }
}

/// Check one binding of kernel `k` against the storage `s` it binds and the
/// device's limits: the window lies inside the storage at an aligned offset,
/// the bound bytes fit one binding and the storage fits one buffer.
fn check_binding(
    graph: &Graph,
    caps: &Capabilities,
    k: &Kernel,
    b: &Binding,
    s: &StorageDesc,
) -> Result<()> {
    let shape = match b.slot {
        Slot::Value(t) | Slot::Grad(t) => graph.shape(t).to_vec(),
        _ => vec![s.numel],
    };
    let buffer = s.dtype.buffer_bytes(s.numel);
    if buffer > caps.max_buffer_bytes {
        return Err(Error::BufferTooLarge {
            op: k.node.clone(),
            tensor: s.label.clone(),
            shape,
            bytes: buffer,
            limit: caps.max_buffer_bytes,
        });
    }
    let (offset, bytes) = s.extent(b.window);
    let tensor = match b.window {
        Some(w) => {
            let align = caps.storage_offset_alignment.max(4);
            if w.first + w.numel > s.numel || !offset.is_multiple_of(align) {
                return Err(Error::Tensor {
                    name: s.label.clone(),
                    msg: format!(
                        "{} ({}::{}) binds elements {}..{} of its {} at byte offset {offset}; \
                         a window must lie inside the tensor at a multiple of {align} bytes",
                        k.node,
                        k.shader,
                        k.entry,
                        w.first,
                        w.first + w.numel,
                        s.numel
                    ),
                });
            }
            format!("{} elements {}..{}", s.label, w.first, w.first + w.numel)
        }
        None => s.label.clone(),
    };
    if bytes > caps.max_binding_bytes {
        return Err(Error::BindingTooLarge {
            op: k.node.clone(),
            tensor,
            shape,
            bytes,
            limit: caps.max_binding_bytes,
        });
    }
    Ok(())
}

/// The slot of a tensor's storage root: a reshape's values and gradient are
/// those of the tensor it views.
pub fn normalize(graph: &Graph, slot: Slot) -> Slot {
    match slot {
        Slot::Value(t) => Slot::Value(graph.storage_root(t)),
        Slot::Grad(t) => Slot::Grad(graph.storage_root(t)),
        other => other,
    }
}

/// Storage roots whose gradient the backward pass needs: trainable parameters,
/// inputs that ask for one, and everything computed from them through
/// differentiable ops.
fn requires_grad(graph: &Graph) -> HashSet<TensorId> {
    let mut req: HashSet<TensorId> = graph
        .tensors
        .iter()
        .enumerate()
        .filter(|(_, d)| {
            matches!(
                d.role,
                Role::Param { trainable: true }
                    | Role::Input {
                        requires_grad: true
                    }
            ) && d.alias_of.is_none()
        })
        .map(|(i, _)| TensorId(i))
        .collect();
    for node in graph
        .nodes
        .iter()
        .filter(|n| n.op.kernels().differentiable())
    {
        if node
            .inputs
            .iter()
            .any(|&i| req.contains(&graph.storage_root(i)))
        {
            req.extend(node.outputs.iter().copied());
        }
    }
    req
}
