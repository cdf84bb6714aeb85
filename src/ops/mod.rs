//! One file per op family: graph builder methods with shape checks, the
//! forward and backward kernel launches side by side, a CPU reference, tests.

pub mod conv2d;
pub mod elementwise;
pub mod loss;
pub mod matmul;
pub mod optim;
pub mod reduce;

#[doc(hidden)]
pub mod testing;
