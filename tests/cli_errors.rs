//! Bad input gets a clear error that names the file, the line or record, and what was expected,
//! and writes nothing.

mod common;
use common::*;

fn assert_nothing_written(ws: &Workspace) {
    assert!(
        !ws.path().join("out").exists(),
        "output_dir was created for a refused job"
    );
}

#[test]
fn unknown_key_and_wrong_type_name_line_and_column() {
    let ws = Workspace::new(16);
    let job = ws.job("job.yaml", "out", "learning_rat: 1.0\n");
    let err = run_err(herd().current_dir(ws.path()).args(["train", "job.yaml"]));
    assert!(
        err.contains("job.yaml")
            && err
                .contains("line 11: `learning_rat`: unknown field, did you mean `learning_rate`?"),
        "{err}"
    );
    std::fs::write(
        &job,
        std::fs::read_to_string(&job)
            .unwrap()
            .replace("learning_rat: 1.0", "max_steps: many"),
    )
    .unwrap();
    let err = run_err(herd().current_dir(ws.path()).args(["train", "job.yaml"]));
    assert!(
        err.contains("max_steps") && err.contains("line 11 column"),
        "{err}"
    );
    assert_nothing_written(&ws);
}

#[test]
fn missing_paths_are_named() {
    let ws = Workspace::new(16);
    ws.job("nodata.yaml", "out", "");
    let text = std::fs::read_to_string(ws.path().join("nodata.yaml"))
        .unwrap()
        .replace("small.json", "missing.json");
    std::fs::write(ws.path().join("nodata.yaml"), text).unwrap();
    let err = run_err(herd().current_dir(ws.path()).args(["train", "nodata.yaml"]));
    assert!(
        err.contains("missing.json") && err.contains("no such file"),
        "{err}"
    );
    std::fs::create_dir_all(ws.path().join("empty")).unwrap();
    let text = std::fs::read_to_string(ws.path().join("nodata.yaml"))
        .unwrap()
        .replace("demo/model", "empty")
        .replace("missing.json", "small.json");
    std::fs::write(ws.path().join("nomodel.yaml"), text).unwrap();
    let err = run_err(
        herd()
            .current_dir(ws.path())
            .args(["train", "nomodel.yaml"]),
    );
    assert!(
        err.contains("empty") && err.contains("no config.json"),
        "{err}"
    );
    let err = run_err(herd().current_dir(ws.path()).args(["train", "absent.yaml"]));
    assert!(err.contains("absent.yaml"), "{err}");
    std::fs::write(ws.path().join("a-file"), "mine").unwrap();
    ws.job("tofile.yaml", "a-file", "");
    let err = run_err(herd().current_dir(ws.path()).args(["train", "tofile.yaml"]));
    assert!(
        err.contains("output_dir a-file: exists and is not a directory"),
        "{err}"
    );
    assert_eq!(std::fs::read(ws.path().join("a-file")).unwrap(), b"mine");
    ws.job(
        "noeval.yaml",
        "out",
        "eval_strategy: steps\neval_steps: 1\neval_data_path: heldout.json\n",
    );
    let err = run_err(herd().current_dir(ws.path()).args(["train", "noeval.yaml"]));
    assert!(
        err.contains("eval_data_path") && err.contains("heldout.json: no such file"),
        "{err}"
    );
    assert_nothing_written(&ws);
}

#[test]
fn malformed_record_is_named_or_skipped_on_request() {
    let ws = Workspace::new(16);
    let mut recs: Vec<serde_json::Value> =
        serde_json::from_slice(&read(ws.path().join("small.json"))).unwrap();
    recs[6] = serde_json::json!({"instruction": "Say hi.", "output": 5});
    std::fs::write(
        ws.path().join("small.json"),
        serde_json::to_string(&recs).unwrap(),
    )
    .unwrap();
    ws.job("job.yaml", "out", "max_steps: 1\n");
    let err = run_err(herd().current_dir(ws.path()).args(["train", "job.yaml"]));
    assert!(
        err.contains("small.json") && err.contains("record 7") && err.contains("output"),
        "{err}"
    );
    assert_nothing_written(&ws);
    ws.job("skip.yaml", "out", "max_steps: 1\nskip_bad_records: true\n");
    let out = ws.train(&ws.path().join("skip.yaml"), &[]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("1 malformed records skipped"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn batch_larger_than_data_is_refused() {
    let ws = Workspace::new(6);
    ws.job("job.yaml", "out", "per_device_train_batch_size: 8\n");
    let err = run_err(herd().current_dir(ws.path()).args(["train", "job.yaml"]));
    assert!(
        err.contains("6 usable examples") && err.contains("global batch of 8"),
        "{err}"
    );
}

#[test]
fn data_preview_marks_the_prompt_and_reports_lengths() {
    let ws = Workspace::new(16);
    ws.job("job.yaml", "out", "");
    let out = run_ok(
        herd()
            .current_dir(ws.path())
            .args(["data", "preview", "job.yaml", "-n", "1"]),
    );
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("«<s>") && s.contains("### Response:»"), "{s}");
    assert!(
        s.contains("median") && s.contains("p95") && s.contains("truncated"),
        "{s}"
    );
}

#[test]
fn generate_answers_from_a_trained_model() {
    let ws = Workspace::new(16);
    let job = ws.job("job.yaml", "out", "max_steps: 2\n");
    ws.train(&job, &[]);
    let out = run_ok(herd().current_dir(ws.path()).args([
        "generate",
        "--model",
        "out",
        "--instruction",
        "Repeat the words.",
        "--input",
        "cat dog",
        "--max-new-tokens",
        "5",
    ]));
    assert!(!out.stdout.is_empty());
    let err = run_err(herd().current_dir(ws.path()).args([
        "generate",
        "--model",
        "nowhere",
        "--instruction",
        "x",
    ]));
    assert!(err.contains("nowhere"), "{err}");
    let gen = |extra: &[&str]| {
        let mut cmd = herd();
        cmd.current_dir(ws.path()).args([
            "generate",
            "--model",
            "out",
            "--instruction",
            "Repeat the words.",
            "--max-new-tokens",
            "3",
        ]);
        cmd.args(extra);
        cmd
    };
    run_ok(&mut gen(&["--dtype", "bf16"]));
    let err = run_err(&mut gen(&["--device", "gpu0"]));
    assert!(err.contains("expected cpu or cuda:N"), "{err}");
    if cfg!(not(feature = "cuda")) {
        let err = run_err(&mut gen(&["--device", "cuda:0"]));
        assert!(err.contains("built without CUDA"), "{err}");
    }
}

#[test]
fn train_says_it_runs_one_rank_of_a_multi_rank_job() {
    let ws = Workspace::new(8);
    let job = ws.job(
        "job.yaml",
        "out",
        "world_size: 2\nper_device_train_batch_size: 2\nmax_steps: 1\n",
    );
    let out = ws.train(&job, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("world_size is 2 but `herd train` runs one rank")
            && err.contains("each step takes 2 examples, not the 2-rank job's 4")
            && err.contains("gradient_accumulation_steps: 2"),
        "{err}"
    );
    let plain = ws.job("plain.yaml", "out2", "max_steps: 1\n");
    let err = String::from_utf8_lossy(&ws.train(&plain, &[]).stderr).into_owned();
    assert!(!err.contains("runs one rank"), "{err}");
}

/// A DeepSpeed config whose numbers disagree with the job is refused as HF Trainer refuses it,
/// every disagreement named; a broken config file is named with its line; nothing is written.
#[test]
fn a_deepspeed_config_that_disagrees_with_the_job_is_refused() {
    let ws = Workspace::new(16);
    std::fs::write(
        ws.path().join("ds.json"),
        r#"{"train_micro_batch_size_per_gpu": 7, "gradient_clipping": 0.3,
            "zero_optimization": {"stage": 2}}"#,
    )
    .unwrap();
    ws.job("job.yaml", "out", "deepspeed: ds.json\n");
    let err = run_err(herd().current_dir(ws.path()).args(["train", "job.yaml"]));
    assert!(err.contains("job.yaml: key `deepspeed`"), "{err}");
    assert!(
        err.contains(
            "`train_micro_batch_size_per_gpu` is 7 but the job's per_device_train_batch_size is"
        ),
        "{err}"
    );
    assert!(
        err.contains("`gradient_clipping` is 0.3 but the job's max_grad_norm is 1.0"),
        "{err}"
    );
    std::fs::write(
        ws.path().join("ds.json"),
        "{\"zero_optimization\": {\"stage\": 2,}}",
    )
    .unwrap();
    let err = run_err(herd().current_dir(ws.path()).args(["train", "job.yaml"]));
    assert!(
        err.contains("deepspeed") && err.contains("ds.json") && err.contains("line 1 column"),
        "{err}"
    );
    assert_nothing_written(&ws);
}

#[test]
fn an_output_file_that_cannot_be_written_is_refused_before_generating() {
    let ws = Workspace::new(4);
    let data = ws.path().join("small.json");
    let before = std::fs::read(&data).unwrap();
    std::fs::create_dir_all(ws.path().join("adir")).unwrap();
    std::fs::write(ws.path().join("afile"), "mine").unwrap();
    let predict = |out: &str| {
        run_err(herd().current_dir(ws.path()).args([
            "predict",
            "--model",
            "demo/model",
            "--data",
            "small.json",
            "--out",
            out,
        ]))
    };
    let err = predict("adir");
    assert!(err.contains("adir: is a directory"), "{err}");
    let err = predict("afile/x.jsonl");
    assert!(
        err.contains("its directory afile cannot be created: afile is not a directory")
            || err.contains("afile exists and is not a directory"),
        "{err}"
    );
    let err = predict("./small.json");
    assert!(err.contains("is the data file being read"), "{err}");
    assert_eq!(std::fs::read(&data).unwrap(), before);
    assert_eq!(std::fs::read(ws.path().join("afile")).unwrap(), b"mine");
    // Refused before the model was even loaded: nothing was generated.
    assert!(!err.contains("generated"), "{err}");
}

#[test]
fn a_job_whose_every_answer_is_truncated_away_is_refused() {
    let ws = Workspace::new(4);
    ws.job("short.yaml", "out", "model_max_length: 2\nmax_steps: 1\n");
    let err = run_err(herd().current_dir(ws.path()).args(["train", "short.yaml"]));
    assert!(
        err.contains("no example keeps an answer token after truncation to model_max_length 2"),
        "{err}"
    );
    assert!(!ws.path().join("out").exists(), "output_dir was written");
}

#[test]
fn nonsense_command_line_numbers_are_named() {
    let ws = Workspace::new(4);
    for (args, says) in [
        (
            vec!["bench", "--steps", "1", "--peak-tflops", "NaN"],
            "--peak-tflops must be a number > 0",
        ),
        (
            vec![
                "bench",
                "--steps",
                "1",
                "--lora-r",
                "2",
                "--lora-dropout",
                "2",
            ],
            "--lora-dropout must be in [0, 1), got 2",
        ),
        (
            vec![
                "predict",
                "--model",
                "demo/model",
                "--data",
                "small.json",
                "--out",
                "p.jsonl",
                "--batch-size",
                "0",
            ],
            "--batch-size must be at least 1",
        ),
    ] {
        let err = run_err(herd().current_dir(ws.path()).args(&args));
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

#[test]
fn a_checkpoint_of_another_kind_of_job_is_not_resumed() {
    let ws = Workspace::new(8);
    let lora = ws.job(
        "lora.yaml",
        "out",
        "lora_r: 4\nmax_steps: 2\nsave_steps: 2\n",
    );
    ws.train(&lora, &[]);
    let adapter = ws.path().join("out/checkpoint-2/adapter_model.safetensors");
    let before = std::fs::read(&adapter).unwrap();
    ws.job("full.yaml", "out", "max_steps: 4\n");
    let err = run_err(herd().current_dir(ws.path()).args(["train", "full.yaml"]));
    assert!(
        err.contains("key `output_dir`")
            && err.contains(
                "checkpoint-2 was written by a job with lora_r 4 (this job: none (full fine-tune))"
            ),
        "{err}"
    );
    assert_eq!(std::fs::read(&adapter).unwrap(), before);
}

#[test]
fn a_listing_piped_into_head_ends_quietly() {
    use std::io::Read;
    let ws = Workspace::new(1000);
    ws.job("job.yaml", "out", "");
    // Far more than a pipe holds (64 KiB), so the printer meets the closed pipe.
    let mut child = herd()
        .current_dir(ws.path())
        .args(["data", "preview", "job.yaml", "-n", "1000", "--tokens"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut head = [0u8; 64];
    child.stdout.take().unwrap().read_exact(&mut head).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_ne!(out.status.code(), Some(101), "{err}");
}

#[test]
fn a_save_past_the_file_size_limit_is_an_error_naming_the_file() {
    use std::os::unix::process::ExitStatusExt;
    let ws = Workspace::new(16);
    ws.job("job.yaml", "out", "max_steps: 2\nsave_steps: 1\n");
    // 1 MiB: the demo model's weights (3.6 MB in f32) do not fit.
    let herd_bin = env!("CARGO_BIN_EXE_herd");
    let out = std::process::Command::new("bash")
        .current_dir(ws.path())
        .args([
            "-c",
            &format!("ulimit -f 1024; exec {herd_bin} train job.yaml"),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.signal(), None, "killed by a signal: {err}");
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("checkpoint-1") && err.contains("File too large"),
        "{err}"
    );
    // Nothing half-written is left where a resume would look.
    assert!(!ws.path().join("out/checkpoint-1").exists());
}
