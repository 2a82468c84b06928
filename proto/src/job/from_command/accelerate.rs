//! `accelerate launch`: its options and its config file (--config_file, or the default one
//! accelerate reads when it exists) as accelerate's `_validate_launch_command` merges them, the
//! command line winning. What they change becomes job keys: num_processes (accelerate's count
//! over all machines) the world size, mixed_precision bf16 `bf16: true`, DeepSpeed's ZeRO stage
//! and FSDP's sharding strategy `zero_stage`; what herd does not do (offload, fp16, stage 3's
//! sharded parameters) is said, and a setting it cannot count ranks without is refused.

use serde_yaml::{Mapping, Value};

use super::launcher::{count, Opts, COUNT_HINT};
use super::options::accelerate_needless;
use super::script::{sharding, OFFLOAD};
use super::{Files, FP16};

/// One setting, from the command line or the config file (`from`).
struct Setting {
    name: String,
    value: Option<String>,
    from: Option<String>,
}

impl Setting {
    /// How a note names it: `--zero_stage 3`, or `accel.yaml: zero_stage 3`.
    fn shown(&self) -> String {
        let secret = super::SECRET_FLAGS.contains(&self.name.as_str());
        let v = match (&self.value, secret) {
            (Some(v), false) => format!(" {v}"),
            _ => String::new(),
        };
        match &self.from {
            None => format!("--{}{v}", self.name),
            Some(file) => format!("{file}: {}{v}", self.name),
        }
    }

    /// A config's `false`, `no`, `none` or empty value.
    fn off(&self) -> bool {
        self.value.as_deref().is_none_or(|v| {
            matches!(
                v.to_ascii_lowercase().as_str(),
                "false" | "no" | "none" | "" | "[]" | "{}"
            )
        })
    }

    fn on(&self) -> bool {
        self.value
            .as_deref()
            .is_none_or(|v| matches!(v.to_ascii_lowercase().as_str(), "true" | "yes" | "1"))
    }
}

/// The world size; the keys accelerate's settings give go to `keys`.
pub(super) fn read(
    opts: &Opts,
    files: &dyn Files,
    keys: &mut Vec<(&'static str, Value)>,
    notes: &mut Vec<String>,
    errors: &mut Vec<String>,
) -> usize {
    let given = |k: &str| opts.iter().any(|(n, _)| n == k);
    let named = opts
        .iter()
        .rev()
        .find(|(n, _)| n == "config_file")
        .and_then(|(_, v)| v.clone());
    // accelerate reads its default config when it exists, unless told --cpu.
    let default = match given("cpu") {
        true => None,
        false => files.accelerate_default_config(),
    };
    let mut settings = Vec::new();
    let config = match (&named, &default) {
        (Some(path), _) => match files.read(path) {
            Ok(text) => Some((path.clone(), text)),
            Err(e) => {
                errors.push(format!(
                    "accelerate launch --config_file {path}: cannot read it here ({e}): its \
                     num_processes, mixed_precision and distributed settings make the job; run \
                     `herd from-command` where the file is, or give them on the command line \
                     (--num_processes N, --mixed_precision bf16 …)"
                ));
                return 1;
            }
        },
        (None, Some(path)) => match files.read(path) {
            Ok(text) => {
                notes.push(format!(
                    "accelerate reads its default config file {path} when given no \
                     --config_file; the one here was read (the machine that trains must have \
                     the same)"
                ));
                Some((path.clone(), text))
            }
            Err(_) => None,
        },
        (None, None) => None,
    };
    if let Some((path, text)) = &config {
        match serde_yaml::from_str::<Mapping>(text) {
            Ok(map) => flatten(&map, path, &mut settings),
            Err(e) => {
                errors.push(format!("accelerate config {path}: {e}"));
                return 1;
            }
        }
    }
    settings.extend(
        opts.iter()
            .filter(|(n, _)| n != "config_file")
            .map(|(n, v)| Setting {
                name: n.clone(),
                value: v.clone(),
                from: None,
            }),
    );
    let get = |k: &str| settings.iter().rev().find(|s| s.name == k);
    // Read below, or said through what they set.
    let mut handled: Vec<&str> = vec![
        "config_file",
        "num_processes",
        "num_machines",
        "compute_environment",
        "distributed_type",
        "use_deepspeed",
        "use_fsdp",
        "use_megatron_lm",
        "tpu",
    ];

    if get("compute_environment")
        .and_then(|s| s.value.as_deref())
        .is_some_and(|v| v == "AMAZON_SAGEMAKER")
    {
        errors.push(format!(
            "{}: herd runs on its own workers, not on SageMaker",
            get("compute_environment").expect("checked").shown()
        ));
    }
    // The paradigm: the command line's, else the config's distributed_type.
    let chosen: Vec<&str> = [
        "multi_gpu",
        "use_deepspeed",
        "use_fsdp",
        "use_megatron_lm",
        "tpu",
    ]
    .into_iter()
    .filter(|f| given(f))
    .collect();
    if chosen.len() > 1 {
        errors.push(format!(
            "accelerate launch --{}: accelerate takes one of them at a time",
            chosen.join(" --")
        ));
    }
    let paradigm = match chosen.first() {
        Some(&"use_deepspeed") => "DEEPSPEED".to_string(),
        Some(&"use_fsdp") => "FSDP".to_string(),
        Some(&"use_megatron_lm") => "MEGATRON_LM".to_string(),
        Some(&"tpu") => "XLA".to_string(),
        Some(_) => "MULTI_GPU".to_string(),
        None => get("distributed_type")
            .and_then(|s| s.value.clone())
            .unwrap_or_else(|| "NO".into())
            .to_ascii_uppercase(),
    };
    match paradigm.as_str() {
        "MEGATRON_LM" => errors.push(
            "accelerate's Megatron-LM (tensor and pipeline parallelism): herd has data \
             parallelism only; write the job by hand with world_size and zero_stage"
                .into(),
        ),
        "XLA" | "TPU" => {
            errors.push("accelerate on TPUs: herd trains on CPUs and CUDA GPUs".into())
        }
        _ => {}
    }

    // The ranks: num_processes counts them over all machines.
    let world = match get("num_processes") {
        Some(s) => match count("num_processes", s.value.as_deref().unwrap_or("")) {
            Ok(n) => {
                if s.from.is_some() {
                    notes.push(format!(
                        "{}: accelerate's count over all machines",
                        s.shown()
                    ));
                }
                n
            }
            Err(e) => {
                errors.push(e);
                1
            }
        },
        None => {
            notes.push(match &config {
                Some((path, _)) => format!(
                    "{path} gives no num_processes: world_size 1 was assumed; set world_size \
                     in the job (accelerate would start one process per GPU)"
                ),
                None => "accelerate launch without --num_processes reads its default config \
                         file (~/.cache/huggingface/accelerate/default_config.yaml) where it \
                         runs, or else starts one process per GPU of the machine; none was read \
                         here, so world_size 1 was assumed: set world_size in the job"
                    .to_string(),
            });
            1
        }
    };
    let machines = get("num_machines").and_then(|s| s.value.as_deref()?.parse::<usize>().ok());
    let world = match machines.filter(|m| *m > 1) {
        None => world,
        Some(m) => {
            let shown = get("num_machines").expect("given").shown();
            let launcher = get("deepspeed_multinode_launcher").and_then(|s| s.value.as_deref());
            if paradigm == "DEEPSPEED" && launcher != Some("standard") {
                handled.extend(["deepspeed_hostfile", "deepspeed_inclusion_filter"]);
                handled.push("deepspeed_exclusion_filter");
                multinode_deepspeed(&get, world / m, files, notes, errors)
            } else {
                let per = world / m;
                notes.push(format!(
                    "{shown}: accelerate starts num_processes / num_machines = {per} processes \
                     on each of the {m} machines: world_size {}",
                    per * m
                ));
                per * m
            }
        }
    };

    handled.push("mixed_precision");
    if let Some(s) = get("mixed_precision") {
        match s
            .value
            .as_deref()
            .unwrap_or("")
            .to_ascii_lowercase()
            .as_str()
        {
            "bf16" => {
                keys.push(("bf16", Value::Bool(true)));
                notes.push(format!("{}: as `bf16: true`", s.shown()));
            }
            "no" => notes.push(format!(
                "{}: herd's GPU ranks compute in bf16 either way (CPU ranks in f32); without \
                 `bf16: true` the final model is f32",
                s.shown()
            )),
            _ => notes.push(format!("{}: {FP16}", s.shown())),
        }
    }

    if paradigm == "DEEPSPEED" {
        deepspeed(&get, keys, notes, errors, &mut handled);
    }
    if paradigm == "FSDP" {
        fsdp(&get, keys, notes, &mut handled);
    }
    if get("max_restarts").is_some() {
        handled.push("max_restarts");
        let s = get("max_restarts").expect("checked");
        notes.push(format!(
            "{}: herd's max_restarts is a job key; set it there",
            s.shown()
        ));
    }

    // The rest, each said once: the command line's one by one, the config's together.
    let mut seen: Vec<&str> = Vec::new();
    let mut from_config: Vec<(&str, Vec<String>)> = Vec::new();
    let mut unread: Vec<String> = Vec::new();
    for s in settings.iter().rev() {
        if handled.contains(&s.name.as_str()) || seen.contains(&s.name.as_str()) {
            continue;
        }
        seen.push(&s.name);
        // A config's switch that is off, or a value left empty, says nothing.
        if s.from.is_some() && s.off() {
            continue;
        }
        let why = match accelerate_needless(&s.name) {
            Some(why) => why,
            None if is_deepspeed_setting(&s.name) || s.name.starts_with("fsdp_") => {
                "not used: accelerate reads it with DeepSpeed or FSDP only"
            }
            None if s.name.starts_with("megatron_lm") => {
                "not used: accelerate reads it with Megatron-LM only"
            }
            None => {
                unread.push(s.name.clone());
                continue;
            }
        };
        match &s.from {
            None => notes.push(format!("{}: {why}", s.shown())),
            // The config's, one note for each reason.
            Some(_) => match from_config.iter_mut().find(|(w, _)| *w == why) {
                Some((_, names)) => names.push(s.name.clone()),
                None => from_config.push((why, vec![s.name.clone()])),
            },
        }
    }
    if let Some((path, _)) = &config {
        from_config.reverse();
        for (why, mut names) in from_config {
            names.reverse();
            notes.push(format!("{path}: {}: {why}", names.join(", ")));
        }
        if !unread.is_empty() {
            unread.reverse();
            notes.push(format!(
                "{path}: not read (settings herd does not know): {}",
                unread.join(", ")
            ));
        }
    } else if !unread.is_empty() {
        // Every command-line option is in FLAGS or VALUES, so each has a note above.
        unread.reverse();
        notes.push(format!("not read: {}", unread.join(", ")));
    }
    world
}

fn is_deepspeed_setting(name: &str) -> bool {
    name.starts_with("zero")
        || name.starts_with("offload_")
        || name.starts_with("deepspeed_")
        || name == "gradient_accumulation_steps"
        || name == "gradient_clipping"
}

/// A config file's settings as accelerate sets them on its arguments: top-level keys by
/// name, deepspeed_config's and dynamo_config's by theirs, fsdp_config's with `fsdp_` added.
fn flatten(map: &Mapping, path: &str, out: &mut Vec<Setting>) {
    let text = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        other => serde_yaml::to_string(other)
            .ok()
            .map(|s| s.trim().to_string()),
    };
    for (k, v) in map {
        let Some(k) = k.as_str() else { continue };
        let section = |prefix: &str, m: &Mapping, out: &mut Vec<Setting>| {
            for (k, v) in m {
                let Some(k) = k.as_str() else { continue };
                let name = match prefix.is_empty() || k.starts_with(prefix) {
                    true => k.to_string(),
                    false => format!("{prefix}{k}"),
                };
                out.push(Setting {
                    name,
                    value: text(v),
                    from: Some(path.to_string()),
                });
            }
        };
        match (k, v) {
            ("fsdp_config", Value::Mapping(m)) => section("fsdp_", m, out),
            (_, Value::Mapping(m)) if k.ends_with("_config") => section("", m, out),
            _ => out.push(Setting {
                name: k.to_string(),
                value: text(v),
                from: Some(path.to_string()),
            }),
        }
    }
}

/// accelerate's DeepSpeed plugin: a config file, or the ZeRO stage (2 unless given) and offload.
fn deepspeed<'a>(
    get: &dyn Fn(&str) -> Option<&'a Setting>,
    keys: &mut Vec<(&'static str, Value)>,
    notes: &mut Vec<String>,
    errors: &mut Vec<String>,
    handled: &mut Vec<&str>,
) {
    handled.extend([
        "deepspeed_config_file",
        "zero_stage",
        "offload_optimizer_device",
        "offload_param_device",
        "offload_optimizer_nvme_path",
        "offload_param_nvme_path",
        "gradient_accumulation_steps",
        "gradient_clipping",
    ]);
    if let Some(f) = get("deepspeed_config_file").filter(|s| s.value.is_some()) {
        let path = f.value.clone().expect("filtered");
        keys.push(("deepspeed", Value::String(path)));
        notes.push(format!(
            "{}: as the job's `deepspeed` (read as HF Trainer reads it; its ZeRO stage is the \
             job's)",
            f.shown()
        ));
    } else {
        let stage = get("zero_stage");
        let n = stage
            .and_then(|s| s.value.as_deref())
            .unwrap_or("2")
            .parse::<u8>()
            .ok()
            .filter(|n| *n <= 3);
        let shown = stage.map_or(
            "--use_deepspeed (accelerate's default ZeRO stage, 2)".into(),
            Setting::shown,
        );
        match n {
            None => errors.push(format!("{shown}: DeepSpeed's stages are 0, 1, 2 and 3")),
            Some(3) => {
                keys.push(("zero_stage", 2.into()));
                notes.push(format!(
                    "{shown}: as `zero_stage: 2`: ZeRO stage 3 (sharded parameters) is not \
                     built, so the optimizer state and gradients are sharded and the \
                     parameters whole on every rank"
                ));
            }
            Some(n) => {
                keys.push(("zero_stage", n.into()));
                notes.push(format!("{shown}: as `zero_stage: {n}`"));
            }
        }
    }
    for what in ["offload_optimizer_device", "offload_param_device"] {
        if let Some(s) = get(what).filter(|s| !matches!(s.value.as_deref(), None | Some("none"))) {
            notes.push(format!(
                "{}: herd does not offload: that state stays in GPU memory",
                s.shown()
            ));
        }
    }
    for what in ["offload_optimizer_nvme_path", "offload_param_nvme_path"] {
        if let Some(s) = get(what).filter(|s| !matches!(s.value.as_deref(), None | Some("none"))) {
            notes.push(format!("{}: not needed, herd does not offload", s.shown()));
        }
    }
    if let Some(s) = get("gradient_accumulation_steps") {
        notes.push(format!(
            "{}: the job's gradient_accumulation_steps is the script's (HF Trainer requires \
             the two to agree)",
            s.shown()
        ));
    }
    if let Some(s) = get("gradient_clipping") {
        notes.push(format!(
            "{}: the job's max_grad_norm is the script's (HF Trainer requires the two to agree)",
            s.shown()
        ));
    }
}

/// accelerate's FSDP plugin: the sharding strategy (FULL_SHARD unless given) as the ZeRO
/// stage `--fsdp` gives, offload and activation checkpointing told.
fn fsdp<'a>(
    get: &dyn Fn(&str) -> Option<&'a Setting>,
    keys: &mut Vec<(&'static str, Value)>,
    notes: &mut Vec<String>,
    handled: &mut Vec<&str>,
) {
    handled.extend([
        "fsdp_sharding_strategy",
        "fsdp_reshard_after_forward",
        "fsdp_offload_params",
        "fsdp_activation_checkpointing",
    ]);
    let v2 = get("fsdp_version").and_then(|s| s.value.as_deref()) == Some("2");
    let (shown, strategy) = match (
        v2,
        get("fsdp_reshard_after_forward"),
        get("fsdp_sharding_strategy"),
    ) {
        (true, Some(s), _) => (
            s.shown(),
            if s.on() {
                "FULL_SHARD"
            } else {
                "SHARD_GRAD_OP"
            }
            .to_string(),
        ),
        (false, _, Some(s)) => (s.shown(), s.value.clone().unwrap_or_default()),
        _ => (
            "FSDP (accelerate's default strategy, FULL_SHARD)".to_string(),
            "FULL_SHARD".into(),
        ),
    };
    // Older configs number the strategies as torch's ShardingStrategy enum.
    let strategy = match strategy.as_str() {
        "1" => "FULL_SHARD".to_string(),
        "2" => "SHARD_GRAD_OP".to_string(),
        "3" => "NO_SHARD".to_string(),
        "4" => "HYBRID_SHARD".to_string(),
        "5" => "HYBRID_SHARD_ZERO2".to_string(),
        s => s.to_ascii_uppercase(),
    };
    if strategy == "NO_SHARD" {
        keys.push(("zero_stage", 0.into()));
        notes.push(format!("{shown}: plain data parallel, as `zero_stage: 0`"));
    } else {
        keys.push(("zero_stage", 2.into()));
        notes.push(format!(
            "{shown}: as `zero_stage: 2` ({})",
            sharding(&strategy)
        ));
    }
    if let Some(s) = get("fsdp_offload_params").filter(|s| s.on()) {
        notes.push(format!("{}: {OFFLOAD}", s.shown()));
    }
    if let Some(s) = get("fsdp_activation_checkpointing").filter(|s| s.on()) {
        keys.push(("gradient_checkpointing", Value::Bool(true)));
        notes.push(format!("{}: as `gradient_checkpointing: true`", s.shown()));
    }
}

/// accelerate's DeepSpeed over several machines (its pdsh, openmpi, mvapich, mpich or nossh
/// launcher): `deepspeed --hostfile H --num_gpus P` (or `--include`/`--exclude` its filter), so
/// every host of H gets P ranks, as DeepSpeed counts them.
fn multinode_deepspeed<'a>(
    get: &dyn Fn(&str) -> Option<&'a Setting>,
    per_machine: usize,
    files: &dyn Files,
    notes: &mut Vec<String>,
    errors: &mut Vec<String>,
) -> usize {
    let Some(hostfile) = get("deepspeed_hostfile").filter(|s| !s.off()) else {
        errors.push(format!(
            "accelerate's DeepSpeed over several machines starts `deepspeed --hostfile \
             deepspeed_hostfile`, and none is given: herd cannot count the ranks; {COUNT_HINT}"
        ));
        return 1;
    };
    let path = hostfile.value.clone().expect("not off");
    let mut opts: Opts = vec![("hostfile".into(), Some(path.clone()))];
    let filter = [
        ("deepspeed_exclusion_filter", "exclude"),
        ("deepspeed_inclusion_filter", "include"),
    ]
    .into_iter()
    .find_map(|(k, flag)| get(k).filter(|s| !s.off()).map(|s| (flag, s)));
    let how = match filter {
        Some((flag, s)) => {
            let v = s.value.clone().expect("not off");
            opts.push((flag.into(), Some(v.clone())));
            format!("--{flag} {v}")
        }
        None => {
            opts.push(("num_gpus".into(), Some(per_machine.to_string())));
            format!("--num_gpus {per_machine} (num_processes / num_machines)")
        }
    };
    notes.push(format!(
        "{}: accelerate runs `deepspeed --hostfile {path} {how}` on every host it lists",
        hostfile.shown()
    ));
    match super::hostfile::world(&opts, &[], files, notes) {
        Ok(n) => n,
        Err(e) => {
            errors.push(e);
            1
        }
    }
}
