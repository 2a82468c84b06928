//! `herd train` end to end: outputs in HF layout, checkpoint cadence and rotation, and resume
//! after a stop or a SIGKILL ending with bit-identical weights.

mod common;
use common::*;
use std::time::{Duration, Instant};

const STEPS: &str = "max_steps: 6\nsave_steps: 2\nsave_total_limit: 2\n";

#[test]
fn train_writes_hf_layout_history_and_rotates_checkpoints() {
    let ws = Workspace::new(48);
    let job = ws.job("job.yaml", "out", STEPS);
    let out = ws.train(&job, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("added 1 special token"), "{stderr}");
    let o = ws.path().join("out");
    for f in [
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "trainer_state.json",
        "training_args.yaml",
    ] {
        assert!(o.join(f).is_file(), "missing {f}");
    }
    // The demo model has no generation config: the one transformers derives from config.json.
    let gen: serde_json::Value =
        serde_json::from_slice(&read(o.join("generation_config.json"))).unwrap();
    assert_eq!(gen["_from_model_config"], true, "{gen}");
    assert_eq!(gen["eos_token_id"], 2, "{gen}");
    // The [PAD] token grew the vocabulary, as train.py's resize does.
    let cfg: serde_json::Value = serde_json::from_slice(&read(o.join("config.json"))).unwrap();
    let base: serde_json::Value =
        serde_json::from_slice(&read(ws.path().join("demo/model/config.json"))).unwrap();
    assert_eq!(
        cfg["vocab_size"].as_u64().unwrap(),
        base["vocab_size"].as_u64().unwrap() + 1
    );
    // save_total_limit 2 keeps the newest two of 2, 4, 6.
    let mut ckpts: Vec<String> = std::fs::read_dir(&o)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    ckpts.sort();
    assert_eq!(ckpts, vec!["checkpoint-4", "checkpoint-6"]);
    for f in [
        "model.safetensors",
        "optimizer.safetensors",
        "scheduler.json",
        "trainer_state.json",
        "herd_manifest.json",
        "tokenizer.json",
        "generation_config.json",
    ] {
        assert!(
            o.join("checkpoint-6").join(f).is_file(),
            "checkpoint lacks {f}"
        );
    }
    // log_history as HF writes it: one entry per logging step, then the summary.
    let st = trainer_state(&o);
    let hist = st["log_history"].as_array().unwrap();
    assert_eq!(hist.len(), 7);
    for (i, e) in hist[..6].iter().enumerate() {
        assert_eq!(e["step"].as_u64().unwrap(), i as u64 + 1);
        for k in ["loss", "learning_rate", "epoch", "grad_norm"] {
            assert!(e[k].is_number(), "entry {i} lacks {k}: {e}");
        }
    }
    assert_eq!(
        hist[0]["learning_rate"].as_f64().unwrap(),
        0.0,
        "warmup starts at lr 0"
    );
    assert!(hist[6]["train_runtime"].is_number());
    assert_eq!(st["global_step"].as_u64().unwrap(), 6);
    // Training lowered the loss on this small set.
    let first = hist[0]["loss"].as_f64().unwrap();
    let last = hist[5]["loss"].as_f64().unwrap();
    assert!(last < first, "loss went from {first} to {last}");
}

#[test]
fn stop_and_resume_is_bit_identical() {
    let ws = Workspace::new(48);
    let full = ws.job("full.yaml", "full", STEPS);
    let done = String::from_utf8_lossy(&ws.train(&full, &[]).stderr).into_owned();
    assert!(
        done.contains("done in ") && done.contains(": 6 steps, train_loss "),
        "{done}"
    );
    // The final metrics, as HF Trainer prints them when training ends.
    assert!(
        done.contains("\"train_runtime\": ") && done.contains("\"train_samples_per_second\": "),
        "{done}"
    );
    let parted = ws.job("parted.yaml", "parted", STEPS);
    // First run stops after step 3 (a checkpoint is written there), the second resumes.
    let out = ws.train(&parted, &["--until-step", "3"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("stopped at step 3"));
    assert!(
        !ws.path().join("parted/model.safetensors").exists(),
        "no final model before the end"
    );
    let out = ws.train(&parted, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("resumed at step 3"), "{stderr}");
    assert!(!stderr.contains("the job changed"), "{stderr}");
    assert_eq!(
        read(ws.path().join("full/model.safetensors")),
        read(ws.path().join("parted/model.safetensors"))
    );
    // The log history carries over the resume.
    let (a, b) = (
        losses(&ws.path().join("full")),
        losses(&ws.path().join("parted")),
    );
    assert!(!a.is_empty());
    assert_eq!(a, b);
    // total_flos (HF's estimate: 6 × non-embedding parameters × input tokens) carries over too.
    let flos = |d: &str| {
        trainer_state(&ws.path().join(d))["total_flos"]
            .as_f64()
            .unwrap()
    };
    assert!(flos("full") > 0.0);
    assert_eq!(flos("full"), flos("parted"));
    // Run again once finished, it says so rather than reporting a loss of 0 over no steps.
    let again = String::from_utf8_lossy(&ws.train(&parted, &[]).stderr).into_owned();
    assert!(
        again.contains("nothing left to train: resumed at the last step (6)"),
        "{again}"
    );
}

#[test]
fn resuming_with_changed_keys_says_which_changed() {
    let ws = Workspace::new(48);
    let job = ws.job("job.yaml", "out", STEPS);
    ws.train(&job, &["--until-step", "2"]);
    let text = std::fs::read_to_string(&job).unwrap();
    std::fs::write(&job, text.replace("max_steps: 6", "max_steps: 8")).unwrap();
    let stderr = String::from_utf8_lossy(&ws.train(&job, &[]).stderr).into_owned();
    assert!(
        stderr
            .contains("warning: the job changed since the checkpoint it resumes (max_steps 6 → 8)"),
        "{stderr}"
    );
    assert_eq!(trainer_state(&ws.path().join("out"))["global_step"], 8);
}

#[test]
fn save_only_model_checkpoints_hold_the_weights_and_only_pauses_are_resumed() {
    let ws = Workspace::new(48);
    let job = ws.job(
        "job.yaml",
        "out",
        &format!("{STEPS}save_only_model: true\n"),
    );
    // A stop (here --until-step) checkpoints with the optimizer: the run goes on from it.
    ws.train(&job, &["--until-step", "2"]);
    let out = ws.path().join("out");
    assert!(out.join("checkpoint-2/optimizer.safetensors").is_file());
    let stderr = String::from_utf8_lossy(&ws.train(&job, &[]).stderr).into_owned();
    assert!(stderr.contains("resumed at step 2"), "{stderr}");
    // The cadence's checkpoints hold the weights and the trainer state only.
    let ckpt = out.join("checkpoint-4");
    assert!(ckpt.join("model.safetensors").is_file());
    assert!(ckpt.join("trainer_state.json").is_file());
    assert!(!ckpt.join("optimizer.safetensors").exists());
    assert!(!ckpt.join("scheduler.json").exists());
    // Run again at the end: nothing to train, no optimizer needed.
    let again = String::from_utf8_lossy(&ws.train(&job, &[]).stderr).into_owned();
    assert!(again.contains("nothing left to train"), "{again}");
    // Without checkpoint-6, the newest is checkpoint-4, which cannot be resumed.
    std::fs::remove_dir_all(out.join("checkpoint-6")).unwrap();
    let err = run_err(
        herd()
            .current_dir(ws.path())
            .args(["train", "job.yaml", "--no-progress"]),
    );
    assert!(
        err.contains("checkpoint-4 has no optimizer state (saved with save_only_model)"),
        "{err}"
    );
}

#[test]
fn sigkill_mid_run_then_rerun_matches_uninterrupted() {
    let ws = Workspace::new(48);
    let steps = "max_steps: 8\nsave_steps: 2\nsave_total_limit: 1\n";
    let full = ws.job("full.yaml", "full", steps);
    ws.train(&full, &[]);
    let killed = ws.job("killed.yaml", "killed", steps);
    let mut child = herd()
        .current_dir(ws.path())
        .args(["train", "killed.yaml", "--no-progress"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once the first checkpoint exists (mid-run, maybe mid-save).
    let t0 = Instant::now();
    while !ws.path().join("killed/checkpoint-2").exists() && t0.elapsed() < Duration::from_secs(120)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !ws.path().join("killed/trainer_state.json").exists()
            || ws.path().join("killed/checkpoint-8").exists()
    );
    ws.train(&killed, &[]);
    assert_eq!(
        read(ws.path().join("full/model.safetensors")),
        read(ws.path().join("killed/model.safetensors"))
    );
}

#[test]
fn incomplete_checkpoint_is_skipped_on_resume() {
    let ws = Workspace::new(48);
    let job = ws.job("job.yaml", "out", "max_steps: 4\nsave_steps: 2\n");
    ws.train(&job, &["--until-step", "2"]);
    // A crash while saving step 4 left a directory without a manifest.
    let bogus = ws.path().join("out/checkpoint-4");
    std::fs::create_dir_all(&bogus).unwrap();
    std::fs::write(bogus.join("model.safetensors"), b"half a file").unwrap();
    let out = ws.train(&job, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("resumed at step 2"), "{stderr}");
    assert!(ws.path().join("out/model.safetensors").is_file());
}

#[test]
fn packing_with_gradient_checkpointing_trains_deterministically() {
    let ws = Workspace::new(24);
    let extra = "max_steps: 3\nsave_steps: 100\npacking: true\ngradient_checkpointing: true\n\
                 per_device_train_batch_size: 2\nmodel_max_length: 256\n";
    let a = ws.job("a.yaml", "a", extra);
    let b = ws.job("b.yaml", "b", extra);
    let out = ws.train(&a, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // 24 demo examples of ~50 tokens fit in far fewer rows of 256.
    let rows: usize = stderr
        .split("examples into ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no packing line: {stderr}"));
    assert!(rows <= 8, "{rows} rows");
    ws.train(&b, &[]);
    let hist = trainer_state(&ws.path().join("a"))["log_history"].clone();
    let losses: Vec<f64> = hist
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["loss"].as_f64())
        .collect();
    assert_eq!(losses.len(), 3);
    assert!(
        losses.iter().all(|l| l.is_finite() && *l > 0.0),
        "{losses:?}"
    );
    // The packing is a pure function of the data: two runs end bit-identical.
    assert_eq!(
        read(ws.path().join("a/model.safetensors")),
        read(ws.path().join("b/model.safetensors"))
    );
}

/// `herd from-command -- torchrun … train.py --flags` prints a job file that trains, with the
/// flags it left out as comments in it; an unknown flag is an error naming it, and no job.
#[test]
fn from_command_turns_a_torchrun_command_into_a_job_that_trains() {
    let ws = Workspace::new(16);
    let convert = |flags: &[&str]| {
        herd()
            .current_dir(ws.path())
            .args(["from-command", "--", "torchrun", "--nproc_per_node=1"])
            .args([
                "--master_port=12345",
                "train.py",
                "--model_name_or_path",
                "demo/model",
            ])
            .args(["--data_path", "small.json", "--output_dir", "out"])
            .args(flags)
            .output()
            .unwrap()
    };
    let out = convert(&[
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--learning_rate",
        "1e-3",
        "--save_strategy",
        "no",
        "--model_max_length",
        "64",
        "--tf32",
        "True",
    ]);
    assert!(out.status.success(), "{out:?}");
    let yaml = String::from_utf8(out.stdout).unwrap();
    assert!(yaml.contains("# note: --tf32: not needed"), "{yaml}");
    assert!(yaml.contains("\nlearning_rate: 0.001\n"), "{yaml}");
    let job = ws.path().join("converted.yaml");
    std::fs::write(&job, &yaml).unwrap();
    ws.train(&job, &[]);
    assert_eq!(trainer_state(&ws.path().join("out"))["global_step"], 2);

    let out = convert(&["--learnig_rate", "1e-3"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "no job is printed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not a TrainingArguments or train.py flag herd knows: --learnig_rate"),
        "{stderr}"
    );
}

#[test]
fn a_deepspeed_scheduler_section_sets_the_learning_rate_as_hf_trainer_with_deepspeed_logs_it() {
    let ws = Workspace::new(16);
    let ds = |warmup: &str| {
        format!(
            "max_steps: 4\nsave_steps: 4\ndeepspeed:\n  scheduler:\n    type: WarmupDecayLR\n    \
             params: {{warmup_min_lr: auto, warmup_max_lr: auto, warmup_num_steps: {warmup}, \
             total_num_steps: auto}}\n"
        )
    };
    let job = ws.job("ds.yaml", "ds", &ds("auto"));
    let out = ws.train(&job, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the learning rate follows DeepSpeed's WarmupDecayLR"),
        "{stderr}"
    );
    let logged: Vec<f64> = trainer_state(&ws.path().join("ds"))["log_history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["learning_rate"].as_f64())
        .collect();
    // warmup 2 (DeepSpeed's floor), 4 steps, lr 1e-3; HF logs at step g the lr of step g + 1,
    // i.e. the schedule at iteration g − 1: ln(1)/ln(2), ln(2)/ln(2), then (4 − i)/(4 − 2).
    let want = [0.0, 1e-3, 1e-3, 0.5e-3];
    assert_eq!(logged.len(), want.len(), "{logged:?}");
    for (g, w) in logged.iter().zip(want) {
        assert!((g - w).abs() <= 1e-15, "{logged:?} vs {want:?}");
    }
    let scheduler: serde_json::Value = serde_json::from_slice(&common::read(
        ws.path().join("ds/checkpoint-4/scheduler.json"),
    ))
    .unwrap();
    assert_eq!(scheduler["lr_scheduler_type"], "deepspeed WarmupDecayLR");

    // A step count that disagrees with the job stops it before any step, as HF Trainer does.
    let job = ws.job("bad.yaml", "bad", &ds("10"));
    let err = common::run_err(
        herd()
            .current_dir(ws.path())
            .args(["train", "--no-progress"])
            .arg(&job),
    );
    assert!(
        err.contains("`scheduler.params.warmup_num_steps` is 10 but the job's warmup"),
        "{err}"
    );
    assert!(
        err.contains("bad.yaml: key `deepspeed`"),
        "names the job file: {err}"
    );
    assert!(!ws.path().join("bad/checkpoint-4").exists());
}

#[test]
fn a_per_epoch_job_logs_and_saves_where_each_epoch_ends_as_hf_trainer_does() {
    // 20 examples, batch 4, accumulation 2: 5 micro-batches an epoch, steps of 2, 2 and 1.
    let ws = Workspace::new(20);
    let keys = "num_train_epochs: 2\ngradient_accumulation_steps: 2\n";
    let every = ws.job(
        "every.yaml",
        "every",
        &format!("{keys}save_strategy: 'no'\n"),
    );
    ws.train(&every, &[]);
    let per_epoch = ws.job(
        "epoch.yaml",
        "epoch",
        &format!("{keys}logging_strategy: epoch\nsave_strategy: epoch\n"),
    );
    ws.train(&per_epoch, &[]);

    let history = |dir: &str| {
        trainer_state(&ws.path().join(dir))["log_history"]
            .as_array()
            .unwrap()
            .clone()
    };
    let (every, epoch) = (history("every"), history("epoch"));
    let field = |h: &[serde_json::Value], k: &str| -> Vec<f64> {
        h.iter().filter_map(|e| e[k].as_f64()).collect()
    };
    // Logged every step: HF's epoch counts micro-batches (2/5, 4/5, 5/5, ...).
    let epochs = field(&every, "epoch");
    assert_eq!(epochs, [0.4, 0.8, 1.0, 1.4, 1.8, 2.0, 2.0], "{every:?}");
    // Per epoch: one entry at each epoch's end, its loss the mean of that epoch's steps.
    let steps: Vec<u64> = epoch.iter().filter_map(|e| e["step"].as_u64()).collect();
    assert_eq!(steps, [3, 6, 6], "{epoch:?}");
    let step_losses = field(&every, "loss");
    let epoch_losses = field(&epoch, "loss");
    assert_eq!(epoch_losses.len(), 2);
    for (i, l) in epoch_losses.iter().enumerate() {
        let mean = step_losses[3 * i..3 * i + 3].iter().sum::<f64>() / 3.0;
        assert!((l - mean).abs() <= 1e-12 * mean, "{l} vs {mean}");
    }
    // train_loss is the mean over the run's steps, however the log was cut.
    let mean = step_losses.iter().sum::<f64>() / 6.0;
    for h in [&every, &epoch] {
        let train_loss = field(h, "train_loss")[0];
        assert!(
            (train_loss - mean).abs() <= 1e-12 * mean,
            "{train_loss} vs {mean}"
        );
    }
    // save_strategy: epoch saved at both epochs' ends; `no` saved none.
    let ckpts = |dir: &str| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(ws.path().join(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("checkpoint-"))
            .collect();
        v.sort();
        v
    };
    assert_eq!(ckpts("epoch"), ["checkpoint-3", "checkpoint-6"]);
    assert!(ckpts("every").is_empty());
}

#[test]
fn load_best_model_at_end_makes_the_best_checkpoint_the_final_model_and_keeps_only_it() {
    let ws = Workspace::new(24);
    ws.heldout(8);
    // greater_is_better on the loss: the best is an early checkpoint, not the last one.
    let job = ws.job(
        "best.yaml",
        "best",
        "max_steps: 6\nsave_steps: 2\nsave_total_limit: 1\neval_strategy: steps\n\
         eval_steps: 2\neval_data_path: heldout.json\nload_best_model_at_end: true\n\
         metric_for_best_model: loss\ngreater_is_better: true\neval_on_start: true\n",
    );
    ws.train(&job, &[]);
    let out = ws.path().join("best");
    let st = trainer_state(&out);
    let evals: Vec<(u64, f64)> = st["log_history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| Some((e["step"].as_u64()?, e["eval_loss"].as_f64()?)))
        .collect();
    assert_eq!(evals.iter().map(|e| e.0).collect::<Vec<_>>(), [0, 2, 4, 6]);
    // The first strictly greatest eval loss, as HF picks it; the untrained model's evaluation
    // before the first step (the greatest loss of all) takes no part.
    assert!(evals[0].1 > evals[1].1, "{evals:?}");
    let (best_step, best_loss) = evals[1..]
        .iter()
        .copied()
        .fold((0, f64::NEG_INFINITY), |b, e| if e.1 > b.1 { e } else { b });
    assert_eq!(st["best_metric"].as_f64(), Some(best_loss), "{st}");
    assert_eq!(st["best_global_step"].as_u64(), Some(best_step), "{st}");
    let named = st["best_model_checkpoint"].as_str().unwrap();
    assert!(
        named.ends_with(&format!("checkpoint-{best_step}")),
        "{named}"
    );
    // save_total_limit 1: only the best checkpoint is left, and the final model is its weights.
    let left: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    assert_eq!(left, [format!("checkpoint-{best_step}")]);
    assert_weights_close(
        &out.join("model.safetensors"),
        &out.join(format!("checkpoint-{best_step}/model.safetensors")),
        0.0,
    );
    assert_ne!(
        best_step, 6,
        "the test wants a best before the last step: {evals:?}"
    );
}

#[test]
fn neftune_noise_changes_training_resumes_bit_identically_and_matches_across_workers() {
    let ws = Workspace::new(32);
    let keys = "max_steps: 4\nsave_steps: 2\nper_device_train_batch_size: 2\n";
    let plain = ws.job("plain.yaml", "plain", keys);
    ws.train(&plain, &[]);
    let neft = format!("{keys}neftune_noise_alpha: 5.0\n");
    let full = ws.job("full.yaml", "full", &neft);
    ws.train(&full, &[]);
    let parted = ws.job("parted.yaml", "parted", &neft);
    ws.train(&parted, &["--until-step", "3"]);
    ws.train(&parted, &[]);
    let model = |d: &str| read(ws.path().join(d).join("model.safetensors"));
    // The noise is keyed by (seed, step, row), so a resumed run draws the same noise.
    assert_eq!(model("full"), model("parted"));
    assert_ne!(model("full"), model("plain"));
    let (l_plain, l_neft) = (
        losses(&ws.path().join("plain")),
        losses(&ws.path().join("full")),
    );
    assert_ne!(
        l_plain[0], l_neft[0],
        "the first forward already sees the noise"
    );
    // Two workers (one row each per micro-batch) draw what one process with twice the
    // accumulation draws.
    let one_row = "max_steps: 4\nsave_steps: 2\nper_device_train_batch_size: 1\n\
                   neftune_noise_alpha: 5.0\n";
    let dp = ws.job("dp.yaml", "dp", one_row);
    let stderr = ws.run_workers(&dp, 2);
    assert!(stderr.contains("SUCCEEDED"), "{stderr}");
    let one = ws.job(
        "one.yaml",
        "one",
        &format!("{one_row}gradient_accumulation_steps: 2\n"),
    );
    ws.train(&one, &[]);
    assert_weights_close(
        &ws.path().join("dp/model.safetensors"),
        &ws.path().join("one/model.safetensors"),
        1e-5,
    );
}

#[test]
fn a_signal_pauses_with_its_exit_code_and_a_second_one_exits_at_once() {
    let ws = Workspace::new(16);
    ws.job(
        "long.yaml",
        "long",
        "max_steps: 1000000\nsave_steps: 1000000\ngradient_accumulation_steps: 4\n",
    );
    let log = ws.path().join("long.log");
    // Signals `sigs` (20 ms apart) once the run has started; its exit code and stderr.
    let run = |sigs: &[libc::c_int]| {
        let mut child = herd()
            .current_dir(ws.path())
            .args(["train", "long.yaml", "--no-progress"])
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        // The handlers are in place once the job has started reading its data.
        let t0 = Instant::now();
        while !std::fs::read_to_string(&log).unwrap().contains("data file") {
            assert!(t0.elapsed() < Duration::from_secs(60), "never started");
            std::thread::sleep(Duration::from_millis(20));
        }
        let pid = child.id() as libc::pid_t;
        for &sig in sigs {
            // SAFETY: a signal to our own child, which is alive (not yet waited for).
            assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
            // Two at once would merge into one pending signal: the second comes once the
            // first was taken, well inside the step it lets finish (four micro-batches).
            std::thread::sleep(Duration::from_millis(20));
        }
        let t0 = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "still running");
            std::thread::sleep(Duration::from_millis(20));
        };
        (status.code(), std::fs::read_to_string(&log).unwrap())
    };
    // One SIGTERM (a service manager's stop): the step finishes, a checkpoint is written and
    // the exit is 143 (128 + 15), not the 0 of a finished run.
    let (code, stderr) = run(&[libc::SIGTERM]);
    assert_eq!(code, Some(143), "{stderr}");
    assert!(
        stderr.contains("with a checkpoint (SIGTERM); run the same command to resume"),
        "{stderr}"
    );
    assert!(ws.path().join("long").read_dir().unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with("checkpoint-")));
    // Two SIGINTs: 130 at once, from the second signal, without the first one's checkpoint.
    let (code, stderr) = run(&[libc::SIGINT, libc::SIGINT]);
    assert_eq!(code, Some(130), "{stderr}");
    assert!(!stderr.contains("stopped at step"), "{stderr}");
}

/// `total_flos` and `num_input_tokens_seen` against the real HF Trainer
/// (tests/fixtures/make_flos.py): train.py's data on the parity models, untied, tied, with
/// accumulation and with LoRA adapters; the log entries have the keys HF's have.
#[test]
fn total_flos_and_tokens_seen_are_what_hf_trainer_counts() {
    let parity = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity");
    let fixture: serde_json::Value =
        serde_json::from_slice(&read(parity.join("flos.json"))).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for case in fixture["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let data = if case["job"]["gradient_accumulation_steps"].is_null() {
            "alpaca.json"
        } else {
            "flos_data.json"
        };
        // The case's keys are herd job keys as they are; YAML reads JSON.
        let keys: String = case["job"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| format!("{k}: {v}\n"))
            .collect();
        let job = dir.path().join(format!("{name}.yaml"));
        std::fs::write(
            &job,
            format!(
                "model_name_or_path: {p}/{model}\ntokenizer_name: {p}/tokenizer\n\
                 data_path: {p}/{data}\noutput_dir: {name}\nmodel_max_length: {max}\n\
                 learning_rate: 1.0e-3\nlogging_steps: 1\nsave_strategy: 'no'\n{keys}",
                p = parity.display(),
                model = case["model"].as_str().unwrap(),
                max = fixture["model_max_length"],
            ),
        )
        .unwrap();
        run_ok(
            herd()
                .current_dir(dir.path())
                .arg("train")
                .arg(&job)
                .arg("--no-progress"),
        );
        let state = trainer_state(&dir.path().join(name));
        let history = state["log_history"].as_array().unwrap();
        let last = history.last().unwrap();
        for (got, want) in [
            (&state["total_flos"], &case["total_flos"]),
            (&last["total_flos"], &case["logged_total_flos"]),
            (
                &state["num_input_tokens_seen"],
                &case["num_input_tokens_seen"],
            ),
        ] {
            assert_eq!(got.as_f64(), want.as_f64(), "{name}");
        }
        let keys = |entry: &serde_json::Value| -> Vec<String> {
            let mut k: Vec<String> = entry.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        let names = |v: &serde_json::Value| -> Vec<String> {
            let list = v.as_array().unwrap().iter();
            list.map(|k| k.as_str().unwrap().to_string()).collect()
        };
        assert_eq!(keys(&history[0]), names(&case["log_keys"]), "{name}");
        assert_eq!(keys(last), names(&case["summary_keys"]), "{name}");
    }
}
