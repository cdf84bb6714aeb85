//! Layers built from ops, named and initialized as diffusers and transformers
//! name and initialize them: a layer creates its parameters under the graph's
//! current scope (`g.scoped("conv_in", ..)` gives `conv_in.weight`) and
//! applies the ops. One file per family of layers.

pub mod attention;
pub mod layers;
pub mod resnet;

pub use attention::{attention, transformer_2d, Transformer2d};
pub use layers::{conv2d, group_norm, layer_norm, linear, linear_init, Conv};
pub use resnet::{downsample_2d, resnet_block_2d, upsample_2d, Resnet};
