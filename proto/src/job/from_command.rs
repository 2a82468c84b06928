//! A job file from the command a user runs today: `torchrun --nproc_per_node=16 train.py
//! --model_name_or_path ... --deepspeed ds_config.json` (or `python -m torch.distributed.run` /
//! `.launch`, `deepspeed`, `accelerate launch`, plain `python train.py`, or alpaca-lora's
//! `finetune.py`). The launcher gives `world_size` as it would count its processes (a DeepSpeed
//! hostfile and an accelerate config file are read through [`Files`], so the conversion stays
//! pure), and accelerate's settings give `bf16` and `zero_stage`; the script's flags are HF
//! `TrainingArguments` and Alpaca `train.py` arguments, which are the job's own key names
//! (finetune.py's are its own, with its defaults). Flags herd has no use for
//! (rendezvous ports, `--tf32`, `--report_to` …) become notes saying why, and a flag whose
//! outcome herd does not match gets a note saying so plainly; a flag it does not know is an
//! error naming it, never a silent drop, and every refusal is reported at once. Pure: the caller
//! prints the result.

use serde_yaml::{Mapping, Value};

use super::JobSpec;

/// The job file and what was left out of it (one sentence each).
#[derive(Debug, Clone, PartialEq)]
pub struct Converted {
    pub yaml: String,
    pub notes: Vec<String>,
}

/// Keys whose values stay strings whatever they look like (paths, names, enum values).
const STRINGS: &[&str] = &[
    "model_name_or_path",
    "data_path",
    "output_dir",
    "tokenizer_name",
    "eval_data_path",
    "deepspeed",
    "lr_scheduler_type",
    "save_strategy",
    "logging_strategy",
    "metric_for_best_model",
    "eval_strategy",
    "evaluation_strategy",
    "task",
];

/// HF flags with no herd key, and why they need none.
pub(super) const NOT_NEEDED: &[(&str, &str)] = &[
    (
        "tf32",
        "GPU ranks compute in bf16 with f32 accumulation; no TF32 switch",
    ),
    (
        "fsdp_transformer_layer_cls_to_wrap",
        "herd shards by ZeRO stage, not by module wrapping",
    ),
    (
        "fsdp_config",
        "herd shards by ZeRO stage, not by module wrapping",
    ),
    (
        "report_to",
        "herd reports through `herd status` and trainer_state.json",
    ),
    ("run_name", "the job id names the run"),
    (
        "logging_dir",
        "logs go to trainer_state.json in output_dir and the worker logs",
    ),
    (
        "lazy_preprocess",
        "herd tokenizes each record once, when its batch is built",
    ),
    (
        "dataloader_num_workers",
        "batches are built in the trainer thread",
    ),
    (
        "dataloader_pin_memory",
        "batches are built in the trainer thread",
    ),
    ("remove_unused_columns", "records are read by field name"),
    (
        "ddp_find_unused_parameters",
        "every trained parameter gets a gradient",
    ),
    (
        "ddp_timeout",
        "a hung rank is found by the coordinator's heartbeats",
    ),
    ("do_train", "a job trains"),
    ("do_eval", "evaluation is eval_strategy"),
    (
        "overwrite_output_dir",
        "herd never overwrites: a job resumes from output_dir's newest complete checkpoint, so \
         a new output_dir starts fresh",
    ),
    (
        "resume_from_checkpoint",
        "a job resumes from output_dir's newest complete checkpoint, and from no other \
         (copy another into output_dir to resume from it)",
    ),
    ("cache_dir", "nothing is downloaded"),
    ("local_rank", "the coordinator assigns ranks"),
    ("disable_tqdm", "`herd train --no-progress`"),
    ("save_safetensors", "herd always writes safetensors"),
    (
        "group_by_length",
        "`packing: true` removes the padding instead",
    ),
    ("bf16_full_eval", "evaluation runs in the training dtype"),
    ("fp16_full_eval", "evaluation runs in the training dtype"),
    (
        "gradient_checkpointing_kwargs",
        "herd's recompute has one form (no reentrant variants); gradient_checkpointing turns \
         it on",
    ),
    (
        "torch_compile",
        "herd has no torch.compile: its kernels are built ahead of time",
    ),
    (
        "torch_compile_backend",
        "herd has no torch.compile: its kernels are built ahead of time",
    ),
    (
        "torch_compile_mode",
        "herd has no torch.compile: its kernels are built ahead of time",
    ),
    (
        "save_on_each_node",
        "checkpoints are written once, into output_dir, not once per node",
    ),
    (
        "ddp_backend",
        "herd picks the collective: NCCL between GPU ranks, its TCP ring between CPU ranks",
    ),
    (
        "log_level",
        "`herd --log FILTER` (or RUST_LOG) sets what each process logs",
    ),
    (
        "log_level_replica",
        "`herd --log FILTER` (or RUST_LOG) sets what each process logs",
    ),
    (
        "log_on_each_node",
        "`herd --log FILTER` (or RUST_LOG) sets what each process logs",
    ),
];

/// Other scripts' names for job keys: HF's deprecated `per_gpu_*`, Alpaca-CoT's
/// uniform_finetune.py and Alpaca-LoRA's finetune.py.
pub(super) const ALIASES: &[(&str, &str)] = &[
    ("per_gpu_train_batch_size", "per_device_train_batch_size"),
    ("per_gpu_eval_batch_size", "per_device_eval_batch_size"),
    ("epochs", "num_train_epochs"),
    ("num_epochs", "num_train_epochs"),
    ("base_model", "model_name_or_path"),
    ("micro_batch_size", "per_device_train_batch_size"),
    ("cutoff_len", "model_max_length"),
];

/// What herd does instead of fp16 mixed precision.
const FP16: &str = "herd has no fp16 training: GPU ranks compute in bf16 either way (CPU ranks \
                    in f32), and the final model is written in f32 unless `bf16: true`";

/// Keys a job cannot do without.
const REQUIRED: &[&str] = &["model_name_or_path", "data_path", "output_dir"];

/// AdamW as HF names its implementations; anything else is refused.
pub(super) const ADAMW: &[&str] = &[
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_hf",
    "adamw_apex_fused",
    "paged_adamw_32bit",
];

/// What the conversion may read besides the command: the files it names (a DeepSpeed
/// hostfile, an accelerate config), which change the number of ranks. The caller (the CLI)
/// reads them; `convert` reads none, so it stays pure.
pub trait Files {
    /// The text of `path` as the command gives it (relative to where it runs), or why not.
    fn read(&self, path: &str) -> Result<String, String>;
    /// Where `accelerate launch` finds its default config file when given no --config_file
    /// (~/.cache/huggingface/accelerate/default_config.yaml, or under $HF_HOME).
    fn accelerate_default_config(&self) -> Option<String> {
        None
    }
}

/// No files: a command that needs one to count its ranks is refused with what to do instead.
pub struct NoFiles;

impl Files for NoFiles {
    fn read(&self, _: &str) -> Result<String, String> {
        Err("no file is read here".into())
    }
}

/// Reads `command` (its words, as the shell split them; leading `VAR=value` words allowed),
/// reading no file.
pub fn convert(command: &[String]) -> Result<Converted, String> {
    convert_with(command, &NoFiles)
}

/// [`convert`], with the hostfile or accelerate config the command names read through `files`.
/// Every refusal is reported at once, one line each.
pub fn convert_with(command: &[String], files: &dyn Files) -> Result<Converted, String> {
    let mut notes = Vec::new();
    let mut errors = Vec::new();
    let mut words = command;
    let mut env = Vec::new();
    while let Some((word, rest)) = words.split_first().filter(|(w, _)| is_env(w)) {
        let (k, v) = word.split_once('=').expect("is_env");
        notes.push(format!(
            "{}: the environment is the worker's, set it there",
            redact_env(word)
        ));
        env.push((k.to_string(), v.to_string()));
        words = rest;
    }
    let launch = launcher::read(words, &env, files, &mut notes, &mut errors)?;
    let mut job = Mapping::new();
    job.insert("world_size".into(), Value::from(launch.world as u64));
    for (k, v) in launch.keys {
        job.insert(k.into(), v);
    }
    match flags(launch.args) {
        Err(e) => errors.push(e),
        Ok(flags) if finetune::is_finetune(launch.script, &flags) => {
            notes.push(format!(
                "{}: read as tloen/alpaca-lora's finetune.py: its arguments, with its defaults \
                 (not HF TrainingArguments')",
                launch.script
            ));
            finetune::read(launch.world, flags, &mut job, &mut notes, &mut errors);
        }
        Ok(flags) => {
            notes.push(format!(
                "{}: its flags read as TrainingArguments and train.py arguments",
                launch.script
            ));
            script::read(flags, &mut job, &mut notes, &mut errors);
        }
    }
    let missing: Vec<String> = REQUIRED
        .iter()
        .filter(|k| !job.contains_key(**k))
        .map(|k| format!("--{k}"))
        .collect();
    if !missing.is_empty() {
        errors.push(format!(
            "the command gives no {}: a job needs them (add them to the command, or to the \
             job file)",
            missing.join(", ")
        ));
    }
    if !errors.is_empty() {
        return Err(errors.join("\n"));
    }
    let yaml = quote_yaml11_booleans(&serde_yaml::to_string(&job).map_err(|e| e.to_string())?);
    JobSpec::from_yaml_str(&yaml, "the converted job").map_err(|e| blame_flag(e, &job))?;
    Ok(Converted { yaml, notes })
}

/// Flags whose value is a secret: never repeated in a note or in the job file's header.
const SECRET_FLAGS: &[&str] = &["hub_token", "aws_access_key_id", "aws_secret_access_key"];

/// `command` as it may be shown: the values of token flags (`--hub_token`) and of secret-looking
/// environment words (`HF_TOKEN=…`) replaced by `…`.
pub fn redacted(command: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(command.len());
    let mut hide_next = false;
    for w in command {
        if std::mem::take(&mut hide_next) {
            out.push("…".to_string());
            continue;
        }
        let name = w.trim_start_matches('-').replace('-', "_");
        match name.split_once('=') {
            Some((k, _)) if w.starts_with('-') && SECRET_FLAGS.contains(&k) => {
                out.push(format!("{}=…", w.split_once('=').expect("has =").0))
            }
            None if w.starts_with('-') && SECRET_FLAGS.contains(&name.as_str()) => {
                hide_next = true;
                out.push(w.clone());
            }
            _ if is_env(w) => out.push(redact_env(w)),
            _ => out.push(w.clone()),
        }
    }
    out
}

fn redact_env(word: &str) -> String {
    let (k, _) = word.split_once('=').unwrap_or((word, ""));
    let secret = ["TOKEN", "KEY", "SECRET", "PASSWORD"]
        .iter()
        .any(|s| k.contains(s));
    match secret {
        true => format!("{k}=…"),
        false => word.to_string(),
    }
}

/// A refusal of the converted job told in terms of the command's flag, not of a file the user
/// never sees: `--learning_rate: invalid type: boolean ...` rather than `the converted job:
/// learning_rate: ... at line 5 column 16`.
fn blame_flag(e: super::JobError, job: &Mapping) -> String {
    use super::JobError;
    let (key, what) = match &e {
        JobError::Invalid { key, reason, .. } => (key.to_string(), reason.clone()),
        JobError::Parse { message, .. } => match message.split_once(": ") {
            Some((key, rest)) if job.contains_key(key) => {
                let rest = rest.split(" at line ").next().unwrap_or(rest);
                (key.to_string(), rest.to_string())
            }
            _ => return e.to_string(),
        },
        JobError::Read { .. } => return e.to_string(),
    };
    let bare = matches!(job.get(key.as_str()), Some(Value::Bool(true)));
    let hint = match bare {
        true => " (a flag given without a value reads as true)",
        false => "",
    };
    format!("--{key}: {what}{hint}")
}

/// serde_yaml writes the string `no` bare (`save_strategy: no`), which YAML 1.2 reads as a string
/// but YAML 1.1 readers (PyYAML, so most Python tools) read as false: such top-level values are
/// quoted, so the job means the same to every reader.
fn quote_yaml11_booleans(yaml: &str) -> String {
    const WORDS: &[&str] = &["y", "yes", "n", "no", "on", "off"];
    yaml.lines()
        .map(|line| match line.split_once(": ") {
            Some((key, value))
                if !key.starts_with([' ', '-', '#'])
                    && WORDS.contains(&value.to_ascii_lowercase().as_str()) =>
            {
                format!("{key}: '{value}'\n")
            }
            _ => format!("{line}\n"),
        })
        .collect()
}

fn is_env(word: &str) -> bool {
    word.split_once('=').is_some_and(|(k, _)| {
        !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
    })
}

/// The script's `--key value…`, `--key=value` and bare `--flag` (true), in order.
fn flags(words: &[String]) -> Result<Vec<(String, Vec<String>)>, String> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for w in words {
        if let Some(name) = w.strip_prefix("--") {
            match name.split_once('=') {
                Some((k, v)) => out.push((k.replace('-', "_"), vec![v.to_string()])),
                None => out.push((name.replace('-', "_"), vec![])),
            }
        } else if let Some((_, values)) = out.last_mut() {
            values.push(w.clone());
        } else {
            return Err(format!("{w}: expected a --flag of the training script"));
        }
    }
    Ok(out)
}

/// A flag's value as the job key's YAML: strings for paths and names, a list for several
/// values, else YAML's reading (numbers, HF's True/False); a bare flag is true.
fn value(key: &str, values: &[String]) -> Result<Value, String> {
    match values {
        [] => Ok(Value::Bool(true)),
        [v] if STRINGS.contains(&key) => Ok(Value::String(v.clone())),
        [v] if key == "lora_target_modules" => Ok(Value::Sequence(
            v.trim_matches(|c| c == '[' || c == ']')
                .split(',')
                .map(|s| {
                    Value::String(s.trim().trim_matches(|c| c == '\'' || c == '"').to_string())
                })
                .filter(|s| s.as_str() != Some(""))
                .collect(),
        )),
        [v] if v == "None" => Ok(Value::Null),
        [v] => Ok(serde_yaml::from_str(v).unwrap_or_else(|_| Value::String(v.clone()))),
        many if key == "lora_target_modules" || key == "data_path" => Ok(Value::Sequence(
            many.iter().cloned().map(Value::String).collect(),
        )),
        many => Err(format!(
            "--{key}: one value expected, got {}",
            many.join(" ")
        )),
    }
}

/// The job file's keys (and HF's alias for one of them).
pub(super) fn job_keys() -> Vec<String> {
    let min = JobSpec::from_yaml_str(
        "model_name_or_path: m\ndata_path: d\noutput_dir: o\n",
        "keys",
    )
    .expect("the minimal job is valid");
    let mut keys: Vec<String> = match serde_yaml::to_value(&min) {
        Ok(Value::Mapping(m)) => m
            .keys()
            .filter_map(|k| k.as_str().map(str::to_string))
            .collect(),
        _ => vec![],
    };
    keys.extend(["deepspeed", "evaluation_strategy"].map(String::from));
    keys
}

mod accelerate;
mod finetune;
mod hostfile;
mod launcher;
mod options;
mod script;
#[cfg(test)]
mod tests;
