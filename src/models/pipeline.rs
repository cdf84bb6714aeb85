//! A diffusers pipeline folder: `model_index.json` naming `unet/`, `vae/`,
//! `text_encoder/`, `tokenizer/` and `scheduler/`. It loads as one unit
//! (every component present, of a class difftrain runs, with its weights,
//! and the components agree on their shared sizes), and each component
//! folder also works alone.

use super::clip::ClipTextModel;
use super::init::Component;
use super::tokenizer::ClipTokenizer;
use super::unet::UNet;
use super::vae::Vae;
use super::weights::{load_params, read_component_weights, weights_path};
use crate::dtype::DType;
use crate::error::{file_err, Result};
use crate::graph::{Graph, RunSpec, Session, TensorId};
use crate::io::config::read_json;
use crate::Gpu;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The components difftrain uses and the classes it accepts for each.
const COMPONENTS: [(&str, &[&str]); 5] = [
    ("unet", &["UNet2DConditionModel"]),
    ("vae", &["AutoencoderKL"]),
    ("text_encoder", &["CLIPTextModel"]),
    ("tokenizer", &["CLIPTokenizer", "CLIPTokenizerFast"]),
    ("scheduler", &[]),
];

/// The folder of component `name` given either that folder itself or a
/// pipeline root (a folder with `model_index.json`).
pub fn component_dir(dir: &Path, name: &str) -> PathBuf {
    if crate::platform::is_file(&dir.join("model_index.json")) {
        dir.join(name)
    } else {
        dir.to_path_buf()
    }
}

/// A checked pipeline folder.
#[derive(Clone, Debug)]
pub struct PipelineDir {
    pub root: PathBuf,
    pub unet: UNet,
    pub vae: Vae,
    pub text_encoder: ClipTextModel,
    pub tokenizer: ClipTokenizer,
}

impl PipelineDir {
    /// Read `model_index.json`, every component's config and the tokenizer,
    /// find each model's weight file, and check that the parts fit together:
    /// the text encoder's width is the UNet's cross-attention width, the
    /// VAE's latents are the UNet's input, and the tokenizer's ids and length
    /// fit the text encoder.
    pub fn open(root: &Path) -> Result<PipelineDir> {
        let index_path = root.join("model_index.json");
        let index = read_json(&index_path)?;
        for (name, classes) in COMPONENTS {
            let entry = index.get(name).and_then(|v| v.as_array());
            let class = entry.and_then(|a| a.get(1)).and_then(|c| c.as_str());
            let Some(class) = class else {
                return Err(file_err(
                    &index_path,
                    format!("no '{name}' component (expected [\"library\", \"Class\"])"),
                ));
            };
            if !classes.is_empty() && !classes.contains(&class) {
                return Err(file_err(
                    &index_path,
                    format!(
                        "'{name}' is a {class}; difftrain runs {}",
                        classes.join(" or ")
                    ),
                ));
            }
            if !crate::platform::is_dir(&root.join(name)) {
                return Err(file_err(
                    root,
                    format!("model_index.json names '{name}' but there is no {name}/ folder"),
                ));
            }
        }
        let unet = UNet::from_config_file(&root.join("unet/config.json"))?;
        let vae = Vae::from_config_file(&root.join("vae/config.json"))?;
        let text_encoder = ClipTextModel::from_config_file(&root.join("text_encoder/config.json"))?;
        let tokenizer = ClipTokenizer::from_dir(&root.join("tokenizer"))?;
        weights_path(&root.join("unet"), "diffusion_pytorch_model")?;
        weights_path(&root.join("vae"), "diffusion_pytorch_model")?;
        weights_path(&root.join("text_encoder"), "model")?;
        let te = &text_encoder.config;
        if tokenizer.vocab_size() > te.vocab_size
            || tokenizer.max_length() > te.max_position_embeddings
        {
            return Err(file_err(
                root,
                format!(
                    "the tokenizer's {} tokens of up to id {} do not fit the text encoder's {} positions and {} ids",
                    tokenizer.max_length(),
                    tokenizer.vocab_size() - 1,
                    te.max_position_embeddings,
                    te.vocab_size
                ),
            ));
        }
        let cross = unet.layout.down[0].cross_attention_dim;
        if text_encoder.config.hidden_size != cross {
            return Err(file_err(
                root,
                format!(
                    "text_encoder hidden_size {} does not match the unet's cross_attention_dim {cross}",
                    text_encoder.config.hidden_size
                ),
            ));
        }
        if vae.config.latent_channels != unet.config.in_channels {
            return Err(file_err(
                root,
                format!(
                    "vae latent_channels {} does not match the unet's in_channels {}",
                    vae.config.latent_channels, unet.config.in_channels
                ),
            ));
        }
        Ok(PipelineDir {
            root: root.to_path_buf(),
            unet,
            vae,
            text_encoder,
            tokenizer,
        })
    }

    /// A no-grad session of graph `g` keeping `outputs`, with the
    /// parameters of the pipeline's `component` loaded from its folder.
    pub fn session(
        &self,
        gpu: &Gpu,
        g: Graph,
        outputs: Vec<TensorId>,
        component: Component,
    ) -> Result<Session> {
        let name = match component {
            Component::Unet => "unet",
            Component::Vae => "vae",
            Component::TextEncoder => "text_encoder",
        };
        let s = Session::new(gpu, Arc::new(g), RunSpec::no_grad(outputs))?;
        load_params(
            &s,
            &read_component_weights(&self.root.join(name), component)?,
        )?;
        Ok(s)
    }

    /// The text encoder for `rows` prompts of the tokenizer's length, as a
    /// no-grad session with its position ids written: (session, input ids,
    /// last hidden state). Its weights and activations are stored in
    /// `dtype`. Fill the ids with [`PipelineDir::token_ids`].
    pub fn text_encoder_session(
        &self,
        gpu: &Gpu,
        rows: usize,
        dtype: DType,
    ) -> Result<(Session, TensorId, TensorId)> {
        let len = self.tokenizer.max_length();
        let mut g = Graph::new();
        g.set_frozen_dtype(dtype);
        let ids = g.input("input_ids", &[rows, len], DType::F32);
        let pos = g.input("position_ids", &[len], DType::F32);
        let hidden = self.text_encoder.forward(&mut g, ids, pos, 0)?;
        let s = self.session(gpu, g, vec![hidden], Component::TextEncoder)?;
        s.write(pos, &(0..len).map(|i| i as f32).collect::<Vec<_>>())?;
        Ok((s, ids, hidden))
    }

    /// The token ids of `prompts`, padded to the tokenizer's length, as the
    /// text encoder's f32 input `[N, length]`.
    pub fn token_ids(&self, prompts: &[&str]) -> Result<Vec<f32>> {
        let ids = self.tokenizer.encode_batch(prompts)?;
        Ok(ids.into_iter().flatten().map(|i| i as f32).collect())
    }
}
