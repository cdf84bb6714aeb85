//! An exponential moving average of the UNet's weights with the semantics
//! of diffusers' `EMAModel` (diffusers/training_utils.py): the shadow starts
//! as a copy of the weights and, after each optimizer step, moves towards
//! them by 1 - decay, where decay grows with the step. The update itself is
//! a kernel that runs in the step's submission (`ops::optim::emit_ema`);
//! this file holds the decay schedule.

use serde::{Deserialize, Serialize};

/// The EMA options (`[train]` keys `ema_*`, diffusers' `EMAModel` arguments
/// and defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EmaSchedule {
    pub decay: f64,
    pub min_decay: f64,
    pub update_after_step: u64,
    pub use_warmup: bool,
    pub inv_gamma: f64,
    pub power: f64,
}

impl EmaSchedule {
    /// `EMAModel.get_decay(optimization_step)`, the decay of the update made
    /// at optimizer step `step` (1-based): 0 (a plain copy) until
    /// `update_after_step` steps have passed, then (1 + k) / (10 + k), or
    /// with warm-up 1 - (1 + k / inv_gamma)^-power, for k steps since,
    /// clamped to [min_decay, decay].
    pub fn decay_at(&self, step: u64) -> f64 {
        let k = step.saturating_sub(self.update_after_step + 1);
        if k == 0 {
            return 0.0;
        }
        let k = k as f64;
        let warm = if self.use_warmup {
            1.0 - (1.0 + k / self.inv_gamma).powf(-self.power)
        } else {
            (1.0 + k) / (10.0 + k)
        };
        warm.min(self.decay).max(self.min_decay)
    }
}

#[cfg(test)]
mod tests {
    use super::EmaSchedule;

    #[test]
    fn decay_follows_emamodel() {
        let s = EmaSchedule {
            decay: 0.9999,
            min_decay: 0.0,
            update_after_step: 0,
            use_warmup: false,
            inv_gamma: 1.0,
            power: 2.0 / 3.0,
        };
        assert_eq!(s.decay_at(1), 0.0);
        assert_eq!(s.decay_at(2), 2.0 / 11.0);
        assert_eq!(s.decay_at(1_000_000), 0.9999);
        let w = EmaSchedule {
            use_warmup: true,
            update_after_step: 2,
            min_decay: 0.5,
            ..s
        };
        assert_eq!(w.decay_at(3), 0.0);
        assert!((w.decay_at(5) - (1.0 - 3f64.powf(-2.0 / 3.0)).max(0.5)).abs() < 1e-15);
    }
}
