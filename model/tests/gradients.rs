//! Every parameter receives a non-zero gradient: proof that no op in the model silently drops the
//! backward pass (as candle-nn's fused ops do).

mod common;

use candle_core::{DType, Device, Tensor};
use herd_model::loss::causal_lm_loss_sum;
use herd_model::Llama;

/// Two rows of ids and their labels, some masked.
fn two_rows() -> (Tensor, Tensor) {
    let input = common::ids(&[&[1, 5, 9, 13, 2, 40, 7], &[3, 3, 17, 29, 44, 0, 0]]);
    let labels = Tensor::new(
        &[
            [-100i64, -100, 9, 13, 2, 40, 7],
            [-100, 3, 17, 29, 44, -100, -100],
        ],
        &Device::Cpu,
    )
    .unwrap();
    (input, labels)
}

fn check_all_gradients(model: &Llama) {
    let (input, labels) = two_rows();
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

/// The stage callback names every parameter once, as soon as its gradient is final: the final
/// norm and an untied head first, then the layers from the last to the first, the embedding
/// (which a tied head shares) last. The gradients it takes out are the plain backward's, bit for
/// bit, with or without recompute.
fn check_final_gradients_stage_by_stage(tied: bool, recompute: bool) {
    let model = Llama::random(common::tiny_config(tied), 3).unwrap();
    let (input, labels) = two_rows();
    let loss = |top: &herd_model::recompute::Top| causal_lm_loss_sum(&top.logits()?, &labels);
    let (_, _, plain) = model
        .loss_and_gradients(&input, None, recompute, loss)
        .unwrap();

    let names: Vec<String> = model.trainable().iter().map(|(n, _)| n.clone()).collect();
    let mut stages: Vec<Vec<String>> = vec![];
    let mut taken: Vec<Option<Tensor>> = vec![None; names.len()];
    let (_, _, left) = model
        .loss_and_gradients_with(&input, None, recompute, loss, |grads, idx| {
            stages.push(idx.iter().map(|&i| names[i].clone()).collect());
            for &i in idx {
                assert!(taken[i].is_none(), "{} named twice", names[i]);
                taken[i] = grads[i].take();
            }
            Ok(())
        })
        .unwrap();
    assert!(left.iter().all(Option::is_none), "every gradient was named");
    for (i, name) in names.iter().enumerate() {
        let (a, b) = (taken[i].as_ref().unwrap(), plain[i].as_ref().unwrap());
        assert_eq!(common::max_abs_diff(a, b), 0.0, "{name}");
    }
    let layers = common::tiny_config(tied).num_hidden_layers;
    let stage_of = |name: &str| stages.iter().position(|s| s.iter().any(|n| n == name));
    let mut head = vec!["model.norm.weight"];
    if !tied {
        head.push("lm_head.weight");
    }
    for name in head {
        assert_eq!(stage_of(name), Some(0), "{name}: {stages:?}");
    }
    for l in 0..layers {
        let name = format!("model.layers.{l}.mlp.down_proj.weight");
        assert_eq!(stage_of(&name), Some(layers - l), "{name}: {stages:?}");
        let q = format!("model.layers.{l}.self_attn.q_proj.weight");
        assert_eq!(stage_of(&q), Some(layers - l), "{q}: {stages:?}");
    }
    assert_eq!(
        stages.last().unwrap(),
        &vec!["model.embed_tokens.weight".to_string()]
    );
}

#[test]
fn gradients_are_named_final_stage_by_stage_untied() {
    check_final_gradients_stage_by_stage(false, false);
}

#[test]
fn gradients_are_named_final_stage_by_stage_tied_with_recompute() {
    check_final_gradients_stage_by_stage(true, true);
}
