//! When the trainer logs, evaluates and saves after an optimizer step: HF Trainer's
//! `DefaultFlowCallback` (its `on_step_end` and `on_epoch_end`) as one pure function, proven
//! against the real Trainer by worker/tests/cadence_parity.rs.
//!
//! HF's rules, for `steps_done` optimizer steps (1-based):
//! - log every `logging_steps` (`logging_strategy: steps`), or at each epoch's end (`epoch`),
//!   and after step 1 with `logging_first_step`; never just because training ended;
//! - evaluate every `eval_steps` and also at the last step (`eval_strategy: steps`), or at each
//!   epoch's end (`epoch`), none before `eval_delay` steps (or epochs);
//! - save every `save_steps` and also at the last step (`save_strategy: steps`), or at each
//!   epoch's end (`epoch`).
//!
//! The last epoch ends at the last step even when it is cut short (`max_steps`, a fractional
//! `num_train_epochs`): HF's epoch loop stops there and runs its epoch-end callback.

use herd_proto::{EvalStrategy, JobSpec, LoggingStrategy, SaveStrategy, StepCount};

use super::plan::Plan;

/// How often one thing happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Every {
    No,
    Steps(u64),
    Epoch,
}

/// What follows one optimizer step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Actions {
    pub log: bool,
    pub evaluate: bool,
    pub save: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cadence {
    pub log: Every,
    pub log_first_step: bool,
    pub evaluate: Every,
    /// `eval_delay`: no evaluation before this many steps (Every::Steps) or epochs (Epoch).
    pub eval_delay: f64,
    pub save: Every,
}

impl Cadence {
    /// The job's cadences for a run of `total_steps` (a `*_steps` below 1 is a ratio of it);
    /// `evaluate` is No without held-out data (the job refuses an eval_strategy without
    /// eval_data_path).
    pub fn of(job: &JobSpec, total_steps: u64) -> Cadence {
        let steps = |n: StepCount| Every::Steps(n.resolve(total_steps));
        Cadence {
            log: match job.logging_strategy {
                LoggingStrategy::Steps => steps(job.logging_steps),
                LoggingStrategy::Epoch => Every::Epoch,
                LoggingStrategy::No => Every::No,
            },
            log_first_step: job.logging_first_step,
            evaluate: match (job.eval_strategy, &job.eval_data_path) {
                (_, None) | (EvalStrategy::No, _) => Every::No,
                (EvalStrategy::Steps, _) => steps(job.eval_steps.unwrap_or(job.logging_steps)),
                (EvalStrategy::Epoch, _) => Every::Epoch,
            },
            eval_delay: job.eval_delay,
            save: match job.save_strategy {
                SaveStrategy::Steps => steps(job.save_steps),
                SaveStrategy::Epoch => Every::Epoch,
                // save_strategy: best saves after an evaluation, when it improves the metric.
                SaveStrategy::No | SaveStrategy::Best => Every::No,
            },
        }
    }

    /// What the trainer does after optimizer step `steps_done` of `plan`.
    pub fn after(&self, plan: &Plan, steps_done: u64) -> Actions {
        let last = steps_done == plan.total_steps;
        let at = |every: Every, also_last: bool| match every {
            Every::No => false,
            Every::Steps(n) => (n > 0 && steps_done.is_multiple_of(n)) || (also_last && last),
            Every::Epoch => plan.ends_epoch(steps_done),
        };
        let delayed = match self.evaluate {
            Every::Epoch => self.eval_delay > plan.epoch_progress(steps_done),
            _ => self.eval_delay > steps_done as f64,
        };
        Actions {
            log: at(self.log, false) || (self.log_first_step && steps_done == 1),
            evaluate: at(self.evaluate, true) && !delayed,
            save: at(self.save, true),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(examples: usize, per_device: usize, accumulation: usize, epochs: f64) -> Plan {
        let mut j =
            JobSpec::from_yaml_str("model_name_or_path: m\ndata_path: d\noutput_dir: o\n", "t")
                .unwrap();
        j.per_device_train_batch_size = per_device;
        j.gradient_accumulation_steps = accumulation;
        j.num_train_epochs = epochs;
        Plan::new(&j, examples, 1).unwrap()
    }

    fn steps_where(c: &Cadence, p: &Plan, f: impl Fn(Actions) -> bool) -> Vec<u64> {
        (1..=p.total_steps).filter(|&s| f(c.after(p, s))).collect()
    }

    #[test]
    fn step_cadences_save_and_evaluate_at_the_end_but_do_not_log_there() {
        let p = plan(10, 2, 1, 3.0); // 5 steps an epoch, 15 in all
        let c = Cadence {
            log: Every::Steps(4),
            log_first_step: false,
            evaluate: Every::Steps(5),
            eval_delay: 0.0,
            save: Every::Steps(6),
        };
        assert_eq!(steps_where(&c, &p, |a| a.log), [4, 8, 12]);
        assert_eq!(steps_where(&c, &p, |a| a.evaluate), [5, 10, 15]);
        assert_eq!(steps_where(&c, &p, |a| a.save), [6, 12, 15]);
    }

    #[test]
    fn epoch_cadences_include_an_epoch_cut_short() {
        let p = plan(8, 2, 1, 1.75); // 4 steps an epoch, 7 in all
        let c = Cadence {
            log: Every::Epoch,
            log_first_step: true,
            evaluate: Every::Epoch,
            eval_delay: 0.0,
            save: Every::No,
        };
        assert_eq!(steps_where(&c, &p, |a| a.log), [1, 4, 7]);
        assert_eq!(steps_where(&c, &p, |a| a.evaluate), [4, 7]);
        assert!(steps_where(&c, &p, |a| a.save).is_empty());
    }

    #[test]
    fn the_epoch_counts_micro_batches_as_hf_does() {
        // 7 micro-batches an epoch, accumulation 3: steps of 3, 3 and 1 micro-batches.
        let p = plan(14, 2, 3, 2.0);
        assert_eq!((p.steps_per_epoch, p.micro_batches_per_epoch()), (3, 7));
        let epochs: Vec<f64> = (0..=6).map(|s| p.epoch_progress(s)).collect();
        let want = [
            0.0,
            3.0 / 7.0,
            6.0 / 7.0,
            1.0,
            1.0 + 3.0 / 7.0,
            1.0 + 6.0 / 7.0,
            2.0,
        ];
        assert_eq!(epochs, want);
    }
}
