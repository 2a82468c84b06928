//! Launchers' options: flags that take no value, and what they change.

use super::*;

const TAIL: &str = "train.py --model_name_or_path m --data_path d.json --output_dir o";

fn world(launch: &str) -> usize {
    let c =
        convert(&words(&format!("{launch} {TAIL}"))).unwrap_or_else(|e| panic!("{launch}: {e}"));
    job(&c).world_size
}

#[test]
fn flags_without_a_value_leave_the_script_alone() {
    for (launch, n) in [
        (
            "python -m torch.distributed.launch --nproc_per_node=8 --use_env",
            8,
        ),
        (
            "python3 -m torch.distributed.launch --use-env --nproc_per_node 2",
            2,
        ),
        ("torchrun --standalone --no_python --nproc_per_node 4", 4),
        (
            "torchrun --run-path --log_dir logs -r 3 -t 3 --nproc_per_node 4",
            4,
        ),
        ("torchrun -m --nproc_per_node 2", 2),
        ("deepspeed --num_gpus 8 --force_multi", 8),
        ("deepspeed --num_gpus 8 --no_local_rank", 8),
        (
            "deepspeed --num_gpus 8 --no_python --no_ssh_check --elastic_training \
             --bind_cores_to_rank --save_pid --enable_each_rank_log logs --module",
            8,
        ),
        ("deepspeed --autotuning run --num_accelerators 2", 2),
        ("accelerate launch --num_processes 8 --same_network", 8),
        (
            "accelerate launch --multi_gpu --num_processes 8 --debug -q --no_python -m \
             --dynamo_use_fullgraph --dynamo_use_dynamic --dynamo_backend inductor",
            8,
        ),
    ] {
        assert_eq!(world(launch), n, "{launch}");
    }
}

#[test]
fn an_unknown_launcher_option_is_refused_by_name() {
    let e = convert(&words(&format!(
        "torchrun --nproc_per_node 2 --bogus {TAIL}"
    )))
    .unwrap_err();
    assert!(
        e.contains("--bogus: not a torchrun option herd knows"),
        "{e}"
    );
    let e = convert(&words(&format!("deepspeed --num_gpus 2 --bogus {TAIL}"))).unwrap_err();
    assert!(
        e.contains("--bogus: not a deepspeed option herd knows"),
        "{e}"
    );
}

#[test]
fn accelerate_precision_and_deepspeed_flags_become_job_keys() {
    let c = convert(&words(&format!(
        "accelerate launch --num_processes 4 --mixed_precision bf16 {TAIL}"
    )))
    .unwrap();
    assert!(job(&c).bf16);
    let c = convert(&words(&format!(
        "accelerate launch --num_processes 4 --use_deepspeed --zero_stage 3 \
         --offload_optimizer_device cpu --offload_param_device nvme {TAIL}"
    )))
    .unwrap();
    assert_eq!(job(&c).zero_stage, 2);
    let notes = c.notes.join("\n");
    for n in [
        "--zero_stage 3: as `zero_stage: 2`",
        "--offload_optimizer_device cpu: herd does not offload",
        "--offload_param_device nvme: herd does not offload",
    ] {
        assert!(notes.contains(n), "{n:?} not in {notes}");
    }
    assert!(!notes.contains(
        "the launcher's, not needed: herd's coordinator assigns ranks and rendezvous\n--zero"
    ));
    for mp in ["--mixed_precision", "--zero_stage", "--offload"] {
        assert!(
            !c.notes
                .iter()
                .any(|n| n.starts_with(mp) && n.contains("not needed")),
            "{mp}: {notes}"
        );
    }
    // --use_deepspeed alone: accelerate's default stage, 2.
    let c = convert(&words(&format!(
        "accelerate launch --num_processes 2 --use_deepspeed {TAIL}"
    )))
    .unwrap();
    assert_eq!(job(&c).zero_stage, 2);
    let c = convert(&words(&format!(
        "accelerate launch --num_processes 2 --mixed_precision fp16 {TAIL}"
    )))
    .unwrap();
    assert!(!job(&c).bf16);
    assert!(
        c.notes
            .iter()
            .any(|n| n.starts_with("--mixed_precision fp16: herd has no fp16")),
        "{:#?}",
        c.notes
    );
    // FSDP as --fsdp full_shard is: stage 2, told.
    let c = convert(&words(&format!(
        "accelerate launch --num_processes 2 --use_fsdp --fsdp_sharding_strategy FULL_SHARD \
         --fsdp_offload_params true {TAIL}"
    )))
    .unwrap();
    assert_eq!(job(&c).zero_stage, 2);
    assert!(
        c.notes.iter().any(|n| n.contains("herd does not offload")),
        "{:#?}",
        c.notes
    );
}

#[test]
fn accelerate_without_a_count_says_what_it_assumed() {
    let c = convert(&words(&format!("accelerate launch {TAIL}"))).unwrap();
    assert_eq!(job(&c).world_size, 1);
    assert!(
        c.notes
            .iter()
            .any(|n| n.contains("default config file") && n.contains("world_size 1")),
        "{:#?}",
        c.notes
    );
}
