//! The built-in default of `difftrain train`: a small pipeline (UNet, CLIP
//! text encoder and tokenizer, VAE, DDPM scheduler) made from the configs in
//! `src/train/builtin/` and fixed seeds, and the preset options
//! (`builtin/train.toml`) that train its UNet on the built-in procedural
//! dataset (`data.rs`) in a few minutes on a CPU.
//!
//! The VAE is not random (a random one decodes to noise): it was fitted to
//! the built-in dataset by difftrain itself and its weights are committed
//! (`builtin/vae/`), made with
//! `difftrain train-vae --config src/train/builtin/vae.json --out src/train/builtin/vae --steps 800 --fp16`
//! (the config there carries the measured `scaling_factor`).

use crate::error::{file_err, Result};
use crate::models::init::{init_model, Component};
use crate::platform;
use std::path::{Path, PathBuf};

/// The preset config of the built-in run; a user's config and `--set`
/// overrides apply on top.
pub const PRESET: &str = include_str!("builtin/train.toml");

/// (path in the pipeline folder, contents) of every config file.
const FILES: &[(&str, &str)] = &[
    ("model_index.json", include_str!("builtin/model_index.json")),
    ("unet/config.json", include_str!("builtin/unet.json")),
    (
        "text_encoder/config.json",
        include_str!("builtin/text_encoder.json"),
    ),
    ("vae/config.json", include_str!("builtin/vae/config.json")),
    (
        "scheduler/scheduler_config.json",
        include_str!("builtin/scheduler_config.json"),
    ),
    // A real CLIP BPE vocabulary cut to its first 2000 merges (the test
    // fixture's, from open_clip's bpe_simple_vocab_16e6).
    (
        "tokenizer/vocab.json",
        include_str!("../../tests/fixtures/tokenizer/vocab.json"),
    ),
    (
        "tokenizer/merges.txt",
        include_str!("../../tests/fixtures/tokenizer/merges.txt"),
    ),
    // The fixture's config with model_max_length 16: the longest built-in
    // caption is 16 tokens with its start and end tokens, and cross-attention
    // over 16 states instead of 77 mostly-padding ones learns the captions
    // sooner.
    (
        "tokenizer/tokenizer_config.json",
        include_str!("builtin/tokenizer_config.json"),
    ),
    (
        "tokenizer/special_tokens_map.json",
        include_str!("../../tests/fixtures/tokenizer/special_tokens_map.json"),
    ),
];

/// The fitted VAE's weights.
const VAE_WEIGHTS: (&str, &[u8]) = (
    "vae/diffusion_pytorch_model.fp16.safetensors",
    include_bytes!("builtin/vae/diffusion_pytorch_model.fp16.safetensors"),
);

/// Initialization seeds of the models trained from scratch.
const SEEDS: [(Component, &str, u64); 2] = [
    (Component::Unet, "unet", 0),
    (Component::TextEncoder, "text_encoder", 1),
];

/// The folder holding the built-in pipeline: under the system's temporary
/// folder, named by a hash of the configs, so a changed config makes a new
/// one. Built on first use; rebuilding gives identical files.
pub fn pipeline_dir() -> Result<PathBuf> {
    let mut hash = 0xcbf2_9ce4_8422_2325u64; // FNV-1a
    let files = FILES.iter().map(|(p, t)| (*p, t.as_bytes()));
    for (path, bytes) in files.chain([VAE_WEIGHTS]) {
        for &b in path.as_bytes().iter().chain(bytes) {
            hash = (hash ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    let dir = platform::temp_dir().join(format!("difftrain-builtin-{hash:016x}"));
    if !platform::is_file(&dir.join("model_index.json")) {
        write_pipeline(&dir)?;
    }
    Ok(dir)
}

/// Write the built-in pipeline into `dir` through a temporary folder and a
/// rename, so a crash never leaves half a pipeline under the final name.
pub fn write_pipeline(dir: &Path) -> Result<()> {
    let tmp = dir.with_extension(format!("tmp{}", platform::process_id()));
    let io = |p: &Path, e: std::io::Error| file_err(p, e.to_string());
    let files = FILES.iter().map(|(p, t)| (*p, t.as_bytes()));
    for (path, bytes) in files.chain([VAE_WEIGHTS]) {
        let p = tmp.join(path);
        platform::create_dir_all(p.parent().expect("a file in a folder")).map_err(|e| io(&p, e))?;
        platform::write(&p, bytes).map_err(|e| io(&p, e))?;
    }
    for (component, name, seed) in SEEDS {
        let folder = tmp.join(name);
        init_model(component, &folder.join("config.json"), &folder, seed, false)?;
    }
    match platform::rename(&tmp, dir) {
        Ok(()) => Ok(()),
        // Another process built it first: theirs is identical.
        Err(_) if platform::is_file(&dir.join("model_index.json")) => {
            platform::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))
        }
        Err(e) => Err(io(dir, e)),
    }
}
