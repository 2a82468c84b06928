//! Which examples each rank sees at each step: a pure function of (seed, epoch, step, rank).
//!
//! The global batch of step `s` is a fixed slice of epoch `s / steps_per_epoch`'s permutation:
//! positions `[(s % spe)·G, (s % spe + 1)·G)` with G = per_device · accumulation · world_size.
//! Rank `r` takes the `r`-th contiguous part of it, split into `accumulation` micro-batches.
//! The union over ranks is the same set whatever the world size, and gradients are sums divided
//! by the global token count, so N ranks with accumulation k update like one rank with N·k.

use crate::{Error, Result};
use herd_proto::JobSpec;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub examples: usize,
    pub per_device: usize,
    pub accumulation: usize,
    pub world_size: usize,
    pub steps_per_epoch: u64,
    pub total_steps: u64,
    pub seed: u64,
}

impl Plan {
    /// `examples` usable examples; `world_size` of this run (may differ from the job's default).
    pub fn new(job: &JobSpec, examples: usize, world_size: usize) -> Result<Self> {
        let global = job.per_device_train_batch_size * job.gradient_accumulation_steps * world_size;
        if examples < global {
            return Err(Error::TooFewExamples {
                examples,
                global_batch: global,
            });
        }
        // The last batch of an epoch may be partial (HF's dataloader keeps it too).
        let steps_per_epoch = examples.div_ceil(global) as u64;
        let total_steps = if job.max_steps > 0 {
            job.max_steps as u64
        } else {
            // HF: max_steps = ceil(num_train_epochs * num_update_steps_per_epoch)
            ((job.num_train_epochs * steps_per_epoch as f64).ceil() as u64).max(1)
        };
        Ok(Plan {
            examples,
            per_device: job.per_device_train_batch_size,
            accumulation: job.gradient_accumulation_steps,
            world_size,
            steps_per_epoch,
            total_steps,
            seed: job.seed,
        })
    }

    pub fn global_batch(&self) -> usize {
        self.per_device * self.accumulation * self.world_size
    }

    pub fn epoch_of(&self, step: u64) -> u64 {
        step / self.steps_per_epoch
    }

    /// The micro-batches of one epoch on one rank: HF's `len(train_dataloader)`, ceil(examples
    /// / (per_device · world_size)).
    pub fn micro_batches_per_epoch(&self) -> u64 {
        self.examples.div_ceil(self.per_device * self.world_size) as u64
    }

    /// Fractional epoch after `steps_done` optimizer steps, as HF Trainer counts it: epoch e
    /// plus the share of the epoch's micro-batches done, so an epoch whose micro-batches do
    /// not divide by the accumulation is 3/7, 6/7, 7/7 done after its steps, not 1/3, 2/3, 1.
    pub fn epoch_progress(&self, steps_done: u64) -> f64 {
        if steps_done == 0 {
            return 0.0;
        }
        let epoch = (steps_done - 1) / self.steps_per_epoch;
        let in_epoch = steps_done - epoch * self.steps_per_epoch;
        let micro = self.micro_batches_per_epoch();
        let done = (in_epoch * self.accumulation as u64).min(micro);
        epoch as f64 + done as f64 / micro as f64
    }

    /// Whether optimizer step `steps_done` ends an epoch (the last one may end early, at
    /// total_steps, as HF's epoch loop does when training stops).
    pub fn ends_epoch(&self, steps_done: u64) -> bool {
        steps_done.is_multiple_of(self.steps_per_epoch) || steps_done == self.total_steps
    }

    /// Examples the optimizer steps `from..to` train on (all ranks): a full global batch each,
    /// except an epoch's last, partial one. What `train_samples_per_second` counts, so a run
    /// of whole epochs reports HF's `num_examples × num_train_epochs`.
    pub fn examples_in_steps(&self, from: u64, to: u64) -> u64 {
        let global = self.global_batch() as u64;
        (from..to)
            .map(|s| {
                let start = (s % self.steps_per_epoch) * global;
                global.min(self.examples as u64 - start)
            })
            .sum()
    }

    /// Positions in the epoch's permutation for micro-batch `micro` of `rank` at `step`.
    /// Empty when the epoch's last, partial batch does not reach this rank's part.
    pub fn micro_batch_positions(
        &self,
        step: u64,
        rank: usize,
        micro: usize,
    ) -> std::ops::Range<usize> {
        let global = self.global_batch();
        let start = (step % self.steps_per_epoch) as usize * global;
        let end = (start + global).min(self.examples);
        let from = start + (rank * self.accumulation + micro) * self.per_device;
        let to = from + self.per_device;
        from.min(end)..to.min(end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(b: usize, k: usize, epochs: f64) -> JobSpec {
        let mut j =
            JobSpec::from_yaml_str("model_name_or_path: m\ndata_path: d\noutput_dir: o\n", "t")
                .unwrap();
        j.per_device_train_batch_size = b;
        j.gradient_accumulation_steps = k;
        j.num_train_epochs = epochs;
        j
    }

    fn global_positions(p: &Plan, step: u64) -> Vec<usize> {
        let mut v = vec![];
        for r in 0..p.world_size {
            for m in 0..p.accumulation {
                v.extend(p.micro_batch_positions(step, r, m));
            }
        }
        v.sort_unstable();
        v
    }

    #[test]
    fn steps_and_fractional_epochs() {
        let p = Plan::new(&job(2, 2, 3.0), 10, 1).unwrap();
        assert_eq!((p.steps_per_epoch, p.total_steps), (3, 9));
        let p = Plan::new(&job(2, 2, 0.5), 10, 1).unwrap();
        assert_eq!(p.total_steps, 2);
        let mut j = job(2, 2, 3.0);
        j.max_steps = 5;
        assert_eq!(Plan::new(&j, 10, 1).unwrap().total_steps, 5);
    }

    #[test]
    fn examples_trained_count_the_partial_last_batch_of_each_epoch() {
        // 112 examples, global batch 48: steps of 48, 48, 16 per epoch.
        let p = Plan::new(&job(16, 3, 2.0), 112, 1).unwrap();
        assert_eq!(p.total_steps, 6);
        assert_eq!(p.examples_in_steps(0, 6), 224);
        assert_eq!(p.examples_in_steps(2, 4), 16 + 48);
        assert_eq!(p.examples_in_steps(3, 3), 0);
    }

    #[test]
    fn global_batch_is_the_same_for_any_world_size() {
        // 4 ranks × accumulation 1 == 1 rank × accumulation 4 == 2 ranks × 2.
        let one = Plan::new(&job(2, 4, 1.0), 21, 1).unwrap();
        let four = Plan::new(&job(2, 1, 1.0), 21, 4).unwrap();
        let two = Plan::new(&job(2, 2, 1.0), 21, 2).unwrap();
        for step in 0..one.steps_per_epoch {
            let g = global_positions(&one, step);
            assert_eq!(g, global_positions(&four, step));
            assert_eq!(g, global_positions(&two, step));
        }
        // Every example exactly once per epoch, the tail included.
        let all: Vec<usize> = (0..one.steps_per_epoch)
            .flat_map(|s| global_positions(&one, s))
            .collect();
        assert_eq!(all, (0..21).collect::<Vec<_>>());
    }

    #[test]
    fn too_few_examples_is_an_error() {
        assert!(matches!(
            Plan::new(&job(4, 2, 1.0), 7, 1),
            Err(Error::TooFewExamples {
                examples: 7,
                global_batch: 8
            })
        ));
        assert!(Plan::new(&job(1, 1, 1.0), 3, 4).is_err());
    }
}
