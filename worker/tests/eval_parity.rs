//! Evaluation against its references: ROUGE-L against Google's `rouge-score` (fixture from
//! tests/fixtures/make_rouge_fixture.py), and the eval loss against the training loss on the
//! PyTorch parity batch (tests/fixtures/make_parity.py).

use candle_core::{Device, Tensor};
use herd_model::{weights, Llama, LlamaConfig};
use herd_worker::collective::SingleProcess;
use herd_worker::data::{Batch, Example};
use herd_worker::eval::{eval_loss, rouge};
use herd_worker::optim::AdamWConfig;
use herd_worker::trainer::engine::Engine;
use std::collections::HashMap;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

#[test]
fn rouge_l_matches_rouge_score() {
    let text = std::fs::read_to_string(fixtures().join("rouge/cases.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = v["cases"].as_array().unwrap();
    assert!(cases.len() >= 50, "{} cases", cases.len());
    let mut worst = 0.0f64;
    for c in cases {
        let (reference, prediction) = (
            c["reference"].as_str().unwrap(),
            c["prediction"].as_str().unwrap(),
        );
        let toks = |k: &str| {
            c[k].as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            rouge::tokenize(reference),
            toks("reference_tokens"),
            "tokens of {reference:?}"
        );
        assert_eq!(
            rouge::tokenize(prediction),
            toks("prediction_tokens"),
            "tokens of {prediction:?}"
        );
        let s = rouge::rouge_l(reference, prediction);
        for (ours, key) in [
            (s.precision, "precision"),
            (s.recall, "recall"),
            (s.fmeasure, "fmeasure"),
        ] {
            let theirs = c[key].as_f64().unwrap();
            let d = (ours - theirs).abs();
            assert!(
                d <= 1e-6,
                "{key} of ({reference:?}, {prediction:?}): {ours} vs {theirs}"
            );
            worst = worst.max(d);
        }
    }
    eprintln!(
        "ROUGE-L: {} cases, max |ours - rouge-score| = {worst:.1e}",
        cases.len()
    );
}

fn load_step() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("parity/step.safetensors"), &Device::Cpu)
        .unwrap()
}

/// The fixture's model with train.py's resized embeddings (as in step_parity.rs).
fn resized_model(step: &HashMap<String, Tensor>) -> Llama {
    let dir = fixtures().join("parity/model");
    let mut cfg = LlamaConfig::from_file(&dir.join("config.json")).unwrap();
    let mut tensors = weights::load_dir(&dir).unwrap();
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        tensors.insert(name.to_string(), step[&format!("init.{name}")].clone());
    }
    cfg.vocab_size = step["init.lm_head.weight"].dim(0).unwrap();
    Llama::from_tensors(cfg, tensors).unwrap()
}

/// The fixture batch as its right-padded rows, and the rows without their padding.
fn batch_and_examples(step: &HashMap<String, Tensor>) -> (Batch, Vec<Example>) {
    let (b, t) = step["input_ids"].dims2().unwrap();
    let v = |name: &str| step[name].flatten_all().unwrap().to_vec1::<i64>().unwrap();
    let (ids, labels, mask) = (v("input_ids"), v("labels"), v("attention_mask"));
    let batch = Batch {
        input_ids: ids.iter().map(|&x| x as u32).collect(),
        labels: labels.clone(),
        attention_mask: mask.iter().map(|&x| x as u8).collect(),
        batch: b,
        seq_len: t,
        layout: None,
    };
    let examples = (0..b)
        .map(|i| {
            let row = i * t..(i + 1) * t;
            let len = mask[row.clone()].iter().filter(|&&m| m != 0).count();
            Example {
                input_ids: ids[row.clone()][..len].iter().map(|&x| x as u32).collect(),
                labels: labels[row][..len].to_vec(),
            }
        })
        .collect();
    (batch, examples)
}

#[test]
fn eval_loss_equals_training_loss() {
    let step = load_step();
    let model = resized_model(&step);
    let (batch, examples) = batch_and_examples(&step);
    // Right padding under a causal mask with -100 labels: the pad id changes no counted logit.
    let pad = 0;
    let torch = step["loss"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0] as f64;

    // One batch of all four: HF's eval_loss is the batch's token mean, the fixture's training loss.
    let one = eval_loss(&model, &examples, examples.len(), pad).unwrap();
    assert_eq!(
        (one.batches, one.examples, one.tokens),
        (1, 4, batch.label_tokens())
    );
    eprintln!(
        "eval_loss {} vs torch {torch}: rel {:.1e}",
        one.loss,
        (one.loss - torch).abs() / torch
    );
    assert!(
        (one.loss - torch).abs() / torch < 1e-5,
        "eval {} vs torch {torch}",
        one.loss
    );
    assert_eq!(one.loss, one.token_loss);

    // The engine's training forward on the same batch gives the same number.
    let adam = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let mut engine = Engine::new(resized_model(&step), adam, 1.0);
    engine.zero_grad().unwrap();
    let (sum, count) = engine.accumulate(&batch).unwrap();
    let stats = engine.apply(&mut SingleProcess, 0.0).unwrap();
    assert_eq!(count, one.tokens);
    assert!(
        (sum / count as f64 - one.loss).abs() < 1e-6 * one.loss,
        "train {} vs eval {}",
        sum / count as f64,
        one.loss
    );
    assert!((stats.loss - one.loss).abs() < 1e-6 * one.loss);

    // Batches of one: HF averages the per-example means; the token mean stays the fixture's loss.
    let single = eval_loss(&model, &examples, 1, pad).unwrap();
    assert_eq!(single.batches, 4);
    let per_example: Vec<f64> = examples
        .iter()
        .map(|e| {
            eval_loss(&model, std::slice::from_ref(e), 1, pad)
                .unwrap()
                .loss
        })
        .collect();
    let mean = per_example.iter().sum::<f64>() / 4.0;
    assert!((single.loss - mean).abs() < 1e-9);
    assert!((single.token_loss - torch).abs() / torch < 1e-5);
}
