//! `difftrain init unet|text-encoder|vae`: a freshly initialized model
//! folder in diffusers' layout from a config.json alone.

use super::human_bytes;
use anyhow::Result;
use clap::{Args, ValueEnum};
use difftrain::models::init::{init_model, Component};
use std::path::PathBuf;

#[derive(Clone, Copy, ValueEnum)]
pub enum Which {
    /// UNet2DConditionModel (diffusers config.json)
    Unet,
    /// CLIPTextModel (transformers config.json)
    TextEncoder,
    /// AutoencoderKL (diffusers config.json)
    Vae,
}

#[derive(Args)]
pub struct InitArgs {
    /// Which model the config describes.
    which: Which,
    /// The model's config.json (diffusers / transformers format).
    #[arg(long)]
    config: PathBuf,
    /// Folder to write config.json and the weights into (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Seed of the initialization.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write the weights as the `.fp16.safetensors` variant.
    #[arg(long)]
    fp16: bool,
}

pub fn run(a: InitArgs) -> Result<()> {
    let component = match a.which {
        Which::Unet => Component::Unet,
        Which::TextEncoder => Component::TextEncoder,
        Which::Vae => Component::Vae,
    };
    let s = init_model(component, &a.config, &a.out, a.seed, a.fp16)?;
    let bytes = s.elements as u64 * if a.fp16 { 2 } else { 4 };
    eprintln!(
        "wrote {} parameters ({} values, {}) to {}",
        s.parameters,
        s.elements,
        human_bytes(bytes),
        s.weights_file.display()
    );
    Ok(())
}
