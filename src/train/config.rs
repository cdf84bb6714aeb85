//! The trainer's TOML config: sections `[model]`, `[train]`, `[data]` and
//! `[scheduler]`, with the spec's field names and diffusers'
//! `train_text_to_image.py` option names and defaults. Every key can be
//! overridden with `--set section.key=value`. Unknown keys and invalid values
//! are errors naming the key.

use super::data::DataOptions;
use super::ema::EmaSchedule;
use super::lr::LrSchedule;
use super::scheduler::{BetaSchedule, NoiseSchedule, PredictionType};
use crate::dtype::DType;
use crate::error::{file_err, Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The whole config, as read (before the pipeline's scheduler fills in
/// what `[scheduler]` leaves out).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub model: ModelConfig,
    pub train: TrainConfig,
    pub data: DataOptions,
    pub scheduler: SchedulerOverrides,
    pub sample: ValidationConfig,
}

/// `[sample]`: validation images during training.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ValidationConfig {
    /// Prompts of the validation grid (a row each); empty: no validation.
    pub validation_prompts: Vec<String>,
    /// A grid every this many optimizer steps, and at the end.
    pub validation_steps: u64,
    pub num_inference_steps: usize,
    pub guidance_scale: f32,
    /// `"ddim"` or `"ddpm"`.
    pub scheduler: ValidationScheduler,
    /// Images per prompt (grid columns).
    pub num_validation_images: usize,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValidationScheduler {
    #[default]
    Ddim,
    Ddpm,
}

impl Default for ValidationConfig {
    fn default() -> Self {
        ValidationConfig {
            validation_prompts: Vec::new(),
            validation_steps: 500,
            num_inference_steps: 30,
            guidance_scale: 7.5,
            scheduler: ValidationScheduler::Ddim,
            num_validation_images: 4,
        }
    }
}

/// What `prediction_type = "sample"` regresses to. The spec writes
/// target = xt; diffusers' schedulers read a `sample` prediction as x0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SampleTarget {
    #[default]
    X0,
    Xt,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// A local diffusers pipeline folder (`model_index.json`, `unet/`,
    /// `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`). Unset: the
    /// built-in small model.
    pub pretrained_model_name_or_path: Option<String>,
    /// Train a freshly initialized UNet of this `config.json` on the
    /// pipeline's other components.
    pub unet_config: Option<PathBuf>,
    /// Unset: the scheduler config's.
    pub prediction_type: Option<PredictionType>,
    pub sample_target: SampleTarget,
}

/// Storage precision of activations and of the frozen encoders' weights
/// (master weights and optimizer state are always f32).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    #[default]
    Fp32,
    Fp16,
    Bf16,
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Precision::Fp32 => DType::F32,
            Precision::Fp16 => DType::F16,
            Precision::Bf16 => DType::BF16,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub dream_training: bool,
    pub dream_detail_preservation: f32,
    pub precision: Precision,
    /// A checkpoint folder, `"latest"`, or empty.
    pub resume_from: String,
    pub learning_rate: f32,
    pub scale_lr: bool,
    pub adam_beta1: f32,
    pub adam_beta2: f32,
    pub adam_weight_decay: f32,
    pub adam_epsilon: f32,
    /// Clip the global gradient norm to this; 0 turns clipping off.
    pub max_grad_norm: f32,
    pub train_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    /// Optimizer steps; unset: num_train_epochs worth.
    pub max_train_steps: Option<u64>,
    pub num_train_epochs: u64,
    pub lr_scheduler: LrSchedule,
    pub lr_warmup_steps: u64,
    /// Unset: drawn at the start and recorded in checkpoints.
    pub seed: Option<u64>,
    pub noise_offset: f32,
    pub proportion_empty_prompts: f32,
    /// Min-SNR loss weighting (Hang et al. 2023) with this gamma; unset: off.
    pub snr_gamma: Option<f32>,
    pub checkpointing_steps: u64,
    pub checkpoints_total_limit: Option<usize>,
    pub output_dir: PathBuf,
    /// Keep an EMA of the UNet's weights (diffusers' `EMAModel`); the
    /// final pipeline's `unet/` then holds the EMA weights.
    pub use_ema: bool,
    pub ema_decay: f64,
    pub ema_min_decay: f64,
    pub ema_update_after_step: u64,
    pub ema_use_warmup: bool,
    pub ema_inv_gamma: f64,
    pub ema_power: f64,
    /// Every this many steps (and at the last), the plain denoising loss on
    /// a fixed held-out set (`train::heldout`) goes into the log; 0: never.
    pub heldout_loss_steps: u64,
    /// Examples in the held-out set (whole micro-batches of it are used).
    pub heldout_examples: usize,
    /// Recompute each UNet block's activations in backward instead of
    /// keeping them (diffusers' `--gradient_checkpointing`): less memory,
    /// about one more forward pass of time.
    pub gradient_checkpointing: bool,
}

impl Default for TrainConfig {
    /// diffusers' train_text_to_image.py defaults (output_dir aside).
    fn default() -> Self {
        TrainConfig {
            dream_training: false,
            dream_detail_preservation: 1.0,
            precision: Precision::Fp32,
            resume_from: String::new(),
            learning_rate: 1e-4,
            scale_lr: false,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_weight_decay: 1e-2,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            train_batch_size: 16,
            gradient_accumulation_steps: 1,
            max_train_steps: None,
            num_train_epochs: 100,
            lr_scheduler: LrSchedule::Constant,
            lr_warmup_steps: 500,
            seed: None,
            noise_offset: 0.0,
            proportion_empty_prompts: 0.0,
            snr_gamma: None,
            checkpointing_steps: 500,
            checkpoints_total_limit: None,
            output_dir: PathBuf::from("difftrain-output"),
            use_ema: false,
            ema_decay: 0.9999,
            ema_min_decay: 0.0,
            ema_update_after_step: 0,
            ema_use_warmup: false,
            ema_inv_gamma: 1.0,
            ema_power: 2.0 / 3.0,
            heldout_loss_steps: 0,
            heldout_examples: 64,
            gradient_checkpointing: false,
        }
    }
}

impl TrainConfig {
    /// The EMA's decay schedule, when `use_ema`.
    pub fn ema(&self) -> Option<EmaSchedule> {
        self.use_ema.then_some(EmaSchedule {
            decay: self.ema_decay,
            min_decay: self.ema_min_decay,
            update_after_step: self.ema_update_after_step,
            use_warmup: self.ema_use_warmup,
            inv_gamma: self.ema_inv_gamma,
            power: self.ema_power,
        })
    }
}

/// `[scheduler]`: each key set here replaces the pipeline's
/// `scheduler/scheduler_config.json` value.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerOverrides {
    pub num_train_timesteps: Option<usize>,
    pub beta_start: Option<f64>,
    pub beta_end: Option<f64>,
    pub beta_schedule: Option<BetaSchedule>,
    pub trained_betas: Option<Vec<f64>>,
    pub rescale_betas_zero_snr: Option<bool>,
}

impl SchedulerOverrides {
    /// `base` with every key set here replaced.
    pub fn apply(&self, base: &NoiseSchedule) -> NoiseSchedule {
        let mut s = base.clone();
        if let Some(v) = self.num_train_timesteps {
            s.num_train_timesteps = v;
        }
        if let Some(v) = self.beta_start {
            s.beta_start = v;
        }
        if let Some(v) = self.beta_end {
            s.beta_end = v;
        }
        if let Some(v) = self.beta_schedule {
            s.beta_schedule = v;
        }
        if let Some(v) = &self.trained_betas {
            s.trained_betas = Some(v.clone());
        }
        if let Some(v) = self.rescale_betas_zero_snr {
            s.rescale_betas_zero_snr = v;
        }
        s
    }
}

impl Config {
    /// Read `path` (None: all defaults) and apply `--set` overrides, then
    /// check the values. `source` names the config in errors.
    pub fn load(path: Option<&Path>, sets: &[String]) -> Result<Config> {
        let (text, source) = match path {
            Some(p) => (
                crate::platform::read_to_string(p)
                    .map_err(|e| file_err(p, format!("cannot read: {e}")))?,
                p.display().to_string(),
            ),
            None => (String::new(), "built-in defaults".to_string()),
        };
        Config::from_toml(&text, sets, &source)
    }

    /// Parse TOML text plus `--set` overrides.
    pub fn from_toml(text: &str, sets: &[String], source: &str) -> Result<Config> {
        let table = parse_table(text, source, sets)?;
        Config::from_table(table, source)
    }

    /// The config of `difftrain train`: the file (if any) and `--set`
    /// overrides; when they name no `model.pretrained_model_name_or_path`,
    /// on top of the built-in preset (`builtin/train.toml`), which trains
    /// the built-in model.
    pub fn for_training(path: Option<&Path>, sets: &[String]) -> Result<Config> {
        let (text, source) = match path {
            Some(p) => (
                crate::platform::read_to_string(p)
                    .map_err(|e| file_err(p, format!("cannot read: {e}")))?,
                p.display().to_string(),
            ),
            None => (String::new(), "the built-in preset".to_string()),
        };
        let user = parse_table(&text, &source, sets)?;
        let names_model = user
            .get("model")
            .and_then(|m| m.get("pretrained_model_name_or_path"))
            .is_some();
        if names_model {
            return Config::from_table(user, &source);
        }
        let mut table = parse_table(super::builtin::PRESET, "builtin/train.toml", &[])?;
        for (section, values) in user {
            match (table.get_mut(&section), values) {
                (Some(toml::Value::Table(base)), toml::Value::Table(over)) => base.extend(over),
                (_, v) => {
                    table.insert(section, v);
                }
            }
        }
        Config::from_table(table, &source)
    }

    fn from_table(table: toml::Table, source: &str) -> Result<Config> {
        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                Error::Config {
                    path: source.to_string(),
                    field: e.path().to_string(),
                    msg: e.inner().to_string(),
                }
            })?;
        config.check(source)?;
        Ok(config)
    }

    /// Values that parse but cannot be trained with, naming the key.
    pub fn check(&self, source: &str) -> Result<()> {
        let err = |field: &str, msg: String| Error::Config {
            path: source.to_string(),
            field: field.to_string(),
            msg,
        };
        let t = &self.train;
        if t.dream_training && self.model.prediction_type == Some(PredictionType::Sample) {
            return Err(err(
                "train.dream_training",
                "DREAM is defined for model.prediction_type \"epsilon\" and \"v_prediction\", \
                 not \"sample\""
                    .into(),
            ));
        }
        if !t.dream_detail_preservation.is_finite() || t.dream_detail_preservation < 0.0 {
            return Err(err(
                "train.dream_detail_preservation",
                format!("must be >= 0, got {}", t.dream_detail_preservation),
            ));
        }
        for (k, v) in [
            ("train.learning_rate", t.learning_rate),
            ("train.adam_epsilon", t.adam_epsilon),
        ] {
            if !(v > 0.0 && v.is_finite()) {
                return Err(err(k, format!("must be > 0, got {v}")));
            }
        }
        for (k, v) in [
            ("train.adam_beta1", t.adam_beta1),
            ("train.adam_beta2", t.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&v) {
                return Err(err(k, format!("must be in [0, 1), got {v}")));
            }
        }
        for (k, v) in [
            ("train.max_grad_norm", t.max_grad_norm),
            ("train.adam_weight_decay", t.adam_weight_decay),
            ("train.noise_offset", t.noise_offset),
        ] {
            if v.is_nan() || v < 0.0 {
                return Err(err(k, format!("must be >= 0, got {v}")));
            }
        }
        for (k, v) in [
            ("train.ema_decay", t.ema_decay),
            ("train.ema_min_decay", t.ema_min_decay),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(err(k, format!("must be in [0, 1], got {v}")));
            }
        }
        if !(t.ema_inv_gamma > 0.0 && t.ema_power > 0.0) {
            return Err(err(
                "train.ema_inv_gamma",
                format!(
                    "ema_inv_gamma and ema_power must be > 0, got {} and {}",
                    t.ema_inv_gamma, t.ema_power
                ),
            ));
        }
        if let Some(g) = t.snr_gamma.filter(|g| !(*g > 0.0 && g.is_finite())) {
            return Err(err("train.snr_gamma", format!("must be > 0, got {g}")));
        }
        if !(0.0..=1.0).contains(&t.proportion_empty_prompts) {
            return Err(err(
                "train.proportion_empty_prompts",
                format!("must be in [0, 1], got {}", t.proportion_empty_prompts),
            ));
        }
        for (k, v) in [
            ("train.train_batch_size", t.train_batch_size as u64),
            (
                "train.gradient_accumulation_steps",
                t.gradient_accumulation_steps as u64,
            ),
            ("train.checkpointing_steps", t.checkpointing_steps),
            ("data.resolution", self.data.resolution as u64),
        ] {
            if v == 0 {
                return Err(err(k, "must be at least 1".into()));
            }
        }
        let v = &self.sample;
        for (k, n) in [
            ("sample.validation_steps", v.validation_steps as usize),
            ("sample.num_inference_steps", v.num_inference_steps),
            ("sample.num_validation_images", v.num_validation_images),
        ] {
            if n == 0 {
                return Err(err(k, "must be at least 1".into()));
            }
        }
        if t.checkpoints_total_limit == Some(0) {
            return Err(err(
                "train.checkpoints_total_limit",
                "must be at least 1 (leave it unset to keep every checkpoint)".into(),
            ));
        }
        if let Some(p) = &self.model.pretrained_model_name_or_path {
            if !Path::new(p).is_dir() {
                return Err(err(
                    "model.pretrained_model_name_or_path",
                    format!(
                        "'{p}' is not a folder. Only local diffusers pipeline folders work \
                         (difftrain downloads nothing from a model hub)"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The config as TOML (what checkpoints record).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }
}

/// TOML text as a table, with `--set` overrides applied.
fn parse_table(text: &str, source: &str, sets: &[String]) -> Result<toml::Table> {
    let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| Error::File {
        path: source.to_string(),
        msg: format!("invalid TOML: {e}"),
    })?;
    for s in sets {
        apply_set(&mut table, s)?;
    }
    Ok(table)
}

/// Apply one `section.key=value` override to the table. The value is read
/// as a TOML value; a bare word that is not one is taken as a string
/// (`--set train.resume_from=latest`).
fn apply_set(table: &mut toml::Table, set: &str) -> Result<()> {
    let bad = |msg: String| Error::Config {
        path: "--set".into(),
        field: set.to_string(),
        msg,
    };
    let (key, raw) = set
        .split_once('=')
        .ok_or_else(|| bad("expected section.key=value".into()))?;
    let (section, field) = key
        .trim()
        .split_once('.')
        .ok_or_else(|| bad("expected section.key=value".into()))?;
    let raw = raw.trim();
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let entry = table
        .entry(section.to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let toml::Value::Table(sec) = entry else {
        return Err(bad(format!("'{section}' is not a section")));
    };
    sec.insert(field.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_diffusers_defaults() {
        let c = Config::from_toml("", &[], "t").unwrap();
        assert_eq!(c.train.learning_rate, 1e-4);
        assert_eq!(c.train.train_batch_size, 16);
        assert_eq!(c.train.lr_warmup_steps, 500);
        assert_eq!(c.train.max_grad_norm, 1.0);
        assert_eq!(c.data.resolution, 512);
        assert!(!c.train.dream_training);
    }

    #[test]
    fn set_overrides_with_toml_values_and_bare_words() {
        let text = "[train]\nlearning_rate = 0.5\n";
        let sets = [
            "train.learning_rate=2e-3".to_string(),
            "train.resume_from=latest".to_string(),
            "model.prediction_type=\"v_prediction\"".to_string(),
            "train.dream_training=true".to_string(),
            "scheduler.beta_schedule=scaled_linear".to_string(),
        ];
        let c = Config::from_toml(text, &sets, "t").unwrap();
        assert_eq!(c.train.learning_rate, 2e-3);
        assert_eq!(c.train.resume_from, "latest");
        assert_eq!(c.model.prediction_type, Some(PredictionType::VPrediction));
        assert!(c.train.dream_training);
        assert_eq!(c.scheduler.beta_schedule, Some(BetaSchedule::ScaledLinear));
    }

    #[test]
    fn bad_keys_and_values_name_the_key() {
        let cases = [
            ("[train]\nlearning_rat = 1.0\n", "learning_rat"),
            ("[trian]\n", "trian"),
            ("[train]\nlearning_rate = \"fast\"\n", "train.learning_rate"),
            ("[train]\nprecision = \"fp8\"\n", "train.precision"),
            (
                "[train]\nlr_scheduler = \"cosine_wobble\"\n",
                "train.lr_scheduler",
            ),
            (
                "[model]\nprediction_type = \"x\"\n",
                "model.prediction_type",
            ),
            (
                "[model]\nprediction_type = \"sample\"\n[train]\ndream_training = true\n",
                "model.prediction_type",
            ),
            ("[train]\ntrain_batch_size = 0\n", "train.train_batch_size"),
            (
                "[model]\npretrained_model_name_or_path = \"runwayml/stable-diffusion-v1-5\"\n",
                "only local",
            ),
        ];
        for (text, needle) in cases {
            let e = Config::from_toml(text, &[], "cfg.toml")
                .unwrap_err()
                .to_string();
            assert!(
                e.to_lowercase().contains(&needle.to_lowercase()) && e.contains("cfg.toml"),
                "{text:?}: {e}"
            );
        }
        let e = Config::from_toml("", &["nodot=1".into()], "t").unwrap_err();
        assert!(e.to_string().contains("section.key=value"), "{e}");
    }
}
