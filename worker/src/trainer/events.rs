//! What the training loop tells its observer (`herd train`'s progress bar, a worker daemon's
//! reports), and the log lines both print for a save and for the end of training.

use super::best;
use super::engine::StepStats;
use std::path::{Path, PathBuf};

/// What the loop tells its observer (progress bar, logs, a worker's reports).
#[derive(Debug, Clone)]
pub enum Event {
    Started {
        start_step: u64,
        total_steps: u64,
        examples: usize,
        skipped_records: usize,
        /// The trainable parameters (LoRA: the adapters only).
        parameters: usize,
        resumed_from: Option<PathBuf>,
        /// Job keys that differ from the resumed checkpoint's job (`key old → new`).
        changed_since_checkpoint: Vec<String>,
        added_tokens: usize,
    },
    Step {
        step: u64,
        total_steps: u64,
        stats: StepStats,
        tokens_per_sec: f64,
    },
    Logged(serde_json::Value),
    /// An eval entry of the log history (`eval_loss`, `step`, `epoch`, ...), rank 0 only.
    Evaluated(serde_json::Value),
    Saved {
        step: u64,
        path: PathBuf,
        rotated: Vec<u64>,
        /// metric_for_best_model: the checkpoint named best once this one is written.
        best: Option<best::Named>,
    },
    Finished {
        output_dir: PathBuf,
        /// HF's `train_loss`: the mean loss of the steps this run trained.
        train_loss: f64,
        runtime_s: f64,
        /// Optimizer steps this run trained (0 when it resumed at the last step).
        steps_trained: u64,
        total_steps: u64,
        /// The step the final model's weights are at (past total_steps when a checkpoint
        /// beyond a lowered max_steps was resumed).
        step: u64,
        /// The log history's final entry (train_runtime, train_loss, ...), which HF Trainer
        /// prints as the run ends; null on ranks other than 0.
        summary: serde_json::Value,
    },
}

/// The line the end of training is logged as, by `herd train` and by a worker daemon.
pub fn finished_line(e: &Event) -> String {
    let Event::Finished {
        output_dir,
        train_loss,
        runtime_s,
        steps_trained,
        total_steps,
        step,
        ..
    } = e
    else {
        return String::new();
    };
    let out = output_dir.display();
    if *steps_trained == 0 && step > total_steps {
        return format!(
            "nothing left to train: resumed at step {step}, past this job's last step \
             ({total_steps}); final model (step {step}'s weights) rewritten in {out}"
        );
    }
    if *steps_trained == 0 {
        return format!(
            "nothing left to train: resumed at the last step ({total_steps}); final model \
             rewritten in {out}"
        );
    }
    format!(
        "done in {runtime_s:.1}s: {steps_trained} step{}, train_loss {train_loss:.4}; final model \
         in {out}",
        if *steps_trained == 1 { "" } else { "s" }
    )
}

/// The line a save is logged as, by `herd train` and by a worker daemon.
pub fn saved_line(step: u64, path: &Path, rotated: &[u64], best: Option<&best::Named>) -> String {
    let mut line = format!("saved checkpoint-{step} at {}", path.display());
    if !rotated.is_empty() {
        line.push_str(&format!(" (removed {rotated:?})"));
    }
    if let Some(b) = best {
        line.push_str(&format!(
            "; best: checkpoint-{} ({} {:.4})",
            b.step, b.metric, b.value
        ));
    }
    line
}

pub trait Observer {
    fn event(&mut self, e: &Event);
}

impl<F: FnMut(&Event)> Observer for F {
    fn event(&mut self, e: &Event) {
        self(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished(steps_trained: u64, total_steps: u64, step: u64) -> Event {
        Event::Finished {
            output_dir: "/out".into(),
            train_loss: 0.0,
            runtime_s: 0.0,
            steps_trained,
            total_steps,
            step,
            summary: serde_json::Value::Null,
        }
    }

    #[test]
    fn a_run_with_nothing_left_says_which_step_its_final_model_is() {
        assert_eq!(
            finished_line(&finished(0, 20, 20)),
            "nothing left to train: resumed at the last step (20); final model rewritten in /out"
        );
        // max_steps lowered below the checkpoint it resumes: the weights are step 24's.
        assert_eq!(
            finished_line(&finished(0, 20, 24)),
            "nothing left to train: resumed at step 24, past this job's last step (20); final \
             model (step 24's weights) rewritten in /out"
        );
    }
}
