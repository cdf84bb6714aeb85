//! Learning-rate schedules with the semantics of diffusers'
//! `get_scheduler` (diffusers/optimization.py): a multiplier of the base
//! learning rate per optimizer step, linear warm-up first where the
//! schedule has one.

use serde::{Deserialize, Serialize};

/// `lr_scheduler`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    #[default]
    Constant,
    ConstantWithWarmup,
    Linear,
    /// Half a cosine from 1 to 0 after warm-up.
    Cosine,
    /// One hard restart cycle (`num_cycles` = 1).
    CosineWithRestarts,
    /// Power 1 down to lr_end = 1e-7.
    Polynomial,
}

/// diffusers' `get_polynomial_decay_schedule_with_warmup` defaults.
const POLY_LR_END: f64 = 1e-7;
const POLY_POWER: f64 = 1.0;

impl LrSchedule {
    /// The learning rate of optimizer step `step` (0-based: the first step
    /// uses `lr(0)`), as torch's LambdaLR gives it after `step` scheduler
    /// steps: `base * lambda(step)`.
    pub fn lr(self, base: f32, step: u64, warmup: u64, total: u64) -> f32 {
        let (s, w, t) = (step as f64, warmup as f64, total as f64);
        let warming = step < warmup;
        let ramp = s / w.max(1.0);
        let progress = (s - w) / (t - w).max(1.0);
        let factor = match self {
            LrSchedule::Constant => 1.0,
            LrSchedule::ConstantWithWarmup => {
                if warming {
                    ramp
                } else {
                    1.0
                }
            }
            LrSchedule::Linear => {
                if warming {
                    ramp
                } else {
                    ((t - s) / (t - w).max(1.0)).max(0.0)
                }
            }
            LrSchedule::Cosine => {
                if warming {
                    ramp
                } else {
                    (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
                }
            }
            LrSchedule::CosineWithRestarts => {
                if warming {
                    ramp
                } else if progress >= 1.0 {
                    0.0
                } else {
                    (0.5 * (1.0 + (std::f64::consts::PI * (progress % 1.0)).cos())).max(0.0)
                }
            }
            LrSchedule::Polynomial => {
                let init = base as f64;
                if warming {
                    ramp
                } else if step > total {
                    POLY_LR_END / init
                } else {
                    let remaining = 1.0 - (s - w) / (t - w);
                    ((init - POLY_LR_END) * remaining.powf(POLY_POWER) + POLY_LR_END) / init
                }
            }
        };
        (base as f64 * factor) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::LrSchedule::*;

    #[test]
    fn schedules_follow_diffusers() {
        let lr = |s: super::LrSchedule, step| s.lr(1.0, step, 10, 110);
        assert_eq!(lr(Constant, 0), 1.0);
        assert_eq!(lr(ConstantWithWarmup, 0), 0.0);
        assert_eq!(lr(ConstantWithWarmup, 5), 0.5);
        assert_eq!(lr(ConstantWithWarmup, 50), 1.0);
        assert_eq!(lr(Linear, 60), 0.5);
        assert_eq!(lr(Linear, 110), 0.0);
        assert!((lr(Cosine, 60) - 0.5).abs() < 1e-6);
        assert!((lr(Cosine, 10) - 1.0).abs() < 1e-6);
        assert!((lr(CosineWithRestarts, 60) - 0.5).abs() < 1e-6);
        assert_eq!(lr(CosineWithRestarts, 110), 0.0);
        assert!((lr(Polynomial, 60) - (0.5 * (1.0 - 1e-7) + 1e-7) as f32).abs() < 1e-7);
        assert!((Polynomial.lr(1e-4, 200, 10, 110) - 1e-7).abs() < 1e-12);
    }
}
