//! Learning-rate schedules, as pure functions of the optimizer step, equal to
//! `transformers.get_scheduler` (a `LambdaLR` over the base lr). Step 0 is the first optimizer
//! step; with warmup it runs at lr 0, exactly as transformers does.

use herd_proto::{SchedulerKwargs, SchedulerType, WsdCurve};
use std::f64::consts::PI;

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
    /// `lr_scheduler_kwargs` (the job checked they belong to `kind`).
    pub kwargs: SchedulerKwargs,
}

impl LrSchedule {
    /// The lr used by optimizer step `step` (0-based). Arithmetic in f64, as Python's floats.
    pub fn lr_at(&self, step: u64) -> f64 {
        self.base_lr * self.factor(step)
    }

    /// transformers' lr_lambda of the scheduler, written as it computes it so the floats agree.
    fn factor(&self, step: u64) -> f64 {
        let (s, w, t) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        if self.kind == SchedulerType::WarmupStableDecay {
            return self.wsd_factor(step);
        }
        if self.kind == SchedulerType::CosineWarmupWithMinLr {
            return self.cosine_warmup_min_lr_factor(step);
        }
        if step < self.warmup_steps && self.kind != SchedulerType::Constant {
            return s / w.max(1.0);
        }
        let progress = (s - w) / (t - w).max(1.0);
        let k = &self.kwargs;
        match self.kind {
            SchedulerType::Constant | SchedulerType::ConstantWithWarmup => 1.0,
            SchedulerType::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            SchedulerType::Cosine => {
                // num_cycles 0.5: half a cosine from 1 down to 0.
                let cycles = k.num_cycles.unwrap_or(0.5);
                (0.5 * (1.0 + (PI * cycles * 2.0 * progress).cos())).max(0.0)
            }
            SchedulerType::CosineWithRestarts => {
                if progress >= 1.0 {
                    return 0.0;
                }
                let cycles = k.num_cycles.unwrap_or(1.0);
                (0.5 * (1.0 + (PI * ((cycles * progress) % 1.0)).cos())).max(0.0)
            }
            SchedulerType::Polynomial => {
                let (lr_init, lr_end) = (self.base_lr, k.lr_end.unwrap_or(1e-7));
                if step > self.total_steps {
                    return lr_end / lr_init;
                }
                let decay_steps = (t - w).max(1.0);
                let remaining = 1.0 - (s - w) / decay_steps;
                ((lr_init - lr_end) * remaining.powf(k.power.unwrap_or(1.0)) + lr_end) / lr_init
            }
            SchedulerType::InverseSqrt => {
                let timescale = k.timescale.unwrap_or(match self.warmup_steps {
                    0 => 10_000,
                    w => w,
                }) as i64;
                let shift = timescale - self.warmup_steps as i64;
                1.0 / ((step as i64 + shift) as f64 / timescale as f64).sqrt()
            }
            SchedulerType::WarmupStableDecay | SchedulerType::CosineWarmupWithMinLr => {
                unreachable!("handled above")
            }
            SchedulerType::CosineWithMinLr => self.cosine_to_floor(progress),
        }
    }

    /// A cosine of `num_cycles` (0.5) waves from 1 down to the min_lr floor at progress 1.
    fn cosine_to_floor(&self, progress: f64) -> f64 {
        let k = &self.kwargs;
        let rate = match (k.min_lr, k.min_lr_rate) {
            (Some(min_lr), _) => min_lr / self.base_lr,
            (None, rate) => rate.unwrap_or(0.0),
        };
        let cycles = k.num_cycles.unwrap_or(0.5);
        let f = 0.5 * (1.0 + (PI * cycles * 2.0 * progress).cos());
        (f * (1.0 - rate) + rate).max(0.0)
    }

    /// transformers' cosine_warmup_with_min_lr: the warmup's first step is already above 0
    /// ((step + 1) / warmup, or from warmup_lr_rate to 1 over warmup - 1 steps), and the
    /// decay's progress counts the step it is in.
    fn cosine_warmup_min_lr_factor(&self, step: u64) -> f64 {
        let (s, w, t) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        if step < self.warmup_steps {
            return match self.kwargs.warmup_lr_rate {
                None => (s + 1.0) / w.max(1.0),
                Some(r) => r + (1.0 - r) * s / (w - 1.0).max(1.0),
            };
        }
        self.cosine_to_floor((s - w + 1.0) / (t - w).max(1.0))
    }

    /// transformers' warmup_stable_decay: warmup from min_lr_ratio to 1, flat, decay to
    /// min_lr_ratio, then min_lr_ratio.
    fn wsd_factor(&self, step: u64) -> f64 {
        let k = &self.kwargs;
        let floor = k.min_lr_ratio.unwrap_or(0.0);
        let (warmup, decay) = (self.warmup_steps, k.num_decay_steps.unwrap_or(0));
        let stable = k.num_stable_steps.unwrap_or_else(|| {
            (self.total_steps as i64 - warmup as i64 - decay as i64).max(0) as u64
        });
        let curve = |c: WsdCurve, p: f64, rising: bool| match (c, rising) {
            (WsdCurve::Linear, true) => p,
            (WsdCurve::Linear, false) => 1.0 - p,
            (WsdCurve::Cosine, true) => 0.5 * (1.0 - (PI * p).cos()),
            (WsdCurve::Cosine, false) => {
                0.5 * (1.0 + (PI * k.num_cycles.unwrap_or(0.5) * 2.0 * p).cos())
            }
            (WsdCurve::OneMinusSqrt, true) => 1.0 - (1.0 - p).sqrt(),
            (WsdCurve::OneMinusSqrt, false) => 1.0 - p.sqrt(),
        };
        let s = step as f64;
        if step < warmup {
            let p = s / (warmup as f64).max(1.0);
            let f = curve(k.warmup_type.unwrap_or(WsdCurve::Linear), p, true);
            return (f * (1.0 - floor) + floor).max(0.0);
        }
        if step < warmup + stable {
            return 1.0;
        }
        if step < warmup + stable + decay {
            let p = (s - warmup as f64 - stable as f64) / (decay as f64).max(1.0);
            let f = curve(k.decay_type.unwrap_or(WsdCurve::Cosine), p, false);
            return (f * (1.0 - floor) + floor).max(0.0);
        }
        floor
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
            kwargs: SchedulerKwargs::default(),
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
