//! `herd bench`: the JSON line a comparison script reads, and clear refusals.

mod common;
use common::*;

#[test]
fn bench_demo_prints_positive_json_fields() {
    let dir = tempfile::tempdir().unwrap();
    for extra in [
        &[][..],
        &["--gradient-checkpointing", "--peak-tflops", "1"][..],
        &["--bf16"][..],
        &[
            "--bf16",
            "--lora-r",
            "4",
            "--lora-targets",
            "q_proj,v_proj,down_proj",
        ][..],
    ] {
        let out = run_ok(
            herd()
                .current_dir(dir.path())
                .args(["bench", "--model", "demo", "--steps", "2", "--warmup", "1"])
                .args(["--batch", "2", "--seq", "16", "--json"])
                .args(extra),
        );
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        for k in [
            "params",
            "tokens_per_s",
            "step_time_s",
            "flops_per_token",
            "achieved_tflops",
            "peak_memory_bytes",
            "loss",
        ] {
            let v = j[k]
                .as_f64()
                .unwrap_or_else(|| panic!("{k} missing in {j}"));
            assert!(v > 0.0 && v.is_finite(), "{k} = {v}");
        }
        assert_eq!(j["device"], "cpu");
        // MFU only with a peak to divide by: not meaningful on the CPU by default.
        assert_eq!(j["mfu"].is_null(), !extra.contains(&"--peak-tflops"), "{j}");
        // --bf16 runs the GPU rank's numerics (fused host ops, f32 master weights).
        let want = if extra.contains(&"--bf16") {
            "bf16 (f32 master weights)"
        } else {
            "f32"
        };
        assert_eq!(j["dtype"], want, "{j}");
        // LoRA: only the adapters train, and the FLOPs count no weight gradients.
        let (params, trainable) = (
            j["params"].as_u64().unwrap(),
            j["trainable_params"].as_u64().unwrap(),
        );
        if extra.contains(&"--lora-r") {
            assert_eq!(j["lora_r"], 4, "{j}");
            assert!(trainable * 20 < params, "{trainable} of {params} trainable");
        } else {
            assert!(j["lora_r"].is_null(), "{j}");
            assert_eq!(trainable, params, "{j}");
        }
    }
    let err = run_err(herd().args(["bench", "--lora-r", "4", "--lora-targets", "qproj"]));
    assert!(err.contains("qproj"), "{err}");
}

#[test]
fn bench_refuses_cuda_without_the_backend_and_unknown_models() {
    let err = run_err(herd().args(["bench", "--device", "cuda:0"]));
    assert!(err.contains("built without CUDA"), "{err}");
    assert!(err.contains("--features cuda"), "{err}");
    let err = run_err(herd().args(["bench", "--model", "no-such-model"]));
    assert!(err.contains("not a preset"), "{err}");
}
