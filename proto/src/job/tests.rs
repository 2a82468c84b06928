use super::*;

const MIN: &str = "model_name_or_path: m\ndata_path: d.json\noutput_dir: out\n";

#[test]
fn defaults_follow_training_arguments() {
    let j = JobSpec::from_yaml_str(MIN, "job.yaml").unwrap();
    assert_eq!(j.num_train_epochs, 3.0);
    assert_eq!(j.max_steps, -1);
    assert_eq!(j.per_device_train_batch_size, 8);
    assert_eq!(j.learning_rate, 5e-5);
    assert_eq!(
        (j.adam_beta1, j.adam_beta2, j.adam_epsilon),
        (0.9, 0.999, 1e-8)
    );
    assert_eq!(j.max_grad_norm, 1.0);
    assert_eq!(j.lr_scheduler_type, SchedulerType::Linear);
    assert_eq!(j.model_max_length, 512);
    assert_eq!(j.seed, 42);
    assert_eq!(j.save_total_limit, None);
}

#[test]
fn unknown_key_names_line_and_column() {
    let text = format!("{MIN}learning_rat: 2e-5\n");
    let err = JobSpec::from_yaml_str(&text, "job.yaml")
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("job.yaml: 1 key herd does not take"),
        "{err}"
    );
    assert!(
        err.contains("line 4: `learning_rat`: unknown field, did you mean `learning_rate`?"),
        "{err}"
    );
}

#[test]
fn wrong_type_names_line_and_column() {
    let text = format!("{MIN}per_device_train_batch_size: four\n");
    let err = JobSpec::from_yaml_str(&text, "j.yaml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("per_device_train_batch_size"), "{err}");
    assert!(err.contains("line 4 column"), "{err}");
}

#[test]
fn missing_required_key_is_named() {
    let err = JobSpec::from_yaml_str("data_path: d\noutput_dir: o\n", "j.yaml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing field `model_name_or_path`"), "{err}");
}

#[test]
fn nonsense_values_are_refused_with_the_key() {
    for (extra, key) in [
        (
            "per_device_train_batch_size: 0",
            "per_device_train_batch_size",
        ),
        ("world_size: 0", "world_size"),
        ("learning_rate: -1.0", "learning_rate"),
        ("warmup_ratio: 1.5", "warmup_ratio"),
        ("save_total_limit: 0", "save_total_limit"),
        ("adam_beta2: 1.0", "adam_beta2"),
        ("num_train_epochs: 0", "num_train_epochs"),
        ("packing: true\ntask: reward", "packing"),
        ("zero_stage: 3", "zero_stage"),
        ("ddp_bucket_cap_mb: 0", "ddp_bucket_cap_mb"),
        ("num_train_epochs: 1.0e300", "num_train_epochs"),
        ("tokenizer_name: ''", "tokenizer_name"),
    ] {
        let err = JobSpec::from_yaml_str(&format!("{MIN}{extra}\n"), "j.yaml").unwrap_err();
        assert!(
            matches!(err, JobError::Invalid { key: k, .. } if k == key),
            "{extra}"
        );
        assert!(err.to_string().contains(key), "{err}");
    }
}

#[test]
fn empty_or_overlapping_paths_are_refused() {
    for (text, key, says) in [
        (
            "model_name_or_path: m\ndata_path: d.json\noutput_dir: ''\n",
            "output_dir",
            "must not be empty",
        ),
        (
            "model_name_or_path: ''\ndata_path: d.json\noutput_dir: o\n",
            "model_name_or_path",
            "must not be empty",
        ),
        (
            "model_name_or_path: m\ndata_path: d.json\noutput_dir: m/\n",
            "output_dir",
            "overwrite the base model",
        ),
        (
            "model_name_or_path: m\ndata_path: ['']\noutput_dir: o\n",
            "data_path",
            "entry 1: the path is empty",
        ),
    ] {
        let err = JobSpec::from_yaml_str(text, "j.yaml").unwrap_err();
        assert!(
            matches!(&err, JobError::Invalid { key: k, reason, .. } if *k == key && reason.contains(says)),
            "{text}: {err}"
        );
    }
}

#[test]
fn a_byte_order_mark_is_not_part_of_the_first_key() {
    let j = JobSpec::from_yaml_str(&format!("\u{feff}{MIN}"), "j.yaml").unwrap();
    assert_eq!(j.data_path.paths()[0], Path::new("d.json"));
}

#[test]
fn scheduler_names_are_hf_names() {
    for name in [
        "linear",
        "cosine",
        "cosine_with_restarts",
        "polynomial",
        "constant",
        "constant_with_warmup",
        "inverse_sqrt",
    ] {
        let j = JobSpec::from_yaml_str(&format!("{MIN}lr_scheduler_type: {name}\n"), "j").unwrap();
        assert_eq!(j.lr_scheduler_type.as_str(), name);
    }
    let err = JobSpec::from_yaml_str(
        &format!("{MIN}lr_scheduler_type: reduce_lr_on_plateau\n"),
        "j",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("unknown variant `reduce_lr_on_plateau`"),
        "{err}"
    );
}

#[test]
fn scheduler_kwargs_are_the_scheduler_functions_arguments() {
    let job = |extra: &str| JobSpec::from_yaml_str(&format!("{MIN}{extra}"), "j.yaml");
    let j = job("lr_scheduler_type: cosine_with_min_lr\nlr_scheduler_kwargs: {min_lr: 1.0e-6}\n")
        .unwrap();
    assert_eq!(j.lr_scheduler_kwargs.min_lr, Some(1e-6));
    job("lr_scheduler_type: cosine\nlr_scheduler_kwargs: {num_cycles: 1.5}\n").unwrap();
    for (extra, says) in [
        ("lr_scheduler_type: cosine\nlr_scheduler_kwargs: {power: 2}\n", "`power` is not an argument of cosine (it takes num_cycles)"),
        ("lr_scheduler_kwargs: {num_cycles: 2}\n", "`num_cycles` is not an argument of linear (it takes none)"),
        ("lr_scheduler_type: cosine_with_min_lr\n", "needs min_lr or min_lr_rate"),
        ("lr_scheduler_type: cosine_with_min_lr\nlr_scheduler_kwargs: {min_lr: 0.0, min_lr_rate: 0.1}\n", "not both"),
        ("lr_scheduler_type: cosine_warmup_with_min_lr\nlr_scheduler_kwargs: {warmup_lr_rate: 0.1}\n", "cosine_warmup_with_min_lr needs min_lr or min_lr_rate"),
        ("lr_scheduler_type: cosine_with_min_lr\nlr_scheduler_kwargs: {min_lr: 0.0, warmup_lr_rate: 0.1}\n", "`warmup_lr_rate` is not an argument of cosine_with_min_lr"),
        ("lr_scheduler_type: polynomial\nlearning_rate: 1.0e-8\n", "lr_end (0.0000001) must be smaller"),
        ("lr_scheduler_type: polynomial\nlr_scheduler_kwargs: {power: .nan}\n", "power must be a finite number >= 0, got NaN"),
        ("lr_scheduler_type: cosine_with_min_lr\nlr_scheduler_kwargs: {min_lr: -1.0}\n", "min_lr must be a finite number >= 0"),
        ("lr_scheduler_type: cosine_with_min_lr\nlr_scheduler_kwargs: {min_lr_rate: 1.5}\n", "min_lr_rate must be in [0, 1]"),
    ] {
        let err = job(extra).unwrap_err();
        assert!(
            matches!(&err, JobError::Invalid { key: "lr_scheduler_kwargs", reason, .. } if reason.contains(says)),
            "{extra}: {err}"
        );
    }
    let err = job("lr_scheduler_kwargs: {cycles: 2}\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown field `cycles`"), "{err}");
}

#[test]
fn warmup_ratio_rounds_up_like_hf() {
    let j = JobSpec::from_yaml_str(&format!("{MIN}warmup_ratio: 0.03\n"), "j").unwrap();
    assert_eq!(j.warmup_steps_for(100), 3);
    assert_eq!(j.warmup_steps_for(2436), 74);
    let j = JobSpec::from_yaml_str(&format!("{MIN}warmup_ratio: 0.03\nwarmup_steps: 5\n"), "j")
        .unwrap();
    assert_eq!(j.warmup_steps_for(100), 5);
    // transformers 5.x: warmup_steps below 1 is the ratio, rounded up; above, its integer part.
    for (v, want) in [
        ("0.03", 3),
        ("0.5", 50),
        ("5", 5),
        ("7.9", 7),
        ("1", 1),
        ("0", 0),
    ] {
        let j = JobSpec::from_yaml_str(
            &format!(
                "{MIN}warmup_steps: {v}
"
            ),
            "j",
        )
        .unwrap();
        assert_eq!(j.warmup_steps_for(100), want, "{v}");
    }
    let err = JobSpec::from_yaml_str(
        &format!(
            "{MIN}warmup_steps: -1
"
        ),
        "j",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("warmup_steps"), "{err}");
}

#[test]
fn data_path_forms() {
    let base = "model_name_or_path: m\noutput_dir: out\n";
    let j = JobSpec::from_yaml_str(&format!("{base}data_path: d.json\n"), "j").unwrap();
    assert_eq!(j.data_path, DataPath::Single("d.json".into()));
    assert_eq!(j.data_path.files(), vec![DataFile::new("d.json")]);
    let j = JobSpec::from_yaml_str(&format!("{base}data_path: [a.json, b.jsonl]\n"), "j").unwrap();
    assert_eq!(
        j.data_path.paths(),
        vec![Path::new("a.json"), Path::new("b.jsonl")]
    );
    let text = format!(
        "{base}data_path:\n  - a.json\n  - path: c.json\n    weight: 0.5\n    format: sharegpt\n  - {{path: d.json, format: alpaca}}\n"
    );
    let j = JobSpec::from_yaml_str(&text, "j").unwrap();
    let f = j.data_path.files();
    assert_eq!(f[0], DataFile::new("a.json"));
    assert_eq!(
        f[1],
        DataFile {
            path: "c.json".into(),
            weight: 0.5,
            format: DataFormat::Sharegpt
        }
    );
    assert_eq!(
        f[2],
        DataFile {
            path: "d.json".into(),
            weight: 1.0,
            format: DataFormat::Alpaca
        }
    );
    // Round trip through to_yaml keeps the form.
    let back = JobSpec::from_yaml_str(&j.to_yaml(), "j").unwrap();
    assert_eq!(j, back);
    let mut r = j.clone();
    r.resolve_paths(Path::new("/base"));
    assert!(r.data_path.paths().iter().all(|p| p.starts_with("/base")));
}

#[test]
fn data_path_errors() {
    let base = "model_name_or_path: m\noutput_dir: out\n";
    let text = format!("{base}data_path:\n  - a.json\n  - path: c.json\n    wieght: 2\n");
    let err = JobSpec::from_yaml_str(&text, "j.yaml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown field `wieght`"), "{err}");
    assert!(
        err.contains("data_path[1]") && err.contains("line 6 column 5"),
        "{err}"
    );
    let text = format!("{base}data_path:\n  - path: c.json\n    format: csv\n");
    let err = JobSpec::from_yaml_str(&text, "j.yaml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("csv") && err.contains("line 5"), "{err}");
    let text = format!("{base}data_path:\n  - path: c.json\n    weight: 0\n");
    let err = JobSpec::from_yaml_str(&text, "j.yaml").unwrap_err();
    assert!(
        matches!(
            err,
            JobError::Invalid {
                key: "data_path",
                ..
            }
        ),
        "{err}"
    );
    let text = format!("{base}data_path:\n  - path: c.json\n    weight: 1.0e300\n");
    let err = JobSpec::from_yaml_str(&text, "j.yaml")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("entry 1 (c.json): weight must be a number > 0 and at most 1000"),
        "{err}"
    );
    let err = JobSpec::from_yaml_str(&format!("{base}data_path: []\n"), "j.yaml").unwrap_err();
    assert!(
        matches!(
            err,
            JobError::Invalid {
                key: "data_path",
                ..
            }
        ),
        "{err}"
    );
    let err = JobSpec::from_yaml_str(&format!("{base}data_path: 3\n"), "j.yaml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("data_path") && err.contains("line 3"), "{err}");
}

#[test]
fn yaml_round_trip() {
    let j = JobSpec::from_yaml_str(
        &format!("{MIN}evaluation_strategy: \"no\"\nbf16: true\n"),
        "j",
    )
    .unwrap();
    let back = JobSpec::from_yaml_str(&j.to_yaml(), "j").unwrap();
    assert_eq!(j, back);
}

#[test]
fn zero_stages_0_to_2_are_accepted() {
    for stage in 0..=2u8 {
        let j = JobSpec::from_yaml_str(&format!("{MIN}zero_stage: {stage}\n"), "j").unwrap();
        assert_eq!(j.zero_stage, stage);
    }
}

#[test]
fn the_shipped_configs_are_valid_jobs() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut seen = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_some_and(|x| x == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            let name = path.display().to_string();
            JobSpec::from_yaml_str(&text, &name).unwrap_or_else(|e| panic!("{name}: {e}"));
            seen += 1;
        }
    }
    assert!(seen >= 2, "configs/ holds the shipped jobs");
}

/// configs/ds_config.json (the recipe's ZeRO-3 offload config, as MISSION.md describes it) in
/// place of gpt4-llm-7b.yaml's `zero_stage: 2` gives the same job.
#[test]
fn the_shipped_deepspeed_config_gives_the_shipped_7b_job() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(root.join("configs/gpt4-llm-7b.yaml")).unwrap();
    let plain = JobSpec::from_yaml_str(&text, "7b").unwrap();
    let with_ds = text.replace("zero_stage: 2\n", "deepspeed: configs/ds_config.json\n");
    let mut ds = JobSpec::from_yaml_str(&with_ds, "7b-ds").unwrap();
    let warnings = ds.load_deepspeed(&root, "7b-ds").unwrap();
    assert_eq!(warnings.len(), 4, "{warnings:#?}");
    assert_eq!(ds.zero_stage, 2);
    ds.deepspeed = None;
    assert_eq!(ds, plain);
}

#[test]
fn step_counts_take_steps_or_hf_ratios_of_the_total() {
    let j = JobSpec::from_yaml_str(
        &format!("{MIN}logging_steps: 0.25\nsave_steps: 40\neval_steps: 2.0\n"),
        "j.yaml",
    )
    .unwrap();
    assert_eq!(j.logging_steps, StepCount::Ratio(0.25));
    assert_eq!(j.logging_steps.resolve(10), 3); // ceil(2.5), as HF
    assert_eq!(j.save_steps.resolve(10), 40);
    assert_eq!(j.eval_steps.unwrap().resolve(10), 2);
    assert_eq!(StepCount::Ratio(0.01).resolve(10), 1);
    for (extra, key, says) in [
        ("save_steps: 1.5", "save_steps", "whole number of steps"),
        ("logging_steps: 0", "logging_steps", "at least 1"),
        (
            "eval_steps: -0.5",
            "eval_steps",
            "ratio of the total steps in (0, 1)",
        ),
        (
            "logging_steps: -3",
            "logging_steps",
            "ratio of the total steps in (0, 1)",
        ),
        ("logging_steps: ten", "logging_steps", "a number of steps"),
    ] {
        let err = JobSpec::from_yaml_str(&format!("{MIN}{extra}\n"), "j.yaml")
            .unwrap_err()
            .to_string();
        assert!(err.contains(key) && err.contains(says), "{extra}: {err}");
    }
    // Not used, not checked: save_steps with save_strategy: 'no'.
    JobSpec::from_yaml_str(
        &format!("{MIN}save_strategy: 'no'\nsave_steps: 0\n"),
        "j.yaml",
    )
    .unwrap();
}

#[test]
fn best_model_keys_follow_hf_defaults_and_checks() {
    let job = |extra: &str| JobSpec::from_yaml_str(&format!("{MIN}{extra}"), "j.yaml");
    let eval = "eval_strategy: steps\neval_steps: 2\neval_data_path: e.json\n";
    let j = job(&format!(
        "{eval}save_steps: 4\nload_best_model_at_end: true\n"
    ))
    .unwrap();
    assert_eq!(j.best_metric(), Some(("eval_loss".to_string(), false)));
    let j = job(&format!(
        "{eval}task: reward\nmetric_for_best_model: eval_accuracy\n"
    ))
    .unwrap();
    assert_eq!(j.best_metric(), Some(("eval_accuracy".to_string(), true)));
    let j = job(&format!(
        "{eval}metric_for_best_model: loss\ngreater_is_better: true\n"
    ))
    .unwrap();
    assert_eq!(j.best_metric(), Some(("eval_loss".to_string(), true)));
    assert_eq!(job("").unwrap().best_metric(), None);
    job("eval_strategy: steps\neval_steps: 0.25\neval_data_path: e.json\nsave_steps: 0.5\nload_best_model_at_end: true\n")
        .unwrap();
    job(&format!(
        "{eval}save_strategy: best\nmetric_for_best_model: loss\n"
    ))
    .unwrap();
    for (extra, key, says) in [
        (
            "load_best_model_at_end: true\n",
            "load_best_model_at_end",
            "needs an evaluation",
        ),
        (
            "save_strategy: best\n",
            "save_strategy",
            "needs an evaluation",
        ),
        (
            &format!("{eval}save_strategy: best\n"),
            "metric_for_best_model",
            "required with save_strategy: best",
        ),
        (
            &format!("{eval}metric_for_best_model: accuracy\n"),
            "metric_for_best_model",
            "the evaluation logs no `eval_accuracy` (it logs eval_loss, eval_runtime",
        ),
        (
            &format!("{eval}save_steps: 5\nload_best_model_at_end: true\n"),
            "load_best_model_at_end",
            "multiple of eval_steps (2)",
        ),
        (
            &format!("{eval}save_strategy: epoch\nload_best_model_at_end: true\n"),
            "load_best_model_at_end",
            "to match",
        ),
        (
            &format!("{eval}save_steps: 0.5\nload_best_model_at_end: true\n"),
            "load_best_model_at_end",
            "multiple of eval_steps",
        ),
    ] {
        let err = job(extra).unwrap_err();
        assert!(
            matches!(&err, JobError::Invalid { key: k, reason, .. } if *k == key && reason.contains(says)),
            "{extra}: {err}"
        );
    }
}

#[test]
fn warmup_stable_decay_takes_its_curves_and_needs_its_decay_steps() {
    let job = |extra: &str| JobSpec::from_yaml_str(&format!("{MIN}{extra}"), "j.yaml");
    let j = job("lr_scheduler_type: warmup_stable_decay\nlr_scheduler_kwargs: {num_decay_steps: 10, decay_type: 1-sqrt}\n")
        .unwrap();
    assert_eq!(
        j.lr_scheduler_kwargs.decay_type,
        Some(WsdCurve::OneMinusSqrt)
    );
    let err = job("lr_scheduler_type: warmup_stable_decay\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("needs num_decay_steps"), "{err}");
    let err = job("lr_scheduler_type: warmup_stable_decay\nlr_scheduler_kwargs: {num_decay_steps: 1, decay_type: sqrt}\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown variant `sqrt`"), "{err}");
}

#[test]
fn tokens_seen_takes_hf_names_and_booleans() {
    let parse = |v: &str| {
        JobSpec::from_yaml_str(
            &format!("{MIN}include_num_input_tokens_seen: {v}\n"),
            "job.yaml",
        )
    };
    assert_eq!(
        JobSpec::from_yaml_str(MIN, "j")
            .unwrap()
            .include_num_input_tokens_seen,
        TokensSeen::No
    );
    for (v, want) in [
        ("true", TokensSeen::All),
        ("false", TokensSeen::No),
        ("all", TokensSeen::All),
        ("non_padding", TokensSeen::NonPadding),
        ("'no'", TokensSeen::No),
    ] {
        assert_eq!(parse(v).unwrap().include_num_input_tokens_seen, want, "{v}");
    }
    let err = parse("some").unwrap_err().to_string();
    assert!(
        err.contains("expected `all`, `non_padding`, `no` or a boolean, got `some`"),
        "{err}"
    );
    // Saved jobs (training_args.yaml, the coordinator's copy) read back the same.
    let j = parse("non_padding").unwrap();
    let again = JobSpec::from_yaml_str(&serde_yaml::to_string(&j).unwrap(), "j").unwrap();
    assert_eq!(again.include_num_input_tokens_seen, TokensSeen::NonPadding);
}
