//! Training: the spec's step (noise, add_noise, targets, DREAM, forward, MSE,
//! backward, clipping, AdamW) as one graph, and around it the config, data,
//! learning-rate schedule, the run that steps it, and natively the loop with
//! checkpoints, logs and plots.

pub mod builtin;
pub mod cache;
pub mod config;
pub mod data;
pub mod ema;
mod encoders;
pub mod heldout;
pub mod lr;
pub mod options;
pub mod run;
pub mod scheduler;
pub mod step;

// Native only: files written as they go, blocking readbacks, benchmarks.
#[cfg(not(target_arch = "wasm32"))]
pub mod bench;
#[cfg(not(target_arch = "wasm32"))]
pub mod checkpoint;
#[cfg(not(target_arch = "wasm32"))]
pub mod dream_report;
#[cfg(not(target_arch = "wasm32"))]
pub mod plot;
#[cfg(not(target_arch = "wasm32"))]
pub mod single_step;
#[cfg(not(target_arch = "wasm32"))]
pub mod trainer;
#[cfg(not(target_arch = "wasm32"))]
pub mod vae_fit;
