//! difftrain: a portable trainer for text-to-image latent diffusion models.
//! Every kernel is a WGSL compute shader run through wgpu by our own graph
//! runner with hand-written backward passes.
//!
//! Layers, top to bottom: `models` (UNet, CLIP, VAE in diffusers' layout),
//! `nn` (layers with diffusers' names), `graph` (trace, backward schedule, memory plan,
//! sessions), `ops` (one file per op: forward and backward kernels, CPU
//! reference, tests), `gpu` (device, pipelines, shaders, readback).

#[cfg(not(target_arch = "wasm32"))]
pub mod bench;
pub mod dtype;
pub mod error;
pub mod gpu;
pub mod graph;
pub mod io;
#[cfg(not(target_arch = "wasm32"))]
pub mod models;
pub mod nn;
pub mod ops;
#[cfg(not(target_arch = "wasm32"))]
pub mod sample;
#[cfg(not(target_arch = "wasm32"))]
pub mod train;

pub use dtype::DType;
pub use error::{Error, Result};
pub use gpu::{AdapterChoice, Gpu};
pub use graph::{AdamW, Graph, RunSpec, Session, TensorId};
