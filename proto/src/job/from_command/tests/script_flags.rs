//! The training script's flags: --fsdp's every part, notes that say what differs, harmless
//! HF flags noted instead of refused, and every refusal reported at once.

use super::*;

const BASE: &str = "torchrun train.py --model_name_or_path m --data_path d.json --output_dir out";

fn with(flags: &str) -> Converted {
    convert(&words(&format!("{BASE} {flags}"))).unwrap()
}

fn says(c: &Converted, what: &str) -> bool {
    c.notes.iter().any(|n| n.contains(what))
}

#[test]
fn every_part_of_fsdp_is_told() {
    let c = with("--fsdp no_shard");
    assert_eq!(job(&c).zero_stage, 0);
    assert!(says(&c, "no_shard: plain data parallel"), "{:#?}", c.notes);
    let c = with("--fsdp offload");
    assert!(says(&c, "offload: herd does not offload"), "{:#?}", c.notes);
    let c = with("--fsdp 'full_shard auto_wrap offload'");
    assert_eq!(job(&c).zero_stage, 2);
    for part in [
        "as `zero_stage: 2`",
        "auto_wrap: not needed",
        "offload: herd does not offload",
    ] {
        assert!(says(&c, part), "{part:?} not in {:#?}", c.notes);
    }
    let e = convert(&words(&format!("{BASE} --fsdp full_shard shard_grad_op"))).unwrap_err();
    assert!(e.contains("one sharding strategy"), "{e}");
    let e = convert(&words(&format!("{BASE} --fsdp fully_sharded"))).unwrap_err();
    assert!(
        e.contains("--fsdp \"fully_sharded\": fully_sharded is not an FSDP option"),
        "{e}"
    );
}

#[test]
fn a_checkpoint_outside_output_dir_is_said_to_be_unused() {
    let c = with("--resume_from_checkpoint elsewhere/checkpoint-400");
    assert!(
        says(&c, "elsewhere/checkpoint-400 is NOT used")
            && says(&c, "only from output_dir's newest complete checkpoint"),
        "{:#?}",
        c.notes
    );
    // Inside output_dir (however it is spelled), the newest checkpoint there is the one resumed.
    let c = with("--resume_from_checkpoint ./out/checkpoint-400/");
    assert!(!says(&c, "NOT used"), "{:#?}", c.notes);
    assert!(says(&c, "unless a later one is there"), "{:#?}", c.notes);
    let c = with("--resume_from_checkpoint True");
    assert!(says(&c, "as True does"), "{:#?}", c.notes);
    let c = with("--overwrite_output_dir");
    assert!(
        says(&c, "herd never overwrites") && says(&c, "give a new output_dir to start fresh"),
        "{:#?}",
        c.notes
    );
    assert!(!c
        .notes
        .iter()
        .any(|n| n.contains("not needed") && n.contains("overwrite")));
}

#[test]
fn harmless_hf_flags_are_notes_not_refusals() {
    let c = with(
        "--gradient_checkpointing True --gradient_checkpointing_kwargs '{\"use_reentrant\": false}' \
         --torch_compile True --torch_compile_backend inductor --torch_compile_mode max-autotune \
         --data_seed 7 --seed 3 --save_on_each_node --optim_args 'betas=(0.9,0.95)' \
         --push_to_hub --hub_model_id me/model --hub_token hf_secret --hub_strategy every_save \
         --logging_nan_inf_filter False --ddp_backend nccl --dataloader_drop_last True \
         --auto_find_batch_size --log_level info --log_level_replica warning \
         --log_on_each_node False --save_total_limit 2",
    );
    let j = job(&c);
    assert_eq!((j.seed, j.save_total_limit), (3, Some(2)));
    for n in [
        "--gradient_checkpointing_kwargs: not needed",
        "--torch_compile: not needed",
        "--torch_compile_backend: not needed",
        "--torch_compile_mode: not needed",
        "--data_seed 7: herd has no separate data seed",
        "the job's seed (3)",
        "--save_on_each_node: not needed",
        "--optim_args: not read: herd's AdamW takes adam_beta1, adam_beta2, adam_epsilon",
        "--push_to_hub: nothing is uploaded",
        "--hub_model_id: nothing is uploaded",
        "--hub_token: nothing is uploaded",
        "--hub_strategy: nothing is uploaded",
        "--logging_nan_inf_filter False: herd stops the job at a non-finite loss",
        "--ddp_backend: not needed",
        "--dataloader_drop_last True: herd keeps the epoch's last, partial batch",
        "--auto_find_batch_size: herd does not retry",
        "--log_level: not needed",
        "--log_level_replica: not needed",
        "--log_on_each_node: not needed",
    ] {
        assert!(
            c.notes.iter().any(|x| x.starts_with(n) || x.contains(n)),
            "{n:?} not in {:#?}",
            c.notes
        );
    }
    // A token is not repeated in the notes.
    assert!(
        !c.notes.iter().any(|n| n.contains("hf_secret")),
        "{:#?}",
        c.notes
    );
    let c = with("--dataloader_drop_last False");
    assert!(
        says(&c, "--dataloader_drop_last False: not needed"),
        "{:#?}",
        c.notes
    );
}

#[test]
fn paged_adamw_32bit_is_adamw_and_8_bit_stays_refused() {
    let c = with("--optim paged_adamw_32bit");
    assert!(
        says(&c, "--optim paged_adamw_32bit: AdamW") && says(&c, "no paged memory"),
        "{:#?}",
        c.notes
    );
    for o in [
        "paged_adamw_8bit",
        "adamw_bnb_8bit",
        "adamw_8bit",
        "lion_32bit",
    ] {
        let e = convert(&words(&format!("{BASE} --optim {o}"))).unwrap_err();
        assert!(
            e.contains(&format!("--optim {o}: herd trains with AdamW")),
            "{e}"
        );
    }
}

#[test]
fn every_refusal_is_reported_at_once() {
    let e = convert(&words(&format!(
        "{BASE} --optim adamw_8bit --learning_rat 1e-4 --model_type gpt2 --warmup_ratios 0.1 \
         --data alpaca --learning_rate 1 2"
    )))
    .unwrap_err();
    for part in [
        "--optim adamw_8bit: herd trains with AdamW",
        "--learning_rat, --warmup_ratios",
        "--model_type gpt2",
        "--data alpaca",
        "--learning_rate: one value expected",
    ] {
        assert!(e.contains(part), "{part:?} not in {e}");
    }
    // Missing keys are told with the rest.
    let e = convert(&words("python train.py --optim sgd")).unwrap_err();
    assert!(
        e.contains("--optim sgd") && e.contains("--model_name_or_path, --data_path, --output_dir"),
        "{e}"
    );
}
