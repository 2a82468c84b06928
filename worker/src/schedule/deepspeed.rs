//! DeepSpeed's warmup schedules as pure functions of the optimizer step, equal to
//! `deepspeed.runtime.lr_schedules` stepped the way DeepSpeed's engine steps them: the
//! constructor sets the lr of the first optimizer step (iteration -1: `warmup_min_lr`, or 0 for
//! WarmupCosineLR), and `scheduler.step()` after optimizer step s sets the lr of step s + 1 from
//! iteration s. So step s (0-based) runs at the schedule's value for iteration s − 1. Arithmetic
//! in f64, in DeepSpeed's order of operations.

use herd_proto::job::deepspeed::scheduler::{DsScheduleKind, DsScheduler, WarmupType};

/// A resolved DeepSpeed schedule ([`DsScheduler::resolve`] has set both step counts).
#[derive(Debug, Clone, PartialEq)]
pub struct DeepSpeedSchedule(DsScheduler);

impl DeepSpeedSchedule {
    /// `s` must come from [`DsScheduler::resolve`].
    pub fn new(s: DsScheduler) -> Self {
        debug_assert!(s.warmup_num_steps.is_some());
        DeepSpeedSchedule(s)
    }

    /// The schedule's parameters.
    pub fn config(&self) -> &DsScheduler {
        &self.0
    }

    /// The lr used by optimizer step `step` (0-based).
    pub fn lr_at(&self, step: u64) -> f64 {
        let s = &self.0;
        let Some(iteration) = step.checked_sub(1) else {
            return match s.kind {
                DsScheduleKind::WarmupCosineLr => 0.0,
                _ => s.warmup_min_lr,
            };
        };
        let it = iteration as f64;
        // DeepSpeed: self.warmup_num_steps = max(2, warmup_num_steps).
        let w = s.warmup_num_steps.unwrap_or(1000).max(2) as f64;
        let t = s.total_num_steps.unwrap_or(0) as f64;
        let rise = || match s.warmup_type {
            WarmupType::Log => (1.0 / w.ln()) * (it + 1.0).ln(),
            WarmupType::Linear => it / w,
        };
        match s.kind {
            DsScheduleKind::WarmupLr | DsScheduleKind::WarmupDecayLr => {
                let gamma = if it < w {
                    rise()
                } else if s.kind == DsScheduleKind::WarmupLr {
                    1.0
                } else {
                    ((t - it) / (t - w).max(1.0)).max(0.0)
                };
                s.warmup_min_lr + (s.warmup_max_lr - s.warmup_min_lr) * gamma
            }
            DsScheduleKind::WarmupCosineLr => {
                let ratio = if it < w {
                    s.warmup_min_ratio + rise() * (1.0 - s.warmup_min_ratio)
                } else {
                    let progress = ((it - w + 1.0) / (t - w).max(1.0)).min(1.0);
                    let cos = (1.0 + (std::f64::consts::PI * progress).cos()) / 2.0;
                    (s.cos_min_ratio + (1.0 - s.cos_min_ratio) * cos).max(0.0)
                };
                s.base_lr * ratio
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sched(v: serde_json::Value, warmup: u64, total: u64) -> DeepSpeedSchedule {
        let s = herd_proto::job::deepspeed::scheduler::read(&v, 1.0).unwrap();
        DeepSpeedSchedule::new(s.resolve(warmup, total).unwrap())
    }

    #[test]
    fn the_first_two_steps_run_at_the_minimum_then_warmup_rises() {
        let s = sched(
            json!({"type": "WarmupLR", "params": {"warmup_min_lr": 0.1, "warmup_num_steps": "auto"}}),
            4,
            10,
        );
        assert_eq!(s.lr_at(0), 0.1);
        assert_eq!(s.lr_at(1), 0.1); // iteration 0: ln(1) = 0
        assert!((s.lr_at(2) - (0.1 + 0.9 * 2f64.ln() / 4f64.ln())).abs() < 1e-15);
        assert_eq!(s.lr_at(5), 1.0); // iteration 4 = W: warmed up
        assert_eq!(s.lr_at(100), 1.0);
    }

    #[test]
    fn decay_and_cosine_end_at_their_floors() {
        let d = sched(
            json!({"type": "WarmupDecayLR", "params": {"warmup_max_lr": "auto", "warmup_num_steps": "auto", "total_num_steps": "auto", "warmup_type": "linear"}}),
            4,
            12,
        );
        assert_eq!(d.lr_at(3), 0.5); // iteration 2 of 4
        assert_eq!(d.lr_at(5), 1.0); // iteration 4: (12 − 4) / (12 − 4)
        assert_eq!(d.lr_at(13), 0.0);
        let c = sched(
            json!({"type": "WarmupCosineLR", "params": {"warmup_num_steps": "auto", "total_num_steps": "auto", "cos_min_ratio": 0.1}}),
            4,
            12,
        );
        assert_eq!(c.lr_at(0), 0.0);
        assert!((c.lr_at(12) - 0.1).abs() < 1e-15, "{}", c.lr_at(12));
        assert!((c.lr_at(40) - 0.1).abs() < 1e-15);
    }
}
