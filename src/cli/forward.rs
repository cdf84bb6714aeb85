//! `difftrain forward unet|text-encoder|vae`: run one model on tensors from
//! a safetensors file (or prompts) and write its outputs to another, so
//! anyone can check difftrain against PyTorch on their own model and GPU.

use super::{human_bytes, peak_rss_bytes};
use anyhow::{Context, Result};
use clap::Subcommand;
use difftrain::io::{HostTensor, TensorFile};
use difftrain::models::forward::{text_encoder_forward, unet_forward, vae_forward, RunReport};
use difftrain::models::pipeline::component_dir;
use difftrain::models::tokenizer::ClipTokenizer;
use difftrain::Gpu;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum ForwardWhat {
    /// UNet2DConditionModel. IN holds `sample` [B,C,H,W] f32, `timestep` [B] (int64, int32 or f32),
    /// `encoder_hidden_states` [B,S,D] f32, and with --backward `grad_output` [B,C_out,H,W].
    /// OUT gets `sample` (the prediction); with --backward also `grad.sample`,
    /// `grad.encoder_hidden_states` and `grad.<parameter>` for every parameter: the gradients
    /// of sum(prediction * grad_output).
    Unet {
        /// The unet/ folder (config.json + diffusion_pytorch_model[.fp16].safetensors), or a
        /// pipeline folder with model_index.json.
        #[arg(long)]
        model: PathBuf,
        /// safetensors file of inputs.
        #[arg(long)]
        inputs: PathBuf,
        /// safetensors file to write.
        #[arg(long)]
        out: PathBuf,
        /// Also run the backward pass from `grad_output`.
        #[arg(long)]
        backward: bool,
    },
    /// CLIPTextModel on prompts. OUT gets `input_ids` [N,77] int64 and `last_hidden_state` [N,77,D].
    TextEncoder {
        /// The text_encoder/ folder (config.json + model[.fp16].safetensors), or a pipeline folder.
        #[arg(long)]
        model: PathBuf,
        /// The tokenizer/ folder (vocab.json + merges.txt, or tokenizer.json); defaults to the
        /// pipeline's tokenizer/ when --model is a pipeline folder.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Text file with one prompt per line (an empty line is the empty prompt).
        #[arg(long)]
        prompts: PathBuf,
        /// safetensors file to write.
        #[arg(long)]
        out: PathBuf,
        /// Use the hidden state this many layers before the last, then the final layer norm
        /// (diffusers' clip_skip).
        #[arg(long, default_value_t = 0)]
        clip_skip: usize,
    },
    /// AutoencoderKL. IN holds `image` [B,3,H,W] in [-1,1] and/or `latents` [B,4,h,w].
    /// OUT gets `mean` and `logvar` for `image`, `decoded` for `latents` (no scaling applied).
    Vae {
        /// The vae/ folder (config.json + diffusion_pytorch_model[.fp16].safetensors), or a
        /// pipeline folder.
        #[arg(long)]
        model: PathBuf,
        /// safetensors file of inputs.
        #[arg(long)]
        inputs: PathBuf,
        /// safetensors file to write.
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn run(gpu: &Gpu, what: ForwardWhat) -> Result<()> {
    let (label, out, tensors, report) = match what {
        ForwardWhat::Unet {
            model,
            inputs,
            out,
            backward,
        } => {
            let inputs = TensorFile::read(&inputs)?;
            let r = unet_forward(gpu, &component_dir(&model, "unet"), &inputs, backward)?;
            ("unet", out, r.tensors, r.report)
        }
        ForwardWhat::TextEncoder {
            model,
            tokenizer,
            prompts,
            out,
            clip_skip,
        } => {
            let tokenizer = tokenizer.unwrap_or_else(|| component_dir(&model, "tokenizer"));
            let tok = ClipTokenizer::from_dir(&tokenizer)?;
            let lines = read_prompts(&prompts)?;
            let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
            let ids = tok.encode_batch(&refs)?;
            let flat: Vec<i64> = ids.iter().flatten().map(|&i| i as i64).collect();
            let ids = HostTensor::i64(&[lines.len(), tok.max_length()], &flat);
            let dir = component_dir(&model, "text_encoder");
            let (hidden, report) = text_encoder_forward(gpu, &dir, &ids, clip_skip)?;
            let mut t = TensorFile::new(&out);
            t.insert("input_ids", ids);
            t.insert("last_hidden_state", hidden);
            ("text-encoder", out, t, report)
        }
        ForwardWhat::Vae { model, inputs, out } => {
            let inputs = TensorFile::read(&inputs)?;
            let r = vae_forward(gpu, &component_dir(&model, "vae"), &inputs)?;
            ("vae", out, r.tensors, r.report)
        }
    };
    tensors.write(&out, None)?;
    summarize(label, &out, &tensors, &report);
    Ok(())
}

/// One prompt per line; an empty line is the empty prompt, a final newline
/// does not start another.
fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read the prompts file", path.display()))?;
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let lines: Vec<String> = text
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l).to_string())
        .collect();
    Ok(lines)
}

fn summarize(label: &str, out: &Path, tensors: &TensorFile, r: &RunReport) {
    let rss = peak_rss_bytes()
        .map(|b| format!(", peak process memory {}", human_bytes(b)))
        .unwrap_or_default();
    eprintln!(
        "{label}: setup {:.2} s, run {:.2} s, {} dispatches per step of {} sample(s), GPU buffers {}{rss}; wrote {} tensors to {}",
        r.setup_s,
        r.run_s,
        r.dispatches,
        r.micro_batch,
        human_bytes(r.buffer_bytes),
        tensors.tensors.len(),
        out.display()
    );
}
