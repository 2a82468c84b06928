//! Reward-model parity with transformers' LlamaForSequenceClassification (fixture made by
//! tests/fixtures/make_reward_parity.py): rewards pooled at the last non-pad token of right-padded
//! rows, the pairwise loss mean(-log σ(r_a − r_b)) and every parameter gradient.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use herd_model::reward::pairwise_loss_sum;
use herd_model::RewardModel;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/parity/reward")
}

/// max |a − b| / max |b|.
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a.len(), b.len());
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let scale = b.iter().map(|y| y.abs()).fold(0f32, f32::max);
    (diff / scale) as f64
}

#[test]
fn rewards_loss_and_gradients_match_transformers() {
    let fx: HashMap<String, Tensor> =
        candle_core::safetensors::load(fixture().join("reward.safetensors"), &Device::Cpu).unwrap();
    let model = RewardModel::load(&fixture().join("model"), 0).unwrap();
    assert_eq!(model.pad_token_id(), Some(0));
    let ids = fx["input_ids"].to_dtype(DType::U32).unwrap();
    let r = model.scores(&ids).unwrap();
    let r_ref = &fx["rewards"];
    assert!(rel(&r, r_ref) < 1e-4, "rewards {r} vs {r_ref}");
    let inference = model.scores_inference(&ids).unwrap();
    assert_eq!(inference, r.to_vec1::<f32>().unwrap());

    let n = r.dim(0).unwrap() / 2;
    let (sum, _) =
        pairwise_loss_sum(&r.narrow(0, 0, n).unwrap(), &r.narrow(0, n, n).unwrap()).unwrap();
    let loss = (sum / n as f64).unwrap();
    let l = loss.to_scalar::<f32>().unwrap();
    let l_ref = fx["loss"].to_scalar::<f32>().unwrap();
    assert!(((l - l_ref) / l_ref).abs() < 1e-4, "loss {l} vs {l_ref}");

    let grads = loss.backward().unwrap();
    let mut checked = 0;
    for (name, var) in model.trainable() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let g_ref = &fx[&format!("grad.{name}")];
        let e = rel(g, g_ref);
        assert!(e < 1e-3, "{name}: relative gradient error {e}");
        checked += 1;
    }
    // Every transformers parameter has its herd counterpart (no lm_head on either side).
    assert_eq!(
        checked,
        fx.keys().filter(|k| k.starts_with("grad.")).count()
    );
}

#[test]
fn save_writes_a_sequence_classifier_that_loads_back() {
    let model = RewardModel::load(&fixture().join("model"), 0).unwrap();
    let d = tempfile::tempdir().unwrap();
    model.save(d.path(), DType::F32).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["architectures"][0], "LlamaForSequenceClassification");
    assert_eq!(cfg["id2label"]["0"], "LABEL_0");
    assert_eq!(cfg["pad_token_id"], 0);
    assert_eq!(cfg["tie_word_embeddings"], false);
    let w = herd_model::weights::load_dir(d.path()).unwrap();
    assert_eq!(w["score.weight"].dims(), &[1, 16]);
    assert!(!w.contains_key("lm_head.weight"));
    let back = RewardModel::load(d.path(), 0).unwrap();
    let ids = Tensor::new(&[[1u32, 5, 9, 2, 0]], &Device::Cpu).unwrap();
    assert_eq!(
        back.scores_inference(&ids).unwrap(),
        model.scores_inference(&ids).unwrap()
    );
}

#[test]
fn a_causal_lm_gets_a_seeded_head_and_loses_its_lm_head() {
    let cfg = herd_model::LlamaConfig::from_file(&fixture().join("model/config.json")).unwrap();
    let base = herd_model::Llama::random(cfg.clone(), 3).unwrap();
    let tensors = base
        .vars()
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
        .collect();
    let a = RewardModel::from_tensors(cfg.clone(), tensors, 7).unwrap();
    let head = |m: &RewardModel| {
        m.trainable()
            .last()
            .unwrap()
            .1
            .as_tensor()
            .to_vec2::<f32>()
            .unwrap()
    };
    assert_eq!(a.trainable().last().unwrap().0, "score.weight");
    assert!(a.trainable().iter().all(|(n, _)| n != "lm_head.weight"));
    let tensors = base
        .vars()
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
        .collect();
    let b = RewardModel::from_tensors(cfg, tensors, 7).unwrap();
    assert_eq!(head(&a), head(&b)); // a pure function of the seed
    let std = (head(&a)[0].iter().map(|x| x * x).sum::<f32>() / 16.0).sqrt();
    assert!(std > 0.005 && std < 0.05, "head std {std}"); // normal(0, initializer_range = 0.02)
}
