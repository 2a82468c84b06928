//! LoRA parity with PEFT 0.21 (fixtures by tests/fixtures/make_lora_parity.py): the PEFT adapter
//! dir loads, logits / loss / adapter gradients match, the base gets no gradient; our adapter files
//! round-trip; merging folds B A * alpha / r into the base.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use herd_model::lora::{LoraConfig, ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use herd_model::loss::causal_lm_loss_sum;
use herd_model::{weights, Llama};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/parity")
}

fn step() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("lora/step.safetensors"), &Device::Cpu).unwrap()
}

fn peft_model() -> Llama {
    let mut m = Llama::load(&fixtures().join("model")).unwrap();
    m.load_adapter(&fixtures().join("lora/adapter")).unwrap();
    m
}

fn masked_rel_max(a: &Tensor, b: &Tensor, mask: &Tensor) -> f64 {
    let a: Vec<Vec<Vec<f32>>> = a.to_vec3().unwrap();
    let b: Vec<Vec<Vec<f32>>> = b.to_vec3().unwrap();
    let mask: Vec<Vec<i64>> = mask.to_dtype(DType::I64).unwrap().to_vec2().unwrap();
    let (mut diff, mut scale) = (0f64, 0f64);
    for (i, row) in mask.iter().enumerate() {
        for (j, &m) in row.iter().enumerate() {
            if m == 1 {
                for (x, y) in a[i][j].iter().zip(&b[i][j]) {
                    diff = diff.max((x - y).abs() as f64);
                    scale = scale.max(y.abs() as f64);
                }
            }
        }
    }
    diff / scale
}

#[test]
fn peft_adapter_logits_loss_and_gradients_match() {
    let st = step();
    let model = peft_model();
    assert_eq!(
        model.config().vocab_size,
        308,
        "saved embedding layers resize the base"
    );
    let l = model.lora().unwrap();
    assert_eq!(
        (l.config.r, l.config.alpha, l.config.scale()),
        (4, 8.0, 2.0)
    );
    assert_eq!(model.trainable().len(), 8);
    assert_eq!(model.num_trainable_parameters(), 1792); // PEFT's count
    for (name, v) in model.trainable() {
        assert_eq!(
            common::max_abs_diff(v.as_tensor(), &st[&format!("adapter.{name}")]),
            0.0,
            "{name}"
        );
    }
    let ids = st["input_ids"].to_dtype(DType::U32).unwrap();
    let logits = model.forward(&ids).unwrap();
    let logits_err = masked_rel_max(&logits, &st["logits"], &st["attention_mask"]);
    let (sum, count) = causal_lm_loss_sum(&logits, &st["labels"]).unwrap();
    let loss = (sum / count as f64).unwrap();
    let ours = loss.to_scalar::<f32>().unwrap() as f64;
    let reference = st["loss"].flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] as f64;
    let loss_err = (ours - reference).abs() / reference;
    let grads = loss.backward().unwrap();
    let mut worst = 0f64;
    for (name, v) in model.trainable() {
        let g = grads
            .get(v)
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let err = common::rel_l2(g, &st[&format!("grad.{name}")]);
        worst = worst.max(err);
        assert!(err < 1e-3, "{name}: gradient rel err {err:e}");
    }
    for (name, v) in model.vars() {
        assert!(
            grads.get(v).is_none(),
            "frozen base weight {name} got a gradient"
        );
    }
    eprintln!("lora parity: logits max rel err {logits_err:.3e}, loss {ours} vs {reference} (rel {loss_err:.3e}), worst adapter grad rel err {worst:.3e}");
    assert!(logits_err < 1e-4, "logits rel err {logits_err:e}");
    assert!(loss_err < 1e-4, "loss rel err {loss_err:e}");
}

#[test]
fn adapter_round_trips_and_merges() {
    let st = step();
    let model = peft_model();
    let ids = st["input_ids"].to_dtype(DType::U32).unwrap();
    let logits = model.forward(&ids).unwrap();
    let dir = tempfile::tempdir().unwrap();
    model.save_adapter(dir.path(), "base").unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join(ADAPTER_CONFIG)).unwrap())
            .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["q_proj", "v_proj"])
    );
    let names: Vec<String> = weights::load_file(&dir.path().join(ADAPTER_WEIGHTS))
        .unwrap()
        .into_keys()
        .collect();
    assert!(names.contains(&"base_model.model.model.embed_tokens.weight".to_string()));
    assert!(names.contains(&"base_model.model.lm_head.weight".to_string()));
    assert!(names
        .contains(&"base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight".to_string()));
    let mut again = Llama::load(&fixtures().join("model")).unwrap();
    again.load_adapter(dir.path()).unwrap();
    assert_eq!(
        common::max_abs_diff(&again.forward(&ids).unwrap(), &logits),
        0.0
    );

    let merged = model.merged().unwrap();
    assert!(merged.lora().is_none());
    let diff = common::max_abs_diff(&merged.forward(&ids).unwrap(), &logits);
    assert!(diff < 1e-5, "merged logits differ by {diff:e}");
    let base = Llama::load(&fixtures().join("model")).unwrap();
    let q = |m: &Llama| {
        m.vars()
            .iter()
            .find(|(n, _)| n == "model.layers.0.self_attn.q_proj.weight")
            .unwrap()
            .1
            .as_tensor()
            .clone()
    };
    assert!(
        common::max_abs_diff(&q(&merged), &q(&base)) > 1e-4,
        "merge changed q_proj"
    );
}

#[test]
fn fresh_adapter_is_peft_init_and_identity() {
    let mut model = Llama::load(&fixtures().join("model")).unwrap();
    let ids = Tensor::new(&[[1u32, 5, 9, 30]], &Device::Cpu).unwrap();
    let before = model.forward(&ids).unwrap();
    let cfg = LoraConfig::new(8, 16.0, 0.0, vec!["v_proj".into(), "down_proj".into()]);
    model.enable_lora(cfg, 42).unwrap();
    assert_eq!(
        common::max_abs_diff(&model.forward(&ids).unwrap(), &before),
        0.0,
        "B = 0: no change"
    );
    let names: Vec<&str> = model.trainable().iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names[0],
        "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"
    );
    assert_eq!(
        names[3],
        "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"
    );
    for (name, v) in model.trainable() {
        let x: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        if name.contains("lora_A") {
            let bound = 1.0 / (v.dims()[1] as f32).sqrt();
            assert!(x.iter().all(|a| a.abs() <= bound) && x.iter().any(|a| a.abs() > bound / 2.0));
        } else {
            assert!(x.iter().all(|b| *b == 0.0));
        }
    }
    // (in, r) shapes: down_proj A is [r, intermediate].
    assert_eq!(model.trainable()[2].1.dims(), &[8, 160]);
    assert!(LoraConfig::new(4, 8.0, 0.0, vec!["wq".into()])
        .validate()
        .is_err());
}

/// lora_dropout in the model: the PEFT fixture adapter with dropout 0.5 gives PEFT's eval-mode
/// logits while no keys are set (and always in the inference net); with row keys set, the adapter
/// input is dropped, so logits move, identically for the same keys.
#[test]
fn dropout_acts_only_while_training_keys_are_set() {
    let eval = peft_model();
    // The same adapter values under a config with dropout 0.5.
    let mut model = peft_model();
    let mut cfg = eval.lora().unwrap().config.clone();
    cfg.dropout = 0.5;
    model.enable_lora(cfg, 0).unwrap();
    for ((_, dst), (_, src)) in model
        .lora()
        .unwrap()
        .vars
        .iter()
        .zip(&eval.lora().unwrap().vars)
    {
        dst.set(src.as_tensor()).unwrap();
    }
    assert!(model.has_lora_dropout());

    let ids = Tensor::new(&[[1u32, 5, 9, 30], [2, 6, 10, 31]], &Device::Cpu).unwrap();
    let reference = eval.forward(&ids).unwrap();
    assert!(common::max_abs_diff(&model.forward(&ids).unwrap(), &reference) < 1e-6);

    model.set_lora_dropout_keys(Some(vec![1, 2]));
    let dropped = model.forward(&ids).unwrap();
    assert!(
        common::max_abs_diff(&dropped, &reference) > 1e-4,
        "dropout had no effect"
    );
    assert_eq!(
        common::max_abs_diff(&model.forward(&ids).unwrap(), &dropped),
        0.0
    );
    let net = model.inference_net();
    assert!(common::max_abs_diff(&net.forward(&ids, None).unwrap(), &reference) < 1e-6);
    model.set_lora_dropout_keys(None);
    assert!(common::max_abs_diff(&model.forward(&ids).unwrap(), &reference) < 1e-6);
}
