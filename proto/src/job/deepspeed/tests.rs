use super::*;
use std::path::Path;

/// The GPT-4-LLM recipe's job: 16 ranks × batch 1 × accumulation 4.
const JOB: &str = "model_name_or_path: m\ndata_path: d.json\noutput_dir: out\nworld_size: 16\n\
                   per_device_train_batch_size: 1\ngradient_accumulation_steps: 4\n\
                   learning_rate: 2.0e-5\nlr_scheduler_type: cosine\n";

fn job() -> JobSpec {
    JobSpec::from_yaml_str(JOB, "job.yaml").unwrap()
}

fn config(json: &str) -> Map<String, Value> {
    serde_json::from_str(json).unwrap()
}

/// A ZeRO-3 config with optimizer and parameter offload and "auto" everywhere, as the recipe's
/// ds_config.json is described (train_batch_size 64 written out).
const RECIPE: &str = r#"{
  "bf16": {"enabled": "auto"},
  "fp16": {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 16},
  "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
  "zero_optimization": {
    "stage": 3,
    "offload_optimizer": {"device": "cpu", "pin_memory": true},
    "offload_param": {"device": "cpu", "pin_memory": true},
    "overlap_comm": true,
    "contiguous_gradients": true,
    "stage3_gather_16bit_weights_on_model_save": true
  },
  "gradient_accumulation_steps": "auto",
  "gradient_clipping": "auto",
  "steps_per_print": 2000,
  "train_batch_size": 64,
  "train_micro_batch_size_per_gpu": "auto",
  "wall_clock_breakdown": false
}"#;

#[test]
fn the_recipes_zero_3_offload_config_runs_as_stage_2_and_says_so() {
    let mut spec = job();
    let warnings = apply(&mut spec, &config(RECIPE), "job.yaml").unwrap();
    assert_eq!(spec.zero_stage, 2);
    // Nothing else of the job moved: every number came from it ("auto") or agreed with it.
    let mut expected = job();
    expected.zero_stage = 2;
    assert_eq!(spec, expected);
    assert_eq!(warnings.len(), 4, "{warnings:#?}");
    assert!(warnings[0].contains("ZeRO stage 3") && warnings[0].contains("runs as stage 2"));
    assert!(
        warnings[1].contains("offload_optimizer to cpu"),
        "{}",
        warnings[1]
    );
    assert!(
        warnings[2].contains("offload_param to cpu"),
        "{}",
        warnings[2]
    );
    assert_eq!(
        warnings[3],
        "ignored (herd sizes its own buckets and has no such setting): \
         zero_optimization.contiguous_gradients, zero_optimization.overlap_comm, \
         zero_optimization.stage3_gather_16bit_weights_on_model_save"
    );
    // Applying it again (a stored job is parsed again by each worker) changes nothing.
    let again = apply(&mut spec, &config(RECIPE), "job.yaml").unwrap();
    assert_eq!((spec, again), (expected, warnings));
}

#[test]
fn numbers_that_disagree_with_the_job_are_refused_all_at_once() {
    let mut spec = job();
    let e = apply(
        &mut spec,
        &config(
            r#"{"train_batch_size": 32, "gradient_clipping": 0.5, "bf16": {"enabled": true},
                "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.95]}}}"#,
        ),
        "job.yaml",
    )
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("job.yaml: key `deepspeed`: "), "{e}");
    for part in [
        "`train_batch_size` is 32 but the job's world_size × per_device_train_batch_size × \
         gradient_accumulation_steps (16 × 1 × 4) is 64",
        "`gradient_clipping` is 0.5 but the job's max_grad_norm is 1.0",
        "`optimizer.params.lr` is 0.0001 but the job's learning_rate is 0.00002",
        "`optimizer.params.betas` is [0.9,0.95] but the job's [adam_beta1, adam_beta2] is [0.9,0.999]",
        "`bf16.enabled` is true but the job's bf16 is false",
    ] {
        assert!(e.contains(part), "missing {part:?} in {e}");
    }
    assert_eq!(spec, job(), "a refused config changes nothing");
}

#[test]
fn equal_numbers_agree_whatever_their_json_spelling() {
    let mut spec = job();
    let c = config(
        r#"{"train_batch_size": 64.0, "gradient_clipping": 1, "train_micro_batch_size_per_gpu": 1,
                      "optimizer": {"type": "adam", "params": {"lr": 2e-5, "betas": [0.9, 0.999], "eps": 1e-8}}}"#,
    );
    assert_eq!(apply(&mut spec, &c, "j").unwrap(), Vec::<String>::new());
    assert_eq!(spec, job());
}

#[test]
fn what_herd_cannot_follow_is_refused_with_the_way_out() {
    let cases = [
        (
            r#"{"scheduler": {"type": "OneCycle", "params": {"cycle_min_lr": 0}}}"#,
            "`scheduler.type` OneCycle is not supported",
        ),
        (
            r#"{"optimizer": {"type": "Lamb"}}"#,
            "`optimizer.type` is \"Lamb\" but herd trains with AdamW",
        ),
        (
            r#"{"optimizer": {"type": "Adam", "params": {"adam_w_mode": false}}}"#,
            "`optimizer.type` is \"Adam\"",
        ),
        (
            r#"{"zero_optimization": {"stage": 5}}"#,
            "`zero_optimization.stage` is 5 but DeepSpeed's stages are 0, 1, 2 and 3",
        ),
    ];
    for (json, says) in cases {
        let e = apply(&mut job(), &config(json), "j")
            .unwrap_err()
            .to_string();
        assert!(e.contains(says), "{json}: {e}");
    }
    let e = apply(&mut job(), &config(cases[0].0), "j")
        .unwrap_err()
        .to_string();
    assert!(e.contains("to use the job's lr_scheduler_type"), "{e}");
}

#[test]
fn a_deepspeed_scheduler_replaces_lr_scheduler_type_and_says_so() {
    let mut spec = job();
    let c = config(
        r#"{"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto",
            "warmup_max_lr": "auto", "warmup_num_steps": "auto", "total_num_steps": "auto"}}}"#,
    );
    let warnings = apply(&mut spec, &c, "j").unwrap();
    assert_eq!(
        warnings,
        ["the learning rate follows DeepSpeed's WarmupDecayLR from the scheduler section, as in \
          HF Trainer; lr_scheduler_type (cosine) is not used"]
    );
    spec.deepspeed = Some(DeepSpeed::Config(c));
    let s = scheduler_of(&spec).unwrap().unwrap();
    assert_eq!(s.kind, scheduler::DsScheduleKind::WarmupDecayLr);
    assert_eq!(s.warmup_max_lr, 2e-5);
    let e = apply(
        &mut job(),
        &config(r#"{"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 1e-3}}}"#),
        "j",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("j: key `deepspeed`") && e.contains("warmup_max_lr` is 0.001"),
        "{e}"
    );
}

#[test]
fn zero_stage_comes_from_the_config_unless_the_job_sets_another() {
    let two = config(r#"{"zero_optimization": {"stage": 2}}"#);
    let mut spec = job();
    apply(&mut spec, &two, "j").unwrap();
    assert_eq!(spec.zero_stage, 2);
    let mut one = job();
    one.zero_stage = 1;
    let e = apply(&mut one, &two, "j").unwrap_err().to_string();
    assert!(
        e.contains("`zero_optimization.stage` is 2 but the job's zero_stage is 1"),
        "{e}"
    );
}

#[test]
fn an_inline_config_folds_in_when_the_job_is_parsed() {
    let text =
        format!("{JOB}deepspeed:\n  zero_optimization:\n    stage: 2\n  train_batch_size: auto\n");
    let spec = JobSpec::from_yaml_str(&text, "job.yaml").unwrap();
    assert_eq!(spec.zero_stage, 2);
    // The stored YAML keeps it, and parses back to the same job.
    let back = JobSpec::from_yaml_str(&spec.to_yaml(), "stored").unwrap();
    assert_eq!(back, spec);
    let bad = format!("{JOB}deepspeed:\n  train_batch_size: 8\n");
    let e = JobSpec::from_yaml_str(&bad, "job.yaml")
        .unwrap_err()
        .to_string();
    assert!(e.contains("`train_batch_size` is 8"), "{e}");
}

#[test]
fn a_config_file_is_read_relative_to_the_base_and_stored_inline() {
    let dir = std::env::temp_dir().join(format!("herd-ds-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("configs")).unwrap();
    std::fs::write(dir.join("configs/ds_config.json"), RECIPE).unwrap();
    let text = format!("{JOB}deepspeed: configs/ds_config.json\n");
    let mut spec = JobSpec::from_yaml_str(&text, "job.yaml").unwrap();
    assert_eq!(spec.zero_stage, 0, "a file is only read when asked");
    let warnings = spec.load_deepspeed(&dir, "job.yaml").unwrap();
    assert_eq!(spec.zero_stage, 2);
    assert_eq!(warnings.len(), 4);
    assert!(matches!(spec.deepspeed, Some(DeepSpeed::Config(_))));
    assert_eq!(
        JobSpec::from_yaml_str(&spec.to_yaml(), "stored").unwrap(),
        spec
    );

    // A broken file: named, with the line and column of the fault.
    std::fs::write(
        dir.join("configs/bad.json"),
        "{\n  \"train_batch_size\": 64,\n}\n",
    )
    .unwrap();
    let mut bad =
        JobSpec::from_yaml_str(&format!("{JOB}deepspeed: configs/bad.json\n"), "job.yaml").unwrap();
    let e = bad
        .load_deepspeed(&dir, "job.yaml")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("job.yaml: deepspeed ") && e.contains("configs/bad.json"),
        "{e}"
    );
    assert!(e.contains("line 3 column 1"), "{e}");
    // JSON in a string, as `--deepspeed '{...}'` passes it: read as the config, not a path.
    let inline = format!("{JOB}deepspeed: '{{\"zero_optimization\": {{\"stage\": 1}}}}'\n");
    let mut spec = JobSpec::from_yaml_str(&inline, "job.yaml").unwrap();
    spec.load_deepspeed(&dir, "job.yaml").unwrap();
    assert_eq!(spec.zero_stage, 1);
    let cut = format!("{JOB}deepspeed: '{{\"zero_optimization\": {{\"stage\": 1'\n");
    let mut cut = JobSpec::from_yaml_str(&cut, "job.yaml").unwrap();
    let e = cut
        .load_deepspeed(&dir, "job.yaml")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("deepspeed (an inline JSON config)") && e.contains("EOF"),
        "{e}"
    );
    // A missing one.
    let mut gone =
        JobSpec::from_yaml_str(&format!("{JOB}deepspeed: nowhere.json\n"), "job.yaml").unwrap();
    let e = gone
        .load_deepspeed(Path::new(&dir), "job.yaml")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("nowhere.json") && e.contains("No such file"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
