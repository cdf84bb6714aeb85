//! One file per op family: graph builder methods with shape checks, the
//! forward and backward kernel launches side by side, a CPU reference, tests.

pub mod elementwise;
pub mod group_norm;
pub mod layer_norm;
pub mod loss;
pub mod matmul;
pub mod optim;
pub mod reduce;
pub mod softmax;

#[doc(hidden)]
pub mod testing;
