//! The samplers' side of a scheduler config: DDIM and DDPM as diffusers'
//! `DDIMScheduler.from_config` / `DDPMScheduler.from_config` build them from
//! a pipeline's `scheduler_config.json` (keys the class does not have are
//! ignored, keys it has but the file lacks take the class's defaults), the
//! inference timesteps (`set_timesteps`) and each step's coefficients for the
//! `scheduler_step` kernel (`shaders/diffusion.wgsl`).

use crate::error::{Error, Result};
use crate::train::scheduler::{NoiseSchedule, PredictionType};
use serde_json::Value;
use std::path::Path;

/// Which sampler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SamplerKind {
    Ddim,
    Ddpm,
}

/// `timestep_spacing`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spacing {
    Leading,
    Linspace,
    Trailing,
}

/// A sampler built from a scheduler config.
#[derive(Clone, Debug)]
pub struct Sampler {
    pub kind: SamplerKind,
    pub schedule: NoiseSchedule,
    pub alphas_cumprod: Vec<f32>,
    pub spacing: Spacing,
    pub steps_offset: u64,
    /// DDIM: the alpha of the step before t = 0 is 1 (else alphas_cumprod[0]).
    pub set_alpha_to_one: bool,
    /// Clamp the x0 estimate to +-clip_sample_range (0: off).
    pub clip: f32,
    /// DDPM: the variance is beta_t (`fixed_large`) instead of the posterior's.
    pub fixed_large: bool,
}

impl Sampler {
    /// `kind` from the config at `path` (a `scheduler_config.json` of any
    /// DDPM-family class).
    pub fn from_config(kind: SamplerKind, path: &Path) -> Result<Sampler> {
        let map = crate::io::config::read_json(path)?;
        let schedule = NoiseSchedule::from_diffusers_json(path)?;
        let err = |field: &str, msg: String| Error::Config {
            path: path.display().to_string(),
            field: field.into(),
            msg,
        };
        let get = |k: &str| map.get(k).filter(|v| !v.is_null());
        let spacing = match get("timestep_spacing")
            .and_then(Value::as_str)
            .unwrap_or("leading")
        {
            "leading" => Spacing::Leading,
            "linspace" => Spacing::Linspace,
            "trailing" => Spacing::Trailing,
            other => {
                return Err(err(
                    "timestep_spacing",
                    format!("'{other}' is not supported"),
                ))
            }
        };
        if get("thresholding").and_then(Value::as_bool) == Some(true) {
            return Err(err(
                "thresholding",
                "dynamic thresholding is not supported".into(),
            ));
        }
        let fixed_large = match (kind, get("variance_type").and_then(Value::as_str)) {
            (SamplerKind::Ddpm, None | Some("fixed_small")) => false,
            (SamplerKind::Ddpm, Some("fixed_large")) => true,
            (SamplerKind::Ddpm, Some(other)) => {
                return Err(err("variance_type", format!("'{other}' is not supported")))
            }
            (SamplerKind::Ddim, _) => false,
        };
        let clip_sample = get("clip_sample").and_then(Value::as_bool).unwrap_or(true);
        let range = get("clip_sample_range")
            .and_then(Value::as_f64)
            .unwrap_or(1.0);
        Ok(Sampler {
            kind,
            alphas_cumprod: schedule.alphas_cumprod(),
            schedule,
            spacing,
            steps_offset: get("steps_offset").and_then(Value::as_u64).unwrap_or(0),
            set_alpha_to_one: get("set_alpha_to_one")
                .and_then(Value::as_bool)
                .unwrap_or(true),
            clip: if clip_sample { range as f32 } else { 0.0 },
            fixed_large,
        })
    }

    pub fn prediction(&self) -> PredictionType {
        self.schedule.prediction_type
    }

    /// `set_timesteps(steps)`: the inference timesteps, first to last.
    pub fn timesteps(&self, steps: usize) -> Result<Vec<i64>> {
        let t = self.schedule.num_train_timesteps;
        if steps == 0 || steps > t {
            return Err(Error::Config {
                path: "sampling".into(),
                field: "steps".into(),
                msg: format!("{steps} inference steps; the schedule has 1 to {t}"),
            });
        }
        let ts: Vec<i64> = match self.spacing {
            Spacing::Leading => (0..steps)
                .rev()
                .map(|i| (i * (t / steps)) as i64 + self.steps_offset as i64)
                .collect(),
            Spacing::Linspace => (0..steps)
                .rev()
                .map(|i| {
                    let v = if steps == 1 {
                        0.0
                    } else {
                        i as f64 * (t - 1) as f64 / (steps - 1) as f64
                    };
                    round_half_even(v) as i64
                })
                .collect(),
            Spacing::Trailing => {
                let ratio = t as f64 / steps as f64;
                (0..steps)
                    .map(|i| round_half_even(t as f64 - i as f64 * ratio) as i64 - 1)
                    .collect()
            }
        };
        Ok(ts)
    }

    /// The kernel's coefficients for step `k` of `timesteps`: [sqrt(a_t),
    /// sqrt(1 - a_t), c_x0, c_eps, c_x, c_noise, guidance, clip], computed
    /// in double. The step before t is t - T / steps for DDIM and the next
    /// timestep of the list (none after the last) for DDPM, as diffusers has it.
    pub fn coefficients(&self, k: usize, timesteps: &[i64], eta: f64, guidance: f32) -> [f32; 8] {
        let n = self.schedule.num_train_timesteps as i64;
        let ac = |i: i64| self.alphas_cumprod[i.clamp(0, n - 1) as usize] as f64;
        let t = timesteps[k];
        let prev = match self.kind {
            SamplerKind::Ddim => t - n / timesteps.len() as i64,
            SamplerKind::Ddpm => timesteps.get(k + 1).copied().unwrap_or(-1),
        };
        let a_t = ac(t);
        let (c_x0, c_eps, c_x, c_noise) = match self.kind {
            SamplerKind::Ddim => {
                let a_prev = if prev >= 0 {
                    ac(prev)
                } else if self.set_alpha_to_one {
                    1.0
                } else {
                    ac(0)
                };
                // DDIMScheduler._get_variance and step().
                let var = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev);
                let std = eta * var.sqrt();
                (
                    a_prev.sqrt(),
                    (1.0 - a_prev - std * std).max(0.0).sqrt(),
                    0.0,
                    std,
                )
            }
            SamplerKind::Ddpm => {
                let a_prev = if prev >= 0 { ac(prev) } else { 1.0 };
                let alpha = a_t / a_prev;
                let beta = 1.0 - alpha;
                let c_x0 = a_prev.sqrt() * beta / (1.0 - a_t);
                let c_x = alpha.sqrt() * (1.0 - a_prev) / (1.0 - a_t);
                let var = if t > 0 {
                    if self.fixed_large {
                        beta
                    } else {
                        ((1.0 - a_prev) / (1.0 - a_t) * beta).max(1e-20)
                    }
                } else {
                    0.0
                };
                (c_x0, 0.0, c_x, var.sqrt())
            }
        };
        [
            a_t.sqrt() as f32,
            (1.0 - a_t).sqrt() as f32,
            c_x0 as f32,
            c_eps as f32,
            c_x as f32,
            c_noise as f32,
            guidance,
            self.clip,
        ]
    }
}

/// numpy's round (half to even).
fn round_half_even(v: f64) -> f64 {
    let r = v.round();
    if (v - v.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - v.signum()
    } else {
        r
    }
}
