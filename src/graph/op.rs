//! The op vocabulary. Each variant wraps the op's attributes, defined with its
//! kernels in `src/ops/<op>.rs`.

use super::{Emit, Graph, TensorId};
use crate::error::Result;
use crate::ops;

/// What every op provides: its forward kernels and, where it can be trained
/// through, its backward kernels. Both emit into `e` over slots; the planner
/// maps them to buffers.
pub trait OpKernels {
    /// Short name for labels and errors ("matmul", "conv2d", ...).
    fn kind(&self) -> &'static str;

    fn forward(&self, e: &mut Emit, inputs: &[TensorId], outputs: &[TensorId]) -> Result<()>;

    /// Write the gradient of every input for which `e.grad_in(k)` is `Some`,
    /// in input order, from the output gradients `e.grad_out(k)` and whatever
    /// forward values it needs (they stay alive until this runs).
    fn backward(&self, e: &mut Emit, inputs: &[TensorId], outputs: &[TensorId]) -> Result<()>;

    /// Pairs (input, output) whose gradients are equal: d(input) is exactly
    /// d(output) (an add of same-shaped operands). Where it is safe the
    /// planner gives the input's gradient the output gradient's storage and
    /// `backward` sees no target for that input, so no copy runs.
    fn grad_passthrough(&self, _g: &Graph, _inputs: &[TensorId]) -> Vec<(usize, usize)> {
        Vec::new()
    }

    /// Whether gradients flow through this op. An op that returns false
    /// (random sampling, the DREAM update) detaches its outputs: nothing
    /// computed from them asks its inputs for a gradient, so a no-grad pass
    /// feeding it keeps no activations for backward.
    fn differentiable(&self) -> bool {
        true
    }

    /// Floating-point operations of the forward pass (for benchmarks).
    fn flops(&self, _g: &Graph, _inputs: &[TensorId], _outputs: &[TensorId]) -> u64 {
        0
    }
}

macro_rules! op_enum {
    ($($(#[$doc:meta])* $variant:ident($ty:ty),)*) => {
        /// One op application's attributes.
        #[derive(Clone, Debug)]
        pub enum Op { $($(#[$doc])* $variant($ty),)* }

        impl Op {
            pub fn kernels(&self) -> &dyn OpKernels {
                match self { $(Op::$variant(o) => o,)* }
            }

            pub fn kind(&self) -> &'static str {
                self.kernels().kind()
            }
        }

        $(impl From<$ty> for Op {
            fn from(o: $ty) -> Op { Op::$variant(o) }
        })*
    };
}

op_enum! {
    // elementwise
    /// SiLU, GELU (erf), GELU-tanh, quick-GELU.
    Unary(ops::elementwise::Unary),
    /// add / mul with broadcasting of the second operand over leading and trailing dims.
    Binary(ops::elementwise::Binary),
    /// x * s
    Scale(ops::elementwise::Scale),
    /// x stored in another dtype.
    Cast(ops::elementwise::Cast),
    /// hidden * gelu(gate) over the two halves of the last dim.
    Geglu(ops::elementwise::Geglu),
    /// torch.clamp(x, lo, hi)
    Clamp(ops::elementwise::Clamp),
    // matmul
    /// Batched matmul with optional transposes and bias.
    Matmul(ops::matmul::Matmul),
    // conv2d
    /// 2-D convolution (NCHW) with optional bias, stride and zero padding.
    Conv2d(ops::conv2d::Conv2d),
    // reduce
    /// Sum over axes.
    ReduceSum(ops::reduce::ReduceSum),
    // normalization
    /// torch GroupNorm (affine), optionally fused with SiLU.
    GroupNorm(ops::group_norm::GroupNorm),
    /// torch LayerNorm over the last dim (affine).
    LayerNorm(ops::layer_norm::LayerNorm),
    /// Softmax over the last dim.
    Softmax(ops::softmax::Softmax),
    // attention
    /// Multi-head scaled-dot-product attention (flash style), self or cross, optionally causal.
    Attention(ops::attention::Attention),
    // loss
    /// Mean-squared error to a scalar.
    MseLoss(ops::loss::MseLoss),
    // concat
    /// Concatenation along an axis.
    Concat(ops::concat::Concat),
    /// Split along an axis into several outputs.
    Split(ops::concat::Split),
    // upsample
    /// Nearest-neighbour 2x upsampling of NCHW.
    UpsampleNearest2x(ops::upsample::UpsampleNearest2x),
    // transpose
    /// Swap of the last two dims.
    TransposeLast2(ops::transpose::TransposeLast2),
    // diffusion
    /// Random timesteps and noise (counter-based RNG), DDPMScheduler
    /// add_noise / get_velocity, the DREAM update; none differentiable.
    Diffusion(ops::diffusion::Diffusion),
    // embedding
    /// Sinusoidal timestep embedding (forward only).
    TimestepEmbedding(ops::embedding::TimestepEmbedding),
    /// Token-id lookup into a table.
    Embedding(ops::embedding::Embedding),
}
