//! `difftrain init`: a freshly initialized model folder in diffusers'
//! layout from a config alone (torch's / transformers' initialization), so
//! training from scratch and shape checks need no download.

use super::clip::ClipTextModel;
use super::unet::UNet;
use super::vae::Vae;
use super::weights::init_params;
use crate::dtype::DType;
use crate::error::{file_err, Result};
use crate::graph::Graph;
use crate::io::config::write_config;
use crate::io::StoredDType;
use serde_json::json;
use std::path::Path;

/// Which model to initialize.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    Unet,
    TextEncoder,
    Vae,
}

/// What `init_model` wrote.
#[derive(Clone, Debug)]
pub struct InitSummary {
    pub parameters: usize,
    pub elements: usize,
    pub weights_file: std::path::PathBuf,
}

/// Build the model of `config` (traced on a minimal input only to create its
/// parameters), fill every parameter from `seed`, and write `config.json` and
/// the weights (`fp16`: the `.fp16.safetensors` variant) into `out`.
pub fn init_model(
    component: Component,
    config: &Path,
    out: &Path,
    seed: u64,
    fp16: bool,
) -> Result<InitSummary> {
    let mut g = Graph::new();
    // Each arm traces the model and returns its weight file stem, the
    // config's header keys and the config itself.
    let (stem, header, fields) = match component {
        Component::Unet => {
            let unet = UNet::from_config_file(config)?;
            let f = 1 << (unet.layout.channels.len() - 1);
            let cross = unet.layout.down[0].cross_attention_dim;
            let x = g.input("sample", &[1, unet.config.in_channels, f, f], DType::F32);
            let t = g.input("timestep", &[1], DType::F32);
            let c = g.input("encoder_hidden_states", &[1, 1, cross], DType::F32);
            unet.forward(&mut g, x, t, c)?;
            let header = vec![("_class_name", json!("UNet2DConditionModel"))];
            ("diffusion_pytorch_model", header, json!(unet.config))
        }
        Component::TextEncoder => {
            let clip = ClipTextModel::from_config_file(config)?;
            let ids = g.input("input_ids", &[1, 1], DType::F32);
            let pos = g.input("position_ids", &[1], DType::F32);
            clip.forward(&mut g, ids, pos, 0)?;
            let header = vec![
                ("architectures", json!(["CLIPTextModel"])),
                ("model_type", json!("clip_text_model")),
            ];
            ("model", header, json!(clip.config))
        }
        Component::Vae => {
            let vae = Vae::from_config_file(config)?;
            let f = vae.downscale();
            let latent = vae.config.latent_channels;
            let x = g.input("image", &[1, vae.config.in_channels, f, f], DType::F32);
            let z = g.input("latents", &[1, latent, 1, 1], DType::F32);
            vae.encode(&mut g, x)?;
            vae.decode(&mut g, z)?;
            let header = vec![("_class_name", json!("AutoencoderKL"))];
            ("diffusion_pytorch_model", header, json!(vae.config))
        }
    };
    crate::platform::create_dir_all(out)
        .map_err(|e| file_err(out, format!("cannot create: {e}")))?;
    write_config(&out.join("config.json"), &header, &fields)?;
    let name = if fp16 {
        format!("{stem}.fp16.safetensors")
    } else {
        format!("{stem}.safetensors")
    };
    let path = out.join(name);
    let weights = init_params(&g, seed, &path);
    let elements = weights.tensors.values().map(|t| t.numel()).sum();
    weights.write(&path, fp16.then_some(StoredDType::F16))?;
    Ok(InitSummary {
        parameters: weights.tensors.len(),
        elements,
        weights_file: path,
    })
}
