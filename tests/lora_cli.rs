//! LoRA through the real binary: a job with `lora_r` trains only the adapters and writes a PEFT
//! adapter dir; the base model is untouched; resume is bit-identical; `herd merge` folds the adapter
//! into a plain model with the same logits; `herd generate` loads an adapter dir.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use herd_model::Llama;

const LORA: &str = "lora_r: 4\nlora_alpha: 16\nlora_target_modules: [q_proj, v_proj, down_proj]\nmax_steps: 8\nseed: 7\n";

#[test]
fn lora_job_trains_adapter_only_resumes_and_merges() {
    let ws = Workspace::new(16);
    let base_file = ws.path().join("demo/model/model.safetensors");
    let base_bytes = read(&base_file);
    let job = ws.job("lora.yaml", "out", LORA);
    ws.train(&job, &[]);
    let out = ws.path().join("out");

    // PEFT layout, no full model.
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "trainer_state.json",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    assert!(!out.join("model.safetensors").exists() && !out.join("config.json").exists());
    let cfg: serde_json::Value =
        serde_json::from_slice(&read(out.join("adapter_config.json"))).unwrap();
    assert_eq!(
        (
            cfg["peft_type"].as_str(),
            cfg["r"].as_u64(),
            cfg["lora_alpha"].as_f64()
        ),
        (Some("LORA"), Some(4), Some(16.0))
    );
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["q_proj", "v_proj", "down_proj"])
    );

    // Loss goes down.
    let l = losses(&out);
    assert_eq!(l.len(), 8);
    assert!(l[6] + l[7] < l[0] + l[1], "loss did not decrease: {l:?}");

    // Only adapters (and the [PAD]-resized embedding rows, which are the base's plus the mean row)
    // are stored; the base file is untouched; every lora_B moved away from 0.
    assert_eq!(read(&base_file), base_bytes, "base model file changed");
    let t = tensors(&out.join("adapter_model.safetensors"));
    let base = Llama::load(&ws.path().join("demo/model")).unwrap();
    let layers = base.config().num_hidden_layers;
    assert_eq!(
        t.len(),
        layers * 3 * 2 + 2,
        "{:?}",
        t.keys().collect::<Vec<_>>()
    );
    for (name, v) in &t {
        if name.contains("lora_B") {
            assert!(v.iter().any(|x| *x != 0.0), "{name} did not train");
        } else if name.ends_with("embed_tokens.weight") {
            let b: Vec<f32> = base.vars()[0]
                .1
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(&v[..b.len()], &b[..], "embedding rows of the base changed");
        }
    }
    let trained = Llama::load(&out).unwrap(); // base from base_model_name_or_path + adapter
    for ((n, a), (_, b)) in trained.vars().iter().zip(base.vars()) {
        if a.dims() == b.dims() {
            let d = (a.as_tensor() - b.as_tensor())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(d, 0.0, "frozen {n} changed");
        }
    }

    // Stop at step 3, resume: bit-identical adapter.
    let job2 = ws.job("lora2.yaml", "out2", LORA);
    ws.train(&job2, &["--until-step", "3"]);
    assert!(ws
        .path()
        .join("out2/checkpoint-3/adapter_model.safetensors")
        .exists());
    assert!(!ws.path().join("out2/adapter_model.safetensors").exists());
    let ckpt_opt = tensors(
        &ws.path()
            .join("out2/checkpoint-3")
            .join("optimizer.safetensors"),
    )
    .into_keys()
    .collect::<Vec<_>>();
    assert!(
        !ckpt_opt.is_empty() && ckpt_opt.iter().all(|n| n.contains(".lora_")),
        "optimizer state only for adapters: {ckpt_opt:?}"
    );
    ws.train(&job2, &[]);
    assert_eq!(
        read(out.join("adapter_model.safetensors")),
        read(ws.path().join("out2/adapter_model.safetensors")),
        "resume is not bit-identical"
    );
    assert_eq!(losses(&out), losses(&ws.path().join("out2")));

    // Merging over what is read is refused before anything is written.
    let base_before = read(ws.path().join("demo/model/model.safetensors"));
    let err = run_err(herd().current_dir(ws.path()).args([
        "merge",
        "--base",
        "demo/model",
        "--adapter",
        "out",
        "--out",
        "demo/model/",
    ]));
    assert!(err.contains("is the --base directory"), "{err}");
    assert_eq!(
        read(ws.path().join("demo/model/model.safetensors")),
        base_before
    );

    // Merge: plain HF model, same logits as base + adapter.
    let o = run_ok(herd().current_dir(ws.path()).args([
        "merge",
        "--base",
        "demo/model",
        "--adapter",
        "out",
        "--out",
        "merged",
    ]));
    assert!(String::from_utf8_lossy(&o.stdout).contains("merged"));
    let merged_dir = ws.path().join("merged");
    assert!(merged_dir.join("config.json").exists() && merged_dir.join("tokenizer.json").exists());
    let merged = Llama::load(&merged_dir).unwrap();
    assert!(merged.lora().is_none());
    assert_eq!(merged.num_parameters(), trained.num_parameters());
    let ids = Tensor::new(&[[1u32, 10, 20, 30, 40, 50, 60, 70]], &Device::Cpu).unwrap();
    let (a, b) = (
        trained.forward(&ids).unwrap(),
        merged.forward(&ids).unwrap(),
    );
    let scale = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let diff = (a - &b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        diff <= 1e-5 * scale.max(1.0),
        "merged logits differ by {diff}"
    );

    // generate: an adapter dir and the merged model answer alike (greedy).
    let gen = |m: &str| {
        let o = run_ok(herd().current_dir(ws.path()).args([
            "generate",
            "--model",
            m,
            "--instruction",
            "Name a color.",
            "--max-new-tokens",
            "12",
        ]));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert_eq!(gen("out"), gen("merged"));
}

/// lora_dropout > 0: training differs from dropout 0 (the masks are real), stays deterministic
/// (two runs equal, resume bit-identical), and the saved adapter records the dropout for PEFT.
#[test]
fn lora_dropout_trains_deterministically_and_resumes() {
    let ws = Workspace::new(8);
    let with =
        |p: f64| format!("lora_r: 4\nlora_alpha: 16\nlora_dropout: {p}\nmax_steps: 4\nseed: 3\n");
    let job = ws.job("d.yaml", "d", &with(0.3));
    ws.train(&job, &[]);
    let job0 = ws.job("d0.yaml", "d0", &with(0.0));
    ws.train(&job0, &[]);
    let (d, d0) = (ws.path().join("d"), ws.path().join("d0"));
    assert_ne!(
        read(d.join("adapter_model.safetensors")),
        read(d0.join("adapter_model.safetensors")),
        "dropout changed nothing"
    );
    let cfg: serde_json::Value =
        serde_json::from_slice(&read(d.join("adapter_config.json"))).unwrap();
    assert_eq!(cfg["lora_dropout"].as_f64(), Some(0.3));

    let job2 = ws.job("d2.yaml", "d2", &with(0.3));
    ws.train(&job2, &["--until-step", "2"]);
    ws.train(&job2, &[]);
    assert_eq!(
        read(d.join("adapter_model.safetensors")),
        read(ws.path().join("d2/adapter_model.safetensors")),
        "dropout run is not reproducible across a resume"
    );
    assert_eq!(losses(&d), losses(&ws.path().join("d2")));
}
