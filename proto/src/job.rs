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

/// How a data file's records are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// Decided by the first record's keys: `conversations` → ShareGPT, `instruction` → Alpaca.
    #[default]
    Auto,
    /// `{instruction, input?, output}` (Alpaca's train.py).
    Alpaca,
    /// `{id?, conversations: [{from, value}, ...]}` (ShareGPT / Vicuna).
    Sharegpt,
}

impl DataFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DataFormat::Auto => "auto",
            DataFormat::Alpaca => "alpaca",
            DataFormat::Sharegpt => "sharegpt",
        }
    }
}

fn d_weight() -> f64 {
    1.0
}

/// One file of a data mixture with its weight and format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataFile {
    pub path: PathBuf,
    /// Take round(weight × usable records) examples: < 1 subsamples, > 1 repeats.
    #[serde(default = "d_weight")]
    pub weight: f64,
    #[serde(default)]
    pub format: DataFormat,
}

impl DataFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        DataFile {
            path: path.into(),
            weight: 1.0,
            format: DataFormat::Auto,
        }
    }
}

/// An entry of a `data_path` list: a bare path (weight 1, format auto) or a map.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum DataEntry {
    Path(PathBuf),
    File(DataFile),
}

/// `data_path`: one path (as train.py's `--data_path`) or a list of entries mixed into one
/// training set. Kept as written so that [`JobSpec::to_yaml`] round-trips.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum DataPath {
    Single(PathBuf),
    List(Vec<DataEntry>),
}

impl DataPath {
    /// The files with defaults filled in, in order.
    pub fn files(&self) -> Vec<DataFile> {
        match self {
            DataPath::Single(p) => vec![DataFile::new(p.clone())],
            DataPath::List(v) => v
                .iter()
                .map(|e| match e {
                    DataEntry::Path(p) => DataFile::new(p.clone()),
                    DataEntry::File(f) => f.clone(),
                })
                .collect(),
        }
    }

    pub fn paths(&self) -> Vec<&Path> {
        match self {
            DataPath::Single(p) => vec![p.as_path()],
            DataPath::List(v) => v
                .iter()
                .map(|e| match e {
                    DataEntry::Path(p) => p.as_path(),
                    DataEntry::File(f) => f.path.as_path(),
                })
                .collect(),
        }
    }

    pub fn paths_mut(&mut self) -> Vec<&mut PathBuf> {
        match self {
            DataPath::Single(p) => vec![p],
            DataPath::List(v) => v
                .iter_mut()
                .map(|e| match e {
                    DataEntry::Path(p) => p,
                    DataEntry::File(f) => &mut f.path,
                })
                .collect(),
        }
    }

    /// Value checks: at least one file, weights finite and > 0.
    pub fn check(&self) -> Result<(), String> {
        let files = self.files();
        if files.is_empty() {
            return Err("the list names no file".into());
        }
        for (i, f) in files.iter().enumerate() {
            if !(f.weight.is_finite() && f.weight > 0.0) {
                return Err(format!(
                    "entry {} ({}): weight must be a number > 0, got {}",
                    i + 1,
                    f.path.display(),
                    f.weight
                ));
            }
        }
        Ok(())
    }
}

impl From<PathBuf> for DataPath {
    fn from(p: PathBuf) -> Self {
        DataPath::Single(p)
    }
}

impl From<&str> for DataPath {
    fn from(p: &str) -> Self {
        DataPath::Single(p.into())
    }
}

impl std::fmt::Display for DataPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let paths: Vec<String> = self
            .paths()
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        write!(f, "{}", paths.join(", "))
    }
}

// Hand-written so that errors inside a map entry (unknown key, wrong type) keep serde_yaml's
// message and position instead of "did not match any variant".
impl<'de> Deserialize<'de> for DataEntry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = DataEntry;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a path or a map {path, weight, format}")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<DataEntry, E> {
                Ok(DataEntry::Path(v.into()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, m: A) -> Result<DataEntry, A::Error> {
                DataFile::deserialize(serde::de::value::MapAccessDeserializer::new(m))
                    .map(DataEntry::File)
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for DataPath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = DataPath;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a path or a list of paths / {path, weight, format} maps")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<DataPath, E> {
                Ok(DataPath::Single(v.into()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut s: A,
            ) -> Result<DataPath, A::Error> {
                let mut out = Vec::new();
                while let Some(e) = s.next_element::<DataEntry>()? {
                    out.push(e);
                }
                Ok(DataPath::List(out))
            }
        }
        d.deserialize_any(V)
    }
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
    #[serde(default)]
    pub warmup_ratio: f64,
    #[serde(default)]
    pub warmup_steps: u64,
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
    /// Held-out data for `eval_strategy: steps` (same formats as `data_path`).
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
    /// Train in bf16 with f32 master weights (GPU workers); the final model is written in bf16.
    #[serde(default)]
    pub bf16: bool,
    #[serde(default)]
    pub fp16: bool,
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
        let mut spec: JobSpec = serde_yaml::from_str(text).map_err(|e| JobError::Parse {
            file: file.to_string(),
            message: e.to_string(),
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

    /// Examples consumed by one optimizer step across all ranks.
    pub fn global_batch_size(&self) -> usize {
        self.per_device_train_batch_size * self.gradient_accumulation_steps * self.world_size
    }

    /// HF's `TrainingArguments.get_warmup_steps`.
    pub fn warmup_steps_for(&self, total_steps: u64) -> u64 {
        if self.warmup_steps > 0 {
            self.warmup_steps
        } else {
            (total_steps as f64 * self.warmup_ratio).ceil() as u64
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
pub mod deepspeed;
pub mod from_command;
mod schedule;

pub use cadence::{EvalStrategy, LoggingStrategy, SaveStrategy, StepCount};
pub use schedule::{SchedulerKwargs, SchedulerType, WsdCurve};
#[cfg(test)]
mod tests;
