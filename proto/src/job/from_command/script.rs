//! The training script's flags (HF `TrainingArguments` and Alpaca `train.py` arguments) as job
//! keys, notes, or refusals. Each note says what herd does; where that differs from what the
//! flag does under HF Trainer, it says so plainly.

use serde_yaml::{Mapping, Value};
use std::path::{Component, Path};

use super::{job_keys, value, ADAMW, ALIASES, NOT_NEEDED, SECRET_FLAGS};

/// What herd does where the flag asks for something it does not do, or does differently. Not
/// "not needed": each changes what the user gets.
const DIFFERS: &[(&str, &str)] = &[
    (
        "auto_find_batch_size",
        "herd does not retry with a smaller batch on out-of-memory: the job runs with \
         per_device_train_batch_size as given and fails if it does not fit",
    ),
    (
        "optim_args",
        "not read: herd's AdamW takes adam_beta1, adam_beta2, adam_epsilon and weight_decay; \
         set those",
    ),
    (
        "push_to_hub",
        "nothing is uploaded: the model is written to output_dir only; upload it yourself \
         (`huggingface-cli upload REPO OUTPUT_DIR`)",
    ),
    ("hub_model_id", "nothing is uploaded (see --push_to_hub)"),
    ("hub_token", "nothing is uploaded (see --push_to_hub)"),
    ("hub_strategy", "nothing is uploaded (see --push_to_hub)"),
    (
        "hub_private_repo",
        "nothing is uploaded (see --push_to_hub)",
    ),
    ("hub_always_push", "nothing is uploaded (see --push_to_hub)"),
];

/// Reads the script's flags into `job`; what it cannot take goes to `errors`, all of it.
pub(super) fn read(
    flags: Vec<(String, Vec<String>)>,
    job: &mut Mapping,
    notes: &mut Vec<String>,
    errors: &mut Vec<String>,
) {
    let keys = job_keys();
    let mut unknown = Vec::new();
    let mut resume = None;
    let mut data_seed = None;
    for (flag, values) in flags {
        let key = match ALIASES.iter().find(|(from, _)| *from == flag) {
            Some((from, to)) => {
                notes.push(format!("--{from}: as {to}"));
                *to
            }
            None => flag.as_str(),
        };
        let v = values.join(" ");
        let on = !matches!(
            v.to_ascii_lowercase().as_str(),
            "false" | "no" | "0" | "none"
        );
        // A secret is not repeated (the notes go into the job file).
        let shown = match SECRET_FLAGS.contains(&key) || v.is_empty() {
            true => format!("--{key}"),
            false => format!("--{key} {v}"),
        };
        if let Some((_, what)) = DIFFERS.iter().find(|(k, _)| *k == key) {
            notes.push(format!("--{key}: {what}"));
            continue;
        }
        match key {
            "resume_from_checkpoint" => {
                resume = Some(v);
                continue;
            }
            "overwrite_output_dir" if !on => {
                notes.push(format!(
                    "{shown}: not needed, herd never overwrites output_dir"
                ));
                continue;
            }
            "overwrite_output_dir" => {
                notes.push(format!(
                    "{shown}: herd never overwrites: a job resumes from output_dir's newest \
                     complete checkpoint, so give a new output_dir to start fresh"
                ));
                continue;
            }
            "fsdp" => {
                fsdp(&v, job, notes, errors);
                continue;
            }
            "model_type" => {
                if v != "llama" {
                    errors.push(format!(
                        "--model_type {v}: herd trains LLaMA-family models (config.json's \
                         model_type llama)"
                    ));
                }
                continue;
            }
            "data" => {
                errors.push(format!(
                    "--data {v}: herd reads data files, it downloads nothing: give --data_path \
                     FILE (Alpaca or ShareGPT JSON/JSONL; several as a list in the job file)"
                ));
                continue;
            }
            "optim" => {
                match v.as_str() {
                    "paged_adamw_32bit" => notes.push(format!(
                        "--optim {v}: AdamW, as herd's fused AdamW (32-bit state, as \
                         bitsandbytes' paged AdamW keeps it), with no paged memory: the \
                         optimizer state stays in GPU memory"
                    )),
                    _ if ADAMW.contains(&v.as_str()) => {
                        notes.push(format!("--optim {v}: herd's fused AdamW"))
                    }
                    _ => errors.push(format!(
                        "--optim {v}: herd trains with AdamW ({}); use one of those",
                        ADAMW.join(", ")
                    )),
                }
                continue;
            }
            "data_seed" => {
                data_seed = Some(shown);
                continue;
            }
            "dataloader_drop_last" if on => {
                notes.push(format!(
                    "{shown}: herd keeps the epoch's last, partial batch (as HF's default): \
                     each epoch has ceil(examples / global batch) steps, where HF would drop \
                     the remainder and take floor(examples / global batch)"
                ));
                continue;
            }
            "dataloader_drop_last" => {
                notes.push(format!(
                    "{shown}: not needed, herd keeps the epoch's last, partial batch too"
                ));
                continue;
            }
            "logging_nan_inf_filter" => {
                notes.push(format!(
                    "{shown}: herd stops the job at a non-finite loss (the step that diverged \
                     is named, and the checkpoints before it stay the newest), so none is \
                     filtered from the logs or logged"
                ));
                continue;
            }
            "fp16" if on => {
                notes.push(format!("{shown}: {}", super::FP16));
            }
            _ => {}
        }
        if let Some((_, why)) = NOT_NEEDED.iter().find(|(k, _)| *k == key) {
            notes.push(format!("--{key}: not needed, {why}"));
            continue;
        }
        if !keys.iter().any(|k| k == key) {
            unknown.push(format!("--{key}"));
            continue;
        }
        match value(key, &values) {
            Ok(v) => {
                job.insert(key.into(), v);
            }
            Err(e) => errors.push(e),
        }
    }
    if let Some(shown) = data_seed {
        let seed = job.get("seed").and_then(Value::as_u64).unwrap_or(42);
        notes.push(format!(
            "{shown}: herd has no separate data seed: each epoch's example order is a shuffle \
             drawn from the job's seed ({seed}) and the epoch (not HF's sampler order either)"
        ));
    }
    if let Some(path) = resume {
        notes.push(resume_note(
            &path,
            job.get("output_dir").and_then(Value::as_str),
        ));
    }
    if !unknown.is_empty() {
        errors.push(format!(
            "not a TrainingArguments or train.py flag herd knows: {} (the job keys are listed \
             in the README)",
            unknown.join(", ")
        ));
    }
}

/// `--resume_from_checkpoint`: herd resumes only from output_dir's newest complete checkpoint,
/// whatever the flag names; the note says whether the named one is that.
pub(super) fn resume_note(given: &str, output_dir: Option<&str>) -> String {
    const HOW: &str = "herd resumes only from output_dir's newest complete checkpoint";
    match given.to_ascii_lowercase().as_str() {
        "" | "true" => format!(
            "--resume_from_checkpoint {given}: {HOW}, as True does (and with no checkpoint \
             there it starts fresh)"
        ),
        "false" | "none" => format!(
            "--resume_from_checkpoint {given}: {HOW} whenever output_dir holds one; give a \
             new output_dir to start fresh"
        ),
        _ => match output_dir.is_some_and(|o| inside(Path::new(given), Path::new(o))) {
            true => format!(
                "--resume_from_checkpoint {given}: {HOW}: this one, unless a later one is there"
            ),
            false => format!(
                "--resume_from_checkpoint {given}: {given} is NOT used: {HOW} ({}); copy it \
                 into output_dir, or set output_dir to its parent, to resume from it",
                output_dir.unwrap_or("none given")
            ),
        },
    }
}

/// Whether `path` lies inside `dir`, comparing their words (`./out/x/` is inside `out`).
fn inside(path: &Path, dir: &Path) -> bool {
    let words = |p: &Path| -> Vec<String> {
        p.components()
            .filter(|c| !matches!(c, Component::CurDir))
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect()
    };
    let (p, d) = (words(path), words(dir));
    p.len() > d.len() && p.starts_with(&d)
}

/// `--fsdp "full_shard auto_wrap offload"`: each part is a job key or a note, none dropped.
pub(super) fn fsdp(v: &str, job: &mut Mapping, notes: &mut Vec<String>, errors: &mut Vec<String>) {
    let mut strategy = None;
    for part in v.split_whitespace() {
        let said = match part {
            "full_shard" | "shard_grad_op" | "hybrid_shard" | "hybrid_shard_zero2" | "no_shard"
                if strategy.is_some() =>
            {
                errors.push(format!(
                    "--fsdp {v:?}: give one sharding strategy (full_shard, shard_grad_op, \
                     hybrid_shard, hybrid_shard_zero2 or no_shard)"
                ));
                return;
            }
            "full_shard" | "shard_grad_op" | "hybrid_shard" | "hybrid_shard_zero2" => {
                strategy = Some(2);
                format!("as `zero_stage: 2` ({})", sharding(part))
            }
            "no_shard" => {
                strategy = Some(0);
                "no_shard: plain data parallel, as `zero_stage: 0` (every rank keeps the whole \
                 optimizer state)"
                    .to_string()
            }
            "offload" => format!("offload: {OFFLOAD}"),
            "auto_wrap" => "auto_wrap: not needed, herd shards by ZeRO stage, not by module \
                            wrapping"
                .to_string(),
            "" | "false" | "False" => continue,
            other => {
                errors.push(format!(
                    "--fsdp {v:?}: {other} is not an FSDP option (full_shard, shard_grad_op, \
                     hybrid_shard, hybrid_shard_zero2, no_shard, offload, auto_wrap)"
                ));
                return;
            }
        };
        notes.push(format!("--fsdp {v:?}: {said}"));
    }
    if let Some(stage) = strategy {
        job.insert("zero_stage".into(), stage.into());
    }
}

/// What herd does for an FSDP sharding strategy it runs as ZeRO stage 2.
pub(super) fn sharding(strategy: &str) -> &'static str {
    match strategy.to_ascii_lowercase().as_str() {
        "shard_grad_op" | "hybrid_shard_zero2" => {
            "optimizer state and gradients sharded across all ranks, parameters whole on each"
        }
        "hybrid_shard" => {
            "optimizer state and gradients sharded across all ranks, not within each node only; \
             hybrid_shard also shards the parameters, which herd does not"
        }
        _ => {
            "optimizer state and gradients sharded; full_shard also shards the parameters, \
             which herd does not"
        }
    }
}

/// CPU offload, which herd does not do, from any of its spellings.
pub(super) const OFFLOAD: &str =
    "herd does not offload to CPU: parameters, gradients and optimizer state stay in GPU memory";
