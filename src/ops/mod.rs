//! One file per op family: graph builder methods with shape checks, the
//! forward and backward kernel launches side by side, a CPU reference, tests.

pub mod attention;
pub mod concat;
pub mod conv2d;
pub mod diffusion;
pub mod elementwise;
pub mod embedding;
pub mod group_norm;
pub mod layer_norm;
pub mod loss;
pub mod matmul;
pub mod optim;
pub mod reduce;
pub mod softmax;
pub mod transpose;
pub mod upsample;

#[cfg(not(target_arch = "wasm32"))]
#[doc(hidden)]
pub mod testing;
