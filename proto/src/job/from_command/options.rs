//! The launchers' options as their argparse parsers declare them, in underscore spelling:
//! those that take no value, those that take one, and short names. A word is the script only
//! where the launcher would take it as such. Also why accelerate's harmless settings need no
//! counterpart.

use super::launcher::{DEVICE, LOGS, PROCESS, RDZV};

pub(super) type Short = &'static [(&'static str, &'static str)];

/// torch.distributed.run's (torchrun's) options; `use_env` is torch.distributed.launch's.
pub(super) const TORCHRUN_FLAGS: &[&str] =
    &["standalone", "module", "no_python", "run_path", "use_env"];
pub(super) const TORCHRUN_VALUES: &[&str] = &[
    "nnodes",
    "nproc_per_node",
    "rdzv_backend",
    "rdzv_endpoint",
    "rdzv_id",
    "rdzv_conf",
    "max_restarts",
    "monitor_interval",
    "start_method",
    "event_log_handler",
    "role",
    "log_dir",
    "redirects",
    "tee",
    "local_ranks_filter",
    "node_rank",
    "master_addr",
    "master_port",
    "local_addr",
    "logs_specs",
    "numa_binding",
    "signals_to_handle",
];
pub(super) const TORCHRUN_SHORT: Short = &[("m", "module"), ("r", "redirects"), ("t", "tee")];

/// deepspeed's (deepspeed/launcher/runner.py) options.
pub(super) const DEEPSPEED_FLAGS: &[&str] = &[
    "module",
    "no_python",
    "no_local_rank",
    "no_ssh",
    "no_ssh_check",
    "force_multi",
    "save_pid",
    "elastic_training",
    "bind_cores_to_rank",
];
pub(super) const DEEPSPEED_VALUES: &[&str] = &[
    "hostfile",
    "include",
    "exclude",
    "num_nodes",
    "min_elastic_nodes",
    "max_elastic_nodes",
    "num_gpus",
    "num_accelerators",
    "master_port",
    "master_addr",
    "node_rank",
    "launcher",
    "launcher_args",
    "enable_each_rank_log",
    "autotuning",
    "comment",
    "account",
    "bind_core_list",
    "ssh_port",
];
pub(super) const DEEPSPEED_SHORT: Short = &[("H", "hostfile"), ("i", "include"), ("e", "exclude")];

/// The interpreter's own options before the script or `-m module`.
pub(super) const PYTHON_FLAGS: &[&str] = &["u", "B", "O", "OO", "E", "s", "S", "I", "b", "bb", "q"];
pub(super) const PYTHON_VALUES: &[&str] = &["W", "X", "m"];

/// accelerate launch's options (accelerate/commands/launch.py).
pub(super) const ACCELERATE_FLAGS: &[&str] = &[
    "quiet",
    "cpu",
    "use_cpu",
    "multi_gpu",
    "tpu",
    "ipex",
    "use_xpu",
    "mps",
    "use_deepspeed",
    "use_fsdp",
    "use_megatron_lm",
    "same_network",
    "module",
    "no_python",
    "tpu_cluster",
    "no_tpu_cluster",
    "tpu_use_sudo",
    "downcast_bf16",
    "debug",
    "enable_cpu_affinity",
    "dynamo_use_fullgraph",
    "dynamo_use_dynamic",
    "dynamo_use_regional_compilation",
    "fp8_use_autocast_during_eval",
];

pub(super) const ACCELERATE_VALUES: &[&str] = &[
    "config_file",
    "mixed_precision",
    "num_processes",
    "num_machines",
    "num_cpu_threads_per_process",
    "dynamo_backend",
    "dynamo_mode",
    "gpu_ids",
    "machine_rank",
    "main_process_ip",
    "main_process_port",
    "tee",
    "log_dir",
    "role",
    "rdzv_backend",
    "rdzv_conf",
    "max_restarts",
    "monitor_interval",
    "vm",
    "env",
    "main_training_function",
    "deepspeed_config_file",
    "zero_stage",
    "offload_optimizer_device",
    "offload_param_device",
    "offload_optimizer_nvme_path",
    "offload_param_nvme_path",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "zero3_init_flag",
    "zero3_save_16bit_model",
    "deepspeed_hostfile",
    "deepspeed_exclusion_filter",
    "deepspeed_inclusion_filter",
    "deepspeed_multinode_launcher",
    "deepspeed_moe_layer_cls_names",
    "fsdp_offload_params",
    "fsdp_min_num_params",
    "fsdp_sharding_strategy",
    "fsdp_auto_wrap_policy",
    "fsdp_transformer_layer_cls_to_wrap",
    "fsdp_backward_prefetch_policy",
    "fsdp_backward_prefetch",
    "fsdp_state_dict_type",
    "fsdp_forward_prefetch",
    "fsdp_use_orig_params",
    "fsdp_cpu_ram_efficient_loading",
    "fsdp_sync_module_states",
    "fsdp_activation_checkpointing",
    "fsdp_version",
    "fsdp_reshard_after_forward",
    "megatron_lm_tp_degree",
    "megatron_lm_pp_degree",
    "megatron_lm_num_micro_batches",
    "megatron_lm_sequence_parallelism",
    "megatron_lm_recompute_activations",
    "megatron_lm_use_distributed_optimizer",
    "megatron_lm_gradient_clipping",
    "fp8_backend",
    "fp8_margin",
    "fp8_interval",
    "fp8_format",
    "fp8_amax_history_len",
    "fp8_amax_compute_algo",
    "fp8_override_linear_precision",
    "fp8_opt_level",
    "aws_access_key_id",
    "aws_secret_access_key",
    "mpirun_hostfile",
    "mpirun_ccl",
    "tpu_name",
    "tpu_zone",
];

pub(super) const ACCELERATE_SHORT: Short = &[("m", "module"), ("q", "quiet"), ("t", "tee")];

/// Why an accelerate setting needs no counterpart, for those that change nothing herd does.
pub(super) fn accelerate_needless(name: &str) -> Option<&'static str> {
    Some(match name {
        "machine_rank"
        | "main_process_ip"
        | "main_process_port"
        | "same_network"
        | "rdzv_backend"
        | "rdzv_conf"
        | "monitor_interval"
        | "deepspeed_multinode_launcher"
        | "deepspeed_hostfile" => RDZV,
        "quiet" | "debug" | "tee" | "log_dir" | "role" => LOGS,
        "module"
        | "no_python"
        | "num_cpu_threads_per_process"
        | "enable_cpu_affinity"
        | "mpirun_hostfile"
        | "mpirun_ccl"
        | "mpirun_config"
        | "ipex_config" => PROCESS,
        "cpu" | "use_cpu" | "multi_gpu" | "gpu_ids" | "ipex" | "use_xpu" | "mps"
        | "downcast_bf16" => DEVICE,
        "tpu_cluster"
        | "no_tpu_cluster"
        | "tpu_use_cluster"
        | "tpu_use_sudo"
        | "vm"
        | "env"
        | "main_training_function"
        | "tpu_name"
        | "tpu_zone"
        | "tpu_env"
        | "commands"
        | "command_file" => "TPU launch settings, not needed: herd trains on CPUs and CUDA GPUs",
        "aws_access_key_id" | "aws_secret_access_key" => {
            "not needed: herd does not launch on SageMaker"
        }
        "zero3_init_flag" | "zero3_save_16bit_model" => {
            "not needed: herd's parameters are whole on every rank, and the final model is \
             written whole"
        }
        "deepspeed_moe_layer_cls_names" => "not needed: herd trains dense LLaMA models",
        _ if name.starts_with("dynamo_") => {
            "not needed: herd has no torch.compile (dynamo); its kernels are built ahead of time"
        }
        _ if name.starts_with("fp8_") => "not needed: herd has no fp8 (see mixed_precision)",
        _ if name.starts_with("fsdp_") => {
            "not needed, herd shards by ZeRO stage, not by module wrapping"
        }
        _ => return None,
    })
}
