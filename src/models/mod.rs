//! The models in diffusers' folder layout: each reads its `config.json`,
//! traces its forward pass into a graph with diffusers' / transformers'
//! parameter names, and loads and saves its safetensors weights unchanged;
//! `tokenizer` turns prompts into the text encoder's input ids.

pub mod clip;
// The `forward` command's runners (blocking readbacks): native only.
#[cfg(not(target_arch = "wasm32"))]
pub mod forward;
pub mod init;
pub mod pipeline;
pub mod tokenizer;
pub mod unet;
pub mod unet_config;
pub mod vae;
pub mod weights;

pub use clip::ClipTextModel;
pub use pipeline::PipelineDir;
pub use tokenizer::ClipTokenizer;
pub use unet::UNet;
pub use vae::Vae;
