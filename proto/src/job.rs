//! The job file schema. Keys are HF `TrainingArguments` names with HF's defaults, so a user moving
//! from `torchrun train.py --learning_rate 2e-5 ...` writes the same names in YAML.
//!
//! Unknown keys and wrong types are errors with line and column (serde_yaml reports them; we add
//! the file name). Values that parse but make no sense (batch size 0, negative lr) are rejected by
//! [`JobSpec::validate`] with the key's name.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("{file}: key `{key}`: {reason}")]
    Invalid {
        file: String,
        key: &'static str,
        reason: String,
    },
    #[error("{file}: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
}

/// What the job trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// Instruction tuning: next-token loss on the response (Alpaca's train.py).
    #[default]
    CausalLm,
    /// A reward model on comparison pairs: loss -log σ(r(x, y_a) - r(x, y_b)).
    Reward,
}

/// Which input tokens `num_input_tokens_seen` counts (HF's `include_num_input_tokens_seen`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TokensSeen {
    /// Not counted: the trainer state keeps 0, as HF's default.
    #[default]
    No,
    /// Every input id, padding included (`input_ids.numel()`).
    All,
    /// The attention mask's ones.
    NonPadding,
}

impl<'de> Deserialize<'de> for TokensSeen {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // HF takes a boolean too: true is "all", false "no".
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Given {
            Flag(bool),
            Name(String),
        }
        match Given::deserialize(d)? {
            Given::Flag(true) => Ok(TokensSeen::All),
            Given::Flag(false) => Ok(TokensSeen::No),
            Given::Name(n) => match n.as_str() {
                "no" => Ok(TokensSeen::No),
                "all" => Ok(TokensSeen::All),
                "non_padding" => Ok(TokensSeen::NonPadding),
                _ => Err(serde::de::Error::custom(format!(
                    "include_num_input_tokens_seen: expected `all`, `non_padding`, `no` or a \
                     boolean, got `{n}`"
                ))),
            },
        }
    }
}

fn d_lora_alpha() -> f64 {
    8.0
}
fn d_lora_targets() -> Vec<String> {
    vec!["q_proj".into(), "v_proj".into()]
}

fn d_epochs() -> f64 {
    3.0
}
fn d_max_steps() -> i64 {
    -1
}
fn d_batch() -> usize {
    8
}
fn d_one() -> usize {
    1
}
fn d_lr() -> f64 {
    5e-5
}
fn d_beta1() -> f64 {
    0.9
}
fn d_beta2() -> f64 {
    0.999
}
fn d_eps() -> f64 {
    1e-8
}
fn d_grad_norm() -> f64 {
    1.0
}
fn d_500() -> StepCount {
    StepCount::Steps(500)
}
fn d_max_len() -> usize {
    512
}
fn d_seed() -> u64 {
    42
}

/// Where a job was read from. Not part of what the job is: two jobs equal in every key are
/// equal whatever files they came from.
#[derive(Debug, Clone, Default)]
pub struct Source(pub String);

impl PartialEq for Source {
    fn eq(&self, _: &Source) -> bool {
        true
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.as_str() {
            "" => f.write_str("the job"),
            s => f.write_str(s),
        }
    }
}

/// One training job. Field names and defaults follow `transformers.TrainingArguments`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Where the job was read from (the file, or "job <id>" under a coordinator), for errors
    /// found once training starts; not a key of the file.
    #[serde(skip)]
    pub source: Source,
    /// A directory in HF layout: config.json, model.safetensors (or an index), tokenizer files.
    pub model_name_or_path: PathBuf,
    /// The training data: one file (Alpaca or ShareGPT JSON/JSONL, format detected) or a list of
    /// files, each a path or `{path, weight, format}`, mixed into one set (see [`DataPath`]).
    pub data_path: DataPath,
    pub output_dir: PathBuf,
    /// Tokenizer directory when it is not the model directory.
    #[serde(default)]
    pub tokenizer_name: Option<PathBuf>,
    #[serde(default = "d_epochs")]
    pub num_train_epochs: f64,
    /// A positive value overrides `num_train_epochs` (HF: -1 means unset).
    #[serde(default = "d_max_steps")]
    pub max_steps: i64,
    #[serde(default = "d_batch")]
    pub per_device_train_batch_size: usize,
    #[serde(default = "d_batch")]
    pub per_device_eval_batch_size: usize,
    #[serde(default = "d_one")]
    pub gradient_accumulation_steps: usize,
    #[serde(default = "d_lr")]
    pub learning_rate: f64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "d_beta1")]
    pub adam_beta1: f64,
    #[serde(default = "d_beta2")]
    pub adam_beta2: f64,
    #[serde(default = "d_eps")]
    pub adam_epsilon: f64,
    #[serde(default = "d_grad_norm")]
    pub max_grad_norm: f64,
    /// transformers 4.x's warmup as a share of the steps (5.x gives it as `warmup_steps` < 1).
    #[serde(default)]
    pub warmup_ratio: f64,
    /// Warmup optimizer steps; below 1 a ratio of the total steps, as transformers 5.x reads it.
    #[serde(default)]
    pub warmup_steps: f64,
    #[serde(default)]
    pub lr_scheduler_type: SchedulerType,
    #[serde(default)]
    pub lr_scheduler_kwargs: SchedulerKwargs,
    #[serde(default)]
    pub logging_strategy: LoggingStrategy,
    #[serde(default = "d_500")]
    pub logging_steps: StepCount,
    /// Also log after the first optimizer step.
    #[serde(default)]
    pub logging_first_step: bool,
    #[serde(default)]
    pub save_strategy: SaveStrategy,
    #[serde(default = "d_500")]
    pub save_steps: StepCount,
    #[serde(default)]
    pub save_total_limit: Option<usize>,
    /// HF's `save_only_model`: checkpoints hold the weights (and trainer state) without the
    /// optimizer and scheduler state, a third of the size with AdamW; such a checkpoint cannot
    /// be resumed (HF Trainer refuses too). The checkpoint a run pauses at keeps them.
    #[serde(default)]
    pub save_only_model: bool,
    /// HF's `load_best_model_at_end`: the final model is the best checkpoint's (by
    /// `metric_for_best_model`), which rotation never deletes.
    #[serde(default)]
    pub load_best_model_at_end: bool,
    /// An evaluation metric (`loss` or `eval_loss`, `accuracy` for reward models) that picks the
    /// best checkpoint; "loss" under load_best_model_at_end.
    #[serde(default)]
    pub metric_for_best_model: Option<String>,
    /// Whether a higher metric is better; by default false for a metric ending in "loss".
    #[serde(default)]
    pub greater_is_better: Option<bool>,
    #[serde(default, alias = "evaluation_strategy")]
    pub eval_strategy: EvalStrategy,
    /// NEFTune: uniform noise of magnitude alpha / sqrt(seq_len · hidden) on the training
    /// forwards' input embeddings (HF Trainer's `neftune_noise_alpha`; the paper uses 5).
    #[serde(default)]
    pub neftune_noise_alpha: Option<f64>,
    /// No evaluation before this many steps (eval_strategy: steps) or epochs (epoch).
    #[serde(default)]
    pub eval_delay: f64,
    /// Also evaluate before the first step (a sanity check of the evaluation, as HF).
    #[serde(default)]
    pub eval_on_start: bool,
    /// Evaluate every N steps with `eval_strategy: steps` (HF: defaults to logging_steps).
    #[serde(default)]
    pub eval_steps: Option<StepCount>,
    /// Held-out data for `eval_strategy` steps or epoch: one Alpaca file (comparisons for
    /// `task: reward`), not a mixture.
    #[serde(default)]
    pub eval_data_path: Option<PathBuf>,
    #[serde(default)]
    pub task: Task,
    /// LoRA rank (PEFT's `r`); set to train low-rank adapters with the base frozen.
    #[serde(default)]
    pub lora_r: Option<usize>,
    /// PEFT's `lora_alpha` (scaling = alpha / r).
    #[serde(default = "d_lora_alpha")]
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    /// Module names (last path component) that get adapters, PEFT's `target_modules`.
    #[serde(default = "d_lora_targets")]
    pub lora_target_modules: Vec<String>,
    /// Alpaca train.py's maximum sequence length (tokens, bos included).
    #[serde(default = "d_max_len")]
    pub model_max_length: usize,
    /// Sequence packing (TRL's `packing`): several examples share each row of up to
    /// model_max_length tokens, with positions restarting and attention kept inside each example.
    /// per_device_train_batch_size then counts packed rows.
    #[serde(default)]
    pub packing: bool,
    /// HF's activation recompute: decoder layers keep only their inputs and run forward again in
    /// backward (less memory, one more forward per step, same gradients).
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// HF's `ddp_bucket_cap_mb` (DDP's `bucket_cap_mb`, 25 by default): the gradient sum
    /// across ranks starts bucket by bucket, each of at least this many MiB of whole parameters
    /// from the last layer down, while the layers below are still in backward.
    #[serde(default)]
    pub ddp_bucket_cap_mb: Option<u64>,
    /// ZeRO stage, as DeepSpeed's `zero_optimization.stage`: 0 keeps the whole optimizer state
    /// on every rank; 1 shards it (each rank holds AdamW's moments — and under mixed precision
    /// the f32 masters' low halves — for its part of the parameters, updates that part and
    /// shares it); 2 shards the gradient too (each micro-batch's gradients are reduced into the
    /// rank that owns them, which keeps the sum of its part only). Stage 1 trains the same weights
    /// bit for bit; stage 2 too without clipping (with it, the norm is the ranks' sums of squares
    /// added, which may differ in the last bits). Checkpoints keep one format.
    #[serde(default)]
    pub zero_stage: u8,
    #[serde(default = "d_seed")]
    pub seed: u64,
    /// Train in bf16 with f32 master weights and write the final model in bf16 (GPU ranks
    /// compute in bf16 either way; without this key their final model is f32).
    #[serde(default)]
    pub bf16: bool,
    #[serde(default)]
    pub fp16: bool,
    /// HF's `include_num_input_tokens_seen`: count the input tokens of every rank into the
    /// trainer state's `num_input_tokens_seen` and log it (`all` counts padding, `non_padding`
    /// does not; true is `all`, false `no`).
    #[serde(default)]
    pub include_num_input_tokens_seen: TokensSeen,
    /// Skip (and count) malformed data records instead of failing the job.
    #[serde(default)]
    pub skip_bad_records: bool,
    /// How many workers (ranks) the job runs on; `herd train` runs it in one process.
    #[serde(default = "d_one")]
    pub world_size: usize,
    /// Restarts allowed after a rank failure (orchestrator).
    #[serde(default = "d_max_restarts")]
    pub max_restarts: u32,
    /// A DeepSpeed config (a JSON file's path, or the config inline), as HF Trainer's
    /// `--deepspeed`: its "auto" values come from the job, its numbers must agree with it, and
    /// `zero_optimization.stage` sets `zero_stage` (see [`deepspeed`]). A file is read when the
    /// job is submitted or trained ([`JobSpec::load_deepspeed`]) and stored inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deepspeed: Option<deepspeed::DeepSpeed>,
}

fn d_max_restarts() -> u32 {
    3
}

impl JobSpec {
    /// Parse and validate YAML text. `file` names the source in messages.
    pub fn from_yaml_str(text: &str, file: &str) -> Result<Self, JobError> {
        // A byte-order mark (Windows editors write one) is not part of the first key.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut spec: JobSpec = serde_yaml::from_str(text).map_err(|e| {
            let message = e.to_string();
            let message = match message.starts_with("unknown field") {
                true => unknown_keys::explain(text).unwrap_or(message),
                false => message,
            };
            JobError::Parse {
                file: file.to_string(),
                message,
            }
        })?;
        if let Some(deepspeed::DeepSpeed::Config(c)) = spec.deepspeed.clone() {
            deepspeed::apply(&mut spec, &c, file)?;
        }
        spec.validate(file)?;
        spec.source = Source(file.to_string());
        Ok(spec)
    }

    /// Reads the job's `deepspeed` file (relative to `base`, where a relative data_path is
    /// found too) into the job, folds it in as HF Trainer does and validates the result; the
    /// job then carries the config inline. Returns what herd does differently from DeepSpeed,
    /// one sentence each, for the caller to show. Nothing to do (and no warnings) without one.
    pub fn load_deepspeed(&mut self, base: &Path, file: &str) -> Result<Vec<String>, JobError> {
        let config = match self.deepspeed.take() {
            None => return Ok(vec![]),
            Some(deepspeed::DeepSpeed::Config(c)) => c,
            // A JSON object given as a string, as HF Trainer also takes it (`--deepspeed
            // '{"zero_optimization": ...}'`): parsed here, never looked for as a file.
            Some(deepspeed::DeepSpeed::File(p))
                if p.to_str().is_some_and(|s| s.trim_start().starts_with('{')) =>
            {
                let text = p.to_string_lossy();
                serde_json::from_str(&text).map_err(|e| JobError::Parse {
                    file: format!("{file}: deepspeed (an inline JSON config)"),
                    message: format!("{e} (expected a DeepSpeed JSON config object)"),
                })?
            }
            Some(deepspeed::DeepSpeed::File(p)) => {
                let path = if p.is_relative() { base.join(&p) } else { p };
                let shown = path.display().to_string();
                let text = std::fs::read_to_string(&path).map_err(|source| JobError::Read {
                    file: format!("{file}: deepspeed {shown}"),
                    source,
                })?;
                serde_json::from_str(&text).map_err(|e| JobError::Parse {
                    file: format!("{file}: deepspeed {shown}"),
                    message: format!("{e} (expected a DeepSpeed JSON config object)"),
                })?
            }
        };
        let warnings = deepspeed::apply(self, &config, file)?;
        self.deepspeed = Some(deepspeed::DeepSpeed::Config(config));
        self.validate(file)?;
        Ok(warnings)
    }

    /// Read, parse and validate a job file. Relative paths inside the job are resolved against
    /// the current directory, as `torchrun train.py --data_path ...` would.
    pub fn from_file(path: &Path) -> Result<Self, JobError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| JobError::Read {
            file: file.clone(),
            source,
        })?;
        Self::from_yaml_str(&text, &file)
    }

    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("a JobSpec always serializes")
    }

    /// Examples consumed by one optimizer step across all ranks.
    pub fn global_batch_size(&self) -> usize {
        self.per_device_train_batch_size * self.gradient_accumulation_steps * self.world_size
    }

    /// HF's `TrainingArguments.get_warmup_steps`: `warmup_steps` ≥ 1 is a count (its integer
    /// part), one in (0, 1) a ratio of the total rounded up (5.x); without it `warmup_ratio`
    /// (4.x, where steps win over the ratio).
    pub fn warmup_steps_for(&self, total_steps: u64) -> u64 {
        let ratio = |r: f64| (total_steps as f64 * r).ceil() as u64;
        if self.warmup_steps >= 1.0 {
            self.warmup_steps as u64
        } else if self.warmup_steps > 0.0 {
            ratio(self.warmup_steps)
        } else {
            ratio(self.warmup_ratio)
        }
    }

    /// Resolve the job's relative paths against `base` (the directory the job was submitted from).
    pub fn resolve_paths(&mut self, base: &Path) {
        for p in self.data_path.paths_mut() {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        for p in [&mut self.model_name_or_path, &mut self.output_dir] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(t) = self.eval_data_path.as_mut() {
            if t.is_relative() {
                *t = base.join(&*t);
            }
        }
        if let Some(t) = self.tokenizer_name.as_mut() {
            if t.is_relative() {
                *t = base.join(&*t);
            }
        }
    }
}

mod cadence;
mod data_path;
pub mod deepspeed;
pub mod from_command;
mod schedule;
mod unknown_keys;
mod validate;

pub use cadence::{EvalStrategy, LoggingStrategy, SaveStrategy, StepCount};
pub use data_path::{DataEntry, DataFile, DataFormat, DataPath};
pub use schedule::{SchedulerKwargs, SchedulerType, WsdCurve};
#[cfg(test)]
mod tests;
