//! Learning-rate schedules, as pure functions of the optimizer step, equal to
//! `transformers.get_scheduler` (a `LambdaLR` over the base lr). Step 0 is the first optimizer
//! step; with warmup it runs at lr 0, exactly as transformers does.

use herd_proto::SchedulerType;

mod deepspeed;
pub use deepspeed::DeepSpeedSchedule;

/// What a job's learning rate follows: its `lr_scheduler_type`, or the `scheduler` section of
/// its DeepSpeed config, which replaces it as in HF Trainer.
#[derive(Debug, Clone, PartialEq)]
pub enum Schedule {
    Hf(LrSchedule),
    DeepSpeed(DeepSpeedSchedule),
}

impl Schedule {
    /// The lr used by optimizer step `step` (0-based).
    pub fn lr_at(&self, step: u64) -> f64 {
        match self {
            Schedule::Hf(s) => s.lr_at(step),
            Schedule::DeepSpeed(s) => s.lr_at(step),
        }
    }

    /// The `learning_rate` HF Trainer logs at `global_step` (≥ 1, after that many optimizer
    /// steps): transformers 5 logs the lr of the step just taken, but under DeepSpeed it asks
    /// the scheduler after the engine has stepped it, which gives the next step's lr.
    pub fn logged_lr(&self, global_step: u64) -> f64 {
        match self {
            Schedule::Hf(s) => s.lr_at(global_step.saturating_sub(1)),
            Schedule::DeepSpeed(s) => s.lr_at(global_step),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub kind: SchedulerType,
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl LrSchedule {
    /// The lr used by optimizer step `step` (0-based). Arithmetic in f64, as Python's floats.
    pub fn lr_at(&self, step: u64) -> f64 {
        self.base_lr * self.factor(step)
    }

    fn factor(&self, step: u64) -> f64 {
        let (s, w, t) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        let warming = step < self.warmup_steps;
        let warm = || s / w.max(1.0);
        match self.kind {
            SchedulerType::Constant => 1.0,
            SchedulerType::ConstantWithWarmup => {
                if warming {
                    warm()
                } else {
                    1.0
                }
            }
            SchedulerType::Linear => {
                if warming {
                    warm()
                } else {
                    ((t - s) / (t - w).max(1.0)).max(0.0)
                }
            }
            SchedulerType::Cosine => {
                if warming {
                    warm()
                } else {
                    // transformers' num_cycles = 0.5: half a cosine from 1 down to 0.
                    let progress = (s - w) / (t - w).max(1.0);
                    (0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos())).max(0.0)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(kind: SchedulerType) -> LrSchedule {
        LrSchedule {
            kind,
            base_lr: 1.0,
            warmup_steps: 4,
            total_steps: 20,
        }
    }

    #[test]
    fn warmup_starts_at_zero_and_reaches_base() {
        for kind in [
            SchedulerType::Linear,
            SchedulerType::Cosine,
            SchedulerType::ConstantWithWarmup,
        ] {
            let s = sched(kind);
            assert_eq!(s.lr_at(0), 0.0);
            assert_eq!(s.lr_at(2), 0.5);
            assert_eq!(s.lr_at(4), 1.0);
        }
        assert_eq!(sched(SchedulerType::Constant).lr_at(0), 1.0);
    }

    #[test]
    fn decays_reach_zero_at_the_end() {
        assert_eq!(sched(SchedulerType::Linear).lr_at(20), 0.0);
        assert!(sched(SchedulerType::Cosine).lr_at(20).abs() < 1e-12);
        assert!((sched(SchedulerType::Cosine).lr_at(12) - 0.5).abs() < 1e-12);
        assert_eq!(sched(SchedulerType::Linear).lr_at(12), 0.5);
    }
}
