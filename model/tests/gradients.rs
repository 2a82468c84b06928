//! Every parameter receives a non-zero gradient: proof that no op in the model silently drops the
//! backward pass (as candle-nn's fused ops do).

mod common;

use candle_core::{DType, Device, Tensor};
use herd_model::loss::causal_lm_loss_sum;
use herd_model::Llama;

fn check_all_gradients(model: &Llama) {
    let input = common::ids(&[&[1, 5, 9, 13, 2, 40, 7], &[3, 3, 17, 29, 44, 0, 0]]);
    let labels = Tensor::new(
        &[
            [-100i64, -100, 9, 13, 2, 40, 7],
            [-100, 3, 17, 29, 44, -100, -100],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let logits = model.forward(&input).unwrap();
    let (sum, count) = causal_lm_loss_sum(&logits, &labels).unwrap();
    assert_eq!(count, 9);
    let loss = (sum / count as f64).unwrap();
    assert!(loss.to_scalar::<f32>().unwrap().is_finite());
    let grads = loss.backward().unwrap();
    assert!(!model.vars().is_empty());
    for (name, var) in model.vars() {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        assert_eq!(g.dims(), var.dims(), "{name}");
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt();
        assert!(
            norm.is_finite() && norm > 0.0,
            "{name}: gradient norm {norm}"
        );
    }
}

#[test]
fn every_parameter_gets_a_gradient_untied() {
    let model = Llama::random(common::tiny_config(false), 1).unwrap();
    assert!(model.vars().iter().any(|(n, _)| n == "lm_head.weight"));
    check_all_gradients(&model);
}

#[test]
fn every_parameter_gets_a_gradient_tied() {
    let model = Llama::random(common::tiny_config(true), 2).unwrap();
    assert!(model.vars().iter().all(|(n, _)| n != "lm_head.weight"));
    check_all_gradients(&model);
}

#[test]
fn every_parameter_gets_a_gradient_with_biases() {
    let mut cfg = common::tiny_config(false);
    cfg.attention_bias = true;
    cfg.mlp_bias = true;
    let model = Llama::random(cfg, 3).unwrap();
    assert!(model
        .vars()
        .iter()
        .any(|(n, _)| n == "model.layers.1.mlp.down_proj.bias"));
    check_all_gradients(&model);
}

#[test]
fn gradient_matches_finite_difference() {
    // Central difference in f64 on a few coordinates of two parameters, as a check of the
    // hand-written backward-relevant ops independent of the PyTorch fixtures.
    let model = Llama::random(common::tiny_config(false), 4).unwrap();
    let input = common::ids(&[&[1, 5, 9, 13, 2, 40]]);
    let labels = input.to_dtype(DType::I64).unwrap();
    let loss_of = |m: &Llama| {
        let (s, c) = causal_lm_loss_sum(&m.forward(&input).unwrap(), &labels).unwrap();
        (s / c as f64).unwrap()
    };
    let grads = loss_of(&model).backward().unwrap();
    for name in [
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.1.input_layernorm.weight",
    ] {
        let var = &model.vars().iter().find(|(n, _)| n == name).unwrap().1;
        let g: Vec<f32> = grads
            .get(var)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f32> = var.flatten_all().unwrap().to_vec1().unwrap();
        for idx in [0usize, 7, 19] {
            let eps = 1e-2f32;
            let at = |delta: f32| {
                let mut v = base.clone();
                v[idx] += delta;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                loss_of(&model).to_scalar::<f32>().unwrap() as f64
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps as f64);
            var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let tol = 2e-3 + 2e-2 * fd.abs();
            assert!(
                (fd - g[idx] as f64).abs() < tol,
                "{name}[{idx}]: fd {fd} vs grad {}",
                g[idx]
            );
        }
    }
}
