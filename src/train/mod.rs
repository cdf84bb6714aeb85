//! Training: the spec's step (noise, add_noise, targets, DREAM, forward, MSE,
//! backward, clipping, AdamW) as one graph, and around it the config, data,
//! learning-rate schedule, checkpoints and the loop.

pub mod bench;
pub mod builtin;
pub mod cache;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod dream_report;
pub mod ema;
mod encoders;
pub mod heldout;
pub mod lr;
pub mod plot;
pub mod scheduler;
pub mod single_step;
pub mod step;
pub mod trainer;
pub mod vae_fit;
