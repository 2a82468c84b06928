//! [`JobSpec::validate`]: the checks of a job's values that need no disk access, each naming
//! the key it refuses.

use super::*;

/// More epochs than any fine-tune runs; a larger number is a typo, and would overflow the
/// step count.
const MAX_EPOCHS: f64 = 1e6;

impl JobSpec {
    /// Checks that need no disk access.
    pub fn validate(&self, file: &str) -> Result<(), JobError> {
        let bad = |key: &'static str, reason: String| {
            Err(JobError::Invalid {
                file: file.to_string(),
                key,
                reason,
            })
        };
        let pos_finite = |x: f64| x.is_finite() && x > 0.0;
        let paths = [
            ("model_name_or_path", Some(&self.model_name_or_path)),
            ("output_dir", Some(&self.output_dir)),
            ("tokenizer_name", self.tokenizer_name.as_ref()),
            ("eval_data_path", self.eval_data_path.as_ref()),
        ];
        for (key, path) in paths {
            if path.is_some_and(|p| p.as_os_str().is_empty()) {
                return bad(key, "must not be empty".into());
            }
        }
        // The final model's files would replace the base model's.
        if self.output_dir == self.model_name_or_path {
            return bad(
                "output_dir",
                format!(
                    "is model_name_or_path ({}): the trained model would overwrite the base \
                     model; give another directory",
                    self.output_dir.display()
                ),
            );
        }
        if self.per_device_train_batch_size == 0 {
            return bad("per_device_train_batch_size", "must be at least 1".into());
        }
        if self.per_device_eval_batch_size == 0 {
            return bad("per_device_eval_batch_size", "must be at least 1".into());
        }
        if self.gradient_accumulation_steps == 0 {
            return bad("gradient_accumulation_steps", "must be at least 1".into());
        }
        if self.world_size == 0 {
            return bad("world_size", "must be at least 1".into());
        }
        if self.max_steps <= 0 && !pos_finite(self.num_train_epochs) {
            return bad(
                "num_train_epochs",
                format!(
                    "must be a positive number when max_steps is unset, got {}",
                    self.num_train_epochs
                ),
            );
        }
        if self.max_steps <= 0 && self.num_train_epochs > MAX_EPOCHS {
            return bad(
                "num_train_epochs",
                format!(
                    "must be at most {MAX_EPOCHS} (got {}); to train by steps, set max_steps",
                    self.num_train_epochs
                ),
            );
        }
        if !(self.learning_rate.is_finite() && self.learning_rate >= 0.0) {
            return bad(
                "learning_rate",
                format!("must be a finite number >= 0, got {}", self.learning_rate),
            );
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(
                "weight_decay",
                format!("must be >= 0, got {}", self.weight_decay),
            );
        }
        for (key, v) in [
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&v) {
                return bad(key, format!("must be in [0, 1), got {v}"));
            }
        }
        if !pos_finite(self.adam_epsilon) {
            return bad(
                "adam_epsilon",
                format!("must be > 0, got {}", self.adam_epsilon),
            );
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            return bad(
                "max_grad_norm",
                format!(
                    "must be >= 0 (0 disables clipping), got {}",
                    self.max_grad_norm
                ),
            );
        }
        if !(self.warmup_steps.is_finite() && self.warmup_steps >= 0.0) {
            return bad(
                "warmup_steps",
                format!(
                    "must be a number >= 0 (below 1, a ratio of the steps), got {}",
                    self.warmup_steps
                ),
            );
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            return bad(
                "warmup_ratio",
                format!("must be in [0, 1], got {}", self.warmup_ratio),
            );
        }
        let steps_keys = [
            (
                "logging_steps",
                Some(self.logging_steps),
                self.logging_strategy == LoggingStrategy::Steps,
            ),
            (
                "save_steps",
                Some(self.save_steps),
                self.save_strategy == SaveStrategy::Steps,
            ),
            ("eval_steps", self.eval_steps, true),
        ];
        for (key, value, used) in steps_keys {
            if let (Some(problem), true) = (value.and_then(StepCount::problem), used) {
                return bad(key, problem);
            }
        }
        if self.save_total_limit == Some(0) {
            return bad(
                "save_total_limit",
                "must be at least 1 (leave it out to keep every checkpoint)".into(),
            );
        }
        if self.model_max_length < 2 {
            return bad("model_max_length", "must be at least 2 tokens".into());
        }
        if self.lora_r == Some(0) {
            return bad(
                "lora_r",
                "must be at least 1 (leave it out for full fine-tuning)".into(),
            );
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad(
                "lora_dropout",
                format!("must be in [0, 1), got {}", self.lora_dropout),
            );
        }
        if !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0) {
            return bad(
                "lora_alpha",
                format!("must be > 0, got {}", self.lora_alpha),
            );
        }
        const TARGETS: [&str; 7] = [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ];
        if let Some(t) = self
            .lora_target_modules
            .iter()
            .find(|t| !TARGETS.contains(&t.as_str()))
        {
            return bad(
                "lora_target_modules",
                format!("unknown module `{t}`, expected some of {TARGETS:?}"),
            );
        }
        if self.eval_strategy != EvalStrategy::No && self.eval_data_path.is_none() {
            return bad(
                "eval_data_path",
                format!(
                    "is required with eval_strategy: {}",
                    match self.eval_strategy {
                        EvalStrategy::Epoch => "epoch",
                        _ => "steps",
                    }
                ),
            );
        }
        if self.ddp_bucket_cap_mb == Some(0) {
            return bad(
                "ddp_bucket_cap_mb",
                "must be at least 1 (MiB of gradient per bucket)".into(),
            );
        }
        if let Some(alpha) = self.neftune_noise_alpha {
            if !pos_finite(alpha) {
                return bad("neftune_noise_alpha", format!("must be > 0, got {alpha}"));
            }
            if self.task == Task::Reward {
                return bad(
                    "neftune_noise_alpha",
                    "applies to instruction tuning (task: causal_lm), not to reward models".into(),
                );
            }
        }
        if !(self.eval_delay.is_finite() && self.eval_delay >= 0.0) {
            return bad(
                "eval_delay",
                format!("must be >= 0 (steps or epochs), got {}", self.eval_delay),
            );
        }
        if self.eval_on_start && self.eval_strategy == EvalStrategy::No {
            return bad(
                "eval_on_start",
                "needs an evaluation: set eval_strategy (steps or epoch) and eval_data_path".into(),
            );
        }
        if let Some(reason) = self
            .lr_scheduler_kwargs
            .problem(self.lr_scheduler_type, self.learning_rate)
        {
            return bad("lr_scheduler_kwargs", reason);
        }
        if let Some((key, reason)) = self.best_model_problem() {
            return bad(key, reason);
        }
        if let Err(reason) = self.data_path.check() {
            return bad("data_path", reason);
        }
        if self.packing && self.task == Task::Reward {
            return bad(
                "packing",
                "cannot be used with task: reward (each comparison is scored from its own row's \
                 last token); leave packing out"
                    .into(),
            );
        }
        if self.zero_stage > 2 {
            return bad(
                "zero_stage",
                format!(
                    "stage {} is not supported: herd has stage 0 (no sharding), 1 (optimizer \
                     state sharded across the ranks) and 2 (gradients sharded too); stage 3 \
                     (sharded parameters) is not built",
                    self.zero_stage
                ),
            );
        }
        if self.bf16 && self.fp16 {
            return bad("fp16", "bf16 and fp16 cannot both be true".into());
        }
        Ok(())
    }
}
