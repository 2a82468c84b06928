//! tloen/alpaca-lora's finetune.py (`python finetune.py --base_model … --data_path …`): a
//! LoRA fine-tune with its own arguments and defaults, not HF's. The job gets finetune.py's
//! recipe where herd has it (LoRA r 8, alpha 16, dropout 0.05 on q_proj and v_proj; lr 3e-4;
//! batch_size 128 in micro-batches of 4, the accumulation batch_size // micro_batch_size
//! divided by the world size under DDP; cutoff 256; 3 epochs; warmup 100 steps; a log every 10
//! steps and a checkpoint every 200, the last 3 kept); what herd cannot match (the loss on the
//! prompt, the held-out split, the 8-bit base model in fp16) is said in a note, never dropped.

use serde_yaml::{Mapping, Value};

use super::script::resume_note;
use super::value;

/// finetune.py's arguments (fire's), with their defaults; `eval_data_path` is herd's.
const ARGS: &[(&str, &str)] = &[
    ("base_model", ""),
    ("data_path", ""),
    ("output_dir", "./lora-alpaca"),
    ("batch_size", "128"),
    ("micro_batch_size", "4"),
    ("num_epochs", "3"),
    ("learning_rate", "3e-4"),
    ("cutoff_len", "256"),
    ("val_set_size", "2000"),
    ("lora_r", "8"),
    ("lora_alpha", "16"),
    ("lora_dropout", "0.05"),
    ("lora_target_modules", "[q_proj,v_proj]"),
    ("train_on_inputs", "True"),
    ("add_eos_token", "False"),
    ("group_by_length", "False"),
    ("wandb_project", ""),
    ("wandb_run_name", ""),
    ("wandb_watch", ""),
    ("wandb_log_model", ""),
    ("resume_from_checkpoint", ""),
    ("prompt_template_name", "alpaca"),
    ("eval_data_path", ""),
];

/// Flags only finetune.py (and scripts built on it) takes.
const DISTINCT: &[&str] = &[
    "base_model",
    "micro_batch_size",
    "batch_size",
    "train_on_inputs",
    "add_eos_token",
    "prompt_template_name",
    "wandb_project",
    "wandb_run_name",
    "wandb_watch",
    "wandb_log_model",
];

/// finetune.py by its name, or by flags no TrainingArguments script takes.
pub(super) fn is_finetune(script: &str, flags: &[(String, Vec<String>)]) -> bool {
    script.rsplit('/').next() == Some("finetune.py")
        || flags.iter().any(|(k, _)| DISTINCT.contains(&k.as_str()))
}

pub(super) fn read(
    world: usize,
    flags: Vec<(String, Vec<String>)>,
    job: &mut Mapping,
    notes: &mut Vec<String>,
    errors: &mut Vec<String>,
) {
    let unknown: Vec<String> = flags
        .iter()
        .filter(|(k, _)| !ARGS.iter().any(|(a, _)| a == k))
        .map(|(k, _)| format!("--{k}"))
        .collect();
    if !unknown.is_empty() {
        errors.push(format!(
            "not a finetune.py argument: {} (it takes --{}; herd also reads --eval_data_path; \
             set other job keys in the job file it writes)",
            unknown.join(", "),
            ARGS[..ARGS.len() - 1]
                .iter()
                .map(|(a, _)| *a)
                .collect::<Vec<_>>()
                .join(", --")
        ));
        return;
    }
    // Each argument's value as given (a bare flag is True, as fire reads it), else its default.
    let given = |k: &str| {
        flags
            .iter()
            .rev()
            .find(|(f, _)| f == k)
            .map(|(_, v)| match v.is_empty() {
                true => "True".to_string(),
                false => v.join(","),
            })
    };
    let arg = |k: &str| {
        given(k).unwrap_or_else(|| {
            ARGS.iter()
                .find(|(a, _)| *a == k)
                .expect("an argument")
                .1
                .into()
        })
    };
    // " (finetune.py's default)" where the command does not give it.
    let default = |k: &str| match given(k) {
        Some(_) => String::new(),
        None => " (finetune.py's default)".to_string(),
    };
    let int = |k: &str, errors: &mut Vec<String>| match arg(k).parse::<usize>() {
        Ok(n) => Some(n),
        Err(_) => {
            errors.push(format!("--{k} {}: expected a whole number", arg(k)));
            None
        }
    };
    let truth = |k: &str| matches!(arg(k).to_ascii_lowercase().as_str(), "true" | "1" | "yes");

    for (k, key) in [
        ("base_model", "model_name_or_path"),
        ("data_path", "data_path"),
        ("output_dir", "output_dir"),
        ("num_epochs", "num_train_epochs"),
        ("learning_rate", "learning_rate"),
        ("cutoff_len", "model_max_length"),
        ("lora_r", "lora_r"),
        ("lora_alpha", "lora_alpha"),
        ("lora_dropout", "lora_dropout"),
        ("lora_target_modules", "lora_target_modules"),
    ] {
        let v = arg(k);
        if !v.is_empty() {
            set(job, errors, key, k, v);
        }
    }
    if given("output_dir").is_none() {
        notes.push("--output_dir: finetune.py's default, ./lora-alpaca".into());
    }
    // TrainingArguments finetune.py sets.
    for (key, v) in [
        ("warmup_steps", "100"),
        ("logging_steps", "10"),
        ("save_strategy", "steps"),
        ("save_steps", "200"),
        ("save_total_limit", "3"),
    ] {
        set(job, errors, key, key, v.to_string());
    }

    // gradient_accumulation_steps = batch_size // micro_batch_size, // world_size under DDP.
    if let (Some(batch), Some(micro)) = (int("batch_size", errors), int("micro_batch_size", errors))
    {
        let per_process = batch.checked_div(micro).unwrap_or(0);
        let accumulation = match world {
            1 => per_process,
            w => per_process / w,
        };
        let shown = format!(
            "--batch_size {batch}{} over --micro_batch_size {micro}{}{}",
            default("batch_size"),
            default("micro_batch_size"),
            match world {
                1 => String::new(),
                w => format!(" and {w} processes"),
            }
        );
        if micro == 0 || accumulation == 0 {
            errors.push(format!(
                "{shown}: finetune.py's gradient_accumulation_steps would be 0 (batch_size // \
                 micro_batch_size, divided by the world size under DDP); give a batch_size of \
                 at least micro_batch_size × world size"
            ));
        } else {
            set(
                job,
                errors,
                "per_device_train_batch_size",
                "micro_batch_size",
                micro.to_string(),
            );
            set(
                job,
                errors,
                "gradient_accumulation_steps",
                "batch_size",
                accumulation.to_string(),
            );
            let global = micro * accumulation * world;
            notes.push(format!(
                "{shown}: as per_device_train_batch_size {micro} × gradient_accumulation_steps \
                 {accumulation}{}, as finetune.py computes them{}",
                match world {
                    1 => String::new(),
                    w => format!(" × world_size {w}"),
                },
                match global == batch {
                    true => String::new(),
                    false =>
                        format!(" (its integer division: {global} examples a step, not {batch})"),
                }
            ));
        }
    }

    // The evaluation on a held-out split.
    let eval = given("eval_data_path");
    if let Some(size) = int("val_set_size", errors) {
        match (size, eval) {
            (0, Some(file)) => notes.push(format!(
                "--eval_data_path {file}: not used: --val_set_size 0 means no evaluation"
            )),
            (0, None) => {}
            (n, Some(file)) => {
                set(
                    job,
                    errors,
                    "eval_data_path",
                    "eval_data_path",
                    file.clone(),
                );
                set(job, errors, "eval_strategy", "val_set_size", "steps".into());
                set(job, errors, "eval_steps", "val_set_size", "200".into());
                set(
                    job,
                    errors,
                    "load_best_model_at_end",
                    "val_set_size",
                    "true".into(),
                );
                notes.push(format!(
                    "--val_set_size {n}{}: finetune.py holds out {n} random examples of \
                     data_path, evaluates on them every 200 steps and ends with the best \
                     checkpoint; herd evaluates on --eval_data_path {file} instead, on the same \
                     cadence, and trains on every example of data_path, so leave those out of it",
                    default("val_set_size")
                ));
            }
            (n, None) => notes.push(format!(
                "--val_set_size {n}{}: NOT matched: finetune.py holds out {n} random examples \
                 of data_path (seed 42), evaluates on them every 200 steps and ends with the \
                 best checkpoint (load_best_model_at_end); herd does not split data: this job \
                 trains on every example, does not evaluate, and ends with the last step's \
                 model. Add --eval_data_path HELD_OUT.json (examples left out of data_path) to \
                 the command for finetune.py's evaluation",
                default("val_set_size")
            )),
        }
    }

    if truth("train_on_inputs") {
        notes.push(format!(
            "--train_on_inputs True{}: NOT matched: herd computes the loss on the response \
             tokens only (the prompt masked, as Stanford Alpaca's train.py does), where \
             finetune.py trains on the prompt tokens too; --train_on_inputs False is the recipe \
             herd runs",
            default("train_on_inputs")
        ));
    }
    notes.push(
        "finetune.py loads the base model in 8-bit (load_in_8bit, LLM.int8()) and trains the \
         adapters with fp16 mixed precision: NOT matched: herd keeps the base weights \
         unquantized, and its GPU ranks compute in bf16 (CPU ranks in f32), so memory use and \
         rounding differ"
            .into(),
    );
    notes.push(
        "finetune.py pads with id 0 (<unk>) and never resizes the embeddings: NOT matched: \
         herd adds a [PAD] token when the tokenizer has none, as train.py does, so the adapter \
         also holds the resized embed_tokens and lm_head, and PEFT loads it on a base resized to \
         the saved tokenizer's length"
            .into(),
    );
    match arg("prompt_template_name").as_str() {
        "alpaca_legacy" => notes.push(
            "--prompt_template_name alpaca_legacy: herd's prompt, Stanford Alpaca's, word for \
             word"
                .into(),
        ),
        "alpaca" => notes.push(format!(
            "--prompt_template_name alpaca{}: NOT matched exactly: its prompt ends \
             \"### Response:\\n\", herd's (Stanford Alpaca's, finetune.py's alpaca_legacy) \
             \"### Response:\", the response following at once; the two differ by that newline",
            default("prompt_template_name")
        )),
        other => errors.push(format!(
            "--prompt_template_name {other}: herd writes Alpaca records with Stanford Alpaca's \
             prompt (finetune.py's alpaca_legacy template) only; convert the data to Alpaca \
             records with that prompt's fields, or write the job by hand"
        )),
    }
    if given("add_eos_token").is_some() {
        notes.push(
            "--add_eos_token: not needed: finetune.py ends every example that fits cutoff_len \
             with EOS either way (as herd does); the flag only adjusts its prompt-length count \
             under train_on_inputs False, to the same length"
                .into(),
        );
    }
    if given("group_by_length").is_some_and(|_| truth("group_by_length")) {
        notes.push(
            "--group_by_length: not matched: herd does not batch by length (`packing: true` \
             removes the padding instead)"
                .into(),
        );
    }
    for k in [
        "wandb_project",
        "wandb_run_name",
        "wandb_watch",
        "wandb_log_model",
    ] {
        if given(k).is_some() {
            notes.push(format!(
                "--{k}: nothing goes to Weights & Biases: herd reports through `herd status` \
                 and trainer_state.json"
            ));
        }
    }
    if let Some(path) = given("resume_from_checkpoint") {
        let out = job
            .get("output_dir")
            .and_then(Value::as_str)
            .map(str::to_string);
        notes.push(resume_note(&path, out.as_deref()));
    }
}

/// `key: v` in the job, read as the flag's value would be; a refusal names finetune.py's flag.
fn set(job: &mut Mapping, errors: &mut Vec<String>, key: &'static str, from: &str, v: String) {
    match value(key, &[v]) {
        Ok(v) => {
            job.insert(key.into(), v);
        }
        Err(e) => errors.push(e.replace(&format!("--{key}"), &format!("--{from}"))),
    }
}
