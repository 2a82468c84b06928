//! tloen/alpaca-lora's finetune.py: its defaults, not HF's, and what herd cannot match told.

use super::*;

#[test]
fn finetune_py_gets_its_own_defaults() {
    let c = convert(&words(
        "python finetune.py --base_model 'decapoda-research/llama-7b-hf' \
         --data_path 'alpaca_data_cleaned.json' --output_dir './lora-alpaca'",
    ))
    .unwrap();
    let j = job(&c);
    assert_eq!(j.lora_r, Some(8));
    assert_eq!((j.lora_alpha, j.lora_dropout), (16.0, 0.05));
    assert_eq!(j.lora_target_modules, ["q_proj", "v_proj"]);
    assert_eq!(j.learning_rate, 3e-4);
    // batch_size 128 over micro_batch_size 4: 32 micro-batches per step on one process.
    assert_eq!(
        (j.per_device_train_batch_size, j.gradient_accumulation_steps),
        (4, 32)
    );
    assert_eq!((j.num_train_epochs, j.model_max_length), (3.0, 256));
    assert_eq!(j.warmup_steps_for(1000), 100);
    assert_eq!(j.logging_steps, crate::StepCount::Steps(10));
    assert_eq!(j.save_strategy, crate::SaveStrategy::Steps);
    assert_eq!(j.save_steps, crate::StepCount::Steps(200));
    assert_eq!(j.save_total_limit, Some(3));
    // What herd cannot match is told, never dropped.
    let notes = c.notes.join("\n");
    for n in [
        "--train_on_inputs True (finetune.py's default): NOT matched",
        "--val_set_size 2000 (finetune.py's default): NOT matched",
        "8-bit",
        "fp16",
    ] {
        assert!(notes.contains(n), "{n:?} not in {notes}");
    }
}

#[test]
fn finetune_py_under_torchrun_divides_the_accumulation_by_the_world() {
    let c = convert(&words(
        "WORLD_SIZE=2 CUDA_VISIBLE_DEVICES=0,1 torchrun --nproc_per_node=2 --master_port=1234 \
         finetune.py --base_model m --data_path d.json --output_dir o --batch_size 256 \
         --micro_batch_size 8 --num_epochs 10 --learning_rate 1e-4 --cutoff_len 512 \
         --val_set_size 0 --lora_r 16 --lora_alpha 32 --lora_dropout 0.1 \
         --lora_target_modules '[q_proj,k_proj,v_proj,o_proj]' --train_on_inputs False \
         --group_by_length --prompt_template_name alpaca --wandb_project p --wandb_run_name r \
         --add_eos_token",
    ))
    .unwrap();
    let j = job(&c);
    assert_eq!(j.world_size, 2);
    assert_eq!(
        (j.per_device_train_batch_size, j.gradient_accumulation_steps),
        (8, 16)
    );
    assert_eq!(
        (j.num_train_epochs, j.model_max_length, j.lora_r),
        (10.0, 512, Some(16))
    );
    assert_eq!(
        j.lora_target_modules,
        ["q_proj", "k_proj", "v_proj", "o_proj"]
    );
    assert_eq!(j.eval_strategy, crate::EvalStrategy::No);
    let notes = c.notes.join("\n");
    assert!(
        !notes.contains("NOT matched: herd computes the loss"),
        "{notes}"
    );
    for n in [
        "--wandb_project",
        "--add_eos_token",
        "--prompt_template_name alpaca",
    ] {
        assert!(notes.contains(n), "{n:?} not in {notes}");
    }
}

#[test]
fn finetune_py_evaluates_on_a_held_out_file_when_given_one() {
    let c = convert(&words(
        "python finetune.py --base_model m --data_path train.json --output_dir o \
         --eval_data_path held_out.json",
    ))
    .unwrap();
    let j = job(&c);
    assert_eq!(j.eval_strategy, crate::EvalStrategy::Steps);
    assert_eq!(j.eval_steps, Some(crate::StepCount::Steps(200)));
    assert!(j.load_best_model_at_end);
    assert!(
        c.notes.iter().any(|n| n.contains("held_out.json")),
        "{:#?}",
        c.notes
    );
}

#[test]
fn finetune_py_refuses_what_it_cannot_write() {
    let base = "python finetune.py --base_model m --data_path d.json --output_dir o";
    let e = convert(&words(&format!("{base} --prompt_template_name vigogne"))).unwrap_err();
    assert!(e.contains("--prompt_template_name vigogne"), "{e}");
    let e = convert(&words(&format!(
        "{base} --batch_size 2 --micro_batch_size 4"
    )))
    .unwrap_err();
    assert!(e.contains("gradient_accumulation_steps would be 0"), "{e}");
    let e = convert(&words(&format!("{base} --per_device_train_batch_size 4"))).unwrap_err();
    assert!(e.contains("--per_device_train_batch_size"), "{e}");
    // The output_dir finetune.py defaults to is written out.
    let c = convert(&words(
        "python finetune.py --base_model m --data_path d.json",
    ))
    .unwrap();
    assert_eq!(
        job(&c).output_dir,
        std::path::PathBuf::from("./lora-alpaca")
    );
}
