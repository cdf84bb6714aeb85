//! The DDPM noise schedule with diffusers' `DDPMScheduler` semantics: betas
//! from `num_train_timesteps`, `beta_start`, `beta_end` and `beta_schedule`
//! (or `trained_betas`), optionally rescaled to zero terminal SNR, and
//! `alphas_cumprod`, the table the `add_noise`, `get_velocity` and DREAM
//! kernels read (`src/ops/diffusion.rs`).
//!
//! diffusers computes the table with float32 torch ops (cumprod accumulating
//! in double on the CPU); the same sequence runs here, so the table agrees to
//! an ulp or two.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// What the UNet predicts (`prediction_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The noise.
    #[default]
    Epsilon,
    /// v = alpha_t noise - sigma_t x0 (Salimans & Ho 2022).
    VPrediction,
    /// The sample (see `sample_target`).
    Sample,
}

impl PredictionType {
    pub fn name(self) -> &'static str {
        match self {
            PredictionType::Epsilon => "epsilon",
            PredictionType::VPrediction => "v_prediction",
            PredictionType::Sample => "sample",
        }
    }
}

/// `beta_schedule`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    #[default]
    Linear,
    /// Linear in sqrt(beta) (Stable Diffusion's).
    ScaledLinear,
    /// The cosine schedule of Nichol & Dhariwal (2021), betas capped at 0.999.
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredcosCapV2,
    /// sigmoid(linspace(-6, 6)) scaled into [beta_start, beta_end].
    Sigmoid,
}

/// The training-relevant part of a diffusers scheduler config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NoiseSchedule {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub rescale_betas_zero_snr: bool,
    pub prediction_type: PredictionType,
}

impl Default for NoiseSchedule {
    /// `DDPMScheduler()`'s defaults.
    fn default() -> Self {
        NoiseSchedule {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            rescale_betas_zero_snr: false,
            prediction_type: PredictionType::Epsilon,
        }
    }
}

impl NoiseSchedule {
    /// Read a diffusers `scheduler_config.json` (any DDPM-family scheduler
    /// class: DDPM, DDIM, PNDM, Euler, DPM-Solver, ...). The schedule keys
    /// are used; the others configure only sampling and are ignored, as
    /// diffusers' training script does when it builds a DDPMScheduler from
    /// another class's config. A value difftrain does not support is an
    /// error naming the key.
    pub fn from_diffusers_json(path: &Path) -> Result<NoiseSchedule> {
        let mut map = crate::io::config::read_json(path)?;
        map.retain(|k, v| {
            matches!(
                k.as_str(),
                "num_train_timesteps"
                    | "beta_start"
                    | "beta_end"
                    | "beta_schedule"
                    | "trained_betas"
                    | "rescale_betas_zero_snr"
                    | "prediction_type"
            ) && !v.is_null()
        });
        let s: NoiseSchedule = serde_path_to_error::deserialize(serde_json::Value::Object(map))
            .map_err(|e| Error::Config {
                path: path.display().to_string(),
                field: e.path().to_string(),
                msg: e.inner().to_string(),
            })?;
        s.check(&path.display().to_string())?;
        Ok(s)
    }

    /// Values a schedule cannot be built from, as an error naming the key.
    pub fn check(&self, source: &str) -> Result<()> {
        let err = |field: &str, msg: String| Error::Config {
            path: source.to_string(),
            field: field.to_string(),
            msg,
        };
        if self.num_train_timesteps < 2 {
            return Err(err(
                "num_train_timesteps",
                format!("must be at least 2, got {}", self.num_train_timesteps),
            ));
        }
        if let Some(b) = &self.trained_betas {
            if b.len() != self.num_train_timesteps {
                return Err(err(
                    "trained_betas",
                    format!(
                        "has {} values for {} num_train_timesteps",
                        b.len(),
                        self.num_train_timesteps
                    ),
                ));
            }
            if let Some(x) = b.iter().find(|x| !(0.0..1.0).contains(*x)) {
                return Err(err("trained_betas", format!("{x} is outside [0, 1)")));
            }
        } else {
            for (k, v) in [("beta_start", self.beta_start), ("beta_end", self.beta_end)] {
                if !(0.0..1.0).contains(&v) {
                    return Err(err(k, format!("{v} is outside [0, 1)")));
                }
            }
        }
        Ok(())
    }

    /// The betas as diffusers' DDPMScheduler makes them (float32).
    pub fn betas(&self) -> Vec<f32> {
        let n = self.num_train_timesteps;
        let betas = match (&self.trained_betas, self.beta_schedule) {
            (Some(b), _) => b.iter().map(|&x| x as f32).collect(),
            (None, BetaSchedule::Linear) => {
                linspace_f32(self.beta_start as f32, self.beta_end as f32, n)
            }
            (None, BetaSchedule::ScaledLinear) => linspace_f32(
                self.beta_start.sqrt() as f32,
                self.beta_end.sqrt() as f32,
                n,
            )
            .iter()
            .map(|b| b * b)
            .collect(),
            (None, BetaSchedule::SquaredcosCapV2) => betas_for_cosine_alpha_bar(n),
            (None, BetaSchedule::Sigmoid) => {
                let (lo, hi) = (self.beta_start as f32, self.beta_end as f32);
                linspace_f32(-6.0, 6.0, n)
                    .iter()
                    .map(|&x| 1.0 / (1.0 + (-x).exp()) * (hi - lo) + lo)
                    .collect()
            }
        };
        if self.rescale_betas_zero_snr {
            rescale_zero_terminal_snr(&betas)
        } else {
            betas
        }
    }

    /// `alphas_cumprod`: prod_{s <= t} (1 - beta_s), length num_train_timesteps.
    pub fn alphas_cumprod(&self) -> Vec<f32> {
        let alphas: Vec<f32> = self.betas().iter().map(|b| 1.0 - b).collect();
        cumprod(&alphas)
    }
}

/// torch.cumprod of float32 on the CPU: a double accumulator, each prefix
/// rounded to float32.
fn cumprod(x: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    x.iter()
        .map(|&v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// torch.linspace in float32: start + step * i for the first half, end -
/// step * (n - 1 - i) for the second, step = (end - start) / (n - 1).
fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    let step = (end - start) / (n - 1) as f32;
    (0..n)
        .map(|i| {
            if i < n / 2 {
                start + step * i as f32
            } else {
                end - step * (n - 1 - i) as f32
            }
        })
        .collect()
}

/// diffusers' `betas_for_alpha_bar` with the cosine alpha-bar, in double,
/// each beta capped at 0.999, then stored as float32.
fn betas_for_cosine_alpha_bar(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr` (Lin et al. 2023, Algorithm 1):
/// shift and scale sqrt(alphas_cumprod) so the last is 0 and the first is
/// unchanged, then back to betas. float32 throughout, as torch does it.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let sqrt_bar: Vec<f32> = cumprod(&alphas).iter().map(|a| a.sqrt()).collect();
    let (first, last) = (sqrt_bar[0], sqrt_bar[sqrt_bar.len() - 1]);
    let scale = first / (first - last);
    let bar: Vec<f32> = sqrt_bar
        .iter()
        .map(|s| {
            let v = (s - last) * scale;
            v * v
        })
        .collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    out.extend(bar.windows(2).map(|w| 1.0 - w[1] / w[0]));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_schedule_endpoints_and_monotone() {
        let s = NoiseSchedule::default();
        let b = s.betas();
        assert_eq!(b.len(), 1000);
        assert_eq!((b[0], b[999]), (0.0001, 0.02));
        let ac = s.alphas_cumprod();
        assert!(ac.windows(2).all(|w| w[1] < w[0]));
        // prod (1 - beta) over the linear schedule, in double.
        let want: f64 = (0..1000)
            .map(|i| 1.0 - (0.0001 + (0.02 - 0.0001) * i as f64 / 999.0))
            .product();
        assert!(
            (ac[999] as f64 / want - 1.0).abs() < 1e-5,
            "{} vs {want}",
            ac[999]
        );
    }

    #[test]
    fn zero_snr_ends_at_zero_and_keeps_the_first() {
        let s = NoiseSchedule {
            beta_schedule: BetaSchedule::ScaledLinear,
            beta_start: 0.00085,
            beta_end: 0.012,
            rescale_betas_zero_snr: true,
            ..Default::default()
        };
        let ac = s.alphas_cumprod();
        let plain = NoiseSchedule {
            rescale_betas_zero_snr: false,
            ..s.clone()
        }
        .alphas_cumprod();
        assert_eq!(ac[999], 0.0);
        assert!((ac[0] / plain[0] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn bad_values_name_their_key() {
        let s = NoiseSchedule {
            trained_betas: Some(vec![0.1; 3]),
            ..Default::default()
        };
        let e = s.check("x.json").unwrap_err().to_string();
        assert!(e.contains("trained_betas") && e.contains("3 values"), "{e}");
        let s = NoiseSchedule {
            beta_end: 1.5,
            ..Default::default()
        };
        assert!(s.check("x").unwrap_err().to_string().contains("beta_end"));
    }
}
