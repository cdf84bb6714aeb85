//! The graph runner. A model is traced once per shape into a [`Graph`] of ops;
//! [`Session`] then derives the backward schedule, plans buffer memory by
//! liveness, creates pipelines and bind groups once, and runs each step as
//! one queue submission.

mod emit;
mod op;
mod plan;
mod session;

pub use emit::{Binding, Emit, GradTarget, Kernel, Slot, Window};
pub use op::{Op, OpKernels};
pub use plan::{AdamW, LossScaling, Plan, RunSpec, StepStats};
pub use session::Session;

use crate::dtype::DType;
use crate::error::{shape_err, Result};

/// A tensor in a graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(pub(crate) usize);

impl TensorId {
    pub fn index(self) -> usize {
        self.0
    }
}

/// Where a tensor's values come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Written by the host before a step (data, conditioning, seeds).
    Input { requires_grad: bool },
    /// A model parameter: f32, persistent, trained when `trainable`.
    Param { trainable: bool },
    /// Produced by a node.
    Activation,
}

/// How a freshly initialized parameter is filled (`difftrain init`): the
/// rules torch, diffusers and transformers use.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// U(-bound, bound); torch's default for Linear and Conv weights and
    /// biases is bound = 1 / sqrt(fan_in).
    Uniform(f32),
    /// N(0, std^2).
    Normal(f32),
    /// Every element the same (norm weights 1, biases 0).
    Const(f32),
}

#[derive(Clone, Debug)]
pub struct TensorDesc {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub role: Role,
    /// A reshape shares the storage of the tensor it was made from.
    pub alias_of: Option<TensorId>,
    /// Parameters: how `difftrain init` fills them.
    pub init: Init,
}

impl TensorDesc {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// One op application.
#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub op: Op,
    pub inputs: Vec<TensorId>,
    pub outputs: Vec<TensorId>,
}

/// A traced model: tensors and the nodes that produce them, in execution order.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub tensors: Vec<TensorDesc>,
    pub nodes: Vec<Node>,
    scopes: Vec<String>,
    /// Whether [`Graph::module_param`] makes trainable parameters.
    frozen: bool,
    /// [`Graph::frozen`] freezes nothing (see [`Graph::train_all_modules`]).
    train_all: bool,
    /// The storage dtype of frozen module parameters (f32 when None).
    frozen_dtype: Option<DType>,
    /// Whether [`Graph::checkpoint`] records segments.
    checkpointing: bool,
    /// Gradient checkpointing: ranges of `nodes` whose activations backward
    /// does not keep from the forward pass but recomputes.
    pub checkpoints: Vec<std::ops::Range<usize>>,
}

impl Graph {
    pub fn new() -> Graph {
        Graph::default()
    }

    fn push_tensor(&mut self, desc: TensorDesc) -> TensorId {
        self.tensors.push(desc);
        TensorId(self.tensors.len() - 1)
    }

    /// A host-written input.
    pub fn input(&mut self, name: &str, shape: &[usize], dtype: DType) -> TensorId {
        self.push_tensor(TensorDesc {
            name: name.to_string(),
            shape: shape.to_vec(),
            dtype,
            role: Role::Input {
                requires_grad: false,
            },
            alias_of: None,
            init: Init::Const(0.0),
        })
    }

    /// An input whose gradient the backward pass computes (e.g. `grad.sample`).
    pub fn input_with_grad(&mut self, name: &str, shape: &[usize], dtype: DType) -> TensorId {
        let t = self.input(name, shape, dtype);
        self.tensors[t.0].role = Role::Input {
            requires_grad: true,
        };
        t
    }

    /// A trainable f32 parameter. Its name is its safetensors key.
    pub fn param(&mut self, name: &str, shape: &[usize]) -> TensorId {
        self.push_tensor(TensorDesc {
            name: name.to_string(),
            shape: shape.to_vec(),
            dtype: DType::F32,
            role: Role::Param { trainable: true },
            alias_of: None,
            init: Init::Const(0.0),
        })
    }

    /// A parameter of the current module: its name is the scope path plus
    /// `leaf` (diffusers' state-dict key, e.g. `conv_in.weight`); trainable
    /// unless built inside [`Graph::frozen`].
    ///
    /// Tracing a module a second time (DREAM's extra UNet pass) shares its
    /// parameters: a name already taken returns that parameter, and a
    /// different shape under the same name is an error.
    pub fn module_param(&mut self, leaf: &str, shape: &[usize], init: Init) -> Result<TensorId> {
        let mut name = self.scopes.join(".");
        if !name.is_empty() {
            name.push('.');
        }
        name.push_str(leaf);
        if let Some(t) = self.find(&name) {
            let d = self.desc(t);
            if !matches!(d.role, Role::Param { .. }) || d.shape != shape {
                return Err(shape_err(
                    "module_param",
                    format!(
                        "'{name}' {shape:?} is already a {:?} of shape {:?}",
                        d.role, d.shape
                    ),
                ));
            }
            return Ok(t);
        }
        let t = self.param(&name, shape);
        let d = &mut self.tensors[t.0];
        d.init = init;
        d.role = Role::Param {
            trainable: !self.frozen,
        };
        if self.frozen {
            d.dtype = self.frozen_dtype.unwrap_or(DType::F32);
        }
        Ok(t)
    }

    /// Run `f` with the module parameters it creates frozen (encoders that
    /// are never trained).
    pub fn frozen<R>(&mut self, f: impl FnOnce(&mut Graph) -> R) -> R {
        let was = std::mem::replace(&mut self.frozen, !self.train_all);
        let r = f(self);
        self.frozen = was;
        r
    }

    /// Store the parameters of frozen modules traced from now on in `dtype`
    /// (mixed precision: diffusers casts the frozen VAE and text encoder to
    /// `weight_dtype`). Those modules compute in their weights' dtype.
    pub fn set_frozen_dtype(&mut self, dtype: DType) {
        self.frozen_dtype = Some(dtype);
    }

    /// Make the parameters of modules that are frozen elsewhere trainable
    /// in this graph (fitting the VAE itself, `difftrain train-vae`).
    pub fn train_all_modules(&mut self) {
        self.train_all = true;
    }

    /// A parameter that is never trained (frozen encoders).
    pub fn frozen_param(&mut self, name: &str, shape: &[usize]) -> TensorId {
        let t = self.param(name, shape);
        self.tensors[t.0].role = Role::Param { trainable: false };
        t
    }

    pub fn desc(&self, t: TensorId) -> &TensorDesc {
        &self.tensors[t.0]
    }

    pub fn shape(&self, t: TensorId) -> &[usize] {
        &self.tensors[t.0].shape
    }

    pub fn dtype(&self, t: TensorId) -> DType {
        self.tensors[t.0].dtype
    }

    pub fn numel(&self, t: TensorId) -> usize {
        self.tensors[t.0].numel()
    }

    /// The tensor whose storage `t` uses (itself unless it is a reshape).
    pub fn storage_root(&self, t: TensorId) -> TensorId {
        let mut t = t;
        while let Some(a) = self.tensors[t.0].alias_of {
            t = a;
        }
        t
    }

    /// Floating-point operations of one forward pass, summed over the ops.
    pub fn forward_flops(&self) -> u64 {
        self.nodes
            .iter()
            .map(|n| n.op.kernels().flops(self, &n.inputs, &n.outputs))
            .sum()
    }

    /// Record the segments that [`Graph::checkpoint`] marks from now on
    /// (diffusers' `enable_gradient_checkpointing`).
    pub fn enable_checkpointing(&mut self) {
        self.checkpointing = true;
    }

    /// Trace `f` as one gradient-checkpointing segment (a UNet block) when
    /// checkpointing is enabled: backward then recomputes the segment's
    /// activations from its inputs instead of keeping them from the forward
    /// pass. A segment traced inside another becomes part of the outer one.
    pub fn checkpoint<R>(&mut self, f: impl FnOnce(&mut Graph) -> Result<R>) -> Result<R> {
        let start = self.nodes.len();
        let r = f(self)?;
        let end = self.nodes.len();
        if self.checkpointing && end > start {
            self.checkpoints.retain(|s| s.start < start);
            self.checkpoints.push(start..end);
        }
        Ok(r)
    }

    /// Parameters in creation order.
    pub fn params(&self) -> Vec<TensorId> {
        (0..self.tensors.len())
            .map(TensorId)
            .filter(|t| matches!(self.tensors[t.0].role, Role::Param { .. }))
            .collect()
    }

    /// The parameter or input called `name`.
    pub fn find(&self, name: &str) -> Option<TensorId> {
        self.tensors
            .iter()
            .position(|d| d.name == name && !matches!(d.role, Role::Activation))
            .map(TensorId)
    }

    /// Run `f` with node names prefixed by `scope` (diffusers module paths).
    pub fn scoped<R>(&mut self, scope: &str, f: impl FnOnce(&mut Graph) -> R) -> R {
        self.scopes.push(scope.to_string());
        let r = f(self);
        self.scopes.pop();
        r
    }

    fn node_name(&self, op: &str) -> String {
        let mut s = self.scopes.join(".");
        if !s.is_empty() {
            s.push('.');
        }
        s.push_str(op);
        s.push_str(&format!("#{}", self.nodes.len()));
        s
    }

    /// Add a node producing outputs of the given shapes and dtypes.
    pub fn add_node(
        &mut self,
        op: Op,
        inputs: &[TensorId],
        outputs: &[(Vec<usize>, DType)],
    ) -> Vec<TensorId> {
        let name = self.node_name(op.kind());
        let outs: Vec<TensorId> = outputs
            .iter()
            .enumerate()
            .map(|(i, (shape, dtype))| {
                self.push_tensor(TensorDesc {
                    name: if outputs.len() == 1 {
                        name.clone()
                    } else {
                        format!("{name}:{i}")
                    },
                    shape: shape.clone(),
                    dtype: *dtype,
                    role: Role::Activation,
                    alias_of: None,
                    init: Init::Const(0.0),
                })
            })
            .collect();
        self.nodes.push(Node {
            name,
            op,
            inputs: inputs.to_vec(),
            outputs: outs.clone(),
        });
        outs
    }

    /// A view of `x` with another shape of the same element count. No kernel
    /// runs: the result shares `x`'s storage, and so does its gradient.
    pub fn reshape(&mut self, x: TensorId, shape: &[usize]) -> Result<TensorId> {
        let d = self.desc(x).clone();
        if shape.iter().product::<usize>() != d.numel() {
            return Err(shape_err(
                "reshape",
                format!("'{}' {:?} cannot be viewed as {:?}", d.name, d.shape, shape),
            ));
        }
        let name = self.node_name("reshape");
        Ok(self.push_tensor(TensorDesc {
            name,
            shape: shape.to_vec(),
            dtype: d.dtype,
            role: Role::Activation,
            alias_of: Some(x),
            init: Init::Const(0.0),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checkpointing segments are recorded only once enabled, and one traced
    /// inside another becomes part of the outer one.
    #[test]
    fn checkpoint_segments_nest_into_the_outer_one() {
        let mut g = Graph::new();
        let x = g.input("x", &[4], DType::F32);
        g.checkpoint(|g| Ok(g.scale(x, 2.0))).unwrap();
        assert!(g.checkpoints.is_empty());
        g.enable_checkpointing();
        let a = g
            .checkpoint(|g| {
                let y = g.scale(x, 2.0);
                g.checkpoint(|g| Ok(g.scale(y, 3.0)))
            })
            .unwrap();
        g.checkpoint(|g| Ok(g.scale(a, 0.5))).unwrap();
        assert_eq!(g.checkpoints, vec![1..3, 3..4]);
    }
}
