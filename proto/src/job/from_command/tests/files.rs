//! What the command's files say: a DeepSpeed hostfile, an accelerate config.

use super::*;
use std::collections::HashMap;

/// Files by name; any other cannot be read.
struct Here(HashMap<&'static str, &'static str>, Option<&'static str>);

impl Files for Here {
    fn read(&self, path: &str) -> Result<String, String> {
        self.0
            .get(path)
            .map(|t| t.to_string())
            .ok_or_else(|| "No such file or directory".into())
    }
    fn accelerate_default_config(&self) -> Option<String> {
        self.1.map(str::to_string)
    }
}

const TAIL: &str = "train.py --model_name_or_path m --data_path d.json --output_dir o";

const HOSTS: &str = "# the cluster\nnode1 slots=8\n\n  node2   slots=8\nnode3 slots=4 \n";

fn run(files: &Here, launch: &str) -> Result<Converted, String> {
    convert_with(&words(&format!("{launch} {TAIL}")), files)
}

#[test]
fn deepspeed_counts_the_hostfile_as_deepspeed_does() {
    let files = Here(
        HashMap::from([("hosts", HOSTS), ("/job/hostfile", "a slots=2\nb slots=2")]),
        None,
    );
    for (launch, world) in [
        ("deepspeed --hostfile hosts", 20),
        ("deepspeed -H hosts --num_gpus 2", 6),
        ("deepspeed --hostfile=hosts --num_nodes 2", 16),
        ("deepspeed --hostfile hosts --num_nodes 2 --num_gpus 1", 2),
        ("deepspeed --hostfile hosts --include node1:0,1@node3", 6),
        ("deepspeed --hostfile hosts -i 'node2@node1:3,3'", 9),
        ("deepspeed --hostfile hosts --exclude node2", 12),
        ("deepspeed --hostfile hosts --exclude node1:0,1@node3", 14),
        // No --hostfile: DeepSpeed reads /job/hostfile when there is one.
        ("deepspeed", 4),
        ("deepspeed --num_gpus 1", 2),
    ] {
        let c = run(&files, launch).unwrap_or_else(|e| panic!("{launch}: {e}"));
        assert_eq!(job(&c).world_size, world, "{launch}");
        assert!(
            !c.notes
                .iter()
                .any(|n| n.contains("hostfile") && n.contains("not needed")),
            "{launch}: {:#?}",
            c.notes
        );
        assert!(
            c.notes
                .iter()
                .any(|n| n.contains(&format!("world_size {world}"))),
            "{launch}: {:#?}",
            c.notes
        );
    }
    for (launch, says) in [
        ("deepspeed --hostfile gone", "cannot read it here"),
        ("deepspeed --hostfile gone --num_gpus 8", "`world_size: N`"),
        (
            "deepspeed --hostfile hosts --include node9",
            "node9 is not in the hostfile",
        ),
        ("deepspeed --hostfile hosts --include node3:4", "no slot 4"),
        (
            "deepspeed --hostfile hosts --exclude node1:0 --include node2",
            "refuses the two",
        ),
        (
            "deepspeed --hostfile hosts --include node1 --num_gpus 2",
            "refuses them together",
        ),
        (
            "deepspeed --hostfile hosts --exclude node1@node2@node3",
            "no slot is left",
        ),
    ] {
        let e = run(&files, launch).unwrap_err();
        assert!(e.contains(says), "{launch}: {e}");
    }
    let bad = Here(
        HashMap::from([("hosts", "node1 slots=8\nnode1 slots=2")]),
        None,
    );
    let e = run(&bad, "deepspeed --hostfile hosts").unwrap_err();
    assert!(e.contains("node1 is listed twice"), "{e}");
    let bad = Here(HashMap::from([("hosts", "node1 8")]), None);
    let e = run(&bad, "deepspeed --hostfile hosts").unwrap_err();
    assert!(e.contains("a bad entry"), "{e}");
}

#[test]
fn deepspeed_without_a_hostfile_counts_what_it_is_told() {
    let none = Here(HashMap::new(), None);
    for (launch, world) in [
        ("CUDA_VISIBLE_DEVICES=0,1,3 deepspeed", 3),
        ("deepspeed --include localhost:0,2", 2),
        ("CUDA_VISIBLE_DEVICES=0,1 deepspeed --num_gpus 1", 1),
    ] {
        let c = run(&none, launch).unwrap_or_else(|e| panic!("{launch}: {e}"));
        assert_eq!(job(&c).world_size, world, "{launch}");
    }
    for (launch, says) in [
        ("deepspeed --exclude localhost:0", "cannot count"),
        ("deepspeed --include localhost", "cannot count"),
        ("deepspeed --include node1:0", "node1 is not in a hostfile"),
    ] {
        let e = run(&none, launch).unwrap_err();
        assert!(e.contains(says), "{launch}: {e}");
    }
}

const ACCELERATE_DS: &str = "compute_environment: LOCAL_MACHINE
debug: false
deepspeed_config:
  gradient_accumulation_steps: 1
  offload_optimizer_device: cpu
  offload_param_device: none
  zero3_init_flag: true
  zero_stage: 3
distributed_type: DEEPSPEED
downcast_bf16: 'no'
deepspeed_multinode_launcher: standard
machine_rank: 0
main_training_function: main
mixed_precision: bf16
num_machines: 2
num_processes: 16
rdzv_backend: static
same_network: true
use_cpu: false
";

const ACCELERATE_FSDP: &str = "distributed_type: FSDP
fsdp_config:
  fsdp_sharding_strategy: 3
  fsdp_offload_params: true
  fsdp_activation_checkpointing: true
  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer
mixed_precision: fp16
num_processes: 4
";

#[test]
fn accelerate_config_files_make_the_job() {
    let files = Here(
        HashMap::from([("ds.yaml", ACCELERATE_DS), ("fsdp.yaml", ACCELERATE_FSDP)]),
        Some("/home/u/.cache/huggingface/accelerate/default_config.yaml"),
    );
    let c = run(&files, "accelerate launch --config_file ds.yaml").unwrap();
    let j = job(&c);
    assert_eq!((j.world_size, j.bf16, j.zero_stage), (16, true, 2));
    let notes = c.notes.join("\n");
    for n in [
        "ds.yaml: num_processes 16: accelerate's count over all machines",
        "8 processes on each of the 2 machines: world_size 16",
        "ds.yaml: mixed_precision bf16: as `bf16: true`",
        "ds.yaml: zero_stage 3: as `zero_stage: 2`",
        "ds.yaml: offload_optimizer_device cpu: herd does not offload",
    ] {
        assert!(notes.contains(n), "{n:?} not in {notes}");
    }
    assert!(!notes.contains("offload_param_device"), "{notes}");
    // The command line wins over the file, as in accelerate.
    let c = run(
        &files,
        "accelerate launch --config_file ds.yaml --num_processes 8 --mixed_precision no",
    )
    .unwrap();
    let j = job(&c);
    assert_eq!((j.world_size, j.bf16), (8, false));

    let c = run(&files, "accelerate launch --config_file fsdp.yaml").unwrap();
    let j = job(&c);
    assert_eq!((j.world_size, j.zero_stage, j.bf16), (4, 0, false));
    assert!(j.gradient_checkpointing);
    let notes = c.notes.join("\n");
    for n in [
        "fsdp_sharding_strategy 3: plain data parallel, as `zero_stage: 0`",
        "fsdp_offload_params true: herd does not offload",
        "mixed_precision fp16: herd has no fp16",
    ] {
        assert!(notes.contains(n), "{n:?} not in {notes}");
    }

    let e = run(&files, "accelerate launch --config_file gone.yaml").unwrap_err();
    assert!(
        e.contains("--config_file gone.yaml: cannot read it here"),
        "{e}"
    );
}

#[test]
fn accelerate_reads_its_default_config_file_when_there_is_one() {
    let default = "/home/u/.cache/huggingface/accelerate/default_config.yaml";
    let files = Here(HashMap::from([(default, ACCELERATE_DS)]), Some(default));
    let c = run(&files, "accelerate launch").unwrap();
    assert_eq!(job(&c).world_size, 16);
    assert!(
        c.notes
            .iter()
            .any(|n| n.contains("default config file") && n.contains(default)),
        "{:#?}",
        c.notes
    );
    // --cpu makes accelerate skip it.
    let c = run(&files, "accelerate launch --cpu --num_processes 2").unwrap();
    assert_eq!(job(&c).world_size, 2);
    assert!(!job(&c).bf16);
}

#[test]
fn accelerate_deepspeed_config_file_is_the_jobs() {
    let files = Here(HashMap::new(), None);
    let c = run(
        &files,
        "accelerate launch --num_processes 2 --use_deepspeed --deepspeed_config_file ds.json",
    )
    .unwrap();
    assert!(c.yaml.contains("\ndeepspeed: ds.json\n"), "{}", c.yaml);
}

#[test]
fn secrets_are_not_repeated() {
    let cmd = words(
        "HF_TOKEN=hf_abc WANDB_MODE=offline torchrun train.py --hub_token hf_def \
         --push_to_hub --hub_token=hf_ghi",
    );
    let shown = redacted(&cmd).join(" ");
    assert!(!shown.contains("hf_"), "{shown}");
    assert!(shown.contains("WANDB_MODE=offline"), "{shown}");
    let e = convert(&cmd).unwrap_err();
    assert!(!e.contains("hf_"), "{e}");
}

#[test]
fn accelerate_deepspeed_over_machines_counts_its_hostfile() {
    let config = "distributed_type: DEEPSPEED
deepspeed_config:
  deepspeed_hostfile: hosts
  deepspeed_multinode_launcher: pdsh
  zero_stage: 2
num_machines: 2
num_processes: 16
";
    let files = Here(
        HashMap::from([("acc.yaml", config), ("hosts", HOSTS)]),
        None,
    );
    // deepspeed --hostfile hosts --num_gpus 8: every host of it, 8 ranks each.
    let c = run(&files, "accelerate launch --config_file acc.yaml").unwrap();
    assert_eq!(job(&c).world_size, 24);
    let c = run(
        &files,
        "accelerate launch --config_file acc.yaml --deepspeed_inclusion_filter node1@node3:0",
    )
    .unwrap();
    assert_eq!(job(&c).world_size, 9);
    let files = Here(HashMap::from([("acc.yaml", config)]), None);
    let e = run(&files, "accelerate launch --config_file acc.yaml").unwrap_err();
    assert!(e.contains("--hostfile hosts: cannot read it here"), "{e}");
    // Several machines without DeepSpeed: num_processes / num_machines on each.
    let c = run(
        &files,
        "accelerate launch --multi_gpu --num_processes 7 --num_machines 2",
    )
    .unwrap();
    assert_eq!(job(&c).world_size, 6);
}
