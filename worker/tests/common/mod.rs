//! The parity fixture (tests/fixtures/make_parity.py) as the worker tests read it.
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use herd_model::{weights, Llama, LlamaConfig};
use herd_worker::data::Batch;
use herd_worker::optim::AdamWConfig;
use std::collections::HashMap;
use std::path::PathBuf;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/parity")
}

pub fn load_step() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("step.safetensors"), &Device::Cpu).unwrap()
}

/// The fixture's starting point: model/ with the train.py-resized embeddings (`init.*`).
pub fn resized_model(step: &HashMap<String, Tensor>) -> Llama {
    let mut cfg = LlamaConfig::from_file(&fixtures().join("model/config.json")).unwrap();
    let mut tensors = weights::load_dir(&fixtures().join("model")).unwrap();
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        tensors.insert(name.to_string(), step[&format!("init.{name}")].clone());
    }
    cfg.vocab_size = step["init.lm_head.weight"].dim(0).unwrap();
    Llama::from_tensors(cfg, tensors).unwrap()
}

/// torch.optim.AdamW's defaults (betas 0.9/0.999, eps 1e-8) with `weight_decay`.
pub fn torch_adam(weight_decay: f64) -> AdamWConfig {
    AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay,
    }
}

pub fn batch(step: &HashMap<String, Tensor>) -> Batch {
    let ids = &step["input_ids"];
    let (b, t) = ids.dims2().unwrap();
    let v = |name: &str| step[name].flatten_all().unwrap().to_vec1::<i64>().unwrap();
    Batch {
        input_ids: v("input_ids").into_iter().map(|x| x as u32).collect(),
        labels: v("labels"),
        attention_mask: v("attention_mask").into_iter().map(|x| x as u8).collect(),
        batch: b,
        seq_len: t,
        layout: None,
    }
}

/// Rows `r` of a batch (the rows a rank takes in the multi-rank tests).
pub fn rows(b: &Batch, r: std::ops::Range<usize>) -> Batch {
    let t = b.seq_len;
    let cut = r.start * t..r.end * t;
    Batch {
        input_ids: b.input_ids[cut.clone()].to_vec(),
        labels: b.labels[cut.clone()].to_vec(),
        attention_mask: b.attention_mask[cut].to_vec(),
        batch: r.len(),
        seq_len: t,
        layout: None,
    }
}

/// Every trainable parameter's weights as the bits of their f32 values.
pub fn weight_bits(model: &Llama) -> Vec<Vec<u32>> {
    let f32_bits = |v: &candle_core::Var| {
        let t = v.as_tensor().to_dtype(candle_core::DType::F32).unwrap();
        let t = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        t.iter().map(|x| x.to_bits()).collect()
    };
    model.trainable().iter().map(|(_, v)| f32_bits(v)).collect()
}
