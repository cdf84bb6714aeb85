//! The models in diffusers' folder layout: each reads its `config.json`,
//! traces its forward pass into a graph with diffusers' / transformers'
//! parameter names, and loads and saves its safetensors weights unchanged.

pub mod clip;
pub mod forward;
pub mod init;
pub mod pipeline;
pub mod unet;
pub mod unet_config;
pub mod vae;
pub mod weights;

pub use unet::UNet;
pub use unet_config::UNetConfig;
