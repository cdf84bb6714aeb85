//! difftrain: a portable trainer for text-to-image latent diffusion models.
//! Every kernel is a WGSL compute shader run through wgpu by our own graph
//! runner with hand-written backward passes.
//!
//! Layers, top to bottom: `models` (UNet, CLIP, VAE in diffusers' layout),
//! `nn` (layers with diffusers' names), `graph` (trace, backward schedule, memory plan,
//! sessions), `ops` (one file per op: forward and backward kernels, CPU
//! reference, tests), `gpu` (device, pipelines, shaders, readback).

// wgpu's types are neither Send nor Sync in the browser (one thread there),
// so shared handles are `Arc`s of non-Send types on wasm32 only.
#![cfg_attr(target_arch = "wasm32", allow(clippy::arc_with_non_send_sync))]

#[cfg(not(target_arch = "wasm32"))]
pub mod bench;
pub mod dtype;
pub mod error;
pub mod gpu;
pub mod graph;
pub mod io;
pub mod models;
pub mod nn;
pub mod ops;
pub mod platform;
pub mod sample;
pub mod train;

pub use dtype::DType;
pub use error::{Error, Result};
pub use gpu::{AdapterChoice, Gpu};
pub use graph::{AdamW, Graph, RunSpec, Session, TensorId};
