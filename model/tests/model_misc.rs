//! Config parsing, deterministic init, resize and loss edge cases.

mod common;

use candle_core::{DType, Device, Tensor};
use herd_model::loss::causal_lm_loss_sum;
use herd_model::{Llama, LlamaConfig};

#[test]
fn config_accepts_legacy_and_list_forms() {
    let json = r#"{"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2, "eos_token_id": [7, 8, 9],
        "rope_scaling": {"type": "linear", "rope_type": "linear", "factor": 2.0}, "odd": 1}"#;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), json).unwrap();
    let cfg = LlamaConfig::from_file(&dir.path().join("config.json")).unwrap();
    assert_eq!(
        (
            cfg.eos_token_id.as_ref().map(|e| e.all().to_vec()),
            cfg.kv_heads(),
            cfg.head_dim()
        ),
        (Some(vec![7, 8, 9]), 2, 4)
    );
    assert_eq!(cfg.rope_scaling.as_ref().unwrap().kind(), "linear");
    cfg.save(dir.path()).unwrap();
    let again = LlamaConfig::from_file(&dir.path().join("config.json")).unwrap();
    assert_eq!(again, cfg);
    assert_eq!(again.extra["odd"], 1);

    let bad = json.replace("\"linear\"", "\"yarn\"");
    std::fs::write(dir.path().join("config.json"), bad).unwrap();
    assert!(LlamaConfig::from_file(&dir.path().join("config.json")).is_err());
}

#[test]
fn config_values_no_model_can_have_are_named() {
    type Break = fn(&mut LlamaConfig);
    let cases: [(&str, Break); 7] = [
        ("vocab_size must be at least 1", |c| c.vocab_size = 0),
        (r#"model_type "qwen2" is not supported"#, |c| {
            c.extra.insert("model_type".into(), "qwen2".into());
        }),
        (
            r#"model_type "mistral" with sliding_window 16 is not supported"#,
            |c| {
                c.extra.insert("model_type".into(), "mistral".into());
                c.extra.insert("sliding_window".into(), 16.into());
            },
        ),
        ("max_position_embeddings must be at least 1", |c| {
            c.max_position_embeddings = 0
        }),
        ("rms_norm_eps must be a finite number > 0, got -1", |c| {
            c.rms_norm_eps = -1.0
        }),
        ("rope_theta must be a finite number > 0, got 0", |c| {
            c.rope_theta = 0.0
        }),
        ("rope_theta must be a finite number > 0, got NaN", |c| {
            c.rope_theta = f64::NAN
        }),
    ];
    // Mistral without a window (or one no sequence can exceed) is LLaMA's math.
    for window in [serde_json::Value::Null, 64.into()] {
        let mut cfg = common::tiny_config(false);
        cfg.extra.insert("model_type".into(), "mistral".into());
        cfg.extra.insert("sliding_window".into(), window);
        cfg.validate().unwrap();
    }
    for (says, break_it) in cases {
        let mut cfg = common::tiny_config(false);
        cfg.validate().unwrap();
        break_it(&mut cfg);
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains(says), "{says}: {err}");
    }
}

#[test]
fn random_init_is_deterministic_and_scaled() {
    let a = Llama::random(common::tiny_config(false), 5).unwrap();
    let b = Llama::random(common::tiny_config(false), 5).unwrap();
    let c = Llama::random(common::tiny_config(false), 6).unwrap();
    for (((name, va), (_, vb)), (_, vc)) in a.vars().iter().zip(b.vars()).zip(c.vars()) {
        assert_eq!(common::max_abs_diff(va, vb), 0.0, "{name}");
        let values: Vec<f32> = va.flatten_all().unwrap().to_vec1().unwrap();
        if name.ends_with("norm.weight") {
            assert!(values.iter().all(|&v| v == 1.0));
        } else {
            assert!(common::max_abs_diff(va, vc) > 0.0);
            let n = values.len() as f64;
            let std = (values.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / n).sqrt();
            assert!((std - 0.2).abs() < 0.03, "{name}: std {std}");
        }
    }
}

#[test]
fn resize_appends_mean_rows() {
    for tied in [false, true] {
        let mut model = Llama::random(common::tiny_config(tied), 9).unwrap();
        let before: Vec<Tensor> = model
            .vars()
            .iter()
            .map(|(_, v)| v.as_tensor().clone())
            .collect();
        model.resize_token_embeddings(53, 3).unwrap();
        assert_eq!(model.config().vocab_size, 53);
        for ((name, var), old) in model.vars().iter().zip(&before) {
            if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
                assert_eq!(var.dims(), [53, 32]);
                let mean = old.mean_keepdim(0).unwrap();
                for row in 50..53 {
                    let r = var.narrow(0, row, 1).unwrap();
                    assert!(common::max_abs_diff(&r, &mean) < 1e-7, "{name} row {row}");
                }
                assert_eq!(
                    common::max_abs_diff(&var.narrow(0, 0, 50).unwrap(), old),
                    0.0
                );
            } else {
                assert_eq!(common::max_abs_diff(var, old), 0.0, "{name}");
            }
        }
        let logits = model.forward(&common::ids(&[&[1, 52, 51]])).unwrap();
        assert_eq!(logits.dims(), [1, 3, 53]);
    }
}

/// A vocabulary padded beyond the tokenizer is cut to it, as train.py's resize to
/// len(tokenizer) does, and the added token's row is the mean of the rows kept before it.
#[test]
fn resize_to_a_smaller_tokenizer_cuts_and_means_the_added_rows() {
    let mut model = Llama::random(common::tiny_config(false), 9).unwrap();
    let embed = |m: &Llama| {
        let vars = m.vars();
        let (_, v) = vars
            .iter()
            .find(|(n, _)| n == "model.embed_tokens.weight")
            .unwrap();
        v.as_tensor().clone()
    };
    let before = embed(&model);
    // 44 tokens in the tokenizer, one added ([PAD]): 45 rows.
    model.resize_token_embeddings(45, 1).unwrap();
    let after = embed(&model);
    assert_eq!(after.dims(), [45, 32]);
    let kept = before.narrow(0, 0, 44).unwrap();
    assert_eq!(
        common::max_abs_diff(&after.narrow(0, 0, 44).unwrap(), &kept),
        0.0
    );
    let mean = kept.mean_keepdim(0).unwrap();
    assert!(common::max_abs_diff(&after.narrow(0, 44, 1).unwrap(), &mean) < 1e-7);
    assert_eq!(model.config().vocab_size, 45);
}

#[test]
fn loss_ignores_masked_labels_and_counts() {
    // Uniform logits: every counted token costs ln(vocab).
    let logits = Tensor::zeros((2, 4, 10), DType::F32, &Device::Cpu).unwrap();
    let labels = Tensor::new(&[[5i64, -100, 3, 4], [1, 2, -100, -100]], &Device::Cpu).unwrap();
    let (sum, count) = causal_lm_loss_sum(&logits, &labels).unwrap();
    assert_eq!(count, 3); // labels[:, 1:] != -100: 3, 4, 2
    let sum = sum.to_scalar::<f32>().unwrap();
    assert!((sum - 3.0 * (10f32).ln()).abs() < 1e-5);
    let all_ignored = Tensor::new(&[[-100i64, -100]], &Device::Cpu).unwrap();
    let (sum, count) = causal_lm_loss_sum(
        &Tensor::zeros((1, 2, 10), DType::F32, &Device::Cpu).unwrap(),
        &all_ignored,
    )
    .unwrap();
    assert_eq!((sum.to_scalar::<f32>().unwrap(), count), (0.0, 0));
    let out_of_range = Tensor::new(&[[0i64, 10]], &Device::Cpu).unwrap();
    assert!(causal_lm_loss_sum(
        &Tensor::zeros((1, 2, 10), DType::F32, &Device::Cpu).unwrap(),
        &out_of_range
    )
    .is_err());
}
