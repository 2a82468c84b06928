//! Helpers shared by the integration tests.
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use herd_model::config::{LlamaConfig, RopeScaling};

/// A tiny config with grouped KV heads and llama3 rope scaling, so every code path is exercised.
pub fn tiny_config(tied: bool) -> LlamaConfig {
    let json = serde_json::json!({
        "vocab_size": 50, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 64, "tie_word_embeddings": tied, "hidden_act": "silu",
        "model_type": "llama", "initializer_range": 0.2,
    });
    let mut cfg: LlamaConfig = serde_json::from_value(json).unwrap();
    cfg.rope_scaling = Some(RopeScaling {
        rope_type: Some("llama3".into()),
        type_: None,
        factor: Some(8.0),
        low_freq_factor: Some(1.0),
        high_freq_factor: Some(4.0),
        original_max_position_embeddings: Some(16),
        extra: Default::default(),
    });
    cfg
}

pub fn ids(rows: &[&[u32]]) -> Tensor {
    let t = rows[0].len();
    let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_vec(flat, (rows.len(), t), &Device::Cpu).unwrap()
}

/// ‖a − b‖ / ‖b‖ over all elements.
pub fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a.len(), b.len());
    let diff: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let norm: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (diff / norm).sqrt()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The largest |x| (f32 or bf16 tensors).
pub fn max_abs(a: &Tensor) -> f32 {
    let a: Vec<f32> = a
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    a.iter().fold(0.0, |m, x| m.max(x.abs()))
}
