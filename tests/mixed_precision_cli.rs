//! `bf16: true` on a CPU rank: the GPU rank's mixed precision (bf16 forward/backward through the
//! fused ops' host code, f32 master weights and AdamW state, f32 loss), end to end through the
//! binary. Checkpoints hold the f32 master weights, so stop + resume is bit-identical; the final
//! model is bf16 as HF saves a bf16 run; the loss tracks the f32 run's.

mod common;
use common::*;

const STEPS: &str = "max_steps: 6\nsave_steps: 2\nsave_total_limit: 2\n";

fn dtypes(path: &std::path::Path) -> Vec<String> {
    let bytes = read(path);
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut d: Vec<String> = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(_, v)| v["dtype"].as_str().unwrap().to_string())
        .collect();
    d.dedup();
    d
}

#[test]
fn bf16_run_resumes_bit_identically_saves_bf16_and_tracks_f32() {
    let ws = Workspace::new(48);
    let bf16 = format!("{STEPS}bf16: true\n");
    let full = ws.job("full.yaml", "full", &bf16);
    let out = ws.train(&full, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("mixed precision"), "{stderr}");

    let parted = ws.job("parted.yaml", "parted", &bf16);
    ws.train(&parted, &["--until-step", "3"]);
    // the checkpoint holds the f32 master weights, not their bf16 rounding
    let ckpt = ws.path().join("parted/checkpoint-3/model.safetensors");
    assert_eq!(dtypes(&ckpt), ["F32"]);
    let out = ws.train(&parted, &[]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("resumed at step 3"));
    assert_eq!(
        read(ws.path().join("full/model.safetensors")),
        read(ws.path().join("parted/model.safetensors"))
    );
    assert_eq!(
        losses(&ws.path().join("full")),
        losses(&ws.path().join("parted"))
    );

    // the final model is bf16 and says so
    assert_eq!(dtypes(&ws.path().join("full/model.safetensors")), ["BF16"]);
    let cfg: serde_json::Value =
        serde_json::from_slice(&read(ws.path().join("full/config.json"))).unwrap();
    assert_eq!(cfg["torch_dtype"], "bfloat16");

    // the same job in f32: every logged loss within 1%, and not bit-equal
    let f32_job = ws.job("f32.yaml", "f32", STEPS);
    ws.train(&f32_job, &[]);
    let (a, b) = (
        losses(&ws.path().join("f32")),
        losses(&ws.path().join("full")),
    );
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 0.01 * x.abs(), "f32 {a:?} vs bf16 {b:?}");
    }
    assert_ne!(a, b, "the bf16 run computed in f32");
}

#[test]
fn bf16_with_packing_recompute_and_eval_trains() {
    let ws = Workspace::new(24);
    ws.heldout(8);
    let extra = "max_steps: 3\nsave_steps: 100\npacking: true\ngradient_checkpointing: true\n\
                 per_device_train_batch_size: 2\nmodel_max_length: 256\nbf16: true\n\
                 eval_strategy: steps\neval_steps: 3\neval_data_path: heldout.json\n";
    let job = ws.job("a.yaml", "a", extra);
    ws.train(&job, &[]);
    let hist = trainer_state(&ws.path().join("a"))["log_history"].clone();
    let eval: Vec<f64> = hist
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["eval_loss"].as_f64())
        .collect();
    assert_eq!(eval.len(), 1, "{hist}");
    let train = losses(&ws.path().join("a"));
    assert_eq!(train.len(), 3);
    assert!(
        train.iter().chain(&eval).all(|l| l.is_finite() && *l > 0.0),
        "{hist}"
    );
}

/// Two bf16 workers (`herd run --workers 2`, TCP ring) sum the device gradients through the host
/// and end where one bf16 process with twice the accumulation ends.
#[test]
fn two_bf16_workers_equal_one_process() {
    let ws = Workspace::new(16);
    let steps = "max_steps: 2\nsave_steps: 2\nbf16: true\nper_device_train_batch_size: 2\n";
    let dp = ws.job("dp.yaml", "dp", steps);
    let stderr = ws.run_workers(&dp, 2);
    assert!(stderr.contains("SUCCEEDED"));
    let one = ws.job(
        "one.yaml",
        "one",
        &format!("{steps}gradient_accumulation_steps: 2\n"),
    );
    ws.train(&one, &[]);
    // the checkpoints hold the f32 master weights
    assert_weights_close(
        &ws.path().join("dp/checkpoint-2/model.safetensors"),
        &ws.path().join("one/checkpoint-2/model.safetensors"),
        1e-5,
    );
    // The logged losses are unrounded (as transformers 5 logs them): step 2's see the bf16
    // weights that summed gradients of different grouping moved, equal to ~1e-7.
    let (dp, one) = (
        losses(&ws.path().join("dp")),
        losses(&ws.path().join("one")),
    );
    assert_eq!(dp.len(), one.len());
    assert_eq!(dp[0], one[0]);
    for (a, b) in dp.iter().zip(&one) {
        assert!((a - b).abs() <= 1e-6 * b.abs(), "{dp:?} vs {one:?}");
    }
}
