//! `zero_stage: 1` through the real binaries: `herd run` with two workers trains the same model
//! bit for bit as without sharding, writes the same whole checkpoint (rank 0 gathers the
//! shards), and that checkpoint resumes in one process at another world size.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::path::Path;

const STEPS: &str = "max_steps: 4\nsave_steps: 2\n";

/// Every tensor of a safetensors file as the bits of its f32 values.
fn bits(path: &Path) -> BTreeMap<String, Vec<u32>> {
    tensors(path)
        .into_iter()
        .map(|(k, v)| (k, v.iter().map(|x| x.to_bits()).collect()))
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

/// `herd run JOB --workers 2`, keeping the workers' logs to check that both sharded (their
/// logs say `needle`); then removes the kept state. Returns `herd run`'s stderr.
fn run_sharded(ws: &Workspace, job: &Path, needle: &str) -> String {
    let out = run_ok(
        herd_clean()
            .current_dir(ws.path())
            .arg("run")
            .arg(job)
            .args(["--workers", "2", "--keep-state"]),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("SUCCEEDED"), "{stderr}");
    let state = stderr
        .split("state and logs kept in ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("herd run names the kept state dir");
    for w in 0..2 {
        let log = std::fs::read_to_string(Path::new(state).join(format!("worker-{w}.log")));
        let log = log.unwrap();
        assert!(log.contains(needle), "worker {w}: {log}");
    }
    std::fs::remove_dir_all(state).unwrap();
    stderr.into_owned()
}

#[test]
fn zero_stage_1_equals_unsharded_and_its_checkpoint_resumes_at_another_world_size() {
    let ws = Workspace::new(32);
    let zero = ws.job("zero.yaml", "zero", &format!("{STEPS}zero_stage: 1\n"));
    let _ = run_sharded(&ws, &zero, "ZeRO-1: this rank holds");
    let plain = ws.job("plain.yaml", "plain", STEPS);
    ws.run_workers(&plain, 2);

    let (z, p) = (ws.path().join("zero"), ws.path().join("plain"));
    assert_eq!(
        bits(&z.join("model.safetensors")),
        bits(&p.join("model.safetensors")),
        "the final weights"
    );
    for step in [2, 4] {
        let opt = format!("checkpoint-{step}/optimizer.safetensors");
        let (zo, po) = (bits(&z.join(&opt)), bits(&p.join(&opt)));
        assert_eq!(zo, po, "{opt}");
        let moved = po.values().filter(|v| v.iter().any(|&x| x != 0)).count();
        assert_eq!(moved, po.len(), "{opt}: every moment has been written");
    }
    let args = std::fs::read_to_string(z.join("checkpoint-4/training_args.yaml")).unwrap();
    assert!(args.contains("zero_stage: 1"), "{args}");

    // The gathered checkpoint is whole: one process with the same global batch continues it.
    let moved = ws.path().join("moved");
    copy_dir(&z.join("checkpoint-2"), &moved.join("checkpoint-2"));
    let one = ws.job(
        "one.yaml",
        "moved",
        &format!("{STEPS}gradient_accumulation_steps: 2\n"),
    );
    ws.train(&one, &[]);
    assert_eq!(trainer_state(&moved)["global_step"], 4);
    assert_weights_close(
        &moved.join("model.safetensors"),
        &z.join("model.safetensors"),
        1e-5,
    );
}

/// `zero_stage: 2` with accumulation: each rank keeps its part of the gradient sum and the
/// model stays the unsharded one's within f32 rounding (the micro-batches are summed in another
/// order). 26 records at a global batch of 16 leave the second step's last micro-batch empty on
/// rank 1, which must still take part in its reduces. A resume from a stage-2 checkpoint
/// continues the same run bit for bit.
#[test]
fn zero_stage_2_tracks_unsharded_through_accumulation_and_resumes_exactly() {
    let ws = Workspace::new(26);
    let steps = "max_steps: 4\nsave_steps: 2\ngradient_accumulation_steps: 2\n";
    let zero = ws.job("zero.yaml", "zero", &format!("{steps}zero_stage: 2\n"));
    let _ = run_sharded(&ws, &zero, "ZeRO-2: this rank keeps the gradient");
    let plain = ws.job("plain.yaml", "plain", steps);
    ws.run_workers(&plain, 2);
    let (z, p) = (ws.path().join("zero"), ws.path().join("plain"));
    assert_weights_close(
        &z.join("model.safetensors"),
        &p.join("model.safetensors"),
        1e-5,
    );
    let (zl, pl) = (losses(&z), losses(&p));
    assert_eq!(zl.len(), 4, "{zl:?}");
    for (a, b) in zl.iter().zip(&pl) {
        assert!((a - b).abs() <= 1e-4 * b.abs(), "losses {zl:?} vs {pl:?}");
    }
    let args = std::fs::read_to_string(z.join("checkpoint-4/training_args.yaml")).unwrap();
    assert!(args.contains("zero_stage: 2"), "{args}");

    // Resuming the stage-2 run from its step-2 checkpoint ends where it did, bit for bit.
    let again = ws.path().join("again");
    copy_dir(&z.join("checkpoint-2"), &again.join("checkpoint-2"));
    let resume = ws.job("again.yaml", "again", &format!("{steps}zero_stage: 2\n"));
    ws.run_workers(&resume, 2);
    assert_eq!(trainer_state(&again)["global_step"], 4);
    assert_eq!(
        bits(&again.join("model.safetensors")),
        bits(&z.join("model.safetensors")),
        "the resumed final weights"
    );
}

/// ZeRO-2 shards whatever is trained: with LoRA that is the adapters alone. Two workers, one
/// micro-batch, no clipping: the adapters equal the unsharded run's bit for bit, in f32 and in
/// bf16 (the fused path on the CPU).
#[test]
fn zero_stage_2_with_lora_trains_the_same_adapters() {
    let ws = Workspace::new(16);
    let lora = "lora_r: 4\nlora_alpha: 16\nlora_target_modules: [q_proj, v_proj, down_proj]\n\
                max_steps: 3\nmax_grad_norm: 0.0\nsave_strategy: \"no\"\n";
    for bf16 in [false, true] {
        let common = format!("{lora}bf16: {bf16}\n");
        let (z, p) = (format!("zero-{bf16}"), format!("plain-{bf16}"));
        let zero = ws.job("zero.yaml", &z, &format!("{common}zero_stage: 2\n"));
        let _ = run_sharded(&ws, &zero, "ZeRO-2: this rank keeps the gradient");
        let plain = ws.job("plain.yaml", &p, &common);
        ws.run_workers(&plain, 2);
        let adapters = |d: &str| bits(&ws.path().join(d).join("adapter_model.safetensors"));
        let (za, pa) = (adapters(&z), adapters(&p));
        assert!(!pa.is_empty());
        assert_eq!(za, pa, "bf16 {bf16}: the adapters");
    }
}

/// The recipe's `--deepspeed ds_config.json` moves over as `deepspeed: ds_config.json`: the
/// ZeRO-3 + offload config with "auto" values (and train_batch_size written out as the two
/// workers' global batch) runs as stage 2, says what differs, and stores the config inline, so
/// the workers never read the file; the model equals a `zero_stage: 2` job's bit for bit.
#[test]
fn a_deepspeed_config_file_runs_as_hf_trainer_reads_it() {
    let ws = Workspace::new(16);
    std::fs::create_dir_all(ws.path().join("configs")).unwrap();
    std::fs::write(
        ws.path().join("configs/ds_config.json"),
        r#"{
  "bf16": {"enabled": "auto"},
  "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}, "overlap_comm": true},
  "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
  "train_batch_size": 8, "train_micro_batch_size_per_gpu": "auto", "steps_per_print": 2000
}"#,
    )
    .unwrap();
    let steps = "max_steps: 2\nsave_steps: 2\nper_device_train_batch_size: 4\n";
    let ds = ws.job(
        "ds.yaml",
        "ds",
        &format!("{steps}deepspeed: configs/ds_config.json\n"),
    );
    let stderr = run_sharded(&ws, &ds, "ZeRO-2: this rank keeps the gradient");
    for says in [
        "ds.yaml: deepspeed: ZeRO stage 3 (sharded parameters) is not built: the job runs as stage 2",
        "deepspeed: zero_optimization.offload_optimizer to cpu is not supported",
        "deepspeed: ignored (herd sizes its own buckets and has no such setting): zero_optimization.overlap_comm",
    ] {
        assert!(stderr.contains(says), "{says:?} not in {stderr}");
    }
    let args =
        std::fs::read_to_string(ws.path().join("ds/checkpoint-2/training_args.yaml")).unwrap();
    assert!(
        args.contains("zero_stage: 2") && args.contains("offload_optimizer"),
        "{args}"
    );
    // (The config has no optimizer section: with one, norms and biases are decayed too, as the
    // next test shows, which a `zero_stage: 2` job does not do.)
    let zero = ws.job("zero.yaml", "zero", &format!("{steps}zero_stage: 2\n"));
    let _ = run_sharded(&ws, &zero, "ZeRO-2: this rank keeps the gradient");
    assert_eq!(
        bits(&ws.path().join("ds/model.safetensors")),
        bits(&ws.path().join("zero/model.safetensors")),
    );
}

/// A DeepSpeed `optimizer` section makes HF Trainer hand DeepSpeed every parameter in one group
/// (`DummyOptim(params=model_parameters)`), so its AdamW decays the norm weights too, which HF's
/// own optimizer leaves out. Two steps (the first at lr 0, warming up): every other tensor equals
/// the plain job's bit for bit, and each norm weight is smaller by lr × weight_decay × itself.
#[test]
fn a_deepspeed_optimizer_section_decays_every_parameter() {
    let ws = Workspace::new(8);
    let steps = "max_steps: 2\nsave_strategy: 'no'\n";
    let ds = ws.job(
        "ds.yaml",
        "ds",
        &format!(
            "{steps}deepspeed: {{optimizer: {{type: AdamW, params: {{lr: auto, betas: auto, \
             eps: auto, weight_decay: auto}}}}}}\n"
        ),
    );
    let plain = ws.job("plain.yaml", "plain", steps);
    ws.train(&ds, &[]);
    ws.train(&plain, &[]);
    let base = tensors(&ws.path().join("demo/model/model.safetensors"));
    let a = tensors(&ws.path().join("ds/model.safetensors"));
    let b = tensors(&ws.path().join("plain/model.safetensors"));
    // Warmup 2 of 2 cosine steps from 1e-3: the second step's lr is 5e-4; weight_decay 0.01.
    let shrink = 5e-4 * 0.01;
    let mut norms = 0;
    for (name, got) in &a {
        let want = &b[name];
        if !name.ends_with("norm.weight") {
            assert_eq!(got, want, "{name}");
            continue;
        }
        norms += 1;
        for ((g, w), w0) in got.iter().zip(want).zip(&base[name]) {
            assert!(((w - g) - shrink * w0).abs() < 3e-7, "{name}: {g} {w} {w0}");
        }
    }
    assert!(norms > 0);
}
