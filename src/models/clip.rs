//! transformers' `CLIPTextModel`: token + position embeddings, pre-norm
//! encoder layers with causal self-attention, final layer norm; the
//! `last_hidden_state` SD conditions on (transformers/models/clip/modeling_clip.py).

use crate::error::Result;
use crate::graph::{Graph, Init, TensorId};
use crate::io::config::{parse_config, unsupported};
use crate::nn::{layer_norm, linear_init};
use crate::ops::elementwise::Activation;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// `CLIPTextConfig` (the keys SD text encoders use; transformers' generic
/// keys are read past).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct ClipTextConfig {
    #[serde(default = "vocab")]
    pub vocab_size: usize,
    #[serde(default = "hidden")]
    pub hidden_size: usize,
    #[serde(default = "intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "heads")]
    pub num_attention_heads: usize,
    #[serde(default = "positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "eps")]
    pub layer_norm_eps: f32,
    #[serde(default)]
    pub attention_dropout: f32,
    #[serde(default = "init_range")]
    pub initializer_range: f32,
    #[serde(default = "factor")]
    pub initializer_factor: f32,
    #[serde(default = "projection")]
    pub projection_dim: usize,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
}

fn vocab() -> usize {
    49408
}
fn hidden() -> usize {
    512
}
fn intermediate() -> usize {
    2048
}
fn layers() -> usize {
    12
}
fn heads() -> usize {
    8
}
fn positions() -> usize {
    77
}
fn quick_gelu() -> String {
    "quick_gelu".into()
}
fn eps() -> f32 {
    1e-5
}
fn init_range() -> f32 {
    0.02
}
fn factor() -> f32 {
    1.0
}
fn projection() -> usize {
    512
}

/// The CLIP text encoder of a config, ready to trace.
#[derive(Clone, Debug)]
pub struct ClipTextModel {
    pub config: ClipTextConfig,
    pub activation: Activation,
}

impl ClipTextModel {
    pub fn from_config_file(path: &Path) -> Result<ClipTextModel> {
        let config: ClipTextConfig = parse_config(path)?;
        let activation = match config.hidden_act.as_str() {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
            other => {
                return Err(unsupported(
                    path,
                    "hidden_act",
                    format!("value {other:?} is not supported (quick_gelu, gelu, gelu_new, gelu_pytorch_tanh)"),
                ))
            }
        };
        let c = &config;
        if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return Err(unsupported(
                path,
                "num_attention_heads",
                format!(
                    "{} heads do not divide hidden_size {}",
                    c.num_attention_heads, c.hidden_size
                ),
            ));
        }
        if c.attention_dropout != 0.0 {
            return Err(unsupported(
                path,
                "attention_dropout",
                "dropout is not implemented; use 0.0",
            ));
        }
        Ok(ClipTextModel { config, activation })
    }

    /// Trace the encoder on `input_ids` `[N, S]` (ids as f32) and
    /// `position_ids` `[S]` (0..S), returning the hidden state `[N, S, D]`
    /// after the final layer norm. `clip_skip` k stops k layers early, as
    /// diffusers' `encode_prompt(clip_skip=k)` does (hidden_states[-(k+1)],
    /// then the final layer norm). Parameters are frozen.
    pub fn forward(
        &self,
        g: &mut Graph,
        input_ids: TensorId,
        position_ids: TensorId,
        clip_skip: usize,
    ) -> Result<TensorId> {
        let c = &self.config;
        let d = c.hidden_size;
        let layers = c.num_hidden_layers.checked_sub(clip_skip).ok_or_else(|| {
            crate::error::shape_err(
                "clip",
                format!(
                    "clip_skip {clip_skip} is more than the {} layers",
                    c.num_hidden_layers
                ),
            )
        })?;
        let f = c.initializer_factor;
        let embed_std = Init::Normal(c.initializer_range * f);
        // transformers' CLIPPreTrainedModel._init_weights.
        let in_proj =
            Init::Normal((d as f32).powf(-0.5) * ((2 * c.num_hidden_layers) as f32).powf(-0.5) * f);
        let out_proj = Init::Normal((d as f32).powf(-0.5) * f);
        let fc_std = Init::Normal(((2 * d) as f32).powf(-0.5) * f);
        let zero = Some(Init::Const(0.0));
        g.frozen(|g| {
            g.scoped("text_model", |g| {
                let h = g.scoped("embeddings", |g| {
                    let tok =
                        g.module_param("token_embedding.weight", &[c.vocab_size, d], embed_std)?;
                    let pos = g.module_param(
                        "position_embedding.weight",
                        &[c.max_position_embeddings, d],
                        embed_std,
                    )?;
                    let t = g.embedding(input_ids, tok)?;
                    let p = g.embedding(position_ids, pos)?;
                    let s = g.shape(p)[0];
                    let p = g.reshape(p, &[1, s, d])?;
                    // The layers compute in the weights' dtype.
                    let h = g.add(t, p)?;
                    Ok::<_, crate::Error>(g.cast(h, g.dtype(tok)))
                })?;
                let mut h = h;
                for i in 0..layers {
                    h = g.scoped(&format!("encoder.layers.{i}"), |g| {
                        let r = h;
                        let x = layer_norm(g, "layer_norm1", h, c.layer_norm_eps)?;
                        let x = g.scoped("self_attn", |g| {
                            let q = linear_init(g, "q_proj", x, [d, d], in_proj, zero)?;
                            let k = linear_init(g, "k_proj", x, [d, d], in_proj, zero)?;
                            let v = linear_init(g, "v_proj", x, [d, d], in_proj, zero)?;
                            let o = g.attention(q, k, v, c.num_attention_heads, true)?;
                            linear_init(g, "out_proj", o, [d, d], out_proj, zero)
                        })?;
                        let h = g.add(r, x)?;
                        let x = layer_norm(g, "layer_norm2", h, c.layer_norm_eps)?;
                        let x = g.scoped("mlp", |g| {
                            let x =
                                linear_init(g, "fc1", x, [d, c.intermediate_size], fc_std, zero)?;
                            let x = g.activation(x, self.activation);
                            linear_init(g, "fc2", x, [c.intermediate_size, d], in_proj, zero)
                        })?;
                        g.add(h, x)
                    })?;
                }
                layer_norm(g, "final_layer_norm", h, c.layer_norm_eps)
            })
        })
    }
}

/// transformers 5 saves `CLIPTextModel` without the `text_model.` prefix
/// (`embeddings.`, `encoder.`, `final_layer_norm.`); transformers 4 with it.
/// Give the unprefixed names the prefix, so both load.
pub fn upgrade_unprefixed_names(file: &mut crate::io::WeightFile) {
    let bare: Vec<String> = file
        .names()
        .filter(|k| {
            ["embeddings.", "encoder.", "final_layer_norm."]
                .iter()
                .any(|p| k.starts_with(p))
        })
        .map(str::to_string)
        .collect();
    for k in bare {
        file.rename(&k, &format!("text_model.{k}"), None);
    }
}
