//! A job file from the command a user runs today: `torchrun --nproc_per_node=16 train.py
//! --model_name_or_path ... --deepspeed ds_config.json` (or `python -m torch.distributed.run`,
//! `deepspeed --num_gpus`, `accelerate launch`, plain `python train.py`). The launcher gives
//! `world_size` (nodes × processes per node); the script's flags are HF `TrainingArguments`
//! and Alpaca `train.py` arguments, which are the job's own key names. Flags herd has no use
//! for (rendezvous ports, `--tf32`, `--report_to` …) become notes saying why; a flag it does
//! not know is an error naming it, never a silent drop. Pure: the caller prints the result.

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
        "a job resumes from output_dir's newest complete checkpoint",
    ),
    (
        "resume_from_checkpoint",
        "a job resumes from output_dir's newest complete checkpoint",
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

/// Keys a job cannot do without.
const REQUIRED: &[&str] = &["model_name_or_path", "data_path", "output_dir"];

/// AdamW as HF names its implementations; anything else is refused.
pub(super) const ADAMW: &[&str] = &[
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_hf",
    "adamw_apex_fused",
];

/// Reads `command` (its words, as the shell split them; leading `VAR=value` words allowed).
pub fn convert(command: &[String]) -> Result<Converted, String> {
    let mut notes = Vec::new();
    let mut words = command;
    while let Some((env, rest)) = words.split_first().filter(|(w, _)| is_env(w)) {
        notes.push(format!(
            "{env}: the environment is the worker's, set it there"
        ));
        words = rest;
    }
    let (world, script_args) = launcher(words, &mut notes)?;
    let mut job = Mapping::new();
    job.insert("world_size".into(), Value::from(world as u64));
    let keys = job_keys();
    let mut unknown = Vec::new();
    for (flag, values) in flags(script_args)? {
        let key = match ALIASES.iter().find(|(from, _)| *from == flag) {
            Some((from, to)) => {
                notes.push(format!("--{from}: as {to}"));
                *to
            }
            None => flag.as_str(),
        };
        if let Some((_, why)) = NOT_NEEDED.iter().find(|(k, _)| *k == key) {
            notes.push(format!("--{key}: not needed, {why}"));
            continue;
        }
        match key {
            "fsdp" => {
                let v = values.join(" ");
                if v.contains("full_shard")
                    || v.contains("shard_grad_op")
                    || v.contains("hybrid_shard")
                {
                    notes.push(format!(
                        "--fsdp {v:?}: as `zero_stage: 2` (optimizer state and gradients sharded; \
                         full_shard also shards the parameters, which herd does not)"
                    ));
                    job.insert("zero_stage".into(), 2.into());
                }
                continue;
            }
            "model_type" => {
                let v = values.join(" ");
                if v != "llama" {
                    return Err(format!(
                        "--model_type {v}: herd trains LLaMA-family models (config.json's \
                         model_type llama)"
                    ));
                }
                continue;
            }
            "data" => {
                return Err(format!(
                    "--data {}: herd reads data files, it downloads nothing: give --data_path \
                     FILE (Alpaca or ShareGPT JSON/JSONL; several as a list in the job file)",
                    values.join(" ")
                ))
            }
            "optim" => {
                let v = values.join(" ");
                if !ADAMW.contains(&v.as_str()) {
                    return Err(format!(
                        "--optim {v}: herd trains with AdamW ({}); use one of those",
                        ADAMW.join(", ")
                    ));
                }
                notes.push(format!("--optim {v}: herd's fused AdamW"));
                continue;
            }
            _ => {}
        }
        if !keys.iter().any(|k| k == key) {
            unknown.push(format!("--{key}"));
            continue;
        }
        job.insert(key.into(), value(key, &values)?);
    }
    if !unknown.is_empty() {
        return Err(format!(
            "not a TrainingArguments or train.py flag herd knows: {} (the job keys are listed \
             in the README)",
            unknown.join(", ")
        ));
    }
    let missing: Vec<String> = REQUIRED
        .iter()
        .filter(|k| !job.contains_key(**k))
        .map(|k| format!("--{k}"))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "the command gives no {}: a job needs them (add them to the command, or to the \
             job file)",
            missing.join(", ")
        ));
    }
    let yaml = quote_yaml11_booleans(&serde_yaml::to_string(&job).map_err(|e| e.to_string())?);
    JobSpec::from_yaml_str(&yaml, "the converted job").map_err(|e| blame_flag(e, &job))?;
    Ok(Converted { yaml, notes })
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

/// World size from the launcher's options, and the script's words after it.
fn launcher<'a>(
    words: &'a [String],
    notes: &mut Vec<String>,
) -> Result<(usize, &'a [String]), String> {
    let Some(first) = words.first() else {
        return Err("no command given: pass the launch command after `--`".into());
    };
    let name = first.rsplit('/').next().unwrap_or(first);
    let (kind, rest) = if name == "torchrun" {
        (Launcher::Torchrun, &words[1..])
    } else if name == "deepspeed" {
        (Launcher::DeepSpeed, &words[1..])
    } else if name == "accelerate" && words.get(1).is_some_and(|w| w == "launch") {
        (Launcher::Accelerate, &words[2..])
    } else if name.starts_with("python") {
        match (
            words.get(1).map(String::as_str),
            words.get(2).map(String::as_str),
        ) {
            (Some("-m"), Some("torch.distributed.run" | "torch.distributed.launch")) => {
                (Launcher::Torchrun, &words[3..])
            }
            _ => (Launcher::Python, &words[1..]),
        }
    } else if name.ends_with(".py") {
        (Launcher::Python, words)
    } else {
        return Err(format!(
            "{first}: expected torchrun, python, deepspeed or accelerate launch, then the training script"
        ));
    };
    let (opts, script) = launcher_options(rest)?;
    let Some((script_name, script_args)) = script.split_first() else {
        return Err("the command names no training script".into());
    };
    let int = |k: &str, v: &str| {
        v.parse::<usize>().ok().filter(|n| *n > 0).ok_or_else(|| {
            format!("--{k} {v}: expected a number of processes (herd needs the count)")
        })
    };
    let mut per_node = 1;
    let mut nodes = 1;
    let mut total = None;
    for (k, v) in &opts {
        let v = v.as_deref().unwrap_or("");
        match (kind, k.as_str()) {
            (Launcher::Torchrun, "nproc_per_node") | (Launcher::DeepSpeed, "num_gpus") => {
                per_node = int(k, v)?
            }
            (Launcher::Torchrun, "nnodes") => {
                // An elastic range MIN:MAX: the job is sized for the most.
                let max = v.rsplit(':').next().unwrap_or(v);
                if max != v {
                    notes.push(format!("--nnodes {v}: world_size counts {max} nodes"));
                }
                nodes = int(k, max)?;
            }
            (Launcher::DeepSpeed, "num_nodes") | (Launcher::Accelerate, "num_machines") => {
                nodes = int(k, v)?
            }
            (Launcher::Accelerate, "num_processes") => total = Some(int(k, v)?),
            (Launcher::Torchrun, "max_restarts") => notes.push(format!(
                "--max_restarts {v}: herd's max_restarts is a job key; set it there"
            )),
            _ => notes.push(format!(
                "--{k}: the launcher's, not needed: herd's coordinator assigns ranks and rendezvous"
            )),
        }
    }
    if kind == Launcher::DeepSpeed && !opts.iter().any(|(k, _)| k == "num_gpus") {
        return Err("deepspeed without --num_gpus uses every GPU of its machine: say how many with --num_gpus N".into());
    }
    let world = total.unwrap_or(per_node * nodes);
    notes.push(format!(
        "{script_name}: its flags read as TrainingArguments and train.py arguments"
    ));
    Ok((world, script_args))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Launcher {
    Torchrun,
    DeepSpeed,
    Accelerate,
    Python,
}

/// Launcher options before the script: `--k v`, `--k=v`, or a flag alone.
type Opts = Vec<(String, Option<String>)>;

fn launcher_options(words: &[String]) -> Result<(Opts, &[String]), String> {
    const FLAGS: &[&str] = &[
        "standalone",
        "no_python",
        "module",
        "m",
        "run_path",
        "multi_gpu",
        "use_deepspeed",
        "use_fsdp",
        "cpu",
    ];
    let mut opts = Vec::new();
    let mut i = 0;
    while i < words.len() && words[i].starts_with('-') {
        let raw = words[i].trim_start_matches('-').replace('-', "_");
        if let Some((k, v)) = raw.split_once('=') {
            opts.push((k.to_string(), Some(v.to_string())));
        } else if FLAGS.contains(&raw.as_str()) {
            opts.push((raw, None));
        } else {
            let v = words
                .get(i + 1)
                .ok_or_else(|| format!("--{raw}: no value"))?;
            opts.push((raw, Some(v.clone())));
            i += 1;
        }
        i += 1;
    }
    Ok((opts, &words[i..]))
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

#[cfg(test)]
mod tests;
