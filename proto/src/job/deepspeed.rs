//! `deepspeed: ds_config.json`: the DeepSpeed config of `torchrun train.py --deepspeed ...`,
//! read the way HF Trainer reads it, so a recipe's config file moves over unchanged.
//!
//! HF Trainer fills every `"auto"` value from its own arguments and refuses a number that
//! disagrees with them (`HfTrainerDeepSpeedConfig.trainer_config_process`: batch sizes,
//! accumulation, clipping, the optimizer's lr/betas/eps/weight decay, fp16 and bf16); herd does
//! the same, so a config HF accepts with a job's arguments is accepted here with the same job.
//! `zero_optimization.stage` becomes `zero_stage`. What herd does not have is said, not
//! dropped silently: stage 3 runs as stage 2 (parameters whole on every rank), offload keeps
//! the state on the GPU, and DeepSpeed's tuning knobs are ignored (herd sizes its own buckets).
//! A `scheduler` section replaces `lr_scheduler_type`, as in HF Trainer: DeepSpeed's WarmupLR,
//! WarmupDecayLR and WarmupCosineLR are reproduced ([`scheduler`]).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::PathBuf;

use super::{JobError, JobSpec};

pub mod scheduler;

/// The job's `deepspeed` key: a file, or the config itself (what a file becomes once read, so
/// a stored job is self-contained).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DeepSpeed {
    File(PathBuf),
    Config(Map<String, Value>),
}

/// Top-level keys herd reads; any other is reported as ignored.
const READ: &[&str] = &[
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "optimizer",
    "scheduler",
    "fp16",
    "bf16",
    "bfloat16",
    "zero_optimization",
];
/// Keys that only shape DeepSpeed's own logging: ignored without a word.
const QUIET: &[&str] = &[
    "steps_per_print",
    "wall_clock_breakdown",
    "zero_allow_untested_optimizer",
];

/// Folds `config` into `spec` (see the module docs) and returns what herd does differently,
/// one sentence each. `file` names the job in errors. Applying it twice changes nothing more.
pub fn apply(
    spec: &mut JobSpec,
    config: &Map<String, Value>,
    file: &str,
) -> Result<Vec<String>, JobError> {
    let mut mismatches = Vec::new();
    let mut warnings = Vec::new();
    let mut check = |key: &str, ours: Value, what: &str| match lookup(config, key) {
        None => {}
        Some(Value::String(s)) if s == "auto" => {}
        Some(v) if same(v, &ours) => {}
        Some(v) => mismatches.push(format!("`{key}` is {v} but the job's {what} is {ours}")),
    };
    let world = spec.world_size;
    let (micro, accum) = (
        spec.per_device_train_batch_size,
        spec.gradient_accumulation_steps,
    );
    check(
        "train_micro_batch_size_per_gpu",
        micro.into(),
        "per_device_train_batch_size",
    );
    check(
        "gradient_accumulation_steps",
        accum.into(),
        "gradient_accumulation_steps",
    );
    check(
        "train_batch_size",
        (world * micro * accum).into(),
        &format!(
            "world_size × per_device_train_batch_size × gradient_accumulation_steps ({world} × {micro} × {accum})"
        ),
    );
    check(
        "gradient_clipping",
        spec.max_grad_norm.into(),
        "max_grad_norm",
    );
    check(
        "optimizer.params.lr",
        spec.learning_rate.into(),
        "learning_rate",
    );
    check(
        "optimizer.params.betas",
        Value::from(vec![spec.adam_beta1, spec.adam_beta2]),
        "[adam_beta1, adam_beta2]",
    );
    check(
        "optimizer.params.eps",
        spec.adam_epsilon.into(),
        "adam_epsilon",
    );
    check(
        "optimizer.params.weight_decay",
        spec.weight_decay.into(),
        "weight_decay",
    );
    check("fp16.enabled", spec.fp16.into(), "fp16");
    check("bf16.enabled", spec.bf16.into(), "bf16");
    check("bfloat16.enabled", spec.bf16.into(), "bf16");

    if let Some(opt) = config.get("optimizer") {
        let kind = opt.get("type").and_then(Value::as_str).unwrap_or("");
        let adamw_mode = opt
            .pointer("/params/adam_w_mode")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let adamw =
            kind.eq_ignore_ascii_case("adamw") || (kind.eq_ignore_ascii_case("adam") && adamw_mode);
        if !adamw {
            mismatches.push(format!(
                "`optimizer.type` is {} but herd trains with AdamW (decoupled weight decay, as \
                 HF Trainer's default): use \"AdamW\", or leave the optimizer section out",
                opt.get("type").unwrap_or(&Value::Null)
            ));
        }
    }
    if let Some(section) = config.get("scheduler") {
        match scheduler::read(section, spec.learning_rate) {
            Ok(s) => warnings.push(format!(
                "the learning rate follows DeepSpeed's {} from the scheduler section, as in HF \
                 Trainer; lr_scheduler_type ({}) is not used",
                s.kind.as_str(),
                spec.lr_scheduler_type.as_str()
            )),
            Err(errors) => mismatches.extend(errors),
        }
    }

    let zero = config.get("zero_optimization");
    let stage = match zero.map(|z| z.get("stage").unwrap_or(&Value::Null)) {
        None | Some(Value::Null) => Some(0),
        Some(v) => v.as_u64().filter(|s| *s <= 3),
    };
    match stage {
        None => mismatches.push(format!(
            "`zero_optimization.stage` is {} but DeepSpeed's stages are 0, 1, 2 and 3",
            zero.and_then(|z| z.get("stage")).unwrap_or(&Value::Null)
        )),
        Some(stage) => {
            let ours = stage.min(2) as u8;
            if spec.zero_stage != 0 && spec.zero_stage != ours {
                mismatches.push(format!(
                    "`zero_optimization.stage` is {stage} but the job's zero_stage is {}",
                    spec.zero_stage
                ));
            } else {
                spec.zero_stage = ours;
            }
            if stage == 3 {
                warnings.push(
                    "ZeRO stage 3 (sharded parameters) is not built: the job runs as stage 2, \
                     with the optimizer state and gradients sharded and the parameters whole \
                     on every rank"
                        .to_string(),
                );
            }
        }
    }
    for what in ["offload_optimizer", "offload_param"] {
        let device = zero.and_then(|z| z.pointer(&format!("/{what}/device")));
        if let Some(d) = device.and_then(Value::as_str).filter(|d| *d != "none") {
            warnings.push(format!(
                "zero_optimization.{what} to {d} is not supported: that state stays in GPU memory"
            ));
        }
    }

    let mut ignored: Vec<String> = config
        .keys()
        .filter(|k| !READ.contains(&k.as_str()) && !QUIET.contains(&k.as_str()))
        .cloned()
        .collect();
    if let Some(Value::Object(z)) = zero {
        ignored.extend(
            z.keys()
                .filter(|k| !["stage", "offload_optimizer", "offload_param"].contains(&k.as_str()))
                .map(|k| format!("zero_optimization.{k}")),
        );
    }
    if !ignored.is_empty() {
        warnings.push(format!(
            "ignored (herd sizes its own buckets and has no such setting): {}",
            ignored.join(", ")
        ));
    }

    if mismatches.is_empty() {
        Ok(warnings)
    } else {
        Err(JobError::Invalid {
            file: file.to_string(),
            key: "deepspeed",
            reason: format!(
                "the DeepSpeed config disagrees with the job (as HF Trainer, herd takes \"auto\" \
                 or the job's own value): {}",
                mismatches.join("; ")
            ),
        })
    }
}

/// The DeepSpeed schedule `spec` trains with, if its inline DeepSpeed config has a `scheduler`
/// section (read by [`apply`] already, so an error here means the config changed since).
pub fn scheduler_of(spec: &JobSpec) -> Result<Option<scheduler::DsScheduler>, JobError> {
    let Some(DeepSpeed::Config(config)) = &spec.deepspeed else {
        return Ok(None);
    };
    let Some(section) = config.get("scheduler") else {
        return Ok(None);
    };
    scheduler::read(section, spec.learning_rate)
        .map(Some)
        .map_err(|errors| JobError::Invalid {
            file: spec.source.to_string(),
            key: "deepspeed",
            reason: errors.join("; "),
        })
}

/// Whether the job's DeepSpeed config has an `optimizer` section. HF Trainer then hands
/// DeepSpeed all trainable parameters as one group (`DummyOptim(params=model_parameters)`), so
/// weight decay applies to every parameter, norms and biases too, rather than HF's own two
/// groups.
pub fn has_optimizer(spec: &JobSpec) -> bool {
    matches!(&spec.deepspeed, Some(DeepSpeed::Config(c)) if c.contains_key("optimizer"))
}

/// `a.b.c` in `config`.
fn lookup<'a>(config: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    let (first, rest) = key.split_once('.').unwrap_or((key, ""));
    let v = config.get(first)?;
    if rest.is_empty() {
        Some(v)
    } else {
        v.pointer(&format!("/{}", rest.replace('.', "/")))
    }
}

/// Equal as JSON, numbers by value (64 and 64.0 agree, as Python's `!=` has them).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same(p, q))
        }
        _ => a == b,
    }
}

#[cfg(test)]
mod tests;
