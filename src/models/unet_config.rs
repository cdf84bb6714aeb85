//! `UNet2DConditionModel`'s config.json: every key diffusers writes, parsed
//! with diffusers' defaults, checked against what difftrain builds. A key
//! difftrain does not know, or a value it does not support, is an error
//! naming the field and the value.

use crate::error::Result;
use crate::io::config::{parse_config, unsupported, OneOrMany};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UNetConfig {
    #[serde(default)]
    pub sample_size: Option<OneOrMany<usize>>,
    #[serde(default = "four")]
    pub in_channels: usize,
    #[serde(default = "four")]
    pub out_channels: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f32,
    #[serde(default = "default_down_blocks")]
    pub down_block_types: Vec<String>,
    #[serde(default = "default_mid_block")]
    pub mid_block_type: Option<String>,
    #[serde(default = "default_up_blocks")]
    pub up_block_types: Vec<String>,
    #[serde(default = "no")]
    pub only_cross_attention: OneOrMany<bool>,
    #[serde(default = "default_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "two")]
    pub layers_per_block: OneOrMany<usize>,
    #[serde(default = "one")]
    pub downsample_padding: usize,
    #[serde(default = "one_f")]
    pub mid_block_scale_factor: f32,
    #[serde(default)]
    pub dropout: f32,
    #[serde(default = "silu")]
    pub act_fn: String,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: Option<usize>,
    #[serde(default = "default_eps")]
    pub norm_eps: f32,
    #[serde(default = "default_cross_dim")]
    pub cross_attention_dim: OneOrMany<usize>,
    #[serde(default = "one_layer")]
    pub transformer_layers_per_block: OneOrMany<usize>,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<Vec<usize>>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub encoder_hid_dim_type: Option<String>,
    /// diffusers reads this as the number of heads (a historical misnaming).
    #[serde(default = "eight")]
    pub attention_head_dim: OneOrMany<Option<usize>>,
    #[serde(default)]
    pub num_attention_heads: Option<OneOrMany<usize>>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "default_shift")]
    pub resnet_time_scale_shift: String,
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    #[serde(default = "one_f")]
    pub resnet_out_scale_factor: f32,
    #[serde(default = "positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default = "three")]
    pub conv_in_kernel: usize,
    #[serde(default = "three")]
    pub conv_out_kernel: usize,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default = "default_attention_type")]
    pub attention_type: String,
    #[serde(default)]
    pub class_embeddings_concat: bool,
    #[serde(default)]
    pub mid_block_only_cross_attention: Option<bool>,
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
    #[serde(default = "sixty_four")]
    pub addition_embed_type_num_heads: usize,
}

fn yes() -> bool {
    true
}
fn no() -> OneOrMany<bool> {
    OneOrMany::One(false)
}
fn one() -> usize {
    1
}
fn one_layer() -> OneOrMany<usize> {
    OneOrMany::One(1)
}
fn two() -> OneOrMany<usize> {
    OneOrMany::One(2)
}
fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn eight() -> OneOrMany<Option<usize>> {
    OneOrMany::One(Some(8))
}
fn thirty_two() -> Option<usize> {
    Some(32)
}
fn sixty_four() -> usize {
    64
}
fn one_f() -> f32 {
    1.0
}
fn default_eps() -> f32 {
    1e-5
}
fn default_cross_dim() -> OneOrMany<usize> {
    OneOrMany::One(1280)
}
fn silu() -> String {
    "silu".into()
}
fn positional() -> String {
    "positional".into()
}
fn default_shift() -> String {
    "default".into()
}
fn default_attention_type() -> String {
    "default".into()
}
fn default_mid_block() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn default_channels() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn default_down_blocks() -> Vec<String> {
    let mut v = vec!["CrossAttnDownBlock2D".to_string(); 3];
    v.push("DownBlock2D".into());
    v
}
fn default_up_blocks() -> Vec<String> {
    let mut v = vec!["UpBlock2D".to_string()];
    v.extend(vec!["CrossAttnUpBlock2D".to_string(); 3]);
    v
}

/// One down or up block, resolved from the config.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockSpec {
    pub cross_attention: bool,
    pub resnets: usize,
    pub heads: usize,
    pub transformer_layers: usize,
    pub cross_attention_dim: usize,
}

/// The config resolved into what the builder needs, per block.
#[derive(Clone, Debug)]
pub struct UNetLayout {
    pub channels: Vec<usize>,
    pub down: Vec<BlockSpec>,
    pub up: Vec<BlockSpec>,
    pub mid_heads: usize,
    pub mid_transformer_layers: usize,
    pub groups: usize,
}

impl UNetConfig {
    pub fn read(path: &Path) -> Result<UNetConfig> {
        let c: UNetConfig = parse_config(path)?;
        c.layout(path)?;
        Ok(c)
    }

    /// The time embedding width (`block_out_channels[0] * 4`).
    pub fn time_embed_dim(&self) -> usize {
        self.block_out_channels.first().copied().unwrap_or(0) * 4
    }

    /// Check every field against what difftrain builds and resolve per-block
    /// values; `path` names the file in errors.
    pub fn layout(&self, path: &Path) -> Result<UNetLayout> {
        let bad = |field: &str, value: &dyn std::fmt::Debug, what: &str| {
            unsupported(
                path,
                field,
                format!("value {value:?} is not supported ({what})"),
            )
        };
        let n = self.block_out_channels.len();
        if n == 0 || self.block_out_channels.contains(&0) {
            return Err(bad(
                "block_out_channels",
                &self.block_out_channels,
                "need at least one nonzero width",
            ));
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(unsupported(
                path,
                "down_block_types",
                format!(
                    "{} down and {} up block types for {n} block_out_channels; expected {n} of each",
                    self.down_block_types.len(),
                    self.up_block_types.len()
                ),
            ));
        }
        // Fields that must keep the value SD 1.x / 2.x use.
        let defaults: [(&str, bool, &dyn std::fmt::Debug); 20] = [
            (
                "center_input_sample",
                !self.center_input_sample,
                &self.center_input_sample,
            ),
            (
                "mid_block_type",
                self.mid_block_type.as_deref() == Some("UNetMidBlock2DCrossAttn"),
                &self.mid_block_type,
            ),
            (
                "only_cross_attention",
                matches!(self.only_cross_attention, OneOrMany::One(false))
                    || matches!(&self.only_cross_attention, OneOrMany::Many(v) if v.iter().all(|b| !b)),
                &self.only_cross_attention,
            ),
            ("act_fn", self.act_fn == "silu", &self.act_fn),
            (
                "norm_num_groups",
                self.norm_num_groups.is_some(),
                &self.norm_num_groups,
            ),
            (
                "encoder_hid_dim",
                self.encoder_hid_dim.is_none(),
                &self.encoder_hid_dim,
            ),
            (
                "encoder_hid_dim_type",
                self.encoder_hid_dim_type.is_none(),
                &self.encoder_hid_dim_type,
            ),
            (
                "dual_cross_attention",
                !self.dual_cross_attention,
                &self.dual_cross_attention,
            ),
            (
                "class_embed_type",
                self.class_embed_type.is_none(),
                &self.class_embed_type,
            ),
            (
                "addition_embed_type",
                self.addition_embed_type.is_none(),
                &self.addition_embed_type,
            ),
            (
                "num_class_embeds",
                self.num_class_embeds.is_none(),
                &self.num_class_embeds,
            ),
            (
                "resnet_time_scale_shift",
                self.resnet_time_scale_shift == "default",
                &self.resnet_time_scale_shift,
            ),
            (
                "resnet_skip_time_act",
                !self.resnet_skip_time_act,
                &self.resnet_skip_time_act,
            ),
            (
                "time_embedding_type",
                self.time_embedding_type == "positional",
                &self.time_embedding_type,
            ),
            (
                "time_embedding_dim",
                self.time_embedding_dim.is_none(),
                &self.time_embedding_dim,
            ),
            (
                "time_embedding_act_fn",
                self.time_embedding_act_fn.is_none(),
                &self.time_embedding_act_fn,
            ),
            (
                "timestep_post_act",
                self.timestep_post_act.is_none(),
                &self.timestep_post_act,
            ),
            (
                "time_cond_proj_dim",
                self.time_cond_proj_dim.is_none(),
                &self.time_cond_proj_dim,
            ),
            (
                "attention_type",
                self.attention_type == "default",
                &self.attention_type,
            ),
            (
                "cross_attention_norm",
                self.cross_attention_norm.is_none(),
                &self.cross_attention_norm,
            ),
        ];
        for (field, ok, value) in defaults {
            if !ok {
                return Err(bad(field, value, "difftrain builds the SD 1.x / 2.x UNet"));
            }
        }
        if self.class_embeddings_concat {
            return Err(bad("class_embeddings_concat", &true, "no class embeddings"));
        }
        if self.mid_block_only_cross_attention == Some(true) {
            return Err(bad(
                "mid_block_only_cross_attention",
                &true,
                "the mid block has self- and cross-attention",
            ));
        }
        for (field, k) in [
            ("conv_in_kernel", self.conv_in_kernel),
            ("conv_out_kernel", self.conv_out_kernel),
        ] {
            if k % 2 == 0 {
                return Err(bad(field, &k, "an odd kernel size"));
            }
        }
        if self.dropout != 0.0 {
            return Err(bad(
                "dropout",
                &self.dropout,
                "dropout is not implemented; use 0.0",
            ));
        }
        let groups = self.norm_num_groups.unwrap_or(32);
        for &c in &self.block_out_channels {
            if !c.is_multiple_of(groups) {
                return Err(bad(
                    "norm_num_groups",
                    &groups,
                    &format!("must divide every block_out_channels entry, not {c}"),
                ));
            }
        }
        if self.downsample_padding > 1 {
            return Err(bad(
                "downsample_padding",
                &self.downsample_padding,
                "0 or 1",
            ));
        }
        let layers = self
            .layers_per_block
            .per_block(n, path, "layers_per_block")?;
        let cross = self
            .cross_attention_dim
            .per_block(n, path, "cross_attention_dim")?;
        let tlayers =
            self.transformer_layers_per_block
                .per_block(n, path, "transformer_layers_per_block")?;
        let heads: Vec<usize> = match &self.num_attention_heads {
            Some(h) => h.per_block(n, path, "num_attention_heads")?,
            None => self
                .attention_head_dim
                .per_block(n, path, "attention_head_dim")?
                .iter()
                .zip(&self.block_out_channels)
                .map(|(h, &c)| h.unwrap_or(c))
                .collect(),
        };
        let heads_field = if self.num_attention_heads.is_some() {
            "num_attention_heads"
        } else {
            "attention_head_dim"
        };
        let mut down = Vec::with_capacity(n);
        for (i, t) in self.down_block_types.iter().enumerate() {
            let cross_attention = match t.as_str() {
                "CrossAttnDownBlock2D" => true,
                "DownBlock2D" => false,
                _ => {
                    return Err(bad(
                        &format!("down_block_types[{i}]"),
                        t,
                        "CrossAttnDownBlock2D or DownBlock2D",
                    ))
                }
            };
            down.push(BlockSpec {
                cross_attention,
                resnets: layers[i],
                heads: heads[i],
                transformer_layers: tlayers[i],
                cross_attention_dim: cross[i],
            });
        }
        let rev_tlayers = match &self.reverse_transformer_layers_per_block {
            Some(v) if v.len() == n => v.clone(),
            Some(v) => {
                return Err(bad(
                    "reverse_transformer_layers_per_block",
                    v,
                    &format!("one entry per block ({n})"),
                ))
            }
            None => tlayers.iter().rev().copied().collect(),
        };
        let mut up = Vec::with_capacity(n);
        for (i, t) in self.up_block_types.iter().enumerate() {
            let cross_attention = match t.as_str() {
                "CrossAttnUpBlock2D" => true,
                "UpBlock2D" => false,
                _ => {
                    return Err(bad(
                        &format!("up_block_types[{i}]"),
                        t,
                        "CrossAttnUpBlock2D or UpBlock2D",
                    ))
                }
            };
            let j = n - 1 - i;
            up.push(BlockSpec {
                cross_attention,
                resnets: layers[j] + 1,
                heads: heads[j],
                transformer_layers: rev_tlayers[i],
                cross_attention_dim: cross[j],
            });
        }
        for (i, b) in down.iter().chain(&up).enumerate() {
            let c = if i < n {
                self.block_out_channels[i]
            } else {
                self.block_out_channels[2 * n - 1 - i]
            };
            if b.cross_attention && (b.heads == 0 || !c.is_multiple_of(b.heads)) {
                return Err(bad(
                    heads_field,
                    &b.heads,
                    &format!("the heads must divide the block's {c} channels"),
                ));
            }
        }
        let last = self.block_out_channels[n - 1];
        if !last.is_multiple_of(heads[n - 1].max(1)) || heads[n - 1] == 0 {
            return Err(bad(
                heads_field,
                &heads[n - 1],
                &format!("the mid block's heads must divide {last} channels"),
            ));
        }
        Ok(UNetLayout {
            channels: self.block_out_channels.clone(),
            down,
            up,
            mid_heads: heads[n - 1],
            mid_transformer_layers: tlayers[n - 1],
            groups,
        })
    }
}
