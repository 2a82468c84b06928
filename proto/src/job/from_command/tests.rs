use super::*;

fn words(s: &str) -> Vec<String> {
    // The shell's split for these commands: whitespace, with "…" and '…' kept whole.
    let mut out = vec![];
    let mut cur = String::new();
    let mut quote = None;
    for c in s.chars() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, c) if c.is_whitespace() => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            (_, c) => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn job(c: &Converted) -> JobSpec {
    JobSpec::from_yaml_str(&c.yaml, "converted").unwrap()
}

/// MISSION.md's command, as GPT-4-LLM and Alpaca run it.
const RECIPE: &str = "torchrun --nproc_per_node=16 --master_port=12345 train.py \
    --model_name_or_path PATH/TO/LLaMA --data_path ./data/alpaca_gpt4_data.json \
    --output_dir PATH/TO/SAVE --num_train_epochs 3 \
    --per_device_train_batch_size 1 --per_device_eval_batch_size 1 \
    --gradient_accumulation_steps 4 --evaluation_strategy \"no\" \
    --save_strategy \"steps\" --save_steps 200 --save_total_limit 1 \
    --learning_rate 2e-5 --weight_decay 0. --warmup_ratio 0.03 \
    --lr_scheduler_type \"cosine\" --logging_steps 1 --deepspeed configs/ds_config.json";

#[test]
fn the_recipes_command_is_the_shipped_7b_job() {
    let c = convert(&words(RECIPE)).unwrap();
    let mut got = job(&c);
    // configs/gpt4-llm-7b.yaml adds what the command leaves to its DeepSpeed config and to
    // train.py's defaults; with those, the two are one job.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(root.join("configs/gpt4-llm-7b.yaml")).unwrap();
    let shipped = JobSpec::from_yaml_str(&text, "7b").unwrap();
    assert!(matches!(
        got.deepspeed,
        Some(super::super::deepspeed::DeepSpeed::File(_))
    ));
    got.load_deepspeed(&root, "converted").unwrap();
    got.deepspeed = None;
    got.bf16 = true;
    got.seed = shipped.seed;
    assert_eq!(got, shipped);
    assert!(
        c.notes
            .iter()
            .any(|n| n.starts_with("--master_port: the launcher's, not needed")),
        "{:?}",
        c.notes
    );
}

#[test]
fn launchers_give_the_world_size() {
    let tail = "train.py --model_name_or_path m --data_path d.json --output_dir o";
    for (launch, world) in [
        ("torchrun --nnodes 2 --nproc-per-node 8", 16),
        ("torchrun --standalone --nnodes=1:4 --nproc_per_node=2", 8),
        ("python -m torch.distributed.run --nproc_per_node 4", 4),
        ("deepspeed --num_gpus 8 --num_nodes 2", 16),
        (
            "accelerate launch --multi_gpu --num_processes 6 --num_machines 2",
            6,
        ),
        ("CUDA_VISIBLE_DEVICES=0,1 python", 1),
        ("", 1),
    ] {
        let c = convert(&words(&format!("{launch} {tail}"))).unwrap();
        assert_eq!(job(&c).world_size, world, "{launch}");
    }
    let e = convert(&words(&format!("deepspeed {tail}"))).unwrap_err();
    assert!(e.contains("--num_gpus N"), "{e}");
    let e = convert(&words(&format!("torchrun --nproc_per_node=gpu {tail}"))).unwrap_err();
    assert!(e.contains("--nproc_per_node gpu: expected a number"), "{e}");
    let e = convert(&words("srun train.py")).unwrap_err();
    assert!(e.contains("srun: expected torchrun"), "{e}");
}

#[test]
fn fastchat_and_alpaca_flags_convert_or_say_why_not() {
    // FastChat's Vicuna command (abridged), with FSDP and TF32.
    let cmd = "torchrun --nproc_per_node=8 --master_port=20001 fastchat/train/train_mem.py \
        --model_name_or_path m --data_path data/sharegpt.json --bf16 True --output_dir o \
        --num_train_epochs 3 --per_device_train_batch_size 2 --gradient_accumulation_steps 16 \
        --fsdp \"full_shard auto_wrap\" --fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer \
        --tf32 True --model_max_length 2048 --gradient_checkpointing True --lazy_preprocess True \
        --report_to none --optim adamw_torch --lora_target_modules q_proj v_proj";
    let c = convert(&words(cmd)).unwrap();
    let j = job(&c);
    assert_eq!(
        (
            j.world_size,
            j.bf16,
            j.model_max_length,
            j.gradient_checkpointing,
            j.zero_stage
        ),
        (8, true, 2048, true, 2)
    );
    assert_eq!(j.lora_target_modules, ["q_proj", "v_proj"]);
    for says in [
        "--fsdp \"full_shard auto_wrap\": as `zero_stage: 2`",
        "--tf32: not needed",
        "--lazy_preprocess: not needed",
        "--report_to: not needed",
        "--optim adamw_torch: herd's fused AdamW",
    ] {
        assert!(
            c.notes.iter().any(|n| n.starts_with(says)),
            "{says:?} not in {:#?}",
            c.notes
        );
    }
}

#[test]
fn unknown_flags_and_other_optimizers_are_refused_by_name() {
    let base = "torchrun train.py --model_name_or_path m --data_path d --output_dir o";
    let e = convert(&words(&format!(
        "{base} --learning_rat 1e-4 --warmup_ratios 0.1"
    )))
    .unwrap_err();
    assert!(e.contains("--learning_rat, --warmup_ratios"), "{e}");
    let e = convert(&words(&format!("{base} --optim adafactor"))).unwrap_err();
    assert!(
        e.contains("--optim adafactor: herd trains with AdamW"),
        "{e}"
    );
    // A value of the wrong kind, or a flag with no value, is told by its flag, not by a line of
    // the converted file the user never sees.
    let e = convert(&words(&format!("{base} --max_steps many"))).unwrap_err();
    assert!(e.starts_with("--max_steps: invalid type"), "{e}");
    assert!(!e.contains("line"), "{e}");
    let e = convert(&words(&format!("{base} --learning_rate"))).unwrap_err();
    assert!(
        e.starts_with("--learning_rate: invalid type: boolean `true`")
            && e.ends_with("(a flag given without a value reads as true)"),
        "{e}"
    );
    let e = convert(&words(&format!("{base} --warmup_ratio 2"))).unwrap_err();
    assert!(
        e.starts_with("--warmup_ratio: must be in [0, 1], got 2"),
        "{e}"
    );
    let e = convert(&words(&format!("{base} --learning_rate 1e-4 2e-4"))).unwrap_err();
    assert!(e.contains("--learning_rate: one value expected"), "{e}");
}

/// Alpaca-CoT's multi-GPU LoRA command (its README's), with a data file and output dir given,
/// since herd downloads nothing.
#[test]
fn alpaca_cot_flags_are_read_by_their_job_names() {
    let cmd = "python3 -m torch.distributed.launch --nproc_per_node 4 --nnodes=1 --node_rank=0 \
        --master_addr=xxx --master_port=yyy uniform_finetune.py --model_type llama \
        --model_name_or_path decapoda-research/llama-7b-hf --data_path alpaca-belle-cot.json \
        --output_dir out --lora_target_modules q_proj v_proj --per_gpu_train_batch_size 4 \
        --learning_rate 3e-4 --epochs 1 --lora_r 8";
    let c = convert(&words(cmd)).unwrap();
    let j = job(&c);
    assert_eq!(
        (
            j.world_size,
            j.per_device_train_batch_size,
            j.num_train_epochs,
            j.lora_r
        ),
        (4, 4, 1.0, Some(8))
    );
    assert_eq!(j.learning_rate, 3e-4);
    assert!(
        c.notes
            .contains(&"--epochs: as num_train_epochs".to_string()),
        "{:?}",
        c.notes
    );
    let e = convert(&words(&cmd.replace(
        "--data_path alpaca-belle-cot.json",
        "--data alpaca-belle-cot",
    )))
    .unwrap_err();
    assert!(
        e.contains("--data alpaca-belle-cot: herd reads data files"),
        "{e}"
    );
    let e = convert(&words(
        &cmd.replace("--model_type llama", "--model_type chatglm"),
    ))
    .unwrap_err();
    assert!(
        e.contains("--model_type chatglm: herd trains LLaMA-family models"),
        "{e}"
    );
    let e = convert(&words(&cmd.replace("--output_dir out", ""))).unwrap_err();
    assert!(e.contains("the command gives no --output_dir"), "{e}");
}

#[test]
fn words_yaml_1_1_reads_as_booleans_are_written_quoted() {
    let c = convert(&words(
        "python train.py --model_name_or_path m --data_path d.json --output_dir no \
         --save_strategy no --eval_strategy no",
    ))
    .unwrap();
    assert!(c.yaml.contains("\nsave_strategy: 'no'\n"), "{}", c.yaml);
    assert!(c.yaml.contains("\noutput_dir: 'no'\n"), "{}", c.yaml);
    let j = job(&c);
    assert_eq!(j.save_strategy, crate::SaveStrategy::No);
    assert_eq!(j.output_dir, std::path::PathBuf::from("no"));
}

#[test]
fn epoch_strategies_and_logging_first_step_become_the_job_keys() {
    let c = convert(&words(
        "python train.py --model_name_or_path m --data_path d.json --output_dir o \
         --save_strategy epoch --logging_strategy epoch --logging_first_step True \
         --eval_strategy epoch --eval_data_path e.json",
    ))
    .unwrap();
    let j = job(&c);
    assert_eq!(j.save_strategy, crate::SaveStrategy::Epoch);
    assert_eq!(j.logging_strategy, crate::LoggingStrategy::Epoch);
    assert_eq!(j.eval_strategy, crate::EvalStrategy::Epoch);
    assert!(j.logging_first_step);
    assert!(
        c.notes.iter().all(|n| !n.contains("logging_first_step")),
        "{:?}",
        c.notes
    );
}

#[test]
fn lr_scheduler_kwargs_come_as_the_json_hf_takes() {
    let c = convert(&words(
        "python train.py --model_name_or_path m --data_path d.json --output_dir o \
         --lr_scheduler_type cosine_with_min_lr --lr_scheduler_kwargs '{\"min_lr\": 1e-6}'",
    ))
    .unwrap();
    let j = job(&c);
    assert_eq!(j.lr_scheduler_type, crate::SchedulerType::CosineWithMinLr);
    assert_eq!(j.lr_scheduler_kwargs.min_lr, Some(1e-6));
}

mod files;
mod finetune;
mod launchers;
mod script_flags;
